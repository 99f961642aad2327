//! Composition: an inferlet launches child inferlets and talks to them (the `launch`,
//! `send_to`, `child_receive`, `child_wait` and `child_kill` ops, docs/abi.md).
//!
//! A child runs under the same owner as its parent, with its own contexts and its own thread;
//! only its parent can address it, and it ends with its parent (reason `parent_gone`). Its
//! `send` messages come to the parent ([`Child::receive`]) instead of to a client, and the
//! parent's [`Child::send`] arrives at the child's `receive`.
//!
//! ```no_run
//! use inferlet::launch::Child;
//!
//! let worker = Child::launch("text-completion", &["--prompt", "Hi", "--max-tokens", "8"])?;
//! while let Some(message) = worker.receive()? {
//!     println!("worker says {}", message);
//! }
//! let end = worker.wait()?;
//! println!("{} {:?}", end.reason, end.value);
//! # Ok::<(), inferlet::Error>(())
//! ```
//!
//! [`Child::receive_pending`] and [`Child::wait_pending`] submit without blocking, so a parent
//! can wait for whichever of its children speaks first ([`wait_any`](crate::wait_any)).

use serde::Deserialize;

use crate::error::Result;
use crate::pending::Pending;
use crate::wire::{call, Request};

/// How a child ended, as [`Child::wait`] reports it.
#[derive(Clone, Debug, Deserialize)]
pub struct Ended {
    /// The termination reason (`finished`, `error`, `trap`, `killed`, `limit`, ...).
    pub reason: String,
    pub detail: String,
    /// The child's `set_return` value, when it finished with one.
    pub value: Option<String>,
}

/// A running child inferlet: its id is meaningful only to this instance.
#[derive(Clone, Debug)]
pub struct Child {
    id: String,
}

impl Child {
    /// Launch `program` (a built-in name or the hash of an uploaded program) with `args`.
    pub fn launch<S: AsRef<str>>(program: &str, args: &[S]) -> Result<Child> {
        let args: Vec<&str> = args.iter().map(|arg| arg.as_ref()).collect();
        let id = call(&Request::new("launch").with("program", program).with("args", &args))?;
        Ok(Child { id })
    }

    /// The child's instance id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Deliver `message` to the child's next `receive`.
    pub fn send(&self, message: &str) -> Result<()> {
        call(&Request::new("send_to").with("instance", &self.id).with("message", message))
    }

    /// Block until the child sends a message; `None` once it has ended and every message it
    /// sent has been received.
    pub fn receive(&self) -> Result<Option<String>> {
        self.receive_pending().wait()
    }

    /// [`receive`](Child::receive), submitted without waiting.
    pub fn receive_pending(&self) -> Pending<Option<String>> {
        Pending::submit(&Request::new("child_receive").with("instance", &self.id))
    }

    /// Block until the child has ended. Afterwards its id is no longer valid: receive its
    /// messages first.
    pub fn wait(&self) -> Result<Ended> {
        self.wait_pending().wait()
    }

    /// [`wait`](Child::wait), submitted without waiting.
    pub fn wait_pending(&self) -> Pending<Ended> {
        Pending::submit(&Request::new("child_wait").with("instance", &self.id))
    }

    /// End the child now (reason `killed`); a child that has already ended is left as it is.
    pub fn kill(&self) -> Result<()> {
        call(&Request::new("child_kill").with("instance", &self.id))
    }
}
