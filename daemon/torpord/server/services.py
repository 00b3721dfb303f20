"""torpor.v1 servicers: thin adapters over the model manager."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.duration_pb2 import Duration
from torpor.v1 import (
    agent_pb2,
    agent_pb2_grpc,
    models_pb2,
    models_pb2_grpc,
    node_pb2,
    node_pb2_grpc,
)

from torpord import __version__
from torpord.backends.nvml import Discovery, discover
from torpord.core.acquire import FIGURES_KEPT
from torpord.core.activity import OPEN_USE_LEASE
from torpord.core.attachments.attachment import Attachment
from torpord.core.attachments.messages import Ended, Hello, Publish, Published, Quiesce, Resume
from torpord.core.attachments.registry import AgentRegistry
from torpord.core.events import EventType
from torpord.core.manager import ModelManager
from torpord.core.stats import summarise
from torpord.errors import InvalidArgument
from torpord.server.convert import (
    duration_seconds,
    is_full,
    model_to_proto,
    node_to_proto,
    prepare_full,
    tier_from_proto,
)
from torpord.server.errors import translate_errors, translate_stream_errors
from torpord.server.policyconvert import policy_from_proto
from torpord.server.statsconvert import kind_from_proto, stats_to_proto
from torpord.storage.catalogue import CatalogueGroup, CatalogueTensor
from torpord.types import Tier

__all__ = ["AgentService", "ModelService", "NodeService"]

Context = grpc.aio.ServicerContext[Any, Any]

GPU_REFRESH = 1.0  # seconds between two questions to the GPU driver
_EVENT_TYPES = {
    EventType.ADDED: models_pb2.MODEL_EVENT_TYPE_ADDED,
    EventType.CHANGED: models_pb2.MODEL_EVENT_TYPE_CHANGED,
    EventType.REMOVED: models_pb2.MODEL_EVENT_TYPE_REMOVED,
    EventType.PROGRESS: models_pb2.MODEL_EVENT_TYPE_PROGRESS,
}


class ModelService(models_pb2_grpc.ModelServiceServicer):
    def __init__(self, manager: ModelManager) -> None:
        self._m = manager

    @translate_errors
    async def LoadModel(
        self, request: models_pb2.LoadModelRequest, context: Context
    ) -> models_pb2.LoadModelResponse:
        model = await self._m.load(
            request.model_id,
            request.source,
            device=request.device,
            target=tier_from_proto(request.target_tier, default=Tier.DEVICE, field="target_tier"),
            wait=request.wait,
            request_id=request.request_id,
            policy=policy_from_proto(request.policy),
        )
        return models_pb2.LoadModelResponse(model=model_to_proto(model))

    @translate_errors
    async def SleepModel(
        self, request: models_pb2.SleepModelRequest, context: Context
    ) -> models_pb2.SleepModelResponse:
        model = await self._m.sleep(
            request.model_id,
            request.level,
            wait=request.wait,
            request_id=request.request_id,
            disk_copy=request.disk_copy,
        )
        return models_pb2.SleepModelResponse(model=model_to_proto(model))

    @translate_errors
    async def WakeModel(
        self, request: models_pb2.WakeModelRequest, context: Context
    ) -> models_pb2.WakeModelResponse:
        model = await self._m.wake(
            request.model_id,
            wait=request.wait,
            request_id=request.request_id,
            verify=request.verify,
        )
        return models_pb2.WakeModelResponse(model=model_to_proto(model))

    @translate_errors
    async def OffloadModel(
        self, request: models_pb2.OffloadModelRequest, context: Context
    ) -> models_pb2.OffloadModelResponse:
        model = await self._m.offload(
            request.model_id,
            list(request.layers),
            tier_from_proto(request.tier, default=Tier.HOST, field="tier"),
            wait=request.wait,
            request_id=request.request_id,
            verify=request.verify,
        )
        return models_pb2.OffloadModelResponse(model=model_to_proto(model))

    @translate_errors
    async def UnloadModel(
        self, request: models_pb2.UnloadModelRequest, context: Context
    ) -> models_pb2.UnloadModelResponse:
        model = await self._m.unload(
            request.model_id, wait=request.wait, request_id=request.request_id, force=request.force
        )
        return models_pb2.UnloadModelResponse(model=model_to_proto(model))

    @translate_errors
    async def GetModel(
        self, request: models_pb2.GetModelRequest, context: Context
    ) -> models_pb2.GetModelResponse:
        model = self._m.get(request.model_id)
        full = is_full(request.view)
        if full:
            await prepare_full([model])
        return models_pb2.GetModelResponse(model=model_to_proto(model, full=full))

    @translate_errors
    async def ListModels(
        self, request: models_pb2.ListModelsRequest, context: Context
    ) -> models_pb2.ListModelsResponse:
        full = is_full(request.view)
        models = self._m.list_models(request.fingerprint, registered=request.registered)
        if full:
            await prepare_full(models)
        return models_pb2.ListModelsResponse(models=[model_to_proto(m, full=full) for m in models])

    @translate_stream_errors
    async def WatchModels(
        self, request: models_pb2.WatchModelsRequest, context: Context
    ) -> AsyncIterator[models_pb2.WatchModelsResponse]:
        # Subscribe before taking the snapshot, so no change falls between them.
        subscription = self._m.bus.subscribe(request.model_id)
        try:
            models = [
                m
                for m in self._m.list_models()
                if not request.model_id or m.model_id == request.model_id
            ]
            yield models_pb2.WatchModelsResponse(
                snapshot=models_pb2.Snapshot(models=[model_to_proto(m) for m in models])
            )
            async for event in subscription:
                yield models_pb2.WatchModelsResponse(
                    model_event=models_pb2.ModelEvent(
                        type=_EVENT_TYPES[event.type], model=model_to_proto(event.model)
                    )
                )
        finally:
            subscription.close()

    # -- policies (issue 14) ----------------------------------------------------

    @translate_errors
    async def AcquireModel(
        self, request: models_pb2.AcquireModelRequest, context: Context
    ) -> models_pb2.AcquireModelResponse:
        acquired = await self._m.acquire(request.model_id, request_id=request.request_id)
        time_to_ready = Duration()
        time_to_ready.FromNanoseconds(int(acquired.seconds * 1e9))
        return models_pb2.AcquireModelResponse(
            model=model_to_proto(acquired.snapshot),
            hit=acquired.hit,
            time_to_ready=time_to_ready,
        )

    @translate_errors
    async def ReportActivity(
        self, request: models_pb2.ReportActivityRequest, context: Context
    ) -> models_pb2.ReportActivityResponse:
        self._m.report_activity(
            request.model_id,
            request.reporter,
            request.uses,
            duration_seconds(request.busy),
            request.in_use,
            lease=OPEN_USE_LEASE,  # (a router that vanished lets go)
        )
        return models_pb2.ReportActivityResponse()

    @translate_errors
    async def RegisterModel(
        self, request: models_pb2.RegisterModelRequest, context: Context
    ) -> models_pb2.RegisterModelResponse:
        model = await self._m.register(
            request.model_id, request.source, request.device, policy_from_proto(request.policy)
        )
        return models_pb2.RegisterModelResponse(model=model_to_proto(model))

    @translate_errors
    async def DeregisterModel(
        self, request: models_pb2.DeregisterModelRequest, context: Context
    ) -> models_pb2.DeregisterModelResponse:
        self._m.deregister(request.model_id)
        return models_pb2.DeregisterModelResponse()

    @translate_errors
    async def SetModelPolicy(
        self, request: models_pb2.SetModelPolicyRequest, context: Context
    ) -> models_pb2.SetModelPolicyResponse:
        policy = replace(policy_from_proto(request.policy), clear_windows=request.clear_windows)
        model = self._m.set_policy(request.model_id, policy)
        return models_pb2.SetModelPolicyResponse(model=model_to_proto(model))


class NodeService(node_pb2_grpc.NodeServiceServicer):
    def __init__(self, manager: ModelManager, backend_reason: str = "") -> None:
        self._m = manager
        self._backend_reason = backend_reason
        # The driver's figures, asked again at most once a second (NVML
        # starts up per question; a polling operator shouldn't pay it each time).
        self._found: tuple[float, Discovery] | None = None
        self._asking: asyncio.Lock | None = None

    async def _discovery(self) -> Discovery:
        if self._asking is None:
            self._asking = asyncio.Lock()
        async with self._asking:
            now = time.monotonic()
            if self._found is None or now - self._found[0] > GPU_REFRESH:
                self._found = (now, await asyncio.to_thread(discover))
            return self._found[1]

    @translate_errors
    async def GetNode(
        self, request: node_pb2.GetNodeRequest, context: Context
    ) -> node_pb2.GetNodeResponse:
        node = node_to_proto(
            self._m.backend,
            hostname=socket.gethostname(),
            version=__version__,
            model_count=len(self._m.list_models()),
            allowed_roots=[str(r) for r in self._m.settings.allowed_roots],
            disk=self._m.disk,
            found=await self._discovery(),
        )
        node.backend_reason = self._backend_reason
        return node_pb2.GetNodeResponse(node=node)

    @translate_errors
    async def GetStats(
        self, request: node_pb2.GetStatsRequest, context: Context
    ) -> node_pb2.GetStatsResponse:
        history = self._m.history
        stats = summarise(
            history.recent(),
            self._m.acquisitions,
            transition_capacity=history.capacity,
            acquire_capacity=FIGURES_KEPT,
            model_id=request.model_id,
            kind=kind_from_proto(request.kind),
        )
        return stats_to_proto(stats, time.time())


def hello_from_proto(hello: agent_pb2.Hello) -> Hello:
    publish = None
    if hello.HasField("publish"):
        p = hello.publish
        publish = Publish(
            p.fingerprint,
            tuple(
                CatalogueGroup(
                    g.name,
                    g.size_bytes,
                    tuple(
                        CatalogueTensor(t.name, t.dtype, tuple(t.shape), t.slab_offset)
                        for t in g.tensors
                    ),
                )
                for g in p.groups
            ),
            p.device,
        )
    return Hello(
        model_id=hello.model_id,
        pid=hello.pid,
        engine=hello.engine,
        rank=hello.rank,
        publish=publish,
    )


def message_to_proto(message: Quiesce | Resume | Published) -> agent_pb2.AttachResponse:
    if isinstance(message, Published):
        return agent_pb2.AttachResponse(
            published=agent_pb2.Published(layout_hash=message.layout_hash)
        )
    if isinstance(message, Resume):
        return agent_pb2.AttachResponse(
            resume=agent_pb2.Resume(
                sequence=message.sequence,
                layers=message.layers,
                layout_hash=message.layout_hash,
            )
        )
    timeout = Duration()
    timeout.FromNanoseconds(int(message.timeout * 1e9))
    return agent_pb2.AttachResponse(
        quiesce=agent_pb2.Quiesce(sequence=message.sequence, layers=message.layers, timeout=timeout)
    )


class AgentService(agent_pb2_grpc.AgentServiceServicer):
    """An engine's attachment lasts as long as its Attach stream; the
    registry speaks domain messages, turned into torpor.v1 ones here. The
    engine takes its slabs from the fd socket at `fd_socket`."""

    def __init__(self, registry: AgentRegistry, fd_socket: Path) -> None:
        self._registry = registry
        self._fd_socket = fd_socket

    @translate_stream_errors
    async def Attach(
        self, request_iterator: AsyncIterator[agent_pb2.AttachRequest], context: Context
    ) -> AsyncIterator[agent_pb2.AttachResponse]:
        first = await anext(aiter(request_iterator), None)
        if first is None or not first.HasField("hello"):
            raise InvalidArgument("an Attach stream starts with a Hello", reason="HELLO_FIRST")
        hello = hello_from_proto(first.hello)
        if hello.publish is not None:
            attachment = await self._registry.publish(hello)
        else:
            attachment = self._registry.attach(hello)
        reader = asyncio.create_task(self._read(request_iterator, attachment))
        get: asyncio.Future[Quiesce | Resume | Published | Ended] | None = None
        try:
            yield agent_pb2.AttachResponse(
                attached=agent_pb2.Attached(
                    attachment_id=attachment.id,
                    layout_hash=attachment.layout_hash,
                    fd_socket=str(self._fd_socket),
                    slab_kind=attachment.slab_kind,
                    device_index=attachment.device_index,
                    device=f"devices/{attachment.device}" if attachment.device else "",
                )
            )
            while True:
                get = asyncio.ensure_future(attachment.outbox.get())
                await asyncio.wait({get, reader}, return_when=asyncio.FIRST_COMPLETED)
                if not get.done():  # the engine closed its side: it is gone
                    reader.result()
                    return
                item = get.result()
                if isinstance(item, Ended):
                    raise item.error
                yield message_to_proto(item)
        finally:
            if get is not None:
                get.cancel()
            reader.cancel()
            self._registry.detach(attachment.id)

    async def _read(
        self, requests: AsyncIterator[agent_pb2.AttachRequest], attachment: Attachment
    ) -> None:
        async for request in requests:
            if request.HasField("quiesce_ack"):
                self._registry.acknowledged(attachment, request.quiesce_ack.sequence)
            elif request.HasField("release"):
                self._registry.released(attachment)
            elif request.HasField("commit"):
                self._registry.commit(attachment)
            elif request.HasField("activity"):
                report = request.activity
                self._registry.activity(
                    attachment, report.uses, duration_seconds(report.busy), report.in_use
                )
