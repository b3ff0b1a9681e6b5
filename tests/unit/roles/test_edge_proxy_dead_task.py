"""The edge proxy's request handling, rendered from the role's template and run in a real HAProxy on 127.0.0.1.

A worker VM that dies sends no reset: a request in flight on one of its tasks hears nothing more. The role's `defaults`
section must send such a request again to another task within seconds. The dead task is played by an iptables rule
that drops every packet to and from its port on the loopback, after the request has reached it; the control run,
the same section without server-side TCP keepalive, shows that the rule does make the task silent (504 when the
server timeout ends the request).
"""

import http.client
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[3]
ROLE = REPO_ROOT / "roles" / "edge_proxy"
HAPROXY = Path("/usr/sbin/haproxy")

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not HAPROXY.exists() or shutil.which("iptables") is None,
    reason="needs root, iptables and Debian's HAProxy (/usr/sbin/haproxy), which scripts/bootstrap installs",
)


class Task:
    """A stand-in TorchServe task on 127.0.0.1 that answers its name after `delay` seconds."""

    def __init__(self, name: str, delay: float):
        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                time.sleep(delay)
                try:
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(name)))
                    self.end_headers()
                    self.wfile.write(name.encode())
                except OSError:
                    pass

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.server.handle_error = lambda request, address: None  # the proxy resets the connections of the silenced task
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def rendered_defaults(tmp_path_factory):
    """The `defaults` section of haproxy.cfg as the role renders it with its own defaults."""
    workdir = tmp_path_factory.mktemp("edge-proxy-config")
    playbook = workdir / "render.yml"
    playbook.write_text(
        f"""- name: Render the edge proxy's configuration
  hosts: localhost
  gather_facts: false
  vars_files: ["{ROLE / "defaults" / "main.yml"}"]
  vars:
    edge_proxy_backends: [{{service: echo, models: [echo]}}]
  tasks:
    - name: Render
      ansible.builtin.template:
        src: "{ROLE / "templates" / "haproxy.cfg.j2"}"
        dest: "{workdir / "haproxy.cfg"}"
        mode: "0600"
"""
    )
    ansible_playbook = Path(sys.executable).with_name("ansible-playbook")
    command = [str(ansible_playbook), "-i", "localhost,", "-c", "local", "-e", f"ansible_python_interpreter={sys.executable}", str(playbook)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=workdir, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    rendered = (workdir / "haproxy.cfg").read_text()
    section = re.search(r"^defaults\n(?:    .*\n|\n)*?(?=^\S)", rendered, re.MULTILINE)
    assert section, rendered
    return section.group(0)


def proxy_config(defaults: str, port: int, dead: Task, alive: Task) -> str:
    # `balance first` sends the request to the task that is then killed.
    return f"""global
    log stdout format raw local0 info

{defaults}
frontend inference
    bind 127.0.0.1:{port}
    default_backend echo

backend echo
    balance first
    server dead 127.0.0.1:{dead.port} maxconn 1
    server alive 127.0.0.1:{alive.port} maxconn 1
"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def request_while_the_task_dies(workdir: Path, defaults: str):
    """POST through the proxy; 0.5 s later the first task goes silent. Returns (status, body, seconds, proxy log)."""
    dead, alive = Task("dead", delay=4.0), Task("alive", delay=0.0)
    port = free_port()
    config = workdir / "haproxy.cfg"
    config.write_text(proxy_config(defaults, port, dead, alive))
    check = subprocess.run([str(HAPROXY), "-c", "-q", "-f", str(config)], capture_output=True, text=True, check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    log = workdir / "haproxy.log"
    rules = [["INPUT", "-i", "lo", "-p", "tcp", direction, str(dead.port), "-j", "DROP"] for direction in ("--sport", "--dport")]
    with log.open("w") as log_file:
        proxy = subprocess.Popen([str(HAPROXY), "-db", "-f", str(config)], stdout=log_file, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                http.client.HTTPConnection("127.0.0.1", port, timeout=1).connect()
                break
            except OSError:
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.1)

        def silence():
            time.sleep(0.5)
            for rule in rules:
                subprocess.run(["iptables", "-I", *rule], check=True)

        killer = threading.Thread(target=silence)
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        started = time.monotonic()
        killer.start()
        connection.request("POST", "/predictions/echo", body=b"x" * 1024)
        answer = connection.getresponse()
        body = answer.read().decode(errors="replace")
        seconds = time.monotonic() - started
        killer.join()
        return answer.status, body, seconds, log
    finally:
        for rule in rules:
            subprocess.run(["iptables", "-D", *rule], capture_output=True, check=False)
        proxy.terminate()
        proxy.wait(timeout=10)
        dead.close()
        alive.close()


def test_a_request_on_a_task_whose_node_died_is_answered_by_another_task_within_seconds(rendered_defaults, tmp_path):
    assert "option srvtcpka" in rendered_defaults
    status, body, seconds, log = request_while_the_task_dies(tmp_path, rendered_defaults)
    print(f"\nrequest on a task that went silent after 0.5 s: {status} {body!r} after {seconds:.1f} s")
    assert (status, body) == (200, "alive"), log.read_text()
    # idle 2 s + 3 probes 1 s apart, counted from the request's last packet, and a margin.
    assert seconds < 8, log.read_text()
    assert " echo/alive " in log.read_text()


def test_without_server_keepalive_the_same_request_waits_for_the_server_timeout(rendered_defaults, tmp_path):
    control = re.sub(r"^    (option srvtcpka|srvtcpka-\w+ .*)\n", "", rendered_defaults, flags=re.MULTILINE)
    control = re.sub(r"^    timeout server .*$", "    timeout server 8s", control, flags=re.MULTILINE)
    assert "srvtcpka" not in control
    status, body, seconds, log = request_while_the_task_dies(tmp_path, control)
    assert status == 504 and seconds >= 8, (body, log.read_text())
