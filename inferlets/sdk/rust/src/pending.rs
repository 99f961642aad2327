//! Submitted requests: the guest's way to have several requests in flight at once, so that
//! forked contexts advance in the same scheduler tick instead of one tick each.

use std::marker::PhantomData;

use serde::de::DeserializeOwned;

use crate::abi;
use crate::error::{Error, Result};
use crate::wire::{self, Request};

/// Anything that stands for a submitted request's handle.
pub trait Waitable {
    fn handle(&self) -> u32;
}

/// A submitted request whose response has not been taken yet.
///
/// `wait` takes the response (blocking until it is ready). A `Pending` dropped without `wait`
/// still takes its response, so the host's handle is released and nothing leaks; `discard`
/// releases it without waiting.
#[must_use = "a submitted request is released only when waited on (or dropped)"]
pub struct Pending<T> {
    handle: u32,
    taken: bool,
    _value: PhantomData<fn() -> T>,
}

impl<T: DeserializeOwned> Pending<T> {
    /// Submit `request` without waiting.
    pub fn submit(request: &Request) -> Pending<T> {
        Pending { handle: abi::submit(&request.encode()), taken: false, _value: PhantomData }
    }

    /// Block until the response is ready and decode it.
    pub fn wait(mut self) -> Result<T> {
        self.taken = true;
        abi::take_with(self.handle, wire::decode_response)
    }
}

impl<T> Pending<T> {
    /// Give the request up without waiting for it (the `discard` op): it still runs, but its
    /// response is dropped by the host whenever it comes. Dropping a `Pending` instead waits.
    pub fn discard(mut self) -> Result<()> {
        self.taken = true;
        wire::call(&Request::new("discard").with("handle", &self.handle))
    }
}

impl<T> Waitable for Pending<T> {
    fn handle(&self) -> u32 {
        self.handle
    }
}

impl<T> Drop for Pending<T> {
    fn drop(&mut self) {
        if !self.taken {
            abi::take_with(self.handle, |_| ());
        }
    }
}

/// Block until every request is ready (their `wait` then returns at once).
pub fn wait_all(items: &[&dyn Waitable]) {
    let handles: Vec<u32> = items.iter().map(|item| item.handle()).collect();
    abi::wait_all_handles(&handles);
}

/// Block until every item is ready, then hand each to `finish(index, item)` in order: every
/// one, even after some fail, so that none is left uncommitted. Returns the first error.
pub fn finish_all<W, F>(items: Vec<W>, mut finish: F) -> Result<()>
where
    W: Waitable,
    F: FnMut(usize, W) -> Result<()>,
{
    let waitables: Vec<&dyn Waitable> = items.iter().map(|item| item as &dyn Waitable).collect();
    wait_all(&waitables);
    let mut first_error: Option<Error> = None;
    for (index, item) in items.into_iter().enumerate() {
        if let Err(err) = finish(index, item) {
            first_error.get_or_insert(err);
        }
    }
    first_error.map_or(Ok(()), Err)
}

/// Block until at least one request is ready; returns the index of a ready one.
pub fn wait_any(items: &[&dyn Waitable]) -> usize {
    let handles: Vec<u32> = items.iter().map(|item| item.handle()).collect();
    abi::wait_any_handle(&handles)
}
