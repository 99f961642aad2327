//! Generation: decode steps until a stop condition, for one context or several at once.

use crate::context::{Context, StepOptions, StepOutput, SubmittedStep};
use crate::error::{Error, Result};
use crate::pending::finish_all;
use crate::sampler::Sampler;
use crate::text::TokenText;
use crate::tokenizer;

/// When a generation ends.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StopCondition {
    /// At most this many sampled tokens (a stop token counts).
    pub max_tokens: usize,
    /// Tokens that end the generation (usually [`Model::stop_tokens`](crate::Model::stop_tokens));
    /// the stop token is not part of the output.
    pub stop_tokens: Vec<u32>,
    /// Texts that end the generation; the output's text ends right before the first one.
    pub stop_strings: Vec<String>,
}

impl StopCondition {
    pub fn new(max_tokens: usize) -> StopCondition {
        StopCondition { max_tokens, ..StopCondition::default() }
    }

    pub fn with_stop_tokens(mut self, tokens: Vec<u32>) -> StopCondition {
        self.stop_tokens = tokens;
        self
    }

    pub fn with_stop_strings(mut self, strings: Vec<String>) -> StopCondition {
        self.stop_strings = strings;
        self
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FinishReason {
    MaxTokens,
    StopToken(u32),
    StopString(String),
}

/// A finished generation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Generated {
    /// The sampled tokens, without the stop token.
    pub tokens: Vec<u32>,
    /// Their text as the host's tokenizer decodes it, cut before a stop string.
    pub text: String,
    pub finish: FinishReason,
}

/// The state of one generation, fed one sampled token at a time. [`Context::generate`] drives
/// one; [`generate_parallel`] drives several whose contexts step in the same tick.
pub struct Generation {
    sampler: Sampler,
    stop: StopCondition,
    streaming: bool,
    tokens: Vec<u32>,
    steps: u64,
    finish: Option<FinishReason>,
    text: Option<TokenText>,
}

impl Generation {
    pub fn new(sampler: &Sampler, stop: &StopCondition) -> Generation {
        let finish = if stop.max_tokens == 0 { Some(FinishReason::MaxTokens) } else { None };
        Generation {
            sampler: sampler.clone(),
            stop: stop.clone(),
            streaming: false,
            tokens: Vec::new(),
            steps: 0,
            finish,
            text: None,
        }
    }

    /// Make [`accept`](Generation::accept) return the text each token completes.
    pub fn streaming(mut self) -> Generation {
        self.streaming = true;
        self
    }

    pub fn is_finished(&self) -> bool {
        self.finish.is_some()
    }

    /// The sampler for the next step (a seed advances by one per step, see
    /// [`Sampler::for_step`]).
    pub fn next_sampler(&self) -> Sampler {
        self.sampler.for_step(self.steps)
    }

    /// The step for the next token: its sampler, and the token's bytes when its text is needed
    /// (streaming, or stop strings to watch), so no vocabulary has to be fetched.
    pub fn next_step(&self) -> StepOptions {
        StepOptions::sample(&self.next_sampler()).with_token_bytes(self.needs_text())
    }

    /// Whether the step after the next one may be submitted before the next is answered: only
    /// a stop token or string (not known yet) would end the generation before it. Not with a
    /// grammar matcher, which each answered step advances: one step too many would advance it
    /// past where the generation ends.
    pub fn continues_after_next(&self) -> bool {
        self.finish.is_none()
            && self.steps + 1 < self.stop.max_tokens as u64
            && self.sampler.matcher.is_none()
    }

    /// The step after the next one (see [`next_step`](Generation::next_step)).
    pub fn step_after_next(&self) -> StepOptions {
        StepOptions::sample(&self.sampler.for_step(self.steps + 1))
            .with_token_bytes(self.needs_text())
    }

    /// The tokens accepted so far (without a stop token).
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// Take the output of a step made with [`next_step`](Generation::next_step): its token,
    /// with its bytes. Returns the text it releases, as [`accept`](Generation::accept) does.
    pub fn accept_step(&mut self, output: &StepOutput) -> Result<String> {
        let token =
            output.token.ok_or_else(|| Error::Decode("the step sampled no token".into()))?;
        self.accept_token(token, output.bytes.as_deref())
    }

    /// Take the next sampled token. Returns the text it releases when streaming (or when stop
    /// strings are watched), else an empty string. Its text comes from the vocabulary, fetched
    /// from the host on first use (one large answer): steps made with
    /// [`next_step`](Generation::next_step) and taken with
    /// [`accept_step`](Generation::accept_step) carry their bytes instead.
    pub fn accept(&mut self, token: u32) -> Result<String> {
        self.accept_token(token, None)
    }

    fn accept_token(&mut self, token: u32, bytes: Option<&[u8]>) -> Result<String> {
        if self.finish.is_some() {
            return Err(Error::usage("the generation has already finished"));
        }
        self.steps += 1;
        if self.stop.stop_tokens.contains(&token) {
            self.finish = Some(FinishReason::StopToken(token));
            return Ok(self.text.as_mut().map(|text| text.finish()).unwrap_or_default());
        }
        self.tokens.push(token);
        let mut released = String::new();
        if self.needs_text() {
            let vocab;
            let bytes = match bytes {
                Some(bytes) => bytes,
                None => {
                    vocab = tokenizer::vocab()?; // fetched once, then cached
                    vocab.bytes(token)?
                }
            };
            let text = self.text.get_or_insert_with(|| TokenText::new(&self.stop.stop_strings));
            let (chunk, stop) = text.push(bytes);
            released = chunk;
            if let Some(stop) = stop {
                self.finish = Some(FinishReason::StopString(stop));
                return Ok(released);
            }
        }
        if self.steps >= self.stop.max_tokens as u64 {
            self.finish = Some(FinishReason::MaxTokens);
            if let Some(text) = self.text.as_mut() {
                released.push_str(&text.finish());
            }
        }
        Ok(released)
    }

    fn needs_text(&self) -> bool {
        self.streaming || !self.stop.stop_strings.is_empty()
    }

    /// The result; the text comes from the host's tokenizer.
    pub fn finish(self) -> Result<Generated> {
        let finish = self.finish.unwrap_or(FinishReason::MaxTokens);
        let mut text = if self.tokens.is_empty() {
            String::new()
        } else {
            tokenizer::detokenize(&self.tokens)?
        };
        if let FinishReason::StopString(stop) = &finish {
            if let Some(at) = text.find(stop.as_str()) {
                text.truncate(at);
            }
        }
        Ok(Generated { tokens: self.tokens, text, finish })
    }

    /// End the generation because the context has no room for another token.
    fn end_for_length(&mut self) -> String {
        self.finish = Some(FinishReason::MaxTokens);
        self.text.as_mut().map(|text| text.finish()).unwrap_or_default()
    }
}

impl Context {
    /// Generate until `stop` or until the model's context is full: the pending tokens (the
    /// prompt) go in the first forward, then one token per forward. The last sampled token (a
    /// stop token too) stays pending, so the conversation can go on.
    pub fn generate(&mut self, sampler: &Sampler, stop: &StopCondition) -> Result<Generated> {
        self.drive(Generation::new(sampler, stop), |_| Ok(()))
    }

    /// [`generate`](Context::generate), handing each piece of new text to `on_text` as soon as
    /// it is complete (characters split across tokens and possible stop strings are held back).
    pub fn generate_streaming<F: FnMut(&str) -> Result<()>>(
        &mut self,
        sampler: &Sampler,
        stop: &StopCondition,
        on_text: F,
    ) -> Result<Generated> {
        self.drive(Generation::new(sampler, stop).streaming(), on_text)
    }

    /// One step ahead: while this thread waits for a token, the step that reads it is in
    /// already (it `feed`s on the token), so the host starts it from the answer and the next
    /// tick has it without waiting for this thread. A generation that ends on a stop token or
    /// string discards that step, so it returns without waiting for it: the step writes only
    /// the pending token's KV row, which the context's next forward (after it on the queue)
    /// writes again.
    fn drive<F: FnMut(&str) -> Result<()>>(
        &mut self,
        mut generation: Generation,
        mut on_text: F,
    ) -> Result<Generated> {
        let mut ahead: Option<SubmittedStep> = None;
        while !generation.is_finished() {
            let step = match ahead.take() {
                Some(step) => step,
                None if self.is_full() => {
                    let text = generation.end_for_length();
                    if !text.is_empty() {
                        on_text(&text)?;
                    }
                    continue;
                }
                None => self.submit_step(&generation.next_step())?,
            };
            if generation.continues_after_next() && self.can_step_ahead() {
                ahead = Some(self.submit_step_ahead(&generation.step_after_next())?);
            }
            let output = self.finish_step(step)?;
            let text = generation.accept_step(&output)?;
            if !text.is_empty() {
                on_text(&text)?;
            }
        }
        if let Some(step) = ahead {
            step.discard()?;
        }
        generation.finish()
    }
}

/// Advance every unfinished generation by one token per round, submitting all their decode
/// steps before waiting so they share each scheduler tick, each one step ahead where it can be
/// (as [`Context::generate`] does). `on_text(i, text)` receives the text released for
/// generation `i` (when it streams). Put the contexts on different queues: one queue runs its
/// requests one after another (and contexts sharing one go one step ahead only in turn, see
/// [`Context::can_step_ahead`]).
pub fn generate_parallel<F: FnMut(usize, &str) -> Result<()>>(
    contexts: &mut [Context],
    generations: &mut [Generation],
    mut on_text: F,
) -> Result<()> {
    if contexts.len() != generations.len() {
        return Err(Error::usage(format!(
            "{} contexts but {} generations",
            contexts.len(),
            generations.len()
        )));
    }
    let mut ahead: Vec<Option<SubmittedStep>> = contexts.iter().map(|_| None).collect();
    loop {
        for (i, (ctx, generation)) in contexts.iter().zip(generations.iter_mut()).enumerate() {
            if ctx.is_full() && !generation.is_finished() {
                let text = generation.end_for_length();
                if !text.is_empty() {
                    on_text(i, &text)?;
                }
            }
        }
        let active: Vec<usize> =
            (0..generations.len()).filter(|&i| !generations[i].is_finished()).collect();
        if active.is_empty() {
            return Ok(());
        }
        let mut steps = Vec::with_capacity(active.len());
        for &i in &active {
            let (ctx, generation) = (&mut contexts[i], &generations[i]);
            let step = match ahead[i].take() {
                Some(step) => step,
                None => ctx.submit_step(&generation.next_step())?,
            };
            if generation.continues_after_next() && ctx.can_step_ahead() {
                ahead[i] = Some(ctx.submit_step_ahead(&generation.step_after_next())?);
            }
            steps.push(step);
        }
        finish_all(steps, |k, step| {
            let i = active[k];
            let taken = contexts[i].finish_step(step).and_then(|output| {
                let text = generations[i].accept_step(&output)?;
                if !text.is_empty() {
                    on_text(i, &text)?;
                }
                Ok(())
            });
            if generations[i].is_finished() {
                // A step ahead of a generation that ended: given up without waiting.
                if let Some(step) = ahead[i].take() {
                    step.discard()?;
                }
            }
            taken
        })?;
    }
}
