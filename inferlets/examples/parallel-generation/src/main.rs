//! parallel-generation: several continuations of one prompt, generated side by side.
//!
//! ```text
//! parallel-generation [--prompt] TEXT [--n N] [--max-tokens M] [--temperature T] [--top-p P]
//!                     [--seed S] [--chat] [--ignore-eos]
//! ```
//!
//! The prompt is filled and forwarded once; N forks share its full KV pages (the partial last
//! page is filled again in each fork). Each fork lives on its own queue and all their decode
//! steps are submitted before waiting, so the N sequences advance in the same scheduler tick.
//! Fork i samples with seed S + 1000·i (when a seed is given). Each finished continuation is
//! sent as `{"index": i, "text": ...}`; the return value is the JSON array of the N texts.

use inferlet::{
    generate_parallel, json, Args, Generation, Message, Model, Queue, Sampler, StopCondition,
};

/// Seeds of different forks stay apart for this many steps.
const SEED_STRIDE: u64 = 1000;

fn main() {
    inferlet::run(|| {
        let mut args = Args::load()?;
        let n: usize = args.value_or("--n", 4)?;
        let max_tokens: usize = args.value_or("--max-tokens", 32)?;
        let temperature: f64 = args.value_or("--temperature", 0.8)?;
        let top_p: Option<f64> = args.value("--top-p")?;
        let seed: Option<u64> = args.value("--seed")?;
        let chat = args.flag("--chat");
        let ignore_eos = args.flag("--ignore-eos");
        let prompt = args.option_or_words("--prompt")?;
        if prompt.is_empty() || n == 0 {
            return Err(inferlet::Error::usage("need a prompt and --n of at least 1"));
        }

        let model = Model::load()?;
        let prompt = if chat { model.render_chat(&[Message::user(&prompt)])? } else { prompt };
        let mut root = model.new_context();
        root.fill(&prompt)?;
        root.flush()?;

        let mut forks = Vec::with_capacity(n);
        let mut generations = Vec::with_capacity(n);
        let stop_tokens = if ignore_eos { Vec::new() } else { model.stop_tokens().to_vec() };
        let stop = StopCondition::new(max_tokens).with_stop_tokens(stop_tokens);
        for i in 0..n {
            forks.push(root.fork_on(Queue::create(0)?)?);
            let mut sampler = Sampler::new(temperature);
            sampler.top_p = top_p;
            sampler.seed = seed.map(|s| s.wrapping_add(SEED_STRIDE * i as u64));
            generations.push(Generation::new(&sampler, &stop));
        }
        drop(root);

        generate_parallel(&mut forks, &mut generations, |_, _| Ok(()))?;

        let mut texts = Vec::with_capacity(n);
        for (i, generation) in generations.into_iter().enumerate() {
            let text = generation.finish()?.text;
            inferlet::send(&format!("{{\"index\":{},\"text\":{}}}", i, json::string(&text)))?;
            texts.push(text);
        }
        inferlet::set_return(&json::string_array(&texts))
    })
}
