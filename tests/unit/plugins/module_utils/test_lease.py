"""module_utils/_lease.py: the scale lease file, with an injected clock, and real processes racing for it."""

from __future__ import annotations

import errno
import fcntl
import json
import multiprocessing
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time

import pytest

from ansible_collections.mlfleet.serving.plugins.module_utils import _lease
from ansible_collections.mlfleet.serving.plugins.module_utils._lease import LeaseError, LeaseFile, new_holder

T0 = 1714564800.0


class FakeClock:
    """Wall clock, monotonic clock and sleep that only move when someone sleeps."""

    def __init__(self, start=T0):
        self.wall = start
        self.elapsed = 0.0
        self.sleeps = []

    def time(self):
        return self.wall

    def monotonic(self):
        return self.elapsed

    def sleep(self, seconds):
        assert seconds > 0
        self.sleeps.append(round(seconds, 6))
        self.wall += seconds
        self.elapsed += seconds


@pytest.fixture
def path(tmp_path):
    return str(tmp_path / "scale.lease")


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def lease(path, clock):
    return LeaseFile(path, clock=clock)


def stored(path):
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def content(path):
    with open(path, "rb") as handle:
        return handle.read()


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


# Acquire


def test_a_free_lease_is_taken(lease, path):
    result = lease.try_acquire("run-a", 60, "scale_out of resnet18", now=T0)
    assert result == {
        "holder": "run-a",
        "acquired": True,
        "renewed": False,
        "taken_over": None,
        "changed": True,
        "held_by": "run-a",
        "held_reason": "scale_out of resnet18",
        "held_run": None,
        "expires_at": T0 + 60,
        "expires_in": 60.0,
        "last_actions": {},
        "floors": {},
        "bounds": {},
        "settings": {},
        "quiet": {},
        "history": {},
        "now": T0,
    }
    assert stored(path) == {
        "version": 1,
        "lease": {"holder": "run-a", "reason": "scale_out of resnet18", "acquired_at": T0, "expires_at": T0 + 60, "ttl": 60},
        "last_actions": {},
        "floors": {},
        "bounds": {},
        "settings": {},
        "quiet": {},
        "history": {},
    }


def test_a_live_lease_of_another_holder_is_not_taken(lease, path):
    lease.try_acquire("run-a", 60, "scale_out of resnet18", now=T0)
    before = content(path)
    result = lease.try_acquire("run-b", 60, "scale_in", now=T0 + 10)
    assert not result["acquired"] and not result["changed"] and result["taken_over"] is None
    assert result["held_by"] == "run-a" and result["held_reason"] == "scale_out of resnet18"
    assert result["expires_at"] == T0 + 60 and result["expires_in"] == 50.0 and result["holder"] == "run-b"
    assert content(path) == before


@pytest.mark.parametrize("later", [60, 61, 10_000])
def test_an_expired_lease_is_taken_over(lease, path, later):
    lease.try_acquire("run-a", 60, "scale_out of resnet18", now=T0)
    result = lease.try_acquire("run-b", 30, "scale_in", now=T0 + later)
    assert result["acquired"] and result["changed"] and not result["renewed"]
    assert result["taken_over"] == {"holder": "run-a", "reason": "scale_out of resnet18", "acquired_at": T0, "expires_at": T0 + 60, "run_ended": False}
    assert result["held_by"] == "run-b" and result["expires_at"] == T0 + later + 30
    assert stored(path)["lease"]["holder"] == "run-b"


RUN_A = {"host": "control", "pid": 4242, "started": 100}


@pytest.mark.parametrize(
    "ended, later, taken, run_ended",
    [
        (False, 10, False, None),  # its playbook still runs: the lease holds until it expires
        (True, 10, True, True),  # its playbook ended before giving it back: abandoned, taken over at once
        (False, 61, True, False),  # expired, whatever the process
        (True, 61, True, True),
    ],
)
def test_a_lease_whose_playbook_run_ended_is_taken_over_before_it_expires(path, clock, ended, later, taken, run_ended):
    asked = []

    def run_has_ended(run):
        asked.append(run)
        return ended

    lease = LeaseFile(path, clock=clock, ended=run_has_ended)
    lease.try_acquire("run-a", 60, "site.yml of lab", now=T0, run=RUN_A)
    assert stored(path)["lease"]["run"] == RUN_A
    result = lease.try_acquire("run-b", 60, "scale_out", now=T0 + later, run={"host": "control", "pid": 4343, "started": 200})
    assert asked[-1] == RUN_A
    assert result["acquired"] is taken
    if taken:
        assert result["taken_over"]["holder"] == "run-a" and result["taken_over"]["run_ended"] is run_ended
        assert stored(path)["lease"]["run"]["pid"] == 4343
    else:
        assert result["held_by"] == "run-a" and result["held_run"] == RUN_A and result["expires_in"] == 50.0


def test_a_renewal_keeps_the_run_that_took_the_lease(lease, path):
    lease.try_acquire("run-a", 60, "scale_out", now=T0, run=RUN_A)
    lease.try_acquire("run-a", 60, now=T0 + 10)
    assert stored(path)["lease"]["run"] == RUN_A


@pytest.mark.parametrize(
    "run, ended",
    [
        (None, False),  # taken outside ansible-playbook: only its expiry frees it
        ({"host": "another-control-host", "pid": 1, "started": 0}, False),  # its process cannot be seen from here
        ("this process", False),
        ("this process, later start", True),  # the PID was reused by a later process
        ("a finished process", True),
    ],
)
def test_a_run_has_ended_only_when_its_process_on_this_host_is_gone(run, ended):
    if run == "a finished process":
        child = multiprocessing.get_context("fork").Process(target=time.sleep, args=(0,))
        child.start()
        child.join(10)
        run = {"host": socket.gethostname(), "pid": child.pid, "started": 0}
    elif isinstance(run, str):
        started = _lease.process_start(os.getpid())
        run = {"host": socket.gethostname(), "pid": os.getpid(), "started": started + (1 if "later" in run else 0)}
    assert _lease.run_ended(run) is ended


def test_the_run_is_the_outermost_ansible_playbook_process(tmp_path):
    """A stand-in ansible-playbook that forks a worker (as Ansible does per task), which starts a module through a shell."""
    (tmp_path / "lease_under_test.py").write_bytes(open(_lease.__file__, "rb").read())
    (tmp_path / "module.py").write_text("import json\nfrom lease_under_test import current_run\nprint(json.dumps(current_run()))\n")
    script = tmp_path / "ansible-playbook"
    script.write_text(
        "import os, subprocess, sys\n"
        "if os.fork() == 0:\n"
        f"    subprocess.run(['/bin/sh', '-c', 'cd {tmp_path} && {sys.executable} module.py'], check=True)\n"
        "    os._exit(0)\n"
        "os.wait()\n"
        "print(os.getpid())\n"
    )
    output = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, check=True, timeout=30).stdout.splitlines()
    run, playbook_pid = json.loads(output[0]), int(output[1])
    assert run == {"host": socket.gethostname(), "pid": playbook_pid, "started": run["started"]} and run["started"] > 0


def test_outside_ansible_playbook_there_is_no_run():
    assert _lease.current_run() is None


def test_the_same_holder_renews_its_lease(lease, path):
    lease.try_acquire("run-a", 60, "scale_out", now=T0)
    renewed = lease.try_acquire("run-a", 60, now=T0 + 50)
    assert renewed["acquired"] and renewed["renewed"] and renewed["changed"] and renewed["taken_over"] is None
    assert renewed["expires_at"] == T0 + 110 and renewed["held_reason"] == "scale_out"
    assert stored(path)["lease"]["acquired_at"] == T0
    # Renewing after its own expiry is still a renewal, not a takeover, and a new reason replaces the old one.
    late = lease.try_acquire("run-a", 60, "scale_out, second step", now=T0 + 500)
    assert late["renewed"] and late["taken_over"] is None and late["held_reason"] == "scale_out, second step"
    assert stored(path)["lease"] == {"holder": "run-a", "reason": "scale_out, second step", "acquired_at": T0, "expires_at": T0 + 560, "ttl": 60}


def test_a_lease_without_reason_reports_none(lease):
    result = lease.try_acquire("run-a", 60, now=T0)
    assert result["held_reason"] is None
    assert lease.try_acquire("run-b", 60, now=T0 + 1)["held_reason"] is None


# Release and cooldown records


def test_release_gives_the_lease_back_and_records_acted(lease, path):
    lease.try_acquire("run-a", 60, now=T0)
    result = lease.release("run-a", ["resnet18:scale_out", "resnet18:scale_replicas", "resnet18:scale_out"], now=T0 + 20)
    assert result == {
        "holder": "run-a",
        "released": True,
        "changed": True,
        "held_by": None,
        "held_reason": None,
        "held_run": None,
        "expires_at": None,
        "expires_in": None,
        "last_actions": {"resnet18:scale_out": T0 + 20, "resnet18:scale_replicas": T0 + 20},
        "floors": {},
        "bounds": {},
        "settings": {},
        "quiet": {},
        "history": {},
        "now": T0 + 20,
    }
    assert stored(path) == {
        "version": 1,
        "lease": None,
        "last_actions": {"resnet18:scale_out": T0 + 20, "resnet18:scale_replicas": T0 + 20},
        "floors": {},
        "bounds": {},
        "settings": {},
        "quiet": {},
        "history": {},
    }

    again = lease.release("run-a", ["resnet18:scale_out"], now=T0 + 30)
    assert not again["released"] and not again["changed"] and again["held_by"] is None
    assert again["last_actions"] == {"resnet18:scale_out": T0 + 20, "resnet18:scale_replicas": T0 + 20}


def test_cooldown_records_survive_later_leases(lease):
    lease.try_acquire("run-a", 60, now=T0)
    lease.release("run-a", ["densenet161:scale_in"], now=T0 + 5)
    taken = lease.try_acquire("run-b", 60, now=T0 + 100)
    assert taken["last_actions"] == {"densenet161:scale_in": T0 + 5} and taken["now"] - taken["last_actions"]["densenet161:scale_in"] == 95
    released = lease.release("run-b", ["densenet161:scale_out"], now=T0 + 120)
    assert released["last_actions"] == {"densenet161:scale_in": T0 + 5, "densenet161:scale_out": T0 + 120}
    busy = lease.try_acquire("run-c", 60, now=T0 + 121)
    assert busy["last_actions"] == released["last_actions"]


def test_a_newer_action_replaces_the_older_record(lease):
    lease.try_acquire("run-a", 60, now=T0)
    lease.release("run-a", ["resnet18:scale_out"], now=T0 + 1)
    lease.try_acquire("run-b", 60, now=T0 + 400)
    assert lease.release("run-b", ["resnet18:scale_out"], now=T0 + 410)["last_actions"] == {"resnet18:scale_out": T0 + 410}


# Replica floors


def floor(service="resnet18", replicas=4, until=T0 + 600, reason="schedule peak"):
    return {"service": service, "replicas": replicas, "until": until, "reason": reason}


def test_release_records_floors_and_every_call_returns_the_highest_live_one(lease, path):
    lease.try_acquire("run-a", 60, now=T0)
    released = lease.release("run-a", floors=[floor(replicas=4, until=T0 + 600), floor("densenet161", 2, T0 + 300)], now=T0 + 10)
    assert released["floors"] == {
        "resnet18": {"replicas": 4, "until": T0 + 600, "reason": "schedule peak"},
        "densenet161": {"replicas": 2, "until": T0 + 300, "reason": "schedule peak"},
    }
    lease.try_acquire("run-b", 60, now=T0 + 20)
    # A lower floor that lasts longer does not hide the higher one while both hold; afterwards it is the floor.
    lease.release("run-b", floors=[floor(replicas=3, until=T0 + 900, reason="schedule late")], now=T0 + 30)
    assert lease.try_acquire("run-c", 60, now=T0 + 40)["floors"]["resnet18"] == {"replicas": 4, "until": T0 + 600, "reason": "schedule peak"}
    lease.release("run-c", now=T0 + 50)
    later = lease.try_acquire("run-d", 60, now=T0 + 700)
    assert later["floors"] == {"resnet18": {"replicas": 3, "until": T0 + 900, "reason": "schedule late"}}
    # The write at T0 + 700 dropped the floors that had expired.
    assert stored(path)["floors"] == {"resnet18": [{"replicas": 3, "until": T0 + 900, "reason": "schedule late"}]}
    lease.release("run-d", now=T0 + 710)
    assert lease.try_acquire("run-e", 60, now=T0 + 900)["floors"] == {}


def test_the_same_floor_twice_is_stored_once(lease, path):
    for run, now in (("run-a", T0), ("run-b", T0 + 60)):
        lease.try_acquire(run, 60, now=now)
        lease.release(run, floors=[floor()], now=now + 1)
    assert stored(path)["floors"] == {"resnet18": [{"replicas": 4, "until": T0 + 600, "reason": "schedule peak"}]}


def test_floors_of_a_release_that_does_not_hold_the_lease_are_not_recorded(lease, path):
    lease.try_acquire("run-a", 60, now=T0)
    before = content(path)
    result = lease.release("run-b", floors=[floor()], now=T0 + 5)
    assert not result["released"] and result["floors"] == {}
    assert content(path) == before


@pytest.mark.parametrize(
    "option, bad, message",
    [
        ("floors", {"replicas": 4, "until": T0}, "floors[0] must have a service"),
        ("floors", floor(replicas=-1), "floors[0] (resnet18): replicas -1 is not a whole number of 0 or more"),
        ("floors", floor(replicas=True), "replicas True is not a whole number"),
        ("floors", floor(until="tomorrow"), "until 'tomorrow' is not a number"),
        ("bounds", {"min": 2, "max": 6}, "bounds[0] must have a service"),
        ("bounds", {"service": "resnet18", "min": -1, "max": 6}, "bounds[0] (resnet18): min -1 is not a whole number of 0 or more"),
        ("bounds", {"service": "resnet18", "min": 2, "max": 0}, "max 0 is not a whole number of 1 or more"),
        ("bounds", {"service": "resnet18", "min": 2, "max": True}, "max True is not a whole number"),
        ("bounds", {"service": "resnet18", "min": 7, "max": 6}, "min 7 is above max 6"),
    ],
)
def test_a_bad_floor_or_bounds_entry_is_named_and_changes_nothing(lease, path, option, bad, message):
    lease.try_acquire("run-a", 60, now=T0)
    before = content(path)
    with pytest.raises(LeaseError, match=re.escape(message)):
        lease.release("run-a", now=T0 + 1, **{option: [bad]})
    assert content(path) == before


def test_a_file_without_floors_from_an_earlier_version_is_read(path):
    with open(path, "w", encoding="utf-8") as handle:
        json.dump({"version": 1, "lease": None, "last_actions": {"resnet18:scale_out": T0}}, handle)
    result = LeaseFile(path).try_acquire("run-a", 60, now=T0 + 1)
    assert result["acquired"] and result["floors"] == {} and result["bounds"] == {} and result["last_actions"] == {"resnet18:scale_out": T0}


# Replica bounds


def test_release_records_each_services_bounds_with_their_time_and_the_latest_replace_them(lease, path):
    lease.try_acquire("run-a", 60, now=T0)
    released = lease.release("run-a", bounds=[{"service": "resnet18", "min": 2, "max": 6}], now=T0 + 10)
    assert released["bounds"] == {"resnet18": {"min": 2, "max": 6, "at": T0 + 10}}
    lease.try_acquire("run-b", 60, now=T0 + 20)
    lease.release("run-b", bounds=[{"service": "densenet161", "min": 1, "max": 4}], now=T0 + 30)
    lease.try_acquire("run-c", 60, now=T0 + 40)
    later = lease.release("run-c", bounds=[{"service": "resnet18", "min": 4, "max": 8}], now=T0 + 50)
    assert later["bounds"] == {"resnet18": {"min": 4, "max": 8, "at": T0 + 50}, "densenet161": {"min": 1, "max": 4, "at": T0 + 30}}
    assert stored(path)["bounds"] == later["bounds"]
    assert lease.try_acquire("run-d", 60, now=T0 + 60)["bounds"] == later["bounds"], "taking the lease keeps them"
    assert stored(path)["bounds"] == later["bounds"]


def test_bounds_of_a_release_that_does_not_hold_the_lease_are_not_recorded(lease, path):
    lease.try_acquire("run-a", 60, now=T0)
    result = lease.release("run-b", bounds=[{"service": "resnet18", "min": 2, "max": 6}], now=T0 + 5)
    assert not result["released"] and result["bounds"] == {} and stored(path)["bounds"] == {}


def test_release_by_another_holder_changes_nothing(lease, path):
    lease.try_acquire("run-a", 60, "scale_out", now=T0)
    before = content(path)
    result = lease.release("run-b", ["resnet18:scale_in"], now=T0 + 5)
    assert not result["released"] and not result["changed"]
    assert result["held_by"] == "run-a" and result["held_reason"] == "scale_out" and result["expires_in"] == 55.0 and result["last_actions"] == {}
    assert content(path) == before


def test_a_late_release_after_a_takeover_keeps_the_new_lease(lease):
    lease.try_acquire("slow-run", 60, now=T0)
    lease.try_acquire("next-run", 60, now=T0 + 61)
    late = lease.release("slow-run", ["resnet18:scale_out"], now=T0 + 70)
    assert not late["released"] and late["held_by"] == "next-run" and late["last_actions"] == {}
    assert lease.try_acquire("third-run", 60, now=T0 + 71)["held_by"] == "next-run"


def test_a_holder_releases_its_own_expired_lease(lease):
    lease.try_acquire("run-a", 60, now=T0)
    result = lease.release("run-a", ["resnet18:scale_out"], now=T0 + 300)
    assert result["released"] and result["held_by"] is None and result["last_actions"] == {"resnet18:scale_out": T0 + 300}


def test_release_of_a_missing_file_creates_nothing(lease, path):
    result = lease.release("run-a", ["resnet18:scale_out"], now=T0)
    assert not result["released"] and not result["changed"] and not os.path.exists(path)


# Waiting, with the injected clock


def test_waiting_takes_the_lease_when_it_expires(lease, clock):
    lease.try_acquire("run-a", 5, "scale_out", now=T0)
    result = lease.acquire("run-b", 60, wait_timeout=10, poll_interval=1)
    assert result["acquired"] and result["taken_over"]["holder"] == "run-a" and result["waited"] == 5.0
    assert clock.sleeps == [1.0] * 5


def test_waiting_wakes_when_the_lease_expires_rather_than_at_the_next_poll(lease, clock):
    lease.try_acquire("run-a", 60, now=T0 - 59.5)
    result = lease.acquire("run-b", 60, wait_timeout=30, poll_interval=10)
    assert result["acquired"] and clock.sleeps == [0.51]


def test_waiting_takes_a_released_lease(lease, clock, monkeypatch):
    lease.try_acquire("run-a", 600, now=T0)
    sleep = clock.sleep

    def release_after_two_polls(seconds):
        sleep(seconds)
        if len(clock.sleeps) == 2:
            lease.release("run-a", ["resnet18:scale_out"])

    monkeypatch.setattr(clock, "sleep", release_after_two_polls)
    result = lease.acquire("run-b", 60, wait_timeout=30, poll_interval=2)
    assert result["acquired"] and result["taken_over"] is None and result["waited"] == 4.0
    assert result["last_actions"] == {"resnet18:scale_out": T0 + 4}


def test_waiting_gives_up_after_wait_timeout(lease, clock, path):
    lease.try_acquire("run-a", 600, "scale_in", now=T0)
    before = content(path)
    result = lease.acquire("run-b", 60, wait_timeout=3, poll_interval=1)
    assert not result["acquired"] and not result["changed"] and result["waited"] == 3.0
    assert result["held_by"] == "run-a" and result["held_reason"] == "scale_in" and result["expires_in"] == 597.0
    assert clock.sleeps == [1.0, 1.0, 1.0] and content(path) == before


def test_the_last_poll_is_cut_to_the_deadline(lease, clock):
    lease.try_acquire("run-a", 600, now=T0)
    result = lease.acquire("run-b", 60, wait_timeout=2.5, poll_interval=1)
    assert not result["acquired"] and clock.sleeps == [1.0, 1.0, 0.5] and result["waited"] == 2.5


def test_no_wait_by_default(lease, clock):
    lease.try_acquire("run-a", 600, now=T0)
    result = lease.acquire("run-b", 60)
    assert not result["acquired"] and result["waited"] == 0.0 and clock.sleeps == []


# Check mode


def test_check_mode_writes_nothing(lease, path, tmp_path):
    predicted = lease.acquire("run-a", 60, "scale_out", wait_timeout=30, check_mode=True)
    assert predicted["acquired"] and predicted["changed"] and predicted["held_by"] == "run-a" and predicted["expires_at"] == T0 + 60
    assert os.listdir(tmp_path) == []

    lease.try_acquire("run-a", 60, now=T0)
    before = content(path)
    released = lease.release("run-a", ["resnet18:scale_out"], check_mode=True)
    assert released["released"] and released["changed"] and released["last_actions"] == {"resnet18:scale_out": T0}
    renewed = lease.try_acquire("run-a", 60, now=T0 + 30, check_mode=True)
    assert renewed["renewed"] and renewed["expires_at"] == T0 + 90
    assert content(path) == before and sorted(os.listdir(tmp_path)) == ["scale.lease", "scale.lease.lock"]


def test_check_mode_does_not_wait_for_a_busy_lease(lease, clock):
    lease.try_acquire("run-a", 600, now=T0)
    result = lease.acquire("run-b", 60, wait_timeout=300, check_mode=True)
    assert not result["acquired"] and not result["changed"] and result["held_by"] == "run-a" and clock.sleeps == []


# The file itself


def test_files_are_private_whatever_the_umask(path):
    previous = os.umask(0)
    try:
        LeaseFile(path).try_acquire("run-a", 60)
    finally:
        os.umask(previous)
    assert mode(path) == 0o600 and mode(path + ".lock") == 0o600


def test_an_existing_file_with_loose_permissions_becomes_private(path):
    with open(path, "w", encoding="utf-8") as handle:
        json.dump({"version": 1, "lease": None, "last_actions": {"resnet18:scale_out": T0}}, handle)
    os.chmod(path, 0o644)
    result = LeaseFile(path).try_acquire("run-a", 60)
    assert result["acquired"] and result["last_actions"] == {"resnet18:scale_out": T0}
    assert mode(path) == 0o600


def test_the_data_file_is_replaced_and_the_lock_is_a_sidecar(lease, path, tmp_path):
    lease.try_acquire("run-a", 60, now=T0)
    data_inode, lock_inode = os.stat(path).st_ino, os.stat(path + ".lock").st_ino
    lease.release("run-a", ["resnet18:scale_out"], now=T0 + 1)
    assert os.stat(path).st_ino != data_inode and os.stat(path + ".lock").st_ino == lock_inode
    assert os.path.getsize(path + ".lock") == 0
    assert sorted(os.listdir(tmp_path)) == ["scale.lease", "scale.lease.lock"]


def test_a_failed_write_leaves_the_file_and_no_temporary(lease, path, tmp_path, monkeypatch):
    lease.try_acquire("run-a", 60, now=T0)
    before = content(path)

    def refuse(source, target):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(_lease.os, "replace", refuse)
    with pytest.raises(LeaseError, match=f"cannot write the lease file {re.escape(path)}: No space left on device"):
        lease.release("run-a", now=T0 + 1)
    assert content(path) == before and sorted(os.listdir(tmp_path)) == ["scale.lease", "scale.lease.lock"]


def test_a_missing_directory_is_named(tmp_path):
    missing = tmp_path / "state" / "mlfleet"
    lease = LeaseFile(str(missing / "scale.lease"))
    for call in (lambda: lease.try_acquire("run-a", 60), lambda: lease.release("run-a"), lambda: lease.acquire("run-a", 60, check_mode=True)):
        with pytest.raises(LeaseError) as raised:
            call()
        assert f"the directory {missing} of the lease file {missing / 'scale.lease'} does not exist" in str(raised.value)
        assert "create it" in str(raised.value)
    assert not (tmp_path / "state").exists()


def test_a_directory_as_path_is_refused(tmp_path):
    with pytest.raises(LeaseError, match="is a directory; set path to a file"):
        LeaseFile(str(tmp_path)).try_acquire("run-a", 60)


CORRUPT = [
    (b"", "not JSON"),
    (b'{"lease": {"holder": "run-a", "expires_at": 1714564860', "not JSON"),
    (b"\xff\xfe", "not JSON"),
    (b"[]", "not a JSON object"),
    (b'{"lease": "run-a"}', "'lease' is not an object"),
    (b'{"lease": {"expires_at": 1714564860}}', "the lease has no holder"),
    (b'{"lease": {"holder": "run-a", "expires_at": "soon"}}', "expires_at is not a number"),
    (b'{"lease": {"holder": "run-a", "expires_at": NaN}}', "expires_at is not a number"),
    (b'{"lease": {"holder": "run-a", "expires_at": 1, "acquired_at": true}}', "acquired_at is not a number"),
    (b'{"lease": {"holder": "run-a", "expires_at": 1, "reason": 5}}', "reason is not a string"),
    (b'{"lease": {"holder": "run-a", "expires_at": 1, "run": {"host": "control", "pid": "4242", "started": 1}}}', "run is not an object with host"),
    (b'{"last_actions": []}', "'last_actions' is not an object"),
    (b'{"last_actions": {"resnet18:scale_out": "yesterday"}}', "last_actions['resnet18:scale_out'] is not a number"),
    (b'{"version": 2, "lease": null}', "format version 2"),
    (b'{"floors": []}', "'floors' is not an object"),
    (b'{"floors": {"resnet18": {"replicas": 4}}}', "floors['resnet18'] is not a list"),
    (b'{"floors": {"resnet18": [{"replicas": 4.5, "until": 1}]}}', "floors['resnet18']: replicas 4.5 is not a whole number"),
    (b'{"floors": {"resnet18": [{"replicas": 4, "until": null}]}}', "floors['resnet18']: until None is not a number"),
    (b'{"bounds": []}', "'bounds' is not an object"),
    (b'{"bounds": {"resnet18": 6}}', "bounds['resnet18']: an entry is not an object"),
    (b'{"bounds": {"resnet18": {"min": 2, "max": 6}}}', "bounds['resnet18']: at None is not a number"),
    (b'{"bounds": {"resnet18": {"min": 2, "max": 1.5, "at": 1}}}', "bounds['resnet18']: max 1.5 is not a whole number"),
]


@pytest.mark.parametrize("data, problem", CORRUPT)
def test_a_corrupt_file_is_never_reset(path, data, problem):
    with open(path, "wb") as handle:
        handle.write(data)
    lease = LeaseFile(path)
    for call in (
        lambda: lease.try_acquire("run-a", 60),
        lambda: lease.release("run-a", ["resnet18:scale_out"]),
        lambda: lease.acquire("run-a", 60, check_mode=True),
    ):
        with pytest.raises(LeaseError) as raised:
            call()
        message = str(raised.value)
        assert f"the lease file {path} is corrupt" in message and problem in message
        assert "When no scale playbook runs, delete it" in message and "two scale runs" in message
    assert content(path) == data


def test_an_unreadable_file_is_named(path, monkeypatch):
    LeaseFile(path).try_acquire("run-a", 60)

    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr(_lease, "open", refuse, raising=False)
    with pytest.raises(LeaseError) as raised:
        LeaseFile(path).try_acquire("run-b", 60)
    message = str(raised.value)
    assert f"cannot read the lease file {path}: Permission denied" in message and "When no scale playbook runs, delete it" in message


def test_a_lock_held_too_long_is_reported(path):
    descriptor = os.open(path + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        started = time.monotonic()
        with pytest.raises(LeaseError, match=f"the lock file {re.escape(path)}.lock has been locked by another process for more than 0.2 s"):
            LeaseFile(path, lock_timeout=0.2).try_acquire("run-a", 60)
        assert time.monotonic() - started < 2
    finally:
        os.close(descriptor)
    assert not os.path.exists(path)
    assert LeaseFile(path).try_acquire("run-a", 60)["acquired"]


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda lease: lease.try_acquire("", 60), "holder must be a non-empty string"),
        (lambda lease: lease.release("  "), "holder must be a non-empty string"),
        (lambda lease: lease.try_acquire("run-a", 0), "ttl must be a positive number of seconds, got 0"),
        (lambda lease: lease.try_acquire("run-a", -5), "ttl must be a positive number of seconds, got -5"),
        (lambda lease: lease.acquire("run-a", 60, wait_timeout=-1), "wait_timeout must be 0 or a positive number of seconds, got -1"),
        (lambda lease: lease.acquire("run-a", 60, poll_interval=0), "poll_interval must be at least 0.01 seconds, got 0"),
        (lambda lease: lease.release("run-a", ["resnet18:scale_out", ""]), "every entry of acted must be a non-empty string"),
    ],
)
def test_bad_arguments(lease, path, call, message):
    with pytest.raises(LeaseError, match=re.escape(message)):
        call(lease)
    assert not os.path.exists(path)


def test_new_holder_ids_are_unique_and_say_where_they_come_from():
    first, second = new_holder(), new_holder()
    assert re.fullmatch(rf"{re.escape(socket.gethostname())}:{os.getpid()}:[0-9a-f]{{16}}", first)
    assert first != second


# Real processes


RACERS = 8


def race_once(path, holder, barrier, results):
    barrier.wait(10)
    results.put(LeaseFile(path).try_acquire(holder, 30, f"race of {holder}"))


def collect(results, count):
    return [results.get(timeout=20) for attempt in range(count)]


def join_all(processes):
    for process in processes:
        process.join(20)
        assert process.exitcode == 0, f"{process.name} ended with {process.exitcode}"


def test_racing_processes_one_wins_and_the_next_takes_over_after_release(path):
    context = multiprocessing.get_context("fork")
    holders = [f"racer-{number}" for number in range(RACERS)]
    barrier, results = context.Barrier(RACERS), context.Queue()
    processes = [context.Process(target=race_once, args=(path, holder, barrier, results)) for holder in holders]
    for process in processes:
        process.start()
    outcomes = collect(results, RACERS)
    join_all(processes)
    (winner,) = [outcome["holder"] for outcome in outcomes if outcome["acquired"]]
    assert all(outcome["held_by"] == winner for outcome in outcomes)
    assert stored(path)["lease"]["holder"] == winner

    losers = [holder for holder in holders if holder != winner]
    assert not LeaseFile(path).try_acquire(losers[0], 30)["acquired"]
    assert LeaseFile(path).release(winner, ["resnet18:scale_out"])["released"]
    barrier = context.Barrier(len(losers))
    processes = [context.Process(target=race_once, args=(path, holder, barrier, results)) for holder in losers]
    for process in processes:
        process.start()
    outcomes = collect(results, len(losers))
    join_all(processes)
    (second,) = [outcome["holder"] for outcome in outcomes if outcome["acquired"]]
    assert second in losers and all(outcome["taken_over"] is None for outcome in outcomes)
    assert all("resnet18:scale_out" in outcome["last_actions"] for outcome in outcomes)


def hold_in_turn(path, holder, barrier, results):
    lease = LeaseFile(path)
    barrier.wait(10)
    taken = lease.acquire(holder, 30, wait_timeout=20, poll_interval=0.01)
    entered = time.time()
    time.sleep(0.02)
    left = time.time()
    released = lease.release(holder, [f"{holder}:scale_out"])
    results.put({"holder": holder, "acquired": taken["acquired"], "released": released["released"], "entered": entered, "left": left})


def read_while_others_write(path, stop, results):
    lease, reads = LeaseFile(path), 0
    while reads < 20_000 and not stop.is_set():
        try:
            lease.read()
        except LeaseError as error:
            results.put({"reads": reads, "error": str(error)})
            return
        reads += 1
    results.put({"reads": reads, "error": None})


def test_every_process_holds_the_lease_alone_in_turn(path):
    context = multiprocessing.get_context("fork")
    barrier, results, stop = context.Barrier(RACERS), context.Queue(), context.Event()
    reader_results = context.Queue()
    reader = context.Process(target=read_while_others_write, args=(path, stop, reader_results))
    reader.start()
    holders = [f"turn-{number}" for number in range(RACERS)]
    processes = [context.Process(target=hold_in_turn, args=(path, holder, barrier, results)) for holder in holders]
    for process in processes:
        process.start()
    turns = collect(results, RACERS)
    join_all(processes)
    stop.set()
    reading = reader_results.get(timeout=20)
    join_all([reader])

    assert all(turn["acquired"] and turn["released"] for turn in turns)
    turns.sort(key=lambda turn: turn["entered"])
    for earlier, later in zip(turns, turns[1:], strict=False):
        assert earlier["left"] <= later["entered"], f"{earlier['holder']} and {later['holder']} held the lease at the same time"
    # The reader never takes the lock, and still only ever sees whole files.
    assert reading["error"] is None and reading["reads"] > 0
    assert stored(path)["lease"] is None
    assert sorted(stored(path)["last_actions"]) == sorted(f"{holder}:scale_out" for holder in holders)


def take_and_hang(path, holder, taken):
    LeaseFile(path).try_acquire(holder, 1, "a run that will crash")
    taken.set()
    time.sleep(30)


def test_a_crashed_holder_is_taken_over_after_its_ttl(path):
    context = multiprocessing.get_context("fork")
    taken = context.Event()
    crashed = context.Process(target=take_and_hang, args=(path, "crashing-run", taken))
    crashed.start()
    try:
        assert taken.wait(10)
        os.kill(crashed.pid, signal.SIGKILL)
        crashed.join(10)
        assert crashed.exitcode == -signal.SIGKILL
        lease = LeaseFile(path)
        busy = lease.try_acquire("next-run", 60)
        assert not busy["acquired"] and busy["held_by"] == "crashing-run" and 0 < busy["expires_in"] <= 1
        result = lease.acquire("next-run", 60, "scale_out", wait_timeout=5, poll_interval=0.05)
    finally:
        if crashed.is_alive():
            os.kill(crashed.pid, signal.SIGKILL)
            crashed.join(10)
    assert result["acquired"] and result["held_by"] == "next-run"
    assert result["taken_over"]["holder"] == "crashing-run" and result["taken_over"]["reason"] == "a run that will crash"
    assert result["taken_over"]["expires_at"] <= result["now"] and 0 < result["waited"] < 2


# The scaler state: desired counts and effective settings


def test_release_appends_the_desired_counts_to_the_history_and_keeps_the_settings(lease, path):
    lease.try_acquire("run-a", 60, now=T0)
    settings = [{"service": "resnet18", "min": 2, "max": 8, "target_per_replica": 4.0}]
    lease.release("run-a", now=T0 + 5, desired=[{"service": "resnet18", "replicas": 6}], settings=settings)
    lease.try_acquire("run-b", 60, now=T0 + 10)
    result = lease.release("run-b", now=T0 + 15, desired=[{"service": "resnet18", "replicas": 4}, {"service": "densenet161", "replicas": 1}])
    assert result["history"] == {"resnet18": [[T0 + 5, 6], [T0 + 15, 4]], "densenet161": [[T0 + 15, 1]]}
    assert result["settings"] == {"resnet18": {"min": 2, "max": 8, "target_per_replica": 4.0}}
    assert stored(path)["history"] == {"densenet161": [[T0 + 15, 1]], "resnet18": [[T0 + 5, 6], [T0 + 15, 4]]}
    # Read back by a new reader, as the next run reads it.
    assert _lease.LeaseFile(path).read()["history"]["resnet18"] == [[T0 + 5, 6], [T0 + 15, 4]]


def test_a_release_after_a_takeover_records_no_desired_count(lease, path):
    lease.try_acquire("run-a", 10, now=T0)
    lease.try_acquire("run-b", 10, now=T0 + 20)
    result = lease.release("run-a", now=T0 + 25, desired=[{"service": "resnet18", "replicas": 6}])
    assert not result["released"] and result["history"] == {}


@pytest.mark.parametrize(
    ("entries", "kept"),
    [
        ([[T0 - 4000, 3], [T0 - 100, 5]], [[T0 - 100, 5]]),
        ([[T0 - 3600, 3]], [[T0 - 3600, 3]]),
        ([[T0 - 10, 4], [T0 - 20, 2]], [[T0 - 20, 2], [T0 - 10, 4]]),
        ([[T0 - i, i % 7] for i in range(300)], [[T0 - i, i % 7] for i in reversed(range(200))]),
    ],
    ids=["older-than-an-hour-dropped", "an-hour-old-kept", "sorted-oldest-first", "at-most-200"],
)
def test_the_history_keeps_an_hour_and_200_entries_per_service(entries, kept):
    assert _lease.prune_history(entries, T0) == kept


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        ({"lease": None, "history": {"resnet18": [[T0, -1]]}}, "history['resnet18']: entry"),
        ({"lease": None, "history": {"resnet18": [[T0]]}}, "is not [epoch seconds, replicas]"),
        ({"lease": None, "history": {"resnet18": "6"}}, "history['resnet18']: not a list"),
        ({"lease": None, "history": []}, "'history' is not an object"),
        ({"lease": None, "settings": {"resnet18": 4}}, "'settings' is not an object of objects"),
    ],
)
def test_a_history_or_settings_of_the_wrong_shape_is_named(data, problem):
    assert problem in _lease.data_problem(data)


@pytest.mark.parametrize(
    ("desired", "message"),
    [
        ([{"replicas": 3}], "desired[0] must have a service"),
        ([{"service": "resnet18", "replicas": -1}], "desired[0] (resnet18): replicas -1 is not a whole number"),
        ([{"service": "resnet18", "replicas": 2.5}], "desired[0] (resnet18): replicas 2.5"),
    ],
)
def test_a_bad_desired_count_is_refused_and_nothing_is_written(lease, path, desired, message):
    lease.try_acquire("run-a", 60, now=T0)
    before = content(path)
    with pytest.raises(_lease.LeaseError, match=re.escape(message)):
        lease.release("run-a", now=T0 + 5, desired=desired)
    assert content(path) == before


# Fencing and the heartbeat


class Clock:
    def __init__(self, now):
        self.now = now

    def time(self):
        return self.now


def test_fence_passes_only_the_holder_of_a_live_lease(lease, path):
    with pytest.raises(LeaseError, match=re.escape(f"this run no longer holds the scale lease {path} (nobody holds it), so it stops acting here")):
        _lease.fence(path, "run-a", clock=Clock(T0))
    lease.try_acquire("run-a", 60, "scale_out resnet18", now=T0)
    _lease.fence(path, "run-a", clock=Clock(T0 + 59))
    with pytest.raises(LeaseError, match=re.escape("(it expired 1 s ago)")):
        _lease.fence(path, "run-a", clock=Clock(T0 + 61))
    lease.try_acquire("run-b", 60, "scale_in resnet18", now=T0 + 61)
    with pytest.raises(LeaseError, match=re.escape("(run-b (scale_in resnet18) holds it)")):
        _lease.fence(path, "run-a", clock=Clock(T0 + 62))


def start_stand_in_run():
    """A process standing in for an ansible-playbook run, named as current_run names one."""
    process = subprocess.Popen(["sleep", "60"])
    for _attempt in range(100):
        started = _lease.process_start(process.pid)
        if started is not None:
            return process, {"host": socket.gethostname(), "pid": process.pid, "started": started}
        time.sleep(0.01)
    raise AssertionError("the stand-in run did not start")


def renewer_alive(pid):
    """Whether the renewer process runs (a zombie, left until its new parent reaps it, has ended)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_the_renewer_keeps_the_lease_while_the_run_lives_and_ends_with_it(lease, path):
    process, run = start_stand_in_run()
    try:
        lease.try_acquire("run-a", 0.9, run=run)
        pid = _lease.start_renewer(path, "run-a", 0.9, run)
        assert pid > 0 and pid != os.getpid()
        # Three ttls later the lease is still live: renewed every 0.3 s.
        time.sleep(2.7)
        state = lease.read()
        assert state["lease"]["holder"] == "run-a" and state["lease"]["expires_at"] > time.time(), state
        assert state["lease"]["run"] == run, "a renewal keeps the run that took the lease"
        assert renewer_alive(pid)
    finally:
        process.kill()
        process.wait()
    # The run is gone: the renewer stops within a third of the ttl, and the lease expires within the ttl.
    deadline = time.monotonic() + 3
    while renewer_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not renewer_alive(pid)
    time.sleep(1.0)
    assert lease.read()["lease"]["expires_at"] < time.time()


def test_the_renewer_stops_when_the_lease_is_no_longer_its_own(lease, path):
    process, run = start_stand_in_run()
    try:
        lease.try_acquire("run-a", 0.6, run=run)
        pid = _lease.start_renewer(path, "run-a", 0.6, run)
        lease.release("run-a")
        deadline = time.monotonic() + 3
        while renewer_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not renewer_alive(pid), "a released lease is not renewed"
        assert lease.read()["lease"] is None
    finally:
        process.kill()
        process.wait()


class StepClock:
    """sleep() moves time; the renewer's loop runs without waiting."""

    def __init__(self):
        self.slept = []

    def sleep(self, seconds):
        self.slept.append(seconds)


@pytest.mark.parametrize(
    ("events", "why"),
    [
        ({"ended_after": 3}, "run_ended"),
        ({"taken_after": 2}, "lost"),
        ({"released_after": 1}, "lost"),
    ],
)
def test_why_the_renewer_stops(lease, path, monkeypatch, events, why):
    lease.try_acquire("run-a", 30)
    clock = StepClock()
    calls = {"n": 0}

    def ended(_run):
        calls["n"] += 1
        if calls["n"] == events.get("taken_after"):
            lease.release("run-a")
            lease.try_acquire("run-b", 30)
        if calls["n"] == events.get("released_after"):
            lease.release("run-a")
        return calls["n"] >= events.get("ended_after", 10**9)

    monkeypatch.setattr(_lease, "run_ended", ended)
    assert _lease.renew_while_running(_lease.LeaseFile(path), "run-a", 30, {"host": "h", "pid": 1, "started": 1}, clock=clock) == why
    # Renewed every ttl / 3 (10 s), the run looked at every second.
    assert clock.slept and set(clock.slept) == {1.0}
    assert len(clock.slept) == (3 if why == "run_ended" else 10)


def test_a_renewal_extends_only_the_holders_own_lease_and_never_takes_a_free_one(lease, path):
    assert not lease.renew("run-a", 30, now=T0), "no lease: nothing to renew"
    assert lease.read()["lease"] is None
    lease.try_acquire("run-a", 30, "scale_out resnet18", now=T0)
    assert lease.renew("run-a", 30, now=T0 + 20)
    renewed = lease.read()["lease"]
    assert (renewed["expires_at"], renewed["reason"], renewed["acquired_at"]) == (T0 + 50, "scale_out resnet18", T0)
    lease.release("run-a", now=T0 + 25)
    assert not lease.renew("run-a", 30, now=T0 + 26), "given back: a late renewal must not take it again"
    lease.try_acquire("run-b", 30, now=T0 + 27)
    assert not lease.renew("run-a", 30, now=T0 + 28)
    assert lease.read()["lease"]["holder"] == "run-b"


# Decisions not to act


def quiet(service="resnet18", direction="scale_in", replicas=2, desired=2, until=None):
    return {"service": service, "direction": direction, "replicas": replicas, "desired": desired, "until": until}


def test_a_decision_not_to_act_is_recorded_with_its_time_until_an_action_drops_every_one(lease, path):
    lease.try_acquire("run-a", 60, now=T0)
    result = lease.release("run-a", now=T0 + 5, quiet=[quiet()])
    assert result["quiet"] == {"resnet18:scale_in": {"direction": "scale_in", "replicas": 2, "desired": 2, "until": None, "at": T0 + 5}}
    lease.try_acquire("run-b", 60, now=T0 + 10)
    result = lease.release("run-b", now=T0 + 15, quiet=[quiet("densenet161", "scale_out", 1, 1, T0 + 100)])
    assert sorted(result["quiet"]) == ["densenet161:scale_out", "resnet18:scale_in"], "another service's decision keeps the first"
    assert _lease.LeaseFile(path).read()["quiet"]["densenet161:scale_out"]["until"] == T0 + 100
    # An action of any service may change what both were decided on.
    lease.try_acquire("run-c", 60, now=T0 + 20)
    assert lease.release("run-c", ["resnet18:scale_out"], now=T0 + 25)["quiet"] == {}
    assert stored(path)["quiet"] == {}


def test_a_decision_not_to_act_older_than_an_hour_is_dropped_at_the_next_write(lease, path):
    lease.try_acquire("run-a", 60, now=T0)
    lease.release("run-a", now=T0 + 5, quiet=[quiet()])
    lease.try_acquire("run-b", 60, now=T0 + 3700)
    assert stored(path)["quiet"] == {}


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"direction": "scale_in", "replicas": 2, "desired": 2}, "quiet[0] must have a service"),
        (quiet(direction="sideways"), "quiet[0] (resnet18): direction 'sideways' is not scale_out or scale_in"),
        (quiet(replicas=-1), "quiet[0] (resnet18): replicas -1 is not a whole number of 0 or more"),
        (quiet(desired=None), "desired None is not a whole number"),
        (quiet(until="soon"), "until 'soon' is neither a number nor null"),
    ],
)
def test_a_bad_decision_not_to_act_is_refused_and_nothing_is_written(lease, path, entry, message):
    lease.try_acquire("run-a", 60, now=T0)
    before = content(path)
    with pytest.raises(_lease.LeaseError, match=re.escape(message)):
        lease.release("run-a", now=T0 + 5, quiet=[entry])
    assert content(path) == before


def test_a_quiet_record_of_the_wrong_shape_is_named():
    assert "quiet['resnet18:scale_in']: at None is not a number" in _lease.data_problem({"lease": None, "quiet": {"resnet18:scale_in": quiet()}})
    assert "'quiet' is not an object" in _lease.data_problem({"lease": None, "quiet": []})
