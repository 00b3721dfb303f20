"""Reading tensor bytes from a parsed checkpoint, and noticing when its files change.

Tensor bytes are read on demand with `preadv`, straight into the caller's
buffer, so a 100 GB checkpoint never passes through page-cache mappings that
we own. Every read first checks that the file is still the one that was
opened, so a replaced or truncated shard never lands garbage in a slab.
Both calls go through a `FileIO` (torpord.storage.fileio), the kernel's by
default, as the read pipeline's do.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import xxhash

from torpord.errors import FailedPrecondition, TorporError, Unavailable
from torpord.storage.fileio import SYSTEM_IO, FileIO, open_for_read
from torpord.storage.header import read_header
from torpord.storage.safetensors import Checkpoint, SourceFile, TensorInfo

__all__ = ["check_unchanged", "read_tensors"]


def _changes(src: SourceFile, max_header_bytes: int) -> str | None:
    try:
        fd = open_for_read(src, None)
    except TorporError as err:  # missing, replaced or resized: said without new values
        return err.message
    try:
        if os.fstat(fd).st_mtime_ns != src.mtime_ns:
            return f"{src.path}: mtime changed from {src.mtime_ns} ns"
        try:
            raw = read_header(fd, src.path, src.size, max_header_bytes)
        except TorporError as err:
            return f"{src.path}: header no longer readable: {err.message}"
    finally:
        os.close(fd)
    if xxhash.xxh3_64_hexdigest(raw) != src.header_hash:
        return f"{src.path}: header contents changed"
    return None


def check_unchanged(checkpoint: Checkpoint, *, max_header_bytes: int = 100 * 2**20) -> str | None:
    """Return None if every file still matches what was opened, else what changed."""
    found = [m for m in (_changes(f, max_header_bytes) for f in checkpoint.files) if m]
    return "; ".join(found) if found else None


def read_tensors(
    checkpoint: Checkpoint,
    items: Sequence[tuple[TensorInfo, int]],
    dest: memoryview,
    *,
    io: FileIO = SYSTEM_IO,
) -> int:
    """Read each tensor's bytes into `dest[dest_offset:dest_offset + nbytes]`,
    opening and reading its file through `io`.

    Reads go straight into `dest` (no intermediate copy) and release the GIL,
    so callers may run several of these on threads. Returns the bytes read.
    """
    out = dest if dest.format == "B" else dest.cast("B")
    for tensor, at in items:
        if at < 0 or at + tensor.nbytes > out.nbytes:
            raise ValueError(
                f"tensor {tensor.name!r} ({tensor.nbytes} bytes at {at}) does not "
                f"fit a {out.nbytes}-byte destination"
            )
    fds: dict[int, int] = {}
    total = 0
    try:
        for tensor, at in items:
            src = checkpoint.files[tensor.file_index]
            fd = fds.get(tensor.file_index)
            if fd is None:
                fd = fds[tensor.file_index] = io.open(src, False)
            done = 0
            while done < tensor.nbytes:
                offset = tensor.file_offset + done
                try:
                    n = io.preadv(fd, [out[at + done : at + tensor.nbytes]], offset)
                except OSError as err:
                    raise Unavailable(
                        f"{src.path}: read of tensor {tensor.name!r} failed at offset {offset}: "
                        f"{err.strerror}",
                        reason="SOURCE_READ_FAILED",
                        metadata={"file": src.path, "tensor": tensor.name, "offset": offset},
                    ) from err
                if n == 0:
                    raise FailedPrecondition(
                        f"{src.path}: file ends at offset {offset}, inside tensor "
                        f"{tensor.name!r} (truncated since it was opened)",
                        reason="SOURCE_CHANGED",
                        metadata={"file": src.path, "tensor": tensor.name, "offset": offset},
                    )
                done += n
            total += done
    finally:
        for fd in fds.values():
            os.close(fd)
    return total
