"""What one autoscaler decision costs the control host's CPU: the decision core alone, and the no-op check of the
serving_pressure source, side by side, on a lab-sized swarm and on a large one.

The issue's target: the core's own CPU per decision at most 0.2 s. A whole scale playbook (start, inventory, lease,
the core, the audit record) costs seconds more; bench/autoscale_reaction.py measures that on the lab.

    . scripts/_env.sh && python bench/decision_cost.py [--repeat 200]

No lab, no network: pure CPU, so the figures are those of this machine's cores.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import statistics
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / ".ansible" / "collections"))

from ansible_collections.mlfleet.serving.plugins.module_utils._scale_decision import decide, effective_settings  # noqa: E402


def load_source():
    spec = importlib.util.spec_from_file_location("serving_pressure", REPO_ROOT / "extensions/eda/plugins/event_source/serving_pressure.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def swarm(workers, services, replicas):
    """``workers`` workers of 8 CPUs, ``services`` services of 0.5 CPU each at ``replicas`` replicas, spread round-robin."""
    nodes = [
        {"node_id": f"w{i}", "hostname": f"w{i}", "role": "worker", "availability": "active", "status": "ready", "cpus": 8.0,
         "labels": {"mlfleet.vmid": str(200 + i)}, "platform": {"os": "linux", "arch": "x86_64"}, "vmid": 200 + i, "pool": "swarm_worker"}
        for i in range(workers)
    ]  # fmt: skip
    names = [f"model{i}" for i in range(services)]
    specs = {name: {"replicas": replicas, "cpus": 0.5, "constraints": ["node.role==worker"], "max_per_node": 0, "mode": "replicated"} for name in names}
    tasks = [{"service": name, "node_id": nodes[(k + j) % workers]["node_id"], "state": "running"} for k, name in enumerate(names) for j in range(replicas)]
    return {"nodes": nodes, "services": specs, "tasks": tasks}, [200 + i for i in range(workers)]


def cpu_per_call(function, repeat):
    samples = []
    for _attempt in range(repeat):
        started = time.process_time()
        function()
        samples.append(time.process_time() - started)
    return statistics.median(samples), max(samples)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=200)
    args = parser.parse_args()
    source = load_source()
    now = time.time()
    print(f"{'case':<58} {'median CPU ms':>14} {'max CPU ms':>11}")
    for label, workers, services, replicas in (("lab: 3 workers, 2 services", 3, 2, 4), ("large: 100 workers, 20 services", 100, 20, 30)):
        state, pool = swarm(workers, services, replicas)
        settings = effective_settings(
            {"cooldown": {"scale_out": 0, "scale_in": 0, "scale_in_after_scale_out": 0}}, "model0", {"min": workers, "max": workers + 10, "cores": 8}
        )
        history = {"history": {"model0": [[now - i, replicas] for i in range(200)]}}
        for direction, backlog in (("scale_out", replicas * 12), ("scale_in", 1)):
            event = {"source": "serving_pressure", "received_at": now, "values": {"backlog": backlog}}
            request = {"action": direction, "direction": direction, "service": "model0", "event": event}
            median, worst = cpu_per_call(functools.partial(decide, request, settings, history, state, pool, now=now), args.repeat)
            print(f"{label + ', ' + direction:<58} {median * 1000:>14.3f} {worst * 1000:>11.3f}")
        figures = source.BackendFigures(servers=replicas, servers_up=replicas, inflight=replicas * 3, queued=0, rtime_ms=0, qtime_ms=0, rate=0, hrsp_5xx=0)
        median, worst = cpu_per_call(functools.partial(source.noop_reason, "model0", "scale_out", figures, now, settings, {}), args.repeat)
        print(f"{label + ', serving_pressure no-op check':<58} {median * 1000:>14.3f} {worst * 1000:>11.3f}")


if __name__ == "__main__":
    main()
