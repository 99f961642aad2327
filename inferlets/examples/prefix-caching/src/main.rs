//! prefix-caching: a long shared prompt prefilled once, then imported by every later instance,
//! which prefills only its own suffix.
//!
//! ```text
//! prefix-caching --prefix TEXT [--name NAME] [--max-tokens N] [--no-cache] [--unexport]
//!                [--auto] [--ignore-eos] [--prompt] SUFFIX
//! ```
//!
//! The prefix's context is exported, persistently, under NAME (by default `prefix.` and a hash
//! of the prefix, so equal prefixes meet without agreeing on a name). The first instance to
//! find no such export builds it: it fills the prefix, forwards it without outputs, exports the
//! context and drops its own copy. Every instance, the first included, then imports it: the
//! full pages are shared with the export (copy-on-write), the tokens of the partial last page
//! are filled again, then the suffix; generation is greedy, as in text-completion.
//! `--no-cache` skips the export and prefills prefix and suffix itself (the same tokens: the
//! prefix and the suffix are tokenized separately either way). `--unexport` removes the export
//! at the end. `--auto` names no export at all: the host's automatic prefix cache
//! (`Context::fill_cached`) finds whatever full pages of prefix and suffix an earlier request
//! left behind, and this instance prefills only the rest.
//!
//! Each piece of text is sent as a `message`; the full text is the return value; a last line on
//! stdout reports `{"cached": C, "built": B, "prefix_tokens": P, "prefilled": F, "reused": R}`:
//! whether an export (or with `--auto`, a cached page) was found, whether this instance made
//! the export, how many tokens it had to process before generating (with `--auto`: all it
//! forwarded), and how many tokens `--auto` took from the host's cache.

use inferlet::resources::list_exports;
use inferlet::{Args, Context, Error, Model, Queue, Result, Sampler, StopCondition};

struct Options {
    prefix: String,
    suffix: String,
    name: String,
    max_tokens: usize,
    no_cache: bool,
    unexport: bool,
    ignore_eos: bool,
    auto: bool,
}

fn parse(mut args: Args) -> Result<Options> {
    let prefix: String =
        args.value("--prefix")?.ok_or_else(|| Error::usage("no prefix: pass --prefix TEXT"))?;
    let name = args.value("--name")?.unwrap_or_else(|| format!("prefix.{:016x}", fnv1a(&prefix)));
    let max_tokens = args.value_or("--max-tokens", 64)?;
    let no_cache = args.flag("--no-cache");
    let unexport = args.flag("--unexport");
    let ignore_eos = args.flag("--ignore-eos");
    let auto = args.flag("--auto");
    let suffix = args.option_or_words("--prompt")?;
    Ok(Options { prefix, suffix, name, max_tokens, no_cache, unexport, ignore_eos, auto })
}

/// FNV-1a, 64 bits: a stable name for a prefix (not a security boundary: exports belong to
/// their tenant anyway).
fn fnv1a(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// How the prefix's context was obtained.
struct Prefix {
    ctx: Context,
    cached: bool,
    built: bool,
}

/// Fill prefix and suffix through the host's automatic prefix cache; the context and how many
/// tokens it reused.
fn auto_cached(model: &Model, options: &Options) -> Result<(Context, usize)> {
    let mut tokens = inferlet::tokenizer::tokenize(&options.prefix)?;
    tokens.extend(inferlet::tokenizer::tokenize(&options.suffix)?);
    let mut ctx = model.new_context();
    let reused = ctx.fill_cached(&tokens)?;
    Ok((ctx, reused))
}

/// Import the prefix's export, building it first when there is none.
fn shared_prefix(model: &Model, options: &Options) -> Result<Prefix> {
    let cached = list_exports()?.contains(&options.name);
    let mut export_error = None;
    if !cached {
        let mut ctx = model.new_context();
        ctx.fill(&options.prefix)?;
        ctx.flush()?;
        // Another instance may have exported the same name meanwhile: then use theirs. The
        // export keeps the pages when `ctx` is dropped here.
        export_error = ctx.export(&options.name, true).err();
    }
    match Context::import(model, &options.name, Queue::DEFAULT) {
        Ok(ctx) => Ok(Prefix { ctx, cached, built: !cached && export_error.is_none() }),
        Err(err) => Err(export_error.unwrap_or(err)),
    }
}

fn main() {
    inferlet::run(|| {
        let options = parse(Args::load()?)?;
        let model = Model::load()?;
        let prefix_tokens = inferlet::tokenizer::tokenize(&options.prefix)?.len();
        if options.auto && !options.no_cache {
            let (ctx, reused) = auto_cached(&model, &options)?;
            let prefilled = ctx.kv_len() + ctx.pending_tokens().len() - reused;
            let prefix = Prefix { ctx, cached: reused > 0, built: false };
            return generate(&model, &options, prefix, (prefix_tokens, prefilled, reused));
        }
        let mut prefix = if options.no_cache {
            let mut ctx = model.new_context();
            ctx.fill(&options.prefix)?;
            Prefix { ctx, cached: false, built: false }
        } else {
            shared_prefix(&model, &options)?
        };
        prefix.ctx.fill(&options.suffix)?;
        let prefilled = prefix.ctx.pending_tokens().len();
        generate(&model, &options, prefix, (prefix_tokens, prefilled, 0))
    })
}

/// Generate greedily after the prompt, send the text, report (with `counts`: the prefix's
/// tokens, those prefilled, those reused) and return it.
fn generate(
    model: &Model,
    options: &Options,
    prefix: Prefix,
    counts: (usize, usize, usize),
) -> Result<()> {
    let Prefix { mut ctx, cached, built } = prefix;
    let stop_tokens = if options.ignore_eos { Vec::new() } else { model.stop_tokens().to_vec() };
    let stop = StopCondition::new(options.max_tokens).with_stop_tokens(stop_tokens);
    let generated = ctx.generate_streaming(&Sampler::greedy(), &stop, inferlet::send)?;
    if options.unexport && !options.no_cache && !options.auto {
        Context::unexport(&options.name)?;
    }
    let (prefix_tokens, prefilled, reused) = counts;
    println!(
        "{{\"cached\":{},\"built\":{},\"prefix_tokens\":{},\"prefilled\":{},\"reused\":{}}}",
        cached, built, prefix_tokens, prefilled, reused
    );
    inferlet::set_return(&generated.text)
}
