"""Pausing the cyclic garbage collector while a checkpoint is parsed and planned.

Parsing a header of 10**5 tensors creates millions of container objects in
a short time (the JSON's dicts and lists, then a record per tensor). Each
time that growth passes the collector's thresholds, a collection walks every
one of them while holding the GIL, stopping the event loop's thread too: at
the tensor limit, pauses of a second or more, several times per load. None
of these objects form cycles (reference counting frees them), so the
collector is paused for the duration instead, and runs again as soon as the
last pauser leaves.
"""

from __future__ import annotations

import contextlib
import gc
import threading
from collections.abc import Iterator

__all__ = ["gc_paused"]

_lock = threading.Lock()
_pausers = 0
_resume = False  # whether the collector was enabled when the first pauser came


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Automatic collection off inside the block (nesting and threads allowed)."""
    global _pausers, _resume
    with _lock:
        if _pausers == 0:
            _resume = gc.isenabled()
            gc.disable()
        _pausers += 1
    try:
        yield
    finally:
        with _lock:
            _pausers -= 1
            if _pausers == 0 and _resume:
                gc.enable()
