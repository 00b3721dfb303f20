"""The fingerprint of a Hugging Face model directory as transformers loads it:
what the image of `torpor.agent.hf_images.from_pretrained` is found by.

It covers what determines the loaded module's bytes:

- each weight file (`*.safetensors`, `*.bin`, `*.pt`, `*.pth`, `*.ckpt`,
  `*.gguf`), each remote-code file (`*.py`), `config.json` and each
  `*.index.json` at the top of the directory: name, size, mtime_ns, inode
  and device (of the file a symlink leads to: a Hub snapshot's blobs);
  plus a SHA-256 of the contents of `config.json` and the indexes;
- the transformers and torch versions, the model class's qualified name,
  the dtype asked for ("auto" when none), the other options given, and
  FORMAT, this entry point's own version.

What it does not cover, so an image may be stale without it changing:

- a weight file rewritten in place with the same size that keeps its inode
  and gets its old mtime back (`touch -d`, `os.utime`, some copy tools),
  or rewritten within the filesystem's mtime granularity: the weights are
  never read to fingerprint them. Change the file's mtime, or unload the
  image, after such a change. Metadata-only changes (chmod, chown, a new
  hard link: the ctime) do not change the fingerprint;
- files in subdirectories, and anything outside the directory that changes
  what transformers computes (environment variables, monkey patches,
  packages other than transformers and torch, code fetched from the Hub);
- who published: an image is as trustworthy as the processes allowed on
  the daemon's socket, any of which could publish under this fingerprint.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

__all__ = ["FORMAT", "fingerprint", "image_id", "torch_dtype_of"]

FORMAT = 1  # raise when what an image holds, or how it is found, changes
_WEIGHTS = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf")
_MAX_HASHED = 64 << 20  # config.json and indexes: far beyond any real one


def torch_dtype_of(dtype: Any) -> torch.dtype | None:
    """The torch dtype asked for (a torch.dtype or its name), None for
    "auto" (None or "auto"); ValueError for anything else."""
    if dtype is None or dtype == "auto":
        return None
    import torch

    value = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    if not isinstance(value, torch.dtype):
        raise ValueError(f"dtype must be a torch.dtype, its name or 'auto', not {dtype!r}")
    return value


def fingerprint(
    model_dir: str | os.PathLike[str],
    *,
    model_class: Any,
    dtype: Any = None,
    options: Mapping[str, Any] | None = None,
) -> str:
    """The image's fingerprint for loading `model_dir` with `model_class`
    under `dtype` and `options` (JSON values). Reads the directory's
    listing, its files' metadata, config.json and the indexes; never a
    weight file. ValueError for a directory that holds no config.json or
    no weights, or options that are not JSON."""
    import torch
    import transformers

    directory = Path(model_dir)
    if not directory.is_dir():
        raise ValueError(
            f"{os.fspath(model_dir)!r} is not a model directory (download a Hub model"
            " first, e.g. with huggingface_hub.snapshot_download)"
        )
    files = [_identity(directory, name) for name in sorted(os.listdir(directory)) if _counts(name)]
    names = {f["name"] for f in files}
    if "config.json" not in names or not any(n.endswith(_WEIGHTS) for n in names):
        raise ValueError(f"{os.fspath(model_dir)!r} holds no config.json, or no weight files")
    try:
        given = json.dumps(dict(options or {}), sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise ValueError(f"from_pretrained's options must be JSON values here ({err})") from None
    wanted = torch_dtype_of(dtype)
    dtype_name = "auto" if wanted is None else str(wanted).removeprefix("torch.")
    qualname = f"{model_class.__module__}.{model_class.__qualname__}"
    parts = {
        "format": FORMAT,
        "files": files,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "class": qualname,
        "dtype": dtype_name,
        "options": given,
    }
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()
    # Readable up front (`torporctl get` shows it); the digest holds everything.
    return f"hf/{FORMAT}/{qualname[-200:]}/{dtype_name}/{digest}"


def image_id(key: str) -> str:
    """The model id a new image with this fingerprint gets: "hf-" and 16 hex
    digits of its hash (the daemon's id rule)."""
    return "hf-" + hashlib.sha256(key.encode()).hexdigest()[:16]


def _counts(name: str) -> bool:
    return name == "config.json" or name.endswith((*_WEIGHTS, ".index.json", ".py"))


def _identity(directory: Path, name: str) -> dict[str, Any]:
    path = directory / name
    info = os.stat(path)  # (follows a symlink: the Hub's cache links to its blobs)
    if not stat.S_ISREG(info.st_mode):
        raise ValueError(f"{path} is not a regular file")
    found: dict[str, Any] = {
        "name": name,
        "size": info.st_size,
        "mtime_ns": info.st_mtime_ns,
        "inode": info.st_ino,
        "device": info.st_dev,
    }
    if name == "config.json" or name.endswith(".index.json"):
        found["sha256"] = _sha256(path)
    return found


def _sha256(path: Path) -> str:
    # Non-blocking: a FIFO put in a regular file's place must not hang us.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ValueError(f"{path} is not a regular file")
        if info.st_size > _MAX_HASHED:
            raise ValueError(f"{path} is {info.st_size} bytes; at most {_MAX_HASHED} expected")
        digest, total = hashlib.sha256(), 0
        while chunk := os.read(fd, 1 << 20):
            total += len(chunk)
            if total > _MAX_HASHED:  # (it grew while read)
                raise ValueError(f"{path} is over {_MAX_HASHED} bytes")
            digest.update(chunk)
        return digest.hexdigest()
    finally:
        os.close(fd)
