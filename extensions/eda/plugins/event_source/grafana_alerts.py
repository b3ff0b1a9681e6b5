# Copyright (c) mlfleet.serving maintainers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""ansible-rulebook event source: Grafana unified-alerting webhook notifications, one event per alert."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import math
import re
import ssl
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from aiohttp import hdrs, web

DOCUMENTATION = r"""
---
short_description: Receive Grafana unified-alerting webhook notifications, one event per alert.
description:
  - An ansible-rulebook event source that listens for the notifications a Grafana (9.x and later) webhook contact point
    POSTs, checks them (bearer token, HMAC-SHA256 signature, clock skew, size, shape) and puts one event on the queue for
    each alert in C(alerts[]).
  - Authentication is required - set O(token) (or O(token_file)), O(hmac_secret) (or O(hmac_secret_file)), or both, in
    which case both must pass. Only O(insecure_no_auth=true) starts the source without any, and it logs a warning.
  - Grafana's C(hmacConfig) signs the body with HMAC-SHA256 and sends the bare lower-case hex digest in the header named
    by its C(header) setting. With C(timestampHeader) set, it sends the current time in unix seconds in that header and
    signs C(timestamp:body). Set O(hmac_header) and O(hmac_timestamp_header) to the same names as the contact point.
  - A notification is rejected as a whole (nothing reaches the queue) with 401 (authentication, replay), 400 (not JSON,
    not a Grafana notification, bad timestamp), 413 (larger than O(max_body_bytes)), 404 (other path) or 405 (other
    method), each with a JSON C(reason) and a warning in the log that never contains the token, the signature or the body.
    An accepted notification is answered 202 with C({"accepted": n, "duplicates": m}).
  - "Each event is exactly C({action, status, service, cluster, alertname, labels, values, fingerprint, startsAt, source,
    received_at}): C(action) is the alert label C(action) when it is C(scale_out) or C(scale_in), otherwise null;
    C(service) and C(cluster) are those labels or null; C(values) are the alert's query results by refId; C(source) is
    C(grafana_alerts); C(received_at) is the unix time the event was made. ansible-rulebook adds C(meta) itself."
  - Grafana re-sends an alert on every repeat and group change. An alert whose C(fingerprint), C(startsAt) and C(status)
    were first seen less than O(dedupe_ttl) seconds ago is dropped as a duplicate; this also stops a captured request
    replayed inside the clock skew window.
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
      - An empty string means the contact point sends no timestamp; the signed string is then the body alone and
        requests are not checked for replay outside O(dedupe_ttl).
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
  dedupe_ttl:
    description:
      - How many seconds an alert (C(fingerprint), C(startsAt), C(status)) is remembered after it was first seen. At most
        10000 alerts are remembered, the oldest are forgotten first. V(0) turns deduplication off.
    type: float
    default: 3600
  insecure_no_auth:
    description:
      - Start without O(token) and O(hmac_secret); anyone who reaches the port can then trigger the rulebook.
    type: bool
    default: false
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
"""

# A fixed name, not __name__: ansible-rulebook loads this file with runpy, which names it "<run_path>".
logger = logging.getLogger("mlfleet.serving.grafana_alerts")

SOURCE_NAME = "grafana_alerts"
_ERROR_PREFIX = "mlfleet.serving.grafana_alerts"
_DEDUPE_MAX_KEYS = 10000
_ACTIONS = ("scale_out", "scale_in")
_STATUSES = ("firing", "resolved")
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
    "dedupe_ttl",
    "insecure_no_auth",
)
# ansible-rulebook adds this itself to the arguments of every source when it runs with a feedback queue.
_RULEBOOK_ARGS = ("eda_feedback_queue",)
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
# What Grafana puts in the timestamp header, and what the signature is: grafana/alerting http/hmac.go,
# HMACRoundTripper.sign - timestamp = strconv.FormatInt(clk.Now().Unix(), 10) (decimal unix SECONDS), the HMAC-SHA256
# of timestamp + ":" + body, sent as hex.EncodeToString(...) (bare lower-case hex, no "sha256=" prefix). Accept exactly that.
_UNIX_SECONDS = re.compile(r"[0-9]{1,12}")
_RFC3339 = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?([Zz]|[+-][0-9]{2}:[0-9]{2})")


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
    dedupe_ttl: float
    insecure_no_auth: bool


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
        dedupe_ttl=_seconds_arg(args, "dedupe_ttl", 3600, allow_zero=True),
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

    def __init__(self, status: int, reason: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.headers = headers


class RecentKeys:
    """Keys remembered for ttl seconds after they were first seen, at most max_keys of them (oldest forgotten first)."""

    def __init__(self, ttl: float, max_keys: int) -> None:
        self._ttl = ttl
        self._max_keys = max_keys
        self._expiry: OrderedDict[tuple[str, ...], float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._expiry)

    def first_sighting(self, key: tuple[str, ...], now: float) -> bool:
        """True when key was not seen within ttl, and remember it from now on."""
        # Every key lives for the same ttl from insertion, so insertion order is expiry order.
        while self._expiry and next(iter(self._expiry.values())) <= now:
            self._expiry.popitem(last=False)
        if key in self._expiry:
            return False
        if self._ttl > 0:
            self._expiry[key] = now + self._ttl
            while len(self._expiry) > self._max_keys:
                self._expiry.popitem(last=False)
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
    """Checks one request after another and puts the events of an accepted notification on the queue."""

    def __init__(self, settings: Settings, queue: asyncio.Queue[Any]) -> None:
        self.settings = settings
        self.queue = queue
        self.recent = RecentKeys(settings.dedupe_ttl, _DEDUPE_MAX_KEYS)

    def check_bearer(self, request: web.Request) -> None:
        if self.settings.token is None:
            return
        challenge = {hdrs.WWW_AUTHENTICATE: 'Bearer realm="grafana_alerts"'}
        scheme, separator, credentials = request.headers.get(hdrs.AUTHORIZATION, "").strip().partition(" ")
        if not separator or scheme.lower() != "bearer" or not credentials.strip():
            raise Rejected(401, "missing bearer token", challenge)
        if not _same(credentials.strip(), self.settings.token):
            raise Rejected(401, "bad bearer token", challenge)

    async def read_body(self, request: web.Request) -> bytes:
        limit = self.settings.max_body_bytes
        too_large = Rejected(413, f"body larger than {limit} bytes")
        if request.content_length is not None and request.content_length > limit:
            raise too_large
        body = bytearray()
        while len(body) <= limit:
            chunk = await request.content.read(limit + 1 - len(body))
            if not chunk:
                return bytes(body)
            body += chunk
        raise too_large

    def check_signature(self, request: web.Request, body: bytes) -> None:
        settings = self.settings
        if settings.hmac_secret is None:
            return
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
            return
        if not _UNIX_SECONDS.fullmatch(timestamp):
            raise Rejected(400, f"bad timestamp format: {settings.hmac_timestamp_header} must be unix seconds")
        if abs(time.time() - int(timestamp)) > settings.max_clock_skew:
            raise Rejected(401, "timestamp outside the allowed clock skew")

    def events_from(self, body: bytes) -> list[dict[str, Any]]:
        try:
            notification = json.loads(body)
        except (ValueError, RecursionError):
            raise Rejected(400, "body is not JSON") from None
        if not isinstance(notification, dict) or not isinstance(notification.get("alerts"), list):
            raise _not_grafana("no 'alerts' list")
        received_at = time.time()
        events = [_alert_event(index, alert, received_at) for index, alert in enumerate(notification["alerts"])]
        truncated = notification.get("truncatedAlerts")
        if isinstance(truncated, int) and not isinstance(truncated, bool) and truncated > 0:
            logger.warning("Grafana left %d alert(s) out of a notification (truncatedAlerts): raise the contact point's max_alerts", truncated)
        return events

    async def receive(self, request: web.Request) -> tuple[int, int]:
        """Check the request and queue its new alerts; return (accepted, duplicates) or raise Rejected."""
        if request.path != self.settings.path:
            raise Rejected(404, "not found")
        if request.method != hdrs.METH_POST:
            raise Rejected(405, "method not allowed; use POST", {hdrs.ALLOW: hdrs.METH_POST})
        self.check_bearer(request)
        body = await self.read_body(request)
        self.check_signature(request, body)
        events = self.events_from(body)
        now = time.monotonic()
        fresh = []
        for event in events:
            if self.recent.first_sighting((event["fingerprint"], event["startsAt"], event["status"]), now):
                fresh.append(event)
            else:
                logger.debug(
                    "dropped duplicate alert %s (%s, fingerprint %s, startsAt %s)", event["alertname"], event["status"], event["fingerprint"], event["startsAt"]
                )
        # Every key is remembered before the first await, so a concurrent copy of this notification finds them.
        for event in fresh:
            await self.queue.put(event)
        return len(fresh), len(events) - len(fresh)


receiver_key = web.AppKey("receiver", Receiver)


async def handle(request: web.Request) -> web.Response:
    """Answer one request to any path and method."""
    receiver = request.app[receiver_key]
    try:
        accepted, duplicates = await receiver.receive(request)
    except Rejected as rejected:
        logger.warning("rejected %s %s from %s: HTTP %d %s", request.method, request.rel_url.raw_path, request.remote, rejected.status, rejected.reason)
        return web.json_response({"reason": rejected.reason}, status=rejected.status, headers=rejected.headers)
    logger.info("accepted a notification from %s: %d alert(s), %d duplicate(s)", request.remote, accepted, duplicates)
    return web.json_response({"accepted": accepted, "duplicates": duplicates}, status=202)


async def main(queue: asyncio.Queue[Any], args: dict[str, Any]) -> None:
    """Receive Grafana alert notifications until cancelled."""
    settings = parse_args(args)
    ssl_context = _ssl_context(settings)
    if settings.token is None and settings.hmac_secret is None:
        logger.warning(
            "INSECURE: grafana_alerts accepts notifications WITHOUT authentication (insecure_no_auth: true): "
            "anyone who reaches %s:%d can trigger the rulebook; set token and/or hmac_secret",
            settings.host,
            settings.port,
        )

    app = web.Application()
    app[receiver_key] = Receiver(settings, queue)
    app.router.add_route("*", "/{tail:.*}", handle)

    runner = web.AppRunner(app)
    await runner.setup()
    try:
        site = web.TCPSite(runner, settings.host, settings.port, ssl_context=ssl_context)
        try:
            await site.start()
        except OSError as exc:
            raise OSError(exc.errno, f"{_ERROR_PREFIX}: cannot listen on {settings.host}:{settings.port}: {exc.strerror}; choose another host or port") from exc
        logger.info(
            "listening on %s://%s:%d%s (bearer token: %s, HMAC signature: %s)",
            "https" if ssl_context else "http",
            settings.host,
            settings.port,
            settings.path,
            "required" if settings.token else "off",
            "required" if settings.hmac_secret else "off",
        )
        await asyncio.Future()
    except asyncio.CancelledError:
        logger.info("grafana_alerts task cancelled")
        raise
    finally:
        await runner.cleanup()


if __name__ == "__main__":

    class MockQueue(asyncio.Queue[Any]):
        """A fake queue."""

        async def put(self, item: Any) -> None:
            """Print the event."""
            print(item)  # noqa: T201

    logging.basicConfig(level=logging.INFO)
    asyncio.run(main(MockQueue(), {"port": 5001, "insecure_no_auth": True}))
