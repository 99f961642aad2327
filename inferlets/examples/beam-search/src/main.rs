//! beam-search: the most likely continuation under a beam of width W.
//!
//! ```text
//! beam-search [--prompt] TEXT [--beam-width W] [--max-tokens N] [--chat] [--ignore-eos]
//! ```
//!
//! Every step forwards all live beams in the same tick (one queue each, submitted before
//! waiting), reads each one's top-2W next-token distribution and keeps the W best extensions
//! by summed log-probability. A beam extended once continues in its own context; one extended
//! several times is forked (sharing full KV pages); a beam with no extension is dropped, which
//! frees its pages. An extension by a stop token finishes a hypothesis. The search ends after
//! N steps or once W hypotheses have finished; the winner maximises the log-probability per
//! token. It is sent as `{"text": ..., "score": ..., "tokens": n}` and returned as text.

use inferlet::{join_all, json, Args, Context, Error, Message, Model, Queue, Result};

struct Beam {
    ctx: Context,
    tokens: Vec<u32>,
    score: f64,
}

struct Hypothesis {
    tokens: Vec<u32>,
    score: f64,
}

impl Hypothesis {
    /// Log-probability per token, so long hypotheses are not penalised for their length.
    fn normalized(&self) -> f64 {
        self.score / self.tokens.len().max(1) as f64
    }
}

/// An extension of a beam: (score, beam index, token).
type Candidate = (f64, usize, u32);

fn main() {
    inferlet::run(|| {
        let mut args = Args::load()?;
        let width: usize = args.value_or("--beam-width", 4)?;
        let max_tokens: usize = args.value_or("--max-tokens", 32)?;
        let chat = args.flag("--chat");
        let ignore_eos = args.flag("--ignore-eos");
        let prompt = args.option_or_words("--prompt")?;
        if prompt.is_empty() || width == 0 {
            return Err(Error::usage("need a prompt and --beam-width of at least 1"));
        }

        let model = Model::load()?;
        let prompt = if chat { model.render_chat(&[Message::user(&prompt)])? } else { prompt };
        let stop_tokens = if ignore_eos { Vec::new() } else { model.stop_tokens().to_vec() };
        let queues = (0..width).map(|_| Queue::create(0)).collect::<Result<Vec<_>>>()?;

        let mut root = model.new_context_on(queues[0]);
        root.fill(&prompt)?;
        let mut beams = vec![Beam { ctx: root, tokens: Vec::new(), score: 0.0 }];
        let mut finished: Vec<Hypothesis> = Vec::new();

        for _ in 0..max_tokens {
            if beams.is_empty() || finished.len() >= width {
                break;
            }
            let candidates = expand(&mut beams, 2 * width as u32)?;
            let mut chosen: Vec<Candidate> = Vec::with_capacity(width);
            for (rank, (score, b, token)) in candidates.into_iter().enumerate() {
                if chosen.len() == width {
                    break;
                }
                if stop_tokens.contains(&token) {
                    // A stop finishes a hypothesis only if it ranks among the best W.
                    if rank < width {
                        finished.push(Hypothesis { tokens: beams[b].tokens.clone(), score });
                    }
                    continue;
                }
                chosen.push((score, b, token));
            }
            beams = advance(beams, &chosen, &queues)?;
        }
        finished.extend(
            beams.into_iter().map(|beam| Hypothesis { tokens: beam.tokens, score: beam.score }),
        );

        let best = finished
            .iter()
            .max_by(|a, b| a.normalized().total_cmp(&b.normalized()))
            .ok_or_else(|| Error::usage("no hypothesis survived"))?;
        let text = model.detokenize(&best.tokens)?;
        inferlet::send(&format!(
            "{{\"text\":{},\"score\":{},\"tokens\":{}}}",
            json::string(&text),
            best.score,
            best.tokens.len()
        ))?;
        inferlet::set_return(&text)
    })
}

/// Forward every beam in the same tick and list all extensions, best first.
fn expand(beams: &mut [Beam], top_k: u32) -> Result<Vec<Candidate>> {
    let steps =
        beams.iter_mut().map(|beam| beam.ctx.next_dist_async(top_k)).collect::<Result<Vec<_>>>()?;
    let outputs = join_all(steps)?;
    let mut candidates = Vec::new();
    for (b, output) in outputs.into_iter().enumerate() {
        let dist = output.dist.ok_or_else(|| Error::Decode("no distribution returned".into()))?;
        for (token, prob) in dist.iter() {
            if prob > 0.0 {
                candidates.push((beams[b].score + f64::from(prob).ln(), b, token));
            }
        }
    }
    candidates.sort_by(|a, b| b.0.total_cmp(&a.0));
    Ok(candidates)
}

/// The next generation of beams: forks where a beam continues more than once, the beam itself
/// for its last continuation; beams without one are dropped here, freeing their pages.
fn advance(beams: Vec<Beam>, chosen: &[Candidate], queues: &[Queue]) -> Result<Vec<Beam>> {
    let mut uses = vec![0usize; beams.len()];
    for &(_, b, _) in chosen {
        uses[b] += 1;
    }
    let mut parents: Vec<Option<Beam>> = beams.into_iter().map(Some).collect();
    let mut next = Vec::with_capacity(chosen.len());
    for (i, &(score, b, token)) in chosen.iter().enumerate() {
        uses[b] -= 1;
        let parent = parents[b].as_ref().expect("a parent is moved only at its last use");
        let mut tokens = parent.tokens.clone();
        let mut ctx = if uses[b] > 0 {
            parent.ctx.fork_on(queues[i])?
        } else {
            let mut ctx = parents[b].take().expect("present").ctx;
            ctx.set_queue(queues[i]);
            ctx
        };
        ctx.fill_token(token);
        tokens.push(token);
        next.push(Beam { ctx, tokens, score });
    }
    Ok(next)
}
