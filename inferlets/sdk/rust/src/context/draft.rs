//! Drafted tokens: one forward with outputs at several pending tokens, and rewinding the tokens
//! a check rejected. What speculative decoding needs: fill the drafts after the last pending
//! token, [`step_many`](Context::step_many) reads the model's choice after each of them in one
//! pass, and [`truncate`](Context::truncate) drops the drafts it disagreed with.

use super::{Context, StepOptions, StepOutput};
use crate::error::{Error, Result};
use crate::forward;

impl Context {
    /// Forward every pending token with outputs at the last `outputs` of them (in order), and
    /// wait. Unlike [`step`](Context::step), nothing is filled: every pending token is in the
    /// KV cache afterwards, and the sampled tokens (one per output, when a sampler is given)
    /// are only returned. A seed applies to every output alike.
    pub fn step_many(&mut self, outputs: usize, options: &StepOptions) -> Result<Vec<StepOutput>> {
        let consumed = self.pending.len();
        if outputs == 0 || outputs > consumed {
            return Err(Error::usage(format!(
                "cannot ask for {} outputs over {} pending tokens",
                outputs, consumed
            )));
        }
        let mut plan = self.plan(consumed, Some(options))?;
        plan.request.outputs = ((consumed - outputs) as u32..consumed as u32).collect();
        let output = forward::forward(&plan.request)?;
        let written: Vec<_> = self.pending.drain(..).collect();
        self.kv.extend(written);
        split_outputs(outputs, output.tokens, output.dists)
    }

    /// Keep only the first `len` tokens of the KV cache and drop every pending one; the next
    /// filled token takes the position after the last kept one. Pages past the kept tokens stay
    /// allocated as spares for the next forward (which overwrites their stale rows) and are
    /// freed with the context.
    pub fn truncate(&mut self, len: usize) -> Result<()> {
        if len > self.kv.len() {
            return Err(Error::usage(format!(
                "cannot truncate to {} tokens: the KV cache holds {}",
                len,
                self.kv.len()
            )));
        }
        self.pending.clear();
        self.kv.truncate(len);
        self.next_position = self.kv.last().map_or(0, |slot| slot.position + 1);
        Ok(())
    }
}

fn split_outputs(
    count: usize,
    tokens: Option<Vec<u32>>,
    dists: Option<Vec<forward::Distribution>>,
) -> Result<Vec<StepOutput>> {
    let mut outputs = vec![StepOutput::default(); count];
    if let Some(tokens) = tokens {
        if tokens.len() != count {
            return Err(Error::Decode(format!("expected {} tokens, got {}", count, tokens.len())));
        }
        for (output, token) in outputs.iter_mut().zip(tokens) {
            output.token = Some(token);
        }
    }
    if let Some(dists) = dists {
        if dists.len() != count {
            return Err(Error::Decode(format!("expected {} dists, got {}", count, dists.len())));
        }
        for (output, dist) in outputs.iter_mut().zip(dists) {
            output.dist = Some(dist);
        }
    }
    Ok(outputs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outputs_split_per_position() {
        let outputs = split_outputs(2, Some(vec![7, 9]), None).unwrap();
        assert_eq!(outputs[0].token, Some(7));
        assert_eq!(outputs[1].token, Some(9));
        assert!(outputs[1].dist.is_none());
        assert!(split_outputs(3, Some(vec![7, 9]), None).is_err());
    }
}
