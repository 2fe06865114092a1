//! GPT-2 byte-level BPE tokenization with exact Hugging Face parity.
//!
//! Encoding goes through the `tokenizers` crate (the engine behind Hugging Face's fast tokenizers),
//! loaded from a `tokenizer.json`; GPT-2's own is embedded (`assets/gpt2/`). Decoding uses a table of
//! the raw bytes each token stands for, built once per tokenizer from the byte-level alphabet: the
//! bytes of all ids are joined and decoded lossily (one U+FFFD per maximal invalid subsequence),
//! which is exactly what the ByteLevel decoder does. The same table drives [`StreamDecoder`], so
//! streamed text always equals [`Tokenizer::decode`] of the same ids.

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use tokenizers::DecoderWrapper;
use tokenizers::Tokenizer as HfTokenizer;

use crate::error::{Error, Result};

/// GPT-2's `tokenizer.json` (see `assets/gpt2/README.md`).
static GPT2_JSON: &[u8] = include_bytes!("../assets/gpt2/tokenizer.json");

/// The text of GPT-2's end-of-text token.
const EOS_TOKEN: &str = "<|endoftext|>";

/// A byte-level BPE tokenizer (GPT-2 style) loaded from a Hugging Face `tokenizer.json`.
///
/// Cheap to clone (an `Arc`); `Send + Sync`: encode and decode from any number of threads at once.
#[derive(Clone)]
pub struct Tokenizer(Arc<Inner>);

struct Inner {
    hf: HfTokenizer,
    table: Arc<TokenTable>,
    eos: Option<u32>,
}

impl Tokenizer {
    /// The built-in GPT-2 tokenizer (also DistilGPT2's): 50,257 tokens, `<|endoftext|>` = 50256.
    pub fn gpt2() -> Result<Tokenizer> {
        Self::from_json_bytes(GPT2_JSON).map_err(|e| e.context("built-in GPT-2 tokenizer"))
    }

    /// The embedded GPT-2 `tokenizer.json`, byte for byte (what [`Tokenizer::gpt2`] loads).
    pub fn gpt2_json() -> &'static [u8] {
        GPT2_JSON
    }

    /// Loads a `tokenizer.json` file (e.g. a Hugging Face model directory's).
    ///
    /// Errors: `FileNotFound` if it does not exist, `Io` if it cannot be read, `Tokenizer` if it is
    /// not a byte-level tokenizer this library can load.
    pub fn from_file(path: &Path) -> Result<Tokenizer> {
        let bytes = std::fs::read(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => err!(FileNotFound, "{}: file not found", path.display()),
            _ => err!(Io, "{}: cannot read: {e}", path.display()),
        })?;
        Self::from_json_bytes(&bytes).map_err(|e| e.context(path.display()))
    }

    /// Loads a tokenizer from the bytes of a `tokenizer.json`.
    ///
    /// Its decoder must be Hugging Face's `ByteLevel` (as for the GPT-2 family), because decoding
    /// and streaming work on the raw bytes of tokens. Truncation and padding settings in the file
    /// are ignored: [`Tokenizer::encode`] returns every token of its input. Errors: `Tokenizer`.
    pub fn from_json_bytes(bytes: &[u8]) -> Result<Tokenizer> {
        let mut hf = HfTokenizer::from_bytes(bytes).map_err(|e| err!(Tokenizer, "invalid tokenizer.json: {e}"))?;
        match hf.get_decoder() {
            Some(DecoderWrapper::ByteLevel(_)) => {}
            other => bail!(
                Tokenizer,
                "unsupported tokenizer.json: the decoder must be ByteLevel (GPT-2 style), found {}",
                other.map_or_else(|| "none".to_string(), decoder_name)
            ),
        }
        hf.with_truncation(None).map_err(|e| err!(Tokenizer, "cannot disable truncation: {e}"))?;
        hf.with_padding(None);
        let table = Arc::new(TokenTable::new(&hf)?);
        let eos = hf.token_to_id(EOS_TOKEN);
        Ok(Tokenizer(Arc::new(Inner { hf, table, eos })))
    }

    /// Encodes text to token ids, adding no special tokens. `<|endoftext|>` (and any other added
    /// token) appearing in the text becomes its id, as Hugging Face's `encode` does.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self.0.hf.encode_fast(text, false).map_err(|e| err!(Tokenizer, "cannot encode text: {e}"))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Decodes ids to text exactly as Hugging Face's `decode(ids, skip_special_tokens=False)`:
    /// special tokens appear as their text, and bytes that do not form valid UTF-8 become U+FFFD.
    ///
    /// Errors: `TokenOutOfRange` naming the first id that is not in the vocabulary.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        let mut bytes = Vec::with_capacity(ids.len() * 4);
        for &id in ids {
            bytes.extend_from_slice(self.token_bytes(id)?);
        }
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    /// Number of token ids, added tokens included (50257 for GPT-2); valid ids are `0..vocab_size`.
    pub fn vocab_size(&self) -> usize {
        self.0.table.len()
    }

    /// The id of `<|endoftext|>`, if this tokenizer has it.
    pub fn eos_token_id(&self) -> Option<u32> {
        self.0.eos
    }

    /// The raw bytes token `id` stands for (not necessarily valid UTF-8 on its own).
    ///
    /// Errors: `TokenOutOfRange` if `id` is not in the vocabulary.
    pub fn token_bytes(&self, id: u32) -> Result<&[u8]> {
        self.0.table.get(id)
    }

    /// A new streaming decoder for one sequence. It shares this tokenizer's byte table and does not
    /// borrow the tokenizer.
    pub fn stream_decoder(&self) -> StreamDecoder {
        StreamDecoder { table: Arc::clone(&self.0.table), pending: Vec::new() }
    }
}

impl fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("eos_token_id", &self.eos_token_id())
            .finish_non_exhaustive()
    }
}

/// Turns a stream of token ids into text piece by piece, never splitting a UTF-8 character.
///
/// A token may end inside a multi-byte character (GPT-2 spells most emoji and many CJK characters
/// with several tokens); those bytes are held back until the character completes. Bytes that can
/// never become a valid character are emitted as U+FFFD as soon as that is certain, exactly as the
/// lossy whole-sequence decode would, so the concatenation of every [`StreamDecoder::push`] result
/// and [`StreamDecoder::finish`] equals [`Tokenizer::decode`] of all the ids.
///
/// `Send + Sync`; it holds mutable per-sequence state, so use one per sequence (and `&mut` access).
#[derive(Clone)]
pub struct StreamDecoder {
    table: Arc<TokenTable>,
    /// Bytes of an incomplete (but so far valid) UTF-8 character at the end of the stream.
    pending: Vec<u8>,
}

impl StreamDecoder {
    /// Feeds one token and returns the text it completes: possibly empty, never a partial character.
    ///
    /// Errors: `TokenOutOfRange` if `id` is not in the vocabulary; the decoder is then unchanged.
    pub fn push(&mut self, id: u32) -> Result<String> {
        let mut text = String::new();
        self.push_into(id, &mut text)?;
        Ok(text)
    }

    /// Like [`StreamDecoder::push`], but appends the completed text to `out` (no allocation once
    /// `out` has room). On error nothing is appended.
    pub fn push_into(&mut self, id: u32, out: &mut String) -> Result<()> {
        self.pending.extend_from_slice(self.table.get(id)?);
        let mut rest = self.pending.as_slice();
        loop {
            match std::str::from_utf8(rest) {
                Ok(valid) => {
                    out.push_str(valid);
                    rest = &[];
                    break;
                }
                Err(e) => {
                    let (valid, after) = rest.split_at(e.valid_up_to());
                    out.push_str(std::str::from_utf8(valid).expect("valid_up_to bounds valid UTF-8"));
                    match e.error_len() {
                        // An invalid sequence no later byte can fix: replace it, as decode does.
                        Some(len) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            rest = &after[len..];
                        }
                        // A character still missing bytes: keep them for the next token.
                        None => {
                            rest = after;
                            break;
                        }
                    }
                }
            }
        }
        let consumed = self.pending.len() - rest.len();
        self.pending.drain(..consumed);
        Ok(())
    }

    /// Ends the stream: returns the still-pending bytes of an unfinished character as U+FFFD (as
    /// Hugging Face's decode does for a sequence ending mid-character), or `""`, and resets.
    pub fn finish(&mut self) -> String {
        let tail = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        tail
    }

    /// Drops any pending bytes, ready for a new sequence.
    pub fn reset(&mut self) {
        self.pending.clear();
    }
}

impl fmt::Debug for StreamDecoder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StreamDecoder").field("pending", &self.pending).finish_non_exhaustive()
    }
}

/// The raw bytes of every token id, in one buffer.
struct TokenTable {
    bytes: Box<[u8]>,
    /// `spans[id]` is the byte range of token `id` in `bytes`; `None` for an id without a token
    /// (a gap in a vocabulary's numbering).
    spans: Box<[Option<(u32, u32)>]>,
}

impl TokenTable {
    /// Byte-level decodes every token the way Hugging Face's ByteLevel decoder does: a token whose
    /// characters are all in the byte-level alphabet stands for those bytes, any other token (an
    /// added token with other characters) for its UTF-8 text.
    fn new(hf: &HfTokenizer) -> Result<Self> {
        let size = hf.get_vocab(true).into_values().max().map_or(0, |max| max as usize + 1);
        let byte_of = byte_level_alphabet();
        let mut bytes = Vec::with_capacity(size * 8);
        let mut spans = Vec::with_capacity(size);
        for id in 0..size as u32 {
            let Some(token) = hf.id_to_token(id) else {
                spans.push(None);
                continue;
            };
            let start = bytes.len();
            let mapped: Option<Vec<u8>> = token.chars().map(&byte_of).collect();
            bytes.extend_from_slice(mapped.as_deref().unwrap_or(token.as_bytes()));
            let span = (u32::try_from(start), u32::try_from(bytes.len()));
            let (Ok(start), Ok(end)) = span else {
                bail!(Tokenizer, "the vocabulary's tokens exceed 4 GiB");
            };
            spans.push(Some((start, end)));
        }
        Ok(Self { bytes: bytes.into_boxed_slice(), spans: spans.into_boxed_slice() })
    }

    fn len(&self) -> usize {
        self.spans.len()
    }

    fn get(&self, id: u32) -> Result<&[u8]> {
        match self.spans.get(id as usize) {
            Some(Some((start, end))) => Ok(&self.bytes[*start as usize..*end as usize]),
            Some(None) => Err(out_of_range(id, "has no token", self.len())),
            None => Err(out_of_range(id, "is outside the vocabulary", self.len())),
        }
    }
}

fn out_of_range(id: u32, what: &str, vocab_size: usize) -> Error {
    err!(TokenOutOfRange, "token id {id} {what} (vocabulary size {vocab_size})")
}

/// GPT-2's byte-level alphabet, inverted: the byte each of its 256 printable characters stands for.
/// Bytes that are printable and not whitespace (`!`..=`~`, `¡`..=`¬`, `®`..=`ÿ`) are their own
/// character; the other 68 bytes map, in order, to U+0100 onwards.
fn byte_level_alphabet() -> impl Fn(char) -> Option<u8> {
    let mut table = [None; 0x144]; // the alphabet's characters are U+0021..=U+0143
    let mut next_shifted = 0x100usize;
    for b in 0..=255u8 {
        let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        let c = if printable {
            b as usize
        } else {
            next_shifted += 1;
            next_shifted - 1
        };
        table[c] = Some(b);
    }
    move |c| table.get(c as usize).copied().flatten()
}

/// The `type` a decoder has in `tokenizer.json`, for error messages.
fn decoder_name(decoder: &DecoderWrapper) -> String {
    serde_json::to_value(decoder)
        .ok()
        .and_then(|v| Some(v.get("type")?.as_str()?.to_string()))
        .unwrap_or_else(|| "an unnamed decoder".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    fn gpt2() -> Tokenizer {
        Tokenizer::gpt2().expect("built-in tokenizer loads")
    }

    /// Streams `ids` through a fresh decoder and returns every piece plus the final tail.
    fn stream(tok: &Tokenizer, ids: &[u32]) -> (Vec<String>, String) {
        let mut decoder = tok.stream_decoder();
        let pieces = ids.iter().map(|&id| decoder.push(id).unwrap()).collect();
        (pieces, decoder.finish())
    }

    /// Token ids of single raw bytes.
    fn byte_ids(tok: &Tokenizer, bytes: &[u8]) -> Vec<u32> {
        bytes
            .iter()
            .map(|b| (0..256).find(|&id| tok.token_bytes(id).unwrap() == [*b]).expect("every byte has a token"))
            .collect()
    }

    #[test]
    fn thread_safety() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<Tokenizer>();
        send_sync::<StreamDecoder>();
    }

    #[test]
    fn gpt2_basics() {
        let tok = gpt2();
        assert_eq!(tok.vocab_size(), 50257);
        assert_eq!(tok.eos_token_id(), Some(50256));
        assert_eq!(tok.encode("Hello world").unwrap(), [15496, 995]);
        assert_eq!(tok.encode("a<|endoftext|>b").unwrap(), [64, 50256, 65]);
        assert_eq!(tok.token_bytes(50256).unwrap(), b"<|endoftext|>");
        assert_eq!(tok.token_bytes(220).unwrap(), b" ");
        assert_eq!(tok.decode(&[15496, 995, 50256]).unwrap(), "Hello world<|endoftext|>");
        assert_eq!(tok.decode(&[]).unwrap(), "");
        assert!(tok.encode("").unwrap().is_empty());
    }

    #[test]
    fn alphabet_is_a_bijection_onto_bytes() {
        let byte_of = byte_level_alphabet();
        let mut seen = [false; 256];
        for c in (0..0x200).filter_map(char::from_u32) {
            if let Some(b) = byte_of(c) {
                assert!(!seen[b as usize], "byte {b} mapped twice");
                seen[b as usize] = true;
            }
        }
        assert!(seen.iter().all(|&s| s));
        assert_eq!(byte_of('Ġ'), Some(b' '));
        assert_eq!(byte_of('Ċ'), Some(b'\n'));
        assert_eq!(byte_of('A'), Some(b'A'));
        assert_eq!(byte_of('€'), None);
    }

    /// The byte table reproduces the `tokenizers` crate's own ByteLevel decode for every token
    /// alone and for sequences that mix tokens across character boundaries.
    #[test]
    fn decode_matches_tokenizers_crate() {
        let tok = gpt2();
        let hf = &tok.0.hf;
        for id in 0..tok.vocab_size() as u32 {
            assert_eq!(tok.decode(&[id]).unwrap(), hf.decode(&[id], false).unwrap(), "id {id}");
        }
        let mut state = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..200 {
            let ids: Vec<u32> = (0..16)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    // favour the first 512 ids: single bytes and short pieces of multi-byte chars
                    let range = if state % 2 == 0 { 512 } else { 50257 };
                    ((state >> 8) % range) as u32
                })
                .collect();
            assert_eq!(tok.decode(&ids).unwrap(), hf.decode(&ids, false).unwrap(), "{ids:?}");
            let (pieces, tail) = stream(&tok, &ids);
            assert_eq!(pieces.concat() + &tail, tok.decode(&ids).unwrap(), "{ids:?}");
        }
    }

    #[test]
    fn stream_holds_back_partial_characters() {
        let tok = gpt2();
        let hug = tok.encode("🤗").unwrap();
        assert_eq!(hug.len(), 3, "GPT-2 spells 🤗 with three tokens");
        let mut ids = tok.encode("Hi ").unwrap();
        ids.extend(&hug);
        let (pieces, tail) = stream(&tok, &ids);
        assert_eq!(pieces, ["Hi", " ", "", "", "🤗"]);
        assert_eq!(tail, "");
    }

    #[test]
    fn stream_ending_mid_character_gives_one_replacement() {
        let tok = gpt2();
        let hug = tok.encode("🤗").unwrap();
        let (pieces, tail) = stream(&tok, &hug[..2]);
        assert_eq!(pieces, ["", ""]);
        assert_eq!(tail, "\u{FFFD}");
        assert_eq!(tok.decode(&hug[..2]).unwrap(), "\u{FFFD}");
    }

    #[test]
    fn stream_replaces_invalid_bytes_as_soon_as_certain() {
        let tok = gpt2();
        // a lone continuation byte can never complete
        let (pieces, tail) = stream(&tok, &byte_ids(&tok, &[0x80]));
        assert_eq!((pieces.concat(), tail), ("\u{FFFD}".into(), String::new()));
        // a lead byte followed by ASCII: the lead byte is replaced once the ASCII arrives
        let ids = [byte_ids(&tok, &[0xE3]), tok.encode("a").unwrap()].concat();
        let (pieces, tail) = stream(&tok, &ids);
        assert_eq!(pieces, ["", "\u{FFFD}a"]);
        assert_eq!(tail, "");
        // surrogate, overlong and out-of-range encodings: one U+FFFD per maximal invalid subpart
        for bytes in [&[0xED, 0xA0, 0x80][..], &[0xC0, 0x80], &[0xF4, 0x90, 0x80, 0x80]] {
            let ids = byte_ids(&tok, bytes);
            let (pieces, tail) = stream(&tok, &ids);
            let expected = String::from_utf8_lossy(bytes);
            assert_eq!(pieces.concat() + &tail, expected);
            assert_eq!(tok.decode(&ids).unwrap(), expected);
        }
        // a character completed byte by byte
        let ids = byte_ids(&tok, "😀".as_bytes());
        let (pieces, tail) = stream(&tok, &ids);
        assert_eq!(pieces, ["", "", "", "😀"]);
        assert_eq!(tail, "");
    }

    #[test]
    fn stream_reset_and_finish_clear_pending() {
        let tok = gpt2();
        let hug = tok.encode("🤗").unwrap();
        let mut decoder = tok.stream_decoder();
        assert_eq!(decoder.push(hug[0]).unwrap(), "");
        decoder.reset();
        // without the lead bytes, the next token's byte is a lone continuation byte
        assert_eq!(decoder.push(hug[1]).unwrap(), "\u{FFFD}");
        assert_eq!(decoder.finish(), "");
        assert_eq!(decoder.push(hug[0]).unwrap(), "");
        assert_eq!(decoder.finish(), "\u{FFFD}");
        assert_eq!(decoder.finish(), "");
        assert_eq!(decoder.push(15496).unwrap(), "Hello");
    }

    #[test]
    fn push_into_appends() {
        let tok = gpt2();
        let mut decoder = tok.stream_decoder();
        let mut out = String::from(">");
        for id in tok.encode("Hello world").unwrap() {
            decoder.push_into(id, &mut out).unwrap();
        }
        assert_eq!(out, ">Hello world");
    }

    #[test]
    fn bad_id_is_token_out_of_range() {
        let tok = gpt2();
        let e = tok.decode(&[15496, 50257]).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::TokenOutOfRange);
        assert!(e.message().contains("50257"), "{e}");
        assert_eq!(tok.token_bytes(u32::MAX).unwrap_err().kind(), ErrorKind::TokenOutOfRange);

        let hug = tok.encode("🤗").unwrap();
        let mut decoder = tok.stream_decoder();
        decoder.push(hug[0]).unwrap();
        let e = decoder.push(60000).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::TokenOutOfRange);
        assert!(e.message().contains("60000"), "{e}");
        // the failed push left the pending bytes alone
        assert_eq!(decoder.push(hug[1]).unwrap(), "");
        assert_eq!(decoder.push(hug[2]).unwrap(), "🤗");
    }

    #[test]
    fn malformed_json_is_a_tokenizer_error() {
        for bytes in [&b""[..], b"{", b"{\"version\":\"1.0\"}", b"\xff\xfe", &GPT2_JSON[..1000]] {
            let e = Tokenizer::from_json_bytes(bytes).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Tokenizer, "{e}");
        }
    }

    #[test]
    fn non_byte_level_decoder_is_rejected() {
        let json = r#"{"version":"1.0","truncation":null,"padding":null,"added_tokens":[],
            "normalizer":null,"pre_tokenizer":{"type":"Whitespace"},"post_processor":null,
            "decoder":{"type":"Fuse"},
            "model":{"type":"WordLevel","vocab":{"[UNK]":0,"a":1},"unk_token":"[UNK]"}}"#;
        let e = Tokenizer::from_json_bytes(json.as_bytes()).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Tokenizer);
        assert!(e.message().contains("Fuse"), "{e}");
    }

    #[test]
    fn missing_file_is_file_not_found() {
        let path = std::env::temp_dir().join("gpt2rt-no-such-dir/tokenizer.json");
        let e = Tokenizer::from_file(&path).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::FileNotFound);
        assert!(e.message().contains("gpt2rt-no-such-dir"), "{e}");
    }

    #[test]
    fn from_file_round_trips_the_embedded_json() {
        let dir = std::env::temp_dir().join(format!("gpt2rt-tokenizer-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("tokenizer.json");
        std::fs::write(&path, Tokenizer::gpt2_json()).unwrap();
        let tok = Tokenizer::from_file(&path).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(tok.vocab_size(), 50257);
        assert_eq!(tok.encode(" Hello world").unwrap(), [18435, 995]);
    }
}
