"""Real torpord processes on Unix sockets in temporary directories."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from torpor import Client

BIN = Path(sys.executable).parent
GRPCURL = str(BIN / "grpcurl")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (now)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Daemon:
    """One torpord process, started with its own config, socket and notify socket."""

    def __init__(
        self,
        root: Path,
        config: str = "",
        args: tuple[str, ...] = (),
        roots: tuple[Path, ...] = (),
        capacity: str = "256MiB",
        backend: str | None = None,
        env: dict[str, str] | None = None,
        server: str = "",
        launcher: tuple[str, ...] = (),
    ) -> None:
        """`backend`: the config's [backend] tables (two emulated host devices
        if None); `env`: the daemon's environment (this process's if None);
        `server`: more lines for its [server] table; `launcher`: a command
        that execs its arguments (the daemon's command line)."""
        self.root = root
        self.socket = root / "run" / "torpor.sock"
        self.models = root / "models"
        self.models.mkdir(parents=True, exist_ok=True)
        self.log_path = root / "torpord.log"
        self.config_path = root / "torpord.toml"
        self.config_path.write_text(
            "version = 1\n"
            f'[server]\nsocket = "{self.socket}"\ngrace_period = "5s"\n{server}'
            f"[sources]\nallowed_roots = {json.dumps([str(p) for p in (self.models, *roots)])}\n"
            + (
                backend
                if backend is not None
                else '[backend]\nkind = "host"\n[backend.host]\ndevices = 2\n'
                f'device_capacity = "{capacity}"\n'
            )
            + f'[host_pool]\ncapacity = "{capacity}"\n'
            + config
        )
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify_path = root / "notify.sock"
        self.notify_path.unlink(missing_ok=True)
        self.notify.bind(str(self.notify_path))
        self.notify.settimeout(30)
        self.env = dict(os.environ if env is None else env)  # (for its engines too)
        env = {**self.env, "NOTIFY_SOCKET": str(self.notify_path), "PYTHONUNBUFFERED": "1"}
        self._log = open(self.log_path, "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [*launcher, sys.executable, "-m", "torpord", "--config", str(self.config_path), *args],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        self.notifications: list[str] = []

    def wait_ready(self) -> None:
        deadline = time.monotonic() + 30
        while "READY=1" not in self.notifications:
            if self.proc.poll() is not None:
                raise AssertionError(f"torpord exited {self.proc.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"torpord not ready in 30 s:\n{self.log()}")
            self.notifications += self.notify.recv(4096).decode().split("\n")

    def ready(self) -> Daemon:
        """`wait_ready`, killing the process if it never gets there; itself."""
        try:
            self.wait_ready()
        except BaseException:
            self.kill()
            raise
        return self

    def read_notifications(self, timeout: float = 10) -> list[str]:
        self.notify.settimeout(timeout)
        got: list[str] = []
        try:
            while True:
                got += self.notify.recv(4096).decode().split("\n")
        except TimeoutError:
            pass
        self.notifications += got
        return got

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def grpcurl(
        self, *args: str, data: dict[str, Any] | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        cmd = [GRPCURL, "-plaintext", "-unix"]
        if data is not None:
            cmd += ["-d", json.dumps(data)]
        cmd += [str(self.socket), *args]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        if check and out.returncode != 0:
            raise AssertionError(f"{cmd} failed ({out.returncode}):\n{out.stderr}\n{out.stdout}")
        return out

    def call(self, method: str, data: dict[str, Any] | None = None) -> dict[str, Any]:
        """A grpcurl call; its JSON answer."""
        out = self.grpcurl(method, data=data or {})
        result: dict[str, Any] = json.loads(out.stdout)
        return result

    def ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "torpor.cli", "--socket", str(self.socket), *args]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        if check and out.returncode != 0:
            raise AssertionError(f"{cmd} failed ({out.returncode}):\n{out.stderr}\n{out.stdout}")
        return out

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        finally:
            self.read_notifications(timeout=0.2)
            self._log.close()
            self.notify.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if not self._log.closed:
            self._log.close()
            self.notify.close()


def with_disk_cache(root: Path, **kw: Any) -> Daemon:
    """A daemon on `root` with a 64 MiB disk cache in `root/cache` (kept
    across restarts: another daemon on the same root finds it)."""
    cache = root / "cache"
    cache.mkdir(mode=0o700, exist_ok=True)
    config = f'[disk_cache]\npath = "{cache}"\ncapacity = "64MiB"\n'
    return Daemon(root, config=config, **kw)


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    d = Daemon(tmp_path)
    try:
        d.wait_ready()
        yield d
    finally:
        d.kill()


@pytest.fixture
def client(daemon: Daemon) -> Iterator[Client]:
    """A client of the `daemon` fixture (whichever a module defines)."""
    with Client(socket=str(daemon.socket)) as c:
        yield c
