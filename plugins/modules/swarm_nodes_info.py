#!/usr/bin/python
# Copyright (c) mlfleet.serving maintainers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: swarm_nodes_info
short_description: List a Docker Swarm's nodes with their VM labels and running tasks
version_added: 0.1.0
description:
  - Reads the node list of a swarm through one of its managers, with each node's role, status, availability, labels
    (C(mlfleet.vmid) and C(mlfleet.pool) map a node to its VM) and how many tasks run on it, per service.
  - Scale-in uses it to pick idle workers by their VM.
author:
  - mlfleet.serving maintainers (@mlfleet)
extends_documentation_fragment:
  - mlfleet.serving.attributes
  - mlfleet.serving.docker_api
attributes:
  check_mode:
    support: full
    details:
      - The module only reads.
  diff_mode:
    support: none
  idempotent:
    support: full
options: {}
notes:
  - O(docker_host) must be a manager of the swarm.
seealso:
  - module: mlfleet.serving.swarm_join
"""

EXAMPLES = r"""
- name: Read the swarm's nodes through the first manager
  mlfleet.serving.swarm_nodes_info:
    docker_host: "{{ hostvars[groups['swarm_managers'][0]] | mlfleet.serving.docker_ssh_endpoint }}"
    ssh_private_key_file: "{{ ansible_ssh_private_key_file }}"
  delegate_to: localhost
  register: swarm

- name: Show the workers' VMs
  ansible.builtin.debug:
    msg: "{{ swarm.nodes | selectattr('role', 'eq', 'worker') | map(attribute='vmid') }}"
"""

RETURN = r"""
cluster_id:
  description: Id of the swarm.
  returned: always
  type: str
  sample: x1mnemefd1ozkxl3cv7mglnx9
nodes:
  description: The swarm's nodes, sorted by host name.
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
    address:
      description: Address the manager sees the node at.
      type: str
    manager_reachability:
      description: V(reachable) or V(unreachable) for managers; null for workers.
      type: str
    labels:
      description: Node labels.
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
      address: 192.0.2.21
      manager_reachability: null
      labels: {mlfleet.vmid: "121", mlfleet.pool: swarm_worker}
      vmid: 121
      pool: swarm_worker
      running_tasks: {resnet18: 2}
"""

from ansible.module_utils.basic import AnsibleModule, missing_required_lib

from ansible_collections.mlfleet.serving.plugins.module_utils._swarm import (
    DOCKER_IMPORT_ERROR,
    POOL_LABEL,
    VMID_LABEL,
    DockerEndpoint,
    SwarmError,
    docker_api_argument_spec,
    node_summary,
)


def read_nodes(endpoint):
    client = endpoint.client
    cluster = endpoint.call("Reading the swarm (the endpoint must be a manager)", client.inspect_swarm)
    services = {s["ID"]: s["Spec"]["Name"] for s in endpoint.call("Listing services", client.services)}
    running = {}
    for task in endpoint.call("Listing tasks", client.tasks, filters={"desired-state": "running"}):
        if (task.get("Status") or {}).get("State") == "running":
            per_node = running.setdefault(task.get("NodeID"), {})
            name = services.get(task["ServiceID"], task["ServiceID"])
            per_node[name] = per_node.get(name, 0) + 1
    nodes = []
    for record in endpoint.call("Listing nodes", client.nodes):
        summary = node_summary(record)
        vmid = summary["labels"].get(VMID_LABEL)
        summary["vmid"] = int(vmid) if vmid and vmid.isdigit() else None
        summary["pool"] = summary["labels"].get(POOL_LABEL)
        summary["running_tasks"] = running.get(summary["node_id"], {})
        nodes.append(summary)
    nodes.sort(key=lambda n: (n["hostname"] or "", n["node_id"]))
    return {"cluster_id": cluster["ID"], "nodes": nodes}


def main():
    module = AnsibleModule(argument_spec=docker_api_argument_spec(), supports_check_mode=True)
    if DOCKER_IMPORT_ERROR:
        module.fail_json(msg=missing_required_lib("docker"), exception=DOCKER_IMPORT_ERROR)
    try:
        with DockerEndpoint.from_params(module.params) as endpoint:
            result = read_nodes(endpoint)
    except SwarmError as e:
        module.fail_json(msg=str(e))
    module.exit_json(changed=False, **result)


if __name__ == "__main__":
    main()
