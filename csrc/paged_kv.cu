// Paged-KV pack/unpack: gather the blocks of a paged KV cache into one
// contiguous buffer (pack) or scatter such a buffer back into the cache
// (unpack). Compiled at run time with NVRTC (cupy.RawModule); no build step.
//
// A layer cache is viewed as [num_blocks, d0, d1, d2, d3] with arbitrary byte
// strides. The host side folds the trailing dimensions that are contiguous
// into one "run" of RUN bytes and passes the remaining outer dimensions
// (up to 4) with their sizes and byte strides. One warp copies one chunk of a
// run with vector width VEC (16, 8, 4, 2 or 1 bytes, chosen by the host so
// every address is aligned). Many layers go in one launch through a table
// of layer base pointers (all layers share shape and strides).
//
// Work decomposition: row = (layer, index into block_ids, outer index);
// a row is RUN bytes, split into chunks of CHUNK_VECS vectors per warp.



template <int VEC> struct VecT;
template <> struct VecT<16> { typedef uint4 T; };
template <> struct VecT<8>  { typedef uint2 T; };
template <> struct VecT<4>  { typedef unsigned int T; };
template <> struct VecT<2>  { typedef unsigned short T; };
template <> struct VecT<1>  { typedef unsigned char T; };

struct PagedArgs {
    long long layer_ptrs;      // device array of n_layers base addresses, or 0 with n_layers == 1
    long long base0;           // base address of the only layer when layer_ptrs == 0
    long long buf;             // contiguous buffer: [L][n_ids][outer...][run]
    long long ids;             // device pointer to n_ids int64 block ids
    long long n_layers;
    long long n_ids;
    long long block_stride;    // bytes between consecutive blocks in the cache
    long long outer_size[4];   // sizes of the outer dims (1 when unused)
    long long outer_stride[4]; // their byte strides in the cache
    long long n_outer;         // product of outer_size
    long long run_bytes;       // contiguous bytes per row
    long long layer_buf_bytes; // bytes of one layer in the buffer = n_ids * n_outer * run_bytes
    long long chunks_per_row;
};

#define CHUNK_VECS 256  // vectors per warp-chunk: 8 per lane

template <int VEC, bool PACK>
__device__ __forceinline__ void paged_copy(const PagedArgs& a) {
    typedef typename VecT<VEC>::T V;
    // Index arithmetic in 32 bits (64-bit division is emulated and slow); byte
    // offsets in 64 bits. The host guarantees rows * chunks_per_row < 2^31.
    const unsigned lane = threadIdx.x & 31u;
    const unsigned warps_per_cta = blockDim.x >> 5;
    const unsigned warp0 = blockIdx.x * warps_per_cta + (threadIdx.x >> 5);
    const unsigned total_warps = gridDim.x * warps_per_cta;
    const unsigned n_outer = (unsigned)a.n_outer;
    const unsigned n_ids = (unsigned)a.n_ids;
    const unsigned cpr = (unsigned)a.chunks_per_row;
    const unsigned units = (unsigned)(a.n_layers * a.n_ids * a.n_outer) * cpr;
    const long long vecs_per_row = a.run_bytes / VEC;
    const unsigned long long* lp = reinterpret_cast<const unsigned long long*>(a.layer_ptrs);
    const long long* ids = reinterpret_cast<const long long*>(a.ids);
    const unsigned os0 = (unsigned)a.outer_size[0], os1 = (unsigned)a.outer_size[1];
    const unsigned os2 = (unsigned)a.outer_size[2], os3 = (unsigned)a.outer_size[3];

    for (unsigned u = warp0; u < units; u += total_warps) {
        unsigned row = u / cpr;
        unsigned chunk = u - row * cpr;
        unsigned o = row % n_outer;
        unsigned t = row / n_outer;
        unsigned i = t % n_ids;
        unsigned l = t / n_ids;
        long long bid = ids[i];
        if (bid < 0) continue;  // unpack: a repeated id whose later occurrence wins
        long long off = bid * a.block_stride;
        if (n_outer > 1) {
            unsigned rem = o, q;
            q = rem / os3; off += (long long)(rem - q * os3) * a.outer_stride[3]; rem = q;
            q = rem / os2; off += (long long)(rem - q * os2) * a.outer_stride[2]; rem = q;
            q = rem / os1; off += (long long)(rem - q * os1) * a.outer_stride[1]; rem = q;
            off += (long long)(rem % os0) * a.outer_stride[0];
        }
        char* cache = reinterpret_cast<char*>(lp ? lp[l] : (unsigned long long)a.base0) + off;
        char* buf = reinterpret_cast<char*>(a.buf) + (long long)l * a.layer_buf_bytes
                    + ((long long)i * n_outer + o) * a.run_bytes;
        const V* src = reinterpret_cast<const V*>(PACK ? cache : buf);
        V* dst = reinterpret_cast<V*>(PACK ? buf : cache);
        long long v0 = (long long)chunk * CHUNK_VECS;
        long long v1 = v0 + CHUNK_VECS < vecs_per_row ? v0 + CHUNK_VECS : vecs_per_row;
        V tmp[CHUNK_VECS / 32];
        if (v0 + CHUNK_VECS <= vecs_per_row) {  // full chunk: no bounds checks
#pragma unroll
            for (int k = 0; k < CHUNK_VECS / 32; ++k) tmp[k] = src[v0 + lane + 32 * k];
#pragma unroll
            for (int k = 0; k < CHUNK_VECS / 32; ++k) dst[v0 + lane + 32 * k] = tmp[k];
        } else {
#pragma unroll
            for (int k = 0; k < CHUNK_VECS / 32; ++k) {
                long long v = v0 + lane + 32 * k;
                if (v < v1) tmp[k] = src[v];
            }
#pragma unroll
            for (int k = 0; k < CHUNK_VECS / 32; ++k) {
                long long v = v0 + lane + 32 * k;
                if (v < v1) dst[v] = tmp[k];
            }
        }
    }
}

// Kernel parameters are plain 64-bit scalars (cheap to pass from Python).
#define P2PKV_PARAMS                                                                              \
    long long layer_ptrs, long long base0, long long buf, long long ids, long long n_layers,     \
    long long n_ids, long long block_stride, long long os0, long long os1, long long os2,        \
    long long os3, long long st0, long long st1, long long st2, long long st3, long long n_outer, \
    long long run_bytes, long long layer_buf_bytes, long long chunks_per_row
#define P2PKV_ARGS                                                                                \
    PagedArgs a = {layer_ptrs, base0, buf, ids, n_layers, n_ids, block_stride, {os0, os1, os2, os3}, \
                   {st0, st1, st2, st3}, n_outer, run_bytes, layer_buf_bytes, chunks_per_row};

#define P2PKV_DEFINE(VEC)                                                                         \
    extern "C" __global__ void p2pkv_pack_v##VEC(P2PKV_PARAMS) { P2PKV_ARGS paged_copy<VEC, true>(a); } \
    extern "C" __global__ void p2pkv_unpack_v##VEC(P2PKV_PARAMS) { P2PKV_ARGS paged_copy<VEC, false>(a); }

P2PKV_DEFINE(16)
P2PKV_DEFINE(8)
P2PKV_DEFINE(4)
P2PKV_DEFINE(2)
P2PKV_DEFINE(1)
