"""A torpord with its /metrics port, scrapes over real HTTP, their values
(parsed by prometheus_client's own parser), and promtool."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from .conftest import Daemon, free_port

PROMTOOL = "/usr/bin/promtool"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def metrics_daemon(root: Path, config: str = "", **kw: Any) -> tuple[Daemon, int]:
    """A ready daemon with [metrics] on a free loopback port (another port
    if something took it meanwhile: the daemon then refuses to start)."""
    for attempt in range(5):
        port = free_port()
        d = Daemon(
            root / f"d{attempt}", config=f'[metrics]\nlisten = "127.0.0.1:{port}"\n' + config, **kw
        )
        try:
            d.wait_ready()
            return d, port
        except AssertionError:
            d.kill()
            if "metrics.listen" not in d.log() or "in use" not in d.log():
                raise
    raise AssertionError("no free port for the metrics in 5 tries")


@contextlib.contextmanager
def metrics_node(root: Path, config: str = "") -> Iterator[tuple[Daemon, int]]:
    """`metrics_daemon`, killed at the end."""
    d, port = metrics_daemon(root, config)
    try:
        yield d, port
    finally:
        d.kill()


def get(
    port: int, path: str = "/metrics", method: str = "GET"
) -> tuple[int, dict[str, str], bytes]:
    """Status, headers and body of one request."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, dict(answer.headers), answer.read()
    except urllib.error.HTTPError as err:
        with err:
            return err.code, dict(err.headers), err.read()


def scrape(port: int) -> Samples:
    """Every sample of one scrape: (name, labels) -> value."""
    status, _, body = get(port)
    assert status == 200, body
    samples: Samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    """One sample's value; 0 when the series is absent (not yet counted)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def series(samples: Samples, name: str) -> list[dict[str, str]]:
    """The label sets of `name`'s samples."""
    return [dict(labels) for (n, labels) in samples if n == name]


def promtool() -> str:
    """promtool's path, or skip (fail with TORPOR_REQUIRE_PROMTOOL=1)."""
    found = PROMTOOL if os.access(PROMTOOL, os.X_OK) else shutil.which("promtool")
    if found is None:
        if os.environ.get("TORPOR_REQUIRE_PROMTOOL") == "1":
            pytest.fail("promtool is required (TORPOR_REQUIRE_PROMTOOL=1) but missing")
        pytest.skip("promtool is not installed (Debian: apt-get install prometheus)")
    return found


def check_metrics(body: bytes) -> subprocess.CompletedProcess[str]:
    """`promtool check metrics` on `body`, as a scrape would give it."""
    return subprocess.run(
        [promtool(), "check", "metrics"],
        input=body.decode(),
        capture_output=True,
        text=True,
        timeout=60,
    )
