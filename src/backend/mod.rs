//! Backends: what runs the model. Each one implements [`Backend`] (immutable, shared by every
//! session of an engine) and [`BackendState`] (one session's buffers: KV cache, activations,
//! logits). Inputs reaching a backend were already validated by `decode::Session`.

pub mod cpu;
pub mod cuda;
pub mod tensorrt;

use crate::error::Result;
use crate::model::ModelConfig;
use crate::sampling::Sampler;
use std::fmt;

/// Which backend to run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BackendKind {
    /// CUDA when it is available, else the CPU; the reason for each skip is logged.
    Auto,
    Cpu,
    Cuda,
    TensorRt,
}

impl BackendKind {
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda),
            "tensorrt" | "trt" => Ok(Self::TensorRt),
            other => bail!(InvalidArgument, "unknown backend '{other}' (expected auto, cpu, cuda or tensorrt)"),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Cpu => "cpu",
            Self::Cuda => "cuda",
            Self::TensorRt => "tensorrt",
        }
    }
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A session's shape: how many sequences at once and how long each may grow (prompt + generated).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Profile {
    pub max_batch: usize,
    pub max_seq: usize,
}

/// The immutable part of a backend: weights where the backend computes, shared by all sessions.
pub trait Backend: Send + Sync + fmt::Debug {
    fn kind(&self) -> BackendKind;
    fn config(&self) -> &ModelConfig;
    /// The largest profile this backend supports.
    fn limits(&self) -> Profile;
    /// Human-readable description (device, threads, dtype).
    fn describe(&self) -> String;
    /// Allocates every buffer a session of `profile` will use. `kv_cache = false` is the original
    /// study's full-recompute path.
    fn new_state(&self, profile: Profile, kv_cache: bool) -> Result<Box<dyn BackendState>>;
}

/// One session's decode state. Never allocates after creation.
pub trait BackendState: Send + fmt::Debug {
    /// Runs the prompts (`tokens` is their concatenation, `lengths` their sizes), filling the KV
    /// cache and the last position's logits of each sequence. Replaces any earlier batch.
    fn prefill(&mut self, tokens: &[u32], lengths: &[usize]) -> Result<()>;
    /// Appends one token to each sequence of the current batch and computes its next logits.
    fn step(&mut self, tokens: &[u32]) -> Result<()>;
    /// Copies `[batch, vocab]` logits of the last prefill/step into `out`.
    fn read_logits(&mut self, out: &mut [f32]) -> Result<()>;
    /// Chooses the next token of every sequence of the current batch into `out`.
    fn select(&mut self, sampler: &mut Sampler, out: &mut [u32]) -> Result<()>;
}
