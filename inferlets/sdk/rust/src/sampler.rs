use serde::Serialize;

use crate::grammar::Matcher;

/// How the host turns a next-token distribution into a token. Every field is optional; an
/// absent one takes the host's default. Temperature 0 is greedy (argmax).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Sampler {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top_k: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_p: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// A grammar matcher's id: sample only what the grammar allows, and advance the matcher
    /// (see [`crate::grammar`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub matcher: Option<u32>,
}

impl Sampler {
    /// Argmax.
    pub fn greedy() -> Sampler {
        Sampler::new(0.0)
    }

    pub fn new(temperature: f64) -> Sampler {
        Sampler { temperature: Some(temperature), ..Sampler::default() }
    }

    pub fn with_top_k(mut self, top_k: u32) -> Sampler {
        self.top_k = Some(top_k);
        self
    }

    pub fn with_top_p(mut self, top_p: f64) -> Sampler {
        self.top_p = Some(top_p);
        self
    }

    pub fn with_min_p(mut self, min_p: f64) -> Sampler {
        self.min_p = Some(min_p);
        self
    }

    pub fn with_seed(mut self, seed: u64) -> Sampler {
        self.seed = Some(seed);
        self
    }

    /// Constrain sampling to what `matcher`'s grammar allows next.
    pub fn with_matcher(mut self, matcher: &Matcher) -> Sampler {
        self.matcher = Some(matcher.id());
        self
    }

    /// The sampler for step `step` of a generation: a seed applies per call on the host, so
    /// each step gets `(seed + step) mod 2^63` to draw fresh (and still reproducible)
    /// randomness — the same seeds the host's own generation loop uses.
    pub fn for_step(&self, step: u64) -> Sampler {
        let mut sampler = self.clone();
        sampler.seed = self.seed.map(|seed| ((seed as u128 + step as u128) % (1u128 << 63)) as u64);
        sampler
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_seeds_advance_and_wrap_below_2_pow_63() {
        assert_eq!(Sampler::greedy().for_step(5).seed, None);
        assert_eq!(Sampler::new(1.0).with_seed(7).for_step(3).seed, Some(10));
        assert_eq!(Sampler::new(1.0).with_seed((1 << 63) - 1).for_step(2).seed, Some(1));
        assert_eq!(Sampler::new(1.0).with_seed(u64::MAX).for_step(1).seed, Some(0));
    }
}
