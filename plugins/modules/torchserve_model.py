#!/usr/bin/python
# Copyright (c) mlfleet.serving maintainers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: torchserve_model
short_description: Register, scale, set the default version of and unregister models in TorchServe
version_added: 0.1.0
description:
  - Manages one model (O(name)) through TorchServe's management API, either at one endpoint (O(management_url)) or in
    every replica of a Docker Swarm service that runs on one node (O(service)).
  - With O(state=present) the model version is registered from O(url) when it is missing, its workers are scaled
    when O(min_workers) or O(max_workers) differ, and with O(default_version=true) it becomes the model's default version.
  - Only the options that are set are compared with what TorchServe describes; the rest of a registered version is left alone.
  - O(batch_size), O(max_batch_delay) and O(response_timeout) cannot change on a registered version. A difference fails
    with a message that names the option, unless O(recreate=true), which unregisters the version and registers it again.
  - With O(state=absent) the version O(version) is unregistered, or every version of the model when O(version) is not set.
  - With O(service), the module finds the running containers of that service's tasks on the node whose Docker API is
    O(docker_host) (by the label C(com.docker.swarm.service.name)) and makes the same change in each of them by running
    a small Python script inside the container (C(docker exec)) that calls O(container_management_url) there. This is how
    a replica is managed whose management API binds to 127.0.0.1 inside its container and is never published. A playbook
    fans the task out over the swarm's nodes from the control host (C(delegate_to=localhost)).
author:
  - mlfleet.serving maintainers (@mlfleet)
extends_documentation_fragment:
  - mlfleet.serving.attributes
  - mlfleet.serving.torchserve
  - mlfleet.serving.docker_api
attributes:
  check_mode:
    support: full
    details:
      - Reads the models and reports the registrations, scaling, default version changes and removals it would make,
        and changes nothing.
  diff_mode:
    support: full
    details:
      - The diff shows the model's versions concerned before and after, with their URL, default flag, workers and batch
        settings. With O(service) there is one diff per container.
  idempotent:
    support: full
options:
  name:
    description:
      - Name of the model, the C({model_name}) of the management API's paths.
    type: str
    required: true
  state:
    description:
      - V(present) registers the version when it is missing and then adjusts its workers and default flag.
      - V(absent) unregisters O(version), or all versions of the model when O(version) is not set.
    type: str
    choices: [present, absent]
    default: present
  url:
    description:
      - The model archive to register from, as TorchServe takes it - a C(.mar) file name in TorchServe's model store (not
        in a subfolder), or an V(http://) or V(https://) URL that TorchServe downloads (it must match TorchServe's C(allowed_urls)).
      - Required when the model, or the version O(version), is not registered yet. It is used only to register;
        a registered version is not compared with it.
      - The archive's own version (C(torch-model-archiver --version)) is the version that gets registered.
    type: str
  version:
    description:
      - The model version to manage. When the archive at O(url) carries another version, the registration is undone and
        the module fails.
      - When not set, an existing model is managed at its default version, and O(url) only registers a model that does not exist yet.
        To roll out a new archive, set O(version) (and O(default_version=true)).
    type: str
  initial_workers:
    description:
      - Workers to start when the version is registered. Defaults to O(min_workers); without both, TorchServe's default (no workers).
      - Only used when registering; it is not compared with a registered version.
    type: int
  min_workers:
    description:
      - Minimum number of workers of the version. TorchServe keeps this many running.
      - When only O(max_workers) is set and is lower than the current minimum, the minimum is lowered to it.
    type: int
  max_workers:
    description:
      - Maximum number of workers of the version.
      - When only O(min_workers) is set, the maximum stays as it is, or is raised to O(min_workers).
    type: int
  batch_size:
    description:
      - Inference batch size of the version. Cannot change on a registered version, see O(recreate).
    type: int
  max_batch_delay:
    description:
      - Milliseconds TorchServe waits to fill a batch. Cannot change on a registered version, see O(recreate).
    type: int
  response_timeout:
    description:
      - Seconds a worker may take to answer before TorchServe restarts it. Cannot change on a registered version, see O(recreate).
    type: int
  default_version:
    description:
      - Make O(version) the default version of the model (the one C(/predictions/{model_name}) serves). Requires O(version).
      - V(false) leaves the default as it is; it does not take the default flag away.
    type: bool
    default: false
  recreate:
    description:
      - When O(batch_size), O(max_batch_delay) or O(response_timeout) differ from the registered version, unregister the version
        and register it again from O(url) (or, without O(url), from the URL it was registered from) with the same workers.
      - The version serves no requests in between. TorchServe cannot unregister a default version while the model has other
        versions, so that case fails; make another version the default first.
    type: bool
    default: false
  service:
    description:
      - Name of a Docker Swarm service whose containers on the node O(docker_host) run TorchServe. Every running container of
        the service's tasks on that node gets the same change.
      - Exactly one of O(service) and O(management_url) is required.
      - The Docker API timeout O(api_timeout) is raised to O(timeout) plus 15 seconds when lower, because a request waits
        inside C(docker exec).
    type: str
  container_management_url:
    description:
      - The management API as seen from inside a container of O(service), the C(management_address) of its TorchServe.
    type: str
    default: http://127.0.0.1:8081
  container_python:
    description:
      - The Python 3 interpreter in the containers of O(service) that runs the request script.
    type: str
    default: python3
  allow_no_replicas:
    description:
      - With O(service), succeed without change when the node runs no container of the service. A playbook that fans out
        over every node of the swarm sets this, as some nodes run no replica. Without it, that case fails.
    type: bool
    default: false
notes:
  - Registering and unregistering need TorchServe's model API (C(enable_model_api=true) in C(config.properties) or
    C(torchserve --enable-model-api)); scaling and setting the default version work without it.
  - Models declared in a replica's own configuration (C(load_models), C(models)) are loaded when the replica starts, so a
    replica that Swarm starts later serves them without this module. This module changes running replicas only, which
    forget the change when they restart; keep both in step.
  - In the collection's cluster, TorchServe's token authorization is off inside the replicas and the management API is
    reachable only from within each container; see the README's security model. O(management_token) is for endpoints that
    keep token authorization on, and is passed into a container through the exec's environment, never its command line.
seealso:
  - name: TorchServe management API
    description: The REST API this module calls.
    link: https://pytorch.org/serve/management_api.html
  - module: mlfleet.serving.swarm_join
"""

EXAMPLES = r"""
- name: Register resnet18 on a standalone TorchServe with two workers
  mlfleet.serving.torchserve_model:
    management_url: http://127.0.0.1:8081
    name: resnet18
    url: resnet18.mar
    min_workers: 2
    max_workers: 2
    batch_size: 4
    max_batch_delay: 50

- name: Add version 2.0 from its archive and make it the default
  mlfleet.serving.torchserve_model:
    management_url: http://127.0.0.1:8081
    name: resnet18
    url: resnet18-2.0.mar
    version: "2.0"
    initial_workers: 2
    default_version: true

- name: Change the batch size of version 2.0, registering it again
  mlfleet.serving.torchserve_model:
    management_url: http://127.0.0.1:8081
    name: resnet18
    version: "2.0"
    batch_size: 8
    recreate: true

- name: Remove version 1.0
  mlfleet.serving.torchserve_model:
    management_url: http://127.0.0.1:8081
    name: resnet18
    version: "1.0"
    state: absent

- name: Give resnet18 two workers in every replica of the torchserve service, node by node, from the control host
  mlfleet.serving.torchserve_model:
    service: torchserve
    docker_host: "{{ hostvars[item] | mlfleet.serving.docker_ssh_endpoint }}"
    ssh_private_key_file: ~/.ssh/id_ed25519
    name: resnet18
    min_workers: 2
    max_workers: 2
    allow_no_replicas: true
  loop: "{{ groups['swarm_managers'] + groups['swarm_workers'] }}"
  delegate_to: localhost
  run_once: true
"""

RETURN = r"""
actions:
  description: What the module did, or would do in check mode, in order.
  returned: when O(management_url) is set
  type: list
  elements: str
  sample: ["registered tiny-1.0.mar as version 1.0 with 1 initial workers", "scaled version 1.0 from 1..1 to 2..2 workers"]
model:
  description:
    - The model after the run, as far as it is concerned - its name and the versions managed, each with C(version),
      C(default), C(url), C(min_workers), C(max_workers), C(batch_size), C(max_batch_delay) and C(response_timeout).
    - In check mode, the expected state; a version that an archive would bring is null.
  returned: when O(management_url) is set
  type: dict
  sample:
    name: resnet18
    versions:
      - {version: "2.0", default: true, url: resnet18-2.0.mar, min_workers: 2, max_workers: 2, batch_size: 4,
         max_batch_delay: 50, response_timeout: 120}
endpoint:
  description: The management API endpoint that was called.
  returned: when O(management_url) is set
  type: str
  sample: http://127.0.0.1:8081
node:
  description: Name of the Docker node that O(docker_host) reaches.
  returned: when O(service) is set
  type: str
  sample: worker-1
replicas:
  description: One entry per container of O(service) on the node, in the order they were changed.
  returned: when O(service) is set
  type: list
  elements: dict
  contains:
    container:
      description: Name of the container.
      type: str
      sample: torchserve.2.q1w2e3r4t5y6u7i8o9p0
    task:
      description: Name of the swarm task the container runs.
      type: str
      sample: torchserve.2
    changed:
      description: Whether the model changed in this container.
      type: bool
    actions:
      description: What was done in this container, as in RV(actions).
      type: list
      elements: str
    before:
      description: The model before, as in RV(model).
      type: dict
    after:
      description: The model after, as in RV(model).
      type: dict
"""

from ansible.module_utils.basic import AnsibleModule, missing_required_lib

from ansible_collections.mlfleet.serving.plugins.module_utils._swarm import DOCKER_IMPORT_ERROR, DockerEndpoint, SwarmError, docker_api_argument_spec
from ansible_collections.mlfleet.serving.plugins.module_utils._torchserve import (
    REQUESTS_IMPORT_ERROR,
    ContainerTransport,
    HttpTransport,
    ManagementClient,
    TorchServeError,
    model_label,
    service_containers,
    task_name,
    torchserve_argument_spec,
)

# Option name and the describe field it is compared with.
FIELDS = (
    ("url", "modelUrl"),
    ("min_workers", "minWorkers"),
    ("max_workers", "maxWorkers"),
    ("batch_size", "batchSize"),
    ("max_batch_delay", "maxBatchDelay"),
    ("response_timeout", "responseTimeout"),
)
# Settings TorchServe fixes when it registers a version.
REGISTRATION_SETTINGS = ("batch_size", "max_batch_delay", "response_timeout")
COUNTS = ("initial_workers", "min_workers", "max_workers", "batch_size", "max_batch_delay", "response_timeout")


def argument_spec():
    spec = docker_api_argument_spec()
    spec.update(torchserve_argument_spec())
    spec.update(
        name=dict(type="str", required=True),
        state=dict(type="str", choices=["present", "absent"], default="present"),
        url=dict(type="str"),
        version=dict(type="str"),
        initial_workers=dict(type="int"),
        min_workers=dict(type="int"),
        max_workers=dict(type="int"),
        batch_size=dict(type="int"),
        max_batch_delay=dict(type="int"),
        response_timeout=dict(type="int"),
        default_version=dict(type="bool", default=False),
        recreate=dict(type="bool", default=False),
        service=dict(type="str"),
        container_management_url=dict(type="str", default="http://127.0.0.1:8081"),
        container_python=dict(type="str", default="python3"),
        allow_no_replicas=dict(type="bool", default=False),
    )
    return spec


def summary(described, default_version):
    """The part of a version's description that the module manages and reports."""
    version = described.get("modelVersion")
    return {"version": version, "default": version == default_version, **{option: described.get(key) for option, key in FIELDS}}


def view(name, versions):
    return {"name": name, "versions": versions}


def invalid_params(params):
    """A message for option values that contradict each other, or None."""
    if not params["management_url"] and not params["service"]:
        return "one of management_url and service is required"
    for option in COUNTS:
        if params[option] is not None and params[option] < 0:
            return f"{option} must not be negative, not {params[option]}"
    if params["min_workers"] is not None and params["max_workers"] is not None and params["min_workers"] > params["max_workers"]:
        return f"min_workers ({params['min_workers']}) must not exceed max_workers ({params['max_workers']})"
    return None


def wanted_workers(params, current_min, current_max):
    """The (min, max) workers to ask for, from the options set and the current values."""
    minimum = params["min_workers"] if params["min_workers"] is not None else current_min
    maximum = params["max_workers"] if params["max_workers"] is not None else max(current_max, minimum)
    if params["min_workers"] is None and maximum < minimum:
        minimum = maximum
    return minimum, maximum


class ModelReconciler:
    """Brings one model at one management API to the state the options ask for."""

    def __init__(self, client, params, check_mode):
        self.client = client
        self.params = params
        self.check_mode = check_mode
        self.name = params["name"]
        self.actions = []
        self.warnings = []

    def run(self):
        if self.params["state"] == "present":
            before, after = self.present()
        else:
            before, after = self.absent()
        return {"changed": bool(self.actions), "actions": self.actions, "before": before, "after": after}

    def act(self, action, write, *args, **kwargs):
        """Record ``action`` and make its write, except in check mode; an action whose write fails is not recorded."""
        if not self.check_mode:
            write(*args, **kwargs)
        self.actions.append(action)

    def registered(self):
        """Every registered version by version, and the default version (None when the model is not registered)."""
        versions = {d["modelVersion"]: d for d in self.client.versions(self.name)}
        default = self.client.describe(self.name) if versions else None
        return versions, default["modelVersion"] if default else None

    # state=present

    def present(self):
        versions, default = self.registered()
        target = self.params["version"] or default
        if target in versions:
            current = summary(versions[target], default)
            before = view(self.name, [current])
            if self.params["url"] and self.params["url"] != current["url"]:
                self.warnings.append(
                    f"{model_label(self.name, target)} at {self.client.endpoint} is registered from {current['url']}, not {self.params['url']}; "
                    "url is used only to register a missing version (set another version to roll out a new archive)"
                )
            current = self.refit(current, versions)
        else:
            before = view(self.name, [])
            current = self.register(versions)
        current = self.scale(current)
        current = self.make_default(current)
        if self.actions and not self.check_mode:
            versions, default = self.registered()
            current = summary(versions[current["version"]], default)
        return before, view(self.name, [current])

    def register(self, versions, url=None, initial_workers=None, settings=None, expected=None):
        """Register a version from an archive; returns its summary (the expected one in check mode)."""
        url = url or self.params["url"]
        expected = expected or self.params["version"]
        if not url:
            missing = f"has no version {expected}" if expected else "is not registered"
            raise TorchServeError(f"Model {self.name} {missing} at {self.client.endpoint}; set url to the archive to register it from")
        if initial_workers is None:
            initial_workers = self.params["initial_workers"] if self.params["initial_workers"] is not None else self.params["min_workers"]
        if settings is None:
            settings = {option: self.params[option] for option in REGISTRATION_SETTINGS if self.params[option] is not None}
        workers = f" with {initial_workers} initial workers" if initial_workers is not None else ""
        action = f"registered {url}" + (f" as version {expected}" if expected else "") + workers
        if self.check_mode:
            self.actions.append(action)
            started = initial_workers or 0
            return {"version": expected, "default": not versions, "url": url, "min_workers": started, "max_workers": started, **settings}
        try:
            self.client.register(self.name, url, initial_workers=initial_workers, **settings)
        except TorchServeError as error:
            if error.status == 500:
                # TorchServe keeps a version whose workers failed to start, registered with none.
                self.actions.append(action)
            raise
        self.actions.append(action)
        versions_now, default = self.registered()
        added = [v for v in versions_now if v not in versions]
        if expected and expected not in added:
            for version in added:
                self.client.unregister(self.name, version)
            carried = ", ".join(added) or "a version that is registered already"
            raise TorchServeError(
                f"{url} carries version {carried} of model {self.name}, not version {expected}, so it was unregistered again at "
                f"{self.client.endpoint}. Package the archive with torch-model-archiver --version {expected}, or set version to {carried}"
            )
        if not added:
            raise TorchServeError(f"Registering {url} as model {self.name} at {self.client.endpoint} reported success, but no new version appeared")
        return summary(versions_now[expected or added[0]], default)

    def refit(self, current, versions):
        """Register the version again when a setting that TorchServe fixes at registration differs, if allowed."""
        differing = [o for o in REGISTRATION_SETTINGS if self.params[o] is not None and self.params[o] != current[o]]
        if not differing:
            return current
        label = model_label(self.name, current["version"])
        changes = ", ".join(f"{o} {current[o]} -> {self.params[o]}" for o in differing)
        if not self.params["recreate"]:
            raise TorchServeError(
                f"{label} at {self.client.endpoint} is registered with {changes.replace(' -> ', ', not ')}. TorchServe cannot change "
                f"{' or '.join(differing)} of a registered version: set recreate=true to unregister and register it again (it serves no "
                "requests in between), or register these settings as a new version"
            )
        if current["default"] and len(versions) > 1:
            others = ", ".join(sorted(v for v in versions if v != current["version"]))
            raise TorchServeError(
                f"Cannot register {label} again at {self.client.endpoint} to change {changes}: it is the default version and the model also has "
                f"version {others}, and TorchServe does not unregister a default version while others exist. Make another version the default "
                "first, or register these settings as a new version"
            )
        self.act(f"unregistered version {current['version']} to change {changes}", self.client.unregister, self.name, current["version"])
        remaining = {v: d for v, d in versions.items() if v != current["version"]}
        settings = {o: self.params[o] if self.params[o] is not None else current[o] for o in REGISTRATION_SETTINGS}
        workers = self.params["min_workers"] if self.params["min_workers"] is not None else current["min_workers"]
        registered = self.register(remaining, url=self.params["url"] or current["url"], initial_workers=workers, settings=settings, expected=current["version"])
        # Registering sets both bounds to the initial workers; the previous maximum comes back unless max_workers replaces it.
        maximum = max(current["max_workers"], workers)
        if self.check_mode:
            return {**registered, "default": current["default"], "max_workers": maximum}
        if self.params["max_workers"] is None and registered["max_workers"] != maximum:
            self.client.scale(self.name, current["version"], workers, maximum)
            registered["max_workers"] = maximum
        return registered

    def scale(self, current):
        minimum, maximum = wanted_workers(self.params, current["min_workers"], current["max_workers"])
        if (minimum, maximum) == (current["min_workers"], current["max_workers"]):
            return current
        version = current["version"]
        action = f"scaled version {version or '(from the archive)'} from {current['min_workers']}..{current['max_workers']} to {minimum}..{maximum} workers"
        self.act(action, self.client.scale, self.name, version, minimum, maximum)
        return {**current, "min_workers": minimum, "max_workers": maximum}

    def make_default(self, current):
        if not self.params["default_version"] or current["default"]:
            return current
        self.act(f"made version {current['version']} the default", self.client.set_default, self.name, current["version"])
        return {**current, "default": True}

    # state=absent

    def absent(self):
        versions, default = self.registered()
        wanted = self.params["version"]
        if wanted:
            if wanted not in versions:
                return view(self.name, []), view(self.name, [])
            if wanted == default and len(versions) > 1:
                others = ", ".join(sorted(v for v in versions if v != wanted))
                raise TorchServeError(
                    f"Cannot unregister {model_label(self.name, wanted)} at {self.client.endpoint}: it is the default version and the model also "
                    f"has version {others}, and TorchServe does not unregister a default version while others exist. Make another version the "
                    "default first (default_version=true on it), or leave version out to remove every version"
                )
            doomed = [wanted]
        else:
            # The default version goes last: TorchServe refuses to unregister it while others exist.
            doomed = sorted(v for v in versions if v != default) + ([default] if default in versions else [])
        before = view(self.name, [summary(versions[v], default) for v in doomed])
        for version in doomed:
            self.act(f"unregistered version {version}", self.client.unregister, self.name, version)
        return before, view(self.name, [])


class TorchServeModel:
    def __init__(self, module):
        self.module = module
        self.params = module.params
        self.warnings = []
        self.replicas = []
        # The endpoint and the actions done there when a reconciliation failed halfway.
        self.unfinished = None

    def run(self):
        if self.params["service"]:
            return self.run_service()
        return self.run_direct()

    def reconcile(self, client):
        reconciler = ModelReconciler(client, self.params, self.module.check_mode)
        try:
            outcome = reconciler.run()
        except TorchServeError:
            self.unfinished = {"endpoint": client.endpoint, "actions": reconciler.actions}
            raise
        finally:
            for warning in reconciler.warnings:
                if warning not in self.warnings:
                    self.warnings.append(warning)
        return outcome

    def run_direct(self):
        client = ManagementClient(HttpTransport(self.params["management_url"], self.params["management_token"], self.params["timeout"]))
        try:
            outcome = self.reconcile(client)
        finally:
            client.close()
        return {
            "changed": outcome["changed"],
            "actions": outcome["actions"],
            "model": outcome["after"],
            "endpoint": client.endpoint,
            "diff": {"before": outcome["before"], "after": outcome["after"]},
        }

    def run_service(self):
        service = self.params["service"]
        params = dict(self.params, api_timeout=max(self.params["api_timeout"], self.params["timeout"] + 15))
        with DockerEndpoint.from_params(params) as docker:
            node = docker.call("Reading the engine's info", docker.client.info).get("Name")
            containers = service_containers(docker, service)
            if not containers and not self.params["allow_no_replicas"]:
                raise TorchServeError(
                    f"Service {service} has no running container on node {node} ({docker.url}). Check the service name and that its tasks run "
                    "there (docker service ps), or set allow_no_replicas=true when the play goes over every node of the swarm"
                )
            for container in containers:
                transport = ContainerTransport(
                    docker,
                    container,
                    base_url=self.params["container_management_url"],
                    token=self.params["management_token"],
                    timeout=self.params["timeout"],
                    python=self.params["container_python"],
                )
                outcome = self.reconcile(ManagementClient(transport))
                self.replicas.append({"container": transport.container_name, "task": task_name(container), **outcome})
        diff = [
            {"before_header": f"{r['container']} (before)", "after_header": f"{r['container']} (after)", "before": r["before"], "after": r["after"]}
            for r in self.replicas
        ]
        return {"changed": any(r["changed"] for r in self.replicas), "node": node, "replicas": self.replicas, "diff": diff}


def main():
    module = AnsibleModule(
        argument_spec=argument_spec(),
        mutually_exclusive=[("management_url", "service")],
        required_one_of=[("management_url", "service")],
        required_if=[("default_version", True, ["version"])],
        supports_check_mode=True,
    )
    if REQUESTS_IMPORT_ERROR and module.params["management_url"]:
        module.fail_json(msg=missing_required_lib("requests"), exception=REQUESTS_IMPORT_ERROR)
    if DOCKER_IMPORT_ERROR and module.params["service"]:
        module.fail_json(msg=missing_required_lib("docker"), exception=DOCKER_IMPORT_ERROR)
    problem = invalid_params(module.params)
    if problem:
        module.fail_json(msg=problem)
    runner = TorchServeModel(module)
    try:
        result = runner.run()
    except (TorchServeError, SwarmError) as error:
        done = {"replicas": runner.replicas} if module.params["service"] else {}
        if runner.unfinished is not None:
            done["unfinished"] = runner.unfinished
        changed = any(r["changed"] for r in runner.replicas) or bool(runner.unfinished and runner.unfinished["actions"])
        module.fail_json(msg=str(error), changed=changed, **done)
    for warning in runner.warnings:
        module.warn(warning)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
