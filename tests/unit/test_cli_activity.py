"""torporctl's rendering of activity and causes (the CLI against a real
daemon: tests/e2e/test_activity.py)."""

from __future__ import annotations

import time

from google.protobuf import duration_pb2, timestamp_pb2
from torpor.cli import render
from torpor.cli.activity import activity_text, kind_and_cause, last_use_cell
from torpor.cli.format import ago
from torpor.v1 import common_pb2, models_pb2

NOW = 1_800_000_000.0


def used_model(*, in_use: int = 0, last: float | None = NOW - 12) -> common_pb2.Model:
    activity = common_pb2.Activity(
        in_use=in_use,
        uses=1234,
        busy=duration_pb2.Duration(seconds=5, nanos=200_000_000),
        uses_last_minute=3,
        uses_last_hour=40,
        uses_last_day=100,
    )
    if last is not None:
        activity.last_use_time.CopyFrom(timestamp_pb2.Timestamp(seconds=int(last)))
    return common_pb2.Model(model_id="m", state=common_pb2.MODEL_STATE_ACTIVE, activity=activity)


def test_ago() -> None:
    assert [ago(s) for s in (0.2, 12, 61, 7200, 3 * 86400)] == [
        "now",
        "12s ago",
        "1m ago",
        "2h ago",
        "3d ago",
    ]


def test_activity_text() -> None:
    assert activity_text(used_model(in_use=2), now=NOW) == (
        "in use 2, last use 2027-01-15T07:59:48Z (12s ago), 3 uses in the last minute,"
        " 40 in the hour, 100 in the day (1234 in all), busy 5.2s"
    )
    never = common_pb2.Model(activity=common_pb2.Activity(busy=duration_pb2.Duration()))
    assert activity_text(never, now=NOW) == "never used"


def test_last_use_cell() -> None:
    assert last_use_cell(used_model(in_use=1), now=NOW) == "in use"
    assert last_use_cell(used_model(), now=NOW) == "12s ago"
    assert last_use_cell(used_model(last=None), now=NOW) == "-"
    assert last_use_cell(used_model(last=NOW + 5), now=NOW) == "now"  # (clocks apart)


def test_kind_and_cause() -> None:
    sleep = common_pb2.TRANSITION_KIND_SLEEP
    assert kind_and_cause(sleep, common_pb2.CAUSE_IDLE) == "sleep (idle)"
    assert kind_and_cause(sleep, common_pb2.CAUSE_PRESSURE) == "sleep (pressure)"
    assert kind_and_cause(sleep, common_pb2.CAUSE_UNSPECIFIED) == "sleep"  # an older daemon


def test_list_has_a_last_use_column_when_the_daemon_reports_activity() -> None:
    lines = render.model_table([used_model(last=time.time() - 120)]).splitlines()
    assert lines[0].split()[-3:] == ["LAST", "USE", "LAST"]
    column = lines[0].index("LAST USE")
    assert lines[1][column:].split("  ")[0] in ("2m ago", "3m ago")
    old = common_pb2.Model(model_id="m", state=common_pb2.MODEL_STATE_ACTIVE)
    assert "LAST USE" not in render.model_table([old])


def test_get_shows_activity_and_the_last_transitions_cause() -> None:
    model = used_model(last=time.time() - 120)
    model.last_transition.CopyFrom(
        common_pb2.Transition(
            kind=common_pb2.TRANSITION_KIND_SLEEP,
            outcome=common_pb2.OUTCOME_SUCCEEDED,
            cause=common_pb2.CAUSE_IDLE,
        )
    )
    shown = dict(
        line.split(":", 1) for line in render.model_details(model).splitlines() if ":" in line
    )
    assert shown["Usage"].strip().startswith("last use 20")
    assert "m ago), 3 uses in the last minute" in shown["Usage"]
    assert shown["Last"].strip() == "sleep (idle) succeeded"


def test_watch_lines_say_why() -> None:
    model = used_model()
    model.state = common_pb2.MODEL_STATE_SLEEPING
    model.progress.CopyFrom(
        common_pb2.Progress(
            kind=common_pb2.TRANSITION_KIND_SLEEP,
            stage=common_pb2.STAGE_TRANSFER,
            cause=common_pb2.CAUSE_PRESSURE,
        )
    )
    changed = models_pb2.WatchModelsResponse(
        model_event=models_pb2.ModelEvent(type=models_pb2.MODEL_EVENT_TYPE_CHANGED, model=model)
    )
    assert render.event_lines(changed)[0].endswith("transition=sleep (pressure)")
    progress = models_pb2.WatchModelsResponse(
        model_event=models_pb2.ModelEvent(type=models_pb2.MODEL_EVENT_TYPE_PROGRESS, model=model)
    )
    assert render.event_lines(progress) == ["progress  m  sleep (pressure) transfer"]
    model.ClearField("progress")
    model.last_transition.CopyFrom(
        common_pb2.Transition(
            kind=common_pb2.TRANSITION_KIND_SLEEP,
            outcome=common_pb2.OUTCOME_SUCCEEDED,
            cause=common_pb2.CAUSE_IDLE,
        )
    )
    changed.model_event.model.CopyFrom(model)
    assert render.event_lines(changed)[0].endswith("last=sleep (idle) succeeded")
