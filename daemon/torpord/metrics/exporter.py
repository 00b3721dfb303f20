"""The daemon's metrics: one private registry over its state and history.

Label cardinality stays bounded: labels are model ids, devices, tiers and
transition kinds, causes, levels and outcomes, never layers or requests.
A model unloaded for good (neither loaded nor in the catalogue) keeps its
series, last values and all, for `keep_unloaded` seconds (`[metrics]
keep_unloaded`, KEEP_UNLOADED by default) from the first scrape that finds
it gone, so that every Prometheus scraping the node (an HA pair) counts its
last transitions, its unload among them; the first scrape after that
drops them and Prometheus marks them stale. A model loaded again meanwhile
under the same id goes on with its series. Past KEEP_MODELS models with
series, those gone longest are dropped sooner (ids that come and go can't
grow them without end, scraped or not). The node's series
(`torpor_node_*`) are never dropped.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator

import structlog
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

from torpord.config.model import MetricsConfig
from torpord.core.acquire import Figure
from torpord.core.counters import KEEP_MODELS
from torpord.core.history import Finished
from torpord.core.manager import ModelManager
from torpord.metrics.http import MetricsServer
from torpord.metrics.series import CounterFamily, HistogramFamily
from torpord.metrics.state import State
from torpord.metrics.transitions import Transitions

__all__ = ["KEEP_UNLOADED", "Metrics", "serve_metrics"]

# Seconds a model unloaded for good keeps its series ([metrics]
# keep_unloaded's default): a few scrapes of every Prometheus of a pair.
KEEP_UNLOADED = MetricsConfig.keep_unloaded

log = structlog.get_logger("torpord.metrics")


class Metrics:
    """The collector of one manager's metrics; `scrape` renders them."""

    def __init__(
        self,
        manager: ModelManager,
        render: Callable[[CollectorRegistry], bytes] = generate_latest,
        *,
        keep_unloaded: float = KEEP_UNLOADED,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`render` turns a registry into the text format (on a thread);
        `keep_unloaded`: seconds, by `clock`, a model gone keeps its series."""
        self._m = manager
        self._render = render
        self._keep_unloaded = keep_unloaded
        self._clock = clock
        self._gone: dict[str, float] = {}  # model id -> when a prune first found it gone
        self._rendering = asyncio.Lock()  # (one render at a time)
        self._next: asyncio.Task[bytes] | None = None  # the render scrapes now wait for
        self._state = State(manager)
        self.transitions = Transitions()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)
        self._seen: set[str] = set()  # model ids with series (since the last prune)
        # Models with series past which an event prunes (nobody scrapes): at
        # least KEEP_MODELS, and twice the known models the last prune kept
        # (it can't drop those), so that a node that knows more models than
        # KEEP_MODELS prunes now and then, not at each event.
        self._prune_at = KEEP_MODELS
        self._stops = [
            manager.history.listen(self._finished),
            manager.acquirer.listen(self._acquired),
        ]

    def collect(self) -> Iterator[Metric]:
        yield from self._state.collect()
        yield from self.transitions.collect()

    async def scrape(self) -> tuple[bytes, str]:
        """The exposition (and its content type); then the series of models
        gone for longer than keep_unloaded, now exported with their last
        values one last time, are dropped.

        The figures are taken on the event loop, the only thread that reads
        the live objects, in a copy; rendering them as text (some 10 us a
        sample: seconds for a node of a thousand models) runs on a thread,
        one render at a time, while the loop serves everything else.
        Scrapes that arrive while one renders share the next render, whose
        figures are taken after they all arrived: many scrapers cost two
        renders, not one each."""
        pending = self._next
        if pending is None:
            pending = self._next = asyncio.create_task(self._render_next())
            pending.add_done_callback(_retrieve)
        # (Shielded: a scraper that goes away must not cancel the others' render.)
        body = await asyncio.shield(pending)
        # The text format every Prometheus reads (CONTENT_TYPE_LATEST says
        # 1.0.0, which 2.x servers don't know; the names here are the same
        # in both, and prometheus_client's own server answers 0.0.4 too).
        return body, CONTENT_TYPE_PLAIN_0_0_4

    async def _render_next(self) -> bytes:
        async with self._rendering:
            self._next = None  # (who arrives from now on waits for the render after)
            snapshot = CollectorRegistry(auto_describe=False)
            snapshot.register(_Frozen([*self._state.collect(), *self.transitions.frozen()]))
            self.prune()
            return await asyncio.to_thread(self._render, snapshot)

    def prune(self) -> None:
        """Drop the series of model ids the daemon has not known for
        keep_unloaded seconds; and, past KEEP_MODELS models with series,
        of those it does not know that went first."""
        now, counters = self._clock(), self._m.counters
        with_series = self.transitions.models() | counters.models()
        # (A model known again is no longer gone: its series go on.)
        self._gone = {
            model_id: self._gone.get(model_id, now)
            for model_id in with_series
            if not self._m.known(model_id)
        }
        drop = {m for m, since in self._gone.items() if now - since >= self._keep_unloaded}
        excess = len(with_series) - len(drop) - KEEP_MODELS
        if excess > 0:
            kept = sorted((since, m) for m, since in self._gone.items() if m not in drop)
            drop.update(m for _, m in kept[:excess])
        if drop:
            self.transitions.forget(drop)
            for model_id in drop:
                counters.forget(model_id)
                del self._gone[model_id]
        self._seen = self.transitions.models()
        self._prune_at = max(KEEP_MODELS, 2 * (len(self._seen) - len(self._gone)))

    def close(self) -> None:
        for stop in self._stops:
            stop()

    def _finished(self, finished: Finished) -> None:
        self.transitions.finished(finished)
        self._bound(finished.model_id)

    def _acquired(self, figure: Figure, ready: bool) -> None:
        self.transitions.acquired(figure, ready)
        self._bound(figure.model_id)

    def _bound(self, model_id: str) -> None:
        # (It is back, or going now: its time gone starts at the next prune.)
        self._gone.pop(model_id, None)
        self._seen.add(model_id)
        if len(self._seen) > self._prune_at:  # (nobody scrapes)
            self.prune()


class _Frozen:
    """Metric families as they were at one moment: what a scrape renders."""

    def __init__(self, parts: list[Metric | CounterFamily | HistogramFamily]) -> None:
        self._parts = parts

    def collect(self) -> Iterator[Metric]:
        for part in self._parts:
            yield part if isinstance(part, Metric) else part.collect()


def _host_port(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    return host.removeprefix("[").removesuffix("]"), int(port)


def _retrieve(task: asyncio.Task[bytes]) -> None:
    # (Every scraper may have gone: the render's failure is theirs, not the loop's.)
    if not task.cancelled():
        task.exception()


async def serve_metrics(
    manager: ModelManager, listen: str, keep_unloaded: float = KEEP_UNLOADED
) -> tuple[Metrics, MetricsServer]:
    """Bind `listen` ("host:port", as the config gives it) for the manager's
    metrics; OSError if it can't be had. It answers once started; closing
    it closes the collector too."""
    metrics = Metrics(manager, keep_unloaded=keep_unloaded)
    host, port = _host_port(listen)
    server = MetricsServer(metrics.scrape, host, port, on_close=metrics.close)
    try:
        await server.bind()
    except BaseException:
        metrics.close()
        raise
    return metrics, server
