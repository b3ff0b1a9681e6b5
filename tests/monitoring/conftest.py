"""Fixtures: a real InfluxDB 1.x, started once per test session (see influxdb1.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from influxdb1 import INSTALL_HINT, InfluxDB, find_influxd


@pytest.fixture(scope="session")
def influxdb1(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InfluxDB]:
    """Debian's influxd with authentication on, and an admin user (``username``, ``password``) on ``url``.

    Fails, rather than skips, when influxd is missing: the monitoring tests are part of CI.
    """
    binary = find_influxd()
    if binary is None:
        pytest.fail(INSTALL_HINT, pytrace=False)
    server = InfluxDB(tmp_path_factory.mktemp("influxdb1"), binary)
    try:
        yield server.start()
    finally:
        server.stop()
