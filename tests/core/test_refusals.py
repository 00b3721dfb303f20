"""What a caller is told when no eviction would make room."""

from __future__ import annotations

from torpord.core.refusals import refused
from torpord.errors import ResourceExhausted
from torpord.policies.actions import Refusal


def test_every_blocker_is_named_by_why() -> None:
    pool_full = ResourceExhausted("gpu0 is full", reason="OUT_OF_MEMORY", metadata={"pool": "gpu0"})
    refusal = Refusal(
        "gpu0",
        needed=100,
        short=60,
        blocked={
            "p": "pinned",
            "u": "in use",
            "t": "in transition",
            "f": "failed",
            "i": "nowhere to go",
            "me": "asked for",  # the model the room is for: not a blocker
        },
    )
    err = refused(pool_full, refusal)
    assert err.reason == "OUT_OF_MEMORY"
    meta = err.metadata
    assert meta["pool"] == "gpu0" and meta["short"] == "60"
    assert {key: meta[key] for key in ("pinned", "in_use", "in_transition")} == {
        "pinned": "'p'",
        "in_use": "'u'",
        "in_transition": "'t'",
    }
    assert meta["failed"] == "'f'" and meta["nowhere_to_go"] == "'i'"
    assert "me" not in str(meta) and "'me'" not in err.message
    assert "failed: 'f'" in err.message and "nowhere to go: 'i'" in err.message
