"""vLLM's own sleep and wake through Torpor (torpor.vllm.suspend, which the
`torpor` sleep-mode backend runs in a GPU worker), against a real torpord
and a real image. vLLM's CPU worker ignores sleep, so here the engine's
side is driven directly: an image published with torpor.agent.publish,
wrapped as the loader wraps it. vLLM's own allocator (CuMemAllocator,
CUDA only) is a recorder of the calls it gets. The backend class itself,
in real vLLM, is in test_sleep_backend_vllm.py; a GPU run in tests/gpu."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from torpor import Client
from torpor.errors import TorporError
from torpor.v1 import common_pb2

from ..e2e.conftest import Daemon
from ..e2e.observe import used

torch = pytest.importorskip("torch")

from torpor.agent.attach import AttachedModel, attach  # noqa: E402
from torpor.agent.publish import groups_of, publish  # noqa: E402
from torpor.vllm.gate import Image  # noqa: E402
from torpor.vllm.suspend import EngineSleep  # noqa: E402

FINGERPRINT = "vllm-sleep-test/fused/bf16/tp1"
MiB = 1 << 20


def weights(mib: int = 1) -> dict[str, torch.Tensor]:
    """An engine's final tensors: `mib` MiB in each of pre, 2 layers and post."""
    g = torch.Generator().manual_seed(7)
    n = mib * MiB // 4
    out = {"embed.weight": torch.randn(n, generator=g)}
    for i in range(2):
        out[f"model.layers.{i}.qkv_proj.weight"] = torch.randn(n, generator=g)
    out["lm_head.weight"] = torch.randn(n, generator=g)
    return out


class Recorder:
    """vLLM's sleep-mode allocator as the backend sees it: what it was asked,
    and the image's state in the daemon at that moment."""

    def __init__(self, client: Client, model_id: str) -> None:
        self.client, self.model_id = client, model_id
        self.calls: list[tuple[str, object, str]] = []

    def _state(self) -> str:
        return common_pb2.ModelState.Name(self.client.get_model(self.model_id).state)

    def sleep(self, offload_tags: tuple[str, ...] | str | None = None) -> None:
        self.calls.append(("sleep", offload_tags, self._state()))

    def wake_up(self, tags: list[str] | None = None) -> None:
        self.calls.append(("wake_up", tags, self._state()))

    def discard(self, tags: tuple[str, ...] | str) -> None:
        self.calls.append(("discard", tags, self._state()))


def pointers(model: AttachedModel) -> dict[str, int]:
    return {name: t.data_ptr() for name, t in model.state_dict().items()}


def same(model: AttachedModel, want: dict[str, torch.Tensor]) -> bool:
    with model.use(timeout=30):
        got = model.state_dict()
        return got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def engine_of(model: AttachedModel, client: Client) -> Image:
    """The engine's hold on its image, as the torpor loader makes it."""
    return Image(model, client, FINGERPRINT, wait_s=60)


@pytest.mark.parametrize("level", [1, 2])
def test_sleep_puts_the_image_to_sleep_and_wake_brings_it_back_bit_identical(
    client: Client, level: int
) -> None:
    want = weights()
    with publish("img", FINGERPRINT, groups_of(want), client=client) as model:
        pool = Recorder(client, "img")
        engine = EngineSleep(lambda: [engine_of(model, client)], pool)
        at = pointers(model)
        awake = used(client)
        for _ in range(2):
            engine.suspend(level)
            asleep = client.get_model("img")
            assert asleep.state == common_pb2.MODEL_STATE_ASLEEP
            assert asleep.sleep_level == level
            assert asleep.engines == 0  # (this engine let go of it)
            tier = common_pb2.TIER_HOST if level == 1 else common_pb2.TIER_DISK
            assert {layer.tier for layer in asleep.layers} == {tier}
            assert used(client)[0] < awake[0]  # the device memory is free
            assert not model.ready()
            assert engine.asleep == {"weights", "kv_cache"}

            engine.resume()
            awake_again = client.get_model("img")
            assert awake_again.state == common_pb2.MODEL_STATE_ACTIVE
            assert awake_again.engines == 1
            assert used(client) == awake
            assert model.ready() and pointers(model) == at  # the same addresses
            assert same(model, want)
            assert engine.asleep == set()
        # vLLM's pool slept after the image did (weights-tagged memory kept at
        # level 1 only, as vLLM's own backend does) and woke after it.
        kept = ("runtime", "cudagraph", "weights") if level == 1 else ("runtime", "cudagraph")
        one_cycle = [("sleep", kept, "MODEL_STATE_ASLEEP"), ("wake_up", None, "MODEL_STATE_ACTIVE")]
        assert pool.calls == one_cycle * 2


def test_level_2_without_a_disk_cache_is_a_clear_error_and_changes_nothing(
    tmp_path: Path,
) -> None:
    d = Daemon(tmp_path)
    try:
        d.wait_ready()
        with (
            Client(socket=str(d.socket)) as client,
            publish("img", FINGERPRINT, groups_of(weights()), client=client) as model,
        ):
            pool = Recorder(client, "img")
            engine = EngineSleep(lambda: [engine_of(model, client)], pool)
            with pytest.raises(TorporError) as err:
                engine.suspend(2)
            assert (err.value.code, err.value.reason) == (
                grpc.StatusCode.FAILED_PRECONDITION,
                "IMAGE_NEEDS_DISK_CACHE",
            )
            assert "disk_cache.path" in err.value.message and "level 1" in err.value.message
            found = client.get_model("img")
            assert (found.state, found.engines) == (common_pb2.MODEL_STATE_ACTIVE, 1)
            assert model.ready() and model.ended is None
            assert pool.calls == [] and engine.asleep == set()
            # Level 1 needs no disk: it works on this daemon.
            engine.suspend(1)
            assert client.get_model("img").state == common_pb2.MODEL_STATE_ASLEEP
            engine.resume()
            assert model.ready()
    finally:
        d.kill()


def test_a_refused_sleep_brings_the_engine_back_and_changes_nothing(tmp_path: Path) -> None:
    # Room for the image on the device, not in the host pool: the daemon
    # refuses the level-1 sleep after this engine let go of the image.
    backend = '[backend]\nkind = "host"\n[backend.host]\ndevices = 1\ndevice_capacity = "64MiB"\n'
    d = Daemon(tmp_path, backend=backend, capacity="2MiB")
    try:
        d.wait_ready()
        want = weights()
        with (
            Client(socket=str(d.socket)) as client,
            publish("img", FINGERPRINT, groups_of(want), client=client) as model,
        ):
            pool = Recorder(client, "img")
            engine = EngineSleep(lambda: [engine_of(model, client)], pool)
            at = pointers(model)
            with pytest.raises(TorporError) as err:
                engine.suspend(1)
            assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            found = client.get_model("img")
            assert (found.state, found.engines) == (common_pb2.MODEL_STATE_ACTIVE, 1)
            assert model.ended is None and model.ready() and pointers(model) == at
            assert same(model, want)
            assert pool.calls == [] and engine.asleep == set()
    finally:
        d.kill()


def test_one_engine_sleeping_leaves_the_image_to_the_others(daemon: Daemon, client: Client) -> None:
    """Engines A and B on one image: A's sleep lets go of it and B keeps
    serving it, untouched; B's sleep, the last, puts the image to sleep; A's
    wake brings it back for both; B's wake attaches B again."""
    want = weights()
    with (
        publish("img", FINGERPRINT, groups_of(want), client=client) as mine,
        Client(socket=str(daemon.socket)) as theirs_client,
        attach("img", client=theirs_client) as theirs,
    ):
        a = EngineSleep(lambda: [engine_of(mine, client)], Recorder(client, "img"))
        b = EngineSleep(lambda: [engine_of(theirs, theirs_client)], None)
        device = used(client)
        at_a, at_b = pointers(mine), pointers(theirs)
        assert client.get_model("img").engines == 2

        # B is computing with the weights while A goes to sleep: A does not
        # wait for B, and B's weights stay mapped throughout.
        with theirs.use(timeout=30):
            a.suspend(1)
            assert theirs.ready() and same(theirs, want)
        found = client.get_model("img")
        assert (found.state, found.engines) == (common_pb2.MODEL_STATE_ACTIVE, 1)
        assert used(client) == device
        assert not mine.ready()
        with pytest.raises(TorporError) as err, mine.use(timeout=30):
            pass  # (until its wake: the gate of a vLLM model attaches again)
        assert err.value.reason == "LET_GO"
        assert same(theirs, want) and pointers(theirs) == at_b

        # B is the last engine on it: its sleep sleeps the image.
        b.suspend(1)
        found = client.get_model("img")
        assert (found.state, found.engines) == (common_pb2.MODEL_STATE_ASLEEP, 0)
        assert used(client)[0] < device[0]

        a.resume()
        found = client.get_model("img")
        assert (found.state, found.engines) == (common_pb2.MODEL_STATE_ACTIVE, 1)
        assert same(mine, want) and pointers(mine) == at_a
        b.resume()
        assert client.get_model("img").engines == 2
        assert same(theirs, want) and pointers(theirs) == at_b
        assert used(client) == device


def test_a_wake_of_the_kv_cache_alone_leaves_the_weights_asleep(client: Client) -> None:
    want = weights()
    with publish("img", FINGERPRINT, groups_of(want), client=client) as model:
        pool = Recorder(client, "img")
        engine = EngineSleep(lambda: [engine_of(model, client)], pool)
        engine.suspend(1)
        engine.resume(["kv_cache"])
        assert client.get_model("img").state == common_pb2.MODEL_STATE_ASLEEP
        assert engine.asleep == {"weights"}
        engine.resume(["weights"])
        assert engine.asleep == set() and same(model, want)
        assert [call[:2] for call in pool.calls[1:]] == [
            ("wake_up", ["kv_cache"]),
            ("wake_up", ["weights"]),
        ]
        # vLLM discards the KV cache alone (release_kv_cache_memory); the
        # weights are the daemon's and never discarded by an engine.
        engine.discard(("kv_cache",))
        assert pool.calls[-1][:2] == ("discard", ("kv_cache",))
        with pytest.raises(ValueError, match="cannot discard"):
            engine.discard(("weights",))
        assert client.get_model("img").state == common_pb2.MODEL_STATE_ACTIVE
        with pytest.raises(ValueError, match="level 3"):
            engine.suspend(3)
