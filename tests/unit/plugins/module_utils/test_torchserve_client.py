"""The TorchServe management client over both transports, against a scripted HTTP server on 127.0.0.1.

The server answers each request with the status and body a test scripts, in the form TorchServe 0.12
answers (the error documents were recorded from a real TorchServe 0.12.0). The container transport runs
its real in-container script with this machine's Python: the fake Docker API below executes the exec's
command line as a local process, with the exec's environment, so the script's HTTP, JSON and token
handling are what is tested.
"""

from __future__ import annotations

import builtins
import inspect
import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, urlsplit

import docker
import pytest
from docker.errors import APIError

from ansible_collections.mlfleet.serving.plugins.module_utils._swarm import DockerEndpoint
from ansible_collections.mlfleet.serving.plugins.module_utils._torchserve import (
    EXEC_SCRIPT,
    TOKEN_VARIABLE,
    ContainerTransport,
    HttpTransport,
    ManagementClient,
    TorchServeError,
    service_containers,
    task_name,
)

TOKEN = "s3cr3t-management-key"
DESCRIBED = {
    "modelName": "tiny",
    "modelVersion": "1.0",
    "modelUrl": "tiny-1.0.mar",
    "minWorkers": 1,
    "maxWorkers": 1,
    "batchSize": 1,
    "maxBatchDelay": 100,
    "responseTimeout": 120,
    "workers": [{"id": "9000", "status": "READY"}],
}


def error(code, error_type, message):
    return code, {"code": code, "type": error_type, "message": message}


NOT_FOUND = error(404, "ModelNotFoundException", "Model not found: tiny")
DISABLED = error(405, "MethodNotAllowedException", "Requested method is not allowed, please refer to API document.")
CONFLICT = error(409, "ConflictStatusException", "Model version 1.0 is already registered for model tiny")
BAD_TOKEN = error(400, "InvalidKeyException", "Token Authorization failed. Token either incorrect, expired, or not provided correctly")
DEFAULT_VERSION = error(403, "InvalidModelVersionException", "Cannot remove default version for model tiny")
NO_ARCHIVE = error(404, "ModelNotFoundException", "Model not found at: missing.mar")
NO_WORKERS = error(500, "InternalServerException", "Failed to start workers for model tiny version: 1.0")


class ScriptedApi:
    """An HTTP server whose answers the test scripts: ``answers[(method, path)] = (status, document)``."""

    def __init__(self):
        self.answers = {}
        self.requests = []
        self.delay = None
        api = self

        class Handler(BaseHTTPRequestHandler):
            def answer(self):
                parts = urlsplit(self.path)
                api.requests.append(
                    {"method": self.command, "path": parts.path, "query": dict(parse_qsl(parts.query)), "authorization": self.headers.get("Authorization")}
                )
                if api.delay:
                    api.delay.wait(10)
                status, document = api.answers.get((self.command, parts.path), NOT_FOUND)
                body = json.dumps(document, indent=2).encode()
                try:
                    self.send_response(status)
                    self.send_header("content-type", "application/json")
                    self.send_header("content-length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up waiting, as the timeout test wants

            do_GET = do_POST = do_PUT = do_DELETE = answer

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def stop(self):
        if self.delay:
            self.delay.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def api():
    server = ScriptedApi()
    yield server
    server.stop()


def closed_port_url():
    server = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    port = server.server_address[1]
    server.server_close()
    return f"http://127.0.0.1:{port}"


def sdk_checked(method):
    """Bind each call to docker.APIClient's own signature, so a call the SDK would reject fails here too."""
    signature = inspect.signature(getattr(docker.APIClient, method.__name__))

    def checked(self, *args, **kwargs):
        signature.bind(self, *args, **kwargs)
        return method(self, *args, **kwargs)

    checked.__name__ = method.__name__
    return checked


class ExecApi:
    """The exec part of a Docker Engine API whose containers run their commands on this machine."""

    def __init__(self, containers=()):
        self.containers_listed = list(containers)
        self.execs = {}
        self.exec_failure = None
        self.missing_python = False

    @sdk_checked
    def containers(self, quiet=False, all=False, trunc=False, latest=False, since=None, before=None, limit=-1, size=False, filters=None):
        self.filters = filters
        wanted = dict(label.split("=", 1) for label in filters["label"])
        return [c for c in self.containers_listed if c["State"] == filters["status"] and builtins.all(c["Labels"].get(k) == v for k, v in wanted.items())]

    @sdk_checked
    def exec_create(
        self, container, cmd, stdout=True, stderr=True, stdin=False, tty=False, privileged=False, user="", environment=None, workdir=None, detach_keys=None
    ):
        if self.exec_failure:
            raise self.exec_failure
        exec_id = f"exec-{len(self.execs) + 1}"
        self.execs[exec_id] = {"container": container, "cmd": cmd, "environment": environment}
        return {"Id": exec_id}

    @sdk_checked
    def exec_start(self, exec_id, detach=False, tty=False, stream=False, socket=False, demux=False):
        assert demux, "stdout and stderr apart, so the script's answer is not mixed with warnings"
        record = self.execs[exec_id]
        if self.missing_python:
            record["exit"] = 127
            return None, b'OCI runtime exec failed: exec failed: unable to start container process: exec: "python3": executable file not found in $PATH'
        argv = [sys.executable if record["cmd"][0] == "python3" else record["cmd"][0], *record["cmd"][1:]]
        environment = {"PATH": "/usr/bin:/bin", **(record["environment"] or {})}
        finished = subprocess.run(argv, env=environment, capture_output=True, timeout=30, check=False)
        record["exit"] = finished.returncode
        return finished.stdout, finished.stderr

    @sdk_checked
    def exec_inspect(self, exec_id):
        return {"ExitCode": self.execs[exec_id]["exit"], "ProcessConfig": {"entrypoint": self.execs[exec_id]["cmd"][0]}}


def docker_endpoint(exec_api):
    endpoint = DockerEndpoint("ssh://mlops@192.0.2.21")
    endpoint.client = exec_api
    return endpoint


CONTAINER = {"Id": "c0ffee" * 10, "Names": ["/torchserve.1.abcdef"], "State": "running", "Labels": {"com.docker.swarm.service.name": "torchserve"}}


@pytest.fixture(params=["http", "container"])
def client(request, api):
    """A client for the scripted server, once calling it directly and once from inside a container."""

    def make(token=None, timeout=10, base_url=None):
        if request.param == "http":
            return ManagementClient(HttpTransport(base_url or api.url, token=token, timeout=timeout))
        return ManagementClient(ContainerTransport(docker_endpoint(ExecApi()), CONTAINER, base_url=base_url or api.url, token=token, timeout=timeout))

    make.kind = request.param
    return make


def test_describe_and_versions(api, client):
    api.answers[("GET", "/models/tiny")] = 200, [DESCRIBED]
    api.answers[("GET", "/models/tiny/all")] = 200, [DESCRIBED, {**DESCRIBED, "modelVersion": "2.0"}]
    ts = client()
    assert ts.describe("tiny") == DESCRIBED
    assert [d["modelVersion"] for d in ts.versions("tiny")] == ["1.0", "2.0"]
    assert ts.describe("tiny", "3.0") is None, "404 of a version is an answer: there is none"
    assert ts.versions("other") == []
    assert [r["path"] for r in api.requests] == ["/models/tiny", "/models/tiny/all", "/models/tiny/3.0", "/models/other/all"]


def test_register_sends_only_the_options_given_and_waits_for_workers(api, client):
    api.answers[("POST", "/models")] = 200, {"status": 'Model "tiny" Version: 1.0 registered with 2 initial workers'}
    answer = client().register("tiny", "tiny-1.0.mar", initial_workers=2, batch_size=4)
    assert answer["status"].startswith('Model "tiny" Version: 1.0 registered')
    (sent,) = api.requests
    assert sent["method"] == "POST" and sent["authorization"] is None
    assert sent["query"] == {"url": "tiny-1.0.mar", "model_name": "tiny", "synchronous": "true", "initial_workers": "2", "batch_size": "4"}


def test_scale_set_default_and_unregister_paths(api, client):
    api.answers[("PUT", "/models/tiny/1.0")] = 200, {"status": "Workers scaled to 2 for model: tiny, version: 1.0"}
    api.answers[("PUT", "/models/tiny/2.0/set-default")] = 200, {"status": 'Default version successfully updated for model "tiny" to "2.0"'}
    api.answers[("DELETE", "/models/tiny/1.0")] = 200, {"status": 'Model "tiny" unregistered'}
    ts = client()
    ts.scale("tiny", "1.0", 2, 3)
    ts.set_default("tiny", "2.0")
    ts.unregister("tiny", "1.0")
    assert [(r["method"], r["path"], r["query"]) for r in api.requests] == [
        ("PUT", "/models/tiny/1.0", {"min_worker": "2", "max_worker": "3", "synchronous": "true"}),
        ("PUT", "/models/tiny/2.0/set-default", {}),
        ("DELETE", "/models/tiny/1.0", {}),
    ]


def test_the_token_travels_as_a_bearer_header(api, client):
    api.answers[("GET", "/models/tiny")] = 200, [DESCRIBED]
    client(token=TOKEN).describe("tiny")
    assert api.requests[0]["authorization"] == f"Bearer {TOKEN}"


@pytest.mark.parametrize(
    ("answer", "call", "phrases"),
    [
        (
            DISABLED,
            "register",
            ["Registering model tiny from tiny-1.0.mar failed", "model API is disabled", "enable_model_api=true", "scaling and set-default work"],
        ),
        (DISABLED, "unregister", ["Unregistering model tiny version 1.0", "enable_model_api=true"]),
        (CONFLICT, "register", ["already exists", "Model version 1.0 is already registered for model tiny", "torch-model-archiver --version"]),
        (NO_ARCHIVE, "register", ["finds no archive tiny-1.0.mar", "Model not found at: missing.mar", "model store itself"]),
        (NO_WORKERS, "register", ["Failed to start workers", "model_log.log", "recreate=true"]),
        (NOT_FOUND, "scale", ["Scaling model tiny version 1.0 to 2..2 workers failed", "no such model tiny version 1.0"]),
        (DEFAULT_VERSION, "unregister", ["Cannot remove default version for model tiny", "make another version the default first"]),
        (BAD_TOKEN, "scale", ["management token was refused", "key_file.json", "disable_token_authorization=true"]),
        (error(503, "ServiceUnavailableException", "Model tiny has no worker to serve inference request."), "scale", ["HTTP 503 ServiceUnavailableException"]),
    ],
)
def test_errors_name_the_model_the_endpoint_and_the_fix(api, client, answer, call, phrases):
    for key in (("POST", "/models"), ("DELETE", "/models/tiny/1.0"), ("PUT", "/models/tiny/1.0")):
        api.answers[key] = answer
    ts = client(token=TOKEN)
    calls = {
        "register": lambda: ts.register("tiny", "tiny-1.0.mar"),
        "unregister": lambda: ts.unregister("tiny", "1.0"),
        "scale": lambda: ts.scale("tiny", "1.0", 2, 2),
    }
    with pytest.raises(TorchServeError) as failed:
        calls[call]()
    message = str(failed.value)
    assert failed.value.status == answer[0]
    for phrase in [*phrases, ts.endpoint]:
        assert phrase in message
    assert TOKEN not in message


def test_an_endpoint_that_refuses_connections_is_unreachable(client):
    ts = client(base_url=closed_port_url())
    with pytest.raises(TorchServeError) as failed:
        ts.describe("tiny")
    message = str(failed.value)
    assert "Describing model tiny failed" in message and "unreachable" in message and ts.endpoint in message
    assert "management_address" in message


def test_an_endpoint_that_does_not_answer_in_time_is_unreachable(api, client):
    api.delay = threading.Event()
    with pytest.raises(TorchServeError) as failed:
        client(timeout=1).describe("tiny")
    assert "unreachable" in str(failed.value)
    assert "within 1 s" in str(failed.value) or "timed out" in str(failed.value)


def test_a_management_url_must_be_http():
    with pytest.raises(TorchServeError, match="not an http:// or https:// URL"):
        HttpTransport("127.0.0.1:8081")


# Inside a container


def test_the_container_runs_the_script_with_the_token_in_its_environment_only(api):
    api.answers[("GET", "/models/tiny")] = 200, [DESCRIBED]
    exec_api = ExecApi()
    ts = ManagementClient(ContainerTransport(docker_endpoint(exec_api), CONTAINER, base_url=api.url, token=TOKEN))
    assert ts.describe("tiny") == DESCRIBED
    assert len(exec_api.execs) == 1
    record = exec_api.execs["exec-1"]
    assert record["container"] == CONTAINER["Id"]
    assert record["cmd"][:3] == ["python3", "-c", EXEC_SCRIPT]
    assert json.loads(record["cmd"][3]) == {"method": "GET", "url": f"{api.url}/models/tiny", "timeout": 120}
    assert record["environment"] == {TOKEN_VARIABLE: TOKEN}
    assert not any(TOKEN in part for part in record["cmd"])
    assert api.requests[0]["authorization"] == f"Bearer {TOKEN}"
    assert ts.endpoint == f"{api.url} in container torchserve.1.abcdef (Docker API ssh://mlops@192.0.2.21)"


def test_the_script_ignores_proxies_set_in_the_container(api):
    api.answers[("GET", "/models/tiny")] = 200, [DESCRIBED]
    exec_api = ExecApi()
    transport = ContainerTransport(docker_endpoint(exec_api), CONTAINER, base_url=api.url)
    original = exec_api.exec_create

    def with_proxy(container, cmd, **kwargs):
        kwargs["environment"] = {"http_proxy": closed_port_url(), "HTTP_PROXY": closed_port_url()}
        return original(container, cmd, **kwargs)

    exec_api.exec_create = with_proxy
    assert ManagementClient(transport).describe("tiny") == DESCRIBED


def test_an_image_without_python_says_so(api):
    exec_api = ExecApi()
    exec_api.missing_python = True
    ts = ManagementClient(ContainerTransport(docker_endpoint(exec_api), CONTAINER, base_url=api.url))
    with pytest.raises(TorchServeError) as failed:
        ts.describe("tiny")
    message = str(failed.value)
    assert "Running python3 in container torchserve.1.abcdef exited 127" in message
    assert "executable file not found" in message and "container_python" in message


def test_a_docker_api_error_names_the_container(api):
    exec_api = ExecApi()
    exec_api.exec_failure = APIError("409 Client Error", explanation="Container c0ffee is not running")
    ts = ManagementClient(ContainerTransport(docker_endpoint(exec_api), CONTAINER, base_url=api.url))
    with pytest.raises(TorchServeError) as failed:
        ts.versions("tiny")
    message = str(failed.value)
    assert "Describing model tiny failed" in message and "container torchserve.1.abcdef" in message
    assert "Container c0ffee is not running" in message and "ssh://mlops@192.0.2.21" in message


def test_service_containers_are_the_running_ones_of_that_service():
    def container(name, service, state="running"):
        labels = {"com.docker.swarm.service.name": service, "com.docker.swarm.task.name": name.rsplit(".", 1)[0]}
        return {"Id": name, "Names": [f"/{name}"], "State": state, "Labels": labels}

    exec_api = ExecApi(
        [container("torchserve.2.bbb", "torchserve"), container("edge.1.ccc", "edge"), container("torchserve.1.aaa", "torchserve"),
         container("torchserve.3.ddd", "torchserve", state="exited")]
    )  # fmt: skip
    found = service_containers(docker_endpoint(exec_api), "torchserve")
    assert [c["Id"] for c in found] == ["torchserve.1.aaa", "torchserve.2.bbb"]
    assert exec_api.filters == {"label": ["com.docker.swarm.service.name=torchserve"], "status": "running"}
    assert [task_name(c) for c in found] == ["torchserve.1", "torchserve.2"]
