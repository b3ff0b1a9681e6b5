"""The proxmox_vm_pool module and the proxmox inventory plugin name the same address and the same tags for a VM.

Both go through their own code paths (the module's PoolRun, the inventory's parse) over the same cluster data:
first a fake cluster holding the guests that the two used to disagree on, then the lab's simulator, where the module
makes VMs with two NICs and the inventory reads them back.
"""

from __future__ import annotations

import copy
import time
import urllib.parse

import pytest
import yaml
from ansible.inventory.data import InventoryData
from ansible.parsing.dataloader import DataLoader
from ansible.plugins.loader import init_plugin_loader, inventory_loader

init_plugin_loader()

from ansible_collections.mlfleet.serving.plugins.inventory import proxmox as proxmox_inventory
from ansible_collections.mlfleet.serving.plugins.module_utils._proxmox import ProxmoxClient, ProxmoxError
from ansible_collections.mlfleet.serving.plugins.modules import proxmox_vm_pool
from lab.pvesim.backend import dhcp_address
from lab.pvesim.config import DEFAULT_CONFIG
from lab.pvesim.server import Simulator, running_in_thread

TEMPLATE = {"type": "qemu", "vmid": 9000, "name": "golden", "node": "pve1", "status": "stopped", "template": 1, "tags": "golden"}
AUTOMATION_TOKEN = DEFAULT_CONFIG["users"]["automation@pve"]["tokens"]["mlfleet"]["secret"]
NET0_MAC, NET1_MAC = "BC:24:11:00:01:00", "BC:24:11:00:01:01"


def interface(name, mac, *addresses):
    return {
        "name": name,
        "hardware-address": mac,
        "ip-addresses": [{"ip-address-type": "ipv6" if ":" in a else "ipv4", "ip-address": a, "prefix": 24} for a in addresses],
    }


LOOPBACK = interface("lo", "00:00:00:00:00:00", "127.0.0.1", "::1")
DOCKER = [interface("docker0", "02:42:ac:11:00:01", "172.17.0.1"), interface("br-5e1f", "02:42:ac:12:00:01", "172.18.0.1")]
BOTH_NICS = {"net0": f"virtio={NET0_MAC},bridge=vmbr0", "net1": f"virtio={NET1_MAC},bridge=vmbr1"}

# vmid: (VM config, the agent's interfaces or None when it does not answer, the address by the rule, its source)
GUESTS = {
    # Docker's bridges come first in the agent's answer; the guest names its NIC ens18.
    201: (
        {"net0": f"virtio={NET0_MAC},bridge=vmbr0", "ipconfig0": "ip=dhcp"},
        [LOOPBACK, *DOCKER, interface("ens18", NET0_MAC.lower(), "10.99.0.201")],
        "10.99.0.201",
        "agent",
    ),
    # eth0 is the guest's name for net1: interface names say nothing about which NIC is which.
    202: (
        BOTH_NICS | {"ipconfig0": "ip=dhcp", "ipconfig1": "ip=dhcp"},
        [LOOPBACK, interface("eth0", NET1_MAC.lower(), "10.1.0.202"), interface("eth1", NET0_MAC.lower(), "10.99.0.202")],
        "10.99.0.202",
        "agent",
    ),
    # net0's interface has only link-local addresses so far; another one has an address already.
    203: (
        BOTH_NICS | {"ipconfig0": "ip=10.20.0.203/24,gw=10.20.0.1"},
        [LOOPBACK, interface("eth0", NET0_MAC.lower(), "fe80::1"), interface("eth1", NET1_MAC.lower(), "10.1.0.203")],
        "10.20.0.203",
        "ipconfig0",
    ),
    # An IPv6-only guest without cloud-init.
    204: ({"net0": f"virtio={NET0_MAC},bridge=vmbr0"}, [LOOPBACK, interface("eth0", NET0_MAC, "fe80::1", "2001:db8::204")], "2001:db8::204", "agent"),
    # cloud-init asks for IPv4 by dhcp; the SLAAC address that comes up first does not stand in for it.
    205: ({"net0": f"virtio={NET0_MAC},bridge=vmbr0", "ipconfig0": "ip=dhcp"}, [LOOPBACK, interface("eth0", NET0_MAC.lower(), "2001:db8::205")], None, None),
    # No agent answer.
    206: ({"net0": f"virtio={NET0_MAC},bridge=vmbr0", "ipconfig0": "ip=10.20.0.206/24"}, None, "10.20.0.206", "ipconfig0"),
}


class FakeCluster:
    """What both code paths read of a cluster: /cluster/resources, VM configs and guest agent answers."""

    def __init__(self, guests):
        self.guests = guests

    def vm_resources(self):
        entries = [
            {"type": "qemu", "vmid": vmid, "name": f"worker-{vmid}", "node": "pve1", "status": "running", "template": 0, "tags": "Swarm_Worker;MLfleet"}
            for vmid in self.guests
        ]
        return [TEMPLATE, *entries]

    def get(self, path, **params):
        _nodes, _node, _qemu, vmid, what = path.split("/", 4)
        config, interfaces, _address, _source = self.guests[int(vmid)]
        if what == "config":
            return dict(config)
        if interfaces is None:
            raise ProxmoxError("QEMU guest agent is not running")
        return {"result": copy.deepcopy(interfaces)}


class FakeModule:
    def __init__(self, check_mode, **params):
        spec = proxmox_vm_pool.argument_spec()
        self.params = {name: option.get("default") for name, option in spec.items()} | params
        self.check_mode = check_mode
        self.warnings = []

    def warn(self, message):
        self.warnings.append(message)


def module_members(client, check_mode=True, **params):
    pool = {"pool_tag": "swarm_worker", "state": "present", "poll_interval": 0.01, "ip_timeout": 10}
    module = FakeModule(check_mode, **(pool | params))
    proxmox_vm_pool.check_arguments(module.params)
    return {member["vmid"]: member for member in proxmox_vm_pool.PoolRun(module, client).run()["members"]}


def inventory_hosts(tmp_path, **options):
    config = {"plugin": "mlfleet.serving.proxmox", "api_host": "127.0.0.1", "api_user": "automation@pve", "api_token_id": "mlfleet"}
    path = tmp_path / "agreement.proxmox.yml"
    path.write_text(yaml.safe_dump(config | {"api_token_secret": "secret"} | options), encoding="utf-8")
    plugin = inventory_loader.get("mlfleet.serving.proxmox")
    inventory = InventoryData()
    plugin.parse(inventory, DataLoader(), str(path), cache=False)
    return {host.get_vars()["proxmox_vmid"]: host.get_vars() for host in inventory.hosts.values()}


def test_module_and_inventory_agree_on_every_guest(tmp_path, monkeypatch):
    cluster = FakeCluster(GUESTS)
    monkeypatch.setattr(proxmox_inventory.ProxmoxClient, "from_params", classmethod(lambda cls, params, **extra: cluster))
    hosts = inventory_hosts(tmp_path)
    members = module_members(cluster, count=len(GUESTS), template="golden")

    assert set(hosts) == set(members) == set(GUESTS)
    for vmid, (_config, _interfaces, address, source) in GUESTS.items():
        host, member = hosts[vmid], members[vmid]
        assert (host.get("ansible_host"), host["proxmox_address_source"]) == (address, source), vmid
        # The module reports what the agent confirms; before that, the inventory has the static address.
        assert member["ip"] == (address if source == "agent" else None), vmid
        assert host["proxmox_tags"] == member["tags"] == ["swarm_worker", "mlfleet"]


def test_module_and_inventory_agree_on_net1(tmp_path, monkeypatch):
    cluster = FakeCluster(GUESTS)
    monkeypatch.setattr(proxmox_inventory.ProxmoxClient, "from_params", classmethod(lambda cls, params, **extra: cluster))
    hosts = inventory_hosts(tmp_path, address_nic="net1")
    members = module_members(cluster, count=len(GUESTS), template="golden", address_nic="net1")
    assert hosts[202]["ansible_host"] == members[202]["ip"] == "10.1.0.202"
    assert hosts[203]["ansible_host"] == members[203]["ip"] == "10.1.0.203"
    assert "ansible_host" not in hosts[201] and members[201]["ip"] is None


def test_the_module_waits_for_the_nic_and_says_what_the_agent_reports():
    cluster = FakeCluster({203: GUESTS[203]})
    with pytest.raises(proxmox_vm_pool.PoolError) as failure:
        module_members(cluster, check_mode=False, count=1, template="golden", ip_timeout=1)
    assert (
        "VM 203 (worker-203) on pve1 reported no address on net0 within ip_timeout 1s (last answer: the guest agent reports no usable "
        f"IPv4 address on the interface with net0's MAC {NET0_MAC.lower()})"
    ) in str(failure.value)


# --- against the simulator: the module makes the VMs, the inventory reads them -------------------


@pytest.fixture
def sim(tmp_path):
    config = copy.deepcopy(DEFAULT_CONFIG)
    config["durations"].update({"clone_setup": 0.0, "clone_linked": 0.02, "clone_full": 0.02, "config": 0.0, "start": 0.01, "boot_to_agent": 0.05})
    (template,) = [vm for vm in config["vms"] if vm["vmid"] == 9000]
    # A template with a second NIC, the one the workers are to be reached on.
    template["config"]["net1"] = "virtio=BC:24:11:00:90:01,bridge=vmbr0"
    simulator = Simulator(config, tmp_path / "sim")
    with running_in_thread(simulator) as url:
        parts = urllib.parse.urlsplit(url)
        yield {"api_host": parts.hostname, "api_port": parts.port, "ca_path": str(simulator.certificates.ca_file)}


def test_on_the_simulator_the_inventory_names_the_addresses_the_module_waited_for(tmp_path, sim):
    connection = sim | {"api_user": "automation@pve", "api_token_id": "mlfleet", "api_token_secret": AUTOMATION_TOKEN}
    client = ProxmoxClient.from_params(connection)
    ip_range = {"start": "192.168.213.20", "end": "192.168.213.29", "prefix": 24, "gateway": "192.168.213.1"}
    started = time.monotonic()
    members = module_members(
        client,
        check_mode=False,
        count=2,
        template="debian12-golden",
        pool="mlfleet",
        full=False,
        name_prefix="worker",
        address_nic="net1",
        ip_range=ip_range,
        extra_tags=["MLfleet"],
    )
    assert time.monotonic() - started < 20
    assert sorted(member["ip"] for member in members.values()) == ["192.168.213.20", "192.168.213.21"]

    hosts = inventory_hosts(tmp_path, **sim, api_token_secret=AUTOMATION_TOKEN, address_nic="net1", filters={"tags": ["Swarm_Worker"]})
    assert {vmid: host["ansible_host"] for vmid, host in hosts.items()} == {vmid: member["ip"] for vmid, member in members.items()}
    assert {vmid: host["proxmox_tags"] for vmid, host in hosts.items()} == {vmid: member["tags"] for vmid, member in members.items()}
    assert all(host["proxmox_address_source"] == "agent" for host in hosts.values())

    # net0 is a NIC too, on dhcp: asked for it, the inventory names its address, not net1's.
    on_net0 = inventory_hosts(tmp_path, **sim, api_token_secret=AUTOMATION_TOKEN, filters={"tags": ["swarm_worker"]})
    assert {vmid: host["ansible_host"] for vmid, host in on_net0.items()} == {vmid: str(dhcp_address(vmid).ip) for vmid in members}
