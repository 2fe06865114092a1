//! The decode contract: profile, prefill, step, last logits, next-token selection and the generate
//! loop. Every input is validated here, before it reaches a backend, and a failed call leaves the
//! decoder exactly as it was.

use crate::backend::{Backend, BackendState, Profile};
use crate::error::Result;
use crate::nvtx;
use crate::sampling::{Sampler, SamplingParams};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// What a session asks for when it is created.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionOptions {
    /// Most sequences decoded together.
    pub max_batch: usize,
    /// Longest sequence (prompt + generated tokens); 0 means the model's `n_positions`.
    pub max_seq: usize,
    /// `false` recomputes the whole sequence every step (the original study's O(L^2) path).
    pub kv_cache: bool,
}

impl Default for SessionOptions {
    fn default() -> Self {
        Self { max_batch: 1, max_seq: 0, kv_cache: true }
    }
}

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// `max_new_tokens` were produced.
    Length,
    /// Every sequence produced a stop token.
    StopToken,
    /// The host cancelled it (from any thread).
    Cancelled,
    /// The streaming callback asked to stop.
    Callback,
}

/// Options of [`Decoder::generate`].
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateParams {
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
    /// A sequence ends when it produces one of these (the stop token is not part of the output).
    pub stop_tokens: Vec<u32>,
}

impl Default for GenerateParams {
    fn default() -> Self {
        Self { max_new_tokens: 32, sampling: SamplingParams::greedy(), stop_tokens: Vec::new() }
    }
}

/// The tokens a generation produced, per sequence, and why it ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GenerateOutput {
    pub tokens: Vec<Vec<u32>>,
    pub finish_reason: FinishReason,
}

/// One decode state over a backend: owns its buffers, validates every call.
#[derive(Debug)]
pub struct Decoder {
    backend: Arc<dyn Backend>,
    state: Box<dyn BackendState>,
    profile: Profile,
    kv_cache: bool,
    vocab_size: usize,
    /// Current length of each sequence of the batch; empty before the first prefill.
    lens: Vec<usize>,
    sampler: Sampler,
    next: Vec<u32>,
}

impl Decoder {
    /// Allocates a session's buffers for `options`, or says which limit the request exceeds.
    pub fn new(backend: Arc<dyn Backend>, options: SessionOptions) -> Result<Self> {
        let limits = backend.limits();
        let max_seq = if options.max_seq == 0 { limits.max_seq } else { options.max_seq };
        if options.max_batch == 0 || options.max_batch > limits.max_batch {
            bail!(
                ProfileUnsupported,
                "max_batch {} is outside what the {} engine supports (1..={})",
                options.max_batch,
                backend.kind(),
                limits.max_batch
            );
        }
        if max_seq > limits.max_seq {
            bail!(
                ProfileUnsupported,
                "max_seq {max_seq} is outside what the {} engine supports (1..={})",
                backend.kind(),
                limits.max_seq
            );
        }
        let profile = Profile { max_batch: options.max_batch, max_seq };
        let vocab_size = backend.config().vocab_size;
        let state = backend.new_state(profile, options.kv_cache)?;
        Ok(Self {
            state,
            profile,
            kv_cache: options.kv_cache,
            vocab_size,
            lens: Vec::with_capacity(profile.max_batch),
            sampler: Sampler::new(profile.max_batch, vocab_size),
            next: vec![0; profile.max_batch],
            backend,
        })
    }

    /// The profile this session was granted.
    pub fn profile(&self) -> Profile {
        self.profile
    }

    pub fn kv_cache(&self) -> bool {
        self.kv_cache
    }

    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }

    /// Sequences in the current batch (0 before the first prefill).
    pub fn batch(&self) -> usize {
        self.lens.len()
    }

    /// Current length (prompt + generated) of each sequence.
    pub fn lengths(&self) -> &[usize] {
        &self.lens
    }

    fn check_tokens(&self, tokens: &[u32]) -> Result<()> {
        if let Some((i, t)) = tokens.iter().enumerate().find(|(_, t)| **t as usize >= self.vocab_size) {
            bail!(TokenOutOfRange, "token id {t} at index {i} is outside the vocabulary (0..{})", self.vocab_size);
        }
        Ok(())
    }

    /// Runs a batch of prompts (`tokens` = their concatenation, `lengths` = each one's size),
    /// replacing any earlier batch, and computes each sequence's next-token logits.
    pub fn prefill(&mut self, tokens: &[u32], lengths: &[usize]) -> Result<()> {
        if lengths.is_empty() {
            bail!(InvalidArgument, "prefill needs at least one sequence");
        }
        if lengths.len() > self.profile.max_batch {
            bail!(
                BatchExceedsProfile,
                "batch of {} sequences exceeds the session's max_batch {}",
                lengths.len(),
                self.profile.max_batch
            );
        }
        if let Some(i) = lengths.iter().position(|&l| l == 0) {
            bail!(InvalidArgument, "sequence {i} has an empty prompt");
        }
        if let Some((i, l)) = lengths.iter().enumerate().find(|(_, l)| **l > self.profile.max_seq) {
            bail!(
                SequenceExceedsProfile,
                "sequence {i} has {l} tokens, more than the session's max_seq {}",
                self.profile.max_seq
            );
        }
        let total: usize = lengths.iter().sum();
        if total != tokens.len() {
            bail!(LengthMismatch, "the lengths add up to {total} tokens but {} were given", tokens.len());
        }
        self.check_tokens(tokens)?;
        self.lens.clear();
        let result = {
            let _range = nvtx::range(nvtx::PREFILL);
            self.state.prefill(tokens, lengths)
        };
        if result.is_ok() {
            self.lens.extend_from_slice(lengths);
            let params = *self.sampler.params();
            self.sampler.set_params(params);
        }
        result
    }

    /// Appends one token to every sequence of the batch and computes the next logits.
    pub fn step(&mut self, tokens: &[u32]) -> Result<()> {
        if self.lens.is_empty() {
            bail!(NotPrefilled, "step called before a successful prefill");
        }
        if tokens.len() != self.lens.len() {
            bail!(
                LengthMismatch,
                "step needs one token per sequence: the batch has {} but {} were given",
                self.lens.len(),
                tokens.len()
            );
        }
        self.check_tokens(tokens)?;
        if let Some((i, l)) = self.lens.iter().enumerate().find(|(_, l)| **l >= self.profile.max_seq) {
            bail!(
                SequenceExceedsProfile,
                "sequence {i} already has {l} tokens, the session's max_seq; one more does not fit",
            );
        }
        let result = {
            let _range = nvtx::range(nvtx::STEP);
            self.state.step(tokens)
        };
        match result {
            Ok(()) => self.lens.iter_mut().for_each(|l| *l += 1),
            // A backend failure mid-step leaves the cache in an unknown state: require a prefill.
            Err(_) => self.lens.clear(),
        }
        result
    }

    /// Copies the `[batch, vocab]` logits of the last prefill/step into the front of `out`.
    /// Returns the number of floats written.
    pub fn read_logits(&mut self, out: &mut [f32]) -> Result<usize> {
        if self.lens.is_empty() {
            bail!(NotPrefilled, "no logits yet: call prefill first");
        }
        let needed = self.lens.len() * self.vocab_size;
        if out.len() < needed {
            bail!(
                BufferTooSmall,
                "logits need {needed} floats ({} x {}), the buffer holds {}",
                self.lens.len(),
                self.vocab_size,
                out.len()
            );
        }
        let _range = nvtx::range(nvtx::READ_LOGITS);
        self.state.read_logits(&mut out[..needed])?;
        Ok(needed)
    }

    /// Chooses the next token of every sequence under `params` and writes them to the front of
    /// `out`. Each sequence's random stream restarts from `params.seed` after a prefill or when
    /// `params` change, and continues across calls otherwise.
    /// See [`BackendState::set_device_timing`].
    pub fn set_device_timing(&mut self, on: bool) -> Result<()> {
        self.state.set_device_timing(on)
    }

    /// See [`BackendState::take_device_ms`].
    pub fn take_device_ms(&mut self) -> Option<f64> {
        self.state.take_device_ms()
    }

    pub fn select(&mut self, params: &SamplingParams, out: &mut [u32]) -> Result<usize> {
        params.validate()?;
        if self.lens.is_empty() {
            bail!(NotPrefilled, "no logits yet: call prefill first");
        }
        let batch = self.lens.len();
        if out.len() < batch {
            bail!(BufferTooSmall, "{batch} token ids to return, the buffer holds {}", out.len());
        }
        if self.sampler.params() != params {
            self.sampler.set_params(*params);
        }
        self.select_into(batch, out)?;
        Ok(batch)
    }

    /// The backend's selection of the batch's next tokens, inside its NVTX range.
    fn select_into(&mut self, batch: usize, out: &mut [u32]) -> Result<()> {
        let _range = nvtx::range(nvtx::SELECT);
        self.state.select(&mut self.sampler, &mut out[..batch])
    }

    /// Prefills `prompts` and decodes up to `params.max_new_tokens` tokens per sequence.
    ///
    /// `on_token(seq, token)` is called for every generated token in order (stop tokens are not
    /// reported); returning `false` ends the generation. `cancel` is polled before every step, so a
    /// store from another thread ends the generation within one step.
    pub fn generate(
        &mut self,
        tokens: &[u32],
        lengths: &[usize],
        params: &GenerateParams,
        cancel: &AtomicBool,
        on_token: &mut dyn FnMut(usize, u32) -> bool,
    ) -> Result<GenerateOutput> {
        let _range = nvtx::range(nvtx::GENERATE);
        params.sampling.validate()?;
        self.check_tokens(&params.stop_tokens)?;
        if let Some((i, l)) = lengths
            .iter()
            .enumerate()
            .find(|(_, l)| l.checked_add(params.max_new_tokens).is_none_or(|total| total > self.profile.max_seq))
        {
            bail!(
                SequenceExceedsProfile,
                "sequence {i}: {l} prompt tokens + {} new tokens exceed the session's max_seq {}",
                params.max_new_tokens,
                self.profile.max_seq
            );
        }
        if self.sampler.params() != &params.sampling {
            self.sampler.set_params(params.sampling);
        }
        self.prefill(tokens, lengths)?;
        let batch = lengths.len();
        let mut out = vec![Vec::with_capacity(params.max_new_tokens); batch];
        let mut done = vec![false; batch];
        let mut next = std::mem::take(&mut self.next);
        let result = (|| {
            for produced in 0..params.max_new_tokens {
                if cancel.load(Ordering::Relaxed) {
                    return Ok(FinishReason::Cancelled);
                }
                if produced > 0 {
                    self.step(&next[..batch])?;
                }
                self.select_into(batch, &mut next)?;
                for seq in 0..batch {
                    if done[seq] {
                        continue;
                    }
                    let token = next[seq];
                    if params.stop_tokens.contains(&token) {
                        done[seq] = true;
                        continue;
                    }
                    out[seq].push(token);
                    if !on_token(seq, token) {
                        return Ok(FinishReason::Callback);
                    }
                }
                if done.iter().all(|d| *d) {
                    return Ok(FinishReason::StopToken);
                }
            }
            Ok(FinishReason::Length)
        })();
        self.next = next;
        Ok(GenerateOutput { tokens: out, finish_reason: result? })
    }
}
