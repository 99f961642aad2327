//! speculative-decoding: greedy decoding that checks several drafted tokens per forward pass.
//!
//! ```text
//! speculative-decoding [--prompt] TEXT [--max-tokens N] [--draft K] [--ngram G] [--chat]
//!                      [--ignore-eos]
//! ```
//!
//! Each round drafts up to K tokens (6) by prompt lookup (n-grams of up to G tokens, 3, see
//! `drafter.rs`), fills them after the pending token and runs one forward with a greedy output
//! at every one of them. The model's choice after the pending token is always kept; a draft is
//! kept while it equals the model's choice before it (the standard greedy rule), and the model's
//! choice after the last kept draft comes free. Rejected drafts are truncated from the context,
//! so the next round overwrites their KV rows. The accepted tokens are exactly the greedy
//! continuation, one to K + 1 of them per forward.
//!
//! Each piece of text is sent as a `message` (as text-completion does); the full text is the
//! return value; a last line on stdout reports the work as JSON:
//! `{"tokens": T, "forwards": F, "drafted": D, "accepted_drafts": A, "tokens_per_forward": T/F}`.

mod drafter;

use inferlet::StopCondition;
use inferlet::{Args, Context, Error, Generation, Message, Model, Result, Sampler, StepOptions};

struct Options {
    prompt: String,
    max_tokens: usize,
    draft_len: usize,
    max_ngram: usize,
    chat: bool,
    ignore_eos: bool,
}

/// What the rounds cost and what they earned.
#[derive(Default)]
struct Tally {
    tokens: usize,
    forwards: usize,
    drafted: usize,
    accepted_drafts: usize,
}

impl Tally {
    fn json(&self) -> String {
        let per_forward = self.tokens as f64 / self.forwards.max(1) as f64;
        format!(
            "{{\"tokens\":{},\"forwards\":{},\"drafted\":{},\"accepted_drafts\":{},\
             \"tokens_per_forward\":{:.3}}}",
            self.tokens, self.forwards, self.drafted, self.accepted_drafts, per_forward
        )
    }
}

fn parse(mut args: Args) -> Result<Options> {
    let options = Options {
        max_tokens: args.value_or("--max-tokens", 128)?,
        draft_len: args.value_or("--draft", 6)?,
        max_ngram: args.value_or("--ngram", 3)?,
        chat: args.flag("--chat"),
        ignore_eos: args.flag("--ignore-eos"),
        prompt: args.option_or_words("--prompt")?,
    };
    if options.prompt.is_empty() {
        return Err(Error::usage("no prompt: pass --prompt TEXT or the text as arguments"));
    }
    Ok(options)
}

/// One round: draft, verify in one forward, keep the agreeing prefix plus the model's next
/// token. Returns the tokens accepted, in order (the last one is pending in `ctx`).
fn round(
    ctx: &mut Context,
    history: &[u32],
    options: &Options,
    budget: usize,
    tally: &mut Tally,
) -> Result<Vec<u32>> {
    let drafts = drafter::draft(history, options.max_ngram, budget);
    ctx.fill_tokens(&drafts);
    let outputs = ctx.step_many(drafts.len() + 1, &StepOptions::sample(&Sampler::greedy()))?;
    let chosen = outputs
        .iter()
        .map(|output| output.token.ok_or_else(|| Error::Decode("no sampled token".into())))
        .collect::<Result<Vec<u32>>>()?;
    let kept = drafts.iter().zip(&chosen).take_while(|(draft, model)| draft == model).count();
    // Drop the rejected drafts' KV; the model's token after the last kept one is the input
    // of the next round.
    ctx.truncate(ctx.kv_len() - (drafts.len() - kept))?;
    ctx.fill_token(chosen[kept]);
    tally.forwards += 1;
    tally.drafted += drafts.len();
    tally.accepted_drafts += kept;
    Ok(chosen[..=kept].to_vec())
}

/// How many tokens a round may draft: the generation's and the context's room, less the token
/// the model adds itself.
fn draft_budget(ctx: &Context, model: &Model, generation: &Generation, options: &Options) -> usize {
    let left = options.max_tokens.saturating_sub(generation.tokens().len() + 1);
    let room = model
        .info()
        .max_position
        .map_or(usize::MAX, |max| max.saturating_sub(u64::from(ctx.next_position())) as usize);
    options.draft_len.min(left).min(room.saturating_sub(1))
}

fn main() {
    inferlet::run(|| {
        let options = parse(Args::load()?)?;
        let model = Model::load()?;
        let prompt = if options.chat {
            model.render_chat(&[Message::user(&options.prompt)])?
        } else {
            options.prompt.clone()
        };
        let stop_tokens =
            if options.ignore_eos { Vec::new() } else { model.stop_tokens().to_vec() };
        let stop = StopCondition::new(options.max_tokens).with_stop_tokens(stop_tokens);
        let mut generation = Generation::new(&Sampler::greedy(), &stop).streaming();

        let mut ctx = model.new_context();
        ctx.fill(&prompt)?;
        let mut history = ctx.pending_tokens();
        let mut tally = Tally::default();
        while !generation.is_finished() && !ctx.is_full() {
            let budget = draft_budget(&ctx, &model, &generation, &options);
            for token in round(&mut ctx, &history, &options, budget, &mut tally)? {
                history.push(token);
                tally.tokens += 1;
                let text = generation.accept(token)?;
                if !text.is_empty() {
                    inferlet::send(&text)?;
                }
                if generation.is_finished() {
                    break;
                }
            }
        }
        let generated = generation.finish()?;
        println!("{}", tally.json());
        inferlet::set_return(&generated.text)
    })
}
