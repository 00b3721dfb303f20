"""Device backends: the one seam between the core and the memory it manages.

`host` emulates devices with memfd files and runs everywhere; `cuda` (a later
issue) drives NVIDIA GPUs. Only the cuda backend imports CuPy.
"""

from torpord.backends.base import Backend, DeviceInfo, PoolInfo, Slab, SlabOwner

__all__ = ["Backend", "DeviceInfo", "PoolInfo", "Slab", "SlabOwner"]
