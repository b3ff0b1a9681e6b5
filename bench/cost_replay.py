"""Replay a compressed version of the dissertation's day through the autoscaler and count what it costs.

The dissertation's day: 18 h of low load that 2 workers carry and 6 h of peak that needs 4 (ideal saving against 4
workers all day: 1 - (18 x 2 + 6 x 4) / (24 x 4) = 37.5%). Here the day runs as low 9 h, peak 6 h, low 9 h, each
divided by --compression, with open-loop arrivals at --rate-low / --rate-peak requests per second (a user does not
wait for the previous answer before sending), through the edge proxy to one model.

    . scripts/_env.sh
    python bench/capacity.py deploy --workers 4
    python bench/cost_replay.py baseline --rate 14 --workers 4 3 2 --seconds 120   # fixed pools at the peak rate
    python bench/cost_replay.py baseline --rate 5 --workers 2 --seconds 120        # and at the low rate
    python bench/cost_replay.py replay --compression 48 --rate-low 5 --rate-peak 14 --baseline-peak 4 --baseline-low 2
    python bench/cost_replay.py report                                             # figures and the plot

- baseline: N replicas on N workers (as bench/capacity.py fixed), --seconds of arrivals at --rate; prints the p95 of
  every --window and whether all of them hold --p95-target. The smallest N that holds it at the peak rate is the
  baseline the replay's cost is compared with; the smallest at the low rate gives the trace's ideal saving.
- replay: the pool starts at 2 workers (the collection's scale-in, as bench/capacity.py dynamic), the autoscaler runs
  with the rulebook's windows divided by --compression where the scaled value is at least the rulebook's floor
  (printed), and the node list is sampled every second. Worker-seconds = the sum over the samples of the ready, active
  workers; the saving is 1 - worker-seconds / (baseline-peak x the replay's length). It also counts every worker VM
  from its clone to its destruction (the VM list, every 5 s), joined or not: what a bill counts. p95 is checked per
  --window.

Every request is bounded: at most --max-in-flight wait at once (an arrival beyond that is not sent and counted apart
from the lab's failures, so an overloaded lab cannot pile up unbounded work), and a request gives up after
--request-timeout seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import ssl
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import capacity  # noqa: E402

# (phase, hours): the dissertation's 18 h low and 6 h peak, the peak in the middle of the day.
DAY = (("low", 9.0), ("peak", 6.0), ("low", 9.0))
# The rulebook's serving_pressure windows (extensions/eda/rulebooks/autoscale.yml defaults, seconds) and the shortest
# each may be scaled to: the event source polls the proxy every 2 s, so a window needs a few polls.
PRESSURE_WINDOWS = {"out_for": (6, 4), "in_for": (60, 10), "repeat_after": (30, 10), "in_repeat_after": (300, 20)}
# With --schedule-lead: seconds from the autoscaler's start to the first arrival, so that the schedule's windows can be
# set in wall-clock time before the rulebook starts (it starts and listens within about 20 s here).
SCHEDULE_START_DELAY = 75
# With --schedule-lead: seconds between the events of the scheduled window (the source's repeat_after, at least 10).
SCHEDULE_REPEAT_AFTER = 30
# The error of an arrival the client did not send because --max-in-flight requests were already waiting.
NOT_SENT = "client in-flight cap"


def schedule(compression: float, rate_low: float, rate_peak: float) -> list[tuple[float, str]]:
    """Arrival times (seconds from the start) and the phase of each, evenly spaced within a phase."""
    arrivals, start = [], 0.0
    for phase, hours in DAY:
        length = hours * 3600 / compression
        rate = rate_peak if phase == "peak" else rate_low
        count = int(length * rate)
        arrivals += [(start + i / rate, phase) for i in range(count)]
        start += length
    return arrivals


def scaled_windows(compression: float) -> dict[str, float]:
    return {f"autoscale_pressure_{name}": max(floor, default / compression) for name, (default, floor) in PRESSURE_WINDOWS.items()}


async def _open_loop(
    lab: capacity.Lab, model: str, arrivals: list[tuple[float, str]], max_in_flight: int, request_timeout: float, start_at: float | None = None
) -> list[tuple]:
    import aiohttp

    if start_at is not None:
        late = time.time() - start_at
        if late > 0:
            raise SystemExit(f"the replay was to start at {start_at:.0f} (the schedule's windows follow from it), {late:.1f} s ago; raise SCHEDULE_START_DELAY")
        await asyncio.sleep(start_at - time.time())

    url, token, ca_file = lab.endpoint()
    body = capacity.jpeg_body(0).data
    context = ssl.create_default_context(cafile=ca_file)
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "image/jpeg"}
    records: list[tuple] = []
    in_flight = 0
    timeout = aiohttp.ClientTimeout(total=request_timeout)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=max_in_flight, ssl=context), timeout=timeout) as session:

        async def one(phase: str):
            nonlocal in_flight
            started = time.time()
            if in_flight >= max_in_flight:
                records.append((round(started, 3), 0.0, 0, NOT_SENT, phase))
                return
            in_flight += 1
            try:
                status, error = await capacity.predict(session, f"{url}/predictions/{model}", body, headers)
            finally:
                in_flight -= 1
            records.append((round(started, 3), round(time.time() - started, 4), status, error, phase))

        loop = asyncio.get_running_loop()
        begin = loop.time()
        tasks = []
        for offset, phase in arrivals:
            delay = begin + offset - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(phase)))
        await asyncio.gather(*tasks)
    return records


def windows(records: list[tuple], window: float) -> list[dict]:
    """p95 of the answers that started in each window, and the failures in it."""
    start = min(r[0] for r in records)
    buckets: dict[int, list[tuple]] = {}
    for record in records:
        buckets.setdefault(int((record[0] - start) // window), []).append(record)
    result = []
    for index in sorted(buckets):
        items = buckets[index]
        ok = [r[1] for r in items if r[2] == 200]
        not_sent = sum(1 for r in items if r[3] == NOT_SENT)
        result.append({"from_s": index * window, "requests": len(items), "failed": len(items) - len(ok), "not_sent": not_sent,
                       "p95_s": round(capacity.percentile(ok, 95), 3) if ok else None, "phase": items[0][4]})  # fmt: skip
    return result


def held(per_window: list[dict], target: float) -> bool:
    return all(w["failed"] == 0 and w["p95_s"] is not None and w["p95_s"] <= target for w in per_window)


def outcome(records: list[tuple]) -> dict:
    """capacity.summarize's figures, with the failures split: not sent by the client (its in-flight bound) and failed
    at the lab (an error status, a timeout, a refused connection)."""
    not_sent = sum(1 for r in records if r[3] == NOT_SENT)
    summary = capacity.summarize(records)
    return summary | {"not_sent": not_sent, "failed_at_lab": summary["failed"] - not_sent}


def save(name: str, result: dict, records: list[tuple], samples: list[dict]):
    capacity.save(result, records, samples, name=name, directory="cost-replay", jsonl="cost_replay.jsonl")


def baseline(lab: capacity.Lab, args):
    for workers in args.workers:
        lab.settle(args.model, workers)
        capacity.warm_up(lab, args.model, workers)
        arrivals = [(i / args.rate, "baseline") for i in range(int(args.seconds * args.rate))]
        started = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        records = asyncio.run(_open_loop(lab, args.model, arrivals, args.max_in_flight, args.request_timeout))
        per_window = windows(records, args.window)
        result = {"kind": "baseline", "model": args.model, "workers": workers, "rate": args.rate, "seconds": args.seconds,
                  "p95_target_s": args.p95_target, "held": held(per_window, args.p95_target), "windows": per_window,
                  "window_s": args.window, "cpulimit": lab.cpulimit, "commit": capacity.commit(), "started": started} | outcome(records)  # fmt: skip
        save(f"baseline-{args.model}-{workers}", result, records, [])
        worst = max((w["p95_s"] or float("inf")) for w in per_window)
        print(f"baseline {args.model} {workers} workers at {args.rate} req/s: worst window p95 {worst:.2f} s, "
              f"{result['failed']} failed, target {args.p95_target} s {'held' if result['held'] else 'NOT held'}", flush=True)  # fmt: skip


def peak_schedule(args, start_at: float) -> dict:
    """The rulebook variables of a scale_schedule window over the replay's peak, the first arrival at ``start_at``."""
    offset = 0.0
    for phase, hours in DAY:
        length = hours * 3600 / args.compression
        if phase == "peak":
            peak_start, peak_end = start_at + offset, start_at + offset + length
            break
        offset += length

    def clock(epoch: float) -> str:
        return datetime.fromtimestamp(epoch, UTC).strftime("%H:%M:%S")

    entry = {"name": "replay peak", "service": args.model, "replicas": args.schedule_replicas or args.baseline_peak,
             "start": clock(peak_start), "end": clock(peak_end)}  # fmt: skip
    return {
        "autoscale_schedule": [entry],
        "autoscale_schedule_timezone": "UTC",
        "autoscale_schedule_lead": args.schedule_lead,
        "autoscale_schedule_repeat_after": SCHEDULE_REPEAT_AFTER,
    }


def replay(lab: capacity.Lab, args):
    # Grow and shrink by the 2 workers the peak needs (bench/capacity/inventory_overrides.yml reads the step).
    os.environ["MLFLEET_BENCH_STEP"] = str(args.step)
    capacity.shrink_pool(lab, args.model, 2)
    lab.settle(args.model, 2)
    capacity.warm_up(lab, args.model, 2)
    arrivals = schedule(args.compression, args.rate_low, args.rate_peak)
    settings = scaled_windows(args.compression)
    length = sum(hours for _phase, hours in DAY) * 3600 / args.compression
    print(f"replay: {len(arrivals)} requests over {length:.0f} s (compression {args.compression}); rulebook windows {settings}", flush=True)
    start_at, scheduled = None, {}
    if args.schedule_lead is not None:
        start_at = float(int(time.time() + SCHEDULE_START_DELAY))
        scheduled = peak_schedule(args, start_at)
        print(f"replay: first arrival at {datetime.fromtimestamp(start_at, UTC):%H:%M:%S} UTC; schedule {scheduled}", flush=True)
    managers = lab.manager_vmids(lab.nodes())
    started = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    audit_from = time.time()
    with capacity.Autoscaler(lab.env(2), lab.state, lab.inventory, settings | scheduled, lab.state / "bench" / "autoscaler.log"):
        sampler = capacity.Sampler(lab, args.model)
        sampler.start()
        records = asyncio.run(_open_loop(lab, args.model, arrivals, args.max_in_flight, args.request_timeout, start_at))
        sampler.stop()
    capacity.wait_for_autoscaler_runs(lab)
    scale = capacity.scale_events_since(audit_from, lab.state, keys=("time", "action", "decision", "reason"))
    samples = [s for s in sampler.samples if "workers" in s]
    worker_seconds = sum(len(s["workers"]) * (b["t"] - s["t"]) for s, b in zip(samples, samples[1:], strict=False))
    # What a cloud bill counts: a worker VM costs from its clone to its destruction, joined to the swarm or not.
    vm_seconds = sum(len(set(s["vms"]) - managers) * (b["t"] - s["t"]) for s, b in zip(sampler.samples, sampler.samples[1:], strict=False))
    measured = samples[-1]["t"] - samples[0]["t"]
    baseline_seconds = args.baseline_peak * measured
    ideal_hours = sum(hours * (args.baseline_low if phase == "low" else args.baseline_peak) for phase, hours in DAY)
    ideal_saving = 1 - ideal_hours / (24 * args.baseline_peak)
    per_window = windows(records, args.window)
    result = {
        "kind": "replay", "model": args.model, "compression": args.compression, "rate_low": args.rate_low, "rate_peak": args.rate_peak,
        "rulebook_windows": settings, "schedule": scheduled, "p95_target_s": args.p95_target, "held": held(per_window, args.p95_target),
        "windows": per_window, "window_s": args.window, "manager_vmids": sorted(managers),
        "windows_not_held": [w for w in per_window if not held([w], args.p95_target)], "worker_seconds": round(worker_seconds, 1),
        "baseline_worker_seconds": round(baseline_seconds, 1), "saving": round(1 - worker_seconds / baseline_seconds, 4),
        "worker_vm_seconds": round(vm_seconds, 1), "saving_vm": round(1 - vm_seconds / baseline_seconds, 4), "replay_s": round(measured, 1),
        **scale,
        "ideal_saving": round(ideal_saving, 4), "cpulimit": lab.cpulimit, "commit": capacity.commit(), "started": started,
        "template_images": lab.template_images(),
    } | outcome(records)  # fmt: skip
    save(f"replay-{args.model}", result, records, sampler.samples)
    verdict = "held in every window" if result["held"] else f"NOT held in {len(result['windows_not_held'])} of {len(per_window)} windows"
    print(
        f"replay {args.model}: {worker_seconds:.0f} worker-seconds in the swarm against {baseline_seconds:.0f} for {args.baseline_peak} fixed "
        f"workers: saving {100 * result['saving']:.1f}% ({100 * result['saving_vm']:.1f}% counting every worker VM from clone to destroy; "
        f"ideal {100 * ideal_saving:.1f}%, target within 3 points); p95 target {args.p95_target} s "
        f"{verdict}; {result['failed_at_lab']} failed at the lab, {result['not_sent']} not sent (client bound {args.max_in_flight} in flight)",
        flush=True,
    )


def load_results() -> list[dict]:
    path = capacity.RESULTS / "cost_replay.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def plot_replay(run: dict, path: Path):
    """Worker VMs, swarm workers and replicas over the replay, the phases shaded, and the p95 of every window."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    detail = json.loads((capacity.REPO_ROOT / run["detail"]).read_text())
    samples = [s for s in detail["samples"] if "workers" in s]
    start = min(r[0] for r in detail["requests"])
    figure, (pool, latency) = plt.subplots(2, 1, figsize=(10, 6.5), sharex=True)
    phase_start = 0.0
    for phase, hours in DAY:
        length = hours * 3600 / run["compression"]
        if phase == "peak":
            for axis in (pool, latency):
                axis.axvspan(phase_start, phase_start + length, color="#f2e2c4", linewidth=0)
        phase_start += length
    times = [s["t"] - start for s in samples]
    managers = set(map(str, run["manager_vmids"]))
    pool.step(times, [len(set(s["vms"]) - managers) for s in samples], where="post", color="#c44e52", label="worker VMs (cloned, not destroyed)")
    pool.step(times, [len(s["workers"]) for s in samples], where="post", color="#dd8452", label="ready, active swarm workers")
    pool.step(times, [s.get("replicas", 0) for s in samples], where="post", color="#4c72b0", linestyle="--", label="running replicas")
    pool.set_ylabel("count")
    pool.set_ylim(0, 7)
    pool.legend(loc="upper left")
    pool.set_title(f"{run['model']}: the dissertation's day compressed {run['compression']:g}x (peak shaded), "
                   f"{run['rate_low']:g} / {run['rate_peak']:g} req/s")  # fmt: skip
    centres = [w["from_s"] + run["window_s"] / 2 for w in run["windows"]]
    latency.plot(centres, [w["p95_s"] if w["p95_s"] is not None else float("nan") for w in run["windows"]], marker="o", color="#4c72b0", label="p95 per window")
    latency.axhline(run["p95_target_s"], color="#c44e52", linestyle=":", label=f"target {run['p95_target_s']} s")
    latency.set_yscale("log")
    latency.set_ylabel("p95 latency (s)")
    latency.set_xlabel("seconds since the first request")
    latency.legend(loc="upper left")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def report(_lab, _args):
    results = load_results()
    for run in (r for r in results if r["kind"] == "baseline"):
        worst = max((w["p95_s"] or float("inf")) for w in run["windows"])
        print(f"baseline {run['model']:12} {run['workers']} workers at {run['rate']:5.1f} req/s for {run['seconds']:.0f} s: p95 {run['p95_s']:7.2f} s, "
              f"worst {run['window_s']:.0f}-s window {worst:7.2f} s, {run['failed']} failed: "
              f"target {run['p95_target_s']} s {'held' if run['held'] else 'NOT held'}")  # fmt: skip
    replays = [r for r in results if r["kind"] == "replay"]
    for run in replays:
        print(f"replay {run['model']} compression {run['compression']:g}, {run['requests']} requests ({run['failed_at_lab']} failed at the lab, "
              f"{run['not_sent']} not sent): "
              f"saving {100 * run['saving']:.1f}% in swarm worker-seconds, {100 * run['saving_vm']:.1f}% in worker VM-seconds, ideal "
              f"{100 * run['ideal_saving']:.1f}%; p95 target {run['p95_target_s']} s missed in {len(run['windows_not_held'])} of "
              f"{len(run['windows'])} windows; {run['scale_runs_not_acted']} scale runs did not act"
              + (f" ({', '.join(f'{why} {count}' for why, count in run['not_acted_because'].items())})" if "not_acted_because" in run else "")
              + (f"; golden template with {', '.join(run['template_images'])}" if run.get("template_images") else "")
              + f"; commit {run['commit']}")  # fmt: skip
    if replays:
        path = capacity.REPO_ROOT / "bench" / f"cost_replay_{replays[-1]['model']}.png"
        plot_replay(replays[-1], path)
        print(f"wrote {path.relative_to(capacity.REPO_ROOT)}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
    parser.add_argument("--cpulimit", type=float, default=float(os.environ.get("MLFLEET_BENCH_CPULIMIT", "0.25")))
    parser.add_argument("--model", choices=capacity.MODELS, default="resnet18")
    parser.add_argument("--p95-target", type=float, default=2.0, help="seconds")
    parser.add_argument("--window", type=float, default=30.0, help="seconds per p95 window")
    parser.add_argument("--max-in-flight", type=int, default=800, help="below the edge proxy's maxconn (1000)")
    parser.add_argument("--request-timeout", type=float, default=300.0)
    commands = parser.add_subparsers(dest="command", required=True)
    base = commands.add_parser("baseline")
    base.add_argument("--rate", type=float, required=True, help="requests per second")
    base.add_argument("--workers", type=int, nargs="+", default=[2, 3, 4, 5, 6])
    base.add_argument("--seconds", type=float, default=180)
    day = commands.add_parser("replay")
    day.add_argument("--compression", type=float, default=48)
    day.add_argument("--rate-low", type=float, required=True)
    day.add_argument("--rate-peak", type=float, required=True)
    day.add_argument("--baseline-peak", type=int, required=True, help="smallest fixed workers that hold the p95 target at the peak rate")
    day.add_argument("--baseline-low", type=int, required=True, help="the same at the low rate")
    day.add_argument("--step", type=int, default=2, help="replicas and worker VMs added or removed per scale action")
    day.add_argument(
        "--schedule-lead",
        type=float,
        default=None,
        help="seconds: also ask the autoscaler's scale_schedule source for the peak's replicas this long before the peak (default: no schedule)",
    )
    day.add_argument("--schedule-replicas", type=int, default=None, help="the scheduled floor of replicas (default: --baseline-peak)")
    commands.add_parser("report", help="print the recorded results and draw the latest replay")
    args = parser.parse_args()
    if args.command == "report":
        report(None, args)
        return 0
    if os.geteuid() != 0:
        sys.exit("run as root: the lab's Docker daemon and the containers' cgroups")
    lab = capacity.Lab(args.cpulimit)
    {"baseline": baseline, "replay": replay}[args.command](lab, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
