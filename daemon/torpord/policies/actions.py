"""What a policy decides: actions, each run as an ordinary transition.

The daemon runs them through its verbs with the action's cause; the
simulator applies them to its simulated node.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from torpord.types import Cause, Tier

__all__ = ["Action", "Load", "Offload", "Refusal", "Sleep", "Unload", "Wake"]


@dataclass(frozen=True)
class Sleep:
    model_id: str
    level: int  # 1: to host; 2: weights dropped
    cause: Cause
    disk_copy: bool = False  # (level 2) keep a disk copy to wake from


@dataclass(frozen=True)
class Offload:
    model_id: str
    layers: tuple[str, ...]  # () = every layer
    tier: Tier  # DEVICE, HOST or DISK
    cause: Cause


@dataclass(frozen=True)
class Wake:
    model_id: str
    cause: Cause


@dataclass(frozen=True)
class Load:
    model_id: str  # a catalogue entry
    source: str
    tier: Tier  # DEVICE or HOST
    cause: Cause


@dataclass(frozen=True)
class Unload:
    model_id: str
    cause: Cause


Action = Sleep | Offload | Wake | Load | Unload


@dataclass(frozen=True)
class Refusal:
    """Why nothing evictable would make room: model id → why it can't go
    ("pinned", "in use", "in transition", "asked for"; "nowhere to go" for an
    image with neither host nor disk room, "failed" for a FAILED model holding
    memory), and the bytes still
    missing. The daemon answers RESOURCE_EXHAUSTED with these as metadata."""

    pool: str
    needed: int
    short: int  # bytes that evicting everything evictable would still leave missing
    blocked: Mapping[str, str] = field(default_factory=dict)
