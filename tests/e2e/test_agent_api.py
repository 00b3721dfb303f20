"""The agent's API in this process, against a real torpord: waiting for
layers, deadlines, what ends an attachment, and a changed layout refused."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from torpor import Client
from torpor.errors import TorporError
from torpor.layout import layout_hash
from torpor.testing import make_checkpoint
from torpor.v1 import agent_pb2, common_pb2, models_pb2

from .conftest import Daemon

torch = pytest.importorskip("torch")

from torpor.agent import attach  # noqa: E402
from torpor.agent._layout import Layout, layout_of  # noqa: E402


def test_waiting_for_layers_and_deadlines(daemon: Daemon) -> None:
    ckpt = make_checkpoint(daemon.models / "m.safetensors", layers=2)
    with Client(socket=str(daemon.socket)) as client:
        client.load_model("m", str(ckpt))
        with attach("m", client=client) as model:
            assert model.layers == ["pre", "layers.0", "layers.1", "post"]
            assert model.ready() and model.ready(0) and model.ready("post")
            model.wait_layer("layers.1", timeout=0)  # mapped: returns at once
            client.sleep_model("m")
            assert not model.ready() and not model.ready("pre")
            with pytest.raises(TorporError) as err:
                model.wait_layer(0, timeout=0.2)
            assert (err.value.code, err.value.reason) == (
                grpc.StatusCode.DEADLINE_EXCEEDED,
                "LAYER_NOT_READY",
            )
            with pytest.raises(TorporError) as err, model.use(timeout=0.2):
                pass
            assert err.value.reason == "WEIGHTS_NOT_READY"
            # A waiter is released as soon as its layer is back.
            released = threading.Event()

            def waiter() -> None:
                model.wait_layer("post", timeout=60)
                released.set()

            thread = threading.Thread(target=waiter)
            thread.start()
            client.wake_model("m")
            thread.join(60)
            assert released.is_set() and model.ready()
            with pytest.raises(KeyError):
                model.wait_layer("layers.9")


def test_a_changed_layout_is_refused_never_remapped(daemon: Daemon) -> None:
    ckpt = make_checkpoint(daemon.models / "m.safetensors", layers=1)
    with Client(socket=str(daemon.socket)) as client:
        client.load_model("m", str(ckpt))
        with attach("m", client=client) as model:
            address = model.ranges()["pre"][0]
            with pytest.raises(TorporError) as err:
                model._session.resume(agent_pb2.Resume(layers=["pre"], layout_hash="0" * 16))
            assert err.value.reason == "LAYOUT_CHANGED"
            assert model.ranges()["pre"][0] == address


def test_the_agent_hashes_the_view_it_reserved_as_the_daemon_hashed_its_plan(
    daemon: Daemon,
) -> None:
    """The agent checks the model's view against Attached's hash: the same
    layout (several layers, dtypes and shapes) must give the daemon's hash."""
    ckpt = make_checkpoint(daemon.models / "m.safetensors", layers=3, dtype="BF16", hidden=24)
    with Client(socket=str(daemon.socket)) as client:
        client.load_model("m", str(ckpt))
        view = client.get_model("m", view=models_pb2.MODEL_VIEW_FULL)
        with attach("m", client=client) as model:
            assert len(model.layout_hash) == 16
            assert layout_hash(layout_of(view)) == model.layout_hash


def test_a_view_of_another_layout_is_refused_before_anything_is_reserved(
    daemon: Daemon,
) -> None:
    """Between Attach and GetModel the model may be loaded again from another
    checkpoint: the view then has another hash than the one attached with."""
    with Client(socket=str(daemon.socket)) as client:
        client.load_model("m", str(make_checkpoint(daemon.models / "m.safetensors", layers=2)))
        other = make_checkpoint(daemon.models / "o.safetensors", layers=2, hidden=32)
        client.load_model("o", str(other))
        with attach("m", client=client) as model:
            attached_hash = model.layout_hash
        layout = Layout("o")
        view = client.get_model("o", view=models_pb2.MODEL_VIEW_FULL)
        with pytest.raises(TorporError) as err:
            layout.reserve(
                view, layout_hash=attached_hash, slab_kind="memfd", device="", device_index=0
            )
        assert err.value.reason == "LAYOUT_CHANGED"
        assert layout.layers == [] and layout.ranges() == {}
        # The view of the layout attached with is taken.
        layout.reserve(
            view,
            layout_hash=layout_hash(layout_of(view)),
            slab_kind="memfd",
            device="",
            device_index=0,
        )
        assert len(layout.layers) == len(view.layers)
        layout.release()


def test_unload_ends_the_attachment(daemon: Daemon) -> None:
    ckpt = make_checkpoint(daemon.models / "m.safetensors", layers=1)
    with Client(socket=str(daemon.socket)) as client:
        client.load_model("m", str(ckpt))
        with attach("m", client=client) as model:
            client.unload_model("m")
            model._session.listener.join(30)
            assert model.ended is not None and model.ended.reason == "MODEL_UNLOADED"
            assert not model.ready()
            with pytest.raises(TorporError) as err, model.use():
                pass
            assert err.value.reason == "MODEL_UNLOADED"


def test_a_stray_access_to_a_sleeping_models_weights_faults(daemon: Daemon) -> None:
    ckpt = make_checkpoint(daemon.models / "m.safetensors", layers=1)
    daemon.ctl("load", "m", str(ckpt))
    script = textwrap.dedent(
        f"""
        import sys
        from torpor import Client
        from torpor.agent import attach
        client = Client(socket={str(daemon.socket)!r})
        model = attach("m", client=client)
        weight = next(iter(model.state_dict().values()))
        float(weight.float().sum())          # fine while mapped
        client.sleep_model("m")
        print("asleep", flush=True)
        float(weight.float().sum())          # PROT_NONE now: SIGSEGV, never stale bytes
        print("read stale bytes", flush=True)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert out.stdout.strip() == "asleep", out.stderr
    assert out.returncode == -signal.SIGSEGV


def test_a_daemon_that_dies_ends_the_attachment_and_its_mappings(daemon: Daemon) -> None:
    ckpt = make_checkpoint(daemon.models / "m.safetensors", layers=1)
    with Client(socket=str(daemon.socket)) as client:
        client.load_model("m", str(ckpt))
        model = attach("m", client=client)
        try:
            daemon.proc.kill()  # no quiesce, no goodbye
            model._session.listener.join(30)
            assert model.ended is not None and model.ended.code is grpc.StatusCode.UNAVAILABLE
            assert not model.ready()  # unmapped: the orphaned slabs are not kept alive here
            with pytest.raises(TorporError) as err, model.use():
                pass
            assert err.value.code is grpc.StatusCode.UNAVAILABLE
        finally:
            model.close()


def test_reattach_after_a_restart_maps_the_same_addresses(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    first = Daemon(tmp_path)
    first.wait_ready()
    ckpt = make_checkpoint(first.models / "m.safetensors", layers=2, dtype="BF16")
    other = make_checkpoint(first.models / "other.safetensors", layers=3)
    second: Daemon | None = None
    try:
        with Client(socket=str(first.socket)) as client:
            client.load_model("m", str(ckpt))
            with attach("m", client=client) as model:
                ranges = model.ranges()
                state = model.state_dict()
                first.kill()
                model._session.listener.join(30)
                assert model.ended is not None
                second = Daemon(tmp_path)  # systemd's Restart=on-failure, the same socket
                second.wait_ready()
                client.load_model("m", str(ckpt))  # the scheduler loads it again
                model.reattach()
                assert model.ended is None and model.ready()
                assert model.ranges() == ranges
                reference = load_file(str(ckpt))
                with model.use():
                    for name, tensor in reference.items():  # the old tensors, valid again
                        got = state[name].contiguous().view(-1).view(torch.uint8)
                        assert torch.equal(got, tensor.view(-1).view(torch.uint8)), name
                # Unloaded and loaded with other weights: refused, never remapped.
                client.unload_model("m")
                model._session.listener.join(30)
                client.load_model("m", str(other))
                with pytest.raises(TorporError) as err:
                    model.reattach()
                assert err.value.reason == "LAYOUT_CHANGED"
                assert not model.ready()
    finally:
        first.kill()
        if second is not None:
            second.kill()


def _mapped(address: int) -> bool | None:
    """Whether `address` is readable in this process: True; reserved but not
    accessible (PROT_NONE): False; not mapped at all: None."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            span, perms = line.split()[:2]
            lo, hi = (int(x, 16) for x in span.split("-"))
            if lo <= address < hi:
                return perms[0] == "r"
    return None


@pytest.fixture
def patient(tmp_path: Path) -> Iterator[Daemon]:
    """A daemon that waits a minute for engines to let go."""
    d = Daemon(tmp_path, config='[agents]\nquiesce_timeout = "1m"\n')
    try:
        d.wait_ready()
        yield d
    finally:
        d.kill()


def test_a_nested_use_on_one_thread_passes_a_pending_quiesce(patient: Daemon) -> None:
    ckpt = make_checkpoint(patient.models / "m.safetensors", layers=1)
    with Client(socket=str(patient.socket)) as client:
        client.load_model("m", str(ckpt))
        with attach("m", client=client) as model:
            weight = next(iter(model.state_dict().values())).flatten().view(torch.uint8)
            expected = weight.clone()
            quiescing, inside = threading.Event(), threading.Event()
            model.on_quiesce(lambda layers: quiescing.set())
            seen: list[object] = []

            def engine() -> None:
                with model.use():
                    inside.set()
                    quiescing.wait(60)
                    try:  # a helper that takes the weights again, on the same thread
                        with model.use(timeout=10):
                            seen.append(torch.equal(weight, expected))
                    except TorporError as err:
                        seen.append(err.reason)

            thread = threading.Thread(target=engine)
            thread.start()
            assert inside.wait(60)
            asleep = client.sleep_model("m")  # waits for the outer block, no longer
            thread.join(60)
            assert seen == [True]
            assert asleep.state == common_pb2.MODEL_STATE_ASLEEP
            assert asleep.last_transition.note == ""  # nobody was detached
            assert model.ended is None and not model.ready()


def test_an_agent_past_the_quiesce_deadline_ends_and_unmaps_once_let_go(
    tmp_path: Path,
) -> None:
    d = Daemon(tmp_path, config='[agents]\nquiesce_timeout = "1s"\n')
    try:
        d.wait_ready()
        ckpt = make_checkpoint(d.models / "m.safetensors", layers=1)
        with Client(socket=str(d.socket)) as client:
            client.load_model("m", str(ckpt))
            with attach("m", client=client) as model:
                address = model.ranges()["pre"][0]
                inside, release = threading.Event(), threading.Event()

                def engine() -> None:
                    with model.use():  # holds on for far longer than a second
                        inside.set()
                        release.wait(60)

                thread = threading.Thread(target=engine)
                thread.start()
                assert inside.wait(60)
                asleep = client.sleep_model("m")
                assert "did not let go of the weights within 1s" in asleep.last_transition.note
                # The agent stops waiting too: its waiters learn why now, not
                # when the engine finally lets go.
                model._session.listener.join(30)
                assert not model._session.listener.is_alive()
                assert model.ended is not None and model.ended.reason == "QUIESCE_TIMEOUT"
                with pytest.raises(TorporError) as err:
                    model.wait_layer(0, timeout=5)
                assert err.value.reason == "QUIESCE_TIMEOUT"
                assert _mapped(address) is True  # not pulled from under the running block
                assert "engine let go after its stream ended" not in d.log()
                release.set()
                thread.join(60)
                assert _mapped(address) is False and not model.ready()
                # Unmapped at last: it tells the daemon so on the fd socket (a
                # GPU daemon frees what it held for it; the host one held none).
                assert "engine let go after its stream ended; nothing held" in d.log()
    finally:
        d.kill()


def test_close_while_another_thread_uses_the_weights_defers_the_release(
    daemon: Daemon,
) -> None:
    ckpt = make_checkpoint(daemon.models / "m.safetensors", layers=1)
    with Client(socket=str(daemon.socket)) as client:
        client.load_model("m", str(ckpt))
        model = attach("m", client=client)
        weight = next(iter(model.state_dict().values())).flatten().view(torch.uint8)
        expected = weight.clone()
        address = model.ranges()["pre"][0]
        inside, release = threading.Event(), threading.Event()
        seen: list[bool] = []

        def engine() -> None:
            with model.use():
                inside.set()
                release.wait(60)
                seen.append(torch.equal(weight, expected))  # after close(): still there

        thread = threading.Thread(target=engine)
        thread.start()
        assert inside.wait(60)
        model.close()  # returns at once; the block keeps its weights
        assert _mapped(address) is True
        release.set()
        thread.join(60)
        assert seen == [True]
        assert _mapped(address) is None  # released with the last block
        assert settle_engines(client, "m", 0)
        # The stream ended while the block still mapped the weights: no Release
        # (on a GPU the daemon would count them held until this process exits).
        assert "engine let go of every slab" not in daemon.log()
        # A close with nothing in use says it let go, before the stream ends.
        with attach("m", client=client) as again:
            assert again.ready()
        assert settle_engines(client, "m", 0)
        assert daemon.log().count("engine let go of every slab") == 1


def settle_engines(client: Client, model_id: str, count: int) -> bool:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if client.get_model(model_id).engines == count:
            return True
        time.sleep(0.05)
    return False


def test_a_close_that_cannot_unmap_still_detaches(
    daemon: Daemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    from torpor.agent.mapping import MappingError, SlabRange

    ckpt = make_checkpoint(daemon.models / "m.safetensors", layers=1)
    with Client(socket=str(daemon.socket)) as client:
        client.load_model("m", str(ckpt))
        model = attach("m", client=client)
        assert settle_engines(client, "m", 1)

        def broken(self: SlabRange) -> None:  # (a CUDA context broken by a fault, say)
            raise MappingError(22, "unmap failed")

        monkeypatch.setattr(SlabRange, "release", broken)
        with pytest.raises(MappingError):
            model.close()
        assert settle_engines(client, "m", 0)  # the stream ended all the same
        assert not model._session.listener.is_alive()
        assert "engine let go of every slab" not in daemon.log()  # (it could not)
