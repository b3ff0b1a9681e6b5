"""Raw GPU check: the reference models, traced as TorchServe serves them, through the handler on one GPU and on the CPU (~2-4 min).

    python bench/gpu_check.py [--models resnet18,densenet161] [--batches 1 8 32] [--iterations 30] [--warmup 3]
                              [--max-seconds 12] [--max-total-seconds 540] [--device auto|cpu] [--require-gpu]
                              [--cpu-threads N] [--out PATH] [--quick]

Needs one machine with PyTorch (any recent version, with CUDA for the GPU half), numpy and Pillow (the
handler's preprocessing imports them) and this working tree; no Docker, no TorchServe, no Java, no network
and no model files. Each model is built in code from seed 0 (`models.architectures.build_model`, the weights
the project serves) and traced with `models.build.trace`, as `python -m models.build` does; the TorchScript
file goes to a temporary model directory with index_to_name.json, and `models.handler.ImageClassifierHandler`
loads it there through `initialize`, with `models.local_context.LocalContext` as its TorchServe context:
system_properties gpu_id 0 for the GPU (what a Swarm task that reserves one GPU gets), no gpu_id for the CPU.
The check fails when the handler did not put the model on the device asked for.

Measured, for each model, on cuda:0 and on the CPU, for each batch size (1, 8 and 32 by default):

1. handler: one `handle()` call on a batch of distinct .npy float32 [3, 224, 224] bodies, the way a
   TorchServe worker answers a batch: decoding, stacking, the move to the device, the forward pass, the
   logits back to the host, softmax, top-5 and the JSON answers (not TorchServe's frontend or its IPC).
2. model only: the traced model's forward pass on a batch already on the device.

Each: throughput (images/s over the timed wall time) and latency per batch (p50, p95 in ms), after discarded
warm-up iterations, with torch.cuda.synchronize() before each timer start and stop on the GPU. Printed
with the GPU/CPU throughput ratio per model and batch size. Answers are checked on the same inputs, one
handler call per batch size with X-Return-Logits: the GPU handler's against the CPU handler's, and the CPU
handler's against the untraced model run in this process. The run fails (exit 1) when any top-1 class
differs; the largest |logit difference| and the smallest top-1 margin of the reference (top-1 minus top-2
logit) are reported. The TF32 settings of torch.backends are recorded with the machine: torch leaves TF32
on for cuDNN convolutions by default, the way TorchServe would run too. TF32 rounding emulated on the CPU
moved these models' logits by at most 0.003, against smallest top-1 margins of 0.10 (densenet161) and 0.25.

Bounds: every measurement stops at --iterations timed iterations or --max-seconds of wall time, whichever
comes first (at least one iteration); warm-up at --warmup iterations or a quarter of --max-seconds; the
model-only runs at --iterations or a quarter of --max-seconds. After --max-total-seconds (default 540)
the remaining measurements are skipped and listed (exit 0). On 2 cores (CPU only) the defaults took 2 to 4
minutes, most of it densenet161 at batch 32 (7 to 26 s a call); on a GPU machine the CPU half is bounded the
same way and the GPU half should take well under a minute (not yet run on a GPU).

Without a CUDA device and with --device auto, it says so and measures the CPU only (exit 0); with
--require-gpu it exits 2 instead. The results, with the machine (GPU name, CUDA and driver versions, CPU
count, torch version, host name), go to --out, by default bench/results/gpu_check-<host>-<UTC time>.json.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import platform
import socket
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from models.architectures import ARCHITECTURES, build_model  # noqa: E402
from models.build import LABELS, TRACE_TOLERANCE, save_torchscript, trace  # noqa: E402
from models.handler import LABELS_FILE, ImageClassifierHandler  # noqa: E402
from models.local_context import LocalContext  # noqa: E402
from models.preprocessing import INPUT_SHAPE  # noqa: E402

SEED = 0
DEFAULTS = {"models": list(ARCHITECTURES), "batches": [1, 8, 32], "iterations": 30, "warmup": 3, "max_seconds": 12.0, "max_total_seconds": 540.0}
QUICK = {"models": ["resnet18"], "batches": [1, 2], "iterations": 2, "warmup": 1, "max_seconds": 2.0, "max_total_seconds": 60.0}
NPY_HEADERS = {"Content-Type": "application/x-npy"}
EXIT_NO_GPU = 2


@dataclass
class Timing:
    iterations: int
    seconds: float
    latencies_ms: list[float]

    def summary(self, batch: int) -> dict:
        return {
            "iterations": self.iterations,
            "seconds": round(self.seconds, 4),
            "images_per_s": round(batch * self.iterations / self.seconds, 3) if self.seconds > 0 else None,
            "latency_ms": {
                "p50": round(percentile(self.latencies_ms, 50), 3),
                "p95": round(percentile(self.latencies_ms, 95), 3),
                "min": round(min(self.latencies_ms), 3),
                "max": round(max(self.latencies_ms), 3),
            },
        }


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def npy_body(index: int) -> bytes:
    array = np.random.default_rng(3000 + index).standard_normal(INPUT_SHAPE, dtype=np.float32)
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(step, device: torch.device, warmup: int, warmup_seconds: float, iterations: int, max_seconds: float) -> tuple[int, Timing]:
    """Warm-up (discarded) then timed calls of step(), each phase bounded by a count and by wall time, at least one call each."""
    warmed = 0
    started = time.monotonic()
    while warmed < warmup and (warmed == 0 or time.monotonic() - started < warmup_seconds):
        step()
        warmed += 1
    sync(device)
    latencies: list[float] = []
    began = time.perf_counter()
    while len(latencies) < iterations and (not latencies or time.perf_counter() - began < max_seconds):
        sync(device)
        start = time.perf_counter()
        step()
        sync(device)
        latencies.append((time.perf_counter() - start) * 1000)
    return warmed, Timing(len(latencies), time.perf_counter() - began, latencies)


@contextmanager
def environ(name: str, value: str):
    """os.environ[name] = value for the block (the handler reads its thread count from OMP_NUM_THREADS)."""
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


def driver_version() -> str | None:
    """The NVIDIA kernel driver version from /proc (no NVML needed), else None."""
    try:
        first = Path("/proc/driver/nvidia/version").read_text(encoding="ascii", errors="replace").splitlines()[0]
    except (OSError, IndexError):
        return None
    words = first.split()
    return next((word for word in words if word[:1].isdigit() and word.count(".") >= 1), first.strip())


def cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def machine() -> dict:
    info = {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch_version": torch.__version__,
        "torch_cuda_version": torch.version.cuda,
        "cudnn_version": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cuda_available": torch.cuda.is_available(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_model": cpu_model(),
        "nvidia_driver_version": driver_version(),
    }
    if torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(0)
        get_driver = getattr(torch._C, "_cuda_getDriverVersion", None)
        cuda_driver = get_driver() if get_driver else None
        info.update(
            {
                "gpu_count": torch.cuda.device_count(),
                "gpu_name": torch.cuda.get_device_name(0),
                "gpu_capability": ".".join(map(str, torch.cuda.get_device_capability(0))),
                "gpu_memory_gib": round(properties.total_memory / 2**30, 1),
                # The CUDA version the driver supports (cuDriverGetVersion), e.g. 12040 -> 12.4.
                "cuda_driver_api_version": f"{cuda_driver // 1000}.{cuda_driver % 1000 // 10}" if cuda_driver else None,
                "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
                "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
                "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
                "cudnn_benchmark": torch.backends.cudnn.benchmark,
            }
        )
    return info


def default_out() -> Path:
    stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H%M%SZ")
    return REPO_ROOT / "bench" / "results" / f"gpu_check-{socket.gethostname()}-{stamp}.json"


def model_list(value: str) -> list[str]:
    names = [name.strip() for name in value.split(",") if name.strip()]
    unknown = sorted(set(names) - set(ARCHITECTURES))
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown model(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(ARCHITECTURES)}")
    return names


def positive_int(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"{value!r} is not a positive integer")
    return int(value)


def positive_float(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        number = -1.0
    if not number > 0 or math.isinf(number):
        raise argparse.ArgumentTypeError(f"{value!r} is not a positive number of seconds")
    return number


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python bench/gpu_check.py", description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=model_list, help=f"comma-separated (default {','.join(DEFAULTS['models'])})")
    parser.add_argument("--batches", type=positive_int, nargs="+", help="batch sizes (default 1 8 32)")
    parser.add_argument("--iterations", type=positive_int, help=f"timed iterations per measurement at most (default {DEFAULTS['iterations']})")
    parser.add_argument("--warmup", type=positive_int, help=f"discarded warm-up iterations at most (default {DEFAULTS['warmup']})")
    parser.add_argument("--max-seconds", type=positive_float, help=f"wall-time limit of one measurement (default {DEFAULTS['max_seconds']:g})")
    parser.add_argument(
        "--max-total-seconds", type=positive_float, help=f"skip what is left after this much wall time (default {DEFAULTS['max_total_seconds']:g})"
    )
    parser.add_argument("--device", choices=["auto", "cpu"], default="auto", help="auto: cuda:0 and the CPU (the CPU only without a GPU); cpu: the CPU only")
    parser.add_argument("--require-gpu", action="store_true", help=f"exit {EXIT_NO_GPU} when no CUDA device is found")
    parser.add_argument("--cpu-threads", type=positive_int, help="intra-op threads (the handler's OMP_NUM_THREADS); default: the CPUs this process may use")
    parser.add_argument("--out", type=Path, help="JSON results (default bench/results/gpu_check-<host>-<UTC time>.json)")
    parser.add_argument("--quick", action="store_true", help="tiny counts for tests: resnet18, batches 1 2, 2 iterations, 2 s per measurement")
    args = parser.parse_args(argv)
    if args.require_gpu and args.device == "cpu":
        parser.error("--require-gpu asks for a GPU but --device cpu measures the CPU only")
    for name, value in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.batches = sorted(set(args.batches))
    if args.cpu_threads is None:
        args.cpu_threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if args.out is None:
        args.out = default_out()
    return args


class Run:
    """One model on one device: the handler loaded by initialize() from model_dir, and its measurements."""

    def __init__(self, args: argparse.Namespace, model_dir: Path, name: str, device: str, bodies: list[bytes]) -> None:
        self.args, self.model_dir, self.name, self.bodies = args, model_dir, name, bodies
        # The GPU worker gets gpu_id 0, as in a Swarm task that reserves one GPU; the CPU worker none, as on a CPU host.
        gpu_id = 0 if device.startswith("cuda") else None
        with environ("OMP_NUM_THREADS", str(args.cpu_threads)):
            self.handler = ImageClassifierHandler()
            self.handler.initialize(LocalContext(model_dir, f"{name}.pt", [], gpu_id=gpu_id, model_name=name))
        self.device = self.handler.device
        parameter_device = next(self.handler.model.parameters()).device
        self.placement_ok = str(self.device) == device and parameter_device == self.device
        self.placement = {"expected": device, "handler_device": str(self.device), "parameters_on": str(parameter_device), "ok": self.placement_ok}

    def answers(self, batch: int, headers: dict[str, str]) -> tuple[list[dict], LocalContext]:
        context = LocalContext(self.model_dir, f"{self.name}.pt", [dict(headers) for _index in range(batch)])
        answers = [json.loads(answer) for answer in self.handler.handle([{"body": body} for body in self.bodies[:batch]], context)]
        return answers, context

    def logits(self, batch: int) -> tuple[torch.Tensor, list[int], dict]:
        """Logits and top-1 classes of one handler call with X-Return-Logits, and any per-request error."""
        answers, context = self.answers(batch, {**NPY_HEADERS, "X-Return-Logits": "true"})
        if context.statuses:
            return torch.empty(0), [], {str(idx): answers[idx].get("error", status) for idx, status in context.statuses.items()}
        return torch.tensor([answer["logits"] for answer in answers]), [answer["top_k"][0]["class"] for answer in answers], {}

    def measure(self, batch: int) -> dict:
        args = self.args
        context = LocalContext(self.model_dir, f"{self.name}.pt", [dict(NPY_HEADERS) for _index in range(batch)])
        rows = [{"body": body} for body in self.bodies[:batch]]

        def handler_step() -> None:
            self.handler.handle(rows, context)

        warmed, handler_timing = timed(handler_step, self.device, args.warmup, args.max_seconds / 4, args.iterations, args.max_seconds)
        if context.statuses:
            raise RuntimeError(f"{self.name} on {self.device}: the handler refused the check's own bodies: {context.statuses}")
        inputs = torch.stack([torch.from_numpy(np.load(io.BytesIO(body), allow_pickle=False)) for body in self.bodies[:batch]]).to(self.device)

        def model_step() -> None:
            with torch.inference_mode():
                self.handler.model(inputs)

        # The model is warm from the handler calls on the same shapes: one discarded call, then the timed ones.
        _warm, model_timing = timed(model_step, self.device, 1, 0.0, args.iterations, args.max_seconds / 4)
        return {
            "model": self.name,
            "device": str(self.device),
            "batch": batch,
            "warmup_iterations": warmed,
            "handler": handler_timing.summary(batch),
            "model_only": model_timing.summary(batch),
        }

    def close(self) -> None:
        self.handler = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def ratio(gpu: dict | None, cpu: dict | None, key: str) -> float | None:
    if not gpu or not cpu or not gpu[key]["images_per_s"] or not cpu[key]["images_per_s"]:
        return None
    return round(gpu[key]["images_per_s"] / cpu[key]["images_per_s"], 2)


def agreement(name: str, batch: int, device: str, reference: str, answers: tuple, expected: tuple) -> dict:
    """One device's handler answers against a reference's for the same inputs: top-1 classes and logits."""
    (logits, top1, errors), (reference_logits, reference_top1, reference_errors) = answers, expected
    entry = {"model": name, "batch": batch, "device": device, "reference": reference}
    if errors or reference_errors:
        return {**entry, "top1_equal": False, "errors": {device: errors, reference: reference_errors}}
    best_two = torch.topk(reference_logits, 2, dim=1).values
    return {
        **entry,
        "top1_equal": top1 == reference_top1,
        "top1_mismatches": sum(first != second for first, second in zip(top1, reference_top1, strict=True)),
        "max_abs_logit_diff": float((logits - reference_logits).abs().max()),
        "min_reference_top1_margin": float((best_two[:, 0] - best_two[:, 1]).min()),
    }


def eager_answers(model: torch.nn.Module, bodies: list[bytes]) -> tuple[torch.Tensor, list[int], dict]:
    """The untraced model's logits on the CPU for the decoded bodies: what every handler answer must agree with."""
    inputs = torch.stack([torch.from_numpy(np.load(io.BytesIO(body), allow_pickle=False)) for body in bodies])
    with torch.inference_mode():
        logits = model(inputs)
    return logits, logits.argmax(dim=1).tolist(), {}


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(row[column])) for row in [header, *rows]) for column in range(len(header))]
    lines = [
        "  ".join(str(cell).rjust(width) if index else str(cell).ljust(width) for index, (cell, width) in enumerate(zip(row, widths, strict=True)))
        for row in [header, *rows]
    ]
    return "\n".join([lines[0], "  ".join("-" * width for width in widths), *lines[1:]])


def number(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def report(result: dict) -> str:
    rows = []
    for entry in result["measurements"]:
        handler, model_only = entry["handler"], entry["model_only"]
        rows.append(
            [
                entry["model"],
                entry["device"],
                entry["batch"],
                handler["iterations"],
                number(handler["images_per_s"]),
                number(handler["latency_ms"]["p50"]),
                number(handler["latency_ms"]["p95"]),
                number(model_only["images_per_s"]),
                number(model_only["latency_ms"]["p50"]),
            ]
        )
    header = ["model", "device", "batch", "iters", "images/s", "p50 ms", "p95 ms", "model-only images/s", "model-only p50 ms"]
    parts = ["Handler path (handle(): decode, to device, forward, to host, top-5 JSON) and model-only forward:", table(rows, header)]
    if result["ratios"]:
        ratio_rows = [[entry["model"], entry["batch"], number(entry["handler"], 2), number(entry["model_only"], 2)] for entry in result["ratios"]]
        parts += ["", "GPU/CPU throughput ratio:", table(ratio_rows, ["model", "batch", "handler", "model only"])]
    if result["agreement"]:
        agreement_rows = [
            [
                entry["model"],
                entry["batch"],
                entry["device"],
                entry["reference"],
                "yes" if entry["top1_equal"] else "NO",
                number(entry.get("max_abs_logit_diff"), 6),
                number(entry.get("min_reference_top1_margin"), 4),
            ]
            for entry in result["agreement"]
        ]
        header = ["model", "batch", "handler on", "against", "top-1 equal", "max |logit diff|", "min top-1 margin"]
        parts += ["", "Handler answers against a reference, same inputs (margin: reference top-1 minus top-2 logit):", table(agreement_rows, header)]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    started = time.monotonic()
    deadline = started + args.max_total_seconds
    gpu_found = torch.cuda.is_available() and torch.cuda.device_count() > 0
    notes: list[str] = []
    if args.device == "auto" and not gpu_found:
        if args.require_gpu:
            print(f"no CUDA device found by torch {torch.__version__} (torch.cuda.is_available() is False) and --require-gpu is set", file=sys.stderr)
            return EXIT_NO_GPU
        notes.append(f"NO GPU FOUND: torch {torch.__version__} sees no CUDA device; measuring the CPU only")
    devices = ["cuda:0", "cpu"] if args.device == "auto" and gpu_found else ["cpu"]
    if args.device == "cpu":
        notes.append("--device cpu: measuring the CPU only")
    for note in notes:
        print(note)
    info = machine()
    print(
        f"{info['hostname']}: {info.get('gpu_name') or 'no GPU'}, {info['cpu_affinity']} CPUs ({info['cpu_model']}), torch {info['torch_version']}"
        f" (CUDA {info['torch_cuda_version']}, driver {info['nvidia_driver_version']}); {args.cpu_threads} intra-op threads"
    )
    result: dict = {
        "tool": "bench/gpu_check.py",
        "argv": sys.argv[1:] if argv is None else list(argv),
        "started_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": info,
        "gpu_found": gpu_found,
        "devices": devices,
        "notes": notes,
        "settings": {
            "models": args.models,
            "batches": args.batches,
            "iterations": args.iterations,
            "warmup": args.warmup,
            "max_seconds": args.max_seconds,
            "max_total_seconds": args.max_total_seconds,
            "cpu_threads": args.cpu_threads,
            "seed": SEED,
            "quick": args.quick,
        },
        "models": {},
        "placement": [],
        "measurements": [],
        "ratios": [],
        "agreement": [],
        "skipped": [],
        "failures": [],
    }
    threads_before = torch.get_num_threads()
    bodies = [npy_body(index) for index in range(max(args.batches))]
    try:
        with tempfile.TemporaryDirectory(prefix="gpu-check-") as model_dir_name:
            model_dir = Path(model_dir_name)
            (model_dir / LABELS_FILE).write_text(json.dumps(LABELS), encoding="utf-8")
            for name in args.models:
                check_model(args, result, model_dir, name, devices, bodies, deadline)
    finally:
        torch.set_num_threads(threads_before)
    result["wall_seconds"] = round(time.monotonic() - started, 1)
    result["ok"] = not result["failures"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print()
    print(report(result))
    for skipped in result["skipped"]:
        print(f"skipped (--max-total-seconds {args.max_total_seconds:g} reached): {skipped}")
    for failure in result["failures"]:
        print(f"FAILED: {failure}")
    for note in notes:
        print(note)
    print(f"{'ok' if result['ok'] else 'FAILED'} in {result['wall_seconds']:.0f} s; results in {args.out}")
    return 0 if result["ok"] else 1


def check_model(args: argparse.Namespace, result: dict, model_dir: Path, name: str, devices: list[str], bodies: list[bytes], deadline: float) -> None:
    if time.monotonic() > deadline:
        result["skipped"].append(f"{name}: all")
        return
    began = time.monotonic()
    eager = build_model(name, SEED)
    traced, trace_diff = trace(eager, SEED)
    save_torchscript(traced, model_dir / f"{name}.pt")
    del traced
    result["models"][name] = {"seed": SEED, "trace_max_abs_diff": trace_diff, "build_seconds": round(time.monotonic() - began, 1)}
    print(f"{name}: built from seed {SEED} and traced in {time.monotonic() - began:.1f} s (trace max |diff| {trace_diff:.2g})")
    if trace_diff > TRACE_TOLERANCE:
        result["failures"].append(f"{name}: TorchScript differs from eager by {trace_diff:.3g} > {TRACE_TOLERANCE}")
        return
    by_device: dict[str, dict[int, dict]] = {}
    logits: dict[str, dict[int, tuple]] = {}
    for device in devices:
        try:
            run = Run(args, model_dir, name, device, bodies)
        except Exception as error:  # recorded as a failure; the other device and models still run
            result["failures"].append(f"{name}: the handler did not start on {device}: {type(error).__name__}: {error}")
            continue
        result["placement"].append({"model": name, **run.placement})
        if not run.placement_ok:
            result["failures"].append(f"{name}: the handler put the model on {run.placement['parameters_on']} (device {run.device}), not {device}")
            run.close()
            continue
        by_device[device], logits[device] = {}, {}
        try:
            for batch in args.batches:
                if time.monotonic() > deadline:
                    result["skipped"].append(f"{name} on {device}, batch {batch}")
                    continue
                logits[device][batch] = run.logits(batch)
                entry = run.measure(batch)
                by_device[device][batch] = entry
                result["measurements"].append(entry)
                handler = entry["handler"]
                print(
                    f"  {name} {device} batch {batch:>3}: {handler['images_per_s']:9.1f} images/s, p50 {handler['latency_ms']['p50']:8.1f} ms,"
                    f" p95 {handler['latency_ms']['p95']:8.1f} ms ({handler['iterations']} timed in {handler['seconds']:.1f} s)",
                    flush=True,
                )
        except Exception as error:  # a fault on one device (out of memory, say) must not lose the other results
            result["failures"].append(f"{name} on {device}: {type(error).__name__}: {error}")
        finally:
            run.close()
    for batch in args.batches:
        gpu, cpu = by_device.get("cuda:0", {}).get(batch), by_device.get("cpu", {}).get(batch)
        if gpu and cpu:
            result["ratios"].append({"model": name, "batch": batch, "handler": ratio(gpu, cpu, "handler"), "model_only": ratio(gpu, cpu, "model_only")})
        compared = []
        if batch in logits.get("cpu", {}):
            compared.append(agreement(name, batch, "cpu", "eager model on cpu", logits["cpu"][batch], eager_answers(eager, bodies[:batch])))
            if batch in logits.get("cuda:0", {}):
                compared.append(agreement(name, batch, "cuda:0", "handler on cpu", logits["cuda:0"][batch], logits["cpu"][batch]))
        for entry in compared:
            result["agreement"].append(entry)
            if not entry["top1_equal"]:
                result["failures"].append(f"{name} batch {batch}: top-1 on {entry['device']} differs from the {entry['reference']}'s ({entry})")


if __name__ == "__main__":
    sys.exit(main())
