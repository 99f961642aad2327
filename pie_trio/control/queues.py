"""Instance queues: strict submission order within a queue, concurrency across queues.

Each queue is a FIFO drained by one trio task, which runs the queue's requests one at a time:
a request starts only once the one before it on the same queue has completed. Requests on
different queues (and of different instances) are awaited concurrently, which is what lets the
executor coalesce them into one batch per tick. A queue's priority goes with every executor call
its requests make; the executor favours higher priorities when a batch is full.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from typing import Any

import trio

QueuedRequest = tuple[int, dict[str, Any]]  # (request number, request)


class Queue:
    def __init__(self, queue_id: int, priority: int = 0):
        self.id = queue_id
        self.priority = priority
        self._send, self._receive = trio.open_memory_channel[QueuedRequest](math.inf)

    def put(self, item: QueuedRequest) -> None:
        self._send.send_nowait(item)

    async def drain(self, run: Callable[[QueuedRequest, Queue], Awaitable[None]]) -> None:
        """Run every request put on the queue, in order, until cancelled."""
        async for item in self._receive:
            await run(item, self)
