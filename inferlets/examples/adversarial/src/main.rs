//! adversarial: programs that misbehave on purpose, for testing the host's defences. Not a
//! built-in; the build leaves it at inferlets/target/wasm/adversarial.wasm.
//!
//! ```text
//! adversarial MODE [ARGS]
//!   forge-page                 use page id 999999 in forward, free, share, export and mask_kv;
//!                              each must be an error response (sent as messages). Exits 1 if
//!                              any was accepted, else returns "refused: <ops>".
//!   bad-request                malformed requests (not msgpack, not a map, no op, unknown op,
//!                              wrong field types); each must be an error response, as above.
//!   trap-mid-generate [N=4]    greedy decode N tokens (each sent as "token <id>"), submit one
//!                              more step, and panic while it is in flight (a wasm trap).
//!   submit-flood [N=10000] [ping|forward]
//!                              submit N requests and never wait on them, then return
//!                              "submitted N".
//!   giant-message [MIB=17]     a ping request of MIB MiB (over the 16 MiB message limit).
//!   memory-bomb [MIB=1]        allocate and touch MIB MiB at a time, forever.
//!   spin                       loop forever without calling the host.
//!   oob-request                call with a request pointer outside memory.
//!   oob-response               call with a response buffer outside memory.
//!   unknown-handle             take a handle that was never submitted.
//!   fetch-empty                fetch when no response is kept.
//!   exit CODE                  exit with CODE at once.
//!   sdk-check                  not adversarial: drive every SDK feature against the host and
//!                              check its invariants (see sdk_check.rs); returns "ok: N checks".
//! ```
//! Modes that the host should stop end with `set_return("survived: ...")` if it does not.

mod sdk_check;

use inferlet::abi::{self, unchecked};
use inferlet::forward::{self, ForwardRequest, Input};
use inferlet::resources;
use inferlet::serde::de::IgnoredAny;
use inferlet::wire::{decode_response, Request};
use inferlet::{Args, Error, Model, Queue, Result, Sampler};

const FORGED_PAGE: u32 = 999_999;
const MIB: usize = 1024 * 1024;

fn main() {
    inferlet::run(|| {
        let words = Args::load()?.positional()?;
        let mode = words.first().map(String::as_str).unwrap_or("");
        let arg = |i: usize| words.get(i).map(String::as_str);
        match mode {
            "forge-page" => forge_page(),
            "bad-request" => bad_request(),
            "trap-mid-generate" => trap_mid_generate(number(arg(1), 4)?),
            "submit-flood" => submit_flood(number(arg(1), 10_000)?, arg(2).unwrap_or("ping")),
            "giant-message" => giant_message(number(arg(1), 17)?),
            "memory-bomb" => memory_bomb(number(arg(1), 1)?),
            "spin" => spin(),
            "oob-request" => oob(true),
            "oob-response" => oob(false),
            "unknown-handle" => {
                survived(unsafe { unchecked::take(987_654, scratch().as_mut_ptr(), 4096) })
            }
            "fetch-empty" => survived(unsafe { unchecked::fetch(scratch().as_mut_ptr(), 4096) }),
            "exit" => std::process::exit(number(arg(1), 3)? as i32),
            "sdk-check" => sdk_check::run(),
            other => Err(Error::usage(format!(
                "unknown mode {:?}; see the module docs of examples/adversarial",
                other
            ))),
        }
    })
}

fn number(word: Option<&str>, default: usize) -> Result<usize> {
    match word {
        None => Ok(default),
        Some(text) => text.parse().map_err(|_| Error::usage(format!("not a number: {:?}", text))),
    }
}

fn scratch() -> Vec<u8> {
    vec![0u8; 4096]
}

fn survived(returned: i32) -> Result<()> {
    inferlet::set_return(&format!("survived: the host returned {}", returned))
}

/// Send each refusal; fail if any request was accepted.
fn expect_refusals(results: Vec<(&str, Result<()>)>) -> Result<()> {
    let mut refused = Vec::new();
    let mut accepted = Vec::new();
    for (what, result) in results {
        match result {
            Err(Error::Host(message)) => {
                inferlet::send(&format!("{} refused: {}", what, message))?;
                refused.push(what);
            }
            Ok(()) => accepted.push(what),
            Err(other) => return Err(other),
        }
    }
    if !accepted.is_empty() {
        return Err(Error::usage(format!("the host accepted: {}", accepted.join(", "))));
    }
    inferlet::set_return(&format!("refused: {}", refused.join(", ")))
}

fn forge_page() -> Result<()> {
    let request = ForwardRequest {
        queue: Queue::DEFAULT,
        pages: vec![FORGED_PAGE],
        last_page_len: 1,
        positions: vec![0],
        input: Input::Tokens(vec![0]),
        masks: None,
        outputs: vec![0],
        top_k: 0,
        sampler: Some(Sampler::greedy()),
        vocab_mask: None,
        logit_bias: None,
        token_bytes: false,
        feed: false,
    };
    expect_refusals(vec![
        ("forward", forward::forward(&request).map(|_| ())),
        ("free_pages", resources::free_pages(&[FORGED_PAGE])),
        ("share_pages", resources::share_pages(&[FORGED_PAGE]).map(|_| ())),
        ("export_pages", resources::export_pages("adversarial.forged", &[FORGED_PAGE], false)),
        ("mask_kv", resources::mask_kv(Queue::DEFAULT, FORGED_PAGE, &[0], true)),
    ])
}

fn bad_request() -> Result<()> {
    // Any value would do: these requests must fail before a value matters.
    let raw = |bytes: &[u8]| abi::call_with(bytes, decode_response::<IgnoredAny>).map(|_| ());
    let typed = |request: Request| raw(&request.encode());
    expect_refusals(vec![
        ("not msgpack", raw(&[0xc1, 0xff, 0x00])),
        ("not a map", raw(&[0x2a])),
        ("no op", raw(&[0x81, 0xa1, b'x', 0x01])),
        ("unknown op", typed(Request::new("no_such_op"))),
        ("wrong field type", typed(Request::new("alloc_pages").with("count", "many"))),
        ("missing field", typed(Request::new("send"))),
    ])
}

fn trap_mid_generate(tokens: usize) -> Result<()> {
    let model = Model::load()?;
    let mut ctx = model.new_context();
    ctx.fill("Once upon a time")?;
    for _ in 0..tokens {
        let token = ctx.decode_step(&Sampler::greedy())?;
        inferlet::send(&format!("token {}", token))?;
    }
    let _in_flight = ctx.decode_step_async(&Sampler::greedy())?;
    panic!("deliberate trap after {} tokens, with a decode step in flight", tokens);
}

fn submit_flood(count: usize, kind: &str) -> Result<()> {
    let request = match kind {
        "ping" => Request::new("ping").with("payload", "flood"),
        "forward" => {
            let page = resources::alloc_pages(1)?;
            ForwardRequest {
                queue: Queue::DEFAULT,
                pages: page,
                last_page_len: 1,
                positions: vec![0],
                input: Input::Tokens(vec![0]),
                masks: None,
                outputs: vec![0],
                top_k: 0,
                sampler: Some(Sampler::greedy()),
                vocab_mask: None,
                logit_bias: None,
                token_bytes: false,
                feed: false,
            }
            .to_request()
        }
        other => {
            return Err(Error::usage(format!(
                "submit-flood kind must be ping or forward, not {:?}",
                other
            )))
        }
    };
    let bytes = request.encode();
    for _ in 0..count {
        // The handle is dropped on the floor: never waited on, never taken.
        abi::submit(&bytes);
    }
    inferlet::set_return(&format!("submitted {}", count))
}

fn giant_message(mib: usize) -> Result<()> {
    let payload = "x".repeat(mib * MIB);
    let echoed: String = inferlet::ping(&payload)?;
    inferlet::set_return(&format!("survived: a {} MiB request echoed {} bytes", mib, echoed.len()))
}

fn memory_bomb(mib_per_step: usize) -> Result<()> {
    let step = mib_per_step.max(1) * MIB;
    let mut hoard: Vec<Vec<u8>> = Vec::new();
    loop {
        let mut block = Vec::with_capacity(step);
        // Touch every page so the memory is really used.
        block.resize(step, 1u8);
        hoard.push(block);
        if hoard.len() % 64 == 0 {
            inferlet::send(&format!("holding {} MiB", hoard.len() * step / MIB))?;
        }
    }
}

fn spin() -> Result<()> {
    let mut counter: u64 = 0;
    loop {
        counter = counter.wrapping_add(1);
        // A volatile write keeps the loop from being optimised into something else.
        unsafe { std::ptr::write_volatile(&mut counter, counter) };
    }
}

fn oob(bad_request_pointer: bool) -> Result<()> {
    let request = Request::new("ping").with("payload", "oob").encode();
    let mut buffer = scratch();
    let far = 0xFFFF_0000usize;
    let returned = unsafe {
        if bad_request_pointer {
            unchecked::call(far as *const u8, request.len(), buffer.as_mut_ptr(), buffer.len())
        } else {
            unchecked::call(request.as_ptr(), request.len(), far as *mut u8, 4096)
        }
    };
    survived(returned)
}
