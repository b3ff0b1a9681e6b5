"""The implemented API endpoints, keyed by (method, schema path).

The server has already authenticated the caller, evaluated the schema's `permissions` check and
validated the parameters; handlers do what Proxmox does inside its handlers, including the
permission checks the schema only describes in prose (list filtering, per-option config privileges).
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from .access import SUPERUSER, AccessControl, PermissionDenied, Principal
from .errors import ApiError
from .formats import HOSTPCI, FormatError, check_ssh_public_keys, decode_sshkeys, parse_property_string, split_list, unique_tags
from .model import RUNNING_MACHINE, VM, Cluster, locked_message, with_mac
from .validation import ParameterErrors

PVE_VERSION = {"version": "9.1.1", "release": "9.1", "repoid": "42d4b4fa"}
QEMU_VERSION = "10.1.2"


@dataclass
class Call:
    cluster: Cluster
    access: AccessControl
    principal: Principal | None
    params: dict[str, Any]
    ssl_fingerprint: str

    @property
    def user(self) -> str:
        return self.principal.authid if self.principal else ""

    def allowed(self, path: str, privileges: list[str], any_of: bool = False) -> bool:
        return self.principal is not None and self.access.allowed(self.principal, path, privileges, any_of)

    def vm(self) -> VM:
        return self.cluster.vm(self.params["node"], self.params["vmid"])


Handler = Callable[[Call], Awaitable[Any]]
HANDLERS: dict[tuple[str, str], Handler] = {}


def endpoint(method: str, path: str) -> Callable[[Handler], Handler]:
    def register(handler: Handler) -> Handler:
        HANDLERS[(method, path)] = handler
        return handler

    return register


def _flag(value: bool) -> int:
    # Proxmox encodes booleans as 0/1 in its JSON answers.
    return 1 if value else 0


# --- access -----------------------------------------------------------------------------------------


@endpoint("GET", "/access/ticket")
async def ticket_form(call: Call) -> None:
    return None


@endpoint("POST", "/access/ticket")
async def login(call: Call) -> dict:
    params = call.params
    if "privs" in params or "path" in params:
        raise ApiError("ticket verification (path/privs) is not simulated", status=501)
    userid, ticket, csrf = call.access.login(params["username"], params["password"], params.get("realm"), call.cluster.clock.time())
    return {"username": userid, "ticket": ticket, "CSRFPreventionToken": csrf, "clustername": call.cluster.name}


@endpoint("GET", "/access/permissions")
async def permissions(call: Call) -> dict:
    principal = call.principal
    userid = call.params.get("userid")
    if userid and userid not in (principal.userid, principal.authid):
        call.access.require(principal, "/access", ["Sys.Audit"])
        user, _separator, tokenid = userid.partition("!")
        token = call.access.users.get(user).tokens.get(tokenid) if tokenid and user in call.access.users else None
        principal = Principal(user, tokenid or None, token.privsep if token else False)
    paths = [call.params["path"]] if "path" in call.params else sorted({"/"} | {entry.path for entry in call.access.acl})
    result = {}
    for path in paths:
        privileges = call.access.privileges(principal, path)
        if privileges:
            result[path] = {privilege: 1 for privilege in sorted(privileges)}
    return result


# --- cluster ----------------------------------------------------------------------------------------


@endpoint("GET", "/version")
async def version(call: Call) -> dict:
    return dict(PVE_VERSION)


@endpoint("GET", "/cluster/status")
async def cluster_status(call: Call) -> list:
    cluster = call.cluster
    entries = [{"type": "cluster", "id": "cluster", "name": cluster.name, "nodes": len(cluster.nodes), "quorate": 1, "version": len(cluster.nodes) + 1}]
    for index, name in enumerate(cluster.nodes):
        entries.append(
            {
                "type": "node",
                "id": f"node/{name}",
                "name": name,
                "nodeid": index + 1,
                "ip": f"127.0.0.{index + 1}" if index == 0 else f"192.0.2.{index + 1}",
                "local": _flag(index == 0),
                "online": _flag(cluster.node_online(name)),
                "level": "",
            }
        )
    return entries


@endpoint("GET", "/cluster/nextid")
async def next_id(call: Call) -> str:
    cluster = call.cluster
    wanted = call.params.get("vmid")
    if wanted is not None:
        if wanted in cluster.vms:
            raise ApiError(f"VM {wanted} already exists", status=400)
        return str(wanted)
    # Proxmox answers with a string here, although the schema says integer.
    return str(cluster.next_free_id())


def vm_stats(cluster: Cluster, vm: VM) -> dict:
    """A guest as pve-manager's PVE::API2Tools::extract_vm_stats reports it (pool members, /cluster/resources)."""
    running = vm.status == "running"
    mem = vm.memory_bytes * 2 // 5 if running else 0
    return {
        "id": f"qemu/{vm.vmid}",
        "type": "qemu",
        "node": vm.node,
        "vmid": vm.vmid,
        "name": str(vm.config.get("name", f"VM {vm.vmid}")),
        "status": vm.status if cluster.node_online(vm.node) else "unknown",
        "maxcpu": vm.cpus,
        "maxmem": vm.memory_bytes,
        "mem": mem,
        "memhost": mem,
        "cpu": 0.02 if running else 0,
        "maxdisk": vm.maxdisk,
        "disk": 0,
        "uptime": cluster.uptime(vm),
        "netin": 0,
        "netout": 0,
        "diskread": 0,
        "diskwrite": 0,
        "template": _flag(vm.is_template),
    }


def vm_resource(cluster: Cluster, vm: VM) -> dict:
    """A /cluster/resources guest entry: its stats plus lock, tags and pool."""
    entry = vm_stats(cluster, vm)
    for key in ("tags", "lock"):
        if vm.config.get(key):
            entry[key] = str(vm.config[key])
    if vm.pool:
        entry["pool"] = vm.pool
    return entry


def node_stats(cluster: Cluster, name: str, audit: bool) -> dict:
    """A node as pve-manager's PVE::API2Tools::extract_node_stats reports it (/nodes, /cluster/resources): every node,
    with its usage and capacity only for callers with Sys.Audit on it, and usage only while it is online."""
    node = cluster.nodes[name]
    online = cluster.node_online(name)
    entry: dict[str, Any] = {"id": f"node/{name}", "node": name, "type": "node", "status": "online" if online else "offline", "level": ""}
    if audit and online:
        running = sum(1 for vm in cluster.vms.values() if vm.node == name and vm.status == "running")
        entry |= {
            "uptime": int(cluster.clock.time() - node.boot_time),
            "cpu": min(1.0, 0.01 + 0.02 * running / node.maxcpu),
            "mem": cluster.node_memory_used(name) + 2 * 1024**3,
            "disk": 12 * 1024**3,
        }
    if audit:
        entry |= {"maxcpu": node.maxcpu, "maxmem": node.maxmem, "maxdisk": 100 * 1024**3}
    return entry


def storage_resource(cluster: Cluster, node: str, name: str) -> dict:
    storage = cluster.storages[name]
    return {
        "id": f"storage/{node}/{name}",
        "type": "storage",
        "node": node,
        "storage": name,
        "status": "available" if cluster.node_online(node) else "unknown",
        "plugintype": storage.type,
        "content": storage.content,
        "shared": _flag(storage.shared),
        "maxdisk": storage.size,
        "disk": cluster.storage_used(name),
    }


@endpoint("GET", "/cluster/resources")
async def resources(call: Call) -> list:
    """As pve-manager's PVE::API2::Cluster `resources`: guests need VM.Audit (their pool shows with Pool.Audit on it),
    nodes are listed for everyone (stats with Sys.Audit), storages need Datastore.Audit; pools sum their running guests."""
    cluster, wanted = call.cluster, call.params.get("type")
    pools = {poolid: {"id": f"/pool/{poolid}", "type": "pool", "pool": poolid} for poolid in cluster.pools if call.allowed(f"/pool/{poolid}", ["Pool.Audit"])}
    entries: list[dict] = []
    for vmid, vm in sorted(cluster.vms.items()) if wanted in (None, "vm") else ():
        entry = vm_resource(cluster, vm)
        if entry["uptime"] and entry.get("pool") in pools:
            _add_to_pool_stats(pools[entry["pool"]], entry)
        if call.allowed(f"/vms/{vmid}", ["VM.Audit"]):
            if "pool" in entry and entry["pool"] not in pools:
                del entry["pool"]
            entries.append(entry)
    if wanted in (None, "node"):
        # pve-manager adds each node's cgroup mode from its static info, whatever the caller may audit.
        entries += [node_stats(cluster, name, call.allowed(f"/nodes/{name}", ["Sys.Audit"])) | {"cgroup-mode": 2} for name in cluster.nodes]
    if wanted in (None, "storage"):
        audited = [name for name in cluster.storages if call.allowed(f"/storage/{name}", ["Datastore.Audit"])]
        entries += [storage_resource(cluster, node, name) for name in audited for node in cluster.nodes]
    if wanted is None:
        entries += list(pools.values())
    return entries


def _add_to_pool_stats(pool: dict, guest: dict) -> None:
    pool["uptime"] = max(pool.get("uptime", 0), guest["uptime"])
    pool["mem"] = pool.get("mem", 0) + guest["mem"]
    pool["maxmem"] = pool.get("maxmem", 0) + guest["maxmem"]
    cpu, maxcpu = pool.get("cpu", 0), pool.get("maxcpu", 0)
    # Proxmox weighs each guest's CPU fraction by its CPU count.
    pool["cpu"] = (cpu * maxcpu + guest["cpu"] * guest["maxcpu"]) / (maxcpu + guest["maxcpu"])
    pool["maxcpu"] = maxcpu + guest["maxcpu"]


def _may_see_task(call: Call, task) -> bool:
    owner = task.user.split("!")[0]
    return task.user == call.user or owner == call.principal.userid or call.allowed(f"/nodes/{task.node}", ["Sys.Audit"])


@endpoint("GET", "/cluster/tasks")
async def cluster_tasks(call: Call) -> list:
    tasks = [task for task in call.cluster.runner.tasks.values() if _may_see_task(call, task)]
    return [task.list_entry() for task in sorted(tasks, key=lambda task: task.starttime, reverse=True)]


@endpoint("GET", "/storage")
async def storage_list(call: Call) -> list:
    wanted = call.params.get("type")
    return [
        {"storage": name, "type": storage.type, "shared": _flag(storage.shared), "content": storage.content}
        for name, storage in call.cluster.storages.items()
        if (wanted is None or storage.type == wanted) and call.allowed(f"/storage/{name}", ["Datastore.Audit", "Datastore.AllocateSpace"], any_of=True)
    ]


# --- pools ------------------------------------------------------------------------------------------


def _pool_members(cluster: Cluster, poolid: str, wanted: str | None) -> list[dict]:
    """Members with the stats /cluster/resources gives them, in Proxmox's order (VMIDs sorted as strings)."""
    if wanted not in (None, "qemu"):
        return []
    return [vm_stats(cluster, vm) for vm in sorted(cluster.vms.values(), key=lambda vm: str(vm.vmid)) if vm.pool == poolid]


def _existing_pool(cluster: Cluster, poolid: str) -> str:
    if poolid not in cluster.pools:
        raise ApiError(f"pool '{poolid}' does not exist")
    return poolid


def _pool_info(cluster: Cluster, poolid: str, wanted: str | None) -> dict:
    return {"members": _pool_members(cluster, poolid, wanted), "comment": cluster.pools[poolid], "poolid": poolid}


@endpoint("GET", "/pools")
async def pools(call: Call) -> list:
    cluster, only = call.cluster, call.params.get("poolid")
    if only is not None:
        # pve-manager's PVE::API2::Pool `index` checks Pool.Audit here with noerr and ignores the result:
        # any user gets a named pool with its members.
        return [_pool_info(cluster, _existing_pool(cluster, only), call.params.get("type"))]
    return [{"poolid": poolid, "comment": comment} for poolid, comment in sorted(cluster.pools.items()) if call.allowed(f"/pool/{poolid}", ["Pool.Audit"])]


@endpoint("GET", "/pools/{poolid}")
async def pool(call: Call) -> dict:
    # Proxmox answers with its `index` entry, `poolid` included although the schema does not declare it.
    return _pool_info(call.cluster, _existing_pool(call.cluster, call.params["poolid"]), call.params.get("type"))


@endpoint("POST", "/pools")
async def create_pool(call: Call) -> None:
    poolid = call.params["poolid"]
    if poolid in call.cluster.pools:
        raise ApiError(f"create pool failed: pool '{poolid}' already exists")
    call.cluster.pools[poolid] = call.params.get("comment", "")
    call.cluster.mark_dirty()


async def _update_pool(call: Call) -> None:
    cluster, params = call.cluster, call.params
    poolid = _existing_pool(cluster, params["poolid"])
    if "comment" in params:
        cluster.pools[poolid] = params["comment"]
    for vmid in (int(item) for item in split_list(params.get("vms", ""))):
        vm = cluster.vms.get(vmid)
        if vm is None:
            raise ApiError(f"update pools failed: unable to add/remove VM {vmid} - no such VM")
        call.access.require(call.principal, f"/vms/{vmid}", ["VM.Allocate"])
        if params.get("delete"):
            if vm.pool == poolid:
                vm.pool = None
        elif vm.pool not in (None, poolid) and not params.get("allow-move"):
            raise ApiError(f"update pools failed: VM {vmid} belongs already to pool '{vm.pool}' and 'allow-move' is not set")
        else:
            vm.pool = poolid
    cluster.mark_dirty()


HANDLERS[("PUT", "/pools")] = _update_pool
HANDLERS[("PUT", "/pools/{poolid}")] = _update_pool


async def _delete_pool(call: Call) -> None:
    poolid = _existing_pool(call.cluster, call.params["poolid"])
    if _pool_members(call.cluster, poolid, None):
        raise ApiError(f"delete pool failed: pool '{poolid}' is not empty")
    del call.cluster.pools[poolid]
    call.cluster.mark_dirty()


HANDLERS[("DELETE", "/pools")] = _delete_pool
HANDLERS[("DELETE", "/pools/{poolid}")] = _delete_pool


# --- cluster resource mappings (pve-manager PVE/API2/Cluster/Mapping/PCI.pm) ------------------------------

_SEE_MAPPING = ["Mapping.Modify", "Mapping.Use", "Mapping.Audit"]
_MAPPING_OPTIONS = ("description", "mdev", "live-migration-capable", "map")


@endpoint("GET", "/cluster/mapping/pci")
async def pci_mappings(call: Call) -> list:
    cluster, check_node = call.cluster, call.params.get("check-node")
    if check_node is not None:
        cluster.node(check_node)
    digest = cluster.pci_mapping_digest()
    answer = []
    for mapping_id, spec in sorted(cluster.pci_mappings.items()):
        if not call.allowed(f"/mapping/pci/{mapping_id}", _SEE_MAPPING, any_of=True):
            continue
        entry = _mapping_answer(spec) | {"id": mapping_id, "digest": digest}
        if check_node is not None:
            # The simulated hardware always matches its mapping (assert_valid passes); only a missing node entry is reported.
            missing = not cluster.pci_mapping_entries(mapping_id, check_node)
            entry["checks"] = [{"severity": "warning", "message": f"No mapping for node {check_node}."}] if missing else []
        answer.append(entry)
    return answer


def _mapping_answer(spec: dict) -> dict:
    return {key: (_flag(bool(int(value))) if key in ("mdev", "live-migration-capable") else value) for key, value in spec.items()}


def _existing_mapping(call: Call) -> dict:
    mapping = call.cluster.pci_mappings.get(call.params["id"])
    if mapping is None:
        raise ApiError(f"mapping '{call.params['id']}' not found")
    return mapping


@endpoint("GET", "/cluster/mapping/pci/{id}")
async def pci_mapping(call: Call) -> dict:
    return _mapping_answer(_existing_mapping(call)) | {"digest": call.cluster.pci_mapping_digest()}


def _mapping_settings(call: Call) -> dict:
    settings = {key: call.params[key] for key in _MAPPING_OPTIONS if key in call.params}
    if "map" in settings:
        try:
            return call.cluster.checked_pci_mapping(call.params["id"], settings)
        except ValueError as error:
            raise ApiError(str(error), status=400) from None
    return settings


@endpoint("POST", "/cluster/mapping/pci")
async def create_pci_mapping(call: Call) -> None:
    mapping_id = call.params["id"]
    if mapping_id in call.cluster.pci_mappings:
        raise ApiError(f"create hardware mapping failed: pci ID '{mapping_id}' already defined")
    call.cluster.pci_mappings[mapping_id] = _mapping_settings(call)
    call.cluster.mark_dirty()


@endpoint("PUT", "/cluster/mapping/pci/{id}")
async def update_pci_mapping(call: Call) -> None:
    cluster, params = call.cluster, call.params
    if "digest" in params and params["digest"] != cluster.pci_mapping_digest():
        raise ApiError("update hardware mapping failed: detected modified configuration - file changed by other user? Try again.")
    if params["id"] not in cluster.pci_mappings:
        raise ApiError(f"update hardware mapping failed: pci ID '{params['id']}' does not exist")
    mapping = cluster.pci_mappings[params["id"]]
    for key in split_list(params.get("delete", "")):
        if key == "map":
            raise ApiError("update hardware mapping failed: cannot delete required option 'map'!")
        mapping.pop(key, None)
    mapping.update(_mapping_settings(call))
    cluster.mark_dirty()


@endpoint("DELETE", "/cluster/mapping/pci/{id}")
async def delete_pci_mapping(call: Call) -> None:
    call.cluster.pci_mappings.pop(call.params["id"], None)
    call.cluster.mark_dirty()


# --- nodes ------------------------------------------------------------------------------------------


@endpoint("GET", "/nodes")
async def nodes(call: Call) -> list:
    return [
        node_stats(call.cluster, name, call.allowed(f"/nodes/{name}", ["Sys.Audit"])) | {"ssl_fingerprint": call.ssl_fingerprint} for name in call.cluster.nodes
    ]


# pve-manager's PVE::API2::Nodes::Nodeinfo `index`; most of these answer 501 here.
NODE_SUBDIRS = (
    "aplinfo apt capabilities ceph certificates config disks dns firewall hardware hosts journal lxc migrateall netstat network qemu "
    "query-oci-repo-tags query-url-metadata replication report rrd rrddata scan sdn services spiceshell startall status stopall storage "
    "subscription suspendall syslog tasks termproxy time version vncshell vzdump wakeonlan"
).split()


@endpoint("GET", "/nodes/{node}")
async def node_index(call: Call) -> list:
    call.cluster.node(call.params["node"])
    return [{"name": name} for name in NODE_SUBDIRS]


@endpoint("GET", "/nodes/{node}/lxc")
async def lxc_list(call: Call) -> list:
    call.cluster.node(call.params["node"])
    return []  # no containers are simulated


# pve-storage's PVE::Storage::volume_list content types, in its order.
CONTENT_TYPES = ("rootdir", "images", "vztmpl", "iso", "backup", "snippets", "import")


@endpoint("GET", "/nodes/{node}/storage/{storage}/content")
async def storage_content(call: Call) -> list:
    """pve-storage's PVE::API2::Storage::Content `index`: each volume needs Datastore.Allocate on the storage, or
    Datastore.Audit on it and VM.Config.Disk on the owning VM (PVE::Storage::check_volume_access)."""
    cluster, params = call.cluster, call.params
    node = cluster.node(params["node"]).name
    name = params["storage"]
    storage = cluster.storage(name)
    wanted = [params["content"]] if "content" in params else CONTENT_TYPES
    if "images" not in wanted or "images" not in split_list(storage.content):
        return []  # only disk images are simulated
    see_all = call.allowed(f"/storage/{name}", ["Datastore.Allocate"])
    audit = call.allowed(f"/storage/{name}", ["Datastore.Audit"])
    return [
        volume | {"content": "images"}
        for volume in sorted(cluster.volumes(name, node), key=lambda volume: volume["volid"].lower())
        if params.get("vmid", volume["vmid"]) == volume["vmid"] and (see_all or (audit and call.allowed(f"/vms/{volume['vmid']}", ["VM.Config.Disk"])))
    ]


@endpoint("GET", "/nodes/{node}/status")
async def node_status(call: Call) -> dict:
    cluster = call.cluster
    node = cluster.node(call.params["node"])
    used = cluster.node_memory_used(node.name) + 2 * 1024**3
    return {
        "cpu": node_stats(cluster, node.name, audit=True)["cpu"],
        "cpuinfo": {"cores": node.maxcpu // 2 or 1, "cpus": node.maxcpu, "model": "pvesim virtual CPU", "sockets": 2 if node.maxcpu > 1 else 1},
        "memory": {"total": node.maxmem, "used": used, "free": max(0, node.maxmem - used), "available": max(0, node.maxmem - used)},
        "rootfs": {"total": 100 * 1024**3, "used": 12 * 1024**3, "free": 88 * 1024**3, "avail": 88 * 1024**3},
        "loadavg": ["0.10", "0.08", "0.05"],
        "pveversion": f"pve-manager/{PVE_VERSION['version']}/{PVE_VERSION['repoid']}",
        "current-kernel": {"sysname": "Linux", "release": "6.14.11-4-pve", "version": "#1 SMP PREEMPT_DYNAMIC PMX", "machine": "x86_64"},
        "boot-info": {"mode": "efi", "secureboot": 0},
    }


@endpoint("GET", "/nodes/{node}/tasks")
async def node_tasks(call: Call) -> list:
    node = call.cluster.node(call.params["node"]).name
    params = call.params
    source = params.get("source", "archive")
    tasks = [
        task
        for task in call.cluster.runner.tasks.values()
        if task.node == node
        and _may_see_task(call, task)
        and ("vmid" not in params or task.id == str(params["vmid"]))
        and ("typefilter" not in params or task.type == params["typefilter"])
        and (source == "all" or (source == "active") == (task.status == "running"))
        and (not params.get("errors") or task.exitstatus not in (None, "OK"))
    ]
    tasks.sort(key=lambda task: task.starttime, reverse=True)
    start = params.get("start", 0)
    return [task.list_entry() for task in tasks[start : start + params.get("limit", 50)]]


def _task(call: Call):
    node = call.cluster.node(call.params["node"]).name
    task = call.cluster.runner.tasks.get(call.params["upid"])
    if task is None or task.node != node:
        raise ApiError(f"no such task '{call.params['upid']}'")
    if not _may_see_task(call, task):
        raise PermissionDenied(f"Permission check failed (/nodes/{node}, Sys.Audit)")
    return task


@endpoint("GET", "/nodes/{node}/tasks/{upid}")
async def task_index(call: Call) -> list:
    _task(call)
    return [{"name": "log"}, {"name": "status"}]


@endpoint("GET", "/nodes/{node}/tasks/{upid}/status")
async def task_status(call: Call) -> dict:
    return _task(call).status_entry()


@endpoint("GET", "/nodes/{node}/tasks/{upid}/log")
async def task_log(call: Call) -> list:
    task = _task(call)
    start, limit = call.params.get("start", 0), call.params.get("limit", 50)
    return [{"n": number + 1, "t": line} for number, line in enumerate(task.log)][start : start + limit]


# --- qemu -------------------------------------------------------------------------------------------


@endpoint("GET", "/nodes/{node}/qemu")
async def qemu_list(call: Call) -> list:
    cluster = call.cluster
    node = cluster.node(call.params["node"]).name
    entries = []
    for vmid, vm in sorted(cluster.vms.items()):
        if vm.node == node and call.allowed(f"/vms/{vmid}", ["VM.Audit"]):
            entries.append(vm_status_summary(cluster, vm))
    return entries


def vm_status_summary(cluster, vm) -> dict:
    """The fields the qemu list and status/current share."""
    resource = vm_resource(cluster, vm)
    shared = ("vmid", "name", "status", "maxmem", "mem", "cpu", "maxdisk", "uptime", "netin", "netout", "diskread", "diskwrite")
    summary = {key: resource[key] for key in shared}
    summary["cpus"] = vm.cpus
    summary |= {key: resource[key] for key in ("tags", "lock") if key in resource}
    if vm.is_template:
        summary["template"] = 1
    if vm.status == "running":
        summary["pid"] = 10000 + vm.vmid % 50000
    return summary


@endpoint("GET", "/nodes/{node}/qemu/{vmid}")
async def qemu_index(call: Call) -> list:
    call.vm()
    return [{"subdir": name} for name in ("config", "status", "snapshot", "agent", "clone", "template")]


@endpoint("GET", "/nodes/{node}/qemu/{vmid}/config")
async def get_config(call: Call) -> dict:
    vm = call.vm()
    snapname = call.params.get("snapshot")
    if snapname is not None and call.params.get("current"):
        message = "cannot use 'snapshot' parameter with 'current'"
        raise ParameterErrors({"snapshot": message, "current": message})
    config = dict(_snapshot(vm, snapname) if snapname is not None else vm.config)
    config["digest"] = vm.digest()
    if config.get("cipassword"):
        config["cipassword"] = "**********"
    return config


def _snapshot(vm: VM, snapname: str) -> dict:
    if snapname not in vm.snapshots:
        raise ApiError(f"snapshot '{snapname}' does not exist")
    return vm.snapshots[snapname]


# Which privilege Proxmox demands for changing (or deleting) each option; the rest need VM.Config.HWType.
_OPTION_PRIVILEGES = [
    (r"(cores|sockets|vcpus|cpu|cpulimit|cpuunits|affinity|numa\d*)", "VM.Config.CPU"),
    (r"(memory|balloon|shares)", "VM.Config.Memory"),
    (r"net\d+", "VM.Config.Network"),
    (r"(ipconfig\d+|ciuser|cipassword|sshkeys|nameserver|searchdomain|citype|cicustom|ciupgrade)", "VM.Config.Cloudinit"),
    (r"(scsi|virtio|sata|ide|unused)\d+|efidisk0|tpmstate0", "VM.Config.Disk"),
    (
        r"(name|description|tags|onboot|startup|protection|agent|hookscript|keyboard|localtime|tablet|acpi|kvm|freeze|"
        r"startdate|reboot|boot|bootdisk|ostype|template|lock|migrate_speed|migrate_downtime|vmstatestorage|spice_enhancements)",
        "VM.Config.Options",
    ),
]
_CONFIG_CONTROL_PARAMS = {"node", "vmid", "digest", "delete", "revert", "skiplock", "force", "background_delay", "import-working-storage"}


def _option_privilege(option: str) -> str:
    for pattern, privilege in _OPTION_PRIVILEGES:
        if re.fullmatch(pattern, option):
            return privilege
    return "VM.Config.HWType"


def _check_hostpci_permission(call: Call, option: str, value: str) -> None:
    """qemu-server's check_hostpci_perm: a raw host device is root's; a mapped one needs Mapping.Use on the mapping."""
    if call.principal.authid == SUPERUSER:
        return
    device = parse_property_string(value, HOSTPCI)
    if device.get("host"):
        raise ApiError(f"only root can set '{option}' config for non-mapped devices")
    if not device.get("mapping"):
        raise ApiError("either 'host' or 'mapping' must be set.")
    call.access.require(call.principal, f"/mapping/pci/{device['mapping']}", ["Mapping.Use"])
    if "romfile" in device:
        raise ParameterErrors({option: "only root@pam can set 'romfile' option"})


def _apply_config(call: Call, vm: VM) -> None:
    params = call.params
    if params.get("skiplock") and call.principal.authid != SUPERUSER:
        raise ApiError("Only root may use this option.")
    if vm.lock and not params.get("skiplock"):
        raise ApiError(locked_message(vm))
    if "digest" in params and params["digest"] != vm.digest():
        raise ApiError("detected modified configuration - file changed by other user? Try again.")
    deletions = split_list(params.get("delete", ""))
    changes = {key: value for key, value in params.items() if key not in _CONFIG_CONTROL_PARAMS}
    for option in sorted(set(changes) | set(deletions)):
        call.access.require(call.principal, f"/vms/{vm.vmid}", [_option_privilege(option)])
        if re.fullmatch(r"hostpci\d+", option):
            if vm.config.get(option):
                _check_hostpci_permission(call, option, str(vm.config[option]))
            if option in changes:
                _check_hostpci_permission(call, option, str(changes[option]))
    both = set(changes) & set(deletions)
    if both:
        raise ApiError(f"You can't change option '{sorted(both)[0]}' and delete it at the same time")
    if "sshkeys" in changes:
        try:
            check_ssh_public_keys(decode_sshkeys(changes["sshkeys"]))
        except FormatError as error:
            raise ApiError(str(error)) from None
    for key in deletions:
        vm.config.pop(key, None)
    for key, value in changes.items():
        if re.fullmatch(r"net\d+", key):
            value = with_mac(value)
        elif key == "tags":
            value = unique_tags(value)
        vm.config[key] = int(value) if isinstance(value, bool) else value
    call.cluster.mark_dirty()


@endpoint("PUT", "/nodes/{node}/qemu/{vmid}/config")
async def put_config(call: Call) -> None:
    _apply_config(call, call.vm())


@endpoint("POST", "/nodes/{node}/qemu/{vmid}/config")
async def post_config(call: Call) -> str:
    vm = call.vm()
    _apply_config(call, vm)

    async def work(task) -> None:
        await call.cluster.clock.sleep(call.cluster.durations["config"])

    return call.cluster.runner.spawn(vm.node, "qmconfig", vm.vmid, call.user, work).upid


@endpoint("POST", "/nodes/{node}/qemu")
async def create_vm(call: Call) -> str:
    cluster, params = call.cluster, call.params
    node = cluster.node(params["node"]).name
    vmid, pool = params["vmid"], params.get("pool")
    if not call.allowed(f"/vms/{vmid}", ["VM.Allocate"]) and not (pool and call.allowed(f"/pool/{pool}", ["VM.Allocate"])):
        raise PermissionDenied(f"Permission check failed (/vms/{vmid}, VM.Allocate)")
    if vmid in cluster.vms:
        raise ApiError(f"unable to create VM {vmid}: config file already exists")
    if pool is not None:
        _existing_pool(cluster, pool)
    if "archive" in params:
        raise ApiError("restore from an archive is not simulated", status=501)
    config: dict[str, Any] = {}
    for key, value in params.items():
        if key in ("node", "vmid", "pool", "start", "storage", "unique", "force", "bwlimit", "live-restore", "ha-managed"):
            continue
        if re.fullmatch(r"hostpci\d+", key):
            _check_hostpci_permission(call, key, str(value))
        allocation = (
            re.fullmatch(r"(?P<storage>[^:,]+):(?P<size>\d+)(?P<options>,.*)?", str(value)) if re.fullmatch(r"(scsi|virtio|sata|ide)\d+", key) else None
        )
        if allocation:
            # `local-lvm:8` asks Proxmox to allocate a new 8 GiB volume.
            cluster.storage(allocation["storage"])
            call.access.require(call.principal, f"/storage/{allocation['storage']}", ["Datastore.AllocateSpace"])
            value = f"{allocation['storage']}:vm-{vmid}-disk-{key[-1]},size={allocation['size']}G{allocation['options'] or ''}"
        elif re.fullmatch(r"net\d+", key):
            value = with_mac(value)
        config[key] = int(value) if isinstance(value, bool) else value
    vm = VM(vmid, node, config, pool=pool, ctime=int(cluster.clock.time()))
    vm.config["lock"] = "create"
    cluster.vms[vmid] = vm
    start_after = params.get("start", False)

    async def work(task) -> None:
        await cluster.clock.sleep(cluster.durations["config"])
        vm.config.pop("lock", None)
        cluster.mark_dirty()
        if start_after:
            cluster.start(vm, call.user)

    return cluster.runner.spawn(node, "qmcreate", vmid, call.user, work).upid


@endpoint("POST", "/nodes/{node}/qemu/{vmid}/clone")
async def clone(call: Call) -> str:
    params = call.params
    source = call.vm()
    if source.lock:
        raise ApiError(locked_message(source))
    full = params.get("full", not source.is_template)
    for storage in call.cluster.clone_storages(source, params.get("storage")):
        call.access.require(call.principal, f"/storage/{storage}", ["Datastore.AllocateSpace"])
    task = call.cluster.clone(
        source,
        params["newid"],
        call.user,
        full=full,
        name=params.get("name"),
        description=params.get("description"),
        pool=params.get("pool"),
        storage=params.get("storage"),
        target=params.get("target"),
    )
    return task.upid


@endpoint("POST", "/nodes/{node}/qemu/{vmid}/template")
async def template(call: Call) -> str:
    return call.cluster.make_template(call.vm(), call.user).upid


@endpoint("DELETE", "/nodes/{node}/qemu/{vmid}")
async def destroy(call: Call) -> str:
    skiplock = call.params.get("skiplock", False)
    if skiplock and call.principal.authid != SUPERUSER:
        raise ApiError("Only root may use this option.")
    return call.cluster.destroy(call.vm(), call.user, skiplock).upid


@endpoint("GET", "/nodes/{node}/qemu/{vmid}/status")
async def status_index(call: Call) -> list:
    call.vm()
    return [{"subdir": name} for name in ("current", "start", "stop", "shutdown", "reboot")]


@endpoint("GET", "/nodes/{node}/qemu/{vmid}/status/current")
async def status_current(call: Call) -> dict:
    vm = call.vm()
    status = vm_status_summary(call.cluster, vm) | {"qmpstatus": vm.status, "ha": {"managed": 0}}
    if vm.agent_enabled:
        status["agent"] = 1
    if vm.status == "running":
        status |= {"running-qemu": QEMU_VERSION, "running-machine": RUNNING_MACHINE}
    return status


def _unlocked(call: Call) -> VM:
    vm = call.vm()
    skiplock = call.params.get("skiplock", False)
    if skiplock and call.principal.authid != SUPERUSER:
        raise ApiError("Only root may use this option.")
    if vm.lock and not skiplock:
        raise ApiError(locked_message(vm))
    return vm


@endpoint("POST", "/nodes/{node}/qemu/{vmid}/status/start")
async def start(call: Call) -> str:
    return call.cluster.start(_unlocked(call), call.user).upid


@endpoint("POST", "/nodes/{node}/qemu/{vmid}/status/stop")
async def stop(call: Call) -> str:
    return call.cluster.stop(_unlocked(call), call.user).upid


@endpoint("POST", "/nodes/{node}/qemu/{vmid}/status/shutdown")
async def shutdown(call: Call) -> str:
    return call.cluster.shutdown(_unlocked(call), call.user, call.params.get("timeout"), call.params.get("forceStop", False)).upid


@endpoint("POST", "/nodes/{node}/qemu/{vmid}/status/reboot")
async def reboot(call: Call) -> str:
    return call.cluster.reboot(_unlocked(call), call.user).upid


@endpoint("GET", "/nodes/{node}/qemu/{vmid}/snapshot")
async def snapshots(call: Call) -> list:
    """qemu-server's `snapshot_list`: every snapshot, then `current` (the VM as it is now)."""
    vm = call.vm()
    entries = []
    for name, snapshot in vm.snapshots.items():
        entry = {"name": name, "snaptime": snapshot.get("snaptime", 0), "vmstate": _flag(snapshot.get("vmstate"))}
        entry["description"] = snapshot.get("description", "")
        entry |= {key: snapshot[key] for key in ("parent", "snapstate") if snapshot.get(key)}
        entries.append(entry)
    current = {"name": "current", "digest": vm.digest(), "running": _flag(vm.status == "running"), "description": "You are here!"}
    if vm.config.get("parent"):
        current["parent"] = vm.config["parent"]
    return [*entries, current]


@endpoint("POST", "/nodes/{node}/qemu/{vmid}/snapshot")
async def create_snapshot(call: Call) -> str:
    params = call.params
    snapname = params["snapname"]
    if snapname == "current" or snapname.lower() == "pending":
        raise ApiError(f"unable to use snapshot name '{snapname.lower()}' (reserved name)")
    return call.cluster.snapshot(call.vm(), call.user, snapname, params.get("description", ""), params.get("vmstate", False)).upid


@endpoint("GET", "/nodes/{node}/qemu/{vmid}/snapshot/{snapname}")
async def snapshot_index(call: Call) -> list:
    return [{"cmd": "rollback"}, {"cmd": "config"}]


@endpoint("GET", "/nodes/{node}/qemu/{vmid}/snapshot/{snapname}/config")
async def snapshot_config(call: Call) -> dict:
    return dict(_snapshot(call.vm(), call.params["snapname"]))


@endpoint("PUT", "/nodes/{node}/qemu/{vmid}/snapshot/{snapname}/config")
async def update_snapshot_config(call: Call) -> None:
    vm = call.vm()
    if "description" not in call.params:
        return
    if vm.lock:
        raise ApiError(locked_message(vm))
    _snapshot(vm, call.params["snapname"])["description"] = call.params["description"]
    call.cluster.mark_dirty()


@endpoint("DELETE", "/nodes/{node}/qemu/{vmid}/snapshot/{snapname}")
async def delete_snapshot(call: Call) -> str:
    # `force` only skips waiting for replication jobs, which are not simulated.
    return call.cluster.delete_snapshot(call.vm(), call.user, call.params["snapname"]).upid


@endpoint("POST", "/nodes/{node}/qemu/{vmid}/snapshot/{snapname}/rollback")
async def rollback(call: Call) -> str:
    vm = call.vm()
    start = call.params.get("start", False)
    if start:
        # qemu-server starts the VM from within the rollback task, so it checks the start privilege up front.
        call.access.require(call.principal, f"/vms/{vm.vmid}", ["VM.PowerMgmt"])
    return call.cluster.rollback(vm, call.user, call.params["snapname"], start).upid


# --- guest agent ------------------------------------------------------------------------------------


async def _agent(call: Call, command: str) -> dict:
    cluster, vm = call.cluster, call.vm()
    if vm.status != "running":
        raise ApiError(f"VM {vm.vmid} is not running")
    if not vm.agent_enabled:
        raise ApiError("No QEMU guest agent configured")
    interfaces = await cluster.backend.guest_interfaces(vm) if cluster.agent_answers(vm) else None
    if interfaces is None:
        raise ApiError("QEMU guest agent is not running")
    results = {
        "ping": {},
        "network-get-interfaces": interfaces,
        "get-host-name": {"host-name": str(vm.config.get("name", f"vm{vm.vmid}"))},
        "get-osinfo": {"id": "debian", "name": "Debian GNU/Linux", "version-id": "12", "kernel-release": "6.1.0-40-amd64", "machine": "x86_64"},
        "info": {"version": "7.2.19", "supported_commands": [{"name": name, "enabled": True} for name in ("guest-ping", "guest-network-get-interfaces")]},
    }
    if command not in results:
        raise ApiError(f"guest agent command '{command}' is not simulated", status=501)
    return {"result": results[command]}


def _agent_endpoint(method: str, command: str) -> None:
    async def run(call: Call) -> dict:
        return await _agent(call, command)

    HANDLERS[(method, f"/nodes/{{node}}/qemu/{{vmid}}/agent/{command}")] = run


for _method, _command in (("POST", "ping"), ("GET", "network-get-interfaces"), ("GET", "get-host-name"), ("GET", "get-osinfo"), ("GET", "info")):
    _agent_endpoint(_method, _command)


@endpoint("POST", "/nodes/{node}/qemu/{vmid}/agent")
async def agent_command(call: Call) -> dict:
    return await _agent(call, call.params["command"])
