//! The raw guest ABI (docs/abi.md): five host functions in the import module `pie`, carrying
//! msgpack bytes, and the response-buffer protocol around them.
//!
//! Responses land in a buffer the guest supplies. The host returns the response's length; when
//! that is larger than the buffer, nothing was written and the guest asks again with a buffer
//! big enough (`fetch` after `call`, `take` again for a submitted handle). A 64 KiB scratch
//! buffer answers almost everything in one crossing; the few large answers (the vocabulary)
//! cost one more.
//!
//! Everything here is safe to call; the `unsafe` stays inside. Misusing the ABI (a handle that
//! was already taken, too many outstanding submits, a request over the size limit) makes the
//! host end the instance, so these functions never report it.

use std::cell::RefCell;

#[cfg(target_arch = "wasm32")]
mod host {
    // Pointers and lengths are i32 in wasm32; usize and raw pointers have exactly that shape.
    #[link(wasm_import_module = "pie")]
    extern "C" {
        pub fn call(req_ptr: *const u8, req_len: usize, resp_ptr: *mut u8, resp_cap: usize) -> i32;
        pub fn submit(req_ptr: *const u8, req_len: usize) -> i32;
        pub fn wait(handles_ptr: *const u32, count: usize, mode: i32) -> i32;
        pub fn take(handle: u32, resp_ptr: *mut u8, resp_cap: usize) -> i32;
        pub fn fetch(resp_ptr: *mut u8, resp_cap: usize) -> i32;
    }
}

/// Outside WebAssembly there is no host: these exist so the SDK's pure logic can be unit-tested
/// natively, and say so loudly if anything reaches them.
#[cfg(not(target_arch = "wasm32"))]
#[allow(clippy::missing_safety_doc)]
mod host {
    const NO_HOST: &str = "the pie host functions exist only inside a pie-trio instance (wasm32)";
    pub unsafe fn call(_: *const u8, _: usize, _: *mut u8, _: usize) -> i32 {
        panic!("{}", NO_HOST)
    }
    pub unsafe fn submit(_: *const u8, _: usize) -> i32 {
        panic!("{}", NO_HOST)
    }
    pub unsafe fn wait(_: *const u32, _: usize, _: i32) -> i32 {
        panic!("{}", NO_HOST)
    }
    pub unsafe fn take(_: u32, _: *mut u8, _: usize) -> i32 {
        panic!("{}", NO_HOST)
    }
    pub unsafe fn fetch(_: *mut u8, _: usize) -> i32 {
        panic!("{}", NO_HOST)
    }
}

/// First size of the response buffer; it grows on demand.
pub const INITIAL_RESPONSE_CAPACITY: usize = 64 * 1024;
/// A buffer grown past this for one large response goes back to the initial size afterwards.
const KEEP_CAPACITY: usize = 1024 * 1024;

/// `wait` modes.
const WAIT_ANY: i32 = 0;
const WAIT_ALL: i32 = 1;

thread_local! {
    // One scratch buffer per instance (wasm32-wasip1 is single-threaded): responses are decoded
    // straight out of it, so a call allocates nothing for the transport.
    static SCRATCH: RefCell<Vec<u8>> = RefCell::new(Vec::with_capacity(INITIAL_RESPONSE_CAPACITY));
}

fn length(returned: i32, function: &str) -> usize {
    if returned < 0 {
        panic!("pie.{} returned {}, which the ABI never does", function, returned);
    }
    returned as usize
}

/// Fill `buffer` from a host function that follows the "length, or retry with a larger buffer"
/// contract, then hand the bytes to `decode`.
fn receive_into<R>(
    buffer: &mut Vec<u8>,
    first_length: usize,
    mut again: impl FnMut(*mut u8, usize) -> usize,
    decode: impl FnOnce(&[u8]) -> R,
) -> R {
    let mut n = first_length;
    while n > buffer.capacity() {
        buffer.clear();
        buffer.reserve_exact(n);
        n = again(buffer.as_mut_ptr(), buffer.capacity());
    }
    // SAFETY: the host wrote exactly n ≤ capacity bytes at the start of the buffer.
    unsafe { buffer.set_len(n) };
    let result = decode(&buffer[..n]);
    buffer.clear();
    if buffer.capacity() > KEEP_CAPACITY {
        buffer.shrink_to(INITIAL_RESPONSE_CAPACITY);
    }
    result
}

/// Submit a request and block until its response; `decode` sees the response bytes.
/// `decode` must not call the host itself.
pub fn call_with<R>(request: &[u8], decode: impl FnOnce(&[u8]) -> R) -> R {
    SCRATCH.with(|cell| {
        let mut buffer = cell.borrow_mut();
        buffer.clear();
        // SAFETY: the request and the buffer's capacity are valid guest memory for the call.
        let n = unsafe {
            host::call(request.as_ptr(), request.len(), buffer.as_mut_ptr(), buffer.capacity())
        };
        let n = length(n, "call");
        receive_into(
            &mut buffer,
            n,
            |ptr, cap| length(unsafe { host::fetch(ptr, cap) }, "fetch"),
            decode,
        )
    })
}

/// Submit a request without waiting; returns its handle (≥ 1).
pub fn submit(request: &[u8]) -> u32 {
    // SAFETY: the request is valid guest memory for the call.
    let handle = unsafe { host::submit(request.as_ptr(), request.len()) };
    if handle < 1 {
        panic!("pie.submit returned handle {}, which the ABI never does", handle);
    }
    handle as u32
}

/// Block until the handle's response is ready, release the handle and decode its bytes.
pub fn take_with<R>(handle: u32, decode: impl FnOnce(&[u8]) -> R) -> R {
    SCRATCH.with(|cell| {
        let mut buffer = cell.borrow_mut();
        buffer.clear();
        // SAFETY: the buffer's capacity is valid guest memory for the call.
        let n = unsafe { host::take(handle, buffer.as_mut_ptr(), buffer.capacity()) };
        let n = length(n, "take");
        receive_into(
            &mut buffer,
            n,
            |ptr, cap| length(unsafe { host::take(handle, ptr, cap) }, "take"),
            decode,
        )
    })
}

/// Block until at least one of the handles is ready; returns the index of a ready one.
pub fn wait_any_handle(handles: &[u32]) -> usize {
    assert!(!handles.is_empty(), "wait_any needs at least one handle");
    // SAFETY: `handles` is `count` little-endian u32 values (wasm32 is little-endian).
    let index = unsafe { host::wait(handles.as_ptr(), handles.len(), WAIT_ANY) };
    length(index, "wait")
}

/// Block until every handle is ready.
pub fn wait_all_handles(handles: &[u32]) {
    if handles.is_empty() {
        return;
    }
    // SAFETY: as in `wait_any_handle`.
    let count = unsafe { host::wait(handles.as_ptr(), handles.len(), WAIT_ALL) };
    length(count, "wait");
}

/// The raw host functions for programs that want to break the ABI on purpose (tests of the
/// host's defences). Ordinary inferlets never need them.
pub mod unchecked {
    /// `pie.call` with arbitrary pointers.
    ///
    /// # Safety
    /// The host reads and writes guest memory at these offsets; out-of-bounds offsets end the
    /// instance rather than corrupting anything, but in-bounds ones may overwrite guest data.
    pub unsafe fn call(req_ptr: *const u8, req_len: usize, resp_ptr: *mut u8, cap: usize) -> i32 {
        super::host::call(req_ptr, req_len, resp_ptr, cap)
    }

    /// `pie.take` with an arbitrary handle.
    ///
    /// # Safety
    /// As for [`call`].
    pub unsafe fn take(handle: u32, resp_ptr: *mut u8, cap: usize) -> i32 {
        super::host::take(handle, resp_ptr, cap)
    }

    /// `pie.fetch`, whether or not a response is kept.
    ///
    /// # Safety
    /// As for [`call`].
    pub unsafe fn fetch(resp_ptr: *mut u8, cap: usize) -> i32 {
        super::host::fetch(resp_ptr, cap)
    }
}
