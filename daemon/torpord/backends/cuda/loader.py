"""The backend's GPU kernels (torpord.cuda.kernels), compiled once, at
prepare() or first use; and why they can't run, where they can't."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import structlog

__all__ = ["KernelLoader"]

log = structlog.get_logger("torpord.cuda")


class KernelLoader:
    def __init__(self, cache: Path | None, *, required: bool) -> None:
        """`cache`: where compiled kernels are kept across restarts.
        `required`: prepare() fails without working kernels."""
        self._cache = cache
        self._required = required
        self._lock = threading.Lock()
        self._kernels: Any = None
        # Why the kernels can't run here (prepare() found), or None.
        self.unavailable: str | None = None

    def load(self) -> Any:
        """The kernels (torpord.cuda.kernels.Kernels)."""
        with self._lock:  # (the first call compiles, or reads the cache)
            if self._kernels is None:
                from torpord.cuda.kernels import Kernels

                self._kernels = Kernels(self._cache)
            return self._kernels

    def prepare(self) -> None:
        """Compile (or read from the cache) the kernels now; where they fail,
        raise if required, else note why."""
        try:
            self.load()
        except Exception as err:
            if self._required:
                raise
            self.unavailable = f"{type(err).__name__}: {err}"
            log.warning(
                "GPU kernels unavailable: pieces go as copies, checksums on the host",
                reason=self.unavailable,
            )
