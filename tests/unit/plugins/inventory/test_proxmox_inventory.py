"""The proxmox inventory plugin against the lab's Proxmox VE simulator (memory backend, in-process).

One simulated cluster serves the whole module; tests only read it, except where they patch the client.
It holds, besides the template 9000:

| vmid | name      | node | pool    | tags                  | state   | ipconfig0      | address                        |
|------|-----------|------|---------|-----------------------|---------|----------------|--------------------------------|
| 101  | manager-1 | pve1 | mlfleet | swarm_manager;mlfleet | running | 10.20.0.11/24  | agent: 10.20.0.11              |
| 102  | worker    | pve1 | mlfleet | swarm_worker;mlfleet  | running | dhcp           | agent: a 10.99.x.y lease       |
| 103  | worker    | pve2 | mlfleet | swarm_worker;mlfleet  | running | 10.20.0.13/24  | agent never up: ipconfig0      |
| 104  | spare     | pve2 | mlfleet | swarm_worker          | stopped | dhcp           | none: unreachable              |
| 105  | outside   | pve3 | -       | other                 | stopped | 10.20.0.15/24  | ipconfig0                      |
"""

from __future__ import annotations

import asyncio
import copy
import os
import time
import urllib.parse
from collections import Counter

import pytest
import requests
import yaml
from ansible.errors import AnsibleParserError
from ansible.inventory.data import InventoryData
from ansible.inventory.manager import InventoryManager
from ansible.parsing.dataloader import DataLoader
from ansible.plugins.loader import init_plugin_loader, inventory_loader
from ansible.template import Templar, is_trusted_as_template

# What the ansible CLIs do first: without the collection loader, the plugin loader cannot find
# mlfleet.serving.proxmox (pytest's pythonpath only makes the checkout importable).
init_plugin_loader()

from ansible_collections.mlfleet.serving.plugins.inventory import proxmox as proxmox_inventory
from ansible_collections.mlfleet.serving.plugins.module_utils._proxmox import ProxmoxClient
from lab.pvesim import api as pvesim_api
from lab.pvesim.backend import dhcp_address
from lab.pvesim.config import DEFAULT_CONFIG
from lab.pvesim.server import Simulator, running_in_thread

FAST = {"clone_setup": 0.0, "clone_linked": 0.02, "clone_full": 0.02, "config": 0.0, "start": 0.01, "boot_to_agent": 0.05}
ROOT_TOKEN = DEFAULT_CONFIG["users"]["root@pam"]["tokens"]["admin"]["secret"]
AUTOMATION_TOKEN = DEFAULT_CONFIG["users"]["automation@pve"]["tokens"]["mlfleet"]["secret"]
VMS = [
    # vmid, name, target node, pool, tags, ipconfig0, started
    (101, "manager-1", "pve1", "mlfleet", "swarm_manager;mlfleet", "ip=10.20.0.11/24,gw=10.20.0.1", True),
    (102, "worker", "pve1", "mlfleet", "swarm_worker;mlfleet", "ip=dhcp", True),
    (103, "worker", "pve2", "mlfleet", "swarm_worker;mlfleet", "ip=10.20.0.13/24,gw=10.20.0.1", True),
    (104, "spare", "pve2", "mlfleet", "swarm_worker", "ip=dhcp", False),
    (105, "outside", "pve3", None, "other", "ip=10.20.0.15/24,gw=10.20.0.1", False),
]
RUNNING = {101, 102, 103}
ALL_HOSTS = {"manager-1", "worker-102", "worker-103", "spare", "outside"}


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    config = copy.deepcopy(DEFAULT_CONFIG)
    config["durations"].update(FAST)
    config["faults"] = {"agent_never_up": [103]}
    simulator = Simulator(config, tmp_path_factory.mktemp("sim"))
    with running_in_thread(simulator) as url:
        parts = urllib.parse.urlsplit(url)
        sim = {"host": parts.hostname, "port": parts.port, "ca": str(simulator.certificates.ca_file), "url": url, "admin": simulator.admin_token}
        build_cluster(sim)
        yield sim


def build_cluster(sim):
    api = ProxmoxClient(api_host=sim["host"], api_port=sim["port"], api_user="root@pam", api_token_id="admin", api_token_secret=ROOT_TOKEN, ca_path=sim["ca"])
    for vmid, name, node, pool, tags, ipconfig, started in VMS:
        options = {"newid": vmid, "name": name, "target": node} | ({"pool": pool} if pool else {})
        api.wait_task(api.post("nodes/pve1/qemu/9000/clone", **options), timeout=10, poll_interval=0.01)
        api.put(f"nodes/{node}/qemu/{vmid}/config", tags=tags, ipconfig0=ipconfig)
        if started:
            api.wait_task(api.post(f"nodes/{node}/qemu/{vmid}/status/start"), timeout=10, poll_interval=0.01)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # until the agents that will ever answer do
        try:
            api.get("nodes/pve1/qemu/101/agent/network-get-interfaces")
            api.get("nodes/pve1/qemu/102/agent/network-get-interfaces")
            return
        except Exception:
            time.sleep(0.02)
    raise AssertionError("the guest agents of VMs 101 and 102 did not come up within 10 s")


def admin(sim, method, what, **kwargs):
    response = requests.request(
        method, f"{sim['url']}/_sim/{what}", headers={"Authorization": f"Bearer {sim['admin']}"}, verify=sim["ca"], timeout=10, **kwargs
    )
    response.raise_for_status()
    return response.json()


def api_requests(sim):
    """The API requests since the last clear, as `METHOD /path` counts (agent and config calls by kind)."""
    counts = Counter()
    for entry in admin(sim, "GET", "requests"):
        path = entry["path"]
        kind = "agent" if "/agent/" in path else "config" if path.endswith("/config") else path
        counts[f"{entry['method']} {kind}"] += 1
    return counts


def write_config(tmp_path, sim, name="lab.proxmox.yml", **options):
    config = {
        "plugin": "mlfleet.serving.proxmox",
        "api_host": sim["host"],
        "api_port": sim["port"],
        "api_user": "root@pam",
        "api_token_id": "admin",
        "api_token_secret": ROOT_TOKEN,
        "ca_path": sim["ca"],
    } | options
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return str(path)


def parse(path, cache=True):
    """A fresh plugin instance parses `path` into a fresh InventoryData; returns (inventory, plugin)."""
    plugin = inventory_loader.get("mlfleet.serving.proxmox")
    inventory = InventoryData()
    plugin.parse(inventory, DataLoader(), path, cache=cache)
    return inventory, plugin


def members(inventory, group):
    return {host.name for host in inventory.groups[group].get_hosts()} if group in inventory.groups else set()


def host_vars(inventory, name):
    return inventory.get_host(name).get_vars()


# --- the whole path through ansible-core --------------------------------------------------------


def test_inventory_manager_loads_the_cluster_with_swarm_groups(tmp_path, sim):
    manager = InventoryManager(loader=DataLoader(), sources=[write_config(tmp_path, sim)])
    assert {host.name for host in manager.get_hosts()} == ALL_HOSTS
    assert {host.name for host in manager.get_hosts("swarm_managers")} == {"manager-1"}
    assert {host.name for host in manager.get_hosts("swarm_workers")} == {"worker-102", "worker-103", "spare"}
    assert {host.name for host in manager.get_hosts("proxmox_pool_mlfleet")} == {"manager-1", "worker-102", "worker-103", "spare"}
    assert {host.name for host in manager.get_hosts("proxmox_node_pve2")} == {"worker-103", "spare"}
    assert {host.name for host in manager.get_hosts("proxmox_tag_other")} == {"outside"}


def test_host_addresses_come_from_the_agent_then_ipconfig0_else_unreachable(tmp_path, sim):
    inventory, _plugin = parse(write_config(tmp_path, sim))
    expected = {
        "manager-1": ("10.20.0.11", "agent"),
        "worker-102": (str(dhcp_address(102).ip), "agent"),
        "worker-103": ("10.20.0.13", "ipconfig0"),
        "outside": ("10.20.0.15", "ipconfig0"),
    }
    for name, (address, source) in expected.items():
        variables = host_vars(inventory, name)
        assert (variables["ansible_host"], variables["proxmox_address_source"], variables["proxmox_unreachable"]) == (address, source, False)
    spare = host_vars(inventory, "spare")
    assert "ansible_host" not in spare
    assert spare["proxmox_unreachable"] is True and spare["proxmox_address_source"] is None
    assert members(inventory, "proxmox_unreachable") == {"spare"}


def test_an_unreachable_vm_is_named_in_a_warning(tmp_path, sim, monkeypatch):
    warnings = []
    plugin = inventory_loader.get("mlfleet.serving.proxmox")
    monkeypatch.setattr(plugin.display, "warning", lambda message, *args, **kwargs: warnings.append(message))
    plugin.parse(InventoryData(), DataLoader(), write_config(tmp_path, sim), cache=False)
    assert len(warnings) == 1
    assert "VM 104 (spare) on pve2 has no address: it is stopped; no static ipconfig0 address" in warnings[0]


def test_host_variables(tmp_path, sim):
    inventory, _plugin = parse(write_config(tmp_path, sim))
    variables = host_vars(inventory, "worker-103")
    assert {key: value for key, value in variables.items() if key.startswith("proxmox_")} == {
        "proxmox_vmid": 103,
        "proxmox_name": "worker",
        "proxmox_node": "pve2",
        "proxmox_status": "running",
        "proxmox_tags": ["mlfleet", "swarm_worker"],
        "proxmox_pool": "mlfleet",
        "proxmox_address_source": "ipconfig0",
        "proxmox_unreachable": False,
    }
    assert host_vars(inventory, "outside")["proxmox_pool"] is None


def test_templates_are_never_hosts_and_shared_names_get_the_vmid(tmp_path, sim):
    inventory, _plugin = parse(write_config(tmp_path, sim))
    assert set(inventory.hosts) == ALL_HOSTS
    assert "debian12-golden" not in inventory.hosts
    assert host_vars(inventory, "worker-102")["proxmox_name"] == host_vars(inventory, "worker-103")["proxmox_name"] == "worker"


# --- API calls ----------------------------------------------------------------------------------


def test_one_resources_call_one_config_call_per_vm_and_one_agent_call_per_running_vm(tmp_path, sim):
    admin(sim, "DELETE", "requests")
    _inventory, plugin = parse(write_config(tmp_path, sim))
    calls = api_requests(sim)
    # Every VM's config names the MAC the agent's interfaces are matched by; 104 and 105 are stopped.
    assert calls == {"GET /cluster/resources": 1, "GET agent": len(RUNNING), "GET config": len(VMS)}
    assert plugin.api_calls == {"cluster/resources": 1, "agent": len(RUNNING), "config": len(VMS)}


def test_filtered_out_vms_cost_no_call(tmp_path, sim):
    admin(sim, "DELETE", "requests")
    inventory, _plugin = parse(write_config(tmp_path, sim, filters={"nodes": ["pve1"]}))
    assert set(inventory.hosts) == {"manager-1", "worker-102"}
    calls = api_requests(sim)
    assert (calls["GET /cluster/resources"], calls["GET agent"], calls["GET config"]) == (1, 2, 2)


@pytest.mark.parametrize(
    ("filters", "hosts"),
    [
        ({"tags": ["swarm_worker"]}, {"worker-102", "worker-103", "spare"}),
        ({"tags": ["swarm_worker", "mlfleet"]}, {"worker-102", "worker-103"}),
        ({"tags": "swarm_manager"}, {"manager-1"}),
        ({"pool": "mlfleet"}, {"manager-1", "worker-102", "worker-103", "spare"}),
        ({"status": ["stopped"]}, {"spare", "outside"}),
        ({"status": ["running"], "nodes": ["pve2"]}, {"worker-103"}),
        ({"nodes": ["pve2", "pve3"], "pool": "mlfleet"}, {"worker-103", "spare"}),
        ({"tags": ["nothing-has-this"]}, set()),
    ],
)
def test_filters(tmp_path, sim, filters, hosts):
    inventory, _plugin = parse(write_config(tmp_path, sim, filters=filters))
    assert set(inventory.hosts) == hosts


def test_an_unknown_filter_is_refused(tmp_path, sim):
    with pytest.raises(AnsibleParserError, match=r"unknown filters tag; known: tags, pool, status, nodes"):
        parse(write_config(tmp_path, sim, filters={"tag": ["swarm_worker"]}))


def test_a_slow_agent_counts_as_none_after_agent_timeout(tmp_path, sim, monkeypatch):
    route = ("GET", "/nodes/{node}/qemu/{vmid}/agent/network-get-interfaces")
    answer = pvesim_api.HANDLERS[route]

    async def slow_for_101(call):
        if call.params["vmid"] == 101:
            await asyncio.sleep(2.0)
        return await answer(call)

    monkeypatch.setitem(pvesim_api.HANDLERS, route, slow_for_101)
    warnings = []
    plugin = inventory_loader.get("mlfleet.serving.proxmox")
    monkeypatch.setattr(plugin.display, "warning", lambda message, *args, **kwargs: warnings.append(message))
    inventory = InventoryData()
    started = time.monotonic()
    plugin.parse(inventory, DataLoader(), write_config(tmp_path, sim, agent_timeout=0.3, filters={"nodes": ["pve1"]}), cache=False)
    assert time.monotonic() - started < 1.5
    manager = inventory.get_host("manager-1").get_vars()
    assert (manager["ansible_host"], manager["proxmox_address_source"]) == ("10.20.0.11", "ipconfig0")
    assert inventory.get_host("worker-102").get_vars()["proxmox_address_source"] == "agent"
    assert plugin.api_calls == {"cluster/resources": 1, "agent": 2, "config": 2}
    assert warnings == []


# --- constructed ----------------------------------------------------------------------------------


def test_compose_groups_and_keyed_groups(tmp_path, sim):
    path = write_config(
        tmp_path,
        sim,
        compose={"ansible_user": "'debian'", "next_vmid": "proxmox_vmid + 1"},
        groups={"leaders": "'swarm_manager' in proxmox_tags", "reachable": "not proxmox_unreachable"},
        keyed_groups=[{"key": "proxmox_status", "prefix": "status"}, {"key": "proxmox_tags", "prefix": "tag"}],
        tag_groups={"swarm_worker": "workers"},
    )
    inventory, _plugin = parse(path)
    assert host_vars(inventory, "manager-1")["ansible_user"] == "debian"
    assert host_vars(inventory, "manager-1")["next_vmid"] == 102
    assert members(inventory, "leaders") == {"manager-1"}
    assert members(inventory, "reachable") == ALL_HOSTS - {"spare"}
    assert members(inventory, "status_stopped") == {"spare", "outside"}
    assert members(inventory, "tag_mlfleet") == {"manager-1", "worker-102", "worker-103"}
    assert members(inventory, "workers") == {"worker-102", "worker-103", "spare"}
    assert "swarm_workers" not in inventory.groups


def test_strict_compose_names_the_host(tmp_path, sim):
    with pytest.raises(Exception, match=r"Could not set broken for host manager-1"):
        parse(write_config(tmp_path, sim, strict=True, compose={"broken": "no_such_variable.attribute"}))


# --- remote text is never templated --------------------------------------------------------------


def test_strings_from_the_api_are_never_templated(tmp_path, sim, monkeypatch):
    # Proxmox itself restricts names and tags; a proxy, another API version or a compromised node may not.
    hostile = "{{ lookup('env', 'HOME') }}"
    hostile_tag = "{{7*6}}"  # tags are split at blanks and commas
    original = proxmox_inventory.ProxmoxClient.vm_resources

    def with_template_text(self):
        entries = original(self)
        for entry in entries:
            if entry["vmid"] == 101:
                entry["name"] = hostile
                entry["tags"] = f"swarm_manager;{hostile_tag}"
        return entries

    monkeypatch.setattr(proxmox_inventory.ProxmoxClient, "vm_resources", with_template_text)
    inventory, _plugin = parse(write_config(tmp_path, sim, compose={"label": "proxmox_name ~ '-x'"}))
    variables = host_vars(inventory, hostile)
    assert not is_trusted_as_template(variables["proxmox_name"])
    assert not any(is_trusted_as_template(tag) for tag in variables["proxmox_tags"])
    templar = Templar(loader=DataLoader(), variables=variables)
    assert templar.template(variables["proxmox_name"]) == hostile
    assert templar.template(variables["proxmox_tags"]) == ["swarm_manager", hostile_tag]
    assert variables["label"] == hostile + "-x"
    assert os.environ["HOME"] not in str(variables)


# --- cache ----------------------------------------------------------------------------------------


def cache_options(tmp_path):
    return {"cache": True, "cache_plugin": "ansible.builtin.jsonfile", "cache_connection": str(tmp_path / "cache"), "cache_timeout": 3600}


def test_a_cache_hit_makes_no_call_and_does_not_restart_the_timeout(tmp_path, sim):
    path = write_config(tmp_path, sim, **cache_options(tmp_path))
    cold, plugin = parse(path)
    plugin.update_cache_if_changed()  # what InventoryManager does after a parse
    (cache_file,) = (tmp_path / "cache").iterdir()
    written = cache_file.stat().st_mtime_ns

    admin(sim, "DELETE", "requests")
    warm, plugin = parse(path)
    plugin.update_cache_if_changed()
    assert api_requests(sim) == {}
    assert plugin.api_calls == {"cluster/resources": 0, "agent": 0, "config": 0}
    assert cache_file.stat().st_mtime_ns == written
    assert set(warm.hosts) == set(cold.hosts) == ALL_HOSTS
    assert members(warm, "swarm_workers") == {"worker-102", "worker-103", "spare"}
    assert host_vars(warm, "worker-103")["ansible_host"] == "10.20.0.13"
    assert not is_trusted_as_template(host_vars(warm, "worker-103")["proxmox_name"])


def test_refresh_and_changed_filters_bypass_the_cache(tmp_path, sim):
    path = write_config(tmp_path, sim, **cache_options(tmp_path))
    _inventory, plugin = parse(path)
    plugin.update_cache_if_changed()

    admin(sim, "DELETE", "requests")
    _inventory, plugin = parse(path, cache=False)  # --flush-cache, meta: refresh_inventory
    assert plugin.api_calls["cluster/resources"] == 1

    path = write_config(tmp_path, sim, filters={"nodes": ["pve1"]}, **cache_options(tmp_path))
    inventory, plugin = parse(path)
    assert plugin.api_calls["cluster/resources"] == 1
    assert set(inventory.hosts) == {"manager-1", "worker-102"}


# --- errors ---------------------------------------------------------------------------------------


def test_a_wrong_token_fails_the_inventory_with_the_clients_message(tmp_path, sim):
    path = write_config(tmp_path, sim, api_token_secret="00000000-0000-0000-0000-000000000000")
    with pytest.raises(
        AnsibleParserError, match=rf"lab\.proxmox\.yml: Proxmox VE at 127\.0\.0\.1:{sim['port']} rejected the credentials of root@pam"
    ) as failure:
        parse(path)
    assert "00000000-0000" not in str(failure.value)


def test_missing_credentials_say_what_to_set(tmp_path, sim, monkeypatch):
    for variable in ("PROXMOX_TOKEN_SECRET", "PROXMOX_PASSWORD"):
        monkeypatch.delenv(variable, raising=False)
    path = write_config(tmp_path, sim, api_token_secret=None)
    with pytest.raises(AnsibleParserError, match=r"no credentials: set api_token_id and api_token_secret \(or PROXMOX_TOKEN_ID and PROXMOX_TOKEN_SECRET\)"):
        parse(path)


def test_credentials_come_from_the_environment(tmp_path, sim, monkeypatch):
    monkeypatch.setenv("PROXMOX_USER", "automation@pve")
    monkeypatch.setenv("PROXMOX_TOKEN_ID", "mlfleet")
    monkeypatch.setenv("PROXMOX_TOKEN_SECRET", AUTOMATION_TOKEN)
    config = {"plugin": "mlfleet.serving.proxmox", "api_host": sim["host"], "api_port": sim["port"], "ca_path": sim["ca"]}
    path = tmp_path / "env.proxmox.yml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    inventory, _plugin = parse(str(path))
    # The privilege-separated token audits every VM (PVEAuditor on /).
    assert set(inventory.hosts) == ALL_HOSTS


def test_an_unverifiable_certificate_says_how_to_trust_the_cluster(tmp_path, sim):
    with pytest.raises(AnsibleParserError, match=r"TLS verification .* failed .*set ca_path"):
        parse(write_config(tmp_path, sim, ca_path=None))


# --- verify_file ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "accepted"),
    [
        ("proxmox.yml", True),
        ("proxmox.yaml", True),
        ("lab.proxmox.yml", True),
        ("lab_proxmox.yaml", True),
        ("lab.yml", False),
        ("proxmox.yml.bak", False),
        ("proxmox.json", False),
        ("aws_ec2.yml", False),
    ],
)
def test_verify_file_accepts_only_proxmox_yml_or_yaml(tmp_path, name, accepted):
    path = tmp_path / name
    path.write_text("plugin: mlfleet.serving.proxmox\n", encoding="utf-8")
    assert inventory_loader.get("mlfleet.serving.proxmox").verify_file(str(path)) is accepted


def test_verify_file_rejects_a_missing_file(tmp_path):
    assert not inventory_loader.get("mlfleet.serving.proxmox").verify_file(str(tmp_path / "absent.proxmox.yml"))


# --- address choice and tags (the rules themselves: tests/unit/plugins/module_utils/test_proxmox_guest.py) ------


def test_address_nic_must_name_a_network_device(tmp_path, sim):
    with pytest.raises(AnsibleParserError, match=r"address_nic 'eth0' is not a network device of a VM: name one of net0 to net31"):
        parse(write_config(tmp_path, sim, address_nic="eth0"))


def test_an_address_nic_the_vms_lack_leaves_the_agent_out_and_says_why(tmp_path, sim, monkeypatch):
    warnings = []
    plugin = inventory_loader.get("mlfleet.serving.proxmox")
    monkeypatch.setattr(plugin.display, "warning", lambda message, *args, **kwargs: warnings.append(message))
    inventory = InventoryData()
    plugin.parse(inventory, DataLoader(), write_config(tmp_path, sim, address_nic="net1", filters={"nodes": ["pve1"]}), cache=False)
    assert members(inventory, "proxmox_unreachable") == {"manager-1", "worker-102"}
    assert any("VM 101 (manager-1) on pve1 has no address: the VM config has no net1 with a MAC address; no static ipconfig1 address" in w for w in warnings)


def test_tags_are_lowercase_for_variables_groups_filters_and_tag_groups(tmp_path, sim, monkeypatch):
    original = proxmox_inventory.ProxmoxClient.vm_resources

    def with_mixed_case_tags(self):
        entries = original(self)
        for entry in entries:
            if entry["vmid"] == 101:
                entry["tags"] = "Swarm_Manager;MLfleet;mlfleet"
        return entries

    monkeypatch.setattr(proxmox_inventory.ProxmoxClient, "vm_resources", with_mixed_case_tags)
    inventory, _plugin = parse(write_config(tmp_path, sim, filters={"tags": ["MLFLEET"]}, tag_groups={"SWARM_manager": "leaders"}))
    assert host_vars(inventory, "manager-1")["proxmox_tags"] == ["swarm_manager", "mlfleet"]
    assert members(inventory, "leaders") == members(inventory, "proxmox_tag_swarm_manager") == {"manager-1"}
    assert set(inventory.hosts) == {"manager-1", "worker-102", "worker-103"}
