"""Where a model's source is, and opening its files as an attacker can't steer.

The daemon runs as root and opens files on behalf of whoever may call it, so
a path is never trusted as named. Every file or directory is opened in two
steps:

1. `O_PATH` (no read, so no side effect: a FIFO does not block, a device's
   open routine never runs), following symlinks; then the *opened* object's
   real path (`/proc/self/fd/N`) must lie under an allowed root, and `fstat`
   must show a regular file (or a directory, for a checkpoint directory).
2. Only then is it opened for reading, through `/proc/self/fd/N`: the very
   inode that was checked, whatever the path names by now.

Symlinks that stay inside the roots (the Hugging Face cache's `snapshots/`
-> `blobs/` layout) work as before. Before step 1 a path is also resolved
as far as it exists (`resolve_path`, which never raises, unlike
`os.path.realpath` racing a changing component) and refused if that already
leads outside the roots, so no path outside them is ever opened, and the
answer for one does not depend on whether it exists.

Later reads (`reopen`) open a file again by the path it was recorded under
and go on only if it is still the same inode of the same size: a swapped
file, FIFO or device is refused before anything reads from it.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from torpord.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    TorporError,
    Unavailable,
)

__all__ = [
    "Opened",
    "inside",
    "open_entry",
    "open_source",
    "ordinal",
    "read_fd",
    "reopen",
    "resolve_path",
    "resolve_source",
]

# Linux gives up after 40 symlinks in one lookup (MAXSYMLINKS); so do we.
MAX_SYMLINKS = 40

_KINDS = {
    stat.S_IFIFO: "a FIFO",
    stat.S_IFSOCK: "a socket",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFDIR: "a directory",
    stat.S_IFLNK: "a symlink",
}


def ordinal(n: int) -> str:
    """1 -> "1st", 2 -> "2nd", 11 -> "11th", 23 -> "23rd"."""
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def inside(real: str, roots: Iterable[str]) -> bool:
    """Whether the absolute, resolved `real` is one of `roots` or below one."""
    return any(real == root or real.startswith(root.rstrip("/") + "/") for root in roots)


def resolve_path(path: str) -> str:
    """`path` (absolute) with every symlink that exists resolved, like
    `os.path.realpath(path)`, but never raising: a component that vanishes,
    stops being a symlink or can't be read while we look is taken as named
    (the open that follows says what is wrong with it). Only a first look:
    the open's own check decides."""
    out = "/"
    rest = [part for part in reversed(path.split("/")) if part]
    hops = 0
    while rest:
        name = rest.pop()
        if name == ".":
            continue
        if name == "..":
            out = os.path.dirname(out)
            continue
        candidate = os.path.join(out, name)
        try:
            target = os.readlink(candidate)
        except (OSError, ValueError):  # not a symlink (EINVAL), missing, unreadable
            out = candidate
            continue
        hops += 1
        if hops > MAX_SYMLINKS:  # a loop: the open will say ELOOP
            return os.path.join(candidate, *reversed(rest))
        if target.startswith("/"):
            out = "/"
        rest.extend(part for part in reversed(target.split("/")) if part)
    return out


def _outside(
    label: str, real: str, roots: Sequence[str], metadata: dict[str, object]
) -> PermissionDenied:
    return PermissionDenied(
        f"{label} resolves to {real}, which is outside the allowed roots ({', '.join(roots)})",
        reason="SOURCE_NOT_ALLOWED",
        metadata={**metadata, "real_path": real, "allowed_roots": ",".join(roots)},
    )


def resolve_source(source: str, roots: Sequence[Path]) -> str:
    """Check a Load's `source` string and return where it resolves (the
    model's source identity). Nothing is opened; `open_source` checks again
    what it really opens."""
    if not source:
        raise InvalidArgument("source is required", reason="SOURCE_REQUIRED")
    if "\0" in source:
        raise InvalidArgument("source must not contain a NUL byte", reason="INVALID_SOURCE_PATH")
    if not os.path.isabs(source):
        raise InvalidArgument(
            f"source must be an absolute path, got {source!r}",
            reason="SOURCE_NOT_ABSOLUTE",
            metadata={"source": source},
        )
    real = resolve_path(source)
    names = [str(root) for root in roots]
    if not inside(real, names):
        raise _outside(f"source {source}", real, names, {"source": source})
    return real


def os_error(label: str, err: OSError, metadata: dict[str, object]) -> TorporError:
    """The domain error for an OSError met opening or reading `label`."""
    text = err.strerror or type(err).__name__
    if isinstance(err, FileNotFoundError):
        return NotFound(f"{label}: no such file", reason="SOURCE_NOT_FOUND", metadata=metadata)
    if isinstance(err, PermissionError):
        return PermissionDenied(
            f"{label}: {text}", reason="SOURCE_PERMISSION_DENIED", metadata=metadata
        )
    if err.errno in (errno.ELOOP, errno.ENOTDIR, errno.ENAMETOOLONG, errno.EISDIR, errno.EINVAL):
        # A path that can't name a file: the caller's mistake, not a flaky disk.
        return InvalidArgument(f"{label}: {text}", reason="INVALID_SOURCE_PATH", metadata=metadata)
    return Unavailable(f"{label}: {text}", reason="SOURCE_READ_FAILED", metadata=metadata)


def _kind(mode: int) -> str:
    return _KINDS.get(stat.S_IFMT(mode), "not a regular file")


@dataclass
class Opened:
    """An `O_PATH` descriptor of a file or directory that passed the checks."""

    fd: int
    path: str  # the name to show: as the caller or the directory named it
    real: str  # where it really is
    st: os.stat_result

    def close(self) -> None:
        os.close(self.fd)


def _open_checked(
    path: str,
    *,
    dir_fd: int | None,
    prospective: str,
    shown: str,
    label: str,
    roots: Sequence[str],
    directory: bool,  # a directory will do too
    metadata: dict[str, object],
) -> Opened:
    if roots and not inside(prospective, roots):
        raise _outside(label, prospective, roots, metadata)
    try:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC, dir_fd=dir_fd)
    except (OSError, ValueError) as err:
        if isinstance(err, ValueError):  # an embedded NUL
            raise InvalidArgument(
                f"{label}: not a valid path", reason="INVALID_SOURCE_PATH", metadata=metadata
            ) from None
        raise os_error(label, err, metadata) from None
    try:
        real = os.readlink(f"/proc/self/fd/{fd}")
        st = os.fstat(fd)
        if roots and not inside(real, roots):  # the path changed since the first look
            raise _outside(label, real, roots, metadata)
        if st.st_nlink == 0:  # removed while we opened it
            raise NotFound(
                f"{label} was removed while it was being opened",
                reason="SOURCE_NOT_FOUND",
                metadata=metadata,
            )
        if not (stat.S_ISREG(st.st_mode) or (directory and stat.S_ISDIR(st.st_mode))):
            wanted = "a regular file or a directory" if directory else "a regular file"
            raise InvalidArgument(
                f"{label} is {_kind(st.st_mode)}, not {wanted}",
                reason="UNSUPPORTED_SOURCE",
                metadata=metadata,
            )
        return Opened(fd, shown, real, st)
    except BaseException:
        os.close(fd)
        raise


def open_source(given: str, roots: Sequence[str]) -> Opened:
    """Open the path a caller gave: a regular file or a directory under the
    roots (any check passes when `roots` is empty)."""
    return _open_checked(
        given,
        dir_fd=None,
        prospective=resolve_path(os.path.abspath(given)),
        shown=given,
        label=given,
        roots=roots,
        directory=True,
        metadata={"file": given},
    )


def open_entry(
    directory: Opened,
    name: str,
    roots: Sequence[str],
    *,
    label: str | None = None,
    metadata: dict[str, object] | None = None,
) -> Opened | None:
    """Open the regular file `name` (a plain name) of an opened directory;
    None if there is no such entry. `label` names it in errors when its name
    must not be shown (one read from a file); by default its path is."""
    path = os.path.join(directory.path, name)
    meta: dict[str, object] = {"file": path} if metadata is None else metadata
    try:
        return _open_checked(
            name,
            dir_fd=directory.fd,
            prospective=resolve_path(os.path.join(directory.real, name)),
            shown=path,
            label=label or path,
            roots=roots,
            directory=False,
            metadata=meta,
        )
    except NotFound:
        return None


def read_fd(opened: Opened) -> int:
    """A descriptor to read the checked file itself (not whatever its path
    names now). Not blocking: it is a regular file, and a lease someone holds
    on it makes the open fail rather than wait."""
    try:
        fd = os.open(f"/proc/self/fd/{opened.fd}", os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as err:
        raise os_error(opened.path, err, {"file": opened.path}) from None
    os.set_blocking(fd, True)
    return fd


def reopen(path: str, identity: tuple[int, int, int], flags: int, offset: int | None) -> int:
    """Open `path` for reading (with `flags`, e.g. O_DIRECT) if it is still
    the regular file whose (device, inode, size) is `identity`; else
    FailedPrecondition SOURCE_CHANGED. Nothing about what the path names now
    is shown unless it is that same file: it may be someone else's."""
    meta: dict[str, object] = {"file": path}
    needed = ""
    if offset is not None:
        meta["offset"] = offset
        needed = f" (needed at offset {offset})"
    try:
        probe = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except OSError as err:
        if err.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):  # a component changed
            missing = (
                "file is missing" if err.errno == errno.ENOENT else "path no longer leads to it"
            )
            raise FailedPrecondition(
                f"{path}: {missing}{needed}", reason="SOURCE_CHANGED", metadata=meta
            ) from None
        raise os_error(path, err, meta) from None
    try:
        st = os.fstat(probe)
        if not stat.S_ISREG(st.st_mode) or (st.st_dev, st.st_ino) != identity[:2]:
            # Someone else's bytes at these offsets: refuse rather than copy
            # garbage into a slab.
            raise FailedPrecondition(
                f"{path}: file was replaced (its inode changed) since it was opened{needed}",
                reason="SOURCE_CHANGED",
                metadata=meta,
            )
        if st.st_size != identity[2]:
            raise FailedPrecondition(
                f"{path}: size changed from {identity[2]} to {st.st_size} bytes since it"
                f" was opened{needed}",
                reason="SOURCE_CHANGED",
                metadata=meta,
            )
        fd = os.open(f"/proc/self/fd/{probe}", flags | os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as err:
        if err.errno == errno.EINVAL and flags & os.O_DIRECT:
            raise  # the caller falls back to buffered reads
        raise os_error(path, err, meta) from None
    finally:
        os.close(probe)
    os.set_blocking(fd, True)
    return fd
