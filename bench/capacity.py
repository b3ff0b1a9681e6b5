"""The dissertation's capacity experiments on the lab: fixed 2 / 4 / 6 workers and dynamic from 2, side by side.

Each worker VM gets a stated CPU budget (Proxmox cpulimit; the simulator caps the VM's container at it) so that six
workers, the load generator, the proxy and the manager fit on this machine and adding workers adds capacity. Every
run sends --requests requests with --concurrency in flight through the edge proxy (TLS, bearer token) to one model,
records every answer, and samples every second the CPU of each VM container, of this process (the load generator)
and of the whole machine, so the CPU spent outside the workers is printed with the result.

    . scripts/_env.sh
    python bench/capacity.py deploy                         # the lab with 6 budgeted workers (once, ~15 min)
    python bench/capacity.py fixed --model resnet18 --workers 2 4 6 --repeats 3
    python bench/capacity.py dynamic --model resnet18 --repeats 2
    python bench/capacity.py dynamic --model resnet18 --repeats 1 --warm-vms 2   # the pool keeps 2 warm VMs (joined)
    python bench/capacity.py report                         # tables and plots from bench/results/
    python bench/capacity.py report --since T --tag NAME    # of the runs started at T or later

- fixed N: N replicas of the model, one per worker VM (the service's max_replicas_per_node is 1), on a pool of 6 VMs;
  the VMs without a replica idle, and their CPU is printed apart. The other model is scaled to 0.
- dynamic: the pool is brought to 2 workers with the collection's own scale-in (playbooks/scale_in.yml), then the
  autoscaler runs as scripts/autoscale runs it (ansible-rulebook, the serving_pressure fast path) while the load runs;
  it clones, configures and joins worker VMs through the simulator (boot time: the simulator's fixed default) and
  raises the replicas onto them.
- dynamic --warm-vms N: the worker pool keeps N warm VMs (mlfleet_worker_pools' warm_vms, form MLFLEET_BENCH_WARM_FORM,
  default joined), made by provision.yml and configure.yml before the run and taken by the scale-out; --warm-vms 0
  removes those an earlier run left. Every result records the VM-seconds the run used: each running worker VM, warm
  or serving, for each second of the run (fixed N: N VMs for the whole run; the pool's idle VMs are the bench's
  spares, not the shape's).
- --vm-cpu-shares N: the CPU weight of the lab's VMs together against the processes of this machine (the autoscaler,
  Ansible, the simulator) while a scenario runs; the machine's default is 1024. On the dissertation's testbed the
  control plane ran on other hosts; here it shares the 2 cores, and with the default weight every busy Ansible process
  weighs as much as all VMs together, so the workers lose part of their stated budget while the autoscaler works. A
  hypervisor's weight for its guests (say 102400) keeps the budgets; the result records the weight.

Results are appended as JSON lines to bench/results/capacity.jsonl (one line per run, with every request's start,
latency and status in bench/results/capacity-requests/). Traffic goes only to the lab's own edge proxy; every load is
bounded by its request count and --max-seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import ssl
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO_ROOT / "tests" / "lab"), str(REPO_ROOT / "tests" / "models"), str(REPO_ROOT)]
from autoscale_support import Autoscaler, audit_events, load_lease_module  # noqa: E402
from lab_support import run  # noqa: E402
from models_support import jpeg_body  # noqa: E402

RESULTS = REPO_ROOT / "bench" / "results"
MODELS = ("resnet18", "densenet161")
# The autoscaler runs with the rulebook's defaults (serving_pressure: more than 4 requests in flight per server for
# 6 s, a scale_out event at most every 30 s per service); --pressure KEY=VALUE overrides one, as
# <lab state>/autoscale/overrides.yml does for scripts/autoscale.
USER_HZ = os.sysconf("SC_CLK_TCK")


class Lab:
    """The default lab (or MLFLEET_LAB_* as for lab/up.sh), seen through the bench inventory."""

    def __init__(self, cpulimit: float):
        self.state = Path(os.environ.get("MLFLEET_LAB_STATE", REPO_ROOT / ".lab"))
        self.name = os.environ.get("MLFLEET_LAB_NAME", "mlfleet-lab")
        self.gateway = os.environ.get("MLFLEET_LAB_GATEWAY", "192.168.213.1")
        self.pve_port = int(os.environ.get("MLFLEET_LAB_PVE_PORT", "8006"))
        self.manager_address = self.gateway.rsplit(".", 1)[0] + ".10"
        self.cpulimit = cpulimit
        self.inventory = self.state / "bench" / "inventory"
        # Every swarm query goes through the manager VM's container; finding it lists and inspects every VM, so it is
        # looked up once (deploy() forgets it, the manager VM being created then).
        self.manager: str | None = None
        # The pool's warm VMs for every playbook and autoscaler run of this process (dynamic --warm-vms).
        self.warm_vms = 0

    def env(self, workers: int) -> dict:
        return {
            **os.environ,
            "MLFLEET_LAB_GATEWAY": self.gateway,
            "MLFLEET_BENCH_WORKERS": str(workers),
            "MLFLEET_BENCH_WARM_VMS": str(self.warm_vms),
            "MLFLEET_BENCH_CPULIMIT": str(self.cpulimit),
            "ANSIBLE_CONFIG": str(REPO_ROOT / "ansible.cfg"),
        }

    def write_inventory(self):
        """The lab inventory with bench/capacity/inventory_overrides.yml on top, every path absolute (ansible-rulebook
        runs playbooks from a copy of the inventory)."""
        group_vars = self.inventory / "group_vars" / "all"
        group_vars.mkdir(parents=True, exist_ok=True)
        links = {"00-lab.yml": REPO_ROOT / "inventories" / "lab" / "group_vars" / "all.yml",
                 "10-capacity.yml": REPO_ROOT / "bench" / "capacity" / "inventory_overrides.yml"}  # fmt: skip
        for name, target in links.items():
            link = group_vars / name
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to(target)
        config = yaml.safe_load((REPO_ROOT / "inventories" / "lab" / "proxmox.yml").read_text())
        config |= {"ca_path": str(self.state / "pvesim" / "ca.pem"), "api_port": self.pve_port}
        (self.inventory / "proxmox.yml").write_text(yaml.safe_dump(config))

    def playbook(self, playbook: str, workers: int, *extra: str, timeout=3600):
        self.write_inventory()
        command = ["ansible-playbook", "-i", str(self.inventory), playbook, *extra]
        log = self.state / "bench" / "ansible.log"
        started = time.monotonic()
        with log.open("a") as output:
            output.write(f"\n### {datetime.now(UTC).isoformat()} {' '.join(command)} (workers {workers})\n")
            output.flush()
            result = subprocess.run(command, env=self.env(workers), cwd=REPO_ROOT, stdout=output, stderr=subprocess.STDOUT, timeout=timeout, check=False)
        if result.returncode:
            raise SystemExit(f"{' '.join(command)} failed (exit {result.returncode}): see {log}")
        return time.monotonic() - started

    # --- the swarm, through the manager VM's Docker Engine -------------------------------------------------------

    def vm_containers(self) -> dict[int, str]:
        """vmid -> container id of every running VM of the lab."""
        out = run(["docker", "ps", "--filter", f"label=io.mlfleet.lab={self.name}", "--filter", "label=io.mlfleet.lab.vmid",
                   "--no-trunc", "--format", '{{.ID}} {{.Label "io.mlfleet.lab.vmid"}}']).stdout  # fmt: skip
        return {int(vmid): container for container, vmid in (line.split() for line in out.splitlines())}

    def manager_vmids(self, nodes: list[dict]) -> set[int]:
        """The running VMs that are no worker among `nodes` (Lab.nodes(), any state): the manager VM and any VM not
        (yet) in the swarm."""
        workers = {n["vmid"] for n in nodes if n["role"] == "worker"}
        return {vmid for vmid in self.vm_containers() if vmid not in workers}

    def manager_container(self) -> str:
        if self.manager:
            return self.manager
        for container in self.vm_containers().values():
            addresses = run(["docker", "inspect", "-f", "{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}", container]).stdout.split()
            if self.manager_address in addresses:
                self.manager = container
                return container
        raise SystemExit(f"no VM of the lab {self.name} has the manager's address {self.manager_address}: run `bench/capacity.py deploy`")

    def manager_docker(self, *args: str, timeout=120) -> str:
        return run(["docker", "exec", self.manager_container(), "docker", *args], timeout=timeout).stdout

    def nodes(self) -> list[dict]:
        """Every swarm node: hostname, role, state, availability, vmid (None for managers without the label)."""
        ids = self.manager_docker("node", "ls", "-q").split()
        nodes = json.loads(self.manager_docker("node", "inspect", *ids))
        return [
            {
                "hostname": node["Description"]["Hostname"],
                "role": node["Spec"]["Role"],
                "state": node["Status"]["State"],
                "availability": node["Spec"]["Availability"],
                "vmid": int(node["Spec"].get("Labels", {}).get("mlfleet.vmid", 0)) or None,
                "id": node["ID"],
            }
            for node in nodes
        ]

    def running_tasks(self, service: str) -> list[dict]:
        """The service's running tasks: node id and task id."""
        out = self.manager_docker("service", "ps", service, "--filter", "desired-state=running", "--format", "{{.ID}} {{.Node}} {{.CurrentState}}")
        tasks = []
        for line in out.splitlines():
            task, node, state = line.split(" ", 2)
            if state.startswith("Running"):
                tasks.append({"task": task, "node": node})
        return tasks

    def scale(self, service: str, replicas: int):
        self.manager_docker("service", "scale", "--detach", f"{service}={replicas}")

    def endpoint(self) -> tuple[str, str, str]:
        edge = self.state / "edge-proxy"
        return f"https://{self.manager_address}:443", (edge / "inference.token").read_text().strip(), str(edge / "tls.crt")

    def servers_up(self, backend: str) -> int:
        import requests

        edge = self.state / "edge-proxy"
        token = (edge / "stats.token").read_text().strip()
        response = requests.get(
            f"https://{self.manager_address}:8404/stats;csv", headers={"Authorization": f"Bearer {token}"}, verify=str(edge / "tls.crt"), timeout=10
        )
        response.raise_for_status()
        header, *rows = response.text.lstrip("# ").splitlines()
        names = header.split(",")
        servers = (dict(zip(names, row.split(","), strict=False)) for row in rows)
        return sum(1 for r in servers if r["pxname"] == backend and r["svname"].startswith("task") and r["status"] == "UP")

    def settle(self, model: str, replicas: int, timeout=900):
        """Scale the model to `replicas`, the other models to 0, and wait until every replica runs and is up in the proxy."""
        for other in MODELS:
            if other != model:
                self.scale(other, 0)
        self.scale(model, replicas)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            tasks = self.running_tasks(model)
            if len(tasks) == replicas and len({t["node"] for t in tasks}) == replicas and self.servers_up(model) == replicas:
                return
            time.sleep(3)
        raise SystemExit(f"{model}: {replicas} replicas on as many workers were not up in the proxy within {timeout} s")

    def workers(self) -> list[dict]:
        """The active workers: a warm VM of the joined form is a worker too, paused."""
        return [n for n in self.nodes() if n["role"] == "worker" and n["vmid"] and n["availability"] == "active"]

    def warm_workers(self) -> list[dict]:
        return [n for n in self.nodes() if n["role"] == "worker" and n["vmid"] and n["availability"] == "pause"]

    def manager_vmid(self) -> int:
        manager = self.manager_container()
        return next(vmid for vmid, container in self.vm_containers().items() if container == manager)

    def template_images(self) -> list[str]:
        """The images the golden template's disk holds (lab/up.sh MLFLEET_LAB_TEMPLATE_IMAGES): a new VM need not pull them."""
        stamp = self.state / "disks" / "base-9000-disk-0" / "docker.images"
        return [line.split()[0] for line in stamp.read_text().splitlines() if line.strip()] if stamp.exists() else []

    def deployed_workers(self) -> int:
        """The swarm's workers, 0 when the lab or its manager VM is not up yet (the scenario deploys it then)."""
        try:
            return len(self.workers())
        except (AssertionError, SystemExit):
            return 0


# --- measurement ---------------------------------------------------------------------------------------------------


VM_CGROUP_SHARES = Path("/sys/fs/cgroup/cpu/docker/cpu.shares")


@contextlib.contextmanager
def vm_cpu_shares(shares: int | None):
    """The lab's VMs (the Docker Engine's containers) weighted ``shares`` against this machine's other processes while
    the block runs, then as before. None: left as it is."""
    if shares is None:
        yield int(VM_CGROUP_SHARES.read_text()) if VM_CGROUP_SHARES.exists() else None
        return
    if not VM_CGROUP_SHARES.exists():
        raise SystemExit(f"--vm-cpu-shares needs the cgroup v1 cpu controller's {VM_CGROUP_SHARES} (the lab's Docker Engine with cgroupfs)")
    before = VM_CGROUP_SHARES.read_text().strip()
    VM_CGROUP_SHARES.write_text(str(shares))
    try:
        yield shares
    finally:
        VM_CGROUP_SHARES.write_text(before)


def host_busy_seconds() -> float:
    """CPU seconds the machine has spent busy since boot (user, nice, system, irq, softirq; not steal)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq = fields[:7]
    return (user + nice + system + irq + softirq) / USER_HZ


def container_cpu_seconds(container_id: str) -> float | None:
    """CPU seconds used by a container and everything it started: the inner Docker Engine of a VM puts its containers
    under the VM's cgroup (--cgroup-parent), so a replica's CPU is its VM's. cgroup v1 cpuacct, cgroupfs driver."""
    try:
        return int(Path(f"/sys/fs/cgroup/cpuacct/docker/{container_id}/cpuacct.usage").read_text()) / 1e9
    except (OSError, ValueError):
        return None


def children_cpu_seconds() -> float:
    """The docker CLI calls of the sampler and the lab helpers (finished children of this process)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Sampler(threading.Thread):
    """Every second: the machine's busy CPU, each VM container's CPU, this process's CPU, and (optionally) the swarm's
    ready, active workers and the model's running replicas."""

    def __init__(self, lab: Lab, model: str, swarm=True, interval=1.0):
        super().__init__(name="sampler", daemon=True)
        self.lab, self.model, self.swarm, self.interval = lab, model, swarm, interval
        self.samples: list[dict] = []
        self.stopping = threading.Event()
        # The sampler's own docker calls are CPU outside the workers too: list the VMs every 5 s, not every second,
        # read cgroup files directly, and read the swarm with one exec per sample.
        self.containers: dict[int, str] = {}
        self.listed_at = 0.0
        self.node_vmids: dict[str, int | None] = {}
        self.manager = lab.manager_container() if swarm else ""

    def swarm_state(self) -> dict:
        script = (
            "docker node ls --format '{{.ID}} {{.Status}} {{.Availability}}'; echo ---; "
            f"docker service ps {self.model} --filter desired-state=running --format '{{{{.CurrentState}}}}'"
        )
        nodes, tasks = run(["docker", "exec", self.manager, "sh", "-c", script], timeout=30).stdout.split("---\n")
        rows = [line.split() for line in nodes.splitlines()]
        unknown = [row[0].rstrip("*") for row in rows if row[0].rstrip("*") not in self.node_vmids]
        if unknown:
            for node in json.loads(run(["docker", "exec", self.manager, "docker", "node", "inspect", *unknown]).stdout):
                vmid = node["Spec"].get("Labels", {}).get("mlfleet.vmid")
                if node["Spec"]["Role"] == "manager":
                    self.node_vmids[node["ID"]] = None
                elif vmid:  # a worker that just joined gets its label a moment later: asked again until it has one
                    self.node_vmids[node["ID"]] = int(vmid)
        workers = [self.node_vmids.get(row[0].rstrip("*")) for row in rows if row[1:3] == ["Ready", "Active"]]
        return {"workers": sorted(w for w in workers if w), "replicas": sum(1 for line in tasks.splitlines() if line.startswith("Running"))}

    def sample(self) -> dict:
        if time.monotonic() - self.listed_at > 5:
            self.containers, self.listed_at = self.lab.vm_containers(), time.monotonic()
        record = {"t": time.time(), "host_busy": host_busy_seconds(), "client": own_cpu_seconds(), "sampler": children_cpu_seconds(),
                  "vms": {vmid: container_cpu_seconds(c) for vmid, c in self.containers.items()}}  # fmt: skip
        if self.swarm:
            try:
                record |= self.swarm_state()
            except (AssertionError, subprocess.SubprocessError, ValueError):
                pass
        return record

    def run(self):
        while not self.stopping.is_set():
            started = time.monotonic()
            self.samples.append(self.sample())
            self.stopping.wait(max(0.0, self.interval - (time.monotonic() - started)))

    def stop(self):
        self.stopping.set()
        self.join(timeout=30)
        self.samples.append(self.sample())


def vm_seconds(samples: list[dict], manager_vmid: int) -> float:
    """The worker VMs' running time over the samples, warm VMs included: for each interval between two samples, the
    VMs running at its start (the sampler lists them every 5 s) times its length."""
    total = 0.0
    for first, second in zip(samples, samples[1:], strict=False):
        total += len(set(first["vms"]) - {manager_vmid}) * (second["t"] - first["t"])
    return round(total, 1)


def cpu_breakdown(samples: list[dict], serving_vmids: set[int], manager_vmids: set[int]) -> dict:
    """Cores used on average between the first and last sample: the whole machine, the worker VMs serving the model,
    idle worker VMs, the manager VM (proxy, swarm manager, InfluxDB), the load generator, and the rest."""
    first, last = samples[0], samples[-1]
    seconds = last["t"] - first["t"]

    def used(vmids):
        total = 0.0
        for vmid in vmids:
            # A VM that appears mid-run (dynamic) counts from its first sample.
            values = [s["vms"].get(vmid) for s in samples if s["vms"].get(vmid) is not None]
            if len(values) >= 2:
                total += values[-1] - values[0]
        return total

    all_vms = set().union(*(s["vms"].keys() for s in samples))
    busy = last["host_busy"] - first["host_busy"]
    serving, managers = used(serving_vmids), used(manager_vmids)
    idle = used(all_vms - serving_vmids - manager_vmids)
    client = last["client"] - first["client"]
    sampler = last["sampler"] - first["sampler"]
    cores = {"machine": busy, "serving_workers": serving, "idle_workers": idle, "manager": managers, "load_client": client, "sampler": sampler}
    cores["other"] = busy - serving - idle - managers - client - sampler
    cores["outside_workers"] = busy - serving - idle
    return {name: round(value / seconds, 3) for name, value in cores.items()} | {"seconds": round(seconds, 1)}


async def predict(session, url: str, body: bytes, headers: dict) -> tuple[int, str]:
    """One prediction request: its HTTP status (0 when there was none) and the client-side error's name ('' if none)."""
    import aiohttp

    try:
        async with session.post(url, data=body, headers=headers) as response:
            await response.read()
            return response.status, ""
    except (TimeoutError, aiohttp.ClientError) as exc:
        return 0, type(exc).__name__


async def _load(url: str, token: str, ca_file: str, model: str, body: bytes, requests: int, concurrency: int, max_seconds: float) -> list[tuple]:
    import aiohttp

    context = ssl.create_default_context(cafile=ca_file)
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "image/jpeg"}
    records: list[tuple] = []
    left = requests
    deadline = time.monotonic() + max_seconds
    timeout = aiohttp.ClientTimeout(total=max_seconds)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency, ssl=context), timeout=timeout) as session:

        async def client():
            nonlocal left
            while left > 0 and time.monotonic() < deadline:
                left -= 1
                started = time.time()
                status, error = await predict(session, f"{url}/predictions/{model}", body, headers)
                records.append((round(started, 3), round(time.time() - started, 4), status, error))

        await asyncio.gather(*(client() for _client in range(concurrency)))
    return records


def send_load(lab: Lab, model: str, requests: int, concurrency: int, max_seconds: float) -> list[tuple]:
    """Every request: (start time, seconds, HTTP status or 0, error). aiohttp, one process: bench/load_client_cost.py
    measured it the cheapest client in CPU per request (1.6 ms, Locust's FastHttpUser 1.9x that)."""
    url, token, ca_file = lab.endpoint()
    return asyncio.run(_load(url, token, ca_file, model, jpeg_body(0).data, requests, concurrency, max_seconds))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def summarize(records: list[tuple]) -> dict:
    ok = [r for r in records if r[2] == 200]
    started = min(r[0] for r in records)
    ended = max(r[0] + r[1] for r in records)
    latencies = [r[1] for r in ok] or [float("nan")]
    return {
        "requests": len(records),
        "ok": len(ok),
        "failed": len(records) - len(ok),
        "total_s": round(ended - started, 2),
        "throughput_rps": round(len(ok) / (ended - started), 3),
        "p50_s": round(percentile(latencies, 50), 3),
        "p95_s": round(percentile(latencies, 95), 3),
        "p99_s": round(percentile(latencies, 99), 3),
    }


def audit_time(event: dict) -> float:
    return datetime.fromisoformat(event["time"].replace("Z", "+00:00")).timestamp()


# Why a scale run did not act, from the words of its audit reason (module_utils/_scale_decision.py, _scale_plan.py), first match.
NOT_ACTED_BECAUSE = (
    ("lease", "holds the lease"),
    ("cooldown", "cooling down"),
    ("held_vms_backlog_draining", "no new VMs: the backlog"),
    ("stale_event", "s old (more than max_event_age"),
    ("demand_met", ": nothing to add"),
    ("stabilization", "(stabilization)"),
    ("at_bound", ""),
)


def scale_events_since(since: float, state: Path, keys=("time", "action", "decision", "reason", "fields")) -> dict:
    """The autoscaler's audit events from `since` (epoch seconds) on: "scale_events", each event's `keys`, for every
    event but the runs that did not act, "scale_runs_not_acted", how many did not, and "not_acted_because", those
    counted by reason (NOT_ACTED_BECAUSE; at_bound is the rest: at a minimum or maximum, nothing to do); and
    "events_not_emitted", the events serving_pressure held back because their run could only decide not to act (its
    summary records, values.suppressed), which cost no run."""
    events = [e for e in audit_events(state) if audit_time(e) >= since]
    summaries = [e for e in events if (e.get("values") or {}).get("suppressed") is True]
    events = [e for e in events if e not in summaries]
    not_acted = [e for e in events if e.get("decision") == "not_acted"]
    because = dict.fromkeys((name for name, _words in NOT_ACTED_BECAUSE), 0)
    for event in not_acted:
        because[next(name for name, words in NOT_ACTED_BECAUSE if words in event.get("reason", ""))] += 1
    return {
        "scale_events": [{k: e.get(k) for k in keys} for e in events if e.get("decision") != "not_acted"],
        "scale_runs_not_acted": len(not_acted),
        "not_acted_because": because,
        "events_not_emitted": sum(int((e.get("fields") or {}).get("suppressed", 0)) for e in summaries),
    }


def commit() -> str:
    return run(["git", "rev-parse", "--short", "HEAD"], check=False).stdout.strip()


def save(result: dict, records: list[tuple], samples: list[dict], name: str | None = None, directory="capacity-requests", jsonl="capacity.jsonl"):
    """Every request and sample to RESULTS/<directory>/<name>-<started>.json (name: <scenario>-<model> unless given),
    and the result, with that file's path as "detail", appended to RESULTS/<jsonl>."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = name or f"{result['scenario']}-{result['model']}"
    detail = RESULTS / directory / f"{name}-{result['started'].replace(':', '')}.json"
    detail.parent.mkdir(exist_ok=True)
    detail.write_text(json.dumps({"requests": records, "samples": samples}))
    result["detail"] = str(detail.relative_to(REPO_ROOT))
    with (RESULTS / jsonl).open("a") as output:
        output.write(json.dumps(result) + "\n")


def print_result(result: dict):
    cpu = result["cpu_cores"]
    print(
        f"{result['scenario']:>8} {result['model']:12} workers {result['workers_label']:>5}  {result['ok']:5}/{result['requests']} ok "
        f"{result['failed']:3} failed  total {result['total_s']:7.1f} s  {result['throughput_rps']:6.2f} req/s  "
        f"p50 {result['p50_s']:6.2f}  p95 {result['p95_s']:6.2f}  p99 {result['p99_s']:6.2f} s  | cores: machine {cpu['machine']:.2f}, "
        f"serving workers {cpu['serving_workers']:.2f}, idle workers {cpu['idle_workers']:.2f}, outside workers {cpu['outside_workers']:.2f} "
        f"(manager {cpu['manager']:.2f}, load client {cpu['load_client']:.2f}, "
        f"sampler {cpu['sampler']:.2f}, other {cpu['other']:.2f})" + (f"  | VM-seconds {result['vm_seconds']:.0f}" if "vm_seconds" in result else ""),
        flush=True,
    )


def base_result(lab: Lab, args, scenario: str) -> dict:
    return {"scenario": scenario, "model": args.model, "concurrency": args.concurrency, "cpulimit": lab.cpulimit, "commit": commit(),
            "started": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"), "cores": os.cpu_count(), "template_images": lab.template_images(),
            "vm_cpu_shares": args.vm_cpu_shares_now,
            "clones": "full" if os.environ.get("MLFLEET_BENCH_CLONE_FULL", "").lower() in ("1", "true", "yes") else "linked"}  # fmt: skip


def warm_up(lab: Lab, model: str, replicas: int):
    """A few requests per replica so no replica's first answer (lazy JIT, first allocation) falls into the timed run."""
    records = send_load(lab, model, 4 * replicas, replicas, 300)
    failed = [r for r in records if r[2] != 200]
    if failed:
        raise SystemExit(f"{model}: {len(failed)} of {len(records)} warm-up requests failed ({failed[0]}): the lab does not serve it")


# --- scenarios ------------------------------------------------------------------------------------------------------


def deploy(lab: Lab, workers: int):
    """The lab (lab/up.sh, with the serving images and models) and site.yml with the bench inventory."""
    # The golden template holds the TorchServe image, as a site's template would: a new VM does not pull it.
    env = {**os.environ, "MLFLEET_LAB_SERVING": "1", "MLFLEET_LAB_TEMPLATE_IMAGES": os.environ.get("MLFLEET_LAB_TEMPLATE_IMAGES", "lab/torchserve")}
    run(["lab/up.sh"], env=env, timeout=3600)
    lab.manager = None
    if lab.deployed_workers():
        # site.yml keeps the replica counts of existing services (the autoscaler owns them) and then classifies an
        # image with every model: a model a scenario scaled to 0 has to serve again first.
        # A site.yml that stopped half-way may have left a service out: site.yml creates it.
        existing = set(lab.manager_docker("service", "ls", "--format", "{{.Name}}").split())
        for model in MODELS:
            if model in existing and not lab.running_tasks(model):
                lab.scale(model, 1)
    seconds = lab.playbook("site.yml", workers)
    print(f"site.yml with {workers} workers of {lab.cpulimit} CPU: {seconds:.0f} s", flush=True)


def fixed(lab: Lab, args):
    pool = lab.deployed_workers()
    if pool < max(args.workers):
        deploy(lab, max(args.workers))
    for repeat in range(args.repeats):
        for workers in args.workers:
            lab.settle(args.model, workers)
            warm_up(lab, args.model, workers)
            serving = {t["node"] for t in lab.running_tasks(args.model)}
            nodes = lab.nodes()
            serving_vmids = {n["vmid"] for n in nodes if n["hostname"] in serving or n["id"] in serving}
            managers = lab.manager_vmids(nodes)
            result = base_result(lab, args, "fixed") | {"workers": workers, "workers_label": str(workers), "repeat": repeat + 1}
            sampler = Sampler(lab, args.model, swarm=False)
            sampler.start()
            records = send_load(lab, args.model, args.requests, args.concurrency, args.max_seconds)
            sampler.stop()
            result |= summarize(records) | {"cpu_cores": cpu_breakdown(sampler.samples, serving_vmids, managers)}
            result["vm_seconds"] = round(workers * result["total_s"], 1)
            save(result, records, sampler.samples)
            print_result(result)


def scale_runs() -> list[int]:
    """PIDs of the scale playbook runs on this machine (the rulebook's and by hand)."""
    found = run(["pgrep", "-f", r"ansible-playbook .*scale_(out|in|replicas)([.]yml)?( |$)"], check=False).stdout.split()
    return [int(pid) for pid in found]


def wait_for_autoscaler_runs(lab: Lab, timeout=600):
    """Wait until no scale run is left, then give back a lease no run holds any more. Stopping ansible-rulebook does
    not stop the playbook runs it started: one that was waiting for the lease takes it after the autoscaler stopped,
    and one killed half-way keeps it until its ttl."""
    deadline = time.monotonic() + timeout
    while scale_runs():
        if time.monotonic() > deadline:
            raise SystemExit(f"scale runs still running after {timeout} s: PIDs {scale_runs()}")
        time.sleep(5)
    lease = load_lease_module().LeaseFile(str(lab.state / "autoscale.lease"))
    held = lease.read()["lease"] if os.path.exists(lease.path) else None
    if held is not None:
        print(f"giving back the lease of a run that is gone: {held['holder']} ({held['reason']})", flush=True)
        lease.release(held["holder"])


def shrink_pool(lab: Lab, model: str, workers: int):
    """Back to `workers` worker VMs with the collection's own scale-in: drain, take out, destroy."""
    lab.settle(model, workers)
    # Cooldowns and scale-in stabilization off for these by-hand runs; bounds and steps as the overrides file has them.
    overrides = yaml.safe_load((REPO_ROOT / "bench" / "capacity" / "inventory_overrides.yml").read_text())["mlfleet_autoscale"]
    overrides["cooldown"] = {"scale_out": 0, "scale_in": 0, "scale_in_after_scale_out": 0}
    overrides["stabilization"] = {"scale_in": 0}
    overrides["lease"]["path"] = str(lab.state / "autoscale.lease")
    for _attempt in range(4):
        if len(lab.workers()) <= workers:
            return
        wait_for_autoscaler_runs(lab)
        lab.playbook("playbooks/scale_in.yml", workers, "-e", f"scale_service={model}", "-e", json.dumps({"mlfleet_autoscale": overrides}))
    raise SystemExit(f"the pool still has {len(lab.workers())} workers after 4 scale-in runs; see {lab.state / 'bench' / 'ansible.log'}")


def keep_warm_vms(lab: Lab, warm_vms: int):
    """The pool's warm VMs as site.yml keeps them: made, or removed when an earlier run left some and warm_vms is 0."""
    if not warm_vms and not lab.warm_workers():
        return
    seconds = lab.playbook("playbooks/provision.yml", 2, "playbooks/configure.yml")
    warm = lab.warm_workers()
    print(f"provision.yml and configure.yml with warm_vms {warm_vms}: {seconds:.0f} s, warm VMs now {sorted(n['vmid'] for n in warm)}", flush=True)


def dynamic(lab: Lab, args):
    lab.warm_vms = args.warm_vms
    if not lab.deployed_workers():
        deploy(lab, 2)
    for repeat in range(args.repeats):
        shrink_pool(lab, args.model, 2)
        keep_warm_vms(lab, args.warm_vms)
        lab.settle(args.model, 2)
        warm_up(lab, args.model, 2)
        managers = lab.manager_vmids(lab.nodes())
        manager_vmid = lab.manager_vmid()
        result = base_result(lab, args, "dynamic") | {"repeat": repeat + 1, "autoscaler_overrides": args.pressure, "warm_vms": args.warm_vms}
        log = lab.state / "bench" / "autoscaler.log"
        audit_from = time.time()
        with Autoscaler(lab.env(2), lab.state, lab.inventory, args.pressure, log):
            sampler = Sampler(lab, args.model)
            sampler.start()
            records = send_load(lab, args.model, args.requests, args.concurrency, args.max_seconds)
            sampler.stop()
        pools = [len(s.get("workers", [])) for s in sampler.samples if "workers" in s]
        served_on = set().union(*(set(s.get("workers", [])) for s in sampler.samples))
        scale = scale_events_since(audit_from, lab.state)
        result |= summarize(records) | {
            "workers_label": f"2-{max(pools, default=2)}" + (f", warm {args.warm_vms}" if args.warm_vms else ""),
            "workers_max": max(pools, default=2),
            "cpu_cores": cpu_breakdown(sampler.samples, served_on, managers),
            "vm_seconds": vm_seconds(sampler.samples, manager_vmid),
            "manager_vmid": manager_vmid,
            **scale,
        }
        save(result, records, sampler.samples)
        print_result(result)


def pressure_setting(text: str) -> tuple[str, float]:
    key, _equals, value = text.partition("=")
    return f"autoscale_pressure_{key}", float(value)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
    parser.add_argument("--cpulimit", type=float, default=float(os.environ.get("MLFLEET_BENCH_CPULIMIT", "0.25")), help="CPU budget of each worker VM")
    parser.add_argument("--vm-cpu-shares", type=int, help="CPU weight of the lab's VMs against this machine's processes while a scenario runs (default 1024)")
    commands = parser.add_subparsers(dest="command", required=True)
    deploy_parser = commands.add_parser("deploy", help="bring the lab up and run site.yml with the bench inventory")
    deploy_parser.add_argument("--workers", type=int, default=6)
    for name in ("fixed", "dynamic"):
        scenario = commands.add_parser(name)
        scenario.add_argument("--model", choices=MODELS, default="resnet18")
        scenario.add_argument("--requests", type=int, default=3000)
        scenario.add_argument("--concurrency", type=int, default=100)
        scenario.add_argument("--repeats", type=int, default=3)
        scenario.add_argument("--max-seconds", type=float, default=3600, help="a run stops sending after this long, whatever is left")
        if name == "fixed":
            scenario.add_argument("--workers", type=int, nargs="+", default=[2, 4, 6])
        else:
            scenario.add_argument("--pressure", type=pressure_setting, nargs="*", default=[], help="autoscale_pressure_<KEY>=<VALUE> for the rulebook")
            scenario.add_argument("--warm-vms", type=int, default=0, help="warm VMs the worker pool keeps (warm_vms), made before each run")
    report_parser = commands.add_parser("report", help="tables and plots from bench/results/capacity.jsonl")
    # Runs on different machines do not compare: a machine's CPU speed moves every figure (see REPORT.md).
    report_parser.add_argument("--since", help="only runs started at or after this UTC time (2026-11-24T23:00:00Z)")
    report_parser.add_argument("--until", help="only runs started before this UTC time")
    report_parser.add_argument("--tag", default="", help="written into the PNGs' names, so that a filtered report keeps the others")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root: the lab's Docker daemon and the containers' cgroups")
    if args.command == "dynamic":
        args.pressure = dict(args.pressure)
    lab = Lab(args.cpulimit)
    if args.command == "deploy":
        deploy(lab, args.workers)
    elif args.command in ("fixed", "dynamic"):
        with vm_cpu_shares(args.vm_cpu_shares) as args.vm_cpu_shares_now:
            (fixed if args.command == "fixed" else dynamic)(lab, args)
    else:
        from capacity_report import report  # noqa: PLC0415

        report(RESULTS, since=args.since, until=args.until, tag=args.tag)
    return 0


if __name__ == "__main__":
    sys.exit(main())
