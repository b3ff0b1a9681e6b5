"""The event source mlfleet.serving.scale_schedule.

The Schedule is pure: tests pass wall-clock times in. main() runs for real against a window that opens a second after
the test starts, in the time zone's local time.
"""

import asyncio
import time
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest
import yaml
from event_source_support import load_event_source

ss = load_event_source("scale_schedule")
PEAK = {"name": "peak", "service": "resnet18", "replicas": 4, "start": "06:00", "end": "12:00"}


def at(text, zone=UTC):
    """Epoch seconds of a local time 'YYYY-MM-DD HH:MM:SS' in ``zone``."""
    return datetime.strptime(text, "%Y-%m-%d %H:%M:%S").replace(tzinfo=zone).timestamp()


def schedule(*entries, **args):
    return ss.parse_args({"schedule": list(entries) or [PEAK], "lead": 120, "repeat_after": 60} | args)


def test_the_first_event_goes_out_lead_seconds_before_the_window():
    plan = schedule(cluster="lab")
    assert plan.events(at("2026-11-25 05:57:59")) == []
    (event,) = plan.events(at("2026-11-25 05:58:00"))
    assert event == {
        "action": "scale_out",
        "status": "firing",
        "service": "resnet18",
        "cluster": "lab",
        "alertname": "ScheduledCapacity",
        "labels": {"action": "scale_out", "service": "resnet18", "schedule": "peak", "cluster": "lab"},
        "min_replicas": 4,
        "until": at("2026-11-25 12:00:00"),
        "values": {
            "min_replicas": 4,
            "window_start": at("2026-11-25 06:00:00"),
            "window_end": at("2026-11-25 12:00:00"),
            "lead_s": 120.0,
            "schedule": "peak",
        },
        "fingerprint": event["fingerprint"],
        "startsAt": "2026-11-25T05:58:00Z",
        "source": "schedule",
    }
    assert len(event["fingerprint"]) == 16 and int(event["fingerprint"], 16) >= 0


def test_events_repeat_every_repeat_after_until_the_window_ends():
    plan = schedule()
    sent = []
    now = at("2026-11-25 05:50:00")
    while now < at("2026-11-25 12:10:00"):
        sent += [(now, event) for event in plan.events(now)]
        now += 1
    times = [when for when, _event in sent]
    assert times[0] == at("2026-11-25 05:58:00")
    assert all(b - a == 60 for a, b in zip(times, times[1:], strict=False))
    assert times[-1] < at("2026-11-25 12:00:00") <= times[-1] + 60
    # One window: one fingerprint, and startsAt stays the first event's time.
    assert {event["fingerprint"] for _when, event in sent} == {sent[0][1]["fingerprint"]}
    assert {event["startsAt"] for _when, event in sent} == {"2026-11-25T05:58:00Z"}


def test_next_wake_is_the_next_moment_an_event_may_fall_due():
    plan = schedule()
    # Far from a window: the clock is read again within 30 s.
    assert plan.next_wake(at("2026-11-25 03:00:00")) == at("2026-11-25 03:00:30")
    assert plan.next_wake(at("2026-11-25 05:57:50")) == at("2026-11-25 05:58:00")
    plan.events(at("2026-11-25 05:58:00"))
    assert plan.next_wake(at("2026-11-25 05:58:10")) == at("2026-11-25 05:58:40")
    assert plan.next_wake(at("2026-11-25 05:58:50")) == at("2026-11-25 05:59:00")


def test_a_source_started_inside_a_window_asks_at_once():
    plan = schedule()
    (event,) = plan.events(at("2026-11-25 09:13:07"))
    assert event["until"] == at("2026-11-25 12:00:00") and event["startsAt"] == "2026-11-25T09:13:07Z"
    assert plan.events(at("2026-11-25 12:00:00")) == []


def test_a_window_past_midnight_ends_the_next_day_and_is_found_from_either_side():
    night = {"service": "resnet18", "replicas": 3, "start": "22:00", "end": "02:00"}
    for now in ("2026-11-25 21:58:00", "2026-11-26 01:59:59"):
        (event,) = schedule(night).events(at(now))
        assert event["values"]["window_start"] == at("2026-11-25 22:00:00")
        assert event["until"] == at("2026-11-26 02:00:00")
        assert event["values"]["schedule"] == "resnet18 22:00-02:00"
    assert schedule(night).events(at("2026-11-26 02:00:00")) == []


def test_days_select_the_days_a_window_starts():
    weekdays = PEAK | {"days": ["Mon", "tue", "wed", "thu", "fri"]}
    # 2026-11-27 is a Friday, 2026-11-28 a Saturday.
    assert schedule(weekdays).events(at("2026-11-27 07:00:00"))
    assert schedule(weekdays).events(at("2026-11-28 07:00:00")) == []
    plan = schedule(weekdays)
    assert plan.next_wake(at("2026-11-28 07:00:00")) == at("2026-11-28 07:00:30")


def test_times_are_local_time_of_the_zone_with_its_daylight_saving():
    london = ZoneInfo("Europe/London")
    plan = schedule(timezone="Europe/London")
    # Summer: 06:00 in London is 05:00 UTC.
    (summer,) = plan.events(at("2026-07-01 05:58:00", london))
    assert summer["values"]["window_start"] == at("2026-07-01 05:00:00")
    (winter,) = schedule(timezone="Europe/London").events(at("2026-12-01 05:58:00", london))
    assert winter["values"]["window_start"] == at("2026-12-01 06:00:00")


def test_overlapping_entries_each_send_their_events():
    late = {"name": "late", "service": "resnet18", "replicas": 6, "start": "10:00", "end": "11:00"}
    events = schedule(PEAK, late).events(at("2026-11-25 10:30:00"))
    assert sorted((e["values"]["schedule"], e["min_replicas"]) for e in events) == [("late", 6), ("peak", 4)]


@pytest.mark.parametrize(
    "args, message",
    [
        ({"schedule": {"service": "resnet18"}}, "schedule must be a list of windows, got dict"),
        ({"schedule": ["resnet18"]}, "schedule[0] must be a mapping with service, replicas, start and end"),
        ({"schedule": [PEAK | {"begin": "06:00"}]}, "schedule[0] has unknown keys begin"),
        ({"schedule": [{"service": "resnet18", "start": "06:00", "end": "07:00"}]}, "schedule[0] lacks replicas"),
        ({"schedule": [PEAK | {"replicas": 0}]}, "schedule[0].replicas must be a whole number of 1 or more, got 0"),
        ({"schedule": [PEAK | {"replicas": True}]}, "schedule[0].replicas must be a whole number of 1 or more, got True"),
        ({"schedule": [PEAK | {"start": "6am"}]}, "schedule[0].start must be a time of day HH:MM or HH:MM:SS such as '08:30', got '6am'"),
        ({"schedule": [PEAK | {"end": "24:00"}]}, "schedule[0].end must be a time of day"),
        ({"schedule": [PEAK | {"end": "06:00"}]}, "starts and ends at 06:00: a window of 24 h is a floor for good"),
        ({"schedule": [PEAK | {"days": "mon"}]}, "schedule[0].days must be a list of weekdays"),
        ({"schedule": [PEAK | {"days": ["mon", "someday"]}]}, "schedule[0].days has ['someday'], which are not weekdays"),
        ({"schedule": [PEAK, PEAK]}, "schedule has several entries named peak; give each a name of its own"),
        ({"schedule": [PEAK], "timezone": "Mars/Olympus"}, "timezone 'Mars/Olympus' is not a time zone of this host's database"),
        ({"schedule": [PEAK], "lead": -1}, "lead must be a number of seconds of 0 or more, got -1"),
        ({"schedule": [PEAK], "repeat_after": 1}, "repeat_after must be a number of seconds of 10 or more, got 1"),
        ({"schedule": [PEAK], "leed": 60}, "arguments leed are unknown"),
    ],
)
def test_bad_arguments_name_the_argument_and_the_fix(args, message):
    with pytest.raises(ValueError) as raised:
        ss.parse_args(args)
    assert message in str(raised.value) and str(raised.value).startswith("mlfleet.serving.scale_schedule: ")


def test_defaults_and_rulebook_arguments():
    plan = ss.parse_args({"schedule": [PEAK], "eda_feedback_queue": object()})
    assert (plan.lead, plan.repeat_after, plan.zone, plan.cluster) == (300.0, 300.0, UTC, None)
    assert ss.parse_args({}).entries == []


def test_the_documentation_matches_the_arguments_and_its_example_parses():
    documentation = yaml.safe_load(ss.DOCUMENTATION)
    options = documentation["options"]
    assert set(options) == set(ss.ARGUMENTS)
    for name, default in ss.ARGUMENTS.items():
        assert options[name].get("default") == default, name
    assert set(options["schedule"]["suboptions"]) == ss.ENTRY_KEYS
    example = yaml.safe_load(ss.EXAMPLES)[0]["sources"][0]["mlfleet.serving.scale_schedule"]
    assert ss.parse_args(example).entries[0].days == frozenset(range(5))


def test_main_puts_the_event_on_the_queue_when_the_window_opens():
    """A real run of main(): a window that opens (lead 0) about 1.5 s from now, in local time of the zone."""
    zone = ZoneInfo("Asia/Kolkata")
    opens = datetime.fromtimestamp(time.time() + 2, zone).replace(microsecond=0)
    closes = datetime.fromtimestamp(opens.timestamp() + 3600, zone)
    entry = {"service": "resnet18", "replicas": 3, "start": opens.strftime("%H:%M:%S"), "end": closes.strftime("%H:%M:%S")}

    async def run():
        queue = asyncio.Queue()
        task = asyncio.create_task(ss.main(queue, {"schedule": [entry], "timezone": "Asia/Kolkata", "lead": 0}))
        try:
            event = await asyncio.wait_for(queue.get(), timeout=10)
            received = time.time()
            # The next event of the window is repeat_after (300 s) away.
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(queue.get(), timeout=1.5)
        finally:
            task.cancel()
        return event, received

    event, received = asyncio.run(run())
    assert event["values"]["window_start"] == opens.timestamp() <= received < opens.timestamp() + 1.5
    assert event["min_replicas"] == 3 and event["until"] == closes.timestamp() and event["received_at"] >= opens.timestamp()
