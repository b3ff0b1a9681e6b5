"""Snapshots as qemu-server takes, lists, rolls back and deletes them: tasks, locks, errors, and what a rollback does."""

from __future__ import annotations

import time

import pytest
from pvesim_support import TEMPLATE, WAIT_LIMIT, Sim

from lab.pvesim.config import DEFAULT_CONFIG

VM = "/nodes/pve1/qemu/300"


def snapshot(sim: Sim, name: str, **params) -> dict:
    return sim.wait_task(sim.data("POST", f"{VM}/snapshot", data={"snapname": name, **params}))


def rollback(sim: Sim, name: str, **params) -> dict:
    return sim.wait_task(sim.data("POST", f"{VM}/snapshot/{name}/rollback", data=params))


def delete(sim: Sim, name: str) -> dict:
    return sim.wait_task(sim.data("DELETE", f"{VM}/snapshot/{name}"))


def status(sim: Sim) -> str:
    return sim.data("GET", f"{VM}/status/current")["status"]


def wait_for_lock(sim: Sim, lock: str) -> None:
    deadline = time.monotonic() + WAIT_LIMIT
    while sim.data("GET", f"{VM}/config").get("lock") != lock:
        assert time.monotonic() < deadline, f"VM never got lock {lock}"
        time.sleep(0.01)


@pytest.fixture
def running(sim: Sim) -> Sim:
    sim.clone(300)
    sim.wait_task(sim.data("POST", f"{VM}/status/start"))
    return sim


def test_rollback_stops_a_running_vm_and_restores_the_snapshot_config(running: Sim):
    sim = running
    before = sim.data("GET", f"{VM}/config")
    assert snapshot(sim, "clean")["exitstatus"] == "OK"
    sim.data("PUT", f"{VM}/config", data={"cores": 4, "description": "changed after the snapshot", "tags": "changed"})

    task = sim.data("POST", f"{VM}/snapshot/clean/rollback")
    assert ":qmrollback:300:" in task and sim.wait_task(task)["exitstatus"] == "OK"

    after = sim.data("GET", f"{VM}/config")
    assert (after["cores"], after["tags"], after["parent"]) == (before["cores"], before["tags"], "clean")
    assert after["description"] == "changed after the snapshot", "the description is not part of a snapshot"
    assert after["vmgenid"] != before["vmgenid"] and "lock" not in after
    # qemu-server stops the VM (no guest shutdown); without a RAM state it stays stopped.
    assert status(sim) == "stopped"


def test_rollback_with_start_boots_the_vm(running: Sim):
    snapshot(running, "clean")
    assert rollback(running, "clean", start=1)["exitstatus"] == "OK"
    assert status(running) == "running"


def test_rollback_to_a_ram_state_resumes_the_vm_with_its_agent_up(running: Sim):
    sim = running
    assert snapshot(sim, "live", vmstate=1)["exitstatus"] == "OK"
    assert sim.data("GET", f"{VM}/snapshot")[0]["vmstate"] == 1
    saved = sim.data("GET", f"{VM}/snapshot/live/config")
    assert saved["vmstate"] == "slow-nfs:vm-300-state-live" and saved["runningmachine"]
    content = {entry["volid"]: entry for entry in sim.data("GET", "/nodes/pve1/storage/slow-nfs/content", params={"vmid": 300})}
    assert content["slow-nfs:vm-300-state-live"]["size"] == (2 * 2048 + 500) * 1024**2, "twice the memory plus 500 MiB"
    assert rollback(sim, "live")["exitstatus"] == "OK"
    assert status(sim) == "running"
    assert sim.call("POST", f"{VM}/agent/ping").status_code == 200
    assert "runningmachine" not in sim.data("GET", f"{VM}/config")
    assert delete(sim, "live")["exitstatus"] == "OK"
    assert [entry["volid"] for entry in sim.data("GET", "/nodes/pve1/storage/slow-nfs/content", params={"vmid": 300})] == ["slow-nfs:vm-300-disk-0"]


def test_rollback_start_needs_power_management(make_sim):
    users = {**DEFAULT_CONFIG["users"], "roller@pve": {"password": "lab-password"}}
    acl = [{"path": "/vms", "roles": ["Rollback"], "users": ["roller@pve"]}]
    sim = make_sim(users=users, acl=acl, roles={"Rollback": ["VM.Audit", "VM.Snapshot.Rollback"]})
    sim.clone(300)
    snapshot(sim, "clean")
    session = sim.data("POST", "/access/ticket", token=None, data={"username": "roller@pve", "password": "lab-password"})
    kwargs = {"token": None, "cookies": {"PVEAuthCookie": session["ticket"]}, "headers": {"CSRFPreventionToken": session["CSRFPreventionToken"]}}
    refused = sim.call("POST", f"{VM}/snapshot/clean/rollback", data={"start": 1}, **kwargs)
    assert (refused.status_code, refused.reason) == (403, "Permission check failed (/vms/300, VM.PowerMgmt)")
    assert sim.call("POST", f"{VM}/snapshot/clean/rollback", **kwargs).status_code == 200


def test_errors_end_the_task_as_in_proxmox(sim: Sim):
    sim.clone(300)
    assert rollback(sim, "nope")["exitstatus"] == "snapshot 'nope' does not exist"
    assert delete(sim, "nope")["exitstatus"] == "snapshot 'nope' does not exist"
    snapshot(sim, "clean")
    assert snapshot(sim, "clean")["exitstatus"] == "snapshot name 'clean' already used"
    template = sim.wait_task(sim.data("POST", f"/nodes/pve1/qemu/{TEMPLATE}/snapshot", data={"snapname": "golden"}))
    assert template["exitstatus"] == "you can't take a snapshot if it's a template"
    refused = sim.call("POST", f"{VM}/snapshot", data={"snapname": "current"})
    assert (refused.status_code, refused.reason) == (500, "unable to use snapshot name 'current' (reserved name)")
    refused = sim.call("POST", f"/nodes/pve1/qemu/{TEMPLATE}/template")
    assert refused.reason == "you can't convert a template to a template"
    refused = sim.call("POST", f"{VM}/template")
    assert refused.reason == "unable to create template, because VM contains snapshots"


@pytest.mark.parametrize(
    ("first", "lock", "second"),
    [
        (lambda sim: sim.data("POST", f"{VM}/snapshot", data={"snapname": "slow"}), "snapshot", lambda sim: rollback(sim, "clean")),
        (lambda sim: sim.data("DELETE", f"{VM}/snapshot/clean"), "snapshot-delete", lambda sim: snapshot(sim, "other")),
        (lambda sim: sim.data("POST", f"{VM}/snapshot/clean/rollback"), "rollback", lambda sim: delete(sim, "clean")),
    ],
    ids=["snapshot", "snapshot-delete", "rollback"],
)
def test_each_snapshot_task_holds_its_lock(make_sim, first, lock, second):
    sim = make_sim(durations={"snapshot": 0.25})
    sim.clone(300)
    snapshot(sim, "clean")
    upid = first(sim)
    wait_for_lock(sim, lock)
    assert second(sim)["exitstatus"] == f"VM 300 is locked ({lock})"
    assert sim.call("POST", f"{VM}/status/start").reason == f"VM 300 is locked ({lock})"
    assert sim.wait_task(upid)["exitstatus"] == "OK"


def test_list_shows_each_snapshot_then_current_and_delete_relinks_parents(sim: Sim):
    sim.clone(300)
    snapshot(sim, "first", description="clean install")
    snapshot(sim, "second")
    listed = sim.data("GET", f"{VM}/snapshot")
    assert [entry["name"] for entry in listed] == ["first", "second", "current"]
    first, second, current = listed
    assert first == {"name": "first", "description": "clean install", "snaptime": first["snaptime"], "vmstate": 0}
    assert second["parent"] == "first" and second["description"] == ""
    assert current == {"name": "current", "description": "You are here!", "parent": "second", "running": 0, "digest": current["digest"]}

    assert delete(sim, "first")["exitstatus"] == "OK"
    assert [entry.get("parent") for entry in sim.data("GET", f"{VM}/snapshot")] == [None, "second"]
    assert delete(sim, "second")["exitstatus"] == "OK"
    alone = sim.data("GET", f"{VM}/snapshot")
    assert alone == [{"name": "current", "description": "You are here!", "running": 0, "digest": alone[0]["digest"]}]
    assert "parent" not in sim.data("GET", f"{VM}/config")


def test_snapshot_config_and_its_description(sim: Sim):
    sim.clone(300)
    snapshot(sim, "clean")
    saved = sim.data("GET", f"{VM}/snapshot/clean/config")
    assert saved["name"] == "Copy-of-VM-debian12-golden" and saved["snaptime"] and "lock" not in saved
    assert sim.data("GET", f"{VM}/config", params={"snapshot": "clean"})["digest"] == sim.data("GET", f"{VM}/config")["digest"]
    sim.data("PUT", f"{VM}/snapshot/clean/config", data={"description": "known good"})
    assert sim.data("GET", f"{VM}/snapshot")[0]["description"] == "known good"
    missing = sim.call("GET", f"{VM}/snapshot/nope/config")
    assert (missing.status_code, missing.reason) == (500, "snapshot 'nope' does not exist")
