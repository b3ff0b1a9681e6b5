"""Authentication (tokens, tickets, CSRF) and the permission checks the schema demands."""

from __future__ import annotations

import pytest
import requests
from pvesim_support import ROOT_PASSWORD, ROOT_TOKEN, TEMPLATE, Sim

from lab.pvesim.config import DEFAULT_CONFIG

PASSWORD = "lab-password"
USERS = {
    **DEFAULT_CONFIG["users"],
    "automation@pve": {
        "password": PASSWORD,
        "tokens": {"separated": {"secret": "sep-secret", "privsep": True}, "shared": {"secret": "shared-secret", "privsep": False}},
    },
    "auditor@pve": {"password": PASSWORD},
    "optionsonly@pve": {"password": PASSWORD},
    "nobody@pve": {"password": PASSWORD},
}
ACL = [
    {"path": "/", "roles": ["PVEAuditor"], "users": ["automation@pve", "auditor@pve"]},
    {"path": "/pool/mlfleet", "roles": ["PVEVMAdmin"], "users": ["automation@pve"], "tokens": ["automation@pve!separated"]},
    {"path": "/vms/9000", "roles": ["PVETemplateUser"], "users": ["automation@pve"], "tokens": ["automation@pve!separated"]},
    {"path": "/storage", "roles": ["PVEDatastoreUser"], "users": ["automation@pve"], "tokens": ["automation@pve!separated"]},
    # More than the user holds: a privilege-separated token never exceeds its user.
    {"path": "/vms", "roles": ["PVEVMAdmin"], "tokens": ["automation@pve!separated"]},
    {"path": "/vms", "roles": ["OptionsOnly"], "users": ["optionsonly@pve"]},
]
SEPARATED = ("automation@pve", "separated", "sep-secret")
SHARED = ("automation@pve", "shared", "shared-secret")


@pytest.fixture
def sim(make_sim) -> Sim:
    return make_sim(users=USERS, acl=ACL, roles={"OptionsOnly": ["VM.Audit", "VM.Config.Options"]})


def login(sim: Sim, user: str, password: str = PASSWORD) -> dict:
    return sim.data("POST", "/access/ticket", token=None, data={"username": user, "password": password})


def as_user(sim: Sim, user: str, method: str, path: str, **kwargs):
    session = login(sim, user)
    headers = {"CSRFPreventionToken": session["CSRFPreventionToken"]}
    return sim.call(method, path, token=None, cookies={"PVEAuthCookie": session["ticket"]}, headers=headers, **kwargs)


def denied(response) -> str:
    assert response.status_code == 403, f"{response.status_code} {response.text}"
    return response.reason


# --- authentication -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "header",
    [
        f"PVEAPIToken=root@pam!admin={'0' * 36}",
        f"PVEAPIToken=root@pam!nosuchtoken={ROOT_TOKEN[2]}",
        f"PVEAPIToken=ghost@pam!admin={ROOT_TOKEN[2]}",
        "PVEAPIToken root@pam admin",
    ],
)
def test_bad_token_is_refused_with_401(sim: Sim, header: str):
    response = sim.call("GET", "/version", token=None, headers={"Authorization": header})
    assert response.status_code == 401


def test_no_credentials_is_401(sim: Sim):
    assert sim.call("GET", "/version", token=None).status_code == 401


@pytest.mark.parametrize(("user", "password"), [("root@pam", "wrong"), ("ghost@pve", PASSWORD), ("root", "wrong")])
def test_bad_password_is_401(sim: Sim, user: str, password: str):
    response = sim.call("POST", "/access/ticket", token=None, data={"username": user, "password": password})
    assert (response.status_code, response.reason) == (401, "authentication failure")


def test_username_without_realm_uses_realm_parameter(sim: Sim):
    assert login(sim, "root", ROOT_PASSWORD)["username"] == "root@pam"


def test_tampered_ticket_is_401(sim: Sim):
    ticket = login(sim, "auditor@pve")["ticket"].replace("auditor@pve", "root@pam")
    assert sim.call("GET", "/version", token=None, cookies={"PVEAuthCookie": ticket}).status_code == 401


def test_ticket_write_needs_csrf_token_but_token_write_does_not(sim: Sim):
    session = login(sim, "root@pam", ROOT_PASSWORD)
    cookies = {"PVEAuthCookie": session["ticket"]}
    config = f"/nodes/pve1/qemu/{TEMPLATE}/config"
    assert sim.call("GET", "/cluster/resources", token=None, cookies=cookies).status_code == 200
    missing = sim.call("PUT", config, token=None, cookies=cookies, data={"description": "x"})
    assert (missing.status_code, missing.reason) == (401, "Permission denied - invalid csrf token")
    wrong = sim.call("PUT", config, token=None, cookies=cookies, headers={"CSRFPreventionToken": "0:x"}, data={"description": "x"})
    assert wrong.status_code == 401
    good_headers = {"CSRFPreventionToken": session["CSRFPreventionToken"]}
    assert sim.call("PUT", config, token=None, cookies=cookies, headers=good_headers, data={"description": "x"}).status_code == 200
    assert sim.call("PUT", config, data={"description": "y"}).status_code == 200


# --- permission checks --------------------------------------------------------------------------


def test_perm_check_names_path_and_privilege(sim: Sim):
    assert denied(as_user(sim, "nobody@pve", "GET", "/cluster/status")) == "Permission check failed (/, Sys.Audit)"
    assert as_user(sim, "auditor@pve", "GET", "/cluster/status").status_code == 200


def test_any_check_names_the_alternatives(sim: Sim):
    sim.clone(100)
    sim.wait_task(sim.data("POST", "/nodes/pve1/qemu/100/status/start"))
    reason = denied(as_user(sim, "nobody@pve", "GET", "/nodes/pve1/qemu/100/agent/network-get-interfaces"))
    assert reason == "Permission check failed (/vms/100, VM.GuestAgent.Audit|VM.GuestAgent.Unrestricted)"
    # PVEAuditor holds VM.GuestAgent.Audit: the check passes and the agent's own state answers.
    assert as_user(sim, "auditor@pve", "GET", "/nodes/pve1/qemu/100/agent/network-get-interfaces").status_code == 500


def test_and_check_fails_on_its_first_missing_part(sim: Sim):
    reason = denied(as_user(sim, "auditor@pve", "POST", f"/nodes/pve1/qemu/{TEMPLATE}/clone", data={"newid": 101}))
    assert reason == f"Permission check failed (/vms/{TEMPLATE}, VM.Clone)"


def test_or_check_with_require_param_needs_the_pool_parameter(sim: Sim):
    without_pool = denied(as_user(sim, "automation@pve", "POST", f"/nodes/pve1/qemu/{TEMPLATE}/clone", data={"newid": 101}))
    assert without_pool == "Permission check failed (/vms/101, VM.Allocate) or (parameter 'pool' missing)"
    other_pool = denied(as_user(sim, "automation@pve", "POST", f"/nodes/pve1/qemu/{TEMPLATE}/clone", data={"newid": 101, "pool": "other"}))
    assert other_pool == "Permission check failed (/vms/101, VM.Allocate) or (/pool/other, VM.Allocate)"
    allowed = as_user(sim, "automation@pve", "POST", f"/nodes/pve1/qemu/{TEMPLATE}/clone", data={"newid": 101, "pool": "mlfleet"})
    assert allowed.status_code == 200
    assert sim.wait_task(allowed.json()["data"])["exitstatus"] == "OK"


def test_pool_membership_grants_the_pool_acl_on_the_vm(sim: Sim):
    sim.clone(102)
    before = as_user(sim, "automation@pve", "PUT", "/nodes/pve1/qemu/102/config", data={"cores": 2})
    assert denied(before).startswith("Permission check failed (/vms/102, VM.Config.Disk|VM.Config.CDROM|VM.Config.CPU")
    sim.data("PUT", "/pools/mlfleet", data={"vms": "102"})
    assert as_user(sim, "automation@pve", "PUT", "/nodes/pve1/qemu/102/config", data={"cores": 2}).status_code == 200
    assert [member["vmid"] for member in sim.data("GET", "/pools/mlfleet")["members"]] == [102]


def test_creating_a_vm_needs_vm_allocate_on_its_id_or_its_pool(sim: Sim):
    params = {"vmid": 170, "name": "fresh", "scsi0": "local-lvm:4", "net0": "virtio,bridge=vmbr0"}
    reason = denied(as_user(sim, "automation@pve", "POST", "/nodes/pve1/qemu", data=params))
    assert reason == "Permission check failed (/vms/170, VM.Allocate)"
    created = as_user(sim, "automation@pve", "POST", "/nodes/pve1/qemu", data={**params, "pool": "mlfleet"})
    assert sim.wait_task(created.json()["data"])["exitstatus"] == "OK"
    config = sim.data("GET", "/nodes/pve1/qemu/170/config")
    assert config["scsi0"] == "local-lvm:vm-170-disk-0,size=4G" and config["net0"].startswith("virtio=BC:24:11:")


def test_each_config_option_needs_its_own_privilege(sim: Sim):
    assert as_user(sim, "optionsonly@pve", "PUT", f"/nodes/pve1/qemu/{TEMPLATE}/config", data={"description": "ok"}).status_code == 200
    reason = denied(as_user(sim, "optionsonly@pve", "PUT", f"/nodes/pve1/qemu/{TEMPLATE}/config", data={"description": "ok", "cores": 4}))
    assert reason == f"Permission check failed (/vms/{TEMPLATE}, VM.Config.CPU)"
    reason = denied(as_user(sim, "optionsonly@pve", "PUT", f"/nodes/pve1/qemu/{TEMPLATE}/config", data={"delete": "ipconfig0"}))
    assert reason == f"Permission check failed (/vms/{TEMPLATE}, VM.Config.Cloudinit)"


def test_privilege_separated_token_holds_only_what_user_and_token_both_hold(sim: Sim):
    # The user has Sys.Audit on / but the token was given nothing there.
    assert denied(sim.call("GET", "/cluster/status", token=SEPARATED)) == "Permission check failed (/, Sys.Audit)"
    # The token was given PVEVMAdmin on /vms, the user was not: no VM.Allocate outside the pool.
    reason = denied(sim.call("POST", f"/nodes/pve1/qemu/{TEMPLATE}/clone", token=SEPARATED, data={"newid": 103}))
    assert reason.startswith("Permission check failed (/vms/103, VM.Allocate)")
    assert sim.call("POST", f"/nodes/pve1/qemu/{TEMPLATE}/clone", token=SEPARATED, data={"newid": 103, "pool": "mlfleet"}).status_code == 200


def test_token_without_privilege_separation_has_the_users_privileges(sim: Sim):
    assert sim.call("GET", "/cluster/status", token=SHARED).status_code == 200
    assert denied(sim.call("POST", f"/nodes/pve1/qemu/{TEMPLATE}/clone", token=SHARED, data={"newid": 104})).startswith("Permission check failed (/vms/104")


def test_clone_needs_space_on_the_target_storage(make_sim):
    acl = [entry for entry in ACL if entry["path"] != "/storage"]
    sim = make_sim(users=USERS, acl=acl, roles={"OptionsOnly": ["VM.Audit"]})
    reason = denied(as_user(sim, "automation@pve", "POST", f"/nodes/pve1/qemu/{TEMPLATE}/clone", data={"newid": 105, "pool": "mlfleet"}))
    assert reason == "Permission check failed (/storage/slow-nfs, Datastore.AllocateSpace)"


def test_lists_show_only_what_the_caller_may_audit(sim: Sim):
    sim.clone(106)
    # As pve-manager: every caller sees the nodes, their usage and capacity only with Sys.Audit.
    blind = as_user(sim, "nobody@pve", "GET", "/cluster/resources").json()["data"]
    assert blind == [
        {"id": f"node/{node}", "node": node, "type": "node", "status": "online", "level": "", "cgroup-mode": 2} for node in ("pve1", "pve2", "pve3")
    ]
    nodes = as_user(sim, "nobody@pve", "GET", "/nodes").json()["data"]
    assert [set(entry) for entry in nodes] == [{"id", "node", "type", "status", "level", "ssl_fingerprint"}] * 3
    assert as_user(sim, "nobody@pve", "GET", "/nodes/pve1/qemu").json()["data"] == []
    seen = {entry["id"] for entry in as_user(sim, "auditor@pve", "GET", "/cluster/resources").json()["data"]}
    assert {"qemu/106", "qemu/9000", "node/pve1", "storage/pve1/local-lvm", "/pool/mlfleet"} <= seen
    audited = as_user(sim, "auditor@pve", "GET", "/nodes").json()["data"][0]
    assert {"maxcpu", "maxmem", "maxdisk", "mem", "cpu", "uptime", "disk"} <= set(audited)


def test_storage_content_lists_volumes_the_caller_may_see(sim: Sim):
    sim.clone(107, pool="mlfleet")
    content = "/nodes/pve1/storage/slow-nfs/content"
    everything = {entry["volid"] for entry in sim.data("GET", content)}
    assert everything == {"slow-nfs:base-9000-disk-0", "slow-nfs:vm-107-disk-0"}
    # Without Datastore.Allocate a volume needs Datastore.Audit on the storage and VM.Config.Disk on its VM:
    # PVETemplateUser on the template does not show its disk.
    seen = [entry["volid"] for entry in as_user(sim, "automation@pve", "GET", content).json()["data"]]
    assert seen == ["slow-nfs:vm-107-disk-0"]
    assert denied(as_user(sim, "nobody@pve", "GET", content)) == "Permission check failed (/storage/slow-nfs, Datastore.Audit|Datastore.AllocateSpace)"


def test_task_of_another_user_needs_sys_audit_on_the_node(sim: Sim):
    upid = sim.data("POST", "/nodes/pve1/qemu/9000/clone", data={"newid": 107})
    assert denied(as_user(sim, "nobody@pve", "GET", f"/nodes/pve1/tasks/{upid}/status")) == "Permission check failed (/nodes/pve1, Sys.Audit)"
    assert as_user(sim, "auditor@pve", "GET", f"/nodes/pve1/tasks/{upid}/status").status_code == 200


def test_skiplock_is_for_root_only(sim: Sim):
    sim.clone(108, pool="mlfleet")
    response = as_user(sim, "automation@pve", "PUT", "/nodes/pve1/qemu/108/config", data={"description": "x", "skiplock": 1})
    assert (response.status_code, response.reason) == (500, "Only root may use this option.")


@pytest.mark.parametrize("header", [None, "Bearer wrong", f"PVEAPIToken=root@pam!admin={ROOT_TOKEN[2]}"])
def test_admin_endpoints_need_the_admin_token(sim: Sim, header: str | None):
    headers = {"Authorization": header} if header else {}
    assert requests.get(f"{sim.url}/_sim/requests", headers=headers, verify=sim.ca_file, timeout=10).status_code == 401
    assert sim.admin("GET", "requests").status_code == 200


def test_unknown_or_unimplemented_method_is_501(sim: Sim):
    unknown = sim.call("GET", "/x")
    assert (unknown.status_code, unknown.reason) == (501, "Method 'GET /x' not implemented")
    assert sim.call("GET", "/n\u00f6des").reason == "Method 'GET /n\\xf6des' not implemented"
    unimplemented = sim.call("POST", f"/nodes/pve1/qemu/{TEMPLATE}/vncproxy")
    assert (unimplemented.status_code, unimplemented.reason) == (501, f"Method 'POST /nodes/pve1/qemu/{TEMPLATE}/vncproxy' not implemented")
