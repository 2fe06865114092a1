//! Token-exact parity of the CPU backend with PyTorch (Hugging Face transformers, fp32).
//!
//! The fixtures in tests/fixtures/parity_*.json were made by tools/make_parity_fixtures.py with
//! transformers on directories written by `gpt2rt synth` (see tests/fixtures/README.md); nothing in
//! them comes from gpt2rt's own decoding.

use gpt2rt::{BackendKind, Engine, EngineOptions, GenerateParams, Preset, SessionOptions};
use serde_json::Value;

fn fixture(name: &str) -> Value {
    // GPT2RT_FIXTURES lets the GPU machine check fixtures it just made, before they are committed.
    let dir =
        std::env::var("GPT2RT_FIXTURES").unwrap_or_else(|_| format!("{}/tests/fixtures", env!("CARGO_MANIFEST_DIR")));
    let path = format!("{dir}/parity_{name}.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_json::from_str(&text).unwrap()
}

fn engine(fx: &Value) -> Engine {
    let synth = &fx["synth"];
    Engine::load(&EngineOptions {
        builtin: Preset::parse(synth["config"].as_str().unwrap()).unwrap(),
        seed: synth["seed"].as_u64().unwrap(),
        backend: BackendKind::Cpu,
        ..EngineOptions::default()
    })
    .unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

struct Case {
    name: String,
    new_tokens: usize,
    prompts: Vec<Vec<u32>>,
    greedy: Vec<Vec<u32>>,
}

fn cases(fx: &Value) -> Vec<Case> {
    fx["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let seqs = c["sequences"].as_array().unwrap();
            Case {
                name: c["name"].as_str().unwrap().to_string(),
                new_tokens: c["new_tokens"].as_u64().unwrap() as usize,
                prompts: seqs.iter().map(|s| ids(&s["prompt_ids"])).collect(),
                greedy: seqs.iter().map(|s| ids(&s["greedy"])).collect(),
            }
        })
        .collect()
}

/// Generates a case as one ragged batch and checks every sequence's tokens, at most `limit` new.
fn check_tokens(engine: &Engine, case: &Case, kv_cache: bool, limit: usize) {
    let new_tokens = case.new_tokens.min(limit);
    let lengths: Vec<usize> = case.prompts.iter().map(Vec::len).collect();
    let max_seq = lengths.iter().max().unwrap() + new_tokens;
    let mut session = engine.new_session(SessionOptions { max_batch: case.prompts.len(), max_seq, kv_cache }).unwrap();
    let params = GenerateParams { max_new_tokens: new_tokens, ..GenerateParams::default() };
    let out = session.generate_tokens(&case.prompts.concat(), &lengths, &params, &mut |_, _, _| true).unwrap();
    for (seq, (got, want)) in out.tokens.iter().zip(&case.greedy).enumerate() {
        let want = &want[..new_tokens];
        let first_diff = got.iter().zip(want).position(|(a, b)| a != b);
        assert_eq!(
            got, want,
            "{} seq {seq} kv_cache={kv_cache}: first difference at new token {first_diff:?}",
            case.name
        );
    }
}

/// max |got - want| over the fixture's indices, relative to the largest |want|.
fn check_logits(got: &[f32], want: &Value, what: &str) {
    let idx = want["indices"].as_array().unwrap();
    let values = want["values"].as_array().unwrap();
    let scale = values.iter().map(|v| v.as_f64().unwrap().abs()).fold(1e-6, f64::max);
    let worst = idx
        .iter()
        .zip(values)
        .map(|(i, v)| (got[i.as_u64().unwrap() as usize] as f64 - v.as_f64().unwrap()).abs())
        .fold(0.0, f64::max);
    assert!(worst / scale <= 1e-4, "{what}: max relative logit difference {:.3e}", worst / scale);
}

fn check_case_logits(engine: &Engine, fx: &Value) {
    let case = fx["cases"].as_array().unwrap().iter().find(|c| c["name"] == "batch3_ragged").unwrap();
    let vocab = engine.config().vocab_size;
    let new_tokens = case["new_tokens"].as_u64().unwrap() as usize;
    for (seq, s) in case["sequences"].as_array().unwrap().iter().enumerate() {
        let prompt = ids(&s["prompt_ids"]);
        let greedy = ids(&s["greedy"]);
        let mut session = engine
            .new_session(SessionOptions { max_batch: 1, max_seq: prompt.len() + new_tokens, kv_cache: true })
            .unwrap();
        let mut logits = vec![0.0; vocab];
        session.prefill(&prompt, &[prompt.len()]).unwrap();
        session.read_logits(&mut logits).unwrap();
        check_logits(&logits, &s["prefill_logits"], &format!("seq {seq} prefill"));
        for &t in &greedy[..new_tokens - 1] {
            session.step(&[t]).unwrap();
        }
        session.read_logits(&mut logits).unwrap();
        check_logits(&logits, &s["last_logits"], &format!("seq {seq} after {} steps", new_tokens - 1));
    }
}

#[test]
fn tiny_matches_pytorch_tokens_and_logits() {
    let fx = fixture("tiny");
    let engine = engine(&fx);
    for case in cases(&fx) {
        check_tokens(&engine, &case, true, usize::MAX);
        check_tokens(&engine, &case, false, usize::MAX);
    }
    check_case_logits(&engine, &fx);
}

#[test]
fn distilgpt2_matches_pytorch_tokens_and_logits() {
    let fx = fixture("distilgpt2");
    let engine = engine(&fx);
    for case in cases(&fx) {
        check_tokens(&engine, &case, true, usize::MAX);
    }
    // The recompute path is O(L^2): check it on the ragged batch of three, 16 tokens.
    let ragged = cases(&fx).into_iter().find(|c| c.name == "batch3_ragged").unwrap();
    check_tokens(&engine, &ragged, false, 16);
    check_case_logits(&engine, &fx);
}
