"""Components: inferlets built as WebAssembly components (Python ones, via componentize-py).

A component imports the host interface `pie:inferlet/host` (inferlets/wit/inferlet.wit) and
WASI preview 2, and exports `run: func() -> result<_, string>`. The interface carries the same
msgpack requests and responses as the core module's `pie` imports (docs/abi.md, "Components"),
and every rule about them — limits, pacing, handles, the runtime's own answers — is `HostCalls`'s
(abi.py): this module only converts the values wasmtime hands over and hands back.

Why the messages are WIT `string`s whose code points are the bytes (latin-1) and not
`list<u8>`: wasmtime's C API lifts a `list<u8>` into one 32-byte value per byte, and wasmtime-py
converts each one in a Python loop, so a 4 MiB request would cost the host 128 MiB and seconds
of GIL before any limit could look at it. A string is lifted as one buffer of at most two bytes
per code point and converted at C speed both ways.

Exceptions. wasmtime-py's component callbacks turn an exception raised by a host function into
a trap; the reason is recorded on the instance's `Guard` first (`HostCalls.record_stop`), and the
guest thread reads it from there, as for core modules.
"""

from __future__ import annotations

from collections.abc import Callable
from time import thread_time
from typing import Any

import wasmtime
import wasmtime.component as wc

from pie_trio.runtime.abi import WAIT_ALL, WAIT_ANY, HostCalls, Misuse, current_calls
from pie_trio.runtime.sandbox import Termination, limit_hit

HOST_INTERFACE = "pie:inferlet/host@0.1.0"
RUN_EXPORT = "run"
ALLOWED_IMPORT_PREFIXES = ("pie:inferlet/", "wasi:")


class HostCallFailed(Exception):
    """A component host call stopped the guest (the reason is on its Guard)."""


def make_component_linker(engine: wasmtime.Engine) -> wc.Linker:
    """A component linker with WASI preview 2 and the `pie:inferlet/host` interface."""
    linker = wc.Linker(engine)
    linker.add_wasip2()
    with linker.root() as root, root.add_instance(HOST_INTERFACE) as host:
        for name, function in HOST_FUNCTIONS.items():
            host.add_func(name, _host_function(name, function))
    return linker


def run_component(component: wc.Component, linker: wc.Linker, store: wasmtime.Store,
                  calls: HostCalls) -> Termination:
    """Instantiate `component` in `store` and run its `run` export to the end; how it ended
    (a trap propagates as wasmtime raised it)."""
    instance = linker.instantiate(store, component)
    run = instance.get_func(store, RUN_EXPORT)
    if run is None:  # the program store checked the export; a defensive answer all the same
        return Termination("trap", f"the component has no `{RUN_EXPORT}` export")
    calls.bind_messages()
    outcome = run(store)
    run.post_return(store)
    return _termination(outcome)


def _termination(outcome: Any) -> Termination:
    """`run`'s result<_, string> as wasmtime-py lifts it: None or a Variant tagged ok/err."""
    if isinstance(outcome, wc.Variant):
        if outcome.tag == "ok":
            return Termination("finished")
        return _error(str(outcome.payload))
    if isinstance(outcome, str):
        return _error(outcome)
    return Termination("finished")


def _error(message: str) -> Termination:
    # CPython raises MemoryError when an allocation fails under the store's memory limit; the
    # SDK reports it first in the error (a guest that fakes it only misnames its own end).
    if message.startswith("MemoryError"):
        return limit_hit("memory", f"the guest ran out of memory: {message}")
    return Termination("error", message)


# -- the host functions --------------------------------------------------------------------


def _submit(calls: HostCalls, request: str) -> int:
    return calls.submit_message(*_decode(calls, request))


def _call(calls: HostCalls, request: str) -> str:
    return calls.call_message(*_decode(calls, request)).decode("latin-1")


def _wait(calls: HostCalls, handles: list[int], wait_all: bool) -> int:
    return calls.wait_handles(handles, WAIT_ALL if wait_all else WAIT_ANY)


def _take(calls: HostCalls, handle: int) -> str:
    return calls.take_message(handle).decode("latin-1")


def _decode(calls: HostCalls, request: str) -> tuple[Any, int]:
    calls.check_message_size(len(request))  # one byte per code point, when well-formed
    try:
        data = request.encode("latin-1")
    except UnicodeEncodeError:
        raise Misuse("a request must be a byte string: code points 0-255, one per byte "
                     "(docs/abi.md, \"Components\")") from None
    return calls.decode_request(data)


HOST_FUNCTIONS: dict[str, Callable[..., Any]] = {
    "submit": _submit,
    "call": _call,
    "wait": _wait,
    "take": _take,
}


def _host_function(name: str, function: Callable[..., Any]) -> Callable[..., Any]:
    """`function` as a component host function: run for the calling thread's instance,
    paced, and turned into a trap (its reason recorded) when it fails."""

    def host_function(store: wasmtime.Store, *args: Any) -> Any:  # noqa: ARG001
        calls = current_calls()
        if calls is None or not calls.bound:
            raise HostCallFailed(f"pie:inferlet/host.{name} was called outside an instance")
        guard = calls.guard
        started = thread_time()
        try:
            result = function(calls, *args)
            guard.pace(started)  # may sleep; raises Stopped if stopped meanwhile
        except BaseException as exc:  # noqa: BLE001 - every failure becomes a trap
            termination = calls.record_stop(exc)
            raise HostCallFailed(termination.detail or termination.reason) from None
        return result

    return host_function
