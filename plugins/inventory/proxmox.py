# Copyright (c) mlfleet.serving maintainers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
name: proxmox
short_description: Proxmox VE virtual machines as inventory hosts
version_added: 0.1.0
author:
  - mlfleet.serving maintainers (@mlfleet)
description:
  - Reads the VMs of a Proxmox VE cluster with one C(GET /cluster/resources?type=vm) call, then the config of each
    selected VM and the QEMU guest agent of every running one for its addresses, concurrently and with a
    per-call timeout for the agent.
  - Templates are never hosts. The O(filters) are applied to the one cluster answer, so VMs filtered out
    cost no further call.
  - "The host address (C(ansible_host)) is the address of the VM's network device O(address_nic) (V(net0) by
    default), by the same rule as the module M(mlfleet.serving.proxmox_vm_pool), so both name the same address for
    a VM: first an address the guest agent reports on the guest interface whose MAC is that device's (IPv4 before
    IPv6, and only IPv4 when the device's cloud-init C(ipconfigN) sets C(ip=), static or dhcp; never loopback,
    link-local, multicast, nor an interface of a container engine such as C(docker0), C(docker_gwbridge),
    C(br-*) or C(veth*)); else, also for VMs without an agent answer (stopped, agent disabled or not yet up), the
    static address of that C(ipconfigN). An address on another interface is never taken, whatever its name."
  - "A VM with neither is kept in the inventory without C(ansible_host), with C(proxmox_unreachable=true), in
    the group C(proxmox_unreachable), and a warning names it and says why; the inventory does not fail."
  - "Tags are compared and reported lowercase, as Proxmox VE stores them by default (and as the module
    M(mlfleet.serving.proxmox_vm_pool) compares them); this applies to the O(filters) C(tags) and the keys of
    O(tag_groups) too. On a cluster whose C(tag-style) in C(datacenter.cfg) is case-sensitive, tags that differ
    only in case count as one."
  - "API calls per parse: one C(/cluster/resources), one C(config) call per selected VM (its NIC's MAC and
    cloud-init setting) and one agent call per running VM (plus the ticket login with a password). With a warm
    cache: none."
  - The host name is the VM name. VMs that share a name are all named C(<name>-<vmid>) instead, decided over
    all non-template VMs of the cluster so that a host keeps its name when the O(filters) change.
  - "Host variables: C(proxmox_vmid), C(proxmox_name), C(proxmox_node), C(proxmox_status), C(proxmox_tags) (a
    list), C(proxmox_pool) (null outside a pool), C(proxmox_address_source) (V(agent), the C(ipconfigN) key such
    as V(ipconfig0), or null),
    C(proxmox_unreachable) and C(ansible_host)."
  - "Groups: C(proxmox_tag_<tag>) per tag, C(proxmox_pool_<pool>) per pool and C(proxmox_node_<node>) per node
    (sanitized as group names), the groups of O(tag_groups) (C(swarm_managers) and C(swarm_workers) by default),
    C(proxmox_unreachable), and those of O(compose), O(groups) and O(keyed_groups)."
  - Every string that comes from the API is marked unsafe before it becomes a host variable or name, so text in
    a VM name, tag or agent answer is never templated.
  - Uses a YAML configuration file whose name ends in C(proxmox.yml) or C(proxmox.yaml).
notes:
  - A cache read leaves the cache entry as it is, so O(cache_timeout) counts from the last real read of the API.
    A cache entry written with other O(filters), for another API endpoint or another O(api_user) is not used.
  - "Privileges: C(VM.Audit) on the VMs to list (C(PVEAuditor) on C(/) suffices), C(VM.GuestAgent.Audit)
    (Proxmox VE 9; C(VM.Monitor) before) for the agent calls, and C(Pool.Audit) on a pool for its VMs to carry
    C(proxmox_pool) and join its group. An ACL on C(/pool/<pool>) replaces what C(PVEAuditor) on C(/) gives there, so
    give C(PVEPoolUser) beside C(PVEVMAdmin) on the pool."
extends_documentation_fragment:
  - ansible.builtin.constructed
  - ansible.builtin.inventory_cache
  - mlfleet.serving.proxmox
  - mlfleet.serving.proxmox.inventory
options:
  plugin:
    description: The name of this plugin; makes a configuration file this plugin's.
    type: str
    required: true
    choices: [mlfleet.serving.proxmox]
  filters:
    description:
      - Which VMs become hosts. All given conditions must hold.
      - C(tags) is a list of tags that must all be set on the VM; C(pool) the pool the VM must be in;
        C(status) a list of accepted states (V(running), V(stopped), or V(unknown) for VMs on an offline node);
        C(nodes) a list of nodes the VM must run on.
    type: dict
    default: {}
  tag_groups:
    description:
      - "Extra groups for tagged VMs, as C(tag: group). The playbooks of this collection use the default."
    type: dict
    default:
      swarm_manager: swarm_managers
      swarm_worker: swarm_workers
  address_nic:
    description:
      - The VM network device (V(net0) to V(net31)) whose address becomes C(ansible_host); see the description.
      - Give it the value of the module's C(address_nic) for the VMs it makes.
    type: str
    default: net0
  agent_concurrency:
    description: How many VMs are asked for their C(config) and guest agent answer at once.
    type: int
    default: 16
  agent_timeout:
    description:
      - Seconds to wait for one guest agent answer. A VM whose agent does not answer in time is treated as
        having no agent.
    type: float
    default: 5
"""

EXAMPLES = r"""
# inventories/lab/pve.proxmox.yml: every VM of the lab cluster; swarm_managers and swarm_workers from tags.
plugin: mlfleet.serving.proxmox
api_host: 127.0.0.1
api_user: automation@pve
api_token_id: mlfleet
# The secret comes from the PROXMOX_TOKEN_SECRET environment variable.
ca_path: .lab/pvesim/ca.pem

---
# inventories/prod/serving.proxmox.yml: running members of the mlfleet pool, cached for five minutes.
plugin: mlfleet.serving.proxmox
api_host: pve1.example.com
api_user: automation@pve
api_token_id: mlfleet
filters:
  pool: mlfleet
  status: [running]
  tags: [mlfleet]
agent_concurrency: 32
agent_timeout: 3
cache: true
cache_plugin: ansible.builtin.jsonfile
cache_connection: ~/.cache/ansible-inventory
cache_timeout: 300
compose:
  ansible_user: "'debian'"
keyed_groups:
  - key: proxmox_status
    prefix: status
groups:
  gpu_nodes: "'gpu' in proxmox_tags"
"""

from concurrent.futures import ThreadPoolExecutor

from ansible.errors import AnsibleParserError
from ansible.plugins.inventory import BaseInventoryPlugin, Cacheable, Constructable
from ansible.utils.unsafe_proxy import wrap_var

from ansible_collections.mlfleet.serving.plugins.module_utils._proxmox import CONNECTION_OPTIONS, ProxmoxClient, ProxmoxError
from ansible_collections.mlfleet.serving.plugins.module_utils._proxmox_guest import (
    GuestAddress,
    configured_nic,
    guest_address,
    ipconfig_key,
    split_tags,
)

# Bump when the cached records change shape, so an older cache entry is refetched instead of misread.
# 2: tags lowercase; addresses by the NIC's MAC (the rule of _proxmox_guest).
CACHE_FORMAT = 2
FILTER_KEYS = ("tags", "pool", "status", "nodes")


def host_names(vms):
    """Host name per vmid: the VM name, or `<name>-<vmid>` for every VM whose name another VM shares."""
    counts = {}
    for vm in vms:
        counts[vm["name"]] = counts.get(vm["name"], 0) + 1
    return {vm["vmid"]: vm["name"] if counts[vm["name"]] == 1 else f"{vm['name']}-{vm['vmid']}" for vm in vms}


class InventoryModule(BaseInventoryPlugin, Constructable, Cacheable):
    NAME = "mlfleet.serving.proxmox"

    def __init__(self):
        super().__init__()
        # Calls made by the last parse, by kind; a cache hit leaves every count at zero.
        self.api_calls = {}

    def verify_file(self, path):
        return super().verify_file(path) and path.endswith(("proxmox.yml", "proxmox.yaml"))

    def parse(self, inventory, loader, path, cache=True):
        super().parse(inventory, loader, path, cache)
        self._read_config_data(path)
        connection = {name: self.get_option(name) for name in CONNECTION_OPTIONS}
        self._check_credentials(connection)
        filters = self._filters()
        try:
            ipconfig_key(self.get_option("address_nic"))
        except ValueError as error:
            raise AnsibleParserError(f"{self.NAME}: {error}") from None
        # What the cached records depend on besides the file: another user may see other VMs.
        source = f"{connection['api_user']} at {connection['api_host']}:{connection['api_port']}"
        fingerprint = {"format": CACHE_FORMAT, "source": source, "filters": filters, "address_nic": self.get_option("address_nic")}
        self.api_calls = {"cluster/resources": 0, "agent": 0, "config": 0}

        cache_key = self.get_cache_key(path)
        records = None
        if cache and self.get_option("cache"):
            try:
                cached = self._cache[cache_key]
            except KeyError:
                cached = None
            if isinstance(cached, dict) and cached.get("fingerprint") == fingerprint:
                records = cached["hosts"]
        if records is None:
            try:
                records = self._fetch(connection, filters)
            except ProxmoxError as error:
                raise AnsibleParserError(f"{self.NAME} inventory {path}: {error}") from None
            # Written only after a real read: rewriting what came from the cache would restart its timeout.
            if self.get_option("cache"):
                self._cache[cache_key] = {"fingerprint": fingerprint, "hosts": records}
        self._populate(records)

    # --- options ---------------------------------------------------------------------------------

    def _check_credentials(self, connection):
        if connection["api_password"] and connection["api_token_secret"]:
            raise AnsibleParserError(f"{self.NAME}: set either api_token_secret (with api_token_id) or api_password, not both")
        if not (connection["api_password"] or connection["api_token_secret"]):
            raise AnsibleParserError(
                f"{self.NAME}: no credentials: set api_token_id and api_token_secret (or PROXMOX_TOKEN_ID and PROXMOX_TOKEN_SECRET), or api_password"
            )
        if connection["api_token_secret"] and not connection["api_token_id"]:
            raise AnsibleParserError(f"{self.NAME}: api_token_secret needs api_token_id, the token's name (the part after '!')")

    def _filters(self):
        """The filters, checked and normalized (sorted lists), so that equal filters compare equal."""
        given = self.get_option("filters") or {}
        unknown = sorted(set(given) - set(FILTER_KEYS))
        if unknown:
            raise AnsibleParserError(f"{self.NAME}: unknown filters {', '.join(unknown)}; known: {', '.join(FILTER_KEYS)}")
        filters = {}
        for key in ("tags", "status", "nodes"):
            value = given.get(key)
            if value is None:
                continue
            values = [value] if isinstance(value, str) else value
            if not isinstance(values, list) or not all(isinstance(item, str) for item in values):
                raise AnsibleParserError(f"{self.NAME}: filters.{key} must be a list of strings, got {value!r}")
            # Tags compare as Proxmox stores them, lowercase; see _proxmox_guest.split_tags.
            filters[key] = sorted(split_tags(";".join(values)) if key == "tags" else (str(item) for item in values))
        if given.get("pool") is not None:
            if not isinstance(given["pool"], str):
                raise AnsibleParserError(f"{self.NAME}: filters.pool must be a pool name, got {given['pool']!r}")
            filters["pool"] = str(given["pool"])
        return filters

    @staticmethod
    def _selected(vm, filters):
        return (
            set(filters.get("tags", ())) <= set(vm["tags"])
            and filters.get("pool", vm["pool"]) == vm["pool"]
            and vm["status"] in filters.get("status", (vm["status"],))
            and vm["node"] in filters.get("nodes", (vm["node"],))
        )

    # --- reading the cluster ---------------------------------------------------------------------

    def _fetch(self, connection, filters):
        """The host records of the selected VMs: plain data, as the cache stores it."""
        client = ProxmoxClient.from_params(connection, max_connections=self.get_option("agent_concurrency"))
        resources = client.vm_resources()
        self.api_calls["cluster/resources"] += 1
        vms = [
            {
                "vmid": int(entry["vmid"]),
                "name": str(entry.get("name") or f"vm-{entry['vmid']}"),
                "node": str(entry["node"]),
                "status": str(entry.get("status", "unknown")),
                "tags": split_tags(entry.get("tags")),
                "pool": str(entry["pool"]) if entry.get("pool") else None,
            }
            for entry in resources
            if entry.get("type", "qemu") == "qemu" and not entry.get("template")
        ]
        names = host_names(vms)
        selected = [
            vm | {"host": names[vm["vmid"]], "address": None, "address_source": None, "reason": None if vm["status"] == "running" else f"it is {vm['status']}"}
            for vm in vms
            if self._selected(vm, filters)
        ]

        running = [vm for vm in selected if vm["status"] == "running"]
        agent_client = None
        if running:
            # The agent calls get their own client so that each call waits agent_timeout, not api_timeout.
            agent_timeout = self.get_option("agent_timeout")
            try:
                agent_client = ProxmoxClient.from_params(connection | {"api_timeout": agent_timeout}, max_connections=self.get_option("agent_concurrency"))
            except ProxmoxError as error:
                raise ProxmoxError(f"{error} (this was the client for the guest agent calls, which waits agent_timeout: {agent_timeout} s)") from None
        nic = self.get_option("address_nic")
        for vm, (found, calls) in zip(selected, self._bounded(lambda vm: self._read_address(client, agent_client, vm, nic), selected), strict=True):
            for kind, count in calls.items():
                self.api_calls[kind] += count
            vm.update(address=found.address, address_source=found.source, reason=found.reason)
        return selected

    def _bounded(self, function, vms):
        """`function` over `vms` with at most agent_concurrency calls in flight; results in order."""
        if not vms:
            return []
        workers = max(1, min(self.get_option("agent_concurrency"), len(vms)))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="proxmox-inventory") as pool:
            return list(pool.map(function, vms))

    @staticmethod
    def _read_address(client, agent_client, vm, nic):
        """The VM's address by the rule the module shares (_proxmox_guest): its config names the NIC's MAC and
        cloud-init address, the guest agent of a running VM the interfaces. Returns the GuestAddress, whose reason
        says everything that stood in the way, and the API calls made."""
        calls = {"config": 1, "agent": 0}
        try:
            config = client.get(f"nodes/{vm['node']}/qemu/{vm['vmid']}/config")
        except ProxmoxError as error:
            return GuestAddress(None, None, "; ".join(filter(None, [vm["reason"], f"its config could not be read ({error})"]))), calls
        interfaces, agent_failure = None, None
        if vm["status"] == "running":
            calls["agent"] = 1
            try:
                answer = agent_client.get(f"nodes/{vm['node']}/qemu/{vm['vmid']}/agent/network-get-interfaces")
                interfaces = (answer or {}).get("result") or []
            except ProxmoxError as error:
                # Agent disabled, not running yet, or timed out: the same to an inventory, which falls back.
                agent_failure = f"no guest agent answer ({error})"
        found = guest_address(interfaces, configured_nic(config or {}, nic))
        if found.address is None:
            found = found._replace(reason="; ".join(filter(None, [vm["reason"], agent_failure, found.reason])))
        return found, calls

    # --- building the inventory ------------------------------------------------------------------

    def _populate(self, records):
        strict = self.get_option("strict")
        tag_groups = {tag: group for name, group in (self.get_option("tag_groups") or {}).items() for tag in split_tags(name)}
        for record in records:
            host = self.inventory.add_host(wrap_var(record["host"]))
            unreachable = record["address"] is None
            variables = {
                "proxmox_vmid": int(record["vmid"]),
                "proxmox_name": wrap_var(record["name"]),
                "proxmox_node": wrap_var(record["node"]),
                "proxmox_status": wrap_var(record["status"]),
                "proxmox_tags": wrap_var(list(record["tags"])),
                "proxmox_pool": wrap_var(record["pool"]),
                "proxmox_address_source": wrap_var(record["address_source"]),
                "proxmox_unreachable": unreachable,
            }
            if not unreachable:
                variables["ansible_host"] = wrap_var(record["address"])
            for name, value in variables.items():
                self.inventory.set_variable(host, name, value)

            groups = [f"proxmox_tag_{tag}" for tag in record["tags"]]
            groups += [tag_groups[tag] for tag in record["tags"] if tag in tag_groups]
            groups.append(f"proxmox_node_{record['node']}")
            if record["pool"]:
                groups.append(f"proxmox_pool_{record['pool']}")
            if unreachable:
                groups.append("proxmox_unreachable")
                self.display.warning(
                    f"{self.NAME}: VM {record['vmid']} ({record['name']}) on {record['node']} has no address: "
                    f"{record['reason']}; it is in the inventory as {host} without ansible_host and with proxmox_unreachable=true"
                )
            for group in groups:
                self.inventory.add_child(self.inventory.add_group(wrap_var(self._sanitize_group_name(group))), host)

            self._set_composite_vars(self.get_option("compose"), variables, host, strict=strict)
            self._add_host_to_composed_groups(self.get_option("groups"), variables, host, strict=strict)
            self._add_host_to_keyed_groups(self.get_option("keyed_groups"), variables, host, strict=strict)
