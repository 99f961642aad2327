//! Write pie-trio inferlets in Rust.
//!
//! An inferlet is a WebAssembly program (`wasm32-wasip1`) that drives generation itself: it
//! fills tokens into a [`Context`] (a sequence of KV pages), runs forward passes, samples, forks,
//! and talks to its client. The server batches the forward passes of every running inferlet
//! into one model step per tick, so the guest code stays a plain sequential program.
//!
//! ```no_run
//! use inferlet::{Model, Sampler, StopCondition};
//!
//! fn main() {
//!     inferlet::run(|| {
//!         let model = Model::load()?;
//!         let mut ctx = model.new_context();
//!         ctx.fill("Once upon a time")?;
//!         let stop = StopCondition::new(32).with_stop_tokens(model.stop_tokens().to_vec());
//!         let out = ctx.generate_streaming(&Sampler::greedy(), &stop, inferlet::send)?;
//!         inferlet::set_return(&out.text)
//!     })
//! }
//! ```
//!
//! Layers, bottom up: [`abi`] (the five host functions and response buffers), [`wire`]
//! (msgpack requests and responses), [`Pending`] (submitted requests and `wait`), the typed
//! ops ([`runtime`], [`resources`], [`forward`], [`tokenizer`], [`Queue`]), and on top
//! [`Context`] and [`Generation`].

pub mod abi;
pub mod args;
pub mod chat;
mod context;
mod error;
pub mod forward;
mod generate;
pub mod grammar;
pub mod http;
pub mod json;
pub mod launch;
mod model;
mod pending;
mod queue;
pub mod resources;
pub mod runtime;
mod sampler;
pub mod text;
pub mod tokenizer;
pub mod wire;

// The SDK's own serialization crates, for programs that define their own message types.
pub use rmp_serde;
pub use serde;

pub use args::Args;
pub use chat::Message;
pub use context::{join_all, Context, Step, StepOptions, StepOutput, SubmittedStep};
pub use error::{Error, Result};
pub use forward::Distribution;
pub use generate::{generate_parallel, FinishReason, Generated, Generation, StopCondition};
pub use grammar::{Grammar, GrammarKind, Matcher};
pub use model::{Model, ModelInfo, TokenRef};
pub use pending::{finish_all, wait_all, wait_any, Pending, Waitable};
pub use queue::Queue;
pub use runtime::{
    args, broadcast, clock, instance_id, models, ping, receive, send, set_return, sleep,
    store_delete, store_get, store_list, store_set, subscribe, topic_receive, version,
};
pub use sampler::Sampler;

/// Run an inferlet's main function: an `Err` is printed to stderr and the program exits with
/// status 1, which the server reports as an `error` termination.
pub fn run<F: FnOnce() -> Result<()>>(main: F) {
    if let Err(err) = main() {
        eprintln!("error: {}", err);
        std::process::exit(1);
    }
}
