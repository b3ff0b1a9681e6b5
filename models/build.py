"""Build the reference models from a seed: TorchScript, weight hash and a TorchServe .mar per model.

    python -m models.build --out DIR [--seed 0] [--models resnet18,densenet161] [--version 1.0] [--torchscript-only]

For each model this writes DIR/<name>.mar (handler.py, preprocessing.py, index_to_name.json and the
TorchScript file <name>.pt inside) and DIR/<name>.sha256-of-weights; with --torchscript-only it writes
DIR/<name>.pt instead of the .mar. The build fails when the traced model's outputs differ from the eager
model's by more than 1e-5, or when a second initialisation from the same seed gives other weights.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from models.architectures import ARCHITECTURES, NUM_CLASSES, build_model
from models.preprocessing import INPUT_SHAPE

MODELS_DIR = Path(__file__).resolve().parent
TRACE_TOLERANCE = 1e-5
# Not ImageNet's class names: no label file can be downloaded here, and the weights are random anyway.
LABELS = {str(index): f"class-{index}" for index in range(NUM_CLASSES)}


@dataclass(frozen=True)
class BuildResult:
    name: str
    artifact: Path
    weights_sha256: str
    trace_max_abs_diff: float
    seconds: float


def state_dict_sha256(module: torch.nn.Module) -> str:
    """SHA-256 over every parameter and buffer: names, dtypes, shapes and values, in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def trace(model: torch.nn.Module, seed: int) -> tuple[torch.jit.ScriptModule, float]:
    """TorchScript by tracing, and the largest |traced - eager| on fresh inputs of batch sizes 1 and 3."""
    generator = torch.Generator().manual_seed(seed)
    example = torch.randn(2, *INPUT_SHAPE, generator=generator)
    # torch 2.13 deprecates torch.jit in favour of torch.export, but TorchServe 0.12 loads models as
    # TorchScript; its torch.export path (AOT-compiled .so) is marked experimental.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=r".*torch\.jit")
        traced = torch.jit.trace(model, example, check_trace=False)
    worst = 0.0
    with torch.inference_mode():
        for batch in (1, 3):
            sample = torch.randn(batch, *INPUT_SHAPE, generator=generator)
            worst = max(worst, (traced(sample) - model(sample)).abs().max().item())
    return traced, worst


def load_torchscript(path: Path) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=r".*torch\.jit")
        return torch.jit.load(str(path), map_location="cpu").eval()


def save_torchscript(module: torch.jit.ScriptModule, path: Path) -> None:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=r".*torch\.jit")
        torch.jit.save(module, str(path))


def archive(name: str, version: str, torchscript: Path, staging: Path, out: Path, labels: Mapping[str, str]) -> Path:
    """DIR/<name>.mar made by torch-model-archiver's CLI in a child process.

    `labels` ({"0": name, ...}) becomes the index_to_name.json the handler reads; it must already cover
    the model's class indices 0..N-1. The archiver stages files in $TMPDIR/<model name> and deletes that
    directory first, so it gets a private TMPDIR: two builds (or anyone's /tmp/resnet18) must not wipe each other.
    """
    labels_file = staging / "index_to_name.json"
    labels_file.write_text(json.dumps(dict(labels), indent=0) + "\n", encoding="utf-8")
    archiver_tmp = staging / "archiver-tmp"
    archiver_tmp.mkdir()
    command = [
        sys.executable,
        "-m",
        "model_archiver.model_packaging",
        "--model-name",
        name,
        "--version",
        version,
        "--serialized-file",
        str(torchscript),
        "--handler",
        str(MODELS_DIR / "handler.py"),
        "--extra-files",
        f"{MODELS_DIR / 'preprocessing.py'},{labels_file}",
        "--export-path",
        str(out),
        "--force",
    ]
    result = subprocess.run(command, env={**os.environ, "TMPDIR": str(archiver_tmp)}, capture_output=True, text=True, timeout=600, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"torch-model-archiver failed for {name} (exit {result.returncode}): {result.stderr.strip() or result.stdout.strip()}")
    return out / f"{name}.mar"


def build_one(name: str, seed: int, version: str, out: Path, torchscript_only: bool) -> BuildResult:
    started = time.monotonic()
    model = build_model(name, seed)
    weights = state_dict_sha256(model)
    traced, trace_diff = trace(model, seed)
    if trace_diff > TRACE_TOLERANCE:
        raise RuntimeError(f"{name}: TorchScript output differs from eager by {trace_diff:.3g} > {TRACE_TOLERANCE}; the trace lost part of the model")
    again = state_dict_sha256(build_model(name, seed))
    if again != weights:
        raise RuntimeError(
            f"{name}: two initialisations from seed {seed} gave different weights ({weights[:12]} vs {again[:12]}); build_model is not deterministic"
        )
    with tempfile.TemporaryDirectory(prefix=f"build-{name}-") as staging_dir:
        staging = Path(staging_dir)
        torchscript = (out if torchscript_only else staging) / f"{name}.pt"
        save_torchscript(traced, torchscript)
        saved = state_dict_sha256(load_torchscript(torchscript))
        if saved != weights:
            raise RuntimeError(f"{name}: TorchScript file {torchscript} holds other weights than the model ({saved[:12]} vs {weights[:12]})")
        artifact = torchscript if torchscript_only else archive(name, version, torchscript, staging, out, LABELS)
    (out / f"{name}.sha256-of-weights").write_text(f"{weights}\n", encoding="ascii")
    return BuildResult(name, artifact, weights, trace_diff, time.monotonic() - started)


def build(out: Path, seed: int, names: list[str], version: str = "1.0", torchscript_only: bool = False) -> list[BuildResult]:
    out.mkdir(parents=True, exist_ok=True)
    return [build_one(name, seed, version, out, torchscript_only) for name in names]


def model_names(value: str) -> list[str]:
    names = [name.strip() for name in value.split(",") if name.strip()]
    unknown = sorted(set(names) - set(ARCHITECTURES))
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown model(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(ARCHITECTURES)}")
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models.build", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for the .mar (or .pt) files and weight hashes")
    parser.add_argument("--seed", type=int, default=0, help="initialisation seed (default 0)")
    parser.add_argument("--models", type=model_names, default=list(ARCHITECTURES), help="comma-separated (default resnet18,densenet161)")
    parser.add_argument("--version", default="1.0", help="model version recorded in the .mar (default 1.0)")
    parser.add_argument("--torchscript-only", action="store_true", help="write <name>.pt and skip the .mar")
    args = parser.parse_args(argv)
    try:
        results = build(args.out, args.seed, args.models, args.version, args.torchscript_only)
    except RuntimeError as error:
        print(f"build failed: {error}", file=sys.stderr)
        return 1
    for result in results:
        print(
            f"{result.name}: {result.artifact} ({result.artifact.stat().st_size / 1e6:.1f} MB) seed {args.seed} "
            f"weights sha256 {result.weights_sha256} trace max |diff| {result.trace_max_abs_diff:.2g} in {result.seconds:.1f} s"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
