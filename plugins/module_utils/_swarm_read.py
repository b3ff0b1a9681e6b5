# Copyright (c) mlfleet.serving maintainers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The swarm's nodes, services and tasks, read through one manager and normalised for the planners."""

from __future__ import annotations

from ansible_collections.mlfleet.serving.plugins.module_utils._scale_plan import normalise


def read_swarm(endpoint):
    """The swarm's nodes, services and tasks, normalised; the nodes carry their running tasks per service."""
    client = endpoint.client
    node_records = endpoint.call("Listing nodes (the endpoint must be a manager)", client.nodes)
    service_records = endpoint.call("Listing services", client.services)
    task_records = endpoint.call("Listing tasks", client.tasks, filters={"desired-state": "running"})
    nodes, services, tasks = normalise(node_records, service_records, task_records)
    for node in nodes:
        running = {}
        for task in tasks:
            if task["node_id"] == node["node_id"] and task["state"] == "running":
                running[task["service"]] = running.get(task["service"], 0) + 1
        node["running_tasks"] = running
    return nodes, services, tasks
