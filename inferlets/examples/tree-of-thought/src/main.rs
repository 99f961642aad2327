//! tree-of-thought: a breadth-limited search over thoughts, every branch a fork of one context,
//! every level's branches advancing in the same forward batches.
//!
//! ```text
//! tree-of-thought [--prompt] PROBLEM [--breadth K] [--keep B] [--depth D] [--thought-tokens T]
//!                 [--temperature X] [--seed S] [--top-k N] [--sequential] [--ignore-eos]
//! ```
//!
//! The problem goes to the model as a chat turn asking to reason step by step; that prompt is
//! prefilled once. Each level forks K (3) children off every node of the frontier (full pages
//! shared, copy-on-write), each on its own queue, and samples a thought of T tokens (24) in each
//! at temperature X (0.8; child j of the whole search uses seed S + 1000·j). All children of a
//! level step together: one forward batch per token for all of them. A thought is scored by the
//! model's own mean log-probability of its tokens (read from the top-N distribution, 20, of the
//! same forward that sampled it), a path by the mean over all its tokens; the B best children (2)
//! become the next frontier and the rest are dropped (their pages freed). After D levels (2) the
//! best path wins; a child that ends its answer (a stop token) is a finished path and is not
//! expanded. `--sequential` generates each level's children one after another instead (the same
//! text, for comparison).
//!
//! Messages: per level `{"level": l, "thoughts": [{"parent", "text", "score"}], "kept": [..]}`.
//! Returns the best path's text. A last line on stdout reports `{"levels", "forks",
//! "shared_pages", "fork_pages": [..], "best_score"}`: the prompt's full pages (shared by every
//! fork) and the pages each fork's context spans at the end of its thought (shared ones included).

mod scored;

use inferlet::{json, Args, Context, Error, FinishReason, Generation, Message, Model, Queue};
use inferlet::{Result, Sampler, StopCondition};
use scored::{generate_scored, Score};

struct Options {
    problem: String,
    breadth: usize,
    keep: usize,
    depth: usize,
    thought_tokens: usize,
    sampler: Sampler,
    seed: u64,
    top_k: u32,
    sequential: bool,
    ignore_eos: bool,
}

fn parse(mut args: Args) -> Result<Options> {
    let breadth = args.value_or("--breadth", 3)?;
    let keep = args.value_or("--keep", 2)?;
    let depth = args.value_or("--depth", 2)?;
    let thought_tokens = args.value_or("--thought-tokens", 24)?;
    let sampler = Sampler::new(args.value_or("--temperature", 0.8)?);
    let seed = args.value_or("--seed", 1)?;
    let top_k = args.value_or("--top-k", 20)?;
    let sequential = args.flag("--sequential");
    let ignore_eos = args.flag("--ignore-eos");
    let problem = args.option_or_words("--prompt")?;
    if problem.is_empty() || breadth == 0 || keep == 0 || depth == 0 || top_k == 0 {
        return Err(Error::usage("need a problem, and --breadth, --keep, --depth, --top-k >= 1"));
    }
    let options = Options {
        problem,
        breadth,
        keep,
        depth,
        thought_tokens,
        sampler,
        seed,
        top_k,
        sequential,
        ignore_eos,
    };
    Ok(options)
}

/// A path of thoughts from the prompt, and its score.
#[derive(Clone, Default)]
struct Path {
    thoughts: Vec<String>,
    score: Score,
}

/// A frontier node: a path and the context that holds it.
struct Node {
    ctx: Context,
    path: Path,
}

/// The search's state across levels.
struct Search<'a> {
    options: &'a Options,
    stop: StopCondition,
    /// One queue per child of the widest level, so that a level's children batch together.
    queues: Vec<Queue>,
    forks: u64,
    fork_pages: Vec<usize>,
    /// Paths that ended with a stop token.
    finished: Vec<Path>,
}

impl<'a> Search<'a> {
    fn new(options: &'a Options, model: &Model) -> Result<Search<'a>> {
        let stop_tokens =
            if options.ignore_eos { Vec::new() } else { model.stop_tokens().to_vec() };
        let width = options.breadth * options.keep.max(1);
        Ok(Search {
            options,
            stop: StopCondition::new(options.thought_tokens).with_stop_tokens(stop_tokens),
            queues: (0..width).map(|_| Queue::create(0)).collect::<Result<Vec<_>>>()?,
            forks: 0,
            fork_pages: Vec::new(),
            finished: Vec::new(),
        })
    }

    /// Fork K children off every frontier node, generate their thoughts together, send the
    /// level's message and return the next frontier (the B best unfinished children).
    fn level(&mut self, level: usize, frontier: Vec<Node>) -> Result<Vec<Node>> {
        let mut contexts = Vec::new();
        let mut parents = Vec::new();
        let mut generations = Vec::new();
        for (p, node) in frontier.iter().enumerate() {
            for _ in 0..self.options.breadth {
                contexts.push(node.ctx.fork_on(self.queues[contexts.len()])?);
                parents.push(p);
                let seed = self.options.seed.wrapping_add(1000 * self.forks);
                self.forks += 1;
                let sampler = self.options.sampler.clone().with_seed(seed);
                generations.push(Generation::new(&sampler, &self.stop));
            }
        }
        // The children hold what they need of their parents' pages.
        let paths: Vec<Path> = frontier.into_iter().map(|node| node.path).collect();
        let mut scores = vec![Score::default(); contexts.len()];
        let top_k = self.options.top_k;
        if self.options.sequential {
            for i in 0..contexts.len() {
                let (c, g, s) = (&mut contexts[i..=i], &mut generations[i..=i], &mut scores[i..=i]);
                generate_scored(c, g, s, top_k)?;
            }
        } else {
            generate_scored(&mut contexts, &mut generations, &mut scores, top_k)?;
        }
        self.fork_pages.extend(contexts.iter().map(|ctx| ctx.pages().len()));

        let mut children = Vec::with_capacity(contexts.len());
        for (i, (ctx, generation)) in contexts.into_iter().zip(generations).enumerate() {
            let generated = generation.finish()?;
            let mut path = paths[parents[i]].clone();
            path.thoughts.push(generated.text);
            path.score.add(scores[i]);
            let ended = matches!(generated.finish, FinishReason::StopToken(_));
            children.push((Node { ctx, path }, ended));
        }
        let kept = self.select(&children);
        send_level(level, &children, &parents, &kept)?;
        let mut frontier = Vec::with_capacity(kept.len());
        for (i, (node, ended)) in children.into_iter().enumerate() {
            if ended {
                self.finished.push(node.path);
            } else if kept.contains(&i) {
                frontier.push(node);
            }
        }
        Ok(frontier)
    }

    /// The indices of the B best children that can go on, best first.
    fn select(&self, children: &[(Node, bool)]) -> Vec<usize> {
        let mut open: Vec<usize> = (0..children.len()).filter(|&i| !children[i].1).collect();
        open.sort_by(|&a, &b| {
            let (a, b) = (children[a].0.path.score.mean(), children[b].0.path.score.mean());
            b.partial_cmp(&a).unwrap_or(std::cmp::Ordering::Equal)
        });
        open.truncate(self.options.keep);
        open
    }
}

fn send_level(
    level: usize,
    children: &[(Node, bool)],
    parents: &[usize],
    kept: &[usize],
) -> Result<()> {
    let thoughts: Vec<String> = children
        .iter()
        .zip(parents)
        .map(|((node, _), parent)| {
            format!(
                "{{\"parent\":{},\"text\":{},\"score\":{:.4}}}",
                parent,
                json::string(node.path.thoughts.last().map_or("", String::as_str)),
                node.path.score.mean()
            )
        })
        .collect();
    let kept: Vec<String> = kept.iter().map(usize::to_string).collect();
    inferlet::send(&format!(
        "{{\"level\":{},\"thoughts\":[{}],\"kept\":[{}]}}",
        level,
        thoughts.join(","),
        kept.join(",")
    ))
}

/// The root context: the problem as a chat turn, prefilled up to its last token.
fn root_context(model: &Model, problem: &str) -> Result<Context> {
    let request = format!("{}\nThink it through step by step.", problem);
    let mut root = model.new_context();
    root.fill(&model.render_chat(&[Message::user(&request)])?)?;
    root.flush()?;
    Ok(root)
}

fn main() {
    inferlet::run(|| {
        let options = parse(Args::load()?)?;
        let model = Model::load()?;
        let root = root_context(&model, &options.problem)?;
        let shared_pages = root.kv_len() / root.page_size();
        let mut search = Search::new(&options, &model)?;
        let mut frontier = vec![Node { ctx: root, path: Path::default() }];
        let mut levels = 0;
        while levels < options.depth && !frontier.is_empty() {
            frontier = search.level(levels, frontier)?;
            levels += 1;
        }
        let mut candidates = std::mem::take(&mut search.finished);
        candidates.extend(frontier.into_iter().map(|node| node.path));
        let best = candidates
            .into_iter()
            .max_by(|a, b| {
                a.score.mean().partial_cmp(&b.score.mean()).unwrap_or(std::cmp::Ordering::Equal)
            })
            .ok_or_else(|| Error::usage("the search produced no thought"))?;
        let fork_pages: Vec<String> = search.fork_pages.iter().map(usize::to_string).collect();
        println!(
            "{{\"levels\":{},\"forks\":{},\"shared_pages\":{},\"fork_pages\":[{}],\
             \"best_score\":{:.4}}}",
            levels,
            search.forks,
            shared_pages,
            fork_pages.join(","),
            best.score.mean()
        );
        inferlet::set_return(&best.thoughts.concat())
    })
}
