"""What stands behind a simulated VM: nothing (`memory`) or, later, a lab container.

The cluster model owns the Proxmox state (configs, locks, tasks, timing); a backend is told when a VM
is cloned, starts, stops or is destroyed, and answers what the guest agent reports. A backend's BackendError
fails the Proxmox task that called it, with the error's text as exit status.
"""

from __future__ import annotations

import ipaddress
from typing import Protocol

from .formats import IPCONFIG, NET, parse_property_string

DHCP_NETWORK = ipaddress.IPv4Network("10.99.0.0/16")


class BackendError(Exception):
    """The backend could not do what a task asked."""


class GuestView(Protocol):
    """What a backend may read of a VM."""

    vmid: int
    node: str
    config: dict


class Backend(Protocol):
    async def clone(self, source: GuestView, clone: GuestView) -> None:
        """Give a new clone its disks (within the clone task): a copy of its source's (a full clone, as qemu-img
        copies them) or volumes over its template's that share what they do not change (a linked clone)."""

    async def start(self, vm: GuestView) -> None: ...

    async def stop(self, vm: GuestView) -> None: ...

    async def destroy(self, vm: GuestView) -> None: ...

    async def guest_interfaces(self, vm: GuestView) -> list[dict] | None:
        """The agent's `network-get-interfaces` result, or None while the agent does not answer."""


def _boot_volume_path(config: dict) -> str | None:
    """What follows the storage of a VM's first disk (scsi0, virtio0, sata0, ide0): base-9000-disk-0 for the lab's
    template, base-9000-disk-0/vm-101-disk-0 for a linked clone of it (its own volume over the template's)."""
    for key in ("scsi0", "virtio0", "sata0", "ide0"):
        value = str(config.get(key, ""))
        if ":" in value and "media=cdrom" not in value:
            return value.split(":", 1)[1].split(",", 1)[0]
    return None


def boot_volume(config: dict) -> str | None:
    """The volume name of a VM's first disk: base-9000-disk-0 for the lab's template; a linked clone's own volume
    (vm-101-disk-0 of base-9000-disk-0/vm-101-disk-0)."""
    path = _boot_volume_path(config)
    return path.rsplit("/", 1)[-1] if path else None


def is_linked_clone(config: dict) -> bool:
    """Whether the VM's first disk is a linked clone's volume, which shares its template's base volume."""
    return "/" in (_boot_volume_path(config) or "")


def _mac(vm: GuestView, index: int) -> str:
    net = parse_property_string(str(vm.config.get(f"net{index}", "")), NET)
    return net.get("macaddr", "00:00:00:00:00:00").lower()


def dhcp_address(vmid: int) -> ipaddress.IPv4Interface:
    """A stable lease per VM id, as a lab DHCP server with reservations would hand out."""
    host = DHCP_NETWORK.network_address + 2 + vmid % (DHCP_NETWORK.num_addresses - 4)
    return ipaddress.IPv4Interface(f"{host}/{DHCP_NETWORK.prefixlen}")


def planned_interfaces(vm: GuestView) -> list[dict]:
    """The interfaces a cloud-init guest brings up from its `net[n]`/`ipconfig[n]` settings."""
    interfaces = [
        {
            "name": "lo",
            "hardware-address": "00:00:00:00:00:00",
            "ip-addresses": [
                {"ip-address-type": "ipv4", "ip-address": "127.0.0.1", "prefix": 8},
                {"ip-address-type": "ipv6", "ip-address": "::1", "prefix": 128},
            ],
        }
    ]
    net_indexes = sorted(int(key[3:]) for key in vm.config if key.startswith("net") and key[3:].isdigit())
    for position, index in enumerate(net_indexes):
        ipconfig = parse_property_string(str(vm.config.get(f"ipconfig{index}", "")), IPCONFIG)
        addresses = []
        ip = ipconfig.get("ip", "dhcp")
        interface = dhcp_address(vm.vmid + position) if ip == "dhcp" else ipaddress.IPv4Interface(ip)
        addresses.append({"ip-address-type": "ipv4", "ip-address": str(interface.ip), "prefix": interface.network.prefixlen})
        if ipconfig.get("ip6") not in (None, "dhcp", "auto"):
            interface6 = ipaddress.IPv6Interface(ipconfig["ip6"])
            addresses.append({"ip-address-type": "ipv6", "ip-address": str(interface6.ip), "prefix": interface6.network.prefixlen})
        interfaces.append(
            {
                "name": f"eth{position}",
                "hardware-address": _mac(vm, index),
                "ip-addresses": addresses,
                "statistics": {"rx-bytes": 0, "rx-dropped": 0, "rx-errs": 0, "rx-packets": 0, "tx-bytes": 0, "tx-dropped": 0, "tx-errs": 0, "tx-packets": 0},
            }
        )
    return interfaces


class MemoryBackend:
    """No guest at all: the agent reports the addresses cloud-init would configure."""

    async def clone(self, source: GuestView, clone: GuestView) -> None:
        return None

    async def start(self, vm: GuestView) -> None:
        return None

    async def stop(self, vm: GuestView) -> None:
        return None

    async def destroy(self, vm: GuestView) -> None:
        return None

    async def guest_interfaces(self, vm: GuestView) -> list[dict] | None:
        return planned_interfaces(vm)
