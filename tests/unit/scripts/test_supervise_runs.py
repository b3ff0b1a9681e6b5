"""scripts/_supervise_runs.py, which scripts/autoscale runs ansible-rulebook under: when the command stops, the
playbook runs it started in sessions of their own (as ansible-runner starts them) finish within the grace period or
are ended, and processes it did not start are left alone. Real processes throughout: a stand-in for ansible-rulebook
that starts stand-ins for ansible-playbook, each in a new session."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

SUPERVISOR = Path(__file__).resolve().parents[3] / "scripts" / "_supervise_runs.py"

# A playbook run: `ansible-playbook SECONDS NAME [ignore-term]` records how it ended in NAME.
PLAYBOOK = textwrap.dedent(
    """\
    import signal, sys, time
    seconds, record = float(sys.argv[1]), sys.argv[2]
    def ended(signum, frame):
        open(record, "w").write("terminated")
        sys.exit(1)
    signal.signal(signal.SIGTERM, signal.SIG_IGN if sys.argv[3:] == ["ignore-term"] else ended)
    open(record, "w").write("running")
    time.sleep(seconds)
    open(record, "w").write("finished")
    """
)

# The rulebook: starts each run given as SECONDS:NAME[:ignore-term] in a session of its own, says so once they run,
# and waits to be stopped (SIGTERM ends it at once, as ansible-rulebook exits without ending its runs).
RULEBOOK = textwrap.dedent(
    """\
    import os, signal, subprocess, sys, time
    playbook = sys.argv[1]
    signal.signal(signal.SIGINT, signal.SIG_IGN if sys.argv[2] == "ignore-int" else signal.default_int_handler)
    records = []
    for run in sys.argv[3:]:
        seconds, record, *rest = run.split(":")
        subprocess.Popen([sys.executable, playbook, seconds, record, *rest], start_new_session=True)
        records.append(record)
    while not all(os.path.exists(record) for record in records):
        time.sleep(0.05)
    print("started", flush=True)
    time.sleep(600)
    """
)


@pytest.fixture
def stand_ins(tmp_path):
    # The run's command line has to name ansible-playbook, as the real one's does.
    playbook = tmp_path / "ansible-playbook"
    playbook.write_text(PLAYBOOK)
    rulebook = tmp_path / "rulebook.py"
    rulebook.write_text(RULEBOOK)
    return tmp_path, playbook, rulebook


def supervise(tmp_path, playbook, rulebook, runs, grace, kill_after, ignore_sigint=False):
    # ignore_sigint: a rulebook started with SIGINT ignored, as a shell's background job is (CI's included), which a
    # forwarded Ctrl-C does not stop.
    sigint = "ignore-int" if ignore_sigint else "default-int"
    process = subprocess.Popen(
        [
            sys.executable,
            SUPERVISOR,
            "--grace",
            str(grace),
            "--kill-after",
            str(kill_after),
            "--stop-after",
            "1",
            "--",
            sys.executable,
            rulebook,
            playbook,
            sigint,
            *runs,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    assert process.stdout.readline().strip() == "started"
    return process


def wait_for_record(path: Path, seconds: float) -> str | None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if path.exists() and path.read_text() not in ("", "running"):
            return path.read_text()
        time.sleep(0.1)
    return None


def test_a_run_that_ends_within_the_grace_period_finishes_on_its_own(stand_ins):
    tmp_path, playbook, rulebook = stand_ins
    record = tmp_path / "short"
    process = supervise(tmp_path, playbook, rulebook, [f"2:{record}"], grace=20, kill_after=5)
    os.killpg(process.pid, signal.SIGTERM)
    _out, err = process.communicate(timeout=30)
    assert record.read_text() == "finished", err
    assert process.returncode == 128 + signal.SIGTERM
    assert "waiting up to 20 s for 1 playbook run(s)" in err
    assert "ending pid" not in err


def test_runs_that_outlast_the_grace_period_are_ended_even_if_they_ignore_sigterm(stand_ins):
    tmp_path, playbook, rulebook = stand_ins
    polite, stubborn = tmp_path / "polite", tmp_path / "stubborn"
    process = supervise(tmp_path, playbook, rulebook, [f"300:{polite}", f"300:{stubborn}:ignore-term"], grace=1, kill_after=2)
    started = time.monotonic()
    os.killpg(process.pid, signal.SIGTERM)
    _out, err = process.communicate(timeout=30)
    assert time.monotonic() - started < 20, err
    assert polite.read_text() == "terminated", err
    assert stubborn.read_text() == "running", err
    assert err.count("ending pid") == 2, err
    assert "SIGKILL" in err
    assert "keeps the scale lease" in err
    # Nothing marked is left: the stubborn run was killed, not orphaned.
    assert not subprocess.run(["pgrep", "-f", str(stubborn)], capture_output=True, check=False).stdout


def test_a_run_the_command_did_not_start_is_left_alone(stand_ins):
    tmp_path, playbook, rulebook = stand_ins
    own, foreign = tmp_path / "own", tmp_path / "foreign"
    # An operator's own scale run on the same host, started beside the autoscaler.
    other = subprocess.Popen([sys.executable, playbook, "4", foreign], start_new_session=True)
    try:
        process = supervise(tmp_path, playbook, rulebook, [f"300:{own}"], grace=0, kill_after=2, ignore_sigint=True)
        os.killpg(process.pid, signal.SIGINT)
        _out, err = process.communicate(timeout=30)
        # The rulebook ignored the forwarded Ctrl-C and was stopped with SIGTERM a second later.
        assert "the command did not stop within 1 s: SIGTERM" in err
        assert process.returncode == 128 + signal.SIGTERM
        assert own.read_text() == "terminated", err
        assert other.poll() is None, "the supervisor ended a process it did not start"
        assert wait_for_record(foreign, 10) == "finished"
    finally:
        other.kill()
        other.wait()


def test_a_command_without_runs_exits_with_its_own_status(tmp_path):
    command = [sys.executable, SUPERVISOR, "--", sys.executable, "-c", "raise SystemExit(3)"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 3
    assert result.stderr == ""


def test_no_command_is_a_usage_error():
    result = subprocess.run([sys.executable, SUPERVISOR, "--grace", "5"], capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 2
    assert "no command given" in result.stderr
