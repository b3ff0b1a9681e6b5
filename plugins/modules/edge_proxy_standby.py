#!/usr/bin/python
# Copyright (c) mlfleet.serving maintainers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: edge_proxy_standby
short_description: Promote a service's standby replicas into rotation in the edge proxy, or return them to standby
version_added: 0.1.0
description:
  - A service with standby replicas (C(warm_replicas)) has them in its edge proxy backend as the servers of a
    C(server-template) named O(prefix), at weight 0, so that they take no request while they wait, warm.
  - This module sets the weight of every one of those servers of the backend O(service) - to O(weight) with
    O(state=promoted), so they serve at once, or to 0 with O(state=standby) - through HAProxy's admin socket, a Unix
    socket in O(runtime_dir) on the node (never a TCP port; reach the node over SSH). A server returned to standby
    finishes the requests it holds; it only gets no new ones.
  - Runtime state lives in the HAProxy process. After a change, the module saves C(show servers state) to the
    server-state file in O(runtime_dir), which the edge proxy loads when it starts, so a proxy task that restarts keeps
    the weights.
  - Run it on every node that runs an edge proxy task (the proxy is a global Swarm service).
author:
  - mlfleet.serving maintainers (@mlfleet)
extends_documentation_fragment:
  - mlfleet.serving.attributes
attributes:
  check_mode:
    support: full
    details:
      - Reads the weights and reports what would change; sets nothing and writes no state file.
  diff_mode:
    support: full
    details:
      - The weights of the standby servers before and after.
  idempotent:
    support: full
options:
  service:
    description: The Swarm service, whose backend in the edge proxy has the same name.
    type: str
    required: true
  state:
    description: V(promoted) puts the standby servers into rotation at O(weight); V(standby) takes them out (weight 0).
    type: str
    choices: [promoted, standby]
    default: promoted
  weight:
    description: The weight of a promoted standby server, the weight of the service's other servers (the edge proxy's default, 1).
    type: int
    default: 1
  prefix:
    description: The name of the backend's C(server-template) of standby servers; its servers are C(<prefix>1), C(<prefix>2), ...
    type: str
    default: standby
  serving_before_return:
    description:
      - With O(state=standby), return the standby servers only once at least this many of the backend's own servers (not
        the standby ones) are up and in rotation, waiting up to O(wait_timeout) seconds for them, so that the capacity the
        promotion lent is handed back only when the service's own replicas hold it.
      - When they are not up in time, the standby servers stay in rotation, RV(held) is true and nothing fails; the next
        return tries again.
      - V(0) returns them at once.
    type: int
    default: 0
  wait_timeout:
    description: Seconds to wait for O(serving_before_return) of the backend's own servers.
    type: float
    default: 120
  runtime_dir:
    description:
      - The node's directory the edge proxy mounts for its runtime state (the role's C(edge_proxy_runtime_dir)), which
        holds the admin socket C(admin.sock) and the server-state file C(server-state).
    type: path
    default: /var/lib/mlfleet/edge-proxy
"""

EXAMPLES = r"""
- name: Put the standby replicas of resnet18 into rotation on every proxy node
  mlfleet.serving.edge_proxy_standby:
    service: resnet18
    state: promoted
  become: true
  delegate_to: "{{ item }}"
  loop: "{{ groups['swarm_managers'] }}"

- name: Return them to standby once 4 of the service's own replicas are up in the proxy
  mlfleet.serving.edge_proxy_standby:
    service: resnet18
    state: standby
    serving_before_return: 4
  become: true
"""

RETURN = r"""
servers:
  description: The standby servers of the backend, with their weight before and after and whether HAProxy sees them up.
  returned: success
  type: list
  elements: dict
  sample: [{"name": "standby1", "up": true, "previous_weight": 0, "weight": 1}, {"name": "standby2", "up": false, "previous_weight": 0, "weight": 1}]
serving:
  description: How many standby servers are up and in rotation after the run.
  returned: success
  type: int
  sample: 1
own_serving:
  description: How many of the backend's own servers (not the standby ones) are up and in rotation.
  returned: success
  type: int
  sample: 4
held:
  description: True when O(serving_before_return) of the backend's own servers were not up in time, so the standby servers stay in rotation.
  returned: success
  type: bool
  sample: false
state_file:
  description: The server-state file the weights were saved to; null when nothing changed.
  returned: success
  type: str
  sample: /var/lib/mlfleet/edge-proxy/server-state
"""

import os
import re
import time

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.mlfleet.serving.plugins.module_utils._haproxy_runtime import RuntimeSocket


def main():
    module = AnsibleModule(
        argument_spec=dict(
            service=dict(type="str", required=True),
            state=dict(type="str", choices=["promoted", "standby"], default="promoted"),
            weight=dict(type="int", default=1),
            prefix=dict(type="str", default="standby"),
            serving_before_return=dict(type="int", default=0),
            wait_timeout=dict(type="float", default=120),
            runtime_dir=dict(type="path", default="/var/lib/mlfleet/edge-proxy"),
        ),
        supports_check_mode=True,
    )
    params = module.params
    if not 1 <= params["weight"] <= 256:
        module.fail_json(msg=f"weight must be 1 to 256 (HAProxy's range for a serving server), got {params['weight']}")
    target = params["weight"] if params["state"] == "promoted" else 0
    runtime = RuntimeSocket(os.path.join(params["runtime_dir"], "admin.sock"))
    slot = re.compile(rf"^{re.escape(params['prefix'])}\d+$")
    try:
        servers, own = split_servers(runtime.servers(params["service"]), slot)
        if not servers:
            module.fail_json(
                msg=f"the edge proxy's backend {params['service']} has no standby servers ({params['prefix']}1, ...): give the service "
                "warm_replicas and deploy it with playbooks/serve.yml, which adds them"
            )
        held = False
        if params["state"] == "standby" and params["serving_before_return"] > 0 and not module.check_mode:
            deadline = time.monotonic() + params["wait_timeout"]
            while serving(own) < params["serving_before_return"] and time.monotonic() < deadline:
                time.sleep(0.5)
                servers, own = split_servers(runtime.servers(params["service"]), slot)
            held = serving(own) < params["serving_before_return"]
        changes = [] if held else [server for server in servers if server["weight"] != target]
        state_file = None
        if changes and not module.check_mode:
            for server in changes:
                runtime.set_weight(params["service"], server["name"], target)
            state_file = os.path.join(params["runtime_dir"], "server-state")
            runtime.save_state(state_file)
    except RuntimeError as error:
        module.fail_json(msg=str(error))
    after = {s["name"]: (s["weight"] if held else target) for s in servers}
    result = [{"name": s["name"], "up": s["up"] and not s["maintenance"], "previous_weight": s["weight"], "weight": after[s["name"]]} for s in servers]
    module.exit_json(
        changed=bool(changes),
        servers=result,
        serving=sum(1 for server in result if server["up"] and server["weight"] > 0),
        own_serving=serving(own),
        held=held,
        msg=(
            f"{serving(own)} of the {params['serving_before_return']} own servers of {params['service']} the return waits for were "
            f"up after {params['wait_timeout']:g} s: the standby servers stay in rotation"
        )
        if held
        else "",
        state_file=state_file,
        diff={"before": {s["name"]: s["weight"] for s in servers}, "after": after},
    )


def split_servers(servers, slot):
    """The backend's standby servers (named by the template's prefix) and its own."""
    return [s for s in servers if slot.match(s["name"])], [s for s in servers if not slot.match(s["name"])]


def serving(servers):
    """Servers up, not in maintenance, and at a weight above 0: those that take requests."""
    return sum(1 for s in servers if s["up"] and not s["maintenance"] and s["weight"] > 0)


if __name__ == "__main__":
    main()
