//! `config.json` of a Hugging Face GPT-2 model: the fields gpt2rt needs, checked for consistency.

use crate::error::Result;
use serde_json::{Map, Value, json};

/// Largest head dimension the kernels support (GPT-2 family: 64).
pub const MAX_HEAD_DIM: usize = 256;

/// Shapes and constants of a GPT-2 family model.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub n_layer: usize,
    pub n_embd: usize,
    pub n_head: usize,
    /// Maximum positions (`n_positions`): the longest sequence the model supports.
    pub n_positions: usize,
    pub vocab_size: usize,
    pub layer_norm_epsilon: f32,
}

/// The named configurations `gpt2rt synth --config` knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preset {
    /// DistilGPT2: 6 layers, 768 wide, 12 heads (81,912,576 parameters).
    DistilGpt2,
    /// GPT-2 small: 12 layers, 768 wide, 12 heads.
    Gpt2,
    /// A 2-layer, 64-wide model with the GPT-2 vocabulary, for fast tests.
    Tiny,
}

impl Preset {
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "distilgpt2" => Ok(Self::DistilGpt2),
            "gpt2" => Ok(Self::Gpt2),
            "tiny" => Ok(Self::Tiny),
            other => bail!(InvalidArgument, "unknown model config '{other}' (expected distilgpt2, gpt2 or tiny)"),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::DistilGpt2 => "distilgpt2",
            Self::Gpt2 => "gpt2",
            Self::Tiny => "tiny",
        }
    }

    pub fn config(self) -> ModelConfig {
        let (n_layer, n_embd, n_head, n_positions) = match self {
            Self::DistilGpt2 => (6, 768, 12, 1024),
            Self::Gpt2 => (12, 768, 12, 1024),
            Self::Tiny => (2, 64, 4, 512),
        };
        ModelConfig { n_layer, n_embd, n_head, n_positions, vocab_size: 50257, layer_norm_epsilon: 1e-5 }
    }
}

impl ModelConfig {
    pub fn head_dim(&self) -> usize {
        self.n_embd / self.n_head
    }

    /// Number of parameters with lm_head tied to wte (saturating at `usize::MAX`).
    pub fn param_count(&self) -> usize {
        usize::try_from(self.param_count_wide()).unwrap_or(usize::MAX)
    }

    /// Number of parameters with lm_head tied to wte, in 128 bits: a config that claims a huge model
    /// must be refused, not overflow while its size is computed.
    pub(crate) fn param_count_wide(&self) -> u128 {
        let c = self.n_embd as u128;
        let per_layer = 2 * c + (c * 3 * c + 3 * c) + (c * c + c) + 2 * c + (c * 4 * c + 4 * c) + (4 * c * c + c);
        (self.vocab_size as u128 + self.n_positions as u128) * c + self.n_layer as u128 * per_layer + 2 * c
    }

    /// Checks the invariants every backend relies on.
    pub fn validate(&self) -> Result<()> {
        let fields = [
            ("n_layer", self.n_layer),
            ("n_embd", self.n_embd),
            ("n_head", self.n_head),
            ("n_positions", self.n_positions),
            ("vocab_size", self.vocab_size),
        ];
        for (name, value) in fields {
            if value == 0 {
                bail!(InvalidConfig, "config.json: {name} must be positive");
            }
            if value > 1 << 24 {
                bail!(InvalidConfig, "config.json: {name} = {value} is implausibly large");
            }
        }
        if self.n_embd % self.n_head != 0 {
            bail!(InvalidConfig, "config.json: n_embd ({}) is not divisible by n_head ({})", self.n_embd, self.n_head);
        }
        if self.head_dim() > MAX_HEAD_DIM {
            bail!(
                InvalidConfig,
                "config.json: head dimension {} exceeds the supported maximum {MAX_HEAD_DIM}",
                self.head_dim()
            );
        }
        if !(self.layer_norm_epsilon.is_finite() && self.layer_norm_epsilon > 0.0) {
            bail!(
                InvalidConfig,
                "config.json: layer_norm_epsilon must be a positive number, got {}",
                self.layer_norm_epsilon
            );
        }
        if self.param_count_wide() * 4 > 1u128 << 40 {
            bail!(InvalidConfig, "config.json: model of {} parameters is too large", self.param_count_wide());
        }
        Ok(())
    }

    /// Parses a Hugging Face GPT-2 `config.json`.
    pub fn from_json(text: &str) -> Result<Self> {
        let value: Value =
            serde_json::from_str(text).map_err(|e| err!(InvalidConfig, "config.json is not valid JSON: {e}"))?;
        let obj = value.as_object().ok_or_else(|| err!(InvalidConfig, "config.json must be a JSON object"))?;
        if let Some(model_type) = obj.get("model_type").and_then(Value::as_str) {
            if model_type != "gpt2" {
                bail!(InvalidConfig, "config.json: model_type '{model_type}' is not gpt2");
            }
        }
        if let Some(act) = obj.get("activation_function").and_then(Value::as_str) {
            if act != "gelu_new" {
                bail!(InvalidConfig, "config.json: activation_function '{act}' is not supported (only gelu_new)");
            }
        }
        let config = Self {
            n_layer: usize_field(obj, &["n_layer", "num_hidden_layers"])?,
            n_embd: usize_field(obj, &["n_embd", "hidden_size"])?,
            n_head: usize_field(obj, &["n_head", "num_attention_heads"])?,
            n_positions: usize_field(obj, &["n_positions", "max_position_embeddings"])?,
            vocab_size: usize_field(obj, &["vocab_size"])?,
            layer_norm_epsilon: match obj.get("layer_norm_epsilon") {
                None => 1e-5,
                Some(v) => {
                    v.as_f64().ok_or_else(|| err!(InvalidConfig, "config.json: layer_norm_epsilon must be a number"))?
                        as f32
                }
            },
        };
        if let Some(inner) = obj.get("n_inner").filter(|v| !v.is_null()) {
            if inner.as_u64() != Some(4 * config.n_embd as u64) {
                bail!(InvalidConfig, "config.json: n_inner {inner} is not supported (only 4 * n_embd)");
            }
        }
        config.validate()?;
        Ok(config)
    }

    /// A `config.json` that `transformers.GPT2LMHeadModel.from_pretrained` loads.
    pub fn to_hf_json(&self) -> String {
        let value = json!({
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "activation_function": "gelu_new",
            "n_layer": self.n_layer,
            "n_embd": self.n_embd,
            "n_head": self.n_head,
            "n_positions": self.n_positions,
            "n_ctx": self.n_positions,
            "n_inner": null,
            "vocab_size": self.vocab_size,
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "initializer_range": 0.02,
            "attn_pdrop": 0.1,
            "embd_pdrop": 0.1,
            "resid_pdrop": 0.1,
            "scale_attn_weights": true,
            "scale_attn_by_inverse_layer_idx": false,
            "reorder_and_upcast_attn": false,
            "bos_token_id": 50256,
            "eos_token_id": 50256,
            "tie_word_embeddings": true,
            "use_cache": true,
            "torch_dtype": "float32"
        });
        serde_json::to_string_pretty(&value).expect("a json! value always serializes")
    }
}

fn usize_field(obj: &Map<String, Value>, names: &[&str]) -> Result<usize> {
    for name in names {
        if let Some(v) = obj.get(*name) {
            return v
                .as_u64()
                .and_then(|n| usize::try_from(n).ok())
                .ok_or_else(|| err!(InvalidConfig, "config.json: {name} must be a non-negative integer, got {v}"));
        }
    }
    bail!(InvalidConfig, "config.json: missing field {}", names[0])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;

    #[test]
    fn distilgpt2_has_the_published_parameter_count() {
        assert_eq!(Preset::DistilGpt2.config().param_count(), 81_912_576);
    }

    #[test]
    fn hf_json_round_trips() {
        for preset in [Preset::DistilGpt2, Preset::Gpt2, Preset::Tiny] {
            let config = preset.config();
            assert_eq!(ModelConfig::from_json(&config.to_hf_json()).unwrap(), config);
        }
    }

    #[test]
    fn inconsistent_configs_are_named() {
        let bad = r#"{"n_layer":2,"n_embd":65,"n_head":4,"n_positions":8,"vocab_size":10}"#;
        let e = ModelConfig::from_json(bad).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidConfig);
        assert!(e.message().contains("not divisible"), "{e}");

        let missing = r#"{"n_layer":2,"n_embd":64,"n_head":4,"vocab_size":10}"#;
        let e = ModelConfig::from_json(missing).unwrap_err();
        assert!(e.message().contains("n_positions"), "{e}");

        let act =
            r#"{"n_layer":2,"n_embd":64,"n_head":4,"n_positions":8,"vocab_size":10,"activation_function":"relu"}"#;
        assert!(ModelConfig::from_json(act).unwrap_err().message().contains("relu"));

        assert_eq!(ModelConfig::from_json("[1]").unwrap_err().kind(), ErrorKind::InvalidConfig);
        assert_eq!(ModelConfig::from_json("{").unwrap_err().kind(), ErrorKind::InvalidConfig);
        let zero = r#"{"n_layer":0,"n_embd":64,"n_head":4,"n_positions":8,"vocab_size":10}"#;
        assert!(ModelConfig::from_json(zero).unwrap_err().message().contains("n_layer"));
    }

    #[test]
    fn a_config_whose_size_overflows_64_bits_is_refused_not_wrapped() {
        // n_layer * per-layer parameters is about 2^75: it used to overflow (a panic with overflow
        // checks, a wrapped and possibly accepted size without).
        let huge = r#"{"n_layer":16777216,"n_embd":16777216,"n_head":65536,"n_positions":1,"vocab_size":1}"#;
        let e = ModelConfig::from_json(huge).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidConfig);
        assert!(e.message().contains("too large"), "{e}");
        let config = ModelConfig { n_layer: 1 << 24, n_embd: 1 << 24, n_head: 1 << 16, ..Preset::Tiny.config() };
        assert_eq!(config.param_count(), usize::MAX);
    }
}
