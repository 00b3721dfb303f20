"""vLLM's sleep mode on Torpor images: the `torpor` sleep-mode backend.

vLLM 0.32 frees and restores a GPU worker's memory through a sleep-mode
backend (`vllm.device_allocator.sleep_mode_backend`), chosen by name with
`ModelConfig.sleep_mode_backend` ("cumem" by default: its CuMemAllocator
copies the weights to host memory and back). With `load_format="torpor"`
the weights are not the engine's to copy: they are an image in torpord,
shared with any other engine on it. `TorporSleepBackend` puts the image to
sleep through the daemon instead (what it does, and how it keeps other
engines on the image serving: torpor.vllm.suspend) and leaves the rest of
the engine's memory (the KV cache) to vLLM's allocator, as the default
backend does.

`register()` (torpor.vllm) registers it with vLLM's factory in every vLLM
process. vLLM 0.32 offers no `sleep_mode_backend` argument to `LLM(...)` or
the CLI, so the torpor model loader selects it in the worker (`select`)
when sleep mode is on and the platform is CUDA: `--load-format torpor
--enable-sleep-mode` is all it takes. vLLM's CPU worker has no sleep mode
(it logs and ignores `sleep`); there, the daemon's own Sleep and Wake
(`torporctl sleep`) are what put an image to sleep.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from vllm.device_allocator.sleep_mode_backend import SleepModeBackend

from torpor.vllm import gate
from torpor.vllm.gate import Image
from torpor.vllm.suspend import EngineSleep, Pool

__all__ = ["NAME", "TorporSleepBackend", "select"]

NAME = "torpor"

# Under vLLM's logger, so its handler shows these lines with its own.
log = logging.getLogger("vllm.torpor")


class TorporSleepBackend(SleepModeBackend):  # type: ignore[misc]  # (vLLM: untyped here)
    """vLLM's sleep-mode backend for engines on Torpor images.

    vLLM makes it with no arguments, in the worker, at its first sleep: it
    then acts on the images of the models this process serves
    (torpor.vllm.gate.serving) and on vLLM's sleep-mode allocator. `images`
    and `pool` say otherwise (None for `pool`: the platform's allocator,
    none on a CPU)."""

    def __init__(self, images: Iterable[Image] | None = None, pool: Pool | None = None) -> None:
        super().__init__()
        fixed = None if images is None else list(images)
        self.engine = EngineSleep(
            gate.serving if fixed is None else lambda: fixed,
            pool if pool is not None else _platform_pool(),
        )

    def suspend(self, level: int = 1) -> None:
        self.engine.suspend(level)
        self._state = "SUSPENDED"

    def resume(self, tags: list[str] | None = None) -> None:
        self._state = "RESUMING"
        try:
            self.engine.resume(tags)
        finally:
            self._state = "SUSPENDED" if self.engine.asleep else "RUNNING"

    def discard(self, tags: tuple[str, ...]) -> None:
        self.engine.discard(tags)
        self._state = "SUSPENDED"

    @classmethod
    def is_supported(cls) -> bool:
        """CUDA only: vLLM has no sleep mode on its CPU build, and the agent
        maps images into GPU memory with CUDA's VMM API."""
        from vllm.platforms import current_platform

        return bool(current_platform.is_cuda())

    @classmethod
    def preserves_communicators(cls) -> bool:
        return True  # (NCCL's memory is not the image's; nothing here touches it)


def _platform_pool() -> Pool | None:
    from vllm.platforms import current_platform

    if not current_platform.is_cuda_alike():
        return None
    from vllm.device_allocator import get_mem_allocator_instance

    pool: Pool = get_mem_allocator_instance()
    return pool


def select(model_config: Any, *, cuda: bool | None = None) -> bool:
    """Have vLLM's worker sleep through this backend: on CUDA (`cuda`: the
    platform's, if None) with sleep mode enabled, when no other backend was
    chosen. Whether it now is the worker's backend. A ValueError for
    `sleep_preserve_parameter_names`, which would write into the sealed
    image on wake."""
    if cuda is None:
        from vllm.platforms import current_platform

        cuda = bool(current_platform.is_cuda())
    if not cuda or not model_config.enable_sleep_mode:
        return False
    chosen = getattr(model_config, "sleep_mode_backend", None)
    if chosen is None:
        log.warning("torpor: this vLLM has no sleep-mode backends; its sleep mode copies weights")
        return False
    if chosen not in ("cumem", NAME):  # (someone chose another: theirs)
        log.warning("torpor: sleep_mode_backend %r chosen; vLLM's sleep skips the daemon", chosen)
        return False
    if model_config.sleep_preserve_parameter_names:
        raise ValueError(
            "load_format='torpor' with sleep mode: sleep_preserve_parameter_names would be"
            " written back into the sealed, read-only image on wake; the image keeps every"
            " weight across sleep already, so leave it unset"
        )
    if chosen != NAME:
        log.info("torpor: vLLM's sleep mode goes through the daemon (sleep_mode_backend=torpor)")
    model_config.sleep_mode_backend = NAME
    return True
