# Copyright (c) mlfleet.serving maintainers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""mlfleet.serving.scale_schedule: scale-out events before a known peak, from a daily schedule.

A reactive scale-out that clones VMs takes a minute or more; a latency target cannot hold through a step of load that
arrives all at once. For a peak that comes at a known time, this source asks for the capacity ahead of it. The decision
logic is the pure class Schedule; main() only sleeps and puts its events on the queue.
"""

import asyncio
import hashlib
import json
import logging
import math
import re
import sys
import time
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from datetime import time as clock_time
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

DOCUMENTATION = r"""
---
short_description: Scale-out events ahead of known peaks, from a daily schedule of replica floors.
description:
  - "Each entry of O(schedule) is a daily window, O(schedule[].start) to O(schedule[].end) (local time of O(timezone)),
    in which service O(schedule[].service) must have at least O(schedule[].replicas) replicas. O(lead) seconds before a
    window starts, the source puts a C(scale_out) event for the service on the queue, and again every O(repeat_after)
    seconds until the window ends, so that a run turned away by another's lease, or one that failed, is made good."
  - "The scale playbooks (C(mlfleet.serving.scale_out)) raise the service to at least the floor, cloning worker VMs
    when the replicas do not fit, and record the floor until the window's end in the lease file: a scale-in during the
    window keeps it. After the window the other sources scale in as the load allows."
  - "A window whose end is at or before its start ends the next day (V(22:00) to V(02:00)). With O(schedule[].days),
    only windows that start on those days count. When the source starts inside a window (or within O(lead) of one), it
    asks at once."
  - "Every event has this shape: C(action) (V(scale_out)), C(status) (V(firing)), C(service), C(cluster), C(alertname)
    (V(ScheduledCapacity)), C(labels) (action, service, schedule and, when set, cluster), C(min_replicas), C(until) (the
    window's end, epoch seconds), C(values) (C(min_replicas), C(window_start) and C(window_end) in epoch seconds,
    C(lead_s), C(schedule), the entry's name), C(fingerprint) (the first 16 hex digits of the SHA-256 of
    C(scale_schedule:<name>:<window start>)), C(startsAt) (RFC 3339, when the event first fell due), C(source)
    (V(schedule)) and C(received_at) (epoch seconds)."
  - "Times are read from the wall clock every time the source wakes (at most every 30 s), so a clock that is set
    forward or back is followed within 30 s."
author:
  - mlfleet.serving maintainers (@mlfleet)
version_added: 0.1.0
options:
  schedule:
    description:
      - The daily windows. An empty list is allowed; the source then never puts an event on the queue.
    type: list
    elements: dict
    default: []
    suboptions:
      service:
        description: The Swarm service (the served model's service in C(mlfleet_serving)).
        type: str
        required: true
      replicas:
        description: The fewest replicas the service has during the window; 1 or more.
        type: int
        required: true
      start:
        description: When the window starts, V(HH:MM) or V(HH:MM:SS) local time of O(timezone).
        type: str
        required: true
      end:
        description: When it ends, V(HH:MM) or V(HH:MM:SS); at or before O(schedule[].start), the next day.
        type: str
        required: true
      days:
        description: Weekdays on which a window starts (V(mon) to V(sun)); every day when left out.
        type: list
        elements: str
      name:
        description: A name for the entry, in the events and the audit trail; C(<service> <start>-<end>) when left out.
        type: str
  timezone:
    description:
      - The IANA time zone of the entries' times, for example V(Europe/London); its daylight saving time is followed.
    type: str
    default: UTC
  lead:
    description:
      - Seconds before a window's start at which the first event goes out. Make it as long as a scale-out that clones
        worker VMs takes, from the event to serving replicas (the audit trail's C(total_s) of such a run), plus a margin.
    type: float
    default: 300
  repeat_after:
    description:
      - Seconds between the events of one window. Each event starts a scale run; one that finds the floor in place
        does not act.
    type: float
    default: 300
  cluster:
    description:
      - The cluster label of the events.
    type: str
"""

EXAMPLES = r"""
- name: Capacity ahead of the working day's peak
  hosts: localhost
  sources:
    - mlfleet.serving.scale_schedule:
        timezone: Europe/London
        lead: 240
        cluster: lab
        schedule:
          - name: office hours
            service: resnet18
            replicas: 4
            start: "08:30"
            end: "18:00"
            days: [mon, tue, wed, thu, fri]
  rules:
    - name: Scale to the scheduled floor
      condition: event.action == "scale_out" and event.source == "schedule"
      action:
        run_playbook:
          name: mlfleet.serving.scale_out
"""

SOURCE = "schedule"
ALERTNAME = "ScheduledCapacity"
DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
TIME_OF_DAY = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)(?::([0-5]\d))?$")
ENTRY_KEYS = {"service", "replicas", "start", "end", "days", "name"}
# The longest sleep: the wall clock is read again at least this often.
MAX_SLEEP = 30.0
# ansible-rulebook adds its own arguments (eda_feedback_queue, ...): they are not the user's and are ignored.
RULEBOOK_ARG_PREFIX = "eda_"
ARGUMENTS = {"schedule": [], "timezone": "UTC", "lead": 300, "repeat_after": 300, "cluster": None}

logger = logging.getLogger("mlfleet.serving.scale_schedule")


@dataclass(frozen=True)
class Entry:
    name: str
    service: str
    replicas: int
    start: clock_time
    end: clock_time
    days: frozenset[int]


@dataclass(frozen=True)
class Window:
    entry: Entry
    start: float
    end: float


def _arg_error(name: str, problem: str) -> ValueError:
    return ValueError(f"mlfleet.serving.scale_schedule: {name} {problem}")


def _time_of_day(where: str, key: str, value: Any) -> clock_time:
    match = TIME_OF_DAY.match(str(value).strip()) if isinstance(value, str) else None
    if not match:
        raise _arg_error(f"{where}.{key}", f"must be a time of day HH:MM or HH:MM:SS such as '08:30', got {value!r}")
    return clock_time(int(match[1]), int(match[2]), int(match[3] or 0))


def _number(name: str, value: Any, minimum: float) -> float:
    if isinstance(value, bool):
        raise _arg_error(name, f"must be a number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise _arg_error(name, f"must be a number of seconds, got {str(value)[:40]!r}") from None
    if not math.isfinite(number) or number < minimum:
        raise _arg_error(name, f"must be a number of seconds of {minimum:g} or more, got {value!r}")
    return number


def parse_entry(index: int, raw: Any) -> Entry:
    where = f"schedule[{index}]"
    if not isinstance(raw, dict):
        raise _arg_error(where, f"must be a mapping with service, replicas, start and end, got {str(raw)[:60]!r}")
    unknown = sorted(set(raw) - ENTRY_KEYS)
    if unknown:
        raise _arg_error(where, f"has unknown keys {', '.join(unknown)}; the keys are {', '.join(sorted(ENTRY_KEYS))}")
    missing = [key for key in ("service", "replicas", "start", "end") if raw.get(key) in (None, "")]
    if missing:
        raise _arg_error(where, f"lacks {', '.join(missing)}; an entry needs service, replicas, start and end")
    service = raw["service"]
    if not isinstance(service, str) or not service.strip():
        raise _arg_error(f"{where}.service", f"must be the name of a Swarm service, got {service!r}")
    replicas = raw["replicas"]
    if isinstance(replicas, str) and replicas.strip().isdigit():
        replicas = int(replicas)
    if not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < 1:
        raise _arg_error(f"{where}.replicas", f"must be a whole number of 1 or more, got {replicas!r}")
    start, end = _time_of_day(where, "start", raw["start"]), _time_of_day(where, "end", raw["end"])
    if start == end:
        raise _arg_error(where, f"starts and ends at {raw['start']}: a window of 24 h is a floor for good; raise the service's min replicas instead")
    days = raw.get("days")
    if days is None:
        weekdays = frozenset(range(7))
    else:
        if isinstance(days, str) or not isinstance(days, list) or not days:
            raise _arg_error(f"{where}.days", f"must be a list of weekdays such as [mon, tue], got {days!r}")
        wrong = [day for day in days if not isinstance(day, str) or day.strip().lower()[:3] not in DAYS]
        if wrong:
            raise _arg_error(f"{where}.days", f"has {wrong!r}, which are not weekdays; use {', '.join(DAYS)}")
        weekdays = frozenset(DAYS.index(day.strip().lower()[:3]) for day in days)
    name = raw.get("name") or f"{service.strip()} {raw['start']}-{raw['end']}"
    if not isinstance(name, str):
        raise _arg_error(f"{where}.name", f"must be a string, got {name!r}")
    return Entry(name=name, service=service.strip(), replicas=replicas, start=start, end=end, days=weekdays)


class Schedule:
    """The windows of the entries and which are due: pure, every time passed in as epoch seconds."""

    def __init__(self, entries: list[Entry], zone: Any, lead: float, repeat_after: float, cluster: str | None = None) -> None:
        self.entries = entries
        self.zone = zone
        self.lead = lead
        self.repeat_after = repeat_after
        self.cluster = cluster
        # (entry name, window start) -> (first event, last event), epoch seconds
        self.sent: dict[tuple[str, float], tuple[float, float]] = {}

    def windows(self, entry: Entry, now: float) -> list[Window]:
        """The entry's windows that start from a day before ``now`` to a week after, in order."""
        today = datetime.fromtimestamp(now, self.zone).date()
        found = []
        for offset in range(-1, 8):
            day: date = today + timedelta(days=offset)
            if day.weekday() not in entry.days:
                continue
            start = datetime.combine(day, entry.start, tzinfo=self.zone)
            end_day = day if entry.end > entry.start else day + timedelta(days=1)
            end = datetime.combine(end_day, entry.end, tzinfo=self.zone)
            found.append(Window(entry, start.timestamp(), end.timestamp()))
        return found

    def active(self, now: float) -> list[Window]:
        """The windows whose events are due at ``now``: from ``lead`` seconds before their start to their end."""
        return [w for entry in self.entries for w in self.windows(entry, now) if w.start - self.lead <= now < w.end]

    def events(self, now: float) -> list[dict[str, Any]]:
        """The events due at ``now``; each window's first, then one every ``repeat_after`` seconds while it lasts."""
        due = []
        for window in self.active(now):
            key = (window.entry.name, window.start)
            first, last = self.sent.get(key, (now, None))
            if last is not None and now - last < self.repeat_after:
                continue
            self.sent[key] = (first, now)
            due.append(self._event(window, first))
        self.sent = {key: times for key, times in self.sent.items() if key[1] + 8 * 86400 > now}
        return due

    def next_wake(self, now: float) -> float:
        """Epoch seconds of the next moment an event may fall due, at most MAX_SLEEP from ``now``."""
        wake = now + MAX_SLEEP
        for entry in self.entries:
            for window in self.windows(entry, now):
                opens = window.start - self.lead
                if opens > now:
                    wake = min(wake, opens)
                elif now < window.end:
                    last = self.sent.get((entry.name, window.start), (None, None))[1]
                    wake = min(wake, (last + self.repeat_after) if last is not None else now)
        return max(wake, now)

    def _event(self, window: Window, first: float) -> dict[str, Any]:
        entry = window.entry
        labels = {"action": "scale_out", "service": entry.service, "schedule": entry.name}
        if self.cluster:
            labels["cluster"] = self.cluster
        return {
            "action": "scale_out",
            "status": "firing",
            "service": entry.service,
            "cluster": self.cluster,
            "alertname": ALERTNAME,
            "labels": labels,
            "min_replicas": entry.replicas,
            "until": window.end,
            "values": {
                "min_replicas": entry.replicas,
                "window_start": window.start,
                "window_end": window.end,
                "lead_s": self.lead,
                "schedule": entry.name,
            },
            "fingerprint": hashlib.sha256(f"scale_schedule:{entry.name}:{window.start}".encode()).hexdigest()[:16],
            "startsAt": datetime.fromtimestamp(first, UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
            "source": SOURCE,
        }


def parse_args(args: dict[str, Any]) -> Schedule:
    """The Schedule the arguments describe; ValueError naming the argument at fault and the fix."""
    unknown = sorted(key for key in args if key not in ARGUMENTS and not key.startswith(RULEBOOK_ARG_PREFIX))
    if unknown:
        raise _arg_error("arguments", f"{', '.join(unknown)} are unknown; the arguments are {', '.join(ARGUMENTS)}")
    values = ARGUMENTS | {key: value for key, value in args.items() if key in ARGUMENTS and value is not None}
    raw_schedule = values["schedule"]
    if not isinstance(raw_schedule, list):
        raise _arg_error("schedule", f"must be a list of windows, got {type(raw_schedule).__name__}")
    entries = [parse_entry(index, raw) for index, raw in enumerate(raw_schedule)]
    names = [entry.name for entry in entries]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise _arg_error("schedule", f"has several entries named {', '.join(repeated)}; give each a name of its own")
    zone_name = values["timezone"]
    if not isinstance(zone_name, str) or not zone_name.strip():
        raise _arg_error("timezone", f"must be an IANA time zone such as Europe/London, got {zone_name!r}")
    try:
        zone = UTC if zone_name.strip().upper() == "UTC" else ZoneInfo(zone_name.strip())
    except (ZoneInfoNotFoundError, ValueError):
        raise _arg_error("timezone", f"{zone_name!r} is not a time zone of this host's database; use an IANA name such as Europe/London") from None
    lead = _number("lead", values["lead"], 0)
    repeat_after = _number("repeat_after", values["repeat_after"], 10)
    cluster = values["cluster"]
    if cluster is not None and (not isinstance(cluster, str) or not cluster.strip()):
        raise _arg_error("cluster", f"must be a non-empty string, got {cluster!r}")
    return Schedule(entries, zone, lead, repeat_after, cluster.strip() if cluster else None)


async def main(queue: asyncio.Queue[Any], args: dict[str, Any]) -> None:
    """Put the schedule's events on the queue as they fall due."""
    schedule = parse_args(args)
    if not schedule.entries:
        logger.info("scale_schedule: no windows; no event will be sent")
    for entry in schedule.entries:
        days = "every day" if len(entry.days) == 7 else ", ".join(DAYS[d] for d in sorted(entry.days))
        logger.info(
            "scale_schedule: %s: at least %d replicas of %s from %s to %s (%s), asked for %gs ahead",
            entry.name, entry.replicas, entry.service, entry.start, entry.end, days, schedule.lead,
        )  # fmt: skip
    try:
        while True:
            now = time.time()
            for event in schedule.events(now):
                event["received_at"] = time.time()
                values = event["values"]
                logger.info("scale_schedule: scale_out %s to at least %d replicas (%s)", event["service"], event["min_replicas"], values["schedule"])
                await queue.put(event)
            await asyncio.sleep(max(0.5, schedule.next_wake(time.time()) - time.time()))
    except asyncio.CancelledError:
        logger.info("scale_schedule: cancelled")
        raise


if __name__ == "__main__":
    # python scale_schedule.py '{"schedule": [{"service": "resnet18", "replicas": 4, "start": "08:00", "end": "12:00"}]}'

    class MockQueue(asyncio.Queue[Any]):
        """A queue that prints the events."""

        async def put(self, event: dict[str, Any]) -> None:
            print(json.dumps(event))  # noqa: T201

    logging.basicConfig(level=logging.INFO)
    asyncio.run(main(MockQueue(), json.loads(sys.argv[1]) if len(sys.argv) > 1 else {}))
