"""Pausing the cyclic collector while checkpoints are parsed (torpord.storage.gcpause)."""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator

import pytest
from torpord.storage.gcpause import gc_paused


@pytest.fixture(autouse=True)
def collector() -> Iterator[None]:
    was = gc.isenabled()
    yield
    if was:
        gc.enable()


def test_paused_inside_and_back_after() -> None:
    gc.enable()
    with gc_paused():
        assert not gc.isenabled()
        with gc_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()  # an inner pauser leaving resumes nothing
    assert gc.isenabled()


def test_back_after_an_error() -> None:
    gc.enable()
    with pytest.raises(ValueError), gc_paused():
        raise ValueError
    assert gc.isenabled()


def test_the_last_of_several_threads_resumes() -> None:
    gc.enable()
    inside = threading.Barrier(3)
    leave = threading.Event()

    def pauser() -> None:
        with gc_paused():
            inside.wait()
            leave.wait()

    threads = [threading.Thread(target=pauser) for _ in range(2)]
    for t in threads:
        t.start()
    with gc_paused():
        inside.wait()
    assert not gc.isenabled()  # the two threads are still inside
    leave.set()
    for t in threads:
        t.join()
    assert gc.isenabled()


def test_a_disabled_collector_stays_disabled() -> None:
    gc.disable()
    with gc_paused():
        pass
    assert not gc.isenabled()
