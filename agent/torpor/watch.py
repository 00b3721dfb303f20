"""A running WatchModels stream (what `Client.watch_models` returns)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from types import TracebackType
from typing import Self

import grpc

from torpor.errors import from_rpc_error
from torpor.v1 import models_pb2

__all__ = ["ModelWatch"]


class ModelWatch(Iterator[models_pb2.WatchModelsResponse]):
    """A running WatchModels stream: iterate it for events, `cancel()` it to stop.

    The first message is a snapshot of every (matching) model; every later one
    is a model event. Iteration ends when the daemon ends the stream or after
    `cancel()` (from any thread); any other failure raises `TorporError`.
    """

    def __init__(
        self,
        call: grpc.CallIterator[models_pb2.WatchModelsResponse],
        target: str,
    ) -> None:
        self._call = call
        self._iter = iter(call)
        self._target = target
        self._cancelled = threading.Event()

    def __iter__(self) -> Self:
        return self

    def __next__(self) -> models_pb2.WatchModelsResponse:
        try:
            return next(self._iter)
        except grpc.RpcError as err:
            if self._cancelled.is_set() and _code(err) == grpc.StatusCode.CANCELLED:
                raise StopIteration from None
            raise from_rpc_error(err, target=self._target) from err

    def cancel(self) -> None:
        """Stop the stream; a blocked or later `next()` ends the iteration."""
        self._cancelled.set()
        self._call.cancel()  # type: ignore[no-untyped-call]  # grpc-stubs leaves it bare

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cancel()


def _code(err: grpc.RpcError) -> grpc.StatusCode | None:
    try:
        return err.code()
    except AttributeError:
        return None
