//! A context: one token sequence with its KV cache in pages the instance owns.
//!
//! Tokens are first *filled* (pending: known to the guest, not yet in the KV cache), then a
//! forward pass writes them into the pages. A decode step forwards every pending token and
//! asks for the next token at the last one; the sampled token becomes the new pending token,
//! so the next step has an input. That keeps generation at exactly one forward per token, with
//! the whole prompt in the first one.
//!
//! Forks share the parent's *full* pages (`share_pages`, copy-on-write on the host) and re-fill
//! the tokens of the parent's partial last page, so parent and child never write into a shared
//! page. Dropping a context frees its pages.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::forward::{self, Distribution, ForwardOutput, ForwardRequest, Input};
use crate::model::Model;
use crate::pending::{finish_all, Pending, Waitable};
use crate::queue::Queue;
use crate::resources;
use crate::runtime;
use crate::sampler::Sampler;
use crate::tokenizer;

mod draft;

/// One token of the sequence: its id, its position (RoPE), and whether it is masked.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Slot {
    token: u32,
    position: u32,
    masked: bool,
}

/// What a decode step asks the forward pass for, at the last pending token.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StepOptions {
    /// Sample a token on the host; it becomes the context's next pending token.
    pub sampler: Option<Sampler>,
    /// Also return the top-k distribution when > 0.
    pub top_k: u32,
    /// Allowed tokens (packed bitmask, see [`ForwardRequest::vocab_mask`]).
    pub vocab_mask: Option<Vec<u8>>,
    pub logit_bias: Option<BTreeMap<u32, f32>>,
    /// Also return the sampled token's bytes, so its text can be built without the
    /// vocabulary (see [`StepOutput::bytes`]).
    pub token_bytes: bool,
}

impl StepOptions {
    pub fn sample(sampler: &Sampler) -> StepOptions {
        StepOptions { sampler: Some(sampler.clone()), ..StepOptions::default() }
    }

    pub fn distribution(top_k: u32) -> StepOptions {
        StepOptions { top_k, ..StepOptions::default() }
    }

    pub fn with_vocab_mask(mut self, mask: Vec<u8>) -> StepOptions {
        self.vocab_mask = Some(mask);
        self
    }

    pub fn with_logit_bias(mut self, bias: BTreeMap<u32, f32>) -> StepOptions {
        self.logit_bias = Some(bias);
        self
    }

    pub fn with_token_bytes(mut self, token_bytes: bool) -> StepOptions {
        self.token_bytes = token_bytes;
        self
    }
}

/// The result of a decode step.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StepOutput {
    /// The sampled token (already filled into the context), when a sampler was given.
    pub token: Option<u32>,
    /// The top-k distribution, when asked for.
    pub dist: Option<Distribution>,
    /// When the sampler names a matcher: whether its grammar is complete after this token.
    pub done: bool,
    /// The sampled token's bytes, when asked for with [`StepOptions::token_bytes`].
    pub bytes: Option<Vec<u8>>,
}

/// A forward pass prepared against the context's state: pages allocated, request built.
struct Plan {
    consumed: usize,
    request: ForwardRequest,
}

/// Context ids, for telling whose forward is the latest on a queue (`forward::latest_by`).
static NEXT_ID: AtomicU64 = AtomicU64::new(forward::ANYONE + 1);

fn new_id() -> u64 {
    NEXT_ID.fetch_add(1, Ordering::Relaxed)
}

pub struct Context {
    id: u64,
    queue: Queue,
    page_size: usize,
    /// Virtual page ids; the first `used_pages()` hold the KV, any others are spare (allocated
    /// for a forward that then failed) and get used by the next one.
    pages: Vec<u32>,
    /// Tokens whose KV is in the pages, in layout order.
    kv: Vec<Slot>,
    /// Tokens filled but not forwarded yet.
    pending: Vec<Slot>,
    next_position: u32,
    /// The model's context length: positions stay below it.
    max_position: Option<u64>,
}

impl Context {
    pub(crate) fn new(model: &Model, queue: Queue) -> Context {
        Context {
            id: new_id(),
            queue,
            page_size: model.page_size() as usize,
            pages: Vec::new(),
            kv: Vec::new(),
            pending: Vec::new(),
            next_position: 0,
            max_position: model.info().max_position,
        }
    }

    pub fn queue(&self) -> Queue {
        self.queue
    }

    /// Move the context to another queue. Its earlier requests must have completed (they have,
    /// unless a [`Step`] of it is still in flight, which the borrow checker rules out).
    pub fn set_queue(&mut self, queue: Queue) {
        self.queue = queue;
    }

    pub fn page_size(&self) -> usize {
        self.page_size
    }

    /// The pages holding the KV cache.
    pub fn pages(&self) -> &[u32] {
        &self.pages[..self.used_pages()]
    }

    /// How many tokens (masked ones included) are in the KV cache.
    pub fn kv_len(&self) -> usize {
        self.kv.len()
    }

    pub fn kv_tokens(&self) -> Vec<u32> {
        self.kv.iter().map(|slot| slot.token).collect()
    }

    pub fn pending_tokens(&self) -> Vec<u32> {
        self.pending.iter().map(|slot| slot.token).collect()
    }

    /// Every token of the sequence that is not masked: the KV cache's, then the pending ones.
    pub fn tokens(&self) -> Vec<u32> {
        self.kv.iter().chain(&self.pending).filter(|s| !s.masked).map(|s| s.token).collect()
    }

    /// The position the next filled token gets.
    pub fn next_position(&self) -> u32 {
        self.next_position
    }

    /// Set the position the next filled token gets. Positions need not be contiguous: leave a
    /// gap to keep positions of dropped tokens, or rewind to overlap them.
    pub fn set_next_position(&mut self, position: u32) {
        self.next_position = position;
    }

    /// Whether the model's context length leaves no position for another token.
    pub fn is_full(&self) -> bool {
        self.max_position.map_or(false, |max| u64::from(self.next_position) >= max)
    }

    /// Tokenize `text` on the host and fill its tokens.
    pub fn fill(&mut self, text: &str) -> Result<()> {
        let tokens = tokenizer::tokenize(text)?;
        self.fill_tokens(&tokens);
        Ok(())
    }

    pub fn fill_tokens(&mut self, tokens: &[u32]) {
        for &token in tokens {
            self.fill_token(token);
        }
    }

    pub fn fill_token(&mut self, token: u32) {
        let position = self.next_position;
        self.pending.push(Slot { token, position, masked: false });
        self.next_position += 1;
    }

    /// Forward every pending token but the last (which the next decode step needs as its
    /// input), without asking for outputs. Use it before forking a shared prompt.
    pub fn flush(&mut self) -> Result<()> {
        if self.pending.len() < 2 {
            return Ok(());
        }
        let plan = self.plan(self.pending.len() - 1, None)?;
        let output = forward::forward(&plan.request)?;
        self.commit(&plan, &output).map(|_| ())
    }

    /// Forward the pending tokens, sample the next token on the host and fill it.
    pub fn decode_step(&mut self, sampler: &Sampler) -> Result<u32> {
        let output = self.step(&StepOptions::sample(sampler))?;
        sampled(&output)
    }

    /// Forward the pending tokens and return the top-k next-token distribution (nothing is
    /// filled: pick a token and `fill_token` it).
    pub fn next_dist(&mut self, top_k: u32) -> Result<Distribution> {
        let output = self.step(&StepOptions::distribution(top_k))?;
        distribution(output)
    }

    /// Forward every pending token with outputs at the last one, and wait.
    pub fn step(&mut self, options: &StepOptions) -> Result<StepOutput> {
        let plan = self.plan_step(options)?;
        let output = forward::forward(&plan.request)?;
        self.commit(&plan, &output)
    }

    /// Like [`step`](Context::step) but returns at once; several contexts' steps submitted
    /// before waiting run in the same scheduler tick (see [`join_all`]).
    pub fn step_async(&mut self, options: &StepOptions) -> Result<Step<'_>> {
        let plan = self.plan_step(options)?;
        let pending = forward::forward_async(&plan.request);
        Ok(Step { ctx: self, plan, pending })
    }

    pub fn decode_step_async(&mut self, sampler: &Sampler) -> Result<Step<'_>> {
        self.step_async(&StepOptions::sample(sampler))
    }

    pub fn next_dist_async(&mut self, top_k: u32) -> Result<Step<'_>> {
        self.step_async(&StepOptions::distribution(top_k))
    }

    /// A new context on the same queue with the same tokens.
    pub fn fork(&self) -> Result<Context> {
        self.fork_on(self.queue)
    }

    /// A new context on `queue` with the same tokens: the full pages are shared, the tokens of
    /// the partial last page and the pending ones are filled again (masked ones are left out).
    pub fn fork_on(&self, queue: Queue) -> Result<Context> {
        let full = self.kv.len() / self.page_size;
        let pages =
            if full > 0 { resources::share_pages(&self.pages[..full])? } else { Vec::new() };
        let mut child = Context {
            id: new_id(),
            queue,
            page_size: self.page_size,
            pages,
            kv: self.kv[..full * self.page_size].to_vec(),
            pending: Vec::new(),
            next_position: self.next_position,
            max_position: self.max_position,
        };
        if child.pages.len() != full {
            return Err(Error::Decode(format!(
                "share_pages returned {} pages for {}",
                child.pages.len(),
                full
            )));
        }
        child.pending = unmasked(&self.kv[full * self.page_size..]);
        child.pending.extend_from_slice(&self.pending);
        Ok(child)
    }

    /// Mask (or unmask) the KV cache's tokens in `range` (indices into [`kv_tokens`]): later
    /// forwards do not attend to them. Full pages left entirely masked are freed.
    ///
    /// [`kv_tokens`]: Context::kv_tokens
    pub fn mask_tokens(&mut self, range: Range<usize>, masked: bool) -> Result<()> {
        if range.end > self.kv.len() || range.start > range.end {
            return Err(Error::usage(format!(
                "cannot mask tokens {:?}: the KV cache holds {} (pending tokens cannot be masked; \
                 flush first)",
                range,
                self.kv.len()
            )));
        }
        let ps = self.page_size;
        let mut start = range.start;
        while start < range.end {
            let page_index = start / ps;
            let end = range.end.min((page_index + 1) * ps);
            let offsets: Vec<u32> = (start..end).map(|i| (i - page_index * ps) as u32).collect();
            resources::mask_kv(self.queue, self.pages[page_index], &offsets, masked)?;
            for slot in &mut self.kv[start..end] {
                slot.masked = masked;
            }
            start = end;
        }
        if masked {
            self.drop_masked_pages()?;
        }
        Ok(())
    }

    /// Export the context under `name`: its pages (through `export_pages`) and its tokens
    /// (through the shared store, key `inferlet.context.<name>`), so that
    /// [`import`](Context::import) can rebuild it in any instance.
    pub fn export(&self, name: &str, persistent: bool) -> Result<()> {
        resources::export_pages(name, self.pages(), persistent)?;
        let state = ExportedState {
            page_size: self.page_size,
            kv: self.kv.clone(),
            pending: self.pending.clone(),
            next_position: self.next_position,
        };
        let bytes = rmp_serde::to_vec_named(&state)
            .map_err(|err| Error::usage(format!("cannot encode context state: {}", err)))?;
        runtime::store_set(&state_key(name), &to_hex(&bytes))
    }

    /// Rebuild a context exported under `name` (by this or another instance), on `queue`.
    pub fn import(model: &Model, name: &str, queue: Queue) -> Result<Context> {
        let text = runtime::store_get(&state_key(name))?
            .ok_or_else(|| Error::usage(format!("no context state was exported as {:?}", name)))?;
        let state: ExportedState = from_hex(&text)
            .and_then(|bytes| rmp_serde::from_slice(&bytes).map_err(|err| err.to_string()))
            .map_err(|err| Error::usage(format!("bad context state for {:?}: {}", name, err)))?;
        if state.page_size != model.page_size() as usize {
            return Err(Error::usage(format!(
                "context {:?} was exported with page size {}, the model uses {}",
                name,
                state.page_size,
                model.page_size()
            )));
        }
        let mut ctx = Context::new(model, queue);
        ctx.pages = resources::import_pages(name)?;
        ctx.kv = state.kv;
        ctx.pending = state.pending;
        ctx.next_position = state.next_position;
        if ctx.pages.len() != ctx.used_pages() {
            return Err(Error::usage(format!(
                "export {:?} holds {} pages but its context needs {}",
                name,
                ctx.pages.len(),
                ctx.used_pages()
            )));
        }
        ctx.refill_partial_page()?;
        Ok(ctx)
    }

    /// Remove an export made by [`export`](Context::export): its pages and its stored tokens.
    pub fn unexport(name: &str) -> Result<()> {
        runtime::store_delete(&state_key(name))?;
        resources::unexport(name)
    }

    /// Free the context's pages now, reporting errors (dropping does the same silently).
    pub fn free(mut self) -> Result<()> {
        let pages = std::mem::take(&mut self.pages);
        if pages.is_empty() {
            return Ok(());
        }
        resources::free_pages(&pages)
    }

    fn used_pages(&self) -> usize {
        div_ceil(self.kv.len(), self.page_size)
    }

    fn plan_step(&mut self, options: &StepOptions) -> Result<Plan> {
        if self.pending.is_empty() {
            return Err(Error::usage("nothing to decode: fill at least one token first"));
        }
        self.plan(self.pending.len(), Some(options))
    }

    /// Allocate the pages the first `consumed` pending tokens need and build their forward.
    fn plan(&mut self, consumed: usize, options: Option<&StepOptions>) -> Result<Plan> {
        let new_len = self.kv.len() + consumed;
        let needed = div_ceil(new_len, self.page_size);
        if self.pages.len() < needed {
            let more = resources::alloc_pages(needed - self.pages.len())?;
            self.pages.extend(more);
        }
        let inputs = &self.pending[..consumed];
        let options = options.cloned();
        let outputs = if options.is_some() { vec![consumed as u32 - 1] } else { Vec::new() };
        let options = options.unwrap_or_default();
        let request = ForwardRequest {
            queue: self.queue,
            pages: self.pages[..needed].to_vec(),
            last_page_len: (new_len - (needed - 1) * self.page_size) as u32,
            positions: inputs.iter().map(|slot| slot.position).collect(),
            input: Input::Tokens(inputs.iter().map(|slot| slot.token).collect()),
            masks: None,
            outputs,
            top_k: options.top_k,
            sampler: options.sampler,
            vocab_mask: options.vocab_mask,
            logit_bias: options.logit_bias,
            token_bytes: options.token_bytes,
            feed: false,
        };
        Ok(Plan { consumed, request })
    }

    /// The decode step after a step in flight that forwards every pending token and samples
    /// one: it reads that token (`feed`), which will be filled at `next_position`.
    fn plan_step_ahead(&mut self, options: &StepOptions) -> Result<Plan> {
        let new_len = self.kv.len() + self.pending.len() + 1;
        let needed = div_ceil(new_len, self.page_size);
        if self.pages.len() < needed {
            let more = resources::alloc_pages(needed - self.pages.len())?;
            self.pages.extend(more);
        }
        let options = options.clone();
        let request = ForwardRequest {
            queue: self.queue,
            pages: self.pages[..needed].to_vec(),
            last_page_len: (new_len - (needed - 1) * self.page_size) as u32,
            positions: vec![self.next_position],
            input: Input::Tokens(Vec::new()),
            masks: None,
            outputs: vec![0],
            top_k: options.top_k,
            sampler: options.sampler,
            vocab_mask: options.vocab_mask,
            logit_bias: options.logit_bias,
            token_bytes: options.token_bytes,
            feed: true,
        };
        Ok(Plan { consumed: 1, request })
    }

    /// The forward succeeded: its tokens are in the KV cache now.
    fn commit(&mut self, plan: &Plan, output: &ForwardOutput) -> Result<StepOutput> {
        let written: Vec<Slot> = self.pending.drain(..plan.consumed).collect();
        self.kv.extend(written);
        let mut result = StepOutput::default();
        if plan.request.sampler.is_some() {
            let token = output.token()?;
            self.fill_token(token);
            result.token = Some(token);
            result.done = output.done.unwrap_or(false);
            if plan.request.token_bytes {
                result.bytes = Some(output.token_bytes()?);
            }
        }
        if plan.request.top_k > 0 {
            result.dist = Some(output.dist()?);
        }
        Ok(result)
    }

    /// Free a partial last page and fill its (unmasked) tokens again, ahead of the pending
    /// ones, so that this context never writes into a page it shares.
    fn refill_partial_page(&mut self) -> Result<()> {
        let full = self.kv.len() / self.page_size;
        if self.pages.len() > full {
            let partial = self.pages.split_off(full);
            resources::free_pages(&partial)?;
        }
        let mut refill = unmasked(&self.kv[full * self.page_size..]);
        self.kv.truncate(full * self.page_size);
        refill.extend_from_slice(&self.pending);
        self.pending = refill;
        Ok(())
    }

    /// Free the full pages whose every token is masked and drop them from the layout.
    fn drop_masked_pages(&mut self) -> Result<()> {
        let ps = self.page_size;
        let full = self.kv.len() / ps;
        let dead: Vec<usize> =
            (0..full).filter(|&p| self.kv[p * ps..(p + 1) * ps].iter().all(|s| s.masked)).collect();
        if dead.is_empty() {
            return Ok(());
        }
        let ids: Vec<u32> = dead.iter().map(|&p| self.pages[p]).collect();
        resources::free_pages(&ids)?;
        for &p in dead.iter().rev() {
            self.pages.remove(p);
            self.kv.drain(p * ps..(p + 1) * ps);
        }
        Ok(())
    }
}

impl Drop for Context {
    fn drop(&mut self) {
        if !self.pages.is_empty() {
            // Nothing sensible to do with an error while dropping; the host frees every page
            // of the instance when it ends anyway.
            let _ = resources::free_pages(&self.pages);
        }
    }
}

/// A decode step submitted by [`Context::submit_step`] or [`Context::submit_step_ahead`]. It
/// does not borrow its context, so a step can be submitted ahead of the one before it; commit
/// each with [`Context::finish_step`] on the same context, in the order submitted, or give it
/// up with [`discard`](SubmittedStep::discard). Dropped, it is waited for and its output
/// dropped. Either way the context is as if it never ran.
#[must_use = "a submitted step changes its context only when finished"]
pub struct SubmittedStep {
    plan: Plan,
    pending: Pending<ForwardOutput>,
}

impl SubmittedStep {
    /// Give the step up without waiting for it (it may still be running). Its context is as if
    /// it never ran: the context's next forward runs after it on the same queue and writes
    /// again whatever row it wrote (its pending token's). What it allocated stays with the
    /// context.
    pub fn discard(self) -> Result<()> {
        self.pending.discard()
    }
}

impl Waitable for SubmittedStep {
    fn handle(&self) -> u32 {
        self.pending.handle()
    }
}

impl Context {
    /// Submit a decode step of every pending token, sampling after the last, without waiting.
    pub fn submit_step(&mut self, options: &StepOptions) -> Result<SubmittedStep> {
        let plan = self.plan_step(options)?;
        Ok(self.submit(plan))
    }

    /// Submit the step after a [`submit_step`](Context::submit_step) (with a sampler) that is
    /// not finished yet: it reads the token that step samples (the `forward` op's `feed`), so
    /// the host runs it in the next tick without waiting for this guest. Only where
    /// [`can_step_ahead`](Context::can_step_ahead); no grammar matcher in either sampler.
    pub fn submit_step_ahead(&mut self, options: &StepOptions) -> Result<SubmittedStep> {
        let plan = self.plan_step_ahead(options)?;
        Ok(self.submit(plan))
    }

    fn submit(&self, plan: Plan) -> SubmittedStep {
        let pending = forward::forward_async(&plan.request);
        forward::mark_latest(self.queue, self.id);
        SubmittedStep { plan, pending }
    }

    /// Whether a step may be submitted ahead of this context's step in flight: the token that
    /// step samples leaves room for one more, and no other forward went on the queue after it
    /// (a step ahead reads the latest forward on its queue: another context's, there).
    pub fn can_step_ahead(&self) -> bool {
        forward::latest_by(self.queue) == self.id
            && self.max_position.map_or(true, |max| u64::from(self.next_position) + 1 < max)
    }

    /// Wait for a submitted step and commit it into the context.
    pub fn finish_step(&mut self, step: SubmittedStep) -> Result<StepOutput> {
        let output = step.pending.wait()?;
        self.commit(&step.plan, &output)
    }
}

/// A decode step in flight. It borrows its context, so the context cannot change until the
/// step is waited on; `wait` commits the forward into the context.
#[must_use = "a step changes its context only when waited on"]
pub struct Step<'a> {
    ctx: &'a mut Context,
    plan: Plan,
    pending: Pending<ForwardOutput>,
}

impl<'a> Step<'a> {
    pub fn wait(self) -> Result<StepOutput> {
        let Step { ctx, plan, pending } = self;
        let output = pending.wait()?;
        ctx.commit(&plan, &output)
    }
}

impl Waitable for Step<'_> {
    fn handle(&self) -> u32 {
        self.pending.handle()
    }
}

/// Wait for every step (they ran in the same tick if submitted together) and commit each into
/// its context. Every step is committed even when some fail; the first error is returned.
pub fn join_all(steps: Vec<Step<'_>>) -> Result<Vec<StepOutput>> {
    let mut outputs = Vec::with_capacity(steps.len());
    finish_all(steps, |_, step| {
        outputs.push(step.wait()?);
        Ok(())
    })?;
    Ok(outputs)
}

/// The sampled token of a step output.
pub(crate) fn sampled(output: &StepOutput) -> Result<u32> {
    output.token.ok_or_else(|| Error::Decode("the forward returned no sampled token".into()))
}

fn distribution(output: StepOutput) -> Result<Distribution> {
    output.dist.ok_or_else(|| Error::Decode("the forward returned no distribution".into()))
}

fn unmasked(slots: &[Slot]) -> Vec<Slot> {
    slots.iter().filter(|slot| !slot.masked).copied().collect()
}

fn div_ceil(n: usize, d: usize) -> usize {
    (n + d - 1) / d
}

#[derive(Serialize, Deserialize)]
struct ExportedState {
    page_size: usize,
    kv: Vec<Slot>,
    pending: Vec<Slot>,
    next_position: u32,
}

fn state_key(name: &str) -> String {
    format!("inferlet.context.{}", name)
}

fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{:02x}", b)).collect()
}

fn from_hex(text: &str) -> std::result::Result<Vec<u8>, String> {
    if !text.is_ascii() || text.len() % 2 != 0 {
        return Err("not an even-length hex string".into());
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).map_err(|err| err.to_string()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trips() {
        let bytes = vec![0, 1, 0xab, 0xff];
        assert_eq!(to_hex(&bytes), "0001abff");
        assert_eq!(from_hex("0001abff").unwrap(), bytes);
        assert!(from_hex("abc").is_err());
        assert!(from_hex("zz").is_err());
        assert!(from_hex("éa").is_err());
    }

    #[test]
    fn page_math() {
        assert_eq!(div_ceil(0, 16), 0);
        assert_eq!(div_ceil(1, 16), 1);
        assert_eq!(div_ceil(16, 16), 1);
        assert_eq!(div_ceil(17, 16), 2);
    }
}

// Declared after everything else, so that adding it moved no line of this file (panic
// locations are part of the built modules).
mod prefix_cache;
