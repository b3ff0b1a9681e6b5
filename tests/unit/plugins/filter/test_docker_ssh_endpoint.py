"""The docker_ssh_endpoint filter."""

from __future__ import annotations

import pytest
from ansible.errors import AnsibleFilterError


@pytest.fixture
def plugin():
    # Imported when the test runs, not when pytest collects this file (the first of tests/unit): importing the
    # collection before test_proxmox_inventory installs Ansible's collection loader would break that loader.
    from ansible_collections.mlfleet.serving.plugins.filter import docker_ssh_endpoint

    return docker_ssh_endpoint


@pytest.mark.parametrize(
    ("host_vars", "user", "endpoint"),
    [
        ({"ansible_host": "192.0.2.10", "ansible_user": "mlops", "inventory_hostname": "m1"}, None, "ssh://mlops@192.0.2.10"),
        ({"ansible_host": "192.0.2.10", "ansible_ssh_user": "deploy"}, "root", "ssh://deploy@192.0.2.10"),
        ({"ansible_host": "192.0.2.10"}, "root", "ssh://root@192.0.2.10"),
        ({"ansible_host": "192.0.2.10", "ansible_user": "mlops"}, "root", "ssh://mlops@192.0.2.10"),
        ({"ansible_host": "192.0.2.10"}, None, "ssh://192.0.2.10"),
        ({"ansible_host": "192.0.2.10", "ansible_user": "mlops", "ansible_port": 22}, None, "ssh://mlops@192.0.2.10"),
        ({"ansible_host": "192.0.2.10", "ansible_user": "mlops", "ansible_port": "2222"}, None, "ssh://mlops@192.0.2.10:2222"),
        ({"ansible_host": "192.0.2.10", "ansible_ssh_port": 2200}, None, "ssh://192.0.2.10:2200"),
        ({"ansible_host": "2001:db8::10", "ansible_user": "mlops", "ansible_port": 2222}, None, "ssh://mlops@[2001:db8::10]:2222"),
        ({"ansible_host": "[2001:db8::10]", "ansible_user": "mlops"}, None, "ssh://mlops@[2001:db8::10]"),
        ({"inventory_hostname": "worker-1.lab", "ansible_user": "mlops"}, None, "ssh://mlops@worker-1.lab"),
    ],
)
def test_endpoint_from_host_vars(plugin, host_vars, user, endpoint):
    assert plugin.docker_ssh_endpoint(host_vars, user) == endpoint


@pytest.mark.parametrize("value", ["worker-1", ["worker-1"], None])
def test_non_mapping_input_fails(plugin, value):
    with pytest.raises(AnsibleFilterError, match="expects a host's variables"):
        plugin.docker_ssh_endpoint(value)


def test_a_host_without_address_fails(plugin):
    with pytest.raises(AnsibleFilterError, match="neither ansible_host nor inventory_hostname"):
        plugin.docker_ssh_endpoint({"ansible_user": "mlops"})


def test_the_filter_is_registered(plugin):
    assert plugin.FilterModule().filters() == {"docker_ssh_endpoint": plugin.docker_ssh_endpoint}
