"""The autoscaler's decision core, table by table: settings, demand, cooldowns, floors, stabilization, capacity, VMs."""

from __future__ import annotations

import re

import pytest

from ansible_collections.mlfleet.serving.plugins.module_utils._scale_decision import (
    DEFAULTS,
    audit_fields,
    decide,
    desired_replicas,
    effective_settings,
    event_demand,
    run_outcome,
    settle_request,
    stabilized,
    state_records,
    vms_to_destroy,
)

NOW = 1_800_000_000.0
SERVICES = ["resnet18", "densenet161"]
POOL = {"min": 2, "max": 3, "cores": 2}


def node(hostname, vmid, cpus=2.0, role="worker", availability="active", status="ready"):
    return {
        "node_id": f"id-{hostname}",
        "hostname": hostname,
        "role": role,
        "availability": availability,
        "status": status,
        "cpus": cpus,
        "labels": {"mlfleet.vmid": str(vmid)},
        "platform": {"os": "linux", "arch": "x86_64"},
        "vmid": vmid,
        "pool": None,
    }


def swarm(replicas, workers=(("w1", 121), ("w2", 122)), drained=(), cpus=1.0):
    """A drained manager, workers of 2 CPUs, resnet18 at ``replicas`` (1 CPU each: 2 fit per worker) spread over them."""
    nodes = [node("m1", 100, cpus=4.0, role="manager", availability="drain")]
    nodes += [node(name, vmid, availability="drain" if name in drained else "active") for name, vmid in workers]
    active = [n for n in nodes if n["role"] == "worker" and n["availability"] == "active"]
    tasks = [{"service": "resnet18", "node_id": active[i % len(active)]["node_id"], "state": "running"} for i in range(replicas)]
    services = {"resnet18": {"replicas": replicas, "cpus": cpus, "constraints": ["node.role==worker"], "max_per_node": 0, "mode": "replicated"}}
    return {"nodes": nodes, "services": services, "tasks": tasks}


def settings(pool=None, **replicas):
    overrides = {key: replicas.pop(key) for key in ("cooldown", "stabilization", "workers", "protected", "max_event_age") if key in replicas}
    base = {"cooldown": {"scale_out": 0, "scale_in": 0, "scale_in_after_scale_out": 0}, "stabilization": {"scale_in": 0}}
    # The tables are written for 4 requests per replica; the default itself is tested on its own.
    return effective_settings(base | overrides | {"replicas": {"target_per_replica": 4.0} | replicas}, "resnet18", pool or POOL)


def run(direction, replicas, event=None, state=None, action=None, config=None, pool=(121, 122), **swarm_options):
    request = {"action": action or direction, "direction": direction, "service": "resnet18", "event": event or {}}
    return decide(request, config or settings(), state or {}, swarm(replicas, **swarm_options), list(pool), now=NOW)


def pressure(backlog, **values):
    return {"source": "serving_pressure", "received_at": NOW - 1, "values": {"backlog": backlog, **values}}


# Demand and the desired count


@pytest.mark.parametrize(
    ("values", "demand"),
    [
        ({"backlog": 12}, 12),
        ({"backlog": 0}, 0),
        ({"inflight": 5, "queued": 7}, 12),
        ({"backlog": 3, "inflight": 5, "queued": 7}, 3),
        ({"inflight": 5}, None),
        ({"backlog": -1}, None),
        ({"backlog": True}, None),
        ({"backlog": float("nan")}, None),
        ({"backlog": "12"}, None),
        ({"B": 0.93}, None),
        ({}, None),
        (None, None),
    ],
    ids=[
        "backlog",
        "no-backlog",
        "inflight-and-queued",
        "backlog-first",
        "inflight-alone",
        "negative",
        "bool",
        "nan",
        "text",
        "grafana-cpu-mean",
        "empty",
        "none",
    ],
)
def test_the_demand_an_event_carries(values, demand):
    assert event_demand(values) == demand


@pytest.mark.parametrize(
    ("demand", "target", "desired"),
    [(0, 4, 0), (1, 4, 1), (4, 4, 1), (4.0000000001, 4, 1), (5, 4, 2), (12, 4, 3), (13, 4, 4), (10, 1.25, 8), (3, 0.5, 6)],
)
def test_desired_replicas_are_demand_over_the_target_rounded_up(demand, target, desired):
    assert desired_replicas(demand, target) == desired


@pytest.mark.parametrize(
    ("history", "window", "highest"),
    [
        ([], 300, None),
        ([[NOW - 400, 8], [NOW - 200, 5], [NOW - 10, 3]], 300, 5),
        ([[NOW - 400, 8], [NOW - 200, 5], [NOW - 10, 3]], 500, 8),
        ([[NOW - 400, 8]], 300, None),
        ([[NOW - 300, 6]], 300, 6),
    ],
    ids=["none", "within-window", "longer-window", "all-older", "at-the-edge"],
)
def test_stabilization_takes_the_highest_count_of_the_window(history, window, highest):
    assert stabilized(history, NOW, window) == highest


# Settings


def test_defaults_hold_where_the_inventory_is_silent():
    effective = effective_settings({}, "resnet18", POOL)
    assert (effective["min"], effective["max"], effective["step"]) == (1, 8, 1)
    assert effective["target_per_replica"] == DEFAULTS["replicas"]["target_per_replica"]
    assert effective["cooldown"] == {"scale_out": 30, "scale_in": 120, "scale_in_after_scale_out": 300}
    assert effective["stabilization"] == {"scale_in": 300}
    assert effective["workers"] == {"min": 2, "max": 3, "step": 1, "time_to_serve": 180, "cores": 2, "gpus": 0}


def test_the_pool_bounds_come_from_its_pool_entry_unless_mlfleet_autoscale_sets_them():
    assert effective_settings({"workers": {"step": 2}}, "resnet18", POOL)["workers"] == {
        "min": 2,
        "max": 3,
        "step": 2,
        "time_to_serve": 180,
        "cores": 2,
        "gpus": 0,
    }
    assert effective_settings({}, "llm", POOL | {"gpus": 2})["workers"]["gpus"] == 2
    assert effective_settings({"workers": {"max": 6}}, "resnet18", POOL)["workers"]["max"] == 6


def test_a_service_overrides_the_replica_settings_and_only_its_own():
    autoscale = {"replicas": {"max": 6}, "services": {"resnet18": {"min": 2, "target_per_replica": 1.5}}}
    resnet = effective_settings(autoscale, "resnet18", POOL)
    densenet = effective_settings(autoscale, "densenet161", POOL)
    assert (resnet["min"], resnet["max"], resnet["target_per_replica"]) == (2, 6, 1.5)
    assert (densenet["min"], densenet["max"], densenet["target_per_replica"]) == (1, 6, 2.0)


@pytest.mark.parametrize(
    ("autoscale", "workers", "message"),
    [
        ({"replicas": {"min": 5, "max": 3}}, POOL, "mlfleet_autoscale.replicas: min 5 is above max 3"),
        ({"services": {"resnet18": {"max": 0}}}, POOL, "mlfleet_autoscale.services.resnet18.max must be 1 or more"),
        ({"replicas": {"target_per_replica": 0}}, POOL, "replicas.target_per_replica must be above 0"),
        ({"replicas": {"target_per_replica": "many"}}, POOL, "replicas.target_per_replica must be a number, got 'many'"),
        ({"replicas": {"max_scale_up": 0}}, POOL, "replicas.max_scale_up must be 1 or more"),
        ({"replicas": {"step": 1.5}}, POOL, "replicas.step must be a whole number"),
        ({"cooldown": {"scale_in": -5}}, POOL, "cooldown.scale_in must be 0 or more"),
        ({"stabilization": {"scale_in": 7200}}, POOL, "stabilization.scale_in must be at most 3600 s"),
        ({"services": {"resnet18": 3}}, POOL, "mlfleet_autoscale.services.resnet18 must be a mapping"),
        ({"services": ["resnet18"]}, POOL, "mlfleet_autoscale.services must be a mapping"),
        ({"protected": "w1"}, POOL, "mlfleet_autoscale.protected must be a list"),
        ({}, {"name": "cpu", "min": 4, "max": 3, "cores": 2}, "the worker pool's min 4 (mlfleet_worker_pools pool cpu count) is above its max 3"),
        ({}, {"name": "cpu", "min": 2, "max": 3, "cores": 0}, "workers.cores (mlfleet_worker_pools pool cpu cores) must be above 0"),
        ([], POOL, "mlfleet_autoscale must be a mapping"),
        ({"workers": [2]}, POOL, "mlfleet_autoscale.workers must be a mapping"),
    ],
)
def test_bad_settings_are_named_with_the_fix(autoscale, workers, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        effective_settings(autoscale, "resnet18", workers)


@pytest.mark.parametrize(
    ("action", "direction", "service", "event", "expected"),
    [
        ("scale_out", None, "resnet18", {}, ("scale_out", "scale_out", "resnet18")),
        ("scale_in", "scale_out", None, {"service": "resnet18"}, ("scale_in", "scale_in", "resnet18")),
        ("scale_replicas", None, None, {"action": "scale_in", "service": "densenet161"}, ("scale_replicas", "scale_in", "densenet161")),
        ("scale_replicas", "scale_out", "resnet18", {"action": "scale_in"}, ("scale_replicas", "scale_out", "resnet18")),
    ],
)
def test_the_request_comes_from_the_playbook_and_the_event(action, direction, service, event, expected):
    request = settle_request(action, direction, service, event, SERVICES)
    assert (request["action"], request["direction"], request["service"]) == expected


@pytest.mark.parametrize(
    ("action", "direction", "service", "message"),
    [
        ("scale_up", None, "resnet18", "scale_action must be one of scale_out, scale_in, scale_replicas"),
        ("scale_replicas", None, "resnet18", "scale_direction must be scale_out or scale_in"),
        ("scale_out", None, "vgg16", "scale_service must be one of the services in mlfleet_serving (resnet18, densenet161), got 'vgg16'"),
        ("scale_out", None, None, "got ''"),
    ],
)
def test_a_bad_request_is_named(action, direction, service, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        settle_request(action, direction, service, {}, SERVICES)


# Decisions


CASES = [
    # (id, direction, replicas, event, state, config, options, expected: decision, target, grow_to, reason fragment)
    ("stale-event", "scale_out", 2, {"received_at": NOW - 90}, {}, {}, {}, ("none", None, -1, "the event is 90 s old (more than max_event_age, 60 s)")),
    (
        "scale-out-cooling-down",
        "scale_out",
        2,
        {},
        {"last_actions": {"resnet18:scale_out": NOW - 10}},
        {"cooldown": {"scale_out": 30}},
        {},
        ("none", None, -1, "scale_out is cooling down for 20 s more (last scale_out 10 s ago, cooldown 30 s)"),
    ),
    (
        "scale-in-after-a-scale-out",
        "scale_in",
        4,
        {},
        {"last_actions": {"resnet18:scale_out": NOW - 100}},
        {"cooldown": {"scale_in": 0, "scale_in_after_scale_out": 300}},
        {},
        ("none", None, -1, "no scale_in within 300 s of one"),
    ),
    (
        "demand-sizes-a-burst-in-one-decision",
        "scale_out",
        1,
        pressure(12),
        {},
        {},
        {},
        ("act", 3, -1, "12 requests in flight and queued need 3 replicas at 4 each; resnet18: 1 → 3 replicas; 4 fit on 2 workers"),
    ),
    ("inflight-and-queued-count-as-demand", "scale_out", 1, {"values": {"inflight": 8, "queued": 4}}, {}, {}, {}, ("act", 3, -1, "need 3 replicas")),
    ("demand-beyond-the-workers-grows-the-pool", "scale_out", 2, pressure(24), {}, {}, {}, ("act", 6, 3, "resnet18: 2 → 6 replicas needs 1 more worker VM")),
    (
        "max-scale-up-caps-one-decision",
        "scale_out",
        1,
        pressure(40),
        {},
        {"max_scale_up": 2},
        {},
        ("act", 3, -1, "1 → 3 now, at most 2 more per decision (max_scale_up)"),
    ),
    (
        "demand-above-max-is-bounded",
        "scale_out",
        2,
        pressure(400),
        {},
        {"max_scale_up": 10, "max": 5},
        {},
        ("act", 5, 3, "2 → 5 replicas needs 1 more worker VM"),
    ),
    (
        "demand-the-replicas-already-meet",
        "scale_out",
        3,
        pressure(6),
        {},
        {},
        {},
        ("none", None, -1, "6 requests in flight and queued need 2 replicas at 4 each; has 3: nothing to add"),
    ),
    ("no-demand-moves-by-step", "scale_out", 1, {"source": "grafana", "values": {"B": 0.93}}, {}, {"step": 2}, {}, ("act", 3, -1, "resnet18: 1 → 3 replicas")),
    ("at-its-maximum", "scale_out", 4, {}, {}, {"max": 4}, {}, ("none", 4, -1, "at its maximum of 4 replicas")),
    (
        "the-pool-at-its-maximum-takes-what-fits",
        "scale_out",
        4,
        pressure(40),
        {},
        {},
        {"workers": (("w1", 121), ("w2", 122), ("w3", 123)), "pool": (121, 122, 123)},
        ("act", 6, -1, "only 6 of 8 fit on 3 workers; 3 workers is the maximum"),
    ),
    (
        "scale-replicas-never-clones",
        "scale_out",
        3,
        pressure(40),
        {},
        {},
        {"action": "scale_replicas"},
        ("act", 4, -1, "only 4 of 7 fit on 2 workers; vm_step 0 adds no worker VM"),
    ),
    (
        "draining-backlog-holds-new-vms",
        "scale_out",
        4,
        pressure(120, backlog_trend=-2.5, drain_s=41.6),
        {},
        {"workers": {"time_to_serve": 60}},
        {},
        ("none", 8, -1, "no new VMs: the backlog of 120 requests falls by 2.5/s and is down in about 42 s, before new VMs serve (workers.time_to_serve 60 s)"),
    ),
    (
        "backlog-draining-after-the-vms-serve-clones",
        "scale_out",
        4,
        pressure(120, backlog_trend=-0.5, drain_s=240),
        {},
        {"workers": {"time_to_serve": 60}},
        {},
        ("act", 8, 3, "needs 1 more worker VM"),
    ),
    (
        "scale-in-by-demand",
        "scale_in",
        6,
        pressure(3),
        {},
        {"min": 1},
        {"workers": (("w1", 121), ("w2", 122), ("w3", 123))},
        ("act", 1, -1, "3 requests in flight and queued need 1 replicas at 4 each; resnet18: 6 → 1 replicas"),
    ),
    (
        "scale-in-keeps-the-stabilization-windows-highest",
        "scale_in",
        6,
        pressure(3),
        {"history": {"resnet18": [[NOW - 500, 8], [NOW - 100, 4], [NOW - 20, 2]]}},
        {"stabilization": {"scale_in": 300}},
        {},
        ("act", 4, -1, "the highest count desired in the last 300 s is 4 (stabilization); resnet18: 6 → 4 replicas"),
    ),
    (
        "a-dip-removes-nothing",
        "scale_in",
        4,
        pressure(0),
        {"history": {"resnet18": [[NOW - 30, 4]]}},
        {"stabilization": {"scale_in": 300}},
        {},
        ("none", 4, -1, "at its minimum"),
    ),
    ("scale-in-without-demand-moves-by-step", "scale_in", 4, {}, {}, {"step": 1}, {}, ("act", 3, -1, "resnet18: 4 → 3 replicas")),
    ("scale-in-at-the-minimum", "scale_in", 2, {}, {}, {"min": 2}, {}, ("none", 2, -1, "at its minimum of 2 replicas")),
    (
        "a-scheduled-floor-raises-to-it",
        "scale_out",
        1,
        {"source": "schedule", "min_replicas": 3, "until": NOW + 600, "values": {"schedule": "peak"}},
        {},
        {"step": 5},
        {},
        ("act", 3, -1, "scheduled for at least 3 replicas; resnet18: 1 → 3 replicas"),
    ),
    (
        "a-stored-floor-holds-through-a-scale-in",
        "scale_in",
        4,
        pressure(0),
        {"floors": {"resnet18": {"replicas": 3, "until": NOW + 60, "reason": "schedule peak"}}},
        {},
        {},
        ("act", 3, -1, "scheduled floor 3 replicas until"),
    ),
    (
        "an-expired-floor-holds-nothing",
        "scale_in",
        4,
        pressure(0),
        {"floors": {"resnet18": {"replicas": 3, "until": NOW - 1, "reason": "schedule peak"}}},
        {},
        {},
        ("act", 1, -1, "resnet18: 4 → 1 replicas"),
    ),
]


@pytest.mark.parametrize(
    ("direction", "replicas", "event", "state", "config", "options", "expected"), [case[1:] for case in CASES], ids=[case[0] for case in CASES]
)
def test_decisions(direction, replicas, event, state, config, options, expected):
    decision, target, grow_to, reason = expected
    plan = run(direction, replicas, event=event, state=state, config=settings(**config), **options)
    assert reason in plan["reason"], plan["reason"]
    assert (plan["decision"], plan["target_replicas"], plan["grow_to"]) == (decision, target, grow_to), plan["reason"]
    # A run that changes the replicas says so; one that only grows the pool asks for its replicas after the clone.
    assert plan["change_replicas"] == (decision == "act" and grow_to < 0 and target != replicas)


def test_max_scale_up_bounds_demand_not_a_step():
    # An event without demand adds its step in full, even above max_scale_up (the kill test's step of 6).
    plan = run("scale_out", 2, config=settings(step=6, max_scale_up=2), workers=(("w1", 121), ("w2", 122), ("w3", 123), ("w4", 124)),
               pool=(121, 122, 123, 124))  # fmt: skip
    assert (plan["decision"], plan["target_replicas"]) == ("act", 8), plan["reason"]
    assert run("scale_out", 2, event=pressure(40), config=settings(max_scale_up=2))["target_replicas"] == 4


def test_every_decision_records_the_count_it_desired_within_the_bounds():
    assert run("scale_out", 1, event=pressure(400))["record_desired"] == 8
    assert run("scale_in", 4, event=pressure(0), config=settings(min=2))["record_desired"] == 2
    assert run("scale_out", 2, event={"received_at": NOW - 90})["record_desired"] is None


def test_scale_in_removes_the_worker_the_rest_do_not_need_and_never_a_protected_one():
    workers = (("w1", 121), ("w2", 122), ("w3", 123))
    plan = run("scale_in", 6, event=pressure(4), workers=workers, pool=(121, 122, 123))
    assert (plan["target_replicas"], plan["leave_vmids"]) == (1, [123])
    protected = run("scale_in", 6, event=pressure(4), workers=workers, pool=(121, 122, 123), config=settings(protected=["w3", "122"]))
    assert protected["leave_vmids"] == [121]


def test_a_scale_in_destroys_pool_vms_that_never_joined_and_finishes_or_undoes_a_drain():
    workers = (("w1", 121), ("w2", 122), ("w3", 123))
    # A drain a killed scale-in left: the worker is not needed, so this run takes it out; VM 124 never joined.
    plan = run("scale_in", 2, workers=workers, drained=("w3",), pool=(121, 122, 123, 124), config=settings(min=2))
    assert (plan["orphan_vmids"], plan["leave_vmids"], plan["join_vmids"]) == ([124], [123], [])
    assert plan["decision"] == "act"
    # With the pool at its minimum of 3, the drained worker is kept: it comes back.
    kept = run("scale_in", 2, workers=workers, drained=("w3",), pool=(121, 122, 123), config=settings(min=2, pool={"min": 3, "max": 4, "cores": 2}))
    assert (kept["leave_vmids"], kept["join_vmids"], kept["decision"]) == ([], [123], "act")


def test_a_scale_out_joins_pool_vms_an_earlier_run_left_before_it_clones():
    # VM 123 was cloned by a run that was killed before the join: capacity on the way, not a reason to clone again.
    plan = run("scale_out", 4, event=pressure(24), pool=(121, 122, 123))
    assert plan["join_vmids"] == [123]
    assert plan["grow_to"] == -1
    assert plan["decision"] == "act"
    # Even when the demand asks for nothing more, the left VM is joined.
    idle = run("scale_out", 4, event=pressure(4), pool=(121, 122, 123))
    assert (idle["decision"], idle["join_vmids"]) == ("act", [123])


def test_a_service_the_swarm_lacks_is_named():
    request = {"action": "scale_out", "direction": "scale_out", "service": "densenet161", "event": {}}
    with pytest.raises(ValueError, match="the swarm has no replicated service densenet161; deploy it with playbooks/serve.yml first"):
        decide(request, settings(), {}, swarm(2), [121, 122], now=NOW)


def test_the_run_records_its_floor_bounds_desired_count_and_settings():
    scheduled = {"source": "schedule", "min_replicas": 3, "until": NOW + 600, "values": {"schedule": "peak"}}
    records = state_records(run("scale_out", 1, event=scheduled, config=settings(min=1, max=6)))
    assert records["floors"] == [{"replicas": 3, "until": NOW + 600, "reason": "schedule peak", "service": "resnet18"}]
    assert records["bounds"] == [{"service": "resnet18", "min": 3, "max": 6}]
    assert records["desired"] == [{"service": "resnet18", "replicas": 3}]
    assert records["settings"][0]["service"] == "resnet18" and records["settings"][0]["max"] == 6
    # A run that stopped before sizing (a cooldown) records no desired count, and no floor of its own.
    cooling = state_records(run("scale_out", 1, state={"last_actions": {"resnet18:scale_out": NOW - 1}}, config=settings(cooldown={"scale_out": 30})))
    assert (cooling["floors"], cooling["desired"]) == ([], [])


def test_the_audit_fields_are_numbers_even_for_a_run_that_stopped_early():
    acted = audit_fields(run("scale_out", 1, event=pressure(12)))
    assert acted == {"replicas_before": 1, "replicas_desired": 3, "replicas_target": 3, "capacity": 4}
    stale = audit_fields(run("scale_out", 2, event={"received_at": NOW - 90}))
    assert stale == {"replicas_before": -1, "replicas_desired": -1, "replicas_target": -1, "capacity": -1}


# The end of a run.

POOL_PLAN = {"pool": {"vmids": [121, 122, 123]}, "orphan_vmids": []}


@pytest.mark.parametrize(
    ("plan", "left", "expected"),
    [
        # The workers that left are destroyed; the pool keeps the rest.
        (POOL_PLAN, [123], {"remove_vmids": [123], "keep": 2, "return_vmids": []}),
        # Pool VMs that never joined go with them, each counted once.
        (dict(POOL_PLAN, orphan_vmids=[122]), [123, 122], {"remove_vmids": [122, 123], "keep": 1, "return_vmids": []}),
        # A VM that left but is no longer in the pool (another tool destroyed it) is not counted: counting it would make
        # the destroy take a running VM to reach the count.
        (POOL_PLAN, [123, 140], {"remove_vmids": [123], "keep": 2, "return_vmids": []}),
        # Ids as the inventory gives them (strings) are the same VMs.
        (POOL_PLAN, ["121"], {"remove_vmids": [121], "keep": 2, "return_vmids": []}),
        (POOL_PLAN, [], {"remove_vmids": [], "keep": 3, "return_vmids": []}),
        # A run whose decision failed has no pool: it destroys nothing.
        ({"decision": None, "orphan_vmids": []}, [123], {"remove_vmids": [], "keep": 0, "return_vmids": []}),
        # The warm pool takes back the VMs planned for it that are gone from the swarm; one that did not leave stays.
        (dict(POOL_PLAN, warm_return_vmids=[123, 122]), [123], {"remove_vmids": [], "keep": 3, "return_vmids": [123]}),
        (dict(POOL_PLAN, warm_return_vmids=[122], orphan_vmids=[121]), [123, 122], {"remove_vmids": [121, 123], "keep": 1, "return_vmids": [122]}),
    ],
)
def test_the_vms_a_run_destroys_are_those_that_left_or_never_joined_and_still_in_the_pool(plan, left, expected):
    assert vms_to_destroy(plan, left) == expected


SKIPPED = {"skipped": True, "changed": False}


@pytest.mark.parametrize(
    ("decision", "kwargs", "expected"),
    [
        # Nothing happened: not acted, the replicas as they were.
        ("not_acted", {}, ("not_acted", "at the maximum", 2, 3)),
        # A replica change noted earlier in the run.
        ("acted", {"fields": {"replicas_before": 2, "replicas_after": 4}}, ("acted", "at the maximum", 4, 3)),
        # A worker that failed to join fails the run, whatever it did before.
        ("acted", {"failures": ["w4 did not join: timeout"]}, ("failed", "at the maximum; w4 did not join: timeout", 2, 3)),
        ("failed", {}, ("failed", "at the maximum", 2, 3)),
        # Destroyed VMs: acted, one worker fewer, the reason names them.
        ("not_acted", {"destroyed": {"removed": [123], "changed": True}}, ("acted", "at the maximum; removed VMs 123", 2, 2)),
        # A skipped destroy and a skipped replica change are not actions.
        ("not_acted", {"destroyed": SKIPPED, "replicas_after_join": SKIPPED}, ("not_acted", "at the maximum", 2, 3)),
        # New VMs joined and the replicas grew onto them.
        (
            "acted",
            {"created": [{"vmid": 124}], "joined": ["w4"], "replicas_after_join": {"replicas": 6, "previous_replicas": 4}},
            ("acted", "at the maximum; joined w4", 6, 4),
        ),
        # The replica count after the join was already right: not by itself an action.
        ("not_acted", {"replicas_after_join": {"replicas": 4, "previous_replicas": 4}}, ("not_acted", "at the maximum", 4, 3)),
        # A worker that left went back to the warm pool, made ready there: acted, one worker fewer, nothing destroyed.
        ("not_acted", {"returned": [{"vmid": 123}], "warmed": ["w3"]}, ("acted", "at the maximum; made warm VMs ready: w3", 2, 2)),
        # Only a warm VM a killed run left half-made, made ready: acted, the workers as they were.
        ("not_acted", {"warmed": ["warm-131"]}, ("acted", "at the maximum; made warm VMs ready: warm-131", 2, 3)),
    ],
)
def test_how_a_run_ended(decision, kwargs, expected):
    fields = kwargs.pop("fields", {"replicas_before": 2})
    outcome = run_outcome(POOL_PLAN, decision, "at the maximum", fields, **kwargs)
    assert (outcome["decision"], outcome["reason"], outcome["fields"]["replicas_after"], outcome["fields"]["workers_after"]) == expected
    assert outcome["fields"]["replicas_before"] == fields["replicas_before"]


def test_a_run_that_never_sized_reports_minus_one_replicas_after():
    outcome = run_outcome({"decision": None}, "failed", "", {})
    assert (outcome["decision"], outcome["fields"]) == ("failed", {"replicas_after": -1, "workers_after": 0})


# Decisions not to act, recorded for the event sources.

QUIET_CASES = [
    # (id, direction, replicas, event, state, config, options, expected quiet: None for no record, else (replicas, desired, until))
    ("scale-in-at-the-minimum", "scale_in", 2, pressure(0), {}, {"min": 2}, {}, (2, 2, None)),
    ("scale-out-at-the-maximum", "scale_out", 4, pressure(40), {}, {"max": 4}, {}, (4, 4, None)),
    # The demand is met: the same demand (or less) on the same replicas meets the same decision.
    ("scale-out-demand-met", "scale_out", 3, pressure(12), {}, {"max": 8}, {}, (3, 3, None)),
    # Stabilization: time alone lowers the target when the first count above the demand's leaves the window.
    (
        "scale-in-held-by-the-window",
        "scale_in",
        4,
        pressure(4),
        {"history": {"resnet18": [[NOW - 250, 4], [NOW - 100, 4], [NOW - 50, 1]]}},
        {"min": 1, "stabilization": {"scale_in": 300}},
        {},
        (4, 1, NOW + 50),
    ),
    # A scheduled floor holds the replicas until it ends.
    (
        "scale-in-held-by-a-floor",
        "scale_in",
        3,
        pressure(0),
        {"floors": {"resnet18": {"replicas": 3, "until": NOW + 600, "reason": "schedule peak"}}},
        {"min": 1},
        {},
        (3, 3, NOW + 600),
    ),
    # No record: a run that acts, one stopped by a cooldown (the sources check cooldowns themselves) or a stale event,
    # and VMs held back on a falling backlog, whose trend changes by itself.
    ("acts", "scale_out", 2, pressure(12), {}, {"max": 8}, {}, None),
    ("cooling-down", "scale_in", 4, pressure(0), {"last_actions": {"resnet18:scale_in": NOW - 10}}, {"cooldown": {"scale_in": 60}}, {}, None),
    ("stale", "scale_in", 2, {"received_at": NOW - 90, "values": {"backlog": 0}}, {}, {"min": 2}, {}, None),
    (
        "vms-held-on-a-falling-backlog",
        "scale_out",
        4,
        pressure(30, backlog_trend=-2.0, drain_s=15.0),
        {},
        {"max": 8, "workers": {"time_to_serve": 180}},
        {},
        None,
    ),
]


@pytest.mark.parametrize(
    ("direction", "replicas", "event", "state", "config", "options", "expected"),
    [case[1:] for case in QUIET_CASES],
    ids=[case[0] for case in QUIET_CASES],
)
def test_a_decision_not_to_act_records_what_it_was_made_on(direction, replicas, event, state, config, options, expected):
    plan = run(direction, replicas, event=event, state=state, config=settings(**config), **options)
    records = state_records(plan)["quiet"]
    if expected is None:
        assert records == [], plan["reason"]
        return
    assert plan["decision"] == "none", plan["reason"]
    assert records == [{"service": "resnet18", "direction": direction, "replicas": expected[0], "desired": expected[1], "until": expected[2]}]


WARM = [{"service": "resnet18", "warm_replicas": 1}, {"service": "densenet161"}]


DESIRED_4 = [{"service": "resnet18", "replicas": 4}]


@pytest.mark.parametrize(
    ("service", "direction", "stage", "decision", "fields", "after_join", "desired", "expected"),
    [
        # A scale-out lends the standby at once; a scale-in hands lent standby back before it removes a replica.
        ("resnet18", "scale_out", "start", "", None, None, None, ("promoted", 0)),
        ("resnet18", "scale_in", "start", "", None, None, None, ("standby", 0)),
        # A service without standby, or an unknown direction: nothing.
        ("densenet161", "scale_out", "start", "", None, None, None, ("", 0)),
        ("nosuch", "scale_out", "start", "", None, None, None, ("", 0)),
        ("resnet18", "", "start", "", None, None, None, ("", 0)),
        # A scale-out whose replicas reach the desired count returns them once those replicas are up in the proxy ...
        ("resnet18", "scale_out", "finish", "acted", {"replicas_before": 2, "replicas_after": 4}, None, DESIRED_4, ("standby", 4)),
        # ... counting those after the join when it grew the pool ...
        ("resnet18", "scale_out", "finish", "acted", {"replicas_after": 3}, {"replicas": 4, "previous_replicas": 3}, DESIRED_4, ("standby", 4)),
        ("resnet18", "scale_out", "finish", "acted", {"replicas_after": 4}, {"skipped": True}, DESIRED_4, ("standby", 4)),
        # ... and also when it did not act because an earlier run (one killed before its return) left them there.
        ("resnet18", "scale_out", "finish", "not_acted", {"replicas_before": 4}, None, DESIRED_4, ("standby", 4)),
        # Short of the desired count (no room, a cooldown, the pool still growing): the standby goes on serving.
        ("resnet18", "scale_out", "finish", "acted", {"replicas_after": 3}, None, DESIRED_4, ("", 0)),
        ("resnet18", "scale_out", "finish", "not_acted", {"replicas_before": 2}, None, DESIRED_4, ("", 0)),
        ("resnet18", "scale_out", "finish", "failed", {"replicas_after": 4}, None, DESIRED_4, ("", 0)),
        # Another service's desired count says nothing about this one; with none recorded, only an action returns them.
        ("resnet18", "scale_out", "finish", "acted", {"replicas_after": 2}, None, [{"service": "densenet161", "replicas": 9}], ("standby", 2)),
        ("resnet18", "scale_out", "finish", "not_acted", {"replicas_before": 2}, None, [], ("", 0)),
        # Never a wait for 0 own servers.
        ("resnet18", "scale_out", "finish", "acted", {}, None, None, ("standby", 1)),
        # A scale-in returned them at its start.
        ("resnet18", "scale_in", "finish", "acted", {"replicas_after": 2}, None, DESIRED_4, ("", 0)),
    ],
)
def test_what_a_run_does_with_the_standby_replicas(service, direction, stage, decision, fields, after_join, desired, expected):
    from ansible_collections.mlfleet.serving.plugins.module_utils._scale_decision import standby_step

    step = standby_step(WARM, service, direction, stage, decision=decision, fields=fields, replicas_after_join=after_join, desired=desired)
    assert (step["state"], step["serving_before_return"]) == expected


@pytest.mark.parametrize(
    ("serving", "stage", "message"),
    [
        ([{"service": "resnet18", "warm_replicas": "two"}], "start", "warm_replicas of resnet18 must be a whole number, got 'two'"),
        ([{"service": "resnet18", "warm_replicas": -1}], "start", "warm_replicas of resnet18 must be 0 or more, got -1"),
        (WARM, "end", "stage must be start or finish, got 'end'"),
    ],
)
def test_a_standby_setting_that_cannot_be_used_is_named(serving, stage, message):
    from ansible_collections.mlfleet.serving.plugins.module_utils._scale_decision import standby_step

    with pytest.raises(ValueError, match=re.escape(message)):
        standby_step(serving, "resnet18", "scale_out", stage)


PROMOTED = {"state": "promoted", "serving_before_return": 0}
RETURN_AT_4 = {"state": "standby", "serving_before_return": 4}


@pytest.mark.parametrize(
    ("step", "stage", "proxies", "expected"),
    [
        # No step: nothing recorded, whatever the hosts noted.
        ({"state": "", "serving_before_return": 0}, "start", [{"scale_standby_failure": "m1: x"}], ({}, {}, [])),
        # A promotion in two proxies: lent, what the first one has up, the seconds until both were done.
        (
            PROMOTED,
            "start",
            [{"scale_standby_set": {"serving": 1}}, {"scale_standby_set": {"serving": 1}}],
            ({"standby_lent": 1, "standby_serving": 1}, {"standby_s": 2.5}, []),
        ),
        # A scale-in's return at the start lends nothing; a host that failed is named, the others still count.
        (
            {"state": "standby", "serving_before_return": 0},
            "start",
            [{"scale_standby_failure": "m1: standby standby failed: no socket"}, {"scale_standby_set": {"serving": 0}}],
            ({"standby_lent": 0, "standby_serving": 0}, {"standby_s": 2.5}, ["m1: standby standby failed: no socket"]),
        ),
        # No proxy host at all: the step is recorded with nothing serving.
        (PROMOTED, "start", [], ({"standby_lent": 1, "standby_serving": 0}, {"standby_s": 2.5}, [])),
        # Returned 4 s into the run.
        (
            RETURN_AT_4,
            "finish",
            [{"scale_standby_returned": {"changed": True}, "scale_standby_returned_at": 1004.0}],
            ({"standby_returned": 1, "standby_held": 0}, {"standby_return_s": 4.0}, []),
        ),
        # Held: the service's own replicas did not come up; the module's message says why, before the hosts' failures.
        (
            RETURN_AT_4,
            "finish",
            [
                {"scale_standby_returned": {"changed": False, "held": True, "msg": "2 of 4 up"}},
                {"scale_standby_return_failure": "m2: standby return failed: x"},
            ],
            ({"standby_returned": 0, "standby_held": 1}, {}, ["2 of 4 up", "m2: standby return failed: x"]),
        ),
        # Already at standby (a re-run): neither returned nor held.
        (RETURN_AT_4, "finish", [{"scale_standby_returned": {"changed": False}}], ({"standby_returned": 0, "standby_held": 0}, {}, [])),
    ],
)
def test_what_the_proxies_did_with_the_standby_is_recorded_as_numbers(step, stage, proxies, expected):
    from ansible_collections.mlfleet.serving.plugins.module_utils._scale_decision import standby_record

    record = standby_record(step, stage, proxies, 1000.0, 1002.5)
    assert (record["fields"], record["phases"], record["reasons"]) == expected
    assert all(isinstance(value, (int, float)) and not isinstance(value, bool) for value in {**record["fields"], **record["phases"]}.values())


def test_a_standby_record_of_an_unknown_stage_is_refused():
    from ansible_collections.mlfleet.serving.plugins.module_utils._scale_decision import standby_record

    with pytest.raises(ValueError, match="stage must be start or finish, got 'end'"):
        standby_record(PROMOTED, "end", [], 0, 0)


WARM_POOL = {"name": "cpu", "tag": "swarm_worker", "count": 2, "max_count": 5, "warm_vms": 2, "warm_form": "joined", "warm_tag": "swarm_worker_warm"}


def vm_plan(direction="scale_out", decision="act", grow_to=-1, change_replicas=False, leave=(), orphans=(), current=2):
    return {
        "direction": direction,
        "decision": decision,
        "current_replicas": current,
        "grow_to": grow_to,
        "change_replicas": change_replicas,
        "leave_vmids": list(leave),
        "orphan_vmids": list(orphans),
        "reason": "demand 9",
    }


@pytest.mark.parametrize(
    ("plan", "vmids", "warm", "expected"),
    [
        # Replicas on the current workers only: nothing taken, the warm pool is full.
        (vm_plan(change_replicas=True), [1, 2], [7, 8], (0, 0, -1, [], "")),
        # One VM more: taken from the warm pool; with 3 active and max_count 5, it refills to 2.
        (vm_plan(grow_to=3), [1, 2], [7, 8], (1, 0, 2, [], "capacity from 1 warm VM (joined)")),
        # Two more: both warm VMs; 4 active leave room for 1 warm VM.
        (vm_plan(grow_to=4, change_replicas=True), [1, 2], [7, 8], (2, 0, 1, [], "capacity from replicas on the current workers, 2 warm VMs (joined)")),
        # Three more: two warm, one clone; 5 active leave no room for a warm VM.
        (vm_plan(grow_to=5), [1, 2], [7, 8], (2, 1, -1, [], "capacity from 2 warm VMs (joined), 1 new clone")),
        # No warm VM (a site without warm_vms, or one taken by a run killed before its refill): clones; refilled after.
        (vm_plan(grow_to=3), [1, 2], [], (0, 1, 2, [], "")),
        # A scale-in that takes one VM out makes room: the warm pool, short of one, takes that VM back.
        (vm_plan("scale_in", grow_to=-1, leave=[3]), [1, 2, 3, 4], [7], (0, 0, 2, [3], "VM 3 back to the warm pool, which lacks 1")),
        # Two out, the pool short of one: the first goes back, the other is destroyed.
        (vm_plan("scale_in", leave=[4, 3]), [1, 2, 3, 4], [7], (0, 0, 2, [4], "VM 4 back to the warm pool, which lacks 1")),
        # Short of two: a VM that never joined (cloned by a killed run) goes back beside the one that left.
        (vm_plan("scale_in", leave=[4], orphans=[3, 4]), [1, 2, 3, 4], [], (0, 0, 2, [4, 3], "VMs 4, 3 back to the warm pool, which lacks 2")),
        # The warm pool is full: the VM that left is destroyed.
        (vm_plan("scale_in", leave=[3]), [1, 2, 3], [7, 8], (0, 0, -1, [], "")),
        # max_count leaves room for one warm VM beside the 4 that stay; the pool has it.
        (vm_plan("scale_in", leave=[5]), [1, 2, 3, 4, 5], [7], (0, 0, -1, [], "")),
        # A decision not to act refills nothing, whatever the pool lacks.
        (vm_plan(decision="none"), [1, 2], [], (0, 0, -1, [], "")),
        (vm_plan("scale_in", decision="none", leave=[2]), [1, 2], [], (0, 0, -1, [], "")),
        # More warm VMs than warm_vms (a lowered setting): never destroyed here.
        (vm_plan(grow_to=3), [1, 2], [6, 7, 8, 9], (1, 0, -1, [], "capacity from 1 warm VM (joined)")),
    ],
)
def test_a_scale_out_takes_warm_vms_before_it_clones_and_the_pool_refills_within_max_count(plan, vmids, warm, expected):
    from ansible_collections.mlfleet.serving.plugins.module_utils._scale_decision import warm_vm_plan

    # Every warm VM a paused node of the swarm, as made ready.
    nodes = [{"vmid": vmid, "status": "ready", "availability": "pause", "role": "worker"} for vmid in warm]
    result = warm_vm_plan(plan, dict(WARM_POOL, vmids=vmids, warm_vmids=warm), nodes)
    assert (result["warm_take"], result["clone_vms"], result["warm_refill_to"], result["warm_return_vmids"]) == expected[:4]
    assert result["reason"] == "; ".join(part for part in ["demand 9", expected[4]] if part)
    assert (result["decision"], result["warm_unready_vmids"]) == (plan["decision"], [])
    assert result["warm_vmids"] == sorted(warm)


def warm_node(vmid, status="ready"):
    return {"vmid": vmid, "status": status, "availability": "pause", "role": "worker"}


@pytest.mark.parametrize(
    ("plan", "form", "nodes", "expected"),
    [
        # Warm VM 8 is no node of the swarm (a run killed before it joined): a run with nothing to do acts to make it
        # ready, keeping the warm pool's count.
        (vm_plan(decision="none"), "joined", [warm_node(7)], ("act", [8], 2)),
        # Both out: both made ready, beside a scale-out of replicas.
        (vm_plan(change_replicas=True), "joined", [], ("act", [7, 8], 2)),
        # A warm VM whose node is down failed: not waited for.
        (vm_plan(decision="none"), "joined", [warm_node(7), warm_node(8, status="down")], ("none", [], -1)),
        # A run stopped by its cooldown or a stale event (no replicas read) does nothing.
        (vm_plan(decision="none", current=None), "joined", [], ("none", [], -1)),
        # A run that takes warm VMs leaves the choice to the take.
        (vm_plan(grow_to=3), "joined", [warm_node(7)], ("act", [], 2)),
        # The running and stopped forms are no swarm nodes by design.
        (vm_plan(decision="none"), "running", [], ("none", [], -1)),
        (vm_plan(decision="none"), "stopped", [], ("none", [], -1)),
    ],
)
def test_a_warm_vm_a_killed_run_left_out_of_the_swarm_is_made_ready_by_the_next_run(plan, form, nodes, expected):
    from ansible_collections.mlfleet.serving.plugins.module_utils._scale_decision import warm_vm_plan

    result = warm_vm_plan(plan, dict(WARM_POOL, warm_form=form, vmids=[1, 2], warm_vmids=[7, 8]), nodes)
    assert (result["decision"], result["warm_unready_vmids"], result["warm_refill_to"]) == expected
    if expected[1]:
        assert f"not ready in the swarm (a run killed while it made {'it' if len(expected[1]) == 1 else 'them'} ready): made ready" in result["reason"]


def gpu_swarm(replicas):
    """resnet18 reserving one GPU per replica on workers w1, w2 that advertise 2 GPUs each and have CPUs to spare."""
    state = swarm(replicas, cpus=0.25)
    for worker in state["nodes"][1:]:
        worker["generic"] = {"NVIDIA-GPU": 2}
    state["services"]["resnet18"]["generic"] = {"NVIDIA-GPU": 1}
    return state


@pytest.mark.parametrize(
    ("pool_gpus", "grow_to", "reason"),
    [
        (2, 3, "2 replicas per new worker of 2 CPUs and 2 NVIDIA-GPU"),
        # A pool whose VMs bring no GPU (the CPU pool) is never grown for a GPU service.
        (0, -1, "a new worker of the pool brings no generic resources, a replica reserves 1 NVIDIA-GPU"),
    ],
)
def test_a_gpu_service_grows_only_a_pool_whose_vms_bring_gpus(pool_gpus, grow_to, reason):
    config = settings(pool=POOL | {"gpus": pool_gpus})
    request = {"action": "scale_out", "direction": "scale_out", "service": "resnet18", "event": pressure(20)}
    plan = decide(request, config, {}, gpu_swarm(4), [121, 122], now=NOW)
    assert plan["grow_to"] == grow_to, plan["reason"]
    assert reason in plan["reason"]
