//! `ModelConfig::from_json` on arbitrary bytes: never panics; accepted configs pass `validate`,
//! have a computable size and round-trip through `to_hf_json`; every refusal is `InvalidConfig`.
#![no_main]

use gpt2rt::{ErrorKind, ModelConfig};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    match ModelConfig::from_json(text) {
        Ok(config) => {
            config.validate().expect("an accepted config validates");
            assert!(config.param_count() > 0);
            assert_eq!(config.n_embd % config.n_head, 0);
            let again = ModelConfig::from_json(&config.to_hf_json()).expect("to_hf_json output parses");
            assert_eq!(again, config);
        }
        Err(e) => {
            assert_eq!(e.kind(), ErrorKind::InvalidConfig, "{e}");
            assert!(!e.message().is_empty());
        }
    }
});
