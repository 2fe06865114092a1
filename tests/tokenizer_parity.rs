//! Parity of the built-in GPT-2 tokenizer with Hugging Face `transformers`.
//!
//! `tests/fixtures/tokenizer.json` is written by `tools/make_tokenizer_fixture.py` from
//! `GPT2TokenizerFast` built from GPT-2's vocab.json/merges.txt; nothing in it comes from this crate.

use gpt2rt::Tokenizer;
use serde_json::Value;

struct Fixture {
    /// (text, ids, decoded) for every encoded string.
    cases: Vec<(String, Vec<u32>, String)>,
    /// (note, ids, decoded) for id sequences that split or break UTF-8 characters.
    decode_only: Vec<(String, Vec<u32>, String)>,
}

fn load_fixture() -> Fixture {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tokenizer.json");
    let json: Value = serde_json::from_slice(&std::fs::read(path).expect("read fixture")).expect("fixture is JSON");
    let str_field = |row: &Value, key: &str| row[key].as_str().unwrap_or_else(|| panic!("{key} in {row}")).to_string();
    let ids_field = |row: &Value| -> Vec<u32> {
        let ids = row["ids"].as_array().unwrap_or_else(|| panic!("ids in {row}"));
        ids.iter().map(|id| id.as_u64().and_then(|id| u32::try_from(id).ok()).expect("u32 id")).collect()
    };
    let rows = |key: &str, label: &str| -> Vec<(String, Vec<u32>, String)> {
        let rows = json[key].as_array().unwrap_or_else(|| panic!("fixture has no {key}"));
        rows.iter().map(|row| (str_field(row, label), ids_field(row), str_field(row, "decoded"))).collect()
    };
    Fixture { cases: rows("cases", "text"), decode_only: rows("decode_only", "note") }
}

/// Streams `ids` one at a time and joins every piece and the final tail.
fn stream_concat(tok: &Tokenizer, ids: &[u32]) -> String {
    let mut decoder = tok.stream_decoder();
    let mut text = String::new();
    for &id in ids {
        text.push_str(&decoder.push(id).expect("push"));
    }
    text + &decoder.finish()
}

#[test]
fn fixture_is_substantial() {
    let fixture = load_fixture();
    assert!(fixture.cases.len() >= 60, "{} cases", fixture.cases.len());
    assert!(fixture.decode_only.len() >= 20, "{} decode-only", fixture.decode_only.len());
    assert!(fixture.cases.iter().any(|(_, ids, _)| ids.contains(&50256)));
}

#[test]
fn encode_matches_hugging_face() {
    let tok = Tokenizer::gpt2().unwrap();
    let mut failures = Vec::new();
    for (text, ids, _) in &load_fixture().cases {
        let got = tok.encode(text).unwrap();
        if &got != ids {
            failures.push(format!("{text:?}\n  expected {ids:?}\n  got      {got:?}"));
        }
    }
    assert!(failures.is_empty(), "encode differs from Hugging Face:\n{}", failures.join("\n"));
}

#[test]
fn decode_matches_hugging_face() {
    let tok = Tokenizer::gpt2().unwrap();
    let fixture = load_fixture();
    let all = fixture.cases.iter().chain(&fixture.decode_only);
    for (label, ids, decoded) in all {
        assert_eq!(&tok.decode(ids).unwrap(), decoded, "decode of {label:?} ({ids:?})");
    }
}

#[test]
fn stream_decoder_concatenation_equals_decode() {
    let tok = Tokenizer::gpt2().unwrap();
    let fixture = load_fixture();
    let all = fixture.cases.iter().chain(&fixture.decode_only);
    for (label, ids, decoded) in all {
        assert_eq!(&stream_concat(&tok, ids), decoded, "streamed decode of {label:?} ({ids:?})");
    }
}

#[test]
fn stream_decoder_never_emits_partial_characters() {
    // Every piece is a `String`, so it is valid UTF-8 by construction; what matters is that no
    // replacement character appears where the whole decode has none (a split character emitted
    // early would show up as U+FFFD).
    let tok = Tokenizer::gpt2().unwrap();
    for (text, ids, _) in &load_fixture().cases {
        if text.contains('\u{FFFD}') {
            continue;
        }
        let mut decoder = tok.stream_decoder();
        for &id in ids {
            let piece = decoder.push(id).unwrap();
            assert!(!piece.contains('\u{FFFD}'), "{text:?}: piece {piece:?} for id {id}");
        }
        assert_eq!(decoder.finish(), "", "{text:?}");
    }
}
