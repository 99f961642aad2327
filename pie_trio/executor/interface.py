"""The executor's face to the control layer: `CallExecutor`, the Protocol control types against.

Only what control uses is here: submitting a call (with its priority) and awaiting it, or
enqueueing it and being called back with its outcome (a caller with no task of its own to wait
in), and reading how many page and slot ids the executor's pools hold and can still hand out.
`Executor` (`executor.py`) satisfies it structurally; control imports this module, never the
executor's implementation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, overload

import outcome

from pie_trio.model.calls import (
    AllocPages,
    AllocSlots,
    Call,
    CallResult,
    CopyKv,
    DropSwappedKv,
    Embed,
    Forward,
    ForwardResult,
    FreePages,
    FreeSlots,
    MaskKv,
    SwapInKv,
    SwapOutKv,
)


class PoolCapacity(Protocol):
    """One of the executor's id pools (KV pages or embedding slots), read-only."""

    @property
    def capacity(self) -> int:
        """Ids the pool holds in all."""
        ...

    @property
    def num_free(self) -> int:
        """Ids the pool can hand out now."""
        ...


class PendingCall(Protocol):
    """A call enqueued and not awaited (`CallExecutor.enqueue`)."""

    def then(self, on_done: Callable[[outcome.Outcome[CallResult]], None]) -> None:
        """Call `on_done` with the call's result or `CallError` once it is answered."""
        ...

    def abandon(self) -> None:
        """Give the call up: skipped if still queued, its answer dropped (`on_done` never
        called)."""
        ...


class CallExecutor(Protocol):
    """What control needs from the executor."""

    @property
    def pages(self) -> PoolCapacity:
        """The KV page pool."""
        ...

    @property
    def slots(self) -> PoolCapacity:
        """The embedding slot pool."""
        ...

    # The result's type follows the call's: the ids of an allocation, a `ForwardResult` for a
    # forward, the bytes a swap moved, None for the rest. A rejected call raises `CallError` for
    # its caller only.
    @overload
    async def submit(self, call: AllocPages | AllocSlots, priority: int = 0) -> list[int]: ...
    @overload
    async def submit(self, call: Forward, priority: int = 0) -> ForwardResult: ...
    @overload
    async def submit(self, call: SwapOutKv | SwapInKv, priority: int = 0) -> int: ...
    @overload
    async def submit(
        self, call: FreePages | FreeSlots | Embed | CopyKv | MaskKv | DropSwappedKv,
        priority: int = 0,
    ) -> None: ...
    @overload
    async def submit(self, call: Call, priority: int = 0) -> CallResult: ...

    def enqueue(self, call: Call, priority: int = 0) -> PendingCall:
        """Queue `call` now (validated at once: a bad call is answered with its `CallError`
        before this returns); its result comes through `then`."""
        ...

    def expect_callers(self, delta: int) -> None:
        """`delta` more callers are on their way to their first forward (or, negative, that
        many arrived or will not come): after idling, the first batch waits briefly for them
        (a burst of launches shares one forward). Never required for correctness."""
        ...
