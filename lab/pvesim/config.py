"""The simulator's configuration: cluster layout, timing, users/tokens/ACLs, initial faults.

A config file (YAML or JSON) replaces the default's top-level sections it names and keeps the others.
The default credentials are lab-only values, published in the README: the server binds to 127.0.0.1.
"""

from __future__ import annotations

import copy
from pathlib import Path

import yaml

GIB = 1024**3

DEFAULT_CONFIG: dict = {
    "cluster_name": "lab",
    "nodes": {
        "pve1": {"maxcpu": 16, "maxmem_gib": 64},
        "pve2": {"maxcpu": 16, "maxmem_gib": 64},
        "pve3": {"maxcpu": 16, "maxmem_gib": 64},
    },
    "storages": {
        "local-lvm": {"type": "lvmthin", "shared": False, "size_gib": 512, "content": "images,rootdir", "speed": 1.0},
        "slow-nfs": {"type": "nfs", "shared": True, "size_gib": 2048, "content": "images,iso,backup", "speed": 0.25},
    },
    "pools": {"mlfleet": {"comment": "model-serving workers"}},
    # Cluster resource mappings (mapping/pci.cfg): {id: {"map": ["node=pve1,path=0000:01:00.0,id=10de:2331", ...],
    # "description": ...}}. One map entry is one device a VM can take on that node.
    "pci_mappings": {},
    "vms": [
        {
            "vmid": 9000,
            "node": "pve1",
            "template": True,
            "storage": "slow-nfs",
            "disk_gib": 8,
            "config": {
                "name": "debian12-golden",
                "cores": 2,
                "sockets": 1,
                "memory": "2048",
                "agent": "1",
                "ostype": "l26",
                "scsihw": "virtio-scsi-single",
                "net0": "virtio=BC:24:11:00:90:00,bridge=vmbr0",
                "ipconfig0": "ip=dhcp",
                "ciuser": "debian",
                "tags": "golden",
            },
        }
    ],
    # Seconds. Full clones take `clone_full` divided by the target storage's `speed`.
    "durations": {
        "clone_setup": 0.05,
        "clone_linked": 1.0,
        "clone_full": 5.0,
        "config": 0.1,
        "start": 1.0,
        "boot_to_agent": 3.0,
        "stop": 0.5,
        "shutdown": 2.0,
        "reboot": 3.0,
        "destroy": 0.5,
        "template": 0.5,
        "snapshot": 0.5,
    },
    # As qemu-server's clone_vm: a clone holds a shared lock on a stopped source (every template) and an exclusive
    # one on a running source. A number here caps clones of one source at once, to simulate contention; clones
    # beyond the cap wait up to `lock_wait` seconds, then fail.
    "limits": {"parallel_clones_per_source": None, "lock_wait": 10.0},
    "users": {
        "root@pam": {"password": "pvesim-root", "tokens": {"admin": {"secret": "5f0c7c4e-8a4d-4a8e-9f51-0c5e7d0a1b01", "privsep": False}}},
        "automation@pve": {
            "password": "pvesim-automation",
            "tokens": {"mlfleet": {"secret": "0b7a1d52-3c9e-4f06-8d7e-6a2f9c4b3e02", "privsep": True}},
        },
    },
    "roles": {},
    # Proxmox's `pveum acl modify PATH --roles R --users U --tokens T --propagate 0|1`, one entry per line.
    "acl": [
        {"path": "/", "roles": ["PVEAuditor"], "users": ["automation@pve"], "tokens": ["automation@pve!mlfleet"]},
        # An ACL on a path replaces what the token inherits from `/`: without PVEPoolUser (Pool.Audit) here,
        # Proxmox hides the pool from its lists and the `pool` of its VMs in /cluster/resources.
        {"path": "/pool/mlfleet", "roles": ["PVEVMAdmin", "PVEPoolUser"], "users": ["automation@pve"], "tokens": ["automation@pve!mlfleet"]},
        {"path": "/vms/9000", "roles": ["PVETemplateUser"], "users": ["automation@pve"], "tokens": ["automation@pve!mlfleet"]},
        {"path": "/storage", "roles": ["PVEDatastoreUser"], "users": ["automation@pve"], "tokens": ["automation@pve!mlfleet"]},
        {"path": "/sdn", "roles": ["PVESDNUser"], "users": ["automation@pve"], "tokens": ["automation@pve!mlfleet"]},
        # Mapping.Use to pass mapped PCI devices (GPUs) to the VMs it makes; Mapping.Audit to read the mappings.
        {"path": "/mapping/pci", "roles": ["PVEMappingUser"], "users": ["automation@pve"], "tokens": ["automation@pve!mlfleet"]},
    ],
    "faults": {},
    # Bearer token for /_sim/*; empty means: generate one and write it next to the state file.
    "admin_token": "",
}


def load_config(path: Path | None) -> dict:
    if path is None:
        return merged({})
    loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(loaded, dict):
        raise ValueError(f"{path}: the configuration must be a mapping")
    return merged(loaded)


def merged(overrides: dict) -> dict:
    """The default configuration with some sections replaced, and `durations`/`limits` merged key by key."""
    unknown = set(overrides) - set(DEFAULT_CONFIG)
    if unknown:
        raise ValueError(f"unknown configuration keys: {', '.join(sorted(unknown))}")
    config = copy.deepcopy(DEFAULT_CONFIG)
    for key, value in overrides.items():
        if key in ("durations", "limits"):
            config[key] = {**config[key], **value}
        else:
            config[key] = copy.deepcopy(value)
    return config
