//! Concurrency through the C ABI, as hosts use it: many threads sharing one engine, one session
//! hammered from two threads, and cancellation from another thread at arbitrary moments.

#[path = "common/capi.rs"]
mod capi;

use gpt2rt::ffi::*;
use std::ffi::{c_char, c_void};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};

/// Raw handles shared across threads (engines and session cancel are documented thread-safe; the
/// tests that share a session rely on SESSION_BUSY detection, which is what they check).
struct Ptr<T>(*mut T);
impl<T> Clone for Ptr<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for Ptr<T> {}
unsafe impl<T> Send for Ptr<T> {}
unsafe impl<T> Sync for Ptr<T> {}

impl<T> Ptr<T> {
    /// The pointer (a method, so closures capture the whole `Send` wrapper, not the raw field).
    fn raw(self) -> *mut T {
        self.0
    }
}

fn tiny_engine(num_threads: u32) -> Ptr<gpt2rt_engine> {
    Ptr(capi::tiny_engine(num_threads))
}

fn new_session(engine: Ptr<gpt2rt_engine>, max_batch: usize, max_seq: usize) -> Ptr<gpt2rt_session> {
    Ptr(capi::session(engine.0, max_batch, max_seq))
}

unsafe extern "C" fn collect(user_data: *mut c_void, _: usize, token: i32, _: *const c_char, _: usize) -> i32 {
    if token >= 0 {
        unsafe { &mut *(user_data as *mut Vec<i32>) }.push(token);
    }
    0
}

/// Greedy tokens of `prompt` (text), `new_tokens` of them.
fn generate(s: Ptr<gpt2rt_session>, prompt: &str, new_tokens: usize) -> Result<Vec<i32>, gpt2rt_status> {
    unsafe {
        let mut o = std::mem::zeroed::<gpt2rt_generate_options>();
        gpt2rt_generate_options_default(&mut o);
        o.max_new_tokens = new_tokens;
        let mut tokens: Vec<i32> = Vec::new();
        o.callback = Some(collect);
        o.user_data = (&mut tokens as *mut Vec<i32>).cast();
        let (mut n, mut finish) = (0usize, gpt2rt_finish_reason::Callback);
        let status = gpt2rt_session_generate(s.0, prompt.as_ptr().cast(), prompt.len(), &o, &mut n, &mut finish);
        if status != gpt2rt_status::Ok {
            return Err(status);
        }
        assert_eq!((n, finish), (new_tokens, gpt2rt_finish_reason::Length));
        Ok(tokens)
    }
}

const THREADS: usize = 8;
const GENERATIONS: usize = 100;
const NEW_TOKENS: usize = 4;

fn prompt(thread: usize, i: usize) -> String {
    format!("Thread {thread} asks question number {i}:")
}

#[test]
fn eight_threads_sharing_one_engine_produce_the_single_thread_tokens() {
    let engine = tiny_engine(2);
    // Reference: every prompt, one after another on one thread and one session.
    let reference: Vec<Vec<Vec<i32>>> = {
        let s = new_session(engine, 1, 64);
        let r = (0..THREADS)
            .map(|t| (0..GENERATIONS).map(|i| generate(s, &prompt(t, i), NEW_TOKENS).unwrap()).collect())
            .collect();
        unsafe { gpt2rt_session_destroy(s.0) };
        r
    };
    let start = Arc::new(Barrier::new(THREADS));
    let workers: Vec<_> = (0..THREADS)
        .map(|t| {
            let start = start.clone();
            std::thread::spawn(move || {
                // Two sessions per thread, used in turn, so sessions also come and go mid-run.
                let sessions = [new_session(engine, 1, 64), new_session(engine, 1, 32)];
                start.wait();
                let out: Vec<Vec<i32>> =
                    (0..GENERATIONS).map(|i| generate(sessions[i % 2], &prompt(t, i), NEW_TOKENS).unwrap()).collect();
                for s in sessions {
                    unsafe { gpt2rt_session_destroy(s.0) };
                }
                out
            })
        })
        .collect();
    for (t, worker) in workers.into_iter().enumerate() {
        let got = worker.join().unwrap();
        assert_eq!(got.len(), GENERATIONS);
        for (i, (g, want)) in got.iter().zip(&reference[t]).enumerate() {
            assert_eq!(g, want, "thread {t} generation {i}");
        }
    }
    unsafe { gpt2rt_engine_destroy(engine.0) };
}

#[test]
fn one_session_hammered_from_two_threads_answers_busy_and_stays_correct() {
    let engine = tiny_engine(1);
    let s = new_session(engine, 1, 64);
    let want = generate(s, "Two threads, one session", NEW_TOKENS).unwrap();
    let start = Arc::new(Barrier::new(2));
    let hammer = |_: usize| {
        let start = start.clone();
        let want = want.clone();
        std::thread::spawn(move || {
            start.wait();
            // Until this thread has run 30 generations itself: the other one is trying meanwhile.
            let (mut ok, mut busy) = (0, 0);
            while ok < 30 {
                match generate(s, "Two threads, one session", NEW_TOKENS) {
                    Ok(tokens) => {
                        assert_eq!(tokens, want, "a generation that ran was disturbed by the other thread");
                        ok += 1;
                    }
                    Err(gpt2rt_status::SessionBusy) => busy += 1,
                    Err(other) => panic!("{other:?}"),
                }
                let mut batch = 0usize;
                let st = unsafe { gpt2rt_session_batch(s.0, &mut batch) };
                assert!(matches!(st, gpt2rt_status::Ok | gpt2rt_status::SessionBusy), "{st:?}");
            }
            busy
        })
    };
    let (a, b) = (hammer(0), hammer(1));
    let busy = a.join().unwrap() + b.join().unwrap();
    // Overlap is near certain but scheduling decides; the statuses above are what must hold.
    eprintln!("two threads on one session: 60 generations ran, {busy} calls answered SESSION_BUSY");
    assert_eq!(generate(s, "Two threads, one session", NEW_TOKENS).unwrap(), want, "still usable");
    unsafe {
        gpt2rt_session_destroy(s.0);
        gpt2rt_engine_destroy(engine.0);
    }
}

/// Token counter the generating thread updates and the cancelling thread reads.
unsafe extern "C" fn count(user_data: *mut c_void, _: usize, token: i32, _: *const c_char, _: usize) -> i32 {
    if token >= 0 {
        unsafe { &*(user_data as *const AtomicUsize) }.fetch_add(1, Ordering::SeqCst);
    }
    0
}

#[test]
fn cancel_from_another_thread_at_any_moment_stops_within_one_step() {
    let engine = tiny_engine(1);
    for (round, batch) in [(0usize, 1usize), (1, 1), (2, 3), (3, 1), (4, 3), (5, 1)] {
        let s = new_session(engine, batch, 512);
        let produced = Arc::new(AtomicUsize::new(0));
        let started = Arc::new(AtomicBool::new(false));
        let generator = {
            let (produced, started) = (produced.clone(), started.clone());
            std::thread::spawn(move || unsafe {
                let mut o = std::mem::zeroed::<gpt2rt_generate_options>();
                gpt2rt_generate_options_default(&mut o);
                o.max_new_tokens = 500;
                o.callback = Some(count);
                o.user_data = Arc::as_ptr(&produced) as *mut c_void;
                let tokens: Vec<i32> = (0..batch as i32 * 4).map(|i| 100 + i).collect();
                let lengths = vec![4u32; batch];
                let mut out = vec![0i32; batch * 500];
                let mut counts = vec![0usize; batch];
                let mut finish = gpt2rt_finish_reason::Length;
                started.store(true, Ordering::SeqCst);
                let status = gpt2rt_session_generate_tokens(
                    s.raw(),
                    tokens.as_ptr(),
                    tokens.len(),
                    lengths.as_ptr(),
                    batch,
                    &o,
                    out.as_mut_ptr(),
                    out.len(),
                    counts.as_mut_ptr(),
                    &mut finish,
                );
                assert_eq!(status, gpt2rt_status::Ok);
                (finish, counts.iter().sum::<usize>())
            })
        };
        while !started.load(Ordering::SeqCst) {
            std::hint::spin_loop();
        }
        // A different moment each round: right away, or after some tokens.
        std::thread::sleep(std::time::Duration::from_millis(round as u64 * 7));
        assert_eq!(unsafe { gpt2rt_session_cancel(s.0) }, gpt2rt_status::Ok);
        // Read after the cancel is stored: at most the step already under way may still report.
        let seen = produced.load(Ordering::SeqCst);
        let (finish, total) = generator.join().unwrap();
        assert_eq!(finish, gpt2rt_finish_reason::Cancelled, "round {round}");
        assert!(total <= seen + batch, "round {round}: {total} tokens, {seen} when cancelled (batch {batch})");
        assert!(total < 500 * batch);
        unsafe { gpt2rt_session_destroy(s.0) };
    }
    unsafe { gpt2rt_engine_destroy(engine.0) };
}

#[test]
fn engines_and_sessions_destroyed_in_any_order_from_other_threads() {
    for _ in 0..3 {
        let engine = tiny_engine(2);
        let sessions: Vec<_> = (0..4).map(|_| new_session(engine, 1, 16)).collect();
        unsafe { gpt2rt_engine_destroy(engine.0) };
        let threads: Vec<_> = sessions
            .into_iter()
            .enumerate()
            .map(|(i, s)| {
                std::thread::spawn(move || {
                    let tokens = generate(s, &format!("Orphan {i}"), 3).unwrap();
                    assert_eq!(tokens.len(), 3);
                    unsafe { gpt2rt_session_destroy(s.0) };
                })
            })
            .collect();
        threads.into_iter().for_each(|t| t.join().unwrap());
    }
}
