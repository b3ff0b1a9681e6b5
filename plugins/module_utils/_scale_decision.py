# Copyright (c) mlfleet.serving maintainers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The autoscaler's decision core: from an event, the settings, the scaler state and the swarm to a whole plan.

One pure function, ``decide``, makes every decision the scale playbooks act on; the playbooks only execute its plan.
It settles the effective settings of a service (``effective_settings``), refuses a stale event, keeps to the
cooldowns and the scheduled floors recorded in the scaler state (the lease file), sizes the replicas from demand
(``desired_replicas``), keeps a scale-in to the highest desired count of the stabilization window, and leaves the
capacity arithmetic (which replicas fit, which VMs to add or remove) to ``_scale_plan``.

Demand-driven scaling, as Kubernetes' HPA sizes a deployment (``ceil(current × metric / target)``): an event that
carries the backlog of a service (in-flight plus queued requests, as the serving_pressure source measures it at the
edge proxy) asks for ``ceil(backlog / target_per_replica)`` replicas, reached in one decision unless ``max_scale_up``
stops it. Events without demand (Grafana alerts, whose values are CPU means; schedules; a run by hand) move by
``step``. A scale-in goes no lower than the highest count desired within ``stabilization.scale_in`` seconds, so a dip
in the load removes nothing.

A ValueError always names the setting or the object at fault and how to fix it.
"""

from __future__ import annotations

import math
import time

from ansible_collections.mlfleet.serving.plugins.module_utils._lease import HISTORY_SECONDS
from ansible_collections.mlfleet.serving.plugins.module_utils._scale_plan import plan_scale_in, plan_scale_out

ACTIONS = ("scale_out", "scale_in", "scale_replicas")
DIRECTIONS = ("scale_out", "scale_in")

# The defaults of the inventory variable mlfleet_autoscale; the worker pool's bounds come from its mlfleet_worker_pools entry.
DEFAULTS = {
    # Per service: min/max replicas, the step of an event without demand, the in-flight and queued requests one replica
    # is sized for, and the most replicas one decision adds; services.<name> overrides any of them for one service.
    # target_per_replica: a ResNet-18 replica at 0.25 CPU (one TorchServe worker) answers the most per second with 2 in
    # flight; more only wait in its queue (bench/REPORT.md, "One replica's target").
    "replicas": {"min": 1, "max": 8, "step": 1, "target_per_replica": 2.0, "max_scale_up": 4},
    "services": {},
    # The worker VM pool: grown by at most step VMs at once. time_to_serve: seconds from the clone until a new VM's
    # replicas serve; a demand-driven scale-out whose backlog is falling and gone within it clones no VMs (0: always).
    "workers": {"step": 1, "time_to_serve": 180},
    # Seconds after an action of a service before the next of the same direction; a scale-in also waits
    # scale_in_after_scale_out seconds after the service's last scale-out.
    "cooldown": {"scale_out": 30, "scale_in": 120, "scale_in_after_scale_out": 300},
    # A scale-in keeps the highest count desired within these seconds (Kubernetes' HPA: 300 s).
    "stabilization": {"scale_in": 300},
    # Worker host names or VM ids that a scale-in never removes.
    "protected": [],
    # Seconds after which an event is too old to act on.
    "max_event_age": 60,
    "drain_timeout": 300,
}


# Settings.


def merge(base, override):
    """``override`` laid over ``base``, mappings merged key by key (as Ansible's combine with recursive=True)."""
    merged = dict(base)
    for key, value in (override or {}).items():
        merged[key] = merge(base[key], value) if isinstance(base.get(key), dict) and isinstance(value, dict) else value
    return merged


def number(path, value, minimum, whole=False, above=False, fix=""):
    """``value`` as an int (``whole``) or a float, at least ``minimum`` (above it with ``above``); ValueError naming ``path``."""
    try:
        if isinstance(value, bool):
            raise ValueError
        converted = float(value)
        if whole:
            if converted != int(converted):
                raise ValueError
            converted = int(converted)
    except (TypeError, ValueError, OverflowError):
        kind = "a whole number" if whole else "a number"
        raise ValueError(f"mlfleet_autoscale.{path} must be {kind}, got {value!r}; {fix}") from None
    if not math.isfinite(converted) or converted < minimum or (above and converted <= minimum):
        bound = f"above {minimum:g}" if above else f"{minimum:g} or more"
        raise ValueError(f"mlfleet_autoscale.{path} must be {bound}, got {value!r}; {fix}")
    return converted


def effective_settings(autoscale, service, workers):
    """The settings that hold for ``service``: DEFAULTS, the inventory's ``mlfleet_autoscale`` over them, its
    ``services[service]`` over the replica settings, and the worker pool's bounds from ``workers``
    (``{name, min, max, cores, gpus}``, from the service's entry of mlfleet_worker_pools: count, max_count, cores,
    pci_mapping.count).
    Checked; a ValueError names the setting and the fix."""
    if autoscale is not None and not isinstance(autoscale, dict):
        raise ValueError(f"mlfleet_autoscale must be a mapping, got {type(autoscale).__name__}; see the README's autoscaling section")
    merged = merge(DEFAULTS, autoscale or {})
    per_service = merged.get("services") or {}
    if not isinstance(per_service, dict):
        raise ValueError("mlfleet_autoscale.services must be a mapping of service name to replica settings, such as {resnet18: {min: 2}}")
    override = per_service.get(service) or {}
    if not isinstance(override, dict):
        raise ValueError(f"mlfleet_autoscale.services.{service} must be a mapping such as {{min: 2, max: 8}}, got {override!r}")
    replicas = merge(merged["replicas"], override)
    prefix = f"services.{service}" if override else "replicas"
    settings = {
        "min": number(f"{prefix}.min", replicas["min"], 0, whole=True, fix="give the fewest replicas the service keeps"),
        "max": number(f"{prefix}.max", replicas["max"], 1, whole=True, fix="give the most replicas the service may run"),
        "step": number(f"{prefix}.step", replicas["step"], 0, whole=True, fix="give the replicas one event without demand adds or removes"),
        "target_per_replica": number(
            f"{prefix}.target_per_replica", replicas["target_per_replica"], 0, above=True, fix="give the requests in flight and queued one replica is sized for"
        ),
        "max_scale_up": number(f"{prefix}.max_scale_up", replicas["max_scale_up"], 1, whole=True, fix="give the most replicas one demand-driven decision adds"),
    }
    if settings["min"] > settings["max"]:
        raise ValueError(f"mlfleet_autoscale.{prefix}: min {settings['min']} is above max {settings['max']}; lower min or raise max")
    cooldown = merged["cooldown"]
    settings["cooldown"] = {
        key: number(f"cooldown.{key}", cooldown.get(key), 0, fix="give seconds, 0 for none") for key in ("scale_out", "scale_in", "scale_in_after_scale_out")
    }
    settings["stabilization"] = {
        "scale_in": number("stabilization.scale_in", merged["stabilization"].get("scale_in"), 0, fix="give seconds, 0 for none"),
    }
    if settings["stabilization"]["scale_in"] > HISTORY_SECONDS:
        raise ValueError(
            f"mlfleet_autoscale.stabilization.scale_in must be at most {HISTORY_SECONDS} s (the history the scaler state keeps), "
            f"got {settings['stabilization']['scale_in']:g}"
        )
    # The pool's bounds come from its mlfleet_worker_pools entry unless mlfleet_autoscale.workers sets them.
    source = f"mlfleet_worker_pools pool {(workers or {}).get('name', '?')}"
    user_workers = (autoscale or {}).get("workers") or {}
    if not isinstance(user_workers, dict):
        raise ValueError(f"mlfleet_autoscale.workers must be a mapping such as {{step: 1}}, got {user_workers!r}")
    pool = merge(merge(DEFAULTS["workers"], workers or {}), user_workers)
    settings["workers"] = {
        "min": number(f"workers.min ({source} count)", pool.get("min"), 0, whole=True, fix="give the fewest worker VMs"),
        "max": number(f"workers.max ({source} max_count)", pool.get("max"), 0, whole=True, fix="give the most worker VMs"),
        "step": number("workers.step", pool["step"], 0, whole=True, fix="give the most worker VMs one run adds or removes"),
        "time_to_serve": number("workers.time_to_serve", pool["time_to_serve"], 0, fix="give seconds, 0 to always clone"),
        "cores": number(f"workers.cores ({source} cores)", pool.get("cores"), 0, above=True, fix="give the CPUs of a new worker VM"),
        # The GPUs a new worker VM brings (its pci_mapping.count): a service that reserves GPUs grows only such a pool.
        "gpus": number(f"workers.gpus ({source} pci_mapping.count)", pool.get("gpus", 0), 0, whole=True, fix="give the GPUs of a new worker VM"),
    }
    if settings["workers"]["min"] > settings["workers"]["max"]:
        raise ValueError(
            f"the worker pool's min {settings['workers']['min']} ({source} count) is above its max "
            f"{settings['workers']['max']} ({source} max_count); raise max_count"
        )
    protected = merged.get("protected") or []
    if not isinstance(protected, list):
        raise ValueError(f"mlfleet_autoscale.protected must be a list of worker host names or VM ids, got {protected!r}")
    settings["protected"] = [str(entry) for entry in protected]
    settings["max_event_age"] = number("max_event_age", merged["max_event_age"], 0, above=True, fix="give seconds")
    settings["drain_timeout"] = number("drain_timeout", merged["drain_timeout"], 1, fix="give the seconds a drain may take")
    return settings


# Demand and the desired count.


def event_demand(values):
    """The requests in flight and queued an event reports (``backlog``, else ``inflight`` + ``queued``), or None."""
    values = values if isinstance(values, dict) else {}

    def figure(key):
        value = values.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            return None
        return value

    backlog = figure("backlog")
    if backlog is not None:
        return backlog
    inflight, queued = figure("inflight"), figure("queued")
    return None if inflight is None or queued is None else inflight + queued


def desired_replicas(demand, target_per_replica):
    """``ceil(demand / target_per_replica)``, 0 for no demand; a hair over a whole multiple does not add a replica."""
    return max(0, math.ceil(demand / target_per_replica - 1e-9))


def stabilized(history, now, window):
    """The highest desired count recorded within ``window`` seconds before ``now``, or None."""
    recent = [count for at, count in history if now - at <= window]
    return max(recent) if recent else None


# The decision.


def settle_request(action, direction, service, event, known_services):
    """``{action, direction, service, event}`` of a run: the playbook's scale_action; the direction from the action, else
    from scale_direction or the event's action; the service from scale_service, else the event's. ValueError naming the fix."""
    event = event if isinstance(event, dict) else {}
    action = action or ""
    if action in DIRECTIONS:
        direction = action
    direction = direction or event.get("action") or ""
    service = service or event.get("service") or ""
    if action not in ACTIONS:
        raise ValueError(f"scale_action must be one of {', '.join(ACTIONS)} (set by the playbook you run), got {action!r}")
    if direction not in DIRECTIONS:
        raise ValueError(f"scale_direction must be scale_out or scale_in (scale_replicas.yml needs -e scale_direction=...), got {direction!r}")
    if service not in known_services:
        raise ValueError(f"scale_service must be one of the services in mlfleet_serving ({', '.join(known_services) or 'none'}), got {service!r}")
    return {"action": action, "direction": direction, "service": service, "event": event}


def scheduled_floor(event, now):
    """The floor a scale_schedule event asks for ``{replicas, until, reason}``, {} for another event or one whose window ended."""
    if (event or {}).get("source") != "schedule":
        return {}
    replicas, until = event.get("min_replicas"), event.get("until")
    if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1:
        raise ValueError(f"an event of the scale_schedule source needs min_replicas of 1 or more, got {replicas!r}")
    if isinstance(until, bool) or not isinstance(until, (int, float)) or until <= 0:
        raise ValueError(f"an event of the scale_schedule source needs until (epoch seconds), got {until!r}")
    if until <= now:
        return {}
    return {"replicas": replicas, "until": float(until), "reason": f"schedule {(event.get('values') or {}).get('schedule', '?')}"}


def cooldown_left(direction, service, settings, last_actions, now):
    """Seconds the cooldown still holds, and why; (0, '') when it is over."""
    since_same = now - last_actions.get(f"{service}:{direction}", 0)
    wait_same = settings["cooldown"][direction] - since_same
    wait_out = 0.0
    since_out = now - last_actions.get(f"{service}:scale_out", 0)
    if direction == "scale_in":
        wait_out = settings["cooldown"]["scale_in_after_scale_out"] - since_out
    left = max(wait_same, wait_out, 0.0)
    if left <= 0:
        return 0.0, ""
    if wait_same >= wait_out:
        why = f"last {direction} {round(since_same)} s ago, cooldown {settings['cooldown'][direction]:g} s"
    else:
        why = f"last scale_out {round(since_out)} s ago; no scale_in within {settings['cooldown']['scale_in_after_scale_out']:g} s of one"
    return round(left, 1), f"{service}: {direction} is cooling down for {round(left)} s more ({why})"


def new_worker_generic(settings, spec):
    """What a new worker VM of the pool brings of each kind the service reserves: the pool's GPUs per VM (its
    pci_mapping.count) of the service's GPU kind; nothing for a pool without GPUs."""
    gpus = settings["workers"].get("gpus") or 0
    return {kind: gpus for kind in ((spec or {}).get("generic") or {})} if gpus else {}


def pool_swarm(swarm, pool_tag):
    """The swarm as one worker pool sees it: the managers and the workers whose node label mlfleet.pool is the pool's
    tag. A service runs on its pool only (its placement constraint), so its room and the workers a scale-in may take
    are counted there; the tasks of other services on those workers still hold their share."""
    if pool_tag is None:
        return swarm
    nodes = [node for node in swarm["nodes"] if node["role"] == "manager" or node.get("pool") == pool_tag]
    return dict(swarm, nodes=nodes)


def decide(request, settings, state, swarm, pool_vmids, now=None, pool_tag=None):
    """The whole plan of one scale run.

    ``request``: ``{action, direction, service, event}``, the event as the rulebook passes it (may be empty);
    ``settings``: ``effective_settings`` of the service; ``state``: the scaler state as the lease module returns it
    (``last_actions``, ``floors`` (the highest live one per service), ``history`` ({service: [[at, desired]]}));
    ``swarm``: ``{nodes, services, tasks}`` as ``_scale_plan.normalise`` makes them; ``pool_vmids``: the VM ids of the
    pool's VMs in the inventory; ``pool_tag``: the pool's tag, whose workers alone count (all workers when None).

    Returns ``{decision, reason, ...}``: ``decision`` is V(act) when the plan changes something, else V(none); the plan
    names the replica target, the pool size to grow to (``grow_to``, -1 for none) and exactly which VMs join, leave or
    are destroyed, the desired count to record in the state's history, and the figures for the audit trail.
    """
    now = time.time() if now is None else now
    swarm = pool_swarm(swarm, pool_tag)
    action, direction, service = request["action"], request["direction"], request["service"]
    event = request.get("event") or {}
    values = event.get("values") if isinstance(event.get("values"), dict) else {}
    services = swarm["services"]
    pool_vmids = sorted({int(vmid) for vmid in pool_vmids})
    plan = {
        "decision": "none",
        "reason": "",
        "action": action,
        "direction": direction,
        "service": service,
        "source": event.get("source") or "manual",
        "current_replicas": None,
        "desired_replicas": None,
        "target_replicas": None,
        "min_replicas": settings["min"],
        "max_replicas": settings["max"],
        "demand": None,
        "capacity": None,
        "cooldown_left": 0.0,
        "floor": {},
        "change_replicas": False,
        "grow_to": -1,
        "add_workers": 0,
        "hold_vms": False,
        "join_vmids": [],
        "leave_vmids": [],
        "orphan_vmids": [],
        "active_vmids": [],
        "record_desired": None,
        "quiet": {},
        "quiet_until": None,
        "protected_vmids": sorted(int(entry) for entry in settings["protected"] if entry.isdigit()),
        "settings": settings,
    }

    received_at = event.get("received_at")
    if isinstance(received_at, (int, float)) and not isinstance(received_at, bool) and received_at > 0:
        age = now - received_at
        if age > settings["max_event_age"]:
            plan["reason"] = (
                f"the event is {round(age)} s old (more than max_event_age, {settings['max_event_age']:g} s): the condition may have passed; "
                "a fresh event follows while it lasts"
            )
            return plan

    # The floors of earlier scheduled scale-outs come from the scaler state; this run's own from its event.
    own = scheduled_floor(event, now)
    stored = (state.get("floors") or {}).get(service) or {}
    if stored and stored.get("until", 0) <= now:
        stored = {}
    floor = max((f for f in (stored, own) if f), key=lambda f: f["replicas"], default={})
    min_replicas = max(settings["min"], min(floor.get("replicas", 0), settings["max"]))
    plan.update(floor=own, min_replicas=min_replicas)
    floor_reason = ""
    if floor:
        floor_reason = (
            f"scheduled floor {floor['replicas']} replicas until {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(floor['until']))} ({floor.get('reason', '')})"
        )
        if floor["replicas"] > settings["max"]:
            floor_reason += f"; capped at the maximum of {settings['max']}"

    left, why = cooldown_left(direction, service, settings, state.get("last_actions") or {}, now)
    if left > 0:
        plan.update(cooldown_left=left, reason=why)
        return plan

    spec = services.get(service)
    if spec is None or spec.get("mode") != "replicated":
        raise ValueError(f"the swarm has no replicated service {service}; deploy it with playbooks/serve.yml first")
    current = spec["replicas"]
    demand = event_demand(values)
    plan.update(current_replicas=current, demand=demand)
    reasons = []

    # How many replicas: from demand when the event carries it, else one step; a schedule raises to its floor, no further.
    if own:
        desired = max(current, min_replicas)
        reasons.append(f"{service}: scheduled for at least {own['replicas']} replicas")
    elif demand is not None:
        desired = desired_replicas(demand, settings["target_per_replica"])
        reasons.append(f"{service}: {demand:g} requests in flight and queued need {desired} replicas at {settings['target_per_replica']:g} each")
    elif direction == "scale_out":
        desired = current + settings["step"]
    else:
        desired = current - settings["step"]
    bounded = min(max(desired, min_replicas), settings["max"])
    plan["desired_replicas"] = bounded
    plan["record_desired"] = bounded

    if direction == "scale_out":
        # max_scale_up bounds what demand asks for in one decision; a step is itself the amount one event adds.
        target = min(bounded, current + settings["max_scale_up"]) if demand is not None and not own else bounded
        if target > current and target < bounded:
            reasons.append(f"{current} → {target} now, at most {settings['max_scale_up']} more per decision (max_scale_up)")
        if target <= current and current < settings["max"] and current >= min_replicas:
            plan["reason"] = "; ".join([*reasons, f"has {current}: nothing to add", floor_reason]).strip("; ")
            pool_joins = [vmid for vmid in pool_vmids if vmid not in active_vmids(swarm)]
            if not pool_joins:
                return record_quiet(plan)
        step = max(target - current, 0)
        scale = plan_scale_out(
            service,
            swarm["nodes"],
            services,
            swarm["tasks"],
            step=step,
            min_replicas=min_replicas,
            max_replicas=settings["max"],
            min_workers=settings["workers"]["min"],
            max_workers=settings["workers"]["max"],
            # scale_replicas changes replicas only, within what the current workers hold.
            vm_step=0 if action == "scale_replicas" else settings["workers"]["step"],
            new_worker_cpus=settings["workers"]["cores"],
            worker_pool_size=len(pool_vmids),
            new_worker_generic=new_worker_generic(settings, services.get(service)),
        )
    else:
        target = bounded
        window = settings["stabilization"]["scale_in"]
        history = (state.get("history") or {}).get(service) or []
        highest = stabilized(history, now, window) if window > 0 else None
        if highest is not None and highest > target:
            reasons.append(f"the highest count desired in the last {window:g} s is {highest} (stabilization)")
            target = min(highest, settings["max"])
            # Time alone lowers the target once the first count above it leaves the window.
            plan["quiet_until"] = min(at + window for at, count in history if now - at <= window and count > bounded)
        if floor and min_replicas > settings["min"]:
            plan["quiet_until"] = min(floor["until"], plan["quiet_until"] or floor["until"])
        target = min(target, current)
        scale = plan_scale_in(
            service,
            swarm["nodes"],
            services,
            swarm["tasks"],
            step=max(current - target, 0),
            min_replicas=min_replicas,
            min_workers=settings["workers"]["min"],
            protected=settings["protected"],
            max_replicas=settings["max"],
            max_workers=settings["workers"]["max"],
            vm_step=settings["workers"]["step"],
        )
    return settle(plan, scale, reasons, floor_reason, settings, values, swarm, pool_vmids, action)


def audit_fields(plan):
    """The plan's figures for the audit trail's fields, which are numbers: -1 for one the run never reached (a stale
    event, a cooldown)."""
    figures = {"replicas_before": "current_replicas", "replicas_desired": "desired_replicas", "replicas_target": "target_replicas", "capacity": "capacity"}
    fields = {field: -1 if plan[key] is None else plan[key] for field, key in figures.items()}
    # Where the added VMs came from (warm_vm_plan), when the run planned it.
    fields.update({field: plan[key] for field, key in (("warm_taken", "warm_take"), ("vms_cloned", "clone_vms")) if key in plan})
    if "warm_return_vmids" in plan:
        fields["warm_returned"] = len(plan["warm_return_vmids"])
    return fields


def state_records(plan):
    """What the run records in the scaler state when it gives the lease back, as mlfleet.serving.scale_lease takes it:
    its own scheduled floor, the bounds it kept the service to, the count it desired, the settings it decided with and,
    when it decided not to act, what it decided on (``quiet``)."""
    service = plan["service"]
    return {
        "floors": [dict(plan["floor"], service=service)] if plan["floor"] else [],
        "bounds": [{"service": service, "min": plan["min_replicas"], "max": plan["max_replicas"]}],
        "desired": [] if plan["record_desired"] is None else [{"service": service, "replicas": plan["record_desired"]}],
        "settings": [dict(plan["settings"], service=service)],
        "quiet": [dict(plan["quiet"], service=service)] if plan["decision"] == "none" and plan["quiet"] else [],
    }


def active_vmids(swarm):
    return sorted(n["vmid"] for n in swarm["nodes"] if n["status"] == "ready" and n["availability"] == "active" and n["vmid"] is not None)


def settle(plan, scale, reasons, floor_reason, settings, values, swarm, pool_vmids, action):
    """Turn the capacity plan into the run's plan: which replicas change, which VMs are cloned, joined, drained, destroyed."""
    nodes = swarm["nodes"]
    active = active_vmids(swarm)
    in_swarm = {n["vmid"] for n in nodes if n["vmid"] is not None}
    drained = sorted(n["vmid"] for n in nodes if n["role"] == "worker" and n["availability"] != "active" and n["vmid"] is not None)
    leaving = sorted(int(n["vmid"]) for n in scale.get("remove_nodes") or [])
    plan.update(
        current_replicas=scale["current_replicas"],
        target_replicas=scale["target_replicas"],
        capacity=scale.get("capacity"),
        active_vmids=active,
    )
    plan["reason"] = "; ".join(part for part in [*reasons, scale["reason"], floor_reason] if part)
    if action == "scale_out":
        # A scale-out finishes pool VMs that are not active workers (a run killed after the clone, or a drain left by a
        # killed scale-in).
        plan["join_vmids"] = [vmid for vmid in pool_vmids if vmid not in active]
    elif action == "scale_in":
        # A scale-in destroys pool VMs that never joined and re-activates drained workers it keeps.
        plan["join_vmids"] = [vmid for vmid in drained if vmid not in leaving]
        plan["leave_vmids"] = leaving
        plan["orphan_vmids"] = [vmid for vmid in pool_vmids if vmid not in in_swarm]
    decision = scale["decision"]
    if decision == "vms":
        # add_workers counts only VMs beyond the pool's VMs still joining, which the run joins (join_vmids).
        new_vms = scale["add_workers"]
        drain_s = values.get("drain_s")
        time_to_serve = settings["workers"]["time_to_serve"]
        if (
            new_vms > 0
            and plan["direction"] == "scale_out"
            and time_to_serve > 0
            and isinstance(drain_s, (int, float))
            and not isinstance(drain_s, bool)
            and 0 <= drain_s <= time_to_serve
        ):
            plan["hold_vms"] = True
            trend = abs(float(values.get("backlog_trend") or 0))
            plan["reason"] = (
                f"{scale['reason']}; no new VMs: the backlog of {values.get('backlog', '?')} requests falls by {round(trend, 2):g}/s and is down in "
                f"about {round(drain_s)} s, before new VMs serve (workers.time_to_serve {time_to_serve:g} s)"
            )
        elif new_vms > 0:
            plan["add_workers"] = new_vms
            plan["grow_to"] = len(pool_vmids) + new_vms
    plan["change_replicas"] = decision in ("replicas", "replicas_and_nodes") and scale["target_replicas"] != scale["current_replicas"]
    if plan["change_replicas"] or plan["grow_to"] > 0 or plan["leave_vmids"] or plan["orphan_vmids"] or plan["join_vmids"]:
        plan["decision"] = "act"
    elif not plan["hold_vms"]:
        # Held VMs wait on the backlog's trend, which changes by itself: no record.
        record_quiet(plan)
    return plan


def record_quiet(plan):
    """Note in the plan what its decision not to act was made on, for the scaler state: the same event, on the same
    replicas and demand, before any action and before ``quiet_until``, can only meet the same decision."""
    plan["quiet"] = {
        "direction": plan["direction"],
        "replicas": plan["current_replicas"],
        "desired": plan["desired_replicas"],
        "until": plan["quiet_until"],
    }
    return plan


# The end of a run: what it destroys and how it ended.


def plan_pool_vmids(plan):
    return [int(vmid) for vmid in (plan.get("pool") or {}).get("vmids") or []]


def vms_to_destroy(plan, left_vmids):
    """The VMs the run destroys once its workers left: those that left the swarm and the pool VMs that never joined
    (``orphan_vmids``), only those still in the pool, less those the warm pool takes back (``return_vmids``: planned
    in ``warm_return_vmids`` and gone from the swarm).

    A VM counted as removed that was already gone would make mlfleet.serving.proxmox_vm_pool take another, running one
    to reach the count, so the count kept is the pool's VMs as the decision saw them less these. A run that removes VMs
    clones none, so that pool is current. A plan without a pool (the decision itself failed) destroys nothing.
    """
    pool = plan_pool_vmids(plan)
    gone = ({int(vmid) for vmid in left_vmids} | {int(vmid) for vmid in plan.get("orphan_vmids") or []}) & set(pool)
    # Those the warm pool takes back are kept, to be retagged by the refill.
    returned = [int(vmid) for vmid in plan.get("warm_return_vmids") or [] if int(vmid) in gone]
    removed = sorted(gone - set(returned))
    return {"remove_vmids": removed, "keep": len(pool) - len(removed), "return_vmids": returned}


def run_outcome(plan, decision, reason, fields, failures=(), created=(), destroyed=None, joined=(), replicas_after_join=None, returned=(), warmed=()):
    """How the run ended, for the audit trail: its decision (``failed`` when any worker failed, ``acted`` when the
    replicas, the pool or its warm VMs changed), the reasons joined, and the fields with the replicas and workers after
    it.

    ``destroyed`` and ``replicas_after_join`` are the results of the finish's destroy and of the replica change after
    the join, as the tasks registered them (skipped or absent: the run did not reach them); ``returned``, the VMs the
    warm pool took back (no workers any more); ``warmed``, the warm VMs the run made ready.
    """
    destroyed = destroyed if destroyed and not destroyed.get("skipped") else None
    removed = list(destroyed.get("removed") or []) if destroyed else []
    replicas_after, replicas_changed = replicas_after_run(fields, replicas_after_join)
    if decision == "failed" or failures:
        outcome = "failed"
    elif decision == "acted" or removed or replicas_changed or warmed:
        outcome = "acted"
    else:
        outcome = "not_acted"
    reasons = [reason, *failures]
    if destroyed:
        reasons.append("removed VMs " + ", ".join(str(vmid) for vmid in removed))
    if joined:
        reasons.append("joined " + ", ".join(joined))
    if warmed:
        reasons.append("made warm VMs ready: " + ", ".join(warmed))
    workers_after = len(plan_pool_vmids(plan)) + len(created) - len(removed) - len(returned)
    return {
        "decision": outcome,
        "reason": "; ".join(part for part in reasons if part),
        "fields": dict(fields, replicas_after=int(replicas_after), workers_after=workers_after),
    }


def replicas_after_run(fields, replicas_after_join=None):
    """The service's replicas after the run, and whether the change after the join changed them: that change's result
    when the run reached it (a registered result, skipped or absent when not), else the replicas the run noted."""
    replicas_after_join = replicas_after_join if replicas_after_join and not replicas_after_join.get("skipped") else None
    if replicas_after_join:
        return int(replicas_after_join["replicas"]), replicas_after_join["replicas"] != replicas_after_join.get("previous_replicas")
    return int(fields.get("replicas_after", fields.get("replicas_before", -1))), False


def warm_replicas_of(serving, service):
    """The standby replicas mlfleet_serving gives ``service`` (its ``warm_replicas``, 0 when it has none)."""
    for entry in serving or []:
        if isinstance(entry, dict) and entry.get("service") == service:
            try:
                warm = int(entry.get("warm_replicas") or 0)
            except (TypeError, ValueError):
                raise ValueError(f"mlfleet_serving: warm_replicas of {service} must be a whole number, got {entry.get('warm_replicas')!r}") from None
            if warm < 0:
                raise ValueError(f"mlfleet_serving: warm_replicas of {service} must be 0 or more, got {warm}")
            return warm
    return 0


def standby_step(serving, service, direction, stage, decision="", fields=None, replicas_after_join=None, desired=None):
    """What a scale run does with the standby replicas of ``service`` (mlfleet_serving's ``warm_replicas``).

    ``stage`` ``start``, before the lease and the decision: a scale-out promotes them (they serve the moment the edge
    proxy's weight is set, while the replica change that follows starts cold), a scale-in returns promoted ones to
    standby before it removes any replica. ``finish``, still under the lease: a scale-out returns them once the
    service's own replicas hold what the demand asks - the replicas after the run (``fields`` and ``replicas_after_join``
    as for :func:`run_outcome`) at least the count the decision desired within the bounds (``desired``, the plan's
    ``records.desired``) - and waits for those replicas to be up in the proxy first. While they fall short (no room,
    a cooldown, a failed run) the standby replicas go on serving, capacity that runs anyway, until a later run returns
    them. A decision that recorded no desired count returns them when it acted.

    Returns ``{"state": "promoted" | "standby" | "", "serving_before_return": n}``; an empty state: nothing to do.
    """
    if stage not in ("start", "finish"):
        raise ValueError(f"standby_step: stage must be start or finish, got {stage!r}")
    nothing = {"state": "", "serving_before_return": 0}
    if warm_replicas_of(serving, service) == 0 or direction not in ("scale_out", "scale_in"):
        return nothing
    if stage == "start":
        return {"state": "promoted" if direction == "scale_out" else "standby", "serving_before_return": 0}
    if direction != "scale_out" or decision == "failed":
        return nothing
    replicas = replicas_after_run(fields or {}, replicas_after_join)[0]
    wanted = [record.get("replicas") for record in desired or [] if isinstance(record, dict) and record.get("service") == service]
    held = replicas >= int(wanted[0]) if wanted else decision == "acted"
    if not held:
        return nothing
    return {"state": "standby", "serving_before_return": max(replicas, 1)}


# What each edge proxy host noted of the standby step, by stage: its module result, when it ended, why it failed.
STANDBY_HOST_FACTS = {
    "start": ("scale_standby_set", "scale_standby_at", "scale_standby_failure"),
    "finish": ("scale_standby_returned", "scale_standby_returned_at", "scale_standby_return_failure"),
}


def standby_record(step, stage, proxies, started_at, now):
    """The audit fields, phases and reasons of a run's standby ``step`` (:func:`standby_step`'s result for ``stage``),
    from what every edge proxy host noted (``proxies``: each host's variables, in the order of the proxy group).

    ``start``: ``standby_lent`` (1 when the step promoted), ``standby_serving`` (the standby servers up in the first
    proxy) and ``standby_s`` (seconds from ``started_at`` to ``now``, when every proxy was done). ``finish``:
    ``standby_returned`` and ``standby_held`` (1 when the replicas went back, or were held because the service's own did
    not serve) and ``standby_return_s`` when they went back. Reasons: each host's failure, and the first host's message.
    Every field is a number, as the audit trail's InfluxDB fields must be. No step: nothing."""
    if stage not in STANDBY_HOST_FACTS:
        raise ValueError(f"standby_record: stage must be start or finish, got {stage!r}")
    record = {"fields": {}, "phases": {}, "reasons": []}
    if not (step or {}).get("state"):
        return record
    result_key, at_key, failure_key = STANDBY_HOST_FACTS[stage]
    hosts = [host or {} for host in proxies or []]
    first = (hosts[0].get(result_key) or {}) if hosts else {}
    record["reasons"] = [str(host.get(failure_key)) for host in hosts if host.get(failure_key)]
    if stage == "start":
        record["fields"] = {"standby_lent": int(step["state"] == "promoted"), "standby_serving": int(first.get("serving") or 0)}
        record["phases"] = {"standby_s": round(float(now) - float(started_at), 2)}
        return record
    returned = bool(first.get("changed"))
    record["fields"] = {"standby_returned": int(returned), "standby_held": int(bool(first.get("held")))}
    if returned:
        returned_at = hosts[0].get(at_key)
        record["phases"] = {"standby_return_s": round(float(returned_at if returned_at is not None else started_at) - float(started_at), 2)}
    if first.get("msg"):
        record["reasons"].insert(0, str(first["msg"]))
    return record


def warm_vm_plan(plan, pool, nodes=()):
    """Where the VMs a run adds come from, and the warm VMs its pool keeps after it (``pool``: the service's pool with
    ``vmids``, its VMs, and ``warm_vmids``, its warm VMs, as the inventory has them).

    A scale-out takes what it can from the warm pool (they serve sooner: configured, and in the ``joined`` form already
    in the swarm) and clones only the rest. Either way the pool stays within ``max_count``, warm VMs included: a take
    moves a VM from one to the other, and a clone is only made when no warm VM is left. After the run the warm pool
    refills to ``warm_vms``, fewer where the pool's active VMs leave no room under ``max_count``. A scale-in refills it
    first with the VMs it takes out (``warm_return_vmids``: drained, configured, images present), which it then keeps
    rather than destroys; only the rest are cloned.

    A run killed while it made a warm VM of the ``joined`` form ready leaves one that is no node of the swarm (``nodes``:
    the swarm's nodes as ``_scale_plan.normalise`` makes them); the next run that gets past its cooldown makes it ready
    (``warm_unready_vmids``), and acts for that alone if it has nothing else to do.

    Returns ``{warm_take, clone_vms, warm_refill_to, warm_return_vmids, warm_unready_vmids, warm_vmids,
    capacity_from}``; ``warm_refill_to`` -1 when the warm pool needs no change (a run never destroys a warm VM: a
    lowered ``warm_vms`` is provision.yml's to apply)."""
    warm_vmids = sorted(int(vmid) for vmid in pool.get("warm_vmids") or [])
    size = len(pool.get("vmids") or [])
    new = max(0, plan["grow_to"] - size) if plan["grow_to"] > 0 else 0
    take = min(new, len(warm_vmids))
    going = [*plan["leave_vmids"], *(vmid for vmid in plan["orphan_vmids"] if vmid not in plan["leave_vmids"])]
    after = size + new if plan["grow_to"] > 0 else size - len(going)
    refill_to = max(0, min(pool.get("warm_vms", 0), pool["max_count"] - after))
    # Not in the swarm at all: a node that is down is a VM that failed, not one a run left half-made, and waiting for
    # it would hold the lease for the connection timeout. Not while the run takes warm VMs either: which it takes is
    # the take's choice, and a taken one joins as any worker.
    in_swarm = {n["vmid"] for n in nodes}
    decided = plan["current_replicas"] is not None
    unready = [vmid for vmid in warm_vmids if vmid not in in_swarm] if pool.get("warm_form") == "joined" and decided and not take else []
    decision = "act" if unready else plan["decision"]
    refills = decision == "act" and refill_to > len(warm_vmids) - take
    returning = going[: max(0, refill_to - len(warm_vmids))] if refills and not new else []
    sources = []
    if plan["change_replicas"] and plan["direction"] == "scale_out":
        sources.append("replicas on the current workers")
    if take:
        sources.append(f"{take} warm VM{'s' if take != 1 else ''} ({pool.get('warm_form', 'joined')})")
    if new - take:
        sources.append(f"{new - take} new clone{'s' if new - take != 1 else ''}")
    notes = [f"capacity from {', '.join(sources)}" if take else ""]
    if unready:
        notes.append(
            f"warm VM{'s' if len(unready) != 1 else ''} {', '.join(map(str, unready))} not ready in the swarm (a run killed while it made "
            f"{'them' if len(unready) != 1 else 'it'} ready): made ready"
        )
    if returning:
        lacking = refill_to - len(warm_vmids)
        notes.append(f"VM{'s' if len(returning) != 1 else ''} {', '.join(map(str, returning))} back to the warm pool, which lacks {lacking}")
    return {
        "decision": decision,
        "reason": "; ".join(part for part in [plan["reason"], *notes] if part),
        "warm_take": take,
        "clone_vms": new - take,
        # Refilled by a run that acts; a run that decides nothing leaves the VMs as they are (site.yml refills too). A
        # run that only makes warm VMs ready keeps their count.
        "warm_refill_to": refill_to if refills else len(warm_vmids) if unready else -1,
        "warm_return_vmids": returning,
        "warm_unready_vmids": unready,
        "warm_vmids": warm_vmids,
        "capacity_from": ", ".join(sources),
    }
