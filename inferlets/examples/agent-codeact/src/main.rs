//! agent-codeact: a CodeAct agent. The model acts by writing Python; the code runs in the tool
//! service's sandbox (`POST URL/run`, made by the server under its tool policy) and what it
//! printed comes back as the observation.
//!
//! ```text
//! agent-codeact --tools URL [--max-turns K] [--step-tokens T] [--task] TEXT
//! ```
//!
//! Each turn the model writes either a program in a ```python block or a line
//! `Final Answer: ...`, in at most T tokens. A program is posted to the tool service as
//! `{"code": ...}`; its stdout (or its error, or that it timed out) is filled into the same
//! context as `Observation: ...`, so the KV cache holds the whole episode and each turn
//! forwards only the tokens it adds. A turn with neither a code block nor a final answer has
//! its whole text run as code (the error it gets is the model's feedback). The episode ends at
//! a final answer or after K turns.
//!
//! Each turn is sent as a `message`, a JSON object `{"turn", "code", "observation"}` (no
//! `code` on the final-answer turn). The return value is `{"answer", "turns", "finished"}`;
//! `finished` is false when the turn limit ended the episode (`answer` is then the last
//! observation).

use inferlet::http;
use inferlet::json::string;
use inferlet::serde::{Deserialize, Serialize};
use inferlet::{Args, Error, Message, Model, Result, Sampler, StopCondition};

const SYSTEM: &str = "You solve tasks by writing Python. Each turn, either write a program in a \
```python code block that prints what you need (its output comes back as 'Observation: ...'), or, \
once you know the answer, write one line 'Final Answer: ...'.";
const OBSERVATION_CHARS: usize = 400;
const FINAL: &str = "Final Answer:";

struct Options {
    task: String,
    tools: String,
    max_turns: usize,
    step_tokens: usize,
}

fn parse(mut args: Args) -> Result<Options> {
    let tools: String =
        args.value("--tools")?.ok_or_else(|| Error::usage("no tool service: pass --tools URL"))?;
    let max_turns = args.value_or("--max-turns", 4)?;
    let step_tokens = args.value_or("--step-tokens", 96)?;
    let task = args.option_or_words("--task")?;
    if task.is_empty() {
        return Err(Error::usage("no task: pass --task TEXT or the text as arguments"));
    }
    let tools = tools.trim_end_matches('/').to_string();
    Ok(Options { task, tools, max_turns, step_tokens })
}

#[derive(Serialize)]
#[serde(crate = "inferlet::serde")]
struct RunRequest<'a> {
    code: &'a str,
}

/// What `/run` answers.
#[derive(Deserialize)]
#[serde(crate = "inferlet::serde")]
struct RunAnswer {
    stdout: Option<String>,
    stderr: Option<String>,
    exit_code: Option<i64>,
    timed_out: Option<bool>,
}

/// The turn's action: `Ok(answer)` for a final answer, `Err(code)` for a program to run.
fn parse_turn(text: &str) -> std::result::Result<String, String> {
    if let Some(start) = text.find("```python") {
        let body = &text[start + "```python".len()..];
        let end = body.find("```").unwrap_or(body.len());
        return Err(body[..end].trim().to_string());
    }
    if let Some(start) = text.find(FINAL) {
        let rest = text[start + FINAL.len()..].lines().next().unwrap_or("");
        return Ok(rest.trim().to_string());
    }
    Err(text.trim().to_string())
}

/// Run `code` in the tool service; a failed call becomes the observation, as in any agent.
fn run_code(tools: &str, code: &str) -> String {
    let request = http::post(&format!("{}/run", tools)).json(&RunRequest { code });
    match request.send_json::<RunAnswer>().wait() {
        Ok(answer) => describe(answer.json),
        Err(err) => format!("tool error: {}", err),
    }
}

fn describe(answer: RunAnswer) -> String {
    if answer.timed_out == Some(true) {
        return "the program ran past its time limit".into();
    }
    let stdout = answer.stdout.unwrap_or_default();
    let stderr = answer.stderr.unwrap_or_default();
    let mut text = if answer.exit_code == Some(0) {
        if stdout.trim().is_empty() { "(no output)".to_string() } else { stdout.trim().to_string() }
    } else {
        format!("error: {}", stderr.trim().lines().last().unwrap_or("the program failed"))
    };
    if text.len() > OBSERVATION_CHARS {
        let mut cut = OBSERVATION_CHARS;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
    }
    text
}

fn main() {
    inferlet::run(|| {
        let options = parse(Args::load()?)?;
        let model = Model::load()?;
        let mut ctx = model.new_context();
        let prompt =
            model.render_chat(&[Message::system(SYSTEM), Message::user(&options.task)])?;
        ctx.fill(&prompt)?;
        let sampler = Sampler::greedy();
        let stop = StopCondition::new(options.step_tokens)
            .with_stop_tokens(model.stop_tokens().to_vec())
            .with_stop_strings(vec!["Observation:".to_string()]);
        let mut answer = String::new();
        let mut finished = false;
        let mut turns = 0;
        while turns < options.max_turns {
            turns += 1;
            let step = ctx.generate(&sampler, &stop)?;
            match parse_turn(&step.text) {
                Ok(final_answer) => {
                    answer = final_answer;
                    finished = true;
                    inferlet::send(&format!(
                        "{{\"turn\":{},\"observation\":\"\",\"answer\":{}}}",
                        turns,
                        string(&answer)
                    ))?;
                    break;
                }
                Err(code) => {
                    let observation = run_code(&options.tools, &code);
                    // Only the new text is filled: the KV of the episode so far stays put.
                    ctx.fill(&format!("\nObservation: {}\n", observation))?;
                    inferlet::send(&format!(
                        "{{\"turn\":{},\"code\":{},\"observation\":{}}}",
                        turns,
                        string(&code),
                        string(&observation)
                    ))?;
                    answer = observation;
                }
            }
        }
        inferlet::set_return(&format!(
            "{{\"answer\":{},\"turns\":{},\"finished\":{}}}",
            string(&answer),
            turns,
            finished
        ))
    })
}
