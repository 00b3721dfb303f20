"""The fingerprint of a vLLM engine's final weights: everything that
determines their bytes, computed before anything is loaded.

Two starts with the same fingerprint must produce the same tensors, bit for
bit; so it covers the checkpoint (each file's identity by `stat`: device,
inode, size and modification time, never its contents, so computing it
reads nothing but `config.json`), the model's configuration as vLLM sees it
(architecture, overrides, dtype, quantization, runner), the sharding (tensor-
and pipeline-parallel size and rank; expert parallelism), the kv-cache
dtype, the platform and what of the CPU or GPU changes the processed bytes
(vLLM's CPU build repacks MoE experts for AMX or not; a GPU's compute
capability picks kernels and layouts), and the versions of vLLM, torch and
this plugin. Anything unknown makes a fingerprint differ, never match.

The daemon sees an opaque printable string: a readable prefix and a hash.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from importlib import metadata
from typing import Any

__all__ = ["PLUGIN_SCHEME", "describe", "files_identity", "fingerprint_of", "model_id_of"]

PLUGIN_SCHEME = 1  # bump when what the plugin publishes changes shape


def files_identity(directory: str) -> list[list[Any]]:
    """Each regular file directly in `directory` (hidden ones aside): name,
    device, inode, size, mtime in ns; and the hash of `config.json`'s bytes.
    Symlinks are followed (the Hugging Face cache links to its blobs)."""
    out: list[list[Any]] = []
    for name in sorted(os.listdir(directory)):
        if name.startswith("."):
            continue
        try:
            st = os.stat(os.path.join(directory, name))
        except FileNotFoundError:
            continue  # (a dangling link)
        if not os.path.isfile(os.path.join(directory, name)):
            continue
        out.append([name, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns])
    config = os.path.join(directory, "config.json")
    if os.path.isfile(config):
        with open(config, "rb") as f:
            out.append(["config.json#sha256", hashlib.sha256(f.read()).hexdigest()])
    return out


def _version(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "unknown"


def _platform() -> dict[str, Any]:
    import torch
    from vllm.platforms import current_platform

    out: dict[str, Any] = {"device_type": current_platform.device_type, "torch": torch.__version__}
    if current_platform.is_cpu():
        out["cpu_arch"] = str(current_platform.get_cpu_architecture())
        out["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
        out["amx"] = bool(torch.cpu._is_amx_tile_supported())
        out["avx512_bf16"] = bool(torch.cpu._is_avx512_bf16_supported())
        out["gemm"] = "unpacked"  # (torpor.vllm.weights.unpacked_cpu_gemm)
    else:
        capability = current_platform.get_device_capability()
        out["capability"] = None if capability is None else list(capability)
        out["device_name"] = current_platform.get_device_name()
    return out


def _sharding(vllm_config: Any) -> dict[str, Any]:
    from vllm.distributed import (
        get_pp_group,
        get_tensor_model_parallel_rank,
        get_tensor_model_parallel_world_size,
    )

    parallel = vllm_config.parallel_config
    out: dict[str, Any] = {
        "tp": [get_tensor_model_parallel_world_size(), get_tensor_model_parallel_rank()],
        "pp": [get_pp_group().world_size, get_pp_group().rank_in_group],
        "ep": bool(getattr(parallel, "enable_expert_parallel", False)),
    }
    if out["ep"]:  # experts are sharded over data-parallel ranks too
        out["dp"] = [parallel.data_parallel_size, parallel.data_parallel_rank]
    return out


def describe(vllm_config: Any, model_config: Any, directory: str) -> dict[str, Any]:
    """What the fingerprint hashes (for logs and tests)."""
    import vllm

    hf_config = model_config.hf_config
    quant_config = getattr(hf_config, "quantization_config", None)
    return {
        "scheme": PLUGIN_SCHEME,
        "torpor": _version("torpor"),
        "vllm": vllm.__version__,
        "model": str(model_config.model),
        "revision": model_config.revision,
        "files": files_identity(directory),
        "architectures": list(getattr(hf_config, "architectures", None) or []),
        "hf_config": hf_config.to_json_string(use_diff=False),
        "dtype": str(model_config.dtype),
        "quantization": model_config.quantization,
        "quantization_config": json.dumps(quant_config, sort_keys=True, default=str),
        "runner": [
            str(getattr(model_config, "runner_type", "")),
            str(getattr(model_config, "convert_type", "")),
        ],
        "kv_cache_dtype": str(getattr(vllm_config.cache_config, "cache_dtype", "")),
        "sharding": _sharding(vllm_config),
        "platform": _platform(),
    }


def fingerprint_of(description: dict[str, Any]) -> str:
    """The opaque string the daemon indexes images by."""
    digest = hashlib.sha256(
        json.dumps(description, sort_keys=True, default=str).encode()
    ).hexdigest()
    arch = ",".join(description["architectures"]) or "model"
    tp_size, tp_rank = description["sharding"]["tp"]
    return f"vllm-{description['vllm']}/{arch}/tp{tp_size}r{tp_rank}/{digest}"


def model_id_of(description: dict[str, Any], fingerprint: str, chosen: str | None) -> str:
    """The image's id: `chosen` (with the rank appended when there are
    several), else the checkpoint's directory name and the fingerprint's hash."""
    tp_size, tp_rank = description["sharding"]["tp"]
    pp_size, pp_rank = description["sharding"]["pp"]
    rank = f"-tp{tp_rank}" if tp_size > 1 else ""
    rank += f"-pp{pp_rank}" if pp_size > 1 else ""
    if chosen:
        return f"{chosen}{rank}"
    base = re.sub(r"[^A-Za-z0-9._-]", "-", os.path.basename(str(description["model"]).rstrip("/")))
    return f"vllm-{base[:60].strip('.-_') or 'model'}-{fingerprint[-12:]}{rank}"
