# Copyright (c) mlfleet.serving maintainers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The autoscaler's decisions: how many replicas of a service fit, and which worker VMs to add or remove.

Pure functions over a snapshot of the swarm, normalised from the Docker API by ``normalise``:

- nodes: ``[{node_id, hostname, role, availability, status, cpus, labels, platform, vmid, pool}]``
- services: ``{name: {replicas (None unless replicated), cpus, constraints, max_per_node, mode}}``; ``cpus`` is the
  CPU reservation of one task, else its limit, else 0
- tasks: ``[{service, node_id, state}]`` for the tasks whose desired state is running

Capacity is counted in CPUs the way Swarm's scheduler counts reservations: a task fits on a node when the node's
CPUs minus the reservations of the tasks already there leave room for it. A ValueError always names the option or
the object at fault and how to fix it.
"""

from __future__ import annotations

import math
import re

from ansible_collections.mlfleet.serving.plugins.module_utils._swarm import ACTIVE_TASK_STATES, POOL_LABEL, VMID_LABEL, generic_units

# What a node holds of a service that reserves no CPU and has no per-node maximum: no bound worth counting.
UNBOUNDED = 1_000_000
# Reservations are sums of floats; this keeps 3 × 0.1 CPUs from not fitting in 0.3.
EPSILON = 1e-9
CONSTRAINT = re.compile(r"^\s*([A-Za-z_][\w.\-]*)\s*(==|!=)\s*(.*?)\s*$")
LABEL_PREFIX = "node.labels."
NODE_ATTRIBUTES = {"node.id": "node_id", "node.hostname": "hostname", "node.role": "role"}
PLATFORM_ATTRIBUTES = {"node.platform.os": "os", "node.platform.arch": "arch"}


# Normalising the Docker API's records.


def node_vmid(labels):
    """The Proxmox VM id a node carries in its ``mlfleet.vmid`` label, or None."""
    value = str((labels or {}).get(VMID_LABEL) or "")
    return int(value) if value.isdigit() else None


def normalise_node(record):
    spec = record.get("Spec") or {}
    description = record.get("Description") or {}
    platform = description.get("Platform") or {}
    labels = dict(spec.get("Labels") or {})
    return {
        "node_id": record.get("ID"),
        "hostname": description.get("Hostname"),
        "role": spec.get("Role"),
        "availability": spec.get("Availability"),
        "status": (record.get("Status") or {}).get("State"),
        "cpus": ((description.get("Resources") or {}).get("NanoCPUs") or 0) / 1e9,
        # What the node advertises (node-generic-resources), such as {"NVIDIA-GPU": 2}.
        "generic": generic_units((description.get("Resources") or {}).get("GenericResources")),
        "labels": labels,
        "platform": {"os": platform.get("OS") or "", "arch": platform.get("Architecture") or ""},
        "vmid": node_vmid(labels),
        "pool": labels.get(POOL_LABEL),
    }


def normalise_service(record):
    spec = record.get("Spec") or {}
    template = spec.get("TaskTemplate") or {}
    resources = template.get("Resources") or {}
    placement = template.get("Placement") or {}
    nano_cpus = (resources.get("Reservations") or {}).get("NanoCPUs") or (resources.get("Limits") or {}).get("NanoCPUs") or 0
    mode = spec.get("Mode") or {}
    if "Replicated" in mode:
        kind, replicas = "replicated", (mode["Replicated"] or {}).get("Replicas", 1)
    elif "Global" in mode:
        kind, replicas = "global", None
    elif "GlobalJob" in mode:
        kind, replicas = "global-job", None
    else:
        kind, replicas = "replicated-job", None
    return {
        "replicas": replicas,
        "cpus": nano_cpus / 1e9,
        # Units each task reserves, such as {"NVIDIA-GPU": 1}.
        "generic": generic_units((resources.get("Reservations") or {}).get("GenericResources")),
        "constraints": list(placement.get("Constraints") or []),
        "max_per_node": placement.get("MaxReplicas") or 0,
        "mode": kind,
    }


def normalise(node_records, service_records, task_records):
    """nodes (sorted by host name), services by name, and the tasks meant to run that hold or will hold a container."""
    nodes = sorted((normalise_node(r) for r in node_records), key=lambda n: (n["hostname"] or "", n["node_id"] or ""))
    names = {}
    services = {}
    for record in service_records:
        name = (record.get("Spec") or {}).get("Name") or record.get("ID")
        names[record.get("ID")] = name
        services[name] = normalise_service(record)
    tasks = []
    for record in task_records:
        state = (record.get("Status") or {}).get("State")
        if record.get("DesiredState", "running") != "running" or state not in ACTIVE_TASK_STATES:
            continue
        service_id = record.get("ServiceID")
        tasks.append({"service": names.get(service_id, service_id), "node_id": record.get("NodeID") or None, "state": state})
    return nodes, services, tasks


# Placement.


def parse_constraint(constraint):
    """(key, operator, value) of a Swarm placement constraint; ValueError naming it when it is not one this planner reads."""
    match = CONSTRAINT.match(str(constraint))
    if not match:
        raise ValueError(f"Placement constraint {constraint!r} is not of the form <attribute>==<value> or <attribute>!=<value>")
    key, operator, value = match.groups()
    lowered = key.lower()
    if lowered in NODE_ATTRIBUTES or lowered in PLATFORM_ATTRIBUTES:
        return lowered, operator, value
    if lowered.startswith(LABEL_PREFIX) and len(key) > len(LABEL_PREFIX):
        # As in Swarm, the prefix is case-insensitive, the label's own name is not.
        return LABEL_PREFIX + key[len(LABEL_PREFIX) :], operator, value
    raise ValueError(
        f"Placement constraint {constraint!r} uses {key}, which the scale planner cannot evaluate; "
        "use node.role, node.hostname, node.id, node.platform.os, node.platform.arch or node.labels.<key>"
    )


def constraint_holds(node, constraint):
    key, operator, value = parse_constraint(constraint)
    if key.startswith(LABEL_PREFIX):
        actual = (node.get("labels") or {}).get(key[len(LABEL_PREFIX) :], "")
    elif key in PLATFORM_ATTRIBUTES:
        actual = (node.get("platform") or {}).get(PLATFORM_ATTRIBUTES[key], "")
    else:
        actual = node.get(NODE_ATTRIBUTES[key]) or ""
    # Swarm compares values case-insensitively; a missing label compares as the empty string.
    equal = str(actual).casefold() == value.casefold()
    return equal if operator == "==" else not equal


def eligible(node, constraints):
    """Whether Swarm may place a task with ``constraints`` on ``node``: it is ready, active and meets every constraint."""
    # Every constraint is parsed, so a constraint the planner cannot read fails even on a node that is not schedulable.
    holds = [constraint_holds(node, c) for c in constraints or []]
    return node.get("status") == "ready" and node.get("availability") == "active" and all(holds)


def new_worker_eligible(constraints):
    """Whether a worker that is not in the swarm yet could run a task with ``constraints``.

    A new worker is configured like the pool's others (labels included), so only what no configuration can give it
    counts: its role is worker, and its id and host name are not known yet.
    """
    for constraint in constraints or []:
        key, operator, value = parse_constraint(constraint)
        if key == "node.role" and (value.casefold() == "worker") != (operator == "=="):
            return False
        if key in ("node.id", "node.hostname") and operator == "==":
            return False
    return True


def replicas_per_node(free_cpus, spec, free_generic=None):
    """How many tasks of a service with ``spec`` fit in ``free_cpus`` and the free generic resources ``free_generic``
    ({kind: units}): a service that reserves GPUs fits only as often as the node has GPUs free."""
    if spec["cpus"] > 0:
        fits = max(0, math.floor((free_cpus + EPSILON) / spec["cpus"]))
    else:
        fits = UNBOUNDED
    for kind, units in (spec.get("generic") or {}).items():
        if units > 0:
            fits = min(fits, max(0, (free_generic or {}).get(kind, 0) // units))
    return min(fits, spec["max_per_node"]) if spec["max_per_node"] > 0 else fits


def reserved_by_others(node_id, service, services, tasks):
    return sum(services[t["service"]]["cpus"] for t in tasks if t["node_id"] == node_id and t["service"] != service and t["service"] in services)


def generic_free(node, service, services, tasks):
    """{kind: units} a node has free for ``service``: what it advertises less what the other services' tasks on it reserve."""
    free = dict(node.get("generic") or {})
    for task in tasks:
        if task["node_id"] == node["node_id"] and task["service"] != service and task["service"] in services:
            for kind, units in (services[task["service"]].get("generic") or {}).items():
                free[kind] = free.get(kind, 0) - units
    return free


def units_text(generic):
    """'1 NVIDIA-GPU' for {NVIDIA-GPU: 1}; empty for none."""
    return ", ".join(f"{units} {kind}" for kind, units in sorted((generic or {}).items()))


def capacity(service, nodes, services, tasks):
    """How many replicas of ``service`` the eligible nodes hold if it alone were rescheduled.

    Each eligible node holds floor((its CPUs - the reservations of the other services' tasks on it) / the service's
    CPUs per replica), at most the service's max_per_node, and no more than its free generic resources (GPUs) hold.
    A service that reserves nothing is bounded by max_per_node only; without one the result is UNBOUNDED (one million).
    """
    spec = known_service(service, services)
    total = 0
    for node in nodes:
        if eligible(node, spec["constraints"]):
            free_cpus = node["cpus"] - reserved_by_others(node["node_id"], service, services, tasks)
            total += replicas_per_node(free_cpus, spec, generic_free(node, service, services, tasks))
    return min(total, UNBOUNDED)


def pack(nodes, services, replicas):
    """Replicas placed per service by first-fit decreasing over the nodes, as {service: count}.

    ``replicas`` gives the count to place per replicated service. Each node's room is its CPUs minus the
    reservations of the global services that run on it; the largest tasks go first, each to the first node (in
    host name order) that is eligible, has room and holds fewer than the service's max_per_node.
    """
    free = {}
    free_units = {}
    for node in nodes:
        globals_here = [s for s in services.values() if s["mode"] == "global" and eligible(node, s["constraints"])]
        free[node["node_id"]] = node["cpus"] - sum(s["cpus"] for s in globals_here)
        units = dict(node.get("generic") or {})
        for spec in globals_here:
            for kind, count in (spec.get("generic") or {}).items():
                units[kind] = units.get(kind, 0) - count
        free_units[node["node_id"]] = units
    eligible_nodes = {name: [n for n in nodes if eligible(n, services[name]["constraints"])] for name in replicas}
    held = {}
    placed = dict.fromkeys(replicas, 0)
    items = sorted(((services[name]["cpus"], name) for name, count in replicas.items() for seq in range(count)), key=lambda item: (-item[0], item[1]))
    for cpus, name in items:
        max_per_node = services[name]["max_per_node"]
        wanted = services[name].get("generic") or {}
        for node in eligible_nodes[name]:
            key = (node["node_id"], name)
            units = free_units[node["node_id"]]
            has_units = all(units.get(kind, 0) >= count for kind, count in wanted.items())
            if free[node["node_id"]] + EPSILON >= cpus and has_units and (max_per_node <= 0 or held.get(key, 0) < max_per_node):
                free[node["node_id"]] -= cpus
                for kind, count in wanted.items():
                    units[kind] = units.get(kind, 0) - count
                held[key] = held.get(key, 0) + 1
                placed[name] += 1
                break
    return placed


# Checking the options.


def known_service(service, services):
    if service not in services:
        known = ", ".join(sorted(services)) or "none"
        raise ValueError(f"Service {service!r} does not exist in the swarm (services: {known}); check the service option")
    return services[service]


def replicated_service(service, services):
    spec = known_service(service, services)
    if spec["replicas"] is None:
        raise ValueError(f"Service {service!r} is a {spec['mode']} service and has no replica count to scale; scale a replicated service")
    check_constraints({service: spec}, (spec["mode"],))
    return spec


def check_constraints(services, modes):
    """Fail on a constraint the planner cannot read, naming its service, for the services of ``modes``."""
    for name, spec in sorted(services.items()):
        if spec["mode"] in modes:
            for constraint in spec["constraints"]:
                try:
                    parse_constraint(constraint)
                except ValueError as error:
                    raise ValueError(f"Service {name}: {error}") from None


def check_at_least(name, value, minimum, fix):
    if value is None or value < minimum:
        raise ValueError(f"{name} must be {minimum} or more, got {value}; {fix}")


def check_bounds(low_name, low, high_name, high):
    if high is not None and low > high:
        raise ValueError(f"{low_name} ({low}) is above {high_name} ({high}); lower {low_name} or raise {high_name}")


def plural(count, word):
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


def where(nodes):
    """'2 workers' or '3 nodes': what the eligible nodes are, for a reason."""
    return plural(len(nodes), "worker" if nodes and all(n["role"] == "worker" for n in nodes) else "node")


# The plans.


def plan_scale_out(
    service,
    nodes,
    services,
    tasks,
    step=1,
    min_replicas=1,
    max_replicas=None,
    min_workers=1,
    max_workers=None,
    vm_step=1,
    new_worker_cpus=None,
    worker_pool_size=None,
    new_worker_generic=None,
):
    """Raise ``service`` by ``step`` replicas, adding worker VMs when the replicas do not fit.

    ``new_worker_generic`` is what a new worker VM of the pool advertises ({kind: units}, its GPUs); a service that
    reserves GPUs grows only a pool whose new VMs bring them.

    Returns {decision ('replicas', 'vms' or 'none'), current_replicas, target_replicas, capacity, add_workers,
    reason, values}.
    """
    spec = replicated_service(service, services)
    check_at_least("step", step, 0, "give the number of replicas to add")
    check_at_least("min_replicas", min_replicas, 0, "give the fewest replicas the service keeps")
    check_at_least("max_replicas", max_replicas, 1, "give the most replicas the service may run")
    check_bounds("min_replicas", min_replicas, "max_replicas", max_replicas)
    check_at_least("min_workers", min_workers, 0, "give the fewest worker VMs the pool keeps")
    check_at_least("max_workers", max_workers, 0, "give the most worker VMs the pool may have")
    check_bounds("min_workers", min_workers, "max_workers", max_workers)
    check_at_least("vm_step", vm_step, 0, "give the most worker VMs to add in one run (0: none)")
    if new_worker_cpus is None or new_worker_cpus <= 0:
        raise ValueError(f"new_worker_cpus must be above 0, got {new_worker_cpus}; give the CPUs of a new worker VM (its template's cores)")
    check_constraints(services, ("global",))
    worker_nodes = [n for n in nodes if n["role"] == "worker"]
    if worker_pool_size is None:
        worker_pool_size = len(worker_nodes)
    check_at_least("worker_pool_size", worker_pool_size, 0, "give the number of worker VMs in the pool, or leave it out")

    current = spec["replicas"]
    target = max(min(current + step, max_replicas), min_replicas)
    fits = capacity(service, nodes, services, tasks)
    hosts = [n for n in nodes if eligible(n, spec["constraints"])]
    pending = max(0, worker_pool_size - len(worker_nodes))
    new_globals = [s for s in services.values() if s["mode"] == "global" and new_worker_eligible(s["constraints"])]
    global_cpus = sum(s["cpus"] for s in new_globals)
    new_units = dict(new_worker_generic or {})
    for other in new_globals:
        for kind, count in (other.get("generic") or {}).items():
            new_units[kind] = new_units.get(kind, 0) - count
    per_new_worker = replicas_per_node(new_worker_cpus - global_cpus, spec, new_units) if new_worker_eligible(spec["constraints"]) else 0
    brought = f" and {units_text(new_worker_generic)}" if spec.get("generic") and new_worker_generic else ""
    values = {
        "service": service,
        "cpus_per_replica": spec["cpus"],
        "generic_per_replica": dict(spec.get("generic") or {}),
        "new_worker_generic": dict(new_worker_generic or {}),
        "max_per_node": spec["max_per_node"],
        "capacity": fits,
        "eligible_nodes": len(hosts),
        "workers": len(worker_nodes),
        "worker_pool_size": worker_pool_size,
        "pending_workers": pending,
        "step": step,
        "min_replicas": min_replicas,
        "max_replicas": max_replicas,
        "min_workers": min_workers,
        "max_workers": max_workers,
        "vm_step": vm_step,
        "new_worker_cpus": new_worker_cpus,
        "replicas_per_new_worker": per_new_worker,
    }
    plan = {"decision": "none", "current_replicas": current, "target_replicas": current, "capacity": fits, "add_workers": 0, "values": values}

    if current >= max_replicas:
        plan["reason"] = f"{service}: at its maximum of {plural(max_replicas, 'replica')}"
        return plan
    if target == current and target <= fits:
        plan["reason"] = f"{service}: stays at {plural(current, 'replica')} (step 0); {fits} fit on {where(hosts)}"
        return plan
    if target <= fits:
        plan.update(decision="replicas", target_replicas=target, reason=f"{service}: {current} → {target} replicas; {fits} fit on {where(hosts)}")
        return plan

    room = max(0, min(vm_step, max_workers - worker_pool_size))
    # Pool VMs that are not workers yet (a run killed before they joined) are capacity on the way: the run joins them,
    # and adds only what they do not cover, even when the pool is at its maximum or vm_step is 0.
    if per_new_worker > 0 and (room > 0 or pending > 0):
        add = next((count for count in range(0 if pending else 1, room + 1) if fits + (pending + count) * per_new_worker >= target), room)
        brings = fits + (pending + add) * per_new_worker
        coming = f", {plural(pending, 'VM')} still joining" if pending else ""
        if add:
            reason = (
                f"{service}: {current} → {target} replicas needs {add} more worker {'VM' if add == 1 else 'VMs'}: "
                f"{fits} fit on {where(hosts)}{coming}, {plural(per_new_worker, 'replica')} per new worker of {new_worker_cpus:g} CPUs{brought}; "
                f"pool {worker_pool_size} → {worker_pool_size + add} of at most {max_workers}"
            )
            if brings < target and add < max_workers - worker_pool_size:
                reason += f"; that makes room for {brings}, a later run adds more (vm_step {vm_step})"
            elif brings < target:
                reason += f"; that makes room for {brings}, and the pool is then at its maximum"
        else:
            reason = (
                f"{service}: {current} → {target} replicas once the pool's {plural(pending, 'VM')} still joining "
                f"{'joins' if pending == 1 else 'join'}: {fits} fit on {where(hosts)}, "
                f"{plural(per_new_worker, 'replica')} per new worker of {new_worker_cpus:g} CPUs{brought}; no VM is added"
            )
            if brings < target:
                reason += f"; that makes room for {brings}"
        plan.update(decision="vms", target_replicas=target, add_workers=add, reason=reason)
        return plan

    if vm_step == 0:
        limit = "vm_step 0 adds no worker VM"
    elif room <= 0:
        limit = f"{plural(max_workers, 'worker')} is the maximum"
    elif per_new_worker == 0 and not new_worker_eligible(spec["constraints"]):
        limit = "a new worker cannot run it (placement constraints)"
    elif per_new_worker == 0 and any(new_units.get(kind, 0) < units for kind, units in (spec.get("generic") or {}).items()):
        limit = f"a new worker of the pool brings {units_text(new_worker_generic) or 'no generic resources'}, a replica reserves {units_text(spec['generic'])}"
    else:
        limit = f"a new worker of {new_worker_cpus:g} CPUs has no room for a replica of {spec['cpus']:g} CPUs"
    if fits > current:
        plan.update(
            decision="replicas",
            target_replicas=fits,
            reason=f"{service}: {current} → {fits} replicas, only {fits} of {target} fit on {where(hosts)}; {limit}",
        )
    else:
        plan["reason"] = f"{service}: no room: {limit}, and {fits} replicas fit on {where(hosts)}"
    return plan


def plan_scale_in(service, nodes, services, tasks, step=1, min_replicas=1, min_workers=1, protected=(), max_replicas=None, max_workers=None, vm_step=None):
    """Lower ``service`` by ``step`` replicas and pick the worker nodes that are no longer needed.

    A worker can go when every replicated service (this one at its target) still fits on the other nodes, checked by
    first-fit decreasing (``pack``). Managers, ``protected`` workers (host names or VM ids), workers that are not
    ready and workers without a VM id (not VMs of the pool) are kept, as are ``min_workers`` workers. Among the
    workers that can go, those with the fewest tasks go first, then the newest VM (highest id). At most ``vm_step``
    workers are picked (None: no limit).

    Returns {decision ('replicas', 'replicas_and_nodes', 'nodes' or 'none'), current_replicas, target_replicas,
    remove_nodes [{hostname, node_id, vmid}], reason, values}.
    """
    spec = replicated_service(service, services)
    check_at_least("step", step, 0, "give the number of replicas to remove")
    check_at_least("min_replicas", min_replicas, 0, "give the fewest replicas the service keeps")
    check_bounds("min_replicas", min_replicas, "max_replicas", max_replicas)
    check_at_least("min_workers", min_workers, 0, "give the fewest worker VMs the pool keeps")
    check_bounds("min_workers", min_workers, "max_workers", max_workers)
    if vm_step is not None:
        check_at_least("vm_step", vm_step, 0, "give the most worker VMs to remove in one run (0: none)")
    check_constraints(services, ("replicated", "global"))

    current = spec["replicas"]
    # Scaling in never raises a service that is below its minimum.
    target = min(current, max(current - step, min_replicas))
    targets = {name: s["replicas"] for name, s in services.items() if s["mode"] == "replicated"}
    targets[service] = target
    baseline = pack(nodes, services, targets)
    shortfall = {name: targets[name] - baseline[name] for name in targets if baseline[name] < targets[name]}

    protected = {str(p) for p in protected or ()}
    workers = [n for n in nodes if n["role"] == "worker" and n["status"] == "ready"]
    task_count = {}
    for task in tasks:
        task_count[task["node_id"]] = task_count.get(task["node_id"], 0) + 1

    def is_protected(node):
        return node["hostname"] in protected or (node["vmid"] is not None and str(node["vmid"]) in protected)

    def preference(node):
        return (task_count.get(node["node_id"], 0), -node["vmid"], node["hostname"] or "")

    removed = []
    blocked = {}
    remaining = list(nodes)
    while len(workers) - len(removed) > min_workers and (vm_step is None or len(removed) < vm_step):
        blocked = {}
        candidates = sorted((w for w in workers if w not in removed and w["vmid"] is not None and not is_protected(w)), key=preference)
        for candidate in candidates:
            without = [n for n in remaining if n is not candidate]
            placed = pack(without, services, targets)
            short = {name: baseline[name] - placed[name] for name in targets if placed[name] < baseline[name]}
            if not short:
                removed.append(candidate)
                remaining = without
                break
            blocked[candidate["hostname"]] = short
        else:
            break

    left = len(workers) - len(removed)
    values = {
        "service": service,
        "cpus_per_replica": spec["cpus"],
        "step": step,
        "min_replicas": min_replicas,
        "min_workers": min_workers,
        "workers": len(workers),
        "workers_after": left,
        "protected": sorted(protected),
        "unplaceable_replicas": shortfall,
        "needed_workers": dict(sorted(blocked.items())),
    }
    plan = {
        "current_replicas": current,
        "target_replicas": target,
        "remove_nodes": [{"hostname": n["hostname"], "node_id": n["node_id"], "vmid": n["vmid"]} for n in removed],
        "values": values,
    }
    if target < current:
        replicas_part = f"{service}: {current} → {target} replicas"
    elif current < min_replicas:
        replicas_part = f"{service}: below its minimum of {plural(min_replicas, 'replica')} ({current}), not lowered"
    else:
        replicas_part = f"{service}: at its minimum of {plural(min_replicas, 'replica')}"

    if removed:
        names = ", ".join(n["hostname"] + (f" (VM {n['vmid']})" if n["vmid"] is not None else "") for n in removed)
        nodes_part = f"remove {names}: every service's replicas fit on the {plural(left, 'remaining worker')}"
    elif len(workers) <= min_workers:
        if len(workers) == min_workers:
            nodes_part = f"{plural(len(workers), 'worker')} is the minimum"
        else:
            nodes_part = f"only {plural(len(workers), 'worker')}, the minimum is {min_workers}"
    elif vm_step == 0:
        nodes_part = "no worker is removed (vm_step 0)"
    elif blocked:
        host, short = next(iter(blocked.items()))
        missing = ", ".join(f"{name} {plural(count, 'replica')} short" for name, count in sorted(short.items()))
        nodes_part = f"every worker is needed (without {host}: {missing})"
    else:
        nodes_part = "every worker that could go is protected or no VM of the pool (no mlfleet.vmid label)"
    plan["reason"] = f"{replicas_part}; {nodes_part}"
    if target < current:
        plan["decision"] = "replicas_and_nodes" if removed else "replicas"
    else:
        plan["decision"] = "nodes" if removed else "none"
    return plan
