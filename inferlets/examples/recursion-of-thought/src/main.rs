//! recursion-of-thought: a problem solved by a context that spawns sub-problems, each solved in
//! a fork of its parent's context, recursively up to a depth limit; the sub-answers go back to
//! the parent, which answers with them.
//!
//! ```text
//! recursion-of-thought [--prompt] PROBLEM [--max-subproblems S] [--depth D] [--plan-tokens P]
//!                      [--answer-tokens K] [--subproblems "A|B;C|D"] [--sequential] [--ignore-eos]
//! ```
//!
//! A node is a question in its own context. Below the depth limit D (2) a node's chat turn asks
//! for at most S sub-questions (3) as a numbered list, generated greedily (P tokens, 48), or
//! given with `--subproblems` (levels separated by `;`, the sub-questions of every node at that
//! depth by `|`; a node deeper than the levels given answers directly). The context is flushed
//! and every sub-question gets a fork of it on its own queue (its full pages shared,
//! copy-on-write) with a user turn holding the sub-question: the child sees everything its
//! ancestors wrote and prefills only its own turn. At depth D a node is asked for the answer
//! directly. The recursion is unrolled by depth so that whole levels advance together: on the
//! way down every node of a depth writes its list in the same forward batches; on the way up
//! every node of a depth answers greedily (K tokens, 48) in the same forward batches — a node
//! that recursed gets a user turn with its sub-questions' answers (as text) first, and its
//! children's contexts are dropped (their pages freed) before it generates. The root's answer
//! is the result. `--sequential` generates each level's nodes one after another instead (the
//! same text).
//!
//! Messages: per recursing depth `{"depth": d, "subproblems": [[..] per node]}`, then per node,
//! deepest first, `{"depth", "parent", "question", "answer"}` (`parent`: the index of the parent
//! in the depth above, null for the root). Returns the root's answer. A last line on stdout
//! reports `{"forks", "depth", "nodes": [..], "tokens", "root_pages", "shared_pages": [..],
//! "fork_pages": [..]}`: the nodes per depth, the tokens generated, the pages the root's context
//! spans at the end, and per fork the parent's full pages it shared and the pages its context
//! spans at the end (shared ones included).

mod turns;

use inferlet::{generate_parallel, json, Args, Context, Error, FinishReason, Generated};
use inferlet::{Generation, Message, Model, Queue, Result, Sampler, StopCondition};

struct Options {
    problem: String,
    given: Option<Vec<Vec<String>>>,
    max_subproblems: usize,
    depth: usize,
    plan_tokens: usize,
    answer_tokens: usize,
    sequential: bool,
    ignore_eos: bool,
}

fn parse(mut args: Args) -> Result<Options> {
    let given = args.value::<String>("--subproblems")?.map(|text| given_levels(&text));
    let max_subproblems = args.value_or("--max-subproblems", 3)?;
    let depth = args.value_or("--depth", 2)?;
    let plan_tokens = args.value_or("--plan-tokens", 48)?;
    let answer_tokens = args.value_or("--answer-tokens", 48)?;
    let sequential = args.flag("--sequential");
    let ignore_eos = args.flag("--ignore-eos");
    let problem = args.option_or_words("--prompt")?;
    if problem.is_empty() || max_subproblems == 0 {
        return Err(Error::usage("need a problem and --max-subproblems of at least 1"));
    }
    if given.iter().flatten().flatten().any(String::is_empty) {
        return Err(Error::usage("--subproblems has an empty sub-question"));
    }
    let options = Options {
        problem,
        given,
        max_subproblems,
        depth,
        plan_tokens,
        answer_tokens,
        sequential,
        ignore_eos,
    };
    Ok(options)
}

/// `"A|B;C|D"`: the sub-questions of every node at depth 0, then of every node at depth 1.
fn given_levels(text: &str) -> Vec<Vec<String>> {
    let level = |items: &str| items.split('|').map(|item| item.trim().to_string()).collect();
    text.split(';').map(level).collect()
}

/// A (sub-)question of the recursion.
struct Node {
    question: String,
    /// The parent's index in the depth above; none for the root.
    parent: Option<usize>,
    /// The parent's full pages this node's context shares.
    shared_pages: usize,
    subquestions: Vec<String>,
    answer: String,
}

impl Node {
    fn new(question: &str, parent: Option<usize>, shared_pages: usize) -> Node {
        let (question, subquestions, answer) = (question.to_string(), Vec::new(), String::new());
        Node { question, parent, shared_pages, subquestions, answer }
    }
}

/// The nodes of one depth, and their contexts apart so that they can generate together.
#[derive(Default)]
struct Level {
    contexts: Vec<Context>,
    nodes: Vec<Node>,
}

/// The recursion's state across depths.
struct Recursion<'a> {
    options: &'a Options,
    plan_stop: StopCondition,
    answer_stop: StopCondition,
    /// One queue per node of the widest depth, so that a depth's nodes batch together; depths
    /// never generate at the same time, so they reuse the queues.
    queues: Vec<Queue>,
    tokens: usize,
    root_pages: usize,
    /// Per fork: the pages it shared with its parent and the pages it spans at the end.
    forks: Vec<(usize, usize)>,
}

impl<'a> Recursion<'a> {
    fn new(options: &'a Options, model: &Model) -> Recursion<'a> {
        let stop_tokens =
            if options.ignore_eos { Vec::new() } else { model.stop_tokens().to_vec() };
        Recursion {
            options,
            plan_stop: StopCondition::new(options.plan_tokens)
                .with_stop_tokens(stop_tokens.clone()),
            answer_stop: StopCondition::new(options.answer_tokens).with_stop_tokens(stop_tokens),
            queues: Vec::new(),
            tokens: 0,
            root_pages: 0,
            forks: Vec::new(),
        }
    }

    /// Whether the nodes at `depth` split their question (or answer it directly).
    fn recurses(&self, depth: usize) -> bool {
        let given = self.options.given.as_ref();
        depth < self.options.depth && given.map_or(true, |levels| depth < levels.len())
    }

    /// What a node at `depth` is asked first.
    fn request(&self, depth: usize, question: &str) -> String {
        if self.recurses(depth) {
            turns::plan_request(question, self.options.max_subproblems)
        } else {
            turns::answer_request(question)
        }
    }

    fn queue(&mut self, index: usize) -> Result<Queue> {
        while self.queues.len() <= index {
            self.queues.push(Queue::create(0)?);
        }
        Ok(self.queues[index])
    }

    /// Greedy generations in every context of `contexts`, together (or one after another).
    fn generate(
        &mut self,
        contexts: &mut [Context],
        stop: &StopCondition,
    ) -> Result<Vec<Generated>> {
        let mut generations: Vec<Generation> =
            contexts.iter().map(|_| Generation::new(&Sampler::greedy(), stop)).collect();
        if self.options.sequential {
            for i in 0..contexts.len() {
                generate_parallel(&mut contexts[i..=i], &mut generations[i..=i], |_, _| Ok(()))?;
            }
        } else {
            generate_parallel(contexts, &mut generations, |_, _| Ok(()))?;
        }
        let generated = generations.into_iter().map(Generation::finish);
        let generated = generated.collect::<Result<Vec<Generated>>>()?;
        self.tokens += generated.iter().map(|g| g.tokens.len()).sum::<usize>();
        Ok(generated)
    }

    /// Give every node of `level` its sub-questions (the given ones, or its own numbered list,
    /// all written together), close its turn and flush it for forking.
    fn split(&mut self, depth: usize, level: &mut Level) -> Result<()> {
        let given = self.options.given.as_ref().map(|levels| levels[depth].clone());
        if let Some(items) = given {
            for (ctx, node) in level.contexts.iter_mut().zip(&mut level.nodes) {
                ctx.fill(&turns::numbered_list(&items))?;
                ctx.fill(turns::END_OF_TURN)?;
                node.subquestions = items.clone();
            }
        } else {
            let stop = self.plan_stop.clone();
            let generated = self.generate(&mut level.contexts, &stop)?;
            for (i, plan) in generated.into_iter().enumerate() {
                // A stop token ends the turn already (it is the pending token).
                if !matches!(plan.finish, FinishReason::StopToken(_)) {
                    level.contexts[i].fill(turns::END_OF_TURN)?;
                }
                let limit = self.options.max_subproblems;
                level.nodes[i].subquestions = turns::parse_list(&plan.text, limit);
            }
        }
        for ctx in &mut level.contexts {
            ctx.flush()?;
        }
        let lists: Vec<String> =
            level.nodes.iter().map(|node| json::string_array(&node.subquestions)).collect();
        inferlet::send(&format!("{{\"depth\":{},\"subproblems\":[{}]}}", depth, lists.join(",")))
    }

    /// The next depth: a fork of the parent's context per sub-question, each on its own queue,
    /// with the sub-question's turn filled.
    fn fork_children(&mut self, depth: usize, level: &Level) -> Result<Level> {
        let mut children = Level::default();
        for (p, (ctx, node)) in level.contexts.iter().zip(&level.nodes).enumerate() {
            let shared_pages = ctx.kv_len() / ctx.page_size();
            for question in &node.subquestions {
                let mut child = ctx.fork_on(self.queue(children.contexts.len())?)?;
                child.fill(&turns::user_turn(&self.request(depth + 1, question)))?;
                children.contexts.push(child);
                children.nodes.push(Node::new(question, Some(p), shared_pages));
            }
        }
        Ok(children)
    }

    /// Every node of `level` answers, all together; a node that split its question first reads
    /// its sub-questions' answers from `below` (the depth beneath, answered already, whose
    /// contexts are dropped here, before the answers are generated).
    fn answer(&mut self, depth: usize, level: &mut Level, below: Option<Level>) -> Result<()> {
        if self.recurses(depth) {
            let below = below.map(|level| level.nodes).unwrap_or_default();
            for (p, ctx) in level.contexts.iter_mut().enumerate() {
                let sub_answers: Vec<(String, String)> = below
                    .iter()
                    .filter(|child| child.parent == Some(p))
                    .map(|child| (child.question.clone(), child.answer.clone()))
                    .collect();
                ctx.fill(&turns::user_turn(&turns::answer_with(&sub_answers)))?;
            }
        }
        let stop = self.answer_stop.clone();
        let generated = self.generate(&mut level.contexts, &stop)?;
        for ((ctx, node), answer) in level.contexts.iter().zip(&mut level.nodes).zip(generated) {
            match node.parent {
                Some(_) => self.forks.push((node.shared_pages, ctx.pages().len())),
                None => self.root_pages = ctx.pages().len(),
            }
            node.answer = answer.text;
            let parent = node.parent.map_or_else(|| "null".to_string(), |p| p.to_string());
            inferlet::send(&format!(
                "{{\"depth\":{},\"parent\":{},\"question\":{},\"answer\":{}}}",
                depth,
                parent,
                json::string(&node.question),
                json::string(&node.answer)
            ))?;
        }
        Ok(())
    }
}

fn join<T: ToString>(items: impl Iterator<Item = T>) -> String {
    items.map(|item| item.to_string()).collect::<Vec<String>>().join(",")
}

fn main() {
    inferlet::run(|| {
        let options = parse(Args::load()?)?;
        let model = Model::load()?;
        let mut recursion = Recursion::new(&options, &model);
        let mut root = model.new_context();
        let request = recursion.request(0, &options.problem);
        root.fill(&model.render_chat(&[Message::user(&request)])?)?;
        let root_node = Node::new(&options.problem, None, 0);
        let mut levels = vec![Level { contexts: vec![root], nodes: vec![root_node] }];

        // Down: split, fork, one depth at a time.
        while recursion.recurses(levels.len() - 1) {
            let depth = levels.len() - 1;
            let level = levels.last_mut().expect("the root's level");
            recursion.split(depth, level)?;
            let children = recursion.fork_children(depth, level)?;
            if children.nodes.is_empty() {
                break;
            }
            levels.push(children);
        }
        let widths: Vec<usize> = levels.iter().map(|level| level.nodes.len()).collect();

        // Up: every depth answers with the answers of the depth beneath.
        let mut below = None;
        while let Some(mut level) = levels.pop() {
            recursion.answer(levels.len(), &mut level, below.take())?;
            below = Some(level);
        }
        let root = below.expect("the root's level");
        println!(
            "{{\"forks\":{},\"depth\":{},\"nodes\":[{}],\"tokens\":{},\"root_pages\":{},\
             \"shared_pages\":[{}],\"fork_pages\":[{}]}}",
            recursion.forks.len(),
            widths.len() - 1,
            join(widths.iter()),
            recursion.tokens,
            recursion.root_pages,
            join(recursion.forks.iter().map(|fork| fork.0)),
            join(recursion.forks.iter().map(|fork| fork.1))
        );
        inferlet::set_return(&root.nodes[0].answer)
    })
}
