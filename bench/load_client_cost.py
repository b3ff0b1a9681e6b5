"""What a load generator costs in CPU per request: the tests' thread client, an aiohttp client and Locust, side by side.

    python bench/load_client_cost.py [--requests 3000] [--concurrency 100] [--body-bytes 20000]

The capacity experiments (bench/REPORT.md) run the load generator on the same 2 cores as the worker VMs, so every
CPU-second it spends is taken from the workers' budget; this picks the cheapest client and says how much it costs.
No Docker needed: the server is a local HAProxy (Debian's /usr/sbin/haproxy) on 127.0.0.1 with TLS, answering every
POST at once with a small JSON body, so what is measured is the client's side of TLS, HTTP and bookkeeping. Each
client sends --requests requests with --concurrency in flight, one client after the other, and the figures are the
client process's own CPU time (user + system) over its requests, and the ratio to the cheapest.

Locust runs only when it is installed (`pip install locust`, with the constraints file); it is then driven headless
with FastHttpUser in a child process, stopped after exactly --requests requests.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "tests" / "lab"))
from serving_load import Endpoint, Load  # noqa: E402

HAPROXY = Path("/usr/sbin/haproxy")

HAPROXY_CFG = """\
global
    maxconn 4000
defaults
    mode http
    # The whole body is read before the answer: answering earlier closes the connection under a client still
    # sending, which the client sees as a TLS EOF.
    option http-buffer-request
    timeout connect 1s
    timeout client 30s
    timeout server 30s
frontend inference
    bind 127.0.0.1:{port} ssl crt {pem}
    http-request return status 200 content-type application/json string "{{\\"version\\": \\"1\\"}}"
"""

LOCUSTFILE = """\
import os, ssl
from locust import constant, task
from locust.contrib.fasthttp import FastHttpUser
from locust.exception import StopUser

BODY = os.urandom(int(os.environ["BENCH_BODY_BYTES"]))
LIMIT = int(os.environ["BENCH_REQUESTS"])
CA = os.environ["BENCH_CA"]
sent = 0


class Client(FastHttpUser):
    wait_time = constant(0)
    insecure = False
    ssl_context_factory = staticmethod(lambda: ssl.create_default_context(cafile=CA))

    @task
    def predict(self):
        global sent
        if sent >= LIMIT:
            if self.environment.stats.total.num_requests >= LIMIT:
                self.environment.runner.quit()
            raise StopUser()
        sent += 1
        self.client.post("/predictions/resnet18", data=BODY, headers={"Authorization": "Bearer bench", "Content-Type": "image/jpeg"})
"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def cpu_seconds(who=resource.RUSAGE_SELF) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def threads_client(url: str, ca: str, body: bytes, requests: int, concurrency: int) -> dict:
    cpu, wall = cpu_seconds(), time.monotonic()
    with Load(Endpoint(url, "bench", ca), "resnet18", body, "image/jpeg", clients=concurrency, max_requests=requests, max_seconds=600) as load:
        load.wait_for(lambda answers: len(answers) >= requests, 600, f"{requests} answers")
    return {"requests": len(load.answers), "failed": len(load.failures()), "cpu_s": cpu_seconds() - cpu, "wall_s": time.monotonic() - wall}


def aiohttp_client(url: str, ca: str, body: bytes, requests: int, concurrency: int) -> dict:
    import aiohttp

    async def run() -> tuple[int, int]:
        context = ssl.create_default_context(cafile=ca)
        left, failed, done = requests, 0, 0
        headers = {"Authorization": "Bearer bench", "Content-Type": "image/jpeg"}
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency, ssl=context)) as session:

            async def client():
                nonlocal left, failed, done
                while left > 0:
                    left -= 1
                    try:
                        async with session.post(f"{url}/predictions/resnet18", data=body, headers=headers) as response:
                            await response.read()
                            failed += response.status != 200
                    except aiohttp.ClientError:
                        failed += 1
                    done += 1

            await asyncio.gather(*(client() for _client in range(concurrency)))
        return done, failed

    cpu, wall = cpu_seconds(), time.monotonic()
    done, failed = asyncio.run(run())
    return {"requests": done, "failed": failed, "cpu_s": cpu_seconds() - cpu, "wall_s": time.monotonic() - wall}


def locust_client(url: str, ca: str, body_bytes: int, requests: int, concurrency: int, workdir: Path) -> dict | None:
    locust = shutil.which("locust") or str(Path(sys.executable).with_name("locust"))
    if not Path(locust).exists():
        return None
    locustfile = workdir / "locustfile.py"
    locustfile.write_text(LOCUSTFILE)
    stats = workdir / "locust"
    env = dict(os.environ, BENCH_BODY_BYTES=str(body_bytes), BENCH_REQUESTS=str(requests), BENCH_CA=ca)
    command = [locust, "-f", str(locustfile), "--headless", "-u", str(concurrency), "-r", str(concurrency), "-H", url]
    command += ["-t", "600s", "--only-summary", "--csv", str(stats), "--loglevel", "WARNING"]
    before, wall = cpu_seconds(resource.RUSAGE_CHILDREN), time.monotonic()
    subprocess.run(command, env=env, check=False, capture_output=True, text=True, timeout=660)
    wall = time.monotonic() - wall
    cpu = cpu_seconds(resource.RUSAGE_CHILDREN) - before
    rows = (workdir / "locust_stats.csv").read_text().splitlines()
    header, total = rows[0].split(","), rows[-1].split(",")
    record = dict(zip(header, total, strict=True))
    return {"requests": int(record["Request Count"]), "failed": int(record["Failure Count"]), "cpu_s": cpu, "wall_s": wall}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--body-bytes", type=int, default=20000, help="request body size (a 224x224 JPEG is about 20 kB)")
    args = parser.parse_args()
    if not HAPROXY.exists():
        sys.exit(f"{HAPROXY} not found: install Debian's haproxy (scripts/bootstrap does)")
    with tempfile.TemporaryDirectory(prefix="mlfleet-load-cost-") as tmp:
        workdir = Path(tmp)
        key, cert, pem = workdir / "key.pem", workdir / "cert.pem", workdir / "tls.pem"
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1"]
            + ["-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
            check=True,
            capture_output=True,
        )
        pem.write_text(cert.read_text() + key.read_text())
        port = free_port()
        config = workdir / "haproxy.cfg"
        config.write_text(HAPROXY_CFG.format(port=port, pem=pem))
        proxy = subprocess.Popen([str(HAPROXY), "-db", "-f", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            time.sleep(0.5)
            url, body = f"https://127.0.0.1:{port}", os.urandom(args.body_bytes)
            results = {
                "threads (tests/lab/serving_load.py, requests)": threads_client(url, str(cert), body, args.requests, args.concurrency),
                "aiohttp (asyncio, one process)": aiohttp_client(url, str(cert), body, args.requests, args.concurrency),
            }
            locust = locust_client(url, str(cert), args.body_bytes, args.requests, args.concurrency, workdir)
            if locust:
                results["locust (FastHttpUser, headless, child process)"] = locust
        finally:
            proxy.terminate()
            proxy.wait(timeout=10)
    print(f"{args.requests} requests, {args.concurrency} in flight, {args.body_bytes} B bodies, TLS to a local HAProxy that answers at once")
    cheapest = min(r["cpu_s"] / max(r["requests"], 1) for r in results.values())
    for name, r in results.items():
        per_request = r["cpu_s"] / max(r["requests"], 1)
        print(
            f"  {name:48} {r['requests']:6} done {r['failed']:4} failed  {r['wall_s']:6.1f} s wall  {r['cpu_s']:6.2f} s CPU  "
            f"{1000 * per_request:5.2f} ms CPU/request  x{per_request / cheapest:.2f}"
        )
    if "locust (FastHttpUser, headless, child process)" not in results:
        print("  locust: not installed, not measured")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
