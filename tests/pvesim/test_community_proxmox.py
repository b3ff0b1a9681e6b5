"""Acceptance: community.proxmox's own modules and inventory plugin, run by real ansible-playbook and ansible-inventory
processes, drive the simulator through a VM's life as a user of that collection would.

The collection comes from the `ansible` release that scripts/bootstrap unpacks into .ansible/test-collections.
Connections use the privilege-separated token of the default config, with certificate checks against the
simulator's CA: community.proxmox's `validate_certs` is a boolean, and requests takes the CA file from
REQUESTS_CA_BUNDLE when verification is on.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pvesim_support import AUTOMATION_TOKEN, REPO_ROOT, TEMPLATE, Sim

TEST_COLLECTIONS = REPO_ROOT / ".ansible" / "test-collections"
COLLECTION = TEST_COLLECTIONS / "ansible_collections" / "community" / "proxmox"
TOOLS = Path(sys.executable).parent
CLONE, NAME, POOL = 321, "acceptance-clone", "mlfleet"
RUN_LIMIT = 120
# ansible-inventory exits 0 even when a source failed: it says so in warnings.
PARSE_FAILURES = ("[WARNING]", "[ERROR]", "Failed to parse", "Unable to parse", "No inventory was parsed")

CONNECTION = {
    "api_host": "127.0.0.1",
    "api_port": "{{ pve_port }}",
    "api_user": AUTOMATION_TOKEN[0],
    "api_token_id": AUTOMATION_TOKEN[1],
    "api_token_secret": "{{ pve_token_secret }}",
    "validate_certs": True,
}


def task(title: str, module: str, /, **args) -> dict:
    return {"name": title, f"community.proxmox.{module}": args}


def check(name: str, *conditions: str) -> dict:
    return {"name": name, "ansible.builtin.assert": {"that": list(conditions), "quiet": True}}


def play(name: str, *tasks: dict) -> dict:
    return {
        "name": name,
        "hosts": "localhost",
        "gather_facts": False,
        "environment": {"REQUESTS_CA_BUNDLE": "{{ pve_ca_file }}"},
        "module_defaults": {"group/community.proxmox.proxmox": CONNECTION},
        "tasks": list(tasks),
    }


LIFE = play(
    "Clone the template into the pool, start it, read it, snapshot, change, roll back, drop the snapshot",
    task("Clone the template into the pool", "proxmox_kvm", node="pve1", clone="debian12-golden", newid=CLONE, name=NAME, pool=POOL, full=True),
    {"register": "cloned", **task("Clone again: the VM exists", "proxmox_kvm", node="pve1", clone="debian12-golden", newid=CLONE, name=NAME, pool=POOL)},
    check("The second clone changed nothing", "not cloned.changed"),
    task("Start the clone", "proxmox_kvm", vmid=CLONE, state="started"),
    {"register": "info", **task("Read the clone", "proxmox_vm_info", vmid=CLONE, config="current")},
    check(
        "The clone runs in the pool with the template's config",
        "info.proxmox_vms | length == 1",
        "info.proxmox_vms[0].status == 'running'",
        f"info.proxmox_vms[0].pool == '{POOL}'",
        f"info.proxmox_vms[0].name == '{NAME}'",
        "info.proxmox_vms[0].config.cores == 2",
        "info.proxmox_vms[0].template == false",
    ),
    task("Snapshot it with its RAM", "proxmox_snap", vmid=CLONE, snapname="before_change", description="acceptance", vmstate=True),
    task("Change its CPU count after the snapshot", "proxmox_kvm", vmid=CLONE, node="pve1", update=True, cores=4),
    {"register": "changed", **task("Read the change", "proxmox_vm_info", vmid=CLONE, config="current")},
    check("The change is there", "changed.proxmox_vms[0].config.cores == 4"),
    task("Roll back to the snapshot", "proxmox_snap", vmid=CLONE, snapname="before_change", state="rollback"),
    {"register": "rolled", **task("Read the rolled-back clone", "proxmox_vm_info", vmid=CLONE, config="current")},
    check(
        "The snapshot's config is back and its RAM state kept the clone running",
        "rolled.proxmox_vms[0].config.cores == 2",
        "rolled.proxmox_vms[0].config.parent == 'before_change'",
        "rolled.proxmox_vms[0].status == 'running'",
    ),
    task("Drop the snapshot", "proxmox_snap", vmid=CLONE, snapname="before_change", state="absent"),
)
END = play(
    "Stop and delete the clone",
    task("Stop the clone", "proxmox_kvm", vmid=CLONE, state="stopped"),
    task("Delete the clone", "proxmox_kvm", vmid=CLONE, state="absent"),
)


@pytest.fixture
def ansible(sim: Sim, tmp_path: Path):
    """Run ansible-playbook or ansible-inventory against `sim`, with community.proxmox and the simulator's CA."""
    if not (COLLECTION / "MANIFEST.json").is_file():
        pytest.fail(f"community.proxmox is not unpacked in {TEST_COLLECTIONS}: run scripts/bootstrap", pytrace=False)
    config = tmp_path / "ansible.cfg"
    config.write_text("[defaults]\ninterpreter_python = auto_silent\nretry_files_enabled = false\n", encoding="utf-8")
    collections = [str(TEST_COLLECTIONS), os.environ.get("ANSIBLE_COLLECTIONS_PATH") or str(REPO_ROOT / ".ansible" / "collections")]
    env = {
        **os.environ,
        "ANSIBLE_CONFIG": str(config),
        "ANSIBLE_COLLECTIONS_PATH": os.pathsep.join(collections),
        "ANSIBLE_LOCAL_TEMP": str(tmp_path / "ansible-tmp"),
        "ANSIBLE_NOCOLOR": "1",
        "REQUESTS_CA_BUNDLE": sim.ca_file,
        "NO_PROXY": "127.0.0.1",
    }
    hosts = tmp_path / "localhost.yml"
    local = {"ansible_connection": "local", "ansible_python_interpreter": sys.executable}
    variables = {"pve_port": sim.port, "pve_token_secret": AUTOMATION_TOKEN[2], "pve_ca_file": sim.ca_file}
    hosts.write_text(yaml.safe_dump({"all": {"hosts": {"localhost": local}, "vars": variables}}), encoding="utf-8")

    def run(tool: str, *args: str) -> subprocess.CompletedProcess:
        command = [str(TOOLS / tool), *args]
        if tool == "ansible-playbook":
            command[1:1] = ["-i", str(hosts)]
        return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=RUN_LIMIT, check=False)

    return run


def playbook(tmp_path: Path, name: str, plays: list[dict]) -> str:
    path = tmp_path / f"{name}.yml"
    path.write_text(yaml.safe_dump(plays, sort_keys=False), encoding="utf-8")
    return str(path)


def inventory_source(sim: Sim, tmp_path: Path) -> str:
    user, token_id, secret = AUTOMATION_TOKEN
    source = {
        "plugin": "community.proxmox.proxmox",
        "url": sim.url,
        "user": user,
        "token_id": token_id,
        "token_secret": secret,
        "validate_certs": True,
        "want_facts": True,
    }
    path = tmp_path / "lab.proxmox.yml"
    path.write_text(yaml.safe_dump(source), encoding="utf-8")
    return str(path)


def plain(value):
    """ansible-inventory's JSON with the values the plugin marked unsafe (`{"__ansible_unsafe": ...}`) unwrapped."""
    if isinstance(value, dict):
        return plain(value["__ansible_unsafe"]) if value.keys() == {"__ansible_unsafe"} else {key: plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [plain(item) for item in value]
    return value


def succeeded(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"{result.args}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"
    return result


def test_community_proxmox_modules_and_inventory_drive_a_clone_through_its_life(sim: Sim, ansible, tmp_path: Path):
    succeeded(ansible("ansible-playbook", playbook(tmp_path, "life", [LIFE])))

    listed = succeeded(ansible("ansible-inventory", "-i", inventory_source(sim, tmp_path), "--list"))
    failures = [line for line in listed.stderr.splitlines() if any(failure in line for failure in PARSE_FAILURES)]
    assert not failures, f"the inventory source did not parse:\n{listed.stderr}"
    inventory = plain(json.loads(listed.stdout))
    assert NAME in inventory["_meta"]["hostvars"], f"the inventory does not list {NAME}:\n{listed.stdout}\n{listed.stderr}"
    facts = inventory["_meta"]["hostvars"][NAME]
    assert (facts["proxmox_vmid"], facts["proxmox_node"], facts["proxmox_vmtype"]) == (CLONE, "pve1", "qemu")
    assert (facts["proxmox_status"], facts["proxmox_qmpstatus"], facts["proxmox_snapshots"]) == ("running", "running", [])
    assert facts["proxmox_name"] == NAME and facts["proxmox_cores"] == 2 and "proxmox_parent" not in facts
    assert [interface["name"] for interface in facts["proxmox_agent_interfaces"]] == ["lo", "eth0"]
    for group in (f"proxmox_pool_{POOL}", "proxmox_all_running", "proxmox_pve1_qemu"):
        assert NAME in inventory.get(group, {}).get("hosts", []), f"{NAME} is not in {group}"
    assert "debian12-golden" not in inventory["_meta"]["hostvars"], "templates are not hosts"
    assert inventory["proxmox_nodes"]["hosts"] == ["pve1", "pve2", "pve3"]

    succeeded(ansible("ansible-playbook", playbook(tmp_path, "end", [END])))
    assert CLONE not in [entry["vmid"] for entry in sim.data("GET", "/cluster/resources", params={"type": "vm"})]
    assert TEMPLATE in [entry["vmid"] for entry in sim.data("GET", "/cluster/resources", params={"type": "vm"})]
