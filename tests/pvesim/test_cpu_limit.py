"""The docker backend's CPU budget of a VM: what makes more worker VMs more capacity on a small lab machine."""

import pytest

from lab.pvesim.docker_backend import cpu_limit


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({}, "1"),
        ({"cores": 2}, "2"),
        ({"cores": 2, "sockets": 2}, "4"),
        # Proxmox caps the guest's CPU time at cpulimit CPUs, however many cores it sees.
        ({"cores": 2, "cpulimit": 0.5}, "0.5"),
        ({"cores": 1, "cpulimit": "0.25"}, "0.25"),
        # 0 is no limit; a limit above the cores changes nothing.
        ({"cores": 2, "cpulimit": 0}, "2"),
        ({"cores": 2, "cpulimit": 3}, "2"),
    ],
)
def test_cpu_limit_is_the_cores_or_a_lower_cpulimit(config, expected):
    assert cpu_limit(config) == expected
