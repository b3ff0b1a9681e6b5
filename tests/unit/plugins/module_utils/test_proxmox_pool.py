"""The proxmox_vm_pool module's decisions, without a server."""

from __future__ import annotations

import threading

import pytest

from ansible_collections.mlfleet.serving.plugins.module_utils._proxmox_pool import (
    GIB,
    IdAllocator,
    PoolError,
    choose_victims,
    device_slots,
    disk_storages,
    find_template,
    is_member,
    mapped_device_count,
    mapping_devices_per_node,
    pick_addresses,
    plan_placement,
    static_ipconfig,
)

TEMPLATES = [
    {"type": "qemu", "vmid": 9000, "name": "debian12-golden", "node": "pve1", "template": 1},
    {"type": "qemu", "vmid": 9001, "name": "twin", "node": "pve1", "template": 1},
    {"type": "qemu", "vmid": 9002, "name": "twin", "node": "pve2", "template": 1},
    {"type": "qemu", "vmid": 150, "name": "debian12-golden", "node": "pve2", "template": 0},
]


def node(name, free_gib, maxmem_gib=64, status="online"):
    return {"node": name, "status": status, "maxmem": maxmem_gib * GIB, "mem": (maxmem_gib - free_gib) * GIB}


def test_members_carry_the_tag_are_no_templates_and_sit_in_the_pool():
    vm = {"type": "qemu", "vmid": 101, "tags": "mlfleet;worker", "pool": "mlfleet", "template": 0}
    assert is_member(vm, "Worker")
    assert is_member(vm | {"tags": "MLfleet,WORKER"}, "worker")
    assert is_member(vm, "worker", "mlfleet")
    assert not is_member(vm, "worker", "other")
    assert not is_member(vm | {"template": 1}, "worker")
    assert not is_member(vm | {"tags": "workers"}, "worker")
    assert not is_member({"type": "lxc", "vmid": 5, "tags": "worker"}, "worker")


def test_template_by_vmid_or_unique_name():
    assert find_template(TEMPLATES, "9000")["name"] == "debian12-golden"
    assert find_template(TEMPLATES, "debian12-golden")["vmid"] == 9000


@pytest.mark.parametrize(
    "template, message",
    [
        ("twin", r"template name 'twin' is ambiguous, 2 templates carry it \(9001 twin on pve1, 9002 twin on pve2\): give the vmid"),
        ("nope", r"template 'nope' not found among the cluster's templates \(9000 debian12-golden on pve1, 9001 twin"),
        ("150", r"VM 150 \(debian12-golden\) on pve2 is not a template"),
        ("777", r"template 777 not found: no template has this vmid"),
    ],
)
def test_template_errors_name_the_candidates(template, message):
    with pytest.raises(PoolError, match=message):
        find_template(TEMPLATES, template)


def test_placement_takes_most_free_memory_and_counts_this_runs_vms():
    nodes = [node("pve1", 10), node("pve2", 40), node("pve3", 30)]
    placed = plan_placement(nodes, None, 16 * GIB, 4)
    assert [name for name, _reason in placed] == ["pve2", "pve3", "pve2", "pve3"]
    assert placed[0][1] == "pve2: most free memory (40.0 GiB of 64.0 GiB)"
    assert placed[2][1] == "pve2: most free memory (24.0 GiB of 64.0 GiB)"


def test_placement_spreads_evenly_over_equal_nodes_and_prefers_fewer_members():
    nodes = [node("pve1", 60), node("pve2", 60), node("pve3", 60)]
    assert [name for name, _reason in plan_placement(nodes, None, 0, 3, {"pve1": 2})] == ["pve2", "pve3", "pve2"]


def test_placement_honours_allowed_and_online_nodes():
    nodes = [node("pve1", 10), node("pve2", 60, status="offline"), node("pve3", 30)]
    assert [name for name, _reason in plan_placement(nodes, ["pve1"], GIB, 2)] == ["pve1", "pve1"]
    assert [name for name, _reason in plan_placement(nodes, None, GIB, 1)] == ["pve3"]
    with pytest.raises(PoolError, match=r"no online node to place VMs on \(pve2\)"):
        plan_placement(nodes, ["pve2"], GIB, 1)
    with pytest.raises(PoolError, match=r"nodes pve7 not in the cluster \(nodes: pve1, pve2, pve3\)"):
        plan_placement(nodes, ["pve7"], GIB, 1)
    assert plan_placement(nodes, ["pve2"], GIB, 0) == []


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({}, 0),
        ({"hostpci0": "mapping=gpu,pcie=1"}, 1),
        ({"hostpci0": "mapping=gpu", "hostpci3": "pcie=1,mapping=gpu", "hostpci1": "mapping=nic"}, 2),
        ({"hostpci0": "0000:01:00.0,pcie=1"}, 0),  # a raw host device takes nothing from the mapping
        ({"hostpci0": "host=0000:01:00.0"}, 0),
        ({"hostpci0": "mapping=gpu2"}, 0),
        ({"description": "hostpci0: mapping=gpu", "net0": "virtio,bridge=vmbr0"}, 0),
    ],
)
def test_mapped_devices_of_a_config_count_only_its_mapping(config, expected):
    assert mapped_device_count(config, "gpu") == expected


def test_a_mapping_has_one_device_per_map_entry_on_its_node():
    entry = {
        "map": ["node=pve2,path=0000:01:00.0,id=10de:2331", "id=10de:2331,node=pve2,path=0000:02:00.0", "node=pve3,path=0000:81:00.0;0000:82:00.0,id=10de:2331"]
    }
    assert mapping_devices_per_node(entry) == {"pve2": 2, "pve3": 1}
    assert mapping_devices_per_node({"map": []}) == {}


@pytest.mark.parametrize(
    ("devices", "used", "per_vm", "expected"),
    [
        ({"pve2": 4, "pve3": 2}, {}, 1, {"pve2": (4, 4, 4), "pve3": (2, 2, 2)}),
        ({"pve2": 4, "pve3": 2}, {"pve2": 1, "pve3": 2}, 2, {"pve2": (1, 3, 4), "pve3": (0, 0, 2)}),
        ({"pve2": 1}, {"pve2": 3}, 1, {"pve2": (0, 0, 1)}),  # more in use than mapped: none free, never negative
    ],
)
def test_device_slots_count_whole_vms(devices, used, per_vm, expected):
    assert device_slots(devices, used, per_vm) == expected


def test_placement_with_devices_goes_only_where_a_vm_s_devices_are_free():
    nodes = [node("pve1", 60), node("pve2", 40), node("pve3", 30)]
    slots = device_slots({"pve2": 2, "pve3": 1}, {"pve2": 1}, 1)
    placed = plan_placement(nodes, None, GIB, 2, devices=("gpu", 1, slots))
    assert [name for name, _reason in placed] == ["pve2", "pve3"]
    assert placed[0][1] == "pve2: most free memory (40.0 GiB of 64.0 GiB); 1 of 2 devices of PCI mapping gpu free"
    assert placed[1][1] == "pve3: most free memory (30.0 GiB of 64.0 GiB); 1 of 1 devices of PCI mapping gpu free"


@pytest.mark.parametrize(
    ("allowed", "count", "message"),
    [
        (None, 3, r"PCI mapping gpu: no node has 1 free device for 1 of the 3 new VMs \(pve1 has no device in it; pve2 0 of 2 free; pve3 0 of 1 free\)"),
        (["pve1"], 1, r"no node has 1 free device for 1 of the 1 new VMs \(pve1 has no device in it\): add devices of the mapping on a node"),
    ],
)
def test_placement_without_free_devices_names_every_node(allowed, count, message):
    nodes = [node("pve1", 60), node("pve2", 40), node("pve3", 30)]
    slots = device_slots({"pve2": 2, "pve3": 1}, {"pve2": 1}, 1)
    with pytest.raises(PoolError, match=message):
        plan_placement(nodes, allowed, GIB, count, devices=("gpu", 1, slots))


def test_ids_are_unique_across_threads_and_skip_taken_ones():
    allocator = IdAllocator(100, [100, 102])
    got = []
    lock = threading.Lock()

    def take():
        for _round in range(50):
            vmid = allocator.allocate()
            with lock:
                got.append(vmid)

    threads = [threading.Thread(target=take) for _thread in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert len(got) == 200 and len(set(got)) == 200
    assert 100 not in got and 102 not in got and min(got) == 101


def test_static_addresses_skip_used_ones_and_network_boundaries():
    ip_range = {"start": "192.168.213.0", "end": "192.168.213.5", "prefix": 24}
    assert pick_addresses(ip_range, ["192.168.213.2", None], 3) == ["192.168.213.1", "192.168.213.3", "192.168.213.4"]
    # A member's static address may be IPv6 (ip6= in its ipconfig): it takes nothing from an IPv4 range.
    assert pick_addresses(ip_range, ["2001:db8::1", "192.168.213.1"], 1) == ["192.168.213.2"]
    assert static_ipconfig("192.168.213.1", 24, "192.168.213.254") == "ip=192.168.213.1/24,gw=192.168.213.254"
    assert static_ipconfig("192.168.213.1", 24) == "ip=192.168.213.1/24"


@pytest.mark.parametrize(
    "ip_range, message",
    [
        ({"start": "10.0.0.5", "end": "10.0.0.6", "prefix": 24}, r"ip_range 10.0.0.5-10.0.0.6 has 2 addresses, 1 used by members \(10.0.0.5\); 2 new VMs"),
        ({"start": "10.0.0.9", "end": "10.0.0.5", "prefix": 24}, r"ip_range end 10.0.0.5 lies before its start 10.0.0.9: swap them"),
        ({"start": "10.0.0.5", "end": "10.0.1.5", "prefix": 24}, r"does not fit in 10.0.0.0/24"),
        ({"start": "10.0.0.x", "end": "10.0.0.5", "prefix": 24}, r"ip_range is not a valid IPv4 range"),
    ],
)
def test_address_range_errors_say_what_to_change(ip_range, message):
    with pytest.raises(PoolError, match=message):
        pick_addresses(ip_range, ["10.0.0.5"], 2)


MEMBERS = [{"vmid": vmid} for vmid in (101, 102, 103, 104, 105)]


def test_victims_newest_or_oldest_never_protected():
    assert choose_victims(MEMBERS, 3) == [105, 104]
    assert choose_victims(MEMBERS, 3, "oldest") == [101, 102]
    assert choose_victims(MEMBERS, 3, protected=[105]) == [104, 103]
    assert choose_victims(MEMBERS, 0, protected=[101, 102]) == [105, 104, 103]
    assert choose_victims(MEMBERS, 5) == []


def test_explicit_victims_come_first_and_are_bounded():
    assert choose_victims(MEMBERS, 3, remove_vmids=[102]) == [102, 105]
    with pytest.raises(PoolError, match=r"removes only 1: lower count to 3 or list fewer vmids"):
        choose_victims(MEMBERS, 4, remove_vmids=[101, 102])
    with pytest.raises(PoolError, match=r"VMs 101 are both in remove_vmids and protected"):
        choose_victims(MEMBERS, 4, remove_vmids=[101], protected=[101])


def test_disk_storages_are_the_disks_not_cdroms_or_the_cloud_init_drive():
    config = {
        "scsi0": "slow-nfs:9000/base-9000-disk-0.qcow2,size=8G",
        "efidisk0": "local-lvm:vm-9000-disk-1,size=4M",
        "ide2": "local-lvm:vm-9000-cloudinit,media=cdrom",
        "ide0": "none,media=cdrom",
        "net0": "virtio=BC:24:11:00:90:00,bridge=vmbr0",
        "scsihw": "virtio-scsi-single",
    }
    assert disk_storages(config) == ["local-lvm", "slow-nfs"]
