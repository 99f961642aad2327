//! Grammar-constrained decoding: JSON Schemas, regular expressions and Lark (EBNF) grammars,
//! enforced on the host.
//!
//! A [`Grammar`] is compiled once on the host (and cached there by content, for every
//! instance); a [`Matcher`] is one sequence's position in it. A sampler that names a matcher
//! ([`Sampler::with_matcher`]) makes each decode step sample only tokens the grammar allows:
//! the host masks the vocabulary inside the batched forward and advances the matcher with the
//! sampled token, so constraining costs no extra host call per token. The model's stop tokens
//! are allowed exactly where the grammar may end.
//!
//! ```no_run
//! use inferlet::{Grammar, Model, Sampler, StopCondition};
//!
//! # fn main() -> inferlet::Result<()> {
//! let model = Model::load()?;
//! let grammar = Grammar::json_schema(r#"{"type": "object", "properties":
//!     {"name": {"type": "string"}}, "required": ["name"]}"#)?;
//! let matcher = grammar.matcher()?;
//! let mut ctx = model.new_context();
//! ctx.fill("A JSON object naming a cat: ")?;
//! let stop = StopCondition::new(64).with_stop_tokens(model.stop_tokens().to_vec());
//! let out = matcher.generate(&mut ctx, &Sampler::greedy(), &stop)?;
//! assert!(out.complete);
//! # Ok(())
//! # }
//! ```
//!
//! A sampler with a matcher also works with [`Context::generate`] (which ends at the stop token
//! the grammar allows last); [`Matcher::generate`] ends as soon as the grammar is complete.

use serde::Deserialize;

use crate::context::{Context, StepOptions};
use crate::error::{Error, Result};
use crate::generate::StopCondition;
use crate::sampler::Sampler;
use crate::tokenizer;
use crate::wire::{call, Request};

/// The languages the host compiles.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GrammarKind {
    /// A JSON Schema (as JSON text); output is JSON with `", "` and `": "` separators unless the
    /// schema's `"x-guidance"` options say otherwise.
    JsonSchema,
    /// A regular expression the whole output matches.
    Regex,
    /// A Lark grammar (llguidance's EBNF dialect); `start` is the start rule.
    Lark,
}

impl GrammarKind {
    /// The name the host knows it by: `json_schema`, `regex` or `lark`.
    pub fn name(self) -> &'static str {
        match self {
            GrammarKind::JsonSchema => "json_schema",
            GrammarKind::Regex => "regex",
            GrammarKind::Lark => "lark",
        }
    }

    pub fn from_name(name: &str) -> Option<GrammarKind> {
        match name {
            "json_schema" => Some(GrammarKind::JsonSchema),
            "regex" => Some(GrammarKind::Regex),
            "lark" => Some(GrammarKind::Lark),
            _ => None,
        }
    }
}

/// A grammar compiled on the host. Dropping it frees its id; matchers made from it live on.
#[derive(Debug)]
pub struct Grammar {
    id: u32,
    kind: GrammarKind,
}

impl Grammar {
    /// Compile `source`; an invalid grammar is an `Err` naming its kind and the reason.
    pub fn compile(kind: GrammarKind, source: &str) -> Result<Grammar> {
        let request =
            Request::new("grammar_compile").with("kind", kind.name()).with("source", source);
        let id = call(&request)?;
        Ok(Grammar { id, kind })
    }

    pub fn json_schema(schema: &str) -> Result<Grammar> {
        Grammar::compile(GrammarKind::JsonSchema, schema)
    }

    pub fn regex(pattern: &str) -> Result<Grammar> {
        Grammar::compile(GrammarKind::Regex, pattern)
    }

    pub fn lark(grammar: &str) -> Result<Grammar> {
        Grammar::compile(GrammarKind::Lark, grammar)
    }

    /// The grammar's id on the host.
    pub fn id(&self) -> u32 {
        self.id
    }

    pub fn kind(&self) -> GrammarKind {
        self.kind
    }

    /// A new matcher at the grammar's start, for one sequence.
    pub fn matcher(&self) -> Result<Matcher> {
        let id = call(&Request::new("matcher_create").with("grammar", &self.id))?;
        Ok(Matcher { id })
    }
}

impl Drop for Grammar {
    fn drop(&mut self) {
        // The host frees it with the instance anyway; nothing to do about an error here.
        let _ = call::<()>(&Request::new("grammar_free").with("grammar", &self.id));
    }
}

/// What [`Matcher::consume`] took.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
pub struct Consumed {
    /// How many of the tokens the grammar allowed (it stops at the first refused one).
    pub consumed: u32,
    /// Whether the grammar is complete: nothing but a stop token may follow.
    pub done: bool,
}

/// A constrained generation's result.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Constrained {
    /// The sampled tokens, without a final stop token.
    pub tokens: Vec<u32>,
    pub text: String,
    /// Whether the grammar was completed (else `max_tokens` or the context length ended it).
    pub complete: bool,
}

/// One sequence's position in a grammar. Dropping it frees it on the host.
#[derive(Debug)]
pub struct Matcher {
    id: u32,
}

impl Matcher {
    /// The matcher's id on the host, as a sampler names it.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// Advance by tokens chosen by the program itself (a forced prefix, its own sampling).
    pub fn consume(&self, tokens: &[u32]) -> Result<Consumed> {
        call(&Request::new("matcher_consume").with("matcher", &self.id).with("tokens", tokens))
    }

    /// Generate from `ctx` until the grammar is complete, a stop token (which the grammar
    /// allows only where it may end), `stop.max_tokens`, or a full context. Stop strings are
    /// not watched: the grammar decides where the text ends.
    pub fn generate(
        &self,
        ctx: &mut Context,
        sampler: &Sampler,
        stop: &StopCondition,
    ) -> Result<Constrained> {
        if !stop.stop_strings.is_empty() {
            return Err(Error::usage("stop strings do not apply to constrained generation"));
        }
        let mut tokens = Vec::new();
        let mut complete = false;
        let mut step = 0;
        while step < stop.max_tokens && !complete && !ctx.is_full() {
            let options = StepOptions::sample(&sampler.for_step(step as u64).with_matcher(self));
            let output = ctx.step(&options)?;
            let token = output.token.ok_or_else(|| Error::Decode("no sampled token".into()))?;
            step += 1;
            complete = output.done;
            if stop.stop_tokens.contains(&token) {
                break;
            }
            tokens.push(token);
        }
        let text = if tokens.is_empty() { String::new() } else { tokenizer::detokenize(&tokens)? };
        Ok(Constrained { tokens, text, complete })
    }
}

impl Drop for Matcher {
    fn drop(&mut self) {
        let _ = call::<()>(&Request::new("matcher_free").with("matcher", &self.id));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_round_trip_by_name() {
        for kind in [GrammarKind::JsonSchema, GrammarKind::Regex, GrammarKind::Lark] {
            assert_eq!(GrammarKind::from_name(kind.name()), Some(kind));
        }
        assert_eq!(GrammarKind::from_name("ebnf"), None);
    }
}
