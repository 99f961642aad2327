//! graph-of-thought: several independent drafts, then one thought that merges them — a node
//! with several parents — all off one shared prompt.
//!
//! ```text
//! graph-of-thought [--prompt] QUESTION [--branches N] [--branch-tokens K] [--merge-tokens M]
//!                  [--temperature T] [--seed S] [--sequential] [--ignore-eos]
//! ```
//!
//! The question goes to the model as a chat turn and is prefilled once (the root). N forks of
//! the root (3; full pages shared, copy-on-write), each on its own queue, sample a draft of K
//! tokens (32) at temperature T (0.8; draft i uses seed S + 1000·i, S = 1), all together: one
//! forward batch per step for every draft. The merge is one more fork of the root whose
//! assistant turn goes on with the drafts' *text* — "Drafts:", the numbered drafts, "Combined
//! answer:" — and generates greedily (M tokens, 48). So the merge shares the question's pages
//! and prefills only the drafts. It takes their text, not their KV: each draft's cache was
//! computed attending to the question and itself alone, at the same positions as every other
//! draft, so the pages could not simply be laid end to end — the merge must read each draft in
//! the light of the others, which only a forward over the drafts' tokens gives.
//! `--sequential` generates the drafts one after another instead (the same text).
//!
//! Messages: `{"branch": i, "text": T}` per draft, then `{"merged": T}`; returns the merged
//! text. A last line on stdout reports `{"branches", "shared_pages", "branch_pages": [..],
//! "merge_pages", "merge_prefilled"}`: the root's full pages (shared by every fork), the pages
//! each draft's and the merge's context span at the end (shared ones included), and the tokens
//! the merge's first forward processed.

use inferlet::{generate_parallel, json, Args, Context, Error, Generation, Message, Model, Queue};
use inferlet::{Result, Sampler, StopCondition};

struct Options {
    question: String,
    branches: usize,
    branch_tokens: usize,
    merge_tokens: usize,
    sampler: Sampler,
    seed: u64,
    sequential: bool,
    ignore_eos: bool,
}

fn parse(mut args: Args) -> Result<Options> {
    let branches = args.value_or("--branches", 3)?;
    let branch_tokens = args.value_or("--branch-tokens", 32)?;
    let merge_tokens = args.value_or("--merge-tokens", 48)?;
    let sampler = Sampler::new(args.value_or("--temperature", 0.8)?);
    let seed = args.value_or("--seed", 1)?;
    let sequential = args.flag("--sequential");
    let ignore_eos = args.flag("--ignore-eos");
    let question = args.option_or_words("--prompt")?;
    if question.is_empty() || branches == 0 {
        return Err(Error::usage("need a question and --branches of at least 1"));
    }
    let options = Options {
        question,
        branches,
        branch_tokens,
        merge_tokens,
        sampler,
        seed,
        sequential,
        ignore_eos,
    };
    Ok(options)
}

/// The drafts: forks of the root, sampled together (or one after another). Returns their
/// contexts (for the page report) and their texts.
fn draft(
    root: &Context,
    options: &Options,
    stop: &StopCondition,
) -> Result<(Vec<Context>, Vec<String>)> {
    let mut drafts = Vec::with_capacity(options.branches);
    let mut generations = Vec::with_capacity(options.branches);
    for i in 0..options.branches {
        drafts.push(root.fork_on(Queue::create(0)?)?);
        let seed = options.seed.wrapping_add(1000 * i as u64);
        generations.push(Generation::new(&options.sampler.clone().with_seed(seed), stop));
    }
    if options.sequential {
        for i in 0..drafts.len() {
            generate_parallel(&mut drafts[i..=i], &mut generations[i..=i], |_, _| Ok(()))?;
        }
    } else {
        generate_parallel(&mut drafts, &mut generations, |_, _| Ok(()))?;
    }
    let mut texts = Vec::with_capacity(drafts.len());
    for (i, generation) in generations.into_iter().enumerate() {
        let text = generation.finish()?.text;
        inferlet::send(&format!("{{\"branch\":{},\"text\":{}}}", i, json::string(&text)))?;
        texts.push(text);
    }
    Ok((drafts, texts))
}

/// What the merge's assistant turn goes on with: the drafts, numbered.
fn merge_text(drafts: &[String]) -> String {
    let mut text = String::from("Drafts:\n");
    for (i, draft) in drafts.iter().enumerate() {
        text.push_str(&format!("{}. {}\n", i + 1, draft.trim()));
    }
    text.push_str("Combined answer:");
    text
}

fn main() {
    inferlet::run(|| {
        let options = parse(Args::load()?)?;
        let model = Model::load()?;
        let mut root = model.new_context();
        root.fill(&model.render_chat(&[Message::user(&options.question)])?)?;
        root.flush()?;
        let shared_pages = root.kv_len() / root.page_size();
        let stop_tokens =
            if options.ignore_eos { Vec::new() } else { model.stop_tokens().to_vec() };

        let branch_stop =
            StopCondition::new(options.branch_tokens).with_stop_tokens(stop_tokens.clone());
        let (drafts, texts) = draft(&root, &options, &branch_stop)?;
        let branch_pages: Vec<String> =
            drafts.iter().map(|d| d.pages().len().to_string()).collect();
        // The merge takes the drafts' text; their pages go.
        drop(drafts);

        let mut merge = root.fork()?;
        drop(root);
        merge.fill(&merge_text(&texts))?;
        let merge_prefilled = merge.pending_tokens().len();
        let merge_stop = StopCondition::new(options.merge_tokens).with_stop_tokens(stop_tokens);
        let merged = merge.generate(&Sampler::greedy(), &merge_stop)?;
        inferlet::send(&format!("{{\"merged\":{}}}", json::string(&merged.text)))?;
        println!(
            "{{\"branches\":{},\"shared_pages\":{},\"branch_pages\":[{}],\"merge_pages\":{},\
             \"merge_prefilled\":{}}}",
            options.branches,
            shared_pages,
            branch_pages.join(","),
            merge.pages().len(),
            merge_prefilled
        );
        inferlet::set_return(&merged.text)
    })
}
