// gpt2rt CUDA kernels: compiled ahead by tools/build_kernels.sh into kernels/gpt2rt.fatbin, which the
// library embeds and loads with cuModuleLoadData (the user's machine needs only the driver).
//
// Activations, LayerNorm, softmax, GELU and every accumulation are fp32; weights are f32, f16 or
// bf16 (one instantiation of each weight-reading kernel per type, suffixed _f32/_f16/_bf16), and the
// KV cache holds the weights' type (its values rounded as they are appended, read back into fp32).
// Tensor cores (mma.sync on f16/bf16 operands) serve only the half modes, so f32 mode has no TF32
// anywhere. Every reduction has a fixed order, so results are deterministic run to run.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }

// Four consecutive weights (16-byte aligned for f32, 8-byte for f16/bf16) as floats.
__device__ __forceinline__ float4 load4(const float* p) { return *reinterpret_cast<const float4*>(p); }
// Four 16-bit weights (raw, as loaded) as floats.
__device__ __forceinline__ float4 four_to_f(uint2 raw, const __half*) {
    float2 a = __half22float2(*reinterpret_cast<__half2*>(&raw.x));
    float2 b = __half22float2(*reinterpret_cast<__half2*>(&raw.y));
    return make_float4(a.x, a.y, b.x, b.y);
}
__device__ __forceinline__ float4 four_to_f(uint2 raw, const __nv_bfloat16*) {
    float2 a = __bfloat1622float2(*reinterpret_cast<__nv_bfloat162*>(&raw.x));
    float2 b = __bfloat1622float2(*reinterpret_cast<__nv_bfloat162*>(&raw.y));
    return make_float4(a.x, a.y, b.x, b.y);
}
__device__ __forceinline__ float4 load4(const __half* p) { return four_to_f(*reinterpret_cast<const uint2*>(p), p); }
__device__ __forceinline__ float4 load4(const __nv_bfloat16* p) {
    return four_to_f(*reinterpret_cast<const uint2*>(p), p);
}
__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Argmax order: larger value first, then the smaller index (first index on ties).
__device__ __forceinline__ bool better(float v, int i, float bv, int bi) { return v > bv || (v == bv && i < bi); }
// Keeps the better of this lane's (value, index) and lane ^ o's (first index on ties).
__device__ __forceinline__ void best_xor(float& bv, int& bi, int o) {
    float ov = __shfl_xor_sync(0xffffffffu, bv, o);
    int oi = __shfl_xor_sync(0xffffffffu, bi, o);
    if (better(ov, oi, bv, bi)) { bv = ov; bi = oi; }
}

// Sum (or max) over the block; every thread gets the result. `scratch` holds 32 floats.
__device__ float block_sum(float v, float* scratch) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < warps ? scratch[lane] : 0.0f;
    return warp_sum(v);
}

__device__ float block_max(float v, float* scratch) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < warps ? scratch[lane] : -INFINITY;
    return warp_max(v);
}

// Programmatic dependent launch (sm_90+; the host enables it only there): a kernel launched with it
// may start while the previous one finishes. It asks for its own dependents to be launched early
// (pdl_trigger), streams the weights it needs (which no kernel writes), and only then waits for the
// previous kernel's results (pdl_wait) before reading activations or writing anything.
__device__ __forceinline__ void pdl_trigger() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// x[r, :] = wte[tokens[r], :] + wpe[pos[r], :]; one block per row.
template <typename W>
__device__ void embed(const int* tokens, const int* pos, const W* wte, const W* wpe, float* x, int C) {
    pdl_trigger();
    pdl_wait();
    int r = blockIdx.x;
    const W* te = wte + (size_t)tokens[r] * C;
    const W* pe = wpe + (size_t)pos[r] * C;
    for (int c = threadIdx.x; c < C; c += blockDim.x) x[(size_t)r * C + c] = to_f(te[c]) + to_f(pe[c]);
}

__device__ __forceinline__ void store_as(float* p, float v) { *p = v; }
__device__ __forceinline__ void store_as(__half* p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void store_as(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

// out[r, :] = LayerNorm(x[r, :]) * gamma + beta; one block per row, two-pass mean/variance. O: fp32,
// or the weights' half type for a tensor-core product (rounded as matmul_mma rounds its rows).
template <typename W, typename O>
__device__ void layer_norm(const float* x, const W* gamma, const W* beta, O* out, int C, float eps) {
    __shared__ float scratch[32];
    pdl_trigger();
    pdl_wait();
    const float* row = x + (size_t)blockIdx.x * C;
    float s = 0.0f;
    for (int c = threadIdx.x; c < C; c += blockDim.x) s += row[c];
    float mean = block_sum(s, scratch) / C;
    float v = 0.0f;
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
        float d = row[c] - mean;
        v += d * d;
    }
    float inv = rsqrtf(block_sum(v, scratch) / C + eps);
    for (int c = threadIdx.x; c < C; c += blockDim.x)
        store_as(out + (size_t)blockIdx.x * C + c, (row[c] - mean) * inv * to_f(gamma[c]) + to_f(beta[c]));
}

#define GEMV_ROWS 8

// Split-K tiled matrix product for larger M (prefill, big batches): 64x64 output tiles, k in
// slices of 16 staged through shared memory (two buffers: the next slice's loads are in flight
// during the math, one barrier a slice), 256 threads computing 4x4 adjacent outputs each from one
// 16-byte shared load of its 4 rows and one of its 4 columns a k. The weights are stored
// transposed, `w[N, K]` (see upload_weights), like every matmul weight on the device. Each output
// adds its k in order, one fma each. Thread t loads 4 adjacent k of row t / 4 and of weight row
// t / 4 (16-byte loads when K % 4 == 0).
// Grid (ceil(N/64), ceil(M/64), splits); partial[split][m][n] feeds matmul_finish (or, with one
// split, is the output itself).
template <typename W>
__device__ void matmul_tiled(const float* in, int M, int K, const W* w, int N, float* partial, int k_per_split) {
    pdl_trigger();
    pdl_wait();
    __shared__ __align__(16) float a_tile[2][16][68];
    __shared__ __align__(16) float w_tile[2][16][68];
    int t = threadIdx.x, tx = t & 15, ty = t >> 4;
    int m0 = blockIdx.y * 64, n0 = blockIdx.x * 64;
    int k0 = blockIdx.z * k_per_split;
    int k1 = min(K, k0 + k_per_split);
    int lr = t >> 2, lk = (t & 3) * 4;
    bool a_ok = m0 + lr < M, w_ok = n0 + lr < N, vec = (K & 3) == 0;
    const float* a_src = in + (size_t)(a_ok ? m0 + lr : 0) * K;
    const W* w_src = w + (size_t)(w_ok ? n0 + lr : 0) * K;
    float ra[4], rw[4];
    // With K % 4 == 0 (and k_per_split % 16 == 0) a slice's 4 k are all below k1 or all past it.
    auto load = [&](int kb) {
        int k = kb + lk;
        if (vec) {
            float4 a = a_ok && k < k1 ? *reinterpret_cast<const float4*>(a_src + k) : make_float4(0, 0, 0, 0);
            float4 b = w_ok && k < k1 ? load4(w_src + k) : make_float4(0, 0, 0, 0);
            ra[0] = a.x, ra[1] = a.y, ra[2] = a.z, ra[3] = a.w;
            rw[0] = b.x, rw[1] = b.y, rw[2] = b.z, rw[3] = b.w;
        } else {
#pragma unroll
            for (int q = 0; q < 4; q++) {
                ra[q] = a_ok && k + q < k1 ? a_src[k + q] : 0.0f;
                rw[q] = w_ok && k + q < k1 ? to_f(w_src[k + q]) : 0.0f;
            }
        }
    };
    float acc[4][4];
#pragma unroll
    for (int i = 0; i < 4; i++)
#pragma unroll
        for (int j = 0; j < 4; j++) acc[i][j] = 0.0f;
    if (k0 < k1) load(k0);
    int b = 0;
    for (int kb = k0; kb < k1; kb += 16) {
#pragma unroll
        for (int q = 0; q < 4; q++) {
            a_tile[b][lk + q][lr] = ra[q];
            w_tile[b][lk + q][lr] = rw[q];
        }
        // Buffer b is in for every thread; the other one (read two slices ago) is free.
        __syncthreads();
        if (kb + 16 < k1) load(kb + 16);
#pragma unroll
        for (int kk = 0; kk < 16; kk++) {
            float4 a = *reinterpret_cast<const float4*>(&a_tile[b][kk][ty * 4]);
            float4 c = *reinterpret_cast<const float4*>(&w_tile[b][kk][tx * 4]);
            float av[4] = {a.x, a.y, a.z, a.w}, cv[4] = {c.x, c.y, c.z, c.w};
#pragma unroll
            for (int i = 0; i < 4; i++)
#pragma unroll
                for (int j = 0; j < 4; j++) acc[i][j] += av[i] * cv[j];
        }
        b ^= 1;
    }
    float* out = partial + (size_t)blockIdx.z * M * N;
#pragma unroll
    for (int i = 0; i < 4; i++) {
        int m = m0 + ty * 4 + i, n = n0 + tx * 4;
        if (m >= M) continue;
        if ((N & 3) == 0 && n + 3 < N) {
            *reinterpret_cast<float4*>(out + (size_t)m * N + n) = make_float4(acc[i][0], acc[i][1], acc[i][2], acc[i][3]);
        } else {
#pragma unroll
            for (int j = 0; j < 4; j++)
                if (n + j < N) out[(size_t)m * N + n + j] = acc[i][j];
        }
    }
}

__device__ __forceinline__ float gelu_new(float x) {
    const float k = 0.7978845608028654f;  // sqrt(2 / pi)
    return 0.5f * x * (1.0f + tanhf(k * (x + 0.044715f * x * x * x)));
}

// Output (m, n) of a product, v (bias included), by mode: 0 store; 1 store gelu_new; 2 out =
// residual + v (`residual`: the old out value); 3 store, and append the k/v columns to the KV cache
// at the row's (seq, pos). The epilogue of the split-K finishing and of the decode matmuls. O: fp32
// outputs, or (GELU only) the weights' f16/bf16 for a tensor-core product to read as they are.
template <typename O, typename KV>
__device__ __forceinline__ void gemv_store(float v, int m, int n, int N, int mode, float residual, O* out,
                                           KV* k_cache, KV* v_cache, const int* row_seq, const int* pos,
                                           int max_seq) {
    size_t i = (size_t)m * N + n;
    if (mode == 1) v = gelu_new(v);
    if (mode == 2) {
        store_as(out + i, residual + v);
        return;
    }
    store_as(out + i, v);
    if (mode == 3) {
        int C = N / 3;
        if (n >= C) {
            size_t at = ((size_t)row_seq[m] * max_seq + pos[m]) * C + (n % C);
            store_as((n < 2 * C ? k_cache : v_cache) + at, v);
        }
    }
}

// Finishing a split-K product (matmul_finish, or matmul_finish_rows for many rows): v = the sum of
// the splits + bias[n] in a fixed order (so deterministic, and the same in both), then by `mode`.
// The splits are summed in 8 interleaved shares (share i: splits i, i + 8, ... in order), then
// bias + share 0 + ... + share 7. Grid (ceil(N/32), M), 256 threads: warp i sums share i of 32
// columns of row m (for few rows and many splits).
template <typename W, typename O = float>
__device__ void matmul_finish(const float* partial, int splits, int M, int N, const W* bias, O* out, int mode,
                              W* k_cache, W* v_cache, const int* row_seq, const int* row_pos, int max_seq) {
    __shared__ float sums[8][33];
    pdl_trigger();
    pdl_wait();
    int tx = threadIdx.x & 31, ty = threadIdx.x >> 5;
    int n = blockIdx.x * 32 + tx, m = blockIdx.y;
    float acc = 0.0f;
    if (n < N) {
#pragma unroll 4
        for (int s = ty; s < splits; s += 8) acc += partial[((size_t)s * M + m) * N + n];
    }
    sums[ty][tx] = acc;
    __syncthreads();
    if (ty != 0 || n >= N) return;
    float v = to_f(bias[n]);
    for (int i = 0; i < 8; i++) v += sums[i][tx];
    float residual = mode == 2 ? to_f(out[(size_t)m * N + n]) : 0.0f;
    gemv_store(v, m, n, N, mode, residual, out, k_cache, v_cache, row_seq, row_pos, max_seq);
}

// The same sums, one thread an output (its 8 shares in registers, so the result is the same bit
// for bit), over the M x N outputs in blocks of 256 (for many rows and few splits).
template <typename W, typename O = float>
__device__ void matmul_finish_rows(const float* partial, int splits, int M, int N, const W* bias, O* out,
                                   int mode, W* k_cache, W* v_cache, const int* row_seq, const int* row_pos,
                                   int max_seq) {
    pdl_trigger();
    pdl_wait();
    size_t o = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (o >= (size_t)M * N) return;
    int m = (int)(o / N), n = (int)(o % N);
    float share[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
    for (int s0 = 0; s0 < splits; s0 += 8) {
#pragma unroll
        for (int i = 0; i < 8; i++)
            if (s0 + i < splits) share[i] += partial[(size_t)(s0 + i) * M * N + o];
    }
    float v = to_f(bias[n]);
#pragma unroll
    for (int i = 0; i < 8; i++) v += share[i];
    float residual = mode == 2 ? to_f(out[(size_t)m * N + n]) : 0.0f;
    gemv_store(v, m, n, N, mode, residual, out, k_cache, v_cache, row_seq, row_pos, max_seq);
}

// ---- Decode path (at most GEMV_ROWS rows): one warp per output column, weights streamed once. ----
//
// Every matmul weight lives on the device transposed, `w[N, K]`, so the warp that owns output
// column n reads one contiguous row of K weights with 16-byte loads and finishes the whole dot
// product itself: no split-K partial sums, and bias, GELU, residual and the KV-cache append happen
// in the same kernel. The input rows come from global memory, or from shared memory after a
// LayerNorm computed in the kernel's prologue (each block normalises the few rows it needs).

// VEC consecutive weights (16 bytes) as floats.
template <typename W> struct IsF32 { static constexpr bool value = false; };
template <> struct IsF32<float> { static constexpr bool value = true; };

template <typename W> struct Vec;
// Loads keep the raw 16 bytes (4 registers) until the arithmetic needs them.
template <> struct Vec<float> {
    static constexpr int N = 4;
    static __device__ __forceinline__ void convert(uint4 raw, float* out) {
        out[0] = __uint_as_float(raw.x); out[1] = __uint_as_float(raw.y);
        out[2] = __uint_as_float(raw.z); out[3] = __uint_as_float(raw.w);
    }
};
__device__ __forceinline__ float2 pair_to_f(__half2 p) { return __half22float2(p); }
__device__ __forceinline__ float2 pair_to_f(__nv_bfloat162 p) { return __bfloat1622float2(p); }
// Two consecutive weights (4-byte aligned in the half types) as floats.
__device__ __forceinline__ float2 two_to_f(const __half* p) { return pair_to_f(*reinterpret_cast<const __half2*>(p)); }
__device__ __forceinline__ float2 two_to_f(const __nv_bfloat16* p) {
    return pair_to_f(*reinterpret_cast<const __nv_bfloat162*>(p));
}
// Eight 16-bit weights (as pairs of type P) as floats.
template <typename P>
__device__ __forceinline__ void convert_pairs(uint4 raw, float* out) {
    const P* h = reinterpret_cast<const P*>(&raw);
#pragma unroll
    for (int i = 0; i < 4; i++) {
        float2 f = pair_to_f(h[i]);
        out[2 * i] = f.x; out[2 * i + 1] = f.y;
    }
}
template <> struct Vec<__half> {
    static constexpr int N = 8;
    static __device__ __forceinline__ void convert(uint4 raw, float* out) { convert_pairs<__half2>(raw, out); }
};
template <> struct Vec<__nv_bfloat16> {
    static constexpr int N = 8;
    static __device__ __forceinline__ void convert(uint4 raw, float* out) { convert_pairs<__nv_bfloat162>(raw, out); }
};


// A lane's share of one chunk of a weight row: GEMV_UNROLL 16-byte loads, all in flight at once,
// kept raw (4 registers each) until the arithmetic needs them.
#define GEMV_UNROLL 4
template <typename W>
struct Chunk {
    uint4 v[GEMV_UNROLL];
};

// Loads the chunk starting at k0 of a row of `len` weights.
template <typename W>
__device__ __forceinline__ void load_chunk(const W* __restrict__ wrow, int k0, int len, Chunk<W>& c) {
    constexpr int V = Vec<W>::N;
    int lane = threadIdx.x & 31;
#pragma unroll
    for (int u = 0; u < GEMV_UNROLL; u++) {
        int k = k0 + (u * 32 + lane) * V;
        if (k < len) c.v[u] = *reinterpret_cast<const uint4*>(wrow + k);
    }
}

// acc[m] += this lane's share of dot(x[m * stride + k0 ...], chunk) for m < M.
template <typename W>
__device__ __forceinline__ void fma_chunk(const Chunk<W>& c, const float* x, int M, int len, int stride, int k0,
                                          float (&acc)[GEMV_ROWS]) {
    constexpr int V = Vec<W>::N;
    int lane = threadIdx.x & 31;
#pragma unroll
    for (int u = 0; u < GEMV_UNROLL; u++) {
        int k = k0 + (u * 32 + lane) * V;
        if (k >= len) continue;
        float w[V];
        Vec<W>::convert(c.v[u], w);
#pragma unroll
        for (int m = 0; m < GEMV_ROWS; m++) {
            if (m >= M) break;
            const float* xr = x + (size_t)m * stride + k;
            float s = 0.0f;
#pragma unroll
            for (int j = 0; j < V; j += 4) {
                float4 xv = *reinterpret_cast<const float4*>(xr + j);
                s += xv.x * w[j] + xv.y * w[j + 1] + xv.z * w[j + 2] + xv.w * w[j + 3];
            }
            acc[m] += s;
        }
    }
}

// Whether rows of K weights take the vector path: K a multiple of the vector width, which also
// makes every row 16-byte aligned. A scalar path serves other widths.
template <typename W>
__device__ __forceinline__ bool vector_rows(int K) { return K % Vec<W>::N == 0; }

// acc[m] (this lane's share) += dot(x[m * stride ...], wrow) over `len` weights for m < M, given
// the first chunk already loaded (vector path).
template <typename W>
__device__ __forceinline__ void dot_rows(const W* __restrict__ wrow, const Chunk<W>& first, const float* x, int M,
                                         int len, int stride, bool vec, float (&acc)[GEMV_ROWS]) {
    constexpr int step = 32 * Vec<W>::N * GEMV_UNROLL;
    if (vec) {
        fma_chunk<W>(first, x, M, len, stride, 0, acc);
        for (int k0 = step; k0 < len; k0 += step) {
            Chunk<W> c;
            load_chunk<W>(wrow, k0, len, c);
            fma_chunk<W>(c, x, M, len, stride, k0, acc);
        }
    } else {
        int lane = threadIdx.x & 31;
        for (int k = lane; k < len; k += 32) {
            float wv = to_f(wrow[k]);
#pragma unroll
            for (int m = 0; m < GEMV_ROWS; m++)
                if (m < M) acc[m] += x[(size_t)m * stride + k] * wv;
        }
    }
}

// Input prologue of the decode kernels. IN_PLAIN: rows read from `in` (global). IN_LN: rows of
// `in` layer-normalised into shared memory. IN_EMBED_LN: rows embedded from tokens/positions
// (block 0 also stores them to `x_out`, the residual stream), then normalised into shared memory.
// IN_ATTN: rows combined from attention_decode's per-split partial results (`in`: the unnormalised
// outputs, `att_ml`: each split's running max and sum; only splits below the row's context count),
// into shared memory. Returns the rows to multiply. LayerNorm: one warp per row, two-pass mean and
// variance in fp32.
// Keys per block of attention_decode; the host passes the same value (ATTENTION_SPLIT in imp.rs).
// Fewer, longer blocks measured faster at every row count that uses it: H200, E2E ms, same call,
// twice, 64 / 128 / 256 keys: f16 batch 64 prompt 128 + 128 tokens 70.12 / 70.37, 66.80 / 66.87,
// 66.00 / 65.90; bf16 the same 70.62 / 70.45, 67.28 / 67.05, 66.01 / 66.23; f16 batch 32 49.66 /
// 49.66, 48.31 / 48.31, 47.38 / 47.39; f16 batch 16 39.18 / 39.13, 38.82 / 38.84, 38.69 / 38.39;
// f32 batch 64 128.99 / 129.08, 126.53 / 126.84, 125.98 / 126.07; f16 batch 64 prompt 512 + 64
// 120.47 / 120.15, 116.76 / 116.68, 115.87 / 116.07; f16 batch 16 prompt 896 + 64 73.24 / 73.16,
// 70.79 / 70.49, 70.35 / 70.21. (128 keys with the key loop unrolled 4 times instead of 2: as 128.)
#define ATTENTION_SPLIT 256
enum { IN_PLAIN = 0, IN_LN = 1, IN_EMBED_LN = 2, IN_ATTN = 3 };
template <typename W, int IN>
__device__ __forceinline__ const float* input_rows(const float* in, const int* tokens, const int* pos, const W* wte,
                                                   const W* wpe, float* x_out, const W* gamma, const W* beta,
                                                   float eps, int M, int K, float* smem, const float* att_ml,
                                                   int splits, int H, int split_len) {
    if (IN == IN_PLAIN) return in;
    if (IN == IN_ATTN) {
        int D = K / H;
        for (int i = threadIdx.x; i < M * K; i += blockDim.x) {
            int m = i / K, k = i % K, h = k / D;
            int active = min(splits, pos[m] / split_len + 1);
            const float* ml = att_ml + ((size_t)m * splits * H + h) * 2;
            float mx = -INFINITY;
            for (int sp = 0; sp < active; sp++) mx = fmaxf(mx, ml[(size_t)sp * H * 2]);
            float num = 0.0f, den = 0.0f;
            for (int sp = 0; sp < active; sp++) {
                float w = __expf(ml[(size_t)sp * H * 2] - mx);
                num += w * in[((size_t)m * splits + sp) * K + k];
                den += w * ml[(size_t)sp * H * 2 + 1];
            }
            smem[i] = num / den;
        }
        __syncthreads();
        return smem;
    }
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    for (int m = warp; m < M; m += warps) {
        float* row = smem + (size_t)m * K;
        float s = 0.0f;
        for (int k = lane; k < K; k += 32) {
            float v = IN == IN_EMBED_LN ? to_f(wte[(size_t)tokens[m] * K + k]) + to_f(wpe[(size_t)pos[m] * K + k])
                                        : in[(size_t)m * K + k];
            row[k] = v;
            s += v;
            if (IN == IN_EMBED_LN && blockIdx.x == 0) x_out[(size_t)m * K + k] = v;
        }
        float mean = warp_sum(s) / K;
        float var = 0.0f;
        for (int k = lane; k < K; k += 32) {
            float d = row[k] - mean;
            var += d * d;
        }
        float inv = rsqrtf(warp_sum(var) / K + eps);
        for (int k = lane; k < K; k += 32) row[k] = (row[k] - mean) * inv * to_f(gamma[k]) + to_f(beta[k]);
    }
    __syncthreads();
    return smem;
}

// out[m, n] = epilogue(dot(x[m, :], w[n, :]) + bias[n]) for m < M <= GEMV_MAX_M. Each output column
// belongs to `wpc` consecutive warps of a block (a power of two dividing the block's warps), each
// streaming one share of the row, so every lane has at most a chunk or so of loads: the whole
// weight matrix is requested at once, and read once, whatever M: the rows go by in groups of
// GEMV_ROWS against the weights held in registers. The shares combine in a fixed order through
// shared memory. Modes as matmul_finish: 0 store; 1 store gelu_new; 2 out += (residual); 3 store
// and append the k/v columns to the KV cache at each row's (seq, pos). Dynamic shared memory:
// M * K floats for every prologue but IN_PLAIN (those take M <= GEMV_ROWS).
#define GEMV_MAX_M 64

template <typename W, int IN>
__device__ void gemv(const float* in, const int* tokens, const int* pos, const W* wte, const W* wpe, float* x_out,
                     const W* gamma, const W* beta, float eps, int M, int K, const W* __restrict__ w, int N,
                     const W* bias, float* out, int mode, W* k_cache, W* v_cache, const int* row_seq,
                     int max_seq, const float* att_ml, int splits, int H, int wpc) {
    extern __shared__ float gemv_smem[];
    __shared__ float shares[32][GEMV_ROWS];
    pdl_trigger();
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int n = blockIdx.x * ((blockDim.x >> 5) / wpc) + warp / wpc;
    int share = warp % wpc;
    bool vec = vector_rows<W>(K);
    // This warp's share of the row: [k_begin, k_begin + len), a multiple of the vector width.
    int per = (K + wpc - 1) / wpc;
    if (vec) per = (per + Vec<W>::N - 1) / Vec<W>::N * Vec<W>::N;
    int k_begin = min(K, share * per), len = min(K, k_begin + per) - k_begin;
    const W* wrow = w + (size_t)min(n, N - 1) * K + k_begin;
    Chunk<W> first;
    if (vec) load_chunk<W>(wrow, 0, len, first);
    float bias_n = to_f(bias[min(n, N - 1)]);
    bool owner = share == 0 && n < N;
    pdl_wait();
    float residual = mode == 2 && owner && lane < M ? out[(size_t)lane * N + n] : 0.0f;
    const float* x = input_rows<W, IN>(in, tokens, pos, wte, wpe, x_out, gamma, beta, eps, M, K, gemv_smem, att_ml,
                                       splits, H, ATTENTION_SPLIT);
    for (int g0 = 0; g0 < M; g0 += GEMV_ROWS) {
        int rows = min(GEMV_ROWS, M - g0);
        float acc[GEMV_ROWS];
#pragma unroll
        for (int m = 0; m < GEMV_ROWS; m++) acc[m] = 0.0f;
        dot_rows<W>(wrow, first, x + (size_t)g0 * K + k_begin, rows, len, K, vec, acc);
#pragma unroll
        for (int m = 0; m < GEMV_ROWS; m++) {
            if (m >= rows) break;
            float s = warp_sum(acc[m]);
            if (lane == m) shares[warp][m] = s;
        }
        if (wpc > 1) __syncthreads();
        if (owner && lane < rows) {
            int m = g0 + lane;
            float v = 0.0f;
            for (int i = 0; i < wpc; i++) v += shares[warp + i][lane];
            float r = mode == 2 ? (g0 == 0 ? residual : out[(size_t)m * N + n]) : 0.0f;
            gemv_store(v + bias_n, m, n, N, mode, r, out, k_cache, v_cache, row_seq, pos, max_seq);
        }
        if (wpc > 1) __syncthreads();
    }
}

// acc[c][m] += dot(x[m * stride, +V), w[c]) for the rows m < M and the CB columns whose V weights
// are in w (global_x: the rows are read through L2), as a chain of fused multiply-adds into the
// accumulator: four instructions for four products, where a sum of the four products added to it
// took five (a multiply, three FMAs and an add). H200, same call, E2E ms, twice: f32 batch 8 with
// prompt 128 + 128 tokens 45.83 / 45.82 -> 44.45 / 44.41, prompt 12 + 32 10.04 / 10.04 -> 9.57 /
// 9.59; batch 16 76.06 / 76.20 -> 75.76 / 75.86; batch 1 and f16 within 0.5%.
template <int CB, int V>
__device__ __forceinline__ void fma_columns(const float (&w)[CB][V], const float* x, size_t stride, int M,
                                            bool global_x, float (&acc)[CB][GEMV_ROWS]) {
#pragma unroll
    for (int m = 0; m < GEMV_ROWS; m++) {
        if (m >= M) break;
        const float* xr = x + m * stride;
#pragma unroll
        for (int j = 0; j < V; j += 4) {
            float4 xv = global_x ? __ldcg(reinterpret_cast<const float4*>(xr + j))
                                 : *reinterpret_cast<const float4*>(xr + j);
#pragma unroll
            for (int c = 0; c < CB; c++)
                acc[c][m] = fmaf(xv.w, w[c][j + 3],
                                 fmaf(xv.z, w[c][j + 2], fmaf(xv.y, w[c][j + 1], fmaf(xv.x, w[c][j], acc[c][m]))));
        }
    }
}

// gemv for 2..GEMV_ROWS rows: each warp owns GEMV_COLS adjacent output columns over the same share
// of K, so every input value it loads serves GEMV_COLS weights (the rows' loads, not the weights,
// bound the one-column kernel once there are several rows). Needs the vector path and each
// warp's share within one chunk (the host checks). Lane c * GEMV_ROWS + m finishes (m, n0 + c).
#define GEMV_COLS 4
template <typename W, int IN>
__device__ void gemv_cols(const float* in, const int* tokens, const int* pos, const W* wte, const W* wpe,
                          float* x_out, const W* gamma, const W* beta, float eps, int M, int K,
                          const W* __restrict__ w, int N, const W* bias, float* out, int mode, W* k_cache,
                          W* v_cache, const int* row_seq, int max_seq, const float* att_ml, int splits, int H,
                          int wpc) {
    constexpr int V = Vec<W>::N;
    extern __shared__ float gemv_smem[];
    __shared__ float shares[8][GEMV_COLS][GEMV_ROWS];
    pdl_trigger();
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int n0 = (blockIdx.x * ((blockDim.x >> 5) / wpc) + warp / wpc) * GEMV_COLS;
    int share = warp % wpc;
    int per = ((K + wpc - 1) / wpc + V - 1) / V * V;
    int k_begin = min(K, share * per), len = min(K, k_begin + per) - k_begin;
    Chunk<W> first[GEMV_COLS];
#pragma unroll
    for (int c = 0; c < GEMV_COLS; c++) load_chunk<W>(w + (size_t)min(n0 + c, N - 1) * K + k_begin, 0, len, first[c]);
    int my_c = lane / GEMV_ROWS, my_m = lane % GEMV_ROWS, my_n = n0 + my_c;
    float bias_n = to_f(bias[min(my_n, N - 1)]);
    bool owner = share == 0 && my_n < N && my_m < M;
    pdl_wait();
    float residual = mode == 2 && owner ? out[(size_t)my_m * N + my_n] : 0.0f;
    const float* x = input_rows<W, IN>(in, tokens, pos, wte, wpe, x_out, gamma, beta, eps, M, K, gemv_smem, att_ml,
                                       splits, H, ATTENTION_SPLIT);
    float acc[GEMV_COLS][GEMV_ROWS];
#pragma unroll
    for (int c = 0; c < GEMV_COLS; c++)
#pragma unroll
        for (int m = 0; m < GEMV_ROWS; m++) acc[c][m] = 0.0f;
#pragma unroll
    for (int u = 0; u < GEMV_UNROLL; u++) {
        int k = (u * 32 + lane) * V;
        if (k >= len) continue;
        float wv[GEMV_COLS][V];
#pragma unroll
        for (int c = 0; c < GEMV_COLS; c++) Vec<W>::convert(first[c].v[u], wv[c]);
        fma_columns<GEMV_COLS, V>(wv, x + k_begin + k, K, M, false, acc);
    }
#pragma unroll
    for (int c = 0; c < GEMV_COLS; c++)
#pragma unroll
        for (int m = 0; m < GEMV_ROWS; m++) {
            if (m >= M) break;
            float s = warp_sum(acc[c][m]);
            if (lane == 0) shares[warp][c][m] = s;
        }
    __syncthreads();
    if (!owner) return;
    float v = 0.0f;
    for (int i = 0; i < wpc; i++) v += shares[warp + i][my_c][my_m];
    gemv_store(v + bias_n, my_m, my_n, N, mode, residual, out, k_cache, v_cache, row_seq, pos, max_seq);
}

// Combines attention_decode's per-split results into att[m, :] (the IN_ATTN prologue, for batches
// too large for the fused one); grid (rows, column blocks), a thread a column. O: fp32 rows, or
// the weights' f16/bf16 for a tensor-core product to read as they are.
template <typename O>
__device__ void attention_combine(const float* part, const float* att_ml, const int* pos, int splits, int C, int H,
                                  O* att) {
    pdl_trigger();
    pdl_wait();
    int m = blockIdx.x, D = C / H;
    int active = min(splits, pos[m] / ATTENTION_SPLIT + 1);
    for (int k = blockIdx.y * blockDim.x + threadIdx.x; k < C; k += gridDim.y * blockDim.x) {
        const float* ml = att_ml + ((size_t)m * splits * H + k / D) * 2;
        float mx = -INFINITY;
        for (int sp = 0; sp < active; sp++) mx = fmaxf(mx, ml[(size_t)sp * H * 2]);
        float num = 0.0f, den = 0.0f;
        for (int sp = 0; sp < active; sp++) {
            float w = __expf(ml[(size_t)sp * H * 2] - mx);
            num += w * part[((size_t)m * splits + sp) * C + k];
            den += w * ml[(size_t)sp * H * 2 + 1];
        }
        store_as(att + (size_t)m * C + k, num / den);
    }
}
extern "C" __global__ void attention_combine_f32(const float* part, const float* att_ml, const int* pos, int splits,
                                                 int C, int H, float* att) {
    attention_combine<float>(part, att_ml, pos, splits, C, H, att);
}

// The LM head's unit of work: a warp takes HEAD_ROWS<W> consecutive vocabulary rows at once, so
// each input value it reads serves that many weights; C <= HEAD_SPAN weights of each row are held
// in registers (HEAD_SPAN / (32 lanes x the vector width) 16-byte loads a lane a row: 4 rows of
// halves or 2 of floats, 48 registers), longer rows go by in spans.
#define HEAD_SPAN 768
template <typename W>
struct Head {
    static constexpr int ROWS = sizeof(W) == 4 ? 2 : 4;
    static constexpr int U = HEAD_SPAN / (32 * Vec<W>::N);
};

// Sums every one of the N values (N a power of two, 8..32) of each lane over the warp, halving the
// values at each exchange (N - 1 + log2(32 / N) shuffles instead of 5 N). Lane l gets the total of
// value l * N / 32 (32 / N lanes hold each total).
template <int N, int n = N>
__device__ __forceinline__ void scatter_halves(float (&v)[N], int lane) {
    if constexpr (n > 1) {
        constexpr int o = 16 * n / N;  // 16, 8, ... as the values halve
        bool upper = lane & o;
#pragma unroll
        for (int i = 0; i < n / 2; i++) {
            float send = upper ? v[i] : v[i + n / 2];
            float keep = upper ? v[i + n / 2] : v[i];
            v[i] = keep + __shfl_xor_sync(0xffffffffu, send, o);
        }
        scatter_halves<N, n / 2>(v, lane);
    }
}
template <int N>
__device__ __forceinline__ float warp_sum_scatter(float (&v)[N]) {
    scatter_halves<N>(v, threadIdx.x & 31);
    float s = v[0];
#pragma unroll
    for (int o = 16 / N; o >= 1; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    return s;
}

// L2 eviction priorities (8.0+) for weights read once a step: evict_first for what streams
// through, so that it does not push out what the next step reads again (the KV cache, the
// activations), and evict_last for a part kept from one step to the next.
__device__ __forceinline__ unsigned long long l2_policy(bool last) {
    unsigned long long p = 0;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    if (last)
        asm("createpolicy.fractional.L2::evict_last.b64 %0, 1.0;" : "=l"(p));
    else
        asm("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(p));
#endif
    return p;
}
__device__ __forceinline__ uint4 load_hinted(const void* ptr, unsigned long long policy) {
    uint4 v;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm("ld.global.L2::cache_hint.v4.u32 {%0, %1, %2, %3}, [%4], %5;"
        : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
        : "l"(ptr), "l"(policy));
#else
    v = *reinterpret_cast<const uint4*>(ptr);
#endif
    return v;
}
// 16 bytes of weights: with the L2 priority `policy` (l2_policy) when keep_rows >= 0 (an LM head
// keeping part of itself in L2), else a plain load.
__device__ __forceinline__ uint4 load_weights(const void* ptr, int keep_rows, unsigned long long policy) {
    return keep_rows < 0 ? *reinterpret_cast<const uint4*>(ptr) : load_hinted(ptr, policy);
}

// The LM heads' closing stage: each of the M rows' best (value, index) over the block's WARPS
// warps (their own bests in warp_value/warp_index[warp][m], stored before a __syncthreads) into
// best_value/best_index[m * gridDim.x + blockIdx.x], the first index on ties (argmax_final reads
// them). With seq_len, block 0 also advances the M sequences' positions.
template <int WARPS, int ROWS>
__device__ __forceinline__ void block_best_rows(const float (&warp_value)[WARPS][ROWS], const int (&warp_index)[WARPS][ROWS],
                                                int M, float* best_value, int* best_index, int* seq_len = nullptr) {
    for (int m = threadIdx.x; m < M; m += blockDim.x) {
        float best = -INFINITY;
        int at = 0x7fffffff;
#pragma unroll
        for (int w = 0; w < WARPS; w++)
            if (better(warp_value[w][m], warp_index[w][m], best, at)) { best = warp_value[w][m]; at = warp_index[w][m]; }
        best_value[m * gridDim.x + blockIdx.x] = best;
        best_index[m * gridDim.x + blockIdx.x] = at;
        if (seq_len != nullptr && blockIdx.x == 0) seq_len[m] += 1;
    }
}

// Logits and the first stage of the greedy argmax for M <= MAXM rows of x (C floats each, shared
// or global memory): the warp's items (HEAD_ROWS<W> consecutive vocabulary rows each) are item0,
// item0 + stride, ...; each item's weights are read once for all M rows, which go by in groups of
// GEMV_ROWS. The logits are stored and the best (value, index) of each row kept; block b then
// stores them into best_value/best_index[m * gridDim.x + b] (first index on ties). When `seq_len`
// is not NULL, block 0 then advances the positions of the M sequences (the step's last work).
// keep_rows >= 0: the weights of the vocabulary rows below it are read with L2 priority
// evict_last, the others evict_first (l2_policy); -1 (the default): plain loads.
template <typename W, int WARPS, int MAXM>
__device__ void lm_head_rows(const float* x, int M, const W* __restrict__ wte, int V, int C, int item0, int stride,
                             float* logits, float* best_value, int* best_index, int* seq_len, int keep_rows = -1) {
    constexpr int R = Head<W>::ROWS, U = Head<W>::U, VW = Vec<W>::N, N = R * GEMV_ROWS;
    constexpr int GROUPS = MAXM / GEMV_ROWS;
    __shared__ float warp_value[WARPS][MAXM];
    __shared__ int warp_index[WARPS][MAXM];
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    bool vec = vector_rows<W>(C);
    // The (row of the item, row of the group) whose total this lane gets from warp_sum_scatter.
    int mine = lane * N / 32, my_r = mine / GEMV_ROWS, my_m = mine % GEMV_ROWS;
    float bv[GROUPS];
    int bi[GROUPS];
#pragma unroll
    for (int g = 0; g < GROUPS; g++) { bv[g] = -INFINITY; bi[g] = 0x7fffffff; }
    for (int v0 = item0 * R; v0 < V; v0 += stride * R) {
        uint4 w[R][U];
        unsigned long long policy = keep_rows < 0 ? 0 : l2_policy(v0 < keep_rows);
        auto load = [&](int k0) {
#pragma unroll
            for (int r = 0; r < R; r++) {
                const W* row = wte + (size_t)min(v0 + r, V - 1) * C;
#pragma unroll
                for (int u = 0; u < U; u++) {
                    int k = k0 + (u * 32 + lane) * VW;
                    if (k < C)
                        w[r][u] = load_weights(row + k, keep_rows, policy);
                }
            }
        };
        if (vec) load(0);
#pragma unroll
        for (int g = 0; g < GROUPS; g++) {
            int g0 = g * GEMV_ROWS;
            if (g0 >= M) break;
            int rows = min(GEMV_ROWS, M - g0);
            float acc[N];
#pragma unroll
            for (int i = 0; i < N; i++) acc[i] = 0.0f;
            if (vec) {
                for (int k0 = 0; k0 < C; k0 += HEAD_SPAN) {
                    // Rows longer than a span reload theirs (through L1) for each group after the first.
                    if (k0 > 0 || (g > 0 && C > HEAD_SPAN)) load(k0);
#pragma unroll
                    for (int u = 0; u < U; u++) {
                        int k = k0 + (u * 32 + lane) * VW;
                        if (k >= C) continue;
                        float wf[R][VW];
#pragma unroll
                        for (int r = 0; r < R; r++) Vec<W>::convert(w[r][u], wf[r]);
#pragma unroll
                        for (int m = 0; m < GEMV_ROWS; m++) {
                            if (m >= rows) break;
                            const float* xr = x + (size_t)(g0 + m) * C + k;
#pragma unroll
                            for (int j = 0; j < VW; j += 4) {
                                float4 xv = *reinterpret_cast<const float4*>(xr + j);
#pragma unroll
                                for (int r = 0; r < R; r++)
                                    acc[r * GEMV_ROWS + m] += xv.x * wf[r][j] + xv.y * wf[r][j + 1] +
                                                              xv.z * wf[r][j + 2] + xv.w * wf[r][j + 3];
                            }
                        }
                    }
                }
            } else {
                for (int k = lane; k < C; k += 32) {
#pragma unroll
                    for (int r = 0; r < R; r++) {
                        float wv = to_f(wte[(size_t)min(v0 + r, V - 1) * C + k]);
#pragma unroll
                        for (int m = 0; m < GEMV_ROWS; m++)
                            if (m < rows) acc[r * GEMV_ROWS + m] += x[(size_t)(g0 + m) * C + k] * wv;
                    }
                }
            }
            float s = warp_sum_scatter<N>(acc);
            int v = v0 + my_r;
            if (v < V && my_m < rows) {
                logits[(size_t)(g0 + my_m) * V + v] = s;
                if (better(s, v, bv[g], bi[g])) { bv[g] = s; bi[g] = v; }
            }
        }
    }
    // Lanes holding the same row of a group (they differ in the item-row bits of the lane) pick
    // their best; the first 8 * 32 / N lanes then hold every row's.
#pragma unroll
    for (int g = 0; g < GROUPS; g++) {
#pragma unroll
        for (int o = 8 * 32 / N; o < 32; o <<= 1) best_xor(bv[g], bi[g], o);
        int m = g * GEMV_ROWS + my_m;
        if (my_r == 0 && lane % (32 / N) == 0 && m < M) {
            warp_value[warp][m] = bv[g];
            warp_index[warp][m] = bi[g];
        }
    }
    __syncthreads();
    block_best_rows(warp_value, warp_index, M, best_value, best_index, seq_len);
}

// Asks L2 for the weights of the warp's first LM-head item (before work that does not need them).
template <typename W>
__device__ __forceinline__ void lm_head_prefetch(const W* wte, int V, int C, int item0) {
    int v0 = item0 * Head<W>::ROWS;
    if (v0 >= V) return;
    const char* p = reinterpret_cast<const char*>(wte + (size_t)v0 * C);
    size_t bytes = (size_t)(min(V, v0 + Head<W>::ROWS) - v0) * C * sizeof(W);
    for (size_t i = (threadIdx.x & 31) * 128; i < bytes; i += 32 * 128)
        asm volatile("prefetch.global.L2 [%0];" ::"l"(p + i));
}

// Final LayerNorm (IN_LN, M <= GEMV_ROWS; or rows already normalised, IN_PLAIN) + LM head + the
// first stage of the greedy argmax, for M <= GEMV_MAX_M rows (lm_head_rows, 8 warps a block,
// vocabulary items in a grid stride). argmax_final picks among the blocks' results. Dynamic shared
// memory: M * C floats for IN_LN.
template <typename W, int IN>
__device__ void lm_head_fused(const float* h, const W* gamma, const W* beta, float eps, int M, const W* __restrict__ wte,
                              int V, int C, float* logits, float* best_value, int* best_index, int* seq_len) {
    extern __shared__ float gemv_smem[];
    pdl_trigger();
    int warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    int item0 = blockIdx.x * warps + warp;
    lm_head_prefetch<W>(wte, V, C, item0);
    pdl_wait();
    const float* x =
        input_rows<W, IN>(h, nullptr, nullptr, nullptr, nullptr, nullptr, gamma, beta, eps, M, C, gemv_smem, nullptr, 1, 1, 1);
    lm_head_rows<W, 8, GEMV_MAX_M>(x, M, wte, V, C, item0, gridDim.x * warps, logits, best_value, best_index, seq_len);
}

#define GEMV_KERNEL(W, S, NAME, IN)                                                                               \
    extern "C" __global__ void gemv_##NAME##_##S(const float* in, const int* tokens, const int* pos, const W* wte,  \
                                                 const W* wpe, float* x_out, const W* g, const W* b, float eps,    \
                                                 int M, int K, const W* w, int N, const W* bias, float* out,       \
                                                 int mode, W* kc, W* vc, const int* rs, int max_seq,               \
                                                 const float* att_ml, int splits, int H, int wpc) {               \
        gemv<W, IN>(in, tokens, pos, wte, wpe, x_out, g, b, eps, M, K, w, N, bias, out, mode, kc, vc, rs,         \
                    max_seq, att_ml, splits, H, wpc);                                                             \
    }

#define LM_HEAD_KERNEL(W, S, NAME, IN)                                                                            \
    extern "C" __global__ void lm_head_##NAME##_##S(const float* h, const W* g, const W* b, float eps, int M,      \
                                                  const W* wte, int V, int C, float* logits, float* bv, int* bi,   \
                                                  int* seq_len) {                                                 \
        lm_head_fused<W, IN>(h, g, b, eps, M, wte, V, C, logits, bv, bi, seq_len);                                \
    }

#define GEMV_COLS_KERNEL(W, S, NAME, IN)                                                                          \
    extern "C" __global__ void gemv_cols_##NAME##_##S(                                                            \
        const float* in, const int* tokens, const int* pos, const W* wte, const W* wpe, float* x_out, const W* g,  \
        const W* b, float eps, int M, int K, const W* w, int N, const W* bias, float* out, int mode, W* kc,        \
        W* vc, const int* rs, int max_seq, const float* att_ml, int splits, int H, int wpc) {                  \
        gemv_cols<W, IN>(in, tokens, pos, wte, wpe, x_out, g, b, eps, M, K, w, N, bias, out, mode, kc, vc, rs,    \
                         max_seq, att_ml, splits, H, wpc);                                                        \
    }

#define INSTANTIATE(W, S)                                                                                         \
    extern "C" __global__ void embed_##S(const int* t, const int* p, const W* wte, const W* wpe, float* x, int C) { \
        embed<W>(t, p, wte, wpe, x, C);                                                                           \
    }                                                                                                             \
    extern "C" __global__ void layer_norm_##S(const float* x, const W* g, const W* b, float* o, int C, float eps) { \
        layer_norm<W, float>(x, g, b, o, C, eps);                                                                 \
    }                                                                                                             \
    extern "C" __global__ void matmul_tiled_##S(const float* in, int M, int K, const W* w, int N, float* part,    \
                                                int kps) {                                                        \
        matmul_tiled<W>(in, M, K, w, N, part, kps);                                                               \
    }                                                                                                             \
    extern "C" __global__ void matmul_finish_##S(const float* part, int splits, int M, int N, const W* bias,       \
                                                 float* out, int mode, W* kc, W* vc, const int* rs,               \
                                                 const int* rp, int max_seq) {                                    \
        matmul_finish<W>(part, splits, M, N, bias, out, mode, kc, vc, rs, rp, max_seq);                           \
    }                                                                                                             \
    extern "C" __global__ void matmul_finish_rows_##S(const float* part, int splits, int M, int N, const W* bias,  \
                                                      float* out, int mode, W* kc, W* vc, const int* rs,          \
                                                      const int* rp, int max_seq) {                               \
        matmul_finish_rows<W>(part, splits, M, N, bias, out, mode, kc, vc, rs, rp, max_seq);                      \
    }                                                                                                             \
    extern "C" __global__ void lm_head_##S(const float* h, int M, const W* wte, int V, int C, float* logits) {    \
        lm_head<W>(h, M, wte, V, C, logits);                                                                      \
    }                                                                                                             \
    GEMV_KERNEL(W, S, plain, IN_PLAIN)                                                                            \
    GEMV_KERNEL(W, S, ln, IN_LN)                                                                                  \
    GEMV_KERNEL(W, S, embed_ln, IN_EMBED_LN)                                                                      \
    GEMV_KERNEL(W, S, attn, IN_ATTN)                                                                              \
    GEMV_COLS_KERNEL(W, S, plain, IN_PLAIN)                                                                       \
    GEMV_COLS_KERNEL(W, S, ln, IN_LN)                                                                             \
    GEMV_COLS_KERNEL(W, S, embed_ln, IN_EMBED_LN)                                                                 \
    GEMV_COLS_KERNEL(W, S, attn, IN_ATTN)                                                                         \
    LM_HEAD_KERNEL(W, S, ln, IN_LN)                                                                               \
    LM_HEAD_KERNEL(W, S, plain, IN_PLAIN)

// logits[m, v] = dot(h[m, :], wte[v, :]); one warp per vocabulary row, 8 rows of h at a time.
// Lanes read four consecutive weights at once when C is a multiple of 4 (GPT-2: 768).
template <typename W>
__device__ void lm_head(const float* h, int M, const W* wte, int V, int C, float* logits) {
    pdl_trigger();
    pdl_wait();
    int warp = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    int lane = threadIdx.x & 31;
    if (warp >= V) return;
    const W* row = wte + (size_t)warp * C;
    bool vec = (C & 3) == 0;
    for (int m0 = 0; m0 < M; m0 += GEMV_ROWS) {
        int rows = min(GEMV_ROWS, M - m0);
        float acc[GEMV_ROWS];
#pragma unroll
        for (int i = 0; i < GEMV_ROWS; i++) acc[i] = 0.0f;
        if (vec) {
#pragma unroll 2
            for (int c = lane * 4; c < C; c += 128) {
                float4 wv = load4(row + c);
#pragma unroll
                for (int i = 0; i < GEMV_ROWS; i++)
                    if (i < rows) {
                        float4 hv = *reinterpret_cast<const float4*>(h + (size_t)(m0 + i) * C + c);
                        acc[i] += hv.x * wv.x + hv.y * wv.y + hv.z * wv.z + hv.w * wv.w;
                    }
            }
        } else {
            for (int c = lane; c < C; c += 32) {
                float wv = to_f(row[c]);
#pragma unroll
                for (int i = 0; i < GEMV_ROWS; i++)
                    if (i < rows) acc[i] += h[(size_t)(m0 + i) * C + c] * wv;
            }
        }
        for (int i = 0; i < rows; i++) {
            float s = warp_sum(acc[i]);
            if (lane == 0) logits[(size_t)(m0 + i) * V + warp] = s;
        }
    }
}

INSTANTIATE(float, f32)
INSTANTIATE(__half, f16)
INSTANTIATE(__nv_bfloat16, bf16)

// ---- Tensor-core matrix product for the half modes (sm_80+), larger M (prefill, big batches) ----
// The same contract as matmul_tiled: in[M, K] f32, w[N, K] f16/bf16, grid (ceil(N/64),
// ceil(M/64), splits), partial[split][m][n] (finished by matmul_finish, or the logits themselves
// when there is one split). The activations are rounded to the weights' type on the way into
// shared memory, as PyTorch's half modes do; products accumulate in fp32 (mma.sync m16n8k16).
// 128 threads: warp j computes rows 0..63 x columns 16j..16j+15 of the block's 64x64 tile, from
// k-slices staged in shared memory (the next slice's loads are in flight during the math).
// The k-slices (SLICE) are 32 or 64: 64 halves the rounds of a block's loop (fewer rows: its few
// slices are latency), 32 keeps more blocks resident (many rows). Shared rows are SLICE + 8 halves
// (80 or 144 bytes), so a fragment load hits 32 distinct banks. The `_half` instances take rows
// already in the weights' type (layer_norm_half's, rounded the same way), half the bytes to read:
// every column tile of a product reads all of its rows.

__device__ __forceinline__ void copy_async16(void* dst, const void* src) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    unsigned int s = (unsigned int)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(s), "l"(src) : "memory");
#else
    *reinterpret_cast<uint4*>(dst) = __ldcg(reinterpret_cast<const uint4*>(src));
#endif
}
__device__ __forceinline__ void copy_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("cp.async.commit_group;" ::: "memory");
#endif
}
// Waits for this thread's copies of every committed group but the newest.
__device__ __forceinline__ void copy_wait_all_but_newest() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("cp.async.wait_group 1;" ::: "memory");
#endif
}
// Copies 16 bytes from src, or (valid false) stores 16 zero bytes; src must be a valid address
// either way.
__device__ __forceinline__ void copy_async16_or_zero(void* dst, const void* src, bool valid) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    unsigned int s = (unsigned int)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(s), "l"(src), "r"(valid ? 16 : 0) : "memory");
#else
    *reinterpret_cast<uint4*>(dst) = valid ? __ldcg(reinterpret_cast<const uint4*>(src)) : make_uint4(0, 0, 0, 0);
#endif
}
// Waits for this thread's copies of every committed group but the newest PENDING.
template <int PENDING>
__device__ __forceinline__ void copy_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("cp.async.wait_group %0;" ::"n"(PENDING) : "memory");
#endif
}

template <typename W> struct Mma;
template <> struct Mma<__half> {
    static __device__ __forceinline__ unsigned int pack(float a, float b) {
        __half2 h = __floats2half2_rn(a, b);
        return *reinterpret_cast<unsigned int*>(&h);
    }
    static __device__ __forceinline__ void run(float* d, const unsigned int* a, const unsigned int* b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
            "{%0,%1,%2,%3};"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
    }
};
template <> struct Mma<__nv_bfloat16> {
    static __device__ __forceinline__ unsigned int pack(float a, float b) {
        __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
        return *reinterpret_cast<unsigned int*>(&h);
    }
    static __device__ __forceinline__ void run(float* d, const unsigned int* a, const unsigned int* b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
            "{%0,%1,%2,%3};"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
    }
};

// The block tile of matmul_mma and matmul_mma_ring (64 rows x 64 columns, 128 threads): warp j
// holds rows 0..63 x columns 16j..16j+15 in acc[row group of 16][column group of 8][4].
// mma_tile_slice adds one staged slice of SL k (rows a_s and weight rows w_s in shared memory,
// ST halves apart), 16 k at a time in order; mma_tile_store writes the tile's rows < M and
// columns < N of out (M x N).
template <typename W, int SL, int ST>
__device__ __forceinline__ void mma_tile_slice(const unsigned short* a_s, const unsigned short* w_s,
                                               float (&acc)[4][2][4]) {
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, tig = lane & 3;
#pragma unroll
    for (int ks = 0; ks < SL; ks += 16) {
        unsigned int b[2][2];
#pragma unroll
        for (int j = 0; j < 2; j++) {
            const unsigned short* row = w_s + (warp * 16 + j * 8 + g) * ST + ks + tig * 2;
            b[j][0] = *reinterpret_cast<const unsigned int*>(row);
            b[j][1] = *reinterpret_cast<const unsigned int*>(row + 8);
        }
#pragma unroll
        for (int i = 0; i < 4; i++) {
            const unsigned short* r0 = a_s + (i * 16 + g) * ST + ks + tig * 2;
            const unsigned short* r1 = r0 + 8 * ST;
            unsigned int a[4] = {*reinterpret_cast<const unsigned int*>(r0), *reinterpret_cast<const unsigned int*>(r1),
                                 *reinterpret_cast<const unsigned int*>(r0 + 8),
                                 *reinterpret_cast<const unsigned int*>(r1 + 8)};
#pragma unroll
            for (int j = 0; j < 2; j++) Mma<W>::run(acc[i][j], a, b[j]);
        }
    }
}
// Calls f(row, column, value, next column's value) for each pair of adjacent outputs this thread
// holds of the block tile: rows i * 16 + g + 8h, columns warp * 16 + j * 8 + tig * 2 (and + 1),
// from acc[i][j][2h] and acc[i][j][2h + 1] (the m16n8 accumulator layout).
template <typename F>
__device__ __forceinline__ void mma_tile_pairs(const float (&acc)[4][2][4], F f) {
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, tig = lane & 3;
#pragma unroll
    for (int i = 0; i < 4; i++)
#pragma unroll
        for (int j = 0; j < 2; j++)
#pragma unroll
            for (int h = 0; h < 2; h++)
                f(i * 16 + g + 8 * h, warp * 16 + j * 8 + tig * 2, acc[i][j][2 * h], acc[i][j][2 * h + 1]);
}
__device__ __forceinline__ void mma_tile_store(const float (&acc)[4][2][4], float* out, int M, int N, int m0, int n0) {
    mma_tile_pairs(acc, [&](int r, int c, float x, float y) {
        int m = m0 + r, n = n0 + c;
        if (m >= M) return;
        if (n < N) out[(size_t)m * N + n] = x;
        if (n + 1 < N) out[(size_t)m * N + n + 1] = y;
    });
}

// ---- Split-K inside a thread-block cluster (9.0+): no partial sums in global memory. ----
//
// The `_cluster` instances of matmul_mma and matmul_mma_ring (32-k slices: steps of 17-64 rows)
// launch with a cluster of `splits` blocks along z (one tile, every split of its k): block r sums
// the r-th share of the tile's outputs over the cluster's blocks (their partial tiles sent to it
// through distributed shared memory, see mma_cluster_finish), in split order, adds the bias and
// stores them by `mode` (gemv_store), in place of matmul_finish, its launch and the partial sums'
// trip through L2.

// Where a cluster product's outputs go: matmul_finish's arguments (out in the weights' type where
// half_out, else fp32).
template <typename W> struct ClusterOut {
    const W* bias;
    void* out;
    int half_out, mode;
    W *k_cache, *v_cache;
    const int *row_seq, *row_pos;
    int max_seq;
};

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
__device__ __forceinline__ unsigned int cluster_rank() {
    unsigned int r;
    asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(r));
    return r;
}
__device__ __forceinline__ unsigned int cluster_blocks() {
    unsigned int r;
    asm volatile("mov.u32 %0, %%cluster_nctarank;" : "=r"(r));
    return r;
}
#endif

// Exchanges between the blocks of a cluster (sm_90+): a block sends its values into the receivers'
// shared memory (st.async, or a bulk copy from its own shared memory), each send completing its
// bytes on the receiver's mbarrier, and a receiver waits for its mbarrier alone. They replace a
// cluster barrier and loads from the other blocks' shared memory (ld.shared::cluster): the
// barrier's release (barrier.cluster.arrive.release) compiles to a GPU-wide memory barrier
// (MEMBAR.ALL.GPU), which waits for every global store the block has in flight. H200, E2E ms,
// same call, twice, before / after: f16 batch 1 (the cluster step, three exchanges a layer) prompt
// 128 + 128 tokens 18.19 / 18.17 -> 15.99 / 15.95, prompt 12 + 32 4.56 / 4.58 -> 3.95 / 4.02;
// bf16 18.20 / 18.18 -> 16.10 / 16.07; the products of 17-64 rows (mma_cluster_finish) f16 batch
// 64 prompt 128 + 128 65.41 / 65.61 -> 63.45 / 63.32, batch 32 prompt 12 + 32 9.61 / 9.58 -> 8.98
// / 9.03, batch 24 8.88 / 8.77 -> 8.31 / 8.31. Every block's trace of the cluster step, f16: 124.1
// -> 107.3 us a step.
// Sends float pair {a, b} to `dst` (8-byte aligned, shared memory of this block) in the cluster's
// block `rank`, completing 8 bytes on that block's `bar` (mbarrier at the same offset).
__device__ __forceinline__ void send_pair(const float* dst, const unsigned long long* bar, unsigned int rank, float a,
                                          float b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    unsigned int d = (unsigned int)__cvta_generic_to_shared(dst), m = (unsigned int)__cvta_generic_to_shared(bar);
    asm volatile("mapa.shared::cluster.u32 %0, %0, %1;" : "+r"(d) : "r"(rank));
    asm volatile("mapa.shared::cluster.u32 %0, %0, %1;" : "+r"(m) : "r"(rank));
    asm volatile("st.async.shared::cluster.mbarrier::complete_tx::bytes.v2.f32 [%0], {%1, %2}, [%3];" ::"r"(d), "f"(a),
                 "f"(b), "r"(m)
                 : "memory");
#endif
}
// One float, as send_pair.
__device__ __forceinline__ void send_one(const float* dst, const unsigned long long* bar, unsigned int rank, float a) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    unsigned int d = (unsigned int)__cvta_generic_to_shared(dst), m = (unsigned int)__cvta_generic_to_shared(bar);
    asm volatile("mapa.shared::cluster.u32 %0, %0, %1;" : "+r"(d) : "r"(rank));
    asm volatile("mapa.shared::cluster.u32 %0, %0, %1;" : "+r"(m) : "r"(rank));
    asm volatile("st.async.shared::cluster.mbarrier::complete_tx::bytes.f32 [%0], %1, [%2];" ::"r"(d), "f"(a), "r"(m)
                 : "memory");
#endif
}
// Copies `bytes` (a multiple of 16; both ends 16-byte aligned) from this block's shared memory at
// `src` to `dst` (the same offset) in the cluster's block `rank`, completing on that block's `bar`.
// The source's writes must be ordered before it (fence.proxy.async.shared::cta, then a block
// barrier), and no thread may write it until the copy is done (the receiver has it).
__device__ __forceinline__ void copy_to_block(const float* dst, const float* src, unsigned int bytes,
                                              const unsigned long long* bar, unsigned int rank) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    unsigned int d = (unsigned int)__cvta_generic_to_shared(dst), m = (unsigned int)__cvta_generic_to_shared(bar);
    unsigned int from = (unsigned int)__cvta_generic_to_shared(src);
    asm volatile("mapa.shared::cluster.u32 %0, %0, %1;" : "+r"(d) : "r"(rank));
    asm volatile("mapa.shared::cluster.u32 %0, %0, %1;" : "+r"(m) : "r"(rank));
    asm volatile(
        "cp.async.bulk.shared::cluster.shared::cta.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(d),
        "r"(from), "r"(bytes), "r"(m)
        : "memory");
#endif
}
// Thread 0: this block's use u of an exchange's mbarrier expects `bytes` (its one arrival).
__device__ __forceinline__ void receive_expect(unsigned long long* bar, unsigned int bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    unsigned int a = (unsigned int)__cvta_generic_to_shared(bar);
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(a), "r"(bytes) : "memory");
#endif
}
// Every thread: waits until use u (parity u & 1) of the mbarrier completes; with CLUSTER, acquiring
// at cluster scope (what other blocks sent), else at the block's (its own bulk copies).
template <bool CLUSTER>
__device__ __forceinline__ void mbar_wait(unsigned long long* bar, int u) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    unsigned int a = (unsigned int)__cvta_generic_to_shared(bar), done = 0;
    while (!done) {
        if constexpr (CLUSTER)
            asm volatile(
                "{\n\t.reg .pred p;\n\tmbarrier.try_wait.parity.acquire.cluster.shared::cta.b64 p, [%1], %2;\n\t"
                "selp.u32 %0, 1, 0, p;\n\t}"
                : "=r"(done)
                : "r"(a), "r"(u & 1)
                : "memory");
        else
            asm volatile(
                "{\n\t.reg .pred p;\n\tmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n\t"
                "selp.u32 %0, 1, 0, p;\n\t}"
                : "=r"(done)
                : "r"(a), "r"(u & 1)
                : "memory");
    }
#endif
}
// Every thread: waits until use u of the mbarrier has every byte sent to it.
__device__ __forceinline__ void receive_wait(unsigned long long* bar, int u) { mbar_wait<true>(bar, u); }

// Most blocks a cluster product may have (the sums below unroll over them).
#define CLUSTER_MAX 16

// The sums below: block r owns the r-th share of the tile's outputs (rows * 64 of them, in shares
// of a multiple of 4, so that each share is whole 16-byte pieces). Every block stages its partial
// tile in its own shared memory and sends each owner its share with one bulk copy (copy_to_block,
// into the owner's `recv` at the sender's rank times the share); the owner waits for its mbarrier
// alone, then adds the senders' partials in rank (split) order. Before, each block read the other
// blocks' tiles after a cluster barrier, twice a product (see the exchanges above). (One st.async
// a pair of outputs instead of the bulk copies: 2048 sends and mbarrier updates a block at 64
// rows, and slower: H200, f16 batch 64, prompt 128 + 128 tokens 65.2 -> 73.7 ms.)
struct ClusterShare {
    int total, share;
    unsigned int rank, blocks;
};
__device__ __forceinline__ ClusterShare cluster_share(int M, int m0) {
    ClusterShare s{};
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    s.rank = cluster_rank();
    s.blocks = cluster_blocks();
    s.total = min(64, M - m0) * 64;
    s.share = (((s.total + (int)s.blocks - 1) / (int)s.blocks) + 3) & ~3;
#endif
    return s;
}
// Floats of the share of block q (from 0; none past the tile).
__device__ __forceinline__ int share_len(const ClusterShare& s, int q) {
    return max(0, min(s.total, (q + 1) * s.share) - q * s.share);
}
// Floats a block's `recv` holds: every sender's share (blocks x a share below 4096 / blocks + 4).
#define CLUSTER_RECV (64 * 64 + 4 * CLUSTER_MAX)

// At the start of a cluster product (before its loads): thread 0 sets up the block's mbarrier
// and expects its share's bytes from every block; every thread arrives (relaxed) at the cluster
// barrier mma_cluster_finish waits on before its first copy, so that no block sends to an
// mbarrier not yet set up.
__device__ __forceinline__ void mma_cluster_start(unsigned long long* bar, int M, int m0) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    if (threadIdx.x == 0) {
        ClusterShare s = cluster_share(M, m0);
        // (A single block sums its own tile: nothing sent.)
        unsigned int a = (unsigned int)__cvta_generic_to_shared(bar);
        unsigned int bytes = s.blocks > 1 ? s.blocks * share_len(s, s.rank) * 4 : 0;
        asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(a) : "memory");
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
        receive_expect(bar, bytes);
    }
    asm volatile("barrier.cluster.arrive.relaxed.aligned;" ::: "memory");
#endif
}

// The cluster's sum of this block's tile `acc` (at m0, n0 of M x N) into `o`, through `stage`
// (64 x 64 floats no thread still reads or writes), `recv` (CLUSTER_RECV floats no thread reads or
// writes but these sums) and `bar` (mma_cluster_start's).
template <typename W>
__device__ void mma_cluster_finish(const float (&acc)[4][2][4], float* stage, float* recv, unsigned long long* bar,
                                   int M, int N, int m0, int n0, const ClusterOut<W>& o) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    ClusterShare s = cluster_share(M, m0);
    int rows = s.total >> 6;
    mma_tile_pairs(acc, [&](int r, int c, float x, float y) {
        if (r < rows) *reinterpret_cast<float2*>(stage + r * 64 + c) = make_float2(x, y);
    });
    // The staged tile (generic writes) before the copies' reads (async proxy).
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
    __syncthreads();
    // Every block has set up its mbarrier.
    asm volatile("barrier.cluster.wait.aligned;" ::: "memory");
    if (s.blocks > 1 && threadIdx.x < s.blocks) {
        int q = threadIdx.x, len = share_len(s, q);
        if (len > 0) copy_to_block(recv + s.rank * s.share, stage + q * s.share, len * 4, bar, q);
    }
    receive_wait(bar, 0);
    // This block has every share sent to it; once every block has, every copy has read its
    // source, and a block may leave (the wait below).
    asm volatile("barrier.cluster.arrive.relaxed.aligned;" ::: "memory");
    const float* from = s.blocks > 1 ? recv : stage;
    int e0 = s.rank * s.share, e1 = min(s.total, e0 + s.share);
    for (int e = e0 + threadIdx.x; e < e1; e += blockDim.x) {
        int r = e >> 6, c = e & 63, m = m0 + r, n = n0 + c;
        if (n >= N) continue;
        const float* mine = from + (e - e0);
        float v = mine[0];
#pragma unroll
        for (int b = 1; b < CLUSTER_MAX; b++)
            if (b < (int)s.blocks) v += mine[b * s.share];
        v += to_f(o.bias[n]);
        if (o.half_out) {
            W* out = static_cast<W*>(o.out);
            float residual = o.mode == 2 ? to_f(out[(size_t)m * N + n]) : 0.0f;
            gemv_store(v, m, n, N, o.mode, residual, out, o.k_cache, o.v_cache, o.row_seq, o.row_pos, o.max_seq);
        } else {
            float* out = static_cast<float*>(o.out);
            float residual = o.mode == 2 ? out[(size_t)m * N + n] : 0.0f;
            gemv_store(v, m, n, N, o.mode, residual, out, o.k_cache, o.v_cache, o.row_seq, o.row_pos, o.max_seq);
        }
    }
    asm volatile("barrier.cluster.wait.aligned;" ::: "memory");
#endif
}

// A cluster product's receiving buffer and mbarrier, and (for matmul_mma, whose staging is
// small) its tile's staging.
struct ClusterRecv {
    float* recv;
    unsigned long long* bar;
};
__device__ __forceinline__ ClusterRecv cluster_recv() {
    __shared__ __align__(16) float recv[CLUSTER_RECV];
    __shared__ unsigned long long bar;
    return {recv, &bar};
}
__device__ __forceinline__ float* cluster_stage() {
    __shared__ __align__(16) float stage[64 * 64];
    return stage;
}

// Requires K % 16 == 0 (16-byte weight loads, whole 8-k chunks) and k_per_split % SLICE == 0.
template <typename W, int SLICE, typename A = float, bool CLUSTER = false>
__device__ void matmul_mma(const A* __restrict__ in, int M, int K, const W* __restrict__ w, int N,
                           float* partial, int k_per_split, const ClusterOut<W>& co = {}) {
    constexpr int MMA_SLICE = SLICE, MMA_STRIDE = SLICE + 8;
    __shared__ __align__(16) unsigned short a_s[64 * MMA_STRIDE];
    __shared__ __align__(16) unsigned short w_s[64 * MMA_STRIDE];
    int t = threadIdx.x;
    int m0 = blockIdx.y * 64, n0 = blockIdx.x * 64;
    int k0 = blockIdx.z * k_per_split, k1 = min(K, k0 + k_per_split);
    // This thread's share of a slice: row (and weight row) t / 2, SLICE / 2 k from
    // (t % 2) * SLICE / 2.
    constexpr int HALF = MMA_SLICE / 2;
    int lr = t >> 1, lk = (t & 1) * HALF;
    bool a_ok = m0 + lr < M, w_ok = n0 + lr < N;
    const A* a_src = in + (size_t)(m0 + lr) * K + lk;
    const W* w_src = w + (size_t)(n0 + lr) * K + lk;
    // Rows in fp32 (converted on the way into shared memory) or already in the weights' type.
    constexpr bool A_HALF = sizeof(A) == 2;
    float4 a_reg[A_HALF ? 1 : HALF / 4];
    uint4 a_raw[A_HALF ? HALF / 8 : 1];
    uint4 w_reg[HALF / 8];
    // The last slice may be short: k1 - kb is a multiple of 16 (K % 16 == 0), so each 8 k are
    // whole; those past k1 load as zeros.
    auto load_w = [&](int kb) {
#pragma unroll
        for (int i = 0; i < HALF / 8; i++)
            w_reg[i] = (w_ok && kb + lk + 8 * i < k1) ? *reinterpret_cast<const uint4*>(w_src + kb + 8 * i)
                                                       : make_uint4(0, 0, 0, 0);
    };
    auto load_a = [&](int kb) {
        if constexpr (A_HALF) {
#pragma unroll
            for (int i = 0; i < HALF / 8; i++)
                a_raw[i] = (a_ok && kb + lk + 8 * i < k1) ? *reinterpret_cast<const uint4*>(a_src + kb + 8 * i)
                                                          : make_uint4(0, 0, 0, 0);
        } else {
#pragma unroll
            for (int i = 0; i < HALF / 4; i++)
                a_reg[i] = (a_ok && kb + lk + 4 * i < k1) ? *reinterpret_cast<const float4*>(a_src + kb + 4 * i)
                                                           : make_float4(0, 0, 0, 0);
        }
    };
    auto store = [&]() {
        uint4* a_dst = reinterpret_cast<uint4*>(a_s + lr * MMA_STRIDE + lk);
#pragma unroll
        for (int i = 0; i < HALF / 8; i++) {
            if constexpr (A_HALF) {
                a_dst[i] = a_raw[i];
            } else {
                a_dst[i] = make_uint4(Mma<W>::pack(a_reg[2 * i].x, a_reg[2 * i].y),
                                      Mma<W>::pack(a_reg[2 * i].z, a_reg[2 * i].w),
                                      Mma<W>::pack(a_reg[2 * i + 1].x, a_reg[2 * i + 1].y),
                                      Mma<W>::pack(a_reg[2 * i + 1].z, a_reg[2 * i + 1].w));
            }
        }
        uint4* w_dst = reinterpret_cast<uint4*>(w_s + lr * MMA_STRIDE + lk);
#pragma unroll
        for (int i = 0; i < HALF / 8; i++) w_dst[i] = w_reg[i];
    };
    float acc[4][2][4] = {};
    if constexpr (CLUSTER) mma_cluster_start(cluster_recv().bar, M, m0);
    // The first slice's weights stream while the previous kernel finishes (programmatic
    // dependent launch); the activations only after it is done.
    pdl_trigger();
    if (k0 < k1) load_w(k0);
    pdl_wait();
    if (k0 < k1) load_a(k0);
    for (int kb = k0; kb < k1; kb += MMA_SLICE) {
        __syncthreads();
        store();
        __syncthreads();
        if (kb + MMA_SLICE < k1) {
            load_w(kb + MMA_SLICE);
            load_a(kb + MMA_SLICE);
        }
        mma_tile_slice<W, MMA_SLICE, MMA_STRIDE>(a_s, w_s, acc);
    }
    if constexpr (CLUSTER)
        mma_cluster_finish(acc, cluster_stage(), cluster_recv().recv, cluster_recv().bar, M, N, m0, n0, co);
    else
        mma_tile_store(acc, partial + (size_t)blockIdx.z * M * N, M, N, m0, n0);
}

// matmul_mma for rows already in the weights' type: the same tiles and k order (so the same
// sums, bit for bit), the rows and weights copied with cp.async into a ring of MMA_RING stages of
// 32 k, MMA_RING - 1 of them in flight during the math instead of one slice: a block over a long K
// (prefill passes, which split K little) waited out one memory latency a slice. It serves the
// 32-k instance (more than 16 rows): H100, f16, E2E ms, same call, twice, register-staged vs ring:
// batch 64 prompt 128 + 1 token 17.42 / 17.47 -> 13.87 / 14.03, batch 1 prompt 896 + 1 token 4.38
// / 4.43 -> 3.34 / 3.28, batch 64 prompt 128 + 128 tokens 93.68 / 94.05 -> 90.15 / 90.30. The 64-k
// instance (few-row steps, one or two slices a block, and their LM head) stays register-staged:
// the ring measured slower there (batch 16 with 32 tokens 9.53 / 9.49 -> 10.38 / 10.40, batch 4
// 8.74 / 8.73 -> 9.13 / 9.14). k_per_split % 32 == 0.
// The cluster instance (17-64 rows, 2-6 slices a block) keeps CLUSTER_RING stages, so that its
// receiving buffer fits beside them in the 48 KB of static shared memory.
#define MMA_RING 4
#define CLUSTER_RING 3
template <typename W, bool CLUSTER = false, int RING = MMA_RING>
__device__ void matmul_mma_ring(const W* __restrict__ in, int M, int K, const W* __restrict__ w, int N,
                                float* partial, int k_per_split, const ClusterOut<W>& co = {}) {
    constexpr int RS = 32, RSTRIDE = RS + 8;
    // The rows' and weights' stages, in one piece: a cluster product stages its partial tile there.
    __shared__ __align__(16) unsigned short ring[2][RING][64 * RSTRIDE];
    auto& a_s = ring[0];
    auto& w_s = ring[1];
    int t = threadIdx.x;
    int m0 = blockIdx.y * 64, n0 = blockIdx.x * 64;
    int k0 = blockIdx.z * k_per_split, k1 = min(K, k0 + k_per_split);
    int slices = k1 > k0 ? (k1 - k0 + RS - 1) / RS : 0;
    // Pieces of 8 k: thread t (of 128) copies pieces t and t + 128 of the 64 x 4 of a stage (row i / 4,
    // k 8 (i % 4)); those past k1 (the last slice may be short, by whole 8 k as K % 16 == 0), past M
    // or past N are zeros.
    auto issue = [&](const auto* src, int rows, int r0, unsigned short (*dst)[64 * RSTRIDE], int slice) {
        int kb = k0 + slice * RS;
#pragma unroll
        for (int h = 0; h < 2; h++) {
            int i = t + h * 128, r = i >> 2, kk = (i & 3) * 8;
            bool ok = r0 + r < rows && kb + kk < k1;
            const auto* from = ok ? src + (size_t)(r0 + r) * K + kb + kk : src;
            copy_async16_or_zero(dst[slice % RING] + r * RSTRIDE + kk, from, ok);
        }
    };
    float acc[4][2][4] = {};
    if constexpr (CLUSTER) mma_cluster_start(cluster_recv().bar, M, m0);
    // The weights of the first slices stream while the previous kernel finishes (programmatic
    // dependent launch); the rows only after it is done.
    pdl_trigger();
    for (int sl = 0; sl < RING - 1 && sl < slices; sl++) issue(w, N, n0, w_s, sl);
    pdl_wait();
    for (int sl = 0; sl < RING - 1; sl++) {
        if (sl < slices) issue(in, M, m0, a_s, sl);
        copy_commit();
    }
    for (int sl = 0; sl < slices; sl++) {
        copy_wait<RING - 2>();
        __syncthreads();  // slice sl is in for every thread, and slice sl - 1's stage is free
        if (sl + RING - 1 < slices) {
            issue(w, N, n0, w_s, sl + RING - 1);
            issue(in, M, m0, a_s, sl + RING - 1);
        }
        copy_commit();
        const unsigned short* as = a_s[sl % RING];
        const unsigned short* ws = w_s[sl % RING];
        mma_tile_slice<W, RS, RSTRIDE>(as, ws, acc);
    }
    if constexpr (CLUSTER) {
        static_assert(sizeof(ring) >= 64 * 64 * sizeof(float), "the ring holds a partial tile");
        // Every copy has landed and been read.
        copy_wait<0>();
        __syncthreads();
        ClusterRecv cr = cluster_recv();
        mma_cluster_finish(acc, reinterpret_cast<float*>(&ring[0][0][0]), cr.recv, cr.bar, M, N, m0, n0, co);
    } else {
        mma_tile_store(acc, partial + (size_t)blockIdx.z * M * N, M, N, m0, n0);
    }
}

// The cluster instances' parameters after the product's: matmul_finish's (see ClusterOut).
#define CLUSTER_PARAMS(W)                                                                                         \
    const W *bias, void *out, int half_out, int mode, W *kc, W *vc, const int *rs, const int *rp, int max_seq
#define CLUSTER_OUT(W) ClusterOut<W>{bias, out, half_out, mode, kc, vc, rs, rp, max_seq}

#define MMA_KERNELS(W, S)                                                                                         \
    extern "C" __global__ void matmul_mma_##S(const float* in, int M, int K, const W* w, int N, float* part,       \
                                              int kps) {                                                          \
        matmul_mma<W, 32>(in, M, K, w, N, part, kps);                                                             \
    }                                                                                                             \
    extern "C" __global__ void matmul_mma64_##S(const float* in, int M, int K, const W* w, int N, float* part,     \
                                                int kps) {                                                        \
        matmul_mma<W, 64>(in, M, K, w, N, part, kps);                                                             \
    }                                                                                                             \
    extern "C" __global__ void matmul_mma_half_##S(const W* in, int M, int K, const W* w, int N, float* part,      \
                                                   int kps) {                                                     \
        matmul_mma_ring<W>(in, M, K, w, N, part, kps);                                                            \
    }                                                                                                             \
    extern "C" __global__ void matmul_mma64_half_##S(const W* in, int M, int K, const W* w, int N, float* part,    \
                                                     int kps) {                                                   \
        matmul_mma<W, 64, W>(in, M, K, w, N, part, kps);                                                          \
    }                                                                                                             \
    extern "C" __global__ void matmul_mma_cluster_##S(const float* in, int M, int K, const W* w, int N, int kps,   \
                                                      CLUSTER_PARAMS(W)) {                                        \
        matmul_mma<W, 32, float, true>(in, M, K, w, N, nullptr, kps, CLUSTER_OUT(W));                            \
    }                                                                                                             \
    extern "C" __global__ void matmul_mma_half_cluster_##S(const W* in, int M, int K, const W* w, int N, int kps,  \
                                                           CLUSTER_PARAMS(W)) {                                   \
        matmul_mma_ring<W, true, CLUSTER_RING>(in, M, K, w, N, nullptr, kps, CLUSTER_OUT(W));                     \
    }                                                                                                             \
    extern "C" __global__ void layer_norm_half_##S(const float* x, const W* g, const W* b, W* o, int C, float eps) { \
        layer_norm<W, W>(x, g, b, o, C, eps);                                                                     \
    }                                                                                                             \
    extern "C" __global__ void attention_combine_half_##S(const float* part, const float* att_ml, const int* pos,  \
                                                          int splits, int C, int H, W* att) {                     \
        attention_combine<W>(part, att_ml, pos, splits, C, H, att);                                               \
    }                                                                                                             \
    extern "C" __global__ void matmul_finish_half_##S(const float* part, int splits, int M, int N, const W* bias,  \
                                                      W* out, int mode, W* kc, W* vc, const int* rs,              \
                                                      const int* rp, int max_seq) {                               \
        matmul_finish<W, W>(part, splits, M, N, bias, out, mode, kc, vc, rs, rp, max_seq);                        \
    }                                                                                                             \
    extern "C" __global__ void matmul_finish_rows_half_##S(const float* part, int splits, int M, int N,            \
                                                           const W* bias, W* out, int mode, W* kc, W* vc,         \
                                                           const int* rs, const int* rp, int max_seq) {           \
        matmul_finish_rows<W, W>(part, splits, M, N, bias, out, mode, kc, vc, rs, rp, max_seq);                   \
    }
MMA_KERNELS(__half, f16)
MMA_KERNELS(__nv_bfloat16, bf16)

// ---- The LM head of a step past the decode path, on tensor cores (8.0+) ----
//
// matmul_mma over the head's 64-column tiles read every tile's rows again (at 64 rows 98 KB, for
// each of 786 tiles: as many bytes from L2 as the head's weights from memory), and argmax_partial
// then read the logits back. lm_head_mma holds the rows (at most 16 * RG, already in the weights'
// type) in shared memory for the whole kernel, one block an SM (HEAD_THREADS, or a multiple: see
// HEAD_GROUPS_64), and walks the
// vocabulary in tiles of HEAD_TILE entries in a grid stride; their weights stream through a ring of
// STAGES slices of HEAD_SLICE k (cp.async) that runs on across tiles, so the copies never
// drain between them. Warp w of a group holds the tile's columns 32w..32w+31 for the group's
// rows. Each logit is the sum matmul_mma makes (the same mma.sync calls in the same k order: the
// same bits); the block also keeps each row's best (value, index) over its tiles and leaves it
// where lm_head_rows does (best_value/best_index[m * gridDim.x + blockIdx.x]) for argmax_final.
// Requires C % HEAD_SLICE == 0; dynamic shared memory: the ring, the rows and one finished tile
// (head_mma_smem in imp.rs).
#define HEAD_THREADS 128
#define HEAD_TILE 128
#define HEAD_SLICE 64
// The ring's stages in the instances holding up to 16, 32 and 64 rows. H200, f16, E2E ms, same
// call, twice, stages 4/4/4 vs 8/8/6 vs 10/9/6 vs 6/6/5: batch 16 prompt 12 + 32 tokens 8.90 /
// 8.91 vs 8.78 / 8.70 vs 8.49 / 8.52 vs 8.47 / 8.52, batch 8 7.89 / 7.88 vs 7.82 / 7.72 vs 7.59 /
// 7.63 vs 7.52 / 7.56; batch 24 (32 rows) and 64 (prompt 128 + 128) within 1% in all four, so
// the 64-row instance takes 4 (its shared memory also holds the rows and a finished tile).
#define HEAD_STAGES_16 6
#define HEAD_STAGES_32 6
#define HEAD_STAGES_64 4
// Groups of HEAD_THREADS / 32 warps in the 64-row instance, each taking half of the rows of every
// tile (the others have one group). At one block of 4 warps an SM the 64-row head issued an
// instruction a warp every 3.5 cycles and drew 47% of the memory's bandwidth (Nsight Compute,
// H200, f16 batch 64: 42 us). H200, E2E ms, same call, twice, 4 vs 8 warps: f16 batch 64 prompt 128
// + 128 66.25 / 66.40 vs 65.43 / 65.40, bf16 66.17 / 66.32 vs 65.36 / 65.17; the 32-row instance
// with 8 warps was no faster (batch 32 prompt 12 + 32 9.58 / 9.59 vs 9.59 / 9.71, batch 24 8.83 /
// 8.78 vs 8.88 / 8.85), so it keeps one group.
#define HEAD_GROUPS_64 2

template <typename W, int RG, int STAGES, int WR = 1>
__device__ void lm_head_mma(const W* __restrict__ in, int M, int C, const W* __restrict__ head, int V, float* logits,
                            float* best_value, int* best_index) {
    // WR groups of HEAD_THREADS / 32 warps (HEAD_THREADS * WR threads): group q holds the 16-row
    // groups [q RW, (q + 1) RW) of every tile.
    constexpr int THREADS = HEAD_THREADS * WR, RW = RG / WR, CW = HEAD_THREADS / 32;
    static_assert(RG % WR == 0, "whole row groups a warp");
    extern __shared__ __align__(128) unsigned char head_smem[];
    __shared__ float warp_value[HEAD_THREADS / 32][16 * RG];
    __shared__ int warp_index[HEAD_THREADS / 32][16 * RG];
    // Halfs between the staged weight rows of a slice, and between the held rows: 4 banks apart
    // (mod 32), so a warp's fragment loads (8 rows x 4 words) hit 32 distinct banks. Floats
    // between the rows of a finished tile: 8 banks apart, so each half-warp's float2 stores (4
    // rows x 8 columns) hit 32 distinct banks.
    constexpr int WST = HEAD_SLICE + 8, OST = HEAD_TILE + 8;
    static_assert(HEAD_THREADS == HEAD_TILE, "a thread a column when a tile is stored");
    const int ast = C + 8;
    unsigned short* w_s = reinterpret_cast<unsigned short*>(head_smem);
    unsigned short* a_s = w_s + STAGES * HEAD_TILE * WST;
    float* out_s = reinterpret_cast<float*>(a_s + 16 * RG * ast);
    int t = threadIdx.x, lane = t & 31, g = lane >> 2, tig = lane & 3;
    int warp = (t >> 5) % CW, i0 = (t >> 5) / CW * RW;
    int tiles = (V + HEAD_TILE - 1) / HEAD_TILE, per_tile = C / HEAD_SLICE;
    int mine = (int)blockIdx.x < tiles ? (tiles - blockIdx.x + gridDim.x - 1) / gridDim.x : 0;
    int slices = mine * per_tile;
    // Slice s of this block: tile blockIdx.x + (s / per_tile) * gridDim.x, k (s % per_tile) *
    // HEAD_SLICE; HEAD_TILE rows of 8 pieces of 8 k, thread t copying pieces t + HEAD_THREADS h
    // (8 consecutive threads: one row's 128 contiguous bytes). Entries past V are zeros.
    auto issue = [&](int s) {
        int v0 = (blockIdx.x + (s / per_tile) * gridDim.x) * HEAD_TILE, kb = (s % per_tile) * HEAD_SLICE;
        unsigned short* dst = w_s + (s % STAGES) * HEAD_TILE * WST;
#pragma unroll
        for (int h = 0; h < HEAD_TILE * HEAD_SLICE / 8 / THREADS; h++) {
            int i = t + h * THREADS, r = i >> 3, kk = (i & 7) * 8;
            bool ok = v0 + r < V;
            copy_async16_or_zero(dst + r * WST + kk, ok ? head + (size_t)(v0 + r) * C + kb + kk : head, ok);
        }
    };
    // The weights of the first slices stream while the previous kernel finishes (programmatic
    // dependent launch); the rows only after it is done.
    pdl_trigger();
    for (int s = 0; s < STAGES - 1; s++) {
        if (s < slices) issue(s);
        copy_commit();
    }
    pdl_wait();
    {
        int pieces = C / 8;
        for (int i = t; i < 16 * RG * pieces; i += THREADS) {
            int r = i / pieces, kk = (i - r * pieces) * 8;
            bool ok = r < M;
            copy_async16_or_zero(a_s + r * ast + kk, ok ? in + (size_t)r * C + kk : in, ok);
        }
        copy_commit();
        copy_wait<0>();
    }
    float acc[RW][4][4] = {};
    float bv[RW][2];
    int bi[RW][2];
#pragma unroll
    for (int i = 0; i < RW; i++)
#pragma unroll
        for (int h = 0; h < 2; h++) { bv[i][h] = -INFINITY; bi[i][h] = 0x7fffffff; }
    for (int s = 0; s < slices; s++) {
        copy_wait<STAGES - 2>();
        __syncthreads();  // slice s is in for every thread, and slice s - 1's stage is free
        if (s + STAGES - 1 < slices) issue(s + STAGES - 1);
        copy_commit();
        int kb = (s % per_tile) * HEAD_SLICE;
        const unsigned short* ws = w_s + (s % STAGES) * HEAD_TILE * WST + warp * 32 * WST;
#pragma unroll
        for (int ks = 0; ks < HEAD_SLICE; ks += 16) {
            unsigned int b[4][2];
#pragma unroll
            for (int j = 0; j < 4; j++) {
                const unsigned short* row = ws + (j * 8 + g) * WST + ks + tig * 2;
                b[j][0] = *reinterpret_cast<const unsigned int*>(row);
                b[j][1] = *reinterpret_cast<const unsigned int*>(row + 8);
            }
#pragma unroll
            for (int i = 0; i < RW; i++) {
                const unsigned short* r0 = a_s + ((i0 + i) * 16 + g) * ast + kb + ks + tig * 2;
                const unsigned short* r1 = r0 + 8 * ast;
                unsigned int a[4] = {*reinterpret_cast<const unsigned int*>(r0),
                                     *reinterpret_cast<const unsigned int*>(r1),
                                     *reinterpret_cast<const unsigned int*>(r0 + 8),
                                     *reinterpret_cast<const unsigned int*>(r1 + 8)};
#pragma unroll
                for (int j = 0; j < 4; j++) Mma<W>::run(acc[i][j], a, b[j]);
            }
        }
        if (s % per_tile == per_tile - 1) {
            // The tile is done: each row's best kept, the sums cleared, and the tile staged in
            // out_s, then stored a row at a time (thread t: column t), so each store instruction
            // writes 512 consecutive bytes instead of 8 rows' scattered pairs. The next writes to
            // out_s come after the barriers of this tile's slices.
            int v0 = (blockIdx.x + (s / per_tile) * gridDim.x) * HEAD_TILE;
#pragma unroll
            for (int i = 0; i < RW; i++)
#pragma unroll
                for (int j = 0; j < 4; j++)
#pragma unroll
                    for (int h = 0; h < 2; h++) {
                        int m = (i0 + i) * 16 + g + 8 * h, c = warp * 32 + j * 8 + tig * 2, n = v0 + c;
                        float x = acc[i][j][2 * h], y = acc[i][j][2 * h + 1];
                        acc[i][j][2 * h] = acc[i][j][2 * h + 1] = 0.0f;
                        *reinterpret_cast<float2*>(out_s + m * OST + c) = make_float2(x, y);
                        if (m < M && n < V && better(x, n, bv[i][h], bi[i][h])) { bv[i][h] = x; bi[i][h] = n; }
                        if (m < M && n + 1 < V && better(y, n + 1, bv[i][h], bi[i][h])) { bv[i][h] = y; bi[i][h] = n + 1; }
                    }
            __syncthreads();
            int col = t % HEAD_TILE;
            if (v0 + col < V) {
                int rows = min(M, 16 * RG);
                for (int m = t / HEAD_TILE; m < rows; m += WR)
                    logits[(size_t)m * V + v0 + col] = out_s[m * OST + col];
            }
        }
    }
    // Each row's best: over the 4 lanes holding it (tig), then over the warps.
#pragma unroll
    for (int i = 0; i < RW; i++)
#pragma unroll
        for (int h = 0; h < 2; h++) {
#pragma unroll
            for (int o = 1; o < 4; o <<= 1) best_xor(bv[i][h], bi[i][h], o);
            if (tig == 0) {
                warp_value[warp][(i0 + i) * 16 + g + 8 * h] = bv[i][h];
                warp_index[warp][(i0 + i) * 16 + g + 8 * h] = bi[i][h];
            }
        }
    __syncthreads();
    block_best_rows(warp_value, warp_index, M, best_value, best_index);
}

#define HEAD_MMA_KERNELS(W, S)                                                                                    \
    extern "C" __global__ void __launch_bounds__(HEAD_THREADS) lm_head_mma16_##S(                                 \
        const W* in, int M, int C, const W* head, int V, float* logits, float* bv, int* bi) {                     \
        lm_head_mma<W, 1, HEAD_STAGES_16>(in, M, C, head, V, logits, bv, bi);                                     \
    }                                                                                                             \
    extern "C" __global__ void __launch_bounds__(HEAD_THREADS) lm_head_mma32_##S(                                 \
        const W* in, int M, int C, const W* head, int V, float* logits, float* bv, int* bi) {                     \
        lm_head_mma<W, 2, HEAD_STAGES_32>(in, M, C, head, V, logits, bv, bi);                                     \
    }                                                                                                             \
    extern "C" __global__ void __launch_bounds__(HEAD_GROUPS_64 * HEAD_THREADS, 1) lm_head_mma64_##S(             \
        const W* in, int M, int C, const W* head, int V, float* logits, float* bv, int* bi) {                     \
        lm_head_mma<W, 4, HEAD_STAGES_64, HEAD_GROUPS_64>(in, M, C, head, V, logits, bv, bi);                     \
    }
HEAD_MMA_KERNELS(__half, f16)
HEAD_MMA_KERNELS(__nv_bfloat16, bf16)

// Causal attention of one query row against its sequence's cached keys/values, one block per
// (row, head). Dynamic shared memory: max_seq + head_dim floats.
template <typename KV>
__device__ void attention(const float* qkv, const KV* k_cache, const KV* v_cache, const int* row_seq,
                          const int* row_pos, float* out, int C, int H, int max_seq, float scale) {
    extern __shared__ float smem[];
    __shared__ float scratch[32];
    pdl_trigger();
    pdl_wait();
    int r = blockIdx.x / H, h = blockIdx.x % H;
    int D = C / H;
    int ctx = row_pos[r] + 1;
    float* scores = smem;
    float* q = smem + max(max_seq, (int)blockDim.x);
    for (int d = threadIdx.x; d < D; d += blockDim.x) q[d] = qkv[(size_t)r * 3 * C + h * D + d];
    __syncthreads();
    const KV* keys = k_cache + (size_t)row_seq[r] * max_seq * C + h * D;
    const KV* values = v_cache + (size_t)row_seq[r] * max_seq * C + h * D;
    // One thread per key: each reads its key row contiguously, q comes from shared memory.
    for (int t = threadIdx.x; t < ctx; t += blockDim.x) {
        const KV* key = keys + (size_t)t * C;
        float s = 0.0f;
#pragma unroll 8
        for (int d = 0; d < D; d++) s += q[d] * to_f(key[d]);
        scores[t] = s * scale;
    }
    __syncthreads();
    float mx = -INFINITY;
    for (int t = threadIdx.x; t < ctx; t += blockDim.x) mx = fmaxf(mx, scores[t]);
    mx = block_max(mx, scratch);
    float sum = 0.0f;
    for (int t = threadIdx.x; t < ctx; t += blockDim.x) {
        float e = __expf(scores[t] - mx);
        scores[t] = e;
        sum += e;
    }
    sum = block_sum(sum, scratch);
    __syncthreads();
    // Each group of D threads covers every d for a share of the positions; groups combine in order.
    int groups = max(1, (int)blockDim.x / D);
    int g = threadIdx.x / D, d = threadIdx.x % D;
    float acc = 0.0f;
    if (g < groups) {
#pragma unroll 4
        for (int t = g; t < ctx; t += groups) acc += scores[t] * to_f(values[(size_t)t * C + d]);
    }
    __syncthreads();
    float* partial = smem;  // scores are no longer needed
    if (g < groups) partial[g * D + d] = acc;
    __syncthreads();
    for (int dd = threadIdx.x; dd < D; dd += blockDim.x) {
        float total = 0.0f;
        for (int i = 0; i < groups; i++) total += partial[i * D + dd];
        out[(size_t)r * C + h * D + dd] = total / sum;
    }
}

// Causal attention of many rows against short contexts (prefills of short prompts; heads of 64): a
// warp a (row, head), 8 a block, no block barrier. Lane j scores key j of each run of 32 (16-byte
// loads of its key row; q from shared memory, the same address for every lane), the warp keeps
// the running max and sum (online softmax over the runs), and lane j accumulates output dimensions
// 2j and 2j + 1 over each run's keys (one coalesced read of a value row a key). The `attention`
// kernel's block a (row, head), with its block barriers and reductions, cost 17 µs a layer for 16
// prompts of 12 tokens (H200, 2304 blocks). Grid ceil(n H / 8), 256 threads (launch
// bounds of 2 blocks an SM: with none, ptxas kept the f32 instance to 32 registers and spilled).
template <typename KV>
__device__ void attention_short(const float* qkv, const KV* k_cache, const KV* v_cache, const int* row_seq,
                                const int* row_pos, int n, float* out, int C, int H, int max_seq, float scale) {
    constexpr int D = 64, V = Vec<KV>::N;
    __shared__ __align__(16) float qs[8][D];
    pdl_trigger();
    pdl_wait();
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int item = blockIdx.x * 8 + warp;
    if (item >= n * H) return;
    int r = item / H, h = item - r * H;
    const float* q = qkv + (size_t)r * 3 * C + h * D;
    qs[warp][lane] = q[lane];
    qs[warp][lane + 32] = q[lane + 32];
    __syncwarp();
    int ctx = row_pos[r] + 1;
    size_t base = (size_t)row_seq[r] * max_seq * C + h * D;
    const KV* keys = k_cache + base;
    const KV* values = v_cache + base + 2 * lane;
    float mx = -INFINITY, sum = 0.0f, acc0 = 0.0f, acc1 = 0.0f;
    for (int t0 = 0; t0 < ctx; t0 += 32) {
        int t = t0 + lane;
        float s = -INFINITY;
        if (t < ctx) {
            const uint4* key = reinterpret_cast<const uint4*>(keys + (size_t)t * C);
            uint4 raw[D / V];
#pragma unroll
            for (int u = 0; u < D / V; u++) raw[u] = key[u];
            float dot = 0.0f;
#pragma unroll
            for (int u = 0; u < D / V; u++) {
                float kf[V];
                Vec<KV>::convert(raw[u], kf);
#pragma unroll
                for (int j = 0; j < V; j += 4) {
                    float4 qv = *reinterpret_cast<const float4*>(&qs[warp][u * V + j]);
                    dot = fmaf(qv.w, kf[j + 3], fmaf(qv.z, kf[j + 2], fmaf(qv.y, kf[j + 1], fmaf(qv.x, kf[j], dot))));
                }
            }
            s = dot * scale;
        }
        float m_new = fmaxf(mx, warp_max(s));
        float p = t < ctx ? __expf(s - m_new) : 0.0f;
        float keep = __expf(mx - m_new);
        sum = sum * keep + warp_sum(p);
        acc0 *= keep;
        acc1 *= keep;
        mx = m_new;
        int run = min(32, ctx - t0);
#pragma unroll 8
        for (int j = 0; j < run; j++) {
            float pj = __shfl_sync(0xffffffffu, p, j);
            const KV* v = values + (size_t)(t0 + j) * C;
            acc0 = fmaf(pj, to_f(v[0]), acc0);
            acc1 = fmaf(pj, to_f(v[1]), acc1);
        }
    }
    float inv = 1.0f / sum;
    *reinterpret_cast<float2*>(out + (size_t)r * C + h * D + 2 * lane) = make_float2(acc0 * inv, acc1 * inv);
}

// Causal attention of many rows with heads of 64 (long prefills): a block a (tile of ATT_ROWS
// consecutive rows, head), 256 threads, 8 a row. The rows' keys and values go through shared
// memory ATT_KEYS at a time, once for the whole tile (the `attention` kernel above reads them once
// a row). Thread (r, i) scores keys i, i + 8, ... of each staged tile against row r, the 8 threads
// of a row keep its running max and sum (online softmax), and thread (r, i) accumulates output
// dimensions 8i..8i+7. A tile's rows may span sequences (a pass runs ragged prompts back to back):
// each run of rows of one sequence goes over that sequence's keys up to the run's last position.
// Grid (ceil(n / ATT_ROWS), H).
#define ATT_ROWS 32
#define ATT_KEYS 32
template <typename KV>
__device__ void attention_tiled(const float* qkv, const KV* k_cache, const KV* v_cache, const int* row_seq,
                                const int* row_pos, int n, float* out, int C, int max_seq, float scale) {
    constexpr int D = 64;
    __shared__ float qs[ATT_ROWS][D + 1];
    __shared__ float ks[ATT_KEYS][D + 1];
    __shared__ __align__(16) float vs[ATT_KEYS][D];
    __shared__ float ps[ATT_ROWS][ATT_KEYS + 1];
    __shared__ int s_seq[ATT_ROWS], s_pos[ATT_ROWS];
    pdl_trigger();
    pdl_wait();
    int tid = threadIdx.x, r = tid >> 3, i8 = tid & 7, h = blockIdx.y;
    int row0 = blockIdx.x * ATT_ROWS, rows = min(ATT_ROWS, n - row0);
    if (tid < ATT_ROWS) {
        s_seq[tid] = tid < rows ? row_seq[row0 + tid] : -1;
        s_pos[tid] = tid < rows ? row_pos[row0 + tid] : -1;
    }
    for (int e = tid; e < ATT_ROWS * D; e += 256) {
        int rr = e / D, d = e % D;
        qs[rr][d] = rr < rows ? qkv[(size_t)(row0 + rr) * 3 * C + h * D + d] * scale : 0.0f;
    }
    __syncthreads();
    int my_pos = s_pos[r];
    float mx = -INFINITY, l = 0.0f, acc[8];
#pragma unroll
    for (int k = 0; k < 8; k++) acc[k] = 0.0f;
    for (int seg = 0; seg < rows;) {
        int seq = s_seq[seg], end = seg, last = 0;
        while (end < rows && s_seq[end] == seq) last = max(last, s_pos[end++]);
        bool active = r >= seg && r < end;
        const KV* keys = k_cache + (size_t)seq * max_seq * C + h * D;
        const KV* values = v_cache + (size_t)seq * max_seq * C + h * D;
        for (int t0 = 0; t0 <= last; t0 += ATT_KEYS) {
            __syncthreads();  // the previous keys are no longer read
            for (int e = tid; e < ATT_KEYS * D / 4; e += 256) {
                int j = e / (D / 4), d = e % (D / 4) * 4;
                float4 kv = make_float4(0.0f, 0.0f, 0.0f, 0.0f), vv = kv;
                if (t0 + j <= last) {
                    kv = load4(keys + (size_t)(t0 + j) * C + d);
                    vv = load4(values + (size_t)(t0 + j) * C + d);
                }
                ks[j][d] = kv.x;
                ks[j][d + 1] = kv.y;
                ks[j][d + 2] = kv.z;
                ks[j][d + 3] = kv.w;
                *reinterpret_cast<float4*>(&vs[j][d]) = vv;
            }
            __syncthreads();
            float sc[ATT_KEYS / 8];
#pragma unroll
            for (int i = 0; i < ATT_KEYS / 8; i++) sc[i] = 0.0f;
#pragma unroll 8
            for (int d = 0; d < D; d++) {
                float q = qs[r][d];
#pragma unroll
                for (int i = 0; i < ATT_KEYS / 8; i++) sc[i] += q * ks[i8 + 8 * i][d];
            }
            float tile_max = -INFINITY;
#pragma unroll
            for (int i = 0; i < ATT_KEYS / 8; i++) {
                bool ok = active && t0 + i8 + 8 * i <= my_pos;
                sc[i] = ok ? sc[i] : -INFINITY;
                tile_max = fmaxf(tile_max, sc[i]);
            }
            tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
            tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 2));
            tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 4));
            float mn = fmaxf(mx, tile_max);
            float corr = mn == -INFINITY ? 1.0f : __expf(mx - mn), sum = 0.0f;
#pragma unroll
            for (int i = 0; i < ATT_KEYS / 8; i++) {
                float p = sc[i] == -INFINITY ? 0.0f : __expf(sc[i] - mn);
                ps[r][i8 + 8 * i] = p;
                sum += p;
            }
            sum += __shfl_xor_sync(0xffffffffu, sum, 1);
            sum += __shfl_xor_sync(0xffffffffu, sum, 2);
            sum += __shfl_xor_sync(0xffffffffu, sum, 4);
            l = l * corr + sum;
            mx = mn;
            __syncwarp();  // the row's probabilities, written by its 8 threads (one warp)
#pragma unroll
            for (int k = 0; k < 8; k++) acc[k] *= corr;
#pragma unroll 4
            for (int j = 0; j < ATT_KEYS; j++) {
                float p = ps[r][j];
                float4 v0 = *reinterpret_cast<const float4*>(&vs[j][i8 * 8]);
                float4 v1 = *reinterpret_cast<const float4*>(&vs[j][i8 * 8 + 4]);
                acc[0] += p * v0.x;
                acc[1] += p * v0.y;
                acc[2] += p * v0.z;
                acc[3] += p * v0.w;
                acc[4] += p * v1.x;
                acc[5] += p * v1.y;
                acc[6] += p * v1.z;
                acc[7] += p * v1.w;
            }
            __syncwarp();  // ps is rewritten by the next keys
        }
        seg = end;
    }
    if (r < rows) {
        float inv = 1.0f / l;
        float* o = out + (size_t)(row0 + r) * C + h * D + i8 * 8;
        *reinterpret_cast<float4*>(o) = make_float4(acc[0] * inv, acc[1] * inv, acc[2] * inv, acc[3] * inv);
        *reinterpret_cast<float4*>(o + 4) = make_float4(acc[4] * inv, acc[5] * inv, acc[6] * inv, acc[7] * inv);
    }
}

#define ATT_MAX_DL 8
// The keys [t0, t1) of one (row, head) of decode attention, over the block's warps: one key per
// warp at a time with an online softmax (lanes across the head dimension, coalesced; four keys at
// a time for heads of 64), then the warps combine in shared memory into the unnormalised output
// out[0, D) and its (max, sum) out_ml[0..1] (an empty range stores zeros and (-inf, 0)). q: the row's query for the head;
// keys/values: the head's cached columns of position 0 (row stride C). Shared scratch:
// warp_ml[2 * warps], warp_acc[warps * D]. CG: read q, keys and values through L2 (written by
// another block of the same kernel). Head dimension at most 32 * ATT_MAX_DL. The cache holds KV:
// fp32, or the weights' f16/bf16 (converted to fp32 as they are read).
template <bool CG, typename KV>
__device__ __forceinline__ float load_kv(const KV* p) {
    if constexpr (IsF32<KV>::value) {
        return CG ? __ldcg(p) : *p;
    } else {
        unsigned short raw = CG ? __ldcg(reinterpret_cast<const unsigned short*>(p))
                                : *reinterpret_cast<const unsigned short*>(p);
        return to_f(*reinterpret_cast<const KV*>(&raw));
    }
}
// Eight consecutive cached values (16-byte aligned for fp32, 16 bytes in all for f16/bf16) as
// loaded, zero unless `ok` (load), and as floats (convert): apart, so that the loads need not be
// waited for where they are issued.
template <typename KV>
struct KvRaw8 {
    uint4 r[IsF32<KV>::value ? 2 : 1];
    template <bool CG>
    __device__ __forceinline__ void load(const KV* p, bool ok) {
        const uint4* q = reinterpret_cast<const uint4*>(p);
#pragma unroll
        for (int i = 0; i < (IsF32<KV>::value ? 2 : 1); i++) r[i] = ok ? (CG ? __ldcg(q + i) : q[i]) : make_uint4(0, 0, 0, 0);
    }
    __device__ __forceinline__ void convert(float* o) const {
        if constexpr (IsF32<KV>::value) {
            const float* f = reinterpret_cast<const float*>(r);
#pragma unroll
            for (int i = 0; i < 8; i++) o[i] = f[i];
        } else {
            Vec<KV>::convert(r[0], o);
        }
    }
};
// With GROUP, a barrier over the `warps` warps of a group (bar.sync `id`); without, __syncthreads().
template <bool GROUP>
__device__ __forceinline__ void group_sync(int id, int warps) {
    if (GROUP)
        asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(warps * 32) : "memory");
    else
        __syncthreads();
}

// One (row, head, key range) of attention by the block, or with GROUP by its warps [wbase, wbase +
// group_warps), which synchronise on named barrier `bar`; warp_ml and warp_acc are indexed by the
// block's warp.
template <bool CG, typename KV, bool GROUP = false>
__device__ __forceinline__ void attend(const float* q_in, float scale, const KV* keys, const KV* values, int t0,
                                       int t1, int C, int D, float* warp_ml, float* warp_acc, float* out,
                                       float* out_ml, int wbase = 0, int group_warps = 0, int bar = 0) {
    auto load = [](const float* p) { return CG ? __ldcg(p) : *p; };
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int warps = GROUP ? group_warps : blockDim.x >> 5, w0 = GROUP ? wbase : 0;
    int gw = warp - w0, tid = threadIdx.x - w0 * 32;
    float q[ATT_MAX_DL], acc[ATT_MAX_DL];
    float mx = -INFINITY, l = 0.0f;
    // GPT-2's head size: a warp takes four keys at a time (eight lanes a key, eight dimensions a
    // lane), so that more of the keys' loads are in flight; lane j of each group of eight ends
    // with dimensions [8j, 8j + 8) in acc.
    bool d64 = D == 64 && ATT_MAX_DL >= 8;
    if (d64) {
        int g = lane >> 3, j = (lane & 7) * 8;
        // The warp's four keys (this lane's group's, if ok) into the running max, sum and acc.
        auto keys4 = [&](bool ok, const float* kk, const float* vv) {
            float sc = q[0] * kk[0] + q[1] * kk[1] + q[2] * kk[2] + q[3] * kk[3] + q[4] * kk[4] + q[5] * kk[5] +
                       q[6] * kk[6] + q[7] * kk[7];
            sc += __shfl_xor_sync(0xffffffffu, sc, 1);
            sc += __shfl_xor_sync(0xffffffffu, sc, 2);
            sc += __shfl_xor_sync(0xffffffffu, sc, 4);
            if (ok) {
                float mn = fmaxf(mx, sc);
                float a = __expf(mx - mn), p = __expf(sc - mn);
                l = l * a + p;
#pragma unroll
                for (int i = 0; i < 8; i++) acc[i] = acc[i] * a + p * vv[i];
                mx = mn;
            }
        };
        // Each round's keys are loaded (raw) one round ahead: the first before q, and each next
        // one before the current round's math, converted when their round comes. Scaling q first
        // made the keys' loads wait for it, one more L2 round trip a split (the fused step's
        // attention at batch 1 has one round of keys a warp); and the next round's loads issued
        // before this round's math keep two rounds in flight, as the loop unrolled twice did. (With
        // only the first round ahead of q and the rest loaded in their turn, warps with two rounds
        // waited for the first one's math before loading the second: H200, E2E ms, same call,
        // twice, that vs this: prompt 128 + 128 tokens f16 batch 8 33.73 / 33.72 -> 33.27 / 33.09,
        // bf16 batch 8 33.70 / 33.58 -> 33.10 / 33.32, f32 batch 16 67.31 / 67.50 -> 66.55 / 66.77;
        // batch 1, f16 batch 64 and the f16 / f32 batch-16 grid cells within 1%.) That first
        // round ahead of q (the fused step's staging of several splits' outputs for their
        // combination, step_combine_load, meant to come with it, got no room from the host until
        // later), against the loop unrolled twice with q loaded first, H200, E2E ms,
        // same call, twice: prompt 128 + 128 tokens f32 batch 1 27.27 / 27.39 ->
        // 26.02 / 26.16, f16 batch 1 23.09 / 23.04 -> 22.90 / 22.83, f16 batch 2 25.61 / 25.68 ->
        // 24.95 / 25.02, f16 batch 64 71.05 / 70.98 -> 70.04 / 70.04 (bf16 batch 1 within 0.5%);
        // f16 batch 1 prompt 512 + 128 26.28 / 26.22 -> 25.22 / 25.17; f32 batch 16 prompt 12 + 32
        // 14.19 / 14.23 -> 14.01 / 13.93.
        int tb = t0 + gw * 4, step = warps * 4;
        KvRaw8<KV> kraw, vraw;
        auto fetch = [&](int tb) {
            bool ok = tb + g < t1;
            kraw.template load<CG>(keys + (size_t)(ok ? tb + g : 0) * C + j, ok);
            vraw.template load<CG>(values + (size_t)(ok ? tb + g : 0) * C + j, ok);
        };
        fetch(tb);
        float4 q0 = CG ? __ldcg(reinterpret_cast<const float4*>(q_in + j)) : *reinterpret_cast<const float4*>(q_in + j);
        float4 q1 = CG ? __ldcg(reinterpret_cast<const float4*>(q_in + j + 4))
                       : *reinterpret_cast<const float4*>(q_in + j + 4);
        q[0] = q0.x * scale;
        q[1] = q0.y * scale;
        q[2] = q0.z * scale;
        q[3] = q0.w * scale;
        q[4] = q1.x * scale;
        q[5] = q1.y * scale;
        q[6] = q1.z * scale;
        q[7] = q1.w * scale;
#pragma unroll
        for (int i = 0; i < 8; i++) acc[i] = 0.0f;
        for (; tb < t1; tb += step) {
            float kk[8], vv[8];
            kraw.convert(kk);
            vraw.convert(vv);
            fetch(tb + step);
            keys4(tb + g < t1, kk, vv);
        }
        // The four groups' results, combined (every group ends with the warp's).
#pragma unroll
        for (int o = 8; o < 32; o <<= 1) {
            float omx = __shfl_xor_sync(0xffffffffu, mx, o), ol = __shfl_xor_sync(0xffffffffu, l, o);
            float mn = fmaxf(mx, omx);
            float fa = mx == -INFINITY ? 0.0f : __expf(mx - mn), fb = omx == -INFINITY ? 0.0f : __expf(omx - mn);
            l = l * fa + ol * fb;
#pragma unroll
            for (int i = 0; i < 8; i++) acc[i] = acc[i] * fa + __shfl_xor_sync(0xffffffffu, acc[i], o) * fb;
            mx = mn;
        }
    } else {
#pragma unroll
        for (int i = 0; i < ATT_MAX_DL; i++) {
            int d = lane + 32 * i;
            q[i] = d < D ? load(q_in + d) * scale : 0.0f;
            acc[i] = 0.0f;
        }
#pragma unroll 2
        for (int t = t0 + gw; t < t1; t += warps) {
            const KV* key = keys + (size_t)t * C;
            const KV* val = values + (size_t)t * C;
            float kv[ATT_MAX_DL], vv[ATT_MAX_DL];
#pragma unroll
            for (int i = 0; i < ATT_MAX_DL; i++) {
                int d = lane + 32 * i;
                kv[i] = d < D ? load_kv<CG>(key + d) : 0.0f;
                vv[i] = d < D ? load_kv<CG>(val + d) : 0.0f;
            }
            float sc = 0.0f;
#pragma unroll
            for (int i = 0; i < ATT_MAX_DL; i++) sc += q[i] * kv[i];
            sc = warp_sum(sc);
            float mn = fmaxf(mx, sc);
            float a = __expf(mx - mn), p = __expf(sc - mn);
            l = l * a + p;
#pragma unroll
            for (int i = 0; i < ATT_MAX_DL; i++) acc[i] = acc[i] * a + p * vv[i];
            mx = mn;
        }
    }
    if (lane == 0) {
        warp_ml[warp * 2] = mx;
        warp_ml[warp * 2 + 1] = l;
    }
    group_sync<GROUP>(bar, warps);
    float bm = -INFINITY;
    for (int w = w0; w < w0 + warps; w++) bm = fmaxf(bm, warp_ml[w * 2]);
    float f = mx == -INFINITY ? 0.0f : __expf(mx - bm);
    if (d64) {
        if (lane < 8) {
#pragma unroll
            for (int i = 0; i < 8; i++) warp_acc[warp * D + lane * 8 + i] = acc[i] * f;
        }
    } else {
#pragma unroll
        for (int i = 0; i < ATT_MAX_DL; i++) {
            int d = lane + 32 * i;
            if (d < D) warp_acc[warp * D + d] = acc[i] * f;
        }
    }
    group_sync<GROUP>(bar, warps);
    for (int d = tid; d < D; d += GROUP ? warps * 32 : blockDim.x) {
        float total = 0.0f;
        for (int w = w0; w < w0 + warps; w++) total += warp_acc[w * D + d];
        out[d] = total;
    }
    if (tid == 0) {
        float total = 0.0f;
        for (int w = w0; w < w0 + warps; w++)
            total += warp_ml[w * 2] == -INFINITY ? 0.0f : warp_ml[w * 2 + 1] * __expf(warp_ml[w * 2] - bm);
        out_ml[0] = bm;
        out_ml[1] = total;
    }
}

// Decode attention, split across blocks (256 threads): block (split, head, row) covers the row's
// keys [split * split_len, (split + 1) * split_len) below its context (attend). It stores the
// unnormalised output (part[row][split][C]) and its running max and sum (ml[row][split][head][2]);
// the next matmul's prologue (IN_ATTN) combines the splits. Splits past the context store an empty
// result. Head dimension at most 256.
template <typename KV>
__device__ void attention_decode(const float* qkv, const KV* k_cache, const KV* v_cache, const int* row_seq,
                                 const int* row_pos, float* part, float* ml, int C, int H, int max_seq, float scale,
                                 int split_len) {
    __shared__ float warp_ml[2 * 8];
    __shared__ float warp_acc[8 * 256];
    pdl_trigger();
    int split = blockIdx.x, h = blockIdx.y, r = blockIdx.z, splits = gridDim.x;
    int D = C / H;
    pdl_wait();
    int ctx = row_pos[r] + 1;
    int t0 = split * split_len, t1 = min(ctx, t0 + split_len);
    const KV* keys = k_cache + (size_t)row_seq[r] * max_seq * C + h * D;
    const KV* values = v_cache + (size_t)row_seq[r] * max_seq * C + h * D;
    attend<false>(qkv + (size_t)r * 3 * C + h * D, scale, keys, values, t0, t1, C, D, warp_ml, warp_acc,
                  part + ((size_t)r * splits + split) * C + h * D, ml + (((size_t)r * splits + split) * H + h) * 2);
}

// The attention kernels of each KV-cache type (the weights' type: fp32, f16 or bf16).
#define ATTENTION_KERNELS(KV, S)                                                                                  \
    extern "C" __global__ void attention_##S(const float* qkv, const KV* kc, const KV* vc, const int* rs,          \
                                             const int* rp, float* out, int C, int H, int max_seq, float scale) {  \
        attention<KV>(qkv, kc, vc, rs, rp, out, C, H, max_seq, scale);                                            \
    }                                                                                                             \
    extern "C" __global__ void __launch_bounds__(256, 2)                                                          \
        attention_short_##S(const float* qkv, const KV* kc, const KV* vc, const int* rs, const int* rp, int n,    \
                            float* out, int C, int H, int max_seq, float scale) {                                 \
        attention_short<KV>(qkv, kc, vc, rs, rp, n, out, C, H, max_seq, scale);                                   \
    }                                                                                                             \
    extern "C" __global__ void __launch_bounds__(256)                                                             \
        attention_tiled_##S(const float* qkv, const KV* kc, const KV* vc, const int* rs, const int* rp, int n,    \
                            float* out, int C, int max_seq, float scale) {                                        \
        attention_tiled<KV>(qkv, kc, vc, rs, rp, n, out, C, max_seq, scale);                                      \
    }                                                                                                             \
    extern "C" __global__ void attention_decode_##S(const float* qkv, const KV* kc, const KV* vc, const int* rs,   \
                                                    const int* rp, float* part, float* ml, int C, int H,          \
                                                    int max_seq, float scale, int split_len) {                    \
        attention_decode<KV>(qkv, kc, vc, rs, rp, part, ml, C, H, max_seq, scale, split_len);                     \
    }
ATTENTION_KERNELS(float, f32)
ATTENTION_KERNELS(__half, f16)
ATTENTION_KERNELS(__nv_bfloat16, bf16)

// out[b, :] = x[rows[b] - row_offset, :] for rows inside [row_offset, row_offset + n_rows).
extern "C" __global__ void gather_rows(const float* x, const int* rows, int row_offset, int n_rows, float* out, int C) {
    pdl_trigger();
    pdl_wait();
    int b = blockIdx.x;
    int r = rows[b] - row_offset;
    if (r < 0 || r >= n_rows) return;
    for (int c = threadIdx.x; c < C; c += blockDim.x) out[(size_t)b * C + c] = x[(size_t)r * C + c];
}

// Two-stage argmax (first index on ties). Stage 1: block (chunk, b) finds the best of its chunk of
// row b into best_value/best_index[b * chunks + chunk]; stage 2: one block per row picks the best
// chunk into next[b].

__device__ void block_best(float& bv, int& bi) {
    __shared__ float sv[32];
    __shared__ int si[32];
    for (int o = 16; o > 0; o >>= 1) best_xor(bv, bi, o);
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
    __syncthreads();
    if (lane == 0) { sv[warp] = bv; si[warp] = bi; }
    __syncthreads();
    bv = lane < warps ? sv[lane] : -INFINITY;
    bi = lane < warps ? si[lane] : 0x7fffffff;
    for (int o = 16; o > 0; o >>= 1) best_xor(bv, bi, o);
}

extern "C" __global__ void argmax_partial(const float* logits, int V, int chunk, float* best_value, int* best_index) {
    int b = blockIdx.y, chunks = gridDim.x;
    const float* row = logits + (size_t)b * V;
    int v0 = blockIdx.x * chunk, v1 = min(V, v0 + chunk);
    float bv = -INFINITY;
    int bi = 0x7fffffff;
    for (int v = v0 + threadIdx.x; v < v1; v += blockDim.x) {
        float x = row[v];
        if (better(x, v, bv, bi)) { bv = x; bi = v; }
    }
    block_best(bv, bi);
    if (threadIdx.x == 0) {
        best_value[b * chunks + blockIdx.x] = bv;
        best_index[b * chunks + blockIdx.x] = bi;
    }
}

// The index of the best of n (value, index) pairs (first index on ties; 0 when none is set), in
// every thread. CG: read through L2 (pairs written by other blocks of the same kernel).
template <bool CG>
__device__ int best_of(const float* value, const int* index, int n) {
    float bv = -INFINITY;
    int bi = 0x7fffffff;
    for (int c = threadIdx.x; c < n; c += blockDim.x) {
        float v = CG ? __ldcg(value + c) : value[c];
        int i = CG ? __ldcg(index + c) : index[c];
        if (better(v, i, bv, bi)) { bv = v; bi = i; }
    }
    block_best(bv, bi);
    return bi == 0x7fffffff ? 0 : bi;
}

extern "C" __global__ void argmax_final(const float* best_value, const int* best_index, int chunks, int* next) {
    int b = blockIdx.x;
    int id = best_of<false>(best_value + b * chunks, best_index + b * chunks, chunks);
    if (threadIdx.x == 0) next[b] = id;
}

// seq_len[b] += 1 for every sequence of the batch: positions advance on the device.
extern "C" __global__ void advance(int* seq_len, int batch) {
    int b = blockIdx.x * blockDim.x + threadIdx.x;
    if (b < batch) seq_len[b] += 1;
}

// ---- Sampling on the device: temperature, top-k, top-p (the rules of Sampler::choose) ----
// Tokens rank by logit, larger first, then by smaller id. A token's rank key packs that order into
// one 64-bit integer (the float's ordered bits above, the inverted id below), so "the top k" and
// "the shortest ranked prefix whose probability reaches top_p" are thresholds on the key, found by
// radix descent 8 bits a pass, with no sort. Probabilities exp((l - max) / T) are computed in fp32
// and summed as 40-bit fixed-point integers, so no sum depends on the order of the atomics: the
// same logits and draw always give the same token. The draw then walks the kept tokens in id order
// (a prefix sum) and returns the first whose running sum exceeds u times the kept total.
#define SAMPLE_THREADS 1024

__device__ __forceinline__ unsigned long long rank_key(float l, int i) {
    unsigned int bits = __float_as_uint(l);
    bits ^= (bits & 0x80000000u) ? 0xffffffffu : 0x80000000u;  // the order of f32::total_cmp
    return ((unsigned long long)bits << 32) | (unsigned int)~(unsigned int)i;
}

__device__ __forceinline__ unsigned long long fixed_mass(float l, float max, float inv_t) {
    return (unsigned long long)((double)expf((l - max) * inv_t) * 1099511627776.0);  // 2^40
}

// Inclusive sum over the block of one u64 per thread (`scratch`: 32 entries); also returns the
// block total in `total`.
__device__ unsigned long long block_scan(unsigned long long v, unsigned long long* scratch, unsigned long long& total) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
    for (int o = 1; o < 32; o <<= 1) {
        unsigned long long t = __shfl_up_sync(0xffffffffu, v, o);
        if (lane >= o) v += t;
    }
    __syncthreads();
    if (lane == 31) scratch[warp] = v;
    __syncthreads();
    if (warp == 0) {
        unsigned long long w = lane < warps ? scratch[lane] : 0;
        for (int o = 1; o < 32; o <<= 1) {
            unsigned long long t = __shfl_up_sync(0xffffffffu, w, o);
            if (lane >= o) w += t;
        }
        scratch[lane] = w;
    }
    __syncthreads();
    total = scratch[warps - 1];
    return v + (warp > 0 ? scratch[warp - 1] : 0);
}

// The key T for which the tokens ranked at or above T (among those with key >= floor) weigh at
// least `need` and those ranked strictly above T weigh less: weight 1 a token (MASS false: T is the
// need-th best) or its fixed-point probability (MASS true: T closes the nucleus). `need` must not
// exceed the total weight. A digit whose whole bucket is needed ends the descent early (its lower
// digits are then 0, which keeps the same tokens). Every thread returns T.
template <bool MASS>
__device__ unsigned long long rank_threshold(const float* row, int V, float max, float inv_t, unsigned long long floor,
                                             unsigned long long need, unsigned long long* hist,
                                             unsigned long long* state) {
    unsigned long long prefix = 0, mask = 0;
    for (int shift = 56; shift >= 0; shift -= 8) {
        for (int d = threadIdx.x; d < 256; d += blockDim.x) hist[d] = 0;
        __syncthreads();
        for (int i = threadIdx.x; i < V; i += blockDim.x) {
            float l = row[i];
            unsigned long long key = rank_key(l, i);
            if (key >= floor && (key & mask) == prefix) {
                unsigned long long w = MASS ? fixed_mass(l, max, inv_t) : 1ull;
                if (w) atomicAdd(&hist[(key >> shift) & 255], w);
            }
        }
        __syncthreads();
        if (threadIdx.x < 32) {
            // Lane j owns buckets 255 - 8j down to 248 - 8j: higher keys first.
            int lane = threadIdx.x;
            if (lane == 0) {
                state[0] = prefix;
                state[1] = need;
                state[2] = 1;
            }
            __syncwarp();
            unsigned long long mine = 0;
            for (int j = 0; j < 8; j++) mine += hist[255 - 8 * lane - j];
            unsigned long long incl = mine;
            for (int o = 1; o < 32; o <<= 1) {
                unsigned long long t = __shfl_up_sync(0xffffffffu, incl, o);
                if (lane >= o) incl += t;
            }
            unsigned int hit = __ballot_sync(0xffffffffu, incl >= need);
            if (hit && lane == __ffs(hit) - 1) {
                unsigned long long above = incl - mine;
                for (int j = 0; j < 8; j++) {
                    int d = 255 - 8 * lane - j;
                    if (above + hist[d] >= need) {
                        state[0] = prefix | ((unsigned long long)d << shift);
                        state[1] = need - above;
                        state[2] = hist[d] == need - above;
                        break;
                    }
                    above += hist[d];
                }
            }
        }
        __syncthreads();
        prefix = state[0];
        need = state[1];
        bool done = state[2] != 0;
        mask |= 255ull << shift;
        __syncthreads();
        if (done) break;
    }
    return prefix;
}

// One block of SAMPLE_THREADS per sequence b: next[b] from logits row b and the uniform draw
// uniforms[b] (drawn on the host from the sequence's seeded stream). top_k 0 (or >= V) and
// top_p >= 1 disable those filters. inv_t = 1 / temperature, finite (the host sends greedy and
// vanishing temperatures to the argmax).
extern "C" __global__ void sample_rows(const float* logits, int V, const float* uniforms, float inv_t, int top_k,
                                       float top_p, int* next) {
    __shared__ unsigned long long hist[256];
    __shared__ unsigned long long state[3];
    __shared__ unsigned long long scratch[32];
    __shared__ int chosen;
    int b = blockIdx.x;
    const float* row = logits + (size_t)b * V;
    float max = -INFINITY;
    int best = 0x7fffffff;
    for (int i = threadIdx.x; i < V; i += blockDim.x)
        if (better(row[i], i, max, best)) {
            max = row[i];
            best = i;
        }
    block_best(max, best);
    unsigned long long floor = 0;
    if (top_k > 0 && top_k < V) floor = rank_threshold<false>(row, V, max, inv_t, 0, top_k, hist, state);
    if (top_p < 1.0f) {
        unsigned long long mass = 0, total;
        for (int i = threadIdx.x; i < V; i += blockDim.x)
            if (rank_key(row[i], i) >= floor) mass += fixed_mass(row[i], max, inv_t);
        block_scan(mass, scratch, total);
        unsigned long long need = (unsigned long long)ceil((double)top_p * (double)total);
        if (need == 0) need = 1;
        if (need <= total) {
            unsigned long long t = rank_threshold<true>(row, V, max, inv_t, floor, need, hist, state);
            floor = t > floor ? t : floor;
        }
    }
    // The draw, in id order: thread t holds a contiguous chunk of ids.
    int chunk = (V + blockDim.x - 1) / blockDim.x;
    int i0 = min(V, (int)threadIdx.x * chunk), i1 = min(V, i0 + chunk);
    unsigned long long mine = 0, total;
    for (int i = i0; i < i1; i++)
        if (rank_key(row[i], i) >= floor) mine += fixed_mass(row[i], max, inv_t);
    unsigned long long before = block_scan(mine, scratch, total) - mine;
    unsigned long long target = (unsigned long long)((double)uniforms[b] * (double)total);
    if (threadIdx.x == 0) chosen = best == 0x7fffffff ? 0 : best;  // only if every mass is 0
    __syncthreads();
    if (mine > 0 && before <= target && target < before + mine) {
        unsigned long long acc = before;
        for (int i = i0; i < i1; i++)
            if (rank_key(row[i], i) >= floor) {
                acc += fixed_mass(row[i], max, inv_t);
                if (acc > target) {
                    chosen = i;
                    break;
                }
            }
    }
    __syncthreads();
    if (threadIdx.x == 0) next[b] = chosen;
}


// ---- The fused decode step: a whole KV-cache step in one persistent kernel (sm_80+) ----
//
// One block of STEP_THREADS (STEP_THREADS_F32 or STEP_THREADS_HALF, below) per SM, launched
// cooperatively (every block resident at once), runs every phase of a step for M <= ROWS rows with
// a grid-wide barrier between phases instead of a kernel boundary. Per layer: (A) LayerNorm (of
// the embeddings in layer 0) + QKV + KV-cache append; (B) attention, (row, head, key split) items
// over the blocks; (C) the splits' combination + output projection + residual; (D) LayerNorm + MLP
// up + GELU; (E) MLP down + residual. Then the final LayerNorm + LM head + the argmax's first stage
// (lm_head_rows), and the positions advance.
//
// Block b owns output columns [b * cpb, (b + 1) * cpb) of every product (cpb = ceil(N / blocks)):
// that slab of a [N, K] weight is contiguous, and it is copied into shared memory one product
// ahead (two buffers, each also holding the LayerNorm parameters its phase needs; bulk copies on
// an mbarrier on sm_90+, cp.async before: step_fetch), so the weights stream while the previous
// phase and its barrier run. The input rows are copied with cp.async at the start of a phase (the
// attention splits' outputs by bulk copy on sm_90+: step_combine_load); bias and residual are
// loaded before the copies are waited for.
// Wherever the step waits on memory it waits once, for everything it needs next. A product's
// columns are split into (column, k-share) items over the warps; the shares add up in a fixed
// order, so results are deterministic. The last block to finish picks each row's token from the
// blocks' argmax results. Activations written inside the kernel are read through L2 (cp.async.cg,
// ld.global.cg): another SM wrote them, and L1 is not coherent.
// Threads of a block: 512 in f32, 384 in f16/bf16. The half kernels at 512 threads (128 registers
// a thread) spilled 68 bytes (wide) and 8 (narrow); at 384 (168 registers) 4 and none. H200, E2E
// ms, same call, twice, 512 vs 384 threads: f16 batch 1 prompt 128 + 128 tokens 22.88 / 22.92 vs
// 22.02 / 22.09; prompt 12: batch 8 with 8 tokens 1.81 / 1.81 vs 1.77 / 1.79, with 32 6.43 / 6.41
// vs 6.26 / 6.37, batch 16 with 8 2.15 / 2.15 vs 2.12 / 2.14, with 32 7.71 / 7.71 vs 7.53 / 7.58;
// f16 batch 16 prompt 128 + 128 36.15 / 36.18 vs 36.30 / 36.31. The f32 products run on CUDA
// cores, which the fewer warps starve: f32 batch 8 (prompt 12 + 8) 2.57 / 2.53 vs 2.70 / 2.69,
// batch 16 3.86 / 3.85 vs 4.10 / 4.10 (batch 1, prompt 128 + 128: 25.22 / 25.22 vs 24.89 /
// 25.04). 256 threads (no spills anywhere) was slower in both: f16 batch 16 prompt 128 + 128 38.73
// / 38.62, f32 batch 16 prompt 12 + 8 4.78 / 4.76. The host mirrors both (step_threads in imp.rs).
#define STEP_THREADS_F32 512
#define STEP_THREADS_HALF 384
template <typename W> struct StepThreads {
    static constexpr int value = IsF32<W>::value ? STEP_THREADS_F32 : STEP_THREADS_HALF;
};
// Used inside the fused step's functions, which all take the weights' type as W (some only for
// this).
#define STEP_THREADS (StepThreads<W>::value)
#define STEP_WARPS (STEP_THREADS / 32)
// Rows of the wide fused step (decode_step16_*; the others take GEMV_ROWS), which the CUDA-core
// products take in groups of GEMV_ROWS (the tensor-core ones all at once). FUSED_WIDE_ROWS in
// imp.rs.
#define STEP_ROWS 16
// flags of decode_step: the MLP-down input rows are staged in shared memory.
#define STEP_STAGE_H4 1
// Flag: the products run on tensor cores (step_product_mma; half weights, K % 32 == 0).
#define STEP_MMA 2

// The weight table (a device array of addresses): STEP_GLOBALS entries, then STEP_PER_LAYER for
// each layer. The host writes it in this order (fused_step in imp.rs).
enum { T_WTE, T_WPE, T_LNF_G, T_LNF_B, T_HEAD, STEP_GLOBALS };
enum { T_LN1_G, T_LN1_B, T_ATTN_W, T_ATTN_B, T_PROJ_W, T_PROJ_B, T_LN2_G, T_LN2_B, T_FC_W, T_FC_B, T_MPROJ_W,
       T_MPROJ_B, STEP_PER_LAYER };

__device__ __forceinline__ unsigned int load_acquire(const unsigned int* p) {
    unsigned int v;
    asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
    return v;
}

// Grid-wide barrier over resident blocks: bar[0] counts arrivals over the whole launch, and
// barrier number n (from 1) waits for it to reach n * blocks. Each block's thread 0 releases the
// block's writes with its arrival and acquires everyone's with the count. bar[1] counts the blocks
// done with the launch; the last one resets both for the next launch (no block touches them any
// more by then), and counts the launch in bar[2] (the tags of the cluster step, decode_step_cl).
__device__ __forceinline__ void grid_barrier(unsigned int* bar, unsigned int& n) {
    __syncthreads();
    n++;
    if (threadIdx.x == 0) {
        asm volatile("red.release.gpu.global.add.u32 [%0], 1;" ::"l"(bar) : "memory");
        unsigned int target = n * gridDim.x;
        while (load_acquire(bar) < target) {}
    }
    __syncthreads();
}
// The end of the launch: the last block to finish picks next[m] among the blocks' (value, index)
// results for each of the M rows (argmax_final's rule), then resets the barrier for the next launch.
__device__ void grid_barrier_done(unsigned int* bar, const float* best_value, const int* best_index, int M,
                                  int* next) {
    __shared__ bool last;
    __syncthreads();
    if (threadIdx.x == 0) {
        __threadfence();
        last = atomicAdd(bar + 1, 1u) == gridDim.x - 1;
        if (last) __threadfence();
    }
    __syncthreads();
    if (!last) return;
    for (int m = 0; m < M; m++) {
        int id = best_of<true>(best_value + m * gridDim.x, best_index + m * gridDim.x, gridDim.x);
        if (threadIdx.x == 0) next[m] = id;
    }
    if (threadIdx.x == 0) {
        bar[0] = 0;
        bar[1] = 0;
        bar[2]++;
    }
}

// Block 0's globaltimer stamps in order (GPT2RT_CUDA_STEP_TRACE=1, for tuning; trace NULL: none),
// or with ALL (the cluster step) every block's: stamp i of block b at trace[i * gridDim.x + b]
// (grids of at most TRACE_BLOCKS). (The fused step keeps block 0's: the index cost decode_step_f32
// a spill.)
#define TRACE_BLOCKS 1024
template <bool ALL = false>
__device__ __forceinline__ void stamp(unsigned long long* trace, int& i) {
    if (trace != nullptr && (ALL ? gridDim.x <= TRACE_BLOCKS : blockIdx.x == 0) && threadIdx.x == 0) {
        unsigned long long t;
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
        trace[ALL ? (size_t)i * gridDim.x + blockIdx.x : (size_t)i] = t;
    }
    i++;
}

// Starts copying `bytes` (a multiple of 16, both ends 16-byte aligned) with the whole block.
template <typename W>
__device__ __forceinline__ void copy_block(void* dst, const void* src, size_t bytes) {
    for (size_t i = threadIdx.x * 16; i < bytes; i += STEP_THREADS * 16)
        copy_async16(reinterpret_cast<char*>(dst) + i, reinterpret_cast<const char*>(src) + i);
}

// The weight buffers' copies on sm_90+: one bulk copy (the tensor memory accelerator) a piece,
// issued by one thread, completing on the buffer's mbarrier, instead of cp.async from every
// thread. cp.async from every thread stalled the threads issuing them once the SM's outstanding
// loads were full, so a block spent up to 3 us issuing the next product's weights before its own
// product could start (block 0's trace, H100, f16 batch 1: 6 us a layer in all). Use u (from 0) of
// a buffer completes its mbarrier's phase u, of parity u & 1.
__device__ __forceinline__ void fetch_init(unsigned long long* mbar, int n) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    if (threadIdx.x == 0) {
        for (int i = 0; i < n; i++) {
            unsigned int a = (unsigned int)__cvta_generic_to_shared(mbar + i);
            asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(a) : "memory");
        }
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    __syncthreads();
#endif
}
// Thread 0: expects `bytes` on the buffer's mbarrier (its one arrival); every piece then follows.
__device__ __forceinline__ void fetch_expect(unsigned long long* mbar, unsigned int bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    unsigned int a = (unsigned int)__cvta_generic_to_shared(mbar);
    // The buffer's earlier reads (generic proxy) before the copies' writes (async proxy).
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(a), "r"(bytes) : "memory");
#endif
}
// Thread 0: one piece (16-byte aligned ends, a multiple of 16 bytes); `stream`: with L2 priority
// evict_first (l2_policy).
__device__ __forceinline__ void fetch_piece(void* dst, const void* src, unsigned int bytes, unsigned long long* mbar,
                                            bool stream = false) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    unsigned int d = (unsigned int)__cvta_generic_to_shared(dst), a = (unsigned int)__cvta_generic_to_shared(mbar);
    if (stream) {
        asm volatile(
            "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint [%0], [%1], %2, [%3], %4;" ::
                "r"(d),
            "l"(src), "r"(bytes), "r"(a), "l"(l2_policy(false))
            : "memory");
    } else {
        asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(d),
                     "l"(src), "r"(bytes), "r"(a)
                     : "memory");
    }
#endif
}
// Every thread: waits for the buffer's use u (parity u & 1).
__device__ __forceinline__ void fetch_wait(unsigned long long* mbar, int u) { mbar_wait<false>(mbar, u); }

__device__ __forceinline__ int ceil_div(int a, int b) { return (a + b - 1) / b; }

// n / d by one wide multiply, m = ceil(2^32 / d): exact whenever n * d <= 2^32 (every quotient
// below: indices of a block's outputs, items or rows, far below 2^16, by divisors below 2^16). Set
// up once a launch (decode_step's StepPlan and StepDivs). A runtime integer division is about 25
// dependent instructions, and the fused step's serial paths (epilogues, item loops, the splits'
// combination) had several each.
struct FastDiv {
    unsigned long long m;
};
// ceil(2^32 / d) = floor((2^32 - 1) / d) + 1 for d >= 1, by a 32-bit division.
__device__ __forceinline__ FastDiv fast_div(unsigned int d) { return {(unsigned long long)(0xffffffffu / d) + 1}; }
__device__ __forceinline__ int udiv(int n, const FastDiv& f) {
    return (int)(((unsigned long long)(unsigned int)n * f.m) >> 32);
}

// Product j of a layer (0 QKV, 1 attention output, 2 MLP up, 3 MLP down): K, N and table slots.
__device__ __forceinline__ void step_shape(int j, int C, int& K, int& N, int& w) {
    K = j == 3 ? 4 * C : C;
    N = j == 0 ? 3 * C : j == 2 ? 4 * C : C;
    w = j == 0 ? T_ATTN_W : j == 1 ? T_PROJ_W : j == 2 ? T_FC_W : T_MPROJ_W;
}

// A block's part in product kind j (0 QKV, 1 attention output, 2 MLP up, 3 MLP down; the same in
// every layer), and the launch's divisors, worked out once a launch at decode_step's start (into
// shared memory) instead of at every product.
struct StepPlan {
    int K, N, w;        // step_shape
    int n0, nc;         // the block's columns [n0, n0 + nc)
    int cb_shift;       // a warp item's columns: 1 << cb_shift (1, 4 or 8)
    int S, per, items;  // k-shares of a column group, k of a share, column groups x S
    FastDiv by_s;
};
struct StepDivs {
    FastDiv M, H, C, D, S_att, HS_att;
};

// This block's plan for product kind j, its items of CB columns (or 1, below) and k in multiples
// of `unit`. Out of line: inside decode_step it cost the f32 entry function 16 bytes of spills.
template <typename W>
__device__ __noinline__ void step_plan(StepPlan& pl, int j, int C, int CB, int unit) {
    step_shape(j, C, pl.K, pl.N, pl.w);
    int cpb = ceil_div(pl.N, gridDim.x);
    pl.n0 = min(pl.N, (int)blockIdx.x * cpb);
    pl.nc = min(pl.N, pl.n0 + cpb) - pl.n0;
    auto split = [&](int cb) {
        pl.cb_shift = cb == 8 ? 3 : cb == 4 ? 2 : 0;
        int groups = ceil_div(pl.nc, cb);
        pl.S = max(1, STEP_WARPS / max(groups, 1));
        pl.per = ceil_div(ceil_div(pl.K, pl.S), unit) * unit;
        pl.items = groups * pl.S;
    };
    split(CB);
    // Items of CB = 4 columns only where each lane then takes at least two steps of `unit` k: with
    // less, an item is mostly its reduction. The output projection's items at 8-16 rows had 96 k
    // each (8 shares of the block's 6 columns in 2 groups); as 12 one-column items of 384 k, block
    // 0's product went from 10.5 to 4.6 us at 16 rows and 3.3 to 2.3 at 8 (H200, f32, prompt 128 +
    // 128 tokens; the other products were 2.8-3.4x slower that way).
    if (CB == 4 && pl.per < 2 * 32 * unit) split(1);
    pl.by_s = fast_div(pl.S);
}

// Shared memory of decode_step (the host mirrors this: fused_step_smem in imp.rs): two buffers
// (the largest product's slab, then LayerNorm gamma and beta), M x C floats of rows (M x 4C when
// the MLP-down rows are staged: they take the same place), then the scratch (the products'
// shares, attention's per-warp results, or the attention splits' (max, sum) and weights), then
// from a 16-byte boundary a copy of the weight table (step_table_entries addresses), then from a
// 16-byte boundary, where the launch has room for them, several attention splits' outputs
// (decode_step's `stage`).
__device__ __forceinline__ size_t step_slab_bytes(int C, int blocks, int wsize) {
    int elems = max(max(ceil_div(3 * C, blocks) * C, ceil_div(4 * C, blocks) * C), ceil_div(C, blocks) * 4 * C);
    return ((size_t)elems * wsize + 15) / 16 * 16;
}
__device__ __forceinline__ size_t step_buffer_bytes(int C, int blocks, int wsize) {
    return step_slab_bytes(C, blocks, wsize) + ((size_t)2 * C * wsize + 15) / 16 * 16;
}
__device__ __forceinline__ int step_table_entries(int L) { return STEP_GLOBALS + L * STEP_PER_LAYER; }
template <typename W>
__device__ __forceinline__ int step_scratch_floats(int C, int H, int blocks, int rows) {
    int shares = max(STEP_WARPS * 8, ceil_div(4 * C, blocks) + 7) * rows;
    int attention = STEP_WARPS * (C / H) + 2 * STEP_WARPS;
    int combine = 3 * max((int)blocks, rows * H);
    return max(max(shares, attention), combine);
}

// Attention splits of a step: enough that every block has an item, no fewer than
// STEP_SPLIT_KEYS keys each (a group of four, attend's unit for heads of 64, for each warp; with
// 16, one key a warp, more splits cost more to combine than their shorter runs save: H100, batch
// 1, prompt 128 + 128 tokens, E2E ms, 64 vs 16, twice each: f16 31.52 / 31.24 vs 32.12 / 32.25,
// f32 37.71 / 38.15 vs 38.46 / 38.38; prompts 512 and 896 within 1%). Every block computes the
// same value.
#define STEP_SPLIT_KEYS (4 * STEP_WARPS)
template <typename W>
__device__ __forceinline__ int step_splits(const int* pos, int M, int H) {  // pos: shared
    int longest = 1;
    for (int m = 0; m < M; m++) longest = max(longest, pos[m] + 1);
    return max(1, min((int)gridDim.x / (M * H), ceil_div(longest, STEP_SPLIT_KEYS)));
}

// Starts copying what product p (4 a layer; p == 4L: none, the LM head) needs from the weights
// into buf: this block's slab of its weight (L2 evict_first: read once a step), and the LayerNorm
// parameters of its phase (LN1 for QKV, LN2 for MLP up, the final one for the LM head).
// On sm_90+ thread 0 issues them as bulk copies completing on `mbar` (fetch_expect); before, every
// thread issues cp.async (the caller commits them). `table`: the block's copy of the weight table.
template <typename W>
__device__ __noinline__ void step_fetch(const unsigned long long* table, const StepPlan* plans, int p, int L, int C,
                                        size_t slab, unsigned char* buf, unsigned long long* mbar) {
    const unsigned long long* lt = table + STEP_GLOBALS + (p / 4) * STEP_PER_LAYER;
    const void* pieces[3] = {nullptr, nullptr, nullptr};
    unsigned int bytes[3] = {0, 0, 0};
    if (p < 4 * L) {
        const StepPlan& pl = plans[p % 4];
        pieces[0] = reinterpret_cast<const W*>(lt[pl.w]) + (size_t)pl.n0 * pl.K;
        bytes[0] = (unsigned int)((size_t)pl.nc * pl.K * sizeof(W));
    }
    int g = p == 4 * L ? -1 : p % 4 == 0 ? T_LN1_G : p % 4 == 2 ? T_LN2_G : -2;
    if (g != -2) {
        pieces[1] = reinterpret_cast<const void*>(g == -1 ? table[T_LNF_G] : lt[g]);
        pieces[2] = reinterpret_cast<const void*>(g == -1 ? table[T_LNF_B] : lt[g + 1]);
        bytes[1] = bytes[2] = (unsigned int)(C * sizeof(W));
    }
    unsigned char* dst[3] = {buf, buf + slab, buf + slab + C * sizeof(W)};
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    if (threadIdx.x == 0) {
        fetch_expect(mbar, bytes[0] + bytes[1] + bytes[2]);
        for (int i = 0; i < 3; i++)
            if (bytes[i] > 0) fetch_piece(dst[i], pieces[i], bytes[i], mbar, i == 0);
    }
#else
    for (int i = 0; i < 3; i++)
        if (bytes[i] > 0) copy_block<W>(dst[i], pieces[i], bytes[i]);
#endif
}

// xs[m, :] = wte[tokens[m], :] + wpe[pos[m], :] (block 0 also stores them into x, the residual
// stream).
template <typename W>
__device__ __noinline__ void step_embed(const int* tokens, const int* pos, const W* wte, const W* wpe, float* x, int M, int C,
                           float* xs) {
    for (int i = threadIdx.x; i < M * C / 4; i += STEP_THREADS) {
        int m = i / (C / 4), k = i % (C / 4) * 4;
        float4 te = load4(wte + (size_t)tokens[m] * C + k), pe = load4(wpe + (size_t)pos[m] * C + k);
        float4 v = make_float4(te.x + pe.x, te.y + pe.y, te.z + pe.z, te.w + pe.w);
        *reinterpret_cast<float4*>(xs + (size_t)i * 4) = v;
        if (blockIdx.x == 0) *reinterpret_cast<float4*>(x + (size_t)i * 4) = v;
    }
}

// LayerNorm in place of the M rows of C in xs (shared), with gamma and beta from shared memory:
// one warp a row, two-pass mean and variance in fp32, then the warp normalises its own row (a
// third pass over it in shared memory), so that no block barrier separates the statistics from
// the normalisation. (Holding the row in registers instead made the fused step's entry functions
// spill 72-80 bytes: its callees share its 128 registers. Spreading a row over STEP_WARPS / M
// warps, their sums added through shared memory behind two more block barriers, was slower
// everywhere: H200, E2E ms, same call, twice: prompt 128 + 128 tokens f16 batch 1 23.04 / 23.09 ->
// 23.80 / 23.88, f32 batch 1 25.96 / 26.01 -> 27.33 / 27.23, f16 batch 2 25.29 / 25.30 -> 25.78 /
// 25.63; f32 prompt 12 + 32 batch 8 8.98 / 9.00 -> 9.47 / 9.53, batch 16 13.93 / 13.89 -> 14.16 /
// 14.05.)
// Values k..k+3 of a row (v) normalised with the row's mean and inv (row_stats) and LayerNorm
// parameters g and b: step_norm's and cl_norm's.
template <typename W>
__device__ __forceinline__ float4 norm4(float4 v, float mean, float inv, const W* g, const W* b, int k) {
    float4 gv = load4(g + k), bv = load4(b + k);
    v.x = (v.x - mean) * inv * gv.x + bv.x;
    v.y = (v.y - mean) * inv * gv.y + bv.y;
    v.z = (v.z - mean) * inv * gv.z + bv.z;
    v.w = (v.w - mean) * inv * gv.w + bv.w;
    return v;
}
// A row's mean and 1 / sqrt(variance + eps) by one warp (C floats, shared; two passes, every lane
// gets both): step_norm's and cl_norm's statistics.
__device__ __forceinline__ void row_stats(const float* row, int C, float eps, float& mean, float& inv) {
    int lane = threadIdx.x & 31;
    float s = 0.0f;
    for (int k = lane * 4; k < C; k += 128) {
        float4 v = *reinterpret_cast<const float4*>(row + k);
        s += v.x + v.y + v.z + v.w;
    }
    mean = warp_sum(s) / C;
    float var = 0.0f;
    for (int k = lane * 4; k < C; k += 128) {
        float4 v = *reinterpret_cast<const float4*>(row + k);
        var += (v.x - mean) * (v.x - mean) + (v.y - mean) * (v.y - mean) + (v.z - mean) * (v.z - mean) +
               (v.w - mean) * (v.w - mean);
    }
    inv = rsqrtf(warp_sum(var) / C + eps);
}

template <typename W>
__device__ __noinline__ void step_norm(float* xs, const W* g, const W* b, float eps, int M, int C) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();
    for (int m = warp; m < M; m += STEP_WARPS) {
        float* row = xs + (size_t)m * C;
        float mean, inv;
        row_stats(row, C, eps, mean, inv);
        for (int k = lane * 4; k < C; k += 128) {
            float4 v = *reinterpret_cast<const float4*>(row + k);
            *reinterpret_cast<float4*>(row + k) = norm4(v, mean, inv, g, b, k);
        }
    }
    __syncthreads();
}

// One warp item of a product for `rows` (<= GEMV_ROWS) rows of x: acc[cc][m] = its share of the
// dot of row m with column c0 + cc of the slab, over k in [kb, ke). One loop for rows in shared
// memory, without a choice at each load, and one for rows in global memory (L2: the f32 MLP down
// past the staged rows) that takes three steps at once, so that more of their loads are in
// flight. H200, E2E ms, same call, twice, then again in another: f32 prompt 12 + 32 tokens, batch
// 16 14.44 / 14.43 -> 14.21 / 14.26 (14.40 / 14.32 -> 14.21 / 14.19), batch 8 9.36 / 9.38 -> 9.17 /
// 9.12 (9.33 / 9.44 -> 9.16 / 9.22), batch 12 12.58 / 12.51 -> 12.33 / 12.36; f32 batch 16 prompt
// 128 + 128 tokens 69.45 / 69.39 -> 68.61 / 68.68; f16 batch 1 prompt 128 + 128 tokens 23.70 /
// 23.67 -> 22.97 / 23.11 (23.82 / 23.87 -> 23.04 / 23.03); f32 batch 1 within 0.5%.
template <typename W, int CB>
__device__ __forceinline__ void step_item(const W* slab, int c0, int nc, int K, int kb, int ke, const float* x,
                                          bool global_x, int rows, float (&acc)[CB][GEMV_ROWS]) {
    constexpr int V = Vec<W>::N;
    int lane = threadIdx.x & 31;
#pragma unroll
    for (int cc = 0; cc < CB; cc++)
#pragma unroll
        for (int m = 0; m < GEMV_ROWS; m++) acc[cc][m] = 0.0f;
    auto step = [&](int k, bool gx) {
        float w[CB][V];
#pragma unroll
        for (int cc = 0; cc < CB; cc++) {
            // Past the last column: a valid row read and ignored.
            const W* wr = slab + (size_t)min(c0 + cc, nc - 1) * K;
            Vec<W>::convert(*reinterpret_cast<const uint4*>(wr + k), w[cc]);
        }
        fma_columns<CB, V>(w, x + k, K, rows, gx, acc);
    };
    if (global_x) {
#pragma unroll 3
        for (int k = kb + lane * V; k < ke; k += 32 * V) step(k, true);
    } else {
        for (int k = kb + lane * V; k < ke; k += 32 * V) step(k, false);
    }
}

// Sums a warp item's shares over the lanes into out[cc * stride + m] for the rows m < rows.
template <int CB>
__device__ __forceinline__ void step_item_store(float (&acc)[CB][GEMV_ROWS], int rows, float* out, int stride) {
    int lane = threadIdx.x & 31;
    constexpr int N = CB * GEMV_ROWS;
    if (N >= 16 && rows >= 2) {
        // Lane l ends with the total of value i = l * N / 32: column i / GEMV_ROWS, row
        // i % GEMV_ROWS.
        float s = warp_sum_scatter<N>(reinterpret_cast<float(&)[N]>(acc));
        int i = lane * N / 32;
        if (lane % (32 / N) == 0 && i % GEMV_ROWS < rows) out[i / GEMV_ROWS * stride + i % GEMV_ROWS] = s;
    } else {
#pragma unroll
        for (int cc = 0; cc < CB; cc++)
#pragma unroll
            for (int m = 0; m < GEMV_ROWS; m++) {
                if (m >= rows) break;
                float s = warp_sum(acc[cc][m]);
                if (lane == 0) out[cc * stride + m] = s;
            }
    }
}

// The block's share of a product (plan pl: nc columns of K weights in `slab`, shared) against M <=
// ROWS rows of `x` (shared, or global when `global_x`), in groups of GEMV_ROWS. Item it = (column
// group it / S of CB adjacent columns, k-share it % S) belongs to warp it % STEP_WARPS, which reads
// each input value once for its CB columns; red[(it * CB + cc) * ROWS + m] gets its dot for column
// cc of the group, row m.
template <typename W, int CB, int ROWS>
__device__ __noinline__ void step_product(const W* slab, const StepPlan& pl, const float* x, bool global_x, int M,
                                          float* red) {
    int warp = threadIdx.x >> 5;
    int nc = pl.nc, K = pl.K, S = pl.S, per = pl.per;
    for (int it = warp; it < pl.items; it += STEP_WARPS) {
        int g = udiv(it, pl.by_s);
        int c0 = g * CB, kb = (it - g * S) * per, ke = min(K, kb + per);
        float acc[CB][GEMV_ROWS];
        if constexpr (ROWS == GEMV_ROWS) {
            step_item<W, CB>(slab, c0, nc, K, kb, ke, x, global_x, M, acc);
            step_item_store<CB>(acc, M, red + it * CB * ROWS, ROWS);
        } else {
            for (int g0 = 0; g0 < M; g0 += GEMV_ROWS) {
                int rows = min(GEMV_ROWS, M - g0);
                step_item<W, CB>(slab, c0, nc, K, kb, ke, x + (size_t)g0 * K, global_x, rows, acc);
                step_item_store<CB>(acc, rows, red + it * CB * ROWS + g0, ROWS);
            }
        }
    }
    __syncthreads();
}

// step_product on tensor cores (f16/bf16 weights, M <= 16 rows, K % 32 == 0): item it = (group
// it / S of 8 adjacent columns, k-share it % S) belongs to warp it % STEP_WARPS and runs two
// m16n8k16 products a 32 k (rows M..15 of the A operand are zero; for ROWS <= 8, rows 8..15 are
// never loaded). Lane (g, tig) loads 8 consecutive k (from 8 tig) of column g and of rows g and g +
// 8; the first product takes k 0-3 of them as its logical k {2 tig, 2 tig + 1, 2 tig + 8, 2 tig +
// 9}, the second k 4-7: a dot product does not mind which k pairs with which so long as both
// operands agree, and every lane holding a logical k maps it to the same k. Rows in fp32 (A =
// float) are rounded to W, as matmul_mma does; rows already in W (A = W: the MLP-down input, which
// the MLP-up epilogue rounded the same way) are taken as they are, half the bytes to read. red as
// step_product with CB = 8.
//
// Shared-memory banks: the slab's rows and the input rows are K values apart, a multiple of 128
// bytes for the model's K, so the 8 lanes of a tig (8 rows or columns) read the same banks: a
// 16-byte load a lane takes 8 wavefronts a warp where 4 can serve it. In the wide kernel (ROWS 16)
// the lanes of odd g load their two pieces in the other order: the next 32-k step first (its 16
// bytes of W are 64 bytes on), or for fp32 rows the upper 4 k of the step first (16 bytes on), so
// that each instruction reads all 32 banks, 4 lanes a bank; two 32-k steps an iteration, the sums
// as before. H200, E2E ms, same call, twice, one step at a time vs spread: f16 batch 16 prompt 12 +
// 32 tokens 8.16 / 8.19 -> 8.02 / 8.02, prompt 128 + 128 37.77 / 37.68 -> 37.26 / 37.08, bf16 batch
// 16 8.20 / 8.15 -> 7.99 / 8.05; batch 12 the same (7.51 / 7.47 -> 7.52 / 7.49).
__device__ __forceinline__ void swap_if(bool odd, uint4& a, uint4& b) {
    uint4 t = odd ? b : a;
    b = odd ? a : b;
    a = t;
}
__device__ __forceinline__ void swap_if(bool odd, float4& a, float4& b) {
    float4 t = odd ? b : a;
    b = odd ? a : b;
    a = t;
}
// A row's 8 k of one step as mma pairs (zero where !ok); p: the row's first value + 8 tig + k.
template <typename W, typename A>
__device__ __forceinline__ void step_mma_pairs(const A* p, bool global_x, bool ok, unsigned int (&r)[4]) {
    if constexpr (sizeof(A) == sizeof(W)) {
        uint4 u = global_x ? __ldcg(reinterpret_cast<const uint4*>(p)) : *reinterpret_cast<const uint4*>(p);
        r[0] = ok ? u.x : 0u;
        r[1] = ok ? u.y : 0u;
        r[2] = ok ? u.z : 0u;
        r[3] = ok ? u.w : 0u;
    } else {
        float4 x0, x1;
        if (global_x) {
            x0 = __ldcg(reinterpret_cast<const float4*>(p));
            x1 = __ldcg(reinterpret_cast<const float4*>(p + 4));
        } else {
            x0 = *reinterpret_cast<const float4*>(p);
            x1 = *reinterpret_cast<const float4*>(p + 4);
        }
        r[0] = ok ? Mma<W>::pack(x0.x, x0.y) : 0u;
        r[1] = ok ? Mma<W>::pack(x0.z, x0.w) : 0u;
        r[2] = ok ? Mma<W>::pack(x1.x, x1.y) : 0u;
        r[3] = ok ? Mma<W>::pack(x1.z, x1.w) : 0u;
    }
}
// Row pieces of steps k and k2 (k2 == k where there is no second step) as mma pairs (s1: step k,
// s2: step k2; zero where !ok); p: the row's first value + 8 tig.
template <typename W, typename A>
__device__ __forceinline__ void step_mma_rows(const A* p, int k, int k2, bool odd, bool global_x, bool ok,
                                              unsigned int (&s1)[4], unsigned int (&s2)[4]) {
    if constexpr (sizeof(A) == sizeof(W)) {
        const uint4* a = reinterpret_cast<const uint4*>(p + (odd ? k2 : k));
        const uint4* b = reinterpret_cast<const uint4*>(p + (odd ? k : k2));
        uint4 u = global_x ? __ldcg(a) : *a, v = global_x ? __ldcg(b) : *b;
        swap_if(odd, u, v);
        s1[0] = ok ? u.x : 0u, s1[1] = ok ? u.y : 0u, s1[2] = ok ? u.z : 0u, s1[3] = ok ? u.w : 0u;
        s2[0] = ok ? v.x : 0u, s2[1] = ok ? v.y : 0u, s2[2] = ok ? v.z : 0u, s2[3] = ok ? v.w : 0u;
    } else {
        int lo = odd ? 4 : 0, hi = 4 - lo;
        float4 x[4];
        const float* q[4] = {p + k + lo, p + k + hi, p + k2 + lo, p + k2 + hi};
#pragma unroll
        for (int i = 0; i < 4; i++)
            x[i] = global_x ? __ldcg(reinterpret_cast<const float4*>(q[i])) : *reinterpret_cast<const float4*>(q[i]);
        swap_if(odd, x[0], x[1]);
        swap_if(odd, x[2], x[3]);
        auto pack = [&](float a, float b) { return ok ? Mma<W>::pack(a, b) : 0u; };
        s1[0] = pack(x[0].x, x[0].y), s1[1] = pack(x[0].z, x[0].w), s1[2] = pack(x[1].x, x[1].y),
        s1[3] = pack(x[1].z, x[1].w);
        s2[0] = pack(x[2].x, x[2].y), s2[1] = pack(x[2].z, x[2].w), s2[2] = pack(x[3].x, x[3].y),
        s2[3] = pack(x[3].z, x[3].w);
    }
}
// The two m16n8k16 products of a 32-k step: r0, r1 rows g and g + 8 (pairs as step_mma_rows), b
// the column's 8 k.
template <typename W>
__device__ __forceinline__ void step_mma_32(float (&d)[4], const unsigned int (&r0)[4], const unsigned int (&r1)[4],
                                            uint4 b) {
    unsigned int a[4] = {r0[0], r1[0], r0[1], r1[1]};
    unsigned int bw[2] = {b.x, b.y};
    Mma<W>::run(d, a, bw);
    a[0] = r0[2];
    a[1] = r1[2];
    a[2] = r0[3];
    a[3] = r1[3];
    bw[0] = b.z;
    bw[1] = b.w;
    Mma<W>::run(d, a, bw);
}
template <typename W, int ROWS, typename A>
__device__ __noinline__ void step_product_mma(const W* slab, const StepPlan& pl, const A* x, bool global_x, int M,
                                              float* red) {
    constexpr bool TWO = ROWS > 8;
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, tig = lane & 3;
    int nc = pl.nc, K = pl.K, S = pl.S, per = pl.per;
    bool ok0 = g < M, ok1 = TWO && g + 8 < M, odd = g & 1;
    const A* xr0 = x + (size_t)min(g, M - 1) * K + tig * 8;
    const A* xr1 = x + (size_t)min(g + 8, M - 1) * K + tig * 8;
    for (int it = warp; it < pl.items; it += STEP_WARPS) {
        int gi = udiv(it, pl.by_s);
        int c0 = gi * 8, kb = (it - gi * S) * per, ke = min(K, kb + per);
        // Past the last column: a valid row read and ignored.
        const W* wr = slab + (size_t)min(c0 + g, nc - 1) * K + tig * 8;
        float d[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        if constexpr (TWO) {
#pragma unroll 2
            for (int k = kb; k < ke; k += 64) {
                // The second step, or the first again where there is none (ke - kb is a multiple
                // of 32).
                bool two = k + 32 < ke;
                int k2 = two ? k + 32 : k;
                uint4 b1 = *reinterpret_cast<const uint4*>(wr + (odd ? k2 : k)),
                      b2 = *reinterpret_cast<const uint4*>(wr + (odd ? k : k2));
                swap_if(odd, b1, b2);
                unsigned int r0[4], s0[4], r1[4], s1[4];
                step_mma_rows<W>(xr0, k, k2, odd, global_x, ok0, r0, s0);
                step_mma_rows<W>(xr1, k, k2, odd, global_x, ok1, r1, s1);
                step_mma_32<W>(d, r0, r1, b1);
                if (two) step_mma_32<W>(d, s0, s1, b2);
            }
        } else {
            // One step at a time, in the same order for every lane: at 2-8 rows the spread loads
            // measured slower (H200, f16, prompt 12 + 32 tokens, E2E ms, same call, twice: batch
            // 2 5.74 / 5.76 -> 6.03 / 6.02, 4 6.02 / 6.00 -> 6.24 / 6.19, 8 6.66 / 6.68 -> 6.74 /
            // 6.73). Rows past M repeat row M - 1, so at few rows most lanes read one row anyway.
#pragma unroll 4
            for (int k = kb; k < ke; k += 32) {
                uint4 b = *reinterpret_cast<const uint4*>(wr + k);
                unsigned int r0[4], r1[4] = {0u, 0u, 0u, 0u};
                step_mma_pairs<W>(xr0 + k, global_x, ok0, r0);
                step_mma_32<W>(d, r0, r1, b);
            }
        }
        // d[0], d[1]: row g, columns c0 + 2 tig and c0 + 2 tig + 1; d[2], d[3]: row g + 8.
        if (ok0) {
            red[(it * 8 + 2 * tig) * ROWS + g] = d[0];
            red[(it * 8 + 2 * tig + 1) * ROWS + g] = d[1];
        }
        if (ok1) {
            red[(it * 8 + 2 * tig) * ROWS + g + 8] = d[2];
            red[(it * 8 + 2 * tig + 1) * ROWS + g + 8] = d[3];
        }
    }
    __syncthreads();
}

// Columns a product's warp item covers for M rows: one (the most items) for one or two rows;
// beyond, four, so that each input value read from shared memory serves four weights. (Two for one
// row, so that QKV's and MLP-up's slabs fit one round of the warps, measured the same at batch 1
// and 8% slower at f16 batch 2.)
__device__ __forceinline__ int step_column_block(int M) { return M <= 2 ? 1 : 4; }

// Phase B: items (m, h, split) over the blocks. Split sp of row m covers keys [sp * len,
// (sp + 1) * len) below its context (len = ceil(ctx / S)) with attend, as attention_decode does:
// the unnormalised output into part[m * S + sp][C] and (max, sum) into ml[((m * S + sp) * H + h) * 2].
// Where there are more items than blocks (steps of 12-16 rows: one split, 144-192 items on 132
// SMs), each half of a block's warps takes an item of its own (named barriers 1 and 2), so
// that no block has two items in turn while others wait. (Only the wide kernel can have more: the
// others take GROUPS = false.)
template <typename W, bool GROUPS>
__device__ __noinline__ void step_attention(const float* qkv, const W* k_cache, const W* v_cache, const int* row_seq,
                               const int* pos, float* part, float* ml, int M, int C, int H, int max_seq, int S,
                               float* scratch, const StepDivs& dv) {
    int D = C / H;
    float scale = rsqrtf((float)D);
    int items = M * H * S;
    int groups = GROUPS && items > (int)gridDim.x ? 2 : 1, warps = STEP_WARPS / groups;
    int group = GROUPS ? (threadIdx.x >> 5) / warps : 0, bar = groups == 1 ? 0 : 1 + group;
    for (int item = blockIdx.x + group * gridDim.x; item < items; item += groups * gridDim.x) {
        int m = udiv(item, dv.HS_att), hs = item - m * H * S, h = udiv(hs, dv.S_att), sp = hs - h * S;
        int ctx = pos[m] + 1, len = udiv(ctx + S - 1, dv.S_att);
        int t0 = sp * len, t1 = min(ctx, t0 + len);
        const W* keys = k_cache + (size_t)row_seq[m] * max_seq * C + h * D;
        const W* values = v_cache + (size_t)row_seq[m] * max_seq * C + h * D;
        attend<true, W, GROUPS>(qkv + (size_t)m * 3 * C + h * D, scale, keys, values, t0, t1, C, D,
                                scratch + STEP_WARPS * D, scratch, part + ((size_t)m * S + sp) * C + h * D,
                                ml + (((size_t)m * S + sp) * H + h) * 2, group * warps, warps, bar);
        group_sync<GROUPS>(bar, warps);
    }
}

// Phase C's prologue, in two parts: the splits' (max, sum) into shared memory (before the slab
// wait), and their outputs copied into shared memory (a bulk copy on sm_90+ completing on `mbar`,
// cp.async before: the caller commits them): with one split into xs, with more into `stage` where
// the launch has room for them (else nullptr: they are read from L2 in the second part); then each
// split's weight exp(max - row max) / total and the attention output rows (weighted sums of the
// splits) into xs. With one split every output is its row's value times the weight, in place: one
// copy instead of a round trip to L2 for each of the thread's outputs in turn (24 at 16 rows).
// With more, the copy puts the splits' outputs in flight with the (max, sum) loads, instead of one
// L2 round trip after them.
template <typename W>
__device__ __noinline__ void step_combine_load(const float* ml, const float* part, int M, int C, int H, int S,
                                               float* scratch, float* xs, float* stage, unsigned long long* mbar) {
    float* dst = S == 1 ? xs : stage;
    if (dst != nullptr) {
        unsigned int bytes = (unsigned int)((size_t)M * S * C * 4);
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
        if (threadIdx.x == 0) {
            // The rows were written by other blocks (generic proxy) and acquired by the barrier.
            // (The fence for global memory alone: the unqualified fence.proxy.async compiles to a
            // GPU-wide memory barrier too. H200, E2E ms, same call, twice, before / after: f32 batch
            // 1 prompt 128 + 128 25.34 / 25.25 -> 25.17 / 25.01, f16 batch 8 28.31 / 28.18 -> 28.11
            // / 27.98; the grid's batch 8 and 16 cells within 0.5%.)
            asm volatile("fence.proxy.async.global;" ::: "memory");
            fetch_expect(mbar, bytes);
            fetch_piece(dst, part, bytes, mbar);
        }
#else
        copy_block<W>(dst, part, bytes);
#endif
    }
    for (int i = threadIdx.x; i < M * S * H * 2; i += STEP_THREADS) scratch[i] = __ldcg(ml + i);
}
// The splits' weighted sums into xs: their outputs from `src` (shared memory if STAGED, else
// global through L2). Four outputs a thread at a time (of one head: the head size is a multiple
// of 4, which the host checks), so the index arithmetic and the weights' loads serve four.
template <typename W, bool STAGED>
__device__ __forceinline__ void step_combine_splits(const float* src, const float* weight, int M, int C, int H, int S,
                                                    float* xs, const StepDivs& dv) {
    for (int i = threadIdx.x * 4; i < M * C; i += STEP_THREADS * 4) {
        int m = udiv(i, dv.C), k = i - m * C, h = udiv(k, dv.D);
        float4 v = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
#pragma unroll 4
        for (int sp = 0; sp < S; sp++) {
            const float4* o = reinterpret_cast<const float4*>(src + ((size_t)m * S + sp) * C + k);
            float4 u = STAGED ? *o : __ldcg(o);
            float w = weight[(m * S + sp) * H + h];
            v.x += w * u.x;
            v.y += w * u.y;
            v.z += w * u.z;
            v.w += w * u.w;
        }
        *reinterpret_cast<float4*>(xs + i) = v;
    }
}
template <typename W>
__device__ __noinline__ void step_combine(const float* part, int M, int C, int H, int S, float* scratch, float* xs,
                                          const float* stage, unsigned long long* mbar, int use, const StepDivs& dv) {
    const float* sml = scratch;
    float* weight = scratch + 2 * M * S * H;
    __syncthreads();
    for (int i = threadIdx.x; i < M * H; i += STEP_THREADS) {
        int m = udiv(i, dv.H), h = i - m * H;
        float mx = -INFINITY, total = 0.0f;
        for (int sp = 0; sp < S; sp++) mx = fmaxf(mx, sml[((m * S + sp) * H + h) * 2]);
        for (int sp = 0; sp < S; sp++) {
            const float* o = sml + ((m * S + sp) * H + h) * 2;
            total += __expf(o[0] - mx) * o[1];
        }
        for (int sp = 0; sp < S; sp++)
            weight[(m * S + sp) * H + h] = __expf(sml[((m * S + sp) * H + h) * 2] - mx) / total;
    }
    if (S == 1 || stage != nullptr) fetch_wait(mbar, use);
    __syncthreads();
    if (S == 1) {
        // Four a thread, as step_combine_splits: one element a thread took 24 of them at 16 rows,
        // and this phase's prologue 2.8-4.3 us (1.7 at 8 rows; H200, f16, prompt 128 + 128).
        for (int i = threadIdx.x * 4; i < M * C; i += STEP_THREADS * 4) {
            int m = udiv(i, dv.C);
            float w = weight[m * H + udiv(i - m * C, dv.D)];
            float4* o = reinterpret_cast<float4*>(xs + i);
            float4 u = *o;
            *o = make_float4(w * u.x, w * u.y, w * u.z, w * u.w);
        }
    } else if (stage != nullptr) {
        step_combine_splits<W, true>(stage, weight, M, C, H, S, xs, dv);
    } else {
        step_combine_splits<W, false>(part, weight, M, C, H, S, xs, dv);
    }
    __syncthreads();
}

// Output (m, n0 + c) of a product: its S shares (column groups of CB) in order + bias, then by
// mode as matmul_finish: 1 store gelu_new; 2 out += v (the residual); 3 store, and append k/v
// columns to the KV cache; and 4 store gelu_new rounded to W (out then holds W). The thread's first
// output uses the bias and residual loaded ahead.
template <typename W, int ROWS>
__device__ __noinline__ void step_epilogue(const float* red, const StepPlan& pl, const StepDivs& dv, int M, int C,
                                           const W* bias, W bias0, float res0, float* out, int mode, W* kc,
                                           W* vc, const int* seq, const int* pos, int max_seq) {
    int t0 = threadIdx.x;
    int sh = pl.cb_shift, S = pl.S, n0 = pl.n0, N = pl.N;
    for (int t = t0; t < pl.nc * M; t += STEP_THREADS) {
        int c = udiv(t, dv.M), m = t - c * M, n = n0 + c;
        // red[(((c / CB) * S + s) * CB + c % CB) * ROWS + m], s in order.
        const float* r = red + ((((c >> sh) * S) << sh) + (c & ((1 << sh) - 1))) * ROWS + m;
        float v = 0.0f;
        for (int s = 0; s < S; s++) v += r[(s << sh) * ROWS];
        v += to_f(t == t0 ? bias0 : bias[n]);
        size_t i = (size_t)m * N + n;
        if (mode == 1) {
            out[i] = gelu_new(v);
        } else if (mode == 4) {
            store_as(reinterpret_cast<W*>(out) + i, gelu_new(v));
        } else if (mode == 2) {
            out[i] = (t == t0 ? res0 : __ldcg(out + i)) + v;
        } else {
            out[i] = v;
            if (n >= C) {
                size_t at = ((size_t)seq[m] * max_seq + pos[m]) * C + (n - (n < 2 * C ? C : 2 * C));
                store_as((n < 2 * C ? kc : vc) + at, v);
            }
        }
    }
}

// The LM head phase (out of line, like the other phases, so that its registers are its own).
template <typename W, int ROWS>
__device__ __noinline__ void step_head(const float* xs, int M, const W* head, int V, int C, int item0, float* logits,
                                       float* best_value, int* best_index, int* pos, int keep_rows) {
    lm_head_rows<W, STEP_WARPS, ROWS>(xs, M, head, V, C, item0, gridDim.x * STEP_WARPS, logits, best_value,
                                      best_index, pos, keep_rows);
}

// The LM head phase on tensor cores (half weights, M <= 16 rows, C % 32 == 0; where the products
// run on them). lm_head_rows on CUDA cores converts each weight and does M multiply-adds with it,
// so past a few rows it was bound by those: block 0's head phase (GPT2RT_CUDA_STEP_TRACE=1, H200,
// f16, prompt 128 + 128 tokens) took 22.5 us at batch 2 and 43.2 at 8, against 18 us for its 77
// MB at 4.3 TB/s; here 19.4 and 33.5. Warp item it covers vocabulary entries [32 it, 32 it + 32)
// for every row: four m16n8k16 tiles, the weights loaded straight from memory into the B fragments
// (lane (g, tig): 8 consecutive k from 8 tig of entry 8 j + g, mapped to logical k as
// step_product_mma does), the rows (rounded to W, as matmul_mma does) from `a_s` (16 x (C + 32)
// of W, rows M..15 zero; 32 more between rows so that the fragment loads of rows g and g + 1 fall
// 16 banks apart). Items go round the blocks first (item it: warp it / gridDim.x of block it %
// gridDim.x), so that every SM streams. keep_rows as lm_head_rows. Then as lm_head_rows: logits
// stored, each block's best per row into best_value/best_index[m * gridDim.x + blockIdx.x] (first
// index on ties), block 0 advancing the positions.
#define STEP_HEAD_ITEM 32
template <typename W>
__device__ void step_head_rows(const float* xs, int M, int C, unsigned short* a_s) {
    int ast = C + 32, half = C / 2;
    for (int i = threadIdx.x; i < 16 * half; i += STEP_THREADS) {
        int m = i / half, k = 2 * (i - m * half);
        unsigned int v = m < M ? Mma<W>::pack(xs[(size_t)m * C + k], xs[(size_t)m * C + k + 1]) : 0u;
        *reinterpret_cast<unsigned int*>(a_s + (size_t)m * ast + k) = v;
    }
}
// Asks L2 for the first 128 k of the warp's first item (8 KB a warp, 13 MB in all at 132 SMs, as
// lm_head_prefetch's first items): the whole item (the whole head, 77 MB) held the final LayerNorm
// up by 6 us.
template <typename W>
__device__ __forceinline__ void step_head_prefetch(const W* head, int V, int C) {
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int v = (warp * (int)gridDim.x + (int)blockIdx.x) * STEP_HEAD_ITEM + (lane >> 1);
    const char* p = reinterpret_cast<const char*>(head + (size_t)v * C) + (lane & 1) * 128;
    for (int r = 0; r < STEP_HEAD_ITEM; r += 16)
        if (v + r < V && (lane & 1) * 128 < C * (int)sizeof(W))
            asm volatile("prefetch.global.L2 [%0];" ::"l"(p + (size_t)r * C * sizeof(W)));
}
template <typename W>
__device__ __noinline__ void step_head_mma(const unsigned short* a_s, int M, const W* __restrict__ head, int V, int C,
                                           float* logits, float* best_value, int* best_index, int* pos,
                                           int keep_rows, float* scratch) {
    // The warps' bests in the step's scratch (free by now), not in more static shared memory.
    auto& warp_value = *reinterpret_cast<float(*)[STEP_WARPS][16]>(scratch);
    auto& warp_index = *reinterpret_cast<int(*)[STEP_WARPS][16]>(scratch + STEP_WARPS * 16);
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, tig = lane & 3;
    int ast = C + 32;
    const unsigned short* r0 = a_s + (size_t)g * ast + tig * 8;
    const unsigned short* r1 = r0 + (size_t)8 * ast;
    float bv[2] = {-INFINITY, -INFINITY};
    int bi[2] = {0x7fffffff, 0x7fffffff};
    int items = (V + STEP_HEAD_ITEM - 1) / STEP_HEAD_ITEM;
    for (int it = warp * gridDim.x + blockIdx.x; it < items; it += gridDim.x * STEP_WARPS) {
        int v0 = it * STEP_HEAD_ITEM;
        unsigned long long policy = keep_rows < 0 ? 0 : l2_policy(v0 < keep_rows);
        const W* wr[4];
#pragma unroll
        for (int j = 0; j < 4; j++) wr[j] = head + (size_t)min(v0 + 8 * j + g, V - 1) * C + tig * 8;
        float acc[4][4] = {};
        // Four 32-k steps' weights loaded before their math: 16 loads of 512 bytes a warp in flight.
        for (int k0 = 0; k0 < C; k0 += 128) {
            uint4 b[4][4];
#pragma unroll
            for (int u = 0; u < 4; u++)
#pragma unroll
                for (int j = 0; j < 4; j++) {
                    int k = k0 + 32 * u;
                    b[u][j] = k >= C ? make_uint4(0, 0, 0, 0) : load_weights(wr[j] + k, keep_rows, policy);
                }
#pragma unroll
            for (int u = 0; u < 4; u++) {
                int k = k0 + 32 * u;
                if (k >= C) break;
                uint4 x0 = *reinterpret_cast<const uint4*>(r0 + k), x1 = *reinterpret_cast<const uint4*>(r1 + k);
                unsigned int lo[4] = {x0.x, x1.x, x0.y, x1.y}, hi[4] = {x0.z, x1.z, x0.w, x1.w};
#pragma unroll
                for (int j = 0; j < 4; j++) {
                    unsigned int b0[2] = {b[u][j].x, b[u][j].y}, b1[2] = {b[u][j].z, b[u][j].w};
                    Mma<W>::run(acc[j], lo, b0);
                    Mma<W>::run(acc[j], hi, b1);
                }
            }
        }
        // acc[j][2 h], acc[j][2 h + 1]: row g + 8 h, entries v0 + 8 j + 2 tig and + 1.
#pragma unroll
        for (int j = 0; j < 4; j++)
#pragma unroll
            for (int h = 0; h < 2; h++) {
                int m = g + 8 * h, n = v0 + 8 * j + 2 * tig;
                if (m >= M) continue;
                float x = acc[j][2 * h], y = acc[j][2 * h + 1];
                if (n < V) {
                    logits[(size_t)m * V + n] = x;
                    if (better(x, n, bv[h], bi[h])) { bv[h] = x; bi[h] = n; }
                }
                if (n + 1 < V) {
                    logits[(size_t)m * V + n + 1] = y;
                    if (better(y, n + 1, bv[h], bi[h])) { bv[h] = y; bi[h] = n + 1; }
                }
            }
    }
    // Each row's best over the 4 lanes holding it (tig), then over the warps.
#pragma unroll
    for (int h = 0; h < 2; h++) {
#pragma unroll
        for (int o = 1; o < 4; o <<= 1) best_xor(bv[h], bi[h], o);
        if (tig == 0) {
            warp_value[warp][g + 8 * h] = bv[h];
            warp_index[warp][g + 8 * h] = bi[h];
        }
    }
    __syncthreads();
    block_best_rows(warp_value, warp_index, M, best_value, best_index, pos);
}

template <typename W, int ROWS>
__device__ void decode_step(const unsigned long long* table, int L, int C, int H, int V, float eps, int M,
                            const int* tokens, const int* row_seq, int* pos, float* x, float* qkv, float* h4,
                            float* part, float* ml, W* k_cache, W* v_cache, int max_seq,
                            long long layer_stride, float* logits, float* best_value, int* best_index,
                            unsigned int* bar, int* next, int flags, int head_keep, unsigned long long* trace) {
    // Aligned to 128 bytes (the dynamic shared memory starts after the static, whose size moves
    // with every change): H200, E2E ms, same call, twice, with it at 1696 bytes (32 past a 128-byte
    // line), at 1616 (80 past) and aligned: f32 batch 16 prompt 128 + 128 tokens 71.55 / 71.76,
    // 73.59 / 73.71 and 69.00 / 69.29; f32 batch 1 27.78 / 27.82, 30.09 / 30.38 and 27.17 / 27.30;
    // f16 batch 1 24.03 / 24.17, 26.22 / 26.37 and 23.60 / 23.98.
    extern __shared__ __align__(128) unsigned char step_smem[];
    size_t slab = step_slab_bytes(C, gridDim.x, sizeof(W)), buffer = step_buffer_bytes(C, gridDim.x, sizeof(W));
    unsigned char* bufs[2] = {step_smem, step_smem + buffer};
    float* xs = reinterpret_cast<float*>(step_smem + 2 * buffer);
    bool stage_h4 = flags & STEP_STAGE_H4;
    bool mma = !IsF32<W>::value && (flags & STEP_MMA);
    // In the wide kernel on tensor cores the MLP-up epilogue stores its rows in W (rounded as the
    // MLP-down product would round them on the way in: the same sums) and the MLP-down product
    // reads them so: half the bytes to copy and stage (16 rows: 96 KB instead of 192, which fits
    // beside the buffers).
    bool half_h4 = mma && ROWS > GEMV_ROWS;
    // The staged MLP-down rows take the place of xs, which nothing reads from the end of the MLP-up
    // product to the next layer's input copy: the launch's shared memory is M C floats smaller, so
    // more of each SM is L1, which the loads in flight need (H200, f16 batch 8: 207.6 KB left 28 KB
    // of L1, and the LM head phase, whose loads are plain, took 33.7 us against 22.7 at batch 6).
    float* h4s = xs;
    // (Written as a choice of two offsets: as one offset times a choice, the f16/bf16 entry
    // functions spilled 16 bytes of stores and 52 of loads instead of 8 and 8, and bf16 batch 1 was
    // 8% slower: H200, prompt 128 + 128 tokens, E2E 23.06 / 23.21 -> 24.94 / 25.00 ms. The narrow
    // kernels keep that form: the wide kernel's third offset, for rows in W, cost them 12-60 bytes
    // of spills in each of the four ways it was written; see the performance notes.)
    float* scratch = ROWS > GEMV_ROWS ? xs + (stage_h4 ? (size_t)M * (half_h4 ? 2 : 4) * C : (size_t)M * C)
                                      : xs + (stage_h4 ? (size_t)M * 4 * C : (size_t)M * C);
    size_t table_at = ((size_t)(reinterpret_cast<unsigned char*>(scratch + step_scratch_floats<W>(C, H, gridDim.x, ROWS)) -
                                step_smem) +
                       15) / 16 * 16;
    // The weight table, copied into shared memory: every barrier's acquire leaves the L1 cache
    // cold, so each address read from global memory was an L2 round trip on the way to a product.
    unsigned long long* s_table = reinterpret_cast<unsigned long long*>(step_smem + table_at);
    unsigned int smem_size;
    asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(smem_size));
    if (table_at + (size_t)step_table_entries(L) * 8 > smem_size || M > ROWS) __trap();
    for (int i = threadIdx.x; i < step_table_entries(L); i += STEP_THREADS) s_table[i] = table[i];
    // The weight buffers' mbarriers (sm_90+: step_fetch's bulk copies), and fetched[2] for the
    // attention splits' outputs (step_combine_load; one use a layer, so use l in layer l).
    __shared__ unsigned long long fetched[3];
    fetch_init(fetched, 3);
    auto at = [&](int slot) { return reinterpret_cast<const W*>(s_table[slot]); };
    auto ln = [&](int p, int which) {
        return reinterpret_cast<const W*>(bufs[p & 1] + slab) + (which ? C : 0);
    };
    // Positions and sequences of the rows, read once.
    __shared__ int s_pos[ROWS], s_seq[ROWS];
    if (threadIdx.x < M) {
        s_pos[threadIdx.x] = pos[threadIdx.x];
        s_seq[threadIdx.x] = row_seq[threadIdx.x];
    }
    __syncthreads();
    int S_att = step_splits<W>(s_pos, M, H);
    // Where the attention splits' outputs are copied for their combination, past the table, when
    // there are several and the launch's shared memory has room: the host asks for it where it
    // fits (step_stage_bytes in imp.rs; until 2026-11-29 it asked for none, and the combination
    // read the outputs through L2 after the (max, sum) pairs had come).
    size_t stage_at = (table_at + (size_t)step_table_entries(L) * 8 + 15) / 16 * 16;
    float* stage = S_att > 1 && stage_at + (size_t)M * S_att * C * 4 <= smem_size
                       ? reinterpret_cast<float*>(step_smem + stage_at)
                       : nullptr;
    // Half weights on CUDA cores take one column an item at any row count: their steps of 2 rows or
    // more run on tensor cores unless a knob says otherwise, and a third product instance cost the
    // half kernels 20 bytes of spills (without it, H100, same call, three times, E2E ms: f16 batch 2
    // with 32 tokens 7.06 / 7.01 / 7.02 vs 7.11 / 7.08 / 7.07).
    int CB = mma ? 8 : IsF32<W>::value ? step_column_block(M) : 1;
    __shared__ StepPlan plans[4];
    __shared__ StepDivs dv;
    if (threadIdx.x < 4) {
        step_plan<W>(plans[threadIdx.x], threadIdx.x, C, CB, mma ? 32 : Vec<W>::N);
    } else if (threadIdx.x == 32) {
        dv = {fast_div(M), fast_div(H), fast_div(C), fast_div(C / H), fast_div(S_att), fast_div(H * S_att)};
    }
    __syncthreads();
    int products = 4 * L;
    unsigned int barriers = 0;
    int stamps = 0;
    stamp(trace, stamps);
    step_fetch<W>(s_table, plans, 0, L, C, slab, bufs[0], &fetched[0]);
    copy_commit();
    // Where product p's columns are, and this thread's first output (t = threadIdx.x): its bias
    // and, for the residual products, the old x value, loaded ahead (before the barrier that
    // precedes the product, once nothing will change them; kept raw until used).
    struct Ahead {
        const W* bias;
        W bias0;
        float res0;
    };
    auto ahead = [&](int p) {
        Ahead a;
        const StepPlan& pl = plans[p % 4];
        a.bias = reinterpret_cast<const W*>(s_table[STEP_GLOBALS + (p / 4) * STEP_PER_LAYER + pl.w + 1]);
        int t = threadIdx.x;
        if (t < pl.nc * M) {
            int c = udiv(t, dv.M);
            a.bias0 = a.bias[pl.n0 + c];
            if (p % 2 == 1) a.res0 = __ldcg(x + (size_t)(t - c * M) * C + pl.n0 + c);
        }
        return a;
    };
    Ahead next_product = ahead(0);
    // Product p: `issue` starts the copies of its input rows and the next product's buffer is
    // requested; everything is waited for at once and `prepare` finishes the input rows; then the
    // block's columns and the epilogue (mode as step_epilogue: 1 GELU, 2 residual add, 3 store +
    // KV append, 4 GELU in W). `half_in`: the input rows are in W (tensor cores only). The caller
    // runs the barrier.
    auto product = [&](int p, const float* in, bool global_in, bool half_in, float* out, int mode, W* kc, W* vc,
                       auto&& issue, auto&& prepare) {
        Ahead a = next_product;
        const StepPlan& pl = plans[p % 4];
        issue();
        copy_commit();
        step_fetch<W>(s_table, plans, p + 1, L, C, slab, bufs[(p + 1) & 1], &fetched[(p + 1) & 1]);
        copy_commit();
        stamp(trace, stamps);
        copy_wait_all_but_newest();
        fetch_wait(&fetched[p & 1], p >> 1);
        __syncthreads();
        stamp(trace, stamps);
        prepare();
        const W* slab_p = reinterpret_cast<const W*>(bufs[p & 1]);
        if (mma) {
            // mma is never set for f32: no instance of that is made.
            if constexpr (!IsF32<W>::value) {
                if (half_in)
                    step_product_mma<W, ROWS, W>(slab_p, pl, reinterpret_cast<const W*>(in), global_in, M, scratch);
                else
                    step_product_mma<W, ROWS, float>(slab_p, pl, in, global_in, M, scratch);
            }
        } else if (pl.cb_shift == 0) {
            step_product<W, 1, ROWS>(slab_p, pl, in, global_in, M, scratch);
        } else {
            if constexpr (IsF32<W>::value) step_product<W, 4, ROWS>(slab_p, pl, in, global_in, M, scratch);
        }
        step_epilogue<W, ROWS>(scratch, pl, dv, M, C, a.bias, a.bias0, a.res0, out, mode, kc, vc, s_seq, s_pos,
                               max_seq);
        // The next product's loads, unless that is the output projection: its residual (x) may
        // still be changing until after the attention barrier (block 0 embeds in layer 0).
        if (p % 4 != 0 && p + 1 < products) next_product = ahead(p + 1);
        stamp(trace, stamps);
        grid_barrier(bar, barriers);
    };
    for (int l = 0; l < L; l++) {
        W* kc = k_cache + l * layer_stride;
        W* vc = v_cache + l * layer_stride;
        int p = 4 * l;
        product(
            p, xs, false, false, qkv, 3, kc, vc,
            [&] {
                if (l > 0) copy_block<W>(xs, x, (size_t)M * C * 4);
            },
            [&] {
                if (l == 0) step_embed<W>(tokens, s_pos, at(T_WTE), at(T_WPE), x, M, C, xs);
                step_norm<W>(xs, ln(p, 0), ln(p, 1), eps, M, C);
            });
        step_attention<W, (ROWS > GEMV_ROWS)>(qkv, kc, vc, s_seq, s_pos, part, ml, M, C, H, max_seq, S_att, scratch,
                                              dv);
        next_product = ahead(p + 1);
        stamp(trace, stamps);
        grid_barrier(bar, barriers);
        product(
            p + 1, xs, false, false, x, 2, nullptr, nullptr,
            [&] { step_combine_load<W>(ml, part, M, C, H, S_att, scratch, xs, stage, &fetched[2]); },
            [&] { step_combine<W>(part, M, C, H, S_att, scratch, xs, stage, &fetched[2], l, dv); });
        product(
            p + 2, xs, false, false, h4, half_h4 ? 4 : 1, nullptr, nullptr, [&] { copy_block<W>(xs, x, (size_t)M * C * 4); },
            [&] { step_norm<W>(xs, ln(p + 2, 0), ln(p + 2, 1), eps, M, C); });
        product(
            p + 3, stage_h4 ? h4s : h4, !stage_h4, half_h4, x, 2, nullptr, nullptr,
            [&] {
                if (stage_h4) copy_block<W>(h4s, h4, (size_t)M * 4 * C * (half_h4 ? sizeof(W) : 4));
            },
            [] {});
    }
    // The LM head: the final LayerNorm's parameters came with product 4L - 1's fetch. On tensor
    // cores where the products are, its rows (in W) in the two buffers, free once the LayerNorm is
    // done, where they fit.
    int warp = threadIdx.x >> 5;
    int item0 = blockIdx.x * STEP_WARPS + warp;
    const W* head = at(T_HEAD);
    bool head_mma = false;
    if constexpr (!IsF32<W>::value)
        head_mma = mma && (size_t)16 * (C + 32) * sizeof(W) <= 2 * buffer;
    if (head_mma)
        step_head_prefetch<W>(head, V, C);
    else
        lm_head_prefetch<W>(head, V, C, item0);
    copy_block<W>(xs, x, (size_t)M * C * 4);
    copy_commit();
    copy_commit();
    copy_wait_all_but_newest();
    fetch_wait(&fetched[(4 * L) & 1], (4 * L) >> 1);
    __syncthreads();
    step_norm<W>(xs, ln(4 * L, 0), ln(4 * L, 1), eps, M, C);
    stamp(trace, stamps);
    if constexpr (!IsF32<W>::value) {
        if (head_mma) {
            unsigned short* a_s = reinterpret_cast<unsigned short*>(step_smem);
            __syncthreads();  // the LayerNorm's rows are in xs, and its parameters read
            step_head_rows<W>(xs, M, C, a_s);
            __syncthreads();
            step_head_mma<W>(a_s, M, head, V, C, logits, best_value, best_index, pos, head_keep, scratch);
        }
    }
    if (!head_mma) step_head<W, ROWS>(xs, M, head, V, C, item0, logits, best_value, best_index, pos, head_keep);
    stamp(trace, stamps);
    grid_barrier_done(bar, best_value, best_index, M, next);
}

#define STEP_KERNEL(W, NAME, ROWS)                                                                                \
    extern "C" __global__ void __launch_bounds__(StepThreads<W>::value, 1) NAME(                                  \
        const unsigned long long* table, int L, int C, int H, int V, float eps, int M, const int* tokens,         \
        const int* row_seq, int* pos, float* x, float* qkv, float* h4, float* part, float* ml, W* kc,             \
        W* vc, int max_seq, long long layer_stride, float* logits, float* bv, int* bi, unsigned int* bar,     \
        int* next, int flags, int head_keep, unsigned long long* trace) {                                         \
        decode_step<W, ROWS>(table, L, C, H, V, eps, M, tokens, row_seq, pos, x, qkv, h4, part, ml, kc, vc,       \
                             max_seq, layer_stride, logits, bv, bi, bar, next, flags, head_keep, trace);          \
    }
STEP_KERNEL(float, decode_step_f32, GEMV_ROWS)
STEP_KERNEL(__half, decode_step_f16, GEMV_ROWS)
STEP_KERNEL(__nv_bfloat16, decode_step_bf16, GEMV_ROWS)
// Up to 16 rows (the products' tensor-core tiles take rows 8-15 too).
STEP_KERNEL(float, decode_step16_f32, STEP_ROWS)
STEP_KERNEL(__half, decode_step16_f16, STEP_ROWS)
STEP_KERNEL(__nv_bfloat16, decode_step16_bf16, STEP_ROWS)

// ---- The cluster step: a batch-1 decode step in two grid-wide phases a layer (sm_90+) ----
//
// decode_step takes five phases a layer, each behind a grid barrier (about 1 us) and an L2 round
// trip for its input rows, and at batch 1 those latencies, not the weights, are the step. Here the
// blocks form clusters of CL_SIZE (thread-block clusters: distributed shared memory between its
// blocks, which send each other values, see send_one), and a layer takes two phases:
//  1. Cluster c < H takes head c. Each of its blocks normalises the row (every block keeps its own
//     copy of x, summed from the partials of the last phase in a fixed order), takes D / CL_SIZE
//     of the head's q, k and v columns (appending its k and v to the KV cache), and sends them to
//     every block of the cluster; attends over its share of the earlier keys and sends that share
//     to every block; every block combines the cluster's shares with the new key's
//     own term, and multiplies the head's output by the head's D columns of the output projection
//     for its C / CL_SIZE outputs: partial p1[c][n], summed over the heads in the next phase.
//  2. Every block adds the heads' partials and the bias to its x, normalises it, takes `hidden`
//     units of the MLP (their MLP-up rows and GELU, then their share of every MLP-down output, from
//     a copy of the MLP-down weights in the checkpoint's [4C, C] layout, so that a block's units are
//     contiguous rows), and the cluster sums those shares (each sent to block r for outputs [r C /
//     CL_SIZE, ...)) into p2[c][n], summed over the clusters at the start of the next layer.
// p1 and p2 have CL_MAX_CLUSTERS rows each, tagged (put_tagged); the rows no head or cluster writes
// hold zeros (the host clears them once), as cl_gather adds every row. No grid barrier separates
// the phases: each phase starts by waiting for the tags of the partial sums it adds (cl_gather).
// So the attention's splits combine inside the cluster, and neither the projection's nor the MLP
// down's input is gathered across the grid: each phase ends in partial sums that every cluster adds
// up for itself. Weights: the phase-1 slab (q, k, v columns and LN1) and the phase-2 slab (MLP-up
// and MLP-down rows, LN2) come by bulk copy into two buffers a phase ahead; the projection's columns
// are strided and come into registers, as do the biases. Every such request is made right after a
// phase's partial sums are in (cl_gather's `requests`), the last global loads the phase waits for.
// As the traces read (the hardware's queues are not documented): a load made after a block's bulk
// copies returns after them (about 2 us while every block copies its slab), and a grid barrier's
// release waited for the block's copies in flight, so a request anywhere else put that wait in
// front of a load or a barrier (every block's trace, H200, f16: 142 us a step with the slabs
// asked for before the barriers, 130 with them asked for after the partial sums' loads; 124 with
// no slab copied after the first layer's, wrong results; the partial sums' loads then went out
// one at a time, see cl_gather). Phase 1 asks for phase 2's slab,
// the projection's weights and the MLP-up biases; phase 2 for the next layer's phase-1 slab, its
// q, k, v biases. (The block's share of the earlier keys and values copied into shared memory a
// phase ahead measured no faster: H200, f16, E2E ms, same call, twice, with vs without: prompt 128
// + 128 tokens 19.65 / 19.51 vs 19.36 / 19.14, prompt 512 + 128 20.88 vs 20.65.) Rows of 1 only;
// f16/bf16 (in f32 the two slabs would not fit in shared memory together: f32 keeps decode_step);
// D == 64 (attend's), C % (8 CL_SIZE) == 0; the host checks what it needs (cluster_step in imp.rs).
#define CL_SIZE 8
// Most clusters (the partial sums' loads are unrolled over them), most hidden units a block, and
// most projection lane tasks a thread (C <= CL_PROJ_MAX * threads).
#define CL_MAX_CLUSTERS 16
#define CL_HID_MAX 32
#define CL_PROJ_MAX 2

template <typename W>
__device__ __forceinline__ size_t cl_buf_a(int C, int D) {
    return ((size_t)(3 * (D / CL_SIZE) + 2) * C * sizeof(W) + 15) / 16 * 16;
}
template <typename W>
__device__ __forceinline__ size_t cl_buf_b(int C, int u) {
    return ((size_t)(2 * u + 2) * C * sizeof(W) + 15) / 16 * 16;
}

// The partial sums travel tagged: each value's bits in the low half of an 8-byte word and the tag
// of the phase that wrote it in the high half, stored and loaded whole (relaxed, at GPU scope: one
// 8-byte access is single-copy atomic), so that a reader that sees the tag sees the value, with
// neither a grid barrier nor a fence on the writer's side. Tags count phases over the session's
// launches (decode_step_cl's tag0), so a word left from an earlier phase never carries the tag
// awaited.
__device__ __forceinline__ void put_tagged(unsigned long long* p, float v, unsigned int tag) {
    unsigned long long w = ((unsigned long long)tag << 32) | __float_as_uint(v);
    asm volatile("st.relaxed.gpu.global.u64 [%0], %1;" ::"l"(p), "l"(w) : "memory");
}
__device__ __forceinline__ unsigned long long get_tagged(const unsigned long long* p) {
    unsigned long long v;
    asm volatile("ld.relaxed.gpu.global.u64 %0, [%1];" : "=l"(v) : "l"(p));
    return v;
}
// Polls of one phase's partial sums before the kernel gives up (__trap: a failed launch, not a
// hang; seconds of polls, where a phase takes microseconds).
#define CL_POLL_LIMIT (1u << 22)

// A phase's start: x += bias + the sum of the rows of `part` (CL_MAX_CLUSTERS tagged rows of C;
// rows past n hold zeros), once the first n rows' values carry `tag`. Block r of the cluster
// reads columns [r C / CL_SIZE, ...) of every row (a column a thread: every row's load in flight
// at once, and all of them again while a value awaited is missing), adds them up, and sends the
// sums to every block of the cluster (into `inc`, completing on `got`, use u); each block adds
// the cluster's sums to its x. After its block's loads are in (a block barrier), every thread
// makes the phase's `requests` (the weights it asks for a phase ahead), then waits for the sums.
// The rows are summed in the order the grid-barrier version used (the even rows', the odd rows',
// then their sum and the bias), so every value is as it was. Every load is unconditional (rows
// past n too): loads of only the rows written (`row < n ? load : 0`) were issued one after
// another, each waiting for the last's sum (an L2 round trip a row).
// Before, every block read all C columns of every row after a grid barrier (a release, which is
// a GPU-wide memory barrier, an atomic, and a poll, then the loads). H200, f16, E2E ms, same
// call, twice, before / after: batch 1 prompt 128 + 128 tokens 15.94 / 16.02 -> 14.90 / 14.80,
// prompt 12 + 32 3.95 / 3.96 -> 3.72 / 3.77; every block's trace 107.4 -> 97.8 us a step. With
// the requests made after the wait for the sums instead, the phase-1 start took 2.8 us more
// (the MLP slab's bulk copies and the projection's loads were slow to issue after it, as the
// trace read with a stamp between), and the whole was no faster than with the grid barriers
// (16.21 / 16.36 against 15.96 / 16.16 in one call, 15.86 / 16.13 against 15.94 / 16.02 in
// another); a grid barrier kept before the phase-1 gather was slower (17.16 / 17.17), and so
// was a fence after each block's p2 stores (16.43 / 16.62).
template <typename W, typename R>
__device__ __forceinline__ void cl_gather(float* x, const unsigned long long* part, int n, unsigned int tag,
                                          const W* bias, int C, float* inc, unsigned long long* got, int u,
                                          R requests) {
    const int t = threadIdx.x, w = C / CL_SIZE;
    if (t < (w + 31) / 32 * 32) {
        const int k = (int)cluster_rank() * w + min(t, w - 1);  // (past w: loads, sends nothing)
        const float b = to_f(bias[k]);
        unsigned long long v[CL_MAX_CLUSTERS];
        for (unsigned int polls = 0;; polls++) {
#pragma unroll
            for (int i = 0; i < CL_MAX_CLUSTERS; i++) v[i] = get_tagged(part + (size_t)i * C + k);
            bool ready = true;
#pragma unroll
            for (int i = 0; i < CL_MAX_CLUSTERS; i++) ready &= i >= n || (unsigned int)(v[i] >> 32) == tag;
            if (ready) break;
            if (polls == CL_POLL_LIMIT) __trap();
        }
        float e = 0.0f, o = 0.0f;
#pragma unroll
        for (int i = 0; i < CL_MAX_CLUSTERS; i += 2) {
            e += __uint_as_float((unsigned int)v[i]);
            o += __uint_as_float((unsigned int)v[i + 1]);
        }
        const float s = (e + o) + b, next = __shfl_down_sync(0xffffffffu, s, 1);
        if (t < w && t % 2 == 0) {
#pragma unroll
            for (int q = 0; q < CL_SIZE; q++) send_pair(inc + k, got, q, s, next);
        }
    }
    __syncthreads();
    requests();
    receive_wait(got, u);
    for (int k = t * 4; k < C; k += STEP_THREADS * 4) {
        float4 a = *reinterpret_cast<const float4*>(inc + k), xv = *reinterpret_cast<const float4*>(x + k);
        xv.x += a.x;
        xv.y += a.y;
        xv.z += a.z;
        xv.w += a.w;
        *reinterpret_cast<float4*>(x + k) = xv;
    }
}

// LayerNorm of x (C floats, shared) into xn: every warp works out the mean and variance of the
// whole row (row_stats, as step_norm: the same values, and no block barrier between the
// statistics and their use), then the block normalises four values a thread.
template <typename W>
__device__ __forceinline__ void cl_norm(const float* x, float* xn, const W* g, const W* b, float eps, int C) {
    __syncthreads();
    float mean, inv;
    row_stats(x, C, eps, mean, inv);
    for (int k = threadIdx.x * 4; k < C; k += STEP_THREADS * 4) {
        float4 v = *reinterpret_cast<const float4*>(x + k);
        *reinterpret_cast<float4*>(xn + k) = norm4(v, mean, inv, g, b, k);
    }
    __syncthreads();
}

// LayerNorm folded into the product that follows it (decode_step_cl). LN(x)_k = (x_k - mean) inv
// g_k + b_k, so a product's output j is inv * sum_k W_jk g_k (x_k - mean) + (bias_j + sum_k W_jk
// b_k): the host folds the second part into the biases the cluster step reads (cluster_step in
// imp.rs), and a lane holds its share of g (x - mean) in registers for cl_dot_regs: values (lane +
// 32 i) VW .. + VW - 1, i < CL_XN (zeros past C; C <= CL_PROJ_MAX * STEP_THREADS_HALF, which the
// kernel checks). After a block barrier (x complete) each warp reads its share of x and of g once,
// works out the mean (the dots wait for it) and then the variance from registers (inv, which only
// the dots' ends wait for). The older cl_norm_regs read the row from shared memory three times, g
// and b once, and normalised before the first dot could start: 1.4 us a LayerNorm at batch 1.
#define CL_XN (CL_PROJ_MAX * STEP_THREADS_HALF / (32 * 8))
template <typename W>
__device__ __forceinline__ float cl_fold_regs(const float* x, const W* g, float eps, int C,
                                              float (&gx)[CL_XN][Vec<W>::N]) {
    constexpr int VW = Vec<W>::N;
    int lane = threadIdx.x & 31;
    __syncthreads();
    float s[CL_XN];
#pragma unroll
    for (int i = 0; i < CL_XN; i++) {
        int k = (lane + 32 * i) * VW;
        float p[VW / 4];
#pragma unroll
        for (int e = 0; e < VW; e += 4) {
            float4 v = k < C ? *reinterpret_cast<const float4*>(x + k + e) : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
            gx[i][e] = v.x;
            gx[i][e + 1] = v.y;
            gx[i][e + 2] = v.z;
            gx[i][e + 3] = v.w;
            p[e / 4] = (v.x + v.y) + (v.z + v.w);
        }
        s[i] = p[0];
#pragma unroll
        for (int e = 1; e < VW / 4; e++) s[i] += p[e];
    }
    float sum = s[0];
#pragma unroll
    for (int i = 1; i < CL_XN; i++) sum += s[i];
    uint4 graw[CL_XN];
#pragma unroll
    for (int i = 0; i < CL_XN; i++) {
        int k = (lane + 32 * i) * VW;
        graw[i] = k < C ? *reinterpret_cast<const uint4*>(g + k) : make_uint4(0, 0, 0, 0);
    }
    float mean = warp_sum(sum) / C, q[CL_XN];
#pragma unroll
    for (int i = 0; i < CL_XN; i++) {
        int k = (lane + 32 * i) * VW;
        float gv[VW], p[VW / 2];
        Vec<W>::convert(graw[i], gv);
#pragma unroll
        for (int e = 0; e < VW; e += 2) {
            float d0 = k < C ? gx[i][e] - mean : 0.0f, d1 = k < C ? gx[i][e + 1] - mean : 0.0f;
            p[e / 2] = d0 * d0 + d1 * d1;
            gx[i][e] = d0 * gv[e];
            gx[i][e + 1] = d1 * gv[e + 1];
        }
#pragma unroll
        for (int n = VW / 2; n > 1; n /= 2)
#pragma unroll
            for (int e = 0; e < n / 2; e++) p[e] += p[e + n / 2];
        q[i] = p[0];
    }
    float var = q[0];
#pragma unroll
    for (int i = 1; i < CL_XN; i++) var += q[i];
    return rsqrtf(warp_sum(var) / C + eps);
}

// The dot of slab row j (C weights, shared) with a lane's share of a row in registers
// (cl_fold_regs) by one warp; every lane gets it.
template <typename W>
__device__ __forceinline__ float cl_dot_regs(const W* row, const float (&xn)[CL_XN][Vec<W>::N], int C) {
    constexpr int VW = Vec<W>::N;
    int lane = threadIdx.x & 31;
    float s = 0.0f;
#pragma unroll
    for (int i = 0; i < CL_XN; i++) {
        int k = (lane + 32 * i) * VW;
        if (k >= C) break;
        float w[VW];
        Vec<W>::convert(*reinterpret_cast<const uint4*>(row + k), w);
#pragma unroll
        for (int e = 0; e < VW; e += 4)
            s += xn[i][e] * w[e] + xn[i][e + 1] * w[e + 1] + xn[i][e + 2] * w[e + 2] + xn[i][e + 3] * w[e + 3];
    }
    return warp_sum(s);
}

template <typename W>
__device__ void decode_step_cl(const unsigned long long* table, int L, int C, int H, int V, float eps,
                               const int* tokens, const int* row_seq, int* pos, unsigned long long* p1,
                               unsigned long long* p2, W* k_cache, W* v_cache, int max_seq, long long layer_stride,
                               float* logits, float* best_value, int* best_index, unsigned int* bar, int* next,
                               int hidden, int head_keep, unsigned long long* trace) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    constexpr int VW = Vec<W>::N;
    constexpr int PV = IsF32<W>::value ? 2 : 1;  // 16-byte pieces of 8 projection weights
    extern __shared__ __align__(128) unsigned char step_smem[];
    const int D = C / H, dq = D / CL_SIZE, T = STEP_THREADS;
    const int t = threadIdx.x, lane = t & 31, warp = t >> 5;
    const int r = (int)cluster_rank(), c = (int)blockIdx.x / CL_SIZE, clusters = (int)gridDim.x / CL_SIZE;
    const int u = hidden, j0 = (int)blockIdx.x * u, nu = max(0, min(4 * C, j0 + u) - j0);
    const int ua = 3 * dq, ub = 2 * u;  // the slabs' rows before their LayerNorm parameters
    const size_t a_bytes = cl_buf_a<W>(C, D), b_bytes = cl_buf_b<W>(C, u);
    W* buf_a = reinterpret_cast<W*>(step_smem);
    W* buf_b = reinterpret_cast<W*>(step_smem + a_bytes);
    float* x = reinterpret_cast<float*>(step_smem + a_bytes + b_bytes);
    float* xn = x + C;
    float* y = xn + C;                     // the MLP-down shares of this block's outputs, sent by the cluster
    float* part = y + C;                   // attention share: D outputs, then (max, sum)
    float* parts = part + D + 4;           // the cluster's shares, as part, D + 2 apart, sent
    float* qkv = parts + (CL_SIZE * (D + 2) + 3) / 4 * 4;  // the head's q, k, v, sent by the cluster
    float* att = qkv + 3 * D;
    float* hid = att + D;
    float* warp_ml = hid + (u + 3) / 4 * 4;
    float* warp_acc = warp_ml + 2 * STEP_WARPS;
    float* misc = warp_acc + STEP_WARPS * D;  // [0]: the new key's score
    float* inc = misc + 4;                    // [2][C]: the partial sums of phases 1 and 2, sent by the cluster
    size_t table_at = ((size_t)(reinterpret_cast<unsigned char*>(inc + 2 * C) - step_smem) + 15) / 16 * 16;
    unsigned long long* s_table = reinterpret_cast<unsigned long long*>(step_smem + table_at);
    unsigned int smem_size;
    asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(smem_size));
    if (table_at + (size_t)step_table_entries(L) * 8 > smem_size || u > CL_HID_MAX || D != 64 ||
        C > CL_PROJ_MAX * T || clusters > CL_MAX_CLUSTERS || H > clusters)
        __trap();
    for (int i = t; i < step_table_entries(L); i += T) s_table[i] = table[i];
    __shared__ unsigned long long fetched[2];
    // The exchanges' mbarriers: the q, k, v columns, the attention shares, the MLP-down shares, and
    // the partial sums of phase 1 (gathered at phase 2's start) and of phase 2.
    __shared__ unsigned long long xq, xp, xy, xg[2];
    if (t == 0) {
        unsigned long long* m[5] = {&xq, &xp, &xy, &xg[0], &xg[1]};
#pragma unroll
        for (int i = 0; i < 5; i++)
            asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"((unsigned int)__cvta_generic_to_shared(m[i]))
                         : "memory");
        // The gathers' first uses; each later one is expected right after the last completes (its
        // bytes come two phases later, after this block's MLP-down shares have gone out).
        receive_expect(&xg[0], C * 4);
        receive_expect(&xg[1], C * 4);
    }
    fetch_init(fetched, 2);  // (its fence orders the inits above before the cluster barrier)
    // No block sends before every block of its cluster has set up its mbarriers (the wait is at
    // the first send).
    asm volatile("barrier.cluster.arrive.relaxed.aligned;" ::: "memory");
    const int seq = row_seq[0], p0 = pos[0], token = tokens[0];
    // The tags of this launch's phases: the launches so far (bar[2], counted at the end of each)
    // times the phases of a launch, plus the phase's number from 1.
    const unsigned int tag0 = bar[2] * (unsigned int)(2 * L) + 1;
    auto gather = [&](int phase, int l, const W* bias, auto requests) {
        cl_gather<W>(x, phase == 0 ? p1 : p2, phase == 0 ? H : clusters, tag0 + 2 * l + phase, bias, C, inc + phase * C,
                     &xg[phase], l, requests);
        if (t == 0) receive_expect(&xg[phase], C * 4);
    };
    auto lt = [&](int l, int slot) {
        return reinterpret_cast<const W*>(s_table[STEP_GLOBALS + l * STEP_PER_LAYER + slot]);
    };
    // Phase 1's slab of layer l (l == L: the final LayerNorm's parameters only) and phase 2's.
    auto fetch_a = [&](int l) {
        if (t != 0) return;
        const W* g = l < L ? lt(l, T_LN1_G) : reinterpret_cast<const W*>(s_table[T_LNF_G]);
        const W* b = reinterpret_cast<const W*>(s_table[T_LNF_B]);  // (l == L only)
        bool cols = l < L && c < H;
        unsigned int piece = (unsigned int)(dq * C * sizeof(W)), ln = (unsigned int)(C * sizeof(W));
        // (A layer's LayerNorm bias is folded into the QKV biases: cl_fold_regs.)
        fetch_expect(&fetched[0], (cols ? 3 * piece : 0) + (l < L ? 1 : 2) * ln);
        if (cols)
            for (int i = 0; i < 3; i++)
                fetch_piece(buf_a + (size_t)i * dq * C, lt(l, T_ATTN_W) + ((size_t)i * C + c * D + r * dq) * C, piece,
                            &fetched[0], true);
        fetch_piece(buf_a + (size_t)ua * C, g, ln, &fetched[0]);
        if (l == L) fetch_piece(buf_a + (size_t)(ua + 1) * C, b, ln, &fetched[0]);
    };

    auto fetch_b = [&](int l) {
        if (t != 0) return;
        unsigned int ln = (unsigned int)(C * sizeof(W)), rows = (unsigned int)((size_t)nu * C * sizeof(W));
        fetch_expect(&fetched[1], 2 * rows + ln);  // (LN2's bias folded into the MLP-up biases)
        if (nu > 0) {
            fetch_piece(buf_b, lt(l, T_FC_W) + (size_t)j0 * C, rows, &fetched[1], true);
            fetch_piece(buf_b + (size_t)u * C, lt(l, T_MPROJ_W) + (size_t)j0 * C, rows, &fetched[1], true);
        }
        fetch_piece(buf_b + (size_t)ub * C, lt(l, T_LN2_G), ln, &fetched[1]);
    };
    __syncthreads();
    fetch_a(0);
    fetch_b(0);
    int stamps = 0;
    stamp<true>(trace, stamps);
    const float scale = rsqrtf((float)D);
    // What the phases read of the weights outside their slabs, into registers, as loaded (each is
    // converted where it is used, so that nothing waits for it before): the projection's weights
    // for this block's outputs (task i = t + k T: output r C / CL_SIZE + i / 8, the head's
    // dimensions [8 (i % 8), + 8)), the biases of the warp's q, k, v columns (j = warp + k
    // STEP_WARPS) and those of its MLP-up rows, with their LayerNorm's folded in (fp32: the
    // cluster step's table points at them; cl_fold_regs).
    constexpr int QB = (3 * 64 / CL_SIZE + STEP_WARPS - 1) / STEP_WARPS;
    constexpr int FB = (CL_HID_MAX + STEP_WARPS - 1) / STEP_WARPS;
    uint4 wp[CL_PROJ_MAX][PV];
    float qb[QB], fb[FB];
    auto load_wp = [&](int l) {
        if (c >= H) return;
        const W* proj = lt(l, T_PROJ_W);
#pragma unroll
        for (int k = 0; k < CL_PROJ_MAX; k++) {
            int i = t + k * T;
            const W* src = proj + (size_t)(r * (C / CL_SIZE) + i / 8) * C + c * D + (i % 8) * 8;
#pragma unroll
            for (int q = 0; q < PV; q++)
                wp[k][q] = i < C ? __ldcs(reinterpret_cast<const uint4*>(src) + q) : make_uint4(0, 0, 0, 0);
        }
    };
    auto load_qb = [&](int l) {
        if (c >= H) return;
        const float* bias = reinterpret_cast<const float*>(lt(l, T_ATTN_B));  // (folded: cl_fold_regs)
#pragma unroll
        for (int k = 0; k < QB; k++) {
            int j = min(warp + k * STEP_WARPS, 3 * dq - 1), which = j / dq;  // (past the columns: unused)
            qb[k] = bias[which * C + c * D + r * dq + (j - which * dq)];
        }
    };
    auto load_fb = [&](int l) {
        if (nu == 0) return;
        const float* bias = reinterpret_cast<const float*>(lt(l, T_FC_B));  // (folded: cl_fold_regs)
#pragma unroll
        for (int k = 0; k < FB; k++) fb[k] = bias[j0 + min(warp + k * STEP_WARPS, nu - 1)];  // (past nu: unused)
    };
    load_wp(0);
    load_qb(0);
    load_fb(0);
    for (int l = 0; l < L; l++) {
        W* kc = k_cache + l * layer_stride;
        W* vc = v_cache + l * layer_stride;
        const int h = c;
        const bool head = h < H;
        // x: the embeddings, or the last layer's MLP-down partials added (clusters in order) with
        // the bias to the residual.
        if (l == 0) {
            const W* wte = reinterpret_cast<const W*>(s_table[T_WTE]);
            const W* wpe = reinterpret_cast<const W*>(s_table[T_WPE]);
            for (int k = t * 4; k < C; k += T * 4) {
                float4 te = load4(wte + (size_t)token * C + k), pe = load4(wpe + (size_t)p0 * C + k);
                *reinterpret_cast<float4*>(x + k) = make_float4(te.x + pe.x, te.y + pe.y, te.z + pe.z, te.w + pe.w);
            }
        } else {
            gather(1, l - 1, lt(l - 1, T_MPROJ_B), [&] {
                fetch_b(l);
                load_wp(l);
                load_fb(l);
            });
        }
        // This layer's use of each exchange's mbarrier: its bytes expected (the one arrival; bytes
        // that come first wait for it). A sender's next use comes after it has the receiver's
        // later sends (the MLP-down shares, or the partial sums gathered), which follow every
        // thread's wait.
        if (t == 0) {
            if (head) {
                receive_expect(&xq, 3 * D * 4);
                receive_expect(&xp, CL_SIZE * (D + 2) * 4);
            }
            receive_expect(&xy, C * 4);
        }
        if (l == 0) asm volatile("barrier.cluster.wait.aligned;" ::: "memory");
        stamp<true>(trace, stamps);
        fetch_wait(&fetched[0], l);
        stamp<true>(trace, stamps);
        float xr[CL_XN][VW];
        float inv = cl_fold_regs<W>(x, buf_a + (size_t)ua * C, eps, C, xr);
        stamp<true>(trace, stamps);
        if (head) {
            // This block's q, k and v columns; k and v appended to the KV cache.
#pragma unroll
            for (int k = 0; k < QB; k++) {
                int j = warp + k * STEP_WARPS, which = j / dq, col = which * C + h * D + r * dq + (j - which * dq);
                if (j >= 3 * dq) break;
                float v = inv * cl_dot_regs<W>(buf_a + (size_t)j * C, xr, C) + qb[k];
                if (which > 0) {
                    W rounded;  // as the cache holds it
                    store_as(&rounded, v);
                    v = to_f(rounded);
                    if (lane == 0)
                        (which == 1 ? kc : vc)[((size_t)seq * max_seq + p0) * C + (col - which * C)] = rounded;
                }
                // To every block of the cluster (lane q to block q), at its place in the head's q, k, v.
                if (lane < CL_SIZE) send_one(qkv + which * D + r * dq + (j - which * dq), &xq, lane, v);
            }
        }
        if (head) {
            receive_wait(&xq, l);
            stamp<true>(trace, stamps);
            if (warp == 0) {
                float s = 0.0f;
                for (int d = lane; d < D; d += 32) s += qkv[d] * qkv[D + d];
                s = warp_sum(s);
                if (lane == 0) misc[0] = s * scale;
            }
            stamp<true>(trace, stamps);
            // This block's share of the earlier keys [0, p0).
            int len = (p0 + CL_SIZE - 1) / CL_SIZE, t0 = min(p0, r * len), t1 = min(p0, t0 + len);
            const W* keys = kc + (size_t)seq * max_seq * C + h * D;
            const W* values = vc + (size_t)seq * max_seq * C + h * D;
            attend<false, W>(qkv, scale, keys, values, t0, t1, C, D, warp_ml, warp_acc, part, part + D);
            __syncthreads();
            stamp<true>(trace, stamps);
            // The share (D + 2 floats, in pairs) to every block of the cluster, at this block's rank.
            for (int i = t; i < CL_SIZE * (D + 2) / 2; i += T) {
                int q = i / ((D + 2) / 2), e = 2 * (i - q * ((D + 2) / 2));
                send_pair(parts + r * (D + 2) + e, &xp, q, part[e], part[e + 1]);
            }
            receive_wait(&xp, l);
            // The head's output: the cluster's shares and the new key, in rank order.
            for (int d = t; d < D; d += T) {
                float sn = misc[0], mx = sn, m[CL_SIZE];
#pragma unroll
                for (int q = 0; q < CL_SIZE; q++) {
                    m[q] = parts[q * (D + 2) + D];
                    mx = fmaxf(mx, m[q]);
                }
                float num = 0.0f, den = 0.0f;
#pragma unroll
                for (int q = 0; q < CL_SIZE; q++) {
                    float w = m[q] == -INFINITY ? 0.0f : __expf(m[q] - mx);
                    num += w * parts[q * (D + 2) + d];
                    den += w * parts[q * (D + 2) + D + 1];
                }
                float w = __expf(sn - mx);
                att[d] = (num + w * qkv[2 * D + d]) / (den + w);
            }
            __syncthreads();
            stamp<true>(trace, stamps);
            // Its share of the output projection: p1[h][n] for the block's C / CL_SIZE outputs.
#pragma unroll
            for (int k = 0; k < CL_PROJ_MAX; k++) {
                int i = t + k * T, e = (i % 8) * 8;
                float w[8 * PV];
#pragma unroll
                for (int q = 0; q < PV; q++) Vec<W>::convert(wp[k][q], w + q * VW);
                float s = 0.0f;
#pragma unroll
                for (int z = 0; z < 8; z++) s += att[e + z] * w[z];
                s += __shfl_xor_sync(0xffffffffu, s, 1);
                s += __shfl_xor_sync(0xffffffffu, s, 2);
                s += __shfl_xor_sync(0xffffffffu, s, 4);
                if (i < C && i % 8 == 0) put_tagged(p1 + (size_t)h * C + r * (C / CL_SIZE) + i / 8, s, tag0 + 2 * l);
            }
        } else {
            stamps += 4;  // (the trace's stamps line up across the blocks)
        }
        stamp<true>(trace, stamps);

        // Phase 2.
        gather(0, l, lt(l, T_PROJ_B), [&] {
            fetch_a(l + 1);
            if (l + 1 < L) load_qb(l + 1);
        });
        stamp<true>(trace, stamps);
        fetch_wait(&fetched[1], l);
        stamp<true>(trace, stamps);
        inv = cl_fold_regs<W>(x, buf_b + (size_t)ub * C, eps, C, xr);
        stamp<true>(trace, stamps);
#pragma unroll
        for (int k = 0; k < FB; k++) {
            int j = warp + k * STEP_WARPS;
            if (j >= nu) break;
            float v = inv * cl_dot_regs<W>(buf_b + (size_t)j * C, xr, C) + fb[k];
            if (lane == 0) hid[j] = gelu_new(v);
        }
        __syncthreads();
        stamp<true>(trace, stamps);
        // This block's share of every MLP-down output.
        const W* down = buf_b + (size_t)u * C;
        // Two outputs a thread (C is even), from pairs of weights: one load for both, and two
        // sums in flight (measured with the LayerNorm's row in registers, as now).
        for (int n = 2 * t; n < C; n += 2 * T) {
            float s0 = 0.0f, s1 = 0.0f;
            for (int j = 0; j < nu; j++) {
                float h = hid[j];
                float2 d = two_to_f(down + (size_t)j * C + n);
                s0 += h * d.x;
                s1 += h * d.y;
            }
            // To the block of the cluster that sums output n, at this block's rank (the blocks' C /
            // CL_SIZE outputs are even in number: a pair has one owner).
            int q = n / (C / CL_SIZE);
            send_pair(y + r * (C / CL_SIZE) + (n - q * (C / CL_SIZE)), &xy, q, s0, s1);
        }
        receive_wait(&xy, l);
        for (int n = r * (C / CL_SIZE) + t; n < (r + 1) * (C / CL_SIZE); n += T) {
            float s = 0.0f;
#pragma unroll
            for (int q = 0; q < CL_SIZE; q++) s += y[q * (C / CL_SIZE) + (n - r * (C / CL_SIZE))];
            put_tagged(p2 + (size_t)c * C + n, s, tag0 + 2 * l + 1);
        }
        stamp<true>(trace, stamps);
    }
    // The final LayerNorm and the LM head.
    int item0 = blockIdx.x * STEP_WARPS + warp;
    const W* head_w = reinterpret_cast<const W*>(s_table[T_HEAD]);
    lm_head_prefetch<W>(head_w, V, C, item0);
    gather(1, L - 1, lt(L - 1, T_MPROJ_B), [] {});
    fetch_wait(&fetched[0], L);
    cl_norm<W>(x, xn, buf_a + (size_t)ua * C, buf_a + (size_t)(ua + 1) * C, eps, C);
    stamp<true>(trace, stamps);
    step_head<W, GEMV_ROWS>(xn, 1, head_w, V, C, item0, logits, best_value, best_index, pos, head_keep);
    stamp<true>(trace, stamps);
    grid_barrier_done(bar, best_value, best_index, 1, next);
#else
    __trap();
#endif
}

#define CL_STEP_KERNEL(W, NAME)                                                                                   \
    extern "C" __global__ void __launch_bounds__(StepThreads<W>::value, 1) NAME(                                  \
        const unsigned long long* table, int L, int C, int H, int V, float eps, const int* tokens,                \
        const int* row_seq, int* pos, unsigned long long* p1, unsigned long long* p2, W* kc, W* vc, int max_seq,  \
        long long layer_stride, float* logits, float* bv, int* bi, unsigned int* bar, int* next, int hidden,      \
        int head_keep, unsigned long long* trace) {                                                               \
        decode_step_cl<W>(table, L, C, H, V, eps, tokens, row_seq, pos, p1, p2, kc, vc, max_seq, layer_stride,    \
                          logits, bv, bi, bar, next, hidden, head_keep, trace);                                   \
    }
CL_STEP_KERNEL(__half, decode_step_cl_f16)
CL_STEP_KERNEL(__nv_bfloat16, decode_step_cl_bf16)
