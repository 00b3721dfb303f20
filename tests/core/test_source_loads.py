"""Loads from sources that change under the manager, and what runs where."""

from __future__ import annotations

import os
import random
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

from torpor.testing import make_checkpoint
from torpord.errors import TorporError
from torpord.storage import layout_hash, open_checkpoint, plan_layers

from .harness import Harness

# What a load of a path that changes while it runs may answer (besides success):
# the path is missing, leads outside the roots, can't name a file (a component
# is a file), is no checkpoint, or its files changed between validation and
# the read.
DOCUMENTED = {
    ("NOT_FOUND", "SOURCE_NOT_FOUND"),
    ("PERMISSION_DENIED", "SOURCE_NOT_ALLOWED"),
    ("INVALID_ARGUMENT", "INVALID_SOURCE_PATH"),
    ("INVALID_ARGUMENT", "UNSUPPORTED_SOURCE"),
    ("FAILED_PRECONDITION", "SOURCE_CHANGED"),
}


class Flipper:
    """Turns `flip` into a symlink to a checkpoint outside the roots, the
    directory of one inside, a plain file, or nothing, at random, until stopped."""

    def __init__(self, flip: Path, inside: Path, outside: Path, seed: int) -> None:
        self.flip, self.inside, self.outside = flip, inside, outside
        self.rng = random.Random(seed)
        self.stop = threading.Event()
        self.flips = 0
        self.thread = threading.Thread(target=self.run, daemon=True)

    def clear(self) -> None:
        if self.flip.is_symlink() or self.flip.is_file():
            self.flip.unlink()
        elif self.flip.is_dir():
            os.rename(self.flip, self.inside)  # (kept, to come back whole)

    def run(self) -> None:
        while not self.stop.is_set():
            self.clear()
            state = self.rng.choice(["link", "dir", "file", "none"])
            if state == "link":
                self.flip.symlink_to(self.outside)
            elif state == "dir":
                os.rename(self.inside, self.flip)
            elif state == "file":
                self.flip.write_bytes(b"not a directory")
            self.flips += 1
            self.stop.wait(self.rng.uniform(0, 0.003))  # (loads see each state too)


async def test_a_component_changing_during_loads_gives_documented_codes(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    inside = make_checkpoint(root / "stash" / "real", layers=2, seed=1)
    # Outside: other bytes, and tensor names (GPT-2's "h.N.") that must never show.
    other = make_checkpoint(outside / "other", layers=2, seed=2, naming="gpt2")
    h = Harness(root)
    try:
        expected = [layer.checksum for layer in (await h.manager.load("ref", str(inside))).layers]
        await h.manager.unload("ref")
        flipper = Flipper(root / "flip", inside, other, seed=13)
        flipper.thread.start()
        rng = random.Random(11)
        seen: dict[str, int] = {}
        try:
            tries = 0
            # A few hundred loads, and as many flips (at most a few thousand loads).
            while tries < 3000 and (tries < 300 or flipper.flips < 300):
                tries += 1
                source = root / "flip"
                if rng.random() < 0.5:
                    source = source / "model.safetensors"
                try:
                    snap = await h.manager.load("m", str(source))
                except TorporError as err:
                    outcome = (err.code.value, err.reason)
                    assert outcome in DOCUMENTED, err
                    assert "h.0." not in err.message and "h.0." not in str(err.metadata), err
                else:
                    outcome = ("OK", "")
                    # Only ever the inside checkpoint's bytes.
                    assert [layer.checksum for layer in snap.layers] == expected
                seen[outcome[1] or "OK"] = seen.get(outcome[1] or "OK", 0) + 1
                if h.manager.find("m") is not None:
                    await h.manager.unload("m")
        finally:
            flipper.stop.set()
            flipper.thread.join()
        # The race really ran both ways.
        assert seen.get("OK", 0) > 0 and seen.get("SOURCE_NOT_ALLOWED", 0) > 0, seen
        assert h.manager.list_models() == [] and h.device_used() == 0
    finally:
        await h.close()


class ThreadsOf:
    """The threads each of some functions is called on, as a profiler sees
    them: the interpreter's profiling hook, on this thread and on every
    thread started while it watches. Nothing of the product is replaced."""

    def __init__(self, *functions: Callable[..., Any]) -> None:
        self.names = {f.__code__: f.__name__ for f in functions}
        self.threads: dict[str, set[int]] = {}

    def __call__(self, frame: FrameType, event: str, arg: object) -> None:
        if event == "call" and (name := self.names.get(frame.f_code)) is not None:
            self.threads.setdefault(name, set()).add(threading.get_ident())

    def __enter__(self) -> ThreadsOf:
        self.before = sys.getprofile(), threading.getprofile()
        threading.setprofile(self)
        sys.setprofile(self)
        return self

    def __exit__(self, *exc: object) -> None:
        sys.setprofile(self.before[0])
        threading.setprofile(self.before[1])  # (threads started meanwhile keep it until they end)


async def test_parsing_and_planning_run_off_the_event_loop(tmp_path: Path) -> None:
    # All three are O(tensors): at the tensor limit, seconds of CPU that must not
    # stop every other RPC. Each call's thread is noted.
    steps = (open_checkpoint, plan_layers, layout_hash)
    with ThreadsOf(*steps) as watched:
        h = Harness(tmp_path)
        try:
            model = await h.manager.load("m", str(make_checkpoint(tmp_path / "m", layers=2)))
        finally:
            await h.close()
    loop_thread = threading.get_ident()
    assert set(watched.threads) == {step.__name__ for step in steps}
    assert all(loop_thread not in threads for threads in watched.threads.values()), watched.threads
    # The layout hash engines check is the one of the model's layers.
    assert model.layout_hash == layout_hash([layer.plan for layer in model.layers])
