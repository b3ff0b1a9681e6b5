# Copyright (c) mlfleet.serving maintainers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""One Proxmox VE API client for every module and plugin of this collection.

It wraps proxmoxer and turns every failure into ProxmoxError, whose message names the call, the
object and what to check, so modules and the inventory plugin fail in one place with one wording.
It has no AnsibleModule inside: the inventory plugin uses it too.
"""

from __future__ import annotations

import time
import traceback

from ansible.module_utils.basic import env_fallback, missing_required_lib

try:
    import requests
    from proxmoxer import ProxmoxAPI
    from proxmoxer.core import AuthenticationError, ResourceException
except ImportError:
    PROXMOXER_IMPORT_ERROR = traceback.format_exc()
else:
    PROXMOXER_IMPORT_ERROR = None

# Task exit statuses that mean success: "OK", or "WARNINGS: n" when the task finished with warnings.
TASK_OK_PREFIXES = ("OK", "WARNINGS")


def proxmox_argument_spec():
    """The connection options every Proxmox module takes (documented by the mlfleet.serving.proxmox doc fragment)."""
    return dict(
        api_host=dict(type="str", required=True, fallback=(env_fallback, ["PROXMOX_HOST"])),
        api_port=dict(type="int", default=8006, fallback=(env_fallback, ["PROXMOX_PORT"])),
        api_user=dict(type="str", required=True, fallback=(env_fallback, ["PROXMOX_USER"])),
        api_password=dict(type="str", no_log=True, fallback=(env_fallback, ["PROXMOX_PASSWORD"])),
        api_token_id=dict(type="str", fallback=(env_fallback, ["PROXMOX_TOKEN_ID"])),
        api_token_secret=dict(type="str", no_log=True, fallback=(env_fallback, ["PROXMOX_TOKEN_SECRET"])),
        validate_certs=dict(type="bool", default=True, fallback=(env_fallback, ["PROXMOX_VALIDATE_CERTS"])),
        ca_path=dict(type="path", fallback=(env_fallback, ["PROXMOX_CA_PATH"])),
        api_timeout=dict(type="int", default=30, fallback=(env_fallback, ["PROXMOX_API_TIMEOUT"])),
    )


PROXMOX_REQUIRED_TOGETHER = [("api_token_id", "api_token_secret")]
PROXMOX_MUTUALLY_EXCLUSIVE = [("api_password", "api_token_secret")]
PROXMOX_REQUIRED_ONE_OF = [("api_password", "api_token_secret")]
CONNECTION_OPTIONS = tuple(proxmox_argument_spec())


class ProxmoxError(Exception):
    """A Proxmox API call failed. The message names the call, the object and what to check."""


class ProxmoxTaskError(ProxmoxError):
    """An asynchronous Proxmox task failed or did not finish in time."""

    def __init__(self, message, upid, exitstatus=None, log_tail=None):
        super().__init__(message)
        self.upid = upid
        self.exitstatus = exitstatus
        self.log_tail = log_tail or []


def parse_upid(upid):
    """The parts of a task id `UPID:node:pid:pstart:starttime:type:id:user:` a message needs."""
    parts = upid.split(":")
    if len(parts) < 8 or parts[0] != "UPID":
        raise ProxmoxError(f"{upid!r} is not a Proxmox task id (UPID:node:pid:pstart:starttime:type:id:user:)")
    return {"node": parts[1], "type": parts[5], "id": parts[6], "user": parts[7]}


class ProxmoxClient:
    """A logged-in Proxmox VE API session.

    Token auth (``api_token_id`` + ``api_token_secret``) or password auth (``api_password``, a ticket
    login). Certificates are validated unless ``validate_certs`` is false; ``ca_path`` names the CA
    of a cluster with its own certificate authority. ``max_connections`` is how many threads may call
    at once without opening new connections.
    """

    def __init__(
        self,
        api_host,
        api_user,
        api_port=8006,
        api_password=None,
        api_token_id=None,
        api_token_secret=None,
        validate_certs=True,
        ca_path=None,
        api_timeout=30,
        max_connections=10,
    ):
        if PROXMOXER_IMPORT_ERROR:
            raise ProxmoxError(missing_required_lib("proxmoxer"))
        self.endpoint = f"{api_host}:{api_port}"
        self.user = api_user
        verify = ca_path if validate_certs and ca_path else bool(validate_certs)
        # A token needs no login: wrong token credentials surface at the first call (HTTP 401), which for every
        # caller is a read that comes before any write.
        if api_token_secret:
            credentials = {"token_name": api_token_id, "token_value": api_token_secret}
        else:
            credentials = {"password": api_password}
        try:
            self.api = ProxmoxAPI(api_host, port=api_port, user=api_user, verify_ssl=verify, timeout=api_timeout, service="PVE", **credentials)
        except AuthenticationError:
            raise ProxmoxError(f"Proxmox VE at {self.endpoint} refused the login of {api_user}: check api_user and api_password (user@realm)") from None
        except requests.exceptions.RequestException as error:
            raise ProxmoxError(self._transport_message(error)) from None
        # As many kept-alive connections as callers use at once: a smaller pool makes threads open and close
        # connections, a TLS handshake each.
        adapter = requests.adapters.HTTPAdapter(pool_connections=1, pool_maxsize=max_connections)
        self.api._store["session"].mount("https://", adapter)

    @classmethod
    def from_params(cls, params, **extra):
        """A client from module parameters or inventory options that hold the connection options (``extra``: other
        constructor arguments, such as ``max_connections``)."""
        return cls(**{name: params.get(name) for name in CONNECTION_OPTIONS if params.get(name) is not None}, **extra)

    def _transport_message(self, error):
        if isinstance(error, requests.exceptions.SSLError):
            return (
                f"TLS verification of Proxmox VE at {self.endpoint} failed ({error}): set ca_path to the cluster's CA "
                f"certificate, or validate_certs: false on a lab cluster"
            )
        if isinstance(error, requests.exceptions.Timeout):
            return f"Proxmox VE at {self.endpoint} did not answer in time ({error}): check the host or raise api_timeout"
        return f"cannot reach Proxmox VE at {self.endpoint} ({error}): check api_host and api_port"

    def call(self, method, path, **params):
        """One API call, e.g. ``call("post", "nodes/pve1/qemu/9000/clone", newid=101)``; returns its data."""
        try:
            return getattr(self.api(path), method)(**params)
        except ResourceException as error:
            if isinstance(error.errors, dict):
                detail = "; ".join(f"{name}: {reason}" for name, reason in sorted(error.errors.items()))
            else:
                detail = error.errors or error.content
            if error.status_code == 401:
                raise ProxmoxError(
                    f"Proxmox VE at {self.endpoint} rejected the credentials of {self.user} ({detail}): "
                    f"check api_token_id and api_token_secret, or api_password"
                ) from None
            hint = " (check the privileges of the API user or token)" if error.status_code == 403 else ""
            raise ProxmoxError(f"{method.upper()} /{path} failed: HTTP {error.status_code} {error.status_message}: {detail}{hint}") from None
        except AuthenticationError:
            raise ProxmoxError(f"Proxmox VE at {self.endpoint} rejected the credentials of {self.user}: check the API token or password") from None
        except requests.exceptions.RequestException as error:
            raise ProxmoxError(self._transport_message(error)) from None

    def get(self, path, **params):
        return self.call("get", path, **params)

    def post(self, path, **params):
        return self.call("post", path, **params)

    def put(self, path, **params):
        return self.call("put", path, **params)

    def delete(self, path, **params):
        return self.call("delete", path, **params)

    def vm_resources(self):
        """Every VM and template of the cluster, in one call."""
        return self.get("cluster/resources", type="vm")

    def task_log_tail(self, upid, lines=5):
        """The last non-empty lines of a task's log, for error messages."""
        node = parse_upid(upid)["node"]
        try:
            entries = self.get(f"nodes/{node}/tasks/{upid}/log", limit=500)
        except ProxmoxError:
            return []
        text = [entry.get("t", "") for entry in entries if entry.get("t", "").strip() and entry.get("t") != "no content"]
        return text[-lines:]

    def wait_task(self, upid, timeout, poll_interval=1.0, what=None):
        """Poll a task until it stops; return its final status, or raise ProxmoxTaskError naming the
        task, its object and node, and the task log's last line."""
        task = parse_upid(upid)
        subject = what or f"task {task['type']} of {task['id']}"
        deadline = time.monotonic() + timeout
        while True:
            status = self.get(f"nodes/{task['node']}/tasks/{upid}/status")
            if status.get("status") == "stopped":
                exitstatus = str(status.get("exitstatus", ""))
                if exitstatus.startswith(TASK_OK_PREFIXES):
                    return status
                tail = self.task_log_tail(upid)
                last = f"; last log line: {tail[-1]}" if tail else ""
                raise ProxmoxTaskError(f"{subject} on node {task['node']} failed: {exitstatus}{last} (task {upid})", upid, exitstatus, tail)
            if time.monotonic() >= deadline:
                raise ProxmoxTaskError(
                    f"{subject} on node {task['node']} still running after {timeout}s: raise the timeout or check the task log (task {upid})", upid
                )
            time.sleep(poll_interval)
