"""Small enums shared by the core, the backends and the server.

A leaf module: it imports nothing of torpord, so every layer may use it.
"""

from __future__ import annotations

import enum

__all__ = ["Cause", "ModelState", "Outcome", "Stage", "Tier", "TransitionKind"]


class Tier(enum.Enum):
    DEVICE = "DEVICE"
    HOST = "HOST"
    DISK = "DISK"
    SOURCE = "SOURCE"


class ModelState(enum.Enum):
    LOADING = "LOADING"
    ACTIVE = "ACTIVE"
    OFFLOADING = "OFFLOADING"
    OFFLOADED = "OFFLOADED"
    SLEEPING = "SLEEPING"
    ASLEEP = "ASLEEP"
    WAKING = "WAKING"
    UNLOADING = "UNLOADING"
    FAILED = "FAILED"
    UNLOADED = "UNLOADED"  # gone: only in the last snapshot of an unloaded model
    PUBLISHING = "PUBLISHING"  # an image its engine is still writing

    @property
    def transitional(self) -> bool:
        return self in _TRANSITIONAL


_TRANSITIONAL = frozenset(
    {
        ModelState.LOADING,
        ModelState.OFFLOADING,
        ModelState.SLEEPING,
        ModelState.WAKING,
        ModelState.UNLOADING,
        ModelState.PUBLISHING,
    }
)


class TransitionKind(enum.Enum):
    LOAD = "LOAD"
    SLEEP = "SLEEP"
    WAKE = "WAKE"
    OFFLOAD = "OFFLOAD"
    UNLOAD = "UNLOAD"
    PUBLISH = "PUBLISH"


class Stage(enum.Enum):
    PREPARE = "PREPARE"
    READ = "READ"
    TRANSFER = "TRANSFER"
    VERIFY = "VERIFY"
    RELEASE = "RELEASE"
    DONE = "DONE"
    QUIESCE = "QUIESCE"


class Outcome(enum.Enum):
    SUCCEEDED = "SUCCEEDED"
    ROLLED_BACK = "ROLLED_BACK"
    FAILED = "FAILED"


class Cause(enum.Enum):
    """Why a transition ran: a caller asked, or the daemon's policies decided."""

    USER = "USER"  # a caller's Load, Sleep, Wake, Offload or Unload
    ACQUIRE = "ACQUIRE"  # a router's Acquire: a request for the model arrived
    IDLE = "IDLE"  # the model was not used for its idle timeout
    PRESSURE = "PRESSURE"  # memory was needed for another model
    PRELOAD = "PRELOAD"  # warmed ahead of predicted use
    SCHEDULE = "SCHEDULE"  # a configured time window opened or closed
