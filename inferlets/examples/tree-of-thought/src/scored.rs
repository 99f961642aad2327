//! Generation that also scores what it samples by the model's own log-probability: every step
//! asks the forward for the sampled token and the top-k distribution it came from, so the score
//! costs no extra forward.

use inferlet::{join_all, Context, Distribution, Error, Generation, Result, StepOptions};

/// The log-probabilities of a generation's sampled tokens (the stop token included).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Score {
    pub logprob: f64,
    pub tokens: usize,
}

impl Score {
    /// Mean log-probability per token (0 before the first token).
    pub fn mean(&self) -> f64 {
        if self.tokens == 0 {
            0.0
        } else {
            self.logprob / self.tokens as f64
        }
    }

    pub fn add(&mut self, other: Score) {
        self.logprob += other.logprob;
        self.tokens += other.tokens;
    }
}

/// Advance every unfinished generation by one token per round, all contexts' steps submitted
/// before waiting (one forward batch when they are on different queues), adding each sampled
/// token's log-probability to its score. A context that reaches the model's context length
/// stops there.
pub fn generate_scored(
    contexts: &mut [Context],
    generations: &mut [Generation],
    scores: &mut [Score],
    top_k: u32,
) -> Result<()> {
    loop {
        let active: Vec<usize> = (0..contexts.len())
            .filter(|&i| !generations[i].is_finished() && !contexts[i].is_full())
            .collect();
        if active.is_empty() {
            return Ok(());
        }
        let steps = contexts
            .iter_mut()
            .enumerate()
            .filter(|(i, _)| active.contains(i))
            .map(|(i, ctx)| {
                let options = StepOptions {
                    sampler: Some(generations[i].next_sampler()),
                    top_k,
                    ..StepOptions::default()
                };
                ctx.step_async(&options)
            })
            .collect::<Result<Vec<_>>>()?;
        let outputs = join_all(steps)?;
        for (&i, output) in active.iter().zip(&outputs) {
            let token =
                output.token.ok_or_else(|| Error::Decode("the forward sampled no token".into()))?;
            scores[i].logprob += token_logprob(output.dist.as_ref(), token);
            scores[i].tokens += 1;
            generations[i].accept(token)?;
        }
    }
}

/// The log-probability of `token` under the top-k distribution; a token outside the top k gets
/// the k-th probability (an upper bound on its own).
fn token_logprob(dist: Option<&Distribution>, token: u32) -> f64 {
    let dist = match dist {
        Some(dist) if !dist.probs.is_empty() => dist,
        _ => return 0.0,
    };
    let prob = dist
        .iter()
        .find(|&(id, _)| id == token)
        .map(|(_, prob)| prob)
        .unwrap_or_else(|| dist.probs[dist.probs.len() - 1]);
    f64::from(prob.max(f32::MIN_POSITIVE)).ln()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logprob_of_a_listed_and_an_unlisted_token() {
        let dist = Distribution { ids: vec![5, 7], probs: vec![0.5, 0.25] };
        assert!((token_logprob(Some(&dist), 5) - 0.5f64.ln()).abs() < 1e-9);
        assert!((token_logprob(Some(&dist), 9) - 0.25f64.ln()).abs() < 1e-9);
        assert_eq!(token_logprob(None, 9), 0.0);
    }

    #[test]
    fn mean_per_token() {
        let mut score = Score { logprob: -2.0, tokens: 4 };
        score.add(Score { logprob: -1.0, tokens: 2 });
        assert_eq!(score.mean(), -0.5);
        assert_eq!(Score::default().mean(), 0.0);
    }
}
