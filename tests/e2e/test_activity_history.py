"""The activity history across a real torpord's restart (`[policy] history`):
a registered model's uses and last use survive a SIGTERM and a new start;
a history directory others could change stops the start."""

from __future__ import annotations

import json
import stat
from pathlib import Path

from torpor.testing import make_checkpoint

from .conftest import Daemon

M = "torpor.v1.ModelService/"


def started(root: Path, history: Path, source: Path) -> Daemon:
    config = f'[policy]\nhistory = "{history}"\n[[catalogue]]\nid = "m"\nsource = "{source}"\n'
    d = Daemon(root, config=config)
    d.ready()
    return d


def activity(d: Daemon) -> dict[str, str]:
    got = d.call(M + "GetModel", {"model_id": "m"})["model"]["activity"]
    return {key: got.get(key, "") for key in ("uses", "busy", "last_use_time")}


def test_a_registered_models_activity_survives_a_restart(tmp_path: Path) -> None:
    (tmp_path / "models").mkdir()
    source = make_checkpoint(tmp_path / "models" / "m.safetensors", layers=2)
    history = tmp_path / "state" / "activity.json"
    d = started(tmp_path, history, source)
    try:
        report = {"model_id": "m", "reporter": "router", "uses": "3", "busy": "1.5s"}
        assert d.call(M + "ReportActivity", report) == {}
        before = activity(d)
        assert before["uses"] == "3" and before["last_use_time"]
        assert d.stop() == 0
    finally:
        d.kill()
    assert stat.S_IMODE(history.stat().st_mode) == 0o600
    assert "router" not in history.read_text()  # (open uses and reporters are not kept)

    d = started(tmp_path, history, source)
    try:
        assert activity(d) == before
        shown = d.ctl("get", "m").stdout
        assert "(3 in all)" in shown, shown
        # Another report adds to what came back.
        d.call(M + "ReportActivity", {"model_id": "m", "reporter": "router", "uses": "2"})
        assert activity(d)["uses"] == "5"
        assert d.stop() == 0
    finally:
        d.kill()
    assert json.loads(history.read_text())["models"]["m"]["uses"] == 5


def test_a_history_directory_others_can_write_stops_the_start(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    d = Daemon(tmp_path, config=f'[policy]\nhistory = "{shared / "activity.json"}"\n')
    try:
        assert d.proc.wait(60) == 2
    finally:
        d.kill()
    assert "policy.history" in d.log() and "writable by other users" in d.log()
