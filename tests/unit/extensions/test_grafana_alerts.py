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
from event_source_support import load_event_source

REPO = Path(__file__).resolve().parents[3]
SAMPLE_FILE = REPO.parent / "shared" / "grafana" / "webhook-firing-sample.json"


# An event source is loaded by file (ansible-rulebook uses runpy), not imported from the collection.
grafana_alerts = load_event_source("grafana_alerts")

TOKEN = "tok-3c9a7e51d0b24f68a1c2"
HMAC_SECRET = "hmac-8f1e2d3c4b5a69788796"
SIGNATURE_HEADER = "X-Mlfleet-Signature"
TIMESTAMP_HEADER = "X-Mlfleet-Timestamp"
EVENT_KEYS = {"action", "status", "service", "cluster", "alertname", "labels", "values", "fingerprint", "startsAt", "source", "received_at"}
REJECTION_LOGGER = "mlfleet.serving.grafana_alerts"


def _sample() -> dict:
    if SAMPLE_FILE.is_file():
        return json.loads(SAMPLE_FILE.read_text(encoding="utf-8"))
    # The shared sample is beside the checkout on a developer's machine; this is the same payload, for a lone checkout.
    alert = {
        "status": "firing",
        "labels": {"alertname": "SwarmWorkersCpuHigh", "grafana_folder": "mlfleet", "action": "scale_out", "service": "torchserve", "cluster": "lab"},
        "annotations": {"summary": "Mean worker CPU above 80% for 2m", "description": "mean CPU usage of swarm workers is 91.4%"},
        "startsAt": "2026-11-23T10:15:00Z",
        "endsAt": "0001-01-01T00:00:00Z",
        "fingerprint": "5f2b7c2a9d1e4f60",
        "values": {"B": 91.4, "C": 1},
    }
    second = {
        "status": "firing",
        "labels": {
            "alertname": "TorchServeQueueLatencyHigh",
            "grafana_folder": "mlfleet",
            "action": "scale_out",
            "service": "torchserve",
            "model": "resnet18",
            "cluster": "lab",
        },
        "annotations": {"summary": "p95 queue latency above 200 ms"},
        "startsAt": "2026-11-23T10:15:30Z",
        "endsAt": "0001-01-01T00:00:00Z",
        "fingerprint": "9a8b7c6d5e4f3a21",
        "values": {"B": 412.0, "C": 1},
    }
    return {"receiver": "mlfleet-autoscaler", "status": "firing", "orgId": 1, "alerts": [alert, second], "truncatedAlerts": 0, "version": "1"}


SAMPLE = _sample()
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


@contextlib.asynccontextmanager
async def running(scheme: str = "http", client_ssl: ssl.SSLContext | None = None, **args):
    """main() as a task on an ephemeral port, with a client session; cancelled (and checked to stop) on exit."""
    args = {"host": "127.0.0.1", "port": free_port(), **args}
    queue: asyncio.Queue = asyncio.Queue()
    task = asyncio.create_task(grafana_alerts.main(queue, args))
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


@run_async
async def test_other_methods_and_paths():
    async with running(**BOTH) as source:
        get = await source.post(b"", {}, method="GET")
        put = await source.post(SAMPLE_BODY, grafana_headers(SAMPLE_BODY), method="PUT")
        other_path = await source.post(SAMPLE_BODY, grafana_headers(SAMPLE_BODY), url=f"http://127.0.0.1:{source.port}/alerts/x")
        root = await source.post(SAMPLE_BODY, grafana_headers(SAMPLE_BODY), url=f"http://127.0.0.1:{source.port}/")
        async with source.session.get(source.url) as response:
            allow = response.headers.get("Allow")
        assert source.queue.empty()
    assert get == put == (405, {"reason": "method not allowed; use POST"})
    assert allow == "POST"
    assert other_path == root == (404, {"reason": "not found"})


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


@run_async
async def test_an_alert_is_forgotten_after_dedupe_ttl():
    async with running(**BOTH, dedupe_ttl=0.2) as source:
        first = await source.post(SAMPLE_BODY, grafana_headers(SAMPLE_BODY))
        repeat = await source.post(SAMPLE_BODY, grafana_headers(SAMPLE_BODY))
        await asyncio.sleep(0.25)
        later = await source.post(SAMPLE_BODY, grafana_headers(SAMPLE_BODY))
        events = source.drain()
    assert [first[1], repeat[1], later[1]] == [{"accepted": 2, "duplicates": 0}, {"accepted": 0, "duplicates": 2}, {"accepted": 2, "duplicates": 0}]
    assert len(events) == 4


def test_dedupe_memory_is_bounded_and_expires():
    recent = grafana_alerts.RecentKeys(ttl=10, max_keys=3)
    assert [recent.first_sighting((str(key),), now=100.0) for key in range(5)] == [True] * 5
    assert len(recent) == 3
    assert recent.first_sighting(("0",), now=100.0) is True  # the oldest were forgotten to keep 3
    assert recent.first_sighting(("4",), now=100.0) is False
    assert recent.first_sighting(("4",), now=110.0) is True  # expired after ttl
    assert len(recent) == 1
    off = grafana_alerts.RecentKeys(ttl=0, max_keys=3)
    assert [off.first_sighting(("a",), now=1.0) for _repeat in range(2)] == [True, True]


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
    async with running(scheme="https", client_ssl=client_ssl, certfile=str(certfile), keyfile=str(keyfile), **BOTH) as source:
        accepted = await source.post(SAMPLE_BODY, grafana_headers(SAMPLE_BODY))
        assert len(source.drain()) == 2
        with pytest.raises(aiohttp.ClientError):
            await source.post(SAMPLE_BODY, grafana_headers(SAMPLE_BODY), url=f"http://127.0.0.1:{source.port}/alerts")
        assert source.queue.empty()
    assert accepted == (202, {"accepted": 2, "duplicates": 0})


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
    "negative ttl": ({"port": 5001, "token": TOKEN, "dedupe_ttl": -1}, "argument 'dedupe_ttl' must be a number of seconds, 0 or more"),
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
        {"port": "5001", "token": TOKEN, "insecure_no_auth": "false", "max_clock_skew": "30", "dedupe_ttl": 0, "eda_feedback_queue": object()}
    )
    assert (settings.port, settings.host, settings.path, settings.max_clock_skew, settings.dedupe_ttl) == (5001, "127.0.0.1", "/alerts", 30.0, 0.0)
    assert (settings.hmac_header, settings.hmac_timestamp_header, settings.max_body_bytes) == (SIGNATURE_HEADER, TIMESTAMP_HEADER, 1048576)
    assert TOKEN not in repr(settings)


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
    log = tmp_path / "rulebook.log"
    env = {**os.environ, "ANSIBLE_COLLECTIONS_PATH": str(collections), "PYTHONUNBUFFERED": "1"}
    with log.open("wb") as output:
        process = subprocess.Popen(
            ["ansible-rulebook", "--rulebook", "r.yml", "-i", "inv.yml", "--print-events"],
            cwd=tmp_path,
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        _wait_for(lambda: _listening(port), process, log, f"listener on 127.0.0.1:{port}")
        response = requests.post(f"http://127.0.0.1:{port}/alerts", data=SAMPLE_BODY, headers=grafana_headers(SAMPLE_BODY), timeout=10)
        assert (response.status_code, response.json()) == (202, {"accepted": 2, "duplicates": 0})
        _wait_for(lambda: log.read_text(errors="replace").count("rule fired for ") >= 2, process, log, "the rule's debug output")
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
