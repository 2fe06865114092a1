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

// x[r, :] = wte[tokens[r], :] + wpe[pos[r], :]; one block per row.
template <typename W>
__device__ void embed(const int* tokens, const int* pos, const W* wte, const W* wpe, float* x, int C) {
    int r = blockIdx.x;
    const W* te = wte + (size_t)tokens[r] * C;
    const W* pe = wpe + (size_t)pos[r] * C;
    for (int c = threadIdx.x; c < C; c += blockDim.x) x[(size_t)r * C + c] = to_f(te[c]) + to_f(pe[c]);
}

// out[r, :] = LayerNorm(x[r, :]) * gamma + beta; one block per row, two-pass mean/variance.
template <typename W>
__device__ void layer_norm(const float* x, const W* gamma, const W* beta, float* out, int C, float eps) {
    __shared__ float scratch[32];
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

// Split-K matrix product for any M: partial[split][m][n] = sum over this split's k of in[m,k] * w[k,n].
// Block: 256 threads, one output column each (coalesced weight reads); grid (ceil(N/256), splits).
// Rows are processed 8 at a time so the weights of a k-slice are read once per 8 rows.
#define GEMV_ROWS 8
template <typename W>
__device__ void matmul_partial(const float* in, int M, int K, const W* w, int N, float* partial, int k_per_split) {
    int n = blockIdx.x * blockDim.x + threadIdx.x;
    int k0 = blockIdx.y * k_per_split;
    int k1 = min(K, k0 + k_per_split);
    if (n >= N) return;
    for (int m0 = 0; m0 < M; m0 += GEMV_ROWS) {
        int rows = min(GEMV_ROWS, M - m0);
        float acc[GEMV_ROWS];
#pragma unroll
        for (int i = 0; i < GEMV_ROWS; i++) acc[i] = 0.0f;
#pragma unroll 8
        for (int k = k0; k < k1; k++) {
            float wv = to_f(w[(size_t)k * N + n]);
#pragma unroll
            for (int i = 0; i < GEMV_ROWS; i++)
                if (i < rows) acc[i] += in[(size_t)(m0 + i) * K + k] * wv;
        }
        for (int i = 0; i < rows; i++) partial[((size_t)blockIdx.y * M + m0 + i) * N + n] = acc[i];
    }
}

// Split-K tiled matrix product for larger M (prefill, big batches): 64x64 output tiles, k in
// slices of 16 staged through shared memory, 256 threads computing 4x4 outputs each.
// Grid (ceil(N/64), ceil(M/64), splits); same partial layout as matmul_partial.
template <typename W>
__device__ void matmul_tiled(const float* in, int M, int K, const W* w, int N, float* partial, int k_per_split) {
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
            int kw = i >> 6, c = i & 63;
            int gk2 = kb + kw, gn = n0 + c;
            w_tile[kw][c] = (gk2 < k1 && gn < N) ? to_f(w[(size_t)gk2 * N + gn]) : 0.0f;
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

#define INSTANTIATE(W, S)                                                                                         \
    extern "C" __global__ void embed_##S(const int* t, const int* p, const W* wte, const W* wpe, float* x, int C) { \
        embed<W>(t, p, wte, wpe, x, C);                                                                           \
    }                                                                                                             \
    extern "C" __global__ void layer_norm_##S(const float* x, const W* g, const W* b, float* o, int C, float eps) { \
        layer_norm<W>(x, g, b, o, C, eps);                                                                        \
    }                                                                                                             \
    extern "C" __global__ void matmul_partial_##S(const float* in, int M, int K, const W* w, int N, float* part,  \
                                                  int kps) {                                                      \
        matmul_partial<W>(in, M, K, w, N, part, kps);                                                             \
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
    }

// logits[m, v] = dot(h[m, :], wte[v, :]); one warp per vocabulary row, 8 rows of h at a time.
// Lanes read four consecutive weights at once when C is a multiple of 4 (GPT-2: 768).
template <typename W>
__device__ void lm_head(const float* h, int M, const W* wte, int V, int C, float* logits) {
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

// Causal attention of one query row against its sequence's cached keys/values, one block per
// (row, head). Dynamic shared memory: max_seq + head_dim floats.
extern "C" __global__ void attention(const float* qkv, const float* k_cache, const float* v_cache, const int* row_seq,
                                     const int* row_pos, float* out, int C, int H, int max_seq, float scale) {
    extern __shared__ float smem[];
    __shared__ float scratch[32];
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

// out[b, :] = x[rows[b] - row_offset, :] for rows inside [row_offset, row_offset + n_rows).
extern "C" __global__ void gather_rows(const float* x, const int* rows, int row_offset, int n_rows, float* out, int C) {
    int b = blockIdx.x;
    int r = rows[b] - row_offset;
    if (r < 0 || r >= n_rows) return;
    for (int c = threadIdx.x; c < C; c += blockDim.x) out[(size_t)b * C + c] = x[(size_t)r * C + c];
}

// Two-stage argmax (first index on ties). Stage 1: block (chunk, b) finds the best of its chunk of
// row b into best_value/best_index[b * chunks + chunk]; stage 2: one block per row picks the best
// chunk into next[b].
__device__ __forceinline__ bool better(float v, int i, float bv, int bi) { return v > bv || (v == bv && i < bi); }

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
