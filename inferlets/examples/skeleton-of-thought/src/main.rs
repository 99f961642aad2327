//! skeleton-of-thought: an outline first, then every point expanded at once, in forks of one
//! context that advance in the same scheduler ticks.
//!
//! ```text
//! skeleton-of-thought [--prompt] QUESTION [--points N] [--outline-tokens M] [--point-tokens K]
//!                     [--outline "A|B|C"] [--sequential] [--ignore-eos]
//! ```
//!
//! The question goes to the model as a chat turn asking for a numbered outline of at most N
//! points (4), generated greedily (at most M tokens, 64) — or, with `--outline`, the given
//! points are filled as the assistant's answer. The points are read from the list. The context
//! (question and outline) is flushed once; each point gets a fork of it on its own queue (full
//! pages shared, copy-on-write) plus a user turn asking to expand that point, and all forks
//! generate together (at most K tokens each, 48): one forward batch per step for all of them.
//! `--sequential` expands the points one after another instead (the same text, for comparison).
//!
//! Messages: `{"outline": [points]}`, then `{"index": i, "point": P, "text": T}` per point. The
//! return value is the assembled answer. A last line on stdout reports
//! `{"points": n, "shared_pages": S, "fork_pages": [..]}`: the pages every fork shares and the
//! pages each fork's context spans at the end (shared ones included).

mod outline;

use inferlet::{generate_parallel, json, Args, Context, Error, Generation, Message, Model};
use inferlet::{FinishReason, Queue, Result, Sampler, StopCondition};

struct Options {
    question: String,
    points: usize,
    outline_tokens: usize,
    point_tokens: usize,
    outline: Option<String>,
    sequential: bool,
    ignore_eos: bool,
}

fn parse(mut args: Args) -> Result<Options> {
    let points = args.value_or("--points", 4)?;
    let outline_tokens = args.value_or("--outline-tokens", 64)?;
    let point_tokens = args.value_or("--point-tokens", 48)?;
    let outline = args.value("--outline")?;
    let sequential = args.flag("--sequential");
    let ignore_eos = args.flag("--ignore-eos");
    let question = args.option_or_words("--prompt")?;
    if question.is_empty() || points == 0 {
        return Err(Error::usage("need a question and --points of at least 1"));
    }
    Ok(Options { question, points, outline_tokens, point_tokens, outline, sequential, ignore_eos })
}

/// Fill the question and the outline (generated or given) into `root`, ending the assistant's
/// turn; returns the points.
fn write_outline(model: &Model, root: &mut Context, options: &Options) -> Result<Vec<String>> {
    let request = outline::outline_request(&options.question, options.points);
    root.fill(&model.render_chat(&[Message::user(&request)])?)?;
    let end_of_turn = "<|im_end|>";
    let points = match &options.outline {
        Some(given) => {
            let points: Vec<String> = given.split('|').map(|p| p.trim().to_string()).collect();
            root.fill(&outline::numbered_list(&points))?;
            root.fill(end_of_turn)?;
            points
        }
        None => {
            let stop = StopCondition::new(options.outline_tokens)
                .with_stop_tokens(model.stop_tokens().to_vec());
            let generated = root.generate(&Sampler::greedy(), &stop)?;
            // A stop token ends the turn already (it is the pending token); a cut-off outline
            // gets its end of turn here.
            if !matches!(generated.finish, FinishReason::StopToken(_)) {
                root.fill(end_of_turn)?;
            }
            outline::parse_points(&generated.text, options.points)
        }
    };
    if points.is_empty() || points.iter().any(|p| p.is_empty()) {
        return Err(Error::usage("the outline has no points to expand"));
    }
    root.flush()?;
    Ok(points)
}

fn main() {
    inferlet::run(|| {
        let options = parse(Args::load()?)?;
        let model = Model::load()?;
        let mut root = model.new_context();
        let points = write_outline(&model, &mut root, &options)?;
        inferlet::send(&format!("{{\"outline\":{}}}", json::string_array(&points)))?;

        let shared_pages = root.kv_len() / root.page_size();
        let stop_tokens =
            if options.ignore_eos { Vec::new() } else { model.stop_tokens().to_vec() };
        let stop = StopCondition::new(options.point_tokens).with_stop_tokens(stop_tokens);
        let mut forks = Vec::with_capacity(points.len());
        let mut generations = Vec::with_capacity(points.len());
        for (i, point) in points.iter().enumerate() {
            let mut fork = root.fork_on(Queue::create(0)?)?;
            fork.fill(&outline::expansion_turn(i, point))?;
            forks.push(fork);
            generations.push(Generation::new(&Sampler::greedy(), &stop));
        }
        drop(root);

        if options.sequential {
            for i in 0..forks.len() {
                generate_parallel(&mut forks[i..=i], &mut generations[i..=i], |_, _| Ok(()))?;
            }
        } else {
            generate_parallel(&mut forks, &mut generations, |_, _| Ok(()))?;
        }

        let fork_pages: Vec<String> = forks.iter().map(|f| f.pages().len().to_string()).collect();
        let mut answer = Vec::with_capacity(points.len());
        for (i, (point, generation)) in points.iter().zip(generations).enumerate() {
            let text = generation.finish()?.text;
            inferlet::send(&format!(
                "{{\"index\":{},\"point\":{},\"text\":{}}}",
                i,
                json::string(point),
                json::string(&text)
            ))?;
            answer.push(format!("{}. {}\n{}", i + 1, point, text.trim()));
        }
        println!(
            "{{\"points\":{},\"shared_pages\":{},\"fork_pages\":[{}]}}",
            points.len(),
            shared_pages,
            fork_pages.join(",")
        );
        inferlet::set_return(&answer.join("\n\n"))
    })
}
