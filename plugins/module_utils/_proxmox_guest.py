# Copyright (c) mlfleet.serving maintainers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""How this collection reads a Proxmox VE guest's tags and its address, for the proxmox_vm_pool module and the
mlfleet.serving.proxmox inventory plugin alike, so that the two never name different tags or addresses for one VM.

Tags are split at ``;``, ``,`` and blanks and lower-cased; written, they are also sorted. This is what Proxmox VE
does when it stores them (``PVE::GuestHelpers::get_unique_tags`` in pve-guest-common, with ``tag-style`` in
datacenter.cfg at its default: not case-sensitive, alphabetical ordering), so the tags this collection reports
for a VM it just created are the ones every later read returns; tags written into a config by hand or on a cluster with case-sensitive tags are compared the
same way, so ``GPU`` and ``gpu`` are one tag here.

A VM's address belongs to one of its network devices, the *configured NIC* (``net0`` unless the caller says
otherwise). In this order it is:

1. an address that the guest agent (``network-get-interfaces``) reports on the guest interface whose MAC is the
   NIC's (compared without regard to case). Loopback, link-local (169.254.0.0/16, fe80::/10), multicast and
   unspecified addresses never count, nor do interfaces that container engines make (``docker0``,
   ``docker_gwbridge``, ``br-*``, ``veth*`` and the like). IPv4 comes before IPv6, and when cloud-init's
   ``ipconfigN`` of the NIC sets ``ip=`` (static or dhcp) only IPv4 counts: the guest was told to get one, and an
   IPv6 address that autoconfiguration brings up first must not stand in for it. Among the NIC's addresses the
   static ``ipconfigN`` one comes first, then the agent's order;
2. else the static address of that ``ipconfigN`` (IPv4 ``ip=``, else IPv6 ``ip6=``; not dhcp or auto).

Nothing else: an address on another interface is not the VM's address, however it is named. The inventory takes
both steps (``guest_address``); the module waits for the first (``agent_address``), since a static address says
what the guest was told, not that it is up.
"""

from __future__ import annotations

import ipaddress
import re
from typing import NamedTuple

DEFAULT_NIC = "net0"
# qemu-server's $MAX_NETS: a VM has the network devices net0 to net31.
MAX_NICS = 32
TAG_SEPARATORS = re.compile(r"[;,\s]+")
MAC_ADDRESS = re.compile(r"^([0-9a-f]{2}:){5}[0-9a-f]{2}$", re.IGNORECASE)
# Loopback and the interfaces that container engines and overlays make inside a guest. They have MACs of their own,
# so the MAC rule already passes them by; the names keep one that copies the NIC's MAC from standing in for the NIC.
NOT_A_NIC = ("lo", "docker0", "docker_gwbridge")
NOT_A_NIC_PREFIXES = ("br-", "veth", "virbr", "cni", "flannel", "cali", "vxlan", "kube")


def split_tags(value):
    """Proxmox's tag list (``a;b``, also with ``,`` or blanks) as a list of lower-case tags, each once, in order."""
    return list(dict.fromkeys(tag.lower() for tag in TAG_SEPARATORS.split(value or "") if tag))


def join_tags(tags):
    """Tags as Proxmox stores them: lower-case, each once, sorted, joined with ``;``."""
    return ";".join(sorted(split_tags(";".join(tags))))


def ipconfig_key(nic):
    """The cloud-init setting of network device ``nic``: ``ipconfig1`` for ``net1``. Raises ValueError for a name
    that is not a network device."""
    match = re.fullmatch(r"net(\d+)", str(nic))
    if not match or int(match[1]) >= MAX_NICS:
        raise ValueError(f"address_nic {nic!r} is not a network device of a VM: name one of net0 to net{MAX_NICS - 1}")
    return f"ipconfig{int(match[1])}"


def net_mac(value):
    """The MAC address of a ``netN`` value (``virtio=BC:24:11:00:90:00,bridge=vmbr0`` or ``model=virtio,macaddr=...``),
    lower-cased, or None."""
    for part in str(value or "").split(","):
        key, _separator, text = part.partition("=")
        if key.strip() != "bridge" and MAC_ADDRESS.match(text.strip()):
            return text.strip().lower()
    return None


def ipconfig_settings(value):
    """An ``ipconfigN`` value (``ip=192.0.2.5/24,gw=192.0.2.1,ip6=auto``) as a dict."""
    settings = {}
    for part in str(value or "").split(","):
        key, separator, text = part.partition("=")
        if separator:
            settings[key.strip()] = text.strip()
    return settings


def static_address(settings):
    """The static address of parsed ``ipconfigN`` settings: IPv4 ``ip=``, else IPv6 ``ip6=``; None for dhcp or auto."""
    for key, family in (("ip", ipaddress.IPv4Interface), ("ip6", ipaddress.IPv6Interface)):
        try:
            return str(family(settings[key]).ip)
        except (KeyError, ValueError):
            continue
    return None


class ConfiguredNic(NamedTuple):
    """What a VM's config says about the NIC that carries its address."""

    name: str
    mac: str | None
    ipconfig_key: str
    ipconfig: dict

    @property
    def static_address(self):
        return static_address(self.ipconfig)

    @property
    def ipv4_only(self):
        return "ip" in self.ipconfig


def configured_nic(config, nic=DEFAULT_NIC):
    """The NIC ``nic`` of a VM config (``GET .../config``): its MAC and its cloud-init settings."""
    key = ipconfig_key(nic)
    return ConfiguredNic(nic, net_mac(config.get(nic)), key, ipconfig_settings(config.get(key)))


class GuestAddress(NamedTuple):
    """The VM's address, where it came from (``agent`` or the ``ipconfigN`` key), and why there is none."""

    address: str | None
    source: str | None
    reason: str | None


def guest_address(interfaces, nic):
    """The VM's address by the rule in this module's docstring. ``interfaces`` is the agent's
    ``network-get-interfaces`` result, or None when the agent did not answer; ``nic`` a ConfiguredNic."""
    reasons = []
    if interfaces is not None:
        address, reason = agent_address(interfaces, nic)
        if address:
            return GuestAddress(address, "agent", None)
        reasons.append(reason)
    static = nic.static_address
    if static:
        return GuestAddress(static, nic.ipconfig_key, None)
    reasons.append(f"no static {nic.ipconfig_key} address")
    return GuestAddress(None, None, "; ".join(reasons))


def agent_address(interfaces, nic):
    """The first step of the rule alone, for a caller that waits until the guest is up: the best address the agent
    reports on the NIC, or None and why not."""
    if nic.mac is None:
        return None, f"the VM config has no {nic.name} with a MAC address"
    found = nic_addresses(interfaces, nic)
    if found:
        return found[0], None
    family = "IPv4 address" if nic.ipv4_only else "address"
    return None, f"the guest agent reports no usable {family} on the interface with {nic.name}'s MAC {nic.mac}"


def nic_addresses(interfaces, nic):
    """The usable addresses the agent reports on the interfaces with the NIC's MAC, best first."""
    found = []
    for interface in interfaces or []:
        name = str(interface.get("name", ""))
        if name in NOT_A_NIC or name.startswith(NOT_A_NIC_PREFIXES):
            continue
        if str(interface.get("hardware-address") or "").lower() != nic.mac:
            continue
        for entry in interface.get("ip-addresses") or []:
            try:
                address = ipaddress.ip_address(str(entry.get("ip-address")))
            except ValueError:
                continue
            if not (address.is_loopback or address.is_link_local or address.is_multicast or address.is_unspecified):
                found.append(address)
    ordered = [address for address in found if address.version == 4]
    if not nic.ipv4_only:
        ordered += [address for address in found if address.version == 6]
    ordered = list(dict.fromkeys(str(address) for address in ordered))
    static = nic.static_address
    if static in ordered:
        ordered.remove(static)
        ordered.insert(0, static)
    return ordered
