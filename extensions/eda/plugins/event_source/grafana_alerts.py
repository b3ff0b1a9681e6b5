# Copyright (c) mlfleet.serving maintainers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""ansible-rulebook event source: Grafana unified-alerting webhook notifications, one event per alert."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import heapq
import hmac
import json
import logging
import math
import re
import ssl
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import HttpVersion11, hdrs, web

DOCUMENTATION = r"""
---
short_description: Receive Grafana unified-alerting webhook notifications, one event per alert.
description:
  - An ansible-rulebook event source that listens for the notifications a Grafana (9.x and later) webhook contact point
    sends, checks them (bearer token, HMAC-SHA256 signature, clock skew, size, shape) and puts one event on the queue for
    each alert in C(alerts[]).
  - Authentication is required - set O(token) (or O(token_file)), O(hmac_secret) (or O(hmac_secret_file)), or both, in
    which case both must pass. Only O(insecure_no_auth=true) starts the source without any, and it logs a warning.
  - Grafana's C(hmacConfig) signs the body with HMAC-SHA256 and sends the bare lower-case hex digest in the header named
    by its C(header) setting. With C(timestampHeader) set, it sends the current time in unix seconds in that header and
    signs C(timestamp:body). Set O(hmac_header) and O(hmac_timestamp_header) to the same names as the contact point.
  - Grafana's contact point sends with POST, or PUT when its C(httpMethod) says so; both are accepted.
  - 'A notification is rejected as a whole (nothing reaches the queue) with 401 (authentication, replay), 400 (not JSON,
    not a Grafana notification, bad timestamp), 413 (larger than O(max_body_bytes)), 408 (body not in within
    O(body_timeout)), 404 (other path) or 405 (other method), each with a JSON C(reason) and a warning in the log that
    never contains the token, the signature or the body. An accepted notification is answered 202 with
    C({"accepted": n, "duplicates": m}).'
  - "Each event is exactly C({action, status, service, cluster, alertname, labels, values, fingerprint, startsAt, source,
    received_at}): C(action) is the alert label C(action) when it is C(scale_out) or C(scale_in), otherwise null;
    C(service) and C(cluster) are those labels or null; C(values) are the alert's query results by refId; C(source) is
    C(grafana_alerts); C(received_at) is the unix time the event was made. ansible-rulebook adds C(meta) itself."
  - Grafana sends a still-firing alert again every O(repeat_interval) (its notification policy's C(repeat_interval)),
    and the same notification can arrive more than once (Grafana retries a send; several Grafana instances of a high
    availability setup send the same group). An alert whose C(fingerprint), C(startsAt) and C(status) were first seen at
    most half of O(repeat_interval) ago is dropped as a duplicate; when Grafana sends it again after its
    O(repeat_interval), it reaches the queue again, and the rulebook's throttles and the playbooks' cooldowns decide what
    comes of it.
  - Replays are refused on their own. With O(hmac_secret) and O(hmac_timestamp_header), the timestamp and signature of
    every request are remembered for as long as the timestamp is within O(max_clock_skew). The same request again is a
    copy (answered as duplicates, nothing queued) within half of O(repeat_interval) of its first arrival, and is refused
    with 401 as a replay after that; outside O(max_clock_skew) its timestamp alone refuses it.
  - Slow or idle clients cannot hold the source. A connection must deliver each request's headers within
    O(header_timeout) of its opening (or of the previous answer on it) and the body within O(body_timeout) after them,
    or it is closed; at most O(max_connections) are open, and at the limit a new connection closes the one that has
    waited longest for a request. Grafana sends each request at once, so it is answered while slow clients are cut.
options:
  host:
    description:
      - The address to listen on.
    type: str
    default: "127.0.0.1"
  port:
    description:
      - The TCP port to listen on.
    type: int
    required: true
  path:
    description:
      - The URL path of the contact point; every other path is answered 404.
    type: str
    default: "/alerts"
  certfile:
    description:
      - Path to the PEM certificate (chain) to serve HTTPS with. Requires O(keyfile).
    type: str
  keyfile:
    description:
      - Path to the PEM private key of O(certfile). Requires O(certfile).
    type: str
  token:
    description:
      - The bearer token Grafana sends (C(authorization_credentials) of the contact point).
      - Mutually exclusive with O(token_file).
    type: str
  token_file:
    description:
      - Path to a file holding the bearer token; one trailing newline is ignored.
      - Mutually exclusive with O(token).
    type: str
  hmac_secret:
    description:
      - The HMAC-SHA256 secret of the contact point's C(hmacConfig).
      - Mutually exclusive with O(hmac_secret_file).
    type: str
  hmac_secret_file:
    description:
      - Path to a file holding the HMAC secret; one trailing newline is ignored.
      - Mutually exclusive with O(hmac_secret).
    type: str
  hmac_header:
    description:
      - The header that carries the hex signature (C(hmacConfig.header)).
    type: str
    default: "X-Mlfleet-Signature"
  hmac_timestamp_header:
    description:
      - The header that carries the signing time in unix seconds (C(hmacConfig.timestampHeader)).
      - An empty string means the contact point sends no timestamp; the signed string is then the body alone, and a
        captured request can be replayed once half of O(repeat_interval) has passed. Keep a timestamp header.
    type: str
    default: "X-Mlfleet-Timestamp"
  max_clock_skew:
    description:
      - How many seconds the signed timestamp may differ from this host's clock.
    type: float
    default: 300
  max_body_bytes:
    description:
      - The largest notification body accepted; larger ones are answered 413 without being read further.
    type: int
    default: 1048576
  repeat_interval:
    description:
      - The C(repeat_interval) of the notification policy that routes the scaling alerts to this contact point; the
        monitoring role provisions it from C(monitoring_policy_repeat_interval), and the collection's rulebook passes
        the same variable here.
      - An alert seen again within half of it is a duplicate, and so is a copy of a request (see the description).
        Grafana sends a still-firing alert again after a whole O(repeat_interval), which then reaches the queue.
      - A duration in Grafana's notation (units C(ms), C(s), C(m), C(h), C(d), C(w), C(y), largest first, such as
        C(1m), C(4h) or C(1h30m)), or a number of seconds; longer than 0.
      - At most 10000 alerts are remembered; the one remembered longest is forgotten first.
    type: raw
    default: "1m"
  header_timeout:
    description:
      - Seconds a connection has, from its opening (TLS handshake included) or from the end of the previous answer on
        it, to deliver the next request's line and headers. A connection that takes longer, or stays idle that long
        between requests, is closed.
    type: float
    default: 10
  body_timeout:
    description:
      - Seconds after a request's headers within which its whole body must have arrived; otherwise the request is
        answered 408 and its connection closed. Below Grafana's own send timeout (30 s), so that it sees the answer.
    type: float
    default: 20
  max_connections:
    description:
      - The most connections open at once. At the limit, a new connection closes the open connection that has waited
        longest for a request's headers (idle or slow); when every open connection is busy with a request, the new
        connection is closed at once.
    type: int
    default: 100
  insecure_no_auth:
    description:
      - Start without O(token) and O(hmac_secret); anyone who reaches the port can then trigger the rulebook.
    type: bool
    default: false
notes:
  - The argument C(dedupe_ttl) was removed. It kept every alert for an hour, so an alert that kept firing reached the
    rulebook once an hour; duplicates are now dropped within half of O(repeat_interval), and replays are refused on
    their own. A rulebook that still sets C(dedupe_ttl) stops with an error that says so; remove it and set
    O(repeat_interval).
"""

EXAMPLES = r"""
- mlfleet.serving.grafana_alerts:
    host: 0.0.0.0
    port: 5001
    path: /alerts
    certfile: /etc/mlfleet/autoscaler/tls.crt
    keyfile: /etc/mlfleet/autoscaler/tls.key
    token_file: /run/secrets/mlfleet_webhook_token
    hmac_secret_file: /run/secrets/mlfleet_webhook_hmac_secret
    hmac_header: X-Mlfleet-Signature
    hmac_timestamp_header: X-Mlfleet-Timestamp
    # The notification policy's repeat_interval (the monitoring role's monitoring_policy_repeat_interval).
    repeat_interval: 1m
    header_timeout: 10
    body_timeout: 20
    max_connections: 100
"""

# A fixed name, not __name__: ansible-rulebook loads this file with runpy, which names it "<run_path>".
logger = logging.getLogger("mlfleet.serving.grafana_alerts")

SOURCE_NAME = "grafana_alerts"
_ERROR_PREFIX = "mlfleet.serving.grafana_alerts"
_ALERTS_REMEMBERED = 10000
# Grafana signs a few requests a minute; this many within max_clock_skew is far beyond any real sender.
_REQUESTS_REMEMBERED = 10000
# Seconds that requests still being handled get when the source stops.
_SHUTDOWN_GRACE = 2.0
# Seconds a client that is answered and then cut (slow body) has to read its answer.
_CLOSE_GRACE = 1.0
_ACTIONS = ("scale_out", "scale_in")
_STATUSES = ("firing", "resolved")
_METHODS = (hdrs.METH_POST, hdrs.METH_PUT)
_KNOWN_ARGS = (
    "host",
    "port",
    "path",
    "certfile",
    "keyfile",
    "token",
    "token_file",
    "hmac_secret",
    "hmac_secret_file",
    "hmac_header",
    "hmac_timestamp_header",
    "max_clock_skew",
    "max_body_bytes",
    "repeat_interval",
    "header_timeout",
    "body_timeout",
    "max_connections",
    "insecure_no_auth",
)
_REMOVED_ARGS = {
    "dedupe_ttl": (
        "argument 'dedupe_ttl' was removed: an alert is now a duplicate within half of 'repeat_interval', and replays are "
        "refused for 'max_clock_skew'; remove 'dedupe_ttl' and set 'repeat_interval' to the notification policy's "
        "repeat_interval (the monitoring role's monitoring_policy_repeat_interval, default 1m)"
    ),
}
# ansible-rulebook adds this itself to the arguments of every source when it runs with a feedback queue.
_RULEBOOK_ARGS = ("eda_feedback_queue",)
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
# What Grafana puts in the timestamp header, and what the signature is: grafana/alerting http/hmac.go,
# HMACRoundTripper.sign - timestamp = strconv.FormatInt(clk.Now().Unix(), 10) (decimal unix SECONDS), the HMAC-SHA256
# of timestamp + ":" + body, sent as hex.EncodeToString(...) (bare lower-case hex, no "sha256=" prefix). Accept exactly that.
_UNIX_SECONDS = re.compile(r"[0-9]{1,12}")
_RFC3339 = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?([Zz]|[+-][0-9]{2}:[0-9]{2})")
# Grafana's durations (Prometheus' model.ParseDuration): each unit at most once, largest first.
_DURATION = re.compile(r"(?:([0-9]+)y)?(?:([0-9]+)w)?(?:([0-9]+)d)?(?:([0-9]+)h)?(?:([0-9]+)m)?(?:([0-9]+)s)?(?:([0-9]+)ms)?")
_DURATION_UNITS = (365 * 86400, 7 * 86400, 86400, 3600, 60, 1, 0.001)


@dataclass(frozen=True)
class Settings:
    """The validated arguments; the secrets are bytes and kept out of repr()."""

    host: str
    port: int
    path: str
    certfile: str | None
    keyfile: str | None
    token: bytes | None = field(repr=False)
    hmac_secret: bytes | None = field(repr=False)
    hmac_header: str
    hmac_timestamp_header: str
    max_clock_skew: float
    max_body_bytes: int
    repeat_interval: float
    header_timeout: float
    body_timeout: float
    max_connections: int
    insecure_no_auth: bool

    @property
    def duplicate_window(self) -> float:
        """Seconds within which an alert seen again is a duplicate: Grafana's retries and HA copies come well within
        half of the repeat interval, and its next repeat a whole repeat interval later."""
        return self.repeat_interval / 2


def _arg_error(message: str) -> ValueError:
    return ValueError(f"{_ERROR_PREFIX}: {message}")


def _int_arg(args: dict[str, Any], name: str, default: int | None, minimum: int, maximum: int | None = None) -> int:
    value = args.get(name, default)
    if value is None:
        raise _arg_error(f"argument '{name}' is required (an integer)")
    if isinstance(value, str) and re.fullmatch(r"[0-9]+", value.strip()):
        value = int(value.strip())
    bounds = f"at least {minimum}" if maximum is None else f"between {minimum} and {maximum}"
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum or (maximum is not None and value > maximum):
        raise _arg_error(f"argument '{name}' must be an integer {bounds}, got {value!r}")
    return value


def _seconds_arg(args: dict[str, Any], name: str, default: float, allow_zero: bool) -> float:
    value = args.get(name, default)
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    wanted = "a number of seconds, 0 or more" if allow_zero else "a number of seconds greater than 0"
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        raise _arg_error(f"argument '{name}' must be {wanted}, got {args.get(name)!r}")
    return float(value)


def duration_seconds(value: Any) -> float | None:
    """Seconds in a Grafana duration (1m, 4h, 1h30m, 500ms) or a plain number of seconds; None when it is neither."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value) if math.isfinite(value) else None
    if not isinstance(value, str) or not value:
        return None
    if re.fullmatch(r"[0-9]+(\.[0-9]+)?", value):
        return float(value)
    match = _DURATION.fullmatch(value)
    if match is None:
        return None
    return float(sum(int(number) * unit for number, unit in zip(match.groups(), _DURATION_UNITS, strict=True) if number is not None))


def _duration_arg(args: dict[str, Any], name: str, default: str) -> float:
    value = args.get(name, default)
    seconds = duration_seconds(value)
    if seconds is None or seconds <= 0:
        raise _arg_error(
            f"argument '{name}' must be a duration longer than 0 like 1m, 4h or 1h30m (units ms, s, m, h, d, w, y, largest "
            f"first) or a number of seconds, got {value!r}"
        )
    return seconds


def _bool_arg(args: dict[str, Any], name: str) -> bool:
    value = args.get(name, False)
    if isinstance(value, str) and value.strip().lower() in ("true", "yes", "false", "no"):
        value = value.strip().lower() in ("true", "yes")
    if not isinstance(value, bool):
        raise _arg_error(f"argument '{name}' must be true or false, got {value!r}")
    return value


def _str_arg(args: dict[str, Any], name: str, default: str | None) -> str | None:
    value = args.get(name, default)
    if value is not None and not isinstance(value, str):
        raise _arg_error(f"argument '{name}' must be a string, got {type(value).__name__}")
    return value


def _header_arg(args: dict[str, Any], name: str, default: str, allow_empty: bool) -> str:
    value = _str_arg(args, name, default) or ""
    if value == "" and allow_empty:
        return value
    if not _HEADER_NAME.fullmatch(value):
        empty = " or an empty string" if allow_empty else ""
        raise _arg_error(f"argument '{name}' must be an HTTP header name{empty}, got {value!r}")
    return value


def _secret_arg(args: dict[str, Any], name: str, file_name: str) -> bytes | None:
    """The secret given inline or in a file (without one trailing newline); its value never goes into a message."""
    value = _str_arg(args, name, None)
    path = _str_arg(args, file_name, None)
    if value is not None and path is not None:
        raise _arg_error(f"set '{name}' or '{file_name}', not both")
    label = f"argument '{name}'"
    if path is not None:
        try:
            with open(path, encoding="utf-8") as secret_file:
                value = secret_file.read()
        except (OSError, UnicodeDecodeError) as exc:
            raise _arg_error(f"argument '{file_name}': cannot read {path!r}: {getattr(exc, 'strerror', None) or exc.__class__.__name__}") from None
        if value.endswith("\n"):
            value = value[:-2] if value.endswith("\r\n") else value[:-1]
        label = f"the file {path!r} of argument '{file_name}'"
    if value is None:
        return None
    if value == "":
        raise _arg_error(f"{label} is empty; set a non-empty secret")
    if value != value.strip():
        raise _arg_error(f"{label} starts or ends with whitespace, which an HTTP header cannot carry; remove it")
    return value.encode("utf-8")


def parse_args(args: dict[str, Any]) -> Settings:
    """Validate the source's arguments; raise ValueError naming the argument and the fix."""
    if not isinstance(args, dict):
        raise _arg_error(f"the arguments must be a mapping, got {type(args).__name__}")
    removed = [name for name in _REMOVED_ARGS if name in args]
    if removed:
        raise _arg_error(_REMOVED_ARGS[removed[0]])
    unknown = sorted(str(name) for name in args if name not in _KNOWN_ARGS and name not in _RULEBOOK_ARGS)
    if unknown:
        raise _arg_error(f"unknown argument(s) {', '.join(repr(name) for name in unknown)}; known arguments: {', '.join(_KNOWN_ARGS)}")

    host = _str_arg(args, "host", "127.0.0.1")
    if not host:
        raise _arg_error("argument 'host' must not be empty; use 0.0.0.0 to listen on every address")
    path = _str_arg(args, "path", "/alerts")
    if not path or not path.startswith("/"):
        raise _arg_error(f"argument 'path' must start with '/', got {path!r}")
    certfile = _str_arg(args, "certfile", None) or None
    keyfile = _str_arg(args, "keyfile", None) or None
    if (certfile is None) != (keyfile is None):
        missing, given = ("keyfile", "certfile") if keyfile is None else ("certfile", "keyfile")
        raise _arg_error(f"argument '{given}' is set but '{missing}' is not; set both for TLS, or neither")
    hmac_header = _header_arg(args, "hmac_header", "X-Mlfleet-Signature", allow_empty=False)
    hmac_timestamp_header = _header_arg(args, "hmac_timestamp_header", "X-Mlfleet-Timestamp", allow_empty=True)
    if hmac_header.lower() == hmac_timestamp_header.lower():
        raise _arg_error("arguments 'hmac_header' and 'hmac_timestamp_header' name the same header; give them different names")

    settings = Settings(
        host=host,
        port=_int_arg(args, "port", None, 1, 65535),
        path=path,
        certfile=certfile,
        keyfile=keyfile,
        token=_secret_arg(args, "token", "token_file"),
        hmac_secret=_secret_arg(args, "hmac_secret", "hmac_secret_file"),
        hmac_header=hmac_header,
        hmac_timestamp_header=hmac_timestamp_header,
        max_clock_skew=_seconds_arg(args, "max_clock_skew", 300, allow_zero=False),
        max_body_bytes=_int_arg(args, "max_body_bytes", 1024 * 1024, 1),
        repeat_interval=_duration_arg(args, "repeat_interval", "1m"),
        header_timeout=_seconds_arg(args, "header_timeout", 10, allow_zero=False),
        body_timeout=_seconds_arg(args, "body_timeout", 20, allow_zero=False),
        max_connections=_int_arg(args, "max_connections", 100, 1),
        insecure_no_auth=_bool_arg(args, "insecure_no_auth"),
    )
    if settings.token is None and settings.hmac_secret is None and not settings.insecure_no_auth:
        raise _arg_error(
            "no authentication is configured: set 'token' (or 'token_file') and/or 'hmac_secret' (or 'hmac_secret_file') to the "
            "contact point's credentials, or set 'insecure_no_auth: true' to accept unauthenticated notifications"
        )
    return settings


def _ssl_context(settings: Settings) -> ssl.SSLContext | None:
    if settings.certfile is None:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(settings.certfile, settings.keyfile)
    except (OSError, ssl.SSLError) as exc:
        raise _arg_error(
            f"cannot load the TLS certificate certfile={settings.certfile!r} with keyfile={settings.keyfile!r}: {exc}; "
            "check both are readable PEM files and the key matches the certificate"
        ) from None
    return context


class Rejected(Exception):
    """A request answered with an error status and a reason that is safe to log and to return."""

    def __init__(self, status: int, reason: str, headers: dict[str, str] | None = None, close: bool = False) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.headers = headers
        self.close = close


class ExpiringKeys:
    """Keys, each remembered with a value until its own expiry time; at most max_keys, the soonest to expire forgotten first."""

    def __init__(self, max_keys: int, overflow_warning: str | None = None) -> None:
        self._max_keys = max_keys
        self._overflow_warning = overflow_warning
        self._entries: dict[tuple[str, ...], tuple[float, Any]] = {}
        self._expiries: list[tuple[float, tuple[str, ...]]] = []

    def __len__(self) -> int:
        return len(self._entries)

    def _forget(self) -> None:
        _expires_at, key = heapq.heappop(self._expiries)
        del self._entries[key]

    def get(self, key: tuple[str, ...], now: float) -> Any:
        """The value of key while now is not past its expiry, else None."""
        while self._expiries and self._expiries[0][0] < now:
            self._forget()
        entry = self._entries.get(key)
        return None if entry is None else entry[1]

    def add(self, key: tuple[str, ...], now: float, expires_at: float, value: Any = True) -> bool:
        """Remember key with value until expires_at unless it is remembered already; True when it was not."""
        if self.get(key, now) is not None:
            return False
        if expires_at >= now:
            self._entries[key] = (expires_at, value)
            heapq.heappush(self._expiries, (expires_at, key))
            while len(self._entries) > self._max_keys:
                self._forget()
                if self._overflow_warning:
                    logger.warning(self._overflow_warning)
        return True


def _not_grafana(problem: str) -> Rejected:
    return Rejected(400, f"not a Grafana notification: {problem}")


def _alert_event(index: int, alert: Any, received_at: float) -> dict[str, Any]:
    """The normalised event of alerts[index]; raise Rejected naming the problem (never echoing the body)."""
    where = f"alerts[{index}]"
    if not isinstance(alert, dict):
        raise _not_grafana(f"{where} is not an object")
    labels = alert.get("labels")
    if not isinstance(labels, dict) or not all(isinstance(value, str) for value in labels.values()):
        raise _not_grafana(f"{where} has no 'labels' object of strings")
    alertname = labels.get("alertname")
    if not isinstance(alertname, str) or not alertname:
        raise _not_grafana(f"{where} has no 'alertname' label")
    status = alert.get("status")
    if status not in _STATUSES:
        raise _not_grafana(f"{where} has no 'status' firing or resolved")
    fingerprint = alert.get("fingerprint")
    if not isinstance(fingerprint, str) or not fingerprint:
        raise _not_grafana(f"{where} has no 'fingerprint'")
    starts_at = alert.get("startsAt")
    if not isinstance(starts_at, str) or not _RFC3339.fullmatch(starts_at):
        raise _not_grafana(f"{where} has no RFC 3339 'startsAt'")
    values = alert.get("values")
    if values is None:
        values = {}
    if not isinstance(values, dict) or not all(isinstance(value, int | float) and not isinstance(value, bool) for value in values.values()):
        raise _not_grafana(f"{where} has 'values' that are not an object of numbers")
    action = labels.get("action")
    if action is not None and action not in _ACTIONS:
        logger.warning("alert %s (fingerprint %s) has the action label %r, not one of %s: its event has action null", alertname, fingerprint, action, _ACTIONS)
        action = None
    return {
        "action": action,
        "status": status,
        "service": labels.get("service"),
        "cluster": labels.get("cluster"),
        "alertname": alertname,
        "labels": dict(labels),
        "values": dict(values),
        "fingerprint": fingerprint,
        "startsAt": starts_at,
        "source": SOURCE_NAME,
        "received_at": received_at,
    }


def _same(received: str, expected: bytes) -> bool:
    # Header values are str with undecodable bytes kept as surrogates; compare bytes, in constant time.
    return hmac.compare_digest(received.encode("utf-8", "surrogateescape"), expected)


class Receiver:
    """Checks one request after another and puts the events of an accepted notification on the queue.

    ``clock`` gives ``time()`` (unix seconds: signed timestamps, received_at) and ``monotonic()`` (the duplicate window);
    the time module unless a test drives it.
    """

    def __init__(self, settings: Settings, queue: asyncio.Queue[Any], clock: Any = time) -> None:
        self.settings = settings
        self.queue = queue
        self.clock = clock
        self.recent_alerts = ExpiringKeys(_ALERTS_REMEMBERED)
        self.recent_requests = ExpiringKeys(
            _REQUESTS_REMEMBERED,
            f"more than {_REQUESTS_REMEMBERED} signed requests within max_clock_skew ({settings.max_clock_skew:g} s): the "
            "oldest is forgotten early and could be replayed; lower max_clock_skew",
        )

    def check_bearer(self, request: web.BaseRequest) -> None:
        if self.settings.token is None:
            return
        challenge = {hdrs.WWW_AUTHENTICATE: 'Bearer realm="grafana_alerts"'}
        scheme, separator, credentials = request.headers.get(hdrs.AUTHORIZATION, "").strip().partition(" ")
        if not separator or scheme.lower() != "bearer" or not credentials.strip():
            raise Rejected(401, "missing bearer token", challenge)
        if not _same(credentials.strip(), self.settings.token):
            raise Rejected(401, "bad bearer token", challenge)

    async def read_body(self, request: web.BaseRequest) -> bytes:
        limit = self.settings.max_body_bytes
        too_large = Rejected(413, f"body larger than {limit} bytes")
        if request.content_length is not None and request.content_length > limit:
            raise too_large
        if request.version == HttpVersion11 and request.headers.get(hdrs.EXPECT, "").lower() == "100-continue":
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        body = bytearray()

        async def read() -> bytes:
            while len(body) <= limit:
                chunk = await request.content.read(limit + 1 - len(body))
                if not chunk:
                    return bytes(body)
                body.extend(chunk)
            raise too_large

        try:
            return await asyncio.wait_for(read(), self.settings.body_timeout)
        except TimeoutError:
            raise Rejected(408, f"body not received within body_timeout ({self.settings.body_timeout:g} s)", close=True) from None

    def check_signature(self, request: web.BaseRequest, body: bytes) -> tuple[str, str] | None:
        """Check the HMAC signature and its timestamp; return (timestamp, signature) when the request is stamped."""
        settings = self.settings
        if settings.hmac_secret is None:
            return None
        signature = request.headers.get(settings.hmac_header)
        if not signature:
            raise Rejected(401, "missing signature")
        signed = body
        timestamp = None
        if settings.hmac_timestamp_header:
            timestamp = request.headers.get(settings.hmac_timestamp_header)
            if not timestamp:
                raise Rejected(401, "missing timestamp")
            signed = timestamp.encode("utf-8", "surrogateescape") + b":" + body
        expected = hmac.new(settings.hmac_secret, signed, hashlib.sha256).hexdigest().encode("ascii")
        if not _same(signature, expected):
            raise Rejected(401, "bad signature")
        if timestamp is None:
            return None
        if not _UNIX_SECONDS.fullmatch(timestamp):
            raise Rejected(400, f"bad timestamp format: {settings.hmac_timestamp_header} must be unix seconds")
        if abs(self.clock.time() - int(timestamp)) > settings.max_clock_skew:
            raise Rejected(401, "timestamp outside the allowed clock skew")
        return timestamp, signature

    def is_copy(self, stamped: tuple[str, str] | None) -> bool:
        """True for a request seen before within the duplicate window; raise Rejected for one seen before that."""
        if stamped is None:
            return False
        now = self.clock.monotonic()
        # Remembered while its timestamp is inside the skew window; after that the skew check refuses it.
        first_seen = self.recent_requests.get(stamped, self.clock.time())
        if first_seen is None:
            self.recent_requests.add(stamped, self.clock.time(), int(stamped[0]) + self.settings.max_clock_skew, now)
            return False
        if now - first_seen <= self.settings.duplicate_window:
            return True
        raise Rejected(401, "replayed request")

    def events_from(self, body: bytes) -> list[dict[str, Any]]:
        try:
            notification = json.loads(body)
        except (ValueError, RecursionError):
            raise Rejected(400, "body is not JSON") from None
        if not isinstance(notification, dict) or not isinstance(notification.get("alerts"), list):
            raise _not_grafana("no 'alerts' list")
        received_at = self.clock.time()
        events = [_alert_event(index, alert, received_at) for index, alert in enumerate(notification["alerts"])]
        truncated = notification.get("truncatedAlerts")
        if isinstance(truncated, int) and not isinstance(truncated, bool) and truncated > 0:
            logger.warning("Grafana left %d alert(s) out of a notification (truncatedAlerts): raise the contact point's max_alerts", truncated)
        return events

    async def receive(self, request: web.BaseRequest) -> tuple[int, int]:
        """Check the request and queue its new alerts; return (accepted, duplicates) or raise Rejected."""
        if request.path != self.settings.path:
            raise Rejected(404, "not found")
        if request.method not in _METHODS:
            raise Rejected(405, "method not allowed; use POST or PUT", {hdrs.ALLOW: ", ".join(_METHODS)})
        self.check_bearer(request)
        body = await self.read_body(request)
        stamped = self.check_signature(request, body)
        copy = self.is_copy(stamped)
        events = self.events_from(body)
        if copy:
            logger.debug("a copy of a notification received before (same timestamp and signature): %d duplicate(s)", len(events))
            return 0, len(events)
        now = self.clock.monotonic()
        fresh = []
        for event in events:
            if self.recent_alerts.add((event["fingerprint"], event["startsAt"], event["status"]), now, now + self.settings.duplicate_window):
                fresh.append(event)
            else:
                logger.debug(
                    "dropped duplicate alert %s (%s, fingerprint %s, startsAt %s)", event["alertname"], event["status"], event["fingerprint"], event["startsAt"]
                )
        # Every key is remembered before the first await, so a concurrent copy of this notification finds them.
        for event in fresh:
            await self.queue.put(event)
        return len(fresh), len(events) - len(fresh)


async def handle(receiver: Receiver, request: web.BaseRequest) -> web.StreamResponse:
    """Answer one request to any path and method."""
    try:
        accepted, duplicates = await receiver.receive(request)
    except Rejected as rejected:
        logger.warning("rejected %s %s from %s: HTTP %d %s", request.method, request.rel_url.raw_path, request.remote, rejected.status, rejected.reason)
        response = web.json_response({"reason": rejected.reason}, status=rejected.status, headers=rejected.headers)
        if rejected.close:
            response.force_close()
        return response
    logger.info("accepted a notification from %s: %d alert(s), %d duplicate(s)", request.remote, accepted, duplicates)
    return web.json_response({"accepted": accepted, "duplicates": duplicates}, status=202)


def _peer(transport: asyncio.BaseTransport) -> str:
    peer = transport.get_extra_info("peername")
    return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) and len(peer) >= 2 else str(peer)


class GuardedServer(web.Server):
    """aiohttp's low-level HTTP server, holding no connection that is slow to send a request, and at most max_connections.

    aiohttp reads a request's line and headers before any handler runs, with no deadline, so a client that dribbles its
    headers holds its connection as long as it likes. Here a connection is either waiting (from its opening, or from the
    end of its last request, until the next request's headers are in), for at most header_timeout, or busy (its
    handler runs; the handler bounds the body by body_timeout). At max_connections, a new connection closes the one
    that has waited longest, or itself when all are busy.
    """

    def __init__(self, handler: Callable[[web.BaseRequest], Awaitable[web.StreamResponse]], max_connections: int, header_timeout: float, **kwargs: Any) -> None:
        super().__init__(self._handle_guarded, **kwargs)
        self._inner_handler = handler
        self._max_connections = max_connections
        self._header_timeout = header_timeout
        # In the order they began to wait: the first is the one that has waited longest.
        self._waiting: OrderedDict[web.RequestHandler, tuple[asyncio.BaseTransport, asyncio.TimerHandle]] = OrderedDict()
        self._busy: dict[web.RequestHandler, asyncio.BaseTransport] = {}

    def connection_made(self, handler: web.RequestHandler, transport: asyncio.Transport) -> None:
        super().connection_made(handler, transport)
        if len(self._waiting) + len(self._busy) >= self._max_connections:
            if not self._waiting:
                logger.warning(
                    "closed a new connection from %s: all %d connections (max_connections) are busy with requests", _peer(transport), self._max_connections
                )
                transport.abort()
                return
            self._cut(next(iter(self._waiting)), f"{self._max_connections} connections (max_connections) are open and it waited longest for a request")
        self._wait(handler, transport)

    def connection_lost(self, handler: web.RequestHandler, exc: BaseException | None = None) -> None:
        waiting = self._waiting.pop(handler, None)
        if waiting is not None:
            waiting[1].cancel()
        self._busy.pop(handler, None)
        super().connection_lost(handler, exc)

    async def shutdown(self, timeout: float | None = None) -> None:
        try:
            await super().shutdown(timeout)
        finally:
            for _transport, timer in self._waiting.values():
                timer.cancel()
            self._waiting.clear()
            self._busy.clear()

    def _wait(self, handler: web.RequestHandler, transport: asyncio.BaseTransport, seconds: float | None = None, why: str | None = None) -> None:
        if seconds is None:
            seconds, why = self._header_timeout, f"no complete request within header_timeout ({self._header_timeout:g} s)"
        timer = asyncio.get_running_loop().call_later(seconds, self._cut, handler, why)
        self._waiting[handler] = (transport, timer)

    def _cut(self, handler: web.RequestHandler, why: str) -> None:
        waiting = self._waiting.pop(handler, None)
        if waiting is None:
            return
        transport, timer = waiting
        timer.cancel()
        logger.warning("closed the connection from %s: %s", _peer(transport), why)
        transport.abort()

    async def _handle_guarded(self, request: web.BaseRequest) -> web.StreamResponse:
        handler = request.protocol
        waiting = self._waiting.pop(handler, None)
        if waiting is not None:
            waiting[1].cancel()
            self._busy[handler] = waiting[0]
        response = None
        try:
            response = await self._inner_handler(request)
            return response
        finally:
            # Writing the answer counts as waiting: a client that does not read it is cut like a slow sender.
            transport = self._busy.pop(handler, None)
            if transport is not None and not transport.is_closing():
                if response is not None and response.keep_alive is False:
                    # aiohttp would read the rest of the body for up to 10 s before it closes; give the client only
                    # the time to read its answer.
                    why = f"answered {response.status} and closed without reading the rest of the request"
                    self._wait(handler, transport, min(self._header_timeout, _CLOSE_GRACE), why)
                else:
                    self._wait(handler, transport)


async def main(queue: asyncio.Queue[Any], args: dict[str, Any], *, clock: Any = time) -> None:
    """Receive Grafana alert notifications until cancelled; ``clock`` as for Receiver."""
    settings = parse_args(args)
    ssl_context = _ssl_context(settings)
    if settings.token is None and settings.hmac_secret is None:
        logger.warning(
            "INSECURE: grafana_alerts accepts notifications WITHOUT authentication (insecure_no_auth: true): "
            "anyone who reaches %s:%d can trigger the rulebook; set token and/or hmac_secret",
            settings.host,
            settings.port,
        )

    receiver = Receiver(settings, queue, clock)
    server = GuardedServer(functools.partial(handle, receiver), settings.max_connections, settings.header_timeout)
    loop = asyncio.get_running_loop()
    try:
        listener = await loop.create_server(
            server,
            settings.host,
            settings.port,
            ssl=ssl_context,
            # A TLS handshake comes before the headers, and counts against the same time.
            ssl_handshake_timeout=settings.header_timeout if ssl_context else None,
            backlog=128,
            reuse_address=True,
        )
    except OSError as exc:
        raise OSError(exc.errno, f"{_ERROR_PREFIX}: cannot listen on {settings.host}:{settings.port}: {exc.strerror}; choose another host or port") from exc
    try:
        logger.info(
            "listening on %s://%s:%d%s (bearer token: %s, HMAC signature: %s; an alert seen again within %g s is a duplicate)",
            "https" if ssl_context else "http",
            settings.host,
            settings.port,
            settings.path,
            "required" if settings.token else "off",
            "required" if settings.hmac_secret else "off",
            settings.duplicate_window,
        )
        await asyncio.Future()
    except asyncio.CancelledError:
        logger.info("grafana_alerts task cancelled")
        raise
    finally:
        listener.close()
        await server.shutdown(_SHUTDOWN_GRACE)


if __name__ == "__main__":

    class MockQueue(asyncio.Queue[Any]):
        """A fake queue."""

        async def put(self, item: Any) -> None:
            """Print the event."""
            print(item)  # noqa: T201

    logging.basicConfig(level=logging.INFO)
    asyncio.run(main(MockQueue(), {"port": 5001, "insecure_no_auth": True}))
