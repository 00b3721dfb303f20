"""NumPy models of the CUDA kernels in `cuda_kernels/`.

Each model computes what its kernel computes, decomposed the way the kernel
decomposes it, so that the decomposition is tested on any machine (against
the xxhash library, against plain slicing) and the kernels are tested against
the models on a GPU.

- `xxh3_64` follows `checksum.cu`: the 1 KiB blocks of a long input
  contribute to the eight accumulator lanes independently (one warp per block
  in the kernel, one NumPy row here), then each lane runs its chain of
  scrambles over the blocks in order (one thread per lane in the kernel).
- `gather_scatter` follows `gather_scatter.cu`: segments are split into
  pieces of at most `PIECE` bytes (one thread block per piece), and each
  piece into a head of single bytes up to the destination's 16-byte
  alignment, a body of 16-byte words when the source is equally aligned (else
  bytes), and a tail of bytes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from torpord.storage.checksum import CHUNK, combine

__all__ = [
    "PIECE",
    "Segment",
    "chunk_digests",
    "gather_scatter",
    "pieces",
    "slab_checksum",
    "xxh3_64",
]

M64 = (1 << 64) - 1

PRIME32_1 = 0x9E3779B1
PRIME32_2 = 0x85EBCA77
PRIME32_3 = 0xC2B2AE3D
PRIME64_1 = 0x9E3779B185EBCA87
PRIME64_2 = 0xC2B2AE3D27D4EB4F
PRIME64_3 = 0x165667B19E3779F9
PRIME64_4 = 0x85EBCA77C2B2AE63
PRIME64_5 = 0x27D4EB2F165667C5
PRIME_MX1 = 0x165667919E3779F9
PRIME_MX2 = 0x9FB21C651E98DF25

# XXH3's default 192-byte secret (the same bytes are in checksum.cu).
SECRET = bytes.fromhex(
    "b8fe6c3923a44bbe7c01812cf721ad1cded46de9839097db7240a4a4b7b3671f"
    "cb79e64eccc0e578825ad07dccff7221b8084674f743248ee03590e6813a264c"
    "3c2852bb91c300cb88d0658b1b532ea371644897a20df94e3819ef46a9deacd8"
    "a8fa763fe39c343ff9dcbbc7c70b4f1d8a51e04bcdb45931c89f7ec9d9787364"
    "eac5ac8334d3ebc3c581a0fffa1363eb170ddd51b7f0da49d316552629d4689e"
    "2b16be587d47a1fc8ff8b8d17ad031ce45cb3a8f95160428afd7fbcabb4b407e"
)
STRIPE = 64
STRIPES_PER_BLOCK = (len(SECRET) - STRIPE) // 8  # 16
BLOCK = STRIPE * STRIPES_PER_BLOCK  # 1024
INIT_ACC = (PRIME32_3, PRIME64_1, PRIME64_2, PRIME64_3, PRIME64_4, PRIME32_2, PRIME64_5, PRIME32_1)


def _r64(data: bytes | memoryview, at: int) -> int:
    return int.from_bytes(data[at : at + 8], "little")


def _r32(data: bytes | memoryview, at: int) -> int:
    return int.from_bytes(data[at : at + 4], "little")


def _fold(a: int, b: int) -> int:
    """The 128-bit product of a and b, its halves xored (mul128_fold64)."""
    p = a * b
    return (p & M64) ^ (p >> 64)


def _rotl(x: int, r: int) -> int:
    return ((x << r) | (x >> (64 - r))) & M64


def _avalanche(h: int) -> int:
    h ^= h >> 37
    h = (h * PRIME_MX1) & M64
    return h ^ (h >> 32)


def _xxh64_avalanche(h: int) -> int:
    h ^= h >> 33
    h = (h * PRIME64_2) & M64
    h ^= h >> 29
    h = (h * PRIME64_3) & M64
    return h ^ (h >> 32)


def _rrmxmx(h: int, length: int) -> int:
    h ^= _rotl(h, 49) ^ _rotl(h, 24)
    h = (h * PRIME_MX2) & M64
    h ^= (h >> 35) + length
    h = (h * PRIME_MX2) & M64
    return h ^ (h >> 28)


def _mix16(data: bytes | memoryview, at: int, secret_at: int) -> int:
    return _fold(
        _r64(data, at) ^ _r64(SECRET, secret_at), _r64(data, at + 8) ^ _r64(SECRET, secret_at + 8)
    )


def _short(data: bytes | memoryview) -> int:
    """Inputs of 0 to 240 bytes (one thread in the kernel)."""
    n = len(data)
    if n == 0:
        return _xxh64_avalanche(_r64(SECRET, 56) ^ _r64(SECRET, 64))
    if n <= 3:
        combined = (data[0] << 16) | (data[n >> 1] << 24) | data[n - 1] | (n << 8)
        return _xxh64_avalanche(combined ^ (_r32(SECRET, 0) ^ _r32(SECRET, 4)))
    if n <= 8:
        value = (_r32(data, n - 4) + (_r32(data, 0) << 32)) & M64
        return _rrmxmx(value ^ (_r64(SECRET, 8) ^ _r64(SECRET, 16)), n)
    if n <= 16:
        lo = _r64(data, 0) ^ (_r64(SECRET, 24) ^ _r64(SECRET, 32))
        hi = _r64(data, n - 8) ^ (_r64(SECRET, 40) ^ _r64(SECRET, 48))
        swapped = int.from_bytes(lo.to_bytes(8, "little"), "big")
        return _avalanche((n + swapped + hi + _fold(lo, hi)) & M64)
    acc = (n * PRIME64_1) & M64
    if n <= 128:
        for i in range(((n - 1) >> 5) + 1) if n > 32 else range(1):
            acc += _mix16(data, 16 * i, 32 * i) + _mix16(data, n - 16 * (i + 1), 32 * i + 16)
        return _avalanche(acc & M64)
    for i in range(8):
        acc += _mix16(data, 16 * i, 16 * i)
    acc = _avalanche(acc & M64)
    for i in range(8, n // 16):
        acc += _mix16(data, 16 * i, 16 * (i - 8) + 3)
    acc += _mix16(data, n - 16, 136 - 17)
    return _avalanche(acc & M64)


_SECRET_WORDS = np.frombuffer(SECRET, dtype="<u8", count=len(SECRET) // 8)
# The key of stripe s, lane i: the secret's 8 bytes at 8 * (s + i).
_STRIPE_KEYS = np.stack([np.frombuffer(SECRET[8 * s : 8 * s + 64], "<u8") for s in range(16)])
_SCRAMBLE_KEYS = [int(w) for w in np.frombuffer(SECRET[-64:], "<u8")]


def _stripe_sums(stripes: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Per row of stripes (shape rows, stripes, 8 lanes; u64), what the
    stripes add to each lane (mod 2^64): lane i gets lo32*hi32 of its keyed
    word, and the data word of lane i ^ 1."""
    keyed = stripes ^ keys
    products = (keyed & np.uint64(0xFFFFFFFF)) * (keyed >> np.uint64(32))
    swapped = stripes[..., [1, 0, 3, 2, 5, 4, 7, 6]]
    out: np.ndarray = (products + swapped).sum(axis=-2, dtype=np.uint64)
    return out


def _long(data: bytes | memoryview) -> int:
    """Inputs over 240 bytes: lane sums per 1 KiB block in parallel, then
    each lane's chain of scrambles over the blocks."""
    n = len(data)
    blocks = (n - 1) // BLOCK
    words = np.frombuffer(data, dtype="<u8", count=blocks * BLOCK // 8)
    with np.errstate(over="ignore"):
        sums = _stripe_sums(words.reshape(blocks, STRIPES_PER_BLOCK, 8), _STRIPE_KEYS)
    acc = list(INIT_ACC)
    for lane in range(8):  # one thread per lane in the kernel
        a, key = acc[lane], _SCRAMBLE_KEYS[lane]
        for b in range(blocks):
            a = (a + int(sums[b, lane])) & M64
            a = (((a ^ (a >> 47)) ^ key) * PRIME32_1) & M64
        acc[lane] = a
    # The last, partial block's whole stripes, then the input's last 64 bytes.
    start = blocks * BLOCK
    for s in range(((n - 1) - start) // STRIPE):
        _accumulate(acc, data, start + s * STRIPE, 8 * s)
    _accumulate(acc, data, n - STRIPE, len(SECRET) - STRIPE - 7)
    result = (n * PRIME64_1) & M64
    for i in range(4):
        result += _fold(
            acc[2 * i] ^ _r64(SECRET, 11 + 16 * i), acc[2 * i + 1] ^ _r64(SECRET, 19 + 16 * i)
        )
    return _avalanche(result & M64)


def _accumulate(acc: list[int], data: bytes | memoryview, at: int, secret_at: int) -> None:
    for i in range(8):
        value = _r64(data, at + 8 * i)
        keyed = value ^ _r64(SECRET, secret_at + 8 * i)
        acc[i ^ 1] = (acc[i ^ 1] + value) & M64
        acc[i] = (acc[i] + (keyed & 0xFFFFFFFF) * (keyed >> 32)) & M64


def xxh3_64(data: bytes | bytearray | memoryview) -> int:
    """XXH3-64 (seed 0, default secret), computed as checksum.cu does."""
    view = memoryview(data).cast("B")
    return _short(view) if len(view) <= 240 else _long(view)


def chunk_digests(data: bytes | bytearray | memoryview) -> list[int]:
    """What the checksum kernel writes: one digest per 1 MiB chunk."""
    view = memoryview(data).cast("B")
    return [xxh3_64(view[at : at + CHUNK]) for at in range(0, len(view), CHUNK)]


def slab_checksum(data: bytes | bytearray | memoryview) -> str:
    """torpord.storage.checksum.slab_checksum, by way of the kernel's model."""
    return combine(chunk_digests(data))


# -- gather/scatter --------------------------------------------------------------

PIECE = 64 << 10  # bytes one thread block copies
VECTOR = 16

Segment = tuple[int, int, int]  # (source offset, destination offset, length)


def pieces(segments: Sequence[Segment]) -> list[Segment]:
    """Segments split into pieces of at most PIECE bytes: the kernel's work
    items, one thread block each (so one big segment doesn't hold a launch)."""
    out = []
    for src, dst, length in segments:
        for at in range(0, length, PIECE):
            out.append((src + at, dst + at, min(PIECE, length - at)))
    return out


def piece_parts(src: int, dst: int, length: int) -> tuple[int, int, int]:
    """(head, words, tail): bytes copied one by one until the destination is
    16-byte aligned, 16-byte words (0 when the source is aligned differently:
    then the body goes byte by byte), and the bytes left. Addresses here are
    the real addresses in the kernel."""
    head = min(length, (-dst) % VECTOR)
    if (src + head) % VECTOR:
        return length, 0, 0
    words = (length - head) // VECTOR
    return head, words, length - head - words * VECTOR


def gather_scatter(
    src: np.ndarray, dst: np.ndarray, segments: Sequence[Segment], base: tuple[int, int] = (0, 0)
) -> None:
    """Copy each segment of `src` (u8) into `dst` (u8) as the kernel does.
    `base` gives the buffers' addresses (their alignment decides the parts)."""
    for s, d, length in pieces(segments):
        head, words, _ = piece_parts(base[0] + s, base[1] + d, length)
        dst[d : d + head] = src[s : s + head]
        body = words * VECTOR
        if body:
            src_words = src[s + head : s + head + body].view(np.uint32).reshape(-1, 4)
            dst[d + head : d + head + body].view(np.uint32).reshape(-1, 4)[:] = src_words
        dst[d + head + body : d + length] = src[s + head + body : s + length]
