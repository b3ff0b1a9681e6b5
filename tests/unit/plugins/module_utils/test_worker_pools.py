"""The worker pools of a site: mlfleet_worker_pools checked and completed, the deprecated mlfleet_workers read as one pool."""

from __future__ import annotations

import re

import pytest

from ansible_collections.mlfleet.serving.plugins.module_utils._worker_pools import (
    pool_members,
    provision_count,
    service_pools,
    warm_refill_count,
    worker_pools,
)

CPU = {"name": "cpu", "tag": "swarm_worker", "count": 2, "max_count": 4, "cores": 2, "memory": 4096}
GPU = {"name": "gpu", "tag": "gpu_worker", "count": 0, "max_count": 2, "cores": 8, "memory": 32768, "template": 9001, "pci_mapping": {"name": "nvidia_gpu"}}


def test_a_pool_is_completed_with_the_template_and_the_vm_names():
    pools, deprecation = worker_pools([CPU, GPU], template="debian-golden", cluster="mlfleet")
    assert deprecation is None
    assert pools == [
        {
            "name": "cpu",
            "tag": "swarm_worker",
            "template": "debian-golden",
            "count": 2,
            "max_count": 4,
            "cores": 2,
            "memory": 4096,
            "cpulimit": None,
            "ip_range": None,
            "name_prefix": "mlfleet-cpu",
            "warm_vms": 0,
            "warm_form": "joined",
            "warm_tag": "swarm_worker_warm",
            "pci_mapping": None,
        },
        {
            "name": "gpu",
            "tag": "gpu_worker",
            "template": 9001,
            "count": 0,
            "max_count": 2,
            "cores": 8,
            "memory": 32768,
            "cpulimit": None,
            "ip_range": None,
            "name_prefix": "mlfleet-gpu",
            "warm_vms": 0,
            "warm_form": "joined",
            "warm_tag": "gpu_worker_warm",
            "pci_mapping": {"name": "nvidia_gpu", "count": 1, "pcie": True},
        },
    ]


def test_a_gpu_pool_s_devices_take_the_inventory_s_values():
    (pool,) = worker_pools([dict(GPU, pci_mapping={"name": "gpu", "count": "2", "pcie": False})], template=9000)[0]
    assert pool["pci_mapping"] == {"name": "gpu", "count": 2, "pcie": False}


def test_max_count_defaults_to_count_and_strings_from_the_inventory_are_read_as_numbers():
    (pool,) = worker_pools([{"name": "cpu", "tag": "swarm_worker", "count": "3", "cores": "2", "memory": "2048", "cpulimit": "1.5"}], template=9000)[0]
    assert (pool["count"], pool["max_count"], pool["cores"], pool["memory"], pool["cpulimit"]) == (3, 3, 2, 2048, 1.5)


def test_the_deprecated_mlfleet_workers_is_the_pool_workers_with_the_same_tag_and_vm_names():
    legacy = {"count": 2, "max_count": 6, "cores": 2, "memory": 2048, "ip_range": {"start": "10.20.0.20", "end": "10.20.0.59", "prefix": 24}}
    (pool,), deprecation = worker_pools(None, legacy, template="debian-golden", cluster="mlfleet")
    assert (pool["name"], pool["tag"], pool["name_prefix"], pool["max_count"], pool["ip_range"]["prefix"]) == (
        "workers",
        "swarm_worker",
        "mlfleet-worker",
        6,
        24,
    )
    assert deprecation.startswith(
        "mlfleet_workers is deprecated: define the pool in mlfleet_worker_pools instead, as [{name: workers, tag: swarm_worker, count: 2,"
    )
    assert deprecation.endswith("mlfleet_workers will be removed in mlfleet.serving 2.0.0")


@pytest.mark.parametrize(
    ("pools", "workers", "message"),
    [
        ([CPU], {"count": 2, "cores": 2, "memory": 2048}, "both mlfleet_worker_pools and the deprecated mlfleet_workers are set: remove mlfleet_workers"),
        (None, None, "mlfleet_worker_pools must list at least one worker pool"),
        ({"cpu": CPU}, None, "mlfleet_worker_pools must be a list of pools, got dict"),
        (["cpu"], None, "mlfleet_worker_pools[0] must be a mapping"),
        ([dict(CPU, name="CPU")], None, "mlfleet_worker_pools[0].name must be a short name of lower-case letters"),
        ([dict(CPU, tag="Swarm Worker")], None, "mlfleet_worker_pools pool cpu.tag must be a Proxmox tag"),
        ([{k: v for k, v in CPU.items() if k != "count"}], None, "mlfleet_worker_pools pool cpu needs count"),
        ([{k: v for k, v in CPU.items() if k != "memory"}], None, "mlfleet_worker_pools pool cpu needs memory: the memory in MiB of each VM"),
        ([dict(CPU, max_count=1)], None, "mlfleet_worker_pools pool cpu: max_count 1 is below count 2; raise max_count"),
        ([dict(CPU, count=-1)], None, "mlfleet_worker_pools pool cpu.count must be a whole number of 0 or more, got -1"),
        ([dict(CPU, cores=1.5)], None, "mlfleet_worker_pools pool cpu.cores must be a whole number of 1 or more, got 1.5"),
        ([dict(CPU, cpulimit=4)], None, "mlfleet_worker_pools pool cpu.cpulimit must be a number of host CPUs above 0 and at most cores (2), got 4"),
        ([dict(CPU, cpulimit="half")], None, "mlfleet_worker_pools pool cpu.cpulimit must be a number of host CPUs above 0 and at most cores (2), got 'half'"),
        ([dict(CPU, ip_range="10.0.0.0/24")], None, "mlfleet_worker_pools pool cpu.ip_range must be a mapping"),
        ([dict(CPU, gpus=1)], None, "mlfleet_worker_pools[0] has unknown keys gpus; a pool takes name, tag, template"),
        ([CPU, dict(GPU, name="cpu")], None, "mlfleet_worker_pools: pools cpu and cpu share the name 'cpu'; give each pool its own"),
        ([CPU, dict(GPU, tag="swarm_worker")], None, "mlfleet_worker_pools: pools cpu and gpu share the tag 'swarm_worker'; give each pool its own"),
        (None, {"count": 2, "cores": 2}, "mlfleet_workers needs memory"),
        # Warm VMs are VMs someone pays for: they count toward max_count.
        ([dict(CPU, warm_vms=3)], None, "pool cpu: count 2 and warm_vms 3 make 5 VMs, above max_count 4; warm VMs count toward max_count"),
        ([dict(CPU, warm_vms=-1)], None, "pool cpu.warm_vms must be a whole number of 0 or more, got -1"),
        (
            [dict(CPU, warm_vms=1, warm_form="hibernated")],
            None,
            "pool cpu.warm_form must be one of stopped, running, joined (how a warm VM waits), got 'hibernated'",
        ),
        ([dict(CPU, warm_tag="swarm_worker")], None, "pool cpu.warm_tag must be a Proxmox tag other than the pool's tag 'swarm_worker'"),
        ([dict(CPU, warm_tag="Warm Pool")], None, "pool cpu.warm_tag must be a Proxmox tag other than the pool's tag"),
        ([CPU, dict(GPU, warm_tag="swarm_worker")], None, "the warm_tag 'swarm_worker' of pool gpu is the tag of pool cpu; give each its own tag"),
        ([CPU, dict(GPU, warm_tag="swarm_worker_warm")], None, "the warm_tag 'swarm_worker_warm' of pool gpu is the warm_tag of pool cpu"),
        ([dict(GPU, pci_mapping="nvidia_gpu")], None, "pool gpu.pci_mapping must be a mapping of name, count, pcie such as {name: nvidia_gpu, count: 1}"),
        ([dict(GPU, pci_mapping={"name": "gpu", "devices": 2})], None, "pool gpu.pci_mapping must be a mapping of name, count, pcie"),
        ([dict(GPU, pci_mapping={"name": "nvidia-gpu"})], None, "pool gpu.pci_mapping.name must be the ID of a Proxmox PCI resource mapping"),
        ([dict(GPU, pci_mapping={"count": 1})], None, "pool gpu.pci_mapping.name must be the ID of a Proxmox PCI resource mapping"),
        ([dict(GPU, pci_mapping={"name": "gpu", "count": 0})], None, "pool gpu.pci_mapping.count must be a whole number of 1 or more, got 0"),
        ([dict(GPU, pci_mapping={"name": "gpu", "count": 17})], None, "pool gpu.pci_mapping.count must be 16 or fewer (hostpci0 to hostpci15), got 17"),
        ([dict(GPU, pci_mapping={"name": "gpu", "pcie": "yes"})], None, "pool gpu.pci_mapping.pcie must be true or false, got 'yes'"),
    ],
)
def test_bad_pools_are_named_with_the_fix(pools, workers, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        worker_pools(pools, workers, template="debian-golden")


def test_a_pool_without_template_needs_mlfleet_template():
    with pytest.raises(
        ValueError, match=re.escape("mlfleet_worker_pools pool cpu.template must name the template VM its VMs are cloned from (or set mlfleet_template)")
    ):
        worker_pools([CPU])


@pytest.mark.parametrize(
    ("serving", "expected"),
    [
        ([{"service": "resnet18", "pool": "cpu"}, {"service": "llm", "pool": "gpu"}], {"resnet18": "cpu", "llm": "gpu"}),
        ([], {}),
    ],
)
def test_each_service_runs_on_the_pool_it_names(serving, expected):
    pools = worker_pools([CPU, GPU], template=9000)[0]
    assert service_pools(pools, serving) == expected


def test_the_only_pool_needs_no_name():
    pools = worker_pools([CPU], template=9000)[0]
    assert service_pools(pools, [{"service": "resnet18"}]) == {"resnet18": "cpu"}


@pytest.mark.parametrize(
    ("serving", "message"),
    [
        ([{"service": "resnet18"}], "mlfleet_serving service resnet18 must name its pool (pool: one of cpu, gpu): the site has several worker pools"),
        ([{"service": "resnet18", "pool": "tpu"}], "mlfleet_serving service resnet18 names pool 'tpu', which mlfleet_worker_pools does not define (cpu, gpu)"),
        (["resnet18"], "mlfleet_serving entries must be mappings with a service name"),
    ],
)
def test_a_service_without_a_known_pool_is_named(serving, message):
    pools = worker_pools([CPU, GPU], template=9000)[0]
    with pytest.raises(ValueError, match=re.escape(message)):
        service_pools(pools, serving)


def test_members_are_the_workers_that_carry_the_pools_tag():
    members = {"w1": ["mlfleet", "swarm_worker"], "w2": "mlfleet;gpu_worker", "w3": [], "w4": ["swarm_worker_old"]}
    pools = worker_pools([CPU, GPU], template=9000)[0]
    assert [pool_members(pool, members) for pool in pools] == [["w1"], ["w2"]]


@pytest.mark.parametrize(("current", "expected"), [(0, 2), (2, 2), (3, 3), (4, 4), (7, 4)])
def test_provision_keeps_the_size_the_autoscaler_chose_within_the_bounds(current, expected):
    pools = worker_pools([CPU], template=9000)[0]
    assert provision_count(pools[0], current) == expected


def test_warm_settings_are_read_as_the_inventory_gives_them():
    pools = worker_pools([dict(CPU, warm_vms="2", warm_form="stopped", warm_tag="cpu_standby")], template="t")[0]
    assert {key: pools[0][key] for key in ("warm_vms", "warm_form", "warm_tag")} == {"warm_vms": 2, "warm_form": "stopped", "warm_tag": "cpu_standby"}


@pytest.mark.parametrize(
    ("warm_vms", "active", "expected"),
    [
        # Room under max_count 4: the whole warm pool.
        (2, 2, 2),
        # Two warm VMs were taken (4 active): none is refilled until a scale-in makes room.
        (2, 3, 1),
        (2, 4, 0),
        (0, 2, 0),
        # More active VMs than max_count (a lowered max_count): never a negative count.
        (1, 6, 0),
    ],
)
def test_the_warm_pool_refills_within_max_count(warm_vms, active, expected):
    pool = worker_pools([dict(CPU, warm_vms=warm_vms)], template="t")[0][0]
    assert warm_refill_count(pool, active) == expected
