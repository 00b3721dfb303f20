"""The backend seam: slabs, pools with exact byte budgets, and copies.

A backend owns one pool per device (TIER_DEVICE) and one host pool
(TIER_HOST). Allocation is all-or-nothing: `allocate` either returns every
slab asked for or raises ResourceExhausted (asked, free, budget) having taken
nothing. Copies are blocking calls meant to run on worker threads; accounting
and allocation happen on the event loop's thread.
"""

from __future__ import annotations

import abc
import itertools
import threading
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field

import structlog

from torpord.errors import InvalidArgument, ResourceExhausted
from torpord.storage.checksum import slab_checksum
from torpord.storage.pipeline import PlainStaging, SlabSink, Staging
from torpord.types import Tier

__all__ = ["Backend", "Budget", "DeviceInfo", "PoolInfo", "Slab", "SlabOwner"]

log = structlog.get_logger("torpord.backend")

_slab_ids = itertools.count(1)
READ_OUT_PIECE = 32 << 20  # bytes per piece of Backend.read_out


@dataclass(frozen=True)
class SlabOwner:
    """Who an allocation belongs to (every allocation knows its owner and tag)."""

    model_id: str
    layer: str
    tag: str = "weights"


@dataclass(eq=False)
class Slab:
    """One contiguous allocation holding one layer. Identity is the object."""

    tier: Tier
    device: str | None  # device uuid for TIER_DEVICE, None for TIER_HOST
    size: int
    owner: SlabOwner
    id: int = field(default_factory=lambda: next(_slab_ids))
    freed: bool = False


@dataclass(frozen=True)
class PoolInfo:
    capacity: int
    used: int
    slab_count: int
    # Of `used`: freed slabs that revoked engines may still map (see
    # Backend.held_by); the memory returns when those processes exit.
    held: int = 0

    @property
    def free(self) -> int:
        return self.capacity - self.used


@dataclass(frozen=True)
class DeviceInfo:
    uuid: str
    index: int
    name: str
    pool: PoolInfo


class Budget:
    """Exact byte accounting for one pool; reservations are all-or-nothing."""

    def __init__(self, name: str, capacity: int) -> None:
        self.name = name
        self.capacity = capacity
        self.used = 0
        self.slab_count = 0
        self.held = 0
        self._lock = threading.Lock()

    def reserve(self, sizes: Sequence[int]) -> None:
        asked = sum(sizes)
        with self._lock:
            free = self.capacity - self.used
            if asked > free:
                held = (
                    f" ({self.held} held by engines that went away still mapping them, until"
                    " they let go or exit)"
                    if self.held
                    else ""
                )
                raise ResourceExhausted(
                    f"{self.name}: asked for {asked} bytes, {free} of {self.capacity} free" + held,
                    reason="OUT_OF_MEMORY",
                    metadata={
                        "pool": self.name,
                        "asked": asked,
                        "free": free,
                        "budget": self.capacity,
                        **({"held": self.held} if self.held else {}),
                    },
                )
            self.used += asked
            self.slab_count += len(sizes)

    def release(self, size: int) -> None:
        with self._lock:
            assert self.used >= size and self.slab_count > 0, "release without reserve"
            self.used -= size
            self.slab_count -= 1

    def hold(self, size: int) -> None:
        """A freed slab's memory stays in use (a revoked engine still maps it):
        keep it charged, as held, until release_held."""
        with self._lock:
            assert self.used - self.held >= size, "hold without reserve"
            self.held += size

    def release_held(self, size: int) -> None:
        with self._lock:
            assert self.held >= size and self.slab_count > 0, "release_held without hold"
            self.held -= size
            self.used -= size
            self.slab_count -= 1

    def info(self) -> PoolInfo:
        with self._lock:
            return PoolInfo(self.capacity, self.used, self.slab_count, self.held)


@dataclass(eq=False)
class _Held:
    """A freed slab whose memory some revoked engines may still map."""

    budget: Budget
    charge: int
    holders: set[tuple[int, str]]  # (pid, attachment)


class Backend(abc.ABC):
    """What the core needs from the memory it manages."""

    kind: str
    # Whether freeing a slab takes its memory back even from an engine that
    # still maps it (a revoked one). The host backend truncates the memfd, so
    # it does; CUDA cannot: memory a process imported lives until that process
    # releases it or exits.
    revocation_frees: bool = True

    def __init__(self) -> None:
        self._holders_lock = threading.Lock()
        # live slab id -> (pid, attachment) of gone engines that may map it
        self._holders: dict[int, set[tuple[int, str]]] = {}
        self._held: list[_Held] = []

    @abc.abstractmethod
    def devices(self) -> Sequence[DeviceInfo]: ...

    @abc.abstractmethod
    def host_pool(self) -> PoolInfo: ...

    def allocate(
        self, tier: Tier, device: str | None, requests: Sequence[tuple[int, SlabOwner]]
    ) -> list[Slab]:
        """Every slab asked for, or ResourceExhausted having taken nothing."""
        budget = self._budget(tier, device)
        charges = [self._charge(tier, device, size) for size, _ in requests]
        budget.reserve(charges)
        slabs: list[Slab] = []
        try:
            for size, owner in requests:
                slab = Slab(tier, device if tier is Tier.DEVICE else None, size, owner)
                self._create(slab)
                slabs.append(slab)
        except BaseException:
            for slab in slabs:
                self.free(slab)
            for charge in charges[len(slabs) :]:
                budget.release(charge)
            raise
        return slabs

    @abc.abstractmethod
    def _budget(self, tier: Tier, device: str | None) -> Budget:
        """The pool a slab of this tier (and device) is accounted in."""

    def _charge(self, tier: Tier, device: str | None, size: int) -> int:
        """The bytes a slab of `size` takes from its budget."""
        return size

    @abc.abstractmethod
    def _create(self, slab: Slab) -> None:
        """Make the slab's memory and hold it as live (its budget is reserved)."""

    @abc.abstractmethod
    def free(self, slab: Slab) -> None:
        """Return the slab's memory; freeing twice is a bug and raises.
        Implementations uncharge it with `_uncharge`."""

    def frees_on_revocation(self, slab: Slab) -> bool:
        """Whether freeing this slab takes its memory back even from an engine
        that still maps it (`revocation_frees`, unless the backend knows
        better of this slab)."""
        return self.revocation_frees

    def held_by(self, slab: Slab, pid: int, attachment: str = "") -> None:
        """An engine (process `pid`, through `attachment`) may still map the
        slab after it was revoked or went away. Where freeing can't take the
        memory back from it (`frees_on_revocation` is False), the slab's bytes
        stay charged to its pool after `free`, as held, until every such holder
        has let go (`let_go`) or its process has `exited`: the budget never
        counts memory free that the driver doesn't."""
        if self.frees_on_revocation(slab):
            return
        with self._holders_lock:
            if not slab.freed:  # (checked under the lock _uncharge takes)
                self._holders.setdefault(slab.id, set()).add((pid, attachment))

    def exited(self, pid: int) -> int:
        """Process `pid` is gone: what it held is free. Returns the bytes freed."""
        return self._drop(lambda holder: holder[0] == pid)

    def let_go(self, pid: int, attachment: str) -> int:
        """The engine unmapped what it held through `attachment`: that is free
        (unless others hold it too). Returns the bytes freed."""
        return self._drop(lambda holder: holder == (pid, attachment))

    def _drop(self, gone: Callable[[tuple[int, str]], bool]) -> int:
        freed = 0
        with self._holders_lock:
            for slab_id, holders in list(self._holders.items()):
                holders -= {h for h in holders if gone(h)}
                if not holders:
                    del self._holders[slab_id]
            for held in list(self._held):
                held.holders -= {h for h in held.holders if gone(h)}
                if not held.holders:
                    self._held.remove(held)
                    held.budget.release_held(held.charge)
                    freed += held.charge
        return freed

    def _uncharge(self, slab: Slab) -> None:
        """Mark the slab freed and give its charge back to its budget, or keep
        it as held while engines that went away may still map it (held_by)."""
        budget = self._budget(slab.tier, slab.device)
        charge = self._charge(slab.tier, slab.device, slab.size)
        with self._holders_lock:
            slab.freed = True
            holders = self._holders.pop(slab.id, None)
            if holders:
                budget.hold(charge)
                self._held.append(_Held(budget, charge, holders))
        if holders:
            log.warning(
                "freed slab still mapped by engines that went away; counted used until they"
                " let go or exit",
                slab=slab.id,
                bytes=charge,
                pids=sorted({pid for pid, _ in holders}),
            )
        else:
            budget.release(charge)

    @abc.abstractmethod
    def view(self, slab: Slab) -> memoryview:
        """A writable view of a host-addressable slab. The caller releases it."""

    @abc.abstractmethod
    def copy(self, src: Slab, dst: Slab, on_bytes: Callable[[int], None] | None = None) -> None:
        """Copy src's bytes into dst (blocking; run on a worker thread),
        calling on_bytes with each piece's size as it lands."""

    @abc.abstractmethod
    def export(self, slab: Slab, *, writable: bool = False) -> int:
        """A new file descriptor of the slab for one consumer (an engine), read-only
        where the backend allows it unless `writable` (the engine publishing an
        image into it). The caller sends it and closes it."""

    def seal(self, slab: Slab) -> None:
        """From now on no process can change the slab's bytes, where the
        backend can enforce it (blocking). A backend that can't (GPU memory
        whose importers set their own access) leaves it to the checksum,
        which verify checks. FailedPrecondition (STILL_MAPPED_WRITABLE) if a
        writer still maps it."""
        return

    @abc.abstractmethod
    def drain(self) -> None:
        """Wait until the memory of every slab freed so far is really returned
        (a backend may finish freeing in the background). Blocking."""

    @abc.abstractmethod
    def sink(self, slab: Slab) -> SlabSink:
        """Where the read pipeline writes a layer's bytes for this slab."""

    def staging(self) -> Staging:
        """Where the read pipeline's workers stage what they read before it
        goes to slabs without a host view (device memory): plain memory here;
        pinned on a GPU, so the copy to the device starts from it directly."""
        return PlainStaging()

    def read_out(self, slab: Slab) -> Generator[memoryview, None, None]:
        """The slab's bytes in order, in pieces, each valid until the next is
        asked for (blocking; run on a worker thread; close the generator if you
        stop early). Where a slab has no host view (device memory) the pieces
        come through host staging."""
        with self.view(slab) as view:
            for at in range(0, slab.size, READ_OUT_PIECE):
                with view[at : at + READ_OUT_PIECE] as piece:
                    yield piece

    def checksum(self, slab: Slab) -> str:
        """The slab's checksum (torpord.storage.checksum), hex (blocking; run on
        a worker thread). A GPU backend computes it where the slab is, with a
        kernel."""
        with self.view(slab) as view:
            return slab_checksum(view)

    @abc.abstractmethod
    def close(self) -> None:
        """Free every slab still held."""

    def resolve_device(self, device: str) -> str:
        """`devices/{uuid}` or a bare UUID, to a known device's UUID."""
        uuid = device.removeprefix("devices/")
        known = [d.uuid for d in self.devices()]
        if uuid not in known:
            raise InvalidArgument(
                f"unknown device {device!r}; this node has {', '.join(known)}",
                reason="UNKNOWN_DEVICE",
                metadata={"device": device},
            )
        return uuid

    def pick_device(self) -> str:
        """The device with the most free memory (ties: the lowest index)."""
        return max(self.devices(), key=lambda d: (d.pool.free, -d.index)).uuid
