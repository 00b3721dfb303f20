"""PyTorch and Hugging Face integrations: modules whose weights are the daemon's.

    model = attach("llama")
    with empty_parameters():
        module = MyModel(config)                # parameters on "meta": no memory
    load_module(module, model)                  # adopt the daemon's tensors (no copy)
    hooks = wait_hooks(module, model)           # each submodule waits for its layer
    with model.use(wait=False):                 # progressive wake: layer 0 runs while
        out = module(x)                         # later layers are still coming back

or, for a `transformers` model, `from_transformers(config, model)`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from torpor.agent.attach import AttachedModel

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["WaitHooks", "empty_parameters", "from_transformers", "load_module", "wait_hooks"]


@contextlib.contextmanager
def empty_parameters() -> Iterator[None]:
    """Modules built inside get their parameters on the "meta" device (no
    memory, no initialisation cost); buffers stay real. `load_module` then
    gives them the daemon's tensors."""
    import torch
    from torch import nn

    register = nn.Module.register_parameter

    def on_meta(self: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(self, name, param)
        if param is not None and param.device.type != "meta":
            kind = type(param)
            meta = param.to(torch.device("meta"))
            self._parameters[name] = kind(meta, requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def load_module(module: nn.Module, model: AttachedModel, *, strict: bool = True) -> Any:
    """Make `module`'s parameters and buffers the daemon's tensors, by name:
    `module.load_state_dict(model.state_dict(), assign=True)`. Returns its
    result (missing and unexpected keys, when not strict)."""
    result = module.load_state_dict(model.state_dict(), strict=strict, assign=True)
    for param in module.parameters():
        param.requires_grad_(False)  # read-only memory: never a gradient step
    return result


class WaitHooks:
    """Forward pre-hooks that make each submodule wait for the layers its own
    parameters live in. `remove()` takes them off."""

    def __init__(self, handles: list[Any], layers: dict[str, list[str]]) -> None:
        self._handles = handles
        self.layers = layers  # submodule name -> the layers it waits for

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def wait_hooks(
    module: nn.Module, model: AttachedModel, *, timeout: float | None = None
) -> WaitHooks:
    """Wire a forward pre-hook into every submodule that holds daemon weights,
    calling `model.wait_layer` for their layers: run the module inside
    `model.use(wait=False)` and each part runs as soon as its layer is back.

    Layers are found by address (a tensor belongs to the slab range it
    points into), so this works whatever the module's names are, tied
    weights included."""
    ranges = sorted((addr, addr + size, name) for name, (addr, size) in model.ranges().items())

    def layer_at(ptr: int) -> str | None:
        for start, end, name in ranges:
            if start <= ptr < end:
                return name
        return None

    handles: list[Any] = []
    found: dict[str, list[str]] = {}
    for name, sub in module.named_modules():
        tensors: list[torch.Tensor] = [
            *sub.parameters(recurse=False),
            *sub.buffers(recurse=False),
        ]
        layers = sorted(
            {layer for t in tensors if t.numel() and (layer := layer_at(t.data_ptr()))},
            key=model.layers.index,
        )
        if not layers:
            continue
        found[name] = layers
        handles.append(sub.register_forward_pre_hook(_waiter(model, layers, timeout)))
    return WaitHooks(handles, found)


def _waiter(model: AttachedModel, layers: list[str], timeout: float | None) -> Callable[..., None]:
    def hook(_module: nn.Module, _args: Any) -> None:
        for layer in layers:
            model.wait_layer(layer, timeout)

    return hook


def from_transformers(
    config: Any,
    model: AttachedModel,
    *,
    model_class: Any = None,
    progressive: bool = True,
) -> Any:
    """A Hugging Face `transformers` model built from `config` whose weights
    are the daemon's tensors (no copy of them in this process). With
    `progressive`, its submodules wait for their layers (see wait_hooks);
    the hooks are on the returned model's `torpor_hooks`."""
    import torch

    if model_class is None:
        from transformers import AutoModelForCausalLM

        model_class = AutoModelForCausalLM
    state = model.state_dict()
    dtype = next(iter(state.values())).dtype if state else torch.float32
    with empty_parameters():
        # Auto classes have from_config; a concrete model class has _from_config.
        build = getattr(model_class, "from_config", None) or model_class._from_config
        module = build(config, dtype=dtype)
    result = module.load_state_dict(state, strict=False, assign=True)
    module.tie_weights()
    meta = [name for name, p in module.named_parameters() if p.device.type == "meta"]
    if meta:
        raise ValueError(
            f"the daemon's model {model.model_id!r} has no weights for {', '.join(meta[:5])}"
            f"{' …' if len(meta) > 5 else ''} (unexpected: {list(result.unexpected_keys)[:5]})"
        )
    for param in module.parameters():
        param.requires_grad_(False)
    module.eval()
    module.torpor_hooks = wait_hooks(module, model) if progressive else None
    return module
