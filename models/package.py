"""Package your own TorchScript image classifier with the reference handler into a TorchServe .mar.

    python -m models.package --torchscript FILE.pt --name NAME --out DIR [--version 1.0] [--labels labels.json]

The model must take what the handler feeds it, a float32 batch [B, 3, 224, 224] of ImageNet-normalised
images (see preprocessing.py), and return logits [B, N] for its N classes. Before anything is written,
the file is loaded with torch.jit.load, run once on a zero batch [2, 3, 224, 224], and the labels are
checked against N; any failure exits 1 with the reason on stderr and leaves DIR untouched.

DIR/NAME.mar holds FILE as NAME.pt (the same bytes), handler.py, preprocessing.py and index_to_name.json:
the labels file, or "class-<i>" for each class without one.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from models.build import archive, load_torchscript
from models.preprocessing import INPUT_SHAPE

# The torchserve role's rule for model names (roles/torchserve/tasks/preflight.yml): the name is also a URL path segment.
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
VALIDATION_BATCH = 2
EXPORT_HINT = "export the model with torch.jit.trace(model, torch.randn(1, 3, 224, 224)) or torch.jit.script(model) and save it with torch.jit.save"


class PackageError(ValueError):
    """Something about the user's input that stops packaging; the message names the file and the fix."""


@dataclass(frozen=True)
class PackageResult:
    mar: Path
    classes: int
    labels_source: str


def check_name(name: str) -> None:
    if not MODEL_NAME.match(name):
        raise PackageError(
            f"--name {name!r} is not a valid model name: start with a letter or digit and use only letters, digits, '_', '.' and '-' "
            f"(the torchserve role's rule {MODEL_NAME.pattern})"
        )


def describe_load_failure(path: Path, error: Exception) -> str:
    """Why `path` is not TorchScript, telling a torch.save() checkpoint (the usual mistake) from anything else."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as contents:
            members = contents.namelist()
        # torch.save writes <archive>/data.pkl; torch.jit.save adds <archive>/constants.pkl and the code.
        if any(member.endswith("/data.pkl") for member in members) and not any(member.endswith("/constants.pkl") for member in members):
            return f"{path} is a torch.save() checkpoint (a state_dict or a pickled module), not TorchScript; {EXPORT_HINT}"
    # torch's reader appends several sentences of generic advice about corrupt checkpoints; the first one is the finding.
    finding = str(error).strip().split(". ", maxsplit=1)[0].splitlines()[0] if str(error).strip() else type(error).__name__
    return f"{path} is not a TorchScript file (torch.jit.load: {finding}); {EXPORT_HINT}"


def load_user_torchscript(path: Path) -> torch.jit.ScriptModule:
    if not path.is_file():
        raise PackageError(f"{path} does not exist or is not a file; pass the TorchScript file written by torch.jit.save")
    try:
        return load_torchscript(path)
    except (RuntimeError, ValueError, OSError) as error:
        raise PackageError(describe_load_failure(path, error)) from error


def count_classes(module: torch.jit.ScriptModule, path: Path) -> int:
    """N from one forward pass on a zero batch, which must give finite float logits [2, N]."""
    expected_input = [VALIDATION_BATCH, *INPUT_SHAPE]
    needs = f"the handler feeds float32 {expected_input[1:]} ImageNet-normalised images in batches and expects logits [batch, N]"
    try:
        with torch.inference_mode():
            output = module(torch.zeros(*expected_input))
    except RuntimeError as error:
        raise PackageError(f"{path}: forward pass on a zero batch {expected_input} failed ({str(error).strip()[:500]}); {needs}") from error
    if not isinstance(output, torch.Tensor):
        raise PackageError(f"{path}: forward pass on a zero batch {expected_input} returned {type(output).__name__}, expected one tensor [2, N]; {needs}")
    shape = list(output.shape)
    if output.dim() != 2 or shape[0] != VALIDATION_BATCH or shape[1] < 1:
        raise PackageError(f"{path}: forward pass on a zero batch {expected_input} returned shape {shape}, expected [2, N] with N >= 1 classes; {needs}")
    if not output.is_floating_point():
        raise PackageError(f"{path}: forward pass on a zero batch {expected_input} returned {output.dtype} logits, expected a float tensor; {needs}")
    if not torch.isfinite(output).all():
        raise PackageError(
            f"{path}: forward pass on a zero batch {expected_input} returned NaN or infinite logits; the scores are their softmax, "
            "so they must be finite for every image, this all-zero one (the ImageNet mean colour) included"
        )
    return shape[1]


def listed(items: list[str], shown: int = 20) -> str:
    """Comma-separated, at most `shown` of them: a 1000-class labels file can miss hundreds."""
    more = f", ... ({len(items)} in all)" if len(items) > shown else ""
    return ", ".join(items[:shown]) + more


def default_labels(classes: int) -> dict[str, str]:
    return {str(index): f"class-{index}" for index in range(classes)}


def read_labels(path: Path, classes: int) -> dict[str, str]:
    """{"0": name, ..., "N-1": name} from a JSON file: the handler's rule (keys are the indices 0..N-1) with N from the model."""
    expected_shape = f'an object {{"0": "name", ..., "{classes - 1}": "name"}}'
    try:
        mapping = json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise PackageError(f"labels file {path} cannot be read ({error.strerror or error}); pass a JSON file with --labels") from error
    except ValueError as error:  # also UnicodeDecodeError
        raise PackageError(f"labels file {path} is not valid JSON ({error}); write {expected_shape}") from error
    if not isinstance(mapping, dict):
        raise PackageError(f"labels file {path} holds a JSON {type(mapping).__name__}, not an object; write {expected_shape}")
    expected = default_labels(classes).keys()
    missing = sorted(set(expected) - set(mapping), key=int)
    extra = sorted(set(mapping) - set(expected))
    if missing or extra:
        problems = [f"missing class indices {listed(missing)}"] if missing else []
        problems += [f"extra keys {listed([repr(key) for key in extra])}"] if extra else []
        raise PackageError(f'labels file {path}: {"; ".join(problems)}; the model has {classes} classes, so the keys must be exactly "0" .. "{classes - 1}"')
    not_text = [key for key in expected if not isinstance(mapping[key], str) or not mapping[key].strip()]
    if not_text:
        raise PackageError(f"labels file {path}: the labels of classes {listed(not_text)} are not non-empty strings")
    return {key: mapping[key] for key in expected}


def install(built: Path, destination: Path) -> None:
    """Copy into DIR under a temporary name, then rename: an earlier NAME.mar is replaced whole or not at all."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    descriptor, partial_name = tempfile.mkstemp(prefix=f".{destination.name}.", suffix=".partial", dir=destination.parent)
    os.close(descriptor)
    partial = Path(partial_name)
    try:
        shutil.copyfile(built, partial)
        partial.replace(destination)
    finally:
        partial.unlink(missing_ok=True)


def package(torchscript: Path, name: str, out: Path, version: str = "1.0", labels_path: Path | None = None) -> PackageResult:
    check_name(name)
    module = load_user_torchscript(torchscript)
    classes = count_classes(module, torchscript)
    labels = read_labels(labels_path, classes) if labels_path else default_labels(classes)
    if out.exists() and not out.is_dir():
        raise PackageError(f"--out {out} exists and is not a directory; pass a directory for the .mar")
    with tempfile.TemporaryDirectory(prefix=f"package-{name}-") as staging_dir:
        staging = Path(staging_dir)
        # The served file is named after the model, as in the reference .mar files, whatever the user called it.
        staged_torchscript = staging / f"{name}.pt"
        shutil.copyfile(torchscript, staged_torchscript)
        export = staging / "export"
        export.mkdir()
        built = archive(name, version, staged_torchscript, staging, export, labels)
        install(built, out / built.name)
    return PackageResult(out / built.name, classes, str(labels_path) if labels_path else "class-<i> placeholders")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models.package", description=__doc__.splitlines()[0])
    parser.add_argument("--torchscript", type=Path, required=True, help="the TorchScript file (torch.jit.save) of an image classifier")
    parser.add_argument("--name", required=True, help="model name, also the .mar name and the /predictions/<name> path")
    parser.add_argument("--out", type=Path, required=True, help="directory for NAME.mar (created when missing)")
    parser.add_argument("--version", default="1.0", help="model version recorded in the .mar (default 1.0)")
    parser.add_argument("--labels", type=Path, help='JSON object {"0": name, ..., "N-1": name} (default class-<i>)')
    args = parser.parse_args(argv)
    try:
        result = package(args.torchscript, args.name, args.out, args.version, args.labels)
    except (PackageError, RuntimeError, OSError) as error:
        print(f"package failed: {error}", file=sys.stderr)
        return 1
    size_mb = result.mar.stat().st_size / 1e6
    print(f"{args.name}: {result.mar} ({size_mb:.3g} MB) version {args.version} {result.classes} classes, labels from {result.labels_source}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
