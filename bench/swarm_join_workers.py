"""Wall time to join 1, 3 and 6 workers to a swarm in one play (run by hand as root, ~3-4 min).

    python bench/swarm_join_workers.py [--repeats 3] [--forks 10]

Brings up a lab of its own (7 plain lab nodes, each running its own dockerd; subnet 192.168.219.0/24),
creates the swarm on node 1 with the swarm_manager role, then for each worker count N joins N workers
with one ansible-playbook run of the swarm_worker role (as playbooks/configure.yml does), REPEATS times.
Between runs the workers leave and are removed outside the timing. Prints per N the median, min and max
wall time of the whole ansible-playbook process, the per-node figure (median / N), the marginal cost of a
node ((t6 - t1) / 5), and the time of a re-run that changes nothing. Takes the lab down at the end.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from lab.environment import lab_environment  # noqa: E402

LAB_NAME = "mlfleet-bench-join"
PREFIX = "192.168.219"
NODES = [f"{LAB_NAME}-node-{i}" for i in range(1, 8)]
MANAGER, WORKERS = NODES[0], NODES[1:]
COUNTS = (1, 3, 6)


def run(args, env=None, check=True, timeout=900):
    result = subprocess.run(
        [str(a) for a in args], env={**os.environ, **(env or {})}, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and result.returncode != 0:
        sys.exit(f"{' '.join(map(str, args))} exited {result.returncode}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def node_docker(node, *args, check=True):
    return run(["docker", "exec", node, "docker", *args], check=check)


def write_inventory(path, state, workers):
    def hosts(nodes):
        return {n: {"ansible_host": f"{PREFIX}.{200 + NODES.index(n) + 1}", "proxmox_vmid": 700 + NODES.index(n) + 1} for n in nodes}

    path.write_text(
        yaml.safe_dump(
            {
                "all": {
                    "vars": {
                        "ansible_user": "root",
                        "ansible_ssh_private_key_file": str(state / "ssh" / "id_ed25519"),
                        "ansible_ssh_common_args": "-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR",
                        "swarm_manager_overlay_encrypted": False,
                    },
                    "children": {"swarm_managers": {"hosts": hosts([MANAGER])}, "swarm_workers": {"hosts": hosts(workers)}},
                }
            }
        )
    )


def role_play(hosts, role):
    return yaml.safe_dump([{"name": f"Run {role}", "hosts": hosts, "gather_facts": False, "roles": [role]}])


def reset_workers():
    for worker in WORKERS:
        node_docker(worker, "swarm", "leave", "--force", check=False)
    ids = node_docker(MANAGER, "node", "ls", "-q", "--filter", "role=worker").stdout.split()
    if ids:
        node_docker(MANAGER, "node", "rm", "--force", *ids)


def timed_play(inventory, playbook, forks):
    started = time.perf_counter()
    result = run(["ansible-playbook", "-i", inventory, "-f", str(forks), playbook])
    return time.perf_counter() - started, result.stdout


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--forks", type=int, default=10)
    options = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root: the lab starts containers")
    work = Path(tempfile.mkdtemp(prefix="bench-join-"))
    state = work / "state"
    env = lab_environment(LAB_NAME, PREFIX, 18019, work, nodes=len(NODES), node_memory="1g")
    join_play, manager_play = work / "join.yml", work / "manager.yml"
    join_play.write_text(role_play("swarm_workers", "mlfleet.serving.swarm_worker"))
    manager_play.write_text(role_play("swarm_managers", "mlfleet.serving.swarm_manager"))
    try:
        run([REPO_ROOT / "lab" / "up.sh"], env=env)
        inventory = work / "inventory.yml"
        write_inventory(inventory, state, [])
        run(["ansible-playbook", "-i", inventory, manager_play])
        results = {}
        for count in COUNTS:
            write_inventory(inventory, state, WORKERS[:count])
            walls = []
            for _run in range(options.repeats):
                reset_workers()
                wall, _output = timed_play(inventory, join_play, options.forks)
                ready = [line for line in node_docker(MANAGER, "node", "ls", "--format", "{{.Hostname}} {{.Status}}").stdout.splitlines() if "Ready" in line]
                if len(ready) != count + 1:
                    sys.exit(f"after joining {count} workers the manager lists {ready}")
                walls.append(wall)
            results[count] = walls
        rerun, output = timed_play(inventory, join_play, options.forks)
        if "changed=0" not in output or "changed=1" in output:
            sys.exit(f"the re-run changed something:\n{output[-2000:]}")
    finally:
        run([REPO_ROOT / "lab" / "down.sh"], env=env, check=False)

    print(f"join workers in one play: {options.repeats} runs each, forks {options.forks}, 1 manager, lab nodes with their own dockerd")
    print(f"{'workers':>8} {'median s':>9} {'min s':>7} {'max s':>7} {'per node s':>11} {'vs 1 worker':>12}")
    base = statistics.median(results[1])
    for count, walls in results.items():
        median = statistics.median(walls)
        print(f"{count:>8} {median:>9.2f} {min(walls):>7.2f} {max(walls):>7.2f} {median / count:>11.2f} {median / base:>11.2f}x")
    marginal = (statistics.median(results[6]) - base) / 5
    print(f"marginal cost of one more worker: {marginal:.2f} s; re-run of 6 joined workers (no change): {rerun:.2f} s")


if __name__ == "__main__":
    main()
