# Copyright (c) mlfleet.serving maintainers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The ssh:// Docker API endpoint of an inventory host, for the swarm modules."""

from __future__ import annotations

from ansible.errors import AnsibleFilterError


def docker_ssh_endpoint(host_vars, user=None):
    """``ssh://user@address[:port]`` from a host's variables (``hostvars[host]``)."""
    if not hasattr(host_vars, "get"):
        raise AnsibleFilterError(f"docker_ssh_endpoint expects a host's variables (hostvars[host]), not {type(host_vars).__name__}")
    address = host_vars.get("ansible_host") or host_vars.get("inventory_hostname")
    if not address:
        raise AnsibleFilterError("docker_ssh_endpoint: the host has neither ansible_host nor inventory_hostname")
    login = host_vars.get("ansible_user") or host_vars.get("ansible_ssh_user") or user
    port = host_vars.get("ansible_port") or host_vars.get("ansible_ssh_port")
    if ":" in str(address) and not str(address).startswith("["):
        address = f"[{address}]"
    endpoint = "ssh://"
    if login:
        endpoint += f"{login}@"
    endpoint += str(address)
    if port and int(port) != 22:
        endpoint += f":{int(port)}"
    return endpoint


class FilterModule:
    def filters(self):
        return {"docker_ssh_endpoint": docker_ssh_endpoint}
