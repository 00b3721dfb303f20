"""The metrics' own histograms and counters: bucket bounds, text format,
and a model's series dropped as one."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families
from torpord.metrics.series import BUCKETS, CounterFamily, HistogramFamily


def render(*families: CounterFamily | HistogramFamily) -> dict[tuple[str, str], float]:
    class Collector:
        def collect(self) -> list[Metric]:
            return [f.collect() for f in families]

    registry = CollectorRegistry()
    registry.register(Collector())
    text = generate_latest(registry).decode()
    return {
        (s.name, ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_a_value_on_a_bound_is_in_that_bucket_and_past_the_last_in_inf() -> None:
    h = HistogramFamily("t_seconds", "t", ["model"])
    for v in (0.001, 0.0011, 600.0, 601.0, -1.0):
        h.observe(v, "m")
    got = render(h)
    assert got[("t_seconds_bucket", "le=0.001,model=m")] == 2  # (-1 counts as 0)
    assert got[("t_seconds_bucket", "le=0.0025,model=m")] == 3
    assert got[("t_seconds_bucket", "le=250.0,model=m")] == 3
    assert got[("t_seconds_bucket", "le=600.0,model=m")] == 4
    assert got[("t_seconds_bucket", "le=+Inf,model=m")] == 5
    assert got[("t_seconds_count", "model=m")] == 5
    assert got[("t_seconds_sum", "model=m")] == 0.001 + 0.0011 + 600.0 + 601.0
    assert len([k for k in got if k[0] == "t_seconds_bucket"]) == len(BUCKETS) + 1


def test_forget_drops_every_series_of_the_models_and_only_theirs() -> None:
    c = CounterFamily("t_things", "t", ["model", "kind"])
    h = HistogramFamily("t_seconds", "t", ["model"])
    for model in ("a", "b"):
        c.inc(model, "x")
        c.inc(model, "y")
        h.observe(1.0, model)
    for family in (c, h):
        family.forget({"a"})
        assert family.models() == {"b"}
    got = render(c, h)
    assert got[("t_things_total", "kind=x,model=b")] == 1
    assert not [k for k in got if "model=a" in k[1]]
    assert ("t_things_created", "kind=x,model=b") not in got  # (no _created samples)


def test_a_node_family_starts_at_zero_and_forgets_nothing() -> None:
    c = CounterFamily("t_node_things", "t", ["kind"])
    h = HistogramFamily("t_node_seconds", "t", [])
    c.zero("x")
    h.zero()
    got = render(c, h)
    assert got[("t_node_things_total", "kind=x")] == 0
    assert got[("t_node_seconds_count", "")] == 0
    assert got[("t_node_seconds_bucket", "le=+Inf")] == 0
    c.inc("x")
    h.observe(1.0)
    for family in (c, h):
        family.forget({"x", ""})
        assert family.models() == set()
    got = render(c, h)
    assert got[("t_node_things_total", "kind=x")] == 1
    assert got[("t_node_seconds_count", "")] == 1
