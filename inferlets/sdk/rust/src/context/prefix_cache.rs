//! Automatic prefix caching from the guest's side: a fresh context adopts the KV pages the
//! host's prefix cache holds for the start of its prompt, prefills only the rest, and offers
//! its own full prompt pages back, so that later requests with the same prompt start skip them.

use super::{Context, Slot};
use crate::error::{Error, Result};
use crate::resources;

impl Context {
    /// Fill `tokens` into this empty context, reusing whatever full pages of them the host's
    /// prefix cache holds (shared, copy-on-write, as [`import`](Context::import) does), and
    /// prefill the rest as [`flush`](Context::flush) does: every token but the last is in the
    /// KV cache afterwards. The context's full pages are then offered to the cache. Returns how
    /// many tokens were reused instead of prefilled.
    pub fn fill_cached(&mut self, tokens: &[u32]) -> Result<usize> {
        if !self.pages.is_empty()
            || !self.kv.is_empty()
            || !self.pending.is_empty()
            || self.next_position != 0
        {
            return Err(Error::usage("fill_cached needs an empty context at position 0"));
        }
        let found = resources::prefix_match(tokens)?;
        self.pages = found.pages;
        if found.tokens >= tokens.len().max(1) || self.pages.len() * self.page_size != found.tokens
        {
            return Err(Error::Decode(format!(
                "prefix_match returned {} pages holding {} tokens for a prompt of {}",
                self.pages.len(),
                found.tokens,
                tokens.len()
            )));
        }
        self.kv = tokens[..found.tokens]
            .iter()
            .enumerate()
            .map(|(position, &token)| Slot { token, position: position as u32, masked: false })
            .collect();
        self.next_position = found.tokens as u32;
        self.fill_tokens(&tokens[found.tokens..]);
        self.flush()?;
        let full = self.kv.len() / self.page_size;
        if full > 0 {
            resources::prefix_store(
                &self.kv_tokens()[..full * self.page_size],
                &self.pages[..full],
            )?;
        }
        Ok(found.tokens)
    }
}
