"""Sizes, durations and the checkers that turn raw TOML (or flag) values into typed ones."""

from __future__ import annotations

import ipaddress
import json
import os
import re
from collections.abc import Callable
from decimal import ROUND_FLOOR, Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Final

from torpord.config.model import MAX_HOST_DEVICES, MIN_ALIGNMENT

# sun_path is 108 bytes on Linux, including the terminating NUL.
_MAX_SOCKET_PATH: Final = 107

# --------------------------------------------------------------------------- sizes and durations

BINARY_UNITS = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "pib": 2**50}
_DECIMAL = {"kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "pb": 10**15}
# Bare "G" or "K" are refused: tools disagree on whether they mean 2**30 or 10**9.
_SIZE_UNITS: Final = {"": 1, "b": 1, **BINARY_UNITS, **_DECIMAL}
_SIZE_RE: Final = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*")
_SIZE_EXPECTED: Final = 'a byte size like "8GiB"'

_DURATION_UNITS: Final = {
    "ms": Decimal("0.001"),
    "s": Decimal(1),
    "m": Decimal(60),
    "h": Decimal(3600),
}
_DURATION_RE: Final = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h)?\s*")
_DURATION_EXPECTED: Final = 'a duration like "10s", "500ms" or "2m", or a number of seconds'


def parse_size(text: str | int) -> int:
    """Bytes from an int or a string such as "8GiB", "512MiB", "1.5GB" or "4096".

    Binary (KiB…PiB) and decimal (KB…PB) units are both accepted, in any case;
    fractions are rounded down to a whole byte. Raises ValueError.
    """
    if isinstance(text, bool) or not isinstance(text, int | str):
        raise ValueError(f"expected {_SIZE_EXPECTED}, got {show(text)}")
    if isinstance(text, int):
        if text < 0:
            raise ValueError(f"expected {_SIZE_EXPECTED}, got {text}")
        return text
    match = _SIZE_RE.fullmatch(text)
    unit = _SIZE_UNITS.get(match.group(2).lower()) if match else None
    if match is None or unit is None:
        raise ValueError(f"expected {_SIZE_EXPECTED}, got {show(text)}")
    return int((Decimal(match.group(1)) * unit).to_integral_value(ROUND_FLOOR))


def format_size(n: int) -> str:
    """A human-readable binary size: 1610612736 -> "1.5 GiB", 100 -> "100 B"."""
    sign, n = ("-", -n) if n < 0 else ("", n)
    if n < 1024:
        return f"{sign}{n} B"
    value, unit = float(n), "B"
    for bigger in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        value, unit = value / 1024, bigger
        if value < 1024:
            break
    text = f"{value:.2f}".rstrip("0").rstrip(".")
    return f"{sign}{text} {unit}"


def parse_duration(value: str | int | float) -> float:
    """Seconds from "500ms", "10s", "2m", "1h", or a number of seconds. Raises ValueError."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"expected {_DURATION_EXPECTED}, got {show(value)}")
    if isinstance(value, int | float):
        if not value >= 0 or value == float("inf"):  # also refuses NaN
            raise ValueError(f"expected {_DURATION_EXPECTED}, got {show(value)}")
        return float(value)
    match = _DURATION_RE.fullmatch(value)
    if match is None:
        raise ValueError(f"expected {_DURATION_EXPECTED}, got {show(value)}")
    try:
        seconds = Decimal(match.group(1)) * _DURATION_UNITS[match.group(2) or "s"]
    except InvalidOperation as exc:  # pragma: no cover - the regex admits only decimals
        raise ValueError(f"expected {_DURATION_EXPECTED}, got {show(value)}") from exc
    return float(seconds)


# --------------------------------------------------------------------------- value validators
# Each takes the raw TOML (or flag) value and returns the typed value, or raises
# Invalid saying what was expected; the caller adds where, key and what was got.


class Invalid(Exception):
    def __init__(self, expected: str) -> None:
        super().__init__(expected)
        self.expected = expected


def show(value: object) -> str:
    """A value as the operator wrote it, for "got ..." (TOML-ish, strings quoted)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | Path):
        return json.dumps(str(value), ensure_ascii=False)
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        text = json.dumps(value, ensure_ascii=False, default=str)
        return text if len(text) <= 60 else "an array"
    return str(value)


def size_value(value: Any) -> int:
    try:
        return parse_size(value)
    except ValueError:
        raise Invalid(_SIZE_EXPECTED) from None


def positive_size(value: Any) -> int:
    size = size_value(value)
    if size <= 0:
        raise Invalid('a positive byte size like "8GiB"')
    return size


def rate_value(value: Any) -> int:
    """Bytes a second: 0 (off), or at least one. A fraction of a byte is
    refused rather than rounded down to 0, which would turn the thing off."""
    rate = size_value(value)
    match = _SIZE_RE.fullmatch(value) if isinstance(value, str) else None
    if rate == 0 and match is not None and Decimal(match.group(1)) != 0:
        raise Invalid('"0" (off) or at least one byte a second, like "256MiB"')
    return rate


def duration_value(value: Any) -> float:
    try:
        return parse_duration(value)
    except ValueError:
        raise Invalid(_DURATION_EXPECTED) from None


def bool_value(value: Any) -> bool:
    if not isinstance(value, bool):
        raise Invalid("true or false")
    return value


def choice(choices: tuple[str, ...]) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        # Case-insensitive because "INFO" and "Info" mean the same to anyone typing them.
        if not isinstance(value, str) or value.lower() not in choices:
            raise Invalid("one of " + ", ".join(choices))
        return value.lower()

    return check


def host_devices(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_HOST_DEVICES:
        raise Invalid(f"an integer from 1 to {MAX_HOST_DEVICES}")
    return value


def gpu_uuid(value: Any) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"GPU-[0-9a-fA-F-]{8,}", value):
        raise Invalid('a GPU UUID like "GPU-5f2c6a1e-..." (nvidia-smi -L shows them)')
    return value


def memory_share(value: Any) -> float | int:
    """ "90%" (of each GPU's memory) or a byte size."""
    if isinstance(value, str) and value.strip().endswith("%"):
        try:
            percent = float(value.strip()[:-1])
        except ValueError:
            percent = -1.0
        if not 0 < percent <= 100:
            raise Invalid('a share like "90%" (over 0, at most 100) or a byte size')
        return percent / 100
    try:
        return positive_size(value)
    except Invalid:
        raise Invalid('a share like "90%" or a positive byte size like "70GiB"') from None


def alignment_value(value: Any) -> int:
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or value < MIN_ALIGNMENT
        or value & (value - 1)
    ):
        raise Invalid(f"a power of two of at least {MIN_ALIGNMENT}")
    return value


def socket_mode_value(value: Any) -> int:
    # TOML has no leading-zero integers, so modes are strings ("0660"); an
    # integer is accepted only as TOML's own octal literal would produce it.
    expected = 'an octal mode string like "0660"'
    if isinstance(value, bool):
        raise Invalid(expected)
    if isinstance(value, str):
        digits = value[2:] if value[:2].lower() == "0o" else value
        if not re.fullmatch(r"[0-7]{3,4}", digits):
            raise Invalid(expected)
        value = int(digits, 8)
    if not isinstance(value, int) or not 0 <= value <= 0o777:
        raise Invalid(expected)
    return value


def path_value(value: Any, *, relative_to_cwd: bool, what: str = "an absolute path") -> Path:
    # A relative path in a file has no obvious base (the file's directory? the
    # daemon's cwd, which systemd sets to /?), so the file must be explicit; a
    # flag's relative path means what the shell user meant: relative to cwd.
    if not isinstance(value, str | Path) or not str(value) or "\0" in str(value):
        raise Invalid(what)
    path = Path(value).expanduser()
    if not path.is_absolute():
        if not relative_to_cwd:
            raise Invalid(what)
        path = path.absolute()
    return path


def optional_path(value: Any) -> Path | None:
    """An absolute path, or None for "" (off)."""
    return None if value == "" else path_value(value, relative_to_cwd=False)


def chunk_size_value(value: Any) -> int:
    size = size_value(value)
    # O_DIRECT reads whole 4 KiB blocks; below 1 MiB a chunk costs more than it moves.
    if size < 2**20 or size % 4096:
        raise Invalid('a multiple of 4KiB, at least "1MiB" (like "32MiB")')
    return size


def io_threads(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 256:
        raise Invalid("an integer from 1 to 256")
    return value


def socket_path_value(value: Any, *, relative_to_cwd: bool) -> Path:
    what = f"an absolute socket path of at most {_MAX_SOCKET_PATH} bytes"
    path = path_value(value, relative_to_cwd=relative_to_cwd, what=what)
    if len(os.fsencode(path)) > _MAX_SOCKET_PATH:
        raise Invalid(what)
    return path


def tcp_value(
    value: Any, *, allow_remote: bool, remote_key: str = "server.allow_remote"
) -> str | None:
    """A normalised "host:port" / "[v6]:port", or None for ""."""
    expected = 'host:port such as "127.0.0.1:50051" or "[::1]:50051", or "" for off'
    if not isinstance(value, str):
        raise Invalid(expected)
    if value == "":
        return None
    match = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d{1,5})|([A-Za-z0-9.-]+):(\d{1,5})", value)
    if match is None:
        raise Invalid(expected)
    host = (match.group(1) or match.group(3)).lower()
    port = int(match.group(2) or match.group(4))
    if port > 65535:
        raise Invalid(expected)
    address: ipaddress.IPv4Address | ipaddress.IPv6Address | None
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        if match.group(1):  # brackets hold only IPv6 literals
            raise Invalid(expected) from None
        address = None
    loopback = host == "localhost" if address is None else address.is_loopback
    if not loopback and not allow_remote:
        raise Invalid(
            'a loopback host:port such as "127.0.0.1:50051" '
            f"(set {remote_key} = true to listen on other addresses)"
        )
    return f"[{host}]:{port}" if match.group(1) else f"{host}:{port}"


def string_value(value: Any) -> str:
    if not isinstance(value, str):
        raise Invalid("a string")
    return value


def unique_paths(paths: Any) -> tuple[Path, ...]:
    return tuple(dict.fromkeys(paths))
