"""vLLM on Torpor: `--load-format torpor` (install `torpor[vllm]` beside vLLM).

    vllm serve /models/llama --load-format torpor
    LLM("/models/llama", load_format="torpor")

The first start of an engine configuration loads and processes the
checkpoint as vLLM always does and publishes the final weights into torpord
as an image; every later start with the same fingerprint (same files, vLLM,
dtype, quantization, parallelism, platform) maps that image: nothing read,
nothing processed, one copy in memory however many engines use it. The
daemon can put the image to sleep and wake it while vLLM serves (requests
wait meanwhile). See torpor.vllm.loader. On a GPU with `--enable-sleep-mode`,
vLLM's own sleep and wake (`LLM.sleep`, `/sleep`, `/wake_up`) go through
the daemon too: torpor.vllm.sleep.

`register` is vLLM's plugin entry point (`vllm.general_plugins`): vLLM calls
it in each of its processes. This package imports vLLM only when it does,
so `torpor` stays importable without vLLM.
"""

from __future__ import annotations

import logging

__all__ = ["LOAD_FORMAT", "register"]

LOAD_FORMAT = "torpor"

# Under vLLM's logger, so its handler shows these lines with its own.
log = logging.getLogger("vllm.torpor")

_registered = False


def register() -> None:
    """Register the `torpor` load format and the `torpor` sleep-mode backend
    (torpor.vllm.sleep) with vLLM. Idempotent, no I/O, and it never raises
    (an exception here would stop vLLM from starting at all, even for
    engines that don't use Torpor): a failure is logged, and `--load-format
    torpor` is then an unknown format, or vLLM's sleep mode its own."""
    global _registered
    if _registered:
        return
    try:
        from vllm.model_executor.model_loader import register_model_loader

        from torpor.vllm.loader import TorporModelLoader

        register_model_loader(LOAD_FORMAT)(TorporModelLoader)
        _registered = True
    except Exception:
        log.exception("torpor: could not register vLLM's load format %r", LOAD_FORMAT)
    _register_sleep_backend()


def _register_sleep_backend() -> None:
    try:
        from vllm.device_allocator.sleep_mode_backend import SleepModeBackendFactory
    except ImportError:  # (a vLLM before 0.32 has none: its sleep mode is its own)
        log.info("torpor: this vLLM has no sleep-mode backends; not registering one")
        return
    try:
        # Lazy: the module is imported when a worker first sleeps with it.
        SleepModeBackendFactory.register_backend(
            LOAD_FORMAT, "torpor.vllm.sleep", "TorporSleepBackend"
        )
    except ValueError:
        pass  # (registered already in this process)
    except Exception:
        log.exception("torpor: could not register vLLM's sleep-mode backend %r", LOAD_FORMAT)
