//! prefix-tree: many generations off a tree of shared prefixes — one system prompt, several
//! variants of it (few-shot examples, say), several questions under each — with every prefix
//! prefilled once and its pages shared by everything below it.
//!
//! ```text
//! prefix-tree --system TEXT --variant TEXT... --question TEXT... [--max-tokens N] [--sequential]
//!             [--ignore-eos]
//! ```
//!
//! The tree is plain text: the system text, then a variant, then a question, each followed by a
//! newline (put any chat markup into the texts themselves). The system text is prefilled into
//! the root; each `--variant` (repeatable) forks the root (its full pages shared, copy-on-write)
//! and prefills its text; each `--question` (repeatable) forks every variant, on a queue of its
//! own. Every leaf — V variants × Q questions — then generates greedily (N tokens, 32), all of
//! them together: one forward batch per step for every leaf. `--sequential` generates the
//! leaves one after another instead (the same text, for comparison).
//!
//! Messages: `{"variant": v, "question": q, "text": T}` per leaf; returns the JSON array of the
//! leaves' texts (variant-major). A last line on stdout reports `{"leaves", "root_pages",
//! "variant_pages": [..], "leaf_pages": [..]}`: the full pages of the root (shared by every
//! leaf) and of each variant (shared by its questions, the root's included), and the pages each
//! leaf's context spans at the end (shared ones included).

use inferlet::{generate_parallel, json, Args, Context, Error, Generation, Model, Queue};
use inferlet::{Result, Sampler, StopCondition};

struct Options {
    system: String,
    variants: Vec<String>,
    questions: Vec<String>,
    max_tokens: usize,
    sequential: bool,
    ignore_eos: bool,
}

fn parse(mut args: Args) -> Result<Options> {
    let system: String = args.value("--system")?.unwrap_or_default();
    let variants = args.values("--variant")?;
    let questions = args.values("--question")?;
    let max_tokens = args.value_or("--max-tokens", 32)?;
    let sequential = args.flag("--sequential");
    let ignore_eos = args.flag("--ignore-eos");
    let rest = args.positional()?;
    if !rest.is_empty() {
        return Err(Error::usage(format!("unexpected arguments: {:?}", rest)));
    }
    if system.is_empty() || variants.is_empty() || questions.is_empty() {
        return Err(Error::usage("need --system, at least one --variant and one --question"));
    }
    Ok(Options { system, variants, questions, max_tokens, sequential, ignore_eos })
}

/// A fork of `parent` with `text` (and a newline) after its tokens, forwarded up to the last
/// token so that the forks of this one share its pages.
fn extend(parent: &Context, text: &str) -> Result<Context> {
    let mut ctx = parent.fork()?;
    ctx.fill(&format!("{}\n", text))?;
    ctx.flush()?;
    Ok(ctx)
}

/// How many of a context's pages are full (what a fork of it shares).
fn full_pages(ctx: &Context) -> usize {
    ctx.kv_len() / ctx.page_size()
}

fn main() {
    inferlet::run(|| {
        let options = parse(Args::load()?)?;
        let model = Model::load()?;
        let mut root = model.new_context();
        root.fill(&format!("{}\n", options.system))?;
        root.flush()?;
        let variants =
            options.variants.iter().map(|text| extend(&root, text)).collect::<Result<Vec<_>>>()?;

        let mut leaves = Vec::with_capacity(variants.len() * options.questions.len());
        for variant in &variants {
            for question in &options.questions {
                let mut leaf = variant.fork_on(Queue::create(0)?)?;
                leaf.fill(question)?;
                leaves.push(leaf);
            }
        }
        let root_pages = full_pages(&root);
        let variant_pages: Vec<String> =
            variants.iter().map(|v| full_pages(v).to_string()).collect();
        // The leaves hold what they need of the prefixes' pages.
        drop(variants);
        drop(root);

        let stop_tokens =
            if options.ignore_eos { Vec::new() } else { model.stop_tokens().to_vec() };
        let stop = StopCondition::new(options.max_tokens).with_stop_tokens(stop_tokens);
        let mut generations: Vec<Generation> =
            leaves.iter().map(|_| Generation::new(&Sampler::greedy(), &stop)).collect();
        if options.sequential {
            for i in 0..leaves.len() {
                generate_parallel(&mut leaves[i..=i], &mut generations[i..=i], |_, _| Ok(()))?;
            }
        } else {
            generate_parallel(&mut leaves, &mut generations, |_, _| Ok(()))?;
        }

        let leaf_pages: Vec<String> = leaves.iter().map(|l| l.pages().len().to_string()).collect();
        let questions = options.questions.len();
        let mut texts = Vec::with_capacity(leaves.len());
        for (i, generation) in generations.into_iter().enumerate() {
            let text = generation.finish()?.text;
            inferlet::send(&format!(
                "{{\"variant\":{},\"question\":{},\"text\":{}}}",
                i / questions,
                i % questions,
                json::string(&text)
            ))?;
            texts.push(text);
        }
        println!(
            "{{\"leaves\":{},\"root_pages\":{},\"variant_pages\":[{}],\"leaf_pages\":[{}]}}",
            leaves.len(),
            root_pages,
            variant_pages.join(","),
            leaf_pages.join(",")
        );
        inferlet::set_return(&json::string_array(&texts))
    })
}
