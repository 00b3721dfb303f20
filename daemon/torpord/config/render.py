"""`default_config_toml`: the defaults written out as a commented config file."""

from __future__ import annotations

from torpord.config.loader import load_config
from torpord.config.model import (
    CONFIG_VERSION,
    MAX_CATALOGUE,
    MAX_HOST_DEVICES,
    MAX_PRIORITY,
    MIN_ALIGNMENT,
)
from torpord.config.values import BINARY_UNITS


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


def _toml_share(value: float | int) -> str:
    if isinstance(value, float):
        return _toml_str(f"{value * 100:g}%")
    return _toml_size(value)


def _toml_size(n: int) -> str:
    for name, unit in sorted(BINARY_UNITS.items(), key=lambda item: -item[1]):
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
    p, d = c.policy.settings, c.policy.settings.default
    return f"""\
# torpord configuration. `version` is required (the format of this file);
# every other key is optional, and the values shown are the defaults for the
# user who printed this file (root and other users differ in socket and
# sources.allowed_roots).
version = {CONFIG_VERSION}

[server]
# Unix socket of the gRPC API. Default: /run/torpor/torpor.sock for root, else
# $XDG_RUNTIME_DIR/torpor/torpor.sock, else /tmp/torpor-$UID/torpor.sock.
# Its directory must be owned by torpord's user or root and not be writable
# by group or others (torpord makes it when it is missing).
socket = {_toml_str(str(s.socket))}
# Permissions of the socket (octal): group members may connect.
socket_mode = "{s.socket_mode:04o}"
# Optional TCP listener: "" (off), "127.0.0.1:50051" or "[::1]:50051".
# A non-loopback address also needs allow_remote = true.
tcp = {_toml_str(s.tcp or "")}
allow_remote = {"true" if s.allow_remote else "false"}
# Who may use the TCP listener: callers with the bearer token held in
# token_file ("authorization: Bearer <token>"), with a client certificate
# signed by tls_client_ca (mutual TLS; needs tls_cert and tls_key), or both
# when both are set. Without them torpord refuses to start a TCP listener,
# unless tcp_insecure = true: then everyone who can connect may do anything.
# A token without TLS is allowed on a loopback address only. The token file
# (one line, e.g. from `openssl rand -hex 32`) and the key must be owned by
# root or torpord's user and not be accessible by others (chmod o=).
tcp_insecure = {"true" if s.tcp_insecure else "false"}
token_file = {_toml_str(str(s.token_file or ""))}
# PEM files: the server's certificate (chain) and key, and the CA(s) that
# sign client certificates.
tls_cert = {_toml_str(str(s.tls_cert or ""))}
tls_key = {_toml_str(str(s.tls_key or ""))}
tls_client_ca = {_toml_str(str(s.tls_client_ca or ""))}
# How long shutdown waits for running transitions: "500ms", "10s", "2m" or seconds.
grace_period = {_toml_duration(s.grace_period)}

[log]
# debug | info | warning | error
level = "{lg.level}"
# auto (console on a TTY, JSON lines otherwise) | json | console
format = "{lg.format}"

[backend]
# auto (cuda if the driver reports a GPU and the CUDA backend starts, else
# host) | host | cuda
kind = "{b.kind}"

[backend.host]
# Emulated devices (memfd-backed) used by the host backend, 1..{MAX_HOST_DEVICES}.
devices = {b.host.devices}
# Byte sizes take binary (KiB, MiB, GiB, TiB) or decimal (KB, MB, GB, TB) units.
device_capacity = {_toml_size(b.host.device_capacity)}

[backend.cuda]
# GPUs to use, by UUID (nvidia-smi -L); [] uses every visible GPU.
devices = {_toml_list(b.cuda.devices)}
# How much of each GPU's memory the daemon may hold: "90%" or a byte size.
device_memory = {_toml_share(b.cuda.device_memory)}
# The pinned host pool is page-locked in registrations of this size.
pinned_chunk = {_toml_size(b.cuda.pinned_chunk)}
# Where compiled CUDA kernels are kept between runs ("": CuPy's default).
kernel_cache = {_toml_str(str(b.cuda.kernel_cache) if b.cuda.kernel_cache else "")}

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

[io]
# Each source file is read in chunks of this size (a multiple of 4KiB, >= 1MiB)
chunk_size = {_toml_size(c.io.chunk_size)}
# by this many threads, across every file of a checkpoint at once.
threads = {c.io.threads}
# O_DIRECT: auto (bytes already in the page cache are copied straight from it,
# the rest read with O_DIRECT) | on (always O_DIRECT) | off (buffered reads).
# A filesystem that refuses O_DIRECT gets buffered reads, and the Load says so.
direct = "{c.io.direct}"

[agents]
# How long an attached engine has to stop using a model's weights and unmap
# them when the model sleeps, offloads or unloads. One that takes longer (or
# whose process died) is detached, its exports revoked, and the transition
# goes on.
quiesce_timeout = {_toml_duration(c.agents.quiesce_timeout)}
# What else happens to such an engine: detach (only that) | kill (SIGKILL its
# process too). On a GPU the memory an engine imported lives until its process
# lets go or exits, so after "detach" the pools count it used, as held, until
# then; "kill" gives it back at once.
on_quiesce_timeout = "{c.agents.on_quiesce_timeout}"

[policy]
# The daemon's own decisions: idle models go to sleep, models are evicted
# (instead of RESOURCE_EXHAUSTED) when a Load, Wake or Acquire needs room,
# and models are warmed ahead of their windows. false: it only does what
# callers ask.
enabled = {"true" if p.enabled else "false"}
# Who is evicted first: cost (keep what is expensive to bring back and likely
# to be used soon) | lru (least recently used) | lfu (least often used).
eviction = "{p.eviction.value}"
# model (evict whole models) | layers (just enough layers, last first).
granularity = "{p.granularity.value}"
# Models asleep at level 1 (weights in host memory) kept at most; the coldest
# beyond it go down to level 2 or disk. 0: no limit.
max_sleeping_models = {p.max_sleeping_models}
# Host memory sleepers may hold; "0": all of host_pool.capacity.
host_limit = {_toml_size(p.host_limit)}
# Load the catalogue entries, and read back the level-2 sleepers, that their
# access history predicts into host memory left free beyond the devices'
# capacity (never evicting, never waking a sleeper)
preload = {"true" if p.preload else "false"}
# when they are expected to be used at least this often in the next hour
# (from recent use and the same hour in past weeks; one use an hour ago
# reads about 0.5).
preload_min_uses = {p.preload_min_uses:g}
# An Acquire of a model on its source or disk copy that needs room made on
# the device reads it into host memory first, so the models evicted for it
# serve until the fast copy from there. false: read straight to the device.
staging = {"true" if p.staging else "false"}
# How often the daemon looks at idle timeouts, limits and windows.
interval = {_toml_duration(c.policy.interval)}
# How long an Acquire waits for models in use or in a transition to be let
# go of when only they could make room, before RESOURCE_EXHAUSTED ("0s": it
# answers at once, as a Load or Wake does).
acquire_patience = {_toml_duration(c.policy.acquire_patience)}
# How long a model an Acquire made ready is held in use (never evicted nor
# put to sleep), so the request it was made ready for can reach it, unless
# its engine or router reports a use of it first ("0s": no hold).
acquire_hold = {_toml_duration(c.policy.acquire_hold)}
# A file the daemon keeps each model's use in (last use, uses, the hours of
# the week it is used: what predicted preloads read) across restarts, saved
# every few minutes and at shutdown. "": the history starts empty each start.
history = {_toml_str(str(c.policy.history) if c.policy.history else "")}

[policy.default]
# Every model's policy unless its Load, its catalogue entry or SetModelPolicy
# says otherwise. Sleep after this long without use ("0s": never)
idle_timeout = {_toml_duration(d.idle_timeout)}
# at this level (1: weights kept in host memory, 2: dropped).
idle_level = {d.idle_level}
# Higher is kept longer when memory is needed: -{MAX_PRIORITY}..{MAX_PRIORITY}.
priority = {d.priority}
# Never evicted, never put to sleep by the daemon.
pinned = {"true" if d.pinned else "false"}
# Where an evicted model goes: host (level-1 sleep) | disk (level-2 sleep with
# a copy in the disk cache; needs disk_cache.path) | source (level-2 sleep).
evict_to = "{d.evict_to.value.lower()}"

[metrics]
# Prometheus metrics at http://HOST:PORT/metrics ("127.0.0.1:9400", say); ""
# turns them off. Only a loopback address unless allow_remote = true: the
# figures name every model on the node.
listen = {_toml_str(c.metrics.listen or "")}
allow_remote = {"true" if c.metrics.allow_remote else "false"}
# A model unloaded for good keeps its series this long, last values and all,
# so that every Prometheus scraping the node (an HA pair) sees them.
keep_unloaded = {_toml_duration(c.metrics.keep_unloaded)}

[scrub]
# The copies of models' layers that are not on a device (a sleeping model's
# host copy, layers offloaded to host, disk cache entries) are checked against
# their checksums in the background, at most this many bytes a second ("0":
# never; otherwise at least one), so a copy that rotted is found and refused
# before a wake serves it.
rate = {_toml_size(c.scrub.rate) if c.scrub.rate else '"0"'}
# A new copy is checked a few seconds after it is made (5 s, or this if
# shorter), ahead of any re-check; a copy found clean is checked again this
# long after.
interval = {_toml_duration(c.scrub.interval)}

# Models the daemon may load itself when an Acquire asks for them (at most
# {MAX_CATALOGUE} entries, these and RegisterModel's together): an id, a source
# under sources.allowed_roots, optionally a device, and any key of
# [policy.default] for this model. `windows`: weekly times (UTC) the model is
# wanted; it is warmed `lead` (default 5m) before each opens, to host memory
# (default) or to the device. Days: Mon..Sun, ranges ("Fri-Mon"), lists
# ("Mon,Thu") or "daily"; an end at or before the start runs into the next day.
#
# [[catalogue]]
# id = "llama-8b"
# source = "/var/lib/torpor/models/llama-3-8b"
# device = ""
# idle_timeout = "10m"
# priority = 10
# windows = ["Mon-Fri 08:00-18:00", "daily 20:00-02:00", "Sat 10:00-12:00 device lead 10m"]
"""
