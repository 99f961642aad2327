//! agent-react: a ReAct agent (Thought / Action / Observation) whose loop runs next to the model.
//!
//! ```text
//! agent-react --tools URL [--max-turns K] [--step-tokens T] [--no-finish] [--task] TEXT
//! ```
//!
//! Each turn the model writes a thought and an action (`search[QUERY]`, `calc[EXPRESSION]` or
//! `finish[ANSWER]`) in at most T tokens; the action is a real HTTP call to the tool service at
//! URL (made by the server, under its tool policy), and its answer is filled into the same
//! context as the observation. The KV cache holds the whole episode: each turn forwards only
//! the tokens it adds, nothing is re-sent or prefilled again. An action the agent cannot parse
//! is taken as a search for the task. The episode ends at `finish` or after K turns
//! (`--no-finish`: always K turns of exactly T tokens, for benchmarks).
//!
//! Each turn is sent as a `message`, a JSON object: `turn`, `action`, `argument`,
//! `observation`, `kv_tokens` (the context's length) and `pages` (its KV page ids, which only
//! ever grow at the end). The return value is `{"answer", "turns", "kv_tokens",
//! "kv_forwarded"}`: the last is how many tokens went through the model, once each.

use inferlet::http::{self, url_encode};
use inferlet::json::string;
use inferlet::serde::Deserialize;
use inferlet::{Args, Context, Error, Message, Model, Result, Sampler, StopCondition};

const SYSTEM: &str = "You answer questions with tools. Each turn, write one line \
'Thought: ...' and then one line 'Action: TOOL[INPUT]', where TOOL is search (look a fact up), \
calc (arithmetic) or finish (give the final answer). The result comes back as 'Observation: ...'.";
const OBSERVATION_CHARS: usize = 300;

struct Options {
    task: String,
    tools: String,
    max_turns: usize,
    step_tokens: usize,
    no_finish: bool,
}

fn parse(mut args: Args) -> Result<Options> {
    let tools: String =
        args.value("--tools")?.ok_or_else(|| Error::usage("no tool service: pass --tools URL"))?;
    let max_turns = args.value_or("--max-turns", 4)?;
    let step_tokens = args.value_or("--step-tokens", 48)?;
    let no_finish = args.flag("--no-finish");
    let task = args.option_or_words("--task")?;
    if task.is_empty() {
        return Err(Error::usage("no task: pass --task TEXT or the text as arguments"));
    }
    let tools = tools.trim_end_matches('/').to_string();
    Ok(Options { task, tools, max_turns, step_tokens, no_finish })
}

/// What the tool service answers: search hits, a calculation, or an error.
#[derive(Deserialize)]
#[serde(crate = "inferlet::serde")]
struct ToolAnswer {
    results: Option<Vec<Hit>>,
    result: Option<f64>,
    error: Option<String>,
}

#[derive(Deserialize)]
#[serde(crate = "inferlet::serde")]
struct Hit {
    text: String,
}

/// The action in a turn's text: the tool and its input.
fn parse_action(text: &str) -> Option<(String, String)> {
    let start = text.find("Action:")? + "Action:".len();
    let rest = text[start..].trim_start();
    let open = rest.find('[')?;
    let close = rest[open..].find(']')? + open;
    let tool = rest[..open].trim().to_lowercase();
    Some((tool, rest[open + 1..close].trim().to_string()))
}

/// Call the tool over HTTP; an error of the call becomes the observation, as in any agent.
fn call_tool(tools: &str, tool: &str, argument: &str) -> String {
    let url = match tool {
        "calc" => format!("{}/calc?expr={}", tools, url_encode(argument)),
        _ => format!("{}/search?q={}", tools, url_encode(argument)),
    };
    match http::get(&url).send_json::<ToolAnswer>().wait() {
        Ok(answer) => describe(answer.json),
        Err(err) => format!("tool error: {}", err),
    }
}

fn describe(answer: ToolAnswer) -> String {
    if let Some(error) = answer.error {
        return format!("error: {}", error);
    }
    if let Some(value) = answer.result {
        return if value.fract() == 0.0 && value.abs() < 1e15 {
            format!("{}", value as i64)
        } else {
            format!("{}", value)
        };
    }
    let hits = answer.results.unwrap_or_default();
    let mut text: String = hits.first().map(|hit| hit.text.clone()).unwrap_or_else(|| "no results".into());
    if text.len() > OBSERVATION_CHARS {
        let mut cut = OBSERVATION_CHARS;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
    }
    text
}

fn report(turn: usize, tool: &str, argument: &str, observation: &str, ctx: &Context) -> Result<()> {
    let pages: Vec<String> = ctx.pages().iter().map(|p| p.to_string()).collect();
    inferlet::send(&format!(
        "{{\"turn\":{},\"action\":{},\"argument\":{},\"observation\":{},\"kv_tokens\":{},\"pages\":[{}]}}",
        turn,
        string(tool),
        string(argument),
        string(observation),
        ctx.tokens().len(),
        pages.join(",")
    ))
}

fn main() {
    inferlet::run(|| {
        let options = parse(Args::load()?)?;
        let model = Model::load()?;
        let mut ctx = model.new_context();
        let prompt =
            model.render_chat(&[Message::system(SYSTEM), Message::user(&options.task)])?;
        ctx.fill(&format!("{}Thought:", prompt))?;
        let sampler = Sampler::greedy();
        let stop = if options.no_finish {
            StopCondition::new(options.step_tokens)
        } else {
            StopCondition::new(options.step_tokens)
                .with_stop_tokens(model.stop_tokens().to_vec())
                .with_stop_strings(vec!["Observation:".to_string()])
        };
        let mut answer = String::new();
        let mut turns = 0;
        while turns < options.max_turns {
            turns += 1;
            let step = ctx.generate(&sampler, &stop)?;
            let (tool, argument) =
                parse_action(&step.text).unwrap_or_else(|| ("search".into(), options.task.clone()));
            if tool == "finish" && !options.no_finish {
                answer = argument.clone();
                report(turns, &tool, &argument, "", &ctx)?;
                break;
            }
            let observation = call_tool(&options.tools, &tool, &argument);
            // Only the new text is filled: the KV of everything before stays where it is.
            ctx.fill(&format!("\nObservation: {}\nThought:", observation))?;
            report(turns, &tool, &argument, &observation, &ctx)?;
            answer = observation;
        }
        inferlet::set_return(&format!(
            "{{\"answer\":{},\"turns\":{},\"kv_tokens\":{},\"kv_forwarded\":{}}}",
            string(&answer),
            turns,
            ctx.tokens().len(),
            ctx.kv_len()
        ))
    })
}
