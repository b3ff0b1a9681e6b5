"""Parameter validation: every kind of rejection, over HTTP as Proxmox answers it (400 + errors per parameter)."""

from __future__ import annotations

import urllib.parse

import pytest
from pvesim_support import ED25519_KEY, TEMPLATE, Sim

from lab.pvesim.schema import Schema
from lab.pvesim.validation import ParameterErrors, validate

CONFIG = "/nodes/pve1/qemu/9000/config"
CLONE = f"/nodes/pve1/qemu/{TEMPLATE}/clone"


def rejected(sim: Sim, method: str, path: str, data: dict) -> dict[str, str]:
    response = sim.call(method, path, data=data) if method != "GET" else sim.call(method, path, params=data)
    assert response.status_code == 400, f"{response.status_code} {response.text}"
    body = response.json()
    assert body["data"] is None
    return body["errors"]


@pytest.mark.parametrize(
    ("method", "path", "data", "param", "reason"),
    [
        ("PUT", CONFIG, {"bogus": "1"}, "bogus", "property is not defined in schema and the schema does not allow additional properties"),
        ("PUT", CONFIG, {"net32": "virtio,bridge=vmbr0"}, "net32", "property is not defined in schema and the schema does not allow additional properties"),
        ("PUT", CONFIG, {"cores": "abc"}, "cores", "type check ('integer') failed - got 'abc'"),
        ("PUT", CONFIG, {"cores": "2.5"}, "cores", "type check ('integer') failed - got '2.5'"),
        ("PUT", CONFIG, {"onboot": "true"}, "onboot", "type check ('boolean') failed - got 'true'"),
        ("PUT", CONFIG, {"cpulimit": "lots"}, "cpulimit", "type check ('number') failed - got 'lots'"),
        ("PUT", CONFIG, {"ostype": "debian"}, "ostype", "value 'debian' does not have a value in the enumeration"),
        ("PUT", CONFIG, {"cores": "0"}, "cores", "value must have a minimum value of 1"),
        ("POST", CLONE, {"newid": "99"}, "newid", "value must have a minimum value of 100"),
        ("POST", CLONE, {"newid": "1000000000"}, "newid", "value must have a maximum value of 999999999"),
        ("POST", CLONE, {"newid": "101", "snapname": "s" * 41}, "snapname", "value may only be 40 characters long"),
        ("POST", CLONE, {"name": "x"}, "newid", "property is missing and it is not optional"),
        ("POST", "/nodes/pve1/qemu/9000/status/start", {"nets-host-mtu": "net0:1500"}, "nets-host-mtu", "value does not match the regex pattern"),
        ("PUT", CONFIG, {"description": "d" * 8193}, "description", "value may only be 8192 characters long"),
        ("POST", CLONE, {"newid": "101", "name": "bad_name"}, "name", "invalid format - value does not look like a valid DNS name"),
        ("POST", CLONE, {"newid": "101", "target": "pve 2"}, "target", "invalid format - value does not look like a valid node name"),
        ("POST", CLONE, {"newid": "101", "pool": "ml fleet"}, "pool", "invalid format - invalid pool ID 'ml fleet'"),
        ("POST", CLONE, {"newid": "101", "storage": "9-fast!"}, "storage", "invalid format - storage ID '9-fast!' contains illegal characters"),
        ("POST", CLONE, {"newid": "101", "snapname": "1st"}, "snapname", "invalid format - invalid configuration ID '1st'"),
        ("PUT", CONFIG, {"tags": "mlfleet;worker node!"}, "tags", "invalid format - invalid tag 'node!'"),
        ("PUT", CONFIG, {"delete": "cores,2bad"}, "delete", "invalid format - invalid configuration ID '2bad'"),
        ("PUT", CONFIG, {"nameserver": "10.0.0.1 dns.example"}, "nameserver", "invalid format - value 'dns.example' does not look like a valid IP address"),
        ("PUT", CONFIG, {"sshkeys": ED25519_KEY}, "sshkeys", "invalid format - invalid urlencoded string"),
        ("PUT", CONFIG, {"ipconfig0": "ip=10.0.0.300/24"}, "ipconfig0", "ipconfig0.ip: invalid format - value '10.0.0.300/24' does not look like"),
        ("PUT", CONFIG, {"ipconfig0": "ip=10.0.0.5"}, "ipconfig0", "ipconfig0.ip: invalid format - value '10.0.0.5' does not look like a valid IPv4 CIDR"),
        ("PUT", CONFIG, {"ipconfig0": "ip=dhcp,gw=10.0.0"}, "ipconfig0", "ipconfig0.gw: invalid format - value '10.0.0' does not look like a valid IPv4"),
        ("PUT", CONFIG, {"ipconfig0": "ip6=fd00::5"}, "ipconfig0", "ipconfig0.ip6: invalid format"),
        ("PUT", CONFIG, {"ipconfig0": "ip=dhcp,mask=24"}, "ipconfig0", "ipconfig0.mask: property is not defined in schema"),
        ("PUT", CONFIG, {"ipconfig0": "10.0.0.5/24"}, "ipconfig0", "missing key in comma-separated list property"),
        ("PUT", CONFIG, {"net0": "virtio,bridge=vmbr0,tag=5000"}, "net0", "net0.tag: value must have a maximum value of 4094"),
        ("PUT", CONFIG, {"net0": "virtio=zz:zz,bridge=vmbr0"}, "net0", "net0.macaddr: invalid format - value 'zz:zz' does not look like a valid MAC address"),
        ("PUT", CONFIG, {"net0": "rtl9999,bridge=vmbr0"}, "net0", "net0.model: value 'rtl9999' does not have a value in the enumeration"),
        ("PUT", CONFIG, {"net0": "virtio,bridge=vmbr0,firewall=maybe"}, "net0", "net0.firewall: type check ('boolean') failed - got 'maybe'"),
        ("PUT", CONFIG, {"net0": "bridge=vmbr0"}, "net0", "net0.model: property is missing and it is not optional"),
        ("PUT", CONFIG, {"agent": "enabled=1,type=pci"}, "agent", "agent.type: value 'pci' does not have a value in the enumeration"),
        ("PUT", CONFIG, {"memory": "lots"}, "memory", "memory.current: type check ('integer') failed - got 'lots'"),
        ("GET", "/cluster/resources", {"type": "vms"}, "type", "value 'vms' does not have a value in the enumeration 'vm, storage, node, sdn'"),
        ("GET", "/cluster/nextid", {"vmid": "abc"}, "vmid", "type check ('integer') failed - got 'abc'"),
    ],
)
def test_invalid_parameter_is_rejected_with_proxmox_reason(sim: Sim, method: str, path: str, data: dict, param: str, reason: str):
    errors = rejected(sim, method, path, data)
    assert param in errors, errors
    assert reason in errors[param]


def test_invalid_path_parameter_is_rejected(sim: Sim):
    errors = rejected(sim, "GET", "/nodes/pve_1/qemu", {})
    assert errors == {"node": "invalid format - value does not look like a valid node name"}


def test_several_errors_are_reported_together(sim: Sim):
    errors = rejected(sim, "PUT", CONFIG, {"cores": "x", "sockets": "0", "bogus": "1"})
    assert set(errors) == {"cores", "sockets", "bogus"}


def test_json_body_values_are_checked_like_form_values(sim: Sim):
    response = sim.call("PUT", CONFIG, json={"cores": 2.5, "onboot": "true", "memory": 2048})
    assert response.status_code == 400
    assert response.json()["errors"] == {"cores": "type check ('integer') failed - got '2.5'", "onboot": "type check ('boolean') failed - got 'true'"}
    assert sim.call("PUT", CONFIG, json={"cores": 2, "onboot": True, "description": "via JSON"}).status_code == 200
    assert sim.data("GET", CONFIG)["onboot"] == 1


def test_valid_property_strings_are_accepted_and_net_gets_a_mac(sim: Sim):
    sim.data(
        "PUT",
        CONFIG,
        data={
            "ipconfig0": "ip=10.0.0.5/24,gw=10.0.0.1,ip6=fd00::5/64,gw6=fd00::1",
            "ipconfig1": "ip=dhcp,ip6=auto",
            "net1": "e1000,bridge=vmbr1,tag=20,firewall=1,mtu=1450",
            "net2": "virtio=BC:24:11:AA:BB:CC,bridge=vmbr0,firewall=yes,link_down=off",
            "agent": "enabled=1,fstrim_cloned_disks=1",
            "memory": "current=4096",
            "sshkeys": urllib.parse.quote(ED25519_KEY + "\n", safe=""),
        },
    )
    config = sim.data("GET", CONFIG)
    assert config["net1"].startswith("e1000=BC:24:11:") and config["net1"].endswith(",bridge=vmbr1,tag=20,firewall=1,mtu=1450")
    assert config["net2"].startswith("virtio=BC:24:11:AA:BB:CC,")


def test_encoded_sshkeys_must_be_public_keys(sim: Sim):
    response = sim.call("PUT", CONFIG, data={"sshkeys": urllib.parse.quote("ssh-ed25519 not-base64!", safe="")})
    assert (response.status_code, response.reason) == (500, "SSH public key validation error")
    mismatched = ED25519_KEY.replace("ssh-ed25519", "ssh-rsa", 1)
    assert sim.call("PUT", CONFIG, data={"sshkeys": urllib.parse.quote(mismatched, safe="")}).status_code == 500


def test_validation_reads_the_schema_not_a_list():
    """A parameter the schema adds is accepted, one it drops is refused: the rules come from the document."""
    schema = Schema.load()
    parameters = dict(schema.route("/nodes/{node}/qemu/{vmid}/config", "PUT").parameters)
    assert validate({"node": "pve1", "vmid": "100", "cores": "2"}, parameters)["cores"] == 2
    parameters.pop("cores")
    parameters["newthing"] = {"type": "integer", "optional": 1, "maximum": 3}
    with pytest.raises(ParameterErrors) as raised:
        validate({"node": "pve1", "vmid": "100", "cores": "2", "newthing": "4"}, parameters)
    assert set(raised.value.errors) == {"cores", "newthing"}
