//! The decode contract: profile, prefill, step, last logits, next-token selection and the generate
//! loop. Every input is validated here, before it reaches a backend, and a failed call leaves the
//! decoder exactly as it was.

use crate::backend::{Backend, BackendState, Profile};
use crate::error::Result;
use crate::model::SplitMix64;
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
    /// After a generation that stopped with a step started ahead (see `generate`): the input of
    /// the last kept step, to replay once the positions are set back (`settle`), and room for
    /// those positions.
    replay: Vec<u32>,
    replay_pending: bool,
    rewind_lens: Vec<usize>,
    /// The sampler's streams before the last step started ahead drew (put back when it is undone).
    streams: Vec<SplitMix64>,
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
            replay: vec![0; profile.max_batch],
            replay_pending: false,
            rewind_lens: Vec::with_capacity(profile.max_batch),
            streams: Vec::with_capacity(profile.max_batch),
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
        self.replay_pending = false;
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
        self.settle()?;
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
        self.settle()?;
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
        self.settle()?;
        self.select_into(batch, out)?;
        Ok(batch)
    }

    /// Finishes undoing a step a generation started ahead and did not keep: the positions go back
    /// to before the last kept step, which is replayed, so that its logits are the last again.
    /// (Deferred until the session is used without a new prefill, which needs none of it.)
    fn settle(&mut self) -> Result<()> {
        if !self.replay_pending {
            return Ok(());
        }
        self.replay_pending = false;
        let batch = self.lens.len();
        self.rewind_lens.clear();
        self.rewind_lens.extend(self.lens.iter().map(|l| l - 1));
        let result = self.state.rewind(&self.rewind_lens).and_then(|()| {
            let _range = nvtx::range(nvtx::STEP);
            self.state.step(&self.replay[..batch])
        });
        if result.is_err() {
            self.lens.clear();
        }
        result
    }

    /// Starts the next step on the device ahead of the host (`BackendState::step_ahead`): 1 if
    /// the backend did, 0 if it declined.
    fn start_ahead(&mut self) -> Result<usize> {
        self.sampler.save_streams(&mut self.streams);
        let started = {
            let _range = nvtx::range(nvtx::STEP);
            self.state.step_ahead(&mut self.sampler)
        };
        match started {
            Ok(true) => {
                self.lens.iter_mut().for_each(|l| *l += 1);
                Ok(1)
            }
            Ok(false) => Ok(0),
            Err(e) => {
                self.lens.clear();
                Err(e)
            }
        }
    }

    /// The ids chosen after the oldest step started ahead.
    fn collect_into(&mut self, batch: usize, out: &mut [u32]) -> Result<()> {
        let _range = nvtx::range(nvtx::SELECT);
        let result = self.state.collect_ahead(&mut out[..batch]);
        if result.is_err() {
            self.lens.clear();
        }
        result
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
        // Generation keeps the next step queued on the device while the host reads the current
        // tokens and hands them out (steps started ahead, where the backend can; at most two
        // outstanding). A step started ahead that a stop leaves unused is undone: its draws at
        // once, the rest by `settle`.
        let pipelined = self.kv_cache && self.state.steps_ahead();
        let mut ahead = 0;
        let result = (|| {
            for produced in 0..params.max_new_tokens {
                if cancel.load(Ordering::Relaxed) {
                    return Ok(FinishReason::Cancelled);
                }
                if pipelined && produced > 0 {
                    if ahead == 0 {
                        ahead += self.start_ahead()?;
                    }
                    if ahead == 1 && produced + 1 < params.max_new_tokens {
                        ahead += self.start_ahead()?;
                    }
                }
                if ahead > 0 {
                    // The input of the step whose ids these are, for a replay.
                    self.replay[..batch].copy_from_slice(&next[..batch]);
                    self.collect_into(batch, &mut next)?;
                    ahead -= 1;
                } else {
                    if produced > 0 {
                        self.step(&next[..batch])?;
                    }
                    self.select_into(batch, &mut next)?;
                }
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
        debug_assert!(ahead <= 1, "at most one step is outstanding between iterations");
        if ahead > 0 && result.is_ok() {
            self.lens.iter_mut().for_each(|l| *l -= ahead);
            self.sampler.restore_streams(&self.streams);
            self.replay_pending = true;
        }
        self.next = next;
        Ok(GenerateOutput { tokens: out, finish_reason: result? })
    }
}

#[cfg(test)]
mod tests {
    //! The generate loop's steps started ahead, against a toy backend whose "model" is arithmetic:
    //! the same backend with and without them must leave every observable thing equal.
    use super::*;
    use crate::backend::BackendKind;
    use crate::model::ModelConfig;
    use std::collections::VecDeque;
    use std::sync::atomic::AtomicUsize;

    const VOCAB: usize = 13;

    #[derive(Debug)]
    struct Toy {
        config: ModelConfig,
        ahead: bool,
        started: Arc<AtomicUsize>,
    }

    impl Backend for Toy {
        fn kind(&self) -> BackendKind {
            BackendKind::Cpu
        }
        fn config(&self) -> &ModelConfig {
            &self.config
        }
        fn limits(&self) -> Profile {
            Profile { max_batch: 4, max_seq: 64 }
        }
        fn describe(&self) -> String {
            "toy".into()
        }
        fn new_state(&self, _profile: Profile, _kv_cache: bool) -> Result<Box<dyn BackendState>> {
            Ok(Box::new(ToyState { ahead: self.ahead, started: self.started.clone(), ..ToyState::default() }))
        }
    }

    /// Each sequence's state is (length, last token); its logits have one maximum that depends on
    /// both. Like a device, it keeps the ids of the last selection for a step started ahead, and
    /// a rewind sets the lengths only (the replayed step restores the last token).
    #[derive(Debug, Default)]
    struct ToyState {
        ahead: bool,
        started: Arc<AtomicUsize>,
        lens: Vec<usize>,
        last: Vec<u32>,
        device_ids: Vec<u32>,
        queue: VecDeque<Vec<u32>>,
    }

    impl ToyState {
        fn best(&self, seq: usize) -> u32 {
            ((7 * self.lens[seq] + 3 * self.last[seq] as usize + seq) % VOCAB) as u32
        }
        fn advance(&mut self, tokens: &[u32]) {
            for (seq, &t) in tokens.iter().enumerate() {
                self.lens[seq] += 1;
                self.last[seq] = t;
            }
        }
        /// The best id of each sequence, or with a draw one of the next few after it.
        fn choose(&self, sampler: &mut Sampler) -> Vec<u32> {
            (0..self.lens.len())
                .map(|s| {
                    let shift = sampler.draw(s).map_or(0, |u| (u * 4.0) as u32);
                    (self.best(s) + shift) % VOCAB as u32
                })
                .collect()
        }
    }

    impl BackendState for ToyState {
        fn prefill(&mut self, tokens: &[u32], lengths: &[usize]) -> Result<()> {
            self.lens = lengths.to_vec();
            let mut end = 0;
            self.last = lengths
                .iter()
                .map(|l| {
                    end += l;
                    tokens[end - 1]
                })
                .collect();
            self.queue.clear();
            Ok(())
        }
        fn step(&mut self, tokens: &[u32]) -> Result<()> {
            self.advance(tokens);
            Ok(())
        }
        fn read_logits(&mut self, out: &mut [f32]) -> Result<()> {
            for (seq, row) in out.chunks_mut(VOCAB).enumerate() {
                let best = self.best(seq) as usize;
                for (v, x) in row.iter_mut().enumerate() {
                    *x = if v == best { 1.0 } else { -(v as f32) / 100.0 };
                }
            }
            Ok(())
        }
        fn select(&mut self, sampler: &mut Sampler, out: &mut [u32]) -> Result<()> {
            self.device_ids = self.choose(sampler);
            out.copy_from_slice(&self.device_ids);
            Ok(())
        }
        fn steps_ahead(&self) -> bool {
            self.ahead
        }
        fn step_ahead(&mut self, sampler: &mut Sampler) -> Result<bool> {
            if !self.ahead || self.queue.len() >= 2 {
                return Ok(false);
            }
            self.started.fetch_add(1, Ordering::Relaxed);
            let ids = std::mem::take(&mut self.device_ids);
            self.advance(&ids);
            self.device_ids = self.choose(sampler);
            self.queue.push_back(self.device_ids.clone());
            Ok(true)
        }
        fn collect_ahead(&mut self, out: &mut [u32]) -> Result<()> {
            out.copy_from_slice(&self.queue.pop_front().expect("a step was started ahead"));
            Ok(())
        }
        fn rewind(&mut self, lens: &[usize]) -> Result<()> {
            self.queue.clear();
            self.lens = lens.to_vec();
            Ok(())
        }
    }

    fn decoder(ahead: bool, started: &Arc<AtomicUsize>) -> Decoder {
        let config = ModelConfig {
            n_layer: 1,
            n_embd: 8,
            n_head: 1,
            n_positions: 64,
            vocab_size: VOCAB,
            layer_norm_epsilon: 1e-5,
        };
        let backend = Arc::new(Toy { config, ahead, started: started.clone() });
        Decoder::new(backend, SessionOptions { max_batch: 4, max_seq: 40, kv_cache: true }).unwrap()
    }

    /// Generates with `stop` ending it after `calls` callbacks (0: never), then reads what a host
    /// can observe: the output, the lengths, the last logits, and a further select + step.
    fn observe(
        ahead: bool,
        batch: usize,
        stop: &str,
        calls: usize,
        max_new_tokens: usize,
        sampling: SamplingParams,
    ) -> (GenerateOutput, Vec<usize>, Vec<f32>, Vec<u32>, Vec<f32>, usize) {
        let started = Arc::new(AtomicUsize::new(0));
        let mut d = decoder(ahead, &started);
        let prompts: Vec<u32> = (0..batch * 3).map(|i| (i * 5 % VOCAB) as u32).collect();
        let cancel = AtomicBool::new(false);
        let params = GenerateParams {
            max_new_tokens,
            stop_tokens: if stop == "stop tokens" { vec![calls as u32] } else { Vec::new() },
            sampling,
        };
        let mut n = 0;
        let out = d
            .generate(&prompts, &vec![3; batch], &params, &cancel, &mut |_, _| {
                n += 1;
                if stop == "cancel" && n == calls {
                    cancel.store(true, Ordering::Relaxed);
                }
                !(stop == "callback" && n == calls)
            })
            .unwrap();
        let lengths = d.lengths().to_vec();
        let mut logits = vec![0.0; batch * VOCAB];
        d.read_logits(&mut logits).unwrap();
        let mut ids = vec![0; batch];
        // The same rules: sampled, this continues the streams where the generation left them.
        d.select(&sampling, &mut ids).unwrap();
        d.step(&ids).unwrap();
        let mut after = vec![0.0; batch * VOCAB];
        d.read_logits(&mut after).unwrap();
        (out, lengths, logits, ids, after, started.load(Ordering::Relaxed))
    }

    #[test]
    fn steps_started_ahead_change_nothing_a_host_can_observe() {
        let mut ahead_steps = 0;
        for batch in [1, 3] {
            for (stop, calls) in [
                ("length", 0),
                ("callback", 1),
                ("callback", 2),
                ("callback", 5),
                ("callback", 7),
                ("stop tokens", 4),
                ("stop tokens", 9),
                ("cancel", 1),
                ("cancel", 4),
            ] {
                for (max_new_tokens, sampling) in [1, 2, 3, 8].into_iter().flat_map(|n| {
                    [
                        (n, SamplingParams::greedy()),
                        (n, SamplingParams { temperature: 1.0, top_k: 0, top_p: 1.0, seed: 5 }),
                    ]
                }) {
                    let want = observe(false, batch, stop, calls, max_new_tokens, sampling);
                    let got = observe(true, batch, stop, calls, max_new_tokens, sampling);
                    let what = format!("batch {batch}, {stop} after {calls}, {max_new_tokens} tokens, {sampling:?}");
                    assert_eq!(want.5, 0, "{what}: the reference started steps ahead");
                    assert_eq!(
                        (&got.0, &got.1, &got.2, &got.3, &got.4),
                        (&want.0, &want.1, &want.2, &want.3, &want.4),
                        "{what}"
                    );
                    ahead_steps += got.5;
                }
            }
        }
        assert!(ahead_steps > 100, "the loop started only {ahead_steps} steps ahead");
    }
}
