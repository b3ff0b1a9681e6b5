#!/usr/bin/python
# Copyright (c) mlfleet.serving maintainers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: worker_pools_info
short_description: Check the site's worker VM pools and say which VMs and services belong to each
version_added: 0.1.0
description:
  - Reads the inventory's C(mlfleet_worker_pools), checks every pool and completes it (template, VM names), and says
    which of the inventory's workers belong to each pool (by the Proxmox tag they carry), how many VMs C(provision.yml)
    keeps in each, and which pool each service of C(mlfleet_serving) runs on.
  - "A pool: C(name) (lower-case letters, digits, dashes), C(tag) (the Proxmox tag its VMs carry, kept as the swarm node
    label C(mlfleet.pool)), C(template) (default O(template)), C(count) (the VMs it keeps at least), C(max_count) (the
    most the autoscaler grows it to; default C(count)), C(cores), C(memory) (MiB), C(cpulimit) (host CPUs, optional),
    C(ip_range) (as M(mlfleet.serving.proxmox_vm_pool) takes it; optional), C(name_prefix) (default
    C(<cluster>-<name>)), C(warm_vms) (VMs kept warm for a scale-out, default 0; they count toward C(max_count)),
    C(warm_form) (how they wait: V(stopped), V(running) or V(joined), the default), C(warm_tag) (the Proxmox tag they
    carry while they wait, default C(<tag>_warm)) and C(pci_mapping) (GPUs passed through to each VM from a Proxmox
    PCI resource mapping, as M(mlfleet.serving.proxmox_vm_pool) takes it - C(name), C(count) default 1, C(pcie)
    default true; optional)."
  - The single-pool variable C(mlfleet_workers) of earlier releases (O(workers)) is read as the pool C(workers) with the
    tag C(swarm_worker) and the VM names C(<cluster>-worker-<vmid>), the same VMs as before; it gives a deprecation
    warning.
  - Only reads its arguments; it reaches no host.
author:
  - mlfleet.serving maintainers (@mlfleet)
extends_documentation_fragment:
  - mlfleet.serving.attributes
attributes:
  check_mode:
    support: full
  diff_mode:
    support: none
  idempotent:
    support: full
options:
  pools:
    description: The pools, C(mlfleet_worker_pools) as the inventory gives it.
    type: list
    elements: dict
  workers:
    description: The deprecated single pool C(mlfleet_workers), read when O(pools) is empty.
    type: dict
  template:
    description: The template a pool clones from when its entry names none (C(mlfleet_template)).
    type: raw
  cluster:
    description: The cluster's name (C(mlfleet_cluster)), the start of the VM names a pool gives by default.
    type: str
    default: ""
  serving:
    description: The services, C(mlfleet_serving); each entry's C(pool) names the pool it runs on (the only pool when none).
    type: list
    elements: dict
    default: []
  members:
    description:
      - "The inventory's VMs as C({host: tags}) (C(proxmox_tags) of each host of C(swarm_workers), and of the warm VMs
        to see them in the C(warm_members) of RV(pools))."
    type: dict
    default: {}
notes:
  - "The inventory plugin puts VMs in C(swarm_workers) by their tag (its C(tag_groups)); map the tag of every pool there,
    as in C({swarm_worker: swarm_workers, gpu_worker: swarm_workers}), or the playbooks do not see that pool's VMs."
seealso:
  - module: mlfleet.serving.proxmox_vm_pool
  - module: mlfleet.serving.scale_decision
"""

EXAMPLES = r"""
- name: Read the worker pools
  mlfleet.serving.worker_pools_info:
    pools: "{{ mlfleet_worker_pools | default(omit) }}"
    workers: "{{ mlfleet_workers | default(omit) }}"
    template: "{{ mlfleet_template }}"
    cluster: "{{ mlfleet_cluster }}"
    serving: "{{ mlfleet_serving | default([]) }}"
    members: "{{ dict(groups['swarm_workers'] | zip(groups['swarm_workers'] | map('extract', hostvars) | map(attribute='proxmox_tags', default=[]))) }}"
  register: worker_pools

- name: Keep each pool at its size
  mlfleet.serving.proxmox_vm_pool:
    pool_tag: "{{ item.tag }}"
    count: "{{ item.provision_count }}"
    template: "{{ item.template }}"
    name_prefix: "{{ item.name_prefix }}"
    cores: "{{ item.cores }}"
    memory: "{{ item.memory }}"
  loop: "{{ worker_pools.pools }}"
"""

RETURN = r"""
pools:
  description:
    - Every pool, checked and completed, with C(members) (the inventory's hosts that carry its tag) and
      C(provision_count) (the VMs C(provision.yml) keeps - the current size within C(count) and C(max_count), so a re-run
      keeps what the autoscaler chose), C(warm_members) (the hosts that carry its C(warm_tag)) and C(warm_count) (the
      warm VMs it keeps beside C(provision_count) - C(warm_vms), fewer where C(max_count) leaves no room), and
      C(services) (the services of O(serving) that run on it).
  returned: success
  type: list
  elements: dict
  sample:
    - {name: cpu, tag: swarm_worker, template: debian-golden, count: 2, max_count: 4, cores: 2, memory: 4096, cpulimit: null,
       ip_range: null, name_prefix: mlfleet-cpu, warm_vms: 1, warm_form: joined, warm_tag: swarm_worker_warm,
       pci_mapping: null, members: [mlfleet-cpu-201, mlfleet-cpu-202], provision_count: 2, warm_members: [mlfleet-cpu-203], warm_count: 1,
       services: [resnet18]}
service_pools:
  description: The pool each service runs on, by service name.
  returned: success
  type: dict
  sample: {resnet18: cpu, llama: gpu}
service_pool_tags:
  description:
    - The tag of each service's pool, by service name; the C(torchserve) role's C(torchserve_pool_tag), which keeps the
      replicas on the nodes with that C(mlfleet.pool) label.
  returned: success
  type: dict
  sample: {resnet18: swarm_worker}
host_pool_tags:
  description: The pool tag of each host of O(members) that belongs to a pool.
  returned: success
  type: dict
  sample: {mlfleet-cpu-201: swarm_worker}
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.mlfleet.serving.plugins.module_utils._worker_pools import (
    pool_members,
    provision_count,
    service_pools,
    warm_refill_count,
    worker_pools,
)


def main():
    module = AnsibleModule(
        argument_spec=dict(
            pools=dict(type="list", elements="dict"),
            workers=dict(type="dict"),
            template=dict(type="raw"),
            cluster=dict(type="str", default=""),
            serving=dict(type="list", elements="dict", default=[]),
            members=dict(type="dict", default={}),
        ),
        supports_check_mode=True,
    )
    params = module.params
    try:
        pools, deprecation = worker_pools(params["pools"], params["workers"], params["template"], params["cluster"])
        placed = service_pools(pools, params["serving"])
    except ValueError as e:
        module.fail_json(msg=str(e))
    if deprecation:
        module.deprecate(deprecation, version="2.0.0", collection_name="mlfleet.serving")
    by_name = {pool["name"]: pool for pool in pools}
    host_tags = {}
    for pool in pools:
        pool["members"] = sorted(pool_members(pool, params["members"]))
        pool["provision_count"] = provision_count(pool, len(pool["members"]))
        pool["warm_members"] = sorted(pool_members(pool, params["members"], "warm_tag"))
        pool["warm_count"] = warm_refill_count(pool, pool["provision_count"])
        pool["services"] = sorted(service for service, name in placed.items() if name == pool["name"])
        for host in pool["members"]:
            if host in host_tags:
                module.fail_json(
                    msg=f"{host} carries the tags of two worker pools, {host_tags[host]} and {pool['tag']}: remove one of them from the VM in Proxmox"
                )
            host_tags[host] = pool["tag"]
        both = sorted(set(pool["members"]) & set(pool["warm_members"]))
        if both:
            module.fail_json(
                msg=f"{', '.join(both)} carries both the tag {pool['tag']} of pool {pool['name']} and its warm_tag {pool['warm_tag']}: "
                f"a VM serves or waits, not both; remove {pool['warm_tag']} from the VM in Proxmox if it serves"
            )
    module.exit_json(
        changed=False,
        pools=pools,
        service_pools=placed,
        service_pool_tags={service: by_name[name]["tag"] for service, name in placed.items()},
        host_pool_tags=host_tags,
    )


if __name__ == "__main__":
    main()
