"""torpord.config: who may use the TCP listener (server.tcp_insecure, token_file, tls_*)."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import pytest
from torpord.config import ConfigError, Overrides, load_config

PEM_CERT = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
PEM_KEY = "-----BEGIN PRIVATE KEY-----\nMIIE\n-----END PRIVATE KEY-----\n"


def write(tmp_path: Path, server: str) -> Path:
    path = tmp_path / "torpord.toml"
    path.write_text(f"version = 1\n[server]\n{server}")
    return path


def secret(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    os.chmod(path, mode)
    return path


def error(path: Path, overrides: Overrides = Overrides()) -> ConfigError:  # noqa: B008
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    return info.value


@pytest.fixture
def token(tmp_path: Path) -> tuple[str, Path]:
    value = secrets.token_hex(32)
    return value, secret(tmp_path / "token", f"{value}\n", 0o640)


@pytest.fixture
def tls(tmp_path: Path) -> str:
    cert = secret(tmp_path / "server.pem", PEM_CERT, 0o644)
    key = secret(tmp_path / "server.key", PEM_KEY)
    ca = secret(tmp_path / "ca.pem", PEM_CERT, 0o644)
    return f'tls_cert = "{cert}"\ntls_key = "{key}"\ntls_client_ca = "{ca}"\n'


# -- what loads ------------------------------------------------------------------


def test_a_token_is_read_and_never_shown(tmp_path: Path, token: tuple[str, Path]) -> None:
    value, path = token
    config = load_config(write(tmp_path, f'tcp = "127.0.0.1:1"\ntoken_file = "{path}"\n'))
    auth = config.server.tcp_auth
    assert auth is not None and auth.token is not None
    assert auth.token.reveal() == value.encode()
    assert (auth.mode, auth.insecure) == ("token", False)
    assert value not in repr(config) and value not in str(config)


def test_mutual_tls_files_are_read(tmp_path: Path, tls: str, token: tuple[str, Path]) -> None:
    config = load_config(write(tmp_path, f'tcp = "0.0.0.0:1"\nallow_remote = true\n{tls}'))
    auth = config.server.tcp_auth
    assert auth is not None and auth.tls_private_key is not None
    assert auth.tls_cert_chain == auth.tls_client_ca == PEM_CERT.encode()
    assert auth.tls_private_key.reveal() == PEM_KEY.encode()
    assert auth.mode == "mtls"
    assert "PRIVATE" not in repr(config)
    both = write(tmp_path, f'tcp = "[::1]:1"\n{tls}token_file = "{token[1]}"\n')
    assert load_config(both).server.tcp_auth.mode == "mtls+token"  # type: ignore[union-attr]


def test_insecure_on_purpose(tmp_path: Path) -> None:
    auth = load_config(
        write(tmp_path, 'tcp = "127.0.0.1:1"\ntcp_insecure = true\n')
    ).server.tcp_auth
    assert auth is not None and auth.insecure and auth.mode == "insecure"


def test_without_tcp_nothing_is_asked_or_read(tmp_path: Path) -> None:
    path = write(tmp_path, f'token_file = "{tmp_path / "absent"}"\n')
    assert load_config(path).server.tcp_auth is None
    # --tcp "" turns off a listener whose files are not there: they are not read.
    path = write(tmp_path, f'tcp = "127.0.0.1:1"\ntoken_file = "{tmp_path / "absent"}"\n')
    assert load_config(path, Overrides(tcp="")).server.tcp_auth is None


# -- what does not -----------------------------------------------------------------


def test_a_tcp_listener_needs_credentials(tmp_path: Path) -> None:
    path = write(tmp_path, 'tcp = "127.0.0.1:5"\n')
    err = error(path)
    assert (err.where, err.key) == (str(path), "server.tcp")
    assert err.detail.startswith(
        "a TCP listener (127.0.0.1:5) needs credentials: set server.token_file"
    )
    assert "server.tcp_insecure = true" in err.detail
    # The same through the flag, named as such; TLS without a client CA is no credential.
    path = write(tmp_path, f'tls_cert = "{tmp_path}/c.pem"\ntls_key = "{tmp_path}/k.pem"\n')
    err = error(path, Overrides(tcp="127.0.0.1:6"))
    assert (err.where, err.key) == ("--tcp", None)
    assert str(err).startswith("--tcp: a TCP listener (127.0.0.1:6) needs credentials")


@pytest.mark.parametrize(
    ("server", "key", "detail"),
    [
        (
            'tls_cert = "/c.pem"\n',
            "server.tls_key",
            "expected a PEM file path when server.tls_cert is set",
        ),
        (
            'tls_key = "/k.pem"\n',
            "server.tls_cert",
            "expected a PEM file path when server.tls_key is set",
        ),
        ('tls_client_ca = "/ca.pem"\n', "server.tls_cert", "expected the server's certificate"),
        ('tcp_insecure = true\ntoken_file = "/t"\n', "server.tcp_insecure", "expected false when"),
        ('token_file = "rel"\n', "server.token_file", "expected an absolute path"),
        ("tcp_insecure = 1\n", "server.tcp_insecure", "expected true or false"),
    ],
)
def test_combinations_that_make_no_sense(
    tmp_path: Path, server: str, key: str, detail: str
) -> None:
    err = error(write(tmp_path, f'tcp = "127.0.0.1:1"\n{server}'))
    assert err.key == key
    assert err.detail.startswith(detail)


def test_a_token_without_tls_only_on_loopback(tmp_path: Path, token: tuple[str, Path]) -> None:
    body = f'tcp = "0.0.0.0:1"\nallow_remote = true\ntoken_file = "{token[1]}"\n'
    err = error(write(tmp_path, body))
    assert err.key == "server.token_file"
    assert "0.0.0.0:1 is not a loopback address, so set server.tls_cert" in err.detail
    for loopback in ("127.0.0.1:1", "[::1]:1", "localhost:1"):
        body = f'tcp = "{loopback}"\ntoken_file = "{token[1]}"\n'
        assert load_config(write(tmp_path, body)).server.tcp_auth is not None


def token_file_error(tmp_path: Path, path: Path) -> ConfigError:
    err = error(write(tmp_path, f'tcp = "127.0.0.1:1"\ntoken_file = "{path}"\n'))
    assert (err.where, err.key) == (str(tmp_path / "torpord.toml"), "server.token_file")
    assert err.detail.startswith(f"{path}: ")
    return err


@pytest.mark.parametrize(
    ("mode", "why"),
    [
        (0o644, "is accessible by others (mode 0644)"),
        (0o604, "is accessible by others (mode 0604)"),
        (0o602, "is accessible by others (mode 0602)"),
    ],
)
def test_a_token_file_others_can_access_is_refused(
    tmp_path: Path, token: tuple[str, Path], mode: int, why: str
) -> None:
    os.chmod(token[1], mode)
    err = token_file_error(tmp_path, token[1])
    assert why in err.detail and "chmod o=" in err.detail
    assert token[0] not in str(err)


@pytest.mark.parametrize(
    ("content", "why"),
    [
        ("", "expected one line holding a token of 16"),
        ("short\n", "expected one line holding a token of 16"),
        ("two words-and-a-long-enough-tail\n", "expected one line"),
        ("line-one-is-long-enough\nline-two\n", "expected one line"),
        ("é" * 20, "expected one line"),
        ("x" * 5000, "is larger than 4096 bytes"),
    ],
)
def test_a_token_file_must_hold_a_token(tmp_path: Path, content: str, why: str) -> None:
    path = secret(tmp_path / "token", content)
    err = token_file_error(tmp_path, path)
    assert why in err.detail
    assert "words" not in str(err) and "line-two" not in str(err)  # content is never quoted


def test_a_token_file_that_is_no_regular_file_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o600)
    assert "is not a regular file" in token_file_error(tmp_path, fifo).detail
    assert "is not a regular file" in token_file_error(tmp_path, tmp_path).detail
    missing = token_file_error(tmp_path, tmp_path / "absent").detail
    assert missing.endswith("cannot open it: No such file or directory")


@pytest.mark.skipif(os.geteuid() != 0, reason="chowns to another user")
def test_a_token_file_of_another_user_is_refused(tmp_path: Path, token: tuple[str, Path]) -> None:
    os.chown(token[1], 65534, 65534)
    assert "is owned by uid 65534, not by root" in (token_file_error(tmp_path, token[1]).detail)


def test_the_tls_files_are_checked(tmp_path: Path, tls: str) -> None:
    path = write(tmp_path, f'tcp = "127.0.0.1:1"\n{tls}')
    os.chmod(tmp_path / "server.key", 0o644)
    err = error(path)
    assert err.key == "server.tls_key" and "is accessible by others (mode 0644)" in err.detail
    assert "MIIE" not in str(err)
    os.chmod(tmp_path / "server.key", 0o600)
    (tmp_path / "ca.pem").write_text("not a certificate")
    err = error(path)
    assert err.key == "server.tls_client_ca"
    assert err.detail.endswith("expected PEM certificates (-----BEGIN CERTIFICATE-----)")
    (tmp_path / "ca.pem").write_text(PEM_CERT)
    (tmp_path / "server.key").write_text(PEM_CERT)
    err = error(path)
    assert err.key == "server.tls_key" and "expected a PEM private key" in err.detail
