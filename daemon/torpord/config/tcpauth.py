"""Who may use the TCP listener: the credential keys of [server], checked and read.

Over the Unix socket the kernel checks who connects (the socket's owner and
group); over TCP anyone on the host (or the network) can connect, so a TCP
listener must ask for credentials: a bearer token (`server.token_file`), a
client certificate signed by `server.tls_client_ca` (mutual TLS, with
`server.tls_cert` and `server.tls_key`), or both. Without either, torpord
refuses to start unless `server.tcp_insecure = true` says that is meant.

A token travels in a header: without TLS it is readable by whoever can see
the traffic. On loopback that is only root (capturing needs CAP_NET_RAW), who
can read the token file anyway, so a plaintext token is allowed there and
nowhere else.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from torpor.credfiles import (
    CredentialFileError,
    is_loopback_address,
    read_pem_file,
    read_token_file,
)

from torpord.config.model import ConfigError, Secret, ServerConfig, TcpAuth

__all__ = ["TCP_KEYS", "read_tcp_auth"]

# The [server] keys this module owns, in the order the default file shows them.
TCP_KEYS = ("tcp_insecure", "token_file", "tls_cert", "tls_key", "tls_client_ca")


def read_tcp_auth(server: ServerConfig, where: str, tcp_where: str) -> TcpAuth | None:
    """Check the credential keys against each other and read their files.

    None when there is no TCP listener (the files are not read). `where` is
    the config file; `tcp_where` is where server.tcp came from (the file or
    the --tcp flag). Raises ConfigError naming the key and the file.
    """
    if server.tcp is None:
        return None
    if (server.tls_cert is None) != (server.tls_key is None):
        given, missing = ("tls_cert", "tls_key")
        if server.tls_cert is None:
            given, missing = missing, given
        raise ConfigError(
            where, f"server.{missing}", f"expected a PEM file path when server.{given} is set"
        )
    if server.tls_client_ca is not None and server.tls_cert is None:
        raise ConfigError(
            where,
            "server.tls_cert",
            "expected the server's certificate (and server.tls_key) when"
            " server.tls_client_ca is set: mutual TLS is TLS first",
        )
    credentials = server.token_file is not None or server.tls_client_ca is not None
    if server.tcp_insecure and credentials:
        raise ConfigError(
            where,
            "server.tcp_insecure",
            "expected false when server.token_file or server.tls_client_ca is set"
            " (credentials are either asked for or not)",
        )
    if not credentials and not server.tcp_insecure:
        key = "server.tcp" if tcp_where == where else None
        raise ConfigError(
            tcp_where,
            key,
            f"a TCP listener ({server.tcp}) needs credentials: set server.token_file (a"
            " bearer token), or server.tls_cert, server.tls_key and server.tls_client_ca"
            " (mutual TLS); or set server.tcp_insecure = true to let everyone who can"
            " connect to it load, sleep and unload models",
        )
    plaintext = server.tls_cert is None
    if server.token_file is not None and plaintext and not is_loopback_address(server.tcp):
        raise ConfigError(
            where,
            "server.token_file",
            f"a token sent without TLS can be read on the network: {server.tcp} is not a"
            " loopback address, so set server.tls_cert and server.tls_key too",
        )
    return TcpAuth(
        token=None
        if server.token_file is None
        else Secret(_read(where, "token_file", server.token_file, read_token_file)),
        tls_cert_chain=None
        if server.tls_cert is None
        else _read(where, "tls_cert", server.tls_cert, read_pem_file),
        tls_private_key=None
        if server.tls_key is None
        else Secret(_read(where, "tls_key", server.tls_key, _read_key)),
        tls_client_ca=None
        if server.tls_client_ca is None
        else _read(where, "tls_client_ca", server.tls_client_ca, read_pem_file),
    )


def _read_key(path: Path) -> bytes:
    return read_pem_file(path, private_key=True)


def _read(where: str, key: str, path: Path, reader: Callable[[Path], bytes]) -> bytes:
    try:
        return reader(path)
    except CredentialFileError as exc:
        raise ConfigError(where, f"server.{key}", str(exc)) from None
