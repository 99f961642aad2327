"""`ExecutorAccess`: how op handlers reach the executor, with the ids a call names pinned.

A physical page or slot must stay allocated while an executor call that names it is in flight,
even if every name for it is dropped meanwhile (see resources.py), so no handler submits a
model call directly: it runs it here, which pins the call's pages and slots around the wait
(`run`), or from the submission until the answer or until it is abandoned (`start`, for a
request that runs with no task of its own, dispatch.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, overload

import outcome

from pie_trio.control.resources import PhysicalPool
from pie_trio.executor.interface import CallExecutor
from pie_trio.model.calls import CopyKv, Embed, Forward, ForwardResult, MaskKv

ModelCall = Forward | Embed | CopyKv | MaskKv


class ExecutorAccess:
    def __init__(self, executor: CallExecutor, pages: PhysicalPool, slots: PhysicalPool):
        self._executor = executor
        self._pages = pages
        self._slots = slots

    def expect_callers(self, delta: int) -> None:
        """Instances on their way to their first forward (see `CallExecutor.expect_callers`)."""
        self._executor.expect_callers(delta)

    @overload
    async def run(self, call: Forward, priority: int, *, pages: Sequence[int] = (),
                  slots: Sequence[int] = ()) -> ForwardResult: ...
    @overload
    async def run(self, call: Embed | CopyKv | MaskKv, priority: int, *,
                  pages: Sequence[int] = (), slots: Sequence[int] = ()) -> None: ...

    async def run(self, call: ModelCall, priority: int, *, pages: Sequence[int] = (),
                  slots: Sequence[int] = ()) -> ForwardResult | None:
        """Run one model call, its physical `pages` and `slots` pinned while it is in flight."""
        with self._pages.pinned(pages), self._slots.pinned(slots):
            if isinstance(call, Forward):
                return await self._executor.submit(call, priority=priority)
            await self._executor.submit(call, priority=priority)
            return None

    def start(self, call: ModelCall, priority: int,
              on_done: Callable[[outcome.Outcome[Any]], None], *, pages: Sequence[int] = (),
              slots: Sequence[int] = ()) -> Callable[[], None]:
        """Submit one model call without waiting; `on_done(outcome)` on the trio thread once
        it is answered. Its `pages` and `slots` stay pinned until then. Returns the function
        that abandons it (no `on_done` then); raises `CallError` if the executor is not
        running."""
        held_pages, held_slots = list(pages), list(slots)
        self._pages.pin(held_pages)
        self._slots.pin(held_slots)
        pinned = True

        def unpin() -> None:
            nonlocal pinned
            if pinned:
                pinned = False
                self._pages.unpin(held_pages)
                self._slots.unpin(held_slots)

        def answered(result: outcome.Outcome[Any]) -> None:
            unpin()
            on_done(result)

        try:
            pending = self._executor.enqueue(call, priority)
        except BaseException:
            unpin()
            raise

        def abandon() -> None:
            pending.abandon()
            unpin()

        pending.then(answered)
        return abandon
