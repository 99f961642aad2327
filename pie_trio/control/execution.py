"""`ExecutorAccess`: how op handlers reach the executor, with the ids a call names pinned.

A physical page or slot must stay allocated while an executor call that names it is in flight,
even if every name for it is dropped meanwhile (see resources.py), so no handler submits a
model call directly: it runs it here, which pins the call's pages and slots around the wait.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import overload

from pie_trio.control.resources import PhysicalPool
from pie_trio.executor.interface import CallExecutor
from pie_trio.model.calls import CopyKv, Embed, Forward, ForwardResult, MaskKv

ModelCall = Forward | Embed | CopyKv | MaskKv


class ExecutorAccess:
    def __init__(self, executor: CallExecutor, pages: PhysicalPool, slots: PhysicalPool):
        self._executor = executor
        self._pages = pages
        self._slots = slots

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
