//! The model: its configuration, its weights (host-resident f32, whatever dtype they were stored in)
//! and the synthetic DistilGPT2 that ships with the library.

mod config;
mod safetensors_io;
mod synth;

pub use config::{MAX_HEAD_DIM, ModelConfig, Preset};
pub use safetensors_io::{load_dir, load_safetensors, write_dir};
pub use synth::{SplitMix64, synthesize};

use crate::error::Result;
use std::fmt;

/// Storage dtype of weights in a safetensors file (or requested of a backend).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F16,
    BF16,
}

impl DType {
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "f32" | "fp32" | "float32" => Ok(Self::F32),
            "f16" | "fp16" | "float16" => Ok(Self::F16),
            "bf16" | "bfloat16" => Ok(Self::BF16),
            other => bail!(InvalidArgument, "unknown dtype '{other}' (expected f32, f16 or bf16)"),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::BF16 => "bf16",
        }
    }

    pub fn size(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 | Self::BF16 => 2,
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One transformer block. Matrices are row-major `[in, out]` (Hugging Face `Conv1D` layout), so a
/// linear layer is `y = x @ w + b`.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerWeights {
    pub ln_1_weight: Vec<f32>,
    pub ln_1_bias: Vec<f32>,
    /// `[n_embd, 3 * n_embd]`: q, k, v side by side.
    pub attn_weight: Vec<f32>,
    pub attn_bias: Vec<f32>,
    /// `[n_embd, n_embd]`.
    pub attn_proj_weight: Vec<f32>,
    pub attn_proj_bias: Vec<f32>,
    pub ln_2_weight: Vec<f32>,
    pub ln_2_bias: Vec<f32>,
    /// `[n_embd, 4 * n_embd]`.
    pub fc_weight: Vec<f32>,
    pub fc_bias: Vec<f32>,
    /// `[4 * n_embd, n_embd]`.
    pub mlp_proj_weight: Vec<f32>,
    pub mlp_proj_bias: Vec<f32>,
}

/// All weights of a GPT-2 model in f32.
#[derive(Debug, Clone, PartialEq)]
pub struct Weights {
    /// `[vocab_size, n_embd]` token embeddings; also the LM head when `lm_head` is `None` (tied).
    pub wte: Vec<f32>,
    /// `[n_positions, n_embd]`.
    pub wpe: Vec<f32>,
    pub layers: Vec<LayerWeights>,
    pub ln_f_weight: Vec<f32>,
    pub ln_f_bias: Vec<f32>,
    /// `[vocab_size, n_embd]` when the checkpoint has its own, untied LM head.
    pub lm_head: Option<Vec<f32>>,
}

impl Weights {
    /// The `[vocab_size, n_embd]` matrix the logits are computed with.
    pub fn lm_head(&self) -> &[f32] {
        self.lm_head.as_deref().unwrap_or(&self.wte)
    }
}

/// A loaded model: configuration, weights, and where they came from.
#[derive(Debug, Clone)]
pub struct Model {
    pub config: ModelConfig,
    pub weights: Weights,
    /// The dtype the weights were stored in (they are held as f32).
    pub source_dtype: DType,
    /// "built-in synthetic distilgpt2 (seed 0)" or the directory it was loaded from.
    pub source: String,
}

impl Model {
    /// The built-in synthetic model of a preset, generated in memory.
    pub fn synthetic(preset: Preset, seed: u64) -> Self {
        let config = preset.config();
        let weights = synthesize(&config, seed);
        Self {
            config,
            weights,
            source_dtype: DType::F32,
            source: format!("built-in synthetic {} (seed {seed})", preset.name()),
        }
    }
}

/// The name, shape and f32 data of every tensor of a model, in Hugging Face naming (with the
/// `transformer.` prefix), tied lm_head omitted.
pub(crate) fn named_tensors<'a>(config: &ModelConfig, w: &'a Weights) -> Vec<(String, Vec<usize>, &'a [f32])> {
    let c = config.n_embd;
    let mut out: Vec<(String, Vec<usize>, &'a [f32])> = vec![
        ("transformer.wte.weight".into(), vec![config.vocab_size, c], &w.wte),
        ("transformer.wpe.weight".into(), vec![config.n_positions, c], &w.wpe),
    ];
    for (i, l) in w.layers.iter().enumerate() {
        let p = format!("transformer.h.{i}");
        out.extend([
            (format!("{p}.ln_1.weight"), vec![c], &l.ln_1_weight[..]),
            (format!("{p}.ln_1.bias"), vec![c], &l.ln_1_bias[..]),
            (format!("{p}.attn.c_attn.weight"), vec![c, 3 * c], &l.attn_weight[..]),
            (format!("{p}.attn.c_attn.bias"), vec![3 * c], &l.attn_bias[..]),
            (format!("{p}.attn.c_proj.weight"), vec![c, c], &l.attn_proj_weight[..]),
            (format!("{p}.attn.c_proj.bias"), vec![c], &l.attn_proj_bias[..]),
            (format!("{p}.ln_2.weight"), vec![c], &l.ln_2_weight[..]),
            (format!("{p}.ln_2.bias"), vec![c], &l.ln_2_bias[..]),
            (format!("{p}.mlp.c_fc.weight"), vec![c, 4 * c], &l.fc_weight[..]),
            (format!("{p}.mlp.c_fc.bias"), vec![4 * c], &l.fc_bias[..]),
            (format!("{p}.mlp.c_proj.weight"), vec![4 * c, c], &l.mlp_proj_weight[..]),
            (format!("{p}.mlp.c_proj.bias"), vec![c], &l.mlp_proj_bias[..]),
        ]);
    }
    out.push(("transformer.ln_f.weight".into(), vec![c], &w.ln_f_weight));
    out.push(("transformer.ln_f.bias".into(), vec![c], &w.ln_f_bias));
    if let Some(head) = &w.lm_head {
        out.push(("lm_head.weight".into(), vec![config.vocab_size, c], head));
    }
    out
}
