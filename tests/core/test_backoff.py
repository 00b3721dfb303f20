"""Holding back models whose policy actions fail, and letting go of them."""

from __future__ import annotations

from torpord.core.backoff import MAX_WAIT, Backoff

from tests.policies.build import model, node


def busy(backoff: Backoff, now: float, *ids: str) -> set[str]:
    view = backoff.hold_back(node(*(model(i) for i in ids)), now)
    return {m.model_id for m in view.models if m.busy}


def test_failures_in_a_row_hold_a_model_back_longer() -> None:
    backoff = Backoff(interval=1.0)
    assert backoff.failed("a", 0.0) == 2.0
    assert backoff.failed("a", 2.0) == 4.0
    assert busy(backoff, 3.0, "a", "b") == {"a"}
    assert busy(backoff, 6.5, "a", "b") == set()
    backoff.succeeded("a")
    assert backoff.failed("a", 7.0) == 2.0  # a success ends the streak


def test_a_failure_long_after_the_last_starts_again() -> None:
    backoff = Backoff(interval=1.0)
    for t in range(8):
        backoff.failed("a", float(t))
    assert backoff.failed("a", 10.0) == MAX_WAIT
    assert backoff.failed("a", 10.0 + 3 * MAX_WAIT) == 2.0


def test_models_gone_from_the_node_are_forgotten() -> None:
    backoff = Backoff(interval=1.0)
    for i in range(100):
        backoff.failed(f"job-{i}", 0.0)
    assert busy(backoff, 1.0, "job-7") == {"job-7"}
    assert backoff.held(1.0) == {"job-7"}  # the 99 others were let go of
