"""tests/e2e/engine_worker.py as an engine on an emulated GPU:

    python tests/emulator/engine.py SOCKET MODEL [engine_worker flags]

The agent runs its CUDA side unchanged (import, reserve, map, set access,
unmap, remap at the same address) on the emulated driver. Only the tensors
differ: torch here has no CUDA, so the CPU computes in the GPU's place, on the
device memory at its device addresses (CUDAEMU_HOST_ACCESS opens them to this
process's CPU): each tensor is the same DLPack view of the same bytes, naming
the CPU instead of the GPU. Importing this module makes that so.
"""

from __future__ import annotations

import os
import runpy
import sys
from collections.abc import Sequence
from pathlib import Path

os.environ["CUDAEMU_HOST_ACCESS"] = "1"  # (read by the driver at each cuMemSetAccess)

import torch
from torpor.agent import cuda
from torpor.agent.dlpack import CPU, byte_tensor
from torpor.agent.mapping import tensor_span, torch_shape


def tensor(self: cuda.CudaSlabRange, offset: int, dtype: str, shape: Sequence[int]) -> torch.Tensor:
    tdtype, nbytes = tensor_span(dtype, shape, offset, self.size)
    if nbytes == 0:
        return torch.empty(torch_shape(dtype, shape), dtype=tdtype)
    raw = byte_tensor(self.address + offset, nbytes, CPU, 0)
    return raw.view(tdtype).reshape(torch_shape(dtype, shape))


cuda.CudaSlabRange.tensor = tensor  # type: ignore[method-assign]

if __name__ == "__main__":
    worker = Path(__file__).parent.parent / "e2e" / "engine_worker.py"
    sys.argv[0] = str(worker)
    runpy.run_path(str(worker), run_name="__main__")
