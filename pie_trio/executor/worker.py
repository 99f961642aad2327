"""The executor's worker: one long-lived thread that runs its plans, one at a time.

Why not `trio.to_thread.run_sync` per plan: handing work to trio's thread cache and back costs
~110 µs here against ~60 µs for a thread parked on a lock, and a decode step at batch 1 pays it
on every token. A thread of its own also means the runner is only ever called from that one
thread, whatever it keeps per thread (torch's thread-local state, a CUDA stream).

A running plan cannot be interrupted (torch does not stop mid-kernel), so `run` waits for it
even when cancelled and returns its result, as `to_thread.run_sync` does by default; the
cancellation is delivered at the caller's next checkpoint.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeVar

import outcome
import trio

T = TypeVar("T")
_Job = tuple[Callable[[], Any], Callable[[outcome.Outcome[Any]], None]]


class Worker:
    """Runs one function at a time in its own thread for the trio task that awaits `run`."""

    def __init__(self, name: str):
        self._name = name
        self._job: _Job | None = None
        self._wake = threading.Lock()
        self._wake.acquire()  # held while there is nothing to do: acquiring parks the thread
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._busy = False  # a `run` is waiting for its function (trio thread only)

    @property
    def thread(self) -> threading.Thread | None:
        """The thread, once started (it ends after `stop`)."""
        return self._thread

    def start(self) -> None:
        """Start the thread (it parks at once); call from the trio thread of the run it serves."""
        if self._thread is not None:
            raise RuntimeError("a Worker starts once")
        token = trio.lowlevel.current_trio_token()
        self._thread = threading.Thread(target=self._serve, args=(token,), name=self._name,
                                        daemon=True)
        self._thread.start()

    async def run(self, fn: Callable[[], T]) -> T:
        """`fn()` in the worker thread; its result or its exception here. Not interruptible."""
        if self._thread is None or self._stopping:
            raise RuntimeError("the worker is not running")
        if self._busy:
            raise RuntimeError("the worker runs one function at a time")
        await trio.lowlevel.checkpoint_if_cancelled()  # (no yield unless cancelled)
        task = trio.lowlevel.current_task()

        def deliver(result: outcome.Outcome[Any]) -> None:  # on the trio thread
            self._busy = False
            trio.lowlevel.reschedule(task, result)

        self._busy = True
        self._job = (fn, deliver)
        self._wake.release()
        result: T = await trio.lowlevel.wait_task_rescheduled(
            lambda _: trio.lowlevel.Abort.FAILED)
        return result

    def stop(self) -> None:
        """Let the thread end (after the function it runs, if any). Idempotent."""
        if self._thread is not None and not self._stopping:
            self._stopping = True
            if self._job is None:
                self._wake.release()

    def _serve(self, token: trio.lowlevel.TrioToken) -> None:
        while True:
            self._wake.acquire()
            job, self._job = self._job, None
            if job is None:  # stopped while idle
                return
            fn, deliver = job
            result = outcome.capture(fn)
            try:
                token.run_sync_soon(deliver, result)
            except trio.RunFinishedError:
                return
            if self._stopping:
                return
