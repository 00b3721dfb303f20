"""CUDA events: how the daemon knows a queued copy has completed.

Importing this module needs neither cuda-bindings nor a GPU; making an
`Event` does.
"""

from __future__ import annotations

import contextlib
from typing import Any

from torpord.cuda import driver
from torpord.cuda.driver import check, context, cu

__all__ = ["Event"]


class Event:
    """A CUDA event recorded on a stream (a torpord.cuda.pinned.Completion)."""

    def __init__(self, ordinal: int, stream: Any) -> None:
        d = cu()
        self.ordinal = ordinal
        self.event = check(
            d.cuEventCreate(d.CUevent_flags.CU_EVENT_DISABLE_TIMING), "cuEventCreate"
        )
        check(d.cuEventRecord(self.event, stream), "cuEventRecord")

    def query(self) -> bool:
        d = cu()
        context(self.ordinal)
        (err,) = d.cuEventQuery(self.event)
        if err == d.CUresult.CUDA_ERROR_NOT_READY:
            return False
        check((err,), "cuEventQuery")
        return True

    def synchronize(self) -> None:
        context(self.ordinal)
        check(cu().cuEventSynchronize(self.event), "cuEventSynchronize")

    def __del__(self) -> None:
        # (Possibly run by the garbage collector inside a driver call of this
        # thread: take no lock, leave the thread's current context as it was.)
        with contextlib.suppress(Exception):
            driver.destroy_event(self.ordinal, self.event)
