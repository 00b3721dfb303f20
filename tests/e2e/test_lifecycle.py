"""A newcomer's path, for real: torpord + grpcurl, bytes checked in the daemon's memfds."""

from __future__ import annotations

from pathlib import Path

from torpor.testing import make_checkpoint
from torpord.backends.nvml import discover

from .conftest import Daemon
from .residency import check_residency, daemon_slabs


def test_grpcurl_lists_and_describes_without_protos(daemon: Daemon) -> None:
    services = daemon.grpcurl("list").stdout.split()
    for name in (
        "torpor.v1.ModelService",
        "torpor.v1.NodeService",
        "torpor.v1.AgentService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    ):
        assert name in services
    described = daemon.grpcurl("describe", "torpor.v1.ModelService").stdout
    assert "rpc WakeModel ( .torpor.v1.WakeModelRequest )" in described
    assert "MODEL_STATE_ASLEEP" in daemon.grpcurl("describe", "torpor.v1.ModelState").stdout
    for service in ("", "torpor.v1.ModelService", "torpor.v1.NodeService"):
        status = daemon.call("grpc.health.v1.Health/Check", {"service": service})
        assert status == {"status": "SERVING"}


def test_get_node(daemon: Daemon) -> None:
    node = daemon.call("torpor.v1.NodeService/GetNode")["node"]
    assert node["backend"] == "BACKEND_HOST"
    assert node["backend_reason"] == "configured"  # backend.kind = "host" in its config
    assert len(node["devices"]) == 2
    assert node["devices"][0]["uuid"].startswith("HOST-")
    assert node["devices"][0]["capacity_bytes"] == str(256 * 2**20)
    assert node["host_pool"]["capacity_bytes"] == str(256 * 2**20)
    assert node["allowed_roots"] == [str(daemon.models)]
    assert node["version"]
    found = discover()  # what the driver says here, asked the same way
    if found.gpus:
        assert [g["uuid"] for g in node["gpus"]] == [g.uuid for g in found.gpus]
    else:  # no GPUs, and why
        assert "gpus" not in node and node["gpu_discovery"] == found.reason
        shown = daemon.ctl("node").stdout
        assert f"GPUs: none: {found.reason}" in " ".join(shown.split())


def test_whole_lifecycle_over_grpcurl_with_bytes_checked(daemon: Daemon) -> None:
    ckpt = make_checkpoint(daemon.models / "llama", layers=6, hidden=128, shards=3)
    call = daemon.call
    m = call(
        "torpor.v1.ModelService/LoadModel", {"model_id": "llama", "source": str(ckpt), "wait": True}
    )["model"]
    assert m["state"] == "MODEL_STATE_ACTIVE"
    assert m["last_transition"]["outcome"] == "OUTCOME_SUCCEEDED"
    m = check_residency(daemon, "llama")
    assert {layer["tier"] for layer in m["layers"]} == {"TIER_DEVICE"}
    total = int(m["bytes"]["total_bytes"])
    node = call("torpor.v1.NodeService/GetNode")["node"]
    assert sum(int(dev.get("used_bytes", 0)) for dev in node["devices"]) == total

    m = call("torpor.v1.ModelService/SleepModel", {"model_id": "llama", "level": 1, "wait": True})[
        "model"
    ]
    assert (m["state"], m["sleep_level"]) == ("MODEL_STATE_ASLEEP", 1)
    m = check_residency(daemon, "llama")
    assert {layer["tier"] for layer in m["layers"]} == {"TIER_HOST"}
    node = call("torpor.v1.NodeService/GetNode")["node"]
    assert node["host_pool"]["used_bytes"] == str(total)
    assert all("used_bytes" not in dev for dev in node["devices"])

    m = call("torpor.v1.ModelService/WakeModel", {"model_id": "llama", "wait": True})["model"]
    assert m["state"] == "MODEL_STATE_ACTIVE"
    check_residency(daemon, "llama")

    m = call("torpor.v1.ModelService/SleepModel", {"model_id": "llama", "level": 2, "wait": True})[
        "model"
    ]
    assert (m["state"], m["sleep_level"]) == ("MODEL_STATE_ASLEEP", 2)
    assert daemon_slabs(daemon.proc.pid) == {}

    call("torpor.v1.ModelService/WakeModel", {"model_id": "llama", "wait": True})
    check_residency(daemon, "llama")

    m = call(
        "torpor.v1.ModelService/OffloadModel",
        {
            "model_id": "llama",
            "layers": ["pre", "layers.2", "post"],
            "tier": "TIER_HOST",
            "wait": True,
        },
    )["model"]
    assert m["state"] == "MODEL_STATE_OFFLOADED"
    m = check_residency(daemon, "llama")
    assert [layer["name"] for layer in m["layers"] if layer["tier"] == "TIER_HOST"] == [
        "pre",
        "layers.2",
        "post",
    ]

    m = call(
        "torpor.v1.ModelService/OffloadModel",
        {"model_id": "llama", "tier": "TIER_DEVICE", "wait": True},
    )["model"]
    assert m["state"] == "MODEL_STATE_ACTIVE"
    check_residency(daemon, "llama")

    call("torpor.v1.ModelService/UnloadModel", {"model_id": "llama", "wait": True})
    assert call("torpor.v1.ModelService/ListModels") == {}
    assert daemon_slabs(daemon.proc.pid) == {}
    node = call("torpor.v1.NodeService/GetNode")["node"]
    assert "used_bytes" not in node["host_pool"]


def test_load_without_wait_then_poll(daemon: Daemon, tmp_path: Path) -> None:
    ckpt = make_checkpoint(daemon.models / "m.safetensors", layers=2)
    m = daemon.call("torpor.v1.ModelService/LoadModel", {"model_id": "m", "source": str(ckpt)})[
        "model"
    ]
    assert m["state"] in ("MODEL_STATE_LOADING", "MODEL_STATE_ACTIVE")
    for _ in range(100):
        m = daemon.call("torpor.v1.ModelService/GetModel", {"model_id": "m"})["model"]
        if m["state"] == "MODEL_STATE_ACTIVE":
            break
    assert m["state"] == "MODEL_STATE_ACTIVE"


def test_disk_tier_over_grpcurl_and_torporctl_survives_a_restart(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    config = f'[disk_cache]\npath = "{cache}"\ncapacity = "64MiB"\n'
    d = Daemon(tmp_path, config=config)
    try:
        d.wait_ready()
        ckpt = make_checkpoint(d.models / "m", layers=4, shards=2)
        d.call(
            "torpor.v1.ModelService/LoadModel", {"model_id": "m", "source": str(ckpt), "wait": True}
        )
        m = d.call(
            "torpor.v1.ModelService/OffloadModel",
            {
                "model_id": "m",
                "layers": ["layers.0", "layers.3"],
                "tier": "TIER_DISK",
                "wait": True,
            },
        )["model"]
        assert [la["name"] for la in m["layers"] if la["tier"] == "TIER_DISK"] == [
            "layers.0",
            "layers.3",
        ]
        assert int(m["bytes"]["disk_bytes"]) > 0
        check_residency(d, "m")  # the disk layers hold no slab in the daemon
        out = d.ctl("sleep", "m", "--level", "2", "--disk-copy").stdout
        assert "asleep (level 2)" in out and "disk" in out
        node = d.call("torpor.v1.NodeService/GetNode")["node"]
        used = int(node["disk_cache"]["used_bytes"])
        assert node["disk_cache"]["enabled"] and used >= int(m["bytes"]["total_bytes"])
        assert d.stop() == 0
    finally:
        d.kill()
    again = Daemon(tmp_path, config=config)  # a restart: the cache is still there
    try:
        again.wait_ready()
        node = again.call("torpor.v1.NodeService/GetNode")["node"]
        assert int(node["disk_cache"]["used_bytes"]) == used
        again.ctl("load", "m", str(ckpt))
        m = check_residency(again, "m")
        assert {la["tier"] for la in m["layers"]} == {"TIER_DEVICE"}
    finally:
        again.kill()
