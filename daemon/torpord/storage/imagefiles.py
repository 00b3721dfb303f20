"""The image manifests' files (torpord.storage.imageformat), in the disk cache.

Manifests live in `<root>/images/<manifest_name>`, a folder the cache's own
scan leaves to this module, and are reached as the cache's entries are
(torpord.storage.cachefiles): from the folder's fd, with O_NOFOLLOW and
O_NONBLOCK, after an lstat; the folder must be a directory of torpord's
user that no one else can write to. A manifest is written atomically
(a temporary file of ours, mode 0600, fsync, rename, fsync of the folder),
so a start finds either the whole manifest or none.

What is found there under a manifest's name but is not one this torpord
would write is removed by the caller (`remove`: a symbolic link is unlinked,
never followed); a temporary file of a write that never finished is removed
by `scan`; anything else is reported and left alone.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import stat

from torpord.storage.atomicfile import write_atomic
from torpord.storage.cachefiles import IMAGES, CacheDir, Skipped, printable
from torpord.storage.imageformat import MAX_MANIFEST_BYTES, BadManifest

__all__ = ["ImageFiles"]

_MANIFEST = re.compile(r"[0-9a-f]{32}\.json")
_TMP = re.compile(r"[0-9a-f]{32}\.[0-9a-f]{1,24}\.[0-9a-f]{1,24}\.tmp")
_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


class ImageFiles:
    """The manifests of one disk cache directory (blocking: worker threads)."""

    def __init__(self, files: CacheDir) -> None:
        self._files = files
        self.folder = files.root / IMAGES

    def path(self, name: str) -> str:
        """A manifest's path, for a log line."""
        return printable(self.folder / name)

    def write(self, name: str, data: bytes) -> None:
        """Write manifest `name` atomically (replacing one of that name);
        OSError leaves no new file behind."""
        assert _MANIFEST.fullmatch(name), name
        tmp = f"{name.removesuffix('.json')}.{os.getpid():x}.{secrets.token_hex(4)}.tmp"
        with self._files.subdir(IMAGES, create=True) as folder:
            write_atomic(folder, name, tmp, data)

    def remove(self, name: str) -> bool:
        """Unlink `name` (a link itself, never what it points to; a directory
        is left alone); False if there was nothing to remove. OSError if it
        could not be removed."""
        try:
            with self._files.subdir(IMAGES) as folder:
                st = os.stat(name, dir_fd=folder, follow_symlinks=False)
                if stat.S_ISDIR(st.st_mode):
                    return False
                os.unlink(name, dir_fd=folder)
                with contextlib.suppress(OSError):
                    os.fsync(folder)
                return True
        except FileNotFoundError:
            return False

    def scan(self) -> tuple[list[str], list[Skipped]]:
        """The names of the manifests to read, in order, and what else is
        there (temporary files of a write that never finished are removed)."""
        names: list[str] = []
        skipped: list[Skipped] = []
        try:
            with self._files.subdir(IMAGES) as folder:
                with os.scandir(folder) as it:
                    found = sorted(entry.name for entry in it)
                for name in found:
                    if _MANIFEST.fullmatch(name):
                        names.append(name)
                    elif _TMP.fullmatch(name):
                        skipped.append(self._drop_tmp(name, folder))
                    else:
                        skipped.append(Skipped(self.path(name), "not ours", False))
        except FileNotFoundError:  # (no image has been kept yet)
            return [], []
        except OSError as err:
            why = f"not a directory of ours: {err.strerror}"
            return [], [Skipped(printable(self.folder), why, False)]
        return names, skipped

    def _drop_tmp(self, name: str, folder: int) -> Skipped:
        path = self.path(name)
        try:
            st = os.stat(name, dir_fd=folder, follow_symlinks=False)
            if not stat.S_ISREG(st.st_mode):
                return Skipped(path, "not a regular file", False)
            os.unlink(name, dir_fd=folder)
        except OSError as err:
            return Skipped(path, f"a write that never finished: {err.strerror}", False)
        return Skipped(path, "a write that never finished", True)

    def read(self, name: str) -> bytes:
        """The bytes of manifest `name`: BadManifest if it is not a regular
        file or is larger than any manifest; OSError if it can't be read."""
        with self._files.subdir(IMAGES) as folder:
            st = os.stat(name, dir_fd=folder, follow_symlinks=False)
            if not stat.S_ISREG(st.st_mode):
                raise BadManifest("it is not a regular file")
            try:
                fd = os.open(name, _READ, dir_fd=folder)
            except OSError as err:
                if err.errno == errno.ELOOP:  # (swapped for a link since the lstat)
                    raise BadManifest("it is not a regular file") from None
                raise
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise BadManifest("it is not a regular file")
            if st.st_size > MAX_MANIFEST_BYTES:
                raise BadManifest(f"it is {st.st_size} bytes, more than {MAX_MANIFEST_BYTES}")
            chunks, got = [], 0
            while got <= MAX_MANIFEST_BYTES:  # (it may grow while read)
                chunk = os.read(fd, min(1 << 20, MAX_MANIFEST_BYTES + 1 - got))
                if not chunk:
                    break
                chunks.append(chunk)
                got += len(chunk)
            return b"".join(chunks)  # (loads refuses it if it grew too large)
        finally:
            os.close(fd)
