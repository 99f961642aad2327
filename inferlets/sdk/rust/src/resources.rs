//! KV pages, embedding slots and named exports. Ids are the instance's virtual ids.

use crate::error::Result;
use crate::queue::Queue;
use crate::wire::{call, Request};

pub fn alloc_pages(count: usize) -> Result<Vec<u32>> {
    call(&Request::new("alloc_pages").with("count", &count))
}

pub fn free_pages(pages: &[u32]) -> Result<()> {
    call(&Request::new("free_pages").with("pages", pages))
}

/// New ids naming the same KV as `pages` (copy-on-write); what a fork uses.
pub fn share_pages(pages: &[u32]) -> Result<Vec<u32>> {
    call(&Request::new("share_pages").with("pages", pages))
}

pub fn alloc_slots(count: usize) -> Result<Vec<u32>> {
    call(&Request::new("alloc_slots").with("count", &count))
}

pub fn free_slots(slots: &[u32]) -> Result<()> {
    call(&Request::new("free_slots").with("slots", slots))
}

/// Copy `count` KV rows from `src_page[src_offset..]` to `dst_page[dst_offset..]`.
pub fn copy_kv(
    queue: Queue,
    src_page: u32,
    dst_page: u32,
    src_offset: u32,
    dst_offset: u32,
    count: u32,
) -> Result<()> {
    call(
        &Request::new("copy_kv")
            .with("queue", &queue.id())
            .with("src_page", &src_page)
            .with("dst_page", &dst_page)
            .with("src_offset", &src_offset)
            .with("dst_offset", &dst_offset)
            .with("count", &count),
    )
}

/// Mark slots of a page masked (never attended again) or unmasked.
pub fn mask_kv(queue: Queue, page: u32, slots: &[u32], masked: bool) -> Result<()> {
    call(
        &Request::new("mask_kv")
            .with("queue", &queue.id())
            .with("page", &page)
            .with("slots", slots)
            .with("masked", &masked),
    )
}

/// Export pages under `name`; persistent exports outlive the instance until `unexport`.
pub fn export_pages(name: &str, pages: &[u32], persistent: bool) -> Result<()> {
    call(
        &Request::new("export_pages")
            .with("name", name)
            .with("pages", pages)
            .with("persistent", &persistent),
    )
}

pub fn unexport(name: &str) -> Result<()> {
    call(&Request::new("unexport").with("name", name))
}

/// New page ids sharing the KV exported under `name`.
pub fn import_pages(name: &str) -> Result<Vec<u32>> {
    call(&Request::new("import_pages").with("name", name))
}

pub fn list_exports() -> Result<Vec<String>> {
    call(&Request::new("list_exports"))
}

/// What [`prefix_match`] found: new page ids on the cached pages, and how many tokens of the
/// prompt (from position 0) they hold.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Deserialize)]
pub struct PrefixMatch {
    pub pages: Vec<u32>,
    pub tokens: usize,
}

/// The longest chain of full pages the host's prefix cache holds for a prompt starting with
/// `tokens` (never all of them: at least the last is left to forward).
pub fn prefix_match(tokens: &[u32]) -> Result<PrefixMatch> {
    call(&Request::new("prefix_match").with("tokens", tokens))
}

/// Offer the full pages among `pages` that hold `tokens` from position 0 (written by plain
/// forwards, never masked) to the host's prefix cache; how many it had not cached before.
pub fn prefix_store(tokens: &[u32], pages: &[u32]) -> Result<usize> {
    call(&Request::new("prefix_store").with("tokens", tokens).with("pages", pages))
}
