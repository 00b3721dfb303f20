"""The core's test harness: a ModelManager on the real host backend, and byte checks."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from torpord.backends.host import HostBackend
from torpord.core.catalogue import Entry
from torpord.core.manager import ManagerSettings, ModelManager
from torpord.core.model import ModelSnapshot
from torpord.policies.settings import PolicySettings
from torpord.storage.diskcache import DATA_OFFSET, DiskCache
from torpord.storage.fileio import SYSTEM_IO, FileIO
from torpord.storage.layers import LayerPlan
from torpord.types import Tier

MiB = 2**20


def expected_slab(plan: LayerPlan, files: list[str]) -> bytes:
    """A layer's slab as it must be: each tensor's bytes read straight from
    its file at its aligned offset, zeros elsewhere."""
    out = bytearray(plan.size)
    for packed in plan.tensors:
        t = packed.tensor
        with open(files[t.file_index], "rb") as f:
            f.seek(t.file_offset)
            out[packed.slab_offset : packed.slab_offset + t.nbytes] = f.read(t.nbytes)
    return bytes(out)


class Harness:
    def __init__(
        self,
        tmp: Path,
        *,
        device_capacity: int = 64 * MiB,
        host_capacity: int = 64 * MiB,
        backend: type[HostBackend] = HostBackend,
        devices: int = 2,
        policy: PolicySettings | None = None,
        interval: float = 1.0,
        scrub_rate: int = 0,
        scrub_interval: float = 3600.0,
        catalogue: tuple[Entry, ...] = (),
    ):
        """`backend`: the host backend, or a subclass that plays a failing driver;
        `policy`: the policy layer's settings (its defaults if None), and
        `interval` the seconds between two rounds of its housekeeping;
        `scrub_rate` and `scrub_interval`: config [scrub] (0: no scrubber);
        `catalogue`: config [[catalogue]]."""
        self.backend = backend(
            devices=devices, device_capacity=device_capacity, host_capacity=host_capacity
        )
        settings = ManagerSettings(
            allowed_roots=(tmp.resolve(),),
            policy_interval=interval,
            scrub_rate=scrub_rate,
            scrub_interval=scrub_interval,
            catalogue=catalogue,
        )
        if policy is not None:
            settings = dataclasses.replace(settings, policy=policy)
        self.manager = ModelManager(self.backend, settings)

    def check_bytes(self, model_id: str) -> None:
        """Every slab the model holds has exactly the checkpoint's bytes, and
        sits in the tier its layer reports."""
        model = self.manager.registry.models[model_id]
        files = [f.path for f in model.checkpoint.files]
        for layer in model.layers:
            if layer.slab is None:
                if layer.disk is not None:  # its disk copy holds exactly those bytes
                    assert layer.tier is Tier.DISK
                    data = layer.disk.path.read_bytes()[DATA_OFFSET:]
                    assert data == expected_slab(layer.plan, files), layer.plan.name
                else:
                    assert layer.tier is Tier.SOURCE
                continue
            assert layer.slab.tier is layer.tier
            with self.backend.view(layer.slab) as view:
                assert bytes(view) == expected_slab(layer.plan, files), layer.plan.name

    def device_used(self) -> int:
        return sum(d.pool.used for d in self.backend.devices())

    async def close(self) -> None:
        await self.manager.close(1.0)
        self.backend.close()


def tiers(m: ModelSnapshot) -> list[Tier]:
    return [layer.tier for layer in m.layers]


def disk_harness(tmp: Path, capacity: int = 64 * MiB, io: FileIO = SYSTEM_IO, **kw: Any) -> Harness:
    """A harness with a disk cache (its entries read through `io`); `kw`: Harness's."""
    harness = Harness(tmp, **kw)
    harness.manager.disk = harness.manager.mover.disk = DiskCache(tmp / "cache", capacity, io=io)
    return harness
