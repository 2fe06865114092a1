//! The CPU reference backend: f32, KV cache, multithreaded on one documented worker pool.
//!
//! Threads: each CPU engine owns one rayon pool of `num_threads` workers (named `gpt2rt-cpu-N`),
//! started when the engine is created and joined when the last session and the engine are gone.
//! No other thread is ever started.
//!
//! Every element of every matmul is accumulated in a fixed order that does not depend on the
//! thread count, so results are bit-identical across machines with the same `num_threads` or not.

use super::{Backend, BackendKind, BackendState, History, Profile};
use crate::error::Result;
use crate::memory::{ensure_host_memory, human};
use crate::model::{LayerWeights, Model, ModelConfig};
use crate::sampling::Sampler;
use rayon::prelude::*;
use std::sync::Arc;

/// Rows at or below which a linear layer streams the weights once (GEMV-like) instead of packing.
const SMALL_M: usize = 16;

/// The CPU backend of an engine.
#[derive(Debug)]
pub struct CpuBackend {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    model: Arc<Model>,
    pool: rayon::ThreadPool,
}

impl CpuBackend {
    /// `num_threads = 0` uses one worker per available core.
    pub fn new(model: Arc<Model>, num_threads: usize) -> Result<Self> {
        let threads =
            if num_threads == 0 { std::thread::available_parallelism().map_or(1, |n| n.get()) } else { num_threads };
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("gpt2rt-cpu-{i}"))
            .build()
            .map_err(|e| err!(Internal, "cannot start the CPU worker pool: {e}"))?;
        Ok(Self { shared: Arc::new(Shared { model, pool }) })
    }
}

impl Backend for CpuBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Cpu
    }

    fn config(&self) -> &ModelConfig {
        &self.shared.model.config
    }

    fn limits(&self) -> Profile {
        Profile { max_batch: 256, max_seq: self.shared.model.config.n_positions }
    }

    fn describe(&self) -> String {
        format!("cpu (f32, {} worker threads)", self.shared.pool.current_num_threads())
    }

    fn new_state(&self, profile: Profile, kv_cache: bool) -> Result<Box<dyn BackendState>> {
        Ok(Box::new(CpuState::new(self.shared.clone(), profile, kv_cache)?))
    }
}

/// Where each row of the activations comes from.
#[derive(Debug, Clone, Copy, Default)]
struct RowMeta {
    seq: u32,
    pos: u32,
}

#[derive(Debug)]
struct CpuState {
    shared: Arc<Shared>,
    profile: Profile,
    kv_cache: bool,
    /// Keys and values: `[layer][seq][pos][n_embd]`.
    k_cache: Vec<f32>,
    v_cache: Vec<f32>,
    /// Tokens of each sequence so far (`[seq][pos]`), needed to recompute when the cache is off.
    history: History,
    rows: Vec<RowMeta>,
    /// `(seq, row)` of the last row of each sequence in the current forward pass.
    last_rows: Vec<(u32, u32)>,
    x: Vec<f32>,
    xn: Vec<f32>,
    qkv: Vec<f32>,
    att: Vec<f32>,
    hidden4: Vec<f32>,
    scores: Vec<f32>,
    last_hidden: Vec<f32>,
    logits: Vec<f32>,
}

fn zeroed(len: usize, what: &str) -> Result<Vec<f32>> {
    let mut v = Vec::new();
    v.try_reserve_exact(len)
        .map_err(|_| err!(OutOfMemory, "cannot allocate {} for the {what}", human(len as u128 * 4)))?;
    v.resize(len, 0.0);
    Ok(v)
}

/// Host bytes of a CPU session of `profile`: every buffer [`CpuState`] allocates, plus what the
/// decoder and the C ABI keep per session (token histories, sampler scratch). Computed in 128 bits,
/// so no profile can overflow it.
fn session_bytes(cfg: &ModelConfig, profile: Profile) -> (u128, u128) {
    let (l, c, v) = (cfg.n_layer as u128, cfg.n_embd as u128, cfg.vocab_size as u128);
    let (b, s) = (profile.max_batch as u128, profile.max_seq as u128);
    let rows = b.max(s);
    let kv = 2 * l * b * s * c * 4;
    // x, xn, att (c each), qkv (3c), hidden4 (4c); scores; last hidden states and logits.
    let activations = (rows * 10 * c + rows * s + b * c + b * v) * 4;
    // Row metadata; the tokens of each sequence (backend history and the C ABI's prompt buffer);
    // the sampler's order and probabilities.
    let bookkeeping = rows * 8 + 2 * b * s * 4 + 8 * v;
    (kv + activations + bookkeeping, kv)
}

impl CpuState {
    fn new(shared: Arc<Shared>, profile: Profile, kv_cache: bool) -> Result<Self> {
        let cfg = &shared.model.config;
        let (b, s, c) = (profile.max_batch, profile.max_seq, cfg.n_embd);
        let (needed, kv) = session_bytes(cfg, profile);
        let what = format!("a CPU session of max_batch {b} x max_seq {s} (KV cache {})", human(kv));
        if needed > isize::MAX as u128 {
            bail!(OutOfMemory, "{what} needs {}, more than this platform can address", human(needed));
        }
        ensure_host_memory(needed, &what)?;
        let rows_cap = b.max(s);
        let kv_len = cfg
            .n_layer
            .checked_mul(b)
            .and_then(|n| n.checked_mul(s))
            .and_then(|n| n.checked_mul(c))
            .ok_or_else(|| err!(OutOfMemory, "KV cache size overflows"))?;
        Ok(Self {
            k_cache: zeroed(kv_len, "KV cache")?,
            v_cache: zeroed(kv_len, "KV cache")?,
            history: History::new(profile),
            rows: vec![RowMeta::default(); rows_cap],
            last_rows: Vec::with_capacity(b),
            x: zeroed(rows_cap * c, "activations")?,
            xn: zeroed(rows_cap * c, "activations")?,
            qkv: zeroed(rows_cap * 3 * c, "activations")?,
            att: zeroed(rows_cap * c, "activations")?,
            hidden4: zeroed(rows_cap * 4 * c, "activations")?,
            scores: zeroed(rows_cap * s, "attention scores")?,
            last_hidden: zeroed(b * c, "activations")?,
            logits: zeroed(b * cfg.vocab_size, "logits")?,
            shared,
            profile,
            kv_cache,
        })
    }

    /// Recomputes sequence `seq` from its history (`kv_cache = off`, and prefill).
    fn run_sequence(&mut self, seq: usize) {
        let len = self.history.len(seq);
        for (p, meta) in self.rows[..len].iter_mut().enumerate() {
            *meta = RowMeta { seq: seq as u32, pos: p as u32 };
        }
        self.last_rows.clear();
        self.last_rows.push((seq as u32, len as u32 - 1));
        self.forward(len);
    }

    /// Runs `n_rows` rows described by `self.rows`, writing their K/V into the cache and the logits
    /// of `self.last_rows` into their sequences' logits rows.
    fn forward(&mut self, n_rows: usize) {
        let shared = self.shared.clone();
        let model = &shared.model;
        shared.pool.install(|| self.forward_in_pool(model, n_rows));
    }

    fn forward_in_pool(&mut self, model: &Model, n: usize) {
        let cfg = &model.config;
        let w = &model.weights;
        let c = cfg.n_embd;
        let rows = &self.rows[..n];
        for (r, meta) in rows.iter().enumerate() {
            let tok = self.history.token(meta.seq as usize, meta.pos as usize) as usize;
            let (te, pe) = (&w.wte[tok * c..][..c], &w.wpe[meta.pos as usize * c..][..c]);
            for ((x, a), b) in self.x[r * c..][..c].iter_mut().zip(te).zip(pe) {
                *x = a + b;
            }
        }
        for (l, lw) in w.layers.iter().enumerate() {
            self.block(cfg, l, lw, n);
        }
        let eps = cfg.layer_norm_epsilon;
        for (i, &(_, row)) in self.last_rows.iter().enumerate() {
            layer_norm(
                &self.x[row as usize * c..][..c],
                &w.ln_f_weight,
                &w.ln_f_bias,
                eps,
                &mut self.last_hidden[i * c..][..c],
            );
        }
        let m = self.last_rows.len();
        let first_seq = self.last_rows[0].0 as usize;
        let v = cfg.vocab_size;
        lm_head(&self.last_hidden[..m * c], m, c, w.lm_head(), v, &mut self.logits[first_seq * v..][..m * v]);
    }

    fn block(&mut self, cfg: &ModelConfig, l: usize, lw: &LayerWeights, n: usize) {
        let c = cfg.n_embd;
        let eps = cfg.layer_norm_epsilon;
        layer_norm_rows(&self.x[..n * c], &lw.ln_1_weight, &lw.ln_1_bias, eps, &mut self.xn[..n * c]);
        linear(&self.xn[..n * c], n, c, &lw.attn_weight, 3 * c, &lw.attn_bias, &mut self.qkv[..n * 3 * c]);

        let (s, b_cap) = (self.profile.max_seq, self.profile.max_batch);
        let layer_base = l * b_cap * s * c;
        for (r, meta) in self.rows[..n].iter().enumerate() {
            let at = layer_base + (meta.seq as usize * s + meta.pos as usize) * c;
            let qkv = &self.qkv[r * 3 * c..][..3 * c];
            self.k_cache[at..at + c].copy_from_slice(&qkv[c..2 * c]);
            self.v_cache[at..at + c].copy_from_slice(&qkv[2 * c..]);
        }

        let heads = cfg.n_head;
        let d = cfg.head_dim();
        let scale = 1.0 / (d as f32).sqrt();
        let (k_cache, v_cache, qkv, rows) = (&self.k_cache, &self.v_cache, &self.qkv, &self.rows);
        self.att[..n * c].par_chunks_mut(c).zip(self.scores.par_chunks_mut(s)).enumerate().for_each(
            |(r, (out, scores))| {
                let meta = rows[r];
                let ctx = meta.pos as usize + 1;
                let seq_base = layer_base + meta.seq as usize * s * c;
                for h in 0..heads {
                    let q = &qkv[r * 3 * c + h * d..][..d];
                    let mut max = f32::NEG_INFINITY;
                    for (t, score) in scores[..ctx].iter_mut().enumerate() {
                        let k = &k_cache[seq_base + t * c + h * d..][..d];
                        *score = dot(q, k) * scale;
                        max = max.max(*score);
                    }
                    let mut sum = 0.0;
                    for score in &mut scores[..ctx] {
                        *score = (*score - max).exp();
                        sum += *score;
                    }
                    let inv = 1.0 / sum;
                    let o = &mut out[h * d..][..d];
                    o.fill(0.0);
                    for (t, &p) in scores[..ctx].iter().enumerate() {
                        let v = &v_cache[seq_base + t * c + h * d..][..d];
                        let p = p * inv;
                        for (o, v) in o.iter_mut().zip(v) {
                            *o += p * v;
                        }
                    }
                }
            },
        );

        linear(&self.att[..n * c], n, c, &lw.attn_proj_weight, c, &lw.attn_proj_bias, &mut self.xn[..n * c]);
        add_in_place(&mut self.x[..n * c], &self.xn[..n * c]);
        layer_norm_rows(&self.x[..n * c], &lw.ln_2_weight, &lw.ln_2_bias, eps, &mut self.xn[..n * c]);
        linear(&self.xn[..n * c], n, c, &lw.fc_weight, 4 * c, &lw.fc_bias, &mut self.hidden4[..n * 4 * c]);
        self.hidden4[..n * 4 * c]
            .par_chunks_mut(4096)
            .for_each(|chunk| chunk.iter_mut().for_each(|x| *x = gelu_new(*x)));
        linear(&self.hidden4[..n * 4 * c], n, 4 * c, &lw.mlp_proj_weight, c, &lw.mlp_proj_bias, &mut self.xn[..n * c]);
        add_in_place(&mut self.x[..n * c], &self.xn[..n * c]);
    }
}

impl BackendState for CpuState {
    fn prefill(&mut self, tokens: &[u32], lengths: &[usize]) -> Result<()> {
        self.history.store_prompts(tokens, lengths);
        for seq in 0..self.history.batch() {
            self.run_sequence(seq);
        }
        Ok(())
    }

    fn step(&mut self, tokens: &[u32]) -> Result<()> {
        self.history.append(tokens);
        if !self.kv_cache {
            for seq in 0..self.history.batch() {
                self.run_sequence(seq);
            }
            return Ok(());
        }
        self.last_rows.clear();
        for seq in 0..self.history.batch() {
            let pos = self.history.len(seq) - 1;
            self.rows[seq] = RowMeta { seq: seq as u32, pos: pos as u32 };
            self.last_rows.push((seq as u32, seq as u32));
        }
        self.forward(self.history.batch());
        Ok(())
    }

    fn read_logits(&mut self, out: &mut [f32]) -> Result<()> {
        out.copy_from_slice(&self.logits[..out.len()]);
        Ok(())
    }

    fn select(&mut self, sampler: &mut Sampler, out: &mut [u32]) -> Result<()> {
        let v = self.shared.model.config.vocab_size;
        for (b, o) in out.iter_mut().enumerate() {
            *o = sampler.select(b, &self.logits[b * v..][..v]);
        }
        Ok(())
    }
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    // Eight independent partial sums: vectorisable, and a fixed order.
    let mut acc = [0.0f32; 8];
    let chunks = a.len() / 8 * 8;
    for (ca, cb) in a[..chunks].chunks_exact(8).zip(b[..chunks].chunks_exact(8)) {
        for i in 0..8 {
            acc[i] += ca[i] * cb[i];
        }
    }
    let mut sum = acc.iter().sum::<f32>();
    for (x, y) in a[chunks..].iter().zip(&b[chunks..]) {
        sum += x * y;
    }
    sum
}

fn add_in_place(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

/// GPT-2's `gelu_new` (tanh approximation).
fn gelu_new(x: f32) -> f32 {
    const K: f32 = 0.797_884_6; // sqrt(2 / pi)
    0.5 * x * (1.0 + (K * (x + 0.044_715 * x * x * x)).tanh())
}

fn layer_norm(x: &[f32], weight: &[f32], bias: &[f32], eps: f32, out: &mut [f32]) {
    let n = x.len() as f32;
    let mean = x.iter().sum::<f32>() / n;
    let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
    let inv = 1.0 / (var + eps).sqrt();
    for (((o, v), w), b) in out.iter_mut().zip(x).zip(weight).zip(bias) {
        *o = (v - mean) * inv * w + b;
    }
}

fn layer_norm_rows(x: &[f32], weight: &[f32], bias: &[f32], eps: f32, out: &mut [f32]) {
    let c = weight.len();
    out.par_chunks_mut(c).zip(x.par_chunks(c)).for_each(|(o, x)| layer_norm(x, weight, bias, eps, o));
}

/// A raw pointer that may cross to worker threads; users write disjoint regions only.
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

/// Columns per parallel task of a linear layer.
fn column_chunk(n: usize) -> usize {
    let tasks = rayon::current_num_threads() * 4;
    n.div_ceil(tasks).next_multiple_of(64).clamp(64, 1024)
}

/// `out[m, n] = x[m, k] @ w[k, n] + bias[n]`, `w` row-major (`Conv1D` layout).
fn linear(x: &[f32], m: usize, k: usize, w: &[f32], n: usize, bias: &[f32], out: &mut [f32]) {
    assert!(x.len() >= m * k && w.len() == k * n && bias.len() == n && out.len() >= m * n);
    let chunk = column_chunk(n);
    let out_ptr = SendPtr(out.as_mut_ptr());
    (0..n.div_ceil(chunk)).into_par_iter().for_each(|ci| {
        let j0 = ci * chunk;
        let nj = chunk.min(n - j0);
        let p = out_ptr;
        // SAFETY: task `ci` writes only columns j0..j0+nj of each of the m rows of `out`, which the
        // assert above shows are in bounds; tasks' column ranges are disjoint.
        let block = |i: usize| unsafe { std::slice::from_raw_parts_mut(p.0.add(i * n + j0), nj) };
        for i in 0..m {
            block(i).copy_from_slice(&bias[j0..j0 + nj]);
        }
        if m <= SMALL_M {
            // Stream each weight row once; every output accumulates in k order.
            for kk in 0..k {
                let wrow = &w[kk * n + j0..][..nj];
                for i in 0..m {
                    let a = x[i * k + kk];
                    for (o, wv) in block(i).iter_mut().zip(wrow) {
                        *o += a * wv;
                    }
                }
            }
        } else {
            // SAFETY: the strides describe x as m x k, w's column block as k x nj and out's column
            // block as m x nj, all in bounds per the assert above.
            unsafe {
                matrixmultiply::sgemm(
                    m,
                    k,
                    nj,
                    1.0,
                    x.as_ptr(),
                    k as isize,
                    1,
                    w.as_ptr().add(j0),
                    n as isize,
                    1,
                    1.0,
                    p.0.add(j0),
                    n as isize,
                    1,
                );
            }
        }
    });
}

/// `logits[m, v] = hidden[m, c] @ head[v, c]^T`, parallel over vocabulary blocks.
fn lm_head(hidden: &[f32], m: usize, c: usize, head: &[f32], v: usize, logits: &mut [f32]) {
    let chunk = column_chunk(v);
    let out_ptr = SendPtr(logits.as_mut_ptr());
    assert!(hidden.len() == m * c && head.len() == v * c && logits.len() == m * v);
    (0..v.div_ceil(chunk)).into_par_iter().for_each(|ci| {
        let j0 = ci * chunk;
        let nj = chunk.min(v - j0);
        let p = out_ptr;
        for i in 0..m {
            let h = &hidden[i * c..][..c];
            for j in j0..j0 + nj {
                // SAFETY: element (i, j) is in bounds (assert above) and column j belongs to this
                // task alone.
                unsafe { *p.0.add(i * v + j) = dot(h, &head[j * c..][..c]) };
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linear_matches_a_naive_matmul_in_both_paths() {
        for m in [1, 3, SMALL_M + 5] {
            let (k, n) = (70, 200);
            let x: Vec<f32> = (0..m * k).map(|i| ((i * 7 % 13) as f32 - 6.0) * 0.1).collect();
            let w: Vec<f32> = (0..k * n).map(|i| ((i * 5 % 11) as f32 - 5.0) * 0.01).collect();
            let bias: Vec<f32> = (0..n).map(|i| i as f32 * 0.001).collect();
            let mut out = vec![0.0; m * n];
            linear(&x, m, k, &w, n, &bias, &mut out);
            for i in 0..m {
                for j in 0..n {
                    let want: f32 = bias[j] + (0..k).map(|kk| x[i * k + kk] * w[kk * n + j]).sum::<f32>();
                    assert!((out[i * n + j] - want).abs() < 1e-4, "m={m} ({i},{j})");
                }
            }
        }
    }

    #[test]
    fn session_size_counts_every_buffer() {
        // distilgpt2 at the CPU limits: 6 layers x 256 x 1024 x 768 x 2 (K and V) x 4 bytes.
        let cfg = crate::model::Preset::DistilGpt2.config();
        let (total, kv) = session_bytes(&cfg, Profile { max_batch: 256, max_seq: 1024 });
        assert_eq!(kv, 9_663_676_416);
        assert!(total > kv && total < kv + (100 << 20), "{total}");
        // What an 8 GiB machine answers.
        let e = crate::memory::check_host_memory(total, Some(8 << 30), &"s").unwrap_err();
        assert_eq!(e.kind(), crate::ErrorKind::OutOfMemory);
    }

    #[test]
    fn layer_norm_normalises() {
        let x = [1.0, 2.0, 3.0, 4.0];
        let mut out = [0.0; 4];
        layer_norm(&x, &[1.0; 4], &[0.5; 4], 1e-5, &mut out);
        let mean: f32 = out.iter().sum::<f32>() / 4.0;
        assert!((mean - 0.5).abs() < 1e-6);
        assert!((out[3] - 0.5 - 1.341_636).abs() < 1e-4, "{out:?}");
    }

    #[test]
    fn gelu_new_matches_known_values() {
        assert_eq!(gelu_new(0.0), 0.0);
        assert!((gelu_new(1.0) - 0.841_192).abs() < 1e-5);
        assert!((gelu_new(-1.0) + 0.158_808).abs() < 1e-5);
    }
}
