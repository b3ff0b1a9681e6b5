"""Helpers for the serving_pressure tests: the source loaded by path, real HAProxy 2.6 captures, a real HAProxy.

The CAPTURED_* texts are `GET /stats;csv` answers of Debian's HAProxy 2.6.12 (/usr/sbin/haproxy), taken in this order
from one process, with the edge proxy's stats frontend (TLS, Bearer digest ACL, `stats uri /stats`), a backend
`resnet18` of two static servers (`maxconn 2 check`) in front of a Python server that answers after 0.5 s, a backend
`densenet` from `server-template task 1-4 tasks.densenet:8080` whose names never resolve (slots in MAINT (resolution),
as the edge proxy's unused slots), and the edge proxy's server-less `no_such_model` backend.
"""

import hashlib
import socket
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from event_source_support import load_event_source

REPO_ROOT = Path(__file__).resolve().parents[3]
SOURCE_PATH = REPO_ROOT / "extensions/eda/plugins/event_source/serving_pressure.py"
HAPROXY = Path("/usr/sbin/haproxy")


def load_source():
    """serving_pressure as a module, loaded from its file like ansible-rulebook does."""
    return load_event_source("serving_pressure")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class SlowBackend:
    """A stand-in TorchServe task on 127.0.0.1: /ping answers at once, anything else after `delay` seconds;
    paths ending in /err get a 500."""

    def __init__(self, delay: float = 0.5):
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                if self.path != "/ping":
                    time.sleep(delay)
                status = 500 if self.path.endswith("/err") else 200
                try:
                    self.send_response(status)
                    self.send_header("Content-Length", "2")
                    self.end_headers()
                    self.wfile.write(b"ok")
                except (BrokenPipeError, ConnectionResetError):
                    pass  # HAProxy closes health-check connections as soon as it has the status line

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


HAPROXY_CFG = """\
global
    maxconn 200

defaults
    mode http
    option http-buffer-request
    timeout connect 1s
    timeout client 10s
    timeout http-request 5s
    timeout server 10s
    timeout queue 10s
    timeout check 1s

frontend inference
    bind 127.0.0.1:{inference_port}
    use_backend resnet18 if {{ path -m reg ^/predictions/resnet18(/|$) }}
    default_backend no_such_model

frontend stats
    bind 127.0.0.1:{stats_port} ssl crt {tls_pem}
    acl stats_token_valid http_auth_bearer,sha2(256),hex,lower -m str -f {digests}
    http-request return status 401 content-type application/json string "{{\\"error\\": \\"unauthorized\\"}}" unless stats_token_valid
    http-request use-service prometheus-exporter if {{ path /metrics }}
    stats enable
    stats uri /stats
    stats refresh 5s
    stats show-legends

backend no_such_model
    http-request return status 404 content-type application/json string "{{\\"error\\": \\"no such model here\\"}}"

backend resnet18
    balance leastconn
    option httpchk
    http-check send meth GET uri /ping
    http-check expect status 200
    server task1 127.0.0.1:{task1_port} maxconn 2 check inter 1s
    server task2 127.0.0.1:{task2_port} maxconn 2 check inter 1s
"""


class HAProxy:
    """A real HAProxy modelled on the edge proxy, listening on 127.0.0.1 only, with its own certificate and token."""

    def __init__(self, workdir: Path, token: str, task_ports: tuple[int, int]):
        self.workdir = workdir
        self.cert = workdir / "stats-cert.pem"
        key = workdir / "stats-key.pem"
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1"]
            + ["-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(self.cert)],
            check=True,
            capture_output=True,
        )
        tls_pem = workdir / "stats-tls.pem"
        tls_pem.write_text(self.cert.read_text() + key.read_text())
        digests = workdir / "stats-tokens.sha256"
        digests.write_text(hashlib.sha256(token.encode()).hexdigest() + "\n")
        self.inference_port, self.stats_port = free_port(), free_port()
        self.config = workdir / "haproxy.cfg"
        self.config.write_text(
            HAPROXY_CFG.format(
                inference_port=self.inference_port,
                stats_port=self.stats_port,
                tls_pem=tls_pem,
                digests=digests,
                task1_port=task_ports[0],
                task2_port=task_ports[1],
            )
        )
        check = subprocess.run([str(HAPROXY), "-c", "-f", str(self.config)], capture_output=True, text=True, check=False)
        assert check.returncode == 0, check.stdout + check.stderr
        self.log = workdir / "haproxy.log"
        with self.log.open("wb") as log:
            self.process = subprocess.Popen([str(HAPROXY), "-f", str(self.config), "-db"], stdout=log, stderr=subprocess.STDOUT)
        self._wait_listening(self.stats_port)

    @property
    def stats_url(self) -> str:
        return f"https://127.0.0.1:{self.stats_port}"

    @property
    def inference_url(self) -> str:
        return f"http://127.0.0.1:{self.inference_port}"

    def _wait_listening(self, port: int, deadline_s: float = 10.0) -> None:
        deadline = time.monotonic() + deadline_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"haproxy exited with {self.process.returncode}: {self.log.read_text()}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise AssertionError(f"haproxy did not listen on 127.0.0.1:{port} within {deadline_s} s: {self.log.read_text()}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)


# Captured from the real HAProxy 2.6.12, in this order: idle, busy, down, after.

# both servers UP, nothing in flight
CAPTURED_IDLE = """\
# pxname,svname,qcur,qmax,scur,smax,slim,stot,bin,bout,dreq,dresp,ereq,econ,eresp,wretr,wredis,status,weight,act,bck,chkfail,chkdown,lastchg,downtime,qlimit,pid,iid,sid,throttle,lbtot,tracked,type,rate,rate_lim,rate_max,check_status,check_code,check_duration,hrsp_1xx,hrsp_2xx,hrsp_3xx,hrsp_4xx,hrsp_5xx,hrsp_other,hanafail,req_rate,req_rate_max,req_tot,cli_abrt,srv_abrt,comp_in,comp_out,comp_byp,comp_rsp,lastsess,last_chk,last_agt,qtime,ctime,rtime,ttime,agent_status,agent_code,agent_duration,check_desc,agent_desc,check_rise,check_fall,check_health,agent_rise,agent_fall,agent_health,addr,cookie,mode,algo,conn_rate,conn_rate_max,conn_tot,intercepted,dcon,dses,wrew,connect,reuse,cache_lookups,cache_hits,srv_icur,src_ilim,qtime_max,ctime_max,rtime_max,ttime_max,eint,idle_conn_cur,safe_conn_cur,used_conn_cur,need_conn_est,uweight,agg_server_status,agg_server_check_status,agg_check_status,-,ssl_sess,ssl_reused_sess,ssl_failed_handshake,h2_headers_rcvd,h2_data_rcvd,h2_settings_rcvd,h2_rst_stream_rcvd,h2_goaway_rcvd,h2_detected_conn_protocol_errors,h2_detected_strm_protocol_errors,h2_rst_stream_resp,h2_goaway_resp,h2_open_connections,h2_backend_open_streams,h2_total_connections,h2_backend_total_streams,h1_open_connections,h1_open_streams,h1_total_connections,h1_total_streams,h1_bytes_in,h1_bytes_out,h1_spliced_bytes_in,h1_spliced_bytes_out,
inference,FRONTEND,,,0,0,100,0,0,0,0,0,0,,,,,OPEN,,,,,,,,,1,1,0,,,,0,0,0,0,,,,0,0,0,0,0,0,,0,0,0,,,0,0,0,0,,,,,,,,,,,,,,,,,,,,,http,,0,0,0,0,0,0,0,,,0,0,,,,,,,0,,,,,,,,,-,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,
stats,FRONTEND,,,1,1,100,1,0,0,0,0,0,,,,,OPEN,,,,,,,,,1,2,0,,,,0,1,0,1,,,,0,0,0,0,0,0,,1,1,1,,,0,0,0,0,,,,,,,,,,,,,,,,,,,,,http,,1,1,1,1,0,0,0,,,0,0,,,,,,,0,,,,,,,,,-,1,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,124,0,0,0,
resnet18,task1,0,0,0,0,2,0,0,0,,0,,0,0,0,0,UP,1,1,0,1,1,1,2,,1,3,1,,0,,2,0,,0,L7OK,200,1,0,0,0,0,0,0,,,,0,0,0,,,,,-1,,,0,0,0,0,,,,Layer7 check passed,,2,3,4,,,,127.0.0.1:18091,,http,,,,,,,,0,0,0,,,0,,0,0,0,0,0,0,0,0,1,1,,,,-,0,0,0,,,,,,,,,,,,,,,,,,,,,,
resnet18,task2,0,0,0,0,2,0,0,0,,0,,0,0,0,0,UP,1,1,0,0,0,3,0,,1,3,2,,0,,2,0,,0,L7OK,200,1,0,0,0,0,0,0,,,,0,0,0,,,,,-1,,,0,0,0,0,,,,Layer7 check passed,,2,3,4,,,,127.0.0.1:18092,,http,,,,,,,,0,0,0,,,0,,0,0,0,0,0,0,0,0,1,1,,,,-,0,0,0,,,,,,,,,,,,,,,,,,,,,,
resnet18,BACKEND,0,0,0,0,10,0,0,0,0,0,,0,0,0,0,UP,2,2,0,,0,3,0,,1,3,0,,0,,1,0,,0,,,,0,0,0,0,0,0,,,,0,0,0,0,0,0,0,-1,,,0,0,0,0,,,,,,,,,,,,,,http,leastconn,,,,,,,0,0,0,0,0,,,0,0,0,0,0,,,,,2,0,0,0,-,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,6,6,563,110,0,0,
no_such_model,BACKEND,0,0,0,0,10,0,0,0,0,0,,0,0,0,0,UP,0,0,0,,0,3,,,1,4,0,,0,,1,0,,0,,,,0,0,0,0,0,0,,,,0,0,0,0,0,0,0,-1,,,0,0,0,0,,,,,,,,,,,,,,http,roundrobin,,,,,,,0,0,0,0,0,,,0,0,0,0,0,,,,,0,0,0,0,-,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,
densenet,task1,0,0,0,0,8,0,0,0,,0,,0,0,0,0,MAINT (resolution),1,1,0,0,1,3,3,,1,5,1,,0,,2,0,,0,,,,0,0,0,0,0,0,,,,0,0,0,,,,,-1,,,0,0,0,0,,,,,,,,,,,,,,http,,,,,,,,0,0,0,,,0,,0,0,0,0,0,0,0,0,0,1,,,,-,0,0,0,,,,,,,,,,,,,,,,,,,,,,
densenet,task2,0,0,0,0,8,0,0,0,,0,,0,0,0,0,MAINT (resolution),1,1,0,0,1,3,3,,1,5,2,,0,,2,0,,0,,,,0,0,0,0,0,0,,,,0,0,0,,,,,-1,,,0,0,0,0,,,,,,,,,,,,,,http,,,,,,,,0,0,0,,,0,,0,0,0,0,0,0,0,0,0,1,,,,-,0,0,0,,,,,,,,,,,,,,,,,,,,,,
densenet,task3,0,0,0,0,8,0,0,0,,0,,0,0,0,0,MAINT (resolution),1,1,0,0,1,3,3,,1,5,3,,0,,2,0,,0,,,,0,0,0,0,0,0,,,,0,0,0,,,,,-1,,,0,0,0,0,,,,,,,,,,,,,,http,,,,,,,,0,0,0,,,0,,0,0,0,0,0,0,0,0,0,1,,,,-,0,0,0,,,,,,,,,,,,,,,,,,,,,,
densenet,task4,0,0,0,0,8,0,0,0,,0,,0,0,0,0,MAINT (resolution),1,1,0,0,1,3,3,,1,5,4,,0,,2,0,,0,,,,0,0,0,0,0,0,,,,0,0,0,,,,,-1,,,0,0,0,0,,,,,,,,,,,,,,http,,,,,,,,0,0,0,,,0,,0,0,0,0,0,0,0,0,0,1,,,,-,0,0,0,,,,,,,,,,,,,,,,,,,,,,
densenet,BACKEND,0,0,0,0,1,0,0,0,0,0,,0,0,0,0,DOWN,0,0,0,,1,3,3,,1,5,0,,0,,1,0,,0,,,,0,0,0,0,0,0,,,,0,0,0,0,0,0,0,-1,,,0,0,0,0,,,,,,,,,,,,,,http,roundrobin,,,,,,,0,0,0,0,0,,,0,0,0,0,0,,,,,0,0,0,0,-,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,
"""  # noqa: E501

# 12 concurrent clients: 2 in flight on each server (maxconn 2), 8 queued in the backend
CAPTURED_BUSY = """\
# pxname,svname,qcur,qmax,scur,smax,slim,stot,bin,bout,dreq,dresp,ereq,econ,eresp,wretr,wredis,status,weight,act,bck,chkfail,chkdown,lastchg,downtime,qlimit,pid,iid,sid,throttle,lbtot,tracked,type,rate,rate_lim,rate_max,check_status,check_code,check_duration,hrsp_1xx,hrsp_2xx,hrsp_3xx,hrsp_4xx,hrsp_5xx,hrsp_other,hanafail,req_rate,req_rate_max,req_tot,cli_abrt,srv_abrt,comp_in,comp_out,comp_byp,comp_rsp,lastsess,last_chk,last_agt,qtime,ctime,rtime,ttime,agent_status,agent_code,agent_duration,check_desc,agent_desc,check_rise,check_fall,check_health,agent_rise,agent_fall,agent_health,addr,cookie,mode,algo,conn_rate,conn_rate_max,conn_tot,intercepted,dcon,dses,wrew,connect,reuse,cache_lookups,cache_hits,srv_icur,src_ilim,qtime_max,ctime_max,rtime_max,ttime_max,eint,idle_conn_cur,safe_conn_cur,used_conn_cur,need_conn_est,uweight,agg_server_status,agg_server_check_status,agg_check_status,-,ssl_sess,ssl_reused_sess,ssl_failed_handshake,h2_headers_rcvd,h2_data_rcvd,h2_settings_rcvd,h2_rst_stream_rcvd,h2_goaway_rcvd,h2_detected_conn_protocol_errors,h2_detected_strm_protocol_errors,h2_rst_stream_resp,h2_goaway_resp,h2_open_connections,h2_backend_open_streams,h2_total_connections,h2_backend_total_streams,h1_open_connections,h1_open_streams,h1_total_connections,h1_total_streams,h1_bytes_in,h1_bytes_out,h1_spliced_bytes_in,h1_spliced_bytes_out,
inference,FRONTEND,,,12,12,100,12,0,0,0,0,0,,,,,OPEN,,,,,,,,,1,1,0,,,,0,12,0,12,,,,0,0,0,0,0,0,,12,12,12,,,0,0,0,0,,,,,,,,,,,,,,,,,,,,,http,,12,12,12,0,0,0,0,,,0,0,,,,,,,0,,,,,,,,,-,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,12,12,12,12,1188,0,0,0,
stats,FRONTEND,,,1,1,100,2,123,4042,0,0,0,,,,,OPEN,,,,,,,,,1,2,0,,,,0,2,0,2,,,,0,1,0,0,0,0,,2,2,2,,,0,0,0,0,,,,,,,,,,,,,,,,,,,,,http,,2,2,2,2,0,0,0,,,0,0,,,,,,,0,,,,,,,,,-,2,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,1,1,2,2,248,4051,0,0,
resnet18,task1,0,0,2,2,2,2,0,0,,0,,0,0,0,0,UP,1,1,0,1,1,1,2,,1,3,1,,2,,2,2,,2,L7OK,200,1,0,0,0,0,0,0,,,,0,0,0,,,,,0,,,0,0,0,0,,,,Layer7 check passed,,2,3,4,,,,127.0.0.1:18091,,http,,,,,,,,0,2,0,,,0,,0,0,0,0,0,0,0,2,2,1,,,,-,0,0,0,,,,,,,,,,,,,,,,,,,,,,
resnet18,task2,0,0,2,2,2,2,0,0,,0,,0,0,0,0,UP,1,1,0,0,0,3,0,,1,3,2,,2,,2,2,,2,L7OK,200,1,0,0,0,0,0,0,,,,0,0,0,,,,,0,,,0,0,0,0,,,,Layer7 check passed,,2,3,4,,,,127.0.0.1:18092,,http,,,,,,,,0,2,0,,,0,,0,0,0,0,0,0,0,2,2,1,,,,-,0,0,0,,,,,,,,,,,,,,,,,,,,,,
resnet18,BACKEND,8,8,12,12,10,12,0,0,0,0,,0,0,0,0,UP,2,2,0,,0,3,0,,1,3,0,,4,,1,12,,12,,,,0,0,0,0,0,0,,,,0,0,0,0,0,0,0,0,,,0,0,0,0,,,,,,,,,,,,,,http,leastconn,,,,,,,0,4,0,0,0,,,0,0,0,0,0,,,,,2,0,0,0,-,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,4,4,10,10,563,506,0,0,
no_such_model,BACKEND,0,0,0,0,10,0,0,0,0,0,,0,0,0,0,UP,0,0,0,,0,3,,,1,4,0,,0,,1,0,,0,,,,0,0,0,0,0,0,,,,0,0,0,0,0,0,0,-1,,,0,0,0,0,,,,,,,,,,,,,,http,roundrobin,,,,,,,0,0,0,0,0,,,0,0,0,0,0,,,,,0,0,0,0,-,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,
densenet,task1,0,0,0,0,8,0,0,0,,0,,0,0,0,0,MAINT (resolution),1,1,0,0,1,3,3,,1,5,1,,0,,2,0,,0,,,,0,0,0,0,0,0,,,,0,0,0,,,,,-1,,,0,0,0,0,,,,,,,,,,,,,,http,,,,,,,,0,0,0,,,0,,0,0,0,0,0,0,0,0,0,1,,,,-,0,0,0,,,,,,,,,,,,,,,,,,,,,,
densenet,task2,0,0,0,0,8,0,0,0,,0,,0,0,0,0,MAINT (resolution),1,1,0,0,1,3,3,,1,5,2,,0,,2,0,,0,,,,0,0,0,0,0,0,,,,0,0,0,,,,,-1,,,0,0,0,0,,,,,,,,,,,,,,http,,,,,,,,0,0,0,,,0,,0,0,0,0,0,0,0,0,0,1,,,,-,0,0,0,,,,,,,,,,,,,,,,,,,,,,
densenet,task3,0,0,0,0,8,0,0,0,,0,,0,0,0,0,MAINT (resolution),1,1,0,0,1,3,3,,1,5,3,,0,,2,0,,0,,,,0,0,0,0,0,0,,,,0,0,0,,,,,-1,,,0,0,0,0,,,,,,,,,,,,,,http,,,,,,,,0,0,0,,,0,,0,0,0,0,0,0,0,0,0,1,,,,-,0,0,0,,,,,,,,,,,,,,,,,,,,,,
densenet,task4,0,0,0,0,8,0,0,0,,0,,0,0,0,0,MAINT (resolution),1,1,0,0,1,3,3,,1,5,4,,0,,2,0,,0,,,,0,0,0,0,0,0,,,,0,0,0,,,,,-1,,,0,0,0,0,,,,,,,,,,,,,,http,,,,,,,,0,0,0,,,0,,0,0,0,0,0,0,0,0,0,1,,,,-,0,0,0,,,,,,,,,,,,,,,,,,,,,,
densenet,BACKEND,0,0,0,0,1,0,0,0,0,0,,0,0,0,0,DOWN,0,0,0,,1,3,3,,1,5,0,,0,,1,0,,0,,,,0,0,0,0,0,0,,,,0,0,0,0,0,0,0,-1,,,0,0,0,0,,,,,,,,,,,,,,http,roundrobin,,,,,,,0,0,0,0,0,,,0,0,0,0,0,,,,,0,0,0,0,-,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,
"""  # noqa: E501

# task2 stopped and marked DOWN by its health check, 6 clients: 2 in flight on task1, 4 queued
CAPTURED_DOWN = """\
# pxname,svname,qcur,qmax,scur,smax,slim,stot,bin,bout,dreq,dresp,ereq,econ,eresp,wretr,wredis,status,weight,act,bck,chkfail,chkdown,lastchg,downtime,qlimit,pid,iid,sid,throttle,lbtot,tracked,type,rate,rate_lim,rate_max,check_status,check_code,check_duration,hrsp_1xx,hrsp_2xx,hrsp_3xx,hrsp_4xx,hrsp_5xx,hrsp_other,hanafail,req_rate,req_rate_max,req_tot,cli_abrt,srv_abrt,comp_in,comp_out,comp_byp,comp_rsp,lastsess,last_chk,last_agt,qtime,ctime,rtime,ttime,agent_status,agent_code,agent_duration,check_desc,agent_desc,check_rise,check_fall,check_health,agent_rise,agent_fall,agent_health,addr,cookie,mode,algo,conn_rate,conn_rate_max,conn_tot,intercepted,dcon,dses,wrew,connect,reuse,cache_lookups,cache_hits,srv_icur,src_ilim,qtime_max,ctime_max,rtime_max,ttime_max,eint,idle_conn_cur,safe_conn_cur,used_conn_cur,need_conn_est,uweight,agg_server_status,agg_server_check_status,agg_check_status,-,ssl_sess,ssl_reused_sess,ssl_failed_handshake,h2_headers_rcvd,h2_data_rcvd,h2_settings_rcvd,h2_rst_stream_rcvd,h2_goaway_rcvd,h2_detected_conn_protocol_errors,h2_detected_strm_protocol_errors,h2_rst_stream_resp,h2_goaway_resp,h2_open_connections,h2_backend_open_streams,h2_total_connections,h2_backend_total_streams,h1_open_connections,h1_open_streams,h1_total_connections,h1_total_streams,h1_bytes_in,h1_bytes_out,h1_spliced_bytes_in,h1_spliced_bytes_out,
inference,FRONTEND,,,6,12,100,19,1330,1508,0,0,0,,,,,OPEN,,,,,,,,,1,1,0,,,,0,6,0,12,,,,0,13,0,0,0,0,,6,12,19,,,0,0,0,0,,,,,,,,,,,,,,,,,,,,,http,,6,12,19,0,0,0,0,,,0,0,,,,,,,0,,,,,,,,,-,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,6,6,19,19,1885,1781,0,0,
stats,FRONTEND,,,1,1,100,4,369,12247,0,0,0,,,,,OPEN,,,,,,,,,1,2,0,,,,0,1,0,2,,,,0,3,0,0,0,0,,1,2,4,,,0,0,0,0,,,,,,,,,,,,,,,,,,,,,http,,1,2,4,4,0,0,0,,,0,0,,,,,,,0,,,,,,,,,-,4,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,1,1,4,4,496,12274,0,0,
resnet18,task1,0,0,2,2,2,8,612,696,,0,,0,0,0,0,UP,1,1,0,1,1,8,2,,1,3,1,,4,,2,2,,4,L7OK,200,1,0,6,0,0,0,0,,,,6,0,0,,,,,1,,,499,1,502,1001,,,,Layer7 check passed,,2,3,4,,,,127.0.0.1:18091,,http,,,,,,,,0,8,0,,,0,,998,1,504,1499,0,0,0,2,3,1,,,,-,0,0,0,,,,,,,,,,,,,,,,,,,,,,
resnet18,task2,0,0,0,2,2,7,718,812,,0,,0,0,0,0,DOWN,1,1,0,3,1,3,3,,1,3,2,,3,,2,0,,4,L4CON,,0,0,7,0,0,0,0,,,,7,0,0,,,,,6,Connection refused,,427,1,502,929,,,,Layer4 connection problem,,2,3,0,,,,127.0.0.1:18092,,http,,,,,,,,0,7,0,,,0,,998,1,503,1499,0,0,0,0,3,1,,,,-,0,0,0,,,,,,,,,,,,,,,,,,,,,,
resnet18,BACKEND,4,8,6,12,10,19,1330,1508,0,0,,0,0,0,0,UP,1,1,0,,0,10,0,,1,3,0,,7,,1,6,,12,,,,0,13,0,0,0,0,,,,13,0,0,0,0,0,0,1,,,461,1,502,962,,,,,,,,,,,,,,http,leastconn,,,,,,,0,15,0,0,0,,,998,1,504,1499,0,,,,,1,0,0,0,-,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,2,2,35,35,3043,1797,0,0,
no_such_model,BACKEND,0,0,0,0,10,0,0,0,0,0,,0,0,0,0,UP,0,0,0,,0,10,,,1,4,0,,0,,1,0,,0,,,,0,0,0,0,0,0,,,,0,0,0,0,0,0,0,-1,,,0,0,0,0,,,,,,,,,,,,,,http,roundrobin,,,,,,,0,0,0,0,0,,,0,0,0,0,0,,,,,0,0,0,0,-,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,
densenet,task1,0,0,0,0,8,0,0,0,,0,,0,0,0,0,MAINT (resolution),1,1,0,0,1,10,10,,1,5,1,,0,,2,0,,0,,,,0,0,0,0,0,0,,,,0,0,0,,,,,-1,,,0,0,0,0,,,,,,,,,,,,,,http,,,,,,,,0,0,0,,,0,,0,0,0,0,0,0,0,0,0,1,,,,-,0,0,0,,,,,,,,,,,,,,,,,,,,,,
densenet,task2,0,0,0,0,8,0,0,0,,0,,0,0,0,0,MAINT (resolution),1,1,0,0,1,10,10,,1,5,2,,0,,2,0,,0,,,,0,0,0,0,0,0,,,,0,0,0,,,,,-1,,,0,0,0,0,,,,,,,,,,,,,,http,,,,,,,,0,0,0,,,0,,0,0,0,0,0,0,0,0,0,1,,,,-,0,0,0,,,,,,,,,,,,,,,,,,,,,,
densenet,task3,0,0,0,0,8,0,0,0,,0,,0,0,0,0,MAINT (resolution),1,1,0,0,1,10,10,,1,5,3,,0,,2,0,,0,,,,0,0,0,0,0,0,,,,0,0,0,,,,,-1,,,0,0,0,0,,,,,,,,,,,,,,http,,,,,,,,0,0,0,,,0,,0,0,0,0,0,0,0,0,0,1,,,,-,0,0,0,,,,,,,,,,,,,,,,,,,,,,
densenet,task4,0,0,0,0,8,0,0,0,,0,,0,0,0,0,MAINT (resolution),1,1,0,0,1,10,10,,1,5,4,,0,,2,0,,0,,,,0,0,0,0,0,0,,,,0,0,0,,,,,-1,,,0,0,0,0,,,,,,,,,,,,,,http,,,,,,,,0,0,0,,,0,,0,0,0,0,0,0,0,0,0,1,,,,-,0,0,0,,,,,,,,,,,,,,,,,,,,,,
densenet,BACKEND,0,0,0,0,1,0,0,0,0,0,,0,0,0,0,DOWN,0,0,0,,1,10,10,,1,5,0,,0,,1,0,,0,,,,0,0,0,0,0,0,,,,0,0,0,0,0,0,0,-1,,,0,0,0,0,,,,,,,,,,,,,,http,roundrobin,,,,,,,0,0,0,0,0,,,0,0,0,0,0,,,,,0,0,0,0,-,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,
"""  # noqa: E501

# the load is over; two requests were answered with 500 (hrsp_5xx 2), rtime/qtime averages set
CAPTURED_AFTER = """\
# pxname,svname,qcur,qmax,scur,smax,slim,stot,bin,bout,dreq,dresp,ereq,econ,eresp,wretr,wredis,status,weight,act,bck,chkfail,chkdown,lastchg,downtime,qlimit,pid,iid,sid,throttle,lbtot,tracked,type,rate,rate_lim,rate_max,check_status,check_code,check_duration,hrsp_1xx,hrsp_2xx,hrsp_3xx,hrsp_4xx,hrsp_5xx,hrsp_other,hanafail,req_rate,req_rate_max,req_tot,cli_abrt,srv_abrt,comp_in,comp_out,comp_byp,comp_rsp,lastsess,last_chk,last_agt,qtime,ctime,rtime,ttime,agent_status,agent_code,agent_duration,check_desc,agent_desc,check_rise,check_fall,check_health,agent_rise,agent_fall,agent_health,addr,cookie,mode,algo,conn_rate,conn_rate_max,conn_tot,intercepted,dcon,dses,wrew,connect,reuse,cache_lookups,cache_hits,srv_icur,src_ilim,qtime_max,ctime_max,rtime_max,ttime_max,eint,idle_conn_cur,safe_conn_cur,used_conn_cur,need_conn_est,uweight,agg_server_status,agg_server_check_status,agg_check_status,-,ssl_sess,ssl_reused_sess,ssl_failed_handshake,h2_headers_rcvd,h2_data_rcvd,h2_settings_rcvd,h2_rst_stream_rcvd,h2_goaway_rcvd,h2_detected_conn_protocol_errors,h2_detected_strm_protocol_errors,h2_rst_stream_resp,h2_goaway_resp,h2_open_connections,h2_backend_open_streams,h2_total_connections,h2_backend_total_streams,h1_open_connections,h1_open_streams,h1_total_connections,h1_total_streams,h1_bytes_in,h1_bytes_out,h1_spliced_bytes_in,h1_spliced_bytes_out,
inference,FRONTEND,,,0,12,100,21,2154,2474,0,0,0,,,,,OPEN,,,,,,,,,1,1,0,,,,0,1,0,12,,,,0,19,0,0,2,0,,1,12,21,,,0,0,0,0,,,,,,,,,,,,,,,,,,,,,http,,1,12,21,0,0,0,0,,,0,0,,,,,,,0,,,,,,,,,-,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,21,21,2091,2915,0,0,
stats,FRONTEND,,,1,1,100,5,492,16418,0,0,0,,,,,OPEN,,,,,,,,,1,2,0,,,,0,1,0,2,,,,0,4,0,0,0,0,,1,2,5,,,0,0,0,0,,,,,,,,,,,,,,,,,,,,,http,,1,2,5,5,0,0,0,,,0,0,,,,,,,0,,,,,,,,,-,5,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,1,1,5,5,620,16454,0,0,
resnet18,task1,0,0,0,2,2,13,1330,1527,,0,,0,0,0,0,UP,1,1,0,1,1,17,2,,1,3,1,,5,,2,1,,4,L7OK,200,1,0,12,0,0,1,0,,,,13,0,0,,,,,1,,,462,1,502,964,,,,Layer7 check passed,,2,3,4,,,,127.0.0.1:18091,,http,,,,,,,,0,13,0,,,0,,1004,1,504,1507,0,0,0,0,3,1,,,,-,0,0,0,,,,,,,,,,,,,,,,,,,,,,
resnet18,task2,0,0,0,2,2,8,824,947,,0,,0,0,0,0,UP,1,1,0,3,1,1,11,,1,3,2,,4,,2,1,,4,L7OK,200,1,0,7,0,0,1,0,,,,8,0,0,,,,,0,,,374,1,502,876,,,,Layer7 check passed,,2,3,4,,,,127.0.0.1:18092,,http,,,,,,,,0,8,0,,,0,,998,1,503,1499,0,0,0,0,3,1,,,,-,0,0,0,,,,,,,,,,,,,,,,,,,,,,
resnet18,BACKEND,0,8,0,12,10,21,2154,2474,0,0,,0,0,0,0,UP,2,2,0,,0,19,0,,1,3,0,,9,,1,1,,12,,,,0,19,0,0,2,0,,,,21,0,0,0,0,0,0,0,,,429,1,502,931,,,,,,,,,,,,,,http,leastconn,,,,,,,0,21,0,0,0,,,1004,1,504,1507,0,,,,,2,0,0,0,-,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,60,60,5450,2685,0,0,
no_such_model,BACKEND,0,0,0,0,10,0,0,0,0,0,,0,0,0,0,UP,0,0,0,,0,19,,,1,4,0,,0,,1,0,,0,,,,0,0,0,0,0,0,,,,0,0,0,0,0,0,0,-1,,,0,0,0,0,,,,,,,,,,,,,,http,roundrobin,,,,,,,0,0,0,0,0,,,0,0,0,0,0,,,,,0,0,0,0,-,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,
densenet,task1,0,0,0,0,8,0,0,0,,0,,0,0,0,0,MAINT (resolution),1,1,0,0,1,19,19,,1,5,1,,0,,2,0,,0,,,,0,0,0,0,0,0,,,,0,0,0,,,,,-1,,,0,0,0,0,,,,,,,,,,,,,,http,,,,,,,,0,0,0,,,0,,0,0,0,0,0,0,0,0,0,1,,,,-,0,0,0,,,,,,,,,,,,,,,,,,,,,,
densenet,task2,0,0,0,0,8,0,0,0,,0,,0,0,0,0,MAINT (resolution),1,1,0,0,1,19,19,,1,5,2,,0,,2,0,,0,,,,0,0,0,0,0,0,,,,0,0,0,,,,,-1,,,0,0,0,0,,,,,,,,,,,,,,http,,,,,,,,0,0,0,,,0,,0,0,0,0,0,0,0,0,0,1,,,,-,0,0,0,,,,,,,,,,,,,,,,,,,,,,
densenet,task3,0,0,0,0,8,0,0,0,,0,,0,0,0,0,MAINT (resolution),1,1,0,0,1,19,19,,1,5,3,,0,,2,0,,0,,,,0,0,0,0,0,0,,,,0,0,0,,,,,-1,,,0,0,0,0,,,,,,,,,,,,,,http,,,,,,,,0,0,0,,,0,,0,0,0,0,0,0,0,0,0,1,,,,-,0,0,0,,,,,,,,,,,,,,,,,,,,,,
densenet,task4,0,0,0,0,8,0,0,0,,0,,0,0,0,0,MAINT (resolution),1,1,0,0,1,19,19,,1,5,4,,0,,2,0,,0,,,,0,0,0,0,0,0,,,,0,0,0,,,,,-1,,,0,0,0,0,,,,,,,,,,,,,,http,,,,,,,,0,0,0,,,0,,0,0,0,0,0,0,0,0,0,1,,,,-,0,0,0,,,,,,,,,,,,,,,,,,,,,,
densenet,BACKEND,0,0,0,0,1,0,0,0,0,0,,0,0,0,0,DOWN,0,0,0,,1,19,19,,1,5,0,,0,,1,0,,0,,,,0,0,0,0,0,0,,,,0,0,0,0,0,0,0,-1,,,0,0,0,0,,,,,,,,,,,,,,http,roundrobin,,,,,,,0,0,0,0,0,,,0,0,0,0,0,,,,,0,0,0,0,-,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,
"""  # noqa: E501
