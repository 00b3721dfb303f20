"""The daemon's activity records: validation, known ids, what snapshots show,
and records kept or dropped as ids come and go."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from torpord.core.activity import MAX_REPORTER, OPEN_USE_LEASE, ActivityLog
from torpord.errors import InvalidArgument, NotFound

from .harness import Harness


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def test_reports_about_known_ids_are_kept() -> None:
    known = {"a"}
    log = ActivityLog(known.__contains__, Clock())
    log.record("a", "router", uses=2, busy_seconds=0.5, in_use=1)
    summary = log.summary("a")
    assert (summary.uses, summary.busy_seconds, summary.in_use) == (2, 0.5, 1)
    log.forget("a", "router")
    assert log.summary("a").in_use == 0
    log.forget("b", "router")  # (nothing recorded: nothing to do)
    assert log.summary("b").uses == 0


def test_a_report_about_an_unknown_id_is_not_found_and_kept_nowhere() -> None:
    log = ActivityLog(set[str]().__contains__, Clock())
    with pytest.raises(NotFound) as err:
        log.record("ghost", "router", uses=1, busy_seconds=0.0, in_use=0)
    assert err.value.reason == "MODEL_NOT_FOUND"
    assert "ghost" not in log and len(log) == 0


@pytest.mark.parametrize(
    ("reporter", "uses", "busy", "in_use", "field"),
    [
        ("", 1, 0.0, 0, "reporter"),
        ("r" * (MAX_REPORTER + 1), 1, 0.0, 0, "reporter"),
        ("r", -1, 0.0, 0, "uses"),
        ("r", 10**12, 0.0, 0, "uses"),
        ("r", 1, -1.0, 0, "busy"),
        ("r", 1, math.nan, 0, "busy"),
        ("r", 1, math.inf, 0, "busy"),
        ("r", 1, 1e12, 0, "busy"),
        ("r", 1, 0.0, -1, "in_use"),
        ("r", 1, 0.0, 10**7, "in_use"),
    ],
)
def test_bad_reports_name_the_field_and_change_nothing(
    reporter: str, uses: int, busy: float, in_use: int, field: str
) -> None:
    log = ActivityLog({"a"}.__contains__, Clock())
    log.record("a", "router", uses=1, busy_seconds=1.0, in_use=1)
    with pytest.raises(InvalidArgument) as err:
        log.record("a", reporter, uses=uses, busy_seconds=busy, in_use=in_use)
    assert (err.value.reason, err.value.metadata) == ("INVALID_ACTIVITY", {"field": field})
    summary = log.summary("a")
    assert (summary.uses, summary.busy_seconds, summary.in_use) == (1, 1.0, 1)


def test_release_drops_only_ids_no_longer_known() -> None:
    known = {"a", "b"}
    log = ActivityLog(known.__contains__, Clock())
    log.record("a", "r", uses=1, busy_seconds=0.0, in_use=0)
    log.record("b", "r", uses=1, busy_seconds=0.0, in_use=0)
    log.release("a")  # still known (registered, say): kept
    assert log.summary("a").uses == 1
    known.discard("a")
    log.release("a")
    assert "a" not in log and log.summary("a").uses == 0
    assert log.summary("b").uses == 1


def test_records_of_forgotten_ids_are_swept_as_the_log_grows() -> None:
    known: set[str] = set()
    log = ActivityLog(known.__contains__, Clock())
    for number in range(5000):
        model_id = f"m{number}"
        known.add(model_id)
        log.record(model_id, "r", uses=1, busy_seconds=0.0, in_use=0)
        known.discard(model_id)  # gone without a release
    assert len(log) <= 1024


async def test_snapshots_show_the_models_activity(h: Harness, ckpt: Path) -> None:
    m = h.manager
    await m.load("m", str(ckpt))
    assert m.get("m").activity.uses == 0
    m.report_activity("m", "router", 3, 1.5, 2)
    snapshot = m.get("m")
    assert (snapshot.activity.uses, snapshot.activity.in_use) == (3, 2)
    assert snapshot.activity.recent[60.0] == 3 and snapshot.activity.last_use > 0
    assert m.list_models()[0].activity.uses == 3
    asleep = await m.sleep("m")  # kept across transitions
    assert asleep.activity.uses == 3
    m.forget_reporter("m", "router")
    assert m.get("m").activity.in_use == 0


async def test_an_unloaded_id_loses_its_record(h: Harness, ckpt: Path) -> None:
    m = h.manager
    await m.load("m", str(ckpt))
    m.report_activity("m", "router", 3, 0.0, 0)
    await m.unload("m")
    assert "m" not in m.activity
    with pytest.raises(NotFound):
        m.report_activity("m", "router", 1, 0.0, 0)
    await m.load("m", str(ckpt))
    assert m.get("m").activity.uses == 0


async def test_bad_ids_are_invalid(h: Harness) -> None:
    with pytest.raises(InvalidArgument) as err:
        h.manager.report_activity("../etc", "router", 1, 0.0, 0)
    assert err.value.reason == "INVALID_MODEL_ID"


def test_a_reporters_lease_ends_its_open_uses_unless_it_reports_again() -> None:
    clock = Clock()
    log = ActivityLog({"a"}.__contains__, clock)
    log.record("a", "router", uses=0, busy_seconds=0.0, in_use=2, lease=OPEN_USE_LEASE)
    log.record("a", "engine-1", uses=0, busy_seconds=0.0, in_use=1)  # an attachment's: no lease
    clock.now += OPEN_USE_LEASE / 2
    log.record("a", "router", uses=1, busy_seconds=1.0, in_use=2, lease=OPEN_USE_LEASE)
    clock.now += OPEN_USE_LEASE * 0.9
    assert log.summary("a").in_use == 3  # refreshed in time
    clock.now += OPEN_USE_LEASE * 0.2
    assert log.summary("a").in_use == 1  # the router vanished: its uses ended
