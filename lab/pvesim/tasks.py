"""Worker tasks with Proxmox UPIDs, and the clock they run on.

A Proxmox API call that takes time forks a worker and returns its UPID at once; clients poll
`/nodes/{node}/tasks/{upid}/status` until `status` is `stopped` and then read `exitstatus`.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from .errors import TaskFailed


class Clock:
    """Wall time for task stamps and sleeps for task durations; tests pass durations of 0 or a few ms."""

    def time(self) -> float:
        return time.time()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))


@dataclass
class Task:
    node: str
    pid: int
    pstart: int
    starttime: int
    type: str
    id: str
    user: str
    status: str = "running"
    exitstatus: str | None = None
    endtime: int | None = None
    log: list[str] = field(default_factory=list)

    @property
    def upid(self) -> str:
        return f"UPID:{self.node}:{self.pid:08X}:{self.pstart:08X}:{self.starttime:08X}:{self.type}:{self.id}:{self.user}:"

    def status_entry(self) -> dict:
        """The fields of /nodes/{node}/tasks/{upid}/status."""
        entry = {
            "upid": self.upid,
            "node": self.node,
            "pid": self.pid,
            "pstart": self.pstart,
            "starttime": self.starttime,
            "type": self.type,
            "id": self.id,
            "user": self.user,
            "status": self.status,
        }
        if self.exitstatus is not None:
            entry["exitstatus"] = self.exitstatus
        return entry

    def list_entry(self) -> dict:
        """The fields of a task list entry: `status` there is the exit status once the task ended."""
        entry = {key: value for key, value in self.status_entry().items() if key not in ("status", "exitstatus")}
        if self.status == "stopped":
            entry["status"] = self.exitstatus or "OK"
            entry["endtime"] = self.endtime or self.starttime
        return entry

    def to_state(self) -> dict:
        return {**self.status_entry(), "endtime": self.endtime, "log": self.log}

    @classmethod
    def from_state(cls, state: dict) -> Task:
        task = cls(**{key: state[key] for key in ("node", "pid", "pstart", "starttime", "type", "id", "user", "status", "exitstatus", "endtime", "log")})
        if task.status == "running":
            # The simulator stopped while this worker ran: Proxmox reports such tasks the same way.
            task.status, task.exitstatus, task.endtime = "stopped", "unexpected status", task.starttime
        return task


class TaskRunner:
    """Starts workers as asyncio tasks and keeps every task's record (bounded: the oldest finished ones go)."""

    KEEP_FINISHED = 5000

    def __init__(self, clock: Clock, on_change: Callable[[], None]):
        self.clock = clock
        self.tasks: dict[str, Task] = {}
        self._on_change = on_change
        self._pids = itertools.count(os.getpid() * 1000 % 0x3FFFFF + 1)
        self._pstart = int(time.monotonic() * 100) % 0xFFFFFFF
        self._running: set[asyncio.Task] = set()

    def spawn(self, node: str, task_type: str, vmid: int | str, user: str, work: Callable[[Task], Awaitable[None]]) -> Task:
        """Start `work` as a worker; its TaskFailed ends the task with that text, anything else with the exception."""
        task = Task(node=node, pid=next(self._pids), pstart=self._pstart, starttime=int(self.clock.time()), type=task_type, id=str(vmid), user=user)
        self.tasks[task.upid] = task
        runner = asyncio.get_running_loop().create_task(self._run(task, work))
        self._running.add(runner)
        runner.add_done_callback(self._running.discard)
        return task

    async def _run(self, task: Task, work: Callable[[Task], Awaitable[None]]) -> None:
        try:
            await work(task)
        except TaskFailed as failure:
            self._finish(task, str(failure))
        except asyncio.CancelledError:
            self._finish(task, "interrupted by signal")
            raise
        except Exception as error:  # a worker's unexpected error must end its task, not vanish
            self._finish(task, f"{type(error).__name__}: {error}")
        else:
            self._finish(task, "OK")

    def _finish(self, task: Task, exitstatus: str) -> None:
        task.log.append("TASK OK" if exitstatus == "OK" else f"TASK ERROR: {exitstatus}")
        task.status, task.exitstatus, task.endtime = "stopped", exitstatus, int(self.clock.time())
        self._forget_oldest()
        self._on_change()

    def _forget_oldest(self) -> None:
        finished = [upid for upid, task in self.tasks.items() if task.status == "stopped"]
        for upid in finished[: max(0, len(finished) - self.KEEP_FINISHED)]:
            del self.tasks[upid]

    async def cancel_all(self) -> None:
        for runner in list(self._running):
            runner.cancel()
        await asyncio.gather(*self._running, return_exceptions=True)
