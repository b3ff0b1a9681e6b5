"""swarm_replicas' main() in-process against the in-memory swarm of test_swarm_join."""

from __future__ import annotations

import pytest
from test_swarm_join import Engine, api_error, install, run_module, standard_lab, wire

from ansible_collections.mlfleet.serving.plugins.modules import swarm_replicas

NO_ROOM = "no suitable node (insufficient resources on 2 nodes)"


@pytest.fixture
def lab():
    """standard_lab's swarm with resnet18 at 2 replicas (on w1 and w2) and the global telegraf."""
    lab = standard_lab()
    swarm = lab.swarms[0]
    swarm.add_service("resnet18", replicas=2)
    swarm.add_service("telegraf")
    return lab


@pytest.fixture
def clock(monkeypatch, lab):
    return install(monkeypatch, lab, swarm_replicas)


@pytest.fixture
def sent_versions(monkeypatch):
    """(service, version) of every update_service call, as the module sent them."""
    sent = []
    update = Engine.update_service

    def spy(self, service, version, *args, **kwargs):
        sent.append((service, version))
        return update(self, service, version, *args, **kwargs)

    monkeypatch.setattr(Engine, "update_service", spy)
    return sent


def scale(capsys, lab, replicas, name="resnet18", **args):
    return run_module(capsys, swarm_replicas, docker_host=lab.url("m1"), name=name, replicas=replicas, **args)


def running_per_node(swarm, name):
    service = swarm.service(name)
    counts = {}
    for task in swarm.tasks:
        if task["ServiceID"] == service["ID"] and task["DesiredState"] == "running" and task["Status"]["State"] == "running":
            host = swarm.nodes[task["NodeID"]]["Description"]["Hostname"]
            counts[host] = counts.get(host, 0) + 1
    return counts


def test_sets_only_the_replicas_and_waits_until_they_run(lab, clock, capsys, sent_versions):
    swarm = lab.swarms[0]
    before = wire(swarm.service("resnet18"))
    result = scale(capsys, lab, 4, diff=True)
    assert result["rc"] == 0, result.get("msg")
    assert result["changed"] and (result["previous_replicas"], result["replicas"]) == (2, 4)
    assert lab.writes == [("update_service", "resnet18", 4, {})]
    assert sent_versions == [(before["ID"], before["Version"]["Index"])]
    after = swarm.service("resnet18")
    assert after["Spec"]["Mode"] == {"Replicated": {"Replicas": 4}}
    assert {k: v for k, v in after["Spec"].items() if k != "Mode"} == {k: v for k, v in before["Spec"].items() if k != "Mode"}
    assert swarm.restarts == [], "the task template went back unchanged"
    assert result["running_tasks"] == 4 and result["nodes"] == running_per_node(swarm, "resnet18")
    assert sum(result["nodes"].values()) == 4 and set(result["nodes"]) == {"w1", "w2", "w3"}
    assert result["diff"] == {"before": {"replicas": 2}, "after": {"replicas": 4}}
    assert clock.sleeps == [0.5], "the same tasks ran at two polls in a row"
    assert lab.all_closed()


def test_the_same_count_changes_nothing_but_still_waits(lab, clock, capsys):
    result = scale(capsys, lab, 2)
    assert result["rc"] == 0, result.get("msg")
    assert not result["changed"] and result["previous_replicas"] == result["replicas"] == 2
    assert lab.writes == []
    assert result["running_tasks"] == 2 and result["nodes"] == {"w1": 1, "w2": 1}
    assert clock.sleeps == [0.5]


def test_scaling_down_waits_for_the_lower_count(lab, clock, capsys):
    result = scale(capsys, lab, 1)
    assert result["rc"] == 0, result.get("msg")
    assert lab.writes == [("update_service", "resnet18", 1, {})]
    assert result["running_tasks"] == 1 and sum(result["nodes"].values()) == 1


def test_scaling_to_zero(lab, clock, capsys):
    result = scale(capsys, lab, 0)
    assert result["rc"] == 0, result.get("msg")
    assert (result["running_tasks"], result["nodes"]) == (0, {})
    assert lab.swarms[0].service("resnet18")["Spec"]["Mode"] == {"Replicated": {"Replicas": 0}}


def test_check_mode_reports_the_change_and_writes_nothing(lab, clock, capsys):
    result = scale(capsys, lab, 5, check_mode=True, diff=True)
    assert result["rc"] == 0, result.get("msg")
    assert result["changed"] and (result["previous_replicas"], result["replicas"]) == (2, 5)
    assert result["running_tasks"] == 2, "what runs now"
    assert result["diff"] == {"before": {"replicas": 2}, "after": {"replicas": 5}}
    assert lab.writes == [] and clock.sleeps == []


def test_without_wait_it_returns_at_once(lab, clock, capsys):
    result = scale(capsys, lab, 3, wait=False)
    assert result["rc"] == 0 and result["changed"]
    assert lab.writes == [("update_service", "resnet18", 3, {})] and clock.sleeps == []


def test_a_version_conflict_is_read_again_and_retried(lab, clock, capsys, sent_versions, monkeypatch):
    swarm = lab.swarms[0]
    update = Engine.update_service
    conflicts = [True]

    def concurrent_writer(self, service, version, *args, **kwargs):
        if conflicts.pop() if conflicts else False:
            # Another client updated the service (its labels) between the module's read and its write.
            swarm.service("resnet18")["Version"]["Index"] = lab.next_index()
        return update(self, service, version, *args, **kwargs)

    monkeypatch.setattr(Engine, "update_service", concurrent_writer)
    result = scale(capsys, lab, 4)
    assert result["rc"] == 0, result.get("msg")
    assert lab.writes == [("update_service", "resnet18", 4, {}), ("update_service", "resnet18", 4, {})]
    assert swarm.service("resnet18")["Spec"]["Mode"] == {"Replicated": {"Replicas": 4}}


def test_a_count_changed_by_another_writer_is_set_again(lab, clock, capsys, monkeypatch):
    swarm = lab.swarms[0]
    update = Engine.update_service
    calls = []

    def racing_autoscaler(self, service, version, *args, **kwargs):
        calls.append(kwargs["mode"])
        result = update(self, service, version, *args, **kwargs)
        if len(calls) == 1:
            # Someone scaled the service to 3 right after the module's update.
            record = swarm.service("resnet18")
            record["Spec"]["Mode"] = {"Replicated": {"Replicas": 3}}
            record["Version"]["Index"] = lab.next_index()
            swarm.reconcile()
        return result

    monkeypatch.setattr(Engine, "update_service", racing_autoscaler)
    result = scale(capsys, lab, 4)
    assert result["rc"] == 0, result.get("msg")
    assert calls == [{"Replicated": {"Replicas": 4}}, {"Replicated": {"Replicas": 4}}]
    assert result["running_tasks"] == 4


def test_a_timeout_names_why_the_tasks_wait(lab, clock, capsys):
    swarm = lab.swarms[0]
    start_tasks = swarm.start_tasks
    resnet = swarm.service("resnet18")

    def only_three_fit():
        """Like a swarm whose nodes have room for 3 replicas: the 4th stays unassigned with the scheduler's reason."""
        live = [t for t in swarm.tasks if t["ServiceID"] == resnet["ID"] and t["DesiredState"] == "running"]
        for task in sorted(live, key=lambda t: t["Seq"])[3:]:
            task["NodeID"] = ""
            task["Status"] = {"State": "pending", "Err": NO_ROOM}
        start_tasks()

    swarm.start_tasks = only_three_fit
    result = scale(capsys, lab, 4, wait_timeout=5)
    assert result["rc"] == 1
    assert result["msg"].startswith(f"Service resnet18: 3 of 4 replicas running after 5 s (1 × pending: {NO_ROOM}). ")
    assert "add worker nodes" in result["msg"]
    assert lab.writes == [("update_service", "resnet18", 4, {})], "the count was set; only the wait failed"
    assert sum(clock.sleeps) >= 5 and len(clock.sleeps) <= 11
    assert lab.all_closed()


def test_a_global_service_is_refused(lab, clock, capsys):
    result = scale(capsys, lab, 3, name="telegraf")
    assert result["rc"] == 1
    assert result["msg"] == "Service telegraf runs in Global mode and has no replica count; set replicas only on a replicated service"
    assert lab.writes == []


def test_a_missing_service_is_refused(lab, clock, capsys):
    result = scale(capsys, lab, 3, name="resnet")
    assert result["rc"] == 1
    assert "Service resnet does not exist in the swarm managed at unix:///run/fake/m1.sock" in result["msg"]
    assert "create it with swarm_service" in result["msg"] and lab.writes == []


def test_a_negative_count_is_refused(lab, clock, capsys):
    result = scale(capsys, lab, -1)
    assert result["rc"] == 1 and result["msg"].startswith("replicas must be 0 or more, got -1")
    assert lab.writes == []


def test_an_update_the_manager_rejects_fails_with_its_reason(lab, clock, capsys, monkeypatch):
    def rejected(self, service, version, *args, **kwargs):
        raise api_error("rpc error: code = InvalidArgument desc = replicas must not exceed 1000")

    monkeypatch.setattr(Engine, "update_service", rejected)
    result = scale(capsys, lab, 4)
    assert result["rc"] == 1
    reason = "rpc error: code = InvalidArgument desc = replicas must not exceed 1000"
    assert result["msg"] == f"Updating service resnet18 failed at unix:///run/fake/m1.sock: {reason}"


def test_a_run_that_lost_the_scale_lease_changes_nothing(lab, clock, capsys, tmp_path):
    from ansible_collections.mlfleet.serving.plugins.module_utils._lease import LeaseFile

    path = str(tmp_path / "autoscale.lease")
    lease = LeaseFile(path)
    lease.try_acquire("run-a", 60)
    held = scale(capsys, lab, 3, lease={"path": path, "holder": "run-a"})
    assert held["rc"] == 0 and held["changed"], held.get("msg")
    # run-a stalled, its lease expired and run-b took it over: run-a must not act beside it.
    lease.release("run-a")
    lease.try_acquire("run-b", 60, "scale_in resnet18 from serving_pressure")
    lost = scale(capsys, lab, 5, lease={"path": path, "holder": "run-a"})
    assert lost["failed"] and lost["lease_lost"]
    assert lost["msg"].startswith(f"this run no longer holds the scale lease {path} (run-b (scale_in resnet18 from serving_pressure) holds it)")
    assert lab.writes == [("update_service", "resnet18", 3, {})], "nothing written after the lease was lost"
    # Check mode acts on nothing and is not fenced.
    assert scale(capsys, lab, 5, lease={"path": path, "holder": "run-a"}, _ansible_check_mode=True)["rc"] == 0
