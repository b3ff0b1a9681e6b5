"""TorchServe handler for the reference image classifiers (TorchScript file + index_to_name.json in the .mar).

One request is one image: the raw body is JPEG, PNG or a .npy float32 [3, 224, 224] array, chosen by
its Content-Type (see preprocessing.py). Request headers:

- ``X-Top-K``: how many classes to return, 1 to 20 (default 5).
- ``X-Return-Logits: true``: also return the raw logits (one per class) under ``logits``.

Every answer names who served it in the response headers ``X-MLfleet-Task`` (``MLFLEET_TASK``, else the
host name) and ``X-MLfleet-Node`` (``MLFLEET_NODE``, when set); the torchserve role sets both from Swarm's
templates, so a client behind the edge proxy sees which task on which node answered.

A success is HTTP 200 with ``{"model", "version", "top_k": [{"class", "label", "score"}], "logits"?}``;
``score`` is the softmax probability.

Errors. TorchServe 0.12 (ts/service.py) turns any exception out of ``handle`` into one status for the
whole batch (503 "Prediction failed", or a PredictionException's code), so one bad body would fail the
other requests that happened to be batched with it. Request errors are therefore caught per request:
that request gets status 400 (bad body or header) or 415 (unsupported Content-Type) through
``context.set_response_status`` and the body ``{"model", "version", "error", "status"}``; the valid
requests of the batch go through one forward pass. Only faults of the server itself (the model failing
to run) still raise and fail the whole batch with 503.

Device. As TorchServe's own BaseHandler does, a worker runs on ``cuda:<gpu_id>`` when CUDA is available
and the context's ``system_properties`` carry a ``gpu_id``, else on the CPU (`select_device`). TorchServe
gives each worker a gpu_id from the GPUs it found (``number_of_gpu``, round robin), and none on a host
without GPUs. A Swarm task that reserves one GPU sees only that GPU, so its workers get gpu_id 0. The
model is loaded onto the device, each batch is moved there and the logits come back to the CPU for the answers.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import warnings
from http import HTTPStatus

import torch

if __package__:
    from .preprocessing import InputError, body_to_tensor
else:
    # TorchServe imports handler.py as a top-level module from the unpacked model dir, next to preprocessing.py.
    from preprocessing import InputError, body_to_tensor

logger = logging.getLogger(__name__)

DEFAULT_TOP_K = 5
MAX_TOP_K = 20
LABELS_FILE = "index_to_name.json"


def threads_from_env(environ: dict[str, str]) -> int:
    """Intra-op threads per worker from OMP_NUM_THREADS (default 1): workers x threads must fit the node's cores."""
    value = environ.get("OMP_NUM_THREADS", "1")
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"OMP_NUM_THREADS={value!r} is not a positive integer; set it to the cores per worker")
    return int(value)


def served_by_headers(environ) -> dict[str, str]:
    """The response headers that name the task and node serving the answers."""
    headers = {"X-MLfleet-Task": environ.get("MLFLEET_TASK") or socket.gethostname()}
    if environ.get("MLFLEET_NODE"):
        headers["X-MLfleet-Node"] = environ["MLFLEET_NODE"]
    return headers


def load_labels(path: str) -> list[str]:
    """Labels by class index from {"0": name, ...}, which must cover 0..N-1 without gaps."""
    with open(path, encoding="utf-8") as labels_file:
        mapping = json.load(labels_file)
    expected = [str(index) for index in range(len(mapping))]
    if set(mapping) != set(expected):
        raise ValueError(f"{path}: keys must be the class indices 0..{len(mapping) - 1}")
    return [mapping[key] for key in expected]


def select_device(gpu_id, cuda_available: bool, cuda_device_count: int) -> str:
    """The device to run on: "cuda:<gpu_id>" when CUDA is available and TorchServe gave a gpu_id, else "cpu".

    Like TorchServe's BaseHandler, a gpu_id without CUDA (a CPU-only torch, say) means the CPU. A gpu_id
    that names no visible device is an error rather than a guess: the worker would fail on its first batch.
    """
    if gpu_id is None or not cuda_available:
        return "cpu"
    if isinstance(gpu_id, bool) or not (isinstance(gpu_id, int) or (isinstance(gpu_id, str) and gpu_id.strip().isdigit())):
        raise ValueError(f"gpu_id={gpu_id!r} is not a GPU index (0, 1, ...)")
    index = int(gpu_id)
    if not 0 <= index < cuda_device_count:
        visible = f"0..{cuda_device_count - 1}" if cuda_device_count else "none"
        raise ValueError(
            f"gpu_id={index} but this process sees {cuda_device_count} CUDA device(s) (indices {visible}); "
            "check TorchServe's number_of_gpu against the GPUs given to the container (CUDA_VISIBLE_DEVICES)"
        )
    return f"cuda:{index}"


def request_headers(context, idx: int) -> dict[str, str]:
    """Request idx's headers with lower-case names.

    context.get_request_header(idx, "content-type") is a case-sensitive lookup and the frontend keeps the
    client's spelling ("Content-Type" from most clients), so names are folded here as HTTP intends.
    """
    return {name.lower(): value for name, value in context.get_all_request_header(idx).items() if isinstance(value, str)}


def top_k_from(headers: dict[str, str]) -> int:
    value = headers.get("x-top-k", str(DEFAULT_TOP_K)).strip()
    if not value.isdigit() or not 1 <= int(value) <= MAX_TOP_K:
        raise InputError(f"X-Top-K={value!r}; send an integer from 1 to {MAX_TOP_K}")
    return int(value)


def return_logits_from(headers: dict[str, str]) -> bool:
    value = headers.get("x-return-logits", "false").strip().lower()
    if value not in ("true", "false"):
        raise InputError(f"X-Return-Logits={value!r}; send true or false")
    return value == "true"


class ImageClassifierHandler:
    """Batched top-k classification with per-request errors; TorchServe instantiates it once per worker."""

    def __init__(self) -> None:
        self.model = None
        self.device = torch.device("cpu")
        self.labels: list[str] = []
        self.model_name = ""
        self.version = ""
        self.served_by: dict[str, str] = {}
        self.initialized = False

    def initialize(self, context) -> None:
        threads = threads_from_env(os.environ)
        torch.set_num_threads(threads)
        model_dir = context.system_properties["model_dir"]
        manifest = context.manifest["model"]
        gpu_id = context.system_properties.get("gpu_id")
        cuda_available = torch.cuda.is_available()
        if gpu_id is not None and not cuda_available:
            logger.warning("gpu_id %s given but CUDA is not available to torch %s; running on the CPU", gpu_id, torch.__version__)
        self.device = torch.device(select_device(gpu_id, cuda_available, torch.cuda.device_count() if cuda_available else 0))
        with warnings.catch_warnings():
            # torch 2.13 deprecates torch.jit for torch.export; TorchServe 0.12 serves TorchScript (its export path is experimental).
            warnings.filterwarnings("ignore", category=DeprecationWarning, message=r".*torch\.jit")
            self.model = torch.jit.load(os.path.join(model_dir, manifest["serializedFile"]), map_location=self.device).eval()
        self.labels = load_labels(os.path.join(model_dir, LABELS_FILE))
        self.model_name = context.model_name
        self.version = manifest.get("modelVersion", "")
        self.served_by = served_by_headers(os.environ)
        self.initialized = True
        device_name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "CPU"
        logger.info(
            "%s %s loaded on %s (%s) with %d classes, %d intra-op threads",
            self.model_name,
            self.version,
            self.device,
            device_name,
            len(self.labels),
            threads,
        )

    def handle(self, data: list[dict], context) -> list[str]:
        responses: list[str] = [""] * len(data)
        accepted: list[tuple[int, int, bool]] = []
        inputs: list[torch.Tensor] = []
        for idx, row in enumerate(data):
            context.set_response_content_type(idx, "application/json")
            for name, value in self.served_by.items():
                context.set_response_header(idx, name, value)
            headers = request_headers(context, idx)
            try:
                options = (top_k_from(headers), return_logits_from(headers))
                # TorchServe passes a raw request body as "body"; multipart forms are not accepted.
                inputs.append(body_to_tensor(row.get("body"), headers.get("content-type")))
            except InputError as error:
                context.set_response_status(error.status, HTTPStatus(error.status).phrase, idx)
                responses[idx] = json.dumps({"model": self.model_name, "version": self.version, "error": str(error), "status": error.status})
                continue
            accepted.append((idx, *options))
        logger.info("batch of %d requests, %d accepted", len(data), len(accepted))
        if not inputs:
            return responses
        with torch.inference_mode():
            # On the CPU both moves return the tensor itself; on a GPU the answers are built from a host copy.
            logits = self.model(torch.stack(inputs).to(self.device)).cpu()
        scores = torch.softmax(logits, dim=1)
        for (idx, top_k, return_logits), row_logits, row_scores in zip(accepted, logits, scores, strict=True):
            # A model with fewer classes than asked for answers all of them, best first.
            best = torch.topk(row_scores, min(top_k, row_scores.numel()))
            result = {
                "model": self.model_name,
                "version": self.version,
                "top_k": [
                    {"class": int(index), "label": self.labels[int(index)], "score": float(score)}
                    for score, index in zip(best.values.tolist(), best.indices.tolist(), strict=True)
                ],
            }
            if return_logits:
                result["logits"] = row_logits.tolist()
            responses[idx] = json.dumps(result)
        return responses
