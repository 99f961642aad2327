"""Sandbox limits, the epoch ticker, and how a running guest is stopped.

A guest runs in its own worker thread and cannot be pre-empted from Python, so wasmtime does the
stopping: the engine is built with *epoch interruption*, a ticker task bumps the engine's epoch
every `EPOCH_TICK` seconds, and every store carries an epoch-deadline callback (reached through
wasmtime's C API, which wasmtime-py does not wrap) that runs in the guest's thread once per tick
while wasm code runs. The callback traps the guest when its `Guard` holds a stop request (a kill,
a limit hit elsewhere) or when the guest has used more than its CPU budget since it last returned
to the host. A stop requested from the trio thread also bumps the epoch at once, so a spinning
guest sees it within microseconds instead of at the next tick.

Every instance ends with exactly one `Termination`; the first stop request wins, and the guest
thread reads it after the trap instead of trusting the exception (wasmtime-py routes exceptions
raised in host code through a process-wide global that concurrent traps can mix up).
"""

from __future__ import annotations

import ctypes
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import trio
import wasmtime
from wasmtime import _ffi as ffi

EPOCH_TICK = 0.01  # seconds between epoch increments: the granularity of CPU-time enforcement

MiB = 1 << 20

# The reasons an instance can end with (docs/abi.md, "Termination reasons").
REASONS = ("finished", "error", "trap", "killed", "limit", "evicted", "client_gone")
LIMIT_NAMES = ("cpu_time", "wall_time", "memory", "outstanding", "message_size")


@dataclass(frozen=True)
class Limits:
    """What one instance may use. Every limit is per instance, so one guest cannot starve another.

    cpu_time counts the guest's own CPU time since it last entered a host function (blocked time
    in a host call is not CPU time), so a long generation never hits it but a spin loop does.
    """

    memory_bytes: int = 256 * MiB  # linear memory; memory.grow past it returns -1
    table_elements: int = 100_000  # function-table entries
    cpu_time: float = 2.0  # seconds of guest CPU without returning to the host
    wall_time: float | None = 600.0  # seconds from launch to termination (None: no limit)
    max_outstanding: int = 1024  # submitted handles not yet taken
    max_message_bytes: int = 4 * MiB  # one request from the guest
    output_backlog_bytes: int = 1 * MiB  # events the client has not read yet; the guest waits
    max_inbox: int = 1024  # client messages delivered but not yet received by the guest

    def __post_init__(self) -> None:
        for name in ("memory_bytes", "table_elements", "max_outstanding", "max_message_bytes",
                     "output_backlog_bytes", "max_inbox"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise ValueError(f"Limits.{name} must be a positive integer")
        if not self.cpu_time > 0:
            raise ValueError("Limits.cpu_time must be positive seconds")
        if self.wall_time is not None and not self.wall_time > 0:
            raise ValueError("Limits.wall_time must be positive seconds or None")


@dataclass(frozen=True)
class Termination:
    """Why an instance ended: one of REASONS, a human-readable detail, and for `limit` which."""

    reason: str
    detail: str = ""
    limit: str | None = None

    def as_event(self) -> dict:
        event = {"event": "terminated", "reason": self.reason, "detail": self.detail}
        if self.limit is not None:
            event["limit"] = self.limit
        return event


def limit_hit(name: str, detail: str) -> Termination:
    assert name in LIMIT_NAMES
    return Termination("limit", f"{name}: {detail}", limit=name)


class Stopped(Exception):  # noqa: N818 - a control-flow signal, not an error of the caller
    """Raised in the guest thread to unwind the guest; the host function turns it into a trap."""

    def __init__(self, termination: Termination):
        super().__init__(termination.detail or termination.reason)
        self.termination = termination


def make_engine() -> wasmtime.Engine:
    """The one engine every program is compiled for (compiled modules are tied to its config)."""
    config = wasmtime.Config()
    config.epoch_interruption = True
    # Linear memory stays at one address for a store's life (growth happens inside its
    # reservation), so host calls can keep the base address instead of asking on every call.
    config.memory_may_move = False
    return wasmtime.Engine(config)


async def tick_epochs(engine: wasmtime.Engine) -> None:
    """Drive epoch interruption: without ticks no CPU budget is ever checked."""
    while True:
        await trio.sleep(EPOCH_TICK)
        engine.increment_epoch()


class Guard:
    """One instance's stop request and CPU budget; shared by its guest thread and the trio thread.

    `request_stop` may be called from either thread; the first request wins. `cpu_mark` is only
    touched by the guest thread.
    """

    def __init__(self, limits: Limits, engine: wasmtime.Engine):
        self.limits = limits
        self.engine = engine
        self.termination: Termination | None = None
        self.cpu_mark: float | None = None  # guest thread CPU time when the budget started
        self.on_tick: Callable[[], None] | None = None  # guest-thread work due every tick
        self._lock = threading.Lock()

    def request_stop(self, termination: Termination) -> bool:
        """Ask the guest to stop; False if an earlier request already decided the reason."""
        with self._lock:
            if self.termination is not None:
                return False
            self.termination = termination
        # A spinning guest checks its deadline at the next epoch: make that now.
        self.engine.increment_epoch()
        return True

    @property
    def stopping(self) -> bool:
        return self.termination is not None

    def raise_if_stopping(self) -> None:
        if self.termination is not None:
            raise Stopped(self.termination)

    # -- guest thread ---------------------------------------------------------------------

    def resume_guest(self) -> None:
        """The guest runs again after a host call: its CPU budget starts afresh.

        Reading the thread's CPU clock is a system call (µs), too dear for every host call:
        the next epoch callback takes the mark instead, so a budget may run one tick long.
        """
        self.cpu_mark = None

    def install(self, store: wasmtime.Store) -> None:
        """Arm `store` (called in the guest thread that will run it) with this guard."""
        _local.guard = self
        self.resume_guest()
        store.set_epoch_deadline(1)
        ffi.wasmtime_store_epoch_deadline_callback(store.ptr(), _on_epoch_deadline, None,
                                                   _NO_FINALIZER)

    def _over_budget(self) -> bool:
        now = time.thread_time()
        if self.cpu_mark is None:
            self.cpu_mark = now
            return False
        used = now - self.cpu_mark
        if used <= self.limits.cpu_time:
            return False
        self.request_stop(limit_hit(
            "cpu_time", f"the guest ran {used:.3f} s of CPU without returning to the host "
            f"(limit {self.limits.cpu_time:g} s)"))
        return True


# Each guest thread runs exactly one store, so the thread identifies the guard.
_local = threading.local()
_NO_FINALIZER = ctypes.cast(None, ctypes.CFUNCTYPE(None, ctypes.c_void_p))
_UPDATE_DEADLINE_CONTINUE = 0


@ctypes.CFUNCTYPE(ctypes.c_size_t, ctypes.POINTER(ffi.wasmtime_context_t), ctypes.c_void_p,
                  ctypes.POINTER(ctypes.c_uint64), ctypes.POINTER(ctypes.c_uint8))
def _on_epoch_deadline(context, data, deadline_delta, update_kind):  # noqa: ARG001
    """wasmtime's epoch-deadline callback: trap (return an error) or extend by one tick."""
    guard: Guard | None = getattr(_local, "guard", None)
    if guard is None or guard.termination is not None or guard._over_budget():
        message = b"pie-trio: the instance was stopped"
        error = ffi.wasmtime_error_new(ctypes.create_string_buffer(message))
        return ctypes.cast(error, ctypes.c_void_p).value
    if guard.on_tick is not None:
        try:
            guard.on_tick()
        except Exception:  # noqa: BLE001 - a stop it raised is seen at the next tick
            pass
    deadline_delta[0] = 1
    update_kind[0] = _UPDATE_DEADLINE_CONTINUE
    return 0
