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
    /// Pipelined decoding, used by the decoder's generate loop only (a backend may decline with
    /// `Ok(false)`, the default). Starts, without waiting, a step on the ids the last selection (or
    /// step started ahead) left on the device, then the choice of its next ids by `sampler` (its
    /// draws taken now); at most two are outstanding. `collect_ahead` returns their ids in order.
    fn step_ahead(&mut self, _sampler: &mut Sampler) -> Result<bool> {
        Ok(false)
    }
    /// Whether `step_ahead` may start steps (the decoder does not try where it cannot).
    fn steps_ahead(&self) -> bool {
        false
    }
    /// Waits for the ids chosen after the oldest step started by `step_ahead` not yet collected.
    fn collect_ahead(&mut self, _out: &mut [u32]) -> Result<()> {
        bail!(Internal, "this backend starts no step ahead")
    }
    /// After steps started ahead that are not kept: waits for them and sets the positions of the
    /// batch's sequences to `lens` (the decoder then replays a step, which leaves its logits).
    fn rewind(&mut self, _lens: &[usize]) -> Result<()> {
        bail!(Internal, "this backend starts no step ahead")
    }
    /// Turns on (or off) timing of the forward passes on the device. Backends without a device
    /// ignore it.
    fn set_device_timing(&mut self, _on: bool) -> Result<()> {
        Ok(())
    }
    /// Device time of the forward passes (prefills and steps) since the last call, in ms: the
    /// kernels only, without launches, copies or host work. `None` where not measured.
    fn take_device_ms(&mut self) -> Option<f64> {
        None
    }
}

/// The tokens of every sequence of a session's batch, `[seq][max_seq]`, and their lengths: what a
/// backend needs to recompute a sequence (the `kv_cache = off` path) or to upload a prefill.
#[derive(Debug)]
pub(crate) struct History {
    tokens: Vec<u32>,
    lens: Vec<usize>,
    batch: usize,
    max_seq: usize,
}

impl History {
    pub(crate) fn new(profile: Profile) -> Self {
        Self {
            tokens: vec![0; profile.max_batch * profile.max_seq],
            lens: vec![0; profile.max_batch],
            batch: 0,
            max_seq: profile.max_seq,
        }
    }

    /// Replaces the batch with these prompts (`tokens` back to back, `lengths` their sizes).
    pub(crate) fn store_prompts(&mut self, tokens: &[u32], lengths: &[usize]) {
        let mut offset = 0;
        for (seq, &len) in lengths.iter().enumerate() {
            self.tokens[seq * self.max_seq..][..len].copy_from_slice(&tokens[offset..offset + len]);
            self.lens[seq] = len;
            offset += len;
        }
        self.batch = lengths.len();
    }

    /// Appends one token to each sequence of the batch.
    pub(crate) fn append(&mut self, tokens: &[u32]) {
        for (seq, &tok) in tokens.iter().enumerate() {
            self.tokens[seq * self.max_seq + self.lens[seq]] = tok;
            self.lens[seq] += 1;
        }
    }

    pub(crate) fn batch(&self) -> usize {
        self.batch
    }

    pub(crate) fn len(&self, seq: usize) -> usize {
        self.lens[seq]
    }

    pub(crate) fn token(&self, seq: usize, pos: usize) -> u32 {
        self.tokens[seq * self.max_seq + pos]
    }
}
