"""Scrubbing under a real torpord: copies corrupted behind its back (a host
slab through /proc/<pid>/fd, a disk cache file) are found before any wake,
the model says so, and a wake serves the source's bytes. The copies are
corrupted as soon as the sleep returns: before the scrubber's first check of
them (core/scrubplan.py's SETTLE seconds on), which is then the one that finds it."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from torpor.testing import make_checkpoint

from .conftest import Daemon
from .residency import check_residency

# The default interval (1h): a new copy is checked within seconds all the same.
SCRUB = '[scrub]\nrate = "1GiB"\n'
MODEL_VIEW = {"view": "MODEL_VIEW_FULL"}


def model(d: Daemon, model_id: str) -> dict[str, Any]:
    got: dict[str, Any] = d.call(
        "torpor.v1.ModelService/GetModel", {"model_id": model_id, **MODEL_VIEW}
    )["model"]
    return got


def call(d: Daemon, method: str, **request: Any) -> Any:
    return d.call(f"torpor.v1.ModelService/{method}", {**request, "wait": True})["model"]


def wait_for_reason(d: Daemon, model_id: str, reason: str) -> dict[str, Any]:
    deadline = time.monotonic() + 30
    while (m := model(d, model_id)).get("state_reason") != reason:
        assert time.monotonic() < deadline, f"no {reason} in 30 s: {m}\n{d.log()}"
        time.sleep(0.05)
    return m


def memfd(pid: int, name: str) -> str:
    """/proc/<pid>/fd/<n> of the daemon's memfd `name` (torpor:{model}:{layer}:{tier})."""
    fd_dir = f"/proc/{pid}/fd"
    for fd in os.listdir(fd_dir):
        try:
            target = os.readlink(f"{fd_dir}/{fd}")
        except FileNotFoundError:
            continue
        if target.removeprefix("/memfd:").removesuffix(" (deleted)") == name:
            return f"{fd_dir}/{fd}"
    raise AssertionError(f"the daemon holds no memfd {name}")


def flip(path: str | Path, at: int) -> None:
    with open(path, "r+b") as f:
        f.seek(at)
        byte = f.read(1)
        f.seek(at)
        f.write(bytes([byte[0] ^ 0x01]))


def scrub_warnings(d: Daemon) -> list[str]:
    return [line for line in d.log().splitlines() if "does not match its checksum" in line]


def test_a_corrupt_host_slab_is_found_before_any_wake(tmp_path: Path) -> None:
    d = Daemon(tmp_path, config=SCRUB)
    try:
        d.wait_ready()
        ckpt = make_checkpoint(d.models / "m", layers=4, shards=2)
        call(d, "LoadModel", model_id="m", source=str(ckpt))
        call(d, "SleepModel", model_id="m", level=1)
        flip(memfd(d.proc.pid, "torpor:m:layers.2:host"), 1000)

        m = wait_for_reason(d, "m", "HOST_COPY_CORRUPT")
        assert m["state"] == "MODEL_STATE_ASLEEP" and m["sleep_level"] == 2
        assert "layers.2" in m["state_message"]
        assert {layer["tier"] for layer in m["layers"]} == {"TIER_SOURCE"}
        check_residency(d, "m")  # (no host slab left)
        shown = d.ctl("get", "m").stdout
        assert "HOST_COPY_CORRUPT" in shown and "layers.2" in shown
        (warning,) = scrub_warnings(d)
        assert "layers.2" in warning and "host" in warning

        m = call(d, "WakeModel", model_id="m")
        assert m["state"] == "MODEL_STATE_ACTIVE" and not m.get("state_reason")
        check_residency(d, "m")  # the source's bytes, bit for bit
        assert d.stop() == 0
    finally:
        d.kill()


def test_a_corrupt_disk_copy_is_found_before_any_wake(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    d = Daemon(tmp_path, config=SCRUB + f'[disk_cache]\npath = "{cache}"\ncapacity = "64MiB"\n')
    try:
        d.wait_ready()
        ckpt = make_checkpoint(d.models / "m", layers=4, shards=2)
        call(d, "LoadModel", model_id="m", source=str(ckpt))
        call(d, "SleepModel", model_id="m", level=2, disk_copy=True)
        files = sorted(cache.glob("*/*.slab"))
        assert len(files) == 6
        flip(files[3], os.path.getsize(files[3]) - 1)  # (its slab's last byte)

        m = wait_for_reason(d, "m", "DISK_COPY_CORRUPT")
        assert m["state"] == "MODEL_STATE_ASLEEP" and m["sleep_level"] == 2
        tiers = [layer["tier"] for layer in m["layers"]]
        assert sorted(tiers) == ["TIER_DISK"] * 5 + ["TIER_SOURCE"]
        assert sorted(cache.glob("*/*.slab")) == files[:3] + files[4:]  # removed
        (warning,) = scrub_warnings(d)
        assert "disk" in warning
        assert "DISK_COPY_CORRUPT" in d.ctl("get", "m").stdout

        m = call(d, "WakeModel", model_id="m", verify=True)
        assert m["state"] == "MODEL_STATE_ACTIVE"
        check_residency(d, "m")
        assert d.stop() == 0
    finally:
        d.kill()


def test_wakes_racing_the_scrubber_over_big_slabs(tmp_path: Path) -> None:
    # ~38 MiB layers at 16 MiB/s: a check is under way whenever the model sleeps.
    d = Daemon(tmp_path, config='[scrub]\nrate = "16MiB"\ninterval = "0s"\n')
    try:
        d.wait_ready()
        ckpt = make_checkpoint(d.models / "big", layers=2, hidden=1400)
        call(d, "LoadModel", model_id="big", source=str(ckpt))
        for _ in range(3):
            call(d, "SleepModel", model_id="big", level=1)
            time.sleep(0.3)  # (not a timing assertion: lets the scrubber get going)
            m = call(d, "WakeModel", model_id="big")
            assert m["state"] == "MODEL_STATE_ACTIVE"
            check_residency(d, "big")
        assert not scrub_warnings(d)
        assert "freeing a slab failed" not in d.log()
        assert "Traceback" not in d.log()
        assert d.stop() == 0
    finally:
        d.kill()


@pytest.mark.parametrize("rate", ["0", "1MiB"])
def test_the_scrubber_runs_only_with_a_rate(tmp_path: Path, rate: str) -> None:
    d = Daemon(tmp_path, config=f'[scrub]\nrate = "{rate}"\n')
    try:
        d.wait_ready()
        d.proc.send_signal(signal.SIGUSR1)  # (the daemon logs every task)
        deadline = time.monotonic() + 30
        while "task_count" not in d.log():
            assert time.monotonic() < deadline, d.log()
            time.sleep(0.05)
        assert ("scrubber: <coroutine" in d.log()) == (rate != "0")
        assert d.stop() == 0
    finally:
        d.kill()
