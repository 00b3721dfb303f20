"""Test helpers for Torpor users: write safetensors files and small fake checkpoints.

Nothing here needs the daemon, numpy or a GPU:

    from torpor.testing import make_checkpoint
    path = make_checkpoint(tmp_path / "tiny", layers=4, shards=2)

or from a shell: `python -m torpor.testing make-checkpoint DIR --layers 8 --shards 2`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import random
import struct
from collections.abc import Mapping, Sequence

__all__ = ["make_checkpoint", "write_safetensors"]

# Item sizes in bits, as in safetensors 0.8, in the order of the reference
# crate's Dtype enum (increasing alignment): the writer sorts by it so our
# files come out byte-identical to `safetensors.serialize`. Kept here, not
# imported from the daemon, because this package must install without torpord.
_DTYPE_BITS: Mapping[str, int] = {
    "BOOL": 8,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E8M0": 8,
    "F8_E4M3FNUZ": 8,
    "F8_E5M2FNUZ": 8,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "C64": 64,
    "F64": 64,
    "I64": 64,
    "U64": 64,
}
_DTYPE_RANK = {name: rank for rank, name in enumerate(_DTYPE_BITS)}

Tensors = Mapping[str, tuple[str, Sequence[int], bytes]]


def _nbytes(name: str, dtype: str, shape: Sequence[int]) -> int:
    if dtype not in _DTYPE_BITS:
        raise ValueError(f"tensor {name!r}: unknown dtype {dtype!r}")
    bits = math.prod(shape) * _DTYPE_BITS[dtype]
    if bits % 8:
        raise ValueError(f"tensor {name!r}: {bits} bits of {dtype} is not a whole number of bytes")
    return bits // 8


def write_safetensors(
    path: str | os.PathLike[str],
    tensors: Tensors,
    metadata: Mapping[str, str] | None = None,
) -> pathlib.Path:
    """Write `tensors` (name -> (dtype, shape, raw little-endian bytes)) as safetensors.

    Like the reference writer, tensors are laid out by descending dtype
    alignment then name (so each stays aligned to its item size) and the
    header is padded with spaces to a multiple of 8 bytes: the output is
    byte-identical to `safetensors.serialize` for the same tensors.
    """
    order = sorted(tensors, key=lambda n: (-_DTYPE_RANK.get(tensors[n][0], -1), n))
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for name in order:
        dtype, shape, data = tensors[name]
        size = _nbytes(name, dtype, shape)
        if len(data) != size:
            raise ValueError(
                f"tensor {name!r}: {dtype} {list(shape)} needs {size} bytes, got {len(data)}"
            )
        header[name] = {
            "dtype": dtype,
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    out = pathlib.Path(path)
    with open(out, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name in order:
            f.write(tensors[name][2])
    return out


def _shapes(layers: int, hidden: int, vocab: int, naming: str) -> list[tuple[str, list[int]]]:
    """Tensor names and shapes, in forward order, for a tiny model."""
    h, inter = hidden, 2 * hidden
    if naming == "llama":
        block = [
            ("input_layernorm.weight", [h]),
            ("self_attn.q_proj.weight", [h, h]),
            ("self_attn.k_proj.weight", [h, h]),
            ("self_attn.v_proj.weight", [h, h]),
            ("self_attn.o_proj.weight", [h, h]),
            ("post_attention_layernorm.weight", [h]),
            ("mlp.gate_proj.weight", [inter, h]),
            ("mlp.up_proj.weight", [inter, h]),
            ("mlp.down_proj.weight", [h, inter]),
        ]
        return (
            [("model.embed_tokens.weight", [vocab, h])]
            + [(f"model.layers.{i}.{n}", s) for i in range(layers) for n, s in block]
            + [("model.norm.weight", [h]), ("lm_head.weight", [vocab, h])]
        )
    if naming == "gpt2":
        block = [
            ("ln_1.weight", [h]),
            ("ln_1.bias", [h]),
            ("attn.c_attn.weight", [h, 3 * h]),
            ("attn.c_attn.bias", [3 * h]),
            ("attn.c_proj.weight", [h, h]),
            ("attn.c_proj.bias", [h]),
            ("ln_2.weight", [h]),
            ("ln_2.bias", [h]),
            ("mlp.c_fc.weight", [h, 4 * h]),
            ("mlp.c_fc.bias", [4 * h]),
            ("mlp.c_proj.weight", [4 * h, h]),
            ("mlp.c_proj.bias", [h]),
        ]
        return (
            [("transformer.wte.weight", [vocab, h]), ("transformer.wpe.weight", [64, h])]
            + [(f"transformer.h.{i}.{n}", s) for i in range(layers) for n, s in block]
            + [("transformer.ln_f.weight", [h]), ("transformer.ln_f.bias", [h])]
        )
    raise ValueError(f"naming must be 'llama' or 'gpt2', not {naming!r}")


def make_checkpoint(
    path: str | os.PathLike[str],
    *,
    layers: int = 4,
    hidden: int = 64,
    vocab: int = 128,
    shards: int = 1,
    dtype: str = "F16",
    naming: str = "llama",
    seed: int = 0,
) -> pathlib.Path:
    """Write a small transformer-like checkpoint with deterministic random bytes.

    The bytes are arbitrary bit patterns (floats may be NaN or inf): good for
    checking that weights arrive intact, not for running a model.

    With `shards` > 1, `path` is a directory that gets
    `model-0000k-of-0000n.safetensors` files and `model.safetensors.index.json`.
    Otherwise a single file is written at `path` if it ends in `.safetensors`,
    else at `path/model.safetensors`. Returns the path to load (the file or
    the directory). The same seed gives the same tensor bytes whatever the
    shard count.
    """
    if layers < 0 or hidden < 1 or vocab < 1 or shards < 1:
        raise ValueError("layers must be >= 0; hidden, vocab and shards >= 1")
    rng = random.Random(seed)
    tensors: dict[str, tuple[str, Sequence[int], bytes]] = {}
    for name, shape in _shapes(layers, hidden, vocab, naming):
        tensors[name] = (dtype, shape, rng.randbytes(_nbytes(name, dtype, shape)))
    meta = {"format": "pt"}
    out = pathlib.Path(path)
    if shards == 1:
        if out.suffix == ".safetensors":
            out.parent.mkdir(parents=True, exist_ok=True)
            write_safetensors(out, tensors, meta)
            return out
        out.mkdir(parents=True, exist_ok=True)
        write_safetensors(out / "model.safetensors", tensors, meta)
        return out
    if out.suffix == ".safetensors":
        raise ValueError(f"{out}: a sharded checkpoint is a directory, not a .safetensors file")
    if shards > len(tensors):
        raise ValueError(f"cannot split {len(tensors)} tensors into {shards} shards")
    out.mkdir(parents=True, exist_ok=True)
    # Split in forward order into runs of roughly equal bytes, as HF's
    # sharding does, leaving at least one tensor for every later shard.
    names = list(tensors)
    total = sum(len(t[2]) for t in tensors.values())
    parts: list[list[str]] = [[] for _ in range(shards)]
    seen = 0
    k = 0
    for i, name in enumerate(names):
        remaining = len(names) - i
        if (
            parts[k]
            and k < shards - 1
            and (seen >= total * (k + 1) / shards or remaining == shards - 1 - k)
        ):
            k += 1
        parts[k].append(name)
        seen += len(tensors[name][2])
    weight_map: dict[str, str] = {}
    for k, part in enumerate(parts):
        filename = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        write_safetensors(out / filename, {n: tensors[n] for n in part}, meta)
        weight_map.update(dict.fromkeys(part, filename))
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m torpor.testing make-checkpoint DIR [...]`: print the path written."""
    parser = argparse.ArgumentParser(
        prog="python -m torpor.testing", description="Torpor test helpers."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    make = commands.add_parser("make-checkpoint", help="write a small fake checkpoint")
    make.add_argument("path", help="directory (or .safetensors file when --shards 1)")
    make.add_argument("--layers", type=int, default=4)
    make.add_argument("--hidden", type=int, default=64)
    make.add_argument("--vocab", type=int, default=128)
    make.add_argument("--shards", type=int, default=1)
    make.add_argument("--dtype", default="F16", choices=sorted(_DTYPE_BITS))
    make.add_argument("--naming", default="llama", choices=["llama", "gpt2"])
    make.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        out = make_checkpoint(
            args.path,
            layers=args.layers,
            hidden=args.hidden,
            vocab=args.vocab,
            shards=args.shards,
            dtype=args.dtype,
            naming=args.naming,
            seed=args.seed,
        )
    except (ValueError, OSError) as err:
        parser.error(str(err))
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
