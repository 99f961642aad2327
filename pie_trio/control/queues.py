"""Instance queues: strict submission order within a queue, concurrency across queues.

Each queue is a FIFO drained by one trio task, which runs the queue's requests one at a time:
a request starts only once the one before it on the same queue has completed. Requests on
different queues (and of different instances) are awaited concurrently, which is what lets the
executor coalesce them into one batch per tick. A queue's priority goes with every executor call
its requests make; the executor favours higher priorities when a batch is full.

Also the queue ops: `create_queue {priority}`, `set_priority {queue, priority}`, `synchronize
{queue}`.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import trio

from pie_trio.control.fields import ControlError, Fields, is_int
from pie_trio.control.interface import Response


@dataclass(frozen=True)
class QueuedRequest:
    """One guest request on its way to its handler, and where its response goes."""

    request: Any  # a map, unless the guest sent something else (which is then refused)
    finish: Callable[[Response], None]


RunRequest = Callable[[QueuedRequest, "Queue | None"], Awaitable[None]]


class Queue:
    """A FIFO of requests run one at a time by its task (`drain`), or, while it is idle, one
    request at a time run with no task of its own (`hold` .. `release`, instance.py): either
    way a request starts only once the one before it has completed."""

    def __init__(self, queue_id: int, priority: int = 0):
        self.id = queue_id
        self.priority = priority
        self._send, self._receive = trio.open_memory_channel[QueuedRequest](math.inf)
        self._waiting = 0  # requests put and not yet taken by the task
        self._running = False  # the task has taken a request and not completed it
        self._held: trio.Event | None = None  # set when the request run without a task ends
        # The tokens the latest forward on this queue sampled, for a forward that `feed`s on
        # them (inference.py); None once a forward has started after it. `sampled_into`: the
        # (virtual) page that forward wrote last, which a forward of the same sequence names.
        self.sampled: list[int] | None = None
        self.sampled_into: int | None = None

    @property
    def waiting(self) -> int:
        """Requests put on the queue and not yet taken by its task."""
        return self._waiting

    @property
    def idle(self) -> bool:
        """Nothing on the queue is waiting or running: a request may start now."""
        return not (self._waiting or self._running or self._held is not None)

    def put(self, item: QueuedRequest) -> None:
        self._waiting += 1
        self._send.send_nowait(item)

    def hold(self) -> None:
        """An idle queue's next request runs with no task: later ones wait for `release`."""
        assert self.idle
        self._held = trio.Event()

    def release(self) -> None:
        """The request run with no task has completed."""
        held, self._held = self._held, None
        if held is not None:
            held.set()

    async def drain(self, run: RunRequest) -> None:
        """Run every request put on the queue, in order, until cancelled."""
        async for item in self._receive:
            self._waiting -= 1
            self._running = True
            try:
                while self._held is not None:
                    await self._held.wait()
                await run(item, self)
            finally:
                self._running = False


class Queues:
    """One instance's queues, each drained by a task in the instance's nursery."""

    def __init__(self, max_queues: int):
        self.max_queues = max_queues  # queue 0 included
        self._queues: dict[int, Queue] = {}
        self._next_id = 0
        self._nursery: trio.Nursery | None = None
        self._run: RunRequest | None = None

    def __len__(self) -> int:
        return len(self._queues)

    def open(self, nursery: trio.Nursery, run: RunRequest) -> None:
        """Start serving: queues drain into `run` inside `nursery`; queue 0 exists from now."""
        self._nursery, self._run = nursery, run
        self.create(0)

    def create(self, priority: int) -> Queue:
        if self._nursery is None or self._run is None:
            raise RuntimeError("create_queue before the instance is serving")
        if len(self._queues) >= self.max_queues:
            raise ControlError(f"the instance already has {len(self._queues)} queues, the limit")
        queue = Queue(self._next_id, priority)
        self._next_id += 1
        self._queues[queue.id] = queue
        self._nursery.start_soon(queue.drain, self._run)
        return queue

    def get(self, queue_id: int) -> Queue:
        queue = self._queues.get(queue_id)
        if queue is None:
            raise ControlError(f"queue {queue_id} is not held by this instance")
        return queue

    def find(self, queue_id: Any) -> Queue | None:
        """The queue a request's `queue` field names, or None (not held, or not an int)."""
        return self._queues.get(queue_id) if is_int(queue_id) else None

    def clear(self) -> None:
        """Forget every queue (their tasks end with the instance's nursery)."""
        self._queues.clear()
        self._nursery = self._run = None


# -- the ops -----------------------------------------------------------------------------------


class QueueOwner(Protocol):
    """What the queue ops need of the requesting instance."""

    @property
    def queues(self) -> Queues: ...


async def create_queue(ctx: QueueOwner, f: Fields, priority: int) -> int:
    return ctx.queues.create(f.integer("priority", 0)).id


async def set_priority(ctx: QueueOwner, f: Fields, priority: int) -> None:
    ctx.queues.get(f.integer("queue")).priority = f.integer("priority")


async def synchronize(ctx: QueueOwner, f: Fields, priority: int) -> None:
    # Dispatch already ran this request on its queue, after every earlier one completed.
    f.integer("queue")
