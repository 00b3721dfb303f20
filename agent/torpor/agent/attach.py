"""Attach an engine to a model the daemon holds and get its weights as tensors.

    from torpor.agent import attach

    model = attach("llama")
    module.load_state_dict(model.state_dict(), assign=True)   # no copy
    with model.use():                                          # weights stay mapped
        out = module(x)

Nothing is copied: each layer's slab is mapped read-only at an address this
process reserved for it once, and the tensors are views on those addresses.

The daemon may take the weights away (Sleep, Offload, Unload) and bring them
back (Wake, Offload to DEVICE). Before it does, it asks the agent to quiesce:
the agent calls the engine's `on_quiesce` callbacks, waits for every `use()`
block to end, unmaps the layers (their ranges fault on access until they come
back) and acknowledges. As each layer is back on the device the daemon says
so and the agent maps it at the same address: tensors, and anything that
holds their addresses (CUDA graphs), stay valid. `wait_layer` lets an engine
run a layer as soon as it is back (progressive wake; see
`torpor.agent.modules.wait_hooks`).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from types import TracebackType
from typing import TYPE_CHECKING, Any

import grpc

from torpor.agent._fdsocket import request_fds
from torpor.agent._gate import Gate
from torpor.agent._layout import Layout
from torpor.agent._session import Callback, Session
from torpor.client import Client
from torpor.errors import TorporError, from_rpc_error
from torpor.v1 import agent_pb2, models_pb2

if TYPE_CHECKING:
    import torch

# (request_fds lives in torpor.agent._fdsocket; it is importable from here as it was.)
__all__ = ["AttachedModel", "attach", "request_fds"]


class AttachedModel:
    """One engine process's attachment to one model.

    Thread-safe: `use`, `wait_layer` and `state_dict` may be called from any
    thread; the daemon's instructions are handled on a thread of the agent.
    """

    def __init__(
        self,
        model_id: str,
        *,
        client: Client | None = None,
        engine: str = "",
        rank: int = 0,
        timeout: float = 60.0,
        publish: agent_pb2.Publish | None = None,
    ) -> None:
        """With `publish`, the model is created as an image that this process
        writes (see torpor.agent.publish) instead of attached to."""
        self.model_id = model_id
        self.timeout = timeout
        self._own_client = client is None
        self.client = client or Client()
        self._layout = Layout(model_id)
        self._gate = Gate(model_id, self._layout)
        self._session = Session(
            model_id,
            client=self.client,
            gate=self._gate,
            layout=self._layout,
            engine=engine,
            rank=rank,
            timeout=timeout,
            publish=publish,
        )
        try:
            self._session.attach()
            self._layout.reserve(
                self.client.get_model(model_id, view=models_pb2.MODEL_VIEW_FULL),
                layout_hash=self.layout_hash,
                slab_kind=self.slab_kind,
                device=self.device,
                device_index=self.device_index,
            )
            self._session.start()
        except grpc.RpcError as err:
            self.close()
            raise from_rpc_error(err) from None
        except BaseException:
            self.close()
            raise

    # -- what the attachment is ------------------------------------------------------

    @property
    def attachment_id(self) -> str:
        return self._session.attachment_id

    @property
    def fd_socket(self) -> str:
        return self._session.fd_socket

    @property
    def layout_hash(self) -> str:
        return self._session.layout_hash

    @property
    def slab_kind(self) -> str:
        """The kind of slab memory: memfd (host memory) or cuda (a GPU's)."""
        return self._session.slab_kind

    @property
    def device(self) -> str:
        """The device holding the slabs: the GPU's UUID for "cuda" slabs."""
        return self._session.device

    @property
    def device_index(self) -> int:
        return self._session.device_index

    @property
    def publishing(self) -> bool:
        """Whether this process is writing the model (an image) and has not
        committed it yet: its tensors are writable until `commit`."""
        return self._session.publish is not None

    def commit(self) -> None:
        """Publishing: the tensors hold the final bytes; have the daemon seal
        and checksum them. After this they are read-only, at the same
        addresses, and the model is an image like any other (see
        torpor.agent.publish). On failure the model is gone."""
        try:
            self._session.commit()
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None

    def reattach(self) -> None:
        """Attach again after the attachment ended (the daemon restarted and the
        model was loaded again, or it was unloaded and loaded again): the same
        layout is mapped at the same addresses, so the tensors, and anything
        holding their addresses, are valid again. A model whose layout differs
        is FAILED_PRECONDITION LAYOUT_CHANGED, one now on another GPU (or in
        another kind of memory) DEVICE_CHANGED: attach anew instead."""
        self._session.reattach()

    def let_go(self) -> None:
        """Detach from the daemon for a while, keeping the address ranges: the
        `on_quiesce` callbacks run, the use() blocks end (new ones wait, then
        raise CANCELLED LET_GO), every layer is unmapped and the daemon
        counts this engine out (a Sleep no longer waits for it, and it holds
        no memory). `reattach` maps the same layout at the same addresses
        again. An engine asked to sleep lets go this way while other
        engines keep the model. Nothing happens if the attachment had ended
        already; ABORTED QUIESCE_TIMEOUT if use() blocks still run after
        `timeout`."""
        self._session.let_go()

    # -- what the engine uses ------------------------------------------------------

    @property
    def layers(self) -> list[str]:
        """The model's layer names in forward order ("pre", "layers.0", …, "post")."""
        return self._layout.layers

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every tensor of the model by name: views on the daemon's slabs, at
        addresses that stay the same for the life of the attachment."""
        return self._layout.state_dict()

    def layer_of(self, tensor_name: str) -> str:
        """The layer a tensor belongs to."""
        return self._layout.layer_of(tensor_name)

    def ranges(self) -> dict[str, tuple[int, int]]:
        """Each layer's reserved address range: name -> (address, size)."""
        return self._layout.ranges()

    def ready(self, layer: str | int | None = None) -> bool:
        """Whether a layer (or, with none given, every layer) is mapped now."""
        return self._gate.ready(None if layer is None else self._layout.name_of(layer))

    @property
    def ended(self) -> TorporError | None:
        """Why the attachment is over (revoked, model unloaded, daemon stopped),
        or None while it lasts."""
        return self._gate.ended

    def wait_layer(self, layer: str | int, timeout: float | None = None) -> None:
        """Block until a layer (by name, or index in forward order) is mapped.

        Raises TorporError: DEADLINE_EXCEEDED after `timeout`; ABORTED
        (WEIGHTS_WITHDRAWN) when the daemon takes the weights away meanwhile
        (a Sleep, or a failed Wake rolled back): the caller should end its
        `use()` block; or why the attachment ended."""
        self._gate.wait_layer(self._layout.name_of(layer), timeout)

    @contextlib.contextmanager
    def use(self, *, wait: bool = True, timeout: float | None = None) -> Iterator[None]:
        """Hold the weights for the length of the block: the daemon's requests to
        let go wait until it ends. With `wait`, first wait until every layer
        is mapped; without, layers are awaited one by one (`wait_layer`, or the
        hooks of `torpor.agent.modules.wait_hooks`) as a progressive wake
        brings them back.

        The daemon is told how the model is used (blocks ended, their time,
        blocks open; nested blocks count once), at most once a second, so
        its policies know what is idle."""
        token = self._gate.enter(wait=wait, timeout=timeout)
        start = time.monotonic()  # (no system call: the vDSO's clock)
        try:
            yield
        finally:
            if self._gate.leave(token, time.monotonic() - start):
                self._session.let_go_late()

    def on_quiesce(self, callback: Callback) -> Callback:
        """Call `callback(layers)` when the daemon is about to take layers away
        (an empty list means every layer), before the agent waits for the
        `use()` blocks to end: the engine stops starting new work. Runs on the
        agent's thread; usable as a decorator."""
        self._session.on_quiesce.append(callback)
        return callback

    def on_resume(self, callback: Callback) -> Callback:
        """Call `callback(layers)` once layers are mapped again."""
        self._session.on_resume.append(callback)
        return callback

    def close(self) -> None:
        """Detach. The tensors from state_dict() must not be used after this.
        Use() blocks running in other threads keep the weights mapped until the
        last of them ends; the address ranges are released then."""
        closing = self._gate.close()  # (the listener maps nothing more)
        self._session.close(released=closing.released, stream_over=closing.stream_over)
        if self._own_client:
            self.client.close()
        if closing.failed is not None:
            raise closing.failed

    def __enter__(self) -> AttachedModel:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def attach(model_id: str, **kwargs: Any) -> AttachedModel:
    """Attach this process to a model (see AttachedModel)."""
    return AttachedModel(model_id, **kwargs)
