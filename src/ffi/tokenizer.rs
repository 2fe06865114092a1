//! `gpt2rt_tokenizer`: GPT-2 byte-level BPE encode/decode.

use super::{arg_mut, arg_ref, arg_slice, arg_slice_mut, arg_str, copy_out, gpt2rt_engine, gpt2rt_status, guard};
use crate::api::Tokenizer;
use std::ffi::c_char;

/// A tokenizer. Thread-safety: any thread, concurrently. Independent of the engine it came from.
/// Destroy it exactly once.
pub struct gpt2rt_tokenizer {
    tokenizer: Tokenizer,
}

/// The built-in GPT-2 tokenizer (no model needed).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn gpt2rt_tokenizer_create_gpt2(out_tokenizer: *mut *mut gpt2rt_tokenizer) -> gpt2rt_status {
    guard(|| {
        let out = unsafe { arg_mut(out_tokenizer, "out_tokenizer") }?;
        let tokenizer = Tokenizer::gpt2()?;
        *out = Box::into_raw(Box::new(gpt2rt_tokenizer { tokenizer }));
        Ok(())
    })
}

/// The engine's tokenizer (the model directory's `tokenizer.json`, else the built-in GPT-2 one).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn gpt2rt_engine_tokenizer(
    engine: *const gpt2rt_engine,
    out_tokenizer: *mut *mut gpt2rt_tokenizer,
) -> gpt2rt_status {
    guard(|| {
        let engine = &unsafe { arg_ref(engine, "engine") }?.engine;
        let out = unsafe { arg_mut(out_tokenizer, "out_tokenizer") }?;
        *out = Box::into_raw(Box::new(gpt2rt_tokenizer { tokenizer: engine.tokenizer().clone() }));
        Ok(())
    })
}

/// Releases a tokenizer. NULL is accepted and ignored.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn gpt2rt_tokenizer_destroy(tokenizer: *mut gpt2rt_tokenizer) {
    if !tokenizer.is_null() {
        // SAFETY: the pointer came from a gpt2rt_*tokenizer* constructor and is destroyed once.
        drop(unsafe { Box::from_raw(tokenizer) });
    }
}

/// Encodes UTF-8 `text` into token ids. Required-size convention: `*out_count` always receives
/// the number of ids; when `capacity` is smaller the status is `GPT2RT_STATUS_BUFFER_TOO_SMALL`
/// and `out_tokens` is untouched (`(NULL, 0)` asks for the count only).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn gpt2rt_tokenizer_encode(
    tokenizer: *const gpt2rt_tokenizer,
    text: *const c_char,
    text_len: usize,
    out_tokens: *mut i32,
    capacity: usize,
    out_count: *mut usize,
) -> gpt2rt_status {
    guard(|| {
        let t = &unsafe { arg_ref(tokenizer, "tokenizer") }?.tokenizer;
        let text = unsafe { arg_str(text, text_len, "text") }?;
        let count = unsafe { arg_mut(out_count, "out_count") }?;
        let out = unsafe { arg_slice_mut(out_tokens, capacity, "out_tokens") }?;
        let ids = t.encode(text)?;
        *count = ids.len();
        if out.len() < ids.len() {
            bail!(BufferTooSmall, "{} token ids, the buffer holds {}", ids.len(), out.len());
        }
        for (o, id) in out.iter_mut().zip(&ids) {
            *o = *id as i32;
        }
        Ok(())
    })
}

/// Decodes token ids into UTF-8 text (no NUL). Required-size convention as `gpt2rt_engine_info`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn gpt2rt_tokenizer_decode(
    tokenizer: *const gpt2rt_tokenizer,
    tokens: *const i32,
    n_tokens: usize,
    buffer: *mut c_char,
    capacity: usize,
    out_len: *mut usize,
) -> gpt2rt_status {
    guard(|| {
        let t = &unsafe { arg_ref(tokenizer, "tokenizer") }?.tokenizer;
        let tokens = unsafe { arg_slice(tokens, n_tokens, "tokens") }?;
        let mut ids = Vec::with_capacity(tokens.len());
        super::tokens_from_c(tokens, &mut ids)?;
        let text = t.decode(&ids)?;
        unsafe { copy_out(text.as_bytes(), buffer, capacity, out_len) }
    })
}

/// Vocabulary size (including added tokens such as `<|endoftext|>`).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn gpt2rt_tokenizer_vocab_size(
    tokenizer: *const gpt2rt_tokenizer,
    out_size: *mut usize,
) -> gpt2rt_status {
    guard(|| {
        let t = &unsafe { arg_ref(tokenizer, "tokenizer") }?.tokenizer;
        *unsafe { arg_mut(out_size, "out_size") }? = t.vocab_size();
        Ok(())
    })
}

/// The id of `<|endoftext|>`; `GPT2RT_STATUS_TOKENIZER` if the tokenizer has none.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn gpt2rt_tokenizer_eos_token(
    tokenizer: *const gpt2rt_tokenizer,
    out_token: *mut i32,
) -> gpt2rt_status {
    guard(|| {
        let t = &unsafe { arg_ref(tokenizer, "tokenizer") }?.tokenizer;
        let out = unsafe { arg_mut(out_token, "out_token") }?;
        let eos = t.eos_token_id().ok_or_else(|| err!(Tokenizer, "this tokenizer has no <|endoftext|> token"))?;
        *out = eos as i32;
        Ok(())
    })
}
