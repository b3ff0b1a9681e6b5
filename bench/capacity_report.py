"""Tables and plots of bench/capacity.py's results, beside the dissertation's Table 5.1.

    python bench/capacity.py report

Reads bench/results/capacity.jsonl (one line per run) and prints, per model and scenario, the median and the spread
(min-max) over the repeats of total time, throughput, p50/p95/p99 latency and failed requests, the cores used outside
the serving workers, then the scaling efficiency (throughput 4 vs 2 and 6 vs 2 workers) and dynamic vs fixed-4.
Writes bench/capacity_times.png (total time per scenario, the dissertation's beside) and, for the latest dynamic run
of each model, bench/capacity_dynamic_<model>.png (workers, replicas and answers per second over the run), and
bench/capacity_dynamic_<model>_weighted.png for the latest with the VMs weighted (capacity.py --vm-cpu-shares).
"""

from __future__ import annotations

import json
import statistics
from datetime import datetime
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
# The dissertation's Table 5.1: 3000 requests at concurrency 100 on 2 vCPU / 2 GB worker VMs; total seconds.
DISSERTATION_TOTAL_S = {"fixed 2": 2511.32, "fixed 4": 1211.91, "fixed 6": 705.28, "dynamic 2-": 1922.78}
TARGETS = {"4 vs 2": 1.9, "6 vs 2": 2.8}
DYNAMIC_VS_FIXED4_TARGET = 0.15


def load(results: Path) -> list[dict]:
    path = results / "capacity.jsonl"
    if not path.exists():
        raise SystemExit(f"no results in {path}: run bench/capacity.py fixed / dynamic first")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


GOLDEN = "dynamic 2-, golden template"
LINKED = "dynamic 2-, golden template, linked clones"
ORDER = ["fixed 2", "fixed 4", "fixed 6", "dynamic 2-", "dynamic 2-, tuned", GOLDEN, LINKED]
# Dynamic runs whose pool kept warm VMs (capacity.py dynamic --warm-vms N) get WARM and N appended.
WARM = ", warm "
# Dynamic runs with the rulebook's defaults, compared with fixed 4.
DEFAULT_DYNAMIC = ["dynamic 2-", GOLDEN, LINKED]
# The machine's own CPU weight of Docker's cgroup; runs with another (capacity.py --vm-cpu-shares) are kept apart.
DEFAULT_VM_CPU_SHARES = 1024
WEIGHTED = ", VMs weighted"


def label(run: dict) -> str:
    """Dynamic runs with the rulebook's defaults are "dynamic 2-"; runs with --pressure overrides, and runs whose new
    VMs were cloned from a template holding the TorchServe image, fully or linked (results before linked clones have
    no "clones": they were full clones), are kept apart. Fixed runs clone no VM. Runs whose VMs had another CPU weight
    than the machine's default get WEIGHTED appended."""
    weighted = WEIGHTED if run.get("vm_cpu_shares") not in (None, DEFAULT_VM_CPU_SHARES) else ""
    if run["scenario"] == "fixed":
        return f"fixed {run['workers']}{weighted}"
    if run.get("autoscaler_overrides"):
        return f"dynamic 2-, tuned{weighted}"
    if not run.get("template_images"):
        return f"dynamic 2-{weighted}"
    warm = f"{WARM}{run['warm_vms']}" if run.get("warm_vms") else ""
    return (LINKED if run.get("clones") == "linked" else GOLDEN) + warm + weighted


def unweighted(name: str) -> str:
    """The label without the weight."""
    return name.removesuffix(WEIGHTED)


def shape(name: str) -> str:
    """The label without the weight and the warm VMs."""
    return unweighted(name).split(WARM)[0]


def order(name: str) -> tuple[int, str, bool]:
    # Shapes ORDER does not name (fixed 1, fixed 3, ...) after those it does.
    known = ORDER.index(shape(name)) if shape(name) in ORDER else len(ORDER)
    return known, unweighted(name), name != unweighted(name)


def spread(values: list[float], digits=1) -> str:
    middle = statistics.median(values)
    if len(values) == 1:
        return f"{middle:.{digits}f}"
    return f"{middle:.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def groups(runs: list[dict]) -> dict[tuple[str, str], list[dict]]:
    grouped: dict[tuple[str, str], list[dict]] = {}
    for run in runs:
        grouped.setdefault((run["model"], label(run)), []).append(run)
    return dict(sorted(grouped.items(), key=lambda item: (item[0][0], order(item[0][1]))))


def table(runs: list[dict]) -> list[str]:
    lines = [
        "| model | scenario | runs | requests | total s | dissertation s | req/s | p50 s | p95 s | p99 s | failed | workers | cores outside (client) | VM-s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (model, name), items in groups(runs).items():
        outside = [r["cpu_cores"]["outside_workers"] for r in items]
        client = [r["cpu_cores"]["load_client"] for r in items]
        workers = sorted({r["workers_label"] for r in items})
        dissertation = f"{DISSERTATION_TOTAL_S[unweighted(name)]:.0f}" if unweighted(name) in DISSERTATION_TOTAL_S else "-"
        measured = [v for v in map(run_vm_seconds, items) if v is not None]
        vm_seconds = spread(measured, 0) if measured else "-"
        lines.append(
            f"| {model} | {name} | {len(items)} | {items[0]['requests']} | {spread([r['total_s'] for r in items])} | {dissertation} | "
            f"{spread([r['throughput_rps'] for r in items], 2)} | "
            f"{spread([r['p50_s'] for r in items], 2)} | {spread([r['p95_s'] for r in items], 2)} | {spread([r['p99_s'] for r in items], 2)} | "
            f"{spread([r['failed'] for r in items], 0)} | {', '.join(workers)} | {spread(outside, 2)} ({spread(client, 2)}) | {vm_seconds} |"
        )
    return lines


def run_vm_seconds(run: dict) -> float | None:
    """The worker VMs' running seconds: recorded by dynamic runs since the warm VM runs (none before); a fixed run's
    is its shape's, N VMs for the whole run."""
    if "vm_seconds" in run:
        return run["vm_seconds"]
    return run["workers"] * run["total_s"] if run["scenario"] == "fixed" else None


def vm_seconds_against(dynamic: list[dict], fixed: list[dict]) -> str:
    """ "; VM-seconds N against M (x)" for the runs that recorded them, medians; "" where either side has none."""
    ours, theirs = ([v for v in map(run_vm_seconds, runs) if v is not None] for runs in (dynamic, fixed))
    if not (ours and theirs):
        return ""
    mine, other = statistics.median(ours), statistics.median(theirs)
    return f"; VM-seconds {mine:.0f} against {other:.0f} ({mine / other:.2f}x)"


def ratios(runs: list[dict]) -> list[str]:
    lines = []
    grouped = groups(runs)
    for model in sorted({r["model"] for r in runs}):

        def median(name, key, model=model):
            items = grouped.get((model, name))
            return statistics.median(r[key] for r in items) if items else None

        base = median("fixed 2", "throughput_rps")
        for workers, target in (("4", TARGETS["4 vs 2"]), ("6", TARGETS["6 vs 2"])):
            other = median(f"fixed {workers}", "throughput_rps")
            if base and other:
                ratio = other / base
                lines.append(
                    f"- {model}: throughput {workers} vs 2 workers **{ratio:.2f}x** (target >= {target}: {'met' if ratio >= target else 'not met'}); "
                    f"the dissertation's total times give {DISSERTATION_TOTAL_S['fixed 2'] / DISSERTATION_TOTAL_S[f'fixed {workers}']:.2f}x"
                )
        names = sorted((n for m, n in grouped if m == model and shape(n) in DEFAULT_DYNAMIC), key=order)
        for name in names:
            dynamic = median(name, "total_s")
            # Like with like where there are both: fixed runs with the same VM weight (a fixed run has no control plane
            # at work, so the weight changes little there).
            same, other = ("fixed 4" + WEIGHTED, "fixed 4") if name.endswith(WEIGHTED) else ("fixed 4", "fixed 4" + WEIGHTED)
            fixed4 = {candidate: median(candidate, "total_s") for candidate in (same, other)}
            against = next((candidate for candidate, total in fixed4.items() if total), None)
            if not (against and dynamic):
                continue
            slower = dynamic / fixed4[against] - 1
            lines.append(
                f"- {model}: {name.replace('dynamic 2-', 'dynamic from 2')} vs {against}, total time **{100 * slower:+.1f}%** "
                f"(target within {100 * DYNAMIC_VS_FIXED4_TARGET:.0f}%: "
                f"{'met' if slower <= DYNAMIC_VS_FIXED4_TARGET else 'not met'}); the dissertation: "
                f"{100 * (DISSERTATION_TOTAL_S['dynamic 2-'] / DISSERTATION_TOTAL_S['fixed 4'] - 1):+.1f}%"
                + vm_seconds_against(grouped.get((model, name), []), grouped.get((model, against), []))
            )
    return lines


def plot_times(runs: list[dict], path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grouped = groups(runs)
    models = sorted({model for model, _name in grouped})
    figure, axes = plt.subplots(1, len(models) + 1, figsize=(5 * (len(models) + 1), 4), squeeze=False)
    for axis, model in zip(axes[0], models, strict=False):
        names = sorted((name for m, name in grouped if m == model), key=order)
        medians = [statistics.median(r["total_s"] for r in grouped[(model, n)]) if (model, n) in grouped else 0 for n in names]
        lows = [m - min(r["total_s"] for r in grouped[(model, n)]) if (model, n) in grouped else 0 for n, m in zip(names, medians, strict=True)]
        highs = [max(r["total_s"] for r in grouped[(model, n)]) - m if (model, n) in grouped else 0 for n, m in zip(names, medians, strict=True)]
        requests = next(iter(grouped[(model, n)] for n in names if (model, n) in grouped))[0]["requests"]
        axis.bar(names, medians, yerr=[lows, highs], capsize=4, color=["#dd8452" if n.startswith("dynamic") else "#4c72b0" for n in names])
        axis.tick_params(axis="x", labelsize=8, labelrotation=15)
        axis.set_title(f"lab: {model}, {requests} requests")
        axis.set_ylabel("total seconds (median, min-max)")
    axis = axes[0][-1]
    axis.bar(list(DISSERTATION_TOTAL_S), list(DISSERTATION_TOTAL_S.values()), color=["#8c8c8c"] * 3 + ["#c49c94"])
    axis.set_title("dissertation (Table 5.1), 3000 requests")
    axis.set_ylabel("total seconds")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_dynamic(run: dict, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    detail = json.loads((REPO_ROOT / run["detail"]).read_text())
    records, samples = detail["requests"], [s for s in detail["samples"] if "workers" in s]
    start = min(r[0] for r in records)
    ends = sorted(r[0] + r[1] - start for r in records if r[2] == 200)
    # Answers per second over 5 s bins: a replica answers a whole batch at once.
    seconds = int(max(ends)) // 5 + 1
    per_second = [0.0] * seconds
    for end in ends:
        per_second[int(end) // 5] += 0.2
    figure, axis = plt.subplots(figsize=(9, 4))
    axis.plot([5 * i + 2.5 for i in range(seconds)], per_second, color="#8c8c8c", linewidth=1, label="answers per second (5 s bins)")
    for event in run.get("scale_events", []):
        if event.get("decision") == "acted" and event.get("action") == "scale_out":
            acted = datetime.fromisoformat(event["time"].replace("Z", "+00:00")).timestamp() - start
            axis.axvline(acted, color="#55a868", linestyle=":", label="scale-out run finished")
    axis.set_xlabel(f"seconds since the first request ({run['model']}, {run['requests']} requests at {run['concurrency']} in flight)")
    axis.set_ylabel("answers per second")
    other = axis.twinx()
    times = [s["t"] - start for s in samples]
    other.step(times, [len(s["workers"]) for s in samples], where="post", color="#dd8452", label="active workers")
    other.step(times, [s.get("replicas", 0) for s in samples], where="post", color="#4c72b0", linestyle="--", label="running replicas")
    if "manager_vmid" in run:
        # Every worker VM that runs: active, warm, or cloned and not serving yet.
        # The saved samples' vmids are JSON object keys: strings.
        running = [len({int(vmid) for vmid in s["vms"]} - {int(run["manager_vmid"])}) for s in samples]
        other.step(times, running, where="post", color="#c44e52", linestyle=":", label="worker VMs running (warm included)")
    other.set_ylabel("workers, replicas")
    other.set_ylim(0, 7)
    lines = axis.get_legend_handles_labels()[0] + other.get_legend_handles_labels()[0]
    axis.legend(lines, [line.get_label() for line in lines], loc="upper left")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def started_between(run: dict, since: str | None, until: str | None) -> bool:
    started = datetime.fromisoformat(run["started"].replace("Z", "+00:00"))
    return (since is None or started >= datetime.fromisoformat(since.replace("Z", "+00:00"))) and (
        until is None or started < datetime.fromisoformat(until.replace("Z", "+00:00"))
    )


def report(results: Path, since: str | None = None, until: str | None = None, tag: str = ""):
    runs = [run for run in load(results) if started_between(run, since, until)]
    if not runs:
        raise SystemExit(f"no runs in {results / 'capacity.jsonl'} started between {since or 'the first'} and {until or 'the last'}")
    suffix = f"_{tag}" if tag else ""
    print("\n".join(table(runs)))
    print()
    print("\n".join(ratios(runs)))
    plot_times(runs, REPO_ROOT / "bench" / f"capacity_times{suffix}.png")
    written = [f"bench/capacity_times{suffix}.png"]
    for model in sorted({r["model"] for r in runs}):
        dynamic = [r for r in runs if r["model"] == model and r["scenario"] == "dynamic"]
        # The latest run of each VM weight: a weighted run's plot gets "_weighted" in its name.
        for weighted in (False, True):
            latest = [r for r in dynamic if label(r).endswith(WEIGHTED) == weighted]
            if latest:
                path = REPO_ROOT / "bench" / f"capacity_dynamic_{model}{'_weighted' if weighted else ''}{suffix}.png"
                plot_dynamic(latest[-1], path)
                written.append(str(path.relative_to(REPO_ROOT)))
    print(f"\nwrote {', '.join(written)}")
