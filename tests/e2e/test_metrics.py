"""/metrics on a real torpord: promtool accepts a real scrape, and the
figures move as transitions, engines and Acquires happen."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from torpor import Client, TorporError
from torpor.testing import make_checkpoint
from torpor.v1 import common_pb2

from ..unit.test_deploy import TARGET_LABELS, series_labels
from .conftest import Daemon
from .engines import Worker
from .scrape import check_metrics, get, metrics_daemon, metrics_node, scrape, series, value

HOLDER = Path(__file__).with_name("holder_engine.py")
# Counters with a model label get their first series when the thing first
# happens; this scrape saw no engine and no corrupt copy.
QUIET_UNTIL_IT_HAPPENS = {
    "torpor_quiesce_timeouts_total",
    "torpor_engines_revoked_total",
    "torpor_engine_attaches_total",
    "torpor_engine_detaches_total",
    "torpor_engines_attached",
}
DISK_CACHE = '[disk_cache]\npath = "{cache}"\ncapacity = "64MiB"\n'


@pytest.fixture
def node(tmp_path: Path) -> Iterator[tuple[Daemon, int]]:
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    config = DISK_CACHE.format(cache=cache) + '[agents]\nquiesce_timeout = "1s"\n'
    with metrics_node(tmp_path, config) as node:
        yield node


def test_promtool_accepts_a_scrape_after_every_kind_of_transition(
    node: tuple[Daemon, int],
) -> None:
    d, port = node
    ckpt = make_checkpoint(d.models / "m", layers=4)
    with Client(socket=str(d.socket)) as c:
        c.load_model("m", ckpt)
        c.sleep_model("m", level=1)
        c.wake_model("m")
        c.sleep_model("m", level=2, disk_copy=True)
        c.wake_model("m")
        c.offload_model("m", ["layers.1"], tier=common_pb2.TIER_HOST)
        c.offload_model("m", ["layers.2"], tier=common_pb2.TIER_DISK)
        c.offload_model("m", tier=common_pb2.TIER_DEVICE)
        c.acquire_model("m")
        c.load_model("other", ckpt, target_tier=common_pb2.TIER_HOST)
        c.unload_model("other")
    status, headers, body = get(port)
    assert status == 200
    assert headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    checked = check_metrics(body)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    samples = scrape(port)
    for name in (
        "torpor_load_duration_seconds_count",
        "torpor_wake_duration_seconds_count",
        "torpor_wake_first_layer_seconds_count",
        "torpor_sleep_duration_seconds_count",
        "torpor_offload_duration_seconds_count",
        "torpor_acquire_ready_seconds_count",
    ):
        assert series(samples, name), name
    assert {s["tier"] for s in series(samples, "torpor_offload_duration_seconds_count")} == {
        "host",
        "disk",
        "device",
    }
    # The histograms' buckets run from 1 ms to 10 min.
    les = {s["le"] for s in series(samples, "torpor_load_duration_seconds_bucket")}
    assert {"0.001", "600.0", "+Inf"} <= les and len(les) == 19
    # What the dashboard and the alert rules may query (tests/unit/test_deploy.py)
    # is what a real scrape holds: every series' name and label names.
    known = series_labels()
    for name, labels in samples:
        assert name in known, name
        assert {k for k, _ in labels} | TARGET_LABELS == known[name], name
    scraped = {name for name, _ in samples}
    assert {n for n in known if n != "up"} - scraped <= QUIET_UNTIL_IT_HAPPENS
    head_status, head_headers, head_body = get(port, method="HEAD")
    assert head_status == 200 and head_body == b"" and int(head_headers["Content-Length"]) > 0


def test_sleep_and_wake_move_the_histograms_and_the_memory(node: tuple[Daemon, int]) -> None:
    d, port = node
    ckpt = make_checkpoint(d.models / "m", layers=4)
    with Client(socket=str(d.socket)) as c:
        before = scrape(port)
        assert value(before, "torpor_models", state="active") == 0
        size = c.load_model("m", ckpt).layers
        total = sum(layer.size_bytes for layer in size)
        device = c.get_model("m").device.removeprefix("devices/")
        loaded = scrape(port)
        assert value(loaded, "torpor_load_duration_seconds_count", model="m") == 1
        assert value(loaded, "torpor_memory_used_bytes", tier="device", device=device) == total
        assert value(loaded, "torpor_model_resident_bytes", model="m", tier="device") == total
        assert value(loaded, "torpor_models", state="active") == 1
        assert value(loaded, "torpor_moved_bytes_total", path="source_to_device") == total

        c.sleep_model("m", level=1)
        asleep = scrape(port)
        assert value(asleep, "torpor_sleep_duration_seconds_count", model="m", level="1") == 1
        assert value(asleep, "torpor_memory_used_bytes", tier="device", device=device) == 0
        assert value(asleep, "torpor_memory_used_bytes", tier="host", device="") == total
        assert value(asleep, "torpor_model_resident_bytes", model="m", tier="host") == total
        assert value(asleep, "torpor_models", state="asleep") == 1
        assert value(asleep, "torpor_models", state="active") == 0
        assert value(asleep, "torpor_moved_bytes_total", path="device_to_host") == total

        c.wake_model("m")
        awake = scrape(port)
        wake = {"model": "m", "level": "1", "source": "host"}
        assert value(awake, "torpor_wake_duration_seconds_count", **wake) == 1
        assert value(awake, "torpor_wake_first_layer_seconds_count", **wake) == 1
        assert value(awake, "torpor_memory_used_bytes", tier="device", device=device) == total
        assert value(awake, "torpor_memory_used_bytes", tier="host", device="") == 0
        assert value(awake, "torpor_moved_bytes_total", path="host_to_device") == total

        c.sleep_model("m", level=2)  # (no disk copy: a wake reads the source again)
        c.wake_model("m")
        again = scrape(port)
        from_source = {"model": "m", "level": "2", "source": "source"}
        assert value(again, "torpor_sleep_duration_seconds_count", model="m", level="2") == 1
        assert value(again, "torpor_wake_duration_seconds_count", **from_source) == 1
        assert value(again, "torpor_wake_duration_seconds_count", **wake) == 1
        for kind, count in (("load", 1), ("sleep", 2), ("wake", 2)):
            labels = {"model": "m", "kind": kind, "outcome": "succeeded", "cause": "user"}
            assert value(again, "torpor_transitions_total", **labels) == count


def test_failed_transitions_and_corrupt_copies_are_counted(node: tuple[Daemon, int]) -> None:
    d, port = node
    ckpt = make_checkpoint(d.models / "m", layers=4)
    with Client(socket=str(d.socket)) as c:
        c.load_model("m", ckpt)
        c.sleep_model("m", level=2)
        # Bytes of the source change behind the daemon, its mtime put back:
        # only the checksums can tell.
        shard = next(ckpt.glob("*.safetensors"))
        stat = os.stat(shard)
        with open(shard, "r+b") as f:
            f.seek(-1, os.SEEK_END)
            last = f.read(1)
            f.seek(-1, os.SEEK_END)
            f.write(bytes([last[0] ^ 0xFF]))
        os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        with pytest.raises(TorporError):
            c.wake_model("m")
        samples = scrape(port)
        failed = [
            s
            for s in series(samples, "torpor_transitions_total")
            if s["kind"] == "wake" and s["outcome"] != "succeeded"
        ]
        assert failed == [{"model": "m", "kind": "wake", "outcome": "rolled_back", "cause": "user"}]
        assert value(samples, "torpor_transitions_total", **failed[0]) == 1
        assert value(samples, "torpor_checksum_failures_total", tier="source") == 1
        assert not series(samples, "torpor_wake_duration_seconds_count")  # (succeeded only)
        assert value(samples, "torpor_models", state="asleep") == 1


def test_a_corrupt_disk_copy_is_counted_and_the_wake_reads_the_source(
    node: tuple[Daemon, int],
) -> None:
    d, port = node
    ckpt = make_checkpoint(d.models / "m", layers=4)
    with Client(socket=str(d.socket)) as c:
        c.load_model("m", ckpt)
        c.sleep_model("m", level=2, disk_copy=True)
        slabs = sorted((d.root.parent / "cache").rglob("*.slab"))
        assert slabs
        samples = scrape(port)
        written = value(samples, "torpor_moved_bytes_total", path="device_to_disk")
        assert written == sum(layer.size_bytes for layer in c.get_model("m").layers)
        with open(slabs[0], "r+b") as f:
            f.seek(-1, os.SEEK_END)
            f.write(b"!")
        c.wake_model("m")
    samples = scrape(port)
    assert value(samples, "torpor_checksum_failures_total", tier="disk") == 1
    # Most layers came from their disk copies, the corrupt one from the source.
    wake = {"model": "m", "level": "2", "source": "disk"}
    assert value(samples, "torpor_wake_duration_seconds_count", **wake) == 1
    assert value(samples, "torpor_moved_bytes_total", path="source_to_device") > 0
    assert value(samples, "torpor_moved_bytes_total", path="disk_to_device") > 0


def test_engines_attach_detach_and_revocations_are_counted(node: tuple[Daemon, int]) -> None:
    d, port = node
    ckpt = make_checkpoint(d.models / "m", layers=4)
    with Client(socket=str(d.socket)) as c:
        c.load_model("m", ckpt)
        holder = Worker(d, "m", script=HOLDER)
        try:
            samples = scrape(port)
            assert value(samples, "torpor_engines_attached", model="m") == 1
            assert value(samples, "torpor_engine_attaches_total", model="m") == 1
            assert value(samples, "torpor_engine_detaches_total", model="m") == 0
            # It holds on to the weights past agents.quiesce_timeout: revoked.
            c.sleep_model("m", level=1)
            samples = scrape(port)
            assert value(samples, "torpor_quiesce_timeouts_total", model="m") == 1
            assert value(samples, "torpor_engines_revoked_total", model="m") == 1
            assert value(samples, "torpor_engine_detaches_total", model="m") == 1
            assert value(samples, "torpor_engines_attached", model="m") == 0
        finally:
            holder.kill()


def test_acquires_are_counted_by_result(node: tuple[Daemon, int]) -> None:
    d, port = node
    ckpt = make_checkpoint(d.models / "m", layers=4)
    with Client(socket=str(d.socket)) as c:
        c.load_model("m", ckpt)
        c.sleep_model("m", level=1)
        assert not c.acquire_model("m").hit  # woken for it
        assert c.acquire_model("m").hit
        with pytest.raises(TorporError):
            c.acquire_model("nobody")  # NOT_FOUND: no series for ids it doesn't know
    samples = scrape(port)
    assert value(samples, "torpor_acquires_total", model="m", result="waited") == 1
    assert value(samples, "torpor_acquires_total", model="m", result="hit") == 1
    assert value(samples, "torpor_acquire_ready_seconds_count", model="m", hit="false") == 1
    assert value(samples, "torpor_acquire_ready_seconds_count", model="m", hit="true") == 1
    labels = {"model": "m", "kind": "wake", "outcome": "succeeded", "cause": "acquire"}
    assert value(samples, "torpor_transitions_total", **labels) == 1
    assert all(("model", "nobody") not in labels for (_, labels) in samples)


def test_an_unloaded_models_series_stay_for_every_scraper(node: tuple[Daemon, int]) -> None:
    d, port = node
    ckpt = make_checkpoint(d.models / "m", layers=4)
    with Client(socket=str(d.socket)) as c:
        c.load_model("gone", ckpt)
        c.unload_model("gone")
        unload = {"model": "gone", "kind": "unload", "outcome": "succeeded", "cause": "user"}
        # Two Prometheus servers (an HA pair) scrape in turn: both see its
        # last values (for [metrics] keep_unloaded, 10 minutes by default).
        for _ in range(3):
            assert value(scrape(port), "torpor_transitions_total", **unload) == 1
        # Loaded again under the same id, it goes on with its series.
        c.load_model("gone", ckpt)
    load = {**unload, "kind": "load"}
    again = scrape(port)
    assert value(again, "torpor_transitions_total", **load) == 2
    assert value(again, "torpor_transitions_total", **unload) == 1


def test_with_keep_unloaded_0s_a_models_series_are_scraped_once_more_then_dropped(
    tmp_path: Path,
) -> None:
    d, port = metrics_daemon(tmp_path, 'keep_unloaded = "0s"\n')
    try:
        ckpt = make_checkpoint(d.models / "m", layers=4)
        with Client(socket=str(d.socket)) as c:
            c.load_model("gone", ckpt)
            c.load_model("kept", ckpt)
            c.register_model("registered", ckpt)
            c.load_model("registered", "")
            for model_id in ("gone", "registered"):
                c.unload_model(model_id)
        last = scrape(port)
        unload = {"model": "gone", "kind": "unload", "outcome": "succeeded", "cause": "user"}
        assert value(last, "torpor_transitions_total", **unload) == 1  # its unload is counted
        assert value(last, "torpor_models", state="unloaded") == 1  # (the catalogue entry)
        after = scrape(port)
        assert not [labels for (_, labels) in after if ("model", "gone") in labels]
        kept = {"model": "kept", "kind": "load", "outcome": "succeeded", "cause": "user"}
        assert value(after, "torpor_transitions_total", **kept) == 1
        registered = {**unload, "model": "registered"}
        assert value(after, "torpor_transitions_total", **registered) == 1  # still known
        # The node's series keep every one.
        node_load = {"kind": "load", "outcome": "succeeded", "cause": "user"}
        assert value(after, "torpor_node_transitions_total", **node_load) == 3
        assert value(after, "torpor_node_load_duration_seconds_count") == 3
    finally:
        d.kill()


def test_concurrent_scrapes_all_get_the_metrics(node: tuple[Daemon, int]) -> None:
    from concurrent.futures import ThreadPoolExecutor

    _, port = node
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda _: get(port), range(64)))
    assert {status for status, _, _ in answers} == {200}
    assert all(b"torpor_build_info" in body for _, _, body in answers)
