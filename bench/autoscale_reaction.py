"""How fast the autoscaler reacts to a load step on the lab, phase by phase, with and without standby replicas.

Needs the lab that ``scripts/site`` deployed (the default lab, or MLFLEET_LAB_* as for lab/up.sh). For each count of
``--warm-replicas`` (default 0 and 1) it deploys the service with that many standby replicas (``serve.yml`` with a copy
of the lab inventory), starts the autoscaler as a user does (``scripts/autoscale``: the real ansible-rulebook, the
serving_pressure fast path, the scale playbooks), then:

1. light load (1 client) for a baseline, then a step to ``--clients`` clients at t0;
2. t1 = the first 2xx answered by a task that did not answer before t0 (the proxy's X-MLfleet-Task header), a lent
   standby replica included: the reaction, split into its phases from the audit trail and the proxy's stats:
   detection (t0 → the event source fires), dispatch (→ the playbook starts), promotion of the standby replicas or
   the plan and the replica request, the new task up in the proxy, first answer; and the first 2xx from a new
   replica of the service itself (cold);
3. unless ``--no-vm``: the load stays until replicas no longer fit and a new worker VM serves: t1 of the VM path,
   from the event that decided to grow the pool to the first 2xx from a task on the new VM, with the simulator's
   boot time stated;
4. back to 1 client until the autoscaler is back at its minimum (scale-in, every request counted).

Prints the figures of each, then side by side, and writes a PNG timeline for each (load, latency, replicas in
rotation, standby replicas lent and waiting, worker VMs). Every load is bounded in requests and seconds; traffic goes
only to the lab's own edge proxy. At the end the lab is deployed as its inventory says again.

    . scripts/_env.sh && python bench/autoscale_reaction.py [--clients 12] [--warm-replicas 0 1] [--no-vm]
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
import yaml

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

    def servers(self, backend, prefix):
        """The backend's servers up in the proxy whose names start with ``prefix`` (task: its own, standby: standby)."""
        response = requests.get(f"https://{self.manager_address}:8404/stats;csv", headers={"Authorization": f"Bearer {self.stats_token}"},
                                verify=self.endpoint.ca_file, timeout=10)  # fmt: skip
        response.raise_for_status()
        header, *rows = response.text.lstrip("# ").splitlines()
        names = header.split(",")
        servers = (dict(zip(names, row.split(","), strict=False)) for row in rows)
        return [r for r in servers if r["pxname"] == backend and r["svname"].startswith(prefix) and r["status"] == "UP"]

    def servers_up(self, backend):
        return self.servers(backend, "task")

    def inventory(self, service, warm_replicas):
        """A copy of the lab inventory whose ``service`` keeps ``warm_replicas`` standby replicas, with absolute paths
        as scripts/autoscale makes it, for serve.yml and the autoscaler's playbooks."""
        directory = self.state / "autoscale" / f"bench-inventory-warm{warm_replicas}"
        (directory / "group_vars").mkdir(parents=True, exist_ok=True)
        settings = yaml.safe_load((REPO_ROOT / "inventories" / "lab" / "group_vars" / "all.yml").read_text())
        settings["mlfleet_serving"] = [
            {**entry, "warm_replicas": warm_replicas} if entry["service"] == service else entry for entry in settings["mlfleet_serving"]
        ]
        (directory / "group_vars" / "all.yml").write_text(yaml.safe_dump(settings))
        proxmox = yaml.safe_load((REPO_ROOT / "inventories" / "lab" / "proxmox.yml").read_text())
        proxmox |= {"ca_path": str(self.state / "pvesim" / "ca.pem"), "api_port": int(os.environ.get("MLFLEET_LAB_PVE_PORT", "8006"))}
        (directory / "proxmox.yml").write_text(yaml.safe_dump(proxmox))
        return directory


class Timeline(threading.Thread):
    """Samples every second: answers and latency of the loads, replicas up in the proxy, worker VMs in the swarm (active,
    and the warm VMs of the joined form: ready and paused)."""

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
                standby = self.lab.servers(self.service, "standby")
                lent = len([r for r in standby if r["weight"] != "0"])
                standby = len(standby) - lent
                ready = [n for n in swarm_nodes(self.manager) if n["role"] == "worker" and n["status"] == "ready"]
                workers = len([n for n in ready if n["availability"] == "active"])
                warm = len([n for n in ready if n["availability"] == "pause"])
            except Exception:  # noqa: BLE001 - a missed sample is a gap in the plot, not a failed run
                replicas = workers = standby = lent = warm = None
            ok = [a for a in answers if a.status == 200]
            latency = sum(a.seconds for a in ok) / len(ok) if ok else None
            sample = {"t": now, "answers": len(ok), "failed": len(answers) - len(ok), "latency": latency, "replicas": replicas}
            self.samples.append(sample | {"standby": standby, "lent": lent, "workers": workers, "warm": warm})
            self.stopping.wait(max(0.0, 1.0 - (time.monotonic() - now)))


def first_new_answer(load: Load, known_tasks: set, since: float, nodes: set | None = None, own_service: str | None = None):
    """The first 2xx since ``since`` from a task not in ``known_tasks``: on one of ``nodes``, of ``own_service``'s
    own tasks (``<service>.<slot>.<id>``, not its standby service's) when given."""
    for answer in sorted(list(load.answers), key=lambda a: a.started + a.seconds):
        if answer.status == 200 and answer.task and answer.task not in known_tasks and answer.started + answer.seconds >= since:
            if (nodes is None or answer.node in nodes) and (own_service is None or answer.task.startswith(f"{own_service}.")):
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


def plot(timeline: Timeline, t0: float, marks: dict, path: Path, title="mlfleet.serving autoscaler on the lab: a load step, replicas, a new VM, and back"):
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
    axes[2].step(times, [s["replicas"] for s in samples], where="post", label="own replicas in rotation")
    axes[2].step(times, [s.get("lent") for s in samples], where="post", label="standby lent (in rotation)", color="orange")
    axes[2].step(times, [s.get("standby") for s in samples], where="post", label="standby (weight 0)", color="grey", linestyle="--")
    axes[2].set_ylabel(f"{timeline.service} replicas up")
    axes[2].legend(loc="upper right", fontsize=7)
    axes[3].step(times, [s["workers"] for s in samples], where="post", color="green", label="active workers")
    axes[3].step(times, [s.get("warm") for s in samples], where="post", color="purple", linestyle="--", label="warm VMs in the swarm (paused)")
    axes[3].set_ylabel("worker VMs")
    axes[3].legend(loc="upper right", fontsize=7)
    axes[3].set_xlabel("seconds since the load step (t0)")
    for name, at in marks.items():
        for axis in axes:
            axis.axvline(at - t0, color="grey", linestyle=":", linewidth=1)
        axes[0].annotate(name, (at - t0, 0), rotation=90, fontsize=7, va="bottom")
    figure.suptitle(title)
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


def cycle(lab: Lab, args, warm: int, env: dict, boot: float) -> dict:
    """One load step with the service keeping ``warm`` standby replicas: deploy that, step, measure, back to calm."""
    inventory = lab.inventory(args.service, warm)
    print(f"\n=== {args.service} with warm_replicas: {warm} (serve.yml deploys it)", flush=True)
    run(["ansible-playbook", "-i", str(inventory), "playbooks/serve.yml"], timeout=1800)
    # Start from the minimum: the service at its minimum replicas and the pool at its minimum workers.
    minimum = {"services": {args.service: {"min": 2, "max": 8, "step": 8}}, "cooldown": {"scale_out": 0, "scale_in": 0, "scale_in_after_scale_out": 0},
               "stabilization": {"scale_in": 0}, "lease": {"path": str(lab.state / "autoscale.lease")}}  # fmt: skip
    run(["ansible-playbook", "-i", str(inventory), "-e", json.dumps({"mlfleet_autoscale": minimum, "scale_service": args.service}), "playbooks/scale_in.yml"],
        timeout=900)  # fmt: skip
    body = jpeg_body(7)
    log = lab.state / "autoscale" / f"bench-rulebook-warm{warm}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    timeline = Timeline(lab, args.service)
    marks = {}
    result = {"warm": warm}
    with Autoscaler(env, lab.state, inventory, SETTINGS, log) as autoscaler:
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
                # Added capacity: any task that did not answer before t0, a lent standby replica included.
                first = wait("a 2xx from added capacity", lambda: first_new_answer(burst, known, t0), 300)
                t1 = first.started + first.seconds
                marks["t1 added capacity"] = t1
                up_at = wait("a new replica up in the proxy", lambda: time.monotonic() if len(lab.servers_up(args.service)) > replicas_before else None, 300)
                own = wait("a 2xx from a new replica of the service", lambda: first_new_answer(burst, known, t0, own_service=args.service), 300)
                t1_own = own.started + own.seconds
                if t1_own != t1:
                    marks["t1 new replica"] = t1_own
                # The run records its decision when it ends, after the new replicas run.
                fast_event = wait("the audit event of the first scale-out", lambda: next((e for e in audit_events(
                    lab.state, kind="scale", action="scale_out", decision="acted", service=args.service)
                    if e["fields"].get("started_at", 0) >= t0 + time.time() - time.monotonic()), None), 300)  # fmt: skip
                if not args.no_vm:
                    # The VM path: keep the load until a task on a new worker VM answers.
                    new_workers = wait("a new worker VM in the swarm", lambda: {n["hostname"] for n in swarm_nodes(timeline.manager)
                                       if n["role"] == "worker" and n["vmid"] not in workers_before and n["status"] == "ready"}, 900)  # fmt: skip
                    vm_first = wait("a 2xx from a task on the new VM", lambda: first_new_answer(burst, known, t0, new_workers), 900)
                    result["t1_vm"] = vm_first.started + vm_first.seconds
                    marks["t1 new VM"] = result["t1_vm"]
                    result["vm_event"] = wait("the audit event of the scale-out that grew the pool", lambda: next((e for e in audit_events(
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
    result.update(t0=t0, t1=t1, t1_own=t1_own, up_at=up_at, first_task=first.task, fast_event=fast_event, burst=burst, calm=calm,
                  timeline=timeline, marks=marks, cpu=(cpu_before, cpu_after))  # fmt: skip
    report(lab, args, result, boot)
    png = args.png.with_name(f"{args.png.stem}-warm{warm}{args.png.suffix}") if len(args.warm_replicas) > 1 else args.png
    plot(timeline, t0, marks, png)
    print(f"timeline: {png}")
    return result


def report(lab: Lab, args, result: dict, boot: float):
    t0, t1, fast_event = result["t0"], result["t1"], result["fast_event"]
    wall_offset = time.time() - time.monotonic()
    fields = fast_event["fields"]
    requested = fields["started_at"] + fields.get("plan_s", 0) - wall_offset
    print(f"\nload step to {args.clients} clients at t0; replica change requested at t0 + {requested - t0:.1f} s")
    print(f"t1, first 2xx from added capacity ({result['first_task']}) = {t1 - t0:.1f} s (target with standby ≤ 10 s); "
          f"first 2xx from a new replica of the service = {result['t1_own'] - t0:.1f} s")  # fmt: skip
    for name, seconds in phase_table(fast_event, t0, result["up_at"], result["t1_own"]):
        print(f"  {name:<48} {seconds:6.1f} s")
    if "standby_s" in fields:
        promoted = fields["started_at"] + fields["standby_s"] - wall_offset
        print(f"  {'promotion: playbook start → standby in rotation':<48} {fields['standby_s']:6.1f} s")
        print(f"  {'standby in rotation → first 2xx from it':<48} {t1 - promoted:6.1f} s")
        if "standby_return_s" in fields:
            print(f"  {'standby back to weight 0 at playbook start +':<48} {fields['standby_return_s']:6.1f} s")
    if "vm_event" in result:
        vm_started = result["vm_event"]["fields"]["event_received_at"] - wall_offset
        durations = DEFAULT_CONFIG["durations"]
        print(f"\nVM path: the event that grew the pool → first 2xx from a task on the new VM = {result['t1_vm'] - vm_started:.1f} s; "
              f"simulated VM boot {boot:.0f} s (clone {durations['clone_full']:.0f} + start {durations['start']:.0f} + guest agent "
              f"{durations['boot_to_agent']:.0f}); beyond the boot {result['t1_vm'] - vm_started - boot:.1f} s")  # fmt: skip
        for name, seconds in phase_table(result["vm_event"], vm_started, None, None)[1:]:
            print(f"  {name:<48} {seconds:6.1f} s")
    window = [e for e in audit_events(lab.state, kind="scale") if e["fields"].get("started_at", 0) >= t0 + wall_offset]
    runs = [e for e in window if not e.get("values", {}).get("suppressed")]
    suppressed = [e for e in audit_events(lab.state, kind="scale") if e.get("values", {}).get("suppressed") and e["time"] >= time.strftime(
        "%Y-%m-%dT%H:%M:%S", time.gmtime(t0 + wall_offset))]  # fmt: skip
    print(f"\nscale runs from t0 until back at the minimum: {len(runs)} (of {args.service}: "
          f"{len([e for e in runs if e.get('service') == args.service])}), of which not acted: {len([e for e in runs if e['decision'] == 'not_acted'])}; "
          f"decisions not to act that ran no playbook (serving_pressure's summaries): {sum(e['fields'].get('suppressed', 0) for e in suppressed)}")  # fmt: skip
    for line in decisions_report([e for e in runs if e.get("service") == args.service], result["timeline"].samples, t0, wall_offset):
        print(line)
    cpu_before, cpu_after = result["cpu"]
    spent = cpu_after["total"] - cpu_before["total"]
    rulebook = cpu_after["rulebook"] - cpu_before["rulebook"]
    seconds = result["marks"]["back at the minimum"] - t0
    print(f"control host CPU of the autoscaler from t0 until back at the minimum ({seconds:.0f} s): {spent:.1f} s; ansible-rulebook itself "
          f"(event sources, rule engine) {rulebook:.1f} s ({rulebook / seconds * 100:.1f}% of a core); the scale playbook runs "
          f"{spent - rulebook:.1f} s, {(spent - rulebook) / max(len(runs), 1):.1f} s per run (playbook start included)")  # fmt: skip
    answers = result["burst"].answers + result["calm"].answers
    result["failed"] = len([a for a in answers if a.status != 200])
    result["requests"] = len(answers)
    print(f"\nrequests over the whole run: {len(answers)}, failed {result['failed']}; burst: {result['burst'].summary()}; "
          f"calm (through the scale-in): {result['calm'].summary()}")  # fmt: skip


def side_by_side(results: list[dict]):
    wall_offset = time.time() - time.monotonic()
    rows = []
    for result in results:
        fields = result["fast_event"]["fields"]
        t0 = result["t0"]
        rows.append({
            "load step → first 2xx from added capacity": result["t1"] - t0,
            "  detection (→ event source fires)": fields.get("event_received_at", 0) - (t0 + wall_offset),
            "  dispatch (→ playbook starts)": fields.get("started_at", 0) - fields.get("event_received_at", 0),
            "  playbook start → standby in rotation": fields.get("standby_s"),
            "  playbook start → replica change requested": fields.get("plan_s"),
            "load step → first 2xx from a new own replica": result["t1_own"] - t0,
            "requests (failed)": f"{result['requests']} ({result['failed']})",
        })  # fmt: skip
    print("\nside by side, one run on one lab:")
    print(f"  {'':<48}" + "".join(f"{'warm_replicas ' + str(r['warm']):>18}" for r in results))
    for name in rows[0]:
        cells = [row[name] for row in rows]
        print(f"  {name:<48}" + "".join(f"{'-' if c is None else (f'{c:.1f} s' if isinstance(c, float) else str(c)):>18}" for c in cells))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
    parser.add_argument("--service", default="resnet18")
    parser.add_argument("--clients", type=int, default=12)
    parser.add_argument("--warm-replicas", type=int, nargs="+", default=[0, 1],
                        help="standby replicas of the service, one load step each, printed side by side (default: 0 1)")  # fmt: skip
    parser.add_argument("--no-vm", action="store_true", help="end each step once the replica path is measured, without waiting for a new VM")
    parser.add_argument("--png", type=Path, default=REPO_ROOT / "bench" / "autoscale_timeline.png")
    parser.add_argument("--max-seconds", type=float, default=1500)
    args = parser.parse_args()

    lab = Lab()
    env = {"MLFLEET_LAB_STATE": str(lab.state), "MLFLEET_LAB_GATEWAY": lab.gateway, "MLFLEET_LAB_NAME": lab.name}
    durations = DEFAULT_CONFIG["durations"]
    boot = durations["clone_full"] + durations["start"] + durations["boot_to_agent"]
    results = [cycle(lab, args, warm, env, boot) for warm in args.warm_replicas]
    if len(results) > 1:
        side_by_side(results)
    # Leave the lab as its inventory deploys it.
    run(["ansible-playbook", "playbooks/serve.yml"], timeout=1800)


if __name__ == "__main__":
    main()
