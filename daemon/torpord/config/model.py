"""The typed, frozen result of loading a configuration, and the error it raises."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from torpord.policies.settings import ModelPolicy, PolicySettings

CONFIG_VERSION: Final = 1
LOG_LEVELS: Final = ("debug", "info", "warning", "error")
LOG_FORMATS: Final = ("auto", "json", "console")
BACKEND_KINDS: Final = ("auto", "host", "cuda")
MAX_HOST_DEVICES: Final = 64
MIN_ALIGNMENT: Final = 256

# Bounds of per-model policies: the config's and the API's (core/policy.py).
MAX_PRIORITY: Final = 1000  # priorities are -MAX_PRIORITY..MAX_PRIORITY
MAX_IDLE_TIMEOUT: Final = 30 * 86400.0  # seconds
MAX_WINDOWS: Final = 64  # per model, one per day a window names ("daily": 7)
MAX_CATALOGUE: Final = 1024  # catalogue entries, config and RegisterModel together
MAX_SLEEPING_MODELS: Final = 100_000
MAX_POLICY_INTERVAL: Final = 3600.0  # seconds between two housekeeping rounds
MAX_ACQUIRE_PATIENCE: Final = 600.0  # seconds an Acquire may wait for models in use
MAX_ACQUIRE_HOLD: Final = 600.0  # seconds a model an Acquire made ready is held
MAX_PRELOAD_MIN_USES: Final = 1e6  # expected uses in the next hour
EVICTION_ORDERS: Final = ("cost", "lru", "lfu")
GRANULARITIES: Final = ("model", "layers")
EVICT_TIERS: Final = ("host", "disk", "source")


class ConfigError(Exception):
    """An invalid configuration; the message is meant for the operator as is."""

    def __init__(self, where: str, key: str | None, detail: str) -> None:
        self.where = where  # the file, "<defaults>", or a flag such as "--tcp"
        self.key = key  # dotted key ("server.tcp"), None for whole-file problems and flags
        self.detail = detail
        super().__init__(f"{where}: {key}: {detail}" if key else f"{where}: {detail}")


class Secret:
    """Bytes that must not reach a log line or an error: repr() hides them."""

    __slots__ = ("_value",)

    def __init__(self, value: bytes) -> None:
        self._value = value

    def reveal(self) -> bytes:
        return self._value

    def __repr__(self) -> str:
        return "Secret(<hidden>)"


@dataclass(frozen=True)
class TcpAuth:
    """What the TCP listener asks of a caller, read from the files at load.

    A token, a client certificate signed by `tls_client_ca` (mutual TLS), or
    both: every one given is required. Neither is only possible with
    server.tcp_insecure = true.
    """

    token: Secret | None = None
    tls_cert_chain: bytes | None = None  # the server's certificate (chain), PEM
    tls_private_key: Secret | None = None  # its private key, PEM
    tls_client_ca: bytes | None = None  # clients' certificates must chain to these, PEM

    @property
    def insecure(self) -> bool:
        return self.token is None and self.tls_client_ca is None

    @property
    def mode(self) -> str:
        """How callers are authenticated, for the log: "mtls+token", "token", "insecure"..."""
        parts = ["mtls" if self.tls_client_ca else "tls"] if self.tls_cert_chain else []
        parts += ["token"] if self.token else []
        return "+".join(parts) if not self.insecure else "+".join([*parts, "insecure"])


@dataclass(frozen=True)
class ServerConfig:
    socket: Path
    socket_mode: int
    tcp: str | None  # normalised "host:port" / "[v6]:port", None when off
    allow_remote: bool
    grace_period: float  # seconds
    tcp_insecure: bool = False  # a TCP listener without credentials, on purpose
    token_file: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    tcp_auth: TcpAuth | None = None  # read from the files above; None when TCP is off


@dataclass(frozen=True)
class LogConfig:
    level: str  # one of LOG_LEVELS
    format: str  # one of LOG_FORMATS


@dataclass(frozen=True)
class HostBackendConfig:
    devices: int
    device_capacity: int  # bytes per emulated device


CUDA_KERNELS = ("auto", "required")


@dataclass(frozen=True)
class CudaBackendConfig:
    devices: tuple[str, ...]  # GPU UUIDs; empty: every visible GPU
    device_memory: float | int  # a float is a share of each GPU's memory, an int bytes
    pinned_chunk: int  # bytes page-locked per registration of the host pool
    kernel_cache: Path | None  # compiled kernels; None: CuPy's default directory
    kernels: str = "auto"  # one of CUDA_KERNELS: "required" refuses to start without them


@dataclass(frozen=True)
class BackendConfig:
    kind: str  # one of BACKEND_KINDS; "auto" is resolved by whoever builds the backend
    host: HostBackendConfig
    cuda: CudaBackendConfig


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
class IoConfig:
    chunk_size: int  # bytes per read
    threads: int  # read workers per load
    direct: str  # one of DIRECT_MODES


@dataclass(frozen=True)
class DiskCacheConfig:
    path: Path | None  # None: disabled
    capacity: int


ON_QUIESCE_TIMEOUT = ("detach", "kill")


@dataclass(frozen=True)
class AgentsConfig:
    quiesce_timeout: float  # seconds an engine has to let go of a model's weights
    on_quiesce_timeout: str = "detach"  # one of ON_QUIESCE_TIMEOUT: "detach" or "kill"


@dataclass(frozen=True)
class PolicyConfig:
    """`[policy]` and `[policy.default]`."""

    settings: PolicySettings = field(default_factory=PolicySettings)
    interval: float = 1.0  # seconds between two rounds of the daemon's housekeeping
    # Seconds an Acquire waits for models in use or in a transition to be let
    # go of before it answers RESOURCE_EXHAUSTED (0: at once).
    acquire_patience: float = 5.0
    # Seconds a model an Acquire made ready is held in use (not evicted, not
    # put to sleep) unless its engine or router reports a use of it first.
    acquire_hold: float = 10.0
    # The file models' activity history is kept in across restarts; None: not kept.
    history: Path | None = None


@dataclass(frozen=True)
class MetricsConfig:
    """`[metrics]`: Prometheus's /metrics over HTTP."""

    listen: str | None = None  # normalised "host:port", None when off
    allow_remote: bool = False  # a non-loopback listen address, on purpose
    # Seconds a model unloaded for good keeps its series (torpord.metrics.exporter).
    keep_unloaded: float = 600.0


@dataclass(frozen=True)
class ScrubConfig:
    """`[scrub]`: background checks of sleeping models' host and disk copies."""

    rate: int = 256 * 2**20  # bytes checked per second at most; 0: off
    # Seconds from a clean check of a copy to the next (a new copy is checked
    # within seconds: core/scrubplan.py).
    interval: float = 3600.0


@dataclass(frozen=True)
class CatalogueEntryConfig:
    """One `[[catalogue]]` entry: a model Acquire can load, and its policy
    (the entry's keys over `[policy.default]`)."""

    model_id: str
    source: str  # absolute, under an allowed root (checked as LoadModel checks it)
    device: str  # a UUID or "devices/{uuid}" (checked at start); "" for any
    policy: ModelPolicy


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
    io: IoConfig
    agents: AgentsConfig
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    catalogue: tuple[CatalogueEntryConfig, ...] = ()
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    scrub: ScrubConfig = field(default_factory=ScrubConfig)


@dataclass(frozen=True)
class Overrides:
    """The fields command-line flags may override; None / () leaves the file's value."""

    socket: Path | None = None
    tcp: str | None = None  # "" turns a configured TCP listener off
    backend: str | None = None
    allowed_roots: tuple[str, ...] = ()  # non-empty replaces the file's list
    log_level: str | None = None
