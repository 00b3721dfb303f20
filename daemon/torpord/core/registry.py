"""The models the daemon holds, by id, and the rules for ids and sources.

The registry answers what exists and in what state (NOT_FOUND, ABORTED for a
busy model, FAILED_PRECONDITION for a wrong state); it also keeps the Loads
still validating their checkpoint, which hold an id before their model exists.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass, field
from pathlib import Path

from torpord.core.activity import ActivityLog
from torpord.core.catalogue import Catalogue
from torpord.core.model import LayerState, Model, ModelSnapshot, Running
from torpord.core.policy import PolicyOverrides
from torpord.errors import Aborted, AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from torpord.storage.checkpoint import open_checkpoint
from torpord.storage.diskcache import cache_key
from torpord.storage.gcpause import gc_paused
from torpord.storage.layers import LayerPatterns, LayerPlan, layout_hash, plan_layers
from torpord.storage.safetensors import Checkpoint
from torpord.types import Cause, ModelState

__all__ = [
    "MODEL_ID",
    "Registry",
    "Validation",
    "busy",
    "check_model_id",
    "exists",
    "plan_source",
    "prepare",
    "wrong_state",
]

MODEL_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


@dataclass(frozen=True)
class Validation:
    """A Load still validating its checkpoint (it holds the id before its
    model exists): its call's task (a forced Unload stops it), the end a
    retry without waiting waits for, and its source (resolved) and cause
    (core/loads.py)."""

    running: Running
    source: str
    cause: Cause
    done: asyncio.Future[None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class Registry:
    def __init__(
        self, activity: ActivityLog | None = None, catalogue: Catalogue | None = None
    ) -> None:
        self.models: dict[str, Model] = {}
        # Each model's use, kept by id (the manager's, which knows the catalogue).
        if activity is None:
            activity = ActivityLog(lambda model_id: model_id in self.models)
        self.activity = activity
        # What models get their policy from, and whether they are registered.
        self.catalogue = catalogue if catalogue is not None else Catalogue()
        # Ids whose Load is still validating the checkpoint.
        self.validating: dict[str, Validation] = {}

    def validate(self, model_id: str, running: Running, source: str, cause: Cause) -> Validation:
        """Hold `model_id` for a Load validating its checkpoint (the Load
        removes it from `validating` when done, then sets `done`)."""
        validation = self.validating[model_id] = Validation(running, source, cause)
        return validation

    def get(self, model_id: str) -> ModelSnapshot:
        return self.model(model_id).snapshot()

    def find(self, model_id: str) -> Model | None:
        return self.models.get(model_id)

    def snapshots(self) -> list[ModelSnapshot]:
        return [self.models[k].snapshot() for k in sorted(self.models)]

    def add(self, model: Model) -> None:
        """Hold `model` from now on, with its id's record of use."""
        model.activity = self.activity.of(model.model_id)
        self.models[model.model_id] = model

    def remove(self, model_id: str) -> None:
        """No longer hold `model_id` (its record of use goes unless the id is
        still known: registered in the catalogue)."""
        del self.models[model_id]
        self.activity.release(model_id)

    def model(self, model_id: str) -> Model:
        """The model (NOT_FOUND, or INVALID_MODEL_ID for an id none can have)."""
        model = self.models.get(model_id)
        if model is None:
            check_model_id(model_id)
            raise NotFound(
                f"model {model_id!r} not found",
                reason="MODEL_NOT_FOUND",
                metadata={"model_id": model_id},
            )
        return model

    def idle(self, model_id: str) -> Model:
        """The model, if no transition of it is running (else ABORTED)."""
        model = self.model(model_id)
        if model.busy or model.state.transitional:
            raise busy(model_id, model.state.value)
        return model

    def adopt(self, model: Model, policy: PolicyOverrides = PolicyOverrides()) -> None:  # noqa: B008 - frozen
        """Give a new model its policy (`policy`'s fields over its catalogue
        entry's, else the defaults') and say whether it is registered."""
        model.policy = policy.over(self.catalogue.policy_for(model.model_id))
        model.registered = model.model_id in self.catalogue

    def disk_keys(self) -> set[str]:
        """Disk copies some model uses: never evicted to make room."""
        return {
            layer.disk.key
            for model in self.models.values()
            for layer in model.layers
            if layer.disk is not None
        }


def plan_source(
    path: str, allowed_roots: tuple[Path, ...], patterns: LayerPatterns, alignment: int
) -> tuple[Checkpoint, tuple[LayerPlan, ...]]:
    """Open and validate a source and plan its layers, as every Load does
    (blocking: on a worker thread)."""
    roots = tuple(str(root) for root in allowed_roots)
    with gc_paused():  # (else collections walking its objects stop the loop too)
        checkpoint = open_checkpoint(path, allowed_roots=roots)
        return checkpoint, plan_layers(checkpoint, patterns, alignment)


def prepare(
    path: str,
    allowed_roots: tuple[Path, ...],
    patterns: LayerPatterns,
    alignment: int,
    *,
    disk: bool,
) -> tuple[Checkpoint, list[LayerState], str]:
    """Open, validate and plan a source, and hash the layout engines will
    map (blocking: on a worker thread)."""
    checkpoint, plans = plan_source(path, allowed_roots, patterns, alignment)
    with gc_paused():
        if disk:  # (remembered: the transitions use them on the loop)
            for plan in plans:
                cache_key(checkpoint, plan)
        return checkpoint, [LayerState(plan) for plan in plans], layout_hash(plans)


def check_model_id(model_id: str) -> None:
    if not MODEL_ID.fullmatch(model_id):
        raise InvalidArgument(
            f"invalid model_id {model_id!r}: use 1 to 128 characters of [A-Za-z0-9._-],"
            " starting with a letter or digit",
            reason="INVALID_MODEL_ID",
            metadata={"model_id": model_id},
        )


def busy(model_id: str, state: str) -> Aborted:
    return Aborted(
        f"model {model_id!r} is {state.lower()}; wait for that to finish",
        reason="TRANSITION_IN_PROGRESS",
        metadata={"model_id": model_id, "state": state},
    )


def exists(model_id: str, what: str, path: str) -> AlreadyExists:
    """A Load of `model_id` from another source than `path`, the one it
    has (`what` says how): one id, one source."""
    return AlreadyExists(
        f"model {model_id!r} {what}",
        reason="MODEL_EXISTS",
        metadata={"model_id": model_id, "source": path},
    )


def wrong_state(model: Model, verb: str) -> FailedPrecondition:
    hint = " (unload it)" if model.state is ModelState.FAILED else ""
    return FailedPrecondition(
        f"cannot {verb} model {model.model_id!r} while it is {model.state.value.lower()}{hint}",
        reason="INVALID_STATE",
        metadata={"model_id": model.model_id, "state": model.state.value},
    )
