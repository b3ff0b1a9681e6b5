"""The environment that selects one lab for lab/up.sh and lab/down.sh (see lab/lib.sh for every setting).

Tests and benchmarks each run a lab of their own, named and addressed apart from the developer's lab.
"""

from __future__ import annotations


def lab_environment(name, subnet_prefix, pve_port, work, nodes=0, node_memory=None):
    """Settings for a lab called ``name`` on ``<subnet_prefix>.0/24`` whose state and inventory live under ``work``."""
    env = {
        "MLFLEET_LAB_NAME": name,
        "MLFLEET_LAB_STATE": str(work / "state"),
        "MLFLEET_LAB_SUBNET": f"{subnet_prefix}.0/24",
        "MLFLEET_LAB_GATEWAY": f"{subnet_prefix}.1",
        "MLFLEET_LAB_PVE_PORT": str(pve_port),
        "MLFLEET_LAB_NODES": str(nodes),
        "MLFLEET_LAB_INVENTORY": str(work / "lab_nodes.yml"),
    }
    if node_memory:
        env["MLFLEET_LAB_NODE_MEMORY"] = node_memory
    return env
