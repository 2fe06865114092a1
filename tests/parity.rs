//! Token-exact parity of the CPU backend with PyTorch (Hugging Face transformers, fp32).
//!
//! The fixtures in tests/fixtures/parity_*.json were made by tools/make_parity_fixtures.py with
//! transformers on directories written by `gpt2rt synth` (see tests/fixtures/README.md); nothing in
//! them comes from gpt2rt's own decoding.

mod common;

use common::*;
use gpt2rt::BackendKind;

#[test]
fn tiny_matches_pytorch_tokens_and_logits() {
    let fx = fixture("tiny");
    let engine = engine(&fx, BackendKind::Cpu, None).unwrap();
    for case in cases(&fx) {
        check_tokens(&engine, &case, true, usize::MAX);
        check_tokens(&engine, &case, false, usize::MAX);
    }
    check_case_logits(&engine, &fx);
}

#[test]
fn distilgpt2_matches_pytorch_tokens_and_logits() {
    let fx = fixture("distilgpt2");
    let engine = engine(&fx, BackendKind::Cpu, None).unwrap();
    for case in cases(&fx) {
        check_tokens(&engine, &case, true, usize::MAX);
    }
    // The recompute path is O(L^2): check it on the ragged batch of three, 16 tokens.
    let ragged = cases(&fx).into_iter().find(|c| c.name == "batch3_ragged").unwrap();
    check_tokens(&engine, &ragged, false, 16);
    check_case_logits(&engine, &fx);
}
