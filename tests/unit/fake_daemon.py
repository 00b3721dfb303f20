"""A small in-process fake of torpord's ModelService/NodeService, for unit tests.

Shared by test_client.py and test_cli.py (the `daemon` fixture lives in
conftest.py; each test module picks the fake's starting models by defining a
`daemon_models` fixture). The fake serves canned models, records every request
it is sent, aborts failures exactly as the daemon aborts them (a
google.rpc.Status carrying an ErrorInfo), and streams WatchModels messages that
each test chooses.

Sources that LoadModel treats specially:

- ``/plain-error``: FAILED_PRECONDITION with no ErrorInfo.
- ``/shutting-down``: UNAVAILABLE with reason SHUTTING_DOWN.
- ``.../huge``: RESOURCE_EXHAUSTED with reason INSUFFICIENT_DEVICE_MEMORY.
- ``.../slow``: answers after a second.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status
from torpor.cli.main import main
from torpor.v1 import common_pb2, models_pb2, models_pb2_grpc, node_pb2, node_pb2_grpc

GIB = 1024**3
UUID = "GPU-0b1c2d3e"


def abort(
    context: grpc.ServicerContext,
    code: int,
    reason: str,
    message: str,
    **metadata: str,
) -> None:
    """Abort as torpord does: a google.rpc.Status with an ErrorInfo detail."""
    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.ErrorInfo(reason=reason, domain="torpor.dev", metadata=metadata))
    status = status_pb2.Status(code=code, message=message, details=[detail])
    context.abort_with_status(rpc_status.to_status(status))


@dataclass
class FakeModels(models_pb2_grpc.ModelServiceServicer):
    models: dict[str, common_pb2.Model] = field(default_factory=dict)
    requests: list[object] = field(default_factory=list)
    events: list[models_pb2.ModelEvent] = field(default_factory=list)
    hold_watch: bool = False

    def _get(self, model_id: str, context: grpc.ServicerContext) -> common_pb2.Model:
        if model_id not in self.models:
            abort(
                context,
                code_pb2.NOT_FOUND,
                "MODEL_NOT_FOUND",
                f"model {model_id!r} not found",
                model_id=model_id,
            )
        return self.models[model_id]

    def GetModel(
        self, request: models_pb2.GetModelRequest, context: grpc.ServicerContext
    ) -> models_pb2.GetModelResponse:
        self.requests.append(request)
        model = common_pb2.Model()
        model.CopyFrom(self._get(request.model_id, context))
        if request.view != models_pb2.MODEL_VIEW_FULL:
            for layer in model.layers:
                del layer.tensors[:]
        return models_pb2.GetModelResponse(model=model)

    def ListModels(
        self, request: models_pb2.ListModelsRequest, context: grpc.ServicerContext
    ) -> models_pb2.ListModelsResponse:
        self.requests.append(request)
        return models_pb2.ListModelsResponse(models=[self.models[k] for k in sorted(self.models)])

    def LoadModel(
        self, request: models_pb2.LoadModelRequest, context: grpc.ServicerContext
    ) -> models_pb2.LoadModelResponse:
        self.requests.append(request)
        if request.source == "/plain-error":
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "no error info here")
        if request.source == "/shutting-down":
            abort(context, code_pb2.UNAVAILABLE, "SHUTTING_DOWN", "torpord is stopping")
        if request.source.endswith("/huge"):
            abort(
                context,
                code_pb2.RESOURCE_EXHAUSTED,
                "INSUFFICIENT_DEVICE_MEMORY",
                f"not enough free memory on {UUID}",
                asked="85899345920",
                free="1073741824",
            )
        if request.source.endswith("/slow"):
            time.sleep(1.0)
        model = common_pb2.Model(
            name=f"models/{request.model_id}",
            model_id=request.model_id,
            state=common_pb2.MODEL_STATE_ACTIVE if request.wait else common_pb2.MODEL_STATE_LOADING,
        )
        self.models[request.model_id] = model
        return models_pb2.LoadModelResponse(model=model)

    def SleepModel(
        self, request: models_pb2.SleepModelRequest, context: grpc.ServicerContext
    ) -> models_pb2.SleepModelResponse:
        self.requests.append(request)
        model = self._get(request.model_id, context)
        model.state = common_pb2.MODEL_STATE_ASLEEP
        model.sleep_level = request.level
        return models_pb2.SleepModelResponse(model=model)

    def WakeModel(
        self, request: models_pb2.WakeModelRequest, context: grpc.ServicerContext
    ) -> models_pb2.WakeModelResponse:
        self.requests.append(request)
        model = self._get(request.model_id, context)
        model.state = common_pb2.MODEL_STATE_ACTIVE
        model.sleep_level = 0
        return models_pb2.WakeModelResponse(model=model)

    def AcquireModel(
        self, request: models_pb2.AcquireModelRequest, context: grpc.ServicerContext
    ) -> models_pb2.AcquireModelResponse:
        """A hit when the model is active; else it becomes active "in 1.5s"."""
        self.requests.append(request)
        model = self._get(request.model_id, context)
        hit = model.state == common_pb2.MODEL_STATE_ACTIVE
        model.state, model.sleep_level = common_pb2.MODEL_STATE_ACTIVE, 0
        ready = (
            duration_pb2.Duration(nanos=1000)
            if hit
            else duration_pb2.Duration(seconds=1, nanos=500_000_000)
        )
        return models_pb2.AcquireModelResponse(model=model, hit=hit, time_to_ready=ready)

    def OffloadModel(
        self, request: models_pb2.OffloadModelRequest, context: grpc.ServicerContext
    ) -> models_pb2.OffloadModelResponse:
        self.requests.append(request)
        return models_pb2.OffloadModelResponse(model=self._get(request.model_id, context))

    def UnloadModel(
        self, request: models_pb2.UnloadModelRequest, context: grpc.ServicerContext
    ) -> models_pb2.UnloadModelResponse:
        self.requests.append(request)
        model = self._get(request.model_id, context)
        del self.models[request.model_id]
        if request.wait:  # as torpord answers: the model as it was last, gone
            model.state = common_pb2.MODEL_STATE_UNLOADED
            model.last_transition.CopyFrom(
                common_pb2.Transition(
                    kind=common_pb2.TRANSITION_KIND_UNLOAD,
                    outcome=common_pb2.OUTCOME_SUCCEEDED,
                    duration=duration_pb2.Duration(nanos=12_000_000),
                    freed_bytes=model.bytes.total_bytes,
                )
            )
        else:
            model.state = common_pb2.MODEL_STATE_UNLOADING
        return models_pb2.UnloadModelResponse(model=model)

    def WatchModels(
        self, request: models_pb2.WatchModelsRequest, context: grpc.ServicerContext
    ) -> Iterator[models_pb2.WatchModelsResponse]:
        self.requests.append(request)
        snapshot = [m for k, m in sorted(self.models.items()) if request.model_id in ("", k)]
        yield models_pb2.WatchModelsResponse(snapshot=models_pb2.Snapshot(models=snapshot))
        for event in self.events:
            yield models_pb2.WatchModelsResponse(model_event=event)
        while self.hold_watch and context.is_active():
            time.sleep(0.01)


class FakeNode(node_pb2_grpc.NodeServiceServicer):
    def GetNode(
        self, request: node_pb2.GetNodeRequest, context: grpc.ServicerContext
    ) -> node_pb2.GetNodeResponse:
        node = node_pb2.Node(
            hostname="gpu-1",
            version="0.1.0",
            backend=node_pb2.BACKEND_CUDA,
            devices=[
                node_pb2.Device(
                    name=f"devices/{UUID}",
                    uuid=UUID,
                    display_name="NVIDIA H100",
                    capacity_bytes=80 * GIB,
                    used_bytes=3 * GIB,
                    free_bytes=77 * GIB,
                    slab_count=2,
                    held_bytes=GIB,
                )
            ],
            host_pool=node_pb2.HostPool(capacity_bytes=64 * GIB, used_bytes=GIB),
            model_count=2,
            allowed_roots=["/models"],
        )
        return node_pb2.GetNodeResponse(node=node)


@dataclass
class Daemon:
    """A running fake: its Unix socket, its TCP port, and its ModelService."""

    socket: Path
    port: int
    models: FakeModels
    server: grpc.Server

    def run(self, *argv: str) -> int:
        """Run torporctl against this daemon's socket; returns the exit code."""
        return main(["--socket", str(self.socket), *argv])

    def stop(self) -> None:
        """Stop serving at once: open calls end as a killed daemon's do."""
        self.server.stop(None).wait()


@contextmanager
def serve(socket: Path, models: dict[str, common_pb2.Model]) -> Iterator[Daemon]:
    """Serve a fake holding `models` on `socket` and on a loopback TCP port."""
    executor = futures.ThreadPoolExecutor(max_workers=8)
    server = grpc.server(executor)
    fake = FakeModels(models=models)
    models_pb2_grpc.add_ModelServiceServicer_to_server(fake, server)
    node_pb2_grpc.add_NodeServiceServicer_to_server(FakeNode(), server)
    server.add_insecure_port(f"unix:{socket}")
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield Daemon(socket, port, fake, server)
    finally:
        server.stop(None).wait()
        executor.shutdown(wait=True)
