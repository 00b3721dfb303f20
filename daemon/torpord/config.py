"""The daemon's configuration: one versioned TOML file, validated once at start.

`load_config` reads the file (or nothing: the embedded defaults are a working
setup), applies the few command-line overrides and returns a frozen `Config`.
Every mistake is a `ConfigError` whose message names where it came from (the
file or the flag), the dotted key, what was expected and what was found, so an
operator can fix it from the journal line alone:

    /etc/torpor/torpord.toml: host_pool.capacity: expected a byte size like "8GiB", got "lots"

Nothing downstream re-validates: a `Config` that exists is a valid one.
"""

from __future__ import annotations

import contextlib
import difflib
import ipaddress
import json
import os
import re
import tempfile
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from decimal import ROUND_FLOOR, Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Final, TypeVar

__all__ = [
    "BACKEND_KINDS",
    "CONFIG_VERSION",
    "LOG_FORMATS",
    "LOG_LEVELS",
    "BackendConfig",
    "Config",
    "ConfigError",
    "DiskCacheConfig",
    "HostBackendConfig",
    "HostPoolConfig",
    "LayersConfig",
    "LogConfig",
    "Overrides",
    "ServerConfig",
    "SourcesConfig",
    "default_config_toml",
    "format_size",
    "load_config",
    "parse_duration",
    "parse_size",
]

CONFIG_VERSION: Final = 1
LOG_LEVELS: Final = ("debug", "info", "warning", "error")
LOG_FORMATS: Final = ("auto", "json", "console")
BACKEND_KINDS: Final = ("auto", "host", "cuda")
MAX_HOST_DEVICES: Final = 64
MIN_ALIGNMENT: Final = 256
# sun_path is 108 bytes on Linux, including the terminating NUL.
_MAX_SOCKET_PATH: Final = 107
_DEFAULTS_WHERE: Final = "<defaults>"

_T = TypeVar("_T")


class ConfigError(Exception):
    """An invalid configuration; the message is meant for the operator as is."""

    def __init__(self, where: str, key: str | None, detail: str) -> None:
        self.where = where  # the file, "<defaults>", or a flag such as "--tcp"
        self.key = key  # dotted key ("server.tcp"), None for whole-file problems and flags
        self.detail = detail
        super().__init__(f"{where}: {key}: {detail}" if key else f"{where}: {detail}")


# --------------------------------------------------------------------------- the typed result


@dataclass(frozen=True)
class ServerConfig:
    socket: Path
    socket_mode: int
    tcp: str | None  # normalised "host:port" / "[v6]:port", None when off
    allow_remote: bool
    grace_period: float  # seconds


@dataclass(frozen=True)
class LogConfig:
    level: str  # one of LOG_LEVELS
    format: str  # one of LOG_FORMATS


@dataclass(frozen=True)
class HostBackendConfig:
    devices: int
    device_capacity: int  # bytes per emulated device


@dataclass(frozen=True)
class BackendConfig:
    kind: str  # one of BACKEND_KINDS; "auto" is resolved by whoever builds the backend
    host: HostBackendConfig


@dataclass(frozen=True)
class HostPoolConfig:
    capacity: int  # bytes of pinned host memory


@dataclass(frozen=True)
class SourcesConfig:
    allowed_roots: tuple[Path, ...]  # absolute and resolved


@dataclass(frozen=True)
class LayersConfig:
    block_patterns: tuple[str, ...]
    post_patterns: tuple[str, ...]
    alignment: int


@dataclass(frozen=True)
class DiskCacheConfig:
    path: Path | None  # None: disabled
    capacity: int


@dataclass(frozen=True)
class Config:
    file: Path | None  # None: the embedded defaults
    server: ServerConfig
    log: LogConfig
    backend: BackendConfig
    host_pool: HostPoolConfig
    sources: SourcesConfig
    layers: LayersConfig
    disk_cache: DiskCacheConfig


@dataclass(frozen=True)
class Overrides:
    """The fields command-line flags may override; None / () leaves the file's value."""

    socket: Path | None = None
    tcp: str | None = None  # "" turns a configured TCP listener off
    backend: str | None = None
    allowed_roots: tuple[str, ...] = ()  # non-empty replaces the file's list
    log_level: str | None = None


# Flag names as torpord spells them, for error messages about overrides.
_FLAGS: Final = {
    "socket": "--socket",
    "tcp": "--tcp",
    "backend": "--backend",
    "allowed_roots": "--allowed-root",
    "log_level": "--log-level",
}

# Known keys per table, in the order the default file shows them.
_SCHEMA: Final[Mapping[str, tuple[str, ...]]] = {
    "": ("version", "server", "log", "backend", "host_pool", "sources", "layers", "disk_cache"),
    "server": ("socket", "socket_mode", "tcp", "allow_remote", "grace_period"),
    "log": ("level", "format"),
    "backend": ("kind", "host"),
    "backend.host": ("devices", "device_capacity"),
    "host_pool": ("capacity",),
    "sources": ("allowed_roots",),
    "layers": ("block_patterns", "post_patterns", "alignment"),
    "disk_cache": ("path", "capacity"),
}

# --------------------------------------------------------------------------- sizes and durations

_BINARY = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "pib": 2**50}
_DECIMAL = {"kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "pb": 10**15}
# Bare "G" or "K" are refused: tools disagree on whether they mean 2**30 or 10**9.
_SIZE_UNITS: Final = {"": 1, "b": 1, **_BINARY, **_DECIMAL}
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
        raise ValueError(f"expected {_SIZE_EXPECTED}, got {_show(text)}")
    if isinstance(text, int):
        if text < 0:
            raise ValueError(f"expected {_SIZE_EXPECTED}, got {text}")
        return text
    match = _SIZE_RE.fullmatch(text)
    unit = _SIZE_UNITS.get(match.group(2).lower()) if match else None
    if match is None or unit is None:
        raise ValueError(f"expected {_SIZE_EXPECTED}, got {_show(text)}")
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
        raise ValueError(f"expected {_DURATION_EXPECTED}, got {_show(value)}")
    if isinstance(value, int | float):
        if not value >= 0 or value == float("inf"):  # also refuses NaN
            raise ValueError(f"expected {_DURATION_EXPECTED}, got {_show(value)}")
        return float(value)
    match = _DURATION_RE.fullmatch(value)
    if match is None:
        raise ValueError(f"expected {_DURATION_EXPECTED}, got {_show(value)}")
    try:
        seconds = Decimal(match.group(1)) * _DURATION_UNITS[match.group(2) or "s"]
    except InvalidOperation as exc:  # pragma: no cover - the regex admits only decimals
        raise ValueError(f"expected {_DURATION_EXPECTED}, got {_show(value)}") from exc
    return float(seconds)


# --------------------------------------------------------------------------- value validators
# Each takes the raw TOML (or flag) value and returns the typed value, or raises
# _Invalid saying what was expected; the caller adds where, key and what was got.


class _Invalid(Exception):
    def __init__(self, expected: str) -> None:
        super().__init__(expected)
        self.expected = expected


def _show(value: object) -> str:
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


def _size(value: Any) -> int:
    try:
        return parse_size(value)
    except ValueError:
        raise _Invalid(_SIZE_EXPECTED) from None


def _positive_size(value: Any) -> int:
    size = _size(value)
    if size <= 0:
        raise _Invalid('a positive byte size like "8GiB"')
    return size


def _duration(value: Any) -> float:
    try:
        return parse_duration(value)
    except ValueError:
        raise _Invalid(_DURATION_EXPECTED) from None


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise _Invalid("true or false")
    return value


def _choice(choices: tuple[str, ...]) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        # Case-insensitive because "INFO" and "Info" mean the same to anyone typing them.
        if not isinstance(value, str) or value.lower() not in choices:
            raise _Invalid("one of " + ", ".join(choices))
        return value.lower()

    return check


def _host_devices(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_HOST_DEVICES:
        raise _Invalid(f"an integer from 1 to {MAX_HOST_DEVICES}")
    return value


def _alignment(value: Any) -> int:
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or value < MIN_ALIGNMENT
        or value & (value - 1)
    ):
        raise _Invalid(f"a power of two of at least {MIN_ALIGNMENT}")
    return value


def _socket_mode(value: Any) -> int:
    # TOML has no leading-zero integers, so modes are strings ("0660"); an
    # integer is accepted only as TOML's own octal literal would produce it.
    expected = 'an octal mode string like "0660"'
    if isinstance(value, bool):
        raise _Invalid(expected)
    if isinstance(value, str):
        digits = value[2:] if value[:2].lower() == "0o" else value
        if not re.fullmatch(r"[0-7]{3,4}", digits):
            raise _Invalid(expected)
        value = int(digits, 8)
    if not isinstance(value, int) or not 0 <= value <= 0o777:
        raise _Invalid(expected)
    return value


def _path(value: Any, *, relative_to_cwd: bool, what: str = "an absolute path") -> Path:
    # A relative path in a file has no obvious base (the file's directory? the
    # daemon's cwd, which systemd sets to /?), so the file must be explicit; a
    # flag's relative path means what the shell user meant: relative to cwd.
    if not isinstance(value, str | Path) or not str(value) or "\0" in str(value):
        raise _Invalid(what)
    path = Path(value).expanduser()
    if not path.is_absolute():
        if not relative_to_cwd:
            raise _Invalid(what)
        path = path.absolute()
    return path


def _socket_path(value: Any, *, relative_to_cwd: bool) -> Path:
    what = f"an absolute socket path of at most {_MAX_SOCKET_PATH} bytes"
    path = _path(value, relative_to_cwd=relative_to_cwd, what=what)
    if len(os.fsencode(path)) > _MAX_SOCKET_PATH:
        raise _Invalid(what)
    return path


def _tcp(value: Any, *, allow_remote: bool) -> str | None:
    """A normalised "host:port" / "[v6]:port", or None for ""."""
    expected = 'host:port such as "127.0.0.1:50051" or "[::1]:50051", or "" for off'
    if not isinstance(value, str):
        raise _Invalid(expected)
    if value == "":
        return None
    match = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d{1,5})|([A-Za-z0-9.-]+):(\d{1,5})", value)
    if match is None:
        raise _Invalid(expected)
    host = (match.group(1) or match.group(3)).lower()
    port = int(match.group(2) or match.group(4))
    if port > 65535:
        raise _Invalid(expected)
    address: ipaddress.IPv4Address | ipaddress.IPv6Address | None
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        if match.group(1):  # brackets hold only IPv6 literals
            raise _Invalid(expected) from None
        address = None
    loopback = host == "localhost" if address is None else address.is_loopback
    if not loopback and not allow_remote:
        raise _Invalid(
            'a loopback host:port such as "127.0.0.1:50051" '
            "(set server.allow_remote = true to listen on other addresses)"
        )
    return f"[{host}]:{port}" if match.group(1) else f"{host}:{port}"


# --------------------------------------------------------------------------- defaults


def _default_socket() -> Path:
    if os.geteuid() == 0:
        return Path("/run/torpor/torpor.sock")
    runtime = os.environ.get("XDG_RUNTIME_DIR", "")
    if runtime and Path(runtime).is_absolute():
        return Path(runtime) / "torpor" / "torpor.sock"
    # Not tempfile.gettempdir(): $TMPDIR can be long, and socket paths must fit in 107 bytes.
    return Path(f"/tmp/torpor-{os.geteuid()}/torpor.sock")


def _default_allowed_roots() -> tuple[Path, ...]:
    if os.geteuid() == 0:
        return (Path("/var/lib/torpor/models"),)
    roots: list[Path] = []
    # No $HOME and no passwd entry (some containers): the temp dir alone then.
    with contextlib.suppress(RuntimeError):
        roots.append(Path.home())
    roots.append(Path(tempfile.gettempdir()))
    return _unique(root.resolve() for root in roots)


def _default_layer_patterns() -> tuple[tuple[str, ...], tuple[str, ...]]:
    # Imported here rather than at the top so that loading a config never
    # drags in the storage package's own imports before they are needed.
    from torpord.storage.layers import DEFAULT_LAYER_PATTERNS

    return tuple(DEFAULT_LAYER_PATTERNS.blocks), tuple(DEFAULT_LAYER_PATTERNS.post)


def _unique(paths: Any) -> tuple[Path, ...]:
    return tuple(dict.fromkeys(paths))


# --------------------------------------------------------------------------- reading the file


class _Reader:
    """Typed access to one parsed file, raising ConfigErrors that name `where` and the key."""

    def __init__(self, where: str, data: Mapping[str, Any]) -> None:
        self.where = where
        self.tables: dict[str, Mapping[str, Any]] = {"": data}
        self._check_keys("", data)

    def error(self, key: str, expected: str, got: object) -> ConfigError:
        return ConfigError(self.where, key, f"expected {expected}, got {_show(got)}")

    def table(self, name: str) -> Mapping[str, Any]:
        """The sub-table `name` (dotted), {} when absent; unknown keys in it are errors."""
        if name in self.tables:
            return self.tables[name]
        parent, _, leaf = name.rpartition(".")
        value = self.table(parent).get(leaf, {})
        if not isinstance(value, dict):
            raise self.error(name, "a table", value)
        self._check_keys(name, value)
        self.tables[name] = value
        return value

    def get(self, key: str, check: Callable[[Any], _T], default: _T) -> _T:
        table, _, leaf = key.rpartition(".")
        values = self.table(table)
        if leaf not in values:
            return default
        try:
            return check(values[leaf])
        except _Invalid as exc:
            raise self.error(key, exc.expected, values[leaf]) from None

    def get_list(self, key: str, check: Callable[[Any], _T]) -> tuple[_T, ...] | None:
        """Each element checked, errors naming `key[i]`; None when the key is absent."""
        table, _, leaf = key.rpartition(".")
        values = self.table(table)
        if leaf not in values:
            return None
        items = values[leaf]
        if not isinstance(items, list):
            raise self.error(key, "an array", items)
        checked: list[_T] = []
        for index, item in enumerate(items):
            try:
                checked.append(check(item))
            except _Invalid as exc:
                raise self.error(f"{key}[{index}]", exc.expected, item) from None
        return tuple(checked)

    def _check_keys(self, table: str, values: Mapping[str, Any]) -> None:
        known = _SCHEMA[table]
        for key in values:
            if key in known:
                continue
            dotted = f"{table}.{key}" if table else key
            raise ConfigError(self.where, dotted, f"unknown key; {_suggest(key, table)}")


def _suggest(key: str, table: str) -> str:
    known = _SCHEMA[table]
    close = difflib.get_close_matches(key, known, n=1)
    if close:
        return f'did you mean "{close[0]}"?'
    # The right name in the wrong table ([server] level = ...) is a common slip.
    elsewhere = [
        f"{name}.{key}" if name else key
        for name, keys in _SCHEMA.items()
        if name != table and key in keys
    ]
    if elsewhere:
        return f'did you mean "{elsewhere[0]}"?'
    where = f"[{table}]" if table else "the top level"
    return f"known keys in {where}: " + ", ".join(known)


def _read_file(path: Path) -> Mapping[str, Any]:
    where = str(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise ConfigError(where, None, f"cannot read the config file: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(where, None, f"expected UTF-8 text: {exc}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(where, None, f"invalid TOML: {exc}") from None
    if "version" not in data:
        raise ConfigError(
            where,
            "version",
            f'expected {CONFIG_VERSION} (add "version = {CONFIG_VERSION}" at '
            "the top of the file), got nothing",
        )
    version = data["version"]
    if isinstance(version, bool) or version != CONFIG_VERSION:
        expected = f"{CONFIG_VERSION} (the only version this torpord reads)"
        raise ConfigError(where, "version", f"expected {expected}, got {_show(version)}")
    return data


def _check_patterns(blocks: tuple[str, ...], post: tuple[str, ...], reader: _Reader) -> None:
    """Every pattern compiles; every block pattern captures the block index, once.

    Checked here first so the error names the exact key (`layers.block_patterns[2]`)
    in the config's own words; then the storage layer's compile_patterns, which
    the loader will use on these same patterns, has the last word.
    """
    from torpord.errors import InvalidArgument
    from torpord.storage.layers import LayerPatterns, compile_patterns

    keys = {"blocks": "layers.block_patterns", "post": "layers.post_patterns"}
    for kind, patterns, groups in (("blocks", blocks, 1), ("post", post, None)):
        for index, pattern in enumerate(patterns):
            key = f"{keys[kind]}[{index}]"
            try:
                compiled = re.compile(pattern)
            except re.error as exc:
                raise reader.error(key, f"a valid regular expression ({exc})", pattern) from None
            if groups is not None and compiled.groups != groups:
                expected = "a regular expression with exactly one capture group (the block index)"
                raise reader.error(key, expected, pattern)
    try:
        compile_patterns(LayerPatterns(blocks=blocks, post=post))
    except InvalidArgument as exc:
        bad_kind, bad_index = exc.metadata.get("kind", ""), exc.metadata.get("index", "")
        key = f"{keys[bad_kind]}[{bad_index}]" if bad_kind in keys else "layers"
        raise ConfigError(reader.where, key, exc.message) from None


def _string(value: Any) -> str:
    if not isinstance(value, str):
        raise _Invalid("a string")
    return value


# --------------------------------------------------------------------------- load_config


def load_config(path: Path | None, overrides: Overrides = Overrides()) -> Config:
    """Read, validate and freeze the configuration; raises ConfigError.

    `path` None means the embedded defaults (a working single-user setup).
    Overrides from flags are validated like the file's values, errors naming the flag.
    """
    where = _DEFAULTS_WHERE if path is None else str(path)
    r = _Reader(where, {} if path is None else _read_file(path))

    allow_remote = r.get("server.allow_remote", _bool, False)
    server = ServerConfig(
        socket=r.get(
            "server.socket", lambda v: _socket_path(v, relative_to_cwd=False), _default_socket()
        ),
        socket_mode=r.get("server.socket_mode", _socket_mode, 0o660),
        tcp=r.get("server.tcp", lambda v: _tcp(v, allow_remote=allow_remote), None),
        allow_remote=allow_remote,
        grace_period=r.get("server.grace_period", _duration, 10.0),
    )
    log = LogConfig(
        level=r.get("log.level", _choice(LOG_LEVELS), "info"),
        format=r.get("log.format", _choice(LOG_FORMATS), "auto"),
    )
    backend = BackendConfig(
        kind=r.get("backend.kind", _choice(BACKEND_KINDS), "auto"),
        host=HostBackendConfig(
            devices=r.get("backend.host.devices", _host_devices, 1),
            device_capacity=r.get("backend.host.device_capacity", _positive_size, 4 * 2**30),
        ),
    )
    host_pool = HostPoolConfig(capacity=r.get("host_pool.capacity", _positive_size, 4 * 2**30))

    roots = r.get_list("sources.allowed_roots", lambda v: _path(v, relative_to_cwd=False))
    if roots == ():
        raise r.error("sources.allowed_roots", "at least one absolute path", [])
    sources = SourcesConfig(
        allowed_roots=_default_allowed_roots()
        if roots is None
        else _unique(root.resolve() for root in roots)
    )

    blocks = r.get_list("layers.block_patterns", _string)
    post = r.get_list("layers.post_patterns", _string)
    if blocks is None or post is None:
        default_blocks, default_post = _default_layer_patterns()
        blocks = default_blocks if blocks is None else blocks
        post = default_post if post is None else post
    if not blocks:
        raise r.error("layers.block_patterns", "at least one regular expression", [])
    _check_patterns(blocks, post, r)
    layers = LayersConfig(
        block_patterns=blocks,
        post_patterns=post,
        alignment=r.get("layers.alignment", _alignment, MIN_ALIGNMENT),
    )

    cache_path = r.get(
        "disk_cache.path", lambda v: None if v == "" else _path(v, relative_to_cwd=False), None
    )
    cache_capacity = r.get("disk_cache.capacity", _size, 0)
    if cache_path is not None and cache_capacity == 0:
        raise r.error(
            "disk_cache.capacity",
            'a positive byte size like "100GiB" when disk_cache.path is set',
            r.table("disk_cache").get("capacity", "0"),
        )
    disk_cache = DiskCacheConfig(path=cache_path, capacity=cache_capacity)

    config = Config(
        file=path,
        server=server,
        log=log,
        backend=backend,
        host_pool=host_pool,
        sources=sources,
        layers=layers,
        disk_cache=disk_cache,
    )
    return _apply(config, overrides)


def _flag(name: str, check: Callable[[Any], _T], value: Any) -> _T:
    try:
        return check(value)
    except _Invalid as exc:
        detail = f"expected {exc.expected}, got {_show(value)}"
        raise ConfigError(_FLAGS[name], None, detail) from None


def _apply(config: Config, o: Overrides) -> Config:
    server, log, backend, sources = config.server, config.log, config.backend, config.sources
    if o.socket is not None:
        socket = _flag("socket", lambda v: _socket_path(v, relative_to_cwd=True), o.socket)
        server = replace(server, socket=socket)
    if o.tcp is not None:
        tcp = _flag("tcp", lambda v: _tcp(v, allow_remote=server.allow_remote), o.tcp)
        server = replace(server, tcp=tcp)
    if o.backend is not None:
        backend = replace(backend, kind=_flag("backend", _choice(BACKEND_KINDS), o.backend))
    if o.log_level is not None:
        log = replace(log, level=_flag("log_level", _choice(LOG_LEVELS), o.log_level))
    if o.allowed_roots:
        roots = [
            _flag("allowed_roots", lambda v: _path(v, relative_to_cwd=True), root)
            for root in o.allowed_roots
        ]
        sources = SourcesConfig(allowed_roots=_unique(root.resolve() for root in roots))
    return replace(config, server=server, log=log, backend=backend, sources=sources)


# --------------------------------------------------------------------------- default_config_toml


def _toml_str(text: str) -> str:
    # A backslash (every regex) reads better in a literal string than doubled in
    # a basic one; everything else, and text a literal string cannot hold, is an
    # escaped basic string.
    controls = any(ord(c) < 0x20 or ord(c) == 0x7F for c in text)
    if "\\" in text and "'" not in text and not controls:
        return f"'{text}'"
    escaped = "".join(
        f"\\u{ord(c):04x}" if ord(c) < 0x20 or ord(c) == 0x7F else c
        for c in text.replace("\\", "\\\\").replace('"', '\\"')
    )
    return f'"{escaped}"'


def _toml_size(n: int) -> str:
    for name, unit in sorted(_BINARY.items(), key=lambda item: -item[1]):
        if n and n % unit == 0:
            return f'"{n // unit}{name[0].upper()}iB"'
    return f'"{n}"'


def _toml_duration(seconds: float) -> str:
    if seconds == int(seconds):
        return f'"{int(seconds)}s"'
    millis = seconds * 1000
    return f'"{int(millis)}ms"' if millis == int(millis) else repr(seconds)


def _toml_list(items: tuple[str, ...]) -> str:
    if not items:
        return "[]"
    return "[\n" + "".join(f"  {_toml_str(item)},\n" for item in items) + "]"


def default_config_toml() -> str:
    """A commented config file holding the defaults for whoever runs this (root or not)."""
    c = load_config(None)
    s, lg, b, lay, dc = c.server, c.log, c.backend, c.layers, c.disk_cache
    return f"""\
# torpord configuration. Every key is optional; the values shown are the
# defaults for the user who printed this file (root and other users differ in
# socket and sources.allowed_roots).
version = {CONFIG_VERSION}

[server]
# Unix socket of the gRPC API. Default: /run/torpor/torpor.sock for root, else
# $XDG_RUNTIME_DIR/torpor/torpor.sock, else /tmp/torpor-$UID/torpor.sock.
socket = {_toml_str(str(s.socket))}
# Permissions of the socket (octal): group members may connect.
socket_mode = "{s.socket_mode:04o}"
# Optional TCP listener: "" (off), "127.0.0.1:50051" or "[::1]:50051".
# A non-loopback address also needs allow_remote = true.
tcp = {_toml_str(s.tcp or "")}
allow_remote = {"true" if s.allow_remote else "false"}
# How long shutdown waits for running transitions: "500ms", "10s", "2m" or seconds.
grace_period = {_toml_duration(s.grace_period)}

[log]
# debug | info | warning | error
level = "{lg.level}"
# auto (console on a TTY, JSON lines otherwise) | json | console
format = "{lg.format}"

[backend]
# auto (cuda if a GPU is visible, else host) | host | cuda
kind = "{b.kind}"

[backend.host]
# Emulated devices (memfd-backed) used by the host backend, 1..{MAX_HOST_DEVICES}.
devices = {b.host.devices}
# Byte sizes take binary (KiB, MiB, GiB, TiB) or decimal (KB, MB, GB, TB) units.
device_capacity = {_toml_size(b.host.device_capacity)}

[host_pool]
# Pinned host memory, allocated at start and accounted exactly.
capacity = {_toml_size(c.host_pool.capacity)}

[sources]
# Directories that models may be loaded from (absolute paths).
allowed_roots = {_toml_list(tuple(str(root) for root in c.sources.allowed_roots))}

[layers]
# Regexes over tensor names. A block pattern's one capture group is the block index.
block_patterns = {_toml_list(lay.block_patterns)}
# Tensors after the last block (final norm, lm_head); the rest before it are "pre".
post_patterns = {_toml_list(lay.post_patterns)}
# Alignment of each tensor inside a slab, in bytes: a power of two >= {MIN_ALIGNMENT}.
alignment = {lay.alignment}

[disk_cache]
# Local cache directory for the DISK tier; "" disables it.
path = {_toml_str(str(dc.path) if dc.path else "")}
capacity = {_toml_size(dc.capacity)}
"""
