"""Latency of GET /cluster/resources?type=vm on the Proxmox simulator with many VMs (run by hand).

    python bench/pvesim_resources.py [--vms 1000] [--nodes 8] [--requests 200]

Starts the simulator (memory backend) in-process on 127.0.0.1 with a free port, fills it with running
VMs spread over the nodes, then times a bounded number of sequential requests over HTTPS with one
keep-alive `requests` session, and prints p50/p95/max latency and the response size.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import requests

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from lab.pvesim.config import DEFAULT_CONFIG, merged  # noqa: E402
from lab.pvesim.server import Simulator, running_in_thread  # noqa: E402

FIRST_VMID = 1000
CALLERS = {f"{user}!{name}": token["secret"] for user, spec in DEFAULT_CONFIG["users"].items() for name, token in spec.get("tokens", {}).items()}
TIME_LIMIT = 120.0


def cluster_config(vm_count: int, node_count: int) -> dict:
    nodes = {f"pve{index + 1}": {"maxcpu": 64, "maxmem_gib": 512} for index in range(node_count)}
    vms = [
        {
            "vmid": FIRST_VMID + index,
            "node": f"pve{index % node_count + 1}",
            "storage": "local-lvm",
            "disk_gib": 16,
            "pool": "mlfleet",
            "config": {
                "name": f"worker-{index}",
                "cores": 2,
                "memory": "4096",
                "agent": "1",
                "net0": "virtio,bridge=vmbr0",
                "ipconfig0": f"ip=10.{index // 250}.{index % 250}.10/16,gw=10.0.0.1",
                "tags": "mlfleet;worker",
            },
        }
        for index in range(vm_count)
    ]
    return merged({"nodes": nodes, "vms": DEFAULT_CONFIG["vms"] + vms})


def percentile(sorted_values: list[float], fraction: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(round(fraction * (len(sorted_values) - 1))))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vms", type=int, default=1000)
    parser.add_argument("--nodes", type=int, default=8)
    parser.add_argument("--requests", type=int, default=200, help=f"timed requests (the run also stops after {TIME_LIMIT:.0f} s)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--caller", choices=sorted(CALLERS), default="root@pam!admin", help="whose token: the superuser, or a privilege-separated one")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="pvesim-bench-") as state_dir:
        simulator = Simulator(cluster_config(args.vms, args.nodes), Path(state_dir))
        for vm in simulator.cluster.vms.values():
            if not vm.is_template:
                vm.status, vm.started_at = "running", time.time() - 3600
        with running_in_thread(simulator) as url, requests.Session() as session:
            session.headers["Authorization"] = f"PVEAPIToken={args.caller}={CALLERS[args.caller]}"
            # Per request: a session-wide `verify` loses to REQUESTS_CA_BUNDLE from the environment.
            ca_file = str(simulator.certificates.ca_file)
            endpoint = f"{url}/api2/json/cluster/resources"
            for _warmup in range(args.warmup):
                session.get(endpoint, params={"type": "vm"}, verify=ca_file, timeout=30).raise_for_status()
            latencies, size, deadline = [], 0, time.monotonic() + TIME_LIMIT
            for _request in range(args.requests):
                if time.monotonic() > deadline:
                    break
                started = time.perf_counter()
                response = session.get(endpoint, params={"type": "vm"}, verify=ca_file, timeout=30)
                latencies.append(time.perf_counter() - started)
                response.raise_for_status()
                size = len(response.content)
            vm_entries = len(response.json()["data"])

    latencies.sort()
    print(f"GET /cluster/resources?type=vm as {args.caller}: {vm_entries} VMs on {args.nodes} nodes, {len(latencies)} requests over HTTPS (keep-alive)")
    print(f"latency ms: p50 {percentile(latencies, 0.5) * 1000:.1f}  p95 {percentile(latencies, 0.95) * 1000:.1f}  max {latencies[-1] * 1000:.1f}")
    print(f"mean {statistics.fmean(latencies) * 1000:.1f} ms, response size {size} bytes ({size / 1024:.0f} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
