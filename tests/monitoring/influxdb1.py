"""A real InfluxDB 1.x (Debian's influxd) for the tests, on 127.0.0.1 with authentication on.

InfluxDB.start() writes a configuration whose every directory is in a temporary one, picks two free
ports from 18700-18799 (HTTP and the backup RPC), starts influxd, waits for /ping and creates an admin
user through the HTTP API (allowed while no user exists). stop() ends that one process by its PID.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import requests

PORTS = range(18700, 18800)
START_TIMEOUT = 30
STOP_TIMEOUT = 15
INSTALL_HINT = "influxd is not installed: run `apt-get install -y influxdb` as root (scripts/bootstrap installs it)"

# reporting-disabled is upstream's switch, reporting-enabled Debian's (which patched the reporting out);
# each influxd ignores the key it does not know.
CONFIG = """\
reporting-disabled = true
reporting-enabled = false
bind-address = "127.0.0.1:{rpc_port}"

[meta]
  dir = "{root}/meta"
  logging-enabled = false

[data]
  dir = "{root}/data"
  wal-dir = "{root}/wal"
  query-log-enabled = false

[monitor]
  store-enabled = false

[http]
  enabled = true
  bind-address = "127.0.0.1:{http_port}"
  auth-enabled = true
  log-enabled = true
  pprof-enabled = false
  unix-socket-enabled = false

[continuous_queries]
  enabled = false

[logging]
  suppress-logo = true
"""


class InfluxDBError(Exception):
    """influxd did not start, or a query failed."""


def free_ports(count, exclude=()):
    """``count`` ports from PORTS that nothing listens on at 127.0.0.1 right now."""
    found = []
    for port in PORTS:
        if port in exclude:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        found.append(port)
        if len(found) == count:
            return found
    raise InfluxDBError(f"fewer than {count} free ports in {PORTS.start}-{PORTS.stop - 1} on 127.0.0.1")


def quote_identifier(name):
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def quote_string(text):
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


class InfluxDB:
    """One influxd process; ``url``, ``username`` and ``password`` are set once start() returned."""

    def __init__(self, root: Path, binary: str):
        self.root = root
        self.binary = binary
        self.username = "admin"
        self.password = secrets.token_urlsafe(18)
        self.url = None
        self.process = None
        self.log_path = root / "influxd.log"
        self.version = None
        self._session = requests.Session()
        # Proxies from the environment must not see this traffic.
        self._session.trust_env = False

    # Life cycle

    def start(self, attempts=3):
        used = set()
        for _attempt in range(attempts):
            http_port, rpc_port = free_ports(2, exclude=used)
            used.update((http_port, rpc_port))
            if self._run(http_port, rpc_port):
                self._create_admin()
                return self
        raise InfluxDBError(f"influxd could not bind its ports in {attempts} attempts (ports tried: {sorted(used)})\n{self.log()}")

    def _run(self, http_port, rpc_port):
        """Start influxd on these ports; False when a port was taken meanwhile."""
        config = self.root / "influxdb.conf"
        config.write_text(CONFIG.format(root=self.root, http_port=http_port, rpc_port=rpc_port))
        # INFLUXDB_* variables would override the configuration file.
        environment = {key: value for key, value in os.environ.items() if not key.startswith("INFLUXDB_")}
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [self.binary, "run", "-config", str(config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=environment,
                cwd=self.root,
                start_new_session=True,
            )
        self.url = f"http://127.0.0.1:{http_port}"
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                if "address already in use" in self.log():
                    return False
                raise InfluxDBError(f"influxd exited with {self.process.returncode} while starting:\n{self.log()}")
            try:
                response = self._session.get(self.url + "/ping", timeout=1)
            except requests.exceptions.RequestException:
                time.sleep(0.1)
                continue
            if response.status_code == 204:
                self.version = response.headers.get("X-Influxdb-Version")
                return True
            time.sleep(0.1)
        self.stop()
        raise InfluxDBError(f"influxd at {self.url} did not answer /ping within {START_TIMEOUT} s:\n{self.log()}")

    def _create_admin(self):
        statement = f"CREATE USER {quote_identifier(self.username)} WITH PASSWORD {quote_string(self.password)} WITH ALL PRIVILEGES"
        response = self._session.post(self.url + "/query", data={"q": statement}, timeout=10)
        self._check(response, "creating the admin user")

    def stop(self):
        """SIGTERM to our influxd, SIGKILL when it has not exited within STOP_TIMEOUT seconds."""
        self._session.close()
        if self.process is None or self.process.poll() is not None:
            return
        os.kill(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(STOP_TIMEOUT)

    def log(self, tail=60):
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(lines[-tail:])

    # HTTP API

    def _check(self, response, what):
        try:
            document = response.json()
        except ValueError:
            document = {}
        errors = [document.get("error")] + [result.get("error") for result in document.get("results", [])]
        errors = [error for error in errors if error]
        if response.status_code >= 300 or errors:
            raise InfluxDBError(f"{what} failed at {self.url}: HTTP {response.status_code} {'; '.join(errors) or response.text[:300]}")
        return document

    def query(self, q, db=None, epoch=None):
        """GET /query as the admin: a read (SELECT, SHOW), times as RFC 3339 or, with epoch="ns", integers.

        Raises InfluxDBError for an HTTP or statement error.
        """
        params = {"q": q}
        if db:
            params["db"] = db
        if epoch:
            params["epoch"] = epoch
        response = self._session.get(self.url + "/query", params=params, auth=(self.username, self.password), timeout=10)
        return self._check(response, f"query {q!r}")

    def execute(self, q, db=None):
        """POST /query as the admin: a statement that changes something."""
        data = {"q": q}
        if db:
            data["db"] = db
        response = self._session.post(self.url + "/query", data=data, auth=(self.username, self.password), timeout=10)
        return self._check(response, f"statement {q!r}")

    def create_database(self, name, retention=None):
        """Create a database, with a default retention policy of this duration (for example 1h) when given."""
        statement = f"CREATE DATABASE {quote_identifier(name)}"
        if retention:
            statement += f" WITH DURATION {retention}"
        self.execute(statement)
        return name


def find_influxd():
    return shutil.which("influxd") or next((path for path in ("/usr/bin/influxd", "/usr/sbin/influxd") if os.access(path, os.X_OK)), None)
