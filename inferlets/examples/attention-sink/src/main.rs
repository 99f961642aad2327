//! attention-sink: StreamingLLM — generate past a fixed KV budget by keeping the first few
//! tokens (the attention sinks) and a recent window, and dropping the pages in between.
//!
//! ```text
//! attention-sink [--prompt] TEXT [--max-tokens N] [--budget P] [--sink S] [--temperature T]
//!                [--seed X] [--chat] [--ignore-eos]
//! ```
//!
//! The context never holds more than P KV pages (8). Before every forward pass that would need
//! more, the oldest tokens that are neither among the first S (4) nor in the window are masked
//! (`mask_kv`): first the rest of the page the sinks live on (that page stays), then whole
//! window pages from the oldest, which the SDK frees and drops from the layout. A long prompt
//! is prefilled a page at a time with the same eviction between chunks, so it may exceed the
//! budget as well.
//!
//! Positions: every token keeps its original position. Keys are stored after RoPE, so
//! re-numbering kept tokens (StreamingLLM's position-in-cache scheme) would mean rotating cached
//! keys again, which the ABI has no op for; the relative distances the model sees to the sinks
//! grow, and generation ends at the model's context length like any other.
//!
//! Each piece of text is sent as a `message`; the full text is the return value; a last line on
//! stdout reports `{"tokens": T, "peak_pages": P, "evicted_pages": E, "attended": A}` (A: the
//! tokens still attended at the end).

use inferlet::StopCondition;
use inferlet::{tokenizer, Args, Context, Error, Generation, Message, Model, Result, Sampler};

struct Options {
    prompt: String,
    max_tokens: usize,
    budget: usize,
    sink: usize,
    sampler: Sampler,
    chat: bool,
    ignore_eos: bool,
}

fn parse(mut args: Args) -> Result<Options> {
    let max_tokens = args.value_or("--max-tokens", 256)?;
    let budget = args.value_or("--budget", 8)?;
    let sink = args.value_or("--sink", 4)?;
    let mut sampler = Sampler::new(args.value_or("--temperature", 0.0)?);
    sampler.seed = args.value("--seed")?;
    let chat = args.flag("--chat");
    let ignore_eos = args.flag("--ignore-eos");
    let prompt = args.option_or_words("--prompt")?;
    if prompt.is_empty() {
        return Err(Error::usage("no prompt: pass --prompt TEXT or the text as arguments"));
    }
    Ok(Options { prompt, max_tokens, budget, sink, sampler, chat, ignore_eos })
}

/// The KV budget and what has been evicted under it.
struct Window {
    budget: usize,
    sink: usize,
    page_size: usize,
    /// Whether the non-sink tokens of the last sink page are masked already.
    sink_page_cleared: bool,
    evicted_pages: usize,
    peak_pages: usize,
}

impl Window {
    fn new(options: &Options, page_size: usize) -> Result<Window> {
        let window = Window {
            budget: options.budget,
            sink: options.sink,
            page_size,
            sink_page_cleared: options.sink % page_size == 0,
            evicted_pages: 0,
            peak_pages: 0,
        };
        // The sink pages, one window page to drop, and the page being written.
        if window.budget < window.sink_pages() + 2 {
            return Err(Error::usage(format!(
                "--budget {} is too small: {} sink tokens take {} pages of {}, and the window \
                 needs 2 more",
                window.budget,
                window.sink,
                window.sink_pages(),
                page_size
            )));
        }
        Ok(window)
    }

    fn sink_pages(&self) -> usize {
        (self.sink + self.page_size - 1) / self.page_size
    }

    /// Pages the next forward of `ctx` needs (every pending token written).
    fn needed(&self, ctx: &Context) -> usize {
        let tokens = ctx.kv_len() + ctx.pending_tokens().len();
        (tokens + self.page_size - 1) / self.page_size
    }

    /// Mask the oldest evictable tokens until the next forward fits the budget.
    fn make_room(&mut self, ctx: &mut Context) -> Result<()> {
        while self.needed(ctx) > self.budget {
            let ps = self.page_size;
            let sink_end = self.sink_pages() * ps;
            let (range, frees_a_page) = if self.sink_page_cleared {
                (sink_end..sink_end + ps, true)
            } else {
                (self.sink..sink_end, false)
            };
            if range.end > ctx.kv_len() {
                return Err(Error::usage("the pending tokens alone exceed the KV budget"));
            }
            let pages_before = ctx.pages().len();
            ctx.mask_tokens(range, true)?;
            self.sink_page_cleared = true;
            if frees_a_page && ctx.pages().len() != pages_before - 1 {
                return Err(Error::Decode("masking a window page did not free it".into()));
            }
            self.evicted_pages += usize::from(frees_a_page);
        }
        Ok(())
    }

    fn record(&mut self, ctx: &Context) {
        self.peak_pages = self.peak_pages.max(ctx.pages().len());
    }
}

/// Prefill the prompt a page at a time, evicting between chunks; the last token stays pending.
fn prefill(ctx: &mut Context, window: &mut Window, prompt: &[u32]) -> Result<()> {
    for chunk in prompt.chunks(window.page_size) {
        ctx.fill_tokens(chunk);
        window.make_room(ctx)?;
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
        let mut window = Window::new(&options, ctx.page_size())?;
        prefill(&mut ctx, &mut window, &tokenizer::tokenize(&prompt)?)?;
        while !generation.is_finished() && !ctx.is_full() {
            window.make_room(&mut ctx)?;
            let output = ctx.step(&generation.next_step())?;
            window.record(&ctx);
            let text = generation.accept_step(&output)?;
            if !text.is_empty() {
                inferlet::send(&text)?;
            }
        }
        let generated = generation.finish()?;
        println!(
            "{{\"tokens\":{},\"peak_pages\":{},\"evicted_pages\":{},\"attended\":{}}}",
            generated.tokens.len(),
            window.peak_pages,
            window.evicted_pages,
            ctx.tokens().len()
        );
        inferlet::set_return(&generated.text)
    })
}
