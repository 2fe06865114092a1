//! Choosing the next token from logits: greedy, temperature, top-k, top-p, seeded.
//!
//! The host implementation lives here so every backend that keeps logits in host memory (the CPU
//! reference) shares it; device backends implement the same rules in kernels and are tested
//! against this one.

use crate::error::Result;
use crate::model::SplitMix64;

/// How the next token is chosen. `temperature <= 0` (or `top_k == 1`) is greedy.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingParams {
    /// Logits are divided by this before softmax; 0 means greedy (argmax).
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens; 0 disables the filter.
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability reaches `top_p`; 1 disables.
    pub top_p: f32,
    /// Seed of the per-sequence random streams (sequence `b` uses a stream derived from `seed, b`).
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self::greedy()
    }
}

impl SamplingParams {
    pub const fn greedy() -> Self {
        Self { temperature: 0.0, top_k: 0, top_p: 1.0, seed: 0 }
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature <= 0.0 || self.top_k == 1
    }

    pub fn validate(&self) -> Result<()> {
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            bail!(InvalidArgument, "temperature must be a finite number >= 0, got {}", self.temperature);
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            bail!(InvalidArgument, "top_p must be in (0, 1], got {}", self.top_p);
        }
        Ok(())
    }
}

/// Index of the largest value (the first one on ties, like `torch.argmax`). NaN never wins.
pub fn argmax(row: &[f32]) -> u32 {
    let mut best = 0;
    let mut best_value = f32::NEG_INFINITY;
    for (i, &v) in row.iter().enumerate() {
        if v > best_value {
            best_value = v;
            best = i;
        }
    }
    best as u32
}

/// Host sampler: per-sequence random streams and scratch space, allocated once per session.
#[derive(Debug)]
pub struct Sampler {
    params: SamplingParams,
    rngs: Vec<SplitMix64>,
    order: Vec<u32>,
    probs: Vec<f32>,
}

impl Sampler {
    pub fn new(max_batch: usize, vocab_size: usize) -> Self {
        let mut sampler = Self {
            params: SamplingParams::greedy(),
            rngs: Vec::with_capacity(max_batch),
            order: vec![0; vocab_size],
            probs: vec![0.0; vocab_size],
        };
        sampler.rngs.resize(max_batch, SplitMix64::new(0));
        sampler.set_params(SamplingParams::greedy());
        sampler
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Sets the rules and restarts every sequence's random stream from the seed.
    pub fn set_params(&mut self, params: SamplingParams) {
        self.params = params;
        for (b, rng) in self.rngs.iter_mut().enumerate() {
            let mut mix = SplitMix64::new(params.seed ^ (b as u64).wrapping_mul(0xD1B5_4A32_D192_ED03));
            *rng = SplitMix64::new(mix.next_u64());
        }
    }

    /// Chooses the next token of sequence `b` from its logits row.
    pub fn select(&mut self, b: usize, row: &[f32]) -> u32 {
        let p = self.params;
        if p.is_greedy() {
            return argmax(row);
        }
        let vocab = row.len();
        let inv_t = 1.0 / p.temperature;
        if !inv_t.is_finite() {
            // A temperature so small that 1/t overflows f32 is greedy in the limit (and would
            // otherwise make 0 * inf = NaN probabilities).
            return argmax(row);
        }
        let order = &mut self.order[..vocab];
        for (i, o) in order.iter_mut().enumerate() {
            *o = i as u32;
        }
        let desc = |a: &u32, b: &u32| row[*b as usize].total_cmp(&row[*a as usize]).then(a.cmp(b));
        let mut kept = vocab;
        if p.top_k > 0 && p.top_k < vocab {
            order.select_nth_unstable_by(p.top_k - 1, desc);
            kept = p.top_k;
        }
        let sorted_needed = p.top_p < 1.0;
        if sorted_needed {
            order[..kept].sort_unstable_by(desc);
        }
        let max = order[..kept].iter().map(|&i| row[i as usize]).fold(f32::NEG_INFINITY, f32::max);
        let probs = &mut self.probs[..kept];
        let mut total = 0.0f64;
        for (pr, &i) in probs.iter_mut().zip(order.iter()) {
            *pr = ((row[i as usize] - max) * inv_t).exp();
            total += *pr as f64;
        }
        if sorted_needed {
            // Keep the smallest prefix whose probability reaches top_p (at least one token).
            let mut cumulative = 0.0f64;
            let mut cut = kept;
            for (n, pr) in probs.iter().enumerate() {
                cumulative += *pr as f64 / total;
                if cumulative >= p.top_p as f64 {
                    cut = n + 1;
                    break;
                }
            }
            kept = cut;
            total = probs[..kept].iter().map(|&x| x as f64).sum();
        }
        let target = self.rngs[b].next_f32() as f64 * total;
        let mut acc = 0.0f64;
        for (n, pr) in self.probs[..kept].iter().enumerate() {
            acc += *pr as f64;
            if acc > target {
                return self.order[n];
            }
        }
        self.order[kept - 1]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argmax_takes_the_first_maximum_and_ignores_nan() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, 2.0]), 1);
        assert_eq!(argmax(&[f32::NAN, -1.0, -2.0]), 1);
    }

    #[test]
    fn greedy_and_filters() {
        let row = [0.0, 5.0, 4.9, -3.0, 1.0];
        let mut s = Sampler::new(2, row.len());
        assert_eq!(s.select(0, &row), 1);

        // top_k = 2 only ever returns one of the two largest.
        s.set_params(SamplingParams { temperature: 1.0, top_k: 2, top_p: 1.0, seed: 9 });
        let mut seen = [0usize; 5];
        for _ in 0..2000 {
            seen[s.select(0, &row) as usize] += 1;
        }
        assert_eq!(seen[0] + seen[3] + seen[4], 0);
        assert!(seen[1] > 800 && seen[2] > 800, "{seen:?}");

        // top_p small keeps only the most likely token.
        s.set_params(SamplingParams { temperature: 1.0, top_k: 0, top_p: 0.1, seed: 9 });
        assert!((0..200).all(|_| s.select(1, &row) == 1));

        // Plain temperature sampling follows the softmax.
        let flat = [0.0f32, (3.0f32).ln()];
        s.set_params(SamplingParams { temperature: 1.0, top_k: 0, top_p: 1.0, seed: 1 });
        let ones = (0..20_000).filter(|_| s.select(0, &flat) == 1).count();
        assert!((ones as f64 / 20_000.0 - 0.75).abs() < 0.02, "{ones}");
    }

    #[test]
    fn the_seed_reproduces_and_sequences_differ() {
        let row: Vec<f32> = (0..100).map(|i| (i % 7) as f32 * 0.1).collect();
        let params = SamplingParams { temperature: 1.5, top_k: 50, top_p: 0.9, seed: 42 };
        let draw = |b| {
            let mut s = Sampler::new(2, row.len());
            s.set_params(params);
            (0..32).map(|_| s.select(b, &row)).collect::<Vec<_>>()
        };
        assert_eq!(draw(0), draw(0));
        assert_ne!(draw(0), draw(1));
    }

    #[test]
    fn a_vanishing_temperature_is_greedy() {
        let row = [0.5, 3.0, -1.0, 2.0];
        let mut s = Sampler::new(1, row.len());
        for temperature in [1e-39, f32::MIN_POSITIVE, 1e-45] {
            s.set_params(SamplingParams { temperature, top_k: 0, top_p: 0.5, seed: 3 });
            assert!((0..50).all(|_| s.select(0, &row) == 1), "temperature {temperature}");
        }
    }

    #[test]
    fn invalid_params_are_refused() {
        let bad = [
            SamplingParams { temperature: -1.0, ..SamplingParams::greedy() },
            SamplingParams { temperature: f32::NAN, ..SamplingParams::greedy() },
            SamplingParams { top_p: 0.0, ..SamplingParams::greedy() },
            SamplingParams { top_p: 1.5, ..SamplingParams::greedy() },
        ];
        for p in bad {
            assert!(p.validate().is_err(), "{p:?}");
        }
    }
}
