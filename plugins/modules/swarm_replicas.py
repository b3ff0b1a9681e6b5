#!/usr/bin/python
# Copyright (c) mlfleet.serving maintainers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: swarm_replicas
short_description: Set the replica count of a Swarm service and wait until the replicas run
version_added: 0.1.0
description:
  - Sets the replicas of a replicated Swarm service through a manager's Docker API. Only C(Mode.Replicated.Replicas)
    changes; the rest of the stored spec goes back exactly as it was, so no running task restarts. An update that
    meets another writer's (a version conflict) is read again and retried.
  - With O(wait=true), the module returns once exactly O(replicas) tasks of the service run and no other task of it
    waits to be placed, twice in a row half a second apart. When that takes longer than O(wait_timeout), it fails
    with the reasons Swarm gives for the tasks that do not run, for example
    C(no suitable node (insufficient resources on 2 nodes)).
  - Use mlfleet.serving.swarm_scale_plan to decide the count, and mlfleet.serving.swarm_service to declare the service.
author:
  - mlfleet.serving maintainers (@mlfleet)
extends_documentation_fragment:
  - mlfleet.serving.attributes
  - mlfleet.serving.docker_api
  - mlfleet.serving.scale_lease
attributes:
  check_mode:
    support: full
    details:
      - Nothing is written and nothing is waited for; RV(running_tasks) and RV(nodes) describe the service as it is.
  diff_mode:
    support: full
    details:
      - The replica count before and after.
  idempotent:
    support: full
    details:
      - With O(wait=true), an unchanged count still waits until the replicas run.
options:
  name:
    description: Name of the replicated service.
    type: str
    required: true
  replicas:
    description: The replica count to set, 0 or more.
    type: int
    required: true
  wait:
    description: Wait until exactly O(replicas) tasks run and none waits to be placed; fail after O(wait_timeout).
    type: bool
    default: true
  wait_timeout:
    description: Seconds to wait for the replicas.
    type: int
    default: 300
notes:
  - O(docker_host) must be a manager of the swarm.
  - A global service has no replica count; the module fails for one.
seealso:
  - module: mlfleet.serving.swarm_scale_plan
  - module: mlfleet.serving.swarm_service
"""

EXAMPLES = r"""
- name: Run four resnet18 replicas
  mlfleet.serving.swarm_replicas:
    docker_host: "{{ hostvars[groups['swarm_managers'][0]] | mlfleet.serving.docker_ssh_endpoint }}"
    ssh_private_key_file: "{{ ansible_ssh_private_key_file }}"
    name: resnet18
    replicas: 4
    wait_timeout: 180
  delegate_to: localhost
  run_once: true
  register: scaled

- name: Show where the replicas run
  ansible.builtin.debug:
    msg: "{{ scaled.running_tasks }} replicas on {{ scaled.nodes }}"
"""

RETURN = r"""
previous_replicas:
  description: Replica count before the run.
  returned: success
  type: int
  sample: 2
replicas:
  description: Replica count after the run (in check mode, the count that would be set).
  returned: success
  type: int
  sample: 4
running_tasks:
  description: Tasks of the service that run and are meant to run, when the module returned.
  returned: success
  type: int
  sample: 4
nodes:
  description: Running tasks of the service per node host name.
  returned: success
  type: dict
  sample: {lab-worker-1: 2, lab-worker-2: 2}
"""

import time

from ansible.module_utils.basic import AnsibleModule, missing_required_lib

from ansible_collections.mlfleet.serving.plugins.module_utils._lease import fence_argument_spec, fence_module
from ansible_collections.mlfleet.serving.plugins.module_utils._swarm import (
    DOCKER_IMPORT_ERROR,
    DockerEndpoint,
    SwarmError,
    docker_api_argument_spec,
    replicated_count,
    update_service_replicas,
)

# Another writer may change the count between reading it and sending the delta: read and send again this often.
SET_ATTEMPTS = 3
POLL_INTERVAL = 0.5
# Reasons quoted in a timeout message, at most.
QUOTED_REASONS = 5


def argument_spec():
    spec = docker_api_argument_spec()
    spec.update(fence_argument_spec())
    spec.update(
        name=dict(type="str", required=True),
        replicas=dict(type="int", required=True),
        wait=dict(type="bool", default=True),
        wait_timeout=dict(type="int", default=300),
    )
    return spec


def find_service(endpoint, name):
    # The name filter matches prefixes too.
    found = [s for s in endpoint.call(f"Looking up service {name}", endpoint.client.services, filters={"name": name}) if s["Spec"]["Name"] == name]
    if not found:
        raise SwarmError(f"Service {name} does not exist in the swarm managed at {endpoint.url}; check the name, or create it with swarm_service")
    service = found[0]
    if replicated_count(service) is None:
        mode = next(iter(service["Spec"].get("Mode") or {"Global": {}}))
        raise SwarmError(f"Service {name} runs in {mode} mode and has no replica count; set replicas only on a replicated service")
    return service


def keep_labels(labels):
    """update_service_replicas' label change: the labels stay as they are."""


def set_replicas(endpoint, name, service_id, replicas):
    for attempt in range(SET_ATTEMPTS):
        current = replicated_count(endpoint.call(f"Reading service {name}", endpoint.client.inspect_service, service_id))
        if current == replicas:
            return
        if attempt + 1 == SET_ATTEMPTS:
            raise SwarmError(f"Service {name}: another writer keeps changing its replicas (now {current}); stop the other autoscaler and re-run")
        update_service_replicas(endpoint, service_id, replicas - current, keep_labels)


def task_states(endpoint, name, service_id):
    """The service's tasks that are meant to run, and the running ones among them."""
    tasks = endpoint.call(f"Listing the tasks of service {name}", endpoint.client.tasks, filters={"service": service_id, "desired-state": "running"})
    return tasks, [t for t in tasks if (t.get("Status") or {}).get("State") == "running"]


def node_names(endpoint):
    return {n["ID"]: (n.get("Description") or {}).get("Hostname") or n["ID"] for n in endpoint.call("Listing nodes", endpoint.client.nodes)}


def per_node(endpoint, running):
    names = node_names(endpoint) if running else {}
    counts = {}
    for task in running:
        host = names.get(task.get("NodeID"), task.get("NodeID"))
        counts[host] = counts.get(host, 0) + 1
    return dict(sorted(counts.items()))


def waiting_reasons(tasks):
    """'2 × pending: no suitable node (insufficient resources on 2 nodes)' for the tasks that do not run."""
    reasons = {}
    for task in tasks:
        status = task.get("Status") or {}
        if status.get("State") != "running":
            reason = f"{status.get('State')}: {status.get('Err') or status.get('Message') or 'no reason given'}"
            reasons[reason] = reasons.get(reason, 0) + 1
    ranked = sorted(reasons.items(), key=lambda item: (-item[1], item[0]))
    return "; ".join(f"{count} × {reason}" for reason, count in ranked[:QUOTED_REASONS])


def wait_running(endpoint, name, service_id, replicas, timeout):
    """Wait until exactly ``replicas`` tasks run and no other waits, seen twice in a row; the running tasks."""
    deadline = time.monotonic() + timeout
    # A task that fails at start runs for a moment: the same tasks must run at two polls in a row.
    previously = None
    while True:
        tasks, running = task_states(endpoint, name, service_id)
        ids = sorted(t["ID"] for t in running)
        if len(running) == replicas and len(tasks) == replicas:
            if ids == previously:
                return running
            previously = ids
        else:
            previously = None
        if time.monotonic() >= deadline:
            reasons = waiting_reasons(tasks)
            extra = len(running) - replicas
            detail = reasons or (f"{extra} surplus tasks still stopping" if extra > 0 else "no task waits")
            raise SwarmError(
                f"Service {name}: {len(running)} of {replicas} replicas running after {timeout} s ({detail}). "
                "For tasks that find no suitable node, add worker nodes or lower the service's CPU reservation; raise wait_timeout "
                "if the images are still being pulled"
            )
        time.sleep(POLL_INTERVAL)


def run(module, endpoint):
    params = module.params
    name, replicas = params["name"], params["replicas"]
    service = find_service(endpoint, name)
    previous = replicated_count(service)
    changed = previous != replicas
    if changed and not module.check_mode:
        set_replicas(endpoint, name, service["ID"], replicas)
    if params["wait"] and not module.check_mode:
        running = wait_running(endpoint, name, service["ID"], replicas, params["wait_timeout"])
    else:
        running = task_states(endpoint, name, service["ID"])[1]
    result = {"changed": changed, "previous_replicas": previous, "replicas": replicas, "running_tasks": len(running), "nodes": per_node(endpoint, running)}
    if module._diff:
        result["diff"] = {"before": {"replicas": previous}, "after": {"replicas": replicas}}
    return result


def main():
    module = AnsibleModule(argument_spec=argument_spec(), supports_check_mode=True)
    if DOCKER_IMPORT_ERROR:
        module.fail_json(msg=missing_required_lib("docker"), exception=DOCKER_IMPORT_ERROR)
    if module.params["replicas"] < 0:
        module.fail_json(msg=f"replicas must be 0 or more, got {module.params['replicas']}; give the number of tasks service {module.params['name']} runs")
    if module.params["wait_timeout"] < 0:
        module.fail_json(msg=f"wait_timeout must be 0 or more seconds, got {module.params['wait_timeout']}")
    fence_module(module)
    try:
        with DockerEndpoint.from_params(module.params) as endpoint:
            result = run(module, endpoint)
    except SwarmError as e:
        module.fail_json(msg=str(e))
    module.exit_json(**result)


if __name__ == "__main__":
    main()
