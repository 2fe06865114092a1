//! What a TensorRT engine declares (its I/O tensors and optimization profiles) and every decision
//! gpt2rt takes from it: which model it is, which profile serves which phase of a session, and
//! whether the shapes of a call fit before anything is enqueued. Pure Rust over plain data, so all
//! of it is tested without TensorRT; the shim only fills [`EngineMeta`].
//!
//! The study's crash (`Supplied binding dimension ... but profile is ...`, then CUDA error 700)
//! came from enqueuing shapes outside the profile. Here a session is only created when one profile
//! covers every shape it can produce, and each call's shapes are checked again before enqueue.

use crate::error::Result;
use std::fmt;

/// Element type of an engine or ONNX tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ElemType {
    F32,
    F16,
    BF16,
    I32,
    I64,
    I8,
    U8,
    Bool,
    /// A type gpt2rt never binds (fp8, int4, double, ...), with its name.
    Other(&'static str),
}

impl ElemType {
    /// From `nvinfer1::DataType` (TensorRT 10 numbering).
    pub fn from_trt(code: i32) -> Self {
        match code {
            0 => Self::F32,
            1 => Self::F16,
            2 => Self::I8,
            3 => Self::I32,
            4 => Self::Bool,
            5 => Self::U8,
            6 => Self::Other("fp8"),
            7 => Self::BF16,
            8 => Self::I64,
            9 => Self::Other("int4"),
            10 => Self::Other("fp4"),
            11 => Self::Other("e8m0"),
            _ => Self::Other("unknown"),
        }
    }

    /// From ONNX `TensorProto.DataType`.
    pub fn from_onnx(code: i64) -> Self {
        match code {
            1 => Self::F32,
            2 => Self::U8,
            3 => Self::I8,
            6 => Self::I32,
            7 => Self::I64,
            9 => Self::Bool,
            10 => Self::F16,
            11 => Self::Other("double"),
            16 => Self::BF16,
            _ => Self::Other("unknown"),
        }
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Self::F32 | Self::I32 => 4,
            Self::F16 | Self::BF16 => 2,
            Self::I64 => 8,
            Self::I8 | Self::U8 | Self::Bool | Self::Other(_) => 1,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "float32",
            Self::F16 => "float16",
            Self::BF16 => "bfloat16",
            Self::I32 => "int32",
            Self::I64 => "int64",
            Self::I8 => "int8",
            Self::U8 => "uint8",
            Self::Bool => "bool",
            Self::Other(name) => name,
        }
    }

    fn is_float(self) -> bool {
        matches!(self, Self::F32 | Self::F16 | Self::BF16)
    }

    fn is_index(self) -> bool {
        matches!(self, Self::I32 | Self::I64)
    }
}

impl fmt::Display for ElemType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Whether an engine tensor is read or written by the engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoMode {
    Input,
    Output,
}

/// One I/O tensor as the engine declares it. `dims` holds -1 for a dynamic dimension.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorMeta {
    pub name: String,
    pub mode: IoMode,
    pub dtype: ElemType,
    pub dims: Vec<i64>,
    /// Row-major linear format (`TensorFormat::kLINEAR`); other formats need reformatting.
    pub linear: bool,
    /// Lives in device memory (`TensorLocation::kDEVICE`).
    pub on_device: bool,
    /// A shape tensor (its values, not only its shape, feed shape computations).
    pub shape_tensor: bool,
}

/// The shapes one optimization profile accepts for one input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShapeRange {
    pub min: Vec<i64>,
    pub opt: Vec<i64>,
    pub max: Vec<i64>,
}

/// One optimization profile: a range per input tensor, in the order of [`EngineMeta::tensors`]'
/// inputs (`ranges[i]` belongs to the `i`-th input).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProfileMeta {
    pub ranges: Vec<ShapeRange>,
}

/// Everything gpt2rt reads from a deserialized engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineMeta {
    pub tensors: Vec<TensorMeta>,
    pub profiles: Vec<ProfileMeta>,
}

impl EngineMeta {
    /// Indices into `tensors` of the inputs, in order (the order of each profile's `ranges`).
    pub fn input_indices(&self) -> Vec<usize> {
        (0..self.tensors.len()).filter(|&i| self.tensors[i].mode == IoMode::Input).collect()
    }

    /// The range profile `p` gives tensor `tensor` (an input).
    fn range(&self, p: usize, tensor: usize) -> &ShapeRange {
        let slot = self.tensors[..tensor].iter().filter(|t| t.mode == IoMode::Input).count();
        &self.profiles[p].ranges[slot]
    }
}

fn dims_text(dims: &[i64]) -> String {
    let parts: Vec<String> = dims.iter().map(|d| if *d < 0 { "?".into() } else { d.to_string() }).collect();
    format!("[{}]", parts.join(", "))
}

impl fmt::Display for EngineMeta {
    /// The listing `gpt2rt inspect --engine` prints.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "tensors:")?;
        for t in &self.tensors {
            let mode = if t.mode == IoMode::Input { "input " } else { "output" };
            write!(f, "  {mode} {:<28} {:<8} {}", t.name, t.dtype.name(), dims_text(&t.dims))?;
            if !t.linear {
                write!(f, " (not linear)")?;
            }
            if !t.on_device {
                write!(f, " (host)")?;
            }
            writeln!(f)?;
        }
        write!(f, "optimization profiles: {}", self.profiles.len())?;
        let inputs = self.input_indices();
        for (p, profile) in self.profiles.iter().enumerate() {
            write!(f, "\n  profile {p}:")?;
            for (slot, range) in profile.ranges.iter().enumerate() {
                let name = inputs.get(slot).map_or("?", |&i| self.tensors[i].name.as_str());
                write!(
                    f,
                    "\n    {name:<28} min {} opt {} max {}",
                    dims_text(&range.min),
                    dims_text(&range.opt),
                    dims_text(&range.max)
                )?;
            }
        }
        Ok(())
    }
}

/// Which of the two ONNX forms `tools/export_onnx.py` writes an engine was built from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelKind {
    /// `input_ids`, `attention_mask` → `logits`: every step recomputes the whole sequence (the
    /// original study's model).
    NoPast,
    /// Also `position_ids` and `past_key_values.{i}.key|value` → `present.{i}.key|value`.
    KvCache,
}

/// The roles of an engine's tensors, checked once when the engine is loaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    pub kind: ModelKind,
    pub vocab_size: usize,
    /// Layers, heads and head size (from the past tensors; 0 when the engine has none).
    pub n_layer: usize,
    pub n_head: usize,
    pub head_dim: usize,
    pub input_ids: usize,
    pub attention_mask: Option<usize>,
    pub position_ids: Option<usize>,
    /// `[key, value]` tensor indices per layer.
    pub past: Vec<[usize; 2]>,
    pub present: Vec<[usize; 2]>,
    pub logits: usize,
    /// Element type of the past/present tensors (they must agree: present becomes the next past).
    pub kv_dtype: ElemType,
}

/// The names tools in the field (Hugging Face optimum, transformers' ONNX config) give the past
/// and present tensors: `past_key_values.3.key`, `present.3.value`.
fn kv_name(name: &str, prefix: &str) -> Option<(usize, usize)> {
    let rest = name.strip_prefix(prefix)?;
    let (layer, which) = rest.split_once('.')?;
    let layer = layer.parse().ok()?;
    match which {
        "key" => Some((layer, 0)),
        "value" => Some((layer, 1)),
        _ => None,
    }
}

/// The past (or present) tensors of every layer, checked to agree with each other.
struct KvSet {
    /// `[key, value]` tensor indices per layer.
    table: Vec<[usize; 2]>,
    heads: usize,
    head_dim: usize,
    dtype: Option<ElemType>,
}

fn collect_kv(meta: &EngineMeta, found: Vec<(usize, usize, usize)>, what: &str) -> Result<KvSet> {
    let layers = found.iter().map(|f| f.0 + 1).max().unwrap_or(0);
    let mut table = vec![[usize::MAX; 2]; layers];
    for (layer, which, index) in found {
        table[layer][which] = index;
    }
    let (mut heads, mut head_dim, mut dtype) = (0, 0, None);
    for (layer, pair) in table.iter().enumerate() {
        for (which, &index) in pair.iter().enumerate() {
            let part = if which == 0 { "key" } else { "value" };
            if index == usize::MAX {
                bail!(ModelFormat, "the engine has {what} tensors for {layers} layers but no {what}.{layer}.{part}");
            }
            let t = &meta.tensors[index];
            if t.dims.len() != 4 {
                bail!(
                    ModelFormat,
                    "{} has rank {} ({}); gpt2rt expects [batch, heads, sequence, head_dim]",
                    t.name,
                    t.dims.len(),
                    dims_text(&t.dims)
                );
            }
            if t.dims[1] <= 0 || t.dims[3] <= 0 {
                bail!(
                    ModelFormat,
                    "{} has dynamic heads or head_dim ({}); they must be fixed when the engine is built",
                    t.name,
                    dims_text(&t.dims)
                );
            }
            let (h, d) = (t.dims[1] as usize, t.dims[3] as usize);
            if heads == 0 {
                (heads, head_dim) = (h, d);
            } else if (h, d) != (heads, head_dim) {
                bail!(ModelFormat, "{} has {h} heads of {d}, other {what} tensors {heads} of {head_dim}", t.name);
            }
            if !t.dtype.is_float() {
                bail!(
                    ModelFormat,
                    "{} is {}; past/present tensors must be float32, float16 or bfloat16",
                    t.name,
                    t.dtype
                );
            }
            match dtype {
                None => dtype = Some(t.dtype),
                Some(d) if d != t.dtype => {
                    bail!(ModelFormat, "{} is {} but other {what} tensors are {d}", t.name, t.dtype)
                }
                Some(_) => {}
            }
        }
    }
    Ok(KvSet { table, heads, head_dim, dtype })
}

impl Layout {
    /// Classifies an engine's tensors, or says what about them gpt2rt cannot run.
    pub fn from_meta(meta: &EngineMeta) -> Result<Self> {
        for (i, t) in meta.tensors.iter().enumerate() {
            if meta.tensors[..i].iter().any(|o| o.name == t.name) {
                bail!(ModelFormat, "the engine declares tensor '{}' twice", t.name);
            }
            if !t.linear || !t.on_device || t.shape_tensor {
                bail!(
                    ModelFormat,
                    "tensor '{}' is {}: gpt2rt binds only linear device tensors (rebuild without --inputIOFormats/--outputIOFormats)",
                    t.name,
                    if t.shape_tensor {
                        "a shape tensor"
                    } else if !t.on_device {
                        "in host memory"
                    } else {
                        "in a vectorized format"
                    }
                );
            }
        }
        let inputs = meta.input_indices().len();
        if meta.profiles.is_empty() {
            bail!(ModelFormat, "the engine has no optimization profile");
        }
        for (p, profile) in meta.profiles.iter().enumerate() {
            if profile.ranges.len() != inputs {
                bail!(ModelFormat, "profile {p} describes {} inputs, the engine has {inputs}", profile.ranges.len());
            }
        }
        let (mut input_ids, mut attention_mask, mut position_ids, mut logits) = (None, None, None, None);
        let (mut past, mut present) = (Vec::new(), Vec::new());
        for (i, t) in meta.tensors.iter().enumerate() {
            match (t.mode, t.name.as_str()) {
                (IoMode::Input, "input_ids") => input_ids = Some(i),
                (IoMode::Input, "attention_mask") => attention_mask = Some(i),
                (IoMode::Input, "position_ids") => position_ids = Some(i),
                (IoMode::Output, "logits") => logits = Some(i),
                (IoMode::Input, name) if kv_name(name, "past_key_values.").is_some() => {
                    let (layer, which) = kv_name(name, "past_key_values.").unwrap_or_default();
                    past.push((layer, which, i));
                }
                (IoMode::Output, name) if kv_name(name, "present.").is_some() => {
                    let (layer, which) = kv_name(name, "present.").unwrap_or_default();
                    present.push((layer, which, i));
                }
                (IoMode::Input, name) => bail!(
                    ModelFormat,
                    "unexpected engine input '{name}': gpt2rt binds input_ids, attention_mask, position_ids and past_key_values.N.key|value (the names tools/export_onnx.py writes)"
                ),
                (IoMode::Output, name) => bail!(
                    ModelFormat,
                    "unexpected engine output '{name}': gpt2rt binds logits and present.N.key|value (the names tools/export_onnx.py writes)"
                ),
            }
        }
        let Some(input_ids) = input_ids else {
            bail!(ModelFormat, "the engine has no 'input_ids' input");
        };
        let Some(logits) = logits else {
            bail!(ModelFormat, "the engine has no 'logits' output");
        };
        let check_index_input = |i: usize, allow_float: bool| -> Result<()> {
            let t = &meta.tensors[i];
            if t.dims.len() != 2 {
                bail!(
                    ModelFormat,
                    "{} has rank {} ({}); gpt2rt expects [batch, sequence]",
                    t.name,
                    t.dims.len(),
                    dims_text(&t.dims)
                );
            }
            if !(t.dtype.is_index() || allow_float && t.dtype == ElemType::F32) {
                bail!(
                    ModelFormat,
                    "{} is {}; gpt2rt feeds int32 or int64{}",
                    t.name,
                    t.dtype,
                    if allow_float { " (or float32)" } else { "" }
                );
            }
            Ok(())
        };
        check_index_input(input_ids, false)?;
        if let Some(i) = attention_mask {
            check_index_input(i, true)?;
        }
        if let Some(i) = position_ids {
            check_index_input(i, false)?;
        }
        let lt = &meta.tensors[logits];
        if lt.dims.len() != 3 || lt.dims[2] <= 0 {
            bail!(
                ModelFormat,
                "logits has shape {}; gpt2rt expects [batch, sequence, vocab] with a fixed vocab",
                dims_text(&lt.dims)
            );
        }
        if !matches!(lt.dtype, ElemType::F32 | ElemType::F16) {
            bail!(ModelFormat, "logits is {}; gpt2rt reads float32 or float16 logits", lt.dtype);
        }
        let vocab_size = lt.dims[2] as usize;
        let KvSet { table: past, heads: n_head, head_dim, dtype: past_dtype } =
            collect_kv(meta, past, "past_key_values")?;
        let KvSet { table: present, heads: present_heads, head_dim: present_dim, dtype: present_dtype } =
            collect_kv(meta, present, "present")?;
        if past.len() != present.len() {
            bail!(
                ModelFormat,
                "the engine has past_key_values for {} layers but present outputs for {}: re-export with tools/export_onnx.py",
                past.len(),
                present.len()
            );
        }
        if !past.is_empty() && ((n_head, head_dim) != (present_heads, present_dim) || past_dtype != present_dtype) {
            bail!(
                ModelFormat,
                "present tensors ({present_heads} heads of {present_dim}, {}) differ from past tensors ({n_head} heads of {head_dim}, {}): they cannot be fed back",
                present_dtype.map_or("?", ElemType::name),
                past_dtype.map_or("?", ElemType::name)
            );
        }
        let kind = if past.is_empty() { ModelKind::NoPast } else { ModelKind::KvCache };
        if kind == ModelKind::KvCache && (attention_mask.is_none() || position_ids.is_none()) {
            bail!(
                ModelFormat,
                "an engine with past_key_values must also take attention_mask and position_ids (padded batches need both)"
            );
        }
        let layout = Self {
            kind,
            vocab_size,
            n_layer: past.len(),
            n_head,
            head_dim,
            input_ids,
            attention_mask,
            position_ids,
            past,
            present,
            logits,
            kv_dtype: past_dtype.unwrap_or(ElemType::F32),
        };
        if layout.limits(meta).is_none() {
            bail!(
                ModelFormat,
                "no optimization profile of the engine accepts a prefill (batch 1, sequence 1{}): {}",
                if kind == ModelKind::KvCache { ", past length 0" } else { "" },
                layout.reasons(meta, &layout.requirement(Phase::Full, 1, 1))
            );
        }
        Ok(layout)
    }

    /// The largest batch and the longest sequence any profile allows for a prefill, each on its
    /// own (a session must still find one profile covering both: see [`Layout::plan`]).
    pub fn limits(&self, meta: &EngineMeta) -> Option<(usize, usize)> {
        let mut best: Option<(usize, usize)> = None;
        for p in 0..meta.profiles.len() {
            if !self.covers(meta, p, &self.requirement(Phase::Full, 1, 1)) {
                continue;
            }
            let mut batch = i64::MAX;
            let mut seq = i64::MAX;
            for i in self.sequence_inputs() {
                let max = &meta.range(p, i).max;
                batch = batch.min(max[0]);
                seq = seq.min(max[1]);
            }
            let (b, s) = (batch.max(1) as usize, seq.max(1) as usize);
            best = Some(best.map_or((b, s), |(bb, bs)| (bb.max(b), bs.max(s))));
        }
        best
    }

    /// Inputs of shape `[batch, sequence-ish]`.
    fn sequence_inputs(&self) -> impl Iterator<Item = usize> + '_ {
        std::iter::once(self.input_ids).chain(self.attention_mask).chain(self.position_ids)
    }

    /// The range of every input dimension a phase of a session of `max_batch` x `max_seq` uses.
    fn requirement(&self, phase: Phase, max_batch: usize, max_seq: usize) -> Vec<(usize, Vec<(i64, i64)>)> {
        let b = (1, max_batch as i64);
        let s = max_seq as i64;
        let (seq, mask, past) = match phase {
            Phase::Full => ((1, s), (1, s), (0, 0)),
            Phase::Decode => ((1, 1), (2, s), (1, s - 1)),
        };
        let mut req = vec![(self.input_ids, vec![b, seq])];
        if let Some(i) = self.attention_mask {
            req.push((i, vec![b, mask]));
        }
        if let Some(i) = self.position_ids {
            req.push((i, vec![b, seq]));
        }
        let (h, d) = (self.n_head as i64, self.head_dim as i64);
        for pair in &self.past {
            for &i in pair {
                req.push((i, vec![b, (h, h), past, (d, d)]));
            }
        }
        req
    }

    fn covers(&self, meta: &EngineMeta, p: usize, req: &[(usize, Vec<(i64, i64)>)]) -> bool {
        self.first_gap(meta, p, req).is_none()
    }

    /// Why profile `p` does not cover `req`, or `None` when it does.
    fn first_gap(&self, meta: &EngineMeta, p: usize, req: &[(usize, Vec<(i64, i64)>)]) -> Option<String> {
        for (tensor, dims) in req {
            let range = meta.range(p, *tensor);
            let name = &meta.tensors[*tensor].name;
            if range.min.len() != dims.len() || range.max.len() != dims.len() {
                return Some(format!(
                    "{name} has rank {} in the profile, gpt2rt feeds rank {}",
                    range.min.len(),
                    dims.len()
                ));
            }
            for (d, &(lo, hi)) in dims.iter().enumerate() {
                if range.min[d] > lo || range.max[d] < hi {
                    let what = dim_name(&meta.tensors[*tensor], d);
                    return Some(format!(
                        "{name} {what} covers {}..={}, the session needs {lo}..={hi}",
                        range.min[d], range.max[d]
                    ));
                }
            }
        }
        None
    }

    fn reasons(&self, meta: &EngineMeta, req: &[(usize, Vec<(i64, i64)>)]) -> String {
        let parts: Vec<String> = (0..meta.profiles.len())
            .map(|p| format!("profile {p}: {}", self.first_gap(meta, p, req).unwrap_or_else(|| "covers it".into())))
            .collect();
        parts.join("; ")
    }

    /// Chooses the profiles a session of `max_batch` x `max_seq` runs with: the first profile
    /// (lowest index) covering every shape of each phase. With `kv_cache` off, or on an engine
    /// without past inputs, every step recomputes the whole sequence with the prefill profile.
    pub fn plan(&self, meta: &EngineMeta, max_batch: usize, max_seq: usize, kv_cache: bool) -> Result<Plan> {
        let pick = |phase: Phase, label: &str| -> Result<usize> {
            let req = self.requirement(phase, max_batch, max_seq);
            (0..meta.profiles.len()).find(|&p| self.covers(meta, p, &req)).ok_or_else(|| {
                err!(
                    ProfileUnsupported,
                    "no optimization profile of the engine covers the {label} of a session of batch {max_batch} x {max_seq} tokens ({}); rebuild the engine with `gpt2rt trt-command --max-batch {max_batch} --max-seq {max_seq}` or ask for a smaller session",
                    self.reasons(meta, &req)
                )
            })
        };
        let full = pick(Phase::Full, "prefill")?;
        let decode = if self.kind == ModelKind::KvCache && kv_cache && max_seq >= 2 {
            Some(pick(Phase::Decode, "decode steps (one token, past 1..max_seq-1)")?)
        } else {
            None
        };
        Ok(Plan { full, decode })
    }

    /// Checks a call's input shapes before enqueue: every input once, the rank and fixed
    /// dimensions the engine declares, inside profile `p`, and consistent with each other
    /// (one batch; mask = past + new tokens; position_ids shaped like input_ids; every past tensor
    /// alike). A failure is a clear status instead of CUDA error 700.
    pub fn check_call(&self, meta: &EngineMeta, p: usize, shapes: &[(usize, Vec<i64>)]) -> Result<()> {
        if p >= meta.profiles.len() {
            bail!(Internal, "profile {p} does not exist (the engine has {})", meta.profiles.len());
        }
        let inputs = meta.input_indices();
        for &i in &inputs {
            let count = shapes.iter().filter(|(t, _)| *t == i).count();
            if count != 1 {
                bail!(Internal, "input {} is given {count} shapes for one call", meta.tensors[i].name);
            }
        }
        for (tensor, dims) in shapes {
            let t = meta.tensors.get(*tensor).filter(|t| t.mode == IoMode::Input);
            let Some(t) = t else {
                bail!(Internal, "shape given for tensor {tensor}, which is not an engine input");
            };
            if dims.len() != t.dims.len() {
                bail!(Internal, "{} gets rank {}, the engine declares {}", t.name, dims.len(), dims_text(&t.dims));
            }
            let range = meta.range(p, *tensor);
            let outside = dims
                .iter()
                .enumerate()
                .any(|(d, &v)| v < 0 || (t.dims[d] >= 0 && v != t.dims[d]) || v < range.min[d] || v > range.max[d]);
            if outside {
                bail!(
                    ProfileUnsupported,
                    "{} would be {}, outside optimization profile {p} (min {}, max {}): refused before enqueue",
                    t.name,
                    dims_text(dims),
                    dims_text(&range.min),
                    dims_text(&range.max)
                );
            }
        }
        let shape = |i: usize| shapes.iter().find(|(t, _)| *t == i).map(|(_, d)| d.as_slice()).unwrap_or(&[]);
        let ids = shape(self.input_ids);
        let batch = ids[0];
        for (tensor, dims) in shapes {
            if dims[0] != batch {
                bail!(LengthMismatch, "{} has batch {} but input_ids has {batch}", meta.tensors[*tensor].name, dims[0]);
            }
        }
        if let Some(i) = self.position_ids {
            if shape(i) != ids {
                bail!(
                    LengthMismatch,
                    "position_ids {} must have the shape of input_ids {}",
                    dims_text(shape(i)),
                    dims_text(ids)
                );
            }
        }
        let past_len = match self.past.first() {
            Some(pair) => {
                let first = shape(pair[0]);
                for &i in self.past.iter().flatten() {
                    if shape(i) != first {
                        bail!(
                            LengthMismatch,
                            "{} is {} but {} is {}",
                            meta.tensors[i].name,
                            dims_text(shape(i)),
                            meta.tensors[pair[0]].name,
                            dims_text(first)
                        );
                    }
                }
                first[2]
            }
            None => 0,
        };
        if let Some(i) = self.attention_mask {
            let mask = shape(i);
            if mask[1] != past_len + ids[1] {
                bail!(
                    LengthMismatch,
                    "attention_mask covers {} positions but past ({past_len}) + new tokens ({}) = {}",
                    mask[1],
                    ids[1],
                    past_len + ids[1]
                );
            }
        }
        Ok(())
    }

    /// The output shapes a call with `batch` sequences, `past` cached and `new` new positions
    /// produces: logits `[batch, new, vocab]`, present `[batch, heads, past + new, head_dim]`.
    pub fn output_shapes(&self, batch: usize, past: usize, new: usize) -> Vec<(usize, Vec<i64>)> {
        let mut out = vec![(self.logits, vec![batch as i64, new as i64, self.vocab_size as i64])];
        let present = vec![batch as i64, self.n_head as i64, (past + new) as i64, self.head_dim as i64];
        for &i in self.present.iter().flatten() {
            out.push((i, present.clone()));
        }
        out
    }
}

fn dim_name(t: &TensorMeta, d: usize) -> String {
    let names: &[&str] =
        if t.dims.len() == 4 { &["batch", "heads", "past length", "head_dim"] } else { &["batch", "length"] };
    format!("dim {d} ({})", names.get(d).copied().unwrap_or("?"))
}

/// A phase of a session, each with its own input ranges.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// A whole (padded) batch from position 0, past length 0: the prefill, and every step when the
    /// sequence is recomputed.
    Full,
    /// One new token per sequence on top of a past of 1..max_seq-1.
    Decode,
}

/// The profiles a session runs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    /// Prefill (and recompute steps).
    pub full: usize,
    /// Decode steps with the KV cache; `None` when steps recompute (or `max_seq` is 1).
    pub decode: Option<usize>,
}

/// Byte offsets of buffers carved from one device allocation, each aligned to 256 bytes (what
/// TensorRT and coalesced access want), and the allocation's size.
pub fn arena_layout(sizes: &[usize]) -> (Vec<usize>, usize) {
    const ALIGN: usize = 256;
    let mut offsets = Vec::with_capacity(sizes.len());
    let mut total = 0;
    for &size in sizes {
        offsets.push(total);
        total += size.max(1).div_ceil(ALIGN) * ALIGN;
    }
    (offsets, total)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn t(name: &str, mode: IoMode, dtype: ElemType, dims: &[i64]) -> TensorMeta {
        TensorMeta {
            name: name.into(),
            mode,
            dtype,
            dims: dims.to_vec(),
            linear: true,
            on_device: true,
            shape_tensor: false,
        }
    }

    fn range(min: &[i64], opt: &[i64], max: &[i64]) -> ShapeRange {
        ShapeRange { min: min.to_vec(), opt: opt.to_vec(), max: max.to_vec() }
    }

    /// The study's model: input_ids, attention_mask → logits; batch 1..=b, sequence 1..=s.
    pub(crate) fn no_past_engine(b: i64, s: i64) -> EngineMeta {
        EngineMeta {
            tensors: vec![
                t("input_ids", IoMode::Input, ElemType::I64, &[-1, -1]),
                t("attention_mask", IoMode::Input, ElemType::I64, &[-1, -1]),
                t("logits", IoMode::Output, ElemType::F32, &[-1, -1, 50257]),
            ],
            profiles: vec![ProfilePair::seq(b, s)],
        }
    }

    struct ProfilePair;
    impl ProfilePair {
        fn seq(b: i64, s: i64) -> ProfileMeta {
            ProfileMeta { ranges: vec![range(&[1, 1], &[1, s / 2], &[b, s]); 2] }
        }
    }

    /// What `gpt2rt trt-command` prints for the KV model: profile 0 = context (past 0), profile 1 =
    /// generation (one token, past 1..s-1, mask 2..s).
    pub(crate) fn kv_engine(layers: usize, b: i64, s: i64) -> EngineMeta {
        let (h, d) = (4, 16);
        let mut tensors = vec![
            t("input_ids", IoMode::Input, ElemType::I64, &[-1, -1]),
            t("attention_mask", IoMode::Input, ElemType::I64, &[-1, -1]),
            t("position_ids", IoMode::Input, ElemType::I64, &[-1, -1]),
        ];
        for l in 0..layers {
            for part in ["key", "value"] {
                tensors.push(t(&format!("past_key_values.{l}.{part}"), IoMode::Input, ElemType::F16, &[-1, h, -1, d]));
            }
        }
        tensors.push(t("logits", IoMode::Output, ElemType::F32, &[-1, -1, 50257]));
        for l in 0..layers {
            for part in ["key", "value"] {
                tensors.push(t(&format!("present.{l}.{part}"), IoMode::Output, ElemType::F16, &[-1, h, -1, d]));
            }
        }
        let seq = |min: [i64; 2], opt: [i64; 2], max: [i64; 2]| range(&min, &opt, &max);
        let kv = |min: i64, opt: i64, max: i64| range(&[1, h, min, d], &[1, h, opt, d], &[b, h, max, d]);
        let mut context = vec![seq([1, 1], [1, s / 2], [b, s]); 3];
        context.extend(vec![kv(0, 0, 0); 2 * layers]);
        let mut generation =
            vec![seq([1, 1], [1, 1], [b, 1]), seq([1, 2], [1, s / 2], [b, s]), seq([1, 1], [1, 1], [b, 1])];
        generation.extend(vec![kv(1, s / 2 - 1, s - 1); 2 * layers]);
        EngineMeta { tensors, profiles: vec![ProfileMeta { ranges: context }, ProfileMeta { ranges: generation }] }
    }

    fn index(meta: &EngineMeta, name: &str) -> usize {
        meta.tensors.iter().position(|t| t.name == name).unwrap()
    }

    #[track_caller]
    fn fails<T: fmt::Debug>(result: Result<T>, kind: crate::ErrorKind, needles: &[&str]) {
        let e = result.expect_err("should fail");
        assert_eq!(e.kind(), kind, "{e}");
        for needle in needles {
            assert!(e.message().contains(needle), "message {:?} should mention {needle:?}", e.message());
        }
    }

    #[test]
    fn classifies_the_no_past_engine() {
        let meta = no_past_engine(16, 32);
        let layout = Layout::from_meta(&meta).unwrap();
        assert_eq!(layout.kind, ModelKind::NoPast);
        assert_eq!((layout.vocab_size, layout.n_layer), (50257, 0));
        assert_eq!(layout.attention_mask, Some(1));
        assert_eq!(layout.limits(&meta), Some((16, 32)));
        let plan = layout.plan(&meta, 16, 32, true).unwrap();
        assert_eq!(plan, Plan { full: 0, decode: None }, "no past inputs: every step recomputes");
    }

    #[test]
    fn classifies_the_kv_engine_and_picks_context_and_generation_profiles() {
        let meta = kv_engine(2, 8, 64);
        let layout = Layout::from_meta(&meta).unwrap();
        assert_eq!(layout.kind, ModelKind::KvCache);
        assert_eq!((layout.n_layer, layout.n_head, layout.head_dim), (2, 4, 16));
        assert_eq!(layout.kv_dtype, ElemType::F16);
        assert_eq!(layout.past[1], [index(&meta, "past_key_values.1.key"), index(&meta, "past_key_values.1.value")]);
        assert_eq!(layout.present[0], [index(&meta, "present.0.key"), index(&meta, "present.0.value")]);
        assert_eq!(layout.limits(&meta), Some((8, 64)));
        assert_eq!(layout.plan(&meta, 8, 64, true).unwrap(), Plan { full: 0, decode: Some(1) });
        assert_eq!(layout.plan(&meta, 1, 10, true).unwrap(), Plan { full: 0, decode: Some(1) });
        // KV cache off: the recompute path needs only the context profile.
        assert_eq!(layout.plan(&meta, 8, 64, false).unwrap(), Plan { full: 0, decode: None });
        // One position: no step can ever run.
        assert_eq!(layout.plan(&meta, 8, 1, true).unwrap(), Plan { full: 0, decode: None });
    }

    #[test]
    fn profiles_are_tried_in_order_and_the_first_that_covers_wins() {
        let mut meta = no_past_engine(4, 32);
        meta.profiles.push(ProfilePair::seq(16, 128));
        let layout = Layout::from_meta(&meta).unwrap();
        assert_eq!(layout.plan(&meta, 4, 32, true).unwrap().full, 0);
        assert_eq!(layout.plan(&meta, 4, 33, true).unwrap().full, 1);
        assert_eq!(layout.plan(&meta, 16, 128, true).unwrap().full, 1);
        assert_eq!(layout.limits(&meta), Some((16, 128)));
    }

    #[test]
    fn a_profile_that_does_not_cover_max_seq_is_refused_with_its_limits() {
        // The study's engine: batch 1-16 x seq 1-32; a session of 12 prompt + 32 new tokens.
        let meta = no_past_engine(16, 32);
        let layout = Layout::from_meta(&meta).unwrap();
        fails(
            layout.plan(&meta, 16, 44, true),
            crate::ErrorKind::ProfileUnsupported,
            &[
                "prefill",
                "batch 16 x 44",
                "profile 0: input_ids dim 1 (length) covers 1..=32, the session needs 1..=44",
                "trt-command",
            ],
        );
        fails(
            layout.plan(&meta, 17, 32, true),
            crate::ErrorKind::ProfileUnsupported,
            &["input_ids dim 0 (batch) covers 1..=16, the session needs 1..=17"],
        );
    }

    #[test]
    fn a_generation_profile_too_short_for_max_seq_is_refused() {
        let mut meta = kv_engine(2, 8, 64);
        let layout = Layout::from_meta(&meta).unwrap();
        // Context covers 64 but generation only past 1..=31 / mask 2..=32.
        let gen_profile = &mut meta.profiles[1];
        gen_profile.ranges[1].max[1] = 32;
        for r in &mut gen_profile.ranges[3..] {
            r.max[2] = 31;
        }
        fails(
            layout.plan(&meta, 8, 64, true),
            crate::ErrorKind::ProfileUnsupported,
            &["decode steps", "profile 1: attention_mask dim 1 (length) covers 2..=32, the session needs 2..=64"],
        );
        assert_eq!(layout.plan(&meta, 8, 32, true).unwrap(), Plan { full: 0, decode: Some(1) });
        // The recompute path does not need the generation profile at all.
        assert_eq!(layout.plan(&meta, 8, 64, false).unwrap().decode, None);
    }

    #[test]
    fn a_context_profile_needs_past_length_zero() {
        let mut meta = kv_engine(1, 8, 64);
        for r in &mut meta.profiles[0].ranges[3..] {
            r.min[2] = 1;
            r.max[2] = 1;
        }
        fails(
            Layout::from_meta(&meta),
            crate::ErrorKind::ModelFormat,
            &["past length 0", "past_key_values.0.key dim 2 (past length) covers 1..=1, the session needs 0..=0"],
        );
    }

    #[test]
    fn a_profile_that_needs_a_minimum_batch_above_one_is_refused() {
        let mut meta = no_past_engine(8, 32);
        for r in &mut meta.profiles[0].ranges {
            r.min[0] = 2;
        }
        fails(
            Layout::from_meta(&meta),
            crate::ErrorKind::ModelFormat,
            &["dim 0 (batch) covers 2..=8, the session needs 1..=1"],
        );
    }

    #[test]
    fn wrong_dtypes_are_refused_by_name() {
        let mut meta = no_past_engine(4, 32);
        meta.tensors[0].dtype = ElemType::F32;
        fails(Layout::from_meta(&meta), crate::ErrorKind::ModelFormat, &["input_ids is float32", "int32 or int64"]);
        let mut meta = no_past_engine(4, 32);
        meta.tensors[1].dtype = ElemType::Bool;
        fails(Layout::from_meta(&meta), crate::ErrorKind::ModelFormat, &["attention_mask is bool"]);
        let mut meta = no_past_engine(4, 32);
        meta.tensors[2].dtype = ElemType::I32;
        fails(Layout::from_meta(&meta), crate::ErrorKind::ModelFormat, &["logits is int32"]);
        let mut meta = kv_engine(2, 4, 32);
        let i = index(&meta, "present.1.value");
        meta.tensors[i].dtype = ElemType::F32;
        fails(
            Layout::from_meta(&meta),
            crate::ErrorKind::ModelFormat,
            &["present.1.value is float32 but other present tensors are float16"],
        );
        let mut meta = kv_engine(2, 4, 32);
        let i = index(&meta, "past_key_values.0.key");
        meta.tensors[i].dtype = ElemType::I8;
        fails(Layout::from_meta(&meta), crate::ErrorKind::ModelFormat, &["past_key_values.0.key is int8"]);
        // Past and present in different types cannot ping-pong.
        let mut meta = kv_engine(1, 4, 32);
        for name in ["present.0.key", "present.0.value"] {
            let i = index(&meta, name);
            meta.tensors[i].dtype = ElemType::F32;
        }
        fails(
            Layout::from_meta(&meta),
            crate::ErrorKind::ModelFormat,
            &["differ from past tensors", "cannot be fed back"],
        );
    }

    #[test]
    fn malformed_kv_sets_are_refused() {
        let mut meta = kv_engine(2, 4, 32);
        let i = index(&meta, "past_key_values.1.value");
        meta.tensors.remove(i);
        for p in &mut meta.profiles {
            p.ranges.remove(i);
        }
        fails(Layout::from_meta(&meta), crate::ErrorKind::ModelFormat, &["no past_key_values.1.value"]);
        let mut meta = kv_engine(2, 4, 32);
        meta.tensors.retain(|t| !t.name.starts_with("present.1"));
        fails(
            Layout::from_meta(&meta),
            crate::ErrorKind::ModelFormat,
            &["past_key_values for 2 layers but present outputs for 1"],
        );
        let mut meta = kv_engine(1, 4, 32);
        let i = index(&meta, "past_key_values.0.key");
        meta.tensors[i].dims[1] = -1;
        fails(Layout::from_meta(&meta), crate::ErrorKind::ModelFormat, &["dynamic heads or head_dim"]);
        let mut meta = kv_engine(1, 4, 32);
        let i = index(&meta, "present.0.key");
        meta.tensors[i].dims = vec![-1, 4, -1];
        fails(Layout::from_meta(&meta), crate::ErrorKind::ModelFormat, &["present.0.key has rank 3"]);
        // Past inputs without position_ids cannot run a padded batch.
        let mut meta = kv_engine(1, 4, 32);
        let i = index(&meta, "position_ids");
        meta.tensors.remove(i);
        for p in &mut meta.profiles {
            p.ranges.remove(i);
        }
        fails(Layout::from_meta(&meta), crate::ErrorKind::ModelFormat, &["attention_mask and position_ids"]);
    }

    #[test]
    fn unknown_tensors_and_formats_are_refused() {
        let mut meta = no_past_engine(4, 32);
        meta.tensors.push(t("token_type_ids", IoMode::Input, ElemType::I64, &[-1, -1]));
        meta.profiles[0].ranges.push(range(&[1, 1], &[1, 1], &[4, 32]));
        fails(Layout::from_meta(&meta), crate::ErrorKind::ModelFormat, &["unexpected engine input 'token_type_ids'"]);
        let mut meta = no_past_engine(4, 32);
        meta.tensors.push(t("hidden_states", IoMode::Output, ElemType::F32, &[-1, -1, 768]));
        fails(Layout::from_meta(&meta), crate::ErrorKind::ModelFormat, &["unexpected engine output 'hidden_states'"]);
        let mut meta = no_past_engine(4, 32);
        meta.tensors[2].linear = false;
        fails(Layout::from_meta(&meta), crate::ErrorKind::ModelFormat, &["'logits' is in a vectorized format"]);
        let mut meta = no_past_engine(4, 32);
        meta.tensors[2].dims[2] = -1;
        fails(Layout::from_meta(&meta), crate::ErrorKind::ModelFormat, &["fixed vocab"]);
        let mut meta = no_past_engine(4, 32);
        meta.tensors.retain(|t| t.name != "logits");
        fails(Layout::from_meta(&meta), crate::ErrorKind::ModelFormat, &["no 'logits' output"]);
        let mut meta = no_past_engine(4, 32);
        meta.profiles.clear();
        fails(Layout::from_meta(&meta), crate::ErrorKind::ModelFormat, &["no optimization profile"]);
    }

    #[test]
    fn a_static_batch_engine_serves_only_that_batch() {
        let mut meta = no_past_engine(1, 32);
        for t in &mut meta.tensors {
            t.dims[0] = 1;
        }
        let layout = Layout::from_meta(&meta).unwrap();
        assert_eq!(layout.limits(&meta), Some((1, 32)));
        assert!(layout.plan(&meta, 1, 32, true).is_ok());
        fails(layout.plan(&meta, 2, 32, true), crate::ErrorKind::ProfileUnsupported, &["dim 0 (batch) covers 1..=1"]);
    }

    fn kv_call(meta: &EngineMeta, layout: &Layout, b: i64, past: i64, new: i64, mask: i64) -> Vec<(usize, Vec<i64>)> {
        let mut shapes = vec![
            (layout.input_ids, vec![b, new]),
            (layout.attention_mask.unwrap(), vec![b, mask]),
            (layout.position_ids.unwrap(), vec![b, new]),
        ];
        for &i in layout.past.iter().flatten() {
            shapes.push((i, vec![b, 4, past, 16]));
        }
        assert_eq!(shapes.len(), meta.input_indices().len());
        shapes
    }

    #[test]
    fn call_shapes_are_checked_against_the_profile_before_enqueue() {
        let meta = kv_engine(2, 8, 64);
        let layout = Layout::from_meta(&meta).unwrap();
        layout.check_call(&meta, 0, &kv_call(&meta, &layout, 3, 0, 12, 12)).unwrap();
        layout.check_call(&meta, 1, &kv_call(&meta, &layout, 3, 12, 1, 13)).unwrap();
        layout.check_call(&meta, 1, &kv_call(&meta, &layout, 8, 63, 1, 64)).unwrap();
        // The study's crash: a sequence past the profile.
        fails(
            layout.check_call(&meta, 1, &kv_call(&meta, &layout, 1, 64, 1, 65)),
            crate::ErrorKind::ProfileUnsupported,
            &[
                "attention_mask would be [1, 65], outside optimization profile 1 (min [1, 2], max [8, 64])",
                "before enqueue",
            ],
        );
        fails(
            layout.check_call(&meta, 0, &kv_call(&meta, &layout, 9, 0, 4, 4)),
            crate::ErrorKind::ProfileUnsupported,
            &["input_ids would be [9, 4]"],
        );
        // A prefill (past 0) on the generation profile.
        fails(
            layout.check_call(&meta, 1, &kv_call(&meta, &layout, 1, 0, 4, 4)),
            crate::ErrorKind::ProfileUnsupported,
            &["input_ids would be [1, 4]"],
        );
    }

    #[test]
    fn inconsistent_call_shapes_are_refused() {
        let meta = kv_engine(2, 8, 64);
        let layout = Layout::from_meta(&meta).unwrap();
        // Mask must be past + new.
        fails(
            layout.check_call(&meta, 1, &kv_call(&meta, &layout, 2, 10, 1, 10)),
            crate::ErrorKind::LengthMismatch,
            &["attention_mask covers 10 positions but past (10) + new tokens (1) = 11"],
        );
        // One past tensor with another length.
        let mut shapes = kv_call(&meta, &layout, 2, 10, 1, 11);
        shapes.last_mut().unwrap().1[2] = 9;
        fails(
            layout.check_call(&meta, 1, &shapes),
            crate::ErrorKind::LengthMismatch,
            &["past_key_values.1.value is [2, 4, 9, 16]"],
        );
        // Batch disagreement.
        let mut shapes = kv_call(&meta, &layout, 2, 10, 1, 11);
        shapes[1].1[0] = 1;
        fails(
            layout.check_call(&meta, 1, &shapes),
            crate::ErrorKind::LengthMismatch,
            &["attention_mask has batch 1 but input_ids has 2"],
        );
        // position_ids shaped unlike input_ids.
        let mut shapes = kv_call(&meta, &layout, 2, 0, 5, 5);
        shapes[2].1[1] = 4;
        fails(layout.check_call(&meta, 0, &shapes), crate::ErrorKind::LengthMismatch, &["position_ids [2, 4]"]);
        // Wrong head count (a fixed dimension).
        let mut shapes = kv_call(&meta, &layout, 2, 10, 1, 11);
        shapes[4].1[1] = 5;
        fails(
            layout.check_call(&meta, 1, &shapes),
            crate::ErrorKind::ProfileUnsupported,
            &["past_key_values.0.value would be [2, 5, 10, 16]"],
        );
        // Missing input, negative dims, wrong rank.
        let mut shapes = kv_call(&meta, &layout, 2, 10, 1, 11);
        shapes.pop();
        fails(
            layout.check_call(&meta, 1, &shapes),
            crate::ErrorKind::Internal,
            &["past_key_values.1.value is given 0 shapes"],
        );
        let mut shapes = kv_call(&meta, &layout, 2, 10, 1, 11);
        shapes[0].1 = vec![2];
        fails(layout.check_call(&meta, 1, &shapes), crate::ErrorKind::Internal, &["input_ids gets rank 1"]);
        let mut shapes = kv_call(&meta, &layout, 2, 10, 1, 11);
        shapes[0].1[1] = -1;
        fails(
            layout.check_call(&meta, 1, &shapes),
            crate::ErrorKind::ProfileUnsupported,
            &["input_ids would be [2, ?]"],
        );
        fails(layout.check_call(&meta, 2, &shapes), crate::ErrorKind::Internal, &["profile 2 does not exist"]);
    }

    #[test]
    fn no_past_calls_need_mask_equal_to_the_sequence() {
        let meta = no_past_engine(4, 32);
        let layout = Layout::from_meta(&meta).unwrap();
        layout.check_call(&meta, 0, &[(0, vec![4, 32]), (1, vec![4, 32])]).unwrap();
        fails(
            layout.check_call(&meta, 0, &[(0, vec![4, 20]), (1, vec![4, 21])]),
            crate::ErrorKind::LengthMismatch,
            &["attention_mask covers 21 positions but past (0) + new tokens (20) = 20"],
        );
    }

    #[test]
    fn output_shapes_follow_past_and_new_tokens() {
        let meta = kv_engine(1, 8, 64);
        let layout = Layout::from_meta(&meta).unwrap();
        let out = layout.output_shapes(3, 12, 1);
        assert_eq!(out[0], (layout.logits, vec![3, 1, 50257]));
        assert_eq!(out[1], (layout.present[0][0], vec![3, 4, 13, 16]));
        assert_eq!(out.len(), 3);
    }

    #[test]
    fn the_listing_names_every_tensor_and_profile() {
        let text = kv_engine(1, 8, 64).to_string();
        assert!(text.contains("input  past_key_values.0.key"), "{text}");
        assert!(text.contains("float16  [?, 4, ?, 16]"), "{text}");
        assert!(text.contains("optimization profiles: 2"), "{text}");
        assert!(text.contains("attention_mask               min [1, 2] opt [1, 32] max [8, 64]"), "{text}");
    }

    #[test]
    fn arena_offsets_are_256_byte_aligned() {
        let (offsets, total) = arena_layout(&[10, 256, 0, 257, 3]);
        assert_eq!(offsets, vec![0, 256, 512, 768, 1280]);
        assert_eq!(total, 1536);
        assert!(offsets.iter().all(|o| o % 256 == 0));
    }

    #[test]
    fn element_types_map_from_tensorrt_and_onnx() {
        assert_eq!(ElemType::from_trt(0), ElemType::F32);
        assert_eq!(ElemType::from_trt(1), ElemType::F16);
        assert_eq!(ElemType::from_trt(3), ElemType::I32);
        assert_eq!(ElemType::from_trt(7), ElemType::BF16);
        assert_eq!(ElemType::from_trt(8), ElemType::I64);
        assert_eq!(ElemType::from_trt(6).name(), "fp8");
        assert_eq!(ElemType::from_onnx(1), ElemType::F32);
        assert_eq!(ElemType::from_onnx(7), ElemType::I64);
        assert_eq!(ElemType::from_onnx(10), ElemType::F16);
        assert_eq!(ElemType::from_onnx(16), ElemType::BF16);
        assert_eq!(ElemType::I64.size(), 8);
    }
}
