"""Reading the file, validating every key, and applying command-line overrides."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, Final, TypeVar

from torpord.config.defaults import (
    default_allowed_roots,
    default_layer_patterns,
    default_socket,
)
from torpord.config.model import (
    BACKEND_KINDS,
    CUDA_KERNELS,
    LOG_FORMATS,
    LOG_LEVELS,
    MIN_ALIGNMENT,
    ON_QUIESCE_TIMEOUT,
    AgentsConfig,
    BackendConfig,
    Config,
    ConfigError,
    CudaBackendConfig,
    DiskCacheConfig,
    HostBackendConfig,
    HostPoolConfig,
    IoConfig,
    LayersConfig,
    LogConfig,
    MetricsConfig,
    Overrides,
    ScrubConfig,
    ServerConfig,
    SourcesConfig,
)
from torpord.config.policy import MODEL_POLICY_KEYS, POLICY_KEYS, read_catalogue, read_policy
from torpord.config.reader import Reader, read_file
from torpord.config.tcpauth import TCP_KEYS, read_tcp_auth
from torpord.config.values import (
    Invalid,
    alignment_value,
    bool_value,
    choice,
    chunk_size_value,
    duration_value,
    gpu_uuid,
    host_devices,
    io_threads,
    memory_share,
    optional_path,
    path_value,
    positive_size,
    rate_value,
    show,
    size_value,
    socket_mode_value,
    socket_path_value,
    string_value,
    tcp_value,
    unique_paths,
)
from torpord.storage.pipeline import DIRECT_MODES

_DEFAULTS_WHERE: Final = "<defaults>"

_T = TypeVar("_T")


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
    "": (
        "version",
        "server",
        "log",
        "backend",
        "host_pool",
        "sources",
        "layers",
        "disk_cache",
        "io",
        "agents",
        "policy",
        "catalogue",
        "metrics",
        "scrub",
    ),
    "server": ("socket", "socket_mode", "tcp", "allow_remote", *TCP_KEYS, "grace_period"),
    "log": ("level", "format"),
    "backend": ("kind", "host", "cuda"),
    "backend.host": ("devices", "device_capacity"),
    "backend.cuda": ("devices", "device_memory", "pinned_chunk", "kernel_cache", "kernels"),
    "host_pool": ("capacity",),
    "sources": ("allowed_roots",),
    "layers": ("block_patterns", "post_patterns", "alignment"),
    "disk_cache": ("path", "capacity"),
    "io": ("chunk_size", "threads", "direct"),
    "agents": ("quiesce_timeout", "on_quiesce_timeout"),
    "policy": POLICY_KEYS,
    "policy.default": MODEL_POLICY_KEYS,
    "metrics": ("listen", "allow_remote", "keep_unloaded"),
    "scrub": ("rate", "interval"),
}


def _check_patterns(blocks: tuple[str, ...], post: tuple[str, ...], reader: Reader) -> None:
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


# --------------------------------------------------------------------------- load_config


def load_config(
    path: Path | None,
    overrides: Overrides = Overrides(),  # noqa: B008 - frozen, so sharing one is safe
) -> Config:
    """Read, validate and freeze the configuration; raises ConfigError.

    `path` None means the embedded defaults (a working single-user setup).
    Overrides from flags are validated like the file's values, errors naming the flag.
    """
    where = _DEFAULTS_WHERE if path is None else str(path)
    r = Reader(where, {} if path is None else read_file(path), _SCHEMA)

    allow_remote = r.get("server.allow_remote", bool_value, False)
    server = ServerConfig(
        socket=r.get(
            "server.socket", lambda v: socket_path_value(v, relative_to_cwd=False), default_socket()
        ),
        socket_mode=r.get("server.socket_mode", socket_mode_value, 0o660),
        tcp=r.get("server.tcp", lambda v: tcp_value(v, allow_remote=allow_remote), None),
        allow_remote=allow_remote,
        grace_period=r.get("server.grace_period", duration_value, 10.0),
        tcp_insecure=r.get("server.tcp_insecure", bool_value, False),
        token_file=r.get("server.token_file", optional_path, None),
        tls_cert=r.get("server.tls_cert", optional_path, None),
        tls_key=r.get("server.tls_key", optional_path, None),
        tls_client_ca=r.get("server.tls_client_ca", optional_path, None),
    )
    log = LogConfig(
        level=r.get("log.level", choice(LOG_LEVELS), "info"),
        format=r.get("log.format", choice(LOG_FORMATS), "auto"),
    )
    backend = BackendConfig(
        kind=r.get("backend.kind", choice(BACKEND_KINDS), "auto"),
        host=HostBackendConfig(
            devices=r.get("backend.host.devices", host_devices, 1),
            device_capacity=r.get("backend.host.device_capacity", positive_size, 4 * 2**30),
        ),
        cuda=CudaBackendConfig(
            devices=tuple(dict.fromkeys(r.get_list("backend.cuda.devices", gpu_uuid) or ())),
            device_memory=r.get("backend.cuda.device_memory", memory_share, 0.9),
            pinned_chunk=r.get("backend.cuda.pinned_chunk", positive_size, 2**30),
            kernel_cache=r.get(
                "backend.cuda.kernel_cache",
                lambda v: None if v == "" else path_value(v, relative_to_cwd=False),
                None,
            ),
            kernels=r.get("backend.cuda.kernels", choice(CUDA_KERNELS), "auto"),
        ),
    )
    host_pool = HostPoolConfig(capacity=r.get("host_pool.capacity", positive_size, 4 * 2**30))

    roots = r.get_list("sources.allowed_roots", lambda v: path_value(v, relative_to_cwd=False))
    if roots == ():
        raise r.error("sources.allowed_roots", "at least one absolute path", [])
    sources = SourcesConfig(
        allowed_roots=default_allowed_roots()
        if roots is None
        else unique_paths(root.resolve() for root in roots)
    )

    blocks = r.get_list("layers.block_patterns", string_value)
    post = r.get_list("layers.post_patterns", string_value)
    if blocks is None or post is None:
        default_blocks, default_post = default_layer_patterns()
        blocks = default_blocks if blocks is None else blocks
        post = default_post if post is None else post
    if not blocks:
        raise r.error("layers.block_patterns", "at least one regular expression", [])
    _check_patterns(blocks, post, r)
    layers = LayersConfig(
        block_patterns=blocks,
        post_patterns=post,
        alignment=r.get("layers.alignment", alignment_value, MIN_ALIGNMENT),
    )

    cache_path = r.get(
        "disk_cache.path", lambda v: None if v == "" else path_value(v, relative_to_cwd=False), None
    )
    cache_capacity = r.get("disk_cache.capacity", size_value, 0)
    if cache_path is not None and cache_capacity == 0:
        raise r.error(
            "disk_cache.capacity",
            'a positive byte size like "100GiB" when disk_cache.path is set',
            r.table("disk_cache").get("capacity", "0"),
        )
    disk_cache = DiskCacheConfig(path=cache_path, capacity=cache_capacity)

    io = IoConfig(
        chunk_size=r.get("io.chunk_size", chunk_size_value, 32 * 2**20),
        threads=r.get("io.threads", io_threads, 8),
        direct=r.get("io.direct", choice(DIRECT_MODES), "auto"),
    )

    agents = AgentsConfig(
        quiesce_timeout=r.get("agents.quiesce_timeout", duration_value, 10.0),
        on_quiesce_timeout=r.get("agents.on_quiesce_timeout", choice(ON_QUIESCE_TIMEOUT), "detach"),
    )

    policy = read_policy(r, host_pool.capacity, disk=cache_path is not None)

    metrics_remote = r.get("metrics.allow_remote", bool_value, False)
    metrics = MetricsConfig(
        listen=r.get(
            "metrics.listen",
            lambda v: tcp_value(v, allow_remote=metrics_remote, remote_key="metrics.allow_remote"),
            None,
        ),
        allow_remote=metrics_remote,
        keep_unloaded=r.get("metrics.keep_unloaded", duration_value, 600.0),
    )
    scrub = ScrubConfig(
        rate=r.get("scrub.rate", rate_value, 256 * 2**20),
        interval=r.get("scrub.interval", duration_value, 3600.0),
    )

    config = Config(
        file=path,
        server=server,
        log=log,
        backend=backend,
        host_pool=host_pool,
        sources=sources,
        layers=layers,
        disk_cache=disk_cache,
        io=io,
        agents=agents,
        policy=policy,
        metrics=metrics,
        scrub=scrub,
    )
    config = _apply(config, overrides)
    # After the overrides: --allowed-root decides where catalogue sources may be.
    catalogue = read_catalogue(
        where,
        r.tables[""].get("catalogue"),
        policy.settings.default,
        config.sources.allowed_roots,
        disk=cache_path is not None,
    )
    config = replace(config, catalogue=catalogue)
    # After the overrides: --tcp can turn the listener on, or off (then no file is read).
    tcp_where = _FLAGS["tcp"] if overrides.tcp else where
    auth = read_tcp_auth(config.server, where, tcp_where)
    return replace(config, server=replace(config.server, tcp_auth=auth))


def _flag(name: str, check: Callable[[Any], _T], value: Any) -> _T:
    try:
        return check(value)
    except Invalid as exc:
        detail = f"expected {exc.expected}, got {show(value)}"
        raise ConfigError(_FLAGS[name], None, detail) from None


def _apply(config: Config, o: Overrides) -> Config:
    server, log, backend, sources = config.server, config.log, config.backend, config.sources
    if o.socket is not None:
        socket = _flag("socket", lambda v: socket_path_value(v, relative_to_cwd=True), o.socket)
        server = replace(server, socket=socket)
    if o.tcp is not None:
        tcp = _flag("tcp", lambda v: tcp_value(v, allow_remote=server.allow_remote), o.tcp)
        server = replace(server, tcp=tcp)
    if o.backend is not None:
        backend = replace(backend, kind=_flag("backend", choice(BACKEND_KINDS), o.backend))
    if o.log_level is not None:
        log = replace(log, level=_flag("log_level", choice(LOG_LEVELS), o.log_level))
    if o.allowed_roots:
        roots = [
            _flag("allowed_roots", lambda v: path_value(v, relative_to_cwd=True), root)
            for root in o.allowed_roots
        ]
        sources = SourcesConfig(allowed_roots=unique_paths(root.resolve() for root in roots))
    return replace(config, server=server, log=log, backend=backend, sources=sources)
