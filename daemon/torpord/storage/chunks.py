"""How the read pipeline cuts a checkpoint's tensor bytes into chunks.

The byte ranges the layers need are cut into aligned chunks of at most
`chunk_bytes`, in forward layer order (so early layers complete first); each
chunk is one read from one file, and its pieces say where each part of it
goes (which layer, which offset in that layer's slab).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from torpord.storage.layers import LayerPlan
from torpord.storage.safetensors import Checkpoint

__all__ = ["BLOCK", "Chunk", "Piece", "plan_chunks"]

# O_DIRECT wants the file offset, the length and the buffer address aligned to
# the device's logical block; 4 KiB covers every device in use.
BLOCK = 4096


@dataclass(frozen=True)
class Piece:
    layer: int  # index into the targets
    file_offset: int
    slab_offset: int
    length: int


@dataclass
class Chunk:
    file_index: int
    start: int  # aligned file offset
    end: int  # aligned end; may pass the end of the file
    pieces: list[Piece] = field(default_factory=list)


def plan_chunks(
    checkpoint: Checkpoint, plans: Sequence[LayerPlan], chunk_bytes: int
) -> list[Chunk]:
    """Cut the tensors' file ranges into aligned chunks, in forward layer order."""
    out: list[Chunk] = []
    for li, plan in enumerate(plans):
        current: Chunk | None = None
        for packed in sorted(
            plan.tensors, key=lambda p: (p.tensor.file_index, p.tensor.file_offset)
        ):
            t = packed.tensor
            done = 0
            while done < t.nbytes:
                offset = t.file_offset + done
                if (
                    current is None
                    or current.file_index != t.file_index
                    or offset >= current.end
                    or offset < current.start
                ):
                    start = offset - offset % BLOCK
                    current = Chunk(t.file_index, start, start + chunk_bytes)
                    out.append(current)
                length = min(t.nbytes - done, current.end - offset)
                current.pieces.append(Piece(li, offset, packed.slab_offset + done, length))
                done += length
    for chunk in out:
        last = max(p.file_offset + p.length for p in chunk.pieces)
        chunk.end = -(-last // BLOCK) * BLOCK  # read no further than needed
    return out
