//! constrained-decoding: generate text that a JSON Schema, a regular expression or a Lark
//! grammar allows, for any number of grammars side by side.
//!
//! ```text
//! constrained-decoding --grammar KIND:SOURCE... [--prompt TEXT]... [--max-tokens N]
//!                      [--temperature T] [--seed S] [--chat]
//! ```
//!
//! KIND is `json_schema`, `regex` or `lark`. Give one `--prompt` for every grammar, or one for
//! all of them; `--chat` wraps each prompt in the model's chat template as a user turn. Each
//! grammar is compiled on the host and gets its own context, queue and matcher; all of them
//! step in the same scheduler tick, the host masking each one's vocabulary inside the batched
//! forward. A grammar that does not compile is reported and the others go on.
//!
//! Each job's result is sent when it ends, as `{"index": i, "text": ..., "complete": bool}`
//! (`complete`: the grammar was finished, not cut by `--max-tokens`) or
//! `{"index": i, "error": ...}`; the return value is the JSON array of them all, in order.

use inferlet::{
    join_all, json, Args, Context, Error, Grammar, GrammarKind, Matcher, Message, Model, Queue,
    Result, Sampler, Step, StepOptions, StopCondition,
};

struct Options {
    grammars: Vec<(GrammarKind, String)>,
    prompts: Vec<String>,
    max_tokens: usize,
    sampler: Sampler,
    chat: bool,
}

/// One grammar's generation.
struct Job {
    index: usize,
    matcher: Matcher,
    ctx: Context,
    tokens: Vec<u32>,
    steps: u64,
    complete: bool,
    finished: bool,
}

fn parse(mut args: Args) -> Result<Options> {
    let specs: Vec<String> = args.values("--grammar")?;
    let prompts: Vec<String> = args.values("--prompt")?;
    let max_tokens = args.value_or("--max-tokens", 64)?;
    let temperature: f64 = args.value_or("--temperature", 0.0)?;
    let seed: Option<u64> = args.value("--seed")?;
    let chat = args.flag("--chat");
    if specs.is_empty() {
        return Err(Error::usage("no grammar: pass --grammar KIND:SOURCE"));
    }
    if prompts.len() > 1 && prompts.len() != specs.len() {
        return Err(Error::usage(format!(
            "{} prompts for {} grammars: give one prompt, or one per grammar",
            prompts.len(),
            specs.len()
        )));
    }
    let grammars = specs.iter().map(|spec| parse_spec(spec)).collect::<Result<Vec<_>>>()?;
    let mut sampler = Sampler::new(temperature);
    sampler.seed = seed;
    Ok(Options { grammars, prompts, max_tokens, sampler, chat })
}

fn parse_spec(spec: &str) -> Result<(GrammarKind, String)> {
    let (kind, source) = spec
        .split_once(':')
        .ok_or_else(|| Error::usage(format!("--grammar {:?}: expected KIND:SOURCE", spec)))?;
    let kind = GrammarKind::from_name(kind).ok_or_else(|| {
        Error::usage(format!("--grammar: unknown kind {:?} (json_schema, regex or lark)", kind))
    })?;
    Ok((kind, source.to_string()))
}

fn prompt_for(model: &Model, options: &Options, index: usize) -> Result<String> {
    let prompt = options.prompts.get(index).or_else(|| options.prompts.first());
    let prompt = prompt.map(String::as_str).unwrap_or("");
    if options.chat {
        model.render_chat(&[Message::user(prompt)])
    } else {
        Ok(prompt.to_string())
    }
}

fn result_json(index: usize, outcome: &std::result::Result<(String, bool), String>) -> String {
    match outcome {
        Ok((text, complete)) => format!(
            "{{\"index\":{},\"text\":{},\"complete\":{}}}",
            index,
            json::string(text),
            complete
        ),
        Err(message) => format!("{{\"index\":{},\"error\":{}}}", index, json::string(message)),
    }
}

/// Compile every grammar and start a job for each one that compiles; the errors of the others
/// are their results.
fn start_jobs(
    model: &Model,
    options: &Options,
    results: &mut [Option<String>],
) -> Result<Vec<Job>> {
    let mut jobs = Vec::new();
    for (index, (kind, source)) in options.grammars.iter().enumerate() {
        let matcher = match Grammar::compile(*kind, source).and_then(|g| g.matcher()) {
            Ok(matcher) => matcher,
            Err(Error::Host(message)) => {
                let result = result_json(index, &Err(message));
                inferlet::send(&result)?;
                results[index] = Some(result);
                continue;
            }
            Err(other) => return Err(other),
        };
        let mut ctx = model.new_context_on(Queue::create(0)?);
        ctx.fill(&prompt_for(model, options, index)?)?;
        let job = Job {
            index,
            matcher,
            ctx,
            tokens: Vec::new(),
            steps: 0,
            complete: false,
            finished: false,
        };
        jobs.push(job);
    }
    Ok(jobs)
}

/// One decode step for every unfinished job, all submitted before waiting.
fn step_all(jobs: &mut [Job], sampler: &Sampler) -> Result<Vec<(usize, u32, bool)>> {
    let active: Vec<usize> = (0..jobs.len()).filter(|&i| !jobs[i].finished).collect();
    let steps = jobs
        .iter_mut()
        .filter(|job| !job.finished)
        .map(|job| {
            let options =
                StepOptions::sample(&sampler.for_step(job.steps).with_matcher(&job.matcher));
            job.ctx.step_async(&options)
        })
        .collect::<Result<Vec<Step<'_>>>>()?;
    let outputs = join_all(steps)?;
    let mut sampled = Vec::with_capacity(outputs.len());
    for (&i, output) in active.iter().zip(&outputs) {
        let token = output.token.ok_or_else(|| Error::Decode("no sampled token".into()))?;
        sampled.push((i, token, output.done));
    }
    Ok(sampled)
}

fn run_jobs(
    jobs: &mut [Job],
    options: &Options,
    stop_tokens: &[u32],
) -> Result<Vec<(usize, String)>> {
    let mut finished = Vec::new();
    while jobs.iter().any(|job| !job.finished) {
        for (i, token, done) in step_all(jobs, &options.sampler)? {
            let job = &mut jobs[i];
            job.steps += 1;
            job.complete = done;
            if !stop_tokens.contains(&token) {
                job.tokens.push(token);
            }
            let out_of_room = job.steps as usize >= options.max_tokens || job.ctx.is_full();
            if done || stop_tokens.contains(&token) || out_of_room {
                job.finished = true;
                let text = inferlet::tokenizer::detokenize(&job.tokens)?;
                let result = result_json(job.index, &Ok((text, job.complete)));
                inferlet::send(&result)?;
                finished.push((job.index, result));
            }
        }
    }
    Ok(finished)
}

/// A single grammar takes the SDK's one-context path.
fn run_single(job: &mut Job, options: &Options, stop_tokens: &[u32]) -> Result<(usize, String)> {
    let stop = StopCondition::new(options.max_tokens).with_stop_tokens(stop_tokens.to_vec());
    let out = job.matcher.generate(&mut job.ctx, &options.sampler, &stop)?;
    let result = result_json(job.index, &Ok((out.text, out.complete)));
    inferlet::send(&result)?;
    Ok((job.index, result))
}

fn main() {
    inferlet::run(|| {
        let options = parse(Args::load()?)?;
        let model = Model::load()?;
        let mut results: Vec<Option<String>> = vec![None; options.grammars.len()];
        let mut jobs = start_jobs(&model, &options, &mut results)?;
        let stop_tokens = model.stop_tokens().to_vec();
        let finished = if jobs.len() == 1 && options.grammars.len() == 1 {
            vec![run_single(&mut jobs[0], &options, &stop_tokens)?]
        } else {
            run_jobs(&mut jobs, &options, &stop_tokens)?
        };
        for (index, result) in finished {
            results[index] = Some(result);
        }
        let all: Vec<String> = results.into_iter().map(|r| r.unwrap_or_default()).collect();
        inferlet::set_return(&format!("[{}]", all.join(",")))
    })
}
