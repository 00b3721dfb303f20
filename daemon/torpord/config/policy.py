"""`[policy]`, `[policy.default]` and `[[catalogue]]`: the checkers of their
values, and the catalogue's entries (an array of tables, read here)."""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Final

from torpor.windows import EXAMPLE, parse_window

from torpord.config.model import (
    EVICT_TIERS,
    EVICTION_ORDERS,
    GRANULARITIES,
    MAX_ACQUIRE_HOLD,
    MAX_ACQUIRE_PATIENCE,
    MAX_CATALOGUE,
    MAX_IDLE_TIMEOUT,
    MAX_POLICY_INTERVAL,
    MAX_PRELOAD_MIN_USES,
    MAX_PRIORITY,
    MAX_SLEEPING_MODELS,
    MAX_WINDOWS,
    CatalogueEntryConfig,
    ConfigError,
    PolicyConfig,
)
from torpord.config.reader import Reader
from torpord.config.values import (
    Invalid,
    bool_value,
    choice,
    duration_value,
    format_size,
    optional_path,
    show,
    size_value,
    string_value,
)
from torpord.errors import TorporError
from torpord.policies.settings import (
    EvictionOrder,
    Granularity,
    ModelPolicy,
    PolicySettings,
    Window,
)
from torpord.storage.sources import resolve_source
from torpord.types import Tier

__all__ = [
    "CATALOGUE_KEYS",
    "MODEL_ID_PATTERN",
    "MODEL_POLICY_KEYS",
    "POLICY_KEYS",
    "evict_to_value",
    "hold_value",
    "idle_level_value",
    "idle_timeout_value",
    "interval_value",
    "max_sleeping_value",
    "model_policy",
    "patience_value",
    "preload_min_uses_value",
    "priority_value",
    "read_catalogue",
    "read_policy",
]

POLICY_KEYS: Final = (
    "enabled",
    "eviction",
    "granularity",
    "max_sleeping_models",
    "host_limit",
    "preload",
    "preload_min_uses",
    "staging",
    "interval",
    "acquire_patience",
    "acquire_hold",
    "history",
    "default",
)
MODEL_POLICY_KEYS: Final = ("idle_timeout", "idle_level", "priority", "pinned", "evict_to")
CATALOGUE_KEYS: Final = ("id", "source", "device", *MODEL_POLICY_KEYS, "windows")

# The model ids LoadModel accepts (torpord.core.registry.MODEL_ID: a test
# keeps the two equal; the config can't import the core).
MODEL_ID_PATTERN: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_MAX_DEVICE: Final = 128


# --------------------------------------------------------------------------- value checkers


def idle_timeout_value(value: Any) -> float:
    seconds = duration_value(value)
    if seconds > MAX_IDLE_TIMEOUT:
        raise Invalid(f'a duration of at most {MAX_IDLE_TIMEOUT / 86400:g} days ("0s": never)')
    return seconds


def idle_level_value(value: Any) -> int:
    if isinstance(value, bool) or value not in (1, 2):
        raise Invalid("1 (weights kept in host memory) or 2 (weights dropped)")
    return int(value)


def priority_value(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or abs(value) > MAX_PRIORITY:
        raise Invalid(f"an integer from {-MAX_PRIORITY} to {MAX_PRIORITY}")
    return value


def evict_to_value(value: Any) -> Tier:
    return Tier(choice(EVICT_TIERS)(value).upper())


def max_sleeping_value(value: Any) -> int:
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or not 0 <= value <= MAX_SLEEPING_MODELS
    ):
        raise Invalid(f"an integer from 0 (no limit) to {MAX_SLEEPING_MODELS}")
    return value


def interval_value(value: Any) -> float:
    seconds = duration_value(value)
    if not 0.01 <= seconds <= MAX_POLICY_INTERVAL:
        raise Invalid(f'a duration from "10ms" to "{MAX_POLICY_INTERVAL / 60:g}m", like "1s"')
    return seconds


def _at_most(limit: float, zero: str) -> Callable[[Any], float]:
    """A duration from 0 (which means `zero`) to `limit` seconds."""

    def value(value: Any) -> float:
        seconds = duration_value(value)
        if seconds > limit:
            raise Invalid(f'a duration of at most "{limit / 60:g}m" ("0s": {zero})')
        return seconds

    return value


patience_value = _at_most(MAX_ACQUIRE_PATIENCE, "no wait")
hold_value = _at_most(MAX_ACQUIRE_HOLD, "no hold")


def preload_min_uses_value(value: Any) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not 0 < value <= MAX_PRELOAD_MIN_USES
    ):
        raise Invalid(
            f"a number of uses in the next hour, above 0 and at most {MAX_PRELOAD_MIN_USES:g}"
        )
    return float(value)


_CHECKS: Final[Mapping[str, Callable[[Any], Any]]] = {
    "idle_timeout": idle_timeout_value,
    "idle_level": idle_level_value,
    "priority": priority_value,
    "pinned": bool_value,
    "evict_to": evict_to_value,
}


def model_policy(
    where: str,
    table: str,
    values: Mapping[str, Any],
    base: ModelPolicy,
    *,
    disk: bool,
    also: str = "",
) -> ModelPolicy:
    """The keys of MODEL_POLICY_KEYS that `values` has, over `base`; errors name
    `table`.key (and `also`, words naming the entry)."""
    fields: dict[str, Any] = {}
    for key, check in _CHECKS.items():
        if key not in values:
            continue
        try:
            fields[key] = check(values[key])
        except Invalid as exc:
            got = show(values[key])
            detail = f"expected {exc.expected}, got {got}{also}"
            raise ConfigError(where, f"{table}.{key}", detail) from None
    if fields.get("evict_to") is Tier.DISK and not disk:
        raise ConfigError(
            where,
            f"{table}.evict_to",
            f'"disk" needs a disk cache (set disk_cache.path), or use "host" or "source"{also}',
        )
    return replace(base, **fields)


def read_policy(r: Reader, host_capacity: int, *, disk: bool) -> PolicyConfig:
    """`[policy]` and `[policy.default]`, read through `r`."""
    default = model_policy(
        r.where, "policy.default", r.table("policy.default"), ModelPolicy(), disk=disk
    )
    host_limit = r.get("policy.host_limit", size_value, 0)
    if host_limit > host_capacity:
        raise r.error(
            "policy.host_limit",
            f"a byte size up to host_pool.capacity ({format_size(host_capacity)}),"
            ' or "0" for all of it',
            r.table("policy")["host_limit"],
        )
    settings = PolicySettings(
        enabled=r.get("policy.enabled", bool_value, True),
        eviction=EvictionOrder(r.get("policy.eviction", choice(EVICTION_ORDERS), "cost")),
        granularity=Granularity(r.get("policy.granularity", choice(GRANULARITIES), "model")),
        max_sleeping_models=r.get("policy.max_sleeping_models", max_sleeping_value, 0),
        host_limit=host_limit,
        preload=r.get("policy.preload", bool_value, True),
        preload_min_uses=r.get("policy.preload_min_uses", preload_min_uses_value, 1.0),
        staging=r.get("policy.staging", bool_value, True),
        default=default,
    )
    return PolicyConfig(
        settings,
        r.get("policy.interval", interval_value, 1.0),
        r.get("policy.acquire_patience", patience_value, 5.0),
        r.get("policy.acquire_hold", hold_value, 10.0),
        # (Its directory is checked at start: core/activityfile.py.)
        r.get("policy.history", optional_path, None),
    )


# --------------------------------------------------------------------------- [[catalogue]]


def read_catalogue(
    where: str,
    raw: Any,
    default: ModelPolicy,
    roots: Sequence[Path],
    *,
    disk: bool,
) -> tuple[CatalogueEntryConfig, ...]:
    """Every `[[catalogue]]` entry, checked; ConfigError naming `catalogue[i]`."""
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise ConfigError(where, "catalogue", f"expected [[catalogue]] tables, got {show(raw)}")
    if len(raw) > MAX_CATALOGUE:
        raise ConfigError(
            where, "catalogue", f"expected at most {MAX_CATALOGUE} entries, got {len(raw)}"
        )
    entries: list[CatalogueEntryConfig] = []
    seen: dict[str, int] = {}
    for index, values in enumerate(raw):
        entry = _entry(where, index, values, default, roots, disk=disk)
        if entry.model_id in seen:
            raise ConfigError(
                where,
                f"catalogue[{index}].id",
                f'"{entry.model_id}" is already the id of catalogue[{seen[entry.model_id]}]',
            )
        seen[entry.model_id] = index
        entries.append(entry)
    return tuple(entries)


def _entry(
    where: str,
    index: int,
    values: Any,
    default: ModelPolicy,
    roots: Sequence[Path],
    *,
    disk: bool,
) -> CatalogueEntryConfig:
    table = f"catalogue[{index}]"
    if not isinstance(values, dict):
        raise ConfigError(where, table, f"expected a table, got {show(values)}")
    for key in values:
        if key not in CATALOGUE_KEYS:
            close = difflib.get_close_matches(key, CATALOGUE_KEYS, n=1)
            hint = (
                f'did you mean "{close[0]}"?'
                if close
                else "known keys: " + ", ".join(CATALOGUE_KEYS)
            )
            raise ConfigError(where, f"{table}.{key}", f"unknown key; {hint}")
    model_id = values.get("id")
    if not isinstance(model_id, str) or not MODEL_ID_PATTERN.fullmatch(model_id):
        raise ConfigError(
            where,
            f"{table}.id",
            "expected a model id: 1 to 128 characters of [A-Za-z0-9._-], starting with a"
            f" letter or digit, got {show(model_id) if model_id is not None else 'nothing'}",
        )
    also = f' (the entry "{model_id}")'
    source = values.get("source")
    if not isinstance(source, str):
        got = show(source) if source is not None else "nothing"
        raise ConfigError(where, f"{table}.source", f"expected an absolute path, got {got}{also}")
    try:
        resolve_source(source, roots)
    except TorporError as exc:
        raise ConfigError(where, f"{table}.source", f"{exc.message}{also}") from None
    device = values.get("device", "")
    if not isinstance(device, str) or len(device) > _MAX_DEVICE or "\0" in device:
        raise ConfigError(
            where, f"{table}.device", f'expected a device UUID or "", got {show(device)}{also}'
        )
    policy = model_policy(where, table, values, default, disk=disk, also=also)
    windows = _windows(where, table, values.get("windows", []), also)
    return CatalogueEntryConfig(model_id, source, device, replace(policy, windows=windows))


def _windows(where: str, table: str, raw: Any, also: str) -> tuple[Window, ...]:
    if not isinstance(raw, list):
        raise ConfigError(
            where, f"{table}.windows", f"expected an array of windows, got {show(raw)}{also}"
        )
    windows: list[Window] = []
    for index, text in enumerate(raw):
        key = f"{table}.windows[{index}]"
        try:
            text = string_value(text)
            spans = parse_window(text)
        except (Invalid, ValueError) as exc:
            why = str(exc) if isinstance(exc, ValueError) else f"a window like {EXAMPLE}"
            raise ConfigError(where, key, f"{why}, in {show(text)}{also}") from None
        windows += [
            Window(float(s.start), float(s.end), Tier(s.tier.upper()), float(s.lead)) for s in spans
        ]
    if len(windows) > MAX_WINDOWS:
        raise ConfigError(
            where,
            f"{table}.windows",
            f"expected at most {MAX_WINDOWS} days of windows in all (a daily window counts"
            f" 7), got {len(windows)}{also}",
        )
    return tuple(windows)
