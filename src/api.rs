//! The safe Rust API: [`Engine`] (shared, thread-safe), [`Session`] (one owner at a time) and
//! [`Tokenizer`]. The C ABI and the CLI are thin layers over this.

use crate::backend::{Backend, BackendKind, Profile, cpu::CpuBackend, cuda, tensorrt};
use crate::decode::{Decoder, FinishReason, GenerateOutput, GenerateParams, SessionOptions};
use crate::error::Result;
use crate::log::{LogLevel, emit};
use crate::model::{DType, Model, ModelConfig, Preset, load_dir};
use crate::nvtx;
use crate::sampling::SamplingParams;
use crate::tokenizer::StreamDecoder;
pub use crate::tokenizer::Tokenizer;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// How to load an engine.
#[derive(Debug, Clone, PartialEq)]
pub struct EngineOptions {
    /// A Hugging Face GPT-2 directory; `None` uses the built-in synthetic model.
    pub model_dir: Option<PathBuf>,
    /// Which built-in synthetic model when `model_dir` is `None`.
    pub builtin: Preset,
    /// Seed of the built-in synthetic model.
    pub seed: u64,
    pub backend: BackendKind,
    /// GPU ordinal for device backends.
    pub device: usize,
    /// Compute dtype for device backends; `None` keeps the weights' own. The CPU computes in f32.
    pub dtype: Option<DType>,
    /// CPU worker threads; 0 = one per core.
    pub num_threads: usize,
    /// A serialized TensorRT engine (`.engine`/`.plan`) for the tensorrt backend (`auto` then means
    /// tensorrt). `config.json` and `tokenizer.json` are taken from `model_dir` when it is a
    /// directory, else from the engine's directory, when present. With the tensorrt backend, a
    /// `model_dir` that names a file is taken as the engine file (how the C ABI passes it).
    pub engine_file: Option<PathBuf>,
    /// Send NVTX ranges (`gpt2rt generate`, `gpt2rt prefill`, `gpt2rt step`, `gpt2rt select`,
    /// `gpt2rt read_logits`, and the CUDA backend's copies) to an attached NVTX tool such as Nsight
    /// Systems. The environment variable `GPT2RT_NVTX=1` turns it on too. Process-wide once on
    /// (NVTX is per process): see [`crate::nvtx`]. Off, or with no tool attached, a range costs
    /// one atomic load.
    pub nvtx: bool,
}

impl Default for EngineOptions {
    fn default() -> Self {
        Self {
            model_dir: None,
            builtin: Preset::DistilGpt2,
            seed: 0,
            backend: BackendKind::Auto,
            device: 0,
            dtype: None,
            num_threads: 0,
            engine_file: None,
            nvtx: false,
        }
    }
}

/// Immutable weights on a backend, the model config and the tokenizer. Cheap to clone (an `Arc`);
/// share it freely across threads. Sessions keep it alive.
#[derive(Debug, Clone)]
pub struct Engine(Arc<EngineInner>);

#[derive(Debug)]
struct EngineInner {
    backend: Arc<dyn Backend>,
    tokenizer: Tokenizer,
    model_source: String,
    source_dtype: DType,
    notes: Vec<String>,
}

#[cfg(feature = "cuda")]
fn cuda_backend(model: &Model, options: &EngineOptions) -> Result<Arc<dyn Backend>> {
    let dtype = options.dtype.unwrap_or(model.source_dtype);
    Ok(Arc::new(cuda::CudaBackend::new(model, options.device, dtype)?))
}

#[cfg(not(feature = "cuda"))]
fn cuda_backend(_model: &Model, _options: &EngineOptions) -> Result<Arc<dyn Backend>> {
    cuda::availability()?;
    unreachable!("availability() fails in a build without the cuda backend")
}

/// Whether each backend can run here, and why not.
pub fn backend_availability() -> Vec<(BackendKind, Result<()>)> {
    vec![
        (BackendKind::Cuda, cuda::availability()),
        (BackendKind::TensorRt, tensorrt::availability()),
        (BackendKind::Cpu, Ok(())),
    ]
}

impl Engine {
    /// The built-in synthetic DistilGPT2 on the best available backend.
    pub fn builtin() -> Result<Self> {
        Self::load(&EngineOptions::default())
    }

    pub fn load(options: &EngineOptions) -> Result<Self> {
        let mut notes = Vec::new();
        if options.nvtx || nvtx::requested_by_env() {
            notes.push(nvtx::enable().to_string());
        }
        let engine_file = options
            .engine_file
            .clone()
            .or_else(|| options.model_dir.clone().filter(|p| options.backend == BackendKind::TensorRt && p.is_file()));
        if let Some(file) = engine_file {
            return Self::load_tensorrt(options, &file, notes);
        }
        let (model, tokenizer) = match &options.model_dir {
            Some(dir) => {
                let model = load_dir(dir)?;
                let tok_path = dir.join("tokenizer.json");
                let tokenizer = if tok_path.exists() {
                    Tokenizer::from_file(&tok_path)?
                } else {
                    notes.push("no tokenizer.json in the model directory: using the built-in GPT-2 tokenizer".into());
                    Tokenizer::gpt2()?
                };
                (model, tokenizer)
            }
            None => (Model::synthetic(options.builtin, options.seed), Tokenizer::gpt2()?),
        };
        let model_source = model.source.clone();
        let source_dtype = model.source_dtype;
        let model = Arc::new(model);
        let backend: Arc<dyn Backend> = match options.backend {
            BackendKind::Cpu => Arc::new(CpuBackend::new(model, options.num_threads)?),
            BackendKind::Cuda => cuda_backend(&model, options)?,
            BackendKind::TensorRt => {
                tensorrt::availability()?;
                bail!(
                    InvalidArgument,
                    "the tensorrt backend runs a serialized engine: give its file (--engine, or model_dir naming the .engine file); build one with `gpt2rt trt-command`"
                )
            }
            BackendKind::Auto => match cuda_backend(&model, options) {
                Ok(backend) => backend,
                Err(e) => {
                    let note = format!("auto: skipped cuda: {e}");
                    emit(LogLevel::Info, &note);
                    notes.push(note);
                    Arc::new(CpuBackend::new(model, options.num_threads)?)
                }
            },
        };
        if backend.kind() == BackendKind::Cpu {
            if let Some(dtype) = options.dtype.filter(|d| *d != DType::F32) {
                let note = format!("cpu computes in f32: requested {dtype} is not applied");
                emit(LogLevel::Warn, &note);
                notes.push(note);
            }
        }
        Ok(Self(Arc::new(EngineInner { backend, tokenizer, model_source, source_dtype, notes })))
    }

    /// A serialized TensorRT engine with its optional `config.json` and `tokenizer.json`.
    fn load_tensorrt(options: &EngineOptions, file: &std::path::Path, mut notes: Vec<String>) -> Result<Self> {
        if !matches!(options.backend, BackendKind::TensorRt | BackendKind::Auto) {
            bail!(
                InvalidArgument,
                "{} is an engine file, which only the tensorrt backend runs (asked: {})",
                file.display(),
                options.backend
            );
        }
        let dir = tensorrt::sidecar_dir(file, options.model_dir.as_deref());
        let config_path = dir.join("config.json");
        let config = if config_path.is_file() {
            let text = std::fs::read_to_string(&config_path).map_err(|e| err!(Io, "{}: {e}", config_path.display()))?;
            Some(ModelConfig::from_json(&text).map_err(|e| e.context(config_path.display()))?)
        } else {
            notes.push(format!("no config.json in {}: model shapes come from the engine", dir.display()));
            None
        };
        let backend = tensorrt::load(file, config, options.device)?;
        let tok_path = dir.join("tokenizer.json");
        let tokenizer = if tok_path.is_file() {
            Tokenizer::from_file(&tok_path)?
        } else {
            notes.push(format!("no tokenizer.json in {}: using the built-in GPT-2 tokenizer", dir.display()));
            Tokenizer::gpt2()?
        };
        if backend.config().vocab_size > tokenizer.vocab_size() {
            notes.push(format!(
                "the engine's vocabulary ({}) is larger than the tokenizer's ({})",
                backend.config().vocab_size,
                tokenizer.vocab_size()
            ));
        }
        Ok(Self(Arc::new(EngineInner {
            backend,
            tokenizer,
            model_source: file.display().to_string(),
            source_dtype: DType::F32,
            notes,
        })))
    }

    pub fn config(&self) -> &ModelConfig {
        self.0.backend.config()
    }

    pub fn backend_kind(&self) -> BackendKind {
        self.0.backend.kind()
    }

    /// The largest session profile this engine supports.
    pub fn limits(&self) -> Profile {
        self.0.backend.limits()
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.0.tokenizer
    }

    /// A multi-line description: model, backend, and why other backends were skipped.
    pub fn info(&self) -> String {
        let cfg = self.config();
        let mut text = format!(
            "model: {} ({} layers, {} wide, {} heads, {} positions, vocab {}, {} parameters, stored as {})\nbackend: {}\n",
            self.0.model_source,
            cfg.n_layer,
            cfg.n_embd,
            cfg.n_head,
            cfg.n_positions,
            cfg.vocab_size,
            cfg.param_count(),
            self.0.source_dtype,
            self.0.backend.describe()
        );
        for note in &self.0.notes {
            text.push_str(note);
            text.push('\n');
        }
        text.pop();
        text
    }

    /// Creates a session with every buffer it will need.
    pub fn new_session(&self, options: SessionOptions) -> Result<Session> {
        let decoder = Decoder::new(self.0.backend.clone(), options)?;
        let max_batch = decoder.profile().max_batch;
        let streams = (0..max_batch).map(|_| self.0.tokenizer.stream_decoder()).collect();
        Ok(Session { engine: self.clone(), decoder, streams, cancel: Arc::new(AtomicBool::new(false)) })
    }
}

/// A decode state bound to a profile. Use it from one thread at a time (it is `Send`, not `Sync`);
/// [`Session::cancel_flag`] may be used from any thread.
#[derive(Debug)]
pub struct Session {
    engine: Engine,
    decoder: Decoder,
    streams: Vec<StreamDecoder>,
    cancel: Arc<AtomicBool>,
}

/// Text generation result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TextOutput {
    pub text: String,
    pub tokens: Vec<u32>,
    pub finish_reason: FinishReason,
}

impl Session {
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    pub fn profile(&self) -> Profile {
        self.decoder.profile()
    }

    pub fn kv_cache(&self) -> bool {
        self.decoder.kv_cache()
    }

    pub fn batch(&self) -> usize {
        self.decoder.batch()
    }

    pub fn lengths(&self) -> &[usize] {
        self.decoder.lengths()
    }

    pub fn prefill(&mut self, tokens: &[u32], lengths: &[usize]) -> Result<()> {
        self.decoder.prefill(tokens, lengths)
    }

    pub fn step(&mut self, tokens: &[u32]) -> Result<()> {
        self.decoder.step(tokens)
    }

    pub fn read_logits(&mut self, out: &mut [f32]) -> Result<usize> {
        self.decoder.read_logits(out)
    }

    pub fn select(&mut self, params: &SamplingParams, out: &mut [u32]) -> Result<usize> {
        self.decoder.select(params, out)
    }

    /// Times the forward passes on the device (CUDA events) from now on; `take_device_ms` reads
    /// the total. A no-op on the CPU backend.
    pub fn set_device_timing(&mut self, on: bool) -> Result<()> {
        self.decoder.set_device_timing(on)
    }

    /// Device time of the forward passes since the last call, in ms (kernels only: no launch,
    /// copy or host time); `None` on backends that do not measure it.
    pub fn take_device_ms(&mut self) -> Option<f64> {
        self.decoder.take_device_ms()
    }

    /// A flag that, once set from any thread, ends the running generation within one step (or the
    /// next one, before its first step, if none is running). Each generation that passes its
    /// argument checks clears it when it returns; one refused earlier leaves it pending.
    pub fn cancel_flag(&self) -> Arc<AtomicBool> {
        self.cancel.clone()
    }

    /// Generates from a batch of token prompts. `on_token(seq, token, piece)` receives each token
    /// with the complete UTF-8 text it finishes (possibly empty); return `false` to stop.
    pub fn generate_tokens(
        &mut self,
        tokens: &[u32],
        lengths: &[usize],
        params: &GenerateParams,
        on_token: &mut dyn FnMut(usize, u32, &str) -> bool,
    ) -> Result<GenerateOutput> {
        for stream in &mut self.streams {
            stream.reset();
        }
        let streams = &mut self.streams;
        let mut piece = String::new();
        let mut callback = |seq: usize, token: u32| {
            piece.clear();
            match streams[seq].push(token) {
                Ok(text) => piece.push_str(&text),
                Err(_) => return false,
            }
            on_token(seq, token, &piece)
        };
        let cancel = self.cancel.clone();
        let result = self.decoder.generate(tokens, lengths, params, &cancel, &mut callback);
        cancel.store(false, Ordering::Relaxed);
        result
    }

    /// Encodes `prompt`, generates, and decodes the new tokens. `on_token(token, piece)` receives
    /// each generated token with the complete UTF-8 text it finishes (possibly empty); return
    /// `false` to stop. Bytes still pending at the end (an incomplete character, rendered as
    /// U+FFFD like `decode` does) arrive in one last call with `token = None`, so the pieces always
    /// add up to `TextOutput::text`.
    pub fn generate_text(
        &mut self,
        prompt: &str,
        params: &GenerateParams,
        on_token: &mut dyn FnMut(Option<u32>, &str) -> bool,
    ) -> Result<TextOutput> {
        let prompt_tokens = self.engine.tokenizer().encode(prompt)?;
        if prompt_tokens.is_empty() {
            bail!(InvalidArgument, "the prompt encodes to no tokens");
        }
        let out = self.generate_tokens(&prompt_tokens, &[prompt_tokens.len()], params, &mut |_, token, piece| {
            on_token(Some(token), piece)
        })?;
        let tail = self.streams[0].finish();
        if !tail.is_empty() {
            on_token(None, &tail);
        }
        let tokens = out.tokens.into_iter().next().unwrap_or_default();
        let text = self.engine.tokenizer().decode(&tokens)?;
        Ok(TextOutput { text, tokens, finish_reason: out.finish_reason })
    }
}
