"""scale_decision's main() in-process against the in-memory swarm of test_swarm_join: the whole plan of one run."""

from __future__ import annotations

import time

import test_swarm_scale_plan
from test_swarm_join import run_module

from ansible_collections.mlfleet.serving.plugins.modules import scale_decision

WORKERS = {"min": 2, "max": 6, "cores": 2}
# The fixture of test_swarm_scale_plan: workers w1..w3 (VMs 121..123) of 2 CPUs, resnet18 at 3 replicas of 1 CPU, telegraf.
lab = test_swarm_scale_plan.lab
QUICK = {"cooldown": {"scale_out": 0, "scale_in": 0, "scale_in_after_scale_out": 0}, "stabilization": {"scale_in": 0}}


def decide(capsys, lab, **args):
    defaults = dict(
        docker_host=lab.url("m1"),
        action="scale_out",
        services=["resnet18", "densenet161"],
        autoscale=QUICK,
        workers=WORKERS,
        state={},
        pool_vmids=[121, 122, 123],
    )
    return run_module(capsys, scale_decision, **(defaults | args))


def test_a_burst_grows_the_pool_for_the_replicas_its_demand_asks_for(lab, capsys):
    event = {"source": "serving_pressure", "service": "resnet18", "received_at": time.time(), "values": {"backlog": 20, "inflight": 12, "queued": 8}}
    result = decide(capsys, lab, event=event, autoscale=QUICK | {"workers": {"step": 2}})
    assert result["rc"] == 0, result.get("msg")
    assert not result["changed"]
    # 20 in flight and queued at 4 per replica: 5; each worker holds 1 (2 CPUs less telegraf's 0.5), so 2 more VMs.
    assert (result["decision"], result["service"], result["current_replicas"], result["desired_replicas"], result["target_replicas"]) == (
        "act",
        "resnet18",
        3,
        5,
        5,
    )
    assert (result["grow_to"], result["change_replicas"]) == (5, False), result["reason"]
    assert result["records"]["desired"] == [{"service": "resnet18", "replicas": 5}]
    assert "20 requests in flight and queued need 5 replicas at 4 each" in result["reason"]


def test_a_scale_in_names_exactly_the_vm_that_goes(lab, capsys):
    result = decide(capsys, lab, action="scale_in", service="resnet18", autoscale=QUICK | {"services": {"resnet18": {"min": 2}}})
    assert result["rc"] == 0, result.get("msg")
    assert (result["target_replicas"], result["leave_vmids"], result["orphan_vmids"]) == (2, [123], [])


def test_the_stabilization_window_reads_the_state_the_lease_returned(lab, capsys):
    state = {"history": {"resnet18": [[time.time() - 30, 3]]}, "last_actions": {}, "floors": {}}
    result = decide(capsys, lab, action="scale_in", service="resnet18", state=state, autoscale=QUICK | {"stabilization": {"scale_in": 300}})
    assert result["rc"] == 0, result.get("msg")
    assert (result["decision"], result["target_replicas"], result["leave_vmids"]) == ("none", 3, [])
    assert "the highest count desired in the last 300 s is 3 (stabilization)" in result["reason"]


def test_bad_settings_fail_before_the_swarm_is_read(lab, capsys):
    result = decide(capsys, lab, docker_host="ssh://nobody@192.0.2.1", service="resnet18", autoscale={"replicas": {"target_per_replica": 0}})
    assert result["failed"]
    assert result["msg"] == (
        "Cannot scale: mlfleet_autoscale.replicas.target_per_replica must be above 0, got 0; give the requests in flight and queued one replica is sized for"
    )


def test_an_unknown_service_fails_naming_the_services(lab, capsys):
    result = decide(capsys, lab, service="vgg16")
    assert result["failed"] and "scale_service must be one of the services in mlfleet_serving (resnet18, densenet161), got 'vgg16'" in result["msg"]
