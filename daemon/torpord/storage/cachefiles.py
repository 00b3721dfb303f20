"""The disk cache's files, opened as a careless or hostile hand may have left them.

Entries (torpord.storage.cacheformat) live in `<root>/<key[:2]>/<key>.slab`.
The cache directory must be a real directory (not a symbolic link) owned by
the daemon's user and writable by no one else, under parents that only root
or that user can change (a sticky world-writable parent such as /tmp is
fine, as for ssh's StrictModes): otherwise another user could swap entries
under a privileged daemon, or the daemon would write into another user's
directory. `CacheDir` refuses such a directory (UnsafeCacheDir) rather than
use it.

Inside it, every open starts from a directory fd and uses O_NOFOLLOW (a
symbolic link is never followed, nor unlinked through) and O_NONBLOCK (a
FIFO never blocks), after an lstat that refuses anything but a regular file
(a device node is never even opened). Only regular files with our names in
our two-level layout are ever removed; anything else found there is
reported and left alone. The folder `images` holds the manifests of images
kept in the cache (torpord.storage.imagefiles): the scan leaves it to them.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from torpord.storage.cacheformat import DATA_OFFSET, BadEntry, parse_head

_SUBDIR = re.compile(r"[0-9a-f]{2}")
_SLAB = re.compile(r"(?P<key>[0-9a-f]{32})\.slab")
# A write in progress: `<key>.<pid>.<random>.tmp` (older versions: `<key>.<pid>.<tid>.tmp`).
_TMP = re.compile(r"(?P<key>[0-9a-f]{32})\.[0-9a-f]{1,24}\.[0-9a-f]{1,24}\.tmp")

__all__ = [
    "IMAGES",
    "CacheDir",
    "Found",
    "Skipped",
    "UnsafeCacheDir",
    "entry_is_lost",
    "printable",
]

IMAGES = "images"  # (never an entries' folder: those are two hex digits)

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC

# What a failed open or read of an entry says about the entry rather than
# about the system right now: it is gone (ENOENT, ESTALE; a subdirectory
# gone or replaced: ENOTDIR), something else stands in its place (ELOOP: a
# symbolic link; EISDIR, ENXIO, ENODEV), or its blocks can't be read back
# (EIO, and what filesystems report for corrupt metadata: EUCLEAN, EBADMSG).
# Such an entry will not get better: it is dropped. Anything else (EMFILE,
# ENFILE, ENOMEM, EACCES, EAGAIN...) is the system failing right now: the
# entry is kept and may be read later.
_LOST = frozenset(
    {
        errno.ENOENT,
        errno.ESTALE,
        errno.ENOTDIR,
        errno.ELOOP,
        errno.EISDIR,
        errno.ENXIO,
        errno.ENODEV,
        errno.EIO,
        errno.EUCLEAN,
        errno.EBADMSG,
    }
)


class UnsafeCacheDir(Exception):
    """The configured cache directory can't be used safely; the message says why."""


def entry_is_lost(err: OSError) -> bool:
    """Whether `err`, from opening or reading an entry, means the entry is gone
    or unreadable for good (rather than the system failing right now)."""
    return err.errno in _LOST


def printable(path: Path | str) -> str:
    """A path for a log line: bytes that are not UTF-8 escaped, never raised on."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


@dataclass(frozen=True)
class Found:
    """A valid entry found in the cache directory."""

    key: str
    size: int
    checksum: str
    file_bytes: int
    inode: int
    atime: float


@dataclass(frozen=True)
class Skipped:
    """Something in the cache directory that is not a valid entry."""

    path: str  # printable
    why: str
    removed: bool


def _mode(st: os.stat_result) -> str:
    return f"{stat.S_IMODE(st.st_mode):04o}"


def _private(path: Path, st: os.stat_result, euid: int) -> str | None:
    """Why a directory of ours is not private to us (None if it is)."""
    if st.st_uid != euid:
        return f"{printable(path)} is owned by uid {st.st_uid}, not by torpord's uid {euid}"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"{printable(path)} is writable by other users (mode {_mode(st)})"
    return None


def _makedirs(path: Path) -> None:
    """Create `path` (0700) and missing parents (0755: never writable by others,
    whatever the umask)."""
    missing = []
    at = path
    while not os.path.lexists(at):
        missing.append(at)
        at = at.parent
    for i, folder in enumerate(reversed(missing)):
        with contextlib.suppress(FileExistsError):
            os.mkdir(folder, 0o700 if i == len(missing) - 1 else 0o755)


class CacheDir:
    """The cache's directory: checked once at start, then reached only through fds."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._euid = os.geteuid()
        try:
            _makedirs(root)
            st = os.lstat(root)
        except OSError as err:
            raise UnsafeCacheDir(f"{printable(root)}: cannot create it: {err.strerror}") from None
        if stat.S_ISLNK(st.st_mode):
            target = os.readlink(root)
            raise UnsafeCacheDir(
                f"{printable(root)} is a symbolic link (to {printable(target)});"
                " give the real directory"
            )
        if not stat.S_ISDIR(st.st_mode):
            raise UnsafeCacheDir(f"{printable(root)} is not a directory")
        problem = _private(root, st, self._euid)
        if problem:
            raise UnsafeCacheDir(problem)
        self._check_parents()
        self._id = (st.st_dev, st.st_ino)

    def _check_parents(self) -> None:
        # Whoever may rename a parent may swap the whole cache for theirs.
        real = Path(os.path.realpath(self.root.parent))
        for folder in (real, *real.parents):
            try:
                st = os.stat(folder)
            except OSError as err:
                raise UnsafeCacheDir(
                    f"{printable(self.root)}: its parent {printable(folder)}: {err.strerror}"
                ) from None
            if st.st_uid not in (0, self._euid):
                raise UnsafeCacheDir(
                    f"{printable(self.root)}: its parent {printable(folder)} is owned by"
                    f" uid {st.st_uid}, neither root nor torpord's uid {self._euid}"
                )
            if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not st.st_mode & stat.S_ISVTX:
                raise UnsafeCacheDir(
                    f"{printable(self.root)}: its parent {printable(folder)} is writable by"
                    f" other users (mode {_mode(st)}) and not sticky"
                )

    # -- directories -------------------------------------------------------------

    def _open_root(self) -> int:
        fd = os.open(self.root, _DIR)
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != self._id:
            os.close(fd)
            # (The entries we know of are not in the directory found there.)
            raise OSError(errno.ENOENT, "the cache directory was replaced since start")
        return fd

    @contextlib.contextmanager
    def opened(self) -> Iterator[int]:
        """An fd of the directory itself, still the one checked at start."""
        fd = self._open_root()
        try:
            yield fd
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def subdir(self, name: str, *, create: bool = False) -> Iterator[int]:
        """An fd of `<root>/<name>`, a directory of ours (ELOOP if a symbolic
        link, ENOTDIR if not a directory, EPERM if others could write to it)."""
        root = self._open_root()
        try:
            if create:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(name, 0o700, dir_fd=root)
            fd = os.open(name, _DIR, dir_fd=root)
        finally:
            os.close(root)
        try:
            problem = _private(self.root / name, os.fstat(fd), self._euid)
            if problem:
                raise OSError(errno.EPERM, problem)
            yield fd
        finally:
            os.close(fd)

    # -- entries -------------------------------------------------------------------

    @staticmethod
    def _open_regular(name: str, folder: int) -> int:
        """Open a regular file for reading; BadEntry for anything else."""
        st = os.stat(name, dir_fd=folder, follow_symlinks=False)
        if not stat.S_ISREG(st.st_mode):
            raise BadEntry("not a regular file")
        fd = os.open(name, _READ, dir_fd=folder)
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):  # (swapped since the lstat)
            os.close(fd)
            raise BadEntry("not a regular file")
        return fd

    def open_entry(self, key: str) -> int:
        """A read-only fd of key's entry file (OSError or BadEntry if it can't be had)."""
        with self.subdir(key[:2]) as folder:
            return self._open_regular(f"{key}.slab", folder)

    def remove_entry(self, key: str, inode: int) -> bool:
        """Unlink key's entry file if it is still the regular file `inode`
        (a newer entry, or something planted there, is left alone)."""
        try:
            with self.subdir(key[:2]) as folder:
                name = f"{key}.slab"
                st = os.stat(name, dir_fd=folder, follow_symlinks=False)
                if not stat.S_ISREG(st.st_mode) or st.st_ino != inode:
                    return False
                os.unlink(name, dir_fd=folder)
                return True
        except OSError:
            return False

    def write_entry(self, key: str, head: bytes, pieces: Iterable[memoryview], size: int) -> int:
        """Write an entry atomically (a temporary file of ours, fsync, rename,
        fsync of the directory); its inode. OSError (or whatever `pieces`
        raised) leaves no file behind."""
        name, tmp = f"{key}.slab", f"{key}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        with self.subdir(key[:2], create=True) as folder:
            fd = os.open(tmp, _CREATE, 0o600, dir_fd=folder)  # (O_EXCL: never another's file)
            renamed, inode = False, os.fstat(fd).st_ino
            try:
                try:
                    _write_all(fd, head, 0)
                    at = DATA_OFFSET
                    for piece in pieces:
                        at += _write_all(fd, piece, at)
                    if at != DATA_OFFSET + size:
                        raise RuntimeError(
                            f"disk cache: {at - DATA_OFFSET} bytes written, {size} expected"
                        )
                    os.fsync(fd)
                finally:
                    os.close(fd)
                os.replace(tmp, name, src_dir_fd=folder, dst_dir_fd=folder)
                renamed = True
                os.fsync(folder)
            except BaseException:
                with contextlib.suppress(OSError):
                    if not renamed:
                        os.unlink(tmp, dir_fd=folder)
                    elif os.stat(name, dir_fd=folder, follow_symlinks=False).st_ino == inode:
                        os.unlink(name, dir_fd=folder)  # (renamed, but not made durable)
                raise
        return inode

    # -- the scan at start ---------------------------------------------------------

    def scan(self) -> tuple[list[Found], list[Skipped]]:
        """Every valid entry, and everything else found (removed where it is a
        regular file with one of our names in our layout: a write that never
        finished, an entry that is not valid)."""
        found: list[Found] = []
        skipped: list[Skipped] = []
        root = self._open_root()
        try:
            with os.scandir(root) as it:
                names = sorted(entry.name for entry in it)
            for name in names:
                if name == IMAGES:
                    continue
                if not _SUBDIR.fullmatch(name):
                    skipped.append(Skipped(printable(self.root / name), "not ours", False))
                    continue
                try:
                    with self.subdir(name) as folder:
                        self._scan_subdir(name, folder, found, skipped)
                except OSError as err:
                    skipped.append(
                        Skipped(
                            printable(self.root / name),
                            f"not a directory of ours: {err.strerror}",
                            False,
                        )
                    )
        finally:
            os.close(root)
        return found, skipped

    def _scan_subdir(
        self, sub: str, folder: int, found: list[Found], skipped: list[Skipped]
    ) -> None:
        with os.scandir(folder) as it:
            names = sorted(entry.name for entry in it)
        for name in names:
            path = printable(self.root / sub / name)
            slab, tmp = _SLAB.fullmatch(name), _TMP.fullmatch(name)
            match = slab or tmp
            if match is None:
                skipped.append(Skipped(path, "not ours", False))
                continue
            try:
                st = os.stat(name, dir_fd=folder, follow_symlinks=False)
            except OSError as err:
                skipped.append(Skipped(path, f"cannot stat: {err.strerror}", False))
                continue
            if not stat.S_ISREG(st.st_mode):
                skipped.append(Skipped(path, "not a regular file", False))
                continue
            if tmp is not None:
                skipped.append(Skipped(path, "a write that never finished", _unlink(name, folder)))
                continue
            if not match["key"].startswith(sub):
                skipped.append(Skipped(path, "an entry in the wrong folder", _unlink(name, folder)))
                continue
            try:
                found.append(self._read_entry(match["key"], name, folder))
            except BadEntry as err:
                skipped.append(Skipped(path, str(err), _unlink(name, folder)))
            except OSError as err:
                removed = entry_is_lost(err) and _unlink(name, folder)
                skipped.append(Skipped(path, f"unreadable: {err.strerror}", removed))

    def _read_entry(self, key: str, name: str, folder: int) -> Found:
        fd = self._open_regular(name, folder)
        try:
            st = os.fstat(fd)
            head = os.pread(fd, DATA_OFFSET, 0)
        finally:
            os.close(fd)
        size, checksum = parse_head(head, key, st.st_size)
        return Found(key, size, checksum, st.st_size, st.st_ino, st.st_atime)


def _unlink(name: str, folder: int) -> bool:
    try:
        os.unlink(name, dir_fd=folder)
        return True
    except OSError:
        return False


def _write_all(fd: int, data: bytes | memoryview, at: int) -> int:
    with memoryview(data) as view:
        done = 0
        while done < view.nbytes:
            with view[done:] as rest:
                done += os.pwrite(fd, rest, at + done)
        return done
