//! Shared by the parity tests of every backend: loads the PyTorch fixtures and checks a backend
//! against them.
#![allow(dead_code)]

use gpt2rt::{BackendKind, DType, Engine, EngineOptions, GenerateParams, Preset, SessionOptions};
use serde_json::Value;

fn fixture_path(name: &str) -> String {
    // GPT2RT_FIXTURES lets the GPU machine check fixtures it just made, before they are committed.
    let dir =
        std::env::var("GPT2RT_FIXTURES").unwrap_or_else(|_| format!("{}/tests/fixtures", env!("CARGO_MANIFEST_DIR")));
    format!("{dir}/parity_{name}.json")
}

pub fn fixture(name: &str) -> Value {
    let path = fixture_path(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_json::from_str(&text).unwrap()
}

/// A fixture that may not exist (the same-precision references are made on the GPU machine).
pub fn optional_fixture(name: &str) -> Option<Value> {
    let text = std::fs::read_to_string(fixture_path(name)).ok()?;
    Some(serde_json::from_str(&text).unwrap())
}

pub fn engine(fx: &Value, backend: BackendKind, dtype: Option<DType>) -> gpt2rt::Result<Engine> {
    let synth = &fx["synth"];
    Engine::load(&EngineOptions {
        builtin: Preset::parse(synth["config"].as_str().unwrap()).unwrap(),
        seed: synth["seed"].as_u64().unwrap(),
        backend,
        dtype,
        ..EngineOptions::default()
    })
}

pub fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

pub struct Case {
    pub name: String,
    pub new_tokens: usize,
    pub prompts: Vec<Vec<u32>>,
    pub greedy: Vec<Vec<u32>>,
}

pub fn cases(fx: &Value) -> Vec<Case> {
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
pub fn check_tokens(engine: &Engine, case: &Case, kv_cache: bool, limit: usize) {
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

/// Asserts the fixture's logits within 1e-4 relative.
pub fn check_logits(got: &[f32], want: &Value, what: &str) {
    let rel = relative_difference(got, want);
    assert!(rel <= 1e-4, "{what}: max relative logit difference {rel:.3e}");
}

pub fn check_case_logits(engine: &Engine, fx: &Value) {
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

/// For every case: greedy tokens matching the fixture before the first divergence (summed over
/// sequences), the number compared, and the worst relative prefill-logit difference.
pub fn agreement(engine: &Engine, fx: &Value) -> (usize, usize, f64) {
    let (mut agree, mut total) = (0, 0);
    for case in cases(fx) {
        let lengths: Vec<usize> = case.prompts.iter().map(Vec::len).collect();
        let max_seq = lengths.iter().max().unwrap() + case.new_tokens;
        let mut session =
            engine.new_session(SessionOptions { max_batch: case.prompts.len(), max_seq, kv_cache: true }).unwrap();
        let params = GenerateParams { max_new_tokens: case.new_tokens, ..GenerateParams::default() };
        let out = session.generate_tokens(&case.prompts.concat(), &lengths, &params, &mut |_, _, _| true).unwrap();
        for (got, want) in out.tokens.iter().zip(&case.greedy) {
            agree += got.iter().zip(want).take_while(|(a, b)| a == b).count();
            total += want.len();
        }
    }
    let case = fx["cases"].as_array().unwrap().iter().find(|c| c["name"] == "batch3_ragged").unwrap();
    let vocab = engine.config().vocab_size;
    let mut worst = 0.0f64;
    for s in case["sequences"].as_array().unwrap() {
        let prompt = ids(&s["prompt_ids"]);
        let mut session =
            engine.new_session(SessionOptions { max_batch: 1, max_seq: prompt.len() + 1, kv_cache: true }).unwrap();
        session.prefill(&prompt, &[prompt.len()]).unwrap();
        let mut logits = vec![0.0; vocab];
        session.read_logits(&mut logits).unwrap();
        worst = worst.max(relative_difference(&logits, &s["prefill_logits"]));
    }
    (agree, total, worst)
}

/// max |got - want| over the fixture's indices, relative to the largest |want|.
pub fn relative_difference(got: &[f32], want: &Value) -> f64 {
    let idx = want["indices"].as_array().unwrap();
    let values = want["values"].as_array().unwrap();
    let scale = values.iter().map(|v| v.as_f64().unwrap().abs()).fold(1e-6, f64::max);
    let worst = idx
        .iter()
        .zip(values)
        .map(|(i, v)| (got[i.as_u64().unwrap() as usize] as f64 - v.as_f64().unwrap()).abs())
        .fold(0.0, f64::max);
    worst / scale
}
