"""swarm_cluster's main() in-process against the in-memory swarm of test_swarm_join."""

from __future__ import annotations

import pytest
from test_swarm_join import install, run_module, standard_lab

from ansible_collections.mlfleet.serving.plugins.modules import swarm_cluster


@pytest.fixture
def lab(monkeypatch):
    lab = standard_lab()
    install(monkeypatch, lab)
    return lab


@pytest.fixture
def cluster(capsys, lab):
    def invoke(node="m1", **args):
        return run_module(capsys, swarm_cluster, docker_host=lab.url(node), **args)

    return invoke


def swarm_a(lab):
    return lab.swarms[0]


@pytest.mark.parametrize("autolock", [False, True])
def test_init_when_inactive_then_unchanged(lab, cluster, autolock):
    created = cluster("w4", advertise_addr="192.0.2.40", autolock=autolock)
    assert created["rc"] == 0, created.get("msg")
    assert created["changed"] and created["actions"] == ["created the swarm"]
    [(op, node, spec)] = lab.writes
    assert (op, node) == ("init_swarm", "w4")
    assert spec["EncryptionConfig"] == {"AutoLockManagers": autolock}
    swarm = lab.engine("w4").swarm
    assert created["cluster_id"] == swarm.id and created["node_id"] == lab.engine("w4").node_id
    assert created["manager_address"] == f"{lab.engine('w4').address}:2377"
    assert ("unlock_key" in created) == autolock
    if autolock:
        assert created["unlock_key"] == swarm.unlock_key

    lab.writes.clear()
    again = cluster("w4", advertise_addr="192.0.2.40", autolock=autolock)
    assert again["rc"] == 0 and not again["changed"] and again["actions"] == []
    assert lab.writes == []


def test_init_in_check_mode_writes_nothing(lab, cluster):
    plan = cluster("w4", check_mode=True, diff=True, networks=[{"name": "mlfleet"}])
    assert plan["rc"] == 0 and plan["changed"] and plan["actions"] == ["created the swarm"]
    assert lab.writes == [] and lab.engine("w4").state == "inactive"
    assert plan["diff"]["before"] == {"manager": False}
    assert plan["diff"]["after"]["networks"] == {"mlfleet": {"encrypted": True, "attachable": True, "subnet": None}}


def test_autolock_is_toggled_with_the_clusters_version(lab, cluster):
    version = swarm_a(lab).version
    locked = cluster(autolock=True)
    assert locked["rc"] == 0, locked.get("msg")
    assert locked["actions"] == ["turned autolock on"]
    [(op, sent_version, spec)] = lab.writes
    assert (op, sent_version) == ("update_swarm", version)
    assert spec["EncryptionConfig"]["AutoLockManagers"] is True
    assert spec["Orchestration"] == {"TaskHistoryRetentionLimit": 5}, "the rest of the spec goes back as read"
    assert locked["unlock_key"] == swarm_a(lab).unlock_key

    lab.writes.clear()
    again = cluster(autolock=True)
    assert not again["changed"] and lab.writes == [] and again["unlock_key"] == swarm_a(lab).unlock_key

    unlocked = cluster(autolock=False)
    assert unlocked["actions"] == ["turned autolock off"] and "unlock_key" not in unlocked
    assert swarm_a(lab).spec["EncryptionConfig"]["AutoLockManagers"] is False


@pytest.mark.parametrize(("encrypted", "options"), [(True, {"encrypted": "true"}), (False, None)])
def test_a_network_is_created_with_encryption_only_when_asked(lab, cluster, encrypted, options):
    swarm_a(lab).add_network("mlfleet-old", encrypted=False)
    created = cluster(networks=[{"name": "mlfleet", "encrypted": encrypted, "labels": {"tier": 1}}])
    assert created["rc"] == 0, created.get("msg")
    assert created["actions"] == ["created network mlfleet"]
    [(op, name, sent)] = lab.writes
    assert (op, name) == ("create_network", "mlfleet")
    assert sent == {"driver": "overlay", "options": options, "attachable": True, "scope": "swarm", "labels": {"tier": "1"}}
    assert created["networks"]["mlfleet"]["encrypted"] is encrypted

    lab.writes.clear()
    again = cluster(networks=[{"name": "mlfleet", "encrypted": encrypted, "labels": {"tier": 1}}])
    assert again["rc"] == 0 and not again["changed"] and lab.writes == []


def test_a_network_with_other_encryption_and_no_service_is_recreated(lab, cluster):
    old = swarm_a(lab).add_network("mlfleet", encrypted=False)
    recreated = cluster(networks=[{"name": "mlfleet"}])
    assert recreated["rc"] == 0, recreated.get("msg")
    assert recreated["actions"] == ["re-created network mlfleet (encrypted changed)"]
    assert [entry[:2] for entry in lab.writes] == [("remove_network", "mlfleet"), ("create_network", "mlfleet")]
    assert lab.writes[1][2]["options"] == {"encrypted": "true"}
    assert recreated["networks"]["mlfleet"]["encrypted"] is True and recreated["networks"]["mlfleet"]["id"] != old[:12]


def test_a_network_with_other_encryption_that_a_service_uses_fails(lab, cluster):
    swarm = swarm_a(lab)
    network_id = swarm.add_network("mlfleet", encrypted=False)
    swarm.add_service("resnet", replicas=1, networks=[network_id])
    failed = cluster(networks=[{"name": "mlfleet"}])
    assert failed["rc"] == 1
    assert "Network mlfleet differs in encrypted" in failed["msg"] and "services resnet use it" in failed["msg"]
    assert lab.writes == []


def test_a_worker_endpoint_fails(lab, cluster):
    failed = cluster("w1")
    assert failed["rc"] == 1
    assert "unix:///run/fake/w1.sock is a worker" in failed["msg"] and "run this module on one of its managers" in failed["msg"]


def test_a_locked_manager_needs_its_unlock_key(lab, cluster):
    lab.engine("m1").state = "locked"
    failed = cluster()
    assert failed["rc"] == 1 and "is locked (autolock); give its unlock_key" in failed["msg"]
    assert lab.writes == []

    unlocked = cluster(unlock_key=swarm_a(lab).unlock_key)
    assert unlocked["rc"] == 0, unlocked.get("msg")
    assert lab.writes == [("unlock_swarm", "m1", swarm_a(lab).unlock_key)]
    assert unlocked["changed"] and unlocked["actions"] == ["unlocked the manager"]
    assert lab.engine("m1").state == "active"
