//! The committed fuzz seeds (fuzz/seeds/, written by fuzz/make_seeds.py) are what they claim to be:
//! every safetensors seed loads against the config its first byte picks, and every config seed
//! parses. A seed that stopped loading would quietly leave the fuzzers far from the valid paths.

use gpt2rt::ModelConfig;
use gpt2rt::model::load_safetensors;
use std::path::Path;

/// Same order as CONFIGS in fuzz/fuzz_targets/safetensors.rs and fuzz/make_seeds.py.
const CONFIGS: [(usize, usize, usize, usize, usize); 3] = [(1, 8, 2, 8, 16), (2, 4, 1, 4, 8), (3, 4, 2, 2, 4)];

fn seeds(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds").join(target);
    let mut out: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| {
            let path = e.unwrap().path();
            (path.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read(&path).unwrap())
        })
        .collect();
    out.sort();
    out
}

#[test]
fn safetensors_seeds_load() {
    let all = seeds("safetensors");
    assert!(all.len() >= 24, "{} seeds", all.len());
    for (name, bytes) in all {
        let (n_layer, n_embd, n_head, n_positions, vocab_size) = CONFIGS[bytes[0] as usize % CONFIGS.len()];
        let config = ModelConfig { n_layer, n_embd, n_head, n_positions, vocab_size, layer_norm_epsilon: 1e-5 };
        let (weights, dtype) = load_safetensors(&config, &bytes[1..]).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(name.contains(&dtype.to_string()), "{name} loaded as {dtype}");
        assert_eq!(weights.lm_head.is_some(), name.contains("lmhead"), "{name}");
        assert!(bytes.len() < 8 << 10, "{name}: {} bytes; seeds should stay small", bytes.len());
    }
}

#[test]
fn config_seeds_parse() {
    for (name, bytes) in seeds("config_json") {
        ModelConfig::from_json(std::str::from_utf8(&bytes).unwrap()).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
}
