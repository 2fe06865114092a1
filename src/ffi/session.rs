//! `gpt2rt_session`: one decode state (KV cache, activations, logits) bound to a profile.

use super::{
    arg_mut, arg_ref, arg_slice, arg_slice_mut, arg_str, check_struct_size, copy_out, gpt2rt_engine, gpt2rt_status,
    guard, tokens_from_c,
};
use crate::api::Session;
use crate::decode::{FinishReason, GenerateParams, SessionOptions};
use crate::error::{ErrorKind, Result};
use crate::sampling::SamplingParams;
use std::cell::UnsafeCell;
use std::ffi::{c_char, c_void};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// A decode session: KV cache and every buffer it needs, allocated once at creation.
///
/// Thread-safety: one thread at a time. A call made while another thread is inside a call on the
/// same session returns `GPT2RT_STATUS_SESSION_BUSY` (detected, never undefined behaviour), except
/// `gpt2rt_session_cancel`, which any thread may call at any time.
/// Lifetime: keeps its engine alive; destroy it exactly once, when no call on it is running.
pub struct gpt2rt_session {
    busy: AtomicBool,
    cancel: Arc<AtomicBool>,
    inner: UnsafeCell<Inner>,
}

struct Inner {
    session: Session,
    tokens: Vec<u32>,
    lengths: Vec<usize>,
    ids: Vec<u32>,
    last_text: String,
}

// SAFETY: `inner` is only reached through `with_session`, which the `busy` flag makes exclusive.
unsafe impl Sync for gpt2rt_session {}

impl gpt2rt_session {
    fn with_session<T>(&self, body: impl FnOnce(&mut Inner) -> Result<T>) -> Result<T> {
        if self.busy.swap(true, Ordering::Acquire) {
            bail!(SessionBusy, "the session is in use by another thread");
        }
        struct Release<'a>(&'a AtomicBool);
        impl Drop for Release<'_> {
            fn drop(&mut self) {
                self.0.store(false, Ordering::Release);
            }
        }
        let _release = Release(&self.busy);
        // SAFETY: the busy flag was false and is now ours until `_release` drops.
        body(unsafe { &mut *self.inner.get() })
    }
}

/// Options of `gpt2rt_session_create`. Fill with `gpt2rt_session_options_default` first.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct gpt2rt_session_options {
    pub struct_size: usize,
    /// Most sequences decoded together (default 1).
    pub max_batch: usize,
    /// Longest sequence, prompt + generated (default 0 = the model's n_positions).
    pub max_seq: usize,
    /// 1 (default): KV cache. 0: recompute the whole sequence every step (the original study's
    /// O(L^2) path, for comparison).
    pub kv_cache: u32,
}

/// Fills `options` with the defaults.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn gpt2rt_session_options_default(options: *mut gpt2rt_session_options) -> gpt2rt_status {
    guard(|| {
        let o = unsafe { arg_mut(options, "options") }?;
        let d = SessionOptions::default();
        *o = gpt2rt_session_options {
            struct_size: std::mem::size_of::<gpt2rt_session_options>(),
            max_batch: d.max_batch,
            max_seq: d.max_seq,
            kv_cache: d.kv_cache as u32,
        };
        Ok(())
    })
}

/// Creates a session on `engine` (`options` NULL = defaults). A profile outside the engine's
/// limits fails with `GPT2RT_STATUS_PROFILE_UNSUPPORTED` and a message naming them.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn gpt2rt_session_create(
    engine: *const gpt2rt_engine,
    options: *const gpt2rt_session_options,
    out_session: *mut *mut gpt2rt_session,
) -> gpt2rt_status {
    guard(|| {
        let engine = &unsafe { arg_ref(engine, "engine") }?.engine;
        let out = unsafe { arg_mut(out_session, "out_session") }?;
        let mut opts = SessionOptions::default();
        if let Some(o) = unsafe { options.as_ref() } {
            check_struct_size::<gpt2rt_session_options>(o.struct_size, "gpt2rt_session_options")?;
            opts = SessionOptions { max_batch: o.max_batch, max_seq: o.max_seq, kv_cache: o.kv_cache != 0 };
        }
        let session = engine.new_session(opts)?;
        let profile = session.profile();
        let cancel = session.cancel_flag();
        let inner = Inner {
            session,
            tokens: Vec::with_capacity(profile.max_batch * profile.max_seq),
            lengths: Vec::with_capacity(profile.max_batch),
            ids: vec![0; profile.max_batch],
            last_text: String::new(),
        };
        *out = Box::into_raw(Box::new(gpt2rt_session {
            busy: AtomicBool::new(false),
            cancel,
            inner: UnsafeCell::new(inner),
        }));
        Ok(())
    })
}

/// Releases a session. NULL is accepted and ignored.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn gpt2rt_session_destroy(session: *mut gpt2rt_session) {
    if !session.is_null() {
        // SAFETY: the pointer came from gpt2rt_session_create and the host destroys it once.
        drop(unsafe { Box::from_raw(session) });
    }
}

/// The profile the session was granted.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn gpt2rt_session_profile(
    session: *const gpt2rt_session,
    out_max_batch: *mut usize,
    out_max_seq: *mut usize,
) -> gpt2rt_status {
    guard(|| {
        let s = unsafe { arg_ref(session, "session") }?;
        let max_batch = unsafe { arg_mut(out_max_batch, "out_max_batch") }?;
        let max_seq = unsafe { arg_mut(out_max_seq, "out_max_seq") }?;
        let profile = s.with_session(|inner| Ok(inner.session.profile()))?;
        *max_batch = profile.max_batch;
        *max_seq = profile.max_seq;
        Ok(())
    })
}

/// Runs a ragged batch of prompts: `tokens` holds them back to back (`n_tokens` in all),
/// `lengths[i]` is prompt i's length, `batch` the number of prompts. Fills the KV cache and
/// computes each sequence's next-token logits. Replaces any earlier batch.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn gpt2rt_session_prefill(
    session: *const gpt2rt_session,
    tokens: *const i32,
    n_tokens: usize,
    lengths: *const u32,
    batch: usize,
) -> gpt2rt_status {
    guard(|| {
        let s = unsafe { arg_ref(session, "session") }?;
        let tokens = unsafe { arg_slice(tokens, n_tokens, "tokens") }?;
        let lengths = unsafe { arg_slice(lengths, batch, "lengths") }?;
        s.with_session(|inner| {
            if lengths.len() > inner.lengths.capacity() {
                bail!(
                    BatchExceedsProfile,
                    "batch of {} sequences exceeds the session's max_batch {}",
                    lengths.len(),
                    inner.session.profile().max_batch
                );
            }
            if tokens.len() > inner.tokens.capacity() {
                bail!(
                    SequenceExceedsProfile,
                    "{} prompt tokens exceed what the session's profile can hold ({})",
                    tokens.len(),
                    inner.tokens.capacity()
                );
            }
            tokens_from_c(tokens, &mut inner.tokens)?;
            inner.lengths.clear();
            inner.lengths.extend(lengths.iter().map(|&l| l as usize));
            inner.session.prefill(&inner.tokens, &inner.lengths)
        })
    })
}

/// Appends one token per sequence of the current batch (`batch` must equal it) and computes the
/// next logits. Fails with `GPT2RT_STATUS_NOT_PREFILLED` before a successful prefill.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn gpt2rt_session_step(
    session: *const gpt2rt_session,
    tokens: *const i32,
    batch: usize,
) -> gpt2rt_status {
    guard(|| {
        let s = unsafe { arg_ref(session, "session") }?;
        let tokens = unsafe { arg_slice(tokens, batch, "tokens") }?;
        s.with_session(|inner| {
            if tokens.len() > inner.ids.len() {
                bail!(
                    LengthMismatch,
                    "step needs one token per sequence: the batch has {} but {} were given",
                    inner.session.batch(),
                    tokens.len()
                );
            }
            // The prompt buffer holds max_batch * max_seq ids, so this conversion never allocates.
            tokens_from_c(tokens, &mut inner.tokens)?;
            inner.session.step(&inner.tokens)
        })
    })
}

/// Copies the last prefill/step's logits, `[batch][vocab]` f32, into `out_logits` (capacity in
/// floats); only these floats cross to the host. `*out_written` receives batch * vocab. Required-size
/// convention: when `capacity` is smaller (or `(NULL, 0)` is passed) the status is
/// `GPT2RT_STATUS_BUFFER_TOO_SMALL`, `*out_written` still receives the size needed, and
/// `out_logits` is untouched.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn gpt2rt_session_read_logits(
    session: *const gpt2rt_session,
    out_logits: *mut f32,
    capacity: usize,
    out_written: *mut usize,
) -> gpt2rt_status {
    guard(|| {
        let s = unsafe { arg_ref(session, "session") }?;
        let written = unsafe { arg_mut(out_written, "out_written") }?;
        let out = unsafe { arg_slice_mut(out_logits, capacity, "out_logits") }?;
        s.with_session(|inner| {
            let needed = inner.session.batch() * inner.session.engine().config().vocab_size;
            match inner.session.read_logits(out) {
                Ok(n) => {
                    *written = n;
                    Ok(())
                }
                Err(e) => {
                    if e.kind() == ErrorKind::BufferTooSmall {
                        *written = needed;
                    }
                    Err(e)
                }
            }
        })
    })
}

/// The number of sequences in the session's current batch (0 before the first prefill): the
/// number of tokens `gpt2rt_session_step` expects and `gpt2rt_session_sample` returns.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn gpt2rt_session_batch(session: *const gpt2rt_session, out_batch: *mut usize) -> gpt2rt_status {
    guard(|| {
        let s = unsafe { arg_ref(session, "session") }?;
        let out = unsafe { arg_mut(out_batch, "out_batch") }?;
        *out = s.with_session(|inner| Ok(inner.session.batch()))?;
        Ok(())
    })
}

/// Sampling rules for `gpt2rt_session_sample` and generation. Tokens rank by logit (then smaller
/// id); the first `top_k` are kept, then the shortest ranked prefix reaching `top_p` of their
/// probability; the draw walks the kept tokens in id order. Every backend follows these rules with
/// the same per-sequence random streams, on the device where there is one.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct gpt2rt_sampling_options {
    /// 0 = greedy (argmax); otherwise logits are divided by it before softmax.
    pub temperature: f32,
    /// Keep the k most likely tokens; 0 = no limit.
    pub top_k: u32,
    /// Nucleus threshold in (0, 1]; 1 = off.
    pub top_p: f32,
    /// Seed of the per-sequence random streams.
    pub seed: u64,
}

/// Fills `options` with greedy decoding (temperature 0, top_k 0, top_p 1, seed 0). Note that an
/// all-zero struct is not valid (top_p must be in (0, 1]).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn gpt2rt_sampling_options_default(options: *mut gpt2rt_sampling_options) -> gpt2rt_status {
    guard(|| {
        *unsafe { arg_mut(options, "options") }? = gpt2rt_sampling_options::from_params(SamplingParams::greedy());
        Ok(())
    })
}

impl gpt2rt_sampling_options {
    fn from_params(p: SamplingParams) -> Self {
        Self { temperature: p.temperature, top_k: p.top_k as u32, top_p: p.top_p, seed: p.seed }
    }

    fn to_params(self) -> SamplingParams {
        SamplingParams { temperature: self.temperature, top_k: self.top_k as usize, top_p: self.top_p, seed: self.seed }
    }
}

/// Chooses each sequence's next token (greedy when `sampling` is NULL) and writes the `batch` ids
/// to `out_tokens`; only these ids cross to the host. When `capacity` is smaller than the batch the
/// status is `GPT2RT_STATUS_BUFFER_TOO_SMALL` and `*out_count` receives the batch size. Each sequence's random stream restarts from
/// the seed after a prefill or when the options change, and continues across calls otherwise.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn gpt2rt_session_sample(
    session: *const gpt2rt_session,
    sampling: *const gpt2rt_sampling_options,
    out_tokens: *mut i32,
    capacity: usize,
    out_count: *mut usize,
) -> gpt2rt_status {
    guard(|| {
        let s = unsafe { arg_ref(session, "session") }?;
        let count = unsafe { arg_mut(out_count, "out_count") }?;
        let out = unsafe { arg_slice_mut(out_tokens, capacity, "out_tokens") }?;
        let params = unsafe { sampling.as_ref() }.map_or(SamplingParams::greedy(), |o| o.to_params());
        s.with_session(|inner| {
            let batch = inner.session.batch();
            if batch > 0 && out.len() < batch {
                *count = batch;
                bail!(BufferTooSmall, "{batch} token ids to return, the buffer holds {}", out.len());
            }
            let mut ids = std::mem::take(&mut inner.ids);
            let result = inner.session.select(&params, &mut ids);
            if let Ok(n) = result {
                for (o, id) in out.iter_mut().zip(&ids[..n]) {
                    *o = *id as i32;
                }
                *count = n;
            }
            inner.ids = ids;
            result.map(|_| ())
        })
    })
}

/// Called for every generated token: `seq` is the sequence index, `piece`/`piece_len` the UTF-8
/// text this token completes (possibly empty; not NUL-terminated; valid during the call only).
/// Text generation ends with one call with `token = -1` when bytes of an incomplete character
/// were still pending (they arrive as U+FFFD), so the pieces add up to the generated text.
/// Return 0 to continue, non-zero to stop. Runs on the thread that called generate.
pub type gpt2rt_token_callback = Option<
    unsafe extern "C" fn(user_data: *mut c_void, seq: usize, token: i32, piece: *const c_char, piece_len: usize) -> i32,
>;

/// Why a generation ended.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum gpt2rt_finish_reason {
    /// max_new_tokens were produced.
    Length = 0,
    /// Every sequence produced a stop token.
    StopToken = 1,
    /// `gpt2rt_session_cancel` was called.
    Cancelled = 2,
    /// The token callback returned non-zero.
    Callback = 3,
}

/// Options of generation. Fill with `gpt2rt_generate_options_default` first.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct gpt2rt_generate_options {
    pub struct_size: usize,
    /// Tokens to generate per sequence (default 32).
    pub max_new_tokens: usize,
    /// Default greedy.
    pub sampling: gpt2rt_sampling_options,
    /// Tokens that end a sequence (not included in the output); NULL/0 = none (default).
    pub stop_tokens: *const i32,
    pub n_stop_tokens: usize,
    /// Optional streaming callback and its user data.
    pub callback: gpt2rt_token_callback,
    pub user_data: *mut c_void,
}

/// Fills `options` with the defaults (32 new tokens, greedy, no stop tokens, no callback).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn gpt2rt_generate_options_default(options: *mut gpt2rt_generate_options) -> gpt2rt_status {
    guard(|| {
        let o = unsafe { arg_mut(options, "options") }?;
        let d = GenerateParams::default();
        *o = gpt2rt_generate_options {
            struct_size: std::mem::size_of::<gpt2rt_generate_options>(),
            max_new_tokens: d.max_new_tokens,
            sampling: gpt2rt_sampling_options::from_params(d.sampling),
            stop_tokens: std::ptr::null(),
            n_stop_tokens: 0,
            callback: None,
            user_data: std::ptr::null_mut(),
        };
        Ok(())
    })
}

/// The host's options, or the defaults when it passed NULL.
fn options_or_default(options: *const gpt2rt_generate_options) -> gpt2rt_generate_options {
    match unsafe { options.as_ref() } {
        Some(o) => *o,
        None => {
            let mut defaults = std::mem::MaybeUninit::<gpt2rt_generate_options>::uninit();
            // SAFETY: the default function fills every field of the struct.
            unsafe {
                gpt2rt_generate_options_default(defaults.as_mut_ptr());
                defaults.assume_init()
            }
        }
    }
}

fn generate_params(o: &gpt2rt_generate_options) -> Result<GenerateParams> {
    check_struct_size::<gpt2rt_generate_options>(o.struct_size, "gpt2rt_generate_options")?;
    let stops = unsafe { arg_slice(o.stop_tokens, o.n_stop_tokens, "options.stop_tokens") }?;
    let mut stop_tokens = Vec::new();
    tokens_from_c(stops, &mut stop_tokens)?;
    Ok(GenerateParams { max_new_tokens: o.max_new_tokens, sampling: o.sampling.to_params(), stop_tokens })
}

fn finish_to_c(reason: FinishReason) -> gpt2rt_finish_reason {
    match reason {
        FinishReason::Length => gpt2rt_finish_reason::Length,
        FinishReason::StopToken => gpt2rt_finish_reason::StopToken,
        FinishReason::Cancelled => gpt2rt_finish_reason::Cancelled,
        FinishReason::Callback => gpt2rt_finish_reason::Callback,
    }
}

/// Calls the host callback for one token.
fn invoke(o: &gpt2rt_generate_options, seq: usize, token: Option<u32>, piece: &str) -> bool {
    let token = token.map_or(-1, |t| t as i32);
    match o.callback {
        // SAFETY: the host's callback with its own user_data, called on the host's thread.
        Some(cb) => unsafe { cb(o.user_data, seq, token, piece.as_ptr().cast(), piece.len()) == 0 },
        None => true,
    }
}

/// Encodes `prompt` (UTF-8, `prompt_len` bytes), generates, and keeps the generated text in the
/// session (fetch it with `gpt2rt_session_generated_text`). `options` NULL = defaults. Cancellation
/// and a stopping callback are not errors: `*out_finish` says why it ended and `*out_n_tokens` how
/// many tokens were produced; everything produced is kept.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn gpt2rt_session_generate(
    session: *const gpt2rt_session,
    prompt: *const c_char,
    prompt_len: usize,
    options: *const gpt2rt_generate_options,
    out_n_tokens: *mut usize,
    out_finish: *mut gpt2rt_finish_reason,
) -> gpt2rt_status {
    guard(|| {
        let s = unsafe { arg_ref(session, "session") }?;
        let prompt = unsafe { arg_str(prompt, prompt_len, "prompt") }?;
        let n_tokens = unsafe { arg_mut(out_n_tokens, "out_n_tokens") }?;
        let finish = unsafe { arg_mut(out_finish, "out_finish") }?;
        let o = options_or_default(options);
        let params = generate_params(&o)?;
        let out = s.with_session(|inner| {
            let out = inner.session.generate_text(prompt, &params, &mut |token, piece| invoke(&o, 0, token, piece))?;
            inner.last_text.clone_from(&out.text);
            Ok(out)
        })?;
        *n_tokens = out.tokens.len();
        *finish = finish_to_c(out.finish_reason);
        Ok(())
    })
}

/// The text of the last `gpt2rt_session_generate` (UTF-8, no NUL). Required-size convention:
/// `*out_len` always receives the size needed; a smaller `capacity` gives
/// `GPT2RT_STATUS_BUFFER_TOO_SMALL` and leaves `buffer` untouched.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn gpt2rt_session_generated_text(
    session: *const gpt2rt_session,
    buffer: *mut c_char,
    capacity: usize,
    out_len: *mut usize,
) -> gpt2rt_status {
    guard(|| {
        let s = unsafe { arg_ref(session, "session") }?;
        s.with_session(|inner| unsafe { copy_out(inner.last_text.as_bytes(), buffer, capacity, out_len) })
    })
}

/// Generates from a ragged batch of token prompts (layout as `gpt2rt_session_prefill`); `options`
/// NULL = defaults. The
/// tokens of sequence i go to `out_tokens[i * max_new_tokens ..]` (capacity in ints, at least
/// batch * max_new_tokens) and their count to `out_counts[i]` (capacity `batch`).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn gpt2rt_session_generate_tokens(
    session: *const gpt2rt_session,
    tokens: *const i32,
    n_tokens: usize,
    lengths: *const u32,
    batch: usize,
    options: *const gpt2rt_generate_options,
    out_tokens: *mut i32,
    out_capacity: usize,
    out_counts: *mut usize,
    out_finish: *mut gpt2rt_finish_reason,
) -> gpt2rt_status {
    guard(|| {
        let s = unsafe { arg_ref(session, "session") }?;
        let tokens = unsafe { arg_slice(tokens, n_tokens, "tokens") }?;
        let lengths = unsafe { arg_slice(lengths, batch, "lengths") }?;
        let o = options_or_default(options);
        let params = generate_params(&o)?;
        let needed = batch
            .checked_mul(params.max_new_tokens)
            .ok_or_else(|| err!(InvalidArgument, "batch * max_new_tokens overflows"))?;
        let out = unsafe { arg_slice_mut(out_tokens, out_capacity, "out_tokens") }?;
        if out.len() < needed {
            bail!(
                BufferTooSmall,
                "out_tokens needs {needed} ints (batch {batch} x max_new_tokens {}), it holds {}",
                params.max_new_tokens,
                out.len()
            );
        }
        let counts = unsafe { arg_slice_mut(out_counts, batch, "out_counts") }?;
        let finish = unsafe { arg_mut(out_finish, "out_finish") }?;
        let mut ids = Vec::with_capacity(tokens.len());
        tokens_from_c(tokens, &mut ids)?;
        let lens: Vec<usize> = lengths.iter().map(|&l| l as usize).collect();
        let result = s.with_session(|inner| {
            inner
                .session
                .generate_tokens(&ids, &lens, &params, &mut |seq, token, piece| invoke(&o, seq, Some(token), piece))
        })?;
        for (seq, generated) in result.tokens.iter().enumerate() {
            for (slot, t) in out[seq * params.max_new_tokens..].iter_mut().zip(generated) {
                *slot = *t as i32;
            }
            counts[seq] = generated.len();
        }
        *finish = finish_to_c(result.finish_reason);
        Ok(())
    })
}

/// Asks the generation running on `session` to stop; it ends within one step with finish reason
/// `GPT2RT_FINISH_REASON_CANCELLED`. Safe from any thread, also while the session is busy. A
/// cancel that arrives while no generation runs is kept and cancels the next one before its
/// first step (so a cancel racing with the start of a generation is never lost). A generation that
/// gets past its argument checks clears the request when it returns; one refused before decoding
/// (bad options, invalid prompt, `GPT2RT_STATUS_SESSION_BUSY`) leaves it pending.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn gpt2rt_session_cancel(session: *const gpt2rt_session) -> gpt2rt_status {
    guard(|| {
        let s = unsafe { arg_ref(session, "session") }?;
        s.cancel.store(true, Ordering::Relaxed);
        Ok(())
    })
}
