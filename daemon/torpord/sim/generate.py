"""Synthetic traces: long-tail popularity, bursty groups, daily cycles.

- Popularity is Zipf: the model of rank r gets a share ∝ 1 / r**s of the
  background requests (ranks are dealt to models at random, so popularity
  and size are independent). In Alibaba's model marketplace 94% of models
  got 1.35% of requests; s ≈ 1.1 over 60 models gives a similar tail.
- Bursts: the models are dealt into groups of `group_size` that become
  active together (a tenant's pipeline, an evaluation sweep): bursts start
  as a Poisson process of `burst_rate` per hour, pick a group at random,
  last an exponential `burst_length` on average and add `burst_rps`
  requests per second spread over the group's models.
- Daily cycle: the background rate is multiplied by
  1 + amplitude · sin(2π · (hour - 9) / 24) (a peak in the afternoon).
- Request durations are log-normal around `duration` seconds.

Same settings and seed, same trace (numpy's PCG64).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from torpord.policies.view import Bandwidth
from torpord.sim.spec import MONDAY, GiB, ModelSpec, NodeSpec
from torpord.sim.trace import Request

__all__ = ["PRESETS", "Generator", "generate", "preset"]

# Weight sizes (GiB, bf16) of common open models, and their layer counts:
# 1B, 3B, 7-8B, 13-14B, 27B, 32B.
SIZES = ((2.3, 16), (6.0, 28), (15.0, 32), (27.5, 40), (50.0, 46), (61.0, 64))
SIZE_WEIGHTS = (0.2, 0.25, 0.3, 0.15, 0.06, 0.04)


@dataclass(frozen=True)
class Generator:
    models: int = 60
    zipf: float = 1.1  # s: the popularity exponent
    rate: float = 0.1  # background requests per second, on average over a day
    group_size: int = 4
    burst_rate: float = 2.0  # bursts per hour
    burst_length: float = 600.0  # seconds, on average
    burst_rps: float = 0.15  # requests per second of a burst, over its group
    amplitude: float = 0.5  # of the daily cycle, 0 ≤ a < 1
    days: float = 1.0
    duration: float = 4.0  # seconds: the median request's use of its model
    device_share: float = 0.1  # the device holds this share of all models' bytes
    host_share: float = 0.5
    disk_gib: float | None = None  # a disk cache of this size, or none
    seed: int = 1

    def check(self) -> None:
        """ValueError naming the first parameter out of its range."""
        checks = (
            ("models", 1 <= self.models <= 10_000),
            ("zipf", 0 <= self.zipf <= 10),
            ("rate", 0 <= self.rate <= 1000),
            ("group_size", 1 <= self.group_size <= self.models),
            ("burst_rate", 0 <= self.burst_rate <= 3600),
            ("burst_length", 0 < self.burst_length <= 86400),
            ("burst_rps", 0 <= self.burst_rps <= 1000),
            ("amplitude", 0 <= self.amplitude < 1),
            ("days", 0 < self.days <= 366),
            ("duration", 0 < self.duration <= 3600),
            ("device_share", 0 < self.device_share <= 1),
            ("host_share", 0 <= self.host_share <= 10),
            ("disk_gib", self.disk_gib is None or 0 <= self.disk_gib <= 1e6),
        )
        for name, ok in checks:
            if not ok:
                raise ValueError(f"generator parameter {name} is out of range")
        if self.rate * self.days * 86400 + self.burst_rps * self.days * 86400 > 2e7:
            raise ValueError("generator: more than 20 million requests; lower rate or days")


PRESETS: dict[str, Generator] = {
    # The default: 60 models, a long tail, a few bursts, a mild day.
    "default": Generator(),
    # Groups of models wake together often: many short, intense bursts
    # over a flatter popularity (a group of 4 takes about 70% of the device).
    "bursty": Generator(zipf=0.9, rate=0.05, burst_rate=6.0, burst_length=300.0, burst_rps=0.4),
    # A strong daily cycle (busy days, quiet nights) with a steeper tail,
    # over two days.
    "diurnal": Generator(zipf=1.3, amplitude=0.9, burst_rate=0.5, days=2.0),
}


def preset(name: str, **overrides: object) -> Generator:
    return replace(PRESETS[name], **overrides)  # type: ignore[arg-type]


def _node(g: Generator, rng: np.random.Generator) -> NodeSpec:
    kinds = rng.choice(len(SIZES), size=g.models, p=SIZE_WEIGHTS)
    models = tuple(
        ModelSpec(f"m{i:02d}", round(SIZES[k][0] * GiB), SIZES[k][1]) for i, k in enumerate(kinds)
    )
    total = sum(m.size for m in models)
    device = max(round(total * g.device_share), max(m.size for m in models))
    return NodeSpec(
        models=models,
        device=device,
        host=round(total * g.host_share),
        disk=None if g.disk_gib is None else round(g.disk_gib * GiB),
        bandwidth=Bandwidth(),  # (assumed rates: see Bandwidth's docstring)
        start=MONDAY,
    )


def _background(g: Generator, rng: np.random.Generator, span: float) -> np.ndarray:
    """Arrival times of the background requests (thinned Poisson process)."""
    peak = g.rate * (1 + g.amplitude)
    count = rng.poisson(peak * span)
    times = np.sort(rng.uniform(0.0, span, size=count))
    hour = (times / 3600.0) % 24
    level = 1 + g.amplitude * np.sin(2 * math.pi * (hour - 9) / 24)
    keep = rng.uniform(0.0, 1 + g.amplitude, size=count) < level
    return np.asarray(times[keep])


def _bursts(
    g: Generator, rng: np.random.Generator, span: float, groups: list[list[int]]
) -> tuple[np.ndarray, np.ndarray]:
    """(arrival times, model indices) of the requests of every burst."""
    count = rng.poisson(g.burst_rate * span / 3600.0)
    starts = rng.uniform(0.0, span, size=count)
    times, who = [np.empty(0)], [np.empty(0, dtype=np.int64)]
    for start in starts:
        members = groups[rng.integers(len(groups))]
        length = rng.exponential(g.burst_length)
        n = rng.poisson(g.burst_rps * length)
        times.append(start + rng.uniform(0.0, length, size=n))
        who.append(rng.choice(np.asarray(members), size=n))
    t, m = np.concatenate(times), np.concatenate(who)
    inside = t < span
    return t[inside], m[inside]


def generate(g: Generator) -> tuple[NodeSpec, list[Request]]:
    """A node and a trace of `g.days` days."""
    g.check()
    rng = np.random.default_rng(g.seed)
    node = _node(g, rng)
    span = g.days * 86400.0
    ranks = rng.permutation(g.models)  # model i has popularity rank ranks[i] (0 = top)
    weights = 1.0 / (ranks + 1.0) ** g.zipf
    weights /= weights.sum()
    background = _background(g, rng, span)
    chosen = rng.choice(g.models, size=len(background), p=weights)
    order = rng.permutation(g.models)
    groups = [list(order[i : i + g.group_size]) for i in range(0, g.models, g.group_size)]
    burst_times, burst_models = _bursts(g, rng, span, groups)
    times = np.concatenate([background, burst_times])
    models = np.concatenate([chosen, burst_models])
    # Log-normal durations with median `duration` (sigma 0.8: most between a
    # quarter and four times it), capped at ten minutes.
    durations = np.minimum(g.duration * rng.lognormal(0.0, 0.8, size=len(times)), 600.0)
    sort = np.argsort(times, kind="stable")
    ids = [m.model_id for m in node.models]
    requests = [
        Request(round(float(times[i]), 3), ids[int(models[i])], round(float(durations[i]), 3))
        for i in sort
    ]
    return node, requests
