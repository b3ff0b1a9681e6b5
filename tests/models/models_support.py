"""Shared by the model tests: synthetic request bodies, in-process references and a loopback TorchServe."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import requests
import torch
from PIL import Image

from models.build import load_torchscript
from models.local_context import LocalContext
from models.preprocessing import INPUT_SHAPE, body_to_tensor

REPO_ROOT = Path(__file__).resolve().parents[2]
# Served against in-process logits of the same TorchScript file; batching and thread counts change
# the order of float sums, which moves logits by ~1e-6 here.
LOGIT_TOLERANCE = 1e-4
# The launcher next to this interpreter, so the server runs the venv's torch and the handler's packages.
TORCHSERVE = str(Path(sys.executable).with_name("torchserve"))


@dataclass(frozen=True)
class Body:
    """One request body: what it is, its Content-Type and its bytes."""

    name: str
    content_type: str
    data: bytes


def synthetic_image(index: int, size: tuple[int, int]) -> Image.Image:
    """A deterministic RGB picture: per-index gradients and blocks plus seeded noise, so inputs differ clearly."""
    rng = np.random.default_rng(1000 + index)
    width, height = size
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi, size=3)
    frequency = rng.uniform(0.01, 0.08, size=3)
    channels = [127 + 100 * np.sin(frequency[c] * (x + (c + 1) * y) + phase[c]) for c in range(3)]
    pixels = np.stack(channels, axis=-1) + rng.normal(0, 12, size=(height, width, 3))
    top, left = rng.integers(0, height // 2), rng.integers(0, width // 2)
    pixels[top : top + height // 3, left : left + width // 3] = rng.uniform(0, 255, size=3)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), mode="RGB")


def jpeg_body(index: int, size: tuple[int, int] = (320, 240)) -> Body:
    buffer = io.BytesIO()
    synthetic_image(index, size).save(buffer, format="JPEG", quality=90)
    return Body(f"jpeg-{index}", "image/jpeg", buffer.getvalue())


def png_body(index: int, size: tuple[int, int] = (240, 300), mode: str = "RGB") -> Body:
    buffer = io.BytesIO()
    synthetic_image(index, size).convert(mode).save(buffer, format="PNG")
    return Body(f"png-{index}", "image/png", buffer.getvalue())


def npy_array(index: int) -> np.ndarray:
    return np.random.default_rng(2000 + index).standard_normal(INPUT_SHAPE, dtype=np.float32)


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def npy_body(index: int) -> Body:
    return Body(f"npy-{index}", "application/x-npy", npy_bytes(npy_array(index)))


def distinct_bodies() -> list[Body]:
    """Nine different inputs: 3 JPEG, 3 PNG (one with alpha) and 3 .npy arrays, in varied sizes and aspect ratios."""
    return [
        jpeg_body(0, (320, 240)),
        jpeg_body(1, (256, 256)),
        jpeg_body(2, (300, 500)),
        png_body(3, (240, 300)),
        png_body(4, (400, 260), mode="RGBA"),
        png_body(5, (224, 224)),
        npy_body(6),
        npy_body(7),
        npy_body(8),
    ]


def reference_logits(torchscript: Path, bodies: list[Body]) -> torch.Tensor:
    """Logits [len(bodies), 1000] from the TorchScript file in this process, through the handler's preprocessing."""
    model = load_torchscript(torchscript)
    batch = torch.stack([body_to_tensor(body.data, body.content_type) for body in bodies])
    with torch.inference_mode():
        return model(batch)


def max_abs_diff(first, second) -> float:
    return (torch.as_tensor(first, dtype=torch.float32) - torch.as_tensor(second, dtype=torch.float32)).abs().max().item()


def extract_torchscript(mar: Path, name: str, destination: Path) -> Path:
    """The <name>.pt inside a .mar, so the reference runs the very file TorchServe serves."""
    with zipfile.ZipFile(mar) as archive:
        return Path(archive.extract(f"{name}.pt", destination))


def run_build(out: Path, *args: str) -> tuple[str, float]:
    """`python -m models.build --out OUT ARGS` from the repository root; its stdout and wall time."""
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "models.build", "--out", str(out), *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=900, check=False
    )
    if result.returncode != 0:
        raise AssertionError(f"models.build {' '.join(args)} exited {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}")
    return result.stdout, time.monotonic() - started


def free_ports(count: int) -> list[int]:
    """Distinct free loopback ports (all held open until each is chosen, so they differ)."""
    with ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _socket in range(count)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]


@dataclass
class Server:
    inference: str
    management: str
    metrics: str
    logs: Path
    ready_seconds: float

    def model_log(self) -> str:
        path = self.logs / "model_log.log"
        return path.read_text(encoding="utf-8", errors="replace") if path.exists() else ""


def write_config(root: Path, store: Path, models: list[str], ports: list[int], batch_size: int, max_batch_delay_ms: int) -> Path:
    inference, management, metrics = ports
    per_model = {
        name: {
            "1.0": {
                "defaultVersion": True,
                "marName": f"{name}.mar",
                "minWorkers": 1,
                "maxWorkers": 1,
                "batchSize": batch_size,
                "maxBatchDelay": max_batch_delay_ms,
                "responseTimeout": 120,
            }
        }
        for name in models
    }
    config = root / "config.properties"
    config.write_text(
        "\n".join(
            [
                f"inference_address=http://127.0.0.1:{inference}",
                f"management_address=http://127.0.0.1:{management}",
                f"metrics_address=http://127.0.0.1:{metrics}",
                f"model_store={store}",
                f"load_models={','.join(f'{name}.mar' for name in models)}",
                # A test-only server on loopback that lives for one test module. Token authorization would
                # need the random keys it writes at start; the cluster's security model is in the README.
                "disable_token_authorization=true",
                "enable_model_api=true",
                "default_workers_per_model=1",
                "metrics_mode=prometheus",
                f"models={json.dumps(per_model)}",
                "",
            ]
        ),
        encoding="utf-8",
    )
    return config


def wait_until_ready(process: subprocess.Popen, server: Server, models: list[str], deadline: float, console: Path) -> None:
    """Poll /ping, then each model's workers, until all are READY; fail with the server's output on deadline or exit."""
    pending = ["ping", *models]
    for _attempt in range(10_000):
        if process.poll() is not None:
            raise AssertionError(f"torchserve exited {process.returncode} before it was ready:\n{console.read_text(errors='replace')[-4000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"torchserve not ready in time, still waiting for {pending}:\n{console.read_text(errors='replace')[-4000:]}")
        try:
            if pending[0] == "ping":
                answer = requests.get(f"{server.inference}/ping", timeout=2)
                done = answer.status_code == 200 and answer.json().get("status") == "Healthy"
            else:
                answer = requests.get(f"{server.management}/models/{pending[0]}", timeout=2)
                workers = answer.json()[0]["workers"] if answer.status_code == 200 else []
                done = bool(workers) and all(worker["status"] == "READY" for worker in workers)
        except requests.RequestException:
            done = False
        if done:
            pending.pop(0)
            if not pending:
                return
            continue
        time.sleep(0.2)
    raise AssertionError(f"torchserve readiness polls exhausted, still waiting for {pending}")


def stop(process: subprocess.Popen, env: dict[str, str], root: Path) -> None:
    """`torchserve --stop` finds this server by the PID file in its own TMPDIR; the process group is the fallback."""
    if process.poll() is None:
        subprocess.run([TORCHSERVE, "--stop", "--foreground"], env=env, cwd=root, capture_output=True, timeout=90, check=False)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)


# What the test server's answers must name as the task and node that served them.
SERVED_BY_TASK = "resnet18.1.testtask"
SERVED_BY_NODE = "test-node"


@contextmanager
def torchserve(root: Path, store: Path, models: list[str], batch_size: int = 4, max_batch_delay_ms: int = 50, ready_timeout: float = 300) -> Iterator[Server]:
    """A TorchServe on 127.0.0.1 free ports serving store/<model>.mar, one worker and one thread each; stopped on exit.

    TMPDIR holds its PID file and unpacked models; TEMP becomes java.io.tmpdir, where the frontend puts
    the workers' sockets (/tmp/.ts.sock.9000 by default, which every other TorchServe on the host uses too).
    """
    tmp, logs = root / "tmp", root / "logs"
    tmp.mkdir(parents=True)
    logs.mkdir()
    ports = free_ports(3)
    config = write_config(root, store, models, ports, batch_size, max_batch_delay_ms)
    env = {
        **os.environ,
        "TMPDIR": str(tmp),
        "TEMP": str(tmp),
        "LOG_LOCATION": str(logs),
        "METRICS_LOCATION": str(logs),
        "OMP_NUM_THREADS": "1",
        "MLFLEET_TASK": SERVED_BY_TASK,
        "MLFLEET_NODE": SERVED_BY_NODE,
    }
    console = root / "console.log"
    started = time.monotonic()
    with console.open("wb") as output:
        process = subprocess.Popen(
            [TORCHSERVE, "--start", "--foreground", "--ts-config", str(config), "--model-store", str(store)],
            cwd=root,
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        server = Server(*(f"http://127.0.0.1:{port}" for port in ports), logs=logs, ready_seconds=0.0)
        wait_until_ready(process, server, models, started + ready_timeout, console)
        server.ready_seconds = time.monotonic() - started
        yield server
    finally:
        stop(process, env, root)


# The handler's request context for one batch of headers (the benchmarks use it too).
FakeContext = LocalContext
