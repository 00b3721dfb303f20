"""Images on the CUDA backend, end to end, on an emulated GPU (tests/emulator):
a torpord with `backend.kind = "cuda"` through the real cuda-bindings, and
engine processes (tests/emulator/imager.py) that publish through
`torpor.agent.publish` (writable CUDA slabs, committed, then mapped again
read-only at the same addresses), attach to what was published, or
misbehave. On a GPU the daemon can't seal device memory: the importer sets
its own access, so what holds an image's bytes is the read-only mapping the
agent takes and the checksums that `wake --verify` checks."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from tests import emulator

from .conftest import Daemon
from .engines import Worker
from .observe import settle

pytest.importorskip("torch")
emulator.require()

from torpor import Client  # noqa: E402
from torpor.errors import TorporError  # noqa: E402
from torpor.v1 import common_pb2  # noqa: E402
from torpord.storage.checksum import slab_checksum  # noqa: E402

IMAGER = Path(emulator.__file__).with_name("imager.py")
FINGERPRINT = "imager/fused-qkv/bf16/tp1"
GRANULE = 2 << 20  # the emulated driver's allocation granularity
BACKEND = (
    '[backend]\nkind = "cuda"\n[backend.cuda]\ndevice_memory = "256MiB"\npinned_chunk = "32MiB"\n'
)


@pytest.fixture(scope="session")
def libraries(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return emulator.build(tmp_path_factory.getbasetemp() / "emulator")


@pytest.fixture
def gpu_env(libraries: Path, tmp_path: Path) -> dict[str, str]:
    """An emulated node of one 1 GiB GPU, of this test's own."""
    node = hashlib.sha256(str(tmp_path).encode()).hexdigest()[:12]
    return emulator.environment(libraries, node=node, memory=1 << 30)


@pytest.fixture
def gpu_used(libraries: Path, gpu_env: dict[str, str]) -> Callable[[], int]:
    """What the (emulated) driver has in use on the GPU now, node-wide."""
    return lambda: emulator.used(libraries, gpu_env["CUDAEMU_NODE"])


def started(root: Path, cache: Path, env: dict[str, str]) -> Daemon:
    d = Daemon(
        root,
        config=f'[disk_cache]\npath = "{cache}"\ncapacity = "64MiB"\n',
        backend=BACKEND,
        env=env,
    )
    d.ready()
    return d


@pytest.fixture
def daemon(tmp_path: Path, gpu_env: dict[str, str]) -> Iterator[Daemon]:
    d = started(tmp_path / "d", tmp_path / "cache", gpu_env)
    try:
        yield d
    finally:
        d.kill()


def imager(d: Daemon, model_id: str, *args: str) -> Worker:
    return Worker(d, model_id, *args, script=IMAGER, env=d.env)


def padded(model: common_pb2.Model) -> int:
    """The model's bytes on the GPU: each layer an allocation, padded."""
    return sum(-(-layer.size_bytes // GRANULE) * GRANULE for layer in model.layers)


def device_memory(pid: int) -> list[bytes]:
    """The bytes of every device allocation a process holds (the emulated
    driver's memfds, read through /proc/<pid>/fd)."""
    found: dict[int, bytes] = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        path = f"/proc/{pid}/fd/{fd}"
        try:
            if os.readlink(path).startswith("/memfd:cudaemu:"):
                with open(path, "rb") as f:
                    found.setdefault(os.stat(path).st_ino, f.read())
        except FileNotFoundError:
            continue
    return list(found.values())


def held(client: Client) -> int:
    return sum(dev.held_bytes for dev in client.get_node().devices)


def nothing_left(client: Client, gpu_used: Callable[[], int]) -> bool:
    node = client.get_node()
    return (
        not client.list_models()
        and gpu_used() == 0
        and all(dev.used_bytes == 0 and dev.held_bytes == 0 for dev in node.devices)
    )


def test_an_image_published_on_the_gpu_is_mapped_read_only_and_kept_across_sleeps(
    daemon: Daemon, client: Client, gpu_used: Callable[[], int]
) -> None:
    publisher = imager(daemon, "img", "publish", FINGERPRINT, "1")
    other: Worker | None = None
    try:
        given = publisher.hello["given"]
        model = client.get_model("img")
        assert model.state == common_pb2.MODEL_STATE_ACTIVE
        assert model.fingerprint == FINGERPRINT and not model.source.path
        assert [layer.name for layer in model.layers] == ["pre", "layers.0", "layers.1", "post"]
        assert model.last_transition.kind == common_pb2.TRANSITION_KIND_PUBLISH
        # The checksums are the device memory's: the bytes the engine wrote.
        on_device = device_memory(daemon.proc.pid)
        assert len(on_device) == len(model.layers)
        for layer in model.layers:
            assert layer.checksum, layer.name
            assert any(
                slab_checksum(data[: layer.size_bytes]) == layer.checksum for data in on_device
            )
        # One allocation per group, charged and in use once.
        on_gpu = padded(model)
        assert on_gpu == 5 * GRANULE  # (layers.1 spans two granules)
        assert gpu_used() == on_gpu
        assert client.get_node().devices[0].used_bytes == on_gpu
        first = publisher.ask("read")
        assert first["digest"] == given
        assert first["ranges"] == publisher.hello["written_at"]  # mapped again where written
        # A second engine maps the same memory: the same bytes, no second copy.
        other = imager(daemon, "img", "attach")
        assert other.ask("read")["digest"] == given
        assert gpu_used() == on_gpu
        for level in (1, 2, 1):  # (2: an image keeps a disk copy first)
            assert client.sleep_model("img", level=level).engines == 2
            assert gpu_used() == 0, f"level {level}: the driver still has the image's memory"
            awake = client.wake_model("img", verify=True)
            assert awake.state == common_pb2.MODEL_STATE_ACTIVE
            assert gpu_used() == on_gpu
            assert publisher.ask("read") == first  # same bytes at the same addresses
            assert other.ask("read")["digest"] == given
        # One layer out to the disk cache (read out of the GPU) and back, verified.
        client.offload_model("img", ["layers.1"], common_pb2.TIER_DISK)
        assert gpu_used() == on_gpu - 2 * GRANULE
        client.offload_model("img", [], common_pb2.TIER_DEVICE, verify=True)
        assert gpu_used() == on_gpu
        assert publisher.ask("read") == first
        # Read-only after the commit, for the publisher as for anyone: a
        # write into the image faults (and the fault ends that process's context).
        assert other.ask("write") == {"write": "CUDA_ERROR_ILLEGAL_ADDRESS"}
        assert publisher.ask("write") == {"write": "CUDA_ERROR_ILLEGAL_ADDRESS"}
        assert other.proc.wait(60) == 0 and publisher.proc.wait(60) == 0
        assert settle(lambda: client.get_model("img").engines == 0)
        client.sleep_model("img", level=1)
        client.wake_model("img", verify=True)  # nothing was changed
    finally:
        publisher.kill()
        if other is not None:
            other.kill()
    client.unload_model("img")
    assert settle(lambda: nothing_left(client, gpu_used))


def test_a_publisher_killed_before_its_commit_leaves_nothing_on_the_gpu(
    daemon: Daemon, client: Client, gpu_used: Callable[[], int]
) -> None:
    dying = imager(daemon, "img", "unfinished", FINGERPRINT, "2")
    try:
        model = client.get_model("img")
        assert model.state == common_pb2.MODEL_STATE_PUBLISHING
        assert gpu_used() == padded(model) > 0
    finally:
        dying.kill()  # (SIGKILL: its writable mappings go with it)
    assert settle(lambda: nothing_left(client, gpu_used))
    # Nothing is in the way of publishing it again.
    again = imager(daemon, "img", "publish", FINGERPRINT, "2")
    try:
        assert again.ask("read")["digest"] == again.hello["given"]
        assert gpu_used() == padded(client.get_model("img"))
    finally:
        again.quit()
    client.unload_model("img")
    assert settle(lambda: nothing_left(client, gpu_used))


def test_verify_catches_bytes_changed_behind_the_daemons_back(
    daemon: Daemon, client: Client, gpu_used: Callable[[], int]
) -> None:
    """The daemon can't take write access away from a process that maps a
    GPU image's exported memory READWRITE on its own: what it guarantees is
    that the next verified wake finds the change, and makes nothing corrupt
    active."""
    publisher = imager(daemon, "img", "publish", FINGERPRINT, "3")
    try:
        imager(daemon, "img", "tamper", "layers.1").quit()
        client.sleep_model("img", level=1)  # (copies the changed bytes out)
        with pytest.raises(TorporError) as err:
            client.wake_model("img", verify=True)
        assert (err.value.code, err.value.reason) == (
            grpc.StatusCode.DATA_LOSS,
            "CHECKSUM_MISMATCH",
        )
        assert err.value.metadata["layer"] == "layers.1"
        model = client.get_model("img")
        # The corrupt host copy is refused: the image sleeps at level 2 now.
        assert model.state == common_pb2.MODEL_STATE_ASLEEP
        assert (model.state_reason, model.sleep_level) == ("HOST_COPY_CORRUPT", 2)
        assert gpu_used() == 0  # nothing of it was made active
    finally:
        publisher.quit()
    client.unload_model("img")
    assert settle(lambda: nothing_left(client, gpu_used))


def test_an_image_comes_back_to_the_gpu_after_a_restart_through_its_disk_copy(
    daemon: Daemon, client: Client, gpu_used: Callable[[], int], tmp_path: Path
) -> None:
    publisher = imager(daemon, "img", "publish", FINGERPRINT, "4")
    given = publisher.hello["given"]
    on_gpu = padded(client.get_model("img"))
    client.sleep_model("img", level=2)  # (its disk copy first)
    publisher.quit()
    assert daemon.stop() == 0
    assert gpu_used() == 0

    again = started(tmp_path / "again", tmp_path / "cache", daemon.env)
    try:
        with Client(socket=str(again.socket)) as other:
            model = other.get_model("img")
            assert model.state == common_pb2.MODEL_STATE_ASLEEP
            assert (model.state_reason, model.fingerprint) == ("RESTORED", FINGERPRINT)
            assert gpu_used() == 0
            other.wake_model("img", verify=True)
            assert gpu_used() == on_gpu
            engine = imager(again, "img", "attach")
            try:
                assert engine.ask("read")["digest"] == given
            finally:
                engine.quit()
            other.unload_model("img")
            assert settle(lambda: nothing_left(other, gpu_used))
    finally:
        again.kill()
