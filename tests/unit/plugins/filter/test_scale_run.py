"""The scale run's filters hand the registered plan to the decision core and name a wrong input."""

from __future__ import annotations

import pytest
from ansible.errors import AnsibleFilterError

PLAN = {"pool": {"vmids": [201, 202, 203]}, "orphan_vmids": [203], "changed": False}


def filters():
    # Imported when a test runs, not when pytest collects this file: importing the collection before
    # test_proxmox_inventory installs Ansible's collection loader would break that loader.
    from ansible_collections.mlfleet.serving.plugins.filter.scale_run import FilterModule

    return FilterModule().filters()


def test_the_vms_to_destroy_come_from_the_registered_plan():
    plugins = filters()
    assert plugins["scale_vms_to_destroy"](PLAN, [202]) == {"remove_vmids": [202, 203], "keep": 1, "return_vmids": []}
    # No worker left: the filter takes None as Jinja may hand it.
    assert plugins["scale_vms_to_destroy"](PLAN, None) == {"remove_vmids": [203], "keep": 2, "return_vmids": []}


def test_the_outcome_takes_registered_results_as_ansible_gives_them():
    plugins = filters()
    outcome = plugins["scale_outcome"](PLAN, "not_acted", "", {"replicas_before": 3}, destroyed={"removed": [203], "changed": True}, replicas_after_join={})
    assert outcome == {"decision": "acted", "reason": "removed VMs 203", "fields": {"replicas_before": 3, "replicas_after": 3, "workers_after": 2}}


@pytest.mark.parametrize("name", ["scale_vms_to_destroy", "scale_outcome"])
def test_anything_but_the_plan_is_named(name):
    plugins = filters()
    arguments = ([],) if name == "scale_vms_to_destroy" else ("acted", "", {})
    with pytest.raises(AnsibleFilterError, match=f"{name} expects the plan mlfleet.serving.scale_decision returned"):
        plugins[name]("resnet18", *arguments)


def test_fields_must_be_a_dict():
    plugins = filters()
    with pytest.raises(AnsibleFilterError, match="scale_outcome: fields must be the run's audit fields"):
        plugins["scale_outcome"](PLAN, "acted", "", None)


def test_the_standby_record_reads_the_proxy_hosts_variables_and_names_a_wrong_stage():
    plugins = filters()
    record = plugins["scale_standby_record"]({"state": "promoted"}, "start", ({"scale_standby_set": {"serving": 2}},), "100.0", 101.25)
    assert record == {"fields": {"standby_lent": 1, "standby_serving": 2}, "phases": {"standby_s": 1.25}, "reasons": []}
    with pytest.raises(AnsibleFilterError, match="scale_standby_record: standby_record: stage must be start or finish"):
        plugins["scale_standby_record"]({"state": "promoted"}, "middle", [], 0, 0)
