# Copyright (c) mlfleet.serving maintainers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Durations as Grafana and Telegraf write them, and the worst-case delay from a load change to the webhook."""

from __future__ import annotations

import re

from ansible.errors import AnsibleFilterError

UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)")


def duration_seconds(value):
    """Seconds in a duration such as ``10s``, ``2m``, ``1h30m`` or ``500ms`` (a bare number is seconds)."""
    if isinstance(value, bool):
        raise AnsibleFilterError(f"duration_seconds: {value!r} is not a duration; write one like 10s, 2m or 1h30m")
    if isinstance(value, (int, float)):
        return value
    text = str(value).strip()
    if re.fullmatch(r"\d+(?:\.\d+)?", text):
        return float(text) if "." in text else int(text)
    parts = DURATION_PART.findall(text)
    if not text or "".join(number + unit for number, unit in parts) != text:
        raise AnsibleFilterError(f"duration_seconds: {value!r} is not a duration; write one like 10s, 2m or 1h30m")
    total = sum(float(number) * UNIT_SECONDS[unit] for number, unit in parts)
    return int(total) if total == int(total) else total


def alert_delay(timings):
    """The phases between a load change and the autoscaler's webhook, each at its worst, and their sum.

    ``timings`` holds the provisioned durations: ``scrape_interval`` and ``flush_interval`` and ``flush_jitter``
    (Telegraf), ``query_window`` (the span each evaluation reduces), ``evaluation_interval`` and ``for`` (the rule),
    ``group_wait`` and ``group_interval`` (the notification policy).
    """
    required = ("scrape_interval", "flush_interval", "flush_jitter", "query_window", "evaluation_interval", "for", "group_wait", "group_interval")
    if not hasattr(timings, "get") or any(key not in timings for key in required):
        raise AnsibleFilterError(f"alert_delay needs a dict with {', '.join(required)}")
    seconds = {key: duration_seconds(timings[key]) for key in required}
    phases = [
        ("sample", seconds["scrape_interval"], "Telegraf samples once per interval: the change waits at most one interval"),
        ("flush", seconds["flush_interval"] + seconds["flush_jitter"], "Telegraf writes its buffer every flush interval, plus jitter"),
        (
            "window",
            seconds["query_window"],
            "the rule reduces the mean over its query window; a level just past the threshold crosses it only once it fills the window",
        ),
        ("evaluation", seconds["evaluation_interval"], "the rule runs once per evaluation interval; the first run that sees the crossing makes it Pending"),
        ("for", seconds["for"], "Pending turns Firing after the rule held for its `for`"),
        (
            "notification",
            max(seconds["group_wait"], seconds["group_interval"]),
            "a new alert group waits group_wait; one that still exists sends at its next group_interval tick",
        ),
    ]
    return {
        "phases": [{"name": name, "seconds": value, "why": why} for name, value, why in phases],
        "worst_seconds": sum(phase[1] for phase in phases),
    }


class FilterModule:
    def filters(self):
        return {"duration_seconds": duration_seconds, "alert_delay": alert_delay}
