// gpt2rt CUDA kernels: compiled ahead by tools/build_kernels.sh into kernels/gpt2rt.fatbin, which the
// library embeds and loads with cuModuleLoadData (the user's machine needs only the driver).
//
// Activations, LayerNorm, softmax, GELU and every accumulation are fp32; weights are f32, f16 or
// bf16 (one instantiation of each weight-reading kernel per type, suffixed _f32/_f16/_bf16).
// No kernel uses tensor cores, so f32 mode has no TF32 anywhere. Every reduction has a fixed order,
// so results are deterministic run to run.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }

// Four consecutive weights (16-byte aligned for f32, 8-byte for f16/bf16) as floats.
__device__ __forceinline__ float4 load4(const float* p) { return *reinterpret_cast<const float4*>(p); }
__device__ __forceinline__ float4 load4(const __half* p) {
    uint2 raw = *reinterpret_cast<const uint2*>(p);
    float2 a = __half22float2(*reinterpret_cast<__half2*>(&raw.x));
    float2 b = __half22float2(*reinterpret_cast<__half2*>(&raw.y));
    return make_float4(a.x, a.y, b.x, b.y);
}
__device__ __forceinline__ float4 load4(const __nv_bfloat16* p) {
    uint2 raw = *reinterpret_cast<const uint2*>(p);
    float2 a = __bfloat1622float2(*reinterpret_cast<__nv_bfloat162*>(&raw.x));
    float2 b = __bfloat1622float2(*reinterpret_cast<__nv_bfloat162*>(&raw.y));
    return make_float4(a.x, a.y, b.x, b.y);
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

// out[r, :] = LayerNorm(x[r, :]) * gamma + beta; one block per row, two-pass mean/variance.
template <typename W>
__device__ void layer_norm(const float* x, const W* gamma, const W* beta, float* out, int C, float eps) {
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
        out[(size_t)blockIdx.x * C + c] = (row[c] - mean) * inv * to_f(gamma[c]) + to_f(beta[c]);
}

#define GEMV_ROWS 8

// Split-K tiled matrix product for larger M (prefill, big batches): 64x64 output tiles, k in
// slices of 16 staged through shared memory, 256 threads computing 4x4 outputs each. The weights
// are stored transposed, `w[N, K]` (see upload_weights), like every matmul weight on the device.
// Grid (ceil(N/64), ceil(M/64), splits); partial[split][m][n] feeds matmul_finish.
template <typename W>
__device__ void matmul_tiled(const float* in, int M, int K, const W* w, int N, float* partial, int k_per_split) {
    pdl_trigger();
    pdl_wait();
    __shared__ float a_tile[16][64 + 1];
    __shared__ float w_tile[16][64];
    int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
    int m0 = blockIdx.y * 64, n0 = blockIdx.x * 64;
    int k0 = blockIdx.z * k_per_split;
    int k1 = min(K, k0 + k_per_split);
    float acc[4][4];
#pragma unroll
    for (int i = 0; i < 4; i++)
#pragma unroll
        for (int j = 0; j < 4; j++) acc[i][j] = 0.0f;
    for (int kb = k0; kb < k1; kb += 16) {
        for (int i = threadIdx.x; i < 1024; i += 256) {
            int r = i >> 4, kk = i & 15;
            int gm = m0 + r, gk = kb + kk;
            a_tile[kk][r] = (gm < M && gk < k1) ? in[(size_t)gm * K + gk] : 0.0f;
            int c = i >> 4, kw = i & 15;
            int gk2 = kb + kw, gn = n0 + c;
            w_tile[kw][c] = (gk2 < k1 && gn < N) ? to_f(w[(size_t)gn * K + gk2]) : 0.0f;
        }
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < 16; kk++) {
            float a[4], b[4];
#pragma unroll
            for (int i = 0; i < 4; i++) a[i] = a_tile[kk][ty + 16 * i];
#pragma unroll
            for (int j = 0; j < 4; j++) b[j] = w_tile[kk][tx + 16 * j];
#pragma unroll
            for (int i = 0; i < 4; i++)
#pragma unroll
                for (int j = 0; j < 4; j++) acc[i][j] += a[i] * b[j];
        }
        __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 4; i++) {
        int m = m0 + ty + 16 * i;
        if (m >= M) continue;
#pragma unroll
        for (int j = 0; j < 4; j++) {
            int n = n0 + tx + 16 * j;
            if (n < N) partial[((size_t)blockIdx.z * M + m) * N + n] = acc[i][j];
        }
    }
}

__device__ __forceinline__ float gelu_new(float x) {
    const float k = 0.7978845608028654f;  // sqrt(2 / pi)
    return 0.5f * x * (1.0f + tanhf(k * (x + 0.044715f * x * x * x)));
}

// Finishes a split-K product: v = sum of the splits + bias[n], then by `mode`:
// 0 store; 1 store gelu_new(v); 2 out += v (residual); 3 store, and append k/v columns to the
// KV cache at each row's (seq, pos). Block (32 columns x 8 split lanes), grid (ceil(N/32), M); the
// lanes' sums combine in a fixed order, so the result is deterministic.
template <typename W>
__device__ void matmul_finish(const float* partial, int splits, int M, int N, const W* bias, float* out, int mode,
                              float* k_cache, float* v_cache, const int* row_seq, const int* row_pos, int max_seq) {
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
    size_t i = (size_t)m * N + n;
    if (mode == 1) v = gelu_new(v);
    if (mode == 2) {
        out[i] += v;
        return;
    }
    out[i] = v;
    if (mode == 3) {
        int C = N / 3;
        if (n >= C) {
            size_t at = ((size_t)row_seq[m] * max_seq + row_pos[m]) * C + (n % C);
            if (n < 2 * C) k_cache[at] = v; else v_cache[at] = v;
        }
    }
}

// ---- Decode path (at most GEMV_ROWS rows): one warp per output column, weights streamed once. ----
//
// Every matmul weight lives on the device transposed, `w[N, K]`, so the warp that owns output
// column n reads one contiguous row of K weights with 16-byte loads and finishes the whole dot
// product itself: no split-K partial sums, and bias, GELU, residual and the KV-cache append happen
// in the same kernel. The input rows come from global memory, or from shared memory after a
// LayerNorm computed in the kernel's prologue (each block normalises the few rows it needs).

// VEC consecutive weights (16 bytes) as floats.
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
#define ATTENTION_SPLIT 64
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

// The decode matmuls' epilogue for output (m, n) = v (bias included); `residual` is the old out
// value in mode 2.
__device__ __forceinline__ void gemv_store(float v, int m, int n, int N, int mode, float residual, float* out,
                                           float* k_cache, float* v_cache, const int* row_seq, const int* pos,
                                           int max_seq) {
    size_t i = (size_t)m * N + n;
    if (mode == 1) v = gelu_new(v);
    if (mode == 2) {
        out[i] = residual + v;
        return;
    }
    out[i] = v;
    if (mode == 3) {
        int C = N / 3;
        if (n >= C) {
            size_t at = ((size_t)row_seq[m] * max_seq + pos[m]) * C + (n % C);
            if (n < 2 * C) k_cache[at] = v; else v_cache[at] = v;
        }
    }
}

template <typename W, int IN>
__device__ void gemv(const float* in, const int* tokens, const int* pos, const W* wte, const W* wpe, float* x_out,
                     const W* gamma, const W* beta, float eps, int M, int K, const W* __restrict__ w, int N,
                     const W* bias, float* out, int mode, float* k_cache, float* v_cache, const int* row_seq,
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

// gemv for 2..GEMV_ROWS rows: each warp owns GEMV_COLS adjacent output columns over the same share
// of K, so every input value it loads serves GEMV_COLS weights (the rows' loads, not the weights,
// bound the one-column kernel once there are several rows). Needs the vector path and each
// warp's share within one chunk (the host checks). Lane c * GEMV_ROWS + m finishes (m, n0 + c).
#define GEMV_COLS 4
template <typename W, int IN>
__device__ void gemv_cols(const float* in, const int* tokens, const int* pos, const W* wte, const W* wpe,
                          float* x_out, const W* gamma, const W* beta, float eps, int M, int K,
                          const W* __restrict__ w, int N, const W* bias, float* out, int mode, float* k_cache,
                          float* v_cache, const int* row_seq, int max_seq, const float* att_ml, int splits, int H,
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
#pragma unroll
        for (int m = 0; m < GEMV_ROWS; m++) {
            if (m >= M) break;
            const float* xr = x + (size_t)m * K + k_begin + k;
#pragma unroll
            for (int j = 0; j < V; j += 4) {
                float4 xv = *reinterpret_cast<const float4*>(xr + j);
#pragma unroll
                for (int c = 0; c < GEMV_COLS; c++)
                    acc[c][m] += xv.x * wv[c][j] + xv.y * wv[c][j + 1] + xv.z * wv[c][j + 2] + xv.w * wv[c][j + 3];
            }
        }
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
// too large for the fused one); one block per row.
extern "C" __global__ void attention_combine(const float* part, const float* att_ml, const int* pos, int splits, int C,
                                             int H, float* att) {
    pdl_trigger();
    pdl_wait();
    int m = blockIdx.x, D = C / H;
    int active = min(splits, pos[m] / ATTENTION_SPLIT + 1);
    for (int k = threadIdx.x; k < C; k += blockDim.x) {
        const float* ml = att_ml + ((size_t)m * splits * H + k / D) * 2;
        float mx = -INFINITY;
        for (int sp = 0; sp < active; sp++) mx = fmaxf(mx, ml[(size_t)sp * H * 2]);
        float num = 0.0f, den = 0.0f;
        for (int sp = 0; sp < active; sp++) {
            float w = __expf(ml[(size_t)sp * H * 2] - mx);
            num += w * part[((size_t)m * splits + sp) * C + k];
            den += w * ml[(size_t)sp * H * 2 + 1];
        }
        att[(size_t)m * C + k] = num / den;
    }
}

// Final LayerNorm (IN_LN, M <= GEMV_ROWS; or rows already normalised, IN_PLAIN) + LM head + the
// first stage of the greedy argmax, for M <= GEMV_MAX_M rows. logits[m, v] = dot(x[m, :], wte[v, :]);
// each warp walks vocabulary rows with a grid stride, each row's weights read once for all M rows.
// Block b stores the best (value, index) of each row into best_value/best_index[m * gridDim.x + b]
// (first index on ties); argmax_final picks among them. When `seq_len` is not NULL, block 0 then
// advances the positions of the M sequences (the step's last kernel). Dynamic shared memory: M * C
// floats for IN_LN.
template <typename W, int IN>
__device__ void lm_head_fused(const float* h, const W* gamma, const W* beta, float eps, int M, const W* __restrict__ wte,
                              int V, int C, float* logits, float* best_value, int* best_index, int* seq_len) {
    extern __shared__ float gemv_smem[];
    __shared__ float warp_value[8][GEMV_MAX_M];
    __shared__ int warp_index[8][GEMV_MAX_M];
    constexpr int GROUPS = GEMV_MAX_M / GEMV_ROWS;
    pdl_trigger();
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    int v0 = blockIdx.x * warps + warp;
    bool vec = vector_rows<W>(C);
    Chunk<W> next;
    if (vec && v0 < V) load_chunk<W>(wte + (size_t)v0 * C, 0, C, next);
    pdl_wait();
    const float* x =
        input_rows<W, IN>(h, nullptr, nullptr, nullptr, nullptr, nullptr, gamma, beta, eps, M, C, gemv_smem, nullptr, 1, 1, 1);
    float bv[GROUPS];
    int bi[GROUPS];
#pragma unroll
    for (int g = 0; g < GROUPS; g++) { bv[g] = -INFINITY; bi[g] = 0x7fffffff; }
    for (int v = v0; v < V; v += gridDim.x * warps) {
        Chunk<W> first = next;
        // Start the next row's loads before this row's arithmetic.
        int vn = v + gridDim.x * warps;
        if (vec && vn < V) load_chunk<W>(wte + (size_t)vn * C, 0, C, next);
#pragma unroll
        for (int g = 0; g < GROUPS; g++) {
            int g0 = g * GEMV_ROWS;
            if (g0 >= M) break;
            int rows = min(GEMV_ROWS, M - g0);
            float acc[GEMV_ROWS];
#pragma unroll
            for (int m = 0; m < GEMV_ROWS; m++) acc[m] = 0.0f;
            dot_rows<W>(wte + (size_t)v * C, first, x + (size_t)g0 * C, rows, C, C, vec, acc);
            float mine = 0.0f;
#pragma unroll
            for (int m = 0; m < GEMV_ROWS; m++) {
                if (m >= rows) break;
                float s = warp_sum(acc[m]);
                if (lane == m) mine = s;
            }
            if (lane < rows) {
                logits[(size_t)(g0 + lane) * V + v] = mine;
                if (better(mine, v, bv[g], bi[g])) { bv[g] = mine; bi[g] = v; }
            }
        }
    }
#pragma unroll
    for (int g = 0; g < GROUPS; g++) {
        int m = g * GEMV_ROWS + lane;
        if (lane < GEMV_ROWS && m < M) {
            warp_value[warp][m] = bv[g];
            warp_index[warp][m] = bi[g];
        }
    }
    __syncthreads();
    for (int m = threadIdx.x; m < M; m += blockDim.x) {
        float best = -INFINITY;
        int at = 0x7fffffff;
        for (int w = 0; w < warps; w++)
            if (better(warp_value[w][m], warp_index[w][m], best, at)) { best = warp_value[w][m]; at = warp_index[w][m]; }
        best_value[m * gridDim.x + blockIdx.x] = best;
        best_index[m * gridDim.x + blockIdx.x] = at;
        if (seq_len != nullptr && blockIdx.x == 0) seq_len[m] += 1;
    }
}

#define GEMV_KERNEL(W, S, NAME, IN)                                                                               \
    extern "C" __global__ void gemv_##NAME##_##S(const float* in, const int* tokens, const int* pos, const W* wte,  \
                                                 const W* wpe, float* x_out, const W* g, const W* b, float eps,    \
                                                 int M, int K, const W* w, int N, const W* bias, float* out,       \
                                                 int mode, float* kc, float* vc, const int* rs, int max_seq,       \
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
        const W* b, float eps, int M, int K, const W* w, int N, const W* bias, float* out, int mode, float* kc,    \
        float* vc, const int* rs, int max_seq, const float* att_ml, int splits, int H, int wpc) {                  \
        gemv_cols<W, IN>(in, tokens, pos, wte, wpe, x_out, g, b, eps, M, K, w, N, bias, out, mode, kc, vc, rs,    \
                         max_seq, att_ml, splits, H, wpc);                                                        \
    }

#define INSTANTIATE(W, S)                                                                                         \
    extern "C" __global__ void embed_##S(const int* t, const int* p, const W* wte, const W* wpe, float* x, int C) { \
        embed<W>(t, p, wte, wpe, x, C);                                                                           \
    }                                                                                                             \
    extern "C" __global__ void layer_norm_##S(const float* x, const W* g, const W* b, float* o, int C, float eps) { \
        layer_norm<W>(x, g, b, o, C, eps);                                                                        \
    }                                                                                                             \
    extern "C" __global__ void matmul_tiled_##S(const float* in, int M, int K, const W* w, int N, float* part,    \
                                                int kps) {                                                        \
        matmul_tiled<W>(in, M, K, w, N, part, kps);                                                               \
    }                                                                                                             \
    extern "C" __global__ void matmul_finish_##S(const float* part, int splits, int M, int N, const W* bias,       \
                                                 float* out, int mode, float* kc, float* vc, const int* rs,       \
                                                 const int* rp, int max_seq) {                                    \
        matmul_finish<W>(part, splits, M, N, bias, out, mode, kc, vc, rs, rp, max_seq);                           \
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
// k-slices of 32 staged in shared memory (the next slice's loads are in flight during the math).
#define MMA_SLICE 32
#define MMA_STRIDE 40  // halves per shared row: 80 bytes, so a fragment load hits 32 distinct banks

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

// Requires K % 8 == 0 (16-byte weight loads) and k_per_split % MMA_SLICE == 0.
template <typename W>
__device__ void matmul_mma(const float* __restrict__ in, int M, int K, const W* __restrict__ w, int N,
                           float* partial, int k_per_split) {
    __shared__ __align__(16) unsigned short a_s[64 * MMA_STRIDE];
    __shared__ __align__(16) unsigned short w_s[64 * MMA_STRIDE];
    int t = threadIdx.x, warp = t >> 5, lane = t & 31, g = lane >> 2, tig = lane & 3;
    int m0 = blockIdx.y * 64, n0 = blockIdx.x * 64;
    int k0 = blockIdx.z * k_per_split, k1 = min(K, k0 + k_per_split);
    // This thread's share of a slice: row (and weight row) t / 2, 16 k from (t % 2) * 16.
    int lr = t >> 1, lk = (t & 1) * 16;
    bool a_ok = m0 + lr < M, w_ok = n0 + lr < N;
    const float* a_src = in + (size_t)(m0 + lr) * K + lk;
    const W* w_src = w + (size_t)(n0 + lr) * K + lk;
    float4 a_reg[4];
    uint4 w_reg[2];
    // Slices are whole: k1 - kb is a multiple of 16 here.
    auto load_w = [&](int kb) {
        bool in_k = kb + lk < k1;
#pragma unroll
        for (int i = 0; i < 2; i++)
            w_reg[i] = (w_ok && in_k) ? *reinterpret_cast<const uint4*>(w_src + kb + 8 * i) : make_uint4(0, 0, 0, 0);
    };
    auto load_a = [&](int kb) {
        bool in_k = kb + lk < k1;
#pragma unroll
        for (int i = 0; i < 4; i++)
            a_reg[i] = (a_ok && in_k) ? *reinterpret_cast<const float4*>(a_src + kb + 4 * i) : make_float4(0, 0, 0, 0);
    };
    auto store = [&]() {
        unsigned int packed[8];
#pragma unroll
        for (int i = 0; i < 4; i++) {
            packed[2 * i] = Mma<W>::pack(a_reg[i].x, a_reg[i].y);
            packed[2 * i + 1] = Mma<W>::pack(a_reg[i].z, a_reg[i].w);
        }
        uint4* a_dst = reinterpret_cast<uint4*>(a_s + lr * MMA_STRIDE + lk);
        a_dst[0] = make_uint4(packed[0], packed[1], packed[2], packed[3]);
        a_dst[1] = make_uint4(packed[4], packed[5], packed[6], packed[7]);
        uint4* w_dst = reinterpret_cast<uint4*>(w_s + lr * MMA_STRIDE + lk);
        w_dst[0] = w_reg[0];
        w_dst[1] = w_reg[1];
    };
    float acc[4][2][4];
#pragma unroll
    for (int i = 0; i < 4; i++)
#pragma unroll
        for (int j = 0; j < 2; j++)
#pragma unroll
            for (int r = 0; r < 4; r++) acc[i][j][r] = 0.0f;
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
#pragma unroll
        for (int ks = 0; ks < MMA_SLICE; ks += 16) {
            unsigned int b[2][2];
#pragma unroll
            for (int j = 0; j < 2; j++) {
                const unsigned short* row = w_s + (warp * 16 + j * 8 + g) * MMA_STRIDE + ks + tig * 2;
                b[j][0] = *reinterpret_cast<const unsigned int*>(row);
                b[j][1] = *reinterpret_cast<const unsigned int*>(row + 8);
            }
#pragma unroll
            for (int i = 0; i < 4; i++) {
                const unsigned short* r0 = a_s + (i * 16 + g) * MMA_STRIDE + ks + tig * 2;
                const unsigned short* r1 = r0 + 8 * MMA_STRIDE;
                unsigned int a[4] = {*reinterpret_cast<const unsigned int*>(r0),
                                     *reinterpret_cast<const unsigned int*>(r1),
                                     *reinterpret_cast<const unsigned int*>(r0 + 8),
                                     *reinterpret_cast<const unsigned int*>(r1 + 8)};
#pragma unroll
                for (int j = 0; j < 2; j++) Mma<W>::run(acc[i][j], a, b[j]);
            }
        }
    }
    float* out = partial + (size_t)blockIdx.z * M * N;
#pragma unroll
    for (int i = 0; i < 4; i++)
#pragma unroll
        for (int j = 0; j < 2; j++)
#pragma unroll
            for (int r = 0; r < 4; r++) {
                int m = m0 + i * 16 + g + (r >= 2 ? 8 : 0);
                int n = n0 + warp * 16 + j * 8 + tig * 2 + (r & 1);
                if (m < M && n < N) out[(size_t)m * N + n] = acc[i][j][r];
            }
}

extern "C" __global__ void matmul_mma_f16(const float* in, int M, int K, const __half* w, int N, float* part, int kps) {
    matmul_mma<__half>(in, M, K, w, N, part, kps);
}
extern "C" __global__ void matmul_mma_bf16(const float* in, int M, int K, const __nv_bfloat16* w, int N, float* part,
                                           int kps) {
    matmul_mma<__nv_bfloat16>(in, M, K, w, N, part, kps);
}

// Causal attention of one query row against its sequence's cached keys/values, one block per
// (row, head). Dynamic shared memory: max_seq + head_dim floats.
extern "C" __global__ void attention(const float* qkv, const float* k_cache, const float* v_cache, const int* row_seq,
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
    const float* keys = k_cache + (size_t)row_seq[r] * max_seq * C + h * D;
    const float* values = v_cache + (size_t)row_seq[r] * max_seq * C + h * D;
    // One thread per key: each reads its key row contiguously, q comes from shared memory.
    for (int t = threadIdx.x; t < ctx; t += blockDim.x) {
        const float* key = keys + (size_t)t * C;
        float s = 0.0f;
#pragma unroll 8
        for (int d = 0; d < D; d++) s += q[d] * key[d];
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
        for (int t = g; t < ctx; t += groups) acc += scores[t] * values[(size_t)t * C + d];
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

// Decode attention, split across blocks: block (split, head, row) covers the row's keys
// [split * split_len, (split + 1) * split_len) below its context, with an online softmax per warp
// (one key per warp at a time, lanes across the head dimension, coalesced). It stores the
// unnormalised output (part[row][split][C]) and its running max and sum (ml[row][split][head][2]);
// the next matmul's prologue (IN_ATTN) combines the splits. Splits past the context store an empty
// result. Head dimension at most 256.
#define ATT_MAX_DL 8
extern "C" __global__ void attention_decode(const float* qkv, const float* k_cache, const float* v_cache,
                                            const int* row_seq, const int* row_pos, float* part, float* ml, int C,
                                            int H, int max_seq, float scale, int split_len) {
    __shared__ float warp_m[32], warp_l[32];
    __shared__ float warp_acc[8][256];
    pdl_trigger();
    int split = blockIdx.x, h = blockIdx.y, r = blockIdx.z, splits = gridDim.x;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    int D = C / H;
    pdl_wait();
    int ctx = row_pos[r] + 1;
    int t0 = split * split_len, t1 = min(ctx, t0 + split_len);
    float q[ATT_MAX_DL], acc[ATT_MAX_DL];
#pragma unroll
    for (int i = 0; i < ATT_MAX_DL; i++) {
        int d = lane + 32 * i;
        q[i] = d < D ? qkv[(size_t)r * 3 * C + h * D + d] * scale : 0.0f;
        acc[i] = 0.0f;
    }
    float mx = -INFINITY, l = 0.0f;
    const float* keys = k_cache + (size_t)row_seq[r] * max_seq * C + h * D;
    const float* values = v_cache + (size_t)row_seq[r] * max_seq * C + h * D;
#pragma unroll 2
    for (int t = t0 + warp; t < t1; t += warps) {
        const float* key = keys + (size_t)t * C;
        const float* val = values + (size_t)t * C;
        float kv[ATT_MAX_DL], vv[ATT_MAX_DL];
#pragma unroll
        for (int i = 0; i < ATT_MAX_DL; i++) {
            int d = lane + 32 * i;
            kv[i] = d < D ? key[d] : 0.0f;
            vv[i] = d < D ? val[d] : 0.0f;
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
    if (lane == 0) { warp_m[warp] = mx; warp_l[warp] = l; }
    __syncthreads();
    float bm = -INFINITY;
    for (int w = 0; w < warps; w++) bm = fmaxf(bm, warp_m[w]);
    float f = mx == -INFINITY ? 0.0f : __expf(mx - bm);
#pragma unroll
    for (int i = 0; i < ATT_MAX_DL; i++) {
        int d = lane + 32 * i;
        if (d < D) warp_acc[warp][d] = acc[i] * f;
    }
    __syncthreads();
    float* out_ml = ml + (((size_t)r * splits + split) * H + h) * 2;
    float* out = part + ((size_t)r * splits + split) * C + h * D;
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        float total = 0.0f;
        for (int w = 0; w < warps; w++) total += warp_acc[w][d];
        out[d] = total;
    }
    if (threadIdx.x == 0) {
        float total = 0.0f;
        for (int w = 0; w < warps; w++) total += warp_m[w] == -INFINITY ? 0.0f : warp_l[w] * __expf(warp_m[w] - bm);
        out_ml[0] = bm;
        out_ml[1] = total;
    }
}

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
    for (int o = 16; o > 0; o >>= 1) {
        float ov = __shfl_xor_sync(0xffffffffu, bv, o);
        int oi = __shfl_xor_sync(0xffffffffu, bi, o);
        if (better(ov, oi, bv, bi)) { bv = ov; bi = oi; }
    }
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
    __syncthreads();
    if (lane == 0) { sv[warp] = bv; si[warp] = bi; }
    __syncthreads();
    bv = lane < warps ? sv[lane] : -INFINITY;
    bi = lane < warps ? si[lane] : 0x7fffffff;
    for (int o = 16; o > 0; o >>= 1) {
        float ov = __shfl_xor_sync(0xffffffffu, bv, o);
        int oi = __shfl_xor_sync(0xffffffffu, bi, o);
        if (better(ov, oi, bv, bi)) { bv = ov; bi = oi; }
    }
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

extern "C" __global__ void argmax_final(const float* best_value, const int* best_index, int chunks, int* next) {
    int b = blockIdx.x;
    float bv = -INFINITY;
    int bi = 0x7fffffff;
    for (int c = threadIdx.x; c < chunks; c += blockDim.x)
        if (better(best_value[b * chunks + c], best_index[b * chunks + c], bv, bi)) {
            bv = best_value[b * chunks + c];
            bi = best_index[b * chunks + c];
        }
    block_best(bv, bi);
    if (threadIdx.x == 0) next[b] = bi == 0x7fffffff ? 0 : bi;
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
