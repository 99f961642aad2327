//! The inference ops, one level below [`Context`](crate::Context): a forward pass over explicit
//! pages, positions and masks, and `embed`.
//!
//! KV layout (docs/abi.md and the executor's `Forward` call): the context is the concatenation
//! of `pages`, the last one filled up to `last_page_len` *after* this forward's tokens are
//! written, and the tokens occupy the last slots of the context. `outputs` index this
//! forward's input tokens.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};

use serde::Deserialize;

use crate::error::{Error, Result};
use crate::pending::Pending;
use crate::queue::Queue;
use crate::sampler::Sampler;
use crate::wire::{call, Bytes, Request};

/// What a forward pass reads: tokens or embedding slots.
#[derive(Clone, Debug, PartialEq)]
pub enum Input {
    Tokens(Vec<u32>),
    Slots(Vec<u32>),
}

/// Every field of the `forward` op.
#[derive(Clone, Debug, PartialEq)]
pub struct ForwardRequest {
    pub queue: Queue,
    pub pages: Vec<u32>,
    pub last_page_len: u32,
    pub positions: Vec<u32>,
    pub input: Input,
    /// BRLE attention masks, one per input token (see the executor's `Forward` call).
    pub masks: Option<Vec<Vec<u32>>>,
    pub outputs: Vec<u32>,
    /// Return the top-k distribution of each output when > 0.
    pub top_k: u32,
    /// Sample one token per output on the host.
    pub sampler: Option<Sampler>,
    /// Packed bitmask over the vocabulary: bit `t % 8` of byte `t / 8` set when t is allowed.
    pub vocab_mask: Option<Vec<u8>>,
    pub logit_bias: Option<BTreeMap<u32, f32>>,
    /// Return each sampled token's bytes too ([`ForwardOutput::bytes`]).
    pub token_bytes: bool,
    /// Append the tokens the previous forward on `queue` samples to `input` (which must be
    /// tokens) when this one starts: a step can be submitted before its token is known.
    pub feed: bool,
}

impl ForwardRequest {
    pub fn to_request(&self) -> Request {
        let request = Request::new("forward")
            .with("queue", &self.queue.id())
            .with("pages", &self.pages)
            .with("last_page_len", &self.last_page_len)
            .with("positions", &self.positions);
        let request = match &self.input {
            Input::Tokens(tokens) => request.with("tokens", tokens),
            Input::Slots(slots) => request.with("slots", slots),
        };
        request
            .with_opt("masks", self.masks.as_ref())
            .with("outputs", &self.outputs)
            .with_opt("top_k", if self.top_k > 0 { Some(self.top_k) } else { None })
            .with_opt("sampler", self.sampler.as_ref())
            .with_opt("vocab_mask", self.vocab_mask.as_ref().map(|mask| Bytes(mask.clone())))
            .with_opt("logit_bias", self.logit_bias.as_ref())
            .with_opt("token_bytes", if self.token_bytes { Some(&true) } else { None })
            .with_opt("feed", if self.feed { Some(&true) } else { None })
    }
}

/// A top-k next-token distribution: ids with their probabilities, most likely first.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(from = "(Vec<u32>, Vec<f32>)")]
pub struct Distribution {
    pub ids: Vec<u32>,
    pub probs: Vec<f32>,
}

impl From<(Vec<u32>, Vec<f32>)> for Distribution {
    fn from((ids, probs): (Vec<u32>, Vec<f32>)) -> Distribution {
        Distribution { ids, probs }
    }
}

impl Distribution {
    /// (token, probability) pairs.
    pub fn iter(&self) -> impl Iterator<Item = (u32, f32)> + '_ {
        self.ids.iter().copied().zip(self.probs.iter().copied())
    }
}

/// The `forward` op's answer: per output, a distribution (when `top_k` > 0) and/or a sampled
/// token (when a sampler was given).
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
pub struct ForwardOutput {
    #[serde(default)]
    pub dists: Option<Vec<Distribution>>,
    #[serde(default)]
    pub tokens: Option<Vec<u32>>,
    /// With a sampler naming a matcher: whether its grammar is complete after this token.
    #[serde(default)]
    pub done: Option<bool>,
    /// With `token_bytes`: the bytes of each sampled token.
    #[serde(default)]
    pub bytes: Option<Vec<Bytes>>,
}

impl ForwardOutput {
    /// The single sampled token of a one-output forward.
    pub fn token(&self) -> Result<u32> {
        match self.tokens.as_deref() {
            Some([token]) => Ok(*token),
            _ => Err(Error::Decode(format!("expected one sampled token, got {:?}", self.tokens))),
        }
    }

    /// The bytes of the single sampled token of a one-output forward asked for them.
    pub fn token_bytes(&self) -> Result<Vec<u8>> {
        match self.bytes.as_deref() {
            Some([bytes]) => Ok(bytes.0.clone()),
            _ => Err(Error::Decode(format!(
                "expected one sampled token's bytes, got {:?}",
                self.bytes.as_ref().map(Vec::len)
            ))),
        }
    }

    /// The single distribution of a one-output forward.
    pub fn dist(&self) -> Result<Distribution> {
        match self.dists.as_deref() {
            Some([dist]) => Ok(dist.clone()),
            _ => Err(Error::Decode(format!("expected one distribution, got {:?}", self.dists))),
        }
    }
}

/// Run a forward pass and wait for it.
pub fn forward(request: &ForwardRequest) -> Result<ForwardOutput> {
    mark_latest(request.queue, ANYONE);
    call(&request.to_request())
}

/// Submit a forward pass without waiting.
pub fn forward_async(request: &ForwardRequest) -> Pending<ForwardOutput> {
    mark_latest(request.queue, ANYONE);
    Pending::submit(&request.to_request())
}

/// A forward `feed`s on the latest forward on its queue, whoever submitted it. So a context
/// goes one step ahead only where that forward is its own step in flight: per queue, who
/// submitted the latest forward (a context's id, or `ANYONE` for a forward not made through a
/// context's steps).
pub(crate) const ANYONE: u64 = 0;

thread_local! {
    static LATEST_FORWARD: RefCell<HashMap<Queue, u64>> = RefCell::new(HashMap::new());
}

pub(crate) fn mark_latest(queue: Queue, submitter: u64) {
    LATEST_FORWARD.with(|latest| latest.borrow_mut().insert(queue, submitter));
}

pub(crate) fn latest_by(queue: Queue) -> u64 {
    LATEST_FORWARD.with(|latest| latest.borrow().get(&queue).copied().unwrap_or(ANYONE))
}

/// Store the embeddings of `tokens` into embedding `slots` (same length).
pub fn embed(queue: Queue, tokens: &[u32], slots: &[u32]) -> Result<()> {
    call(
        &Request::new("embed")
            .with("queue", &queue.id())
            .with("tokens", tokens)
            .with("slots", slots),
    )
}
