"""The autoscaler on a lab as a user runs it (scripts/autoscale: the real ansible-rulebook with the collection's
rulebook, event sources and scale playbooks), and what the tests read back: the swarm's nodes, the pool's VMs and
the audit trail.

The autoscaler is started as its own process group and stopped by its PID; its whole output goes to a file so
that a test can search it (for rejected webhooks, and for secrets that must never be there). Stopped, it gives its
scale runs still going ``STOP_GRACE`` seconds to finish and then ends them (scripts/_supervise_runs.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import importlib.util
import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import requests
import yaml
from lab_support import REPO_ROOT, run

# Seconds: shorter than scripts/autoscale's default (60) so that a test's stop is quick; Autoscaler.stop checks that
# the stop left none of its processes behind.
STOP_GRACE = 20


class Autoscaler:
    def __init__(self, env: dict, state: Path, inventory: Path | None, overrides: dict, log: Path):
        """``inventory`` None: the one scripts/autoscale makes from inventories/lab."""
        self.env = {"MLFLEET_AUTOSCALE_STOP_GRACE": str(STOP_GRACE), **os.environ, **env}
        self.env |= {"MLFLEET_AUTOSCALE_INVENTORY": str(inventory)} if inventory else {}
        self.state = state
        self.overrides = overrides
        self.log = log
        self.process = None

    def __enter__(self):
        directory = self.state / "autoscale"
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "overrides.yml").write_text(yaml.safe_dump(self.overrides))
        with self.log.open("ab") as output:
            self.process = subprocess.Popen(
                [REPO_ROOT / "scripts" / "autoscale"], env=self.env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.wait_until_listening()
        return self

    def wait_until_listening(self, timeout=90.0):
        host, port = self.env["MLFLEET_LAB_GATEWAY"], 5001
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"the autoscaler exited with {self.process.returncode}:\n{self.output()[-3000:]}")
            try:
                with socket.create_connection((host, port), timeout=2):
                    return
            except OSError:
                time.sleep(0.5)
        raise AssertionError(f"the autoscaler's webhook did not listen on {host}:{port} within {timeout:.0f} s:\n{self.output()[-3000:]}")

    def __exit__(self, exc_type, *exc):
        self.stop(check=exc_type is None)

    def stop(self, check=True):
        """Stop it as an operator does (SIGTERM); with ``check``, fail if any process it started outlived it."""
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            # ansible-rulebook's exit, the grace period, SIGTERM to the runs left and 15 s more before SIGKILL.
            self.process.wait(timeout=float(self.env["MLFLEET_AUTOSCALE_STOP_GRACE"]) + 60)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)
        if left := autoscaler_processes():
            for pid in left:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(os.getpgid(pid), signal.SIGKILL)
        # A scale run killed with the autoscaler keeps the lease until its ttl ends (30 min). Give it back, as an operator
        # does after stopping the autoscaler in the middle of a run; the cooldown record stays.
        lease = load_lease_module().LeaseFile(str(self.state / "autoscale.lease"))
        if os.path.exists(lease.path) and (held := lease.read()["lease"]) is not None:
            lease.release(held["holder"])
        if left and check:
            raise AssertionError(f"processes the autoscaler started outlived it: {left}\n{self.output()[-3000:]}")

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def webhook(self):
        return Webhook(
            f"https://{self.env['MLFLEET_LAB_GATEWAY']}:5001/alerts",
            (self.state / "monitoring" / "webhook.token").read_text().strip(),
            (self.state / "monitoring" / "webhook-hmac.secret").read_text().strip(),
            str(self.state / "autoscale" / "webhook.crt"),
        )


def autoscaler_processes() -> dict[int, str]:
    """{pid: command line} of the processes started under any autoscaler (scripts/_supervise_runs.py marks them)."""
    spec = importlib.util.spec_from_file_location("mlfleet_supervise_runs", REPO_ROOT / "scripts" / "_supervise_runs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.marked_processes(None)


def load_lease_module():
    """The collection's lease file code (plugins/module_utils/_lease.py, standard library only), loaded by path."""
    spec = importlib.util.spec_from_file_location("mlfleet_lease", REPO_ROOT / "plugins" / "module_utils" / "_lease.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Webhook:
    """Posts Grafana notifications the way Grafana's webhook contact point does (Bearer + HMAC of timestamp:body)."""

    def __init__(self, url, token, secret, ca_file):
        self.url, self.token, self.secret, self.ca_file = url, token, secret, ca_file

    def post(self, notification: dict | bytes, token=None, secret=None, timestamp=None, headers=None, method="POST"):
        """Send as Grafana does; ``method`` is its contact point's httpMethod (POST or PUT)."""
        body = notification if isinstance(notification, bytes) else json.dumps(notification).encode()
        stamp = str(int(time.time()) if timestamp is None else timestamp)
        signature = hmac.new((secret or self.secret).encode(), f"{stamp}:".encode() + body, hashlib.sha256).hexdigest()
        sent = {
            "Content-Type": "application/json",
            "Authorization": f"Bearer {token or self.token}",
            "X-Mlfleet-Signature": signature,
            "X-Mlfleet-Timestamp": stamp,
            **(headers or {}),
        }
        return requests.request(method, self.url, data=body, headers={k: v for k, v in sent.items() if v is not None}, verify=self.ca_file, timeout=10)


# A notification as Grafana (9.x and later) sends it: the project's fixture (tests/fixtures/grafana/README.md).
GRAFANA_SAMPLE = REPO_ROOT / "tests" / "fixtures" / "grafana" / "webhook-firing-sample.json"


def grafana_notification(service: str, action: str, starts_at: str, status: str = "firing", cluster: str = "lab") -> dict:
    """A notification with one alert, shaped like GRAFANA_SAMPLE."""
    sample = json.loads(GRAFANA_SAMPLE.read_text(encoding="utf-8"))
    alert = dict(sample["alerts"][0])
    alert |= {
        "status": status,
        "labels": {"alertname": f"mlfleet-{service}-{action}", "action": action, "service": service, "cluster": cluster},
        "startsAt": starts_at,
        "fingerprint": hashlib.sha256(f"{service}:{action}".encode()).hexdigest()[:16],
    }
    return {**sample, "status": status, "alerts": [alert], "truncatedAlerts": 0}


def audit_events(state: Path, **match) -> list[dict]:
    log = state / "audit.jsonl"
    events = [json.loads(line) for line in log.read_text().splitlines() if line.strip()] if log.exists() else []
    return [e for e in events if all(e.get(k) == v for k, v in match.items())]


def swarm_nodes(manager_container: str, attempts: int = 5) -> list[dict]:
    """The swarm's nodes as the manager sees them: hostname, role, status, availability, vmid.

    A scale-in can remove a node between the listing and the inspection ("No such node"): list again, a few times."""
    for _attempt in range(attempts):
        ids = run(["docker", "exec", manager_container, "docker", "node", "ls", "-q"]).stdout.split()
        result = run(["docker", "exec", manager_container, "docker", "node", "inspect", *ids], check=False)
        if result.returncode == 0:
            break
        if "No such node" not in result.stderr:
            raise AssertionError(f"docker node inspect {' '.join(ids)} exited {result.returncode}: {result.stderr}")
        time.sleep(0.5)
    else:
        raise AssertionError(f"the swarm's nodes changed under {attempts} listings in a row: {result.stderr}")
    nodes = json.loads(result.stdout)
    return [
        {
            "hostname": n["Description"]["Hostname"],
            "role": n["Spec"]["Role"],
            "status": n["Status"]["State"],
            "availability": n["Spec"]["Availability"],
            "vmid": int(n["Spec"].get("Labels", {}).get("mlfleet.vmid", -1)),
        }
        for n in nodes
    ]


def running_vm_vmids(lab_name: str) -> set[int]:
    """The VM ids of the lab's running VM containers (the simulator's docker backend)."""
    out = run(["docker", "ps", "--filter", f"label=io.mlfleet.lab={lab_name}", "--filter", "label=io.mlfleet.lab.vmid",
               "--format", '{{.Label "io.mlfleet.lab.vmid"}}']).stdout.split()  # fmt: skip
    return {int(v) for v in out}
