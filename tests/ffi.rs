//! The C ABI, called exactly as a C host calls it: every bad input returns its own status and a
//! message, out-params are untouched on failure, and the session stays usable afterwards.

#[path = "common/capi.rs"]
mod capi;

use capi::{last_error, session, tiny_engine};
use gpt2rt::ffi::*;
use std::ffi::{CStr, c_char, c_void};
use std::ptr::{null, null_mut};

/// Asserts `status`, and that the thread's message mentions `needle`.
#[track_caller]
fn expect(status: gpt2rt_status, want: gpt2rt_status, needle: &str) {
    assert_eq!(status, want, "message: {}", last_error());
    if want != gpt2rt_status::Ok {
        let msg = last_error();
        assert!(msg.contains(needle), "{want:?}: message {msg:?} should mention {needle:?}");
    }
}

#[test]
fn versions_and_status_names() {
    assert_eq!(gpt2rt_abi_version(), GPT2RT_ABI_VERSION);
    let name = unsafe { CStr::from_ptr(gpt2rt_status_name(gpt2rt_status::TokenOutOfRange as u32)) };
    assert_eq!(name.to_str().unwrap(), "GPT2RT_STATUS_TOKEN_OUT_OF_RANGE");
    let unknown = unsafe { CStr::from_ptr(gpt2rt_status_name(12345)) };
    assert_eq!(unknown.to_str().unwrap(), "GPT2RT_STATUS_UNKNOWN");
}

#[test]
fn engine_load_errors() {
    unsafe {
        expect(gpt2rt_engine_load(null(), null_mut()), gpt2rt_status::NullPointer, "out_engine");
        let mut o = std::mem::zeroed::<gpt2rt_engine_options>();
        gpt2rt_engine_options_default(&mut o);
        let mut e: *mut gpt2rt_engine = std::ptr::dangling_mut();
        let bad_size = gpt2rt_engine_options { struct_size: 8, ..o };
        expect(gpt2rt_engine_load(&bad_size, &mut e), gpt2rt_status::StructSize, "struct_size");
        assert_eq!(e, std::ptr::dangling_mut(), "out-param untouched on failure");
        let dir = b"/nonexistent/model";
        let missing = gpt2rt_engine_options { model_dir: dir.as_ptr().cast(), model_dir_len: dir.len(), ..o };
        expect(gpt2rt_engine_load(&missing, &mut e), gpt2rt_status::FileNotFound, "/nonexistent/model");
        let bad_utf8 = [0xffu8, 0xfe];
        let o2 = gpt2rt_engine_options { model_dir: bad_utf8.as_ptr().cast(), model_dir_len: 2, ..o };
        expect(gpt2rt_engine_load(&o2, &mut e), gpt2rt_status::InvalidUtf8, "model_dir");
        let o3 = gpt2rt_engine_options { model_dir: null(), model_dir_len: 5, ..o };
        expect(gpt2rt_engine_load(&o3, &mut e), gpt2rt_status::NullPointer, "model_dir");
        let o4 = gpt2rt_engine_options { backend: 77, ..o };
        expect(gpt2rt_engine_load(&o4, &mut e), gpt2rt_status::InvalidArgument, "backend");
        let o5 = gpt2rt_engine_options { backend: gpt2rt_backend::Tensorrt as u32, builtin_model: 2, ..o };
        expect(gpt2rt_engine_load(&o5, &mut e), gpt2rt_status::BackendUnavailable, "tensorrt");
        assert_eq!(e, std::ptr::dangling_mut());
        gpt2rt_engine_destroy(null_mut());
    }
}

#[test]
fn engine_options_of_the_older_layout_are_read_up_to_their_struct_size() {
    unsafe {
        let mut o = std::mem::zeroed::<gpt2rt_engine_options>();
        gpt2rt_engine_options_default(&mut o);
        assert_eq!(o.struct_size, std::mem::size_of::<gpt2rt_engine_options>());
        assert_eq!(o.nvtx, 0, "NVTX is off by default");
        o.builtin_model = 2;
        o.backend = gpt2rt_backend::Cpu as u32;
        o.num_threads = 1;
        // A host built before `nvtx` was appended: 56 bytes, followed here by bytes that would
        // turn NVTX on if the library read past the host's struct_size.
        let old_size = std::mem::offset_of!(gpt2rt_engine_options, nvtx);
        assert_eq!(old_size, 56);
        let mut buffer = [0xffu64; 8];
        o.struct_size = old_size;
        std::ptr::copy_nonoverlapping((&raw const o).cast::<u8>(), buffer.as_mut_ptr().cast::<u8>(), old_size);
        let mut e = null_mut();
        let status = gpt2rt_engine_load(buffer.as_ptr().cast::<gpt2rt_engine_options>(), &mut e);
        expect(status, gpt2rt_status::Ok, "");
        let mut info = vec![0u8; 4096];
        let mut len = 0;
        expect(gpt2rt_engine_info(e, info.as_mut_ptr().cast(), info.len(), &mut len), gpt2rt_status::Ok, "");
        let info = String::from_utf8_lossy(&info[..len]);
        assert!(!info.contains("nvtx"), "the missing nvtx field was read from beyond struct_size: {info}");
        gpt2rt_engine_destroy(e);
        // Sizes that are no layout of this struct are refused.
        for size in [old_size - 8, old_size + 4, std::mem::size_of::<gpt2rt_engine_options>() + 8] {
            let bad = gpt2rt_engine_options { struct_size: size, ..o };
            let mut e = null_mut();
            expect(gpt2rt_engine_load(&bad, &mut e), gpt2rt_status::StructSize, "expects 56 or 64");
            assert!(e.is_null());
        }
    }
}

#[test]
fn session_bad_inputs_keep_the_session_usable() {
    let engine = tiny_engine(2);
    unsafe {
        let mut info = gpt2rt_model_info::default();
        expect(gpt2rt_engine_model_info(engine, &mut info), gpt2rt_status::Ok, "");
        assert_eq!((info.n_layer, info.vocab_size, info.max_seq), (2, 50257, 512));

        // Profiles outside the engine's limits never get a session.
        let mut o = std::mem::zeroed::<gpt2rt_session_options>();
        gpt2rt_session_options_default(&mut o);
        let mut s: *mut gpt2rt_session = null_mut();
        let too_long = gpt2rt_session_options { max_seq: 513, ..o };
        expect(gpt2rt_session_create(engine, &too_long, &mut s), gpt2rt_status::ProfileUnsupported, "512");
        let zero = gpt2rt_session_options { max_batch: 0, ..o };
        expect(gpt2rt_session_create(engine, &zero, &mut s), gpt2rt_status::ProfileUnsupported, "max_batch");
        assert!(s.is_null());

        let s = session(engine, 2, 16);
        let (mut b, mut q) = (0, 0);
        expect(gpt2rt_session_profile(s, &mut b, &mut q), gpt2rt_status::Ok, "");
        assert_eq!((b, q), (2, 16));

        let vocab = 50257usize;
        let mut logits = vec![0f32; 2 * vocab];
        let mut written = 0usize;
        let step_tok = [5i32, 6];
        expect(gpt2rt_session_step(s, step_tok.as_ptr(), 2), gpt2rt_status::NotPrefilled, "prefill");
        expect(
            gpt2rt_session_read_logits(s, logits.as_mut_ptr(), logits.len(), &mut written),
            gpt2rt_status::NotPrefilled,
            "prefill",
        );

        let tokens = [1i32, 2, 3, 4, 5];
        let lengths = [3u32, 2];
        expect(
            gpt2rt_session_prefill(null(), tokens.as_ptr(), 5, lengths.as_ptr(), 2),
            gpt2rt_status::NullPointer,
            "session",
        );
        expect(gpt2rt_session_prefill(s, null(), 5, lengths.as_ptr(), 2), gpt2rt_status::NullPointer, "tokens");
        let bad = [1i32, 2, 50257, 4, 5];
        expect(
            gpt2rt_session_prefill(s, bad.as_ptr(), 5, lengths.as_ptr(), 2),
            gpt2rt_status::TokenOutOfRange,
            "50257",
        );
        let neg = [1i32, -3, 2, 4, 5];
        expect(gpt2rt_session_prefill(s, neg.as_ptr(), 5, lengths.as_ptr(), 2), gpt2rt_status::TokenOutOfRange, "-3");
        let three = [1u32, 2, 2];
        expect(
            gpt2rt_session_prefill(s, tokens.as_ptr(), 5, three.as_ptr(), 3),
            gpt2rt_status::BatchExceedsProfile,
            "max_batch 2",
        );
        let wrong_sum = [3u32, 3];
        expect(
            gpt2rt_session_prefill(s, tokens.as_ptr(), 5, wrong_sum.as_ptr(), 2),
            gpt2rt_status::LengthMismatch,
            "6",
        );
        let long = [1i32; 17];
        let long_len = [17u32];
        expect(
            gpt2rt_session_prefill(s, long.as_ptr(), 17, long_len.as_ptr(), 1),
            gpt2rt_status::SequenceExceedsProfile,
            "max_seq 16",
        );
        let empty = [0u32, 5];
        expect(
            gpt2rt_session_prefill(s, tokens.as_ptr(), 5, empty.as_ptr(), 2),
            gpt2rt_status::InvalidArgument,
            "empty",
        );

        // Still usable: a valid prefill works.
        expect(gpt2rt_session_prefill(s, tokens.as_ptr(), 5, lengths.as_ptr(), 2), gpt2rt_status::Ok, "");
        let mut small = vec![0f32; vocab];
        written = 99;
        expect(
            gpt2rt_session_read_logits(s, small.as_mut_ptr(), small.len(), &mut written),
            gpt2rt_status::BufferTooSmall,
            "100514",
        );
        assert_eq!(written, 2 * vocab, "the required size is reported");
        assert!(small.iter().all(|&x| x == 0.0), "the buffer is untouched");
        let mut batch = 0usize;
        expect(gpt2rt_session_batch(s, &mut batch), gpt2rt_status::Ok, "");
        assert_eq!(batch, 2);
        expect(gpt2rt_session_read_logits(s, logits.as_mut_ptr(), logits.len(), &mut written), gpt2rt_status::Ok, "");
        assert_eq!(written, 2 * vocab);

        let mut ids = [0i32; 2];
        let mut n = 0usize;
        expect(
            gpt2rt_session_sample(s, null(), ids.as_mut_ptr(), 1, &mut n),
            gpt2rt_status::BufferTooSmall,
            "2 token ids",
        );
        expect(gpt2rt_session_sample(s, null(), ids.as_mut_ptr(), 2, &mut n), gpt2rt_status::Ok, "");
        assert_eq!(n, 2);
        // Greedy ids equal the argmax of the logits read back.
        for (b, &id) in ids.iter().enumerate() {
            let row = &logits[b * vocab..(b + 1) * vocab];
            let best = row.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0;
            assert_eq!(id as usize, best);
        }
        let bad_sampling = gpt2rt_sampling_options { temperature: -1.0, top_k: 0, top_p: 1.0, seed: 0 };
        expect(
            gpt2rt_session_sample(s, &bad_sampling, ids.as_mut_ptr(), 2, &mut n),
            gpt2rt_status::InvalidArgument,
            "temperature",
        );

        expect(gpt2rt_session_step(s, step_tok.as_ptr(), 1), gpt2rt_status::LengthMismatch, "batch has 2");
        let bad_step = [5i32, 99999];
        expect(gpt2rt_session_step(s, bad_step.as_ptr(), 2), gpt2rt_status::TokenOutOfRange, "99999");
        let mut steps = 0;
        loop {
            let st = gpt2rt_session_step(s, step_tok.as_ptr(), 2);
            if st != gpt2rt_status::Ok {
                expect(st, gpt2rt_status::SequenceExceedsProfile, "max_seq");
                break;
            }
            steps += 1;
        }
        assert_eq!(steps, 13, "sequence 0 had 3 tokens; 13 steps fill max_seq 16");
        // Still usable after hitting the limit.
        expect(gpt2rt_session_prefill(s, tokens.as_ptr(), 5, lengths.as_ptr(), 2), gpt2rt_status::Ok, "");
        expect(gpt2rt_session_step(s, step_tok.as_ptr(), 2), gpt2rt_status::Ok, "");

        gpt2rt_session_destroy(s);
        gpt2rt_engine_destroy(engine);
    }
}

unsafe extern "C" fn collect(user_data: *mut c_void, _seq: usize, token: i32, piece: *const c_char, len: usize) -> i32 {
    let out = unsafe { &mut *(user_data as *mut (Vec<i32>, Vec<u8>)) };
    if token >= 0 {
        out.0.push(token);
    }
    out.1.extend_from_slice(unsafe { std::slice::from_raw_parts(piece.cast::<u8>(), len) });
    0
}

#[test]
fn generate_streams_and_reports_text() {
    let engine = tiny_engine(2);
    let s = session(engine, 1, 64);
    unsafe {
        let mut o = std::mem::zeroed::<gpt2rt_generate_options>();
        gpt2rt_generate_options_default(&mut o);
        o.max_new_tokens = 20;
        let mut sink: (Vec<i32>, Vec<u8>) = (Vec::new(), Vec::new());
        o.callback = Some(collect);
        o.user_data = (&mut sink as *mut (Vec<i32>, Vec<u8>)).cast();
        let prompt = "Hello, my name is";
        let (mut n, mut finish) = (0usize, gpt2rt_finish_reason::Callback);
        expect(
            gpt2rt_session_generate(s, prompt.as_ptr().cast(), prompt.len(), &o, &mut n, &mut finish),
            gpt2rt_status::Ok,
            "",
        );
        assert_eq!((n, finish), (20, gpt2rt_finish_reason::Length));
        assert_eq!(sink.0.len(), 20);

        let mut len = 0usize;
        expect(gpt2rt_session_generated_text(s, null_mut(), 0, &mut len), gpt2rt_status::BufferTooSmall, "bytes");
        let mut text = vec![0u8; len];
        expect(gpt2rt_session_generated_text(s, text.as_mut_ptr().cast(), len, &mut len), gpt2rt_status::Ok, "");
        assert_eq!(text, sink.1, "streamed pieces add up to the generated text");

        // The same tokens through the tokenizer handle.
        let mut tok = null_mut();
        expect(gpt2rt_engine_tokenizer(engine, &mut tok), gpt2rt_status::Ok, "");
        let mut decoded_len = 0usize;
        let mut decoded = vec![0u8; 4096];
        expect(
            gpt2rt_tokenizer_decode(
                tok,
                sink.0.as_ptr(),
                sink.0.len(),
                decoded.as_mut_ptr().cast(),
                decoded.len(),
                &mut decoded_len,
            ),
            gpt2rt_status::Ok,
            "",
        );
        assert_eq!(&decoded[..decoded_len], &text[..]);

        // Bad generate inputs.
        let bad = [0xc3u8, 0x28];
        expect(
            gpt2rt_session_generate(s, bad.as_ptr().cast(), 2, &o, &mut n, &mut finish),
            gpt2rt_status::InvalidUtf8,
            "prompt",
        );
        let too_many = gpt2rt_generate_options { max_new_tokens: 200, ..o };
        expect(
            gpt2rt_session_generate(s, prompt.as_ptr().cast(), prompt.len(), &too_many, &mut n, &mut finish),
            gpt2rt_status::SequenceExceedsProfile,
            "max_seq 64",
        );
        let bad_size = gpt2rt_generate_options { struct_size: 3, ..o };
        expect(
            gpt2rt_session_generate(s, prompt.as_ptr().cast(), prompt.len(), &bad_size, &mut n, &mut finish),
            gpt2rt_status::StructSize,
            "gpt2rt_generate_options_default",
        );
        let mut count = 0usize;
        let mut ids = [0i32; 2];
        expect(
            gpt2rt_tokenizer_encode(tok, prompt.as_ptr().cast(), prompt.len(), ids.as_mut_ptr(), 2, &mut count),
            gpt2rt_status::BufferTooSmall,
            "token ids",
        );
        assert!(count > 2);
        let bad_tok = [70000i32];
        expect(
            gpt2rt_tokenizer_decode(
                tok,
                bad_tok.as_ptr(),
                1,
                decoded.as_mut_ptr().cast(),
                decoded.len(),
                &mut decoded_len,
            ),
            gpt2rt_status::TokenOutOfRange,
            "70000",
        );
        gpt2rt_tokenizer_destroy(tok);
        gpt2rt_session_destroy(s);
        gpt2rt_engine_destroy(engine);
    }
}

#[test]
fn cancel_from_another_thread_stops_within_a_step_and_busy_is_detected() {
    let engine = tiny_engine(2);
    let s = session(engine, 1, 512);
    struct Shared(*mut gpt2rt_session);
    unsafe impl Send for Shared {}
    unsafe impl Sync for Shared {}
    let shared = std::sync::Arc::new(Shared(s));
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let rx = std::sync::Mutex::new(rx);
    unsafe extern "C" fn on_token(user_data: *mut c_void, _: usize, _: i32, _: *const c_char, _: usize) -> i32 {
        // Tell the other thread we are inside generate, then wait for its go-ahead once.
        let state = unsafe { &*(user_data as *const (std::sync::mpsc::Sender<()>, std::sync::atomic::AtomicUsize)) };
        if state.1.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 {
            state.0.send(()).unwrap();
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
        0
    }
    let state = (tx, std::sync::atomic::AtomicUsize::new(0));
    let other = {
        let shared = shared.clone();
        std::thread::spawn(move || {
            rx.lock().unwrap().recv().unwrap();
            let s = shared.0;
            // The session is busy generating on the main thread.
            let (mut b, mut q) = (0, 0);
            let status = unsafe { gpt2rt_session_profile(s, &mut b, &mut q) };
            let message = last_error();
            let cancel = unsafe { gpt2rt_session_cancel(s) };
            (status, message, cancel)
        })
    };
    unsafe {
        let mut o = std::mem::zeroed::<gpt2rt_generate_options>();
        gpt2rt_generate_options_default(&mut o);
        o.max_new_tokens = 400;
        o.callback = Some(on_token);
        o.user_data = (&state as *const _ as *mut c_void).cast();
        let prompt = "Cancel me";
        let (mut n, mut finish) = (0usize, gpt2rt_finish_reason::Length);
        expect(
            gpt2rt_session_generate(s, prompt.as_ptr().cast(), prompt.len(), &o, &mut n, &mut finish),
            gpt2rt_status::Ok,
            "",
        );
        let (busy, message, cancel) = other.join().unwrap();
        assert_eq!(busy, gpt2rt_status::SessionBusy, "{message}");
        assert!(message.contains("another thread"));
        assert_eq!(cancel, gpt2rt_status::Ok);
        assert_eq!(finish, gpt2rt_finish_reason::Cancelled);
        // The cancel landed while token 1 was being reported: at most one more step ran.
        assert!(n <= 2, "{n} tokens after cancel");
        gpt2rt_session_destroy(s);
        gpt2rt_engine_destroy(engine);
    }
}

#[test]
fn a_cancel_before_generation_is_kept_once_and_null_options_are_defaults() {
    let engine = tiny_engine(2);
    let s = session(engine, 1, 64);
    unsafe {
        let prompt = "Early cancel";
        let (mut n, mut finish) = (0usize, gpt2rt_finish_reason::Length);
        expect(gpt2rt_session_cancel(s), gpt2rt_status::Ok, "");
        expect(
            gpt2rt_session_generate(s, prompt.as_ptr().cast(), prompt.len(), null(), &mut n, &mut finish),
            gpt2rt_status::Ok,
            "",
        );
        assert_eq!((n, finish), (0, gpt2rt_finish_reason::Cancelled), "a cancel racing the start is not lost");
        expect(
            gpt2rt_session_generate(s, prompt.as_ptr().cast(), prompt.len(), null(), &mut n, &mut finish),
            gpt2rt_status::Ok,
            "",
        );
        assert_eq!(
            (n, finish),
            (32, gpt2rt_finish_reason::Length),
            "the request was cleared when that generation returned"
        );

        let tokens = [464i32, 2068, 7586];
        let lengths = [3u32];
        let mut out = [0i32; 32];
        let mut counts = [0usize; 1];
        expect(
            gpt2rt_session_generate_tokens(
                s,
                tokens.as_ptr(),
                3,
                lengths.as_ptr(),
                1,
                null(),
                out.as_mut_ptr(),
                32,
                counts.as_mut_ptr(),
                &mut finish,
            ),
            gpt2rt_status::Ok,
            "",
        );
        assert_eq!((counts[0], finish), (32, gpt2rt_finish_reason::Length));
        gpt2rt_session_destroy(s);
        gpt2rt_engine_destroy(engine);
    }
}
