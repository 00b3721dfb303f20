"""Prometheus metrics: what the daemon did and holds, at /metrics over HTTP.

The rest of the daemon knows nothing of Prometheus: it keeps plain counters
and a history of finished transitions (`torpord.core.history`); this package
turns them into metric families at scrape time and serves them.
"""

from torpord.metrics.exporter import Metrics, serve_metrics
from torpord.metrics.http import MetricsServer

__all__ = ["Metrics", "MetricsServer", "serve_metrics"]
