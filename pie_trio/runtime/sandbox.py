"""Sandbox limits, the epoch ticker, and how a running guest is stopped.

A guest runs in its own worker thread and cannot be pre-empted from Python, so wasmtime does the
stopping: the engine is built with *epoch interruption*, a ticker thread bumps the engine's epoch
every `EPOCH_TICK` seconds, and every store carries an epoch-deadline callback (reached through
wasmtime's C API, which wasmtime-py does not wrap) that runs in the guest's thread once per tick
while wasm code runs. The callback traps the guest when its `Guard` holds a stop request (a kill,
a limit hit elsewhere) or when the guest is over one of its two CPU budgets: the CPU it used
since it last returned from the host (`cpu_time`: a spin loop), or the CPU it used since it
started, host work done for it included (`cpu_total`: a guest that keeps calling the host, which
resets the first budget at every call). A stop requested from the trio thread also bumps the
epoch at once, so a spinning guest sees it within microseconds instead of at the next tick.

Host calls hold the GIL (wasm code does not), so a guest calling the host in a tight loop would
take the GIL from every other guest and from the trio thread. Each guest may spend at most
`host_call_share` of wall time running host calls (`Pacer`, charged the CPU time a call uses:
waiting, parked or for the GIL, costs the others nothing); past that it sleeps, with the GIL
released, until it is back under. Guests being paced share at most
`host_call_total_share` between them, so many of them cannot add up to the whole GIL either;
a guest within its share is never slowed by the others.

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
from time import perf_counter

import trio
import wasmtime
from wasmtime import _ffi as ffi

EPOCH_TICK = 0.01  # seconds between epoch increments: the granularity of CPU-time enforcement
# Seconds of host-call work a guest may do at a stretch before it is paced. Well under the GIL
# switch interval (5 ms): a thread that takes and drops the GIL in quick succession wins it
# from a waiting thread until that one forces a switch, so a long burst stalls everyone.
HOST_BURST = 0.001
# GIL time of a host call that its own clock does not see (entering and leaving the ctypes
# callback): measured ~3 µs of a ~10 µs `version` call on the 2-core development machine.
HOST_CALL_OVERHEAD = 3e-6

MiB = 1 << 20

# The reasons an instance can end with (docs/abi.md, "Termination reasons").
REASONS = ("finished", "error", "trap", "killed", "limit", "evicted", "client_gone",
           "parent_gone")
LIMIT_NAMES = ("cpu_time", "wall_time", "memory", "outstanding", "message_size")


@dataclass(frozen=True)
class InstanceLimits:
    """What one instance may use. Every limit is per instance, so one guest cannot starve another.

    cpu_time counts the guest's own CPU time since it last entered a host function (blocked time
    in a host call is not CPU time), so a long generation never hits it but a spin loop does.
    cpu_total counts all the CPU the instance used: its thread's (wasm and the host calls it
    ran) and the runtime's work on the trio thread for it.
    """

    memory_bytes: int = 256 * MiB  # linear memory; memory.grow past it returns -1
    table_elements: int = 100_000  # function-table entries
    cpu_time: float = 2.0  # seconds of guest CPU without returning to the host
    cpu_total: float | None = 60.0  # seconds of CPU over the instance's life (None: no limit)
    host_call_share: float = 0.1  # of wall time, spent in host calls that do not wait
    host_call_total_share: float = 0.25  # the same, for all guests being paced together
    wall_time: float | None = 600.0  # seconds from launch to termination (None: no limit)
    max_outstanding: int = 1024  # submitted handles not yet taken
    max_outstanding_bytes: int = 64 * MiB  # their requests and responses, estimated
    max_message_bytes: int = 4 * MiB  # one request from the guest
    output_backlog_bytes: int = 1 * MiB  # events the client has not read yet; the guest waits
    max_inbox: int = 1024  # client messages delivered but not yet received by the guest
    max_inbox_bytes: int = 16 * MiB  # their size
    max_children: int = 16  # child instances launched and not yet waited for

    def __post_init__(self) -> None:
        for name in ("memory_bytes", "table_elements", "max_outstanding", "max_message_bytes",
                     "output_backlog_bytes", "max_inbox", "max_outstanding_bytes",
                     "max_inbox_bytes"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise ValueError(f"InstanceLimits.{name} must be a positive integer")
        if not isinstance(self.max_children, int) or self.max_children < 0:
            raise ValueError("InstanceLimits.max_children must be a non-negative integer")
        if not self.cpu_time > 0:
            raise ValueError("InstanceLimits.cpu_time must be positive seconds")
        for name in ("wall_time", "cpu_total"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"InstanceLimits.{name} must be positive seconds or None")
        for name in ("host_call_share", "host_call_total_share"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"InstanceLimits.{name} must be a fraction in (0, 1]")


@dataclass(frozen=True)
class Termination:
    """Why an instance ended: one of REASONS, a human-readable detail, and for `limit` which."""

    reason: str
    detail: str = ""
    limit: str | None = None

    def as_event(self) -> dict[str, str]:
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


async def tick_epochs(engine: wasmtime.Engine) -> None:
    """Drive epoch interruption until cancelled: without ticks no CPU budget is ever checked.

    The ticks come from a thread of their own, joined on the way out. As a trio timer each tick
    cost a pass of the run loop with a cancel scope's expiry and a `Cancelled` raised and caught:
    ~0.1-0.5 ms of the event loop's CPU (~0.46 ms measured on a loaded 2-core VM), a hundred times
    a second, on a machine where the forward's kernel threads want both cores. A thread asleep
    in `Event.wait` costs the OS's wake-up and a few microseconds of Python.
    """
    stop = threading.Event()

    def ticks() -> None:
        while not stop.wait(EPOCH_TICK):
            engine.increment_epoch()

    ticker = threading.Thread(target=ticks, name="pie-trio epochs", daemon=True)
    ticker.start()
    try:
        await trio.sleep_forever()
    finally:
        stop.set()
        ticker.join()  # at once: its wait ends when `stop` is set


class Guard:
    """One instance's stop request and CPU budgets; shared by its guest thread and the trio thread.

    `request_stop` may be called from either thread; the first request wins. `cpu_mark`,
    `cpu_start` and the pacer are only touched by the guest thread, `host_cpu` only by
    the trio thread.
    """

    def __init__(self, limits: InstanceLimits, engine: wasmtime.Engine):
        self.limits = limits
        self.engine = engine
        self.termination: Termination | None = None
        self.cpu_mark: float | None = None  # guest thread CPU time when the stretch started
        self.cpu_start = 0.0  # guest thread CPU time when its store was created
        self.host_cpu = 0.0  # seconds the trio thread spent on this instance's posts
        self.on_tick: Callable[[], None] | None = None  # guest-thread work due every tick
        self.pacer = Pacer(limits.host_call_share, limits.host_call_total_share)
        self._stopped = threading.Event()  # wakes a paced guest at once when it must stop
        self._lock = threading.Lock()

    def request_stop(self, termination: Termination) -> bool:
        """Ask the guest to stop; False if an earlier request already decided the reason."""
        with self._lock:
            if self.termination is not None:
                return False
            self.termination = termination
        self._stopped.set()
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

    def pace(self, cpu_started: float) -> None:
        """A host call (or WASI write) that began when the thread's CPU clock read
        `cpu_started` is done: charge the CPU it used, and sleep if the guest is over its
        share. Raises Stopped if a stop request cut the sleep short. On the guest's thread,
        the guest runs again next, so its stretch budget (`cpu_time`) starts afresh.

        CPU time, not wall time, is what a call held the GIL for: a call that wakes the trio
        thread gives the GIL up and waits to get it back behind every other thread, and
        charging that wait paced guests for the load of others (measured: a Python guest's
        `submit` took 330 µs of wall time for 50 µs of CPU on a busy machine)."""
        cpu_now = time.thread_time()
        # wasmtime calls a WASI output callback from a thread of its own: its CPU clock is not
        # the guest thread's, and only the guest thread's may mark the stretch.
        if getattr(_local, "guard", None) is self:
            self.cpu_mark = cpu_now
        pause = self.pacer.charge(perf_counter(), cpu_now - cpu_started)
        if pause > 0 and self.pacer.sleep(pause, self._stopped):
            raise Stopped(self.termination or Termination("killed"))

    def install(self, store: wasmtime.Store) -> None:
        """Arm `store` (called in the guest thread that will run it) with this guard."""
        _local.guard = self
        self.cpu_mark = None
        self.cpu_start = time.thread_time()
        store.set_epoch_deadline(1)
        ffi.wasmtime_store_epoch_deadline_callback(store.ptr(), _on_epoch_deadline, None,
                                                   _NO_FINALIZER)

    def uninstall(self) -> None:
        """The store is gone: its thread, which runs other guests next, forgets this guard."""
        if getattr(_local, "guard", None) is self:
            _local.guard = None

    def _over_budget(self) -> bool:
        now = time.thread_time()
        if self.cpu_mark is None:
            self.cpu_mark = now
        elif now - self.cpu_mark > self.limits.cpu_time:
            self.request_stop(limit_hit(
                "cpu_time", f"the guest ran {now - self.cpu_mark:.3f} s of CPU without "
                f"returning to the host (limit {self.limits.cpu_time:g} s)"))
            return True
        own = now - self.cpu_start
        total = own + self.host_cpu
        if self.limits.cpu_total is not None and total > self.limits.cpu_total:
            self.request_stop(limit_hit(
                "cpu_time", f"the instance used {total:.3f} s of CPU in total ({own:.3f} s in "
                f"its own thread, {self.host_cpu:.3f} s of runtime work for it; limit "
                f"{self.limits.cpu_total:g} s)"))
            return True
        return False


class Pacer:
    """A token bucket of GIL time: a guest may spend `share` of wall time in host calls that
    do not wait, in bursts of up to HOST_BURST. Guest thread only (but for the count below).

    When it is over, it sleeps (GIL released) until it has earned back half a burst, so a guest
    in a host-call loop runs in slices (~0.5 ms on, ~5 ms off at the default share) rather than
    sleeping after every call. The guests asleep right now are the ones over their
    share: each of them gets at most `total_share` divided by their number.
    """

    _sleepers = 0  # guests of this process sleeping off their debt now
    _sleepers_lock = threading.Lock()

    def __init__(self, share: float, total_share: float = 1.0):
        self.share = share
        self.total_share = total_share
        self.credit = HOST_BURST
        self.stamp = perf_counter()

    def charge(self, now: float, busy: float) -> float:
        """Charge `busy` seconds (plus the unseen overhead of a call) at time `now`; how long
        to sleep now (0 if still within the share)."""
        credit = self.credit + (now - self.stamp) * self.share
        self.credit = (credit if credit < HOST_BURST else HOST_BURST) - busy - HOST_CALL_OVERHEAD
        self.stamp = now
        if self.credit >= 0:
            return 0.0
        share = min(self.share, self.total_share / (Pacer._sleepers + 1))
        return (HOST_BURST / 2 - self.credit) / share

    def sleep(self, pause: float, stop: threading.Event) -> bool:
        """Sleep `pause` seconds, counted among the sleepers; True if `stop` cut it short."""
        with Pacer._sleepers_lock:
            Pacer._sleepers += 1
        try:
            return stop.wait(pause)
        finally:
            with Pacer._sleepers_lock:
                Pacer._sleepers -= 1


# A guest thread runs one store at a time, so the thread identifies the guard.
_local = threading.local()
_NO_FINALIZER = ctypes.cast(ctypes.c_void_p(), ctypes.CFUNCTYPE(None, ctypes.c_void_p))
_UPDATE_DEADLINE_CONTINUE = 0
_STOP_MESSAGE = b"pie-trio: the instance was stopped"


def _epoch_deadline(context: ctypes._Pointer[ffi.wasmtime_context_t],  # noqa: ARG001
                    data: int | None,  # noqa: ARG001
                    deadline_delta: ctypes._Pointer[ctypes.c_uint64],
                    update_kind: ctypes._Pointer[ctypes.c_uint8]) -> int:
    """wasmtime's epoch-deadline callback: trap (return an error) or extend by one tick.

    Nothing may raise out of a ctypes callback (the exception would be lost, and the process
    may abort): any failure here stops the guest."""
    guard: Guard | None = None
    try:
        guard = getattr(_local, "guard", None)
        if guard is None or guard.termination is not None or guard._over_budget():
            return _stop_error()
        if guard.on_tick is not None:
            try:
                guard.on_tick()
            except Exception:  # noqa: BLE001 - a stop it raised is seen at the next tick
                pass
        deadline_delta[0] = 1
        update_kind[0] = _UPDATE_DEADLINE_CONTINUE
        return 0
    except BaseException as exc:  # noqa: BLE001 - see the docstring
        try:
            if guard is not None:
                guard.request_stop(Termination("trap", f"host error at an epoch check: {exc!r}"))
        finally:
            return _stop_error()  # noqa: B012 - nothing may leave this callback


# ctypes callbacks must outlive every store that uses them: kept at module level.
_on_epoch_deadline = ctypes.CFUNCTYPE(
    ctypes.c_size_t, ctypes.POINTER(ffi.wasmtime_context_t), ctypes.c_void_p,
    ctypes.POINTER(ctypes.c_uint64), ctypes.POINTER(ctypes.c_uint8))(_epoch_deadline)


def _stop_error() -> int:
    error = ffi.wasmtime_error_new(ctypes.create_string_buffer(_STOP_MESSAGE))
    return ctypes.cast(error, ctypes.c_void_p).value or 0
