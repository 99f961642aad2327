//! text-completion: complete a prompt, streaming the text to the client as it is generated.
//!
//! ```text
//! text-completion [--prompt] TEXT [--max-tokens N] [--temperature T] [--top-p P] [--top-k K]
//!                 [--seed S] [--chat] [--system TEXT] [--ignore-eos] [--stop TEXT]...
//! ```
//!
//! The prompt goes through one forward pass and every further token through one more, each
//! sampled on the host (temperature 0, the default, is greedy) — the same tokens as a plain
//! host-side loop. `--chat` wraps the prompt in the model's ChatML template (as a user turn).
//! Each piece of decoded text is sent as a `message`; the full text is the return value.
//!
//! `--stop` may be given any number of times: generation ends at the earliest match of any of
//! them, and neither the stop string nor anything after it is sent or returned. Text that might
//! be the start of a stop string is held back until the next tokens tell.

use inferlet::{Args, Message, Model, Result, Sampler, StopCondition};

struct Options {
    prompt: String,
    max_tokens: usize,
    sampler: Sampler,
    chat: bool,
    system: Option<String>,
    ignore_eos: bool,
    stop: Vec<String>,
}

fn parse(mut args: Args) -> Result<Options> {
    let max_tokens = args.value_or("--max-tokens", 128)?;
    let temperature: f64 = args.value_or("--temperature", 0.0)?;
    let top_p: Option<f64> = args.value("--top-p")?;
    let top_k: Option<u32> = args.value("--top-k")?;
    let seed: Option<u64> = args.value("--seed")?;
    let system: Option<String> = args.value("--system")?;
    let stop: Vec<String> = args.values("--stop")?;
    let chat = args.flag("--chat");
    let ignore_eos = args.flag("--ignore-eos");
    let prompt = args.option_or_words("--prompt")?;
    if prompt.is_empty() {
        return Err(inferlet::Error::usage(
            "no prompt: pass --prompt TEXT or the text as arguments",
        ));
    }
    let mut sampler = Sampler::new(temperature);
    sampler.top_p = top_p;
    sampler.top_k = top_k;
    sampler.seed = seed;
    Ok(Options { prompt, max_tokens, sampler, chat, system, ignore_eos, stop })
}

fn main() {
    inferlet::run(|| {
        let options = parse(Args::load()?)?;
        let model = Model::load()?;
        let prompt = if options.chat {
            let mut messages = Vec::new();
            if let Some(system) = &options.system {
                messages.push(Message::system(system));
            }
            messages.push(Message::user(&options.prompt));
            model.render_chat(&messages)?
        } else {
            options.prompt.clone()
        };
        let stop_tokens =
            if options.ignore_eos { Vec::new() } else { model.stop_tokens().to_vec() };
        let stop = StopCondition::new(options.max_tokens)
            .with_stop_tokens(stop_tokens)
            .with_stop_strings(options.stop.clone());

        let mut ctx = model.new_context();
        ctx.fill(&prompt)?;
        let generated = ctx.generate_streaming(&options.sampler, &stop, inferlet::send)?;
        inferlet::set_return(&generated.text)
    })
}
