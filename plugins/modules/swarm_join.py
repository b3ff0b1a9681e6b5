#!/usr/bin/python
# Copyright (c) mlfleet.serving maintainers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: swarm_join
short_description: Join a node to a Docker Swarm, or drain it and take it out
version_added: 0.1.0
description:
  - Makes the node whose Docker Engine API is O(docker_host) a member of the swarm that O(managers) manage,
    or takes it out of that swarm.
  - The join token is read from a manager through the Docker API and never leaves the module.
  - Membership is checked against I(this) swarm. A node that is part of another swarm fails with a clear message
    unless O(force=true), which makes it leave that swarm first.
  - After joining, the module waits until the manager reports the node C(Ready) (and C(reachable), for a manager),
    then sets its role, availability and labels. O(vmid) and O(pool) become the node labels C(mlfleet.vmid) and
    C(mlfleet.pool), which map the node back to its VM. Entries of the same VM that are C(down), left behind by a node
    that left the swarm without being removed, are removed.
  - With O(state=absent) the node is drained through the manager and waits until none of its tasks runs, leaves
    the swarm and is removed from the node list. With O(drain_surge=true) the replicated services that run tasks on
    the node first get as many extra replicas elsewhere, so they keep their full count of running tasks while the
    node drains.
  - Typically runs on the control host (C(delegate_to=localhost)) with C(ssh://) endpoints for the node and the
    managers, so no node needs SSH access to another.
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
      - Reports the actions it would take (leave, join, role, availability and label changes, drain) and changes nothing.
  diff_mode:
    support: full
    details:
      - The diff shows the node's membership, role, availability and labels before and after.
  idempotent:
    support: full
    details:
      - Only labels named in O(labels), O(vmid) and O(pool) are compared; other labels are left alone.
      - An interrupted O(state=absent) run leaves the node drained (or paused) and its surge recorded in service
        labels; the next run, with either state, picks up where it stopped and restores the services' replica counts.
options:
  managers:
    description:
      - Docker API endpoints of the swarm's managers, in the same forms as O(docker_host). The first one that answers
        as a manager is used; the others are fallbacks.
      - The node joins through the swarm addresses of every reachable manager.
    type: list
    elements: str
    required: true
  state:
    description:
      - V(present) makes the node a member of this swarm with O(role), O(availability) and the labels.
      - V(absent) drains the node, waits until its tasks run elsewhere, makes it leave and removes it from the node list.
        A node whose O(docker_host) does not answer any more is found by O(vmid) or O(node_name) and removed through
        the manager.
    type: str
    choices: [present, absent]
    default: present
  role:
    description:
      - Role of the node in the swarm. An existing member with another role is promoted or demoted.
    type: str
    choices: [worker, manager]
    default: worker
  availability:
    description:
      - Scheduling availability of the member with O(state=present). V(active) also undoes a drain left by an
        interrupted O(state=absent) run.
    type: str
    choices: [active, pause, drain]
    default: active
  vmid:
    description:
      - The Proxmox VMID of the node's VM, kept as node label C(mlfleet.vmid).
      - With O(state=absent), finds the node when O(docker_host) does not answer.
    type: int
  pool:
    description:
      - The pool tag of the node's VM, kept as node label C(mlfleet.pool).
    type: str
  labels:
    description:
      - Further node labels to set. Labels not named here are left as they are.
    type: dict
    default: {}
  node_name:
    description:
      - Host name of the node in the swarm. With O(state=absent), finds the node when O(docker_host) does not answer
        and O(vmid) is not given; fails if more than one node has this name.
    type: str
  force:
    description:
      - With O(state=present), make a node that is part of another swarm leave it and join this one.
    type: bool
    default: false
  join_token:
    description:
      - A join token to use instead of the one read from the manager, for tokens handed out by other means.
    type: str
  advertise_addr:
    description:
      - Address the node advertises to the swarm, as C(docker swarm join --advertise-addr). By default the engine
        picks the address it reaches the managers from.
    type: str
  listen_addr:
    description:
      - Address the node listens on for swarm traffic.
    type: str
    default: 0.0.0.0:2377
  data_path_addr:
    description:
      - Address for overlay data traffic, as C(docker swarm join --data-path-addr).
    type: str
  timeout:
    description:
      - Seconds to wait until a joined node is C(Ready) on the manager (and C(reachable), for a manager).
    type: int
    default: 120
  retries:
    description:
      - How many more times a failed join is tried. A rejected join token is not retried.
    type: int
    default: 4
  retry_delay:
    description:
      - Seconds before the first retry; each further retry waits twice as long.
    type: float
    default: 2
  drain_timeout:
    description:
      - Seconds to wait for surge tasks to start elsewhere, and again for the drained node's tasks to stop and be
        running elsewhere. A node that does not empty in time stays drained and the module fails; re-run it.
    type: int
    default: 300
  drain_surge:
    description:
      - With O(state=absent), before draining, pause the node and raise each replicated service that runs tasks on it
        by that many replicas, wait until they run elsewhere, then drain and restore the replica count. Without it,
        Swarm starts each replacement only after the drained task stopped, so the service runs short meanwhile.
      - If the extra tasks cannot be placed within O(drain_timeout), the module warns and drains anyway.
    type: bool
    default: true
notes:
  - Managers are added one at a time by the mlfleet.serving.swarm_manager role (C(throttle=1)); adding several at
    once can cost the swarm its quorum while Raft catches up.
  - A node removed from this swarm while it was unreachable still believes it is a member; a later O(state=present)
    run sees a node this swarm does not know and needs O(force=true).
seealso:
  - module: mlfleet.serving.swarm_cluster
"""

EXAMPLES = r"""
- name: Join the workers to the swarm, through SSH from the control host
  mlfleet.serving.swarm_join:
    docker_host: "ssh://{{ ansible_user }}@{{ ansible_host }}"
    managers: "{{ groups['swarm_managers'] | map('extract', hostvars, 'ansible_host') | map('regex_replace', '^', 'ssh://mlops@') }}"
    ssh_private_key_file: ~/.ssh/id_ed25519
    role: worker
    vmid: "{{ proxmox_vmid }}"
    pool: swarm_worker
  delegate_to: localhost

- name: Drain a worker, wait until its tasks run elsewhere, and take it out of the swarm
  mlfleet.serving.swarm_join:
    docker_host: ssh://mlops@192.0.2.21
    managers: [ssh://mlops@192.0.2.10]
    state: absent
    vmid: 121
    drain_timeout: 600
  delegate_to: localhost
"""

RETURN = r"""
node_id:
  description: Swarm node id of the node; null when it is not (or no more) a member.
  returned: always
  type: str
  sample: 9x3q1s0u1bd4kzjbq5h5o2zyu
cluster_id:
  description: Id of the swarm the managers manage.
  returned: always
  type: str
  sample: x1mnemefd1ozkxl3cv7mglnx9
role:
  description: Role of the node after the run.
  returned: when the node is a member after the run
  type: str
  sample: worker
availability:
  description: Availability of the node after the run.
  returned: when the node is a member after the run
  type: str
  sample: active
labels:
  description: All node labels after the run.
  returned: when the node is a member after the run
  type: dict
  sample: {mlfleet.vmid: "121", mlfleet.pool: swarm_worker}
actions:
  description: What the module did, or would do in check mode, in order.
  returned: always
  type: list
  elements: str
  sample: ["joined as worker", "set labels mlfleet.vmid, mlfleet.pool"]
moved_tasks:
  description: Tasks that ran on the node when its drain began, per service name.
  returned: when O(state=absent) drained the node
  type: dict
  sample: {resnet18: 2}
"""

import time
from contextlib import ExitStack

from ansible.module_utils.basic import AnsibleModule, missing_required_lib

from ansible_collections.mlfleet.serving.plugins.module_utils._lease import fence_argument_spec, fence_module
from ansible_collections.mlfleet.serving.plugins.module_utils._swarm import (
    DOCKER_IMPORT_ERROR,
    POOL_LABEL,
    SURGE_LABEL_PREFIX,
    VMID_LABEL,
    DockerEndpoint,
    SwarmError,
    describe_api_error,
    docker_api_argument_spec,
    manager_addresses,
    node_summary,
    node_tasks,
    replicated_count,
    running_tasks_by_service,
    swarm_info,
    update_node_spec,
    update_service_replicas,
    wait_for,
)

# Words in a join error that mean the token (or the CA it pins) does not fit the swarm: retrying cannot help.
TOKEN_REJECTIONS = ("join token", "fingerprint", "invalidargument", "certificate signed by unknown authority")


def argument_spec():
    spec = docker_api_argument_spec()
    spec.update(fence_argument_spec())
    spec.update(
        managers=dict(type="list", elements="str", required=True),
        state=dict(type="str", choices=["present", "absent"], default="present"),
        role=dict(type="str", choices=["worker", "manager"], default="worker"),
        availability=dict(type="str", choices=["active", "pause", "drain"], default="active"),
        vmid=dict(type="int"),
        pool=dict(type="str"),
        labels=dict(type="dict", default={}),
        node_name=dict(type="str"),
        force=dict(type="bool", default=False),
        join_token=dict(type="str", no_log=True),
        advertise_addr=dict(type="str"),
        listen_addr=dict(type="str", default="0.0.0.0:2377"),
        data_path_addr=dict(type="str"),
        timeout=dict(type="int", default=120),
        retries=dict(type="int", default=4),
        retry_delay=dict(type="float", default=2),
        drain_timeout=dict(type="int", default=300),
        drain_surge=dict(type="bool", default=True),
    )
    return spec


def desired_labels(params):
    labels = {str(k): str(v) for k, v in params["labels"].items()}
    if params["vmid"] is not None:
        labels[VMID_LABEL] = str(params["vmid"])
    if params["pool"] is not None:
        labels[POOL_LABEL] = params["pool"]
    return labels


def surge_label(node_id):
    return SURGE_LABEL_PREFIX + node_id


class SwarmJoin:
    def __init__(self, module):
        self.module = module
        self.params = module.params
        self.check_mode = module.check_mode
        self.actions = []
        self.warnings = []
        self.name = self.params["node_name"] or self.params["docker_host"]

    def endpoint(self, stack, url):
        return stack.enter_context(DockerEndpoint.from_params(self.params, url))

    def open_manager(self, stack):
        reasons = []
        for url in self.params["managers"]:
            try:
                manager = self.endpoint(stack, url)
            except SwarmError as error:
                reasons.append(str(error))
                continue
            try:
                info = swarm_info(manager)
            except SwarmError as error:
                reasons.append(str(error))
                continue
            state = info.get("LocalNodeState")
            if state == "locked":
                reasons.append(f"{url} is a locked manager (autolock): unlock it with its unlock key")
            elif state != "active":
                reasons.append(f"{url} is in no swarm (state {state}): create the swarm with mlfleet.serving.swarm_cluster first")
            elif not info.get("ControlAvailable"):
                reasons.append(f"{url} is a worker, not a manager")
            else:
                return manager, info
        raise SwarmError("No swarm manager answered. " + " | ".join(reasons))

    def run(self):
        with ExitStack() as stack:
            manager, manager_info = self.open_manager(stack)
            cluster = manager.call("Reading the swarm", manager.client.inspect_swarm)
            self.cluster_id = cluster["ID"]
            self.manager_node_id = manager_info.get("NodeID")
            if self.params["state"] == "present":
                node = self.endpoint(stack, self.params["docker_host"])
                result = self.present(node, manager, cluster)
            else:
                try:
                    node = self.endpoint(stack, self.params["docker_host"])
                except SwarmError as error:
                    node = None
                    self.node_unreachable = str(error)
                result = self.absent(node, manager)
        result.update(cluster_id=self.cluster_id, actions=self.actions, changed=bool(self.actions))
        if self.warnings:
            result["warnings"] = self.warnings
        return result

    def members(self, manager):
        return {n["ID"]: n for n in manager.call("Listing the swarm's nodes", manager.client.nodes)}

    # state=present

    def present(self, node, manager, cluster):
        info = swarm_info(node)
        local_state = info.get("LocalNodeState")
        node_id = info.get("NodeID") or None
        if local_state == "locked":
            raise SwarmError(f"Node {self.name} is a locked swarm manager (autolock); unlock it with 'docker swarm unlock' and its unlock key, then re-run")
        members = self.members(manager)
        record = members.get(node_id) if node_id and local_state in ("active", "pending", "error") else None
        before = {"swarm": "none"} if record is None else {"swarm": self.cluster_id, **self.comparable(node_summary(record))}
        if record is None and node_id and local_state in ("active", "pending", "error"):
            before = {"swarm": "another", "node_id": node_id}
            remote = ", ".join(sorted(m.get("Addr", "?") for m in info.get("RemoteManagers") or [])) or "unknown"
            if not self.params["force"]:
                raise SwarmError(
                    f"Node {self.name} is part of another swarm (node id {node_id}, its managers: {remote}); the swarm of "
                    f"{manager.url} (cluster {self.cluster_id}) does not know it. Set force: true to make it leave that swarm "
                    "and join this one, or take it out of the other swarm first."
                )
            self.actions.append(f"left its previous swarm (managers {remote})")
            if not self.check_mode:
                node.call(f"Leaving the previous swarm of node {self.name}", node.client.leave_swarm, force=True)
        if record is None:
            self.actions.append(f"joined as {self.params['role']}")
            if self.check_mode:
                return self.planned_result(before)
            node_id = self.join(node, manager, cluster)
        record = self.wait_ready(manager, node_id)
        self.reconcile_spec(manager, record)
        self.remove_stale_entries(manager, node_id)
        self.restore_surges(manager, lambda nid, nodes: nid == node_id or nid not in nodes)
        if self.check_mode:
            return {**self.planned_result(before), "node_id": node_id}
        summary = node_summary(manager.call(f"Reading swarm node {node_id}", manager.client.inspect_node, node_id))
        result = {"node_id": node_id, "role": summary["role"], "availability": summary["availability"], "labels": summary["labels"]}
        result["diff"] = {"before": before, "after": {"swarm": self.cluster_id, **self.comparable(summary)}}
        return result

    def comparable(self, summary):
        wanted = desired_labels(self.params)
        return {"role": summary["role"], "availability": summary["availability"], "labels": {k: summary["labels"].get(k) for k in sorted(wanted)}}

    def planned_result(self, before):
        after = {"swarm": self.cluster_id, "role": self.params["role"], "availability": self.params["availability"], "labels": desired_labels(self.params)}
        return {"node_id": None, "diff": {"before": before, "after": after}}

    def join(self, node, manager, cluster):
        role = self.params["role"]
        token = self.params["join_token"] or cluster["JoinTokens"]["Manager" if role == "manager" else "Worker"]
        addresses = manager_addresses(manager)
        delay = self.params["retry_delay"]
        for attempt in range(self.params["retries"] + 1):
            try:
                node.client.join_swarm(
                    addresses,
                    token,
                    listen_addr=self.params["listen_addr"],
                    advertise_addr=self.params["advertise_addr"],
                    data_path_addr=self.params["data_path_addr"],
                )
                break
            except Exception as error:  # noqa: BLE001 - APIError, connection errors: classified below
                reason = describe_api_error(error)
                if any(word in reason.lower() for word in TOKEN_REJECTIONS):
                    source = "the join_token given" if self.params["join_token"] else f"the {role} token read from {manager.url}"
                    raise SwarmError(
                        f"The swarm at {', '.join(addresses)} refused node {self.name} as {role}: {reason}. It did not accept {source}; "
                        "a token belongs to one swarm and changes when rotated (omit join_token to read the current one from the manager)."
                    ) from error
                info = swarm_info(node)
                if info.get("LocalNodeState") in ("active", "pending") and info.get("NodeID"):
                    # The engine gave up waiting but keeps joining in the background; wait_ready decides.
                    break
                if attempt == self.params["retries"]:
                    raise SwarmError(
                        f"Node {self.name} could not join the swarm at {', '.join(addresses)} after {attempt + 1} attempts: {reason}. "
                        "Check that the node reaches the managers on TCP 2377."
                    ) from error
                time.sleep(delay)
                delay *= 2
        return wait_for(f"node {self.name} has a swarm node id", lambda: swarm_info(node).get("NodeID"), self.params["timeout"])

    def wait_ready(self, manager, node_id):
        manager_role = self.params["role"] == "manager"

        def ready():
            try:
                record = manager.client.inspect_node(node_id)
            except Exception:  # noqa: BLE001 - not known to the manager yet
                return None
            summary = node_summary(record)
            if summary["status"] != "ready":
                return None
            if summary["role"] == "manager" and manager_role and summary["manager_reachability"] != "reachable":
                return None
            return record

        try:
            return wait_for(f"node {self.name} ({node_id}) is Ready on {manager.url}", ready, self.params["timeout"])
        except SwarmError as error:
            raise SwarmError(
                f"{error}. Check that it reaches the managers on TCP 2377 and the other nodes on TCP/UDP 7946 and UDP 4789, and that its clock is right."
            ) from error

    def reconcile_spec(self, manager, record):
        summary = node_summary(record)
        node_id = summary["node_id"]
        wanted_labels = desired_labels(self.params)
        changed_labels = sorted(k for k, v in wanted_labels.items() if summary["labels"].get(k) != v)
        changes = {}
        if summary["role"] != self.params["role"]:
            if summary["role"] == "manager" and node_id == self.manager_node_id:
                raise SwarmError(
                    f"Node {self.name} is the manager this run works through ({manager.url}); to demote it, list another manager first in managers"
                )
            changes["Role"] = self.params["role"]
            self.actions.append(f"{'promoted' if self.params['role'] == 'manager' else 'demoted'} to {self.params['role']}")
        if summary["availability"] != self.params["availability"]:
            changes["Availability"] = self.params["availability"]
            self.actions.append(f"set availability {self.params['availability']}")
        if changed_labels:
            self.actions.append(f"set labels {', '.join(changed_labels)}")
        if (not changes and not changed_labels) or self.check_mode:
            return

        def change(spec):
            spec.update(changes)
            spec["Labels"] = {**(spec.get("Labels") or {}), **wanted_labels}

        update_node_spec(manager, node_id, change)
        if changes.get("Role") == "manager":
            self.wait_ready(manager, node_id)

    def remove_stale_entries(self, manager, node_id):
        """Remove down entries of the same VM that a node left behind when it left without being removed."""
        if self.params["vmid"] is None:
            return
        for other in self.members(manager).values():
            summary = node_summary(other)
            if summary["node_id"] != node_id and summary["status"] == "down" and summary["labels"].get(VMID_LABEL) == str(self.params["vmid"]):
                self.actions.append(f"removed the stale node entry {summary['node_id']} of VM {self.params['vmid']}")
                if not self.check_mode:
                    manager.call(f"Removing node {summary['node_id']}", manager.client.remove_node, summary["node_id"], force=True)

    def restore_surges(self, manager, should_restore):
        """Give back the extra replicas a drain surge added, for nodes ``should_restore(node_id, members)`` picks."""
        members = self.members(manager)
        for service in manager.call("Listing services", manager.client.services):
            for key, value in sorted(((service.get("Spec") or {}).get("Labels") or {}).items()):
                if not key.startswith(SURGE_LABEL_PREFIX):
                    continue
                surged_node = key[len(SURGE_LABEL_PREFIX) :]
                if not should_restore(surged_node, members):
                    continue
                name = service["Spec"]["Name"]
                self.actions.append(f"restored the replicas of {name} after the drain of node {surged_node}")
                if not self.check_mode:
                    update_service_replicas(manager, service["ID"], -int(value), lambda labels, key=key: labels.pop(key, None))

    # state=absent

    def find_record(self, node, manager):
        members = self.members(manager)
        info = swarm_info(node) if node is not None else {}
        node_id = info.get("NodeID")
        if node_id in members:
            return members[node_id], info
        if node is None or not node_id:
            if self.params["vmid"] is not None:
                matches = [n for n in members.values() if node_summary(n)["labels"].get(VMID_LABEL) == str(self.params["vmid"])]
                what = f"label {VMID_LABEL}={self.params['vmid']}"
            elif self.params["node_name"]:
                matches = [n for n in members.values() if node_summary(n)["hostname"] == self.params["node_name"]]
                what = f"host name {self.params['node_name']}"
            else:
                matches, what = [], None
            if len(matches) > 1:
                ids = ", ".join(n["ID"] for n in matches)
                raise SwarmError(f"{len(matches)} swarm nodes have {what} ({ids}); remove the right one by its address (docker_host) or by vmid")
            if matches:
                return matches[0], info
        return None, info

    def absent(self, node, manager):
        if node is None and self.params["vmid"] is None and not self.params["node_name"]:
            raise SwarmError(f"{self.node_unreachable}. To remove a node that does not answer, give its vmid or node_name")
        record, info = self.find_record(node, manager)
        result = {"node_id": None}
        if record is None:
            if node is not None and info.get("LocalNodeState") == "active" and not info.get("ControlAvailable"):
                ours = set(manager_addresses(manager))
                theirs = {m.get("Addr") for m in info.get("RemoteManagers") or []}
                if ours & theirs:
                    # Removed from this swarm while it was away; it still believes it is a member.
                    self.actions.append("left the swarm that had already removed it")
                    if not self.check_mode:
                        node.call(f"Leaving the swarm on node {self.name}", node.client.leave_swarm, force=True)
            self.restore_surges(manager, lambda nid, nodes: nid not in nodes)
            result["diff"] = {"before": {"swarm": "none" if not self.actions else self.cluster_id}, "after": {"swarm": "none"}}
            return result
        summary = node_summary(record)
        node_id = summary["node_id"]
        before = {"swarm": self.cluster_id, **self.comparable(summary)}
        if node_id == self.manager_node_id:
            raise SwarmError(f"Node {self.name} is the manager this run works through ({manager.url}); list another manager first in managers")
        if summary["role"] == "manager":
            self.actions.append("demoted to worker")
            if not self.check_mode:
                update_node_spec(manager, node_id, lambda spec: spec.update(Role="worker"))
                if node is not None:
                    wait_for(f"node {self.name} stops acting as a manager", lambda: not swarm_info(node).get("ControlAvailable"), self.params["timeout"])
        result["moved_tasks"] = self.drain(manager, node_id, summary)
        self.actions.append("left the swarm" if node is not None else "removed while unreachable")
        if not self.check_mode:
            self.leave_and_remove(node, manager, node_id)
            self.restore_surges(manager, lambda nid, nodes: nid not in nodes)
        result["diff"] = {"before": before, "after": {"swarm": "none"}}
        return result

    def drain(self, manager, node_id, summary):
        services = {s["ID"]: s for s in manager.call("Listing services", manager.client.services)}
        here = {}
        for task in node_tasks(manager, node_id):
            if task.get("DesiredState") == "running":
                here[task["ServiceID"]] = here.get(task["ServiceID"], 0) + 1
        moved = {services[sid]["Spec"]["Name"]: count for sid, count in here.items() if sid in services}
        # Surges recorded by an interrupted run count as done; they are given back below like new ones.
        surges = {}
        for sid, service in services.items():
            recorded = (service["Spec"].get("Labels") or {}).get(surge_label(node_id))
            if recorded is not None:
                surges[sid] = int(recorded)
        new_surges = {}
        if self.params["drain_surge"] and summary["availability"] != "drain" and summary["status"] != "down":
            new_surges = {sid: n for sid, n in here.items() if sid in services and sid not in surges and replicated_count(services[sid]) is not None}
        pause = summary["availability"] == "active" and bool(new_surges or surges)
        if pause:
            self.actions.append("paused")
        for sid, count in new_surges.items():
            self.actions.append(f"surged {services[sid]['Spec']['Name']} by {count} replicas")
        if summary["availability"] != "drain":
            self.actions.append("drained")
        if self.check_mode:
            return moved
        if pause:
            update_node_spec(manager, node_id, lambda spec: spec.update(Availability="pause"))
        for sid, count in new_surges.items():
            update_service_replicas(manager, sid, count, lambda labels, count=count: labels.update({surge_label(node_id): str(count)}))
        surges.update(new_surges)
        if surges and summary["availability"] != "drain":
            self.wait_surge(manager, node_id, services, surges)
        if summary["availability"] != "drain":
            update_node_spec(manager, node_id, lambda spec: spec.update(Availability="drain"))
        # A node that is down never reports its tasks stopped; Swarm has rescheduled them already.
        node_down = summary["status"] == "down"
        try:
            if not node_down:
                wait_for(f"node {self.name} ({node_id}) runs no task", lambda: not node_tasks(manager, node_id), self.params["drain_timeout"])
        except SwarmError as error:
            left = sorted({services.get(t["ServiceID"], {}).get("Spec", {}).get("Name", t["ServiceID"]) for t in node_tasks(manager, node_id)})
            raise SwarmError(
                f"{error}: tasks of {', '.join(left)} still run there. The node stays drained; re-run to continue, or raise drain_timeout"
            ) from error
        # The surge tasks stand in for the drained ones now. Lowering the replica count only after the drained
        # tasks stopped makes Swarm drop the slots that run nothing (the queued replacements), not running ones.
        for sid, count in surges.items():
            update_service_replicas(manager, sid, -count, lambda labels: labels.pop(surge_label(node_id), None))
        self.wait_rescheduled(manager, node_id, services, here)
        return moved

    def wait_surge(self, manager, node_id, services, surged):
        def placed():
            running = running_tasks_by_service(manager, exclude_node=node_id)
            current = {s["ID"]: s for s in manager.call("Listing services", manager.client.services)}
            return all(running.get(sid, 0) >= replicated_count(current[sid]) - count for sid, count in surged.items() if sid in current)

        try:
            wait_for(f"the surge tasks for node {node_id} run elsewhere", placed, self.params["drain_timeout"])
        except SwarmError as error:
            names = ", ".join(services[sid]["Spec"]["Name"] for sid in surged if sid in services)
            self.warnings.append(f"{error}: extra tasks of {names} could not be placed on other nodes, so the drain runs them short")

    def wait_rescheduled(self, manager, node_id, services, here):
        def rescheduled():
            running = running_tasks_by_service(manager)
            current = {s["ID"]: s for s in manager.call("Listing services", manager.client.services)}
            return all(running.get(sid, 0) >= replicated_count(current[sid]) for sid in here if sid in current and replicated_count(current[sid]) is not None)

        try:
            wait_for(f"the tasks drained from node {self.name} run on other nodes", rescheduled, self.params["drain_timeout"])
        except SwarmError as error:
            raise SwarmError(f"{error}. The node stays drained; check the other nodes' capacity and placement constraints, then re-run") from error

    def leave_and_remove(self, node, manager, node_id):
        # A re-run after an interrupted removal finds a node that already left.
        if node is not None and swarm_info(node).get("NodeID") == node_id:
            node.call(f"Leaving the swarm on node {self.name}", node.client.leave_swarm, force=False)
        # The node left (or is gone), so forcing is safe, and it spares waiting the heartbeat timeout
        # until the manager marks the node down.
        manager.call(f"Removing node {node_id} from the swarm", manager.client.remove_node, node_id, force=True)


def main():
    module = AnsibleModule(argument_spec=argument_spec(), supports_check_mode=True)
    if DOCKER_IMPORT_ERROR:
        module.fail_json(msg=missing_required_lib("docker"), exception=DOCKER_IMPORT_ERROR)
    fence_module(module)
    try:
        result = SwarmJoin(module).run()
    except SwarmError as e:
        module.fail_json(msg=str(e))
    module.exit_json(**result)


if __name__ == "__main__":
    main()
