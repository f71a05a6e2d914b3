// Batched copies and GPU-side signals of p2pkv's request data plane.
// Compiled at run time with NVRTC (cupy.RawModule); no build step.
//
// p2pkv_batch_copy: many (src, dst, nbytes) segments in ONE launch. The host
// writes a table of segments, each with the index of its first work unit
// (a prefix sum); a warp copies one unit of UNIT_BYTES at a time, finding its
// segment by binary search over the table. Segments whose addresses and size
// are all multiples of 16 bytes move as uint4 vectors, the rest byte by byte.
// 32 layers of a request therefore cost one launch instead of 32 copies, which
// at 512 tokens is the difference between launch-bound and bandwidth-bound.
//
// p2pkv_paged_copy: the same for paged KV caches, from a per-layer table of cache pairs and the
// request's (src block, dst block) pairs: no segment per block run is ever built on the host.
//
// p2pkv_signal / p2pkv_wait: a 64-bit flag in device memory (possibly another
// process's memory mapped through CUDA IPC) written after the work before it
// in the stream, and a wait that holds a stream until the flag holds the
// value, or until a deadline on the GPU's global timer passes (then the wait
// records a timeout in its status word and lets the stream go on): a GPU-side
// wait that can never hang the stream.

struct Seg {
    unsigned long long src;
    unsigned long long dst;
    long long nbytes;
    long long unit0;   // first work unit of this segment (prefix sum over segments)
};

#define UNIT_BYTES 8192       // bytes per warp work unit: 16 uint4 per lane
#define UNIT_VECS (UNIT_BYTES / 16)

__device__ __forceinline__ void p2pkv_copy_units(const Seg* __restrict__ segs, int nseg, long long total_units) {
    const unsigned lane = threadIdx.x & 31u;
    const long long warps_per_cta = blockDim.x >> 5;
    long long u = (long long)blockIdx.x * warps_per_cta + (threadIdx.x >> 5);
    const long long stride = (long long)gridDim.x * warps_per_cta;
    int s = 0;
    for (; u < total_units; u += stride) {
        // the segment holding unit u: units ascend, so search from the last one found
        if (u < segs[s].unit0 || (s + 1 < nseg && u >= segs[s + 1].unit0)) {
            int lo = 0, hi = nseg - 1;
            while (lo < hi) {
                int mid = (lo + hi + 1) >> 1;
                if (segs[mid].unit0 <= u) lo = mid; else hi = mid - 1;
            }
            s = lo;
        }
        const Seg g = segs[s];
        const long long off = (u - g.unit0) * (long long)UNIT_BYTES;
        long long n = g.nbytes - off;
        if (n > UNIT_BYTES) n = UNIT_BYTES;
        if (n <= 0) continue;
        const char* src = reinterpret_cast<const char*>(g.src) + off;
        char* dst = reinterpret_cast<char*>(g.dst) + off;
        if (((g.src | g.dst | (unsigned long long)g.nbytes) & 15ull) == 0) {
            const uint4* s4 = reinterpret_cast<const uint4*>(src);
            uint4* d4 = reinterpret_cast<uint4*>(dst);
            const int nv = (int)(n >> 4);
            if (nv == UNIT_VECS) {
                uint4 tmp[UNIT_VECS / 32];
#pragma unroll
                for (int k = 0; k < UNIT_VECS / 32; ++k) tmp[k] = s4[lane + 32 * k];
#pragma unroll
                for (int k = 0; k < UNIT_VECS / 32; ++k) d4[lane + 32 * k] = tmp[k];
            } else {
                for (int v = lane; v < nv; v += 32) d4[v] = s4[v];
            }
        } else {
            for (long long b = lane; b < n; b += 32) dst[b] = src[b];
        }
    }
}

extern "C" __global__ void p2pkv_batch_copy(const Seg* __restrict__ segs, int nseg, long long total_units) {
    p2pkv_copy_units(segs, nseg, total_units);
}

// The copies of p2pkv_batch_copy, then the n (address, value) pairs written once EVERY block's
// copies are done (one launch where a copy and a separate flag kernel took two): each block fences
// its writes (system scope) and counts itself done in *done (zeroed by the host, in the same table upload); the
// last block to finish writes the flags, after a system-wide fence, with volatile 64-bit stores
// (flags may live in host memory registered with CUDA).
extern "C" __global__ void p2pkv_batch_copy_signal(const Seg* __restrict__ segs, int nseg, long long total_units,
                                                   const unsigned long long* __restrict__ pairs, int n,
                                                   unsigned int* done) {
    __shared__ int last;
    p2pkv_copy_units(segs, nseg, total_units);
    __threadfence_system();  // system scope: the bytes may be another GPU's memory (peer access), read after
    __syncthreads();         // a flag that lives in host memory
    if (threadIdx.x == 0) last = (atomicAdd(done, 1u) == gridDim.x - 1);
    __syncthreads();
    if (!last) return;
    __threadfence_system();
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        *reinterpret_cast<volatile unsigned long long*>(pairs[2 * i]) = pairs[2 * i + 1];
    }
    __threadfence_system();
}

// p2pkv_paged_copy: copy blocks between paged KV caches of many layers in ONE launch, without a
// segment per block run. Every layer l has a cache pair (src base, dst base, src block stride, dst block
// stride, all in bytes: LayerPair); the request gives (src block, dst block) pairs; one block of either
// cache is nrun runs of run_bytes at the byte offsets runs[2 r] (src) and runs[2 r + 1] (dst) from the
// block's start (e.g. the K and V planes). Work unit u = (layer, pair, run, chunk of UNIT_BYTES), chunk
// fastest; a warp copies one unit at a time (grid-stride, 64-bit indices). align says what every
// address, stride, offset and run_bytes is a multiple of (16: uint4 vectors; 4: 32-bit words; else
// bytes), so the chunks of a run are too (UNIT_BYTES is a multiple of 16). The host checks the block ids.
struct LayerPair {
    unsigned long long src;
    unsigned long long dst;
    long long src_stride;
    long long dst_stride;
};

extern "C" __global__ void p2pkv_paged_copy(const LayerPair* __restrict__ layers,
                                            const long long* __restrict__ pairs, long long npair,
                                            const long long* __restrict__ runs, long long nrun,
                                            long long run_bytes, long long units_per_run,
                                            long long total_units, int align) {
    const unsigned lane = threadIdx.x & 31u;
    const long long warps_per_cta = blockDim.x >> 5;
    long long u = (long long)blockIdx.x * warps_per_cta + (threadIdx.x >> 5);
    const long long stride = (long long)gridDim.x * warps_per_cta;
    // 32-bit division when every index fits (a 64-bit one costs several times more per unit)
    const bool narrow = total_units < 0x7fffffffLL;
    for (; u < total_units; u += stride) {
        long long chunk, run, layer, pair;
        if (narrow) {
            const unsigned uu = (unsigned)u, upr = (unsigned)units_per_run, nr = (unsigned)nrun, np = (unsigned)npair;
            const unsigned q = uu / upr, q2 = q / nr, l = q2 / np;
            chunk = uu - q * upr;
            run = q - q2 * nr;
            layer = l;
            pair = q2 - l * np;
        } else {
            const long long q = u / units_per_run, q2 = q / nrun;
            chunk = u - q * units_per_run;
            run = q - q2 * nrun;
            layer = q2 / npair;
            pair = q2 - layer * npair;
        }
        const LayerPair L = layers[layer];
        const long long off = chunk * (long long)UNIT_BYTES;
        long long n = run_bytes - off;
        if (n > UNIT_BYTES) n = UNIT_BYTES;
        if (n <= 0) continue;
        const char* src = reinterpret_cast<const char*>(L.src) + pairs[2 * pair] * L.src_stride + runs[2 * run] + off;
        char* dst = reinterpret_cast<char*>(L.dst) + pairs[2 * pair + 1] * L.dst_stride + runs[2 * run + 1] + off;
        if (align == 16) {
            const uint4* s4 = reinterpret_cast<const uint4*>(src);
            uint4* d4 = reinterpret_cast<uint4*>(dst);
            const int nv = (int)(n >> 4);
            if (nv == UNIT_VECS) {
                uint4 tmp[UNIT_VECS / 32];
#pragma unroll
                for (int k = 0; k < UNIT_VECS / 32; ++k) tmp[k] = s4[lane + 32 * k];
#pragma unroll
                for (int k = 0; k < UNIT_VECS / 32; ++k) d4[lane + 32 * k] = tmp[k];
            } else {
                for (int v = lane; v < nv; v += 32) d4[v] = s4[v];
            }
        } else if (align == 4) {
            const unsigned* s1 = reinterpret_cast<const unsigned*>(src);
            unsigned* d1 = reinterpret_cast<unsigned*>(dst);
            const int nw = (int)(n >> 2);
            for (int w = lane; w < nw; w += 32) d1[w] = s1[w];
        } else {
            for (long long b = lane; b < n; b += 32) dst[b] = src[b];
        }
    }
}

// Flags may live in host memory registered with CUDA (PCIe atomics are not guaranteed): plain
// 64-bit volatile stores, after a system-wide fence so everything before them is visible first.
extern "C" __global__ void p2pkv_signal(unsigned long long* flag, unsigned long long value) {
    __threadfence_system();
    *reinterpret_cast<volatile unsigned long long*>(flag) = value;
    __threadfence_system();
}

// pairs: n (address, value) pairs; launched after the copies it follows, in the same stream.
extern "C" __global__ void p2pkv_set_flags(const unsigned long long* __restrict__ pairs, int n) {
    __threadfence_system();
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        *reinterpret_cast<volatile unsigned long long*>(pairs[2 * i]) = pairs[2 * i + 1];
    }
    __threadfence_system();
}

__device__ __forceinline__ unsigned long long p2pkv_globaltimer() {
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}

extern "C" __global__ void p2pkv_wait(const unsigned long long* flag, unsigned long long value,
                                      unsigned long long deadline_ns, unsigned long long* status) {
    // One thread: spin (with a short sleep) until *flag == value or the deadline passes.
    volatile const unsigned long long* f = flag;
    while (*f != value) {
        if (p2pkv_globaltimer() > deadline_ns) {
            atomicExch(status, 1ull);
            return;
        }
        __nanosleep(256);
    }
    __threadfence();
}

extern "C" __global__ void p2pkv_globaltimer_now(unsigned long long* out) {
    *out = p2pkv_globaltimer();
}
