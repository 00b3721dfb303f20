"""Reading TCP credentials from files: a bearer token, PEM certificates and keys.

Shared by torpord (its `server.token_file`, `server.tls_*` keys) and the
client (`token_file=`, `ca_cert=`, ...), so both hold files to one rule. A
file that holds a secret (a token, a private key) must be a regular file
owned by the user or root and must not be accessible by others at all (no
`o+rwx` bit), as ssh demands of a private key; its group may read it, since
that is how the service's group (`torpor`) shares it. Errors name the file
and the rule, never anything read from it.
"""

from __future__ import annotations

import ipaddress
import os
import re
import stat

__all__ = [
    "MAX_PEM_BYTES",
    "MAX_TOKEN_BYTES",
    "CredentialFileError",
    "is_loopback_address",
    "parse_token",
    "read_pem_file",
    "read_token_file",
]

MAX_TOKEN_BYTES = 4096
MAX_PEM_BYTES = 1 << 20
_MIN_TOKEN_CHARS = 16

# RFC 6750's b64token: what an "authorization: Bearer ..." header may carry.
_TOKEN_RE = re.compile(rb"[A-Za-z0-9._~+/-]+=*")
_TOKEN_EXPECTED = (
    f"one line holding a token of {_MIN_TOKEN_CHARS} to {MAX_TOKEN_BYTES} characters out of"
    " A-Z a-z 0-9 - . _ ~ + / (then = padding), like the output of `openssl rand -hex 32`"
)


class CredentialFileError(ValueError):
    """A credential file that cannot be used; the message names the file and why."""

    def __init__(self, path: str | os.PathLike[str], why: str) -> None:
        super().__init__(f"{os.fspath(path)}: {why}")
        self.path = os.fspath(path)
        self.why = why


def _read(path: str | os.PathLike[str], *, secret: bool, limit: int) -> bytes:
    # O_NONBLOCK: a FIFO put where the file should be must not hang the
    # reader; the checks are on the file as opened, not on the name.
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise CredentialFileError(path, f"cannot open it: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise CredentialFileError(path, "is not a regular file")
        if secret:
            euid = os.geteuid()
            if st.st_uid not in (0, euid):
                owners = "root" if euid == 0 else f"this user (uid {euid}) or root"
                raise CredentialFileError(path, f"is owned by uid {st.st_uid}, not by {owners}")
            if st.st_mode & stat.S_IRWXO:
                raise CredentialFileError(
                    path,
                    f"is accessible by others (mode {stat.S_IMODE(st.st_mode):04o}); it holds a"
                    " secret: allow its owner and group only (chmod o= FILE)",
                )
        if st.st_size > limit:
            raise CredentialFileError(path, f"is larger than {limit} bytes")
        try:
            data = os.read(fd, limit + 1)
        except OSError as exc:
            raise CredentialFileError(path, f"cannot read it: {exc.strerror}") from None
        if len(data) > limit:
            raise CredentialFileError(path, f"is larger than {limit} bytes")
        return data
    finally:
        os.close(fd)


def parse_token(data: bytes) -> bytes | None:
    """The token in `data` (surrounding whitespace dropped), or None if it is not one."""
    token = data.strip()
    if len(token) < _MIN_TOKEN_CHARS or not _TOKEN_RE.fullmatch(token):
        return None
    return token


def read_token_file(path: str | os.PathLike[str]) -> bytes:
    """The bearer token held in `path`; raises CredentialFileError."""
    token = parse_token(_read(path, secret=True, limit=MAX_TOKEN_BYTES))
    if token is None:
        raise CredentialFileError(path, f"expected {_TOKEN_EXPECTED}")
    return token


def read_pem_file(path: str | os.PathLike[str], *, private_key: bool = False) -> bytes:
    """A PEM certificate (chain), or a private key, from `path`; raises CredentialFileError."""
    data = _read(path, secret=private_key, limit=MAX_PEM_BYTES)
    if private_key:
        ok = re.search(rb"-----BEGIN [A-Z ]*PRIVATE KEY-----", data) is not None
        what = "a PEM private key (-----BEGIN PRIVATE KEY-----)"
    else:
        ok = b"-----BEGIN CERTIFICATE-----" in data
        what = "PEM certificates (-----BEGIN CERTIFICATE-----)"
    if not ok:
        raise CredentialFileError(path, f"expected {what}")
    return data


def is_loopback_address(address: str) -> bool:
    """Whether a "host:port" (or "[v6]:port") names this host's loopback interface."""
    host = address.rpartition(":")[0] if ":" in address else address
    host = host.removeprefix("[").removesuffix("]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
