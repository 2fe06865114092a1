//! The tokenizer through the C ABI (the extern fns a host calls): encode of arbitrary bytes
//! (invalid UTF-8 included), decode of arbitrary ids (negative, huge), buffers of every size
//! (`BUFFER_TOO_SMALL` reports the size and leaves the buffer untouched), NULL with zero and
//! non-zero lengths, and the round trip `decode(encode(s)) == s` for valid UTF-8.
#![no_main]

use arbitrary::Arbitrary;
use gpt2rt::ffi::*;
use libfuzzer_sys::fuzz_target;
use std::ptr::{null, null_mut};
use std::sync::OnceLock;

struct Handle(*mut gpt2rt_tokenizer);
// SAFETY: gpt2rt_tokenizer may be used from any thread, concurrently (its documented contract).
unsafe impl Send for Handle {}
unsafe impl Sync for Handle {}

fn tokenizer() -> *const gpt2rt_tokenizer {
    static TOKENIZER: OnceLock<Handle> = OnceLock::new();
    TOKENIZER
        .get_or_init(|| {
            let mut t = null_mut();
            assert_eq!(unsafe { gpt2rt_tokenizer_create_gpt2(&mut t) }, gpt2rt_status::Ok);
            Handle(t)
        })
        .0
}

const CANARY: u8 = 0xA5;

#[derive(Arbitrary, Debug)]
enum Op {
    /// Encodes bytes (UTF-8 or not) into a buffer of `capacity` ids.
    Encode { text: Vec<u8>, capacity: u8 },
    /// Encodes valid text with exactly sized buffers and decodes it back.
    RoundTrip { text: String },
    /// Decodes arbitrary ids into a buffer of `capacity` bytes.
    Decode { ids: Vec<i32>, capacity: u16 },
    /// Decodes ids drawn from the vocabulary (mostly valid), stressing the UTF-8 joining.
    DecodeValid { ids: Vec<u16> },
    /// NULL pointers with zero and non-zero lengths.
    Nulls { len: u8 },
}

fuzz_target!(|ops: Vec<Op>| {
    let t = tokenizer();
    let mut vocab = 0usize;
    assert_eq!(unsafe { gpt2rt_tokenizer_vocab_size(t, &mut vocab) }, gpt2rt_status::Ok);
    for op in ops.into_iter().take(16) {
        match op {
            Op::Encode { text, capacity } => encode_into(t, &text, capacity as usize, vocab),
            Op::RoundTrip { text } => {
                let ids = encode(t, text.as_bytes()).expect("valid UTF-8 encodes");
                assert!(ids.iter().all(|&id| id >= 0 && (id as usize) < vocab));
                let back = decode(t, &ids).expect("encoded ids decode");
                assert_eq!(back, text.as_bytes(), "decode(encode(s)) != s");
            }
            Op::Decode { ids, capacity } => decode_into(t, &ids, capacity as usize, vocab),
            Op::DecodeValid { ids } => {
                let ids: Vec<i32> = ids.iter().map(|&i| (i as usize % vocab) as i32).collect();
                let text = decode(t, &ids).expect("in-vocabulary ids decode");
                assert!(std::str::from_utf8(&text).is_ok());
            }
            Op::Nulls { len } => nulls(t, len as usize),
        }
    }
});

/// Encodes with the size query first, then an exact buffer.
fn encode(t: *const gpt2rt_tokenizer, text: &[u8]) -> Result<Vec<i32>, gpt2rt_status> {
    let mut count = usize::MAX;
    let status = unsafe { gpt2rt_tokenizer_encode(t, text.as_ptr().cast(), text.len(), null_mut(), 0, &mut count) };
    match status {
        gpt2rt_status::Ok => {
            assert_eq!(count, 0);
            return Ok(Vec::new());
        }
        gpt2rt_status::BufferTooSmall => assert!(count > 0),
        other => return Err(other),
    }
    let mut ids = vec![-1; count];
    let mut again = 0usize;
    let status =
        unsafe { gpt2rt_tokenizer_encode(t, text.as_ptr().cast(), text.len(), ids.as_mut_ptr(), count, &mut again) };
    assert_eq!(status, gpt2rt_status::Ok);
    assert_eq!(again, count);
    Ok(ids)
}

fn encode_into(t: *const gpt2rt_tokenizer, text: &[u8], capacity: usize, vocab: usize) {
    let mut out = vec![i32::MIN; capacity];
    let mut count = usize::MAX;
    let status =
        unsafe { gpt2rt_tokenizer_encode(t, text.as_ptr().cast(), text.len(), out.as_mut_ptr(), capacity, &mut count) };
    let utf8 = std::str::from_utf8(text).is_ok();
    match status {
        gpt2rt_status::Ok => {
            assert!(utf8 && count <= capacity);
            assert!(out[..count].iter().all(|&id| id >= 0 && (id as usize) < vocab));
            assert!(out[count..].iter().all(|&x| x == i32::MIN), "wrote past the result");
        }
        gpt2rt_status::BufferTooSmall => {
            assert!(utf8 && count > capacity);
            assert!(out.iter().all(|&x| x == i32::MIN), "buffer touched on BUFFER_TOO_SMALL");
        }
        gpt2rt_status::InvalidUtf8 => {
            assert!(!utf8);
            assert_eq!(count, usize::MAX, "out-param written on failure");
        }
        other => panic!("encode returned {other:?}"),
    }
}

/// Decodes with the size query first, then an exact buffer.
fn decode(t: *const gpt2rt_tokenizer, ids: &[i32]) -> Result<Vec<u8>, gpt2rt_status> {
    let mut len = usize::MAX;
    let status = unsafe { gpt2rt_tokenizer_decode(t, ids.as_ptr(), ids.len(), null_mut(), 0, &mut len) };
    match status {
        gpt2rt_status::Ok => {
            assert_eq!(len, 0);
            return Ok(Vec::new());
        }
        gpt2rt_status::BufferTooSmall => assert!(len > 0),
        other => return Err(other),
    }
    let mut text = vec![0u8; len];
    let mut again = 0usize;
    let status =
        unsafe { gpt2rt_tokenizer_decode(t, ids.as_ptr(), ids.len(), text.as_mut_ptr().cast(), len, &mut again) };
    assert_eq!(status, gpt2rt_status::Ok);
    assert_eq!(again, len);
    Ok(text)
}

fn decode_into(t: *const gpt2rt_tokenizer, ids: &[i32], capacity: usize, vocab: usize) {
    let mut buf = vec![CANARY; capacity];
    let mut len = usize::MAX;
    let status =
        unsafe { gpt2rt_tokenizer_decode(t, ids.as_ptr(), ids.len(), buf.as_mut_ptr().cast(), capacity, &mut len) };
    let valid = ids.iter().all(|&id| id >= 0 && (id as usize) < vocab);
    match status {
        gpt2rt_status::Ok => {
            assert!(valid && len <= capacity);
            assert!(std::str::from_utf8(&buf[..len]).is_ok(), "decode wrote invalid UTF-8");
            assert!(buf[len..].iter().all(|&b| b == CANARY), "wrote past the result");
        }
        gpt2rt_status::BufferTooSmall => {
            assert!(valid && len > capacity);
            assert!(buf.iter().all(|&b| b == CANARY), "buffer touched on BUFFER_TOO_SMALL");
        }
        gpt2rt_status::TokenOutOfRange => {
            assert!(!valid);
            assert_eq!(len, usize::MAX, "out-param written on failure");
        }
        other => panic!("decode returned {other:?}"),
    }
}

fn nulls(t: *const gpt2rt_tokenizer, len: usize) {
    let mut count = 7usize;
    let empty = unsafe { gpt2rt_tokenizer_encode(t, null(), 0, null_mut(), 0, &mut count) };
    assert_eq!((empty, count), (gpt2rt_status::Ok, 0), "(NULL, 0) is the empty text");
    let status = unsafe { gpt2rt_tokenizer_encode(t, null(), len, null_mut(), 0, &mut count) };
    assert_eq!(status, if len == 0 { gpt2rt_status::Ok } else { gpt2rt_status::NullPointer });
    let status = unsafe { gpt2rt_tokenizer_decode(t, null(), len, null_mut(), 0, &mut count) };
    assert_eq!(status, if len == 0 { gpt2rt_status::Ok } else { gpt2rt_status::NullPointer });
    let text = b"a";
    let status = unsafe { gpt2rt_tokenizer_encode(t, text.as_ptr().cast(), 1, null_mut(), len, &mut count) };
    assert_eq!(status, if len == 0 { gpt2rt_status::BufferTooSmall } else { gpt2rt_status::NullPointer });
    let status = unsafe { gpt2rt_tokenizer_encode(t, text.as_ptr().cast(), 1, null_mut(), 0, null_mut()) };
    assert_eq!(status, gpt2rt_status::NullPointer);
    let status = unsafe { gpt2rt_tokenizer_encode(null(), text.as_ptr().cast(), 1, null_mut(), 0, &mut count) };
    assert_eq!(status, gpt2rt_status::NullPointer);
    let ids = [0i32];
    let status = unsafe { gpt2rt_tokenizer_decode(t, ids.as_ptr(), 1, null_mut(), 0, null_mut()) };
    assert_eq!(status, gpt2rt_status::NullPointer);
}
