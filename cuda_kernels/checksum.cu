// XXH3-64 of each chunk of a slab, one thread block per chunk: the GPU half
// of torpord.storage.checksum (the host combines the chunk digests).
// torpord/cuda/reference.py is this kernel's NumPy model.
//
// A long chunk (over 240 bytes) is hashed in rounds: each warp sums what the
// 16 stripes of one 1 KiB block add to the eight accumulator lanes (these
// sums are independent across blocks), then eight threads, one per lane,
// run that lane's chain of scrambles over the round's blocks in order. The
// chunk's last partial block, its last stripe, the merge and short chunks
// are done by one thread.
//
// `data` must be 8-byte aligned and `chunk_bytes` a multiple of 8.

typedef unsigned long long u64;
typedef unsigned int u32;

#define THREADS 256
#define WARPS (THREADS / 32)
#define ROUND 32        // 1 KiB blocks summed per round
#define STRIPE 64
#define BLOCK 1024      // 16 stripes
#define SECRET_SIZE 192

#define PRIME32_1 0x9E3779B1ULL
#define PRIME32_2 0x85EBCA77ULL
#define PRIME32_3 0xC2B2AE3DULL
#define PRIME64_1 0x9E3779B185EBCA87ULL
#define PRIME64_2 0xC2B2AE3D27D4EB4FULL
#define PRIME64_3 0x165667B19E3779F9ULL
#define PRIME64_4 0x85EBCA77C2B2AE63ULL
#define PRIME64_5 0x27D4EB2F165667C5ULL
#define PRIME_MX1 0x165667919E3779F9ULL
#define PRIME_MX2 0x9FB21C651E98DF25ULL

// XXH3's default secret.
__constant__ unsigned char kSecret[SECRET_SIZE] = {
    0xb8, 0xfe, 0x6c, 0x39, 0x23, 0xa4, 0x4b, 0xbe, 0x7c, 0x01, 0x81, 0x2c, 0xf7, 0x21, 0xad, 0x1c,
    0xde, 0xd4, 0x6d, 0xe9, 0x83, 0x90, 0x97, 0xdb, 0x72, 0x40, 0xa4, 0xa4, 0xb7, 0xb3, 0x67, 0x1f,
    0xcb, 0x79, 0xe6, 0x4e, 0xcc, 0xc0, 0xe5, 0x78, 0x82, 0x5a, 0xd0, 0x7d, 0xcc, 0xff, 0x72, 0x21,
    0xb8, 0x08, 0x46, 0x74, 0xf7, 0x43, 0x24, 0x8e, 0xe0, 0x35, 0x90, 0xe6, 0x81, 0x3a, 0x26, 0x4c,
    0x3c, 0x28, 0x52, 0xbb, 0x91, 0xc3, 0x00, 0xcb, 0x88, 0xd0, 0x65, 0x8b, 0x1b, 0x53, 0x2e, 0xa3,
    0x71, 0x64, 0x48, 0x97, 0xa2, 0x0d, 0xf9, 0x4e, 0x38, 0x19, 0xef, 0x46, 0xa9, 0xde, 0xac, 0xd8,
    0xa8, 0xfa, 0x76, 0x3f, 0xe3, 0x9c, 0x34, 0x3f, 0xf9, 0xdc, 0xbb, 0xc7, 0xc7, 0x0b, 0x4f, 0x1d,
    0x8a, 0x51, 0xe0, 0x4b, 0xcd, 0xb4, 0x59, 0x31, 0xc8, 0x9f, 0x7e, 0xc9, 0xd9, 0x78, 0x73, 0x64,
    0xea, 0xc5, 0xac, 0x83, 0x34, 0xd3, 0xeb, 0xc3, 0xc5, 0x81, 0xa0, 0xff, 0xfa, 0x13, 0x63, 0xeb,
    0x17, 0x0d, 0xdd, 0x51, 0xb7, 0xf0, 0xda, 0x49, 0xd3, 0x16, 0x55, 0x26, 0x29, 0xd4, 0x68, 0x9e,
    0x2b, 0x16, 0xbe, 0x58, 0x7d, 0x47, 0xa1, 0xfc, 0x8f, 0xf8, 0xb8, 0xd1, 0x7a, 0xd0, 0x31, 0xce,
    0x45, 0xcb, 0x3a, 0x8f, 0x95, 0x16, 0x04, 0x28, 0xaf, 0xd7, 0xfb, 0xca, 0xbb, 0x4b, 0x40, 0x7e
};

__device__ __forceinline__ u64 read64(const unsigned char* p) {
    u64 v = 0;
#pragma unroll
    for (int i = 7; i >= 0; --i) v = (v << 8) | p[i];
    return v;
}

__device__ __forceinline__ u32 read32(const unsigned char* p) {
    return (u32)p[0] | ((u32)p[1] << 8) | ((u32)p[2] << 16) | ((u32)p[3] << 24);
}

__device__ __forceinline__ u64 bswap64(u64 x) {  // byte swap
    const u32 lo = (u32)x, hi = (u32)(x >> 32);
    return ((u64)__byte_perm(lo, 0, 0x0123) << 32) | (u64)__byte_perm(hi, 0, 0x0123);
}

__device__ __forceinline__ u64 secret64(int at) { return read64(kSecret + at); }

__device__ __forceinline__ u64 fold(u64 a, u64 b) { return (a * b) ^ __umul64hi(a, b); }

__device__ __forceinline__ u64 rotl(u64 x, int r) { return (x << r) | (x >> (64 - r)); }

__device__ __forceinline__ u64 avalanche(u64 h) {
    h ^= h >> 37;
    h *= PRIME_MX1;
    return h ^ (h >> 32);
}

__device__ __forceinline__ u64 xxh64_avalanche(u64 h) {
    h ^= h >> 33;
    h *= PRIME64_2;
    h ^= h >> 29;
    h *= PRIME64_3;
    return h ^ (h >> 32);
}

__device__ __forceinline__ u64 rrmxmx(u64 h, u64 len) {
    h ^= rotl(h, 49) ^ rotl(h, 24);
    h *= PRIME_MX2;
    h ^= (h >> 35) + len;
    h *= PRIME_MX2;
    return h ^ (h >> 28);
}

__device__ __forceinline__ u64 mix16(const unsigned char* in, int secret_at) {
    return fold(read64(in) ^ secret64(secret_at), read64(in + 8) ^ secret64(secret_at + 8));
}

// Inputs of 0 to 240 bytes.
__device__ u64 xxh3_short(const unsigned char* in, u64 n) {
    if (n == 0) return xxh64_avalanche(secret64(56) ^ secret64(64));
    if (n <= 3) {
        u32 combined = ((u32)in[0] << 16) | ((u32)in[n >> 1] << 24) | (u32)in[n - 1] | ((u32)n << 8);
        u64 flip = (u64)(read32(kSecret) ^ read32(kSecret + 4));
        return xxh64_avalanche((u64)combined ^ flip);
    }
    if (n <= 8) {
        u64 value = (u64)read32(in + n - 4) + ((u64)read32(in) << 32);
        return rrmxmx(value ^ (secret64(8) ^ secret64(16)), n);
    }
    if (n <= 16) {
        u64 lo = read64(in) ^ (secret64(24) ^ secret64(32));
        u64 hi = read64(in + n - 8) ^ (secret64(40) ^ secret64(48));
        return avalanche(n + bswap64(lo) + hi + fold(lo, hi));
    }
    u64 acc = n * PRIME64_1;
    if (n <= 128) {
        int rounds = n > 32 ? (int)((n - 1) >> 5) + 1 : 1;
        for (int i = 0; i < rounds; ++i)
            acc += mix16(in + 16 * i, 32 * i) + mix16(in + n - 16 * (i + 1), 32 * i + 16);
        return avalanche(acc);
    }
    for (int i = 0; i < 8; ++i) acc += mix16(in + 16 * i, 16 * i);
    acc = avalanche(acc);
    for (int i = 8; i < (int)(n / 16); ++i) acc += mix16(in + 16 * i, 16 * (i - 8) + 3);
    acc += mix16(in + n - 16, 136 - 17);
    return avalanche(acc);
}

__device__ __forceinline__ void accumulate(u64* acc, const unsigned char* in, int secret_at) {
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        u64 value = read64(in + 8 * i);
        u64 keyed = value ^ secret64(secret_at + 8 * i);
        acc[i ^ 1] += value;
        acc[i] += (keyed & 0xFFFFFFFFULL) * (keyed >> 32);
    }
}

extern "C" __global__ void __launch_bounds__(THREADS)
torpor_xxh3_chunks(const unsigned char* __restrict__ data, u64 length, u64 chunk_bytes,
                   u64* __restrict__ digests) {
    const u64 chunk = blockIdx.x;
    const u64 start = chunk * chunk_bytes;
    if (start >= length) return;
    const u64 n = min(chunk_bytes, length - start);
    const unsigned char* in = data + start;
    if (n <= 240) {
        if (threadIdx.x == 0) digests[chunk] = xxh3_short(in, n);
        return;
    }
    __shared__ u64 sums[ROUND][8];
    __shared__ u64 acc[8];
    const u64 init[8] = {PRIME32_3, PRIME64_1, PRIME64_2, PRIME64_3,
                         PRIME64_4, PRIME32_2, PRIME64_5, PRIME32_1};
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (threadIdx.x < 8) acc[threadIdx.x] = init[threadIdx.x];
    __syncthreads();  // (thread 0 reads every lane when there is no full block)
    const u64 blocks = (n - 1) / BLOCK;
    const u64* words = (const u64*)in;
    // The secret words this thread keys with: word lane + 32k of every block
    // is lane (lane % 8) of stripe (lane + 32k) / 8. (Read once: constant
    // memory serialises a warp reading different addresses.)
    u64 keys[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
        const int w = lane + 32 * k;
        keys[k] = secret64(8 * (w / 8 + w % 8));
    }
    for (u64 round = 0; round < blocks; round += ROUND) {
        const int count = (int)min((u64)ROUND, blocks - round);
        for (int b = warp; b < count; b += WARPS) {
            // Thread `lane` reads words lane + 32k of the block (coalesced):
            // all of them in accumulator lane `lane % 8`, stripe (lane + 32k) / 8.
            const u64* block = words + (round + b) * (BLOCK / 8);
            u64 products = 0, values = 0;
#pragma unroll
            for (int k = 0; k < 4; ++k) {
                const u64 value = block[lane + 32 * k];
                const u64 keyed = value ^ keys[k];
                products += (keyed & 0xFFFFFFFFULL) * (keyed >> 32);
                values += value;
            }
            products += __shfl_xor_sync(0xFFFFFFFFu, products, 8);
            products += __shfl_xor_sync(0xFFFFFFFFu, products, 16);
            values += __shfl_xor_sync(0xFFFFFFFFu, values, 8);
            values += __shfl_xor_sync(0xFFFFFFFFu, values, 16);
            // Lane i gets its products and the data words of lane i ^ 1.
            const u64 swapped = __shfl_xor_sync(0xFFFFFFFFu, values, 1);
            if (lane < 8) sums[b][lane] = products + swapped;
        }
        __syncthreads();
        if (threadIdx.x < 8) {
            const u64 key = secret64(SECRET_SIZE - STRIPE + 8 * threadIdx.x);
            u64 a = acc[threadIdx.x];
            for (int b = 0; b < count; ++b) {
                a += sums[b][threadIdx.x];
                a ^= a >> 47;
                a ^= key;
                a *= PRIME32_1;
            }
            acc[threadIdx.x] = a;
        }
        __syncthreads();
    }
    if (threadIdx.x != 0) return;
    u64 a[8];
    for (int i = 0; i < 8; ++i) a[i] = acc[i];
    const u64 tail = blocks * BLOCK;
    const int stripes = (int)(((n - 1) - tail) / STRIPE);
    for (int s = 0; s < stripes; ++s) accumulate(a, in + tail + s * STRIPE, 8 * s);
    accumulate(a, in + n - STRIPE, SECRET_SIZE - STRIPE - 7);
    u64 result = n * PRIME64_1;
    for (int i = 0; i < 4; ++i)
        result += fold(a[2 * i] ^ secret64(11 + 16 * i), a[2 * i + 1] ^ secret64(19 + 16 * i));
    digests[chunk] = avalanche(result);
}
