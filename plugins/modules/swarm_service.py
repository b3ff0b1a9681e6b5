#!/usr/bin/python
# Copyright (c) mlfleet.serving maintainers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: swarm_service
short_description: Keep a Docker Swarm service as declared, with its configs and secrets
version_added: 0.1.0
description:
  - Creates, updates or removes a Swarm service through a manager's Docker API.
  - The declared service is compared with the stored one field by field; an update is sent only when they differ,
    so a re-run on a converged service changes nothing and restarts no task.
  - O(configs) and O(secrets) with inline content become Swarm config and secret objects named after the service
    and the target, so a changed file rolls out as a service update (Swarm objects are immutable). A config's name
    carries a hash of its content; a secret's name is random and its label holds a salted PBKDF2 digest, so nothing
    about a secret can be guessed cheaply from the API. Objects the service no longer uses are removed.
  - With O(wait=true), the module returns once the update has converged (every replica running the new spec), and
    fails with the rollback's reason if Swarm rolled the update back.
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
      - The diff shows the fields of the service spec that differ.
  idempotent:
    support: full
    details:
      - With O(keep_replicas=true), a replica count changed by an autoscaler is not a difference.
options:
  name:
    description: Service name.
    type: str
    required: true
  state:
    description: V(present) keeps the service as declared; V(absent) removes it and the config and secret objects it owned.
    type: str
    choices: [present, absent]
    default: present
  image:
    description: Image reference. Required with O(state=present). Images are never resolved against a registry by the module.
    type: str
  command:
    description: Entry point override, as a list.
    type: list
    elements: str
  args:
    description: Arguments to the entry point, as a list.
    type: list
    elements: str
  env:
    description: Environment variables.
    type: dict
    default: {}
  user:
    description: User the containers run as.
    type: str
  hostname:
    description: Container host name; Go templates such as C({{.Task.Name}}) are allowed.
    type: str
  labels:
    description: Service labels.
    type: dict
    default: {}
  container_labels:
    description: Labels of the service's containers.
    type: dict
    default: {}
  mode:
    description: V(replicated) runs O(replicas) tasks; V(global) one task on every eligible node.
    type: str
    choices: [replicated, global]
    default: replicated
  replicas:
    description: Number of tasks of a replicated service.
    type: int
    default: 1
  keep_replicas:
    description:
      - Keep the replica count of an existing service (set by an autoscaler, for example); O(replicas) then applies only
        when the service is created.
    type: bool
    default: false
  networks:
    description: Networks (names) the tasks attach to.
    type: list
    elements: str
    default: []
  endpoint_mode:
    description: V(vip) (a virtual IP through the routing mesh) or V(dnsrr) (DNS round robin over the tasks).
    type: str
    choices: [vip, dnsrr]
    default: vip
  ports:
    description: Published ports.
    type: list
    elements: dict
    default: []
    suboptions:
      published:
        description: Port on the node.
        type: int
        required: true
      target:
        description: Port in the container.
        type: int
        required: true
      protocol:
        description: Protocol.
        type: str
        choices: [tcp, udp]
        default: tcp
      mode:
        description: V(host) publishes on the node that runs the task; V(ingress) through the routing mesh.
        type: str
        choices: [host, ingress]
        default: ingress
  mounts:
    description: Mounts.
    type: list
    elements: dict
    default: []
    suboptions:
      type:
        description: Mount type.
        type: str
        choices: [bind, volume, tmpfs]
        default: bind
      source:
        description: Host path (bind) or volume name (volume).
        type: str
      target:
        description: Path in the container.
        type: str
        required: true
      read_only:
        description: Mount read-only.
        type: bool
        default: false
  configs:
    description:
      - Files from Swarm configs. Give O(configs[].content) to let the module keep a config object for it, or
        O(configs[].config_name) to use an existing one.
    type: list
    elements: dict
    default: []
    suboptions:
      target:
        description: Path of the file in the container.
        type: str
        required: true
      content:
        description: File content.
        type: str
      config_name:
        description: Name of an existing config object.
        type: str
      mode:
        description: File mode, as an octal string.
        type: str
        default: "0444"
      uid:
        description: File owner.
        type: str
        default: "0"
      gid:
        description: File group.
        type: str
        default: "0"
  secrets:
    description:
      - Files from Swarm secrets, in C(/run/secrets/). Give O(secrets[].content) to let the module keep a secret object for
        it, or O(secrets[].secret_name) to use an existing one. Contents are never returned or logged.
    type: list
    elements: dict
    default: []
    suboptions:
      target:
        description: File name in C(/run/secrets/) (or an absolute path).
        type: str
        required: true
      content:
        description: Secret content.
        type: str
      secret_name:
        description: Name of an existing secret object.
        type: str
      mode:
        description: File mode, as an octal string.
        type: str
        default: "0400"
      uid:
        description: File owner.
        type: str
        default: "0"
      gid:
        description: File group.
        type: str
        default: "0"
  limit_cpus:
    description: CPU limit per task, in cores.
    type: float
  limit_memory:
    description: Memory limit per task, for example V(2G) or V(512M).
    type: str
  reserve_cpus:
    description: CPU reserved per task; the scheduler places a task only where this much is free.
    type: float
  reserve_memory:
    description: Memory reserved per task.
    type: str
  reserve_generic_resources:
    description:
      - Generic resources each task reserves, as whole units by kind; C(NVIDIA-GPU) set to 1 reserves one GPU.
        Swarm places a task only on a node that advertises a free unit of each kind (the Docker daemon's
        C(node-generic-resources)) and passes the units it chose to the task as C(DOCKER_RESOURCE_<KIND>), which the
        NVIDIA container runtime reads (its C(swarm-resource) setting) to show the task only its own GPU.
      - Before it changes anything the module checks that some node advertises each kind, and that the managers and the
        nodes that advertise one run Docker Engine 23.0.2 or later, which is needed for a service that also joins
        networks (moby#44378).
    type: dict
  constraints:
    description: Placement constraints, for example V(node.role==worker).
    type: list
    elements: str
    default: []
  spread:
    description: Node labels or attributes to spread tasks over, for example V(node.id).
    type: list
    elements: str
    default: []
  max_replicas_per_node:
    description: At most this many tasks of the service on one node; V(0) means no limit.
    type: int
    default: 0
  healthcheck:
    description: Health check of the containers.
    type: dict
    suboptions:
      test:
        description: Command, as Docker takes it (V([CMD, ...]) or V([CMD-SHELL, ...])).
        type: list
        elements: str
        required: true
      interval:
        description: Time between checks, for example V(10s).
        type: str
        default: 30s
      timeout:
        description: Time a check may take.
        type: str
        default: 30s
      retries:
        description: Failures in a row that make a container unhealthy.
        type: int
        default: 3
      start_period:
        description: Start-up time during which failures do not count.
        type: str
        default: 0s
  update_config:
    description: How updates roll out.
    type: dict
    suboptions: &rollout
      parallelism:
        description: Tasks updated at once.
        type: int
        default: 1
      delay:
        description: Time between batches.
        type: str
        default: 0s
      order:
        description: V(start-first) starts the new task before stopping the old one.
        type: str
        choices: [start-first, stop-first]
        default: stop-first
      failure_action:
        description: What a failed update does.
        type: str
        choices: [pause, continue, rollback]
        default: pause
      monitor:
        description: Time after each task update during which a failure counts.
        type: str
        default: 5s
      max_failure_ratio:
        description: Share of tasks that may fail during an update.
        type: float
        default: 0
  rollback_config:
    description: How rollbacks roll out; same options as O(update_config) (its V(rollback) failure action excepted).
    type: dict
    suboptions: *rollout
  stop_grace_period:
    description: Time a task gets to stop after its stop signal before it is killed.
    type: str
    default: 10s
  stop_signal:
    description:
      - Signal that asks a task to stop, for example V(SIGUSR1) for HAProxy's soft stop, which finishes the
        requests in flight. Unset, the image's own stop signal (or C(SIGTERM)) applies.
    type: str
  restart_condition:
    description: When Swarm restarts a task.
    type: str
    choices: [none, on-failure, any]
    default: any
  init:
    description: Run an init process in each container.
    type: bool
  wait:
    description: Wait until the service converged after a change, and fail if Swarm rolled the update back.
    type: bool
    default: true
  wait_timeout:
    description: Seconds to wait for convergence.
    type: int
    default: 300
notes:
  - Run it against a manager (O(docker_host)); from the control host with C(delegate_to=localhost) and an C(ssh://)
    endpoint, as the collection's roles do.
seealso:
  - module: mlfleet.serving.swarm_cluster
"""

EXAMPLES = r"""
- name: Run two echo replicas on the workers, one per node, behind DNS round robin
  mlfleet.serving.swarm_service:
    docker_host: "{{ hostvars[groups['swarm_managers'][0]] | mlfleet.serving.docker_ssh_endpoint }}"
    name: echo
    image: registry.example.com/echo:1.2
    replicas: 2
    networks: [mlfleet]
    endpoint_mode: dnsrr
    constraints: [node.role==worker]
    max_replicas_per_node: 1
    limit_cpus: 0.5
    reserve_cpus: 0.5
    limit_memory: 256M
    configs:
      - target: /etc/echo.conf
        content: "greeting = hello\n"
    update_config:
      order: start-first
      failure_action: rollback
  delegate_to: localhost

- name: Serve a model on GPUs, one GPU per replica, on the nodes of the GPU pool
  mlfleet.serving.swarm_service:
    docker_host: "{{ hostvars[groups['swarm_managers'][0]] | mlfleet.serving.docker_ssh_endpoint }}"
    name: llm
    image: registry.example.com/torchserve-gpu:0.12.0
    replicas: 4
    networks: [mlfleet]
    constraints: [node.labels.mlfleet.pool==gpu_worker]
    reserve_generic_resources:
      NVIDIA-GPU: 1
  delegate_to: localhost
"""

RETURN = r"""
service_id:
  description: Id of the service; null when absent.
  returned: always
  type: str
  sample: 2mo3l4cq0vz5eh0e8z8zn3m4v
replicas:
  description: Replica count of the service after the run (null for global services).
  returned: when O(state=present)
  type: int
  sample: 2
running_tasks:
  description: Tasks running the current spec after the run (only counted with O(wait=true)).
  returned: when O(state=present)
  type: int
  sample: 2
actions:
  description: What the module did, or would do in check mode.
  returned: always
  type: list
  elements: str
  sample: ["updated service echo (TaskTemplate.ContainerSpec.Env)"]
"""

import hashlib
import hmac
import re
import secrets
import time

from ansible.module_utils.basic import AnsibleModule, missing_required_lib

from ansible_collections.mlfleet.serving.plugins.module_utils._swarm import (
    DOCKER_IMPORT_ERROR,
    DockerEndpoint,
    SwarmError,
    docker_api_argument_spec,
    generic_resource_problems,
)

OWNER_LABEL = "mlfleet.service"
TARGET_LABEL = "mlfleet.target"
DIGEST_LABEL = "mlfleet.content-digest"
SECRET_DIGEST_ROUNDS = 200_000
DURATION_UNITS = {"ns": 1, "us": 1_000, "ms": 1_000_000, "s": 1_000_000_000, "m": 60_000_000_000, "h": 3_600_000_000_000}
SIZE_UNITS = {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}


def rollout_options():
    return dict(
        parallelism=dict(type="int", default=1),
        delay=dict(type="str", default="0s"),
        order=dict(type="str", choices=["start-first", "stop-first"], default="stop-first"),
        failure_action=dict(type="str", choices=["pause", "continue", "rollback"], default="pause"),
        monitor=dict(type="str", default="5s"),
        max_failure_ratio=dict(type="float", default=0),
    )


def argument_spec():
    spec = docker_api_argument_spec()
    file_reference = dict(
        target=dict(type="str", required=True), content=dict(type="str"), uid=dict(type="str", default="0"), gid=dict(type="str", default="0")
    )
    spec.update(
        name=dict(type="str", required=True),
        state=dict(type="str", choices=["present", "absent"], default="present"),
        image=dict(type="str"),
        command=dict(type="list", elements="str"),
        args=dict(type="list", elements="str"),
        env=dict(type="dict", default={}),
        user=dict(type="str"),
        hostname=dict(type="str"),
        labels=dict(type="dict", default={}),
        container_labels=dict(type="dict", default={}),
        mode=dict(type="str", choices=["replicated", "global"], default="replicated"),
        replicas=dict(type="int", default=1),
        keep_replicas=dict(type="bool", default=False),
        networks=dict(type="list", elements="str", default=[]),
        endpoint_mode=dict(type="str", choices=["vip", "dnsrr"], default="vip"),
        ports=dict(
            type="list",
            elements="dict",
            default=[],
            options=dict(
                published=dict(type="int", required=True),
                target=dict(type="int", required=True),
                protocol=dict(type="str", choices=["tcp", "udp"], default="tcp"),
                mode=dict(type="str", choices=["host", "ingress"], default="ingress"),
            ),
        ),
        mounts=dict(
            type="list",
            elements="dict",
            default=[],
            options=dict(
                type=dict(type="str", choices=["bind", "volume", "tmpfs"], default="bind"),
                source=dict(type="str"),
                target=dict(type="str", required=True),
                read_only=dict(type="bool", default=False),
            ),
        ),
        configs=dict(
            type="list",
            elements="dict",
            default=[],
            options=dict(**file_reference, config_name=dict(type="str"), mode=dict(type="str", default="0444")),
            mutually_exclusive=[("content", "config_name")],
            required_one_of=[("content", "config_name")],
        ),
        secrets=dict(
            type="list",
            elements="dict",
            default=[],
            no_log=False,
            options=dict(
                target=dict(type="str", required=True),
                content=dict(type="str", no_log=True),
                secret_name=dict(type="str"),
                mode=dict(type="str", default="0400"),
                uid=dict(type="str", default="0"),
                gid=dict(type="str", default="0"),
            ),
            mutually_exclusive=[("content", "secret_name")],
            required_one_of=[("content", "secret_name")],
        ),
        limit_cpus=dict(type="float"),
        limit_memory=dict(type="str"),
        reserve_cpus=dict(type="float"),
        reserve_memory=dict(type="str"),
        reserve_generic_resources=dict(type="dict"),
        constraints=dict(type="list", elements="str", default=[]),
        spread=dict(type="list", elements="str", default=[]),
        max_replicas_per_node=dict(type="int", default=0),
        healthcheck=dict(
            type="dict",
            options=dict(
                test=dict(type="list", elements="str", required=True),
                interval=dict(type="str", default="30s"),
                timeout=dict(type="str", default="30s"),
                retries=dict(type="int", default=3),
                start_period=dict(type="str", default="0s"),
            ),
        ),
        update_config=dict(type="dict", options=rollout_options()),
        rollback_config=dict(type="dict", options=rollout_options()),
        stop_grace_period=dict(type="str", default="10s"),
        stop_signal=dict(type="str"),
        restart_condition=dict(type="str", choices=["none", "on-failure", "any"], default="any"),
        init=dict(type="bool"),
        wait=dict(type="bool", default=True),
        wait_timeout=dict(type="int", default=300),
    )
    return spec


def duration_ns(value, option):
    """Docker duration strings (V(1m30s), V(500ms)) in nanoseconds."""
    parts = re.findall(r"(\d+(?:\.\d+)?)(ns|us|ms|s|m|h)", str(value))
    if not parts or "".join(n + u for n, u in parts) != str(value):
        raise SwarmError(f"{option}={value!r} is not a duration; write it like 30s, 500ms or 1m30s")
    return int(sum(float(number) * DURATION_UNITS[unit] for number, unit in parts))


def size_bytes(value, option):
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)[iI]?[bB]?", str(value).strip())
    if not match:
        raise SwarmError(f"{option}={value!r} is not a size; write it like 512M or 2G")
    return int(float(match.group(1)) * SIZE_UNITS[match.group(2).lower()])


SWARM_OBJECT_NAME_MAX = 64


def object_name(service, target, suffix):
    """Name of a config or secret object: the service, the file and a suffix that changes with the content
    (objects are immutable, so new content is a new object)."""
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", target.strip("/"))[-40:]
    # Swarm takes names of at most 64 characters: a long service name leaves less of the file's path.
    room = SWARM_OBJECT_NAME_MAX - len(service) - len(suffix) - 2
    if room < 8:
        raise SwarmError(
            f"the service name {service!r} is too long to name its configs and secrets (Swarm allows {SWARM_OBJECT_NAME_MAX} characters "
            f"for them): use a service name of at most {SWARM_OBJECT_NAME_MAX - len(suffix) - 10} characters"
        )
    return f"{service}_{stem[-room:]}_{suffix}"


def secret_digest(content, salt=None):
    """A salted, deliberately slow digest of a secret, kept in a label to recognise unchanged content."""
    salt = salt or secrets.token_hex(16)
    digest = hashlib.pbkdf2_hmac("sha256", content.encode(), bytes.fromhex(salt), SECRET_DIGEST_ROUNDS).hex()
    return f"pbkdf2-sha256:{SECRET_DIGEST_ROUNDS}:{salt}:{digest}"


def secret_matches(content, stored):
    try:
        scheme, rounds, salt, digest = stored.split(":")
    except ValueError:
        return False
    if scheme != "pbkdf2-sha256" or rounds != str(SECRET_DIGEST_ROUNDS):
        return False
    return hmac.compare_digest(secret_digest(content, salt).rsplit(":", 1)[1], digest)


def prune(value):
    """The spec without empty values: the daemon stores zero, false and empty fields as absent, so a field
    left out and a field sent empty must compare equal."""
    if isinstance(value, dict):
        pruned = {k: prune(v) for k, v in value.items()}
        return {k: v for k, v in pruned.items() if v is not None and v is not False and v not in (0, {}, [], "")}
    if isinstance(value, list):
        return [prune(v) for v in value]
    return value


def differences(desired, current, path=""):
    """Dotted paths of the fields where two pruned specs differ."""
    if isinstance(desired, dict) and isinstance(current, dict):
        found = []
        for key in sorted(set(desired) | set(current)):
            found += differences(desired.get(key), current.get(key), f"{path}.{key}" if path else key)
        return found
    return [] if desired == current else [path]


class SwarmService:
    def __init__(self, module, endpoint):
        self.module = module
        self.params = module.params
        self.check_mode = module.check_mode
        self.endpoint = endpoint
        self.client = endpoint.client
        self.actions = []

    def find(self):
        services = self.endpoint.call(f"Looking up service {self.params['name']}", self.client.services, filters={"name": self.params["name"]})
        matches = [s for s in services if s["Spec"]["Name"] == self.params["name"]]
        return matches[0] if matches else None

    def run(self):
        current = self.find()
        if self.params["state"] == "absent":
            return self.absent(current)
        if not self.params["image"]:
            raise SwarmError(f"Service {self.params['name']}: image is required with state=present")
        parsed = self.parse_options()
        objects = self.ensure_objects()
        desired = self.desired_spec(objects, current, parsed)
        result = {"service_id": current["ID"] if current else None}
        if current is None:
            self.actions.append(f"created service {self.params['name']}")
            result["diff"] = {"before": {}, "after": {"spec": prune(desired)}}
            if not self.check_mode:
                created = self.endpoint.call(f"Creating service {self.params['name']}", self.client.create_service, **self.api_arguments(desired))
                result["service_id"] = created["ID"]
        else:
            changed = differences(prune(desired), prune(self.comparable(current["Spec"])))
            if changed:
                self.actions.append(f"updated service {self.params['name']} ({', '.join(changed)})")
                before = prune(self.comparable(current["Spec"]))
                result["diff"] = {
                    "before": {k: before.get(k) for k in {c.split(".")[0] for c in changed}},
                    "after": {k: prune(desired).get(k) for k in {c.split(".")[0] for c in changed}},
                }
                if not self.check_mode:
                    self.endpoint.call(
                        f"Updating service {self.params['name']}",
                        self.client.update_service,
                        current["ID"],
                        current["Version"]["Index"],
                        **self.api_arguments(desired),
                    )
        replicas = (desired.get("Mode", {}).get("Replicated") or {}).get("Replicas")
        result["replicas"] = replicas
        result["running_tasks"] = (
            self.wait_converged(result["service_id"], replicas) if self.params["wait"] and not self.check_mode and result["service_id"] else None
        )
        # After the rollout: until then the old tasks still use the objects the new spec replaced.
        if not self.check_mode:
            self.prune_objects(objects)
        return result

    def parse_options(self):
        """The options that need API values of their own (ids, nanoseconds, bytes). Parsed before any config or
        secret is created, so bad input fails first."""
        p = self.params
        check = p["healthcheck"]
        if p["stop_signal"] and not re.fullmatch(r"SIG[A-Z0-9+-]+|[0-9]+", p["stop_signal"]):
            raise SwarmError(f"stop_signal={p['stop_signal']!r} is not a signal; write it like SIGTERM or SIGUSR1")
        return {
            "networks": self.network_ids(),
            "stop_grace_period": duration_ns(p["stop_grace_period"], "stop_grace_period"),
            "healthcheck": check
            and {
                "Test": check["test"],
                "Interval": duration_ns(check["interval"], "healthcheck.interval"),
                "Timeout": duration_ns(check["timeout"], "healthcheck.timeout"),
                "Retries": check["retries"],
                "StartPeriod": duration_ns(check["start_period"], "healthcheck.start_period"),
            },
            "limit_memory": size_bytes(p["limit_memory"], "limit_memory") if p["limit_memory"] else None,
            "reserve_memory": size_bytes(p["reserve_memory"], "reserve_memory") if p["reserve_memory"] else None,
            "generic_resources": self.generic_resources(),
            "update_config": self.rollout(p["update_config"], "update_config"),
            "rollback_config": self.rollout(p["rollback_config"], "rollback_config"),
        }

    def generic_resources(self):
        """[(kind, units)] of reserve_generic_resources, checked against the swarm before anything is written."""
        wanted = self.params["reserve_generic_resources"] or {}
        reserved = []
        for kind, units in sorted(wanted.items()):
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", str(kind)):
                raise SwarmError(f"reserve_generic_resources: {kind!r} is not a resource kind; name it like NVIDIA-GPU")
            if isinstance(units, bool) or not re.fullmatch(r"[1-9][0-9]*", str(units)):
                raise SwarmError(f"reserve_generic_resources.{kind} must be a whole number of units, 1 or more, not {units!r}")
            reserved.append((str(kind), int(units)))
        if reserved:
            nodes = self.endpoint.call("Listing nodes", self.client.nodes)
            problem = generic_resource_problems(self.params["name"], [kind for kind, _units in reserved], nodes)
            if problem:
                raise SwarmError(problem)
        return reserved

    def absent(self, current):
        if current is not None:
            self.actions.append(f"removed service {self.params['name']}")
            if not self.check_mode:
                self.endpoint.call(f"Removing service {self.params['name']}", self.client.remove_service, current["ID"])
                if self.params["wait"]:
                    self.wait_tasks_gone(current["ID"])
        if not self.check_mode:
            self.prune_objects({})
        return {"service_id": None, "diff": {"before": {"exists": current is not None}, "after": {"exists": False}}}

    def owned(self, kind):
        listing = self.client.configs if kind == "config" else self.client.secrets
        return self.endpoint.call(f"Listing {kind}s", listing, filters={"label": f"{OWNER_LABEL}={self.params['name']}"})

    def ensure_objects(self):
        """Config and secret objects for inline contents: name -> id, created when missing."""
        objects = {}
        for kind, items in (("config", self.params["configs"]), ("secret", self.params["secrets"])):
            owned = self.owned(kind)
            for item in items:
                if item.get("content") is None:
                    continue
                reused = self.matching_object(kind, owned, item)
                if reused is not None:
                    item["_object_name"] = reused["Spec"]["Name"]
                    objects[reused["Spec"]["Name"]] = reused["ID"]
                    continue
                labels = {OWNER_LABEL: self.params["name"], TARGET_LABEL: item["target"]}
                if kind == "config":
                    name = object_name(self.params["name"], item["target"], hashlib.sha256(item["content"].encode()).hexdigest()[:12])
                else:
                    # A secret's name and labels must not let anyone test guesses of its content cheaply.
                    name = object_name(self.params["name"], item["target"], secrets.token_hex(6))
                    labels[DIGEST_LABEL] = secret_digest(item["content"])
                item["_object_name"] = name
                self.actions.append(f"created {kind} {name}")
                if self.check_mode:
                    objects[name] = f"(new {kind})"
                    continue
                create = self.client.create_config if kind == "config" else self.client.create_secret
                created = self.endpoint.call(f"Creating {kind} {name}", create, name, item["content"].encode(), labels=labels)
                objects[name] = created["ID"]
        return objects

    def matching_object(self, kind, owned, item):
        """The owned object for this target whose content equals the declared one, if any."""
        config_name = object_name(self.params["name"], item["target"], hashlib.sha256(item["content"].encode()).hexdigest()[:12])
        for obj in owned:
            labels = obj["Spec"].get("Labels") or {}
            if kind == "config" and obj["Spec"]["Name"] == config_name:
                return obj
            if kind == "secret" and labels.get(TARGET_LABEL) == item["target"] and secret_matches(item["content"], labels.get(DIGEST_LABEL, "")):
                return obj
        return None

    def prune_objects(self, in_use):
        for kind in ("config", "secret"):
            for obj in self.owned(kind):
                if obj["Spec"]["Name"] in in_use:
                    continue
                remove = self.client.remove_config if kind == "config" else self.client.remove_secret
                try:
                    remove(obj["ID"])
                    self.actions.append(f"removed unused {kind} {obj['Spec']['Name']}")
                except Exception:  # noqa: BLE001 - still used by tasks that are shutting down; the next run removes it
                    pass

    def existing_object_id(self, kind, name):
        listing = self.client.configs if kind == "config" else self.client.secrets
        found = [o for o in self.endpoint.call(f"Looking up {kind} {name}", listing, filters={"name": name}) if o["Spec"]["Name"] == name]
        if not found:
            raise SwarmError(f"Service {self.params['name']}: {kind} {name} does not exist; create it first or give its content")
        return found[0]["ID"]

    def file_references(self, kind, objects):
        references = []
        for item in self.params[f"{kind}s"]:
            name = item.get("_object_name") or item[f"{kind}_name"]
            object_id = objects.get(name) or self.existing_object_id(kind, name)
            references.append(
                {
                    "File": {"Name": item["target"], "UID": item["uid"], "GID": item["gid"], "Mode": int(item["mode"], 8)},
                    f"{kind.capitalize()}ID": object_id,
                    f"{kind.capitalize()}Name": name,
                }
            )
        return references

    def network_ids(self):
        ids = []
        for name in self.params["networks"]:
            found = [n for n in self.endpoint.call(f"Looking up network {name}", self.client.networks, names=[name]) if n["Name"] == name]
            if not found:
                raise SwarmError(f"Service {self.params['name']}: network {name} does not exist; create it (mlfleet.serving.swarm_cluster networks) first")
            ids.append(found[0]["Id"])
        return ids

    def desired_spec(self, objects, current, parsed):
        p = self.params
        container = {
            "Image": p["image"],
            "Command": p["command"],
            "Args": p["args"],
            "Env": [f"{k}={v}" for k, v in sorted(p["env"].items())],
            "User": p["user"],
            "Hostname": p["hostname"],
            "Labels": {k: str(v) for k, v in p["container_labels"].items()},
            "Mounts": [{"Type": m["type"], "Source": m["source"], "Target": m["target"], "ReadOnly": m["read_only"]} for m in p["mounts"]],
            "Configs": self.file_references("config", objects),
            "Secrets": self.file_references("secret", objects),
            "StopGracePeriod": parsed["stop_grace_period"],
            "StopSignal": p["stop_signal"],
            "Init": p["init"],
        }
        if parsed["healthcheck"]:
            container["Healthcheck"] = parsed["healthcheck"]
        resources = {
            "Limits": {
                "NanoCPUs": int(p["limit_cpus"] * 1e9) if p["limit_cpus"] else None,
                "MemoryBytes": parsed["limit_memory"],
            },
            "Reservations": {
                "NanoCPUs": int(p["reserve_cpus"] * 1e9) if p["reserve_cpus"] else None,
                "MemoryBytes": parsed["reserve_memory"],
                "GenericResources": [{"DiscreteResourceSpec": {"Kind": kind, "Value": units}} for kind, units in parsed["generic_resources"]],
            },
        }
        placement = {
            "Constraints": p["constraints"],
            "Preferences": [{"Spread": {"SpreadDescriptor": s}} for s in p["spread"]],
            "MaxReplicas": p["max_replicas_per_node"],
        }
        task_template = {
            "ContainerSpec": container,
            "Resources": resources,
            "RestartPolicy": {"Condition": p["restart_condition"]},
            "Placement": placement,
            "Networks": [{"Target": network_id} for network_id in parsed["networks"]],
        }
        if current is not None:
            # Keep the stored counter: a different value forces every task to restart.
            task_template["ForceUpdate"] = current["Spec"]["TaskTemplate"].get("ForceUpdate", 0)
        if p["mode"] == "global":
            mode = {"Global": {}}
        else:
            replicas = p["replicas"]
            if current is not None and p["keep_replicas"]:
                replicas = ((current["Spec"].get("Mode") or {}).get("Replicated") or {}).get("Replicas", replicas)
            mode = {"Replicated": {"Replicas": replicas}}
        return {
            "Name": p["name"],
            "Labels": {k: str(v) for k, v in p["labels"].items()},
            "TaskTemplate": task_template,
            "Mode": mode,
            "UpdateConfig": parsed["update_config"],
            "RollbackConfig": parsed["rollback_config"],
            "EndpointSpec": {
                "Mode": p["endpoint_mode"],
                "Ports": [
                    {"Protocol": port["protocol"], "TargetPort": port["target"], "PublishedPort": port["published"], "PublishMode": port["mode"]}
                    for port in p["ports"]
                ],
            },
        }

    def rollout(self, config, option):
        if not config:
            return None
        if option == "rollback_config" and config["failure_action"] == "rollback":
            raise SwarmError(f"Service {self.params['name']}: rollback_config.failure_action cannot be rollback; use pause or continue")
        return {
            "Parallelism": config["parallelism"],
            "Delay": duration_ns(config["delay"], f"{option}.delay"),
            "FailureAction": config["failure_action"],
            "Monitor": duration_ns(config["monitor"], f"{option}.monitor"),
            "MaxFailureRatio": config["max_failure_ratio"],
            "Order": config["order"],
        }

    def comparable(self, stored):
        """The stored spec in the shape desired_spec builds (the daemon adds fields it fills in itself)."""
        spec = {k: stored.get(k) for k in ("Name", "Labels", "TaskTemplate", "Mode", "UpdateConfig", "RollbackConfig", "EndpointSpec")}
        template = dict(spec["TaskTemplate"] or {})
        template.pop("Runtime", None)
        template.pop("LogDriver", None)
        container = dict(template.get("ContainerSpec") or {})
        container.pop("Isolation", None)
        container.pop("DNSConfig", None)
        template["ContainerSpec"] = container
        spec["TaskTemplate"] = template
        return spec

    def api_arguments(self, spec):
        return {
            "task_template": spec["TaskTemplate"],
            "name": spec["Name"],
            "labels": spec["Labels"],
            "mode": spec["Mode"],
            "update_config": spec["UpdateConfig"],
            "rollback_config": spec["RollbackConfig"],
            "endpoint_spec": spec["EndpointSpec"],
        }

    def wait_tasks_gone(self, service_id):
        """Wait until a removed service's containers stopped, so the objects they used can be removed."""
        deadline = time.monotonic() + self.params["wait_timeout"]
        # Filtering tasks by a removed service is an error, so they are filtered here.
        while [t for t in self.endpoint.call("Listing tasks", self.client.tasks) if t.get("ServiceID") == service_id]:
            if time.monotonic() > deadline:
                raise SwarmError(f"Service {self.params['name']} was removed but its tasks still run after {self.params['wait_timeout']} s")
            time.sleep(0.5)

    def wait_converged(self, service_id, replicas):
        deadline = time.monotonic() + self.params["wait_timeout"]
        # A task that fails at start runs for a moment: converged counts only when two polls a second apart
        # see the same tasks running.
        previously_running = None
        while True:
            service = self.endpoint.call(f"Reading service {self.params['name']}", self.client.inspect_service, service_id)
            update = service.get("UpdateStatus") or {}
            if update.get("State") in ("rollback_completed", "rollback_paused", "paused"):
                raise SwarmError(f"Service {self.params['name']}: the update did not converge ({update.get('State')}): {update.get('Message')}")
            tasks = self.endpoint.call("Listing tasks", self.client.tasks, filters={"service": service_id, "desired-state": "running"})
            version = service["Version"]["Index"]
            # The update status may still describe the previous update right after this one was sent, so a task
            # counts only when it runs the service's current container spec.
            wanted = prune(service["Spec"]["TaskTemplate"].get("ContainerSpec"))
            running = [t for t in tasks if t["Status"]["State"] == "running" and prune((t.get("Spec") or {}).get("ContainerSpec")) == wanted]
            settled = update.get("State") in (None, "completed")
            # A global service has no count to reach, but right after its creation it has no task yet either.
            enough = len(running) >= replicas if replicas is not None else bool(running)
            running_ids = sorted(t["ID"] for t in running)
            if settled and enough and len(running) == len(tasks):
                if running_ids == previously_running:
                    return len(running)
                previously_running = running_ids
            else:
                previously_running = None
            if time.monotonic() > deadline:
                states = sorted({f"{t['Status']['State']}: {t['Status'].get('Err') or t['Status'].get('Message', '')}" for t in tasks})
                rollout = f"update {update.get('State')}: {update.get('Message')}" if update else "no update in progress"
                raise SwarmError(
                    f"Service {self.params['name']} (version {version}) did not converge within {self.params['wait_timeout']} s: "
                    f"{len(running)} of {replicas if replicas is not None else len(tasks)} tasks running; {rollout}; "
                    f"task states: {'; '.join(states) or 'none'}. With order start-first, every node that may run a task "
                    "needs room for one more (max_replicas_per_node, reservations)"
                )
            time.sleep(1)


def main():
    module = AnsibleModule(argument_spec=argument_spec(), supports_check_mode=True, required_if=[("state", "present", ("image",))])
    if DOCKER_IMPORT_ERROR:
        module.fail_json(msg=missing_required_lib("docker"), exception=DOCKER_IMPORT_ERROR)
    try:
        with DockerEndpoint.from_params(module.params) as endpoint:
            service = SwarmService(module, endpoint)
            result = service.run()
    except SwarmError as e:
        module.fail_json(msg=str(e))
    module.exit_json(changed=bool(service.actions), actions=service.actions, **result)


if __name__ == "__main__":
    main()
