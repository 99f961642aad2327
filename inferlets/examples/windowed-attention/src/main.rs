//! windowed-attention: sliding-window attention — every token attends to the last W tokens
//! only, so generation goes on indefinitely in a bounded number of KV pages.
//!
//! ```text
//! windowed-attention [--prompt] TEXT [--max-tokens N] [--window W] [--temperature T]
//!                    [--seed X] [--chat] [--ignore-eos]
//! ```
//!
//! Before every forward, the KV-cache tokens older than the window are masked (`mask_kv`),
//! token by token: a decode step's input attends to itself and the W − 1 tokens before it
//! (W: 64). The SDK frees a page, and drops it from the layout, once every token in it is
//! masked, so the context spans at most ⌈W / page⌉ + 1 pages (the oldest one partly masked).
//! Unlike attention-sink there are no sink tokens and eviction is by token, not by page: the
//! attended set is exactly the window. The prompt is prefilled in chunks of at most W / 2
//! tokens with the same masking before each, so a chunk's first token attends at least the
//! W / 2 tokens before it and its last token at most W.
//!
//! Positions: every token keeps its original position (cached keys are stored after RoPE), as
//! in attention-sink; generation ends at the model's context length like any other.
//!
//! Each piece of text is sent as a `message`; the full text is the return value; a last line on
//! stdout reports `{"tokens": T, "peak_pages": P, "masked": M, "attended": A}` (M: tokens masked
//! in all; A: the KV tokens the last forward attended, its own input included).

use inferlet::StopCondition;
use inferlet::{tokenizer, Args, Context, Error, Generation, Message, Model, Result, Sampler};

struct Options {
    prompt: String,
    max_tokens: usize,
    window: usize,
    sampler: Sampler,
    chat: bool,
    ignore_eos: bool,
}

fn parse(mut args: Args) -> Result<Options> {
    let max_tokens = args.value_or("--max-tokens", 256)?;
    let window = args.value_or("--window", 64)?;
    let mut sampler = Sampler::new(args.value_or("--temperature", 0.0)?);
    sampler.seed = args.value("--seed")?;
    let chat = args.flag("--chat");
    let ignore_eos = args.flag("--ignore-eos");
    let prompt = args.option_or_words("--prompt")?;
    if prompt.is_empty() {
        return Err(Error::usage("no prompt: pass --prompt TEXT or the text as arguments"));
    }
    if window < 2 {
        return Err(Error::usage("--window must be at least 2 tokens"));
    }
    Ok(Options { prompt, max_tokens, window, sampler, chat, ignore_eos })
}

/// The sliding window over one context, and what it has masked.
struct Window {
    size: usize,
    masked: usize,
    peak_pages: usize,
}

impl Window {
    /// Mask the KV tokens the next forward must not see: all but the last `size − pending`.
    fn slide(&mut self, ctx: &mut Context) -> Result<()> {
        let pending = ctx.pending_tokens().len();
        if pending > self.size {
            return Err(Error::usage("the pending tokens alone exceed the window"));
        }
        let keep = self.size - pending;
        // Masked tokens always form a prefix of the KV cache (fully masked pages are dropped).
        let attended = ctx.tokens().len() - pending;
        let first_attended = ctx.kv_len() - attended;
        if attended > keep {
            let end = first_attended + attended - keep;
            ctx.mask_tokens(first_attended..end, true)?;
            self.masked += end - first_attended;
        }
        Ok(())
    }

    fn record(&mut self, ctx: &Context) {
        self.peak_pages = self.peak_pages.max(ctx.pages().len());
    }
}

/// Prefill the prompt in chunks of at most half the window, sliding it before each; the last
/// token stays pending.
fn prefill(ctx: &mut Context, window: &mut Window, prompt: &[u32]) -> Result<()> {
    for chunk in prompt.chunks((window.size / 2).max(1)) {
        ctx.fill_tokens(chunk);
        window.slide(ctx)?;
        ctx.flush()?;
        window.record(ctx);
    }
    Ok(())
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
        let mut generation = Generation::new(&options.sampler, &stop).streaming();

        let mut ctx = model.new_context();
        let mut window = Window { size: options.window, masked: 0, peak_pages: 0 };
        prefill(&mut ctx, &mut window, &tokenizer::tokenize(&prompt)?)?;
        while !generation.is_finished() && !ctx.is_full() {
            window.slide(&mut ctx)?;
            let output = ctx.step(&generation.next_step())?;
            window.record(&ctx);
            let text = generation.accept_step(&output)?;
            if !text.is_empty() {
                inferlet::send(&text)?;
            }
        }
        let generated = generation.finish()?;
        println!(
            "{{\"tokens\":{},\"peak_pages\":{},\"masked\":{},\"attended\":{}}}",
            generated.tokens.len(),
            window.peak_pages,
            window.masked,
            ctx.tokens().len() - ctx.pending_tokens().len()
        );
        inferlet::set_return(&generated.text)
    })
}
