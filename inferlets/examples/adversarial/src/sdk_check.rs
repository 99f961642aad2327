//! `adversarial sdk-check`: the one well-behaved mode. It drives every part of the SDK against
//! the host and checks what must hold (a fork continues like its parent, an imported context
//! like the exported one, dropped masked pages leave the same result as never filling them...).
//! Each passing check is sent as `ok <name>`; the return value is `ok: <n> checks`; a failed
//! check exits with status 1 and names itself on stderr.

use std::collections::BTreeMap;
use std::fmt::Display;

use inferlet::forward::{self, ForwardRequest, Input};
use inferlet::resources;
use inferlet::tokenizer;
use inferlet::wire::{self, Request};
use inferlet::{
    generate_parallel, join_all, wait_all, wait_any, Context, Error, FinishReason, Generation,
    Model, Pending, Queue, Result, Sampler, StepOptions, StopCondition,
};

type Check = fn(&Model) -> Result<()>;

pub fn run() -> Result<()> {
    let model = Model::load()?;
    let checks: [(&str, Check); 12] = [
        ("runtime", runtime_ops),
        ("tokenizer", tokenizer_ops),
        ("async", async_handles),
        ("queues", queues),
        ("shared-queue", sequences_sharing_a_queue),
        ("fork", fork_continues_like_parent),
        ("fork-same-tick", forks_step_together),
        ("export-import", export_import),
        ("mask", mask_and_drop_pages),
        ("embed", embed_slots),
        ("stop", stop_conditions),
        ("constraints", constraints),
    ];
    for (name, check) in checks.iter() {
        check(&model).map_err(|err| Error::usage(format!("check {} failed: {}", name, err)))?;
        inferlet::send(&format!("ok {}", name))?;
    }
    inferlet::set_return(&format!("ok: {} checks", checks.len()))
}

fn ensure(condition: bool, what: impl Display) -> Result<()> {
    if condition {
        Ok(())
    } else {
        Err(Error::usage(what.to_string()))
    }
}

/// Exactly `count` prompt tokens, so page boundaries fall where a check needs them.
fn prompt_tokens(count: usize) -> Result<Vec<u32>> {
    let text = tokenizer::tokenize("The quick brown fox jumps over the lazy dog, and then ")?;
    Ok(text.iter().copied().cycle().take(count).collect())
}

fn greedy(ctx: &mut Context, count: usize) -> Result<Vec<u32>> {
    Ok(ctx.generate(&Sampler::greedy(), &StopCondition::new(count))?.tokens)
}

fn runtime_ops(model: &Model) -> Result<()> {
    ensure(!inferlet::version()?.is_empty(), "empty version")?;
    let id = inferlet::instance_id()?;
    ensure(!id.is_empty(), "empty instance id")?;
    ensure(inferlet::models()?.contains(&model.name().to_string()), "model not listed")?;
    ensure(inferlet::args()? == vec!["sdk-check".to_string()], "args differ")?;
    ensure(inferlet::clock()? > 1.0e9, "clock before 2001")?;
    inferlet::sleep(1)?;
    let echoed: Vec<u32> = inferlet::ping(&vec![1u32, 2, 3])?;
    ensure(echoed == vec![1, 2, 3], "ping changed its payload")?;
    // Bigger than the first response buffer: the reply comes back through `fetch`.
    let big = "y".repeat(200_000);
    let echoed: String = inferlet::ping(&big)?;
    ensure(echoed == big, "large ping changed its payload")?;

    let key = format!("sdk-check.{}.key", id);
    inferlet::store_set(&key, "value")?;
    ensure(inferlet::store_get(&key)? == Some("value".into()), "store_get after set")?;
    ensure(
        inferlet::store_list(&format!("sdk-check.{}.", id))? == vec![key.clone()],
        "store_list",
    )?;
    ensure(inferlet::store_delete(&key)?, "store_delete of a present key")?;
    ensure(!inferlet::store_delete(&key)?, "store_delete of an absent key")?;
    ensure(inferlet::store_get(&key)?.is_none(), "store_get after delete")?;

    let topic = format!("sdk-check.{}.topic", id);
    inferlet::subscribe(&topic)?;
    ensure(inferlet::broadcast(&topic, "hello")? >= 1, "broadcast reached no one")?;
    ensure(inferlet::topic_receive(&topic)? == "hello", "topic_receive")
}

fn tokenizer_ops(model: &Model) -> Result<()> {
    let text = "Hello, wörld! 東京 😀";
    let tokens = model.tokenize(text)?;
    ensure(model.detokenize(&tokens)? == text, "detokenize(tokenize(text)) != text")?;
    let vocab = model.vocab()?;
    let mut bytes = Vec::new();
    for &token in &tokens {
        bytes.extend_from_slice(vocab.bytes(token)?);
    }
    ensure(bytes == text.as_bytes(), "the vocabulary's bytes do not spell the text")?;
    ensure(model.page_size() > 0 && model.info().vocab_size > 0, "model_info")
}

fn async_handles(_: &Model) -> Result<()> {
    let ping = |n: u32| Pending::<u32>::submit(&Request::new("ping").with("payload", &n));
    let (first, second) = (ping(1), ping(2));
    let ready = wait_any(&[&first, &second]);
    ensure(ready < 2, format!("wait_any returned index {}", ready))?;
    wait_all(&[&first, &second]);
    ensure(first.wait()? == 1 && second.wait()? == 2, "responses mixed up")?;
    drop(ping(3)); // dropped without waiting: its handle is still released

    // Discarded: released without waiting, answered or not yet (a bad free_pages crosses to
    // the control layer), more times than the outstanding limit allows handles.
    for n in 0..1500u32 {
        if n % 2 == 0 {
            ping(n).discard()?;
        } else {
            Pending::<()>::submit(&Request::new("free_pages").with("pages", &[999_999u32]))
                .discard()?;
        }
    }
    let bogus = wire::call::<()>(&Request::new("discard").with("handle", &123_456u32));
    ensure(matches!(bogus, Err(Error::Host(_))), "discarding a handle never submitted")?;
    let refused = Pending::<()>::submit(&Request::new("free_pages").with("pages", &[999_999u32]));
    ensure(matches!(refused.wait(), Err(Error::Host(_))), "a forged page was accepted")
}

fn queues(model: &Model) -> Result<()> {
    let queue = Queue::create(1)?;
    queue.set_priority(5)?;
    let mut ctx = model.new_context_on(queue);
    ctx.fill_tokens(&prompt_tokens(5)?);
    ensure(greedy(&mut ctx, 2)?.len() == 2, "generation on a new queue")?;
    queue.synchronize()
}

/// Two sequences on one queue, generated together: a step ahead reads the latest forward on
/// its queue, which must then be its own sequence's (`Context::can_step_ahead`).
fn sequences_sharing_a_queue(model: &Model) -> Result<()> {
    let prompts = [prompt_tokens(5)?, prompt_tokens(12)?];
    let mut expected = Vec::new();
    let mut contexts = Vec::new();
    for prompt in &prompts {
        let mut alone = model.new_context();
        alone.fill_tokens(prompt);
        expected.push(greedy(&mut alone, 10)?);
        let mut ctx = model.new_context();
        ctx.fill_tokens(prompt);
        contexts.push(ctx);
    }
    let mut generations: Vec<Generation> =
        (0..2).map(|_| Generation::new(&Sampler::greedy(), &StopCondition::new(10))).collect();
    generate_parallel(&mut contexts, &mut generations, |_, _| Ok(()))?;
    for (i, generation) in generations.iter().enumerate() {
        ensure(generation.tokens() == expected[i], format!("sequence {} diverged", i))?;
    }
    Ok(())
}

fn fork_continues_like_parent(model: &Model) -> Result<()> {
    let ps = model.page_size() as usize;
    let prompt = prompt_tokens(2 * ps + 5)?;
    let mut reference = model.new_context();
    reference.fill_tokens(&prompt);
    let expected = greedy(&mut reference, 12)?;

    let mut parent = model.new_context();
    parent.fill_tokens(&prompt);
    parent.flush()?;
    let mut child = parent.fork()?;
    ensure(child.pages().len() == 2, format!("fork shares {} pages, not 2", child.pages().len()))?;
    ensure(child.kv_len() == 2 * ps && child.pending_tokens().len() == 5, "fork's refill")?;
    ensure(child.tokens() == parent.tokens(), "fork's tokens differ")?;
    ensure(greedy(&mut child, 6)? == expected[..6], "the fork diverged from a single prefill")?;
    ensure(greedy(&mut parent, 6)? == expected[..6], "the parent diverged after the fork")?;

    // Forking again mid-generation: the last sampled token is pending, a page is partial.
    let mut second = parent.fork()?;
    ensure(greedy(&mut second, 6)? == expected[6..], "a mid-generation fork diverged")?;
    ensure(greedy(&mut parent, 6)? == expected[6..], "the parent diverged")
}

fn forks_step_together(model: &Model) -> Result<()> {
    let mut root = model.new_context();
    root.fill_tokens(&prompt_tokens(model.page_size() as usize + 3)?);
    root.flush()?;
    let mut forks = vec![root.fork_on(Queue::create(0)?)?, root.fork_on(Queue::create(0)?)?];
    let expected = greedy(&mut root, 4)?;
    for _ in 0..4 {
        let steps = forks
            .iter_mut()
            .map(|ctx| ctx.decode_step_async(&Sampler::greedy()))
            .collect::<Result<Vec<_>>>()?;
        join_all(steps)?;
    }
    for fork in &forks {
        let generated = &fork.tokens()[fork.tokens().len() - 4..];
        ensure(generated == expected, "forks stepped together diverged from their root")?;
    }
    Ok(())
}

fn export_import(model: &Model) -> Result<()> {
    let name = format!("sdk-check.{}.ctx", inferlet::instance_id()?);
    let mut original = model.new_context();
    original.fill_tokens(&prompt_tokens(2 * model.page_size() as usize + 5)?);
    original.flush()?;
    original.export(&name, false)?;
    ensure(resources::list_exports()?.contains(&name), "export not listed")?;
    let mut imported = Context::import(model, &name, Queue::DEFAULT)?;
    ensure(imported.tokens() == original.tokens(), "imported tokens differ")?;
    ensure(greedy(&mut imported, 6)? == greedy(&mut original, 6)?, "imported context diverged")?;
    Context::unexport(&name)?;
    ensure(!resources::list_exports()?.contains(&name), "unexported name still listed")?;
    ensure(Context::import(model, &name, Queue::DEFAULT).is_err(), "import after unexport")
}

fn mask_and_drop_pages(model: &Model) -> Result<()> {
    let ps = model.page_size() as usize;
    let prompt = prompt_tokens(2 * ps + 1)?;
    let suffix = tokenizer::tokenize(" Meanwhile, far away")?;

    // Masking two full pages frees them; what is left computes as if they were never there.
    let mut masked = model.new_context();
    masked.fill_tokens(&prompt);
    masked.flush()?;
    ensure(masked.mask_tokens(0..2 * ps + 1, true).is_err(), "masking a pending token")?;
    masked.mask_tokens(0..2 * ps, true)?;
    ensure(masked.pages().is_empty() && masked.kv_len() == 0, "fully masked pages kept")?;
    masked.fill_tokens(&suffix);
    let mut fresh = model.new_context();
    fresh.set_next_position(2 * ps as u32);
    fresh.fill_token(prompt[2 * ps]);
    fresh.fill_tokens(&suffix);
    ensure(greedy(&mut masked, 5)? == greedy(&mut fresh, 5)?, "dropped pages still matter")?;

    // A partly masked page stays; its masked tokens leave `tokens()`.
    let mut partial = model.new_context();
    partial.fill_tokens(&prompt);
    partial.flush()?;
    partial.mask_tokens(1..3, true)?;
    ensure(partial.pages().len() == 2 && partial.tokens().len() == 2 * ps - 1, "partial mask")?;
    ensure(greedy(&mut partial, 2)?.len() == 2, "generation after a partial mask")?;
    let visible = partial.tokens().len();
    partial.mask_tokens(1..3, false)?;
    ensure(partial.tokens().len() == visible + 2, "unmask")
}

fn embed_slots(_: &Model) -> Result<()> {
    let tokens = prompt_tokens(3)?;
    let slots = resources::alloc_slots(3)?;
    forward::embed(Queue::DEFAULT, &tokens, &slots)?;
    let pages = resources::alloc_pages(2)?;
    let request = |page: u32, input: Input| ForwardRequest {
        queue: Queue::DEFAULT,
        pages: vec![page],
        last_page_len: 3,
        positions: vec![0, 1, 2],
        input,
        masks: None,
        outputs: vec![2],
        top_k: 3,
        sampler: Some(Sampler::greedy()),
        vocab_mask: None,
        logit_bias: None,
        token_bytes: false,
        feed: false,
    };
    let from_slots = forward::forward(&request(pages[0], Input::Slots(slots.clone())))?;
    let from_tokens = forward::forward(&request(pages[1], Input::Tokens(tokens)))?;
    resources::free_slots(&slots)?;
    resources::free_pages(&pages)?;
    ensure(from_slots.token()? == from_tokens.token()?, "embedded slots != tokens")?;
    let dist = from_tokens.dist()?;
    ensure(dist.ids.len() == 3 && dist.ids[0] == from_tokens.token()?, "top-k disagrees")
}

fn stop_conditions(model: &Model) -> Result<()> {
    let prompt = prompt_tokens(7)?;
    let mut ctx = model.new_context();
    ctx.fill_tokens(&prompt);
    let free_run = ctx.generate(&Sampler::greedy(), &StopCondition::new(8))?;
    ensure(free_run.tokens.len() == 8 && free_run.finish == FinishReason::MaxTokens, "max tokens")?;

    // Stop at the 5th token, given as a stop token and as a stop string.
    let fifth = free_run.tokens[4];
    let mut ctx = model.new_context();
    ctx.fill_tokens(&prompt);
    let by_token =
        ctx.generate(&Sampler::greedy(), &StopCondition::new(8).with_stop_tokens(vec![fifth]))?;
    let first_stop = free_run.tokens.iter().position(|&t| t == fifth).expect("present");
    ensure(by_token.tokens == free_run.tokens[..first_stop], "stop token")?;
    ensure(by_token.finish == FinishReason::StopToken(fifth), "stop token reason")?;
    // Going on after it (the step ahead was discarded, maybe still running): the stop token is
    // pending, and what follows is the free run's.
    let after = &free_run.tokens[first_stop + 1..];
    if !after.is_empty() {
        let rest = ctx.generate(&Sampler::greedy(), &StopCondition::new(after.len()))?;
        ensure(rest.tokens == after, "the generation after a stop token diverged")?;
    }

    // (A token that is only part of a character has no text of its own to stop at.)
    let stop = model.detokenize(&[fifth])?;
    let cut = match free_run.text.find(&stop) {
        Some(cut) if !stop.is_empty() => cut,
        _ => return Ok(()),
    };
    let mut ctx = model.new_context();
    ctx.fill_tokens(&prompt);
    let condition = StopCondition::new(8).with_stop_strings(vec![stop.clone()]);
    let mut streamed = String::new();
    let by_string = ctx.generate_streaming(&Sampler::greedy(), &condition, |text| {
        streamed.push_str(text);
        Ok(())
    })?;
    ensure(by_string.text == free_run.text[..cut], "stop string cut")?;
    ensure(by_string.finish == FinishReason::StopString(stop), "stop string reason")?;
    ensure(streamed == by_string.text, "streamed text != returned text")
}

fn constraints(model: &Model) -> Result<()> {
    let prompt = prompt_tokens(4)?;
    let (allowed, favoured) = (prompt[1], prompt[2]);
    let mut mask = vec![0u8; (model.info().vocab_size as usize + 7) / 8];
    mask[allowed as usize / 8] |= 1 << (allowed % 8);
    let mut ctx = model.new_context();
    ctx.fill_tokens(&prompt);
    let step = StepOptions::sample(&Sampler::greedy()).with_vocab_mask(mask);
    ensure(ctx.step(&step)?.token == Some(allowed), "the vocabulary mask was ignored")?;
    let bias: BTreeMap<u32, f32> = [(favoured, 1000.0)].into_iter().collect();
    let step = StepOptions::sample(&Sampler::greedy()).with_logit_bias(bias);
    ensure(ctx.step(&step)?.token == Some(favoured), "the logit bias was ignored")
}
