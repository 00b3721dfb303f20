"""torpord.config: defaults, validation errors that name file/key/expectation, overrides."""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

import pytest
from torpor.client import default_socket_path
from torpord.config import (
    Config,
    ConfigError,
    Overrides,
    default_config_toml,
    format_size,
    load_config,
    parse_duration,
    parse_size,
)
from torpord.config.model import MetricsConfig, ScrubConfig
from torpord.storage.layers import DEFAULT_LAYER_PATTERNS

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def as_user(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Run as uid 1000 with HOME and XDG_RUNTIME_DIR in tmp_path; returns HOME."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))
    return home


@pytest.fixture
def as_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("os.geteuid", lambda: 0)


def write(tmp_path: Path, body: str, *, versioned: bool = True) -> Path:
    path = tmp_path / "torpord.toml"
    path.write_text(("version = 1\n" if versioned else "") + body)
    return path


def error_for(tmp_path: Path, body: str) -> str:
    path = write(tmp_path, body)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return str(info.value)


# --------------------------------------------------------------------------- defaults


def test_defaults_for_root(as_root: None) -> None:
    config = load_config(None)
    assert config.file is None
    assert config.server.socket == Path("/run/torpor/torpor.sock")
    assert config.server.socket_mode == 0o660
    assert config.server.tcp is None
    assert config.server.allow_remote is False
    assert config.server.grace_period == 10.0
    assert config.sources.allowed_roots == (Path("/var/lib/torpor/models"),)
    assert (config.log.level, config.log.format) == ("info", "auto")
    assert config.backend.kind == "auto"
    assert config.backend.host.devices == 1
    assert config.backend.host.device_capacity == 4 * 2**30
    assert config.backend.cuda.devices == ()
    assert config.backend.cuda.device_memory == 0.9
    assert config.backend.cuda.kernel_cache is None
    assert config.backend.cuda.kernels == "auto"
    assert config.host_pool.capacity == 4 * 2**30
    assert config.layers.block_patterns == DEFAULT_LAYER_PATTERNS.blocks
    assert config.layers.post_patterns == DEFAULT_LAYER_PATTERNS.post
    assert config.layers.alignment == 256
    assert config.disk_cache.path is None
    assert config.disk_cache.capacity == 0


def test_defaults_for_a_user(as_user: Path, tmp_path: Path) -> None:
    config = load_config(None)
    assert config.server.socket == tmp_path / "run" / "torpor" / "torpor.sock"
    assert config.sources.allowed_roots == (
        as_user.resolve(),
        Path(tempfile.gettempdir()).resolve(),
    )


def test_user_socket_without_xdg_runtime_dir(
    as_user: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert load_config(None).server.socket == Path("/tmp/torpor-1000/torpor.sock")


@pytest.mark.parametrize("runtime_dir", [None, "", "/run/user/1000", "run/user/1000", "./run"])
def test_torpord_and_its_clients_agree_on_the_default_socket(
    monkeypatch: pytest.MonkeyPatch, runtime_dir: str | None
) -> None:
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    monkeypatch.delenv("TORPOR_SOCKET", raising=False)
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    if runtime_dir is not None:
        monkeypatch.setenv("XDG_RUNTIME_DIR", runtime_dir)
    expected = (
        "/run/user/1000/torpor/torpor.sock"
        if runtime_dir == "/run/user/1000"
        else ("/tmp/torpor-1000/torpor.sock")
    )
    assert str(load_config(None).server.socket) == default_socket_path() == expected


def test_config_is_frozen() -> None:
    config = load_config(None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.server = config.server  # type: ignore[misc]


def test_a_file_with_only_a_version_gives_the_defaults(tmp_path: Path) -> None:
    path = write(tmp_path, "")
    assert load_config(path) == dataclasses.replace(load_config(None), file=path)


def test_full_file(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        f"""
[server]
socket = "{tmp_path}/t.sock"
socket_mode = "0600"
tcp = "[::1]:50051"
tcp_insecure = true
grace_period = "500ms"
[log]
level = "DEBUG"
format = "json"
[backend]
kind = "host"
[backend.host]
devices = 4
device_capacity = "1.5GB"
[backend.cuda]
devices = ["GPU-5f2c6a1e-0b6d-4c2e-9a1f-3d2e1c0b9a87", "GPU-5f2c6a1e-0b6d-4c2e-9a1f-3d2e1c0b9a87"]
device_memory = "75%"
pinned_chunk = "256MiB"
kernel_cache = "{tmp_path}/kernels"
kernels = "required"
[host_pool]
capacity = 1048576
[sources]
allowed_roots = ["{tmp_path}/a", "{tmp_path}/a/../b"]
[layers]
block_patterns = ['^blk\\.(\\d+)\\.']
post_patterns = []
alignment = 4096
[disk_cache]
path = "{tmp_path}/cache"
capacity = "10GiB"
""",
    )
    config = load_config(path)
    assert config.file == path
    assert config.server.socket == tmp_path / "t.sock"
    assert config.server.socket_mode == 0o600
    assert config.server.tcp == "[::1]:50051"
    assert config.server.tcp_insecure is True
    assert config.server.grace_period == 0.5
    assert (config.log.level, config.log.format) == ("debug", "json")
    assert config.backend.kind == "host"
    assert config.backend.host.devices == 4
    assert config.backend.host.device_capacity == 1_500_000_000
    assert config.backend.cuda.devices == ("GPU-5f2c6a1e-0b6d-4c2e-9a1f-3d2e1c0b9a87",)
    assert config.backend.cuda.device_memory == 0.75
    assert config.backend.cuda.pinned_chunk == 256 * 2**20
    assert config.backend.cuda.kernel_cache == tmp_path / "kernels"
    assert config.backend.cuda.kernels == "required"
    assert config.host_pool.capacity == 2**20
    assert config.sources.allowed_roots == (
        (tmp_path / "a").resolve(),
        (tmp_path / "b").resolve(),
    )
    assert config.layers.block_patterns == (r"^blk\.(\d+)\.",)
    assert config.layers.post_patterns == ()
    assert config.layers.alignment == 4096
    assert config.disk_cache.path == tmp_path / "cache"
    assert config.disk_cache.capacity == 10 * 2**30


@pytest.mark.parametrize("tcp", ["127.0.0.1:50051", "localhost:0", "[::1]:1", "127.1.2.3:65535"])
def test_loopback_tcp_needs_no_allow_remote(tmp_path: Path, tcp: str) -> None:
    body = f'[server]\ntcp = "{tcp}"\ntcp_insecure = true\n'
    assert load_config(write(tmp_path, body)).server.tcp == tcp


def test_remote_tcp_with_allow_remote(tmp_path: Path) -> None:
    body = '[server]\ntcp = "0.0.0.0:50051"\nallow_remote = true\ntcp_insecure = true\n'
    assert load_config(write(tmp_path, body)).server.tcp == "0.0.0.0:50051"


# --------------------------------------------------------------------------- errors


def test_error_names_file_key_expectation_and_value(tmp_path: Path) -> None:
    message = error_for(tmp_path, '[host_pool]\ncapacity = "lots"\n')
    assert message == (
        f"{tmp_path / 'torpord.toml'}: host_pool.capacity: "
        'expected a byte size like "8GiB", got "lots"'
    )


def test_config_error_carries_its_parts(tmp_path: Path) -> None:
    path = write(tmp_path, "[backend.host]\ndevices = 0\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.where == str(path)
    assert info.value.key == "backend.host.devices"
    assert info.value.detail == "expected an integer from 1 to 64, got 0"


@pytest.mark.parametrize(
    ("body", "key", "expected", "got"),
    [
        ('[server]\nsocket = "rel.sock"', "server.socket", "an absolute socket path", '"rel.sock"'),
        (f'[server]\nsocket = "/{"x" * 120}"', "server.socket", "at most 107 bytes", "/xxx"),
        ('[server]\nsocket_mode = "0999"', "server.socket_mode", "an octal mode", '"0999"'),
        ("[server]\nsocket_mode = 660", "server.socket_mode", "an octal mode", "660"),
        ('[server]\ntcp = "x"', "server.tcp", "expected host:port", '"x"'),
        ('[server]\ntcp = "::1:80"', "server.tcp", "expected host:port", '"::1:80"'),
        ('[server]\ntcp = "1.2.3.4:70000"', "server.tcp", "expected host:port", "70000"),
        ('[server]\ntcp = "0.0.0.0:1"', "server.tcp", "server.allow_remote = true", "0.0.0.0:1"),
        ('[server]\nallow_remote = "yes"', "server.allow_remote", "true or false", '"yes"'),
        ('[server]\ngrace_period = "soon"', "server.grace_period", "a duration", '"soon"'),
        ("[server]\ngrace_period = -1", "server.grace_period", "a duration", "-1"),
        ('[log]\nlevel = "loud"', "log.level", "one of debug, info, warning, error", '"loud"'),
        ('[log]\nformat = "xml"', "log.format", "one of auto, json, console", '"xml"'),
        ('[backend]\nkind = "gpu"', "backend.kind", "one of auto, host, cuda", '"gpu"'),
        ('[backend]\nhost = "x"', "backend.host", "a table", '"x"'),
        ("[backend.host]\ndevices = 65", "backend.host.devices", "from 1 to 64", "65"),
        ("[backend.host]\ndevices = true", "backend.host.devices", "from 1 to 64", "true"),
        ('[backend.host]\ndevice_capacity = "0"', "backend.host.device_capacity", "positive", "0"),
        ('[backend.cuda]\ndevices = ["0"]', "backend.cuda.devices[0]", "a GPU UUID", '"0"'),
        ('[backend.cuda]\ndevice_memory = "120%"', "backend.cuda.device_memory", "90%", '"120%"'),
        ('[backend.cuda]\ndevice_memory = "lots"', "backend.cuda.device_memory", "90%", '"lots"'),
        ('[backend.cuda]\npinned_chunk = "0"', "backend.cuda.pinned_chunk", "positive", "0"),
        ('[backend.cuda]\nkernel_cache = "rel"', "backend.cuda.kernel_cache", "absolute", '"rel"'),
        ('[backend.cuda]\nkernels = "off"', "backend.cuda.kernels", "auto, required", '"off"'),
        ('[host_pool]\ncapacity = "8G"', "host_pool.capacity", "byte size", '"8G"'),
        ("[host_pool]\ncapacity = -5", "host_pool.capacity", "byte size", "-5"),
        ("[host_pool]\ncapacity = 1.5", "host_pool.capacity", "byte size", "1.5"),
        ('[sources]\nallowed_roots = "/x"', "sources.allowed_roots", "an array", '"/x"'),
        ("[sources]\nallowed_roots = []", "sources.allowed_roots", "at least one", "[]"),
        ('[sources]\nallowed_roots = ["/a", "b"]', "sources.allowed_roots[1]", "absolute", '"b"'),
        ("[layers]\nblock_patterns = ['(x']", "layers.block_patterns[0]", "valid regular", "(x"),
        ("[layers]\nblock_patterns = ['x']", "layers.block_patterns[0]", "one capture group", "x"),
        (
            "[layers]\nblock_patterns = ['(a)(b)']",
            "layers.block_patterns[0]",
            "one capture group",
            "(a)(b)",
        ),
        ("[layers]\nblock_patterns = []", "layers.block_patterns", "at least one", "[]"),
        ("[layers]\npost_patterns = ['[']", "layers.post_patterns[0]", "valid regular", "["),
        ("[layers]\npost_patterns = [1]", "layers.post_patterns[0]", "a string", "1"),
        ("[layers]\nalignment = 300", "layers.alignment", "power of two", "300"),
        ("[layers]\nalignment = 128", "layers.alignment", "at least 256", "128"),
        ('[disk_cache]\npath = "/c"', "disk_cache.capacity", "when disk_cache.path is set", "0"),
        ('[disk_cache]\npath = "c"\ncapacity = "1GiB"', "disk_cache.path", "absolute", '"c"'),
        ("server = 3", "server", "a table", "3"),
    ],
)
def test_each_error_names_its_key(
    tmp_path: Path, body: str, key: str, expected: str, got: str
) -> None:
    message = error_for(tmp_path, body + "\n")
    assert message.startswith(f"{tmp_path / 'torpord.toml'}: {key}: expected ")
    assert expected in message
    assert got in message.rpartition(", got ")[2]


def test_version_is_required_in_a_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[log]\nlevel = 'info'\n", versioned=False)
    with pytest.raises(ConfigError, match=r"torpord\.toml: version: expected 1 .*got nothing"):
        load_config(path)


@pytest.mark.parametrize("version", ["2", '"1"', "true"])
def test_only_version_1(tmp_path: Path, version: str) -> None:
    path = write(tmp_path, f"version = {version}\n", versioned=False)
    with pytest.raises(ConfigError, match=r"version: expected 1 "):
        load_config(path)


def test_unknown_key_suggests_the_closest(tmp_path: Path) -> None:
    message = error_for(tmp_path, '[server]\nsockte = "/x.sock"\n')
    assert message.endswith('server.sockte: unknown key; did you mean "socket"?')


def test_unknown_key_in_the_wrong_table_points_to_the_right_one(tmp_path: Path) -> None:
    message = error_for(tmp_path, '[server]\nlevel = "debug"\n')
    assert message.endswith('server.level: unknown key; did you mean "log.level"?')


def test_unknown_key_without_a_close_match_lists_the_known_ones(tmp_path: Path) -> None:
    message = error_for(tmp_path, "[host_pool]\nzzz = 1\n")
    assert message.endswith("host_pool.zzz: unknown key; known keys in [host_pool]: capacity")


def test_unknown_table(tmp_path: Path) -> None:
    message = error_for(tmp_path, "[sever]\n")
    assert message.endswith('sever: unknown key; did you mean "server"?')


def test_unknown_nested_key(tmp_path: Path) -> None:
    message = error_for(tmp_path, "[backend.host]\ndevice = 2\n")
    assert message.endswith('backend.host.device: unknown key; did you mean "devices"?')


def test_invalid_toml_names_the_file(tmp_path: Path) -> None:
    message = error_for(tmp_path, "[server\n")
    assert message.startswith(f"{tmp_path / 'torpord.toml'}: invalid TOML: ")
    assert "line" in message


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.toml: cannot read the config file"):
        load_config(tmp_path / "nope.toml")


# --------------------------------------------------------------------------- sizes and durations


@pytest.mark.parametrize(
    ("text", "size"),
    [
        (0, 0),
        (4096, 4096),
        ("0", 0),
        ("4096", 4096),
        ("100B", 100),
        ("8GiB", 8 * 2**30),
        ("512MiB", 512 * 2**20),
        ("1.5GB", 1_500_000_000),
        ("1.5 GiB", 3 * 2**29),
        ("2kb", 2000),
        ("2KiB", 2048),
        ("1TB", 10**12),
        ("1tib", 2**40),
        ("0.5KiB", 512),
        ("1.1B", 1),  # fractions of a byte round down
    ],
)
def test_parse_size(text: str | int, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "lots", "8G", "-1", "1.2.3GiB", "GiB", "8 GiBs", -1, True])
def test_parse_size_rejects(text: str | int) -> None:
    with pytest.raises(ValueError, match="expected a byte size"):
        parse_size(text)


@pytest.mark.parametrize(
    ("n", "text"),
    [(0, "0 B"), (1023, "1023 B"), (1024, "1 KiB"), (3 * 2**29, "1.5 GiB"), (5 * 2**40, "5 TiB")],
)
def test_format_size(n: int, text: str) -> None:
    assert format_size(n) == text


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("500ms", 0.5),
        ("10s", 10.0),
        ("2m", 120.0),
        ("1h", 3600.0),
        ("1.5s", 1.5),
        (3, 3.0),
        (0.25, 0.25),
        ("7", 7.0),
    ],
)
def test_parse_duration(value: str | float, seconds: float) -> None:
    assert parse_duration(value) == seconds


@pytest.mark.parametrize("value", ["", "soon", "10 days", "-1s", -1, float("nan"), True])
def test_parse_duration_rejects(value: str | float) -> None:
    with pytest.raises(ValueError, match="expected a duration"):
        parse_duration(value)


# --------------------------------------------------------------------------- overrides


def test_overrides_replace_the_files_values(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '[server]\ntcp = "127.0.0.1:1"\ntcp_insecure = true\n'
        '[sources]\nallowed_roots = ["/srv/models"]\n',
    )
    overrides = Overrides(
        socket=tmp_path / "o.sock",
        tcp="[::1]:2",
        backend="HOST",
        allowed_roots=(str(tmp_path / "m1"), str(tmp_path / "m2")),
        log_level="warning",
    )
    config = load_config(path, overrides)
    assert config.server.socket == tmp_path / "o.sock"
    assert config.server.tcp == "[::1]:2"
    assert config.backend.kind == "host"
    assert config.sources.allowed_roots == (
        (tmp_path / "m1").resolve(),
        (tmp_path / "m2").resolve(),
    )
    assert config.log.level == "warning"


def test_empty_overrides_change_nothing(tmp_path: Path) -> None:
    path = write(tmp_path, '[sources]\nallowed_roots = ["/srv/models"]\n')
    assert load_config(path, Overrides()).sources.allowed_roots == (Path("/srv/models"),)


def test_empty_tcp_override_turns_tcp_off(tmp_path: Path) -> None:
    path = write(tmp_path, '[server]\ntcp = "127.0.0.1:1"\n')
    assert load_config(path, Overrides(tcp="")).server.tcp is None


def test_relative_flag_paths_are_relative_to_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    config = load_config(None, Overrides(socket=Path("s.sock"), allowed_roots=("models",)))
    assert config.server.socket == tmp_path / "s.sock"
    assert config.sources.allowed_roots == ((tmp_path / "models").resolve(),)


def test_remote_tcp_override_uses_the_files_allow_remote(tmp_path: Path) -> None:
    path = write(tmp_path, "[server]\nallow_remote = true\ntcp_insecure = true\n")
    assert load_config(path, Overrides(tcp="0.0.0.0:9")).server.tcp == "0.0.0.0:9"
    with pytest.raises(ConfigError, match=r"^--tcp: expected a loopback host:port"):
        load_config(None, Overrides(tcp="0.0.0.0:9"))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (Overrides(tcp="x"), r'^--tcp: expected host:port .*, got "x"$'),
        (Overrides(backend="gpu"), r'^--backend: expected one of auto, host, cuda, got "gpu"$'),
        (Overrides(log_level="loud"), r'^--log-level: expected one of .*, got "loud"$'),
        (
            Overrides(allowed_roots=("/ok", "")),
            r'^--allowed-root: expected an absolute path, got ""',
        ),
        (Overrides(socket=Path("/" + "s" * 200)), r"^--socket: expected an absolute socket path"),
    ],
)
def test_override_errors_name_the_flag(overrides: Overrides, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


# --------------------------------------------------------------------------- shipped files


def test_the_systemd_config_parses(as_user: Path) -> None:
    config = load_config(REPO / "systemd" / "torpord.toml")
    assert config.server.socket == Path("/run/torpor/torpor.sock")
    assert config.server.tcp is None
    assert config.sources.allowed_roots == (Path("/var/lib/torpor/models"),)
    assert config.backend.kind == "auto"
    assert config.log.format == "json"
    assert config.host_pool.capacity > 0
    # deploy/README.md scrapes the metrics there; loopback only.
    assert config.metrics == MetricsConfig("127.0.0.1:9400", False, 600.0)
    assert config.scrub == ScrubConfig()  # (shown with its defaults)


@pytest.mark.parametrize("who", ["as_root", "as_user"])
def test_default_config_toml_parses_back_to_the_defaults(
    who: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    request.getfixturevalue(who)
    text = default_config_toml()
    assert text.count("\n# ") >= 10  # it is a commented example, not a bare dump
    path = tmp_path / "default.toml"
    path.write_text(text)
    defaults: Config = load_config(None)
    assert load_config(path) == dataclasses.replace(defaults, file=path)


@pytest.mark.parametrize("which", ["printed default", "systemd"])
def test_config_headers_tell_the_truth_about_version(
    which: str, as_user: Path, tmp_path: Path
) -> None:
    """The header comment says `version` is required, and it is: without it the
    same file is refused; with only it, every other key takes its default."""
    shipped = REPO / "systemd" / "torpord.toml"
    text = default_config_toml() if which == "printed default" else shipped.read_text()
    header = " ".join(
        line.removeprefix("#").strip()
        for line in text.split("\nversion = ", 1)[0].splitlines()
        if line.startswith("#")
    )
    assert "`version` is required" in header and "every key is optional" not in header.lower()
    path = tmp_path / "torpord.toml"
    path.write_text(text.replace("\nversion = 1\n", "\n", 1))
    with pytest.raises(ConfigError, match="version: expected 1"):
        load_config(path)
    path.write_text("version = 1\n")
    assert load_config(path) == dataclasses.replace(load_config(None), file=path)


def test_io_defaults_and_errors(tmp_path: Path) -> None:
    config = load_config(None)
    assert (config.io.chunk_size, config.io.threads, config.io.direct) == (32 * 2**20, 8, "auto")
    good = tmp_path / "io.toml"
    good.write_text('version = 1\n[io]\nchunk_size = "64MiB"\nthreads = 4\ndirect = "OFF"\n')
    config = load_config(good)
    assert (config.io.chunk_size, config.io.threads, config.io.direct) == (64 * 2**20, 4, "off")
    for body, key in (
        ('chunk_size = "1000"', "io.chunk_size"),
        ('chunk_size = "1MiB"\nthreads = 0', "io.threads"),
        ('direct = "sometimes"', "io.direct"),
    ):
        bad = tmp_path / "bad.toml"
        bad.write_text(f"version = 1\n[io]\n{body}\n")
        with pytest.raises(ConfigError, match=key):
            load_config(bad)


def test_agents_on_quiesce_timeout(tmp_path: Path) -> None:
    assert load_config(None).agents.on_quiesce_timeout == "detach"
    path = tmp_path / "agents.toml"
    path.write_text('version = 1\n[agents]\non_quiesce_timeout = "Kill"\n')
    assert load_config(path).agents.on_quiesce_timeout == "kill"
    path.write_text('version = 1\n[agents]\non_quiesce_timeout = "shoot"\n')
    with pytest.raises(ConfigError, match=r"agents\.on_quiesce_timeout.*detach.*kill"):
        load_config(path)
