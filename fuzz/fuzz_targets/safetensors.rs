//! `load_safetensors` on arbitrary bytes against small configs (the first byte picks one, so valid
//! files are a few KB and the fuzzer can reach them): never panics, never allocates for sizes the
//! file does not hold; an accepted file gives every tensor its config's shape; every refusal has a
//! model-file status.
#![no_main]

use gpt2rt::model::load_safetensors;
use gpt2rt::{ErrorKind, ModelConfig};
use libfuzzer_sys::fuzz_target;

/// (n_layer, n_embd, n_head, n_positions, vocab_size); fuzz/make_seeds.py writes the same three.
const CONFIGS: [(usize, usize, usize, usize, usize); 3] = [(1, 8, 2, 8, 16), (2, 4, 1, 4, 8), (3, 4, 2, 2, 4)];

fuzz_target!(|data: &[u8]| {
    let Some((&pick, bytes)) = data.split_first() else { return };
    let (n_layer, n_embd, n_head, n_positions, vocab_size) = CONFIGS[pick as usize % CONFIGS.len()];
    let config = ModelConfig { n_layer, n_embd, n_head, n_positions, vocab_size, layer_norm_epsilon: 1e-5 };
    match load_safetensors(&config, bytes) {
        Ok((w, _dtype)) => {
            let c = n_embd;
            assert_eq!(w.wte.len(), vocab_size * c);
            assert_eq!(w.wpe.len(), n_positions * c);
            assert_eq!(w.layers.len(), n_layer);
            for l in &w.layers {
                assert_eq!(l.attn_weight.len(), c * 3 * c);
                assert_eq!(l.attn_bias.len(), 3 * c);
                assert_eq!(l.fc_weight.len(), c * 4 * c);
                assert_eq!(l.mlp_proj_weight.len(), 4 * c * c);
                assert_eq!(l.ln_2_bias.len(), c);
            }
            assert_eq!(w.ln_f_weight.len(), c);
            assert_eq!(w.lm_head().len(), vocab_size * c);
        }
        Err(e) => {
            assert!(
                matches!(
                    e.kind(),
                    ErrorKind::ModelFormat
                        | ErrorKind::MissingTensor
                        | ErrorKind::ShapeMismatch
                        | ErrorKind::UnsupportedDtype
                        | ErrorKind::OutOfMemory
                ),
                "{:?}: {e}",
                e.kind()
            );
            assert!(!e.message().is_empty());
        }
    }
});
