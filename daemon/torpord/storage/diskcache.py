"""The DISK tier: slabs kept in a local cache directory, with a byte budget.

An entry is one slab in one file, `<root>/<key[:2]>/<key>.slab`:

    magic (12 bytes) | meta length (u32 LE) | meta (JSON) | zeros to 4 KiB | slab bytes

The key hashes the source's identity (every file's path, size, modify time,
inode and header hash), the layer's name and size, so a changed source can
never be mistaken for the cached one. The meta repeats the key and holds the
slab's size and checksum (torpord.storage.checksum; an entry whose checksum
is of another definition is dropped at start). Entries are written atomically (a temporary
file, fsync, rename, fsync of the directory); a half-written one is only ever
a temporary file, removed at start. Every read checks the checksum: a
corrupted entry is deleted and refused (DATA_LOSS), never served.
"""

from __future__ import annotations

import errno
import json
import os
import struct
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import structlog
import xxhash

from torpord.errors import DataLoss, ResourceExhausted, Unavailable
from torpord.storage.checksum import KIND as checksum_kind
from torpord.storage.layers import LayerPlan
from torpord.storage.pipeline import SlabSink
from torpord.storage.safetensors import Checkpoint

__all__ = ["DiskCache", "DiskEntry", "cache_key"]

log = structlog.get_logger("torpord.storage")

MAGIC = b"TORPORSLAB\x00\x01"
DATA_OFFSET = 4096  # the slab's bytes start at a block boundary (O_DIRECT-ready)
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


def cache_key(checkpoint: Checkpoint, plan: LayerPlan) -> str:
    identity = {
        "files": [[f.path, f.size, f.mtime_ns, f.inode, f.header_hash] for f in checkpoint.files],
        "layer": plan.name,
        "size": plan.size,
        "tensors": [[p.tensor.name, p.slab_offset, p.tensor.nbytes] for p in plan.tensors],
    }
    return xxhash.xxh3_128_hexdigest(json.dumps(identity, sort_keys=True).encode())


class DiskCache:
    def __init__(self, root: Path, capacity: int) -> None:
        self.root = root
        self.capacity = capacity
        self._entries: dict[str, DiskEntry] = {}
        self._reserved = 0
        self._lock = threading.Lock()
        root.mkdir(parents=True, exist_ok=True)
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
        for path in self.root.glob("*/*"):
            if path.name.endswith(".tmp"):
                path.unlink(missing_ok=True)  # a write that never finished
                continue
            if not path.name.endswith(".slab"):
                continue
            try:
                entry = self._read_header(path)
            except (OSError, ValueError) as err:
                log.warning(
                    "disk cache: dropping an unreadable entry", path=str(path), error=str(err)
                )
                path.unlink(missing_ok=True)
                continue
            self._entries[entry.key] = entry

    @staticmethod
    def _read_header(path: Path) -> DiskEntry:
        with open(path, "rb") as f:
            head = f.read(DATA_OFFSET)
            file_bytes = os.fstat(f.fileno()).st_size
        if len(head) < len(MAGIC) + 4 or not head.startswith(MAGIC):
            raise ValueError("not a torpor slab file")
        (n,) = struct.unpack_from("<I", head, len(MAGIC))
        meta = json.loads(head[len(MAGIC) + 4 : len(MAGIC) + 4 + n])
        key, size, digest = meta["key"], int(meta["size"]), str(meta["checksum"])
        if meta.get("checksum_kind") != checksum_kind:
            raise ValueError(f"checksum of another definition ({meta.get('checksum_kind')})")
        if path.stem != key or file_bytes != DATA_OFFSET + size:
            raise ValueError(f"entry {path.name} is {file_bytes} bytes, its header says {size}")
        return DiskEntry(key, path, size, digest, file_bytes)

    def reserve(self, sizes: Iterable[int], protect: set[str]) -> int:
        """Take room for new entries of `sizes` slab bytes, evicting entries not in
        `protect` (the keys live models use) if need be; all or nothing."""
        asked = sum(DATA_OFFSET + s for s in sizes)
        with self._lock:
            free = (
                self.capacity - self._reserved - sum(e.file_bytes for e in self._entries.values())
            )
            if asked > free:
                victims = [e for k, e in self._entries.items() if k not in protect]
                victims.sort(key=lambda e: _atime(e.path))
                freed, chosen = 0, []
                for victim in victims:
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
                for victim in chosen:
                    del self._entries[victim.key]
                    victim.path.unlink(missing_ok=True)
            self._reserved += asked
        return asked

    def unreserve(self, nbytes: int) -> None:
        with self._lock:
            self._reserved -= nbytes

    def remove(self, entry: DiskEntry) -> None:
        """Forget an entry and delete its file, unless a newer entry for the same
        key has taken its place (then that one's file is not touched)."""
        with self._lock:
            current = self._entries.get(entry.key)
            if current is entry:
                del self._entries[entry.key]
            if current is None or current is entry:
                entry.path.unlink(missing_ok=True)

    # -- bytes (blocking: worker threads) ------------------------------------------

    def write(
        self,
        key: str,
        data: memoryview | Iterable[memoryview],
        checksum: str,
        reserved: int,
        size: int | None = None,
    ) -> DiskEntry:
        """Store a slab under key, atomically: its bytes as one view, or as
        views handed over in order (each valid until the next; `size` says how
        many bytes in all). On success `reserved` (this entry's share of a
        reserve()) becomes the entry's. On failure the reservation stays the
        caller's to give back. ENOSPC is DISK_FULL; a failed write leaves
        nothing behind."""
        if isinstance(data, memoryview):
            size = data.nbytes
            data = _slices(data)
        assert size is not None, "size is needed with pieces"
        folder = self.root / key[:2]
        final = folder / f"{key}.slab"
        tmp = folder / f"{key}.{os.getpid()}.{threading.get_ident()}.tmp"
        meta = json.dumps(
            {"key": key, "size": size, "checksum": checksum, "checksum_kind": checksum_kind}
        ).encode()
        head = MAGIC + struct.pack("<I", len(meta)) + meta
        try:
            folder.mkdir(exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                os.pwrite(fd, head + bytes(DATA_OFFSET - len(head)), 0)
                at = 0
                for piece in data:
                    done = 0
                    while done < piece.nbytes:
                        with piece[done:] as rest:
                            done += os.pwrite(fd, rest, DATA_OFFSET + at + done)
                    at += piece.nbytes
                if at != size:
                    raise RuntimeError(f"disk cache: {at} bytes written, {size} expected")
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, final)
            dfd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError as err:
            tmp.unlink(missing_ok=True)
            if err.errno in (errno.ENOSPC, errno.EDQUOT):
                raise ResourceExhausted(
                    f"disk cache {self.root}: the filesystem is full ({err.strerror})",
                    reason="DISK_FULL",
                    metadata={"asked": size, "path": str(self.root)},
                ) from None
            raise Unavailable(
                f"disk cache {self.root}: write failed: {err.strerror}",
                reason="DISK_WRITE_FAILED",
                metadata={"path": str(tmp)},
            ) from None
        except BaseException:  # (the bytes' source failed: a device copy, a stop)
            tmp.unlink(missing_ok=True)
            raise
        entry = DiskEntry(key, final, size, checksum, DATA_OFFSET + size)
        with self._lock:
            self._reserved -= reserved
            old = self._entries.get(key)
            self._entries[key] = entry
        if old is not None and old.path != final:
            old.path.unlink(missing_ok=True)
        return entry

    def read_into(self, entry: DiskEntry, sink: SlabSink, layer: str) -> None:
        """Fill a slab from its entry and check the checksum; a corrupt or missing
        entry is removed and refused with DATA_LOSS."""
        view = sink.view()
        try:
            with open(entry.path, "rb", buffering=0) as f:
                if os.fstat(f.fileno()).st_size != entry.file_bytes:
                    raise ValueError("its size changed")
                if view is not None:
                    got = 0
                    while got < entry.size:
                        with view[got:] as rest:
                            n = os.preadv(f.fileno(), [rest], DATA_OFFSET + got)
                        if n == 0:
                            raise ValueError(f"read {got} of {entry.size} bytes")
                        got += n
                else:
                    for at in range(0, entry.size, _PIECE):
                        piece = os.pread(f.fileno(), min(_PIECE, entry.size - at), DATA_OFFSET + at)
                        sink.write(at, memoryview(piece))
            digest = sink.checksum()
            if digest != entry.checksum:
                raise ValueError(f"checksum {digest}, expected {entry.checksum}")
        except OSError as err:  # the disk or the system failed, not the entry
            raise Unavailable(
                f"disk cache: reading the copy of layer {layer} failed: {err.strerror}",
                reason="DISK_READ_FAILED",
                metadata={"layer": layer, "path": str(entry.path)},
            ) from None
        except ValueError as err:
            self.remove(entry)
            raise DataLoss(
                f"the disk copy of layer {layer} ({entry.path}) is corrupt or gone ({err});"
                " it was removed and not served",
                reason="CACHE_CORRUPT",
                metadata={"layer": layer, "path": str(entry.path)},
            ) from None
        finally:
            if view is not None:
                view.release()


def _atime(path: Path) -> float:
    try:
        return path.stat().st_atime
    except OSError:
        return 0.0
