"""The catalogue and per-model policies through grpcurl against a real torpord:
config entries, RegisterModel/DeregisterModel, ListModels registered, GetModel
of an UNLOADED entry, LoadModel's policy, SetModelPolicy, INVALID_POLICY."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from torpor.testing import make_checkpoint

from .conftest import Daemon
from .failures import FAILED_PRECONDITION, INVALID_ARGUMENT, NOT_FOUND, fail
from .observe import settle

M = "torpor.v1.ModelService/"
CONFIG = """
[policy.default]
idle_timeout = "10m"
priority = 1
[[catalogue]]
id = "nightly"
source = "{models}/nightly"
priority = 5
pinned = true
windows = ["daily 20:00-02:00", "Sat 10:00-12:00 device lead 10m"]
"""


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    d = Daemon(tmp_path, config=CONFIG.format(models=tmp_path / "models"))
    try:
        d.wait_ready()
        yield d
    finally:
        d.kill()


def policy(model: dict[str, Any]) -> dict[str, Any]:
    got: dict[str, Any] = model["policy"]
    return got


def test_a_config_entry_is_listed_and_got_as_unloaded_with_its_policy(daemon: Daemon) -> None:
    assert daemon.call(M + "ListModels") == {}  # (loaded models only, as before)
    listed = daemon.call(M + "ListModels", {"registered": True})["models"]
    assert [m["model_id"] for m in listed] == ["nightly"]
    got = daemon.call(M + "GetModel", {"model_id": "nightly"})["model"]
    assert got == listed[0]
    assert got["state"] == "MODEL_STATE_UNLOADED" and got["registered"] is True
    assert got["source"]["path"] == str(daemon.models / "nightly")
    p = policy(got)
    assert (p["idle_timeout"], p["priority"], p["pinned"]) == ("600s", 5, True)
    assert (p["idle_level"], p["evict_to"]) == (1, "TIER_HOST")  # every field set
    assert len(p["windows"]) == 8
    sunday = p["windows"][6]  # 20:00 Sunday to 02:00 Monday: past the week's end
    assert sunday == {"start": "590400s", "end": "7200s", "tier": "TIER_HOST", "lead": "300s"}
    assert p["windows"][7] == {
        "start": "468000s",
        "end": "475200s",
        "tier": "TIER_DEVICE",
        "lead": "600s",
    }


def test_register_load_set_policy_deregister(daemon: Daemon) -> None:
    source = make_checkpoint(daemon.models / "demo", layers=2, hidden=32)
    reg = daemon.call(
        M + "RegisterModel",
        {"model_id": "demo", "source": str(source), "policy": {"idle_level": 2, "priority": 3}},
    )["model"]
    assert reg["state"] == "MODEL_STATE_UNLOADED" and reg["registered"]
    assert (policy(reg)["idle_level"], policy(reg)["priority"]) == (2, 3)
    assert policy(reg)["idle_timeout"] == "600s"  # [policy.default]
    # A Load without a source loads the registered one; its policy's fields win.
    loaded = daemon.call(
        M + "LoadModel", {"model_id": "demo", "wait": True, "policy": {"priority": -7}}
    )["model"]
    assert loaded["state"] == "MODEL_STATE_ACTIVE" and loaded["registered"]
    assert (policy(loaded)["idle_level"], policy(loaded)["priority"]) == (2, -7)
    changed = daemon.call(
        M + "SetModelPolicy",
        {"model_id": "demo", "policy": {"pinned": True, "idle_timeout": "0s"}},
    )["model"]
    assert policy(changed)["pinned"] is True and policy(changed)["idle_timeout"] == "0s"
    assert policy(changed)["priority"] == -7  # (unset: kept)
    daemon.call(M + "DeregisterModel", {"model_id": "demo"})
    got = daemon.call(M + "GetModel", {"model_id": "demo"})["model"]
    assert got["state"] == "MODEL_STATE_ACTIVE" and "registered" not in got
    assert policy(got)["pinned"] is True
    again = fail(daemon, "DeregisterModel", {"model_id": "demo"})
    assert (again["code"], again["reason"]) == (NOT_FOUND, "MODEL_NOT_REGISTERED")
    daemon.call(M + "UnloadModel", {"model_id": "demo", "wait": True})
    gone = fail(daemon, "GetModel", {"model_id": "demo"})
    assert (gone["code"], gone["reason"]) == (NOT_FOUND, "MODEL_NOT_FOUND")


def test_registrations_are_kept_in_memory_and_config_entries_come_back(tmp_path: Path) -> None:
    config = CONFIG.format(models=tmp_path / "models")
    d = Daemon(tmp_path, config=config)
    try:
        d.wait_ready()
        source = make_checkpoint(d.models / "x", layers=2, hidden=32)
        d.call(M + "RegisterModel", {"model_id": "extra", "source": str(source)})
        d.call(M + "DeregisterModel", {"model_id": "nightly"})
        listed = d.call(M + "ListModels", {"registered": True})["models"]
        assert [m["model_id"] for m in listed] == ["extra"]
        assert d.stop() == 0
    finally:
        d.kill()
    d = Daemon(tmp_path, config=config)
    try:
        d.wait_ready()
        listed = d.call(M + "ListModels", {"registered": True})["models"]
        assert [m["model_id"] for m in listed] == ["nightly"]
    finally:
        d.kill()


BAD_POLICIES: list[tuple[dict[str, Any], str]] = [
    ({"idle_level": 3}, "policy.idle_level"),
    ({"idle_level": 0}, "policy.idle_level"),
    ({"priority": 5000}, "policy.priority"),
    ({"idle_timeout": "-5s"}, "policy.idle_timeout"),
    ({"idle_timeout": "2600000s"}, "policy.idle_timeout"),
    ({"evict_to": "TIER_DEVICE"}, "policy.evict_to"),
    ({"evict_to": 42}, "policy.evict_to"),
    ({"windows": [{"start": "0s", "end": "0s"}]}, "policy.windows[0].end"),
    ({"windows": [{"start": "604800s", "end": "60s"}]}, "policy.windows[0].start"),
    ({"windows": [{"start": "0s", "end": "60s", "tier": "TIER_DISK"}]}, "policy.windows[0].tier"),
    ({"windows": [{"start": "0s", "end": "60s", "lead": "-1s"}]}, "policy.windows[0].lead"),
    ({"windows": [{"start": "0s", "end": "60s"}] * 65}, "policy.windows"),
]


@pytest.mark.parametrize("method", ["LoadModel", "RegisterModel", "SetModelPolicy"])
def test_a_bad_policy_is_invalid_policy_naming_the_field_and_changes_nothing(
    daemon: Daemon, method: str
) -> None:
    source = make_checkpoint(daemon.models / "demo", layers=2, hidden=32)
    if method == "SetModelPolicy":
        daemon.call(M + "LoadModel", {"model_id": "demo", "source": str(source), "wait": True})
    before = daemon.call(M + "ListModels", {"registered": True})
    for bad, field in BAD_POLICIES:
        request: dict[str, Any] = {"model_id": "demo", "policy": bad}
        if method != "SetModelPolicy":
            request["source"] = str(source)
        status = fail(daemon, method, request)
        assert status["code"] == INVALID_ARGUMENT, (bad, status)
        assert status["reason"] == "INVALID_POLICY", (bad, status)
        assert status["metadata"]["field"] == field, (bad, status)
        assert field in status["message"]
    assert daemon.call(M + "ListModels", {"registered": True}) == before


def test_evict_to_disk_without_a_disk_cache_is_refused(daemon: Daemon) -> None:
    status = fail(
        daemon,
        "RegisterModel",
        {"model_id": "x", "source": str(daemon.models / "x"), "policy": {"evict_to": "TIER_DISK"}},
    )
    assert (status["code"], status["reason"]) == (FAILED_PRECONDITION, "DISK_CACHE_DISABLED")
    assert status["metadata"]["field"] == "policy.evict_to"


def test_register_checks_source_and_device_as_load_does(daemon: Daemon) -> None:
    outside = fail(daemon, "RegisterModel", {"model_id": "x", "source": "/etc/passwd"})
    assert outside["reason"] == "SOURCE_NOT_ALLOWED"
    device = fail(
        daemon,
        "RegisterModel",
        {"model_id": "x", "source": str(daemon.models / "x"), "device": "GPU-none"},
    )
    assert (device["code"], device["reason"]) == (INVALID_ARGUMENT, "UNKNOWN_DEVICE")
    bad_id = fail(daemon, "RegisterModel", {"model_id": "../x", "source": "/x"})
    assert bad_id["reason"] == "INVALID_MODEL_ID"
    assert daemon.call(M + "ListModels", {"registered": True})["models"][0]["model_id"] == (
        "nightly"
    )


def test_register_reads_the_source_as_a_load_does_and_shows_the_models_use(
    daemon: Daemon,
) -> None:
    missing = fail(daemon, "RegisterModel", {"model_id": "x", "source": str(daemon.models / "x")})
    assert (missing["code"], missing["reason"]) == (NOT_FOUND, "SOURCE_NOT_FOUND")
    bad = daemon.models / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}  ")
    invalid = fail(daemon, "RegisterModel", {"model_id": "x", "source": str(bad)})
    assert (invalid["code"], invalid["reason"]) == (INVALID_ARGUMENT, "INVALID_CHECKPOINT")
    assert fail(daemon, "GetModel", {"model_id": "x"})["reason"] == "MODEL_NOT_FOUND"
    # The config's entry, whose source is missing, is kept (its size unknown).
    assert settle(lambda: "can't be read" in daemon.log())
    assert "nightly" in daemon.log() and "SOURCE_NOT_FOUND" in daemon.log()
    source = make_checkpoint(daemon.models / "c10", layers=2, hidden=32)
    daemon.call(M + "RegisterModel", {"model_id": "c10", "source": str(source)})
    daemon.call(M + "ReportActivity", {"model_id": "c10", "reporter": "router", "uses": 100})
    got = daemon.call(M + "GetModel", {"model_id": "c10"})["model"]
    assert got["state"] == "MODEL_STATE_UNLOADED"
    assert got["activity"]["uses"] == "100" and "last_use_time" in got["activity"]


def test_a_catalogue_device_the_backend_does_not_have_stops_the_start(tmp_path: Path) -> None:
    config = f'[[catalogue]]\nid = "x"\nsource = "{tmp_path / "models" / "x"}"\ndevice = "GPU-no"\n'
    d = Daemon(tmp_path, config=config)
    try:
        assert d.proc.wait(60) == 2
        assert "catalogue[0].device" in d.log() and "unknown device" in d.log()
    finally:
        d.kill()


def test_set_model_policy_clears_windows_and_refuses_clear_with_windows(daemon: Daemon) -> None:
    got = daemon.call(M + "GetModel", {"model_id": "nightly"})["model"]
    assert len(policy(got)["windows"]) == 8
    both = fail(
        daemon,
        "SetModelPolicy",
        {
            "model_id": "nightly",
            "clear_windows": True,
            "policy": {"windows": [{"start": "0s", "end": "3600s"}]},
        },
    )
    assert (both["code"], both["reason"]) == (INVALID_ARGUMENT, "INVALID_POLICY")
    assert both["metadata"]["field"] == "clear_windows"
    assert daemon.call(M + "GetModel", {"model_id": "nightly"})["model"] == got  # unchanged
    # An empty list of windows is no change (proto3 can't tell it from none) ...
    kept = daemon.call(
        M + "SetModelPolicy", {"model_id": "nightly", "policy": {"windows": [], "priority": 6}}
    )["model"]
    assert len(policy(kept)["windows"]) == 8 and policy(kept)["priority"] == 6
    # ... clear_windows removes them, and only them.
    cleared = daemon.call(M + "SetModelPolicy", {"model_id": "nightly", "clear_windows": True})
    assert "windows" not in policy(cleared["model"])
    assert policy(cleared["model"])["priority"] == 6 and policy(cleared["model"])["pinned"]
    again = daemon.call(M + "GetModel", {"model_id": "nightly"})["model"]
    assert "windows" not in policy(again)
