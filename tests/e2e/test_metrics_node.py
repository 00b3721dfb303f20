"""The node's series (torpor_node_*) on a real torpord: there at 0 from its
first scrape, for every value of their labels, and moved between two
scrapes by exactly what happened, so that rate() and increase() see every
event, a model's first load included (a per-model series starts at 1)."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest
from torpor import Client
from torpor.testing import make_checkpoint
from torpor.v1 import common_pb2

from .conftest import Daemon
from .scrape import Samples, metrics_node, scrape

Key = tuple[str, frozenset[tuple[str, str]]]
KINDS = ("load", "sleep", "wake", "offload", "unload", "publish")
OUTCOMES = ("succeeded", "rolled_back", "failed")
CAUSES = ("user", "acquire", "idle", "pressure", "preload", "schedule")


@pytest.fixture
def node(tmp_path: Path) -> Iterator[tuple[Daemon, int]]:
    with metrics_node(tmp_path) as node:
        yield node


def node_counts(samples: Samples) -> dict[Key, float]:
    """The node's counters and histogram counts (and +Inf buckets)."""
    return {
        (name, labels): v
        for (name, labels), v in samples.items()
        if name.startswith("torpor_node_")
        and (name.endswith(("_total", "_count")) or ("le", "+Inf") in labels)
    }


def key(name: str, **labels: str) -> Key:
    return name, frozenset(labels.items())


def test_a_fresh_daemons_first_scrape_has_every_node_series_at_0(
    node: tuple[Daemon, int],
) -> None:
    _, port = node
    samples = scrape(port)
    expected = {
        key("torpor_node_transitions_total", kind=k, outcome=o, cause=c)
        for k, o, c in itertools.product(KINDS, OUTCOMES, CAUSES)
    }
    expected |= {key("torpor_node_acquires_total", result=r) for r in ("hit", "waited", "failed")}
    histograms = [("load_duration", {})]
    histograms += [
        (h, {"level": lv, "source": s})
        for h in ("wake_duration", "wake_first_layer")
        for lv, s in itertools.product("012", ("host", "disk", "source", "none"))
    ]
    histograms += [("sleep_duration", {"level": lv}) for lv in "12"]
    histograms += [("offload_duration", {"tier": t}) for t in ("device", "host", "disk")]
    histograms += [("acquire_ready", {"hit": h}) for h in ("true", "false")]
    for histogram, labels in histograms:
        name = f"torpor_node_{histogram}_seconds"
        expected |= {key(f"{name}_count", **labels), key(f"{name}_bucket", **labels, le="+Inf")}
    got = node_counts(samples)
    assert set(got) == expected
    assert set(got.values()) == {0.0}
    # Every bucket too (1 ms .. 10 min, +Inf).
    buckets = [n for n, _ in samples if n.startswith("torpor_node_") and n.endswith("_bucket")]
    assert len(buckets) == len(histograms) * 19


def test_between_two_scrapes_the_node_series_move_by_what_happened(
    node: tuple[Daemon, int],
) -> None:
    d, port = node
    ckpt = make_checkpoint(d.models / "m", layers=4)
    before = node_counts(scrape(port))
    with Client(socket=str(d.socket)) as c:
        for model_id in ("a", "b", "c"):
            c.load_model(model_id, ckpt)
        c.unload_model("a")
        c.unload_model("b")
        c.sleep_model("c", level=1)
        assert not c.acquire_model("c").hit  # (woken for it)
        c.offload_model("c", ["layers.1"], tier=common_pb2.TIER_HOST)
        c.load_model("a", ckpt)  # (the same id again)
    after = node_counts(scrape(port))
    assert set(after) == set(before)  # (no series came or went)
    moved = {k: after[k] - before[k] for k in after if after[k] != before[k]}

    def ok(kind: str, cause: str = "user") -> Key:
        return key("torpor_node_transitions_total", kind=kind, outcome="succeeded", cause=cause)

    def hist(name: str, **labels: str) -> list[tuple[Key, int]]:
        family = f"torpor_node_{name}_seconds"
        return [
            (key(f"{family}_count", **labels), 1),
            (key(f"{family}_bucket", **labels, le="+Inf"), 1),
        ]

    expected = {ok("load"): 4, ok("unload"): 2, ok("sleep"): 1, ok("wake", "acquire"): 1}
    expected[ok("offload")] = 1
    expected[key("torpor_node_acquires_total", result="waited")] = 1
    expected.update((k, 4 * n) for k, n in hist("load_duration"))
    expected.update(hist("sleep_duration", level="1"))
    expected.update(hist("wake_duration", level="1", source="host"))
    expected.update(hist("wake_first_layer", level="1", source="host"))
    expected.update(hist("offload_duration", tier="host"))
    expected.update(hist("acquire_ready", hit="false"))
    assert moved == expected
