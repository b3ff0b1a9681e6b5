#!/usr/bin/python
# Copyright (c) mlfleet.serving maintainers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: swarm_cluster
short_description: Create a Docker Swarm on its first manager, with autolock and overlay networks
version_added: 0.1.0
description:
  - Makes the node whose Docker Engine API is O(docker_host) a manager of a swarm, creating the swarm when the node
    is in none.
  - Sets autolock on or off, unlocks a locked manager with O(unlock_key), and keeps the overlay O(networks) the
    cluster's services attach to.
  - Further nodes join with M(mlfleet.serving.swarm_join).
author:
  - mlfleet.serving maintainers (@mlfleet)
extends_documentation_fragment:
  - mlfleet.serving.attributes
  - mlfleet.serving.docker_api
attributes:
  check_mode:
    support: full
  diff_mode:
    support: full
    details:
      - The diff shows whether the node is a manager, autolock, and the declared networks with their options.
  idempotent:
    support: full
options:
  advertise_addr:
    description:
      - Address the first manager advertises, as C(docker swarm init --advertise-addr). Needed when the node has more
        than one address.
    type: str
  listen_addr:
    description:
      - Address the manager listens on for swarm traffic.
    type: str
    default: 0.0.0.0:2377
  default_addr_pool:
    description:
      - Address pools (CIDR) overlay networks take their subnets from. Set when the swarm is created; a swarm that
        exists keeps its pools and the module warns when they differ.
    type: list
    elements: str
  subnet_size:
    description:
      - Prefix length of the subnets taken from O(default_addr_pool).
    type: int
  autolock:
    description:
      - Protect the managers' Raft keys with an unlock key, so a restarted manager stays locked until unlocked.
      - When on, the module returns RV(unlock_key); register the result with C(no_log=true).
    type: bool
    default: false
  unlock_key:
    description:
      - Unlock key for a manager that autolock left locked after a restart.
    type: str
  networks:
    description:
      - Overlay networks to keep. A network that exists with other options is re-created only when no service uses
        it; otherwise the module fails and names the services.
    type: list
    elements: dict
    default: []
    suboptions:
      name:
        description: Network name.
        type: str
        required: true
      encrypted:
        description:
          - Encrypt the network's data traffic between nodes (IPsec). Keep it on where the hosts' kernels support it;
            on hosts without IPsec an encrypted overlay carries no traffic between nodes.
        type: bool
        default: true
      attachable:
        description: Let standalone containers attach, besides services.
        type: bool
        default: true
      subnet:
        description: Subnet (CIDR) of the network; by default Docker takes one from the address pools.
        type: str
      labels:
        description: Network labels.
        type: dict
        default: {}
notes:
  - The Docker API of the node is reached as described for O(docker_host); the module usually runs on the manager
    itself with C(become=true) and the default local socket.
seealso:
  - module: mlfleet.serving.swarm_join
"""

EXAMPLES = r"""
- name: Create the swarm on the first manager, with an encrypted overlay for the serving stack
  mlfleet.serving.swarm_cluster:
    advertise_addr: "{{ ansible_host }}"
    networks:
      - name: mlfleet
        encrypted: true
  become: true

- name: Create the swarm with autolock; keep the unlock key out of the output
  mlfleet.serving.swarm_cluster:
    advertise_addr: "{{ ansible_host }}"
    autolock: true
  become: true
  register: swarm
  no_log: true
"""

RETURN = r"""
cluster_id:
  description: Id of the swarm (null in check mode before it exists).
  returned: always
  type: str
  sample: x1mnemefd1ozkxl3cv7mglnx9
node_id:
  description: Swarm node id of this manager.
  returned: always
  type: str
  sample: 9x3q1s0u1bd4kzjbq5h5o2zyu
manager_address:
  description: Address and port other nodes join this manager through.
  returned: always
  type: str
  sample: 192.0.2.10:2377
networks:
  description: The declared networks as they are after the run.
  returned: always
  type: dict
  sample: {mlfleet: {id: 5ql6sk3t0yuj, encrypted: true, attachable: true, subnet: 10.0.1.0/24}}
unlock_key:
  description: The swarm's unlock key. Keep it secret and safe; register the task with C(no_log=true).
  returned: when O(autolock=true)
  type: str
actions:
  description: What the module did, or would do in check mode.
  returned: always
  type: list
  elements: str
  sample: ["created the swarm", "created network mlfleet"]
"""

from ansible.module_utils.basic import AnsibleModule, missing_required_lib

from ansible_collections.mlfleet.serving.plugins.module_utils._swarm import (
    DOCKER_IMPORT_ERROR,
    DockerEndpoint,
    SwarmError,
    docker_api_argument_spec,
    swarm_info,
    wait_for,
)


def argument_spec():
    spec = docker_api_argument_spec()
    spec.update(
        advertise_addr=dict(type="str"),
        listen_addr=dict(type="str", default="0.0.0.0:2377"),
        default_addr_pool=dict(type="list", elements="str"),
        subnet_size=dict(type="int"),
        autolock=dict(type="bool", default=False),
        unlock_key=dict(type="str", no_log=True),
        networks=dict(
            type="list",
            elements="dict",
            default=[],
            options=dict(
                name=dict(type="str", required=True),
                encrypted=dict(type="bool", default=True),
                attachable=dict(type="bool", default=True),
                subnet=dict(type="str"),
                labels=dict(type="dict", default={}),
            ),
        ),
    )
    return spec


def network_state(network):
    """The options of an existing network that the module compares with a declared one."""
    configs = (network.get("IPAM") or {}).get("Config") or []
    return {
        "id": network["Id"][:12],
        "encrypted": "encrypted" in (network.get("Options") or {}),
        "attachable": bool(network.get("Attachable")),
        "subnet": configs[0].get("Subnet") if configs else None,
        "labels": dict(network.get("Labels") or {}),
    }


def network_differences(declared, current):
    differences = [key for key in ("encrypted", "attachable") if declared[key] != current[key]]
    if declared["subnet"] and declared["subnet"] != current["subnet"]:
        differences.append("subnet")
    if any(current["labels"].get(k) != str(v) for k, v in declared["labels"].items()):
        differences.append("labels")
    return differences


class SwarmCluster:
    def __init__(self, module, endpoint):
        self.module = module
        self.params = module.params
        self.check_mode = module.check_mode
        self.endpoint = endpoint
        self.client = endpoint.client
        self.actions = []
        self.warnings = []

    def run(self):
        info = swarm_info(self.endpoint)
        before = {"manager": bool(info.get("ControlAvailable"))}
        self.ensure_manager(info)
        if self.check_mode and not before["manager"]:
            after = {"manager": True, "autolock": self.params["autolock"], "networks": {n["name"]: self.declared(n) for n in self.params["networks"]}}
            return self.result(before, after, {"cluster_id": None, "node_id": None, "manager_address": None, "networks": {}})
        info = swarm_info(self.endpoint)
        cluster = self.endpoint.call("Reading the swarm", self.client.inspect_swarm)
        before["autolock"] = bool((cluster["Spec"].get("EncryptionConfig") or {}).get("AutoLockManagers"))
        self.ensure_autolock(cluster, before["autolock"])
        self.check_address_pools(cluster)
        networks_before, networks_after = self.ensure_networks()
        before["networks"] = networks_before
        after = {
            "manager": True,
            "autolock": self.params["autolock"],
            "networks": {k: {x: v[x] for x in ("encrypted", "attachable", "subnet")} for k, v in networks_after.items()},
        }
        result = {
            "cluster_id": cluster["ID"],
            "node_id": info.get("NodeID"),
            "manager_address": f"{info.get('NodeAddr')}:{self.params['listen_addr'].rsplit(':', 1)[-1]}",
            "networks": networks_after,
        }
        if self.params["autolock"] and not self.check_mode:
            result["unlock_key"] = self.endpoint.call("Reading the unlock key", self.client.get_unlock_key)["UnlockKey"]
        return self.result(before, after, result)

    def result(self, before, after, result):
        result.update(changed=bool(self.actions), actions=self.actions, diff={"before": before, "after": after})
        if self.warnings:
            result["warnings"] = self.warnings
        return result

    def ensure_manager(self, info):
        state = info.get("LocalNodeState")
        if state == "locked":
            if not self.params["unlock_key"]:
                raise SwarmError(f"The manager at {self.endpoint.url} is locked (autolock); give its unlock_key to unlock it")
            self.actions.append("unlocked the manager")
            if not self.check_mode:
                self.endpoint.call("Unlocking the manager", self.client.unlock_swarm, self.params["unlock_key"])
                wait_for(f"the manager at {self.endpoint.url} is unlocked", lambda: swarm_info(self.endpoint).get("LocalNodeState") == "active", 60)
            return
        if state == "active" and not info.get("ControlAvailable"):
            raise SwarmError(f"The node at {self.endpoint.url} is a worker of a swarm; run this module on one of its managers (or make it leave first)")
        if state in ("pending", "error"):
            reason = info.get("Error") or "no error given"
            raise SwarmError(
                f"The node at {self.endpoint.url} is stuck joining a swarm (state {state}: {reason}); make it leave with 'docker swarm leave --force'"
            )
        if state == "active":
            return
        self.actions.append("created the swarm")
        if self.check_mode:
            return
        spec = self.client.create_swarm_spec(autolock_managers=self.params["autolock"])
        self.endpoint.call(
            f"Creating a swarm on {self.endpoint.url}",
            self.client.init_swarm,
            advertise_addr=self.params["advertise_addr"],
            listen_addr=self.params["listen_addr"],
            default_addr_pool=self.params["default_addr_pool"],
            subnet_size=self.params["subnet_size"],
            swarm_spec=spec,
        )

    def ensure_autolock(self, cluster, current):
        if current == self.params["autolock"]:
            return
        self.actions.append(f"turned autolock {'on' if self.params['autolock'] else 'off'}")
        if self.check_mode:
            return
        spec = cluster["Spec"]
        spec["EncryptionConfig"] = {**(spec.get("EncryptionConfig") or {}), "AutoLockManagers": self.params["autolock"]}
        self.endpoint.call("Updating the swarm's autolock", self.client.update_swarm, version=cluster["Version"]["Index"], swarm_spec=spec)

    def check_address_pools(self, cluster):
        wanted = self.params["default_addr_pool"]
        if wanted and sorted(wanted) != sorted(cluster.get("DefaultAddrPool") or []):
            self.warnings.append(
                f"The swarm uses address pools {cluster.get('DefaultAddrPool')}, not {wanted}: pools are set when a swarm is created and cannot change"
            )

    def declared(self, network):
        return {"encrypted": network["encrypted"], "attachable": network["attachable"], "subnet": network["subnet"]}

    def ensure_networks(self):
        before, after = {}, {}
        for declared in self.params["networks"]:
            name = declared["name"]
            found = [n for n in self.endpoint.call(f"Looking up network {name}", self.client.networks, names=[name]) if n["Name"] == name]
            current = None
            if found:
                network = self.endpoint.call(f"Reading network {name}", self.client.inspect_network, found[0]["Id"])
                if network.get("Driver") != "overlay" or network.get("Scope") != "swarm":
                    raise SwarmError(
                        f"Network {name} exists as a {network.get('Scope')}-scoped {network.get('Driver')} network; remove it or declare another name"
                    )
                current = network_state(network)
                before[name] = {x: current[x] for x in ("encrypted", "attachable", "subnet")}
            else:
                before[name] = None
            differences = network_differences(declared, current) if current else None
            if current and not differences:
                after[name] = current
                continue
            if current:
                users = self.services_on(found[0]["Id"])
                if users:
                    raise SwarmError(
                        f"Network {name} differs in {', '.join(differences)} from its declaration, and overlay options cannot change in place; "
                        f"services {', '.join(users)} use it. Remove them (or declare the network as it is), then re-run"
                    )
                self.actions.append(f"re-created network {name} ({', '.join(differences)} changed)")
                if not self.check_mode:
                    self.endpoint.call(f"Removing network {name}", self.client.remove_network, found[0]["Id"])
            else:
                self.actions.append(f"created network {name}")
            if self.check_mode:
                after[name] = {"id": None, **self.declared(declared), "labels": declared["labels"]}
                continue
            ipam = None
            if declared["subnet"]:
                ipam = {"Driver": "default", "Config": [{"Subnet": declared["subnet"]}], "Options": {}}
            created = self.endpoint.call(
                f"Creating network {name}",
                self.client.create_network,
                name,
                driver="overlay",
                options={"encrypted": "true"} if declared["encrypted"] else None,
                ipam=ipam,
                attachable=declared["attachable"],
                labels={k: str(v) for k, v in declared["labels"].items()} or None,
                scope="swarm",
            )
            after[name] = network_state(self.endpoint.call(f"Reading network {name}", self.client.inspect_network, created["Id"]))
        return before, after

    def services_on(self, network_id):
        names = []
        for service in self.endpoint.call("Listing services", self.client.services):
            attached = ((service.get("Spec") or {}).get("TaskTemplate") or {}).get("Networks") or []
            if any(a.get("Target") in (network_id, network_id[:12]) for a in attached):
                names.append(service["Spec"]["Name"])
        return sorted(names)


def main():
    module = AnsibleModule(argument_spec=argument_spec(), supports_check_mode=True)
    if DOCKER_IMPORT_ERROR:
        module.fail_json(msg=missing_required_lib("docker"), exception=DOCKER_IMPORT_ERROR)
    try:
        with DockerEndpoint.from_params(module.params) as endpoint:
            result = SwarmCluster(module, endpoint).run()
    except SwarmError as e:
        module.fail_json(msg=str(e))
    module.exit_json(**result)


if __name__ == "__main__":
    main()
