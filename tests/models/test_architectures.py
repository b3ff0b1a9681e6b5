"""Reference models, preprocessing and handler in this process: no TorchServe, a few seconds."""

from __future__ import annotations

import io
import json
import math
import re
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from models_support import FakeContext, jpeg_body, npy_array, npy_bytes, png_body
from PIL import Image
from torch import nn

from models.architectures import build_model
from models.build import LABELS, build, main, state_dict_sha256, trace
from models.handler import ImageClassifierHandler, served_by_headers
from models.preprocessing import IMAGENET_MEAN, IMAGENET_STD, InputError, body_to_tensor

# torchvision.models.resnet18() / densenet161() parameter counts.
TORCHVISION_PARAMETERS = {"resnet18": 11_689_512, "densenet161": 28_681_000}
MODELS = list(TORCHVISION_PARAMETERS)


@pytest.fixture(scope="module")
def resnet18() -> nn.Module:
    return build_model("resnet18", 0)


@pytest.mark.parametrize("name", MODELS)
def test_parameter_count_equals_torchvision(name: str) -> None:
    model = build_model(name, 0)
    assert sum(parameter.numel() for parameter in model.parameters()) == TORCHVISION_PARAMETERS[name]
    assert not model.training


def test_state_dict_keys_follow_torchvision() -> None:
    assert {"conv1.weight", "layer2.0.downsample.0.weight", "layer4.1.bn2.running_var", "fc.bias"} <= set(build_model("resnet18", 0).state_dict())
    densenet_keys = set(build_model("densenet161", 0).state_dict())
    assert {"features.conv0.weight", "features.denseblock4.denselayer24.conv2.weight", "features.transition3.conv.weight", "classifier.bias"} <= densenet_keys


@pytest.mark.parametrize("name", MODELS)
def test_same_seed_gives_bit_identical_weights(name: str) -> None:
    first, second = build_model(name, 7).state_dict(), build_model(name, 7).state_dict()
    assert first.keys() == second.keys()
    assert all(torch.equal(first[key], second[key]) for key in first)
    assert state_dict_sha256(build_model(name, 7)) == state_dict_sha256(build_model(name, 7))


@pytest.mark.parametrize("name", MODELS)
def test_different_seeds_give_different_weights(name: str) -> None:
    first, second = build_model(name, 0), build_model(name, 1)
    assert state_dict_sha256(first) != state_dict_sha256(second)
    for (key, one), (_other_key, other) in zip(first.named_parameters(), second.named_parameters(), strict=True):
        if key.endswith("weight") and one.dim() > 1:
            assert not torch.equal(one, other), key


def test_build_model_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    build_model("resnet18", 0)
    assert torch.equal(torch.rand(4), expected)


def assert_kaiming_normal(weight: torch.Tensor, fan: int) -> None:
    assert weight.std().item() == pytest.approx(math.sqrt(2 / fan), rel=0.05)
    assert abs(weight.mean().item()) < 0.05 * math.sqrt(2 / fan) + 1e-3


def test_initialisation_follows_torchvision(resnet18: nn.Module) -> None:
    # ResNet: kaiming normal, fan_out, relu; fc keeps nn.Linear's own uniform initialisation.
    assert_kaiming_normal(resnet18.layer3[0].conv1.weight, fan=256 * 9)
    bound = 1 / math.sqrt(512)
    assert resnet18.fc.weight.abs().max() <= bound and resnet18.fc.bias.abs().max() <= bound
    assert resnet18.fc.bias.abs().min() > 0
    # DenseNet: kaiming normal, fan_in; classifier bias zero.
    densenet = build_model("densenet161", 0)
    # 96 initial features + 6 layers x 48, halved by transition1: 192 inputs, 1x1 kernel.
    assert_kaiming_normal(densenet.features.denseblock2.denselayer1.conv1.weight, fan=192)
    assert torch.count_nonzero(densenet.classifier.bias) == 0
    for model in (resnet18, densenet):
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                assert torch.all(module.weight == 1) and torch.all(module.bias == 0)
                assert torch.all(module.running_mean == 0) and torch.all(module.running_var == 1)


def test_torchscript_equals_eager(resnet18: nn.Module) -> None:
    traced, worst = trace(resnet18, seed=3)
    assert worst <= 1e-5
    sample = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        assert (traced(sample) - resnet18(sample)).abs().max().item() <= 1e-5


def test_build_cli_rejects_unknown_model(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--out", str(tmp_path), "--models", "resnet18,vgg16"])
    assert exit_info.value.code == 2
    assert "unknown model(s) vgg16" in capsys.readouterr().err


def body_of(image: Image.Image, image_format: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format)
    return buffer.getvalue()


def npy_of(array: np.ndarray, allow_pickle: bool = False) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=allow_pickle)
    return buffer.getvalue()


def npz_of(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, image=array)
    return buffer.getvalue()


GOOD_JPEG = jpeg_body(0).data
GOOD_ARRAY = npy_array(0)

BAD_BODIES = {
    "unknown content type": ("text/plain", b"hello", 415, "Content-Type 'text/plain' is not supported"),
    "no content type": (None, GOOD_JPEG, 415, "request has no Content-Type"),
    "garbage jpeg": ("image/jpeg", b"\xff\xd8\xff\xe0garbage", 400, "not a decodable JPEG"),
    "truncated jpeg": ("image/jpeg", GOOD_JPEG[: len(GOOD_JPEG) // 2], 400, "not a decodable JPEG"),
    "png sent as jpeg": ("image/jpeg", png_body(1).data, 400, "body is PNG, not JPEG"),
    "empty png": ("image/png", b"", 400, "request body is empty"),
    "decoded text": ("image/png", "already a str", 400, "not binary"),
    "npy garbage": ("application/x-npy", b"\x93NUMPY garbage", 400, "not a .npy array"),
    "npy channels last": ("application/x-npy", npy_of(GOOD_ARRAY.transpose(1, 2, 0).copy()), 400, "shape is [224, 224, 3]"),
    "npy batch": ("application/x-npy", npy_of(GOOD_ARRAY[None]), 400, "shape is [1, 3, 224, 224]"),
    "npy float64": ("application/x-npy", npy_of(GOOD_ARRAY.astype(np.float64)), 400, "dtype is float64"),
    "npy pickled objects": ("application/x-npy", npy_of(np.array([{"a": 1}], dtype=object), allow_pickle=True), 400, "without pickled objects"),
    "npy nan": ("application/x-npy", npy_of(np.full((3, 224, 224), np.nan, dtype=np.float32)), 400, "NaN or infinite"),
    "npz archive": ("application/x-npy", npz_of(GOOD_ARRAY), 400, ".npz archive"),
}


@pytest.mark.parametrize("case", BAD_BODIES, ids=list(BAD_BODIES))
def test_preprocessing_rejects_bad_bodies_clearly(case: str) -> None:
    content_type, body, status, message = BAD_BODIES[case]
    with pytest.raises(InputError, match=re.escape(message)) as error:
        body_to_tensor(body, content_type)
    assert error.value.status == status


def test_preprocessing_refuses_huge_images_before_decoding() -> None:
    body = body_of(Image.new("L", (8000, 6000)), "PNG")
    with pytest.raises(InputError, match="image is 8000x6000 pixels"):
        body_to_tensor(body, "image/png")


@pytest.mark.parametrize(
    "content_type, body",
    [
        ("image/jpeg", jpeg_body(0, (320, 240)).data),
        ("image/jpeg; charset=binary", jpeg_body(1, (200, 500)).data),
        ("image/png", png_body(2, (256, 256)).data),
        ("IMAGE/PNG", png_body(3, (400, 260), mode="RGBA").data),
        ("image/png", png_body(4, (300, 240), mode="L").data),
    ],
)
def test_images_decode_to_the_model_input_shape(content_type: str, body: bytes) -> None:
    tensor = body_to_tensor(body, content_type)
    assert tensor.shape == (3, 224, 224) and tensor.dtype == torch.float32
    assert torch.isfinite(tensor).all()


def test_constant_colour_is_scaled_and_normalised() -> None:
    colour = (10, 128, 250)
    tensor = body_to_tensor(body_of(Image.new("RGB", (300, 260), colour), "PNG"), "image/png")
    for channel in range(3):
        expected = (colour[channel] / 255 - IMAGENET_MEAN[channel]) / IMAGENET_STD[channel]
        assert torch.allclose(tensor[channel], torch.full((224, 224), expected), atol=1e-6)


def test_short_side_is_256_and_the_crop_is_centred() -> None:
    # 512 x 256 needs no resize; each column holds its own x value, so the crop shows which columns it kept.
    columns = np.tile(np.arange(512, dtype=np.uint8)[None, :], (256, 1))
    tensor = body_to_tensor(body_of(Image.fromarray(columns, mode="L"), "PNG"), "image/png")
    kept = tensor[0, 0] * IMAGENET_STD[0] + IMAGENET_MEAN[0]
    assert torch.allclose(kept * 255, torch.arange(144, 368, dtype=torch.float32) % 256, atol=1e-3)


def test_npy_body_is_used_as_it_is() -> None:
    assert torch.equal(body_to_tensor(npy_bytes(GOOD_ARRAY), "application/x-npy"), torch.from_numpy(GOOD_ARRAY))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("handler-model")
    build(directory, seed=0, names=["resnet18"], torchscript_only=True)
    (directory / "index_to_name.json").write_text(json.dumps(LABELS), encoding="utf-8")
    return directory


def test_handler_answers_each_request_of_a_batch(model_dir: Path, monkeypatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", str(torch.get_num_threads()))
    good_jpeg, good_npy = jpeg_body(5), npy_bytes(npy_array(6))
    rows = [{"body": good_jpeg.data}, {"body": b"junk"}, {"body": good_npy}, {"body": "hello"}, {"body": good_npy}]
    headers = [
        {"Content-Type": "image/jpeg", "X-Top-K": "3"},
        {"Content-Type": "image/jpeg"},
        {"content-type": "application/x-npy", "X-Return-Logits": "TRUE"},
        {"Content-Type": "text/plain"},
        {"Content-Type": "application/x-npy", "X-Top-K": "0"},
    ]
    context = FakeContext(model_dir, "resnet18.pt", headers)
    handler = ImageClassifierHandler()
    handler.initialize(context)
    answers = [json.loads(answer) for answer in handler.handle(rows, context)]

    assert context.statuses == {1: (400, "Bad Request"), 3: (415, "Unsupported Media Type"), 4: (400, "Bad Request")}
    assert set(context.content_types.values()) == {"application/json"} and len(context.content_types) == len(rows)
    assert "not a decodable JPEG" in answers[1]["error"] and answers[1]["status"] == 400
    assert "X-Top-K='0'" in answers[4]["error"]
    assert [len(answers[0]["top_k"]), len(answers[2]["top_k"])] == [3, 5]
    assert "logits" not in answers[0]
    with torch.inference_mode():
        expected = build_model("resnet18", 0)(body_to_tensor(good_npy, "application/x-npy")[None])[0]
    assert (torch.tensor(answers[2]["logits"]) - expected).abs().max().item() <= 1e-5
    assert answers[2]["top_k"][0] == {
        "class": int(expected.argmax()),
        "label": f"class-{int(expected.argmax())}",
        "score": pytest.approx(torch.softmax(expected, 0).max().item(), abs=1e-6),
    }


def test_handler_names_the_serving_task_and_node_on_every_answer(model_dir: Path, monkeypatch) -> None:
    monkeypatch.setenv("MLFLEET_TASK", "resnet18.2.abc")
    monkeypatch.setenv("MLFLEET_NODE", "lab-worker-7")
    headers = [{"Content-Type": "application/x-npy"}, {"Content-Type": "text/plain"}]
    context = FakeContext(model_dir, "resnet18.pt", headers)
    handler = ImageClassifierHandler()
    handler.initialize(context)
    handler.handle([{"body": npy_bytes(npy_array(8))}, {"body": b"x"}], context)
    # Errors name their server too: a client behind the proxy can tell which task refused it.
    assert context.response_headers == dict.fromkeys(range(2), {"X-MLfleet-Task": "resnet18.2.abc", "X-MLfleet-Node": "lab-worker-7"})
    monkeypatch.delenv("MLFLEET_TASK")
    monkeypatch.delenv("MLFLEET_NODE")
    assert served_by_headers({}) == {"X-MLfleet-Task": socket.gethostname()}
