"""The agent's activity counts and its reporter on their own: the gate's
counters, one poke per report, coalescing, the last report. No daemon; each
test asserts what was sent and in what order, never how long it took."""

from __future__ import annotations

import queue
import threading
from collections.abc import Sequence

from torpor.agent._activity import Reporter, report
from torpor.agent._gate import Gate, Usage


class Mapped:
    """Weights that are always mapped."""

    def mapped(self, layer: str) -> bool:
        return True

    def all_mapped(self) -> bool:
        return True

    def unmap(self, layers: Sequence[str] = ()) -> None:
        pass

    def release(self) -> None:
        pass


def use(g: Gate, busy: float = 0.0) -> None:
    g.leave(g.enter(), busy)


def test_the_gate_counts_blocks_ended_open_and_their_time() -> None:
    g = Gate("m", Mapped())
    assert g.usage() is None  # nothing happened
    token = g.enter()
    assert g.usage() == Usage(uses=0, busy_seconds=0.0, in_use=1)
    assert g.usage() is None  # (taken: nothing new)
    g.leave(token, 0.25)
    use(g, 0.5)
    assert g.usage() == Usage(uses=2, busy_seconds=0.75, in_use=0)


def test_nested_blocks_of_a_thread_count_once() -> None:
    g = Gate("m", Mapped())
    outer = g.enter()
    inner = g.enter()
    assert g.usage() == Usage(uses=0, busy_seconds=0.0, in_use=1)
    g.leave(inner, 9.0)  # (its time is inside the outer block's)
    assert g.usage() is None
    g.leave(outer, 1.0)
    assert g.usage() == Usage(uses=1, busy_seconds=1.0, in_use=0)


def test_blocks_of_other_threads_count_apart() -> None:
    g = Gate("m", Mapped())
    entered = threading.Event()
    done = threading.Event()

    def other() -> None:
        token = g.enter()
        entered.set()
        done.wait(30)
        g.leave(token, 2.0)

    thread = threading.Thread(target=other, daemon=True)
    thread.start()
    assert entered.wait(30)
    token = g.enter()
    assert g.usage() == Usage(uses=0, busy_seconds=0.0, in_use=2)
    done.set()
    thread.join(30)
    g.leave(token, 1.0)
    assert g.usage() == Usage(uses=2, busy_seconds=3.0, in_use=0)


def test_the_gate_pokes_once_per_report_not_once_per_block() -> None:
    pokes: list[int] = []
    g = Gate("m", Mapped(), on_usage=lambda: pokes.append(1))
    for _ in range(100):
        use(g)
    assert len(pokes) == 1
    assert g.usage() == Usage(uses=100, busy_seconds=0.0, in_use=0)
    use(g)  # the first change since the report: a poke
    assert len(pokes) == 2


def test_the_reporter_sends_at_once_then_coalesces_until_the_end() -> None:
    sent: queue.SimpleQueue[Usage] = queue.SimpleQueue()
    g = Gate("m", Mapped())
    # A period longer than any test: after the first report, only the last
    # one (on stop) may send what happened since.
    reporter = Reporter("test", g.usage, sent.put, period=3600.0)
    g.on_usage = reporter.poke
    reporter.start()
    token = g.enter()  # idle → in use: reported at once
    assert sent.get(timeout=30) == Usage(uses=0, busy_seconds=0.0, in_use=1)
    g.leave(token, 1.0)
    for _ in range(50):
        use(g, 0.5)
    assert sent.empty()
    reporter.stop()
    reporter.flush()
    assert sent.get(timeout=1) == Usage(uses=51, busy_seconds=26.0, in_use=0)
    reporter.flush()  # nothing new: nothing sent
    assert sent.empty()


def test_a_quiet_reporter_sends_nothing() -> None:
    sent: list[Usage] = []
    g = Gate("m", Mapped())
    reporter = Reporter("test", g.usage, sent.append)
    reporter.start()
    reporter.stop()
    reporter.flush()
    assert sent == []


def test_the_stream_message() -> None:
    message = report(Usage(uses=3, busy_seconds=1.25, in_use=2))
    assert message.WhichOneof("message") == "activity"
    assert (message.activity.uses, message.activity.in_use) == (3, 2)
    assert message.activity.busy.ToNanoseconds() == 1_250_000_000
