"""The monitoring configuration validators against the upstream documentation's own examples.

Every example under fixtures/monitoring/upstream/ (copied verbatim, see SOURCES.md there) must pass, except the two
whose upstream text contradicts Grafana's own code, which must fail with exactly that one error. Each named mutation
of an example must then fail, with an error at the path the mutation broke.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import yaml
from ansible.module_utils.testing import patch_module_args

from ansible_collections.mlfleet.serving.plugins.module_utils import _monitoring_validate as validate
from ansible_collections.mlfleet.serving.plugins.modules import monitoring_config_validate

UPSTREAM = Path(__file__).parent / "fixtures" / "monitoring" / "upstream"


def text(name):
    return (UPSTREAM / name).read_text(encoding="utf-8")


def load(name):
    if name.endswith(".json"):
        return json.loads(text(name))
    return yaml.safe_load(text(name))


def upstream_dashboard():
    """The JSON model page's new-dashboard example, with its panels and templating examples filled in."""
    dashboard = load("grafana-dashboard-json-model.json")
    # The page shows these two as bare members of the dashboard object; the panels one lacks its closing bracket.
    dashboard["panels"] = json.loads("{" + text("grafana-dashboard-json-model-panels.fragment") + "]}")["panels"]
    dashboard["templating"] = json.loads("{" + text("grafana-dashboard-json-model-templating.fragment") + "}")["templating"]
    return dashboard


def contact_point_with(fragment):
    """A settings example (type + settings) as the only receiver of a contact point file."""
    return {"apiVersion": 1, "contactPoints": [{"orgId": 1, "name": "cp_1", "receivers": [dict(load(fragment), uid="fragment_uid")]}]}


def check_alerting(doc, **kwargs):
    return (
        validate.validate_alert_rules(doc, kwargs.get("datasource_uids"), kwargs.get("required_labels"))
        + validate.validate_contact_points(doc)
        + validate.validate_policies(doc, kwargs.get("receiver_names"), kwargs.get("mute_time_names"))
        + validate.validate_alerting_extras(doc)
    )


UPSTREAM_CHECKS = {
    "grafana-datasources-example.yaml": lambda: validate.validate_datasources(load("grafana-datasources-example.yaml")),
    "grafana-influxdb-v1.yaml": lambda: validate.validate_datasources(load("grafana-influxdb-v1.yaml")),
    "grafana-influxdb-v2-flux.yaml": lambda: validate.validate_datasources(load("grafana-influxdb-v2-flux.yaml")),
    "grafana-influxdb-v2-influxql.yaml": lambda: validate.validate_datasources(load("grafana-influxdb-v2-influxql.yaml")),
    "grafana-influxdb-v3-sql.yaml": lambda: validate.validate_datasources(load("grafana-influxdb-v3-sql.yaml")),
    "grafana-dashboard-providers-example.yaml": lambda: validate.validate_dashboard_providers(load("grafana-dashboard-providers-example.yaml")),
    "grafana-dashboard-providers-folders-from-files.yaml": lambda: validate.validate_dashboard_providers(
        load("grafana-dashboard-providers-folders-from-files.yaml")
    ),
    "grafana-dashboard-json-model.json": lambda: validate.validate_dashboard(load("grafana-dashboard-json-model.json")),
    "grafana-dashboard-json-model-panels.fragment": lambda: validate.validate_dashboard(upstream_dashboard()),
    "grafana-dashboard-json-model-templating.fragment": lambda: validate.validate_dashboard(upstream_dashboard(), set()),
    "grafana-alerting-rules.yaml": lambda: check_alerting(load("grafana-alerting-rules.yaml")),
    "grafana-alerting-delete-rules.yaml": lambda: check_alerting(load("grafana-alerting-delete-rules.yaml")),
    "grafana-alerting-contact-points.yaml": lambda: check_alerting(load("grafana-alerting-contact-points.yaml")),
    "grafana-alerting-delete-contact-points.yaml": lambda: check_alerting(load("grafana-alerting-delete-contact-points.yaml")),
    "grafana-alerting-settings-email.fragment.yaml": lambda: validate.validate_contact_points(
        contact_point_with("grafana-alerting-settings-email.fragment.yaml")
    ),
    "grafana-alerting-settings-webhook.fragment.yaml": lambda: validate.validate_contact_points(
        contact_point_with("grafana-alerting-settings-webhook.fragment.yaml")
    ),
    "grafana-alerting-policies.yaml": lambda: check_alerting(load("grafana-alerting-policies.yaml")),
    "grafana-alerting-reset-policies.yaml": lambda: check_alerting(load("grafana-alerting-reset-policies.yaml")),
    "grafana-alerting-templates.yaml": lambda: check_alerting(load("grafana-alerting-templates.yaml")),
    "grafana-alerting-mute-timings.yaml": lambda: check_alerting(load("grafana-alerting-mute-timings.yaml")),
    "telegraf-environment-variables.conf": lambda: validate.validate_telegraf(text("telegraf-environment-variables.conf")),
    "telegraf-secret-stores.conf": lambda: validate.validate_telegraf(text("telegraf-secret-stores.conf")),
    "telegraf-aggregator-minmax.conf": lambda: validate.validate_telegraf(text("telegraf-aggregator-minmax.conf")),
    "telegraf-routing-by-input.conf": lambda: validate.validate_telegraf(text("telegraf-routing-by-input.conf")),
}
# Upstream examples that contradict Grafana's own code; SOURCES.md explains each. The validator sides with the code.
UPSTREAM_CONTRADICTIONS = {
    # pkg/services/ngalert/api/tooling/definitions: Route.Validate() "root route must not have any mute time intervals"
    "grafana-alerting-policies.yaml": "policies[0].mute_time_intervals: is not allowed on the root policy",
    # grafana/alerting receivers/webhook/v1/config.go: "both HTTP Basic Authentication and Authorization Header are set"
    "grafana-alerting-settings-webhook.fragment.yaml": "contactPoints[0].receivers[0].settings: sets both HTTP basic auth",
}


def test_every_fixture_is_checked_and_listed_in_sources():
    fixtures = {path.name for path in UPSTREAM.iterdir() if path.name != "SOURCES.md"}
    assert fixtures == set(UPSTREAM_CHECKS)
    sources = text("SOURCES.md")
    assert [name for name in sorted(fixtures) if f"`{name}`" not in sources] == []


@pytest.mark.parametrize("name", sorted(set(UPSTREAM_CHECKS) - set(UPSTREAM_CONTRADICTIONS)))
def test_upstream_example_is_accepted(name):
    assert UPSTREAM_CHECKS[name]() == []


@pytest.mark.parametrize("name", sorted(UPSTREAM_CONTRADICTIONS))
def test_upstream_example_that_grafana_rejects_fails_only_there(name):
    errors = UPSTREAM_CHECKS[name]()
    assert len(errors) == 1 and errors[0].startswith(UPSTREAM_CONTRADICTIONS[name]), errors


# Named mutations: (base, how to mutate a deep copy, how to validate, the path the error must name, words it must say)


def rules():
    return load("grafana-alerting-rules.yaml")


def with_query_on(uid):
    def mutate(doc):
        doc["groups"][0]["rules"][0]["data"].append({"refId": "B", "datasourceUid": uid, "relativeTimeRange": {"from": 600, "to": 0}, "model": {}})

    return mutate


def first_rule(**changes):
    def mutate(doc):
        doc["groups"][0]["rules"][0].update(changes)

    return mutate


def first_receiver(receiver_type, settings):
    def mutate(doc):
        doc["contactPoints"][0]["receivers"][0].update(type=receiver_type, settings=settings)

    return mutate


def root_policy(**changes):
    def mutate(doc):
        doc["policies"][0].update(changes)

    return mutate


def delete(*keys):
    def mutate(doc):
        target = doc
        for key in keys[:-1]:
            target = target[key]
        del target[keys[-1]]

    return mutate


def first_panel(**changes):
    def mutate(doc):
        doc["panels"][0].update(changes)

    return mutate


def two_defaults(doc):
    doc["datasources"][0]["isDefault"] = True
    doc["datasources"].append(dict(copy.deepcopy(doc["datasources"][0]), name="Graphite 2", uid="second_uid"))


def duplicate_panel(doc):
    doc["panels"].append(dict(copy.deepcopy(doc["panels"][0]), gridPos={"x": 12, "y": 0, "w": 12, "h": 9}))


def webhook(**settings):
    return first_receiver("webhook", settings)


HOOK = "https://hooks.example.org/alerts"
KNOWN_UIDS = {"my_unique_uid"}

MUTATIONS = [
    ("a rule without a condition", rules, delete("groups", 0, "rules", 0, "condition"), check_alerting, "groups[0].rules[0].condition", "is required"),
    ("a condition naming a missing refId", rules, first_rule(condition="C"), check_alerting, "groups[0].rules[0].condition", "'C' is not the refId"),
    (
        "a rule query on an unknown datasource uid",
        rules,
        with_query_on("no_such_datasource"),
        lambda doc: check_alerting(doc, datasource_uids=KNOWN_UIDS),
        "groups[0].rules[0].data[1].datasourceUid",
        "'no_such_datasource' is not provisioned",
    ),
    (
        "an expression referencing a missing refId",
        rules,
        lambda doc: doc["groups"][0]["rules"][0]["data"][0]["model"].update(expression="$B > 3"),
        check_alerting,
        "groups[0].rules[0].data[0].model.expression",
        "refers to 'B'",
    ),
    ("a bad noDataState", rules, first_rule(noDataState="Nodata"), check_alerting, "groups[0].rules[0].noDataState", "use one of NoData"),
    ("a bad execErrState", rules, first_rule(execErrState="Failing"), check_alerting, "groups[0].rules[0].execErrState", "use one of Error"),
    (
        "a rule missing a required label",
        rules,
        delete("groups", 0, "rules", 0, "labels", "team"),
        lambda doc: check_alerting(doc, required_labels=["team"]),
        "groups[0].rules[0].labels",
        "'team'",
    ),
    (
        "a group interval that is not a duration",
        rules,
        lambda doc: doc["groups"][0].update(interval="1 minute"),
        check_alerting,
        "groups[0].interval",
        "not a duration",
    ),
    ("a rule for that is not a duration", rules, first_rule(**{"for": "5 min"}), check_alerting, "groups[0].rules[0].for", "not a duration"),
    ("a rule uid longer than 40 characters", rules, first_rule(uid="u" * 41), check_alerting, "groups[0].rules[0].uid", "at most 40"),
    (
        "a query whose time range ends before it starts",
        rules,
        lambda doc: (with_query_on("my_unique_uid")(doc), doc["groups"][0]["rules"][0]["data"][1].update(relativeTimeRange={"from": 0, "to": 600})),
        lambda doc: check_alerting(doc, datasource_uids=KNOWN_UIDS),
        "groups[0].rules[0].data[1].relativeTimeRange",
        "must be greater than to",
    ),
    (
        "a contact point with an unknown type",
        lambda: load("grafana-alerting-contact-points.yaml"),
        first_receiver("carrier-pigeon", {"url": HOOK}),
        check_alerting,
        "contactPoints[0].receivers[0].type",
        "not a Grafana contact point type",
    ),
    (
        "a contact point typed alertmanager instead of prometheus-alertmanager",
        lambda: load("grafana-alerting-contact-points.yaml"),
        first_receiver("alertmanager", {"url": "http://test:9000"}),
        check_alerting,
        "contactPoints[0].receivers[0].type",
        "prometheus-alertmanager",
    ),
    (
        "a webhook without url",
        lambda: load("grafana-alerting-contact-points.yaml"),
        webhook(httpMethod="POST"),
        check_alerting,
        "contactPoints[0].receivers[0].settings.url",
        "is required by the webhook integration",
    ),
    (
        "a webhook url that is not http(s)",
        lambda: load("grafana-alerting-contact-points.yaml"),
        webhook(url="ftp://hooks.example.org/alerts"),
        check_alerting,
        "contactPoints[0].receivers[0].settings.url",
        "not an http(s) URL",
    ),
    (
        "a webhook with both basic auth and authorization credentials",
        lambda: load("grafana-alerting-contact-points.yaml"),
        webhook(url=HOOK, username="abc", password="abc123", authorization_credentials="abc123"),
        check_alerting,
        "contactPoints[0].receivers[0].settings",
        "both HTTP basic auth",
    ),
    (
        "a webhook with an unsupported httpMethod",
        lambda: load("grafana-alerting-contact-points.yaml"),
        webhook(url=HOOK, httpMethod="GET"),
        check_alerting,
        "contactPoints[0].receivers[0].settings.httpMethod",
        "use POST or PUT",
    ),
    (
        "hmacConfig without secret",
        lambda: load("grafana-alerting-contact-points.yaml"),
        webhook(url=HOOK, hmacConfig={"header": "X-Signature"}),
        check_alerting,
        "contactPoints[0].receivers[0].settings.hmacConfig.secret",
        "is required",
    ),
    (
        "a webhook setting a restricted header",
        lambda: load("grafana-alerting-contact-points.yaml"),
        webhook(url=HOOK, headers={"Authorization": "Bearer x"}),
        check_alerting,
        "contactPoints[0].receivers[0].settings.headers.Authorization",
        "does not let a webhook set",
    ),
    (
        "an email receiver without addresses",
        lambda: contact_point_with("grafana-alerting-settings-email.fragment.yaml"),
        delete("contactPoints", 0, "receivers", 0, "settings", "addresses"),
        check_alerting,
        "contactPoints[0].receivers[0].settings.addresses",
        "is required",
    ),
    (
        "a slack receiver with neither url nor token and recipient",
        lambda: load("grafana-alerting-contact-points.yaml"),
        first_receiver("slack", {"recipient": "alerting-dev"}),
        check_alerting,
        "contactPoints[0].receivers[0].settings",
        "either url",
    ),
    (
        "a policy routing to a missing receiver",
        lambda: load("grafana-alerting-policies.yaml"),
        root_policy(routes=[{"receiver": "no-such-contact-point", "object_matchers": [["team", "=", "sre"]]}]),
        lambda doc: check_alerting(doc, receiver_names={"grafana-default-email", "cp_1"}),
        "policies[0].routes[0].receiver",
        "'no-such-contact-point' is not defined",
    ),
    (
        "a bad matcher operator",
        lambda: load("grafana-alerting-policies.yaml"),
        lambda doc: doc["policies"][0]["matchers"].append("alertname ~= Watchdog"),
        check_alerting,
        "policies[0].matchers[3]",
        "is not a matcher",
    ),
    (
        "a bad object matcher operator",
        lambda: load("grafana-alerting-policies.yaml"),
        lambda doc: doc["policies"][0]["object_matchers"].append(["severity", "==", "critical"]),
        check_alerting,
        "policies[0].object_matchers[3]",
        "not a matcher operator",
    ),
    (
        "group_wait not a duration",
        lambda: load("grafana-alerting-policies.yaml"),
        root_policy(group_wait="30 seconds"),
        check_alerting,
        "policies[0].group_wait",
        "not a duration",
    ),
    (
        "a child policy muted by an undefined mute timing",
        lambda: load("grafana-alerting-policies.yaml"),
        root_policy(routes=[{"receiver": "grafana-default-email", "mute_time_intervals": ["never_defined"]}]),
        lambda doc: check_alerting(doc, mute_time_names={"abc", "mti_1"}),
        "policies[0].routes[0].mute_time_intervals[0]",
        "'never_defined' is not defined",
    ),
    (
        "a dashboard panel on a missing datasource",
        upstream_dashboard,
        first_panel(datasource={"type": "influxdb", "uid": "no_such_datasource"}),
        lambda doc: validate.validate_dashboard(doc, KNOWN_UIDS),
        "panels[0].datasource.uid",
        "'no_such_datasource' is not provisioned",
    ),
    (
        "a dashboard query on a missing datasource",
        upstream_dashboard,
        first_panel(targets=[{"refId": "A", "datasource": {"type": "influxdb", "uid": "no_such_datasource"}}]),
        lambda doc: validate.validate_dashboard(doc, KNOWN_UIDS),
        "panels[0].targets[0].datasource.uid",
        "'no_such_datasource' is not provisioned",
    ),
    (
        "a dashboard panel on an exported dashboard's __inputs placeholder",
        upstream_dashboard,
        first_panel(datasource="${DS_INFLUXDB}"),
        lambda doc: validate.validate_dashboard(doc, KNOWN_UIDS),
        "panels[0].datasource",
        "templating.list does not define",
    ),
    ("duplicate panel ids", upstream_dashboard, duplicate_panel, validate.validate_dashboard, "panels[1].id", "is also the id of panels[0]"),
    (
        "a panel wider than 24 columns",
        upstream_dashboard,
        first_panel(gridPos={"x": 0, "y": 0, "w": 25, "h": 9}),
        validate.validate_dashboard,
        "panels[0].gridPos.w",
        "24 columns",
    ),
    (
        "a panel running past the 24th column",
        upstream_dashboard,
        first_panel(gridPos={"x": 16, "y": 0, "w": 12, "h": 9}),
        validate.validate_dashboard,
        "panels[0].gridPos",
        "wider than the 24-column grid",
    ),
    (
        "duplicate refIds in a panel",
        upstream_dashboard,
        first_panel(targets=[{"refId": "A"}, {"refId": "A"}]),
        validate.validate_dashboard,
        "panels[0].targets[1].refId",
        "'A' is also the refId",
    ),
    ("a dashboard uid longer than 40 characters", upstream_dashboard, lambda doc: doc.update(uid="d" * 41), validate.validate_dashboard, "uid", "at most 40"),
    ("a dashboard without a title", upstream_dashboard, delete("title"), validate.validate_dashboard, "title", "is required"),
    (
        "two default datasources",
        lambda: load("grafana-datasources-example.yaml"),
        two_defaults,
        validate.validate_datasources,
        "datasources[1].isDefault",
        "one per org",
    ),
    (
        "a datasource of unknown type",
        lambda: load("grafana-datasources-example.yaml"),
        lambda doc: doc["datasources"][0].update(type="graphyte"),
        validate.validate_datasources,
        "datasources[0].type",
        "not a Grafana data source type",
    ),
    (
        "a datasource with a misspelt setting",
        lambda: load("grafana-datasources-example.yaml"),
        lambda doc: doc["datasources"][0].update(jsondata={}),
        validate.validate_datasources,
        "datasources[0].jsondata",
        "not a data source setting",
    ),
    (
        "an InfluxQL datasource without a database",
        lambda: load("grafana-influxdb-v2-influxql.yaml"),
        delete("datasources", 0, "jsonData", "dbName"),
        validate.validate_datasources,
        "datasources[0].jsonData.dbName",
        "is required for InfluxQL",
    ),
    (
        "a Flux datasource without an organization",
        lambda: load("grafana-influxdb-v2-flux.yaml"),
        delete("datasources", 0, "jsonData", "organization"),
        validate.validate_datasources,
        "datasources[0].jsonData.organization",
        "is required for Flux",
    ),
    (
        "an InfluxDB datasource with a bad httpMode",
        lambda: load("grafana-influxdb-v1.yaml"),
        lambda doc: doc["datasources"][0]["jsonData"].update(httpMode="PUT"),
        validate.validate_datasources,
        "datasources[0].jsonData.httpMode",
        "use GET or POST",
    ),
    (
        "a provider without options.path",
        lambda: load("grafana-dashboard-providers-example.yaml"),
        delete("providers", 0, "options", "path"),
        validate.validate_dashboard_providers,
        "providers[0].options.path",
        "is required",
    ),
    (
        "a provider with a folder and foldersFromFilesStructure",
        lambda: load("grafana-dashboard-providers-example.yaml"),
        lambda doc: doc["providers"][0].update(folder="Serving"),
        validate.validate_dashboard_providers,
        "providers[0].folder",
        "must be empty",
    ),
]

TELEGRAF_MUTATIONS = [
    (
        "telegraf: unknown input plugin",
        "telegraf-aggregator-minmax.conf",
        lambda conf: conf.replace("[[inputs.system]]", "[[inputs.sytem]]"),
        "inputs.sytem",
        "not a Telegraf input plugin",
    ),
    (
        "telegraf: a removed input plugin",
        "telegraf-aggregator-minmax.conf",
        lambda conf: conf.replace("[[inputs.system]]", "[[inputs.httpjson]]"),
        "inputs.httpjson",
        "use inputs.http",
    ),
    (
        "telegraf: influxdb_v2 output without bucket",
        "telegraf-environment-variables.conf",
        lambda conf: conf.replace('  bucket = "${INFLUX_BUCKET}"\n', "", 1),
        "outputs.influxdb_v2[0].bucket",
        "is required",
    ),
    (
        "telegraf: influxdb output with urls as a string",
        "telegraf-environment-variables.conf",
        lambda conf: conf.replace('urls = ["${INFLUX_URL}"]', 'urls = "http://localhost:8086"'),
        "outputs.influxdb[0].urls",
        "non-empty list",
    ),
    (
        "telegraf: interval not a duration",
        "telegraf-aggregator-minmax.conf",
        lambda conf: '[agent]\n  interval = "ten seconds"\n\n' + conf,
        "agent.interval",
        "not a duration",
    ),
    (
        "telegraf: a misspelt agent setting",
        "telegraf-aggregator-minmax.conf",
        lambda conf: '[agent]\n  flush_intervall = "10s"\n\n' + conf,
        "agent.flush_intervall",
        "not an [agent] setting",
    ),
    ("telegraf: no outputs", "telegraf-aggregator-minmax.conf", lambda conf: conf.split("[[outputs.file]]")[0], "outputs", "no output plugin"),
    (
        "telegraf: no inputs",
        "telegraf-aggregator-minmax.conf",
        lambda conf: conf.replace("[[inputs.system]]", "[[processors.rename]]"),
        "inputs",
        "no input plugin",
    ),
    (
        "telegraf: an aggregator period not a duration",
        "telegraf-aggregator-minmax.conf",
        lambda conf: conf.replace('period = "30s"', 'period = "half a minute"'),
        "aggregators.minmax[0].period",
        "not a duration",
    ),
    (
        "telegraf: TOML syntax error",
        "telegraf-aggregator-minmax.conf",
        lambda conf: conf.replace('files = ["stdout"]', 'files = ["stdout"'),
        "(TOML)",
        "fix the syntax",
    ),
]


def errors_at(errors, path):
    return [error for error in errors if error.startswith(f"{path}: ")]


@pytest.mark.parametrize(("base", "mutate", "check", "path", "words"), [m[1:] for m in MUTATIONS], ids=[m[0] for m in MUTATIONS])
def test_named_mutation_is_rejected(base, mutate, check, path, words):
    original = base()
    assert errors_at(check(copy.deepcopy(original)), path) == []
    document = copy.deepcopy(original)
    mutate(document)
    found = errors_at(check(document), path)
    assert found, f"no error at {path}: {check(document)}"
    assert any(words in error for error in found), found


@pytest.mark.parametrize(("name", "mutate", "path", "words"), [m[1:] for m in TELEGRAF_MUTATIONS], ids=[m[0] for m in TELEGRAF_MUTATIONS])
def test_named_telegraf_mutation_is_rejected(name, mutate, path, words):
    assert validate.validate_telegraf(text(name)) == []
    errors = validate.validate_telegraf(mutate(text(name)))
    found = errors_at(errors, path)
    assert found and any(words in error for error in found), errors


def test_all_errors_are_collected_not_only_the_first():
    doc = rules()
    first_rule(condition="C", noDataState="Nodata", uid="bad uid")(doc)
    delete("groups", 0, "folder")(doc)
    errors = check_alerting(doc)
    assert {error.split(": ", 1)[0] for error in errors} == {
        "groups[0].folder",
        "groups[0].rules[0].uid",
        "groups[0].rules[0].condition",
        "groups[0].rules[0].noDataState",
    }


def test_environment_references_are_accepted_where_formats_are_checked():
    points = load("grafana-alerting-contact-points.yaml")
    webhook(url="$WEBHOOK_URL", httpMethod="${WEBHOOK_METHOD}")(points)
    assert check_alerting(points) == []
    telegraf = text("telegraf-aggregator-minmax.conf") + '\n[agent]\n  interval = "${INTERVAL}"\n  metric_batch_size = ${BATCH}\n'
    assert validate.validate_telegraf(telegraf) == []


def test_prometheus_input_needs_something_to_scrape():
    conf = text("telegraf-aggregator-minmax.conf") + "\n[[inputs.prometheus]]\n  metric_version = 3\n"
    errors = validate.validate_telegraf(conf)
    assert errors_at(errors, "inputs.prometheus[0]") and errors_at(errors, "inputs.prometheus[0].metric_version")
    conf = text("telegraf-aggregator-minmax.conf") + '\n[[inputs.prometheus]]\n  urls = ["http://serving:8082/metrics"]\n  metric_version = 2\n'
    assert validate.validate_telegraf(conf) == []


def test_docker_input_needs_an_endpoint():
    conf = text("telegraf-aggregator-minmax.conf") + "\n[[inputs.docker]]\n  perdevice = false\n"
    assert errors_at(validate.validate_telegraf(conf), "inputs.docker[0].endpoint")
    conf = text("telegraf-aggregator-minmax.conf") + '\n[[inputs.docker]]\n  endpoint = "unix:///var/run/docker.sock"\n'
    assert validate.validate_telegraf(conf) == []


def test_threshold_and_reduce_expressions_over_a_query():
    doc = rules()
    rule = doc["groups"][0]["rules"][0]
    rule["condition"] = "C"
    rule["data"] = [
        {"refId": "A", "datasourceUid": "my_unique_uid", "relativeTimeRange": {"from": 300, "to": 0}, "model": {"query": "SELECT mean(usage_active) FROM cpu"}},
        {"refId": "B", "datasourceUid": "__expr__", "model": {"type": "reduce", "expression": "A", "reducer": "last"}},
        {
            "refId": "C",
            "datasourceUid": "__expr__",
            "model": {"type": "threshold", "expression": "B", "conditions": [{"evaluator": {"type": "gt", "params": [80]}}]},
        },
    ]
    assert check_alerting(doc, datasource_uids=KNOWN_UIDS) == []
    rule["data"][2]["model"]["conditions"][0]["evaluator"] = {"type": "above", "params": [80]}
    rule["data"][1]["model"]["expression"] = "B"
    errors = check_alerting(doc, datasource_uids=KNOWN_UIDS)
    assert errors_at(errors, "groups[0].rules[0].data[2].model.conditions[0].evaluator.type")
    assert any("refers to itself" in error for error in errors_at(errors, "groups[0].rules[0].data[1].model.expression"))


def test_collapsed_row_panels_share_the_id_space():
    dashboard = upstream_dashboard()
    row = {"type": "row", "id": 1, "collapsed": True, "gridPos": {"x": 0, "y": 9, "w": 24, "h": 1}, "panels": [copy.deepcopy(dashboard["panels"][0])]}
    dashboard["panels"].append(row)
    assert errors_at(validate.validate_dashboard(dashboard), "panels[1].panels[0].id")


def test_builtin_datasources_and_defined_variables_are_accepted():
    dashboard = upstream_dashboard()
    dashboard["templating"]["list"].append({"name": "source", "type": "datasource", "query": "influxdb"})
    dashboard["annotations"]["list"].append({"builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"}, "name": "Annotations & Alerts"})
    first_panel(datasource={"type": "influxdb", "uid": "${source}"}, targets=[{"refId": "A", "datasource": "-- Mixed --"}])(dashboard)
    assert validate.validate_dashboard(dashboard, KNOWN_UIDS) == []


# A rendered tree


def write(path, content):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content if isinstance(content, str) else yaml.safe_dump(content, sort_keys=False), encoding="utf-8")
    return path


def valid_policies():
    policies = load("grafana-alerting-policies.yaml")
    root = policies["policies"][0]
    routes = [{"receiver": "cp_1", "object_matchers": [["team", "=", "sre_team_1"]], "mute_time_intervals": root.pop("mute_time_intervals")}]
    root.update(routes=routes)
    routes[0]["mute_time_intervals"] = ["mti_1"]
    return policies


def dashboard_on(uid, dashboard_uid="cLV5GDCkz"):
    dashboard = upstream_dashboard()
    dashboard["uid"] = dashboard_uid
    first_panel(datasource={"type": "graphite", "uid": uid}, targets=[{"refId": "A", "target": "servers.*.cpu"}])(dashboard)
    return json.dumps(dashboard)


@pytest.fixture
def tree(tmp_path):
    """A rendered Grafana directory built from the upstream examples, with the dashboards outside provisioning/."""
    grafana = tmp_path / "grafana"
    write(grafana / "provisioning/datasources/graphite.yaml", text("grafana-datasources-example.yaml"))
    write(grafana / "provisioning/datasources/influxdb.yml", text("grafana-influxdb-v1.yaml"))
    write(grafana / "provisioning/dashboards/providers.yaml", text("grafana-dashboard-providers-example.yaml"))
    write(grafana / "dashboards/serving/overview.json", dashboard_on("my_unique_uid"))
    write(grafana / "provisioning/alerting/rules.yaml", text("grafana-alerting-rules.yaml"))
    write(grafana / "provisioning/alerting/contact-points.yaml", text("grafana-alerting-contact-points.yaml"))
    write(grafana / "provisioning/alerting/mute-timings.yaml", text("grafana-alerting-mute-timings.yaml"))
    write(grafana / "provisioning/alerting/policies.yaml", valid_policies())
    write(grafana / "provisioning/alerting/README.txt", "not read: only .yaml, .yml and .json are provisioning files")
    write(tmp_path / "telegraf/telegraf.conf", text("telegraf-environment-variables.conf"))
    return {"root": grafana, "path_map": {"/var/lib/grafana/dashboards": str(grafana / "dashboards")}, "telegraf": tmp_path / "telegraf/telegraf.conf"}


def test_tree_built_from_upstream_examples_passes(tree):
    result = validate.validate_tree(tree["root"], tree["telegraf"], required_labels=["team"], path_map=tree["path_map"])
    assert result["errors"] == []
    assert result["checked"] == [
        "provisioning/datasources/graphite.yaml",
        "provisioning/datasources/influxdb.yml",
        "provisioning/dashboards/providers.yaml",
        "dashboards/serving/overview.json",
        "provisioning/alerting/contact-points.yaml",
        "provisioning/alerting/mute-timings.yaml",
        "provisioning/alerting/policies.yaml",
        "provisioning/alerting/rules.yaml",
        str(tree["telegraf"]),
    ]


def test_tree_cross_checks_and_reports_every_file(tree):
    root = tree["root"]
    write(root / "dashboards/serving/broken.json", dashboard_on("gone_uid", dashboard_uid="broken"))
    rules_doc = load("grafana-alerting-rules.yaml")
    with_query_on("gone_uid")(rules_doc)
    write(root / "provisioning/alerting/rules.yaml", rules_doc)
    policies = valid_policies()
    policies["policies"][0]["routes"][0]["receiver"] = "cp_2"
    write(root / "provisioning/alerting/policies.yaml", policies)
    second = load("grafana-influxdb-v1.yaml")
    second["datasources"][0]["isDefault"] = True
    first = load("grafana-datasources-example.yaml")
    first["datasources"][0]["isDefault"] = True
    write(root / "provisioning/datasources/graphite.yaml", first)
    write(root / "provisioning/datasources/influxdb.yml", second)
    write(root / "provisioning/dashboards/unmapped.yaml", {"apiVersion": 1, "providers": [{"name": "other", "options": {"path": "/srv/elsewhere"}}]})
    write(root / "provisioning/alerting/syntax.yaml", "groups: [unclosed\n")

    result = validate.validate_tree(root, required_labels=["team", "cluster"], path_map=tree["path_map"])
    errors = result["errors"]

    def one(prefix, words):
        matching = [error for error in errors if error.startswith(prefix)]
        assert matching and any(words in error for error in matching), (prefix, errors)

    one("provisioning/datasources/influxdb.yml: datasources[0].isDefault: ", "graphite.yaml")
    one("dashboards/serving/broken.json: panels[0].datasource.uid: ", "'gone_uid' is not provisioned")
    one("provisioning/alerting/rules.yaml: groups[0].rules[0].data[1].datasourceUid: ", "'gone_uid' is not provisioned")
    one("provisioning/alerting/rules.yaml: groups[0].rules[0].labels: ", "'cluster'")
    one("provisioning/alerting/policies.yaml: policies[0].routes[0].receiver: ", "'cp_2' is not defined")
    one("provisioning/dashboards/unmapped.yaml: providers[0].options.path: ", "path_map")
    one("provisioning/alerting/syntax.yaml: (YAML): line 2, column 1: ", "expected ',' or ']'")
    assert "dashboards/serving/broken.json" in result["checked"] and "provisioning/alerting/syntax.yaml" in result["checked"]
    assert len(errors) == 7, "\n".join(errors)


def test_tree_rejects_two_dashboards_with_one_uid(tree):
    write(tree["root"] / "dashboards/serving/copy.json", dashboard_on("my_unique_uid"))
    result = validate.validate_tree(tree["root"], path_map=tree["path_map"])
    assert result["errors"] == [
        "dashboards/serving/overview.json: uid: 'cLV5GDCkz' is also the uid of dashboards/serving/copy.json; give every dashboard its own uid"
    ]


def test_tree_without_provisioning_directory(tmp_path):
    result = validate.validate_tree(tmp_path)
    assert result["checked"] == [] and len(result["errors"]) == 1 and "no provisioning/ directory" in result["errors"][0]


def test_tree_path_map_takes_the_longest_prefix(tree, tmp_path):
    elsewhere = write(tmp_path / "elsewhere/board.json", dashboard_on("my_unique_uid")).parent
    result = validate.validate_tree(tree["root"], path_map={"/var/lib": "/nonexistent", "/var/lib/grafana/dashboards": str(elsewhere)})
    assert result["errors"] == []
    assert str(elsewhere / "board.json") in result["checked"] and "dashboards/serving/overview.json" not in result["checked"]


# The module, in-process


def run_module(capsys, check_mode=False, **args):
    if check_mode:
        args["_ansible_check_mode"] = True
    capsys.readouterr()
    with patch_module_args(args):
        with pytest.raises(SystemExit) as exited:
            monitoring_config_validate.main()
    result = json.loads(capsys.readouterr().out)
    result["rc"] = exited.value.code
    return result


@pytest.mark.parametrize("check_mode", [False, True])
def test_module_succeeds_on_a_valid_tree(capsys, tree, check_mode):
    result = run_module(
        capsys,
        check_mode=check_mode,
        grafana_dir=str(tree["root"]),
        path_map=tree["path_map"],
        telegraf_conf=str(tree["telegraf"]),
        required_rule_labels=["team"],
    )
    assert result["rc"] == 0, result.get("msg")
    assert result["changed"] is False and result["errors"] == []
    assert "dashboards/serving/overview.json" in result["checked"] and str(tree["telegraf"]) in result["checked"]


def test_module_fails_with_every_error(capsys, tree):
    conf = write(tree["telegraf"], text("telegraf-aggregator-minmax.conf").split("[[outputs.file]]")[0])
    result = run_module(capsys, grafana_dir=str(tree["root"]), path_map=tree["path_map"], telegraf_conf=str(conf))
    assert result["rc"] == 1 and result["changed"] is False
    # The upstream rule carries only a "team" label; the default requires action, service and cluster.
    label_errors = [error for error in result["errors"] if error.startswith("provisioning/alerting/rules.yaml: groups[0].rules[0].labels: ")]
    assert len(label_errors) == 3
    assert f"{conf}: outputs: no output plugin is configured" in " | ".join(result["errors"])
    assert len(result["errors"]) == 4
    assert re.match(r"^4 problem\(s\) in the monitoring configuration \(\d+ file\(s\) checked\): ", result["msg"])
    assert "provisioning/alerting/rules.yaml" in result["checked"]


def test_module_without_tomllib_says_so(capsys, tree, monkeypatch):
    monkeypatch.setattr(monitoring_config_validate, "TOMLLIB_IMPORT_ERROR", "Traceback: ModuleNotFoundError: No module named 'tomllib'")
    result = run_module(capsys, grafana_dir=str(tree["root"]))
    assert result["rc"] == 1 and "tomllib (Python 3.11 or later)" in result["msg"]
