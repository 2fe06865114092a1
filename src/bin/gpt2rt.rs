//! `gpt2rt`: generate text, write synthetic models, inspect engines, and benchmark decoding.

use clap::{Args, Parser, Subcommand};
use gpt2rt::api::backend_availability;
use gpt2rt::log::LogLevel;
use gpt2rt::model::{DType, Model, Preset, write_dir};
use gpt2rt::{BackendKind, Engine, EngineOptions, GenerateParams, SamplingParams, SessionOptions, Tokenizer};
use indicatif::{ProgressBar, ProgressStyle};
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

#[derive(Parser)]
#[command(name = "gpt2rt", version, about = "GPT-2 / DistilGPT2 decoding at the lowest end-to-end latency")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate text from one or more prompts (several prompts = one ragged batch).
    Generate(GenerateArgs),
    /// Write a synthetic Hugging Face GPT-2 directory (config.json, model.safetensors, tokenizer.json).
    Synth(SynthArgs),
    /// Describe the engine and which backends are available here, and why not.
    Inspect(EngineArgs),
    /// Time end-to-end decoding over the original study's grid (batch x new tokens, KV on/off).
    Bench(BenchArgs),
    /// Print the trtexec command that builds a TensorRT engine gpt2rt can run from an ONNX file
    /// written by tools/export_onnx.py, with profiles covering prompt + generated tokens.
    #[command(name = "trt-command")]
    TrtRecipe(TrtCommandArgs),
}

#[derive(Args)]
struct TrtCommandArgs {
    /// The ONNX model (from tools/export_onnx.py: with or without past KV inputs).
    #[arg(long)]
    onnx: PathBuf,
    /// Largest batch the engine must take.
    #[arg(long)]
    max_batch: usize,
    /// Longest sequence (prompt + generated tokens) the engine must take.
    #[arg(long)]
    max_seq: usize,
    /// Build in FP16 with every LayerNorm kept in FP32 (an fp16 ONNX is built strongly typed).
    #[arg(long)]
    fp16: bool,
    /// Batch size TensorRT tunes its kernels for.
    #[arg(long, default_value_t = 1)]
    opt_batch: usize,
    /// Sequence / past length TensorRT tunes for (default: max-seq / 2).
    #[arg(long)]
    opt_seq: Option<usize>,
    /// Where trtexec saves the engine (default: the ONNX path with .engine).
    #[arg(long)]
    engine_out: Option<PathBuf>,
}

#[derive(Args, Clone)]
struct EngineArgs {
    /// Hugging Face GPT-2 directory; default: the built-in synthetic model.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Built-in synthetic model when --model is absent: distilgpt2, gpt2 or tiny.
    #[arg(long, default_value = "distilgpt2")]
    builtin: String,
    /// auto, cpu, cuda or tensorrt.
    #[arg(long, default_value = "auto")]
    backend: String,
    /// Compute dtype for GPU backends: f32, f16 or bf16 (default: as stored).
    #[arg(long)]
    dtype: Option<String>,
    /// GPU ordinal.
    #[arg(long, default_value_t = 0)]
    device: usize,
    /// CPU worker threads (0 = one per core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// A serialized TensorRT engine (runs on the tensorrt backend; config.json and tokenizer.json
    /// are taken from --model or from the engine's directory when present).
    #[arg(long)]
    engine: Option<PathBuf>,
}

impl EngineArgs {
    fn load(&self) -> gpt2rt::Result<Engine> {
        self.load_with(false)
    }

    /// Loads the engine; `nvtx` (the `--nvtx` flag, or `GPT2RT_NVTX=1`) attaches NVTX ranges and
    /// says on stderr whether a tool receives them.
    fn load_with(&self, nvtx: bool) -> gpt2rt::Result<Engine> {
        let engine = Engine::load(&EngineOptions {
            model_dir: self.model.clone(),
            builtin: Preset::parse(&self.builtin)?,
            seed: 0,
            backend: BackendKind::parse(&self.backend)?,
            device: self.device,
            dtype: self.dtype.as_deref().map(DType::parse).transpose()?,
            num_threads: self.threads,
            engine_file: self.engine.clone(),
            nvtx,
        })?;
        if nvtx || gpt2rt::nvtx::requested_by_env() {
            eprintln!("{}", gpt2rt::nvtx::enable());
        }
        Ok(engine)
    }
}

#[derive(Args, Clone, Copy)]
struct ProfileArgs {
    /// Emit NVTX ranges (gpt2rt generate / prefill / step / select / read_logits, CUDA copies) for
    /// Nsight Systems (`nsys profile`); GPT2RT_NVTX=1 does the same.
    #[arg(long)]
    nvtx: bool,
}

#[derive(Args)]
struct GenerateArgs {
    #[command(flatten)]
    engine: EngineArgs,
    #[command(flatten)]
    profile: ProfileArgs,
    #[arg(long, default_value_t = 32)]
    max_new_tokens: usize,
    /// A file with one prompt per line, added to the batch.
    #[arg(long)]
    batch_file: Option<PathBuf>,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Token id that ends a sequence (repeatable).
    #[arg(long = "stop-token")]
    stop_tokens: Vec<u32>,
    /// Recompute the whole sequence every step (the original study's path).
    #[arg(long)]
    no_kv_cache: bool,
    /// Print the generated token ids, one line per sequence, instead of text.
    #[arg(long)]
    print_tokens: bool,
    /// Write a JSON record here: each sequence's prompt ids and generated ids, and the full logits
    /// after the prefill and after the last step (what tools/export_onnx.py --validate compares).
    #[arg(long)]
    json: Option<PathBuf>,
    /// Prompts; default "Hello, my name is".
    prompts: Vec<String>,
}

#[derive(Args)]
struct SynthArgs {
    #[arg(long)]
    out: PathBuf,
    /// distilgpt2, gpt2 or tiny.
    #[arg(long, default_value = "distilgpt2")]
    config: String,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// f32, f16 or bf16.
    #[arg(long, default_value = "f32")]
    dtype: String,
}

#[derive(Args)]
struct BenchArgs {
    #[command(flatten)]
    engine: EngineArgs,
    #[command(flatten)]
    profile: ProfileArgs,
    /// Batch sizes (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "1,8,16")]
    batches: Vec<usize>,
    /// New-token counts (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "8,12,16,32")]
    new_tokens: Vec<usize>,
    /// Prompt length in tokens.
    #[arg(long, default_value_t = 12)]
    prompt_len: usize,
    /// Timed repetitions per cell (the median is reported), at least 1.
    #[arg(long, default_value_t = 5, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    reps: usize,
    /// Skip the KV-cache-off column.
    #[arg(long)]
    no_kv_off: bool,
    /// Write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write the markdown table here too.
    #[arg(long)]
    markdown: Option<PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // GPT2RT_LOG=error|warn|info|debug prints the library's log messages up to that level to stderr.
    let level = match std::env::var("GPT2RT_LOG").as_deref() {
        Ok("error") => Some(LogLevel::Error),
        Ok("warn") => Some(LogLevel::Warn),
        Ok("info") => Some(LogLevel::Info),
        Ok("debug") => Some(LogLevel::Debug),
        _ => None,
    };
    if let Some(max) = level {
        gpt2rt::log::set_sink(Some(Box::new(move |level: LogLevel, message: &str| {
            if level <= max {
                eprintln!("gpt2rt [{level:?}]: {message}");
            }
        })));
    }
    let result = match cli.command {
        Command::Generate(args) => generate(args),
        Command::Synth(args) => synth(args),
        Command::Inspect(args) => inspect(args),
        Command::Bench(args) => bench(args),
        Command::TrtRecipe(args) => trt_command(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gpt2rt: error ({:?}): {e}", e.kind());
            ExitCode::FAILURE
        }
    }
}

fn generate(args: GenerateArgs) -> gpt2rt::Result<()> {
    let mut prompts = args.prompts.clone();
    if let Some(file) = &args.batch_file {
        let text = std::fs::read_to_string(file)
            .map_err(|e| gpt2rt::Error::new(gpt2rt::ErrorKind::Io, format!("{}: {e}", file.display())))?;
        prompts.extend(text.lines().filter(|l| !l.trim().is_empty()).map(str::to_string));
    }
    if prompts.is_empty() {
        prompts.push("Hello, my name is".into());
    }
    let load_start = Instant::now();
    let engine = args.engine.load_with(args.profile.nvtx)?;
    let load_ms = load_start.elapsed().as_secs_f64() * 1e3;
    let tokenizer = engine.tokenizer();
    let encoded = prompts.iter().map(|p| tokenizer.encode(p)).collect::<gpt2rt::Result<Vec<_>>>()?;
    let lengths: Vec<usize> = encoded.iter().map(Vec::len).collect();
    let max_prompt = lengths.iter().copied().max().unwrap_or(0);
    let mut session = engine.new_session(SessionOptions {
        max_batch: prompts.len(),
        max_seq: (max_prompt + args.max_new_tokens).min(engine.limits().max_seq),
        kv_cache: !args.no_kv_cache,
    })?;
    let params = GenerateParams {
        max_new_tokens: args.max_new_tokens,
        sampling: SamplingParams {
            temperature: args.temperature,
            top_k: args.top_k,
            top_p: args.top_p,
            seed: args.seed,
        },
        stop_tokens: args.stop_tokens.clone(),
    };
    let tokens: Vec<u32> = encoded.concat();
    if let Some(path) = &args.json {
        return generate_json(&mut session, &encoded, &params, path);
    }
    let streaming = prompts.len() == 1 && !args.print_tokens;
    let mut stdout = std::io::stdout().lock();
    if streaming {
        let _ = write!(stdout, "{}", prompts[0]);
        let _ = stdout.flush();
    }
    let start = Instant::now();
    let out = session.generate_tokens(&tokens, &lengths, &params, &mut |_, _, piece| {
        if streaming {
            let _ = write!(stdout, "{piece}");
            let _ = stdout.flush();
        }
        true
    })?;
    let elapsed = start.elapsed().as_secs_f64();
    if streaming {
        let _ = writeln!(stdout);
    } else {
        for (prompt, generated) in prompts.iter().zip(&out.tokens) {
            if args.print_tokens {
                let ids: Vec<String> = generated.iter().map(u32::to_string).collect();
                let _ = writeln!(stdout, "{}", ids.join(" "));
            } else {
                let _ = writeln!(stdout, "{prompt}{}", tokenizer.decode(generated)?);
            }
        }
    }
    let produced: usize = out.tokens.iter().map(Vec::len).sum();
    eprintln!(
        "[{}] load {:.0} ms | E2E {:.1} ms for {} new tokens x {} sequences | {:.1} tokens/s | finish: {:?}",
        engine.backend_kind(),
        load_ms,
        elapsed * 1e3,
        args.max_new_tokens,
        prompts.len(),
        produced as f64 / elapsed,
        out.finish_reason
    );
    Ok(())
}

/// `generate --json`: the same decode through the session's verbs, recording the logits of the
/// prefill and of the last step (stop tokens are not applied: every sequence runs to the end).
fn generate_json(
    session: &mut gpt2rt::Session,
    prompts: &[Vec<u32>],
    params: &GenerateParams,
    path: &std::path::Path,
) -> gpt2rt::Result<()> {
    let vocab = session.engine().config().vocab_size;
    let batch = prompts.len();
    let lengths: Vec<usize> = prompts.iter().map(Vec::len).collect();
    session.prefill(&prompts.concat(), &lengths)?;
    let mut logits = vec![0.0f32; batch * vocab];
    session.read_logits(&mut logits)?;
    let prefill_logits = logits.clone();
    let mut generated = vec![Vec::new(); batch];
    let mut next = vec![0u32; batch];
    for produced in 0..params.max_new_tokens {
        if produced > 0 {
            session.step(&next)?;
            session.read_logits(&mut logits)?;
        }
        session.select(&params.sampling, &mut next)?;
        for (seq, &t) in next.iter().enumerate() {
            generated[seq].push(t);
        }
    }
    let rows = |l: &[f32]| l.chunks(vocab).map(<[f32]>::to_vec).collect::<Vec<_>>();
    let doc = serde_json::json!({
        "backend": session.engine().backend_kind().name(),
        "vocab_size": vocab,
        "prompts": prompts,
        "tokens": generated,
        "prefill_logits": rows(&prefill_logits),
        "last_logits": rows(&logits),
    });
    std::fs::write(path, serde_json::to_string(&doc).unwrap_or_default())
        .map_err(|e| gpt2rt::Error::new(gpt2rt::ErrorKind::Io, format!("{}: {e}", path.display())))?;
    eprintln!("wrote {}", path.display());
    Ok(())
}

fn trt_command(args: TrtCommandArgs) -> gpt2rt::Result<()> {
    use gpt2rt::backend::tensorrt::{onnx::OnnxModel, recipe};
    let model = OnnxModel::read(&args.onnx)?;
    let recipe = recipe::plan(
        &model,
        &recipe::RecipeOptions {
            onnx: args.onnx.display().to_string(),
            engine: args.engine_out.map(|p| p.display().to_string()),
            max_batch: args.max_batch,
            max_seq: args.max_seq,
            opt_batch: args.opt_batch,
            opt_seq: args.opt_seq,
            fp16: args.fp16,
        },
    )?;
    print!("{}", recipe.text);
    println!(
        "# then check it: gpt2rt inspect --engine {0} && gpt2rt generate --engine {0} --print-tokens --max-new-tokens 16 \"Hello, my name is\" (compare with --backend cpu --model <the HF directory>)",
        recipe.engine
    );
    Ok(())
}

fn synth(args: SynthArgs) -> gpt2rt::Result<()> {
    let preset = Preset::parse(&args.config)?;
    let dtype = DType::parse(&args.dtype)?;
    let model = Model::synthetic(preset, args.seed);
    write_dir(&args.out, &model.config, &model.weights, dtype, Some(Tokenizer::gpt2_json()))?;
    println!(
        "wrote synthetic {} (seed {}, {}, {} parameters) to {}",
        preset.name(),
        args.seed,
        dtype,
        model.config.param_count(),
        args.out.display()
    );
    Ok(())
}

fn inspect(args: EngineArgs) -> gpt2rt::Result<()> {
    println!("gpt2rt {} (C ABI {})", env!("CARGO_PKG_VERSION"), gpt2rt::ffi::GPT2RT_ABI_VERSION);
    println!("backends on this machine:");
    for (kind, available) in backend_availability() {
        match available {
            Ok(()) => println!("  {kind:<9} available"),
            Err(e) => println!("  {kind:<9} unavailable: {e}"),
        }
    }
    let engine = args.load()?;
    println!("{}", engine.info());
    let limits = engine.limits();
    println!("limits: max_batch {}, max_seq {}", limits.max_batch, limits.max_seq);
    Ok(())
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n % 2 == 1 { values[n / 2] } else { (values[n / 2 - 1] + values[n / 2]) / 2.0 }
}

fn bench(args: BenchArgs) -> gpt2rt::Result<()> {
    let engine = args.engine.load_with(args.profile.nvtx)?;
    let vocab = engine.config().vocab_size as u32;
    let max_new = args.new_tokens.iter().copied().max().unwrap_or(1);
    let kv_modes: &[bool] = if args.no_kv_off { &[true] } else { &[true, false] };
    let cells = args.batches.len() * args.new_tokens.len() * kv_modes.len();
    let bar = ProgressBar::new((cells * (args.reps + 1)) as u64);
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} runs {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut rows = Vec::new();
    for &batch in &args.batches {
        // A fixed pseudo-random prompt per sequence (the study used 12-token prompts).
        let tokens: Vec<u32> = (0..batch * args.prompt_len).map(|i| (i as u32 * 7919 + 13) % vocab).collect();
        let lengths = vec![args.prompt_len; batch];
        for &kv in kv_modes {
            let mut session = engine.new_session(SessionOptions {
                max_batch: batch,
                max_seq: args.prompt_len + max_new,
                kv_cache: kv,
            })?;
            for &new_tokens in &args.new_tokens {
                let params = GenerateParams { max_new_tokens: new_tokens, ..GenerateParams::default() };
                let run = |session: &mut gpt2rt::Session| -> gpt2rt::Result<(f64, Option<f64>)> {
                    session.take_device_ms();
                    let start = Instant::now();
                    session.generate_tokens(&tokens, &lengths, &params, &mut |_, _, _| true)?;
                    let ms = start.elapsed().as_secs_f64() * 1e3;
                    bar.inc(1);
                    bar.set_message(format!(
                        "B={batch} new={new_tokens} kv={}: {ms:.1} ms",
                        if kv { "on" } else { "off" }
                    ));
                    Ok((ms, session.take_device_ms()))
                };
                // E2E with the device timers off (a host does not pay for their events), then
                // the kernel-only time beside it from as many runs with them on, where the
                // backend measures it (CUDA events around each prefill and step graph).
                let mut times = Vec::with_capacity(args.reps);
                for rep in 0..=args.reps {
                    let (ms, _) = run(&mut session)?;
                    if rep > 0 {
                        times.push(ms);
                    }
                }
                let mut device_times = Vec::with_capacity(args.reps);
                session.set_device_timing(true)?;
                bar.inc_length(args.reps as u64 + 1);
                for rep in 0..=args.reps {
                    let Some(device_ms) = run(&mut session)?.1 else {
                        // Not measured by this backend: the one run said so.
                        bar.set_length(bar.length().unwrap_or(0).saturating_sub(args.reps as u64));
                        break;
                    };
                    if rep > 0 {
                        device_times.push(device_ms);
                    }
                }
                session.set_device_timing(false)?;
                let med = median(&mut times);
                let device_med = (!device_times.is_empty()).then(|| median(&mut device_times));
                rows.push(serde_json::json!({
                    "device_median_ms": device_med,
                    "batch": batch,
                    "new_tokens": new_tokens,
                    "prompt_len": args.prompt_len,
                    "kv_cache": kv,
                    "e2e_median_ms": med,
                    "per_token_ms": med / new_tokens as f64,
                    "tokens_per_s": (batch * new_tokens) as f64 / (med / 1e3),
                    "reps": args.reps,
                }));
            }
        }
    }
    bar.finish_and_clear();
    let info = engine.info();
    let mut md = format!(
        "E2E decode latency, median of {} runs (prefill of a {}-token prompt + all steps + token copies); kernels: device time of the forward passes alone (CUDA events), where measured\n\n{}\n| batch | new tokens | KV on (ms) | KV on, kernels (ms) | KV off (ms) | KV on tokens/s |\n|---:|---:|---:|---:|---:|---:|\n",
        args.reps,
        args.prompt_len,
        info.lines().map(|l| format!("- {l}\n")).collect::<String>()
    );
    for &batch in &args.batches {
        for &new_tokens in &args.new_tokens {
            let find = |kv: bool| {
                rows.iter().find(|r| r["batch"] == batch && r["new_tokens"] == new_tokens && r["kv_cache"] == kv)
            };
            let on = find(true).expect("every cell was measured with the KV cache");
            let off =
                find(false).map_or("-".to_string(), |r| format!("{:.2}", r["e2e_median_ms"].as_f64().unwrap_or(0.0)));
            let kernels = on["device_median_ms"].as_f64().map_or("-".to_string(), |ms| format!("{ms:.2}"));
            md.push_str(&format!(
                "| {batch} | {new_tokens} | {:.2} | {kernels} | {off} | {:.0} |\n",
                on["e2e_median_ms"].as_f64().unwrap_or(0.0),
                on["tokens_per_s"].as_f64().unwrap_or(0.0)
            ));
        }
    }
    print!("{md}");
    let io = |e: std::io::Error| gpt2rt::Error::new(gpt2rt::ErrorKind::Io, e.to_string());
    if let Some(path) = &args.markdown {
        std::fs::write(path, &md).map_err(io)?;
    }
    if let Some(path) = &args.json {
        let doc = serde_json::json!({
            "engine": info,
            "backend": engine.backend_kind().name(),
            "reps": args.reps,
            "results": rows,
        });
        std::fs::write(path, serde_json::to_string_pretty(&doc).unwrap_or_default()).map_err(io)?;
    }
    Ok(())
}
