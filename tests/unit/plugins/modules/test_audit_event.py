"""audit_event's main() in-process, and the line protocol, log and spool of module_utils/_audit.py.

InfluxDB is a small HTTP stub on 127.0.0.1 that records every request and answers with the statuses a
test queues (204 when none is queued), the way InfluxDB 1.x (/write) and 2.x (/api/v2/write) answer.
The tests against a real InfluxDB 1.x are in tests/monitoring.
"""

from __future__ import annotations

import base64
import json
import multiprocessing
import os
import stat
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import pytest
from ansible.module_utils import _internal as module_utils_internal
from ansible.module_utils.common import warnings as module_warnings
from test_swarm_join import run_module

from ansible_collections.mlfleet.serving.plugins.module_utils import _audit
from ansible_collections.mlfleet.serving.plugins.module_utils._audit import AuditError, AuditLog, encode_line, escape_string, event_line
from ansible_collections.mlfleet.serving.plugins.modules import audit_event

TOKEN = "influx-token-5b7e0c"
PASSWORD = "influx-password-a91d"
ERRORS = {
    401: {"code": "unauthorized", "message": "unauthorized access"},
    404: {"code": "not found", "message": 'bucket "audit" not found'},
    503: {"error": "service unavailable"},
}


class InfluxStub:
    """Records requests as dicts (method, path, query, headers, body) and answers with queued statuses."""

    def __init__(self):
        self.requests = []
        self.statuses = []
        self.lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                parts = urlsplit(self.path)
                with stub.lock:
                    stub.requests.append(
                        {"method": "POST", "path": parts.path, "query": parse_qs(parts.query), "headers": dict(self.headers.items()), "body": body.decode()}
                    )
                    status = stub.statuses.pop(0) if stub.statuses else 204
                payload = json.dumps(ERRORS.get(status, {"error": "failed"})).encode() if status >= 300 else b""
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def bodies(self):
        return [request["body"] for request in self.requests]

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def influx():
    stub = InfluxStub()
    yield stub
    stub.close()


@pytest.fixture(autouse=True)
def no_proxies(monkeypatch):
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY", "INFLUX_TOKEN", "INFLUX_USERNAME", "INFLUX_PASSWORD"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(autouse=True)
def own_warnings(monkeypatch):
    # Module warnings are process-wide, and go to the display once controller code was imported by other tests.
    monkeypatch.setattr(module_utils_internal, "is_controller", False)
    monkeypatch.setattr(module_warnings, "_global_warnings", {})


@pytest.fixture
def log_path(tmp_path):
    return str(tmp_path / "state" / "audit" / "events.jsonl")


def v2(stub, **extra):
    return {"url": stub.url, "org": "mlfleet", "bucket": "audit", "token": TOKEN, **extra}


def v1(stub, **extra):
    return {"url": stub.url, "api_version": 1, "database": "mlfleet", "username": "audit", "password": PASSWORD, **extra}


def record(capsys, log_path, check_mode=False, **args):
    args = {"kind": "scale", "action": "scale_replicas", "decision": "acted", "log_path": log_path, **args}
    module_warnings._global_warnings.clear()
    return run_module(capsys, audit_event, check_mode=check_mode, **args)


def logged(path):
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


def warnings(result):
    """The warning texts of a result; ansible-core 2.19 returns each warning as a structured summary."""
    return [warning["event"]["msg"] if isinstance(warning, dict) else warning for warning in result.get("warnings", [])]


def spooled(path):
    return logged(path + ".pending") if os.path.exists(path + ".pending") else []


# The log


def test_event_is_appended_to_a_new_private_log(capsys, log_path):
    result = record(
        capsys,
        log_path,
        source="serving_pressure",
        service="resnet18",
        reason="p95 above 250 ms",
        values={"p95_latency_ms": 312.5, "queue": 41, "window": "5m"},
        fields={"replicas_before": 2, "replicas_after": "4"},
        event_id="run-7-scale",
        time="2024-05-01T14:00:00.25+02:00",
    )
    assert result["rc"] == 0, result.get("msg")
    assert result["changed"] and not result["influxdb_written"] and result["pending"] == 0 and result["flushed"] == 0
    event = result["event"]
    assert list(event) == ["time", "event_id", "kind", "action", "decision", "source", "service", "cluster", "reason", "values", "fields"]
    assert event == {
        "time": "2024-05-01T12:00:00.250000Z",
        "event_id": "run-7-scale",
        "kind": "scale",
        "action": "scale_replicas",
        "decision": "acted",
        "source": "serving_pressure",
        "service": "resnet18",
        "cluster": "mlfleet",
        "reason": "p95 above 250 ms",
        "values": {"p95_latency_ms": 312.5, "queue": 41, "window": "5m"},
        "fields": {"replicas_before": 2, "replicas_after": 4},
    }
    with open(log_path, encoding="utf-8") as handle:
        lines = handle.read().splitlines()
    assert [json.loads(line) for line in lines] == [event] and list(json.loads(lines[0])) == list(event)
    assert stat.S_IMODE(os.stat(log_path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.dirname(log_path)).st_mode) == 0o700
    assert not os.path.exists(log_path + ".pending")


def test_defaults_a_random_id_and_the_current_time(capsys, log_path):
    first = record(capsys, log_path)["event"]
    second = record(capsys, log_path)["event"]
    assert first["event_id"] != second["event_id"] and len(first["event_id"]) == 36
    assert first["time"].endswith("Z") and first["time"] <= second["time"]
    assert (first["source"], first["service"], first["cluster"], first["reason"], first["values"], first["fields"]) == ("playbook", "", "mlfleet", "", {}, {})
    assert len(logged(log_path)) == 2


def test_a_logged_event_id_is_not_written_again(capsys, log_path, influx):
    first = record(capsys, log_path, event_id="provision-1", reason="first", influxdb=v2(influx))
    again = record(capsys, log_path, event_id="provision-1", reason="second", influxdb=v2(influx))
    assert first["changed"] and first["influxdb_written"]
    assert not again["changed"] and not again["influxdb_written"] and again["event"] == first["event"]
    assert [event["reason"] for event in logged(log_path)] == ["first"]
    assert len(influx.requests) == 1


def test_a_line_cut_short_by_a_crash_does_not_swallow_the_next_event(capsys, log_path):
    os.makedirs(os.path.dirname(log_path))
    with open(log_path, "w", encoding="utf-8") as handle:
        handle.write('{"time": "2024-05-01T12:00:00.000000Z", "event_id": "cut')
    result = record(capsys, log_path, event_id="after-crash")
    assert result["rc"] == 0
    with open(log_path, encoding="utf-8") as handle:
        lines = handle.read().splitlines()
    assert len(lines) == 2 and json.loads(lines[1])["event_id"] == "after-crash"


def append_events(path, worker, count):
    log = AuditLog(path)
    for number in range(count):
        event = _audit.build_event("scale", "scale_out", "acted", reason="x" * 2000, event_id=f"{worker}-{number}")
        with log.locked() as handle:
            log.append(handle, event)


def test_concurrent_writers_do_not_interleave_lines(log_path):
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=append_events, args=(log_path, worker, 40)) for worker in range(4)]
    for process in workers:
        process.start()
    for process in workers:
        process.join(60)
        assert process.exitcode == 0
    events = logged(log_path)
    assert sorted(event["event_id"] for event in events) == sorted(f"{w}-{n}" for w in range(4) for n in range(40))


def test_check_mode_writes_nothing(capsys, log_path, influx):
    predicted = record(capsys, log_path, check_mode=True, event_id="e1", influxdb=v2(influx))
    assert predicted["rc"] == 0 and predicted["changed"] and predicted["event"]["event_id"] == "e1"
    assert not predicted["influxdb_written"] and predicted["pending"] == 0
    assert not os.path.exists(os.path.dirname(log_path)) and influx.requests == []

    record(capsys, log_path, event_id="e1")
    again = record(capsys, log_path, check_mode=True, event_id="e1", reason="other", influxdb=v2(influx))
    assert not again["changed"] and again["event"]["reason"] == ""
    other = record(capsys, log_path, check_mode=True, event_id="e2")
    assert other["changed"]
    assert [event["event_id"] for event in logged(log_path)] == ["e1"] and influx.requests == []


def test_check_mode_predicts_the_spool_being_sent(capsys, log_path, influx):
    influx.statuses = [503]
    record(capsys, log_path, event_id="e1", influxdb=v2(influx))
    predicted = record(capsys, log_path, check_mode=True, event_id="e1", influxdb=v2(influx))
    assert predicted["changed"] and predicted["pending"] == 1 and len(influx.requests) == 1
    assert not record(capsys, log_path, check_mode=True, event_id="e1")["changed"]


@pytest.mark.parametrize(
    "args, message",
    [
        ({"fields": {"replicas_after": "many"}}, "fields['replicas_after'] must be a number, not 'many'"),
        ({"fields": {"replicas_after": True}}, "must be a number"),
        ({"fields": {"replicas_after": "nan"}}, "must be a finite number"),
        ({"fields": {"reason": 1}}, "fields key 'reason' is not allowed"),
        ({"fields": {"value_p95": 1}}, "fields key 'value_p95' is not allowed"),
        ({"service": "resnet\n18"}, "service 'resnet\\n18' contains a line break"),
        ({"cluster": "lab\\"}, "cluster 'lab\\\\' has a backslash at its end"),
        ({"values": {"p95\\ ms": 1}}, "values key"),
        ({"time": "2024-05-01 12:00:00"}, "is not an RFC 3339 timestamp with an offset"),
        ({"time": "2024-02-30T12:00:00Z"}, "is not a valid date and time"),
        ({"event_id": " "}, "event_id must not be empty"),
        ({"kind": ""}, "kind must not be empty"),
    ],
)
def test_invalid_events_are_refused_before_anything_is_written(capsys, log_path, args, message):
    result = record(capsys, log_path, **args)
    assert result["rc"] == 1 and message in result["msg"]
    assert not os.path.exists(os.path.dirname(log_path))


def test_an_unwritable_log_fails_with_the_path(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = record(capsys, str(blocker / "audit.jsonl"))
    assert result["rc"] == 1 and str(blocker / "audit.jsonl") in result["msg"] and "log_path" in result["msg"]


# Line protocol


@pytest.mark.parametrize(
    "tags, fields, expected",
    [
        ({"host": "a"}, {"value": 1.5}, "m,host=a value=1.5"),
        ({"service": "res net,v=1"}, {"f": 2.0}, r"m,service=res\ net\,v\=1 f=2"),
        ({"b": "2", "a": "1", "empty": ""}, {"z": 1.0, "y": 2.5}, "m,a=1,b=2 y=2.5,z=1"),
        ({"quote": 'say "hi"'}, {"s": 'say "hi"'}, r'm,quote=say\ "hi" s="say \"hi\""'),
        ({"path": r"C:\models"}, {"s": "back\\slash"}, r'm,path=C:\models s="back\\slash"'),
        ({}, {"reason": "line one\nline two"}, 'm reason="line one\nline two"'),
        ({}, {"field key,=x": 1.0}, r"m field\ key\,\=x=1"),
        ({}, {"i": 3, "b": True, "big": 1e20, "small": 1e-05, "nan": float("nan"), "none": None}, "m b=true,big=1e+20,i=3i,small=1e-05"),
    ],
)
def test_line_protocol_escaping(tags, fields, expected):
    assert encode_line("m", tags, fields) == expected


def test_line_protocol_measurement_and_timestamp():
    assert encode_line("audit trail,x", {}, {"f": 1.0}, 1714564800250000000) == r"audit\ trail\,x f=1 1714564800250000000"
    assert encode_line("eq=ok", {}, {"f": 1.0}) == "eq=ok f=1"


@pytest.mark.parametrize("name", ["a\nb", "a\rb", "trailing\\", "before\\,comma", "before\\=equals", "before\\ space"])
def test_line_protocol_refuses_names_influxdb_cannot_store(name):
    with pytest.raises(AuditError):
        encode_line("m", {"t": name}, {"f": 1.0})
    with pytest.raises(AuditError):
        encode_line("m", {}, {name: 1.0})


def test_line_protocol_needs_a_field():
    with pytest.raises(AuditError, match="needs at least one field"):
        encode_line("m", {"t": "x"}, {"nan": float("inf")})


def test_string_fields_escape_backslashes_before_quotes():
    assert escape_string('a\\"b\n') == '"a\\\\\\"b\n"'


def test_point_of_an_event():
    event = _audit.build_event(
        "scale",
        "scale_out",
        "not_acted",
        source="grafana_alerts",
        reason='cool-down "active"',
        values={"cpu": 0.91, "nodes": 3, "ok": True, "why": "cooldown", "inf": float("inf")},
        fields={"nodes_before": 3, "nodes_after": 3},
        event_id="e-1",
        when="2024-05-01T12:00:00Z",
    )
    tags, fields, nanoseconds = _audit.point_parts(event)
    assert tags == {"kind": "scale", "action": "scale_out", "decision": "not_acted", "source": "grafana_alerts", "service": "", "cluster": "mlfleet"}
    assert fields == {
        "event_id": "e-1",
        "reason": 'cool-down "active"',
        "values": '{"cpu":0.91,"inf":Infinity,"nodes":3,"ok":true,"why":"cooldown"}',
        "nodes_before": 3.0,
        "nodes_after": 3.0,
        "value_cpu": 0.91,
        "value_nodes": 3.0,
    }
    assert nanoseconds == 1714564800 * 10**9
    assert event_line(event) == (
        "mlfleet_audit,action=scale_out,cluster=mlfleet,decision=not_acted,kind=scale,source=grafana_alerts "
        'event_id="e-1",nodes_after=3,nodes_before=3,reason="cool-down \\"active\\"",value_cpu=0.91,value_nodes=3,'
        'values="{\\"cpu\\":0.91,\\"inf\\":Infinity,\\"nodes\\":3,\\"ok\\":true,\\"why\\":\\"cooldown\\"}" 1714564800000000000'
    )


@pytest.mark.parametrize(
    "text, nanoseconds, normalized",
    [
        ("2024-05-01T12:00:00Z", 1714564800000000000, "2024-05-01T12:00:00.000000Z"),
        ("2024-05-01T12:00:00.123456789Z", 1714564800123456789, "2024-05-01T12:00:00.123456789Z"),
        ("2024-05-01t13:30:00.5+01:30", 1714564800500000000, "2024-05-01T12:00:00.500000Z"),
        ("1969-12-31T23:59:59.999Z", -1000000, "1969-12-31T23:59:59.999000Z"),
    ],
)
def test_times(text, nanoseconds, normalized):
    assert _audit.parse_time(text) == nanoseconds
    assert _audit.format_time(nanoseconds) == normalized


# InfluxDB 2.x and 1.x over HTTP


def test_v2_write_through_influxdb_client(capsys, log_path, influx):
    result = record(
        capsys,
        log_path,
        service="resnet 18",
        values={"p95": 312.5},
        fields={"replicas_after": 4},
        event_id="v2-1",
        time="2024-05-01T12:00:00Z",
        influxdb=v2(influx),
    )
    assert result["rc"] == 0, result.get("msg")
    assert result["changed"] and result["influxdb_written"] and result["pending"] == 0
    (request,) = influx.requests
    assert request["path"] == "/api/v2/write"
    assert request["query"] == {"org": ["mlfleet"], "bucket": ["audit"], "precision": ["ns"]}
    assert request["headers"]["Authorization"] == f"Token {TOKEN}"
    assert request["body"] == (
        r"mlfleet_audit,action=scale_replicas,cluster=mlfleet,decision=acted,kind=scale,service=resnet\ 18,source=playbook "
        r'event_id="v2-1",reason="",replicas_after=4,value_p95=312.5,values="{\"p95\":312.5}" 1714564800000000000'
    )
    assert request["body"] == event_line(result["event"])


def test_v1_write_with_basic_auth(capsys, log_path, influx):
    result = record(capsys, log_path, event_id="v1-1", time="2024-05-01T12:00:00Z", influxdb=v1(influx, retention_policy="audit_90d"))
    assert result["rc"] == 0 and result["influxdb_written"]
    (request,) = influx.requests
    assert request["path"] == "/write"
    assert request["query"] == {"db": ["mlfleet"], "rp": ["audit_90d"], "precision": ["ns"]}
    assert request["headers"]["Authorization"] == "Basic " + base64.b64encode(f"audit:{PASSWORD}".encode()).decode()
    assert request["body"] == event_line(result["event"])
    assert "rp=" not in urlsplit(influx.url).query


def test_failures_are_spooled_and_the_spool_goes_first_oldest_first(capsys, log_path, influx):
    influx.statuses = [503]
    first = record(capsys, log_path, event_id="a", influxdb=v2(influx))
    assert first["rc"] == 0 and first["changed"] and not first["influxdb_written"] and first["pending"] == 1
    (warning,) = warnings(first)
    assert f"InfluxDB at {influx.url}" in warning and "HTTP 503" in warning and "service unavailable" in warning and ".pending" in warning
    assert [event["event_id"] for event in spooled(log_path)] == ["a"]
    assert stat.S_IMODE(os.stat(log_path + ".pending").st_mode) == 0o600

    influx.statuses = [401]
    second = record(capsys, log_path, event_id="b", influxdb=v2(influx))
    assert not second["influxdb_written"] and second["pending"] == 2 and "HTTP 401" in warnings(second)[0]
    assert "unauthorized access" in warnings(second)[0] and "token" in warnings(second)[0]

    without_influxdb = record(capsys, log_path, event_id="c")
    assert without_influxdb["pending"] == 2 and len(influx.requests) == 2

    third = record(capsys, log_path, event_id="d", influxdb=v2(influx))
    assert third["changed"] and third["influxdb_written"] and third["pending"] == 0 and third["flushed"] == 2
    assert warnings(third) == []
    sent = influx.requests[-1]["body"].split("\n")
    assert [json.loads(line.split('event_id="')[1].split('"')[0].join('""')) for line in sent] == ["a", "b", "d"]
    assert not os.path.exists(log_path + ".pending")
    assert [event["event_id"] for event in logged(log_path)] == ["a", "b", "c", "d"]


def test_a_rerun_with_the_same_id_sends_the_spooled_event(capsys, log_path, influx):
    influx.statuses = [503]
    record(capsys, log_path, event_id="a", influxdb=v2(influx))
    rerun = record(capsys, log_path, event_id="a", influxdb=v2(influx))
    assert rerun["changed"] and rerun["influxdb_written"] and rerun["flushed"] == 1 and rerun["pending"] == 0
    assert len(logged(log_path)) == 1
    assert not record(capsys, log_path, event_id="a", influxdb=v2(influx))["changed"] and len(influx.requests) == 2


def test_an_unreachable_influxdb_is_spooled(capsys, log_path, influx):
    url = influx.url
    influx.close()
    for options in (v2(influx, url=url), v1(influx, url=url)):
        result = record(capsys, log_path, influxdb=options)
        assert result["rc"] == 0 and not result["influxdb_written"]
        assert f"InfluxDB at {url} is unreachable" in warnings(result)[0] and "0x" not in warnings(result)[0]
    assert len(spooled(log_path)) == 2


def test_unreadable_spool_lines_are_dropped_with_a_warning(capsys, log_path, influx):
    influx.statuses = [503]
    record(capsys, log_path, event_id="a", influxdb=v2(influx))
    with open(log_path + ".pending", "a", encoding="utf-8") as handle:
        handle.write('{"event_id": "cut\n')
    result = record(capsys, log_path, event_id="b", influxdb=v2(influx))
    assert result["pending"] == 0 and result["flushed"] == 1
    assert "dropped 1 unreadable lines" in warnings(result)[0]


@pytest.mark.parametrize("options", [v2, v1])
def test_influxdb_required_fails_without_secrets(capsys, log_path, influx, options):
    influx.statuses = [401]
    capsys.readouterr()
    result = record(capsys, log_path, event_id="r1", influxdb=options(influx), influxdb_required=True)
    assert result["rc"] == 1 and not result["influxdb_written"] and result["pending"] == 1
    assert f"InfluxDB at {influx.url}" in result["msg"] and "HTTP 401" in result["msg"] and log_path in result["msg"]
    output = json.dumps(result)
    assert TOKEN not in output and PASSWORD not in output
    assert logged(log_path)[0]["event_id"] == "r1" and spooled(log_path)[0]["event_id"] == "r1"


def test_url_credentials_stay_out_of_messages(capsys, log_path, influx):
    influx.statuses = [404]
    url = influx.url.replace("http://", f"http://audit:{PASSWORD}@")
    result = record(capsys, log_path, influxdb=v1(influx, url=url))
    assert PASSWORD not in warnings(result)[0] and f"InfluxDB at {influx.url}" in warnings(result)[0]
    assert "database" in warnings(result)[0]


def test_secrets_never_appear_in_the_result(capsys, log_path, influx):
    for options in (v2(influx), v1(influx)):
        capsys.readouterr()
        result = record(capsys, log_path, influxdb=options)
        assert result["rc"] == 0 and result["influxdb_written"]
        output = json.dumps(result)
        assert TOKEN not in output and PASSWORD not in output


def test_the_token_can_come_from_the_environment(capsys, log_path, influx, monkeypatch):
    monkeypatch.setenv("INFLUX_TOKEN", TOKEN)
    options = v2(influx)
    del options["token"]
    result = record(capsys, log_path, influxdb=options)
    assert result["rc"] == 0 and influx.requests[0]["headers"]["Authorization"] == f"Token {TOKEN}"


@pytest.mark.parametrize(
    "options, message",
    [
        ({"url": "http://127.0.0.1:8086", "org": "o", "bucket": "b"}, "influxdb.token required with api_version 2"),
        ({"url": "http://127.0.0.1:8086", "api_version": 1}, "influxdb.database is required with api_version 1"),
        ({"url": "http://127.0.0.1:8086", "api_version": 1, "database": "d", "password": PASSWORD}, "influxdb.password needs influxdb.username"),
        ({"url": "127.0.0.1:8086", "api_version": 1, "database": "d"}, "is not an http:// or https:// URL"),
    ],
)
def test_influxdb_options_that_do_not_fit_together(capsys, log_path, options, message):
    result = record(capsys, log_path, influxdb=options)
    assert result["rc"] == 1 and message in result["msg"] and PASSWORD not in json.dumps(result)
    assert not os.path.exists(os.path.dirname(log_path))
