//! The TensorRT engine backend (cargo feature `tensorrt`, off by default): runs engines that
//! trtexec built from the ONNX `tools/export_onnx.py` writes, with or without past KV inputs.
//!
//! - `runtime` (feature `tensorrt`): a small C++ shim (`shim.cpp`, compiled by build.rs against
//!   the TensorRT 10 headers) and the session state. nvinfer is loaded at run time; nothing links
//!   against TensorRT.
//! - [`meta`], [`staging`], [`recipe`], [`onnx`]: every decision (which model an engine is, which
//!   optimization profile serves which phase, whether a call's shapes fit, how a ragged batch is
//!   padded, which trtexec command builds an engine) in pure Rust, compiled and tested in every
//!   build.

pub mod meta;
pub mod onnx;
pub mod recipe;
pub mod staging;

#[cfg(feature = "tensorrt")]
mod runtime;

use crate::backend::Backend;
use crate::error::Result;
use crate::model::ModelConfig;
use meta::{Layout, ModelKind};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The file name of the TensorRT 10 runtime library on this platform.
pub const NVINFER_LIBRARY: &str = if cfg!(windows) { "nvinfer_10.dll" } else { "libnvinfer.so.10" };

/// Why the TensorRT backend cannot be used here (or `Ok` when it can): not compiled in, no
/// TensorRT 10 runtime, or no CUDA driver/GPU.
pub fn availability() -> Result<()> {
    #[cfg(feature = "tensorrt")]
    {
        runtime::availability()
    }
    #[cfg(not(feature = "tensorrt"))]
    {
        bail!(
            BackendUnavailable,
            "the tensorrt backend is not part of this build of gpt2rt {} (build with `--features tensorrt` and the TensorRT 10 headers)",
            env!("CARGO_PKG_VERSION")
        )
    }
}

/// Loads a serialized engine (`.engine`/`.plan`) onto GPU `device`. `config` (from a
/// `config.json` next to it, if any) is cross-checked against the engine's tensors.
pub fn load(engine: &Path, config: Option<ModelConfig>, device: usize) -> Result<Arc<dyn Backend>> {
    #[cfg(feature = "tensorrt")]
    {
        Ok(Arc::new(runtime::TrtBackend::load(engine, config, device)?))
    }
    #[cfg(not(feature = "tensorrt"))]
    {
        let _ = (engine, config, device);
        availability()?;
        unreachable!("availability() fails in a build without the tensorrt backend")
    }
}

/// Where an engine's companions live: the directory given as the model (when it is one), else
/// the engine file's directory. `config.json` and `tokenizer.json` are looked up there.
pub fn sidecar_dir(engine: &Path, model_dir: Option<&Path>) -> PathBuf {
    match model_dir {
        Some(dir) if dir.is_dir() => dir.to_path_buf(),
        _ => engine.parent().map_or_else(|| PathBuf::from("."), Path::to_path_buf),
    }
}

/// The model configuration of an engine: `config.json` when there is one (checked against the
/// engine), else what the engine's tensors say (layers, heads and width from the past tensors;
/// 0 for an engine without them), with `n_positions` = the longest sequence its profiles allow.
pub fn engine_config(layout: &Layout, max_seq: usize, config: Option<ModelConfig>) -> Result<ModelConfig> {
    if let Some(c) = config {
        if c.vocab_size != layout.vocab_size {
            bail!(
                ModelFormat,
                "config.json has vocab_size {} but the engine's logits have {}",
                c.vocab_size,
                layout.vocab_size
            );
        }
        if layout.kind == ModelKind::KvCache
            && (c.n_layer, c.n_head, c.head_dim()) != (layout.n_layer, layout.n_head, layout.head_dim)
        {
            bail!(
                ModelFormat,
                "config.json describes {} layers of {} heads x {} but the engine's past tensors have {} layers of {} x {}",
                c.n_layer,
                c.n_head,
                c.head_dim(),
                layout.n_layer,
                layout.n_head,
                layout.head_dim
            );
        }
        return Ok(c);
    }
    Ok(ModelConfig {
        n_layer: layout.n_layer,
        n_embd: layout.n_head * layout.head_dim,
        n_head: layout.n_head,
        n_positions: max_seq,
        vocab_size: layout.vocab_size,
        layer_norm_epsilon: 1e-5,
    })
}

#[cfg(test)]
mod tests {
    use super::meta::tests::{kv_engine, no_past_engine};
    use super::*;
    use crate::model::Preset;

    #[test]
    fn the_config_comes_from_the_engine_or_is_checked_against_it() {
        let meta = kv_engine(2, 8, 64);
        let layout = Layout::from_meta(&meta).unwrap();
        let derived = engine_config(&layout, 64, None).unwrap();
        assert_eq!((derived.n_layer, derived.n_head, derived.n_embd, derived.n_positions), (2, 4, 64, 64));
        let mut tiny = Preset::Tiny.config();
        tiny.n_embd = 64;
        tiny.n_head = 4;
        assert_eq!(engine_config(&layout, 64, Some(tiny.clone())).unwrap(), tiny);
        let distil = Preset::DistilGpt2.config();
        let e = engine_config(&layout, 64, Some(distil)).unwrap_err();
        assert!(
            e.message().contains("6 layers of 12 heads x 64 but the engine's past tensors have 2 layers of 4 x 16"),
            "{e}"
        );
        let mut wrong_vocab = tiny;
        wrong_vocab.vocab_size = 100;
        let e = engine_config(&layout, 64, Some(wrong_vocab)).unwrap_err();
        assert!(e.message().contains("vocab_size 100"), "{e}");
        // Without past tensors the config cannot be checked beyond the vocabulary.
        let layout = Layout::from_meta(&no_past_engine(4, 32)).unwrap();
        assert!(engine_config(&layout, 32, Some(Preset::DistilGpt2.config())).is_ok());
    }

    #[test]
    fn companions_are_found_next_to_the_engine_or_in_the_model_dir() {
        let dir = std::env::temp_dir();
        assert_eq!(sidecar_dir(Path::new("/x/y/model.engine"), None), PathBuf::from("/x/y"));
        assert_eq!(sidecar_dir(Path::new("/x/y/model.engine"), Some(&dir)), dir);
        assert_eq!(sidecar_dir(Path::new("model.engine"), None), PathBuf::from(""));
    }

    #[cfg(not(feature = "tensorrt"))]
    #[test]
    fn without_the_feature_the_backend_says_how_to_get_it() {
        let e = availability().unwrap_err();
        assert_eq!(e.kind(), crate::ErrorKind::BackendUnavailable);
        assert!(e.message().contains("--features tensorrt"), "{e}");
        let e = load(Path::new("x.engine"), None, 0).unwrap_err();
        assert_eq!(e.kind(), crate::ErrorKind::BackendUnavailable);
    }
}
