"""proxmox_vm_pool's main() in-process against the lab's Proxmox VE simulator (memory backend, millisecond tasks).

The simulator validates every call against the real API schema and keeps a request log, so the tests
assert on what the module sent, not only on what it returned.
"""

from __future__ import annotations

import copy
import json
import re
import time
import urllib.parse

import pytest
import requests
from ansible.module_utils import _internal as module_utils_internal
from ansible.module_utils.testing import patch_module_args

from ansible_collections.mlfleet.serving.plugins.modules import proxmox_vm_pool
from lab.pvesim.config import DEFAULT_CONFIG
from lab.pvesim.server import Simulator, running_in_thread

FAST = {"clone_setup": 0.0, "clone_linked": 0.05, "clone_full": 0.02, "config": 0.0, "start": 0.01, "boot_to_agent": 0.05, "shutdown": 0.02, "stop": 0.01}
FAST["destroy"] = 0.01
ROOT_TOKEN = DEFAULT_CONFIG["users"]["root@pam"]["tokens"]["admin"]["secret"]
AUTOMATION_TOKEN = DEFAULT_CONFIG["users"]["automation@pve"]["tokens"]["mlfleet"]["secret"]
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBx9Jb0lfBbJ1ZkqvJ0nKk7bqJk9kE6G2v4D1QYkX0aZ deploy@mlfleet"
WRITES = ("POST", "PUT", "DELETE")


def start_simulator(tmp_path, limits=None, durations=None, pci_mappings=None, template_config=None):
    config = copy.deepcopy(DEFAULT_CONFIG)
    config["durations"].update(FAST | (durations or {}))
    config["limits"].update(limits or {})
    config["pci_mappings"] = pci_mappings or {}
    config["vms"][0]["config"].update(template_config or {})
    return Simulator(config, tmp_path / "sim")


@pytest.fixture
def sim(tmp_path, request):
    simulator = start_simulator(tmp_path, **getattr(request, "param", {}))
    with running_in_thread(simulator) as url:
        parts = urllib.parse.urlsplit(url)
        yield {"host": parts.hostname, "port": parts.port, "ca": str(simulator.certificates.ca_file), "simulator": simulator, "url": url}


def admin(sim, method, path, **kwargs):
    headers = {"Authorization": f"Bearer {sim['simulator'].admin_token}"}
    response = requests.request(method, f"{sim['url']}/_sim/{path}", headers=headers, verify=sim["ca"], timeout=10, **kwargs)
    response.raise_for_status()
    return response.json() if response.content else None


def writes(sim):
    return [entry for entry in admin(sim, "GET", "requests") if entry["method"] in WRITES and "/_sim/" not in entry["path"]]


def api_get(sim, path, **params):
    headers = {"Authorization": f"PVEAPIToken=root@pam!admin={ROOT_TOKEN}"}
    response = requests.get(f"{sim['url']}/api2/json/{path}", params=params, headers=headers, verify=sim["ca"], timeout=10)
    response.raise_for_status()
    return response.json()["data"]


def cluster_vms(sim):
    return {vm["vmid"]: vm for vm in api_get(sim, "cluster/resources", type="vm")}


def run(sim, check_mode=False, diff=False, **args):
    connection = {"api_host": sim["host"], "api_port": sim["port"], "api_user": "automation@pve", "api_token_id": "mlfleet"}
    connection |= {"api_token_secret": AUTOMATION_TOKEN, "ca_path": sim["ca"], "poll_interval": 0.01}
    pool = {"pool_tag": "worker", "pool": "mlfleet", "template": "debian12-golden", "full": False, "ip_timeout": 10}
    module_args = connection | pool | args
    if check_mode:
        module_args["_ansible_check_mode"] = True
    if diff:
        module_args["_ansible_diff"] = True
    with patch_module_args(module_args):
        with pytest.raises(SystemExit) as exited:
            proxmox_vm_pool.main()
    return exited.value.code


@pytest.fixture
def module(sim, capsys, monkeypatch):
    # Controller code imported by other tests makes module warnings go to the display instead of the result.
    monkeypatch.setattr(module_utils_internal, "is_controller", False)

    def invoke(**args):
        capsys.readouterr()
        code = run(sim, **args)
        result = json.loads(capsys.readouterr().out)
        result["rc"] = code
        return result

    return invoke


def members(result):
    return [member["vmid"] for member in result["members"]]


def test_create_rerun_grow_shrink_absent(sim, module):
    created = module(count=3, ciuser="debian", sshkeys=[KEY], cores=2, cpulimit=0.5, memory=1024, extra_tags=["mlfleet"], nameserver="192.168.213.1")
    assert created["rc"] == 0, created["msg"]
    assert created["changed"] and len(created["created"]) == 3
    assert sorted(vm["node"] for vm in created["created"]) == ["pve1", "pve2", "pve3"]
    assert all(member["status"] == "running" and member["ip"].startswith("10.99.") for member in created["members"])
    assert created["members"][0]["tags"] == ["mlfleet", "worker"]
    assert "most free memory" in created["placement"][0]["reason"]
    assert {entry["stage"] for entry in created["progress"]} >= {"cloned", "configured", "started"}
    vms = cluster_vms(sim)
    first = members(created)[0]
    assert vms[first]["name"] == f"worker-{first}" and vms[first]["pool"] == "mlfleet"
    config = api_get(sim, f"nodes/{vms[first]['node']}/qemu/{first}/config")
    assert urllib.parse.unquote(config["sshkeys"]) == KEY
    assert (config["cores"], config["cpulimit"], config["memory"], config["ciuser"], config["nameserver"]) == (2, 0.5, "1024", "debian", "192.168.213.1")
    assert config["ipconfig0"] == "ip=dhcp" and config["tags"] == "mlfleet;worker"

    admin(sim, "DELETE", "requests")
    again = module(count=3, ciuser="debian", sshkeys=[KEY], cores=2, cpulimit=0.5, memory=1024, extra_tags=["mlfleet"], nameserver="192.168.213.1")
    assert again["rc"] == 0 and not again["changed"]
    assert members(again) == members(created) and again["created"] == [] and again["removed"] == []
    assert writes(sim) == []

    grown = module(count=5)
    assert grown["changed"] and len(grown["created"]) == 2 and len(grown["members"]) == 5

    protected = members(grown)[-1]
    shrunk = module(count=2, protected=[protected])
    assert shrunk["changed"] and len(shrunk["removed"]) == 3
    assert protected in members(shrunk) and len(shrunk["members"]) == 2
    assert shrunk["removed"] == sorted(set(members(grown)) - {protected}, reverse=True)[:3]
    paths = [entry["path"] for entry in writes(sim) if entry["method"] == "POST" and entry["path"].endswith("/status/shutdown")]
    assert len(paths) == 3 and all(f"/qemu/{protected}/" not in path for path in paths)

    gone = module(state="absent", protected=[protected])
    assert gone["changed"] and len(gone["removed"]) == 1 and members(gone) == [protected]
    assert set(cluster_vms(sim)) == {9000, protected}


def test_check_mode_plans_exactly_and_writes_nothing(sim, module):
    assert module(count=1)["rc"] == 0
    admin(sim, "DELETE", "requests")
    ip_range = {"start": "192.168.213.50", "end": "192.168.213.60", "prefix": 24, "gateway": "192.168.213.1"}
    plan = module(count=3, ip_range=ip_range, check_mode=True, diff=True, nodes=["pve2", "pve3"])
    assert plan["rc"] == 0 and plan["changed"]
    assert writes(sim) == []
    planned = [vm["vmid"] for vm in plan["created"]]
    assert [(vm["name"], vm["node"], vm["address"]) for vm in plan["created"]] == [
        (f"worker-{planned[0]}", "pve2", "192.168.213.50"),
        (f"worker-{planned[1]}", "pve3", "192.168.213.51"),
    ]
    existing = members(plan)
    assert plan["diff"] == {"before": {"count": 1, "members": existing}, "after": {"count": 3, "members": existing + [vm["vmid"] for vm in plan["created"]]}}

    shrink = module(count=0, check_mode=True, diff=True)
    assert shrink["changed"] and shrink["removed"] == existing and shrink["diff"]["after"] == {"count": 0, "members": []}
    assert writes(sim) == []

    real = module(count=3, ip_range=ip_range, nodes=["pve2", "pve3"])
    assert [(vm["node"], vm["address"], vm["ip"]) for vm in real["created"]] == [
        ("pve2", "192.168.213.50", "192.168.213.50"),
        ("pve3", "192.168.213.51", "192.168.213.51"),
    ]


@pytest.mark.parametrize("sim", [{"limits": {"parallel_clones_per_source": 1, "lock_wait": 0.05}}], indirect=True)
def test_parallel_clones_retry_lock_timeouts_and_keep_ids_unique(sim, module):
    result = module(count=5, parallel=5, clone_retries=12)
    assert result["rc"] == 0, result["msg"]
    assert len(set(members(result))) == 5
    assert any(entry["stage"].startswith("template locked") for entry in result["progress"])
    names = [vm["name"] for vm in cluster_vms(sim).values() if vm["vmid"] != 9000]
    assert sorted(names) == sorted(f"worker-{vmid}" for vmid in members(result))


def test_a_clone_racing_for_our_id_gets_another(sim, module, monkeypatch):
    real_allocate = proxmox_vm_pool.IdAllocator.allocate
    handed = []

    def first_id_twice(self):
        # Two planned VMs get the same id, as two runs reading /cluster/nextid at once would.
        vmid = handed[0] if len(handed) == 1 else real_allocate(self)
        handed.append(vmid)
        return vmid

    monkeypatch.setattr(proxmox_vm_pool.IdAllocator, "allocate", first_id_twice)
    result = module(count=2, parallel=2)
    assert result["rc"] == 0, result["msg"]
    assert len(set(members(result))) == 2
    assert any(entry["stage"] == "vmid taken, allocating another" for entry in result["progress"])


def test_a_failed_clone_names_the_vm_and_a_rerun_converges_without_orphans(sim, module):
    admin(sim, "PUT", "faults", json={"clone_failure": {"message": "storage migration failed", "count": 1}})
    failed = module(count=3, parallel=1)
    assert failed["rc"] == 1 and failed["failed"]
    assert failed["msg"].startswith("clone of template 9000 to VM 100 (worker-100, target node pve1) on node pve1 failed: storage migration failed")
    assert "last log line: TASK ERROR: storage migration failed" in failed["msg"]
    tagged = [vm for vm in cluster_vms(sim).values() if "worker" in vm.get("tags", "")]
    assert len(tagged) == 2 and all(vm["vmid"] != 100 for vm in tagged)

    converged = module(count=3)
    assert converged["rc"] == 0 and len(converged["members"]) == 3 and len(converged["created"]) == 1
    assert all(vm.get("tags") == "worker" for vmid, vm in cluster_vms(sim).items() if vmid != 9000)


def test_stopped_members_are_started_on_rerun(sim, module):
    created = module(count=2, start=False, wait_for_ip=False)
    assert {vm["status"] for vm in created["members"]} == {"stopped"}
    started = module(count=2)
    assert started["changed"] and started["created"] == []
    assert all(vm["status"] == "running" and vm["ip"] for vm in started["members"])


def test_agent_that_never_answers_fails_with_the_deadline(sim, module):
    admin(sim, "PUT", "faults", json={"agent_never_up": "all"})
    started = time.monotonic()
    result = module(count=1, ip_timeout=1)
    assert result["rc"] == 1 and time.monotonic() - started < 10
    assert "reported no address on net0 within ip_timeout 1s" in result["msg"] and "QEMU guest agent is not running" in result["msg"]
    assert "was created and tagged" in result["msg"]


def test_address_range_exhaustion_fails_before_any_write(sim, module):
    admin(sim, "DELETE", "requests")
    result = module(count=3, ip_range={"start": "192.168.213.50", "end": "192.168.213.51", "prefix": 24})
    assert result["rc"] == 1
    assert "ip_range 192.168.213.50-192.168.213.51 has 2 addresses" in result["msg"] and "widen ip_range or lower count" in result["msg"]
    assert writes(sim) == []


@pytest.mark.parametrize(
    "args, message",
    [
        ({"count": 1, "template": "no-such-template"}, r"template 'no-such-template' not found among the cluster's templates \(9000 debian12-golden on pve1\)"),
        ({"count": 1, "template": "9001"}, r"template 9001 not found"),
        ({"count": 1, "storage": "local-lvm"}, r"storage local-lvm applies to full clones only.*set full: true"),
        ({"count": 0, "remove_vmids": [9000]}, r"remove_vmids: VM 9000 \(debian12-golden\) on pve1 is not a member of pool tag worker in pool mlfleet"),
        ({"count": 1, "nodes": ["pve9"]}, r"nodes pve9 not in the cluster"),
        ({"state": "present", "count": 1, "template": None}, r"state present needs count \(the pool size\) and template"),
        ({"count": 1, "cpulimit": 200}, r"cpulimit must be from 0 \(no limit\) to 128 CPUs, as Proxmox accepts, not 200"),
        ({"count": 1, "take_from_tag": "Worker"}, r"take_from_tag Worker is the pool's own tag: name the warm pool's tag, or drop take_from_tag"),
        ({"count": 1, "take_vmids": [101]}, r"take_vmids names VMs of the warm pool to take: set take_from_tag to that pool's tag, or drop take_vmids"),
        (
            {"count": 1, "take_from_tag": "worker_warm", "take_vmids": [9000]},
            r"take_vmids: VM 9000 \(debian12-golden\) on pve1 carries neither pool tag worker nor take_from_tag worker_warm in pool mlfleet: "
            r"remove it from take_vmids",
        ),
    ],
)
def test_bad_arguments_name_the_object_and_the_fix(sim, module, args, message):
    admin(sim, "DELETE", "requests")
    result = module(**args)
    assert result["rc"] == 1 and re.search(message, result["msg"]), result["msg"]
    assert writes(sim) == []


def test_remove_vmids_and_protected_must_agree(sim, module):
    created = module(count=3)
    first, second, third = members(created)
    clash = module(count=2, remove_vmids=[first], protected=[first])
    assert clash["rc"] == 1 and f"VMs {first} are both in remove_vmids and protected" in clash["msg"]
    too_many = module(count=2, remove_vmids=[first, second])
    assert too_many["rc"] == 1 and "lower count to 1 or list fewer vmids" in too_many["msg"]
    explicit = module(count=2, remove_vmids=[first])
    assert explicit["removed"] == [first]
    again = module(count=2, remove_vmids=[first])
    assert again["rc"] == 0 and not again["changed"]


def test_oldest_policy_and_protected_below_count(sim, module):
    created = module(count=3)
    oldest = module(count=2, scale_in_policy="oldest")
    assert oldest["removed"] == [members(created)[0]]
    kept = module(count=0, protected=members(oldest))
    assert not kept["changed"] and "below the 2 protected members" in json.dumps(kept["warnings"])


@pytest.mark.parametrize("sim", [{"durations": {"shutdown": 5.0}}], indirect=True)
def test_a_member_that_does_not_shut_down_in_time_is_stopped_then_destroyed(sim, module):
    created = module(count=1)
    removed = module(count=0, shutdown_timeout=1)
    assert removed["rc"] == 0 and removed["removed"] == members(created)
    stages = [entry["stage"] for entry in removed["progress"]]
    assert stages[0].startswith("shutdown failed") and "got timeout" in stages[0] and stages[1:] == ["stopped", "destroyed"]
    sent = {(entry["method"], entry["path"].rsplit("/", 1)[-1]): entry["params"] for entry in writes(sim)}
    assert {key: sent[("POST", "shutdown")][key] for key in ("timeout", "forceStop")} == {"timeout": "1", "forceStop": "0"}
    assert {key: sent[("DELETE", "100")][key] for key in ("purge", "destroy-unreferenced-disks")} == {"purge": "1", "destroy-unreferenced-disks": "1"}
    assert set(cluster_vms(sim)) == {9000}


def test_full_clones_go_to_the_given_storage(sim, module):
    result = module(count=1, full=True, storage="local-lvm", nodes=["pve1"])
    assert result["rc"] == 0, result["msg"]
    vmid = members(result)[0]
    assert api_get(sim, f"nodes/pve1/qemu/{vmid}/config")["scsi0"].startswith(f"local-lvm:vm-{vmid}-disk-0")


def test_clones_to_non_shared_storage_stay_on_the_templates_node_and_say_why(sim, module):
    result = module(count=3, full=True, storage="local-lvm")
    assert result["rc"] == 0, result["msg"]
    assert {member["node"] for member in result["members"]} == {"pve1"}
    assert all("cannot leave the template's node pve1" in entry["reason"] for entry in result["placement"]), result["placement"]


def test_non_shared_storage_with_nodes_leaving_out_the_templates_node_fails_before_any_write(sim, module):
    admin(sim, "DELETE", "requests")
    result = module(count=1, full=True, storage="local-lvm", nodes=["pve2"])
    assert result["rc"] == 1
    assert "clones to local-lvm (not shared storage) cannot leave the template's node pve1" in result["msg"]
    assert "choose a shared storage or allow node pve1" in result["msg"]
    assert writes(sim) == []


RANGE = {"start": "192.168.213.50", "end": "192.168.213.59", "prefix": 24, "gateway": "192.168.213.1"}


def test_a_warm_pool_fills_the_pool_first_and_shares_its_address_range(sim, module):
    # Two warm VMs, one of them stopped, from the same range as the pool they fill.
    warm = module(pool_tag="worker_warm", count=2, ip_range=RANGE, extra_tags=["mlfleet"], address_peer_tags=["worker"])
    assert warm["rc"] == 0, warm["msg"]
    warm_vmids = members(warm)
    # A tag may hold _, a VM name may not: the default name prefix is the tag made a DNS name.
    assert [vm["name"] for vm in warm["members"]] == [f"worker-warm-{vmid}" for vmid in warm_vmids]
    stopped = warm["members"][1]
    admin(sim, "DELETE", "requests")
    api_post = requests.post(
        f"{sim['url']}/api2/json/nodes/{stopped['node']}/qemu/{stopped['vmid']}/status/stop",
        headers={"Authorization": f"PVEAPIToken=root@pam!admin={ROOT_TOKEN}"},
        verify=sim["ca"],
        timeout=10,
    )
    api_post.raise_for_status()
    time.sleep(0.2)

    # The pool has none and wants three: check mode says which two it takes (the running one first) and clones one.
    planned = module(count=3, ip_range=RANGE, take_from_tag="worker_warm", extra_tags=["mlfleet"], check_mode=True)
    assert planned["rc"] == 0, planned["msg"]
    assert [(vm["vmid"], vm["was"]) for vm in planned["taken"]] == [(warm_vmids[0], "running"), (warm_vmids[1], "stopped")]
    assert len(planned["created"]) == 1
    assert [entry for entry in writes(sim) if "/status/stop" not in entry["path"]] == []

    grown = module(count=3, ip_range=RANGE, take_from_tag="worker_warm", extra_tags=["mlfleet"])
    assert grown["rc"] == 0, grown["msg"]
    assert sorted(vm["vmid"] for vm in grown["taken"]) == warm_vmids and len(grown["created"]) == 1
    vms = cluster_vms(sim)
    # Taken in one write of the tags: the warm tag gone, the pool's tag and the others kept; the stopped one started.
    for vmid in warm_vmids:
        assert vms[vmid]["tags"] == "mlfleet;worker" and vms[vmid]["status"] == "running"
    # The clone took the next free address of the shared range, not one a taken VM holds.
    addresses = [vm["address"] for vm in grown["taken"]] + [grown["created"][0]["address"]]
    assert len(set(addresses)) == 3 and grown["created"][0]["address"] == "192.168.213.52"
    tag_writes = [entry for entry in writes(sim) if entry["method"] == "PUT" and entry["path"].endswith(tuple(f"/qemu/{vmid}/config" for vmid in warm_vmids))]
    assert len(tag_writes) == 2

    # The warm pool is empty now; refilled, its new VM avoids the pool's addresses (address_peer_tags).
    refill = module(pool_tag="worker_warm", count=1, ip_range=RANGE, extra_tags=["mlfleet"], address_peer_tags=["worker"])
    assert refill["rc"] == 0 and refill["created"][0]["address"] == "192.168.213.53"

    # Converged: a re-run takes nothing and writes nothing.
    admin(sim, "DELETE", "requests")
    again = module(count=3, ip_range=RANGE, take_from_tag="worker_warm", extra_tags=["mlfleet"])
    assert again["rc"] == 0 and not again["changed"] and again["taken"] == [] and writes(sim) == []


def test_a_drained_member_returns_to_the_warm_pool_by_take_vmids_and_no_other_member_goes(sim, module):
    workers = members(module(count=3, ip_range=RANGE))
    # The warm pool lacks two; only the listed worker may go there, so the other one is cloned.
    returned = module(pool_tag="worker_warm", count=2, ip_range=RANGE, take_from_tag="worker", take_vmids=[workers[1]], address_peer_tags=["worker"])
    assert returned["rc"] == 0, returned.get("msg")
    assert [vm["vmid"] for vm in returned["taken"]] == [workers[1]] and len(returned["created"]) == 1
    vms = cluster_vms(sim)
    assert vms[workers[1]]["tags"] == "worker_warm" and [vms[vmid]["tags"] for vmid in (workers[0], workers[2])] == ["worker", "worker"]
    assert returned["created"][0]["address"] not in {vm["address"] for vm in returned["taken"]}
    # Run again, the returned VM counts where it is now: nothing moves.
    admin(sim, "DELETE", "requests")
    again = module(pool_tag="worker_warm", count=2, ip_range=RANGE, take_from_tag="worker", take_vmids=[workers[1]], address_peer_tags=["worker"])
    assert again["rc"] == 0 and not again["changed"] and writes(sim) == []


def test_a_warm_pool_kept_stopped_starts_only_its_new_members_and_shuts_them_down_after(sim, module):
    first = module(pool_tag="worker_warm", count=1, start_existing=False)
    assert first["rc"] == 0 and first["members"][0]["status"] == "running", first.get("msg")
    # Configured while it runs (the playbook's part), then shut down; a second run finds nothing to do.
    down = module(pool_tag="worker_warm", count=1, start=False, shut_down=True)
    assert down["rc"] == 0 and down["changed"] and down["members"][0]["status"] == "stopped"
    assert "shut down" in [entry["stage"] for entry in down["progress"]]
    admin(sim, "DELETE", "requests")
    assert not module(pool_tag="worker_warm", count=1, start=False, shut_down=True)["changed"]
    # The refill of one more: the new member starts, the stopped one stays off.
    grown = module(pool_tag="worker_warm", count=2, start_existing=False)
    assert grown["rc"] == 0, grown.get("msg")
    status = {vm["vmid"]: vm["status"] for vm in grown["members"]}
    assert status[members(first)[0]] == "stopped" and status[grown["created"][0]["vmid"]] == "running"
    assert not [entry for entry in writes(sim) if entry["path"].endswith(f"/qemu/{members(first)[0]}/status/start")]
    # The take starts a stopped warm VM and waits for its address.
    taken = module(count=1, take_from_tag="worker_warm")
    assert taken["rc"] == 0 and taken["taken"][0]["ip"], taken.get("msg")
    assert module(pool_tag="worker_warm", count=1, start=True, shut_down=True)["msg"].startswith("shut_down keeps the members shut down: set start: false")


GPU_MAPPING = {
    "gpu": {"map": ["node=pve2,path=0000:01:00.0,id=10de:2331", "node=pve2,path=0000:02:00.0,id=10de:2331", "node=pve3,path=0000:01:00.0,id=10de:2331"]}
}
GPU_SIM = {"pci_mappings": GPU_MAPPING, "template_config": {"machine": "q35"}}


def vm_config(sim, vm):
    return api_get(sim, f"nodes/{vm['node']}/qemu/{vm['vmid']}/config")


@pytest.mark.parametrize("sim", [GPU_SIM], indirect=True)
def test_gpu_members_go_where_the_mapping_has_free_devices_and_a_full_cluster_fails_before_any_write(sim, module):
    first = module(count=2, pci_mapping={"name": "gpu"})
    assert first["rc"] == 0, first["msg"]
    # pve1 has the most free memory (ties go by name) but no device of the mapping: never chosen.
    assert sorted(vm["node"] for vm in first["members"]) == ["pve2", "pve3"]
    assert all("devices of PCI mapping gpu free" in vm["reason"] for vm in first["created"])
    for vm in first["members"]:
        assert vm_config(sim, vm)["hostpci0"] == "mapping=gpu,pcie=1"
        assert vm["status"] == "running"
    held = sorted(device for vm in sim["simulator"].cluster.vms.values() for device in vm.pci_devices)
    assert held == ["0000:01:00.0", "0000:01:00.0"]

    again = module(count=2, pci_mapping={"name": "gpu"})
    assert again["rc"] == 0 and again["changed"] is False

    grown = module(count=3, pci_mapping={"name": "gpu"})
    assert grown["rc"] == 0, grown["msg"]
    assert [vm["node"] for vm in grown["created"]] == ["pve2"]
    assert "pve2: most free memory" in grown["created"][0]["reason"] and "1 of 2 devices of PCI mapping gpu free" in grown["created"][0]["reason"]

    admin(sim, "DELETE", "requests")
    full = module(count=4, pci_mapping={"name": "gpu"})
    assert full["rc"] == 1
    assert full["msg"] == (
        "PCI mapping gpu: no node has 1 free device for 1 of the 1 new VMs (pve1 has no device in it; pve2 0 of 2 free; pve3 0 of 1 free): "
        "add devices of the mapping on a node, free some, or lower count"
    )
    assert writes(sim) == []


@pytest.mark.parametrize("sim", [GPU_SIM], indirect=True)
def test_devices_held_by_other_running_vms_and_by_stopped_members_are_not_free(sim, module):
    # A VM outside the pool holds one of pve2's devices.
    admin_token = f"PVEAPIToken=root@pam!admin={ROOT_TOKEN}"
    clone = requests.post(
        f"{sim['url']}/api2/json/nodes/pve1/qemu/9000/clone",
        data={"newid": 500, "target": "pve2", "full": 1, "storage": "slow-nfs"},
        headers={"Authorization": admin_token},
        verify=sim["ca"],
        timeout=10,
    )
    clone.raise_for_status()
    other = sim["simulator"].cluster.vms
    deadline = time.monotonic() + 10
    while 500 not in other or other[500].lock:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    other[500].config["hostpci0"] = "mapping=gpu"
    other[500].status, other[500].pci_devices = "running", ["0000:01:00.0"]

    stopped = module(count=1, pci_mapping={"name": "gpu"}, start=False)
    assert stopped["rc"] == 0, stopped["msg"]
    assert stopped["members"][0]["status"] == "stopped"
    # pve2: 2 mapped, 1 held by VM 500; pve3: 1 mapped, 1 promised to the stopped member placed there or on pve2.
    result = module(count=3, pci_mapping={"name": "gpu"}, start=False)
    assert result["rc"] == 1
    assert "no node has 1 free device for 1 of the 2 new VMs" in result["msg"]


@pytest.mark.parametrize(
    ("sim", "args", "message"),
    [
        (
            GPU_SIM,
            {"pci_mapping": {"name": "absent"}},
            r"PCI mapping absent cannot be read \(.*mapping 'absent' not found.*PVEMappingUser on /mapping/pci/absent",
        ),
        (
            {"pci_mappings": GPU_MAPPING},
            {"pci_mapping": {"name": "gpu"}},
            r"pci_mapping.pcie needs the q35 machine type, and template 9000 \(debian12-golden\) has machine i440fx",
        ),
        (GPU_SIM, {"pci_mapping": {"name": "gpu", "count": 17}}, r"pci_mapping.count must be from 1 to 16"),
    ],
    indirect=["sim"],
)
def test_gpu_pool_errors_come_before_any_write(sim, module, args, message):
    admin(sim, "DELETE", "requests")
    result = module(count=1, **args)
    assert result["rc"] == 1 and re.search(message, result["msg"]), result["msg"]
    assert writes(sim) == []


@pytest.mark.parametrize("sim", [{"pci_mappings": GPU_MAPPING}], indirect=True)
def test_without_pcie_a_gpu_member_needs_no_q35_template_and_takes_two_devices(sim, module):
    result = module(count=1, pci_mapping={"name": "gpu", "count": 2, "pcie": False})
    assert result["rc"] == 0, result["msg"]
    vm = result["members"][0]
    assert vm["node"] == "pve2"
    config = vm_config(sim, vm)
    assert (config["hostpci0"], config["hostpci1"]) == ("mapping=gpu", "mapping=gpu")
    assert sorted(sim["simulator"].cluster.vms[vm["vmid"]].pci_devices) == ["0000:01:00.0", "0000:02:00.0"]
