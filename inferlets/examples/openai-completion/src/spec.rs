//! The request spec: the one JSON argument the server launches this program with.
//!
//! ```json
//! {"prompt": "...", "n": 1, "max_tokens": 16, "temperature": 1.0, "top_p": 1.0, "seed": null,
//!  "stop": [], "logprobs": null, "echo": false, "grammar": null, "ignore_eos": false,
//!  "prefix_cache": false}
//! ```
//!
//! `logprobs` is the number of alternatives per token (0: the sampled token's alone), null for
//! none; `grammar` is `{"kind": "json_schema" | "regex" | "lark", "source": "..."}`. Every
//! field but `prompt` may be left out.

use inferlet::{Error, GrammarKind, Result};

use crate::json_value::Value;

pub struct GrammarSpec {
    pub kind: GrammarKind,
    pub source: String,
}

pub struct Spec {
    pub prompt: String,
    pub n: usize,
    pub max_tokens: usize,
    pub temperature: f64,
    pub top_p: f64,
    pub seed: Option<u64>,
    pub stop: Vec<String>,
    pub logprobs: Option<u32>,
    pub echo: bool,
    pub grammar: Option<GrammarSpec>,
    pub ignore_eos: bool,
    /// Whether the prompt may be served from (and left in) the automatic prefix cache; read by
    /// the prompt fill once the SDK's cached fill serves it.
    #[allow(dead_code)]
    pub prefix_cache: bool,
}

impl Spec {
    /// The spec from the instance's single argument.
    pub fn load() -> Result<Spec> {
        let args = inferlet::args()?;
        match args.as_slice() {
            [one] => Spec::parse(one),
            _ => Err(Error::usage("openai-completion takes one argument: the request as JSON")),
        }
    }

    pub fn parse(text: &str) -> Result<Spec> {
        let value = Value::parse(text)?;
        let spec = Spec {
            prompt: string(&value, "prompt")?
                .ok_or_else(|| Error::usage("the spec needs a \"prompt\""))?,
            n: number(&value, "n")?.unwrap_or(1),
            max_tokens: number(&value, "max_tokens")?.unwrap_or(16),
            temperature: number(&value, "temperature")?.unwrap_or(1.0),
            top_p: number(&value, "top_p")?.unwrap_or(1.0),
            seed: number(&value, "seed")?,
            stop: strings(&value, "stop")?,
            logprobs: number(&value, "logprobs")?,
            echo: flag(&value, "echo")?,
            grammar: grammar(&value)?,
            ignore_eos: flag(&value, "ignore_eos")?,
            prefix_cache: flag(&value, "prefix_cache")?,
        };
        if spec.n == 0 {
            return Err(Error::usage("n must be at least 1"));
        }
        Ok(spec)
    }
}

fn wrong(key: &str, what: &str) -> Error {
    Error::usage(format!("spec field {:?} must be {}", key, what))
}

fn number<T: std::str::FromStr>(value: &Value, key: &str) -> Result<Option<T>> {
    match value.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(text)) => text.parse().map(Some).map_err(|_| wrong(key, "a number")),
        Some(_) => Err(wrong(key, "a number")),
    }
}

fn string(value: &Value, key: &str) -> Result<Option<String>> {
    match value.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(text)) => Ok(Some(text.clone())),
        Some(_) => Err(wrong(key, "a string")),
    }
}

fn flag(value: &Value, key: &str) -> Result<bool> {
    match value.get(key) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(flag)) => Ok(*flag),
        Some(_) => Err(wrong(key, "true or false")),
    }
}

fn strings(value: &Value, key: &str) -> Result<Vec<String>> {
    match value.get(key) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => items
            .iter()
            .map(|item| match item {
                Value::String(text) => Ok(text.clone()),
                _ => Err(wrong(key, "a list of strings")),
            })
            .collect(),
        Some(_) => Err(wrong(key, "a list of strings")),
    }
}

fn grammar(value: &Value) -> Result<Option<GrammarSpec>> {
    let grammar = match value.get("grammar") {
        None | Some(Value::Null) => return Ok(None),
        Some(grammar) => grammar,
    };
    let kind = string(grammar, "kind")?
        .and_then(|name| GrammarKind::from_name(&name))
        .ok_or_else(|| wrong("grammar.kind", "json_schema, regex or lark"))?;
    let source = string(grammar, "source")?.ok_or_else(|| wrong("grammar.source", "a string"))?;
    Ok(Some(GrammarSpec { kind, source }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_every_field_and_defaults() {
        let spec = Spec::parse(
            r#"{"prompt": "Hi", "n": 3, "seed": 9223372036854775807, "stop": ["a"],
                "logprobs": 2, "grammar": {"kind": "json_schema", "source": "{}"}}"#,
        )
        .unwrap();
        assert_eq!((spec.prompt.as_str(), spec.n, spec.max_tokens), ("Hi", 3, 16));
        assert_eq!(spec.seed, Some((1 << 63) - 1));
        assert_eq!((spec.stop, spec.logprobs), (vec!["a".to_string()], Some(2)));
        assert_eq!(spec.grammar.map(|g| g.kind), Some(GrammarKind::JsonSchema));
        assert!(Spec::parse(r#"{"n": 1}"#).is_err());
        assert!(Spec::parse(r#"{"prompt": "x", "n": 0}"#).is_err());
        assert!(Spec::parse(r#"{"prompt": "x", "echo": 1}"#).is_err());
    }
}
