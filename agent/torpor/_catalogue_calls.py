"""The catalogue, policy and Acquire calls of `torpor.Client` (a part of it,
kept apart so that the client stays one readable module)."""

from __future__ import annotations

import os
from typing import TypeVar

import grpc

from torpor.v1 import common_pb2, models_pb2, models_pb2_grpc

__all__ = ["CatalogueCalls"]

_Req = TypeVar("_Req")
_Resp = TypeVar("_Resp")


class CatalogueCalls:
    """Mixed into `Client`, which provides the stub and `_unary`."""

    _models: models_pb2_grpc.ModelServiceStub

    def _unary(
        self,
        method: grpc.UnaryUnaryMultiCallable[_Req, _Resp],
        request: _Req,
        timeout: float | None,
    ) -> _Resp:
        raise NotImplementedError

    def acquire_model(
        self, model_id: str, *, request_id: str = "", timeout: float | None = None
    ) -> models_pb2.AcquireModelResponse:
        """Make a model ready because a request for it arrived: at once if it
        is ACTIVE (`hit`), else woken or loaded (a registered model); the
        answer says how long that took (`time_to_ready`)."""
        request = models_pb2.AcquireModelRequest(model_id=model_id, request_id=request_id)
        return self._unary(self._models.AcquireModel, request, timeout)

    def register_model(
        self,
        model_id: str,
        source: str | os.PathLike[str],
        *,
        device: str = "",
        policy: common_pb2.Policy | None = None,
        timeout: float | None = None,
    ) -> common_pb2.Model:
        """Add (or replace) the catalogue entry of `model_id`: what Acquire
        loads it from, and its policy. A loaded model takes that policy."""
        request = models_pb2.RegisterModelRequest(
            model_id=model_id, source=os.fspath(source), device=device, policy=policy
        )
        return self._unary(self._models.RegisterModel, request, timeout).model

    def deregister_model(self, model_id: str, *, timeout: float | None = None) -> None:
        """Remove the catalogue entry of `model_id` (a loaded model stays loaded)."""
        request = models_pb2.DeregisterModelRequest(model_id=model_id)
        self._unary(self._models.DeregisterModel, request, timeout)

    def set_model_policy(
        self,
        model_id: str,
        policy: common_pb2.Policy,
        *,
        clear_windows: bool = False,
        timeout: float | None = None,
    ) -> common_pb2.Model:
        """Set `policy`'s fields on a model and its entry; `clear_windows` drops its windows."""
        request = models_pb2.SetModelPolicyRequest(model_id=model_id, policy=policy)
        request.clear_windows = clear_windows
        return self._unary(self._models.SetModelPolicy, request, timeout).model
