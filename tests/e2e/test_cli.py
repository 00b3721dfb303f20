"""torporctl against a real torpord: every command, watch, errors, exit codes."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from typing import Any

from torpor.testing import make_checkpoint

from .conftest import Daemon


def test_torporctl_drives_the_whole_lifecycle_and_watch_sees_it(daemon: Daemon) -> None:
    ckpt = make_checkpoint(daemon.models / "demo", layers=4, hidden=128, shards=2)
    watch = subprocess.Popen(
        [sys.executable, "-m", "torpor.cli", "--socket", str(daemon.socket), "--json", "watch"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        first = json.loads(watch.stdout.readline())  # type: ignore[union-attr]
        assert first == {"snapshot": {}}
        out = daemon.ctl("load", "demo", str(ckpt)).stdout
        assert "active" in out and "layers.3" in out
        assert "active" in daemon.ctl("list").stdout
        assert "asleep (level 1)" in daemon.ctl("sleep", "demo").stdout
        daemon.ctl("wake", "demo")
        out = daemon.ctl("sleep", "demo", "--level", "2").stdout
        assert "sleep (user) succeeded in " in out and ", freed " in out
        assert "B/s" not in out  # it moved nothing: no rate
        daemon.ctl("wake", "demo")
        out = daemon.ctl("offload", "demo", "layers.1", "post", "--tier", "host").stdout
        assert "offloaded" in out
        got = json.loads(daemon.ctl("--json", "get", "demo").stdout)["model"]
        tiers = {layer["name"]: layer["tier"] for layer in got["layers"]}
        assert tiers == {
            "pre": "TIER_DEVICE", "layers.0": "TIER_DEVICE", "layers.1": "TIER_HOST",
            "layers.2": "TIER_DEVICE", "layers.3": "TIER_DEVICE", "post": "TIER_HOST",
        }  # fmt: skip
        daemon.ctl("offload", "demo", "--tier", "device")
        node = json.loads(daemon.ctl("--json", "node").stdout)["node"]
        assert int(node["devices"][0].get("used_bytes", 0)) + int(
            node["devices"][1].get("used_bytes", 0)
        ) == int(got["bytes"]["total_bytes"])
        out = daemon.ctl("unload", "demo", "--force").stdout  # (idle: force changes nothing)
        assert out.startswith("Unloaded model 'demo' (freed ") and "unloading" not in out
        # Watch: wait until the removal arrives, then stop it as a user would.
        events: list[dict[str, Any]] = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = watch.stdout.readline()  # type: ignore[union-attr]
            assert line, watch.stderr.read()  # type: ignore[union-attr]
            event = json.loads(line)["model_event"]
            events.append(event)
            if event["type"] == "MODEL_EVENT_TYPE_REMOVED":
                break
        watch.send_signal(signal.SIGINT)
        assert watch.wait(10) in (0, 130)
    finally:
        watch.kill()
        watch.communicate()  # waits, and closes the pipes
    changes = [e for e in events if e["type"] != "MODEL_EVENT_TYPE_PROGRESS"]
    states = [e["model"]["state"].removeprefix("MODEL_STATE_").lower() for e in changes]
    assert states == [
        "loading", "loading", "active",  # added, loading, loaded
        "sleeping", "asleep", "waking", "active",
        "sleeping", "asleep", "waking", "active",
        "offloading", "offloaded", "offloading", "active",
        "unloading", "unloaded",  # unloading, removed
    ]  # fmt: skip
    residency = [
        "".join(layer["tier"].removeprefix("TIER_")[0] for layer in e["model"]["layers"])
        for e in changes
    ]
    assert residency[2] == "DDDDDD"  # loaded
    assert residency[4] == "HHHHHH"  # asleep, level 1
    assert residency[8] == "SSSSSS"  # asleep, level 2
    assert residency[12] == "DDHDDH"  # offloaded
    assert any(e["type"] == "MODEL_EVENT_TYPE_PROGRESS" for e in events)


def test_torporctl_errors_and_exit_codes(daemon: Daemon) -> None:
    out = daemon.ctl("get", "ghost", check=False)
    assert out.returncode == 1
    assert "MODEL_NOT_FOUND" in out.stderr and "Traceback" not in out.stderr
    out = daemon.ctl("load", "x", "/etc/hostname", check=False)
    assert out.returncode == 1 and "PERMISSION_DENIED" in out.stderr
    out = daemon.ctl("sleep", "ghost", "--level", "7", check=False)
    assert out.returncode == 2
    out = subprocess.run(
        [sys.executable, "-m", "torpor.cli", "--socket", str(daemon.root / "nobody.sock"), "list"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 3 and "nobody.sock" in out.stderr


def test_watch_says_when_torpord_goes_away(daemon: Daemon) -> None:
    watch = subprocess.Popen(
        [sys.executable, "-m", "torpor.cli", "--socket", str(daemon.socket), "watch"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert "snapshot" in watch.stdout.readline()  # type: ignore[union-attr]
        assert daemon.stop() == 0
        _, err = watch.communicate(timeout=30)
    finally:
        watch.kill()
        watch.communicate()
    assert watch.returncode == 3
    assert err.startswith("torporctl: error: torpord ended the watch") and "Traceback" not in err


def test_phases_and_freed_bytes_over_the_api(daemon: Daemon) -> None:
    ckpt = make_checkpoint(daemon.models / "demo", layers=4, hidden=128, shards=2)
    daemon.ctl("load", "demo", str(ckpt))
    got = daemon.call("torpor.v1.ModelService/GetModel", {"model_id": "demo"})["model"]
    last = got["last_transition"]
    took = float(last["duration"].removesuffix("s"))
    assert [p["stage"] for p in last["phases"]] == ["STAGE_READ", "STAGE_VERIFY"]
    for phase in last["phases"]:
        wall, busy = (float(phase[k].removesuffix("s")) for k in ("duration", "busy"))
        assert wall <= took and busy >= wall - 1e-6  # (each rounded to the microsecond)
    total = got["bytes"]["total_bytes"]
    assert last["bytes"] == total and "freed_bytes" not in last
    gone = daemon.call("torpor.v1.ModelService/UnloadModel", {"model_id": "demo", "wait": True})
    model = gone["model"]
    assert model["state"] == "MODEL_STATE_UNLOADED"
    assert model["last_transition"]["freed_bytes"] == total
    assert "bytes" not in model["last_transition"]  # it moved nothing ...
    assert "bytes_per_second" not in model["last_transition"]  # ... so it has no rate
