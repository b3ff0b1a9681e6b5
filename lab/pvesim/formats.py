"""The `format` checks of the Proxmox schema, and the property-string formats (`ip=...,gw=...`).

Each check raises FormatError with the reason Proxmox gives; the validator prefixes it with "invalid format - ".
Formats this file does not know are accepted: the README lists which ones are checked.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
import urllib.parse
from collections.abc import Callable


class FormatError(ValueError):
    """A value does not have the format its schema names."""


_HOSTNAME = re.compile(r"^[a-zA-Z0-9]([a-zA-Z0-9\-]*[a-zA-Z0-9])?$")
_DNS_NAME = re.compile(r"^([a-zA-Z0-9]([a-zA-Z0-9\-]*[a-zA-Z0-9])?\.)*([a-zA-Z0-9]([a-zA-Z0-9\-]*[a-zA-Z0-9])?)$")
_TAG = re.compile(r"^[a-z0-9_][a-z0-9_\-+.]*$", re.IGNORECASE)
_POOL_ID = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_\-]*(/[A-Za-z0-9_][A-Za-z0-9_\-]*){0,2}$")
_STORAGE_ID = re.compile(r"^[a-z][a-z0-9\-_.]*[a-z0-9]$", re.IGNORECASE)
_CONFIG_ID = re.compile(r"^[a-z][a-z0-9_]+$", re.IGNORECASE)
_REALM = re.compile(r"^[A-Za-z][A-Za-z0-9.\-_]+$")
_BRIDGE = re.compile(r"^[-_.\w\d]+$")
_MAC = re.compile(r"^([0-9a-f]{2}:){5}[0-9a-f]{2}$", re.IGNORECASE)
_URLENCODED = re.compile(r"^(?:[A-Za-z0-9\-._~!$&'()*+,;=:@/?]|%[0-9A-Fa-f]{2})*$")
_LIST_SEPARATORS = re.compile(r"[,;\s]+")
_SSH_KEY_TYPES = {
    "ssh-rsa",
    "ssh-dss",
    "ssh-ed25519",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
}


def split_list(value: str) -> list[str]:
    """Proxmox lists (`-list` formats, tags) accept commas, semicolons and blanks as separators."""
    return [item for item in _LIST_SEPARATORS.split(value) if item]


def unique_tags(value: str) -> str:
    """Tags as Proxmox stores them (pve-guest-common `get_unique_tags` with datacenter.cfg's default tag-style):
    sorted without regard to case, lower-cased, each once, joined with `;`."""
    tags: list[str] = []
    for tag in sorted(split_list(value), key=str.lower):
        if tag.lower() not in tags:
            tags.append(tag.lower())
    return ";".join(tags)


def _vmid(value: str) -> None:
    if not re.fullmatch(r"[1-9]\d{2,8}", value):
        raise FormatError("value does not look like a valid VM ID")


def _matching(pattern: re.Pattern, message: str):
    """A format check: the value must match `pattern`, else FormatError(message with {value} filled in)."""

    def check(value: str) -> None:
        if not pattern.match(value):
            raise FormatError(message.format(value=value))

    return check


_node = _matching(_HOSTNAME, "value does not look like a valid node name")
_dns_name = _matching(_DNS_NAME, "value does not look like a valid DNS name")
_pool_id = _matching(_POOL_ID, "invalid pool ID '{value}'")
_storage_id = _matching(_STORAGE_ID, "storage ID '{value}' contains illegal characters")
_config_id = _matching(_CONFIG_ID, "invalid configuration ID '{value}'")
_realm = _matching(_REALM, "value '{value}' does not look like a valid realm")
_bridge = _matching(_BRIDGE, "invalid bridge ID '{value}'")
_urlencoded = _matching(_URLENCODED, "invalid urlencoded string: {value}")


def _tag_list(value: str) -> None:
    for tag in split_list(value):
        if not _TAG.match(tag):
            raise FormatError(f"invalid tag '{tag}'")


def _ip_address(value: str) -> None:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        raise FormatError(f"value '{value}' does not look like a valid IP address") from None


def _cidr(value: str, version: int | None = None) -> None:
    try:
        network = ipaddress.ip_interface(value)
    except ValueError:
        network = None
    if network is None or "/" not in value or (version and network.version != version):
        kind = {4: "IPv4 ", 6: "IPv6 "}.get(version, "")
        raise FormatError(f"value '{value}' does not look like a valid {kind}CIDR network")


def _ip_or_cidr(value: str) -> None:
    if "/" in value:
        _cidr(value)
    else:
        _ip_address(value)


def _list_of(check: Callable[[str], None]) -> Callable[[str], None]:
    def check_each(value: str) -> None:
        for item in split_list(value):
            check(item)

    return check_each


def _ipv4(value: str) -> None:
    try:
        ipaddress.IPv4Address(value)
    except ValueError:
        raise FormatError(f"value '{value}' does not look like a valid IPv4 address") from None


def _ipv6(value: str) -> None:
    try:
        ipaddress.IPv6Address(value)
    except ValueError:
        raise FormatError(f"value '{value}' does not look like a valid IPv6 address") from None


def _ipv4_config(value: str) -> None:
    if value != "dhcp":
        _cidr(value, 4)


def _ipv6_config(value: str) -> None:
    if value not in ("dhcp", "auto"):
        _cidr(value, 6)


def _mac(value: str) -> None:
    if not _MAC.match(value):
        raise FormatError(f"value '{value}' does not look like a valid MAC address")


# Property strings: each key with a schema like a parameter's. `default_key` is the key a bare value stands for.
IPCONFIG = {
    "ip": {"type": "string", "format": "pve-ipv4-config", "optional": 1},
    "gw": {"type": "string", "format": "ipv4", "optional": 1},
    "ip6": {"type": "string", "format": "pve-ipv6-config", "optional": 1},
    "gw6": {"type": "string", "format": "ipv6", "optional": 1},
}
NIC_MODELS = [
    "e1000",
    "e1000-82540em",
    "e1000-82544gc",
    "e1000-82545em",
    "e1000e",
    "i82551",
    "i82557b",
    "i82559er",
    "ne2k_isa",
    "ne2k_pci",
    "pcnet",
    "rtl8139",
    "virtio",
    "vmxnet3",
]
NET = {
    "model": {"type": "string", "enum": NIC_MODELS, "default_key": 1},
    "macaddr": {"type": "string", "format": "mac-addr", "optional": 1},
    "bridge": {"type": "string", "format": "pve-bridge-id", "optional": 1},
    "tag": {"type": "integer", "minimum": 1, "maximum": 4094, "optional": 1},
    "trunks": {"type": "string", "pattern": r"\d+(?:-\d+)?(?:;\d+(?:-\d+)?)*", "optional": 1},
    "firewall": {"type": "boolean", "optional": 1},
    "link_down": {"type": "boolean", "optional": 1},
    "rate": {"type": "number", "minimum": 0, "optional": 1},
    "queues": {"type": "integer", "minimum": 0, "maximum": 64, "optional": 1},
    "mtu": {"type": "integer", "minimum": 1, "maximum": 65520, "optional": 1},
}
AGENT = {
    "enabled": {"type": "boolean", "optional": 1, "default_key": 1},
    "fstrim_cloned_disks": {"type": "boolean", "optional": 1},
    "freeze-fs-on-backup": {"type": "boolean", "optional": 1},
    "type": {"type": "string", "enum": ["virtio", "isa"], "optional": 1},
}
MEMORY = {"current": {"type": "integer", "minimum": 16, "optional": 1, "default_key": 1}}
# qemu-server src/PVE/QemuServer/PCI.pm $hostpci_fmt ($PCIRE for host) and pve-guest-common
# src/PVE/Mapping/PCI.pm $map_fmt ($PCI_RE for path).
_HOST_PCI_ID = r"(?:[a-f0-9]{4,}:)?[a-f0-9]{2}:[a-f0-9]{2}(?:\.[a-f0-9])?"
_MAPPED_PCI_PATH = r"[a-f0-9]{4,}:[a-f0-9]{2}:[a-f0-9]{2}(?:\.[a-f0-9])?"
_HEX_ID = {"type": "string", "pattern": r"0x[0-9a-fA-F]{4}", "optional": 1}
HOSTPCI = {
    "host": {"type": "string", "pattern": rf"{_HOST_PCI_ID}(;{_HOST_PCI_ID})*", "optional": 1, "default_key": 1},
    "mapping": {"type": "string", "format": "pve-configid", "optional": 1},
    "rombar": {"type": "boolean", "optional": 1},
    "romfile": {"type": "string", "pattern": r"[^,;]+", "optional": 1},
    "pcie": {"type": "boolean", "optional": 1},
    "x-vga": {"type": "boolean", "optional": 1},
    "legacy-igd": {"type": "boolean", "optional": 1},
    "mdev": {"type": "string", "pattern": r"[^/\.:]+", "optional": 1},
    "vendor-id": _HEX_ID,
    "device-id": _HEX_ID,
    "sub-vendor-id": _HEX_ID,
    "sub-device-id": _HEX_ID,
    "driver": {"type": "string", "enum": ["vfio", "keep"], "optional": 1},
}
PCI_MAP = {
    "node": {"type": "string", "format": "pve-node"},
    "id": {"type": "string", "pattern": r"[0-9A-Fa-f]{4}:[0-9A-Fa-f]{4}"},
    "subsystem-id": {"type": "string", "pattern": r"[0-9A-Fa-f]{4}:[0-9A-Fa-f]{4}", "optional": 1},
    "path": {"type": "string", "pattern": rf"(?:{_MAPPED_PCI_PATH};)*{_MAPPED_PCI_PATH}"},
    "iommugroup": {"type": "integer", "optional": 1},
    "description": {"type": "string", "maxLength": 4096, "optional": 1},
}

PROPERTY_STRING_FORMATS = {
    "pve-qm-ipconfig": IPCONFIG,
    "pve-qm-net": NET,
    "pve-qm-agent": AGENT,
    "pve-qm-memory": MEMORY,
    "pve-qm-hostpci": HOSTPCI,
    "pve-mapping-pci-map": PCI_MAP,
}

# The subset schema dropped the property-string formats of these parameters (upstream they are inline dicts).
# Naming them here keeps the checks the same as upstream's: keyed by the schema's parameter name.
# `map` is the PCI mapping endpoints' array of node entries: the subset drops array items, upstream their format is
# pve-guest-common's $map_fmt (inline, no registered name: the name here is the simulator's).
PARAMETER_FORMAT_OVERLAY = {"net[n]": "pve-qm-net", "agent": "pve-qm-agent", "memory": "pve-qm-memory", "map": "pve-mapping-pci-map"}

SIMPLE_FORMATS: dict[str, Callable[[str], None]] = {
    "pve-vmid": _vmid,
    "pve-node": _node,
    "dns-name": _dns_name,
    "pve-tag-list": _tag_list,
    "pve-poolid": _pool_id,
    "pve-storage-id": _storage_id,
    "pve-configid": _config_id,
    "pve-configid-list": _list_of(_config_id),
    "pve-vmid-list": _list_of(_vmid),
    "pve-storage-id-list": _list_of(_storage_id),
    "pve-node-list": _list_of(_node),
    "pve-realm": _realm,
    "pve-bridge-id": _bridge,
    "urlencoded": _urlencoded,
    "address": _ip_address,
    "address-list": _list_of(_ip_address),
    "CIDR": _cidr,
    "IPorCIDR": _ip_or_cidr,
    "ipv4": _ipv4,
    "ipv6": _ipv6,
    "pve-ipv4-config": _ipv4_config,
    "pve-ipv6-config": _ipv6_config,
    "mac-addr": _mac,
}


def parse_property_string(value: str, properties: dict) -> dict[str, str]:
    """Split `a=1,b=2` (or a bare value for the default key) into a dict; FormatError on a malformed string.

    A NIC model is also a key of its own, as in `virtio=BC:24:11:00:00:01`: it sets the model and the MAC.
    """
    default_key = next((key for key, schema in properties.items() if schema.get("default_key")), None)
    parsed: dict[str, str] = {}
    for part in value.split(","):
        if not part:
            continue
        key, has_value, item = part.partition("=")
        if properties is NET and key in NIC_MODELS:
            if has_value:
                parsed["macaddr"] = item
            key, item = "model", key
        elif not has_value:
            if default_key is None:
                raise FormatError(f"missing key in comma-separated list property: '{part}'")
            key, item = default_key, part
        if key in parsed:
            raise FormatError(f"duplicate key in comma-separated list property: {key}")
        parsed[key] = item
    return parsed


def format_property_string(values: dict[str, str], properties: dict) -> str:
    """The inverse of parse_property_string, in Proxmox's key order: the default key first, bare."""
    parts = []
    for key in properties:
        if key not in values:
            continue
        if properties is NET and key == "model":
            mac = values.get("macaddr")
            parts.insert(0, f"{values['model']}={mac}" if mac else values["model"])
        elif properties is NET and key == "macaddr":
            continue
        elif properties[key].get("default_key"):
            parts.insert(0, str(values[key]))
        else:
            parts.append(f"{key}={values[key]}")
    return ",".join(parts)


def check_ssh_public_keys(keys: str) -> None:
    """Each non-empty, non-comment line must be an OpenSSH public key whose blob names its own type."""
    for line in keys.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split()
        if len(fields) < 2 or fields[0] not in _SSH_KEY_TYPES:
            raise FormatError("SSH public key validation error")
        try:
            blob = base64.b64decode(fields[1], validate=True)
        except (binascii.Error, ValueError):
            raise FormatError("SSH public key validation error") from None
        type_length = int.from_bytes(blob[:4], "big")
        if blob[4 : 4 + type_length].decode("ascii", "replace") != fields[0]:
            raise FormatError("SSH public key validation error")


def decode_sshkeys(value: str) -> str:
    return urllib.parse.unquote(value)
