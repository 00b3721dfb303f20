"""The request_id log keeps little per id, whatever the call carried."""

from __future__ import annotations

import asyncio

import pytest
from torpord.core.model import ModelSnapshot
from torpord.core.requests import MAX_REQUEST_ID, RequestLog
from torpord.errors import InvalidArgument


async def test_ids_are_bounded_and_reuse_is_told_apart() -> None:
    log = RequestLog(capacity=2)
    task: asyncio.Future[ModelSnapshot] = asyncio.get_running_loop().create_future()
    names = tuple(f"layers.{i}" for i in range(4096))
    log.remember("a", ("offload", "m", names), task)
    assert log.lookup("a", ("offload", "m", names)) is task
    with pytest.raises(InvalidArgument) as err:
        log.lookup("a", ("offload", "m", names[:-1]))
    assert err.value.reason == "REQUEST_ID_REUSED"
    for request_id in ("x" * (MAX_REQUEST_ID + 1), "é" * (MAX_REQUEST_ID // 2 + 1)):
        with pytest.raises(InvalidArgument) as err:
            log.lookup(request_id, ())
        assert err.value.reason == "FIELD_TOO_LONG"
        assert err.value.metadata["limit"] == str(MAX_REQUEST_ID)
        assert request_id not in err.value.message
        with pytest.raises(InvalidArgument):
            log.remember(request_id, (), task)
    log.remember("b", (), task)
    log.remember("c", (), task)  # over capacity: the oldest goes
    assert log.lookup("a", ("offload", "m", names)) is None
    task.cancel()
