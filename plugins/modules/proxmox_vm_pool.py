#!/usr/bin/python
# Copyright (c) mlfleet.serving maintainers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: proxmox_vm_pool
short_description: Keep a pool of identical Proxmox VE VMs cloned from one template
version_added: 0.1.0
description:
  - Declares a pool of identical QEMU VMs on a Proxmox VE cluster and converges the cluster to it.
  - Pool members are the VMs (not templates) that carry the tag O(pool_tag), and are in the Proxmox pool O(pool)
    when that is given. Names are never used to find members; Proxmox allows repeated names.
  - Missing members are cloned from O(template) in parallel (at most O(parallel) at once), configured (CPU,
    memory, cloud-init, tags), started and waited for until the guest agent reports their address.
  - "A member's address is the one on its network device O(address_nic), by the rule the inventory plugin
    P(mlfleet.serving.proxmox#inventory) follows too: an address the guest agent reports on the guest interface with
    that device's MAC (IPv4 before IPv6, and only IPv4 when the device's cloud-init C(ipconfigN) sets C(ip=);
    never loopback, link-local or a container bridge such as C(docker0) or C(br-*)), else the static address of its
    C(ipconfigN). The module waits for the first; the static one is the C(address) of each RV(created) entry."
  - Surplus members are shut down gracefully, stopped if that fails, and destroyed with their disks.
  - Members that exist but are stopped are started, and members without an address are waited for, so a
    re-run after a failure converges the pool.
  - The module reads the cluster's VMs with one C(GET /cluster/resources?type=vm) call.
author:
  - mlfleet.serving maintainers (@mlfleet)
extends_documentation_fragment:
  - mlfleet.serving.attributes
  - mlfleet.serving.proxmox
  - mlfleet.serving.scale_lease
attributes:
  check_mode:
    support: full
    details:
      - Reports the VMs it would create (vmid, name, node, address) and remove, and sends no write.
      - The vmids of planned VMs are the ones free at the time of the check; a real run allocates them again.
  diff_mode:
    support: full
    details:
      - The diff shows the member count and the member vmids before and after.
  idempotent:
    support: full
    details:
      - A re-run on a converged pool sends no POST, PUT or DELETE request.
      - Only new members are configured. The module does not compare the configuration of existing members
        with O(cores), O(memory) or the cloud-init options.
options:
  pool_tag:
    description:
      - The Proxmox tag that marks the pool's members, for example V(swarm-worker).
      - Compared and written lowercase, as Proxmox VE stores tags by default. On a cluster whose C(tag-style) in
        C(datacenter.cfg) is case-sensitive, tags that differ only in case count as one.
    type: str
    required: true
  pool:
    description:
      - Proxmox resource pool the members belong to. New members are cloned into it.
      - When given, only VMs in this pool count as members.
    type: str
  state:
    description:
      - V(present) makes the pool have O(count) members.
      - V(absent) destroys every member except the O(protected) ones.
    type: str
    choices: [present, absent]
    default: present
  count:
    description:
      - Number of members wanted. Required with O(state=present).
      - O(protected) members count as members.
    type: int
  template:
    description:
      - Template to clone new members from. All digits is a vmid, anything else a template name, which must be unique.
      - Required with O(state=present).
    type: str
  full:
    description:
      - Make full clones. V(false) makes linked clones, which share the template's disks.
    type: bool
    default: true
  storage:
    description:
      - Storage for the new members' disks. Full clones only; by default they go where the template's disks are.
      - Clones to another node than the template's need shared storage.
    type: str
  name_prefix:
    description:
      - New members are named C(<name_prefix>-<vmid>). Defaults to O(pool_tag), with each character a DNS name cannot
        hold (such as C(_)) replaced by C(-).
    type: str
  nodes:
    description:
      - Nodes new members may be placed on. Default is every online node.
      - Each new member goes to the allowed node with the most free memory, counting the members placed
        before it in the same run, so a pool spreads evenly.
    type: list
    elements: str
  cores:
    description:
      - CPU cores of new members. Default is the template's.
    type: int
  cpulimit:
    description:
      - CPU time new members may use, in CPUs (Proxmox's C(cpulimit)); for example V(0.5) is half of one host CPU, however
        many O(cores) the guest sees. V(0) means no limit. Default is the template's.
    type: float
  memory:
    description:
      - Memory of new members in MiB. Default is the template's.
    type: int
  ciuser:
    description:
      - Cloud-init user of new members.
    type: str
  sshkeys:
    description:
      - SSH public keys cloud-init installs for O(ciuser) on new members.
    type: list
    elements: str
  address_nic:
    description:
      - The network device (V(net0) to V(net31)) that carries a member's address. The template must have it.
      - O(ip_range) sets its cloud-init C(ipconfigN) (C(ipconfig1) for V(net1)), and the address waited for is the
        one on the guest interface with its MAC.
      - Give the inventory plugin's C(address_nic) the same value, so that both name the same address.
    type: str
    default: net0
  ip_range:
    description:
      - Static IPv4 addresses for new members (the C(ipconfigN) of O(address_nic)), taken lowest first from
        O(ip_range.start) to O(ip_range.end), skipping the static addresses of existing members.
      - Without it new members use DHCP (C(ip=dhcp)).
      - When the range has too few free addresses the module fails before it changes anything.
    type: dict
    suboptions:
      start:
        description: First address of the range.
        type: str
        required: true
      end:
        description: Last address of the range.
        type: str
        required: true
      prefix:
        description: Prefix length of the network, for example V(24).
        type: int
        required: true
      gateway:
        description: Default gateway.
        type: str
  nameserver:
    description:
      - DNS server cloud-init configures on new members.
    type: str
  extra_tags:
    description:
      - Tags new members carry besides O(pool_tag), for example to group them in an inventory.
    type: list
    elements: str
    default: []
  take_from_tag:
    description:
      - A warm pool to take missing members from before cloning - the VMs (not templates) that carry this tag, in
        O(pool) when that is given.
      - A VM is taken by one write of its tags, with this tag replaced by O(pool_tag) and its other tags kept, so it
        leaves the warm pool and joins this one in the same step, and a re-run counts it where it is. Running VMs are
        taken before stopped ones, lower vmids first; a stopped one is started (O(start)) and waited for like a new
        member. Only the members they do not cover are cloned.
      - A taken VM keeps its cores, memory, cloud-init settings and address; its static address counts as used for
        the O(ip_range) of new members.
    type: str
  take_vmids:
    description:
      - Take only these VMs of O(take_from_tag), no others - such as the drained workers a scale-in returns to its
        warm pool while that pool is short. Members the listed VMs do not cover are cloned.
      - A listed VM that is a member already counts as one, so a re-run converges; one that exists but carries
        neither O(pool_tag) nor O(take_from_tag) is an error naming it.
      - Needs O(take_from_tag).
    type: list
    elements: int
  pci_mapping:
    description:
      - Pass PCI devices (GPUs) through to each new member from a cluster resource mapping
        (Datacenter, Resource Mappings; C(/cluster/mapping/pci)), as C(hostpci0) to C(hostpciN) set to
        C(mapping=<name>[,pcie=1]). The way Proxmox VE 8 and later recommends for clusters, as a mapping names the
        devices of every node, so a VM is not bound to one node's PCI address.
      - A new member goes only to a node where the mapping has O(pci_mapping.count) devices free. Free means not taken
        by a member of the pool (a stopped one too, as it takes its devices when it starts) nor by another running VM
        the API user can see. When no allowed node has room, the module fails before any write and names each node's
        free and mapped devices.
      - Proxmox chooses the device itself when the VM starts, and a start without a free device fails with its own
        message (V(could not find a free device for 'hostpci0')), for example when a VM the API user cannot see holds
        one.
      - Members that exist keep their devices; the option is applied to new members only.
    type: dict
    suboptions:
      name:
        description: The mapping's ID.
        type: str
        required: true
      count:
        description: Devices each new member gets (1 to 16).
        type: int
        default: 1
      pcie:
        description:
          - Attach the devices on the PCI Express bus (C(pcie=1)), as GPUs want. Needs the template's machine type to
            be q35; the module checks this before any write.
        type: bool
        default: true
  address_peer_tags:
    description:
      - Tags of other VMs that take their static addresses from the same O(ip_range), such as the warm pool that
        fills this pool, or the pool a warm pool fills. Their addresses count as used, so no two VMs get the same one.
      - The VMs of O(take_from_tag) always count.
    type: list
    elements: str
    default: []
  shut_down:
    description:
      - Shut down every member that runs, gracefully (stopped after O(shutdown_timeout)), once the rest of the run is
        done - a warm pool kept stopped, which holds disk and no memory. New members are cloned and configured, not
        started.
      - Needs O(start=false); excludes O(take_from_tag).
    type: bool
    default: false
  start:
    description:
      - Start new members, taken members (O(take_from_tag)) and members that are stopped (see O(start_existing)).
    type: bool
    default: true
  start_existing:
    description:
      - With O(start), start members that exist and are stopped too. V(false) starts only the members this run makes,
        so a warm pool kept stopped (O(shut_down)) starts its new members to be configured and leaves the others off.
    type: bool
    default: true
  wait_for_ip:
    description:
      - Wait until the guest agent of each running member reports its address (see O(address_nic)), for at most
        O(ip_timeout) seconds.
      - The template needs the QEMU guest agent installed and enabled (C(agent=1)).
    type: bool
    default: true
  ip_timeout:
    description:
      - Seconds to wait for a member's address after its start.
    type: int
    default: 300
  parallel:
    description:
      - How many VMs are cloned, configured, started or removed at the same time.
      - Proxmox lets only a few clones of one template run at once; the others wait for its lock and fail
        after a while. The module retries those with backoff, so a high value costs retries, not failures.
    type: int
    default: 4
  clone_timeout:
    description:
      - Seconds one clone may take. Full clones on slow storage take minutes.
    type: int
    default: 600
  clone_retries:
    description:
      - How often a clone is retried after a lock timeout of the template or after its vmid was taken by
        someone else. Lock retries wait with exponential backoff.
    type: int
    default: 5
  task_timeout:
    description:
      - Seconds a start, stop or destroy task may take.
    type: int
    default: 120
  shutdown_timeout:
    description:
      - Seconds a member that is removed gets to shut down cleanly before it is stopped hard.
    type: int
    default: 60
  poll_interval:
    description:
      - Seconds between two polls of a Proxmox task or of the guest agent.
    type: float
    default: 1.0
  scale_in_policy:
    description:
      - Which members go when the pool shrinks. V(newest) removes the highest vmids first, V(oldest) the lowest.
    type: str
    choices: [newest, oldest]
    default: newest
  remove_vmids:
    description:
      - Members to remove first when the pool shrinks, for example the nodes a scale-in playbook drained.
      - Each must be a member; vmids that no longer exist are ignored, so a re-run does not fail.
      - They may not be more than the members O(count) removes, nor be O(protected).
    type: list
    elements: int
  protected:
    description:
      - Members that are never stopped nor destroyed, also with O(state=absent). They count as members.
    type: list
    elements: int
    default: []
notes:
  - >-
    Proxmox privileges needed by the API user or token (a privilege-separated token needs its own ACLs):
    C(VM.Audit) to read the VMs and their config; C(Sys.Audit) on C(/nodes) to read free memory for placement;
    C(VM.Clone) on the template (C(/vms/<template>)); C(VM.Allocate) on C(/vms/<new vmid>) or on the pool
    C(/pool/<pool>) (set O(pool) to use a pool ACL); C(Datastore.AllocateSpace) on the storage the clones
    write to; C(VM.Config.CPU), C(VM.Config.Memory), C(VM.Config.Cloudinit) and C(VM.Config.Options) (tags, name)
    on the new VMs; C(VM.PowerMgmt) to start, shut down and stop; C(VM.GuestAgent.Audit) (or
    C(VM.GuestAgent.Unrestricted)) for the guest agent's addresses; C(VM.Allocate) on the members to destroy them;
    with O(pool), C(Pool.Audit) on C(/pool/<pool>), without which Proxmox hides the VMs' pool and the module finds no
    members.
  - >-
    With O(pci_mapping), also C(Mapping.Use) on C(/mapping/pci/<name>) (to set C(hostpciN) to the mapping and to read
    it; the role C(PVEMappingUser) has it) and C(VM.Config.HWType) on the new VMs (in C(PVEVMAdmin)). Proxmox lets only
    C(root@pam) itself, not its API tokens, pass a raw host PCI address; a mapping needs no such rights.
  - The roles C(PVEVMAdmin) and C(PVEPoolUser) on C(/pool/<pool>), C(PVETemplateUser) on the template,
    C(PVEDatastoreUser) on C(/storage) and C(PVEAuditor) on C(/) cover these. An ACL on C(/pool/<pool>) replaces what
    C(PVEAuditor) on C(/) gives there, hence C(PVEPoolUser) for C(Pool.Audit).
  - When a clone fails Proxmox removes the half-made VM, so it never carries the pool tag. When a later step
    fails the VM keeps the tag, and the next run configures, starts and waits for it.
seealso:
  - name: Proxmox VE API viewer
    description: The API calls this module makes.
    link: https://pve.proxmox.com/pve-docs/api-viewer/
"""

EXAMPLES = r"""
- name: Keep five workers cloned from the golden template, with static addresses
  mlfleet.serving.proxmox_vm_pool:
    api_host: pve1.example.com
    api_user: automation@pve
    api_token_id: mlfleet
    api_token_secret: "{{ vault_proxmox_token_secret }}"
    pool_tag: swarm-worker
    pool: mlfleet
    count: 5
    template: debian12-golden
    storage: slow-nfs
    cores: 4
    memory: 8192
    ciuser: debian
    sshkeys:
      - "{{ lookup('ansible.builtin.file', 'files/deploy.pub') }}"
    ip_range:
      start: 192.168.213.50
      end: 192.168.213.99
      prefix: 24
      gateway: 192.168.213.1
    nameserver: 192.168.213.1
    extra_tags: [mlfleet]
  register: workers

- name: Show where the workers run
  ansible.builtin.debug:
    msg: "{{ workers.members | map(attribute='ip') | list }}"

- name: Set the connection once for every Proxmox module of the collection
  module_defaults:
    group/mlfleet.serving.proxmox:
      api_host: pve1.example.com
      api_user: automation@pve
      api_token_id: mlfleet
      api_token_secret: "{{ vault_proxmox_token_secret }}"
  block:
    - name: One manager, linked clone, on pve1 or pve2, DHCP
      mlfleet.serving.proxmox_vm_pool:
        pool_tag: swarm-manager
        pool: mlfleet
        count: 1
        template: "9000"
        full: false
        nodes: [pve1, pve2]

    - name: Scale the workers in, removing the nodes the drain playbook emptied, never the first worker
      mlfleet.serving.proxmox_vm_pool:
        pool_tag: swarm-worker
        pool: mlfleet
        count: 3
        template: debian12-golden
        remove_vmids: [107, 108]
        protected: [101]

    - name: Return a drained worker to the warm pool that is short of one, rather than destroy it
      mlfleet.serving.proxmox_vm_pool:
        pool_tag: swarm-worker-warm
        pool: mlfleet
        count: 2
        template: debian12-golden
        take_from_tag: swarm-worker
        take_vmids: [108]

    - name: Keep two GPU workers, each with one GPU of the cluster mapping nvidia_gpu
      mlfleet.serving.proxmox_vm_pool:
        pool_tag: swarm_gpu_worker
        pool: mlfleet
        count: 2
        template: debian13-gpu-golden
        pci_mapping:
          name: nvidia_gpu
          count: 1

    - name: Remove the whole test pool
      mlfleet.serving.proxmox_vm_pool:
        pool_tag: loadtest
        state: absent
"""

RETURN = r"""
members:
  description: The pool's members after the run (in check mode, before it), sorted by vmid.
  returned: always
  type: list
  elements: dict
  contains:
    vmid:
      description: VM id.
      type: int
      sample: 101
    name:
      description: VM name.
      type: str
      sample: swarm-worker-101
    node:
      description: Node the VM is on.
      type: str
      sample: pve2
    ip:
      description:
        - The address the guest agent reports on the member's O(address_nic), chosen by the rule in the description;
          null while the agent reports none there (then the inventory plugin names the static C(ipconfigN) address,
          if there is one).
      type: str
      sample: 192.168.213.50
    status:
      description: Power state, as Proxmox reports it.
      type: str
      sample: running
    tags:
      description: The VM's tags, lowercase.
      type: list
      elements: str
      sample: [swarm-worker, mlfleet]
created:
  description: VMs created, or in check mode planned, with their placement and address.
  returned: always
  type: list
  elements: dict
  sample:
    - {vmid: 104, name: swarm-worker-104, node: pve3, address: 192.168.213.53, ip: 192.168.213.53,
       reason: "pve3: most free memory (58.0 GiB of 64.0 GiB)"}
taken:
  description:
    - VMs taken from the warm pool O(take_from_tag) to be members, or in check mode to be taken, with their address.
    - C(was) is the power state they had in the warm pool.
  returned: always
  type: list
  elements: dict
  sample:
    - {vmid: 106, name: swarm-worker-106, node: pve1, address: 192.168.213.55, ip: 192.168.213.55, was: running}
removed:
  description: Vmids of the members destroyed, or in check mode to be destroyed.
  returned: always
  type: list
  elements: int
  sample: [105, 104]
placement:
  description: Where each new VM goes and why.
  returned: always
  type: list
  elements: dict
  sample:
    - {vmid: 104, name: swarm-worker-104, node: pve3, reason: "pve3: most free memory (58.0 GiB of 64.0 GiB)"}
progress:
  description: What happened to each VM, in order, with seconds since the module started.
  returned: always
  type: list
  elements: dict
  sample:
    - {vmid: 104, node: pve3, stage: cloned, elapsed: 5.2}
    - {vmid: 104, node: pve3, stage: address 192.168.213.53, elapsed: 12.4}
diff:
  description: Member count and vmids before and after.
  returned: always
  type: dict
  sample: {before: {count: 3, members: [101, 102, 103]}, after: {count: 5, members: [101, 102, 103, 104, 105]}}
"""

import re
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.mlfleet.serving.plugins.module_utils._lease import fence_argument_spec, fence_module
from ansible_collections.mlfleet.serving.plugins.module_utils._proxmox import (
    PROXMOX_MUTUALLY_EXCLUSIVE,
    PROXMOX_REQUIRED_ONE_OF,
    PROXMOX_REQUIRED_TOGETHER,
    ProxmoxClient,
    ProxmoxError,
    ProxmoxTaskError,
    proxmox_argument_spec,
)
from ansible_collections.mlfleet.serving.plugins.module_utils._proxmox_guest import (
    DEFAULT_NIC,
    agent_address,
    configured_nic,
    ipconfig_key,
    join_tags,
    split_tags,
)
from ansible_collections.mlfleet.serving.plugins.module_utils._proxmox_pool import (
    ALREADY_EXISTS,
    LOCK_TIMEOUT,
    IdAllocator,
    PoolError,
    choose_victims,
    device_slots,
    disk_storages,
    find_template,
    is_member,
    mapped_device_count,
    mapping_devices_per_node,
    pick_addresses,
    plan_placement,
    static_ipconfig,
)

MIB = 1024**2
MAX_BACKOFF = 30.0
MAX_HOSTPCI = 16  # qemu-server's $MAX_HOSTPCI_DEVICES


def argument_spec():
    spec = proxmox_argument_spec()
    spec.update(fence_argument_spec())
    spec.update(
        pool_tag=dict(type="str", required=True),
        pool=dict(type="str"),
        state=dict(type="str", choices=["present", "absent"], default="present"),
        count=dict(type="int"),
        template=dict(type="str"),
        full=dict(type="bool", default=True),
        storage=dict(type="str"),
        name_prefix=dict(type="str"),
        nodes=dict(type="list", elements="str"),
        cores=dict(type="int"),
        cpulimit=dict(type="float"),
        memory=dict(type="int"),
        ciuser=dict(type="str"),
        sshkeys=dict(type="list", elements="str", no_log=False),
        ip_range=dict(
            type="dict",
            options=dict(
                start=dict(type="str", required=True), end=dict(type="str", required=True), prefix=dict(type="int", required=True), gateway=dict(type="str")
            ),
        ),
        nameserver=dict(type="str"),
        address_nic=dict(type="str", default=DEFAULT_NIC),
        extra_tags=dict(type="list", elements="str", default=[]),
        take_from_tag=dict(type="str"),
        take_vmids=dict(type="list", elements="int"),
        pci_mapping=dict(
            type="dict",
            options=dict(name=dict(type="str", required=True), count=dict(type="int", default=1), pcie=dict(type="bool", default=True)),
        ),
        shut_down=dict(type="bool", default=False),
        start_existing=dict(type="bool", default=True),
        address_peer_tags=dict(type="list", elements="str", default=[]),
        start=dict(type="bool", default=True),
        wait_for_ip=dict(type="bool", default=True),
        ip_timeout=dict(type="int", default=300),
        parallel=dict(type="int", default=4),
        clone_timeout=dict(type="int", default=600),
        clone_retries=dict(type="int", default=5),
        task_timeout=dict(type="int", default=120),
        shutdown_timeout=dict(type="int", default=60),
        poll_interval=dict(type="float", default=1.0),
        scale_in_policy=dict(type="str", choices=["newest", "oldest"], default="newest"),
        remove_vmids=dict(type="list", elements="int"),
        protected=dict(type="list", elements="int", default=[]),
    )
    return spec


def check_arguments(params):
    """Argument combinations Ansible's argspec cannot express; fail before the first API call."""
    if params["storage"] and not params["full"]:
        raise PoolError(
            f"storage {params['storage']} applies to full clones only, a linked clone stays on the template's storage: drop storage or set full: true"
        )
    for name in ("parallel", "clone_timeout", "task_timeout", "shutdown_timeout", "ip_timeout"):
        if params[name] < 1:
            raise PoolError(f"{name} must be at least 1, not {params[name]}")
    if params["count"] is not None and params["count"] < 0:
        raise PoolError(f"count must be 0 or more, not {params['count']}")
    if params["cpulimit"] is not None and not 0 <= params["cpulimit"] <= 128:
        raise PoolError(f"cpulimit must be from 0 (no limit) to 128 CPUs, as Proxmox accepts, not {params['cpulimit']:g}")
    try:
        ipconfig_key(params["address_nic"])
    except ValueError as error:
        raise PoolError(str(error)) from None
    if params["clone_retries"] < 0 or params["poll_interval"] <= 0:
        raise PoolError("clone_retries must be 0 or more and poll_interval more than 0")
    if params["shut_down"] and (params["start"] or params["take_from_tag"]):
        raise PoolError("shut_down keeps the members shut down: set start: false with it, and drop take_from_tag")
    if params["pci_mapping"] and not 1 <= params["pci_mapping"]["count"] <= MAX_HOSTPCI:
        raise PoolError(f"pci_mapping.count must be from 1 to {MAX_HOSTPCI} (hostpci0 to hostpci15), not {params['pci_mapping']['count']}")
    if params["take_vmids"] is not None and not params["take_from_tag"]:
        raise PoolError("take_vmids names VMs of the warm pool to take: set take_from_tag to that pool's tag, or drop take_vmids")
    if params["take_from_tag"] is not None and params["take_from_tag"].lower() == params["pool_tag"].lower():
        raise PoolError(f"take_from_tag {params['take_from_tag']} is the pool's own tag: name the warm pool's tag, or drop take_from_tag")
    if params["state"] == "present" and (params["count"] is None or not params["template"]):
        raise PoolError("state present needs count (the pool size) and template (what new members are cloned from): set both, or state: absent")


class PoolRun:
    """One run of the module against one cluster: read, plan, then (outside check mode) act in parallel."""

    def __init__(self, module, client):
        self.module = module
        self.client = client
        self.params = module.params
        self.started = time.monotonic()
        self.progress = []
        self._progress_lock = threading.Lock()
        self.allocator = None

    def note(self, vmid, node, stage):
        with self._progress_lock:
            self.progress.append({"vmid": vmid, "node": node, "stage": stage, "elapsed": round(time.monotonic() - self.started, 2)})

    # --- reading ---------------------------------------------------------------------------------

    def member_details(self, member):
        """The member as returned, plus what its config says about its address (the NIC's MAC and cloud-init)."""
        config = self.client.get(f"nodes/{member['node']}/qemu/{member['vmid']}/config")
        nic = configured_nic(config, self.params["address_nic"])
        mapping = self.params["pci_mapping"]
        return {
            "pci_devices": mapped_device_count(config, mapping["name"]) if mapping else 0,
            "vmid": int(member["vmid"]),
            "name": member.get("name"),
            "node": member["node"],
            "ip": None,
            "status": member.get("status"),
            "tags": split_tags(member.get("tags")),
            "nic": nic,
            "address": nic.static_address,
        }

    def guest_ip(self, vm, wait):
        """The member's address as the guest agent reports it (the first step of the shared rule); with ``wait``, poll
        until ``ip_timeout`` has passed. The static ipconfig address does not count here: it is what the guest was
        told, not that it is up."""
        deadline = time.monotonic() + self.params["ip_timeout"]
        last = None
        while True:
            try:
                answer = self.client.get(f"nodes/{vm['node']}/qemu/{vm['vmid']}/agent/network-get-interfaces")
                address, last = agent_address((answer or {}).get("result") or [], vm["nic"])
                if address:
                    return address
            except ProxmoxError as error:
                last = str(error)
            if not wait:
                return None
            if time.monotonic() >= deadline:
                raise PoolError(
                    f"VM {vm['vmid']} ({vm['name']}) on {vm['node']} reported no address on {vm['nic'].name} within ip_timeout "
                    f"{self.params['ip_timeout']}s (last answer: {last}): check that the template runs qemu-guest-agent and has agent "
                    f"enabled, that address_nic names the NIC the guest gets its address on, or raise ip_timeout"
                )
            time.sleep(self.params["poll_interval"])

    # --- acting ----------------------------------------------------------------------------------

    def wait(self, upid, timeout, what):
        self.client.wait_task(upid, timeout=timeout, poll_interval=self.params["poll_interval"], what=what)

    def start_vm(self, vm):
        what = f"start of VM {vm['vmid']} ({vm['name']})"
        self.wait(self.client.post(f"nodes/{vm['node']}/qemu/{vm['vmid']}/status/start"), self.params["task_timeout"], what)
        vm["status"] = "running"
        self.note(vm["vmid"], vm["node"], "started")

    def settle(self, vm, existing=False):
        """Bring a member to the wanted power state and address; used for new and existing members alike (an
        ``existing`` one is started only with start_existing too)."""
        start = self.params["start"] and (self.params["start_existing"] or not existing)
        if start and vm["status"] == "stopped":
            self.start_vm(vm)
        if vm["status"] == "running":
            vm["ip"] = self.guest_ip(vm, wait=self.params["wait_for_ip"])
            if vm["ip"] and self.params["wait_for_ip"]:
                self.note(vm["vmid"], vm["node"], f"address {vm['ip']}")
        return vm

    def clone(self, template, plan, allocator):
        """Clone one member, retrying with a new vmid when the id was taken and with backoff when the template's
        lock timed out; returns the vmid it got."""
        params = self.params
        vmid, node = plan["vmid"], plan["node"]
        attempt = 0
        while True:
            name = f"{plan['prefix']}-{vmid}"
            request = {"newid": vmid, "name": name, "full": int(params["full"])}
            if node != template["node"]:
                request["target"] = node
            if params["storage"]:
                request["storage"] = params["storage"]
            if params["pool"]:
                request["pool"] = params["pool"]
            try:
                upid = self.client.post(f"nodes/{template['node']}/qemu/{template['vmid']}/clone", **request)
                self.note(vmid, node, "cloning")
                self.wait(upid, params["clone_timeout"], f"clone of template {template['vmid']} to VM {vmid} ({name}, target node {node})")
                self.note(vmid, node, "cloned")
                return vmid, name
            except ProxmoxError as error:
                text = str(error)
                retryable = ALREADY_EXISTS.search(text) or LOCK_TIMEOUT.search(text)
                if not retryable or attempt == params["clone_retries"]:
                    tail = f" (after {attempt + 1} attempts: raise clone_retries or lower parallel)" if retryable else ""
                    if not isinstance(error, ProxmoxTaskError):
                        text = f"cloning template {template['vmid']} to VM {vmid} ({name}) on {node} failed: {text}"
                    raise PoolError(f"{text}{tail}") from None
                if ALREADY_EXISTS.search(text):
                    self.note(vmid, node, "vmid taken, allocating another")
                    vmid = allocator.allocate()
                else:
                    self.note(vmid, node, f"template locked, retry {attempt + 1}")
                    time.sleep(min(MAX_BACKOFF, params["poll_interval"] * 2**attempt))
                attempt += 1

    def new_config(self, name, address):
        params = self.params
        config = {"name": name, "tags": join_tags([params["pool_tag"], *params["extra_tags"]])}
        if params["cores"] is not None:
            config["cores"] = params["cores"]
        if params["cpulimit"] is not None:
            config["cpulimit"] = params["cpulimit"]
        if params["memory"] is not None:
            config["memory"] = str(params["memory"])
        if params["ciuser"] is not None:
            config["ciuser"] = params["ciuser"]
        if params["sshkeys"]:
            # Proxmox wants the keys URL-encoded inside the form-encoded body.
            config["sshkeys"] = urllib.parse.quote("\n".join(key.strip() for key in params["sshkeys"]), safe="")
        if params["nameserver"] is not None:
            config["nameserver"] = params["nameserver"]
        mapping = params["pci_mapping"]
        for index in range(mapping["count"] if mapping else 0):
            config[f"hostpci{index}"] = f"mapping={mapping['name']}" + (",pcie=1" if mapping["pcie"] else "")
        ip_range = params["ip_range"]
        config[ipconfig_key(params["address_nic"])] = static_ipconfig(address, ip_range["prefix"], ip_range.get("gateway")) if address else "ip=dhcp"
        return config

    def create(self, template, plan, allocator):
        vmid, name = self.clone(template, plan, allocator)
        node = plan["node"]
        try:
            # Tags and all settings in one write: a VM without the tag would be an orphan no run finds again.
            self.client.put(f"nodes/{node}/qemu/{vmid}/config", **self.new_config(name, plan["address"]))
        except ProxmoxError as error:
            self.discard(vmid, node)
            raise PoolError(f"configuring VM {vmid} ({name}) on {node} failed, the clone was destroyed again: {error}") from None
        self.note(vmid, node, "configured")
        resource = {"vmid": vmid, "name": name, "node": node, "status": "stopped", "tags": join_tags([self.params["pool_tag"], *self.params["extra_tags"]])}
        vm = dict(self.member_details(resource), reason=plan["reason"])
        plan.update(vmid=vmid, name=name)
        try:
            return self.settle(vm)
        except ProxmoxError as error:
            raise PoolError(f"VM {vmid} ({name}) on {node} was created and tagged, but: {error}. A re-run starts and waits for it") from None

    def take(self, vm):
        """Make a warm VM a member: its tags with take_from_tag replaced by pool_tag, in one write; then settle it."""
        tags = [tag for tag in vm["tags"] if tag != self.params["take_from_tag"].lower()] + [self.params["pool_tag"]]
        self.client.put(f"nodes/{vm['node']}/qemu/{vm['vmid']}/config", tags=join_tags(tags))
        vm["tags"] = split_tags(join_tags(tags))
        self.note(vm["vmid"], vm["node"], f"taken from {self.params['take_from_tag'].lower()}")
        try:
            return self.settle(vm)
        except ProxmoxError as error:
            raise PoolError(f"VM {vm['vmid']} ({vm['name']}) on {vm['node']} was taken into the pool, but: {error}. A re-run starts and waits for it") from None

    def discard(self, vmid, node):
        try:
            upid = self.client.delete(f"nodes/{node}/qemu/{vmid}", purge=1, **{"destroy-unreferenced-disks": 1})
            self.wait(upid, self.params["task_timeout"], f"destroy of untagged clone {vmid}")
        except ProxmoxError as error:
            self.module.warn(f"VM {vmid} on {node} is an untagged clone left over from a failed run; destroy it by hand: {error}")

    def shut_down(self, vm):
        """Shut a running VM down gracefully, or stop it when that fails within shutdown_timeout."""
        vmid, node, name = int(vm["vmid"]), vm["node"], vm.get("name")
        path = f"nodes/{node}/qemu/{vmid}"
        try:
            upid = self.client.post(f"{path}/status/shutdown", timeout=self.params["shutdown_timeout"], forceStop=0)
            self.wait(upid, self.params["shutdown_timeout"] + self.params["task_timeout"], f"shutdown of VM {vmid} ({name})")
            self.note(vmid, node, "shut down")
        except ProxmoxError as error:
            self.note(vmid, node, f"shutdown failed ({error}), stopping")
            self.wait(self.client.post(f"{path}/status/stop"), self.params["task_timeout"], f"stop of VM {vmid} ({name})")
            self.note(vmid, node, "stopped")
        vm["status"], vm["ip"] = "stopped", None
        return vm

    def remove(self, vm):
        vmid, node, name = int(vm["vmid"]), vm["node"], vm.get("name")
        path = f"nodes/{node}/qemu/{vmid}"
        if vm["status"] == "running":
            self.shut_down(vm)
        upid = self.client.delete(path, purge=1, **{"destroy-unreferenced-disks": 1})
        self.wait(upid, self.params["task_timeout"], f"destroy of VM {vmid} ({name})")
        self.note(vmid, node, "destroyed")
        return vmid

    def in_parallel(self, jobs):
        """Run ``(function, args)`` jobs at most ``parallel`` at once; return the results and raise one
        PoolError naming every failed job after all have finished."""
        if not jobs:
            return []
        with ThreadPoolExecutor(max_workers=self.params["parallel"]) as executor:
            futures = [executor.submit(function, *args) for function, args in jobs]
        results, errors = [], []
        for future in futures:
            try:
                results.append(future.result())
            except ProxmoxError as error:
                errors.append(str(error))
        if errors:
            raise PoolError("; ".join(errors))
        return results

    # --- the run ---------------------------------------------------------------------------------

    def run(self):
        params = self.params
        resources = self.client.vm_resources()
        found = sorted((entry for entry in resources if is_member(entry, params["pool_tag"], params["pool"])), key=lambda entry: int(entry["vmid"]))
        member_ids = [int(entry["vmid"]) for entry in found]
        existing = {int(entry["vmid"]): entry for entry in resources}
        self.check_vmid_lists(member_ids, existing)

        if params["state"] == "absent":
            victims = [vmid for vmid in member_ids if vmid not in params["protected"]]
            template, plans = None, []
        else:
            template = find_template(resources, params["template"])
            remove = [vmid for vmid in params["remove_vmids"] or [] if vmid in member_ids]
            victims = choose_victims(found, params["count"], params["scale_in_policy"], remove, params["protected"])
            kept_count = len(member_ids) - len(victims)
            if kept_count > params["count"]:
                self.module.warn(f"count {params['count']} is below the {kept_count} protected members of pool tag {params['pool_tag']}; they are kept")
            plans = []
        kept = self.in_parallel([(self.member_details, (entry,)) for entry in found if int(entry["vmid"]) not in victims])
        taken = []
        if template is not None and params["take_from_tag"]:
            warm = [entry for entry in resources if is_member(entry, params["take_from_tag"], params["pool"]) and int(entry["vmid"]) not in member_ids]
            if params["take_vmids"] is not None:
                warm = [entry for entry in warm if int(entry["vmid"]) in params["take_vmids"]]
            # Running VMs serve sooner than stopped ones.
            warm.sort(key=lambda entry: (entry.get("status") != "running", int(entry["vmid"])))
            chosen = warm[: max(0, params["count"] - len(kept))]
            taken = self.in_parallel([(self.member_details, (entry,)) for entry in chosen])
            for vm in taken:
                vm["was"] = vm["status"]
        if template is not None:
            plans = self.plan_new(template, resources, found, kept + taken, victims)

        to_start = [vm for vm in kept if params["start"] and params["start_existing"] and vm["status"] == "stopped"]
        to_stop = [vm for vm in kept if params["shut_down"] and vm["status"] == "running"]
        changed = bool(plans or victims or to_start or taken or to_stop)
        after = sorted([vm["vmid"] for vm in kept + taken] + [plan["vmid"] for plan in plans])
        placement = [{key: plan[key] for key in ("vmid", "name", "node", "reason")} for plan in plans]
        result = {
            "changed": changed,
            "diff": {"before": {"count": len(member_ids), "members": member_ids}, "after": {"count": len(after), "members": after}},
            "removed": victims,
            "placement": placement,
            "progress": self.progress,
        }
        if self.module.check_mode:
            for vm in kept + taken:
                vm["ip"] = self.guest_ip(vm, wait=False) if vm["status"] == "running" else None
            created = [dict(((key, plan[key]) for key in ("vmid", "name", "node", "address", "reason")), ip=None) for plan in plans]
            members = sorted((public(vm) for vm in kept + taken), key=lambda vm: vm["vmid"])
            return dict(result, members=members, created=created, taken=[taken_entry(vm) for vm in taken])

        self.in_parallel([(self.remove, (existing[vmid],)) for vmid in victims])
        jobs = [(self.settle, (vm, True)) for vm in kept] + [(self.take, (vm,)) for vm in taken]
        jobs += [(self.create, (template, plan, self.allocator)) for plan in plans]
        settled = self.in_parallel(jobs)
        if params["shut_down"]:
            self.in_parallel([(self.shut_down, (vm,)) for vm in settled if vm["status"] == "running"])
        created = [
            {"vmid": vm["vmid"], "name": vm["name"], "node": vm["node"], "address": vm["address"], "ip": vm["ip"], "reason": vm["reason"]}
            for vm in settled
            if "reason" in vm
        ]
        result["placement"] = [{key: plan[key] for key in ("vmid", "name", "node", "reason")} for plan in plans]
        result["diff"]["after"]["members"] = sorted(vm["vmid"] for vm in settled)
        members = sorted((public(vm) for vm in settled), key=lambda vm: vm["vmid"])
        return dict(result, members=members, created=created, taken=[taken_entry(vm) for vm in settled if "was" in vm])

    def check_vmid_lists(self, member_ids, existing):
        params = self.params
        for vmid in params["remove_vmids"] or []:
            if vmid in existing and vmid not in member_ids:
                entry = existing[vmid]
                raise PoolError(
                    f"remove_vmids: VM {vmid} ({entry.get('name')}) on {entry.get('node')} is not a member of pool tag {params['pool_tag']}"
                    f"{' in pool ' + params['pool'] if params['pool'] else ''} (members: {', '.join(map(str, member_ids)) or 'none'}): "
                    f"remove it from remove_vmids"
                )
        if params["take_vmids"]:
            warm = {int(entry["vmid"]) for entry in existing.values() if is_member(entry, params["take_from_tag"], params["pool"])}
            for vmid in params["take_vmids"]:
                if vmid in existing and vmid not in member_ids and vmid not in warm:
                    entry = existing[vmid]
                    raise PoolError(
                        f"take_vmids: VM {vmid} ({entry.get('name')}) on {entry.get('node')} carries neither pool tag {params['pool_tag']} nor "
                        f"take_from_tag {params['take_from_tag']}{' in pool ' + params['pool'] if params['pool'] else ''}: remove it from take_vmids"
                    )
        strangers = [vmid for vmid in params["protected"] if vmid not in member_ids]
        if strangers:
            self.module.warn(f"protected VMs {', '.join(map(str, strangers))} are not members of pool tag {params['pool_tag']}; nothing to protect there")

    def local_clone_storages(self, template):
        """The storages a clone's disks land on that are not shared: those tie clones to the template's node."""
        if self.params["full"] and self.params["storage"]:
            names = [self.params["storage"]]
        else:
            names = disk_storages(self.client.get(f"nodes/{template['node']}/qemu/{template['vmid']}/config"))
        shared = {entry["storage"]: bool(int(entry.get("shared", 0))) for entry in self.client.get("storage")}
        # A storage the token cannot see is left to Proxmox to judge.
        return sorted(name for name in set(names) if name in shared and not shared[name])

    def peer_addresses(self, resources, kept):
        """The static addresses of the VMs that share the ip_range (address_peer_tags, take_from_tag), members aside."""
        params = self.params
        tags = [tag for tag in [*params["address_peer_tags"], params["take_from_tag"]] if tag]
        known = {vm["vmid"] for vm in kept}
        peers = [
            entry
            for entry in resources
            if int(entry["vmid"]) not in known and any(is_member(entry, tag, params["pool"]) for tag in tags) and not is_member(entry, params["pool_tag"])
        ]
        return [vm["address"] for vm in self.in_parallel([(self.member_details, (entry,)) for entry in peers])]

    def mapped_device_slots(self, template, resources, found, kept):
        """Room per node for new members' devices of the PCI mapping: its devices less those the kept members and
        every other running VM take. A stopped member counts, as it takes its devices when it starts."""
        mapping = self.params["pci_mapping"]
        name = mapping["name"]
        if mapping["pcie"]:
            machine = str(self.client.get(f"nodes/{template['node']}/qemu/{template['vmid']}/config").get("machine", ""))
            if "q35" not in machine:
                raise PoolError(
                    f"pci_mapping.pcie needs the q35 machine type, and template {template['vmid']} ({template.get('name')}) has machine "
                    f"{machine or 'i440fx (the default)'}: set machine q35 on the template, or pcie: false"
                )
        try:
            per_node = mapping_devices_per_node(self.client.get(f"cluster/mapping/pci/{name}"))
        except ProxmoxError as error:
            raise PoolError(
                f"PCI mapping {name} cannot be read ({error}): create it (Datacenter, Resource Mappings) and give the API user or token "
                f"PVEMappingUser on /mapping/pci/{name}"
            ) from None
        used = {}
        for vm in kept:
            used[vm["node"]] = used.get(vm["node"], 0) + vm["pci_devices"]
        members = {int(entry["vmid"]) for entry in found} | {vm["vmid"] for vm in kept}
        # VMs the token cannot see may hold devices too; their starts then fail with Proxmox's own message.
        others = [
            entry
            for entry in resources
            if entry.get("status") == "running" and entry.get("node") in per_node and int(entry["vmid"]) not in members and not int(entry.get("template", 0))
        ]
        configs = self.in_parallel([(self.client.get, (f"nodes/{entry['node']}/qemu/{entry['vmid']}/config",)) for entry in others])
        for index, entry in enumerate(others):
            used[entry["node"]] = used.get(entry["node"], 0) + mapped_device_count(configs[index], name)
        return device_slots(per_node, used, mapping["count"])

    def plan_new(self, template, resources, found, kept, victims):
        """Names, nodes, vmids and addresses of the members to create; raises before any write if they do not fit."""
        params = self.params
        missing = params["count"] - len(kept)
        if missing <= 0:
            return []
        vm_memory = params["memory"] * MIB if params["memory"] is not None else int(template.get("maxmem", 0))
        population = {}
        for vm in kept:
            population[vm["node"]] = population.get(vm["node"], 0) + 1
        allowed = params["nodes"]
        local = self.local_clone_storages(template)
        if local:
            # Proxmox clones to another node only onto shared storage ("can't clone to non-shared storage").
            pinned = f"clones to {', '.join(local)} (not shared storage) cannot leave the template's node {template['node']}"
            if allowed and template["node"] not in allowed:
                raise PoolError(f"{pinned}, and nodes ({', '.join(allowed)}) leaves it out: choose a shared storage or allow node {template['node']}")
            allowed = [template["node"]]
        devices = None
        if params["pci_mapping"]:
            devices = (params["pci_mapping"]["name"], params["pci_mapping"]["count"], self.mapped_device_slots(template, resources, found, kept))
        placed = plan_placement(self.client.get("nodes"), allowed, vm_memory, missing, population, devices)
        if local:
            placed = [(node, f"{reason}; only {node}: {pinned}") for node, reason in placed]
        addresses = [None] * missing
        if params["ip_range"]:
            addresses = pick_addresses(params["ip_range"], [vm["address"] for vm in kept] + self.peer_addresses(resources, kept), missing)
        self.allocator = IdAllocator(int(self.client.get("cluster/nextid")), [entry["vmid"] for entry in resources])
        # Proxmox takes only a DNS name as a VM's name; a tag may hold _ and +.
        prefix = params["name_prefix"] or re.sub(r"[^a-z0-9.-]", "-", params["pool_tag"].lower())
        plans = []
        for index, (node, reason) in enumerate(placed):
            address = addresses[index]
            vmid = self.allocator.allocate()
            plans.append({"vmid": vmid, "name": f"{prefix}-{vmid}", "prefix": prefix, "node": node, "address": address, "reason": reason})
        return plans


def taken_entry(vm):
    return {"vmid": vm["vmid"], "name": vm["name"], "node": vm["node"], "address": vm["address"], "ip": vm["ip"], "was": vm["was"]}


def public(vm):
    return {key: vm[key] for key in ("vmid", "name", "node", "ip", "status", "tags")}


def main():
    module = AnsibleModule(
        argument_spec=argument_spec(),
        required_together=PROXMOX_REQUIRED_TOGETHER,
        mutually_exclusive=PROXMOX_MUTUALLY_EXCLUSIVE,
        required_one_of=PROXMOX_REQUIRED_ONE_OF,
        required_if=[("state", "present", ("count", "template"))],
        supports_check_mode=True,
    )
    fence_module(module)
    try:
        check_arguments(module.params)
        client = ProxmoxClient.from_params(module.params)
        result = PoolRun(module, client).run()
    except ProxmoxError as e:
        module.fail_json(msg=str(e))
    module.exit_json(**result)


if __name__ == "__main__":
    main()
