"""A TorchServe request context for running the handler in-process: the parts of ``ts.context.Context`` that
``handler.ImageClassifierHandler`` uses, for one batch of request headers. The benchmarks and the tests run the
handler through it without TorchServe; ``gpu_id`` is what TorchServe puts in ``system_properties`` for a worker it
gives a GPU."""

from __future__ import annotations

from pathlib import Path


class LocalContext:
    def __init__(self, model_dir: Path, serialized_file: str, headers: list[dict[str, str]], gpu_id: int | None = None, model_name: str = "reference") -> None:
        self.model_name = model_name
        self.system_properties: dict = {"model_dir": str(model_dir)}
        if gpu_id is not None:
            self.system_properties["gpu_id"] = gpu_id
        self.manifest = {"model": {"serializedFile": serialized_file, "modelVersion": "1.0"}}
        self.headers = headers
        self.statuses: dict[int, tuple[int, str]] = {}
        self.content_types: dict[int, str] = {}
        self.response_headers: dict[int, dict[str, str]] = {}

    def get_all_request_header(self, idx: int) -> dict[str, str]:
        return self.headers[idx]

    def set_response_status(self, code: int = 200, phrase: str = "", idx: int = 0) -> None:
        self.statuses[idx] = (code, phrase)

    def set_response_content_type(self, idx: int, value: str) -> None:
        self.content_types[idx] = value

    def set_response_header(self, idx: int, name: str, value: str) -> None:
        self.response_headers.setdefault(idx, {})[name] = value
