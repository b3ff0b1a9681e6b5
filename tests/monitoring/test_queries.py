"""Every InfluxQL query of the rendered dashboards and alert rules runs on a real InfluxDB 1.x (Debian's influxd,
started by the influxdb1 fixture) loaded with line protocol shaped like Telegraf's documented output, and returns
rows; the alert rules carry exactly the labels the autoscaler routes on; a query on a field Telegraf does not
write returns nothing, so the check can fail.

The configuration is rendered by the monitoring role itself (tasks_from: render.yml, the lab's settings), which
also runs mlfleet.serving.monitoring_config_validate on it.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest
import requests
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
SERVICES = [{"service": "resnet18", "models": ["resnet18"], "cpus": 0.5}, {"service": "densenet161", "models": ["densenet161"], "cpus": 0.5}]
ROUTING_LABELS = {"action", "service", "cluster"}  # what extensions/eda's rulebook routes scaling alerts on
SCRAPE_SECONDS = 10
# Grafana's macros, as Grafana expands them for a dashboard over the last hour and for an alert's range.
TIME_FILTER = "time > now() - 1h"
INTERVAL = "1m"


def render(tmp_path: Path) -> Path:
    state = tmp_path / "monitoring"
    play = [
        {
            "name": "render the monitoring configuration",
            "hosts": "localhost",
            "connection": "local",
            "gather_facts": False,
            "vars": {
                "mlfleet_cluster": "lab",
                "mlfleet_serving": SERVICES,
                "monitoring_mode": "lab",
                "monitoring_influxdb_api_version": 1,
                "monitoring_state_dir": str(state),
                "monitoring_influxdb_url": "http://127.0.0.1:8086",
                "_monitoring_secrets": {
                    "influxdb_grafana_token": "grafana-password-for-the-test",
                    "influxdb_audit_token": "audit-password-for-the-test",
                    "webhook_token": "webhook-token-for-the-test",
                    "webhook_hmac_secret": "webhook-hmac-secret-for-the-test",
                },
            },
            "tasks": [
                {"ansible.builtin.file": {"path": f"{state}/rendered", "state": "directory", "mode": "0700"}},
                {"ansible.builtin.include_role": {"name": "mlfleet.serving.monitoring", "tasks_from": "render.yml"}},
            ],
        }
    ]
    playbook = tmp_path / "render.yml"
    playbook.write_text(yaml.safe_dump(play, sort_keys=False))
    env = {**os.environ, "ANSIBLE_PYTHON_INTERPRETER": os.environ.get("VIRTUAL_ENV", "/usr") + "/bin/python"}
    result = subprocess.run(
        ["ansible-playbook", "-i", "localhost,", str(playbook)], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    return state / "rendered"


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    return render(tmp_path_factory.mktemp("render"))


def telegraf_lines(now: int) -> list[str]:
    """Ten minutes of points in the shape of each Telegraf plugin's documented example output (README
    "Example Output" of inputs.cpu, mem, disk, system, docker; inputs.prometheus with metric_version = 2 and
    kubernetes_services, which adds the `address` tag, renamed by name_override), plus one audit event as
    mlfleet.serving.audit_event writes it."""
    lines = []
    for step in range(60):
        t = (now - 600 + step * SCRAPE_SECONDS) * 10**9
        for host in ("lab-manager-1", "lab-worker-1", "lab-worker-2"):
            lines += [
                f"cpu,cluster=lab,cpu=cpu-total,host={host} usage_guest=0,usage_guest_nice=0,usage_idle={60 + step % 7},usage_iowait=0.5,"
                f"usage_irq=0,usage_nice=0,usage_softirq=0.2,usage_steal=0,usage_system=6.1,usage_user={30 - step % 7} {t}",
                f"mem,cluster=lab,host={host} active=1115250688i,available=4135813120i,available_percent=67.3,buffered=0i,cached=2315993088i,"
                f"free=1819820032i,inactive=1812226048i,total=6144000000i,used=2008186880i,used_percent={32.7 + step % 3} {t}",
                f"disk,cluster=lab,device=overlay,fstype=overlay,host={host},mode=rw,path=/ free=18937257984i,inodes_free=1938215i,"
                f"inodes_total=2101248i,inodes_used=163033i,total=42140499968i,used=21036470272i,used_percent=52.6 {t}",
                f"system,cluster=lab,host={host} load1=0.63,load15=0.55,load5=0.6,n_cpus=2i,n_users=0i {t}",
            ]
        for service, tasks in (("resnet18", ("resnet18.1.k2j3h4", "resnet18.2.p9q8r7")), ("densenet161", ("densenet161.1.x1y2z3",))):
            for task in tasks:
                lines.append(
                    f"docker_container_cpu,cluster=lab,com.docker.swarm.node.id=n0d31d,com.docker.swarm.service.name={service},"
                    f"com.docker.swarm.task.name={task},container_image=192.168.213.1:5000/lab/torchserve,container_name={task},"
                    f"container_status=running,container_version=latest,cpu=cpu-total,engine_host=lab-worker-1,host=lab-worker-1,"
                    f'server_version=20.10.24 container_id="4c0ffee",throttling_periods=0i,throttling_throttled_periods=0i,'
                    f"throttling_throttled_time=0i,usage_in_kernelmode=1.2e9,usage_in_usermode=9.8e10,usage_percent={20 + step},"
                    f"usage_system=2.6e13,usage_total=9.9e10 {t}"
                )
            for replica, address in enumerate(("10.0.1.5", "10.0.1.6")):
                # Counters as TorchServe keeps them: 40 requests per step, each waiting 2 ms + 0.5 ms per step
                # in the queue and taking 160 ms in all.
                served = step * 40 + replica
                queued_us = sum(40 * (2000 + earlier * 500) for earlier in range(step + 1))
                lines.append(
                    f"torchserve,address={address},cluster=lab,host=lab-manager-1,hostname={service}-{replica},model_name={service},"
                    f"model_version=default,service={service},url=http://tasks.{service}:8082/metrics "
                    f"ts_inference_requests_total={served},ts_inference_latency_microseconds={served * 160000},"
                    f"ts_queue_latency_microseconds={queued_us} {t}"
                )
        for address in ("10.0.1.2",):
            for proxy in ("resnet18", "densenet161"):
                tags = f"address={address},cluster=lab,host=lab-manager-1,proxy={proxy},url=https://tasks.edge-proxy:8404/metrics"
                lines += [
                    f"edge_proxy,{tags},code=5xx haproxy_backend_http_responses_total={step // 6} {t}",
                    f"edge_proxy,{tags},code=2xx haproxy_backend_http_responses_total={step * 40} {t}",
                    f"edge_proxy,{tags} haproxy_backend_current_queue={step % 5} {t}",
                ]
    lines.append(
        "mlfleet_audit,action=scale_out,cluster=lab,decision=acted,kind=scale,service=resnet18,source=serving_pressure "
        f'event_id="3f0c",reason="edge proxy queue 12 for 6 s",values="{{}}",replicas_before=2,replicas_after=3 {(now - 120) * 10**9}'
    )
    return lines


@pytest.fixture(scope="module")
def loaded(influxdb1):
    influxdb1.create_database("mlfleet")
    with requests.Session() as session:
        session.trust_env = False  # 127.0.0.1 only, never through a proxy from the environment
        response = session.post(
            f"{influxdb1.url}/write",
            params={"db": "mlfleet"},
            data="\n".join(telegraf_lines(int(time.time()))),
            auth=(influxdb1.username, influxdb1.password),
            timeout=30,
        )
    assert response.status_code == 204, response.text
    return influxdb1


def expand(query: str) -> str:
    return query.replace("$timeFilter", TIME_FILTER).replace("$__interval", INTERVAL)


def rendered_queries(rendered: Path) -> dict[str, str]:
    queries = {}
    for path in sorted((rendered / "grafana" / "dashboards").glob("*.json")):
        dashboard = json.loads(path.read_text())
        for panel in dashboard["panels"]:
            for target in panel["targets"]:
                queries[f"{dashboard['uid']} / {panel['title']} / {target['refId']}"] = target["query"]
        for annotation in dashboard["annotations"]["list"]:
            if "query" in annotation:
                queries[f"{dashboard['uid']} / annotation {annotation['name']}"] = annotation["query"]
    rules = yaml.safe_load((rendered / "grafana" / "provisioning" / "alerting" / "rules.yaml").read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            for data in rule["data"]:
                if data["datasourceUid"] != "__expr__":
                    queries[f"rule {rule['uid']} / {data['refId']}"] = data["model"]["query"]
    return queries


def rows(influxdb, query: str) -> list:
    answer = influxdb.query(expand(query), db="mlfleet")
    result = answer["results"][0]
    assert "error" not in result, f"{query}\n-> {result['error']}"
    return [value for series in result.get("series", []) for value in series["values"]]


def test_every_dashboard_and_alert_query_returns_rows(rendered, loaded):
    queries = rendered_queries(rendered)
    # 3 dashboards with 16 panels (two of them one target per service), 1 annotation, 3 rules per service.
    assert len(queries) == 16 + 2 + 1 + 3 * len(SERVICES)
    empty = [name for name, query in queries.items() if not rows(loaded, query)]
    assert empty == []


def test_the_alert_queries_see_the_loaded_values(rendered, loaded):
    queries = rendered_queries(rendered)
    cpu = rows(loaded, queries["rule mlfleet-resnet18-out-cpu / A"])
    # usage_percent over the last hour averages 20..79 (mean 49.5) on a 0.5 CPU limit: 99% of the limit.
    assert cpu[0][1] == pytest.approx(99.0)
    queue = rows(loaded, queries["rule mlfleet-densenet161-out-queue / A"])
    # Each 10 s step adds 0.5 ms to the queue time per request: the p95 of 2.5 .. 31.5 ms over the last hour.
    assert queue[0][1] == pytest.approx(29.5, abs=1.0)


def test_a_query_on_a_field_telegraf_does_not_write_returns_nothing(loaded):
    assert rows(loaded, 'SELECT mean("usage_pct") FROM "docker_container_cpu" WHERE $timeFilter') == []


def test_rules_carry_the_labels_the_autoscaler_routes_on(rendered):
    rules = yaml.safe_load((rendered / "grafana" / "provisioning" / "alerting" / "rules.yaml").read_text())
    labelled = [rule for group in rules["groups"] for rule in group["rules"]]
    assert len(labelled) == 3 * len(SERVICES)
    for rule in labelled:
        assert set(rule["labels"]) == ROUTING_LABELS, rule["uid"]
        assert rule["labels"]["action"] in {"scale_out", "scale_in"}
        assert rule["labels"]["cluster"] == "lab"
    assert {(rule["labels"]["service"], rule["labels"]["action"]) for rule in labelled} == {
        (s["service"], action) for s in SERVICES for action in ("scale_out", "scale_in")
    }


def test_secrets_stay_in_the_files_that_become_docker_secrets(rendered):
    holders = {"grafana/provisioning/datasources/mlfleet.yaml", "grafana/provisioning/alerting/contact-points.yaml"}
    for path in rendered.rglob("*"):
        if path.is_file():
            text = path.read_text()
            relative = str(path.relative_to(rendered))
            assert oct(path.stat().st_mode & 0o777) == "0o600", relative
            for secret in ("grafana-password-for-the-test", "webhook-token-for-the-test", "webhook-hmac-secret-for-the-test"):
                assert secret not in text or relative in holders, f"{secret} in {relative}"
    contact = yaml.safe_load((rendered / "grafana/provisioning/alerting/contact-points.yaml").read_text())
    settings = contact["contactPoints"][0]["receivers"][0]["settings"]
    assert settings["hmacConfig"] == {
        "secret": "webhook-hmac-secret-for-the-test",
        "header": "X-Mlfleet-Signature",
        "timestampHeader": "X-Mlfleet-Timestamp",
    }
    assert settings["authorization_scheme"] == "Bearer"


def test_the_worst_case_alert_delay_is_written_beside_the_configuration(rendered):
    delays = yaml.safe_load((rendered / "alert-delays.yml").read_text())
    assert {name: delay["worst_seconds"] for name, delay in delays.items()} == {"scale_out_cpu": 190, "scale_out_queue": 190, "scale_in_cpu": 670}
    assert re.fullmatch(r"\d+", str(delays["scale_out_cpu"]["phases"][-1]["seconds"]))
