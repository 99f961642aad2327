//! Tool I/O: HTTP requests the server makes for the inferlet (the `http_request` op,
//! docs/abi.md). The server only reaches hosts its operator allows; a refused or failed request
//! is an `Err` naming the rule, and the instance carries on.
//!
//! A request is submitted at once and returns a [`Pending`]: the agent may keep generating, or
//! start several tool calls, and `wait` (or [`wait_any`](crate::wait_any)) for their answers.
//!
//! ```no_run
//! use inferlet::http;
//!
//! let search = http::fetch("http://127.0.0.1:8900/search?q=Paris");      // in flight
//! let sum = http::get("http://127.0.0.1:8900/calc?expr=1%2B2").send();   // in flight too
//! let page = search.wait()?;
//! println!("{} {}", page.status, page.text());
//! # Ok::<(), inferlet::Error>(())
//! ```
//!
//! JSON without a JSON crate in the guest: [`HttpRequest::json`] sends any serde value as a
//! JSON body (the host encodes it) and [`HttpRequest::send_json`] has the host decode the
//! response's JSON into a serde type.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::pending::Pending;
use crate::wire::{Bytes, Request};

/// An HTTP request under construction; [`send`](HttpRequest::send) submits it.
#[derive(Clone)]
pub struct HttpRequest {
    request: Request,
    headers: Vec<(String, String)>,
}

/// The answer to a request (any status: a 404 is an answer, not an `Err`).
#[derive(Clone, Debug, Deserialize)]
pub struct Response {
    pub status: u16,
    /// The URL that answered, after redirects.
    pub url: String,
    /// Header names as the server sent them, in order.
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
}

/// An answer whose JSON body the host has decoded into `T`.
#[derive(Clone, Debug, Deserialize)]
pub struct JsonResponse<T> {
    pub status: u16,
    pub url: String,
    pub json: T,
}

impl Response {
    /// The body as text (invalid UTF-8 replaced).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body.0).into_owned()
    }

    /// The first header called `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_str())
    }

    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

/// A request with `method` (GET, POST, PUT, PATCH, DELETE, HEAD, OPTIONS) to `url`.
pub fn request(method: &str, url: &str) -> HttpRequest {
    HttpRequest {
        request: Request::new("http_request").with("method", method).with("url", url),
        headers: Vec::new(),
    }
}

pub fn get(url: &str) -> HttpRequest {
    request("GET", url)
}

pub fn post(url: &str) -> HttpRequest {
    request("POST", url)
}

/// GET `url`, submitted now.
pub fn fetch(url: &str) -> Pending<Response> {
    get(url).send()
}

impl HttpRequest {
    pub fn header(mut self, name: &str, value: &str) -> HttpRequest {
        self.headers.push((name.to_string(), value.to_string()));
        self
    }

    /// The body, sent as is.
    pub fn body(mut self, body: &[u8]) -> HttpRequest {
        self.request = self.request.with("body", &Bytes(body.to_vec()));
        self
    }

    /// `value` as a JSON body (`content-type: application/json` unless set).
    pub fn json<T: Serialize + ?Sized>(mut self, value: &T) -> HttpRequest {
        self.request = self.request.with("json", value);
        self
    }

    /// End the request after `ms` milliseconds (the server's own limit still applies).
    pub fn timeout_ms(mut self, ms: u64) -> HttpRequest {
        self.request = self.request.with("timeout_ms", &ms);
        self
    }

    /// Whether to follow redirects (default: yes; each hop is checked by the server).
    pub fn follow_redirects(mut self, follow: bool) -> HttpRequest {
        self.request = self.request.with("follow_redirects", &follow);
        self
    }

    /// Submit the request; the server works on it while the inferlet goes on.
    pub fn send(self) -> Pending<Response> {
        Pending::submit(&self.finish())
    }

    /// Submit the request and have the host decode the response's JSON body into `T` (a body
    /// that is not JSON is an `Err`).
    pub fn send_json<T: DeserializeOwned>(self) -> Pending<JsonResponse<T>> {
        Pending::submit(&self.finish().with("parse_json", &true))
    }

    fn finish(self) -> Request {
        if self.headers.is_empty() {
            self.request
        } else {
            self.request.with("headers", &self.headers)
        }
    }
}

/// `text` escaped for a URL's query string or path segment (RFC 3986 unreserved kept).
pub fn url_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                out.push(byte as char)
            }
            _ => out.push_str(&format!("%{:02X}", byte)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_urls() {
        assert_eq!(url_encode("a b+c/é"), "a%20b%2Bc%2F%C3%A9");
        assert_eq!(url_encode("Az09-._~"), "Az09-._~");
    }
}
