"""A light, bounded inference load through the edge proxy that counts every answer.

Each client thread sends one request at a time; the load stops at a request count or a deadline, whichever
comes first, so a test can never flood the lab. Every answer is kept (status, task that served it, model
version, latency), so a test can count failures over a whole scale action or rollout.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import requests


@dataclass
class Answer:
    started: float
    seconds: float
    status: int  # 0: no HTTP answer at all (connection error, timeout)
    task: str
    version: str
    error: str = ""
    node: str = ""  # the swarm node (VM) whose task answered


@dataclass
class Endpoint:
    url: str
    token: str
    ca_file: str


@dataclass
class Load:
    endpoint: Endpoint
    model: str
    body: bytes
    content_type: str
    clients: int = 2
    max_requests: int = 2000
    max_seconds: float = 300.0
    pause: float = 0.05
    answers: list[Answer] = field(default_factory=list)

    def __post_init__(self):
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.sent = 0
        self.threads = [threading.Thread(target=self.client, name=f"load-client-{number}", daemon=True) for number in range(self.clients)]

    def __enter__(self):
        self.deadline = time.monotonic() + self.max_seconds
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    def stop(self):
        self.stopping.set()
        for thread in self.threads:
            thread.join(timeout=120)

    def take_turn(self) -> bool:
        with self.lock:
            if self.stopping.is_set() or self.sent >= self.max_requests or time.monotonic() > self.deadline:
                return False
            self.sent += 1
            return True

    def client(self):
        session = requests.Session()
        headers = {"Authorization": f"Bearer {self.endpoint.token}", "Content-Type": self.content_type}
        while self.take_turn():
            started = time.monotonic()
            try:
                # verify per request: a session's own setting loses to REQUESTS_CA_BUNDLE in the environment.
                response = session.post(
                    f"{self.endpoint.url}/predictions/{self.model}", data=self.body, headers=headers, verify=self.endpoint.ca_file, timeout=60
                )
                version = response.json().get("version", "") if response.status_code == 200 else ""
                answer = Answer(started, time.monotonic() - started, response.status_code, response.headers.get("X-MLfleet-Task", ""), version,
                                "" if response.status_code == 200 else response.text[:200], response.headers.get("X-MLfleet-Node", ""))  # fmt: skip
            except (requests.RequestException, ValueError) as error:
                answer = Answer(started, time.monotonic() - started, 0, "", "", repr(error)[:200])
            with self.lock:
                self.answers.append(answer)
            time.sleep(self.pause)

    def wait_for(self, predicate, timeout: float, what: str):
        """Wait until predicate(answers so far) holds, or fail naming what was awaited."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                snapshot = list(self.answers)
            if predicate(snapshot):
                return snapshot
            time.sleep(0.5)
        raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; last answers: {self.summary()}")

    def failures(self) -> list[Answer]:
        with self.lock:
            return [a for a in self.answers if a.status != 200]

    def summary(self) -> str:
        with self.lock:
            answers = list(self.answers)
        failed = [a for a in answers if a.status != 200]
        tasks = sorted({a.task for a in answers if a.task})
        latencies = sorted(a.seconds for a in answers if a.status == 200)
        p50 = latencies[len(latencies) // 2] if latencies else float("nan")
        p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] if latencies else float("nan")
        return (
            f"{len(answers)} requests, {len(failed)} failed ({', '.join(sorted({f'{a.status} {a.error}' for a in failed}))[:300] or 'none'}), "
            f"p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms, {len(tasks)} tasks answered"
        )
