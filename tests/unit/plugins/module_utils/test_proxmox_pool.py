"""The proxmox_vm_pool module's decisions, without a server."""

from __future__ import annotations

import threading

import pytest

from ansible_collections.mlfleet.serving.plugins.module_utils._proxmox_pool import (
    GIB,
    IdAllocator,
    PoolError,
    choose_victims,
    disk_storages,
    find_template,
    is_member,
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
