"""Engine processes for the end-to-end tests: engine_worker.py attached to a
model, the reference logits computed without Torpor, and waiting for a
condition the daemon reaches in the background."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from .conftest import Daemon
from .observe import settle

__all__ = ["PROMPT", "WORKER", "Worker", "reference", "settle"]

WORKER = Path(__file__).with_name("engine_worker.py")
PROMPT = list(b"Torpor keeps weights where engines expect them")


class Worker:
    """engine_worker.py attached to a model (`script`: another way to run it,
    `env`: its environment, this process's if None)."""

    def __init__(
        self,
        d: Daemon,
        model_id: str,
        *flags: str,
        script: Path = WORKER,
        env: dict[str, str] | None = None,
    ) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(script), str(d.socket), model_id, *flags],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.hello = self.read()
        assert self.hello.get("ready"), self.hello

    def read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            _, err = self.proc.communicate(timeout=30)
            raise AssertionError(f"worker exited {self.proc.returncode}:\n{err}")
        value: dict[str, Any] = json.loads(line)
        return value

    def ask(self, command: str) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        while True:  # skip event lines
            answer = self.read()
            if "event" not in answer:
                return answer

    def quit(self) -> None:
        if self.proc.poll() is None:
            self.ask_nowait("quit")
            self.proc.communicate(timeout=60)

    def ask_nowait(self, command: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate(timeout=30)


def reference(path: Path) -> str:
    """The logits' digest computed here, from the file, without Torpor."""
    import torch  # (the engine tests skip where torch is missing)
    from safetensors.torch import load_file
    from torpor.examples.tinylm import TinyConfig, TinyLM

    torch.set_num_threads(1)
    state = load_file(str(path))
    model = TinyLM(TinyConfig.from_state_dict(state))
    model.load_state_dict(state, assign=True)
    with torch.inference_mode():
        logits = model(torch.tensor([PROMPT]))
    return hashlib.sha256(logits.contiguous().numpy().tobytes()).hexdigest()[:16]
