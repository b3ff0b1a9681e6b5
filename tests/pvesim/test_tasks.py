"""Async tasks, locks, races, faults, the request log, id allocation, and persistence across restarts."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import requests
from pvesim_support import REPO_ROOT, ROOT_TOKEN, TEMPLATE, WAIT_LIMIT, Sim, token_header

from lab.pvesim.tasks import Clock

CLONE = f"/nodes/pve1/qemu/{TEMPLATE}/clone"


def start_clone(sim: Sim, newid: int, **params) -> str:
    return sim.data("POST", CLONE, data={"newid": newid, **params})


def test_upid_has_proxmox_shape_and_task_log_ends_with_ok(sim: Sim):
    upid = start_clone(sim, 100)
    fields = upid.split(":")
    assert len(fields) == 9 and fields[0] == "UPID" and fields[1] == "pve1" and fields[8] == ""
    assert all(len(fields[index]) == 8 and int(fields[index], 16) >= 0 for index in (2, 3, 4))
    assert fields[5:8] == ["qmclone", str(TEMPLATE), "root@pam!admin"]
    status = sim.wait_task(upid)
    assert status["upid"] == upid and status["pid"] == int(fields[2], 16) and status["starttime"] == int(fields[4], 16)
    log = sim.data("GET", f"/nodes/pve1/tasks/{upid}/log")
    assert log[-1] == {"n": len(log), "t": "TASK OK"}
    assert upid in [task["upid"] for task in sim.data("GET", "/cluster/tasks")]
    assert [task["status"] for task in sim.data("GET", "/nodes/pve1/tasks", params={"vmid": TEMPLATE})] == ["OK"]


def test_cloning_vm_exists_with_clone_lock_and_refuses_conflicting_calls(make_sim):
    sim = make_sim(durations={"clone_linked": 1.0})
    upid = start_clone(sim, 101)
    deadline = time.monotonic() + WAIT_LIMIT
    while sim.call("GET", "/nodes/pve1/qemu/101/config").status_code != 200 and time.monotonic() < deadline:
        time.sleep(0.005)
    config = sim.data("GET", "/nodes/pve1/qemu/101/config")
    assert config["lock"] == "clone"
    assert sim.data("GET", "/nodes/pve1/qemu/101/status/current")["lock"] == "clone"
    for method, path, data in [
        ("PUT", "/nodes/pve1/qemu/101/config", {"cores": 2}),
        ("POST", "/nodes/pve1/qemu/101/status/start", {}),
        ("DELETE", "/nodes/pve1/qemu/101", {}),
        ("POST", "/nodes/pve1/qemu/101/clone", {"newid": 102}),
    ]:
        response = sim.call(method, path, data=data) if method != "DELETE" else sim.call(method, path)
        assert (response.status_code, response.reason) == (500, "VM 101 is locked (clone)"), (method, path)
    assert sim.wait_task(upid)["exitstatus"] == "OK"
    assert "lock" not in sim.data("GET", "/nodes/pve1/qemu/101/config")


def test_existing_newid_is_refused_before_the_task(sim: Sim):
    sim.clone(103)
    response = sim.call("POST", CLONE, data={"newid": 103})
    assert (response.status_code, response.reason) == (500, "unable to create VM 103: config file already exists")


def test_two_clones_racing_for_one_newid_fail_the_second_task(make_sim):
    sim = make_sim(durations={"clone_setup": 0.3})
    first, second = start_clone(sim, 104), start_clone(sim, 104)
    assert sim.wait_task(first)["exitstatus"] == "OK"
    assert sim.wait_task(second)["exitstatus"] == "unable to create VM 104 - VM 104 already exists"
    assert sim.data("GET", f"/nodes/pve1/tasks/{second}/log")[-1]["t"] == "TASK ERROR: unable to create VM 104 - VM 104 already exists"


def test_more_parallel_clones_of_one_template_than_the_limit_time_out_on_its_lock(make_sim):
    sim = make_sim(durations={"clone_linked": 0.5}, limits={"parallel_clones_per_source": 2, "lock_wait": 0.1})
    upids = [start_clone(sim, vmid) for vmid in (110, 111, 112)]
    results = [sim.wait_task(upid)["exitstatus"] for upid in upids]
    assert results[:2] == ["OK", "OK"]
    assert results[2] == f"can't lock file '/var/lock/qemu-server/lock-{TEMPLATE}.conf' - got timeout"
    assert sim.call("GET", "/nodes/pve1/qemu/112/config").status_code == 500


def test_by_default_clones_of_a_template_share_its_lock_and_run_together(make_sim):
    # qemu-server's clone_vm takes a shared lock on a stopped source: five clones of 0.3 s each take
    # about 0.3 s together, where one at a time would take 1.5 s.
    sim = make_sim(durations={"clone_linked": 0.3}, limits={"parallel_clones_per_source": None, "lock_wait": 0.05})
    started = time.monotonic()
    upids = [start_clone(sim, vmid) for vmid in (130, 131, 132, 133, 134)]
    assert [sim.wait_task(upid)["exitstatus"] for upid in upids] == ["OK"] * 5
    assert time.monotonic() - started < 1.0


def test_by_default_clones_of_a_running_vm_take_its_lock_one_at_a_time(make_sim):
    sim = make_sim(durations={"clone_full": 0.3, "start": 0.0}, limits={"parallel_clones_per_source": None, "lock_wait": 0.05})
    sim.clone(135, full=1)
    assert sim.wait_task(sim.data("POST", "/nodes/pve1/qemu/135/status/start"))["exitstatus"] == "OK"
    first = sim.data("POST", "/nodes/pve1/qemu/135/clone", data={"newid": 136, "full": 1})
    second = sim.data("POST", "/nodes/pve1/qemu/135/clone", data={"newid": 137, "full": 1})
    assert sim.wait_task(first)["exitstatus"] == "OK"
    assert sim.wait_task(second)["exitstatus"] == "can't lock file '/var/lock/qemu-server/lock-135.conf' - got timeout"


def test_clones_within_the_limit_wait_for_the_lock_instead_of_failing(make_sim):
    sim = make_sim(durations={"clone_linked": 0.05}, limits={"parallel_clones_per_source": 1, "lock_wait": 2})
    upids = [start_clone(sim, vmid) for vmid in (113, 114)]
    assert [sim.wait_task(upid)["exitstatus"] for upid in upids] == ["OK", "OK"]


def test_nextid_is_lowest_free_id_and_reserves_nothing(sim: Sim):
    assert sim.data("GET", "/cluster/nextid") == "100"
    assert sim.data("GET", "/cluster/nextid") == "100", "nextid must not reserve the id it returned"
    sim.clone(100)
    sim.clone(102)
    assert sim.data("GET", "/cluster/nextid") == "101"
    assert sim.data("GET", "/cluster/nextid", params={"vmid": 101}) == "101"
    taken = sim.call("GET", "/cluster/nextid", params={"vmid": 102})
    assert (taken.status_code, taken.reason) == (400, "VM 102 already exists")


def test_linked_clone_needs_a_template_and_remote_targets_need_shared_storage(sim: Sim):
    sim.clone(120, full=1, storage="local-lvm")
    linked = sim.call("POST", "/nodes/pve1/qemu/120/clone", data={"newid": 121, "full": 0})
    assert (linked.status_code, linked.reason) == (500, "Linked clone feature is not supported for drive 'scsi0'")
    remote = sim.call("POST", "/nodes/pve1/qemu/120/clone", data={"newid": 121, "target": "pve2"})
    assert (remote.status_code, remote.reason) == (500, "can't clone VM to node 'pve2' (VM uses local storage)")
    local_target = sim.call("POST", CLONE, data={"newid": 121, "full": 1, "storage": "local-lvm", "target": "pve2"})
    assert (local_target.status_code, local_target.reason) == (500, "can't clone to non-shared storage 'local-lvm'")
    storage_on_linked = sim.call("POST", CLONE, data={"newid": 121, "storage": "local-lvm"})
    assert storage_on_linked.reason == "parameter 'storage' not allowed for linked clones"
    assert sim.call("POST", CLONE, data={"newid": 121, "target": "pve9"}).reason == "no such cluster node 'pve9'"


def test_destroying_a_running_vm_is_refused(sim: Sim):
    sim.clone(122)
    sim.wait_task(sim.data("POST", "/nodes/pve1/qemu/122/status/start"))
    response = sim.call("DELETE", "/nodes/pve1/qemu/122")
    assert (response.status_code, response.reason) == (500, "VM 122 is running - destroy failed")
    assert sim.call("POST", "/nodes/pve1/qemu/122/template").reason == "you can't convert a VM to template if VM is running"
    assert sim.wait_task(sim.data("POST", "/nodes/pve1/qemu/122/status/start"))["exitstatus"] == "VM 122 already running"
    assert sim.call("POST", f"/nodes/pve1/qemu/{TEMPLATE}/status/start").reason == "you can't start a vm if it's a template"


def test_vm_on_another_node_is_not_found_on_this_one(sim: Sim):
    response = sim.call("GET", f"/nodes/pve2/qemu/{TEMPLATE}/config")
    assert (response.status_code, response.reason) == (500, f"Configuration file 'nodes/pve2/qemu-server/{TEMPLATE}.conf' does not exist")


def test_digest_mismatch_is_refused(sim: Sim):
    digest = sim.data("GET", f"/nodes/pve1/qemu/{TEMPLATE}/config")["digest"]
    sim.data("PUT", f"/nodes/pve1/qemu/{TEMPLATE}/config", data={"description": "changed", "digest": digest})
    stale = sim.call("PUT", f"/nodes/pve1/qemu/{TEMPLATE}/config", data={"description": "again", "digest": digest})
    assert stale.reason == "detected modified configuration - file changed by other user? Try again."


# --- guest agent --------------------------------------------------------------------------------


def test_agent_is_refused_until_the_guest_booted(sim: Sim):
    sim.clone(130)
    agent = "/nodes/pve1/qemu/130/agent/network-get-interfaces"
    stopped = sim.call("GET", agent)
    assert (stopped.status_code, stopped.reason) == (500, "VM 130 is not running")
    sim.wait_task(sim.data("POST", "/nodes/pve1/qemu/130/status/start"))
    booting = sim.call("GET", agent)
    assert (booting.status_code, booting.reason) == (500, "QEMU guest agent is not running")
    assert sim.call("POST", "/nodes/pve1/qemu/130/agent/ping").status_code == 500
    deadline = time.monotonic() + WAIT_LIMIT
    while sim.call("POST", "/nodes/pve1/qemu/130/agent/ping").status_code != 200 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert sim.data("POST", "/nodes/pve1/qemu/130/agent/ping") == {"result": {}}
    interfaces = sim.data("GET", agent)["result"]
    eth0 = next(interface for interface in interfaces if interface["name"] == "eth0")
    assert eth0["ip-addresses"][0]["ip-address"].startswith("10.99.")
    assert eth0["hardware-address"] == sim.data("GET", "/nodes/pve1/qemu/130/config")["net0"].split(",")[0].split("=")[1].lower()


def test_agent_not_configured(sim: Sim):
    sim.clone(131)
    sim.data("PUT", "/nodes/pve1/qemu/131/config", data={"agent": "0"})
    sim.wait_task(sim.data("POST", "/nodes/pve1/qemu/131/status/start"))
    assert sim.call("GET", "/nodes/pve1/qemu/131/agent/network-get-interfaces").reason == "No QEMU guest agent configured"


# --- faults -------------------------------------------------------------------------------------


def test_fault_agent_never_comes_up(make_sim):
    sim = make_sim(durations={"boot_to_agent": 0})
    assert sim.admin("PUT", "faults", json={"agent_never_up": [140]}).status_code == 200
    for vmid in (140, 141):
        sim.clone(vmid)
        sim.wait_task(sim.data("POST", f"/nodes/pve1/qemu/{vmid}/status/start"))
    time.sleep(0.05)
    assert sim.call("GET", "/nodes/pve1/qemu/140/agent/network-get-interfaces").reason == "QEMU guest agent is not running"
    assert sim.call("GET", "/nodes/pve1/qemu/141/agent/network-get-interfaces").status_code == 200


def test_fault_failing_clone_removes_the_half_made_vm(sim: Sim):
    assert sim.admin("PUT", "faults", json={"clone_failure": {"message": "storage migration failed: disk full", "count": 1}}).status_code == 200
    assert sim.clone(142)["exitstatus"] == "storage migration failed: disk full"
    assert sim.call("GET", "/nodes/pve1/qemu/142/config").status_code == 500
    assert sim.clone(142)["exitstatus"] == "OK", "count=1 fails one clone only"
    assert sim.admin("GET", "faults").json() == {"clone_failure": {"message": "storage migration failed: disk full", "count": 0}}


def test_fault_from_config_section(make_sim):
    sim = make_sim(faults={"clone_failure": {"message": "boom"}})
    assert sim.clone(143)["exitstatus"] == "boom"
    assert sim.clone(144)["exitstatus"] == "boom"
    assert sim.admin("DELETE", "faults").status_code == 200
    assert sim.clone(145)["exitstatus"] == "OK"


def test_fault_slow_storage_stretches_full_clones(make_sim):
    sim = make_sim(durations={"clone_full": 0.02})
    started = time.monotonic()
    sim.clone(150, full=1, storage="local-lvm")
    normal = time.monotonic() - started
    sim.admin("PUT", "faults", json={"slow_storage": {"local-lvm": 20}})
    started = time.monotonic()
    sim.clone(151, full=1, storage="local-lvm")
    slow = time.monotonic() - started
    assert slow >= 0.4 > normal


def test_fault_node_offline(sim: Sim):
    sim.clone(152, target="pve2")
    sim.admin("PUT", "faults", json={"offline_nodes": ["pve2"]})
    response = sim.call("GET", "/nodes/pve2/qemu")
    assert (response.status_code, response.reason) == (595, "No route to host")
    nodes = {entry["node"]: entry["status"] for entry in sim.data("GET", "/nodes")}
    assert nodes == {"pve1": "online", "pve2": "offline", "pve3": "online"}
    vm = next(entry for entry in sim.data("GET", "/cluster/resources", params={"type": "vm"}) if entry["vmid"] == 152)
    assert vm["status"] == "unknown"
    assert sim.call("POST", CLONE, data={"newid": 153, "target": "pve2"}).reason == "target node 'pve2' is offline"


class RecordingClock(Clock):
    """Time that moves only when a task sleeps: durations are checked exactly, and nothing waits for real."""

    def __init__(self):
        self.now = 1_750_000_000.0
        self.slept: list[float] = []

    def time(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)


def test_clone_durations_follow_storage_speed_and_slow_storage_fault(make_sim):
    clock = RecordingClock()
    sim = make_sim(clock=clock, durations={"clone_setup": 0, "clone_full": 6.0, "clone_linked": 1.5})
    sim.clone(154)
    sim.clone(155, full=1)
    sim.admin("PUT", "faults", json={"slow_storage": {"local-lvm": 10}})
    sim.clone(156, full=1, storage="local-lvm")
    assert [seconds for seconds in clock.slept if seconds] == [1.5, 6.0 / 0.25, 6.0 * 10]


def test_unknown_fault_is_rejected(sim: Sim):
    response = sim.admin("PUT", "faults", json={"power_cut": True})
    assert response.status_code == 400 and "power_cut" in response.json()["error"]


# --- request log --------------------------------------------------------------------------------


def test_request_log_records_calls_and_can_be_cleared(sim: Sim):
    sim.admin("DELETE", "requests")
    sim.data("GET", "/cluster/resources", params={"type": "vm"})
    sim.call("PUT", f"/nodes/pve1/qemu/{TEMPLATE}/config", data={"cores": "x"})
    sim.call("POST", "/access/ticket", token=None, data={"username": "root@pam", "password": "wrong"})
    log = sim.admin("GET", "requests").json()
    assert [(entry["method"], entry["path"], entry["status"], entry["caller"]) for entry in log] == [
        ("GET", "/cluster/resources", 200, "root@pam!admin"),
        ("PUT", f"/nodes/pve1/qemu/{TEMPLATE}/config", 400, "root@pam!admin"),
        ("POST", "/access/ticket", 401, None),
    ]
    assert log[0]["params"] == {"type": "vm"}
    assert log[2]["params"]["password"] == "**********"
    writes = [entry for entry in log if entry["method"] in ("POST", "PUT", "DELETE")]
    assert len(writes) == 2
    sim.admin("DELETE", "requests")
    assert sim.admin("GET", "requests").json() == []


# --- CLI and persistence --------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until_serving(url: str, ca_file, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + WAIT_LIMIT
    while time.monotonic() < deadline:
        assert process.poll() is None, process.stdout.read() if process.stdout else "server exited"
        try:
            requests.get(url + "/api2/json/version", verify=ca_file, timeout=1)
            return
        except (requests.ConnectionError, OSError):
            time.sleep(0.05)
    raise AssertionError("the simulator did not start serving")


@pytest.fixture
def durations_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"durations": {"clone_linked": 0.01, "clone_setup": 0, "start": 0.01}}), encoding="utf-8")
    return path


def test_cli_state_file_keeps_vms_across_restarts(tmp_path, durations_file):
    state = tmp_path / "state.json"
    port = free_port()
    url = f"https://127.0.0.1:{port}"
    command = [sys.executable, "-m", "lab.pvesim", "serve", "--config", str(durations_file), "--state", str(state), "--port", str(port)]
    headers = token_header(ROOT_TOKEN)
    for round_number in (1, 2):
        process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            wait_until_serving(url, tmp_path / "ca.pem", process)
            api = url + "/api2/json/nodes/pve1/qemu"
            if round_number == 1:
                upid = requests.post(f"{api}/{TEMPLATE}/clone", headers=headers, data={"newid": 160, "name": "kept"}, verify=tmp_path / "ca.pem", timeout=10)
                node_tasks = f"{url}/api2/json/nodes/pve1/tasks/{upid.json()['data']}/status"
                deadline = time.monotonic() + WAIT_LIMIT
                while requests.get(node_tasks, headers=headers, verify=tmp_path / "ca.pem", timeout=10).json()["data"]["status"] != "stopped":
                    assert time.monotonic() < deadline
                    time.sleep(0.02)
            else:
                config = requests.get(f"{api}/160/config", headers=headers, verify=tmp_path / "ca.pem", timeout=10).json()["data"]
                assert config["name"] == "kept"
        finally:
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=WAIT_LIMIT) == 0
    assert json.loads(state.read_text(encoding="utf-8"))["vms"][-1]["vmid"] == 160


def test_cli_daemon_writes_pidfile_and_stops_on_sigterm(tmp_path, durations_file):
    port, pidfile = free_port(), tmp_path / "pvesim.pid"
    command = [sys.executable, "-m", "lab.pvesim", "serve", "--state", str(tmp_path / "state.json"), "--port", str(port), "--daemon", "--pidfile", str(pidfile)]
    launcher = subprocess.run(command, cwd=REPO_ROOT, timeout=WAIT_LIMIT, check=True)
    assert launcher.returncode == 0
    deadline = time.monotonic() + WAIT_LIMIT
    while not (pidfile.exists() and pidfile.read_text(encoding="utf-8").strip()) and time.monotonic() < deadline:
        time.sleep(0.05)
    pid = int(pidfile.read_text(encoding="utf-8"))
    try:
        deadline = time.monotonic() + WAIT_LIMIT
        while time.monotonic() < deadline:
            try:
                requests.get(f"https://127.0.0.1:{port}/api2/json/version", verify=tmp_path / "ca.pem", timeout=1)
                break
            except (requests.ConnectionError, OSError):
                time.sleep(0.05)
        response = requests.get(f"https://127.0.0.1:{port}/api2/json/version", headers=token_header(ROOT_TOKEN), verify=tmp_path / "ca.pem", timeout=5)
        assert response.json()["data"]["release"] == "9.1"
    finally:
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + WAIT_LIMIT
    while pidfile.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pidfile.exists(), "the daemon did not stop and remove its pidfile"
