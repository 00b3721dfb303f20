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
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

from torpor.agent import hf
from torpor.agent.attach import AttachedModel

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = [
    "Loaded",
    "WaitHooks",
    "assign",
    "empty_parameters",
    "from_transformers",
    "load_module",
    "wait_hooks",
]


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


class Loaded(NamedTuple):
    """What `load_module` could not match: the module's parameters and
    persistent buffers without a tensor, and the tensors without a place."""

    missing_keys: list[str]
    unexpected_keys: list[str]


def load_module(module: nn.Module, model: AttachedModel, *, strict: bool = True) -> Loaded:
    """Make `module`'s parameters and buffers the daemon's tensors, by name
    (no copy), as `module.load_state_dict(model.state_dict(), assign=True)`
    does, and also:

    - tied parameters (one parameter under two names, as a tied `lm_head`)
      stay tied to whichever name the checkpoint holds; a checkpoint that
      holds both names gives each its own tensor (never one for both);
    - buffers the checkpoint holds are the daemon's too, those the module
      keeps out of its state included (BERT's `position_ids`).

    `strict`: ValueError naming the model and the tensors when a parameter
    or persistent buffer has no tensor, or a tensor has no place in the
    module. Returns what did not match."""
    loaded = assign(module, model.state_dict(), model_id=model.model_id)
    if strict and (loaded.missing_keys or loaded.unexpected_keys):
        raise ValueError(
            f"the daemon's model {model.model_id!r} does not match {type(module).__name__}:"
            f" no tensor for {_some(loaded.missing_keys)};"
            f" no place for {_some(loaded.unexpected_keys)}"
        )
    return loaded


def _some(names: list[str]) -> str:
    if not names:
        return "none"
    return ", ".join(names[:5]) + (f" … ({len(names)} in all)" if len(names) > 5 else "")


def assign(
    module: nn.Module,
    tensors: Mapping[str, torch.Tensor],
    *,
    model_id: str,
    buffers: bool = True,
) -> Loaded:
    """Put `tensors` in `module` by name (see load_module); `buffers`: take
    the tensors of buffers the module keeps out of its state too. Shapes
    must match (ValueError naming the tensor). Reads no tensor's bytes."""
    state = module.state_dict(keep_vars=True)
    extra = {n: b for n, b in module.named_buffers(remove_duplicate=False) if n not in state}
    places = {**state, **(extra if buffers else {})}
    for name, tensor in tensors.items():
        mine = places.get(name)
        if mine is not None and tuple(mine.shape) != tuple(tensor.shape):
            raise ValueError(
                f"the daemon's model {model_id!r} has {name} of shape {list(tensor.shape)},"
                f" {type(module).__name__} wants {list(mine.shape)}"
            )
    # One parameter under several names (tied weights): found before loading
    # replaces them, so that the names the checkpoint lacks follow the one
    # it has.
    aliases: dict[int, list[str]] = {}
    for name, value in [
        *module.named_parameters(remove_duplicate=False),
        *module.named_buffers(remove_duplicate=False),
    ]:
        aliases.setdefault(id(value), []).append(name)
    module.load_state_dict(
        {n: t for n, t in tensors.items() if n in state}, strict=False, assign=True
    )
    if buffers:
        for name in extra.keys() & tensors.keys():
            _put(module, name, tensors[name])
    covered = set(tensors.keys() & places.keys())
    for names in aliases.values():
        given = [n for n in names if n in covered]
        if not given:
            continue
        for name in names:
            if name not in covered:
                _put(module, name, _get(module, given[0]))
                covered.add(name)
    for param in module.parameters():
        param.requires_grad_(False)  # read-only memory: never a gradient step
    return Loaded(
        missing_keys=[n for n in state if n not in covered],
        unexpected_keys=[n for n in tensors if n not in places],
    )


def _get(module: nn.Module, name: str) -> torch.Tensor:
    owner_name, _, attr = name.rpartition(".")
    value: torch.Tensor = getattr(module.get_submodule(owner_name), attr)
    return value


def _put(module: nn.Module, name: str, value: torch.Tensor) -> None:
    owner_name, _, attr = name.rpartition(".")
    setattr(module.get_submodule(owner_name), attr, value)


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
    are the daemon's tensors (no copy of them in this process), giving what
    `from_pretrained` gives on the same checkpoint, or a ValueError that
    says why it cannot:

    - built under the config's dtype (the checkpoint's most common floating
      dtype when the config has none); a tensor of another dtype is
      refused (transformers would cast it);
    - tensor names as transformers renames them (GPT-NeoX's `embed_out`);
      a model whose tensors transformers converts (fused MoE experts) is
      refused: its parameters are not the checkpoint's tensors;
    - weights the config ties are tied only when the checkpoint holds one
      of them; two tensors stay two, as in `from_pretrained`;
    - buffers transformers computes (BERT's `position_ids`) are the
      module's own, as in `from_pretrained`; a parameter without a tensor
      is refused.

    With `progressive`, its submodules wait for their layers (see
    wait_hooks); the hooks are on the returned model's `torpor_hooks`."""
    if model_class is None:
        from transformers import AutoModelForCausalLM

        model_class = AutoModelForCausalLM
    state = model.state_dict()
    dtype = hf.config_dtype(config, state)
    with empty_parameters():
        # Auto classes have from_config; a concrete model class has _from_config.
        build = getattr(model_class, "from_config", None) or model_class._from_config
        module = build(config, dtype=dtype)
    names = hf.module_names(module, state, model.model_id)
    computed = hf.non_persistent_buffers(module)
    tensors = {names[k]: t for k, t in state.items() if names[k] not in computed}
    hf.check_dtypes(module, tensors, model.model_id)
    loaded = assign(module, tensors, model_id=model.model_id, buffers=False)
    hf.record_untied(module)
    meta = [
        name
        for name, t in [*module.named_parameters(), *module.named_buffers()]
        if t.device.type == "meta"
    ]
    if meta:
        raise ValueError(
            f"the daemon's model {model.model_id!r} has no weights for {', '.join(meta[:5])}"
            f"{' …' if len(meta) > 5 else ''} (unexpected: {loaded.unexpected_keys[:5]})"
        )
    module.eval()
    module.torpor_hooks = wait_hooks(module, model) if progressive else None
    return module
