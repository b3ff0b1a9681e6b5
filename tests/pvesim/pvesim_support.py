"""Helpers shared by the simulator tests: constants, and a handle on a running simulator."""

from __future__ import annotations

import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from lab.pvesim.config import DEFAULT_CONFIG
from lab.pvesim.server import Simulator

REPO_ROOT = Path(__file__).resolve().parents[2]

FAST_DURATIONS = {
    "clone_setup": 0.0,
    "clone_linked": 0.05,
    "clone_full": 0.05,
    "config": 0.0,
    "start": 0.02,
    "boot_to_agent": 0.2,
    "stop": 0.01,
    "shutdown": 0.05,
    "reboot": 0.05,
    "destroy": 0.01,
    "template": 0.01,
    "snapshot": 0.01,
}
ROOT_TOKEN = ("root@pam", "admin", DEFAULT_CONFIG["users"]["root@pam"]["tokens"]["admin"]["secret"])
AUTOMATION_TOKEN = ("automation@pve", "mlfleet", DEFAULT_CONFIG["users"]["automation@pve"]["tokens"]["mlfleet"]["secret"])
ROOT_PASSWORD = DEFAULT_CONFIG["users"]["root@pam"]["password"]
TEMPLATE = 9000
ED25519_KEY = (
    ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode() + " lab@control"
)
WAIT_LIMIT = 10.0


def token_header(token: tuple[str, str, str]) -> dict[str, str]:
    user, name, secret = token
    return {"Authorization": f"PVEAPIToken={user}!{name}={secret}"}


@dataclass
class Sim:
    """A running simulator and helpers to call it."""

    url: str
    simulator: Simulator

    @property
    def api(self) -> str:
        return self.url + "/api2/json"

    @property
    def ca_file(self) -> str:
        return str(self.simulator.certificates.ca_file)

    @property
    def port(self) -> int:
        return int(urllib.parse.urlsplit(self.url).port)

    def call(self, method: str, path: str, token: tuple[str, str, str] | None = ROOT_TOKEN, **kwargs) -> requests.Response:
        headers = {**(token_header(token) if token else {}), **kwargs.pop("headers", {})}
        return requests.request(method, self.api + path, headers=headers, verify=self.ca_file, timeout=10, **kwargs)

    def data(self, method: str, path: str, token: tuple[str, str, str] | None = ROOT_TOKEN, **kwargs):
        response = self.call(method, path, token, **kwargs)
        assert response.status_code == 200, f"{method} {path}: {response.status_code} {response.reason} {response.text}"
        return response.json()["data"]

    def wait_task(self, upid: str, token: tuple[str, str, str] | None = ROOT_TOKEN) -> dict:
        """Poll a task until it stopped (bounded), return its final status."""
        node = upid.split(":")[1]
        deadline = time.monotonic() + WAIT_LIMIT
        while time.monotonic() < deadline:
            status = self.data("GET", f"/nodes/{node}/tasks/{upid}/status", token)
            if status["status"] == "stopped":
                return status
            time.sleep(0.01)
        raise AssertionError(f"task {upid} still running after {WAIT_LIMIT}s")

    def admin(self, method: str, what: str, **kwargs) -> requests.Response:
        headers = {"Authorization": f"Bearer {self.simulator.admin_token}"}
        return requests.request(method, f"{self.url}/_sim/{what}", headers=headers, verify=self.ca_file, timeout=10, **kwargs)

    def clone(self, newid: int, source: int = TEMPLATE, node: str = "pve1", token: tuple[str, str, str] | None = ROOT_TOKEN, **params) -> dict:
        upid = self.data("POST", f"/nodes/{node}/qemu/{source}/clone", token, data={"newid": newid, **params})
        return self.wait_task(upid, token)
