"""PCI resource mappings as Proxmox VE keeps them (mapping/pci.cfg, /cluster/mapping/pci) and what a VM start does with them:
the privileges they need, the devices a start takes, and qemu-server's errors when none is free."""

from __future__ import annotations

import pytest
from pvesim_support import AUTOMATION_TOKEN, Sim

from lab.pvesim.config import DEFAULT_CONFIG

GPU_MAP = [
    "node=pve1,path=0000:01:00.0,id=10de:2331,iommugroup=1",
    "node=pve1,path=0000:02:00.0,id=10de:2331,iommugroup=2",
    "node=pve2,path=0000:01:00.0,id=10de:2331,iommugroup=1",
]
ONE_DEVICE_MAP = ["node=pve1,path=0000:03:00.0,id=10de:1eb8"]
MAPPINGS = {"gpu": {"description": "H100 PCIe", "map": GPU_MAP}, "nic": {"map": ONE_DEVICE_MAP}}


@pytest.fixture
def gpu_sim(make_sim) -> Sim:
    return make_sim(pci_mappings=MAPPINGS)


def start(sim: Sim, vmid: int, node: str = "pve1") -> dict:
    return sim.wait_task(sim.data("POST", f"/nodes/{node}/qemu/{vmid}/status/start"))


def gpu_vm(sim: Sim, vmid: int, node: str = "pve1", **devices: str) -> None:
    assert sim.clone(vmid, target=node, full=0 if node == "pve1" else 1, storage=None if node == "pve1" else "slow-nfs")["exitstatus"] == "OK"
    sim.data("PUT", f"/nodes/{node}/qemu/{vmid}/config", data={"machine": "q35", **devices})


def test_the_mapping_endpoints_create_list_read_update_and_delete(gpu_sim: Sim):
    sim = gpu_sim
    listed = sim.data("GET", "/cluster/mapping/pci")
    assert [entry["id"] for entry in listed] == ["gpu", "nic"]
    gpu = listed[0]
    assert gpu["map"] == GPU_MAP and gpu["description"] == "H100 PCIe" and len(gpu["digest"]) == 40
    assert sim.data("GET", "/cluster/mapping/pci/gpu") == {key: gpu[key] for key in ("description", "map", "digest")}

    # An array parameter is sent as the same form key once per item.
    sim.data(
        "POST", "/cluster/mapping/pci", data={"id": "spare", "map": ["node=pve3,path=0000:81:00.0,id=10de:2331", "node=pve3,path=0000:82:00.0,id=10de:2331"]}
    )
    assert len(sim.data("GET", "/cluster/mapping/pci/spare")["map"]) == 2
    again = sim.call("POST", "/cluster/mapping/pci", data={"id": "spare", "map": "node=pve3,path=0000:81:00.0,id=10de:2331"})
    assert again.status_code == 500 and "pci ID 'spare' already defined" in again.reason

    stale = sim.data("GET", "/cluster/mapping/pci/spare")["digest"]
    sim.data("PUT", "/cluster/mapping/pci/spare", data={"description": "second H100", "digest": stale})
    assert sim.data("GET", "/cluster/mapping/pci/spare")["description"] == "second H100"
    conflict = sim.call("PUT", "/cluster/mapping/pci/spare", data={"description": "lost update", "digest": stale})
    assert conflict.status_code == 500 and "detected modified configuration" in conflict.reason

    checked = {entry["id"]: entry["checks"] for entry in sim.data("GET", "/cluster/mapping/pci", params={"check-node": "pve3"})}
    assert checked["spare"] == [] and checked["gpu"] == [{"severity": "warning", "message": "No mapping for node pve3."}]

    sim.data("DELETE", "/cluster/mapping/pci/spare")
    missing = sim.call("GET", "/cluster/mapping/pci/spare")
    assert missing.status_code == 500 and "mapping 'spare' not found" in missing.reason


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"id": "bad", "map": "node=pve1,path=01:00.0,id=10de:2331"}, "map"),  # a mapped path needs its domain
        ({"id": "bad", "map": "node=pve1,path=0000:01:00.0"}, "map"),  # id is required
        ({"id": "bad", "map": "node=pve1,path=0000:01:00.0,id=10de:2331,vendor=x"}, "map"),
        ({"id": "9bad", "map": "node=pve1,path=0000:01:00.0,id=10de:2331"}, "id"),
        ({"id": "bad"}, "map"),
    ],
)
def test_a_malformed_mapping_is_refused_by_parameter(sim: Sim, data: dict, field: str):
    response = sim.call("POST", "/cluster/mapping/pci", data=data)
    assert response.status_code == 400
    assert field in response.json()["errors"]


def test_a_mapping_that_names_an_unknown_node_is_refused(sim: Sim):
    response = sim.call("POST", "/cluster/mapping/pci", data={"id": "gpu", "map": "node=pve9,path=0000:01:00.0,id=10de:2331"})
    assert response.status_code == 400 and "unknown node 'pve9'" in response.reason


def test_the_lab_token_uses_and_reads_mappings_but_cannot_change_them(gpu_sim: Sim):
    sim = gpu_sim
    assert [entry["id"] for entry in sim.data("GET", "/cluster/mapping/pci", AUTOMATION_TOKEN)] == ["gpu", "nic"]
    assert sim.data("GET", "/cluster/mapping/pci/gpu", AUTOMATION_TOKEN)["map"] == GPU_MAP
    denied = sim.call("POST", "/cluster/mapping/pci", AUTOMATION_TOKEN, data={"id": "mine", "map": ONE_DEVICE_MAP[0]})
    assert denied.status_code == 403 and "Mapping.Modify" in denied.reason


def test_without_a_mapping_privilege_the_list_is_empty_and_the_mapping_hidden(make_sim):
    acl = [entry for entry in DEFAULT_CONFIG["acl"] if entry["path"] != "/mapping/pci"]
    # PVEAuditor on / carries Mapping.Audit: take it away from the token with NoAccess on the mapping tree.
    acl.append({"path": "/mapping", "roles": ["NoAccess"], "users": ["automation@pve"], "tokens": ["automation@pve!mlfleet"]})
    sim = make_sim(pci_mappings=MAPPINGS, acl=acl)
    assert sim.data("GET", "/cluster/mapping/pci", AUTOMATION_TOKEN) == []
    assert sim.call("GET", "/cluster/mapping/pci/gpu", AUTOMATION_TOKEN).status_code == 403
    sim.clone(300, token=AUTOMATION_TOKEN, pool="mlfleet")
    denied = sim.call("PUT", "/nodes/pve1/qemu/300/config", AUTOMATION_TOKEN, data={"hostpci0": "mapping=gpu"})
    assert denied.status_code == 403 and "(/mapping/pci/gpu, Mapping.Use)" in denied.reason


@pytest.mark.parametrize(
    ("value", "status", "message"),
    [
        ("mapping=gpu,pcie=1", 200, ""),
        ("0000:01:00.0", 500, "only root can set 'hostpci0' config for non-mapped devices"),
        ("host=0000:01:00.0,pcie=1", 500, "only root can set 'hostpci0' config for non-mapped devices"),
        ("pcie=1", 500, "either 'host' or 'mapping' must be set."),
        ("mapping=gpu,unknown=1", 400, ""),
    ],
)
def test_a_token_passes_only_mapped_devices(gpu_sim: Sim, value: str, status: int, message: str):
    sim = gpu_sim
    sim.clone(300, token=AUTOMATION_TOKEN, pool="mlfleet")
    response = sim.call("PUT", "/nodes/pve1/qemu/300/config", AUTOMATION_TOKEN, data={"hostpci0": value})
    assert response.status_code == status, response.text
    assert message in response.reason


def test_a_start_takes_a_free_device_and_fails_as_qemu_server_does_when_none_is_left(gpu_sim: Sim):
    sim = gpu_sim
    for vmid in (301, 302, 303):
        gpu_vm(sim, vmid, hostpci0="mapping=gpu,pcie=1")
    assert start(sim, 301)["exitstatus"] == "OK"
    assert start(sim, 302)["exitstatus"] == "OK"
    assert start(sim, 303)["exitstatus"] == "could not find a free device for 'hostpci0'"
    assert sim.data("GET", "/nodes/pve1/qemu/303/status/current")["status"] == "stopped"

    # Stopping a VM gives its device back.
    sim.wait_task(sim.data("POST", "/nodes/pve1/qemu/301/status/stop"))
    assert start(sim, 303)["exitstatus"] == "OK"
    held = {vmid: sim.simulator.cluster.vms[vmid].pci_devices for vmid in (302, 303)}
    assert sorted(held[302] + held[303]) == ["0000:01:00.0", "0000:02:00.0"]


def test_a_single_device_in_use_is_named_with_the_vm_that_holds_it(gpu_sim: Sim):
    sim = gpu_sim
    gpu_vm(sim, 301, hostpci0="mapping=nic")
    gpu_vm(sim, 302, hostpci0="mapping=nic")
    assert start(sim, 301)["exitstatus"] == "OK"
    assert start(sim, 302)["exitstatus"] == "PCI device '0000:03:00.0' already in use by VMID '301'"


@pytest.mark.parametrize(
    ("node", "devices", "machine", "message"),
    [
        ("pve3", {"hostpci0": "mapping=gpu"}, "q35", "PCI device mapping not found for 'gpu'"),
        ("pve1", {"hostpci0": "mapping=absent"}, "q35", "PCI device mapping not found for 'absent'"),
        ("pve1", {"hostpci0": "mapping=gpu,pcie=1"}, "pc", "q35 machine model is not enabled"),
        ("pve1", {"hostpci0": "mapping=gpu", "hostpci1": "mapping=gpu", "hostpci2": "mapping=gpu"}, "q35", "could not find a free device for 'hostpci2'"),
        ("pve1", {"hostpci0": "0000:09:00.0"}, "q35", "no PCI device found for '0000:09:00.0'"),
        ("pve2", {"hostpci0": "mapping=gpu,pcie=1", "hostpci1": "0000:01:00.0"}, "q35", "device '0000:01:00.0' assigned more than once"),
    ],
)
def test_a_start_that_cannot_have_its_devices_fails_with_qemu_servers_message(gpu_sim: Sim, node: str, devices: dict, machine: str, message: str):
    sim = gpu_sim
    gpu_vm(sim, 301, node=node)
    # Written to the config file directly: only root@pam itself (a ticket, not a token) may set a raw host device.
    sim.simulator.cluster.vms[301].config.update({"machine": machine, **devices})
    assert start(sim, 301, node)["exitstatus"] == message
    assert sim.simulator.cluster.vms[301].pci_devices == []


def test_two_devices_of_one_mapping_go_to_one_vm(gpu_sim: Sim):
    sim = gpu_sim
    gpu_vm(sim, 301, hostpci0="mapping=gpu,pcie=1", hostpci1="mapping=gpu,pcie=1")
    gpu_vm(sim, 302, hostpci0="mapping=gpu,pcie=1")
    assert start(sim, 301)["exitstatus"] == "OK"
    assert sorted(sim.simulator.cluster.vms[301].pci_devices) == ["0000:01:00.0", "0000:02:00.0"]
    assert start(sim, 302)["exitstatus"] == "could not find a free device for 'hostpci0'"


def test_the_same_address_on_two_nodes_is_two_devices(gpu_sim: Sim):
    sim = gpu_sim
    gpu_vm(sim, 301, hostpci0="mapping=gpu,pcie=1")
    gpu_vm(sim, 302, node="pve2", hostpci0="mapping=gpu,pcie=1")
    assert start(sim, 301)["exitstatus"] == "OK"
    assert start(sim, 302, "pve2")["exitstatus"] == "OK"
    assert sim.simulator.cluster.vms[301].pci_devices == sim.simulator.cluster.vms[302].pci_devices == ["0000:01:00.0"]


def test_mappings_and_held_devices_survive_a_restart(gpu_sim: Sim):
    sim = gpu_sim
    gpu_vm(sim, 301, hostpci0="mapping=gpu")
    start(sim, 301)
    state = sim.simulator.cluster.to_state()
    cluster = sim.simulator.cluster
    cluster.load_state(state)
    assert cluster.pci_mappings["gpu"]["map"] == GPU_MAP
    assert cluster.vms[301].pci_devices == ["0000:01:00.0"]
