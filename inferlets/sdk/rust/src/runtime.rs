//! The runtime ops: identity, arguments, talking to the client and to other inferlets, the
//! shared key-value store, time, and the return value.

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::Result;
use crate::wire::{call, Request};

/// The pie-trio version of the host.
pub fn version() -> Result<String> {
    call(&Request::new("version"))
}

/// This instance's id.
pub fn instance_id() -> Result<String> {
    call(&Request::new("instance_id"))
}

/// The launch arguments (argv without the program name).
pub fn args() -> Result<Vec<String>> {
    call(&Request::new("args"))
}

/// The names of the models the host serves.
pub fn models() -> Result<Vec<String>> {
    call(&Request::new("models"))
}

/// Send a `message` event to the client.
pub fn send(message: &str) -> Result<()> {
    call(&Request::new("send").with("message", message))
}

/// Block until the client sends this instance a message.
pub fn receive() -> Result<String> {
    call(&Request::new("receive"))
}

/// Start buffering broadcasts on `topic`.
pub fn subscribe(topic: &str) -> Result<()> {
    call(&Request::new("subscribe").with("topic", topic))
}

/// Broadcast to every subscriber of `topic`; returns how many got it.
pub fn broadcast(topic: &str, message: &str) -> Result<u64> {
    call(&Request::new("broadcast").with("topic", topic).with("message", message))
}

/// Block until a broadcast on `topic` arrives (subscribe first).
pub fn topic_receive(topic: &str) -> Result<String> {
    call(&Request::new("topic_receive").with("topic", topic))
}

/// Read a key of the store shared by all inferlets.
pub fn store_get(key: &str) -> Result<Option<String>> {
    call(&Request::new("store_get").with("key", key))
}

pub fn store_set(key: &str, value: &str) -> Result<()> {
    call(&Request::new("store_set").with("key", key).with("value", value))
}

/// Delete a key; returns whether it existed.
pub fn store_delete(key: &str) -> Result<bool> {
    call(&Request::new("store_delete").with("key", key))
}

/// The keys that start with `prefix`.
pub fn store_list(prefix: &str) -> Result<Vec<String>> {
    call(&Request::new("store_list").with("prefix", prefix))
}

/// Sleep on the host (the guest's thread is free meanwhile; other inferlets run on).
pub fn sleep(ms: u64) -> Result<()> {
    call(&Request::new("sleep").with("ms", &ms))
}

/// Seconds since the Unix epoch.
pub fn clock() -> Result<f64> {
    call(&Request::new("clock"))
}

/// A round trip through the host: returns the payload unchanged.
pub fn ping<T: Serialize + ?Sized, R: DeserializeOwned>(payload: &T) -> Result<R> {
    call(&Request::new("ping").with("payload", payload))
}

/// The value reported to the client when the instance finishes.
pub fn set_return(value: &str) -> Result<()> {
    call(&Request::new("set_return").with("value", value))
}
