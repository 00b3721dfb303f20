"""A small file replaced whole or not at all, in a directory held by fd
(blocking: worker threads): the disk cache's image manifests and the
activity history.

The bytes go to a new temporary file of the caller's name (O_EXCL: never
someone else's file, mode 0600), are synced, and the file is renamed over
`name`; the directory is synced so the rename survives a crash. A failure
leaves `name` as it was and removes the temporary file; one a crash left
is the caller's to remove (it knows its names).
"""

from __future__ import annotations

import contextlib
import os

__all__ = ["write_atomic"]

_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def write_atomic(folder: int, name: str, tmp: str, data: bytes) -> None:
    """Replace `name` in the directory `folder` with `data`, written first
    to `tmp` there. OSError leaves no new file behind."""
    fd = os.open(tmp, _CREATE, 0o600, dir_fd=folder)
    try:
        try:
            with memoryview(data) as view:
                done = 0
                while done < view.nbytes:
                    with view[done:] as rest:
                        done += os.write(fd, rest)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, name, src_dir_fd=folder, dst_dir_fd=folder)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=folder)
        raise
    os.fsync(folder)  # (the rename itself survives a crash)
