"""torchserve_model's main() in-process against in-memory TorchServe management APIs.

FakeTorchServe is a model registry that answers like TorchServe 0.12.0 (status codes, error types and
messages as recorded from the real server): registering takes the version from the archive's
manifest, the first version of a model is its default, the default version cannot be unregistered
while others exist (403), duplicates are refused (409), registering and unregistering are refused
with 405 when the model API is disabled, a wrong token gets 400 InvalidKeyException, and a synchronous
registration whose workers fail answers 500 and keeps the model with no workers.

Each registry is served over HTTP on 127.0.0.1, so direct mode goes through requests. In service mode
a fake Docker Engine API lists the service's containers, each with its own registry, and runs each
exec's command line as a local process whose 127.0.0.1:8081 is that container's registry.
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
from ansible.module_utils import _internal as module_utils_internal
from docker.errors import APIError, DockerException
from test_swarm_join import run_module

from ansible_collections.mlfleet.serving.plugins.module_utils import _swarm
from ansible_collections.mlfleet.serving.plugins.modules import torchserve_model

# Archive (url as TorchServe takes it) -> the model name and version in its manifest, and whether its workers start.
ARCHIVES = {
    "tiny-1.0.mar": ("tiny", "1.0", True),
    "tiny-2.0.mar": ("tiny", "2.0", True),
    "tiny-3.0.mar": ("tiny", "3.0", True),
    "https://models.example/tiny-4.0.mar": ("tiny", "4.0", True),
    "broken.mar": ("broken", "1.0", False),
}
TOKEN = "management-key-8d1f"


def error(code, error_type, message):
    return code, {"code": code, "type": error_type, "message": message}


class FakeTorchServe:
    """The management API of one TorchServe, in memory."""

    def __init__(self, model_api=True, token=None):
        self.model_api = model_api
        self.token = token
        self.models = {}
        self.log = []
        self.lock = threading.Lock()

    # Set-up and inspection helpers for the tests.

    def add(self, url, workers=1, batch_size=1, max_batch_delay=100, response_timeout=120, name=None):
        manifest_name, version = ARCHIVES[url][:2]
        model = self.models.setdefault(name or manifest_name, {"default": version, "versions": {}})
        model["versions"][version] = self.entry(name or manifest_name, version, url, workers, batch_size, max_batch_delay, response_timeout)

    def entry(self, name, version, url, workers, batch_size, max_batch_delay, response_timeout):
        return {
            "modelName": name,
            "modelVersion": version,
            "modelUrl": url,
            "runtime": "python",
            "minWorkers": workers,
            "maxWorkers": workers,
            "batchSize": batch_size,
            "maxBatchDelay": max_batch_delay,
            "responseTimeout": response_timeout,
            "startupTimeout": 120,
            "loadedAtStartup": False,
            "workers": [{"id": str(9000 + i), "status": "READY"} for i in range(workers)],
            "jobQueueStatus": {"remainingCapacity": 100, "pendingRequests": 0},
        }

    def version(self, name, version):
        return self.models[name]["versions"][version]

    def default(self, name):
        return self.models[name]["default"]

    def workers(self, name, version):
        entry = self.version(name, version)
        return entry["minWorkers"], entry["maxWorkers"], len(entry["workers"])

    def writes(self):
        return [entry for entry in self.log if entry[0] != "GET"]

    # What TorchServe answers.

    def handle(self, method, path, query, authorization):
        with self.lock:
            self.log.append((method, path, query))
            if self.token and authorization != f"Bearer {self.token}":
                return error(400, "InvalidKeyException", "Token Authorization failed. Token either incorrect, expired, or not provided correctly")
            parts = path.strip("/").split("/")
            if parts[0] != "models":
                return error(404, "ResourceNotFoundException", "Requested resource is not found, please refer to API document.")
            if method in ("POST", "DELETE") and not self.model_api:
                return error(405, "MethodNotAllowedException", "Requested method is not allowed, please refer to API document.")
            if method == "GET" and len(parts) == 1:
                return 200, {"models": [{"modelName": n, "modelUrl": m["versions"][m["default"]]["modelUrl"]} for n, m in sorted(self.models.items())]}
            if method == "POST" and len(parts) == 1:
                return self.register(query)
            name = parts[1]
            if name not in self.models:
                return error(404, "ModelNotFoundException", f"Model not found: {name}")
            model = self.models[name]
            version = parts[2] if len(parts) > 2 else None
            if version not in (None, "all") and version not in model["versions"]:
                return error(404, "ModelVersionNotFoundException", f"Model version: {version} does not exist for model: {name}")
            if method == "GET":
                if version == "all":
                    return 200, list(model["versions"].values())
                return 200, [model["versions"][version or model["default"]]]
            if method == "PUT" and len(parts) == 4 and parts[3] == "set-default":
                model["default"] = version
                return 200, {"status": f'Default version successfully updated for model "{name}" to "{version}"'}
            if method == "PUT":
                return self.scale(name, model["versions"][version or model["default"]], query, version)
            if method == "DELETE":
                version = version or model["default"]
                if version == model["default"] and len(model["versions"]) > 1:
                    return error(403, "InvalidModelVersionException", f"Cannot remove default version for model {name}")
                del model["versions"][version]
                if not model["versions"]:
                    del self.models[name]
                return 200, {"status": f'Model "{name}" unregistered'}
            return error(405, "MethodNotAllowedException", "Requested method is not allowed, please refer to API document.")

    def register(self, query):
        url = query.get("url", "")
        if url not in ARCHIVES:
            if url.startswith(("http://", "https://")):
                return error(400, "DownloadArchiveException", f"Failed to download archive from: {url}")
            return error(404, "ModelNotFoundException", f"Model not found at: {url}")
        manifest_name, version, starts = ARCHIVES[url]
        name = query.get("model_name") or manifest_name
        if version in self.models.get(name, {}).get("versions", {}):
            return error(409, "ConflictStatusException", f"Model version {version} is already registered for model {name}")
        workers = int(query.get("initial_workers", 0))
        settings = {k: int(query.get(k, d)) for k, d in (("batch_size", 1), ("max_batch_delay", 100), ("response_timeout", 120))}
        model = self.models.setdefault(name, {"default": version, "versions": {}})
        model["versions"][version] = self.entry(name, version, url, workers if starts else 0, **settings)
        if not starts and workers:
            return error(500, "InternalServerException", f"Failed to start workers for model {name} version: {version}")
        more = ". Use scale workers API to add workers for the model." if not workers else ""
        return 200, {"status": f'Model "{name}" Version: {version} registered with {workers} initial workers{more}'}

    def scale(self, name, entry, query, version_in_path):
        minimum = int(query.get("min_worker", 1))
        maximum = int(query.get("max_worker", minimum))
        if maximum < minimum:
            return error(400, "BadRequestException", "max_worker cannot be less than min_worker.")
        entry.update(minWorkers=minimum, maxWorkers=maximum, workers=[{"id": str(9000 + i), "status": "READY"} for i in range(minimum)])
        suffix = f", version: {version_in_path}" if version_in_path else ""
        return 200, {"status": f"Workers scaled to {minimum} for model: {name}{suffix}"}


class Served:
    """A FakeTorchServe answering HTTP on 127.0.0.1 (a free port)."""

    def __init__(self, torchserve):
        self.torchserve = torchserve

        class Handler(BaseHTTPRequestHandler):
            def answer(self):
                parts = urlsplit(self.path)
                status, document = torchserve.handle(self.command, parts.path, dict(parse_qsl(parts.query)), self.headers.get("Authorization"))
                body = json.dumps(document, indent=2).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = do_PUT = do_DELETE = answer

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(autouse=True)
def module_warnings_in_result(monkeypatch):
    # Controller code imported by other tests makes module warnings go to the display instead of the result.
    monkeypatch.setattr(module_utils_internal, "is_controller", False)


@pytest.fixture(autouse=True)
def no_docker_daemon(monkeypatch):
    """No test reaches a real Docker daemon; the service tests install their fake nodes over this."""

    def refuse(base_url=None, **_):
        raise DockerException(f"no Docker daemon in unit tests ({base_url})")

    monkeypatch.setattr(_swarm.docker, "APIClient", refuse)


@pytest.fixture
def served():
    served = Served(FakeTorchServe())
    yield served
    served.stop()


@pytest.fixture
def ts(served):
    return served.torchserve


@pytest.fixture
def model(capsys, served):
    """Run the module against the served TorchServe; name defaults to tiny."""

    def invoke(**args):
        args.setdefault("name", "tiny")
        args.setdefault("management_url", served.url)
        # None stands for an option left out, as omit does in a task.
        return run_module(capsys, torchserve_model, **{k: v for k, v in args.items() if v is not None})

    return invoke


def writes(ts):
    """The writes, each as (method, path)."""
    return [(method, path) for method, path, _query in ts.writes()]


# state=present, direct


def test_register_then_unchanged(model, ts, served):
    registered = model(url="tiny-1.0.mar", min_workers=1, batch_size=2, diff=True)
    assert registered["rc"] == 0, registered.get("msg")
    assert registered["changed"] and registered["actions"] == ["registered tiny-1.0.mar with 1 initial workers"]
    ((method, path, query),) = ts.writes()
    assert (method, path) == ("POST", "/models")
    assert query == {"url": "tiny-1.0.mar", "model_name": "tiny", "synchronous": "true", "initial_workers": "1", "batch_size": "2"}
    assert ts.workers("tiny", "1.0") == (1, 1, 1) and ts.version("tiny", "1.0")["batchSize"] == 2
    after = {"version": "1.0", "default": True, "url": "tiny-1.0.mar", "min_workers": 1, "max_workers": 1, "batch_size": 2}
    after.update(max_batch_delay=100, response_timeout=120)
    assert registered["model"] == {"name": "tiny", "versions": [after]}
    assert registered["diff"] == {"before": {"name": "tiny", "versions": []}, "after": registered["model"]}
    assert registered["endpoint"] == served.url

    again = model(url="tiny-1.0.mar", min_workers=1, batch_size=2, diff=True)
    assert again["rc"] == 0 and not again["changed"] and again["actions"] == []
    assert again["diff"]["before"] == again["diff"]["after"] == registered["model"]
    assert len(ts.writes()) == 1


def test_check_mode_plans_the_registration_and_writes_nothing(model, ts):
    plan = model(url="tiny-1.0.mar", initial_workers=1, max_workers=2, check_mode=True, diff=True)
    assert plan["rc"] == 0 and plan["changed"]
    assert plan["actions"] == ["registered tiny-1.0.mar with 1 initial workers", "scaled version (from the archive) from 1..1 to 1..2 workers"]
    assert plan["diff"]["after"]["versions"] == [{"version": None, "default": True, "url": "tiny-1.0.mar", "min_workers": 1, "max_workers": 2}]
    assert ts.writes() == [] and ts.models == {}


def test_scale_workers_up_and_down(model, ts):
    ts.add("tiny-1.0.mar", workers=1)
    scaled = model(min_workers=2, max_workers=2, diff=True)
    assert scaled["rc"] == 0, scaled.get("msg")
    assert scaled["changed"] and scaled["actions"] == ["scaled version 1.0 from 1..1 to 2..2 workers"]
    assert ts.writes()[0] == ("PUT", "/models/tiny/1.0", {"min_worker": "2", "max_worker": "2", "synchronous": "true"})
    assert ts.workers("tiny", "1.0") == (2, 2, 2)
    assert [v["min_workers"] for v in (scaled["diff"]["before"]["versions"] + scaled["diff"]["after"]["versions"])] == [1, 2]
    assert not model(min_workers=2, max_workers=2)["changed"]

    lowered = model(max_workers=1)
    assert lowered["actions"] == ["scaled version 1.0 from 2..2 to 1..1 workers"], "a lower maximum takes the minimum down with it"
    raised = model(min_workers=3)
    assert raised["actions"] == ["scaled version 1.0 from 1..1 to 3..3 workers"], "a higher minimum takes the maximum up with it"
    kept = model(min_workers=1)
    assert kept["actions"] == ["scaled version 1.0 from 3..3 to 1..3 workers"], "the maximum stays when only the minimum is lowered"


def test_check_mode_plans_scaling_and_writes_nothing(model, ts):
    ts.add("tiny-1.0.mar", workers=1)
    plan = model(min_workers=2, check_mode=True, diff=True)
    assert plan["rc"] == 0 and plan["changed"] and plan["actions"] == ["scaled version 1.0 from 1..1 to 2..2 workers"]
    assert plan["diff"]["after"]["versions"][0]["min_workers"] == 2
    assert ts.writes() == [] and ts.workers("tiny", "1.0") == (1, 1, 1)


def test_a_new_version_is_added_and_made_the_default(model, ts):
    ts.add("tiny-1.0.mar", workers=1)
    added = model(url="tiny-2.0.mar", version="2.0", initial_workers=1, default_version=True, diff=True)
    assert added["rc"] == 0, added.get("msg")
    assert added["actions"] == ["registered tiny-2.0.mar as version 2.0 with 1 initial workers", "made version 2.0 the default"]
    assert writes(ts) == [("POST", "/models"), ("PUT", "/models/tiny/2.0/set-default")]
    assert ts.default("tiny") == "2.0" and added["model"]["versions"][0]["default"] is True
    assert not model(url="tiny-2.0.mar", version="2.0", initial_workers=1, default_version=True)["changed"]

    back = model(version="1.0", default_version=True)
    assert back["actions"] == ["made version 1.0 the default"] and ts.default("tiny") == "1.0"


def test_without_version_an_existing_model_is_managed_at_its_default_version(model, ts):
    ts.add("tiny-1.0.mar", workers=1)
    ts.add("tiny-2.0.mar", workers=1)
    result = model(url="tiny-2.0.mar", min_workers=2)
    assert result["rc"] == 0, result.get("msg")
    assert result["actions"] == ["scaled version 1.0 from 1..1 to 2..2 workers"]
    # Module warnings are process-wide: earlier tests' warnings may be listed too.
    assert (
        f"model tiny version 1.0 at {result['endpoint']} is registered from tiny-1.0.mar, not tiny-2.0.mar; "
        "url is used only to register a missing version (set another version to roll out a new archive)"
    ) in [warning["event"]["msg"] for warning in result["warnings"]]


def test_default_version_needs_a_version(model):
    refused = model(url="tiny-1.0.mar", default_version=True)
    assert refused["rc"] == 1 and "default_version is True but all of the following are missing: version" in refused["msg"]


def test_an_archive_that_carries_another_version_is_rolled_back(model, ts):
    ts.add("tiny-1.0.mar")
    refused = model(url="tiny-3.0.mar", version="2.0")
    assert refused["rc"] == 1
    assert "tiny-3.0.mar carries version 3.0 of model tiny, not version 2.0, so it was unregistered again" in refused["msg"]
    assert "torch-model-archiver --version 2.0, or set version to 3.0" in refused["msg"]
    assert writes(ts) == [("POST", "/models"), ("DELETE", "/models/tiny/3.0")]
    assert list(ts.models["tiny"]["versions"]) == ["1.0"]


def test_a_duplicate_version_is_refused_with_the_409_explained(model, ts):
    ts.add("tiny-1.0.mar")
    refused = model(url="tiny-1.0.mar", version="2.0")
    assert refused["rc"] == 1
    assert "Registering model tiny from tiny-1.0.mar failed" in refused["msg"] and "that version already exists" in refused["msg"]
    assert "Model version 1.0 is already registered for model tiny" in refused["msg"]
    assert list(ts.models["tiny"]["versions"]) == ["1.0"]


def test_registering_needs_url(model, ts):
    refused = model(min_workers=1)
    assert (
        refused["rc"] == 1
        and refused["msg"] == f"Model tiny is not registered at {refused['unfinished']['endpoint']}; set url to the archive to register it from"
    )
    ts.add("tiny-1.0.mar")
    refused = model(version="2.0")
    assert "Model tiny has no version 2.0 at" in refused["msg"]
    assert ts.writes() == []


def test_an_archive_missing_from_the_model_store_is_explained(model):
    refused = model(url="missing.mar")
    assert refused["rc"] == 1
    assert "TorchServe finds no archive missing.mar" in refused["msg"] and "Model not found at: missing.mar" in refused["msg"]


def test_workers_that_do_not_start_are_explained(model, ts):
    refused = model(name="broken", url="broken.mar", initial_workers=1)
    assert refused["rc"] == 1
    assert "Failed to start workers for model broken version: 1.0" in refused["msg"] and "model_log.log" in refused["msg"]
    assert refused["changed"] and refused["unfinished"]["actions"] == ["registered broken.mar with 1 initial workers"]


# Settings fixed at registration


def test_a_fixed_setting_that_differs_fails_naming_it(model, ts):
    ts.add("tiny-1.0.mar", workers=2, batch_size=1)
    refused = model(batch_size=4, max_batch_delay=100)
    assert refused["rc"] == 1
    assert refused["msg"] == (
        f"model tiny version 1.0 at {refused['unfinished']['endpoint']} is registered with batch_size 1, not 4. TorchServe cannot change "
        "batch_size of a registered version: set recreate=true to unregister and register it again (it serves no requests in between), "
        "or register these settings as a new version"
    )
    assert ts.writes() == []


def test_recreate_registers_the_version_again_with_its_workers(model, ts):
    ts.add("tiny-1.0.mar", workers=2)
    ts.version("tiny", "1.0")["maxWorkers"] = 3
    plan = model(batch_size=4, response_timeout=30, recreate=True, check_mode=True, diff=True)
    assert plan["rc"] == 0 and plan["changed"] and ts.writes() == []
    recreated = model(batch_size=4, response_timeout=30, recreate=True, diff=True)
    assert recreated["rc"] == 0, recreated.get("msg")
    assert recreated["actions"] == [
        "unregistered version 1.0 to change batch_size 1 -> 4, response_timeout 120 -> 30",
        "registered tiny-1.0.mar as version 1.0 with 2 initial workers",
    ]
    assert plan["actions"] == recreated["actions"] and plan["diff"]["after"] == recreated["diff"]["after"]
    assert writes(ts) == [("DELETE", "/models/tiny/1.0"), ("POST", "/models"), ("PUT", "/models/tiny/1.0")]
    post, put = [query for _method, _path, query in ts.writes()[1:]]
    assert post == {"url": "tiny-1.0.mar", "model_name": "tiny", "synchronous": "true", "initial_workers": "2", "batch_size": "4"} | {
        "max_batch_delay": "100",
        "response_timeout": "30",
    }
    assert put == {"min_worker": "2", "max_worker": "3", "synchronous": "true"}, "the previous maximum comes back"
    entry = ts.version("tiny", "1.0")
    assert (entry["batchSize"], entry["responseTimeout"], entry["minWorkers"], entry["maxWorkers"]) == (4, 30, 2, 3)
    assert not model(batch_size=4, response_timeout=30, recreate=True)["changed"]


def test_recreate_refuses_a_default_version_that_has_siblings(model, ts):
    ts.add("tiny-1.0.mar")
    ts.add("tiny-2.0.mar")
    refused = model(version="1.0", batch_size=8, recreate=True, check_mode=True)
    assert refused["rc"] == 1
    assert "it is the default version and the model also has version 2.0" in refused["msg"] and "Make another version the default first" in refused["msg"]
    assert ts.writes() == []


# state=absent


def test_absent_removes_one_version(model, ts):
    ts.add("tiny-1.0.mar")
    ts.add("tiny-2.0.mar")
    removed = model(version="2.0", state="absent", diff=True)
    assert removed["rc"] == 0 and removed["changed"] and removed["actions"] == ["unregistered version 2.0"]
    assert [v["version"] for v in removed["diff"]["before"]["versions"]] == ["2.0"] and removed["diff"]["after"]["versions"] == []
    assert list(ts.models["tiny"]["versions"]) == ["1.0"]
    assert not model(version="2.0", state="absent")["changed"]


def test_absent_refuses_the_default_version_while_others_exist(model, ts):
    ts.add("tiny-1.0.mar")
    ts.add("tiny-2.0.mar")
    refused = model(version="1.0", state="absent")
    assert refused["rc"] == 1
    assert "Cannot unregister model tiny version 1.0" in refused["msg"] and "it is the default version and the model also has version 2.0" in refused["msg"]
    assert "default_version=true on it" in refused["msg"] and "leave version out to remove every version" in refused["msg"]
    assert ts.writes() == []


def test_absent_without_version_removes_every_version_default_last(model, ts):
    for url in ("tiny-1.0.mar", "tiny-2.0.mar", "tiny-3.0.mar"):
        ts.add(url)
    ts.models["tiny"]["default"] = "2.0"
    plan = model(state="absent", check_mode=True)
    assert plan["changed"] and ts.writes() == []
    removed = model(state="absent")
    assert removed["rc"] == 0 and removed["actions"] == plan["actions"] == ["unregistered version 1.0", "unregistered version 3.0", "unregistered version 2.0"]
    assert writes(ts) == [("DELETE", "/models/tiny/1.0"), ("DELETE", "/models/tiny/3.0"), ("DELETE", "/models/tiny/2.0")]
    assert ts.models == {}
    assert not model(state="absent")["changed"]


# The management API itself


def test_model_api_disabled_refuses_registration_but_scales(model, ts):
    ts.model_api = False
    refused = model(url="tiny-1.0.mar")
    assert refused["rc"] == 1
    assert "the model API is disabled" in refused["msg"] and "enable_model_api=true" in refused["msg"]
    assert "Registering model tiny from tiny-1.0.mar" in refused["msg"]
    ts.add("tiny-1.0.mar")
    assert model(min_workers=2)["changed"]
    refused = model(state="absent")
    assert refused["rc"] == 1 and "Unregistering model tiny version 1.0" in refused["msg"] and "model API is disabled" in refused["msg"]


def test_a_token_is_sent_and_a_refused_one_is_never_shown(model, ts, monkeypatch):
    ts.token = TOKEN
    ts.add("tiny-1.0.mar")
    assert model(management_token=TOKEN, min_workers=2)["changed"]
    refused = model(management_token="stale-key", min_workers=3)
    assert refused["rc"] == 1 and "management token was refused" in refused["msg"] and "stale-key" not in json.dumps(refused)
    monkeypatch.setenv("TORCHSERVE_MANAGEMENT_TOKEN", TOKEN)
    assert model(min_workers=3)["changed"]


def test_an_unreachable_endpoint_fails_clearly(model, served):
    served.stop()
    refused = model(url="tiny-1.0.mar")
    assert refused["rc"] == 1
    assert f"the TorchServe management API at {served.url} is unreachable" in refused["msg"] and "management_address" in refused["msg"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"min_workers": 3, "max_workers": 2}, "min_workers (3) must not exceed max_workers (2)"),
        ({"batch_size": -1}, "batch_size must not be negative, not -1"),
        ({"service": "torchserve"}, "parameters are mutually exclusive: management_url|service"),
        ({"management_url": None}, "one of the following is required: management_url, service"),
    ],
)
def test_contradicting_options_fail_before_any_request(model, ts, args, message):
    refused = model(**args)
    assert refused["rc"] == 1 and message in refused["msg"]
    assert ts.log == []


# service mode


def sdk_call(method):
    """Bind each call to docker.APIClient's own signature, so a call the SDK would reject fails here too.

    What crosses the API is JSON, except the output of an exec, which the SDK returns as bytes.
    """
    signature = inspect.signature(getattr(docker.APIClient, method.__name__))

    def checked(self, *args, **kwargs):
        signature.bind(self, *args, **kwargs)
        value = method(self, *args, **kwargs)
        return value if method.__name__ == "exec_start" else json.loads(json.dumps(value))

    checked.__name__ = method.__name__
    return checked


class Node:
    """The Docker Engine API of one swarm node; each of its containers runs its own FakeTorchServe.

    An exec runs its command line as a local process, with the exec's environment, in which the
    container's management address (http://127.0.0.1:8081) is that container's served registry.
    """

    def __init__(self, name):
        self.name = name
        self.url = f"unix:///run/fake/{name}.sock"
        self.records = []
        self.execs = {}
        self.timeouts = []
        self.opened = self.closed = 0

    def run(self, service, slot, state="running"):
        served = Served(FakeTorchServe())
        task_id = f"{service[:2]}{slot}task{len(self.records)}".ljust(25, "x")
        labels = {
            "com.docker.swarm.service.name": service,
            "com.docker.swarm.task.name": f"{service}.{slot}",
            "com.docker.swarm.task.id": task_id,
        }
        name = f"{service}.{slot}.{task_id}"
        self.records.append({"Id": f"{len(self.records):02d}".ljust(64, "c"), "Names": [f"/{name}"], "State": state, "Labels": labels, "served": served})
        return served.torchserve

    def container(self, key):
        return next(r for r in self.records if key in (r["Id"], r["Names"][0].lstrip("/")))

    @sdk_call
    def info(self):
        return {"Name": self.name, "Swarm": {"LocalNodeState": "active"}}

    @sdk_call
    def containers(self, quiet=False, all=False, trunc=False, latest=False, since=None, before=None, limit=-1, size=False, filters=None):
        wanted = dict(label.split("=", 1) for label in filters.get("label", []))
        found = [r for r in self.records if r["State"] == filters.get("status", r["State"])]
        found = [r for r in found if builtins.all(r["Labels"].get(k) == v for k, v in wanted.items())]
        return [{k: v for k, v in r.items() if k != "served"} for r in found]

    @sdk_call
    def exec_create(
        self, container, cmd, stdout=True, stderr=True, stdin=False, tty=False, privileged=False, user="", environment=None, workdir=None, detach_keys=None
    ):
        record = self.container(container)
        if record["State"] != "running":
            raise APIError("409 Client Error", explanation=f"Container {container} is not running")
        exec_id = f"exec{len(self.execs)}"
        self.execs[exec_id] = {"container": record["Names"][0].lstrip("/"), "cmd": list(cmd), "environment": environment}
        return {"Id": exec_id}

    @sdk_call
    def exec_start(self, exec_id, detach=False, tty=False, stream=False, socket=False, demux=False):
        run = self.execs[exec_id]
        request = json.loads(run["cmd"][3])
        request["url"] = request["url"].replace("http://127.0.0.1:8081", self.container(run["container"])["served"].url, 1)
        argv = [sys.executable, run["cmd"][1], run["cmd"][2], json.dumps(request)]
        finished = subprocess.run(argv, env={"PATH": "/usr/bin:/bin", **(run["environment"] or {})}, capture_output=True, timeout=30, check=False)
        run["exit"] = finished.returncode
        return (finished.stdout, finished.stderr) if demux else finished.stdout + finished.stderr

    @sdk_call
    def exec_inspect(self, exec_id):
        return {"ID": exec_id, "ExitCode": self.execs[exec_id]["exit"], "Running": False}

    def close(self):
        self.closed += 1


@pytest.fixture
def nodes(monkeypatch):
    """Nodes by name; w1 runs replicas 1 and 3 of torchserve (and one that exited) and the edge proxy, w2 runs none."""
    cluster = {name: Node(name) for name in ("w1", "w2")}
    cluster["w1"].run("torchserve", 3)
    cluster["w1"].run("torchserve", 1)
    cluster["w1"].run("edge", 1)
    cluster["w1"].run("torchserve", 2, state="exited")

    def api_client(base_url=None, version=None, timeout=60, **_):
        node = next((n for n in cluster.values() if n.url == base_url), None)
        if node is None:
            raise DockerException("Error while fetching server API version: ('Connection aborted.', FileNotFoundError(2, 'No such file or directory'))")
        node.opened += 1
        node.timeouts.append(timeout)
        return node

    monkeypatch.setattr(_swarm.docker, "APIClient", api_client)
    yield cluster
    for node in cluster.values():
        for record in node.records:
            record["served"].stop()


@pytest.fixture
def replicas(capsys, nodes):
    def invoke(node="w1", **args):
        args.setdefault("name", "tiny")
        args.setdefault("docker_host", nodes[node].url)
        return run_module(capsys, torchserve_model, service="torchserve", **args)

    return invoke


def torchserve_of(node, name):
    return node.container(name)["served"].torchserve


def test_every_replica_on_the_node_gets_the_change_then_unchanged(nodes, replicas):
    w1 = nodes["w1"]
    names = [r["Names"][0].lstrip("/") for r in w1.records]
    done = replicas(url="tiny-1.0.mar", min_workers=2, diff=True)
    assert done["rc"] == 0, done.get("msg")
    assert done["changed"] and done["node"] == "w1"
    assert [(r["container"], r["task"], r["changed"]) for r in done["replicas"]] == [(names[1], "torchserve.1", True), (names[0], "torchserve.3", True)]
    assert done["replicas"][0]["actions"] == ["registered tiny-1.0.mar with 2 initial workers"]
    assert done["replicas"][0]["after"]["versions"][0]["min_workers"] == 2
    assert [d["before_header"] for d in done["diff"]] == [f"{names[1]} (before)", f"{names[0]} (before)"]
    for name in names[:2]:
        assert torchserve_of(w1, name).workers("tiny", "1.0") == (2, 2, 2)
    assert torchserve_of(w1, names[2]).log == [] and torchserve_of(w1, names[3]).log == [], "other services and stopped tasks are left alone"
    assert w1.opened == w1.closed == 1

    again = replicas(url="tiny-1.0.mar", min_workers=2)
    assert again["rc"] == 0 and not again["changed"] and [r["changed"] for r in again["replicas"]] == [False, False]


def test_only_the_replicas_that_differ_change(nodes, replicas):
    w1 = nodes["w1"]
    converged = w1.records[0]["Names"][0].lstrip("/")
    torchserve_of(w1, converged).add("tiny-1.0.mar", workers=2)
    done = replicas(url="tiny-1.0.mar", min_workers=2)
    assert done["rc"] == 0 and done["changed"]
    assert {r["container"]: r["changed"] for r in done["replicas"]}[converged] is False
    assert torchserve_of(w1, converged).writes() == []


def test_check_mode_plans_every_replica_and_writes_nothing(nodes, replicas):
    plan = replicas(url="tiny-1.0.mar", min_workers=1, check_mode=True)
    assert plan["rc"] == 0 and plan["changed"] and all(r["changed"] for r in plan["replicas"])
    assert all(record["served"].torchserve.writes() == [] for record in nodes["w1"].records)


def test_a_node_without_replicas_fails_unless_allowed(nodes, replicas):
    refused = replicas(node="w2", url="tiny-1.0.mar")
    assert refused["rc"] == 1
    assert refused["msg"].startswith("Service torchserve has no running container on node w2 (unix:///run/fake/w2.sock)")
    assert "allow_no_replicas=true" in refused["msg"]
    allowed = replicas(node="w2", url="tiny-1.0.mar", allow_no_replicas=True, diff=True)
    assert allowed["rc"] == 0 and not allowed["changed"] and allowed["replicas"] == [] and allowed["node"] == "w2"


def test_the_token_reaches_the_container_in_the_exec_environment_only(nodes, replicas):
    for record in nodes["w1"].records:
        record["served"].torchserve.token = TOKEN
    done = replicas(url="tiny-1.0.mar", management_token=TOKEN)
    assert done["rc"] == 0, done.get("msg")
    runs = list(nodes["w1"].execs.values())
    assert runs and all(run["environment"] == {"MLFLEET_TORCHSERVE_TOKEN": TOKEN} for run in runs)
    assert not any(TOKEN in part for run in runs for part in run["cmd"])
    assert TOKEN not in json.dumps(done)


def test_a_failing_replica_is_named_and_the_done_ones_reported(nodes, replicas):
    w1 = nodes["w1"]
    second = w1.records[0]["Names"][0].lstrip("/")
    torchserve_of(w1, second).model_api = False
    failed = replicas(url="tiny-1.0.mar")
    assert failed["rc"] == 1 and failed["changed"]
    assert f"in container {second} (Docker API {w1.url})" in failed["msg"] and "model API is disabled" in failed["msg"]
    assert [r["task"] for r in failed["replicas"]] == ["torchserve.1"] and failed["replicas"][0]["changed"]
    assert failed["unfinished"]["endpoint"].endswith(f"in container {second} (Docker API {w1.url})")


def test_the_docker_api_timeout_covers_a_request(nodes, replicas):
    replicas(url="tiny-1.0.mar", timeout=300)
    replicas(url="tiny-1.0.mar", timeout=10, api_timeout=90)
    assert nodes["w1"].timeouts == [315, 90]


def test_an_unreachable_node_fails_clearly(replicas):
    refused = replicas(docker_host="unix:///run/fake/gone.sock", url="tiny-1.0.mar")
    assert refused["rc"] == 1 and "Cannot reach the Docker API at unix:///run/fake/gone.sock" in refused["msg"]
