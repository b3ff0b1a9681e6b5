import os
import subprocess
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def run(args, *, env=None, cwd=REPO_ROOT, check=True, timeout=600, input=None) -> subprocess.CompletedProcess:
    """Run a command; on failure raise with its whole output so the test report says why."""
    result = subprocess.run(
        [str(a) for a in args],
        env={**os.environ, **(env or {})},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        input=input,
        check=False,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))} exited {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}")
    return result


def node_docker(node, *args, check=True, timeout=300):
    """Run the docker CLI inside a lab node, against the node's own dockerd."""
    return run(["docker", "exec", node, "docker", *args], check=check, timeout=timeout)


def wait_for(what, predicate, timeout=120, interval=1.0, context=None):
    """Poll ``predicate`` until it returns a true value and return it; fail naming ``what`` after ``timeout`` s.

    ``context``: called on a timeout; what it returns goes into the failure, to say why (an audit trail, a log's tail).
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            why = f"\n{context()}" if context else ""
            raise AssertionError(f"timed out after {timeout}s waiting for {what}{why}")
        time.sleep(interval)
