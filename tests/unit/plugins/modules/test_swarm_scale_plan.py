"""swarm_scale_plan's main() in-process against the in-memory swarm of test_swarm_join."""

from __future__ import annotations

import pytest
from test_swarm_join import install, run_module, standard_lab

from ansible_collections.mlfleet.serving.plugins.modules import swarm_scale_plan

NANO_CPUS = 1_000_000_000
SCALE_OUT = dict(action="scale_out", max_replicas=8, max_workers=4, new_worker_cpus=2.0)


def set_cpus(swarm, hostname, cpus):
    swarm.node(hostname)["Description"]["Resources"] = {"NanoCPUs": int(cpus * NANO_CPUS), "MemoryBytes": 4 << 30}


def set_resources(swarm, name, cpus, constraints=(), max_per_node=0):
    template = swarm.service(name)["Spec"]["TaskTemplate"]
    template["Resources"] = {"Limits": {"NanoCPUs": int(cpus * NANO_CPUS)}, "Reservations": {"NanoCPUs": int(cpus * NANO_CPUS)}}
    template["Placement"] = {"Constraints": list(constraints), "MaxReplicas": max_per_node}


@pytest.fixture
def lab(monkeypatch):
    """m1 (drained manager) and m2 (down) with 4 CPUs; workers w1..w3 (VMs 121..123) with 2 CPUs each.

    resnet18 runs 3 replicas of 1 CPU on the workers, one on each; the global telegraf reserves 0.5 CPU on each
    node it runs on.
    """
    lab = standard_lab()
    install(monkeypatch, lab)
    swarm = lab.swarms[0]
    for hostname, cpus in (("m1", 4), ("m2", 4), ("w1", 2), ("w2", 2), ("w3", 2)):
        set_cpus(swarm, hostname, cpus)
    for vmid, hostname in enumerate(("w1", "w2", "w3"), start=121):
        swarm.set_spec(hostname, Labels={"mlfleet.vmid": str(vmid), "mlfleet.pool": "swarm_worker"})
    swarm.add_service("resnet18", replicas=3)
    set_resources(swarm, "resnet18", 1.0, constraints=["node.role==worker"])
    swarm.add_service("telegraf")
    set_resources(swarm, "telegraf", 0.5)
    return lab


def plan(capsys, lab, **args):
    return run_module(capsys, swarm_scale_plan, docker_host=lab.url("m1"), service="resnet18", **args)


def test_scale_out_asks_for_a_vm_when_the_workers_are_full(lab, capsys):
    result = plan(capsys, lab, **SCALE_OUT)
    assert result["rc"] == 0, result.get("msg")
    assert not result["changed"]
    # Each worker: floor((2 - 0.5 telegraf) / 1) = 1 replica of resnet18.
    assert (result["decision"], result["current_replicas"], result["target_replicas"]) == ("vms", 3, 4)
    assert (result["capacity"], result["add_workers"]) == (3, 1)
    assert result["reason"].startswith("resnet18: 3 → 4 replicas needs 1 more worker VM: 3 fit on 3 workers, 1 replica per new worker of 2 CPUs")
    assert result["values"]["worker_pool_size"] == 3 and result["values"]["cpus_per_replica"] == 1.0
    nodes = {n["hostname"]: n for n in result["nodes"]}
    assert [n["hostname"] for n in result["nodes"]] == ["m1", "m2", "w1", "w2", "w3"]
    assert nodes["w1"]["running_tasks"] == {"resnet18": 1, "telegraf": 1} and nodes["m1"]["running_tasks"] == {}
    assert (nodes["w3"]["cpus"], nodes["w3"]["vmid"], nodes["w3"]["pool"]) == (2.0, 123, "swarm_worker")
    assert (nodes["m2"]["status"], nodes["m1"]["availability"]) == ("down", "drain")
    assert lab.writes == [] and lab.all_closed()


def test_scale_out_raises_the_replicas_when_they_fit(lab, capsys):
    swarm = lab.swarms[0]
    for hostname in ("w1", "w2", "w3"):
        set_cpus(swarm, hostname, 4)
    result = plan(capsys, lab, step=2, **SCALE_OUT)
    assert result["rc"] == 0, result.get("msg")
    assert (result["decision"], result["target_replicas"], result["capacity"], result["add_workers"]) == ("replicas", 5, 9, 0)
    assert result["reason"] == "resnet18: 3 → 5 replicas; 9 fit on 3 workers"


def test_check_mode_plans_the_same_and_writes_nothing(lab, capsys):
    normal = plan(capsys, lab, **SCALE_OUT)
    checked = plan(capsys, lab, check_mode=True, **SCALE_OUT)
    assert checked["rc"] == 0 and not checked["changed"]
    assert {k: checked[k] for k in ("decision", "target_replicas", "add_workers", "reason")} == {
        k: normal[k] for k in ("decision", "target_replicas", "add_workers", "reason")
    }
    assert lab.writes == []


def test_a_vm_being_configured_counts_against_max_workers_and_is_joined_not_cloned_again(lab, capsys):
    result = plan(capsys, lab, **{**SCALE_OUT, "worker_pool_size": 4})
    assert result["rc"] == 0, result.get("msg")
    assert (result["decision"], result["target_replicas"], result["add_workers"]) == ("vms", 4, 0)
    assert result["reason"].startswith("resnet18: 3 → 4 replicas once the pool's 1 VM still joining joins: 3 fit on 3 workers")
    assert result["values"]["pending_workers"] == 1


def test_scale_in_lowers_the_replicas_and_picks_the_newest_worker(lab, capsys):
    swarm = lab.swarms[0]
    for hostname in ("w1", "w2", "w3"):
        set_cpus(swarm, hostname, 4)
    result = plan(capsys, lab, action="scale_in", max_replicas=8, max_workers=4)
    assert result["rc"] == 0, result.get("msg")
    assert (result["decision"], result["current_replicas"], result["target_replicas"]) == ("replicas_and_nodes", 3, 2)
    w3 = swarm.node("w3")["ID"]
    assert result["remove_nodes"] == [{"hostname": "w3", "node_id": w3, "vmid": 123}]
    assert "capacity" not in result and lab.writes == []

    protected = plan(capsys, lab, action="scale_in", max_replicas=8, max_workers=4, protected=["123"], vm_step=2)
    assert [n["hostname"] for n in protected["remove_nodes"]] == ["w2", "w1"]


def test_scale_in_keeps_every_worker_that_is_needed(lab, capsys):
    result = plan(capsys, lab, action="scale_in", min_replicas=3, max_replicas=8, max_workers=4)
    assert result["rc"] == 0, result.get("msg")
    assert (result["decision"], result["remove_nodes"]) == ("none", [])
    assert result["reason"].startswith("resnet18: at its minimum of 3 replicas; every worker is needed (without w3: resnet18 1 replica short)")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (dict(service="densenet", **SCALE_OUT), "Cannot plan scale_out of service densenet: Service 'densenet' does not exist in the swarm"),
        (dict(service="telegraf", **SCALE_OUT), "Service 'telegraf' is a global service and has no replica count to scale"),
        (dict(SCALE_OUT, min_replicas=9), "min_replicas (9) is above max_replicas (8); lower min_replicas or raise max_replicas"),
        (dict(action="scale_in", max_replicas=8, max_workers=4, step=-1), "step must be 0 or more, got -1"),
        (dict(action="scale_out", max_replicas=8, max_workers=4), "action is scale_out but all of the following are missing: new_worker_cpus"),
    ],
)
def test_bad_options_fail_naming_the_fix(lab, capsys, args, message):
    args.setdefault("service", "resnet18")
    result = run_module(capsys, swarm_scale_plan, docker_host=lab.url("m1"), **args)
    assert result["rc"] == 1 and message in result["msg"]
    assert lab.writes == []


def test_an_unreadable_constraint_names_the_service(lab, capsys):
    set_resources(lab.swarms[0], "telegraf", 0.5, constraints=["node.ip==192.0.2.10"])
    result = plan(capsys, lab, action="scale_in", max_replicas=8, max_workers=4)
    assert result["rc"] == 1
    assert "Service telegraf: Placement constraint 'node.ip==192.0.2.10' uses node.ip" in result["msg"]


def test_a_worker_endpoint_fails(lab, capsys):
    result = run_module(capsys, swarm_scale_plan, docker_host=lab.url("w1"), service="resnet18", **SCALE_OUT)
    assert result["rc"] == 1
    assert "the endpoint must be a manager" in result["msg"] and "unix:///run/fake/w1.sock" in result["msg"]
