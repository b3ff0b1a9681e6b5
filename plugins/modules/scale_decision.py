#!/usr/bin/python
# Copyright (c) mlfleet.serving maintainers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: scale_decision
short_description: Decide a whole scale action of the autoscaler - replicas, VMs to add, exactly which VMs to remove
version_added: 0.1.0
description:
  - The autoscaler's one decision core. From the event that triggered the run, the settings, the scaler state (the
    lease file, as M(mlfleet.serving.scale_lease) returns it) and the swarm's nodes, services and tasks (read through one
    manager), it returns the whole plan a scale playbook executes, or why it does not act. It never changes anything.
  - Refuses an event older than C(max_event_age) seconds, keeps to the cooldowns (C(last_actions) of the scaler state)
    and to the scheduled floors (a C(scale_schedule) event's own, and the highest live one the state records).
  - "Demand-driven scaling: an event that carries the service's backlog (C(values.backlog), else C(values.inflight) +
    C(values.queued), as the serving_pressure source sends) asks for C(ceil(backlog / target_per_replica)) replicas,
    within C(min) and C(max). A scale-out goes there in one decision unless C(max_scale_up) stops it. An event without
    demand (a Grafana alert, whose values are CPU means; a schedule; a run by hand) moves by C(step), which
    C(max_scale_up) does not bound."
  - "Scale-in stabilization: a scale-in goes no lower than the highest count desired within C(stabilization.scale_in)
    seconds (the state's C(history), which M(mlfleet.serving.scale_lease) records from RV(record_desired)), so a dip in
    the load removes nothing."
  - Which replicas fit, which worker VMs to add and which workers can go are counted as M(mlfleet.serving.swarm_scale_plan)
    counts them (CPU reservations, placement constraints, per-node maximum, protected workers, the pool's bounds).
  - A demand-driven scale-out whose backlog is falling and gone within C(workers.time_to_serve) seconds (the event's
    C(values.drain_s)) clones no VMs (RV(hold_vms)).
author:
  - mlfleet.serving maintainers (@mlfleet)
extends_documentation_fragment:
  - mlfleet.serving.attributes
  - mlfleet.serving.docker_api
attributes:
  check_mode:
    support: full
    details:
      - The module only reads; the plan is the same in check mode.
  diff_mode:
    support: none
  idempotent:
    support: full
options:
  action:
    description:
      - The scale playbook's action. V(scale_out) adds replicas and, when they do not fit, worker VMs; V(scale_in) removes
        replicas, then the workers the rest do not need; V(scale_replicas) changes replicas only, within what the workers hold.
    type: str
    required: true
  direction:
    description:
      - V(scale_out) or V(scale_in), for O(action=scale_replicas). Defaults to the event's C(action).
    type: str
  service:
    description:
      - The service to scale, one of O(serving). Defaults to the event's C(service).
    type: str
  event:
    description:
      - The event that triggered the run, as ansible-rulebook passes it (C(ansible_eda.event)); empty for a run by hand.
      - Read are C(source), C(received_at) (epoch seconds), C(values) (C(backlog), C(inflight), C(queued), C(drain_s),
        C(backlog_trend)) and, from the C(scale_schedule) source, C(min_replicas) and C(until).
    type: dict
    default: {}
  serving:
    description:
      - The services the site serves, C(mlfleet_serving) as the inventory gives it. Read are each entry's C(service)
        and C(pool), the worker pool it runs on (the only pool when it names none).
    type: list
    elements: dict
    required: true
  autoscale:
    description:
      - The inventory's C(mlfleet_autoscale), laid over the defaults. Keys C(replicas) (C(min), C(max), C(step),
        C(target_per_replica), C(max_scale_up)), C(services) (the same per service), C(workers) (C(step),
        C(time_to_serve)), C(cooldown) (C(scale_out), C(scale_in), C(scale_in_after_scale_out)), C(stabilization)
        (C(scale_in)), C(protected), C(max_event_age), C(drain_timeout); the README's autoscaling section gives the defaults.
    type: dict
    default: {}
  worker_pools:
    description:
      - The worker VM pools, C(mlfleet_worker_pools) as the inventory gives it (see the README's worker pools section).
        The pool of the scaled service gives the bounds (C(count), C(max_count)) and the size of a new VM (C(cores)).
    type: list
    elements: dict
  workers:
    description:
      - The deprecated single pool C(mlfleet_workers), read as the pool C(workers) with the tag C(swarm_worker) when
        O(worker_pools) is empty. Gives a deprecation warning.
    type: dict
  template:
    description: The template a pool clones from when its entry names none (C(mlfleet_template)).
    type: raw
  cluster:
    description: The cluster's name (C(mlfleet_cluster)), the start of the VM names a pool gives by default.
    type: str
    default: ""
  state:
    description:
      - The scaler state as M(mlfleet.serving.scale_lease) returned it when the run took the lease - C(last_actions),
        C(floors), C(history).
    type: dict
    required: true
  pool_members:
    description:
      - "The inventory's worker VMs as C({vmid: tags}) (C(proxmox_vmid) and C(proxmox_tags) of C(swarm_workers)),
        read after the run took the lease. The members of the scaled service's pool are those that carry its tag."
    type: dict
    required: true
  warm_members:
    description:
      - "The inventory's VMs as C({vmid: tags}), the warm VMs among them: those that carry the C(warm_tag) of the scaled
        service's pool are its warm pool (see C(warm_vms) in the README's worker pools section), which a scale-out takes
        new workers from before it clones."
    type: dict
    default: {}
seealso:
  - module: mlfleet.serving.scale_lease
  - module: mlfleet.serving.swarm_scale_plan
"""

EXAMPLES = r"""
- name: Decide
  mlfleet.serving.scale_decision:
    docker_host: ssh://debian@192.0.2.10
    action: scale_out
    event: "{{ ansible_eda.event | default({}) }}"
    serving: "{{ mlfleet_serving }}"
    worker_pools: "{{ mlfleet_worker_pools }}"
    template: "{{ mlfleet_template }}"
    autoscale: "{{ mlfleet_autoscale | default({}) }}"
    state: "{{ scale_lease }}"
    pool_members: {"201": [mlfleet, swarm_worker], "202": [mlfleet, swarm_worker]}
  register: scale_plan
"""

RETURN = r"""
decision:
  description: V(act) when the plan changes something, else V(none) (RV(reason) says why).
  returned: always
  type: str
reason:
  description: Why, in words, with the figures.
  returned: always
  type: str
service:
  description: The service.
  returned: always
  type: str
direction:
  description: V(scale_out) or V(scale_in).
  returned: always
  type: str
source:
  description: The event's source, V(manual) for a run by hand.
  returned: always
  type: str
current_replicas:
  description: The service's replicas now; null when the run stopped before reading them (stale event, cooldown).
  returned: always
  type: int
desired_replicas:
  description: The count the demand (or the step) asks for, within the bounds.
  returned: always
  type: int
target_replicas:
  description: The count this run goes to.
  returned: always
  type: int
change_replicas:
  description: Whether the run changes the replicas within what the current workers hold.
  returned: always
  type: bool
grow_to:
  description: The pool size to grow the worker VMs to, -1 for none.
  returned: always
  type: int
hold_vms:
  description: Whether VMs were held back because the backlog drains before they could serve.
  returned: always
  type: bool
join_vmids:
  description: Pool VMs the run configures and joins (not active workers yet, or drained workers it keeps).
  returned: always
  type: list
  elements: int
leave_vmids:
  description: Workers the run drains, takes out of the swarm and destroys.
  returned: always
  type: list
  elements: int
orphan_vmids:
  description: Pool VMs that never joined the swarm; a scale-in destroys them.
  returned: always
  type: list
  elements: int
warm_take:
  description: How many of the VMs the run adds it takes from the warm pool (the rest it clones).
  returned: always
  type: int
clone_vms:
  description: How many of the VMs the run adds it clones.
  returned: always
  type: int
warm_refill_to:
  description:
    - The warm VMs the pool keeps after the run, when the run refills its warm pool; -1 when the warm pool needs no change.
    - C(warm_vms), fewer where the active VMs leave no room under C(max_count).
  returned: always
  type: int
warm_unready_vmids:
  description:
    - The warm VMs of the C(joined) form that are no node of the swarm (a run killed while it made them ready), which
      this run makes ready; a run with nothing else to do acts for them alone.
  returned: always
  type: list
  elements: int
  sample: []
warm_return_vmids:
  description:
    - The VMs a scale-in takes out that go back to the warm pool rather than being destroyed, while that pool is short
      of C(warm_vms); the refill clones only what they do not cover.
  returned: always
  type: list
  elements: int
  sample: [123]
warm_vmids:
  description: The warm VMs of the pool before the run.
  returned: always
  type: list
  elements: int
capacity_from:
  description: Where the capacity the run adds comes from, in words (replicas on the current workers, warm VMs, clones).
  returned: always
  type: str
pool:
  description:
    - The worker pool of the scaled service, checked and completed - C(name), C(tag), C(template), C(count),
      C(max_count), C(cores), C(memory), C(cpulimit), C(ip_range), C(name_prefix), C(warm_vms), C(warm_form),
      C(warm_tag) - with C(vmids), its VMs in the inventory, C(warm_vmids), its warm VMs, and C(services), the
      services that run on it. A scale-out clones with these.
  returned: when the request was valid
  type: dict
  sample: {name: workers, tag: swarm_worker, template: debian-golden, count: 2, max_count: 4, cores: 2, memory: 4096,
           cpulimit: null, ip_range: null, name_prefix: mlfleet-worker, vmids: [201, 202]}
active_vmids:
  description: The VM ids of the ready, active workers of the service's pool.
  returned: always
  type: list
  elements: int
min_replicas:
  description: The fewest replicas the service keeps now, scheduled floors included.
  returned: always
  type: int
floor:
  description: The floor this run's own C(scale_schedule) event sets (C(replicas), C(until), C(reason)), to record at release.
  returned: always
  type: dict
record_desired:
  description: The desired count to record in the scaler state's history; null when the run decided before sizing.
  returned: always
  type: int
capacity:
  description: How many replicas fit on the current workers; null for a scale-in or a run that stopped early.
  returned: always
  type: int
settings:
  description: The effective settings of the service (bounds, cooldowns, target per replica, stabilization, the pool).
  returned: always
  type: dict
protected_vmids:
  description: The VM ids among the C(protected) setting, which a destroy never takes.
  returned: always
  type: list
  elements: int
audit_fields:
  description:
    - The plan's figures for the audit trail (C(replicas_before), C(replicas_desired), C(replicas_target), C(capacity)),
      -1 for one the run never reached.
  returned: always
  type: dict
records:
  description:
    - What to record in the scaler state when the run gives the lease back, as the options of the same names of
      M(mlfleet.serving.scale_lease) take them - C(floors), C(bounds), C(desired), C(settings) and C(quiet), the
      decision not to act (RV(quiet)) when the run made one.
  returned: always
  type: dict
quiet:
  description:
    - When the run decides not to act, what it decided on - C(direction), the C(replicas) the service has, the count
      C(desired) within the bounds, and C(until), when time alone could change the decision (a stabilization window or
      a scheduled floor ends; null for never). Empty when the run acts, stops at a cooldown or a stale event, or holds
      VMs back on a falling backlog, which changes by itself.
  returned: always
  type: dict
  sample: {direction: scale_in, replicas: 1, desired: 1, until: null}
quiet_until:
  description: When time alone could change this run's decision, epoch seconds; null for never.
  returned: always
  type: float
"""

from ansible.module_utils.basic import AnsibleModule, missing_required_lib

from ansible_collections.mlfleet.serving.plugins.module_utils._scale_decision import (
    audit_fields,
    decide,
    effective_settings,
    settle_request,
    state_records,
    warm_vm_plan,
)
from ansible_collections.mlfleet.serving.plugins.module_utils._swarm import (
    DOCKER_IMPORT_ERROR,
    DockerEndpoint,
    SwarmError,
    docker_api_argument_spec,
)
from ansible_collections.mlfleet.serving.plugins.module_utils._swarm_read import read_swarm
from ansible_collections.mlfleet.serving.plugins.module_utils._worker_pools import (
    pool_members,
    service_pools,
    worker_pools,
)


def argument_spec():
    spec = docker_api_argument_spec()
    spec.update(
        action=dict(type="str", required=True),
        direction=dict(type="str"),
        service=dict(type="str"),
        event=dict(type="dict", default={}),
        serving=dict(type="list", elements="dict", required=True),
        autoscale=dict(type="dict", default={}),
        worker_pools=dict(type="list", elements="dict"),
        workers=dict(type="dict"),
        template=dict(type="raw"),
        cluster=dict(type="str", default=""),
        state=dict(type="dict", required=True),
        pool_members=dict(type="dict", required=True),
        warm_members=dict(type="dict", default={}),
    )
    return spec


def main():
    module = AnsibleModule(argument_spec=argument_spec(), supports_check_mode=True)
    params = module.params
    try:
        pools, deprecation = worker_pools(params["worker_pools"], params["workers"], params["template"], params["cluster"])
        placed = service_pools(pools, params["serving"])
        request = settle_request(params["action"], params["direction"], params["service"], params["event"], list(placed))
        pool = next(pool for pool in pools if pool["name"] == placed[request["service"]])
        pool = dict(pool, vmids=sorted(int(vmid) for vmid in pool_members(pool, params["pool_members"])))
        pool["warm_vmids"] = sorted(int(vmid) for vmid in pool_members(pool, params["warm_members"], "warm_tag"))
        pool["services"] = sorted(service for service, name in placed.items() if name == pool["name"])
        bounds = {"name": pool["name"], "min": pool["count"], "max": pool["max_count"], "cores": pool["cores"]}
        bounds["gpus"] = (pool.get("pci_mapping") or {}).get("count", 0)
        settings = effective_settings(params["autoscale"], request["service"], bounds)
    except ValueError as e:
        module.fail_json(msg=f"Cannot scale: {e}")
    if deprecation:
        module.deprecate(deprecation, version="2.0.0", collection_name="mlfleet.serving")
    if DOCKER_IMPORT_ERROR:
        module.fail_json(msg=missing_required_lib("docker"), exception=DOCKER_IMPORT_ERROR)
    try:
        with DockerEndpoint.from_params(params) as endpoint:
            nodes, services, tasks = read_swarm(endpoint)
    except SwarmError as e:
        module.fail_json(msg=str(e))
    try:
        swarm = {"nodes": nodes, "services": services, "tasks": tasks}
        plan = decide(request, settings, params["state"], swarm, pool["vmids"], pool_tag=pool["tag"])
        plan.update(warm_vm_plan(plan, pool, swarm["nodes"]))
    except ValueError as e:
        module.fail_json(msg=f"Cannot decide {request['action']} of service {request['service']}: {e}")
    module.exit_json(changed=False, records=state_records(plan), audit_fields=audit_fields(plan), pool=pool, **plan)


if __name__ == "__main__":
    main()
