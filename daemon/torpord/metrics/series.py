"""Labelled counters and histograms kept by the metrics themselves (fed by
the history's and the Acquires' listeners), one family per metric name.

Kept as plain counts rather than prometheus_client's Counter and Histogram:
they are only touched on the event loop's thread, a model's series are
dropped by one dict operation when it goes for good, and a scrape emits
exactly the series it should (no `_created` samples).

A family whose first label is `model` is per model: its series appear at a
model's first event and go when the model does. Any other family is the
node's: `zero` creates its series at 0 up front, and they are never dropped,
so that rate() and increase() see every event from the first one on.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterator, Sequence

from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric

__all__ = ["BUCKETS", "CounterFamily", "HistogramFamily", "label_value"]

# Seconds: 1 ms .. 10 min (the contract with the dashboard and the alerts).
BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    25.0,
    50.0,
    100.0,
    250.0,
    600.0,
)

Labels = tuple[str, ...]


class _Histogram:
    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)  # per bucket, the last one +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(BUCKETS, value)] += 1  # (le: value <= bound)
        self.sum += value

    def cumulative(self) -> list[tuple[str, float]]:
        out, total = [], 0
        for bound, count in zip((*BUCKETS, math.inf), self.counts, strict=True):
            total += count
            out.append(("+Inf" if bound == math.inf else _le(bound), float(total)))
        return out


def _le(bound: float) -> str:
    return repr(float(bound))


def label_value(value: object) -> str:
    """An enum's (or any value's) label value: its value, lower case."""
    return str(getattr(value, "value", value)).lower()


class _Family:
    def __init__(self, name: str, documentation: str, labels: Sequence[str]) -> None:
        self.name = name
        self.documentation = documentation
        self.labels = list(labels)
        self.per_model = bool(labels) and labels[0] == "model"

    def models(self) -> set[str]:
        if not self.per_model:
            return set()
        return {key[0] for key in self._keys()}

    def _keys(self) -> Iterator[Labels]:
        raise NotImplementedError

    def forget(self, model_ids: set[str]) -> None:
        raise NotImplementedError

    def collect(self) -> Metric:
        raise NotImplementedError


class CounterFamily(_Family):
    """`name` without its `_total` suffix (prometheus_client adds it)."""

    def __init__(self, name: str, documentation: str, labels: Sequence[str]) -> None:
        super().__init__(name, documentation, labels)
        self.values: dict[Labels, int] = {}

    def inc(self, *labels: str) -> None:
        assert len(labels) == len(self.labels)
        self.values[labels] = self.values.get(labels, 0) + 1

    def zero(self, *labels: str) -> None:
        """Export the series `labels` at 0 until something counts."""
        assert len(labels) == len(self.labels)
        self.values.setdefault(labels, 0)

    def _keys(self) -> Iterator[Labels]:
        return iter(self.values)

    def forget(self, model_ids: set[str]) -> None:
        if self.per_model:
            for key in [k for k in self.values if k[0] in model_ids]:
                del self.values[key]

    def frozen(self) -> CounterFamily:
        """A copy of it as it is now (for a scrape rendered off the event loop)."""
        copy = CounterFamily(self.name, self.documentation, self.labels)
        copy.values = dict(self.values)
        return copy

    def collect(self) -> Metric:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labels)
        for key, value in sorted(self.values.items()):
            family.add_metric(list(key), value)
        return family


class HistogramFamily(_Family):
    def __init__(self, name: str, documentation: str, labels: Sequence[str]) -> None:
        super().__init__(name, documentation, labels)
        self.series: dict[Labels, _Histogram] = {}

    def observe(self, value: float, *labels: str) -> None:
        assert len(labels) == len(self.labels)
        series = self.series.get(labels)
        if series is None:
            series = self.series[labels] = _Histogram()
        series.observe(max(0.0, value))

    def zero(self, *labels: str) -> None:
        """Export the series `labels`, every bucket at 0, until something is observed."""
        assert len(labels) == len(self.labels)
        self.series.setdefault(labels, _Histogram())

    def _keys(self) -> Iterator[Labels]:
        return iter(self.series)

    def forget(self, model_ids: set[str]) -> None:
        if self.per_model:
            for key in [k for k in self.series if k[0] in model_ids]:
                del self.series[key]

    def frozen(self) -> HistogramFamily:
        """A copy of it as it is now (for a scrape rendered off the event loop)."""
        copy = HistogramFamily(self.name, self.documentation, self.labels)
        for key, series in self.series.items():
            copy.series[key] = frozen = _Histogram()
            frozen.counts, frozen.sum = list(series.counts), series.sum
        return copy

    def collect(self) -> Metric:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labels)
        for key, series in sorted(self.series.items()):
            family.add_metric(list(key), series.cumulative(), series.sum)
        return family
