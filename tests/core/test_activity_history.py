"""The activity history across restarts (core/activityfile.py): what a reload
gives back, the files refused (each starts the history empty, logged, never
quoting the file), the directory's checks, and the keeper's saves."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import threading
from pathlib import Path
from typing import Any

import pytest
import structlog
from torpord.core.activity import MAX_SAVED, ActivityLog
from torpord.core.activityfile import MAX_BYTES, HistoryFile, HistoryKeeper, decode, encode
from torpord.policies.activity import HOURS_PER_WEEK, Activity
from torpord.storage.cachefiles import UnsafeCacheDir

WEEK = 7 * 86400.0
SECRET = "do-not-echo-me"  # (in refused files: never in a log line)


class Clock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def used_log(clock: Clock, known: set[str]) -> ActivityLog:
    """Uses of "a" and "b" spread over three weeks, one still open."""
    log = ActivityLog(known.__contains__, clock)
    start = clock.now
    for step in range(60):
        clock.now = start + step * 30011.0  # (every hour of the week, over weeks)
        log.record("a", "router", uses=step % 4, busy_seconds=0.25 * step, in_use=0)
        if step % 7 == 0:
            log.record("b", "engine", uses=1, busy_seconds=1.0, in_use=1)
    return log


def reloaded(tmp_path: Path, log: ActivityLog, clock: Clock, known: set[str]) -> ActivityLog:
    file = HistoryFile(tmp_path / "state" / "activity.json")
    assert file.write(log.saved())
    again = ActivityLog(known.__contains__, clock)
    again.restore(HistoryFile(file.path).load())
    return again


def test_a_reload_gives_the_same_summaries(tmp_path: Path) -> None:
    clock, known = Clock(), {"a", "b"}
    log = used_log(clock, known)
    again = reloaded(tmp_path, log, clock, known)
    for model_id in ("a", "b"):
        before, after = log.summary(model_id), again.summary(model_id)
        assert after.weekly == before.weekly and any(after.weekly)
        assert (after.uses, after.busy_seconds, after.last_use, after.recent) == (
            before.uses,
            before.busy_seconds,
            before.last_use,
            before.recent,
        )
    # Open uses belong to the engine that held them, gone with the old daemon.
    assert log.summary("b").in_use == 1 and again.summary("b").in_use == 0
    # And the decay goes on from where it was, as if there had been no restart.
    clock.now += 2 * WEEK
    assert again.summary("a").weekly == pytest.approx(log.summary("a").weekly)


def test_the_file_is_private_and_replaced_whole(tmp_path: Path) -> None:
    clock, known = Clock(), {"a", "b"}
    reloaded(tmp_path, used_log(clock, known), clock, known)
    folder = tmp_path / "state"
    assert stat.S_IMODE(os.stat(folder / "activity.json").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700  # (made by the daemon)
    assert os.listdir(folder) == ["activity.json"]  # (no temporary file left)


def test_records_of_ids_not_known_yet_wait_for_them(tmp_path: Path) -> None:
    clock = Clock()
    log = used_log(clock, {"a", "b"})
    known = {"a"}
    again = reloaded(tmp_path, log, clock, known)
    assert again.summary("b").uses == 0  # (not known: not shown)
    assert set(again.saved()) == {"a", "b"}  # (but kept, for the next start too)
    known.add("b")  # registered (or loaded) since
    assert again.summary("b").uses == log.summary("b").uses
    assert again.of("b").summary(clock.now).uses == log.summary("b").uses


def test_a_loaded_models_record_is_restored_in_place(tmp_path: Path) -> None:
    clock, known = Clock(), {"a", "b"}
    log = used_log(clock, known)
    again = ActivityLog(known.__contains__, clock)
    shared = again.of("a")  # (as the registry does when an image is restored)
    file = HistoryFile(tmp_path / "activity.json")
    file.write(log.saved())
    again.restore(file.load())
    assert shared.summary(clock.now).uses == log.summary("a").uses


def test_only_the_most_recently_used_are_saved() -> None:
    clock = Clock()
    log = ActivityLog(lambda _: True, clock)
    for i in range(MAX_SAVED + 5):
        clock.now += 1
        log.record(f"m{i}", "router", uses=1, busy_seconds=0.0, in_use=0)
    saved = log.saved()
    assert len(saved) == MAX_SAVED and "m0" not in saved and f"m{MAX_SAVED + 4}" in saved


def test_a_clock_gone_back_holds_the_future_at_now() -> None:
    clock, known = Clock(), {"a", "b"}
    log = used_log(clock, known)
    saved = decode(encode(log.saved()))["a"]
    back = clock.now - 3 * 86400.0
    record = Activity()
    record.restore(saved, back)
    summary = record.summary(back)
    assert summary.last_use == back  # (idle timeouts still run)
    assert summary.recent == {60.0: 0, 3600.0: 0, 86400.0: 0}  # (its buckets are to come)
    assert summary.weekly == log.summary("a").weekly
    record.record(back + 10, "router", uses=1, busy_seconds=0.0, in_use=0)
    after = record.summary(back + 10)
    assert after.recent[60.0] == 1 and after.uses == log.summary("a").uses + 1
    assert sum(after.weekly) == pytest.approx(sum(summary.weekly) + 1)


def entry(**over: Any) -> dict[str, Any]:
    good: dict[str, Any] = {
        "last_use": 1.0,
        "uses": 1,
        "busy_seconds": 0.5,
        "weekly_hour": 10,
        "weekly": [0.0] * HOURS_PER_WEEK,
        "rings": [[1, [0] * 60], [None, [0] * 60], [0, [0] * 96]],
    }
    return {**good, **over}


def doc(models: Any) -> bytes:
    return json.dumps({"version": 1, "models": models}).encode()


NAN = b'{"version": 1, "models": {"m": {"last_use": NaN}}}'
BAD: dict[str, bytes] = {
    "garbage": SECRET.encode() + b"\x00\xff{",
    "not_an_object": json.dumps([SECRET]).encode(),
    "other_version": json.dumps({"version": 2, "models": {}}).encode(),
    "nan": NAN,
    "infinity": NAN.replace(b"NaN", b"Infinity"),
    "huge_number": doc({"m": entry(last_use=1e308)}),
    "negative_uses": doc({"m": entry(uses=-1)}),
    "negative_bin": doc({"m": entry(weekly=[-1.0] * HOURS_PER_WEEK)}),
    "float_uses": doc({"m": entry(uses=1.5)}),
    "bool_uses": doc({"m": entry(uses=True)}),
    "string_time": doc({"m": entry(last_use=SECRET)}),
    "short_weekly": doc({"m": entry(weekly=[0.0] * 167)}),
    "bins_without_hour": doc({"m": entry(weekly_hour=None, weekly=[1.0] * HOURS_PER_WEEK)}),
    "short_ring": doc({"m": entry(rings=[[1, [0] * 59], [None, [0] * 60], [0, [0] * 96]])}),
    "missing_key": doc({"m": {k: v for k, v in entry().items() if k != "uses"}}),
    "extra_key": doc({"m": entry(**{SECRET: 1})}),
    "bad_id": doc({f"../{SECRET}": entry()}),
    "too_many": doc({f"m{i}": entry() for i in range(MAX_SAVED + 1)}),
    "deep": b'{"version": 1, "models": ' + b"[" * 100 + b"]" * 100 + b"}",
    "duplicate_key": b'{"version": 1, "version": 1, "models": {}}',
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_refused_file_starts_empty_logged_and_moved_aside(tmp_path: Path, case: str) -> None:
    path = tmp_path / "activity.json"
    path.write_bytes(BAD[case])
    with structlog.testing.capture_logs() as logs:
        assert HistoryFile(path).load() == {}
    assert [e["log_level"] for e in logs] == ["warning"]
    assert SECRET not in repr(logs)
    assert not path.exists() and (tmp_path / "activity.json.bad").read_bytes() == BAD[case]


def test_a_good_entry_is_accepted() -> None:
    # (So that each refused case above is refused for its own fault.)
    assert decode(doc({"m": entry()}))["m"].uses == 1


def test_an_oversized_file_is_refused_before_it_is_read(tmp_path: Path) -> None:
    path = tmp_path / "activity.json"
    with open(path, "wb") as f:
        f.truncate(MAX_BYTES + 1)
    with structlog.testing.capture_logs() as logs:
        assert HistoryFile(path).load() == {}
    assert "more than the" in logs[0]["why"]


def test_a_symlink_is_not_followed(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere.json"
    target.write_bytes(encode({}))
    path = tmp_path / "activity.json"
    path.symlink_to(target)
    with structlog.testing.capture_logs() as logs:
        assert HistoryFile(path).load() == {}
    assert logs[0]["why"] == "it is a symbolic link"
    assert (tmp_path / "activity.json.bad").is_symlink() and target.exists()


def test_a_fifo_does_not_block_the_start(tmp_path: Path) -> None:
    path = tmp_path / "activity.json"
    os.mkfifo(path)
    with structlog.testing.capture_logs() as logs:
        assert HistoryFile(path).load() == {}
    assert logs[0]["why"] == "it is not a regular file"


def test_what_a_crash_in_a_save_left_is_removed(tmp_path: Path) -> None:
    path = tmp_path / "activity.json"
    path.write_bytes(encode({}))
    left = tmp_path / ".activity.json.123.0123abcd.tmp"
    left.write_bytes(b"half a file")
    other = tmp_path / ".other.json.123.0123abcd.tmp"
    other.write_bytes(b"not ours")
    assert HistoryFile(path).load() == {}
    assert not left.exists() and other.exists() and path.exists()


def test_a_missing_file_starts_empty_silently(tmp_path: Path) -> None:
    with structlog.testing.capture_logs() as logs:
        assert HistoryFile(tmp_path / "activity.json").load() == {}
    assert logs == []


def test_an_unsafe_directory_is_refused(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o770)
    with pytest.raises(UnsafeCacheDir, match="writable by other users"):
        HistoryFile(shared / "activity.json")
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    (tmp_path / "link").symlink_to(real)
    with pytest.raises(UnsafeCacheDir, match="symbolic link"):
        HistoryFile(tmp_path / "link" / "activity.json")


async def test_the_keeper_saves_only_what_changed_and_at_close(tmp_path: Path) -> None:
    clock, known = Clock(), {"a"}
    log = ActivityLog(known.__contains__, clock)
    file = HistoryFile(tmp_path / "activity.json")
    keeper = HistoryKeeper(file, log)
    assert keeper.restore() == 0
    assert not await keeper.save()  # (nothing changed: no file written)
    assert not file.path.exists()
    log.record("a", "router", uses=3, busy_seconds=1.0, in_use=0)
    keeper.start()
    await keeper.close()  # (the last save)
    assert decode(file.path.read_bytes())["a"].uses == 3
    again = ActivityLog(known.__contains__, clock)
    assert HistoryKeeper(HistoryFile(file.path), again).restore() == 1
    assert again.summary("a").uses == 3


async def test_a_last_save_that_hangs_does_not_hold_up_the_stop(tmp_path: Path) -> None:
    """A state disk that no longer answers: the close gives up after its
    time (the daemon's grace period), says so, and leaves the write to its
    thread; the next start removes what it left."""
    stuck = threading.Event()

    class Hung(HistoryFile):
        def write(self, saved: dict[str, Any]) -> bool:
            stuck.wait(30)
            return super().write(saved)

    clock, known = Clock(), {"a"}
    log = ActivityLog(known.__contains__, clock)
    keeper = HistoryKeeper(Hung(tmp_path / "activity.json"), log)
    log.record("a", "router", uses=1, busy_seconds=0.0, in_use=0)
    keeper.start()
    with structlog.testing.capture_logs() as logs:
        assert not await asyncio.wait_for(keeper.close(0.2), 10)
    assert [e["event"] for e in logs if e["log_level"] == "error"] == [
        "saving the activity history did not finish within the grace period; not waiting for it"
    ]
    stuck.set()
    # Closed in time, it says so.
    log.record("a", "router", uses=1, busy_seconds=0.0, in_use=0)
    assert await HistoryKeeper(HistoryFile(tmp_path / "activity.json"), log).close(10)
