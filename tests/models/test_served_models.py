"""Both reference models built with `python -m models.build`, served by a real TorchServe on loopback, and checked
against the same TorchScript file run in this process.

Takes about a minute: two builds (seed 0 .mar files, seed 1 TorchScript), a server start and ~25 inferences.
"""

from __future__ import annotations

import json
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
import torch
from models_support import (
    LOGIT_TOLERANCE,
    SERVED_BY_NODE,
    SERVED_BY_TASK,
    Body,
    Server,
    distinct_bodies,
    extract_torchscript,
    jpeg_body,
    max_abs_diff,
    npy_body,
    npy_bytes,
    reference_logits,
    run_build,
    torchserve,
)

from models.build import load_torchscript, state_dict_sha256

MODELS = ["resnet18", "densenet161"]
REQUEST_TIMEOUT = 120
WEIGHTS_LINE = re.compile(r"^(\w+): .* weights sha256 ([0-9a-f]{64}) .* in ([\d.]+) s$", re.MULTILINE)


@dataclass(frozen=True)
class Builds:
    root: Path
    store: Path
    weights_sha256: dict[str, str]
    build_seconds: dict[str, float]
    torchscript: dict[str, Path]
    seed1_torchscript: dict[str, Path]


@pytest.fixture(scope="module")
def builds(tmp_path_factory) -> Builds:
    root = tmp_path_factory.mktemp("served-models")
    store = root / "store"
    output, _stderr = run_build(store, "--seed", "0", "--models", ",".join(MODELS))
    printed = {name: (digest, float(seconds)) for name, digest, seconds in WEIGHTS_LINE.findall(output)}
    assert sorted(printed) == sorted(MODELS), f"models.build printed no weight hash line for some model:\n{output}"
    run_build(root / "seed1", "--seed", "1", "--torchscript-only", "--models", ",".join(MODELS))
    extracted = root / "from-mar"
    for name in MODELS:
        print(f"{name}: built in {printed[name][1]:.1f} s, {name}.mar {(store / f'{name}.mar').stat().st_size / 1e6:.1f} MB")
    return Builds(
        root=root,
        store=store,
        weights_sha256={name: digest for name, (digest, _seconds) in printed.items()},
        build_seconds={name: seconds for name, (_digest, seconds) in printed.items()},
        torchscript={name: extract_torchscript(store / f"{name}.mar", name, extracted) for name in MODELS},
        seed1_torchscript={name: root / "seed1" / f"{name}.pt" for name in MODELS},
    )


@pytest.fixture(scope="module")
def server(builds: Builds):
    with torchserve(builds.root / "server", builds.store, MODELS, batch_size=4, max_batch_delay_ms=50) as running:
        print(f"torchserve start to ready (2 models, 1 worker each): {running.ready_seconds:.1f} s")
        yield running


def post_together(server: Server, model: str, bodies: list[Body], headers: list[dict[str, str]]) -> list[requests.Response]:
    """POST every body at the same moment (a barrier releases all threads), so the server batches them."""
    barrier = threading.Barrier(len(bodies), timeout=30)

    def send(index: int) -> requests.Response:
        barrier.wait()
        return requests.post(
            f"{server.inference}/predictions/{model}",
            data=bodies[index].data,
            headers={"Content-Type": bodies[index].content_type, **headers[index]},
            timeout=REQUEST_TIMEOUT,
        )

    with ThreadPoolExecutor(max_workers=len(bodies)) as pool:
        return list(pool.map(send, range(len(bodies))))


def batches_in_log(server: Server, model: str) -> list[tuple[int, int]]:
    """(requests, accepted) for every batch the model's handler logged."""
    pattern = re.compile(rf"W-\d+-{model}_[\d.]+-stdout MODEL_LOG - batch of (\d+) requests, (\d+) accepted")
    return [(int(size), int(accepted)) for size, accepted in pattern.findall(server.model_log())]


@pytest.fixture(scope="module")
def served(server: Server) -> dict[str, list[dict]]:
    """Every distinct input sent to each model at once, with logits requested and a different X-Top-K each."""
    bodies = distinct_bodies()
    headers = [{"X-Top-K": str(1 + (index * 7) % 20), "X-Return-Logits": "true"} for index in range(len(bodies))]
    results = {}
    for model in MODELS:
        responses = post_together(server, model, bodies, headers)
        failed = [
            (body.name, response.status_code, response.text[:300]) for body, response in zip(bodies, responses, strict=True) if response.status_code != 200
        ]
        assert not failed, f"{model}: requests failed: {failed}"
        results[model] = [response.json() for response in responses]
    return results


def test_build_is_deterministic_and_mar_holds_the_weights(builds: Builds, tmp_path: Path) -> None:
    for name in MODELS:
        recorded = (builds.store / f"{name}.sha256-of-weights").read_text().strip()
        assert recorded == builds.weights_sha256[name]
        assert state_dict_sha256(load_torchscript(builds.torchscript[name])) == recorded, f"{name}.pt in the .mar holds other weights"
    output, _stderr = run_build(tmp_path, "--seed", "0", "--torchscript-only", "--models", "resnet18")
    assert builds.weights_sha256["resnet18"] in output, f"a second seed-0 build printed another hash:\n{output}"
    assert (tmp_path / "resnet18.sha256-of-weights").read_text().strip() == builds.weights_sha256["resnet18"]


@pytest.mark.parametrize("model", MODELS)
def test_served_logits_equal_in_process_logits(builds: Builds, served: dict[str, list[dict]], model: str) -> None:
    expected = reference_logits(builds.torchscript[model], distinct_bodies())
    got = torch.tensor([answer["logits"] for answer in served[model]])
    assert got.shape == expected.shape == (len(distinct_bodies()), 1000)
    difference = max_abs_diff(got, expected)
    print(f"{model}: max |served - in-process| logit difference {difference:.3g}")
    assert difference <= LOGIT_TOLERANCE


@pytest.mark.parametrize("model", MODELS)
def test_top_k_is_consistent_with_logits(served: dict[str, list[dict]], model: str) -> None:
    for index, answer in enumerate(served[model]):
        logits = torch.tensor(answer["logits"])
        k = 1 + (index * 7) % 20
        assert answer["model"] == model
        assert [entry["class"] for entry in answer["top_k"]] == torch.argsort(logits, descending=True)[:k].tolist()
        probabilities = torch.softmax(logits, dim=0)
        for entry in answer["top_k"]:
            assert entry["label"] == f"class-{entry['class']}"
            assert entry["score"] == pytest.approx(probabilities[entry["class"]].item(), abs=1e-6)


@pytest.mark.parametrize("model", MODELS)
def test_outputs_differ_between_inputs(served: dict[str, list[dict]], model: str) -> None:
    logits = [torch.tensor(answer["logits"]) for answer in served[model]]
    closest = min(max_abs_diff(logits[i], logits[j]) for i in range(len(logits)) for j in range(i + 1, len(logits)))
    assert closest > 100 * LOGIT_TOLERANCE, f"{model}: two different inputs gave logits within {closest:.3g}"


@pytest.mark.parametrize("model", MODELS)
def test_other_seed_does_not_match_served_model(builds: Builds, served: dict[str, list[dict]], model: str) -> None:
    other = reference_logits(builds.seed1_torchscript[model], distinct_bodies())
    got = torch.tensor([answer["logits"] for answer in served[model]])
    closest = min(max_abs_diff(got[index], other[index]) for index in range(len(got)))
    assert closest > LOGIT_TOLERANCE, f"{model}: seed-1 logits match the served seed-0 model within {closest:.3g}; the comparison proves nothing"


@pytest.mark.parametrize("model", MODELS)
def test_concurrent_requests_were_batched(server: Server, served: dict[str, list[dict]], model: str) -> None:
    sizes = [size for size, _line in batches_in_log(server, model)]
    print(f"{model}: batch sizes seen by the handler {sizes}")
    assert sizes and max(sizes) > 1, f"{model}: no batch larger than 1 in the handler log: {sizes}"
    assert max(sizes) <= 4


def test_bad_requests_fail_alone_while_good_ones_succeed(builds: Builds, server: Server) -> None:
    model = "resnet18"
    wrong_shape = Body("npy-wrong-shape", "application/x-npy", npy_bytes(torch.zeros(3, 32, 32).numpy()))
    bodies = [
        Body("text", "text/plain", b"not an image"),
        Body("garbage-jpeg", "image/jpeg", b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4),
        wrong_shape,
        jpeg_body(10),
        npy_body(11),
    ]
    responses = post_together(server, model, bodies, [{"X-Return-Logits": "true"}] * len(bodies))
    statuses = {body.name: response.status_code for body, response in zip(bodies, responses, strict=True)}
    assert statuses == {"text": 415, "garbage-jpeg": 400, "npy-wrong-shape": 400, "jpeg-10": 200, "npy-11": 200}
    errors = {body.name: response.json()["error"] for body, response in zip(bodies, responses, strict=True) if response.status_code != 200}
    assert "text/plain" in errors["text"] and "not supported" in errors["text"]
    assert "not a decodable JPEG" in errors["garbage-jpeg"]
    assert "shape is [3, 32, 32]" in errors["npy-wrong-shape"]
    expected = reference_logits(builds.torchscript[model], bodies[3:])
    assert max_abs_diff([response.json()["logits"] for response in responses[3:]], expected) <= LOGIT_TOLERANCE
    mixed = [(size, accepted) for size, accepted in batches_in_log(server, model) if 0 < accepted < size]
    assert mixed, f"no batch held good and bad requests together: {batches_in_log(server, model)}"


def test_bad_header_is_a_client_error(server: Server) -> None:
    body = npy_body(12)
    answer = requests.post(
        f"{server.inference}/predictions/densenet161", data=body.data, headers={"Content-Type": body.content_type, "X-Top-K": "21"}, timeout=REQUEST_TIMEOUT
    )
    assert answer.status_code == 400
    assert "X-Top-K='21'" in json.loads(answer.text)["error"]


def test_answers_name_the_task_and_node_that_served_them(server: Server) -> None:
    body = npy_body(13)
    for model in MODELS:
        answer = requests.post(f"{server.inference}/predictions/{model}", data=body.data, headers={"Content-Type": body.content_type}, timeout=REQUEST_TIMEOUT)
        assert answer.status_code == 200
        assert (answer.headers.get("X-MLfleet-Task"), answer.headers.get("X-MLfleet-Node")) == (SERVED_BY_TASK, SERVED_BY_NODE)


def test_prometheus_metrics_count_inferences(server: Server, served: dict[str, list[dict]]) -> None:
    metrics = requests.get(f"{server.metrics}/metrics", timeout=10).text
    assert "ts_inference_requests_total" in metrics
    for model in MODELS:
        assert f'model_name="{model}"' in metrics
