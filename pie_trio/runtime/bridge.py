"""The crossing between the guest threads and the trio thread.

`trio.from_thread.run` costs 70–130 µs per blocking call. The lean way used here: a guest thread
hands work to the trio thread through the runtime's `Mailbox` without waiting, and when it must
wait it parks on a per-instance lock (its `Bridge`) that the trio thread releases once a
condition holds. A generation step is thus one blocking crossing: post the forward, park until
its result is in.

Why a mailbox of our own instead of calling `TrioToken.run_sync_soon` for every post: that call
holds a lock across a write to trio's wake-up socket, and the write releases the GIL. With
dozens of guest threads posting at once they convoy on that lock, each waiting up to a GIL
switch interval (5 ms) per post. The mailbox is a deque (appends are atomic) and wakes trio
once per batch: only the first post after a drain calls `run_sync_soon`.

CPU accounting. The trio thread's time running an instance's posts is charged to that instance
(`Guard.host_cpu`), so its total CPU budget covers the runtime's work for it, not only its own
thread's. (Pacing charges a host call its guest thread's CPU time: parking costs nothing.)
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from time import perf_counter, sleep
from typing import Any

import trio

from pie_trio.runtime.sandbox import Guard, Termination

log = logging.getLogger(__name__)

Condition = Callable[[], bool]
Job = tuple[Callable[..., Any], tuple[Any, ...], "Guard | None"]
DRAIN_BATCH = 1024  # jobs run per drain before trio gets a turn at its other tasks


class Mailbox:
    """Work from every guest thread of one runtime for the trio thread, run in posting order."""

    def __init__(self, token: trio.lowlevel.TrioToken):
        self._token = token
        self._jobs: deque[Job] = deque()
        self._scheduled = False  # a drain is queued in trio and has not started yet
        self.parked = 0  # guests waiting for a condition (trio thread: Bridge._park/_release)

    def post(self, fn: Callable[..., Any], *args: Any, charge: Guard | None = None,
             wake: bool = True) -> None:
        """Any thread: run `fn(*args)` on the trio thread soon, its time charged to the
        instance of `charge`; without `wake`, only once a later post wakes the trio thread
        (the caller's next post must). Raises trio.RunFinishedError when the trio run is over."""
        self._jobs.append((fn, args, charge))
        # A drain resets the flag before it takes jobs, so a job appended while the flag is
        # still set is always taken by that drain; otherwise we schedule one.
        if wake and not self._scheduled:
            self._scheduled = True
            self._token.run_sync_soon(self._drain)

    def _drain(self) -> None:
        self._scheduled = False
        for _ in range(min(len(self._jobs), DRAIN_BATCH)):
            fn, args, guard = self._jobs.popleft()
            started = perf_counter()
            try:
                fn(*args)
            except Exception:  # one instance's bug must not take trio (and everyone) down
                log.exception("runtime callback %r failed", fn)
            if guard is not None:
                guard.host_cpu += perf_counter() - started
        if self._jobs and not self._scheduled:
            self._scheduled = True
            self._token.run_sync_soon(self._drain)


class Bridge:
    """One instance's way to wait for the trio thread."""

    def __init__(self, mailbox: Mailbox, guard: Guard):
        self._mailbox = mailbox
        self._guard = guard
        self._wake = threading.Lock()
        self._wake.acquire()  # held while nobody is released: acquiring again parks the guest
        self._condition: Condition | None = None  # the parked guest's condition (trio thread)
        self._hurry = True  # the parked guest is one the executor may be waiting for

    # -- guest thread ---------------------------------------------------------------------

    def post(self, fn: Callable[..., Any], *args: Any, wake: bool = True) -> None:
        """Run `fn(*args)` on the trio thread soon (see `Mailbox.post`); returns at once."""
        try:
            self._mailbox.post(fn, *args, charge=self._guard, wake=wake)
        except trio.RunFinishedError:
            # The trio run ended under us: nothing will ever answer, so stop the guest.
            self._guard.request_stop(Termination("evicted", "the runtime stopped"))
            self._guard.raise_if_stopping()

    def block_until(self, condition: Condition, *, hurry: bool = True) -> None:
        """Park the guest thread until `condition()` (evaluated on the trio thread) holds.

        Work posted before runs first. Raises `Stopped` if the instance is being stopped.
        `hurry`: the executor may be waiting for what the guest does next (see `_release`).
        """
        self._guard.raise_if_stopping()
        self._hurry = hurry
        self.post(self._park, condition)
        self._wake.acquire()
        self._guard.raise_if_stopping()

    # -- trio thread ----------------------------------------------------------------------

    def notify(self) -> None:
        """State the parked guest may be waiting on changed: release it if its condition holds."""
        condition = self._condition
        if condition is not None and condition():
            self._release()

    def interrupt(self) -> None:
        """Release a parked guest regardless of its condition (it will see its stop request)."""
        if self._condition is not None:
            self._release()

    def _park(self, condition: Condition) -> None:
        if self._guard.stopping or condition():
            self._wake.release()
        else:
            self._condition = condition
            self._mailbox.parked += 1

    def _release(self) -> None:
        self._condition = None
        self._mailbox.parked -= 1
        self._wake.release()
        # While other guests wait too (the trio thread is likely answering them next), hand the
        # GIL to this one now. Otherwise it waits for the trio thread to block or for a switch
        # interval (5 ms): after a forward of 32 sequences every guest came back 0.8-2 ms late,
        # and the executor waited ~5 ms per tick for them; yielding lets each run its bit of
        # Python and go back into Wasm (no GIL) while the trio thread answers the next, which
        # halved that wait. A guest alone gains nothing from it (the trio thread is about to
        # block anyway) and lost ~3% per token to the extra hand-offs. A guest that is ahead
        # (its next step is in already) is not yielded to either: the trio thread has that step
        # to start before the next tick, and the guest can catch up during the tick.
        if self._hurry and self._mailbox.parked:
            sleep(0)
