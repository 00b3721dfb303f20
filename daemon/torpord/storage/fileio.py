"""Where the read pipeline's bytes come from: its seam with the kernel.

The pipeline (and `read_tensors`, and the disk cache) make two calls on a
file: open it (buffered, or with O_DIRECT) and `preadv` from it. `FileIO` is
those two calls; `SYSTEM_IO`, the default, makes them on the kernel.
`ReadOptions.io` (the `io` argument of the others) takes any other `FileIO`,
usually one that wraps `SYSTEM_IO`, to stand between the daemon and its
disks: to pace or count a node's reads, or to play a disk that stalls,
fails, refuses O_DIRECT or shrinks under the reader (the tests do that
through this seam, never through the readers' internals).

A `FileIO` keeps the kernel's contract: `open` raises OSError where the
filesystem refuses (EINVAL for O_DIRECT, say), and `preadv` returns the bytes
read (0 at the end of the file), or raises OSError (BlockingIOError where
RWF_NOWAIT finds bytes that are not cached). It is called from the
pipeline's worker threads, several at once.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Sequence
from typing import Protocol

from torpord.errors import FailedPrecondition, Unavailable
from torpord.storage.safetensors import Checkpoint, SourceFile
from torpord.storage.sources import reopen

__all__ = [
    "SYSTEM_IO",
    "Buffer",
    "FileIO",
    "OpenFile",
    "SystemIO",
    "open_for_read",
    "read_failed",
    "truncated",
]

Buffer = memoryview | mmap.mmap


def open_for_read(src: SourceFile, offset: int | None, flags: int = 0) -> int:
    """A descriptor to read `src` (needed from `offset`, said in errors) if
    its path still leads to the very file that was opened and checked."""
    return reopen(src.path, src.identity, flags, offset)


class FileIO(Protocol):
    def open(self, src: SourceFile, direct: bool) -> int:
        """A descriptor for `src`, checked to still be the file that was
        validated (and a regular file); with O_DIRECT if `direct`."""

    def preadv(self, fd: int, buffers: Sequence[Buffer], offset: int, flags: int = 0) -> int:
        """os.preadv: read into `buffers` from `offset` of `fd`."""


class SystemIO:
    """The kernel's reads, as they are."""

    def open(self, src: SourceFile, direct: bool) -> int:
        return open_for_read(src, 0, os.O_DIRECT if direct else 0)

    def preadv(self, fd: int, buffers: Sequence[Buffer], offset: int, flags: int = 0) -> int:
        return os.preadv(fd, buffers, offset, flags)


SYSTEM_IO = SystemIO()


class OpenFile:
    """One source file's descriptors: buffered always, O_DIRECT where allowed."""

    def __init__(
        self, checkpoint: Checkpoint, index: int, direct: str, notes: list[str], io: FileIO
    ) -> None:
        self.src = checkpoint.files[index]
        self.io = io
        # Both opens check that the path still leads to the file that was
        # validated (and a regular file: nothing here can block on a FIFO).
        self.fd = io.open(self.src, False)
        self.direct_fd: int | None = None
        # Turned off (never the fds closed) while workers may be using them:
        # a closed number could be reused by another open and read from.
        self.direct_ok = False
        self.nowait_ok = direct == "auto"
        if direct != "off":
            try:
                self.direct_fd = io.open(self.src, True)
                self.direct_ok = True
            except OSError as err:
                self.no_direct(notes, err)
            except BaseException:
                os.close(self.fd)
                raise

    def no_direct(self, notes: list[str], err: OSError) -> None:
        """Under the run's lock."""
        if self.direct_ok or self.direct_fd is None:
            self.direct_ok = self.nowait_ok = False
            notes.append(
                f"O_DIRECT refused for {self.src.path} ({err.strerror}): buffered reads instead"
            )

    def close(self) -> None:
        os.close(self.fd)
        if self.direct_fd is not None:
            os.close(self.direct_fd)


def read_failed(f: OpenFile, offset: int, err: OSError) -> Unavailable:
    return Unavailable(
        f"{f.src.path}: read failed at offset {offset}: {err.strerror}",
        reason="SOURCE_READ_FAILED",
        metadata={"file": f.src.path, "offset": offset},
    )


def truncated(f: OpenFile, offset: int) -> FailedPrecondition:
    return FailedPrecondition(
        f"{f.src.path}: file ends at offset {offset}, before the tensor data it had when"
        " it was opened (truncated?)",
        reason="SOURCE_CHANGED",
        metadata={"file": f.src.path, "offset": offset},
    )
