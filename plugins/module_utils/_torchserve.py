# Copyright (c) mlfleet.serving maintainers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""One client for TorchServe's management API, shared by the modules of this collection.

The same requests travel one of two ways. ``HttpTransport`` calls a management endpoint directly.
``ContainerTransport`` runs them inside a container through the Docker API (``docker exec`` of a
small Python script that calls the endpoint from within), because in the cluster the management API
binds to 127.0.0.1 inside each replica and is never published. The bearer token, when there is one,
travels in a header (and into a container in the exec's environment, never its command line), and no
message ever contains it. Every failure becomes TorchServeError, whose message names the model, the
endpoint and what to do.
"""

from __future__ import annotations

import json
import traceback
from urllib.parse import quote, urlencode

from ansible.module_utils.basic import env_fallback

from ansible_collections.mlfleet.serving.plugins.module_utils._swarm import SwarmError

try:
    import requests
except ImportError:
    REQUESTS_IMPORT_ERROR = traceback.format_exc()
else:
    REQUESTS_IMPORT_ERROR = None

TOKEN_ENV = "TORCHSERVE_MANAGEMENT_TOKEN"
# How the token reaches the script below inside a container.
TOKEN_VARIABLE = "MLFLEET_TORCHSERVE_TOKEN"
# The label Swarm puts on every container of a service's tasks.
SERVICE_LABEL = "com.docker.swarm.service.name"
TASK_NAME_LABEL = "com.docker.swarm.task.name"

# Runs inside a replica container with the image's own Python (3.6 or later, standard library only).
# argv[1] is the request as JSON; the token comes from the environment, so it never shows in a process
# list or in the exec's inspect output. Proxies are ignored: the endpoint is the container's loopback.
EXEC_SCRIPT = """\
import json, os, sys, urllib.error, urllib.request
r = json.loads(sys.argv[1])
h = {}
t = os.environ.get("MLFLEET_TORCHSERVE_TOKEN")
if t:
    h["Authorization"] = "Bearer " + t
q = urllib.request.Request(r["url"], data=b"" if r["method"] in ("POST", "PUT") else None, headers=h, method=r["method"])
o = urllib.request.build_opener(urllib.request.ProxyHandler({}))
try:
    with o.open(q, timeout=r["timeout"]) as p:
        out = {"status": p.status, "body": p.read().decode("utf-8", "replace")}
except urllib.error.HTTPError as e:
    out = {"status": e.code, "body": e.read().decode("utf-8", "replace")}
except Exception as e:
    out = {"error": "%s: %s" % (type(e).__name__, getattr(e, "reason", e))}
print(json.dumps(out))
"""


def torchserve_argument_spec():
    """The management API options (documented by the mlfleet.serving.torchserve doc fragment)."""
    return dict(
        management_url=dict(type="str"),
        management_token=dict(type="str", no_log=True, fallback=(env_fallback, [TOKEN_ENV])),
        timeout=dict(type="int", default=120),
    )


class TorchServeError(Exception):
    """A management API call failed. The message names the model, the endpoint and what to do."""

    def __init__(self, message, status=None, error_type=None):
        super().__init__(message)
        self.status = status
        self.error_type = error_type


class TransportError(Exception):
    """The request never got an HTTP answer from the management API; the message says why."""


class ExecError(Exception):
    """The request could not be run inside the container at all; the message says why and what to change."""


class HttpTransport:
    """Calls a management API endpoint directly, for example a standalone TorchServe's http://127.0.0.1:8081."""

    def __init__(self, base_url, token=None, timeout=120):
        if not base_url.startswith(("http://", "https://")):
            raise TorchServeError(f"management_url {base_url!r} is not an http:// or https:// URL; write for example http://127.0.0.1:8081")
        self.base_url = base_url.rstrip("/")
        self.endpoint = self.base_url
        self._token = token
        self._timeout = timeout
        self._session = requests.Session()

    def send(self, method, path, params):
        headers = {"Authorization": f"Bearer {self._token}"} if self._token else {}
        try:
            response = self._session.request(method, self.base_url + path, params=params, headers=headers, timeout=self._timeout)
        except requests.exceptions.Timeout as error:
            raise TransportError(f"no answer within {self._timeout} s") from error
        except requests.exceptions.RequestException as error:
            raise TransportError(str(error)) from error
        return response.status_code, response.text

    def close(self):
        self._session.close()


class ContainerTransport:
    """Calls the management API from inside one container, through an open DockerEndpoint (see _swarm.py)."""

    def __init__(self, docker, container, base_url="http://127.0.0.1:8081", token=None, timeout=120, python="python3"):
        self._docker = docker
        self.container_id = container["Id"]
        self.container_name = (container.get("Names") or [container["Id"][:12]])[0].lstrip("/")
        self.base_url = base_url.rstrip("/")
        self.endpoint = f"{self.base_url} in container {self.container_name} (Docker API {docker.url})"
        self._token = token
        self._timeout = timeout
        self._python = python

    def send(self, method, path, params):
        url = self.base_url + path + ("?" + urlencode(params) if params else "")
        request = json.dumps({"method": method, "url": url, "timeout": self._timeout})
        client = self._docker.client
        environment = {TOKEN_VARIABLE: self._token} if self._token else None
        what = f"Running {self._python} in container {self.container_name}"
        try:
            created = self._docker.call(what, client.exec_create, self.container_id, [self._python, "-c", EXEC_SCRIPT, request], environment=environment)
            stdout, stderr = self._docker.call(what, client.exec_start, created["Id"], demux=True)
            exit_code = self._docker.call(what, client.exec_inspect, created["Id"]).get("ExitCode")
        except SwarmError as error:
            raise ExecError(str(error)) from None
        output = (stdout or b"").decode("utf-8", "replace").strip()
        try:
            answer = json.loads(output.splitlines()[-1])
        except (IndexError, ValueError):
            detail = ((stderr or b"").decode("utf-8", "replace").strip() or output or "no output")[-500:]
            raise ExecError(
                f"{what} exited {exit_code}: {detail}. The image needs a Python 3 as {self._python} (set container_python), or use management_url"
            ) from None
        if "error" in answer:
            raise TransportError(answer["error"])
        return answer["status"], answer["body"]

    def close(self):
        """The Docker endpoint belongs to the caller."""


def parse_error(body):
    """TorchServe's error document {"code", "type", "message"}, or the raw text when it is not one."""
    try:
        document = json.loads(body)
    except ValueError:
        return None, (body or "").strip()[:300]
    if isinstance(document, dict):
        return document.get("type"), str(document.get("message") or document.get("status") or "").strip()
    return None, str(document)[:300]


def model_path(name, version=None):
    return "/models/" + quote(name, safe="") + ("/" + quote(version, safe="") if version else "")


def model_label(name, version=None):
    return f"model {name}" + (f" version {version}" if version else "")


class ManagementClient:
    """The management API calls the modules make, on one transport."""

    def __init__(self, transport):
        self.transport = transport
        self.endpoint = transport.endpoint

    def close(self):
        self.transport.close()

    def _request(self, method, path, params, what, name, version=None):
        try:
            status, body = self.transport.send(method, path, params)
        except TransportError as error:
            raise TorchServeError(
                f"{what} failed: the TorchServe management API at {self.endpoint} is unreachable ({error}). "
                "Check that TorchServe runs there and that its management_address is this URL"
            ) from None
        except ExecError as error:
            raise TorchServeError(f"{what} failed: {error}") from None
        if 200 <= status < 300:
            try:
                return json.loads(body) if body.strip() else {}
            except ValueError:
                return {"status": body.strip()}
        error_type, message = parse_error(body)
        raise TorchServeError(self._explain(status, error_type, message, what, name, version), status=status, error_type=error_type)

    def _explain(self, status, error_type, message, what, name, version):
        at = f"at {self.endpoint}"
        said = f"TorchServe says: {message}" if message else f"HTTP {status}"
        if error_type == "InvalidKeyException" or status == 401:
            return (
                f"{what} failed {at}: the management token was refused ({said}). Give the current management key as management_token "
                "(TorchServe writes it to key_file.json and it expires after 60 minutes), or run TorchServe with disable_token_authorization=true"
            )
        if status == 405:
            return (
                f"{what} failed {at}: the model API is disabled ({said}). Registering and unregistering models need "
                "enable_model_api=true in config.properties (or torchserve --enable-model-api); scaling and set-default work without it"
            )
        if status == 409:
            return (
                f"{what} failed {at}: that version already exists ({said}). The archive carries a version of {model_label(name)} that is "
                "registered already: package the new archive with another torch-model-archiver --version, or set version to the registered one"
            )
        if status == 404:
            return f"{what} failed {at}: no such {model_label(name, version)} or archive ({said})"
        return f"{what} failed {at}: HTTP {status}{f' {error_type}' if error_type else ''} ({said})"

    def versions(self, name):
        """Every registered version of ``name`` as TorchServe describes it (``[]`` when the model is unknown)."""
        try:
            return self._request("GET", f"{model_path(name)}/all", None, f"Describing {model_label(name)}", name)
        except TorchServeError as error:
            if error.status == 404:
                return []
            raise

    def describe(self, name, version=None):
        """The description of one version (the default one without ``version``), or None when there is none."""
        path = model_path(name, version)
        try:
            described = self._request("GET", path, None, f"Describing {model_label(name, version)}", name, version)
        except TorchServeError as error:
            if error.status == 404:
                return None
            raise
        return described[0] if described else None

    def register(self, name, url, initial_workers=None, batch_size=None, max_batch_delay=None, response_timeout=None):
        params = {"url": url, "model_name": name, "synchronous": "true"}
        for key, value in (
            ("initial_workers", initial_workers),
            ("batch_size", batch_size),
            ("max_batch_delay", max_batch_delay),
            ("response_timeout", response_timeout),
        ):
            if value is not None:
                params[key] = value
        what = f"Registering {model_label(name)} from {url}"
        try:
            return self._request("POST", "/models", params, what, name)
        except TorchServeError as error:
            if error.status == 404:
                raise TorchServeError(
                    f"{what} failed at {self.endpoint}: TorchServe finds no archive {url} ({error}). Put the .mar file in the model store itself "
                    "(not a subfolder) or give an http(s) URL that allowed_urls permits",
                    status=404,
                    error_type=error.error_type,
                ) from None
            if error.status == 500:
                raise TorchServeError(
                    f"{error}. TorchServe may keep the model registered with no workers; check the replica's model_log.log, "
                    "fix the archive and re-run with recreate=true",
                    status=500,
                    error_type=error.error_type,
                ) from None
            raise

    def scale(self, name, version, min_workers, max_workers):
        params = {"min_worker": min_workers, "max_worker": max_workers, "synchronous": "true"}
        what = f"Scaling {model_label(name, version)} to {min_workers}..{max_workers} workers"
        return self._request("PUT", model_path(name, version), params, what, name, version)

    def set_default(self, name, version):
        what = f"Making version {version} the default of {model_label(name)}"
        return self._request("PUT", f"{model_path(name, version)}/set-default", None, what, name, version)

    def unregister(self, name, version):
        what = f"Unregistering {model_label(name, version)}"
        try:
            return self._request("DELETE", model_path(name, version), None, what, name, version)
        except TorchServeError as error:
            if error.status == 403:
                raise TorchServeError(
                    f"{error}. TorchServe does not unregister the default version while the model has other versions: "
                    "make another version the default first (default_version=true on it), or remove all versions (state=absent without version)",
                    status=403,
                    error_type=error.error_type,
                ) from None
            raise


def service_containers(docker, service):
    """The running containers of ``service``'s tasks on the node ``docker`` reaches, by name."""
    containers = docker.call(
        f"Listing the containers of service {service}",
        docker.client.containers,
        filters={"label": [f"{SERVICE_LABEL}={service}"], "status": "running"},
    )
    return sorted(containers, key=lambda c: (c.get("Names") or [c["Id"]])[0])


def task_name(container):
    labels = container.get("Labels") or {}
    return labels.get(TASK_NAME_LABEL) or labels.get("com.docker.swarm.task.id")
