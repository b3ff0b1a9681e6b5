#!/usr/bin/python
# Copyright (c) mlfleet.serving maintainers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: scale_lease
short_description: Take or give back the autoscaler's single-flight lease, and keep the cooldown records
version_added: 0.1.0
description:
  - Keeps the lease that lets only one scale playbook (C(scale_out.yml), C(scale_in.yml), C(scale_replicas.yml), C(teardown.yml))
    act at a time, and the time each C(<service>:<action>) last acted, in one small JSON file on the control host.
  - O(state=acquired) takes the lease when it is free, has expired, or is already held by O(holder) (a renewal, after
    which the lease lives O(ttl) seconds from now). While another holder's lease is live, the module tries again every
    O(poll_interval) seconds for up to O(wait_timeout) seconds, then returns RV(acquired=false) with who holds the lease,
    why and for how long, or fails when O(fail_when_busy=true).
  - The lease records the C(ansible-playbook) process the module runs under (host, PID and start time). When that
    process has ended on this host (the run failed, or was killed, before it gave the lease back), the lease is
    abandoned and the next run takes it over at once, without waiting for it to expire.
  - A run that crashed holds the lease only until it expires, or until its C(ansible-playbook) process is seen to have
    ended; the next run takes it over and returns the replaced lease in RV(taken_over), so the playbook can record that
    a previous run ended without releasing. A lease taken on another host, or outside C(ansible-playbook), is held until it expires.
  - O(state=released) removes the lease when O(holder) holds it, even after it expired, and records now as the last
    action time of each key of O(acted). When another holder, or nobody, holds the lease, nothing changes and
    O(acted) is not recorded, so a late release after a takeover never frees someone else's lease.
  - Every call returns RV(last_actions) and RV(now), so a playbook honours a cooldown as
    C(now - last_actions[key]). Times are epoch seconds of the wall clock, since several processes share the file.
  - O(state=released) also records O(floors), the fewest replicas a service keeps until a given time (a scheduled
    scale-out sets one for its window). Every call returns the highest floor of each service that has not expired in
    RV(floors), so a scale-in during the window keeps it. Expired floors are dropped at the next write.
  - O(state=released) also records O(bounds), the fewest and most replicas the run kept each service to, with the
    time; they replace the service's earlier ones and are returned in RV(bounds). The serving_pressure event source reads
    them to ask less often for more replicas of a service that is at its maximum already.
  - Every change is made under an exclusive C(flock) on the file O(path) with C(.lock) appended. The lease file itself
    is replaced atomically (written to a temporary file in its directory, synced, renamed) with mode 0600.
  - A corrupt or unreadable lease file makes the module fail with a message naming it; it is not reset, because that
    could let two scale runs act at once. Delete it when no scale playbook runs (its cooldown records go with it).
author:
  - mlfleet.serving maintainers (@mlfleet)
extends_documentation_fragment:
  - mlfleet.serving.attributes
attributes:
  check_mode:
    support: full
    details:
      - Nothing is written, not even the lock file. The module does not wait in check mode; it reports whether the
        lease could be taken or given back now.
  diff_mode:
    support: none
  idempotent:
    support: partial
    details:
      - Acquiring again with the same O(holder) renews the lease and reports a change, because its expiry moves.
      - Releasing twice reports a change only the first time.
options:
  path:
    description:
      - The lease file on the control host, for example V(/var/lib/mlfleet/scale.lease). Its directory must exist;
        the module creates the file and its lock file O(path) with C(.lock) appended, both with mode 0600.
      - Every scale playbook of a cluster must use the same file.
    type: path
    required: true
  state:
    description:
      - V(acquired) - take or renew the lease.
      - V(released) - give it back and record O(acted).
    type: str
    choices: [acquired, released]
    default: acquired
  holder:
    description:
      - Who holds the lease. Required with O(state=released); pass the RV(holder) the module returned when the lease was acquired.
      - With O(state=acquired), defaults to a fresh id C(<hostname>:<pid>:<random hex>), returned as RV(holder). Pass
        the id of an earlier acquisition to renew that lease.
    type: str
  ttl:
    description:
      - Seconds the lease lives from now, unless it is renewed or released before. Choose it longer than a scale run takes;
        once it expires, another run may take the lease over.
      - Only with O(state=acquired).
    type: int
    default: 900
  wait_timeout:
    description:
      - Seconds to wait while another holder's live lease exists. V(0) tries once.
      - Waiting runs are not queued; whichever tries first after the lease is given back takes it.
      - Only with O(state=acquired).
    type: int
    default: 0
  poll_interval:
    description:
      - Seconds between attempts while waiting, at least V(0.01). A waiting run also tries as soon as the lease it waits for expires.
    type: float
    default: 1.0
  reason:
    description:
      - Why the lease is taken, for example the alert that started the run. Stored with the lease and returned as
        RV(held_reason) to a run that finds it busy.
      - When renewing without O(reason), the stored reason is kept.
    type: str
  acted:
    description:
      - Keys such as V(resnet18:scale_out) to record now as their last action time, only with O(state=released).
      - Recorded only when the release gives back the lease of O(holder).
    type: list
    elements: str
    default: []
  floors:
    description:
      - Replica floors to record, only with O(state=released), and only when the release gives back the lease of O(holder).
      - A floor keeps at least O(floors[].replicas) replicas of O(floors[].service) until O(floors[].until); the highest
        live floor of each service is returned in RV(floors) by every later call.
    type: list
    elements: dict
    default: []
    suboptions:
      service:
        description: The Swarm service the floor is for.
        type: str
        required: true
      replicas:
        description: The fewest replicas the service keeps while the floor lasts.
        type: int
        required: true
      until:
        description: When the floor ends, epoch seconds.
        type: float
        required: true
      reason:
        description: Why, for example the schedule entry that set it.
        type: str
  bounds:
    description:
      - The replica bounds the run kept services to, only with O(state=released), and only when the release gives back
        the lease of O(holder). Each replaces the service's earlier bounds and is stored with the time of the release.
    type: list
    elements: dict
    default: []
    suboptions:
      service:
        description: The Swarm service.
        type: str
        required: true
      min:
        description: The fewest replicas the service keeps, scheduled floors included.
        type: int
        required: true
      max:
        description: The most replicas the service may run.
        type: int
        required: true
  desired:
    description:
      - The replica counts the run desired (RV(mlfleet.serving.scale_decision#module:record_desired)), only with
        O(state=released), and only when the release gives back the lease of O(holder). Each is appended to its service's
        RV(history) with the time of the release; a scale-in keeps the highest count of its stabilization window.
    type: list
    elements: dict
    default: []
    suboptions:
      service:
        description: The Swarm service.
        type: str
        required: true
      replicas:
        description: The count the run desired.
        type: int
        required: true
  settings:
    description:
      - The effective settings each service's run decided with (RV(mlfleet.serving.scale_decision#module:settings)), only
        with O(state=released). Each replaces the service's earlier ones, and is returned in RV(settings).
    type: list
    elements: dict
    default: []
  quiet:
    description:
      - The decisions not to act the run made (RV(mlfleet.serving.scale_decision#module:records)), only with
        O(state=released). Each replaces the earlier one of its service and direction and is stored with the time of the
        release; a release with O(acted) first drops every earlier one, as the action changed what they were decided on.
      - The serving_pressure event source sends no event that could only meet such a decision again, until the
        service's replicas or its demand change, any run acts, or O(quiet[].until) passes.
    type: list
    elements: dict
    default: []
    suboptions:
      service:
        description: The Swarm service.
        type: str
        required: true
      direction:
        description: The direction the run was asked for.
        type: str
        choices: [scale_out, scale_in]
        required: true
      replicas:
        description: The replicas the service had.
        type: int
        required: true
      desired:
        description: The replica count the run desired, within the bounds.
        type: int
        required: true
      until:
        description: When time alone could change the decision (a stabilization window or a scheduled floor ends), epoch seconds; omit for never.
        type: float
  heartbeat:
    description:
      - With O(state=acquired), start a renewer once the lease is taken - a process of its own that renews the lease every
        O(ttl) / 3 seconds for as long as the C(ansible-playbook) run that took it lives, and ends within a second of it.
        A short O(ttl) (30 to 60 seconds) then covers steps that block for minutes (a drain), and a killed run's lease
        expires within O(ttl); on the control host that ran it, the next run takes it over at once. Unlike an Ansible
        C(async) task, the renewer never outlives the run.
      - Only in a playbook run (the module fails outside C(ansible-playbook)), and not in check mode.
    type: bool
    default: false
  fail_when_busy:
    description:
      - Fail, naming the holder, its reason and when its lease expires, when another holder's live lease still exists
        after O(wait_timeout). When V(false), the module returns RV(acquired=false) without a change.
    type: bool
    default: false
notes:
  - The module runs on the control host; call it with C(delegate_to=localhost) and C(run_once=true).
  - Keep the lease file on a local file system; C(flock) may not work over NFS.
seealso:
  - module: mlfleet.serving.audit_event
    description: Record what a scale run decided, including the decision not to act because the lease was busy.
"""

EXAMPLES = r"""
- name: Take the scale lease, waiting up to 2 minutes for another scale run
  mlfleet.serving.scale_lease:
    path: /var/lib/mlfleet/scale.lease
    reason: "scale_out of resnet18 for alert {{ alert_name | default('started by hand') }}"
    ttl: 900
    wait_timeout: 120
  delegate_to: localhost
  run_once: true
  register: scale_lease

- name: Say why nothing is scaled while another run holds the lease
  ansible.builtin.debug:
    msg: >-
      Not scaling: {{ scale_lease.held_by }} holds the lease ({{ scale_lease.held_reason }})
      for {{ scale_lease.expires_in }} s more
  when: not scale_lease.acquired

- name: Scale out when the lease is ours and the 5 minute cooldown has passed
  when: scale_lease.acquired
  block:
    - name: Report a previous run that ended without giving the lease back
      ansible.builtin.debug:
        msg: "Took over the lease of {{ scale_lease.taken_over.holder }} ({{ scale_lease.taken_over.reason }}), which expired"
      when: scale_lease.taken_over is not none

    - name: Raise the replicas of resnet18
      ansible.builtin.include_tasks: scale_out_replicas.yml
      when: scale_lease.now - (scale_lease.last_actions['resnet18:scale_out'] | default(0)) > 300

  always:
    - name: Give the lease back and record the scale-out
      mlfleet.serving.scale_lease:
        path: /var/lib/mlfleet/scale.lease
        state: released
        holder: "{{ scale_lease.holder }}"
        acted: "{{ ['resnet18:scale_out'] if scaled_out | default(false) else [] }}"
        bounds:
          - {service: resnet18, min: 2, max: 8}
      delegate_to: localhost
      run_once: true

- name: Fail at once when another scale run holds the lease
  mlfleet.serving.scale_lease:
    path: /var/lib/mlfleet/scale.lease
    reason: teardown
    fail_when_busy: true
  delegate_to: localhost
  run_once: true
  register: teardown_lease
"""

RETURN = r"""
holder:
  description: O(holder), or the fresh id the lease was taken with; give it to O(state=released).
  returned: success
  type: str
  sample: control:41327:9f2c4e1ab07d5e63
acquired:
  description: Whether O(holder) holds the lease now (or would, in check mode).
  returned: O(state=acquired)
  type: bool
  sample: true
renewed:
  description: Whether O(holder) held the lease already, so that taking it renewed it.
  returned: O(state=acquired)
  type: bool
  sample: false
taken_over:
  description: The expired lease of another holder that this acquisition replaced, or V(null).
  returned: O(state=acquired)
  type: dict
  contains:
    holder:
      description: Who held it.
      type: str
    reason:
      description: Why it was taken, or V(null).
      type: str
    acquired_at:
      description: When it was taken, epoch seconds.
      type: float
    expires_at:
      description: When it expires or expired, epoch seconds.
      type: float
    run_ended:
      description: Whether it was taken over because the C(ansible-playbook) run that held it had ended, before it expired.
      type: bool
  sample:
    holder: control:40112:5d0c1e9a3b7f2a44
    reason: scale_out of resnet18
    acquired_at: 1714564800.25
    expires_at: 1714565700.25
    run_ended: true
waited:
  description: Seconds spent waiting for another holder's lease.
  returned: O(state=acquired)
  type: float
  sample: 0.0
released:
  description: Whether the call gave the lease back (or would, in check mode). V(false) when another holder, or nobody, held it.
  returned: O(state=released)
  type: bool
  sample: true
held_by:
  description: Who holds the lease after the call, or V(null) when it is free.
  returned: success, and when O(fail_when_busy=true) fails the run
  type: str
  sample: control:41327:9f2c4e1ab07d5e63
held_reason:
  description: The reason stored with the lease RV(held_by) holds, or V(null).
  returned: success, and when O(fail_when_busy=true) fails the run
  type: str
  sample: scale_out of resnet18 for alert ServingLatencyHigh
held_run:
  description: The C(ansible-playbook) process that holds the lease (C(host), C(pid), C(started) in clock ticks since boot), or V(null).
  returned: success, and when O(fail_when_busy=true) fails the run
  type: dict
  sample: {"host": "control", "pid": 40112, "started": 8812345}
expires_at:
  description: When the lease RV(held_by) holds expires, epoch seconds, or V(null) when the lease is free.
  returned: success, and when O(fail_when_busy=true) fails the run
  type: float
  sample: 1714565700.25
expires_in:
  description: Seconds until the lease RV(held_by) holds expires (V(0) when it has expired), or V(null) when the lease is free.
  returned: success, and when O(fail_when_busy=true) fails the run
  type: float
  sample: 900.0
last_actions:
  description:
    - The last action time of each recorded key, epoch seconds.
    - In a template, read a key that may be missing as C(last_actions[key] | default(0)).
  returned: success, and when O(fail_when_busy=true) fails the run
  type: dict
  sample: {"resnet18:scale_out": 1714564500.5, "resnet18:scale_in": 1714561000.0}
floors:
  description:
    - Per service, its highest replica floor that has not expired, with when it ends and why it was set.
    - In a template, read a service that may be missing as C(floors[service].replicas | default(0)).
  returned: success, and when O(fail_when_busy=true) fails the run
  type: dict
  sample: {"resnet18": {"replicas": 4, "until": 1714586400.0, "reason": "schedule peak: 4 replicas 06:00-12:00 UTC"}}
bounds:
  description: Per service, the replica bounds its last recorded run kept it to, and when they were recorded (epoch seconds).
  returned: success, and when O(fail_when_busy=true) fails the run
  type: dict
  sample: {"resnet18": {"min": 2, "max": 8, "at": 1714564500.5}}
settings:
  description: Per service, the effective settings its last recorded run decided with.
  returned: success, and when O(fail_when_busy=true) fails the run
  type: dict
  sample: {"resnet18": {"min": 2, "max": 8, "step": 1, "target_per_replica": 4.0, "max_scale_up": 4}}
quiet:
  description: Per C(<service>:<direction>), the decision not to act its last run recorded, with the time it was recorded (C(at)).
  returned: success, and when O(fail_when_busy=true) fails the run
  type: dict
  sample: {"densenet161:scale_in": {"direction": "scale_in", "replicas": 1, "desired": 1, "until": null, "at": 1714564500.5}}
history:
  description:
    - Per service, the replica counts its runs desired, as C([epoch seconds, replicas]), oldest first; at most an hour
      and 200 entries are kept.
  returned: success, and when O(fail_when_busy=true) fails the run
  type: dict
  sample: {"resnet18": [[1714564500.5, 4], [1714564530.0, 6]]}
renewer_pid:
  description: The PID of the renewer O(heartbeat=true) started; null without one.
  returned: when O(state=acquired)
  type: int
  sample: 4242
now:
  description: The time of the decision, epoch seconds of the control host's wall clock; a cooldown has passed when C(now - last_actions[key]) exceeds it.
  returned: success, and when O(fail_when_busy=true) fails the run
  type: float
  sample: 1714564800.25
"""

import datetime

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.mlfleet.serving.plugins.module_utils._lease import LeaseError, LeaseFile, current_run, new_holder, start_renewer


def argument_spec():
    return dict(
        path=dict(type="path", required=True),
        state=dict(type="str", choices=["acquired", "released"], default="acquired"),
        holder=dict(type="str"),
        ttl=dict(type="int", default=900),
        wait_timeout=dict(type="int", default=0),
        poll_interval=dict(type="float", default=1.0),
        reason=dict(type="str"),
        acted=dict(type="list", elements="str", default=[]),
        floors=dict(
            type="list",
            elements="dict",
            default=[],
            options=dict(
                service=dict(type="str", required=True),
                replicas=dict(type="int", required=True),
                until=dict(type="float", required=True),
                reason=dict(type="str"),
            ),
        ),
        bounds=dict(
            type="list",
            elements="dict",
            default=[],
            options=dict(service=dict(type="str", required=True), min=dict(type="int", required=True), max=dict(type="int", required=True)),
        ),
        desired=dict(
            type="list",
            elements="dict",
            default=[],
            options=dict(service=dict(type="str", required=True), replicas=dict(type="int", required=True)),
        ),
        settings=dict(type="list", elements="dict", default=[]),
        quiet=dict(
            type="list",
            elements="dict",
            default=[],
            options=dict(
                service=dict(type="str", required=True),
                direction=dict(type="str", choices=["scale_out", "scale_in"], required=True),
                replicas=dict(type="int", required=True),
                desired=dict(type="int", required=True),
                until=dict(type="float"),
            ),
        ),
        heartbeat=dict(type="bool", default=False),
        fail_when_busy=dict(type="bool", default=False),
    )


def busy_message(path, result):
    until = datetime.datetime.fromtimestamp(result["expires_at"], datetime.UTC).isoformat(timespec="seconds")
    reason = result["held_reason"] or "no reason given"
    run = result.get("held_run")
    process = f", ansible-playbook PID {run['pid']} on {run['host']}" if run else ""
    return (
        f"the scale lease {path} is held by {result['held_by']} ({reason}{process}) for {result['expires_in']:g} s more, until {until}; "
        f"waited {result['waited']:g} s. Let that run finish or raise wait_timeout; if that run is gone, give the lease back "
        f"with state=released and holder={result['held_by']}"
    )


def main():
    module = AnsibleModule(argument_spec=argument_spec(), required_if=[("state", "released", ("holder",))], supports_check_mode=True)
    params = module.params
    lease = LeaseFile(params["path"])
    for name in ("acted", "floors", "bounds", "desired", "settings", "quiet"):
        if params["state"] == "acquired" and params[name]:
            module.fail_json(msg=f"{name} is recorded when the lease is given back: pass it with state=released")
    try:
        if params["state"] == "released":
            result = lease.release(
                params["holder"],
                params["acted"],
                check_mode=module.check_mode,
                floors=params["floors"],
                bounds=params["bounds"],
                desired=params["desired"],
                settings=params["settings"],
                quiet=params["quiet"],
            )
        else:
            run = current_run()
            result = lease.acquire(
                params["holder"] if params["holder"] is not None else new_holder(run),
                params["ttl"],
                params["reason"],
                wait_timeout=params["wait_timeout"],
                poll_interval=params["poll_interval"],
                check_mode=module.check_mode,
                run=run,
            )
    except LeaseError as error:
        module.fail_json(msg=str(error))
    if params["state"] == "acquired" and not result["acquired"] and params["fail_when_busy"]:
        module.fail_json(msg=busy_message(params["path"], result), **result)
    if params["state"] == "acquired":
        result["renewer_pid"] = None
        if params["heartbeat"] and result["acquired"] and not result["renewed"] and not module.check_mode:
            try:
                result["renewer_pid"] = start_renewer(params["path"], result["holder"], params["ttl"], run)
            except LeaseError as error:
                lease.release(result["holder"])
                module.fail_json(msg=str(error))
    module.exit_json(**result)


if __name__ == "__main__":
    main()
