"""bench/gpu_check.py in quick mode on the CPU: the JSON it writes, and --require-gpu without a GPU. About 10 s on 2 cores."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("mlfleet_gpu_check", REPO_ROOT / "bench" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def test_quick_cpu_run_writes_the_measurements_and_the_machine(gpu_check, tmp_path: Path, capsys) -> None:
    out = tmp_path / "gpu_check.json"
    threads = torch.get_num_threads()
    assert gpu_check.main(["--quick", "--device", "cpu", "--models", "resnet18", "--batches", "1", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text(encoding="utf-8"))

    assert torch.get_num_threads() == threads, "the check must give back the thread count the handler set"
    assert result["ok"] is True and result["failures"] == [] and result["skipped"] == []
    assert result["devices"] == ["cpu"] and "--device cpu" in printed and f"results in {out}" in printed
    machine = result["machine"]
    assert {"hostname", "torch_version", "torch_cuda_version", "cpu_count", "cuda_available", "nvidia_driver_version"} <= set(machine)
    assert machine["torch_version"] == torch.__version__ and machine["cpu_count"] >= 1
    assert result["settings"]["batches"] == [1, 2] and result["settings"]["models"] == ["resnet18"]
    assert result["models"]["resnet18"]["trace_max_abs_diff"] <= 1e-5
    assert result["placement"] == [
        {"model": "resnet18", "expected": "cpu", "handler_device": "cpu", "parameters_on": "cpu", "ok": True},
    ]

    assert [(entry["model"], entry["device"], entry["batch"]) for entry in result["measurements"]] == [("resnet18", "cpu", 1), ("resnet18", "cpu", 2)]
    for entry in result["measurements"]:
        for path in ("handler", "model_only"):
            timing = entry[path]
            assert 1 <= timing["iterations"] <= 2 and timing["seconds"] > 0
            assert timing["images_per_s"] > 0
            assert 0 < timing["latency_ms"]["min"] <= timing["latency_ms"]["p50"] <= timing["latency_ms"]["p95"] <= timing["latency_ms"]["max"]
    assert result["ratios"] == [], "no GPU/CPU ratio without a GPU"

    assert [(entry["batch"], entry["device"], entry["reference"]) for entry in result["agreement"]] == [
        (1, "cpu", "eager model on cpu"),
        (2, "cpu", "eager model on cpu"),
    ]
    for entry in result["agreement"]:
        assert entry["top1_equal"] is True and entry["top1_mismatches"] == 0
        assert 0 <= entry["max_abs_logit_diff"] <= 1e-4 and entry["min_reference_top1_margin"] > 0
    assert "top-1 equal" in printed and "images/s" in printed


def test_percentile_interpolates_like_numpy(gpu_check) -> None:
    values = [5.0, 1.0, 3.0, 2.0, 4.0]
    assert [gpu_check.percentile(values, q) for q in (0, 50, 95, 100)] == pytest.approx([1.0, 3.0, 4.8, 5.0])
    assert gpu_check.percentile([7.0], 95) == 7.0


@pytest.mark.skipif(torch.cuda.is_available(), reason="this host has a CUDA device")
def test_require_gpu_without_a_gpu_exits_2(gpu_check, tmp_path: Path, capsys) -> None:
    out = tmp_path / "never.json"
    assert gpu_check.main(["--quick", "--require-gpu", "--out", str(out)]) == 2
    assert "no CUDA device found" in capsys.readouterr().err
    assert not out.exists()


def test_require_gpu_contradicts_device_cpu(gpu_check, capsys) -> None:
    with pytest.raises(SystemExit) as exited:
        gpu_check.main(["--require-gpu", "--device", "cpu"])
    assert exited.value.code == 2
    assert "--require-gpu" in capsys.readouterr().err


def test_a_fault_during_a_measurement_is_recorded_and_fails_the_run(gpu_check, tmp_path: Path, monkeypatch, capsys) -> None:
    def out_of_memory(self, batch: int) -> dict:
        raise RuntimeError(f"simulated out of memory at batch {batch}")

    monkeypatch.setattr(gpu_check.Run, "measure", out_of_memory)
    out = tmp_path / "failed.json"
    assert gpu_check.main(["--quick", "--device", "cpu", "--batches", "1", "--out", str(out)]) == 1
    result = json.loads(out.read_text(encoding="utf-8"))
    assert result["ok"] is False and result["measurements"] == []
    assert result["failures"] == ["resnet18 on cpu: RuntimeError: simulated out of memory at batch 1"]
    assert "FAILED: resnet18 on cpu" in capsys.readouterr().out
