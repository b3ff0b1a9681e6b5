"""The grafana_alerts event source, served for real on 127.0.0.1 and fed real HTTP requests; once under ansible-rulebook."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import datetime
import functools
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
import yaml
from event_source_support import load_event_source

REPO = Path(__file__).resolve().parents[3]
# The project's own copy of a notification as Grafana sends it (tests/fixtures/grafana/README.md).
SAMPLE_FILE = REPO / "tests" / "fixtures" / "grafana" / "webhook-firing-sample.json"


# An event source is loaded by file (ansible-rulebook uses runpy), not imported from the collection.
grafana_alerts = load_event_source("grafana_alerts")

TOKEN = "tok-3c9a7e51d0b24f68a1c2"
HMAC_SECRET = "hmac-8f1e2d3c4b5a69788796"
SIGNATURE_HEADER = "X-Mlfleet-Signature"
TIMESTAMP_HEADER = "X-Mlfleet-Timestamp"
EVENT_KEYS = {"action", "status", "service", "cluster", "alertname", "labels", "values", "fingerprint", "startsAt", "source", "received_at"}
REJECTION_LOGGER = "mlfleet.serving.grafana_alerts"

SAMPLE = json.loads(SAMPLE_FILE.read_text(encoding="utf-8"))
SAMPLE_BODY = json.dumps(SAMPLE).encode()


def run_async(test):
    """Run an async test in its own event loop, bounded in time (no pytest-asyncio here)."""

    @functools.wraps(test)
    def wrapper(*args, **kwargs):
        asyncio.run(asyncio.wait_for(test(*args, **kwargs), timeout=60))

    return wrapper


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def sign(body: bytes, secret: str = HMAC_SECRET, timestamp: int | str | None = None, with_timestamp: bool = True) -> dict[str, str]:
    """The headers Grafana's hmacConfig sends: unix seconds, and the hex HMAC-SHA256 of "timestamp:body" (or of the body)."""
    if not with_timestamp:
        return {SIGNATURE_HEADER: hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()}
    stamp = str(int(time.time()) if timestamp is None else timestamp)
    return {TIMESTAMP_HEADER: stamp, SIGNATURE_HEADER: hmac.new(secret.encode(), stamp.encode() + b":" + body, hashlib.sha256).hexdigest()}


def grafana_headers(body: bytes, token: str = TOKEN, **signing) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}", "Content-Type": "application/json", **sign(body, **signing)}


@dataclass
class Running:
    queue: asyncio.Queue
    task: asyncio.Task
    port: int
    url: str
    session: aiohttp.ClientSession

    async def post(self, body: bytes, headers: dict[str, str], url: str | None = None, method: str = "POST", **kwargs) -> tuple[int, dict]:
        async with self.session.request(method, url or self.url, data=body, headers=headers, **kwargs) as response:
            return response.status, await response.json(content_type=None)

    def drain(self) -> list[dict]:
        events = []
        while not self.queue.empty():
            events.append(self.queue.get_nowait())
        return events


async def wait_listening(port: int, task: asyncio.Task) -> None:
    for _attempt in range(250):
        if task.done():
            task.result()
            raise AssertionError("main() returned without listening")
        try:
            _reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.02)
            continue
        writer.close()
        await writer.wait_closed()
        return
    raise AssertionError(f"nothing listens on 127.0.0.1:{port} after 5 s")


class FakeClock:
    """The clock main() reads, moved on by the test: unix time for signed timestamps, and a monotonic time."""

    def __init__(self) -> None:
        self.unix = float(int(time.time()))
        self.elapsed = 1000.0

    def time(self) -> float:
        return self.unix

    def monotonic(self) -> float:
        return self.elapsed

    def advance(self, seconds: float) -> None:
        self.unix += seconds
        self.elapsed += seconds


@contextlib.asynccontextmanager
async def running(scheme: str = "http", client_ssl: ssl.SSLContext | None = None, clock=time, **args):
    """main() as a task on an ephemeral port, with a client session; cancelled (and checked to stop) on exit."""
    args = {"host": "127.0.0.1", "port": free_port(), **args}
    queue: asyncio.Queue = asyncio.Queue()
    task = asyncio.create_task(grafana_alerts.main(queue, args, clock=clock))
    try:
        await wait_listening(args["port"], task)
        connector = aiohttp.TCPConnector(ssl=client_ssl) if client_ssl else None
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=20)) as session:
            yield Running(queue, task, args["port"], f"{scheme}://127.0.0.1:{args['port']}{args.get('path', '/alerts')}", session)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, timeout=10)


BOTH = {"token": TOKEN, "hmac_secret": HMAC_SECRET}


# --- events -------------------------------------------------------------------------------------------------------


@run_async
async def test_sample_becomes_one_event_per_alert():
    async with running(**BOTH) as source:
        before = time.time()
        status, answer = await source.post(SAMPLE_BODY, grafana_headers(SAMPLE_BODY))
        after = time.time()
        events = source.drain()
    assert (status, answer) == (202, {"accepted": 2, "duplicates": 0})
    assert [set(event) for event in events] == [EVENT_KEYS, EVENT_KEYS]
    for event in events:
        assert before <= event.pop("received_at") <= after
    assert events == [
        {
            "action": "scale_out",
            "status": "firing",
            "service": "torchserve",
            "cluster": "lab",
            "alertname": "SwarmWorkersCpuHigh",
            "labels": SAMPLE["alerts"][0]["labels"],
            "values": {"B": 91.4, "C": 1},
            "fingerprint": "5f2b7c2a9d1e4f60",
            "startsAt": "2026-11-23T10:15:00Z",
            "source": "grafana_alerts",
        },
        {
            "action": "scale_out",
            "status": "firing",
            "service": "torchserve",
            "cluster": "lab",
            "alertname": "TorchServeQueueLatencyHigh",
            "labels": SAMPLE["alerts"][1]["labels"],
            "values": {"B": 412.0, "C": 1},
            "fingerprint": "9a8b7c6d5e4f3a21",
            "startsAt": "2026-11-23T10:15:30Z",
            "source": "grafana_alerts",
        },
    ]


@run_async
async def test_missing_labels_and_foreign_action_become_none(caplog):
    notification = copy.deepcopy(SAMPLE)
    notification["alerts"][0]["labels"] = {"alertname": "Bare"}
    notification["alerts"][1]["labels"]["action"] = "reboot"
    del notification["alerts"][1]["values"]
    body = json.dumps(notification).encode()
    caplog.set_level(logging.WARNING, logger=REJECTION_LOGGER)
    async with running(**BOTH) as source:
        status, _answer = await source.post(body, grafana_headers(body))
        bare, foreign = source.drain()
    assert status == 202
    assert (bare["action"], bare["service"], bare["cluster"], bare["labels"]) == (None, None, None, {"alertname": "Bare"})
    assert (foreign["action"], foreign["labels"]["action"], foreign["values"]) == (None, "reboot", {})
    assert "'reboot'" in caplog.text


@run_async
async def test_truncated_alerts_are_logged_at_warning(caplog):
    notification = {**SAMPLE, "truncatedAlerts": 7}
    body = json.dumps(notification).encode()
    caplog.set_level(logging.WARNING, logger=REJECTION_LOGGER)
    async with running(**BOTH) as source:
        status, _answer = await source.post(body, grafana_headers(body))
    assert status == 202
    assert [record.levelno for record in caplog.records if "truncatedAlerts" in record.getMessage() and " 7 " in record.getMessage()] == [logging.WARNING]


# --- authentication -----------------------------------------------------------------------------------------------


@run_async
async def test_bearer_only():
    async with running(token=TOKEN) as source:
        accepted = await source.post(SAMPLE_BODY, {"Authorization": f"Bearer {TOKEN}"})
        assert len(source.drain()) == 2
        wrong = await source.post(SAMPLE_BODY, {"Authorization": "Bearer not-the-token"})
        missing = await source.post(SAMPLE_BODY, {})
        assert source.queue.empty()
    assert accepted == (202, {"accepted": 2, "duplicates": 0})
    assert wrong == (401, {"reason": "bad bearer token"})
    assert missing == (401, {"reason": "missing bearer token"})


@run_async
async def test_hmac_only_with_timestamp():
    async with running(hmac_secret=HMAC_SECRET) as source:
        accepted = await source.post(SAMPLE_BODY, sign(SAMPLE_BODY))
        assert len(source.drain()) == 2
        wrong_secret = await source.post(SAMPLE_BODY, sign(SAMPLE_BODY, secret="another-secret"))
        assert source.queue.empty()
    assert accepted == (202, {"accepted": 2, "duplicates": 0})
    assert wrong_secret == (401, {"reason": "bad signature"})


@run_async
async def test_hmac_only_without_timestamp_signs_the_body_alone():
    async with running(hmac_secret=HMAC_SECRET, hmac_timestamp_header="", hmac_header="X-Grafana-Alert-Signature") as source:
        body_only = {"X-Grafana-Alert-Signature": sign(SAMPLE_BODY, with_timestamp=False)[SIGNATURE_HEADER]}
        accepted = await source.post(SAMPLE_BODY, body_only)
        assert len(source.drain()) == 2
        stamped = sign(SAMPLE_BODY)
        with_stamp = await source.post(SAMPLE_BODY, {"X-Grafana-Alert-Signature": stamped[SIGNATURE_HEADER], TIMESTAMP_HEADER: stamped[TIMESTAMP_HEADER]})
        assert source.queue.empty()
    assert accepted == (202, {"accepted": 2, "duplicates": 0})
    assert with_stamp == (401, {"reason": "bad signature"})


@run_async
async def test_token_and_hmac_must_both_pass():
    async with running(**BOTH) as source:
        bad_signature = await source.post(SAMPLE_BODY, grafana_headers(SAMPLE_BODY, secret="another-secret"))
        bad_token = await source.post(SAMPLE_BODY, grafana_headers(SAMPLE_BODY, token="not-the-token"))
        no_token = await source.post(SAMPLE_BODY, sign(SAMPLE_BODY))
        no_signature = await source.post(SAMPLE_BODY, {"Authorization": f"Bearer {TOKEN}"})
        assert source.queue.empty()
        accepted = await source.post(SAMPLE_BODY, grafana_headers(SAMPLE_BODY))
        assert len(source.drain()) == 2
    assert bad_signature == (401, {"reason": "bad signature"})
    assert bad_token == (401, {"reason": "bad bearer token"})
    assert no_token == (401, {"reason": "missing bearer token"})
    assert no_signature == (401, {"reason": "missing signature"})
    assert accepted == (202, {"accepted": 2, "duplicates": 0})


@run_async
async def test_secrets_from_files_without_their_trailing_newline(tmp_path):
    (tmp_path / "token").write_text(TOKEN + "\n")
    (tmp_path / "hmac").write_text(HMAC_SECRET + "\r\n")
    async with running(token_file=str(tmp_path / "token"), hmac_secret_file=str(tmp_path / "hmac")) as source:
        accepted = await source.post(SAMPLE_BODY, grafana_headers(SAMPLE_BODY))
        assert len(source.drain()) == 2
    assert accepted == (202, {"accepted": 2, "duplicates": 0})


@run_async
async def test_insecure_no_auth_accepts_anything_and_warns(caplog):
    caplog.set_level(logging.WARNING, logger=REJECTION_LOGGER)
    async with running(insecure_no_auth=True) as source:
        accepted = await source.post(SAMPLE_BODY, {})
        assert len(source.drain()) == 2
    assert accepted == (202, {"accepted": 2, "duplicates": 0})
    assert any(record.levelno == logging.WARNING and "WITHOUT authentication" in record.getMessage() for record in caplog.records)


# --- rejections ---------------------------------------------------------------------------------------------------


def _notification_with(change) -> bytes:
    notification = copy.deepcopy(SAMPLE)
    change(notification)
    return json.dumps(notification).encode()


# Each request is built when its test runs, so that its timestamp is fresh however long the suite ran before it.


def _signed(body: bytes, **signing):
    return lambda: (body, grafana_headers(body, **signing))


def _unsigned_header(body: bytes, drop: str):
    def build():
        headers = grafana_headers(body)
        del headers[drop]
        return body, headers

    return build


def _replace_header(body: bytes, name: str, value):
    return lambda: (body, {**grafana_headers(body), name: value() if callable(value) else value})


REJECTIONS = {
    "no Authorization": (_unsigned_header(SAMPLE_BODY, "Authorization"), 401, "missing bearer token"),
    "Basic scheme": (_replace_header(SAMPLE_BODY, "Authorization", f"Basic {TOKEN}"), 401, "missing bearer token"),
    "empty bearer": (_replace_header(SAMPLE_BODY, "Authorization", "Bearer "), 401, "missing bearer token"),
    "wrong bearer": (_signed(SAMPLE_BODY, token=TOKEN + "x"), 401, "bad bearer token"),
    "non-ASCII bearer": (_replace_header(SAMPLE_BODY, "Authorization", "Bearer tök"), 401, "bad bearer token"),
    "no signature": (_unsigned_header(SAMPLE_BODY, SIGNATURE_HEADER), 401, "missing signature"),
    "no timestamp": (_unsigned_header(SAMPLE_BODY, TIMESTAMP_HEADER), 401, "missing timestamp"),
    "signature of another body": (_replace_header(SAMPLE_BODY, SIGNATURE_HEADER, lambda: sign(b"{}")[SIGNATURE_HEADER]), 401, "bad signature"),
    "prefixed signature": (_replace_header(SAMPLE_BODY, SIGNATURE_HEADER, lambda: "sha256=" + sign(SAMPLE_BODY)[SIGNATURE_HEADER]), 401, "bad signature"),
    "upper-case signature": (_replace_header(SAMPLE_BODY, SIGNATURE_HEADER, lambda: str.upper(sign(SAMPLE_BODY)[SIGNATURE_HEADER])), 401, "bad signature"),
    "timestamp in milliseconds": (
        _signed(SAMPLE_BODY, timestamp=1795473609000),
        400,
        "bad timestamp format: X-Mlfleet-Timestamp must be unix seconds",
    ),
    "RFC 3339 timestamp": (
        _signed(SAMPLE_BODY, timestamp="2026-11-23T10:15:00Z"),
        400,
        "bad timestamp format: X-Mlfleet-Timestamp must be unix seconds",
    ),
    "negative timestamp": (_signed(SAMPLE_BODY, timestamp="-5"), 400, "bad timestamp format: X-Mlfleet-Timestamp must be unix seconds"),
    "not JSON": (_signed(b"alert!"), 400, "body is not JSON"),
    "deeply nested JSON": (_signed(b"[" * 100000), 400, "body is not JSON"),
    "JSON list": (_signed(b"[]"), 400, "not a Grafana notification: no 'alerts' list"),
    "no alerts": (_signed(b'{"status": "firing"}'), 400, "not a Grafana notification: no 'alerts' list"),
    "alerts not a list": (_signed(b'{"alerts": {}}'), 400, "not a Grafana notification: no 'alerts' list"),
    "alert not an object": (_signed(b'{"alerts": ["x"]}'), 400, "not a Grafana notification: alerts[0] is not an object"),
    "alert without labels": (
        _signed(_notification_with(lambda n: n["alerts"][1].pop("labels"))),
        400,
        "not a Grafana notification: alerts[1] has no 'labels' object of strings",
    ),
    "label not a string": (
        _signed(_notification_with(lambda n: n["alerts"][0]["labels"].update(service=3))),
        400,
        "not a Grafana notification: alerts[0] has no 'labels' object of strings",
    ),
    "alert without alertname": (
        _signed(_notification_with(lambda n: n["alerts"][0]["labels"].pop("alertname"))),
        400,
        "not a Grafana notification: alerts[0] has no 'alertname' label",
    ),
    "alert without status": (
        _signed(_notification_with(lambda n: n["alerts"][0].pop("status"))),
        400,
        "not a Grafana notification: alerts[0] has no 'status' firing or resolved",
    ),
    "alert with another status": (
        _signed(_notification_with(lambda n: n["alerts"][0].update(status="pending"))),
        400,
        "not a Grafana notification: alerts[0] has no 'status' firing or resolved",
    ),
    "alert without fingerprint": (
        _signed(_notification_with(lambda n: n["alerts"][1].pop("fingerprint"))),
        400,
        "not a Grafana notification: alerts[1] has no 'fingerprint'",
    ),
    "alert without startsAt": (
        _signed(_notification_with(lambda n: n["alerts"][0].pop("startsAt"))),
        400,
        "not a Grafana notification: alerts[0] has no RFC 3339 'startsAt'",
    ),
    "values not numbers": (
        _signed(_notification_with(lambda n: n["alerts"][0].update(values={"B": "91.4"}))),
        400,
        "not a Grafana notification: alerts[0] has 'values' that are not an object of numbers",
    ),
}


@pytest.mark.parametrize(("build", "status", "reason"), list(REJECTIONS.values()), ids=list(REJECTIONS))
@run_async
async def test_rejection(build, status, reason, caplog):
    body, headers = build()
    caplog.set_level(logging.WARNING, logger=REJECTION_LOGGER)
    async with running(**BOTH) as source:
        answer = await source.post(body, headers)
        assert source.queue.empty()
    assert answer == (status, {"reason": reason})
    rejections = [record for record in caplog.records if record.getMessage().startswith("rejected ")]
    assert len(rejections) == 1
    assert rejections[0].levelno == logging.WARNING
    assert "from 127.0.0.1" in rejections[0].getMessage() and reason in rejections[0].getMessage()


def _starting_at(starts_at: str) -> bytes:
    return _notification_with(lambda notification: [alert.update(startsAt=starts_at) for alert in notification["alerts"]])


@run_async
async def test_post_and_put_are_accepted_other_methods_and_paths_refused():
    put_body = _starting_at("2026-11-23T11:00:00Z")
    async with running(**BOTH) as source:
        post = await source.post(SAMPLE_BODY, grafana_headers(SAMPLE_BODY))
        posted = source.drain()
        # Grafana's contact point sends with PUT when its httpMethod says so.
        put = await source.post(put_body, grafana_headers(put_body), method="PUT")
        put_events = source.drain()
        refused = {method: await source.post(SAMPLE_BODY, grafana_headers(SAMPLE_BODY), method=method) for method in ("GET", "PATCH", "DELETE")}
        other_path = await source.post(SAMPLE_BODY, grafana_headers(SAMPLE_BODY), url=f"http://127.0.0.1:{source.port}/alerts/x")
        root = await source.post(SAMPLE_BODY, grafana_headers(SAMPLE_BODY), url=f"http://127.0.0.1:{source.port}/", method="PUT")
        async with source.session.get(source.url) as response:
            allow = response.headers.get("Allow")
        assert source.queue.empty()
    assert post == put == (202, {"accepted": 2, "duplicates": 0})
    assert [event["startsAt"] for event in posted] == ["2026-11-23T10:15:00Z", "2026-11-23T10:15:30Z"]
    assert [event["startsAt"] for event in put_events] == ["2026-11-23T11:00:00Z"] * 2
    assert refused == dict.fromkeys(("GET", "PATCH", "DELETE"), (405, {"reason": "method not allowed; use POST or PUT"}))
    assert allow == "POST, PUT"
    assert other_path == root == (404, {"reason": "not found"})


@run_async
async def test_expect_100_continue_is_answered():
    async with running(**BOTH) as source:
        answer = await source.post(SAMPLE_BODY, grafana_headers(SAMPLE_BODY), expect100=True)
        assert len(source.drain()) == 2
    assert answer == (202, {"accepted": 2, "duplicates": 0})


@run_async
async def test_custom_path_and_headers():
    args = {**BOTH, "path": "/hooks/grafana", "hmac_header": "X-Sig", "hmac_timestamp_header": "X-Time"}
    async with running(**args) as source:
        stamped = sign(SAMPLE_BODY)
        headers = {"Authorization": f"Bearer {TOKEN}", "X-Sig": stamped[SIGNATURE_HEADER], "X-Time": stamped[TIMESTAMP_HEADER]}
        accepted = await source.post(SAMPLE_BODY, headers)
        default_path = await source.post(SAMPLE_BODY, headers, url=f"http://127.0.0.1:{source.port}/alerts")
        assert len(source.drain()) == 2
    assert accepted == (202, {"accepted": 2, "duplicates": 0})
    assert default_path[0] == 404


# --- replay and duplicates ----------------------------------------------------------------------------------------


@run_async
async def test_replay_outside_the_clock_skew_window():
    async with running(**BOTH, max_clock_skew=60) as source:
        now = int(time.time())
        stale = await source.post(SAMPLE_BODY, grafana_headers(SAMPLE_BODY, timestamp=now - 65))
        future = await source.post(SAMPLE_BODY, grafana_headers(SAMPLE_BODY, timestamp=now + 65))
        assert source.queue.empty()
        inside = await source.post(SAMPLE_BODY, grafana_headers(SAMPLE_BODY, timestamp=now - 50))
        assert len(source.drain()) == 2
    assert stale == future == (401, {"reason": "timestamp outside the allowed clock skew"})
    assert inside == (202, {"accepted": 2, "duplicates": 0})


@run_async
async def test_fifty_identical_notifications_give_the_first_ones_events():
    headers = grafana_headers(SAMPLE_BODY)
    async with running(**BOTH) as source:
        answers = await asyncio.gather(*(source.post(SAMPLE_BODY, headers) for _copy in range(50)))
        events = source.drain()
    assert sorted((status, answer["accepted"], answer["duplicates"]) for status, answer in answers) == [(202, 0, 2)] * 49 + [(202, 2, 0)]
    assert [(event["fingerprint"], event["startsAt"]) for event in events] == [
        ("5f2b7c2a9d1e4f60", "2026-11-23T10:15:00Z"),
        ("9a8b7c6d5e4f3a21", "2026-11-23T10:15:30Z"),
    ]


@run_async
async def test_a_new_starts_at_and_a_resolution_pass_the_dedupe():
    def restarted(notification):
        notification["alerts"][0]["startsAt"] = "2026-11-23T11:00:00Z"

    def resolved(notification):
        notification["status"] = "resolved"
        for alert in notification["alerts"]:
            alert["status"] = "resolved"
            alert["endsAt"] = "2026-11-23T10:30:00Z"

    async with running(**BOTH) as source:
        first = await source.post(SAMPLE_BODY, grafana_headers(SAMPLE_BODY))
        source.drain()
        body = _notification_with(restarted)
        again = await source.post(body, grafana_headers(body))
        (restart_event,) = source.drain()
        body = _notification_with(resolved)
        resolution = await source.post(body, grafana_headers(body))
        resolution_events = source.drain()
        repeated_resolution = await source.post(body, grafana_headers(body))
        assert source.queue.empty()
    assert first == (202, {"accepted": 2, "duplicates": 0})
    assert again == (202, {"accepted": 1, "duplicates": 1})
    assert (restart_event["fingerprint"], restart_event["startsAt"]) == ("5f2b7c2a9d1e4f60", "2026-11-23T11:00:00Z")
    assert resolution == (202, {"accepted": 2, "duplicates": 0})
    assert [event["status"] for event in resolution_events] == ["resolved", "resolved"]
    assert repeated_resolution == (202, {"accepted": 0, "duplicates": 2})


def _grafana_sends(source: Running, clock: FakeClock, body: bytes = SAMPLE_BODY, method: str = "POST"):
    """Send body signed at the fake clock's time, as Grafana does for every attempt."""
    return source.post(body, grafana_headers(body, timestamp=int(clock.time())), method=method)


@run_async
async def test_fifty_copies_in_ten_seconds_make_one_event_per_alert():
    clock = FakeClock()
    async with running(**BOTH, clock=clock, repeat_interval="1m") as source:
        answers = []
        for copy in range(50):
            answers.append(await _grafana_sends(source, clock, method=("POST", "PUT")[copy % 2]))
            clock.advance(0.2)
        events = source.drain()
    assert answers == [(202, {"accepted": 2, "duplicates": 0})] + [(202, {"accepted": 0, "duplicates": 2})] * 49
    # One event per alert: the rulebook's rule for (service, action) runs once.
    assert [(event["fingerprint"], event["startsAt"]) for event in events] == [
        ("5f2b7c2a9d1e4f60", "2026-11-23T10:15:00Z"),
        ("9a8b7c6d5e4f3a21", "2026-11-23T10:15:30Z"),
    ]


@run_async
async def test_a_firing_alert_sent_again_after_the_repeat_interval_reaches_the_queue_again():
    clock = FakeClock()
    async with running(**BOTH, clock=clock, repeat_interval="1m") as source:
        first = await _grafana_sends(source, clock)
        clock.advance(20)
        # A group change or an HA peer within half the repeat interval: a duplicate.
        early = await _grafana_sends(source, clock)
        clock.advance(40)
        repeated = await _grafana_sends(source, clock)
        repeated_events = source.drain()[2:]
        clock.advance(1)
        retried = await _grafana_sends(source, clock)
        clock.advance(59)
        again = await _grafana_sends(source, clock)
        assert len(source.drain()) == 2
    assert first == repeated == again == (202, {"accepted": 2, "duplicates": 0})
    assert early == retried == (202, {"accepted": 0, "duplicates": 2})
    assert [(event["status"], event["fingerprint"], event["received_at"]) for event in repeated_events] == [
        ("firing", "5f2b7c2a9d1e4f60", clock.time() - 60),
        ("firing", "9a8b7c6d5e4f3a21", clock.time() - 60),
    ]


@run_async
async def test_a_captured_request_replayed_after_the_duplicate_window_is_refused(caplog):
    clock = FakeClock()
    caplog.set_level(logging.DEBUG, logger=REJECTION_LOGGER)
    async with running(**BOTH, clock=clock, repeat_interval="1m", max_clock_skew=300) as source:
        captured = grafana_headers(SAMPLE_BODY, timestamp=int(clock.time()))
        original = await source.post(SAMPLE_BODY, captured)
        assert len(source.drain()) == 2
        clock.advance(10)
        # The same request within the duplicate window is a copy (a retry, an HA peer): nothing reaches the queue.
        copy = await source.post(SAMPLE_BODY, captured, method="PUT")
        replays = {}
        for after in (31, 120, 299):
            clock.advance(after - (clock.time() - int(captured[TIMESTAMP_HEADER])))
            replays[after] = await source.post(SAMPLE_BODY, captured)
        clock.advance(2)
        outside_skew = await source.post(SAMPLE_BODY, captured)
        assert source.queue.empty()
        # Grafana's own sends go on: a fresh signature after the repeat interval is let through.
        fresh = await _grafana_sends(source, clock)
        assert len(source.drain()) == 2
    assert original == fresh == (202, {"accepted": 2, "duplicates": 0})
    assert copy == (202, {"accepted": 0, "duplicates": 2})
    assert replays == dict.fromkeys((31, 120, 299), (401, {"reason": "replayed request"}))
    assert outside_skew == (401, {"reason": "timestamp outside the allowed clock skew"})
    assert len([record for record in caplog.records if record.getMessage().endswith("HTTP 401 replayed request")]) == 3


@run_async
async def test_without_a_timestamp_the_same_body_is_a_duplicate_only_within_the_window():
    clock = FakeClock()
    args = {**BOTH, "hmac_timestamp_header": "", "repeat_interval": "1m"}
    async with running(**args, clock=clock) as source:
        headers = grafana_headers(SAMPLE_BODY, with_timestamp=False)
        first = await source.post(SAMPLE_BODY, headers)
        clock.advance(30)
        copy = await source.post(SAMPLE_BODY, headers)
        clock.advance(1)
        # Grafana's repeat carries the same body and signature; so would a replay (hmac_timestamp_header says so).
        later = await source.post(SAMPLE_BODY, headers)
        assert len(source.drain()) == 4
    assert first == later == (202, {"accepted": 2, "duplicates": 0})
    assert copy == (202, {"accepted": 0, "duplicates": 2})


def test_duplicate_window_is_half_the_repeat_interval():
    settings = {
        value: grafana_alerts.parse_args({"port": 5001, "token": TOKEN, "repeat_interval": value}).duplicate_window
        for value in ("1m", "4h", "1h30m", 90, "10s", "500ms")
    }
    assert settings == {"1m": 30, "4h": 7200, "1h30m": 2700, 90: 45, "10s": 5, "500ms": 0.25}


def test_expiring_keys_are_bounded_and_expire_each_at_its_own_time(caplog):
    recent = grafana_alerts.ExpiringKeys(max_keys=3, overflow_warning="too many")
    assert [recent.add((str(key),), now=100.0, expires_at=110.0 + key) for key in range(5)] == [True] * 5
    assert len(recent) == 3
    assert [record.getMessage() for record in caplog.records] == ["too many", "too many"]
    # The soonest to expire were forgotten to keep 3.
    assert (recent.get(("0",), now=100.0), recent.get(("4",), now=100.0)) == (None, True)
    assert recent.add(("4",), now=114.0, expires_at=200.0) is False
    assert recent.get(("4",), now=114.0) is True  # kept while now is not past its expiry
    assert recent.get(("3",), now=113.5) is None
    assert recent.get(("4",), now=114.5) is None
    assert len(recent) == 0
    assert recent.add(("late",), now=120.0, expires_at=130.0, value=7.5) is True
    assert recent.get(("late",), now=125.0) == 7.5
    assert recent.add(("past",), now=120.0, expires_at=119.0) is True
    assert recent.get(("past",), now=120.0) is None


# --- slow and idle clients ---------------------------------------------------------------------------------------

# Small limits keep these tests to a few seconds; the defaults (10 s, 20 s, 100) only stretch the same behaviour.
SLOW_LIMITS = {"header_timeout": 1.0, "body_timeout": 1.0}
CUT_MARGIN = 1.0


class SlowClient:
    """A connection that behaves like a slow or idle client: it sends nothing ("idle"), dribbles its request headers a
    byte at a time ("headers"), or sends its headers and dribbles the body ("body")."""

    def __init__(self, kind: str) -> None:
        self.kind = kind

    async def connect(self, port: int) -> SlowClient:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", port)
        self.opened = asyncio.get_running_loop().time()
        self.closed = asyncio.ensure_future(self.reader.read())
        if self.kind == "headers":
            self.writer.write(b"POST /alerts HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        elif self.kind == "body":
            self.writer.write(f"POST /alerts HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\nContent-Length: 4096\r\n\r\n{{".encode())
        return self

    def is_open(self) -> bool:
        return not self.closed.done()

    async def dribble(self, give_up_after: float) -> float | None:
        """Seconds from opening until the server closed the connection; None if it was still open after give_up_after."""
        loop = asyncio.get_running_loop()
        try:
            while not self.closed.done() and loop.time() - self.opened < give_up_after:
                if self.kind != "idle" and not self.writer.is_closing():
                    self.writer.write(b" ")
                await asyncio.wait([self.closed], timeout=0.1)
            if not self.closed.done():
                return None
            with contextlib.suppress(ConnectionError):
                self.closed.result()
            return loop.time() - self.opened
        finally:
            self.closed.cancel()
            self.writer.transport.abort()


async def _held_open(port: int, kind: str, give_up_after: float) -> float | None:
    client = await SlowClient(kind).connect(port)
    return await client.dribble(give_up_after)


async def _timed_send(source: Running, session: aiohttp.ClientSession, starts_at: str) -> tuple[float, tuple[int, dict]]:
    body = _starting_at(starts_at)
    started = time.monotonic()
    async with session.post(source.url, data=body, headers=grafana_headers(body)) as response:
        answer = response.status, await response.json(content_type=None)
    return time.monotonic() - started, answer


@run_async
async def test_three_hundred_slow_clients_are_cut_while_grafana_is_answered_at_once(caplog):
    caplog.set_level(logging.WARNING, logger=REJECTION_LOGGER)
    async with running(**BOTH, **SLOW_LIMITS, max_connections=50) as source:
        clients = [SlowClient(("headers", "idle")[number % 3 == 0]) for number in range(300)]
        for batch in range(0, 300, 50):
            await asyncio.gather(*(client.connect(source.port) for client in clients[batch : batch + 50]))
        slow = [asyncio.ensure_future(client.dribble(give_up_after=5)) for client in clients]
        open_when_sends_began = sum(client.is_open() for client in clients)
        # A new connection for every send, as Grafana opens one when it has none idle.
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True), timeout=aiohttp.ClientTimeout(total=10)) as session:
            sends = []
            for number in range(12):
                sends.append(await _timed_send(source, session, f"2026-11-23T11:00:{number:02d}Z"))
                await asyncio.sleep(0.1)
        cut_after = await asyncio.gather(*slow)
        events = source.drain()
    assert open_when_sends_began >= 40, open_when_sends_began
    assert [answer for _seconds, answer in sends] == [(202, {"accepted": 2, "duplicates": 0})] * 12
    assert max(seconds for seconds, _answer in sends) < 2, sends
    assert len(events) == 24
    assert None not in cut_after, f"{cut_after.count(None)} slow clients were still connected after 5 s"
    assert max(cut_after) < SLOW_LIMITS["header_timeout"] + CUT_MARGIN, max(cut_after)
    messages = [record.getMessage() for record in caplog.records]
    timed_out = sum("no complete request within header_timeout (1 s)" in message for message in messages)
    made_room = sum("50 connections (max_connections) are open and it waited longest for a request" in message for message in messages)
    # Each slow client was cut once, by its own time running out or to make room for a newer connection.
    assert (timed_out + made_room, made_room >= 250, timed_out >= 50 - 12) == (300, True, True), (timed_out, made_room)


@run_async
async def test_a_slow_body_is_answered_408_and_its_connection_closed():
    async with running(**BOTH, **SLOW_LIMITS) as source:
        loop = asyncio.get_running_loop()
        reader, writer = await asyncio.open_connection("127.0.0.1", source.port)
        started = loop.time()
        writer.write(f"PUT /alerts HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\nContent-Length: 100\r\n\r\n{{".encode())
        answer = b""
        while loop.time() - started < 5:
            writer.write(b" ")
            try:
                chunk = await asyncio.wait_for(reader.read(65536), 0.1)
            except TimeoutError:
                continue
            except ConnectionError:
                break
            if not chunk:
                break
            answer += chunk
        closed_after = loop.time() - started
        writer.transport.abort()
        assert source.queue.empty()
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    assert b'{"reason": "body not received within body_timeout (1 s)"}' in answer
    # Answered, then closed after a grace to read the answer (1 s at most), not after aiohttp's lingering 10 s.
    assert SLOW_LIMITS["body_timeout"] <= closed_after < SLOW_LIMITS["body_timeout"] + 1 + CUT_MARGIN


@run_async
async def test_when_every_connection_is_busy_a_new_one_is_closed_until_one_frees(caplog):
    caplog.set_level(logging.WARNING, logger=REJECTION_LOGGER)
    async with running(**BOTH, header_timeout=5, body_timeout=1.5, max_connections=3) as source:
        busy = [asyncio.ensure_future(_held_open(source.port, "body", give_up_after=8)) for _number in range(3)]
        await asyncio.sleep(0.5)
        refused = await _held_open(source.port, "idle", give_up_after=3)
        freed = await asyncio.gather(*busy)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
            seconds, answer = await _timed_send(source, session, "2026-11-23T12:00:00Z")
        assert len(source.drain()) == 2
    assert refused is not None and refused < 0.5, refused
    assert all(seconds is not None and 1.5 <= seconds < 1.5 + 1 + CUT_MARGIN for seconds in freed), freed
    assert answer == (202, {"accepted": 2, "duplicates": 0}) and seconds < 2
    assert any(
        "closed a new connection from 127.0.0.1:" in record.getMessage() and "all 3 connections (max_connections) are busy" in record.getMessage()
        for record in caplog.records
    )


@run_async
async def test_an_idle_keep_alive_connection_is_closed_after_header_timeout():
    async with running(**BOTH, **SLOW_LIMITS) as source:
        loop = asyncio.get_running_loop()
        reader, writer = await asyncio.open_connection("127.0.0.1", source.port)
        headers = "".join(f"{name}: {value}\r\n" for name, value in grafana_headers(SAMPLE_BODY).items())
        writer.write(f"POST /alerts HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(SAMPLE_BODY)}\r\n{headers}\r\n".encode() + SAMPLE_BODY)
        answer = await asyncio.wait_for(reader.readuntil(b"}"), 2)
        answered = loop.time()
        rest = await asyncio.wait_for(reader.read(), 5)
        idle_for = loop.time() - answered
        writer.close()
        assert len(source.drain()) == 2
    assert answer.startswith(b"HTTP/1.1 202 ") and rest == b""
    assert SLOW_LIMITS["header_timeout"] - 0.2 <= idle_for < SLOW_LIMITS["header_timeout"] + CUT_MARGIN


# --- size ---------------------------------------------------------------------------------------------------------


@run_async
async def test_body_size_limit():
    limit = 4096
    exact = SAMPLE_BODY + b" " * (limit - len(SAMPLE_BODY))
    over = exact + b" "

    async def chunked(data: bytes):
        for start in range(0, len(data), 1000):
            yield data[start : start + 1000]

    async with running(**BOTH, max_body_bytes=limit) as source:
        at_limit = await source.post(exact, grafana_headers(exact))
        assert len(source.drain()) == 2
        declared = await source.post(over, grafana_headers(over))
        streamed = await source.post(chunked(over), grafana_headers(over))
        assert source.queue.empty()
    assert at_limit == (202, {"accepted": 2, "duplicates": 0})
    assert declared == streamed == (413, {"reason": f"body larger than {limit} bytes"})


@run_async
async def test_default_body_limit_is_one_mebibyte():
    body = b" " * (1024 * 1024 + 1)
    async with running(**BOTH) as source:
        answer = await source.post(body, grafana_headers(body))
        assert source.queue.empty()
    assert answer == (413, {"reason": "body larger than 1048576 bytes"})


# --- TLS ----------------------------------------------------------------------------------------------------------


def _self_signed(directory: Path) -> tuple[Path, Path]:
    pytest.importorskip("cryptography")
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    certfile, keyfile = directory / "tls.crt", directory / "tls.key"
    certfile.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    keyfile.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return certfile, keyfile


@run_async
async def test_tls(tmp_path):
    certfile, keyfile = _self_signed(tmp_path)
    client_ssl = ssl.create_default_context(cafile=str(certfile))
    async with running(scheme="https", client_ssl=client_ssl, certfile=str(certfile), keyfile=str(keyfile), header_timeout=1, **BOTH) as source:
        accepted = await source.post(SAMPLE_BODY, grafana_headers(SAMPLE_BODY))
        assert len(source.drain()) == 2
        with pytest.raises(aiohttp.ClientError):
            await source.post(SAMPLE_BODY, grafana_headers(SAMPLE_BODY), url=f"http://127.0.0.1:{source.port}/alerts")
        # The TLS handshake counts against header_timeout.
        no_handshake = await _held_open(source.port, "idle", give_up_after=5)
        assert source.queue.empty()
    assert accepted == (202, {"accepted": 2, "duplicates": 0})
    assert no_handshake is not None and no_handshake < 1 + CUT_MARGIN, no_handshake


# --- arguments ----------------------------------------------------------------------------------------------------


def _secret_files(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "empty").write_text("\n")
    (tmp_path / "spaced").write_text(" token\n")
    return {"empty": str(tmp_path / "empty"), "spaced": str(tmp_path / "spaced"), "missing": str(tmp_path / "missing")}


ARGUMENT_ERRORS = {
    "no port": ({"token": TOKEN}, "argument 'port' is required"),
    "port not a number": ({"port": "http", "token": TOKEN}, "argument 'port' must be an integer between 1 and 65535, got 'http'"),
    "port too large": ({"port": 70000, "token": TOKEN}, "argument 'port' must be an integer between 1 and 65535, got 70000"),
    "port boolean": ({"port": True, "token": TOKEN}, "argument 'port' must be an integer"),
    "unknown argument": ({"port": 5001, "token": TOKEN, "secret": "x"}, "unknown argument(s) 'secret'; known arguments: host, port"),
    "no authentication": ({"port": 5001}, "set 'token' (or 'token_file') and/or 'hmac_secret' (or 'hmac_secret_file')"),
    "no authentication, insecure false": ({"port": 5001, "insecure_no_auth": False}, "or set 'insecure_no_auth: true'"),
    "insecure not boolean": ({"port": 5001, "insecure_no_auth": "maybe"}, "argument 'insecure_no_auth' must be true or false, got 'maybe'"),
    "certfile alone": (
        {"port": 5001, "token": TOKEN, "certfile": "/tmp/c.pem"},
        "'certfile' is set but 'keyfile' is not; set both for TLS, or neither",
    ),
    "keyfile alone": ({"port": 5001, "token": TOKEN, "keyfile": "/tmp/k.pem"}, "argument 'keyfile' is set but 'certfile' is not"),
    "unreadable certfile": ({"port": 5001, "token": TOKEN, "certfile": "/nonexistent/c.pem", "keyfile": "/nonexistent/k.pem"}, "certfile='/nonexistent/c.pem'"),
    "token and token_file": ({"port": 5001, "token": TOKEN, "token_file": "/tmp/t"}, "set 'token' or 'token_file', not both"),
    "empty token": ({"port": 5001, "token": ""}, "argument 'token' is empty"),
    "token not a string": ({"port": 5001, "token": 1234}, "argument 'token' must be a string, got int"),
    "missing token_file": ({"port": 5001, "token_file": "{missing}"}, "argument 'token_file': cannot read"),
    "empty hmac_secret_file": ({"port": 5001, "hmac_secret_file": "{empty}"}, "of argument 'hmac_secret_file' is empty"),
    "token_file with spaces": ({"port": 5001, "token_file": "{spaced}"}, "starts or ends with whitespace"),
    "relative path": ({"port": 5001, "token": TOKEN, "path": "alerts"}, "argument 'path' must start with '/', got 'alerts'"),
    "bad header name": ({"port": 5001, "hmac_secret": HMAC_SECRET, "hmac_header": "X Sig"}, "argument 'hmac_header' must be an HTTP header name"),
    "same headers": ({"port": 5001, "hmac_secret": HMAC_SECRET, "hmac_header": "X-A", "hmac_timestamp_header": "x-a"}, "name the same header"),
    "zero skew": ({"port": 5001, "token": TOKEN, "max_clock_skew": 0}, "argument 'max_clock_skew' must be a number of seconds greater than 0"),
    "dedupe_ttl removed": (
        {"port": 5001, "token": TOKEN, "dedupe_ttl": 3600},
        "argument 'dedupe_ttl' was removed: an alert is now a duplicate within half of 'repeat_interval'",
    ),
    "dedupe_ttl 0 removed too": ({"port": 5001, "token": TOKEN, "dedupe_ttl": 0}, "remove 'dedupe_ttl' and set 'repeat_interval'"),
    "zero repeat_interval": ({"port": 5001, "token": TOKEN, "repeat_interval": "0s"}, "argument 'repeat_interval' must be a duration longer than 0"),
    "repeat_interval unit": ({"port": 5001, "token": TOKEN, "repeat_interval": "1 hour"}, "like 1m, 4h or 1h30m (units ms, s, m, h, d, w, y, largest first)"),
    "repeat_interval order": ({"port": 5001, "token": TOKEN, "repeat_interval": "30m1h"}, "got '30m1h'"),
    "repeat_interval boolean": ({"port": 5001, "token": TOKEN, "repeat_interval": True}, "argument 'repeat_interval' must be a duration"),
    "negative repeat_interval": ({"port": 5001, "token": TOKEN, "repeat_interval": -60}, "argument 'repeat_interval' must be a duration longer than 0"),
    "zero header_timeout": ({"port": 5001, "token": TOKEN, "header_timeout": 0}, "argument 'header_timeout' must be a number of seconds greater than 0"),
    "body_timeout not a number": ({"port": 5001, "token": TOKEN, "body_timeout": "soon"}, "argument 'body_timeout' must be a number of seconds greater than 0"),
    "zero max_connections": ({"port": 5001, "token": TOKEN, "max_connections": 0}, "argument 'max_connections' must be an integer at least 1, got 0"),
    "zero body": ({"port": 5001, "token": TOKEN, "max_body_bytes": 0}, "argument 'max_body_bytes' must be an integer at least 1"),
    "empty host": ({"port": 5001, "token": TOKEN, "host": ""}, "argument 'host' must not be empty"),
}


@pytest.mark.parametrize(("args", "message"), list(ARGUMENT_ERRORS.values()), ids=list(ARGUMENT_ERRORS))
def test_argument_errors(args, message, tmp_path):
    files = _secret_files(tmp_path)
    args = {name: value.format(**files) if isinstance(value, str) and value.startswith("{") else value for name, value in args.items()}
    with pytest.raises(ValueError) as raised:
        asyncio.run(asyncio.wait_for(grafana_alerts.main(asyncio.Queue(), args), timeout=10))
    assert message in str(raised.value)
    assert str(raised.value).startswith("mlfleet.serving.grafana_alerts: ")
    assert TOKEN not in str(raised.value)


def test_arguments_accept_rulebook_strings_and_feedback_queue():
    settings = grafana_alerts.parse_args(
        {
            "port": "5001",
            "token": TOKEN,
            "insecure_no_auth": "false",
            "max_clock_skew": "30",
            "repeat_interval": "4h",
            "header_timeout": "2.5",
            "body_timeout": "15",
            "max_connections": "40",
            "eda_feedback_queue": object(),
        }
    )
    assert (settings.port, settings.host, settings.path, settings.max_clock_skew, settings.repeat_interval) == (5001, "127.0.0.1", "/alerts", 30.0, 14400.0)
    assert (settings.header_timeout, settings.body_timeout, settings.max_connections) == (2.5, 15.0, 40)
    assert (settings.hmac_header, settings.hmac_timestamp_header, settings.max_body_bytes) == (SIGNATURE_HEADER, TIMESTAMP_HEADER, 1048576)
    assert TOKEN not in repr(settings)


def test_documented_defaults_are_the_defaults():
    documented = yaml.safe_load(grafana_alerts.DOCUMENTATION)["options"]
    settings = grafana_alerts.parse_args({"port": 5001, "token": TOKEN})
    for name, option in documented.items():
        if "default" in option and name not in ("port",):
            value = getattr(settings, name)
            expected = grafana_alerts.duration_seconds(option["default"]) if name == "repeat_interval" else option["default"]
            assert value == expected, name
    assert set(documented) == set(grafana_alerts._KNOWN_ARGS)
    assert yaml.safe_load(grafana_alerts.EXAMPLES)[0]["mlfleet.serving.grafana_alerts"]["repeat_interval"] == documented["repeat_interval"]["default"]


# Grafana reads repeat_interval with Prometheus' duration parser; the monitoring role checks its files with the same
# rules (plugins/module_utils/_monitoring_validate.py). The event source keeps its own copy (it is loaded by file, with
# no module_utils beside it): this table proves they agree.
DURATIONS = ("1m", "4h", "1h30m", "90s", "500ms", "1d", "2w", "1y", "1h0m", "1m30s500ms", "0", "0s", "", "m", "1", "1.5m", "30m1h", "1h1h", "1M", " 1m", "-1m")


@pytest.mark.parametrize("text", DURATIONS)
def test_repeat_interval_is_read_as_grafana_reads_it(text):
    validate = pytest.importorskip("ansible_collections.mlfleet.serving.plugins.module_utils._monitoring_validate")
    grafana = validate.prometheus_seconds(text)
    if text == "1":
        # A plain number is seconds here (ansible-rulebook renders a number given to the template as a string).
        assert (grafana, grafana_alerts.duration_seconds(text)) == (None, 1.0)
    elif grafana is None or grafana <= 0:
        with pytest.raises(ValueError, match="argument 'repeat_interval' must be a duration longer than 0"):
            grafana_alerts.parse_args({"port": 5001, "token": TOKEN, "repeat_interval": text})
    else:
        assert grafana_alerts.parse_args({"port": 5001, "token": TOKEN, "repeat_interval": text}).repeat_interval == pytest.approx(grafana)


def _rulebook_source_args() -> dict:
    (ruleset,) = yaml.safe_load((REPO / "extensions" / "eda" / "rulebooks" / "autoscale.yml").read_text(encoding="utf-8"))
    (source,) = [source for source in ruleset["sources"] if "mlfleet.serving.grafana_alerts" in source]
    return source["mlfleet.serving.grafana_alerts"]


def test_the_rulebook_passes_the_monitoring_roles_repeat_interval_and_the_same_defaults():
    jinja2 = pytest.importorskip("jinja2")
    rulebook_args = _rulebook_source_args()
    # One variable feeds Grafana's notification policy (roles/monitoring) and the source's duplicate window.
    assert rulebook_args["repeat_interval"] == "{{ monitoring_policy_repeat_interval | default('1m') }}"
    role_defaults = yaml.safe_load((REPO / "roles" / "monitoring" / "defaults" / "main.yml").read_text(encoding="utf-8"))
    role_specs = yaml.safe_load((REPO / "roles" / "monitoring" / "meta" / "argument_specs.yml").read_text(encoding="utf-8"))
    role_default = role_defaults["monitoring_policy_repeat_interval"]
    assert role_default == role_specs["argument_specs"]["main"]["options"]["monitoring_policy_repeat_interval"]["default"]
    documented = yaml.safe_load(grafana_alerts.DOCUMENTATION)["options"]
    assert documented["repeat_interval"]["default"] == role_default
    # Rendered with no variables set, as ansible-rulebook renders it, the rulebook's arguments are the source's defaults.
    names = ("repeat_interval", "header_timeout", "body_timeout", "max_connections")
    rendered = {name: jinja2.Template(rulebook_args[name]).render() for name in names}
    from_rulebook = grafana_alerts.parse_args({"port": 5001, "token": TOKEN, **rendered})
    defaults = grafana_alerts.parse_args({"port": 5001, "token": TOKEN})
    assert [getattr(from_rulebook, name) for name in names] == [getattr(defaults, name) for name in names]
    # And a value given to the variable reaches the source.
    given = jinja2.Template(rulebook_args["repeat_interval"]).render(monitoring_policy_repeat_interval="4h")
    assert grafana_alerts.parse_args({"port": 5001, "token": TOKEN, "repeat_interval": given}).duplicate_window == 7200


@run_async
async def test_port_in_use_names_it():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{port}"):
            await grafana_alerts.main(asyncio.Queue(), {"port": port, "token": TOKEN})


@run_async
async def test_cancellation_stops_listening():
    port = free_port()
    task = asyncio.create_task(grafana_alerts.main(asyncio.Queue(), {"port": port, "token": TOKEN}))
    await wait_listening(port, task)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, timeout=10)
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", port)


# --- secrets stay out of the logs ---------------------------------------------------------------------------------


@run_async
async def test_secrets_and_bodies_never_logged(caplog, tmp_path):
    caplog.set_level(logging.DEBUG)
    wrong_token = "wrong-7d1f0e9c2b"
    async with running(**BOTH) as source:
        headers = grafana_headers(SAMPLE_BODY)
        signatures = [headers[SIGNATURE_HEADER]]
        answers = [await source.post(SAMPLE_BODY, grafana_headers(SAMPLE_BODY, token=wrong_token))]
        forged = grafana_headers(SAMPLE_BODY, secret="forged-secret-11")
        signatures.append(forged[SIGNATURE_HEADER])
        answers.append(await source.post(SAMPLE_BODY, forged))
        answers.append(await source.post(b"not json at all: " + TOKEN.encode(), grafana_headers(b"not json at all: " + TOKEN.encode())))
        answers.append(await source.post(SAMPLE_BODY, headers))
        answers.append(await source.post(SAMPLE_BODY, headers))
    assert [status for status, _answer in answers] == [401, 401, 400, 202, 202]
    assert len([record for record in caplog.records if record.getMessage().startswith("rejected ")]) == 3
    for secret in (TOKEN, HMAC_SECRET, wrong_token, "forged-secret-11", *signatures, "mean CPU usage of swarm workers", "not json at all"):
        assert secret not in caplog.text


# --- under ansible-rulebook ---------------------------------------------------------------------------------------


RULEBOOK = """\
- name: Grafana alerts
  hosts: all
  sources:
    - mlfleet.serving.grafana_alerts:
        host: 127.0.0.1
        port: {port}
        token_file: {token_file}
        hmac_secret_file: {hmac_file}
        # As the collection's rulebook passes it: a duration in Grafana's notation, rendered as a string.
        repeat_interval: "{{{{ repeat_interval }}}}"
  rules:
    - name: Print scale-out alerts
      condition: event.action == "scale_out" and event.source == "grafana_alerts"
      action:
        debug:
          msg: "rule fired for {{{{ event.alertname }}}} {{{{ event.action }}}} {{{{ event.fingerprint }}}} {{{{ event['values']['B'] }}}}"
"""


def _wait_for(predicate, process: subprocess.Popen, log: Path, what: str, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return
        if process.poll() is not None:
            raise AssertionError(f"ansible-rulebook exited with {process.returncode} before {what}:\n{log.read_text(errors='replace')}")
        time.sleep(0.1)
    raise AssertionError(f"no {what} within {seconds} s:\n{log.read_text(errors='replace')}")


def _listening(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(0.5)
        return probe.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.skipif(shutil.which("ansible-rulebook") is None or shutil.which("java") is None, reason="needs ansible-rulebook and Java on PATH")
def test_under_ansible_rulebook(tmp_path):
    requests = pytest.importorskip("requests")
    collections = tmp_path / "collections"
    (collections / "ansible_collections" / "mlfleet").mkdir(parents=True)
    (collections / "ansible_collections" / "mlfleet" / "serving").symlink_to(REPO)
    (tmp_path / "token").write_text(TOKEN + "\n")
    (tmp_path / "hmac").write_text(HMAC_SECRET + "\n")
    port = free_port()
    (tmp_path / "r.yml").write_text(RULEBOOK.format(port=port, token_file=tmp_path / "token", hmac_file=tmp_path / "hmac"))
    (tmp_path / "inv.yml").write_text("all:\n  hosts:\n    localhost:\n      ansible_connection: local\n")
    (tmp_path / "vars.yml").write_text("repeat_interval: 2s\n")
    log = tmp_path / "rulebook.log"
    env = {**os.environ, "ANSIBLE_COLLECTIONS_PATH": str(collections), "PYTHONUNBUFFERED": "1"}
    with log.open("wb") as output:
        process = subprocess.Popen(
            ["ansible-rulebook", "--rulebook", "r.yml", "-i", "inv.yml", "--vars", "vars.yml", "--print-events"],
            cwd=tmp_path,
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        _wait_for(lambda: _listening(port), process, log, f"listener on 127.0.0.1:{port}")
        url = f"http://127.0.0.1:{port}/alerts"
        response = requests.post(url, data=SAMPLE_BODY, headers=grafana_headers(SAMPLE_BODY), timeout=10)
        assert (response.status_code, response.json()) == (202, {"accepted": 2, "duplicates": 0})
        duplicate = requests.post(url, data=SAMPLE_BODY, headers=grafana_headers(SAMPLE_BODY), timeout=10)
        assert (duplicate.status_code, duplicate.json()) == (202, {"accepted": 0, "duplicates": 2})
        _wait_for(lambda: log.read_text(errors="replace").count("rule fired for ") >= 2, process, log, "the rule's debug output")
        # Still firing, sent again after the repeat interval (2 s: duplicates within 1 s of the first sighting, which came
        # before the first answer), with PUT: it reaches the rules again.
        time.sleep(1.1)
        again = requests.put(url, data=SAMPLE_BODY, headers=grafana_headers(SAMPLE_BODY), timeout=10)
        assert (again.status_code, again.json()) == (202, {"accepted": 2, "duplicates": 0})
        _wait_for(lambda: log.read_text(errors="replace").count("rule fired for ") >= 4, process, log, "the rule's debug output for the repeat")
        output_text = log.read_text(errors="replace")
        assert "rule fired for SwarmWorkersCpuHigh scale_out 5f2b7c2a9d1e4f60 91.4" in output_text
        assert "rule fired for TorchServeQueueLatencyHigh scale_out 9a8b7c6d5e4f3a21 412.0" in output_text
        # --print-events shows the event as the source made it, plus the meta ansible-rulebook adds.
        assert "'source': 'grafana_alerts'" in output_text and "'name': 'mlfleet.serving.grafana_alerts'" in output_text
        assert TOKEN not in output_text and HMAC_SECRET not in output_text
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=15)
