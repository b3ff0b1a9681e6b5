"""audit_event's main() in-process against a real InfluxDB 1.x (the influxdb1 fixture) with api_version 1."""

from __future__ import annotations

import json
import time
import uuid

import pytest
from ansible.module_utils import _internal as module_utils_internal
from ansible.module_utils.common import warnings as module_warnings
from ansible.module_utils.testing import patch_module_args
from influxdb1 import quote_string


# The collection is imported when a test runs, not when pytest collects this file: `pytest tests` collects
# tests/monitoring before tests/unit, and importing the collection before test_proxmox_inventory installs
# Ansible's collection loader breaks that loader for every later test file.
def collection_module(name):
    from importlib import import_module

    return import_module(f"ansible_collections.mlfleet.serving.plugins.{name}")


def format_time(value):
    return collection_module("module_utils._audit").format_time(value)


def parse_time(value):
    return collection_module("module_utils._audit").parse_time(value)


@pytest.fixture(autouse=True)
def isolated_module(monkeypatch):
    # Module warnings are process-wide, and go to the display once controller code was imported.
    monkeypatch.setattr(module_utils_internal, "is_controller", False)
    monkeypatch.setattr(module_warnings, "_global_warnings", {})
    # The module's requests must reach 127.0.0.1 directly.
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY", "INFLUX_USERNAME", "INFLUX_PASSWORD"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def database(influxdb1):
    return influxdb1.create_database(f"audit_{uuid.uuid4().hex[:12]}")


@pytest.fixture
def run(capsys, influxdb1, database, tmp_path):
    """Run the module with api_version 1 against the database; ``influxdb`` entries override the connection."""
    log_path = str(tmp_path / "audit.jsonl")

    def invoke(influxdb=None, **args):
        connection = {"url": influxdb1.url, "api_version": 1, "database": database, "username": influxdb1.username, "password": influxdb1.password}
        args = {"kind": "scale", "action": "scale_replicas", "decision": "acted", "log_path": log_path, "influxdb": {**connection, **(influxdb or {})}, **args}
        module_warnings._global_warnings.clear()
        capsys.readouterr()
        with patch_module_args(args):
            with pytest.raises(SystemExit) as exited:
                collection_module("modules.audit_event").main()
        output = capsys.readouterr().out
        result = json.loads(output)
        result["rc"] = exited.value.code
        result["output"] = output
        result["warnings"] = [w["event"]["msg"] if isinstance(w, dict) else w for w in result.get("warnings", [])]
        return result

    invoke.log_path = log_path
    return invoke


def points(influxdb1, database, event_id, measurement='"mlfleet_audit"'):
    """The points of one event, as dicts, with times in nanoseconds."""
    answer = influxdb1.query(f'SELECT * FROM {measurement} WHERE "event_id" = {quote_string(event_id)}', db=database, epoch="ns")
    series = answer["results"][0].get("series", [])
    return [dict(zip(s["columns"], row, strict=True)) for s in series for row in s["values"]]


def test_event_is_stored_with_its_tags_and_fields(run, influxdb1, database):
    reason = 'p95 "312 ms" > 250 ms, queue=41\nsecond line with a \\ backslash'
    result = run(
        source="serving_pressure",
        service='resnet 18,v=2 "blue" C:\\models',
        reason=reason,
        values={"p95_latency_ms": 312.5, "queue": 41, "window": "5m", "burst": True},
        fields={"replicas_before": 2, "replicas_after": 4},
        event_id="run-1 scale, resnet=18",
    )
    assert result["rc"] == 0, result.get("msg")
    assert result["changed"] and result["influxdb_written"] and result["pending"] == 0 and result["warnings"] == []
    (point,) = points(influxdb1, database, "run-1 scale, resnet=18")
    assert point == {
        "time": parse_time(result["event"]["time"]),
        "kind": "scale",
        "action": "scale_replicas",
        "decision": "acted",
        "source": "serving_pressure",
        "service": 'resnet 18,v=2 "blue" C:\\models',
        "cluster": "mlfleet",
        "event_id": "run-1 scale, resnet=18",
        "reason": reason,
        "values": '{"burst":true,"p95_latency_ms":312.5,"queue":41,"window":"5m"}',
        "replicas_before": 2,
        "replicas_after": 4,
        "value_p95_latency_ms": 312.5,
        "value_queue": 41,
    }
    keys = influxdb1.query('SHOW FIELD KEYS FROM "mlfleet_audit"', db=database)["results"][0]["series"][0]["values"]
    assert dict(keys) == {
        "event_id": "string",
        "reason": "string",
        "values": "string",
        "replicas_before": "float",
        "replicas_after": "float",
        "value_p95_latency_ms": "float",
        "value_queue": "float",
    }
    tags = influxdb1.query('SHOW TAG KEYS FROM "mlfleet_audit"', db=database)["results"][0]["series"][0]["values"]
    assert sorted(key for (key,) in tags) == ["action", "cluster", "decision", "kind", "service", "source"]


def test_an_empty_tag_is_left_out_and_a_retention_policy_is_used(run, influxdb1, database):
    influxdb1.execute(f'CREATE RETENTION POLICY "audit_1d" ON "{database}" DURATION 1d REPLICATION 1')
    # Within the policy's day: InfluxDB drops older points (HTTP 400, "points beyond retention policy").
    nanoseconds = time.time_ns() // 10**9 * 10**9 - 10**9 + 123456789
    result = run(event_id="rp-1", time=format_time(nanoseconds), influxdb={"retention_policy": "audit_1d"})
    assert result["rc"] == 0 and result["influxdb_written"], result["warnings"]
    assert points(influxdb1, database, "rp-1") == []
    (point,) = points(influxdb1, database, "rp-1", measurement=f'"{database}"."audit_1d"."mlfleet_audit"')
    assert point["time"] == nanoseconds and "service" not in point and point["values"] == "{}"


def test_a_point_older_than_the_retention_policy_is_refused_and_spooled(run, influxdb1, database):
    influxdb1.execute(f'CREATE RETENTION POLICY "audit_1d" ON "{database}" DURATION 1d REPLICATION 1')
    result = run(event_id="old-1", time="2024-05-01T12:00:00Z", influxdb={"retention_policy": "audit_1d"})
    assert not result["influxdb_written"] and result["pending"] == 1
    assert "HTTP 400" in result["warnings"][0] and "points beyond retention policy" in result["warnings"][0]


def test_a_wrong_password_spools_until_it_is_fixed(run, influxdb1, database):
    refused = run(event_id="spooled-1", influxdb={"password": "not-the-password"})
    assert refused["rc"] == 0 and refused["changed"] and not refused["influxdb_written"] and refused["pending"] == 1
    (warning,) = refused["warnings"]
    assert f"InfluxDB at {influxdb1.url}" in warning and "HTTP 401" in warning and "authorization failed" in warning
    assert "not-the-password" not in refused["output"] and influxdb1.password not in refused["output"]
    assert points(influxdb1, database, "spooled-1") == []

    fixed = run(event_id="direct-2")
    assert fixed["rc"] == 0 and fixed["influxdb_written"] and fixed["flushed"] == 1 and fixed["pending"] == 0
    assert fixed["warnings"] == [] and influxdb1.password not in fixed["output"]
    assert len(points(influxdb1, database, "spooled-1")) == 1 and len(points(influxdb1, database, "direct-2")) == 1


def test_influxdb_required_names_the_url_and_status_but_no_secret(run, influxdb1):
    result = run(event_id="required-1", influxdb={"password": "not-the-password"}, influxdb_required=True)
    assert result["rc"] == 1 and f"InfluxDB at {influxdb1.url}" in result["msg"] and "HTTP 401" in result["msg"]
    assert "not-the-password" not in result["output"] and influxdb1.password not in result["output"]


def test_a_missing_database_is_spooled(run, influxdb1):
    result = run(event_id="nodb-1", influxdb={"database": "no_such_database"})
    assert not result["influxdb_written"] and result["pending"] == 1
    assert "HTTP 404" in result["warnings"][0] and "database not found" in result["warnings"][0]


def test_the_same_event_id_twice_is_one_point(run, influxdb1, database):
    first = run(event_id="twice-1", reason="first")
    second = run(event_id="twice-1", reason="second")
    assert first["changed"] and not second["changed"] and second["event"]["reason"] == "first"
    (point,) = points(influxdb1, database, "twice-1")
    assert point["reason"] == "first"
    with open(run.log_path, encoding="utf-8") as handle:
        assert [json.loads(line)["event_id"] for line in handle] == ["twice-1"]
