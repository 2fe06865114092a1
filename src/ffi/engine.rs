//! `gpt2rt_engine`: immutable weights on a backend, shared by sessions and threads.

use super::{arg_mut, arg_ref, arg_str, copy_out, gpt2rt_status, guard, read_options};
use crate::api::{Engine, EngineOptions};
use crate::backend::BackendKind;
use crate::model::{DType, Preset};
use std::ffi::c_char;
use std::path::PathBuf;

/// An engine: model weights on a backend, its config and tokenizer.
///
/// Thread-safety: every `gpt2rt_engine_*` function may be called from any thread, concurrently.
/// Lifetime: sessions and tokenizers created from an engine keep what they need alive, so the
/// engine may be destroyed before them. Destroy it exactly once.
pub struct gpt2rt_engine {
    pub(crate) engine: Engine,
}

/// Which backend runs the model.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum gpt2rt_backend {
    /// CUDA if available, else CPU; the log callback and `gpt2rt_engine_info` say why.
    Auto = 0,
    Cpu = 1,
    Cuda = 2,
    Tensorrt = 3,
}

/// Options of `gpt2rt_engine_load`. Fill with `gpt2rt_engine_options_default` first.
///
/// Fields are only ever appended, without an ABI version bump. The library accepts the
/// `struct_size` of every earlier layout (56 bytes, up to `synthetic_seed`, on 64-bit targets) and
/// gives the fields such a host lacks their defaults. `gpt2rt_engine_options_default` writes the
/// library's whole current layout, so a host built against an older header must fill the struct
/// itself rather than call a newer library's default function.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct gpt2rt_engine_options {
    /// `sizeof(gpt2rt_engine_options)`, set by the default function.
    pub struct_size: usize,
    /// UTF-8 path of a Hugging Face GPT-2 directory; NULL/0 = the built-in synthetic model. With
    /// `backend` = tensorrt: the path of a serialized TensorRT engine file (`config.json` and
    /// `tokenizer.json` next to it are used when present).
    pub model_dir: *const c_char,
    pub model_dir_len: usize,
    /// A `gpt2rt_backend` value (default: auto).
    pub backend: u32,
    /// GPU ordinal for device backends (default 0).
    pub device: u32,
    /// Compute dtype for device backends: 0 = as stored, 1 = f32, 2 = f16, 3 = bf16. The CPU
    /// backend computes in f32 whatever is asked (and says so in the info text).
    pub dtype: u32,
    /// CPU worker threads; 0 = one per core (default).
    pub num_threads: u32,
    /// Built-in synthetic model when `model_dir` is empty: 0 = distilgpt2 (default), 1 = gpt2,
    /// 2 = tiny (2 layers, 64 wide, GPT-2 vocabulary; for tests).
    pub builtin_model: u32,
    /// Seed of the built-in synthetic model (default 0).
    pub synthetic_seed: u64,
    /// Nonzero: send NVTX ranges (`gpt2rt generate`, `gpt2rt prefill`, `gpt2rt step`,
    /// `gpt2rt select`, `gpt2rt read_logits`; on CUDA also `H2D tokens`, `D2H logits`,
    /// `D2H token ids`) to an NVTX tool such as Nsight Systems, which the tool's
    /// `NVTX_INJECTION64_PATH` names; the environment variable `GPT2RT_NVTX=1` does the same without
    /// code changes. Process-wide once on (NVTX is per process), for every engine. Without a tool a
    /// range costs one atomic load. Default 0. Appended after ABI 1's first layout: a host passing
    /// the older `struct_size` gets 0.
    pub nvtx: u32,
}

impl gpt2rt_engine_options {
    fn defaults() -> Self {
        Self {
            struct_size: std::mem::size_of::<Self>(),
            model_dir: std::ptr::null(),
            model_dir_len: 0,
            backend: gpt2rt_backend::Auto as u32,
            device: 0,
            dtype: 0,
            num_threads: 0,
            builtin_model: 0,
            synthetic_seed: 0,
            nvtx: 0,
        }
    }

    /// Every `struct_size` this library accepts: each earlier layout's, then the current one.
    fn known_sizes() -> [usize; 2] {
        [std::mem::offset_of!(Self, nvtx), std::mem::size_of::<Self>()]
    }
}

/// Fills `options` with the defaults (built-in model, auto backend).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn gpt2rt_engine_options_default(options: *mut gpt2rt_engine_options) -> gpt2rt_status {
    guard(|| {
        let options = unsafe { arg_mut(options, "options") }?;
        *options = gpt2rt_engine_options::defaults();
        Ok(())
    })
}

/// Loads an engine. `options` may be NULL for the defaults. On success `*out_engine` receives a
/// handle to release with `gpt2rt_engine_destroy`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn gpt2rt_engine_load(
    options: *const gpt2rt_engine_options,
    out_engine: *mut *mut gpt2rt_engine,
) -> gpt2rt_status {
    guard(|| {
        let out = unsafe { arg_mut(out_engine, "out_engine") }?;
        let mut rust = EngineOptions::default();
        let known = gpt2rt_engine_options::known_sizes();
        let read = unsafe { read_options(options, gpt2rt_engine_options::defaults(), &known, "gpt2rt_engine_options") };
        if let Some(o) = read? {
            let dir = unsafe { arg_str(o.model_dir, o.model_dir_len, "options.model_dir") }?;
            rust.model_dir = (!dir.is_empty()).then(|| PathBuf::from(dir));
            rust.backend = match o.backend {
                0 => BackendKind::Auto,
                1 => BackendKind::Cpu,
                2 => BackendKind::Cuda,
                3 => BackendKind::TensorRt,
                other => bail!(InvalidArgument, "options.backend {other} is not a gpt2rt_backend"),
            };
            rust.dtype = match o.dtype {
                0 => None,
                1 => Some(DType::F32),
                2 => Some(DType::F16),
                3 => Some(DType::BF16),
                other => bail!(InvalidArgument, "options.dtype {other} is not 0..=3"),
            };
            rust.device = o.device as usize;
            rust.num_threads = o.num_threads as usize;
            rust.seed = o.synthetic_seed;
            rust.nvtx = o.nvtx != 0;
            rust.builtin = match o.builtin_model {
                0 => Preset::DistilGpt2,
                1 => Preset::Gpt2,
                2 => Preset::Tiny,
                other => bail!(InvalidArgument, "options.builtin_model {other} is not 0..=2"),
            };
        }
        let engine = Engine::load(&rust)?;
        *out = Box::into_raw(Box::new(gpt2rt_engine { engine }));
        Ok(())
    })
}

/// Releases an engine handle. NULL is accepted and ignored.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn gpt2rt_engine_destroy(engine: *mut gpt2rt_engine) {
    if !engine.is_null() {
        // SAFETY: the pointer came from gpt2rt_engine_load and the host destroys it once.
        drop(unsafe { Box::from_raw(engine) });
    }
}

/// Model dimensions and engine limits.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct gpt2rt_model_info {
    pub n_layer: usize,
    pub n_embd: usize,
    pub n_head: usize,
    pub n_positions: usize,
    pub vocab_size: usize,
    /// Largest `max_batch` a session of this engine may ask for.
    pub max_batch: usize,
    /// Largest `max_seq` a session of this engine may ask for.
    pub max_seq: usize,
    /// The backend that runs the model (a `gpt2rt_backend` value, never auto).
    pub backend: u32,
}

/// Writes the model's dimensions and the engine's limits into `*out_info`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn gpt2rt_engine_model_info(
    engine: *const gpt2rt_engine,
    out_info: *mut gpt2rt_model_info,
) -> gpt2rt_status {
    guard(|| {
        let engine = &unsafe { arg_ref(engine, "engine") }?.engine;
        let out = unsafe { arg_mut(out_info, "out_info") }?;
        let cfg = engine.config();
        let limits = engine.limits();
        *out = gpt2rt_model_info {
            n_layer: cfg.n_layer,
            n_embd: cfg.n_embd,
            n_head: cfg.n_head,
            n_positions: cfg.n_positions,
            vocab_size: cfg.vocab_size,
            max_batch: limits.max_batch,
            max_seq: limits.max_seq,
            backend: match engine.backend_kind() {
                BackendKind::Auto | BackendKind::Cpu => gpt2rt_backend::Cpu as u32,
                BackendKind::Cuda => gpt2rt_backend::Cuda as u32,
                BackendKind::TensorRt => gpt2rt_backend::Tensorrt as u32,
            },
        };
        Ok(())
    })
}

/// A UTF-8 description of the engine: model, backend, and why other backends were skipped.
/// Required-size convention: `*out_len` always receives the size needed (no NUL is written);
/// when `capacity` is smaller the status is `GPT2RT_STATUS_BUFFER_TOO_SMALL` and `buffer` is
/// untouched. `(NULL, 0)` asks for the size only.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn gpt2rt_engine_info(
    engine: *const gpt2rt_engine,
    buffer: *mut c_char,
    capacity: usize,
    out_len: *mut usize,
) -> gpt2rt_status {
    guard(|| {
        let engine = &unsafe { arg_ref(engine, "engine") }?.engine;
        unsafe { copy_out(engine.info().as_bytes(), buffer, capacity, out_len) }
    })
}
