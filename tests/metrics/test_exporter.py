"""The exporter: a scrape's figures are taken on the event loop, and turned
into text on a thread while the loop goes on."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from torpor.testing import make_checkpoint
from torpord.backends.host import HostBackend
from torpord.core.counters import KEEP_MODELS
from torpord.core.history import Finished
from torpord.core.manager import ManagerSettings, ModelManager
from torpord.core.model import TransitionRecord
from torpord.metrics import Metrics, serve_metrics
from torpord.types import Outcome, TransitionKind


@pytest.fixture
async def manager(tmp_path: Path) -> AsyncIterator[ModelManager]:
    backend = HostBackend(devices=1, device_capacity=2**26, host_capacity=2**26)
    m = ModelManager(backend, ManagerSettings(allowed_roots=(tmp_path.resolve(),)))
    try:
        yield m
    finally:
        await m.close(1.0)
        backend.close()


async def test_a_scrape_is_rendered_off_the_event_loop_from_a_copy(
    tmp_path: Path, manager: ModelManager
) -> None:
    rendering, go = threading.Event(), threading.Event()

    def render(registry: CollectorRegistry) -> bytes:
        rendering.set()
        # (On the event loop this would wait in vain: the loop sets `go`.)
        assert go.wait(30), "the event loop stood still while the scrape rendered"
        return generate_latest(registry)

    metrics = Metrics(manager, render=render)
    try:
        await manager.load("m", str(make_checkpoint(tmp_path / "m", layers=2, hidden=64)))
        scrape = asyncio.create_task(metrics.scrape())
        assert await asyncio.to_thread(rendering.wait, 30)
        # The loop goes on meanwhile, and what changes now is not in this scrape.
        await manager.sleep("m", 1)
        go.set()
        body, _ = await scrape
        text = body.decode()
        assert 'torpor_models{state="active"} 1.0' in text
        assert 'kind="load",model="m"' in text and 'kind="sleep",model="m"' not in text
        body, _ = await metrics.scrape()
        assert 'kind="sleep",model="m"' in body.decode()
    finally:
        go.set()
        metrics.close()


async def test_closing_the_server_stops_the_collector(
    tmp_path: Path, manager: ModelManager
) -> None:
    # (What the daemon closes at its end: the collector must stop listening
    # to the manager's history and Acquires then, not live on with it.)
    metrics, server = await serve_metrics(manager, "127.0.0.1:0")
    try:
        await server.start()
        await manager.load("m", str(make_checkpoint(tmp_path / "m", layers=2, hidden=64)))
        await server.close()
        await manager.sleep("m", 1)
        text = (await metrics.scrape())[0].decode()
        assert 'kind="load",model="m"' in text
        assert 'kind="sleep",model="m"' not in text
    finally:
        await server.close()


async def test_scrapes_that_arrive_during_a_render_share_the_next_one(
    tmp_path: Path, manager: ModelManager
) -> None:
    rendering, go = threading.Event(), threading.Event()
    renders = 0

    def render(registry: CollectorRegistry) -> bytes:
        nonlocal renders
        renders += 1
        rendering.set()
        assert go.wait(30)
        return generate_latest(registry)

    metrics = Metrics(manager, render=render)
    try:
        await manager.load("m", str(make_checkpoint(tmp_path / "m", layers=2, hidden=64)))
        first = asyncio.create_task(metrics.scrape())
        assert await asyncio.to_thread(rendering.wait, 30)
        # Ten more arrive while the first renders; one goes away; the model
        # sleeps after they all arrived but before their render begins.
        later = [asyncio.create_task(metrics.scrape()) for _ in range(10)]
        await asyncio.sleep(0)
        later[0].cancel()
        await manager.sleep("m", 1)
        go.set()
        assert 'kind="sleep",model="m"' not in (await first)[0].decode()
        bodies = {(await scrape)[0] for scrape in later[1:]}
        assert renders == 2
        # One render served them all, with figures taken after they arrived.
        assert len(bodies) == 1 and 'kind="sleep",model="m"' in bodies.pop().decode()
        assert later[0].cancelled()
        # A scrape after those renders gets a render of its own.
        await metrics.scrape()
        assert renders == 3
    finally:
        go.set()
        metrics.close()


async def test_a_gone_models_series_stay_for_keep_unloaded_then_go(
    tmp_path: Path, manager: ModelManager
) -> None:
    now = [1000.0]
    metrics = Metrics(manager, keep_unloaded=600.0, clock=lambda: now[0])
    ckpt = str(make_checkpoint(tmp_path / "m", layers=2, hidden=64))
    load = 'torpor_transitions_total{cause="user",kind="load",model="m",outcome="succeeded"}'
    unload = load.replace('kind="load"', 'kind="unload"')
    node_load = 'torpor_node_transitions_total{cause="user",kind="load",outcome="succeeded"}'

    async def scrape() -> str:
        return (await metrics.scrape())[0].decode()

    try:
        await manager.load("m", ckpt)
        await manager.unload("m")
        # Scrape after scrape (two Prometheus servers, say) until it is
        # 10 minutes gone: its last values, the unload counted.
        for _ in range(3):
            text = await scrape()
            assert f"{load} 1.0" in text and f"{unload} 1.0" in text
            now[0] += 299.0
        now[0] += 3.0  # (600 s since the first scrape found it gone)
        assert f"{unload} 1.0" in await scrape()  # (the last time)
        text = await scrape()
        assert 'model="m"' not in text
        assert f"{node_load} 1.0" in text  # (the node's series stay)
        # Loaded again within the time: it goes on with its series.
        await manager.load("m", ckpt)
        await manager.unload("m")
        await scrape()
        now[0] += 599.0
        await manager.load("m", ckpt)
        now[0] += 1000.0
        text = await scrape()
        assert f"{load} 2.0" in text and f"{unload} 1.0" in text
        assert f"{node_load} 3.0" in text
    finally:
        metrics.close()


async def test_the_node_families_are_there_at_zero_before_anything_happens(
    tmp_path: Path, manager: ModelManager
) -> None:
    metrics = Metrics(manager)
    try:
        text = (await metrics.scrape())[0].decode()
        for kind in ("load", "sleep", "wake", "offload", "unload", "publish"):
            labels = f'cause="user",kind="{kind}",outcome="succeeded"'
            assert f"torpor_node_transitions_total{{{labels}}} 0.0" in text, kind
        assert "torpor_node_load_duration_seconds_count 0.0" in text
        assert 'torpor_node_wake_duration_seconds_count{level="2",source="disk"} 0.0' in text
        assert 'torpor_node_acquires_total{result="hit"} 0.0' in text
        node = [line for line in text.splitlines() if line.startswith("torpor_node_")]
        assert len(node) > 100 and not [line for line in node if "model=" in line]
    finally:
        metrics.close()


async def test_unscraped_gone_models_past_keep_models_go_first_gone_first(
    tmp_path: Path, manager: ModelManager
) -> None:
    # (Ids that come and go while nobody scrapes: kept within their time,
    # their series would grow without end.)
    now = [0.0]
    metrics = Metrics(manager, keep_unloaded=600.0, clock=lambda: now[0])
    unload = TransitionRecord(TransitionKind.UNLOAD, Outcome.SUCCEEDED, 0.0, 0.001, 0)
    try:
        for i in range(KEEP_MODELS + 50):
            manager.history.add(Finished(f"m{i}", "", 0, unload))  # (ids it does not know)
            now[0] += 0.01
        kept = metrics.transitions.models()
        assert len(kept) <= KEEP_MODELS + 1
        assert f"m{KEEP_MODELS + 49}" in kept and "m0" not in kept
        text = (await metrics.scrape())[0].decode()
        assert (
            'torpor_node_transitions_total{cause="user",kind="unload",outcome="succeeded"} '
            + (f"{KEEP_MODELS + 50}.0")
            in text
        )
    finally:
        metrics.close()
