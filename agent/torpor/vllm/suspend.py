"""vLLM's own sleep and wake of an engine whose weights are Torpor images.

`LLM.sleep(level)` and `wake_up(tags)` (the server's `/sleep` and
`/wake_up`) reach the GPU worker's sleep-mode backend, which for
`load_format="torpor"` is torpor.vllm.sleep.TorporSleepBackend; it does what
this module says (and this module imports no vLLM, so its logic is tested
without it).

Suspend (level 1 or 2):

1. Level 2 first checks that torpord has a disk cache: vLLM's level 2
   discards the weights, and an image has no checkpoint to come back from,
   so the daemon keeps its only copy in the disk cache. Without one: a
   clear error (IMAGE_NEEDS_DISK_CACHE), and nothing has changed.
2. For each image the engine serves, the engine *lets go* of it: the agent
   waits for any computation using it, unmaps every layer (keeping the
   address ranges, so tensors and CUDA graphs stay valid) and detaches.
   Then, if no engine is attached to the image any more, the engine asks
   the daemon to sleep it at the same level (1: into the host pool; 2: to
   its disk copy, freeing the memory). If other engines are attached, the
   image stays where it is: one engine's sleep never takes the weights
   from under the others, and the last engine to sleep puts the image to
   sleep.
3. vLLM's own memory pool (its CuMemAllocator: the KV cache, the engine's
   copies of buffers, CUDA graph pools) sleeps exactly as under vLLM's
   default backend: the KV cache discarded, the weights-tagged allocations
   (small: buffers) kept in host memory at level 1 and discarded at level 2
   (vLLM's worker saves and restores the buffers around a level-2 sleep).

A failure part-way (the daemon's host pool too small for a level-1 sleep,
say) brings back what was let go and raises: a refused sleep changes
nothing.

Resume, when the tags include "weights" (or none are given): for each image
put away, wake it if it is asleep (or wait while another engine wakes it),
attach again at the same addresses, and wait until every layer is mapped.
Then vLLM's pool wakes the tags asked (the KV cache).

One race remains: an engine that attaches to the image between this
engine's look at the engine count and its Sleep is quiesced like any engine
under `torporctl sleep`: its requests wait until the image is woken (by
this engine's resume, or anyone's wake). Closing it would take a Sleep that
the daemon performs only if no engine is attached.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Protocol

import grpc

from torpor.client import Client
from torpor.errors import TorporError
from torpor.v1 import common_pb2
from torpor.vllm.gate import Image

__all__ = ["TAGS", "EngineSleep", "Pool"]

# Under vLLM's logger, so its handler shows these lines with its own.
log = logging.getLogger("vllm.torpor")

TAGS = ("weights", "kv_cache")  # what a vLLM sleep puts away (vLLM's SLEEP_TAGS)

_POLL_S = 0.1
_SETTLED = (
    common_pb2.MODEL_STATE_ACTIVE,
    common_pb2.MODEL_STATE_OFFLOADED,
    common_pb2.MODEL_STATE_ASLEEP,
)


class Pool(Protocol):
    """What this backend uses of vLLM's sleep-mode allocator (CuMemAllocator)."""

    def sleep(self, offload_tags: tuple[str, ...] | str | None = None) -> None: ...

    def wake_up(self, tags: list[str] | None = None) -> None: ...

    def discard(self, tags: tuple[str, ...] | str) -> None: ...


class EngineSleep:
    """Suspend and resume of one engine process: its images through torpord,
    its own memory through vLLM's `pool` (None: it has none, as on CPU).

    `images` says which images the engine serves when it is asked to sleep
    (torpor.vllm.gate.serving in a vLLM worker)."""

    def __init__(self, images: Callable[[], Iterable[Image]], pool: Pool | None) -> None:
        self._images = images
        self._pool = pool
        self._away: list[Image] = []  # let go of by suspend, in order
        self.asleep: set[str] = set()  # the tags put away and not woken yet

    # -- suspend -----------------------------------------------------------------------

    def suspend(self, level: int) -> None:
        if level not in (1, 2):
            raise ValueError(f"vLLM sleep level {level}: Torpor's sleep backend takes 1 or 2")
        images = [image for image in self._images() if image not in self._away]
        if level == 2:
            for client in {id(image.client): image.client for image in images}.values():
                _need_disk_cache(client)
        done: list[Image] = []
        try:
            for image in images:
                self._put_away(image, level)
                done.append(image)
            if self._pool is not None:
                # As vLLM's default backend: runtime state and graph pools are
                # kept at every level, the engine's weights-tagged memory at 1.
                kept = ("runtime", "cudagraph") + (("weights",) if level == 1 else ())
                self._pool.sleep(offload_tags=kept)
        except BaseException:
            for image in reversed(done):
                _bring_back_quietly(image)
            raise
        self._away += done
        self.asleep |= set(TAGS)

    def _put_away(self, image: Image, level: int) -> None:
        """Let go of the image, and sleep it if no engine is left on it."""
        image.let_go()
        try:
            _sleep_if_unused(image, level)
        except BaseException:
            _bring_back_quietly(image)
            raise

    # -- resume ------------------------------------------------------------------------

    def resume(self, tags: Iterable[str] | None = None) -> None:
        wanted = None if tags is None else list(tags)
        if wanted is None or "weights" in wanted:
            while self._away:
                bring_back(self._away[0])
                self._away.pop(0)
        if self._pool is not None:
            self._pool.wake_up(wanted)
        self.asleep -= set(TAGS if wanted is None else wanted)

    def discard(self, tags: Iterable[str]) -> None:
        """Drop the engine's own memory of `tags` (vLLM: the KV cache) without
        keeping it; the weights are the daemon's, never discarded here."""
        chosen = tuple(tags)
        if "weights" in chosen:
            raise ValueError(
                "load_format='torpor': the weights are a Torpor image, which vLLM cannot"
                " discard; sleep the engine instead (level 2 frees them)"
            )
        if self._pool is not None:
            self._pool.discard(chosen)
        self.asleep |= set(chosen)


def bring_back(image: Image) -> None:
    """The image mapped again for this engine: woken if asleep, attached
    again at the same addresses, every layer mapped."""
    image.recover()
    with image.attached.use(timeout=image.wait_s):
        pass  # (waits until every layer is mapped)


def _bring_back_quietly(image: Image) -> None:
    """Undo a let-go after a failure, which is what the caller raises."""
    try:
        bring_back(image)
    except Exception:
        log.exception("torpor: could not attach to image %s again", image.attached.model_id)


def _need_disk_cache(client: Client) -> None:
    if not client.get_node().disk_cache.enabled:
        raise TorporError(
            grpc.StatusCode.FAILED_PRECONDITION,
            "IMAGE_NEEDS_DISK_CACHE",
            "vLLM sleep level 2 discards the weights, and a Torpor image"
            " (load_format='torpor') has no checkpoint to reload them from: torpord"
            " keeps its only copy in its disk cache, and none is configured"
            " (disk_cache.path in torpord's config); sleep at level 1, or configure one",
        )


def _sleep_if_unused(image: Image, level: int) -> None:
    """Have the daemon sleep the image at `level`, unless an engine is
    attached to it (or it is asleep that deep already, or gone)."""
    model_id, client = image.attached.model_id, image.client
    deadline = time.monotonic() + image.wait_s
    while True:
        try:
            model = client.get_model(model_id)
        except TorporError as err:
            if err.reason == "MODEL_NOT_FOUND":
                return  # (nothing to sleep; the resume says what became of it)
            raise
        if model.engines > 0:
            log.info(
                "torpor: %d other engine(s) use image %s: it stays, this engine let go",
                model.engines,
                model_id,
            )
            return
        if model.state == common_pb2.MODEL_STATE_ASLEEP and model.sleep_level >= level:
            return
        if model.state == common_pb2.MODEL_STATE_FAILED:
            return  # (it holds no memory; the resume says it is FAILED)
        if model.state in _SETTLED:
            try:
                client.sleep_model(model_id, level)
                log.info("torpor: image %s asleep (level %d)", model_id, level)
                return
            except TorporError as err:
                if err.reason not in ("TRANSITION_IN_PROGRESS", "INVALID_STATE"):
                    raise
                # (Another engine or torporctl moved it meanwhile: look again.)
        if time.monotonic() > deadline:
            raise TorporError(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                "IMAGE_BUSY",
                f"load_format='torpor': image {model_id!r} was still"
                f" {common_pb2.ModelState.Name(model.state)} after {image.wait_s:g}s;"
                " cannot put it to sleep",
            )
        time.sleep(_POLL_S)
