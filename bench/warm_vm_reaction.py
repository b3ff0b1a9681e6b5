"""How soon a VM scale-out serves with each form of warm VM, against a clone, side by side in one run on the lab.

Needs the lab that ``scripts/site`` deployed (the default lab). For each form of ``--forms`` (``clone``: no warm VM, the
pool clones; ``stopped``, ``running``, ``joined``: one warm VM of that form) it:

1. keeps the worker pool of the lab at 2 VMs with one warm VM of the form, or none (``playbooks/provision.yml`` and
   ``playbooks/configure.yml`` with the pool's settings as extra variables), resnet18 at its minimum of 2 replicas,
   and measures what the warm VM holds on the lab's host (its container's memory and CPU, over a few seconds);
2. under a steady load (``--clients`` clients through the edge proxy), runs ``playbooks/scale_out.yml`` as the
   autoscaler does, with a serving_pressure event whose backlog asks for more replicas than the 2 workers hold, so
   that the run grows the pool by one VM;
3. t1: the first 2xx answered by a task on the VM that joined, from the event; and the run's phases from the audit
   trail (plan, the take or the clone, the join, the replicas, the refill of the warm pool);
4. scales back in (``playbooks/scale_in.yml``) to 2 workers and 2 replicas, every request counted.

Prints each form's figures, then the table side by side with the simulator's boot time. Every load is bounded in
requests and seconds; traffic goes only to the lab's own edge proxy. At the end the lab's pool is as its inventory
says again (no warm VM).

    . scripts/_env.sh && python bench/warm_vm_reaction.py [--forms clone stopped running joined] [--clients 4]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO_ROOT / "tests" / "lab"), str(REPO_ROOT / "tests" / "models"), str(REPO_ROOT), str(REPO_ROOT / "bench")]
from autoscale_reaction import Lab, wait  # noqa: E402
from autoscale_support import audit_events, swarm_nodes  # noqa: E402
from lab_support import run  # noqa: E402
from models_support import jpeg_body  # noqa: E402
from serving_load import Load  # noqa: E402

from lab.pvesim.config import DEFAULT_CONFIG  # noqa: E402

INVENTORY = REPO_ROOT / "inventories" / "lab"
PHASES = ("plan_s", "provision_s", "join_s", "replicas_s", "warm_refill_s", "total_s")


def lab_settings(warm_vms: int, form: str) -> dict:
    """The lab inventory's worker pool with the warm VMs of the form, and its autoscale settings without cooldowns."""
    inventory = yaml.safe_load((INVENTORY / "group_vars" / "all.yml").read_text())
    (pool,) = inventory["mlfleet_worker_pools"]
    autoscale = inventory["mlfleet_autoscale"]
    autoscale = dict(autoscale, cooldown={"scale_out": 0, "scale_in": 0, "scale_in_after_scale_out": 0}, stabilization={"scale_in": 0})
    autoscale["services"] = dict(autoscale["services"], resnet18=dict(autoscale["services"]["resnet18"], step=6))
    return {"mlfleet_worker_pools": [dict(pool, warm_vms=warm_vms, warm_form=form)], "mlfleet_autoscale": autoscale}


def playbook(settings_file: Path, *playbooks: str, event: dict | None = None, timeout: int = 900):
    extra = ["-e", json.dumps({"ansible_eda": {"event": event}})] if event else []
    command = ["ansible-playbook", "-i", INVENTORY, "-e", f"@{settings_file}", *extra, *(f"playbooks/{name}.yml" for name in playbooks)]
    return run(command, timeout=timeout)


def workers(lab: Lab) -> list[dict]:
    return [node for node in swarm_nodes(lab.manager_container()) if node["role"] == "worker"]


def plain(value):
    """A value as ansible-inventory --list prints it, with the inventory plugin's unsafe strings ({"__ansible_unsafe": text}) unwrapped."""
    if isinstance(value, dict):
        return value["__ansible_unsafe"] if set(value) == {"__ansible_unsafe"} else {key: plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [plain(item) for item in value]
    return value


def container_load(lab: Lab, vmid: int, seconds: int = 10) -> tuple[float, float]:
    """Memory (MiB, the resident sets of the VM's processes added up) and CPU (% of one core, over ``seconds``) of a
    VM's container; a stopped VM holds neither. Read inside the VM (``ps``): docker stats sees no cgroup of the lab's
    VM containers."""
    name = run(["docker", "ps", "-q", "--filter", f"label=io.mlfleet.lab={lab.name}", "--filter", f"label=io.mlfleet.lab.vmid={vmid}"]).stdout.strip()
    if not name:
        return 0.0, 0.0

    def sample():
        """The resident MiB and the CPU seconds (user and system, in clock ticks of 1/100 s) of every process."""
        stats = run(["docker", "exec", name, "sh", "-c", "cat /proc/[0-9]*/stat 2>/dev/null"], check=False).stdout.splitlines()
        # After the command name in parentheses: state, ppid, ... utime (11th), stime (12th), ... rss in pages (22nd).
        fields = [line.rsplit(")", 1)[1].split() for line in stats if ")" in line]
        return sum(int(f[21]) for f in fields) * 4 / 1024, sum(int(f[11]) + int(f[12]) for f in fields) / 100

    memory, cpu_before = sample()
    time.sleep(seconds)
    _memory, cpu_after = sample()
    return memory, 100.0 * (cpu_after - cpu_before) / seconds


def cycle(lab: Lab, args, form: str, settings_file: Path) -> dict:
    warm_vms = 0 if form == "clone" else 1
    settings_file.write_text(yaml.safe_dump(lab_settings(warm_vms, "joined" if form == "clone" else form)))
    playbook(settings_file, "provision", "configure")
    # From the pool's minimum: a scale-in first, if an earlier run left more workers.
    if len([node for node in workers(lab) if node["availability"] == "active"]) > 2:
        calm = {"action": "scale_in", "status": "firing", "service": "resnet18", "source": "serving_pressure", "received_at": time.time(), "values": {}}
        playbook(settings_file, "scale_in", event=calm)
    before = {node["vmid"] for node in workers(lab) if node["availability"] == "active"}
    inventory = json.loads(run(["ansible-inventory", "-i", INVENTORY, "--list"]).stdout)
    warm_tag = lab_settings(1, "joined")["mlfleet_worker_pools"][0]["tag"] + "_warm"
    warm_vmids = [host["proxmox_vmid"] for host in inventory["_meta"]["hostvars"].values() if warm_tag in plain(host.get("proxmox_tags", []))]
    memory, cpu = container_load(lab, warm_vmids[0]) if warm_vmids else (0.0, 0.0)
    print(f"\n{form}: workers {sorted(before)}, warm VMs {warm_vmids} holding {memory:.0f} MiB and {cpu:.1f}% of a core on the host")
    body = jpeg_body(4)
    since = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
    with Load(lab.endpoint, "resnet18", body.data, body.content_type, clients=args.clients, max_requests=20000, max_seconds=900) as load:
        load.wait_for(lambda answers: len(answers) >= 20, 120, "20 answers before the step")
        t0, wall0 = time.monotonic(), time.time()
        event = {"action": "scale_out", "status": "firing", "service": "resnet18", "source": "serving_pressure", "received_at": wall0,
                 "values": {"backlog": args.backlog}}  # fmt: skip
        command = ["ansible-playbook", "-i", INVENTORY, "-e", f"@{settings_file}", "-e", json.dumps({"ansible_eda": {"event": event}}),
                   "playbooks/scale_out.yml"]  # fmt: skip
        with subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as scale_out:
            new_nodes = wait(
                "a worker VM that joined", lambda: [n["hostname"] for n in workers(lab) if n["vmid"] not in before and n["availability"] == "active"], 600
            )
            first = wait(
                f"a 2xx from a task on {new_nodes}", lambda: next((a for a in list(load.answers) if a.status == 200 and a.node in new_nodes), None), 600
            )
            output = scale_out.communicate(timeout=900)[0]
        if scale_out.returncode != 0:
            raise SystemExit(f"scale_out.yml failed:\n{output[-3000:]}")
        stepped = list(load.answers)
    (decision,) = [e for e in audit_events(lab.state, kind="scale", service="resnet18", action="scale_out") if e["time"] >= since]
    back = {"action": "scale_in", "status": "firing", "service": "resnet18", "source": "serving_pressure", "received_at": time.time(), "values": {}}
    with Load(lab.endpoint, "resnet18", body.data, body.content_type, clients=1, max_requests=5000, max_seconds=600) as calm:
        playbook(settings_file, "scale_in", event=back)
        wait("2 active workers", lambda: len([node for node in workers(lab) if node["availability"] == "active"]) == 2, 300)
    result = {
        "form": form,
        "t1": first.started + first.seconds - t0,
        "fields": decision["fields"],
        "memory": memory,
        "cpu": cpu,
        "requests": len(stepped) + len(calm.answers),
        "failed": len([a for a in stepped if a.status != 200]) + len(calm.failures()),
    }
    print(f"{form}: first 2xx from {first.node} {result['t1']:.1f} s after the event; {decision['reason']}")
    phases = ", ".join(f"{phase} {decision['fields'].get(phase)}" for phase in PHASES)
    print(f"{form}: phases {phases}; {result['failed']} of {result['requests']} failed")
    return result


def side_by_side(results: list[dict], boot: float):
    print(f"\nevent → first 2xx from a task on the VM the scale-out added (simulated boot of a clone: {boot:.0f} s)")
    header = f"{'form':<9}{'t1 s':>7}{'beyond boot':>12}" + "".join(f"{phase:>15}" for phase in PHASES) + f"{'MiB':>7}{'CPU %':>7}{'failed':>12}"
    print(header)
    clone = next((r for r in results if r["form"] == "clone"), None)
    for result in results:
        phases = "".join(f"{result['fields'].get(phase, float('nan')):>15.1f}" for phase in PHASES)
        print(f"{result['form']:<9}{result['t1']:>7.1f}{result['t1'] - boot:>12.1f}{phases}{result['memory']:>7.0f}{result['cpu']:>7.1f}"
              f"{str(result['failed']) + '/' + str(result['requests']):>12}")  # fmt: skip
    if clone:
        for result in results:
            if result is not clone:
                print(f"  {result['form']}: {clone['t1'] / result['t1']:.1f}x sooner than a clone")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--forms", nargs="+", default=["clone", "stopped", "running", "joined"], choices=["clone", "stopped", "running", "joined"])
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--backlog", type=int, default=16, help="the event's backlog: 16 asks for 8 replicas, beyond the 6 two workers hold")
    args = parser.parse_args()
    lab = Lab()
    durations = DEFAULT_CONFIG["durations"]
    boot = durations["clone_full"] + durations["start"] + durations["boot_to_agent"]
    settings_file = lab.state / "warm-vm-reaction.yml"
    try:
        results = [cycle(lab, args, form, settings_file) for form in args.forms]
    finally:
        settings_file.write_text(yaml.safe_dump(lab_settings(0, "joined")))
        playbook(settings_file, "provision")
    side_by_side(results, boot)


if __name__ == "__main__":
    main()
