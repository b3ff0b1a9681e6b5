"""`python -m models.package`: a user's own TorchScript classifier packaged with the reference handler, served by a real
TorchServe on loopback and checked against the same file run in this process; and the inputs it must refuse.

Takes about half a minute: one small model, one server start (one worker) and a few CLI runs of ~2 s each.
"""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
import torch
from models_support import LOGIT_TOLERANCE, REPO_ROOT, distinct_bodies, max_abs_diff, reference_logits, torchserve
from torch import nn

from models.build import MODELS_DIR, save_torchscript, trace
from models.handler import load_labels

NAME = "tiny-user-model"
CLASSES = 10
REQUEST_TIMEOUT = 30
LABELS = {str(index): f"user-label-{index}" for index in range(CLASSES)}


class TinyClassifier(nn.Module):
    """A user's own small image classifier: [B, 3, 224, 224] -> logits [B, 10]."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, kernel_size=5, stride=4), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten())
        self.classifier = nn.Linear(8 * 4 * 4, CLASSES)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(images))


class PerPixelClassifier(nn.Module):
    """A model that does not reduce to [B, N]: it answers [B, 3, 4] (a 3 x 4 map of scores per image)."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return nn.functional.adaptive_avg_pool2d(images, (3, 4)).mean(dim=1)


class NaNClassifier(nn.Module):
    """Right shape [B, 3], but every logit is NaN (the log of a negative number)."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.log(-1 - images.abs().mean(dim=(2, 3)))


def seeded(model_class: type[nn.Module], seed: int) -> nn.Module:
    # fork_rng keeps the global generator as it was, so other tests see the same random numbers with or without this one.
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return model_class().eval()


def write_torchscript(model: nn.Module, path: Path) -> Path:
    traced, trace_diff = trace(model, seed=0)
    assert trace_diff <= 1e-5
    save_torchscript(traced, path)
    return path


def run_package(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "models.package", *map(str, args)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, check=False)


@dataclass(frozen=True)
class Packaged:
    root: Path
    store: Path
    torchscript: Path
    labels: Path
    result: subprocess.CompletedProcess


@pytest.fixture(scope="module")
def packaged(tmp_path_factory) -> Packaged:
    root = tmp_path_factory.mktemp("package")
    # Deliberately not named after the model: the .mar stores it as <name>.pt.
    torchscript = write_torchscript(seeded(TinyClassifier, 3), root / "my classifier.pt")
    labels = root / "labels.json"
    labels.write_text(json.dumps(LABELS), encoding="utf-8")
    store = root / "store"
    result = run_package("--torchscript", torchscript, "--name", NAME, "--out", store, "--labels", labels)
    assert result.returncode == 0, f"models.package exited {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return Packaged(root, store, torchscript, labels, result)


@pytest.fixture(scope="module")
def served(packaged: Packaged) -> list[dict]:
    """Every distinct input (3 JPEG, 3 PNG, 3 .npy) sent to the packaged model, asking for 20 classes of its 10, and the logits."""
    answers = []
    with torchserve(packaged.root / "server", packaged.store, [NAME], batch_size=1, max_batch_delay_ms=10, ready_timeout=120) as server:
        print(f"torchserve start to ready (1 model, 1 worker): {server.ready_seconds:.1f} s")
        for body in distinct_bodies():
            answer = requests.post(
                f"{server.inference}/predictions/{NAME}",
                data=body.data,
                # More than the model's classes: the handler answers all of them.
                headers={"Content-Type": body.content_type, "X-Top-K": str(2 * CLASSES), "X-Return-Logits": "true"},
                timeout=REQUEST_TIMEOUT,
            )
            assert answer.status_code == 200, f"{body.name}: {answer.status_code} {answer.text[:300]}"
            answers.append(answer.json())
    return answers


def test_mar_holds_the_users_file_the_reference_handler_and_the_labels(packaged: Packaged) -> None:
    mar = packaged.store / f"{NAME}.mar"
    assert sorted(path.name for path in packaged.store.iterdir()) == [mar.name]
    assert packaged.result.stdout.startswith(f"{NAME}: {mar} (") and f"{CLASSES} classes, labels from {packaged.labels}" in packaged.result.stdout
    with zipfile.ZipFile(mar) as contents:
        assert contents.read(f"{NAME}.pt") == packaged.torchscript.read_bytes()
        assert contents.read("handler.py") == (MODELS_DIR / "handler.py").read_bytes()
        assert contents.read("preprocessing.py") == (MODELS_DIR / "preprocessing.py").read_bytes()
        assert json.loads(contents.read("index_to_name.json")) == LABELS
        contents.extract("index_to_name.json", packaged.root / "from-mar")
    assert load_labels(str(packaged.root / "from-mar" / "index_to_name.json")) == [LABELS[str(index)] for index in range(CLASSES)]


def test_served_logits_equal_in_process_logits(packaged: Packaged, served: list[dict]) -> None:
    bodies = distinct_bodies()
    expected = reference_logits(packaged.torchscript, bodies)
    got = torch.tensor([answer["logits"] for answer in served])
    assert got.shape == expected.shape == (len(bodies), CLASSES)
    assert {body.content_type for body in bodies} >= {"image/jpeg", "image/png", "application/x-npy"}
    difference = max_abs_diff(got, expected)
    print(f"{NAME}: max |served - in-process| logit difference {difference:.3g} over {len(bodies)} inputs")
    assert difference <= LOGIT_TOLERANCE
    closest = min(max_abs_diff(got[first], got[second]) for first in range(len(got)) for second in range(first + 1, len(got)))
    assert closest > 100 * LOGIT_TOLERANCE, f"two different inputs gave logits within {closest:.3g}; the comparison proves little"


def test_answers_carry_the_labels_file_names(served: list[dict]) -> None:
    for answer in served:
        assert answer["model"] == NAME and answer["version"] == "1.0"
        assert len(answer["top_k"]) == CLASSES
        assert [entry["class"] for entry in answer["top_k"]] == torch.argsort(torch.tensor(answer["logits"]), descending=True).tolist()
        assert all(entry["label"] == LABELS[str(entry["class"])] for entry in answer["top_k"])


@pytest.fixture(scope="module")
def bad_inputs(packaged: Packaged) -> Path:
    """One file per way a user's input can be wrong, next to the good model and labels."""
    directory = packaged.root / "bad-inputs"
    directory.mkdir()
    torch.save(seeded(TinyClassifier, 3).state_dict(), directory / "state_dict.pt")
    (directory / "random.pt").write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0), dtype=torch.uint8).numpy().tobytes())
    write_torchscript(PerPixelClassifier(), directory / "per_pixel.pt")
    write_torchscript(NaNClassifier(), directory / "nan.pt")
    (directory / "labels-missing-3.json").write_text(json.dumps({key: name for key, name in LABELS.items() if key != "3"}), encoding="utf-8")
    (directory / "labels-extra.json").write_text(json.dumps({**LABELS, "10": "one too many", "cat": "not an index"}), encoding="utf-8")
    return directory


# What is wrong: (arguments with {good} and {bad} placeholders, fragments the error message must hold).
REFUSALS = {
    "state_dict pickle": (["--torchscript", "{bad}/state_dict.pt", "--name", NAME], ["state_dict.pt", "torch.save() checkpoint", "torch.jit.trace"]),
    "random bytes": (["--torchscript", "{bad}/random.pt", "--name", NAME], ["random.pt", "not a TorchScript file", "torch.jit.script"]),
    "output [2, 3, 4]": (["--torchscript", "{bad}/per_pixel.pt", "--name", NAME], ["per_pixel.pt", "returned shape [2, 3, 4]", "expected [2, N]"]),
    "NaN logits": (["--torchscript", "{bad}/nan.pt", "--name", NAME], ["nan.pt", "NaN or infinite logits"]),
    "labels missing index 3": (
        ["--torchscript", "{good}", "--name", NAME, "--labels", "{bad}/labels-missing-3.json"],
        ["labels-missing-3.json", "missing class indices 3;", '"0" .. "9"'],
    ),
    "labels with extra keys": (
        ["--torchscript", "{good}", "--name", NAME, "--labels", "{bad}/labels-extra.json"],
        ["labels-extra.json", "extra keys '10', 'cat'"],
    ),
    "bad name": (["--torchscript", "{good}", "--name", "my model/v2"], ["--name 'my model/v2' is not a valid model name", "^[A-Za-z0-9][A-Za-z0-9_.-]*$"]),
}


@pytest.mark.parametrize("problem", REFUSALS)
def test_refusals_name_the_problem_and_write_nothing(packaged: Packaged, bad_inputs: Path, tmp_path: Path, problem: str) -> None:
    arguments, fragments = REFUSALS[problem]
    out = tmp_path / "store"
    out.mkdir()
    filled = [argument.format(good=packaged.torchscript, bad=bad_inputs) for argument in arguments]
    result = run_package(*filled, "--out", out)
    assert result.returncode == 1, f"{problem}: exited {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert result.stderr.startswith("package failed: ") and result.stdout == ""
    missing = [fragment for fragment in fragments if fragment not in result.stderr]
    assert not missing, f"{problem}: message lacks {missing}:\n{result.stderr}"
    assert list(out.iterdir()) == [], f"{problem}: models.package left {list(out.iterdir())} in --out"
