"""Sources through a real daemon: nothing leaks, nothing hangs, RPCs go on."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
from pathlib import Path
from typing import Any

from torpor.testing import make_checkpoint
from torpord.storage.safetensors import INDEX_FILE, MAX_TENSORS

from .conftest import GRPCURL, Daemon
from .failures import INVALID_ARGUMENT, PERMISSION_DENIED, fail

SECRETS = ("db_password=hunter2", "api_key=SK-123456")


def no_secret(status: dict[str, Any]) -> None:
    text = json.dumps(status)  # message, reason and every metadata key and value
    for secret in SECRETS:
        assert secret not in text, status


def load(d: Daemon, source: Path, model_id: str = "m") -> dict[str, Any]:
    return d.call(
        "torpor.v1.ModelService/LoadModel",
        {"model_id": model_id, "source": str(source), "wait": True},
    )


def test_files_outside_and_file_contents_never_show_in_errors(
    daemon: Daemon, tmp_path: Path
) -> None:
    # The case: an index symlinked to another user's file (mode 600).
    secret = tmp_path / "other-user" / "notes.json"
    secret.parent.mkdir()
    secret.write_text(json.dumps({"weight_map": {SECRETS[0]: SECRETS[1] + ".safetensors"}}))
    secret.chmod(0o600)
    model = make_checkpoint(daemon.models / "linked", layers=1, shards=2)
    (model / INDEX_FILE).unlink()
    (model / INDEX_FILE).symlink_to(secret)
    status = fail(daemon, "LoadModel", {"model_id": "m", "source": str(model)})
    assert (status["code"], status["reason"]) == (PERMISSION_DENIED, "SOURCE_NOT_ALLOWED")
    assert f"resolves to {secret}, which is outside" in status["message"]
    no_secret(status)

    # The same index inside the roots: its names are content, never shown.
    (model / INDEX_FILE).unlink()
    (model / INDEX_FILE).write_text(secret.read_text())
    status = fail(daemon, "LoadModel", {"model_id": "m", "source": str(model)})
    assert (status["code"], status["reason"]) == (INVALID_ARGUMENT, "INVALID_CHECKPOINT")
    assert "weight_map's 1st entry names a file that is missing" in status["message"]
    no_secret(status)

    # A header: names, dtypes, JSON.
    for i, header in enumerate(
        [
            {SECRETS[0]: {"dtype": SECRETS[1], "shape": [1], "data_offsets": [0, 1]}},
            f'{{"{SECRETS[0]}": {{"dtype" "{SECRETS[1]}"}}}}',
        ]
    ):
        body = (header if isinstance(header, str) else json.dumps(header)).encode()
        path = daemon.models / f"bad{i}.safetensors"
        path.write_bytes(struct.pack("<Q", len(body)) + body + b"\0")
        status = fail(daemon, "LoadModel", {"model_id": "m", "source": str(path)})
        assert (status["code"], status["reason"]) == (INVALID_ARGUMENT, "INVALID_CHECKPOINT")
        assert status["metadata"]["file"] == str(path)
        no_secret(status)
    assert daemon.call("torpor.v1.ModelService/ListModels") == {}


def test_fifos_are_refused_and_take_no_worker(daemon: Daemon) -> None:
    sources = []
    for name in ("index", "shard"):
        model = make_checkpoint(daemon.models / name, layers=1, shards=2)
        target = model / (INDEX_FILE if name == "index" else "model-00002-of-00002.safetensors")
        target.unlink()
        os.mkfifo(target)
        sources.append(model)
    for model in sources:
        status = fail(daemon, "LoadModel", {"model_id": "m", "source": str(model)})
        assert (status["code"], status["reason"]) == (INVALID_ARGUMENT, "UNSUPPORTED_SOURCE")
        assert "is a FIFO, not a regular file" in status["message"]
    # More at once than the daemon has io workers (4): none of them is kept.
    calls = [
        subprocess.Popen(
            [
                GRPCURL,
                "-plaintext",
                "-unix",
                "-d",
                json.dumps({"model_id": f"f{i}", "source": str(sources[i % 2])}),
                str(daemon.socket),
                "torpor.v1.ModelService/LoadModel",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(8)
    ]
    for call in calls:
        _, err = call.communicate(timeout=60)
        assert call.returncode != 0 and "InvalidArgument" in err, err
    good = make_checkpoint(daemon.models / "good", layers=2)
    assert load(daemon, good)["model"]["state"] == "MODEL_STATE_ACTIVE"
    # And the daemon stops as ever (it used to hang here, workers blocked).
    assert daemon.stop(signal.SIGTERM, timeout=60) == 0
    assert not daemon.socket.exists()


def many_tensors(path: Path, count: int) -> Path:
    """`count` tensors: one of 16 bytes, the rest zero-byte (the cheapest
    header for many tensors, as the issue's probe wrote it)."""
    parts = ['"w":{"dtype":"U8","shape":[16],"data_offsets":[0,16]}']
    parts += [f'"t{i}":{{"dtype":"U8","shape":[0],"data_offsets":[0,0]}}' for i in range(count - 1)]
    body = ("{" + ",".join(parts) + "}").encode()
    path.write_bytes(struct.pack("<Q", len(body)) + body + bytes(16))
    return path


def test_the_control_plane_answers_while_a_load_at_the_tensor_limit_runs(
    daemon: Daemon,
) -> None:
    source = many_tensors(daemon.models / "limit.safetensors", MAX_TENSORS)
    loading = subprocess.Popen(
        [
            GRPCURL,
            "-plaintext",
            "-unix",
            "-max-time",
            "110",
            "-d",
            json.dumps({"model_id": "big", "source": str(source), "wait": True}),
            str(daemon.socket),
            "torpor.v1.ModelService/LoadModel",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    # Answers that came while the Load was still running (it had not answered).
    during = {"health": 0, "node": 0}
    while loading.poll() is None:
        health = daemon.call("grpc.health.v1.Health/Check")
        node = daemon.call("torpor.v1.NodeService/GetNode")
        if loading.poll() is None:
            assert health == {"status": "SERVING"}
            assert "devices" in node["node"]
            during["health"] += 1
            during["node"] += 1
    out, err = loading.communicate()
    assert loading.returncode == 0, err
    assert json.loads(out)["model"]["state"] == "MODEL_STATE_ACTIVE"
    assert during["health"] >= 5 and during["node"] >= 5, during
    model = daemon.call("torpor.v1.ModelService/GetModel", {"model_id": "big"})["model"]
    assert sum(int(layer.get("tensor_count", 0)) for layer in model["layers"]) == MAX_TENSORS

    over = many_tensors(daemon.models / "over.safetensors", MAX_TENSORS + 1)
    status = fail(daemon, "LoadModel", {"model_id": "over", "source": str(over)})
    assert (status["code"], status["reason"]) == (INVALID_ARGUMENT, "CHECKPOINT_TOO_LARGE")
    assert status["metadata"]["limit"] == str(MAX_TENSORS)


def test_a_text_file_is_said_not_to_be_safetensors(daemon: Daemon) -> None:
    path = daemon.models / "readme.safetensors"
    path.write_text("This model card was saved under the wrong name.\n" * 3)
    status = fail(daemon, "LoadModel", {"model_id": "m", "source": str(path)})
    assert (status["code"], status["reason"]) == (INVALID_ARGUMENT, "INVALID_CHECKPOINT")
    assert "not a safetensors file" in status["message"] and "model card" not in status["message"]
