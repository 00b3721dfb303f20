"""A caller's policy for one model: the fields it set, checked, laid over a base.

A request (LoadModel, RegisterModel, SetModelPolicy) may set any field of a
model's policy; what it leaves unset comes from the model's catalogue entry,
else the config's `[policy.default]`. Every field set is checked here against
the bounds the config uses too, and a bad one is INVALID_ARGUMENT with reason
INVALID_POLICY naming the field, before anything changes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from torpor.windows import MAX_LEAD, WEEK

from torpord.config.model import MAX_IDLE_TIMEOUT, MAX_PRIORITY, MAX_WINDOWS
from torpord.errors import FailedPrecondition, InvalidArgument
from torpord.policies.settings import ModelPolicy, Window
from torpord.types import Tier

__all__ = ["EVICT_TO", "PolicyOverrides", "check_policy"]

EVICT_TO = (Tier.HOST, Tier.DISK, Tier.SOURCE)


@dataclass(frozen=True)
class PolicyOverrides:
    """The fields a request set (None: unset). `windows` empty: unset (a
    request can't tell an empty list from none); `clear_windows` removes
    them (SetModelPolicy's flag)."""

    idle_timeout: float | None = None
    idle_level: int | None = None
    priority: int | None = None
    pinned: bool | None = None
    evict_to: Tier | None = None
    windows: tuple[Window, ...] = ()
    clear_windows: bool = False

    def over(self, base: ModelPolicy) -> ModelPolicy:
        """`base` with the fields this sets."""
        fields: dict[str, Any] = {
            name: value
            for name, value in (
                ("idle_timeout", self.idle_timeout),
                ("idle_level", self.idle_level),
                ("priority", self.priority),
                ("pinned", self.pinned),
                ("evict_to", self.evict_to),
            )
            if value is not None
        }
        if self.windows or self.clear_windows:
            fields["windows"] = self.windows
        return replace(base, **fields)

    @property
    def empty(self) -> bool:
        return self == PolicyOverrides()


def _invalid(field: str, message: str, value: object) -> InvalidArgument:
    return InvalidArgument(
        f"policy.{field}: {message}",
        reason="INVALID_POLICY",
        metadata={"field": f"policy.{field}", "value": str(value)[:64]},
    )


def check_policy(policy: PolicyOverrides, *, disk: bool) -> None:
    """INVALID_ARGUMENT (INVALID_POLICY, the field in metadata) for a field out
    of range; FAILED_PRECONDITION (DISK_CACHE_DISABLED) for evict_to DISK
    without a disk cache (`disk`: the daemon has one)."""
    timeout = policy.idle_timeout
    if timeout is not None and not 0 <= timeout <= MAX_IDLE_TIMEOUT:  # (NaN fails both)
        raise _invalid(
            "idle_timeout",
            f"expected 0 (never) to {MAX_IDLE_TIMEOUT / 86400:g} days, got {timeout:g}s",
            timeout,
        )
    if policy.idle_level is not None and policy.idle_level not in (1, 2):
        raise _invalid("idle_level", f"expected 1 or 2, got {policy.idle_level}", policy.idle_level)
    if policy.priority is not None and abs(policy.priority) > MAX_PRIORITY:
        raise _invalid(
            "priority",
            f"expected {-MAX_PRIORITY} to {MAX_PRIORITY}, got {policy.priority}",
            policy.priority,
        )
    if policy.evict_to is not None and policy.evict_to not in EVICT_TO:
        raise _invalid(
            "evict_to",
            f"an evicted model goes to HOST, DISK or SOURCE, not {policy.evict_to.value}",
            policy.evict_to.value,
        )
    if policy.evict_to is Tier.DISK and not disk:
        raise FailedPrecondition(
            "policy.evict_to: DISK needs a disk cache, and none is configured"
            " (disk_cache.path in torpord's config); use HOST or SOURCE",
            reason="DISK_CACHE_DISABLED",
            metadata={"field": "policy.evict_to"},
        )
    if policy.clear_windows and policy.windows:
        raise InvalidArgument(
            "clear_windows: clearing a model's windows and setting them in the same"
            " request contradict each other; give one or the other",
            reason="INVALID_POLICY",
            metadata={"field": "clear_windows", "value": "true"},
        )
    if len(policy.windows) > MAX_WINDOWS:
        raise _invalid(
            "windows",
            f"expected at most {MAX_WINDOWS} windows, got {len(policy.windows)}",
            len(policy.windows),
        )
    for index, window in enumerate(policy.windows):
        _check_window(index, window)


def _check_window(index: int, window: Window) -> None:
    field = f"windows[{index}]"
    for name, value in (("start", window.start), ("end", window.end)):
        if not (math.isfinite(value) and 0 <= value < WEEK):
            raise _invalid(
                f"{field}.{name}",
                f"expected an offset from Monday 00:00 UTC, 0 to under {WEEK:g}s (a week),"
                f" got {value:g}s",
                value,
            )
    if window.start == window.end:
        raise _invalid(f"{field}.end", "the window is empty (it ends when it starts)", window.end)
    if window.tier not in (Tier.HOST, Tier.DEVICE):
        raise _invalid(
            f"{field}.tier",
            f"a model is warmed to HOST or DEVICE, not {window.tier.value}",
            window.tier.value,
        )
    if not 0 <= window.lead <= MAX_LEAD:
        raise _invalid(
            f"{field}.lead",
            f"expected 0 to {MAX_LEAD:g}s (a day), got {window.lead:g}s",
            window.lead,
        )
