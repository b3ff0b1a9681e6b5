"""torchserve_model against a real standalone TorchServe 0.12 that the tests start on 127.0.0.1.

The model is a TorchScript nn.Linear(4, 2) with a minimal handler, packaged here with
torch-model-archiver as versions 1.0 and 2.0. One server with the model API enabled serves most tests
(each starts from an empty registry); one more server with the model API disabled shows the 405 path.
Each server is a process group of its own (the torchserve launcher, its Java frontend and the Python
workers), started here and stopped here by its id. The happy path runs through ansible-playbook;
the rest calls the module's main() in-process.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest
import requests
from ansible.module_utils.testing import patch_module_args

REPO_ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
TORCHSERVE = BIN / "torchserve"
ARCHIVER = BIN / "torch-model-archiver"
START_TIMEOUT = 180

pytestmark = pytest.mark.skipif(
    not (TORCHSERVE.exists() and ARCHIVER.exists() and shutil.which("java")), reason="needs torchserve, torch-model-archiver and Java 17"
)

HANDLER = '''\
"""Serves a TorchScript model: each request body is a JSON list of 4 numbers; the answer is its 2 outputs."""
import json
import os

import torch

_model = None


def handle(data, context):
    global _model
    if _model is None:
        properties = context.system_properties
        _model = torch.jit.load(os.path.join(properties["model_dir"], context.manifest["model"]["serializedFile"]))
    if data is None:
        return None
    rows = [json.loads(request.get("body") or request.get("data")) for request in data]
    with torch.no_grad():
        return _model(torch.tensor(rows, dtype=torch.float32)).tolist()
'''


def run(args, timeout=300, **kwargs):
    result = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout, check=False, **kwargs)
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))} exited {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}")
    return result


@pytest.fixture(scope="module")
def model_store(tmp_path_factory):
    """A model store with tiny-1.0.mar and tiny-2.0.mar: model tiny, versions 1.0 and 2.0 of the same network."""
    torch = pytest.importorskip("torch")
    work = tmp_path_factory.mktemp("archives")
    torch.manual_seed(0)
    with warnings.catch_warnings():
        # TorchScript is what TorchServe's TorchScript handlers load; its deprecation notice is not this test's concern.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(torch.nn.Linear(4, 2)).save(str(work / "linear.pt"))
    (work / "handler.py").write_text(HANDLER)
    store = tmp_path_factory.mktemp("model_store")
    for version in ("1.0", "2.0"):
        export = work / version
        export.mkdir()
        run([ARCHIVER, "--model-name", "tiny", "--version", version, "--serialized-file", work / "linear.pt", "--handler", work / "handler.py",
             "--export-path", export])  # fmt: skip
        (export / "tiny.mar").rename(store / f"tiny-{version}.mar")
    return store


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class TorchServe:
    """One TorchServe in a directory of its own, bound to 127.0.0.1 on free ports."""

    def __init__(self, root, store, model_api=True, load_models=None):
        self.root = root
        self.management_url = f"http://127.0.0.1:{free_port()}"
        tmp = root / "tmp"
        tmp.mkdir(parents=True)
        lines = [
            f"inference_address=http://127.0.0.1:{free_port()}",
            f"management_address={self.management_url}",
            f"metrics_address=http://127.0.0.1:{free_port()}",
            # TorchServe also serves gRPC, by default on 7070/7071: a second server on the machine fails on those.
            "grpc_inference_address=127.0.0.1",
            f"grpc_inference_port={free_port()}",
            "grpc_management_address=127.0.0.1",
            f"grpc_management_port={free_port()}",
            f"model_store={store}",
            f"enable_model_api={'true' if model_api else 'false'}",
            # A loopback test server that only this test reaches: no token to hand around.
            "disable_token_authorization=true",
            "default_workers_per_model=1",
        ]
        if load_models:
            lines.append(f"load_models={load_models}")
        config = root / "config.properties"
        config.write_text("\n".join(lines) + "\n")
        # TMPDIR keeps the launcher's PID file, unpacked models and worker sockets in this directory.
        env = {**os.environ, "TMPDIR": str(tmp), "LOG_LOCATION": str(root / "logs"), "METRICS_LOCATION": str(root / "logs"), "OMP_NUM_THREADS": "1"}
        self.console = open(root / "console.log", "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [TORCHSERVE, "--start", "--foreground", "--ts-config", config, "--model-store", store, "--ncs"],
            cwd=root,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self.console,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            self.wait_ready(load_models)
        except BaseException:
            self.stop()
            raise

    def wait_ready(self, load_models):
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"torchserve exited {self.process.returncode} before it answered:\n{self.log_tail()}")
            try:
                listed = requests.get(f"{self.management_url}/models", timeout=2).json()["models"]
                if not load_models or listed:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.5)
        raise AssertionError(f"torchserve did not answer within {START_TIMEOUT} s:\n{self.log_tail()}")

    def log_tail(self):
        return (self.root / "console.log").read_text(errors="replace")[-4000:]

    def stop(self):
        """Stop this server's process group: the launcher, the Java frontend and its workers."""
        group = self.process.pid
        try:
            os.killpg(group, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            pass
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                os.killpg(group, 0)
            except ProcessLookupError:
                break
            time.sleep(0.2)
        else:
            os.killpg(group, signal.SIGKILL)
        if self.process.poll() is None:
            self.process.wait(10)
        self.console.close()

    # Reading the server directly, to check what the module did.

    def get(self, path):
        response = requests.get(f"{self.management_url}{path}", timeout=30)
        return response.json() if response.status_code == 200 else None

    def describe(self, version=None):
        found = self.get("/models/tiny" + (f"/{version}" if version else ""))
        return found[0] if found else None

    def versions(self):
        return sorted(d["modelVersion"] for d in self.get("/models/tiny/all") or [])

    def clear(self):
        for name in [m["modelName"] for m in self.get("/models")["models"]]:
            default = self.get(f"/models/{name}")[0]["modelVersion"]
            versions = [d["modelVersion"] for d in self.get(f"/models/{name}/all")]
            for version in sorted(v for v in versions if v != default) + [default]:
                requests.delete(f"{self.management_url}/models/{name}/{version}", timeout=60).raise_for_status()


@pytest.fixture(scope="module")
def server(tmp_path_factory, model_store):
    started = TorchServe(tmp_path_factory.mktemp("torchserve"), model_store)
    yield started
    started.stop()


@pytest.fixture
def ts(server):
    server.clear()
    return server


def run_module(capsys, check_mode=False, **args):
    if check_mode:
        args["_ansible_check_mode"] = True
    capsys.readouterr()
    # Imported here, not at the top: importing the collection before the unit tests' collection loader is set up
    # breaks the collection of every later test file.
    from ansible_collections.mlfleet.serving.plugins.modules import torchserve_model

    with patch_module_args(args):
        with pytest.raises(SystemExit) as exited:
            torchserve_model.main()
    result = json.loads(capsys.readouterr().out)
    result["rc"] = exited.value.code
    return result


@pytest.fixture
def model(capsys, ts):
    def invoke(**args):
        args.setdefault("name", "tiny")
        args.setdefault("management_url", ts.management_url)
        return run_module(capsys, **args)

    return invoke


def workers(described):
    return described["minWorkers"], described["maxWorkers"], [w["status"] for w in described["workers"]]


def test_playbook_registers_scales_and_then_changes_nothing(ts, tmp_path):
    playbook = tmp_path / "model.yml"
    playbook.write_text(
        textwrap.dedent(
            f"""\
            - name: Manage a model on a standalone TorchServe
              hosts: localhost
              gather_facts: false
              module_defaults:
                mlfleet.serving.torchserve_model:
                  management_url: {ts.management_url}
                  name: tiny
                  url: tiny-1.0.mar
              tasks:
                - name: Register tiny with one worker
                  mlfleet.serving.torchserve_model:
                    min_workers: 1
                    batch_size: 2
                  register: registered

                - name: Register it again
                  mlfleet.serving.torchserve_model:
                    min_workers: 1
                    batch_size: 2
                  register: again

                - name: Scale it to two workers
                  mlfleet.serving.torchserve_model:
                    min_workers: 2
                    max_workers: 2
                  register: scaled

                - name: Scale it to two workers again
                  mlfleet.serving.torchserve_model:
                    min_workers: 2
                    max_workers: 2
                  register: scaled_again

                - name: Check what changed
                  ansible.builtin.assert:
                    that:
                      - registered is changed
                      - registered.model.versions[0].version == "1.0"
                      - registered.model.versions[0].batch_size == 2
                      - again is not changed
                      - scaled is changed
                      - scaled.actions == ["scaled version 1.0 from 1..1 to 2..2 workers"]
                      - scaled_again is not changed
            """
        )
    )
    env = {**os.environ, "ANSIBLE_COLLECTIONS_PATH": os.environ.get("ANSIBLE_COLLECTIONS_PATH", str(REPO_ROOT / ".ansible" / "collections"))}
    env.update(ANSIBLE_NOCOLOR="1", ANSIBLE_LOCALHOST_WARNING="false", ANSIBLE_INVENTORY_UNPARSED_WARNING="false")
    played = run(
        ["ansible-playbook", "-i", "localhost,", "-c", "local", "-e", f"ansible_python_interpreter={sys.executable}", "--diff", playbook],
        env=env,
        cwd=tmp_path,
    )
    assert "localhost                  : ok=5    changed=2    unreachable=0    failed=0" in played.stdout, played.stdout
    assert workers(ts.describe("1.0")) == (2, 2, ["READY", "READY"])
    assert ts.describe("1.0")["batchSize"] == 2


def test_check_mode_changes_nothing(model, ts):
    assert model(url="tiny-1.0.mar", min_workers=1)["changed"]
    plan = model(min_workers=2, check_mode=True)
    assert plan["rc"] == 0 and plan["changed"] and plan["actions"] == ["scaled version 1.0 from 1..1 to 2..2 workers"]
    plan = model(url="tiny-2.0.mar", version="2.0", default_version=True, check_mode=True)
    assert plan["rc"] == 0 and plan["changed"]
    assert workers(ts.describe("1.0")) == (1, 1, ["READY"]) and ts.versions() == ["1.0"]


def test_a_duplicate_version_is_refused_with_the_409_explained(model, ts):
    assert model(url="tiny-1.0.mar")["changed"]
    refused = model(url="tiny-1.0.mar", version="2.0")
    assert refused["rc"] == 1 and not refused["changed"]
    assert "that version already exists" in refused["msg"] and "Model version 1.0 is already registered for model tiny" in refused["msg"]
    assert ts.versions() == ["1.0"]


def test_set_default_between_two_versions(model, ts):
    assert model(url="tiny-1.0.mar", initial_workers=1)["changed"]
    added = model(url="tiny-2.0.mar", version="2.0", initial_workers=1)
    assert added["changed"] and ts.versions() == ["1.0", "2.0"]
    assert ts.describe()["modelVersion"] == "1.0", "TorchServe keeps the first version as the default"

    switched = model(url="tiny-2.0.mar", version="2.0", default_version=True)
    assert switched["changed"] and switched["actions"] == ["made version 2.0 the default"]
    assert ts.describe()["modelVersion"] == "2.0"
    assert not model(url="tiny-2.0.mar", version="2.0", default_version=True)["changed"]
    assert model(version="1.0", default_version=True)["changed"] and ts.describe()["modelVersion"] == "1.0"


def test_recreate_changes_a_setting_fixed_at_registration(model, ts):
    assert model(url="tiny-1.0.mar", min_workers=1, batch_size=1)["changed"]
    refused = model(batch_size=4)
    assert refused["rc"] == 1 and "registered with batch_size 1, not 4" in refused["msg"] and "recreate=true" in refused["msg"]
    recreated = model(batch_size=4, max_batch_delay=20, recreate=True)
    assert recreated["rc"] == 0 and recreated["changed"], recreated.get("msg")
    described = ts.describe("1.0")
    assert (described["batchSize"], described["maxBatchDelay"]) == (4, 20) and workers(described) == (1, 1, ["READY"])
    assert not model(batch_size=4, max_batch_delay=20, recreate=True)["changed"]


def test_unregister_one_version_then_all(model, ts):
    assert model(url="tiny-1.0.mar")["changed"]
    assert model(url="tiny-2.0.mar", version="2.0")["changed"]
    refused = model(version="1.0", state="absent")
    assert refused["rc"] == 1 and "it is the default version and the model also has version 2.0" in refused["msg"]

    removed = model(version="2.0", state="absent")
    assert removed["changed"] and ts.versions() == ["1.0"]
    assert not model(version="2.0", state="absent")["changed"]
    assert model(url="tiny-2.0.mar", version="2.0")["changed"]
    removed = model(state="absent")
    assert removed["actions"] == ["unregistered version 2.0", "unregistered version 1.0"]
    assert ts.get("/models") == {"models": []}
    assert not model(state="absent")["changed"]


def test_model_api_disabled_refuses_registration_but_scaling_works(capsys, tmp_path, model_store):
    closed = TorchServe(tmp_path / "closed", model_store, model_api=False, load_models="tiny-1.0.mar")
    try:
        refused = run_module(capsys, management_url=closed.management_url, name="other", url="tiny-2.0.mar")
        assert refused["rc"] == 1
        assert "Registering model other from tiny-2.0.mar failed" in refused["msg"] and closed.management_url in refused["msg"]
        assert "the model API is disabled" in refused["msg"] and "enable_model_api=true" in refused["msg"]
        assert "Requested method is not allowed" in refused["msg"]

        scaled = run_module(capsys, management_url=closed.management_url, name="tiny", min_workers=2)
        assert scaled["rc"] == 0 and scaled["changed"], scaled.get("msg")
        # The scale request returns before the new worker has loaded the model; a worker that a busy machine
        # restarts passes through UNLOADING. Both must be READY within a minute.
        deadline = time.monotonic() + 60
        while workers(closed.describe()) != (2, 2, ["READY", "READY"]) and time.monotonic() < deadline:
            time.sleep(1)
        assert workers(closed.describe()) == (2, 2, ["READY", "READY"])
    finally:
        closed.stop()
