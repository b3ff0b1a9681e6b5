"""The handler's device choice (models.handler.select_device), as TorchServe's BaseHandler makes it; a tiny model, no GPU needed."""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import pytest
import torch
from models_support import FakeContext, npy_array, npy_bytes
from torch import nn

from models.build import save_torchscript
from models.handler import LABELS_FILE, ImageClassifierHandler, select_device


@pytest.mark.parametrize(
    ("gpu_id", "cuda_available", "cuda_device_count", "expected"),
    [
        pytest.param(None, False, 0, "cpu", id="cpu-host-no-gpu-id"),
        pytest.param(None, True, 1, "cpu", id="gpu-host-but-no-gpu-id"),
        pytest.param(None, True, 4, "cpu", id="number-of-gpu-0-on-a-4-gpu-host"),
        pytest.param(0, True, 1, "cuda:0", id="swarm-task-with-its-one-gpu"),
        pytest.param(3, True, 4, "cuda:3", id="last-of-four"),
        pytest.param(1, True, 2, "cuda:1", id="second-of-two"),
        pytest.param("2", True, 4, "cuda:2", id="gpu-id-as-string"),
        pytest.param(0, False, 0, "cpu", id="gpu-id-without-cuda-falls-back-like-basehandler"),
        pytest.param(5, False, 0, "cpu", id="any-gpu-id-without-cuda-is-the-cpu"),
    ],
)
def test_select_device(gpu_id, cuda_available: bool, cuda_device_count: int, expected: str) -> None:
    assert select_device(gpu_id, cuda_available, cuda_device_count) == expected


@pytest.mark.parametrize(
    ("gpu_id", "cuda_device_count", "message"),
    [
        pytest.param(1, 1, r"gpu_id=1 but this process sees 1 CUDA device\(s\) \(indices 0\.\.0\)", id="one-past-the-only-gpu"),
        pytest.param(4, 4, r"gpu_id=4 but this process sees 4 CUDA device\(s\) \(indices 0\.\.3\)", id="one-past-four"),
        pytest.param(0, 0, r"gpu_id=0 but this process sees 0 CUDA device\(s\) \(indices none\)", id="cuda-but-no-visible-device"),
        pytest.param(-1, 2, r"gpu_id=-1 but this process sees 2", id="negative"),
        pytest.param("x", 2, r"gpu_id='x' is not a GPU index", id="not-a-number"),
        pytest.param(True, 2, r"gpu_id=True is not a GPU index", id="bool-is-not-an-index"),
        pytest.param(1.0, 2, r"gpu_id=1\.0 is not a GPU index", id="float-is-not-an-index"),
    ],
)
def test_select_device_refuses_a_gpu_id_out_of_range(gpu_id, cuda_device_count: int, message: str) -> None:
    with pytest.raises(ValueError, match=message) as raised:
        select_device(gpu_id, True, cuda_device_count)
    if isinstance(gpu_id, int) and not isinstance(gpu_id, bool):
        assert "CUDA_VISIBLE_DEVICES" in str(raised.value)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 4-class TorchScript model on [3, 224, 224] inputs and its labels: the handler's whole path in milliseconds."""
    directory = tmp_path_factory.mktemp("tiny-model")
    torch.manual_seed(0)
    model = nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(3 * 4 * 4, 4)).eval()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=r".*torch\.jit")
        traced = torch.jit.trace(model, torch.randn(2, 3, 224, 224))
    save_torchscript(traced, directory / "tiny.pt")
    (directory / LABELS_FILE).write_text(json.dumps({str(index): f"tiny-{index}" for index in range(4)}), encoding="utf-8")
    return directory


def loaded(model_dir: Path, gpu_id, batch: int) -> tuple[ImageClassifierHandler, FakeContext]:
    context = FakeContext(model_dir, "tiny.pt", [{"Content-Type": "application/x-npy", "X-Return-Logits": "true"}] * batch)
    if gpu_id is not None:
        context.system_properties["gpu_id"] = gpu_id
    handler = ImageClassifierHandler()
    handler.initialize(context)
    return handler, context


def test_handler_loads_and_answers_on_the_device_it_selects(tiny_model_dir: Path, caplog) -> None:
    rows = [{"body": npy_bytes(npy_array(index))} for index in range(3)]
    cpu, cpu_context = loaded(tiny_model_dir, None, len(rows))
    assert cpu.device == torch.device("cpu")
    caplog.set_level(logging.INFO, logger="models.handler")
    worker, worker_context = loaded(tiny_model_dir, 0, len(rows))
    expected = "cuda:0" if torch.cuda.is_available() else "cpu"
    assert worker.device == torch.device(expected)
    assert all(parameter.device == worker.device for parameter in worker.model.parameters())
    assert f"loaded on {expected}" in caplog.text
    if not torch.cuda.is_available():
        assert "gpu_id 0 given but CUDA is not available" in caplog.text
    on_cpu = [json.loads(answer) for answer in cpu.handle(rows, cpu_context)]
    on_worker = [json.loads(answer) for answer in worker.handle(rows, worker_context)]
    assert not cpu_context.statuses and not worker_context.statuses
    for first, second in zip(on_cpu, on_worker, strict=True):
        assert first["top_k"][0]["class"] == second["top_k"][0]["class"]
        assert (torch.tensor(first["logits"]) - torch.tensor(second["logits"])).abs().max().item() <= 1e-3


def test_handler_refuses_a_gpu_id_the_container_does_not_see(tiny_model_dir: Path, monkeypatch) -> None:
    # A CUDA host with one visible GPU, and TorchServe configured for more (number_of_gpu > GPUs given to the task).
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match=r"gpu_id=1 but this process sees 1 CUDA device"):
        loaded(tiny_model_dir, 1, 1)
