# Copyright (c) mlfleet.serving maintainers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The audit trail: every provisioning and scaling decision as one event, in a JSON-lines log and in InfluxDB.

The log on the control host is written first and is the record; InfluxDB gets the same event as a point
of the measurement ``mlfleet_audit`` so dashboards can show it. When InfluxDB does not take an event, the
event waits in a spool next to the log (``<log>.pending``) and goes out, oldest first, before the next
event. Both files change only under an exclusive lock on the log, so concurrent runs neither interleave
lines nor send the spool twice.

InfluxDB 1.x takes line protocol written here (``encode_line``); InfluxDB 2.x gets the same tags and
fields through the influxdb-client library. No message ever contains a token or password.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import math
import os
import re
import time
import traceback
import uuid
from contextlib import contextmanager
from urllib.parse import urlsplit, urlunsplit

from ansible.module_utils.basic import env_fallback

try:
    import requests
except ImportError:
    REQUESTS_IMPORT_ERROR = traceback.format_exc()
else:
    REQUESTS_IMPORT_ERROR = None

try:
    import urllib3
    from influxdb_client import InfluxDBClient, Point, WritePrecision
    from influxdb_client.client.write_api import SYNCHRONOUS
    from influxdb_client.rest import ApiException
except ImportError:
    INFLUXDB_CLIENT_IMPORT_ERROR = traceback.format_exc()
else:
    INFLUXDB_CLIENT_IMPORT_ERROR = None

MEASUREMENT = "mlfleet_audit"
DECISIONS = ("acted", "not_acted", "failed", "started")
TAG_NAMES = ("kind", "action", "decision", "source", "service", "cluster")
# The order of the keys of an event, in the log and in the module's result.
EVENT_KEYS = ("time", "event_id") + TAG_NAMES + ("reason", "values", "fields")
STRING_FIELDS = ("event_id", "reason", "values")
VALUE_FIELD_PREFIX = "value_"
# Points per write request when the spool is sent.
WRITE_BATCH = 500

TOKEN_ENV = "INFLUX_TOKEN"
USERNAME_ENV = "INFLUX_USERNAME"
PASSWORD_ENV = "INFLUX_PASSWORD"

RFC3339 = re.compile(r"^(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?([Zz]|[+-]\d{2}:\d{2})$")
EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)

# Line protocol: what a backslash escapes in measurements, and in tag keys, tag values and field keys.
MEASUREMENT_SPECIALS = ", "
KEY_SPECIALS = ",= "


def influxdb_argument_spec():
    """The suboptions of the influxdb option (documented in the audit_event module)."""
    return dict(
        url=dict(type="str", required=True),
        api_version=dict(type="int", choices=[1, 2], default=2),
        database=dict(type="str"),
        retention_policy=dict(type="str"),
        bucket=dict(type="str"),
        org=dict(type="str"),
        token=dict(type="str", no_log=True, fallback=(env_fallback, [TOKEN_ENV])),
        username=dict(type="str", fallback=(env_fallback, [USERNAME_ENV])),
        password=dict(type="str", no_log=True, fallback=(env_fallback, [PASSWORD_ENV])),
        ca_path=dict(type="path"),
        validate_certs=dict(type="bool", default=True),
        timeout=dict(type="float", default=5),
    )


class AuditError(Exception):
    """An event cannot be built or recorded; the message names the option or file and what to change."""


class InfluxWriteError(Exception):
    """InfluxDB did not accept a write. The message names the URL and the HTTP status or error, never a secret."""

    def __init__(self, message, status=None):
        super().__init__(message)
        self.status = status


# Time


def parse_time(text):
    """Nanoseconds since the epoch of an RFC 3339 timestamp such as 2024-05-01T12:00:00.5Z."""
    match = RFC3339.match(text.strip())
    if not match:
        raise AuditError(f"time {text!r} is not an RFC 3339 timestamp with an offset, such as 2024-05-01T12:00:00Z or 2024-05-01T14:00:00.25+02:00")
    year, month, day, hour, minute, second, fraction, offset = match.groups()
    if offset in ("Z", "z"):
        zone = datetime.UTC
    else:
        sign = -1 if offset[0] == "-" else 1
        zone = datetime.timezone(sign * datetime.timedelta(hours=int(offset[1:3]), minutes=int(offset[4:6])))
    try:
        moment = datetime.datetime(int(year), int(month), int(day), int(hour), int(minute), int(second), tzinfo=zone)
    except ValueError as error:
        raise AuditError(f"time {text!r} is not a valid date and time: {error}") from None
    seconds = (moment - EPOCH) // datetime.timedelta(seconds=1)
    return seconds * 10**9 + int((fraction or "0").ljust(9, "0"))


def format_time(nanoseconds):
    """RFC 3339 in UTC, with microseconds, or nanoseconds when the time has them."""
    seconds, fraction = divmod(nanoseconds, 10**9)
    stamp = (EPOCH + datetime.timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{stamp}.{fraction // 1000:06d}Z" if fraction % 1000 == 0 else f"{stamp}.{fraction:09d}Z"


# Events


def check_name(what, text):
    """Raise AuditError when InfluxDB cannot store ``text`` exactly as a tag key, tag value or field key.

    Line protocol ends a point at a line break and has no escape for one there. A backslash that ends the
    text or stands before a comma, equals sign or space cannot be written so that InfluxDB 1.x keeps it (it
    refuses a tag value ending in a backslash); a backslash anywhere else is kept as it is.
    """
    if "\n" in text or "\r" in text:
        raise AuditError(f"{what} {text!r} contains a line break, which InfluxDB cannot store in a tag or field name")
    if text.endswith("\\") or re.search(r"\\[,= ]", text):
        raise AuditError(f"{what} {text!r} has a backslash at its end or before a comma, equals sign or space, which InfluxDB cannot store exactly")


def number(what, value):
    """``value`` as an int or float; numeric strings are converted, as templating may produce them."""
    if isinstance(value, str):
        try:
            value = int(value)
        except ValueError:
            try:
                value = float(value)
            except ValueError:
                raise AuditError(f"{what} must be a number, not {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise AuditError(f"{what} must be a number, not {value!r} ({type(value).__name__})")
    if isinstance(value, float) and not math.isfinite(value):
        raise AuditError(f"{what} must be a finite number, not {value!r}")
    return value


def is_plottable(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def plain(values):
    """``values`` as plain JSON data (string keys), the way it is logged."""
    try:
        return json.loads(json.dumps(values, default=str))
    except ValueError as error:
        raise AuditError(f"values cannot be written as JSON: {error}") from None


def build_event(kind, action, decision, source="playbook", service="", cluster="mlfleet", reason="", values=None, fields=None, event_id=None, when=None):
    """A checked event dict with the keys EVENT_KEYS. ``when`` is an RFC 3339 string; None means now."""
    if decision not in DECISIONS:
        raise AuditError(f"decision must be one of {', '.join(DECISIONS)}, not {decision!r}")
    tags = dict(kind=kind, action=action, decision=decision, source=source, service=service, cluster=cluster)
    for name in ("kind", "action"):
        if not tags[name]:
            raise AuditError(f"{name} must not be empty")
    for name, value in tags.items():
        check_name(name, value)
    values = plain(values or {})
    reserved = set(TAG_NAMES) | set(STRING_FIELDS) | {"time"}
    checked_fields = {}
    for key, value in (fields or {}).items():
        key = str(key)
        if not key or key in reserved or key.startswith(VALUE_FIELD_PREFIX):
            raise AuditError(
                f"fields key {key!r} is not allowed: it must not be empty, one of {', '.join(sorted(reserved))}, or start with {VALUE_FIELD_PREFIX}"
            )
        check_name("fields key", key)
        checked_fields[key] = number(f"fields[{key!r}]", value)
    for key, value in values.items():
        if is_plottable(value):
            check_name("values key", key)
    if event_id is not None and not event_id.strip():
        raise AuditError("event_id must not be empty; leave it out to get a random one")
    nanoseconds = parse_time(when) if when else time.time_ns()
    event = dict(
        time=format_time(nanoseconds),
        event_id=event_id or str(uuid.uuid4()),
        reason=reason,
        values=values,
        fields=checked_fields,
        **tags,
    )
    return {key: event[key] for key in EVENT_KEYS}


def point_parts(event):
    """The tags, fields and nanosecond timestamp of an event's point in InfluxDB."""
    tags = {name: event[name] for name in TAG_NAMES}
    fields = {
        "event_id": event["event_id"],
        "reason": event["reason"],
        "values": json.dumps(event["values"], sort_keys=True, separators=(",", ":"), ensure_ascii=False),
    }
    fields.update((key, float(value)) for key, value in event["fields"].items())
    fields.update((VALUE_FIELD_PREFIX + key, float(value)) for key, value in event["values"].items() if is_plottable(value))
    return tags, fields, parse_time(event["time"])


# Line protocol (InfluxDB 1.x)


def escape(text, specials):
    """Backslash-escape each character of ``specials``; reject what line protocol cannot carry (see check_name)."""
    check_name("name", text)
    return "".join("\\" + character if character in specials else character for character in text)


def escape_string(text):
    """A string field value in double quotes. Line breaks need no escape inside the quotes."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def format_field_value(value):
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return f"{value}i"
    if isinstance(value, float):
        text = repr(value)
        return text[:-2] if text.endswith(".0") else text
    return escape_string(str(value))


def encode_line(measurement, tags, fields, nanoseconds=None):
    """One point in InfluxDB line protocol, tags and fields sorted by key.

    Empty tag values and non-finite floats are left out, as line protocol has no way to write them; a
    point needs at least one field. Raises AuditError for names line protocol cannot carry exactly.
    """
    parts = [escape(measurement, MEASUREMENT_SPECIALS)]
    parts.extend(f"{escape(key, KEY_SPECIALS)}={escape(value, KEY_SPECIALS)}" for key, value in sorted(tags.items()) if value)
    written = [
        f"{escape(key, KEY_SPECIALS)}={format_field_value(value)}"
        for key, value in sorted(fields.items())
        if value is not None and not (isinstance(value, float) and not math.isfinite(value))
    ]
    if not written:
        raise AuditError(f"a point of {measurement} needs at least one field")
    line = ",".join(parts) + " " + ",".join(written)
    return line if nanoseconds is None else f"{line} {nanoseconds}"


def event_line(event):
    tags, fields, nanoseconds = point_parts(event)
    return encode_line(MEASUREMENT, tags, fields, nanoseconds)


# Files


def dump_event(event):
    return (json.dumps(event, ensure_ascii=False) + "\n").encode("utf-8")


def read_events(handle):
    """The events of a JSON-lines file from its start; lines that are not a JSON object are counted, not returned."""
    handle.seek(0)
    events, broken = [], 0
    for raw in handle:
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except ValueError:
            broken += 1
            continue
        if isinstance(record, dict):
            events.append(record)
        else:
            broken += 1
    return events, broken


def fsync_directory(path):
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


class AuditLog:
    """The JSON-lines log, one event a line, and its spool ``<path>.pending`` of events InfluxDB has not taken yet."""

    def __init__(self, path):
        self.path = path
        self.spool_path = path + ".pending"

    def _open(self, create):
        directory = os.path.dirname(self.path) or "."
        try:
            if create:
                os.makedirs(directory, mode=0o700, exist_ok=True)
                descriptor = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
            else:
                descriptor = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        except OSError as error:
            raise AuditError(f"cannot open the audit log {self.path}: {error.strerror}; check log_path and its directory's permissions") from None
        return os.fdopen(descriptor, "a+b" if create else "rb")

    @contextmanager
    def locked(self):
        """The log opened for appending (created with mode 0600), under an exclusive lock."""
        with self._open(create=True) as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            yield handle

    def find(self, event_id, handle=None):
        """The logged event with this id, or None. Without ``handle``, reads under a shared lock."""
        if handle is None:
            reader = self._open(create=False)
            if reader is None:
                return None
            with reader:
                fcntl.flock(reader.fileno(), fcntl.LOCK_SH)
                return self.find(event_id, reader)
        needle = json.dumps(event_id, ensure_ascii=False).encode("utf-8")
        handle.seek(0)
        for raw in handle:
            if needle in raw:
                try:
                    record = json.loads(raw)
                except ValueError:
                    continue
                if isinstance(record, dict) and record.get("event_id") == event_id:
                    return record
        return None

    @staticmethod
    def append(handle, event):
        """Append one line and fsync. A line cut short by a crash is closed first, so the new line stands alone."""
        handle.seek(0, os.SEEK_END)
        if handle.tell():
            handle.seek(-1, os.SEEK_END)
            if handle.read(1) != b"\n":
                handle.write(b"\n")
        handle.write(dump_event(event))
        handle.flush()
        os.fsync(handle.fileno())

    def pending(self):
        """The spooled events, oldest first, and how many spool lines were unreadable. Call under the log's lock."""
        try:
            with open(self.spool_path, "rb") as handle:
                return read_events(handle)
        except FileNotFoundError:
            return [], 0
        except OSError as error:
            raise AuditError(f"cannot read the spool {self.spool_path}: {error.strerror}") from None

    def count_pending(self):
        return len(self.pending()[0])

    def replace_pending(self, events):
        """Make the spool hold exactly ``events`` (atomically); an empty spool is removed. Call under the log's lock."""
        try:
            if not events:
                if os.path.exists(self.spool_path):
                    os.unlink(self.spool_path)
                return
            temporary = f"{self.spool_path}.{os.getpid()}.tmp"
            descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(descriptor, "wb") as handle:
                handle.writelines(dump_event(event) for event in events)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, self.spool_path)
            fsync_directory(os.path.dirname(self.spool_path) or ".")
        except OSError as error:
            raise AuditError(f"cannot write the spool {self.spool_path}: {error.strerror}") from None


# InfluxDB


def display_url(url):
    """The URL without user information, for messages."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


def explain_status(status):
    if status in (401, 403):
        return "; check the credentials (username and password for InfluxDB 1.x, token for 2.x) and their write permission"
    if status == 404:
        return "; check that the database (1.x) or the org and bucket (2.x) exist"
    return ""


def error_detail(body):
    """The error InfluxDB put in a response body: {"error": ...} (1.x) or {"code", "message"} (2.x)."""
    try:
        document = json.loads(body)
    except (TypeError, ValueError):
        return (body or "").strip()[:300] if isinstance(body, str) else ""
    if isinstance(document, dict):
        return str(document.get("error") or document.get("message") or document.get("code") or "").strip()[:300]
    return str(document)[:300]


def connection_problem(error):
    """The innermost reason of a connection error, without object addresses."""
    seen = set()
    while id(error) not in seen:
        seen.add(id(error))
        inner = getattr(error, "reason", None)
        if inner is None and error.args and isinstance(error.args[0], BaseException):
            inner = error.args[0]
        if not isinstance(inner, BaseException):
            break
        error = inner
    return re.sub(r"<[^>]* at 0x[0-9a-f]+>:?\s*", "", str(error)).strip() or type(error).__name__


class InfluxV1Writer:
    """Writes events as line protocol to InfluxDB 1.x's /write, with basic authentication."""

    def __init__(self, url, database, retention_policy=None, username=None, password=None, ca_path=None, validate_certs=True, timeout=5):
        self.url = display_url(url)
        self._write_url = url.rstrip("/") + "/write"
        self._params = {"db": database, "precision": "ns"}
        if retention_policy:
            self._params["rp"] = retention_policy
        self._auth = (username, password or "") if username else None
        self._verify = (ca_path or True) if validate_certs else False
        self._timeout = timeout
        self._session = requests.Session()

    def write(self, events):
        body = "\n".join(event_line(event) for event in events).encode("utf-8")
        try:
            response = self._session.post(self._write_url, params=self._params, data=body, auth=self._auth, timeout=self._timeout, verify=self._verify)
        except requests.exceptions.Timeout:
            raise InfluxWriteError(f"InfluxDB at {self.url} did not answer within {self._timeout} s") from None
        except requests.exceptions.RequestException as error:
            raise InfluxWriteError(f"InfluxDB at {self.url} is unreachable: {connection_problem(error)}") from None
        if not 200 <= response.status_code < 300:
            detail = error_detail(response.text)
            raise InfluxWriteError(
                f"InfluxDB at {self.url} refused the write to database {self._params['db']}: HTTP {response.status_code}"
                + (f" ({detail})" if detail else "")
                + explain_status(response.status_code),
                status=response.status_code,
            )

    def close(self):
        self._session.close()


class InfluxV2Writer:
    """Writes events to InfluxDB 2.x with influxdb-client's synchronous write API."""

    def __init__(self, url, org, bucket, token, ca_path=None, validate_certs=True, timeout=5):
        self.url = display_url(url)
        self._org = org
        self._bucket = bucket
        self._timeout = timeout
        self._client = InfluxDBClient(url=url, token=token, org=org, timeout=int(timeout * 1000), verify_ssl=validate_certs, ssl_ca_cert=ca_path)
        self._write_api = self._client.write_api(write_options=SYNCHRONOUS)

    @staticmethod
    def point(event):
        tags, fields, nanoseconds = point_parts(event)
        point = Point(MEASUREMENT)
        for key, value in tags.items():
            point.tag(key, value)
        for key, value in fields.items():
            point.field(key, value)
        return point.time(nanoseconds, WritePrecision.NS)

    def write(self, events):
        points = [self.point(event) for event in events]
        try:
            self._write_api.write(bucket=self._bucket, org=self._org, record=points, write_precision=WritePrecision.NS)
        except ApiException as error:
            detail = error_detail(error.body) or (error.reason or "")
            raise InfluxWriteError(
                f"InfluxDB at {self.url} refused the write to bucket {self._bucket} of org {self._org}: HTTP {error.status}"
                + (f" ({detail})" if detail else "")
                + explain_status(error.status),
                status=error.status,
            ) from None
        except urllib3.exceptions.NewConnectionError as error:
            raise InfluxWriteError(f"InfluxDB at {self.url} is unreachable: {connection_problem(error)}") from None
        except urllib3.exceptions.TimeoutError:
            raise InfluxWriteError(f"InfluxDB at {self.url} did not answer within {self._timeout} s") from None
        except (urllib3.exceptions.HTTPError, OSError) as error:
            raise InfluxWriteError(f"InfluxDB at {self.url} is unreachable: {connection_problem(error)}") from None

    def close(self):
        self._write_api.close()
        self._client.close()


def influxdb_problem(options):
    """A message for influxdb suboptions that do not fit together, or None."""
    if not options["url"].startswith(("http://", "https://")):
        return f"influxdb.url {display_url(options['url'])!r} is not an http:// or https:// URL; write for example http://127.0.0.1:8086"
    if options["api_version"] == 1:
        if not options["database"]:
            return "influxdb.database is required with api_version 1"
        if options["password"] and not options["username"]:
            return "influxdb.password needs influxdb.username"
        return None
    missing = [name for name in ("bucket", "org", "token") if not options[name]]
    if missing:
        return "influxdb." + ", influxdb.".join(missing) + " required with api_version 2"
    return None


def missing_library(options):
    """The name and import traceback of the library the influxdb options need when it is not installed, or None."""
    if options["api_version"] == 1:
        return ("requests", REQUESTS_IMPORT_ERROR) if REQUESTS_IMPORT_ERROR else None
    return ("influxdb-client", INFLUXDB_CLIENT_IMPORT_ERROR) if INFLUXDB_CLIENT_IMPORT_ERROR else None


def make_writer(options):
    if options["api_version"] == 1:
        return InfluxV1Writer(
            options["url"],
            options["database"],
            options["retention_policy"],
            options["username"],
            options["password"],
            options["ca_path"],
            options["validate_certs"],
            options["timeout"],
        )
    return InfluxV2Writer(
        options["url"], options["org"], options["bucket"], options["token"], options["ca_path"], options["validate_certs"], options["timeout"]
    )


class Delivery:
    """What deliver() did: the ids written, the error that stopped it, the events left in the spool, unreadable spool lines dropped."""

    def __init__(self, written, failure, pending, dropped):
        self.written = written
        self.failure = failure
        self.pending = pending
        self.dropped = dropped


def deliver(log, writer, events):
    """Send the spool, oldest first, then ``events``, in batches; keep in the spool what InfluxDB has not taken.

    Unreadable spool lines are dropped: every spooled event is in the log too. Call under the log's lock.
    """
    spooled, unreadable = log.pending()
    queue = spooled + list(events)
    written, failure = 0, None
    for start in range(0, len(queue), WRITE_BATCH):
        batch = queue[start : start + WRITE_BATCH]
        try:
            writer.write(batch)
        except InfluxWriteError as error:
            failure = error
            break
        written += len(batch)
    left = queue[written:]
    if left != spooled or unreadable:
        log.replace_pending(left)
    return Delivery([event.get("event_id") for event in queue[:written]], failure, len(left), unreadable)
