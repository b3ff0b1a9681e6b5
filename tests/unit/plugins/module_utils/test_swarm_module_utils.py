"""The swarm modules' Docker API endpoint and helpers, with OpenSSH and the Docker SDK replaced by fakes.

No ssh process starts and no Docker daemon is reached: subprocess.Popen is a fake OpenSSH client that
creates the forwarded socket (or fails as ssh does), and docker.APIClient records how it was built.
"""

from __future__ import annotations

import copy
import os
import socket

import docker
import pytest
from docker.errors import APIError, DockerException

from ansible_collections.mlfleet.serving.plugins.module_utils import _swarm
from ansible_collections.mlfleet.serving.plugins.module_utils._swarm import (
    DockerEndpoint,
    SwarmError,
    advertised_kinds,
    engine_version,
    manager_addresses,
    node_tasks,
    running_tasks_by_service,
    update_node_spec,
    update_service_replicas,
    wait_for,
)

SSH_URL = "ssh://mlops@192.0.2.10:2222"
SERVICE_SPEC = {
    "Name": "resnet",
    "Labels": {"team": "ml"},
    "Mode": {"Replicated": {"Replicas": 6}},
    "TaskTemplate": {"ContainerSpec": {"Image": "registry.example/resnet:1"}, "ForceUpdate": 0, "Networks": [{"Target": "net1"}]},
    "UpdateConfig": {"Parallelism": 1, "Order": "start-first"},
    "RollbackConfig": {"Parallelism": 1},
    "EndpointSpec": {"Mode": "vip", "Ports": [{"TargetPort": 8080, "PublishedPort": 8080}]},
}
SSH_ARGS = "-o StrictHostKeyChecking=no -o 'ProxyCommand=ssh -W %h:%p bastion'"


class FakeSsh:
    """Stands in for the OpenSSH client: creates the local end of the -L forward, or fails like ssh."""

    def __init__(self, argv, stdin=None, stdout=None, stderr=None, failure=None, forwards=True, listens_after_polls=0):
        self.argv = argv
        self.returncode = None
        self.terminated = False
        self.local_socket = argv[argv.index("-L") + 1].split(":", 1)[0]
        self.listener = None
        self.listens_after_polls = listens_after_polls
        if failure:
            stderr.write(failure.encode())
            stderr.flush()
            self.returncode = 255
        elif forwards:
            # As OpenSSH does: bind() creates the socket file; listen() follows, here only after some polls.
            self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.listener.bind(self.local_socket)
            if not listens_after_polls:
                self.listener.listen()

    def poll(self):
        if self.listener is not None and self.listens_after_polls:
            self.listens_after_polls -= 1
            if not self.listens_after_polls:
                self.listener.listen()
        return self.returncode

    def terminate(self):
        self.terminated = True
        self.returncode = -15
        if self.listener is not None:
            self.listener.close()

    def wait(self, timeout=None):
        return self.returncode

    def kill(self):
        self.returncode = -9


class FakeClient:
    def __init__(self, base_url=None, version=None, timeout=None):
        self.base_url, self.version, self.timeout = base_url, version, timeout
        self.closed = False

    def close(self):
        self.closed = True


class Clock:
    def __init__(self):
        self.now = 50.0
        self.sleeps = []

    def monotonic(self):
        return self.now

    def sleep(self, seconds):
        self.sleeps.append(seconds)
        self.now += seconds


@pytest.fixture
def clock(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(_swarm, "time", clock)
    return clock


@pytest.fixture
def docker_client(monkeypatch):
    clients = []

    def build(**kwargs):
        clients.append(FakeClient(**kwargs))
        return clients[-1]

    monkeypatch.setattr(_swarm.docker, "APIClient", build)
    return clients


@pytest.fixture
def ssh(monkeypatch):
    """The started fake ssh processes; set ``ssh.failure`` or ``ssh.forwards`` before opening."""

    class Processes(list):
        failure = None
        forwards = True
        listens_after_polls = 0

    processes = Processes()

    def popen(argv, **kwargs):
        processes.append(FakeSsh(argv, failure=processes.failure, forwards=processes.forwards, listens_after_polls=processes.listens_after_polls, **kwargs))
        return processes[-1]

    monkeypatch.setattr(_swarm.subprocess, "Popen", popen)
    return processes


def endpoint(url=SSH_URL, **options):
    return DockerEndpoint(url, **options)


@pytest.mark.parametrize("url", ["tcp://192.0.2.10:2375", "http://192.0.2.10:2375", "https://192.0.2.10:2376", "192.0.2.10"])
def test_plain_tcp_is_never_used(url, ssh, docker_client):
    with pytest.raises(SwarmError, match="never reached over plain TCP") as error:
        endpoint(url).open()
    assert repr(url) in str(error.value)
    assert ssh == [] and docker_client == []


@pytest.mark.parametrize("url", ["ssh://", "ssh://mlops@", "ssh:///var/run/docker.sock"])
def test_ssh_without_host_is_refused(url, ssh):
    with pytest.raises(SwarmError, match=r"names no host; write ssh://user@host\[:port\]"):
        endpoint(url).open()
    assert ssh == []


def test_a_unix_socket_is_used_as_it_is(docker_client, ssh):
    with endpoint("unix:///run/user/1000/docker.sock", api_timeout=30) as opened:
        assert opened.client is docker_client[0]
    assert (docker_client[0].base_url, docker_client[0].version, docker_client[0].timeout) == ("unix:///run/user/1000/docker.sock", "auto", 30)
    assert docker_client[0].closed and ssh == []


def test_ssh_argv_forwards_the_docker_socket(ssh, docker_client):
    opened = endpoint(ssh_private_key_file="/keys/id_ed25519", ssh_args=SSH_ARGS, connect_timeout=7)
    opened.open()
    [process] = ssh
    argv = process.argv
    assert argv[0] == "ssh" and argv[-2:] == ["--", "192.0.2.10"]

    def option(flag):
        return argv[argv.index(flag) + 1]

    assert (option("-l"), option("-p"), option("-i")) == ("mlops", "2222", "/keys/id_ed25519")
    assert "IdentitiesOnly=yes" in argv and "ConnectTimeout=7" in argv
    assert option("-L") == f"{process.local_socket}:/var/run/docker.sock"
    assert "ProxyCommand=ssh -W %h:%p bastion" in argv, "the quoted option stays one argument"
    first_user_arg = argv.index("StrictHostKeyChecking=no")
    # OpenSSH keeps the first value of an option: the ones the forward depends on come before the user's.
    assert argv.index("BatchMode=yes") < first_user_arg and argv.index("ExitOnForwardFailure=yes") < first_user_arg
    assert docker_client[0].base_url == f"unix://{process.local_socket}"
    assert opened.client is docker_client[0]

    tunnel_dir = os.path.dirname(process.local_socket)
    assert os.path.isdir(tunnel_dir)
    opened.close()
    assert process.terminated and docker_client[0].closed
    assert not os.path.exists(tunnel_dir) and opened.client is None


def test_ssh_failure_names_the_url_and_ssh_reason(ssh, docker_client):
    ssh.failure = "mlops@192.0.2.10: Permission denied (publickey).\n"
    with pytest.raises(SwarmError) as error:
        endpoint().open()
    message = str(error.value)
    assert SSH_URL in message and "Permission denied (publickey)" in message and "stream-local forwarding" in message
    assert not os.path.exists(os.path.dirname(ssh[0].local_socket)) and docker_client == []


def test_the_docker_client_waits_until_ssh_listens_on_the_forward_not_only_until_its_socket_exists(ssh, docker_client):
    # OpenSSH binds the forward's socket (the file appears) before it listens: a client connecting in between is
    # refused, as a scale run's first Docker call was in the lab (ConnectionRefusedError 111).
    ssh.listens_after_polls = 3
    opened = endpoint()
    opened.open()
    [process] = ssh
    assert process.listens_after_polls == 0, "the client was built before ssh listened"
    assert docker_client[0].base_url == f"unix://{process.local_socket}"
    opened.close()


def test_ssh_that_never_forwards_times_out(ssh, clock):
    ssh.forwards = False
    with pytest.raises(SwarmError, match=r"no forward after 6 s") as error:
        endpoint(connect_timeout=1).open()
    assert SSH_URL in str(error.value)
    assert ssh[0].terminated and not os.path.exists(os.path.dirname(ssh[0].local_socket))


def test_a_refused_docker_socket_hints_at_the_docker_group(ssh, monkeypatch):
    def refuse(**kwargs):
        raise DockerException("Error while fetching server API version: ('Connection aborted.', PermissionError(13, 'Permission denied'))")

    monkeypatch.setattr(_swarm.docker, "APIClient", refuse)
    with pytest.raises(SwarmError) as error:
        endpoint().open()
    message = str(error.value)
    assert message.startswith(f"Cannot reach the Docker API at {SSH_URL}: ") and "Permission denied" in message
    assert ssh[0].terminated
    assert "mlops must be allowed to use /var/run/docker.sock" in message and "docker group" in message


def test_call_turns_sdk_errors_into_swarm_errors(ssh, docker_client):
    opened = endpoint()
    opened.open()

    def rejected():
        raise APIError("503 Server Error", explanation="This node is not a swarm manager.")

    def broken_pipe():
        raise BrokenPipeError("Broken pipe")

    with pytest.raises(SwarmError, match=f"^Listing nodes failed at {SSH_URL}: This node is not a swarm manager.$"):
        opened.call("Listing nodes", rejected)
    with pytest.raises(SwarmError, match="Broken pipe.*mlops must be allowed"):
        opened.call("Listing nodes", broken_pipe)
    assert opened.call("Adding", lambda a, b=0: a + b, 1, b=2) == 3
    opened.close()


def test_wait_for_returns_the_first_true_value(clock):
    values = iter([None, [], {"NodeID": "abc"}])
    assert wait_for("the node has an id", lambda: next(values), timeout=10, interval=2) == {"NodeID": "abc"}
    assert clock.sleeps == [2, 2]


def test_wait_for_names_what_it_awaited_on_timeout(clock):
    with pytest.raises(SwarmError, match=r"^Timed out after 3 s waiting until node w1 runs no task$"):
        wait_for("node w1 runs no task", lambda: False, timeout=3, interval=1)
    assert clock.sleeps == [1, 1, 1]


class Manager:
    """A manager endpoint whose client answers from a few records and conflicts on the first updates.

    update_service is the SDK's own, so the test sees the request body the daemon would get.
    """

    url = "unix:///run/fake/m1.sock"
    _version = "1.45"
    _auth_configs = docker.auth.AuthConfig({"auths": {"registry.invalid": {}}})
    credstore_env = None
    update_service = docker.APIClient.update_service

    def __init__(self, conflicts=0):
        self.conflicts = conflicts
        self.node = {"ID": "n1", "Version": {"Index": 7}, "Spec": {"Role": "worker", "Availability": "active", "Labels": {"a": "1"}}}
        self.service = {"ID": "s1", "Version": {"Index": 3}, "Spec": copy.deepcopy(SERVICE_SPEC)}
        self.updates = []
        self.client = self

    def call(self, what, function, *args, **kwargs):
        return function(*args, **kwargs)

    def inspect_node(self, node_id):
        return {**self.node, "Spec": dict(self.node["Spec"])}

    def inspect_service(self, service_id, insert_defaults=None):
        service = copy.deepcopy(self.service)
        if insert_defaults:
            service["Spec"]["TaskTemplate"]["RestartPolicy"] = {"Condition": "any"}
        return service

    def _url(self, path, *args, **kwargs):
        return path.format(*args)

    def _result(self, response, json=False, binary=False):
        return response

    def _post_json(self, url, data=None, params=None, headers=None):
        assert url == f"/services/{self.service['ID']}/update"
        self.conflict(params["version"])
        self.service["Spec"] = {key: value for key, value in data.items() if value is not None}

    def conflict(self, version):
        self.updates.append(version)
        if self.conflicts:
            self.conflicts -= 1
            self.node["Version"]["Index"] += 1
            self.service["Version"]["Index"] += 1
            raise APIError("500 Server Error", explanation="rpc error: code = Unknown desc = update out of sequence")

    def update_node(self, node_id, version, node_spec):
        self.conflict(version)
        self.node["Spec"] = node_spec

    def nodes(self, filters=None):
        return [
            {"ID": "m2", "ManagerStatus": {"Reachability": "reachable", "Addr": "192.0.2.11:2377"}},
            {"ID": "m3", "ManagerStatus": {"Reachability": "unreachable", "Addr": "192.0.2.12:2377"}},
            {"ID": "m1", "ManagerStatus": {"Reachability": "reachable", "Addr": "192.0.2.10:2377"}},
        ]

    def tasks(self, filters=None):
        node = (filters or {}).get("node")
        tasks = [
            {"ServiceID": "s1", "NodeID": "n1", "DesiredState": "running", "Status": {"State": "running"}},
            {"ServiceID": "s3", "NodeID": "n1", "DesiredState": "running", "Status": {"State": "starting"}},
            {"ServiceID": "s1", "NodeID": "n2", "DesiredState": "running", "Status": {"State": "running"}},
            {"ServiceID": "s1", "NodeID": "n2", "DesiredState": "running", "Status": {"State": "preparing"}},
            {"ServiceID": "s2", "NodeID": "n1", "DesiredState": "shutdown", "Status": {"State": "shutdown"}},
            {"ServiceID": "s2", "NodeID": "n1", "DesiredState": "shutdown", "Status": {"State": "failed"}},
        ]
        return [t for t in tasks if node is None or t["NodeID"] == node]


def test_update_node_spec_rereads_on_a_version_conflict():
    manager = Manager(conflicts=2)
    update_node_spec(manager, "n1", lambda spec: spec.update(Availability="drain"))
    assert manager.updates == [7, 8, 9]
    assert manager.node["Spec"] == {"Role": "worker", "Availability": "drain", "Labels": {"a": "1"}}


def test_update_node_spec_gives_up_after_its_retries():
    manager = Manager(conflicts=9)
    with pytest.raises(SwarmError, match=f"^Updating swarm node n1 failed at {manager.url}: .*update out of sequence$"):
        update_node_spec(manager, "n1", lambda spec: spec.update(Availability="drain"), retries=3)
    assert len(manager.updates) == 3


def test_update_service_replicas_changes_replicas_and_labels_only():
    manager = Manager(conflicts=1)
    update_service_replicas(manager, "s1", 2, lambda labels: labels.update({"mlfleet.drain-surge.n1": "2"}))
    assert manager.updates == [3, 4]
    # Anything else that differs, a task template with defaults filled in above all, makes Swarm restart every task.
    assert manager.service["Spec"] == {**SERVICE_SPEC, "Labels": {"team": "ml", "mlfleet.drain-surge.n1": "2"}, "Mode": {"Replicated": {"Replicas": 8}}}


def test_task_and_manager_helpers():
    manager = Manager()
    assert manager_addresses(manager) == ["192.0.2.10:2377", "192.0.2.11:2377"]
    assert running_tasks_by_service(manager) == {"s1": 2}
    assert running_tasks_by_service(manager, exclude_node="n2") == {"s1": 1}
    assert [t["Status"]["State"] for t in node_tasks(manager, "n1")] == ["running", "starting"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("20.10.24+dfsg1", (20, 10, 24)),
        ("26.1.5+dfsg1", (26, 1, 5)),
        ("23.0.2", (23, 0, 2)),
        ("v24.0", (24, 0, 0)),
        ("28.0.0-rc.1", (28, 0, 0)),
        ("", None),
        (None, None),
        ("dev", None),
    ],
)
def test_engine_versions_read_as_numbers(text, expected):
    assert engine_version(text) == expected


def test_advertised_kinds_read_named_and_discrete_resources():
    node = {
        "Description": {
            "Resources": {
                "GenericResources": [
                    {"NamedResourceSpec": {"Kind": "NVIDIA-GPU", "Value": "GPU-0"}},
                    {"DiscreteResourceSpec": {"Kind": "SSD", "Value": 2}},
                ]
            }
        }
    }
    assert advertised_kinds(node) == {"NVIDIA-GPU", "SSD"}
    assert advertised_kinds({"Description": {}}) == set()
