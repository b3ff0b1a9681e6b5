"""The one rule for a VM's tags and address that the proxmox_vm_pool module and the proxmox inventory plugin share."""

from __future__ import annotations

import pytest

from ansible_collections.mlfleet.serving.plugins.module_utils._proxmox_guest import (
    GuestAddress,
    agent_address,
    configured_nic,
    guest_address,
    ipconfig_key,
    ipconfig_settings,
    join_tags,
    net_mac,
    split_tags,
    static_address,
)
from lab.pvesim.formats import unique_tags

NET0_MAC = "BC:24:11:AA:BB:CC"
NET1_MAC = "BC:24:11:DD:EE:FF"


def interface(name, mac, *addresses):
    """One entry of the agent's network-get-interfaces result."""
    return {
        "name": name,
        "hardware-address": mac,
        "ip-addresses": [
            {"ip-address-type": "ipv6" if ":" in address else "ipv4", "ip-address": address, "prefix": 64 if ":" in address else 24} for address in addresses
        ],
    }


LOOPBACK = interface("lo", "00:00:00:00:00:00", "127.0.0.1", "::1")
# What a swarm node's Docker adds: bridges and veth pairs with MACs of their own, some with 02:42 prefixes.
DOCKER = [
    interface("docker0", "02:42:ac:11:00:01", "172.17.0.1"),
    interface("docker_gwbridge", "02:42:ac:12:00:01", "172.18.0.1"),
    interface("br-3f2a9c1d0e4b", "02:42:ac:13:00:01", "172.19.0.1"),
    interface("veth1a2b3c4", "6a:1b:2c:3d:4e:5f", "fe80::681b:2cff:fe3d:4e5f"),
]
NET0 = "virtio=BC:24:11:AA:BB:CC,bridge=vmbr0"
NET1 = "virtio=BC:24:11:DD:EE:FF,bridge=vmbr1"
STATIC0 = "ip=192.0.2.10/24,gw=192.0.2.1"
DHCP = "ip=dhcp"


@pytest.mark.parametrize(
    ("interfaces", "config", "nic", "expected"),
    [
        pytest.param(
            [LOOPBACK, *DOCKER, interface("eth0", NET0_MAC.lower(), "fe80::be24:11ff:feaa:bbcc", "10.99.0.5")],
            {"net0": NET0, "ipconfig0": DHCP},
            "net0",
            ("10.99.0.5", "agent"),
            id="docker bridges listed first and carrying addresses are passed by",
        ),
        pytest.param(
            [LOOPBACK, interface("ens18", NET0_MAC.lower(), "10.99.0.5"), interface("ens19", NET1_MAC.lower(), "192.0.2.20")],
            {"net0": NET0, "net1": NET1, "ipconfig0": DHCP, "ipconfig1": "ip=192.0.2.20/24"},
            "net1",
            ("192.0.2.20", "agent"),
            id="several interfaces: net1 is the configured NIC, whatever the guest names it",
        ),
        pytest.param(
            [LOOPBACK, interface("ens18", NET0_MAC.lower(), "10.99.0.5"), interface("ens19", NET1_MAC.lower(), "192.0.2.20")],
            {"net0": NET0, "net1": NET1, "ipconfig0": DHCP, "ipconfig1": "ip=192.0.2.20/24"},
            "net0",
            ("10.99.0.5", "agent"),
            id="several interfaces: net0 by default",
        ),
        pytest.param(
            [interface("eth0", NET0_MAC.lower(), "10.99.0.5")],
            {"net0": NET0.lower(), "ipconfig0": DHCP},
            "net0",
            ("10.99.0.5", "agent"),
            id="MAC in lower case in the config",
        ),
        pytest.param(
            [interface("eth0", NET0_MAC, "10.99.0.5")],
            {"net0": NET0, "ipconfig0": DHCP},
            "net0",
            ("10.99.0.5", "agent"),
            id="MAC in upper case from the agent",
        ),
        pytest.param(
            [LOOPBACK, interface("eth0", NET0_MAC.lower(), "fe80::1", "2001:db8::5")],
            {"net0": NET0},
            "net0",
            ("2001:db8::5", "agent"),
            id="IPv6 only, no cloud-init: the global IPv6 address, never link-local",
        ),
        pytest.param(
            [interface("eth0", NET0_MAC.lower(), "fe80::1", "fd00:10::5")],
            {"net0": NET0, "ipconfig0": "ip6=auto"},
            "net0",
            ("fd00:10::5", "agent"),
            id="IPv6 only by cloud-init (ip6=auto): a unique local address counts",
        ),
        pytest.param(
            [interface("eth0", NET0_MAC.lower(), "2001:db8::5", "10.99.0.5")],
            {"net0": NET0},
            "net0",
            ("10.99.0.5", "agent"),
            id="IPv4 before IPv6",
        ),
        pytest.param(
            [interface("eth0", NET0_MAC.lower(), "fe80::1", "2001:db8::5")],
            {"net0": NET0, "ipconfig0": "ip=dhcp,ip6=auto"},
            "net0",
            (None, None),
            id="cloud-init asks for IPv4 (ip=dhcp): an autoconfigured IPv6 address does not stand in for it",
        ),
        pytest.param(
            [interface("eth0", NET0_MAC.lower(), "169.254.7.7", "fe80::1")],
            {"net0": NET0, "ipconfig0": STATIC0},
            "net0",
            ("192.0.2.10", "ipconfig0"),
            id="only link-local on the NIC: the static cloud-init address",
        ),
        pytest.param(
            None,
            {"net0": NET0, "ipconfig0": STATIC0},
            "net0",
            ("192.0.2.10", "ipconfig0"),
            id="agent missing, static cloud-init",
        ),
        pytest.param(
            None,
            {"net0": NET0, "ipconfig0": DHCP},
            "net0",
            (None, None),
            id="agent missing, dhcp",
        ),
        pytest.param(
            [LOOPBACK, interface("eth0", NET0_MAC.lower())],
            {"net0": NET0, "ipconfig0": STATIC0},
            "net0",
            ("192.0.2.10", "ipconfig0"),
            id="agent up, NIC without an address yet, static cloud-init",
        ),
        pytest.param(
            [LOOPBACK, interface("eth0", NET0_MAC.lower())],
            {"net0": NET0, "ipconfig0": DHCP},
            "net0",
            (None, None),
            id="agent up, NIC without an address yet, dhcp",
        ),
        pytest.param(
            [LOOPBACK, *DOCKER, interface("eth1", "52:54:00:12:34:56", "10.0.0.9")],
            {"net0": NET0, "ipconfig0": DHCP},
            "net0",
            (None, None),
            id="an address on another interface is not the VM's",
        ),
        pytest.param(
            [interface("eth0", NET0_MAC.lower(), "192.0.2.100", "192.0.2.10")],
            {"net0": NET0, "ipconfig0": STATIC0},
            "net0",
            ("192.0.2.10", "agent"),
            id="a floating address listed first: the static cloud-init one comes first",
        ),
        pytest.param(
            [interface("eth0", NET0_MAC.lower()), interface("br0", NET0_MAC.lower(), "10.99.0.5")],
            {"net0": NET0, "ipconfig0": DHCP},
            "net0",
            ("10.99.0.5", "agent"),
            id="a bridge of the guest's own takes the NIC's MAC and holds the address",
        ),
        pytest.param(
            [interface("br-3f2a9c1d0e4b", NET0_MAC.lower(), "172.19.0.1"), interface("eth0", NET0_MAC.lower())],
            {"net0": NET0, "ipconfig0": DHCP},
            "net0",
            (None, None),
            id="a Docker bridge never counts, even with the NIC's MAC",
        ),
        pytest.param(
            [LOOPBACK],
            {"net0": NET0, "ipconfig0": DHCP},
            "net0",
            (None, None),
            id="loopback only",
        ),
        pytest.param(
            [interface("eth0", NET0_MAC.lower(), "10.99.0.5")],
            {"ipconfig0": STATIC0},
            "net0",
            ("192.0.2.10", "ipconfig0"),
            id="no net0 in the config: no MAC to match, the static address",
        ),
        pytest.param(
            [],
            {"net0": NET0, "ipconfig0": "ip=192.0.2.10/24,ip6=2001:db8::10/64"},
            "net0",
            ("192.0.2.10", "ipconfig0"),
            id="static IPv4 before static IPv6",
        ),
        pytest.param(
            [],
            {"net0": NET0, "ipconfig0": "ip=dhcp,ip6=2001:db8::10/64"},
            "net0",
            ("2001:db8::10", "ipconfig0"),
            id="static IPv6 with dhcp IPv4",
        ),
        pytest.param(
            [interface("eth0", NET0_MAC.lower(), "not-an-address", "10.99.0.5")],
            {"net0": NET0},
            "net0",
            ("10.99.0.5", "agent"),
            id="an entry that is no address is skipped",
        ),
    ],
)
def test_guest_address(interfaces, config, nic, expected):
    found = guest_address(interfaces, configured_nic(config, nic))
    assert (found.address, found.source) == expected
    assert (found.reason is None) == (found.address is not None)
    # The module waits for the first step alone; it agrees with the whole rule wherever the agent decides.
    assert agent_address(interfaces or [], configured_nic(config, nic))[0] == (found.address if found.source == "agent" else None)


@pytest.mark.parametrize(
    ("interfaces", "config", "reason"),
    [
        (None, {"net0": NET0, "ipconfig0": DHCP}, "no static ipconfig0 address"),
        ([LOOPBACK], {"net0": NET0, "ipconfig0": DHCP}, "the guest agent reports no usable IPv4 address on the interface with net0's MAC bc:24:11:aa:bb:cc"),
        ([LOOPBACK], {"net0": NET0}, "the guest agent reports no usable address on the interface with net0's MAC bc:24:11:aa:bb:cc"),
        ([LOOPBACK], {"ipconfig0": DHCP}, "the VM config has no net0 with a MAC address; no static ipconfig0 address"),
    ],
)
def test_without_an_address_the_reason_names_the_nic(interfaces, config, reason):
    found = guest_address(interfaces, configured_nic(config))
    assert found.address is None
    assert found.reason.startswith(reason)


def test_the_result_is_plain_data():
    found = guest_address([interface("eth0", NET0_MAC, "10.99.0.5")], configured_nic({"net0": NET0}))
    assert found == GuestAddress("10.99.0.5", "agent", None)
    assert found._asdict() == {"address": "10.99.0.5", "source": "agent", "reason": None}


@pytest.mark.parametrize(
    ("value", "mac"),
    [
        ("virtio=BC:24:11:00:90:00,bridge=vmbr0", "bc:24:11:00:90:00"),
        ("model=e1000,macaddr=bc:24:11:00:90:01,bridge=vmbr0,firewall=1", "bc:24:11:00:90:01"),
        ("bridge=vmbr0", None),
        (None, None),
    ],
)
def test_net_mac(value, mac):
    assert net_mac(value) == mac


@pytest.mark.parametrize(
    ("value", "address"),
    [
        ("ip=10.20.0.5/24,gw=10.20.0.1", "10.20.0.5"),
        ("gw=10.20.0.1,ip=10.20.0.6/16", "10.20.0.6"),
        ("ip6=2001:db8::7/64,gw6=2001:db8::1", "2001:db8::7"),
        ("ip=dhcp", None),
        ("ip6=auto", None),
        ("ip=10.20.0.x/24", None),
        ("", None),
        (None, None),
    ],
)
def test_static_address_of_ipconfig(value, address):
    assert static_address(ipconfig_settings(value)) == address


@pytest.mark.parametrize(("nic", "key"), [("net0", "ipconfig0"), ("net1", "ipconfig1"), ("net31", "ipconfig31")])
def test_ipconfig_key(nic, key):
    assert ipconfig_key(nic) == key


@pytest.mark.parametrize("nic", ["eth0", "net32", "net", "ipconfig0", "net-1"])
def test_ipconfig_key_refuses_what_is_no_network_device(nic):
    with pytest.raises(ValueError, match=rf"address_nic '{nic}' is not a network device of a VM: name one of net0 to net31"):
        ipconfig_key(nic)


@pytest.mark.parametrize(
    ("value", "tags"),
    [
        ("Worker;mlfleet, gpu x", ["worker", "mlfleet", "gpu", "x"]),
        ("swarm_worker;MLfleet;mlfleet", ["swarm_worker", "mlfleet"]),
        (";;", []),
        ("", []),
        (None, []),
    ],
)
def test_tags_are_split_on_any_proxmox_separator_lowercased_and_unique(value, tags):
    assert split_tags(value) == tags


@pytest.mark.parametrize(
    ("tags", "stored"),
    [
        (["Worker", "mlfleet", "worker"], "mlfleet;worker"),
        (["swarm_worker", "mlfleet"], "mlfleet;swarm_worker"),
        (["gpu", "GPU;b,a"], "a;b;gpu"),
        ([], ""),
    ],
)
def test_tags_are_joined_as_proxmox_stores_them_and_as_the_simulator_does(tags, stored):
    assert join_tags(tags) == stored
    # The simulator follows pve-guest-common's get_unique_tags on its own; the two must agree.
    assert unique_tags(";".join(tags)) == stored
