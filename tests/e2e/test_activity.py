"""Activity against a real torpord: engines' use() blocks reported on the
Attach stream (coalesced), routers' ReportActivity through grpcurl, what
GetModel and torporctl show, and what an engine's end does to it."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from torpor import Client
from torpor.testing import make_checkpoint
from torpor.v1 import common_pb2

from .conftest import Daemon
from .failures import INVALID_ARGUMENT, NOT_FOUND, fail
from .observe import settle

torch = pytest.importorskip("torch")

from torpor.agent import attach  # noqa: E402


@pytest.fixture
def debug_daemon(tmp_path: Path) -> Iterator[Daemon]:
    """A daemon that logs each activity report it receives (at debug)."""
    d = Daemon(tmp_path, config='[log]\nlevel = "debug"\nformat = "json"\n')
    try:
        d.wait_ready()
        yield d
    finally:
        d.kill()


def activity(client: Client, model_id: str) -> common_pb2.Activity:
    return client.get_model(model_id).activity


def reports(d: Daemon, model_id: str) -> list[dict[str, Any]]:
    """The activity reports the daemon received from engines, from its log."""
    found = []
    for line in d.log().splitlines():
        if '"activity reported"' not in line:
            continue
        entry = json.loads(line)
        if entry.get("event") == "activity reported" and entry.get("model_id") == model_id:
            found.append(entry)
    return found


def test_use_blocks_show_up_in_get_model(debug_daemon: Daemon) -> None:
    d = debug_daemon
    ckpt = make_checkpoint(d.models / "m.safetensors", layers=2)
    with Client(socket=str(d.socket)) as client:
        client.load_model("m", str(ckpt))
        before = activity(client, "m")
        assert not before.HasField("last_use_time")  # never used
        assert (before.uses, before.in_use) == (0, 0)
        with attach("m", client=client) as model:
            for _ in range(5):
                with model.use():
                    time.sleep(0.01)  # (some busy time to count)
            assert settle(lambda: activity(client, "m").uses == 5)
            got = activity(client, "m")
            assert got.in_use == 0
            assert got.HasField("last_use_time")
            assert got.uses_last_minute == got.uses_last_hour == got.uses_last_day == 5
            assert got.busy.ToNanoseconds() > 0
            # Nested blocks count once.
            with model.use(), model.use():
                pass
            assert settle(lambda: activity(client, "m").uses == 6)


def test_in_use_while_a_block_is_open(debug_daemon: Daemon) -> None:
    d = debug_daemon
    ckpt = make_checkpoint(d.models / "m.safetensors", layers=2)
    with Client(socket=str(d.socket)) as client:
        client.load_model("m", str(ckpt))
        with attach("m", client=client) as model:
            with model.use():
                assert settle(lambda: activity(client, "m").in_use == 1)
                assert activity(client, "m").uses == 0  # (open, not ended)
            assert settle(lambda: activity(client, "m").in_use == 0)
            assert activity(client, "m").uses == 1


def test_reports_are_coalesced(debug_daemon: Daemon) -> None:
    d = debug_daemon
    ckpt = make_checkpoint(d.models / "m.safetensors", layers=2)
    uses = 3000
    with Client(socket=str(d.socket)) as client:
        client.load_model("m", str(ckpt))
        with attach("m", client=client) as model:
            start = time.monotonic()
            for _ in range(uses):
                with model.use():
                    pass
            assert settle(lambda: activity(client, "m").uses == uses)
            elapsed = time.monotonic() - start
        got = reports(d, "m")
    # At most one report a second (and the first one at once, and the last
    # one on close): never one per use.
    assert 1 <= len(got) <= math.ceil(elapsed) + 2, (len(got), elapsed)
    assert sum(entry["uses"] for entry in got) == uses


def test_an_engine_that_dies_has_no_use_open(debug_daemon: Daemon, tmp_path: Path) -> None:
    d = debug_daemon
    ckpt = make_checkpoint(d.models / "m.safetensors", layers=2)
    script = tmp_path / "holder.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import sys, time
            from torpor import Client
            from torpor.agent import attach
            model = attach("m", client=Client(socket={str(d.socket)!r}))
            with model.use():
                print("held", flush=True)
                time.sleep(3600)
            """
        )
    )
    with Client(socket=str(d.socket)) as client:
        client.load_model("m", str(ckpt))
        holder = subprocess.Popen(
            [sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env=d.env
        )
        try:
            assert holder.stdout is not None and holder.stdout.readline() == "held\n"
            assert settle(lambda: activity(client, "m").in_use == 1)
            holder.kill()
            holder.wait(30)
            assert settle(lambda: client.get_model("m").engines == 0)
            assert settle(lambda: activity(client, "m").in_use == 0)
            assert activity(client, "m").HasField("last_use_time")
        finally:
            holder.kill()
            holder.communicate(timeout=30)


def test_report_activity_through_grpcurl(daemon: Daemon) -> None:
    ckpt = make_checkpoint(daemon.models / "m.safetensors", layers=2)
    daemon.call("torpor.v1.ModelService/LoadModel", {"model_id": "m", "source": str(ckpt)})
    report = {"model_id": "m", "reporter": "router-1", "uses": "3", "busy": "1.5s", "in_use": 2}
    assert daemon.call("torpor.v1.ModelService/ReportActivity", report) == {}
    got = daemon.call("torpor.v1.ModelService/GetModel", {"model_id": "m"})["model"]["activity"]
    assert (got["uses"], got["in_use"], got["busy"]) == ("3", 2, "1.500s")
    assert got["uses_last_minute"] == "3" and "last_use_time" in got
    # A reporter's in_use replaces its last; reporters add up.
    daemon.call("torpor.v1.ModelService/ReportActivity", {"model_id": "m", "reporter": "router-1"})
    daemon.call(
        "torpor.v1.ModelService/ReportActivity",
        {"model_id": "m", "reporter": "router-2", "in_use": 1},
    )
    got = daemon.call("torpor.v1.ModelService/GetModel", {"model_id": "m"})["model"]["activity"]
    assert (got["uses"], got["in_use"]) == ("3", 1)


BAD_REPORTS: dict[str, tuple[dict[str, Any], str]] = {
    # name: (the report's fields over a good one, the field named)
    "negative_uses": ({"uses": "-1"}, "uses"),
    "absurd_uses": ({"uses": str(10**12)}, "uses"),
    "negative_in_use": ({"in_use": -1}, "in_use"),
    "absurd_in_use": ({"in_use": 2**31 - 1}, "in_use"),
    "negative_busy": ({"busy": "-2s"}, "busy"),
    "absurd_busy": ({"busy": "5000000000s"}, "busy"),
    "no_reporter": ({"reporter": ""}, "reporter"),
    "long_reporter": ({"reporter": "r" * 129}, "reporter"),
}


@pytest.mark.parametrize("case", sorted(BAD_REPORTS))
def test_bad_reports_are_invalid_and_change_nothing(daemon: Daemon, case: str) -> None:
    ckpt = make_checkpoint(daemon.models / "m.safetensors", layers=2)
    daemon.call("torpor.v1.ModelService/LoadModel", {"model_id": "m", "source": str(ckpt)})
    fields, named = BAD_REPORTS[case]
    report = {"model_id": "m", "reporter": "router", "uses": "1", "in_use": 1, **fields}
    status = fail(daemon, "ReportActivity", report)
    assert (status["code"], status["reason"]) == (INVALID_ARGUMENT, "INVALID_ACTIVITY")
    assert status["metadata"] == {"field": named}
    got = daemon.call("torpor.v1.ModelService/GetModel", {"model_id": "m"})["model"]["activity"]
    assert "uses" not in got and "in_use" not in got and "last_use_time" not in got


def test_reports_about_unknown_models(daemon: Daemon) -> None:
    report = {"reporter": "router", "uses": "1"}
    status = fail(daemon, "ReportActivity", {"model_id": "nope", **report})
    assert (status["code"], status["reason"]) == (NOT_FOUND, "MODEL_NOT_FOUND")
    status = fail(daemon, "ReportActivity", {"model_id": "../x", **report})
    assert (status["code"], status["reason"]) == (INVALID_ARGUMENT, "INVALID_MODEL_ID")


def test_an_unloaded_model_forgets_its_use(daemon: Daemon) -> None:
    ckpt = make_checkpoint(daemon.models / "m.safetensors", layers=2)
    load = {"model_id": "m", "source": str(ckpt)}
    daemon.call("torpor.v1.ModelService/LoadModel", load)
    daemon.call(
        "torpor.v1.ModelService/ReportActivity",
        {"model_id": "m", "reporter": "router", "uses": "4"},
    )
    daemon.call("torpor.v1.ModelService/UnloadModel", {"model_id": "m"})
    status = fail(daemon, "ReportActivity", {"model_id": "m", "reporter": "router"})
    assert status["reason"] == "MODEL_NOT_FOUND"
    daemon.call("torpor.v1.ModelService/LoadModel", load)
    got = daemon.call("torpor.v1.ModelService/GetModel", {"model_id": "m"})["model"]["activity"]
    assert "uses" not in got  # (neither loaded nor registered in between: a new model)


def test_torporctl_shows_activity_and_causes(daemon: Daemon) -> None:
    ckpt = make_checkpoint(daemon.models / "m.safetensors", layers=2)
    watch = subprocess.Popen(
        [sys.executable, "-m", "torpor.cli", "--socket", str(daemon.socket), "watch"],
        stdout=subprocess.PIPE,
        text=True,
    )
    lines: list[str] = []
    try:
        assert watch.stdout is not None
        lines.append(watch.stdout.readline())  # the snapshot: no models
        daemon.ctl("load", "m", str(ckpt))
        assert "never used" in daemon.ctl("get", "m").stdout
        daemon.call(
            "torpor.v1.ModelService/ReportActivity",
            {"model_id": "m", "reporter": "router", "uses": "7", "busy": "2s", "in_use": 1},
        )
        got = daemon.ctl("get", "m").stdout
        assert "Usage:" in got and "in use 1" in got
        assert "7 uses in the last minute, 7 in the hour, 7 in the day (7 in all)" in got
        assert "busy 2.0s" in got
        assert "load (user) succeeded" in got  # the last transition and its cause
        table = daemon.ctl("list").stdout.splitlines()
        assert "LAST USE" in table[0]
        column = table[0].index("LAST USE")
        assert table[1][column:].startswith("in use")
        daemon.call(
            "torpor.v1.ModelService/ReportActivity", {"model_id": "m", "reporter": "router"}
        )
        table = daemon.ctl("list").stdout.splitlines()
        cell = table[1][column:].split("  ")[0]
        assert cell == "now" or cell.endswith("s ago"), table
        daemon.ctl("sleep", "m")
        while not any("last=sleep (user) succeeded" in line for line in lines):
            line = watch.stdout.readline()
            assert line, "the watch ended"
            lines.append(line)
    finally:
        watch.kill()
        watch.communicate(timeout=30)
    assert any("load (user)" in line for line in lines)
    assert any("transition=sleep (user)" in line for line in lines)
