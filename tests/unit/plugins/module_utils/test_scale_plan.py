"""The scale planner, table by table: eligibility, capacity, scale-out and scale-in decisions, bad bounds."""

from __future__ import annotations

import pytest

from ansible_collections.mlfleet.serving.plugins.module_utils._scale_plan import (
    UNBOUNDED,
    capacity,
    eligible,
    normalise,
    pack,
    plan_scale_in,
    plan_scale_out,
)

WORKERS = ("node.role==worker",)
MODEL_STORE = ("node.role==worker", "node.labels.mlfleet.model-store==true")


def node(hostname, cpus=2.0, role="worker", vmid=None, labels=None, status="ready", availability="active"):
    labels = dict(labels or {})
    if vmid is not None:
        labels["mlfleet.vmid"] = str(vmid)
    return {
        "node_id": f"id-{hostname}",
        "hostname": hostname,
        "role": role,
        "availability": availability,
        "status": status,
        "cpus": cpus,
        "labels": labels,
        "platform": {"os": "linux", "arch": "x86_64"},
        "vmid": vmid,
        "pool": None,
    }


def service(replicas=1, cpus=1.0, constraints=WORKERS, max_per_node=0):
    mode = "global" if replicas is None else "replicated"
    return {"replicas": replicas, "cpus": cpus, "constraints": list(constraints), "max_per_node": max_per_node, "mode": mode}


def tasks_on(layout):
    """{hostname: [service, ...]} → the planner's task list."""
    return [{"service": name, "node_id": f"id-{host}", "state": "running"} for host, names in layout.items() for name in names]


def lab(worker_cpus=(2.0, 2.0), manager=True):
    """A drained manager and workers w1, w2, … with VM ids 121, 122, …"""
    nodes = [node(f"w{i}", cpus, vmid=120 + i) for i, cpus in enumerate(worker_cpus, start=1)]
    if manager:
        nodes.insert(0, node("m1", 4.0, role="manager", vmid=100, availability="drain"))
    return nodes


# eligible


@pytest.mark.parametrize(
    ("constraint", "expected"),
    [
        ("node.role==worker", True),
        ("node.role!=worker", False),
        ("node.role == WORKER", True),
        ("node.hostname==w1", True),
        ("node.hostname!=w1", False),
        ("node.id==id-w1", True),
        ("node.labels.mlfleet.model-store==true", True),
        ("node.labels.mlfleet.model-store==True", True),
        ("node.labels.mlfleet.model-store!=true", False),
        ("NODE.LABELS.mlfleet.model-store==true", True),
        ("node.labels.MLFLEET.model-store==true", False),
        ("node.labels.gpu!=true", True),
        ("node.labels.gpu==true", False),
        ("node.platform.os==linux", True),
        ("node.platform.arch!=x86_64", False),
    ],
)
def test_constraint_matching(constraint, expected):
    w1 = node("w1", labels={"mlfleet.model-store": "true"})
    assert eligible(w1, [constraint]) is expected


def test_every_constraint_must_hold():
    w1 = node("w1", labels={"mlfleet.model-store": "true"})
    assert eligible(w1, list(MODEL_STORE))
    assert not eligible(node("w2"), list(MODEL_STORE))
    assert eligible(w1, [])


@pytest.mark.parametrize(("status", "availability"), [("down", "active"), ("unknown", "active"), ("ready", "drain"), ("ready", "pause")])
def test_only_ready_active_nodes_are_eligible(status, availability):
    assert not eligible(node("w1", status=status, availability=availability), list(WORKERS))


@pytest.mark.parametrize(
    ("constraint", "message"),
    [
        ("node.ip==10.0.0.1", "uses node.ip, which the scale planner cannot evaluate"),
        ("engine.labels.gpu==true", "uses engine.labels.gpu"),
        ("node.role=worker", "is not of the form <attribute>==<value>"),
        ("node.labels.==x", "uses node.labels."),
    ],
)
def test_constraints_the_planner_cannot_read_fail_naming_them(constraint, message):
    with pytest.raises(ValueError, match="Placement constraint") as raised:
        # Even on a node Swarm would not use: the error must not depend on the cluster's state.
        eligible(node("w1", status="down"), [constraint])
    assert repr(constraint) in str(raised.value) and message in str(raised.value)


# capacity


def test_capacity_leaves_out_the_other_services_reservations_but_not_its_own():
    nodes = lab((4.0, 4.0))
    services = {"resnet18": service(2, cpus=1.0), "densenet": service(1, cpus=1.5)}
    tasks = tasks_on({"w1": ["resnet18", "densenet"], "w2": ["resnet18"]})
    # w1: floor((4 - 1.5) / 1) = 2; w2: 4; the drained manager holds none.
    assert capacity("resnet18", nodes, services, tasks) == 6
    # w1: floor((4 - 1) / 1.5) = 2; w2: floor(3 / 1.5) = 2.
    assert capacity("densenet", nodes, services, tasks) == 4


def test_capacity_tolerates_float_sums():
    services = {"tiny": service(1, cpus=0.1), "other": service(1, cpus=0.1)}
    nodes = [node("w1", cpus=0.4)]
    assert capacity("tiny", nodes, services, tasks_on({"w1": ["other"]})) == 3


def test_capacity_honours_max_per_node_and_constraints():
    nodes = lab((8.0, 8.0, 8.0))
    nodes[1]["labels"]["mlfleet.model-store"] = "true"
    nodes[2]["labels"]["mlfleet.model-store"] = "true"
    services = {"resnet18": service(1, cpus=1.0, constraints=MODEL_STORE, max_per_node=3)}
    assert capacity("resnet18", nodes, services, []) == 6


def test_a_service_without_cpus_is_bounded_by_max_per_node_or_unbounded():
    nodes = lab((2.0, 2.0))
    assert capacity("echo", nodes, {"echo": service(1, cpus=0, max_per_node=2)}, []) == 4
    assert capacity("echo", nodes, {"echo": service(1, cpus=0)}, []) == UNBOUNDED


# scale-out

OUT = dict(min_replicas=1, max_replicas=8, min_workers=1, max_workers=4, vm_step=1, new_worker_cpus=2.0)


@pytest.mark.parametrize(
    ("case", "replicas", "options", "expected"),
    [
        ("fits", 2, dict(step=2), dict(decision="replicas", target_replicas=4, capacity=4, add_workers=0)),
        ("needs one VM", 4, dict(step=1), dict(decision="vms", target_replicas=5, capacity=4, add_workers=1)),
        ("needs two, vm_step 1", 4, dict(step=4), dict(decision="vms", target_replicas=8, add_workers=1)),
        ("needs two, vm_step 2", 4, dict(step=4, vm_step=2), dict(decision="vms", target_replicas=8, add_workers=2)),
        ("smallest count that fits", 4, dict(step=2, vm_step=3), dict(decision="vms", target_replicas=6, add_workers=1)),
        ("capped by max_workers", 4, dict(step=4, vm_step=3, max_workers=3), dict(decision="vms", target_replicas=8, add_workers=1)),
        ("at max workers, partial", 3, dict(step=2, max_workers=2), dict(decision="replicas", target_replicas=4, add_workers=0)),
        ("at max workers, full", 4, dict(step=1, max_workers=2), dict(decision="none", target_replicas=4, add_workers=0)),
        ("at max replicas", 8, dict(step=1), dict(decision="none", target_replicas=8, add_workers=0)),
        ("step capped by max_replicas", 3, dict(step=5, max_replicas=4), dict(decision="replicas", target_replicas=4)),
        ("raised to min_replicas", 1, dict(step=1, min_replicas=3), dict(decision="replicas", target_replicas=3)),
        ("VM joining counts", 4, dict(step=4, vm_step=2, worker_pool_size=3), dict(decision="vms", target_replicas=8, add_workers=1)),
        ("pool at max while a VM joins", 4, dict(step=1, max_workers=3, worker_pool_size=3), dict(decision="vms", target_replicas=5, add_workers=0)),
        ("a joining VM is enough", 4, dict(step=2, worker_pool_size=3), dict(decision="vms", target_replicas=6, add_workers=0)),
        ("a joining VM with vm_step 0", 4, dict(step=2, vm_step=0, worker_pool_size=3), dict(decision="vms", target_replicas=6, add_workers=0)),
        ("joining VMs and one more", 4, dict(step=4, worker_pool_size=3), dict(decision="vms", target_replicas=8, add_workers=1)),
    ],
)
def test_scale_out(case, replicas, options, expected):
    services = {"resnet18": service(replicas, cpus=1.0), "densenet": service(0, cpus=2.0)}
    plan = plan_scale_out("resnet18", lab(), services, [], **{**OUT, **options})
    assert {key: plan[key] for key in expected} == expected, plan["reason"]
    assert plan["current_replicas"] == replicas
    assert plan["reason"].startswith("resnet18: ")
    assert plan["values"]["workers"] == 2 and plan["values"]["max_workers"] == options.get("max_workers", 4)


def test_scale_out_reasons_name_the_figures():
    services = {"resnet18": service(2, cpus=1.0)}
    nodes = lab()
    fits = plan_scale_out("resnet18", nodes, services, [], **{**OUT, "step": 2})
    assert fits["reason"] == "resnet18: 2 → 4 replicas; 4 fit on 2 workers"

    services["resnet18"]["replicas"] = 4
    grow = plan_scale_out("resnet18", nodes, services, [], **{**OUT, "step": 4})
    assert grow["reason"] == (
        "resnet18: 4 → 8 replicas needs 1 more worker VM: 4 fit on 2 workers, 2 replicas per new worker of 2 CPUs; "
        "pool 2 → 3 of at most 4; that makes room for 6, a later run adds more (vm_step 1)"
    )
    assert grow["values"]["replicas_per_new_worker"] == 2

    capped = plan_scale_out("resnet18", nodes, services, [], **{**OUT, "step": 4, "vm_step": 3, "max_workers": 3})
    assert capped["reason"].endswith("pool 2 → 3 of at most 3; that makes room for 6, and the pool is then at its maximum")

    full = plan_scale_out("resnet18", nodes, services, [], **{**OUT, "max_workers": 2})
    assert full["reason"] == "resnet18: no room: 2 workers is the maximum, and 4 replicas fit on 2 workers"

    services["resnet18"]["replicas"] = 3
    partial = plan_scale_out("resnet18", nodes, services, [], **{**OUT, "step": 2, "max_workers": 2})
    assert partial["reason"] == "resnet18: 3 → 4 replicas, only 4 of 5 fit on 2 workers; 2 workers is the maximum"

    # A run killed after the clone left a pool VM that is no worker yet: the next run joins it and adds nothing.
    services["resnet18"]["replicas"] = 4
    joining = plan_scale_out("resnet18", nodes, services, [], **{**OUT, "step": 4, "max_workers": 3, "worker_pool_size": 3})
    assert joining["reason"] == (
        "resnet18: 4 → 8 replicas once the pool's 1 VM still joining joins: 4 fit on 2 workers, "
        "2 replicas per new worker of 2 CPUs; no VM is added; that makes room for 6"
    )

    services["resnet18"]["replicas"] = 8
    top = plan_scale_out("resnet18", nodes, services, [], **OUT)
    assert top["reason"] == "resnet18: at its maximum of 8 replicas"


def test_scale_out_counts_other_services_and_global_reservations():
    nodes = lab((4.0, 4.0))
    services = {"resnet18": service(4, cpus=1.0), "densenet": service(1, cpus=3.0), "telegraf": service(None, cpus=0.5, constraints=())}
    tasks = tasks_on({"w1": ["resnet18", "resnet18", "densenet", "telegraf"], "w2": ["resnet18", "resnet18", "telegraf"]})
    plan = plan_scale_out("resnet18", nodes, services, tasks, **{**OUT, "new_worker_cpus": 2.0})
    # w1: floor((4 - 3 - 0.5) / 1) = 0; w2: floor(3.5) = 3: the four replicas only run now because w1 is overbooked.
    assert (plan["capacity"], plan["decision"], plan["add_workers"]) == (3, "vms", 1)
    assert plan["values"]["replicas_per_new_worker"] == 1, "the global telegraf reserves 0.5 of the new worker's 2 CPUs"


def test_scale_out_with_max_per_node_needs_workers_despite_free_cpus():
    nodes = lab((8.0, 8.0))
    services = {"resnet18": service(4, cpus=1.0, max_per_node=2)}
    plan = plan_scale_out("resnet18", nodes, services, [], **{**OUT, "new_worker_cpus": 8.0})
    assert (plan["capacity"], plan["decision"], plan["add_workers"]) == (4, "vms", 1)
    assert plan["values"]["replicas_per_new_worker"] == 2


def test_scale_out_only_counts_nodes_with_the_model_store_label():
    nodes = lab((2.0, 2.0, 2.0))
    nodes[1]["labels"]["mlfleet.model-store"] = "true"
    services = {"resnet18": service(2, cpus=1.0, constraints=MODEL_STORE)}
    plan = plan_scale_out("resnet18", nodes, services, [], **OUT)
    assert (plan["capacity"], plan["decision"], plan["add_workers"]) == (2, "vms", 1)
    assert plan["values"]["eligible_nodes"] == 1


def test_new_workers_do_not_help_a_service_that_runs_on_managers_only():
    nodes = lab()
    nodes[0]["availability"] = "active"
    services = {"edge": service(4, cpus=1.0, constraints=("node.role==manager",))}
    plan = plan_scale_out("edge", nodes, services, [], **OUT)
    assert (plan["capacity"], plan["decision"]) == (4, "none")
    assert plan["reason"] == "edge: no room: a new worker cannot run it (placement constraints), and 4 replicas fit on 1 node"


def test_a_new_worker_too_small_for_one_replica_does_not_help():
    services = {"densenet": service(1, cpus=2.0)}
    plan = plan_scale_out("densenet", lab((2.0, 2.0)), services, [], **{**OUT, "new_worker_cpus": 1.0})
    assert (plan["decision"], plan["target_replicas"]) == ("replicas", 2)
    services["densenet"]["replicas"] = 2
    plan = plan_scale_out("densenet", lab((2.0, 2.0)), services, [], **{**OUT, "new_worker_cpus": 1.0})
    assert plan["decision"] == "none" and "a new worker of 1 CPUs has no room for a replica of 2 CPUs" in plan["reason"]


def test_step_0_only_plans_room_for_the_replicas_there_are():
    services = {"resnet18": service(3, cpus=1.0)}
    stays = plan_scale_out("resnet18", lab(), services, [], **{**OUT, "step": 0})
    assert (stays["decision"], stays["target_replicas"], stays["capacity"]) == ("none", 3, 4)
    assert stays["reason"] == "resnet18: stays at 3 replicas (step 0); 4 fit on 2 workers"
    services["resnet18"]["replicas"] = 5
    overbooked = plan_scale_out("resnet18", lab(), services, [], **{**OUT, "step": 0})
    assert (overbooked["decision"], overbooked["target_replicas"], overbooked["add_workers"]) == ("vms", 5, 1)


def test_vm_step_0_plans_replicas_only():
    services = {"resnet18": service(3, cpus=1.0)}
    plan = plan_scale_out("resnet18", lab(), services, [], **{**OUT, "step": 2, "vm_step": 0})
    assert (plan["decision"], plan["target_replicas"], plan["add_workers"]) == ("replicas", 4, 0)
    assert plan["reason"] == "resnet18: 3 → 4 replicas, only 4 of 5 fit on 2 workers; vm_step 0 adds no worker VM"
    kept = scale_in("resnet18", lab((2.0, 2.0, 2.0)), services, [], vm_step=0)
    assert (kept["decision"], kept["remove_nodes"]) == ("replicas", [])
    assert kept["reason"] == "resnet18: 3 → 2 replicas; no worker is removed (vm_step 0)"


# scale-in


def scale_in(service_name, nodes, services, tasks, **options):
    return plan_scale_in(service_name, nodes, services, tasks, **{"step": 1, "min_replicas": 1, "min_workers": 1, **options})


def removed(plan):
    return [n["hostname"] for n in plan["remove_nodes"]]


def test_scale_in_picks_the_idle_newest_worker_first():
    nodes = lab((2.0, 2.0, 2.0, 2.0))
    services = {"resnet18": service(3, cpus=1.0)}
    tasks = tasks_on({"w1": ["resnet18", "resnet18"], "w2": ["resnet18"]})
    plan = scale_in("resnet18", nodes, services, tasks, vm_step=1)
    assert (plan["decision"], plan["current_replicas"], plan["target_replicas"]) == ("replicas_and_nodes", 3, 2)
    assert plan["remove_nodes"] == [{"hostname": "w4", "node_id": "id-w4", "vmid": 124}]
    assert plan["reason"] == "resnet18: 3 → 2 replicas; remove w4 (VM 124): every service's replicas fit on the 3 remaining workers"

    everything = scale_in("resnet18", nodes, services, tasks)
    assert removed(everything) == ["w4", "w3", "w2"], "idle ones newest first, then the busy w2 (its replica fits on w1)"
    assert everything["values"]["workers_after"] == 1


def test_scale_in_prefers_fewer_tasks_over_a_newer_vm():
    nodes = lab((4.0, 4.0, 4.0))
    nodes[2]["vmid"] = 200
    services = {"resnet18": service(4, cpus=1.0)}
    tasks = tasks_on({"w1": ["resnet18"], "w2": ["resnet18", "resnet18"], "w3": ["resnet18"]})
    plan = scale_in("resnet18", nodes, services, tasks, min_replicas=4, vm_step=1)
    assert removed(plan) == ["w3"], "w2 is the newest VM but runs two tasks"


def test_a_worker_without_vm_id_is_no_vm_of_the_pool_and_never_picked():
    nodes = lab((4.0, 4.0, 4.0))
    nodes[3]["vmid"] = None
    services = {"resnet18": service(1, cpus=1.0)}
    plan = scale_in("resnet18", nodes, services, tasks_on({"w1": ["resnet18"]}))
    assert removed(plan) == ["w2", "w1"], "w3 is idle too, but has no VM to destroy; it holds the replica"
    assert plan["values"]["workers_after"] == 1


def test_the_newest_vm_goes_first_among_equally_busy_workers():
    nodes = lab((4.0, 4.0, 4.0))
    nodes[1]["vmid"] = 200
    services = {"resnet18": service(3, cpus=1.0)}
    tasks = tasks_on({"w1": ["resnet18"], "w2": ["resnet18"], "w3": ["resnet18"]})
    assert removed(scale_in("resnet18", nodes, services, tasks, vm_step=1)) == ["w1"]


def test_scale_in_never_removes_a_manager_a_protected_worker_or_below_min_workers():
    nodes = lab((2.0, 2.0, 2.0, 2.0))
    nodes[0]["availability"] = "active"
    services = {"resnet18": service(1, cpus=1.0, constraints=())}
    tasks = tasks_on({"m1": ["resnet18"]})

    plan = scale_in("resnet18", nodes, services, tasks, min_workers=2, protected=["w4", "123"])
    assert removed(plan) == ["w2", "w1"], "w4 by name and w3 by VM id are protected and stay as the 2 min_workers"
    assert removed(scale_in("resnet18", nodes, services, tasks, min_workers=3, protected=["w4", "123"])) == ["w2"]
    assert "m1" not in removed(scale_in("resnet18", nodes, services, tasks, min_workers=0))

    kept = scale_in("resnet18", nodes, services, tasks, min_workers=4)
    assert kept["decision"] == "none" and kept["remove_nodes"] == []
    assert kept["reason"] == "resnet18: at its minimum of 1 replica; 4 workers is the minimum"

    protected = scale_in("resnet18", nodes, services, tasks, protected=["w1", "w2", "w3", "w4"])
    assert protected["decision"] == "none" and protected["reason"].endswith(
        "every worker that could go is protected or no VM of the pool (no mlfleet.vmid label)"
    )


def test_scale_in_keeps_a_node_that_another_service_needs():
    nodes = lab((2.0, 2.0, 2.0))
    services = {"resnet18": service(2, cpus=1.0), "densenet": service(2, cpus=2.0)}
    tasks = tasks_on({"w1": ["resnet18", "resnet18"], "w2": ["densenet"], "w3": ["densenet"]})
    plan = scale_in("resnet18", nodes, services, tasks)
    # resnet18 at 1 replica frees a CPU on w1 but each densenet replica needs a whole 2-CPU node.
    assert (plan["decision"], plan["target_replicas"], plan["remove_nodes"]) == ("replicas", 1, [])
    assert sorted(plan["values"]["needed_workers"]) == ["w1", "w2", "w3"]
    # First-fit decreasing places the large densenet replicas first: the one left without room is resnet18's.
    assert plan["reason"] == "resnet18: 2 → 1 replicas; every worker is needed (without w3: resnet18 1 replica short)"
    del services["densenet"]
    assert removed(scale_in("resnet18", nodes, services, tasks)) == ["w3", "w2"], "only densenet kept them"


def test_scale_in_honours_max_per_node():
    nodes = lab((8.0, 8.0, 8.0))
    services = {"resnet18": service(4, cpus=1.0, max_per_node=2)}
    tasks = tasks_on({"w1": ["resnet18", "resnet18"], "w2": ["resnet18"], "w3": ["resnet18"]})
    plan = scale_in("resnet18", nodes, services, tasks)
    assert removed(plan) == ["w3"], "3 replicas at 2 per node need 2 nodes, though one has the CPUs for all"
    services["resnet18"]["replicas"] = 6
    assert scale_in("resnet18", nodes, services, tasks, min_replicas=6)["decision"] == "none"


@pytest.mark.parametrize(("constraints", "expected"), [(MODEL_STORE, ["w2"]), (WORKERS, ["w2", "w1"])])
def test_scale_in_with_label_constraints(constraints, expected):
    nodes = lab((2.0, 2.0, 8.0))
    nodes[1]["labels"]["mlfleet.model-store"] = nodes[2]["labels"]["mlfleet.model-store"] = "true"
    nodes[3]["vmid"] = 110
    services = {"resnet18": service(3, cpus=1.0, constraints=constraints), "proxy": service(2, cpus=0.5)}
    tasks = tasks_on({"w1": ["resnet18", "resnet18"], "w2": ["resnet18"], "w3": ["proxy", "proxy"]})
    plan = scale_in("resnet18", nodes, services, tasks)
    # The big w3 has room for everything, but no model store: with the label constraint resnet18 needs w1.
    assert (plan["decision"], plan["target_replicas"], removed(plan)) == ("replicas_and_nodes", 2, expected)


def test_global_services_reserve_cpus_on_every_eligible_node():
    nodes = lab((2.0, 2.0))
    services = {"resnet18": service(3, cpus=1.0), "telegraf": service(None, cpus=0.5, constraints=())}
    tasks = tasks_on({"w1": ["resnet18", "telegraf"], "w2": ["resnet18", "resnet18", "telegraf"]})
    assert scale_in("resnet18", nodes, services, tasks)["remove_nodes"] == [], "2 replicas need both workers once telegraf has its 0.5"
    assert removed(scale_in("resnet18", nodes, services, tasks, step=2)) == ["w1"]


def test_idle_workers_go_when_replicas_are_at_their_minimum():
    nodes = lab((2.0, 2.0, 2.0))
    services = {"resnet18": service(1, cpus=1.0)}
    plan = scale_in("resnet18", nodes, services, tasks_on({"w1": ["resnet18"]}), vm_step=5)
    assert (plan["decision"], plan["target_replicas"]) == ("nodes", 1)
    assert removed(plan) == ["w3", "w2"]
    assert plan["reason"] == "resnet18: at its minimum of 1 replica; remove w3 (VM 123), w2 (VM 122): every service's replicas fit on the 1 remaining worker"


def test_a_drained_worker_left_by_an_interrupted_run_goes_first():
    nodes = lab((2.0, 2.0, 2.0))
    nodes[1]["availability"] = "drain"
    services = {"resnet18": service(4, cpus=1.0)}
    tasks = tasks_on({"w2": ["resnet18", "resnet18"], "w3": ["resnet18", "resnet18"]})
    plan = scale_in("resnet18", nodes, services, tasks, min_replicas=4)
    assert (plan["decision"], removed(plan)) == ("nodes", ["w1"])


def test_a_worker_that_is_down_is_not_picked():
    nodes = lab((2.0, 2.0, 2.0))
    nodes[3]["status"] = "down"
    services = {"resnet18": service(2, cpus=1.0)}
    plan = scale_in("resnet18", nodes, services, tasks_on({"w1": ["resnet18", "resnet18"]}), min_replicas=2)
    assert removed(plan) == ["w2"] and plan["values"]["workers"] == 2


def test_a_service_that_does_not_fit_anyway_does_not_pin_every_worker():
    nodes = lab((2.0, 2.0, 2.0))
    services = {"resnet18": service(1, cpus=1.0), "huge": service(1, cpus=16.0)}
    plan = scale_in("resnet18", nodes, services, tasks_on({"w1": ["resnet18"]}), vm_step=1)
    assert removed(plan) == ["w3"]
    assert plan["values"]["unplaceable_replicas"] == {"huge": 1}


def test_scale_in_reason_when_every_worker_is_needed_at_the_minimum():
    nodes = lab((1.0, 1.0))
    services = {"resnet18": service(2, cpus=1.0)}
    plan = scale_in("resnet18", nodes, services, tasks_on({"w1": ["resnet18"], "w2": ["resnet18"]}), min_replicas=2)
    assert plan["decision"] == "none"
    assert plan["reason"] == "resnet18: at its minimum of 2 replicas; every worker is needed (without w2: resnet18 1 replica short)"


def test_scale_in_does_not_raise_a_service_below_its_minimum():
    plan = scale_in("resnet18", lab(), {"resnet18": service(1, cpus=1.0)}, [], min_replicas=3, min_workers=2)
    assert (plan["decision"], plan["target_replicas"]) == ("none", 1)
    assert plan["reason"].startswith("resnet18: below its minimum of 3 replicas (1), not lowered")


def test_pack_places_largest_first_and_reports_what_does_not_fit():
    nodes = lab((4.0, 3.0))
    services = {"a": service(2, cpus=1.0), "b": service(1, cpus=2.0), "c": service(1, cpus=3.0)}
    assert pack(nodes, services, {"a": 2, "b": 1, "c": 1}) == {"a": 2, "b": 1, "c": 1}
    assert pack(nodes, services, {"a": 3, "b": 1, "c": 1}) == {"a": 2, "b": 1, "c": 1}


# bad bounds and unknown services


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(min_replicas=5, max_replicas=4), r"min_replicas \(5\) is above max_replicas \(4\); lower min_replicas or raise max_replicas"),
        (dict(step=-1), "step must be 0 or more, got -1"),
        (dict(min_workers=3, max_workers=2), r"min_workers \(3\) is above max_workers \(2\)"),
        (dict(vm_step=-1), "vm_step must be 0 or more"),
        (dict(new_worker_cpus=0), "new_worker_cpus must be above 0, got 0; give the CPUs of a new worker VM"),
        (dict(max_replicas=None), "max_replicas must be 1 or more, got None"),
        (dict(worker_pool_size=-1), "worker_pool_size must be 0 or more"),
    ],
)
def test_scale_out_bad_bounds(options, message):
    with pytest.raises(ValueError, match=message):
        plan_scale_out("resnet18", lab(), {"resnet18": service(2)}, [], **{**OUT, **options})


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(step=-2), "step must be 0 or more, got -2; give the number of replicas to remove"),
        (dict(min_replicas=-1), "min_replicas must be 0 or more"),
        (dict(min_workers=-1), "min_workers must be 0 or more"),
        (dict(min_replicas=3, max_replicas=2), r"min_replicas \(3\) is above max_replicas \(2\)"),
        (dict(vm_step=-1), "vm_step must be 0 or more"),
    ],
)
def test_scale_in_bad_bounds(options, message):
    with pytest.raises(ValueError, match=message):
        scale_in("resnet18", lab(), {"resnet18": service(2)}, [], **options)


@pytest.mark.parametrize("planner", [plan_scale_out, plan_scale_in])
def test_unknown_and_global_services_are_refused(planner):
    services = {"resnet18": service(2), "telegraf": service(None)}
    options = OUT if planner is plan_scale_out else {}
    with pytest.raises(ValueError, match=r"Service 'densenet' does not exist in the swarm \(services: resnet18, telegraf\); check the service option"):
        planner("densenet", lab(), services, [], **options)
    with pytest.raises(ValueError, match="Service 'telegraf' is a global service and has no replica count to scale"):
        planner("telegraf", lab(), services, [], **options)


def test_an_unreadable_constraint_of_another_service_names_it():
    services = {"resnet18": service(2), "telegraf": service(None, constraints=("node.ip==10.0.0.9",))}
    with pytest.raises(ValueError, match=r"Service telegraf: Placement constraint 'node.ip==10.0.0.9' uses node.ip"):
        scale_in("resnet18", lab(), services, [])
    with pytest.raises(ValueError, match="Service telegraf: "):
        plan_scale_out("resnet18", lab(), services, [], **OUT)


# normalise


def test_normalise_reads_the_api_records():
    node_records = [
        {
            "ID": "n2",
            "Spec": {"Role": "worker", "Availability": "active", "Labels": {"mlfleet.vmid": "122", "mlfleet.pool": "swarm_worker"}},
            "Description": {
                "Hostname": "w2",
                "Resources": {
                    "NanoCPUs": 2_000_000_000,
                    "GenericResources": [
                        {"NamedResourceSpec": {"Kind": "NVIDIA-GPU", "Value": "GPU-a"}},
                        {"NamedResourceSpec": {"Kind": "NVIDIA-GPU", "Value": "GPU-b"}},
                        {"DiscreteResourceSpec": {"Kind": "SSD", "Value": 3}},
                    ],
                },
                "Platform": {"OS": "linux", "Architecture": "x86_64"},
            },
            "Status": {"State": "ready"},
        },
        {"ID": "n1", "Spec": {"Role": "manager", "Availability": "drain", "Labels": {"mlfleet.vmid": "x"}}, "Description": {"Hostname": "m1"}, "Status": {}},
    ]
    service_records = [
        {
            "ID": "s1",
            "Spec": {
                "Name": "resnet18",
                "Mode": {"Replicated": {"Replicas": 3}},
                "TaskTemplate": {
                    "Resources": {
                        "Limits": {"NanoCPUs": 1_000_000_000},
                        "Reservations": {"NanoCPUs": 500_000_000, "GenericResources": [{"DiscreteResourceSpec": {"Kind": "NVIDIA-GPU", "Value": 1}}]},
                    },
                    "Placement": {"Constraints": ["node.role==worker"], "MaxReplicas": 2},
                },
            },
        },
        {"ID": "s2", "Spec": {"Name": "telegraf", "Mode": {"Global": {}}, "TaskTemplate": {"Resources": {"Limits": {"NanoCPUs": 250_000_000}}}}},
        {"ID": "s3", "Spec": {"Name": "migrate", "Mode": {"ReplicatedJob": {}}, "TaskTemplate": {}}},
    ]
    task_records = [
        {"ServiceID": "s1", "NodeID": "n2", "DesiredState": "running", "Status": {"State": "running"}},
        {"ServiceID": "s1", "NodeID": "", "DesiredState": "running", "Status": {"State": "pending", "Err": "no suitable node"}},
        {"ServiceID": "s1", "NodeID": "n2", "DesiredState": "shutdown", "Status": {"State": "running"}},
        {"ServiceID": "s2", "NodeID": "n2", "DesiredState": "running", "Status": {"State": "failed"}},
    ]
    nodes, services, tasks = normalise(node_records, service_records, task_records)
    assert [n["hostname"] for n in nodes] == ["m1", "w2"]
    assert nodes[1] == {
        "node_id": "n2",
        "hostname": "w2",
        "role": "worker",
        "availability": "active",
        "status": "ready",
        "cpus": 2.0,
        "generic": {"NVIDIA-GPU": 2, "SSD": 3},
        "labels": {"mlfleet.vmid": "122", "mlfleet.pool": "swarm_worker"},
        "platform": {"os": "linux", "arch": "x86_64"},
        "vmid": 122,
        "pool": "swarm_worker",
    }
    assert (nodes[0]["cpus"], nodes[0]["vmid"], nodes[0]["status"]) == (0.0, None, None)
    assert services == {
        "resnet18": {"replicas": 3, "cpus": 0.5, "generic": {"NVIDIA-GPU": 1}, "constraints": ["node.role==worker"], "max_per_node": 2, "mode": "replicated"},
        "telegraf": {"replicas": None, "cpus": 0.25, "generic": {}, "constraints": [], "max_per_node": 0, "mode": "global"},
        "migrate": {"replicas": None, "cpus": 0.0, "generic": {}, "constraints": [], "max_per_node": 0, "mode": "replicated-job"},
    }
    assert tasks == [{"service": "resnet18", "node_id": "n2", "state": "running"}, {"service": "resnet18", "node_id": None, "state": "pending"}]


# GPUs: generic resources


GPU_POOL = ("node.role==worker", "node.labels.mlfleet.pool==gpu_worker")


def gpu_lab(gpus_per_worker=(2, 2), cpu_workers=1):
    """A drained manager, CPU workers c1.. (pool swarm_worker, no GPU) and GPU workers g1.. (pool gpu_worker), 8 CPUs each."""
    nodes = [node("m1", 4.0, role="manager", vmid=100, availability="drain")]
    for index in range(1, cpu_workers + 1):
        nodes.append(dict(node(f"c{index}", 8.0, vmid=110 + index, labels={"mlfleet.pool": "swarm_worker"}), pool="swarm_worker", generic={}))
    for index, gpus in enumerate(gpus_per_worker, start=1):
        worker = node(f"g{index}", 8.0, vmid=130 + index, labels={"mlfleet.pool": "gpu_worker"})
        nodes.append(dict(worker, pool="gpu_worker", generic={"NVIDIA-GPU": gpus}))
    return nodes


def gpu_services(replicas, gpus=1, cpus=0.5):
    return {
        "llm": dict(service(replicas, cpus, constraints=GPU_POOL), generic={"NVIDIA-GPU": gpus}),
        "resnet18": service(2, 0.5, constraints=("node.role==worker", "node.labels.mlfleet.pool==swarm_worker")),
    }


@pytest.mark.parametrize(
    ("gpus_per_worker", "gpus_per_replica", "running", "expected"),
    [
        ((2, 2), 1, {}, 4),  # CPUs would hold 16 per worker: the GPUs bound it
        ((2, 2), 2, {}, 2),
        ((2, 1), 2, {}, 1),  # a worker with 1 GPU holds no replica that needs 2
        ((2, 2), 1, {"g1": ["llm", "llm"], "g2": ["llm"]}, 4),  # the service's own tasks count as movable
        ((0, 0), 1, {}, 0),
    ],
)
def test_a_gpu_service_fits_as_often_as_its_pool_has_gpus(gpus_per_worker, gpus_per_replica, running, expected):
    assert capacity("llm", gpu_lab(gpus_per_worker), gpu_services(1, gpus_per_replica), tasks_on(running)) == expected


def test_another_services_gpu_tasks_hold_their_gpus():
    services = gpu_services(1) | {"other": dict(service(2, 0.5, constraints=GPU_POOL), generic={"NVIDIA-GPU": 1})}
    assert capacity("llm", gpu_lab(), services, tasks_on({"g1": ["other"], "g2": ["other"]})) == 2


OUT_GPU = {
    "min_replicas": 1,
    "max_replicas": 8,
    "min_workers": 2,
    "max_workers": 3,
    "vm_step": 1,
    "new_worker_cpus": 8,
    "worker_pool_size": 2,
    "new_worker_generic": {"NVIDIA-GPU": 2},
}


@pytest.mark.parametrize(
    ("current", "step", "options", "decision", "target", "add", "reason"),
    [
        (1, 3, {}, "replicas", 4, 0, "llm: 1 → 4 replicas; 4 fit on 2 workers"),
        (
            4,
            1,
            {},
            "vms",
            5,
            1,
            "llm: 4 → 5 replicas needs 1 more worker VM: 4 fit on 2 workers, 2 replicas per new worker of 8 CPUs and 2 NVIDIA-GPU; pool 2 → 3 of at most 3",
        ),
        # A pool whose new VMs bring no GPU is never grown for a GPU service.
        (4, 1, {"new_worker_generic": {}}, "none", 4, 0, "a new worker of the pool brings no generic resources, a replica reserves 1 NVIDIA-GPU"),
        (4, 1, {"new_worker_generic": None}, "none", 4, 0, "a new worker of the pool brings no generic resources"),
        (4, 3, {}, "vms", 7, 1, "that makes room for 6, and the pool is then at its maximum"),
        (6, 1, {"worker_pool_size": 3, "max_workers": 3}, "none", 6, 0, "3 workers is the maximum"),
    ],
)
def test_a_gpu_service_grows_its_pool_by_its_gpus(current, step, options, decision, target, add, reason):
    nodes = gpu_lab((2, 2, 2) if options.get("worker_pool_size") == 3 else (2, 2))
    running = {"g1": ["llm"] * min(current, 2), "g2": ["llm"] * max(0, min(current - 2, 2)), "g3": ["llm"] * max(0, current - 4)}
    plan = plan_scale_out("llm", nodes, gpu_services(current), tasks_on(running), step=step, **{**OUT_GPU, **options})
    assert (plan["decision"], plan["target_replicas"], plan["add_workers"]) == (decision, target, add), plan["reason"]
    assert reason in plan["reason"]
    assert plan["values"]["generic_per_replica"] == {"NVIDIA-GPU": 1}


def test_a_gpu_scale_in_frees_the_gpu_worker_once_its_replicas_fit_elsewhere():
    nodes = gpu_lab((2, 2, 2))
    running = {"g1": ["llm", "llm"], "g2": ["llm", "llm"], "g3": ["llm"], "c1": ["resnet18", "resnet18"]}
    plan = plan_scale_in("llm", nodes, gpu_services(5), tasks_on(running), step=4, min_replicas=1, min_workers=2, max_workers=3, vm_step=1)
    assert plan["decision"] == "replicas_and_nodes", plan["reason"]
    assert plan["target_replicas"] == 1
    # The CPU worker holds resnet18 and is not a GPU node: the GPU pool's newest worker goes.
    assert [n["hostname"] for n in plan["remove_nodes"]] == ["g3"]


def test_a_gpu_scale_in_keeps_the_gpu_workers_the_replicas_need():
    nodes = gpu_lab((2, 2, 2))
    running = {"g1": ["llm", "llm"], "g2": ["llm", "llm"], "g3": ["llm"]}
    plan = plan_scale_in("llm", nodes, gpu_services(5), tasks_on(running), step=0, min_replicas=5, min_workers=1, max_workers=3, vm_step=1)
    assert plan["decision"] == "none"
    assert "every worker is needed" in plan["reason"]
    assert {host: plan["values"]["needed_workers"][host] for host in ("g1", "g2", "g3")} == {"g1": {"llm": 1}, "g2": {"llm": 1}, "g3": {"llm": 1}}


def test_pack_places_gpu_replicas_only_where_gpus_are_free():
    placed = pack(gpu_lab((2, 1)), gpu_services(4), {"llm": 4, "resnet18": 2})
    assert placed == {"llm": 3, "resnet18": 2}
