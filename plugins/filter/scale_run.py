# Copyright (c) mlfleet.serving maintainers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The end of a scale run, decided by the decision core: which VMs it destroys and how it ended."""

from __future__ import annotations

from ansible.errors import AnsibleFilterError

from ansible_collections.mlfleet.serving.plugins.module_utils._scale_decision import run_outcome, standby_record, standby_step, vms_to_destroy


def _plan(plan, name):
    if not hasattr(plan, "get"):
        raise AnsibleFilterError(f"{name} expects the plan mlfleet.serving.scale_decision returned (registered), not {type(plan).__name__}")
    return plan


def scale_vms_to_destroy(plan, left_vmids):
    """The VMs a scale-in destroys and the count its pool keeps."""
    return vms_to_destroy(_plan(plan, "scale_vms_to_destroy"), left_vmids or [])


def scale_outcome(
    plan, decision, reason, fields, failures=None, created=None, destroyed=None, joined=None, replicas_after_join=None, returned=None, warmed=None
):
    """How a scale run ended: its decision, reasons and fields for the audit trail."""
    if not hasattr(fields, "get"):
        raise AnsibleFilterError("scale_outcome: fields must be the run's audit fields (a dict)")
    return run_outcome(
        _plan(plan, "scale_outcome"),
        decision,
        reason,
        fields,
        failures=list(failures or []),
        created=list(created or []),
        destroyed=destroyed,
        joined=list(joined or []),
        replicas_after_join=replicas_after_join,
        returned=list(returned or []),
        warmed=list(warmed or []),
    )


def scale_standby(serving, service, direction, stage, decision="", fields=None, replicas_after_join=None, desired=None):
    """What the run does with the service's standby replicas at its start or finish."""
    if fields is not None and not hasattr(fields, "get"):
        raise AnsibleFilterError("scale_standby: fields must be the run's audit fields (a dict)")
    try:
        return standby_step(
            serving, service, direction, stage, decision=decision, fields=fields, replicas_after_join=replicas_after_join, desired=list(desired or [])
        )
    except ValueError as error:
        raise AnsibleFilterError(str(error)) from None


def scale_standby_record(step, stage, proxies, started_at, now):
    """The audit fields, phases and reasons of what the edge proxy hosts did with the standby replicas."""
    try:
        return standby_record(step, stage, list(proxies or []), started_at, now)
    except (TypeError, ValueError) as error:
        raise AnsibleFilterError(f"scale_standby_record: {error}") from None


class FilterModule:
    def filters(self):
        return {
            "scale_vms_to_destroy": scale_vms_to_destroy,
            "scale_outcome": scale_outcome,
            "scale_standby": scale_standby,
            "scale_standby_record": scale_standby_record,
        }
