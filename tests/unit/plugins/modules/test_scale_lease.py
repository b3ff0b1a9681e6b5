"""scale_lease's main() in-process: taking, renewing and giving back the lease, waiting, check mode and errors.

The lease file's own behaviour, and processes racing for it, are tested in tests/unit/plugins/module_utils/test_lease.py.
"""

from __future__ import annotations

import json
import os
import re
import socket
import time

import pytest
from ansible.module_utils import _internal as module_utils_internal
from ansible.module_utils.common import warnings as module_warnings
from test_swarm_join import run_module

from ansible_collections.mlfleet.serving.plugins.module_utils._lease import LeaseFile
from ansible_collections.mlfleet.serving.plugins.modules import scale_lease


@pytest.fixture(autouse=True)
def own_warnings(monkeypatch):
    # Module warnings are process-wide, and go to the display once controller code was imported by other tests.
    monkeypatch.setattr(module_utils_internal, "is_controller", False)
    monkeypatch.setattr(module_warnings, "_global_warnings", {})


@pytest.fixture
def path(tmp_path):
    return str(tmp_path / "scale.lease")


@pytest.fixture
def lease(capsys, path):
    def invoke(check_mode=False, **args):
        return run_module(capsys, scale_lease, check_mode=check_mode, path=path, **args)

    return invoke


def stored(path):
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def content(path):
    with open(path, "rb") as handle:
        return handle.read()


def test_acquire_with_a_fresh_holder_id(lease, path):
    started = time.time()
    result = lease(reason="scale_out of resnet18")
    assert result["rc"] == 0, result.get("msg")
    assert result["changed"] and result["acquired"] and not result["renewed"] and result["taken_over"] is None
    assert re.fullmatch(rf"{re.escape(socket.gethostname())}:{os.getpid()}:[0-9a-f]{{16}}", result["holder"])
    assert result["held_by"] == result["holder"] and result["held_reason"] == "scale_out of resnet18"
    assert started <= result["now"] <= time.time() and result["expires_at"] == result["now"] + 900 and result["expires_in"] == 900
    assert result["last_actions"] == {} and result["waited"] == 0 and not result.get("warnings")
    assert stored(path)["lease"]["holder"] == result["holder"]


def test_a_busy_lease_is_reported_without_a_change(lease, path):
    first = lease(reason="scale_out of resnet18", ttl=120)
    before = content(path)
    second = lease(reason="scale_in of resnet18")
    assert second["rc"] == 0 and not second["changed"] and not second["acquired"]
    assert second["holder"] != first["holder"] and second["held_by"] == first["holder"]
    assert second["held_reason"] == "scale_out of resnet18" and second["expires_at"] == first["expires_at"] and 0 < second["expires_in"] <= 120
    assert not second.get("warnings") and content(path) == before


def test_fail_when_busy_names_the_holder_and_the_way_out(lease, path):
    first = lease(reason="scale_out of resnet18", ttl=120)
    result = lease(fail_when_busy=True)
    assert result["rc"] == 1 and result["failed"] and not result["changed"] and not result["acquired"]
    message = result["msg"]
    assert f"the scale lease {path} is held by {first['holder']} (scale_out of resnet18)" in message
    assert "raise wait_timeout" in message and f"state=released and holder={first['holder']}" in message
    assert result["held_by"] == first["holder"] and result["expires_in"] > 0


def test_fail_when_busy_names_the_playbook_process_that_holds_it(lease, path, monkeypatch):
    run = {"host": "control", "pid": 4242, "started": 100}
    LeaseFile(path).try_acquire("control:4242:00ff", 120, "site.yml of lab", run=run)
    monkeypatch.setattr(scale_lease, "current_run", lambda: {"host": "control", "pid": 5151, "started": 200})
    result = lease(fail_when_busy=True)
    assert "held by control:4242:00ff (site.yml of lab, ansible-playbook PID 4242 on control)" in result["msg"]
    assert result["held_run"] == run and result["held_by"] == "control:4242:00ff"


def test_a_fresh_holder_names_the_playbook_process_and_the_lease_records_it(lease, path, monkeypatch):
    monkeypatch.setattr(scale_lease, "current_run", lambda: {"host": "control", "pid": 5151, "started": 200})
    result = lease(reason="site.yml of lab")
    assert re.fullmatch(rf"{re.escape(socket.gethostname())}:5151:[0-9a-f]{{16}}", result["holder"])
    assert stored(path)["lease"]["run"] == {"host": "control", "pid": 5151, "started": 200}


def test_acquiring_again_with_the_holder_renews(lease, path):
    first = lease(reason="scale_out", ttl=60)
    renewed = lease(holder=first["holder"], ttl=600)
    assert renewed["rc"] == 0 and renewed["changed"] and renewed["acquired"] and renewed["renewed"]
    assert renewed["held_reason"] == "scale_out" and renewed["expires_at"] == renewed["now"] + 600 and renewed["expires_at"] > first["expires_at"]


def test_release_records_acted_and_a_second_release_changes_nothing(lease, path):
    taken = lease(reason="scale_out of resnet18")
    released = lease(state="released", holder=taken["holder"], acted=["resnet18:scale_out", "resnet18:scale_replicas"])
    assert released["rc"] == 0 and released["changed"] and released["released"] and released["held_by"] is None
    assert released["last_actions"] == {"resnet18:scale_out": released["now"], "resnet18:scale_replicas": released["now"]}
    assert stored(path)["lease"] is None

    again = lease(state="released", holder=taken["holder"], acted=["resnet18:scale_out"])
    assert again["rc"] == 0 and not again["changed"] and not again["released"] and not again.get("warnings")
    assert again["last_actions"] == released["last_actions"]

    later = lease()
    assert later["acquired"] and later["last_actions"] == released["last_actions"]
    assert later["now"] - later["last_actions"]["resnet18:scale_out"] >= 0


def test_release_records_a_floor_that_later_calls_return_until_it_ends(lease, path):
    taken = lease(reason="scale_out of resnet18 from schedule")
    until = taken["now"] + 3600
    released = lease(state="released", holder=taken["holder"], floors=[{"service": "resnet18", "replicas": 4, "until": until, "reason": "schedule peak"}])
    assert released["rc"] == 0 and released["released"]
    assert released["floors"] == {"resnet18": {"replicas": 4, "until": until, "reason": "schedule peak"}}
    later = lease()
    assert later["acquired"] and later["floors"]["resnet18"]["replicas"] == 4
    assert stored(path)["floors"] == {"resnet18": [{"replicas": 4, "until": until, "reason": "schedule peak"}]}


def test_release_records_the_bounds_the_run_kept(lease, path):
    taken = lease(reason="scale_out of resnet18 from serving_pressure")
    released = lease(state="released", holder=taken["holder"], bounds=[{"service": "resnet18", "min": 2, "max": 6}])
    assert released["rc"] == 0 and released["released"]
    assert released["bounds"]["resnet18"]["max"] == 6 and released["bounds"]["resnet18"]["at"] == released["now"]
    assert stored(path)["bounds"] == released["bounds"]


def test_release_records_a_decision_not_to_act_without_an_until(lease, path):
    taken = lease(reason="scale_in of densenet161 from serving_pressure")
    entry = {"service": "densenet161", "direction": "scale_in", "replicas": 1, "desired": 1}
    released = lease(state="released", holder=taken["holder"], quiet=[entry])
    assert released["rc"] == 0 and released["released"]
    assert released["quiet"] == {"densenet161:scale_in": {"direction": "scale_in", "replicas": 1, "desired": 1, "until": None, "at": released["now"]}}
    assert stored(path)["quiet"] == released["quiet"]


def test_release_by_another_holder_frees_nothing(lease, path):
    taken = lease(reason="scale_in of densenet161")
    result = lease(state="released", holder="someone-else", acted=["densenet161:scale_in"])
    assert result["rc"] == 0 and not result["changed"] and not result["released"] and not result.get("warnings")
    assert result["held_by"] == taken["holder"] and result["last_actions"] == {}
    assert stored(path)["lease"]["holder"] == taken["holder"]


def test_an_expired_lease_is_taken_over(lease, path):
    LeaseFile(path).try_acquire("crashed-run", 60, "scale_out of resnet18", now=time.time() - 120)
    result = lease(reason="scale_in of resnet18")
    assert result["rc"] == 0 and result["changed"] and result["acquired"]
    assert result["taken_over"]["holder"] == "crashed-run" and result["taken_over"]["reason"] == "scale_out of resnet18"
    assert result["taken_over"]["expires_at"] < result["now"]


def test_waiting_for_a_lease_that_expires(lease, path):
    LeaseFile(path).try_acquire("slow-run", 1, "scale_out", now=time.time() - 0.7)
    result = lease(wait_timeout=5, poll_interval=0.05)
    assert result["rc"] == 0 and result["acquired"] and result["taken_over"]["holder"] == "slow-run"
    assert 0.1 < result["waited"] < 2


def test_waiting_gives_up_after_wait_timeout(lease, path):
    LeaseFile(path).try_acquire("long-run", 600, "teardown")
    result = lease(wait_timeout=1, poll_interval=0.2)
    assert result["rc"] == 0 and not result["acquired"] and not result["changed"] and result["held_by"] == "long-run"
    assert 1 <= result["waited"] < 2


def test_check_mode_acquire_writes_nothing(lease, tmp_path):
    result = lease(check_mode=True, reason="scale_out", wait_timeout=30)
    assert result["rc"] == 0 and result["changed"] and result["acquired"] and result["held_by"] == result["holder"]
    assert os.listdir(tmp_path) == []


def test_check_mode_release_writes_nothing(lease, path):
    taken = lease()
    before = content(path)
    result = lease(check_mode=True, state="released", holder=taken["holder"], acted=["resnet18:scale_out"])
    assert result["rc"] == 0 and result["changed"] and result["released"] and result["last_actions"] == {"resnet18:scale_out": result["now"]}
    assert content(path) == before


def test_check_mode_does_not_wait(lease, path):
    LeaseFile(path).try_acquire("long-run", 600, "teardown")
    started = time.monotonic()
    result = lease(check_mode=True, wait_timeout=60)
    assert result["rc"] == 0 and not result["changed"] and not result["acquired"] and result["held_by"] == "long-run"
    assert time.monotonic() - started < 5


def test_a_missing_directory_is_named(capsys, tmp_path):
    missing = tmp_path / "state"
    result = run_module(capsys, scale_lease, path=str(missing / "scale.lease"))
    assert result["rc"] == 1 and f"the directory {missing} of the lease file {missing / 'scale.lease'} does not exist" in result["msg"]
    assert not missing.exists()


def test_a_corrupt_file_fails_and_is_kept(lease, path):
    with open(path, "w", encoding="utf-8") as handle:
        handle.write('{"lease": {"holder": "run-a"')
    for args in ({}, {"state": "released", "holder": "run-a"}):
        result = lease(**args)
        assert result["rc"] == 1 and f"the lease file {path} is corrupt" in result["msg"]
        assert "When no scale playbook runs, delete it" in result["msg"]
    assert content(path) == b'{"lease": {"holder": "run-a"'


@pytest.mark.parametrize(
    "args, message",
    [
        ({"state": "released"}, "state is released but all of the following are missing: holder"),
        ({"acted": ["resnet18:scale_out"]}, "acted is recorded when the lease is given back: pass it with state=released"),
        ({"floors": [{"service": "resnet18", "replicas": 4, "until": 1.0}]}, "floors is recorded when the lease is given back"),
        ({"state": "released", "holder": "run-a", "floors": [{"service": "resnet18", "until": 1.0}]}, "missing required arguments: replicas"),
        ({"bounds": [{"service": "resnet18", "min": 2, "max": 6}]}, "bounds is recorded when the lease is given back"),
        ({"state": "released", "holder": "run-a", "bounds": [{"service": "resnet18", "min": 2}]}, "missing required arguments: max"),
        ({"quiet": [{"service": "resnet18", "direction": "scale_in", "replicas": 2, "desired": 2}]}, "quiet is recorded when the lease is given back"),
        (
            {"state": "released", "holder": "run-a", "quiet": [{"service": "resnet18", "direction": "up", "replicas": 2, "desired": 2}]},
            "value of direction must be one of: scale_out, scale_in, got: up",
        ),
        ({"ttl": 0}, "ttl must be a positive number of seconds, got 0"),
        ({"wait_timeout": -1}, "wait_timeout must be 0 or a positive number of seconds, got -1"),
        ({"poll_interval": 0}, "poll_interval must be at least 0.01 seconds"),
        ({"holder": ""}, "holder must be a non-empty string"),
        ({"state": "released", "holder": "run-a", "acted": ["", "resnet18:scale_out"]}, "every entry of acted must be a non-empty string"),
    ],
)
def test_bad_arguments(lease, tmp_path, args, message):
    result = lease(**args)
    assert result["rc"] == 1 and message in result["msg"]
    assert os.listdir(tmp_path) == []
