"""swarm_nodes_info's main() in-process against the in-memory swarm of test_swarm_join."""

from __future__ import annotations

import pytest
from test_swarm_join import install, run_module, standard_lab

from ansible_collections.mlfleet.serving.plugins.modules import swarm_nodes_info


@pytest.fixture
def lab(monkeypatch):
    lab = standard_lab()
    install(monkeypatch, lab)
    swarm = lab.swarms[0]
    swarm.set_spec("w1", Labels={"mlfleet.vmid": "121", "mlfleet.pool": "swarm_worker"})
    swarm.set_spec("w2", Labels={"mlfleet.vmid": "not-a-number"})
    swarm.add_service("resnet", replicas=4)
    swarm.add_service("exporter")
    return lab


def tasks_of(swarm, hostname, service):
    node_id = swarm.node(hostname)["ID"]
    return [t for t in swarm.tasks if t["NodeID"] == node_id and t["ServiceID"] == f"svc-{service}"]


def test_nodes_with_vm_labels_and_running_tasks(lab, capsys):
    swarm = lab.swarms[0]
    assert len(tasks_of(swarm, "w1", "resnet")) == 2
    # A task that is being stopped and one that is still starting run no workload the caller can count on.
    stopping, starting = tasks_of(swarm, "w1", "resnet")[0], tasks_of(swarm, "w3", "exporter")[0]
    stopping["DesiredState"] = "shutdown"
    starting["Status"]["State"] = "preparing"

    result = run_module(capsys, swarm_nodes_info, docker_host=lab.url("m1"))
    assert result["rc"] == 0, result.get("msg")
    assert not result["changed"] and result["cluster_id"] == "cluster-a"
    nodes = {node["hostname"]: node for node in result["nodes"]}
    assert [node["hostname"] for node in result["nodes"]] == ["m1", "m2", "w1", "w2", "w3"]
    assert (nodes["w1"]["vmid"], nodes["w1"]["pool"]) == (121, "swarm_worker")
    assert (nodes["w2"]["vmid"], nodes["w2"]["pool"]) == (None, None) and nodes["w2"]["labels"] == {"mlfleet.vmid": "not-a-number"}
    assert nodes["w1"]["running_tasks"] == {"resnet": 1, "exporter": 1}
    assert nodes["w2"]["running_tasks"] == {"resnet": 1, "exporter": 1}
    assert nodes["w3"]["running_tasks"] == {"resnet": 1}
    assert nodes["m1"]["running_tasks"] == {}
    assert (nodes["m1"]["role"], nodes["m1"]["manager_reachability"], nodes["m1"]["availability"]) == ("manager", "reachable", "drain")
    assert (nodes["m2"]["status"], nodes["m2"]["manager_reachability"]) == ("down", "unreachable")
    assert nodes["w1"]["manager_reachability"] is None and nodes["w1"]["address"] == lab.engine("w1").address
    assert lab.writes == []


def test_a_worker_endpoint_fails(lab, capsys):
    result = run_module(capsys, swarm_nodes_info, docker_host=lab.url("w1"))
    assert result["rc"] == 1
    assert "the endpoint must be a manager" in result["msg"] and "unix:///run/fake/w1.sock" in result["msg"]
