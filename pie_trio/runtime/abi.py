"""The host side of the guest ABI (docs/abi.md): the five `pie` imports and their bookkeeping.

Everything here runs in the guest's own thread, inside a host call. The imports are registered
with wasmtime's *unchecked* function API and a trampoline of our own: a host call then costs
well under a microsecond of glue instead of the ~7 µs of wasmtime-py's generic trampoline, and no
Python exception ever crosses wasmtime-py's process-wide exception slot (a host function that
must stop the guest records why on the instance's `Guard` and returns a trap).

`HostCalls` keeps one instance's handles: `submit` posts the request to the trio thread and
returns a handle at once; `wait`/`take` block (through the `Bridge`) until the trio thread has
stored the response in `ready`. Requests the runtime can answer from what it already knows
(`version`, `instance_id`, `args`, `models`, `set_return`, `send`) never leave the guest thread,
nor do those the control layer may answer on any thread (`ping`, `clock`, `model_info`:
`AttachedInstance.answer_stateless`).

Hostile guests. No exception may leave a trampoline (ctypes would print and drop it, and
wasmtime then reads a result that was never written; the process may abort): every failure
becomes a trap whose reason is recorded on the instance, including a host call made before the
instance is bound (from a WebAssembly start function, which the program store also refuses).
Every host call is paced (`Guard.pace`), so a guest calling in a loop cannot keep the GIL from
everyone else. The memory a guest makes the host hold for its submitted requests and their
responses is bounded (`InstanceLimits.max_outstanding_bytes`): a request's is estimated, and
decoding it stops as soon as its estimate alone passes that bound; a response is kept encoded,
so its size is exact.
"""

from __future__ import annotations

import codecs
import ctypes
import logging
import struct
import threading
from collections.abc import Callable, Sequence
from time import thread_time
from typing import Any, Protocol, TypeAlias

import msgpack
import wasmtime
from msgpack import unpackb
from wasmtime import _ffi as ffi

from pie_trio.control.interface import RUNTIME_OPS, STATELESS_OPS
from pie_trio.runtime.bridge import Bridge
from pie_trio.runtime.sandbox import Guard, InstanceLimits, Stopped, Termination, limit_hit

log = logging.getLogger(__name__)

# Ops the runtime answers itself (the rest goes to the control layer), here in the guest's
# thread: all but those that wait (for the client, or for child instances), which the
# instance's trio task answers.
TRIO_OPS = frozenset({"receive", "launch", "send_to", "child_receive", "child_wait",
                      "child_kill"})
LOCAL_OPS = RUNTIME_OPS - TRIO_OPS
OUTPUT_CHUNK = 64 * 1024  # characters per stdout/stderr event, so no event is unbounded
HELD_EVENTS_LIMIT = 64  # events held for a crossing before they are sent on their own
EVENT_OVERHEAD = 64  # bytes an event costs beyond its text: empty messages are not free
WAIT_ANY, WAIT_ALL = 0, 1
WASI_ERRNO_NOTSUP = 58
# Estimating what a request costs the host once decoded (Python objects are far larger than
# msgpack: an empty list is 1 byte in msgpack and 64 in Python). Requests up to SMALL_REQUEST
# bytes are charged the worst case per byte and decoded without the counting hooks. Lists and
# maps also cost time: the cyclic GC tracks each one, and decoding a million of them held the
# GIL for 2-4 s, so a request may hold at most one per CONTAINER_COST bytes of the message-size
# limit (65,536 at 4 MiB).
SMALL_REQUEST = 256
WORST_EXPANSION = 96  # bytes per msgpack byte: an empty container and its slot in a list
CONTAINER_COST, ITEM_COST = 64, 32  # a list or map, and each of its items, once decoded


class Host(Protocol):
    """The trio-thread side of one instance, as the guest thread sees it."""

    consumed_bytes: int  # output the client has read so far (updated by the trio thread)

    def handle_request(self, handle: int, request: dict[str, Any]) -> None: ...
    def answer_stateless(self, request: dict[str, Any]) -> dict[str, Any] | None: ...
    def emit(self, event: dict[str, Any], nbytes: int) -> None: ...


class Misuse(Exception):
    """The guest broke the ABI itself (docs/abi.md): it is terminated."""


class HostCalls:
    """One instance's ABI state; used only from its guest thread (except `ready`, see below)."""

    def __init__(self, host: Host, bridge: Bridge, guard: Guard, limits: InstanceLimits,
                 answers: dict[str, Any]):
        self.host = host
        self.bridge = bridge
        self.guard = guard
        self.limits = limits
        self._answers = {op: {"ok": value} for op, value in answers.items()}
        # Responses by handle. The trio thread inserts, the guest thread reads and removes; each
        # dict operation is atomic under the GIL and a key has one writer, so no lock is needed.
        # Responses are filed encoded: a take only copies them, and one too large for the
        # guest's buffer stays here for the retry.
        self.ready: dict[int, bytes] = {}
        self.issued: set[int] = set()  # submit handles not yet taken
        self._discarded: set[int] = set()  # discarded before their answer came (trio thread)
        # Bytes the host holds for handles not yet taken. Each counter has one writer: requests
        # the guest thread, responses the trio thread (and the guest thread counts what it took
        # off them), so no lock is needed.
        self.response_cost: dict[int, int] = {}  # handle -> bytes (trio writes, guest pops)
        self.response_bytes_in = 0  # trio thread
        self.response_bytes_out = 0  # guest thread
        self._request_cost: dict[int, int] = {}
        self._request_bytes = 0
        self.bound = False  # the guest's memory is known: host calls may touch it
        self.return_value: str | None = None
        self.posted_bytes = 0  # output handed to the trio thread so far (or held for it)
        self._held: list[tuple[dict[str, Any], int]] = []  # events waiting for a crossing
        self._next_handle = 1
        self._next_call = -1  # `call` uses negative handles: they never collide with submit's
        self._kept: bytes | None = None  # the `call` response that did not fit, for `fetch`
        self._decoders = {name: codecs.getincrementaldecoder("utf-8")(errors="replace")
                          for name in ("stdout", "stderr")}
        self._context: Any = None
        self._memory: Any = None
        self._base = 0  # address of the guest's linear memory (it never moves, see sandbox.py)
        self._size = 0  # its size when last looked at; memory only grows
        self._view = memoryview(b"")  # the guest's memory, as bytes we can slice

    def attach(self) -> None:
        """Make this the instance of the calling (guest) thread's host calls; until `bind`,
        any host call traps."""
        _local.calls = self

    def bind(self, store: wasmtime.Store, memory: wasmtime.Memory) -> None:
        """Point the host functions at the instantiated guest's memory."""
        self._context = store._context()
        self._memory = ctypes.byref(memory._memory)
        self._base = _memory_data(self._context, self._memory)
        self._map_memory()
        self.guard.on_tick = self.flush
        self.bound = True

    def bind_messages(self) -> None:
        """A component's host calls carry whole messages (component.py): unlike `bind`, no
        view of its memory is needed."""
        self.guard.on_tick = self.flush
        self.bound = True

    def unbind(self) -> None:
        """The store is going away: drop our view of its memory, and the thread (which runs
        other guests next) forgets us."""
        self.bound = False
        self._view = memoryview(b"")
        self._size = 0
        self.guard.on_tick = None  # (it refers to this object, which refers to the guard)
        if getattr(_local, "calls", None) is self:
            _local.calls = None

    # -- the five imports -----------------------------------------------------------------

    def call(self, req_ptr: int, req_len: int, resp_ptr: int, resp_cap: int) -> int:
        encoded = self.call_message(*self._read_request(req_ptr, req_len))
        if len(encoded) > _unsigned(resp_cap):
            self._kept = encoded
        else:
            self._write(resp_ptr, encoded)
        return len(encoded)

    def submit(self, req_ptr: int, req_len: int) -> int:
        return self.submit_message(*self._read_request(req_ptr, req_len))

    def wait(self, handles_ptr: int, count: int, mode: int) -> int:
        if not 0 <= count <= self.limits.max_outstanding:
            raise Misuse(f"wait: {count} handles (at most {self.limits.max_outstanding})")
        handles = struct.unpack(f"<{count}I", self._read(handles_ptr, 4 * count))
        return self.wait_handles(handles, mode)

    def take(self, handle: int, resp_ptr: int, resp_cap: int) -> int:
        encoded = self._ready_encoding(handle)
        if len(encoded) > _unsigned(resp_cap):
            return len(encoded)  # it stays in `ready` for the retry with a larger buffer
        self._write(resp_ptr, encoded)
        self._release(handle)
        return len(encoded)

    # -- the same operations on whole messages ----------------------------------------------
    # The core imports above only move bytes in and out of guest memory; components
    # (component.py) receive and return the messages themselves. Every rule lives here, once.

    def call_message(self, request: Any, cost: int) -> bytes:  # noqa: ARG002
        """A decoded request answered at once; the encoded response. (`cost` is not charged:
        a `call` holds one request at a time.)"""
        response = self._answer_locally(request)
        if response is not None:
            return _encode(response)
        handle = self._next_call
        self._next_call -= 1
        ready = self.ready
        self._post(self.host.handle_request, handle, request, wake=False)
        self._block_until(lambda: handle in ready)  # one crossing: both go in one batch
        return ready.pop(handle)

    def take_message(self, handle: int) -> bytes:
        """Block until `handle` is ready; its encoded response (the handle is released)."""
        encoded = self._ready_encoding(handle)
        self._release(handle)
        return encoded

    def _ready_encoding(self, handle: int) -> bytes:
        if handle not in self.issued:
            raise Misuse(f"take: unknown handle {handle}")
        self._await_handle(handle)
        return self.ready[handle]

    def submit_message(self, request: Any, cost: int) -> int:
        """Submit a decoded request that costs the host about `cost` bytes; its handle."""
        if len(self.issued) >= self.limits.max_outstanding:
            raise Stopped(limit_hit(
                "outstanding", f"more than {self.limits.max_outstanding} submitted requests "
                "not yet taken"))
        if self.outstanding_bytes() + cost > self.limits.max_outstanding_bytes:
            raise Stopped(self._over_outstanding_bytes(self.outstanding_bytes() + cost))
        handle = self._next_handle
        self._next_handle += 1  # 2**31 submits would outlast any wall-time limit
        self.issued.add(handle)
        self._request_cost[handle] = cost
        self._request_bytes += cost
        response = self._answer_locally(request)
        if response is None:
            self._post(self.host.handle_request, handle, request)
        else:
            self.ready[handle] = _encode(response)
        return handle

    def wait_handles(self, handles: Sequence[int], mode: int) -> int:
        """Block until any (WAIT_ANY: the index of a ready one) or all (WAIT_ALL: their count)
        of `handles` are ready."""
        if mode not in (WAIT_ANY, WAIT_ALL):
            raise Misuse(f"wait: mode must be 0 (any) or 1 (all), got {mode}")
        count = len(handles)
        if count > self.limits.max_outstanding:
            raise Misuse(f"wait: {count} handles (at most {self.limits.max_outstanding})")
        for handle in handles:
            if handle not in self.issued:
                raise Misuse(f"wait: unknown handle {handle}")
        ready = self.ready
        if mode == WAIT_ALL:
            if not all(h in ready for h in handles):
                self._block_until(lambda: all(h in ready for h in handles), count)
            return count
        if count == 0:
            raise Misuse("wait(any) on no handles would never return")
        if not any(h in ready for h in handles):
            self._block_until(lambda: any(h in ready for h in handles), 1)
        return next(i for i, h in enumerate(handles) if h in ready)

    def _release(self, handle: int) -> None:
        """The guest has taken `handle`'s response: forget it and what it cost."""
        del self.ready[handle]
        self.issued.discard(handle)
        self._request_bytes -= self._request_cost.pop(handle, 0)
        self.response_bytes_out += self.response_cost.pop(handle, 0)

    def fetch(self, resp_ptr: int, resp_cap: int) -> int:
        if self._kept is None:
            raise Misuse("fetch: no call response is waiting to be fetched")
        encoded = self._kept
        if len(encoded) <= _unsigned(resp_cap):
            self._write(resp_ptr, encoded)
            self._kept = None
        return len(encoded)

    # -- WASI stdout/stderr ---------------------------------------------------------------

    def output(self, stream: str, data: bytes) -> None:
        """A WASI write to stdout/stderr: forwarded as events in bounded chunks (and paced like
        a host call: it holds the GIL too)."""
        started = thread_time()
        try:
            self._emit_text(stream, self._decoders[stream].decode(data))
            self.guard.pace(started)
        except Stopped:
            pass  # the guest traps at its next epoch check; its output no longer matters
        except BaseException:  # noqa: BLE001 - called from a wasmtime callback: nothing escapes
            log.exception("forwarding guest output failed")

    def flush_output(self) -> None:
        """At exit: forward the events held, including an incomplete UTF-8 sequence the guest
        left (as U+FFFD)."""
        try:
            for stream, decoder in self._decoders.items():
                self._emit_text(stream, decoder.decode(b"", final=True))
            self.flush()
        except Stopped:
            pass

    # -- helpers --------------------------------------------------------------------------

    def _emit_text(self, stream: str, text: str) -> None:
        for start in range(0, len(text), OUTPUT_CHUNK):
            chunk = text[start:start + OUTPUT_CHUNK]
            self._emit({"event": stream, "data": chunk}, len(chunk) + EVENT_OVERHEAD)

    def _emit(self, event: dict[str, Any], nbytes: int) -> None:
        """Queue an event for the client, waiting first if the client lags too far behind."""
        if self.guard.stopping:
            return
        if self.output_backlog() > self.limits.output_backlog_bytes:
            self._block_until(self.output_drained)
        self.posted_bytes += nbytes
        self._held.append((event, nbytes))
        if len(self._held) >= HELD_EVENTS_LIMIT:
            self.flush()

    # Crossings. Requests go to the trio thread at once; events (`send`, prints) are held until
    # the guest's next post or wait, so a generation step's text travels with its next forward
    # and costs no wake-up of its own. A guest that keeps computing without a host call has its
    # events flushed at the next epoch tick (10 ms), or once HELD_EVENTS_LIMIT pile up.
    # What one host call posts wakes the trio thread once, with its last post: woken by the
    # first, trio would drain it alone and the next post would have to wake it again.

    def flush(self, wake: bool = True) -> None:
        """Hand the events held to the trio thread (now, or with the next post that wakes)."""
        if self._held:
            held, self._held = self._held, []
            self.bridge.post(_emit_all, self.host, held, wake=wake)

    def _post(self, fn: Callable[..., Any], *args: Any, wake: bool = True) -> None:
        self.flush(wake=False)
        self.bridge.post(fn, *args, wake=wake)

    def _block_until(self, condition: Callable[[], bool], waited: int = 0) -> None:
        """Park until `condition` holds; `waited`: how many submitted handles it waits for."""
        self.flush(wake=False)
        # A guest with more requests in flight than it waits for is ahead of the executor (a
        # decode step submitted before the one it waits for is answered): nothing waits for
        # it, so it need not be handed the GIL the moment it is released.
        self.bridge.block_until(condition, hurry=len(self.issued) <= waited)

    def output_backlog(self) -> int:
        """Bytes of output handed over that the client has not read yet (as last counted)."""
        return self.posted_bytes - self.host.consumed_bytes

    def output_drained(self) -> bool:
        """Whether a guest held back by its backlog may go on: the client read half of it."""
        return self.output_backlog() <= self.limits.output_backlog_bytes // 2

    def _answer_locally(self, request: Any) -> dict[str, Any] | None:
        """The response to a request the runtime answers itself, or None to pass it on."""
        if isinstance(request, _Malformed):
            return {"error": request.message}
        if not isinstance(request, dict) or not isinstance(request.get("op"), str):
            return {"error": "a request must be a msgpack map with a string 'op'"}
        op = request["op"]
        if op in STATELESS_OPS:
            return self.host.answer_stateless(request)  # None if it names a queue
        if op not in LOCAL_OPS:
            return None
        if op in self._answers:
            return self._answers[op]
        if op == "send":
            message = request.get("message")
            if not isinstance(message, str):
                return {"error": "send: 'message' must be a string"}
            self._emit({"event": "message", "message": message}, len(message) + EVENT_OVERHEAD)
            return {"ok": None}
        if op == "discard":
            return self._discard(request.get("handle"))
        value = request.get("value")  # set_return
        if not isinstance(value, str):
            return {"error": "set_return: 'value' must be a string"}
        self.return_value = value
        return {"ok": None}

    def _discard(self, handle: Any) -> dict[str, Any]:
        """The `discard` op: the guest will never take `handle`. What the guest thread counts
        for it goes now; its response is the trio thread's to drop, now or when it comes (an
        answer that comes later is filed by the trio thread, so none can slip in between a
        look and a removal; one answered at submit is in already)."""
        if type(handle) is not int:
            return {"error": f"discard: 'handle' must be an int, got {type(handle).__name__}"}
        if handle not in self.issued:
            return {"error": f"discard: {handle} is not a handle submitted and not yet taken"}
        self.issued.discard(handle)
        self._request_bytes -= self._request_cost.pop(handle, 0)
        self._post(self._drop_response, handle)
        return {"ok": None}

    def _drop_response(self, handle: int) -> None:
        """Trio thread: forget a discarded handle's response, now or when it is filed."""
        if self.ready.pop(handle, None) is None:
            self._discarded.add(handle)
        else:
            self.response_bytes_in -= self.response_cost.pop(handle, 0)

    def _await_handle(self, handle: int) -> None:
        ready = self.ready
        if handle not in ready:
            self._block_until(lambda: handle in ready, 1)

    # -- the host memory a guest makes us hold ---------------------------------------------

    def outstanding_bytes(self) -> int:
        """Bytes held for submitted handles not yet taken (requests estimated, responses exact)."""
        return self._request_bytes + self.response_bytes_in - self.response_bytes_out

    def file_response(self, handle: int, response: dict[str, Any]) -> Termination | None:
        """Trio thread: store the response for `handle`; the Termination to apply if holding
        it puts the instance past its outstanding bytes."""
        if handle in self._discarded:
            self._discarded.remove(handle)
            return None
        # Encoded now: what it holds until taken is then known exactly, for less than an
        # estimate of the decoded value cost, and the guest's thread only copies it.
        encoded = _encode(response)
        if handle > 0:  # a submit's (a `call` is waited for at once, one at a time)
            self.response_cost[handle] = len(encoded)  # before `ready`: popped together
            self.response_bytes_in += len(encoded)
        self.ready[handle] = encoded
        total = self.outstanding_bytes()
        if total > self.limits.max_outstanding_bytes:
            return self._over_outstanding_bytes(total)
        return None

    def _over_outstanding_bytes(self, total: int) -> Termination:
        return limit_hit("outstanding", f"about {total} bytes of submitted requests and "
                         f"responses not yet taken (limit {self.limits.max_outstanding_bytes})")

    def _read_request(self, ptr: int, length: int) -> tuple[Any, int]:
        """The decoded request and an estimate of the bytes it takes decoded."""
        length = _unsigned(length)
        self.check_message_size(length)
        return self.decode_request(self._span(ptr, length))

    def check_message_size(self, length: int) -> None:
        """Stop the guest if a request of `length` bytes is past the message-size limit."""
        if length > self.limits.max_message_bytes:
            raise Stopped(limit_hit(
                "message_size", f"a {length}-byte request (limit {self.limits.max_message_bytes})"))

    def decode_request(self, data: memoryview | bytes) -> tuple[Any, int]:
        """A request within the size limit, decoded, and an estimate of what it takes decoded."""
        length = len(data)
        if length <= SMALL_REQUEST:  # cannot decode to much: no counting
            try:
                return unpackb(data, raw=False, strict_map_key=False), length * WORST_EXPANSION
            except Exception as exc:
                return _Malformed(f"the request is not valid msgpack: {exc}"), 0
        cap = self.limits.max_outstanding_bytes
        cost = _DecodeCost(length, cap, self.limits.max_message_bytes // CONTAINER_COST)
        try:
            return _decode(data, cost), cost.bytes
        except _TooBig as exc:
            raise Stopped(limit_hit("message_size", f"a {length}-byte request {exc}")) from None

    # Guest memory is read and written through a memoryview, not ctypes calls: every ctypes
    # foreign call releases the GIL, and getting it back may take a GIL switch interval.

    def _span(self, ptr: int, length: int) -> memoryview:
        ptr = _unsigned(ptr)
        if ptr + length > self._size:
            self._map_memory()  # it may have grown
            if ptr + length > self._size:
                raise Misuse(f"out-of-bounds pointer: [{ptr}, {ptr + length}) in a memory of "
                             f"{self._size} bytes")
        return self._view[ptr:ptr + length]

    def _map_memory(self) -> None:
        size = _memory_data_size(self._context, self._memory)
        if size != self._size:
            self._size = size
            self._view = memoryview((ctypes.c_ubyte * size).from_address(self._base)).cast("B")

    def _read(self, ptr: int, length: int) -> bytes:
        return self._span(ptr, length).tobytes()

    def _write(self, ptr: int, data: bytes) -> None:
        self._span(ptr, len(data))[:] = data

    def trap(self, exc: BaseException) -> int:
        """Record why the guest must stop and return a wasm trap for wasmtime to raise."""
        termination = self.record_stop(exc)
        return _new_trap((termination.detail or termination.reason).encode())

    def record_stop(self, exc: BaseException) -> Termination:
        """Record why a failed host call stops the guest; the instance's termination."""
        if isinstance(exc, Stopped):
            self.guard.request_stop(exc.termination)
        elif isinstance(exc, Misuse):
            self.guard.request_stop(Termination("trap", f"ABI misuse: {exc}"))
        else:
            log.error("host function failed", exc_info=exc)
            self.guard.request_stop(Termination("trap", f"host error: {exc!r}"))
        termination = self.guard.termination
        assert termination is not None
        return termination


class _Malformed:
    """A request that could not be decoded: answered with an error, never forwarded."""

    def __init__(self, message: str):
        self.message = message


class _TooBig(Exception):
    """Decoding a request was abandoned: it would take more host memory than allowed."""


class _DecodeCost:
    """msgpack decoding hooks that estimate the size of what is decoded, and stop it early."""

    __slots__ = ("bytes", "cap", "containers")

    def __init__(self, raw_length: int, cap: int, max_containers: int):
        self.bytes = 2 * raw_length  # strings and numbers: their payload, and some
        self.cap = cap
        self.containers = max_containers  # how many more lists and maps may come

    def array(self, items: list[Any]) -> list[Any]:
        self._charge(CONTAINER_COST + ITEM_COST * len(items))
        return items

    def map(self, entries: dict[Any, Any]) -> dict[Any, Any]:
        self._charge(CONTAINER_COST + 2 * ITEM_COST * len(entries))
        return entries

    def _charge(self, size: int) -> None:
        self.bytes += size
        self.containers -= 1
        if self.containers < 0:
            raise _TooBig("that holds too many lists and maps (one per "
                          f"{CONTAINER_COST} bytes of the message-size limit)")
        if self.bytes > self.cap:
            raise _TooBig(f"that decodes to more than {self.cap} bytes (limit "
                          "max_outstanding_bytes)")


def _decode(data: memoryview | bytes, cost: _DecodeCost) -> Any:
    try:
        return unpackb(data, raw=False, strict_map_key=False, list_hook=cost.array,
                       object_hook=cost.map)
    except _TooBig:
        raise
    except Exception as exc:
        return _Malformed(f"the request is not valid msgpack: {exc}")


def _unsigned(value: int) -> int:
    return value & 0xFFFFFFFF


def _encode(response: dict[str, Any]) -> bytes:
    value = response.get("ok")
    if isinstance(value, list) and len(value) >= SHARED_VALUE_LENGTH:
        return _encode_shared(value)
    try:
        encoded: bytes = msgpack.packb(response, use_bin_type=True)  # (msgpack is untyped)
    except Exception as exc:
        log.error("unencodable response %r", response, exc_info=exc)
        encoded = msgpack.packb({"error": f"internal error: unencodable response ({exc})"})
    return encoded


# Large answers that every instance asks for (the vocabulary: ~430 KB, ~10 ms to encode) are
# the same list object each time, so the encoding of the last one is kept. Holding the object
# keeps its identity from being reused; the control layer never mutates an answer it gave.
SHARED_VALUE_LENGTH = 4096
_OK_PREFIX: bytes = msgpack.packb("ok")
_last_shared: tuple[list[Any], bytes] | None = None


def _encode_shared(value: list[Any]) -> bytes:
    global _last_shared
    last = _last_shared
    if last is not None and last[0] is value:
        return last[1]
    packed: bytes = msgpack.packb(value, use_bin_type=True)
    encoded = b"\x81" + _OK_PREFIX + packed
    _last_shared = (value, encoded)
    return encoded


def _emit_all(host: Host, events: list[tuple[dict[str, Any], int]]) -> None:
    for event, nbytes in events:
        host.emit(event, nbytes)


# -- raw memory access -------------------------------------------------------------------
# A private handle on wasmtime's library lets us declare these results as plain integers
# without touching wasmtime-py's own declarations; PyDLL keeps the GIL across these tiny calls.
_lib = ctypes.PyDLL(ffi.dll._name, handle=ffi.dll._handle)
_memory_data = _lib.wasmtime_memory_data
_memory_data.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
_memory_data.restype = ctypes.c_size_t
_memory_data_size = _lib.wasmtime_memory_data_size
_memory_data_size.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
_memory_data_size.restype = ctypes.c_size_t


# -- the trampolines ---------------------------------------------------------------------
# Each guest thread runs one instance, so the thread names the HostCalls.
_local = threading.local()


def current_calls() -> HostCalls | None:
    """The HostCalls of the instance the calling guest thread runs (None before `attach`)."""
    calls: HostCalls | None = getattr(_local, "calls", None)
    return calls

# wasmtime's unchecked host-function signature, declared with the argument types that ctypes
# converts cheapest: the caller as a bare address, and the values (`wasmtime_val_raw_t` unions,
# an i32 in the first 4 bytes of each, little-endian) as int32 words, which indexing reads and
# writes as plain ints. (Through the union type, every value read built a union object: 2-3 µs
# of an ~11 µs `call` answered on the guest's thread.)
_RawCallback = ctypes.CFUNCTYPE(ctypes.c_size_t, ctypes.c_void_p, ctypes.c_void_p,
                                ctypes.POINTER(ctypes.c_int32), ctypes.c_size_t)
_VALUE_WORDS = ctypes.sizeof(ffi.wasmtime_val_raw_t) // ctypes.sizeof(ctypes.c_int32)
_Values: TypeAlias = "ctypes._Pointer[ctypes.c_int32]"


def _trampoline(name: str, method: Callable[..., int], arity: int) -> Any:
    words = [i * _VALUE_WORDS for i in range(arity)]

    # Nothing may raise out of a ctypes callback: ctypes would print the exception and return
    # garbage to wasmtime (the process aborted with `free(): invalid pointer`).
    def trampoline(env: int | None, caller: int | None,  # noqa: ARG001
                   values: _Values, count: int) -> int:  # noqa: ARG001
        calls: HostCalls | None = None
        try:
            calls = _local.calls
            guard = calls.guard
            started = thread_time()
            if not calls.bound:
                raise Misuse(f"pie.{name} was called before the instance started (from a "
                             "WebAssembly start function?)")
            values[0] = method(calls, *[values[word] for word in words])
            guard.pace(started)  # may sleep; raises Stopped if stopped meanwhile
            return 0
        except BaseException as exc:  # noqa: BLE001 - every failure must become a trap
            return _trap(calls, exc)

    return _as_callback(trampoline)


def _as_callback(function: Callable[..., int]) -> Any:
    """`function` as a callback of the type wasmtime-py declares for the linker (the cast
    holds a reference to the callback it was made from)."""
    return ctypes.cast(_RawCallback(function), ffi.wasmtime_func_unchecked_callback_t)


def _trap(calls: HostCalls | None, exc: BaseException) -> int:
    """A trap for `exc`, its reason recorded on the instance when there is one."""
    try:
        if calls is not None:
            return calls.trap(exc)
    except BaseException:  # noqa: BLE001 - a trap must come out of here whatever happens
        log.exception("recording a trap failed")
    return _new_trap(f"pie-trio: host error: {exc!r}".encode())


def _new_trap(message: bytes) -> int:
    trap = ffi.wasmtime_trap_new(ctypes.create_string_buffer(message), len(message))
    return ctypes.cast(trap, ctypes.c_void_p).value or 0


def _poll_oneoff(env: int | None, caller: int | None,  # noqa: ARG001
                 values: _Values, count: int) -> int:  # noqa: ARG001
    # A blocking WASI sleep could not be interrupted by a kill: guests sleep with the `sleep` op.
    try:
        values[0] = WASI_ERRNO_NOTSUP
        return 0
    except BaseException as exc:  # noqa: BLE001 - as in the trampolines
        return _trap(getattr(_local, "calls", None), exc)


IMPORTS: dict[str, tuple[Callable[..., int], int]] = {
    "call": (HostCalls.call, 4),
    "submit": (HostCalls.submit, 2),
    "wait": (HostCalls.wait, 3),
    "take": (HostCalls.take, 3),
    "fetch": (HostCalls.fetch, 2),
}
# ctypes callbacks must outlive every linker that uses them: keep them at module level.
_TRAMPOLINES = {name: _trampoline(name, method, arity)
                for name, (method, arity) in IMPORTS.items()}
_POLL_ONEOFF = _as_callback(_poll_oneoff)
_NO_FINALIZER = ctypes.cast(ctypes.c_void_p(), ctypes.CFUNCTYPE(None, ctypes.c_void_p))


def make_linker(engine: wasmtime.Engine) -> wasmtime.Linker:
    """A linker with WASI preview 1 and the `pie` imports, shared by every program."""
    linker = wasmtime.Linker(engine)
    linker.define_wasi()
    linker.allow_shadowing = True
    for name, (_, arity) in IMPORTS.items():
        _define(linker, "pie", name, arity, _TRAMPOLINES[name])
    _define(linker, "wasi_snapshot_preview1", "poll_oneoff", 4, _POLL_ONEOFF)
    return linker


def _define(linker: wasmtime.Linker, module: str, name: str, arity: int, callback: Any) -> None:
    i32 = wasmtime.ValType.i32()
    ty = wasmtime.FuncType([i32] * arity, [i32])
    module_bytes, name_bytes = module.encode(), name.encode()
    error = ffi.wasmtime_linker_define_func_unchecked(
        linker.ptr(), ctypes.create_string_buffer(module_bytes), len(module_bytes),
        ctypes.create_string_buffer(name_bytes), len(name_bytes), ty.ptr(), callback, None,
        _NO_FINALIZER)
    if error:
        raise wasmtime.WasmtimeError._from_ptr(error)
