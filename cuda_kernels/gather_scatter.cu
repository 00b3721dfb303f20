// Many (source, destination, length) copies in one launch: packing tensors
// into a slab with alignment padding, moving a layer's scattered tensors.
// torpord/cuda/reference.py is this kernel's NumPy model.
//
// The host splits segments into pieces of at most 64 KiB (the work items);
// each thread block copies pieces, grid-stride. A piece is copied as a head
// of single bytes up to the destination's alignment, a body of the widest
// words both pointers then share (16 bytes: wide, coalesced loads and stores;
// else 8 or 4: safetensors offsets are often only 8-byte aligned), and a tail
// of bytes; pointers that share no alignment go byte by byte. Destinations
// must not overlap each other or any source.

typedef unsigned long long u64;

template <typename Word>
__device__ __forceinline__ void copy_words(const unsigned char* src, unsigned char* dst, u64 n) {
    const u64 w = sizeof(Word);
    const u64 head = min(n, (u64)((w - ((u64)dst & (w - 1))) & (w - 1)));
    for (u64 i = threadIdx.x; i < head; i += blockDim.x) dst[i] = src[i];
    const u64 words = (n - head) / w;
    const Word* from = (const Word*)(src + head);
    Word* to = (Word*)(dst + head);
#pragma unroll 4
    for (u64 i = threadIdx.x; i < words; i += blockDim.x) to[i] = from[i];
    for (u64 i = head + words * w + threadIdx.x; i < n; i += blockDim.x) dst[i] = src[i];
}

extern "C" __global__ void __launch_bounds__(256)
torpor_gather_scatter(const u64* __restrict__ srcs, const u64* __restrict__ dsts,
                      const u64* __restrict__ lengths, u64 count) {
    for (u64 p = blockIdx.x; p < count; p += gridDim.x) {
        const unsigned char* src = (const unsigned char*)srcs[p];
        unsigned char* dst = (unsigned char*)dsts[p];
        const u64 n = lengths[p];
        const u64 skew = ((u64)src - (u64)dst) & 15;  // alignment the two share
        if (skew == 0) {
            copy_words<uint4>(src, dst, n);
        } else if ((skew & 7) == 0) {
            copy_words<unsigned long long>(src, dst, n);
        } else if ((skew & 3) == 0) {
            copy_words<unsigned int>(src, dst, n);
        } else {
            for (u64 i = threadIdx.x; i < n; i += blockDim.x) dst[i] = src[i];
        }
    }
}
