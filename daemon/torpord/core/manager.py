"""The model manager: the registry and every lifecycle transition.

Public methods are what the gRPC servicer (and tests) call. Each mutation
checks its arguments and the model's state, allocates everything it will need
(so RESOURCE_EXHAUSTED is answered before anything changes), then runs the
transition as a task that keeps going if its caller goes away. One transition
per model at a time: a mutation of a busy model is refused with ABORTED.

The manager composes its parts: the registry (`core/registry.py`), the
planning of each verb (`core/verbs.py`), the runner with its rollback and
replay (`core/runner.py`), the announcer that tells engines and watchers
(`core/announce.py`), and the mover (`core/mover.py`), which reports to the
announcer.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Sequence

import structlog

from torpord.backends.base import Backend
from torpord.core import imagedisk
from torpord.core.acquire import Acquired, Acquirer, Figure
from torpord.core.activity import ActivityLog
from torpord.core.announce import Announcer
from torpord.core.catalogue import Catalogue
from torpord.core.counters import Counters
from torpord.core.engines import Engines
from torpord.core.events import EventBus
from torpord.core.history import History
from torpord.core.images import Images
from torpord.core.loads import Loads
from torpord.core.model import Model, ModelSnapshot
from torpord.core.mover import Mover
from torpord.core.pilot import Pilot
from torpord.core.policy import PolicyOverrides, check_policy
from torpord.core.registrar import Registrar
from torpord.core.registry import Registry, check_model_id
from torpord.core.requests import RequestLog
from torpord.core.runner import Runner
from torpord.core.scrubber import make_scrubber
from torpord.core.sizes import Sizes
from torpord.core.verbs import ManagerSettings, Verbs
from torpord.errors import Aborted
from torpord.storage.diskcache import DiskCache
from torpord.types import Cause, Tier

__all__ = ["Acquired", "ManagerSettings", "ModelManager"]

log = structlog.get_logger("torpord.core")


class ModelManager:
    def __init__(
        self,
        backend: Backend,
        settings: ManagerSettings,
        *,
        bus: EventBus | None = None,
        disk: DiskCache | None = None,
    ) -> None:
        self.backend = backend
        self.settings = settings
        self.bus = bus or EventBus()
        self.requests = RequestLog()
        # Models known by a source and a policy, loaded or not (core/catalogue.py).
        self.catalogue = Catalogue(settings.policy.default, settings.catalogue)
        # Each known model's use (engines' use() blocks, routers' reports).
        self.activity = ActivityLog(self.known)
        self.registry = Registry(self.activity, self.catalogue)
        self._executor = concurrent.futures.ThreadPoolExecutor(
            settings.worker_threads, thread_name_prefix="torpord-io"
        )
        self._announcer = Announcer(self.bus)
        # Plain counts for the metrics: bytes moved, checksum failures, engines.
        self.counters = Counters(self.known)
        self.mover = Mover(
            backend,
            self._executor,
            self._announcer,
            settings.read,
            disk,
            disk_in_use=self.registry.disk_keys,
            counters=self.counters,
        )
        self.history = History()
        self._runner = Runner(
            backend, self.bus, self.registry, self.requests, self._announcer, self.history
        )
        self._runner.suspect = self.mover.suspect
        # Background checks of the copies not on a device (None: [scrub] off).
        self.scrubber = make_scrubber(settings, backend, self.registry, self.bus, self.mover)
        if self.scrubber is not None:
            self._runner.stand_aside = self.scrubber.stand_aside
        self.images = Images(
            backend,
            self.bus,
            self.registry,
            self._runner,
            self._announcer,
            self.mover,
            self._executor,
        )
        self._verbs = Verbs(
            backend,
            settings,
            self.bus,
            self.registry,
            self.requests,
            self._runner,
            self._announcer,
            self.mover,
            self._executor,
            self.images,
        )
        self.sizes = Sizes(self.catalogue, settings, self._executor)  # (core/sizes.py)
        self._registrar = Registrar(self.catalogue, self.registry, self.bus, backend, self.sizes)
        # The policies' decisions run (core/pilot.py); Acquire (core/acquire.py).
        self.pilot = Pilot(self)
        self.acquirer = Acquirer(self, self.pilot)
        self._loads = Loads(self, self._verbs, self.pilot)  # (core/loads.py)

    @property
    def engines(self) -> Engines:
        """The engines attached to models (see use_engines)."""
        return self._announcer.engines

    def use_engines(self, engines: Engines) -> None:
        """Ask `engines` (the agent registry) to let go before memory they map
        moves, and tell them as layers land; before this, there are none."""
        self._announcer.engines = engines

    @property
    def disk(self) -> DiskCache | None:
        return self.mover.disk

    @disk.setter
    def disk(self, disk: DiskCache | None) -> None:
        self.mover.disk = disk

    # -- reading -------------------------------------------------------------

    def get(self, model_id: str) -> ModelSnapshot:
        """A loaded model, or a registered one (UNLOADED); else NOT_FOUND."""
        return self._registrar.get(model_id)

    def find(self, model_id: str) -> Model | None:
        """The live model (not a snapshot), for the engine registry: read it on
        the event loop, never keep it."""
        return self.registry.find(model_id)

    def known(self, model_id: str) -> bool:
        """Whether `model_id` names a model the daemon holds (or, with a
        catalogue, one it could load)."""
        return model_id in self.registry.models or model_id in self.catalogue

    def list_models(
        self, fingerprint: str = "", *, registered: bool = False
    ) -> list[ModelSnapshot]:
        """Every loaded model (with `registered`, and every catalogue entry not
        loaded, as UNLOADED), or only the image with `fingerprint` (none or one)."""
        if fingerprint:
            found = self.images.find(fingerprint)
            return [found] if found is not None else []
        return self._registrar.snapshots(registered=registered)

    # -- the catalogue and policies (core/registrar.py) --------------------------

    async def register(
        self,
        model_id: str,
        source: str,
        device: str = "",
        policy: PolicyOverrides = PolicyOverrides(),  # noqa: B008 - frozen
    ) -> ModelSnapshot:
        """Add or replace a catalogue entry (its source read as a Load reads it)."""
        return await self._registrar.register(
            model_id, source, device, policy, disk=self.disk is not None
        )

    def deregister(self, model_id: str) -> None:
        """Remove a catalogue entry (NOT_FOUND: MODEL_NOT_REGISTERED); a loaded
        model stays loaded."""
        self._registrar.deregister(model_id)
        self.activity.release(model_id)  # (an id no longer known keeps no record)

    def set_policy(self, model_id: str, policy: PolicyOverrides) -> ModelSnapshot:
        """Set the fields `policy` sets on a model (loaded, in a transition or
        not) and on its catalogue entry."""
        return self._registrar.set_policy(model_id, policy, disk=self.disk is not None)

    # -- activity (core/activity.py) ------------------------------------------

    def report_activity(
        self, model_id: str, reporter: str, uses: int, busy: float, in_use: int, lease: float = 0
    ) -> None:
        """`reporter` (an engine's attachment, a router) saw `uses` uses of
        `model_id` end since its last report, busy for `busy` seconds in all,
        and has `in_use` open now (replacing what it said before) for `lease`
        seconds unless it reports again (0: until it is forgotten).
        INVALID_ARGUMENT INVALID_ACTIVITY for counts no reporter could make,
        NOT_FOUND for a model the daemon doesn't know."""
        check_model_id(model_id)
        self.activity.record(model_id, reporter, uses, busy, in_use, lease=lease or None)

    def forget_reporter(self, model_id: str, reporter: str) -> None:
        """`reporter` is gone: its open uses of `model_id` end."""
        self.activity.forget(model_id, reporter)

    # -- images (publishing itself is `self.images`: core/images.py) -----------

    async def restore_images(self) -> list[str]:
        """At start: register the images the disk cache keeps, asleep (see
        core/imagedisk.py); the ids restored."""
        if self.disk is None:
            return []
        return await imagedisk.restore(
            self.registry, self.backend, self.bus, self.disk, self._executor
        )

    # -- mutations (core/verbs.py) ---------------------------------------------

    async def load(
        self,
        model_id: str,
        source: str,
        *,
        device: str = "",
        target: Tier = Tier.DEVICE,
        wait: bool = True,
        request_id: str = "",
        cause: Cause = Cause.USER,
        policy: PolicyOverrides = PolicyOverrides(),  # noqa: B008 - frozen
    ) -> ModelSnapshot:
        """`policy`: the fields set take precedence over the model's catalogue
        entry's, which take precedence over the config's defaults. An empty
        `source` loads a registered model from its entry (and its device,
        unless `device` says otherwise)."""
        check_policy(policy, disk=self.disk is not None)
        entry = self.catalogue.get(model_id)
        if not source and entry is not None:
            source, device = entry.source, device or entry.device
        return await self._loads.load(  # (and a caller's joins a policy's: core/loads.py)
            model_id, source, device, target, wait, request_id, cause, policy
        )

    async def sleep(
        self,
        model_id: str,
        level: int = 1,
        *,
        wait: bool = True,
        request_id: str = "",
        disk_copy: bool = False,
        cause: Cause = Cause.USER,
    ) -> ModelSnapshot:
        return await self.pilot.with_room(  # (level 1: host room)
            model_id,
            cause,
            lambda: self._verbs.sleep(
                model_id, level, wait=wait, request_id=request_id, disk_copy=disk_copy, cause=cause
            ),
        )

    async def wake(
        self,
        model_id: str,
        *,
        wait: bool = True,
        request_id: str = "",
        verify: bool = False,
        cause: Cause = Cause.USER,
    ) -> ModelSnapshot:
        return await self.pilot.with_room(
            model_id,
            cause,
            lambda: self._verbs.wake(
                model_id, wait=wait, request_id=request_id, verify=verify, cause=cause
            ),
        )

    async def offload(
        self,
        model_id: str,
        layers: Sequence[str] = (),
        tier: Tier = Tier.HOST,
        *,
        wait: bool = True,
        request_id: str = "",
        verify: bool = False,
        cause: Cause = Cause.USER,
    ) -> ModelSnapshot:
        return await self.pilot.with_room(
            model_id,
            cause,
            lambda: self._verbs.offload(
                model_id, layers, tier, wait=wait, request_id=request_id, verify=verify, cause=cause
            ),
        )

    async def unload(
        self,
        model_id: str,
        *,
        wait: bool = True,
        request_id: str = "",
        force: bool = False,
        cause: Cause = Cause.USER,
    ) -> ModelSnapshot:
        return await self._verbs.unload(
            model_id, wait=wait, request_id=request_id, force=force, cause=cause
        )

    async def acquire(self, model_id: str, *, request_id: str = "") -> Acquired:
        """Make the model ready for a request that arrived (core/acquire.py)."""
        return await self.acquirer.acquire(model_id, request_id=request_id)

    @property
    def acquisitions(self) -> Sequence[Figure]:
        """The last Acquires' hit and time to ready, oldest first."""
        return tuple(self.acquirer.figures)

    # -- shutdown --------------------------------------------------------------

    async def close(self, grace: float, *, rollback: float = 5.0) -> bool:
        """Let running transitions finish within `grace` seconds, cancel (and so
        roll back) the rest, then free every slab: all within `rollback`
        seconds more, however the work goes. Work that can't be stopped in
        time (a worker blocked in a read that never returns) is left behind:
        its slabs are not freed under it (the process's exit frees them), and
        the answer is False."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace + rollback
        await self.pilot.stop()  # (no policy starts anything from here on)
        await self._loads.stop()

        def left() -> float:
            return max(0.0, deadline - loop.time())

        # The scrubber lets go of every slab first (only a disk read can keep it).
        scrubbed = self.scrubber is None or await self.scrubber.stop(left())

        running = [
            m.task
            for m in self.registry.models.values()
            if m.task is not None and not m.task.done()
        ]
        stuck: set[asyncio.Task[ModelSnapshot]] = set()
        if running:
            log.info("waiting for transitions", count=len(running), grace=grace)
            _, pending = await asyncio.wait(running, timeout=grace)
            if pending:
                self.mover.stopping.set()  # workers stop at the next piece
            shutting_down = Aborted("the daemon is shutting down", reason="SHUTTING_DOWN")
            for model in self.registry.models.values():
                if model.running is not None and model.running.task in pending:
                    model.running.cancel(shutting_down)
            if pending:
                _, stuck = await asyncio.wait(pending, timeout=left())
        self.bus.close()
        if self.images.freeing:  # (else the backend's close could free them twice)
            await asyncio.wait(set(self.images.freeing), timeout=left())
        if stuck:
            names = sorted(task.get_name() for task in stuck)
            log.error(
                "transitions did not stop within the grace period; their memory is left"
                " to the process's exit",
                transitions=names,
            )
            self._executor.shutdown(wait=False, cancel_futures=True)
            return False
        models = list(self.registry.models.values())
        try:
            async with asyncio.timeout(left()):
                await asyncio.gather(
                    *(self._announcer.quiesce(model, model.layers) for model in models)
                )
                # Not on the io workers: one of them may be blocked for good.
                slabs = [slab for model in models for slab in model.slabs()]
                for model in models:
                    for layer in model.layers:
                        layer.slab = None
                await asyncio.to_thread(self.mover.free_all, slabs)
        except TimeoutError:
            log.error("freeing the models' memory did not finish within the grace period")
            self._executor.shutdown(wait=False, cancel_futures=True)
            return False
        for model in models:
            self.engines.unloaded(model.model_id)
        self.registry.models.clear()
        self._executor.shutdown(wait=False, cancel_futures=True)
        return scrubbed
