# Copyright (c) mlfleet.serving maintainers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""One Docker Engine API client for the swarm modules of this collection.

A Docker API endpoint is the node's own socket (``unix://``) or a node reached over SSH
(``ssh://user@host[:port]``). SSH endpoints forward the node's Docker socket to a private local
socket with the system's OpenSSH client, so the user's SSH keys, agent, known hosts and options
apply as they do for Ansible itself, and the Docker API never listens on TCP. Every failure becomes
SwarmError, whose message names the endpoint or node and what to check.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import socket
import subprocess
import tempfile
import time
import traceback
from urllib.parse import urlsplit

try:
    import docker
    from docker.errors import APIError, DockerException
    from requests.exceptions import RequestException
except ImportError:
    DOCKER_IMPORT_ERROR = traceback.format_exc()
else:
    DOCKER_IMPORT_ERROR = None

# Task states in which a task holds or is about to hold a container on its node.
ACTIVE_TASK_STATES = frozenset({"new", "pending", "assigned", "accepted", "preparing", "ready", "starting", "running"})
# Service label that records a drain surge (extra replicas added while a node drains) so a re-run
# after an interruption can restore the service's replica count.
SURGE_LABEL_PREFIX = "mlfleet.drain-surge."
VMID_LABEL = "mlfleet.vmid"
POOL_LABEL = "mlfleet.pool"


def docker_api_argument_spec():
    """The connection options of the swarm modules (documented by the mlfleet.serving.docker_api doc fragment)."""
    return dict(
        docker_host=dict(type="str", default="unix:///var/run/docker.sock"),
        ssh_private_key_file=dict(type="path"),
        ssh_args=dict(type="str", default=""),
        ssh_remote_socket=dict(type="str", default="/var/run/docker.sock"),
        connect_timeout=dict(type="int", default=10),
        api_timeout=dict(type="int", default=60),
    )


class SwarmError(Exception):
    """A Docker or Swarm operation failed. The message names the endpoint or node and what to check."""


def describe_api_error(error):
    """The daemon's own explanation of an API error, without the HTTP preamble the SDK adds."""
    if isinstance(error, APIError) and error.explanation:
        return str(error.explanation).strip()
    return str(error).strip()


def forward_listens(path):
    """Whether something listens on the Unix socket ``path``. OpenSSH creates the forward's socket file at bind(), before
    listen(): a client that connects in between is refused (ConnectionRefusedError), so the file alone is not enough."""
    if not os.path.exists(path):
        return False
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        return False
    finally:
        probe.close()
    return True


class DockerEndpoint:
    """An open connection to one Docker Engine API; ``client`` is a docker.APIClient.

    Use it as a context manager; closing it ends the SSH forward and removes its socket directory.
    """

    def __init__(self, url, ssh_private_key_file=None, ssh_args="", ssh_remote_socket="/var/run/docker.sock", connect_timeout=10, api_timeout=60):
        self.url = url
        self._ssh_private_key_file = ssh_private_key_file
        self._ssh_args = ssh_args or ""
        self._ssh_remote_socket = ssh_remote_socket
        self._connect_timeout = connect_timeout
        self._api_timeout = api_timeout
        self._tunnel = None
        self._tunnel_dir = None
        self._tunnel_stderr = None
        self.client = None

    @classmethod
    def from_params(cls, params, url=None):
        return cls(
            url or params["docker_host"],
            ssh_private_key_file=params["ssh_private_key_file"],
            ssh_args=params["ssh_args"],
            ssh_remote_socket=params["ssh_remote_socket"],
            connect_timeout=params["connect_timeout"],
            api_timeout=params["api_timeout"],
        )

    def __enter__(self):
        self.open()
        return self

    def __exit__(self, *exc_info):
        self.close()

    def open(self):
        parts = urlsplit(self.url)
        if parts.scheme == "unix":
            socket_url = self.url
        elif parts.scheme == "ssh":
            socket_url = "unix://" + self._open_tunnel(parts)
        else:
            raise SwarmError(
                f"Docker API endpoint {self.url!r} is neither unix:///path nor ssh://user@host[:port]; the Docker API is never reached over plain TCP"
            )
        try:
            self.client = docker.APIClient(base_url=socket_url, version="auto", timeout=self._api_timeout)
        except (DockerException, RequestException, OSError) as error:
            hint = self._access_hint()
            self.close()
            raise SwarmError(f"Cannot reach the Docker API at {self.url}: {error}{hint}") from error
        return self.client

    def _open_tunnel(self, parts):
        try:
            port = parts.port
        except ValueError as error:
            raise SwarmError(f"Docker API endpoint {self.url!r} has an invalid port; write ssh://user@host[:port]") from error
        if not parts.hostname:
            raise SwarmError(f"Docker API endpoint {self.url!r} names no host; write ssh://user@host[:port]")
        self._tunnel_dir = tempfile.mkdtemp(prefix="mlfleet-docker-")
        local_socket = os.path.join(self._tunnel_dir, "docker.sock")
        # OpenSSH takes the first value it reads for an option: the ones the forward depends on come
        # before the user's arguments, the overridable defaults after them.
        argv = ["ssh", "-N", "-T", "-o", "BatchMode=yes", "-o", "ExitOnForwardFailure=yes", "-o", "ControlMaster=no", "-o", "ControlPath=none"]
        argv += shlex.split(self._ssh_args)
        argv += ["-o", f"ConnectTimeout={self._connect_timeout}", "-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=3"]
        if self._ssh_private_key_file:
            argv += ["-i", self._ssh_private_key_file, "-o", "IdentitiesOnly=yes"]
        if port:
            argv += ["-p", str(port)]
        if parts.username:
            argv += ["-l", parts.username]
        argv += ["-L", f"{local_socket}:{self._ssh_remote_socket}", "--", parts.hostname]
        self._tunnel_stderr = tempfile.TemporaryFile(dir=self._tunnel_dir)
        try:
            self._tunnel = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self._tunnel_stderr)
        except OSError as error:
            self.close()
            raise SwarmError(f"Cannot start the OpenSSH client to reach {self.url}: {error}; install openssh-client on the control host") from error
        deadline = time.monotonic() + self._connect_timeout + 5
        while not forward_listens(local_socket):
            if self._tunnel.poll() is not None or time.monotonic() > deadline:
                reason = self._ssh_error() or f"no forward after {self._connect_timeout + 5} s"
                self.close()
                raise SwarmError(
                    f"Cannot reach the Docker API at {self.url} over SSH: {reason}. "
                    "Check the address, the SSH user and key, and that sshd allows stream-local forwarding"
                )
            time.sleep(0.02)
        return local_socket

    def _ssh_error(self):
        if self._tunnel_stderr is None:
            return ""
        self._tunnel_stderr.seek(0)
        lines = [line.strip() for line in self._tunnel_stderr.read().decode("utf-8", "replace").splitlines() if line.strip()]
        return "; ".join(lines[-3:])

    def _access_hint(self):
        if self._tunnel is None:
            return ""
        user = urlsplit(self.url).username or "the SSH user"
        detail = self._ssh_error()
        detail = f" (ssh: {detail})" if detail else ""
        return f"{detail}. {user} must be allowed to use {self._ssh_remote_socket} on the node: add it to the docker group (docker_engine_socket_users)"

    def call(self, what, function, *args, **kwargs):
        """Run one SDK call; a failure becomes SwarmError naming ``what`` and the endpoint."""
        try:
            return function(*args, **kwargs)
        except APIError as error:
            raise SwarmError(f"{what} failed at {self.url}: {describe_api_error(error)}") from error
        except (DockerException, RequestException, OSError) as error:
            raise SwarmError(f"{what} failed at {self.url}: {error}{self._access_hint()}") from error

    def close(self):
        if self.client is not None:
            self.client.close()
            self.client = None
        if self._tunnel is not None:
            if self._tunnel.poll() is None:
                self._tunnel.terminate()
                try:
                    self._tunnel.wait(5)
                except subprocess.TimeoutExpired:
                    self._tunnel.kill()
                    self._tunnel.wait()
            self._tunnel = None
        if self._tunnel_stderr is not None:
            self._tunnel_stderr.close()
            self._tunnel_stderr = None
        if self._tunnel_dir is not None:
            shutil.rmtree(self._tunnel_dir, ignore_errors=True)
            self._tunnel_dir = None


def swarm_info(endpoint):
    """The ``Swarm`` section of the engine's info: LocalNodeState, NodeID, ControlAvailable, Cluster, RemoteManagers."""
    return endpoint.call("Reading the engine's swarm state", endpoint.client.info).get("Swarm") or {}


def wait_for(what, predicate, timeout, interval=0.5):
    """Poll ``predicate`` until it returns a true value and return it; SwarmError naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise SwarmError(f"Timed out after {timeout} s waiting until {what}")
        time.sleep(interval)


def node_summary(node):
    """The parts of a node record that the modules compare and report."""
    spec = node.get("Spec") or {}
    return {
        "node_id": node.get("ID"),
        "hostname": (node.get("Description") or {}).get("Hostname"),
        "role": spec.get("Role"),
        "availability": spec.get("Availability"),
        "labels": dict(spec.get("Labels") or {}),
        "status": (node.get("Status") or {}).get("State"),
        "address": (node.get("Status") or {}).get("Addr"),
        "manager_reachability": (node.get("ManagerStatus") or {}).get("Reachability"),
    }


def manager_addresses(manager):
    """The swarm addresses (host:port) of every reachable manager, read through ``manager``."""
    nodes = manager.call("Listing the swarm's managers", manager.client.nodes, filters={"role": "manager"})
    return sorted((n.get("ManagerStatus") or {}).get("Addr") for n in nodes if (n.get("ManagerStatus") or {}).get("Reachability") == "reachable")


def update_node_spec(manager, node_id, change, retries=5):
    """Apply ``change(spec)`` to a node's spec on the manager, re-reading on version conflicts."""
    for attempt in range(retries):
        node = manager.call(f"Reading swarm node {node_id}", manager.client.inspect_node, node_id)
        spec = dict(node["Spec"])
        change(spec)
        try:
            manager.client.update_node(node_id, node["Version"]["Index"], spec)
            return
        except APIError as error:
            if "out of sequence" in describe_api_error(error) and attempt + 1 < retries:
                continue
            raise SwarmError(f"Updating swarm node {node_id} failed at {manager.url}: {describe_api_error(error)}") from error


def node_tasks(manager, node_id):
    """Tasks of every service placed on ``node_id`` that hold or are about to hold a container there."""
    tasks = manager.call(f"Listing the tasks of node {node_id}", manager.client.tasks, filters={"node": node_id})
    return [t for t in tasks if (t.get("Status") or {}).get("State") in ACTIVE_TASK_STATES]


def running_tasks_by_service(manager, exclude_node=None):
    """Count of running tasks that are meant to run, per service id, optionally leaving out one node."""
    tasks = manager.call("Listing the swarm's tasks", manager.client.tasks, filters={"desired-state": "running"})
    counts = {}
    for task in tasks:
        if (task.get("Status") or {}).get("State") == "running" and task.get("NodeID") != exclude_node:
            counts[task["ServiceID"]] = counts.get(task["ServiceID"], 0) + 1
    return counts


def replicated_count(service):
    """The replica count of a replicated service, or None for global services and jobs."""
    mode = (service.get("Spec") or {}).get("Mode") or {}
    replicated = mode.get("Replicated")
    return None if replicated is None else replicated.get("Replicas", 1)


def update_service_replicas(manager, service_id, replicas_delta, labels_change, retries=5):
    """Add ``replicas_delta`` to a replicated service's replicas and apply ``labels_change(labels)``.

    The rest of the spec goes back exactly as stored. The SDK's ``fetch_current_spec`` reads the spec
    with defaults filled in (a restart policy the service never set, for one); the manager sees that as
    a new task template and restarts every task, so it is not used.
    """
    for attempt in range(retries):
        service = manager.call(f"Reading service {service_id}", manager.client.inspect_service, service_id)
        spec = service["Spec"]
        labels = dict(spec.get("Labels") or {})
        labels_change(labels)
        try:
            manager.client.update_service(
                service_id,
                service["Version"]["Index"],
                task_template=spec["TaskTemplate"],
                name=spec["Name"],
                labels=labels,
                mode={"Replicated": {"Replicas": replicated_count(service) + replicas_delta}},
                update_config=spec.get("UpdateConfig"),
                rollback_config=spec.get("RollbackConfig"),
                endpoint_spec=spec.get("EndpointSpec"),
            )
            return
        except APIError as error:
            if "out of sequence" in describe_api_error(error) and attempt + 1 < retries:
                continue
            raise SwarmError(f"Updating service {spec.get('Name', service_id)} failed at {manager.url}: {describe_api_error(error)}") from error


# moby#44378: Docker Engine before 23.0.2 refuses a service that reserves generic resources (GPUs) and joins networks.
GENERIC_RESOURCES_WITH_NETWORKS = (23, 0, 2)
_VERSION_NUMBERS = re.compile(r"^v?(\d+)\.(\d+)(?:\.(\d+))?")


def engine_version(text):
    """(major, minor, patch) of a Docker Engine version string such as ``20.10.24+dfsg1`` or ``26.1.5``; None if unreadable."""
    found = _VERSION_NUMBERS.match(str(text or ""))
    return tuple(int(part or 0) for part in found.groups()) if found else None


def node_hostname(node):
    return (node.get("Description") or {}).get("Hostname") or node.get("ID")


def generic_units(resources):
    """{kind: units} of Swarm generic resources: a named resource (a GPU's id) is one unit, a discrete one its value."""
    units = {}
    for resource in resources or []:
        named, discrete = resource.get("NamedResourceSpec"), resource.get("DiscreteResourceSpec")
        if named and named.get("Kind"):
            units[named["Kind"]] = units.get(named["Kind"], 0) + 1
        elif discrete and discrete.get("Kind"):
            units[discrete["Kind"]] = units.get(discrete["Kind"], 0) + int(discrete.get("Value") or 0)
    return units


def advertised_kinds(node):
    """The generic resource kinds a node advertises (``node-generic-resources``), named or discrete."""
    return set(generic_units(((node.get("Description") or {}).get("Resources") or {}).get("GenericResources")))


def generic_resource_problems(service, kinds, nodes):
    """Why the swarm cannot run a service reserving generic resources of ``kinds``, as one message (None: it can).

    Every manager and every node that advertises one of the kinds must run Docker Engine 23.0.2 or later, and some
    node must advertise each kind.
    """
    missing = sorted(kind for kind in kinds if not any(kind in advertised_kinds(node) for node in nodes))
    if missing:
        return (
            f"Service {service} reserves generic resources {', '.join(missing)}, which no node of the swarm advertises: set "
            f"node-generic-resources on the GPU nodes (docker_engine_generic_resources of the docker_engine role), or drop the reservation"
        )
    old = []
    for node in nodes:
        if "ManagerStatus" not in node and not advertised_kinds(node) & set(kinds):
            continue
        text = ((node.get("Description") or {}).get("Engine") or {}).get("EngineVersion")
        version = engine_version(text)
        if version is None or version < GENERIC_RESOURCES_WITH_NETWORKS:
            old.append(f"{node_hostname(node)} ({'manager' if 'ManagerStatus' in node else 'worker'}, {text or 'version unknown'})")
    if old:
        return (
            f"Service {service} reserves generic resources ({', '.join(sorted(kinds))}), which Docker Engine before 23.0.2 refuses "
            f"together with networks (moby#44378); these nodes run an older engine: {', '.join(sorted(old))}. Upgrade them: on Debian 12, "
            f"Docker's own packages (docker_engine_source: docker); on Debian 13, its docker.io"
        )
    return None
