//! The C-ABI objects the C-ABI tests (ffi, bad_inputs, concurrency) start from: the built-in tiny
//! model on the CPU backend, and sessions of it. Included with `#[path]`, without the fixtures of
//! `common/mod.rs`.
#![allow(dead_code)]

use gpt2rt::ffi::*;
use std::ffi::CStr;
use std::ptr::null_mut;

/// The calling thread's last error message.
pub fn last_error() -> String {
    unsafe { CStr::from_ptr(gpt2rt_last_error_message()) }.to_str().unwrap().to_string()
}

#[track_caller]
fn ok(status: gpt2rt_status) {
    assert_eq!(status, gpt2rt_status::Ok, "message: {}", last_error());
}

/// The built-in tiny model (2 layers, 64 wide, GPT-2 vocabulary) on the CPU backend.
pub fn tiny_engine(num_threads: u32) -> *mut gpt2rt_engine {
    unsafe {
        let mut o = std::mem::zeroed::<gpt2rt_engine_options>();
        ok(gpt2rt_engine_options_default(&mut o));
        o.builtin_model = 2;
        o.backend = gpt2rt_backend::Cpu as u32;
        o.num_threads = num_threads;
        let mut e = null_mut();
        ok(gpt2rt_engine_load(&o, &mut e));
        e
    }
}

/// A session of `engine` with this profile (KV cache on).
pub fn session(engine: *mut gpt2rt_engine, max_batch: usize, max_seq: usize) -> *mut gpt2rt_session {
    unsafe {
        let mut o = std::mem::zeroed::<gpt2rt_session_options>();
        ok(gpt2rt_session_options_default(&mut o));
        o.max_batch = max_batch;
        o.max_seq = max_seq;
        let mut s = null_mut();
        ok(gpt2rt_session_create(engine, &o, &mut s));
        s
    }
}
