"""The engine protocol's outbox, on domain messages: what an Attach stream
sends next, in order, with Resumes already waiting sent as one."""

from __future__ import annotations

from torpord.core.attachments.messages import Ended, Outbox, Quiesce, Resume
from torpord.errors import Unavailable


async def test_waiting_resumes_go_as_one_until_something_else_comes_between() -> None:
    box = Outbox()
    box.put(Resume(sequence=1, layers=("pre",), layout_hash="h"))
    box.put(Resume(sequence=2, layers=("layers.0",), layout_hash="h"))
    box.put(Quiesce(sequence=3, layers=(), timeout=1.5))
    box.put(Resume(sequence=4, layers=("pre",), layout_hash="h"))
    ended = Ended(Unavailable("stopping", reason="SHUTTING_DOWN"))
    box.put(ended)
    box.put(Resume(sequence=5, layers=("post",), layout_hash="h"))
    assert await box.get() == Resume(sequence=2, layers=("pre", "layers.0"), layout_hash="h")
    assert await box.get() == Quiesce(sequence=3, layers=(), timeout=1.5)
    assert await box.get() == Resume(sequence=4, layers=("pre",), layout_hash="h")
    assert await box.get() is ended
    assert await box.get() == Resume(sequence=5, layers=("post",), layout_hash="h")


async def test_a_lone_resume_goes_as_it_was_put() -> None:
    box = Outbox()
    resume = Resume(sequence=7, layers=("layers.3",), layout_hash="h")
    box.put(resume)
    assert await box.get() is resume
