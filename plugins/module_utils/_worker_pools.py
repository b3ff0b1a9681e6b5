# Copyright (c) mlfleet.serving maintainers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The worker VM pools of a site: the inventory's ``mlfleet_worker_pools``, checked and completed, in one place.

A pool is a set of worker VMs cloned from one template with one size, told apart by the Proxmox tag its VMs carry
(``proxmox_vm_pool``'s ``pool_tag``), which the swarm keeps as the node label ``mlfleet.pool``. Every service of
``mlfleet_serving`` runs on one pool, the one it names (``pool``) or the only one. The autoscaler grows and shrinks the
pool of the service it scales, between the pool's ``count`` and ``max_count``.

The single-pool variable ``mlfleet_workers`` of earlier releases still works: it is read as one pool named
``workers`` with the tag ``swarm_worker``, and it warns that it is deprecated. A ValueError always names the pool
entry or service at fault and the fix.
"""

from __future__ import annotations

import math
import re

# The pool that mlfleet_workers describes: its VMs carry this tag and are named <cluster>-worker-<vmid>, as before.
LEGACY_POOL = {"name": "workers", "tag": "swarm_worker", "name_prefix_suffix": "worker"}
DEPRECATION = (
    "mlfleet_workers is deprecated: define the pool in mlfleet_worker_pools instead, as "
    "[{{name: workers, tag: swarm_worker, {fields}}}] (the same VMs, names and tag); mlfleet_workers will be removed in "
    "mlfleet.serving 2.0.0"
)
# Proxmox's tag format (pve-common's PVE::JSONSchema pve-tag), lower case as Proxmox stores it.
TAG = re.compile(r"^[a-z0-9_][a-z0-9_\-+.]*$")
NAME = re.compile(r"^[a-z][a-z0-9-]{0,30}$")
FIELDS = (
    "name",
    "tag",
    "template",
    "count",
    "max_count",
    "cores",
    "memory",
    "cpulimit",
    "ip_range",
    "name_prefix",
    "warm_vms",
    "warm_form",
    "warm_tag",
    "pci_mapping",
)
# Proxmox's pve-configid: a PCI resource mapping's ID.
CONFIG_ID = re.compile(r"^[a-z][a-z0-9_]+$", re.IGNORECASE)
PCI_MAPPING_KEYS = ("name", "count", "pcie")
# How a warm VM waits, from the least it costs to the soonest it serves. stopped: cloned and configured, then shut down
# (disk only; a take pays the start, the boot, the join and the replica's start). running: configured, not in the swarm
# (memory; a take pays the join onward). joined: in the swarm, paused, the pool's model files present (memory and a
# swarm member; a take pays the node update and the replica's start).
WARM_FORMS = ("stopped", "running", "joined")
WARM_TAG_SUFFIX = "_warm"
WHERE = "mlfleet_worker_pools"


def _whole(where, key, value, minimum):
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"{where}.{key} must be a whole number of {minimum} or more, got {value!r}")
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"{where}.{key} must be a whole number of {minimum} or more, got {value!r}") from None
    if not math.isfinite(number) or number != int(number) or number < minimum:
        raise ValueError(f"{where}.{key} must be a whole number of {minimum} or more, got {value!r}")
    return int(number)


def _pool(entry, index, template, cluster, legacy=False):
    where = "mlfleet_workers" if legacy else f"{WHERE}[{index}]"
    if not isinstance(entry, dict):
        raise ValueError(f"{where} must be a mapping such as {{name: cpu, tag: swarm_worker, count: 2, max_count: 4, cores: 2, memory: 4096}}, got {entry!r}")
    if legacy:
        entry = dict(entry, name=LEGACY_POOL["name"], tag=LEGACY_POOL["tag"])
    unknown = sorted(set(entry) - set(FIELDS))
    if unknown:
        raise ValueError(f"{where} has unknown keys {', '.join(unknown)}; a pool takes {', '.join(FIELDS)}")
    name = entry.get("name")
    if not isinstance(name, str) or not NAME.match(name):
        raise ValueError(f"{where}.name must be a short name of lower-case letters, digits and dashes (such as cpu or gpu-a100), got {name!r}")
    where = f"{WHERE} pool {name}" if not legacy else where
    tag = entry.get("tag")
    if not isinstance(tag, str) or not TAG.match(tag):
        raise ValueError(
            f"{where}.tag must be a Proxmox tag (lower-case letters, digits, _ - + .; such as swarm_worker or gpu_worker) "
            f"that marks the pool's VMs, got {tag!r}"
        )
    pool = {"name": name, "tag": tag}
    pool["template"] = entry.get("template", template)
    if not isinstance(pool["template"], (str, int)) or isinstance(pool["template"], bool) or str(pool["template"]) == "":
        raise ValueError(f"{where}.template must name the template VM its VMs are cloned from (or set mlfleet_template), got {pool['template']!r}")
    if "count" not in entry:
        raise ValueError(f"{where} needs count: the VMs the pool keeps at least (site.yml provisions them)")
    pool["count"] = _whole(where, "count", entry["count"], 0)
    pool["max_count"] = _whole(where, "max_count", entry.get("max_count", pool["count"]), 0)
    if pool["max_count"] < pool["count"]:
        raise ValueError(f"{where}: max_count {pool['max_count']} is below count {pool['count']}; raise max_count")
    for key in ("cores", "memory"):
        if key not in entry:
            raise ValueError(f"{where} needs {key}: the {'CPUs' if key == 'cores' else 'memory in MiB'} of each VM")
        pool[key] = _whole(where, key, entry[key], 1)
    cpulimit = entry.get("cpulimit")
    if cpulimit is not None:
        try:
            limit = float(cpulimit) if not isinstance(cpulimit, bool) else math.nan
        except (TypeError, ValueError):
            limit = math.nan
        if not 0 < limit <= pool["cores"]:
            raise ValueError(f"{where}.cpulimit must be a number of host CPUs above 0 and at most cores ({pool['cores']}), got {cpulimit!r}")
        cpulimit = limit
    pool["cpulimit"] = cpulimit
    ip_range = entry.get("ip_range")
    if ip_range is not None and not isinstance(ip_range, dict):
        raise ValueError(f"{where}.ip_range must be a mapping {{start, end, prefix, gateway}} as proxmox_vm_pool takes it, got {ip_range!r}")
    pool["ip_range"] = ip_range
    suffix = LEGACY_POOL["name_prefix_suffix"] if legacy else name
    pool["name_prefix"] = str(entry.get("name_prefix") or (f"{cluster}-{suffix}" if cluster else suffix))
    pool["pci_mapping"] = _pci_mapping(entry.get("pci_mapping"), where)
    _warm(pool, entry, where)
    return pool


def _pci_mapping(value, where):
    """The PCI devices (GPUs) each VM of the pool takes from a Proxmox cluster resource mapping, as proxmox_vm_pool's
    ``pci_mapping`` takes them; None for a pool without."""
    if value is None:
        return None
    example = "{name: nvidia_gpu, count: 1}"
    if not isinstance(value, dict) or sorted(set(value) - set(PCI_MAPPING_KEYS)):
        raise ValueError(f"{where}.pci_mapping must be a mapping of {', '.join(PCI_MAPPING_KEYS)} such as {example}, got {value!r}")
    name = value.get("name")
    if not isinstance(name, str) or not CONFIG_ID.match(name):
        raise ValueError(f"{where}.pci_mapping.name must be the ID of a Proxmox PCI resource mapping (letters, digits and _, such as nvidia_gpu), got {name!r}")
    count = _whole(where, "pci_mapping.count", value.get("count", 1), 1)
    if count > 16:
        raise ValueError(f"{where}.pci_mapping.count must be 16 or fewer (hostpci0 to hostpci15), got {count}")
    pcie = value.get("pcie", True)
    if not isinstance(pcie, bool):
        raise ValueError(f"{where}.pci_mapping.pcie must be true or false, got {pcie!r}")
    return {"name": name, "count": count, "pcie": pcie}


def _warm(pool, entry, where):
    """The pool's warm VMs: how many (``warm_vms``), how they wait (``warm_form``) and the tag they carry (``warm_tag``)."""
    pool["warm_vms"] = _whole(where, "warm_vms", entry.get("warm_vms", 0), 0)
    if pool["count"] + pool["warm_vms"] > pool["max_count"]:
        raise ValueError(
            f"{where}: count {pool['count']} and warm_vms {pool['warm_vms']} make {pool['count'] + pool['warm_vms']} VMs, above max_count "
            f"{pool['max_count']}; warm VMs count toward max_count (they are VMs that run or hold disk): raise max_count or lower warm_vms"
        )
    form = entry.get("warm_form", "joined")
    if form not in WARM_FORMS:
        raise ValueError(f"{where}.warm_form must be one of {', '.join(WARM_FORMS)} (how a warm VM waits), got {form!r}")
    pool["warm_form"] = form
    tag = entry.get("warm_tag", pool["tag"] + WARM_TAG_SUFFIX)
    if not isinstance(tag, str) or not TAG.match(tag) or tag == pool["tag"]:
        raise ValueError(
            f"{where}.warm_tag must be a Proxmox tag other than the pool's tag {pool['tag']!r} (such as {pool['tag']}{WARM_TAG_SUFFIX}), got {tag!r}"
        )
    pool["warm_tag"] = tag


def warm_refill_count(pool, active):
    """The warm VMs the pool keeps beside ``active`` VMs: ``warm_vms``, fewer when the pool is near ``max_count``."""
    return max(0, min(pool["warm_vms"], pool["max_count"] - active))


def worker_pools(pools, workers=None, template=None, cluster=""):
    """``(pools, deprecation)``: the checked pools of ``mlfleet_worker_pools``, or of the deprecated ``mlfleet_workers``
    (``deprecation`` is then the warning to give, else None). ValueError naming the entry and the fix."""
    if pools:
        if workers:
            raise ValueError(
                "both mlfleet_worker_pools and the deprecated mlfleet_workers are set: remove mlfleet_workers "
                "(mlfleet_worker_pools replaces it; its pool is {name: workers, tag: swarm_worker, ...})"
            )
        if not isinstance(pools, list):
            raise ValueError(f"{WHERE} must be a list of pools, got {type(pools).__name__}")
        checked = [_pool(entry, index, template, cluster) for index, entry in enumerate(pools)]
        for key in ("name", "tag"):
            seen = {}
            for pool in checked:
                if pool[key] in seen:
                    raise ValueError(f"{WHERE}: pools {seen[pool[key]]} and {pool['name']} share the {key} {pool[key]!r}; give each pool its own")
                seen[pool[key]] = pool["name"]
        # A VM's tag says which pool it serves in or waits for: no tag may mean both.
        tags = {}
        for pool in checked:
            for key in ("tag", "warm_tag"):
                owner = tags.setdefault(pool[key], (pool["name"], key))
                if owner != (pool["name"], key):
                    raise ValueError(f"{WHERE}: the {key} {pool[key]!r} of pool {pool['name']} is the {owner[1]} of pool {owner[0]}; give each its own tag")
        return checked, None
    if workers:
        pool = _pool(workers, 0, template, cluster, legacy=True)
        fields = ", ".join(f"{key}: {value}" for key, value in workers.items() if key in FIELDS and not isinstance(value, dict))
        return [pool], DEPRECATION.format(fields=fields or "...")
    raise ValueError(f"{WHERE} must list at least one worker pool, such as [{{name: cpu, tag: swarm_worker, count: 2, max_count: 4, cores: 2, memory: 4096}}]")


def service_pools(pools, serving):
    """``{service: pool name}`` for every entry of ``mlfleet_serving``: the pool it names, else the only pool."""
    names = [pool["name"] for pool in pools]
    placed = {}
    for entry in serving or []:
        if not isinstance(entry, dict) or not isinstance(entry.get("service"), str):
            raise ValueError(f"mlfleet_serving entries must be mappings with a service name, got {entry!r}")
        service = entry["service"]
        pool = entry.get("pool")
        if pool is None:
            if len(names) > 1:
                raise ValueError(f"mlfleet_serving service {service} must name its pool (pool: one of {', '.join(names)}): the site has several worker pools")
            pool = names[0]
        if pool not in names:
            raise ValueError(f"mlfleet_serving service {service} names pool {pool!r}, which mlfleet_worker_pools does not define ({', '.join(names)})")
        placed[service] = pool
    return placed


def pool_members(pool, members, tag_key="tag"):
    """The keys (host names or VM ids) of the inventory's VMs ``{key: tags}`` that carry the pool's tag (``tag_key``
    ``warm_tag``: its warm VMs)."""
    found = []
    for key, tags in (members or {}).items():
        if isinstance(tags, str):
            tags = [tag for tag in re.split(r"[;,\s]+", tags) if tag]
        if pool[tag_key] in (tags or []):
            found.append(key)
    return found


def provision_count(pool, current):
    """The size provision.yml keeps the pool at: its ``current`` size within ``count`` and ``max_count``, so that a
    re-run of site.yml keeps the size the autoscaler chose."""
    return max(pool["count"], min(current, pool["max_count"]))
