//! `gpt2rt trt-command`: the trtexec command that builds an engine gpt2rt can run from an ONNX
//! file that `tools/export_onnx.py` wrote, with profiles that cover prompt + generated tokens.
//!
//! - The model without past state gets one profile: batch 1..=B, sequence 1..=S.
//! - The KV-cache model gets two, because one cannot serve both phases: at the max shapes
//!   `attention_mask` = past + new tokens must hold, and a prefill of S tokens (past 0) and a step
//!   at past S-1 (one token) need different maxima. Profile 0 (context): past 0, sequence 1..=S,
//!   mask = sequence. Profile 1 (generation): one token, past 1..=S-1, mask 2..=S. Every min, opt
//!   and max satisfies mask = past + sequence (a mismatch breaks the build).
//! - FP16: an ONNX whose tensors are float16 (`export_onnx.py --dtype f16`, LayerNorm kept in fp32
//!   by casts in the graph) is built `--stronglyTyped`; a float32 ONNX with `--fp16` gets
//!   `--precisionConstraints=obey` and every LayerNormalization layer pinned to fp32 by name
//!   (GPT-2's LayerNorm overflows in fp16). FP32 builds get `--noTF32` so they match the CPU.

use super::meta::{ElemType, EngineMeta, IoMode, ModelKind, ProfileMeta, ShapeRange, TensorMeta};
use super::onnx::{Dim, OnnxModel};
use crate::error::Result;
use std::fmt::Write;

/// What `gpt2rt trt-command` is asked for.
#[derive(Debug, Clone, PartialEq)]
pub struct RecipeOptions {
    pub onnx: String,
    /// Where trtexec saves the engine; default: the ONNX path with `.engine`.
    pub engine: Option<String>,
    pub max_batch: usize,
    /// Longest sequence (prompt + generated tokens).
    pub max_seq: usize,
    /// Batch TensorRT tunes for (default 1: interactive decoding).
    pub opt_batch: usize,
    /// Sequence (context) and past (generation) length TensorRT tunes for; default max_seq / 2.
    pub opt_seq: Option<usize>,
    pub fp16: bool,
}

/// The shapes of one profile, per input, in the ONNX input order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProfileShapes {
    pub label: &'static str,
    pub shapes: Vec<(String, ShapeRange)>,
}

/// A planned build.
#[derive(Debug, Clone, PartialEq)]
pub struct Recipe {
    pub kind: ModelKind,
    pub profiles: Vec<ProfileShapes>,
    pub precision: Vec<String>,
    pub engine: String,
    /// The trtexec command line(s), with comments.
    pub text: String,
}

enum Role {
    Sequence,
    Mask,
    Past { heads: i64, head_dim: i64 },
}

fn role(model: &OnnxModel, name: &str) -> Result<Role> {
    match name {
        "input_ids" | "position_ids" => Ok(Role::Sequence),
        "attention_mask" => Ok(Role::Mask),
        _ if name.starts_with("past_key_values.") => {
            let input = model.input(name).ok_or_else(|| err!(Internal, "{name} vanished"))?;
            match input.dims.as_slice() {
                [_, Dim::Fixed(h), _, Dim::Fixed(d)] => Ok(Role::Past { heads: *h, head_dim: *d }),
                _ => bail!(
                    ModelFormat,
                    "{name} must be [batch, heads, past, head_dim] with fixed heads and head_dim, the ONNX declares {:?}",
                    input.dims
                ),
            }
        }
        other => bail!(
            ModelFormat,
            "unexpected ONNX input '{other}': gpt2rt expects input_ids, attention_mask, position_ids and past_key_values.N.key|value (tools/export_onnx.py)"
        ),
    }
}

/// `[min, opt, max]` of (batch, sequence, past) for one profile.
struct Ranges {
    batch: [i64; 3],
    seq: [i64; 3],
    past: [i64; 3],
}

fn shapes_for(model: &OnnxModel, label: &'static str, r: &Ranges) -> Result<ProfileShapes> {
    let mut shapes = Vec::new();
    for input in &model.inputs {
        let pick = |k: usize| -> Result<Vec<i64>> {
            Ok(match role(model, &input.name)? {
                Role::Sequence => vec![r.batch[k], r.seq[k]],
                Role::Mask => vec![r.batch[k], r.past[k] + r.seq[k]],
                Role::Past { heads, head_dim } => vec![r.batch[k], heads, r.past[k], head_dim],
            })
        };
        shapes.push((input.name.clone(), ShapeRange { min: pick(0)?, opt: pick(1)?, max: pick(2)? }));
    }
    Ok(ProfileShapes { label, shapes })
}

/// The profiles for a model of `kind`: see the module documentation.
fn profiles(model: &OnnxModel, kind: ModelKind, o: &RecipeOptions) -> Result<Vec<ProfileShapes>> {
    let (b, s) = (o.max_batch as i64, o.max_seq as i64);
    let ob = (o.opt_batch as i64).clamp(1, b);
    let os = o.opt_seq.map_or((s + 1) / 2, |v| v as i64).clamp(1, s);
    let batch = [1, ob, b];
    let context = Ranges { batch, seq: [1, os, s], past: [0; 3] };
    match kind {
        ModelKind::NoPast => Ok(vec![shapes_for(model, "prefill and every recomputed step", &context)?]),
        ModelKind::KvCache => {
            let mut out = vec![shapes_for(model, "context: prefill, past length 0", &context)?];
            if s >= 2 {
                let op = os.clamp(1, s - 1);
                let generation = Ranges { batch, seq: [1; 3], past: [1, op, s - 1] };
                out.push(shapes_for(model, "generation: one token on a past of 1..max_seq-1", &generation)?);
            }
            Ok(out)
        }
    }
}

fn dims_x(dims: &[i64]) -> String {
    dims.iter().map(i64::to_string).collect::<Vec<_>>().join("x")
}

fn spec(profile: &ProfileShapes, pick: impl Fn(&ShapeRange) -> &Vec<i64>) -> String {
    profile.shapes.iter().map(|(name, r)| format!("{name}:{}", dims_x(pick(r)))).collect::<Vec<_>>().join(",")
}

/// The TensorRT layer name of an ONNX node: its name, or `node_of_<first output>` for an unnamed
/// node (what the ONNX parser does).
fn layer_name(node: &super::onnx::Node) -> String {
    if node.name.is_empty() {
        format!("node_of_{}", node.outputs.first().map_or("", String::as_str))
    } else {
        node.name.clone()
    }
}

/// Plans the build of `model` (see the module documentation).
pub fn plan(model: &OnnxModel, o: &RecipeOptions) -> Result<Recipe> {
    if o.max_batch == 0 || o.max_seq == 0 {
        bail!(InvalidArgument, "--max-batch and --max-seq must be at least 1");
    }
    if model.input("input_ids").is_none() {
        bail!(ModelFormat, "{} has no input_ids input: not a model tools/export_onnx.py wrote", o.onnx);
    }
    if !model.outputs.iter().any(|t| t.name == "logits") {
        bail!(ModelFormat, "{} has no logits output", o.onnx);
    }
    for input in &model.inputs {
        role(model, &input.name)?;
    }
    let has_past = model.inputs.iter().any(|i| i.name.starts_with("past_key_values."));
    let kind = if has_past { ModelKind::KvCache } else { ModelKind::NoPast };
    if kind == ModelKind::KvCache && (model.input("attention_mask").is_none() || model.input("position_ids").is_none())
    {
        bail!(ModelFormat, "{} has past_key_values but lacks attention_mask or position_ids", o.onnx);
    }
    let profiles = profiles(model, kind, o)?;
    let half_model = model.outputs.iter().chain(&model.inputs).any(|t| t.elem_type == ElemType::F16);
    let mut precision = Vec::new();
    if half_model {
        precision.push("--stronglyTyped".to_string());
    } else if o.fp16 {
        let names: Vec<String> =
            model.nodes.iter().filter(|n| n.op_type == "LayerNormalization").map(layer_name).collect();
        if names.is_empty() {
            bail!(
                ModelFormat,
                "{} has no LayerNormalization node (opset {}), so LayerNorm cannot be kept in fp32 by name: export with opset 17 or newer (tools/export_onnx.py does), or export with --dtype f16 and build --stronglyTyped",
                o.onnx,
                model.opset.map_or("?".into(), |v| v.to_string())
            );
        }
        if let Some(bad) = names.iter().find(|n| n.contains([',', ':', '*', ' ', '\''])) {
            bail!(ModelFormat, "layer name {bad:?} cannot be written in a trtexec spec");
        }
        let fp32 = |n: &String| format!("{n}:fp32");
        precision.push("--fp16".into());
        precision.push("--precisionConstraints=obey".into());
        precision.push(format!("--layerPrecisions={}", names.iter().map(fp32).collect::<Vec<_>>().join(",")));
        precision.push(format!("--layerOutputTypes={}", names.iter().map(fp32).collect::<Vec<_>>().join(",")));
    } else {
        precision.push("--noTF32".into());
    }
    let engine = o.engine.clone().unwrap_or_else(|| match o.onnx.strip_suffix(".onnx") {
        Some(stem) => format!("{stem}.engine"),
        None => format!("{}.engine", o.onnx),
    });
    let mut text = String::new();
    let what = match kind {
        ModelKind::NoPast => "model without past state (every step recomputes the sequence)",
        ModelKind::KvCache => "KV-cache model",
    };
    let _ = writeln!(
        text,
        "# {}: {what}, batch 1..={}, up to {} tokens (prompt + generated)",
        o.onnx, o.max_batch, o.max_seq
    );
    for (p, profile) in profiles.iter().enumerate() {
        let _ = writeln!(text, "# profile {p}: {}", profile.label);
    }
    if half_model {
        let _ = writeln!(text, "# float16 ONNX: precision comes from the graph (LayerNorm is fp32 there)");
    } else if o.fp16 {
        let _ = writeln!(
            text,
            "# fp16 with every LayerNormalization layer kept in fp32 (GPT-2 LayerNorm overflows in fp16)"
        );
    }
    let _ = write!(text, "trtexec --onnx={} --saveEngine={engine} --skipInference", o.onnx);
    let multi = profiles.len() > 1;
    for (p, profile) in profiles.iter().enumerate() {
        if multi {
            let _ = write!(text, " \\\n  --profile={p}");
        }
        let _ = write!(text, " \\\n  --minShapes={}", spec(profile, |r| &r.min));
        let _ = write!(text, " \\\n  --optShapes={}", spec(profile, |r| &r.opt));
        let _ = write!(text, " \\\n  --maxShapes={}", spec(profile, |r| &r.max));
    }
    for flag in &precision {
        let _ = write!(text, " \\\n  {flag}");
    }
    text.push('\n');
    Ok(Recipe { kind, profiles, precision, engine, text })
}

/// The engine metadata TensorRT would report for an engine built from `model` with `recipe`:
/// lets the tests check that gpt2rt's profile selection accepts what trt-command builds.
pub fn expected_engine(model: &OnnxModel, recipe: &Recipe) -> EngineMeta {
    let dims = |d: &[Dim]| d.iter().map(|d| if let Dim::Fixed(v) = d { *v } else { -1 }).collect::<Vec<_>>();
    let tensor = |info: &super::onnx::ValueInfo, mode| TensorMeta {
        name: info.name.clone(),
        mode,
        dtype: info.elem_type,
        dims: dims(&info.dims),
        linear: true,
        on_device: true,
        shape_tensor: false,
    };
    let mut tensors: Vec<TensorMeta> = model.inputs.iter().map(|i| tensor(i, IoMode::Input)).collect();
    tensors.extend(model.outputs.iter().map(|o| tensor(o, IoMode::Output)));
    let profiles = recipe
        .profiles
        .iter()
        .map(|p| ProfileMeta { ranges: p.shapes.iter().map(|(_, r)| r.clone()).collect() })
        .collect();
    EngineMeta { tensors, profiles }
}

#[cfg(test)]
mod tests {
    use super::super::meta::{Layout, Plan};
    use super::super::onnx::tests::{model, node, value_info};
    use super::*;

    const INT64: u64 = 7;
    const FLOAT: u64 = 1;
    const FLOAT16: u64 = 10;

    fn kv_onnx(layers: usize, kv_type: u64) -> OnnxModel {
        let mut inputs = vec![
            value_info("input_ids", INT64, &[-1, -1]),
            value_info("attention_mask", INT64, &[-1, -1]),
            value_info("position_ids", INT64, &[-1, -1]),
        ];
        let mut outputs = vec![value_info("logits", kv_type, &[-1, -1, 50257])];
        let mut nodes = Vec::new();
        for l in 0..layers {
            for part in ["key", "value"] {
                inputs.push(value_info(&format!("past_key_values.{l}.{part}"), kv_type, &[-1, 12, -1, 64]));
                outputs.push(value_info(&format!("present.{l}.{part}"), kv_type, &[-1, 12, -1, 64]));
            }
            nodes.push(node(&format!("/h.{l}/ln_1/LayerNormalization"), "LayerNormalization", &format!("a{l}")));
            nodes.push(node("", "LayerNormalization", &format!("ln_{l}_2")));
            nodes.push(node(&format!("/h.{l}/attn/MatMul"), "MatMul", &format!("m{l}")));
        }
        OnnxModel::parse(&model(17, &inputs, &outputs, &nodes)).unwrap()
    }

    fn no_past_onnx(nodes: &[Vec<u8>]) -> OnnxModel {
        OnnxModel::parse(&model(
            17,
            &[value_info("input_ids", INT64, &[-1, -1]), value_info("attention_mask", INT64, &[-1, -1])],
            &[value_info("logits", FLOAT, &[-1, -1, 50257])],
            nodes,
        ))
        .unwrap()
    }

    fn opts(b: usize, s: usize, fp16: bool) -> RecipeOptions {
        RecipeOptions {
            onnx: "m/model_kv.onnx".into(),
            engine: None,
            max_batch: b,
            max_seq: s,
            opt_batch: 1,
            opt_seq: None,
            fp16,
        }
    }

    fn shape<'a>(p: &'a ProfileShapes, name: &str) -> &'a ShapeRange {
        &p.shapes.iter().find(|(n, _)| n == name).unwrap().1
    }

    #[test]
    fn kv_profiles_keep_mask_equal_to_past_plus_sequence_at_min_opt_and_max() {
        let m = kv_onnx(2, FLOAT);
        let r = plan(&m, &opts(16, 44, false)).unwrap();
        assert_eq!(r.kind, ModelKind::KvCache);
        assert_eq!(r.profiles.len(), 2);
        for p in &r.profiles {
            for pick in [|r: &ShapeRange| r.min.clone(), |r: &ShapeRange| r.opt.clone(), |r: &ShapeRange| r.max.clone()]
            {
                let ids = pick(shape(p, "input_ids"));
                let mask = pick(shape(p, "attention_mask"));
                let past = pick(shape(p, "past_key_values.1.value"));
                assert_eq!(mask[1], past[2] + ids[1], "{}: mask = past + sequence", p.label);
                assert_eq!(pick(shape(p, "position_ids")), ids);
                assert!(mask[0] == ids[0] && past[0] == ids[0]);
                assert_eq!((past[1], past[3]), (12, 64));
            }
        }
        let (ctx, generation) = (&r.profiles[0], &r.profiles[1]);
        assert_eq!(shape(ctx, "input_ids").max, vec![16, 44]);
        assert_eq!(shape(ctx, "past_key_values.0.key").max, vec![16, 12, 0, 64]);
        assert_eq!(shape(generation, "input_ids").max, vec![16, 1]);
        assert_eq!(shape(generation, "attention_mask").min, vec![1, 2]);
        assert_eq!(shape(generation, "attention_mask").max, vec![16, 44]);
        assert_eq!(shape(generation, "past_key_values.0.key").max, vec![16, 12, 43, 64]);
        assert_eq!(shape(generation, "past_key_values.0.key").opt, vec![1, 12, 22, 64]);
    }

    #[test]
    fn the_kv_command_lists_both_profiles() {
        let r = plan(&kv_onnx(1, FLOAT), &opts(4, 32, false)).unwrap();
        assert_eq!(r.engine, "m/model_kv.engine");
        let t = &r.text;
        assert!(t.contains("trtexec --onnx=m/model_kv.onnx --saveEngine=m/model_kv.engine --skipInference"), "{t}");
        assert!(t.contains("--profile=0 \\\n  --minShapes=input_ids:1x1,attention_mask:1x1,position_ids:1x1,past_key_values.0.key:1x12x0x64,past_key_values.0.value:1x12x0x64"), "{t}");
        assert!(
            t.contains(
                "--maxShapes=input_ids:4x32,attention_mask:4x32,position_ids:4x32,past_key_values.0.key:4x12x0x64"
            ),
            "{t}"
        );
        assert!(t.contains("--profile=1 \\\n  --minShapes=input_ids:1x1,attention_mask:1x2,position_ids:1x1,past_key_values.0.key:1x12x1x64"), "{t}");
        assert!(
            t.contains(
                "--maxShapes=input_ids:4x1,attention_mask:4x32,position_ids:4x1,past_key_values.0.key:4x12x31x64"
            ),
            "{t}"
        );
        assert!(t.contains("--noTF32"), "fp32 builds stay exact: {t}");
    }

    #[test]
    fn the_no_past_command_has_one_profile_covering_prompt_plus_generated_tokens() {
        let m = no_past_onnx(&[]);
        let mut o = opts(16, 44, false);
        o.onnx = "study.onnx".into();
        o.opt_batch = 8;
        o.opt_seq = Some(12);
        let r = plan(&m, &o).unwrap();
        assert_eq!(r.kind, ModelKind::NoPast);
        assert_eq!(r.profiles.len(), 1);
        assert!(!r.text.contains("--profile="), "{}", r.text);
        assert!(r.text.contains("--minShapes=input_ids:1x1,attention_mask:1x1"), "{}", r.text);
        assert!(r.text.contains("--optShapes=input_ids:8x12,attention_mask:8x12"), "{}", r.text);
        assert!(r.text.contains("--maxShapes=input_ids:16x44,attention_mask:16x44"), "{}", r.text);
        assert_eq!(r.engine, "study.engine");
    }

    #[test]
    fn opt_shapes_are_clamped_into_range() {
        let mut o = opts(4, 8, false);
        o.opt_batch = 99;
        o.opt_seq = Some(500);
        let r = plan(&kv_onnx(1, FLOAT), &o).unwrap();
        assert_eq!(shape(&r.profiles[0], "input_ids").opt, vec![4, 8]);
        assert_eq!(shape(&r.profiles[1], "past_key_values.0.key").opt, vec![4, 12, 7, 64]);
        assert_eq!(shape(&r.profiles[1], "attention_mask").opt, vec![4, 8]);
        // One position: nothing to generate, so no generation profile.
        assert_eq!(plan(&kv_onnx(1, FLOAT), &opts(4, 1, false)).unwrap().profiles.len(), 1);
    }

    #[test]
    fn fp16_keeps_every_layer_norm_in_fp32_by_name() {
        let r = plan(&kv_onnx(2, FLOAT), &opts(1, 64, true)).unwrap();
        let want = "/h.0/ln_1/LayerNormalization:fp32,node_of_ln_0_2:fp32,/h.1/ln_1/LayerNormalization:fp32,node_of_ln_1_2:fp32";
        assert!(r.precision.contains(&"--fp16".to_string()));
        assert!(r.precision.contains(&"--precisionConstraints=obey".to_string()));
        assert!(r.precision.contains(&format!("--layerPrecisions={want}")), "{:?}", r.precision);
        assert!(r.precision.contains(&format!("--layerOutputTypes={want}")), "{:?}", r.precision);
        assert!(!r.text.contains("MatMul"));
    }

    #[test]
    fn fp16_without_layer_norm_nodes_is_refused() {
        let e = plan(&no_past_onnx(&[node("mm", "MatMul", "y")]), &opts(1, 8, true)).unwrap_err();
        assert!(e.message().contains("no LayerNormalization node (opset 17)"), "{e}");
        let e = plan(&no_past_onnx(&[node("a,b", "LayerNormalization", "y")]), &opts(1, 8, true)).unwrap_err();
        assert!(e.message().contains("cannot be written"), "{e}");
    }

    #[test]
    fn a_float16_onnx_is_built_strongly_typed() {
        let r = plan(&kv_onnx(1, FLOAT16), &opts(1, 64, true)).unwrap();
        assert_eq!(r.precision, vec!["--stronglyTyped".to_string()]);
        assert!(!r.text.contains("--fp16"));
    }

    #[test]
    fn unknown_or_malformed_inputs_are_refused() {
        let bad = OnnxModel::parse(&model(
            17,
            &[value_info("input_ids", INT64, &[-1, -1]), value_info("token_type_ids", INT64, &[-1, -1])],
            &[value_info("logits", FLOAT, &[-1, -1, 50257])],
            &[],
        ))
        .unwrap();
        assert!(
            plan(&bad, &opts(1, 8, false)).unwrap_err().message().contains("unexpected ONNX input 'token_type_ids'")
        );
        let dynamic_heads = OnnxModel::parse(&model(
            17,
            &[
                value_info("input_ids", INT64, &[-1, -1]),
                value_info("attention_mask", INT64, &[-1, -1]),
                value_info("position_ids", INT64, &[-1, -1]),
                value_info("past_key_values.0.key", FLOAT, &[-1, -1, -1, 64]),
            ],
            &[value_info("logits", FLOAT, &[-1, -1, 50257])],
            &[],
        ))
        .unwrap();
        assert!(plan(&dynamic_heads, &opts(1, 8, false)).unwrap_err().message().contains("fixed heads"));
        let no_logits = OnnxModel::parse(&model(17, &[value_info("input_ids", INT64, &[-1, -1])], &[], &[])).unwrap();
        assert!(plan(&no_logits, &opts(1, 8, false)).unwrap_err().message().contains("no logits"));
        assert!(plan(&no_past_onnx(&[]), &opts(0, 8, false)).is_err());
    }

    #[test]
    fn the_backend_accepts_every_engine_trt_command_builds() {
        for (b, s) in [(1, 1), (1, 2), (4, 32), (16, 44), (8, 1024)] {
            for m in [kv_onnx(2, FLOAT), no_past_onnx(&[])] {
                let r = plan(&m, &opts(b, s, false)).unwrap();
                let meta = expected_engine(&m, &r);
                let layout = Layout::from_meta(&meta).unwrap();
                assert_eq!(layout.limits(&meta), Some((b, s)));
                let want_decode = (r.kind == ModelKind::KvCache && s >= 2).then_some(1);
                assert_eq!(layout.plan(&meta, b, s, true).unwrap(), Plan { full: 0, decode: want_decode }, "{b}x{s}");
                assert!(layout.plan(&meta, b, s + 1, true).is_err());
            }
        }
    }
}
