# Copyright (c) mlfleet.serving maintainers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Decisions of the proxmox_vm_pool module that need no server: membership, template choice, placement,
VM id allocation, static addresses and scale-in victims. A member's tags and address are read by the rules of
``_proxmox_guest``, which the inventory plugin shares.

Every function takes plain data (the API's dicts) and returns plain data, so it is tested without Proxmox.
"""

from __future__ import annotations

import ipaddress
import re
import threading

from ansible_collections.mlfleet.serving.plugins.module_utils._proxmox import ProxmoxError
from ansible_collections.mlfleet.serving.plugins.module_utils._proxmox_guest import split_tags

GIB = 1024**3
# How Proxmox words the two clone failures that are worth a retry.
ALREADY_EXISTS = re.compile(r"already exists")
LOCK_TIMEOUT = re.compile(r"can't lock file .* got timeout")


class PoolError(ProxmoxError):
    """The arguments cannot be carried out against the cluster as it is; the message says why and what to change."""


def is_member(resource, pool_tag, pool=None):
    """Whether a /cluster/resources entry is a pool member: a VM, not a template, with the tag (and in the pool)."""
    if resource.get("type") != "qemu" or int(resource.get("template") or 0):
        return False
    if pool is not None and resource.get("pool") != pool:
        return False
    return pool_tag.lower() in split_tags(resource.get("tags"))


def find_template(resources, template):
    """The template resource named by ``template``: all digits is a vmid, anything else a template name."""
    templates = [entry for entry in resources if entry.get("type") == "qemu" and int(entry.get("template") or 0)]
    if template.isdigit():
        matches = [entry for entry in templates if int(entry["vmid"]) == int(template)]
        if not matches:
            vm = next((entry for entry in resources if entry.get("vmid") == int(template)), None)
            if vm is not None:
                raise PoolError(f"VM {template} ({vm.get('name')}) on {vm.get('node')} is not a template: convert it to a template or name another one")
            raise PoolError(f"template {template} not found: no template has this vmid (templates: {_listing(templates)})")
        return matches[0]
    matches = [entry for entry in templates if entry.get("name") == template]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise PoolError(f"template {template!r} not found among the cluster's templates ({_listing(templates)}): check the name or give its vmid")
    raise PoolError(f"template name {template!r} is ambiguous, {len(matches)} templates carry it ({_listing(matches)}): give the vmid instead")


def _listing(entries):
    return ", ".join(f"{entry['vmid']} {entry.get('name', '')} on {entry.get('node')}".strip() for entry in entries) or "none visible to this user"


HOSTPCI_KEY = re.compile(r"^hostpci\d+$")


def _property_fields(text):
    """The ``key=value`` fields of a Proxmox property string (a key without a value is left out)."""
    return dict(part.partition("=")[::2] for part in str(text).split(",") if "=" in part)


def mapped_device_count(config, mapping):
    """How many ``hostpci[n]`` entries of a VM config take a device from the PCI mapping ``mapping``."""
    count = 0
    for key, value in config.items():
        if HOSTPCI_KEY.match(key):
            count += _property_fields(value).get("mapping") == mapping
    return count


def mapping_devices_per_node(mapping_entry):
    """{node: devices} of a /cluster/mapping/pci/{id} answer: each ``map`` entry is one device (alternative) on its node."""
    devices = {}
    for entry in mapping_entry.get("map") or []:
        node = _property_fields(entry).get("node")
        if node:
            devices[node] = devices.get(node, 0) + 1
    return devices


def device_slots(devices_per_node, used_per_node, per_vm):
    """{node: (new VMs that fit, free devices, mapped devices)} for VMs that take ``per_vm`` devices of one mapping each.

    A node's free devices are its mapped ones less those the VMs counted in ``used_per_node`` take.
    """
    slots = {}
    for node, devices in devices_per_node.items():
        free = max(0, devices - used_per_node.get(node, 0))
        slots[node] = (free // per_vm, free, devices)
    return slots


def no_device_error(mapping, per_vm, wanted, placed, slots, candidates):
    """The PoolError for new VMs that found no node with ``per_vm`` free devices of ``mapping``, naming each node's count."""
    states = []
    for node in candidates:
        fits, free, devices = slots.get(node, (0, 0, 0))
        states.append(f"{node} {free} of {devices} free" if devices else f"{node} has no device in it")
    return PoolError(
        f"PCI mapping {mapping}: no node has {per_vm} free device{'s' if per_vm > 1 else ''} for {wanted - placed} of the {wanted} new VMs "
        f"({'; '.join(states) or 'no allowed node'}): add devices of the mapping on a node, free some, or lower count"
    )


def plan_placement(nodes, allowed, vm_memory, count, members_per_node=None, devices=None):
    """Nodes for ``count`` new VMs of ``vm_memory`` bytes: most free memory first, counting the VMs already
    placed in this run, ties broken by fewer pool members, then by name.

    ``nodes`` are /nodes entries (node, status, mem, maxmem). ``devices``, for VMs that take mapped PCI devices, is
    (mapping, per_vm, slots) with ``slots`` from ``device_slots``: only nodes with room are chosen, and each VM placed
    takes its devices there. Returns [(node, reason)].
    """
    online = {entry["node"]: entry for entry in nodes if entry.get("status") == "online"}
    if allowed:
        missing = [name for name in allowed if name not in {entry["node"] for entry in nodes}]
        if missing:
            raise PoolError(
                f"nodes {', '.join(missing)} not in the cluster (nodes: {', '.join(sorted(entry['node'] for entry in nodes))}): fix the nodes option"
            )
        candidates = [name for name in allowed if name in online]
    else:
        candidates = sorted(online)
    if count and not candidates:
        wanted = ", ".join(allowed) if allowed else "any node"
        raise PoolError(f"no online node to place VMs on ({wanted}): bring a node online or widen the nodes option")
    free = {name: int(online[name].get("maxmem", 0)) - int(online[name].get("mem", 0)) for name in candidates}
    population = dict(members_per_node or {})
    slots = dict(devices[2]) if devices else None
    placed = []
    for _placed in range(count):
        fitting = [name for name in candidates if slots is None or slots.get(name, (0, 0, 0))[0] > 0]
        if not fitting:
            raise no_device_error(devices[0], devices[1], count, len(placed), slots, candidates)
        node = min(fitting, key=lambda name: (-free[name], population.get(name, 0), name))
        maxmem = int(online[node].get("maxmem", 0))
        reason = f"{node}: most free memory ({free[node] / GIB:.1f} GiB of {maxmem / GIB:.1f} GiB)"
        if slots is not None:
            fits, free_devices, mapped = slots[node]
            reason += f"; {free_devices} of {mapped} devices of PCI mapping {devices[0]} free"
            slots[node] = (fits - 1, free_devices - devices[1], mapped)
        placed.append((node, reason))
        free[node] -= vm_memory
        population[node] = population.get(node, 0) + 1
    return placed


class IdAllocator:
    """VM ids that are unique within the run: /cluster/nextid reserves nothing, so ids are handed out here,
    from ``first`` upwards, skipping every id known to be taken. Safe to share between threads."""

    def __init__(self, first, taken):
        self._next = int(first)
        self._taken = {int(vmid) for vmid in taken}
        self._lock = threading.Lock()

    def allocate(self):
        with self._lock:
            while self._next in self._taken:
                self._next += 1
            vmid = self._next
            self._taken.add(vmid)
            return vmid


def static_ipconfig(address, prefix, gateway=None):
    value = f"ip={address}/{prefix}"
    return f"{value},gw={gateway}" if gateway else value


def pick_addresses(ip_range, used, wanted):
    """``wanted`` addresses of ``ip_range`` ({start, end, prefix}) that are not in ``used``, lowest first."""
    try:
        start, end = ipaddress.IPv4Address(ip_range["start"]), ipaddress.IPv4Address(ip_range["end"])
        network = ipaddress.IPv4Interface(f"{start}/{ip_range['prefix']}").network
    except ValueError as error:
        raise PoolError(f"ip_range is not a valid IPv4 range ({error}): fix ip_range start, end and prefix") from None
    if end < start:
        raise PoolError(f"ip_range end {end} lies before its start {start}: swap them")
    if end not in network:
        raise PoolError(f"ip_range {start}-{end} does not fit in {network}: fix ip_range prefix or end")
    # A member's static address may be IPv6 (ip6=); it cannot collide with the range.
    taken = {address for address in (ipaddress.ip_address(text) for text in used if text) if address.version == 4}
    free = []
    address = start
    while address <= end and len(free) < wanted:
        if address not in taken and address not in (network.network_address, network.broadcast_address):
            free.append(str(address))
        address += 1
    if len(free) < wanted:
        size = int(end) - int(start) + 1
        in_range = sorted(str(item) for item in taken if start <= item <= end)
        raise PoolError(
            f"ip_range {start}-{end} has {size} addresses, {len(in_range)} used by members ({', '.join(in_range) or 'none'}); "
            f"{wanted} new VMs need {wanted} free addresses but only {len(free)} are left: widen ip_range or lower count"
        )
    return free


def choose_victims(members, count, policy="newest", remove_vmids=None, protected=None):
    """The vmids to remove so that ``count`` members remain. Protected members are never chosen; explicit
    ``remove_vmids`` (which must be members) come first, then ``policy`` (``newest``: highest vmid first,
    ``oldest``: lowest first) picks the rest."""
    protected = set(protected or [])
    by_id = {int(member["vmid"]): member for member in members}
    explicit = [int(vmid) for vmid in remove_vmids or [] if int(vmid) in by_id]
    clash = sorted(set(explicit) & protected)
    if clash:
        raise PoolError(f"VMs {', '.join(map(str, clash))} are both in remove_vmids and protected: take them out of one of the two lists")
    excess = max(0, len(by_id) - count)
    if len(explicit) > excess:
        raise PoolError(
            f"remove_vmids names {len(explicit)} members ({', '.join(map(str, explicit))}) but going from {len(by_id)} to count {count} "
            f"removes only {excess}: lower count to {len(by_id) - len(explicit)} or list fewer vmids"
        )
    victims = list(explicit)
    candidates = sorted((vmid for vmid in by_id if vmid not in protected and vmid not in victims), reverse=policy == "newest")
    victims += candidates[: excess - len(victims)]
    return victims


DISK_KEY = re.compile(r"^(scsi|virtio|sata|ide|efidisk|tpmstate)\d+$")


def disk_storages(config):
    """Storages holding a VM config's disks (not CD-ROMs or the cloud-init drive)."""
    names = set()
    for key, value in config.items():
        if not DISK_KEY.match(key) or "media=cdrom" in str(value) or "cloudinit" in str(value):
            continue
        storage = str(value).split(":", 1)[0]
        if storage and storage != "none":
            names.add(storage)
    return sorted(names)
