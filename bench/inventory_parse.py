"""Wall time of the proxmox inventory plugin's parse() over a large cluster, cold cache (run by hand).

    python bench/inventory_parse.py [--vms 1000] [--nodes 8] [--agent-latency 0.02] [--concurrency 16]

The simulator (memory backend) runs in a child process, so that its event loop and the plugin's
threads do not share one interpreter lock, on 127.0.0.1 with a free port. It holds the VMs of
bench/pvesim_resources.py, all running with their guest agent up. The simulator has no latency fault,
so the child wraps its `agent/network-get-interfaces` handler with an asynchronous sleep of
--agent-latency seconds: each agent call takes that long without holding up other requests, as a
real guest agent round trip would. The parent parses a `*.proxmox.yml` through the plugin, prints
the wall time, the CPU time of both processes (the two share this machine's CPUs), and the API
calls from the plugin's count and the simulator's request log.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import requests
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
for entry in (REPO_ROOT, REPO_ROOT / ".ansible" / "collections"):
    if str(entry) not in sys.path:
        sys.path.insert(0, str(entry))

from pvesim_resources import cluster_config  # noqa: E402  (bench/ is this script's directory)

from lab.pvesim.config import DEFAULT_CONFIG  # noqa: E402

ROOT_TOKEN = DEFAULT_CONFIG["users"]["root@pam"]["tokens"]["admin"]["secret"]
AGENT_ROUTE = ("GET", "/nodes/{node}/qemu/{vmid}/agent/network-get-interfaces")
TARGET_SECONDS = 2.0
CHILD_TIMEOUT = 60.0


def serve(vm_count, node_count, agent_latency, state_dir, connection, stop):
    """Child process: the simulator with every VM running and a slow agent, until `stop` is set."""
    from lab.pvesim import api
    from lab.pvesim.server import Simulator, running_in_thread

    plain = api.HANDLERS[AGENT_ROUTE]

    async def slow_agent(call):
        await asyncio.sleep(agent_latency)
        return await plain(call)

    api.HANDLERS[AGENT_ROUTE] = slow_agent
    simulator = Simulator(cluster_config(vm_count, node_count), Path(state_dir))
    booted = time.time() - 3600
    for vm in simulator.cluster.vms.values():
        if not vm.is_template:
            vm.status, vm.started_at, vm.agent_ready_at = "running", booted, booted
    with running_in_thread(simulator) as url:
        connection.send({"url": url, "ca": str(simulator.certificates.ca_file), "admin": simulator.admin_token})
        ready_cpu = time.process_time()
        if connection.poll(CHILD_TIMEOUT * 5):  # the parent asks once its parse is done
            connection.recv()
            connection.send(time.process_time() - ready_cpu)
        stop.wait(CHILD_TIMEOUT)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vms", type=int, default=1000)
    parser.add_argument("--nodes", type=int, default=8)
    parser.add_argument("--agent-latency", type=float, default=0.02, help="seconds added to every guest agent call")
    parser.add_argument("--concurrency", type=int, default=16, help="the plugin's agent_concurrency")
    args = parser.parse_args()

    from ansible.inventory.data import InventoryData
    from ansible.parsing.dataloader import DataLoader
    from ansible.plugins.loader import init_plugin_loader, inventory_loader

    init_plugin_loader([str(REPO_ROOT / ".ansible" / "collections")])

    with tempfile.TemporaryDirectory(prefix="inventory-bench-") as work:
        parent_end, child_end = multiprocessing.Pipe()
        stop = multiprocessing.Event()
        child = multiprocessing.Process(target=serve, args=(args.vms, args.nodes, args.agent_latency, work, child_end, stop), daemon=True)
        child.start()
        try:
            if not parent_end.poll(CHILD_TIMEOUT):
                raise SystemExit(f"the simulator did not start within {CHILD_TIMEOUT:.0f} s")
            sim = parent_end.recv()
            host, port = sim["url"].removeprefix("https://").split(":")
            config = {
                "plugin": "mlfleet.serving.proxmox",
                "api_host": host,
                "api_port": int(port),
                "api_user": "root@pam",
                "api_token_id": "admin",
                "api_token_secret": ROOT_TOKEN,
                "ca_path": sim["ca"],
                "agent_concurrency": args.concurrency,
            }
            path = Path(work) / "bench.proxmox.yml"
            path.write_text(yaml.safe_dump(config), encoding="utf-8")
            admin = {"headers": {"Authorization": f"Bearer {sim['admin']}"}, "verify": sim["ca"], "timeout": 30}
            requests.delete(f"{sim['url']}/_sim/requests", **admin).raise_for_status()

            plugin = inventory_loader.get("mlfleet.serving.proxmox")
            inventory = InventoryData()
            started, started_cpu = time.perf_counter(), time.process_time()
            plugin.parse(inventory, DataLoader(), str(path), cache=False)
            elapsed, plugin_cpu = time.perf_counter() - started, time.process_time() - started_cpu

            log = requests.get(f"{sim['url']}/_sim/requests", **admin).json()
            parent_end.send("cpu?")
            simulator_cpu = parent_end.recv() if parent_end.poll(CHILD_TIMEOUT) else float("nan")
        finally:
            stop.set()
            child.join(10)
            if child.is_alive():
                child.terminate()

    by_kind = Counter("agent" if "/agent/" in entry["path"] else "config" if entry["path"].endswith("/config") else entry["path"] for entry in log)
    hosts = [host for host in inventory.hosts.values() if host.get_vars().get("proxmox_address_source") == "agent"]
    running = sum(1 for host in inventory.hosts.values() if host.get_vars().get("proxmox_status") == "running")
    print(f"parse() over {args.vms} VMs on {args.nodes} nodes, cold cache", end=", ")
    print(f"{args.agent_latency * 1000:.0f} ms per agent call, agent_concurrency {args.concurrency}")
    print(f"wall time {elapsed:.2f} s (target <= {TARGET_SECONDS:.0f} s): {'met' if elapsed <= TARGET_SECONDS else 'MISSED'}")
    print(f"CPU seconds: plugin process {plugin_cpu:.2f}, simulator process {simulator_cpu:.2f} (this machine has {os.cpu_count()} CPUs)")
    print(f"hosts {len(inventory.hosts)}, running {running}, addressed by the agent {len(hosts)}")
    print(f"API calls counted by the plugin: {plugin.api_calls} = {sum(plugin.api_calls.values())} (expected 1 + {running} running)")
    print(f"simulator request log: {dict(sorted(by_kind.items()))} = {len(log)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
