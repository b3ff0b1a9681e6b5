"""Fixtures: a simulator served over HTTPS on 127.0.0.1 (a free port) with task durations of a few ms."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
from pvesim_support import FAST_DURATIONS, Sim

from lab.pvesim.config import merged
from lab.pvesim.server import Simulator, running_in_thread
from lab.pvesim.tasks import Clock


@pytest.fixture
def make_sim(tmp_path: Path) -> Iterator[Callable[..., Sim]]:
    """Start simulators with config sections replaced (durations and limits merge), optionally on a given clock; all stop at test end."""
    with ExitStack() as stack:
        count = 0

        def start(clock: Clock | None = None, **overrides) -> Sim:
            nonlocal count
            count += 1
            config = merged({"durations": FAST_DURATIONS, **overrides})
            config["durations"] = {**FAST_DURATIONS, **overrides.get("durations", {})}
            simulator = Simulator(config, tmp_path / f"sim{count}", clock=clock)
            return Sim(stack.enter_context(running_in_thread(simulator)), simulator)

        yield start


@pytest.fixture
def sim(make_sim: Callable[..., Sim]) -> Sim:
    return make_sim()
