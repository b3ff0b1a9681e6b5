#!/usr/bin/python
# Copyright (c) mlfleet.serving maintainers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: audit_event
short_description: Record a provisioning or scaling decision in the audit trail
version_added: 0.1.0
description:
  - Writes one audit event - what was decided, by which source, why, and the numbers behind it - as a line of a JSON-lines
    log on the control host and, when O(influxdb) is set, as a point of the measurement C(mlfleet_audit) in InfluxDB 1.x or 2.x.
  - Every provisioning and scaling decision of the collection is recorded this way, including the decision not to act.
  - The log line is written first. When InfluxDB does not take the event, it waits in a spool file next to the log
    (O(log_path) with C(.pending) appended) and the module only warns, unless O(influxdb_required=true). Every later
    run with O(influxdb) set writes the spooled events first, oldest first, and removes them from the spool once InfluxDB
    has accepted them.
  - An event whose O(event_id) is already in the log is not written again, so a re-run with the same id changes nothing.
  - In InfluxDB, the tags are C(kind), C(action), C(decision), C(source), C(service) and C(cluster) (an empty one is left out);
    the fields are C(event_id), C(reason) and C(values) (O(values) as a JSON string), each entry of O(fields) as a float,
    and each number in O(values) as a float field named C(value_) followed by its key, so dashboards can plot it.
author:
  - mlfleet.serving maintainers (@mlfleet)
extends_documentation_fragment:
  - mlfleet.serving.attributes
attributes:
  check_mode:
    support: full
    details:
      - Nothing is written, neither to the log, the spool nor InfluxDB; RV(event) is the event that would be written.
  diff_mode:
    support: none
  idempotent:
    support: full
    details:
      - Only with the same O(event_id); without it, every run records a new event.
options:
  kind:
    description:
      - What kind of operation the decision belongs to, for example V(provision), V(scale) or V(teardown).
    type: str
    required: true
  action:
    description:
      - The action decided on, for example V(scale_out), V(scale_in), V(scale_replicas) or V(site).
    type: str
    required: true
  decision:
    description:
      - V(acted) - the action was carried out; V(not_acted) - it was decided not to act; V(failed) - the action failed;
        V(started) - the action begins (a later event tells how it ended).
    type: str
    required: true
    choices: [acted, not_acted, failed, started]
  source:
    description:
      - What asked for the decision, for example V(serving_pressure), V(grafana_alerts) or V(site).
    type: str
    default: playbook
  service:
    description:
      - The Swarm service concerned; empty when the decision is about the cluster as a whole.
    type: str
    default: ''
  cluster:
    description:
      - The cluster the decision is about.
    type: str
    default: mlfleet
  reason:
    description:
      - Why, in a sentence.
    type: str
    default: ''
  values:
    description:
      - The numbers (or other data) that led to the decision, for example the latency and queue length that triggered a scale-out.
      - Logged as they are; each number also becomes a field of the InfluxDB point.
    type: dict
    default: {}
  fields:
    description:
      - Numbers that describe the outcome, for example C(replicas_before), C(replicas_after), C(nodes_before) and C(nodes_after).
      - Each value must be a number (a string holding one is converted). A key must not be a tag name, V(event_id), V(reason),
        V(values) or V(time), nor start with V(value_).
    type: dict
    default: {}
  event_id:
    description:
      - Identifies the event. An event whose id is already in the log is not written again, and the module reports no change.
      - Defaults to a random UUID, so that every run records a new event; set it, for example from the run's id and the step,
        to make re-runs idempotent.
    type: str
  time:
    description:
      - When the decision was made, as an RFC 3339 timestamp with an offset such as V(2024-05-01T12:00:00Z). Defaults to now.
      - Logged in UTC with microseconds (nanoseconds when given).
    type: str
  log_path:
    description:
      - The JSON-lines log, one event a line with the keys C(time), C(event_id), C(kind), C(action), C(decision), C(source),
        C(service), C(cluster), C(reason), C(values) and C(fields).
      - Missing directories are created (mode 0700) and a new log gets mode 0600. Lines are appended under an exclusive
        C(flock) and synced to disk, so concurrent runs do not interleave.
      - The spool of events InfluxDB has not taken yet is this path with C(.pending) appended.
    type: path
    required: true
  influxdb:
    description:
      - The InfluxDB to write the event to. Without it, only the log is written.
    type: dict
    suboptions:
      url:
        description:
          - Base URL of InfluxDB, for example V(http://127.0.0.1:8086).
        type: str
        required: true
      api_version:
        description:
          - V(1) writes line protocol to InfluxDB 1.x's C(/write) endpoint with O(influxdb.database) and basic authentication.
          - V(2) writes to C(/api/v2/write) with O(influxdb.org), O(influxdb.bucket) and O(influxdb.token), through the
            C(influxdb-client) library.
        type: int
        choices: [1, 2]
        default: 2
      database:
        description:
          - The database to write to. Required with O(influxdb.api_version=1).
        type: str
      retention_policy:
        description:
          - The retention policy to write to, with O(influxdb.api_version=1). Defaults to the database's default policy.
        type: str
      bucket:
        description:
          - The bucket to write to. Required with O(influxdb.api_version=2).
        type: str
      org:
        description:
          - The organization of O(influxdb.bucket). Required with O(influxdb.api_version=2).
        type: str
      token:
        description:
          - An API token with write permission on O(influxdb.bucket). Required with O(influxdb.api_version=2).
          - If not set, the environment variable E(INFLUX_TOKEN) is used.
        type: str
      username:
        description:
          - User for basic authentication with O(influxdb.api_version=1); leave out when InfluxDB runs without authentication.
          - If not set, the environment variable E(INFLUX_USERNAME) is used.
        type: str
      password:
        description:
          - Password of O(influxdb.username).
          - If not set, the environment variable E(INFLUX_PASSWORD) is used.
        type: str
      ca_path:
        description:
          - A PEM file of the certificate authorities to trust for an V(https://) URL.
        type: path
      validate_certs:
        description:
          - Whether to verify the server's TLS certificate. Set to V(false) only for a lab.
        type: bool
        default: true
      timeout:
        description:
          - Seconds to wait for InfluxDB to answer each write.
        type: float
        default: 5
  influxdb_required:
    description:
      - Fail when InfluxDB does not take the event, with a message that names the URL and the HTTP status or error.
        The event is still logged and spooled, so a later run writes it.
      - When V(false), the module warns and returns RV(influxdb_written=false).
    type: bool
    default: false
notes:
  - The module runs on the control host; call it with C(delegate_to=localhost) and C(run_once=true).
  - Tag values and the keys of O(fields) and of the numbers in O(values) must not contain line breaks, nor a backslash at their
    end or before a comma, equals sign or space, because InfluxDB's line protocol cannot store those exactly. Spaces, commas,
    equals signs and quotes are escaped; O(reason) and the JSON of O(values) may contain anything.
  - An event that InfluxDB refuses for its content (HTTP 400, for example a field type conflict with other writers of
    C(mlfleet_audit)) stays in the spool and holds back the later events until the cause is fixed; the warning quotes InfluxDB.
  - Secrets never appear in messages. User information in O(influxdb.url) is left out of messages too, but pass credentials
    as O(influxdb.username) and O(influxdb.password) or O(influxdb.token), which are kept out of the logs.
requirements:
  - requests (with O(influxdb.api_version=1))
  - influxdb-client >= 1.40 (with O(influxdb.api_version=2))
seealso:
  - name: InfluxDB line protocol
    description: The format of the points written.
    link: https://docs.influxdata.com/influxdb/v1/write_protocols/line_protocol_reference/
"""

EXAMPLES = r"""
- name: Record a scale-out of the resnet18 service
  mlfleet.serving.audit_event:
    kind: scale
    action: scale_replicas
    decision: acted
    source: serving_pressure
    service: resnet18
    reason: p95 latency above 250 ms for 5 minutes
    values:
      p95_latency_ms: 312.5
      queue_length: 41
    fields:
      replicas_before: 2
      replicas_after: 4
    event_id: "{{ run_id }}-scale-resnet18"
    log_path: "{{ lookup('ansible.builtin.env', 'HOME') }}/.local/state/mlfleet/audit.jsonl"
    influxdb:
      url: https://influxdb.example.internal:8086
      org: mlfleet
      bucket: audit
      token: "{{ influxdb_audit_token }}"
  delegate_to: localhost
  run_once: true

- name: Record that the cluster was not scaled in, to InfluxDB 1.x
  mlfleet.serving.audit_event:
    kind: scale
    action: scale_in
    decision: not_acted
    source: grafana_alerts
    reason: the idle worker still runs a replica of every service
    fields:
      nodes_before: 3
      nodes_after: 3
    log_path: /var/log/mlfleet/audit.jsonl
    influxdb:
      api_version: 1
      url: http://127.0.0.1:8086
      database: mlfleet
      username: audit
      password: "{{ influxdb_audit_password }}"
    influxdb_required: true
  delegate_to: localhost
  run_once: true
"""

RETURN = r"""
event:
  description:
    - The event as it is logged, or would be in check mode. When O(event_id) was already logged, the logged event.
    - In a template, read its C(values) as C(event['values']), since C(event.values) is the dict's method.
  returned: success
  type: dict
  contains:
    time:
      description: When the decision was made, RFC 3339 in UTC.
      type: str
    event_id:
      description: The id of the event.
      type: str
    kind:
      description: O(kind).
      type: str
    action:
      description: O(action).
      type: str
    decision:
      description: O(decision).
      type: str
    source:
      description: O(source).
      type: str
    service:
      description: O(service).
      type: str
    cluster:
      description: O(cluster).
      type: str
    reason:
      description: O(reason).
      type: str
    values:
      description: O(values).
      type: dict
    fields:
      description: O(fields), each value a number.
      type: dict
  sample:
    time: "2024-05-01T12:00:00.123456Z"
    event_id: 3f1c2a9e-6a55-4f4e-9d43-0c2b4b1f2e11
    kind: scale
    action: scale_replicas
    decision: acted
    source: serving_pressure
    service: resnet18
    cluster: mlfleet
    reason: p95 latency above 250 ms for 5 minutes
    values: {p95_latency_ms: 312.5, queue_length: 41}
    fields: {replicas_before: 2, replicas_after: 4}
influxdb_written:
  description:
    - Whether InfluxDB accepted the event in this run, directly or from the spool.
    - V(false) without O(influxdb), in check mode, and when O(event_id) was logged before and is not in the spool.
  returned: success
  type: bool
  sample: true
pending:
  description: The number of events left in the spool, waiting for InfluxDB.
  returned: success, and when O(influxdb_required=true) fails the run
  type: int
  sample: 0
flushed:
  description: The number of events from earlier runs that this run took from the spool and wrote to InfluxDB.
  returned: success
  type: int
  sample: 0
"""

from ansible.module_utils.basic import AnsibleModule, missing_required_lib

from ansible_collections.mlfleet.serving.plugins.module_utils._audit import (
    DECISIONS,
    AuditError,
    AuditLog,
    build_event,
    deliver,
    influxdb_argument_spec,
    influxdb_problem,
    make_writer,
    missing_library,
)


def argument_spec():
    return dict(
        kind=dict(type="str", required=True),
        action=dict(type="str", required=True),
        decision=dict(type="str", required=True, choices=list(DECISIONS)),
        source=dict(type="str", default="playbook"),
        service=dict(type="str", default=""),
        cluster=dict(type="str", default="mlfleet"),
        reason=dict(type="str", default=""),
        values=dict(type="dict", default={}),
        fields=dict(type="dict", default={}),
        event_id=dict(type="str"),
        time=dict(type="str"),
        log_path=dict(type="path", required=True),
        influxdb=dict(type="dict", options=influxdb_argument_spec()),
        influxdb_required=dict(type="bool", default=False),
    )


def event_from_params(params):
    return build_event(
        params["kind"],
        params["action"],
        params["decision"],
        source=params["source"],
        service=params["service"],
        cluster=params["cluster"],
        reason=params["reason"],
        values=params["values"],
        fields=params["fields"],
        event_id=params["event_id"],
        when=params["time"],
    )


def predict(log, event, influxdb):
    """Check mode: what a run would change, from what is on disk."""
    logged = log.find(event["event_id"])
    pending = log.count_pending()
    changed = logged is None or bool(influxdb and pending)
    return dict(changed=changed, event=logged or event, influxdb_written=False, pending=pending, flushed=0)


def record(log, event, writer):
    """Log the event unless its id is logged, then send the spool and the new event to InfluxDB (when ``writer`` is set)."""
    with log.locked() as handle:
        logged = log.find(event["event_id"], handle)
        if logged is None:
            log.append(handle, event)
        if writer is None:
            return dict(changed=logged is None, event=logged or event, influxdb_written=False, pending=log.count_pending(), flushed=0), None
        delivery = deliver(log, writer, [] if logged else [event])
    written = event["event_id"] in delivery.written
    flushed = len(delivery.written) - (1 if written and logged is None else 0)
    result = dict(changed=logged is None or flushed > 0, event=logged or event, influxdb_written=written, pending=delivery.pending, flushed=flushed)
    return result, delivery


def main():
    module = AnsibleModule(argument_spec=argument_spec(), supports_check_mode=True)
    params = module.params
    influxdb = params["influxdb"]
    if influxdb:
        problem = influxdb_problem(influxdb)
        if problem:
            module.fail_json(msg=problem)
        library = missing_library(influxdb)
        if library:
            module.fail_json(msg=missing_required_lib(library[0]), exception=library[1])
    log = AuditLog(params["log_path"])
    try:
        event = event_from_params(params)
        if module.check_mode:
            module.exit_json(**predict(log, event, influxdb))
        writer = make_writer(influxdb) if influxdb else None
        try:
            result, delivery = record(log, event, writer)
        finally:
            if writer is not None:
                writer.close()
    except AuditError as error:
        module.fail_json(msg=str(error))
    if delivery and delivery.dropped:
        module.warn(f"dropped {delivery.dropped} unreadable lines from the spool {log.spool_path}; their events are in the log {log.path}")
    if delivery and delivery.failure:
        held = "1 event" if result["pending"] == 1 else f"{result['pending']} events"
        where = f"The spool {log.spool_path} holds {held}, sent to InfluxDB first at the next run with influxdb set"
        if params["influxdb_required"]:
            module.fail_json(msg=f"{delivery.failure}. The event is in the log {log.path}. {where}", **result)
        module.warn(f"{delivery.failure}. {where}")
    module.exit_json(**result)


if __name__ == "__main__":
    main()
