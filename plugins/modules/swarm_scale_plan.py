#!/usr/bin/python
# Copyright (c) mlfleet.serving maintainers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: swarm_scale_plan
short_description: Decide how to scale a Swarm service - more or fewer replicas, worker VMs to add or remove
version_added: 0.1.0
description:
  - Reads the swarm's nodes, services and tasks through one manager and plans one step of the autoscaler for a replicated
    service. It never changes anything; the playbooks act on the plan (mlfleet.serving.swarm_replicas,
    mlfleet.serving.proxmox_vm_pool, mlfleet.serving.swarm_join).
  - Capacity is counted in CPUs as Swarm's scheduler counts reservations. A replica needs the service's CPU reservation
    (C(reserve_cpus)), else its CPU limit, else nothing; a node holds floor((its CPUs - the reservations of the other
    services' tasks on it) / CPUs per replica) replicas, at most the service's C(max_replicas_per_node), if it is ready,
    active and meets the service's placement constraints.
  - V(scale_out) raises the replicas by O(step) (up to O(max_replicas)) when they fit on the current nodes (RV(decision=replicas)).
    When they do not, and the pool has fewer than O(max_workers) VMs, RV(decision=vms) asks for the fewest worker VMs (at most
    O(vm_step)) that make room, each assumed to bring O(new_worker_cpus) and to carry the labels the service's constraints need.
    At O(max_workers), the replicas rise as far as they fit, or RV(decision=none).
  - Pool VMs that are not swarm workers yet (O(worker_pool_size) above the worker count, as a run killed after the clone
    leaves them) are capacity on the way. When they make room, RV(decision=vms) comes with RV(add_workers=0), even at
    O(max_workers) or with O(vm_step=0); the run joins them instead of cloning more.
  - V(scale_in) lowers the replicas by O(step) (down to O(min_replicas)) and picks the workers that can go (at most O(vm_step)).
    A worker can go when the replicas of every replicated service (this one at its new count) still fit on the other nodes,
    checked by first-fit-decreasing packing with the constraints and per-node maximum of each service and the reservations of
    global services. Workers with the fewest tasks go first, then the newest VM (highest C(mlfleet.vmid)). Managers, workers that
    are not ready, workers without an C(mlfleet.vmid) label (no VM of the pool), O(protected) workers and the last O(min_workers)
    workers are kept. Idle workers can go even when the replicas are already at their minimum.
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
  service:
    description: Name of the replicated Swarm service to scale.
    type: str
    required: true
  action:
    description: V(scale_out) plans more capacity, V(scale_in) less.
    type: str
    choices: [scale_out, scale_in]
    required: true
  step:
    description:
      - Replicas to add (V(scale_out)) or remove (V(scale_in)) in one run.
      - V(0) keeps the count and only plans for the replicas the service has (RV(capacity), workers that can go).
    type: int
    default: 1
  min_replicas:
    description: The fewest replicas the service keeps.
    type: int
    default: 1
  max_replicas:
    description: The most replicas the service may run.
    type: int
    required: true
  min_workers:
    description: The fewest worker nodes the swarm keeps; scale-in never goes below it.
    type: int
    default: 1
  max_workers:
    description: The most worker VMs the pool may have; scale-out never goes above it.
    type: int
    required: true
  vm_step:
    description:
      - The most worker VMs added (V(scale_out)) or removed (V(scale_in)) in one run.
      - V(0) plans replicas only.
    type: int
    default: 1
  new_worker_cpus:
    description:
      - CPUs of a new worker VM (the cores its template gives it). Required with O(action=scale_out).
    type: float
  worker_pool_size:
    description:
      - Worker VMs in the pool now, counted against O(max_workers). It may be larger than the swarm's worker nodes while
        a new VM is being configured; those VMs count as capacity on the way.
      - Defaults to the number of worker nodes in the swarm.
    type: int
  protected:
    description: Workers that scale-in never removes, by host name or VM id.
    type: list
    elements: str
    default: []
notes:
  - O(docker_host) must be a manager of the swarm.
  - Placement constraints on V(node.role), V(node.hostname), V(node.id), V(node.platform.os), V(node.platform.arch) and
    V(node.labels.<key>) with V(==) or V(!=) are understood; the module fails on others, naming the service and constraint.
seealso:
  - module: mlfleet.serving.swarm_replicas
  - module: mlfleet.serving.swarm_nodes_info
  - module: mlfleet.serving.swarm_join
"""

EXAMPLES = r"""
- name: Plan a scale-out of resnet18
  mlfleet.serving.swarm_scale_plan:
    docker_host: "{{ hostvars[groups['swarm_managers'][0]] | mlfleet.serving.docker_ssh_endpoint }}"
    ssh_private_key_file: "{{ ansible_ssh_private_key_file }}"
    service: resnet18
    action: scale_out
    step: 2
    max_replicas: 12
    max_workers: 4
    new_worker_cpus: 2
    worker_pool_size: "{{ groups['swarm_workers'] | length }}"
  delegate_to: localhost
  run_once: true
  register: plan

- name: Raise the replicas when they fit
  mlfleet.serving.swarm_replicas:
    docker_host: "{{ hostvars[groups['swarm_managers'][0]] | mlfleet.serving.docker_ssh_endpoint }}"
    ssh_private_key_file: "{{ ansible_ssh_private_key_file }}"
    name: resnet18
    replicas: "{{ plan.target_replicas }}"
  delegate_to: localhost
  run_once: true
  when: plan.decision == 'replicas'

- name: Plan a scale-in, keeping the first worker
  mlfleet.serving.swarm_scale_plan:
    docker_host: "{{ hostvars[groups['swarm_managers'][0]] | mlfleet.serving.docker_ssh_endpoint }}"
    ssh_private_key_file: "{{ ansible_ssh_private_key_file }}"
    service: resnet18
    action: scale_in
    min_replicas: 2
    max_replicas: 12
    min_workers: 1
    max_workers: 4
    protected: [worker-1]
  delegate_to: localhost
  run_once: true
  register: plan_in

- name: Show the VMs to destroy
  ansible.builtin.debug:
    msg: "{{ plan_in.remove_nodes | map(attribute='vmid') }}"
"""

RETURN = r"""
decision:
  description:
    - V(replicas) - set the replicas to RV(target_replicas); V(vms) - add RV(add_workers) worker VMs (0 - only join the
      pool's VMs that are not workers yet), then set the replicas to RV(target_replicas); V(replicas_and_nodes) - lower
      the replicas, then remove RV(remove_nodes); V(nodes) - remove RV(remove_nodes) only; V(none) - nothing to do (RV(reason) says why).
  returned: always
  type: str
  sample: replicas
reason:
  description: One sentence with the figures behind the decision.
  returned: always
  type: str
  sample: "resnet18: 2 → 4 replicas; 4 fit on 2 workers"
current_replicas:
  description: Replicas of the service now.
  returned: always
  type: int
  sample: 2
target_replicas:
  description: Replicas the service should have after this step (RV(current_replicas) when unchanged).
  returned: always
  type: int
  sample: 4
capacity:
  description: Replicas of the service the current nodes hold, if it alone were rescheduled. One million means unbounded.
  returned: when O(action=scale_out)
  type: int
  sample: 4
add_workers:
  description: Worker VMs to add; 0 unless RV(decision=vms), and 0 with it when the pool's VMs still joining make room.
  returned: when O(action=scale_out)
  type: int
  sample: 0
remove_nodes:
  description: Workers to drain, remove from the swarm and destroy, in this order.
  returned: when O(action=scale_in)
  type: list
  elements: dict
  contains:
    hostname:
      description: Host name of the node.
      type: str
    node_id:
      description: Swarm node id.
      type: str
    vmid:
      description: VM id from the node's C(mlfleet.vmid) label; null when absent.
      type: int
  sample: [{hostname: lab-worker-3, node_id: 9x3q1s0u1bd4kzjbq5h5o2zyu, vmid: 123}]
values:
  description:
    - The figures the plan was made from (bounds, CPUs per replica, capacity, workers, ...), for the audit trail.
    - In a template, read it as C(plan['values']), since C(plan.values) is the dict's method.
  returned: always
  type: dict
  sample: {service: resnet18, cpus_per_replica: 1.0, capacity: 4, workers: 2, worker_pool_size: 2, max_workers: 4}
nodes:
  description: The swarm's nodes, sorted by host name, as the planner saw them.
  returned: always
  type: list
  elements: dict
  contains:
    node_id:
      description: Swarm node id.
      type: str
    hostname:
      description: Host name the node reports.
      type: str
    role:
      description: V(manager) or V(worker).
      type: str
    status:
      description: V(ready), V(down), V(disconnected) or V(unknown).
      type: str
    availability:
      description: V(active), V(pause) or V(drain).
      type: str
    cpus:
      description: CPUs the node reports.
      type: float
    labels:
      description: Node labels.
      type: dict
    platform:
      description: C(os) and C(arch) of the node.
      type: dict
    vmid:
      description: The C(mlfleet.vmid) label as a number; null when absent.
      type: int
    pool:
      description: The C(mlfleet.pool) label; null when absent.
      type: str
    running_tasks:
      description: Tasks running on the node, per service name.
      type: dict
  sample:
    - node_id: 9x3q1s0u1bd4kzjbq5h5o2zyu
      hostname: lab-worker-1
      role: worker
      status: ready
      availability: active
      cpus: 2.0
      labels: {mlfleet.vmid: "121", mlfleet.pool: swarm_worker}
      platform: {os: linux, arch: x86_64}
      vmid: 121
      pool: swarm_worker
      running_tasks: {resnet18: 2}
"""

from ansible.module_utils.basic import AnsibleModule, missing_required_lib

from ansible_collections.mlfleet.serving.plugins.module_utils._scale_plan import plan_scale_in, plan_scale_out
from ansible_collections.mlfleet.serving.plugins.module_utils._swarm import (
    DOCKER_IMPORT_ERROR,
    DockerEndpoint,
    SwarmError,
    docker_api_argument_spec,
)
from ansible_collections.mlfleet.serving.plugins.module_utils._swarm_read import read_swarm


def argument_spec():
    spec = docker_api_argument_spec()
    spec.update(
        service=dict(type="str", required=True),
        action=dict(type="str", choices=["scale_out", "scale_in"], required=True),
        step=dict(type="int", default=1),
        min_replicas=dict(type="int", default=1),
        max_replicas=dict(type="int", required=True),
        min_workers=dict(type="int", default=1),
        max_workers=dict(type="int", required=True),
        vm_step=dict(type="int", default=1),
        new_worker_cpus=dict(type="float"),
        worker_pool_size=dict(type="int"),
        protected=dict(type="list", elements="str", default=[]),
    )
    return spec


def plan(params, nodes, services, tasks):
    common = dict(step=params["step"], min_replicas=params["min_replicas"], max_replicas=params["max_replicas"], min_workers=params["min_workers"])
    if params["action"] == "scale_out":
        return plan_scale_out(
            params["service"],
            nodes,
            services,
            tasks,
            max_workers=params["max_workers"],
            vm_step=params["vm_step"],
            new_worker_cpus=params["new_worker_cpus"],
            worker_pool_size=params["worker_pool_size"],
            **common,
        )
    return plan_scale_in(
        params["service"],
        nodes,
        services,
        tasks,
        protected=params["protected"],
        max_workers=params["max_workers"],
        vm_step=params["vm_step"],
        **common,
    )


def main():
    module = AnsibleModule(argument_spec=argument_spec(), supports_check_mode=True, required_if=[("action", "scale_out", ("new_worker_cpus",))])
    if DOCKER_IMPORT_ERROR:
        module.fail_json(msg=missing_required_lib("docker"), exception=DOCKER_IMPORT_ERROR)
    try:
        with DockerEndpoint.from_params(module.params) as endpoint:
            nodes, services, tasks = read_swarm(endpoint)
    except SwarmError as e:
        module.fail_json(msg=str(e))
    try:
        result = plan(module.params, nodes, services, tasks)
    except ValueError as e:
        module.fail_json(msg=f"Cannot plan {module.params['action']} of service {module.params['service']}: {e}")
    module.exit_json(changed=False, nodes=nodes, **result)


if __name__ == "__main__":
    main()
