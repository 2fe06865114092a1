//! Reading and writing Hugging Face GPT-2 directories (`config.json` + `model.safetensors`).

use super::{DType, LayerWeights, Model, ModelConfig, Weights, named_tensors};
use crate::error::Result;
use crate::memory::ensure_host_memory;
use half::{bf16, f16};
use safetensors::{Dtype as StDtype, SafeTensors, tensor::TensorView};
use std::collections::HashMap;
use std::path::Path;

fn read_file(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => err!(FileNotFound, "{} not found", path.display()),
        _ => err!(Io, "cannot read {}: {e}", path.display()),
    })
}

/// Loads `config.json` and `model.safetensors` from a Hugging Face GPT-2 directory.
///
/// The model's own `tokenizer.json`, if any, is the caller's business (see `api::Engine`).
pub fn load_dir(dir: &Path) -> Result<Model> {
    if !dir.is_dir() {
        bail!(FileNotFound, "model directory {} not found", dir.display());
    }
    let config_text = read_file(&dir.join("config.json"))?;
    let config_text = String::from_utf8(config_text)
        .map_err(|_| err!(InvalidConfig, "{}: not UTF-8", dir.join("config.json").display()))?;
    let config = ModelConfig::from_json(&config_text).map_err(|e| e.context(dir.join("config.json").display()))?;
    let st_path = dir.join("model.safetensors");
    // Sizes first, from the file's metadata: a config that does not fit the file, or a model that
    // does not fit in memory, fails before the file is read.
    let file_len = std::fs::metadata(&st_path)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => err!(FileNotFound, "{} not found", st_path.display()),
            _ => err!(Io, "cannot read {}: {e}", st_path.display()),
        })?
        .len();
    ensure_file_fits_config(&config, file_len as u128).map_err(|e| e.context(st_path.display()))?;
    let params = config.param_count_wide();
    ensure_host_memory(
        file_len as u128 + 4 * params,
        &format_args!("loading {} ({params} parameters, held as f32)", st_path.display()),
    )?;
    let bytes = read_file(&st_path)?;
    let (weights, source_dtype) = load_safetensors(&config, &bytes).map_err(|e| e.context(st_path.display()))?;
    Ok(Model { config, weights, source_dtype, source: dir.display().to_string() })
}

/// Parses safetensors bytes into f32 weights for `config`, checking every name, shape and dtype.
///
/// The safetensors header is validated against the buffer (offsets inside it, sizes matching
/// shapes) before any tensor is converted, so a header that claims more data than exists fails
/// without allocating for it.
pub fn load_safetensors(config: &ModelConfig, bytes: &[u8]) -> Result<(Weights, DType)> {
    ensure_file_fits_config(config, bytes.len() as u128)?;
    let st = SafeTensors::deserialize(bytes).map_err(|e| err!(ModelFormat, "not a valid safetensors file: {e}"))?;
    let tensors: HashMap<String, TensorView<'_>> = st.tensors().into_iter().collect();
    let prefix = if tensors.contains_key("transformer.wte.weight") { "transformer." } else { "" };
    let mut dtypes = Vec::new();
    let mut take = |name: &str, shape: &[usize]| -> Result<Vec<f32>> {
        let full = if name == "lm_head.weight" { name.to_string() } else { format!("{prefix}{name}") };
        let view = tensors.get(&full).ok_or_else(|| err!(MissingTensor, "missing tensor '{full}'"))?;
        if view.shape() != shape {
            bail!(ShapeMismatch, "tensor '{full}' has shape {:?}, expected {:?}", view.shape(), shape);
        }
        let values = to_f32(view).map_err(|e| e.context(format!("tensor '{full}'")))?;
        dtypes.push(view.dtype());
        Ok(values)
    };
    let c = config.n_embd;
    let v = config.vocab_size;
    let wte = take("wte.weight", &[v, c])?;
    let wpe = take("wpe.weight", &[config.n_positions, c])?;
    let mut layers = Vec::with_capacity(config.n_layer);
    for i in 0..config.n_layer {
        let mut t = |suffix: &str, shape: &[usize]| take(&format!("h.{i}.{suffix}"), shape);
        layers.push(LayerWeights {
            ln_1_weight: t("ln_1.weight", &[c])?,
            ln_1_bias: t("ln_1.bias", &[c])?,
            attn_weight: t("attn.c_attn.weight", &[c, 3 * c])?,
            attn_bias: t("attn.c_attn.bias", &[3 * c])?,
            attn_proj_weight: t("attn.c_proj.weight", &[c, c])?,
            attn_proj_bias: t("attn.c_proj.bias", &[c])?,
            ln_2_weight: t("ln_2.weight", &[c])?,
            ln_2_bias: t("ln_2.bias", &[c])?,
            fc_weight: t("mlp.c_fc.weight", &[c, 4 * c])?,
            fc_bias: t("mlp.c_fc.bias", &[4 * c])?,
            mlp_proj_weight: t("mlp.c_proj.weight", &[4 * c, c])?,
            mlp_proj_bias: t("mlp.c_proj.bias", &[c])?,
        });
    }
    let ln_f_weight = take("ln_f.weight", &[c])?;
    let ln_f_bias = take("ln_f.bias", &[c])?;
    let lm_head = if tensors.contains_key("lm_head.weight") {
        let head = take("lm_head.weight", &[v, c])?;
        // Checkpoints that store the tied head explicitly are still tied: keep one copy.
        (head != wte).then_some(head)
    } else {
        None
    };
    let source_dtype = match dtypes.first() {
        Some(StDtype::F16) => DType::F16,
        Some(StDtype::BF16) => DType::BF16,
        _ => DType::F32,
    };
    let weights = Weights { wte, wpe, layers, ln_f_weight, ln_f_bias, lm_head };
    Ok((weights, source_dtype))
}

/// A file of `len` bytes cannot hold the weights `config` describes when it is smaller than their
/// size at 2 bytes per parameter (f16/bf16, the smallest dtype loaded): refused with `ModelFormat`
/// before anything is parsed or allocated for the config's sake.
fn ensure_file_fits_config(config: &ModelConfig, len: u128) -> Result<()> {
    let needed = config.param_count_wide() * 2;
    if len < needed {
        bail!(
            ModelFormat,
            "the file has {len} bytes, but config.json describes a model of {} parameters, which needs at least {needed} bytes (f16/bf16): config.json and the weights do not match",
            config.param_count_wide()
        );
    }
    Ok(())
}

fn to_f32(view: &TensorView<'_>) -> Result<Vec<f32>> {
    let data = view.data();
    let out = match view.dtype() {
        StDtype::F32 => data.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
        StDtype::F16 => data.chunks_exact(2).map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        StDtype::BF16 => data.chunks_exact(2).map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        other => bail!(UnsupportedDtype, "dtype {other:?} is not supported (f32, f16 or bf16)"),
    };
    Ok(out)
}

fn encode(values: &[f32], dtype: DType) -> Vec<u8> {
    match dtype {
        DType::F32 => values.iter().flat_map(|x| x.to_le_bytes()).collect(),
        DType::F16 => values.iter().flat_map(|x| f16::from_f32(*x).to_le_bytes()).collect(),
        DType::BF16 => values.iter().flat_map(|x| bf16::from_f32(*x).to_le_bytes()).collect(),
    }
}

/// Writes a Hugging Face GPT-2 directory: `config.json`, `model.safetensors` (in `dtype`) and,
/// when given, `tokenizer.json`. `transformers.GPT2LMHeadModel.from_pretrained(dir)` loads it.
pub fn write_dir(
    dir: &Path,
    config: &ModelConfig,
    weights: &Weights,
    dtype: DType,
    tokenizer_json: Option<&[u8]>,
) -> Result<()> {
    let io = |what: &str, e: std::io::Error| err!(Io, "cannot write {what} in {}: {e}", dir.display());
    std::fs::create_dir_all(dir).map_err(|e| io("directory", e))?;
    let mut config_json = config.to_hf_json();
    if dtype != DType::F32 {
        let torch = if dtype == DType::F16 { "float16" } else { "bfloat16" };
        config_json = config_json.replace("\"float32\"", &format!("\"{torch}\""));
    }
    std::fs::write(dir.join("config.json"), config_json).map_err(|e| io("config.json", e))?;
    let st_dtype = match dtype {
        DType::F32 => StDtype::F32,
        DType::F16 => StDtype::F16,
        DType::BF16 => StDtype::BF16,
    };
    let tensors = named_tensors(config, weights);
    let encoded: Vec<(String, Vec<usize>, Vec<u8>)> =
        tensors.into_iter().map(|(name, shape, data)| (name, shape, encode(data, dtype))).collect();
    let views = encoded
        .iter()
        .map(|(name, shape, data)| {
            TensorView::new(st_dtype, shape.clone(), data)
                .map(|view| (name.clone(), view))
                .map_err(|e| err!(Internal, "tensor {name}: {e}"))
        })
        .collect::<Result<Vec<_>>>()?;
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(views, Some(metadata), &dir.join("model.safetensors"))
        .map_err(|e| err!(Io, "cannot write model.safetensors in {}: {e}", dir.display()))?;
    if let Some(json) = tokenizer_json {
        std::fs::write(dir.join("tokenizer.json"), json).map_err(|e| io("tokenizer.json", e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;
    use crate::model::{Preset, synthesize};

    fn tiny() -> (ModelConfig, Weights) {
        let config = Preset::Tiny.config();
        let weights = synthesize(&config, 3);
        (config, weights)
    }

    fn serialize(tensors: Vec<(String, Vec<usize>, Vec<u8>)>, dtype: StDtype) -> Vec<u8> {
        let views: Vec<_> =
            tensors.iter().map(|(n, s, d)| (n.clone(), TensorView::new(dtype, s.clone(), d).unwrap())).collect();
        safetensors::serialize(views, None).unwrap()
    }

    fn as_f32_tensors(config: &ModelConfig, w: &Weights) -> Vec<(String, Vec<usize>, Vec<u8>)> {
        named_tensors(config, w).into_iter().map(|(n, s, d)| (n, s, encode(d, DType::F32))).collect()
    }

    #[test]
    fn round_trips_in_every_dtype_and_prefix() {
        let (config, weights) = tiny();
        let dir = std::env::temp_dir().join(format!("gpt2rt-st-{}", std::process::id()));
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            write_dir(&dir, &config, &weights, dtype, None).unwrap();
            let model = load_dir(&dir).unwrap();
            assert_eq!(model.config, config);
            assert_eq!(model.source_dtype, dtype);
            let tol = match dtype {
                DType::F32 => 0.0,
                DType::F16 => 1e-3,
                DType::BF16 => 1e-2,
            };
            let max_err = model.weights.wte.iter().zip(&weights.wte).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
            assert!(max_err <= tol, "{dtype}: {max_err}");
        }
        std::fs::remove_dir_all(&dir).unwrap();

        // Without the `transformer.` prefix, with an explicit untied lm_head and ignored buffers.
        let mut tensors = as_f32_tensors(&config, &weights);
        for t in &mut tensors {
            t.0 = t.0.trim_start_matches("transformer.").to_string();
        }
        let head: Vec<f32> = weights.wte.iter().map(|x| x * 2.0).collect();
        tensors.push(("lm_head.weight".into(), vec![config.vocab_size, config.n_embd], encode(&head, DType::F32)));
        tensors.push(("h.0.attn.bias".into(), vec![1, 1, 4, 4], vec![0; 64]));
        let (loaded, _) = load_safetensors(&config, &serialize(tensors, StDtype::F32)).unwrap();
        assert_eq!(loaded.lm_head(), &head[..]);
        assert_eq!(loaded.wte, weights.wte);
    }

    #[test]
    fn failures_name_what_is_wrong() {
        let (config, weights) = tiny();
        let mut tensors = as_f32_tensors(&config, &weights);
        tensors.retain(|t| t.0 != "transformer.h.1.mlp.c_fc.bias");
        let e = load_safetensors(&config, &serialize(tensors, StDtype::F32)).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::MissingTensor);
        assert!(e.message().contains("transformer.h.1.mlp.c_fc.bias"), "{e}");

        let mut tensors = as_f32_tensors(&config, &weights);
        let ln = tensors.iter_mut().find(|t| t.0 == "transformer.ln_f.bias").unwrap();
        ln.1 = vec![32, 2];
        let e = load_safetensors(&config, &serialize(tensors, StDtype::F32)).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ShapeMismatch);
        assert!(e.message().contains("[32, 2]") && e.message().contains("[64]"), "{e}");

        let tensors: Vec<_> = as_f32_tensors(&config, &weights)
            .into_iter()
            .map(|(n, s, _)| (n, s.clone(), vec![0u8; s.iter().product::<usize>() * 8]))
            .collect();
        let e = load_safetensors(&config, &serialize(tensors, StDtype::F64)).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::UnsupportedDtype);

        // A header claiming far more data than the file holds fails before any allocation for it.
        let header = br#"{"wte.weight":{"dtype":"F32","shape":[1000000000,1000],"data_offsets":[0,4000000000000]}}"#;
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header);
        bytes.extend_from_slice(&[0; 16]);
        let e = load_safetensors(&config, &bytes).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ModelFormat);

        let full = serialize(as_f32_tensors(&config, &weights), StDtype::F32);
        let e = load_safetensors(&config, &full[..full.len() - 10]).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ModelFormat, "{e}");
        assert_eq!(load_safetensors(&config, &[1, 2, 3]).unwrap_err().kind(), ErrorKind::ModelFormat);
    }

    #[test]
    fn a_config_claiming_a_huge_model_fails_against_a_small_file_before_allocating() {
        // GPT-2 XL's shape (1.5 billion parameters) against a 4 KiB file.
        let config = ModelConfig { n_layer: 48, n_embd: 1600, n_head: 25, n_positions: 1024, ..Preset::Tiny.config() };
        let e = load_safetensors(&config, &[0; 4096]).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ModelFormat);
        assert!(e.message().contains("4096 bytes") && e.message().contains("do not match"), "{e}");
        // n_layer = 2^24 would have reserved 2^24 layer slots (4.8 GB) before looking at the file.
        let config = ModelConfig { n_layer: 1 << 24, n_embd: 8, n_head: 2, n_positions: 8, vocab_size: 16, ..config };
        assert_eq!(load_safetensors(&config, &[0; 64]).unwrap_err().kind(), ErrorKind::ModelFormat);
    }

    #[test]
    fn missing_files_are_reported() {
        let e = load_dir(Path::new("/nonexistent/gpt2rt")).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::FileNotFound);
        let dir = std::env::temp_dir().join(format!("gpt2rt-empty-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let e = load_dir(&dir).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::FileNotFound);
        assert!(e.message().contains("config.json"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
