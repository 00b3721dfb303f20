"""The agent's use()/quiesce gate on its own: plain threads and a recorder
for the weights, no daemon, no mappings. Each test asserts an order of
events or an outcome, never how long anything took."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

import grpc
import pytest
from torpor.agent._gate import Gate
from torpor.errors import TorporError

LAYERS = ("pre", "layers.0", "post")


class Recorder:
    """Weights that are a dict of mapped flags, and a log of what the gate did."""

    def __init__(self) -> None:
        self.state = dict.fromkeys(LAYERS, True)
        self.log: list[str] = []

    def mapped(self, layer: str) -> bool:
        return self.state.get(layer, False)

    def all_mapped(self) -> bool:
        return all(self.state.values())

    def unmap(self, layers: Sequence[str] = ()) -> None:
        for name, mapped in self.state.items():
            if (not layers or name in layers) and mapped:
                self.state[name] = False
                self.log.append(f"unmap {name}")

    def release(self) -> None:
        self.state.clear()
        self.log.append("release")

    def map(self, *names: str) -> None:
        for name in names:
            self.state[name] = True
            self.log.append(f"map {name}")


def gate() -> tuple[Gate, Recorder]:
    weights = Recorder()
    return Gate("m", weights), weights


def run(target: Callable[[], None]) -> tuple[threading.Thread, list[BaseException]]:
    """`target` on a thread of its own; what it raised lands in the list."""
    raised: list[BaseException] = []

    def body() -> None:
        try:
            target()
        except BaseException as err:
            raised.append(err)

    # (A daemon thread: a broken gate that deadlocks fails the test, not the run.)
    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    return thread, raised


def hold(g: Gate, log: list[str], inside: threading.Event, go: threading.Event) -> None:
    """A use() block that lasts until `go`."""
    token = g.enter()
    inside.set()
    go.wait(60)
    log.append("block ends")
    if g.leave(token):
        log.append("let go late")


def test_a_quiesce_unmaps_only_after_the_running_block_ends() -> None:
    g, weights = gate()
    inside, go, draining = threading.Event(), threading.Event(), threading.Event()
    block, _ = run(lambda: hold(g, weights.log, inside, go))
    assert inside.wait(60)

    def quiesce() -> None:
        with g.quiescing():
            draining.set()
            g.drain(["layers.0"], 60)
        weights.log.append("ack")

    quiescer, raised = run(quiesce)
    assert draining.wait(60)
    quiescer.join(0.2)  # (a gate that did not wait would have unmapped by now)
    go.set()
    block.join(60)
    quiescer.join(60)
    assert raised == []
    assert weights.log == ["block ends", "unmap layers.0", "ack"]
    assert weights.state == {"pre": True, "layers.0": False, "post": True}


def test_a_new_block_waits_out_the_quiesce_and_for_its_layers() -> None:
    g, weights = gate()

    def engine(wait: bool) -> Callable[[], None]:
        def body() -> None:
            g.leave(g.enter(wait=wait))
            weights.log.append(f"entered (wait={wait})")

        return body

    with g.quiescing():
        g.drain([], 60)
        progressive, raised = run(engine(False))
        whole, raised_too = run(engine(True))
        progressive.join(0.2)  # (a gate that let them in would have by now)
        weights.log.append("quiesce ends")
    progressive.join(60)
    assert weights.log[-2:] == ["quiesce ends", "entered (wait=False)"]
    assert g.apply(lambda: weights.map("pre", "layers.0"))
    whole.join(0.2)
    assert g.apply(lambda: weights.map("post"))  # every layer back: the other enters
    whole.join(60)
    assert raised == raised_too == []
    assert weights.log[-4:] == ["map pre", "map layers.0", "map post", "entered (wait=True)"]


def test_a_block_nested_in_a_running_one_does_not_wait_for_the_quiesce() -> None:
    g, weights = gate()
    with g.quiescing():
        g.drain(["post"], None)  # (a partial quiesce: "post" is away)
    inside, draining = threading.Event(), threading.Event()
    outcome: list[str] = []

    def engine() -> None:
        token = g.enter(wait=False)
        try:
            inside.set()
            draining.wait(60)
            g.leave(g.enter(wait=False))  # would wait forever on the quiesce otherwise
            outcome.append("nested ran")
            with pytest.raises(TorporError) as err:
                g.enter()  # wants every layer mapped, and they are being taken away
            outcome.append(err.value.reason)
        finally:
            g.leave(token)

    thread, raised = run(engine)
    assert inside.wait(60)
    with g.quiescing():
        draining.set()
        g.drain([], 60)  # (a broken gate would wait on the engine forever)
    thread.join(60)
    assert raised == []
    assert outcome == ["nested ran", "WEIGHTS_WITHDRAWN"]
    assert weights.log == ["unmap post", "unmap pre", "unmap layers.0"]


def test_waiting_for_a_layer_gives_up_when_it_is_taken_away_or_late() -> None:
    g, weights = gate()
    g.wait_layer("pre", timeout=0)  # mapped: returns at once
    with g.quiescing():
        g.drain(["pre"], None)
        with pytest.raises(TorporError) as err:
            g.wait_layer("pre")
        assert (err.value.code, err.value.reason) == (
            grpc.StatusCode.ABORTED,
            "WEIGHTS_WITHDRAWN",
        )
    with pytest.raises(TorporError) as err:
        g.wait_layer("pre", timeout=0)
    assert (err.value.code, err.value.reason) == (
        grpc.StatusCode.DEADLINE_EXCEEDED,
        "LAYER_NOT_READY",
    )
    assert "layer pre of 'm'" in err.value.message
    with pytest.raises(TorporError) as err:
        g.enter(timeout=0)
    assert err.value.reason == "WEIGHTS_NOT_READY"
    token = g.enter(wait=False)  # a progressive wake: layers one by one
    g.leave(token)
    released, raised = run(lambda: g.wait_layer("pre"))
    assert g.apply(lambda: weights.map("pre"))
    released.join(60)
    assert raised == [] and not released.is_alive()


def test_a_quiesce_past_its_deadline_ends_the_attachment_and_keeps_the_block() -> None:
    g, weights = gate()
    inside, go = threading.Event(), threading.Event()
    block, _ = run(lambda: hold(g, weights.log, inside, go))
    assert inside.wait(60)
    with pytest.raises(TorporError) as err, g.quiescing():
        g.drain([], 0)
    assert (err.value.code, err.value.reason) == (grpc.StatusCode.ABORTED, "QUIESCE_TIMEOUT")
    assert g.ended is err.value
    assert g.end(err.value) is False  # that error: the block still holds the weights
    assert weights.log == []  # not pulled from under the running block
    with pytest.raises(TorporError) as again:
        g.wait_layer("pre")
    assert again.value is err.value
    go.set()
    block.join(60)
    assert weights.log == ["block ends", "unmap pre", "unmap layers.0", "unmap post", "let go late"]


def test_the_end_unmaps_now_when_idle_and_only_once() -> None:
    g, weights = gate()
    gone = TorporError(grpc.StatusCode.UNAVAILABLE, "STREAM_ENDED", "the daemon went away")
    assert g.end(gone) is True
    assert weights.log == ["unmap pre", "unmap layers.0", "unmap post"]
    assert not g.ready() and not g.ready("pre")
    with pytest.raises(TorporError) as err:
        g.enter(wait=False)
    assert err.value is gone
    later = TorporError(grpc.StatusCode.CANCELLED, "DETACHED", "the engine detached")
    assert g.end(later) is None and g.ended is gone


def test_close_defers_the_release_to_the_last_block() -> None:
    g, weights = gate()
    inside, go = threading.Event(), threading.Event()
    block, _ = run(lambda: hold(g, weights.log, inside, go))
    assert inside.wait(60)
    closing = g.close()
    assert (closing.stream_over, closing.released, closing.failed) == (False, False, None)
    assert g.ended is not None and g.ended.reason == "DETACHED"
    assert not g.apply(lambda: weights.map("pre"))  # closed: nothing maps any more
    assert weights.log == []
    go.set()
    block.join(60)
    assert weights.log == ["block ends", "release", "let go late"]


def test_an_idle_close_releases_now_and_reports_what_release_raised() -> None:
    g, weights = gate()
    closing = g.close()
    assert (closing.stream_over, closing.released, closing.failed) == (False, True, None)
    assert weights.log == ["release"]

    class Broken(Recorder):
        def release(self) -> None:
            raise OSError(22, "unmap failed")

    broken = Gate("m", Broken())
    broken.end(TorporError(grpc.StatusCode.NOT_FOUND, "MODEL_UNLOADED", "unloaded"))
    closing = broken.close()
    assert closing.stream_over and not closing.released
    assert isinstance(closing.failed, OSError)
    with pytest.raises(TorporError) as err:
        broken.needs_reattach()
    assert err.value.reason == "DETACHED"


def test_reattaching_reopens_an_ended_gate() -> None:
    g, weights = gate()
    assert g.needs_reattach() is False
    g.end(TorporError(grpc.StatusCode.UNAVAILABLE, "STREAM_ENDED", "gone"))
    assert g.needs_reattach() is True
    g.reopen()
    assert g.apply(lambda: weights.map(*LAYERS))
    g.leave(g.enter())
    g.fail(TorporError(grpc.StatusCode.UNAVAILABLE, "REATTACH_FAILED", "reattach failed"))
    with pytest.raises(TorporError) as err:
        g.enter()
    assert err.value.reason == "REATTACH_FAILED"
