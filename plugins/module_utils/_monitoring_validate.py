# Copyright (c) mlfleet.serving maintainers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Checks for the Grafana provisioning files, dashboards and Telegraf configurations the monitoring role renders.

Each ``validate_*`` function takes one parsed document and returns a list of errors, every one of the form
``<path inside the document>: <what is wrong and what to do>``; ``validate_tree`` walks a rendered directory
laid out like Grafana's, cross-checks the files against each other and prefixes every error with its file.
Nothing stops at the first error.

The rules follow what Grafana and Telegraf themselves accept or reject (grafana/grafana
``pkg/services/provisioning``, grafana/alerting ``receivers/*/v1/config.go``, influxdata/telegraf ``config``),
so the upstream documentation's own examples pass. Values that Grafana or Telegraf interpolate from the
environment (``$VAR``, ``${VAR}``) are accepted wherever a format is checked, since their value is unknown here.
"""

from __future__ import annotations

import json
import re
import traceback
from pathlib import Path

try:
    import tomllib
except ImportError:
    TOMLLIB_IMPORT_ERROR = traceback.format_exc()
else:
    TOMLLIB_IMPORT_ERROR = None

try:
    import yaml
except ImportError:
    YAML_IMPORT_ERROR = traceback.format_exc()
else:
    YAML_IMPORT_ERROR = None

ENV_REFERENCE = re.compile(r"(?<!\$)\$(\{[A-Za-z_][A-Za-z0-9_]*(?:[:?+-][^}]*)?\}|[A-Za-z_][A-Za-z0-9_]*)")
# Grafana's UID rule (util.IsValidShortUID) for dashboards, data sources, alert rules and receivers.
UID_PATTERN = re.compile(r"^[a-zA-Z0-9\-_]{1,40}$")
# Prometheus durations (prometheus/common model.ParseDuration), which Grafana alerting parses.
PROMETHEUS_DURATION = re.compile(r"^(?:0|(?:\d+y)?(?:\d+w)?(?:\d+d)?(?:\d+h)?(?:\d+m)?(?:\d+s)?(?:\d+ms)?)$")
PROMETHEUS_DURATION_PART = re.compile(r"(\d+)(ms|y|w|d|h|m|s)")
PROMETHEUS_UNIT_SECONDS = {"y": 365 * 86400, "w": 7 * 86400, "d": 86400, "h": 3600, "m": 60, "s": 1, "ms": 0.001}
# Go durations (time.ParseDuration), plus Telegraf's "d" for days.
GO_DURATION = re.compile(r"^[-+]?(?:0|(?:(?:\d+(?:\.\d*)?|\.\d+)(?:ns|us|\u00b5s|\u03bcs|ms|s|m|h|d))+)$")

GRAFANA_DEFAULT_RECEIVER = "grafana-default-email"
EXPRESSION_DATASOURCE_UIDS = frozenset(("__expr__", "-100"))
BUILTIN_DATASOURCES = frozenset(("-- Grafana --", "grafana", "-- Mixed --", "-- Dashboard --", "__expr__"))

# Core data source type ids (and the legacy ids Grafana still maps to them); any plugin id ending in
# "-datasource" is accepted as well, since it names an installable plugin.
DATASOURCE_TYPES = frozenset(
    """
    alertmanager cloudwatch elasticsearch grafana-azure-monitor-datasource grafana-postgresql-datasource
    grafana-pyroscope-datasource grafana-testdata-datasource graphite influxdb jaeger loki mssql mysql opentsdb
    parca postgres prometheus stackdriver tempo testdata zipkin
    """.split()
)
PLUGIN_DATASOURCE_TYPE = re.compile(r"^[a-z0-9]+(?:-[a-z0-9]+)*-datasource$")
HTTP_DATASOURCE_TYPES = frozenset(("elasticsearch", "graphite", "influxdb", "loki", "prometheus", "tempo", "jaeger", "zipkin", "alertmanager"))
DATASOURCE_KEYS = frozenset(
    """
    access basicAuth basicAuthPassword basicAuthUser database editable isDefault jsonData name orgId password
    secureJsonData type uid url user version withCredentials
    """.split()
)
INFLUXDB_QUERY_LANGUAGES = ("InfluxQL", "Flux", "SQL")

PROVIDER_KEYS = frozenset(("name", "orgId", "folder", "folderUid", "type", "disableDeletion", "updateIntervalSeconds", "allowUiUpdates", "options"))

PANEL_VARIABLE = re.compile(r"^\$\{([^}:]+)(?::[^}]*)?\}$|^\$([A-Za-z0-9_]+)$|^\[\[([^\]:]+)(?::[^\]]*)?\]\]$")
TEMPLATE_VARIABLE_TYPES = frozenset(("adhoc", "constant", "custom", "datasource", "groupby", "interval", "query", "snapshot", "switch", "system", "textbox"))

RULE_GROUP_KEYS = frozenset(("orgId", "name", "folder", "interval", "rules"))
RULE_KEYS = frozenset(
    """
    uid title condition data dashboardUid dasboardUid panelId noDataState execErrState for keepFiringFor
    missing_series_evals_to_resolve annotations labels isPaused notification_settings record
    """.split()
)
QUERY_KEYS = frozenset(("refId", "queryType", "relativeTimeRange", "datasourceUid", "model"))
NO_DATA_STATES = ("NoData", "Alerting", "OK", "KeepLast")
EXEC_ERROR_STATES = ("Error", "Alerting", "OK", "KeepLast")
EXPRESSION_TYPES = ("math", "reduce", "resample", "classic_conditions", "threshold", "sql")
THRESHOLD_TYPES = frozenset(("gt", "lt", "eq", "ne", "ge", "le", "within_range", "outside_range", "within_range_included", "outside_range_included"))
MATH_REFERENCE = re.compile(r"\$\{([^}]+)\}|\$([A-Za-z0-9_]+)")

# grafana/alerting receivers/schema/known_types.go, with the aliases notify.IntegrationTypeFromString accepts.
RECEIVER_TYPES = frozenset(
    """
    prometheus-alertmanager dingding discord email googlechat jira kafka line mqtt oncall opsgenie pagerduty
    pushover sensugo slack sns teams msteams msteamsv2 telegram threema victorops webex webhook wechat wecom
    """.split()
)
# Settings each receiver's NewConfig refuses to do without (grafana/alerting receivers/<type>/v1/config.go).
RECEIVER_REQUIRED_SETTINGS = {
    "prometheus-alertmanager": ("url",),
    "dingding": ("url",),
    "discord": ("url",),
    "email": ("addresses",),
    "googlechat": ("url",),
    "jira": ("api_url",),
    "kafka": ("kafkaRestProxy", "kafkaTopic"),
    "line": ("token",),
    "mqtt": ("brokerUrl", "topic"),
    "oncall": ("url",),
    "opsgenie": ("apiKey",),
    "pagerduty": ("integrationKey",),
    "pushover": ("userKey", "apiToken"),
    "sensugo": ("url", "apikey"),
    "teams": ("url",),
    "telegram": ("bottoken", "chatid"),
    "threema": ("gateway_id", "recipient_id", "api_secret"),
    "victorops": ("url",),
    "webhook": ("url",),
}
# Headers a webhook may not set (grafana/alerting receivers/webhook/v1/config.go restrictedHeaders).
WEBHOOK_RESTRICTED_HEADERS = frozenset(
    """
    Host Accept-Encoding Accept-Charset Content-Encoding Content-Length Authorization User-Agent Transfer-Encoding
    Connection Upgrade Trailer TE Proxy-Authorization Proxy-Authenticate Cookie Set-Cookie Referer Origin
    X-Forwarded-For X-Real-IP Via Forwarded Expect Keep-Alive Date Max-Forwards
    """.lower().split()
)
TLS_CONFIG_KEYS = frozenset(("insecureSkipVerify", "caCertificate", "clientCertificate", "clientKey"))
HMAC_CONFIG_KEYS = frozenset(("secret", "header", "timestampHeader"))

POLICY_KEYS = frozenset(
    """
    receiver group_by matchers object_matchers mute_time_intervals active_time_intervals group_wait group_interval
    repeat_interval routes continue
    """.split()
)
MATCHER_OPERATORS = ("=~", "!~", "!=", "=")
# The classic (pre-UTF-8) matcher syntax; alertmanager's parser also takes a quoted label name.
STRING_MATCHER = re.compile(r'^\s*([a-zA-Z_:][a-zA-Z0-9_:]*|"(?:[^"\\]|\\.)+")\s*(=~|!~|!=|=)\s*(.*?)\s*$', re.DOTALL)

ALERTING_FILE_KEYS = frozenset(
    """
    apiVersion groups deleteRules contactPoints deleteContactPoints policies resetPolicies templates
    deleteTemplates muteTimes deleteMuteTimes
    """.split()
)
MUTE_TIME_INTERVAL_KEYS = frozenset(("times", "weekdays", "days_of_month", "months", "years", "location"))

TELEGRAF_AGENT_DURATIONS = frozenset(
    ("interval", "precision", "collection_jitter", "collection_offset", "flush_interval", "flush_jitter", "logfile_rotation_interval")
)
TELEGRAF_AGENT_BOOLEANS = frozenset(
    """
    round_interval debug quiet omit_hostname always_include_local_tags always_include_global_tags
    skip_processors_before_aggregators skip_processors_after_aggregators buffer_disk_sync
    """.split()
)
TELEGRAF_AGENT_POSITIVE_INTEGERS = frozenset(("metric_batch_size", "metric_buffer_limit"))
TELEGRAF_AGENT_INTEGERS = frozenset(("logfile_rotation_max_archives", "config_url_retry_attempts"))
TELEGRAF_AGENT_STRINGS = frozenset(
    """
    hostname logtarget logformat logfile structured_log_message_key log_with_timezone snmp_translator statefile
    buffer_strategy buffer_directory
    """.split()
)
TELEGRAF_AGENT_SIZES = frozenset(("logfile_rotation_max_size",))
TELEGRAF_TOP_LEVEL = frozenset(("agent", "global_tags", "inputs", "outputs", "processors", "aggregators", "secretstores"))
TELEGRAF_ENV_SENTINEL = "__mlfleet_telegraf_env__"
TELEGRAF_UNQUOTED_ENV = re.compile(r"(=[ \t]*)(\$\{[^}\n]*\}|\$[A-Za-z_][A-Za-z0-9_]*)([ \t]*(?:#[^\n]*)?)$", re.MULTILINE)
TELEGRAF_ENV = re.compile(r"\$\{[^}\n]*\}|\$[A-Za-z_][A-Za-z0-9_]*")

# The plugins of Telegraf 1.39 (influxdata/telegraf plugins/<kind>/), by kind.
TELEGRAF_PLUGINS = {
    "inputs": frozenset(
        """
        activemq aliyuncms amd_rocm_smi amqp_consumer apache apcupsd aurora azure_monitor azure_storage_queue bcache
        beanstalkd beat bind bond burrow ceph cgroup chrony cisco_telemetry_mdt clickhouse cloud_pubsub cloud_pubsub_push
        cloudwatch cloudwatch_metric_streams conntrack consul consul_agent couchbase couchdb cpu csgo ctrlx_datalayer dcos
        directory_monitor disk diskio disque dmcache dns_query docker docker_log dovecot dpdk ecs elasticsearch
        elasticsearch_query ethtool eventhub_consumer exec execd fail2ban fibaro file filecount filestat fireboard
        firehose fluentd fritzbox github gnmi gnmi_listener google_cloud_storage graylog haproxy hddtemp http
        http_listener_v2 http_response huebridge hugepages icinga2 infiniband influxdb influxdb_listener
        influxdb_v2_listener intel_baseband intel_dlb intel_pmt intel_pmu intel_powerstat intel_rdt internal
        internet_speed interrupts ipmi_sensor ipset iptables ipvs jenkins jolokia2_agent jolokia2_proxy
        jti_openconfig_telemetry kafka_consumer kapacitor kernel kernel_vmstat kibana kinesis_consumer knx_listener
        kube_inventory kubernetes lanz ldap leofs libvirt linux_cpu linux_sysctl_fs logql logstash lustre2 lvm mailchimp
        marklogic mavlink mcrouter mdstat mem memcached mesos minecraft mock modbus mongodb monit mqtt_consumer multifile
        mysql nats nats_consumer neoom_beaam neptune_apex net net_response netflow netstat nfsclient nftables nginx
        nginx_plus nginx_plus_api nginx_sts nginx_upstream_check nginx_vts nomad nsd nsdp nsq nsq_consumer nstat ntpq
        nvidia_smi opcua opcua_listener openldap openntpd opensearch_query opensmtpd openstack opentelemetry
        openweathermap p4runtime passenger pf pgbouncer phpfpm ping postfix postgresql postgresql_extensible powerdns
        powerdns_recursor processes procstat prometheus promql proxmox puppetagent rabbitmq radius raindrops ras ravendb
        redfish redis redis_sentinel rethinkdb riak riemann_listener s7comm salesforce sensors sip slab slurm smart
        smartctl snmp snmp_trap socket_listener socketstat solr sql sqlserver stackdriver statsd supervisor suricata swap
        synproxy syslog sysstat system systemd_units tacacs tail teamspeak temp tengine timex tomcat trig turbostat
        twemproxy unbound upsd uwsgi varnish vault vsphere webhooks whois win_eventlog win_perf_counters win_services
        win_wmi wireguard wireless x509_cert xtremio zfs zipkin zookeeper
        """.split()
    ),
    "outputs": frozenset(
        """
        amqp application_insights arc azure_data_explorer azure_monitor bigquery clarify cloud_pubsub cloudwatch
        cloudwatch_logs cratedb datadog discard dynatrace elasticsearch event_hubs exec execd file graphite graylog
        groundwork health heartbeat http influxdb influxdb_v2 influxdb_v3 inlong instrumental iotdb kafka kinesis librato
        logzio loki microsoft_fabric mongodb mqtt nats nebius_cloud_monitoring newrelic nsq opensearch opentelemetry
        opentsdb parquet postgresql prometheus_client quix redistimeseries remotefile riemann sensu signalfx
        socket_writer sql stackdriver stomp sumologic syslog timestream warp10 wavefront websocket
        yandex_cloud_monitoring zabbix zerobus
        """.split()
    ),
    "processors": frozenset(
        """
        aws_ec2 batch clone converter cumulative_sum date dedup defaults enum execd filepath filter ifname lookup noise
        override parser pivot port_name printer regex rename reverse_dns round s2geo scale snmp_lookup split starlark
        strings tag_limit template timestamp topk unpivot
        """.split()
    ),
    "aggregators": frozenset("basicstats derivative final histogram merge minmax quantile starlark valuecounter".split()),
}
# Plugins Telegraf has removed, with what replaces them (plugins/<kind>/deprecations.go).
TELEGRAF_REMOVED_PLUGINS = {
    ("inputs", "cassandra"): "use inputs.jolokia2 with the cassandra.conf example",
    ("inputs", "cisco_telemetry_gnmi"): "it was renamed to inputs.gnmi",
    ("inputs", "http_listener"): "use inputs.influxdb_listener or inputs.http_listener_v2",
    ("inputs", "httpjson"): "use inputs.http",
    ("inputs", "io"): "use inputs.diskio",
    ("inputs", "jolokia"): "use inputs.jolokia2_agent",
    ("inputs", "kafka_consumer_legacy"): "use inputs.kafka_consumer",
    ("inputs", "logparser"): "use inputs.tail with data_format = grok",
    ("inputs", "snmp_legacy"): "use inputs.snmp",
    ("inputs", "tcp_listener"): "use inputs.socket_listener",
    ("inputs", "udp_listener"): "use inputs.socket_listener",
    ("outputs", "riemann_legacy"): "use outputs.riemann",
}


class Report:
    """Collects the errors of one document, each as '<path>: <message>'."""

    def __init__(self):
        self.errors = []

    def add(self, path, message):
        self.errors.append(f"{path}: {message}" if path else message)


def at(path, key):
    """The JSON path of key (a name or an index) under path."""
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def is_env_reference(value):
    return isinstance(value, str) and ENV_REFERENCE.search(value) is not None


def is_blank(value):
    return value is None or (isinstance(value, str) and not value.strip())


def is_integer(value):
    return isinstance(value, int) and not isinstance(value, bool)


def org_of(item):
    """The org id an entry belongs to (Grafana's default, 1, when it names none or not a usable one)."""
    org = item.get("orgId")
    return org if is_integer(org) and org > 0 else 1


def prometheus_seconds(text):
    """The length of a Prometheus duration in seconds, or None when text is not one."""
    if not isinstance(text, str) or not text or not PROMETHEUS_DURATION.match(text):
        return None
    return sum(int(number) * PROMETHEUS_UNIT_SECONDS[unit] for number, unit in PROMETHEUS_DURATION_PART.findall(text))


def check_api_version(report, doc):
    version = doc.get("apiVersion")
    if version != 1 and not is_env_reference(version):
        report.add("apiVersion", f"is {version!r}; set apiVersion: 1 (the only version Grafana's provisioning reads with this layout)")


def check_known_keys(report, path, item, known, what):
    for key in item:
        if key not in known:
            report.add(at(path, key), f"is not a {what} setting; remove it or fix its spelling (known: {', '.join(sorted(known))})")


def list_at(report, doc, key, path=""):
    """doc[key] as a list ([] when absent or null); reports anything else."""
    value = doc.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        report.add(at(path, key), f"must be a list, not {type(value).__name__}; write it as a YAML sequence")
        return []
    return value


def mappings(report, items, path, what):
    """(index, item) for each mapping in items; reports the others."""
    for index, item in enumerate(items):
        if isinstance(item, dict):
            yield index, item
        else:
            report.add(at(path, index), f"must be a {what} (a mapping), not {type(item).__name__}")


def require_string(report, path, item, key, what):
    value = item.get(key)
    if is_blank(value):
        report.add(at(path, key), f"is required; set the {what}")
        return None
    if not isinstance(value, str):
        report.add(at(path, key), f"must be a string, not {type(value).__name__}; quote it")
        return None
    return value


def check_type(report, path, value, expected, hint):
    """Reports value unless it is None, an environment reference or of one of the expected types."""
    if value is None or is_env_reference(value):
        return
    if bool in expected and isinstance(value, bool):
        return
    if isinstance(value, bool) or not isinstance(value, expected):
        report.add(path, f"must be {hint}, not {value!r}")


def check_uid(report, path, value, what):
    if value is None or is_env_reference(value):
        return
    if not isinstance(value, str) or not UID_PATTERN.match(value):
        report.add(path, f"{value!r} is not a valid {what} uid; use at most 40 letters, digits, '-' or '_'")


def check_prometheus_duration(report, path, value, required=False, positive=False):
    if is_blank(value):
        if required:
            report.add(path, "is required; set a duration such as 10s, 1m or 1h30m")
        return
    if is_env_reference(value):
        return
    seconds = prometheus_seconds(value) if isinstance(value, str) else None
    if seconds is None:
        report.add(path, f"{value!r} is not a duration; write it like 30s, 5m, 1h30m or 1d (units ms, s, m, h, d, w, y, largest first)")
    elif positive and seconds <= 0:
        report.add(path, f"{value!r} must be longer than 0; set a duration such as 10s or 1m")


def check_string_map(report, path, value, what):
    if value is None:
        return
    if not isinstance(value, dict):
        report.add(path, f"must be a mapping of {what} names to strings")
        return
    for key, item in value.items():
        if not isinstance(key, str) or not key:
            report.add(path, f"has a {what} name {key!r} that is not a non-empty string; quote it")
        elif item is None or isinstance(item, (dict, list)):
            report.add(at(path, key), f"must be a string {what} value, not {item!r}")


# Data sources


def validate_datasources(doc) -> list[str]:
    """Errors in a Grafana data source provisioning file (provisioning/datasources/*.yaml)."""
    report = Report()
    if not isinstance(doc, dict):
        return ["(document): must be a mapping with apiVersion: 1 and datasources; the file is empty or not YAML mappings"]
    check_api_version(report, doc)
    check_known_keys(report, "", doc, frozenset(("apiVersion", "datasources", "deleteDatasources", "prune")), "data source file")
    check_type(report, "prune", doc.get("prune"), (bool,), "true or false")
    defaults = {}
    names = {}
    uids = {}
    for index, source in mappings(report, list_at(report, doc, "datasources"), "datasources", "data source"):
        path = at("datasources", index)
        check_datasource(report, path, source)
        org = org_of(source)
        name = source.get("name")
        if isinstance(name, str) and name:
            if (org, name) in names:
                report.add(at(path, "name"), f"{name!r} is already used by {names[(org, name)]} in org {org}; give each data source its own name")
            names.setdefault((org, name), path)
        uid = source.get("uid")
        if isinstance(uid, str) and uid:
            if (org, uid) in uids:
                report.add(at(path, "uid"), f"{uid!r} is already used by {uids[(org, uid)]}; give each data source its own uid")
            uids.setdefault((org, uid), path)
        if source.get("isDefault") is True:
            if org in defaults:
                report.add(
                    at(path, "isDefault"),
                    f"org {org} already has a default data source ({defaults[org]}); Grafana allows one per org, set isDefault: false on all but one",
                )
            defaults.setdefault(org, path)
    for index, entry in mappings(report, list_at(report, doc, "deleteDatasources"), "deleteDatasources", "data source to delete"):
        path = at("deleteDatasources", index)
        require_string(report, path, entry, "name", "name of the data source to delete")
        check_type(report, at(path, "orgId"), entry.get("orgId"), (int,), "an org id (integer)")
    return report.errors


def check_datasource(report, path, source):
    check_known_keys(report, path, source, DATASOURCE_KEYS, "data source")
    require_string(report, path, source, "name", "name panels and queries refer to")
    source_type = require_string(report, path, source, "type", "data source type (for example prometheus or influxdb)")
    if source_type and not is_env_reference(source_type) and source_type not in DATASOURCE_TYPES and not PLUGIN_DATASOURCE_TYPE.match(source_type):
        report.add(
            at(path, "type"),
            f"{source_type!r} is not a Grafana data source type; use a core type ({', '.join(sorted(DATASOURCE_TYPES))}) or an installed plugin's id",
        )
    access = source.get("access")
    if access is not None and not is_env_reference(access) and access not in ("proxy", "direct"):
        report.add(at(path, "access"), f"{access!r} is not an access mode; use proxy (Server) or direct (Browser)")
    check_type(report, at(path, "orgId"), source.get("orgId"), (int,), "an org id (integer)")
    check_type(report, at(path, "version"), source.get("version"), (int,), "an integer")
    for flag in ("isDefault", "basicAuth", "withCredentials", "editable"):
        check_type(report, at(path, flag), source.get(flag), (bool,), "true or false")
    check_uid(report, at(path, "uid"), source.get("uid"), "data source")
    url = source.get("url")
    if source_type in HTTP_DATASOURCE_TYPES and isinstance(url, str) and url and not is_env_reference(url):
        if not re.match(r"^https?://[^/\s]+", url):
            report.add(at(path, "url"), f"{url!r} is not an http(s) URL; write it as http://host:port")
    for block in ("jsonData", "secureJsonData"):
        value = source.get(block)
        if value is not None and not isinstance(value, dict):
            report.add(at(path, block), "must be a mapping of settings")
    if source_type == "influxdb":
        check_influxdb(report, path, source)


def check_influxdb(report, path, source):
    json_data = source.get("jsonData") if isinstance(source.get("jsonData"), dict) else {}
    language = json_data.get("version") or "InfluxQL"
    if not is_env_reference(language) and language not in INFLUXDB_QUERY_LANGUAGES:
        report.add(at(path, "jsonData.version"), f"{language!r} is not an InfluxDB query language; use InfluxQL, Flux or SQL")
        return
    mode = json_data.get("httpMode")
    if mode is not None and not is_env_reference(mode) and mode not in ("GET", "POST"):
        report.add(at(path, "jsonData.httpMode"), f"{mode!r} is not an HTTP method for InfluxDB queries; use GET or POST")
    if language in ("InfluxQL", "SQL") and is_blank(json_data.get("dbName")) and is_blank(source.get("database")):
        report.add(at(path, "jsonData.dbName"), f"is required for {language} queries; set jsonData.dbName to the database (bucket) to query")
    if language == "Flux":
        for key, what in (("organization", "InfluxDB organization"), ("defaultBucket", "bucket Flux queries read by default")):
            if is_blank(json_data.get(key)):
                report.add(at(path, f"jsonData.{key}"), f"is required for Flux queries; set it to the {what}")


# Dashboard providers


def validate_dashboard_providers(doc) -> list[str]:
    """Errors in a Grafana dashboard provider file (provisioning/dashboards/*.yaml)."""
    report = Report()
    if not isinstance(doc, dict):
        return ["(document): must be a mapping with apiVersion: 1 and providers; the file is empty or not YAML mappings"]
    check_api_version(report, doc)
    check_known_keys(report, "", doc, frozenset(("apiVersion", "providers")), "dashboard provider file")
    providers = list_at(report, doc, "providers")
    if not providers:
        report.add("providers", "is empty; list at least one provider with options.path, or remove the file")
    names = {}
    for index, provider in mappings(report, providers, "providers", "provider"):
        path = at("providers", index)
        check_known_keys(report, path, provider, PROVIDER_KEYS, "dashboard provider")
        name = require_string(report, path, provider, "name", "provider name (unique among providers)")
        if name:
            if name in names:
                report.add(at(path, "name"), f"{name!r} is already used by {names[name]}; provider names must be unique")
            names.setdefault(name, path)
        provider_type = provider.get("type") or "file"
        if provider_type != "file" and not is_env_reference(provider_type):
            report.add(at(path, "type"), f"{provider_type!r} is not a provider type; use file")
        check_type(report, at(path, "orgId"), provider.get("orgId"), (int,), "an org id (integer)")
        check_type(report, at(path, "folder"), provider.get("folder"), (str,), "a folder name (string)")
        check_type(report, at(path, "folderUid"), provider.get("folderUid"), (str,), "a folder uid (string)")
        for flag in ("disableDeletion", "allowUiUpdates"):
            check_type(report, at(path, flag), provider.get(flag), (bool,), "true or false")
        interval = provider.get("updateIntervalSeconds")
        check_type(report, at(path, "updateIntervalSeconds"), interval, (int,), "a number of seconds (integer)")
        if is_integer(interval) and interval < 0:
            report.add(at(path, "updateIntervalSeconds"), "must not be negative; set how often Grafana rescans, in seconds")
        options = provider.get("options")
        if not isinstance(options, dict) or is_blank(options.get("path")):
            report.add(at(path, "options.path"), "is required for a file provider; set the directory Grafana reads the dashboards' JSON from")
            continue
        check_type(report, at(path, "options.path"), options.get("path"), (str,), "a directory path (string)")
        from_files = options.get("foldersFromFilesStructure")
        check_type(report, at(path, "options.foldersFromFilesStructure"), from_files, (bool,), "true or false")
        if from_files is True:
            for key in ("folder", "folderUid"):
                if not is_blank(provider.get(key)):
                    report.add(at(path, key), "must be empty with options.foldersFromFilesStructure: true (folders come from the directories); remove it")
    return report.errors


# Dashboards


def validate_dashboard(doc, datasource_uids: set[str] | None = None, datasource_names: set[str] | None = None) -> list[str]:
    """Errors in a dashboard JSON model.

    With datasource_uids (and optionally datasource_names, for the legacy string references), every data source a
    panel, query, annotation or variable uses must be one of them, a Grafana built-in or a template variable.
    """
    report = Report()
    if not isinstance(doc, dict):
        return ["(document): must be a JSON object (the dashboard model), not a list or a scalar"]
    title = doc.get("title")
    if is_blank(title) or not isinstance(title, str):
        report.add("title", "is required; give the dashboard a title")
    check_uid(report, "uid", doc.get("uid"), "dashboard")
    check_type(report, "schemaVersion", doc.get("schemaVersion"), (int,), "an integer (the JSON model's schema version)")
    templating = doc.get("templating")
    variables = check_variables(report, templating if isinstance(templating, dict) else {}, datasource_uids, datasource_names)
    context = {"uids": datasource_uids, "names": datasource_names, "variables": variables, "ids": {}}
    for index, panel in mappings(report, list_at(report, doc, "panels"), "panels", "panel"):
        check_panel(report, at("panels", index), panel, context)
    annotations = doc.get("annotations")
    if isinstance(annotations, dict):
        for index, annotation in mappings(report, list_at(report, annotations, "list", "annotations"), "annotations.list", "annotation"):
            check_datasource_reference(report, at(at("annotations.list", index), "datasource"), annotation.get("datasource"), context)
    return report.errors


def check_variables(report, templating, datasource_uids, datasource_names):
    names = set()
    context = {"uids": datasource_uids, "names": datasource_names, "variables": None, "ids": {}}
    for index, variable in mappings(report, list_at(report, templating, "list", "templating"), "templating.list", "template variable"):
        path = at("templating.list", index)
        name = require_string(report, path, variable, "name", "variable name panels refer to as $name")
        if name:
            if name in names:
                report.add(at(path, "name"), f"variable {name!r} is defined twice; rename or remove one")
            names.add(name)
        variable_type = variable.get("type")
        if variable_type not in TEMPLATE_VARIABLE_TYPES:
            report.add(at(path, "type"), f"{variable_type!r} is not a variable type; use one of {', '.join(sorted(TEMPLATE_VARIABLE_TYPES))}")
        check_datasource_reference(report, at(path, "datasource"), variable.get("datasource"), context)
    return names


def check_panel(report, path, panel, context):
    panel_id = panel.get("id")
    if panel_id is not None:
        if not is_integer(panel_id):
            report.add(at(path, "id"), f"must be an integer, not {panel_id!r}")
        elif panel_id in context["ids"]:
            report.add(at(path, "id"), f"{panel_id} is also the id of {context['ids'][panel_id]}; give every panel (rows' panels included) its own id")
        else:
            context["ids"][panel_id] = path
    if "libraryPanel" not in panel:
        panel_type = panel.get("type")
        if is_blank(panel_type) or not isinstance(panel_type, str):
            report.add(at(path, "type"), "is required; set the visualization (for example timeseries, stat or text)")
    if "gridPos" in panel:
        check_grid_position(report, at(path, "gridPos"), panel["gridPos"])
    check_datasource_reference(report, at(path, "datasource"), panel.get("datasource"), context)
    refs = {}
    for index, target in mappings(report, list_at(report, panel, "targets", path), at(path, "targets"), "query"):
        target_path = at(at(path, "targets"), index)
        ref = target.get("refId")
        if ref is not None:
            if ref in refs:
                report.add(at(target_path, "refId"), f"{ref!r} is also the refId of {refs[ref]}; give each query of a panel its own refId")
            refs.setdefault(ref, target_path)
        check_datasource_reference(report, at(target_path, "datasource"), target.get("datasource"), context)
    for index, child in mappings(report, list_at(report, panel, "panels", path), at(path, "panels"), "panel"):
        check_panel(report, at(at(path, "panels"), index), child, context)


def check_grid_position(report, path, grid):
    if not isinstance(grid, dict):
        report.add(path, "must be an object {x, y, w, h}")
        return
    values = {}
    for key in ("x", "y", "w", "h"):
        value = grid.get(key)
        if not is_integer(value):
            report.add(at(path, key), f"must be an integer, not {value!r}")
        else:
            values[key] = value
    if "w" in values and not 1 <= values["w"] <= 24:
        report.add(at(path, "w"), f"{values['w']} is outside 1-24; the dashboard grid is 24 columns wide")
    if "x" in values and not 0 <= values["x"] <= 23:
        report.add(at(path, "x"), f"{values['x']} is outside 0-23; the dashboard grid is 24 columns wide")
    if "x" in values and "w" in values and 0 <= values["x"] and 1 <= values["w"] <= 24 and values["x"] + values["w"] > 24:
        report.add(path, f"x {values['x']} + w {values['w']} is wider than the 24-column grid; reduce w or move the panel left")
    if values.get("h", 1) < 1:
        report.add(at(path, "h"), "must be at least 1 (grid rows of 30 px)")
    if values.get("y", 0) < 0:
        report.add(at(path, "y"), "must not be negative")


def check_datasource_reference(report, path, reference, context):
    """A panel, query, annotation or variable's datasource: null, a name/uid string, a variable or {type, uid}."""
    if reference is None:
        return
    if isinstance(reference, str):
        candidate, known = reference, (context["uids"] or set()) | (context["names"] or set())
    elif isinstance(reference, dict):
        candidate, known = reference.get("uid"), context["uids"] or set()
        if candidate is not None and not isinstance(candidate, str):
            report.add(at(path, "uid"), f"must be a string, not {candidate!r}")
            return
        path = at(path, "uid")
    else:
        report.add(path, "must be a {type, uid} object, a data source name or a template variable")
        return
    if candidate is None or candidate in BUILTIN_DATASOURCES:
        return
    variable = PANEL_VARIABLE.match(candidate)
    if variable:
        name = next(group for group in variable.groups() if group)
        if context["variables"] is not None and name not in context["variables"]:
            report.add(
                path,
                f"{candidate!r} refers to variable {name!r}, which templating.list does not define; add a datasource variable of that name "
                "(file provisioning does not fill in an exported dashboard's __inputs placeholders such as ${DS_...})",
            )
        return
    if context["uids"] is not None and candidate not in known:
        report.add(path, f"data source {candidate!r} is not provisioned; use the uid of one in provisioning/datasources ({', '.join(sorted(known)) or 'none'})")


# Alert rules


def validate_alert_rules(doc, datasource_uids: set[str] | None = None, required_labels: list[str] | None = None) -> list[str]:
    """Errors in the alert rule part (groups, deleteRules) of a Grafana alerting provisioning file."""
    report = Report()
    if not isinstance(doc, dict):
        return ["(document): must be a mapping with apiVersion: 1 and groups; the file is empty or not YAML mappings"]
    if "groups" not in doc and "deleteRules" not in doc:
        return []
    check_api_version(report, doc)
    rule_uids = {}
    for group_index, group in mappings(report, list_at(report, doc, "groups"), "groups", "rule group"):
        path = at("groups", group_index)
        check_known_keys(report, path, group, RULE_GROUP_KEYS, "rule group")
        check_type(report, at(path, "orgId"), group.get("orgId"), (int,), "an org id (integer)")
        require_string(report, path, group, "name", "rule group name")
        require_string(report, path, group, "folder", "folder (title) that holds the group")
        check_prometheus_duration(report, at(path, "interval"), group.get("interval"), required=True, positive=True)
        for rule_index, rule in mappings(report, list_at(report, group, "rules", path), at(path, "rules"), "alert rule"):
            rule_path = at(at(path, "rules"), rule_index)
            check_rule(report, rule_path, rule, datasource_uids, required_labels)
            uid = rule.get("uid")
            if isinstance(uid, str) and uid:
                if uid in rule_uids:
                    report.add(at(rule_path, "uid"), f"{uid!r} is also the uid of {rule_uids[uid]}; every alert rule needs its own uid")
                rule_uids.setdefault(uid, rule_path)
    for index, entry in mappings(report, list_at(report, doc, "deleteRules"), "deleteRules", "rule to delete"):
        path = at("deleteRules", index)
        require_string(report, path, entry, "uid", "uid of the alert rule to delete")
        check_type(report, at(path, "orgId"), entry.get("orgId"), (int,), "an org id (integer)")
    return report.errors


def check_rule(report, path, rule, datasource_uids, required_labels):
    check_known_keys(report, path, rule, RULE_KEYS, "alert rule")
    uid = require_string(report, path, rule, "uid", "rule uid (at most 40 letters, digits, '-' or '_')")
    if uid:
        check_uid(report, at(path, "uid"), uid, "alert rule")
    require_string(report, path, rule, "title", "title shown in the UI and in notifications")
    data = list_at(report, rule, "data", path)
    if not data:
        report.add(at(path, "data"), "is required; list the queries and expressions the rule evaluates")
    refs = {}
    for index, query in mappings(report, data, at(path, "data"), "query"):
        ref = query.get("refId")
        if isinstance(ref, str) and ref:
            if ref in refs:
                report.add(at(at(at(path, "data"), index), "refId"), f"{ref!r} is also the refId of {refs[ref]}; give each query its own refId")
            refs.setdefault(ref, at(at(path, "data"), index))
    for index, query in mappings(report, data, at(path, "data"), "query"):
        check_rule_query(report, at(at(path, "data"), index), query, refs, datasource_uids)
    condition = rule.get("condition")
    if is_blank(condition):
        report.add(
            at(path, "condition"), f"is required; set it to the refId of the query or expression that decides the alert ({', '.join(refs) or 'none defined'})"
        )
    elif condition not in refs and not is_env_reference(condition):
        report.add(at(path, "condition"), f"{condition!r} is not the refId of any data entry; use one of {', '.join(refs) or 'none defined'}")
    for key, allowed in (("noDataState", NO_DATA_STATES), ("execErrState", EXEC_ERROR_STATES)):
        value = rule.get(key)
        if value is not None and not is_env_reference(value) and (not isinstance(value, str) or value.strip() not in allowed):
            report.add(at(path, key), f"{value!r} is not a state; use one of {', '.join(allowed)}")
    for key in ("for", "keepFiringFor"):
        check_prometheus_duration(report, at(path, key), rule.get(key))
    check_type(report, at(path, "panelId"), rule.get("panelId"), (int,), "a panel id (integer)")
    check_type(report, at(path, "isPaused"), rule.get("isPaused"), (bool,), "true or false")
    check_string_map(report, at(path, "annotations"), rule.get("annotations"), "annotation")
    labels = rule.get("labels")
    check_string_map(report, at(path, "labels"), labels, "label")
    for label in required_labels or ():
        if not isinstance(labels, dict) or label not in labels:
            report.add(at(path, "labels"), f"lacks the label {label!r} every rule here must carry (notification routing uses it); add labels.{label}")
    record = rule.get("record")
    if record is not None:
        record_from = record.get("from") if isinstance(record, dict) else None
        if not isinstance(record, dict) or is_blank(record.get("metric")):
            report.add(at(path, "record.metric"), "is required for a recording rule; set the metric name to write")
        if record_from is not None and record_from not in refs:
            report.add(at(path, "record.from"), f"{record_from!r} is not the refId of any data entry; use one of {', '.join(refs)}")
    settings = rule.get("notification_settings")
    if settings is not None:
        if not isinstance(settings, dict) or is_blank(settings.get("receiver")):
            report.add(at(path, "notification_settings.receiver"), "is required when notification_settings is set; name a contact point")
        elif isinstance(settings, dict):
            for key in ("group_wait", "group_interval", "repeat_interval"):
                check_prometheus_duration(report, at(at(path, "notification_settings"), key), settings.get(key))


def check_rule_query(report, path, query, refs, datasource_uids):
    check_known_keys(report, path, query, QUERY_KEYS, "alert query")
    ref = require_string(report, path, query, "refId", "refId the condition and expressions refer to")
    source = query.get("datasourceUid")
    if is_blank(source):
        report.add(at(path, "datasourceUid"), "is required; set the uid of a provisioned data source, or __expr__ for an expression")
        return
    model = query.get("model")
    if model is not None and not isinstance(model, dict):
        report.add(at(path, "model"), "must be a mapping (the query or expression model)")
        model = None
    if source in EXPRESSION_DATASOURCE_UIDS:
        check_expression(report, at(path, "model"), model or {}, ref, refs)
        return
    if datasource_uids is not None and not is_env_reference(source) and source not in datasource_uids:
        report.add(
            at(path, "datasourceUid"),
            f"data source {source!r} is not provisioned; use the uid of one in provisioning/datasources ({', '.join(sorted(datasource_uids)) or 'none'}) "
            "or __expr__ for an expression",
        )
    time_range = query.get("relativeTimeRange")
    if not isinstance(time_range, dict):
        report.add(at(path, "relativeTimeRange"), "is required for a data source query; set {from: <seconds back>, to: 0}")
        return
    start, end = time_range.get("from", 0), time_range.get("to", 0)
    if not is_integer(start) or not is_integer(end) or start < 0 or end < 0:
        report.add(at(path, "relativeTimeRange"), f"from {start!r} and to {end!r} must be whole seconds before now (integers >= 0)")
    elif start <= end:
        report.add(at(path, "relativeTimeRange"), f"from ({start}) must be greater than to ({end}): both count seconds back from now")


def check_expression(report, path, model, ref, refs):
    expression_type = model.get("type")
    if expression_type not in EXPRESSION_TYPES:
        report.add(at(path, "type"), f"{expression_type!r} is not a server-side expression type; use one of {', '.join(EXPRESSION_TYPES)}")
        return
    expression = model.get("expression")
    if expression_type == "math":
        if is_blank(expression) or not isinstance(expression, str):
            report.add(at(path, "expression"), "is required for a math expression; write it over other queries, like $A > 80")
            return
        for braced, bare in MATH_REFERENCE.findall(expression):
            check_expression_input(report, at(path, "expression"), braced or bare, ref, refs)
    elif expression_type in ("reduce", "resample", "threshold"):
        if is_blank(expression) or not isinstance(expression, str):
            report.add(at(path, "expression"), f"is required for a {expression_type} expression; set it to the refId of its input")
        else:
            name = MATH_REFERENCE.fullmatch(expression.strip())
            check_expression_input(report, at(path, "expression"), next(g for g in name.groups() if g) if name else expression.strip(), ref, refs)
    if expression_type == "reduce" and is_blank(model.get("reducer")):
        report.add(at(path, "reducer"), "is required for a reduce expression; use last, mean, min, max, sum or count")
    if expression_type == "classic_conditions":
        for index, condition in mappings(report, list_at(report, model, "conditions", path), at(path, "conditions"), "condition"):
            params = (condition.get("query") or {}).get("params") if isinstance(condition.get("query"), dict) else None
            if not params:
                report.add(at(at(at(path, "conditions"), index), "query.params"), "must name the refId this condition reads, like [A]")
            else:
                check_expression_input(report, at(at(at(path, "conditions"), index), "query.params[0]"), params[0], ref, refs)
    if expression_type == "threshold":
        conditions = list_at(report, model, "conditions", path)
        if not conditions:
            report.add(at(path, "conditions"), "is required for a threshold expression; add one with evaluator {type: gt, params: [80]}")
        for index, condition in mappings(report, conditions, at(path, "conditions"), "condition"):
            evaluator = condition.get("evaluator")
            evaluator_path = at(at(at(path, "conditions"), index), "evaluator")
            if not isinstance(evaluator, dict) or evaluator.get("type") not in THRESHOLD_TYPES:
                found = evaluator.get("type") if isinstance(evaluator, dict) else evaluator
                report.add(at(evaluator_path, "type"), f"{found!r} is not a threshold; use one of {', '.join(sorted(THRESHOLD_TYPES))}")
                continue
            params = evaluator.get("params")
            wanted = 2 if "range" in evaluator["type"] else 1
            if not isinstance(params, list) or len(params) < wanted or not all(isinstance(p, (int, float)) for p in params[:wanted]):
                report.add(at(evaluator_path, "params"), f"must list {wanted} number(s) for {evaluator['type']}, like {[80, 90][:wanted]}")


def check_expression_input(report, path, name, ref, refs):
    if name == ref:
        report.add(path, f"expression {ref!r} refers to itself; point it at another query's refId")
    elif name not in refs:
        report.add(path, f"refers to {name!r}, which no data entry of this rule defines; use one of {', '.join(refs) or 'none defined'}")


# Contact points


def validate_contact_points(doc) -> list[str]:
    """Errors in the contact point part (contactPoints, deleteContactPoints) of a Grafana alerting provisioning file."""
    report = Report()
    if not isinstance(doc, dict):
        return ["(document): must be a mapping with apiVersion: 1 and contactPoints; the file is empty or not YAML mappings"]
    if "contactPoints" not in doc and "deleteContactPoints" not in doc:
        return []
    check_api_version(report, doc)
    names = {}
    receiver_uids = {}
    for index, point in mappings(report, list_at(report, doc, "contactPoints"), "contactPoints", "contact point"):
        path = at("contactPoints", index)
        check_type(report, at(path, "orgId"), point.get("orgId"), (int,), "an org id (integer)")
        name = require_string(report, path, point, "name", "contact point name notification policies route to")
        if name:
            key = (org_of(point), name)
            if key in names:
                report.add(at(path, "name"), f"{name!r} is already defined at {names[key]}; put all its receivers under one contact point")
            names.setdefault(key, path)
        receivers = list_at(report, point, "receivers", path)
        if not receivers:
            report.add(at(path, "receivers"), "is required; list at least one receiver (uid, type, settings)")
        for receiver_index, receiver in mappings(report, receivers, at(path, "receivers"), "receiver"):
            receiver_path = at(at(path, "receivers"), receiver_index)
            check_receiver(report, receiver_path, receiver)
            uid = receiver.get("uid")
            if isinstance(uid, (str, int)) and not isinstance(uid, bool) and uid != "":
                if uid in receiver_uids:
                    report.add(at(receiver_path, "uid"), f"{uid!r} is also the uid of {receiver_uids[uid]}; every receiver needs its own uid")
                receiver_uids.setdefault(uid, receiver_path)
    for index, entry in mappings(report, list_at(report, doc, "deleteContactPoints"), "deleteContactPoints", "receiver to delete"):
        path = at("deleteContactPoints", index)
        if is_blank(entry.get("uid")):
            report.add(at(path, "uid"), "is required; set the uid of the receiver to delete")
        check_type(report, at(path, "orgId"), entry.get("orgId"), (int,), "an org id (integer)")
    return report.errors


def check_receiver(report, path, receiver):
    uid = receiver.get("uid")
    if is_blank(uid):
        report.add(at(path, "uid"), "is required; set a unique uid (at most 40 letters, digits, '-' or '_')")
    elif isinstance(uid, str):
        check_uid(report, at(path, "uid"), uid, "receiver")
    check_type(report, at(path, "disableResolveMessage"), receiver.get("disableResolveMessage"), (bool,), "true or false")
    receiver_type = receiver.get("type")
    if is_blank(receiver_type) or not isinstance(receiver_type, str):
        report.add(at(path, "type"), f"is required; set the integration ({', '.join(sorted(RECEIVER_TYPES))})")
        return
    canonical = receiver_type.lower()
    if canonical not in RECEIVER_TYPES:
        hint = " (Grafana calls the Alertmanager integration prometheus-alertmanager)" if canonical == "alertmanager" else ""
        report.add(at(path, "type"), f"{receiver_type!r} is not a Grafana contact point type{hint}; use one of {', '.join(sorted(RECEIVER_TYPES))}")
        return
    settings = receiver.get("settings")
    if not isinstance(settings, dict):
        report.add(at(path, "settings"), f"is required; set the {receiver_type} integration's settings as a mapping")
        return
    secure = receiver.get("secureSettings") if isinstance(receiver.get("secureSettings"), dict) else {}
    settings_path = at(path, "settings")
    for key in RECEIVER_REQUIRED_SETTINGS.get(canonical, ()):
        if is_blank(settings.get(key)) and is_blank(secure.get(key)):
            report.add(at(settings_path, key), f"is required by the {receiver_type} integration; set it")
    if canonical == "slack":
        url = settings.get("url") or secure.get("url")
        if is_blank(url) and (is_blank(settings.get("token") or secure.get("token")) or is_blank(settings.get("recipient"))):
            report.add(settings_path, "needs either url (an incoming webhook) or both token and recipient (the chat API); set one of them")
    if canonical == "webhook":
        check_webhook(report, settings_path, settings, secure)


def check_webhook(report, path, settings, secure):
    def value(key):
        found = settings.get(key)
        return secure.get(key) if is_blank(found) else found

    url = value("url")
    if isinstance(url, str) and url and not is_env_reference(url) and not re.match(r"^https?://[^/\s]+", url):
        report.add(at(path, "url"), f"{url!r} is not an http(s) URL; write it as https://host/path")
    method = settings.get("httpMethod")
    if not is_blank(method) and not is_env_reference(method) and method not in ("POST", "PUT"):
        report.add(at(path, "httpMethod"), f"{method!r} is not supported; use POST or PUT")
    max_alerts = settings.get("maxAlerts")
    if max_alerts is not None and not is_env_reference(max_alerts) and not re.match(r"^\d+$", str(max_alerts)):
        report.add(at(path, "maxAlerts"), f"{max_alerts!r} is not a number of alerts; use an integer (0 for no limit)")
    # Grafana refuses basic auth and an Authorization header together (a scheme alone defaults to Bearer).
    if not is_blank(value("username")) and not is_blank(value("password")) and not is_blank(value("authorization_credentials")):
        report.add(
            path,
            "sets both HTTP basic auth (username, password) and an Authorization header (authorization_scheme, authorization_credentials); "
            "Grafana permits only one, remove the other",
        )
    headers = settings.get("headers")
    if headers is not None:
        if not isinstance(headers, dict):
            report.add(at(path, "headers"), "must be a mapping of header names to values")
        else:
            for name in headers:
                if str(name).lower() in WEBHOOK_RESTRICTED_HEADERS:
                    report.add(
                        at(at(path, "headers"), name), "is a header Grafana does not let a webhook set; remove it (use the auth settings for Authorization)"
                    )
    tls = settings.get("tlsConfig")
    if tls is not None:
        if not isinstance(tls, dict):
            report.add(at(path, "tlsConfig"), "must be a mapping (insecureSkipVerify, caCertificate, clientCertificate, clientKey)")
        else:
            check_known_keys(report, at(path, "tlsConfig"), tls, TLS_CONFIG_KEYS, "webhook TLS")
            check_type(report, at(path, "tlsConfig.insecureSkipVerify"), tls.get("insecureSkipVerify"), (bool,), "true or false")
            if is_blank(tls.get("clientCertificate")) != is_blank(tls.get("clientKey")):
                report.add(at(path, "tlsConfig"), "sets only one of clientCertificate and clientKey; a client certificate needs both")
    hmac = settings.get("hmacConfig")
    if hmac is not None:
        if not isinstance(hmac, dict):
            report.add(at(path, "hmacConfig"), "must be a mapping (secret, header, timestampHeader)")
        else:
            check_known_keys(report, at(path, "hmacConfig"), hmac, HMAC_CONFIG_KEYS, "webhook HMAC")
            if is_blank(hmac.get("secret")) and is_blank(secure.get("hmacConfig.secret")):
                report.add(at(path, "hmacConfig.secret"), "is required to sign webhook requests; set the shared secret, or remove hmacConfig")


# Notification policies


def validate_policies(doc, receiver_names: set[str] | None = None, mute_time_names: set[str] | None = None) -> list[str]:
    """Errors in the notification policy part (policies, resetPolicies) of a Grafana alerting provisioning file.

    With receiver_names (and mute_time_names), every receiver (and mute timing) a route names must be among them.
    """
    report = Report()
    if not isinstance(doc, dict):
        return ["(document): must be a mapping with apiVersion: 1 and policies; the file is empty or not YAML mappings"]
    if "policies" not in doc and "resetPolicies" not in doc:
        return []
    check_api_version(report, doc)
    orgs = {}
    for index, policy in mappings(report, list_at(report, doc, "policies"), "policies", "policy tree"):
        path = at("policies", index)
        org = org_of(policy)
        if org in orgs:
            report.add(path, f"org {org} already has a policy tree at {orgs[org]}; Grafana keeps one tree per org, merge them")
        orgs.setdefault(org, path)
        check_route(report, path, policy, {"receivers": receiver_names, "mute_times": mute_time_names}, root=True)
    for index, org in enumerate(list_at(report, doc, "resetPolicies")):
        if not is_integer(org) and not is_env_reference(org):
            report.add(at("resetPolicies", index), f"{org!r} is not an org id; list org ids (integers) whose policy tree to reset")
    return report.errors


def check_route(report, path, route, known, root=False):
    check_known_keys(report, path, route, POLICY_KEYS | ({"orgId"} if root else set()), "notification policy")
    if root:
        check_type(report, at(path, "orgId"), route.get("orgId"), (int,), "an org id (integer)")
    receiver = route.get("receiver")
    if is_blank(receiver):
        if root:
            report.add(at(path, "receiver"), "is required on the root policy; name the default contact point")
    elif not isinstance(receiver, str):
        report.add(at(path, "receiver"), f"must be a contact point name (string), not {receiver!r}")
    elif known["receivers"] is not None and receiver not in known["receivers"] and not is_env_reference(receiver):
        report.add(
            at(path, "receiver"), f"contact point {receiver!r} is not defined; add it to contactPoints or use one of {', '.join(sorted(known['receivers']))}"
        )
    group_by = route.get("group_by")
    if group_by is not None:
        if not isinstance(group_by, list) or not all(isinstance(label, str) and label for label in group_by):
            report.add(at(path, "group_by"), "must be a list of label names")
        elif "..." in group_by and len(group_by) > 1:
            report.add(at(path, "group_by"), "'...' (group by all labels) must be the only entry; remove the other labels")
        elif len(set(group_by)) != len(group_by):
            report.add(at(path, "group_by"), "names a label twice; list each once")
    for index, matcher in enumerate(list_at(report, route, "matchers", path)):
        check_string_matcher(report, at(at(path, "matchers"), index), matcher)
    for index, matcher in enumerate(list_at(report, route, "object_matchers", path)):
        check_object_matcher(report, at(at(path, "object_matchers"), index), matcher)
    for key in ("mute_time_intervals", "active_time_intervals"):
        names = list_at(report, route, key, path)
        if names and root:
            report.add(at(path, key), "is not allowed on the root policy (Grafana rejects it); move it to the child policies under routes")
        for index, name in enumerate(names):
            if not isinstance(name, str) or not name:
                report.add(at(at(path, key), index), "must be the name of a mute timing")
            elif known["mute_times"] is not None and name not in known["mute_times"] and not is_env_reference(name):
                report.add(at(at(path, key), index), f"mute timing {name!r} is not defined; add it to muteTimes or remove it here")
    check_prometheus_duration(report, at(path, "group_wait"), route.get("group_wait"))
    check_prometheus_duration(report, at(path, "group_interval"), route.get("group_interval"), positive=True)
    check_prometheus_duration(report, at(path, "repeat_interval"), route.get("repeat_interval"), positive=True)
    check_type(report, at(path, "continue"), route.get("continue"), (bool,), "true or false")
    for index, child in mappings(report, list_at(report, route, "routes", path), at(path, "routes"), "policy"):
        check_route(report, at(at(path, "routes"), index), child, known)


def check_string_matcher(report, path, matcher):
    if not isinstance(matcher, str):
        report.add(path, f"must be a string like 'label=value', 'label!=value', 'label=~regex' or 'label!~regex', not {matcher!r}")
        return
    if is_env_reference(matcher):
        return
    parsed = STRING_MATCHER.match(matcher)
    if not parsed:
        report.add(path, f"{matcher!r} is not a matcher; write label=value, label!=value, label=~regex or label!~regex (label: letters, digits, _ and :)")
        return
    value = parsed.group(3)
    if len(value) >= 2 and value[0] == value[-1] == '"':
        value = value[1:-1]
    check_regex(report, path, parsed.group(2), value)


def check_object_matcher(report, path, matcher):
    if not isinstance(matcher, list) or len(matcher) != 3 or not all(isinstance(part, str) for part in matcher):
        report.add(path, f"must be [label, operator, value] (three strings), not {matcher!r}")
        return
    label, operator, value = matcher
    if not label:
        report.add(path, "has an empty label name; name the label to match")
    if operator not in MATCHER_OPERATORS:
        report.add(path, f"{operator!r} is not a matcher operator; use =, !=, =~ or !~")
        return
    check_regex(report, path, operator, value)


def check_regex(report, path, operator, value):
    if operator not in ("=~", "!~"):
        return
    try:
        re.compile(value)
    except re.error as error:
        # Python's re lacks some RE2 syntax Grafana accepts (\p{...}, [[:alpha:]]); only plain patterns are judged.
        if not re.search(r"\\[pP]|\[\[:", value):
            report.add(path, f"{value!r} is not a valid regular expression ({error}); fix the pattern")


def validate_alerting_extras(doc) -> list[str]:
    """Errors in the templates and mute timings (templates, deleteTemplates, muteTimes, deleteMuteTimes) of an alerting file."""
    report = Report()
    if not isinstance(doc, dict):
        return []
    for section in ("templates", "deleteTemplates", "muteTimes", "deleteMuteTimes"):
        for index, entry in mappings(report, list_at(report, doc, section), section, "entry"):
            path = at(section, index)
            require_string(report, path, entry, "name", "name")
            if section == "templates":
                require_string(report, path, entry, "template", "template text")
            if section == "muteTimes":
                for interval_index, interval in mappings(report, list_at(report, entry, "time_intervals", path), at(path, "time_intervals"), "time interval"):
                    check_known_keys(report, at(at(path, "time_intervals"), interval_index), interval, MUTE_TIME_INTERVAL_KEYS, "time interval")
    return report.errors


# Telegraf


def validate_telegraf(text: str) -> list[str]:
    """Errors in a telegraf.conf (TOML, with Telegraf's ${VAR} / $VAR substitution accepted)."""
    if TOMLLIB_IMPORT_ERROR:
        return ["(document): cannot be checked: Python's tomllib (Python 3.11 or later) is not available"]
    report = Report()
    # Telegraf substitutes before it parses TOML, so an unquoted ${VAR} stands for a number or a boolean.
    prepared = TELEGRAF_UNQUOTED_ENV.sub(lambda match: f'{match.group(1)}"{TELEGRAF_ENV_SENTINEL}"{match.group(3)}', text)
    prepared = TELEGRAF_ENV.sub(TELEGRAF_ENV_SENTINEL, prepared)
    try:
        config = tomllib.loads(prepared)
    except tomllib.TOMLDecodeError as error:
        return [f"(TOML): {error}; fix the syntax (strings in double quotes, tables as [name] or [[kind.plugin]])"]
    for key in config:
        if key not in TELEGRAF_TOP_LEVEL:
            report.add(key, "is not a Telegraf table; use [agent], [global_tags] or [[inputs|outputs|processors|aggregators.<plugin>]]")
    agent = config.get("agent", {})
    if not isinstance(agent, dict):
        report.add("agent", "must be a table: [agent]")
    else:
        check_telegraf_agent(report, agent)
    tags = config.get("global_tags", {})
    if not isinstance(tags, dict):
        report.add("global_tags", "must be a table: [global_tags]")
    else:
        for key, value in tags.items():
            if not isinstance(value, str):
                report.add(at("global_tags", key), f"must be a string (tags are strings), not {value!r}; quote it")
    counts = {}
    for kind in ("inputs", "outputs", "processors", "aggregators"):
        counts[kind] = check_telegraf_plugins(report, kind, config.get(kind, {}))
    if not counts["inputs"]:
        report.add("inputs", "no input plugin is configured; add at least one [[inputs.<plugin>]] table")
    if not counts["outputs"]:
        report.add("outputs", "no output plugin is configured; add at least one [[outputs.<plugin>]] table (for example outputs.influxdb_v2)")
    return report.errors


def is_telegraf_placeholder(value):
    return isinstance(value, str) and TELEGRAF_ENV_SENTINEL in value


def is_telegraf_duration(value):
    if is_telegraf_placeholder(value):
        return True
    if isinstance(value, bool):
        return False
    if isinstance(value, (int, float)):
        return value >= 0
    return isinstance(value, str) and (value == "" or GO_DURATION.match(value) is not None or re.match(r"^\d+(\.\d+)?$", value) is not None)


def check_telegraf_agent(report, agent):
    known = TELEGRAF_AGENT_DURATIONS | TELEGRAF_AGENT_BOOLEANS | TELEGRAF_AGENT_POSITIVE_INTEGERS | TELEGRAF_AGENT_INTEGERS
    known = known | TELEGRAF_AGENT_STRINGS | TELEGRAF_AGENT_SIZES
    for key, value in agent.items():
        path = at("agent", key)
        if key not in known:
            report.add(path, "is not an [agent] setting (Telegraf refuses unused fields); remove it or fix its spelling")
        elif is_telegraf_placeholder(value):
            continue
        elif key in TELEGRAF_AGENT_DURATIONS and not is_telegraf_duration(value):
            report.add(path, f'{value!r} is not a duration; write it as a string like "10s", "1m" or "500ms"')
        elif key in TELEGRAF_AGENT_BOOLEANS and not isinstance(value, bool):
            report.add(path, f"must be true or false, not {value!r}")
        elif key in TELEGRAF_AGENT_POSITIVE_INTEGERS and (not is_integer(value) or value <= 0):
            report.add(path, f"must be a positive integer (a number of metrics), not {value!r}")
        elif key in TELEGRAF_AGENT_INTEGERS and not is_integer(value):
            report.add(path, f"must be an integer, not {value!r}")
        elif key in TELEGRAF_AGENT_STRINGS and not isinstance(value, str):
            report.add(path, f"must be a string, not {value!r}; quote it")
    batch, buffer = agent.get("metric_batch_size"), agent.get("metric_buffer_limit")
    if is_integer(batch) and is_integer(buffer) and 0 < buffer < batch:
        report.add("agent.metric_buffer_limit", f"{buffer} is smaller than metric_batch_size {batch}; make the buffer at least one batch")


def check_telegraf_plugins(report, kind, section):
    """Checks [[kind.name]] tables; returns how many plugin instances there are."""
    if not isinstance(section, dict):
        report.add(kind, f"must hold plugin tables like [[{kind}.<plugin>]]")
        return 0
    count = 0
    for name, instances in section.items():
        path = at(kind, name)
        if name not in TELEGRAF_PLUGINS[kind]:
            removed = TELEGRAF_REMOVED_PLUGINS.get((kind, name))
            reason = f"Telegraf removed it: {removed}" if removed else f"check the name against Telegraf's {kind} plugin list"
            report.add(path, f"{name!r} is not a Telegraf {kind[:-1]} plugin; {reason}")
        tables = instances if isinstance(instances, list) else [instances]
        for index, table in enumerate(tables):
            count += 1
            table_path = at(path, index) if isinstance(instances, list) else path
            if not isinstance(table, dict):
                report.add(table_path, f"must be a table [[{kind}.{name}]]")
                continue
            check_telegraf_plugin(report, kind, name, table_path, table)
    return count


def check_telegraf_plugin(report, kind, name, path, table):
    for key in ("interval", "flush_interval", "flush_jitter", "collection_jitter", "collection_offset", "precision", "period", "delay", "grace"):
        if key in table and not is_telegraf_duration(table[key]):
            report.add(at(path, key), f'{table[key]!r} is not a duration; write it as a string like "10s" or "1m"')
    if (kind, name) == ("outputs", "influxdb_v2"):
        check_telegraf_urls(report, path, table)
        for key, what in (("token", "API token"), ("organization", "organization"), ("bucket", "bucket metrics are written to")):
            if is_blank(table.get(key)) and not (key == "bucket" and not is_blank(table.get("bucket_tag"))):
                report.add(at(path, key), f"is required; set the InfluxDB {what}")
    elif (kind, name) == ("outputs", "influxdb"):
        check_telegraf_urls(report, path, table)
    elif (kind, name) == ("inputs", "prometheus"):
        sources = ("urls", "kubernetes_services", "monitor_kubernetes_pods")
        discovery = any(isinstance(table.get(key), dict) and table[key].get("enabled") for key in ("consul", "http_service_discovery"))
        if not any(table.get(key) for key in sources) and not discovery:
            report.add(path, "scrapes nothing; set urls (or kubernetes_services, monitor_kubernetes_pods, consul or http_service_discovery)")
        if "urls" in table:
            check_telegraf_urls(report, path, table)
        version = table.get("metric_version")
        if version is not None and version not in (1, 2):
            report.add(at(path, "metric_version"), f"{version!r} is not a metric version; use 1 or 2")
    elif (kind, name) == ("inputs", "docker"):
        endpoint = table.get("endpoint")
        if is_blank(endpoint):
            report.add(at(path, "endpoint"), 'is required here; set the Docker API, for example "unix:///var/run/docker.sock" or "ENV"')
        elif not is_telegraf_placeholder(endpoint) and endpoint != "ENV" and not re.match(r"^(unix|tcp|npipe|https?)://", str(endpoint)):
            report.add(at(path, "endpoint"), f"{endpoint!r} is not a Docker endpoint; use unix:///path, tcp://host:port or ENV")


def check_telegraf_urls(report, path, table):
    urls = table.get("urls")
    if is_telegraf_placeholder(urls):
        return
    if not isinstance(urls, list) or not urls:
        report.add(at(path, "urls"), f'must be a non-empty list of URLs, like ["http://127.0.0.1:8086"], not {urls!r}')
        return
    for index, url in enumerate(urls):
        if not isinstance(url, str) or not (is_telegraf_placeholder(url) or re.match(r"^(https?|udp|udp4|udp6|unix)://\S+", url)):
            report.add(at(at(path, "urls"), index), f'{url!r} is not a URL; write it like "http://host:8086"')


# A rendered tree


def validate_tree(
    root: str | Path, telegraf_conf: str | Path | None = None, required_labels: list[str] | None = None, path_map: dict[str, str] | None = None
) -> dict:
    """Checks a rendered directory laid out like Grafana's (root/provisioning/...) and optionally a telegraf.conf.

    path_map maps directories as Grafana sees them (a dashboard provider's options.path, e.g. inside its container) to
    where they are here. Returns {"checked": [file names, relative to root where possible], "errors": ["<file>: ..."]}.
    """
    if YAML_IMPORT_ERROR:
        return {"checked": [], "errors": ["PyYAML is not available, so the provisioning files cannot be read; install PyYAML"]}
    tree = Tree(Path(root), path_map or {})
    provisioning = tree.root / "provisioning"
    if not provisioning.is_dir():
        tree.errors.append(f"{tree.root}: has no provisioning/ directory; point grafana_dir at the directory that holds provisioning/")
    else:
        tree.check_datasources(provisioning / "datasources")
        tree.check_dashboards(provisioning / "dashboards")
        tree.check_alerting(provisioning / "alerting", required_labels)
    if telegraf_conf is not None:
        tree.check_telegraf(Path(telegraf_conf))
    return {"checked": tree.checked, "errors": tree.errors}


class Tree:
    """The state of one validate_tree walk: what was checked, what failed, and what files define for the others."""

    def __init__(self, root, path_map):
        self.root = root
        self.path_map = path_map
        self.checked = []
        self.errors = []
        self.datasource_uids = set()
        self.datasource_names = set()

    def name(self, path):
        try:
            return str(path.relative_to(self.root))
        except ValueError:
            return str(path)

    def record(self, path, errors):
        name = self.name(path)
        self.checked.append(name)
        seen = set()
        for error in errors:
            if error not in seen:
                seen.add(error)
                self.errors.append(f"{name}: {error}")

    def load_yaml(self, path):
        try:
            return yaml.safe_load(path.read_text(encoding="utf-8")), None
        except (OSError, UnicodeDecodeError) as error:
            return None, f"(file): cannot be read: {error}"
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
            problem = getattr(error, "problem", None) or str(error)
            return None, f"(YAML): {where}{' '.join(str(problem).split())}; fix the syntax"

    @staticmethod
    def files(directory, suffixes):
        if not directory.is_dir():
            return []
        return sorted(p for p in directory.iterdir() if p.is_file() and p.suffix.lower() in suffixes)

    def check_datasources(self, directory):
        defaults = {}
        for path in self.files(directory, (".yaml", ".yml")):
            doc, problem = self.load_yaml(path)
            errors = [problem] if problem else validate_datasources(doc)
            if isinstance(doc, dict) and isinstance(doc.get("datasources"), list):
                for index, source in enumerate(doc["datasources"]):
                    if not isinstance(source, dict):
                        continue
                    if isinstance(source.get("uid"), str) and source["uid"]:
                        self.datasource_uids.add(source["uid"])
                    if isinstance(source.get("name"), str) and source["name"]:
                        self.datasource_names.add(source["name"])
                    org = org_of(source)
                    if source.get("isDefault") is True:
                        first = defaults.setdefault(org, (path, index))
                        if first[0] != path:
                            errors.append(
                                f"datasources[{index}].isDefault: org {org} already has a default data source in {self.name(first[0])} "
                                f"(datasources[{first[1]}]); Grafana allows one per org across all files, set isDefault: false on all but one"
                            )
            self.record(path, errors)

    def local_path(self, container_path):
        """Where a directory Grafana reads (a provider's options.path) is here, through path_map."""
        best = None
        for source, target in self.path_map.items():
            prefix = source.rstrip("/")
            if container_path == prefix or container_path.startswith(prefix + "/"):
                if best is None or len(prefix) > len(best[0]):
                    best = (prefix, target)
        if best:
            return Path(best[1]) / container_path[len(best[0]) :].lstrip("/")
        candidate = Path(container_path)
        return candidate if candidate.is_absolute() else self.root / candidate

    def check_dashboards(self, directory):
        dashboard_uids = {}
        for path in self.files(directory, (".yaml", ".yml")):
            doc, problem = self.load_yaml(path)
            errors = [problem] if problem else validate_dashboard_providers(doc)
            dashboards = []
            if isinstance(doc, dict) and isinstance(doc.get("providers"), list):
                for index, provider in enumerate(doc["providers"]):
                    options = provider.get("options") if isinstance(provider, dict) else None
                    target = options.get("path") if isinstance(options, dict) else None
                    if not isinstance(target, str) or not target or is_env_reference(target):
                        continue
                    local = self.local_path(target)
                    if local.is_file():
                        dashboards.append(local)
                    elif local.is_dir():
                        dashboards.extend(sorted(p for p in local.rglob("*.json") if p.is_file()))
                    else:
                        errors.append(
                            f"providers[{index}].options.path: {target!r} is {local} here, which does not exist; "
                            "render the dashboards there or map the path with path_map"
                        )
            self.record(path, errors)
            for dashboard in dashboards:
                self.check_dashboard(dashboard, dashboard_uids)

    def check_dashboard(self, path, dashboard_uids):
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as error:
            self.record(path, [f"(file): cannot be read: {error}"])
            return
        except json.JSONDecodeError as error:
            self.record(path, [f"(JSON): {error}; fix the syntax"])
            return
        errors = validate_dashboard(doc, self.datasource_uids, self.datasource_names)
        uid = doc.get("uid") if isinstance(doc, dict) else None
        if isinstance(uid, str) and uid:
            if uid in dashboard_uids and dashboard_uids[uid] != path:
                errors.append(f"uid: {uid!r} is also the uid of {self.name(dashboard_uids[uid])}; give every dashboard its own uid")
            dashboard_uids.setdefault(uid, path)
        self.record(path, errors)

    def check_alerting(self, directory, required_labels):
        documents = []
        receivers = {GRAFANA_DEFAULT_RECEIVER}
        mute_times = set()
        for path in self.files(directory, (".yaml", ".yml", ".json")):
            doc, problem = self.load_yaml(path)
            documents.append((path, doc, problem))
            if isinstance(doc, dict):
                for point in doc.get("contactPoints") or []:
                    if isinstance(point, dict) and isinstance(point.get("name"), str):
                        receivers.add(point["name"])
                for timing in doc.get("muteTimes") or []:
                    if isinstance(timing, dict) and isinstance(timing.get("name"), str):
                        mute_times.add(timing["name"])
        rule_uids = {}
        for path, doc, problem in documents:
            if problem:
                self.record(path, [problem])
                continue
            if not isinstance(doc, dict):
                self.record(path, ["(document): must be a mapping with apiVersion: 1 and alerting resources; the file is empty or not YAML mappings"])
                continue
            report = Report()
            check_known_keys(report, "", doc, ALERTING_FILE_KEYS, "alerting file")
            check_api_version(report, doc)
            errors = report.errors
            errors += validate_alert_rules(doc, self.datasource_uids, required_labels)
            errors += validate_contact_points(doc)
            errors += validate_policies(doc, receivers, mute_times)
            errors += validate_alerting_extras(doc)
            for group_index, group in enumerate(doc.get("groups") or []):
                rules = group.get("rules") if isinstance(group, dict) else None
                for rule_index, rule in enumerate(rules if isinstance(rules, list) else []):
                    uid = rule.get("uid") if isinstance(rule, dict) else None
                    if isinstance(uid, str) and uid:
                        here = f"groups[{group_index}].rules[{rule_index}]"
                        first = rule_uids.setdefault(uid, (path, here))
                        if first[0] != path:
                            errors.append(f"{here}.uid: {uid!r} is also the uid of a rule in {self.name(first[0])} ({first[1]}); every rule needs its own uid")
            self.record(path, errors)

    def check_telegraf(self, path):
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            self.record(path, [f"(file): cannot be read: {error}; check telegraf_conf"])
            return
        self.record(path, validate_telegraf(text))
