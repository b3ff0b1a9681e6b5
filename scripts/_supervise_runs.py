"""Run a command (ansible-rulebook) and, when it stops, end the playbook runs it started.

ansible-runner starts each playbook on a pseudo-terminal of its own, in a session of its own, so a signal to
ansible-rulebook or to its process group never reaches them: stopped alone, the autoscaler leaves its scale runs
acting on a cluster that nothing watches any more. This wrapper marks the command's environment with a unique id,
which every process it starts inherits, forwards SIGTERM, SIGINT and SIGHUP to it (SIGTERM, then SIGKILL, if it has
not stopped ``--stop-after`` seconds later), and once it has exited:

1. lets the playbook runs still going (marked ``ansible-playbook`` processes) finish for up to ``--grace`` seconds:
   a scale run that ends on its own gives its lease back and records its cooldown;
2. then sends SIGTERM to the process group of every marked process left (the runs, their SSH control masters),
   which ansible-playbook passes on to its workers, and SIGKILL to whatever is left ``--kill-after`` seconds later.

A run ended this way keeps the scale lease until its ttl runs out, as a crashed run does; every scale action is
written to converge when it is run again. Usage::

    python3 _supervise_runs.py [--grace S] [--kill-after S] -- COMMAND [ARG...]

Exits with the command's status (128 + signal number when a signal ended it).
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import subprocess
import sys
import time
from contextlib import suppress
from pathlib import Path

MARKER = "MLFLEET_AUTOSCALER_RUN_ID"
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def log(message: str) -> None:
    print(f"[autoscale] {message}", file=sys.stderr, flush=True)


def marked_processes(marker: str | None) -> dict[int, str]:
    """{pid: command line} of the processes whose environment holds ``MARKER=marker`` (None: any supervisor's mark),
    this one excluded."""
    wanted = f"{MARKER}={marker}".encode() if marker is not None else f"{MARKER}=".encode()
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environment = (entry / "environ").read_bytes().split(b"\0")
            if not any(item == wanted if marker is not None else item.startswith(wanted) for item in environment):
                continue
            # A zombie has an empty command line and nothing left to end.
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:  # gone meanwhile, or not ours to read
            continue
        if command:
            found[int(entry.name)] = command
    return found


def playbook_runs(processes: dict[int, str]) -> dict[int, str]:
    return {pid: command for pid, command in processes.items() if "ansible-playbook" in command}


def wait_until_gone(marker: str, seconds: float, only=lambda processes: processes) -> dict[int, str]:
    """Poll until none of ``only(marked processes)`` is left or ``seconds`` pass; what is left of them."""
    deadline = time.monotonic() + seconds
    while (left := only(marked_processes(marker))) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


def signal_groups(pids, signum: int) -> None:
    groups = set()
    for pid in pids:
        with suppress(ProcessLookupError):
            groups.add(os.getpgid(pid))
    for group in groups - {os.getpgrp()}:
        with suppress(ProcessLookupError):
            os.killpg(group, signum)


def end_runs(marker: str, grace: float, kill_after: float) -> None:
    """End what the command left running."""
    if runs := playbook_runs(marked_processes(marker)):
        # A run is a session (ansible-playbook and its forked workers); its first pid names it.
        sessions = {}
        for pid in sorted(runs):
            with suppress(ProcessLookupError):
                sessions.setdefault(os.getsid(pid), pid)
        log(f"waiting up to {grace:.0f} s for {len(sessions)} playbook run(s) to finish: pid {', '.join(map(str, sessions.values()))}")
        wait_until_gone(marker, grace, only=playbook_runs)
    left = marked_processes(marker)
    if not left:
        return
    for pid, command in sorted(left.items()):
        log(f"ending pid {pid}: {command[:200]}")
    signal_groups(left, signal.SIGTERM)
    still = wait_until_gone(marker, kill_after)
    if still:
        log(f"{len(still)} process(es) ignored SIGTERM for {kill_after:.0f} s: SIGKILL")
        signal_groups(still, signal.SIGKILL)
        signal_groups(wait_until_gone(marker, 5), signal.SIGKILL)
    if playbook_runs(left):
        log("a scale run ended this way keeps the scale lease until its ttl runs out; run the scale playbook again to converge")


def wait_for_command(child: subprocess.Popen, stop_asked_at: list[float], stop_after: float) -> int:
    """The command's exit status. A command that is still running ``stop_after`` seconds after it was asked to stop
    gets SIGTERM, and SIGKILL as long again later: a command started with SIGINT ignored (a shell's background job)
    never sees a forwarded Ctrl-C."""
    escalation = [(stop_after, signal.SIGTERM), (2 * stop_after, signal.SIGKILL)]
    while True:
        try:
            return child.wait(timeout=0.5)
        except subprocess.TimeoutExpired:
            if escalation and stop_asked_at and time.monotonic() - stop_asked_at[0] >= escalation[0][0]:
                waited, signum = escalation.pop(0)
                log(f"the command did not stop within {waited:.0f} s: {signal.Signals(signum).name}")
                child.send_signal(signum)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--grace", type=float, default=60.0, help="seconds the runs may finish on their own (60)")
    parser.add_argument("--kill-after", type=float, default=15.0, help="seconds between SIGTERM and SIGKILL (15)")
    parser.add_argument("--stop-after", type=float, default=10.0, help="seconds the command has to stop before SIGTERM (10)")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given")
    if min(args.grace, args.kill_after, args.stop_after) < 0:
        parser.error("--grace, --kill-after and --stop-after are seconds, 0 or more")
    marker = secrets.token_hex(16)
    child = subprocess.Popen(command, env={**os.environ, MARKER: marker})  # noqa: S603 (the caller's own command)
    stop_asked_at = []

    def forward(signum, _frame):
        stop_asked_at.append(time.monotonic())
        if child.poll() is None:
            child.send_signal(signum)

    for signum in FORWARDED:
        signal.signal(signum, forward)
    status = wait_for_command(child, stop_asked_at, args.stop_after)
    for signum in FORWARDED:
        # A second Ctrl-C while the runs end must not leave them half-ended without a word: say so and carry on.
        signal.signal(signum, lambda signum, _frame: log(f"signal {signum} ignored while ending the playbook runs"))
    end_runs(marker, args.grace, args.kill_after)
    return 128 - status if status < 0 else status


if __name__ == "__main__":
    sys.exit(main())
