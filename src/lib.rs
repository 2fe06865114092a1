//! gpt2rt: GPT-2 / DistilGPT2 decoding with the lowest end-to-end latency, behind a C ABI.
//!
//! Layers, top to bottom (one direction of dependency): [`ffi`] (the C ABI only), [`api`] (the safe
//! Rust API), [`decode`] (profile, prefill, step, logits, sampling, generate), [`backend`] (CPU
//! reference, CUDA, TensorRT), [`model`] (config, safetensors, synthetic weights), [`tokenizer`].

#[macro_use]
pub mod error;
pub mod api;
pub mod backend;
pub mod decode;
pub mod ffi;
pub mod log;
pub mod memory;
pub mod model;
pub mod nvtx;
pub mod sampling;
pub mod tokenizer;

pub use api::{Engine, EngineOptions, Session, TextOutput, Tokenizer};
pub use backend::{BackendKind, Profile};
pub use decode::{FinishReason, GenerateOutput, GenerateParams, SessionOptions};
pub use error::{Error, ErrorKind, Result};
pub use model::{DType, ModelConfig, Preset};
pub use sampling::SamplingParams;
