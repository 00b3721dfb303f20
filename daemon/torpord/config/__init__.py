"""The daemon's configuration: one versioned TOML file, validated once at start.

`load_config` reads the file (or nothing: the embedded defaults are a working
setup), applies the few command-line overrides and returns a frozen `Config`.
Every mistake is a `ConfigError` whose message names where it came from (the
file or the flag), the dotted key, what was expected and what was found, so an
operator can fix it from the journal line alone:

    /etc/torpor/torpord.toml: host_pool.capacity: expected a byte size like "8GiB", got "lots"

Nothing downstream re-validates: a `Config` that exists is a valid one.
"""

from torpord.config.loader import load_config
from torpord.config.model import (
    BACKEND_KINDS,
    CONFIG_VERSION,
    LOG_FORMATS,
    LOG_LEVELS,
    AgentsConfig,
    BackendConfig,
    CatalogueEntryConfig,
    Config,
    ConfigError,
    DiskCacheConfig,
    HostBackendConfig,
    HostPoolConfig,
    IoConfig,
    LayersConfig,
    LogConfig,
    Overrides,
    PolicyConfig,
    Secret,
    ServerConfig,
    SourcesConfig,
    TcpAuth,
)
from torpord.config.model import MAX_HOST_DEVICES as MAX_HOST_DEVICES
from torpord.config.model import MIN_ALIGNMENT as MIN_ALIGNMENT
from torpord.config.render import default_config_toml
from torpord.config.values import format_size, parse_duration, parse_size

__all__ = [
    "BACKEND_KINDS",
    "CONFIG_VERSION",
    "LOG_FORMATS",
    "LOG_LEVELS",
    "AgentsConfig",
    "BackendConfig",
    "CatalogueEntryConfig",
    "Config",
    "ConfigError",
    "DiskCacheConfig",
    "HostBackendConfig",
    "HostPoolConfig",
    "IoConfig",
    "LayersConfig",
    "LogConfig",
    "Overrides",
    "PolicyConfig",
    "Secret",
    "ServerConfig",
    "SourcesConfig",
    "TcpAuth",
    "default_config_toml",
    "format_size",
    "load_config",
    "parse_duration",
    "parse_size",
]
