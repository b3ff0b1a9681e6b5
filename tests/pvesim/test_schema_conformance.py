"""Every implemented endpoint exists in the schema and answers what the schema's `returns` declares, both ways."""

from __future__ import annotations

import time

import pytest
from pvesim_support import ROOT_PASSWORD, TEMPLATE, WAIT_LIMIT, Sim

from lab.pvesim.api import HANDLERS
from lab.pvesim.schema import Schema
from lab.pvesim.validation import check_returns

SCHEMA = Schema.load()
RUNNING = 100
# Where the schema under-declares what Proxmox returns, check against what does describe it:
# /cluster/tasks documents only `upid` but returns whole task entries (as /nodes/{node}/tasks);
# /storage documents only `storage` but returns storage configurations (the parameters of POST /storage).
# /cluster/nextid is documented as integer, but Proxmox sends a string.
_STORAGE_CONFIG = {name: {**schema, "optional": 1} for name, schema in SCHEMA.route("/storage", "POST").parameters.items()}
RETURNS_OVERRIDE = {
    ("GET", "/cluster/tasks"): SCHEMA.route("/nodes/{node}/tasks", "GET").returns,
    ("GET", "/storage"): {"type": "array", "items": {"type": "object", "properties": {**_STORAGE_CONFIG, "storage": {"type": "string"}}}},
}
STRING_INTEGERS = {("GET", "/cluster/nextid")}


def samples(upid: str) -> list[tuple[str, str, str, dict]]:
    """(method, schema path, concrete path, parameters): one call per implemented endpoint, in a runnable order."""
    vm = f"/nodes/pve1/qemu/{RUNNING}"
    return [
        ("GET", "/version", "/version", {}),
        ("GET", "/access/ticket", "/access/ticket", {}),
        ("POST", "/access/ticket", "/access/ticket", {"username": "root@pam", "password": ROOT_PASSWORD}),
        ("GET", "/access/permissions", "/access/permissions", {}),
        ("GET", "/cluster/status", "/cluster/status", {}),
        ("GET", "/cluster/resources", "/cluster/resources", {}),
        ("GET", "/cluster/nextid", "/cluster/nextid", {}),
        ("GET", "/cluster/tasks", "/cluster/tasks", {}),
        ("GET", "/storage", "/storage", {}),
        ("GET", "/nodes", "/nodes", {}),
        ("GET", "/nodes/{node}", "/nodes/pve1", {}),
        ("GET", "/nodes/{node}/status", "/nodes/pve1/status", {}),
        ("GET", "/nodes/{node}/lxc", "/nodes/pve1/lxc", {}),
        ("GET", "/nodes/{node}/storage/{storage}/content", "/nodes/pve1/storage/slow-nfs/content", {}),
        ("GET", "/nodes/{node}/tasks", "/nodes/pve1/tasks", {}),
        ("GET", "/nodes/{node}/tasks/{upid}", f"/nodes/pve1/tasks/{upid}", {}),
        ("GET", "/nodes/{node}/tasks/{upid}/status", f"/nodes/pve1/tasks/{upid}/status", {}),
        ("GET", "/nodes/{node}/tasks/{upid}/log", f"/nodes/pve1/tasks/{upid}/log", {}),
        ("GET", "/nodes/{node}/qemu", "/nodes/pve1/qemu", {}),
        ("GET", "/nodes/{node}/qemu/{vmid}", vm, {}),
        ("GET", "/nodes/{node}/qemu/{vmid}/config", f"{vm}/config", {}),
        ("PUT", "/nodes/{node}/qemu/{vmid}/config", f"{vm}/config", {"description": "sync"}),
        ("POST", "/nodes/{node}/qemu/{vmid}/config", f"{vm}/config", {"description": "async"}),
        ("GET", "/nodes/{node}/qemu/{vmid}/status", f"{vm}/status", {}),
        ("GET", "/nodes/{node}/qemu/{vmid}/status/current", f"{vm}/status/current", {}),
        ("GET", "/nodes/{node}/qemu/{vmid}/snapshot", f"{vm}/snapshot", {}),
        ("POST", "/nodes/{node}/qemu/{vmid}/agent/ping", f"{vm}/agent/ping", {}),
        ("GET", "/nodes/{node}/qemu/{vmid}/agent/network-get-interfaces", f"{vm}/agent/network-get-interfaces", {}),
        ("GET", "/nodes/{node}/qemu/{vmid}/agent/get-host-name", f"{vm}/agent/get-host-name", {}),
        ("GET", "/nodes/{node}/qemu/{vmid}/agent/get-osinfo", f"{vm}/agent/get-osinfo", {}),
        ("GET", "/nodes/{node}/qemu/{vmid}/agent/info", f"{vm}/agent/info", {}),
        ("POST", "/nodes/{node}/qemu/{vmid}/agent", f"{vm}/agent", {"command": "ping"}),
        ("POST", "/nodes/{node}/qemu/{vmid}/snapshot", f"{vm}/snapshot", {"snapname": "conformance", "vmstate": 1}),
        ("GET", "/nodes/{node}/qemu/{vmid}/snapshot", f"{vm}/snapshot", {}),
        ("GET", "/nodes/{node}/storage/{storage}/content", "/nodes/pve1/storage/slow-nfs/content", {"content": "images", "vmid": RUNNING}),
        ("GET", "/nodes/{node}/qemu/{vmid}/snapshot/{snapname}", f"{vm}/snapshot/conformance", {}),
        ("GET", "/nodes/{node}/qemu/{vmid}/snapshot/{snapname}/config", f"{vm}/snapshot/conformance/config", {}),
        ("PUT", "/nodes/{node}/qemu/{vmid}/snapshot/{snapname}/config", f"{vm}/snapshot/conformance/config", {"description": "checked"}),
        ("POST", "/nodes/{node}/qemu/{vmid}/snapshot/{snapname}/rollback", f"{vm}/snapshot/conformance/rollback", {}),
        ("DELETE", "/nodes/{node}/qemu/{vmid}/snapshot/{snapname}", f"{vm}/snapshot/conformance", {}),
        ("POST", "/nodes/{node}/qemu/{vmid}/status/reboot", f"{vm}/status/reboot", {}),
        ("POST", "/nodes/{node}/qemu/{vmid}/status/shutdown", f"{vm}/status/shutdown", {}),
        ("POST", "/nodes/{node}/qemu/{vmid}/status/start", "/nodes/pve1/qemu/101/status/start", {}),
        ("POST", "/nodes/{node}/qemu/{vmid}/status/stop", "/nodes/pve1/qemu/101/status/stop", {}),
        ("POST", "/nodes/{node}/qemu/{vmid}/clone", f"/nodes/pve1/qemu/{TEMPLATE}/clone", {"newid": 102}),
        ("POST", "/nodes/{node}/qemu", "/nodes/pve1/qemu", {"vmid": 103, "name": "created", "scsi0": "local-lvm:4", "net0": "virtio,bridge=vmbr0"}),
        ("POST", "/nodes/{node}/qemu/{vmid}/template", "/nodes/pve1/qemu/103/template", {}),
        ("DELETE", "/nodes/{node}/qemu/{vmid}", "/nodes/pve1/qemu/102", {}),
        ("POST", "/pools", "/pools", {"poolid": "conformance", "comment": "made by the test"}),
        ("GET", "/pools", "/pools", {}),
        ("PUT", "/pools", "/pools", {"poolid": "conformance", "vms": "101"}),
        ("GET", "/pools/{poolid}", "/pools/conformance", {}),
        ("PUT", "/pools/{poolid}", "/pools/conformance", {"vms": "101", "delete": 1}),
        ("DELETE", "/pools/{poolid}", "/pools/conformance", {}),
        ("POST", "/pools", "/pools", {"poolid": "conformance2"}),
        ("DELETE", "/pools", "/pools", {"poolid": "conformance2"}),
        ("POST", "/cluster/mapping/pci", "/cluster/mapping/pci", {"id": "gpu", "map": "node=pve1,path=0000:01:00.0,id=10de:2331", "description": "one GPU"}),
        ("GET", "/cluster/mapping/pci", "/cluster/mapping/pci", {"check-node": "pve2"}),
        ("PUT", "/cluster/mapping/pci/{id}", "/cluster/mapping/pci/gpu", {"mdev": 0}),
        ("GET", "/cluster/mapping/pci/{id}", "/cluster/mapping/pci/gpu", {}),
        ("DELETE", "/cluster/mapping/pci/{id}", "/cluster/mapping/pci/gpu", {}),
    ]


@pytest.fixture
def prepared(make_sim) -> tuple[Sim, str]:
    """A running VM with its agent up (100), a stopped one (101) and a finished task."""
    sim = make_sim(durations={"boot_to_agent": 0})
    upid = sim.data("POST", f"/nodes/pve1/qemu/{TEMPLATE}/clone", data={"newid": RUNNING})
    assert sim.wait_task(upid)["exitstatus"] == "OK"
    sim.clone(101)
    sim.wait_task(sim.data("POST", f"/nodes/pve1/qemu/{RUNNING}/status/start"))
    return sim, upid


def test_every_implemented_endpoint_is_in_the_schema():
    missing = [(method, path) for method, path in HANDLERS if SCHEMA.route(path, method) is None]
    assert missing == []


def test_samples_cover_every_implemented_endpoint():
    sampled = {(method, path) for method, path, _concrete, _params in samples("UPID")}
    assert sampled == set(HANDLERS)


def test_every_endpoint_answers_as_its_schema_declares(prepared):
    sim, upid = prepared
    problems = []
    for method, path, concrete, params in samples(upid):
        kwargs = {"params": params} if method in ("GET", "DELETE") else {"data": params}
        if path == "/access/ticket":
            kwargs["token"] = None
        response = sim.call(method, concrete, **kwargs)
        if response.status_code != 200:
            problems.append(f"{method} {concrete}: {response.status_code} {response.reason}")
            continue
        data = response.json()["data"]
        if (method, path) in STRING_INTEGERS:
            if not (isinstance(data, str) and data.isdigit()):
                problems.append(f"{method} {path}: {data!r} is not a decimal string")
            continue
        returns = RETURNS_OVERRIDE.get((method, path), SCHEMA.route(path, method).returns)
        problems += [f"{method} {path}: {problem}" for problem in check_returns(data, returns)]
        if isinstance(data, str) and data.startswith("UPID:"):
            wait_for(sim, data)
    assert not problems, "\n".join(problems)


def wait_for(sim: Sim, upid: str) -> None:
    deadline = time.monotonic() + WAIT_LIMIT
    while sim.data("GET", f"/nodes/{upid.split(':')[1]}/tasks/{upid}/status")["status"] != "stopped":
        assert time.monotonic() < deadline, upid
        time.sleep(0.01)


def test_returns_checker_finds_undeclared_mistyped_and_missing_fields():
    returns = SCHEMA.route("/nodes/{node}/tasks/{upid}/status", "GET").returns
    good = {"upid": "U", "node": "pve1", "pid": 1, "pstart": 2, "starttime": 3, "type": "qmclone", "id": "100", "user": "root@pam", "status": "running"}
    assert check_returns(good, returns) == []
    assert check_returns({**good, "extra": 1}, returns) == ["data.extra: not declared in the schema"]
    assert check_returns({**good, "pid": "1"}, returns) == ["data.pid: '1' is not of type integer"]
    assert check_returns({**good, "status": "done"}, returns) == ["data.status: 'done' is not one of ['running', 'stopped']"]
    assert check_returns({key: value for key, value in good.items() if key != "upid"}, returns) == ["data.upid: declared as required but missing"]
