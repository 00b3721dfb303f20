"""The CUDA backend: device slabs are VMM allocations, the HOST tier is the
pinned pool.

- DEVICE slabs (memory.py): `cuMemCreate` (pinned device memory, exportable
  as a POSIX fd), padded to the allocation granularity. The daemon maps a
  slab into its own address space only while it copies into or out of it
  (windows.py), so when a model sleeps and its engines have let go,
  `cuMemRelease` really returns the memory to the driver. Engines get a new
  fd per export (`cuMemExportToShareableHandle`) and map it themselves
  (torpor.agent.cuda).
- HOST slabs: ranges of the pinned pool (torpord.cuda.pinned).
- Devices (device.py): two streams each (one per direction) and pinned
  staging buffers.
- Copies between slabs (copies.py): `cuMemcpy*Async` in pieces with an event
  after each, so progress is reported as bytes land and a pinned range is
  reused only after its copies completed.
- The read path (writes.py): its bytes reach a device slab through pinned
  staging buffers (staging.py), a chunk's pieces by copies, the
  gather/scatter kernel or the batched copy, whichever was measured fastest
  on the device (calibration.py) for the chunk's piece size (methods.py: a
  pure choice).
- Checksums of device slabs run on the GPU (cuda_kernels/checksum.cu), or on
  the host without kernels (checksum.py); loader.py compiles the kernels
  once and says why they can't run where they can't.

This package is the Backend; torpord.cuda holds the CUDA building blocks it
is made of and that know nothing of slabs (driver calls, events, the pinned
pool, the kernels and their NumPy models).

NOT YET RUN ON A GPU: written against the driver API's documentation and
cuda-bindings 13. It runs in CI on an emulated driver (tests/emulator: the
same cuda-bindings calls, documented constraints enforced, no kernels);
tests/gpu/test_cuda_backend.py runs it on a device.
"""

from torpord.backends.cuda.backend import CudaBackend

__all__ = ["CudaBackend"]
