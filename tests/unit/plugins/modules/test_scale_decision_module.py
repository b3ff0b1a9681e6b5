"""scale_decision's main() in-process against the in-memory swarm of test_swarm_join: the whole plan of one run."""

from __future__ import annotations

import time

import test_swarm_scale_plan
from test_swarm_join import run_module

from ansible_collections.mlfleet.serving.plugins.modules import scale_decision

POOLS = [{"name": "cpu", "tag": "swarm_worker", "count": 2, "max_count": 6, "cores": 2, "memory": 4096}]
SERVING = [{"service": "resnet18"}, {"service": "densenet161"}]
MEMBERS = {"121": ["mlfleet", "swarm_worker"], "122": ["mlfleet", "swarm_worker"], "123": ["mlfleet", "swarm_worker"]}
# The fixture of test_swarm_scale_plan: workers w1..w3 (VMs 121..123) of 2 CPUs, resnet18 at 3 replicas of 1 CPU, telegraf.
lab = test_swarm_scale_plan.lab
QUICK = {"cooldown": {"scale_out": 0, "scale_in": 0, "scale_in_after_scale_out": 0}, "stabilization": {"scale_in": 0}}


def decide(capsys, lab, **args):
    defaults = dict(
        docker_host=lab.url("m1"),
        action="scale_out",
        serving=SERVING,
        autoscale=QUICK,
        worker_pools=POOLS,
        template="golden",
        cluster="mlfleet",
        state={},
        pool_members=MEMBERS,
    )
    return run_module(capsys, scale_decision, **(defaults | args))


def test_a_burst_grows_the_pool_for_the_replicas_its_demand_asks_for(lab, capsys):
    event = {"source": "serving_pressure", "service": "resnet18", "received_at": time.time(), "values": {"backlog": 20, "inflight": 12, "queued": 8}}
    result = decide(capsys, lab, event=event, autoscale=QUICK | {"workers": {"step": 2}, "replicas": {"target_per_replica": 4}})
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


def test_the_plan_names_the_pool_a_scale_out_clones_with(lab, capsys):
    event = {"source": "serving_pressure", "service": "resnet18", "received_at": time.time(), "values": {"backlog": 20}}
    result = decide(capsys, lab, event=event)
    assert result["rc"] == 0, result.get("msg")
    assert result["pool"] == {
        "name": "cpu",
        "tag": "swarm_worker",
        "template": "golden",
        "count": 2,
        "max_count": 6,
        "cores": 2,
        "memory": 4096,
        "cpulimit": None,
        "ip_range": None,
        "name_prefix": "mlfleet-cpu",
        "warm_vms": 0,
        "warm_form": "joined",
        "warm_tag": "swarm_worker_warm",
        "pci_mapping": None,
        "vmids": [121, 122, 123],
        "warm_vmids": [],
        "services": ["densenet161", "resnet18"],
    }
    assert result["grow_to"] == 4, result["reason"]
    assert (result["warm_take"], result["clone_vms"], result["audit_fields"]["vms_cloned"]) == (0, 1, 1)


def test_a_scale_out_takes_the_pools_warm_vm_and_says_so(lab, capsys):
    event = {"source": "serving_pressure", "service": "resnet18", "received_at": time.time(), "values": {"backlog": 20}}
    pools = [dict(POOLS[0], warm_vms=1)]
    # Another pool's warm VM, or a VM of this pool, is no warm VM of this pool.
    warm = dict(MEMBERS, **{"131": ["swarm_worker_warm", "mlfleet"], "141": ["gpu_worker_warm"]})
    result = decide(capsys, lab, event=event, worker_pools=pools, warm_members=warm)
    assert result["rc"] == 0, result.get("msg")
    assert (result["grow_to"], result["warm_vmids"], result["warm_take"], result["clone_vms"], result["warm_refill_to"]) == (4, [131], 1, 0, 1)
    assert (result["audit_fields"]["warm_taken"], result["audit_fields"]["vms_cloned"]) == (1, 0)
    assert result["reason"].endswith("capacity from 1 warm VM (joined)")


def test_a_service_on_another_pool_sees_neither_its_workers_nor_its_vms(lab, capsys):
    # resnet18 runs on the workers of pool cpu (label mlfleet.pool=swarm_worker); densenet161 on pool gpu, which has no
    # worker yet: its scale-out clones a VM of pool gpu and counts no worker of pool cpu as room.
    pools = [*POOLS, {"name": "gpu", "tag": "gpu_worker", "count": 0, "max_count": 2, "cores": 8, "memory": 16384, "template": 9001}]
    serving = [{"service": "resnet18", "pool": "cpu"}, {"service": "densenet161", "pool": "gpu"}]
    lab.swarms[0].add_service("densenet161", replicas=0)
    test_swarm_scale_plan.set_resources(lab.swarms[0], "densenet161", 1.0, constraints=["node.role==worker", "node.labels.mlfleet.pool==gpu_worker"])
    result = decide(capsys, lab, service="densenet161", worker_pools=pools, serving=serving)
    assert result["rc"] == 0, result.get("msg")
    assert (result["pool"]["name"], result["pool"]["vmids"], result["pool"]["template"]) == ("gpu", [], 9001)
    assert (result["active_vmids"], result["grow_to"]) == ([], 1), result["reason"]
    scale_in = decide(capsys, lab, action="scale_in", service="densenet161", worker_pools=pools, serving=serving)
    assert scale_in["rc"] == 0, scale_in.get("msg")
    assert (scale_in["leave_vmids"], scale_in["orphan_vmids"]) == ([], [])


def test_the_deprecated_mlfleet_workers_still_scales_and_warns(lab, capsys):
    legacy = {"count": 2, "max_count": 6, "cores": 2, "memory": 4096}
    result = decide(
        capsys, lab, action="scale_in", service="resnet18", worker_pools=None, workers=legacy, autoscale=QUICK | {"services": {"resnet18": {"min": 2}}}
    )
    assert result["rc"] == 0, result.get("msg")
    assert (result["pool"]["name"], result["pool"]["name_prefix"], result["leave_vmids"]) == ("workers", "mlfleet-worker", [123])
    # ansible-core 2.19 and later wrap each deprecation's message as an event.
    assert [(d.get("event") or d)["msg"] for d in result["deprecations"]] == [
        "mlfleet_workers is deprecated: define the pool in mlfleet_worker_pools instead, as [{name: workers, tag: swarm_worker, count: 2, "
        "max_count: 6, cores: 2, memory: 4096}] (the same VMs, names and tag); mlfleet_workers will be removed in mlfleet.serving 2.0.0"
    ]


def test_a_service_that_names_an_unknown_pool_fails_naming_it(lab, capsys):
    result = decide(capsys, lab, service="resnet18", serving=[{"service": "resnet18", "pool": "gpu"}])
    assert result["failed"]
    assert result["msg"] == "Cannot scale: mlfleet_serving service resnet18 names pool 'gpu', which mlfleet_worker_pools does not define (cpu)"
