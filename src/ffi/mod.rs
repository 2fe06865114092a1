//! The C ABI: handles, status codes, the thread-local last error, the panic guard and pointer /
//! length checks. Nothing else in the crate is `extern "C"`; nothing here knows kernels.
//!
//! Conventions (also in the header):
//! - every function returns a [`gpt2rt_status`]; results go to out-params, written only on success
//!   (the one exception, documented where it applies: `GPT2RT_STATUS_BUFFER_TOO_SMALL` writes the
//!   required size);
//! - `gpt2rt_last_error_message()` is the message of the last failure on the calling thread;
//! - strings are UTF-8 pointer + length; `(NULL, 0)` is an empty input, `(NULL, n > 0)` is an error;
//! - options structs carry `struct_size` and are filled by their `*_default()` function;
//! - no panic crosses the boundary: it becomes `GPT2RT_STATUS_PANIC`.
//!
//! # Safety
//! Every `unsafe extern "C"` function here has the same contract, stated once in the header: each
//! pointer is NULL (checked, answered with `GPT2RT_STATUS_NULL_POINTER` where it is required) or
//! valid for the length passed beside it, handles come from this library and are not used after
//! their `*_destroy`, and a buffer is not written by the host while a call uses it.
#![allow(non_camel_case_types, clippy::missing_safety_doc)]

mod engine;
mod session;
mod status;
mod tokenizer;

pub use engine::*;
pub use session::*;
pub use status::*;
pub use tokenizer::*;

use crate::error::{Error, Result};
use std::cell::RefCell;
use std::ffi::{CString, c_char, c_void};
use std::panic::{AssertUnwindSafe, catch_unwind};

/// Version of the C ABI: bumped whenever an existing function or struct layout changes. A host
/// compares `gpt2rt_abi_version()` with the header's `GPT2RT_ABI_VERSION` and refuses a mismatch.
pub const GPT2RT_ABI_VERSION: u32 = 1;
/// Library version, equal to the crate version (a test checks they agree).
pub const GPT2RT_VERSION_MAJOR: u32 = 0;
pub const GPT2RT_VERSION_MINOR: u32 = 1;
pub const GPT2RT_VERSION_PATCH: u32 = 0;

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_last_error(message: &str) {
    let text = CString::new(message.replace('\0', "\\0")).unwrap_or_default();
    LAST_ERROR.with(|slot| *slot.borrow_mut() = text);
}

/// Runs `body`, turning errors and panics into a status and the thread's last error message.
pub(crate) fn guard(body: impl FnOnce() -> Result<()>) -> gpt2rt_status {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(())) => gpt2rt_status::Ok,
        Ok(Err(e)) => {
            set_last_error(e.message());
            gpt2rt_status::from_kind(e.kind())
        }
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            set_last_error(&format!("internal panic (a bug in gpt2rt, please report it): {what}"));
            gpt2rt_status::Panic
        }
    }
}

/// `&T` from a pointer the caller promises is valid, or `NullPointer` naming the argument.
///
/// # Safety
/// `ptr` must be NULL or point to a live, properly aligned `T` for the returned lifetime.
pub(crate) unsafe fn arg_ref<'a, T>(ptr: *const T, name: &str) -> Result<&'a T> {
    unsafe { ptr.as_ref() }.ok_or_else(|| err!(NullPointer, "{name} is NULL"))
}

/// `&mut T` from a pointer, or `NullPointer` naming the argument.
///
/// # Safety
/// `ptr` must be NULL or point to a live `T` that nothing else accesses for the returned lifetime.
pub(crate) unsafe fn arg_mut<'a, T>(ptr: *mut T, name: &str) -> Result<&'a mut T> {
    unsafe { ptr.as_mut() }.ok_or_else(|| err!(NullPointer, "{name} is NULL"))
}

/// A slice from pointer + length; `(NULL, 0)` is empty, `(NULL, n > 0)` is an error.
///
/// # Safety
/// When non-NULL, `ptr` must point to `len` initialised `T` that outlive the returned slice.
pub(crate) unsafe fn arg_slice<'a, T>(ptr: *const T, len: usize, name: &str) -> Result<&'a [T]> {
    if ptr.is_null() {
        if len == 0 {
            return Ok(&[]);
        }
        bail!(NullPointer, "{name} is NULL but its length is {len}");
    }
    Ok(unsafe { std::slice::from_raw_parts(ptr, len) })
}

/// A mutable slice from pointer + capacity; `(NULL, 0)` is an empty buffer.
///
/// # Safety
/// When non-NULL, `ptr` must point to `len` writable `T` that nothing else accesses meanwhile.
pub(crate) unsafe fn arg_slice_mut<'a, T>(ptr: *mut T, len: usize, name: &str) -> Result<&'a mut [T]> {
    if ptr.is_null() {
        if len == 0 {
            return Ok(&mut []);
        }
        bail!(NullPointer, "{name} is NULL but its capacity is {len}");
    }
    Ok(unsafe { std::slice::from_raw_parts_mut(ptr, len) })
}

/// UTF-8 text from pointer + length.
///
/// # Safety
/// As [`arg_slice`].
pub(crate) unsafe fn arg_str<'a>(ptr: *const c_char, len: usize, name: &str) -> Result<&'a str> {
    let bytes = unsafe { arg_slice(ptr.cast::<u8>(), len, name) }?;
    std::str::from_utf8(bytes).map_err(|e| err!(InvalidUtf8, "{name} is not valid UTF-8 ({e})"))
}

/// Checks an options struct's `struct_size` against the one layout this library knows of a struct
/// that has had no field appended yet. See [`read_options`] for the others.
pub(crate) fn check_struct_size<T>(struct_size: usize, name: &str) -> Result<()> {
    check_struct_size_in(struct_size, &[std::mem::size_of::<T>()], name)
}

/// Checks `struct_size` against every layout of an options struct this library knows: fields are
/// only ever appended (without an ABI version bump), so a host built against an older header
/// passes an older, smaller size; sizes this library does not know are refused.
fn check_struct_size_in(struct_size: usize, known: &[usize], name: &str) -> Result<()> {
    if !known.contains(&struct_size) {
        let expected = known.iter().map(usize::to_string).collect::<Vec<_>>().join(" or ");
        bail!(
            StructSize,
            "{name}.struct_size is {struct_size}, this library (ABI {GPT2RT_ABI_VERSION}) expects {expected}: fill it with {name}_default()"
        );
    }
    Ok(())
}

/// Reads a host's options struct that may be an older, shorter layout: `known_sizes` lists every
/// `struct_size` this library accepts (each older layout's size, then `size_of::<T>()`). Only the
/// host's `struct_size` bytes are read; the fields an older host does not have keep their values
/// in `defaults`. NULL gives `None`.
///
/// # Safety
/// `ptr` must be NULL or point to a live options struct of at least its own `struct_size` bytes,
/// beginning with that `usize` field (every gpt2rt options struct does).
pub(crate) unsafe fn read_options<T: Copy>(
    ptr: *const T,
    defaults: T,
    known_sizes: &[usize],
    name: &str,
) -> Result<Option<T>> {
    if ptr.is_null() {
        return Ok(None);
    }
    // SAFETY: every options struct starts with its usize struct_size (checked by the callers'
    // layouts); the host's struct is at least that long.
    let struct_size = unsafe { ptr.cast::<usize>().read() };
    check_struct_size_in(struct_size, known_sizes, name)?;
    let mut value = defaults;
    let len = struct_size.min(std::mem::size_of::<T>());
    // SAFETY: the host's struct holds `struct_size` bytes; `value` holds size_of::<T>(); T is a
    // repr(C) struct of integers and pointers, valid for any bytes the host wrote.
    unsafe { std::ptr::copy_nonoverlapping(ptr.cast::<u8>(), (&raw mut value).cast::<u8>(), len) };
    Ok(Some(value))
}

/// Copies `bytes` into a caller buffer with the required-size convention: the length needed is
/// always written to `out_len`; when `buf` is too small nothing else is written and the status is
/// `BufferTooSmall`.
///
/// # Safety
/// `buf` must be valid for `capacity` bytes (or NULL with capacity 0); `out_len` valid or NULL.
pub(crate) unsafe fn copy_out(bytes: &[u8], buf: *mut c_char, capacity: usize, out_len: *mut usize) -> Result<()> {
    let out_len = unsafe { arg_mut(out_len, "out_len") }?;
    let dst = unsafe { arg_slice_mut(buf.cast::<u8>(), capacity, "buffer") }?;
    *out_len = bytes.len();
    if dst.len() < bytes.len() {
        bail!(BufferTooSmall, "the result needs {} bytes, the buffer holds {}", bytes.len(), dst.len());
    }
    dst[..bytes.len()].copy_from_slice(bytes);
    Ok(())
}

/// Converts C token ids (int32) into the library's ids, refusing negatives.
pub(crate) fn tokens_from_c(tokens: &[i32], out: &mut Vec<u32>) -> Result<()> {
    out.clear();
    for (i, &t) in tokens.iter().enumerate() {
        let id = u32::try_from(t).map_err(|_| err!(TokenOutOfRange, "token id {t} at index {i} is negative"))?;
        out.push(id);
    }
    Ok(())
}

/// The ABI version of the loaded library (compare with `GPT2RT_ABI_VERSION`).
#[unsafe(no_mangle)]
pub extern "C" fn gpt2rt_abi_version() -> u32 {
    GPT2RT_ABI_VERSION
}

/// The library version as a static NUL-terminated string, e.g. "0.1.0".
#[unsafe(no_mangle)]
pub extern "C" fn gpt2rt_version_string() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast()
}

/// The message of the last failed call on this thread ("" if none). NUL-terminated UTF-8; valid
/// until the next failing call on the same thread. Never NULL.
#[unsafe(no_mangle)]
pub extern "C" fn gpt2rt_last_error_message() -> *const c_char {
    LAST_ERROR.with(|slot| slot.borrow().as_ptr())
}

/// A log callback: `level` is 1 error, 2 warn, 3 info, 4 debug; `message` is UTF-8, not
/// NUL-terminated, valid only during the call. Called from whichever thread logs.
pub type gpt2rt_log_callback =
    Option<unsafe extern "C" fn(user_data: *mut c_void, level: i32, message: *const c_char, message_len: usize)>;

struct LogTarget {
    callback: unsafe extern "C" fn(*mut c_void, i32, *const c_char, usize),
    user_data: *mut c_void,
}
// SAFETY: the host promises, by installing the callback, that it and user_data may be used from
// any thread (documented on gpt2rt_set_log_callback).
unsafe impl Send for LogTarget {}
unsafe impl Sync for LogTarget {}

/// Installs the process-wide log callback (NULL removes it). The library prints nothing itself;
/// it logs decisions such as why `auto` skipped a backend. `callback` and `user_data` must be
/// usable from any thread until replaced.
#[unsafe(no_mangle)]
pub extern "C" fn gpt2rt_set_log_callback(callback: gpt2rt_log_callback, user_data: *mut c_void) -> gpt2rt_status {
    guard(|| {
        let sink = callback.map(|callback| {
            let target = LogTarget { callback, user_data };
            Box::new(move |level: crate::log::LogLevel, message: &str| {
                let target = &target;
                // SAFETY: the host-provided callback with its own user_data, per the contract above.
                unsafe { (target.callback)(target.user_data, level as i32, message.as_ptr().cast(), message.len()) }
            }) as Box<dyn Fn(crate::log::LogLevel, &str) + Send + Sync>
        });
        crate::log::set_sink(sink);
        Ok(())
    })
}

impl From<Error> for gpt2rt_status {
    fn from(e: Error) -> Self {
        gpt2rt_status::from_kind(e.kind())
    }
}
