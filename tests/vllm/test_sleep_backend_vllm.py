"""The `torpor` sleep-mode backend in real vLLM (a script run by the vLLM
environment's python, against a real torpord): the plugin registers it with
vLLM's factory, the loader's `select` makes it the worker's backend on CUDA
with sleep mode on (and only then), and the object vLLM makes puts the
image of the model it serves to sleep and back."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from ..e2e.conftest import Daemon
from .conftest import HERE, ROOT, VLLM_PYTHON, require_vllm

require_vllm()


def test_vllm_finds_the_backend_and_the_loader_selects_it_on_cuda(
    models: Path, daemon: Daemon
) -> None:
    env = {
        **daemon.env,
        "PYTHONPATH": str(ROOT / "agent"),
        "VLLM_LOGGING_STREAM": "ext://sys.stderr",
    }
    run = subprocess.run(
        [
            str(VLLM_PYTHON),
            str(HERE / "sleep_backend.py"),
            "--socket",
            str(daemon.socket),
            "--model",
            str(models / "llama"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=110,
    )
    lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
    assert run.returncode == 0 and lines, run.stderr[-4000:]
    got = json.loads(lines[-1].removeprefix("RESULT "))

    factory = got["factory"]
    assert factory["registered"] and factory["cumem_still"] == "CuMemBackend"
    # CUDA only: vLLM's factory refuses to make it on this CPU, clearly.
    assert factory["supported"] is False
    assert "'torpor' is not supported on this platform" in factory["create"]

    select = got["select"]
    assert select["default"] == "cumem"
    assert select["cpu"] == [False, "cumem"]
    assert select["cuda_no_sleep_mode"] == [False, "cumem"]
    assert select["cuda"] == [True, "torpor"]
    assert select["other_chosen"] == [False, "cuda_checkpoint"]
    assert "sleep_preserve_parameter_names" in select["preserve"]

    sleep = got["sleep"]
    assert sleep["states"] == ["RUNNING", "SUSPENDED", "RUNNING"]
    assert sleep["asleep"] == ["MODEL_STATE_ASLEEP", 0]
    assert sleep["awake"] == ["MODEL_STATE_ACTIVE", 1]
    assert sleep["same"] is True
    assert sleep["serving_after_the_model_went"] == 0
