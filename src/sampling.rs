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

    /// Copies the sequences' random streams into `into` (room for them: `Sampler::new`'s
    /// `max_batch`), for `restore_streams`.
    pub(crate) fn save_streams(&self, into: &mut Vec<SplitMix64>) {
        into.clear();
        into.extend_from_slice(&self.rngs);
    }

    /// Puts back streams saved by `save_streams` (the draws since then are drawn again).
    pub(crate) fn restore_streams(&mut self, from: &[SplitMix64]) {
        self.rngs.clone_from_slice(from);
    }

    /// Chooses the next token of sequence `b` from its logits row.
    pub fn select(&mut self, b: usize, row: &[f32]) -> u32 {
        match self.draw(b) {
            Some(u) => self.choose(row, u),
            None => argmax(row),
        }
    }

    /// The uniform draw in [0, 1) that sequence `b`'s next token uses, advancing its stream; `None`
    /// when the rules are greedy (nothing is drawn then). Device backends call this and run
    /// [`Sampler::choose`]'s rules in a kernel, so a seed gives the same tokens on every backend.
    pub fn draw(&mut self, b: usize) -> Option<f32> {
        let p = self.params;
        // A temperature so small that 1/t overflows f32 is greedy in the limit (and would otherwise
        // make 0 * inf = NaN probabilities).
        if p.is_greedy() || !(1.0 / p.temperature).is_finite() {
            return None;
        }
        Some(self.rngs[b].next_f32())
    }

    /// Chooses a token from `row` with the uniform draw `u`, by the rules every backend follows:
    /// 1. rank the tokens by logit, larger first, then by smaller id;
    /// 2. keep the first `top_k` of that ranking (0: all), then the shortest prefix of what is kept
    ///    whose probability (softmax of `logit / temperature`) reaches `top_p` of the kept total;
    /// 3. walk the kept tokens in id order, accumulating probability, and return the first one at
    ///    which the running sum exceeds `u` times the kept total.
    ///
    /// Step 3 walks in id order, not rank order, so a device needs no sort: steps 1-2 are thresholds
    /// on the rank, and step 3 is a prefix sum.
    pub fn choose(&mut self, row: &[f32], u: f32) -> u32 {
        let p = self.params;
        let vocab = row.len();
        let inv_t = 1.0 / p.temperature;
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
        let max = order[..kept].iter().map(|&i| row[i as usize]).fold(f32::NEG_INFINITY, f32::max);
        let prob = |i: u32| ((row[i as usize] - max) * inv_t).exp();
        if p.top_p < 1.0 {
            // The shortest prefix of the ranking whose probability reaches top_p (at least one).
            order[..kept].sort_unstable_by(desc);
            let probs = &mut self.probs[..kept];
            let mut total = 0.0f64;
            for (pr, &i) in probs.iter_mut().zip(order.iter()) {
                *pr = prob(i);
                total += *pr as f64;
            }
            let need = p.top_p as f64 * total;
            let mut cumulative = 0.0f64;
            for (n, pr) in probs.iter().enumerate() {
                cumulative += *pr as f64;
                if cumulative >= need {
                    kept = n + 1;
                    break;
                }
            }
        }
        let order = &mut self.order[..kept];
        order.sort_unstable();
        let probs = &mut self.probs[..kept];
        let mut total = 0.0f64;
        for (pr, &i) in probs.iter_mut().zip(order.iter()) {
            *pr = prob(i);
            total += *pr as f64;
        }
        let target = u as f64 * total;
        let mut acc = 0.0f64;
        for (pr, &i) in probs.iter().zip(order.iter()) {
            acc += *pr as f64;
            if acc > target {
                return i;
            }
        }
        order[kept - 1]
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
    fn the_draw_walks_the_kept_tokens_in_id_order() {
        // Probabilities at temperature 1: ids 0..4 with logits ln(1), ln(4), ln(2), ln(3), ln(0.5).
        let row: Vec<f32> = [1.0f32, 4.0, 2.0, 3.0, 0.5].iter().map(|p| p.ln()).collect();
        let mut s = Sampler::new(1, row.len());
        s.set_params(SamplingParams { temperature: 1.0, top_k: 0, top_p: 1.0, seed: 0 });
        // Total 10.5; cumulative in id order: 1, 5, 7, 10, 10.5.
        let at = |s: &mut Sampler, u: f32| s.choose(&row, u);
        assert_eq!(at(&mut s, 0.0), 0);
        assert_eq!(at(&mut s, 0.9 / 10.5), 0);
        assert_eq!(at(&mut s, 1.1 / 10.5), 1);
        assert_eq!(at(&mut s, 6.9 / 10.5), 2);
        assert_eq!(at(&mut s, 9.9 / 10.5), 3);
        assert_eq!(at(&mut s, 10.4 / 10.5), 4);
        // top_k = 2 keeps ids 1 and 3 (mass 4 + 3): id 1 below 4/7, id 3 above.
        s.set_params(SamplingParams { temperature: 1.0, top_k: 2, top_p: 1.0, seed: 0 });
        assert_eq!(at(&mut s, 0.0), 1);
        assert_eq!(at(&mut s, 3.9 / 7.0), 1);
        assert_eq!(at(&mut s, 4.1 / 7.0), 3);
        assert_eq!(at(&mut s, 0.999), 3);
        // top_p = 0.6 of 10.5 = 6.3: the ranking 1 (4), 3 (3) reaches 7 >= 6.3, so ids 1 and 3.
        s.set_params(SamplingParams { temperature: 1.0, top_k: 0, top_p: 0.6, seed: 0 });
        assert_eq!(at(&mut s, 4.1 / 7.0), 3);
        assert_eq!(at(&mut s, 3.9 / 7.0), 1);
        // top_p = 0.95 of 10.5 = 9.975: 4 + 3 + 2 = 9 falls short, + 1 (id 0) = 10 reaches it.
        s.set_params(SamplingParams { temperature: 1.0, top_k: 0, top_p: 0.95, seed: 0 });
        assert_eq!(at(&mut s, 0.0), 0);
        assert_eq!(at(&mut s, 0.9999), 3);
        // Ties rank the smaller id first: top_k = 1 of two equal logits is the first.
        let tie = [2.0f32, 7.0, 7.0, 1.0];
        s.set_params(SamplingParams { temperature: 1.0, top_k: 2, top_p: 1.0, seed: 0 });
        assert_eq!(s.choose(&tie, 0.99), 2);
        s.set_params(SamplingParams { temperature: 1.0, top_k: 0, top_p: 0.4, seed: 0 });
        assert_eq!(s.choose(&tie, 0.99), 1);
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
