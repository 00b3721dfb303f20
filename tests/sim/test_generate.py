"""The trace generator: seeded, and the shapes it promises."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import pytest
from torpord.sim.generate import PRESETS, Generator, generate, preset

SMALL = Generator(days=0.25)


def test_same_seed_same_trace_and_node() -> None:
    assert generate(SMALL) == generate(SMALL)
    assert generate(replace(SMALL, seed=2))[1] != generate(SMALL)[1]


def test_defaults_are_the_issues_node() -> None:
    """At least 50 models, the device holds about 10% of their bytes and
    the host about 50%, a day of trace."""
    g = PRESETS["default"]
    assert g.models >= 50
    assert g.days >= 1
    node, _ = generate(replace(g, days=0.1))
    total = node.total_bytes
    assert 0.08 <= node.device / total <= 0.12
    assert 0.45 <= node.host / total <= 0.55
    assert max(m.size for m in node.models) <= node.device


def test_zipf_top_tenth_of_models_get_most_requests() -> None:
    # Background only: bursts pick groups evenly and would blur the tail.
    _, requests = generate(replace(SMALL, burst_rate=0.0, days=1.0, models=60, zipf=1.1))
    counts = sorted(Counter(r.model_id for r in requests).values(), reverse=True)
    assert sum(counts[:6]) > 0.5 * len(requests)
    # The tail is long but not empty: the bottom half still gets some.
    assert 0 < sum(counts[30:]) < 0.25 * len(requests)


def test_a_flat_popularity_spreads_requests() -> None:
    _, requests = generate(replace(SMALL, burst_rate=0.0, days=1.0, zipf=0.0))
    counts = sorted(Counter(r.model_id for r in requests).values(), reverse=True)
    assert sum(counts[:6]) < 0.2 * len(requests)


def test_daily_cycle_peaks_in_the_afternoon() -> None:
    _, requests = generate(replace(SMALL, burst_rate=0.0, days=2.0, amplitude=0.9))
    hours = Counter(int(r.arrival // 3600) % 24 for r in requests)
    day = sum(hours[h] for h in range(9, 21))  # around the 15:00 peak
    night = sum(hours[h] for h in (*range(21, 24), *range(0, 9)))
    assert day > 3 * night


def test_bursts_bring_a_groups_models_together() -> None:
    """Bursts alone (no background): requests close in time come from one
    group, so at most group_size distinct models are active at once."""
    g = replace(
        SMALL, rate=0.0, group_size=3, burst_rate=0.5, burst_length=60.0, burst_rps=1.0, days=5
    )
    _, requests = generate(g)
    assert len(requests) > 100
    together = 0
    for i, r in enumerate(requests):
        around = requests[max(0, i - 5) : i + 6]
        near = {q.model_id for q in around if abs(q.arrival - r.arrival) < 5}
        together += len(near) <= 3
    assert together >= 0.9 * len(requests)


def test_presets_differ_and_take_overrides() -> None:
    assert set(PRESETS) >= {"default", "bursty", "diurnal"}
    assert PRESETS["bursty"].burst_rate > PRESETS["default"].burst_rate
    assert PRESETS["diurnal"].amplitude > PRESETS["default"].amplitude
    assert preset("bursty", seed=7).seed == 7


@pytest.mark.parametrize(
    ("name", "value"),
    [("models", 0), ("zipf", -1.0), ("amplitude", 1.0), ("days", 0.0), ("group_size", 1000)],
)
def test_out_of_range_parameters_are_named(name: str, value: float) -> None:
    with pytest.raises(ValueError, match=name):
        generate(replace(SMALL, **{name: value}))
