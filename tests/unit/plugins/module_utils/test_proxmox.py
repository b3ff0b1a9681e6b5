"""The collection's Proxmox client against the lab's Proxmox VE simulator (memory backend, in-process).

The simulator shares no code with the client: it validates against the real API schema, so a client
that sends what real Proxmox rejects fails here.
"""

from __future__ import annotations

import copy
import urllib.parse

import pytest
import requests

from ansible_collections.mlfleet.serving.plugins.module_utils._proxmox import ProxmoxClient, ProxmoxError, ProxmoxTaskError, parse_upid
from lab.pvesim.config import DEFAULT_CONFIG
from lab.pvesim.server import Simulator, running_in_thread

FAST = {"clone_setup": 0.0, "clone_linked": 0.05, "clone_full": 0.05, "config": 0.0, "start": 0.01, "boot_to_agent": 0.05}
ROOT_TOKEN = DEFAULT_CONFIG["users"]["root@pam"]["tokens"]["admin"]["secret"]
AUTOMATION_TOKEN = DEFAULT_CONFIG["users"]["automation@pve"]["tokens"]["mlfleet"]["secret"]


@pytest.fixture
def sim(tmp_path):
    config = copy.deepcopy(DEFAULT_CONFIG)
    config["durations"].update(FAST)
    simulator = Simulator(config, tmp_path / "sim")
    with running_in_thread(simulator) as url:
        parts = urllib.parse.urlsplit(url)
        yield {"host": parts.hostname, "port": parts.port, "ca": str(simulator.certificates.ca_file), "simulator": simulator, "url": url}


def client(sim, **overrides):
    options = {"api_host": sim["host"], "api_port": sim["port"], "api_user": "root@pam", "api_token_id": "admin", "api_token_secret": ROOT_TOKEN}
    options["ca_path"] = sim["ca"]
    options.update(overrides)
    return ProxmoxClient(**options)


def inject(sim, **faults):
    headers = {"Authorization": f"Bearer {sim['simulator'].admin_token}"}
    response = requests.put(f"{sim['url']}/_sim/faults", json=faults, headers=headers, verify=sim["ca"], timeout=10)
    response.raise_for_status()


def test_token_client_reads_the_cluster(sim):
    names = {vm["vmid"]: vm["name"] for vm in client(sim).vm_resources()}
    assert names[9000] == "debian12-golden"


def test_password_login_works_and_a_wrong_one_names_the_user_and_fix(sim):
    password = DEFAULT_CONFIG["users"]["root@pam"]["password"]
    assert client(sim, api_token_id=None, api_token_secret=None, api_password=password).get("version")["version"]
    with pytest.raises(ProxmoxError, match=r"refused the login of root@pam: check api_user and api_password"):
        client(sim, api_token_id=None, api_token_secret=None, api_password="wrong")


def test_a_wrong_token_fails_at_the_first_call_naming_the_endpoint(sim):
    wrong = client(sim, api_token_secret="00000000-0000-0000-0000-000000000000")
    with pytest.raises(ProxmoxError, match=rf"127\.0\.0\.1:{sim['port']} rejected the credentials of root@pam .*check api_token_id and api_token_secret"):
        wrong.vm_resources()


def test_certificates_are_verified_by_default_and_the_error_says_how_to_trust_the_cluster(sim):
    with pytest.raises(ProxmoxError, match=r"TLS verification .* failed .*set ca_path to the cluster's CA certificate"):
        client(sim, ca_path=None).get("version")
    assert client(sim, ca_path=None, validate_certs=False).get("version")


def test_unreachable_api_names_host_and_port():
    unreachable = ProxmoxClient(api_host="127.0.0.1", api_port=9, api_user="root@pam", api_token_id="admin", api_token_secret="x", api_timeout=2)
    with pytest.raises(ProxmoxError, match=r"cannot reach Proxmox VE at 127\.0\.0\.1:9 .*check api_host and api_port"):
        unreachable.get("version")


def test_parameter_errors_carry_the_parameter_and_reason(sim):
    with pytest.raises(ProxmoxError, match=r"POST /nodes/pve1/qemu/9000/clone failed: HTTP 400 .*newid: value must have a minimum value of 100"):
        client(sim).post("nodes/pve1/qemu/9000/clone", newid=5)


def test_permission_errors_point_at_the_privileges(sim):
    automation = client(sim, api_user="automation@pve", api_token_id="mlfleet", api_token_secret=AUTOMATION_TOKEN)
    with pytest.raises(ProxmoxError, match=r"HTTP 403 .*\(check the privileges of the API user or token\)"):
        automation.post("nodes/pve1/qemu/9000/clone", newid=150, name="outside-the-pool")


def test_wait_task_returns_the_final_status(sim):
    api = client(sim)
    upid = api.post("nodes/pve1/qemu/9000/clone", newid=101, name="w1")
    assert api.wait_task(upid, timeout=10, poll_interval=0.01)["exitstatus"] == "OK"
    assert api.get("nodes/pve1/qemu/101/config")["name"] == "w1"


def test_a_failed_task_names_object_node_and_last_log_line(sim):
    inject(sim, clone_failure={"message": "storage migration failed"})
    api = client(sim)
    upid = api.post("nodes/pve1/qemu/9000/clone", newid=102, name="w2")
    with pytest.raises(ProxmoxTaskError, match=r"clone of VM 102 on node pve1 failed: .*storage migration failed.*; last log line: ") as failure:
        api.wait_task(upid, timeout=10, poll_interval=0.01, what="clone of VM 102")
    assert failure.value.upid == upid
    assert failure.value.log_tail


def test_a_task_past_its_deadline_says_so(sim):
    inject(sim, slow_storage={"slow-nfs": 2000})
    api = client(sim)
    upid = api.post("nodes/pve1/qemu/9000/clone", newid=103, name="w3", full=1)
    with pytest.raises(ProxmoxTaskError, match=r"task qmclone of 9000 on node pve1 still running after 0.3s: raise the timeout"):
        api.wait_task(upid, timeout=0.3, poll_interval=0.05)


@pytest.mark.parametrize("upid", ["", "UPID:pve1", "TASK:pve1:1:2:3:qmclone:9000:root@pam:"])
def test_malformed_task_ids_are_refused(upid):
    with pytest.raises(ProxmoxError, match="is not a Proxmox task id"):
        parse_upid(upid)


def test_from_params_ignores_unset_and_foreign_options(sim):
    params = {"api_host": sim["host"], "api_port": sim["port"], "api_user": "root@pam", "api_token_id": "admin"}
    params |= {"api_token_secret": ROOT_TOKEN, "ca_path": sim["ca"], "api_password": None, "count": 3}
    assert ProxmoxClient.from_params(params).get("version")
