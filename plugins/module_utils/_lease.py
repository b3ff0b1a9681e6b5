# Copyright (c) mlfleet.serving maintainers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The autoscaler's single-flight lease and its cooldown records, in one small JSON file on the control host.

Only one scale playbook may act at a time. A run takes the lease for ``ttl`` seconds (taking it again with the same
holder renews it) and gives it back when done; a run that crashed holds it only until it expires, and the next run
takes it over and is told whose lease it replaced. A lease also names the ``ansible-playbook`` process that took it
(``run``: host, PID and start time); when that process has ended on this host, the lease is abandoned and the next run
takes it over at once instead of waiting for its expiry, so a failed or killed run blocks nobody. Giving the lease
back also records when each ``<service>:<action>`` last acted, so a playbook honours cooldowns as ``now -
last_actions[key]``, and the replica floors a scheduled scale-out set (``floors``: at least ``replicas`` of a service
until an epoch time), so a scale-in during the scheduled window keeps them. Expired floors are dropped at the next
write. It also records the replica bounds each service's last run kept (``bounds``: ``min``, ``max`` and ``at``, when
they were recorded), which the serving_pressure event source reads to ask less often for a service already at its
maximum; the effective settings each service's last run decided with (``settings``: bounds, cooldowns, target per
replica, stabilization); and the history of the replica counts each run desired (``history``: ``[[at, count]]`` per
service, oldest first, at most HISTORY_SECONDS old and HISTORY_ENTRIES long), from which a scale-in takes the highest
count of its stabilization window. A run that decided not to act records what it decided on (``quiet``, per
``<service>:<direction>``: ``at``, the ``replicas`` the service had, the ``desired`` count, and ``until``, when time
alone could change the decision, null for never): the event sources send no event that could only meet the same
decision again, until the service's replicas or the demand change, any run acts, or ``until`` passes. An action drops
every such record.

Every read-modify-write happens under an exclusive ``flock`` on the sidecar ``<path>.lock``. The data file is never
locked: it is replaced atomically (a temporary file in the same directory, fsync, ``os.replace``), so a reader without
the lock always sees a whole file. Times are wall-clock epoch seconds (``time.time``), because several processes share
the file; a clock object with ``time``, ``monotonic`` and ``sleep`` (the ``time`` module by default) can be injected.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import secrets
import socket
import tempfile
import time
from contextlib import contextmanager, suppress

FORMAT_VERSION = 1
# The longest history kept of each service's desired counts, and so the longest stabilization window (seconds).
HISTORY_SECONDS = 3600
# Entries kept per service, whatever their age: a burst of decisions cannot grow the file without bound.
HISTORY_ENTRIES = 200
# How long to wait for the sidecar lock, which a run holds only for one read-modify-write (milliseconds).
LOCK_TIMEOUT = 30.0
LOCK_POLL = 0.01
# The smallest poll_interval, so a waiting run cannot hammer the lock.
MIN_POLL_INTERVAL = 0.01
# A waiting run wakes this long after the lease it waits for expires, so that it finds it expired.
EXPIRY_MARGIN = 0.01
DELETE_HINT = (
    "When no scale playbook runs, delete it (the cooldown records in it go with it) and run again; "
    "it is not reset automatically because that could let two scale runs act at once"
)


class LeaseError(Exception):
    """A problem with the lease file or the arguments, worded for the user."""


def new_holder(run=None):
    """A fresh holder id, ``<hostname>:<pid>:<random hex>``, with the PID of ``run`` (the playbook) when there is one."""
    return f"{socket.gethostname()}:{run['pid'] if run else os.getpid()}:{secrets.token_hex(8)}"


def process_stat(pid, field):
    """Field ``field`` (numbered as in proc(5), from 3) of ``/proc/<pid>/stat`` as a number, or None when the process is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            stat = handle.read().decode("utf-8", "replace")
        # The command name (field 2) may hold spaces and parentheses; the fields after its last ')' are plain.
        return int(stat[stat.rindex(")") + 2 :].split()[field - 3])
    except (OSError, ValueError, IndexError):
        return None


def process_start(pid):
    """The start time of process ``pid`` in clock ticks since boot, or None when it is gone."""
    return process_stat(pid, 22)


def is_playbook_process(pid):
    """Whether ``pid`` runs ansible-playbook (its own script, or a Python interpreter running it)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            argv = handle.read().split(b"\0")
    except OSError:
        return False
    return any(os.path.basename(arg.decode("utf-8", "replace")) == "ansible-playbook" for arg in argv[:2])


def current_run(pid=None):
    """The ansible-playbook process this process runs under, as ``{"host", "pid", "started"}``, or None outside one.

    Ansible forks a worker per task from the ansible-playbook process, and the worker starts the module: the outermost
    ancestor that runs ansible-playbook is the playbook run itself, which lives exactly as long as the run.
    """
    run_pid = None
    pid = os.getpid() if pid is None else pid
    while pid and pid > 1:
        if is_playbook_process(pid):
            run_pid = pid
        pid = process_stat(pid, 4)
    started = process_start(run_pid) if run_pid else None
    return {"host": socket.gethostname(), "pid": run_pid, "started": started} if started is not None else None


def run_ended(run):
    """Whether the playbook run ``run`` (as ``current_run`` names it) is known to have ended: it ran on this host and its
    process is gone, or the PID now belongs to a later process. A run of another host, or none, is never known to have ended."""
    if not run or run.get("host") != socket.gethostname():
        return False
    return process_start(run["pid"]) != run["started"]


def is_time(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def lease_problem(lease):
    """What is wrong with the stored lease, or None."""
    if lease is None:
        return None
    if not isinstance(lease, dict):
        return "'lease' is not an object"
    if not isinstance(lease.get("holder"), str) or not lease["holder"]:
        return "the lease has no holder"
    if not is_time(lease.get("expires_at")):
        return "the lease's expires_at is not a number"
    if "acquired_at" in lease and not is_time(lease["acquired_at"]):
        return "the lease's acquired_at is not a number"
    if lease.get("reason") is not None and not isinstance(lease["reason"], str):
        return "the lease's reason is not a string"
    run = lease.get("run")
    if run is not None and not (isinstance(run, dict) and isinstance(run.get("host"), str) and whole(run.get("pid"), 1) and whole(run.get("started"), 0)):
        return "the lease's run is not an object with host, pid and started"
    return None


def data_problem(data):
    """What is wrong with the decoded file, or None."""
    if not isinstance(data, dict):
        return "the content is not a JSON object"
    if data.get("version", FORMAT_VERSION) != FORMAT_VERSION:
        return f"format version {data.get('version')!r}, this collection reads version {FORMAT_VERSION}; it was written by another version of mlfleet.serving"
    problem = lease_problem(data.get("lease"))
    if problem:
        return problem
    last_actions = data.get("last_actions", {})
    if not isinstance(last_actions, dict):
        return "'last_actions' is not an object"
    for key, when in last_actions.items():
        if not is_time(when):
            return f"last_actions[{key!r}] is not a number"
    floors = data.get("floors", {})
    if not isinstance(floors, dict):
        return "'floors' is not an object"
    for service, entries in floors.items():
        if not isinstance(entries, list):
            return f"floors[{service!r}] is not a list"
        for entry in entries:
            problem = floor_problem(entry)
            if problem:
                return f"floors[{service!r}]: {problem}"
    problem = stamped_map_problem(data, "bounds", bounds_problem)
    if problem:
        return problem
    settings = data.get("settings", {})
    if not isinstance(settings, dict) or not all(isinstance(entry, dict) for entry in settings.values()):
        return "'settings' is not an object of objects"
    problem = stamped_map_problem(data, "quiet", quiet_problem)
    if problem:
        return problem
    history = data.get("history", {})
    if not isinstance(history, dict):
        return "'history' is not an object"
    for service, entries in history.items():
        problem = history_problem(entries)
        if problem:
            return f"history[{service!r}]: {problem}"
    return None


def stamped_map_problem(data, name, problem_of):
    """What is wrong with ``data[name]``, a map of entries each recorded with its time ``at``, or None."""
    entries = data.get(name, {})
    if not isinstance(entries, dict):
        return f"'{name}' is not an object"
    for key, entry in entries.items():
        problem = problem_of(entry) or (None if is_time(entry.get("at")) else f"at {entry.get('at')!r} is not a number")
        if problem:
            return f"{name}[{key!r}]: {problem}"
    return None


def history_problem(entries):
    """What is wrong with one service's history ``[[at, count]]``, or None."""
    if not isinstance(entries, list):
        return "not a list"
    for entry in entries:
        if not (isinstance(entry, list) and len(entry) == 2 and is_time(entry[0]) and whole(entry[1], 0)):
            return f"entry {entry!r} is not [epoch seconds, replicas]"
    return None


def prune_history(entries, now):
    """``[[at, count]]`` without entries older than HISTORY_SECONDS, the newest HISTORY_ENTRIES, oldest first."""
    kept = sorted(([at, count] for at, count in entries if now - at <= HISTORY_SECONDS), key=lambda entry: entry[0])
    return kept[-HISTORY_ENTRIES:]


def check_desired(desired):
    """``desired`` (``[{service, replicas}]``) as ``{service: replicas}``; LeaseError naming the entry at fault."""

    def problem(entry):
        return None if whole(entry.get("replicas"), 0) else f"replicas {entry.get('replicas')!r} is not a whole number of 0 or more"

    return {service: entry["replicas"] for service, entry in checked_entries("desired", desired, ("replicas",), problem, "give the replicas the run desired")}


def quiet_problem(entry):
    """What is wrong with one decision not to act ``{direction, replicas, desired, until}``, or None."""
    if not isinstance(entry, dict):
        return "an entry is not an object"
    if entry.get("direction") not in ("scale_out", "scale_in"):
        return f"direction {entry.get('direction')!r} is not scale_out or scale_in"
    for field in ("replicas", "desired"):
        if not whole(entry.get(field), 0):
            return f"{field} {entry.get(field)!r} is not a whole number of 0 or more"
    if entry.get("until") is not None and not is_time(entry["until"]):
        return f"until {entry.get('until')!r} is neither a number nor null"
    return None


def check_quiet(quiet):
    """``quiet`` (``[{service, direction, replicas, desired, until}]``) as ``{"<service>:<direction>": {...}}``; LeaseError
    naming the entry at fault."""
    fix = "give the direction, the replicas the service had, the count the run desired and until (epoch seconds or null)"
    return {
        f"{service}:{entry['direction']}": entry
        for service, entry in checked_entries("quiet", quiet, ("direction", "replicas", "desired", "until"), quiet_problem, fix)
    }


def live_quiet(quiet, now):
    """The decisions not to act recorded within HISTORY_SECONDS of ``now``."""
    return {key: dict(entry) for key, entry in quiet.items() if now - entry["at"] <= HISTORY_SECONDS}


def check_settings(settings):
    """``settings`` (``[{service, ...}]``) as ``{service: {...}}``; LeaseError naming the entry at fault."""
    checked = {}
    for index, entry in enumerate(settings):
        if not isinstance(entry, dict) or not isinstance(entry.get("service"), str) or not entry["service"].strip():
            raise LeaseError(f"settings[{index}] must have a service, the name of a Swarm service such as 'resnet18'; got {entry!r}")
        checked[entry["service"]] = {key: value for key, value in entry.items() if key != "service"}
    return checked


def whole(value, minimum):
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def bounds_problem(entry):
    """What is wrong with one service's replica bounds ``{min, max}``, or None."""
    if not isinstance(entry, dict):
        return "an entry is not an object"
    if not whole(entry.get("min"), 0):
        return f"min {entry.get('min')!r} is not a whole number of 0 or more"
    if not whole(entry.get("max"), 1):
        return f"max {entry.get('max')!r} is not a whole number of 1 or more"
    if entry["min"] > entry["max"]:
        return f"min {entry['min']} is above max {entry['max']}"
    return None


def check_bounds(bounds):
    """``bounds`` as ``{service: {min, max}}``; LeaseError naming the entry at fault."""
    return dict(checked_entries("bounds", bounds, ("min", "max"), bounds_problem, "give the fewest and most replicas the run kept the service to"))


def floor_problem(entry):
    """What is wrong with one stored floor ``{replicas, until, reason}``, or None."""
    if not isinstance(entry, dict):
        return "an entry is not an object"
    replicas = entry.get("replicas")
    if not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < 0:
        return f"replicas {replicas!r} is not a whole number of 0 or more"
    if not is_time(entry.get("until")):
        return f"until {entry.get('until')!r} is not a number"
    if entry.get("reason") is not None and not isinstance(entry["reason"], str):
        return "reason is not a string"
    return None


def checked_entries(option, entries, fields, problem_of, fix):
    """``(service, {field: value})`` of each entry of the list ``option``, checked by ``problem_of``; LeaseError naming
    the entry at fault and ``fix``."""
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("service"), str) or not entry["service"].strip():
            raise LeaseError(f"{option}[{index}] must have a service, the name of a Swarm service such as 'resnet18'; got {entry!r}")
        values = {field: entry.get(field) for field in fields}
        problem = problem_of(values)
        if problem:
            raise LeaseError(f"{option}[{index}] ({entry['service']}): {problem}; {fix}")
        yield entry["service"], values


def check_floors(floors):
    """``floors`` as ``{service: [{replicas, until, reason}]}``; LeaseError naming the entry at fault."""
    checked = {}
    fix = "give replicas as the fewest replicas and until as epoch seconds"
    for service, entry in checked_entries("floors", floors, ("replicas", "until", "reason"), floor_problem, fix):
        checked.setdefault(service, []).append(entry)
    return checked


def live_floors(floors, now):
    """The floors that have not expired at ``now``, per service."""
    live = {service: [dict(entry) for entry in entries if entry["until"] > now] for service, entries in floors.items()}
    return {service: entries for service, entries in live.items() if entries}


def highest_floors(floors, now):
    """Per service, its highest live floor (of equal ones, the one that lasts longest)."""
    return {service: max(entries, key=lambda entry: (entry["replicas"], entry["until"])) for service, entries in live_floors(floors, now).items()}


def check_holder(holder):
    if not isinstance(holder, str) or not holder.strip():
        raise LeaseError("holder must be a non-empty string: the id returned when the lease was acquired")


def check_acted(acted):
    """The keys of ``acted`` without repeats, in order."""
    keys = []
    for key in acted:
        if not isinstance(key, str) or not key.strip():
            raise LeaseError(f"every entry of acted must be a non-empty string such as 'resnet18:scale_out', got {key!r}")
        if key not in keys:
            keys.append(key)
    return keys


def describe(state, now):
    """The lease as it stands and the cooldown records, as the module returns them."""
    lease = state["lease"]
    return {
        "held_by": lease["holder"] if lease else None,
        "held_reason": lease.get("reason") if lease else None,
        "held_run": dict(lease["run"]) if lease and lease.get("run") else None,
        "expires_at": lease["expires_at"] if lease else None,
        "expires_in": round(max(lease["expires_at"] - now, 0.0), 3) if lease else None,
        "last_actions": dict(state["last_actions"]),
        "floors": highest_floors(state["floors"], now),
        "bounds": {service: dict(entry) for service, entry in state["bounds"].items()},
        "settings": {service: dict(entry) for service, entry in state["settings"].items()},
        "quiet": {key: dict(entry) for key, entry in state["quiet"].items()},
        "history": {service: [list(entry) for entry in entries] for service, entries in state["history"].items()},
        "now": now,
    }


def fence(path, holder, clock=time):
    """Fencing: LeaseError unless ``holder`` holds a live lease in the file at ``path`` now. Every module that acts
    (clones, destroys, changes replicas, drains, joins) calls this first, so that a run that lost its lease (it stalled
    past its ttl and another run took over) stops acting and says so, instead of acting beside the new holder."""
    check_holder(holder)
    lease = LeaseFile(path).read()["lease"]
    now = clock.time()
    if lease is not None and lease["holder"] == holder and lease["expires_at"] > now:
        return
    if lease is None:
        held = "nobody holds it"
    elif lease["holder"] == holder:
        held = f"it expired {now - lease['expires_at']:.0f} s ago"
    else:
        held = f"{lease['holder']} ({lease.get('reason') or 'no reason given'}) holds it"
    raise LeaseError(
        f"this run no longer holds the scale lease {path} ({held}), so it stops acting here; "
        "another run may act now, and a run after it finishes what this one left"
    )


def fence_argument_spec():
    """The ``lease`` option of the modules that act under the lease (doc fragment mlfleet.serving.scale_lease)."""
    return dict(lease=dict(type="dict", options=dict(path=dict(type="path", required=True), holder=dict(type="str", required=True))))


def fence_module(module):
    """For a module with ``fence_argument_spec``: fail it, naming why, when its run no longer holds the lease. Call first."""
    lease = module.params.get("lease")
    if not lease or module.check_mode:
        return
    try:
        fence(lease["path"], lease["holder"])
    except LeaseError as error:
        module.fail_json(msg=str(error), lease_lost=True)


# How often a renewer looks whether its playbook run still lives (seconds), so that it ends within this of the run.
RENEWER_CHECK = 1.0


def renew_while_running(lease, holder, ttl, run, interval=None, clock=time):
    """Renew ``holder``'s lease every ``interval`` seconds (a third of ``ttl``) for as long as the playbook process
    ``run`` lives, looking every RENEWER_CHECK seconds; return why it stopped: V(run_ended), V(lost) (the lease is no
    longer this holder's: given back, or taken over) or V(error)."""
    interval = ttl / 3.0 if interval is None else interval
    steps = max(1, math.ceil(interval / RENEWER_CHECK))
    while True:
        for _step in range(steps):
            clock.sleep(interval / steps)
            if run_ended(run):
                return "run_ended"
        try:
            if not lease.renew(holder, ttl):
                return "lost"
        except LeaseError:
            return "error"


def start_renewer(path, holder, ttl, run):
    """Start the renewer of ``holder``'s lease in a process of its own (detached: a double fork, a new session, no
    terminal), tied to the playbook process ``run``, and return its PID. It renews the lease every ttl / 3 seconds while
    that process lives, so a step that blocks longer than the ttl (a drain waits up to 300 s) keeps the lease; it ends
    within a second of the playbook, so a killed run's lease expires within the ttl (and a later run on this host takes it
    over at once, as the playbook's process is gone). Unlike an Ansible async task, it never outlives the run."""
    if not run:
        raise LeaseError("a heartbeat lease renews itself while its ansible-playbook run lives: take it from a playbook run")
    reader, writer = os.pipe()
    first = os.fork()
    if first == 0:
        # The first child: a new session, then the renewer, whose parent exits at once (no zombie, no terminal).
        try:
            os.close(reader)
            os.setsid()
            second = os.fork()
            if second:
                os.write(writer, str(second).encode())
                os._exit(0)
            os.close(writer)
            null = os.open(os.devnull, os.O_RDWR)
            for descriptor in (0, 1, 2):
                os.dup2(null, descriptor)
            os.chdir("/")
            renew_while_running(LeaseFile(path), holder, ttl, run)
        finally:
            os._exit(0)
    os.close(writer)
    with os.fdopen(reader, "rb") as handle:
        pid = int(handle.read() or 0)
    os.waitpid(first, 0)
    return pid


def fsync_directory(path):
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


class LeaseFile:
    """The lease file at ``path``; its directory must exist."""

    def __init__(self, path, clock=time, lock_timeout=LOCK_TIMEOUT, ended=run_ended):
        self.path = path
        self.ended = ended
        self.lock_path = path + ".lock"
        self.directory = os.path.dirname(os.path.abspath(path))
        self.clock = clock
        self.lock_timeout = lock_timeout

    def _check_path(self):
        if not os.path.isdir(self.directory):
            raise LeaseError(
                f"the directory {self.directory} of the lease file {self.path} does not exist; create it (for example with "
                "ansible.builtin.file and state=directory, mode 0700) or set path to a file in an existing directory"
            )
        if os.path.isdir(self.path):
            raise LeaseError(f"the lease file {self.path} is a directory; set path to a file, for example {os.path.join(self.path, 'scale.lease')}")

    def _now(self, now):
        return self.clock.time() if now is None else now

    @contextmanager
    def locked(self):
        """An exclusive flock on ``<path>.lock`` (created with mode 0600), for one read-modify-write."""
        self._check_path()
        try:
            descriptor = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as error:
            raise LeaseError(
                f"cannot open the lock file {self.lock_path}: {error.strerror}; the user running the scale playbooks needs write access to {self.directory}"
            ) from None
        try:
            deadline = time.monotonic() + self.lock_timeout
            while True:
                try:
                    fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise LeaseError(
                            f"the lock file {self.lock_path} has been locked by another process for more than {self.lock_timeout:g} s, "
                            f"although a run holds it only for milliseconds; find that process with 'fuser {self.lock_path}'"
                        ) from None
                    time.sleep(LOCK_POLL)
                except OSError as error:
                    raise LeaseError(f"cannot lock {self.lock_path}: {error.strerror}; keep the lease file on a local file system") from None
            yield
        finally:
            os.close(descriptor)

    def read(self):
        """The file as ``{"lease": dict or None, "last_actions": {key: epoch}, "floors": {service: [floor]}, "bounds": {service: {min, max,
        at}}}``; a missing file is an empty one.

        Safe without the lock, since the file is only ever replaced whole.
        """
        self._check_path()
        try:
            with open(self.path, "rb") as handle:
                raw = handle.read()
        except FileNotFoundError:
            return {"lease": None, "last_actions": {}, "floors": {}, "bounds": {}, "settings": {}, "quiet": {}, "history": {}}
        except OSError as error:
            raise LeaseError(
                f"cannot read the lease file {self.path}: {error.strerror}. "
                f"Give the user running the scale playbooks read and write access to it. {DELETE_HINT}"
            ) from None
        try:
            data = json.loads(raw.decode("utf-8"))
        except ValueError as error:
            raise LeaseError(f"the lease file {self.path} is corrupt (not JSON: {error}). {DELETE_HINT}") from None
        problem = data_problem(data)
        if problem:
            raise LeaseError(f"the lease file {self.path} is corrupt ({problem}). {DELETE_HINT}")
        lease = data.get("lease")
        return {
            "lease": dict(lease) if lease else None,
            "last_actions": {key: float(when) for key, when in data.get("last_actions", {}).items()},
            "floors": {service: [dict(entry) for entry in entries] for service, entries in data.get("floors", {}).items()},
            "bounds": {service: dict(entry) for service, entry in data.get("bounds", {}).items()},
            "settings": {service: dict(entry) for service, entry in data.get("settings", {}).items()},
            "quiet": {key: dict(entry) for key, entry in data.get("quiet", {}).items()},
            "history": {service: [list(entry) for entry in entries] for service, entries in data.get("history", {}).items()},
        }

    def _write(self, state, now):
        """Replace the file with ``state`` atomically, mode 0600, without the floors expired at ``now``. Call under the lock."""
        data = {
            "version": FORMAT_VERSION,
            "lease": state["lease"],
            "last_actions": dict(sorted(state["last_actions"].items())),
            "floors": dict(sorted(live_floors(state["floors"], now).items())),
            "bounds": dict(sorted(state["bounds"].items())),
            "settings": dict(sorted(state["settings"].items())),
            "quiet": dict(sorted(live_quiet(state["quiet"], now).items())),
            "history": {service: kept for service, entries in sorted(state["history"].items()) if (kept := prune_history(entries, now))},
        }
        payload = (json.dumps(data, indent=2, allow_nan=False) + "\n").encode("utf-8")
        temporary = None
        try:
            descriptor, temporary = tempfile.mkstemp(dir=self.directory, prefix=f".{os.path.basename(self.path)}.", suffix=".tmp")
            with os.fdopen(descriptor, "wb") as handle:
                os.fchmod(handle.fileno(), 0o600)
                handle.write(payload)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, self.path)
            temporary = None
            fsync_directory(self.directory)
        except OSError as error:
            raise LeaseError(
                f"cannot write the lease file {self.path}: {error.strerror}; the user running the scale playbooks needs write access to {self.directory}"
            ) from None
        finally:
            if temporary is not None:
                with suppress(OSError):
                    os.unlink(temporary)

    def try_acquire(self, holder, ttl, reason=None, now=None, check_mode=False, run=None):
        """Take the lease when it is free, expired, abandoned (its run ended) or already ``holder``'s (a renewal), without
        waiting. ``run`` names the playbook run taking it (``current_run()``), so that a later run can tell when it ended.

        In check mode, the file is read without the lock and nothing is written.
        """
        check_holder(holder)
        if not is_time(ttl) or ttl <= 0:
            raise LeaseError(f"ttl must be a positive number of seconds, got {ttl!r}")
        if check_mode:
            return self._acquire(self.read(), holder, ttl, reason, self._now(now), run, write=False)
        with self.locked():
            # The time is read once the lock is held: a time read before waiting for the lock could be older than the last write.
            return self._acquire(self.read(), holder, ttl, reason, self._now(now), run, write=True)

    def _acquire(self, state, holder, ttl, reason, now, run, write):
        lease = state["lease"]
        result = {"holder": holder, "acquired": False, "renewed": False, "taken_over": None}
        abandoned = lease is not None and lease["holder"] != holder and self.ended(lease.get("run"))
        if lease is not None and lease["holder"] != holder and lease["expires_at"] > now and not abandoned:
            return dict(result, changed=False, **describe(state, now))
        if lease is not None and lease["holder"] == holder:
            result["renewed"] = True
            acquired_at = lease.get("acquired_at", now)
            if reason is None:
                reason = lease.get("reason")
            if run is None:
                run = lease.get("run")
        else:
            acquired_at = now
            if lease is not None:
                result["taken_over"] = {key: lease.get(key) for key in ("holder", "reason", "acquired_at", "expires_at")}
                result["taken_over"]["run_ended"] = abandoned
        stored = {"holder": holder, "reason": reason, "acquired_at": acquired_at, "expires_at": now + ttl, "ttl": ttl}
        state = dict(state, lease=dict(stored, run=run) if run else stored)
        if write:
            self._write(state, now)
        return dict(result, acquired=True, changed=True, **describe(state, now))

    def renew(self, holder, ttl, now=None):
        """Extend ``holder``'s lease to ``ttl`` seconds from now, only while it holds it (live or expired but not taken
        over); False when the lease was given back or another holder has it. Unlike ``try_acquire``, never takes a free
        lease: a renewal racing the run's own release must not take the lease again."""
        check_holder(holder)
        with self.locked():
            state = self.read()
            lease = state["lease"]
            if lease is None or lease["holder"] != holder:
                return False
            now = self._now(now)
            state["lease"] = dict(lease, expires_at=now + ttl, ttl=ttl)
            self._write(state, now)
            return True

    def acquire(self, holder, ttl, reason=None, wait_timeout=0, poll_interval=1.0, check_mode=False, run=None):
        """``try_acquire``, again every ``poll_interval`` seconds while another holder's live lease exists, for up to ``wait_timeout`` seconds.

        Adds ``waited``, the seconds from the call to its last attempt, to the result. Check mode never waits: it reports whether the lease can be taken now.
        """
        if not is_time(wait_timeout) or wait_timeout < 0:
            raise LeaseError(f"wait_timeout must be 0 or a positive number of seconds, got {wait_timeout!r}")
        if not is_time(poll_interval) or poll_interval < MIN_POLL_INTERVAL:
            raise LeaseError(f"poll_interval must be at least {MIN_POLL_INTERVAL} seconds, got {poll_interval!r}")
        started = self.clock.monotonic()
        deadline = started + wait_timeout
        waited = 0.0
        result = self.try_acquire(holder, ttl, reason, check_mode=check_mode, run=run)
        while not result["acquired"] and not check_mode:
            remaining = deadline - self.clock.monotonic()
            if remaining <= 0:
                break
            self.clock.sleep(min(poll_interval, remaining, result["expires_in"] + EXPIRY_MARGIN))
            waited = self.clock.monotonic() - started
            result = self.try_acquire(holder, ttl, reason, check_mode=check_mode, run=run)
        result["waited"] = round(waited, 3)
        return result

    def release(self, holder, acted=(), now=None, check_mode=False, floors=(), bounds=(), desired=(), settings=(), quiet=()):
        """Give the lease back when ``holder`` holds it, record ``now`` as the last action time of each key of ``acted``,
        add ``floors`` (``[{service, replicas, until, reason}]``) and record ``bounds`` (``[{service, min, max}]``) at
        ``now``, each replacing the service's earlier bounds; append ``desired`` (``[{service, replicas}]``) to the services'
        history at ``now`` and record ``settings`` (``[{service, ...}]``), each replacing the service's earlier settings.
        ``quiet`` (``[{service, direction, replicas, desired, until}]``) records the run's decisions not to act at ``now``;
        a release with ``acted`` first drops every earlier one, as the action changed what they were decided on.

        When another holder (or nobody) holds it, nothing changes and nothing of ``acted``, ``floors``, ``bounds``,
        ``desired`` or ``settings`` is recorded, so a late release after a takeover never frees someone else's lease.
        """
        check_holder(holder)
        keys = check_acted(acted)
        new_floors = check_floors(floors)
        new_bounds = check_bounds(bounds)
        records = {"desired": check_desired(desired), "settings": check_settings(settings), "quiet": check_quiet(quiet)}
        if check_mode:
            return self._release(self.read(), holder, keys, new_floors, new_bounds, records, self._now(now), write=False)
        with self.locked():
            return self._release(self.read(), holder, keys, new_floors, new_bounds, records, self._now(now), write=True)

    def _release(self, state, holder, keys, new_floors, new_bounds, records, now, write):
        lease = state["lease"]
        if lease is None or lease["holder"] != holder:
            return dict(holder=holder, released=False, changed=False, **describe(state, now))
        last_actions = dict(state["last_actions"])
        for key in keys:
            last_actions[key] = now
        floors = {service: list(entries) for service, entries in state["floors"].items()}
        for service, entries in new_floors.items():
            floors[service] = floors.get(service, []) + [entry for entry in entries if entry not in floors.get(service, [])]
        bounds = dict(state["bounds"]) | {service: dict(entry, at=now) for service, entry in new_bounds.items()}
        history = {service: list(entries) for service, entries in state["history"].items()}
        for service, replicas in records["desired"].items():
            history[service] = [*history.get(service, []), [now, replicas]]
        settings = dict(state["settings"]) | records["settings"]
        quiet = ({} if keys else dict(state["quiet"])) | {key: dict(entry, at=now) for key, entry in records["quiet"].items()}
        state = {"lease": None, "last_actions": last_actions, "floors": floors, "bounds": bounds, "settings": settings, "quiet": quiet, "history": history}
        if write:
            self._write(state, now)
        return dict(holder=holder, released=True, changed=True, **describe(state, now))
