"""Images under a real torpord: an engine publishes its own final weights,
the daemon seals them, later engines find them by fingerprint and map them,
and they sleep, wake and offload like a loaded model."""

from __future__ import annotations

import contextlib
import mmap
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import grpc
import pytest
from torpor import Client
from torpor.errors import TorporError
from torpor.testing import make_checkpoint
from torpor.v1 import common_pb2

from .conftest import Daemon, with_disk_cache
from .observe import settle, used

torch = pytest.importorskip("torch")

from torpor.agent import attach  # noqa: E402
from torpor.agent.publish import find_image, groups_of, publish  # noqa: E402

FINGERPRINT = "tiny-engine/fused-qkv/bf16/tp1"


def weights(seed: int = 0) -> dict[str, torch.Tensor]:
    """What an engine computed: names and shapes no checkpoint has."""
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {"embed.weight": torch.randn(64, 32, generator=g)}
    for i in range(3):
        out[f"model.layers.{i}.qkv_proj.weight"] = torch.randn(96, 32, generator=g).to(
            torch.bfloat16
        )
        out[f"model.layers.{i}.gate_up.weight"] = torch.randn(128, 32, generator=g)
        out[f"model.layers.{i}.scale"] = torch.tensor([3], dtype=torch.int32)
    out["norm.weight"] = torch.ones(32)
    out["lm_head.weight"] = torch.randn(64, 32, generator=g)
    return out


def memfd_of(daemon: Daemon, model_id: str, layer: str) -> str:
    """A path that opens the daemon's memfd of a layer's DEVICE slab."""
    pid = daemon.proc.pid
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith(
                f"/memfd:torpor:{model_id}:{layer}:device"
            ):
                return f"/proc/{pid}/fd/{fd}"
    raise AssertionError(f"the daemon holds no memfd for {model_id}/{layer}")


def same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> bool:
    return got.keys() == want.keys() and all(
        got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]) for k in want
    )


def test_publish_then_attach_by_fingerprint(daemon: Daemon, client: Client) -> None:
    want = weights()
    assert find_image(FINGERPRINT, client=client) is None
    before = used(client)
    with publish("img", FINGERPRINT, groups_of(want), client=client) as mine:
        assert not mine.publishing
        assert same(mine.state_dict(), want)
        model = client.get_model("img")
        assert model.state == common_pb2.MODEL_STATE_ACTIVE
        assert model.fingerprint == FINGERPRINT and model.source.path == ""
        assert [layer.name for layer in model.layers] == [
            "pre",
            "layers.0",
            "layers.1",
            "layers.2",
            "post",
        ]
        assert all(layer.checksum for layer in model.layers)
        assert model.last_transition.kind == common_pb2.TRANSITION_KIND_PUBLISH
        assert model.last_transition.bytes == sum(layer.size_bytes for layer in model.layers) > 0
        assert find_image(FINGERPRINT, client=client) == "img"
        shown = daemon.ctl("get", "img").stdout
        assert f"fingerprint {FINGERPRINT}" in shown and "State:    active" in shown
        # A second engine maps the same slabs: no second copy.
        after_publish = used(client)
        with attach("img", client=client) as other:
            assert same(other.state_dict(), want)
            assert used(client) == after_publish
        # Sealed: not even a process that opens the daemon's own memfd for
        # writing can change the bytes (write() and shared writable mmap fail).
        slab = memfd_of(daemon, "img", "post")
        fd = os.open(slab, os.O_RDWR)
        try:
            with pytest.raises(PermissionError):
                os.pwrite(fd, b"x", 0)
            with pytest.raises(PermissionError):
                mmap.mmap(fd, 4096, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        assert same(mine.state_dict(), want)
    client.unload_model("img")
    assert settle(lambda: used(client) == before)


def test_images_sleep_wake_and_verify(daemon: Daemon, client: Client) -> None:
    want = weights(1)
    with publish("img", FINGERPRINT, groups_of(want), client=client) as model:
        for _ in range(3):
            client.sleep_model("img", level=1)
            assert not model.ready()
            client.wake_model("img", verify=True)
            with model.use(timeout=30):
                assert same(model.state_dict(), want)
        # Level 2 needs somewhere to keep it: an image has no source.
        with pytest.raises(TorporError) as err:
            client.sleep_model("img", level=2)
        assert (err.value.code, err.value.reason) == (
            grpc.StatusCode.FAILED_PRECONDITION,
            "IMAGE_NEEDS_DISK_CACHE",
        )
        assert client.get_model("img").state == common_pb2.MODEL_STATE_ACTIVE


def test_a_publisher_that_dies_before_committing_leaves_nothing(
    daemon: Daemon, client: Client
) -> None:
    before = used(client)
    script = textwrap.dedent(
        f"""
        import os, sys, torch
        from torpor import Client
        from torpor.agent.attach import AttachedModel
        from torpor.agent.publish import publish_request
        tensors = {{"w": torch.ones(1 << 20)}}
        request = publish_request("fp-dies", [("pre", tensors)])
        model = AttachedModel("dies", client=Client(socket={str(daemon.socket)!r}),
                              publish=request)
        model.state_dict()["w"].fill_(7)
        print("written", flush=True)
        sys.stdin.readline()
        os._exit(9)
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=daemon.env,
    )
    assert proc.stdout is not None and proc.stdin is not None
    assert proc.stdout.readline().strip() == "written"
    model = client.get_model("dies")
    assert model.state == common_pb2.MODEL_STATE_PUBLISHING
    # Nobody else can attach to it meanwhile.
    with pytest.raises(TorporError) as err:
        attach("dies", client=client)
    assert err.value.reason == "MODEL_NOT_ACTIVE"
    proc.stdin.write("\n")
    proc.stdin.flush()
    assert proc.wait(30) == 9
    proc.stdin.close()
    proc.stdout.close()
    assert settle(lambda: not client.list_models())
    assert settle(lambda: used(client) == before)


def test_level_2_and_disk_offload_go_through_the_disk_cache(tmp_path: Path) -> None:
    d = with_disk_cache(tmp_path)
    try:
        d.wait_ready()
        want = weights(2)
        with (
            Client(socket=str(d.socket)) as client,
            publish("img", FINGERPRINT, groups_of(want), client=client) as model,
        ):
            device_used = used(client)[0]
            for _ in range(2):
                client.sleep_model("img", level=2)  # (a disk copy is written first)
                asleep = client.get_model("img")
                assert asleep.sleep_level == 2
                assert {layer.tier for layer in asleep.layers} == {common_pb2.TIER_DISK}
                assert used(client)[0] < device_used
                client.wake_model("img", verify=True)
                with model.use(timeout=30):
                    assert same(model.state_dict(), want)
            client.offload_model("img", ["layers.1"], tier=common_pb2.TIER_DISK)
            assert not model.ready("layers.1")
            client.offload_model("img", ["layers.1"], tier=common_pb2.TIER_DEVICE)
            with model.use(timeout=30):
                assert same(model.state_dict(), want)
            # Through grpcurl: the image is found by its fingerprint, and only it.
            found = d.call("torpor.v1.ModelService/ListModels", {"fingerprint": FINGERPRINT})
            assert [m["model_id"] for m in found["models"]] == ["img"]
            assert found["models"][0]["fingerprint"] == FINGERPRINT
            assert d.call("torpor.v1.ModelService/ListModels", {"fingerprint": "other"}) == {}
    finally:
        d.kill()


def test_one_image_per_fingerprint_and_per_id(daemon: Daemon, client: Client) -> None:
    want = weights(3)
    with publish("img", FINGERPRINT, groups_of(want), client=client):
        with pytest.raises(TorporError) as err:
            publish("img2", FINGERPRINT, groups_of(want), client=client)
        assert (err.value.code, err.value.reason) == (
            grpc.StatusCode.ALREADY_EXISTS,
            "IMAGE_EXISTS",
        )
        assert err.value.metadata["model_id"] == "img"
        with pytest.raises(TorporError) as err:
            publish("img", "another-fingerprint", groups_of(want), client=client)
        assert err.value.reason == "MODEL_EXISTS"
        # A Load into an image's id says what is there.
        with pytest.raises(TorporError) as err:
            client.load_model("img", str(make_checkpoint(daemon.models / "m.safetensors")))
        assert err.value.reason == "MODEL_EXISTS"
        assert f"an image with fingerprint {FINGERPRINT}" in err.value.message
        assert [m.model_id for m in client.list_models()] == ["img"]


def test_a_forced_unload_stops_a_publisher(daemon: Daemon, client: Client) -> None:
    from torpor.agent.attach import AttachedModel
    from torpor.agent.publish import publish_request

    before = used(client)
    request = publish_request("fp", [("pre", {"w": torch.ones(1 << 16)})])
    model = AttachedModel("pub", client=client, publish=request)
    try:
        model.state_dict()["w"].fill_(1)
        gone = client.unload_model("pub", force=True)
        assert gone.state == common_pb2.MODEL_STATE_UNLOADED
        assert settle(lambda: model.ended is not None)
        with pytest.raises(TorporError):
            model.commit()
        assert client.list_models() == []
        assert settle(lambda: used(client) == before)
    finally:
        model.close()


def test_a_bad_catalogue_is_refused_naming_the_problem(daemon: Daemon, client: Client) -> None:
    from torpor.agent.attach import AttachedModel
    from torpor.agent.publish import publish_request

    request = publish_request("fp", [("pre", {"w": torch.ones(64)})])
    request.groups[0].tensors[0].slab_offset = 100  # not a multiple of 256
    with pytest.raises(TorporError) as err:
        AttachedModel("bad", client=client, publish=request)
    assert (err.value.code, err.value.reason) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_CATALOGUE",
    )
    assert "tensor 0 of group 0" in err.value.message
    assert client.list_models() == []
