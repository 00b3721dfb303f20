"""torporctl against a real in-process gRPC server on a Unix socket.

The server is the small fake daemon in fake_daemon.py (shared with
test_client.py): canned models, failures aborted with a real google.rpc.Status +
ErrorInfo, and a WatchModels stream whose messages each test chooses.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from google.protobuf import duration_pb2
from torpor.cli import progress, render
from torpor.cli.format import human_bytes
from torpor.cli.main import main
from torpor.client import Client
from torpor.v1 import common_pb2, models_pb2

from .fake_daemon import GIB, UUID, Daemon


def offloaded_model() -> common_pb2.Model:
    """A model whose layers are spread over every tier."""
    spread = [
        ("pre", common_pb2.TIER_DEVICE),
        ("layers.0", common_pb2.TIER_DEVICE),
        ("layers.1", common_pb2.TIER_HOST),
        ("layers.2", common_pb2.TIER_DISK),
        ("post", common_pb2.TIER_SOURCE),
    ]
    layers = []
    for i, (name, tier) in enumerate(spread):
        on_device = tier == common_pb2.TIER_DEVICE
        layers.append(
            common_pb2.Layer(
                name=name,
                index=i,
                size_bytes=GIB + GIB // 2,
                tier=tier,
                device=f"devices/{UUID}" if on_device else "",
                tensor_count=1,
                checksum=f"{i:016x}",
                tensors=[
                    common_pb2.Tensor(
                        name=f"model.{name}.weight",
                        dtype="BF16",
                        shape=[4096, 96],
                        size_bytes=786432,
                        file_offset=1024 * i,
                    )
                ],
            )
        )
    return common_pb2.Model(
        name="models/llama",
        model_id="llama",
        state=common_pb2.MODEL_STATE_OFFLOADED,
        device=f"devices/{UUID}",
        source=common_pb2.Source(
            path="/models/llama",
            files=[common_pb2.SourceFile(path="/models/llama/model.safetensors")],
            tensor_count=5,
            data_bytes=5 * (GIB + GIB // 2),
        ),
        bytes=common_pb2.TierBytes(
            device_bytes=3 * GIB, host_bytes=GIB + GIB // 2, total_bytes=5 * (GIB + GIB // 2)
        ),
        layers=layers,
        last_transition=common_pb2.Transition(
            kind=common_pb2.TRANSITION_KIND_LOAD,
            outcome=common_pb2.OUTCOME_SUCCEEDED,
            duration=duration_pb2.Duration(seconds=2, nanos=500_000_000),
            bytes=3 * GIB,
            bytes_per_second=5.1e9,
        ),
    )


def asleep_model() -> common_pb2.Model:
    return common_pb2.Model(
        name="models/qwen",
        model_id="qwen",
        state=common_pb2.MODEL_STATE_ASLEEP,
        sleep_level=1,
        bytes=common_pb2.TierBytes(host_bytes=GIB, total_bytes=GIB),
        layers=[common_pb2.Layer(name="pre", size_bytes=GIB, tier=common_pb2.TIER_HOST)],
    )


def progress_event(done: int) -> models_pb2.ModelEvent:
    model = common_pb2.Model(
        model_id="fresh",
        state=common_pb2.MODEL_STATE_LOADING,
        progress=common_pb2.Progress(
            kind=common_pb2.TRANSITION_KIND_LOAD,
            stage=common_pb2.STAGE_READ,
            bytes_done=done,
            bytes_total=4 * GIB,
            layers_done=done // GIB,
            layers_total=4,
            bytes_per_second=6.2e9,
        ),
    )
    return models_pb2.ModelEvent(type=models_pb2.MODEL_EVENT_TYPE_PROGRESS, model=model)


@pytest.fixture
def daemon_models() -> dict[str, common_pb2.Model]:
    return {"llama": offloaded_model(), "qwen": asleep_model()}


# -- rendering -------------------------------------------------------------------


def test_human_bytes() -> None:
    assert human_bytes(0) == "0 B"
    assert human_bytes(1023) == "1023 B"
    assert human_bytes(1536) == "1.5 KiB"
    assert human_bytes(GIB + GIB // 2) == "1.5 GiB"


def test_rates_never_round_to_zero() -> None:
    assert render.rate(5.1e9) == "5.1 GB/s"
    assert render.rate(350e6) == "350 MB/s"
    assert render.rate(420e3) == "420 kB/s"  # not "0 MB/s"


def test_list_gives_an_unload_no_percentage(
    daemon: Daemon, capsys: pytest.CaptureFixture[str]
) -> None:
    unloading = asleep_model()
    unloading.state = common_pb2.MODEL_STATE_UNLOADING
    unloading.progress.CopyFrom(
        common_pb2.Progress(
            kind=common_pb2.TRANSITION_KIND_UNLOAD, stage=common_pb2.STAGE_PREPARE, bytes_total=GIB
        )
    )
    daemon.models.models["qwen"] = unloading
    assert daemon.run("list") == 0
    row = capsys.readouterr().out.splitlines()[2]
    assert row.split()[:2] == ["qwen", "unloading"] and "%" not in row


def test_list_table(daemon: Daemon, capsys: pytest.CaptureFixture[str]) -> None:
    assert daemon.run("list") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == [
        "MODEL", "STATE", "SLEEP", "DEVICE", "DEVICE", "BYTES", "HOST", "BYTES", "LAYERS", "LAST",
    ]  # fmt: skip
    llama, qwen = lines[1].split(), lines[2].split()
    assert llama[:4] == ["llama", "offloaded", "-", UUID]
    assert "3.0 GiB" in lines[1] and "2/5" in lines[1] and "load 2.5s 5.1 GB/s" in lines[1]
    assert qwen[:4] == ["qwen", "asleep", "1", "-"]
    # Aligned: every row starts its STATE column where the header does.
    column = lines[0].index("STATE")
    assert lines[1][column:].startswith("offloaded") and lines[2][column:].startswith("asleep")


def test_get_shows_layers_in_every_tier(daemon: Daemon, capsys: pytest.CaptureFixture[str]) -> None:
    assert daemon.run("get", "llama") == 0
    out = capsys.readouterr().out
    assert "State:" in out and "offloaded" in out
    assert "/models/llama (1 file, 5 tensors, 7.5 GiB)" in out
    table = out[out.index("LAYER") :].splitlines()
    assert table[0].split() == ["LAYER", "TIER", "SIZE", "DEVICE", "CHECKSUM"]
    rows = [line.split() for line in table[1:]]
    assert [row[:2] for row in rows] == [
        ["pre", "device"],
        ["layers.0", "device"],
        ["layers.1", "host"],
        ["layers.2", "disk"],
        ["post", "source"],
    ]
    assert rows[0][2:] == ["1.5", "GiB", UUID, "0000000000000000"]
    assert rows[2][2:] == ["1.5", "GiB", "-", "0000000000000002"]
    assert "model.pre.weight" not in out


def test_get_full_lists_tensors(daemon: Daemon, capsys: pytest.CaptureFixture[str]) -> None:
    assert daemon.run("get", "llama", "--full") == 0
    out = capsys.readouterr().out
    assert "TENSOR" in out
    assert "model.layers.1.weight  BF16   [4096, 96]" in out


def _seconds(value: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromNanoseconds(int(value * 1e9))
    return d


def _phase(stage: common_pb2.Stage.ValueType, wall: float, busy: float) -> common_pb2.Phase:
    return common_pb2.Phase(stage=stage, duration=_seconds(wall), busy=_seconds(busy))


def fields(text: str) -> dict[str, str]:
    """The `Key:  value` lines of a details view."""
    return {
        key: value.strip()
        for key, sep, value in (line.partition(":") for line in text.splitlines())
        if sep and key and " " not in key
    }


def test_phases_show_wall_time_and_label_busy_time() -> None:
    model = asleep_model()
    model.last_transition.CopyFrom(
        common_pb2.Transition(
            kind=common_pb2.TRANSITION_KIND_LOAD,
            outcome=common_pb2.OUTCOME_SUCCEEDED,
            duration=_seconds(3.6),
            bytes=15 * GIB,
            bytes_per_second=15 * GIB / 3.6,
            phases=[
                _phase(common_pb2.STAGE_READ, 3.1, 5.4),  # eight readers, overlapping
                _phase(common_pb2.STAGE_TRANSFER, 3.2, 19.2),
                _phase(common_pb2.STAGE_VERIFY, 0.3, 0.3),
            ],
        )
    )
    shown = fields(render.model_details(model))
    assert shown["Last"] == "load succeeded in 3.6s, 15.0 GiB at 4.5 GB/s"
    assert shown["Phases"] == (
        "read 3.1s, transfer 3.2s, verify 300ms (busy, summed over workers: read 5.4s,"
        " transfer 19.2s)"
    )


def test_phases_of_one_worker_show_one_figure() -> None:
    model = asleep_model()
    model.last_transition.kind = common_pb2.TRANSITION_KIND_WAKE
    model.last_transition.phases.append(_phase(common_pb2.STAGE_TRANSFER, 0.2, 0.2))
    assert fields(render.model_details(model))["Phases"] == "transfer 200ms"


def freed_model() -> common_pb2.Model:
    """Asleep at level 2: its sleep moved nothing and freed its memory."""
    model = asleep_model()
    model.sleep_level = 2
    model.last_transition.CopyFrom(
        common_pb2.Transition(
            kind=common_pb2.TRANSITION_KIND_SLEEP,
            outcome=common_pb2.OUTCOME_SUCCEEDED,
            duration=_seconds(0.012),
            freed_bytes=GIB + GIB // 2,
        )
    )
    return model


def test_a_transition_that_only_frees_shows_no_rate(
    daemon: Daemon, capsys: pytest.CaptureFixture[str]
) -> None:
    daemon.models.models["qwen"] = freed_model()
    assert daemon.run("list") == 0
    assert daemon.run("get", "qwen") == 0
    out = capsys.readouterr().out
    assert "sleep 12ms freed 1.5 GiB" in out  # list's LAST column
    assert fields(out)["Last"] == "sleep succeeded in 12ms, freed 1.5 GiB"
    assert "B/s" not in out.replace("load 2.5s 5.1 GB/s", "")  # (llama's load moved bytes)


def test_progress_of_memory_being_freed_has_no_bar_and_no_rate() -> None:
    unload = common_pb2.Progress(
        kind=common_pb2.TRANSITION_KIND_UNLOAD,
        stage=common_pb2.STAGE_QUIESCE,
        bytes_total=GIB,
        layers_total=4,
    )
    assert render.progress_text(unload) == "unload quiesce, 1.0 GiB to free"
    unload.stage = common_pb2.STAGE_RELEASE
    assert render.progress_text(unload) == "unload release, freeing 1.0 GiB"
    assert progress.bar_line(unload) == "unload release  freeing 1.0 GiB"
    # A level-2 sleep that wrote a disk copy (moving bytes, at a rate), then frees.
    sleep = common_pb2.Progress(
        kind=common_pb2.TRANSITION_KIND_SLEEP,
        stage=common_pb2.STAGE_TRANSFER,
        bytes_done=GIB // 2,
        bytes_total=GIB,
        bytes_per_second=1.5e9,
    )
    assert "[##########..........]   50%" in progress.bar_line(sleep)
    assert "1.5 GB/s" in progress.bar_line(sleep)
    sleep.stage = common_pb2.STAGE_RELEASE
    assert progress.bar_line(sleep) == "sleep release  freeing 1.0 GiB"
    # A move's release comes after every byte moved: its bar stays.
    sleep.bytes_done = GIB
    assert "100%" in progress.bar_line(sleep)


def test_node(daemon: Daemon, capsys: pytest.CaptureFixture[str]) -> None:
    assert daemon.run("node") == 0
    out = capsys.readouterr().out
    assert "Backend:" in out and "cuda" in out
    assert "1.0 GiB used of 64.0 GiB" in out
    assert UUID in out and "NVIDIA H100" in out and "77.0 GiB" in out
    assert "3.0 GiB (1.0 GiB held)" in out  # a revoked engine's memory, until it exits


# -- JSON --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "key"),
    [(["list"], "models"), (["get", "llama"], "model"), (["node"], "node")],
)
def test_json_parses(
    daemon: Daemon, capsys: pytest.CaptureFixture[str], argv: list[str], key: str
) -> None:
    assert daemon.run("--json", *argv) == 0
    document = json.loads(capsys.readouterr().out)
    assert key in document


def test_json_is_grpcurl_shaped(daemon: Daemon, capsys: pytest.CaptureFixture[str]) -> None:
    # Global flags work after the command too.
    assert daemon.run("get", "llama", "--json") == 0
    model = json.loads(capsys.readouterr().out)["model"]
    assert model["model_id"] == "llama"
    assert model["state"] == "MODEL_STATE_OFFLOADED"
    assert model["bytes"]["device_bytes"] == str(3 * GIB)


# -- mutations ---------------------------------------------------------------------


def test_load_sends_what_was_asked(
    daemon: Daemon,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    monkeypatch.chdir(tmp_path)
    argv = ["load", "fresh", "ckpt", "--host", "--device", UUID, "--no-wait", "--request-id", "r1"]
    assert daemon.run(*argv) == 0
    assert daemon.models.requests[-1] == models_pb2.LoadModelRequest(
        model_id="fresh",
        source=str(tmp_path / "ckpt"),
        device=UUID,
        target_tier=common_pb2.TIER_HOST,
        wait=False,
        request_id="r1",
    )
    assert "loading" in capsys.readouterr().out


def test_sleep_and_offload_arguments(daemon: Daemon, capsys: pytest.CaptureFixture[str]) -> None:
    assert daemon.run("sleep", "llama", "--level", "2") == 0
    assert "asleep (level 2)" in capsys.readouterr().out
    assert daemon.run("offload", "llama", "layers.0", "post", "--tier", "device") == 0
    sleep, offload = daemon.models.requests
    assert sleep == models_pb2.SleepModelRequest(model_id="llama", level=2, wait=True)
    assert offload == models_pb2.OffloadModelRequest(
        model_id="llama", layers=["layers.0", "post"], tier=common_pb2.TIER_DEVICE, wait=True
    )


class PatientBar(progress.ProgressBar):
    """Waits (briefly) for the events the fake sends before the bar is stopped."""

    expect = 0

    def stop(self, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + 5
        while self.drawn < self.expect and time.monotonic() < deadline:
            time.sleep(0.01)
        super().stop(timeout)


def test_progress_bar_draws_then_clears(
    daemon: Daemon, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    daemon.models.events = [progress_event(GIB), progress_event(3 * GIB)]
    daemon.models.hold_watch = True
    PatientBar.expect = 2
    monkeypatch.setattr(progress, "wanted", lambda stream: True)
    monkeypatch.setattr(progress, "ProgressBar", PatientBar)
    assert daemon.run("load", "fresh", "/models/fresh") == 0
    captured = capsys.readouterr()
    assert "load read [" in captured.err
    assert "75%" in captured.err and "3.0 GiB / 4.0 GiB" in captured.err
    assert "6.2 GB/s" in captured.err
    assert captured.err.endswith("\r\x1b[K")
    assert "Model:" in captured.out and "active" in captured.out


@pytest.mark.parametrize("hold", [False, True])
def test_progress_bar_without_progress_events(
    daemon: Daemon,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    hold: bool,
) -> None:
    daemon.models.hold_watch = hold
    monkeypatch.setattr(progress, "wanted", lambda stream: True)
    assert daemon.run("sleep", "llama") == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    assert "asleep (level 1)" in captured.out


def test_progress_bar_thread_survives_and_stops(daemon: Daemon) -> None:
    daemon.models.hold_watch = True
    with Client(socket=daemon.socket) as client:
        stream = _Stream()
        bar = progress.ProgressBar(client, "llama", stream)  # type: ignore[arg-type]
        bar.start()
        time.sleep(0.1)
        bar.stop()
    assert bar.drawn == 0 and bar.error is None and stream.text == ""
    assert not any(t.name.startswith("torporctl-progress") for t in threading.enumerate())


def test_no_bar_when_stderr_is_not_a_terminal(
    daemon: Daemon, capsys: pytest.CaptureFixture[str]
) -> None:
    daemon.models.events = [progress_event(GIB)]
    assert daemon.run("load", "fresh", "/models/fresh") == 0
    assert capsys.readouterr().err == ""


class _Stream:
    def __init__(self) -> None:
        self.text = ""

    def write(self, text: str) -> int:
        self.text += text
        return len(text)

    def flush(self) -> None:
        pass


# -- watch -------------------------------------------------------------------------


def test_watch_prints_snapshot_and_events(
    daemon: Daemon, capsys: pytest.CaptureFixture[str]
) -> None:
    changed = asleep_model()
    changed.state = common_pb2.MODEL_STATE_WAKING
    daemon.models.events = [
        models_pb2.ModelEvent(type=models_pb2.MODEL_EVENT_TYPE_CHANGED, model=changed),
        progress_event(GIB),
    ]
    assert daemon.run("watch") == 3  # the stream ended: torpord went away
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert captured.err == (
        f"torporctl: error: torpord ended the watch (shutting down or restarting?):"
        f" unix:{daemon.socket}\n"
    )
    assert len(lines) == 4
    assert "snapshot  llama  offloaded" in lines[0]
    assert "snapshot  qwen  asleep (level 1)" in lines[1]
    assert "changed  qwen  waking" in lines[2]
    assert "progress  fresh  load read 1.0 GiB / 4.0 GiB (25%)" in lines[3]


def test_watch_json_lines(daemon: Daemon, capsys: pytest.CaptureFixture[str]) -> None:
    daemon.models.events = [progress_event(GIB)]
    assert daemon.run("--json", "watch", "qwen") == 3
    captured = capsys.readouterr()
    assert "torpord ended the watch" in captured.err  # stderr: stdout stays JSON lines
    first, second = (json.loads(line) for line in captured.out.splitlines())
    assert [m["model_id"] for m in first["snapshot"]["models"]] == ["qwen"]
    assert second["model_event"]["type"] == "MODEL_EVENT_TYPE_PROGRESS"


def test_watch_ctrl_c_exits_zero(
    daemon: Daemon, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    class Interrupted:
        cancelled = False

        def __iter__(self) -> Interrupted:
            return self

        def __next__(self) -> models_pb2.WatchModelsResponse:
            raise KeyboardInterrupt

        def cancel(self) -> None:
            self.cancelled = True

    watch = Interrupted()
    monkeypatch.setattr(Client, "watch_models", lambda self, model_id="": watch)
    assert daemon.run("watch") == 0
    assert watch.cancelled
    assert capsys.readouterr().err == ""  # the user stopped it: nothing to say


def test_watch_of_a_daemon_that_dies_exits_3(
    daemon: Daemon, capsys: pytest.CaptureFixture[str]
) -> None:
    daemon.models.hold_watch = True
    done: list[int] = []
    watcher = threading.Thread(target=lambda: done.append(daemon.run("watch")))
    watcher.start()
    deadline = time.monotonic() + 10
    while not any(isinstance(r, models_pb2.WatchModelsRequest) for r in daemon.models.requests):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    daemon.stop()  # no goodbye: the stream breaks
    watcher.join(30)
    assert done == [3]
    err = capsys.readouterr().err
    assert err.startswith("torporctl: error:") and "UNAVAILABLE" in err
    assert "Traceback" not in err


# -- errors and exit codes ---------------------------------------------------------


def test_server_error_exits_1(daemon: Daemon, capsys: pytest.CaptureFixture[str]) -> None:
    assert daemon.run("get", "missing") == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.splitlines() == [
        "torporctl: error: model 'missing' not found (NOT_FOUND MODEL_NOT_FOUND)",
        "  model_id: missing",
    ]


def test_server_error_metadata(daemon: Daemon, capsys: pytest.CaptureFixture[str]) -> None:
    assert daemon.run("--json", "load", "big", "/models/huge") == 1
    err = capsys.readouterr().err
    assert "(RESOURCE_EXHAUSTED INSUFFICIENT_DEVICE_MEMORY)" in err
    assert "  asked: 85899345920\n  free: 1073741824" in err
    assert "Traceback" not in err


def test_deadline_exceeded_exits_1_with_a_hint(
    daemon: Daemon, capsys: pytest.CaptureFixture[str]
) -> None:
    assert daemon.run("--timeout", "0.2", "load", "slow", "/models/slow") == 1
    err = capsys.readouterr().err
    assert "(DEADLINE_EXCEEDED)" in err and "torporctl watch slow" in err


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["frobnicate"],
        ["get"],
        ["sleep", "llama", "--level", "3"],
        ["offload", "llama", "--tier", "tape"],
        ["--timeout", "-1", "list"],
        ["--socket", "/a.sock", "--address", "127.0.0.1:1", "list"],
        ["--socket", "/a.sock", "list", "--address", "127.0.0.1:1"],
    ],
)
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    assert "usage:" in capsys.readouterr().err


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    assert "watch" in capsys.readouterr().out


def test_unreachable_socket_exits_3(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    socket = tmp_path / "nobody-home.sock"
    assert main(["--socket", str(socket), "list"]) == 3
    captured = capsys.readouterr()
    first = captured.err.splitlines()[0]
    assert first.startswith(f"torporctl: error: cannot reach torpord on socket {socket}")
    assert first.endswith(": No such file or directory (UNAVAILABLE DAEMON_UNAVAILABLE)")
    assert "Traceback" not in captured.err


def test_default_socket_from_environment(
    daemon: Daemon, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORPOR_SOCKET", str(daemon.socket))
    assert main(["list"]) == 0
    assert "llama" in capsys.readouterr().out


def test_python_dash_m(tmp_path: Path) -> None:
    env = {**os.environ, "TORPOR_SOCKET": str(tmp_path / "none.sock")}
    done = subprocess.run(
        [sys.executable, "-m", "torpor.cli", "list"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert done.returncode == 3, done.stderr
    assert "none.sock" in done.stderr and "Traceback" not in done.stderr


def test_wake_and_unload(daemon: Daemon, capsys: pytest.CaptureFixture[str]) -> None:
    assert daemon.run("wake", "qwen") == 0
    assert "State:   active" in capsys.readouterr().out
    assert daemon.run("unload", "qwen", "--no-wait", "--json") == 0
    model = json.loads(capsys.readouterr().out)["model"]
    assert (model["model_id"], model["state"]) == ("qwen", "MODEL_STATE_UNLOADING")
    assert daemon.models.requests == [
        models_pb2.WakeModelRequest(model_id="qwen", wait=True),
        models_pb2.UnloadModelRequest(model_id="qwen", wait=False),
    ]
    assert daemon.run("get", "qwen") == 1


def test_unload_says_the_model_is_gone(daemon: Daemon, capsys: pytest.CaptureFixture[str]) -> None:
    assert daemon.run("unload", "llama") == 0
    out = capsys.readouterr().out
    assert out == "Unloaded model 'llama' (freed 7.5 GiB in 12ms)\n"
    assert "unloading" not in out and "GB/s" not in out


def test_unload_json_says_the_model_is_gone(
    daemon: Daemon, capsys: pytest.CaptureFixture[str]
) -> None:
    assert daemon.run("--json", "unload", "qwen") == 0
    model = json.loads(capsys.readouterr().out)["model"]
    assert model["state"] == "MODEL_STATE_UNLOADED"
    assert model["last_transition"]["freed_bytes"] == str(GIB)
    assert "bytes_per_second" not in model["last_transition"]


def test_unload_force_is_sent(daemon: Daemon) -> None:
    assert daemon.run("unload", "qwen", "--force") == 0
    assert daemon.models.requests == [
        models_pb2.UnloadModelRequest(model_id="qwen", wait=True, force=True)
    ]


def test_verify_is_sent_with_wake_and_offload(daemon: Daemon) -> None:
    assert daemon.run("wake", "qwen", "--verify") == 0
    wake = [r for r in daemon.models.requests if isinstance(r, models_pb2.WakeModelRequest)]
    assert wake[-1].verify
    assert daemon.run("offload", "llama", "--tier", "device", "--verify") == 0
    offload = [r for r in daemon.models.requests if isinstance(r, models_pb2.OffloadModelRequest)]
    assert offload[-1].verify and offload[-1].tier == common_pb2.TIER_DEVICE
