"""How fast the autoscaler reacts to a load step on the lab, phase by phase, and a timeline plot.

Needs the lab that ``scripts/site`` deployed (the default lab, or MLFLEET_LAB_* as for lab/up.sh). It starts the
autoscaler as a user does (``scripts/autoscale``: the real ansible-rulebook, the serving_pressure fast path, the
scale playbooks), then:

1. light load (1 client) for a baseline, then a step to ``--clients`` clients at t0;
2. t1 = the first 2xx answered by a task that did not exist at t0 (the proxy's X-MLfleet-Task header): the fast
   path's reaction, split into its phases from the audit trail and the proxy's stats:
   detection (t0 → the event source fires), dispatch (→ the playbook starts), plan, replicas set, the new task up
   in the proxy, first answer;
3. the load stays until replicas no longer fit and a new worker VM serves: t1 of the VM path, from the event that
   decided to grow the pool to the first 2xx from a task on the new VM, with the simulator's boot time stated;
4. back to 1 client until the autoscaler is back at its minimum (scale-in, every request counted).

Prints the figures and writes a PNG timeline (load, latency, replicas, worker VMs). Every load is bounded in
requests and seconds; traffic goes only to the lab's own edge proxy.

    . scripts/_env.sh && python bench/autoscale_reaction.py [--clients 12] [--png bench/autoscale_timeline.png]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

import requests

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO_ROOT / "tests" / "lab"), str(REPO_ROOT / "tests" / "models"), str(REPO_ROOT)]
from autoscale_support import Autoscaler, audit_events, swarm_nodes  # noqa: E402
from lab_support import run  # noqa: E402
from models_support import jpeg_body  # noqa: E402
from serving_load import Endpoint, Load  # noqa: E402

from lab.pvesim.config import DEFAULT_CONFIG  # noqa: E402

SETTINGS = {
    "autoscale_pressure_out_threshold": 2.0,
    "autoscale_pressure_out_for": 4,
    "autoscale_pressure_in_threshold": 0.5,
    "autoscale_pressure_in_for": 15,
    "autoscale_pressure_repeat_after": 10,
    "autoscale_pressure_in_repeat_after": 30,
}


class Lab:
    def __init__(self):
        self.state = Path(os.environ.get("MLFLEET_LAB_STATE", REPO_ROOT / ".lab"))
        self.name = os.environ.get("MLFLEET_LAB_NAME", "mlfleet-lab")
        self.gateway = os.environ.get("MLFLEET_LAB_GATEWAY", "192.168.213.1")
        edge = self.state / "edge-proxy"
        self.manager_address = self.gateway.rsplit(".", 1)[0] + ".10"
        self.endpoint = Endpoint(f"https://{self.manager_address}:443", (edge / "inference.token").read_text().strip(), str(edge / "tls.crt"))
        self.stats_token = (edge / "stats.token").read_text().strip()

    def manager_container(self):
        for container in run(["docker", "ps", "-q", "--filter", f"label=io.mlfleet.lab={self.name}", "--filter", "label=io.mlfleet.lab.vmid"]).stdout.split():
            addresses = run(["docker", "inspect", "-f", "{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}", container]).stdout.split()
            if self.manager_address in addresses:
                return container
        raise SystemExit(f"no VM of the lab {self.name} has the manager's address {self.manager_address}: run scripts/site first")

    def servers_up(self, backend):
        response = requests.get(f"https://{self.manager_address}:8404/stats;csv", headers={"Authorization": f"Bearer {self.stats_token}"},
                                verify=self.endpoint.ca_file, timeout=10)  # fmt: skip
        response.raise_for_status()
        header, *rows = response.text.lstrip("# ").splitlines()
        names = header.split(",")
        servers = (dict(zip(names, row.split(","), strict=False)) for row in rows)
        return [r for r in servers if r["pxname"] == backend and r["svname"].startswith("task") and r["status"] == "UP"]


class Timeline(threading.Thread):
    """Samples every second: answers and latency of the loads, replicas up in the proxy, worker VMs in the swarm."""

    def __init__(self, lab: Lab, service: str):
        super().__init__(daemon=True)
        self.lab, self.service = lab, service
        self.samples: list[dict] = []
        self.loads: list[Load] = []
        self.stopping = threading.Event()
        self.manager = lab.manager_container()

    def run(self):
        deadline = time.monotonic() + 3600
        while not self.stopping.is_set() and time.monotonic() < deadline:
            now = time.monotonic()
            answers = [a for load in self.loads for a in list(load.answers) if now - 1.0 <= a.started + a.seconds < now]
            try:
                replicas = len(self.lab.servers_up(self.service))
                workers = len([n for n in swarm_nodes(self.manager) if n["role"] == "worker" and n["status"] == "ready" and n["availability"] == "active"])
            except Exception:  # noqa: BLE001 - a missed sample is a gap in the plot, not a failed run
                replicas = workers = None
            ok = [a for a in answers if a.status == 200]
            latency = sum(a.seconds for a in ok) / len(ok) if ok else None
            self.samples.append({"t": now, "answers": len(ok), "failed": len(answers) - len(ok), "latency": latency, "replicas": replicas, "workers": workers})
            self.stopping.wait(max(0.0, 1.0 - (time.monotonic() - now)))


def first_new_answer(load: Load, known_tasks: set, since: float, nodes: set | None = None):
    for answer in sorted(list(load.answers), key=lambda a: a.started + a.seconds):
        if answer.status == 200 and answer.task and answer.task not in known_tasks and answer.started + answer.seconds >= since:
            if nodes is None or answer.node in nodes:
                return answer
    return None


def wait(what, predicate, timeout, interval=0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise SystemExit(f"timed out after {timeout:.0f} s waiting for {what}")


def plot(timeline: Timeline, t0: float, marks: dict, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = timeline.samples
    times = [s["t"] - t0 for s in samples]
    figure, axes = plt.subplots(4, 1, figsize=(10, 9), sharex=True)
    axes[0].plot(times, [s["answers"] for s in samples], label="2xx/s")
    axes[0].plot(times, [s["failed"] for s in samples], label="failed/s", color="red")
    axes[0].set_ylabel("answers per s")
    axes[0].legend(loc="upper right")
    axes[1].plot(times, [s["latency"] * 1000 if s["latency"] else None for s in samples])
    axes[1].set_ylabel("mean latency (ms)")
    axes[2].step(times, [s["replicas"] for s in samples], where="post")
    axes[2].set_ylabel(f"{timeline.service} replicas up")
    axes[3].step(times, [s["workers"] for s in samples], where="post", color="green")
    axes[3].set_ylabel("worker VMs")
    axes[3].set_xlabel("seconds since the load step (t0)")
    for name, at in marks.items():
        for axis in axes:
            axis.axvline(at - t0, color="grey", linestyle=":", linewidth=1)
        axes[0].annotate(name, (at - t0, 0), rotation=90, fontsize=7, va="bottom")
    figure.suptitle("mlfleet.serving autoscaler on the lab: a load step, replicas, a new VM, and back")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def process_tree_cpu(root: int) -> dict:
    """CPU seconds of the process tree under ``root`` so far: ``total`` (every live process's own CPU and what each
    reaped of its ended children, so the playbook runs that ended count) and ``rulebook`` (ansible-rulebook's own: the
    event sources, the rule engine's JVM)."""
    tick = os.sysconf("SC_CLK_TCK")
    processes = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        # After the command: state, ppid, ..., utime (14th field of stat), stime, cutime, cstime.
        own, reaped = (int(fields[11]) + int(fields[12])) / tick, (int(fields[13]) + int(fields[14])) / tick
        processes[int(entry.name)] = (int(fields[1]), own, reaped, command)
    tree, grown = {root}, True
    while grown:
        children = {pid for pid, (parent, *_rest) in processes.items() if parent in tree} - tree
        tree |= children
        grown = bool(children)
    live = [processes[pid] for pid in tree if pid in processes]
    return {
        "total": sum(own + reaped for _parent, own, reaped, _command in live),
        "rulebook": sum(own for _parent, own, _reaped, command in live if "ansible-rulebook" in command and "_supervise_runs" not in command),
    }


def first_sample_at_least(samples: list[dict], since: float, replicas: int) -> float | None:
    """When the proxy first had ``replicas`` servers of the service up, at or after ``since`` (monotonic)."""
    return next((s["t"] for s in samples if s["t"] >= since and s["replicas"] is not None and s["replicas"] >= replicas), None)


def decisions_report(events: list[dict], samples: list[dict], t0: float, wall_offset: float) -> list[str]:
    """One line per scale run: when the replica change was requested, the count the core desired and set, and how
    long until that many replicas were in rotation."""
    lines = []
    for event in sorted(events, key=lambda e: e["fields"].get("started_at", 0)):
        fields = event["fields"]
        started = fields.get("started_at", 0) - wall_offset
        requested = started + fields.get("plan_s", 0)
        line = (
            f"  {event['action']:<9} {event['decision']:<10} requested at t0{requested - t0:+7.1f} s: "
            f"{fields.get('replicas_before', -1)} → desired {fields.get('replicas_desired', -1)}, set {fields.get('replicas_target', -1)}"
        )
        target = fields.get("replicas_target", -1)
        if event["action"] == "scale_out" and event["decision"] == "acted" and target > 0:
            in_rotation = first_sample_at_least(samples, requested, target)
            line += f"; all {target} in rotation {in_rotation - requested:.1f} s after the request" if in_rotation else f"; {target} never all in rotation"
        if fields.get("workers_after", 0) != fields.get("workers_before", 0):
            line += f"; worker VMs {fields.get('workers_before')} → {fields.get('workers_after')}"
        lines.append(line)
    return lines


def phase_table(event: dict, t0: float, up_at: float | None, first: float | None) -> list[tuple[str, float]]:
    fields = event["fields"]
    received, started = fields.get("event_received_at", 0), fields.get("started_at", 0)
    wall_offset = time.time() - time.monotonic()
    rows = [("detection: load step → event source fires", received - (t0 + wall_offset)), ("dispatch: event → playbook starts", started - received)]
    rows.append(("plan: playbook start → plan made", fields.get("plan_s", 0)))
    if "replicas_s" in fields:
        rows.append(("replicas set and running (swarm_replicas)", fields["replicas_s"] - fields.get("plan_s", 0)))
    if "provision_s" in fields:
        rows.append(("VMs cloned, started, addressed", fields["provision_s"] - fields.get("plan_s", 0)))
    if "join_s" in fields:
        rows.append(("configured and joined (+ inventory refresh)", fields["join_s"] - fields.get("provision_s", fields.get("plan_s", 0))))
    if up_at is not None:
        rows.append(("playbook start → new task up in the proxy", up_at + wall_offset - started))
    if first is not None and up_at is not None:
        rows.append(("up in the proxy → first 2xx from it", first - up_at))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
    parser.add_argument("--service", default="resnet18")
    parser.add_argument("--clients", type=int, default=12)
    parser.add_argument("--png", type=Path, default=REPO_ROOT / "bench" / "autoscale_timeline.png")
    parser.add_argument("--max-seconds", type=float, default=1500)
    parser.add_argument("--samples", type=Path, help="also write the timeline's samples here (JSON)")
    args = parser.parse_args()

    lab = Lab()
    # Start from the minimum: the service at its minimum replicas and the pool at its minimum workers.
    minimum = {"services": {args.service: {"min": 2, "max": 8, "step": 8}}, "cooldown": {"scale_out": 0, "scale_in": 0, "scale_in_after_scale_out": 0},
               "stabilization": {"scale_in": 0}, "lease": {"path": str(lab.state / "autoscale.lease")}}  # fmt: skip
    run(["ansible-playbook", "-e", json.dumps({"mlfleet_autoscale": minimum, "scale_service": args.service}), "playbooks/scale_in.yml"], timeout=900)
    body = jpeg_body(7)
    env = {"MLFLEET_LAB_STATE": str(lab.state), "MLFLEET_LAB_GATEWAY": lab.gateway, "MLFLEET_LAB_NAME": lab.name}
    durations = DEFAULT_CONFIG["durations"]
    boot = durations["clone_full"] + durations["start"] + durations["boot_to_agent"]
    log = lab.state / "autoscale" / "bench-rulebook.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    timeline = Timeline(lab, args.service)
    marks = {}
    with Autoscaler(env, lab.state, None, SETTINGS, log) as autoscaler:
        print(f"autoscaler running (output: {autoscaler.log})")
        timeline.start()
        with Load(lab.endpoint, args.service, body.data, body.content_type, clients=1, max_requests=100000, max_seconds=args.max_seconds) as calm:
            timeline.loads.append(calm)
            calm.wait_for(lambda answers: len(answers) >= 20, 120, "a baseline")
            # Past the first idle window, so that the idle services' scale_in runs (no-ops at their minimum) are done
            # and the step meets an idle rulebook.
            time.sleep(SETTINGS["autoscale_pressure_in_for"] + 15)
            known = {a.task for a in calm.answers if a.task}
            workers_before = {n["vmid"] for n in swarm_nodes(timeline.manager) if n["role"] == "worker"}
            replicas_before = len(lab.servers_up(args.service))
            burst = Load(lab.endpoint, args.service, body.data, body.content_type, clients=args.clients, max_requests=100000, max_seconds=args.max_seconds)
            cpu_before = process_tree_cpu(autoscaler.process.pid)
            with burst:
                t0 = time.monotonic()
                marks["t0 load step"] = t0
                timeline.loads.append(burst)
                up_at = wait("a new replica up in the proxy", lambda: time.monotonic() if len(lab.servers_up(args.service)) > replicas_before else None, 300)
                first = wait("a 2xx from a new task", lambda: first_new_answer(burst, known, t0), 300)
                t1 = first.started + first.seconds
                marks["t1 fast path"] = t1
                # The run records its decision when it ends, after the new replicas run.
                fast_event = wait("the audit event of the first scale-out", lambda: next((e for e in audit_events(
                    lab.state, kind="scale", action="scale_out", decision="acted", service=args.service)
                    if e["fields"].get("started_at", 0) >= t0 + time.time() - time.monotonic()), None), 300)  # fmt: skip
                # The VM path: keep the load until a task on a new worker VM answers.
                new_workers = wait("a new worker VM in the swarm", lambda: {n["hostname"] for n in swarm_nodes(timeline.manager)
                                   if n["role"] == "worker" and n["vmid"] not in workers_before and n["status"] == "ready"}, 900)  # fmt: skip
                vm_first = wait("a 2xx from a task on the new VM", lambda: first_new_answer(burst, known, t0, new_workers), 900)
                t1_vm = vm_first.started + vm_first.seconds
                marks["t1 new VM"] = t1_vm
                vm_event = wait("the audit event of the scale-out that grew the pool", lambda: next((e for e in audit_events(
                    lab.state, kind="scale", action="scale_out", decision="acted", service=args.service)
                    if e["fields"].get("workers_after", 0) > e["fields"].get("workers_before", 0)
                    and e["fields"].get("started_at", 0) >= t0 + time.time() - time.monotonic()), None), 600)  # fmt: skip
            marks["load back to 1 client"] = time.monotonic()
            wait("the autoscaler back at its minimum", lambda: len(lab.servers_up(args.service)) <= replicas_before
                 and {n["vmid"] for n in swarm_nodes(timeline.manager) if n["role"] == "worker"} <= workers_before | set(), 900, interval=2)  # fmt: skip
            marks["back at the minimum"] = time.monotonic()
            cpu_after = process_tree_cpu(autoscaler.process.pid)
            time.sleep(5)
        timeline.stopping.set()
        timeline.join(timeout=10)
    wall_offset = time.time() - time.monotonic()
    requested = fast_event["fields"]["started_at"] + fast_event["fields"].get("plan_s", 0) - wall_offset
    print(f"\nload step to {args.clients} clients at t0; replica change requested at t0 + {requested - t0:.1f} s (target ≤ 6 s)")
    print(f"fast path t1 (first 2xx from a new task, cold replicas) = {t1 - t0:.1f} s")
    for name, seconds in phase_table(fast_event, t0, up_at, t1):
        print(f"  {name:<48} {seconds:6.1f} s")
    vm_started = vm_event["fields"]["event_received_at"] - wall_offset
    print(f"\nVM path: the event that grew the pool → first 2xx from a task on the new VM = {t1_vm - vm_started:.1f} s; "
          f"simulated VM boot {boot:.0f} s (clone {durations['clone_full']:.0f} + start {durations['start']:.0f} + guest agent "
          f"{durations['boot_to_agent']:.0f}); beyond the boot {t1_vm - vm_started - boot:.1f} s (target ≤ 60 s)")  # fmt: skip
    for name, seconds in phase_table(vm_event, vm_started, None, None)[1:]:
        print(f"  {name:<48} {seconds:6.1f} s")
    window = [e for e in audit_events(lab.state, kind="scale") if e["fields"].get("started_at", 0) >= t0 + wall_offset]
    runs = [e for e in window if not e.get("values", {}).get("suppressed")]
    suppressed = [e for e in audit_events(lab.state, kind="scale") if e.get("values", {}).get("suppressed") and e["time"] >= time.strftime(
        "%Y-%m-%dT%H:%M:%S", time.gmtime(t0 + wall_offset))]  # fmt: skip
    print(f"\nscale runs from t0 until back at the minimum: {len(runs)} (of {args.service}: "
          f"{len([e for e in runs if e.get('service') == args.service])}), of which not acted: {len([e for e in runs if e['decision'] == 'not_acted'])}; "
          f"decisions not to act that ran no playbook (serving_pressure's summaries): {sum(e['fields'].get('suppressed', 0) for e in suppressed)}")  # fmt: skip
    for line in decisions_report([e for e in runs if e.get("service") == args.service], timeline.samples, t0, wall_offset):
        print(line)
    spent = cpu_after["total"] - cpu_before["total"]
    rulebook = cpu_after["rulebook"] - cpu_before["rulebook"]
    seconds = marks["back at the minimum"] - t0
    print(f"control host CPU of the autoscaler from t0 until back at the minimum ({seconds:.0f} s): {spent:.1f} s; ansible-rulebook itself "
          f"(event sources, rule engine) {rulebook:.1f} s ({rulebook / seconds * 100:.1f}% of a core); the scale playbook runs "
          f"{spent - rulebook:.1f} s, {(spent - rulebook) / max(len(runs), 1):.1f} s per run (playbook start included)")  # fmt: skip
    answers = burst.answers + calm.answers
    failed = [a for a in answers if a.status != 200]
    print(f"\nrequests over the whole run: {len(answers)}, failed {len(failed)}; burst: {burst.summary()}; calm (through the scale-in): {calm.summary()}")
    plot(timeline, t0, marks, args.png)
    print(f"timeline: {args.png}")
    if args.samples:
        args.samples.write_text(json.dumps({"t0": t0, "marks": marks, "samples": timeline.samples}))


if __name__ == "__main__":
    main()
