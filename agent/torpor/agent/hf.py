"""What `from_transformers` must know of how Hugging Face transformers loads
a checkpoint, so that a module built on the daemon's tensors is the one
`from_pretrained` would give: the dtype it builds under, the names it gives
the checkpoint's tensors, and the tensors it would not take as they are.

Nothing here reads a tensor's bytes: the daemon's weights may be asleep
(their ranges fault on access) while an engine builds its module.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = [
    "check_dtypes",
    "config_dtype",
    "module_names",
    "non_persistent_buffers",
    "record_untied",
]

# How transformers' own loader (5.x) renames and converts checkpoint keys; None
# for a transformers that loads by name (4.x).
_Loader = tuple[Callable[..., Any], Callable[..., Any], type, type, Callable[[str], Any]]


def _loader() -> _Loader | None:
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import (
            WeightConverter,
            WeightRenaming,
            dot_natural_key,
            rename_source_key,
        )
    except ImportError:
        return None
    return (
        get_model_conversion_mapping,
        rename_source_key,
        WeightRenaming,
        WeightConverter,
        dot_natural_key,
    )


def config_dtype(config: Any, tensors: Mapping[str, torch.Tensor]) -> torch.dtype:
    """The dtype `from_pretrained` builds the model under: the config's
    (`dtype`, formerly `torch_dtype`); without one, the most common floating
    dtype among the checkpoint's tensors (transformers cannot build a model
    under float8 or float4: those are not counted), else float32."""
    import torch

    named = getattr(config, "dtype", None)
    if named is None:
        named = vars(config).get("torch_dtype")  # (transformers 4; 5 warns on the property)
    if isinstance(named, str):
        value = getattr(torch, named.removeprefix("torch."), None)
        if not isinstance(value, torch.dtype):
            raise ValueError(f"the config's dtype {named!r} is not a torch dtype")
        return value
    if isinstance(named, torch.dtype):
        return named
    counts = Counter(
        t.dtype
        for t in tensors.values()
        if t.dtype.is_floating_point and t.dtype.itemsize > 1  # (fp8, fp4: one byte)
    )
    return counts.most_common(1)[0][0] if counts else torch.float32


def module_names(module: nn.Module, names: Iterable[str], model_id: str) -> dict[str, str]:
    """Each checkpoint tensor's name in `module`, renamed as transformers'
    `from_pretrained` renames it (GPT-NeoX's `embed_out` is `lm_head`, old
    LayerNorm `gamma` is `weight`, a base model's prefix added or dropped).

    ValueError when transformers converts a tensor rather than renames it
    (Mixtral's and Qwen2-MoE's experts fused into 3-D parameters, split or
    transposed weights): the module's layout is not the checkpoint's, so no
    tensor of the checkpoint can be the module's own; the same when two
    tensors would get one name."""
    loader = _loader()
    ordered = list(names)
    if loader is None:
        return {name: name for name in ordered}
    conversions, rename, renaming, converter, natural = loader
    transforms = conversions(module)
    renamings = [t for t in transforms if isinstance(t, renaming)]
    converters = [t for t in transforms if isinstance(t, converter)]
    own = module.state_dict()
    prefix = getattr(module, "base_model_prefix", None)
    result: dict[str, str] = {}
    converted: list[str] = []
    # In transformers' key order: a group renaming acts only once it has seen
    # its first key.
    for name in sorted(ordered, key=natural):
        new, pattern = rename(name, renamings, converters, prefix, own)
        if new not in own and name in own:  # (as transformers: a key the module has as is)
            new, pattern = rename(name, [], [], prefix, own)
        if pattern is not None:
            converted.append(name)
        result[name] = new
    if converted:
        shown = ", ".join(converted[:3]) + (" …" if len(converted) > 3 else "")
        raise ValueError(
            f"the daemon's model {model_id!r} holds the checkpoint's layout, and "
            f"{type(module).__name__} has another: transformers converts {shown} "
            f"({len(converted)} tensors) into other parameters when it loads them "
            "(fused experts, split or transposed weights), so they cannot be the "
            "module's own tensors. Load this model through an image instead (an "
            "engine publishes its converted weights into the daemon once)"
        )
    targets: dict[str, str] = {}
    for name, new in result.items():
        if new in targets:
            raise ValueError(
                f"the daemon's model {model_id!r} has two tensors, {targets[new]} and "
                f"{name}, for one parameter {new} of {type(module).__name__}"
            )
        targets[new] = name
    return result


def non_persistent_buffers(module: nn.Module) -> set[str]:
    """The names of the module's buffers that are not part of its state
    (BERT's `position_ids`, rotary `inv_freq`): transformers computes them
    from the config and never takes them from a checkpoint."""
    state = module.state_dict(keep_vars=True)
    return {name for name, _ in module.named_buffers(remove_duplicate=False)} - set(state)


def check_dtypes(module: nn.Module, tensors: Mapping[str, torch.Tensor], model_id: str) -> None:
    """ValueError naming the first tensor whose dtype is not the one `module`
    has for it: `from_pretrained` would cast it (to the config's dtype, or
    to float32 for a module kept in float32), and a cast tensor is not the
    daemon's."""
    own = module.state_dict(keep_vars=True)
    for name, tensor in tensors.items():
        mine = own.get(name)
        if mine is not None and mine.dtype != tensor.dtype:
            raise ValueError(
                f"the daemon's model {model_id!r} has {name} in {tensor.dtype}, and "
                f"{type(module).__name__} (built under the config's dtype) wants "
                f"{mine.dtype}: transformers would cast it, which the daemon's "
                "read-only tensors cannot be. Give a config whose dtype is the "
                "checkpoint's"
            )


def record_untied(module: nn.Module) -> None:
    """Take the tied pairs that are two tensors now (the checkpoint held both)
    out of transformers' record of the module's ties, as `from_pretrained`
    does, so that saving or resizing the module treats them as two."""
    tied = getattr(module, "all_tied_weights_keys", None)
    if not isinstance(tied, dict):
        return
    for target, source in list(tied.items()):
        try:
            apart = module.get_parameter(target) is not module.get_parameter(source)
        except AttributeError:
            continue
        if apart:
            tied.pop(target)
