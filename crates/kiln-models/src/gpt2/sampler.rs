//! Choosing the next token from logits: greedy, temperature, top-k, top-p, repetition penalty,
//! with a seeded random generator so that runs are reproducible.
//!
//! The order is the one transformers uses: repetition penalty, temperature, top-k, top-p, then
//! a draw from the renormalised distribution. Greedy (or temperature 0) takes the arg-max after
//! the repetition penalty; ties go to the lowest id, as `torch.argmax` does.
use kiln_tensor::{Error, Result};

/// xoshiro256** (Blackman and Vigna): a small, fast generator with a 2^256 period. Seeded
/// through SplitMix64 so that any `u64` seed, 0 included, gives a good state.
#[derive(Debug, Clone)]
pub struct Rng {
    s: [u64; 4],
}

impl Rng {
    pub fn new(seed: u64) -> Self {
        let mut z = seed;
        let mut next = || {
            z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut x = z;
            x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            x ^ (x >> 31)
        };
        Rng {
            s: [next(), next(), next(), next()],
        }
    }

    /// The generator's whole state (to save and restore a run).
    pub fn state(&self) -> [u64; 4] {
        self.s
    }

    /// A generator continuing from `state` (see [`Rng::state`]). An all-zero state, which
    /// xoshiro256** can never leave, is replaced by `Rng::new(0)`'s.
    pub fn from_state(state: [u64; 4]) -> Self {
        if state == [0; 4] {
            return Rng::new(0);
        }
        Rng { s: state }
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let result = self.s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = self.s[1] << 17;
        self.s[2] ^= self.s[0];
        self.s[3] ^= self.s[1];
        self.s[1] ^= self.s[2];
        self.s[0] ^= self.s[3];
        self.s[2] ^= t;
        self.s[3] = self.s[3].rotate_left(45);
        result
    }

    /// Uniform in `[0, 1)` with 53 random bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// A standard normal draw (Box–Muller; one of the pair is used).
    pub fn next_normal(&mut self) -> f64 {
        let u1 = 1.0 - self.next_f64(); // (0, 1]: ln is finite
        let u2 = self.next_f64();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }
}

/// How tokens are chosen.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplerConfig {
    /// Always take the most likely token (also the case when `temperature == 0`).
    pub greedy: bool,
    /// Logits are divided by this before sampling; must be ≥ 0.
    pub temperature: f32,
    /// Keep only the `k` most likely tokens; 0 keeps all.
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probabilities sum to at least `p`;
    /// 1.0 keeps all. Must be in `(0, 1]`.
    pub top_p: f32,
    /// CTRL's penalty on tokens already in the sequence (prompt included): a positive logit is
    /// divided by it, a negative one multiplied. 1.0 disables it; must be > 0.
    pub repetition_penalty: f32,
    /// Seed of the random generator.
    pub seed: u64,
}

impl Default for SamplerConfig {
    fn default() -> Self {
        SamplerConfig {
            greedy: false,
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            repetition_penalty: 1.0,
            seed: 0,
        }
    }
}

impl SamplerConfig {
    /// Greedy decoding.
    pub fn greedy() -> Self {
        SamplerConfig {
            greedy: true,
            ..Default::default()
        }
    }

    /// Checks the ranges.
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(Error::invalid(format!(
                "temperature must be a finite number ≥ 0, got {}",
                self.temperature
            )));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::invalid(format!(
                "top-p must be in (0, 1], got {}",
                self.top_p
            )));
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return Err(Error::invalid(format!(
                "repetition penalty must be a finite number > 0, got {}",
                self.repetition_penalty
            )));
        }
        Ok(())
    }
}

/// A sampler: its configuration, its random state and a scratch buffer.
#[derive(Debug, Clone)]
pub struct Sampler {
    pub config: SamplerConfig,
    rng: Rng,
    order: Vec<u32>,
    seen: Vec<bool>,
}

impl Sampler {
    pub fn new(config: SamplerConfig) -> Result<Self> {
        config.validate()?;
        Ok(Sampler {
            rng: Rng::new(config.seed),
            config,
            order: Vec::new(),
            seen: Vec::new(),
        })
    }

    /// Picks the next token from `logits` (`[V]`, modified in place); `history` is the sequence
    /// so far (prompt and generated tokens), for the repetition penalty.
    pub fn sample(&mut self, logits: &mut [f32], history: &[u32]) -> Result<u32> {
        if logits.is_empty() {
            return Err(Error::invalid("sampling from empty logits"));
        }
        let cfg = &self.config;
        if cfg.repetition_penalty != 1.0 {
            self.seen.clear();
            self.seen.resize(logits.len(), false);
            for &id in history {
                let i = id as usize;
                if i < logits.len() && !self.seen[i] {
                    self.seen[i] = true;
                    let l = &mut logits[i];
                    *l = if *l > 0.0 {
                        *l / cfg.repetition_penalty
                    } else {
                        *l * cfg.repetition_penalty
                    };
                }
            }
        }
        if cfg.greedy || cfg.temperature == 0.0 {
            return argmax(logits);
        }
        let inv_t = 1.0 / cfg.temperature;
        // Candidates sorted by logit, highest first (ties by id), cut to the top k.
        self.order.clear();
        self.order
            .extend((0..logits.len() as u32).filter(|&i| !logits[i as usize].is_nan()));
        if self.order.is_empty() {
            return Err(Error::invalid("every logit is NaN"));
        }
        let by_logit = |a: &u32, b: &u32| {
            logits[*b as usize]
                .total_cmp(&logits[*a as usize])
                .then(a.cmp(b))
        };
        if cfg.top_k > 0 && cfg.top_k < self.order.len() {
            self.order.select_nth_unstable_by(cfg.top_k - 1, by_logit);
            self.order.truncate(cfg.top_k);
        }
        self.order.sort_unstable_by(by_logit);
        // Softmax of logits / T over the candidates (f64 for the sums).
        let max = logits[self.order[0] as usize] as f64 * inv_t as f64;
        if !max.is_finite() {
            // +inf dominates; -inf everywhere leaves nothing to draw from.
            return if max > 0.0 {
                Ok(self.order[0])
            } else {
                Err(Error::invalid("every logit is -inf"))
            };
        }
        let mut probs: Vec<f64> = self
            .order
            .iter()
            .map(|&i| (logits[i as usize] as f64 * inv_t as f64 - max).exp())
            .collect();
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
        // Top-p: the shortest prefix whose mass reaches p (at least one token).
        let mut keep = probs.len();
        if cfg.top_p < 1.0 {
            let mut acc = 0.0;
            for (i, p) in probs.iter().enumerate() {
                acc += p;
                if acc >= cfg.top_p as f64 {
                    keep = i + 1;
                    break;
                }
            }
        }
        let mass: f64 = probs[..keep].iter().sum();
        let mut u = self.rng.next_f64() * mass;
        for (i, p) in probs[..keep].iter().enumerate() {
            if u < *p {
                return Ok(self.order[i]);
            }
            u -= p;
        }
        Ok(self.order[keep - 1])
    }
}

/// Index of the largest logit (the lowest index among equal ones; NaN never wins).
pub fn argmax(logits: &[f32]) -> Result<u32> {
    let mut best: Option<(usize, f32)> = None;
    for (i, &l) in logits.iter().enumerate() {
        if l.is_nan() {
            continue;
        }
        if best.is_none_or(|(_, b)| l > b) {
            best = Some((i, l));
        }
    }
    best.map(|(i, _)| i as u32)
        .ok_or_else(|| Error::invalid("every logit is NaN"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rng_is_reproducible_and_uniform() {
        let mut a = Rng::new(42);
        let mut b = Rng::new(42);
        let xs: Vec<f64> = (0..10000).map(|_| a.next_f64()).collect();
        assert!(xs.iter().all(|&x| (0.0..1.0).contains(&x)));
        assert_eq!(xs[17], {
            (0..17).for_each(|_| {
                b.next_f64();
            });
            b.next_f64()
        });
        let mean = xs.iter().sum::<f64>() / xs.len() as f64;
        assert!((mean - 0.5).abs() < 0.01, "{mean}");
        let mut r = Rng::new(7);
        let ns: Vec<f64> = (0..20000).map(|_| r.next_normal()).collect();
        let m = ns.iter().sum::<f64>() / ns.len() as f64;
        let v = ns.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / ns.len() as f64;
        assert!(m.abs() < 0.03 && (v - 1.0).abs() < 0.05, "{m} {v}");
    }

    #[test]
    fn greedy_takes_the_first_maximum() {
        let mut s = Sampler::new(SamplerConfig::greedy()).unwrap();
        assert_eq!(s.sample(&mut [1.0, 3.0, 3.0, f32::NAN], &[]).unwrap(), 1);
        assert!(s.sample(&mut [f32::NAN], &[]).is_err());
    }

    #[test]
    fn repetition_penalty_moves_the_argmax() {
        let cfg = SamplerConfig {
            repetition_penalty: 2.0,
            ..SamplerConfig::greedy()
        };
        let mut s = Sampler::new(cfg).unwrap();
        // 3.0 / 2 < 2.0, and -1.0 * 2 is lower still.
        assert_eq!(s.sample(&mut [3.0, 2.0, -1.0], &[0, 0, 2]).unwrap(), 1);
    }

    #[test]
    fn top_k_and_top_p_restrict_the_draws() {
        let logits = [0.0f32, 1.0, 2.0, 3.0, 4.0];
        let draw = |cfg: SamplerConfig| {
            let mut s = Sampler::new(cfg).unwrap();
            (0..2000)
                .map(|_| s.sample(&mut logits.clone(), &[]).unwrap())
                .collect::<Vec<_>>()
        };
        let k2 = draw(SamplerConfig {
            top_k: 2,
            seed: 1,
            ..Default::default()
        });
        assert!(k2.iter().all(|&i| i == 3 || i == 4));
        assert!(k2.contains(&3) && k2.contains(&4));
        // p(4) = 0.636, p(3) = 0.234: top-p 0.5 keeps only 4, 0.8 keeps 4 and 3.
        let p5 = draw(SamplerConfig {
            top_p: 0.5,
            seed: 2,
            ..Default::default()
        });
        assert!(p5.iter().all(|&i| i == 4));
        let p8 = draw(SamplerConfig {
            top_p: 0.8,
            seed: 3,
            ..Default::default()
        });
        assert!(p8.iter().all(|&i| i == 3 || i == 4) && p8.contains(&3));
        // Plain sampling follows the softmax: token 4 about 63.6 % of the time.
        let all = draw(SamplerConfig {
            seed: 4,
            ..Default::default()
        });
        let f4 = all.iter().filter(|&&i| i == 4).count() as f64 / all.len() as f64;
        assert!((f4 - 0.636).abs() < 0.04, "{f4}");
        // Same seed, same draws.
        let again = draw(SamplerConfig {
            seed: 4,
            ..Default::default()
        });
        assert_eq!(all, again);
    }

    #[test]
    fn low_temperature_approaches_greedy() {
        let mut s = Sampler::new(SamplerConfig {
            temperature: 0.01,
            seed: 9,
            ..Default::default()
        })
        .unwrap();
        for _ in 0..100 {
            assert_eq!(s.sample(&mut [1.0, 1.5, 0.2], &[]).unwrap(), 1);
        }
    }

    #[test]
    fn bad_settings_are_refused() {
        for cfg in [
            SamplerConfig {
                temperature: -1.0,
                ..Default::default()
            },
            SamplerConfig {
                top_p: 0.0,
                ..Default::default()
            },
            SamplerConfig {
                repetition_penalty: 0.0,
                ..Default::default()
            },
        ] {
            assert!(Sampler::new(cfg).is_err());
        }
    }
}
