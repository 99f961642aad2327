//! The messages sent to the server, one JSON object each:
//!
//! ```text
//! {"choice": i, "text": "...", "logprobs": [ENTRY...] | null}    text (and its tokens)
//! {"choice": i, "finish": "stop" | "length", "tokens": n}         the choice's end
//! ENTRY = {"token": "...", "bytes": [...], "logprob": x | null, "top_logprobs": [...] | null}
//! ```
//!
//! An entry is OpenAI's chat token-logprob object; `top_logprobs` holds entries without their
//! own `top_logprobs`. Log-probabilities are those of the model's softmax at temperature 1 (after
//! a grammar's mask), as OpenAI reports them, not of the sampler's tempered distribution.

use inferlet::tokenizer::Vocab;
use inferlet::{json, Distribution, Result};

/// What OpenAI reports for a token outside the alternatives it was given.
pub const UNLIKELY: f64 = -9999.0;

pub fn text(choice: usize, text: &str, logprobs: Option<&[String]>) -> Result<()> {
    let logprobs = match logprobs {
        Some(entries) => format!("[{}]", entries.join(",")),
        None => "null".to_string(),
    };
    inferlet::send(&format!(
        "{{\"choice\":{},\"text\":{},\"logprobs\":{}}}",
        choice,
        json::string(text),
        logprobs
    ))
}

pub fn finish(choice: usize, reason: &str, tokens: usize) -> Result<()> {
    inferlet::send(&format!(
        "{{\"choice\":{},\"finish\":{},\"tokens\":{}}}",
        choice,
        json::string(reason),
        tokens
    ))
}

/// The entry of a sampled `token`, from the step's distribution with `top` alternatives.
pub fn sampled(vocab: &Vocab, token: u32, dist: &Distribution, top: u32) -> Result<String> {
    let logprob = dist.iter().find(|&(id, _)| id == token).map_or(UNLIKELY, |(_, p)| log(p));
    // A token the grammar masks out (probability 0) is no alternative.
    let alternatives = dist
        .iter()
        .take(top as usize)
        .filter(|&(_, p)| p > 0.0)
        .map(|(id, p)| entry(vocab, id, Some(log(p)), None))
        .collect::<Result<Vec<String>>>()?;
    entry(vocab, token, Some(logprob), Some(&alternatives))
}

/// The entry of a prompt token (echoed): its log-probability is not computed.
pub fn prompt_token(vocab: &Vocab, token: u32) -> Result<String> {
    entry(vocab, token, None, None)
}

fn entry(
    vocab: &Vocab,
    token: u32,
    logprob: Option<f64>,
    top: Option<&[String]>,
) -> Result<String> {
    let bytes = vocab.bytes(token)?;
    let byte_list: Vec<String> = bytes.iter().map(|b| b.to_string()).collect();
    let mut out = format!(
        "{{\"token\":{},\"bytes\":[{}],\"logprob\":{}",
        json::string(&String::from_utf8_lossy(bytes)),
        byte_list.join(","),
        logprob.map_or("null".to_string(), |x| format!("{}", x))
    );
    if let Some(top) = top {
        out.push_str(&format!(",\"top_logprobs\":[{}]", top.join(",")));
    }
    out.push('}');
    Ok(out)
}

/// ln p, with a probability of 0 (masked by a grammar) reported as OpenAI's "very unlikely".
fn log(p: f32) -> f64 {
    let value = f64::from(p).ln();
    if value.is_finite() {
        value.max(UNLIKELY)
    } else {
        UNLIKELY
    }
}
