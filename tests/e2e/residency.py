"""What the daemon holds, checked from outside: its slabs read through
/proc/<pid>/fd and the bytes each layer must have, from the checkpoint files."""

from __future__ import annotations

import os
import time
from typing import Any

from .conftest import Daemon


def daemon_slabs(pid: int) -> dict[str, bytes]:
    """Every slab the daemon holds, read through /proc/<pid>/fd: name → bytes.
    The host backend names its memfds torpor:{model}:{layer}:{tier}; one memfd
    may be open twice (Python's mmap keeps a dup), so slabs are told apart by inode."""
    slabs: dict[str, bytes] = {}
    inodes: dict[str, int] = {}
    fd_dir = f"/proc/{pid}/fd"
    for fd in os.listdir(fd_dir):
        try:
            target = os.readlink(f"{fd_dir}/{fd}")
        except FileNotFoundError:
            continue
        if target.startswith("/memfd:torpor:"):
            name = target.removeprefix("/memfd:").removesuffix(" (deleted)")
            inode = os.stat(f"{fd_dir}/{fd}").st_ino
            assert inodes.setdefault(name, inode) == inode, f"two slabs named {name}"
            with open(f"{fd_dir}/{fd}", "rb") as f:
                slabs[name] = f.read()
    return slabs


def expected_layers(model: dict[str, Any]) -> dict[str, bytes]:
    """Each layer's slab as the checkpoint files say it must be."""
    files = [f["path"] for f in model["source"]["files"]]
    out = {}
    for layer in model["layers"]:
        slab = bytearray(int(layer["size_bytes"]))
        for t in layer["tensors"]:
            with open(files[t.get("file_index", 0)], "rb") as f:
                f.seek(int(t["file_offset"]))
                data = f.read(int(t.get("size_bytes", 0)))
            start = int(t.get("slab_offset", 0))
            slab[start : start + len(data)] = data
        out[layer["name"]] = bytes(slab)
    return out


def check_residency(d: Daemon, model_id: str) -> dict[str, Any]:
    """The daemon holds exactly the slabs GetModel reports, with the right bytes."""
    model = d.call(
        "torpor.v1.ModelService/GetModel", {"model_id": model_id, "view": "MODEL_VIEW_FULL"}
    )["model"]
    expected = expected_layers(model)
    want = {}
    for layer in model["layers"]:
        tier = layer["tier"].removeprefix("TIER_").lower()
        if tier not in ("source", "disk"):  # those hold no memory in the daemon
            want[f"torpor:{model_id}:{layer['name']}:{tier}"] = expected[layer["name"]]
    # Host pool slabs a wake left behind are handed back in the background:
    # give their last fds a moment to close.
    deadline = time.monotonic() + 10
    while sorted(slabs := daemon_slabs(d.proc.pid)) != sorted(want):
        if time.monotonic() > deadline:
            break
        time.sleep(0.02)
    assert sorted(slabs) == sorted(want)
    for name, data in want.items():
        assert slabs[name][: len(data)] == data, name
    return model
