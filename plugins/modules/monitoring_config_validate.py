#!/usr/bin/python
# Copyright (c) mlfleet.serving maintainers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: monitoring_config_validate
short_description: Check rendered Grafana provisioning, dashboards and a Telegraf configuration before they are deployed
version_added: 0.1.0
description:
  - Reads a directory laid out like Grafana's (C(provisioning/datasources), C(provisioning/dashboards),
    C(provisioning/alerting)) and, optionally, a C(telegraf.conf), and fails when anything in them is wrong.
  - Data source files are checked for their names, types, access modes, UIDs, one default data source per org and,
    for InfluxDB, the settings its query language (InfluxQL, Flux or SQL) needs.
  - Dashboard provider files are checked, and every C(*.json) dashboard under each provider's C(options.path) (mapped
    to a local directory with O(path_map)) is checked for its UID, panel ids, grid positions, query refIds and that
    every data source it uses is provisioned.
  - Alerting files are checked for alert rules (conditions, queries on provisioned data sources, expressions that
    refer to existing queries, states, durations, required labels), contact points (known integrations and the
    settings each needs, webhook authentication, HMAC and TLS), notification policies (matchers, durations,
    receivers that exist), templates and mute timings.
  - The Telegraf configuration is parsed as TOML after Telegraf's C(${VAR}) substitution and checked for its
    C([agent]) settings, known plugin names, the settings of the InfluxDB outputs and the Prometheus and Docker
    inputs, and at least one input and one output.
  - Every error names the file, the path inside it and what to change. All errors are reported, not only the first.
  - It runs on the control host and never changes anything.
author:
  - mlfleet.serving maintainers (@mlfleet)
requirements:
  - Python 3.11 or later (for C(tomllib)) on the host that runs the module.
  - PyYAML.
extends_documentation_fragment:
  - mlfleet.serving.attributes
attributes:
  check_mode:
    support: full
    details:
      - The module only reads; it checks the same way in check mode.
  diff_mode:
    support: none
  idempotent:
    support: full
options:
  grafana_dir:
    description:
      - The rendered directory that holds C(provisioning/) as Grafana reads it (for example C(/etc/grafana) on a
        Grafana host).
    type: path
    required: true
  path_map:
    description:
      - Maps directories as Grafana sees them to where they are on this host, for each dashboard provider's
        C(options.path) (typically a path inside the Grafana container).
      - The longest matching prefix wins. A path no entry maps is read as it is; a relative one, under O(grafana_dir).
    type: dict
    default: {}
  telegraf_conf:
    description:
      - A rendered Telegraf configuration file to check as well.
    type: path
  required_rule_labels:
    description:
      - Label keys every alert rule must carry, because the notification policies route on them.
      - Set to V([]) to require none.
    type: list
    elements: str
    default: [action, service, cluster]
notes:
  - Data source UIDs from the data source files are the only ones dashboards and alert rules may use (besides
    Grafana's built-in ones, expressions and template variables); contact point names from the alerting files (and
    Grafana's default C(grafana-default-email)) are the only receivers policies may route to.
  - Values Grafana or Telegraf take from the environment (C($VAR), C(${VAR})) are accepted wherever a format is
    checked, since their value is not known here.
seealso:
  - name: Provision Grafana
    description: Grafana's provisioning file formats.
    link: https://grafana.com/docs/grafana/latest/administration/provisioning/
  - name: Use configuration files to provision alerting resources
    description: Grafana's alerting provisioning file formats.
    link: https://grafana.com/docs/grafana/latest/alerting/set-up/provision-alerting-resources/file-provisioning/
  - name: Telegraf configuration
    description: Telegraf's configuration file format.
    link: https://github.com/influxdata/telegraf/blob/master/docs/CONFIGURATION.md
"""

EXAMPLES = r"""
- name: Check the rendered Grafana provisioning, its dashboards and the Telegraf configuration
  mlfleet.serving.monitoring_config_validate:
    grafana_dir: /srv/monitoring/rendered/grafana
    path_map:
      /var/lib/grafana/dashboards/mlfleet: /srv/monitoring/rendered/grafana/dashboards
    telegraf_conf: /srv/monitoring/rendered/telegraf/telegraf.conf
  delegate_to: localhost
  run_once: true

- name: Check only the Grafana side, without requiring any rule label
  mlfleet.serving.monitoring_config_validate:
    grafana_dir: /srv/monitoring/rendered/grafana
    required_rule_labels: []
  delegate_to: localhost
  register: monitoring_check

- name: Show which files were checked
  ansible.builtin.debug:
    var: monitoring_check.checked
"""

RETURN = r"""
checked:
  description: The files that were checked, relative to O(grafana_dir) where they are under it.
  returned: always
  type: list
  elements: str
  sample:
    - provisioning/datasources/mlfleet.yaml
    - provisioning/dashboards/mlfleet.yaml
    - dashboards/serving.json
    - provisioning/alerting/rules.yaml
    - /srv/monitoring/rendered/telegraf/telegraf.conf
errors:
  description:
    - "Every problem found, as C(<file>: <path inside the file>: <what is wrong and what to do>)."
    - Empty when the module succeeds.
  returned: always
  type: list
  elements: str
  sample:
    - "provisioning/alerting/rules.yaml: groups[0].rules[1].condition: 'C' is not the refId of any data entry; use one of A, B"
"""


from ansible.module_utils.basic import AnsibleModule, missing_required_lib

from ansible_collections.mlfleet.serving.plugins.module_utils._monitoring_validate import (
    TOMLLIB_IMPORT_ERROR,
    YAML_IMPORT_ERROR,
    validate_tree,
)


def summary(errors, checked):
    shown = "; ".join(errors[:5])
    more = f" (and {len(errors) - 5} more, see errors)" if len(errors) > 5 else ""
    return f"{len(errors)} problem(s) in the monitoring configuration ({len(checked)} file(s) checked): {shown}{more}"


def main():
    module = AnsibleModule(
        argument_spec=dict(
            grafana_dir=dict(type="path", required=True),
            path_map=dict(type="dict", default={}),
            telegraf_conf=dict(type="path"),
            required_rule_labels=dict(type="list", elements="str", default=["action", "service", "cluster"]),
        ),
        supports_check_mode=True,
    )
    if TOMLLIB_IMPORT_ERROR:
        module.fail_json(msg=missing_required_lib("tomllib (Python 3.11 or later)"), exception=TOMLLIB_IMPORT_ERROR)
    if YAML_IMPORT_ERROR:
        module.fail_json(msg=missing_required_lib("PyYAML"), exception=YAML_IMPORT_ERROR)
    path_map = {str(source): str(target) for source, target in module.params["path_map"].items()}
    result = validate_tree(
        module.params["grafana_dir"],
        telegraf_conf=module.params["telegraf_conf"],
        required_labels=module.params["required_rule_labels"],
        path_map=path_map,
    )
    if result["errors"]:
        module.fail_json(msg=summary(result["errors"], result["checked"]), changed=False, **result)
    module.exit_json(changed=False, **result)


if __name__ == "__main__":
    main()
