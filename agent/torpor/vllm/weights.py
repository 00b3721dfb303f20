"""A vLLM model's final tensors: collecting them for an image, and putting
an image's tensors into a model.

What an image holds is every parameter and buffer of the model once
`process_weights_after_loading` has run (fused, sharded, repacked), each
under its first name; further names of the same tensor (a tied lm_head, a
rotary cache shared by every layer, an MoE's shared-expert views) are
aliases, found again from the model itself, which vLLM builds with the same
sharing every time.

Parameters become views on the image (zero-copy, read-only: vLLM never
writes a parameter while serving). Buffers are the engine's own copies:
vLLM writes some after loading (the attention scales' `fill_(1.0)`, and a
level-2 sleep copies saved buffers back), which on a sealed image would
fault. They are small (scales, one rotary cache).

On vLLM's CPU build, `process_weights_after_loading` would repack every
dense linear weight into an opaque oneDNN handle and drop the parameter,
so the image would hold nothing the engine uses. `unpacked_cpu_gemm` keeps
the weights as parameters (vLLM's own `_cpu_skip_gemm_dispatch` escape,
meant for MLA, and plain `F.linear` for the embedding's lm_head GEMM): the
engine then reads the image itself, at some cost in GEMM speed.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch
from torch import nn

__all__ = [
    "aliases",
    "check_pre_processable",
    "install",
    "on_meta",
    "switch",
    "tensors_of",
    "unpacked_cpu_gemm",
]


def _named(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Every parameter, then every buffer (non-persistent ones too), by every name."""
    yield from model.named_parameters(remove_duplicate=False)
    yield from model.named_buffers(remove_duplicate=False)


def tensors_of(model: nn.Module) -> dict[str, torch.Tensor]:
    """Each distinct tensor of the model under its first name, in the model's
    order (the order vLLM runs them, so groups come out in forward order)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, tensor in _named(model):
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        if not tensor.is_contiguous():
            raise ValueError(
                f"load_format='torpor': tensor {name} {tuple(tensor.shape)} is not contiguous"
                " after processing; images hold contiguous tensors only"
            )
        out[name] = tensor.detach()
    return out


def aliases(model: nn.Module) -> dict[str, str]:
    """Each further name of a tensor -> its first name."""
    first: dict[int, str] = {}
    out: dict[str, str] = {}
    for name, tensor in _named(model):
        if id(tensor) in first:
            out[name] = first[id(tensor)]
        else:
            first[id(tensor)] = name
    return out


def check_pre_processable(model: nn.Module) -> None:
    """Every quantization method of the model takes weights that were
    processed already (what an image holds); ValueError naming the first
    that does not (GPTQ, AWQ, compressed-tensors... in vLLM 0.32)."""
    from vllm.model_executor.layers.quantization.base_config import QuantizeMethodBase

    for name, module in model.named_modules():
        method = getattr(module, "quant_method", None)
        if isinstance(method, QuantizeMethodBase) and not method.supports_pre_processed_weights:
            raise ValueError(
                f"load_format='torpor' cannot serve this model: layer {name or '<root>'} uses"
                f" {type(method).__name__}, which cannot take pre-processed weights, so its"
                " processed weights cannot be published as an image; use load_format='auto'"
            )


def unpacked_cpu_gemm(model: nn.Module, *, processed: bool) -> None:
    """On vLLM's CPU build, keep dense weights as parameters (see the module's
    doc): before processing, flag every unquantized linear layer; after it,
    route the remaining packed GEMMs (embedding/lm_head) to F.linear."""
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    for module in model.modules():
        if not processed:
            if isinstance(getattr(module, "quant_method", None), UnquantizedLinearMethod):
                setattr(module, "_cpu_skip_gemm_dispatch", True)  # noqa: B010 (vLLM's flag)
        elif hasattr(module, "cpu_linear") and not getattr(
            module, "_cpu_skip_gemm_dispatch", False
        ):
            object.__setattr__(module, "cpu_linear", torch.nn.functional.linear)


def install(model: nn.Module, image: Mapping[str, torch.Tensor]) -> None:
    """Put an image's tensors into a model built on `meta`: parameters as the
    image's views, buffers as copies, aliases as the same objects again."""
    modules = dict(model.named_modules(remove_duplicate=False))
    further = aliases(model)  # (the meta model's sharing: the one vLLM builds)
    put: dict[str, torch.Tensor] = {}

    def register(name: str, tensor: torch.Tensor, as_buffer: bool) -> None:
        owner, _, leaf = name.rpartition(".")
        module = modules.get(owner)
        if module is None:
            raise ValueError(
                f"load_format='torpor': the image has tensor {name}, which this model lacks;"
                " the image does not match the model (unload it and start again)"
            )
        module._parameters.pop(leaf, None)
        module._buffers.pop(leaf, None)
        if as_buffer:
            module.register_buffer(leaf, tensor)
        else:
            param = (
                tensor
                if isinstance(tensor, nn.Parameter)
                else nn.Parameter(tensor, requires_grad=False)
            )
            module.register_parameter(leaf, param)
            tensor = param
        put[name] = tensor

    for name, tensor in image.items():
        owner, _, leaf = name.rpartition(".")
        module = modules.get(owner)
        as_buffer = module is not None and leaf in module._buffers
        register(name, tensor.clone() if as_buffer else tensor, as_buffer)
    for name, first in further.items():
        if name not in image and first in put:
            kept = put[first]
            register(name, kept, not isinstance(kept, nn.Parameter))


def switch(model: nn.Module, image: Mapping[str, torch.Tensor]) -> None:
    """Point a loaded model's parameters at the image's views (the same
    tensors, published): their objects stay, so every alias follows, and
    the engine's own copy is freed once nothing else holds it. Buffers keep
    the engine's copies. The image must hold exactly the model's tensors."""
    own = tensors_of(model)
    if own.keys() != image.keys():
        missing = sorted(own.keys() - image.keys())[:5]
        extra = sorted(image.keys() - own.keys())[:5]
        raise ValueError(
            "load_format='torpor': the image with this fingerprint holds other tensors than"
            f" this model (missing {missing}, unexpected {extra}); unload it and start again"
        )
    params = dict(model.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for name, tensor in own.items():
            view = image[name]
            if view.dtype != tensor.dtype or view.shape != tensor.shape:
                raise ValueError(
                    f"load_format='torpor': the image's {name} is {view.dtype}"
                    f" {tuple(view.shape)}, this model's {tensor.dtype} {tuple(tensor.shape)};"
                    " unload the image and start again"
                )
            if name in params:
                params[name].data = view


def on_meta(model: nn.Module) -> list[str]:
    """The names of the model's tensors that are still on `meta`."""
    return [name for name, tensor in _named(model) if tensor.is_meta]
