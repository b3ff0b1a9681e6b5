"""The simulated cluster: nodes, storages, pools, VMs and what happens to them over time.

Error texts are Proxmox's own where the client may match on them (locks, "already exists", agent);
the README lists the ones the simulator had to word itself.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import secrets
from dataclasses import dataclass, field
from typing import Any

from .backend import Backend, BackendError
from .config import GIB
from .errors import ApiError, TaskFailed
from .formats import AGENT, HOSTPCI, MEMORY, NET, PCI_MAP, FormatError, format_property_string, parse_property_string
from .tasks import Clock, Task, TaskRunner

FIRST_VMID = 100
DEFAULT_MEMORY_MIB = 512  # Proxmox's `memory` default
RUNNING_MACHINE = "pc-i440fx-10.1+pve0"
RUNNING_CPU = "x86-64-v2-AES,+kvm_pv_eoi,+kvm_pv_unhalt"
# What a snapshot keeps of the config, as pve-guest-common's AbstractConfig::__snapshot_copy_config copies it:
# everything but these keys and the unused disks.
_NOT_SNAPSHOTTED = {"snapshots", "snapstate", "snaptime", "vmstate", "lock", "digest", "description"}
_UNUSED_DISK = re.compile(r"^unused\d+$")
_DISK_KEY = re.compile(r"^(scsi|virtio|sata|ide|efidisk|tpmstate|unused)\d+$")
_DISK_SUFFIX = re.compile(r"disk-\d+$")
_VOLUME = re.compile(r"^(?P<storage>[^:]+):(?P<volume>[^,]+)(?P<options>.*)$")


@dataclass
class Node:
    name: str
    maxcpu: int
    maxmem: int
    boot_time: float


@dataclass
class Storage:
    name: str
    type: str
    shared: bool
    size: int
    content: str
    speed: float


@dataclass
class VM:
    vmid: int
    node: str
    config: dict[str, Any]
    status: str = "stopped"
    started_at: float | None = None
    agent_ready_at: float | None = None
    pool: str | None = None
    # Snapshot sections as qemu-server stores them: the snapshotted config keys plus snaptime, description,
    # parent, vmstate (the RAM state volume), runningmachine/runningcpu, and snapstate while one is in progress.
    snapshots: dict[str, dict] = field(default_factory=dict)
    ctime: int = 0  # when its disks were made (the storage content listing's `ctime`)
    # The host PCI devices (mapping paths) the VM holds from its start until it stops, as qemu-server's
    # reservations in /var/run/pve-reserved-pci.
    pci_devices: list[str] = field(default_factory=list)

    @property
    def is_template(self) -> bool:
        return bool(int(self.config.get("template", 0)))

    @property
    def agent_enabled(self) -> bool:
        return parse_property_string(str(self.config.get("agent", "0")), AGENT).get("enabled") == "1"

    @property
    def lock(self) -> str | None:
        return self.config.get("lock")

    @property
    def memory_bytes(self) -> int:
        return _memory_bytes(self.config)

    @property
    def cpus(self) -> int:
        return int(self.config.get("cores", 1)) * int(self.config.get("sockets", 1))

    def disks(self) -> dict[str, tuple[str, str, int]]:
        """{key: (storage, volume name, size in bytes)} of the VM's disks (CD-ROMs excluded)."""
        found = {}
        for key, value in self.config.items():
            match = _VOLUME.match(str(value)) if _DISK_KEY.match(key) else None
            if match and "media=cdrom" not in match["options"]:
                size = re.search(r"size=(\d+)([KMGT]?)", match["options"])
                multiplier = {"": 1, "K": 1024, "M": 1024**2, "G": GIB, "T": 1024 * GIB}[size[2]] if size else 0
                found[key] = (match["storage"], match["volume"], int(size[1]) * multiplier if size else 0)
        return found

    @property
    def maxdisk(self) -> int:
        return sum(size for _storage, _volume, size in self.disks().values())

    def digest(self) -> str:
        text = "".join(f"{key}: {value}\n" for key, value in sorted(self.config.items()) if key != "digest")
        return hashlib.sha1(text.encode(), usedforsecurity=False).hexdigest()

    def to_state(self) -> dict:
        return {
            "vmid": self.vmid,
            "node": self.node,
            "config": self.config,
            "status": self.status,
            "pool": self.pool,
            "snapshots": self.snapshots,
            "ctime": self.ctime,
            "pci_devices": self.pci_devices,
        }


@dataclass
class Faults:
    """What is broken on purpose: set from the config's `faults` section or the /_sim/faults endpoint."""

    clone_failure: str | None = None
    clone_failures_left: int | None = None
    slow_storage: dict[str, float] = field(default_factory=dict)
    offline_nodes: set[str] = field(default_factory=set)
    agent_never_up: set[int] = field(default_factory=set)
    agent_never_up_anywhere: bool = False

    @classmethod
    def from_dict(cls, spec: dict) -> Faults:
        known = {"clone_failure", "slow_storage", "offline_nodes", "agent_never_up"}
        unknown = set(spec) - known
        if unknown:
            raise ValueError(f"unknown faults: {', '.join(sorted(unknown))} (known: {', '.join(sorted(known))})")
        faults = cls()
        clone_failure = spec.get("clone_failure")
        if clone_failure:
            faults.clone_failure = str(clone_failure.get("message", "clone failed: simulated storage error"))
            count = clone_failure.get("count")
            faults.clone_failures_left = None if count is None else int(count)
        faults.slow_storage = {str(name): float(factor) for name, factor in (spec.get("slow_storage") or {}).items()}
        faults.offline_nodes = {str(node) for node in spec.get("offline_nodes") or []}
        agent = spec.get("agent_never_up") or []
        faults.agent_never_up_anywhere = agent == "all"
        faults.agent_never_up = set() if agent == "all" else {int(vmid) for vmid in agent}
        return faults

    def to_dict(self) -> dict:
        spec: dict[str, Any] = {}
        if self.clone_failure:
            spec["clone_failure"] = {"message": self.clone_failure, "count": self.clone_failures_left}
        if self.slow_storage:
            spec["slow_storage"] = self.slow_storage
        if self.offline_nodes:
            spec["offline_nodes"] = sorted(self.offline_nodes)
        if self.agent_never_up_anywhere:
            spec["agent_never_up"] = "all"
        elif self.agent_never_up:
            spec["agent_never_up"] = sorted(self.agent_never_up)
        return spec


def _memory_bytes(config: dict) -> int:
    memory = parse_property_string(str(config.get("memory", DEFAULT_MEMORY_MIB)), MEMORY)
    return int(memory.get("current", DEFAULT_MEMORY_MIB)) * 1024 * 1024


def locked_message(vm: VM) -> str:
    return f"VM {vm.vmid} is locked ({vm.lock})"


def _copy_snapshotted(source: dict, dest: dict) -> None:
    dest.update({key: value for key, value in source.items() if key not in _NOT_SNAPSHOTTED and not _UNUSED_DISK.match(key)})


def new_mac() -> str:
    # BC:24:11 is the prefix Proxmox VE uses for generated MAC addresses.
    return "BC:24:11:" + ":".join(f"{byte:02X}" for byte in secrets.token_bytes(3))


def with_mac(net_value: str) -> str:
    """A `net[n]` value with a MAC address, generated if it has none (as Proxmox does when it stores one)."""
    net = parse_property_string(net_value, NET)
    net.setdefault("model", "virtio")
    net.setdefault("macaddr", new_mac())
    return format_property_string(net, NET)


class Cluster:
    """State and behaviour of the simulated cluster; the API layer maps HTTP calls onto these methods."""

    def __init__(self, config: dict, backend: Backend, clock: Clock | None = None):
        self.clock = clock or Clock()
        self.backend = backend
        self.name = config["cluster_name"]
        self.durations: dict[str, float] = dict(config["durations"])
        self.limits: dict[str, float] = dict(config["limits"])
        now = self.clock.time()
        self.nodes = {
            name: Node(name, int(spec["maxcpu"]), int(float(spec.get("maxmem_gib", 0)) * GIB) or int(spec.get("maxmem", 0)), now)
            for name, spec in config["nodes"].items()
        }
        self.storages = {
            name: Storage(
                name, spec["type"], bool(spec.get("shared")), int(float(spec["size_gib"]) * GIB), spec.get("content", "images"), float(spec.get("speed", 1))
            )
            for name, spec in config["storages"].items()
        }
        self.pools: dict[str, str] = {poolid: spec.get("comment", "") for poolid, spec in config["pools"].items()}
        # mapping/pci.cfg: {id: {"map": [property strings], "description"?, "mdev"?, "live-migration-capable"?}}
        self.pci_mappings: dict[str, dict] = {}
        for mapping_id, spec in (config.get("pci_mappings") or {}).items():
            self.pci_mappings[mapping_id] = self.checked_pci_mapping(mapping_id, spec)
        self.vms: dict[int, VM] = {}
        self.faults = Faults.from_dict(config.get("faults") or {})
        self.dirty = False
        self.runner = TaskRunner(self.clock, self.mark_dirty)
        self._clones_of: dict[int, int] = {}
        self._clone_slot_freed = asyncio.Condition()
        for spec in config["vms"]:
            self._add_configured_vm(spec)

    def _add_configured_vm(self, spec: dict) -> None:
        vmid = int(spec["vmid"])
        vm = VM(vmid, spec["node"], dict(spec.get("config", {})), pool=spec.get("pool"), ctime=int(self.clock.time()))
        storage = spec.get("storage", "local-lvm")
        prefix = "base" if spec.get("template") else "vm"
        vm.config.setdefault("scsi0", f"{storage}:{prefix}-{vmid}-disk-0,size={int(spec.get('disk_gib', 8))}G")
        vm.config.setdefault("boot", "order=scsi0")
        if spec.get("template"):
            vm.config["template"] = 1
        for key in [key for key in vm.config if key.startswith("net")]:
            vm.config[key] = with_mac(str(vm.config[key]))
        vm.config["vmgenid"] = vm.config.get("vmgenid") or _uuid()
        vm.config["smbios1"] = vm.config.get("smbios1") or f"uuid={_uuid()}"
        self._check_placement(vm)
        self.vms[vmid] = vm

    def _check_placement(self, vm: VM) -> None:
        if vm.node not in self.nodes:
            raise ValueError(f"VM {vm.vmid}: unknown node {vm.node}")
        if vm.pool and vm.pool not in self.pools:
            raise ValueError(f"VM {vm.vmid}: unknown pool {vm.pool}")
        for storage, _volume, _size in vm.disks().values():
            if storage not in self.storages:
                raise ValueError(f"VM {vm.vmid}: unknown storage {storage}")

    def mark_dirty(self) -> None:
        self.dirty = True

    # --- persistence ----------------------------------------------------------------------------

    def to_state(self) -> dict:
        return {
            "vms": [vm.to_state() for vm in self.vms.values()],
            "pools": self.pools,
            "pci_mappings": self.pci_mappings,
            "tasks": [task.to_state() for task in self.runner.tasks.values()],
        }

    def load_state(self, state: dict) -> None:
        """Restore VMs, pools and task history; running VMs come back with their agent answering."""
        self.pools = dict(state.get("pools", self.pools))
        self.pci_mappings = dict(state.get("pci_mappings", self.pci_mappings))
        self.vms = {}
        now = self.clock.time()
        for entry in state.get("vms", []):
            vm = VM(int(entry["vmid"]), entry["node"], dict(entry["config"]), entry.get("status", "stopped"), pool=entry.get("pool"))
            vm.snapshots = dict(entry.get("snapshots", {}))
            vm.ctime = int(entry.get("ctime", now))
            vm.pci_devices = list(entry.get("pci_devices", [])) if vm.status == "running" else []
            if vm.status == "running":
                vm.started_at = vm.agent_ready_at = now
            self._check_placement(vm)
            self.vms[vm.vmid] = vm
        for entry in state.get("tasks", []):
            task = Task.from_state(entry)
            self.runner.tasks[task.upid] = task

    # --- lookups --------------------------------------------------------------------------------

    def pool_of(self, vmid: int) -> str | None:
        vm = self.vms.get(vmid)
        return vm.pool if vm else None

    def node(self, name: str) -> Node:
        """The node a request addresses; Proxmox proxies such requests, so an offline node answers 595."""
        node = self.nodes.get(name)
        if node is None:
            raise ApiError(f"hostname lookup '{name}' failed - failed to get address info for: {name}: Name or service not known")
        if name in self.faults.offline_nodes:
            raise ApiError("No route to host", status=595)
        return node

    def node_online(self, name: str) -> bool:
        return name not in self.faults.offline_nodes

    def vm(self, node: str, vmid: int) -> VM:
        self.node(node)
        vm = self.vms.get(vmid)
        if vm is None or vm.node != node:
            raise ApiError(f"Configuration file 'nodes/{node}/qemu-server/{vmid}.conf' does not exist")
        return vm

    def storage(self, name: str) -> Storage:
        storage = self.storages.get(name)
        if storage is None:
            raise ApiError(f"storage '{name}' does not exist")
        return storage

    def next_free_id(self) -> int:
        vmid = FIRST_VMID
        while vmid in self.vms:
            vmid += 1
        return vmid

    def storage_used(self, name: str) -> int:
        return sum(size for vm in self.vms.values() for storage, _volume, size in vm.disks().values() if storage == name)

    def volumes(self, storage: str, node: str) -> list[dict]:
        """The disk images on `storage` as `node` lists them (a local storage holds only that node's VMs' volumes).

        Entries carry what pve-storage's LVM-thin plugin lists (volid, format, size, vmid, ctime), for every storage
        type: a linked clone's volume is named without its base, RAM states of snapshots are images too.
        """
        shared = self.storages[storage].shared
        found = []
        for vm in self.vms.values():
            if not shared and vm.node != node:
                continue
            for disk_storage, volume, size in vm.disks().values():
                if disk_storage == storage:
                    found.append({"volid": f"{storage}:{volume.rsplit('/', 1)[-1]}", "format": "raw", "size": size, "vmid": vm.vmid, "ctime": vm.ctime})
            for snapshot in vm.snapshots.values():
                state = str(snapshot.get("vmstate", ""))
                if state.startswith(f"{storage}:"):
                    # qemu-server's __snapshot_save_vmstate sizes it at twice the memory plus 500 MiB of device state.
                    size = _memory_bytes(snapshot) * 2 + 500 * 1024 * 1024
                    found.append({"volid": state, "format": "raw", "size": size, "vmid": vm.vmid, "ctime": int(snapshot.get("snaptime", 0))})
        return found

    def node_memory_used(self, name: str) -> int:
        return sum(vm.memory_bytes for vm in self.vms.values() if vm.node == name and vm.status == "running")

    def uptime(self, vm: VM) -> int:
        return int(self.clock.time() - vm.started_at) if vm.status == "running" and vm.started_at else 0

    def agent_answers(self, vm: VM) -> bool:
        if vm.status != "running" or vm.agent_ready_at is None or self.clock.time() < vm.agent_ready_at:
            return False
        return not (self.faults.agent_never_up_anywhere or vm.vmid in self.faults.agent_never_up)

    # --- clone ----------------------------------------------------------------------------------

    def clone_storages(self, source: VM, storage: str | None) -> list[str]:
        """The storages a clone writes to (Proxmox checks Datastore.AllocateSpace on each)."""
        return sorted({storage or disk_storage for disk_storage, _volume, _size in source.disks().values()})

    def check_clone(self, source: VM, newid: int, full: bool, storage: str | None, target: str | None) -> None:
        """The checks Proxmox makes before it forks the clone worker."""
        if newid in self.vms:
            raise ApiError(f"unable to create VM {newid}: config file already exists")
        if storage is not None and not full:
            raise ApiError("parameter 'storage' not allowed for linked clones")
        if not full and not source.is_template:
            first_disk = next(iter(source.disks()), "scsi0")
            raise ApiError(f"Linked clone feature is not supported for drive '{first_disk}'")
        if storage is not None:
            self.storage(storage)
        if target is not None and target != source.node:
            if target not in self.nodes:
                raise ApiError(f"no such cluster node '{target}'")
            if not self.node_online(target):
                raise ApiError(f"target node '{target}' is offline")
            if storage is not None and not self.storages[storage].shared:
                raise ApiError(f"can't clone to non-shared storage '{storage}'")
            if any(not self.storages[name].shared for name in self.clone_storages(source, storage)):
                raise ApiError(f"can't clone VM to node '{target}' (VM uses local storage)")

    def clone(
        self,
        source: VM,
        newid: int,
        user: str,
        *,
        full: bool,
        name: str | None,
        description: str | None,
        pool: str | None,
        storage: str | None,
        target: str | None,
    ) -> Task:
        self.check_clone(source, newid, full, storage, target)
        if pool is not None and pool not in self.pools:
            raise ApiError(f"pool '{pool}' does not exist")
        target_node = target or source.node
        target_storage = storage or next(iter(self.clone_storages(source, None)), "local-lvm")
        speed = self.storages[target_storage].speed / self.faults.slow_storage.get(target_storage, 1.0)
        duration = self.durations["clone_full"] / speed if full else self.durations["clone_linked"]

        async def work(task: Task) -> None:
            task.log.append(f"create {'full' if full else 'linked'} clone of drive scsi0 ({target_storage})")
            await self._take_clone_slot(source.vmid)
            try:
                await self.clock.sleep(self.durations["clone_setup"])
                if newid in self.vms:
                    raise TaskFailed(f"unable to create VM {newid} - VM {newid} already exists")
                clone = VM(newid, target_node, self._cloned_config(source, newid, full, storage, name, description), ctime=int(self.clock.time()))
                clone.config["lock"] = "clone"
                self.vms[newid] = clone
                self.mark_dirty()
                await self._finish_clone(source, clone, duration, pool)
            finally:
                await self._release_clone_slot(source.vmid)

        return self.runner.spawn(source.node, "qmclone", source.vmid, user, work)

    async def _finish_clone(self, source: VM, clone: VM, duration: float, pool: str | None) -> None:
        try:
            await self.clock.sleep(duration)
            await self._backend(lambda vm: self.backend.clone(source, vm), clone)
            if self.faults.clone_failure and self.faults.clone_failures_left != 0:
                if self.faults.clone_failures_left is not None:
                    self.faults.clone_failures_left -= 1
                raise TaskFailed(self.faults.clone_failure)
        except (TaskFailed, asyncio.CancelledError):
            # Proxmox removes the half-made VM, its disks too, when a clone fails.
            await asyncio.shield(self._discard_disks(clone))
            self.vms.pop(clone.vmid, None)
            self.mark_dirty()
            raise
        clone.config.pop("lock", None)
        if pool is not None:
            clone.pool = pool
        self.mark_dirty()

    async def _discard_disks(self, clone: VM) -> None:
        try:
            await self.backend.destroy(clone)
        except BackendError:
            pass  # the clone's own failure is the one to report

    async def _take_clone_slot(self, vmid: int) -> None:
        limit = self.limits.get("parallel_clones_per_source")
        if limit is None:
            source = self.vms.get(vmid)
            limit = 1 if source is not None and source.status == "running" else None
        if limit is None:
            # A shared lock: clones of a stopped source do not wait for each other.
            async with self._clone_slot_freed:
                self._clones_of[vmid] = self._clones_of.get(vmid, 0) + 1
            return
        limit = int(limit)
        async with self._clone_slot_freed:
            try:
                await asyncio.wait_for(self._clone_slot_freed.wait_for(lambda: self._clones_of.get(vmid, 0) < limit), timeout=self.limits["lock_wait"])
            except TimeoutError:
                raise TaskFailed(f"can't lock file '/var/lock/qemu-server/lock-{vmid}.conf' - got timeout") from None
            self._clones_of[vmid] = self._clones_of.get(vmid, 0) + 1

    async def _release_clone_slot(self, vmid: int) -> None:
        async with self._clone_slot_freed:
            self._clones_of[vmid] -= 1
            self._clone_slot_freed.notify_all()

    def _cloned_config(self, source: VM, newid: int, full: bool, storage: str | None, name: str | None, description: str | None) -> dict:
        config = {key: value for key, value in source.config.items() if key not in ("template", "lock", "digest", "parent")}
        for key, (disk_storage, volume, _size) in source.disks().items():
            options = _VOLUME.match(str(source.config[key]))["options"]
            disk_name = f"vm-{newid}-{_DISK_SUFFIX.search(volume)[0]}"
            if full:
                config[key] = f"{storage or disk_storage}:{disk_name}{options}"
            else:
                config[key] = f"{disk_storage}:{volume}/{disk_name}{options}"
        for key in [key for key in config if re.fullmatch(r"net\d+", key)]:
            net = parse_property_string(str(config[key]), NET)
            net["macaddr"] = new_mac()
            config[key] = format_property_string(net, NET)
        config["name"] = name or f"Copy-of-VM-{source.config.get('name', source.vmid)}"
        if description is not None:
            config["description"] = description
        config["vmgenid"] = _uuid()
        config["smbios1"] = f"uuid={_uuid()}"
        return config

    # --- power ----------------------------------------------------------------------------------

    def start(self, vm: VM, user: str) -> Task:
        if vm.is_template:
            raise ApiError("you can't start a vm if it's a template")

        async def work(task: Task) -> None:
            if vm.status == "running":
                raise TaskFailed(f"VM {vm.vmid} already running")
            await self._power_on(vm, self.durations["boot_to_agent"])

        return self.runner.spawn(vm.node, "qmstart", vm.vmid, user, work)

    async def _power_on(self, vm: VM, agent_delay: float) -> None:
        """Start a VM's guest; its agent answers `agent_delay` seconds later (at once when resumed from a RAM state)."""
        if self.node_memory_used(vm.node) + vm.memory_bytes > self.nodes[vm.node].maxmem:
            raise TaskFailed(f"start failed: not enough free memory on node '{vm.node}' for VM {vm.vmid}")
        # Chosen and reserved before the first await, so two starts at once cannot take the same device.
        vm.pci_devices = self.choose_pci_devices(vm)
        try:
            await self.clock.sleep(self.durations["start"])
            await self._backend(self.backend.start, vm)
        except BaseException:
            vm.pci_devices = []
            raise
        vm.status, vm.started_at = "running", self.clock.time()
        vm.agent_ready_at = vm.started_at + agent_delay if vm.agent_enabled else None
        self.mark_dirty()

    def stop(self, vm: VM, user: str) -> Task:
        async def work(task: Task) -> None:
            if vm.status == "running":
                await self.clock.sleep(self.durations["stop"])
                await self._power_off(vm)

        return self.runner.spawn(vm.node, "qmstop", vm.vmid, user, work)

    def shutdown(self, vm: VM, user: str, timeout: int | None, force_stop: bool) -> Task:
        async def work(task: Task) -> None:
            if vm.status != "running":
                raise TaskFailed(f"VM {vm.vmid} not running")
            needed = self.durations["shutdown"]
            if timeout is not None and timeout < needed:
                await self.clock.sleep(timeout)
                if not force_stop:
                    raise TaskFailed("VM quit/powerdown failed - got timeout")
                task.log.append("VM still running - terminating now with SIGTERM")
            else:
                await self.clock.sleep(needed)
            await self._power_off(vm)

        return self.runner.spawn(vm.node, "qmshutdown", vm.vmid, user, work)

    def reboot(self, vm: VM, user: str) -> Task:
        if vm.status != "running":
            raise ApiError(f"VM {vm.vmid} not running")

        async def work(task: Task) -> None:
            await self._power_off(vm)
            await self.clock.sleep(self.durations["reboot"])
            await self._backend(self.backend.start, vm)
            vm.status, vm.started_at = "running", self.clock.time()
            vm.agent_ready_at = vm.started_at + self.durations["boot_to_agent"]
            self.mark_dirty()

        return self.runner.spawn(vm.node, "qmreboot", vm.vmid, user, work)

    async def _power_off(self, vm: VM) -> None:
        await self._backend(self.backend.stop, vm)
        vm.status, vm.started_at, vm.agent_ready_at = "stopped", None, None
        vm.pci_devices = []
        self.mark_dirty()

    async def _backend(self, action, vm: VM) -> None:
        try:
            await action(vm)
        except BackendError as error:
            raise TaskFailed(str(error)) from None

    # --- PCI resource mappings ----------------------------------------------------------------

    def checked_pci_mapping(self, mapping_id: str, spec: dict) -> dict:
        """A mapping/pci.cfg entry from the configuration; each map entry must parse and name a known node."""
        entries = spec.get("map") or []
        if isinstance(entries, str):
            entries = [entries]
        for entry in entries:
            try:
                node = parse_property_string(entry, PCI_MAP).get("node")
            except FormatError as error:
                raise ValueError(f"pci_mappings {mapping_id}: {error}") from None
            if node not in self.nodes:
                raise ValueError(f"pci_mappings {mapping_id}: map entry {entry!r} names unknown node {node!r}")
        mapping = {key: value for key, value in spec.items() if key in ("description", "mdev", "live-migration-capable")}
        return mapping | {"map": list(entries)}

    def pci_mapping_digest(self) -> str:
        text = "".join(f"{mapping_id}: {sorted(spec.items())}\n" for mapping_id, spec in sorted(self.pci_mappings.items()))
        return hashlib.sha1(text.encode(), usedforsecurity=False).hexdigest()

    def pci_mapping_entries(self, mapping_id: str, node: str) -> list[dict] | None:
        """The map entries of a mapping on one node, as pve-guest-common's get_node_mapping (None: no such mapping)."""
        mapping = self.pci_mappings.get(mapping_id)
        if mapping is None:
            return None
        entries = [parse_property_string(entry, PCI_MAP) for entry in mapping["map"]]
        return [entry for entry in entries if entry.get("node") == node]

    def node_pci_devices(self, node: str) -> set[str]:
        """The simulated node's PCI devices: those its mapping entries name (the simulator has no lspci)."""
        devices = set()
        for mapping_id in self.pci_mappings:
            for entry in self.pci_mapping_entries(mapping_id, node) or []:
                devices.update(entry["path"].split(";"))
        return devices

    def choose_pci_devices(self, vm: VM) -> list[str]:
        """The devices a start of `vm` takes, with qemu-server's errors (PCI.pm parse_hostpci_devices, then
        choose_hostpci_devices; the reservation check of reserve_pci_usage)."""
        parsed = {}
        for index in range(16):
            value = vm.config.get(f"hostpci{index}")
            if not value:
                continue
            device = parse_property_string(str(value), HOSTPCI)
            host, mapping = device.get("host"), device.get("mapping")
            if host and mapping:
                raise TaskFailed("Cannot set both 'host' and 'mapping'.")
            if mapping:
                entries = self.pci_mapping_entries(mapping, vm.node)
                if not entries:
                    raise TaskFailed(f"PCI device mapping not found for '{mapping}'")
                alternatives = [entry["path"].split(";") for entry in entries]
            elif host:
                alternatives = [host.split(";")]
                known = self.node_pci_devices(vm.node)
                for device_id in alternatives[0]:
                    if device_id not in known:
                        raise TaskFailed(f"no PCI device found for '{device_id}'")
            else:
                raise TaskFailed("Either 'host' or 'mapping' must be set.")
            if device.get("pcie") in ("1", "on", "yes", "true") and "q35" not in str(vm.config.get("machine", "")):
                raise TaskFailed("q35 machine model is not enabled")
            parsed[index] = alternatives
        # A PCI address names a device of one node: only the node's own VMs can hold it.
        in_use = {device_id: other.vmid for other in self.vms.values() if other is not vm and other.node == vm.node for device_id in other.pci_devices}
        chosen: list[str] = []
        for index, alternatives in parsed.items():
            if len(alternatives) == 1:
                for device_id in alternatives[0]:
                    if device_id in chosen:
                        raise TaskFailed(f"device '{device_id}' assigned more than once")
                    if device_id in in_use:
                        raise TaskFailed(f"PCI device '{device_id}' already in use by VMID '{in_use[device_id]}'")
                chosen.extend(alternatives[0])
                continue
            free = next((ids for ids in alternatives if not any(device_id in chosen or device_id in in_use for device_id in ids)), None)
            if free is None:
                raise TaskFailed(f"could not find a free device for 'hostpci{index}'")
            chosen.extend(free)
        return chosen

    # --- lifecycle ------------------------------------------------------------------------------

    def destroy(self, vm: VM, user: str, skiplock: bool) -> Task:
        if vm.lock and not skiplock:
            raise ApiError(locked_message(vm))
        if vm.status == "running":
            raise ApiError(f"VM {vm.vmid} is running - destroy failed")
        if int(vm.config.get("protection", 0)):
            raise ApiError(f"can't remove VM {vm.vmid} - protection mode enabled")
        vm.config["lock"] = "destroyed"

        async def work(task: Task) -> None:
            await self.clock.sleep(self.durations["destroy"])
            await self._backend(self.backend.destroy, vm)
            for key, (storage, volume, _size) in vm.disks().items():
                task.log.append(f"Removing image: {storage}:{volume.rsplit('/', 1)[-1]} ({key})")
            self.vms.pop(vm.vmid, None)
            self.mark_dirty()

        return self.runner.spawn(vm.node, "qmdestroy", vm.vmid, user, work)

    def make_template(self, vm: VM, user: str) -> Task:
        if vm.lock:
            raise ApiError(locked_message(vm))
        if vm.snapshots:
            raise ApiError("unable to create template, because VM contains snapshots")
        if vm.is_template:
            raise ApiError("you can't convert a template to a template")
        if vm.status == "running":
            raise ApiError("you can't convert a VM to template if VM is running")

        async def work(task: Task) -> None:
            await self.clock.sleep(self.durations["template"])
            for key, (storage, volume, _size) in vm.disks().items():
                options = _VOLUME.match(str(vm.config[key]))["options"]
                vm.config[key] = f"{storage}:{volume.replace('vm-', 'base-', 1)}{options}"
            vm.config["template"] = 1
            self.mark_dirty()

        return self.runner.spawn(vm.node, "qmtemplate", vm.vmid, user, work)

    # --- snapshots (pve-guest-common's AbstractConfig: snapshot_create, snapshot_delete, snapshot_rollback) -------
    # Proxmox checks these in the task: the API call answers with a UPID and the task fails with the error.

    def snapshot(self, vm: VM, user: str, snapname: str, description: str, vmstate: bool) -> Task:
        async def work(task: Task) -> None:
            if vm.is_template:
                raise TaskFailed("you can't take a snapshot if it's a template")
            if vm.lock:
                raise TaskFailed(locked_message(vm))
            if snapname in vm.snapshots:
                raise TaskFailed(f"snapshot name '{snapname}' already used")
            vm.config["lock"] = "snapshot"
            snapshot: dict[str, Any] = {}
            if vmstate and vm.status == "running":
                state = f"{self._vmstate_storage(vm)}:vm-{vm.vmid}-state-{snapname}"
                snapshot |= {"vmstate": state, "runningmachine": RUNNING_MACHINE, "runningcpu": RUNNING_CPU}
            _copy_snapshotted(vm.config, snapshot)
            snapshot |= {"snapstate": "prepare", "snaptime": int(self.clock.time())}
            if description:
                snapshot["description"] = description
            vm.snapshots[snapname] = snapshot
            self.mark_dirty()
            await self.clock.sleep(self.durations["snapshot"])
            del snapshot["snapstate"]
            vm.config.pop("lock", None)
            vm.config["parent"] = snapname
            self.mark_dirty()

        return self.runner.spawn(vm.node, "qmsnapshot", vm.vmid, user, work)

    def _vmstate_storage(self, vm: VM) -> str:
        """Where a RAM state goes: qemu-server's find_vmstate_storage (vmstatestorage, a shared disk's, a local disk's)."""
        used = sorted({storage for storage, _volume, _size in vm.disks().values()}, key=lambda name: not self.storages[name].shared)
        return str(vm.config.get("vmstatestorage") or (used[0] if used else "local"))

    def delete_snapshot(self, vm: VM, user: str, snapname: str) -> Task:
        async def work(task: Task) -> None:
            snapshot = vm.snapshots.get(snapname)
            if snapshot is None:
                raise TaskFailed(f"snapshot '{snapname}' does not exist")
            if vm.lock:
                raise TaskFailed(locked_message(vm))
            vm.config["lock"] = "snapshot-delete"
            self.mark_dirty()
            if vm.is_template:
                raise TaskFailed("you can't delete a snapshot if vm is a template")  # the lock stays, as in Proxmox
            snapshot["snapstate"] = "delete"
            await self.clock.sleep(self.durations["snapshot"])
            for holder in [vm.config, *vm.snapshots.values()]:
                if holder.get("parent") == snapname:
                    if snapshot.get("parent"):
                        holder["parent"] = snapshot["parent"]
                    else:
                        del holder["parent"]
            del vm.snapshots[snapname]
            vm.config.pop("lock", None)
            self.mark_dirty()

        return self.runner.spawn(vm.node, "qmdelsnapshot", vm.vmid, user, work)

    def rollback(self, vm: VM, user: str, snapname: str, start: bool) -> Task:
        """Stop the VM (qemu-server's __snapshot_rollback_vm_stop: no guest shutdown), put back the snapshot's config,
        resume from its RAM state if it has one, else start only when asked to."""

        async def work(task: Task) -> None:
            if vm.is_template:
                raise TaskFailed("you can't rollback if vm is a template")
            snapshot = vm.snapshots.get(snapname)
            if snapshot is None:
                raise TaskFailed(f"snapshot '{snapname}' does not exist")
            if snapshot.get("snapstate"):
                raise TaskFailed(f"unable to rollback to incomplete snapshot (snapstate = {snapshot['snapstate']})")
            if vm.lock:
                raise TaskFailed(locked_message(vm))
            if vm.status == "running":
                await self._power_off(vm)
            vm.config["lock"] = "rollback"
            self.mark_dirty()
            await self.clock.sleep(self.durations["snapshot"])
            config = {key: value for key, value in vm.config.items() if key == "description" or _UNUSED_DISK.match(key)}
            _copy_snapshotted(snapshot, config)
            for key in ("runningmachine", "runningcpu", "running-nets-host-mtu"):
                config.pop(key, None)
            if config.get("vmgenid"):
                config["vmgenid"] = _uuid()  # a new generation, as Proxmox tells the guest after a rollback
            config["parent"] = snapname
            vm.config.clear()
            vm.config.update(config)
            self.mark_dirty()
            if snapshot.get("vmstate"):
                await self._power_on(vm, agent_delay=0)
            elif start:
                await self._power_on(vm, self.durations["boot_to_agent"])

        return self.runner.spawn(vm.node, "qmrollback", vm.vmid, user, work)


def _uuid() -> str:
    raw = secrets.token_hex(16)
    return f"{raw[:8]}-{raw[8:12]}-{raw[12:16]}-{raw[16:20]}-{raw[20:]}"
