//! The CUDA backend proper (feature `cuda`).

use crate::backend::{Backend, BackendKind, BackendState, History, Profile};
use crate::error::{Error, ErrorKind, Result};
use crate::log::{LogLevel, emit};
use crate::model::{DType, Model, ModelConfig};
use crate::nvtx;
use crate::sampling::Sampler;
use cudarc::driver::{result, sys};
use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use std::ffi::c_void;
use std::sync::Arc;

static FATBIN: &[u8] = include_bytes!("../../../kernels/gpt2rt.fatbin");

/// Rows of a prefill processed per pass (bounds the activation buffers). Each pass runs every
/// layer, so short passes multiply the launches and split the products finely. H100, E2E ms of a
/// prefill and one token for 128 / 256 / 512 / 1024 rows: f16 batch 16 prompt 12 1.23 / 0.96 /
/// 0.95 / 0.98, batch 64 prompt 128 53.4 / 43.7 / 39.5 / 36.6; f32 batch 16 prompt 12 2.22 / 1.83 /
/// 1.85 / 1.83, batch 64 prompt 128 88.1 / 78.5 / 74.3 / 72.6; f16 batch 1 prompt 1000 19.0 /
/// 15.6 / 15.1 / 14.2.
const PREFILL_CHUNK: usize = 1024;
/// Rows the decode kernels take per group (GEMV_ROWS in the .cu file): up to this many, their
/// prologues (LayerNorm, attention combination) run inside the matmul kernels.
const GEMV_MAX_ROWS: usize = 8;
/// Most rows the decode kernels take (GEMV_MAX_M in the .cu file).
const GEMV_MAX_M: usize = 64;
/// Rows up to which a forward pass takes the decode path by default; more rows use the tiled
/// kernels. Measured on an H100 (f16, prompt 12, 64 new tokens, E2E ms): batch 8 39.7 decode vs
/// 48.3 tiled, batch 16 61.9 vs 54.1, batch 64 225.9 vs 101.3. The decode kernels stream the
/// weights once but spend fp32 CUDA-core work per row; past a group of rows the tiled kernel wins.
const DECODE_ROWS: usize = GEMV_MAX_ROWS;
/// The same where the tensor-core product runs (f16/bf16 on 8.0+), which overtakes the decode
/// kernels from 2 rows since its k-slices of 64 (matmul_mma64). H100, f16, prompt 12, 32 new
/// tokens, E2E ms, decode kernels vs tensor cores (steps without the fused step): batch 2 8.75 /
/// 8.74 vs 8.38 / 8.33, batch 3 9.60 / 9.53 vs 8.34 / 8.37 (before those slices: batch 2 9.24 vs
/// 9.40, 3 10.73 vs 11.85, 4 12.10 vs 11.88).
const DECODE_ROWS_MMA: usize = 1;
/// Output columns a warp of the several-row GEMV kernels owns (GEMV_COLS in the .cu file).
const GEMV_COLS: usize = 4;
/// Threads per block of the GEMV kernels (each output column owned by 1, 2, 4 or 8 warps).
const GEMV_THREADS: usize = 256;
/// Most blocks of the fused LM head (each a grid-stride share of the vocabulary and one partial
/// argmax); sizes the argmax buffer.
const LM_HEAD_BLOCKS: usize = 1056;
/// Fused LM-head blocks an SM for the default grid. H100, batch 1, 32 new tokens, E2E ms for 1056 /
/// 528 / 264 / 132 blocks: f16 8.75 / 8.56 / 8.46 / 8.89, f32 10.65 / 10.52 / 10.34 / 10.98 (when a
/// block had about 120 registers a thread and two fit an SM). With 4 vocabulary rows a warp the
/// half modes take about 170 and one block fits, but two blocks an SM still measured at least as
/// fast as one (H200, 32 tokens: f32 batch 8 15.16 vs 16.14 ms, f16 equal within 1%).
const LM_HEAD_RESIDENT: usize = 2;
/// Keys per block of the decode attention (longer contexts spread over more blocks). Must equal
/// ATTENTION_SPLIT in the .cu file (where the measurements behind 256 are).
const ATTENTION_SPLIT: usize = 256;
/// Dynamic shared memory the fused prologues may use: well inside the 48 KiB a kernel gets without
/// opting in, beside their static shared memory.
const DEFAULT_SMEM: usize = 40 * 1024;
/// Matmul blocks to aim for when choosing the split-K factor (about two per SM on an H100).
const TARGET_BLOCKS: usize = 528;
/// The same for tensor-core products of up to MMA_SLICE64_ROWS rows (steps of 3-16 sequences in
/// f16/bf16). It lets MLP down (K 3072) take 48 splits of 64 k instead of 24 of 128; the others are
/// already at one split a 64-k slice. H100, f16, E2E ms, same call, twice, 1056 vs 528: prompt 12,
/// 32 tokens, batch 8 8.54 / 8.57 vs 9.06 / 9.07, batch 4 8.19 / 8.19 vs 8.60 / 8.75, batch 16 9.52
/// / 9.51 vs 9.54 / 9.53; batch 3 with 8 tokens 2.17 / 2.17 vs 2.27 / 2.25; batch 16 prompt 128 +
/// 128 tokens 43.71 / 43.48 vs 44.12 / 44.21. 1056 for every product (also past 16 rows) made
/// batch 64 prompt 128 + 128 tokens slower, 92.96 / 93.34 vs 89.54 / 89.13; f32 (matmul_tiled)
/// moved by 3% at most (batch 16 prompt 12 + 1 token 1.12 / 1.12 vs 1.15 / 1.14) and keeps 528.
const TARGET_BLOCKS_FEW: usize = 2 * TARGET_BLOCKS;
/// Most blocks `GPT2RT_CUDA_SPLIT_BLOCKS` may ask for (the partial-sum buffer grows with it).
const MAX_SPLIT_BLOCKS: usize = 4 * TARGET_BLOCKS;
/// Threads per block of matmul_mma.
const MMA_THREADS: usize = 128;
/// The LM head past the decode path on tensor cores (`lm_head_mma`, rows in the weights' type held
/// in shared memory, one block an SM): threads a group of warps, vocabulary entries a tile and k a
/// staged slice (HEAD_THREADS, HEAD_TILE, HEAD_SLICE in the .cu file); its instances hold up to
/// HEAD_MMA_ROWS rows, with HEAD_STAGES stages in their copy rings (HEAD_STAGES_16/32/64).
const HEAD_THREADS: usize = 128;
const HEAD_TILE: usize = 128;
const HEAD_SLICE: usize = 64;
const HEAD_MMA_ROWS: [usize; 3] = [16, 32, 64];
const HEAD_STAGES: [usize; 3] = [6, 6, 4];
/// Groups of HEAD_THREADS threads a block of each instance (the 64-row one: HEAD_GROUPS_64).
const HEAD_GROUPS: [usize; 3] = [1, 1, 2];
/// Most blocks a tensor-core product of CLUSTER_ROWS rows (a step, or a short prefill pass) puts in
/// a thread-block cluster by default (9.0+): its splits of k sum inside the cluster
/// (matmul_mma_cluster), with no finishing kernel. H200, f16,
/// E2E ms, same call, twice, split-K with its finishing kernel vs clusters of up to 8 vs 16: batch
/// 64 prompt 128 + 128 tokens 86.63 / 86.55 vs 78.58 / 78.98 vs 76.23 / 76.30 (bf16 86.67 / 86.87
/// vs 78.79 / 78.69 vs 76.44 / 76.28); prompt 12 + 32 tokens, batch 32 11.73 / 11.73 vs 11.29 /
/// 11.31 vs 10.62 / 10.51, batch 24 (another call) 10.28 / 10.34 vs 11.38 / 11.45 vs 9.79 / 9.79.
/// 16 is past the portable 8: where the GPU does not allow it, `cluster_size` settles on less.
const CLUSTER_BLOCKS: usize = 16;
/// Most blocks `GPT2RT_CUDA_CLUSTER` may ask for (CLUSTER_MAX in the .cu file).
const CLUSTER_MAX: usize = 16;
/// Rows of the passes whose tensor-core products sum in clusters. Up to MMA_SLICE64_ROWS (the 64-k
/// slices) they measured slower, with the same split counts or capped ones: H200, f16, prompt 12 +
/// 32 tokens, E2E ms, split-K vs clusters of up to 16 (MLP down's 48 splits capped at 16) vs the
/// same with MLP down left to split-K: batch 16 9.03 / 8.98 vs 9.46 / 9.47 vs 9.24 / 9.25, batch
/// 8 8.07 / 8.15 vs 8.90 / 8.94 vs 8.62 / 8.54, batch 4 7.69 / 7.67 vs 8.42 / 8.41 vs 8.07 / 8.10;
/// with the 32-k slices (the ring) in the clusters instead, another call: batch 16 9.04 / 9.03 vs
/// 9.50 / 9.55, batch 8 8.16 / 8.18 vs 9.04 / 9.03, batch 4 7.61 / 7.59 vs 8.69 / 8.69.
/// Past 16 rows, leaving the products that would split more than 16 ways (proj and MLP down) to
/// split-K measured 2-3% faster at batches 24 and 32 (9.59 vs 9.79, 10.43 vs 10.55) and 3% slower
/// at batch 64 (77.91 vs 75.78), so every product sums in a cluster.
const CLUSTER_ROWS: std::ops::RangeInclusive<usize> = MMA_SLICE64_ROWS + 1..=GEMV_MAX_M;
/// Rows up to which the tensor-core product stages k-slices of 64 (matmul_mma64), past them of 32
/// (matmul_mma). H100, f16, E2E ms, 64 vs 32: batch 8 with 32 tokens 9.30 / 9.37 vs 10.16 / 10.17
/// (8-row steps), batch 16 10.28 / 10.32 vs 10.58 / 10.61; but batch 64 prompt 128 + 128 tokens
/// 106.3 / 106.4 vs 103.4 / 103.7 (64-row steps, 1024-row prefill passes).
const MMA_SLICE64_ROWS: usize = 16;
/// Threads per block of `sample_rows` (one block a sequence). Must equal SAMPLE_THREADS in the .cu.
const SAMPLE_THREADS: usize = 1024;
/// Vocabulary entries per block in the first stage of the device argmax.
const ARGMAX_CHUNK: usize = 2048;
/// Threads per block of the fused decode step, one block an SM, in f32 and in f16/bf16
/// (STEP_THREADS_F32 and STEP_THREADS_HALF in the .cu file, where the measurements are).
const STEP_THREADS_F32: usize = 512;
const STEP_THREADS_HALF: usize = 384;
/// The fused step's threads a block in `dtype`.
fn step_threads(dtype: DType) -> usize {
    if dtype == DType::F32 { STEP_THREADS_F32 } else { STEP_THREADS_HALF }
}
/// Fewest keys of one of the fused step's attention splits in `dtype` (STEP_SPLIT_KEYS in the .cu
/// file: four keys a warp).
fn step_split_keys(dtype: DType) -> usize {
    4 * step_threads(dtype) / 32
}
/// Batches that take the fused step by default (bit b: batch b), per dtype. H200, prompt 12, 32 new
/// tokens, E2E ms, fused vs a kernel per phase (the tensor-core products from 4 rows in the half
/// modes), same call: f16 batch 2 8.18 vs 8.50, 4 10.45 vs 10.85, 8 12.68 vs 11.11, 16 23.15 vs
/// 11.93; f32 batch 2 9.59 vs 8.74, 4 10.64 vs 10.60, 8 12.87 vs 14.78, 12 18.52 vs 27.80, 16
/// 21.11 vs 27.89 (9-16: the wide kernel). Batch 1 takes it in both (H100: f16 8.06 vs 8.42, f32
/// 9.98 vs 10.36). H100, the same comparison: f16 batch 2 8.80 vs 8.56, 4 10.86 vs 10.99; f32
/// batch 8 13.91 vs 16.19, 12 19.37 vs 27.95, 16 21.47 vs 28.06. In the half modes from 2 rows the
/// fused step's products now run on tensor cores too (STEP_MMA_ROWS); H100, f16, the same
/// comparison, twice: batch 2 8.10 / 8.08 vs 8.49 / 8.50 (its CUDA-core products), 4 9.19 / 9.20
/// vs 10.55 / 10.55 (likewise), 5 9.54 / 9.54 vs 9.81 / 9.81, 6 9.90 / 9.80 vs 9.81 / 9.79, 7
/// 10.16 / 10.18 vs 9.94 / 9.89, 8 10.85 / 10.87 vs 9.95 / 10.19. Since the tensor-core path's
/// k-slices of 64 (matmul_mma64), same comparison, twice: f16 batch 2 8.16 / 8.14 vs 8.75 / 8.74
/// (decode kernels), 3 8.66 / 8.72 vs 9.60 / 9.53 (decode kernels), 4 9.07 / 9.06 vs 8.49 / 8.65,
/// 5 9.47 / 9.52 vs 8.47 / 8.61, 6 9.65 / 9.51 vs 8.82 / 8.71; with batch 3 on the tensor-core
/// path (DECODE_ROWS_MMA), fused vs that: f16 8.47 / 8.45 vs 8.34 / 8.37, bf16 8.43 / 8.46 vs
/// 8.36 / 8.42, prompt 128 + 128 tokens f16 37.46 / 36.95 vs 36.76 / 36.48; batch 2 f16 8.00 /
/// 8.03 vs 8.38 / 8.33. f32 batches 2-4 measured again, fused vs decode kernels: 10.26 vs 9.36,
/// 10.81 vs 10.22, 11.22 vs 11.02. Since the fused step's LM head runs on tensor cores too
/// (step_head_mma; H200, 2026-11-29, E2E ms, same call, twice, fused vs a kernel per phase),
/// prompt 128 + 128 tokens: f16 batch 2 24.75 / 24.83 vs 31.39, 3 26.13 / 25.78 vs 31.20, 5 28.77
/// / 28.68 vs 31.71, 6 27.53 / 27.43 vs 32.48, 7 28.36 / 28.44 vs 32.90, 8 30.63 / 30.70 vs 33.24,
/// bf16 batch 8 30.69 / 30.75 vs 33.38; prompt 12 + 32 tokens: f16 batch 3 5.79 / 5.89 vs 7.21, 6
/// 6.38 / 6.40 vs 7.37, 8 6.98 / 7.01 vs 7.62: so every half batch up to 8 takes it. A 16-row
/// half kernel (its products' m16n8k16 tiles using all 16 rows) first measured slower than a
/// kernel per phase at 12 and 16 rows (f16 prompt 128 + 128 tokens, batch 12 36.92 / 36.88 vs
/// 35.78, 16 40.42 / 40.42 vs 37.97; batch 16 prompt 12 + 32 8.93 / 8.98 vs 8.36), and was not
/// kept then; with the MLP-down rows in the weights' type, staged in shared memory (H200, the same
/// day, same call, twice, kernels vs fused), prompt 12 + 32 tokens: f16 batch 9 7.66 / 7.65 vs
/// 7.09 / 7.15, 12 8.03 / 8.00 vs 7.49 / 7.51, 16 8.38 / 8.43 vs 8.17 / 8.16, bf16 9 7.66 / 7.70 vs
/// 7.07 / 7.06, 12 8.03 / 8.05 vs 7.48 / 7.49, 16 8.34 / 8.41 vs 8.14 / 8.17; f16 batch 16 prompt
/// 12 + 8 2.34 / 2.34 vs 2.28 / 2.29; prompt 128 + 128: batch 12 35.77 / 35.87 vs 34.32 / 34.23, 16
/// 37.93 / 37.61 vs 37.64 / 37.60: so every half batch up to 16 takes it. f32 batches 2-4
/// measured again (H200, the same day, E2E ms, same call, twice, fused vs decode kernels): prompt
/// 12 + 32 tokens batch 2 6.66 / 6.67 vs 7.99 / 7.94, 3 6.69 / 6.72 vs 8.91 / 9.00, 4 7.06 / 7.02
/// vs 9.83 / 9.90; prompt 128 + 128 batch 2 29.42 / 29.23 vs 34.53 / 34.59, 3 31.41 / 31.33 vs
/// 38.67 / 38.64, 4 33.92 / 33.97 vs 43.15 / 43.19: so every f32 batch up to 16 takes it.
const FUSED_BATCHES_F32: u32 = 0b1_1111_1111_1111_1110;
const FUSED_BATCHES_HALF: u32 = 0b1_1111_1111_1111_1110;
/// Batches from which the fused step's products (and, since, its LM head: step_head_mma) run on
/// tensor cores, where they can (the rows rounded to f16/bf16 as in matmul_mma). H100, f16, prompt
/// 12, 32 new tokens, E2E ms, tensor cores vs CUDA cores: batch 1 7.87 vs 7.83 (so batch 1 keeps
/// fp32 rows), 2 8.05 vs 8.51, 3 8.62 vs 9.93, 4 9.13 vs 10.55, 8 10.87 vs 12.87.
const STEP_MMA_ROWS: usize = 2;
/// The fused step's flag for that (STEP_MMA in the .cu file).
const STEP_MMA: usize = 2;
/// Rows from which the LM head past the decode path runs as the tiled product (matmul_tiled, one
/// split) where tensor cores do not run (f32; the half modes before 8.0), instead of a warp a
/// vocabulary entry re-reading its weights for each group of 8 rows (lm_head).
const TILED_HEAD_ROWS: usize = 17;
/// MB of LM-head weights the fused step keeps in L2 from one step to the next (head_keep_bytes), with
/// every other weight it reads marked to leave L2 first. Marking all of them evict_first made
/// batch 1 3% faster (H200, E2E, prompt 128 + 128 tokens: the KV cache and activations stay in
/// L2); keeping 16 MB of the f16 head 1% more (4, 8, 24, 29 and 34 MB less), 8 MB of the f32 head
/// about as fast as none (12-26 MB slower).
const HEAD_KEEP_MB_HALF: usize = 16;
const HEAD_KEEP_MB_F32: usize = 8;
/// The fused step's trace stamps (`stamp` in the .cu file): 13 a layer (three a product, one after
/// the attention) and 3 more (the cluster step's also 13 a layer and 3); the buffer is sized by
/// the model, which the kernel does not check.
fn trace_stamps(layers: usize) -> usize {
    3 + 13 * layers
}
/// Blocks whose stamps a trace keeps (TRACE_BLOCKS in the .cu file).
const TRACE_BLOCKS: usize = 1024;
/// The fused step's weight table: its global entries and its entries a layer (STEP_GLOBALS and
/// STEP_PER_LAYER in the .cu file).
const STEP_TABLE_GLOBALS: usize = 5;
const STEP_TABLE_PER_LAYER: usize = 12;
/// The slots in a layer's entries of the QKV biases, the MLP-up biases and the MLP-down weights
/// (T_ATTN_B, T_FC_B and T_MPROJ_W).
const STEP_TABLE_ATTN_B: usize = 3;
const STEP_TABLE_FC_B: usize = 9;
const STEP_TABLE_MPROJ_W: usize = 10;
/// Rows of the wide fused-step kernel (STEP_ROWS in the .cu file).
const FUSED_WIDE_ROWS: usize = 16;
/// Rows a block of attention_tiled takes (ATT_ROWS in the .cu file).
const ATTENTION_TILE_ROWS: usize = 32;
/// Mean prompt length from which a prefill's attention past GEMV_MAX_M rows stages the keys
/// (attention_tiled, heads of 64) instead of a block a (row, head) reading them (`attention`),
/// where a pass makes at least a block an SM of it. H100, E2E ms of a prefill and one token,
/// staged vs not: f16 batch 64 prompt 128 17.9 vs 26.6, batch 8 prompt 128 2.39 vs 3.42, prompt 64
/// 1.37 vs 1.55, batch 1 prompt 1000 5.1 vs 12.8; f32 batch 8 prompt 64 3.51 vs 3.69. Not where
/// the prompts are short (batch 16 prompt 12: 1.12 vs 0.82, 72 blocks each going over 2-3
/// sequences' rows in turn) or the blocks few (batch 1 prompt 128: 0.94 vs 0.83, 48 blocks).
const TILED_ATTENTION_LEN: usize = 64;
/// Longest sequence up to which a prefill's attention past GEMV_MAX_M rows that does not stage its
/// keys (TILED_ATTENTION_LEN) takes a warp a (row, head) (`attention_short`, heads of 64), instead
/// of a block a (row, head): every row's keys are then at most two runs of 32. H200, E2E ms of a
/// prefill and one token, same call, `GPT2RT_CUDA_SHORT_ATTENTION=0` vs on: f16 batch 16 prompt 12
/// 0.61 vs 0.55, batch 64 prompt 12 1.34 vs 1.16, f32 batch 64 prompt 40 10.62 vs 9.67.
const SHORT_ATTENTION_LEN: usize = 64;
/// Threads per block of attention_combine: a thread a column, over (row, column block) blocks
/// (measured together with its half rows: see "Half rows into every tensor-core product" in
/// docs/performance-notes.md).
const ATTENTION_COMBINE_THREADS: usize = 128;
/// Threads per block of the attention kernel.
const ATTENTION_THREADS: usize = 256;

fn driver_error(what: &str, e: result::DriverError) -> Error {
    let name = e.error_name().ok().and_then(|n| n.to_str().ok()).unwrap_or("unknown CUDA error").to_string();
    let kind = if e.0 == sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY { ErrorKind::OutOfMemory } else { ErrorKind::Device };
    Error::new(kind, format!("{what}: {name}"))
}

trait Check<T> {
    fn check(self, what: &str) -> Result<T>;
}

impl<T> Check<T> for std::result::Result<T, result::DriverError> {
    fn check(self, what: &str) -> Result<T> {
        self.map_err(|e| driver_error(what, e))
    }
}

/// A numeric tuning knob from the environment (read when an engine loads); None when unset or not
/// a number.
fn knob(name: &str) -> Option<usize> {
    std::env::var(name).ok()?.parse().ok()
}

/// A feature switch from the environment: on unless set to `0`.
fn knob_on(name: &str) -> bool {
    std::env::var(name).map_or(true, |v| v != "0")
}

/// Checks that the CUDA backend can run on device 0: driver present and new enough, a GPU of
/// compute capability 7.5 or newer.
pub fn availability() -> Result<()> {
    probe(0).map(|_| ())
}

struct Probe {
    device: sys::CUdevice,
    name: String,
    capability: (i32, i32),
    sm_count: usize,
    /// Whether kernels can be launched cooperatively (every block resident at once).
    cooperative: bool,
    /// Dynamic shared memory a block may opt into.
    smem_optin: usize,
    /// L2 cache bytes.
    l2_bytes: usize,
}

fn probe(ordinal: usize) -> Result<Probe> {
    // SAFETY: only asks whether the driver library can be loaded.
    if !unsafe { sys::is_culib_present() } {
        bail!(BackendUnavailable, "cuda: no NVIDIA driver found (libcuda could not be loaded)");
    }
    result::init().map_err(|e| err!(BackendUnavailable, "cuda: the driver failed to initialise: {e:?}"))?;
    let mut version = 0;
    // SAFETY: writes one int.
    unsafe { sys::cuDriverGetVersion(&mut version) }
        .result()
        .map_err(|e| err!(BackendUnavailable, "cuda: cannot read the driver version: {e:?}"))?;
    if version < 13000 {
        bail!(
            BackendUnavailable,
            "cuda: the driver supports CUDA {}.{}, the embedded kernels need 13.0 (driver 580 or newer)",
            version / 1000,
            version % 1000 / 10
        );
    }
    let count = result::device::get_count().check("cuda: counting GPUs")?;
    if count <= 0 {
        bail!(BackendUnavailable, "cuda: the driver sees no NVIDIA GPU");
    }
    if ordinal >= count as usize {
        bail!(BackendUnavailable, "cuda: device {ordinal} does not exist ({count} GPUs)");
    }
    let device = result::device::get(ordinal as i32).check("cuda: opening the device")?;
    let attr = |a| unsafe { result::device::get_attribute(device, a) }.check("cuda: reading a device attribute");
    let capability = (
        attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?,
        attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?,
    );
    let name = result::device::get_name(device).unwrap_or_else(|_| "unknown GPU".into());
    if capability < (7, 5) {
        bail!(
            BackendUnavailable,
            "cuda: {name} has compute capability {}.{}; the kernels need 7.5 or newer",
            capability.0,
            capability.1
        );
    }
    let sm_count = attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?.max(1) as usize;
    let cooperative = attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COOPERATIVE_LAUNCH)? != 0;
    let smem_optin =
        attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)?.max(0) as usize;
    let l2_bytes = attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE)?.max(0) as usize;
    Ok(Probe { device, name, capability, sm_count, cooperative, smem_optin, l2_bytes })
}

/// The kernels of the embedded module, by weight dtype where they read weights.
struct Kernels {
    embed: sys::CUfunction,
    layer_norm: sys::CUfunction,
    gemv_plain: sys::CUfunction,
    gemv_ln: sys::CUfunction,
    gemv_embed_ln: sys::CUfunction,
    gemv_attn: sys::CUfunction,
    /// The same four prologues, GEMV_COLS columns a warp (2..=GEMV_ROWS rows).
    gemv_cols: [sys::CUfunction; 4],
    attention_decode: sys::CUfunction,
    lm_head_ln: sys::CUfunction,
    lm_head_plain: sys::CUfunction,
    attention_combine: sys::CUfunction,
    matmul_tiled: sys::CUfunction,
    /// The tensor-core product for f16/bf16 weights on 8.0+ (None: f32, or an older GPU).
    matmul_mma: Option<sys::CUfunction>,
    /// Its instance with k-slices of 64 (present with it).
    matmul_mma64: Option<sys::CUfunction>,
    /// Both instances taking rows already in the weights' type, and the kernels that write them
    /// (present with them): the LayerNorm, the attention splits' combination, and the split-K
    /// finishing (`[matmul_finish, matmul_finish_rows]`, for the GELU output); unless
    /// `GPT2RT_CUDA_HALF_ROWS=0`.
    matmul_mma_half: Option<[sys::CUfunction; 2]>,
    layer_norm_half: Option<sys::CUfunction>,
    attention_combine_half: Option<sys::CUfunction>,
    matmul_finish_half: Option<[sys::CUfunction; 2]>,
    /// The tensor-core product (32-k slices) summing its splits inside a thread-block cluster
    /// (9.0+, see `Device::cluster_max`), `(fp32 rows, rows in the weights' type)`; the second is
    /// present with `matmul_mma_half`.
    matmul_mma_cluster: Option<(sys::CUfunction, Option<sys::CUfunction>)>,
    /// The LM head of up to HEAD_MMA_ROWS rows in the weights' type (present with
    /// `matmul_mma_half`), unless `GPT2RT_CUDA_HEAD_MMA=0` (for comparisons).
    lm_head_mma: Option<[sys::CUfunction; 3]>,
    matmul_finish: sys::CUfunction,
    matmul_finish_rows: sys::CUfunction,
    /// The prefill attention with staged keys (heads of 64), unless `GPT2RT_CUDA_TILED_ATTENTION=0`.
    attention_tiled: Option<sys::CUfunction>,
    /// The prefill attention of short prompts (heads of 64): a warp a (row, head), unless
    /// `GPT2RT_CUDA_SHORT_ATTENTION=0`.
    attention_short: Option<sys::CUfunction>,
    lm_head: sys::CUfunction,
    attention: sys::CUfunction,
    gather_rows: sys::CUfunction,
    argmax_partial: sys::CUfunction,
    argmax_final: sys::CUfunction,
    sample_rows: sys::CUfunction,
    advance: sys::CUfunction,
    /// The fused decode step, where the GPU launches cooperatively and has cp.async (8.0+), unless
    /// `GPT2RT_CUDA_FUSED_STEP=0` (for comparisons); and, in f32, its 16-row variant.
    decode_step: Option<sys::CUfunction>,
    decode_step_wide: Option<sys::CUfunction>,
    /// The cluster step (batch 1 in two phases a layer: decode_step_cl in the .cu file), in the
    /// half modes where the fused step runs on a 9.0+ GPU, unless `GPT2RT_CUDA_CLUSTER_STEP=0` (for
    /// comparisons).
    decode_step_cl: Option<sys::CUfunction>,
}

/// A device context with the module loaded. Shared by the backend and its sessions.
struct Device {
    ctx: sys::CUcontext,
    device: sys::CUdevice,
    module: sys::CUmodule,
    kernels: Kernels,
    name: String,
    capability: (i32, i32),
    /// Streaming multiprocessors.
    sm_count: usize,
    /// Programmatic dependent launch: 9.0+, unless `GPT2RT_CUDA_PDL=0` (for comparisons).
    pdl: bool,
    /// Dynamic shared memory a block may opt into.
    smem_optin: usize,
    /// Most blocks of a cluster product (`matmul_mma_cluster`; 0 where those do not run):
    /// CLUSTER_BLOCKS, or `GPT2RT_CUDA_CLUSTER` (at most CLUSTER_MAX; past 8 where the GPU lets
    /// every cluster kernel have that many), checked with the driver's occupancy query.
    cluster_max: usize,
    /// L2 cache bytes.
    l2_bytes: usize,
}

// SAFETY: CUDA contexts, modules and functions may be used from any thread once made current; every
// entry point calls `bind()` first.
unsafe impl Send for Device {}
unsafe impl Sync for Device {}

impl Device {
    fn open(ordinal: usize, dtype: DType) -> Result<Arc<Self>> {
        let probe = probe(ordinal)?;
        // SAFETY: the device handle is valid (probe); the primary context is released in Drop.
        let ctx = unsafe { result::primary_ctx::retain(probe.device) }.check("cuda: creating the context")?;
        unsafe { result::ctx::set_current(ctx) }.check("cuda: binding the context")?;
        // SAFETY: FATBIN is a complete fatbinary image embedded at compile time.
        let module = unsafe { result::module::load_data(FATBIN.as_ptr().cast()) }.map_err(|e| {
            err!(BackendUnavailable, "cuda: the driver cannot load the embedded kernels for this GPU: {e:?}")
        })?;
        let suffix = dtype.name();
        let fused = probe.capability >= (8, 0) && probe.cooperative && knob_on("GPT2RT_CUDA_FUSED_STEP");
        // GPT2RT_CUDA_MMA=0 keeps the CUDA-core kernel (for comparisons).
        let mma = dtype != DType::F32 && probe.capability >= (8, 0) && knob_on("GPT2RT_CUDA_MMA");
        // GPT2RT_CUDA_HALF_ROWS=0: fp32 rows into the tensor-core products (for comparisons).
        let half_rows = mma && knob_on("GPT2RT_CUDA_HALF_ROWS");
        // GPT2RT_CUDA_CLUSTER=0: split-K products finished by a separate kernel (for comparisons).
        let cluster_wanted = knob("GPT2RT_CUDA_CLUSTER").unwrap_or(CLUSTER_BLOCKS).min(CLUSTER_MAX);
        let cluster = mma && probe.capability >= (9, 0) && cluster_wanted >= 2;
        let get = |name: &str| -> Result<sys::CUfunction> {
            let cname = std::ffi::CString::new(name).expect("kernel names have no NUL");
            // SAFETY: module is loaded; the name is NUL-terminated.
            unsafe { result::module::get_function(module, cname) }
                .map_err(|e| err!(Internal, "cuda: kernel {name} missing from the embedded module: {e:?}"))
        };
        let kernels = Kernels {
            embed: get(&format!("embed_{suffix}"))?,
            layer_norm: get(&format!("layer_norm_{suffix}"))?,
            gemv_plain: get(&format!("gemv_plain_{suffix}"))?,
            gemv_ln: get(&format!("gemv_ln_{suffix}"))?,
            gemv_embed_ln: get(&format!("gemv_embed_ln_{suffix}"))?,
            gemv_attn: get(&format!("gemv_attn_{suffix}"))?,
            gemv_cols: [
                get(&format!("gemv_cols_plain_{suffix}"))?,
                get(&format!("gemv_cols_ln_{suffix}"))?,
                get(&format!("gemv_cols_embed_ln_{suffix}"))?,
                get(&format!("gemv_cols_attn_{suffix}"))?,
            ],
            attention_decode: get(&format!("attention_decode_{suffix}"))?,
            lm_head_ln: get(&format!("lm_head_ln_{suffix}"))?,
            lm_head_plain: get(&format!("lm_head_plain_{suffix}"))?,
            attention_combine: get("attention_combine_f32")?,
            matmul_tiled: get(&format!("matmul_tiled_{suffix}"))?,
            matmul_mma: if mma { Some(get(&format!("matmul_mma_{suffix}"))?) } else { None },
            matmul_mma64: if mma { Some(get(&format!("matmul_mma64_{suffix}"))?) } else { None },
            matmul_mma_half: if half_rows {
                Some([get(&format!("matmul_mma_half_{suffix}"))?, get(&format!("matmul_mma64_half_{suffix}"))?])
            } else {
                None
            },
            layer_norm_half: if half_rows { Some(get(&format!("layer_norm_half_{suffix}"))?) } else { None },
            attention_combine_half: if half_rows {
                Some(get(&format!("attention_combine_half_{suffix}"))?)
            } else {
                None
            },
            matmul_finish_half: if half_rows {
                Some([
                    get(&format!("matmul_finish_half_{suffix}"))?,
                    get(&format!("matmul_finish_rows_half_{suffix}"))?,
                ])
            } else {
                None
            },
            matmul_mma_cluster: if cluster {
                let half = if half_rows { Some(get(&format!("matmul_mma_half_cluster_{suffix}"))?) } else { None };
                Some((get(&format!("matmul_mma_cluster_{suffix}"))?, half))
            } else {
                None
            },
            lm_head_mma: if half_rows && knob_on("GPT2RT_CUDA_HEAD_MMA") {
                Some([
                    get(&format!("lm_head_mma16_{suffix}"))?,
                    get(&format!("lm_head_mma32_{suffix}"))?,
                    get(&format!("lm_head_mma64_{suffix}"))?,
                ])
            } else {
                None
            },
            matmul_finish: get(&format!("matmul_finish_{suffix}"))?,
            matmul_finish_rows: get(&format!("matmul_finish_rows_{suffix}"))?,
            lm_head: get(&format!("lm_head_{suffix}"))?,
            attention: get(&format!("attention_{suffix}"))?,
            attention_tiled: if knob_on("GPT2RT_CUDA_TILED_ATTENTION") {
                Some(get(&format!("attention_tiled_{suffix}"))?)
            } else {
                None
            },
            attention_short: if knob_on("GPT2RT_CUDA_SHORT_ATTENTION") {
                Some(get(&format!("attention_short_{suffix}"))?)
            } else {
                None
            },
            gather_rows: get("gather_rows")?,
            argmax_partial: get("argmax_partial")?,
            argmax_final: get("argmax_final")?,
            sample_rows: get("sample_rows")?,
            advance: get("advance")?,
            decode_step: if fused { Some(get(&format!("decode_step_{suffix}"))?) } else { None },
            decode_step_wide: if fused { Some(get(&format!("decode_step16_{suffix}"))?) } else { None },
            decode_step_cl: if fused
                && dtype != DType::F32
                && probe.capability >= (9, 0)
                && knob_on("GPT2RT_CUDA_CLUSTER_STEP")
            {
                Some(get(&format!("decode_step_cl_{suffix}"))?)
            } else {
                None
            },
        };
        let cluster_max = match &kernels.matmul_mma_cluster {
            Some((fp32_rows, half)) => cluster_size(std::iter::once(*fp32_rows).chain(*half), cluster_wanted),
            None => 0,
        };
        Ok(Arc::new(Self {
            cluster_max,
            ctx,
            device: probe.device,
            module,
            kernels,
            name: probe.name,
            capability: probe.capability,
            sm_count: probe.sm_count,
            pdl: probe.capability >= (9, 0) && knob_on("GPT2RT_CUDA_PDL"),
            smem_optin: probe.smem_optin,
            l2_bytes: probe.l2_bytes,
        }))
    }

    fn bind(&self) -> Result<()> {
        // SAFETY: the context is alive as long as self.
        unsafe { result::ctx::set_current(self.ctx) }.check("cuda: binding the context")
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        // SAFETY: nothing uses the module or context after the last Arc is gone.
        unsafe {
            let _ = result::ctx::set_current(self.ctx);
            let _ = result::module::unload(self.module);
            let _ = result::primary_ctx::release(self.device);
        }
    }
}

/// Device memory, freed on drop.
struct DeviceBuffer {
    device: Arc<Device>,
    ptr: sys::CUdeviceptr,
    bytes: usize,
}

impl DeviceBuffer {
    fn new(device: &Arc<Device>, bytes: usize, what: &str) -> Result<Self> {
        device.bind()?;
        // SAFETY: plain allocation of at least one byte.
        let ptr = unsafe { result::malloc_sync(bytes.max(1)) }
            .map_err(|e| driver_error(&format!("cuda: allocating {} MiB for the {what}", bytes >> 20), e))?;
        Ok(Self { device: device.clone(), ptr, bytes })
    }

    fn upload<T>(device: &Arc<Device>, data: &[T], what: &str) -> Result<Self> {
        let buffer = Self::new(device, std::mem::size_of_val(data), what)?;
        // SAFETY: the buffer holds exactly size_of_val(data) bytes.
        unsafe { result::memcpy_htod_sync(buffer.ptr, data) }.check("cuda: uploading weights")?;
        Ok(buffer)
    }

    /// Address of element `index` of a buffer of `T`.
    fn at<T>(&self, index: usize) -> u64 {
        debug_assert!(index * std::mem::size_of::<T>() <= self.bytes);
        self.ptr + (index * std::mem::size_of::<T>()) as u64
    }
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        // SAFETY: the pointer came from malloc_sync and is freed once; errors at teardown are moot.
        unsafe {
            let _ = self.device.bind();
            let _ = result::free_sync(self.ptr);
        }
    }
}

/// Page-locked host memory for the copies that cross each step, freed on drop.
struct PinnedBuffer<T> {
    ptr: *mut T,
    len: usize,
    _device: Arc<Device>,
}

// SAFETY: plain host memory owned by this value.
unsafe impl<T: Send> Send for PinnedBuffer<T> {}

impl<T: Copy + Default> PinnedBuffer<T> {
    fn new(device: &Arc<Device>, len: usize) -> Result<Self> {
        device.bind()?;
        let bytes = (len * std::mem::size_of::<T>()).max(1);
        // SAFETY: allocation; the memory is initialised below.
        let ptr = unsafe { result::malloc_host(bytes, sys::CU_MEMHOSTALLOC_PORTABLE) }
            .check("cuda: allocating pinned host memory")? as *mut T;
        for i in 0..len {
            // SAFETY: in bounds of the allocation.
            unsafe { ptr.add(i).write(T::default()) };
        }
        Ok(Self { ptr, len, _device: device.clone() })
    }

    fn as_slice(&self) -> &[T] {
        // SAFETY: len initialised elements, owned by self.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    fn as_mut_slice(&mut self) -> &mut [T] {
        // SAFETY: as above, and &mut self is exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl<T> Drop for PinnedBuffer<T> {
    fn drop(&mut self) {
        // SAFETY: allocated by malloc_host, freed once.
        unsafe {
            let _ = self._device.bind();
            let _ = result::free_host(self.ptr.cast());
        }
    }
}

/// A CUDA event without timing (for waiting on one point of a stream), destroyed on drop.
struct Event {
    event: sys::CUevent,
    _device: Arc<Device>,
}

impl Event {
    fn new(device: &Arc<Device>) -> Result<Self> {
        device.bind()?;
        let event =
            result::event::create(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING).check("cuda: creating an event")?;
        Ok(Self { event, _device: device.clone() })
    }
}

impl Drop for Event {
    fn drop(&mut self) {
        // SAFETY: created by event::create, destroyed once; errors at teardown are moot.
        unsafe {
            let _ = self._device.bind();
            let _ = result::event::destroy(self.event);
        }
    }
}

struct LayerBuffers {
    ln_1_weight: DeviceBuffer,
    ln_1_bias: DeviceBuffer,
    attn_weight: DeviceBuffer,
    attn_bias: DeviceBuffer,
    attn_proj_weight: DeviceBuffer,
    attn_proj_bias: DeviceBuffer,
    ln_2_weight: DeviceBuffer,
    ln_2_bias: DeviceBuffer,
    fc_weight: DeviceBuffer,
    fc_bias: DeviceBuffer,
    mlp_proj_weight: DeviceBuffer,
    mlp_proj_bias: DeviceBuffer,
}

struct DeviceWeights {
    wte: DeviceBuffer,
    wpe: DeviceBuffer,
    layers: Vec<LayerBuffers>,
    ln_f_weight: DeviceBuffer,
    ln_f_bias: DeviceBuffer,
    lm_head: Option<DeviceBuffer>,
    bytes: usize,
}

fn upload_weights(device: &Arc<Device>, model: &Model, dtype: DType) -> Result<DeviceWeights> {
    let mut bytes = 0;
    let mut up = |values: &[f32]| -> Result<DeviceBuffer> { upload_values(device, values, dtype, &mut bytes) };
    let c = model.config.n_embd;
    let w = &model.weights;
    let wte = up(&w.wte)?;
    let wpe = up(&w.wpe)?;
    let mut layers = Vec::with_capacity(w.layers.len());
    for l in &w.layers {
        layers.push(LayerBuffers {
            ln_1_weight: up(&l.ln_1_weight)?,
            ln_1_bias: up(&l.ln_1_bias)?,
            attn_weight: up(&transposed(&l.attn_weight, c, 3 * c))?,
            attn_bias: up(&l.attn_bias)?,
            attn_proj_weight: up(&transposed(&l.attn_proj_weight, c, c))?,
            attn_proj_bias: up(&l.attn_proj_bias)?,
            ln_2_weight: up(&l.ln_2_weight)?,
            ln_2_bias: up(&l.ln_2_bias)?,
            fc_weight: up(&transposed(&l.fc_weight, c, 4 * c))?,
            fc_bias: up(&l.fc_bias)?,
            mlp_proj_weight: up(&transposed(&l.mlp_proj_weight, 4 * c, c))?,
            mlp_proj_bias: up(&l.mlp_proj_bias)?,
        });
    }
    let ln_f_weight = up(&w.ln_f_weight)?;
    let ln_f_bias = up(&w.ln_f_bias)?;
    let lm_head = w.lm_head.as_deref().map(&mut up).transpose()?;
    Ok(DeviceWeights { wte, wpe, layers, ln_f_weight, ln_f_bias, lm_head, bytes })
}

/// A `[k, n]` matrix (the checkpoint's Conv1D layout) as `[n, k]`, the layout every matmul kernel
/// reads: the warp that owns output column n streams one contiguous row.
fn transposed(values: &[f32], k: usize, n: usize) -> Vec<f32> {
    let mut t = vec![0.0f32; values.len()];
    for (i, row) in values.chunks_exact(n).enumerate().take(k) {
        for (j, &v) in row.iter().enumerate() {
            t[j * k + i] = v;
        }
    }
    t
}

fn upload_values(device: &Arc<Device>, values: &[f32], dtype: DType, bytes: &mut usize) -> Result<DeviceBuffer> {
    let buffer = match dtype {
        DType::F32 => DeviceBuffer::upload(device, values, "weights")?,
        DType::F16 => {
            let v: Vec<f16> = values.iter().map(|&x| f16::from_f32(x)).collect();
            DeviceBuffer::upload(device, &v, "weights")?
        }
        DType::BF16 => {
            let v: Vec<bf16> = values.iter().map(|&x| bf16::from_f32(x)).collect();
            DeviceBuffer::upload(device, &v, "weights")?
        }
    };
    *bytes += buffer.bytes;
    Ok(buffer)
}

/// The CUDA backend of an engine: the device and the weights on it.
pub struct CudaBackend {
    shared: Arc<Shared>,
}

/// The fused decode step of an engine (see decode_step in the .cu file; the kernels are
/// `Kernels::decode_step` and `decode_step_wide`): one block an SM, and the weight table it reads.
struct FusedStep {
    blocks: usize,
    /// Device addresses of the weights, in the order of the .cu file's T_* slots.
    table: DeviceBuffer,
    /// Its kernels, fewest rows first.
    kernels: Vec<StepKernel>,
    /// The batch sizes that take it (bit b: batch b): FUSED_BATCHES_*, or every batch up to
    /// `GPT2RT_CUDA_FUSED_ROWS` (a tuning knob read when the engine loads); either way at most the
    /// rows whose inputs fit a kernel's shared memory.
    batches: u32,
    /// Batches from which its products and LM head run on tensor cores (the half modes where
    /// matmul_mma runs and n_embd % 32 == 0): STEP_MMA_ROWS, or `GPT2RT_CUDA_STEP_MMA_ROWS` (a
    /// tuning knob read when the engine loads); usize::MAX where they cannot.
    mma_rows: usize,
    /// Vocabulary rows of the LM head whose weights stay in L2 from one step to the next (evict_last;
    /// the rest of the weights stream through with evict_first): head_keep_bytes of them.
    head_keep_rows: usize,
    /// Whether a launch asks for room to stage its attention splits' outputs (step_stage_bytes):
    /// on unless `GPT2RT_CUDA_STEP_STAGE_SPLITS=0` (a tuning knob read when the engine loads).
    stage_splits: bool,
    /// The cluster step, which takes the steps of one sequence where it runs (cluster_step).
    cluster: Option<ClusterStep>,
}

/// The cluster step of an engine (decode_step_cl in the .cu file): a step of one sequence in two
/// grid-wide phases a layer, on `blocks` blocks (one an SM) in clusters of CL_SIZE.
struct ClusterStep {
    blocks: usize,
    /// MLP hidden units a block (the kernel's `hidden`).
    hidden: usize,
    /// Dynamic shared memory of a launch (cluster_step_smem).
    smem: usize,
    /// The fused step's weight table, but for the MLP-down weights: `down`'s, in the checkpoint's
    /// `[4C, C]` layout (a block's hidden units are then contiguous rows); and for the QKV and
    /// MLP-up biases: `folded`'s.
    table: DeviceBuffer,
    down: Vec<DeviceBuffer>,
    /// A layer's QKV biases (3C) and MLP-up biases (4C) in fp32, with the LayerNorm bias before
    /// each product folded in (folded_biases).
    folded: DeviceBuffer,
}

impl ClusterStep {
    /// Clusters of a launch: cluster c < n_head takes head c in the first phase of a layer.
    fn clusters(&self) -> usize {
        self.blocks / CL_SIZE
    }
}

/// One kernel of the fused step.
struct StepKernel {
    /// `Kernels::decode_step_wide` (or `decode_step`).
    wide: bool,
    /// The rows it is compiled for (its ROWS), and those whose inputs fit its shared memory.
    kernel_rows: usize,
    rows: usize,
    /// Dynamic shared memory a launch may ask for (the device's opt-in limit less the static).
    smem_limit: usize,
}

impl FusedStep {
    /// Whether steps of `b` sequences take the fused step.
    fn takes(&self, b: usize) -> bool {
        b < 32 && self.batches & (1 << b) != 0
    }

    /// The kernel for steps of `b` sequences: the one with the fewest rows that takes them.
    fn kernel(&self, b: usize) -> &StepKernel {
        self.kernels.iter().find(|k| b <= k.rows).expect("a fused step takes only the rows a kernel fits")
    }
}

/// Dynamic shared memory of the fused-step kernel for `kernel_rows` rows (its ROWS) at `m` rows,
/// with the MLP-down rows staged in it (`h4_size` bytes a value: 4, or the weights' size where
/// they are in the weights' type) or not (0), and the copy of the weight table after it (mirrors
/// step_buffer_bytes, step_scratch_floats and step_table_entries in the .cu file).
fn fused_step_smem(
    cfg: &ModelConfig,
    blocks: usize,
    dtype: DType,
    m: usize,
    h4_size: usize,
    kernel_rows: usize,
) -> usize {
    let (c, wsize, warps) = (cfg.n_embd, dtype.size(), step_threads(dtype) / 32);
    let cpb = |n: usize| n.div_ceil(blocks);
    let elems = (cpb(3 * c) * c).max(cpb(4 * c) * c).max(cpb(c) * 4 * c);
    let buffer = (elems * wsize).next_multiple_of(16) + (2 * c * wsize).next_multiple_of(16);
    let shares = (warps * 8).max(cpb(4 * c) + 7) * kernel_rows;
    let attention = warps * cfg.head_dim() + 2 * warps;
    let combine = 3 * blocks.max(kernel_rows * cfg.n_head);
    // The staged MLP-down rows take the place of the input rows (decode_step).
    let rows = m * c * if h4_size > 0 { h4_size } else { 1 };
    let table = STEP_TABLE_GLOBALS + cfg.n_layer * STEP_TABLE_PER_LAYER;
    (2 * buffer + (rows + shares.max(attention).max(combine)) * 4).next_multiple_of(16) + table * 8
}

/// The fused step for this device, model and dtype, where the kernel exists and its shared memory
/// and one block an SM fit; None falls back to the kernel-per-phase step.
fn fused_step(device: &Arc<Device>, model: &Model, weights: &DeviceWeights, dtype: DType) -> Result<Option<FusedStep>> {
    let cfg = &model.config;
    let Some(narrow) = device.kernels.decode_step else { return Ok(None) };
    let (c, h) = (cfg.n_embd, cfg.n_head);
    // (Its attention combination takes four outputs of a head at a time: heads of a multiple of 4.)
    if c % 8 != 0 || h == 0 || c % h != 0 || c / h > 256 || (c / h) % 4 != 0 {
        return Ok(None);
    }
    let blocks =
        knob("GPT2RT_CUDA_STEP_BLOCKS").unwrap_or(device.sm_count).clamp(1, device.sm_count.min(LM_HEAD_BLOCKS));
    let mut kernels = Vec::new();
    for (function, kernel_rows) in [(Some(narrow), GEMV_MAX_ROWS), (device.kernels.decode_step_wide, FUSED_WIDE_ROWS)] {
        let Some(function) = function else { continue };
        match step_kernel(device, cfg, dtype, blocks, function, kernel_rows)? {
            // The wide kernel only for rows the narrow one cannot take.
            Some(k) if k.rows > kernels.last().map_or(0, |n: &StepKernel| n.rows) => kernels.push(k),
            _ => {}
        }
    }
    let Some(max_rows) = kernels.last().map(|k| k.rows) else { return Ok(None) };
    let w = weights;
    // STEP_TABLE_GLOBALS entries, then STEP_TABLE_PER_LAYER a layer (the .cu file's T_* slots).
    let mut table =
        vec![w.wte.ptr, w.wpe.ptr, w.ln_f_weight.ptr, w.ln_f_bias.ptr, w.lm_head.as_ref().unwrap_or(&w.wte).ptr];
    for l in &w.layers {
        table.extend([
            l.ln_1_weight.ptr,
            l.ln_1_bias.ptr,
            l.attn_weight.ptr,
            l.attn_bias.ptr,
            l.attn_proj_weight.ptr,
            l.attn_proj_bias.ptr,
            l.ln_2_weight.ptr,
            l.ln_2_bias.ptr,
            l.fc_weight.ptr,
            l.fc_bias.ptr,
            l.mlp_proj_weight.ptr,
            l.mlp_proj_bias.ptr,
        ]);
    }
    debug_assert_eq!(table.len(), STEP_TABLE_GLOBALS + w.layers.len() * STEP_TABLE_PER_LAYER);
    let cluster = cluster_step(device, model, dtype, &table)?;
    let table = DeviceBuffer::upload(device, &table, "weight table")?;
    let upto = |rows: usize| ((1u32 << (rows.min(max_rows) + 1)) - 1) & !1;
    let batches = match knob("GPT2RT_CUDA_FUSED_ROWS") {
        Some(rows) => upto(rows),
        None if dtype == DType::F32 => FUSED_BATCHES_F32 & upto(max_rows),
        None => FUSED_BATCHES_HALF & upto(max_rows),
    };
    let mma_rows = if device.kernels.matmul_mma.is_some() && c % 32 == 0 {
        knob("GPT2RT_CUDA_STEP_MMA_ROWS").unwrap_or(STEP_MMA_ROWS)
    } else {
        usize::MAX
    };
    let head_keep_rows = (head_keep_bytes(device, dtype) / (c * dtype.size())).min(cfg.vocab_size);
    let stage_splits = knob_on("GPT2RT_CUDA_STEP_STAGE_SPLITS");
    Ok(Some(FusedStep { blocks, table, kernels, batches, mma_rows, head_keep_rows, stage_splits, cluster }))
}

/// Blocks of a cluster of the cluster step, and its limits (CL_SIZE, CL_MAX_CLUSTERS, CL_HID_MAX
/// and CL_PROJ_MAX in the .cu file): clusters, MLP hidden units a block, and projection tasks a
/// thread (n_embd <= that times the threads).
const CL_SIZE: usize = 8;
const CL_MAX_CLUSTERS: usize = 16;
const CL_HID_MAX: usize = 32;
const CL_PROJ_MAX: usize = 2;

/// Dynamic shared memory of the cluster step with `hidden` MLP units a block (mirrors the layout
/// at the start of decode_step_cl in the .cu file): the two weight buffers, the rows and scratch
/// (fp32, the last the two phases' gathered partial sums), then the copy of the weight table.
fn cluster_step_smem(cfg: &ModelConfig, dtype: DType, hidden: usize) -> usize {
    let (c, d, wsize, warps) = (cfg.n_embd, cfg.head_dim(), dtype.size(), step_threads(dtype) / 32);
    let dq = d / CL_SIZE;
    let a = ((3 * dq + 2) * c * wsize).next_multiple_of(16);
    let b = ((2 * hidden + 2) * c * wsize).next_multiple_of(16);
    let floats = 3 * c
        + (d + 4)
        + (CL_SIZE * (d + 2)).next_multiple_of(4)
        + 4 * d
        + hidden.next_multiple_of(4)
        + 2 * warps
        + warps * d
        + 4
        + 2 * c;
    let table = STEP_TABLE_GLOBALS + cfg.n_layer * STEP_TABLE_PER_LAYER;
    (a + b + floats * 4).next_multiple_of(16) + table * 8
}

/// The cluster step for this device and model, where its kernel runs (9.0+), the model has what
/// it needs (heads of 64, n_embd a multiple of 8 CL_SIZE and within its per-thread limit), and at
/// least one cluster a head fits on the GPU at once with one block an SM and its shared memory: as
/// many clusters as fit, up to one for every CL_SIZE SMs. `table`: the fused step's weight table.
fn cluster_step(device: &Arc<Device>, model: &Model, dtype: DType, table: &[u64]) -> Result<Option<ClusterStep>> {
    let Some(f) = device.kernels.decode_step_cl else { return Ok(None) };
    let cfg = &model.config;
    let (c, h, threads) = (cfg.n_embd, cfg.n_head, step_threads(dtype));
    if cfg.head_dim() != 64 || c % (8 * CL_SIZE) != 0 || c > CL_PROJ_MAX * threads {
        return Ok(None);
    }
    let static_bytes = static_smem(f, "the cluster step")?;
    let most = knob("GPT2RT_CUDA_CLUSTER_STEP_CLUSTERS")
        .unwrap_or(CL_MAX_CLUSTERS)
        .min(CL_MAX_CLUSTERS)
        .min(device.sm_count / CL_SIZE);
    for clusters in (h.max(1)..=most).rev() {
        let blocks = clusters * CL_SIZE;
        let hidden = (4 * c).div_ceil(blocks);
        if hidden > CL_HID_MAX {
            break;
        }
        let smem = cluster_step_smem(cfg, dtype, hidden);
        if smem + static_bytes > device.smem_optin
            || !allow_dynamic_smem(f, threads, smem, "the cluster step")?
            || resident_clusters(f, cluster_attribute_x(CL_SIZE), (CL_SIZE, 1), threads, smem) < clusters
        {
            continue;
        }
        let mut bytes = 0;
        let down = model
            .weights
            .layers
            .iter()
            .map(|l| upload_values(device, &l.mlp_proj_weight, dtype, &mut bytes))
            .collect::<Result<Vec<_>>>()?;
        let folded = DeviceBuffer::upload(device, &folded_biases(model, dtype), "folded biases")?;
        let mut table = table.to_vec();
        for (l, d) in down.iter().enumerate() {
            let at = STEP_TABLE_GLOBALS + l * STEP_TABLE_PER_LAYER;
            table[at + STEP_TABLE_MPROJ_W] = d.ptr;
            table[at + STEP_TABLE_ATTN_B] = folded.at::<f32>(l * 7 * c);
            table[at + STEP_TABLE_FC_B] = folded.at::<f32>(l * 7 * c + 3 * c);
        }
        let table = DeviceBuffer::upload(device, &table, "weight table")?;
        return Ok(Some(ClusterStep { blocks, hidden, smem, table, down, folded }));
    }
    Ok(None)
}

/// The cluster step's biases of the products that follow a LayerNorm, with the LayerNorm's bias
/// folded in (cl_fold_regs in the .cu file): LN(x) = (x - mean) inv g + b, so that output j of
/// the product plus its bias is inv sum_k W_jk g_k (x_k - mean) plus (bias_j + sum_k W_jk b_k).
/// For each layer, 3C values for QKV (ln_1), then 4C for MLP up (ln_2); the sums over the values
/// the device holds (rounded to `dtype`), in f64.
fn folded_biases(model: &Model, dtype: DType) -> Vec<f32> {
    let c = model.config.n_embd;
    // `src` rounded to `dtype` (as the device holds it) into `dst`, with the slices' conversions
    // (SIMD where the CPU has it): the fold reads every QKV and MLP-up weight once.
    let (mut h, mut b) = (Vec::new(), Vec::new());
    let mut round = |src: &[f32], dst: &mut [f32]| match dtype {
        DType::F32 => dst.copy_from_slice(src),
        DType::F16 => {
            h.resize(src.len(), f16::ZERO);
            h.convert_from_f32_slice(src);
            h.convert_to_f32_slice(dst);
        }
        DType::BF16 => {
            b.resize(src.len(), bf16::ZERO);
            b.convert_from_f32_slice(src);
            b.convert_to_f32_slice(dst);
        }
    };
    let mut out = Vec::with_capacity(model.weights.layers.len() * 7 * c);
    let mut row = Vec::new();
    let mut ln = vec![0.0f32; c];
    // `w` in the checkpoint's `[C, n]` layout: output j's weights are w[k n + j].
    let mut fold = |w: &[f32], bias: &[f32], ln_bias: &[f32], out: &mut Vec<f32>| {
        let n = bias.len();
        row.resize(n, 0.0f32);
        round(bias, &mut row);
        let mut sums: Vec<f64> = row.iter().map(|&v| v as f64).collect();
        round(ln_bias, &mut ln);
        for (k, &b) in ln.iter().enumerate() {
            round(&w[k * n..(k + 1) * n], &mut row);
            for (sum, &v) in sums.iter_mut().zip(&row) {
                *sum += v as f64 * b as f64;
            }
        }
        out.extend(sums.iter().map(|&v| v as f32));
    };
    for l in &model.weights.layers {
        fold(&l.attn_weight, &l.attn_bias, &l.ln_1_bias, &mut out);
        fold(&l.fc_weight, &l.fc_bias, &l.ln_2_bias, &mut out);
    }
    out
}

/// Clusters (`attr`: their dimensions; `grid`: one cluster's blocks along x and z) of blocks of
/// `threads` threads and `smem` bytes of dynamic shared memory that the GPU holds at once (the
/// driver's occupancy query; 0 where it fails).
fn resident_clusters(
    f: sys::CUfunction,
    mut attr: sys::CUlaunchAttribute,
    grid: (usize, usize),
    threads: usize,
    smem: usize,
) -> usize {
    let config = sys::CUlaunchConfig {
        gridDimX: grid.0 as u32,
        gridDimY: 1,
        gridDimZ: grid.1 as u32,
        blockDimX: threads as u32,
        blockDimY: 1,
        blockDimZ: 1,
        sharedMemBytes: smem as u32,
        hStream: std::ptr::null_mut(),
        attrs: &mut attr,
        numAttrs: 1,
    };
    let mut clusters = 0;
    // SAFETY: the function belongs to the loaded module; config and attr live across the call.
    let status = unsafe { sys::cuOccupancyMaxActiveClusters(&mut clusters, f, &config) };
    if status == sys::cudaError_enum::CUDA_SUCCESS { clusters.max(0) as usize } else { 0 }
}

/// Bytes of LM-head weights the fused step keeps in L2 across steps: HEAD_KEEP_MB_HALF or
/// HEAD_KEEP_MB_F32, or `GPT2RT_CUDA_HEAD_KEEP_MB` (a tuning knob read when the engine loads), at
/// most a third of the L2 cache.
fn head_keep_bytes(device: &Device, dtype: DType) -> usize {
    let mb = knob("GPT2RT_CUDA_HEAD_KEEP_MB").unwrap_or(if dtype == DType::F32 {
        HEAD_KEEP_MB_F32
    } else {
        HEAD_KEEP_MB_HALF
    });
    mb.saturating_mul(1 << 20).min(device.l2_bytes / 3)
}

/// Bytes the fused step's attention splits' outputs take where they are staged for their
/// combination (step_combine_load in the .cu file: past the weight table's copy, where the launch's
/// shared memory has room): `m` rows of as many splits as step_splits can choose in a session of
/// `max_seq` (no more than the blocks' share of each (row, head), no fewer than `step_split_keys`
/// keys each), n_embd floats each; 0 where there is one split.
fn step_stage_bytes(cfg: &ModelConfig, dtype: DType, blocks: usize, m: usize, max_seq: usize) -> usize {
    let splits = (blocks / (m * cfg.n_head).max(1)).min(max_seq.div_ceil(step_split_keys(dtype))).max(1);
    if splits > 1 { m * splits * cfg.n_embd * 4 } else { 0 }
}

/// Sizes one fused-step kernel (compiled for `kernel_rows` rows) for this device: the rows whose
/// inputs fit its shared memory (whether a launch's MLP-down rows fit too is worked out when it is
/// enqueued); None where none fit or one block an SM does not.
fn step_kernel(
    device: &Arc<Device>,
    cfg: &ModelConfig,
    dtype: DType,
    blocks: usize,
    function: sys::CUfunction,
    kernel_rows: usize,
) -> Result<Option<StepKernel>> {
    let limit = device.smem_optin.saturating_sub(static_smem(function, "the fused step")?);
    let smem_for = |m: usize, h4_size: usize| fused_step_smem(cfg, blocks, dtype, m, h4_size, kernel_rows);
    let rows = (1..=kernel_rows).take_while(|&m| smem_for(m, 0) <= limit).count();
    if rows == 0 {
        return Ok(None);
    }
    let wide = kernel_rows > GEMV_MAX_ROWS;
    // Any launch up to the limit: past what its rows need, a launch may ask for room to stage the
    // attention splits' outputs.
    let fits = allow_dynamic_smem(function, step_threads(dtype), limit, "the fused step")?;
    Ok(fits.then_some(StepKernel { wide, kernel_rows, rows, smem_limit: limit }))
}

/// The static shared memory of `function` (a kernel of the loaded module; `what` names it in
/// errors).
fn static_smem(function: sys::CUfunction, what: &str) -> Result<usize> {
    // SAFETY: the function belongs to the loaded module.
    let bytes = unsafe {
        result::function::get_function_attribute(
            function,
            sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES,
        )
    }
    .check(&format!("cuda: sizing {what}"))?;
    Ok(bytes.max(0) as usize)
}

/// Lets `function` (a kernel of the loaded module) have `smem` bytes of dynamic shared memory,
/// which must be within the device's opt-in limit beside its static shared memory, and says
/// whether one block of `threads` with that much is then resident on an SM.
fn allow_dynamic_smem(function: sys::CUfunction, threads: usize, smem: usize, what: &str) -> Result<bool> {
    // SAFETY: the function belongs to the loaded module; the caller keeps the size within the
    // opt-in limit.
    unsafe {
        result::function::set_function_attribute(
            function,
            sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            smem as i32,
        )
    }
    .check(&format!("cuda: configuring {what}"))?;
    // SAFETY: as above.
    let resident = unsafe { result::occupancy::max_active_block_per_multiprocessor(function, threads as i32, smem) }
        .check(&format!("cuda: sizing {what}"))?;
    Ok(resident >= 1)
}

/// The largest cluster, from `wanted` down, with which every one of `functions` (MMA_THREADS
/// threads, their static shared memory) has at least one cluster resident on the GPU (0: none).
/// Sizes past 8 (the portable limit) are allowed on each function first.
fn cluster_size(functions: impl Iterator<Item = sys::CUfunction> + Clone, wanted: usize) -> usize {
    let fits = |f: sys::CUfunction, size: usize| {
        if size > 8 {
            // SAFETY: the function belongs to the loaded module.
            let allowed = unsafe {
                result::function::set_function_attribute(
                    f,
                    sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_NON_PORTABLE_CLUSTER_SIZE_ALLOWED,
                    1,
                )
            };
            if allowed.is_err() {
                return false;
            }
        }
        resident_clusters(f, cluster_attribute(size), (1, size), MMA_THREADS, 0) >= 1
    };
    (2..=wanted).rev().find(|&size| functions.clone().all(|f| fits(f, size))).unwrap_or(0)
}

/// Dynamic shared memory of `lm_head_mma` holding `rows` rows of `c` in 2-byte weights with a ring
/// of `stages` weight slices, each staged row 8 halves longer than its data, and a finished tile
/// of fp32 logits, rows 8 floats longer (see the .cu file).
fn head_mma_smem(rows: usize, stages: usize, c: usize) -> usize {
    (stages * HEAD_TILE * (HEAD_SLICE + 8) + rows * (c + 8)) * 2 + rows * (HEAD_TILE + 8) * 4
}

/// The dynamic shared memory of each instance of `lm_head_mma` (`[up to 16, 32, 64 rows]`) this
/// device runs for a model of width `c`: those whose shared memory it can give one block an SM,
/// allowed that much. None for all where `c` is not a multiple of HEAD_SLICE.
fn head_mma_smem_allowed(device: &Device, c: usize) -> Result<[Option<usize>; 3]> {
    let mut out = [None; 3];
    let Some(functions) = device.kernels.lm_head_mma.filter(|_| c % HEAD_SLICE == 0) else {
        return Ok(out);
    };
    for ((((slot, f), rows), stages), groups) in
        out.iter_mut().zip(functions).zip(HEAD_MMA_ROWS).zip(HEAD_STAGES).zip(HEAD_GROUPS)
    {
        let smem = head_mma_smem(rows, stages, c);
        if smem + static_smem(f, "the LM head")? <= device.smem_optin
            && allow_dynamic_smem(f, HEAD_THREADS * groups, smem, "the LM head")?
        {
            *slot = Some(smem);
        }
    }
    Ok(out)
}

/// The launch attribute for clusters of `blocks` blocks along z.
fn cluster_attribute(blocks: usize) -> sys::CUlaunchAttribute {
    // SAFETY: a plain-old-data union; the id says which member the driver reads.
    let mut attr: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
    attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION;
    attr.value.clusterDim.x = 1;
    attr.value.clusterDim.y = 1;
    attr.value.clusterDim.z = blocks as u32;
    attr
}

/// The launch attribute for clusters of `blocks` blocks along x.
fn cluster_attribute_x(blocks: usize) -> sys::CUlaunchAttribute {
    let mut attr = cluster_attribute(1);
    attr.value.clusterDim.x = blocks as u32;
    attr
}

/// The launch attribute for programmatic dependent launch (the kernel may start before the
/// previous one ends; it must `pdl_wait` before touching that kernel's results).
fn pdl_attribute() -> sys::CUlaunchAttribute {
    // SAFETY: a plain-old-data union; the id says which member the driver reads.
    let mut attr: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
    attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
    attr.value.programmaticStreamSerializationAllowed = 1;
    attr
}

struct Shared {
    /// Rows of a prefill processed per pass: PREFILL_CHUNK, or `GPT2RT_CUDA_PREFILL_ROWS` (a
    /// tuning knob read when the engine loads).
    prefill_rows: usize,
    /// Rows up to which forward passes take the decode path: DECODE_ROWS, or another value up to
    /// GEMV_MAX_M through the environment variable `GPT2RT_CUDA_DECODE_ROWS` (a tuning knob for
    /// benchmarks and tests, read when the engine loads).
    decode_max_rows: usize,
    /// Blocks the split-K matmuls aim for: TARGET_BLOCKS, or `GPT2RT_CUDA_SPLIT_BLOCKS` (at most
    /// MAX_SPLIT_BLOCKS; it sizes the partial buffer; a tuning knob read when the engine loads).
    split_blocks: usize,
    /// The same for tensor-core products of up to MMA_SLICE64_ROWS rows: TARGET_BLOCKS_FEW, or
    /// `GPT2RT_CUDA_SPLIT_BLOCKS_FEW` (at most MAX_SPLIT_BLOCKS).
    split_blocks_few: usize,
    /// Blocks of the fused LM head: one wave (LM_HEAD_RESIDENT an SM), or
    /// `GPT2RT_CUDA_LM_HEAD_BLOCKS`; at most LM_HEAD_BLOCKS, which sizes the argmax buffer (a tuning
    /// knob read when the engine loads).
    lm_head_blocks: usize,
    /// Rows from which an LM head past the decode path without tensor cores runs as the tiled
    /// product: TILED_HEAD_ROWS, or `GPT2RT_CUDA_TILED_HEAD_ROWS` (a tuning knob read when
    /// the engine loads).
    tiled_head_rows: usize,
    /// The fused decode step (None where it cannot run), for the batch sizes it `takes`.
    fused: Option<FusedStep>,
    /// The dynamic shared memory of each of `lm_head_mma`'s instances this device runs (see
    /// `head_mma_smem_allowed`), and its blocks: one an SM, at most LM_HEAD_BLOCKS (which sizes
    /// the argmax buffer).
    head_mma: [Option<usize>; 3],
    head_mma_blocks: usize,
    device: Arc<Device>,
    weights: DeviceWeights,
    config: ModelConfig,
    dtype: DType,
}

impl Shared {
    /// The tensor-core kernel for `m` rows over `k`, and its k-slice, where the weights are
    /// f16/bf16, the GPU has it (8.0+) and K suits it.
    fn mma(&self, m: usize, k: usize) -> Option<(sys::CUfunction, usize)> {
        let kernels = &self.device.kernels;
        let (f, slice) = if m <= MMA_SLICE64_ROWS { (kernels.matmul_mma64, 64) } else { (kernels.matmul_mma, 32) };
        f.filter(|_| k % 16 == 0).map(|f| (f, slice))
    }

    /// `mma`, or with `half_rows` its instance reading rows already in the weights' type
    /// (matmul_mma_half / matmul_mma64_half) where those exist.
    fn mma_for(&self, m: usize, k: usize, half_rows: bool) -> Option<(sys::CUfunction, usize)> {
        let (f, slice) = self.mma(m, k)?;
        match self.device.kernels.matmul_mma_half {
            Some(half) if half_rows => Some((half[usize::from(slice == 64)], slice)),
            _ => Some((f, slice)),
        }
    }

    /// The cluster instance of `mma_for`'s kernel (and its slice) for `m` rows: where the cluster
    /// kernels run and `m` is in CLUSTER_ROWS (one tile of rows, past MMA_SLICE64_ROWS).
    fn mma_cluster(&self, m: usize, k: usize, half_rows: bool) -> Option<(sys::CUfunction, usize)> {
        let (fp32_rows, half) = self.device.kernels.matmul_mma_cluster?;
        let (_, slice) = self.mma(m, k).filter(|_| CLUSTER_ROWS.contains(&m) && self.device.cluster_max >= 2)?;
        if half_rows { half } else { Some(fp32_rows) }.map(|f| (f, slice))
    }

    /// The smallest instance of `lm_head_mma` holding `m` rows (with its dynamic shared memory and
    /// threads a block), where one runs.
    fn head_mma(&self, m: usize) -> Option<(sys::CUfunction, usize, usize)> {
        let i = HEAD_MMA_ROWS.iter().position(|&rows| m <= rows)?;
        Some((self.device.kernels.lm_head_mma?[i], self.head_mma[i]?, HEAD_THREADS * HEAD_GROUPS[i]))
    }

    /// The LayerNorm kernel writing fp32 rows, or with `half_rows` rows in the weights' type
    /// (layer_norm_half, where it exists).
    fn layer_norm_kernel(&self, half_rows: bool) -> sys::CUfunction {
        let kernels = &self.device.kernels;
        kernels.layer_norm_half.filter(|_| half_rows).unwrap_or(kernels.layer_norm)
    }

    /// The split-K path's block target and k-slice for `m` rows over `k`: the tensor-core kernel's
    /// slice where it runs (its products of up to MMA_SLICE64_ROWS rows aiming for
    /// `split_blocks_few`), else 16 (matmul_tiled).
    fn split_for(&self, m: usize, k: usize) -> (usize, usize) {
        match self.mma(m, k) {
            Some((_, slice)) if m <= MMA_SLICE64_ROWS => (self.split_blocks_few, slice),
            Some((_, slice)) => (self.split_blocks, slice),
            None => (self.split_blocks, 16),
        }
    }
}

impl std::fmt::Debug for CudaBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

impl CudaBackend {
    /// Uploads `model` to GPU `ordinal` in `dtype`.
    pub fn new(model: &Model, ordinal: usize, dtype: DType) -> Result<Self> {
        let device = Device::open(ordinal, dtype)?;
        let weights = upload_weights(&device, model, dtype)?;
        let decode_max_rows = knob("GPT2RT_CUDA_DECODE_ROWS")
            .unwrap_or(if device.kernels.matmul_mma.is_some() { DECODE_ROWS_MMA } else { DECODE_ROWS })
            .min(GEMV_MAX_M);
        let split_blocks = knob("GPT2RT_CUDA_SPLIT_BLOCKS").unwrap_or(TARGET_BLOCKS).clamp(1, MAX_SPLIT_BLOCKS);
        let split_blocks_few =
            knob("GPT2RT_CUDA_SPLIT_BLOCKS_FEW").unwrap_or(TARGET_BLOCKS_FEW).clamp(1, MAX_SPLIT_BLOCKS);
        let lm_head_blocks =
            knob("GPT2RT_CUDA_LM_HEAD_BLOCKS").unwrap_or(LM_HEAD_RESIDENT * device.sm_count).clamp(1, LM_HEAD_BLOCKS);
        let tiled_head_rows = knob("GPT2RT_CUDA_TILED_HEAD_ROWS").unwrap_or(TILED_HEAD_ROWS);
        let config = model.config.clone();
        let fused = fused_step(&device, model, &weights, dtype)?;
        let prefill_rows = knob("GPT2RT_CUDA_PREFILL_ROWS").unwrap_or(PREFILL_CHUNK).max(1);
        let head_mma = head_mma_smem_allowed(&device, config.n_embd)?;
        let head_mma_blocks = device.sm_count.min(LM_HEAD_BLOCKS);
        let shared = Shared {
            head_mma,
            head_mma_blocks,
            prefill_rows,
            decode_max_rows,
            split_blocks,
            split_blocks_few,
            lm_head_blocks,
            tiled_head_rows,
            fused,
            device,
            weights,
            config,
            dtype,
        };
        Ok(Self { shared: Arc::new(shared) })
    }
}

impl Backend for CudaBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Cuda
    }

    fn config(&self) -> &ModelConfig {
        &self.shared.config
    }

    fn limits(&self) -> Profile {
        Profile { max_batch: 256, max_seq: self.shared.config.n_positions }
    }

    fn describe(&self) -> String {
        let d = &self.shared.device;
        let clusters = match d.cluster_max {
            0 => String::new(),
            n => format!(
                ", products of {}-{} rows summed in clusters of up to {n} blocks",
                CLUSTER_ROWS.start(),
                CLUSTER_ROWS.end()
            ),
        };
        let head = match self.shared.head_mma.iter().rposition(Option::is_some) {
            Some(i) => format!(
                ", LM heads of up to {} rows past the decode path with their rows in shared memory",
                HEAD_MMA_ROWS[i]
            ),
            None => String::new(),
        };
        let step = match self.shared.fused.as_ref().and_then(|fs| fs.cluster.as_ref()) {
            Some(cl) => format!(
                ", batch-1 steps on {} clusters of {CL_SIZE} blocks ({} MiB more for their MLP-down weights and \
                 folded biases)",
                cl.clusters(),
                (cl.down.iter().map(|d| d.bytes).sum::<usize>() + cl.folded.bytes) >> 20
            ),
            None => String::new(),
        };
        format!(
            "cuda ({}, compute capability {}.{}, {} weights, {} MiB on the device{clusters}{head}{step})",
            d.name,
            d.capability.0,
            d.capability.1,
            self.shared.dtype,
            self.shared.weights.bytes >> 20
        )
    }

    fn new_state(&self, profile: Profile, kv_cache: bool) -> Result<Box<dyn BackendState>> {
        Ok(Box::new(CudaState::new(self.shared.clone(), profile, kv_cache)?))
    }
}

/// Kernel arguments, stored in fixed slots (no allocation per launch). Each slot is 8 bytes; the
/// driver reads the parameter's own size from the front of its slot (little-endian).
struct Args {
    slots: [u64; 32],
    n: usize,
}

impl Args {
    fn new() -> Self {
        Self { slots: [0; 32], n: 0 }
    }
    fn ptr(mut self, p: u64) -> Self {
        self.slots[self.n] = p;
        self.n += 1;
        self
    }
    fn int(mut self, v: usize) -> Self {
        self.slots[self.n] = v as i32 as u32 as u64;
        self.n += 1;
        self
    }
    fn float(mut self, v: f32) -> Self {
        self.slots[self.n] = v.to_bits() as u64;
        self.n += 1;
        self
    }
    /// The driver's parameter array: the address of each used slot (valid while `self` is).
    fn params(&mut self) -> [*mut c_void; 32] {
        let mut params = [std::ptr::null_mut::<c_void>(); 32];
        for (p, slot) in params.iter_mut().zip(self.slots.iter_mut()).take(self.n) {
            *p = (slot as *mut u64).cast();
        }
        params
    }
}

/// Split-K factor and k-range per split of the split-K path's `m x [K, N]` product: about
/// `target` blocks of 64 x 64 output tiles, each split at least 64 k and whole k-slices of `slice`
/// (32 or 64 for the tensor-core kernel, 16 for the tiled one).
fn split_k(m: usize, k: usize, n: usize, target: usize, slice: usize) -> (usize, usize) {
    let tiles = n.div_ceil(64) * m.div_ceil(64);
    k_splits(k, target.div_ceil(tiles).clamp(1, k.div_ceil(64)), slice)
}

/// Splits of `k` (at most `wanted`, at least 1) in whole k-slices of `slice`, and their k each.
fn k_splits(k: usize, wanted: usize, slice: usize) -> (usize, usize) {
    let per_split = k.div_ceil(wanted.max(1)).next_multiple_of(slice);
    (k.div_ceil(per_split), per_split)
}

/// Floats of the split-K partial sums for up to `rows` rows: the largest `splits x m x N` over the
/// model's products and every row count (`split(m, k)`: the block target and the k-slice of the
/// kernel for them).
fn partial_floats(c: usize, rows: usize, split: impl Fn(usize, usize) -> (usize, usize)) -> usize {
    let shapes = [(c, 3 * c), (c, c), (c, 4 * c), (4 * c, c)];
    let floats = |m: usize, (k, n): (usize, usize)| {
        let (target, slice) = split(m, k);
        split_k(m, k, n, target, slice).0 * m * n
    };
    (1..=rows).flat_map(|m| shapes.map(|shape| floats(m, shape))).max().unwrap_or(0)
}

/// Where a decode-path matmul's input rows come from.
enum GemvInput<'a> {
    /// Rows at this device address.
    Plain(u64),
    /// Rows at this address, LayerNorm'd (gamma, beta) in the kernel's prologue.
    Norm(u64, &'a DeviceBuffer, &'a DeviceBuffer),
    /// Rows embedded from the token ids at this address (positions: the row positions) and
    /// LayerNorm'd; the embeddings are also stored into x, the residual stream.
    EmbedNorm(u64, &'a DeviceBuffer, &'a DeviceBuffer),
    /// The attention output, combined from attention_decode's per-split partial results.
    Attention,
}

/// Device offsets (in ints) inside the session's int buffer.
struct IntLayout {
    tokens: usize,
    row_seq: usize,
    row_pos: usize,
    last_rows: usize,
    seq_len: usize,
    iota: usize,
    /// The token ids a step reads, which the greedy or sampled selection writes (so a generation
    /// step finds its tokens already there).
    next: usize,
    /// The sampling draws of a step, f32 bits.
    uniforms: usize,
    /// Host side only: two slots for the ids of the steps started ahead (`step_ahead`), then two
    /// for their sampling draws.
    ahead: usize,
    total: usize,
}

impl IntLayout {
    fn new(b: usize, s: usize) -> Self {
        let bs = b * s;
        Self {
            tokens: 0,
            row_seq: bs,
            row_pos: 2 * bs,
            last_rows: 3 * bs,
            seq_len: 3 * bs + b,
            iota: 3 * bs + 2 * b,
            next: 3 * bs + 3 * b,
            uniforms: 3 * bs + 4 * b,
            ahead: 3 * bs + 5 * b,
            total: 3 * bs + 9 * b,
        }
    }
}

struct CudaState {
    shared: Arc<Shared>,
    profile: Profile,
    kv_cache: bool,
    stream: sys::CUstream,
    ints: DeviceBuffer,
    layout: IntLayout,
    k_cache: DeviceBuffer,
    v_cache: DeviceBuffer,
    x: DeviceBuffer,
    xn: DeviceBuffer,
    qkv: DeviceBuffer,
    att: DeviceBuffer,
    /// Decode attention's per-split outputs `[b][splits][C]` and (max, sum) `[b][splits][H][2]`.
    att_part: DeviceBuffer,
    att_ml: DeviceBuffer,
    /// The fused step's attention splits (`[rows * splits][C]`, `[rows * splits][H][2]`, rows *
    /// heads * splits at most max(blocks, rows * heads)) and its grid barrier (arrivals, blocks
    /// done, launches done).
    step_part: DeviceBuffer,
    step_ml: DeviceBuffer,
    /// The cluster step's partial sums, tagged (a value's bits and its phase's tag in 8 bytes):
    /// `[CL_MAX_CLUSTERS][C]` (output projections, a row a head), then `[CL_MAX_CLUSTERS][C]` (MLP
    /// downs, a row a cluster).
    cl_part: DeviceBuffer,
    barrier: DeviceBuffer,
    /// Globaltimer stamps of the last fused step, every block's in the cluster step and block 0's
    /// in the others (`GPT2RT_CUDA_STEP_TRACE=1`, a tuning aid read when a session is made; logged
    /// at debug level when the session is dropped), and the blocks that stamp the last step
    /// enqueued.
    trace: Option<(DeviceBuffer, std::cell::Cell<usize>)>,
    hidden4: DeviceBuffer,
    partial: DeviceBuffer,
    last_hidden: DeviceBuffer,
    last_norm: DeviceBuffer,
    logits: DeviceBuffer,
    /// First stage of the device argmax: `[b][chunks]` values, then `[b][chunks]` indices.
    best: DeviceBuffer,
    /// Chunks the last LM head already reduced into `best` (fused path), or 0.
    best_chunks: std::cell::Cell<usize>,
    /// Whether the last step already chose the greedy tokens into `next` (the fused step does).
    next_ready: std::cell::Cell<bool>,
    /// Whether the device's ids at `next` are those in `host_ints` at the same offset (the last
    /// selection's, read back), so a step given them needs no upload.
    next_known: bool,
    host_ints: PinnedBuffer<i32>,
    host_logits: PinnedBuffer<f32>,
    /// Tokens of every sequence so far (`[seq][pos]`), for the recompute path.
    history: History,
    /// One captured step per batch size.
    graphs: Vec<(usize, sys::CUgraphExec)>,
    /// Steps started by `step_ahead` and collected so far (slot: count % 2), and the events after
    /// each slot's copy of the ids.
    ahead_started: usize,
    ahead_collected: usize,
    ahead_copied: [Event; 2],
    /// Events around forward passes when timing is on (0: the last prefill or step; 1 and 2: the
    /// steps started ahead in each slot), whether they await reading, and the device milliseconds
    /// read so far.
    timing: Option<[(sys::CUevent, sys::CUevent); 3]>,
    timing_pending: [bool; 3],
    device_ms: f64,
}

// SAFETY: the stream and graphs are owned by this state and only used through &mut self.
unsafe impl Send for CudaState {}

impl std::fmt::Debug for CudaState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CudaState {{ profile: {:?}, kv_cache: {} }}", self.profile, self.kv_cache)
    }
}

impl CudaState {
    fn new(shared: Arc<Shared>, profile: Profile, kv_cache: bool) -> Result<Self> {
        let d = &shared.device;
        let cfg = &shared.config;
        let (b, s, c, v) = (profile.max_batch, profile.max_seq, cfg.n_embd, cfg.vocab_size);
        let rows = b.max(shared.prefill_rows.min(b * s));
        let f = std::mem::size_of::<f32>();
        let layout = IntLayout::new(b, s);
        // The KV cache holds the weights' type (f32, f16 or bf16).
        let kv_bytes = cfg.n_layer * b * s * c * shared.dtype.size();
        let step_items = shared.fused.as_ref().map_or(0, |fs| fs.blocks.max(FUSED_WIDE_ROWS * cfg.n_head));
        d.bind()?;
        let stream =
            result::stream::create(result::stream::StreamKind::NonBlocking).check("cuda: creating a stream")?;
        let state = Self {
            ints: DeviceBuffer::new(d, layout.total * 4, "token and position buffers")?,
            k_cache: DeviceBuffer::new(d, kv_bytes, "KV cache")?,
            v_cache: DeviceBuffer::new(d, kv_bytes, "KV cache")?,
            x: DeviceBuffer::new(d, rows * c * f, "activations")?,
            xn: DeviceBuffer::new(d, rows * c * f, "activations")?,
            qkv: DeviceBuffer::new(d, rows * 3 * c * f, "activations")?,
            att: DeviceBuffer::new(d, rows * c * f, "activations")?,
            // Decode-path rows: up to GEMV_MAX_M, from steps or short prefills.
            att_part: DeviceBuffer::new(d, rows.min(GEMV_MAX_M) * s.div_ceil(ATTENTION_SPLIT) * c * f, "attention")?,
            att_ml: DeviceBuffer::new(
                d,
                rows.min(GEMV_MAX_M) * s.div_ceil(ATTENTION_SPLIT) * cfg.n_head * 2 * f,
                "attention",
            )?,
            step_part: DeviceBuffer::new(d, step_items * cfg.head_dim() * f, "attention")?,
            step_ml: DeviceBuffer::new(d, step_items * 2 * f, "attention")?,
            // The cluster step's partial sums: the heads' output projections, then the clusters'
            // MLP downs, CL_MAX_CLUSTERS rows each, zeros where no head or cluster writes (the
            // kernel adds every row; a zero word is the value 0 with tag 0, which no phase awaits).
            cl_part: DeviceBuffer::upload(
                d,
                &vec![
                    0u64;
                    shared.fused.as_ref().and_then(|fs| fs.cluster.as_ref()).map_or(1, |_| 2 * CL_MAX_CLUSTERS * c)
                ],
                "activations",
            )?,
            // Arrivals, blocks done, launches done (the cluster step's tags).
            barrier: DeviceBuffer::upload(d, &[0u32; 3], "grid barrier")?,
            trace: if knob("GPT2RT_CUDA_STEP_TRACE") == Some(1) {
                let n = trace_stamps(cfg.n_layer) * TRACE_BLOCKS;
                Some((DeviceBuffer::upload(d, &vec![0u64; n], "trace")?, std::cell::Cell::new(0)))
            } else {
                None
            },
            hidden4: DeviceBuffer::new(d, rows * 4 * c * f, "activations")?,
            partial: DeviceBuffer::new(
                d,
                partial_floats(c, rows, |m, k| shared.split_for(m, k)) * f,
                "matmul partial sums",
            )?,
            last_hidden: DeviceBuffer::new(d, b * c * f, "activations")?,
            last_norm: DeviceBuffer::new(d, b * c * f, "activations")?,
            logits: DeviceBuffer::new(d, b * v * f, "logits")?,
            best: DeviceBuffer::new(d, 2 * b * LM_HEAD_BLOCKS.max(v.div_ceil(ARGMAX_CHUNK)) * f, "argmax")?,
            best_chunks: std::cell::Cell::new(0),
            next_ready: std::cell::Cell::new(false),
            next_known: false,
            host_ints: PinnedBuffer::new(d, layout.total)?,
            host_logits: PinnedBuffer::new(d, b * v)?,
            history: History::new(profile),
            graphs: Vec::new(),
            ahead_started: 0,
            ahead_collected: 0,
            ahead_copied: [Event::new(d)?, Event::new(d)?],
            timing: None,
            timing_pending: [false; 3],
            device_ms: 0.0,
            layout,
            stream,
            shared,
            profile,
            kv_cache,
        };
        // The identity row->sequence map used by steps.
        let mut state = state;
        let iota = state.layout.iota;
        for i in 0..b {
            state.host_ints.as_mut_slice()[iota + i] = i as i32;
        }
        state.upload_ints(iota, b)?;
        state.sync()?;
        Ok(state)
    }

    fn launch(&self, f: sys::CUfunction, grid: usize, block: usize, smem: usize, args: Args) -> Result<()> {
        self.launch_grid(f, (grid, 1, 1), block, smem, args)
    }

    /// Launches a kernel that calls `pdl_wait` before touching anything the previous kernel
    /// writes, with programmatic dependent launch where the GPU has it (9.0+): it may start, and
    /// stream its weights, while the previous kernel finishes. Elsewhere a plain launch.
    fn launch_overlapped(&self, f: sys::CUfunction, grid: usize, block: usize, smem: usize, args: Args) -> Result<()> {
        self.launch_overlapped_grid(f, (grid, 1, 1), block, smem, args)
    }

    fn launch_overlapped_grid(
        &self,
        f: sys::CUfunction,
        grid: (usize, usize, usize),
        block: usize,
        smem: usize,
        args: Args,
    ) -> Result<()> {
        if !self.shared.device.pdl {
            return self.launch_grid(f, grid, block, smem, args);
        }
        // SAFETY: the kernel waits (griddepcontrol.wait) before reading or writing anything an
        // earlier kernel touches.
        unsafe { self.launch_with(f, grid, block, smem, args, &mut [pdl_attribute()]) }
    }

    /// Launches a cluster kernel (9.0+) with clusters of `cluster` blocks along z, overlapped as
    /// `launch_overlapped_grid` where the GPU has programmatic dependent launch.
    fn launch_cluster(
        &self,
        f: sys::CUfunction,
        grid: (usize, usize, usize),
        cluster: usize,
        block: usize,
        args: Args,
    ) -> Result<()> {
        let mut attrs = [cluster_attribute(cluster), pdl_attribute()];
        let n = if self.shared.device.pdl { 2 } else { 1 };
        // SAFETY: grid.2 is a multiple of the cluster (the caller launches one cluster a tile), the
        // device's cluster_max says clusters of this size fit, and the kernel waits
        // (griddepcontrol.wait) before touching anything an earlier kernel writes.
        unsafe { self.launch_with(f, grid, block, 0, args, &mut attrs[..n]) }
    }

    /// Launches a kernel cooperatively in clusters of `cluster` blocks along x (9.0+): every block
    /// resident at once, as its grid-wide waits need (the cluster step's blocks poll for each
    /// other's partial sums), and each cluster's blocks on one GPC.
    fn launch_cooperative_clusters(
        &self,
        f: sys::CUfunction,
        grid: usize,
        cluster: usize,
        block: usize,
        smem: usize,
        args: Args,
    ) -> Result<()> {
        // SAFETY: a plain-old-data union; the id says which member the driver reads.
        let mut cooperative: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
        cooperative.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_COOPERATIVE;
        cooperative.value.cooperative = 1;
        // SAFETY: grid is a multiple of the cluster, and cluster_step found that many clusters
        // resident at once with this block and shared memory.
        unsafe {
            self.launch_with(f, (grid, 1, 1), block, smem, args, &mut [cluster_attribute_x(cluster), cooperative])
        }
    }

    /// Launches a kernel cooperatively: the driver starts it only with every block resident at
    /// once, which its grid-wide barriers need.
    fn launch_cooperative(&self, f: sys::CUfunction, grid: usize, block: usize, smem: usize, args: Args) -> Result<()> {
        // SAFETY: a plain-old-data union; the id says which member the driver reads.
        let mut attr: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
        attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_COOPERATIVE;
        attr.value.cooperative = 1;
        // SAFETY: the launch has no other requirement.
        unsafe { self.launch_with(f, (grid, 1, 1), block, smem, args, &mut [attr]) }
    }

    /// cuLaunchKernelEx with launch attributes.
    ///
    /// # Safety
    /// As launch_grid, and whatever `attrs` require of the kernel.
    unsafe fn launch_with(
        &self,
        f: sys::CUfunction,
        grid: (usize, usize, usize),
        block: usize,
        smem: usize,
        mut args: Args,
        attrs: &mut [sys::CUlaunchAttribute],
    ) -> Result<()> {
        let mut params = args.params();
        let config = sys::CUlaunchConfig {
            gridDimX: grid.0 as u32,
            gridDimY: grid.1 as u32,
            gridDimZ: grid.2 as u32,
            blockDimX: block as u32,
            blockDimY: 1,
            blockDimZ: 1,
            sharedMemBytes: smem as u32,
            hStream: self.stream,
            attrs: attrs.as_mut_ptr(),
            numAttrs: attrs.len() as u32,
        };
        // SAFETY: as launch_grid; the caller vouches for the attributes.
        unsafe { sys::cuLaunchKernelEx(&config, f, params.as_mut_ptr(), std::ptr::null_mut()) }
            .result()
            .check("cuda: launching a kernel")
    }

    fn launch_grid(
        &self,
        f: sys::CUfunction,
        grid: (usize, usize, usize),
        block: usize,
        smem: usize,
        mut args: Args,
    ) -> Result<()> {
        let mut params = args.params();
        // SAFETY: the arguments match the kernel's signature (each call site mirrors the .cu file)
        // and every pointer is a live device buffer of this state or its engine.
        unsafe {
            result::launch_kernel(
                f,
                (grid.0 as u32, grid.1 as u32, grid.2 as u32),
                (block as u32, 1, 1),
                smem as u32,
                self.stream,
                &mut params[..args.n],
            )
        }
        .check("cuda: launching a kernel")
    }

    fn upload_ints(&self, offset: usize, len: usize) -> Result<()> {
        self.upload_ints_from(offset, offset, len, "cuda: copying tokens to the device")
    }

    /// Enqueues the copy of the `len` pinned ints at `host_at` to the device's ints at `device_at`.
    fn upload_ints_from(&self, host_at: usize, device_at: usize, len: usize, what: &str) -> Result<()> {
        let _range = nvtx::range(nvtx::H2D_TOKENS);
        // SAFETY: the pinned source outlives the copy and is not written again before the stream
        // has run it (synchronised before reuse, or a slot of its own); the ranges are in bounds
        // of both buffers.
        unsafe {
            result::memcpy_htod_async(
                self.ints.at::<i32>(device_at),
                &self.host_ints.as_slice()[host_at..host_at + len],
                self.stream,
            )
        }
        .check(what)
    }

    fn sync(&mut self) -> Result<()> {
        // SAFETY: the stream belongs to this state.
        unsafe { result::stream::synchronize(self.stream) }.check("cuda: running the step")?;
        for i in 0..3 {
            self.read_timer(i)?;
        }
        Ok(())
    }

    /// Adds timer `i`'s forward pass to the device time, if it awaits reading and has run.
    fn read_timer(&mut self, i: usize) -> Result<()> {
        if let (Some(pairs), true) = (self.timing, self.timing_pending[i]) {
            let (start, end) = pairs[i];
            // SAFETY: both events were recorded on this stream, and the pass has finished.
            self.device_ms += f64::from(unsafe { result::event::elapsed(start, end) }.check("cuda: reading a timer")?);
            self.timing_pending[i] = false;
        }
        Ok(())
    }

    /// Records the start (or the end) of a timed forward pass, when timing is on (timer 0).
    fn mark(&mut self, end: bool) -> Result<()> {
        self.mark_timer(0, end)
    }

    fn mark_timer(&mut self, i: usize, end: bool) -> Result<()> {
        if let Some(pairs) = self.timing {
            let event = if end { pairs[i].1 } else { pairs[i].0 };
            // SAFETY: the event and the stream belong to this state.
            unsafe { result::event::record(event, self.stream) }.check("cuda: recording a timer")?;
            self.timing_pending[i] = end;
        }
        Ok(())
    }

    /// `out[M, N] = in[M, K] @ w + bias` (w stored `[N, K]`), then `mode` (see matmul_finish in the
    /// .cu file): the split-K path for row counts past the decode path, on tensor cores
    /// (matmul_mma) in the half modes where the GPU has them, else the CUDA-core tiled kernel.
    /// `half_input`: the rows are in the weights' type (see `half_rows`), else fp32; `half_output`
    /// (GELU only): the outputs are stored in the weights' type, for the next product to read as
    /// they are (rounded as it would round them).
    #[allow(clippy::too_many_arguments)]
    fn matmul(
        &self,
        input: u64,
        m: usize,
        k: usize,
        w: &DeviceBuffer,
        n: usize,
        bias: &DeviceBuffer,
        out: u64,
        mode: usize,
        kv: Option<(u64, u64, u64, u64)>,
        half_input: bool,
        half_output: bool,
    ) -> Result<()> {
        let kernels = &self.shared.device.kernels;
        if let Some((f, slice)) = self.shared.mma_cluster(m, k, half_input) {
            // The split-K path's splits, at most cluster_max of them (proj and MLP down at 64
            // rows would take 24 and 32), summed inside a cluster, one a tile.
            let (target, _) = self.shared.split_for(m, k);
            let (wanted, _) = split_k(m, k, n, target, slice);
            let (splits, per_split) = k_splits(k, wanted.min(self.shared.device.cluster_max), slice);
            let (kc, vc, rs, rp) = kv.unwrap_or((0, 0, 0, 0));
            let args = Args::new()
                .ptr(input)
                .int(m)
                .int(k)
                .ptr(w.ptr)
                .int(n)
                .int(per_split)
                .ptr(bias.ptr)
                .ptr(out)
                .int(usize::from(half_output))
                .int(mode)
                .ptr(kc)
                .ptr(vc)
                .ptr(rs)
                .ptr(rp)
                .int(self.profile.max_seq);
            return self.launch_cluster(f, (n.div_ceil(64), 1, splits), splits, MMA_THREADS, args);
        }
        let (f, threads) =
            self.shared.mma_for(m, k, half_input).map_or((kernels.matmul_tiled, 256), |(f, _)| (f, MMA_THREADS));
        // The target and slice partial_floats sized the partial buffer with (mma_for's kernel has
        // split_for's slice).
        let (target, slice) = self.shared.split_for(m, k);
        let (splits, per_split) = split_k(m, k, n, target, slice);
        let args = Args::new().ptr(input).int(m).int(k).ptr(w.ptr).int(n).ptr(self.partial.ptr).int(per_split);
        self.launch_overlapped_grid(f, (n.div_ceil(64), m.div_ceil(64), splits), threads, 0, args)?;
        let (kc, vc, rs, rp) = kv.unwrap_or((0, 0, 0, 0));
        let args = Args::new()
            .ptr(self.partial.ptr)
            .int(splits)
            .int(m)
            .int(n)
            .ptr(bias.ptr)
            .ptr(out)
            .int(mode)
            .ptr(kc)
            .ptr(vc)
            .ptr(rs)
            .ptr(rp)
            .int(self.profile.max_seq);
        // One thread an output from 64 rows; H100, f16, E2E ms, that vs warps sharing the splits:
        // batch 64 prompt 128 + 128 tokens 103.9 vs 110.2 (it finishes every step's products too),
        // batch 16 with 8 tokens 3.54 vs 3.32 (16-row steps). Prefill + one token at batch 64
        // prompt 128 (1024-row passes): 17.9 vs 26.5.
        let [finish, finish_rows] = if half_output {
            kernels.matmul_finish_half.expect("half rows have their finishing kernels")
        } else {
            [kernels.matmul_finish, kernels.matmul_finish_rows]
        };
        debug_assert!(!half_output || mode == 1, "only the GELU output is stored in the weights' type");
        if m >= GEMV_MAX_M {
            self.launch_overlapped_grid(finish_rows, ((m * n).div_ceil(256), 1, 1), 256, 0, args)
        } else {
            self.launch_overlapped_grid(finish, (n.div_ceil(32), m, 1), 256, 0, args)
        }
    }

    /// Blocks the decode attention spreads one (row, head) over: enough for max_seq.
    fn attention_splits(&self) -> usize {
        self.profile.max_seq.div_ceil(ATTENTION_SPLIT)
    }

    /// The fused decode step, where it serves a step of `b` sequences.
    fn fused_step(&self, b: usize) -> Option<&FusedStep> {
        self.shared.fused.as_ref().filter(|fs| fs.takes(b))
    }

    /// The cluster step, where it serves a step of `b` sequences (one, where the fused step takes
    /// it).
    fn cluster_step(&self, b: usize) -> Option<&ClusterStep> {
        if b == 1 { self.fused_step(b)?.cluster.as_ref() } else { None }
    }

    /// First-stage argmax results a step of `b` sequences leaves in `best` (0: none).
    fn step_best_chunks(&self, b: usize) -> usize {
        if let Some(cl) = self.cluster_step(b) {
            return cl.blocks;
        }
        match self.fused_step(b) {
            Some(fs) => fs.blocks,
            None if self.decode_rows(b) => self.shared.lm_head_blocks,
            None if self.head_mma(b).is_some() => self.shared.head_mma_blocks,
            None => 0,
        }
    }

    /// Whether the LayerNorms before the tensor-core products of `m` rows (QKV, MLP up, the LM head)
    /// write their rows in the weights' type (layer_norm_half, then matmul_mma_half: the same
    /// rounding matmul_mma does on the way in, so the same results, with half the bytes for every
    /// column tile to read): where those kernels exist and the products of `m` rows run on tensor
    /// cores.
    fn half_rows(&self, m: usize) -> bool {
        let k = &self.shared.device.kernels;
        !self.decode_rows(m)
            && self.shared.mma(m, self.shared.config.n_embd).is_some()
            && k.layer_norm_half.is_some()
            && k.matmul_mma_half.is_some()
    }

    /// `lm_head_mma` for an LM head of `m` rows, where it serves them: rows past the decode path,
    /// normalised into the weights' type.
    fn head_mma(&self, m: usize) -> Option<(sys::CUfunction, usize, usize)> {
        self.half_rows(m).then(|| self.shared.head_mma(m)).flatten()
    }

    /// Whether `m` rows take the decode path (see `forward_rows`).
    fn decode_rows(&self, m: usize) -> bool {
        m <= self.shared.decode_max_rows
    }

    /// Whether the decode path's prologues (LayerNorm, embedding, attention combination) run
    /// inside the matmuls for `m` rows: rows on the decode path, one group of them, whose copies
    /// fit the shared memory. (Rows past the decode path get separate embedding and LayerNorm
    /// kernels even when there are few: with tensor cores the decode path ends at 1 row.)
    fn fused_prologue(&self, m: usize) -> bool {
        self.decode_rows(m) && m <= GEMV_MAX_ROWS && m * self.shared.config.n_embd * 4 <= DEFAULT_SMEM
    }

    /// One decode-path matmul (see `gemv` and `gemv_cols` in the .cu file): `m <= GEMV_MAX_M` rows,
    /// one output column a warp (or GEMV_COLS for 2..=GEMV_MAX_ROWS rows), the input prologue
    /// `input` and the epilogue `mode` fused.
    #[allow(clippy::too_many_arguments)]
    fn gemv(
        &self,
        input: GemvInput<'_>,
        m: usize,
        k: usize,
        w: &DeviceBuffer,
        n: usize,
        bias: &DeviceBuffer,
        out: u64,
        mode: usize,
        kv: (u64, u64, u64, u64),
    ) -> Result<()> {
        let kernels = &self.shared.device.kernels;
        let eps = self.shared.config.layer_norm_epsilon;
        let (kc, vc, row_seq, row_pos) = kv;
        let wt = &self.shared.weights;
        let (f, x, tokens, g, b, smem, which) = match input {
            GemvInput::Plain(x) => (kernels.gemv_plain, x, 0, 0, 0, 0, 0),
            GemvInput::Norm(x, g, b) => (kernels.gemv_ln, x, 0, g.ptr, b.ptr, m * k * 4, 1),
            GemvInput::EmbedNorm(tokens, g, b) => (kernels.gemv_embed_ln, 0, tokens, g.ptr, b.ptr, m * k * 4, 2),
            GemvInput::Attention => (kernels.gemv_attn, self.att_part.ptr, 0, 0, 0, m * k * 4, 3),
        };
        let args = Args::new()
            .ptr(x)
            .ptr(tokens)
            .ptr(row_pos)
            .ptr(wt.wte.ptr)
            .ptr(wt.wpe.ptr)
            .ptr(self.x.ptr)
            .ptr(g)
            .ptr(b)
            .float(eps)
            .int(m)
            .int(k)
            .ptr(w.ptr)
            .int(n)
            .ptr(bias.ptr)
            .ptr(out)
            .int(mode)
            .ptr(kc)
            .ptr(vc)
            .ptr(row_seq)
            .int(self.profile.max_seq)
            .ptr(self.att_ml.ptr)
            .int(self.attention_splits())
            .int(self.shared.config.n_head);
        // Warps per output column: enough that each streams about one chunk (4 x 16 bytes per lane).
        let vector = 16 / self.shared.dtype.size();
        let chunk = 32 * 4 * vector;
        let wpc = k.div_ceil(chunk).next_power_of_two().min(GEMV_THREADS / 32);
        let columns_per_block = GEMV_THREADS / 32 / wpc;
        // Several rows: GEMV_COLS columns a warp, where its share of each row is one chunk.
        if (2..=GEMV_MAX_ROWS).contains(&m) && k % vector == 0 && k.div_ceil(wpc).next_multiple_of(vector) <= chunk {
            let blocks = n.div_ceil(columns_per_block * GEMV_COLS);
            return self.launch_overlapped(kernels.gemv_cols[which], blocks, GEMV_THREADS, smem, args.int(wpc));
        }
        self.launch_overlapped(f, n.div_ceil(columns_per_block), GEMV_THREADS, smem, args.int(wpc))
    }

    /// Runs `n` rows through every block: tokens, sequence and position of row i at
    /// `tokens[i]`, `row_seq[i]`, `row_pos[i]` (device addresses). Leaves the hidden states in x.
    ///
    /// Rows up to `decode_rows` (DECODE_ROWS, or DECODE_ROWS_MMA where the tensor-core product
    /// runs; a knob takes it up to GEMV_MAX_M) take the decode path: five kernels a layer (QKV with
    /// LayerNorm and the KV append, attention split across blocks, output projection with the
    /// splits' combination and the residual, MLP up with LayerNorm and GELU, MLP down with the
    /// residual), weights streamed once whatever the row count. Beyond GEMV_ROWS rows the
    /// LayerNorms and the attention combination run as kernels of their own (their rows no longer
    /// fit shared memory). More rows take the split-K products (tensor cores in the half modes)
    /// after LayerNorm kernels; their attention is split across blocks as well up to GEMV_MAX_M
    /// rows (every step of a batch up to 64, short prefills); beyond, one block a (row, head), or,
    /// when `long_rows` (prefills of long prompts: runs of rows of one sequence), a block a tile
    /// of rows and head with the keys staged once for the tile (attention_tiled), or else, when
    /// `short_rows` (prefills whose every sequence is at most SHORT_ATTENTION_LEN long), a warp a
    /// (row, head) (attention_short).
    #[allow(clippy::too_many_arguments)]
    fn forward_rows(
        &self,
        tokens: u64,
        row_seq: u64,
        row_pos: u64,
        n: usize,
        long_rows: bool,
        short_rows: bool,
    ) -> Result<()> {
        let cfg = &self.shared.config;
        let k = &self.shared.device.kernels;
        let w = &self.shared.weights;
        let (c, s) = (cfg.n_embd, self.profile.max_seq);
        let f = std::mem::size_of::<f32>();
        let eps = cfg.layer_norm_epsilon;
        let decode = self.decode_rows(n);
        let fused_ln = self.fused_prologue(n);
        if !fused_ln {
            self.launch_overlapped(
                k.embed,
                n,
                256,
                0,
                Args::new().ptr(tokens).ptr(row_pos).ptr(w.wte.ptr).ptr(w.wpe.ptr).ptr(self.x.ptr).int(c),
            )?;
        }
        let layer_stride = self.profile.max_batch * s * c;
        let smem = (s.max(ATTENTION_THREADS) + cfg.head_dim()) * f;
        let scale = 1.0 / (cfg.head_dim() as f32).sqrt();
        // On tensor cores the LayerNorms write the rows in the weights' type (see half_rows).
        let half = self.half_rows(n);
        let ln_kernel = self.shared.layer_norm_kernel(half);
        let ln = |input: u64, g: &DeviceBuffer, b: &DeviceBuffer, out: u64| {
            self.launch_overlapped(
                ln_kernel,
                n,
                256,
                0,
                Args::new().ptr(input).ptr(g.ptr).ptr(b.ptr).ptr(out).int(c).float(eps),
            )
        };
        for (l, lw) in w.layers.iter().enumerate() {
            let kv_at = (l * layer_stride * self.shared.dtype.size()) as u64;
            let (kc, vc) = (self.k_cache.ptr + kv_at, self.v_cache.ptr + kv_at);
            let kv = (kc, vc, row_seq, row_pos);
            if decode {
                let none = (0, 0, row_seq, row_pos);
                let (x, h4) = (self.x.ptr, self.hidden4.ptr);
                let input = self.normed(n, fused_ln, (l == 0).then_some(tokens), &lw.ln_1_weight, &lw.ln_1_bias)?;
                self.gemv(input, n, c, &lw.attn_weight, 3 * c, &lw.attn_bias, self.qkv.ptr, 3, kv)?;
                self.attention_split(n, kc, vc, row_seq, row_pos, !fused_ln, false)?;
                let attended = if fused_ln { GemvInput::Attention } else { GemvInput::Plain(self.att.ptr) };
                self.gemv(attended, n, c, &lw.attn_proj_weight, c, &lw.attn_proj_bias, x, 2, none)?;
                let input = self.normed(n, fused_ln, None, &lw.ln_2_weight, &lw.ln_2_bias)?;
                self.gemv(input, n, c, &lw.fc_weight, 4 * c, &lw.fc_bias, h4, 1, none)?;
                self.gemv(GemvInput::Plain(h4), n, 4 * c, &lw.mlp_proj_weight, c, &lw.mlp_proj_bias, x, 2, none)?;
                continue;
            }
            ln(self.x.ptr, &lw.ln_1_weight, &lw.ln_1_bias, self.xn.ptr)?;
            let (xn, qkv) = (self.xn.ptr, self.qkv.ptr);
            self.matmul(xn, n, c, &lw.attn_weight, 3 * c, &lw.attn_bias, qkv, 3, Some(kv), half, false)?;
            if n <= GEMV_MAX_M {
                // The split attention's warps keep more of the keys' loads in flight than one
                // block a (row, head) does: H100, f16 batch 64, prompt 128 + 128 tokens, 165.0 ->
                // 145.8 ms; batch 8 with 32 tokens 11.07 -> 10.23 ms.
                self.attention_split(n, kc, vc, row_seq, row_pos, true, half)?;
            } else if let Some(f) = k.attention_tiled.filter(|_| {
                long_rows
                    && cfg.head_dim() == 64
                    && n.div_ceil(ATTENTION_TILE_ROWS) * cfg.n_head >= self.shared.device.sm_count
            }) {
                let args =
                    self.attention_args(kc, vc, row_seq, row_pos).int(n).ptr(self.att.ptr).int(c).int(s).float(scale);
                self.launch_overlapped_grid(f, (n.div_ceil(ATTENTION_TILE_ROWS), cfg.n_head, 1), 256, 0, args)?;
            } else if let Some(f) = k.attention_short.filter(|_| short_rows && cfg.head_dim() == 64) {
                let args = self
                    .attention_args(kc, vc, row_seq, row_pos)
                    .int(n)
                    .ptr(self.att.ptr)
                    .int(c)
                    .int(cfg.n_head)
                    .int(s)
                    .float(scale);
                self.launch_overlapped(f, (n * cfg.n_head).div_ceil(8), 256, 0, args)?;
            } else {
                self.launch_overlapped(
                    k.attention,
                    n * cfg.n_head,
                    ATTENTION_THREADS,
                    smem,
                    self.attention_args(kc, vc, row_seq, row_pos)
                        .ptr(self.att.ptr)
                        .int(c)
                        .int(cfg.n_head)
                        .int(s)
                        .float(scale),
                )?;
            }
            // With half rows the split attention's combination wrote `att` in the weights' type; the
            // longer prefills' attention kernels write fp32.
            let att_half = half && n <= GEMV_MAX_M;
            let (att, x) = (self.att.ptr, self.x.ptr);
            self.matmul(att, n, c, &lw.attn_proj_weight, c, &lw.attn_proj_bias, x, 2, None, att_half, false)?;
            ln(self.x.ptr, &lw.ln_2_weight, &lw.ln_2_bias, self.xn.ptr)?;
            // With half rows the GELU output (the MLP's hidden rows) is stored in the weights' type.
            self.matmul(xn, n, c, &lw.fc_weight, 4 * c, &lw.fc_bias, self.hidden4.ptr, 1, None, half, half)?;
            let (h4, x) = (self.hidden4.ptr, self.x.ptr);
            self.matmul(h4, n, 4 * c, &lw.mlp_proj_weight, c, &lw.mlp_proj_bias, x, 2, None, half, false)?;
        }
        Ok(())
    }

    /// The arguments every attention kernel starts with: the QKV rows, the layer's key and value
    /// caches, and each row's sequence and position.
    fn attention_args(&self, kc: u64, vc: u64, row_seq: u64, row_pos: u64) -> Args {
        Args::new().ptr(self.qkv.ptr).ptr(kc).ptr(vc).ptr(row_seq).ptr(row_pos)
    }

    /// Attention of `n` (at most GEMV_MAX_M) query rows split across blocks (attention_decode) into
    /// the per-split buffers, then, when `combine`, the splits' combination into `att` (in the
    /// weights' type with `half`, which needs attention_combine_half).
    #[allow(clippy::too_many_arguments)]
    fn attention_split(
        &self,
        n: usize,
        kc: u64,
        vc: u64,
        row_seq: u64,
        row_pos: u64,
        combine: bool,
        half: bool,
    ) -> Result<()> {
        let cfg = &self.shared.config;
        let k = &self.shared.device.kernels;
        let c = cfg.n_embd;
        let args = self
            .attention_args(kc, vc, row_seq, row_pos)
            .ptr(self.att_part.ptr)
            .ptr(self.att_ml.ptr)
            .int(c)
            .int(cfg.n_head)
            .int(self.profile.max_seq)
            .float(1.0 / (cfg.head_dim() as f32).sqrt())
            .int(ATTENTION_SPLIT);
        let grid = (self.attention_splits(), cfg.n_head, n);
        self.launch_overlapped_grid(k.attention_decode, grid, 256, 0, args)?;
        if !combine {
            return Ok(());
        }
        let args = Args::new()
            .ptr(self.att_part.ptr)
            .ptr(self.att_ml.ptr)
            .ptr(row_pos)
            .int(self.attention_splits())
            .int(c)
            .int(cfg.n_head)
            .ptr(self.att.ptr);
        let f = if half {
            k.attention_combine_half.expect("half rows have their combination")
        } else {
            k.attention_combine
        };
        // A thread a column, ATTENTION_COMBINE_THREADS a block.
        let grid = (n, c.div_ceil(ATTENTION_COMBINE_THREADS), 1);
        self.launch_overlapped_grid(f, grid, ATTENTION_COMBINE_THREADS, 0, args)
    }

    /// The decode path's LayerNorm'd input (of x, or of the embeddings of `tokens` for the first
    /// layer): in the matmul's prologue, or a kernel before it (the embeddings are then in x).
    fn normed<'a>(
        &self,
        n: usize,
        fused_ln: bool,
        tokens: Option<u64>,
        g: &'a DeviceBuffer,
        b: &'a DeviceBuffer,
    ) -> Result<GemvInput<'a>> {
        Ok(match (fused_ln, tokens) {
            (true, Some(tokens)) => GemvInput::EmbedNorm(tokens, g, b),
            (true, None) => GemvInput::Norm(self.x.ptr, g, b),
            (false, _) => {
                let c = self.shared.config.n_embd;
                let args = Args::new()
                    .ptr(self.x.ptr)
                    .ptr(g.ptr)
                    .ptr(b.ptr)
                    .ptr(self.xn.ptr)
                    .int(c)
                    .float(self.shared.config.layer_norm_epsilon);
                self.launch_overlapped(self.shared.device.kernels.layer_norm, n, 256, 0, args)?;
                GemvInput::Plain(self.xn.ptr)
            }
        })
    }

    /// Final LayerNorm and LM head over `m` hidden rows at `hidden`, into the logits. On the decode
    /// path this also leaves the first stage of the argmax in `best` and, when `advance` is given,
    /// advances those sequences' positions. Returns whether positions were advanced.
    fn head(&self, hidden: u64, m: usize, advance: Option<u64>) -> Result<bool> {
        let cfg = &self.shared.config;
        let k = &self.shared.device.kernels;
        let w = &self.shared.weights;
        let (c, v) = (cfg.n_embd, cfg.vocab_size);
        let head = w.lm_head.as_ref().unwrap_or(&w.wte);
        let fused_ln = self.fused_prologue(m);
        self.next_ready.set(false);
        // Past the decode path, on tensor cores, the rows are normalised into the weights' type
        // (each of the head's column tiles reads them all).
        let half_rows = self.half_rows(m);
        if !fused_ln {
            self.launch_overlapped(
                self.shared.layer_norm_kernel(half_rows),
                m,
                256,
                0,
                Args::new()
                    .ptr(hidden)
                    .ptr(w.ln_f_weight.ptr)
                    .ptr(w.ln_f_bias.ptr)
                    .ptr(self.last_norm.ptr)
                    .int(c)
                    .float(cfg.layer_norm_epsilon),
            )?;
        }
        if self.decode_rows(m) {
            let blocks = self.shared.lm_head_blocks;
            self.best_chunks.set(blocks);
            let (f, input, smem) =
                if fused_ln { (k.lm_head_ln, hidden, m * c * 4) } else { (k.lm_head_plain, self.last_norm.ptr, 0) };
            let args = Args::new()
                .ptr(input)
                .ptr(w.ln_f_weight.ptr)
                .ptr(w.ln_f_bias.ptr)
                .float(cfg.layer_norm_epsilon)
                .int(m)
                .ptr(head.ptr)
                .int(v)
                .int(c)
                .ptr(self.logits.ptr)
                .ptr(self.best.ptr)
                .ptr(self.best.at::<f32>(m * blocks))
                .ptr(advance.unwrap_or(0));
            self.launch_overlapped(f, blocks, 256, smem, args)?;
            return Ok(advance.is_some());
        }
        if let Some((f, smem, threads)) = self.head_mma(m) {
            // The rows stay in shared memory; the argmax's first stage is done with the logits.
            let blocks = self.shared.head_mma_blocks;
            self.best_chunks.set(blocks);
            let args = Args::new()
                .ptr(self.last_norm.ptr)
                .int(m)
                .int(c)
                .ptr(head.ptr)
                .int(v)
                .ptr(self.logits.ptr)
                .ptr(self.best.ptr)
                .ptr(self.best.at::<f32>(m * blocks));
            self.launch_overlapped(f, blocks, threads, smem, args)?;
            return Ok(false);
        }
        self.best_chunks.set(0);
        // The tensor-core product, or from tiled_head_rows rows the tiled one, with one split: the
        // product lands in the logits directly.
        let one_split = match self.shared.mma_for(m, c, half_rows) {
            Some((f, _)) => Some((f, MMA_THREADS)),
            None if m >= self.shared.tiled_head_rows && c % 16 == 0 => Some((k.matmul_tiled, 256)),
            None => None,
        };
        if let Some((f, threads)) = one_split {
            let args =
                Args::new().ptr(self.last_norm.ptr).int(m).int(c).ptr(head.ptr).int(v).ptr(self.logits.ptr).int(c);
            self.launch_overlapped_grid(f, (v.div_ceil(64), m.div_ceil(64), 1), threads, 0, args)?;
            return Ok(false);
        }
        self.launch_overlapped(
            k.lm_head,
            (v * 32).div_ceil(256),
            256,
            0,
            Args::new().ptr(self.last_norm.ptr).int(m).ptr(head.ptr).int(v).int(c).ptr(self.logits.ptr),
        )?;
        Ok(false)
    }

    /// Runs whole sequences from `self.history` (prefill, and every step of the recompute path).
    fn run_history(&mut self) -> Result<()> {
        let lay = &self.layout;
        let (t_off, rs_off, rp_off, lr_off, sl_off) =
            (lay.tokens, lay.row_seq, lay.row_pos, lay.last_rows, lay.seq_len);
        let (mut total, mut longest) = (0, 0);
        let host = self.host_ints.as_mut_slice();
        for seq in 0..self.history.batch() {
            let len = self.history.len(seq);
            longest = longest.max(len);
            for p in 0..len {
                host[t_off + total] = self.history.token(seq, p) as i32;
                host[rs_off + total] = seq as i32;
                host[rp_off + total] = p as i32;
                total += 1;
            }
            host[lr_off + seq] = (total - 1) as i32;
            host[sl_off + seq] = len as i32;
        }
        for (offset, len) in [
            (t_off, total),
            (rs_off, total),
            (rp_off, total),
            (lr_off, self.history.batch()),
            (sl_off, self.history.batch()),
        ] {
            self.upload_ints(offset, len)?;
        }
        self.mark(false)?;
        let long_rows = total >= TILED_ATTENTION_LEN * self.history.batch();
        let short_rows = longest <= SHORT_ATTENTION_LEN;
        let c = self.shared.config.n_embd;
        let k = &self.shared.device.kernels;
        let mut start = 0;
        while start < total {
            let n = self.shared.prefill_rows.min(total - start);
            self.forward_rows(
                self.ints.at::<i32>(t_off + start),
                self.ints.at::<i32>(rs_off + start),
                self.ints.at::<i32>(rp_off + start),
                n,
                long_rows,
                short_rows,
            )?;
            self.launch_overlapped(
                k.gather_rows,
                self.history.batch(),
                256,
                0,
                Args::new()
                    .ptr(self.x.ptr)
                    .ptr(self.ints.at::<i32>(lr_off))
                    .int(start)
                    .int(n)
                    .ptr(self.last_hidden.ptr)
                    .int(c),
            )?;
            start += n;
        }
        self.head(self.last_hidden.ptr, self.history.batch(), None)?;
        self.mark(true)?;
        self.sync()
    }

    /// One KV-cache step for the current batch, on the stream (captured into a graph).
    fn enqueue_step(&self) -> Result<()> {
        let b = self.history.batch();
        let lay = &self.layout;
        if let (Some(cl), Some(f)) = (self.cluster_step(b), self.shared.device.kernels.decode_step_cl) {
            let cfg = &self.shared.config;
            let fs = self.fused_step(b).expect("the cluster step is part of the fused step");
            let c = cfg.n_embd;
            let args = Args::new()
                .ptr(cl.table.ptr)
                .int(cfg.n_layer)
                .int(c)
                .int(cfg.n_head)
                .int(cfg.vocab_size)
                .float(cfg.layer_norm_epsilon)
                .ptr(self.ints.at::<i32>(lay.next))
                .ptr(self.ints.at::<i32>(lay.iota))
                .ptr(self.ints.at::<i32>(lay.seq_len))
                .ptr(self.cl_part.ptr)
                .ptr(self.cl_part.at::<u64>(CL_MAX_CLUSTERS * c))
                .ptr(self.k_cache.ptr)
                .ptr(self.v_cache.ptr)
                .int(self.profile.max_seq)
                .ptr((self.profile.max_batch * self.profile.max_seq * c) as u64)
                .ptr(self.logits.ptr)
                .ptr(self.best.ptr)
                .ptr(self.best.at::<f32>(cl.blocks))
                .ptr(self.barrier.ptr)
                .ptr(self.ints.at::<i32>(lay.next))
                .int(cl.hidden)
                .int(fs.head_keep_rows)
                .ptr(self.traced(cl.blocks));
            let threads = step_threads(self.shared.dtype);
            return self.launch_cooperative_clusters(f, cl.blocks, CL_SIZE, threads, cl.smem, args);
        }
        if let Some(fs) = self.fused_step(b) {
            let cfg = &self.shared.config;
            let kernel = fs.kernel(b);
            let mma = b >= fs.mma_rows;
            let (dtype, wsize) = (self.shared.dtype, self.shared.dtype.size());
            // The MLP-down rows, staged in shared memory where they fit: in fp32, or in the
            // weights' type in the wide kernel on tensor cores (decode_step's half_h4).
            let h4_value = if mma && kernel.wide { wsize } else { 4 };
            let smem_for = |h4_size| fused_step_smem(cfg, fs.blocks, dtype, b, h4_size, kernel.kernel_rows);
            let stage = smem_for(h4_value) <= kernel.smem_limit;
            let args = Args::new()
                .ptr(fs.table.ptr)
                .int(cfg.n_layer)
                .int(cfg.n_embd)
                .int(cfg.n_head)
                .int(cfg.vocab_size)
                .float(cfg.layer_norm_epsilon)
                .int(b)
                .ptr(self.ints.at::<i32>(lay.next))
                .ptr(self.ints.at::<i32>(lay.iota))
                .ptr(self.ints.at::<i32>(lay.seq_len))
                .ptr(self.x.ptr)
                .ptr(self.qkv.ptr)
                .ptr(self.hidden4.ptr)
                .ptr(self.step_part.ptr)
                .ptr(self.step_ml.ptr)
                .ptr(self.k_cache.ptr)
                .ptr(self.v_cache.ptr)
                .int(self.profile.max_seq)
                .ptr((self.profile.max_batch * self.profile.max_seq * cfg.n_embd) as u64)
                .ptr(self.logits.ptr)
                .ptr(self.best.ptr)
                .ptr(self.best.at::<f32>(b * fs.blocks))
                .ptr(self.barrier.ptr)
                .ptr(self.ints.at::<i32>(lay.next))
                .int(usize::from(stage) | if mma { STEP_MMA } else { 0 })
                .int(fs.head_keep_rows)
                .ptr(self.traced(1));
            let mut smem = smem_for(if stage { h4_value } else { 0 });
            let staged =
                if fs.stage_splits { step_stage_bytes(cfg, dtype, fs.blocks, b, self.profile.max_seq) } else { 0 };
            if staged > 0 && smem.next_multiple_of(16) + staged <= kernel.smem_limit {
                smem = smem.next_multiple_of(16) + staged;
            }
            let k = &self.shared.device.kernels;
            let f = if kernel.wide { k.decode_step_wide } else { k.decode_step };
            let f = f.expect("a fused step has its kernels");
            return self.launch_cooperative(f, fs.blocks, step_threads(dtype), smem, args);
        }
        self.forward_rows(
            self.ints.at::<i32>(lay.next),
            self.ints.at::<i32>(lay.iota),
            self.ints.at::<i32>(lay.seq_len),
            b,
            false,
            false,
        )?;
        let seq_len = self.ints.at::<i32>(lay.seq_len);
        if self.head(self.x.ptr, b, Some(seq_len))? {
            return Ok(());
        }
        self.launch(
            self.shared.device.kernels.advance,
            1,
            256.max(b.next_power_of_two()),
            0,
            Args::new().ptr(seq_len).int(b),
        )
    }

    /// Enqueues the sampled choice of the batch's `b` next ids into `next`: the draws come from the
    /// host sampler's per-sequence streams, so a seed gives the same tokens as on the CPU backend,
    /// staged at `host_at` in the pinned ints and copied to the device's draws; the rules run in
    /// `sample_rows`. False (nothing enqueued) when the rules are greedy: they draw nothing.
    fn choose_sampled(&mut self, sampler: &mut Sampler, b: usize, host_at: usize) -> Result<bool> {
        let params = *sampler.params();
        let v = self.shared.config.vocab_size;
        let mut draws = 0;
        for i in 0..b {
            let Some(u) = sampler.draw(i) else { break };
            self.host_ints.as_mut_slice()[host_at + i] = u.to_bits() as i32;
            draws += 1;
        }
        if draws != b || b == 0 {
            return Ok(false);
        }
        let uniforms = self.layout.uniforms;
        self.upload_ints_from(host_at, uniforms, b, "cuda: copying sampling draws to the device")?;
        let top_k = if params.top_k < v { params.top_k } else { 0 };
        let args = Args::new()
            .ptr(self.logits.ptr)
            .int(v)
            .ptr(self.ints.at::<i32>(uniforms))
            .float(1.0 / params.temperature)
            .int(top_k)
            .float(params.top_p)
            .ptr(self.ints.at::<i32>(self.layout.next));
        self.launch(self.shared.device.kernels.sample_rows, b, SAMPLE_THREADS, 0, args)?;
        Ok(true)
    }

    /// Enqueues the greedy choice of the batch's `b` next ids into `next`, unless the step made it.
    fn choose_greedy(&self, b: usize) -> Result<()> {
        if self.next_ready.get() {
            return Ok(());
        }
        let v = self.shared.config.vocab_size;
        let kernels = &self.shared.device.kernels;
        let next = self.layout.next;
        let mut chunks = self.best_chunks.get();
        if chunks == 0 {
            chunks = v.div_ceil(ARGMAX_CHUNK);
            let (best_value, best_index) = (self.best.ptr, self.best.at::<f32>(b * chunks));
            let args = Args::new().ptr(self.logits.ptr).int(v).int(ARGMAX_CHUNK).ptr(best_value).ptr(best_index);
            self.launch_grid(kernels.argmax_partial, (chunks, b, 1), 256, 0, args)?;
        }
        let (best_value, best_index) = (self.best.ptr, self.best.at::<f32>(b * chunks));
        let args = Args::new().ptr(best_value).ptr(best_index).int(chunks).ptr(self.ints.at::<i32>(next));
        self.launch(kernels.argmax_final, b, 256, 0, args)
    }

    /// Copies the `out.len()` chosen token ids back (the only data a step sends to the host).
    fn read_next(&mut self, out: &mut [u32]) -> Result<()> {
        let _range = nvtx::range(nvtx::D2H_TOKEN_IDS);
        let next = self.layout.next;
        self.copy_ids_back(next, out.len())?;
        self.sync()?;
        self.next_known = true;
        self.ids_from_host(next, out);
        Ok(())
    }

    /// Enqueues the copy of the `b` ids at `next` (device) into the pinned ints at `at`; the
    /// caller waits (stream or event) before reading them.
    fn copy_ids_back(&mut self, at: usize, b: usize) -> Result<()> {
        // SAFETY: b ints in both buffers; the caller reads them only after the copy has run.
        unsafe {
            result::memcpy_dtoh_async(
                &mut self.host_ints.as_mut_slice()[at..at + b],
                self.ints.at::<i32>(self.layout.next),
                self.stream,
            )
        }
        .check("cuda: copying token ids to the host")
    }

    /// The ids in the pinned ints at `at`, into `out`.
    fn ids_from_host(&self, at: usize, out: &mut [u32]) {
        let n = out.len();
        for (o, &id) in out.iter_mut().zip(&self.host_ints.as_slice()[at..at + n]) {
            *o = id as u32;
        }
    }

    /// The captured step graph of the current batch size, if there is one yet.
    fn captured_step(&self) -> Option<sys::CUgraphExec> {
        let b = self.history.batch();
        self.graphs.iter().find(|(n, _)| *n == b).map(|(_, exec)| *exec)
    }

    /// Launches a step graph (timed with timer `timer` when timing is on), noting what it leaves
    /// for the selection: where the argmax's first stage went (replays do not run `head`, which
    /// records it), whether it chose the greedy ids (the fused step does, into `next`), and that
    /// the ids at `next` are no longer the host's.
    fn launch_step(&mut self, exec: sys::CUgraphExec, timer: usize) -> Result<()> {
        let b = self.history.batch();
        self.best_chunks.set(self.step_best_chunks(b));
        self.next_ready.set(self.fused_step(b).is_some());
        self.next_known = false;
        self.mark_timer(timer, false)?;
        // SAFETY: the graph was captured on this stream with this state's buffers.
        unsafe { result::graph::launch(exec, self.stream) }.check("cuda: launching the step graph")?;
        self.mark_timer(timer, true)
    }

    fn step_graph(&mut self) -> Result<sys::CUgraphExec> {
        if let Some(exec) = self.captured_step() {
            return Ok(exec);
        }
        // SAFETY: capture of this state's own stream; the graph is destroyed in Drop.
        unsafe {
            result::stream::begin_capture(self.stream, sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED)
                .check("cuda: starting graph capture")?;
            let enqueued = self.enqueue_step();
            let graph = result::stream::end_capture(self.stream).check("cuda: ending graph capture")?;
            enqueued?;
            let exec = result::graph::instantiate(graph, sys::CUgraphInstantiate_flags(0));
            let _ = result::graph::destroy(graph);
            let exec = exec.check("cuda: instantiating the step graph")?;
            self.graphs.push((self.history.batch(), exec));
            Ok(exec)
        }
    }
}

impl CudaState {
    /// The trace's address for a step whose first `blocks` blocks stamp it (0 without a trace):
    /// the cluster step's blocks, or the fused step's block 0.
    fn traced(&self, blocks: usize) -> u64 {
        self.trace.as_ref().map_or(0, |(t, grid)| {
            grid.set(if blocks <= TRACE_BLOCKS { blocks } else { 0 });
            t.ptr
        })
    }

    /// Logs (debug level) the last traced step's stamps (microseconds): block 0's gaps between
    /// them (per product of the fused step: before the wait for its copies, after it, after its
    /// epilogue; and after each attention), then for each stamp the latest block's time and the
    /// earliest's, from the earliest first stamp. (A block that skips a stamp leaves it 0: not
    /// counted.)
    fn log_trace(&self, trace: &DeviceBuffer, grid: usize) {
        let stamps = trace_stamps(self.shared.config.n_layer);
        if grid == 0 {
            return;
        }
        let mut t = vec![0u64; stamps * grid];
        let _ = self.shared.device.bind();
        // SAFETY: the buffer holds stamps * TRACE_BLOCKS stamps; the stream is synchronised first.
        let read = unsafe {
            let _ = result::stream::synchronize(self.stream);
            result::memcpy_dtoh_sync(&mut t, trace.ptr)
        };
        let n = (0..stamps).position(|i| t[i * grid] == 0).unwrap_or(stamps);
        if read.is_err() || n < 2 {
            return;
        }
        let us = |v: u64, from: u64| format!("{:.1}", v.saturating_sub(from) as f64 / 1e3);
        let block0: Vec<u64> = (0..n).map(|i| t[i * grid]).collect();
        let gaps: Vec<String> = block0.windows(2).map(|w| us(w[1], w[0])).collect();
        let total = us(block0[n - 1], block0[0]);
        emit(LogLevel::Debug, &format!("cuda: fused step trace, {total} us, between stamps: {}", gaps.join(" ")));
        if grid == 1 {
            return;
        }
        let row = |i: usize| t[i * grid..(i + 1) * grid].iter().copied().filter(|&v| v != 0);
        let start = row(0).min().unwrap_or(0);
        let at = |v: Option<u64>| v.map_or_else(|| "-".to_string(), |v| us(v, start));
        let latest: Vec<String> = (0..n).map(|i| at(row(i).max())).collect();
        let earliest: Vec<String> = (0..n).map(|i| at(row(i).min())).collect();
        emit(LogLevel::Debug, &format!("cuda: fused step trace, latest block at each stamp: {}", latest.join(" ")));
        emit(LogLevel::Debug, &format!("cuda: fused step trace, earliest block at each stamp: {}", earliest.join(" ")));
    }
}

impl Drop for CudaState {
    fn drop(&mut self) {
        if let Some((trace, grid)) = &self.trace {
            self.log_trace(trace, grid.get());
        }
        // SAFETY: the graphs and stream belong to this state; nothing runs on them any more.
        unsafe {
            let _ = self.shared.device.bind();
            let _ = result::stream::synchronize(self.stream);
            for (_, exec) in self.graphs.drain(..) {
                let _ = result::graph::exec_destroy(exec);
            }
            for (start, end) in self.timing.take().into_iter().flatten() {
                let _ = result::event::destroy(start);
                let _ = result::event::destroy(end);
            }
            let _ = result::stream::destroy(self.stream);
        }
    }
}

impl BackendState for CudaState {
    fn prefill(&mut self, tokens: &[u32], lengths: &[usize]) -> Result<()> {
        self.shared.device.bind()?;
        self.history.store_prompts(tokens, lengths);
        self.next_known = false;
        // Steps started ahead and not collected are dropped (the decoder rewinds before a prefill
        // anyway).
        self.ahead_collected = self.ahead_started;
        self.run_history()
    }

    fn step(&mut self, tokens: &[u32]) -> Result<()> {
        self.shared.device.bind()?;
        self.history.append(tokens);
        if !self.kv_cache {
            return self.run_history();
        }
        // The previous step's copy of the pinned tokens must be done before they are overwritten;
        // in the usual step -> select loop the stream is already idle here. The step itself is not
        // waited for: the next select / read_logits synchronises (and reports any device error).
        self.sync()?;
        // A generation step's tokens are the last selection's, already on the device.
        let (nx, b) = (self.layout.next, tokens.len());
        let mirror = &mut self.host_ints.as_mut_slice()[nx..nx + b];
        if !(self.next_known && tokens.iter().zip(mirror.iter()).all(|(&t, &h)| t as i32 == h)) {
            for (h, &t) in mirror.iter_mut().zip(tokens) {
                *h = t as i32;
            }
            self.upload_ints(nx, b)?;
        }
        let exec = self.step_graph()?;
        self.launch_step(exec, 0)
    }

    fn set_device_timing(&mut self, on: bool) -> Result<()> {
        self.shared.device.bind()?;
        self.sync()?;
        match (on, self.timing) {
            (true, None) => {
                let flags = sys::CUevent_flags::CU_EVENT_DEFAULT;
                let mut events = Vec::with_capacity(6);
                for _ in 0..6 {
                    match result::event::create(flags) {
                        Ok(e) => events.push(e),
                        Err(e) => {
                            for made in events {
                                // SAFETY: created just above, not recorded.
                                let _ = unsafe { result::event::destroy(made) };
                            }
                            return Err(e).check("cuda: creating a timer");
                        }
                    }
                }
                self.timing = Some([(events[0], events[1]), (events[2], events[3]), (events[4], events[5])]);
                self.timing_pending = [false; 3];
            }
            (false, Some(pairs)) => {
                // SAFETY: the stream is idle; the events are not used again.
                for (start, end) in pairs {
                    unsafe {
                        let _ = result::event::destroy(start);
                        let _ = result::event::destroy(end);
                    }
                }
                self.timing = None;
            }
            _ => {}
        }
        Ok(())
    }

    fn take_device_ms(&mut self) -> Option<f64> {
        self.timing?;
        if self.timing_pending.contains(&true) {
            let _ = self.shared.device.bind();
            let _ = self.sync();
        }
        Some(std::mem::take(&mut self.device_ms))
    }

    fn read_logits(&mut self, out: &mut [f32]) -> Result<()> {
        self.shared.device.bind()?;
        let n = out.len();
        let _range = nvtx::range(nvtx::D2H_LOGITS);
        // SAFETY: n <= batch * vocab floats in both buffers; synchronised before reading.
        unsafe { result::memcpy_dtoh_async(&mut self.host_logits.as_mut_slice()[..n], self.logits.ptr, self.stream) }
            .check("cuda: copying logits to the host")?;
        self.sync()?;
        out.copy_from_slice(&self.host_logits.as_slice()[..n]);
        Ok(())
    }

    fn select(&mut self, sampler: &mut Sampler, out: &mut [u32]) -> Result<()> {
        self.shared.device.bind()?;
        self.next_known = false;
        let b = out.len();
        if self.choose_sampled(sampler, b, self.layout.uniforms)? {
            return self.read_next(out);
        }
        self.choose_greedy(b)?;
        self.read_next(out)
    }

    fn steps_ahead(&self) -> bool {
        self.kv_cache
    }

    fn step_ahead(&mut self, sampler: &mut Sampler) -> Result<bool> {
        let b = self.history.batch();
        if !self.kv_cache || b == 0 || self.ahead_started - self.ahead_collected >= 2 {
            return Ok(false);
        }
        self.shared.device.bind()?;
        let exec = match self.captured_step() {
            Some(exec) => exec,
            // Capture wants the stream idle (the first step of a batch size).
            None => {
                self.sync()?;
                self.step_graph()?
            }
        };
        let slot = self.ahead_started % 2;
        // The graph reads the ids the last selection left at `next`, which the stream orders
        // before it.
        self.launch_step(exec, 1 + slot)?;
        if !self.choose_sampled(sampler, b, self.layout.ahead + (2 + slot) * b)? {
            self.choose_greedy(b)?;
        }
        // The host reads the slot only after its event, and the slot is not copied into again
        // before it is collected.
        let _range = nvtx::range(nvtx::D2H_TOKEN_IDS);
        self.copy_ids_back(self.layout.ahead + slot * b, b)?;
        // SAFETY: the event and the stream belong to this state.
        unsafe { result::event::record(self.ahead_copied[slot].event, self.stream) }
            .check("cuda: recording an event")?;
        self.ahead_started += 1;
        Ok(true)
    }

    fn collect_ahead(&mut self, out: &mut [u32]) -> Result<()> {
        if self.ahead_collected == self.ahead_started {
            bail!(Internal, "cuda: no step was started ahead");
        }
        self.shared.device.bind()?;
        let slot = self.ahead_collected % 2;
        // SAFETY: the event was recorded on this state's stream after the slot's copy.
        unsafe { result::event::synchronize(self.ahead_copied[slot].event) }.check("cuda: running the step")?;
        self.read_timer(1 + slot)?;
        self.ahead_collected += 1;
        self.ids_from_host(self.layout.ahead + slot * out.len(), out);
        Ok(())
    }

    fn rewind(&mut self, lens: &[usize]) -> Result<()> {
        self.shared.device.bind()?;
        // The steps not kept run to their end first; their time is not counted.
        self.timing_pending[1] = false;
        self.timing_pending[2] = false;
        self.sync()?;
        self.ahead_collected = self.ahead_started;
        self.next_known = false;
        let sl = self.layout.seq_len;
        for (h, &l) in self.host_ints.as_mut_slice()[sl..sl + lens.len()].iter_mut().zip(lens) {
            *h = l as i32;
        }
        self.upload_ints(sl, lens.len())?;
        // Done before the pinned positions can be written again.
        self.sync()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_k_covers_k_in_whole_slices_with_no_empty_split() {
        // matmul_mma needs each split's k-range to start on a slice boundary, and every split
        // block writes a partial tile the finish adds: each split must hold some of K, and the
        // splits all of it.
        for c in [64, 768, 1600] {
            for (k, n) in [(c, 3 * c), (c, c), (c, 4 * c), (4 * c, c)] {
                for m in [1, 3, 8, 16, 17, 64, 65, 96, 192, 1024] {
                    for target in [1, 66, TARGET_BLOCKS, TARGET_BLOCKS_FEW] {
                        for slice in [16, 32, 64] {
                            let (splits, per) = split_k(m, k, n, target, slice);
                            let at = format!("m {m} k {k} n {n} target {target} slice {slice}");
                            assert_eq!(per % slice, 0, "{at}");
                            assert!(splits >= 1 && splits * per >= k, "{at}: {splits} x {per}");
                            assert!((splits - 1) * per < k, "{at}: {splits} x {per}, the last split is empty");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn folded_biases_give_each_product_of_a_layer_norm() {
        // The cluster step computes output j of a product after a LayerNorm as inv * sum_k W_jk
        // g_k (x_k - mean) plus its folded bias; that must be W LN(x) + bias done the plain way,
        // with the values the device holds, for QKV and MLP up of every layer.
        let model = Model::synthetic(crate::model::Preset::Tiny, 3);
        let c = model.config.n_embd;
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let round = |v: f32| match dtype {
                DType::F32 => v as f64,
                DType::F16 => f16::from_f32(v).to_f64(),
                DType::BF16 => bf16::from_f32(v).to_f64(),
            };
            let folded = folded_biases(&model, dtype);
            assert_eq!(folded.len(), model.weights.layers.len() * 7 * c);
            let x: Vec<f64> = (0..c).map(|k| ((k * 37 % 101) as f64 - 50.0) / 7.0).collect();
            let mean = x.iter().sum::<f64>() / c as f64;
            let inv = 1.0 / (x.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / c as f64 + 1e-5).sqrt();
            for (l, layer) in model.weights.layers.iter().enumerate() {
                let products = [
                    (&layer.attn_weight, &layer.attn_bias, &layer.ln_1_weight, &layer.ln_1_bias, 0),
                    (&layer.fc_weight, &layer.fc_bias, &layer.ln_2_weight, &layer.ln_2_bias, 3 * c),
                ];
                for (w, bias, g, b, at) in products {
                    let n = bias.len();
                    let ln: Vec<f64> = (0..c).map(|k| (x[k] - mean) * inv * round(g[k]) + round(b[k])).collect();
                    for j in 0..n {
                        let plain = (0..c).map(|k| round(w[k * n + j]) * ln[k]).sum::<f64>() + round(bias[j]);
                        let dot = (0..c).map(|k| round(w[k * n + j]) * round(g[k]) * (x[k] - mean)).sum::<f64>();
                        let fold = inv * dot + folded[l * 7 * c + at + j] as f64;
                        assert!(
                            (fold - plain).abs() <= 1e-5 * (1.0 + plain.abs()),
                            "{dtype} layer {l} output {j} of {n}: {fold} against {plain}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn the_constants_shared_with_the_kernels_agree() {
        // Each of these sizes a launch or a buffer here and a loop or an array in the .cu file.
        let source = include_str!("../../../kernels/gpt2rt.cu");
        let define = |name: &str| -> usize {
            let line = source
                .lines()
                .find(|l| l.split_whitespace().take(2).eq(["#define", name]))
                .unwrap_or_else(|| panic!("#define {name} missing from kernels/gpt2rt.cu"));
            line.split_whitespace().nth(2).and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("{line}"))
        };
        for (name, value) in [
            ("GEMV_ROWS", GEMV_MAX_ROWS),
            ("GEMV_MAX_M", GEMV_MAX_M),
            ("GEMV_COLS", GEMV_COLS),
            ("ATTENTION_SPLIT", ATTENTION_SPLIT),
            ("CLUSTER_MAX", CLUSTER_MAX),
            ("SAMPLE_THREADS", SAMPLE_THREADS),
            ("STEP_THREADS_F32", STEP_THREADS_F32),
            ("STEP_THREADS_HALF", STEP_THREADS_HALF),
            ("STEP_ROWS", FUSED_WIDE_ROWS),
            ("STEP_MMA", STEP_MMA),
            ("CL_SIZE", CL_SIZE),
            ("CL_MAX_CLUSTERS", CL_MAX_CLUSTERS),
            ("CL_HID_MAX", CL_HID_MAX),
            ("CL_PROJ_MAX", CL_PROJ_MAX),
            ("TRACE_BLOCKS", TRACE_BLOCKS),
            ("ATT_ROWS", ATTENTION_TILE_ROWS),
            ("HEAD_THREADS", HEAD_THREADS),
            ("HEAD_TILE", HEAD_TILE),
            ("HEAD_SLICE", HEAD_SLICE),
            ("HEAD_STAGES_16", HEAD_STAGES[0]),
            ("HEAD_STAGES_32", HEAD_STAGES[1]),
            ("HEAD_STAGES_64", HEAD_STAGES[2]),
            ("HEAD_GROUPS_64", HEAD_GROUPS[2]),
        ] {
            assert_eq!(define(name), value, "{name}");
        }
    }

    #[test]
    fn the_cluster_step_fits_one_block_an_sm_on_hopper_in_the_half_modes() {
        // DistilGPT2 in f16/bf16 at every cluster count cluster_step may try (one a head up to
        // CL_MAX_CLUSTERS): the launch's shared memory and the kernel's static arrays (the seven
        // mbarriers and the LM head's per-warp bests) within the H100's and H200's opt-in a block,
        // and a block's hidden units within CL_HID_MAX; otherwise the step falls back to the fused
        // step without saying so.
        const HOPPER_OPTIN: usize = 232_448;
        let cfg = crate::model::Preset::DistilGpt2.config();
        for clusters in cfg.n_head..=CL_MAX_CLUSTERS {
            let hidden = (4 * cfg.n_embd).div_ceil(clusters * CL_SIZE);
            assert!(hidden <= CL_HID_MAX, "{clusters} clusters: {hidden} hidden units a block");
            for dtype in [DType::F16, DType::BF16] {
                let statics = 7 * 8 + (step_threads(dtype) / 32) * GEMV_MAX_M * 8;
                let smem = cluster_step_smem(&cfg, dtype, hidden) + statics;
                assert!(smem <= HOPPER_OPTIN, "{dtype}, {clusters} clusters: {smem} bytes");
            }
        }
    }

    #[test]
    fn every_lm_head_instance_fits_one_block_an_sm_on_hopper_at_gpt2_widths() {
        // The H100's and H200's opt-in shared memory a block: an instance whose ring, rows and
        // finished tile (plus its static arrays: a best value and index a row for each warp) do
        // not fit falls back to the product over 64-column tiles without saying so.
        const HOPPER_OPTIN: usize = 232_448;
        for c in [768, 1024, 1280, 1600] {
            assert_eq!(c % HEAD_SLICE, 0, "width {c}");
            for (rows, stages) in HEAD_MMA_ROWS.into_iter().zip(HEAD_STAGES) {
                let smem = head_mma_smem(rows, stages, c) + (HEAD_THREADS / 32) * rows * 8;
                if c == 768 || rows <= 32 {
                    assert!(smem <= HOPPER_OPTIN, "width {c}, {rows} rows: {smem} bytes");
                }
            }
        }
    }

    #[test]
    fn the_attention_stage_holds_the_splits_of_every_context_a_session_reaches() {
        // What step_splits in the .cu file picks (positions of up to `longest` keys): the room a
        // launch asks for must hold every row's splits' outputs, or the combination silently reads
        // them through L2.
        let device_splits = |dtype: DType, blocks: usize, m: usize, h: usize, longest: usize| {
            (blocks / (m * h)).min(longest.div_ceil(step_split_keys(dtype))).max(1)
        };
        let cfg = crate::model::Preset::DistilGpt2.config();
        for (dtype, blocks) in
            [DType::F32, DType::F16, DType::BF16].into_iter().flat_map(|d| [46, 108, 132, 144].map(|b| (d, b)))
        {
            for m in 1..=FUSED_WIDE_ROWS {
                for max_seq in [1, 12, 44, 64, 65, 256, 640, 1024] {
                    let room = step_stage_bytes(&cfg, dtype, blocks, m, max_seq);
                    let most = (1..=max_seq).map(|t| device_splits(dtype, blocks, m, cfg.n_head, t)).max().unwrap();
                    let at = format!("{dtype}, blocks {blocks}, rows {m}, max_seq {max_seq}");
                    if most == 1 {
                        assert_eq!(room, 0, "{at}");
                    } else {
                        assert_eq!(room, m * most * cfg.n_embd * 4, "{at}");
                    }
                }
            }
        }
        // DistilGPT2 at batch 1 on 132 SMs, 256 positions: in f32 four splits of 64 keys (16
        // warps), 12 KB; in f16 six of 48 (12 warps), 18 KB.
        assert_eq!(step_stage_bytes(&cfg, DType::F32, 132, 1, 256), 4 * 768 * 4);
        assert_eq!(step_stage_bytes(&cfg, DType::F16, 132, 1, 256), 6 * 768 * 4);
    }

    #[test]
    fn cluster_splits_fit_the_cluster_and_cover_k() {
        // A cluster product launches its splits as one cluster (grid z = cluster z), so there
        // must be no more of them than the cluster may hold, each starting on a slice boundary,
        // none empty, all of K covered.
        for k in (16..=4096).step_by(16) {
            for slice in [32, 64] {
                for wanted in 1..=CLUSTER_MAX {
                    let (splits, per) = k_splits(k, wanted, slice);
                    let at = format!("k {k} slice {slice} wanted {wanted}");
                    assert_eq!(per % slice, 0, "{at}");
                    assert!((1..=wanted).contains(&splits), "{at}: {splits} splits");
                    assert!(splits * per >= k && (splits - 1) * per < k, "{at}: {splits} x {per}");
                }
            }
        }
    }

    #[test]
    fn the_partial_buffer_holds_every_row_count_up_to_its_rows() {
        let split = |m: usize, _k: usize| {
            if m <= MMA_SLICE64_ROWS { (TARGET_BLOCKS_FEW, 64) } else { (TARGET_BLOCKS, 32) }
        };
        for rows in [1, 5, 16, 17, 64, 300, 1024] {
            let floats = partial_floats(768, rows, split);
            for m in 1..=rows {
                for (k, n) in [(768, 2304), (768, 768), (768, 3072), (3072, 768)] {
                    let (target, slice) = split(m, k);
                    assert!(split_k(m, k, n, target, slice).0 * m * n <= floats, "rows {rows}, m {m}");
                }
            }
        }
        // Far below the old sizing (the most splits any row count could take, for every row).
        assert!(partial_floats(768, 1024, split) < 1024 * 132_096 / 4);
    }
}
