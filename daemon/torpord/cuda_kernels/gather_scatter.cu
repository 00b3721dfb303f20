// Many (source, destination, length) copies in one launch: packing tensors
// into a slab with alignment padding, moving a layer's scattered tensors.
// torpord/cuda/reference.py is this kernel's NumPy model.
//
// The host splits segments into pieces of at most 64 KiB (the work items);
// each thread block copies pieces, grid-stride. A piece is copied as a head
// of single bytes up to the destination's 16-byte alignment, a body of
// 16-byte words (wide, coalesced loads and stores) when the source is then
// 16-byte aligned too, else byte by byte, and a tail of bytes. Destinations
// must not overlap each other or any source.

typedef unsigned long long u64;

extern "C" __global__ void __launch_bounds__(256)
torpor_gather_scatter(const u64* __restrict__ srcs, const u64* __restrict__ dsts,
                      const u64* __restrict__ lengths, u64 count) {
    for (u64 p = blockIdx.x; p < count; p += gridDim.x) {
        const unsigned char* src = (const unsigned char*)srcs[p];
        unsigned char* dst = (unsigned char*)dsts[p];
        const u64 n = lengths[p];
        const u64 head = min(n, (u64)((16 - ((u64)dst & 15)) & 15));
        if (((u64)(src + head) & 15) != 0) {  // aligned differently: bytes
            for (u64 i = threadIdx.x; i < n; i += blockDim.x) dst[i] = src[i];
            continue;
        }
        for (u64 i = threadIdx.x; i < head; i += blockDim.x) dst[i] = src[i];
        const u64 words = (n - head) / 16;
        const uint4* from = (const uint4*)(src + head);
        uint4* to = (uint4*)(dst + head);
#pragma unroll 4
        for (u64 i = threadIdx.x; i < words; i += blockDim.x) to[i] = from[i];
        for (u64 i = head + words * 16 + threadIdx.x; i < n; i += blockDim.x) dst[i] = src[i];
    }
}
