"""duration_seconds parses what Grafana and Telegraf write; alert_delay adds the worst case of every phase."""

from __future__ import annotations

import pytest
from ansible.errors import AnsibleFilterError


def alert_delay(timings):
    # Imported when the test runs, not when pytest collects this file: importing the collection before
    # test_proxmox_inventory installs Ansible's collection loader would break that loader.
    from ansible_collections.mlfleet.serving.plugins.filter.alert_delay import alert_delay as plugin

    return plugin(timings)


def duration_seconds(value):
    from ansible_collections.mlfleet.serving.plugins.filter.alert_delay import duration_seconds as plugin

    return plugin(value)


DEFAULTS = {
    "scrape_interval": "10s",
    "flush_interval": "10s",
    "flush_jitter": "0s",
    "query_window": "30s",
    "evaluation_interval": "10s",
    "for": "2m",
    "group_wait": "5s",
    "group_interval": "10s",
}


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("10s", 10), ("2m", 120), ("1h30m", 5400), ("500ms", 0.5), ("1d", 86400), ("45", 45), (30, 30), ("1.5m", 90)],
)
def test_durations(text, seconds):
    assert duration_seconds(text) == seconds


@pytest.mark.parametrize("text", ["", "ten seconds", "10 s", "5x", "m5", True])
def test_bad_durations_name_the_value(text):
    with pytest.raises(AnsibleFilterError, match="is not a duration; write one like 10s"):
        duration_seconds(text)


def test_the_role_defaults_give_190_seconds_for_a_two_minute_rule():
    delay = alert_delay(DEFAULTS)
    assert [phase["name"] for phase in delay["phases"]] == ["sample", "flush", "window", "evaluation", "for", "notification"]
    assert [phase["seconds"] for phase in delay["phases"]] == [10, 10, 30, 10, 120, 10]
    assert delay["worst_seconds"] == 190


def test_the_notification_phase_is_the_larger_of_group_wait_and_group_interval():
    assert alert_delay({**DEFAULTS, "group_wait": "30s"})["worst_seconds"] == 210
    # Grafana's defaults (group_wait 30s, group_interval 5m): the five minutes the dissertation saw.
    assert alert_delay({**DEFAULTS, "group_wait": "30s", "group_interval": "5m"})["worst_seconds"] == 480


def test_missing_timings_are_named():
    with pytest.raises(AnsibleFilterError, match="group_interval"):
        alert_delay({key: value for key, value in DEFAULTS.items() if key != "group_interval"})
