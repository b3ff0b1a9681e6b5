# Copyright (c) mlfleet.serving maintainers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""mlfleet.serving.serving_pressure: scale events from the edge proxy's HAProxy stats, within seconds of a burst.

Grafana alerts take minutes (sampling, ``for`` windows, notification policy); this source polls HAProxy's CSV stats every
few seconds and decides with hysteresis. The decision logic is the pure class PressureTracker, the parsing the pure
function parse_stats_csv; main() only polls and puts events on the queue.
"""

import asyncio
import csv
import fcntl
import hashlib
import json
import logging
import math
import os
import socket
import ssl
import statistics
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import aiohttp

DOCUMENTATION = r"""
---
short_description: Scale events from the edge proxy's load, within seconds of a burst.
description:
  - Polls the HAProxy edge proxy's CSV statistics (C(GET /stats;csv) on its C(stats) frontend) every O(interval) seconds
    and puts a C(scale_out) event on the queue when a service stays overloaded for O(out_for) seconds, and a C(scale_in)
    event when it stays idle for O(in_for) seconds. Between the thresholds nothing happens.
  - "Per backend (one per Swarm service) and poll it computes: C(servers_up) (servers whose status is UP, or C(no check),
    and whose weight is above 0), C(standby_up) (servers UP at weight 0: standby replicas, which take no request and count
    neither as serving nor in the load, so an idle standby never asks for a scale-in),
    C(inflight) (sessions on the serving servers), C(queued) (the backend's queue), C(per_server) = (inflight + queued) /
    max(servers_up, 1), C(rtime_ms) and C(qtime_ms) (average response and queue time of the last 1024 requests),
    C(rate) (sessions per second) and C(errors_5xx) (5xx answers since the previous poll)."
  - "The backlog's trend: C(backlog) = inflight + queued; C(backlog_trend) (requests per second, negative while it falls),
    the least-squares slope of the backlog over the polls of the last O(trend_for) seconds; and C(drain_s), the seconds
    until the backlog, falling at that rate, is down to what the servers up carry below O(out_threshold), or -1 when it
    is not falling, no server is up, or the polls do not span O(trend_for) seconds yet. The backlog counts as falling
    only when the slope takes off at least one request per server up over the span: a poll finds a server between two
    requests now and then, so a steady backlog (closed-loop clients) jitters by about that much. A scale-out that clones VMs reads
    C(drain_s): capacity that comes after the backlog is gone only costs (the scale playbooks' C(workers.time_to_serve))."
  - "Overloaded: per_server >= O(out_threshold), or queued > O(out_queue), or no server up while requests wait.
    Idle: per_server <= O(in_threshold), nothing queued, and at least one server up (a service with no task up has
    nothing to remove)."
  - After an event, the condition must hold for its whole window again, and at most one event per service and action is
    emitted per O(repeat_after) seconds, so a long burst keeps asking, slowly.
  - "With O(lease_file), the end of a scale action of the service in the same direction, from any source (the playbooks
    record it in the file's C(last_actions)), counts as such an event: the window starts again at that end, and the next
    event waits O(repeat_after) (O(in_repeat_after)) from it. The new capacity is measured before more is asked for,
    instead of a run that can only meet its cooldown."
  - "With O(lease_file), a service whose servers up reach the most replicas its last scale run kept it to (the file's
    C(bounds)) asks for C(scale_out) at most every O(in_repeat_after) seconds, as a service at its minimum asks for
    C(scale_in): such a run can only decide not to act, yet one still comes now and then, so a raised maximum is taken
    up."
  - "With O(lease_file), an event that falls due while a scale action holds the scale playbooks' lease is held back, not
    dropped: its window stays met, and it goes out at the first poll after the lease is given back (or expires) if the
    condition still holds. A run started during the lease would only be turned away by it."
  - "With O(lease_file), an event whose scale run could only decide not to act is not emitted: a run costs the control
    host seconds of CPU, taken from the serving workers. The last scale run of the service records its effective
    settings in the file (C(settings)); by the playbooks' own rules (C(module_utils/_scale_decision.py)) an event is not
    emitted while the service's cooldown in that direction holds (for C(scale_in), also the wait after a scale-out), nor
    a C(scale_out) whose backlog the servers up already meet (C(ceil(backlog / target_per_replica)) replicas or fewer).
    It stays due and goes out at the first poll at which its run could act. A service without recorded settings is never
    held back this way."
  - "With O(lease_file), a run that decided not to act records what it decided on (the file's C(quiet): the replicas, the
    count it desired within the bounds, and when time alone could change the decision, such as the end of a
    stabilization window). The same event is not emitted while no run acted since, the service has as many servers up,
    its demand asks for no more replicas (C(scale_out)) or no fewer (C(scale_in)), that time has not come, and the
    record is younger than O(recheck_after): a service at its minimum, or one whose workers are all needed, runs no
    playbook every O(in_repeat_after)."
  - "With O(audit_log), those events are summarised in the playbooks' JSON-lines audit trail: one record per service,
    action and reason per minute, with C(decision) V(not_acted), C(values.suppressed) V(true) and the count in
    C(fields.suppressed)."
  - A failed poll (refused connection, timeout, TLS error, HTTP 401, malformed CSV) is logged as a warning without the
    token and never produces a scale event; after it, every window starts again. A backend that was not in the previous
    poll is only observed, never acted on. Backends without servers (such as the proxy's C(no_such_model)) are skipped.
  - "Every event has this shape: C(action) (V(scale_out) or V(scale_in)), C(status) (V(firing)), C(service), C(cluster),
    C(alertname) (V(ServingPressureHigh) or V(ServingPressureLow)), C(labels) (action, service and, when set, cluster),
    C(values) (the figures above, plus C(window_s), the window that was met, and C(held_s), for how long the condition has
    held, and C(trend_s), the seconds the trend spans), C(fingerprint) (the first 16 hex digits of the SHA-256 of C(serving_pressure:<service>:<action>)),
    C(startsAt) (RFC 3339, when the condition began), C(source) (V(serving_pressure)) and C(received_at) (epoch seconds)."
author:
  - mlfleet.serving maintainers (@mlfleet)
version_added: 0.1.0
options:
  url:
    description:
      - Base URL of the proxy's stats frontend, for example V(https://192.168.213.10:8404). Give O(url) or O(urls).
    type: str
  urls:
    description:
      - Several base URLs (one per swarm manager); each poll uses the first that answers, trying the last one that answered
        first. Each proxy has its own queue, so the figures are those of the proxy that answered.
    type: list
    elements: str
  stats_path:
    description:
      - Path of the CSV statistics under the base URL (HAProxy's C(stats uri) followed by C(;csv)).
    type: str
    default: /stats;csv
  token:
    description:
      - "The stats bearer token, sent as C(Authorization: Bearer <token>). Required, or O(token_file), unless
        O(insecure_no_auth=true). Never logged."
    type: str
  token_file:
    description:
      - A file holding the stats bearer token (surrounding whitespace is ignored); read once at start.
    type: path
  insecure_no_auth:
    description:
      - Send no token (a proxy without the bearer check).
    type: bool
    default: false
  ca_file:
    description:
      - PEM file of the CA that signed the proxy's certificate (for the self-signed certificate the edge_proxy role
        generates, that certificate itself). Without it, the system's CAs are trusted.
    type: path
  validate_certs:
    description:
      - Verify the proxy's TLS certificate and host name.
    type: bool
    default: true
  timeout:
    description:
      - Seconds one request to the proxy may take.
    type: float
    default: 3
  interval:
    description:
      - Seconds between polls.
    type: float
    default: 2
  out_threshold:
    description:
      - Requests per up server (in flight plus queued) at or above which a service is overloaded.
    type: float
    default: 4.0
  out_queue:
    description:
      - A service with more queued requests than this is overloaded.
    type: int
    default: 0
  out_for:
    description:
      - Seconds a service must stay overloaded before a C(scale_out) event.
    type: float
    default: 6
  in_threshold:
    description:
      - Requests per up server at or below which (with an empty queue) a service is idle. Must be below O(out_threshold).
    type: float
    default: 0.5
  in_for:
    description:
      - Seconds a service must stay idle before a C(scale_in) event.
    type: float
    default: 60
  trend_for:
    description:
      - Seconds of polls over which the backlog's trend (C(backlog_trend), C(drain_s)) is measured. Longer is steadier and
        slower to see a change.
    type: float
    default: 30
  repeat_after:
    description:
      - At most one C(scale_out) event per service per this many seconds.
    type: float
    default: 30
  in_repeat_after:
    description:
      - At most one C(scale_in) event per service per this many seconds. Longer than O(repeat_after), because a service
        that is idle at its minimum stays idle, and every C(scale_in) event runs a playbook that can only decide not to act.
    type: float
    default: 300
  recheck_after:
    description:
      - With O(lease_file), how long a decision not to act that a scale run recorded (the file's C(quiet)) holds back the
        events that could only meet it again, while nothing it was made on changes. After this many seconds one run
        decides again (a raised maximum, a worker added by hand). V(0) holds nothing back this way.
    type: float
    default: 300
  services:
    description:
      - Watch only these backends (Swarm services). By default every backend with servers is watched, except
        O(ignore_backends).
    type: list
    elements: str
  ignore_backends:
    description:
      - Backends never watched when O(services) is not set. Frontends are never watched.
    type: list
    elements: str
    default: [stats]
  cluster:
    description:
      - The cluster name put in the events' C(cluster) and C(labels.cluster).
    type: str
  lease_file:
    description:
      - The scale playbooks' lease file on this host (the inventory's C(mlfleet_autoscale.lease.path)). While a scale
        action holds a live lease in it, due events are held back (a lease whose C(ansible-playbook) run has ended on
        this host holds nothing, as the playbooks take it over at once), and the end of each service's last scale action
        restarts its windows (see above). A missing file means no lease and no action yet; a file that cannot be read or
        is not the lease's JSON is reported (once a minute) and ignored, since the playbooks' lease still keeps to one
        action at a time.
    type: path
  audit_log:
    description:
      - The playbooks' JSON-lines audit trail on this host (the inventory's C(mlfleet_audit_log)), where the events not
        emitted because their run could only decide not to act are summarised (see above). Written under the same
        exclusive lock as the playbooks' records. Without it, they are only logged.
    type: path
"""

EXAMPLES = r"""
- name: Autoscale on the edge proxy's load
  hosts: localhost
  sources:
    - mlfleet.serving.serving_pressure:
        urls:
          - https://192.168.213.10:8404
          - https://192.168.213.11:8404
        token_file: /etc/mlfleet/edge-proxy-stats.token
        ca_file: /etc/mlfleet/edge-proxy-ca.pem
        cluster: lab
        services: [resnet18, densenet161]
        lease_file: /var/lib/mlfleet/autoscale.lease
  rules:
    - name: Scale out
      condition: event.action == "scale_out"
      action:
        run_playbook:
          name: mlfleet.serving.scale_out
"""

SOURCE = "serving_pressure"
SCALE_OUT = "scale_out"
SCALE_IN = "scale_in"
ALERTNAMES = {SCALE_OUT: "ServingPressureHigh", SCALE_IN: "ServingPressureLow"}
# Server statuses that take traffic: UP, "UP 1/3" (failing checks, still in), and "no check" (a server without checks).
SERVING_STATUSES = ("UP", "no check")
CSV_COLUMNS = ("pxname", "svname", "type", "status", "weight", "qcur", "scur", "rate", "hrsp_5xx", "qtime", "rtime")
ROW_TYPES = {0: "frontend", 1: "backend", 2: "server", 3: "listener"}
MAX_STATS_BYTES = 16 * 1024 * 1024
# How far ahead of a poll's time a recorded action end may lie and still count as ending at that poll: the lease file's
# times come from the scale run's wall clock, the poll's from this source's clock that never jumps.
ACTED_AHEAD_TOLERANCE = 1.0
# ansible-rulebook adds its own arguments (eda_feedback_queue, ...): they are not the user's and are ignored.
RULEBOOK_ARG_PREFIX = "eda_"

logger = logging.getLogger("mlfleet.serving.serving_pressure")


class StatsFormatError(ValueError):
    """The proxy's answer is not HAProxy's CSV statistics."""


class PollError(Exception):
    """No proxy answered with statistics."""


class LeaseReadError(Exception):
    """The lease file exists but cannot be read as the scale playbooks' lease."""


@dataclass(frozen=True)
class LeaseState:
    """What the scale playbooks' lease file says: who holds a live lease (None: nobody), described with why and for how
    long, and when each ``<service>:<action>`` last acted (epoch seconds)."""

    holder: str | None = None
    description: str = ""
    last_actions: dict[str, float] = field(default_factory=dict)
    # Per service, the most replicas its last scale run kept it to.
    max_replicas: dict[str, int] = field(default_factory=dict)
    # Per service, the effective settings its last scale run decided with (cooldown, target_per_replica, ...).
    settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Per service, the fewest replicas its last scale run kept it to (scheduled floors included).
    min_replicas: dict[str, int] = field(default_factory=dict)
    # Per "<service>:<direction>", the decision not to act its last run recorded: at, replicas, desired, until.
    quiet: dict[str, dict[str, Any]] = field(default_factory=dict)


def run_ended(run: Any) -> bool:
    """Whether the playbook run that took a lease is known to have ended: it ran on this host and its process is gone or
    its PID now belongs to a later process. The rule of the collection's lease code (``run_ended`` in
    plugins/module_utils/_lease.py), which ansible-rulebook cannot import here; a test keeps the two equal."""
    if not isinstance(run, dict) or run.get("host") != socket.gethostname():
        return False
    try:
        with open(f"/proc/{run.get('pid')}/stat", "rb") as handle:
            stat = handle.read().decode("utf-8", "replace")
        # Field 22, the start time; the command name (field 2) may hold spaces and parentheses.
        started = int(stat[stat.rindex(")") + 2 :].split()[19])
    except (OSError, ValueError, IndexError):
        started = None
    return started != run.get("started")


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def quiet_entry_ok(entry: Any) -> bool:
    """Whether one recorded decision not to act has the fields this source reads (the lease module checks the rest)."""
    return (
        isinstance(entry, dict)
        and _number(entry.get("at"))
        and all(isinstance(entry.get(key), int) and not isinstance(entry.get(key), bool) for key in ("replicas", "desired"))
        and (entry.get("until") is None or _number(entry.get("until")))
    )


def read_lease(path: str, now: float) -> LeaseState:
    """The scale playbooks' lease file at ``path`` as it stands at ``now`` (epoch seconds); a missing file is an empty one.

    The playbooks replace the file atomically, so a read without their lock sees a whole file.
    """
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except FileNotFoundError:
        return LeaseState()
    except (OSError, ValueError) as exc:
        raise LeaseReadError(f"cannot read the lease file {path}: {exc}") from None
    if not isinstance(data, dict) or "lease" not in data:
        raise LeaseReadError(f"the lease file {path} is not the scale playbooks' lease (no 'lease' key); is lease_file mlfleet_autoscale.lease.path?")
    last_actions = data.get("last_actions", {})
    if not isinstance(last_actions, dict) or not all(isinstance(when, int | float) and not isinstance(when, bool) for when in last_actions.values()):
        raise LeaseReadError(f"the lease file {path} is not the scale playbooks' lease (last_actions is not a map of times)")
    acted = {str(key): float(when) for key, when in last_actions.items()}
    bounds = data.get("bounds", {})
    if not isinstance(bounds, dict) or not all(isinstance(entry, dict) and isinstance(entry.get("max"), int) for entry in bounds.values()):
        raise LeaseReadError(f"the lease file {path} is not the scale playbooks' lease (bounds is not a map of replica bounds)")
    maxima = {str(service): entry["max"] for service, entry in bounds.items()}
    minima = {str(service): entry["min"] for service, entry in bounds.items() if isinstance(entry.get("min"), int)}
    quiet = data.get("quiet", {})
    if not isinstance(quiet, dict) or not all(quiet_entry_ok(entry) for entry in quiet.values()):
        raise LeaseReadError(f"the lease file {path} is not the scale playbooks' lease (quiet is not a map of decisions not to act)")
    recorded = data.get("settings", {})
    if not isinstance(recorded, dict) or not all(isinstance(entry, dict) for entry in recorded.values()):
        raise LeaseReadError(f"the lease file {path} is not the scale playbooks' lease (settings is not a map of settings)")
    known = {
        "last_actions": acted,
        "max_replicas": maxima,
        "min_replicas": minima,
        "settings": {str(service): dict(entry) for service, entry in recorded.items()},
        "quiet": {str(key): dict(entry) for key, entry in quiet.items()},
    }
    lease = data["lease"]
    if lease is None:
        return LeaseState(**known)
    if not isinstance(lease, dict) or not isinstance(lease.get("expires_at"), int | float):
        raise LeaseReadError(f"the lease file {path} is not the scale playbooks' lease (no lease.expires_at); is lease_file mlfleet_autoscale.lease.path?")
    if lease["expires_at"] <= now or run_ended(lease.get("run")):
        return LeaseState(**known)
    holder = str(lease.get("holder", "?"))
    description = f"{holder} ({lease.get('reason') or 'no reason given'}), for {lease['expires_at'] - now:.0f} s more at most"
    return LeaseState(holder, description, **known)


@dataclass(frozen=True)
class StatsRow:
    """One row of HAProxy's CSV statistics, with the columns this source reads."""

    proxy: str
    name: str
    kind: str
    status: str = ""
    qcur: int = 0
    scur: int = 0
    rate: int = 0
    hrsp_5xx: int = 0
    qtime: int = 0
    rtime: int = 0
    # A server's weight; 0 for a standby replica, which the proxy sends no request.
    weight: int = 1


def _int_field(fields: list[str], index: int, column: str, line: int) -> int:
    value = fields[index].strip()
    if not value:
        return 0
    try:
        return int(value)
    except ValueError:
        raise StatsFormatError(f"line {line} of the stats CSV: column {column} is {value[:40]!r}, not an integer") from None


def parse_stats_csv(text: str) -> list[StatsRow]:
    """Rows of HAProxy's ``show stat`` CSV (``GET <stats uri>;csv``); empty numeric fields read as 0.

    Raises StatsFormatError when the text is not that CSV (an HTML page, a JSON error, a truncated answer).
    """
    lines = text.splitlines()
    header_at = next((i for i, line in enumerate(lines) if line.strip()), None)
    if header_at is None or not lines[header_at].startswith("# pxname,svname,"):
        start = lines[header_at][:60] if header_at is not None else ""
        raise StatsFormatError(
            f"the answer is not HAProxy CSV statistics (no '# pxname,svname,...' header; it starts with {start!r}); "
            "is stats_path the CSV URI, such as /stats;csv?"
        )
    header = next(csv.reader([lines[header_at][2:]]))
    missing = [column for column in CSV_COLUMNS if column not in header]
    if missing:
        raise StatsFormatError(f"the stats CSV has no column {', '.join(missing)}; HAProxy 1.8 or later is required")
    at = {column: header.index(column) for column in CSV_COLUMNS}
    rows = []
    for number, line in enumerate(lines[header_at + 1 :], start=header_at + 2):
        if not line.strip():
            continue
        fields = next(csv.reader([line]))
        if len(fields) < len(header):
            raise StatsFormatError(f"line {number} of the stats CSV has {len(fields)} fields, the header {len(header)} (a truncated answer?)")
        kind = ROW_TYPES.get(_int_field(fields, at["type"], "type", number)) if fields[at["type"]].strip() else None
        if kind is None:
            raise StatsFormatError(f"line {number} of the stats CSV: unknown row type {fields[at['type']][:40]!r}")
        rows.append(
            StatsRow(
                proxy=fields[at["pxname"]],
                name=fields[at["svname"]],
                kind=kind,
                status=fields[at["status"]].strip(),
                **{column: _int_field(fields, at[column], column, number) for column in ("qcur", "scur", "rate", "hrsp_5xx", "qtime", "rtime")},
                # Frontends leave it empty; a server always has one.
                weight=_int_field(fields, at["weight"], "weight", number) if fields[at["weight"]].strip() else 1,
            )
        )
    return rows


@dataclass(frozen=True)
class BackendFigures:
    """What one poll says about one backend (one Swarm service)."""

    servers: int
    servers_up: int
    inflight: int
    queued: int
    rtime_ms: int
    qtime_ms: int
    rate: int
    hrsp_5xx: int
    # Standby replicas up: servers at weight 0, which take no request and count neither as serving nor in the load.
    standby_up: int = 0

    @property
    def backlog(self) -> int:
        return self.inflight + self.queued

    @property
    def per_server(self) -> float:
        return self.backlog / max(self.servers_up, 1)


def backend_figures(rows: list[StatsRow]) -> dict[str, BackendFigures]:
    """Figures per backend, by backend name, from the rows of one poll (frontends and listeners are left out)."""
    servers: dict[str, list[StatsRow]] = {}
    backends: dict[str, StatsRow] = {}
    for row in rows:
        if row.kind == "server":
            servers.setdefault(row.proxy, []).append(row)
        elif row.kind == "backend":
            backends[row.proxy] = row
    figures = {}
    for name, backend in backends.items():
        up = [row for row in servers.get(name, []) if row.status.startswith(SERVING_STATUSES)]
        serving = [row for row in up if row.weight > 0]
        figures[name] = BackendFigures(
            servers=len(servers.get(name, [])),
            servers_up=len(serving),
            standby_up=len(up) - len(serving),
            inflight=sum(row.scur for row in serving),
            queued=backend.qcur,
            rtime_ms=backend.rtime,
            qtime_ms=backend.qtime,
            rate=backend.rate,
            hrsp_5xx=backend.hrsp_5xx,
        )
    return figures


def rfc3339(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def fingerprint(service: str, action: str) -> str:
    return hashlib.sha256(f"{SOURCE}:{service}:{action}".encode()).hexdigest()[:16]


@dataclass
class _Window:
    """One service+action: since when its condition holds, since when its window counts, and its last event."""

    began: float | None = None
    counting_from: float | None = None
    last_event: float | None = None


@dataclass(frozen=True)
class Trend:
    """How a backend's backlog moves: requests per second (negative while it falls) over span_s seconds of polls."""

    per_s: float
    span_s: float


class BacklogHistory:
    """A backend's backlog over the last ``trend_for`` seconds of polls, plus the newest poll at or before that bound."""

    def __init__(self, trend_for: float) -> None:
        self.trend_for = trend_for
        self.samples: deque[tuple[float, int]] = deque()

    def add(self, now: float, backlog: int) -> None:
        self.samples.append((now, backlog))
        # Keep one poll at or before the bound, so that a full history spans at least trend_for seconds.
        while len(self.samples) > 2 and self.samples[1][0] <= now - self.trend_for:
            self.samples.popleft()

    def trend(self) -> Trend | None:
        """The least-squares slope of the backlog, once the polls span trend_for seconds (None before)."""
        if len(self.samples) < 2:
            return None
        span = self.samples[-1][0] - self.samples[0][0]
        if span < self.trend_for or span <= 0:
            return None
        times = [when - self.samples[0][0] for when, _backlog in self.samples]
        backlogs = [backlog for _when, backlog in self.samples]
        return Trend(per_s=statistics.linear_regression(times, backlogs).slope, span_s=span)


def drain_seconds(figures: BackendFigures, trend: Trend | None, out_threshold: float) -> float:
    """Seconds until the backlog, at its trend, is down to what the servers up carry below out_threshold; -1 if never.

    A fall over the trend's span of less than one request per server up is jitter, not a trend: each server's in-flight
    count dips by one between two of its requests, and a fitted slope of that size would predict that a steady overload
    (10 clients on 5 servers: backlog 10, then 9 at the last polls) drains in half a minute.
    """
    if trend is None or figures.servers_up == 0 or -trend.per_s * trend.span_s < figures.servers_up:
        return -1.0
    excess = max(figures.backlog - out_threshold * figures.servers_up, 0.0)
    return excess / -trend.per_s


def _seconds(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        return None
    return float(value)


def noop_reason(
    service: str,
    action: str,
    figures: BackendFigures,
    now: float,
    recorded: dict[str, Any],
    acted: dict[str, float],
    quiet: dict[str, dict[str, Any]] | None = None,
    bounds: tuple[int | None, int | None] = (None, None),
    recheck_after: float = 300.0,
) -> tuple[str, str] | None:
    """``(key, reason)`` when a scale run for this event could only decide not to act, else None.

    The playbooks' own rules (``cooldown_left`` and ``desired_replicas`` in plugins/module_utils/_scale_decision.py,
    which ansible-rulebook cannot import here; a test keeps the two equal), applied to ``recorded``, the settings the
    service's last scale run decided with, and ``acted``, the lease file's last_actions. Only what is certain from here:
    the servers up are at most the service's replicas, so a backlog they meet is one the run finds met.

    ``quiet``: the decisions not to act the last runs recorded (the lease file's ``quiet``). Such a decision holds for
    this event while nothing it was made on changed: no run acted since, the service has as many servers up as it had
    replicas, its demand (within ``bounds``, the min and max replicas its last run kept) asks for no more (scale_out)
    or no fewer (scale_in) replicas, its ``until`` has not come, and it is younger than ``recheck_after`` seconds (0:
    never held), after which one run decides again.
    """
    cooldown = recorded.get("cooldown") if isinstance(recorded.get("cooldown"), dict) else {}

    def waits(direction: str, setting: str) -> float:
        length, last = _seconds(cooldown.get(setting)), acted.get(f"{service}:{direction}")
        return 0.0 if length is None or last is None else length - (now - last)

    left = max(waits(action, action), waits(SCALE_OUT, "scale_in_after_scale_out") if action == SCALE_IN else 0.0, 0.0)
    if left > 0:
        return "cooldown", f"{service}: {action} is cooling down for {math.ceil(left)} s more"
    target = _seconds(recorded.get("target_per_replica"))
    if action == SCALE_OUT and target and figures.servers_up > 0:
        desired = max(0, math.ceil(figures.backlog / target - 1e-9))
        if desired <= figures.servers_up:
            return "demand_met", (
                f"{service}: {figures.backlog} requests in flight and queued need {desired} replicas at {target:g} each; {figures.servers_up} serve"
            )
    entry = (quiet or {}).get(f"{service}:{action}")
    if entry is None or not target or recheck_after <= 0:
        return None
    at, until = float(entry["at"]), entry.get("until")
    unchanged = (
        at <= now < at + recheck_after
        and (until is None or now < until)
        and not any(when > at for when in acted.values())
        and figures.servers_up == entry["replicas"]
    )
    if not unchanged:
        return None
    lowest = bounds[0] if bounds[0] is not None else _whole(recorded.get("min"), 0)
    highest = bounds[1] if bounds[1] is not None else _whole(recorded.get("max"), 10**9)
    desired = min(max(math.ceil(figures.backlog / target - 1e-9), lowest), highest)
    if (action == SCALE_OUT and desired <= entry["desired"]) or (action == SCALE_IN and desired >= entry["desired"]):
        decided = time.strftime("%H:%M:%S", time.gmtime(at))
        return "unchanged", (
            f"{service}: nothing changed since its run at {decided} UTC decided not to {action.replace('_', ' ')} "
            f"({entry['replicas']} replicas, {entry['desired']} desired, now {desired}); asked again at most every {recheck_after:g} s"
        )
    return None


def _whole(value: Any, default: int) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else default


@dataclass
class PressureTracker:
    """The decisions, free of I/O and clocks: feed it every poll's rows with the poll's time, get the events to emit."""

    out_threshold: float = 4.0
    out_queue: int = 0
    out_for: float = 6.0
    in_threshold: float = 0.5
    in_for: float = 60.0
    repeat_after: float = 30.0
    in_repeat_after: float = 300.0
    recheck_after: float = 300.0
    trend_for: float = 30.0
    services: list[str] | None = None
    ignore_backends: list[str] = field(default_factory=lambda: ["stats"])
    cluster: str | None = None
    _windows: dict[tuple[str, str], _Window] = field(default_factory=dict, init=False, repr=False)
    _previous: dict[str, BackendFigures] = field(default_factory=dict, init=False, repr=False)
    _histories: dict[str, BacklogHistory] = field(default_factory=dict, init=False, repr=False)
    _missing_reported: set[str] = field(default_factory=set, init=False, repr=False)
    # The service+action pairs whose event the last observe() held back.
    held_back: list[tuple[str, str]] = field(default_factory=list, init=False, repr=False)
    # When each "<service>:<action>" last acted (the lease file's last_actions), as the last observe() was given it.
    _acted: dict[str, float] = field(default_factory=dict, init=False, repr=False)
    # Per service, the most replicas its last scale run kept it to (the lease file's bounds), as last given.
    _max_replicas: dict[str, int] = field(default_factory=dict, init=False, repr=False)
    # Per service, the settings its last scale run decided with (the lease file's settings), as last given.
    _settings: dict[str, dict[str, Any]] = field(default_factory=dict, init=False, repr=False)
    # Per service, the fewest replicas its last scale run kept it to (the lease file's bounds), as last given.
    _min_replicas: dict[str, int] = field(default_factory=dict, init=False, repr=False)
    # The decisions not to act the last runs recorded (the lease file's quiet), as last given.
    _quiet: dict[str, dict[str, Any]] = field(default_factory=dict, init=False, repr=False)
    # The events the last observe() did not emit because their run could only decide not to act:
    # (service, action, reason key, reason, values).
    suppressed: list[tuple[str, str, str, str, dict[str, Any]]] = field(default_factory=list, init=False, repr=False)
    _due_noops: set[tuple[str, str]] = field(default_factory=set, init=False, repr=False)

    def watched(self, name: str, figures: BackendFigures) -> bool:
        if figures.servers == 0:
            return False
        if self.services is not None:
            return name in self.services
        return name not in self.ignore_backends

    def reset(self) -> None:
        """Forget what the polls so far saw (after a failed poll), keeping when each event was last emitted."""
        self._previous = {}
        self._histories = {}
        for window in self._windows.values():
            window.began = window.counting_from = None

    def observe(
        self,
        rows: list[StatsRow],
        now: float,
        hold: bool = False,
        acted: dict[str, float] | None = None,
        max_replicas: dict[str, int] | None = None,
        settings: dict[str, dict[str, Any]] | None = None,
        min_replicas: dict[str, int] | None = None,
        quiet: dict[str, dict[str, Any]] | None = None,
    ) -> list[dict[str, Any]]:
        """Take one poll's rows, seen at ``now`` (epoch seconds); return the events it causes.

        ``hold``: a scale action is running; an event that falls due is not emitted and stays due (see held_back).
        ``acted``: when each ``<service>:<action>`` last acted (epoch seconds): such an end restarts the window and the
        repeat wait as an event would. ``max_replicas``: per service, the most replicas its last scale run kept it to; a
        service with as many servers up asks for scale_out only every in_repeat_after seconds. ``settings``: per service,
        the settings its last scale run decided with; an event whose run could only decide not to act (``noop_reason``)
        is not emitted and stays due (see suppressed). ``min_replicas``: per service, the fewest replicas its last scale
        run kept it to; ``quiet``: the decisions not to act the last runs recorded (see noop_reason).
        """
        self.held_back = []
        self.suppressed = []
        self._due_noops = set()
        self._acted = acted or {}
        self._max_replicas = max_replicas or {}
        self._settings = settings or {}
        self._min_replicas = min_replicas or {}
        self._quiet = quiet or {}
        current = backend_figures(rows)
        self._report_missing(current)
        events = []
        for name in sorted(current):
            figures = current[name]
            history = self._histories.setdefault(name, BacklogHistory(self.trend_for))
            history.add(now, figures.backlog)
            previous = self._previous.get(name)
            if previous is None or not self.watched(name, figures):
                continue
            # A counter below the previous one means the proxy restarted and counts from zero again.
            errors = figures.hrsp_5xx - previous.hrsp_5xx if figures.hrsp_5xx >= previous.hrsp_5xx else figures.hrsp_5xx
            stranded = figures.servers_up == 0 and figures.queued + figures.inflight > 0
            overloaded = stranded or figures.per_server >= self.out_threshold or figures.queued > self.out_queue
            idle = figures.servers_up > 0 and figures.per_server <= self.in_threshold and figures.queued == 0
            at_maximum = name in self._max_replicas and figures.servers_up >= self._max_replicas[name]
            for action, holds, window_s in ((SCALE_OUT, overloaded, self.out_for), (SCALE_IN, idle, self.in_for)):
                slow = action == SCALE_IN or at_maximum
                noop = None
                if holds and name in self._settings:
                    bounds = (self._min_replicas.get(name), self._max_replicas.get(name))
                    noop = noop_reason(name, action, figures, now, self._settings[name], self._acted, self._quiet, bounds, self.recheck_after)
                began = self._step(name, action, holds, window_s, now, hold, slow, noop is not None)
                values = _values(figures, errors, history.trend(), self.out_threshold) | {"window_s": window_s}
                if began is not None:
                    events.append(self._event(name, action, began, now, values | {"held_s": round(now - began, 3)}))
                elif noop is not None and (name, action) in self._due_noops:
                    self.suppressed.append((name, action, *noop, values))
        for (name, _action), window in self._windows.items():
            if name not in current:
                window.began = window.counting_from = None
        for name in set(self._histories) - set(current):
            del self._histories[name]
        self._previous = current
        return events

    def _step(
        self, service: str, action: str, holds: bool, window_s: float, now: float, hold: bool = False, slow: bool = False, noop: bool = False
    ) -> float | None:
        """Advance one service+action's window; when an event is due, return since when its condition holds. ``slow``:
        at most one event per in_repeat_after rather than repeat_after. ``noop``: its run could only decide not to act;
        a due event stays due (noted in _due_noops) and is not emitted."""
        window = self._windows.setdefault((service, action), _Window())
        if not holds:
            window.began = window.counting_from = None
            return None
        if window.began is None or window.counting_from is None:
            window.began = window.counting_from = now
        last = window.last_event
        acted_at = self._acted.get(f"{service}:{action}")
        # An action that ended while this poll was under way is a little ahead of the poll's time: it counts as ending
        # now. One further ahead (the wall clock stepped back since it was recorded) would hold the window back until
        # the clock caught up: such an action is left out.
        if acted_at is not None and now < acted_at <= now + ACTED_AHEAD_TOLERANCE:
            acted_at = now
        if acted_at is not None and acted_at <= now:
            # The condition has to hold for a whole window after the action, on the capacity it left.
            window.counting_from = max(window.counting_from, acted_at)
            last = acted_at if last is None else max(last, acted_at)
        if now - window.counting_from < window_s:
            return None
        repeat_after = self.in_repeat_after if slow else self.repeat_after
        if last is not None and now - last < repeat_after:
            return None
        if noop:
            self._due_noops.add((service, action))
            return None
        if hold:
            self.held_back.append((service, action))
            return None
        window.last_event = now
        # Re-arm: the next event of this action needs the condition to hold for a whole window from here.
        window.counting_from = now
        return window.began

    def _event(self, service: str, action: str, began: float, now: float, values: dict[str, int | float]) -> dict[str, Any]:
        labels = {"action": action, "service": service}
        if self.cluster:
            labels["cluster"] = self.cluster
        return {
            "action": action,
            "status": "firing",
            "service": service,
            "cluster": self.cluster,
            "alertname": ALERTNAMES[action],
            "labels": labels,
            "values": values,
            "fingerprint": fingerprint(service, action),
            "startsAt": rfc3339(began),
            "source": SOURCE,
            "received_at": now,
        }

    def _report_missing(self, current: dict[str, BackendFigures]) -> None:
        for name in self.services or ():
            if name in current and current[name].servers > 0:
                self._missing_reported.discard(name)
            elif name not in self._missing_reported:
                self._missing_reported.add(name)
                known = ", ".join(sorted(backend for backend, figures in current.items() if figures.servers > 0)) or "none"
                logger.warning("serving_pressure: service %r (from services) is not a backend with servers in the proxy's stats; those are: %s", name, known)


def _values(figures: BackendFigures, errors_5xx: int, trend: Trend | None, out_threshold: float) -> dict[str, int | float]:
    return {
        "servers_up": figures.servers_up,
        "standby_up": figures.standby_up,
        "inflight": figures.inflight,
        "queued": figures.queued,
        "per_server": round(figures.per_server, 3),
        "rtime_ms": figures.rtime_ms,
        "qtime_ms": figures.qtime_ms,
        "rate": figures.rate,
        "errors_5xx": errors_5xx,
        "backlog": figures.backlog,
        "backlog_trend": round(trend.per_s, 3) if trend else 0.0,
        "trend_s": round(trend.span_s, 3) if trend else 0.0,
        "drain_s": round(drain_seconds(figures, trend, out_threshold), 1),
    }


# Arguments: name -> (kind, default). Kinds: str, path, bool, number, int, list.
ARGUMENTS: dict[str, tuple[str, Any]] = {
    "url": ("str", None),
    "urls": ("list", None),
    "stats_path": ("str", "/stats;csv"),
    "token": ("str", None),
    "token_file": ("path", None),
    "insecure_no_auth": ("bool", False),
    "ca_file": ("path", None),
    "validate_certs": ("bool", True),
    "timeout": ("number", 3.0),
    "interval": ("number", 2.0),
    "out_threshold": ("number", 4.0),
    "out_queue": ("int", 0),
    "out_for": ("number", 6.0),
    "in_threshold": ("number", 0.5),
    "in_for": ("number", 60.0),
    "repeat_after": ("number", 30.0),
    "in_repeat_after": ("number", 300.0),
    "recheck_after": ("number", 300.0),
    "trend_for": ("number", 30.0),
    "services": ("list", None),
    "ignore_backends": ("list", ("stats",)),
    "cluster": ("str", None),
    "lease_file": ("path", None),
    "audit_log": ("path", None),
}
BOOL_WORDS = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}


def _arg_error(name: str, problem: str) -> ValueError:
    return ValueError(f"mlfleet.serving.serving_pressure: argument '{name}' {problem}")


def _convert(name: str, kind: str, value: Any) -> Any:
    if kind in ("str", "path"):
        if not isinstance(value, str) or not value.strip():
            raise _arg_error(name, f"must be a non-empty string, got {type(value).__name__}")
        return os.path.expanduser(value) if kind == "path" else value.strip()
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in BOOL_WORDS:
            return BOOL_WORDS[value.strip().lower()]
        raise _arg_error(name, "must be true or false")
    if kind in ("number", "int"):
        if isinstance(value, bool):
            raise _arg_error(name, f"must be a number, got {value!r}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise _arg_error(name, f"must be a number, got {str(value)[:40]!r}") from None
        if not math.isfinite(number):
            raise _arg_error(name, f"must be a finite number, got {value!r}")
        if kind == "int":
            if number != int(number):
                raise _arg_error(name, f"must be a whole number, got {value!r}")
            return int(number)
        return number
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(item, str) and item.strip() for item in value):
        raise _arg_error(name, "must be a list of non-empty strings")
    return [item.strip() for item in value]


@dataclass(frozen=True)
class Settings:
    urls: list[str]
    stats_path: str
    token: str | None = field(repr=False)
    ssl_context: ssl.SSLContext | bool
    timeout: float
    interval: float
    tracker: PressureTracker
    lease_file: str | None = None
    audit_log: str | None = None


def _check_url(url: str, name: str, with_token: bool) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise _arg_error(name, f"must be an http(s) URL such as https://192.168.213.10:8404, got {url!r}")
    if parts.username or parts.password:
        raise _arg_error(name, "must not carry credentials; give the stats token in 'token' or 'token_file'")
    if parts.query or parts.fragment:
        raise _arg_error(name, f"must be the stats frontend's base URL without query or fragment, got {url!r}")
    if parts.scheme == "http" and with_token:
        raise _arg_error(name, f"is plain http ({url!r}): the stats token would cross the network in clear; use https")
    return url.rstrip("/")


def _read_token_file(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as handle:
            token = handle.read().strip()
    except OSError as exc:
        raise _arg_error("token_file", f"names a file that cannot be read ({path}: {exc.strerror})") from None
    if not token:
        raise _arg_error("token_file", f"names an empty file ({path}); put the stats token in it")
    return token


def _ssl_context(ca_file: str | None, validate_certs: bool) -> ssl.SSLContext | bool:
    if ca_file and not validate_certs:
        raise _arg_error("ca_file", "is set while validate_certs is false; drop one of them")
    if not validate_certs:
        return False
    try:
        return ssl.create_default_context(cafile=ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise _arg_error("ca_file", f"cannot be loaded as PEM CA certificates ({ca_file}: {exc})") from None


def parse_args(args: dict[str, Any]) -> Settings:
    """Check the source's arguments; raise ValueError naming the argument and the fix."""
    unknown = sorted(name for name in args if name not in ARGUMENTS and not name.startswith(RULEBOOK_ARG_PREFIX))
    if unknown:
        raise ValueError(f"mlfleet.serving.serving_pressure: unknown argument(s) {', '.join(unknown)}; known: {', '.join(ARGUMENTS)}")
    # An empty string is "not set": rulebooks pass optional values as "{{ var | default('') }}".
    given = {name: _convert(name, ARGUMENTS[name][0], value) for name, value in args.items() if name in ARGUMENTS and value is not None and value != ""}
    values = {name: given.get(name, default) for name, (_kind, default) in ARGUMENTS.items()}
    for name in ("timeout", "interval", "trend_for"):
        if values[name] <= 0:
            raise _arg_error(name, f"must be > 0 seconds, got {values[name]:g}")
    for name in ("out_for", "in_for", "repeat_after", "in_repeat_after", "recheck_after", "in_threshold", "out_queue"):
        if values[name] < 0:
            raise _arg_error(name, f"must be >= 0, got {values[name]:g}")
    if values["out_threshold"] <= values["in_threshold"]:
        problem = f"({values['out_threshold']:g}) must be above in_threshold ({values['in_threshold']:g}): a load cannot be both high and low"
        raise _arg_error("out_threshold", problem)
    if values["services"] == []:
        raise _arg_error("services", "is an empty list, so nothing would be watched; leave it out to watch every backend")
    if not values["stats_path"].startswith("/"):
        raise _arg_error("stats_path", f"must start with '/', got {values['stats_path']!r}")

    if values["url"] is None and values["urls"] is None:
        raise _arg_error("url", "is required (or 'urls'): the base URL of the proxy's stats frontend, such as https://192.168.213.10:8404")
    if values["url"] is not None and values["urls"] is not None:
        raise _arg_error("url", "and 'urls' are both given; give one of them")
    token_sources = [name for name in ("token", "token_file") if values[name] is not None]
    if values["insecure_no_auth"]:
        if token_sources:
            raise _arg_error(token_sources[0], "is given while insecure_no_auth is true; drop one of them")
        token = None
    elif len(token_sources) != 1:
        raise _arg_error("token", "or 'token_file' is required (exactly one of them), or set insecure_no_auth: true for a proxy without the bearer check")
    else:
        token = values["token"] if values["token"] is not None else _read_token_file(values["token_file"])
        if any(char.isspace() or not char.isprintable() for char in token):
            raise _arg_error(token_sources[0], "holds whitespace or control characters inside the token; a bearer token has none")
    url_name = "url" if values["url"] is not None else "urls"
    urls = [_check_url(url, url_name, token is not None) for url in ([values["url"]] if values["url"] is not None else values["urls"])]
    if not urls:
        raise _arg_error("urls", "must list at least one URL")

    tracker = PressureTracker(
        out_threshold=values["out_threshold"],
        out_queue=values["out_queue"],
        out_for=values["out_for"],
        in_threshold=values["in_threshold"],
        in_for=values["in_for"],
        repeat_after=values["repeat_after"],
        in_repeat_after=values["in_repeat_after"],
        recheck_after=values["recheck_after"],
        trend_for=values["trend_for"],
        services=values["services"],
        ignore_backends=list(values["ignore_backends"]),
        cluster=values["cluster"],
    )
    return Settings(
        urls=urls,
        stats_path=values["stats_path"],
        token=token,
        ssl_context=_ssl_context(values["ca_file"], values["validate_certs"]),
        timeout=values["timeout"],
        interval=values["interval"],
        tracker=tracker,
        lease_file=values["lease_file"],
        audit_log=values["audit_log"],
    )


async def _get_stats(session: aiohttp.ClientSession, url: str, settings: Settings) -> str:
    headers = {"Authorization": f"Bearer {settings.token}"} if settings.token else {}
    async with session.get(url + settings.stats_path, headers=headers, ssl=settings.ssl_context, allow_redirects=False) as response:
        if response.status == 401:
            raise PollError("HTTP 401: the proxy refused the stats token; check token / token_file against edge_proxy_stats_tokens")
        if response.status != 200:
            raise PollError(f"HTTP {response.status} {response.reason or ''}".rstrip())
        # StreamReader.read(n) returns what has arrived so far, at most n bytes: read on until the end, bounded.
        body = b""
        while len(body) <= MAX_STATS_BYTES:
            chunk = await response.content.read(MAX_STATS_BYTES + 1 - len(body))
            if not chunk:
                break
            body += chunk
        if len(body) > MAX_STATS_BYTES:
            raise PollError(f"the answer is larger than {MAX_STATS_BYTES} bytes; is stats_path the CSV statistics?")
        return body.decode("utf-8", errors="replace")


async def poll(session: aiohttp.ClientSession, settings: Settings, order: list[str]) -> list[StatsRow]:
    """Rows from the first proxy that answers with statistics, in ``order``; moves that proxy to the front of it."""
    problems = []
    for url in list(order):
        try:
            rows = parse_stats_csv(await _get_stats(session, url, settings))
        except (PollError, StatsFormatError) as exc:
            problems.append(f"{url}{settings.stats_path}: {exc}")
        except (aiohttp.ClientError, TimeoutError, ssl.SSLError, OSError) as exc:
            problems.append(f"{url}{settings.stats_path}: {type(exc).__name__}: {str(exc) or 'no answer within timeout'}")
        else:
            order.remove(url)
            order.insert(0, url)
            return rows
    raise PollError("; ".join(problems))


class LeaseWatch:
    """Reads the lease file for main() and logs what it holds back: once per service, action and lease holder."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        self.state = LeaseState()
        self.reported: set[tuple[str, str, str]] = set()
        self.last_problem: tuple[str, float] | None = None

    def read(self, now: float) -> LeaseState:
        """The file as it stands; an unreadable one is reported (once a minute) and read as empty."""
        if self.path is None:
            return self.state
        try:
            self.state = read_lease(self.path, time.time())
        except LeaseReadError as exc:
            self.state = LeaseState()
            if self.last_problem is None or self.last_problem[0] != str(exc) or now - self.last_problem[1] >= 60:
                logger.warning("serving_pressure: %s; events are not held back", exc)
                self.last_problem = (str(exc), now)
            return self.state
        self.last_problem = None
        if self.state.holder is None:
            self.reported.clear()
        return self.state

    def report(self, held_back: list[tuple[str, str]], now: float) -> None:
        holder = self.state.holder
        for service, action in held_back:
            if holder is not None and (service, action, holder) not in self.reported:
                self.reported.add((service, action, holder))
                logger.info("serving_pressure: %s for %s held back while a scale action holds the lease: %s", action, service, self.state.description)


class SuppressedDecisions:
    """The events not emitted because their run could only decide not to act, summarised: one audit record per service,
    action and reason per ``period`` seconds, with the count, appended to the playbooks' JSON-lines audit trail (as
    plugins/module_utils/_audit.py writes it: the log opened for appending, under an exclusive lock, one line, fsync)."""

    def __init__(self, path: str | None, cluster: str | None, period: float = 60.0) -> None:
        self.path = path
        self.cluster = cluster or "mlfleet"
        self.period = period
        # (service, action, key) -> [first seen, count, last reason, last values]
        self.pending: dict[tuple[str, str, str], list[Any]] = {}

    def add(self, suppressed: list[tuple[str, str, str, str, dict[str, Any]]], now: float) -> None:
        for service, action, key, reason, values in suppressed:
            entry = self.pending.setdefault((service, action, key), [now, 0, reason, values])
            entry[1] += 1
            entry[2:] = [reason, values]

    def due(self, now: float, everything: bool = False) -> list[dict[str, Any]]:
        """The records of the summaries whose period has passed (or all, with ``everything``), taken out of pending."""
        records = []
        for (service, action, key), (first, count, reason, values) in sorted(self.pending.items()):
            if not everything and now - first < self.period:
                continue
            del self.pending[(service, action, key)]
            span = max(now - first, 0.0)
            records.append(
                {
                    "time": datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
                    "event_id": f"{SOURCE}:{service}:{action}:{key}:{first:.3f}",
                    "kind": "scale",
                    "action": action,
                    "decision": "not_acted",
                    "source": SOURCE,
                    "service": service,
                    "cluster": self.cluster,
                    "reason": f"not emitted {count} times in {span:.0f} s, the run could only decide not to act: {reason}",
                    "values": values | {"suppressed": True, "suppressed_because": key},
                    "fields": {"suppressed": count, "suppressed_s": round(span, 1)},
                }
            )
        return records

    def write(self, records: list[dict[str, Any]]) -> None:
        for record in records:
            logger.info("serving_pressure: %s for %s: %s", record["action"], record["service"], record["reason"])
        if not self.path or not records:
            return
        payload = b"".join((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8") for record in records)
        try:
            os.makedirs(os.path.dirname(self.path) or ".", mode=0o700, exist_ok=True)
            descriptor = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
            with os.fdopen(descriptor, "a+b") as handle:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
                # A line cut short by a crash is closed first, so the new lines stand alone.
                handle.seek(0, os.SEEK_END)
                if handle.tell():
                    handle.seek(-1, os.SEEK_END)
                    if handle.read(1) != b"\n":
                        handle.write(b"\n")
                handle.write(payload)
                handle.flush()
                os.fsync(handle.fileno())
        except OSError as exc:
            logger.warning("serving_pressure: cannot append to the audit log %s: %s", self.path, exc.strerror)


def _clock():
    """Epoch seconds that never jump with the wall clock (the windows are measured with it)."""
    wall, mono = time.time(), time.monotonic()
    return lambda: wall + (time.monotonic() - mono)


async def main(queue: asyncio.Queue[Any], args: dict[str, Any]) -> None:
    """Poll the edge proxy's stats and put scale events on the queue."""
    settings = parse_args(args)
    tracker = settings.tracker
    now = _clock()
    order = list(settings.urls)
    failures = consecutive_failures = 0
    last_warning: tuple[str, float] | None = None
    lease_watch = LeaseWatch(settings.lease_file)
    suppressed = SuppressedDecisions(settings.audit_log, tracker.cluster)
    logger.info("serving_pressure: polling %s every %gs", ", ".join(u + settings.stats_path for u in settings.urls), settings.interval)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=settings.timeout)) as session:
        try:
            while True:
                started = now()
                try:
                    rows = await poll(session, settings, order)
                except PollError as exc:
                    failures += 1
                    consecutive_failures += 1
                    tracker.reset()
                    message = str(exc)
                    # The same error is repeated once a minute, not every poll; a new error at once.
                    if last_warning is None or last_warning[0] != message or started - last_warning[1] >= 60:
                        logger.warning("serving_pressure: poll failed (%d failed polls so far): %s", failures, message)
                        last_warning = (message, started)
                else:
                    if consecutive_failures:
                        logger.info("serving_pressure: %s answers again after %d failed polls; windows start again", order[0], consecutive_failures)
                        consecutive_failures, last_warning = 0, None
                    lease = lease_watch.read(started)
                    # Observed once the lease is read: a scale action that ended during the poll lies before this time.
                    observed = now()
                    events = tracker.observe(
                        rows,
                        observed,
                        hold=lease.holder is not None,
                        acted=lease.last_actions,
                        max_replicas=lease.max_replicas,
                        settings=lease.settings,
                        min_replicas=lease.min_replicas,
                        quiet=lease.quiet,
                    )
                    lease_watch.report(tracker.held_back, observed)
                    suppressed.add(tracker.suppressed, observed)
                    suppressed.write(suppressed.due(observed))
                    for event in events:
                        event["received_at"] = time.time()
                        logger.info("serving_pressure: %s for %s: %s", event["action"], event["service"], event["values"])
                        await queue.put(event)
                await asyncio.sleep(max(0.0, settings.interval - (now() - started)))
        except asyncio.CancelledError:
            logger.info("serving_pressure: cancelled after %d failed polls", failures)
            suppressed.write(suppressed.due(now(), everything=True))
            raise


if __name__ == "__main__":
    # python serving_pressure.py '{"url": "https://127.0.0.1:8404", "token_file": "stats.token", "ca_file": "ca.pem"}'

    class MockQueue(asyncio.Queue[Any]):
        """A queue that prints the events."""

        async def put(self, event: dict[str, Any]) -> None:
            print(json.dumps(event))  # noqa: T201

    logging.basicConfig(level=logging.INFO)
    asyncio.run(main(MockQueue(), json.loads(sys.argv[1]) if len(sys.argv) > 1 else {}))
