"""worker_pools_info's main() in-process: the pools, their members and sizes, each service's pool and constraint."""

from __future__ import annotations

import pytest
from ansible.module_utils import _internal as module_utils_internal
from test_swarm_join import run_module

from ansible_collections.mlfleet.serving.plugins.modules import worker_pools_info

CPU = {"name": "cpu", "tag": "swarm_worker", "count": 2, "max_count": 4, "cores": 2, "memory": 4096}
GPU = {"name": "gpu", "tag": "gpu_worker", "count": 0, "max_count": 2, "cores": 8, "memory": 32768}


@pytest.fixture(autouse=True)
def module_side(monkeypatch):
    # Controller code imported by other tests makes module deprecations go to the display instead of the result.
    monkeypatch.setattr(module_utils_internal, "is_controller", False)


MEMBERS = {"w1": ["mlfleet", "swarm_worker"], "w2": ["mlfleet", "swarm_worker"], "w3": ["mlfleet", "swarm_worker"], "g1": ["gpu_worker"]}


def test_each_pool_knows_its_members_and_each_service_its_pool(capsys):
    serving = [{"service": "resnet18", "pool": "cpu"}, {"service": "llm", "pool": "gpu"}]
    result = run_module(capsys, worker_pools_info, pools=[CPU, GPU], template=9000, cluster="lab", serving=serving, members=MEMBERS)
    assert result["rc"] == 0, result.get("msg")
    assert not result["changed"]
    assert [(p["name"], p["members"], p["provision_count"], p["name_prefix"]) for p in result["pools"]] == [
        ("cpu", ["w1", "w2", "w3"], 3, "lab-cpu"),
        ("gpu", ["g1"], 1, "lab-gpu"),
    ]
    assert result["service_pools"] == {"resnet18": "cpu", "llm": "gpu"}
    assert result["service_pool_tags"] == {"resnet18": "swarm_worker", "llm": "gpu_worker"}
    assert result["host_pool_tags"] == {"w1": "swarm_worker", "w2": "swarm_worker", "w3": "swarm_worker", "g1": "gpu_worker"}
    assert "deprecations" not in result


def test_the_deprecated_mlfleet_workers_is_read_and_warns(capsys):
    result = run_module(
        capsys, worker_pools_info, workers={"count": 2, "max_count": 4, "cores": 2, "memory": 4096}, template=9000, cluster="lab", members=MEMBERS
    )
    assert result["rc"] == 0, result.get("msg")
    assert [(p["name"], p["tag"], p["name_prefix"], p["provision_count"]) for p in result["pools"]] == [("workers", "swarm_worker", "lab-worker", 3)]
    assert len(result["deprecations"]) == 1


def test_a_vm_in_two_pools_fails_naming_it(capsys):
    result = run_module(capsys, worker_pools_info, pools=[CPU, GPU], template=9000, members={"w1": ["swarm_worker", "gpu_worker"]})
    assert result["failed"]
    assert result["msg"] == "w1 carries the tags of two worker pools, swarm_worker and gpu_worker: remove one of them from the VM in Proxmox"


def test_bad_pools_fail_with_the_fix(capsys):
    result = run_module(capsys, worker_pools_info, pools=[dict(CPU, max_count=1)], template=9000)
    assert result["failed"]
    assert result["msg"] == "mlfleet_worker_pools pool cpu: max_count 1 is below count 2; raise max_count"


def test_warm_vms_are_seen_apart_from_the_members_and_kept_within_max_count(capsys):
    members = dict(MEMBERS, w4=["swarm_worker_warm"], w5=["mlfleet", "swarm_worker_warm"])
    result = run_module(capsys, worker_pools_info, pools=[dict(CPU, warm_vms=1)], template=9000, members=members)
    assert result["rc"] == 0, result.get("msg")
    pool = result["pools"][0]
    # Three serve and max_count is 4: one warm VM is kept of the two that wait (the module reports, provision.yml acts).
    assert (pool["members"], pool["warm_members"], pool["provision_count"], pool["warm_count"]) == (["w1", "w2", "w3"], ["w4", "w5"], 3, 1)
    assert "w4" not in result["host_pool_tags"]


def test_a_vm_that_serves_and_waits_fails_naming_it(capsys):
    result = run_module(capsys, worker_pools_info, pools=[dict(CPU, warm_vms=1)], template=9000, members={"w1": ["swarm_worker", "swarm_worker_warm"]})
    assert result["failed"]
    assert result["msg"].startswith("w1 carries both the tag swarm_worker of pool cpu and its warm_tag swarm_worker_warm")
