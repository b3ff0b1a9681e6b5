"""The main job on the lab, as the README's lab command runs it: site.yml provisions the manager and
worker VMs through the lab's Proxmox simulator (docker backend), the mlfleet.serving.proxmox inventory
plugin reads them back, and Ansible reaches every VM over SSH as its cloud-init user.

Its own lab (name, subnet, simulator port, state directory) with no plain nodes: every host here
came through the Proxmox API.
"""

import os
import re

import pytest
import requests
import yaml
from lab_support import REPO_ROOT, run

from lab.pvesim.config import DEFAULT_CONFIG

SUBNET_PREFIX = "192.168.216"
PVE_PORT = 18008
WRITES = {"POST", "PUT", "DELETE"}


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.fail("the lab tests need root; run them through ./scripts/test as root")
    work = tmp_path_factory.mktemp("site")
    state = work / "state"
    env = {
        "MLFLEET_LAB_NAME": "mlfleet-sitetest",
        "MLFLEET_LAB_STATE": str(state),
        "MLFLEET_LAB_SUBNET": f"{SUBNET_PREFIX}.0/24",
        "MLFLEET_LAB_GATEWAY": f"{SUBNET_PREFIX}.1",
        "MLFLEET_LAB_PVE_PORT": str(PVE_PORT),
        "MLFLEET_LAB_NODES": "0",
    }
    # The lab inventory as inventories/lab/ has it, pointed at this lab's simulator and subnet.
    inventory = work / "inventory"
    inventory.mkdir()
    (inventory / "group_vars").symlink_to(REPO_ROOT / "inventories" / "lab" / "group_vars")
    plugin_config = yaml.safe_load((REPO_ROOT / "inventories" / "lab" / "proxmox.yml").read_text())
    plugin_config |= {"api_port": PVE_PORT, "ca_path": str(state / "pvesim" / "ca.pem")}
    (inventory / "proxmox.yml").write_text(yaml.safe_dump(plugin_config))
    overrides = work / "subnet.yml"
    gateway = f"{SUBNET_PREFIX}.1"
    overrides.write_text(
        yaml.safe_dump(
            {
                "mlfleet_managers": {"count": 1, "cores": 1, "memory": 1024,
                                     "ip_range": {"start": f"{SUBNET_PREFIX}.10", "end": f"{SUBNET_PREFIX}.12", "prefix": 24, "gateway": gateway}},
                "mlfleet_workers": {"count": 2, "cores": 1, "memory": 1024,
                                    "ip_range": {"start": f"{SUBNET_PREFIX}.20", "end": f"{SUBNET_PREFIX}.59", "prefix": 24, "gateway": gateway}},
                "mlfleet_nameserver": gateway,
            }
        )
    )  # fmt: skip
    try:
        run([REPO_ROOT / "lab" / "up.sh"], env=env, timeout=900)
        yield {"env": env, "inventory": inventory, "overrides": overrides, "state": state}
    finally:
        run([REPO_ROOT / "lab" / "down.sh"], env=env, check=False)


def site_yml(site):
    return run(["ansible-playbook", "-i", site["inventory"], "-e", f"@{site['overrides']}", "site.yml"], env=site["env"], timeout=900)


def simulator_requests(site, method="GET"):
    token = (site["state"] / "pvesim" / "admin-token").read_text().strip()
    response = requests.request(
        method, f"https://127.0.0.1:{PVE_PORT}/_sim/requests", headers={"Authorization": f"Bearer {token}"},
        verify=site["state"] / "pvesim" / "ca.pem", timeout=10,
    )  # fmt: skip
    response.raise_for_status()
    return response.json() if method == "GET" else None


def recap(output):
    return dict(re.findall(r"^(\S+)\s+:\s+(ok=.*)$", output, re.MULTILINE))


def test_site_provisions_vms_through_proxmox_and_reaches_them(site):
    result = site_yml(site)
    hosts = {host: counters for host, counters in recap(result.stdout).items() if host != "localhost"}
    assert len(hosts) == 3, result.stdout
    for host, counters in hosts.items():
        assert re.search(r"\bunreachable=0\b.*\bfailed=0\b", counters), (host, counters)
    swarm = re.findall(r"swarm \w+: (\S+) is a ready (manager|worker)\s+\(active\),\s+VM\s+(\d+)", result.stdout)
    assert sorted(role for _hostname, role, _vmid in swarm) == ["manager", "worker", "worker"], result.stdout
    assert re.search(r"\bchanged=[1-9]", recap(result.stdout)["localhost"]), "the first run must create the VMs"

    graph = run(["ansible-inventory", "-i", site["inventory"], "--list"], env=site["env"])
    inventory = yaml.safe_load(graph.stdout)
    assert len(inventory["swarm_managers"]["hosts"]) == 1
    assert len(inventory["swarm_workers"]["hosts"]) == 2
    # ansible-inventory marks the plugin's unsafe (API-sourced) strings as {"__ansible_unsafe": value}.
    hostvars = inventory["_meta"]["hostvars"]
    addresses = sorted(hostvars[h]["ansible_host"]["__ansible_unsafe"] for h in inventory["swarm_managers"]["hosts"] + inventory["swarm_workers"]["hosts"])
    assert addresses == [f"{SUBNET_PREFIX}.10", f"{SUBNET_PREFIX}.20", f"{SUBNET_PREFIX}.21"]
    # Every swarm node carries the vmid of the VM the inventory plugin found.
    assert sorted(int(vmid) for _hostname, _role, vmid in swarm) == sorted(hostvars[h]["proxmox_vmid"] for h in hostvars)

    vm_containers = run(["docker", "ps", "-q", "--filter", "label=io.mlfleet.lab.vmid"]).stdout.split()
    assert len(vm_containers) >= 3


def test_site_again_changes_nothing_and_writes_nothing_to_proxmox(site):
    simulator_requests(site, "DELETE")
    result = site_yml(site)
    for host, counters in recap(result.stdout).items():
        assert re.search(r"\bchanged=0\b.*\bunreachable=0\b.*\bfailed=0\b", counters), (host, counters)
    writes = [f"{r['method']} {r['path']}" for r in simulator_requests(site) if r["method"] in WRITES]
    assert writes == []


def test_lab_credentials_are_the_simulators_published_lab_ones():
    # The lab inventory carries the simulator's lab-only token; if the simulator's default changes, so must it.
    lab_vars = yaml.safe_load((REPO_ROOT / "inventories" / "lab" / "group_vars" / "all.yml").read_text())
    token = DEFAULT_CONFIG["users"]["automation@pve"]["tokens"]["mlfleet"]["secret"]
    assert lab_vars["mlfleet_proxmox"]["api_token_secret"] == token
    assert yaml.safe_load((REPO_ROOT / "inventories" / "lab" / "proxmox.yml").read_text())["api_token_secret"] == token
