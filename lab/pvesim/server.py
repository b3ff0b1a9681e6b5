"""The HTTPS front: Proxmox's request handling order, answer format, and the /_sim admin endpoints.

Order as in pve-http-server: route lookup (501), authentication (401), CSRF on writes with a ticket,
the schema's permission check (403), parameter validation (400), then the handler.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import os
import secrets
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from . import tls
from .access import AccessControl, AclEntry, AuthenticationFailed, PermissionDenied, Principal, Token, User
from .api import HANDLERS, Call
from .backend import Backend, MemoryBackend
from .errors import ApiError
from .model import Cluster, Faults
from .schema import Schema
from .tasks import Clock
from .validation import ParameterErrors, validate

BASE_PATH = "/api2/json"
REQUEST_LOG_SIZE = 20000
AUTOSAVE_INTERVAL = 0.5
_SECRET_PARAMS = {"password", "cipassword", "otp", "tfa-challenge"}
_WRITE_METHODS = {"POST", "PUT", "DELETE"}


def _access_from_config(config: dict, cluster: Cluster) -> AccessControl:
    users = {}
    for userid, spec in config["users"].items():
        tokens = {tokenid: Token(str(token["secret"]), bool(token.get("privsep", True))) for tokenid, token in (spec.get("tokens") or {}).items()}
        users[userid] = User(userid, spec.get("password"), tokens, bool(spec.get("enabled", True)))
    acl = [
        AclEntry(entry["path"], ugid, role, bool(entry.get("propagate", True)))
        for entry in config["acl"]
        for ugid in [*entry.get("users", []), *entry.get("tokens", [])]
        for role in entry["roles"]
    ]
    roles = {name: frozenset(privileges) for name, privileges in (config.get("roles") or {}).items()}
    return AccessControl(users, acl, roles, cluster.pool_of)


@dataclass
class LoggedRequest:
    time: float
    method: str
    path: str
    params: dict
    status: int
    caller: str | None


class Simulator:
    """One simulated cluster behind one aiohttp application."""

    def __init__(self, config: dict, state_dir: Path, *, state_file: Path | None = None, backend: Backend | None = None, clock: Clock | None = None):
        self.config = config
        self.schema = Schema.load()
        self.state_dir = state_dir
        self.state_file = state_file
        self.cluster = Cluster(config, backend or MemoryBackend(), clock)
        if state_file is not None and state_file.exists():
            self.cluster.load_state(json.loads(state_file.read_text(encoding="utf-8")))
        self.access = _access_from_config(config, self.cluster)
        self.requests: deque[LoggedRequest] = deque(maxlen=REQUEST_LOG_SIZE)
        self.admin_token = config.get("admin_token") or self._generated_admin_token()
        self.certificates: tls.Certificates | None = None

    def _generated_admin_token(self) -> str:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        token_file = self.state_dir / "admin-token"
        token = secrets.token_urlsafe(24)
        token_file.touch(mode=0o600)
        token_file.write_text(token + "\n", encoding="utf-8")
        return token

    # --- application ----------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(client_max_size=4 * 1024 * 1024)
        app.router.add_route("*", BASE_PATH + "/{tail:.*}", self.handle_api)
        app.router.add_route("*", "/_sim/{what}", self.handle_admin)
        app.on_cleanup.append(self._on_cleanup)
        if self.state_file is not None:
            app.on_startup.append(self._start_autosave)
        return app

    async def _start_autosave(self, app: web.Application) -> None:
        app["autosave"] = asyncio.get_running_loop().create_task(self._autosave())

    async def _autosave(self) -> None:
        while True:
            await asyncio.sleep(AUTOSAVE_INTERVAL)
            if self.cluster.dirty:
                self.save_state()

    async def _on_cleanup(self, app: web.Application) -> None:
        autosave = app.get("autosave")
        if autosave is not None:
            autosave.cancel()
            await asyncio.gather(autosave, return_exceptions=True)
        await self.cluster.runner.cancel_all()
        if self.state_file is not None:
            self.save_state()

    def save_state(self) -> None:
        """Write the state file atomically, so a crash mid-write keeps the previous one."""
        self.cluster.dirty = False
        temporary = self.state_file.with_name(self.state_file.name + ".tmp")
        temporary.write_text(json.dumps(self.cluster.to_state(), indent=1), encoding="utf-8")
        os.replace(temporary, self.state_file)

    # --- Proxmox API ----------------------------------------------------------------------------

    async def handle_api(self, request: web.Request) -> web.Response:
        path = "/" + request.match_info["tail"].rstrip("/")
        params: dict[str, Any] = {}
        principal: Principal | None = None
        try:
            params = await self._request_params(request)
            route, path_params = self._route(request.method, path)
            params.update(path_params)
            principal = self._authenticate(request, route.info)
            self.access.check_schema_permissions(principal, route.permissions, {key: str(value) for key, value in params.items()})
            validated = validate(params, route.parameters)
            handler = HANDLERS[(request.method, route.path)]
            fingerprint = self.certificates.fingerprint if self.certificates else ""
            data = await handler(Call(self.cluster, self.access, principal, validated, fingerprint))
            response = web.json_response({"data": data})
        except ParameterErrors as error:
            response = self._error(400, str(error), {"errors": error.errors})
        except AuthenticationFailed as error:
            response = self._error(401, str(error))
        except PermissionDenied as error:
            response = self._error(403, str(error))
        except ApiError as error:
            response = self._error(error.status, error.message)
        self._log(request.method, path, params, response.status, principal)
        return response

    def _route(self, method: str, path: str):
        matched = self.schema.match(path)
        route = self.schema.route(matched[0], method) if matched else None
        if route is None or (method, route.path) not in HANDLERS:
            raise ApiError(f"Method '{method} {path}' not implemented", status=501)
        return route, matched[1]

    async def _request_params(self, request: web.Request) -> dict[str, Any]:
        params: dict[str, Any] = _single_or_list(request.query)
        if request.method in ("POST", "PUT") and request.can_read_body:
            if request.content_type == "application/json":
                try:
                    body = await request.json()
                except json.JSONDecodeError:
                    raise ApiError("malformed JSON body", status=400) from None
                if not isinstance(body, dict):
                    raise ApiError("malformed JSON body - expected an object", status=400)
                params.update(body)
            else:
                params.update(_single_or_list(await request.post()))
        return params

    def _authenticate(self, request: web.Request, route_info: dict) -> Principal | None:
        """The caller, or None on world-readable routes called without credentials."""
        world = (route_info.get("permissions") or {}).get("user") == "world"
        header = request.headers.get("Authorization", "")
        if header.startswith("PVEAPIToken"):
            principal = self.access.check_token(header)
            if not route_info.get("allowtoken", 1):
                raise AuthenticationFailed("API tokens are not allowed to use this endpoint")
            return principal
        ticket = request.cookies.get("PVEAuthCookie")
        if ticket is None:
            if world:
                return None
            raise AuthenticationFailed("No ticket")
        principal, stamp = self.access.check_ticket(ticket, self.cluster.clock.time())
        if request.method in _WRITE_METHODS and not world and not self.access.check_csrf(principal, stamp, request.headers.get("CSRFPreventionToken")):
            raise AuthenticationFailed("Permission denied - invalid csrf token")
        return principal

    @staticmethod
    def _error(status: int, message: str, extra: dict | None = None) -> web.Response:
        # Proxmox puts the message into the HTTP reason phrase; clients such as proxmoxer show that.
        # The reason phrase must be one line of latin-1; request paths may carry anything.
        reason = (message.splitlines()[0] if message else "error").encode("ascii", "backslashreplace").decode("ascii")
        return web.json_response({"data": None, "message": message.rstrip("\n") + "\n", **(extra or {})}, status=status, reason=reason)

    def _log(self, method: str, path: str, params: dict, status: int, principal: Principal | None) -> None:
        shown = {key: "**********" if key in _SECRET_PARAMS else value for key, value in params.items()}
        self.requests.append(LoggedRequest(time.time(), method, path, shown, status, principal.authid if principal else None))

    # --- admin endpoints ------------------------------------------------------------------------

    async def handle_admin(self, request: web.Request) -> web.Response:
        header = request.headers.get("Authorization", "")
        if not hmac.compare_digest(header.encode(), f"Bearer {self.admin_token}".encode()):
            return web.json_response({"error": "admin token required"}, status=401)
        what, method = request.match_info["what"], request.method
        if what == "requests" and method == "GET":
            return web.json_response([entry.__dict__ for entry in self.requests])
        if what == "requests" and method == "DELETE":
            self.requests.clear()
            return web.json_response({"cleared": True})
        if what == "faults" and method == "GET":
            return web.json_response(self.cluster.faults.to_dict())
        if what == "faults" and method == "PUT":
            try:
                self.cluster.faults = Faults.from_dict(await request.json())
            except (ValueError, TypeError, AttributeError) as error:
                return web.json_response({"error": str(error)}, status=400)
            return web.json_response(self.cluster.faults.to_dict())
        if what == "faults" and method == "DELETE":
            self.cluster.faults = Faults()
            return web.json_response({})
        return web.json_response({"error": f"no admin endpoint {method} /_sim/{what}"}, status=404)

    # --- serving --------------------------------------------------------------------------------

    async def serve(self, host: str, port: int) -> tuple[web.AppRunner, int]:
        """Start listening; returns the runner (for cleanup) and the bound port (useful with port 0)."""
        self.certificates = tls.generate(self.state_dir, [host, "localhost"])
        runner = web.AppRunner(self.app(), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, host, port, ssl_context=self.certificates.server_context())
        await site.start()
        bound_port = site._server.sockets[0].getsockname()[1]  # aiohttp has no public accessor for the bound port
        return runner, bound_port


@contextlib.contextmanager
def running_in_thread(simulator: Simulator, host: str = "127.0.0.1", port: int = 0, startup_timeout: float = 10.0) -> Iterator[str]:
    """Serve `simulator` from a background thread's event loop; yields the base URL (https://host:port)."""
    loop = asyncio.new_event_loop()
    started: dict[str, Any] = {}
    ready = threading.Event()

    def run() -> None:
        asyncio.set_event_loop(loop)
        try:
            started["runner"], started["port"] = loop.run_until_complete(simulator.serve(host, port))
        except Exception as error:  # reported to the caller below
            started["error"] = error
            ready.set()
            return
        ready.set()
        loop.run_forever()
        loop.run_until_complete(started["runner"].cleanup())
        loop.close()

    thread = threading.Thread(target=run, name="pvesim", daemon=True)
    thread.start()
    if not ready.wait(startup_timeout) or "error" in started:
        raise RuntimeError(f"pvesim did not start: {started.get('error', 'timeout')}")
    try:
        yield f"https://{host}:{started['port']}"
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(startup_timeout)


def _single_or_list(form) -> dict[str, Any]:
    """A form's values; a key sent more than once (an array parameter, as `map=a&map=b`) becomes a list."""
    values: dict[str, Any] = {}
    for key in form:
        if key not in values:
            found = form.getall(key)
            values[key] = found if len(found) > 1 else found[0]
    return values
