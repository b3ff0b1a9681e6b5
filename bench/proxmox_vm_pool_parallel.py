"""Wall time of proxmox_vm_pool creating a pool of 10 against a pool of 1 (run by hand, ~30-60 s).

    python bench/proxmox_vm_pool_parallel.py [--count 10] [--parallel 10] [--clone-slots 2]

Starts the Proxmox simulator (memory backend) in-process on 127.0.0.1 with a free port and Proxmox-like
task times (clone 5 s, start 2 s, boot to agent 5 s), then runs the module's main() in-process twice in
the same process: a pool of 1, then a pool of COUNT under another tag, each from nothing to every member
running with an address. Prints the durations and limits used, both wall times and their ratio; a serial
loop would be about COUNT times slower, the target is 1.5.

By default the simulator locks as Proxmox does (qemu-server's clone_vm takes a shared lock on a stopped
source, so clones of a template run together). --clone-slots N caps clones of one template at N, as lock
contention would: the others wait `lock_wait` seconds and fail, and the module retries them.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
for entry in (REPO_ROOT, REPO_ROOT / ".ansible" / "collections"):
    if str(entry) not in sys.path:
        sys.path.insert(0, str(entry))

from ansible.module_utils.testing import patch_module_args  # noqa: E402

from ansible_collections.mlfleet.serving.plugins.modules import proxmox_vm_pool  # noqa: E402
from lab.pvesim.config import DEFAULT_CONFIG, merged  # noqa: E402
from lab.pvesim.server import Simulator, running_in_thread  # noqa: E402

DURATIONS = {"clone_linked": 5.0, "clone_full": 5.0, "start": 2.0, "boot_to_agent": 5.0}
ROOT_TOKEN = DEFAULT_CONFIG["users"]["root@pam"]["tokens"]["admin"]["secret"]
TIME_LIMIT = 300


def create_pool(url: str, ca: str, tag: str, count: int, parallel: int) -> tuple[float, dict]:
    parts = urllib.parse.urlsplit(url)
    args = {
        "api_host": parts.hostname,
        "api_port": parts.port,
        "api_user": "root@pam",
        "api_token_id": "admin",
        "api_token_secret": ROOT_TOKEN,
        "ca_path": ca,
        "pool_tag": tag,
        "count": count,
        # Linked clones: their time is `clone_linked`, so every clone takes the 5 s printed above.
        "template": "debian12-golden",
        "full": False,
        "parallel": parallel,
        "clone_retries": 10,
        "poll_interval": 0.2,
        "ip_timeout": TIME_LIMIT,
        "clone_timeout": TIME_LIMIT,
    }
    output = io.StringIO()
    started = time.monotonic()
    with patch_module_args(args), contextlib.redirect_stdout(output), contextlib.suppress(SystemExit):
        proxmox_vm_pool.main()
    elapsed = time.monotonic() - started
    result = json.loads(output.getvalue())
    if result.get("failed") or len(result.get("members", [])) != count or not all(member["ip"] for member in result["members"]):
        raise SystemExit(f"pool {tag} of {count} did not converge: {result.get('msg', result)}")
    return elapsed, result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=10)
    parser.add_argument("--parallel", type=int, default=10)
    parser.add_argument("--clone-slots", type=int, default=None, help="simulator limits.parallel_clones_per_source (default: the simulator's)")
    options = parser.parse_args()
    config = merged({"durations": DURATIONS} | ({"limits": {"parallel_clones_per_source": options.clone_slots}} if options.clone_slots else {}))
    print("simulator durations (s):", ", ".join(f"{key}={value}" for key, value in sorted(config["durations"].items())))
    print("simulator limits:", ", ".join(f"{key}={value}" for key, value in sorted(config["limits"].items())))
    with tempfile.TemporaryDirectory() as state_dir:
        simulator = Simulator(config, Path(state_dir))
        with running_in_thread(simulator) as url:
            ca = str(simulator.certificates.ca_file)
            one, _first = create_pool(url, ca, "bench-one", 1, options.parallel)
            print(f"pool of 1: {one:.1f} s")
            many, result = create_pool(url, ca, "bench-many", options.count, options.parallel)
            retries = sum(1 for entry in result["progress"] if entry["stage"].startswith("template locked"))
            print(f"pool of {options.count} (parallel={options.parallel}): {many:.1f} s, {retries} clone retries after lock timeouts")
    ratio = many / one
    print(f"ratio: {ratio:.2f} (target <= 1.5; a serial loop would be ~{options.count})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
