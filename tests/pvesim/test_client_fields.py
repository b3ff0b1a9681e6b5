"""The rule of lab/pvesim/README.md: for every implemented endpoint, the fields real Proxmox sends and that the clients
we test with read are there. The schema's `returns` often leaves them out, so this table lists them per call, with
the reader: community.proxmox (the version scripts/bootstrap unpacks: its inventory plugin, module_utils/proxmox.py,
proxmox_kvm, proxmox_snap, proxmox_vm_info, proxmox_storage_contents_info, proxmox_template), proxmoxer
(backends/https.py, tools/tasks.py) and this collection (plugins/module_utils/_proxmox*.py, plugins/inventory/proxmox.py).
Add a line when a client starts reading a field, or when an endpoint is implemented.
"""

from __future__ import annotations

from pvesim_support import ROOT_PASSWORD, Sim

VM = 100
# (method, concrete path, parameters, where in the answer, fields, who reads them)
READS = [
    ("GET", "/version", {}, "", {"version"}, "community.proxmox ProxmoxAnsible.version"),
    ("POST", "/access/ticket", {"username": "root@pam", "password": ROOT_PASSWORD}, "", {"ticket", "CSRFPreventionToken"}, "proxmoxer, inventory plugin"),
    ("GET", "/nodes", {}, "[]", {"node", "type", "status"}, "community inventory _populate, ProxmoxAnsible.get_node"),
    ("GET", "/nodes", {}, "[]", {"mem", "maxmem"}, "our _proxmox_pool placement"),
    ("GET", "/nodes/pve1/lxc", {}, "[]", set(), "community inventory (a list, even when empty)"),
    ("GET", "/nodes/pve1/qemu", {}, "[]", {"vmid", "name", "status"}, "community inventory _handle_item, proxmox_vm_info"),
    ("GET", "/cluster/resources", {"type": "vm"}, "[]", {"vmid", "name", "node", "type", "status", "template"}, "ProxmoxAnsible.get_vm, proxmox_vm_info, ours"),
    ("GET", "/cluster/resources", {"type": "vm"}, f"[vmid={VM}]", {"pool", "tags"}, "our pool membership (is_member)"),
    ("GET", "/pools", {}, "[]", {"poolid"}, "community inventory _populate_pool_groups"),
    ("GET", "/pools/mlfleet", {}, "members[]", {"name", "vmid"}, "community inventory (name), ours (vmid)"),
    ("GET", "/pools", {"poolid": "mlfleet"}, "[]members[]", {"name", "vmid"}, "GET /pools?poolid= clients"),
    ("GET", f"/nodes/pve1/qemu/{VM}/status/current", {}, "", {"status", "qmpstatus"}, "community inventory, proxmox_kvm"),
    ("GET", f"/nodes/pve1/qemu/{VM}/config", {}, "", {"net0", "ipconfig0", "scsi0", "agent", "tags", "digest"}, "proxmox_kvm, community inventory, ours"),
    ("GET", f"/nodes/pve1/qemu/{VM}/snapshot", {}, "[]", {"name"}, "community inventory, proxmox_snap"),
    ("GET", f"/nodes/pve1/qemu/{VM}/snapshot", {}, "[name=ready]", {"snaptime"}, "proxmox_snap retention"),
    ("GET", f"/nodes/pve1/qemu/{VM}/agent/network-get-interfaces", {}, "result[]", {"name", "hardware-address", "ip-addresses"}, "inventories, ours"),
    (
        "GET",
        f"/nodes/pve1/qemu/{VM}/agent/network-get-interfaces",
        {},
        "result[]ip-addresses[]",
        {"ip-address", "prefix", "ip-address-type"},
        "community inventory (prefix), ours (type)",
    ),
    ("GET", "/nodes/pve1/storage/slow-nfs/content", {}, "[]", {"volid", "content", "format", "size", "ctime"}, "proxmox_template, storage_contents_info"),
]


def select(data, where: str) -> list:
    """The parts of an answer that `where` names: `[]` each item, `[key=value]` the items where key is value, `key`."""
    found = [data]
    for step in filter(None, where.replace("[", " [").replace("]", "] ").split()):
        if step == "[]":
            found = [item for part in found for item in part]
        elif step.startswith("["):
            key, value = step[1:-1].split("=")
            found = [item for part in found for item in part if str(item.get(key)) == value]
        else:
            found = [part[step] for part in found]
    return found


def test_fields_clients_read_are_sent(make_sim):
    """Asked of a VM in the pool, running with its agent up, with a snapshot."""
    sim: Sim = make_sim(durations={"boot_to_agent": 0})
    sim.clone(VM, pool="mlfleet")
    sim.data("PUT", f"/nodes/pve1/qemu/{VM}/config", data={"tags": "mlfleet;worker", "ipconfig0": "ip=10.20.0.11/24"})
    sim.wait_task(sim.data("POST", f"/nodes/pve1/qemu/{VM}/status/start"))
    sim.wait_task(sim.data("POST", f"/nodes/pve1/qemu/{VM}/snapshot", data={"snapname": "ready"}))
    problems = []
    for method, path, params, where, fields, reader in READS:
        token = {"token": None} if path == "/access/ticket" else {}
        answer = sim.data(method, path, **token, **{"params" if method == "GET" else "data": params})
        parts = select(answer, where)
        if fields and not parts:
            problems.append(f"{method} {path}: nothing at {where!r}")
        problems += [f"{method} {path} {where}: {reader} reads {sorted(fields - set(part))}" for part in parts if not fields <= set(part)]
    assert not problems, "\n".join(problems)
