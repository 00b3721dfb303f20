"""A real Prometheus scraping a real torpord: after its first scrape, loads,
sleeps, wakes and unloads show in increase() and in the README's queries
(switch rate, wake and cold-start P99), which read the node's series.

Skipped without prometheus (Debian's `prometheus` package), unless
$TORPOR_REQUIRE_PROMTOOL=1 (CI)."""

from __future__ import annotations

import json
import math
import re
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from torpor import Client
from torpor.testing import make_checkpoint

from ..promtool import prometheus
from .conftest import Daemon, free_port
from .scrape import metrics_daemon

README = Path(__file__).resolve().parents[2] / "README.md"
SCRAPE_INTERVAL = "1s"


class Prometheus:
    """A Prometheus server scraping one target as job `torpor`, its data in `root`."""

    def __init__(self, root: Path, target: str) -> None:
        root.mkdir()
        config = root / "prometheus.yml"
        config.write_text(
            f"global:\n  scrape_interval: {SCRAPE_INTERVAL}\n"
            "scrape_configs:\n  - job_name: torpor\n"
            f'    static_configs:\n      - targets: ["{target}"]\n'
        )
        self.port = free_port()
        self.log = root / "prometheus.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [
                    prometheus(),
                    f"--config.file={config}",
                    f"--storage.tsdb.path={root / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def query(self, promql: str) -> list[dict[str, object]]:
        """The instant vector `promql` gives now (empty until the server is up)."""
        url = f"http://127.0.0.1:{self.port}/api/v1/query?" + urllib.parse.urlencode(
            {"query": promql}
        )
        try:
            with urllib.request.urlopen(url, timeout=10) as answer:
                body = json.load(answer)
        except OSError:
            if self.proc.poll() is not None:
                raise AssertionError(self.log.read_text(errors="replace")) from None
            return []
        assert body["status"] == "success", body
        result: list[dict[str, object]] = body["data"]["result"]
        return result

    def value(self, promql: str) -> float | None:
        """The single value of `promql` now; None if it has none."""
        result = self.query(promql)
        if not result:
            return None
        assert len(result) == 1, result
        sample = result[0]["value"]
        assert isinstance(sample, list)
        return float(sample[1])

    def wait_for(self, promql: str, wanted: float, seconds: float = 20.0) -> None:
        """Until `promql` gives `wanted` (it has scraped what it needs)."""
        deadline = time.monotonic() + seconds
        while (got := self.value(promql)) != wanted:
            assert time.monotonic() < deadline, f"{promql} is {got}, not {wanted}"
            time.sleep(0.2)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def watched(tmp_path: Path) -> Iterator[tuple[Daemon, Prometheus]]:
    prometheus()  # (skip before starting anything)
    d, port = metrics_daemon(tmp_path)
    server = Prometheus(tmp_path / "prometheus", f"127.0.0.1:{port}")
    try:
        yield d, server
    finally:
        server.stop()
        d.kill()


def readme_queries() -> list[str]:
    """The PromQL of the README's Prometheus metrics section."""
    section = README.read_text().split("### Prometheus metrics", 1)[1].split("\n### ", 1)[0]
    blocks = re.findall(r"```promql\n(.*?)```", section, re.S)
    return [line for block in blocks for line in block.splitlines() if line.strip()]


def test_prometheus_sees_every_switch_after_its_first_scrape(
    watched: tuple[Daemon, Prometheus],
) -> None:
    d, server = watched
    ckpt = make_checkpoint(d.models / "m", layers=4)
    # Its first scrape: the node's series are there, at 0.
    server.wait_for('sum(torpor_node_load_duration_seconds_count{job="torpor"})', 0)
    with Client(socket=str(d.socket)) as c:
        for model_id in ("a", "b"):
            c.load_model(model_id, ckpt)
        c.sleep_model("a", level=1)
        c.wake_model("a")
        c.unload_model("b")
        c.load_model("b", ckpt)
    server.wait_for("sum(torpor_node_load_duration_seconds_count)", 3)
    switches = "sum(torpor_node_transitions_total{outcome='succeeded'})"
    server.wait_for(switches, 6)  # (3 loads, a sleep, a wake, an unload)
    # Each model's first load is a series' first sample: no increase there
    # (nothing at all, while each series has one sample).
    per_model = server.value("sum(increase(torpor_load_duration_seconds_count[5m]))")
    assert (per_model or 0.0) < 3
    node = server.value("sum(increase(torpor_node_load_duration_seconds_count[5m]))")
    assert node is not None and node > 0
    queries = readme_queries()
    assert len(queries) == 3 and "torpor_node_transitions_total" in queries[0]
    for promql in queries:  # switch rate, wake P99, cold-start P99
        got = server.value(promql)
        assert got is not None and not math.isnan(got) and got > 0, promql
