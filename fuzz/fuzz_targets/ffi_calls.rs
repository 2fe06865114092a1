//! Random sequences of C ABI calls with random arguments against the CPU backend on the built-in
//! `tiny` model, exactly as a host makes them (the extern fns, raw pointers, NULLs, wrong sizes).
//!
//! A shadow model of each session (profile, batch, sequence lengths, pending cancel) predicts what
//! each call may answer: `Ok` when no documented rule is broken, otherwise one of the statuses of
//! the rules that are. Also checked: out-params untouched on failure (except the documented
//! required sizes), outputs in range, streamed pieces adding up to the generated text, re-entrant
//! calls from the token callback answering `SESSION_BUSY`, and, after every input, that each
//! session still gives the reference greedy token (a failed call left it usable and unchanged).
#![no_main]

use arbitrary::Arbitrary;
use gpt2rt::ffi::*;
use libfuzzer_sys::fuzz_target;
use std::ffi::{CStr, c_char, c_void};
use std::ptr::{null, null_mut};
use std::sync::OnceLock;

use gpt2rt_status as S;

const SLOTS: usize = 3;
/// The prompt of the after-each-input check (" The").
const PROBE: i32 = 383;

struct Shared {
    engine: *mut gpt2rt_engine,
    tokenizer: *mut gpt2rt_tokenizer,
    vocab: usize,
    n_positions: usize,
    max_batch: usize,
    /// Greedy token after `PROBE` on a fresh session.
    probe_next: i32,
}
// SAFETY: engines and tokenizers may be used from any thread (their documented contract).
unsafe impl Send for Shared {}
unsafe impl Sync for Shared {}

fn shared() -> &'static Shared {
    static SHARED: OnceLock<Shared> = OnceLock::new();
    SHARED.get_or_init(|| unsafe {
        let mut o = std::mem::zeroed::<gpt2rt_engine_options>();
        assert_eq!(gpt2rt_engine_options_default(&mut o), S::Ok);
        o.builtin_model = 2;
        o.backend = gpt2rt_backend::Cpu as u32;
        o.num_threads = 1;
        let mut engine = null_mut();
        assert_eq!(gpt2rt_engine_load(&o, &mut engine), S::Ok);
        let mut info = gpt2rt_model_info::default();
        assert_eq!(gpt2rt_engine_model_info(engine, &mut info), S::Ok);
        let mut tokenizer = null_mut();
        assert_eq!(gpt2rt_engine_tokenizer(engine, &mut tokenizer), S::Ok);
        let mut s = null_mut();
        assert_eq!(gpt2rt_session_create(engine, null(), &mut s), S::Ok);
        let probe_next = probe(s).expect("a fresh session answers the probe");
        gpt2rt_session_destroy(s);
        Shared {
            engine,
            tokenizer,
            vocab: info.vocab_size,
            n_positions: info.n_positions,
            max_batch: info.max_batch,
            probe_next,
        }
    })
}

/// Prefill `PROBE` and take the greedy token.
fn probe(s: *mut gpt2rt_session) -> Result<i32, gpt2rt_status> {
    let (tokens, lengths) = ([PROBE], [1u32]);
    let st = unsafe { gpt2rt_session_prefill(s, tokens.as_ptr(), 1, lengths.as_ptr(), 1) };
    if st != S::Ok {
        return Err(st);
    }
    let (mut next, mut count) = ([0i32], 0usize);
    let st = unsafe { gpt2rt_session_sample(s, null(), next.as_mut_ptr(), 1, &mut count) };
    if st != S::Ok {
        return Err(st);
    }
    assert_eq!(count, 1);
    Ok(next[0])
}

/// A number: mostly small, sometimes anything.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum Num {
    Small(u8),
    Medium(u16),
    Any(u64),
}

impl Num {
    fn get(self, small: usize, medium: usize) -> usize {
        match self {
            Num::Small(v) => v as usize % small,
            Num::Medium(v) => v as usize % medium,
            Num::Any(v) => v as usize,
        }
    }
}

/// A token id: mostly in the vocabulary, sometimes anything (negative, huge).
#[derive(Arbitrary, Debug, Clone, Copy)]
enum Tok {
    Valid(u16),
    Any(i32),
}

impl Tok {
    fn get(self, vocab: usize) -> i32 {
        match self {
            Tok::Valid(v) => (v as usize % vocab) as i32,
            Tok::Any(v) => v,
        }
    }
}

/// A caller buffer's size relative to what the call needs.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum Cap {
    Exact,
    Less(u16),
    More(u8),
    Zero,
    Null,
}

impl Cap {
    /// (capacity, pass NULL)
    fn get(self, needed: usize) -> (usize, bool) {
        match self {
            Cap::Exact => (needed, false),
            Cap::Less(d) => (needed.saturating_sub(1 + d as usize), false),
            Cap::More(d) => (needed + d as usize, false),
            Cap::Zero => (0, false),
            Cap::Null => (0, true),
        }
    }
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum StructSize {
    Right,
    Wrong(u16),
}

impl StructSize {
    fn get<T>(self) -> usize {
        let right = std::mem::size_of::<T>();
        match self {
            StructSize::Right => right,
            StructSize::Wrong(v) if v as usize == right => right + 1,
            StructSize::Wrong(v) => v as usize,
        }
    }
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Sampling {
    Greedy,
    Random { temperature: f32, top_k: u32, top_p: f32, seed: u64 },
    Valid { temperature: u8, top_k: u8, top_p: u8, seed: u64 },
}

impl Sampling {
    fn get(self) -> gpt2rt_sampling_options {
        match self {
            Sampling::Greedy => gpt2rt_sampling_options { temperature: 0.0, top_k: 0, top_p: 1.0, seed: 0 },
            Sampling::Random { temperature, top_k, top_p, seed } => {
                gpt2rt_sampling_options { temperature, top_k, top_p, seed }
            }
            Sampling::Valid { temperature, top_k, top_p, seed } => gpt2rt_sampling_options {
                temperature: temperature as f32 / 64.0,
                top_k: top_k as u32,
                top_p: (top_p as f32 + 1.0) / 256.0,
                seed,
            },
        }
    }
}

fn sampling_valid(o: &gpt2rt_sampling_options) -> bool {
    o.temperature.is_finite() && o.temperature >= 0.0 && o.top_p > 0.0 && o.top_p <= 1.0
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Callback {
    None,
    Collect,
    /// Returns non-zero at the n-th token.
    StopAt(u8),
    /// Calls the session re-entrantly (must be SESSION_BUSY), then cancels at the n-th token.
    CancelAt(u8),
}

#[derive(Arbitrary, Debug)]
struct GenOptions {
    struct_size: StructSize,
    max_new_tokens: Num,
    sampling: Sampling,
    stop_tokens: Vec<Tok>,
    /// Pass NULL stop tokens with this length.
    null_stops: Option<u8>,
    callback: Callback,
}

#[derive(Arbitrary, Debug)]
enum Op {
    Create {
        slot: u8,
        max_batch: Num,
        max_seq: Num,
        kv_cache: u8,
        struct_size: StructSize,
        null_options: bool,
    },
    Destroy {
        slot: u8,
    },
    Prefill {
        slot: u8,
        prompts: Vec<Vec<Tok>>,
        lengths: Option<Vec<u16>>,
        null_tokens: bool,
        null_lengths: bool,
    },
    Step {
        slot: u8,
        tokens: Vec<Tok>,
        null_tokens: bool,
    },
    ReadLogits {
        slot: u8,
        capacity: Cap,
        null_written: bool,
    },
    Sample {
        slot: u8,
        sampling: Option<Sampling>,
        capacity: Cap,
        null_count: bool,
    },
    Generate {
        slot: u8,
        prompt: Vec<u8>,
        options: Option<GenOptions>,
        null_out: bool,
    },
    GenerateTokens {
        slot: u8,
        prompts: Vec<Vec<Tok>>,
        lengths: Option<Vec<u16>>,
        options: Option<GenOptions>,
        capacity: Cap,
    },
    Cancel {
        slot: u8,
    },
    Batch {
        slot: u8,
        null_out: bool,
    },
    Profile {
        slot: u8,
        null_out: bool,
    },
    GeneratedText {
        slot: u8,
        capacity: Cap,
    },
    EngineInfo {
        capacity: Cap,
    },
    ModelInfo {
        null_out: bool,
    },
    StatusName(u32),
    NullHandles,
    EngineLoadRefused {
        variant: u8,
        value: u32,
        dir: Vec<u8>,
    },
}

/// What the harness knows of one session.
struct Shadow {
    s: *mut gpt2rt_session,
    max_batch: usize,
    max_seq: usize,
    /// Length of each sequence of the current batch; empty before a successful prefill.
    lens: Vec<usize>,
    /// A cancel no generation has consumed yet.
    cancel_pending: bool,
    /// The text of the last successful generate.
    text: Vec<u8>,
}

impl Drop for Shadow {
    fn drop(&mut self) {
        unsafe { gpt2rt_session_destroy(self.s) };
    }
}

/// Asserts `status` is Ok when nothing was violated, else one of the violated rules' statuses.
#[track_caller]
fn check(op: &str, status: gpt2rt_status, violated: &[gpt2rt_status]) {
    assert!(!matches!(status, S::Panic | S::Internal), "{op}: {status:?}: {}", last_error());
    if violated.is_empty() {
        assert_eq!(status, S::Ok, "{op}: {}", last_error());
    } else {
        assert!(violated.contains(&status), "{op}: got {status:?}, expected one of {violated:?}: {}", last_error());
        assert!(!last_error().is_empty(), "{op}: a failure without a message");
    }
}

fn last_error() -> String {
    unsafe { CStr::from_ptr(gpt2rt_last_error_message()) }.to_string_lossy().into_owned()
}

/// Flattens prompts into (tokens, lengths); `lengths` overrides the real ones when given.
fn layout(prompts: &[Vec<Tok>], lengths: &Option<Vec<u16>>, vocab: usize) -> (Vec<i32>, Vec<u32>) {
    let prompts = &prompts[..prompts.len().min(8)];
    let tokens: Vec<i32> = prompts.iter().flat_map(|p| p.iter().take(64).map(|t| t.get(vocab))).collect();
    let lens = match lengths {
        Some(l) => l.iter().take(8).map(|&x| x as u32).collect(),
        None => prompts.iter().map(|p| p.len().min(64) as u32).collect(),
    };
    (tokens, lens)
}

/// The statuses prefill may answer for these inputs on `sh` (empty = must succeed).
fn prefill_violations(sh: &Shadow, tokens: &[i32], lens: &[u32], vocab: usize) -> Vec<gpt2rt_status> {
    let mut v = Vec::new();
    if lens.len() > sh.max_batch {
        v.push(S::BatchExceedsProfile);
    }
    if tokens.len() > sh.max_batch * sh.max_seq {
        v.push(S::SequenceExceedsProfile);
    }
    if tokens.iter().any(|&t| t < 0 || t as usize >= vocab) {
        v.push(S::TokenOutOfRange);
    }
    if lens.is_empty() || lens.contains(&0) {
        v.push(S::InvalidArgument);
    }
    if lens.iter().any(|&l| l as usize > sh.max_seq) {
        v.push(S::SequenceExceedsProfile);
    }
    if lens.iter().map(|&l| l as usize).sum::<usize>() != tokens.len() {
        v.push(S::LengthMismatch);
    }
    v
}

/// What the token callback sees.
struct Stream {
    session: *const gpt2rt_session,
    mode: Callback,
    vocab: usize,
    /// Tokens reported per sequence.
    counts: Vec<usize>,
    pieces: Vec<u8>,
    /// Tokens reported when the callback stopped or cancelled.
    acted_at: Option<usize>,
}

unsafe extern "C" fn on_token(user_data: *mut c_void, seq: usize, token: i32, piece: *const c_char, len: usize) -> i32 {
    let st = unsafe { &mut *(user_data as *mut Stream) };
    let piece = unsafe { std::slice::from_raw_parts(piece.cast::<u8>(), len) };
    assert!(std::str::from_utf8(piece).is_ok(), "a piece that is not UTF-8");
    st.pieces.extend_from_slice(piece);
    if token < 0 {
        assert_eq!(token, -1, "only the tail call has a negative token");
        return 0;
    }
    assert!((token as usize) < st.vocab, "token {token} out of the vocabulary");
    assert!(seq < st.counts.len(), "sequence {seq} out of the batch");
    st.counts[seq] += 1;
    let total: usize = st.counts.iter().sum();
    match st.mode {
        Callback::StopAt(n) if st.acted_at.is_none() && total > n as usize % 8 => {
            st.acted_at = Some(total);
            1
        }
        Callback::CancelAt(n) if st.acted_at.is_none() && total > n as usize % 8 => {
            let mut batch = 0usize;
            let busy = unsafe { gpt2rt_session_batch(st.session, &mut batch) };
            assert_eq!(busy, S::SessionBusy, "a re-entrant call must be detected");
            assert_eq!(unsafe { gpt2rt_session_cancel(st.session) }, S::Ok);
            st.acted_at = Some(total);
            0
        }
        _ => 0,
    }
}

/// Generate options as a host would fill them, plus the buffers they point to.
struct BuiltOptions {
    o: gpt2rt_generate_options,
    stops: Vec<i32>,
    null_stops_len: Option<usize>,
    stream: Box<Stream>,
}

fn build_options(
    g: &Option<GenOptions>,
    session: *const gpt2rt_session,
    batch: usize,
) -> (Option<BuiltOptions>, usize) {
    let sh = shared();
    let mut o = unsafe { std::mem::zeroed::<gpt2rt_generate_options>() };
    unsafe { gpt2rt_generate_options_default(&mut o) };
    let Some(g) = g else {
        return (None, o.max_new_tokens);
    };
    let stops: Vec<i32> = g.stop_tokens.iter().take(4).map(|t| t.get(sh.vocab)).collect();
    let mut stream = Box::new(Stream {
        session,
        mode: g.callback,
        vocab: sh.vocab,
        counts: vec![0; batch],
        pieces: Vec::new(),
        acted_at: None,
    });
    o.struct_size = g.struct_size.get::<gpt2rt_generate_options>();
    o.max_new_tokens = g.max_new_tokens.get(10, 40);
    o.sampling = g.sampling.get();
    let null_stops_len = g.null_stops.map(|n| n as usize);
    match null_stops_len {
        Some(n) => {
            o.stop_tokens = null();
            o.n_stop_tokens = n;
        }
        None => {
            o.stop_tokens = stops.as_ptr();
            o.n_stop_tokens = stops.len();
        }
    }
    if !matches!(g.callback, Callback::None) {
        o.callback = Some(on_token);
        o.user_data = (&mut *stream as *mut Stream).cast();
    }
    let max_new = o.max_new_tokens;
    (Some(BuiltOptions { o, stops, null_stops_len, stream }), max_new)
}

/// Statuses the options themselves may cause, split into those found before the generation starts
/// (the pending cancel survives them) and after.
fn options_violations(b: &Option<BuiltOptions>, vocab: usize) -> (Vec<gpt2rt_status>, Vec<gpt2rt_status>) {
    let (mut early, mut late) = (Vec::new(), Vec::new());
    if let Some(b) = b {
        if b.o.struct_size != std::mem::size_of::<gpt2rt_generate_options>() {
            early.push(S::StructSize);
        }
        match b.null_stops_len {
            Some(n) if n > 0 => early.push(S::NullPointer),
            _ => {}
        }
        let stops: &[i32] = if b.null_stops_len.is_some() { &[] } else { &b.stops };
        if stops.iter().any(|&t| t < 0) {
            early.push(S::TokenOutOfRange);
        }
        if stops.iter().any(|&t| t >= 0 && t as usize >= vocab) {
            late.push(S::TokenOutOfRange);
        }
        if !sampling_valid(&b.o.sampling) {
            late.push(S::InvalidArgument);
        }
    }
    (early, late)
}

fn finish_ok(finish: gpt2rt_finish_reason) {
    assert!(matches!(finish as u32, 0..=3), "finish reason {}", finish as u32);
}

/// Updates the shadow after a successful generation that prefilled `prompt_lens` and produced
/// `counts`: every step appends to every sequence, and steps = selections - 1.
fn after_generation(
    sh: &mut Shadow,
    prompt_lens: &[usize],
    counts: &[usize],
    finish: gpt2rt_finish_reason,
    max_new: usize,
) {
    let most = counts.iter().copied().max().unwrap_or(0);
    assert!(most <= max_new, "{most} tokens for max_new_tokens {max_new}");
    let selections = match finish {
        gpt2rt_finish_reason::StopToken => most + 1,
        gpt2rt_finish_reason::Length => {
            assert!(counts.iter().all(|&c| c <= max_new));
            max_new
        }
        _ => most,
    };
    let steps = selections.saturating_sub(1);
    sh.lens = prompt_lens.iter().map(|&l| l + steps).collect();
    assert!(sh.lens.iter().all(|&l| l <= sh.max_seq));
    sh.cancel_pending = false;
}

fuzz_target!(|ops: Vec<Op>| {
    let sh = shared();
    let mut slots: [Option<Shadow>; SLOTS] = [None, None, None];
    for op in ops.into_iter().take(24) {
        run(op, sh, &mut slots);
    }
    for slot in slots.iter_mut() {
        if let Some(shadow) = slot.take() {
            // Whatever happened before, the session is usable and computes what a fresh one does.
            assert_eq!(probe(shadow.s), Ok(sh.probe_next), "the session drifted: {}", last_error());
        }
    }
});

fn run(op: Op, sh: &Shared, slots: &mut [Option<Shadow>; SLOTS]) {
    let vocab = sh.vocab;
    match op {
        Op::Create { slot, max_batch, max_seq, kv_cache, struct_size, null_options } => {
            let slot = slot as usize % SLOTS;
            slots[slot] = None;
            let mut o = unsafe { std::mem::zeroed::<gpt2rt_session_options>() };
            unsafe { gpt2rt_session_options_default(&mut o) };
            o.struct_size = struct_size.get::<gpt2rt_session_options>();
            o.max_batch = max_batch.get(6, 300);
            o.max_seq = max_seq.get(40, 600);
            o.kv_cache = kv_cache as u32 % 3;
            let mut s = std::ptr::dangling_mut::<gpt2rt_session>();
            let status = unsafe { gpt2rt_session_create(sh.engine, if null_options { null() } else { &o }, &mut s) };
            let (want_batch, want_seq) = if null_options {
                (1, sh.n_positions)
            } else {
                (o.max_batch, if o.max_seq == 0 { sh.n_positions } else { o.max_seq })
            };
            let mut v = Vec::new();
            if !null_options {
                if o.struct_size != std::mem::size_of::<gpt2rt_session_options>() {
                    v.push(S::StructSize);
                }
                if o.max_batch == 0 || o.max_batch > sh.max_batch || want_seq > sh.n_positions {
                    v.push(S::ProfileUnsupported);
                }
            }
            check("session_create", status, &v);
            if status != S::Ok {
                assert_eq!(s, std::ptr::dangling_mut::<gpt2rt_session>(), "out_session written on failure");
                return;
            }
            let (mut b, mut q) = (0, 0);
            assert_eq!(unsafe { gpt2rt_session_profile(s, &mut b, &mut q) }, S::Ok);
            assert_eq!((b, q), (want_batch, want_seq), "granted profile");
            slots[slot] =
                Some(Shadow { s, max_batch: b, max_seq: q, lens: Vec::new(), cancel_pending: false, text: Vec::new() });
        }
        Op::Destroy { slot } => slots[slot as usize % SLOTS] = None,
        Op::Prefill { slot, prompts, lengths, null_tokens, null_lengths } => {
            let Some(sd) = slots[slot as usize % SLOTS].as_mut() else { return };
            let (tokens, lens) = layout(&prompts, &lengths, vocab);
            let tp = if null_tokens { null() } else { tokens.as_ptr() };
            let lp = if null_lengths { null() } else { lens.as_ptr() };
            let status = unsafe { gpt2rt_session_prefill(sd.s, tp, tokens.len(), lp, lens.len()) };
            let mut v = prefill_violations(sd, &tokens, &lens, vocab);
            if (null_tokens && !tokens.is_empty()) || (null_lengths && !lens.is_empty()) {
                v.push(S::NullPointer);
            }
            check("prefill", status, &v);
            if status == S::Ok {
                sd.lens = lens.iter().map(|&l| l as usize).collect();
            }
        }
        Op::Step { slot, tokens, null_tokens } => {
            let Some(sd) = slots[slot as usize % SLOTS].as_mut() else { return };
            let tokens: Vec<i32> = tokens.iter().take(300).map(|t| t.get(vocab)).collect();
            let tp = if null_tokens { null() } else { tokens.as_ptr() };
            let status = unsafe { gpt2rt_session_step(sd.s, tp, tokens.len()) };
            let mut v = Vec::new();
            if null_tokens && !tokens.is_empty() {
                v.push(S::NullPointer);
            }
            if tokens.len() > sd.max_batch || tokens.len() != sd.lens.len() {
                v.push(S::LengthMismatch);
            }
            if tokens.iter().any(|&t| t < 0 || t as usize >= vocab) {
                v.push(S::TokenOutOfRange);
            }
            if sd.lens.is_empty() {
                v.push(S::NotPrefilled);
            }
            if sd.lens.iter().any(|&l| l >= sd.max_seq) {
                v.push(S::SequenceExceedsProfile);
            }
            check("step", status, &v);
            if status == S::Ok {
                sd.lens.iter_mut().for_each(|l| *l += 1);
            }
        }
        Op::ReadLogits { slot, capacity, null_written } => {
            let Some(sd) = slots[slot as usize % SLOTS].as_mut() else { return };
            let needed = sd.lens.len() * vocab;
            let (cap, null_buf) = capacity.get(needed);
            let mut buf = vec![f32::NAN; cap];
            let mut written = usize::MAX;
            let bp = if null_buf { null_mut() } else { buf.as_mut_ptr() };
            let wp = if null_written { null_mut() } else { &mut written as *mut usize };
            let status = unsafe { gpt2rt_session_read_logits(sd.s, bp, cap, wp) };
            let mut v = Vec::new();
            if null_written {
                v.push(S::NullPointer);
            }
            if sd.lens.is_empty() {
                v.push(S::NotPrefilled);
            } else if cap < needed {
                v.push(S::BufferTooSmall);
            }
            check("read_logits", status, &v);
            match status {
                S::Ok => {
                    assert_eq!(written, needed);
                    assert!(buf[..needed].iter().all(|x| x.is_finite()), "non-finite logits");
                    assert!(buf[needed..].iter().all(|x| x.is_nan()), "wrote past the logits");
                }
                S::BufferTooSmall => {
                    assert_eq!(written, needed, "the required size is reported");
                    assert!(buf.iter().all(|x| x.is_nan()), "buffer touched");
                }
                _ => assert_eq!(written, usize::MAX, "out_written written on failure"),
            }
        }
        Op::Sample { slot, sampling, capacity, null_count } => {
            let Some(sd) = slots[slot as usize % SLOTS].as_mut() else { return };
            let batch = sd.lens.len();
            let (cap, null_buf) = capacity.get(batch);
            let mut out = vec![i32::MIN; cap];
            let mut count = usize::MAX;
            let opts = sampling.map(Sampling::get);
            let op = opts.as_ref().map_or(null(), |o| o as *const gpt2rt_sampling_options);
            let bp = if null_buf { null_mut() } else { out.as_mut_ptr() };
            let cp = if null_count { null_mut() } else { &mut count as *mut usize };
            let status = unsafe { gpt2rt_session_sample(sd.s, op, bp, cap, cp) };
            let mut v = Vec::new();
            if null_count {
                v.push(S::NullPointer);
            }
            if opts.is_some_and(|o| !sampling_valid(&o)) {
                v.push(S::InvalidArgument);
            }
            if batch == 0 {
                v.push(S::NotPrefilled);
            } else if cap < batch {
                v.push(S::BufferTooSmall);
            }
            check("sample", status, &v);
            match status {
                S::Ok => {
                    assert_eq!(count, batch);
                    assert!(out[..batch].iter().all(|&t| t >= 0 && (t as usize) < vocab), "sampled id out of range");
                    assert!(out[batch..].iter().all(|&t| t == i32::MIN), "wrote past the ids");
                }
                S::BufferTooSmall => {
                    assert_eq!(count, batch, "the required size is reported");
                    assert!(out.iter().all(|&t| t == i32::MIN), "buffer touched");
                }
                _ => assert_eq!(count, usize::MAX, "out_count written on failure"),
            }
        }
        Op::Generate { slot, prompt, options, null_out } => {
            let Some(sd) = slots[slot as usize % SLOTS].as_mut() else { return };
            let prompt = &prompt[..prompt.len().min(256)];
            let (built, max_new) = build_options(&options, sd.s, 1);
            let (mut n, mut finish) = (usize::MAX, gpt2rt_finish_reason::Callback);
            let op = built.as_ref().map_or(null(), |b| &b.o as *const gpt2rt_generate_options);
            let np = if null_out { null_mut() } else { &mut n as *mut usize };
            let status =
                unsafe { gpt2rt_session_generate(sd.s, prompt.as_ptr().cast(), prompt.len(), op, np, &mut finish) };
            let utf8 = std::str::from_utf8(prompt).is_ok();
            let prompt_tokens = if utf8 { encoded_len(sh, prompt) } else { 0 };
            let (mut early, late) = options_violations(&built, vocab);
            if !utf8 {
                early.push(S::InvalidUtf8);
            }
            if null_out {
                early.push(S::NullPointer);
            }
            if utf8 && prompt_tokens == 0 {
                early.push(S::InvalidArgument);
            }
            let mut v = [early.clone(), late].concat();
            if prompt_tokens.checked_add(max_new).is_none_or(|total| total > sd.max_seq) {
                v.push(S::SequenceExceedsProfile);
            }
            check("generate", status, &v);
            if early.is_empty() {
                // The generation started: it consumes a pending cancel whatever it returns.
                if status == S::Ok && sd.cancel_pending && max_new > 0 {
                    assert_eq!((n, finish), (0, gpt2rt_finish_reason::Cancelled), "a pending cancel was lost");
                }
                sd.cancel_pending = false;
            }
            if status != S::Ok {
                assert_eq!(n, usize::MAX, "out_n_tokens written on failure");
                return;
            }
            finish_ok(finish);
            if let Some(b) = &built {
                check_stream(&b.stream, &b.o, finish, &[n]);
            }
            after_generation(sd, &[prompt_tokens], &[n], finish, max_new);
            let text = generated_text(sd.s);
            assert!(std::str::from_utf8(&text).is_ok(), "generated text is not UTF-8");
            if let Some(b) = &built
                && b.o.callback.is_some()
            {
                assert_eq!(b.stream.pieces, text, "streamed pieces do not add up to the text");
            }
            sd.text = text;
        }
        Op::GenerateTokens { slot, prompts, lengths, options, capacity } => {
            let Some(sd) = slots[slot as usize % SLOTS].as_mut() else { return };
            let (tokens, lens) = layout(&prompts, &lengths, vocab);
            let batch = lens.len();
            let (built, max_new) = build_options(&options, sd.s, batch);
            let needed = batch.checked_mul(max_new);
            let (cap, null_buf) = capacity.get(needed.unwrap_or(0).min(1 << 16));
            let mut out = vec![i32::MIN; cap];
            let mut counts = vec![usize::MAX; batch];
            let mut finish = gpt2rt_finish_reason::Callback;
            let op = built.as_ref().map_or(null(), |b| &b.o as *const gpt2rt_generate_options);
            let bp = if null_buf { null_mut() } else { out.as_mut_ptr() };
            let status = unsafe {
                gpt2rt_session_generate_tokens(
                    sd.s,
                    tokens.as_ptr(),
                    tokens.len(),
                    lens.as_ptr(),
                    batch,
                    op,
                    bp,
                    cap,
                    counts.as_mut_ptr(),
                    &mut finish,
                )
            };
            let (mut early, late) = options_violations(&built, vocab);
            match needed {
                None => early.push(S::InvalidArgument),
                Some(n) if cap < n => early.push(S::BufferTooSmall),
                _ => {}
            }
            if tokens.iter().any(|&t| t < 0) {
                early.push(S::TokenOutOfRange);
            }
            let mut v = [early.clone(), late, prefill_violations(sd, &tokens, &lens, vocab)].concat();
            if lens.iter().any(|&l| (l as usize).checked_add(max_new).is_none_or(|total| total > sd.max_seq)) {
                v.push(S::SequenceExceedsProfile);
            }
            check("generate_tokens", status, &v);
            if early.is_empty() {
                if status == S::Ok && sd.cancel_pending && max_new > 0 {
                    assert_eq!(finish, gpt2rt_finish_reason::Cancelled, "a pending cancel was lost");
                    assert!(counts.iter().all(|&c| c == 0));
                }
                sd.cancel_pending = false;
            }
            if status != S::Ok {
                assert!(counts.iter().all(|&c| c == usize::MAX), "out_counts written on failure");
                assert!(out.iter().all(|&t| t == i32::MIN), "out_tokens written on failure");
                return;
            }
            finish_ok(finish);
            for (seq, &c) in counts.iter().enumerate() {
                assert!(c <= max_new);
                let row = &out[seq * max_new..][..max_new];
                assert!(row[..c].iter().all(|&t| t >= 0 && (t as usize) < vocab), "generated id out of range");
                assert!(row[c..].iter().all(|&t| t == i32::MIN), "wrote past sequence {seq}'s tokens");
            }
            if let Some(b) = &built {
                check_stream(&b.stream, &b.o, finish, &counts);
            }
            let prompt_lens: Vec<usize> = lens.iter().map(|&l| l as usize).collect();
            after_generation(sd, &prompt_lens, &counts, finish, max_new);
        }
        Op::Cancel { slot } => {
            let Some(sd) = slots[slot as usize % SLOTS].as_mut() else { return };
            check("cancel", unsafe { gpt2rt_session_cancel(sd.s) }, &[]);
            sd.cancel_pending = true;
        }
        Op::Batch { slot, null_out } => {
            let Some(sd) = slots[slot as usize % SLOTS].as_mut() else { return };
            let mut b = usize::MAX;
            let status = unsafe { gpt2rt_session_batch(sd.s, if null_out { null_mut() } else { &mut b }) };
            check("batch", status, if null_out { &[S::NullPointer] } else { &[] });
            if status == S::Ok {
                assert_eq!(b, sd.lens.len());
            }
        }
        Op::Profile { slot, null_out } => {
            let Some(sd) = slots[slot as usize % SLOTS].as_mut() else { return };
            let (mut b, mut q) = (usize::MAX, usize::MAX);
            let status = unsafe { gpt2rt_session_profile(sd.s, if null_out { null_mut() } else { &mut b }, &mut q) };
            check("profile", status, if null_out { &[S::NullPointer] } else { &[] });
            if status == S::Ok {
                assert_eq!((b, q), (sd.max_batch, sd.max_seq));
            } else {
                assert_eq!(q, usize::MAX, "out_max_seq written on failure");
            }
        }
        Op::GeneratedText { slot, capacity } => {
            let Some(sd) = slots[slot as usize % SLOTS].as_mut() else { return };
            let (cap, null_buf) = capacity.get(sd.text.len());
            let mut buf = vec![0xA5u8; cap];
            let mut len = usize::MAX;
            let bp = if null_buf { null_mut() } else { buf.as_mut_ptr().cast() };
            let status = unsafe { gpt2rt_session_generated_text(sd.s, bp, cap, &mut len) };
            check("generated_text", status, if cap < sd.text.len() { &[S::BufferTooSmall] } else { &[] });
            assert_eq!(len, sd.text.len());
            if status == S::Ok {
                assert_eq!(&buf[..len], &sd.text[..]);
            } else {
                assert!(buf.iter().all(|&b| b == 0xA5), "buffer touched");
            }
        }
        Op::EngineInfo { capacity } => {
            let mut needed = 0usize;
            let status = unsafe { gpt2rt_engine_info(sh.engine, null_mut(), 0, &mut needed) };
            check("engine_info size", status, &[S::BufferTooSmall]);
            let (cap, null_buf) = capacity.get(needed);
            let mut buf = vec![0u8; cap];
            let mut len = 0usize;
            let bp = if null_buf { null_mut() } else { buf.as_mut_ptr().cast() };
            let status = unsafe { gpt2rt_engine_info(sh.engine, bp, cap, &mut len) };
            check("engine_info", status, if cap < needed { &[S::BufferTooSmall] } else { &[] });
            assert_eq!(len, needed);
            if status == S::Ok {
                assert!(std::str::from_utf8(&buf[..len]).is_ok());
            }
        }
        Op::ModelInfo { null_out } => {
            let mut info = gpt2rt_model_info::default();
            let status = unsafe { gpt2rt_engine_model_info(sh.engine, if null_out { null_mut() } else { &mut info }) };
            check("model_info", status, if null_out { &[S::NullPointer] } else { &[] });
            if status == S::Ok {
                assert_eq!((info.vocab_size, info.n_positions, info.max_batch), (vocab, sh.n_positions, sh.max_batch));
            }
        }
        Op::StatusName(code) => {
            let name = unsafe { CStr::from_ptr(gpt2rt_status_name(code)) }.to_str().unwrap();
            assert!(name.starts_with("GPT2RT_STATUS_"));
        }
        Op::NullHandles => unsafe {
            let mut x = 0usize;
            let mut y = 0usize;
            let t = [1i32];
            let l = [1u32];
            check("null prefill", gpt2rt_session_prefill(null(), t.as_ptr(), 1, l.as_ptr(), 1), &[S::NullPointer]);
            check("null step", gpt2rt_session_step(null(), t.as_ptr(), 1), &[S::NullPointer]);
            check("null batch", gpt2rt_session_batch(null(), &mut x), &[S::NullPointer]);
            check("null profile", gpt2rt_session_profile(null(), &mut x, &mut y), &[S::NullPointer]);
            check("null cancel", gpt2rt_session_cancel(null()), &[S::NullPointer]);
            check("null info", gpt2rt_engine_model_info(null(), &mut gpt2rt_model_info::default()), &[S::NullPointer]);
            let mut s = null_mut();
            check("null engine", gpt2rt_session_create(null(), null(), &mut s), &[S::NullPointer]);
            check("null out", gpt2rt_session_create(sh.engine, null(), null_mut()), &[S::NullPointer]);
            gpt2rt_session_destroy(null_mut());
            gpt2rt_engine_destroy(null_mut());
            gpt2rt_tokenizer_destroy(null_mut());
        },
        Op::EngineLoadRefused { variant, value, dir } => unsafe {
            let mut o = std::mem::zeroed::<gpt2rt_engine_options>();
            gpt2rt_engine_options_default(&mut o);
            o.builtin_model = 2;
            o.backend = gpt2rt_backend::Cpu as u32;
            let mut path = b"/nonexistent-gpt2rt/".to_vec();
            path.extend_from_slice(&dir[..dir.len().min(64)]);
            let want = match variant % 5 {
                0 => {
                    // Any size but those the library accepts: the current layout's and the 56-byte
                    // one before `nvtx` (a host built against the older header).
                    let accepted =
                        [std::mem::offset_of!(gpt2rt_engine_options, nvtx), size_of::<gpt2rt_engine_options>()];
                    let mut size = StructSize::Wrong(value as u16).get::<gpt2rt_engine_options>();
                    while accepted.contains(&size) {
                        size += 1;
                    }
                    o.struct_size = size;
                    S::StructSize
                }
                1 => {
                    o.backend = 4 + value % 1000;
                    S::InvalidArgument
                }
                2 => {
                    o.dtype = 4 + value % 1000;
                    S::InvalidArgument
                }
                3 => {
                    o.builtin_model = 3 + value % 1000;
                    S::InvalidArgument
                }
                _ => {
                    o.model_dir = path.as_ptr().cast();
                    o.model_dir_len = path.len();
                    if std::str::from_utf8(&path).is_ok() { S::FileNotFound } else { S::InvalidUtf8 }
                }
            };
            let mut e = std::ptr::dangling_mut::<gpt2rt_engine>();
            check("engine_load", gpt2rt_engine_load(&o, &mut e), &[want]);
            assert_eq!(e, std::ptr::dangling_mut::<gpt2rt_engine>(), "out_engine written on failure");
        },
    }
}

/// Checks what the callback saw against what the generation returned.
fn check_stream(st: &Stream, o: &gpt2rt_generate_options, finish: gpt2rt_finish_reason, counts: &[usize]) {
    if o.callback.is_none() {
        return;
    }
    assert_eq!(st.counts, counts, "the callback saw other token counts than returned");
    match (st.mode, st.acted_at) {
        (Callback::StopAt(_), Some(_)) => assert_eq!(finish, gpt2rt_finish_reason::Callback),
        (Callback::CancelAt(_), Some(at)) => {
            // The cancel ends the generation before its next step.
            let total: usize = counts.iter().sum();
            assert!(total <= at + counts.len(), "{total} tokens after a cancel at {at}");
            assert_ne!(finish, gpt2rt_finish_reason::Callback);
        }
        _ => assert_ne!(finish, gpt2rt_finish_reason::Callback),
    }
}

fn encoded_len(sh: &Shared, text: &[u8]) -> usize {
    let mut count = 0usize;
    let status =
        unsafe { gpt2rt_tokenizer_encode(sh.tokenizer, text.as_ptr().cast(), text.len(), null_mut(), 0, &mut count) };
    assert!(matches!(status, S::Ok | S::BufferTooSmall));
    count
}

fn generated_text(s: *const gpt2rt_session) -> Vec<u8> {
    let mut len = 0usize;
    let status = unsafe { gpt2rt_session_generated_text(s, null_mut(), 0, &mut len) };
    assert!(matches!(status, S::Ok | S::BufferTooSmall));
    let mut buf = vec![0u8; len];
    assert_eq!(unsafe { gpt2rt_session_generated_text(s, buf.as_mut_ptr().cast(), len, &mut len) }, S::Ok);
    buf
}
