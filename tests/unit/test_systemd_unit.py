"""systemd/torpord.service: `systemd-analyze verify` accepts it, and it keeps its essentials."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parents[2] / "systemd" / "torpord.service"


def _directives(text: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        match = re.fullmatch(r"\s*([A-Za-z]+)\s*=\s*(.*?)\s*", line)
        if match and not line.lstrip().startswith(("#", ";")):
            found.setdefault(match.group(1), []).append(match.group(2))
    return found


def _executable() -> str:
    """An executable that exists here, for the test copy's ExecStart."""
    script = Path(sys.executable).parent / "torpord"
    if script.is_file() and os.access(script, os.X_OK):
        return str(script)
    return shutil.which("true") or "/bin/true"


def test_unit_keeps_its_essentials() -> None:
    d = _directives(UNIT.read_text())
    assert d["Type"] == ["notify"]
    assert d["NotifyAccess"] == ["main"]
    assert d["ExecStart"] == ["/usr/local/bin/torpord --config /etc/torpor/torpord.toml"]
    assert d["LimitMEMLOCK"] == ["infinity"]
    assert d["RuntimeDirectory"] == ["torpor"]
    assert d["RuntimeDirectoryMode"] == ["0750"]
    assert d["StateDirectory"] == ["torpor"]
    assert d["Restart"] == ["on-failure"]
    assert d["RestartSec"] == ["2"]
    assert d["KillSignal"] == ["SIGTERM"]
    # The daemon pings from its event loop (torpord.systemd.Watchdog).
    assert d["WatchdogSec"] == ["2min"]
    assert "WatchdogSignal" not in d  # SIGABRT: faulthandler logs the stacks
    assert d["LimitCORE"] == ["0"]  # no dump of the pinned pool on that abort
    assert (d["User"], d["Group"]) == (["torpor"], ["torpor"])
    # Each of these would cut the daemon off from the GPU or from CUDA's JIT.
    for breaks_gpu in ("MemoryDenyWriteExecute", "PrivateDevices", "DeviceAllow", "ProtectClock"):
        assert breaks_gpu not in d, breaks_gpu


def test_stop_timeout_exceeds_the_configured_grace_period() -> None:
    from torpord.config import load_config

    timeout = _directives(UNIT.read_text())["TimeoutStopSec"][0]
    seconds = float(timeout.removesuffix("s"))
    grace = load_config(UNIT.parent / "torpord.toml").server.grace_period
    assert grace < seconds <= grace + 30


def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (needs the systemd package)")
    # verify insists that ExecStart's binary exists; the installed path need not
    # exist here, so the copy points at one that does and keeps the arguments.
    text = re.sub(
        r"(?m)^ExecStart=\S+",
        lambda _: f"ExecStart={_executable()}",
        UNIT.read_text(),
    )
    copy = tmp_path / "torpord.service"
    copy.write_text(text)
    result = subprocess.run(
        [analyze, "verify", "--man=no", str(copy)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "SYSTEMD_LOG_COLOR": "0", "SYSTEMD_PAGER": ""},
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    # verify also reports on unrelated units installed on this machine; only
    # lines about ours matter.
    about_ours = [line for line in output.splitlines() if "torpord" in line]
    assert about_ours == [], output
