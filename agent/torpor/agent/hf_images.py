"""Hugging Face transformers models of any architecture on daemon images.

    from torpor.agent.hf_images import from_pretrained

    module = from_pretrained("/models/Mixtral-8x7B")     # AutoModelForCausalLM
    with module.torpor_model.use(wait=False):            # weights stay mapped
        logits = module(ids).logits

The first start loads the directory with transformers' own
`from_pretrained` (its renames, MoE expert fusion, tying and casts all
apply), publishes the resulting parameters and persistent buffers into the
daemon as an image (see torpor.agent.publish) and switches the module onto
the published tensors, so this process holds no copy of its own. Every
later start with the same fingerprint (see torpor.agent.hf_fingerprint)
builds the module on `meta` and gives it the image's tensors: no read of
the weight files, no conversion, no copy. Either way the module computes
what plain `from_pretrained` gives, bit for bit; its weights sleep, wake
and offload with the daemon's image, and its submodules wait for their
layers (progressive wake) when run inside `use(wait=False)`.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import grpc

from torpor.agent import hf
from torpor.agent.attach import AttachedModel
from torpor.agent.hf_fingerprint import fingerprint, image_id, torch_dtype_of
from torpor.agent.modules import assign, empty_parameters, wait_hooks
from torpor.agent.publish import groups_of, publish
from torpor.client import Client
from torpor.errors import TorporError
from torpor.v1 import common_pb2

if TYPE_CHECKING:
    import torch

__all__ = ["BUILD_OPTIONS", "from_pretrained"]

# from_pretrained's options that shape the module rather than its config; the
# others given are config overrides, as transformers takes them.
BUILD_OPTIONS = frozenset({"attn_implementation", "experts_implementation", "trust_remote_code"})

_READY = (common_pb2.MODEL_STATE_ACTIVE, common_pb2.MODEL_STATE_OFFLOADED)


def from_pretrained(
    model_dir: str | os.PathLike[str],
    *,
    model_class: Any = None,
    dtype: Any = None,
    client: Client | None = None,
    model_id: str | None = None,
    progressive: bool = True,
    wait_timeout: float = 300.0,
    **kwargs: Any,
) -> Any:
    """`model_class.from_pretrained(model_dir, dtype=dtype, **kwargs)`
    (`AutoModelForCausalLM` by default), its parameters and persistent
    buffers being an image's tensors in the daemon; the image's
    AttachedModel is the module's `torpor_model` (close it when done), the
    progressive-wake hooks its `torpor_hooks` (None without `progressive`).

    `model_dir` is a local directory (a Hub snapshot included). `kwargs`
    are config overrides and BUILD_OPTIONS, JSON values (they are part of
    the fingerprint). `model_id` names a new image (default: "hf-" and a
    hash of the fingerprint); an existing image with the fingerprint is
    used whatever its id. An image another process is publishing, or
    waking, is waited for up to `wait_timeout` seconds (TorporError
    DEADLINE_EXCEEDED IMAGE_NOT_READY after); one asleep is woken.

    Parameters are read-only (requires_grad False). A ValueError says why a
    module cannot be built as from_pretrained builds it."""
    if model_class is None:
        from transformers import AutoModelForCausalLM

        model_class = AutoModelForCausalLM
    found_by = client or Client()
    try:
        key = fingerprint(model_dir, model_class=model_class, dtype=dtype, options=kwargs)
        new_id = model_id or image_id(key)
        deadline = time.monotonic() + wait_timeout
        while True:
            ready = _ready_image(found_by, key, deadline)
            try:
                if ready is not None:
                    module = _from_image(model_dir, ready, model_class, dtype, kwargs, client)
                else:
                    module = _load_and_publish(
                        model_dir, new_id, key, model_class, dtype, kwargs, client
                    )
            except TorporError as err:
                if _raced(err) and time.monotonic() < deadline:
                    continue  # (another process changed the image meanwhile: look again)
                raise
            break
    finally:
        if client is None:
            found_by.close()
    model: AttachedModel = module.torpor_model
    module.torpor_hooks = wait_hooks(module, model) if progressive else None
    return module


def _raced(err: TorporError) -> bool:
    """Whether `err` says the image changed between looking and acting: it was
    published, slept or unloaded by another process."""
    return (
        err.reason in ("IMAGE_EXISTS", "MODEL_NOT_ACTIVE", "TRANSITION_IN_PROGRESS")
        or err.code is grpc.StatusCode.NOT_FOUND
    )


def _ready_image(client: Client, key: str, deadline: float) -> str | None:
    """The id of the image with this fingerprint once engines can attach to
    it (woken if asleep), or None when there is none."""
    pause = 0.02
    while True:
        found = client.list_models(fingerprint=key)
        if not found:
            return None
        image = found[0]
        if image.state in _READY:
            return image.model_id
        if image.state == common_pb2.MODEL_STATE_FAILED:
            raise TorporError(
                grpc.StatusCode.FAILED_PRECONDITION,
                "IMAGE_FAILED",
                f"the image {image.model_id!r} for this model failed ({image.state_reason}):"
                " unload it, and the next start publishes it again",
                {"model_id": image.model_id, "state_reason": image.state_reason},
            )
        left = deadline - time.monotonic()
        if left <= 0:
            state = common_pb2.ModelState.Name(image.state).removeprefix("MODEL_STATE_")
            raise TorporError(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                "IMAGE_NOT_READY",
                f"the image {image.model_id!r} for this model is still {state.lower()}"
                " (another process is publishing or moving it)",
                {"model_id": image.model_id, "state": state},
            )
        if image.state == common_pb2.MODEL_STATE_ASLEEP:
            try:
                client.wake_model(image.model_id, timeout=left)
            except TorporError as err:
                if not (_raced(err) or err.reason == "INVALID_STATE"):
                    raise
            continue
        time.sleep(min(pause, left))
        pause = min(pause * 2, 0.5)


def _config(model_dir: str | os.PathLike[str], model_class: Any, kwargs: Mapping[str, Any]) -> Any:
    """The config from_pretrained builds the module from, `kwargs`' config
    overrides applied. ValueError for an option that is neither a config
    field nor a BUILD_OPTION (from_pretrained's loading options, such as
    `subfolder` or `device_map`, would load something the fingerprint does
    not cover or place it elsewhere), and for a quantized checkpoint (its
    modules are replaced while loading, which a start from an image cannot
    repeat)."""
    from transformers import AutoConfig

    loader = getattr(model_class, "config_class", None) or AutoConfig
    remote = {k: kwargs[k] for k in ("trust_remote_code",) if k in kwargs and loader is AutoConfig}
    config = loader.from_pretrained(model_dir, **remote)
    overrides = {k: v for k, v in kwargs.items() if k not in BUILD_OPTIONS}
    odd = sorted(k for k in overrides if k == "torch_dtype" or not hasattr(config, k))
    if odd:
        raise ValueError(
            f"{', '.join(odd)}: neither a field of {type(config).__name__} nor an option"
            f" torpor's from_pretrained takes ({', '.join(sorted(BUILD_OPTIONS))})"
        )
    if getattr(config, "quantization_config", None) is not None:
        raise ValueError(
            f"{os.fspath(model_dir)!r} is a quantized checkpoint, which this entry point"
            " does not load (transformers replaces its modules while loading)"
        )
    if overrides:
        config = loader.from_pretrained(model_dir, **remote, **overrides)
    return config


def _build_dtype(dtype: Any, config: Any, tensors: Mapping[str, torch.Tensor]) -> torch.dtype:
    """The dtype a start builds the module under: the one asked for; for
    "auto" (None), the config's, else the most common floating dtype of
    the weights (the publishing start checks that it is the one
    transformers chose)."""
    return torch_dtype_of(dtype) or hf.config_dtype(config, tensors)


def _load_and_publish(
    model_dir: str | os.PathLike[str],
    model_id: str,
    key: str,
    model_class: Any,
    dtype: Any,
    kwargs: Mapping[str, Any],
    client: Client | None,
) -> Any:
    """A miss: transformers loads the directory, the module's parameters and
    persistent buffers are published (a tensor several names share, once),
    and the module is switched onto the published tensors, so its own are
    freed."""
    config = _config(model_dir, model_class, kwargs)  # (refuses what the hit could not build)
    module = model_class.from_pretrained(model_dir, dtype=dtype, **kwargs)
    module.eval()
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, tensor in module.state_dict(keep_vars=True).items():
        if id(tensor) not in seen:
            seen.add(id(tensor))
            tensors[name] = tensor.detach()
    built = getattr(module.config, "dtype", None)
    rebuilt = _build_dtype(dtype, config, tensors)
    if built is not None and built != rebuilt:
        raise ValueError(
            f"transformers built {model_dir} under {built}, which later starts cannot"
            f" tell from its config (they would take {rebuilt}): give dtype= explicitly"
        )
    model = publish(model_id, key, groups_of(tensors), client=client)
    del tensors, seen
    try:
        _take(module, model)
    except BaseException:
        model.close()
        raise
    return module


def _from_image(
    model_dir: str | os.PathLike[str],
    model_id: str,
    model_class: Any,
    dtype: Any,
    kwargs: Mapping[str, Any],
    client: Client | None,
) -> Any:
    """A hit: the module built on `meta` from the config, its parameters and
    persistent buffers the image's tensors (names the image holds once
    follow the module's own ties, as transformers ties them)."""
    config = _config(model_dir, model_class, kwargs)
    model = AttachedModel(model_id, client=client)
    try:
        state = model.state_dict()
        build = {k: kwargs[k] for k in BUILD_OPTIONS & kwargs.keys()}
        if not hasattr(model_class, "from_config"):  # (a concrete class has _from_config)
            build.pop("trust_remote_code", None)
        with empty_parameters():
            make = getattr(model_class, "from_config", None) or model_class._from_config
            module = make(config, dtype=_build_dtype(dtype, config, state), **build)
        _take(module, model)
        hf.record_untied(module)
        module.eval()
        _generation_config(module, model_dir)
    except BaseException:
        model.close()
        raise
    return module


def _take(module: Any, model: AttachedModel) -> None:
    """Make every parameter and persistent buffer of `module` the image's
    tensor of its name (ValueError if one has none, or the image holds one
    the module has no place for); the buffers the module computes itself
    move to the image's device."""
    state = model.state_dict()
    loaded = assign(module, state, model_id=model.model_id, buffers=False)
    on_meta = [
        name
        for name, t in [*module.named_parameters(), *module.named_buffers()]
        if t.device.type == "meta"
    ]
    if loaded.missing_keys or loaded.unexpected_keys or on_meta:
        raise ValueError(
            f"the image {model.model_id!r} does not match {type(module).__name__}:"
            f" no tensor for {_some(loaded.missing_keys + on_meta)};"
            f" no place for {_some(loaded.unexpected_keys)}"
            " (unload the image; the next start publishes it again)"
        )
    device = next(iter(state.values())).device
    for sub in module.modules():
        for name, buffer in sub._buffers.items():
            if buffer is not None and buffer.device != device:
                sub._buffers[name] = buffer.to(device)
    module.torpor_model = model


def _some(names: list[str]) -> str:
    if not names:
        return "none"
    return ", ".join(names[:5]) + (f" … ({len(names)} in all)" if len(names) > 5 else "")


def _generation_config(module: Any, model_dir: str | os.PathLike[str]) -> None:
    """The generation config from_pretrained gives a generating model: the
    directory's generation_config.json, else one made from its config.json."""
    if not (hasattr(module, "can_generate") and module.can_generate()):
        return
    from transformers import GenerationConfig

    try:
        module.generation_config = GenerationConfig.from_pretrained(model_dir)
    except OSError:
        with contextlib.suppress(OSError):
            module.generation_config = GenerationConfig.from_pretrained(
                model_dir, config_file_name="config.json", _from_model_config=True
            )
