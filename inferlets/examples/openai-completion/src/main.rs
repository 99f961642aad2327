//! openai-completion: the OpenAI API's completions, as one program the server launches per
//! request (`pie_trio/server/openai_api.py`), with a JSON request spec (see `spec.rs`).
//!
//! The prompt is filled and forwarded once. For `n` > 1 the filled context is forked: the forks
//! share its full KV pages (copy-on-write on the host) and re-fill only the partial last page.
//! Every step submits one decode step per unfinished choice before waiting, so the choices
//! advance in the same forward batch, each one step ahead where it can be (the step after the
//! one waited for is in already and reads its token: `Context::submit_step_ahead`), so the
//! host runs it in the next tick without waiting for this program. Each step's text (held
//! back while it might begin a stop string) goes to the client as it is released, with the
//! sampled token's log-probability and its top alternatives when asked (`report.rs`); a
//! grammar (a JSON schema for `response_format`) constrains every choice through its own
//! matcher. Choice i samples with seed S + 1000·i, so choice 0 of any `n` is what `n` = 1
//! gives.

mod json_value;
mod report;
mod spec;

use inferlet::tokenizer::Vocab;
use inferlet::{
    finish_all, Context, FinishReason, Generation, Grammar, Matcher, Model, Queue, Result, Sampler,
    StepOptions, StepOutput, StopCondition, SubmittedStep,
};

use crate::spec::Spec;

/// Seeds of different choices stay apart for this many steps.
const SEED_STRIDE: u64 = 1000;
/// Alternatives asked per step when logprobs are wanted: the sampled token's log-probability
/// is known when it is among them, and reported as OpenAI does (-9999) when it is not.
const LOGPROB_WINDOW: u32 = 20;

/// One of the `n` answers: its context, its generation until it ends, and the text sent.
struct Choice {
    index: usize,
    ctx: Context,
    generation: Option<Generation>,
    matcher: Option<Matcher>,
    sent: String,
    /// The step after the one in flight, submitted ahead (discarded at the end).
    ahead: Option<SubmittedStep>,
}

fn main() {
    inferlet::run(|| {
        let spec = Spec::load()?;
        let model = Model::load()?;
        let vocab = if spec.logprobs.is_some() { Some(model.vocab()?) } else { None };
        let grammar = match &spec.grammar {
            Some(grammar) => Some(Grammar::compile(grammar.kind, &grammar.source)?),
            None => None,
        };
        let mut root = model.new_context();
        // The prompt goes through the model once; with the prefix cache, only what no earlier
        // request with the same start has left behind.
        if spec.prefix_cache {
            let tokens = model.tokenize(&spec.prompt)?;
            root.fill_cached(&tokens)?;
        } else {
            root.fill(&spec.prompt)?;
        }
        let prompt_tokens = root.tokens();
        let mut choices = start_choices(&spec, &model, root, grammar.as_ref())?;
        if spec.echo {
            for choice in &choices {
                echo(&spec, choice.index, &prompt_tokens, vocab.as_deref())?;
            }
        }
        run_steps(&spec, &mut choices, vocab.as_deref())
    })
}

/// The root context as choice 0, and forks of it for the others.
fn start_choices(
    spec: &Spec,
    model: &Model,
    mut root: Context,
    grammar: Option<&Grammar>,
) -> Result<Vec<Choice>> {
    let mut contexts = Vec::with_capacity(spec.n);
    if spec.n > 1 {
        // The prompt goes through the model here, once; each fork shares its full pages.
        root.flush()?;
        for _ in 1..spec.n {
            contexts.push(root.fork_on(Queue::create(0)?)?);
        }
    }
    contexts.insert(0, root);
    let stop_tokens = if spec.ignore_eos { Vec::new() } else { model.stop_tokens().to_vec() };
    let stop = StopCondition::new(spec.max_tokens)
        .with_stop_tokens(stop_tokens)
        .with_stop_strings(spec.stop.clone());
    let mut choices = Vec::with_capacity(spec.n);
    for (index, ctx) in contexts.into_iter().enumerate() {
        let mut sampler = Sampler::new(spec.temperature);
        sampler.top_p = if spec.top_p < 1.0 { Some(spec.top_p) } else { None };
        sampler.seed = spec.seed.map(|s| s.wrapping_add(SEED_STRIDE * index as u64) % (1 << 63));
        let matcher = match grammar {
            Some(grammar) => Some(grammar.matcher()?),
            None => None,
        };
        let generation = Some(Generation::new(&sampler, &stop).streaming());
        choices.push(Choice { index, ctx, generation, matcher, sent: String::new(), ahead: None });
    }
    Ok(choices)
}

/// The prompt's text first (`echo`), with its tokens (their log-probabilities are not computed).
fn echo(spec: &Spec, index: usize, tokens: &[u32], vocab: Option<&Vocab>) -> Result<()> {
    let entries = match vocab {
        Some(vocab) => Some(
            tokens
                .iter()
                .map(|&token| report::prompt_token(vocab, token))
                .collect::<Result<Vec<String>>>()?,
        ),
        None => None,
    };
    report::text(index, &spec.prompt, entries.as_deref())
}

/// Step every unfinished choice together until all have ended.
fn run_steps(spec: &Spec, choices: &mut [Choice], vocab: Option<&Vocab>) -> Result<()> {
    loop {
        for choice in choices.iter_mut() {
            if choice.is_live() && choice.ctx.is_full() {
                choice.end(Some("length"))?;
            }
        }
        let live: Vec<usize> = (0..choices.len()).filter(|&i| choices[i].is_live()).collect();
        if live.is_empty() {
            return Ok(());
        }
        let steps = live.iter().map(|&i| choices[i].submit(spec)).collect::<Result<Vec<_>>>()?;
        finish_all(steps, |k, step| {
            let choice = &mut choices[live[k]];
            choice.ctx.finish_step(step).and_then(|output| choice.take(&output, spec, vocab))
        })?;
    }
}

impl Choice {
    fn is_live(&self) -> bool {
        self.generation.is_some()
    }

    /// This round's step (submitted ahead in the last round, where it was), and the step after
    /// it, ahead, where the generation may go on that far; not with a grammar, whose matcher
    /// each answered step advances.
    fn submit(&mut self, spec: &Spec) -> Result<SubmittedStep> {
        let step = match self.ahead.take() {
            Some(step) => step,
            None => {
                let options = self.step_options(spec, false);
                self.ctx.submit_step(&options)?
            }
        };
        let generation = self.generation.as_ref().expect("only live choices step");
        if self.matcher.is_none() && generation.continues_after_next() && self.ctx.can_step_ahead()
        {
            let options = self.step_options(spec, true);
            self.ahead = Some(self.ctx.submit_step_ahead(&options)?);
        }
        Ok(step)
    }

    /// The options of the next step, or (`ahead`) of the one after it.
    fn step_options(&self, spec: &Spec, ahead: bool) -> StepOptions {
        let generation = self.generation.as_ref().expect("only live choices step");
        // The step carries the token's bytes when the generation needs its text.
        let mut options = if ahead { generation.step_after_next() } else { generation.next_step() };
        if let Some(matcher) = &self.matcher {
            options.sampler = options.sampler.map(|sampler| sampler.with_matcher(matcher));
        }
        if let Some(top) = spec.logprobs {
            options.top_k = top.max(LOGPROB_WINDOW);
        }
        options
    }

    /// Take a step's sampled token: send the text it releases, end the choice if it is done.
    fn take(&mut self, output: &StepOutput, spec: &Spec, vocab: Option<&Vocab>) -> Result<()> {
        let token = output.token.ok_or_else(|| inferlet::Error::Decode("no token".into()))?;
        let generation = self.generation.as_mut().expect("only live choices step");
        let before = generation.tokens().len();
        let text = generation.accept_step(output)?;
        let kept = generation.tokens().len() > before; // a stop token is no part of the answer
        let entry = match (vocab, &output.dist, spec.logprobs) {
            (Some(vocab), Some(dist), Some(top)) if kept => {
                Some(report::sampled(vocab, token, dist, top)?)
            }
            _ => None,
        };
        if !text.is_empty() || entry.is_some() {
            let entries: Option<Vec<String>> = match spec.logprobs {
                Some(_) => Some(entry.into_iter().collect()),
                None => None,
            };
            report::text(self.index, &text, entries.as_deref())?;
            self.sent.push_str(&text);
        }
        if generation.is_finished() {
            self.end(None)
        } else if output.done {
            self.end(Some("stop")) // the grammar is complete
        } else {
            Ok(())
        }
    }

    /// End the choice: send any text still held back, then its finish.
    fn end(&mut self, reason: Option<&str>) -> Result<()> {
        let generated = match self.generation.take() {
            Some(generation) => generation.finish()?,
            None => return Ok(()),
        };
        let reason = reason.unwrap_or(match generated.finish {
            FinishReason::MaxTokens => "length",
            FinishReason::StopToken(_) | FinishReason::StopString(_) => "stop",
        });
        if let Some(rest) = generated.text.strip_prefix(self.sent.as_str()) {
            if !rest.is_empty() {
                report::text(self.index, rest, None)?;
                self.sent.push_str(rest);
            }
        }
        self.matcher = None;
        if let Some(step) = self.ahead.take() {
            step.discard()?; // a step ahead of the end: given up without waiting
        }
        report::finish(self.index, reason, generated.tokens.len())
    }
}
