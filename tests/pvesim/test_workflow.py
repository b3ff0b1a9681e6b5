"""proxmoxer, with token and with ticket auth, drives a VM's whole life against the simulator."""

from __future__ import annotations

import time
import urllib.parse

import pytest
from proxmoxer import ProxmoxAPI
from proxmoxer.core import ResourceException
from pvesim_support import AUTOMATION_TOKEN, ED25519_KEY, ROOT_PASSWORD, ROOT_TOKEN, TEMPLATE, WAIT_LIMIT, Sim


def proxmox(sim: Sim, auth: str) -> ProxmoxAPI:
    if auth == "token":
        user, name, secret = ROOT_TOKEN
        return ProxmoxAPI("127.0.0.1", port=sim.port, user=user, token_name=name, token_value=secret, verify_ssl=sim.ca_file, timeout=10)
    if auth == "automation-token":
        user, name, secret = AUTOMATION_TOKEN
        return ProxmoxAPI("127.0.0.1", port=sim.port, user=user, token_name=name, token_value=secret, verify_ssl=sim.ca_file, timeout=10)
    return ProxmoxAPI("127.0.0.1", port=sim.port, user="root@pam", password=ROOT_PASSWORD, verify_ssl=sim.ca_file, timeout=10)


def wait_for_task(api: ProxmoxAPI, upid: str) -> dict:
    node = upid.split(":")[1]
    deadline = time.monotonic() + WAIT_LIMIT
    while time.monotonic() < deadline:
        status = api.nodes(node).tasks(upid).status.get()
        if status["status"] == "stopped":
            return status
        time.sleep(0.01)
    raise AssertionError(f"{upid} did not stop")


def wait_for_addresses(api: ProxmoxAPI, node: str, vmid: int) -> tuple[list[dict], int]:
    """The agent's interfaces, and how many times it answered 500 first."""
    refusals = 0
    deadline = time.monotonic() + WAIT_LIMIT
    while time.monotonic() < deadline:
        try:
            return api.nodes(node).qemu(vmid).agent("network-get-interfaces").get()["result"], refusals
        except ResourceException as error:
            assert error.status_code == 500 and "QEMU guest agent is not running" in str(error)
            refusals += 1
            time.sleep(0.02)
    raise AssertionError("the guest agent never answered")


@pytest.mark.parametrize("auth", ["token", "ticket", "automation-token"])
def test_clone_configure_start_find_address_stop_delete(sim: Sim, auth: str):
    api = proxmox(sim, auth)
    vmid = int(api.cluster.nextid.get())
    assert vmid == 100

    upid = api.nodes("pve1").qemu(TEMPLATE).clone.post(newid=vmid, name="worker-1", pool="mlfleet", target="pve2")
    assert upid.startswith("UPID:pve1:") and f":qmclone:{TEMPLATE}:" in upid
    assert wait_for_task(api, upid)["exitstatus"] == "OK"

    api.nodes("pve2").qemu(vmid).config.put(
        cores=4,
        memory=4096,
        ipconfig0="ip=10.20.0.11/24,gw=10.20.0.1",
        ciuser="mlfleet",
        sshkeys=urllib.parse.quote(ED25519_KEY, safe=""),
        tags="mlfleet;worker",
    )
    config = api.nodes("pve2").qemu(vmid).config.get()
    assert (config["cores"], config["memory"], config["ciuser"], config["tags"]) == (4, "4096", "mlfleet", "mlfleet;worker")
    assert urllib.parse.unquote(config["sshkeys"]) == ED25519_KEY
    assert config["name"] == "worker-1" and "lock" not in config

    assert wait_for_task(api, api.nodes("pve2").qemu(vmid).status.start.post())["exitstatus"] == "OK"
    interfaces, refusals = wait_for_addresses(api, "pve2", vmid)
    assert refusals >= 1, "the agent answered before the guest could have booted"
    addresses = [address["ip-address"] for interface in interfaces for address in interface["ip-addresses"]]
    assert "10.20.0.11" in addresses

    resources = [entry for entry in api.cluster.resources.get(type="vm") if entry["vmid"] == vmid]
    assert resources[0]["status"] == "running" and resources[0]["pool"] == "mlfleet" and resources[0]["tags"] == "mlfleet;worker"

    assert wait_for_task(api, api.nodes("pve2").qemu(vmid).status.stop.post())["exitstatus"] == "OK"
    assert api.nodes("pve2").qemu(vmid).status.current.get()["status"] == "stopped"
    assert wait_for_task(api, api.nodes("pve2").qemu(vmid).delete(purge=1, **{"destroy-unreferenced-disks": 1}))["exitstatus"] == "OK"
    assert vmid not in [entry["vmid"] for entry in api.nodes("pve2").qemu.get()]
    assert int(api.cluster.nextid.get()) == vmid


def test_ticket_login_reports_user_and_cluster(sim: Sim):
    response = sim.call("POST", "/access/ticket", token=None, data={"username": "root@pam", "password": ROOT_PASSWORD})
    data = response.json()["data"]
    assert data["username"] == "root@pam" and data["clustername"] == "lab"
    assert data["ticket"].startswith("PVE:root@pam:") and data["CSRFPreventionToken"]


def test_full_clone_to_storage_and_template_then_linked_clone(sim: Sim):
    api = proxmox(sim, "token")
    assert wait_for_task(api, api.nodes("pve1").qemu(TEMPLATE).clone.post(newid=200, full=1, storage="local-lvm"))["exitstatus"] == "OK"
    config = api.nodes("pve1").qemu(200).config.get()
    assert config["scsi0"].startswith("local-lvm:vm-200-disk-0")
    assert config["net0"] != api.nodes("pve1").qemu(TEMPLATE).config.get()["net0"], "a clone must get its own MAC address"

    assert wait_for_task(api, api.nodes("pve1").qemu(200).template.post())["exitstatus"] == "OK"
    assert api.nodes("pve1").qemu(200).config.get()["template"] == 1
    assert wait_for_task(api, api.nodes("pve1").qemu(200).clone.post(newid=201))["exitstatus"] == "OK"
    assert api.nodes("pve1").qemu(201).config.get()["scsi0"].startswith("local-lvm:base-200-disk-0/vm-201-disk-0")


def test_snapshots_are_listed_with_current(sim: Sim):
    sim.clone(300, full=1)
    sim.wait_task(sim.data("POST", "/nodes/pve1/qemu/300/snapshot", data={"snapname": "before_upgrade", "description": "clean"}))
    snapshots = sim.data("GET", "/nodes/pve1/qemu/300/snapshot")
    assert [entry["name"] for entry in snapshots] == ["before_upgrade", "current"]
    assert snapshots[1]["parent"] == "before_upgrade"


def test_shutdown_with_short_timeout_fails_unless_forced(make_sim):
    sim = make_sim(durations={"shutdown": 5})
    sim.clone(400)
    sim.wait_task(sim.data("POST", "/nodes/pve1/qemu/400/status/start"))
    failed = sim.wait_task(sim.data("POST", "/nodes/pve1/qemu/400/status/shutdown", data={"timeout": 0}))
    assert failed["exitstatus"] == "VM quit/powerdown failed - got timeout"
    forced = sim.wait_task(sim.data("POST", "/nodes/pve1/qemu/400/status/shutdown", data={"timeout": 0, "forceStop": 1}))
    assert forced["exitstatus"] == "OK"
    assert sim.data("GET", "/nodes/pve1/qemu/400/status/current")["status"] == "stopped"


@pytest.mark.parametrize(
    "written, stored",
    [
        ("mlfleet;worker", "mlfleet;worker"),
        ("Worker;MLfleet;worker", "mlfleet;worker"),  # lower-cased, each once
        ("swarm_worker,lab gpu", "gpu;lab;swarm_worker"),  # any separator; sorted
    ],
)
def test_tags_are_stored_as_proxmox_stores_them(sim: Sim, written: str, stored: str):
    """pve-guest-common's get_unique_tags with datacenter.cfg's default tag-style, which qemu-server applies to every write."""
    assert sim.clone(150)["exitstatus"] == "OK"
    sim.data("PUT", "/nodes/pve1/qemu/150/config", data={"tags": written})
    assert sim.data("GET", "/nodes/pve1/qemu/150/config")["tags"] == stored
    (resource,) = [entry for entry in sim.data("GET", "/cluster/resources", params={"type": "vm"}) if entry["vmid"] == 150]
    assert resource["tags"] == stored
