"""torporctl stats and NodeService.GetStats against a real torpord: the
counts equal what was done, per model and for every model, failures apart;
filters; bad input; help."""

from __future__ import annotations

import json
import re
from typing import Any

from torpor.testing import make_checkpoint

from .conftest import Daemon
from .failures import INVALID_ARGUMENT, fail

GET_STATS = "torpor.v1.NodeService/GetStats"


def seconds(d: str) -> float:
    return float(d.removesuffix("s"))


def counts(response: dict[str, Any]) -> dict[tuple[str, str], tuple[int, int]]:
    """(model, kind) -> (count, failed), from a GetStatsResponse as JSON."""
    return {
        (row.get("model_id", ""), row["kind"].removeprefix("TRANSITION_KIND_").lower()): (
            row["count"],
            row.get("failed_count", 0),
        )
        for row in response.get("transitions", [])
    }


def section(text: str, title: str) -> dict[str, list[str]]:
    """The rows of the table under `title` in torporctl stats' text, by model."""
    lines = text.split("\n")
    start = lines.index(title) + 2  # (the title, then the header)
    rows: dict[str, list[str]] = {}
    for line in lines[start:]:
        if not line:
            break
        cells = line.split()
        rows[cells[0]] = cells[1:]
    return rows


def do_the_work(daemon: Daemon) -> None:
    """a: 1 load, 3 sleeps, 3 wakes (one by an Acquire); b: 1 load, 1 sleep,
    1 wake that is refused (its source changed: rolled back), 1 unload.
    Acquires of a: one hit, one that waits for its wake."""
    a = make_checkpoint(daemon.models / "a", layers=4, hidden=128, shards=2)
    b = make_checkpoint(daemon.models / "b.safetensors", layers=2)
    daemon.ctl("load", "a", str(a))
    daemon.ctl("load", "b", str(b))
    for _ in range(2):
        daemon.ctl("sleep", "a")
        daemon.ctl("wake", "a")
    assert daemon.ctl("acquire", "a").stdout.startswith("hit:")
    daemon.ctl("sleep", "a")
    assert daemon.ctl("acquire", "a").stdout.startswith("miss:")
    daemon.ctl("sleep", "b", "--level", "2")
    data = bytearray(b.read_bytes())
    data[-1] ^= 0x55
    b.write_bytes(bytes(data))
    refused = daemon.ctl("wake", "b", check=False)
    assert refused.returncode == 1 and "SOURCE_CHANGED" in refused.stderr
    daemon.ctl("unload", "b")


def test_stats_count_what_was_done_per_model_and_overall(daemon: Daemon) -> None:
    do_the_work(daemon)
    got = json.loads(daemon.ctl("--json", "stats").stdout)
    assert counts(got) == {
        ("", "load"): (2, 0),
        ("", "sleep"): (4, 0),
        ("", "wake"): (4, 1),
        ("", "unload"): (1, 0),
        ("a", "load"): (1, 0),
        ("a", "sleep"): (3, 0),
        ("a", "wake"): (3, 0),
        ("b", "load"): (1, 0),
        ("b", "sleep"): (1, 0),
        ("b", "wake"): (1, 1),
        ("b", "unload"): (1, 0),
    }
    assert list(counts(got))[:4] == [("", "load"), ("", "sleep"), ("", "wake"), ("", "unload")]
    for row in got["transitions"]:
        ok = row["count"] - row.get("failed_count", 0)
        assert row.get("succeeded_count", 0) == ok
        if not ok:  # b's wake: nothing to time
            assert "duration" not in row and "bytes" not in row
            continue
        d = row["duration"]
        assert d["count"] == ok
        figures = [seconds(d[q]) for q in ("p50", "p95", "p99", "max")]
        assert figures[0] > 0 and figures == sorted(figures)
        assert 0 < seconds(d["mean"]) <= figures[-1]
    rows = {(r.get("model_id", ""), r["kind"]): r for r in got["transitions"]}
    a_wake = rows["a", "TRANSITION_KIND_WAKE"]
    assert int(a_wake["bytes"]) > 0 and a_wake["median_bytes_per_second"] > 0
    assert [
        (r.get("model_id", ""), r["count"], r.get("hit_count", 0)) for r in got["acquires"]
    ] == [
        ("", 2, 1),
        ("a", 2, 1),
    ]
    window = got["window"]
    assert (window["transition_count"], window["transition_capacity"]) == (11, 4096)
    assert (window["acquire_count"], window["acquire_capacity"]) == (2, 1024)
    assert window["start_time"] <= window["end_time"]  # (RFC 3339, both UTC)

    # The same history through grpcurl and server reflection.
    direct = daemon.call(GET_STATS)
    assert (direct["transitions"], direct["acquires"]) == (got["transitions"], got["acquires"])

    # The text: a table per kind, every model first; a failed wake's figures are "-".
    text = daemon.ctl("stats").stdout
    assert re.match(r"History: 11 transitions since \S+Z \(.*\), 2 acquires", text)
    assert "full" not in text.split("\n")[0]
    wake = section(text, "wake")
    assert list(wake) == ["(all)", "a", "b"]
    assert wake["(all)"][:2] == ["4", "1"] and wake["a"][:2] == ["3", "0"]
    assert wake["b"] == ["1", "1", "-", "-", "-", "-", "-", "-"]
    assert list(section(text, "unload")) == ["(all)", "b"]  # (b is gone; its history stays)
    acquire = section(text, "acquire (time to ready)")
    assert [cells[:2] for cells in acquire.values()] == [["2", "50%"], ["2", "50%"]]


def test_stats_filters_and_history_outlives_an_unload(daemon: Daemon) -> None:
    do_the_work(daemon)
    only_b = json.loads(daemon.ctl("--json", "stats", "b").stdout)  # (b is unloaded)
    assert counts(only_b) == {
        ("b", "load"): (1, 0),
        ("b", "sleep"): (1, 0),
        ("b", "wake"): (1, 1),
        ("b", "unload"): (1, 0),
    }
    assert "acquires" not in only_b  # b had none
    wakes = json.loads(daemon.ctl("--json", "stats", "--kind", "wake").stdout)
    assert counts(wakes) == {("", "wake"): (4, 1), ("a", "wake"): (3, 0), ("b", "wake"): (1, 1)}
    assert "acquires" not in wakes
    direct = daemon.call(GET_STATS, {"model_id": "a", "kind": "TRANSITION_KIND_SLEEP"})
    assert counts(direct) == {("a", "sleep"): (3, 0)}
    assert direct["window"]["transition_count"] == 11  # the whole history's window
    text = daemon.ctl("stats", "a", "--kind", "load").stdout
    assert list(section(text, "load")) == ["a"] and "\nwake\n" not in text

    # An id with no history: empty figures, not NOT_FOUND.
    ghost = daemon.ctl("stats", "ghost")
    assert ghost.returncode == 0
    assert "No transitions or acquires of model 'ghost' in this history." in ghost.stdout
    assert "transitions" not in json.loads(daemon.ctl("--json", "stats", "ghost").stdout)
    assert (
        "No offload transitions in this history." in daemon.ctl("stats", "--kind", "offload").stdout
    )


def test_stats_refuse_bad_input_naming_it(daemon: Daemon) -> None:
    bad = daemon.ctl("stats", "--kind", "nap", check=False)
    assert bad.returncode == 2 and "--kind" in bad.stderr and "'nap'" in bad.stderr
    bad = daemon.ctl("stats", "no/slash", check=False)
    assert bad.returncode == 1
    assert "INVALID_MODEL_ID" in bad.stderr and "'no/slash'" in bad.stderr
    status = fail(daemon, "GetStats", {"kind": 99}, service="NodeService")
    assert (status["code"], status["reason"]) == (INVALID_ARGUMENT, "INVALID_TRANSITION_KIND")
    assert status["metadata"] == {"field": "kind", "value": "99"}
    status = fail(daemon, "GetStats", {"model_id": "no/slash"}, service="NodeService")
    assert (status["code"], status["reason"]) == (INVALID_ARGUMENT, "INVALID_MODEL_ID")
    status = fail(daemon, "GetStats", {"model_id": "x" * 300}, service="NodeService")
    assert (status["code"], status["reason"]) == (INVALID_ARGUMENT, "FIELD_TOO_LONG")


def test_stats_help_and_an_empty_history(daemon: Daemon) -> None:
    helped = daemon.ctl("stats", "--help").stdout
    assert "P50/P95/P99" in helped and "--kind" in helped and "MODEL_ID" in helped
    assert re.search(r"^\s+stats\s+counts and P50", daemon.ctl("--help").stdout, re.M)
    text = daemon.ctl("stats").stdout
    assert text.startswith("History: 0 transitions, 0 acquires")
    assert "No transitions or acquires in this history." in text
