"""The event source mlfleet.serving.serving_pressure.

Parser tests read CSV captured from a real HAProxy 2.6 (haproxy_support.CAPTURED_*); tracker tests feed synthetic rows
with synthetic times; main() is tested against small HTTP stubs and, end to end, against a real HAProxy (/usr/sbin/haproxy)
with a TLS stats frontend guarded like the edge proxy's, under real concurrent load.
"""

import ast
import asyncio
import hashlib
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from haproxy_support import (
    CAPTURED_AFTER,
    CAPTURED_BUSY,
    CAPTURED_DOWN,
    CAPTURED_IDLE,
    HAPROXY,
    SOURCE_PATH,
    HAProxy,
    SlowBackend,
    free_port,
    load_source,
)

sp = load_source()
StatsRow = sp.StatsRow
LOGGER = "mlfleet.serving.serving_pressure"
STATS_TOKEN = "stats-token-4f1c9e2a7d"
EVENT_KEYS = {"action", "status", "service", "cluster", "alertname", "labels", "values", "fingerprint", "startsAt", "source", "received_at"}
VALUE_KEYS = {
    *("servers_up", "standby_up", "inflight", "queued", "per_server", "rtime_ms", "qtime_ms", "rate", "errors_5xx", "window_s", "held_s"),
    *("backlog", "backlog_trend", "trend_s", "drain_s"),
}
T0 = 1_800_000_000.0


# --- parser ---------------------------------------------------------------------------------------------------------


def source_records(caplog):
    return [record for record in caplog.records if record.name == LOGGER]


def by_name(rows):
    return {(row.proxy, row.name): row for row in rows}


def test_parse_real_capture_rows_and_kinds():
    rows = by_name(sp.parse_stats_csv(CAPTURED_BUSY))
    assert set(rows) == {
        ("inference", "FRONTEND"),
        ("stats", "FRONTEND"),
        ("resnet18", "task1"),
        ("resnet18", "task2"),
        ("resnet18", "BACKEND"),
        ("no_such_model", "BACKEND"),
        *{("densenet", f"task{i}") for i in range(1, 5)},
        ("densenet", "BACKEND"),
    }
    assert rows[("inference", "FRONTEND")].kind == "frontend"
    assert rows[("resnet18", "BACKEND")].kind == "backend"
    assert rows[("resnet18", "task1")] == StatsRow(proxy="resnet18", name="task1", kind="server", status="UP", qcur=0, scur=2, rate=2)
    assert (rows[("resnet18", "BACKEND")].qcur, rows[("resnet18", "BACKEND")].scur) == (8, 12)
    assert rows[("densenet", "task3")].status == "MAINT (resolution)"
    # A frontend has no queue: the empty field reads as 0.
    assert rows[("inference", "FRONTEND")].qcur == 0


def test_figures_from_real_captures():
    idle = sp.backend_figures(sp.parse_stats_csv(CAPTURED_IDLE))
    busy = sp.backend_figures(sp.parse_stats_csv(CAPTURED_BUSY))
    down = sp.backend_figures(sp.parse_stats_csv(CAPTURED_DOWN))
    after = sp.backend_figures(sp.parse_stats_csv(CAPTURED_AFTER))
    assert set(busy) == {"resnet18", "densenet", "no_such_model"}, "frontends are no backends"
    assert (idle["resnet18"].servers_up, idle["resnet18"].inflight, idle["resnet18"].queued, idle["resnet18"].per_server) == (2, 0, 0, 0.0)
    assert (busy["resnet18"].inflight, busy["resnet18"].queued, busy["resnet18"].per_server, busy["resnet18"].rate) == (4, 8, 6.0, 12)
    # The DOWN server is not counted, neither as a server nor its sessions.
    assert (down["resnet18"].servers, down["resnet18"].servers_up, down["resnet18"].inflight, down["resnet18"].queued) == (2, 1, 2, 4)
    assert down["resnet18"].per_server == 6.0
    assert (after["resnet18"].hrsp_5xx, after["resnet18"].rtime_ms, after["resnet18"].qtime_ms) == (2, 502, 429)
    assert (busy["densenet"].servers, busy["densenet"].servers_up) == (4, 0), "MAINT (resolution) slots are not up"
    assert busy["no_such_model"].servers == 0


def test_a_server_at_weight_0_is_standby_neither_serving_nor_load():
    """A standby replica sits in the backend at weight 0 (the edge proxy's standby server-template): the capture with
    task2's weight set to 0, as `set weight resnet18/task2 0` leaves it."""
    lines = CAPTURED_BUSY.splitlines(keepends=True)
    at = next(i for i, line in enumerate(lines) if line.startswith("resnet18,task2,"))
    assert ",UP,1,1," in lines[at]
    lines[at] = lines[at].replace(",UP,1,1,", ",UP,0,1,", 1)
    rows = sp.parse_stats_csv("".join(lines))
    assert {(row.name, row.weight) for row in rows if row.proxy == "resnet18" and row.kind == "server"} == {("task1", 1), ("task2", 0)}
    assert [row.weight for row in rows if row.kind == "frontend"] == [1, 1], "a frontend's empty weight reads as 1"
    figures = sp.backend_figures(rows)["resnet18"]
    # task1 serves 2 in flight, 8 are queued; task2's sessions (draining after a demotion) are not load.
    assert (figures.servers, figures.servers_up, figures.standby_up, figures.inflight, figures.queued) == (2, 1, 1, 2, 8)
    assert figures.per_server == 10.0
    idle = [line.replace(",UP,1,1,", ",UP,0,1,", 1) if line.startswith("resnet18,task") else line for line in CAPTURED_IDLE.splitlines(keepends=True)]
    standby_only = sp.backend_figures(sp.parse_stats_csv("".join(idle)))["resnet18"]
    assert (standby_only.servers_up, standby_only.standby_up) == (0, 2)
    # Standby alone, nothing waiting: not idle (nothing serves that a scale-in could remove).
    tracker = sp.PressureTracker(in_for=0, in_repeat_after=0)
    rows = sp.parse_stats_csv("".join(idle))
    assert tracker.observe(rows, T0) == [] and tracker.observe(rows, T0 + 2) == []


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "no '# pxname,svname,...' header"),
        ("<html><body>Statistics Report</body></html>", "is stats_path the CSV URI"),
        ('{"error": "unauthorized"}', "not HAProxy CSV statistics"),
        ("# pxname,svname,status,scur\nfoo,BACKEND,UP,1\n", "no column type, weight, qcur, rate, hrsp_5xx, qtime, rtime"),
        (CAPTURED_BUSY[: CAPTURED_BUSY.index("resnet18,BACKEND") + 40], "fields, the header"),
        (CAPTURED_IDLE.replace("resnet18,task1,0,0,0,", "resnet18,task1,0,0,x,", 1), "column scur is 'x', not an integer"),
    ],
)
def test_parse_rejects_what_is_not_stats_csv(text, message):
    with pytest.raises(sp.StatsFormatError, match=message.replace("(", r"\(").replace(".", r"\.")):
        sp.parse_stats_csv(text)


def test_parse_accepts_blank_lines_and_lines_without_trailing_comma():
    lines = [line.removesuffix(",") for line in CAPTURED_BUSY.splitlines()]
    rows = sp.parse_stats_csv("\n" + "\n\n".join(lines) + "\n\n")
    assert len(rows) == 11
    assert sp.backend_figures(rows)["resnet18"].queued == 8


# --- tracker --------------------------------------------------------------------------------------------------------


def poll_rows(per_server=0.0, queued=0, up=2, down=0, maint=0, hrsp_5xx=0, service="resnet18", extra=()):
    """One poll: a frontend, the stats frontend, and `service` with `up` UP servers carrying per_server*up sessions
    (minus what is queued) between them, `down` DOWN servers carrying sessions that must not count, `maint` empty slots."""
    inflight = round(per_server * max(up, 1)) - queued
    assert inflight >= 0
    rows = [StatsRow("inference", "FRONTEND", "frontend", "OPEN", scur=inflight + queued), StatsRow("stats", "FRONTEND", "frontend", "OPEN", scur=1)]
    for index in range(up):
        rows.append(StatsRow(service, f"task{index + 1}", "server", "UP", scur=inflight // up + (1 if index < inflight % up else 0)))
    for index in range(down):
        rows.append(StatsRow(service, f"task{up + index + 1}", "server", "DOWN", scur=3))
    for index in range(maint):
        rows.append(StatsRow(service, f"task{up + down + index + 1}", "server", "MAINT (resolution)"))
    rows.append(StatsRow(service, "BACKEND", "backend", "UP", qcur=queued, scur=inflight + queued, rate=7, hrsp_5xx=hrsp_5xx, qtime=12, rtime=340))
    return rows + list(extra)


def run(tracker, schedule):
    """Feed (second, rows) pairs; return (second, event) pairs."""
    events = []
    for second, rows in schedule:
        events.extend((second, event) for event in tracker.observe(rows, T0 + second))
    return events


def seconds(events):
    return [second for second, _event in events]


def payloads(events):
    return [event for _second, event in events]


def every(start, stop, step, rows):
    return [(second, rows) for second in range(start, stop, step)]


def test_scale_out_after_out_for_with_the_normalised_shape():
    tracker = sp.PressureTracker(cluster="lab")
    events = run(tracker, every(0, 12, 2, poll_rows(per_server=5.0)))
    # t=0 is the backend's first poll (observed only); the condition is seen from t=2 and has held 6 s at t=8.
    assert [(second, event["action"]) for second, event in events] == [(8, "scale_out")]
    event = events[0][1]
    assert set(event) == EVENT_KEYS
    assert event["status"] == "firing"
    assert event["service"] == "resnet18"
    assert event["cluster"] == "lab"
    assert event["alertname"] == "ServingPressureHigh"
    assert event["labels"] == {"action": "scale_out", "service": "resnet18", "cluster": "lab"}
    assert event["fingerprint"] == hashlib.sha256(b"serving_pressure:resnet18:scale_out").hexdigest()[:16]
    assert event["source"] == "serving_pressure"
    assert datetime.fromisoformat(event["startsAt"].replace("Z", "+00:00")).timestamp() == T0 + 2
    assert event["startsAt"].endswith("Z")
    assert event["received_at"] == T0 + 8
    assert set(event["values"]) == VALUE_KEYS
    assert event["values"] == {
        "servers_up": 2,
        "standby_up": 0,
        "inflight": 10,
        "queued": 0,
        "per_server": 5.0,
        "rtime_ms": 340,
        "qtime_ms": 12,
        "rate": 7,
        "errors_5xx": 0,
        "window_s": 6.0,
        "held_s": 6.0,
        # 8 s of polls do not span trend_for (30 s): no trend yet.
        "backlog": 10,
        "backlog_trend": 0.0,
        "trend_s": 0.0,
        "drain_s": -1.0,
    }


def test_no_cluster_means_none_and_no_cluster_label():
    events = run(sp.PressureTracker(out_for=0), every(0, 4, 2, poll_rows(per_server=5.0)))
    assert events[0][1]["cluster"] is None
    assert events[0][1]["labels"] == {"action": "scale_out", "service": "resnet18"}


def test_queue_alone_scales_out_and_out_queue_raises_the_bar():
    queued = every(0, 12, 2, poll_rows(per_server=1.0, queued=2))
    assert [event["values"]["queued"] for event in payloads(run(sp.PressureTracker(), queued))] == [2]
    assert run(sp.PressureTracker(out_queue=2), queued) == []


def test_window_restarts_when_the_condition_breaks():
    schedule = every(0, 6, 2, poll_rows(per_server=4.0)) + [(6, poll_rows(per_server=3.5))] + every(8, 20, 2, poll_rows(per_server=4.0))
    events = run(sp.PressureTracker(), schedule)
    assert seconds(events) == [14]
    assert events[0][1]["startsAt"] == sp.rfc3339(T0 + 8)


def test_no_flapping_between_or_around_thresholds():
    between = [(second, poll_rows(per_server=[1.0, 3.5, 2.0, 3.0][second // 2 % 4])) for second in range(0, 400, 2)]
    assert run(sp.PressureTracker(), between) == []
    # Dipping under out_threshold every third poll never lets out_for (6 s = 3 polls after the first) complete.
    around = [(second, poll_rows(per_server=4.5 if second % 6 else 3.5)) for second in range(0, 400, 2)]
    assert run(sp.PressureTracker(), around) == []


def test_long_burst_repeats_every_repeat_after_with_startsat_of_the_burst():
    events = run(sp.PressureTracker(), every(0, 100, 2, poll_rows(per_server=8.0)))
    assert seconds(events) == [8, 38, 68, 98]
    assert {event["startsAt"] for event in payloads(events)} == {sp.rfc3339(T0 + 2)}
    assert [event["values"]["held_s"] for event in payloads(events)] == [6.0, 36.0, 66.0, 96.0]
    assert len({event["fingerprint"] for event in payloads(events)}) == 1


def test_an_idle_service_asks_to_scale_in_once_per_in_repeat_after():
    events = run(sp.PressureTracker(in_for=10, repeat_after=5), every(0, 700, 2, poll_rows(per_server=0.0)))
    assert seconds(events) == [12, 312, 612]


def test_rearm_needs_a_whole_window_after_each_event():
    events = run(sp.PressureTracker(out_for=6, repeat_after=0), every(0, 30, 2, poll_rows(per_server=8.0)))
    assert seconds(events) == [8, 14, 20, 26]


def test_repeat_after_also_holds_across_a_broken_burst():
    schedule = every(0, 10, 2, poll_rows(per_server=8.0)) + [(10, poll_rows(per_server=2.0))] + every(12, 50, 2, poll_rows(per_server=8.0))
    events = run(sp.PressureTracker(), schedule)
    # The second burst completes its window at 18 but the first event was at 8: the next one waits until 38.
    assert seconds(events) == [8, 38]
    assert events[1][1]["startsAt"] == sp.rfc3339(T0 + 12)


def test_scale_in_after_in_for_and_only_with_an_empty_queue():
    events = run(sp.PressureTracker(in_repeat_after=60), every(0, 130, 2, poll_rows(per_server=0.5)))
    assert [(second, event["action"], event["alertname"]) for second, event in events] == [
        (62, "scale_in", "ServingPressureLow"),
        (122, "scale_in", "ServingPressureLow"),
    ]
    assert events[0][1]["values"]["window_s"] == 60.0
    assert events[0][1]["fingerprint"] == hashlib.sha256(b"serving_pressure:resnet18:scale_in").hexdigest()[:16]
    assert run(sp.PressureTracker(out_queue=5), every(0, 130, 2, poll_rows(per_server=0.5, queued=1))) == []


def test_overload_resets_the_idle_window_and_the_other_way_round():
    schedule = every(0, 50, 2, poll_rows(per_server=0.0)) + [(50, poll_rows(per_server=9.0))] + every(52, 100, 2, poll_rows(per_server=0.0))
    events = run(sp.PressureTracker(), schedule)
    assert [(second, event["action"]) for second, event in events] == []
    events = run(sp.PressureTracker(), every(0, 120, 2, poll_rows(per_server=0.0)) + every(120, 130, 2, poll_rows(per_server=9.0)))
    assert [(second, event["action"]) for second, event in events] == [(62, "scale_in"), (126, "scale_out")]


def test_down_servers_count_neither_as_capacity_nor_load():
    # 5 sessions on the one UP server; the 3 DOWN servers (3 sessions each, ending) and the MAINT slots add nothing.
    events = run(sp.PressureTracker(out_for=0), every(0, 4, 2, poll_rows(per_server=5.0, up=1, down=3, maint=28)))
    assert [(event["values"]["servers_up"], event["values"]["inflight"], event["values"]["per_server"]) for event in payloads(events)] == [(1, 5, 5.0)]
    # The same 5 sessions spread over 4 UP servers are no overload.
    assert run(sp.PressureTracker(out_for=0), every(0, 4, 2, poll_rows(per_server=1.25, up=4))) == []


def test_no_server_up_with_waiting_requests_is_maximal_pressure():
    tracker = sp.PressureTracker(out_threshold=1000, out_queue=1000, out_for=0)
    events = run(tracker, every(0, 4, 2, poll_rows(per_server=3.0, queued=3, up=0, down=2, maint=30)))
    assert [(second, event["action"]) for second, event in events] == [(2, "scale_out")]
    assert (events[0][1]["values"]["servers_up"], events[0][1]["values"]["queued"]) == (0, 3)


def test_no_server_up_and_no_load_is_not_idle():
    assert run(sp.PressureTracker(in_for=0), every(0, 10, 2, poll_rows(up=0, down=2, maint=30))) == []


def test_errors_5xx_is_the_delta_since_the_previous_poll():
    counters = [10, 15, 15, 40, 3]  # 3: the proxy restarted and counts from zero again
    schedule = [(2 * i, poll_rows(per_server=9.0, hrsp_5xx=count)) for i, count in enumerate(counters)]
    events = run(sp.PressureTracker(out_for=0, repeat_after=0), schedule)
    assert [event["values"]["errors_5xx"] for event in payloads(events)] == [5, 0, 25, 3]


def test_a_new_backend_is_observed_one_poll_before_acting():
    resnet = poll_rows(per_server=9.0)
    both = poll_rows(per_server=9.0, extra=poll_rows(per_server=9.0, service="densenet")[2:])
    events = run(sp.PressureTracker(out_for=0, repeat_after=0), [(0, resnet), (2, both), (4, both)])
    assert [(second, event["service"]) for second, event in events] == [(2, "resnet18"), (4, "densenet"), (4, "resnet18")]


def test_a_backend_that_vanished_starts_again():
    schedule = every(0, 6, 2, poll_rows(per_server=9.0)) + [(6, poll_rows(service="other"))] + every(8, 30, 2, poll_rows(per_server=9.0))
    events = run(sp.PressureTracker(), schedule)
    # Back at 8 (observed only), window from 10, met at 16.
    assert seconds(events) == [16]


def test_reset_after_a_failed_poll_restarts_every_window():
    tracker = sp.PressureTracker()
    assert run(tracker, every(0, 8, 2, poll_rows(per_server=9.0))) == []
    tracker.reset()
    events = run(tracker, every(8, 30, 2, poll_rows(per_server=9.0)))
    assert seconds(events) == [16]


def falling(start, stop, per_server_at_start, fall_per_s, up=4):
    """Polls every 2 s whose backlog falls by fall_per_s requests a second."""
    return [(second, poll_rows(per_server=(per_server_at_start * up - fall_per_s * (second - start)) / up, up=up)) for second in range(start, stop, 2)]


def test_a_falling_backlog_says_when_it_drains():
    # 4 servers, backlog 200 falling 2/s: at t=56 it is 88, 72 above what 4 servers carry below out_threshold (16).
    events = run(sp.PressureTracker(out_for=6, repeat_after=0), falling(0, 58, 50.0, 2.0))
    values = events[-1][1]["values"]
    assert events[-1][0] == 56
    assert (values["backlog"], values["backlog_trend"], values["trend_s"]) == (88, -2.0, 30.0)
    assert values["drain_s"] == 36.0


def test_the_trend_needs_trend_for_seconds_of_polls():
    events = run(sp.PressureTracker(out_for=6, repeat_after=0, trend_for=20), falling(0, 40, 50.0, 2.0))
    by_second = {second: event["values"] for second, event in events}
    # Events at 8, 14, 20, ...: the polls span 20 s from t=20 on.
    assert [(second, by_second[second]["drain_s"]) for second in (8, 14)] == [(8, -1.0), (14, -1.0)]
    assert (by_second[20]["trend_s"], by_second[20]["backlog_trend"], by_second[20]["drain_s"]) == (20.0, -2.0, (200 - 40 - 16) / 2)
    assert by_second[38]["trend_s"] == 20.0, "older polls are dropped"


@pytest.mark.parametrize(
    ("schedule", "why"),
    [
        (every(0, 62, 2, poll_rows(per_server=8.0)), "a steady backlog never drains by itself"),
        ([(second, poll_rows(per_server=5.0 + second / 10)) for second in range(0, 62, 2)], "a rising backlog"),
        ([(second, poll_rows(per_server=40 - second // 2, queued=40 - second // 2, up=0, down=2)) for second in range(0, 62, 2)], "no server up"),
    ],
)
def test_drain_s_is_minus_one_unless_the_backlog_falls_on_servers(schedule, why):
    events = run(sp.PressureTracker(out_for=6, repeat_after=0), schedule)
    assert events, why
    assert events[-1][1]["values"]["trend_s"] == 30.0, why
    assert {event["values"]["drain_s"] for event in payloads(events)} == {-1.0}, why


def test_a_steady_backlog_that_dips_by_less_than_a_request_per_server_has_no_drain_time():
    # 10 closed-loop clients on 5 servers, polled every second; from t=24 a poll finds one client between two requests.
    # The fitted fall over 30 s is 1.3 requests: without the rule, drain_s would say 35 s and hold back a needed VM.
    dipping = [(second, poll_rows(per_server=(10 if second < 24 else 9) / 5, up=5)) for second in range(0, 34)]
    events = payloads(run(sp.PressureTracker(out_threshold=1.5, out_for=4, repeat_after=0), dipping))
    last = events[-1]["values"]
    assert (last["backlog"], last["trend_s"]) == (9, 30.0) and -0.05 < last["backlog_trend"] < -0.03, last
    assert {event["values"]["drain_s"] for event in events} == {-1.0}
    # One request fewer every 5 s: 6 over the span, more than one per server; 10 left, 2.5 above what 5 servers carry.
    falling_6 = [(second, poll_rows(per_server=(16 - second // 5) / 5, up=5)) for second in range(0, 34)]
    last = payloads(run(sp.PressureTracker(out_threshold=1.5, out_for=4, repeat_after=0), falling_6))[-1]["values"]
    assert (last["backlog"], last["trend_s"]) == (10, 30.0) and last["backlog_trend"] < -0.18, last
    assert last["drain_s"] == pytest.approx(2.5 / -last["backlog_trend"], rel=0.01)


def test_a_noisy_fall_is_read_by_its_slope_not_its_ends():
    # Falling 1/s, with the first poll of the 20 s trend 10 low and the last 10 high: the ends alone say it is flat.
    noise = {12: -10, 32: 10}
    schedule = [(second, poll_rows(per_server=(100 - second + noise.get(second, 0)) / 2)) for second in range(0, 34, 2)]
    event = payloads(run(sp.PressureTracker(out_for=6, repeat_after=0, trend_for=20), schedule))[-1]
    assert (event["received_at"] - T0, event["values"]["trend_s"], event["values"]["backlog"]) == (32, 20.0, 78)
    # Least squares over 11 polls: -1 + (10 * 10 + 10 * 10) / 440.
    assert event["values"]["backlog_trend"] == round(-1 + 200 / 440, 3)
    assert event["values"]["drain_s"] == round((78 - 8) / (1 - 200 / 440), 1)


def test_reset_and_a_vanished_backend_forget_the_trend():
    tracker = sp.PressureTracker(out_for=6, repeat_after=0)
    run(tracker, falling(0, 40, 50.0, 2.0))
    tracker.reset()
    assert {event["values"]["trend_s"] for event in payloads(run(tracker, falling(40, 62, 50.0, 2.0)))} == {0.0}
    tracker = sp.PressureTracker(out_for=6, repeat_after=0)
    run(tracker, falling(0, 40, 50.0, 2.0) + [(40, poll_rows(service="other"))])
    assert {event["values"]["drain_s"] for event in payloads(run(tracker, falling(42, 62, 50.0, 2.0)))} == {-1.0}


def test_an_event_due_during_the_lease_is_held_back_and_goes_out_after_it():
    tracker = sp.PressureTracker()
    busy = poll_rows(per_server=8.0)
    events = [(second, event) for second in range(0, 40, 2) for event in tracker.observe(busy, T0 + second, hold=8 <= second < 30)]
    # Due at 8 (window from 2, out_for 6); held back until the lease is gone at 30, then out at once, not a window later.
    assert seconds(events) == [30]
    assert events[0][1]["values"]["held_s"] == 28.0
    assert tracker.held_back == []
    tracker.observe(busy, T0 + 40, hold=True)
    assert tracker.held_back == [], "repeat_after (30 s) counts from the event at 30: nothing is due at 40"
    tracker.observe(busy, T0 + 60, hold=True)
    assert tracker.held_back == [("resnet18", "scale_out")]


def observe_with_actions(tracker, schedule, acted):
    """Feed (second, rows) pairs with the lease file's last_actions as they stand at each second: {key: (recorded at
    second, acted at second)}; return (second, event) pairs."""
    events = []
    for second, rows in schedule:
        known = {key: T0 + at for key, (recorded, at) in acted.items() if recorded <= second}
        events.extend((second, event) for event in tracker.observe(rows, T0 + second, acted=known))
    return events


def test_a_scale_action_restarts_the_window_and_the_repeat_wait_as_an_event_would():
    busy = every(0, 80, 2, poll_rows(per_server=8.0))
    # Without the action: the window from 2 (the first poll is only observed), due at 8, then every repeat_after (30 s).
    assert seconds(run(sp.PressureTracker(), busy)) == [8, 38, 68]
    # The event at 8 started a scale-out that ended at 20: the next waits 30 s from its end, on the capacity it left.
    after_scale_out = observe_with_actions(sp.PressureTracker(), busy, {"resnet18:scale_out": (20, 20)})
    assert seconds(after_scale_out) == [8, 50]
    # An action of another service or of the other direction changes nothing.
    other = {"densenet161:scale_out": (20, 20), "resnet18:scale_in": (20, 20)}
    assert seconds(observe_with_actions(sp.PressureTracker(), busy, other)) == [8, 38, 68]


@pytest.mark.parametrize(
    ("ahead", "expected"),
    [
        # An action that ended while the poll at 38 was under way (recorded a little after the poll's time) counts as
        # ending at 38: the event due at 38 (30 s after the one at 8) waits 30 s from the action's end.
        (0.5, [8, 70]),
        (sp.ACTED_AHEAD_TOLERANCE, [8, 70]),
        # Far ahead (the wall clock stepped back): left out until a poll's time passes it, so the due event goes out.
        (5.0, [8, 38, 74]),
    ],
)
def test_an_action_that_ended_during_the_poll_counts_from_the_poll(ahead, expected):
    busy = every(0, 80, 2, poll_rows(per_server=8.0))
    tracker = sp.PressureTracker()
    events = []
    for second, rows in busy:
        acted = {"resnet18:scale_out": T0 + 38 + ahead} if second >= 38 else {}
        events.extend((second, event) for event in tracker.observe(rows, T0 + second, acted=acted))
    assert seconds(events) == expected


def test_the_window_after_a_scale_action_needs_the_condition_for_a_whole_window():
    tracker = sp.PressureTracker(out_for=10, repeat_after=0)
    # Busy from 2, an action ends at 20 (recorded then): the condition must hold from 20 to 30 before the next event.
    events = observe_with_actions(tracker, every(0, 40, 2, poll_rows(per_server=8.0)), {"resnet18:scale_out": (20, 20)})
    assert seconds(events) == [12, 30]
    assert payloads(events)[1]["values"]["held_s"] == 28.0, "held_s still counts from when the condition began"


def test_a_service_at_its_recorded_maximum_asks_for_scale_out_only_every_in_repeat_after():
    busy = every(0, 400, 2, poll_rows(per_server=8.0, up=2))

    def events(max_replicas):
        tracker = sp.PressureTracker()
        return seconds([(second, event) for second, rows in busy for event in tracker.observe(rows, T0 + second, max_replicas=max_replicas)])

    assert events({}) == list(range(8, 400, 30))
    assert events({"resnet18": 2}) == [8, 308], "2 servers up at a maximum of 2: every in_repeat_after (300 s)"
    assert events({"resnet18": 4}) == list(range(8, 400, 30)), "below its maximum, a service asks every repeat_after"
    assert events({"densenet161": 2}) == list(range(8, 400, 30)), "another service's bounds change nothing"


def test_an_action_time_ahead_of_the_sources_clock_is_left_out():
    tracker = sp.PressureTracker(out_for=6, repeat_after=10)
    events = observe_with_actions(tracker, every(0, 40, 2, poll_rows(per_server=8.0)), {"resnet18:scale_out": (12, 500)})
    assert seconds(events) == [8, 18, 28, 38], "an action recorded as ending at 500 would hold every event back until then"


def test_an_event_held_back_is_dropped_when_its_condition_has_passed():
    tracker = sp.PressureTracker()
    # The whole window passes under the lease; the condition breaks just after it: nothing goes out.
    schedule = [(second, poll_rows(per_server=8.0 if second < 20 else 1.0)) for second in range(0, 30, 2)]
    assert [e for second, rows in schedule for e in tracker.observe(rows, T0 + second, hold=second < 20)] == []


@pytest.fixture
def lease_module():
    sys.path.insert(0, str(Path(__file__).parents[2] / "lab"))
    try:
        from autoscale_support import load_lease_module
    finally:
        sys.path.pop(0)
    return load_lease_module()


def test_read_lease_reads_the_playbooks_lease_file(tmp_path, lease_module):
    path = tmp_path / "autoscale.lease"
    assert sp.read_lease(str(path), time.time()) == sp.LeaseState(), "no file: no lease, no action"
    lease = lease_module.LeaseFile(str(path))
    lease.try_acquire("ctl:4242:beef", ttl=60, reason="scale_out resnet18 from serving_pressure")
    state = sp.read_lease(str(path), time.time())
    assert state.holder == "ctl:4242:beef" and state.last_actions == {}
    assert state.description.startswith("ctl:4242:beef (scale_out resnet18 from serving_pressure), for ")
    assert sp.read_lease(str(path), time.time() + 61).holder is None, "an expired lease holds nothing"
    before = time.time()
    lease.release("ctl:4242:beef", acted=["resnet18:scale_out"], bounds=[{"service": "resnet18", "min": 2, "max": 6}])
    state = sp.read_lease(str(path), time.time())
    assert state.holder is None, "a lease given back holds nothing"
    assert list(state.last_actions) == ["resnet18:scale_out"] and before <= state.last_actions["resnet18:scale_out"] <= time.time()
    assert state.max_replicas == {"resnet18": 6}


def _runs():
    """Runs as the lease records them: this live process, one that ended, this PID started later, another host, none."""
    ended = subprocess.Popen([sys.executable, "-c", ""])
    ended.wait()
    here = socket.gethostname()
    with open(f"/proc/{os.getpid()}/stat", encoding="utf-8") as handle:
        started = int(handle.read().rsplit(")", 1)[1].split()[19])
    return [
        {"host": here, "pid": os.getpid(), "started": started},
        {"host": here, "pid": ended.pid, "started": started},
        {"host": here, "pid": os.getpid(), "started": started + 1},
        {"host": "another-control-host", "pid": 1, "started": 0},
        None,
    ]


def test_a_lease_whose_run_ended_holds_nothing_by_the_same_rule_as_the_playbooks(tmp_path, lease_module):
    runs = _runs()
    assert [sp.run_ended(run) for run in runs] == [lease_module.run_ended(run) for run in runs] == [False, True, True, False, False]
    path = tmp_path / "autoscale.lease"
    lease = lease_module.LeaseFile(str(path))
    for run, holds in zip(runs, [True, False, False, True, True], strict=True):
        lease.try_acquire("ctl:4242:beef", ttl=600, reason="scale_out resnet18", run=run)
        assert (sp.read_lease(str(path), time.time()).holder == "ctl:4242:beef") is holds, run
        lease.release("ctl:4242:beef")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "cannot read the lease file"),
        ('{"version": 1}', "no 'lease' key"),
        ('["lease"]', "no 'lease' key"),
        ('{"lease": {"holder": "x"}}', "no lease.expires_at"),
        ('{"lease": null, "last_actions": {"resnet18:scale_out": "soon"}}', "last_actions is not a map of times"),
        ('{"lease": null, "last_actions": [1]}', "last_actions is not a map of times"),
        ('{"lease": null, "bounds": {"resnet18": {"max": "six"}}}', "bounds is not a map of replica bounds"),
    ],
)
def test_a_lease_file_that_is_not_a_lease_is_named(tmp_path, content, message):
    path = tmp_path / "autoscale.lease"
    path.write_text(content)
    with pytest.raises(sp.LeaseReadError, match=message.replace(".", r"\.")) as caught:
        sp.read_lease(str(path), time.time())
    assert str(path) in str(caught.value)


def test_main_holds_events_back_while_the_lease_is_held(stub, tmp_path, caplog, lease_module):
    caplog.set_level(logging.INFO, logger=LOGGER)
    path = tmp_path / "autoscale.lease"
    lease = lease_module.LeaseFile(str(path))
    lease.try_acquire("ctl:1:cafe", ttl=60, reason="scale_out densenet161 from serving_pressure")
    steps = [(0.8, lambda: lease.release("ctl:1:cafe"))]
    events = asyncio.run(run_source({"url": stub.url, "lease_file": str(path)} | FAST, 1.2, steps))
    assert events, "the event goes out once the lease is given back"
    assert events[0][0] >= 0.8
    held = [r.getMessage() for r in source_records(caplog) if "held back" in r.getMessage()]
    assert held == ["serving_pressure: scale_out for resnet18 held back while a scale action holds the lease: "
                    + held[0].split("lease: ", 1)[1]], held  # fmt: skip
    assert "ctl:1:cafe (scale_out densenet161 from serving_pressure)" in held[0]


def test_main_restarts_the_window_at_the_end_of_a_scale_action(stub, tmp_path, lease_module):
    path = tmp_path / "autoscale.lease"
    lease = lease_module.LeaseFile(str(path))
    lease.try_acquire("ctl:1:cafe", ttl=60, reason="scale_out resnet18 from serving_pressure")
    # The action ends at 0.8 s and is recorded; FAST's repeat_after (0.4 s) counts from there.
    steps = [(0.8, lambda: lease.release("ctl:1:cafe", acted=["resnet18:scale_out"]))]
    events = asyncio.run(run_source({"url": stub.url, "lease_file": str(path)} | FAST, 1.6, steps))
    assert events and events[0][0] >= 0.8 + FAST["repeat_after"] - 0.05, events


def test_main_ignores_a_broken_lease_file_and_says_so(stub, tmp_path, caplog):
    path = tmp_path / "autoscale.lease"
    path.write_text("garbage")
    events = asyncio.run(run_source({"url": stub.url, "lease_file": str(path)} | FAST, 0.6))
    assert events, "a lease file that cannot be read holds nothing back"
    warnings = [r.getMessage() for r in source_records(caplog) if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and f"cannot read the lease file {path}" in warnings[0] and "not held back" in warnings[0], warnings


def test_reset_keeps_repeat_after():
    tracker = sp.PressureTracker(out_for=0)
    assert seconds(run(tracker, every(0, 4, 2, poll_rows(per_server=9.0)))) == [2]
    tracker.reset()
    assert seconds(run(tracker, every(4, 40, 2, poll_rows(per_server=9.0)))) == [32]


def test_services_filter_ignore_backends_and_serverless_backends(caplog):
    stats_listen = [StatsRow("stats", "BACKEND", "backend", "UP"), StatsRow("stats", "local", "server", "no check", scur=9)]
    serverless = [StatsRow("no_such_model", "BACKEND", "backend", "UP", qcur=0)]
    densenet = poll_rows(per_server=9.0, service="densenet")[2:]
    rows = poll_rows(per_server=9.0) + densenet + stats_listen + serverless
    default = run(sp.PressureTracker(out_for=0), every(0, 4, 2, rows))
    assert sorted(event["service"] for event in payloads(default)) == ["densenet", "resnet18"]
    ignoring = run(sp.PressureTracker(out_for=0, ignore_backends=["stats", "densenet"]), every(0, 4, 2, rows))
    assert [event["service"] for event in payloads(ignoring)] == ["resnet18"]
    caplog.set_level(logging.WARNING, logger=LOGGER)
    only = run(sp.PressureTracker(out_for=0, services=["densenet", "bert"]), every(0, 6, 2, rows))
    assert [(second, event["service"]) for second, event in only] == [(2, "densenet")]
    warnings = [record.getMessage() for record in source_records(caplog) if "'bert'" in record.getMessage()]
    assert len(warnings) == 1, "a missing service is reported once, not every poll"
    assert "densenet, resnet18, stats" in warnings[0]


def test_no_check_servers_take_traffic():
    rows = [StatsRow("plain", "s1", "server", "no check", scur=1), StatsRow("plain", "BACKEND", "backend", "UP", scur=1)]
    figures = sp.backend_figures(rows)["plain"]
    assert (figures.servers_up, figures.inflight) == (1, 1)


# --- arguments ------------------------------------------------------------------------------------------------------


def base_args(**overrides):
    return {"url": "https://127.0.0.1:8404", "token": STATS_TOKEN} | overrides


def test_documentation_matches_the_arguments():
    documentation = yaml.safe_load(sp.DOCUMENTATION)
    options = documentation["options"]
    assert set(options) == set(sp.ARGUMENTS)
    for name, (_kind, default) in sp.ARGUMENTS.items():
        assert options[name].get("default") == (list(default) if isinstance(default, tuple) else default), name
    examples = yaml.safe_load(sp.EXAMPLES)
    source_args = examples[0]["sources"][0]["mlfleet.serving.serving_pressure"]
    assert sp.parse_args(source_args | {"token_file": None, "token": STATS_TOKEN, "ca_file": None}).urls == source_args["urls"]


def test_defaults():
    settings = sp.parse_args(base_args())
    tracker = settings.tracker
    assert (settings.interval, settings.timeout, settings.stats_path, settings.urls) == (2.0, 3.0, "/stats;csv", ["https://127.0.0.1:8404"])
    assert (tracker.out_threshold, tracker.out_queue, tracker.out_for) == (4.0, 0, 6.0)
    assert (tracker.in_threshold, tracker.in_for, tracker.repeat_after, tracker.in_repeat_after) == (0.5, 60.0, 30.0, 300.0)
    assert tracker.trend_for == 30.0
    assert (tracker.services, tracker.ignore_backends, tracker.cluster) == (None, ["stats"], None)
    assert settings.ssl_context.verify_mode.name == "CERT_REQUIRED" and settings.ssl_context.check_hostname
    assert STATS_TOKEN not in repr(settings)


def test_rulebook_arguments_are_accepted_and_strings_converted(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(f"  {STATS_TOKEN}\n")
    settings = sp.parse_args(
        {
            "urls": ["https://a:8404/", "https://b:8404"],
            "token_file": str(token_file),
            "interval": "0.5",
            "validate_certs": "false",
            "eda_feedback_queue": object(),
        }
    )
    assert settings.urls == ["https://a:8404", "https://b:8404"]
    assert settings.token == STATS_TOKEN
    assert settings.interval == 0.5
    assert settings.ssl_context is False


def test_empty_strings_are_unset_as_rulebook_defaults_render_them():
    settings = sp.parse_args(base_args(ca_file="", cluster="", token_file="", interval=""))
    assert settings.ssl_context.verify_mode.name == "CERT_REQUIRED", "no ca_file: the system's CAs, still verified"
    assert (settings.tracker.cluster, settings.interval, settings.token) == (None, 2.0, STATS_TOKEN)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (base_args(intervall=2), "unknown argument(s) intervall"),
        ({"token": STATS_TOKEN}, "argument 'url' is required (or 'urls')"),
        (base_args(urls=["https://b:8404"]), "argument 'url' and 'urls' are both given"),
        ({"url": "https://a:8404"}, "argument 'token' or 'token_file' is required"),
        (base_args(insecure_no_auth=True), "argument 'token' is given while insecure_no_auth is true"),
        (base_args(token=STATS_TOKEN + " extra"), "argument 'token' holds whitespace or control characters inside the token"),
        (base_args(token_file="/nonexistent/token", token=None), "argument 'token_file' names a file that cannot be read (/nonexistent/token"),
        (base_args(url="http://10.0.0.1:8404"), "argument 'url' is plain http"),
        (base_args(url="https://user:pw@10.0.0.1:8404"), "argument 'url' must not carry credentials"),
        (base_args(url="ftp://10.0.0.1"), "argument 'url' must be an http(s) URL"),
        (base_args(interval=0), "argument 'interval' must be > 0 seconds"),
        (base_args(trend_for=0), "argument 'trend_for' must be > 0 seconds"),
        (base_args(interval="often"), "argument 'interval' must be a number, got 'often'"),
        (base_args(out_for=True), "argument 'out_for' must be a number"),
        (base_args(out_queue=1.5), "argument 'out_queue' must be a whole number"),
        (base_args(repeat_after=-1), "argument 'repeat_after' must be >= 0"),
        (base_args(timeout=float("inf")), "argument 'timeout' must be a finite number"),
        (base_args(in_threshold=4, out_threshold=4), "argument 'out_threshold' (4) must be above in_threshold (4)"),
        (base_args(services=[""]), "argument 'services' must be a list of non-empty strings"),
        (base_args(services=[]), "argument 'services' is an empty list"),
        (base_args(stats_path="stats;csv"), "argument 'stats_path' must start with '/'"),
        (base_args(validate_certs="maybe"), "argument 'validate_certs' must be true or false"),
        (base_args(validate_certs=False, ca_file="/etc/ssl/certs/ca-certificates.crt"), "argument 'ca_file' is set while validate_certs is false"),
    ],
)
def test_bad_arguments_are_named(args, message):
    with pytest.raises(ValueError) as caught:
        sp.parse_args(args)
    assert message in str(caught.value)
    assert STATS_TOKEN not in str(caught.value)


def test_bad_token_and_ca_files_are_named(tmp_path):
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(ValueError, match=f"argument 'token_file' names an empty file \\({empty}\\)"):
        sp.parse_args({"url": "https://a:8404", "token_file": str(empty)})
    not_pem = tmp_path / "ca.pem"
    not_pem.write_text("not a certificate\n")
    with pytest.raises(ValueError, match=f"argument 'ca_file' cannot be loaded as PEM CA certificates \\({not_pem}"):
        sp.parse_args(base_args(ca_file=str(not_pem)))


def test_main_rejects_bad_arguments_before_any_poll():
    with pytest.raises(ValueError, match="unknown argument"):
        asyncio.run(sp.main(asyncio.Queue(), base_args(treshold=3)))


# --- main() against stubs -------------------------------------------------------------------------------------------


class StatsStub:
    """An HTTP stats endpoint on 127.0.0.1 that answers what the test sets: (status, body)."""

    def __init__(self):
        stub = self
        self.answer = (200, CAPTURED_BUSY)
        self.requests = []
        self.chunk = None

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                stub.requests.append((self.path, self.headers.get("Authorization")))
                status, body = stub.answer
                data = body.encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                # As a proxy with many servers answers: the CSV arrives in pieces, with pauses between them.
                step = stub.chunk or len(data) or 1
                for start in range(0, len(data), step):
                    self.wfile.write(data[start : start + step])
                    self.wfile.flush()
                    if stub.chunk:
                        time.sleep(0.005)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def stub():
    server = StatsStub()
    yield server
    server.close()


async def run_source(args, seconds, steps=()):
    """Run main() for `seconds`; at each (second, callable) of `steps` call it. Return [(elapsed, event)]."""
    queue = asyncio.Queue()
    started = time.monotonic()
    task = asyncio.create_task(sp.main(queue, args))
    events = []
    pending = sorted(steps, key=lambda step: step[0])
    try:
        while (left := seconds - (time.monotonic() - started)) > 0:
            if pending and time.monotonic() - started >= pending[0][0]:
                pending.pop(0)[1]()
                continue
            wait = min(left, pending[0][0] - (time.monotonic() - started)) if pending else left
            try:
                event = await asyncio.wait_for(queue.get(), timeout=max(wait, 0.001))
            except TimeoutError:
                continue
            events.append((time.monotonic() - started, event))
        assert not task.done(), f"main() ended: {task.exception() if not task.cancelled() else 'cancelled'}"
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    return events


FAST = {"interval": 0.05, "out_for": 0.2, "in_for": 0.2, "repeat_after": 0.3, "in_repeat_after": 0.3, "insecure_no_auth": True}


def test_main_polls_the_csv_and_emits(stub):
    events = asyncio.run(run_source({"url": stub.url} | FAST, 0.6))
    assert events, "a busy backend for 0.6 s with out_for 0.2 gives a scale_out"
    assert {(event["action"], event["service"]) for event in payloads(events)} == {("scale_out", "resnet18")}
    assert events[0][1]["values"]["queued"] == 8
    assert abs(events[0][1]["received_at"] - time.time()) < 5
    assert len(events) <= 2, "repeat_after 0.3 s allows at most two in 0.6 s"
    assert {request[0] for request in stub.requests} == {"/stats;csv"}
    assert {request[1] for request in stub.requests} == {None}


def test_main_reads_an_answer_that_arrives_in_pieces(stub):
    stub.chunk = 700
    events = asyncio.run(run_source({"url": stub.url} | FAST, 0.8))
    assert [event["values"]["queued"] for event in payloads(events)][:1] == [8]


def test_main_uses_stats_path(stub):
    asyncio.run(run_source({"url": stub.url, "stats_path": "/haproxy?stats;csv"} | FAST, 0.2))
    assert stub.requests and {request[0] for request in stub.requests} == {"/haproxy?stats;csv"}


def test_failed_polls_warn_never_emit_and_restart_the_windows(stub, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)

    def fail():
        stub.answer = (200, "<html>Statistics Report</html>")

    def recover():
        stub.answer = (200, CAPTURED_BUSY)

    # Busy for 0.25 s (the 0.4 s window started, not met), failing until 0.5 s, busy again.
    args = {"url": stub.url} | FAST | {"out_for": 0.4, "repeat_after": 10}
    events = asyncio.run(run_source(args, 1.3, [(0.25, fail), (0.5, recover)]))
    assert events, "the source recovered and emitted"
    # After the recovery at 0.5 s the backend is observed once, then the whole 0.4 s window counts again.
    assert events[0][0] >= 0.5 + 0.4
    failures = [record for record in source_records(caplog) if record.levelno == logging.WARNING]
    assert len(failures) == 1, "the same error is logged once, not every poll"
    assert "not HAProxy CSV statistics" in failures[0].getMessage()
    assert "(1 failed polls so far)" in failures[0].getMessage()
    assert any("answers again after" in record.getMessage() for record in source_records(caplog))


def test_first_url_that_answers_wins(stub, caplog):
    caplog.set_level(logging.WARNING, logger=LOGGER)
    dead = f"http://127.0.0.1:{free_port()}"
    events = asyncio.run(run_source({"urls": [dead, stub.url]} | FAST, 0.6))
    assert {event["action"] for event in payloads(events)} == {"scale_out"}
    assert not [record for record in source_records(caplog) if record.levelno >= logging.WARNING], "a URL that fails is no failed poll while another answers"


def test_connection_refused_is_a_counted_warning(caplog):
    caplog.set_level(logging.WARNING, logger=LOGGER)
    dead = f"http://127.0.0.1:{free_port()}"
    events = asyncio.run(run_source({"url": dead} | FAST, 0.3))
    assert events == []
    records = source_records(caplog)
    assert len(records) == 1
    assert "Cannot connect to host 127.0.0.1" in records[0].getMessage()
    assert "(1 failed polls so far)" in records[0].getMessage()


def test_http_errors_other_than_401_are_named(stub, caplog):
    caplog.set_level(logging.WARNING, logger=LOGGER)
    stub.answer = (503, "no server")
    assert asyncio.run(run_source({"url": stub.url} | FAST, 0.2)) == []
    assert "HTTP 503" in source_records(caplog)[0].getMessage()


# --- against a real HAProxy -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def haproxy(tmp_path_factory):
    if not HAPROXY.exists():
        pytest.skip(f"{HAPROXY} is not installed (Debian package haproxy)")
    tasks = (SlowBackend(0.5), SlowBackend(0.5))
    proxy = None
    try:
        proxy = HAProxy(tmp_path_factory.mktemp("haproxy"), STATS_TOKEN, (tasks[0].port, tasks[1].port))
        yield proxy
    finally:
        if proxy is not None:
            proxy.stop()
        for task in tasks:
            task.close()


def load(url, clients, stop, deadline_s):
    """`clients` threads sending requests back to back until `stop` is set or `deadline_s` passed."""

    def client():
        deadline = time.monotonic() + deadline_s
        while not stop.is_set() and time.monotonic() < deadline:
            try:
                urllib.request.urlopen(url, timeout=10).read()
            except (urllib.error.URLError, OSError):
                time.sleep(0.05)

    threads = [threading.Thread(target=client, daemon=True) for _client in range(clients)]
    for thread in threads:
        thread.start()
    return threads


def test_real_haproxy_burst_scales_out_then_idle_scales_in(haproxy, caplog):
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    args = {
        "url": haproxy.stats_url,
        "token": STATS_TOKEN,
        "ca_file": str(haproxy.cert),
        "interval": 0.2,
        "out_for": 0.6,
        "in_for": 1.0,
        "repeat_after": 30,
        "cluster": "test",
    }

    async def scenario():
        stop = threading.Event()
        threads = load(haproxy.inference_url + "/predictions/resnet18", 12, stop, 5.0)
        queue = asyncio.Queue()
        task = asyncio.create_task(sp.main(queue, args))
        try:
            scale_out = await asyncio.wait_for(queue.get(), timeout=4)
            stop.set()
            stopped = time.time()
            await asyncio.to_thread(lambda: [thread.join(timeout=6) for thread in threads])
            scale_in = await asyncio.wait_for(queue.get(), timeout=5)
            return scale_out, stopped, scale_in
        finally:
            stop.set()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    scale_out, stopped, scale_in = asyncio.run(scenario())
    assert (scale_out["action"], scale_out["service"], scale_out["cluster"]) == ("scale_out", "resnet18", "test")
    values = scale_out["values"]
    assert values["servers_up"] == 2
    assert values["inflight"] == 4, "maxconn 2 on each of 2 servers"
    assert values["queued"] > 0
    assert values["per_server"] >= 4.0
    assert values["window_s"] == 0.6 and values["held_s"] >= 0.6
    assert (scale_in["action"], scale_in["service"]) == ("scale_in", "resnet18"), "nothing else: no_such_model has no servers, stats is a frontend"
    assert scale_in["values"]["queued"] == 0 and scale_in["values"]["inflight"] == 0
    assert scale_in["values"]["rtime_ms"] >= 400, "HAProxy's average response time reflects the 0.5 s server"
    assert scale_in["received_at"] - stopped >= 1.0, "idle for the whole in window after the load stopped"
    assert datetime.fromisoformat(scale_in["startsAt"].replace("Z", "+00:00")).timestamp() >= stopped - 0.3
    assert STATS_TOKEN not in caplog.text


def test_real_haproxy_wrong_token_gives_no_event_and_a_401_warning(haproxy, caplog):
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    wrong = "wrong-token-8d2b61"
    events = asyncio.run(run_source({"url": haproxy.stats_url, "token": wrong, "ca_file": str(haproxy.cert), "interval": 0.2, "out_for": 0}, 1.0))
    assert events == []
    warnings = [record.getMessage() for record in source_records(caplog) if record.levelno == logging.WARNING]
    assert warnings and "HTTP 401" in warnings[0] and haproxy.stats_url in warnings[0]
    assert wrong not in caplog.text and STATS_TOKEN not in caplog.text


def test_real_haproxy_certificate_is_verified(haproxy, caplog):
    caplog.set_level(logging.WARNING, logger=LOGGER)
    events = asyncio.run(run_source({"url": haproxy.stats_url, "token": STATS_TOKEN, "interval": 0.2, "out_for": 0}, 0.5))
    assert events == []
    assert "certificate verify failed" in source_records(caplog)[0].getMessage()


def test_real_ansible_rulebook_loads_the_source_and_matches_its_events(haproxy, tmp_path):
    rulebook_bin = shutil.which("ansible-rulebook", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    if rulebook_bin is None or shutil.which("java") is None:
        pytest.skip("ansible-rulebook and Java 17 are needed (scripts/bootstrap installs both)")
    token_file = tmp_path / "stats.token"
    token_file.write_text(STATS_TOKEN + "\n")
    rulebook = tmp_path / "rulebook.yml"
    source = {"url": haproxy.stats_url, "token_file": str(token_file), "ca_file": str(haproxy.cert), "interval": 0.2, "in_for": 0.4, "cluster": "lab"}
    rule = {
        "name": "idle resnet18",
        "condition": 'event.action == "scale_in" and event.service == "resnet18" and event.values.servers_up == 2 and event.labels.cluster == "lab"',
        "actions": [{"print_event": {}}, {"shutdown": {}}],
    }
    rulebook.write_text(json.dumps([{"name": "pressure", "hosts": "all", "sources": [{"serving_pressure": source}], "rules": [rule]}]))
    inventory = tmp_path / "inventory.yml"
    inventory.write_text(json.dumps({"all": {"hosts": {"localhost": {"ansible_connection": "local"}}}}))
    result = subprocess.run(
        [rulebook_bin, "-r", str(rulebook), "-i", str(inventory), "-S", str(SOURCE_PATH.parent)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=tmp_path,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    printed = [line for line in result.stdout.splitlines() if line.startswith("{") and "'action': 'scale_in'" in line]
    assert len(printed) == 1, output
    event = ast.literal_eval(printed[0])
    assert EVENT_KEYS <= set(event)
    assert event["fingerprint"] == hashlib.sha256(b"serving_pressure:resnet18:scale_in").hexdigest()[:16]
    assert event["values"]["window_s"] == 0.4
    assert STATS_TOKEN not in output


# --- no event for a run that could only decide not to act --------------------------------------------------------------

RECORDED = {"cooldown": {"scale_out": 30, "scale_in": 120, "scale_in_after_scale_out": 300}, "target_per_replica": 4.0, "min": 1, "max": 8}


@pytest.mark.parametrize(
    ("action", "backlog", "up", "last_actions", "recorded"),
    [
        (action, backlog, up, last_actions, recorded)
        for action in ("scale_out", "scale_in")
        for backlog, up in ((0, 2), (7, 2), (8, 2), (9, 2), (12, 3), (13, 3), (40, 4), (3, 0))
        for last_actions in (
            {},
            {"resnet18:scale_out": T0 - 10},
            {"resnet18:scale_out": T0 - 200},
            {"resnet18:scale_in": T0 - 100},
            {"resnet18:scale_in": T0 - 130},
        )
        for recorded in (RECORDED, RECORDED | {"target_per_replica": 1.5}, {"cooldown": {"scale_out": 0, "scale_in": 0, "scale_in_after_scale_out": 0}})
    ],
)
def test_an_event_is_held_back_exactly_when_the_decision_core_would_not_act(action, backlog, up, last_actions, recorded):
    """The source's copy of the playbooks' rules against the decision core itself (module_utils/_scale_decision.py): on a
    swarm whose service runs as many replicas as servers are up, with room for more, the core does not act exactly when
    the source holds the event back."""
    from ansible_collections.mlfleet.serving.plugins.module_utils import _scale_decision as core

    figures = sp.BackendFigures(servers=up, servers_up=up, inflight=backlog, queued=0, rtime_ms=0, qtime_ms=0, rate=0, hrsp_5xx=0)
    noop = sp.noop_reason("resnet18", action, figures, T0, recorded, last_actions)
    settings = core.effective_settings(
        {"replicas": {"min": 0, "max": 64, "target_per_replica": recorded.get("target_per_replica", 4.0), "max_scale_up": 64, "step": 1},
         "cooldown": recorded["cooldown"], "stabilization": {"scale_in": 0}},
        "resnet18",
        {"min": 1, "max": 1, "cores": 64},
    )  # fmt: skip
    worker = {"node_id": "w1", "hostname": "w1", "role": "worker", "availability": "active", "status": "ready", "cpus": 64.0,
              "labels": {}, "platform": {"os": "linux", "arch": "x86_64"}, "vmid": 121, "pool": None}  # fmt: skip
    swarm = {
        "nodes": [worker],
        "services": {"resnet18": {"replicas": up, "cpus": 1.0, "constraints": [], "max_per_node": 0, "mode": "replicated"}},
        "tasks": [{"service": "resnet18", "node_id": "w1", "state": "running"}] * up,
    }
    event = {"source": "serving_pressure", "received_at": T0, "values": {"backlog": backlog}}
    request = {"action": action, "direction": action, "service": "resnet18", "event": event}
    plan = core.decide(request, settings, {"last_actions": last_actions}, swarm, [121], now=T0)
    if up == 0:
        # No server up: the source never holds back on demand, and the core sizes from the backlog alone.
        assert noop is None or noop[0] == "cooldown"
        return
    if noop is not None:
        assert plan["decision"] == "none", (noop, plan["reason"])
    elif "target_per_replica" in recorded and (action == "scale_out" or core.desired_replicas(backlog, settings["target_per_replica"]) < up):
        # What the source lets through acts, where it knows the target: a scale-in the source lets through may still find
        # that the demand needs every replica. Without a recorded target it holds back only on cooldowns.
        assert plan["decision"] == "act", plan["reason"]
    assert (noop is not None and noop[0] == "cooldown") == (core.cooldown_left(action, "resnet18", settings, last_actions, T0)[0] > 0)


def test_an_event_in_a_cooldown_stays_due_and_goes_out_at_the_first_poll_after_it():
    tracker = sp.PressureTracker(out_for=6, repeat_after=30)
    # The last scale-out ended at 0 and its settings say 20 s of cooldown; the window from 2 is met at 8.
    settings = {"resnet18": RECORDED | {"cooldown": {"scale_out": 20, "scale_in": 0, "scale_in_after_scale_out": 0}}}
    events, suppressed = [], []
    for second in range(0, 40, 2):
        events += [(second, e) for e in tracker.observe(poll_rows(per_server=8.0), T0 + second, settings=settings, acted={"resnet18:scale_out": T0 - 30})]
        suppressed += [(second, key) for _service, _action, key, _reason, _values in tracker.suppressed]
    assert seconds(events) == [8, 38], "the cooldown ended 10 s before the window: nothing held back"
    tracker = sp.PressureTracker(out_for=6, repeat_after=5)
    events, suppressed = [], []
    for second in range(0, 22, 2):
        events += [(second, e) for e in tracker.observe(poll_rows(per_server=8.0), T0 + second, settings=settings, acted={"resnet18:scale_out": T0 - 3})]
        suppressed += [(second, key) for _service, _action, key, _reason, _values in tracker.suppressed]
    # The scale-out ended 3 s before 0: due at 8 (the window from 2), cooling down until 17, out at the poll at 18.
    assert seconds(events) == [18], events
    assert suppressed == [(8, "cooldown"), (10, "cooldown"), (12, "cooldown"), (14, "cooldown"), (16, "cooldown")]


def test_a_backlog_the_servers_up_meet_is_not_asked_for_until_it_grows():
    tracker = sp.PressureTracker(out_threshold=2.0, out_for=4, repeat_after=10)
    settings = {"resnet18": RECORDED}
    schedule = [(second, poll_rows(per_server=3.0 if second < 20 else 5.0, up=2)) for second in range(0, 30, 2)]
    events, suppressed = [], []
    for second, rows in schedule:
        events += [(second, e) for e in tracker.observe(rows, T0 + second, settings=settings)]
        suppressed += [(second, key, reason) for _service, _action, key, reason, _values in tracker.suppressed]
    # 6 in flight on 2 servers at 4 per replica need 2: met until the load grows to 10 at 20, which needs 3.
    assert seconds(events) == [20], events
    assert payloads(events)[0]["values"]["backlog"] == 10
    assert {key for _second, key, _reason in suppressed} == {"demand_met"}
    assert suppressed[0][2] == "resnet18: 6 requests in flight and queued need 2 replicas at 4 each; 2 serve"
    # Without recorded settings (no scale run yet), nothing is held back.
    assert seconds(run(sp.PressureTracker(out_threshold=2.0, out_for=4, repeat_after=10), schedule)) == [6, 16, 26]


# A recorded decision not to act: a service at its minimum, at T0 - 60.
QUIET = {"direction": "scale_in", "replicas": 1, "desired": 1, "until": None, "at": T0 - 60}
QUIET_AT_MAX = {"direction": "scale_out", "replicas": 8, "desired": 8, "until": None, "at": T0 - 60}


@pytest.mark.parametrize(
    ("action", "entry", "backlog", "up", "acted", "bounds", "recheck_after", "held"),
    [
        # Nothing changed: the run would decide the same.
        ("scale_in", QUIET, 0, 1, {}, (1, 8), 300, True),
        # An action of the service before the decision changes nothing; any action after it may have (other services
        # leave room, a worker joined or left).
        ("scale_in", QUIET, 0, 1, {"resnet18:scale_out": T0 - 100}, (1, 8), 300, True),
        ("scale_in", QUIET, 0, 1, {"densenet161:scale_out": T0 - 30}, (1, 8), 300, False),
        # Not as many servers up as the service had replicas.
        ("scale_in", QUIET, 0, 2, {}, (1, 8), 300, False),
        # A stabilized scale-in: 3 desired of 3; a lower demand may let it act, the same or more may not.
        ("scale_in", QUIET | {"replicas": 3, "desired": 3}, 9, 3, {}, (1, 8), 300, True),
        ("scale_in", QUIET | {"replicas": 3, "desired": 3}, 4, 3, {}, (1, 8), 300, False),
        # Time alone changes the decision at until (the window ends).
        ("scale_in", QUIET | {"until": T0 + 10}, 0, 1, {}, (1, 8), 300, True),
        ("scale_in", QUIET | {"until": T0}, 0, 1, {}, (1, 8), 300, False),
        # A record older than recheck_after lets one run decide again; recheck_after 0 holds nothing back.
        ("scale_in", QUIET | {"at": T0 - 300}, 0, 1, {}, (1, 8), 300, False),
        ("scale_in", QUIET, 0, 1, {}, (1, 8), 0, False),
        # A record from the future (the clock stepped back) holds nothing.
        ("scale_in", QUIET | {"at": T0 + 5}, 0, 1, {}, (1, 8), 300, False),
        # At the maximum: more demand asks for no more within the bounds; a raised maximum does.
        ("scale_out", QUIET_AT_MAX, 40, 8, {}, (1, 8), 300, True),
        ("scale_out", QUIET_AT_MAX, 40, 8, {}, (1, 12), 300, False),
        # The record of the other direction says nothing about this one.
        ("scale_out", QUIET, 40, 1, {}, (1, 8), 300, False),
    ],
)
def test_a_recorded_decision_not_to_act_holds_back_the_same_event_while_nothing_changed(action, entry, backlog, up, acted, bounds, recheck_after, held):
    figures = sp.BackendFigures(servers=up, servers_up=up, inflight=backlog, queued=0, rtime_ms=0, qtime_ms=0, rate=0, hrsp_5xx=0)
    recorded = RECORDED | {"cooldown": {"scale_out": 0, "scale_in": 0, "scale_in_after_scale_out": 0}}
    quiet = {f"resnet18:{entry['direction']}": entry}
    noop = sp.noop_reason("resnet18", action, figures, T0, recorded, acted, quiet, bounds, recheck_after)
    assert (noop is not None and noop[0] == "unchanged") == held, noop
    if held:
        assert noop[1].startswith("resnet18: nothing changed since its run at ") and "decided not to" in noop[1]


def test_the_decision_core_records_what_holds_the_source_back_through_the_lease_file(tmp_path, lease_module):
    """A service at its minimum, whose workers are all needed: the core decides not to act and records it; the lease
    file carries the record to this source, which holds the same event back; the next action drops it."""
    from ansible_collections.mlfleet.serving.plugins.module_utils import _scale_decision as core

    settings = core.effective_settings({"replicas": {"min": 1, "max": 8, "target_per_replica": 4.0}}, "resnet18", {"min": 1, "max": 1, "cores": 2})
    worker = {"node_id": "w1", "hostname": "w1", "role": "worker", "availability": "active", "status": "ready", "cpus": 2.0,
              "labels": {}, "platform": {"os": "linux", "arch": "x86_64"}, "vmid": 121, "pool": None}  # fmt: skip
    swarm = {
        "nodes": [worker],
        "services": {"resnet18": {"replicas": 1, "cpus": 1.0, "constraints": [], "max_per_node": 0, "mode": "replicated"}},
        "tasks": [{"service": "resnet18", "node_id": "w1", "state": "running"}],
    }
    now = time.time()
    event = {"source": "serving_pressure", "received_at": now, "values": {"backlog": 0}}
    plan = core.decide({"action": "scale_in", "direction": "scale_in", "service": "resnet18", "event": event}, settings, {}, swarm, [121], now=now)
    assert plan["decision"] == "none"
    records = core.state_records(plan)
    assert records["quiet"] == [{"service": "resnet18", "direction": "scale_in", "replicas": 1, "desired": 1, "until": None}]
    path = tmp_path / "autoscale.lease"
    lease = lease_module.LeaseFile(str(path))
    lease.try_acquire("run-a", ttl=60)
    lease.release("run-a", bounds=records["bounds"], settings=records["settings"], quiet=records["quiet"])
    state = sp.read_lease(str(path), time.time())
    figures = sp.BackendFigures(servers=1, servers_up=1, inflight=0, queued=0, rtime_ms=0, qtime_ms=0, rate=0, hrsp_5xx=0)
    bounds = (state.min_replicas["resnet18"], state.max_replicas["resnet18"])
    noop = sp.noop_reason("resnet18", "scale_in", figures, time.time(), state.settings["resnet18"], state.last_actions, state.quiet, bounds)
    assert noop is not None and noop[0] == "unchanged", noop
    # Another service acts: the record goes, and the next event is emitted.
    lease.try_acquire("run-b", ttl=60)
    lease.release("run-b", acted=["densenet161:scale_out"])
    state = sp.read_lease(str(path), time.time())
    assert state.quiet == {}
    assert sp.noop_reason("resnet18", "scale_in", figures, time.time(), state.settings["resnet18"], state.last_actions, state.quiet, bounds) is None


def test_an_idle_service_at_its_minimum_runs_one_playbook_per_recheck_after_not_per_in_repeat_after():
    tracker = sp.PressureTracker(in_for=10, in_repeat_after=30, recheck_after=300)
    settings = {"resnet18": RECORDED | {"cooldown": {"scale_out": 0, "scale_in": 0, "scale_in_after_scale_out": 0}}}
    events, suppressed = [], []
    quiet = {}
    for second in range(0, 400, 2):
        out = tracker.observe(poll_rows(per_server=0.0, up=1), T0 + second, settings=settings, min_replicas={"resnet18": 1}, quiet=quiet)
        events += [(second, e) for e in out]
        # Each event's run decides not to act and records it, as scale.yml does when it gives the lease back.
        if out:
            quiet = {"resnet18:scale_in": {"direction": "scale_in", "replicas": 1, "desired": 1, "until": None, "at": T0 + second + 10}}
        suppressed += [key for _service, _action, key, _reason, _values in tracker.suppressed]
    # Without the record: one run per in_repeat_after (30 s), 13 in 400 s. With it: the run of the event at 12 records
    # its decision at 22, which holds the event back until 22 + recheck_after.
    assert seconds(events) == [12, 322], events
    assert set(suppressed) == {"unchanged"}


def test_suppressed_decisions_are_summarised_once_a_minute_per_service_action_and_reason(tmp_path):
    log = tmp_path / "audit" / "audit.jsonl"
    summary = sp.SuppressedDecisions(str(log), "lab")
    for second in range(0, 130, 2):
        summary.add([("resnet18", "scale_out", "demand_met", f"met at {second}", {"backlog": second})], T0 + second)
        if second < 10:
            summary.add([("densenet161", "scale_in", "cooldown", "cooling down", {"backlog": 0})], T0 + second)
        summary.write(summary.due(T0 + second))
    summary.write(summary.due(T0 + 130, everything=True))
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(r["service"], r["action"], r["fields"]["suppressed"]) for r in records] == [
        ("densenet161", "scale_in", 5),
        ("resnet18", "scale_out", 31),
        ("resnet18", "scale_out", 31),
        ("resnet18", "scale_out", 3),
    ]
    first = records[0]
    assert (first["kind"], first["decision"], first["source"], first["cluster"]) == ("scale", "not_acted", "serving_pressure", "lab")
    assert first["values"] == {"backlog": 0, "suppressed": True, "suppressed_because": "cooldown"}
    assert first["reason"] == "not emitted 5 times in 60 s, the run could only decide not to act: cooling down"
    assert records[1]["values"]["backlog"] == 60, "the figures of the last poll of the minute"
    assert oct(log.stat().st_mode & 0o777) == "0o600"
    # The records have the playbooks' audit events' keys, and the playbooks' audit code reads them all back.
    from ansible_collections.mlfleet.serving.plugins.module_utils import _audit

    assert list(first) == list(_audit.EVENT_KEYS)
    assert _audit.parse_time(first["time"]) > 0
    with open(log, "rb") as handle:
        read, broken = _audit.read_events(handle)
    assert (len(read), broken) == (4, 0)


def test_main_holds_back_what_the_recorded_settings_say_cannot_act_and_writes_the_summary(stub, tmp_path, lease_module):
    path = tmp_path / "autoscale.lease"
    log = tmp_path / "audit.jsonl"
    lease = lease_module.LeaseFile(str(path))
    lease.try_acquire("ctl:1:cafe", ttl=60)
    # The captured poll: 12 in flight and queued on 2 servers; at 8 per replica, 2 replicas meet it.
    lease.release("ctl:1:cafe", settings=[{"service": "resnet18", "target_per_replica": 8.0, "cooldown": {"scale_out": 0}}])
    events = asyncio.run(run_source({"url": stub.url, "lease_file": str(path), "audit_log": str(log)} | FAST, 0.8))
    assert events == []
    (record,) = [json.loads(line) for line in log.read_text().splitlines()]
    assert (record["service"], record["action"], record["values"]["suppressed_because"]) == ("resnet18", "scale_out", "demand_met")
    assert record["fields"]["suppressed"] >= 5
