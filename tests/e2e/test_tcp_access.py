"""Who may call torpord over TCP: a real daemon per mode, real grpcurl and torporctl.

Token (plaintext on loopback), mutual TLS, TLS with a token, and the start-up
refusals. A refused call must change nothing: each test checks the daemon's
models over its Unix socket (where no credentials are needed) afterwards.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from torpor import Client, TorporError
from torpor.testing import make_checkpoint

from .conftest import GRPCURL, Daemon, free_port
from .tls import Pki, make_pki

LOAD = "torpor.v1.ModelService/LoadModel"
UNLOAD = "torpor.v1.ModelService/UnloadModel"
LIST = "torpor.v1.ModelService/ListModels"
HEALTH = "grpc.health.v1.Health/Check"


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path / "pki")


def secret_file(path: Path, text: str, mode: int = 0o640) -> Path:
    path.write_text(text + "\n")
    os.chmod(path, mode)
    return path


def start(tmp_path: Path, server: str) -> tuple[Daemon, str]:
    """A ready torpord with `server` lines in [server]; its TCP address."""
    address = f"127.0.0.1:{free_port()}"
    d = Daemon(tmp_path, server=f'tcp = "{address}"\n{server}')
    d.ready()
    return d, address


@pytest.fixture
def stop() -> Iterator[list[Daemon]]:
    daemons: list[Daemon] = []
    yield daemons
    for d in daemons:
        d.kill()


def grpcurl(
    address: str,
    method: str,
    *flags: str,
    data: dict[str, Any] | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    cmd = [GRPCURL, "-format-error", *flags, "-d", json.dumps(data or {}), address, method]
    environ = {**os.environ, **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=environ)


def refusal(out: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    """The status grpcurl -format-error printed for a failed call."""
    assert out.returncode != 0, out.stdout
    status: dict[str, Any] = json.loads(out.stderr[out.stderr.index("{") :])
    return status


def reason(status: dict[str, Any]) -> str:
    (info,) = [d for d in status.get("details", []) if d["@type"].endswith("ErrorInfo")]
    assert info["domain"] == "torpor.dev"
    found: str = info["reason"]
    return found


def model_ids(d: Daemon) -> list[str]:
    """The daemon's models, asked over its Unix socket (no credentials there)."""
    return [m["model_id"] for m in d.call(LIST).get("models", [])]


def ctl(
    address: str, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "torpor.cli", "--address", address, *args]
    environ = {k: v for k, v in os.environ.items() if k != "TORPOR_TOKEN_FILE"}
    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=60, env={**environ, **(env or {})}
    )


def test_token_over_loopback(tmp_path: Path, stop: list[Daemon]) -> None:
    token = secrets.token_hex(32)
    wrong = secrets.token_hex(32)
    token_file = secret_file(tmp_path / "token", token)
    d, address = start(tmp_path, f'token_file = "{token_file}"\n')
    stop.append(d)
    ckpt = make_checkpoint(d.models / "m", layers=2, hidden=64)
    # As the README says: the token from the environment, not the command line.
    out = grpcurl(
        address,
        LOAD,
        "-plaintext",
        "-expand-headers",
        "-H",
        "authorization: Bearer ${TORPOR_TOKEN}",
        data={"model_id": "m", "source": str(ckpt), "wait": True},
        env={"TORPOR_TOKEN": token},
    )
    assert out.returncode == 0, out.stderr
    assert model_ids(d) == ["m"]

    # No token, a wrong one, a wrong scheme: UNAUTHENTICATED with a reason, nothing unloaded.
    for flags, expected in [
        (("-plaintext",), "TOKEN_MISSING"),
        (("-plaintext", "-H", f"authorization: Bearer {wrong}"), "TOKEN_INVALID"),
        (("-plaintext", "-H", f"authorization: Basic {token}"), "TOKEN_INVALID"),
    ]:
        status = refusal(grpcurl(address, UNLOAD, *flags, data={"model_id": "m", "force": True}))
        assert status["code"] == 16, status  # UNAUTHENTICATED
        assert reason(status) == expected
        assert wrong not in json.dumps(status) and token not in json.dumps(status)
        assert model_ids(d) == ["m"]

    # A request out of bounds too: a caller without the token learns only that one is wanted.
    oversized = {"model_id": "x" * 100_000, "source": str(ckpt)}
    status = refusal(grpcurl(address, LOAD, "-plaintext", data=oversized))
    assert (status["code"], reason(status)) == (16, "TOKEN_MISSING")

    # The health check and reflection (the API's public schema) stay open.
    out = grpcurl(address, HEALTH, "-plaintext")
    assert json.loads(out.stdout) == {"status": "SERVING"}, out.stderr
    listed = subprocess.run(
        [GRPCURL, "-plaintext", address, "list"], capture_output=True, text=True, timeout=60
    )
    assert "torpor.v1.ModelService" in listed.stdout, listed.stderr

    # torporctl: --token-file, $TORPOR_TOKEN_FILE, and without either.
    out = ctl(address, "--token-file", str(token_file), "list")
    assert out.returncode == 0 and "m" in out.stdout, out.stderr
    out = ctl(address, "unload", "m")
    assert out.returncode == 1
    assert "(UNAUTHENTICATED TOKEN_MISSING)" in out.stderr and "--token-file" in out.stderr
    assert model_ids(d) == ["m"]
    out = ctl(address, "unload", "m", env={"TORPOR_TOKEN_FILE": str(token_file)})
    assert out.returncode == 0, out.stderr
    assert model_ids(d) == []

    # The Python client, with the token itself.
    with Client(address=address, token=token, timeout=30) as client:
        assert client.list_models() == []
    with (
        Client(address=address, token=wrong, timeout=30) as client,
        pytest.raises(TorporError) as info,
    ):
        client.load_model("m", ckpt)
    assert info.value.reason == "TOKEN_INVALID"
    assert model_ids(d) == []

    log = d.log()
    assert "refused a call over TCP" in log
    assert token not in log and wrong not in log


def test_mutual_tls(tmp_path: Path, pki: Pki, stop: list[Daemon]) -> None:
    d, address = start(
        tmp_path,
        f'tls_cert = "{pki.server_cert}"\ntls_key = "{pki.server_key}"\n'
        f'tls_client_ca = "{pki.ca}"\n',
    )
    stop.append(d)
    ckpt = make_checkpoint(d.models / "m", layers=2, hidden=64)
    alice = ("-cacert", str(pki.ca), "-cert", str(pki.client_cert), "-key", str(pki.client_key))
    out = grpcurl(address, LOAD, *alice, data={"model_id": "m", "source": str(ckpt), "wait": True})
    assert out.returncode == 0, out.stderr
    assert model_ids(d) == ["m"]

    # A stranger's certificate, none, or no TLS: the handshake refuses the
    # connection, so no call exists (the daemon's servicers never see one).
    stranger = (
        "-cacert",
        str(pki.ca),
        "-cert",
        str(pki.stranger_cert),
        "-key",
        str(pki.stranger_key),
    )
    for flags in [stranger, ("-cacert", str(pki.ca)), ("-plaintext",)]:
        # (-connect-timeout: grpcurl retries a refused handshake until it expires)
        out = grpcurl(
            address, UNLOAD, "-connect-timeout", "2", *flags, data={"model_id": "m", "force": True}
        )
        assert out.returncode != 0 and "Failed to dial" in out.stderr, out.stderr
        assert model_ids(d) == ["m"]
    out = grpcurl(address, HEALTH, "-connect-timeout", "2", "-cacert", str(pki.ca))
    assert out.returncode != 0  # with mutual TLS nothing is open without a certificate

    tls = ["--cacert", str(pki.ca), "--cert", str(pki.client_cert), "--key", str(pki.client_key)]
    out = ctl(address, *tls, "get", "m")
    assert out.returncode == 0 and "active" in out.stdout, out.stderr
    out = ctl(
        address,
        "--cacert",
        str(pki.ca),
        "--cert",
        str(pki.stranger_cert),
        "--key",
        str(pki.stranger_key),
        "unload",
        "m",
    )
    assert out.returncode == 3, out.stderr
    assert "mutual TLS" in out.stderr
    assert model_ids(d) == ["m"]
    with Client(
        address=address, ca_cert=pki.ca, client_cert=pki.client_cert, client_key=pki.client_key
    ) as client:
        assert client.unload_model("m").model_id == "m"
    assert model_ids(d) == []


def test_tls_with_a_token(tmp_path: Path, pki: Pki, stop: list[Daemon]) -> None:
    token = secrets.token_urlsafe(32)
    token_file = secret_file(tmp_path / "token", token, 0o600)
    d, address = start(
        tmp_path,
        f'tls_cert = "{pki.server_cert}"\ntls_key = "{pki.server_key}"\n'
        f'token_file = "{token_file}"\n',
    )
    stop.append(d)
    out = grpcurl(address, LIST, "-cacert", str(pki.ca), "-H", f"authorization: Bearer {token}")
    assert out.returncode == 0, out.stderr
    status = refusal(grpcurl(address, LIST, "-cacert", str(pki.ca)))
    assert status["code"] == 16 and reason(status) == "TOKEN_MISSING"
    out = ctl(address, "--cacert", str(pki.ca), "--token-file", str(token_file), "list")
    assert out.returncode == 0, out.stderr
    assert "tls+token" in d.log()


def run_torpord(tmp_path: Path, server: str, *args: str) -> subprocess.CompletedProcess[str]:
    """torpord with `server` lines in [server], expected to refuse to start."""
    d = Daemon(tmp_path, server=server, args=args)
    try:
        code = d.proc.wait(60)
    finally:
        d.kill()
    return subprocess.CompletedProcess(d.proc.args, code, d.log(), "")


def test_a_tcp_listener_without_credentials_does_not_start(tmp_path: Path) -> None:
    port = free_port()
    out = run_torpord(tmp_path, "", "--tcp", f"127.0.0.1:{port}")
    assert out.returncode == 2
    assert out.stdout.startswith("torpord: --tcp: a TCP listener")
    assert "server.tcp_insecure = true" in out.stdout and "server.token_file" in out.stdout


def test_a_token_file_others_can_read_does_not_start(tmp_path: Path) -> None:
    token = secrets.token_hex(32)
    token_file = secret_file(tmp_path / "token", token, 0o644)
    out = run_torpord(tmp_path, f'tcp = "127.0.0.1:{free_port()}"\ntoken_file = "{token_file}"\n')
    assert out.returncode == 2
    assert f"server.token_file: {token_file}: is accessible by others (mode 0644)" in out.stdout
    assert token not in out.stdout
