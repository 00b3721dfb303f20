"""The DISK tier: slabs kept in a local cache directory, with a byte budget.

An entry is one slab in one file (its format is in
torpord.storage.cacheformat, how its files are opened safely in
torpord.storage.cachefiles). The key hashes the source's
identity (every file's path, size, modify time, inode and header hash), the
layer's name and size, so a changed source can never be mistaken for the
cached one. The meta repeats the key and holds the slab's size and checksum
(torpord.storage.checksum; an entry whose checksum is of another definition
is dropped at start). Entries are written atomically; a half-written one is
only ever a temporary file, removed at start, and so is anything in the
cache's layout that is not a valid entry.

Every read checks the checksum. An entry that is gone, corrupt or unreadable
for good (see cachefiles.entry_is_lost) is dropped from the index (and its
file removed, when it is a regular file of ours) and refused with DATA_LOSS,
never served; the caller falls back to the layer's source. A read that failed
because the system is failing right now (EMFILE, ENOMEM...) is UNAVAILABLE
and keeps the entry.

Room is taken with `reserve` (all or nothing, evicting the least recently
used copies no model uses) and given back with `release`; the entries written
under a reservation are not evicted until it is released, so a transition
never loses a copy it has just written.
"""

from __future__ import annotations

import errno
import json
import os
import threading
import time
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import structlog
import xxhash

from torpord.errors import DataLoss, ResourceExhausted, Unavailable
from torpord.storage.cachefiles import CacheDir, UnsafeCacheDir, entry_is_lost, printable
from torpord.storage.cacheformat import DATA_OFFSET, MAGIC, BadEntry, encode_head
from torpord.storage.fileio import SYSTEM_IO, FileIO
from torpord.storage.imagefiles import ImageFiles
from torpord.storage.layers import LayerPlan
from torpord.storage.pipeline import SlabSink
from torpord.storage.safetensors import Checkpoint

__all__ = [
    "DATA_OFFSET",
    "MAGIC",
    "DiskCache",
    "DiskEntry",
    "FilesystemFull",
    "Reservation",
    "UnsafeCacheDir",
    "cache_key",
]

log = structlog.get_logger("torpord.storage")

_PIECE = 16 * 2**20


def _slices(data: memoryview) -> Iterator[memoryview]:
    for at in range(0, data.nbytes, _PIECE):
        with data[at : at + _PIECE] as piece:
            yield piece


@dataclass(frozen=True)
class DiskEntry:
    key: str
    path: Path
    size: int  # slab bytes
    checksum: str
    file_bytes: int  # what it costs the budget
    inode: int  # of the file written (or found at start), so only that one is removed


@dataclass(eq=False)
class Reservation:
    """Room taken in the cache for new entries: the bytes not yet written, and
    the entries written under it (kept from eviction until it is released)."""

    left: int
    written: list[DiskEntry] = field(default_factory=list)
    released: bool = False


class FilesystemFull(ResourceExhausted):
    """The filesystem (or a quota) had no room for a write the budget allowed."""


# Each plan's key, by id (dropped with the plan): computing one walks every
# tensor of the layer, too much to do on the event loop at each transition
# of a model with hundreds of thousands of tensors.
_KEYS: dict[int, tuple[Checkpoint, str]] = {}


def cache_key(checkpoint: Checkpoint, plan: LayerPlan) -> str:
    """The key of a layer's copy: the source's identity and the layer's layout.
    Remembered per plan (see core.registry.prepare, which takes them on a worker)."""
    known = _KEYS.get(id(plan))
    if known is not None and known[0] is checkpoint:
        return known[1]
    key = _cache_key(checkpoint, plan)
    if known is None:
        weakref.finalize(plan, _KEYS.pop, id(plan), None)
    _KEYS[id(plan)] = (checkpoint, key)
    return key


def _cache_key(checkpoint: Checkpoint, plan: LayerPlan) -> str:
    identity: dict[str, object] = {
        "files": [[f.path, f.size, f.mtime_ns, f.inode, f.header_hash] for f in checkpoint.files],
        "layer": plan.name,
        "size": plan.size,
        "tensors": [[p.tensor.name, p.slab_offset, p.tensor.nbytes] for p in plan.tensors],
    }
    if checkpoint.fingerprint:  # an image has no files: its fingerprint is its identity
        identity["image"] = checkpoint.fingerprint
    return xxhash.xxh3_128_hexdigest(json.dumps(identity, sort_keys=True).encode())


class DiskCache:
    def __init__(self, root: Path, capacity: int, *, io: FileIO = SYSTEM_IO) -> None:
        """UnsafeCacheDir if `root` can't be used (see torpord.storage.cachefiles).
        Entries are read through `io`'s preadv (the read pipeline's seam: wrap
        it to pace or count the cache's reads, or to play a failing disk)."""
        self.root = root
        self.capacity = capacity
        self._io = io
        self._files = CacheDir(root)
        self.images = ImageFiles(self._files)  # (images kept in the cache: their manifests)
        self._entries: dict[str, DiskEntry] = {}
        self._last_use: dict[str, float] = {}  # key -> when last written or read (LRU)
        self._reserved = 0
        self._reservations: list[Reservation] = []
        self._lock = threading.Lock()
        self._scan()

    # -- bookkeeping -------------------------------------------------------------

    @property
    def used(self) -> int:
        with self._lock:
            return sum(e.file_bytes for e in self._entries.values()) + self._reserved

    def get(self, key: str) -> DiskEntry | None:
        with self._lock:
            return self._entries.get(key)

    def _scan(self) -> None:
        """Index the entries a previous run left; drop temporaries and junk."""
        try:
            found, skipped = self._files.scan()
        except OSError as err:
            raise UnsafeCacheDir(
                f"{printable(self.root)}: cannot list it: {err.strerror}"
            ) from None
        for item in skipped:
            log.warning(
                "disk cache: skipped what is not a valid entry",
                path=item.path,
                why=item.why,
                removed=item.removed,
            )
        for f in found:
            path = self.root / f.key[:2] / f"{f.key}.slab"
            self._entries[f.key] = DiskEntry(f.key, path, f.size, f.checksum, f.file_bytes, f.inode)
            self._last_use[f.key] = f.atime

    def _victims(self, protect: set[str]) -> list[DiskEntry]:
        """Entries that may be evicted, least recently used first (under the lock)."""
        pinned = {e.key for r in self._reservations for e in r.written}
        victims = [e for k, e in self._entries.items() if k not in protect and k not in pinned]
        victims.sort(key=lambda e: self._last_use.get(e.key, 0.0))
        return victims

    def _forget(self, entry: DiskEntry) -> None:
        """Drop an entry from the index and delete its file (under the lock)."""
        del self._entries[entry.key]
        self._last_use.pop(entry.key, None)
        self._files.remove_entry(entry.key, entry.inode)

    def check_room(self, sizes: Iterable[int], protect: set[str]) -> None:
        """DISK_FULL unless `reserve(sizes, protect)` could succeed now; takes nothing."""
        asked = sum(DATA_OFFSET + s for s in sizes)
        with self._lock:
            self._choose(asked, protect)

    def _choose(self, asked: int, protect: set[str]) -> list[DiskEntry]:
        """The victims that make room for `asked` bytes, or DISK_FULL (under the lock)."""
        free = self.capacity - self._reserved - sum(e.file_bytes for e in self._entries.values())
        if asked <= free:
            return []
        freed, chosen = 0, []
        for victim in self._victims(protect):
            if free + freed >= asked:
                break
            chosen.append(victim)
            freed += victim.file_bytes
        if free + freed < asked:
            raise ResourceExhausted(
                f"disk cache {self.root}: asked for {asked} bytes, {free} of"
                f" {self.capacity} free ({freed} more could be evicted)",
                reason="DISK_FULL",
                metadata={"asked": asked, "free": free, "budget": self.capacity},
            )
        return chosen

    def reserve(self, sizes: Iterable[int], protect: set[str]) -> Reservation:
        """Take room for new entries of `sizes` slab bytes, evicting entries not in
        `protect` (the keys live models use) if need be; all or nothing."""
        asked = sum(DATA_OFFSET + s for s in sizes)
        with self._lock:
            for victim in self._choose(asked, protect):
                self._forget(victim)
            self._reserved += asked
            reservation = Reservation(asked)
            self._reservations.append(reservation)
        return reservation

    def release(self, reservation: Reservation) -> None:
        """Give back what is left of a reservation; its entries may now be evicted
        (unless in use). Releasing twice is harmless."""
        with self._lock:
            if reservation.released:
                return
            reservation.released = True
            self._reserved -= reservation.left
            reservation.left = 0
            self._reservations.remove(reservation)

    def undo(self, reservation: Reservation, protect: set[str]) -> None:
        """Release `reservation` and remove the entries written under it, but
        those in `protect` (a model took them meanwhile) or written again
        under another reservation still held (a concurrent write of the key)."""
        self.release(reservation)
        with self._lock:
            pinned = {e.key for r in self._reservations for e in r.written}
        for entry in reservation.written:
            if entry.key not in protect and entry.key not in pinned:
                self.remove(entry)

    def make_room(self, needed: int, protect: set[str]) -> int:
        """After the filesystem (or a quota) said it is full: evict copies not in
        `protect`, least recently used first, worth at least `needed` bytes
        (what the filesystem says is free can't be trusted while other writes
        run); returns the bytes evicted."""
        evicted = 0
        with self._lock:
            for victim in self._victims(protect):
                if evicted >= needed:
                    break
                self._forget(victim)
                evicted += victim.file_bytes
        if evicted:
            log.warning(
                "disk cache: the filesystem was full; evicted copies no model uses",
                path=printable(self.root),
                evicted_bytes=evicted,
            )
        return evicted

    def remove(self, entry: DiskEntry) -> None:
        """Forget an entry and delete its file, unless a newer entry for the same
        key has taken its place (then that one's file is not touched)."""
        with self._lock:
            current = self._entries.get(entry.key)
            if current is entry:
                del self._entries[entry.key]
                self._last_use.pop(entry.key, None)
            if current is None or current is entry:
                self._files.remove_entry(entry.key, entry.inode)

    # -- bytes (blocking: worker threads) ------------------------------------------

    def write(
        self,
        key: str,
        data: memoryview | Iterable[memoryview],
        checksum: str,
        reservation: Reservation,
        size: int | None = None,
    ) -> DiskEntry:
        """Store a slab under key, atomically: its bytes as one view, or as
        views handed over in order (each valid until the next; `size` says how
        many bytes in all). On success the entry's share of `reservation`
        becomes the entry's, and the entry is kept from eviction until the
        reservation is released. ENOSPC and EDQUOT are FilesystemFull
        (DISK_FULL); a failed write leaves nothing behind."""
        if isinstance(data, memoryview):
            size = data.nbytes
            data = _slices(data)
        assert size is not None, "size is needed with pieces"
        try:
            inode = self._files.write_entry(key, encode_head(key, size, checksum), data, size)
        except OSError as err:
            if err.errno in (errno.ENOSPC, errno.EDQUOT):
                raise FilesystemFull(
                    f"disk cache {self.root}: the filesystem is full ({err.strerror})",
                    reason="DISK_FULL",
                    metadata={"asked": size, "path": str(self.root)},
                ) from None
            raise Unavailable(
                f"disk cache {self.root}: writing an entry failed: {err.strerror}",
                reason="DISK_WRITE_FAILED",
                metadata={"path": str(self.root / key[:2] / f"{key}.slab")},
            ) from None
        entry = DiskEntry(
            key, self.root / key[:2] / f"{key}.slab", size, checksum, DATA_OFFSET + size, inode
        )
        with self._lock:
            share = min(entry.file_bytes, reservation.left)
            reservation.left -= share
            self._reserved -= share
            reservation.written.append(entry)
            self._entries[key] = entry  # (an older entry of the key was the file replaced)
            self._last_use[key] = time.time()
        return entry

    def entries(self) -> list[DiskEntry]:
        with self._lock:
            return list(self._entries.values())

    @property
    def io(self) -> FileIO:
        """What entries are read through (the scrubber's reads too)."""
        return self._io

    def open_entry(self, entry: DiskEntry) -> int:
        """A read-only fd of the file at `entry`'s place, its slab's bytes from
        DATA_OFFSET (to check them); the caller closes it. OSError or BadEntry
        if it can't be had."""
        return self._files.open_entry(entry.key)

    def read_into(self, entry: DiskEntry, sink: SlabSink, layer: str) -> None:
        """Fill a slab from its entry and check the checksum. An entry gone,
        corrupt or unreadable for good is removed and refused with DATA_LOSS;
        a read the system failed right now is UNAVAILABLE and keeps it."""
        view = sink.view()
        try:
            fd = self._files.open_entry(entry.key)
            try:
                if os.fstat(fd).st_size != entry.file_bytes:
                    raise BadEntry("its size changed")
                if view is not None:
                    got = 0
                    while got < entry.size:
                        with view[got:] as rest:
                            n = self._io.preadv(fd, [rest], DATA_OFFSET + got)
                        if n == 0:
                            raise BadEntry(f"read {got} of {entry.size} bytes")
                        got += n
                else:
                    for at in range(0, entry.size, _PIECE):
                        # (a fresh buffer each time, as pread gave: a device
                        # sink may still be copying from the last one)
                        piece = bytearray(min(_PIECE, entry.size - at))
                        n = self._io.preadv(fd, [memoryview(piece)], DATA_OFFSET + at)
                        if n < len(piece):
                            raise BadEntry(f"read {at + n} of {entry.size} bytes")
                        sink.write(at, memoryview(piece))
            finally:
                os.close(fd)
            digest = sink.checksum()
            if digest != entry.checksum:
                raise BadEntry(f"checksum {digest}, expected {entry.checksum}")
        except OSError as err:
            if not entry_is_lost(err):  # the system failed right now, not the entry
                raise Unavailable(
                    f"disk cache: reading the copy of layer {layer} failed: {err.strerror}",
                    reason="DISK_READ_FAILED",
                    metadata={"layer": layer, "path": str(entry.path)},
                ) from None
            self.remove(entry)
            raise DataLoss(
                f"the disk copy of layer {layer} ({entry.path}) is gone or unreadable"
                f" ({err.strerror}); it was dropped from the cache",
                reason="CACHE_ENTRY_LOST",
                metadata={"layer": layer, "path": str(entry.path)},
            ) from None
        except BadEntry as err:
            self.remove(entry)
            raise DataLoss(
                f"the disk copy of layer {layer} ({entry.path}) is corrupt ({err});"
                " it was removed and not served",
                reason="CACHE_CORRUPT",
                metadata={"layer": layer, "path": str(entry.path)},
            ) from None
        finally:
            if view is not None:
                view.release()
        with self._lock:
            self._last_use[entry.key] = time.time()
