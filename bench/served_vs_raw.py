"""Raw in-process ResNet-18 against the same model served by TorchServe, both held to one CPU budget (~5 min on 2 cores).

    python bench/served_vs_raw.py [--cpus 1] [--requests 400] [--warmup 200] [--max-seconds 60] [--models-dir DIR] [--quick]

Run as root on a host with cgroup v1's cpu and cpuacct controllers under /sys/fs/cgroup; no Docker needed. The model
is the reference ResNet-18 (`python -m models.build --models resnet18`, random weights from seed 0); the
raw side runs the very TorchScript file inside the .mar that TorchServe serves. Every request and every
raw image is the same .npy float32 [3, 224, 224] body, decoded by models.preprocessing on both sides.

The budget is what `docker run --cpus N` sets up: a cgroup-v1 cpu directory per side
(/sys/fs/cgroup/cpu/mlfleet-bench-<pid>-raw and -served) with cfs_period_us=100000 and
cfs_quota_us=N*100000, plus a cpuacct directory of the same name that only counts the CPU used. Both
are removed at the end. Each child joins them through a small `sh` wrapper before it execs Python or
TorchServe, so torch, the Java frontend and every model worker it forks run inside it. The load generator
(aiohttp, in this process) runs outside the budget; with --cpus 1 it has the machine's other core.

Measured, in one run:

1. Concurrency 1: raw = one process with --cpus intra-op threads running single images back to back;
   served = one client sending sequential requests to 1 worker with OMP_NUM_THREADS=--cpus, batch size 1.
2. Concurrency 16: raw = the fastest of several in-process layouts (processes x threads x batch, all
   within the budget; the candidates are printed and the choice named); served = 16 concurrent clients
   against --cpus workers x 1 thread, batch size 4, max_batch_delay 10 ms.
3. The served path at concurrency 16 with batch size 1 / 4 / 8 and, for --cpus >= 2, 1 x N against
   N x 1 workers x threads.

Per run: throughput (successful images per second of wall time), p50 / p95 / p99 latency, failed requests
(non-200, transport errors, wrong top-1 class), the share of CFS periods in which the budget throttled,
and the cores used on average by the budget, by the load generator and by everything else on the machine
(other jobs: on a shared host they take CPU from both sides, unevenly, and the column shows when). Raw
latency is the time of one forward call (batch included), with no queue in front of it. The ratio
served/raw is printed against the target 0.85 for each concurrency, met or not. Each run is bounded by a
request count and a wall-clock limit, after discarded warm-up: 16 images for the raw side, --warmup
requests at the run's concurrency for the served side (TorchServe's Java frontend is JIT-compiled while it
serves the first few hundred requests). Traffic goes only to
127.0.0.1, on ports 18600-18699.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import math
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import zipfile
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import numpy as np
import requests
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from models.build import load_torchscript  # noqa: E402
from models.preprocessing import INPUT_SHAPE, NPY_CONTENT_TYPE, body_to_tensor  # noqa: E402

MODEL = "resnet18"
CGROUP_CPU_ROOT = Path("/sys/fs/cgroup/cpu")
CGROUP_CPUACCT_ROOT = Path("/sys/fs/cgroup/cpuacct")
CFS_PERIOD_US = 100_000
PORT_RANGE = range(18600, 18700)
TARGET_RATIO = 0.85
CONCURRENCIES = (1, 16)
BATCH_DELAY_MS = 10
SERVED_BATCH_SIZE = 4
TABLE_BATCH_SIZES = (1, 4, 8)
RAW_BATCH_SIZES = (1, 4, 8)
# In-process torch is at full speed after a few calls; TorchServe's Java frontend is not: its JIT
# compiler (C2) still took ~3 s of the one-core budget during 300 requests after only 100 warm-ups.
RAW_WARMUP_IMAGES = 16
# One request may wait behind 16 others in a queue that drains at ~20 img/s on one core.
REQUEST_TIMEOUT_SECONDS = 30
SERVER_READY_SECONDS = 240
# Below this gap between the two best logits, batching or thread counts may legitimately swap the top-1
# class (they move logits by ~1e-6), so the served answers' class is not checked.
TOP1_CHECK_MIN_GAP = 1e-3
TORCHSERVE = str(Path(sys.executable).with_name("torchserve"))


@dataclass(frozen=True)
class RawLayout:
    processes: int
    threads: int
    batch: int

    def label(self) -> str:
        return f"{self.processes} proc x {self.threads} thr, batch {self.batch}"


@dataclass(frozen=True)
class ServedLayout:
    workers: int
    threads: int
    batch_size: int
    max_batch_delay_ms: int = BATCH_DELAY_MS

    def label(self) -> str:
        return f"{self.workers} wkr x {self.threads} thr, batch {self.batch_size}"


@dataclass
class Measurement:
    """One timed run: successful images, their latencies in seconds, failures by reason, and where the CPU went."""

    images: int
    seconds: float
    latencies: list[float]
    failures: Counter = field(default_factory=Counter)
    usage: CpuUsage | None = None

    @property
    def throughput(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0

    def percentile_ms(self, percent: float) -> float:
        return float(np.percentile(self.latencies, percent)) * 1000 if self.latencies else math.nan

    def failed(self) -> int:
        return sum(self.failures.values())


@dataclass(frozen=True)
class CpuUsage:
    """Cores used on average during a run: by the budget, by this process (the load generator), by everything else."""

    throttled_share: float
    budget_cores: float
    client_cores: float
    other_cores: float


def busy_ticks() -> int:
    """Machine-wide busy time from /proc/stat's cpu line (user nice system irq softirq), in clock ticks."""
    user, nice, system, idle, iowait, irq, softirq = (int(value) for value in Path("/proc/stat").read_text().split()[1:8])
    return user + nice + system + irq + softirq


def background_cores(seconds: float = 5) -> float:
    """Cores busy on the machine while this bench runs nothing: the other jobs' share, which adds noise."""
    before = busy_ticks()
    time.sleep(seconds)
    return (busy_ticks() - before) / os.sysconf("SC_CLK_TCK") / seconds


class CpuBudget:
    """cgroup-v1 cpu and cpuacct directories with a CFS quota of `cpus` cores, as `docker run --cpus` makes them.

    The cpu directory enforces the quota; the cpuacct one only counts what the budget used.
    """

    def __init__(self, side: str, cpus: int) -> None:
        name = f"mlfleet-bench-{os.getpid()}-{side}"
        self.path = CGROUP_CPU_ROOT / name
        self.accounting = CGROUP_CPUACCT_ROOT / name
        self.cpus = cpus

    def __enter__(self) -> CpuBudget:
        self.path.mkdir()
        self.accounting.mkdir()
        (self.path / "cpu.cfs_period_us").write_text(f"{CFS_PERIOD_US}\n")
        (self.path / "cpu.cfs_quota_us").write_text(f"{self.cpus * CFS_PERIOD_US}\n")
        return self

    def command(self, argv: list[str]) -> list[str]:
        """argv run by a shell that first moves itself into the budget, so the exec'd program and all it forks start inside."""
        join = 'echo $$ > "$1" && echo $$ > "$2" && shift 2 && exec "$@"'
        return ["sh", "-c", join, "join-cpu-budget", str(self.path / "cgroup.procs"), str(self.accounting / "cgroup.procs"), *argv]

    def members(self) -> list[int]:
        return [int(line) for line in (self.path / "cgroup.procs").read_text().split()]

    def throttle_counters(self) -> tuple[int, int]:
        """(CFS periods with runnable tasks, periods in which the quota ran out) since the directory was made."""
        stats = dict(line.split() for line in (self.path / "cpu.stat").read_text().splitlines())
        return int(stats["nr_periods"]), int(stats["nr_throttled"])

    def used_seconds(self) -> float:
        return int((self.accounting / "cpuacct.usage").read_text()) / 1e9

    def kill_members(self, timeout: float = 30) -> None:
        """SIGKILL whatever is still in the budget: only this bench's children ever join it, even those that left their process group."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pids = self.members()
            if not pids:
                return
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.2)
        raise RuntimeError(f"processes {self.members()} are still in {self.path} after SIGKILL")

    def __exit__(self, *exc_info) -> None:
        self.kill_members()
        # A cgroup is removable only once its last task has been released, which can lag the exit briefly.
        deadline = time.monotonic() + 10
        for directory in (self.path, self.accounting):
            while True:
                try:
                    directory.rmdir()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)


class UsageWindow:
    """Measures a CpuUsage between entering and leaving."""

    def __init__(self, budget: CpuBudget) -> None:
        self.budget = budget
        self.usage: CpuUsage | None = None

    def __enter__(self) -> UsageWindow:
        self.start = (time.monotonic(), self.budget.throttle_counters(), self.budget.used_seconds(), time.process_time(), busy_ticks())
        return self

    def __exit__(self, *exc_info) -> None:
        started, (periods_before, throttled_before), budget_before, client_before, busy_before = self.start
        seconds = time.monotonic() - started
        periods, throttled = self.budget.throttle_counters()
        budget_cores = (self.budget.used_seconds() - budget_before) / seconds
        client_cores = (time.process_time() - client_before) / seconds
        machine_cores = (busy_ticks() - busy_before) / os.sysconf("SC_CLK_TCK") / seconds
        self.usage = CpuUsage(
            throttled_share=(throttled - throttled_before) / (periods - periods_before) if periods > periods_before else 0.0,
            budget_cores=budget_cores,
            client_cores=client_cores,
            # Tick counts are coarse: never show a negative remainder.
            other_cores=max(0.0, machine_cores - budget_cores - client_cores),
        )


# ---------------------------------------------------------------- raw side


def raw_worker(options: argparse.Namespace) -> int:
    """Child process inside the budget: warm up, say ready, wait for "go", run timed forward calls, write the result file."""
    torch.set_num_threads(options.threads)
    model = load_torchscript(options.torchscript)
    body = options.body.read_bytes()

    def infer() -> torch.Tensor:
        # Decode every image as the handler decodes every request, so both sides do the same work per image.
        batch = torch.stack([body_to_tensor(body, NPY_CONTENT_TYPE) for copy_index in range(options.batch)])
        with torch.inference_mode():
            return model(batch)

    warmup_calls = 0
    logits = infer()
    while warmup_calls < options.warmup_calls:
        logits = infer()
        warmup_calls += 1
    best_two = torch.topk(logits[0], 2)
    print("ready", flush=True)
    if sys.stdin.readline().strip() != "go":
        return 1
    latencies: list[float] = []
    images = 0
    started = time.monotonic()
    deadline = started + options.max_seconds
    while images < options.images and time.monotonic() < deadline:
        call_started = time.monotonic()
        infer()
        latencies.append(time.monotonic() - call_started)
        images += options.batch
    finished = time.monotonic()
    result = {
        "started": started,
        "finished": finished,
        "images": images,
        "latencies": latencies,
        "top1_class": int(best_two.indices[0]),
        "top1_gap": float(best_two.values[0] - best_two.values[1]),
    }
    options.result.write_text(json.dumps(result), encoding="utf-8")
    return 0


def read_line(process: subprocess.Popen, deadline: float) -> str:
    """One line from an unbuffered stdout pipe, or "" if the process closed it or the deadline passed."""
    line = b""
    while not line.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([process.stdout], [], [], remaining)[0]:
            return ""
        chunk = process.stdout.read(1)
        if not chunk:
            return ""
        line += chunk
    return line.decode().strip()


def stderr_tail(result_file: Path) -> str:
    """The end of what the raw worker writing `result_file` printed to stderr."""
    return result_file.with_suffix(".stderr").read_text(errors="replace")[-3000:]


def measure_raw(budget: CpuBudget, work: Path, torchscript: Path, body_path: Path, layout: RawLayout, images: int, max_seconds: float):
    """Run `layout` in the budget: all processes warm up, start together and share `images` between them."""
    images_each = math.ceil(images / layout.processes)
    warmup_calls = max(3, math.ceil(RAW_WARMUP_IMAGES / layout.batch))
    env = {**os.environ, "OMP_NUM_THREADS": str(layout.threads), "MKL_NUM_THREADS": str(layout.threads)}
    processes, result_files = [], []
    try:
        for process_index in range(layout.processes):
            result_file = work / f"raw-{layout.processes}x{layout.threads}-b{layout.batch}-{process_index}.json"
            result_file.unlink(missing_ok=True)
            result_files.append(result_file)
            argv = [
                sys.executable,
                str(Path(__file__).resolve()),
                "--raw-worker",
                f"--torchscript={torchscript}",
                f"--body={body_path}",
                f"--threads={layout.threads}",
                f"--batch={layout.batch}",
                f"--images={images_each}",
                f"--warmup-calls={warmup_calls}",
                f"--max-seconds={max_seconds}",
                f"--result={result_file}",
            ]
            stderr = result_file.with_suffix(".stderr").open("wb")
            processes.append(
                subprocess.Popen(budget.command(argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, bufsize=0, cwd=REPO_ROOT, env=env)
            )
            stderr.close()
        ready_deadline = time.monotonic() + 300
        for process, result_file in zip(processes, result_files, strict=True):
            if read_line(process, ready_deadline) != "ready":
                raise RuntimeError(f"raw worker {layout.label()} did not get ready:\n{stderr_tail(result_file)}")
        with UsageWindow(budget) as window:
            for process in processes:
                process.stdin.write(b"go\n")
                process.stdin.close()
            for process in processes:
                process.wait(timeout=max_seconds + 60)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=30)
    results = []
    for process, result_file in zip(processes, result_files, strict=True):
        if process.returncode != 0 or not result_file.exists():
            raise RuntimeError(f"raw worker {layout.label()} exited {process.returncode}:\n{stderr_tail(result_file)}")
        results.append(json.loads(result_file.read_text(encoding="utf-8")))
    # CLOCK_MONOTONIC is system-wide on Linux, so the processes' clocks line up.
    span = max(result["finished"] for result in results) - min(result["started"] for result in results)
    measurement = Measurement(
        images=sum(result["images"] for result in results),
        seconds=span,
        latencies=[latency for result in results for latency in result["latencies"]],
        usage=window.usage,
    )
    return measurement, results[0]["top1_class"], results[0]["top1_gap"]


# ---------------------------------------------------------------- served side


def free_ports(count: int) -> list[int]:
    """`count` loopback ports in PORT_RANGE that nobody is bound to now."""
    ports = []
    for port in PORT_RANGE:
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        ports.append(port)
        if len(ports) == count:
            return ports
    raise RuntimeError(f"fewer than {count} free ports in {PORT_RANGE.start}-{PORT_RANGE.stop - 1}")


def write_config(root: Path, store: Path, layout: ServedLayout, ports: list[int]) -> Path:
    """config.properties as the torchserve role writes it (queue, metrics, no per-model pip), on loopback ports."""
    inference, management, metrics, grpc_inference, grpc_management = ports
    per_model = {
        MODEL: {
            "1.0": {
                "defaultVersion": True,
                "marName": f"{MODEL}.mar",
                "minWorkers": layout.workers,
                "maxWorkers": layout.workers,
                "batchSize": layout.batch_size,
                "maxBatchDelay": layout.max_batch_delay_ms,
                "responseTimeout": 120,
            }
        }
    }
    config = root / "config.properties"
    config.write_text(
        "\n".join(
            [
                f"inference_address=http://127.0.0.1:{inference}",
                f"management_address=http://127.0.0.1:{management}",
                f"metrics_address=http://127.0.0.1:{metrics}",
                # gRPC is unused here, but TorchServe always opens it, by default on 7070/7071 of all
                # addresses, where another TorchServe on the host makes this one exit.
                "grpc_inference_address=127.0.0.1",
                f"grpc_inference_port={grpc_inference}",
                "grpc_management_address=127.0.0.1",
                f"grpc_management_port={grpc_management}",
                "metrics_mode=prometheus",
                f"model_store={store}",
                f"load_models={MODEL}.mar",
                # A bench server on loopback that lives for one layout; its random keys would serve no purpose.
                "disable_token_authorization=true",
                "install_py_dep_per_model=false",
                "job_queue_size=100",
                f"default_workers_per_model={layout.workers}",
                f"models={json.dumps(per_model)}",
                "",
            ]
        ),
        encoding="utf-8",
    )
    return config


def wait_until_ready(process: subprocess.Popen, inference: str, management: str, workers: int, console: Path) -> float:
    """Seconds until /ping is Healthy and all `workers` of the model are READY; fails on exit or deadline."""
    started = time.monotonic()
    deadline = started + SERVER_READY_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"torchserve exited {process.returncode} before it was ready:\n{console.read_text(errors='replace')[-4000:]}")
        try:
            healthy = requests.get(f"{inference}/ping", timeout=2).json().get("status") == "Healthy"
            answer = requests.get(f"{management}/models/{MODEL}", timeout=2)
            ready = [worker for worker in answer.json()[0]["workers"] if worker["status"] == "READY"] if answer.status_code == 200 else []
            if healthy and len(ready) == workers:
                return time.monotonic() - started
        except (requests.RequestException, ValueError, KeyError, IndexError):
            pass
        time.sleep(0.5)
    raise RuntimeError(f"torchserve not ready in {SERVER_READY_SECONDS} s:\n{console.read_text(errors='replace')[-4000:]}")


def stop_process_group(process: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL, to the session the server was started in: `torchserve --foreground` does not pass SIGTERM on to Java."""
    for signal_number, grace in ((signal.SIGTERM, 30), (signal.SIGKILL, 30)):
        try:
            os.killpg(process.pid, signal_number)
        except ProcessLookupError:
            break
        try:
            process.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


@contextmanager
def torchserve_in_budget(budget: CpuBudget, work: Path, store: Path, layout: ServedLayout) -> Iterator[tuple[str, float]]:
    """A TorchServe for `layout` with its whole process tree in the budget; yields (inference URL, seconds to ready)."""
    root = Path(tempfile.mkdtemp(prefix=f"ts-{layout.workers}x{layout.threads}-b{layout.batch_size}-", dir=work))
    tmp, logs = root / "tmp", root / "logs"
    tmp.mkdir()
    logs.mkdir()
    ports = free_ports(5)
    config = write_config(root, store, layout, ports)
    # TMPDIR takes the PID file and unpacked model; TEMP becomes java.io.tmpdir, where the worker sockets go.
    env = {
        **os.environ,
        "TMPDIR": str(tmp),
        "TEMP": str(tmp),
        "LOG_LOCATION": str(logs),
        "METRICS_LOCATION": str(logs),
        "OMP_NUM_THREADS": str(layout.threads),
        "MKL_NUM_THREADS": str(layout.threads),
    }
    console = root / "console.log"
    with console.open("wb") as output:
        process = subprocess.Popen(
            budget.command([TORCHSERVE, "--start", "--foreground", "--ts-config", str(config), "--model-store", str(store)]),
            cwd=root,
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        inference, management = (f"http://127.0.0.1:{port}" for port in ports[:2])
        ready_seconds = wait_until_ready(process, inference, management, layout.workers, console)
        yield f"{inference}/predictions/{MODEL}", ready_seconds
    finally:
        stop_process_group(process)
        budget.kill_members()


def answer_problem(status: int, payload: bytes, expected_class: int | None) -> str:
    """Why an answer counts as failed, or "" if it is a good classification."""
    if status != 200:
        return f"HTTP {status}"
    try:
        top_class = json.loads(payload)["top_k"][0]["class"]
    except (ValueError, KeyError, IndexError, TypeError):
        return "unreadable answer"
    if expected_class is not None and top_class != expected_class:
        return "wrong top-1 class"
    return ""


async def send_load(url: str, body: bytes, concurrency: int, total: int, max_seconds: float, expected_class: int | None) -> Measurement:
    """`concurrency` clients each sending one request at a time until `total` are sent or `max_seconds` have passed."""
    latencies: list[float] = []
    failures: Counter = Counter()
    sent = 0
    deadline = time.monotonic() + max_seconds
    headers = {"Content-Type": NPY_CONTENT_TYPE, "X-Top-K": "1"}
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_SECONDS)) as session:

        async def client() -> None:
            nonlocal sent
            while sent < total and time.monotonic() < deadline:
                sent += 1
                request_started = time.monotonic()
                try:
                    async with session.post(url, data=body, headers=headers) as response:
                        payload = await response.read()
                        status = response.status
                except (aiohttp.ClientError, TimeoutError) as error:
                    failures[type(error).__name__] += 1
                    continue
                latency = time.monotonic() - request_started
                problem = answer_problem(status, payload, expected_class)
                if problem:
                    failures[problem] += 1
                else:
                    latencies.append(latency)

        started = time.monotonic()
        await asyncio.gather(*(client() for client_index in range(concurrency)))
        seconds = time.monotonic() - started
    return Measurement(images=len(latencies), seconds=seconds, latencies=latencies, failures=failures)


def measure_served(
    budget: CpuBudget, url: str, body: bytes, concurrency: int, requests_total: int, warmup: int, max_seconds: float, expected_class: int | None
) -> Measurement:
    """Warm-up requests at the same concurrency (discarded), then the timed run."""
    warmup_run = asyncio.run(send_load(url, body, concurrency, max(warmup, concurrency), max_seconds, expected_class))
    if warmup_run.images == 0:
        raise RuntimeError(f"every warm-up request to {url} failed: {dict(warmup_run.failures)}")
    with UsageWindow(budget) as window:
        measurement = asyncio.run(send_load(url, body, concurrency, requests_total, max_seconds, expected_class))
    measurement.usage = window.usage
    return measurement


# ---------------------------------------------------------------- report


def model_files(models_dir: Path | None, work: Path) -> tuple[Path, Path]:
    """(directory holding resnet18.mar, the TorchScript file inside it), building the .mar when it is not there yet."""
    store = models_dir or work / "models"
    mar = store / f"{MODEL}.mar"
    if not mar.exists():
        print(f"building {mar} ...", flush=True)
        result = subprocess.run(
            [sys.executable, "-m", "models.build", "--out", str(store), "--models", MODEL],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=900,
            check=False,
        )
        if result.returncode != 0:
            sys.exit(f"models.build exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    extracted = work / "torchscript"
    with zipfile.ZipFile(mar) as archive:
        return store, Path(archive.extract(f"{MODEL}.pt", extracted))


def npy_body() -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.random.default_rng(0).standard_normal(INPUT_SHAPE, dtype=np.float32), allow_pickle=False)
    return buffer.getvalue()


def cpu_times() -> list[int]:
    """The machine-wide `cpu` line of /proc/stat: user nice system idle iowait irq softirq steal ... in clock ticks."""
    return [int(value) for value in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]


def steal_share(before: list[int], after: list[int]) -> float:
    """Share of all CPU time the hypervisor gave to other guests: on a VM it slows both sides unevenly, run to run."""
    deltas = [end - begin for end, begin in zip(after, before, strict=True)]
    # guest and guest_nice (the last two) are already counted in user and nice.
    total = sum(deltas[:8])
    return deltas[7] / total if total else 0.0


def row(label: str, measurement: Measurement, width: int = 30) -> str:
    usage = measurement.usage
    return (
        f"{label:<{width}} {measurement.throughput:>7.1f} {measurement.percentile_ms(50):>7.0f} {measurement.percentile_ms(95):>7.0f} "
        f"{measurement.percentile_ms(99):>7.0f} {measurement.failed():>6} {usage.throttled_share:>9.0%} {usage.budget_cores:>7.2f} "
        f"{usage.client_cores:>7.2f} {usage.other_cores:>7.2f}"
    )


def header(first: str, width: int = 30) -> str:
    return f"{first:<{width}} {'img/s':>7} {'p50 ms':>7} {'p95 ms':>7} {'p99 ms':>7} {'failed':>6} {'throttled':>9} {'budget':>7} {'client':>7} {'others':>7}"


def raw_candidates(cpus: int) -> list[RawLayout]:
    """In-process layouts for many waiting images, all within `cpus` cores: one thread per process, plus one process with all threads."""
    layouts = [RawLayout(cpus, 1, batch) for batch in RAW_BATCH_SIZES]
    if cpus > 1:
        layouts += [RawLayout(1, cpus, 1), RawLayout(1, cpus, max(RAW_BATCH_SIZES))]
    return layouts


def served_plan(cpus: int) -> dict[ServedLayout, list[int]]:
    """Server layouts, each started once, with the concurrencies to run against it."""
    single = ServedLayout(1, cpus, 1)
    plan: dict[ServedLayout, list[int]] = {single: [1]}
    for batch_size in TABLE_BATCH_SIZES:
        plan.setdefault(ServedLayout(cpus, 1, batch_size), []).append(16)
    if cpus > 1:
        plan.setdefault(ServedLayout(1, cpus, SERVED_BATCH_SIZE), []).append(16)
    return plan


def run_all(options: argparse.Namespace, work: Path):
    """Every raw and served run; returns (raw runs, chosen raw layout, checked top-1 class, served runs, server start times)."""
    cpus = options.cpus
    store, torchscript = model_files(options.models_dir, work)
    body = npy_body()
    body_path = work / "body.npy"
    body_path.write_bytes(body)

    raw_runs: dict[RawLayout, Measurement] = {}
    expected_class: int | None = None
    with CpuBudget("raw", cpus) as budget:
        single_layout = RawLayout(1, cpus, 1)
        for layout in [single_layout, *raw_candidates(cpus)]:
            if layout in raw_runs:
                continue
            print(f"raw {layout.label()} ...", flush=True)
            measurement, top1_class, top1_gap = measure_raw(budget, work, torchscript, body_path, layout, options.requests, options.max_seconds)
            raw_runs[layout] = measurement
            if layout == single_layout:
                expected_class = top1_class if top1_gap >= TOP1_CHECK_MIN_GAP else None
    best_raw_layout = max(raw_candidates(cpus), key=lambda layout: raw_runs[layout].throughput)

    served_runs: dict[tuple[ServedLayout, int], Measurement] = {}
    ready_seconds: dict[ServedLayout, float] = {}
    with CpuBudget("served", cpus) as budget:
        for layout, concurrencies in served_plan(cpus).items():
            print(f"served {layout.label()} ...", flush=True)
            with torchserve_in_budget(budget, work, store, layout) as (url, seconds_to_ready):
                ready_seconds[layout] = seconds_to_ready
                for concurrency in concurrencies:
                    served_runs[layout, concurrency] = measure_served(
                        budget, url, body, concurrency, options.requests, options.warmup, options.max_seconds, expected_class
                    )
    return raw_runs, best_raw_layout, expected_class, served_runs, ready_seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpus", type=int, default=1, help="cores in each side's CPU budget (default 1), like docker run --cpus")
    parser.add_argument("--requests", type=int, default=400, help="timed requests (images) per run (default 400)")
    parser.add_argument("--warmup", type=int, default=200, help="discarded requests before each served run, for the JVM's JIT (default 200)")
    parser.add_argument("--max-seconds", type=float, default=60, help="wall-clock limit of one timed run (default 60)")
    parser.add_argument("--models-dir", type=Path, help="directory with resnet18.mar (built there if missing); default: built in a temp dir")
    parser.add_argument("--quick", action="store_true", help="smoke run: 80 requests, 40 warm-up, 30 s limit per run")
    # The raw side's child processes run this file again with these options, inside the budget.
    parser.add_argument("--raw-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--torchscript", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--body", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--images", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--warmup-calls", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.raw_worker:
        return raw_worker(options)
    if options.quick:
        options.requests, options.warmup, options.max_seconds = 80, 40, 30
    if os.geteuid() != 0 or not (CGROUP_CPU_ROOT / "cpu.cfs_quota_us").exists():
        sys.exit(f"run as root on a host with cgroup v1's cpu controller at {CGROUP_CPU_ROOT}: the budget is a cgroup")
    if not 1 <= options.cpus <= os.cpu_count():
        sys.exit(f"--cpus must be between 1 and this machine's {os.cpu_count()} cores")
    cpus = options.cpus
    load_before = os.getloadavg()
    background_before = background_cores()
    cpu_times_before = cpu_times()
    bench_started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="bench-served-vs-raw-"))
    try:
        raw_runs, best_raw_layout, expected_class, served_runs, ready_seconds = run_all(options, work)
    except BaseException:
        print(f"stopped; the servers' logs and raw workers' stderr are kept in {work}", file=sys.stderr)
        raise
    shutil.rmtree(work)
    load_after = os.getloadavg()
    steal = steal_share(cpu_times_before, cpu_times())
    background_after = background_cores()

    print()
    print(
        f"ResNet-18 (TorchScript from the .mar, seed 0), .npy float32 {list(INPUT_SHAPE)} body; budget {cpus} core(s) per side "
        f"(cgroup v1 cfs_quota_us={cpus * CFS_PERIOD_US} / cfs_period_us={CFS_PERIOD_US}); load generator outside the budget"
    )
    print(
        f"machine: {os.cpu_count()} cores; other jobs kept {background_before:.2f} / {background_after:.2f} cores busy before / after the bench "
        f"(load average {load_before[0]:.2f} / {load_after[0]:.2f}); {steal:.1%} of CPU time stolen by the hypervisor"
    )
    print(
        f"{options.requests} timed requests per run (served: after {options.warmup} warm-up), at most {options.max_seconds:.0f} s; "
        f"top-1 class check: {'on' if expected_class is not None else 'off (two best logits too close)'}"
    )
    print()
    print("cores used on average during each run: budget = the side's cgroup, client = this load generator, others = the rest of the machine")
    print()
    print("raw in-process layouts for concurrency 16 (latency = one forward call)")
    print(header("layout"))
    for layout in raw_candidates(cpus):
        chosen = "  <- chosen" if layout == best_raw_layout else ""
        print(row(layout.label(), raw_runs[layout]) + chosen)
    print()
    served_main = {1: ServedLayout(1, cpus, 1), 16: ServedLayout(cpus, 1, SERVED_BATCH_SIZE)}
    raw_main = {1: RawLayout(1, cpus, 1), 16: best_raw_layout}
    print("served vs raw, same budget")
    print(header("concurrency / side / layout", 44))
    ratios = {}
    for concurrency in CONCURRENCIES:
        raw_measurement = raw_runs[raw_main[concurrency]]
        served_measurement = served_runs[served_main[concurrency], concurrency]
        ratios[concurrency] = served_measurement.throughput / raw_measurement.throughput
        print(row(f"{concurrency:>2}  raw     {raw_main[concurrency].label()}", raw_measurement, 44))
        print(row(f"{concurrency:>2}  served  {served_main[concurrency].label()}", served_measurement, 44))
    print()
    for concurrency, ratio in ratios.items():
        verdict = "met" if ratio >= TARGET_RATIO else "NOT met"
        print(f"served/raw throughput at concurrency {concurrency:>2}: {ratio:.3f}  (target >= {TARGET_RATIO}: {verdict})")
    best_served = max((run for run in served_runs.items() if run[0][1] == 16), key=lambda run: run[1].throughput)
    print(
        f"best served layout at concurrency 16: {best_served[0][0].label()}, {best_served[1].throughput:.1f} img/s, "
        f"{best_served[1].throughput / raw_runs[best_raw_layout].throughput:.3f} of the best raw layout"
    )
    print()
    print(f"served path at concurrency 16: batching and threads per worker (max_batch_delay {BATCH_DELAY_MS} ms)")
    print(f"{'workers x threads':<18} {'batch':>5} {'img/s':>7} {'p50 ms':>7} {'p95 ms':>7} {'failed':>6} {'throttled':>9} {'budget':>7} {'ready s':>7}")
    for (layout, concurrency), measurement in served_runs.items():
        if concurrency != 16:
            continue
        print(
            f"{f'{layout.workers} x {layout.threads}':<18} {layout.batch_size:>5} {measurement.throughput:>7.1f} {measurement.percentile_ms(50):>7.0f} "
            f"{measurement.percentile_ms(95):>7.0f} {measurement.failed():>6} {measurement.usage.throttled_share:>9.0%} "
            f"{measurement.usage.budget_cores:>7.2f} {ready_seconds[layout]:>7.1f}"
        )
    failures = Counter()
    for measurement in served_runs.values():
        failures.update(measurement.failures)
    if failures:
        print(f"failed requests by reason: {dict(failures)}")
    print(f"bench wall time {time.monotonic() - bench_started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
