"""edge_proxy_standby against a real HAProxy on 127.0.0.1: standby servers at weight 0 take no request, promotion puts
them into rotation through the admin socket, and the saved server state survives a restart of the proxy."""

from __future__ import annotations

import os
import subprocess
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from test_swarm_join import run_module

HAPROXY = Path("/usr/sbin/haproxy")
pytestmark = pytest.mark.skipif(not HAPROXY.exists(), reason="needs Debian's HAProxy (/usr/sbin/haproxy), which scripts/bootstrap installs")


class Task:
    """A stand-in replica on 127.0.0.1 that answers its name."""

    def __init__(self, name):
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(200)
                self.send_header("Content-Length", str(len(name)))
                self.end_headers()
                self.wfile.write(name.encode())

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


class Proxy:
    """HAProxy with the edge proxy's runtime settings: the admin socket and the server-state file in one directory."""

    def __init__(self, runtime_dir: Path, main: Task, standby: Task):
        self.runtime_dir = runtime_dir
        probe = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
        self.port = probe.server_address[1]
        probe.server_close()
        self.config = runtime_dir.parent / "haproxy.cfg"
        self.config.write_text(
            f"""global
    stats socket {runtime_dir}/admin.sock mode 600 level admin
    server-state-file {runtime_dir}/server-state
defaults
    mode http
    timeout connect 1s
    timeout client 5s
    timeout server 5s
    load-server-state-from-file global
frontend inference
    bind 127.0.0.1:{self.port}
    default_backend resnet18
backend resnet18
    balance roundrobin
    server task1 127.0.0.1:{main.port}
    server-template standby 1-2 127.0.0.1:{standby.port} weight 0
backend densenet161
    server task1 127.0.0.1:{main.port}
"""
        )
        self.process = None

    def start(self):
        self.process = subprocess.Popen([str(HAPROXY), "-f", str(self.config)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while not (self.runtime_dir / "admin.sock").exists():
            assert time.monotonic() < deadline, self.process.stderr.read1().decode() if self.process.poll() is not None else "no admin socket"
            time.sleep(0.05)

    def stop(self):
        self.process.terminate()
        self.process.wait(timeout=10)
        (self.runtime_dir / "admin.sock").unlink(missing_ok=True)

    def answers(self, count):
        names = [urllib.request.urlopen(f"http://127.0.0.1:{self.port}/", timeout=5).read().decode() for _request in range(count)]
        return {name: names.count(name) for name in set(names)}


@pytest.fixture
def proxy(tmp_path):
    runtime_dir = tmp_path / "runtime"
    runtime_dir.mkdir()
    main, standby = Task("main"), Task("standby")
    running = Proxy(runtime_dir, main, standby)
    running.start()
    yield running
    running.stop()
    main.close()
    standby.close()


def standby(capsys, proxy, **args):
    from ansible_collections.mlfleet.serving.plugins.modules import edge_proxy_standby

    return run_module(capsys, edge_proxy_standby, service="resnet18", runtime_dir=str(proxy.runtime_dir), **args)


def test_standby_servers_take_no_request_until_promoted_and_again_after_a_return(capsys, proxy):
    assert proxy.answers(6) == {"main": 6}
    promoted = standby(capsys, proxy)
    assert promoted["rc"] == 0 and promoted["changed"], promoted
    assert [(s["name"], s["previous_weight"], s["weight"]) for s in promoted["servers"]] == [("standby1", 0, 1), ("standby2", 0, 1)]
    assert promoted["serving"] == 2
    # Round robin over three servers of weight 1: the two standby slots take two of every three requests.
    assert proxy.answers(6) == {"main": 2, "standby": 4}
    again = standby(capsys, proxy)
    assert again["rc"] == 0 and not again["changed"] and again["state_file"] is None
    returned = standby(capsys, proxy, state="standby")
    assert returned["changed"] and [s["weight"] for s in returned["servers"]] == [0, 0]
    assert proxy.answers(6) == {"main": 6}


def test_a_return_waits_for_the_services_own_servers_and_holds_the_standby_when_they_are_too_few(capsys, proxy):
    standby(capsys, proxy)
    # One own server (task1) is up: a return that waits for two keeps the standby servers in rotation.
    started = time.monotonic()
    held = standby(capsys, proxy, state="standby", serving_before_return=2, wait_timeout=1.5)
    assert held["rc"] == 0 and not held["changed"] and held["held"], held
    assert time.monotonic() - started >= 1.5
    assert held["own_serving"] == 1 and [s["weight"] for s in held["servers"]] == [1, 1]
    assert "1 of the 2 own servers of resnet18" in held["msg"]
    assert proxy.answers(6) == {"main": 2, "standby": 4}
    returned = standby(capsys, proxy, state="standby", serving_before_return=1, wait_timeout=1.5)
    assert returned["changed"] and not returned["held"] and [s["weight"] for s in returned["servers"]] == [0, 0]
    assert proxy.answers(3) == {"main": 3}


def test_the_weights_survive_a_restart_of_the_proxy(capsys, proxy):
    promoted = standby(capsys, proxy)
    assert promoted["state_file"] == str(proxy.runtime_dir / "server-state")
    assert oct(os.stat(promoted["state_file"]).st_mode & 0o777) == "0o600"
    proxy.stop()
    proxy.start()
    assert proxy.answers(6) == {"main": 2, "standby": 4}
    assert not standby(capsys, proxy)["changed"], "the restarted proxy loaded the promoted weights"


@pytest.mark.skipif(os.geteuid() != 0, reason="root writes the state file for the proxy's user")
def test_the_state_file_belongs_to_the_proxys_user_when_root_writes_it(capsys, proxy):
    # The edge proxy runs as haproxy (uid 99) and owns its runtime directory; the module runs as root over SSH.
    os.chown(proxy.runtime_dir, 4242, 4243)
    promoted = standby(capsys, proxy)
    owner = os.stat(promoted["state_file"])
    assert (owner.st_uid, owner.st_gid) == (4242, 4243) and oct(owner.st_mode & 0o777) == "0o600"


def test_check_mode_reports_and_changes_nothing(capsys, proxy):
    checked = standby(capsys, proxy, check_mode=True, diff=True)
    assert checked["changed"] and checked["diff"] == {"before": {"standby1": 0, "standby2": 0}, "after": {"standby1": 1, "standby2": 1}}
    assert not (proxy.runtime_dir / "server-state").exists()
    assert proxy.answers(3) == {"main": 3}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"service": "densenet161"}, "the edge proxy's backend densenet161 has no standby servers (standby1, ...): give the service warm_replicas"),
        ({"service": "nosuch"}, "show servers state for backend nosuch; is there a backend nosuch"),
        ({"weight": 0}, "weight must be 1 to 256"),
    ],
)
def test_what_cannot_be_done_is_named(capsys, proxy, args, message):
    from ansible_collections.mlfleet.serving.plugins.modules import edge_proxy_standby

    result = run_module(capsys, edge_proxy_standby, **({"service": "resnet18", "runtime_dir": str(proxy.runtime_dir)} | args))
    assert result["rc"] == 1 and message in result["msg"], result


def test_a_node_without_the_proxys_socket_is_named(capsys, tmp_path):
    from ansible_collections.mlfleet.serving.plugins.modules import edge_proxy_standby

    result = run_module(capsys, edge_proxy_standby, service="resnet18", runtime_dir=str(tmp_path))
    assert result["rc"] == 1 and f"no HAProxy admin socket at {tmp_path}/admin.sock" in result["msg"], result
