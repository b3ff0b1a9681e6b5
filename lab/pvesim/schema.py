"""The Proxmox VE API schema the simulator obeys, and routing of request paths onto it.

`pve-api-subset.json` is a copy of the upstream schema (descriptions removed). Every parameter check and
every permission check reads it, so the simulator rejects what real Proxmox rejects without a hand-kept list.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

SCHEMA_FILE = Path(__file__).with_name("pve-api-subset.json")

# How many instances of each indexed key Proxmox allows (qemu-server's MAX_NETS, MAX_SCSI_DISKS, ...):
# `net32` is as unknown to Proxmox as `bogus`.
INDEXED_KEY_COUNTS = {
    "net": 32,
    "ipconfig": 32,
    "scsi": 31,
    "ide": 4,
    "sata": 6,
    "virtio": 16,
    "unused": 256,
    "hostpci": 16,
    "usb": 14,
    "serial": 4,
    "parallel": 3,
    "numa": 8,
    "virtiofs": 10,
}
_CONCRETE_INDEXED = re.compile(r"^(?P<base>[a-z]+)(?P<index>\d+)$")


@dataclass(frozen=True)
class Route:
    """One (path template, method) of the schema and what the schema says about it."""

    path: str
    method: str
    info: dict

    @property
    def parameters(self) -> dict:
        return self.info.get("parameters") or {}

    @property
    def permissions(self) -> dict:
        return self.info.get("permissions") or {}

    @property
    def returns(self) -> dict:
        return self.info.get("returns") or {}


def property_schema(properties: dict, name: str) -> dict | None:
    """The schema of `name` among `properties`, resolving `net0` to `net[n]` within Proxmox's index limits."""
    if name in properties:
        return properties[name]
    match = _CONCRETE_INDEXED.match(name)
    if not match:
        return None
    base, index = match["base"], int(match["index"])
    if index >= INDEXED_KEY_COUNTS.get(base, 0):
        return None
    return properties.get(f"{base}[n]")


class Schema:
    """All routes of the API subset, matched by path template."""

    def __init__(self, document: dict):
        self.document = document
        self._templates: list[tuple[re.Pattern, str]] = []
        for path in sorted(document, key=lambda p: (-p.count("/"), p)):
            pattern = re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[^/]+)", re.escape(path))
            self._templates.append((re.compile(f"^{pattern}$"), path))

    @classmethod
    def load(cls, path: Path = SCHEMA_FILE) -> Schema:
        return cls(json.loads(path.read_text(encoding="utf-8")))

    def match(self, request_path: str) -> tuple[str, dict[str, str]] | None:
        """The schema path template and the path parameters for a concrete request path."""
        for pattern, template in self._templates:
            found = pattern.match(request_path)
            if found:
                return template, found.groupdict()
        return None

    def route(self, template: str, method: str) -> Route | None:
        info = self.document.get(template, {}).get(method)
        return Route(template, method, info) if info is not None else None

    def routes(self) -> list[Route]:
        return [Route(path, method, info) for path, methods in self.document.items() for method, info in methods.items()]
