//! agent-swarm: a planner splits a task into subtasks, launches one worker inferlet per
//! subtask (each with its own context), collects their answers and composes the final answer.
//!
//! ```text
//! agent-swarm --program HASH [--workers N] [--step-tokens T] [--worker-tokens W] [--task] TEXT
//! agent-swarm --role worker [--step-tokens W]          (launched by the planner)
//! ```
//!
//! HASH is this module's own program hash (as uploaded): the planner launches its workers as
//! child instances of itself (`launch`, docs/abi.md), sends each its subtask (`send_to`),
//! receives each worker's answer (`child_receive`) and waits for it to end (`child_wait`). The
//! workers generate concurrently, so their forward passes share the server's batches. A
//! worker's only way out is its parent: it `send`s its answer, which reaches the planner, not
//! a client. If the planner ends early, its workers end with it (`parent_gone`).
//!
//! The planner writes at most T tokens for its plan and for the final answer, each worker at
//! most W (default T) for its answer.
//!
//! The planner asks the model for N subtasks, one per line; missing lines (a small model may
//! write anything) become "Part i of the task". It sends one `message` per worker, a JSON
//! object `{"worker", "subtask", "answer", "reason"}`, and returns `{"subtasks", "answers",
//! "final"}`.

use inferlet::json::{string, string_array};
use inferlet::launch::Child;
use inferlet::{Args, Context, Error, Message, Model, Result, Sampler, StopCondition};

const PLANNER: &str = "You split a task into independent subtasks. Write exactly one subtask \
per line, with no numbering and nothing else.";
const WORKER: &str = "You solve one subtask of a larger task. Answer briefly.";
const COMPOSER: &str = "You compose the final answer to a task from the answers to its parts.";

struct Options {
    role: String,
    task: String,
    program: String,
    workers: usize,
    step_tokens: usize,
    worker_tokens: usize,
}

fn parse(mut args: Args) -> Result<Options> {
    let role = args.value_or("--role", "planner".to_string())?;
    let program = args.value_or("--program", String::new())?;
    let workers = args.value_or("--workers", 3)?;
    let step_tokens = args.value_or("--step-tokens", 32)?;
    let worker_tokens = args.value_or("--worker-tokens", step_tokens)?;
    let task = args.option_or_words("--task")?;
    if role == "planner" {
        if task.is_empty() {
            return Err(Error::usage("no task: pass --task TEXT or the text as arguments"));
        }
        if program.is_empty() {
            return Err(Error::usage("pass --program HASH, this module's own program hash"));
        }
        if workers == 0 {
            return Err(Error::usage("--workers must be at least 1"));
        }
    }
    Ok(Options { role, task, program, workers, step_tokens, worker_tokens })
}

/// Generate up to `tokens` tokens of an answer to `prompt` (a chat turn) in `ctx`.
fn answer(model: &Model, ctx: &mut Context, system: &str, prompt: &str, tokens: usize) -> Result<String> {
    ctx.fill(&model.render_chat(&[Message::system(system), Message::user(prompt)])?)?;
    let stop = StopCondition::new(tokens).with_stop_tokens(model.stop_tokens().to_vec());
    Ok(ctx.generate(&Sampler::greedy(), &stop)?.text.trim().to_string())
}

/// The planner's subtasks: the model's lines, completed to `count` if it wrote fewer.
fn subtasks(plan: &str, task: &str, count: usize) -> Vec<String> {
    let mut lines: Vec<String> = plan
        .lines()
        .map(|line| line.trim_start_matches(|c: char| c == '-' || c == '*' || c.is_ascii_digit() || c == '.'))
        .map(|line| line.trim().to_string())
        .filter(|line| !line.is_empty())
        .take(count)
        .collect();
    while lines.len() < count {
        lines.push(format!("Part {} of {}: {}", lines.len() + 1, count, task));
    }
    lines
}

fn worker(options: &Options) -> Result<()> {
    let subtask = inferlet::receive()?;
    let model = Model::load()?;
    let mut ctx = model.new_context();
    let text = answer(&model, &mut ctx, WORKER, &subtask, options.step_tokens)?;
    // This `send` reaches the planner (the parent), not a client.
    inferlet::send(&text)?;
    inferlet::set_return(&format!("{{\"kv_tokens\":{}}}", ctx.tokens().len()))
}

fn planner(options: &Options) -> Result<()> {
    let model = Model::load()?;
    let mut ctx = model.new_context();
    let prompt = format!("Split this task into {} subtasks: {}", options.workers, options.task);
    let plan = answer(&model, &mut ctx, PLANNER, &prompt, options.step_tokens)?;
    let parts = subtasks(&plan, &options.task, options.workers);
    let step = options.worker_tokens.to_string();
    let mut children = Vec::new();
    for part in &parts {
        let child = Child::launch(&options.program, &["--role", "worker", "--step-tokens", &step])?;
        child.send(part)?;
        children.push(child);
    }
    let mut answers = Vec::new();
    for (index, (child, part)) in children.iter().zip(&parts).enumerate() {
        let reply = child.receive()?.unwrap_or_default();
        let ended = child.wait()?;
        inferlet::send(&format!(
            "{{\"worker\":{},\"subtask\":{},\"answer\":{},\"reason\":{}}}",
            index,
            string(part),
            string(&reply),
            string(&ended.reason)
        ))?;
        answers.push(reply);
    }
    // The composer is a fresh context: the planner's own stays as it was.
    let mut compose = model.new_context();
    let mut brief = format!("Task: {}\n", options.task);
    for (part, reply) in parts.iter().zip(&answers) {
        brief.push_str(&format!("Subtask: {}\nAnswer: {}\n", part, reply));
    }
    let last = answer(&model, &mut compose, COMPOSER, &brief, options.step_tokens)?;
    inferlet::set_return(&format!(
        "{{\"subtasks\":{},\"answers\":{},\"final\":{}}}",
        string_array(&parts),
        string_array(&answers),
        string(&last)
    ))
}

fn main() {
    inferlet::run(|| {
        let options = parse(Args::load()?)?;
        match options.role.as_str() {
            "worker" => worker(&options),
            "planner" => planner(&options),
            other => Err(Error::usage(format!("unknown --role {:?} (planner or worker)", other))),
        }
    })
}
