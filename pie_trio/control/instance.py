"""`InstanceControl`: the control layer's side of one running instance.

It owns the instance's virtual ids (pages, slots), its queues and its pending requests, and runs
them all in one nursery under one cancel scope, so `close()` can stop everything the instance
has in flight at once — even a forward waiting on the executor — and then free what it held.

Completion contract: `on_done` is called exactly once for every submitted request, always from
the trio thread and never from inside `submit` itself. Requests still pending when the instance
closes are answered `{"error": "instance closed"}` during `close()`; requests submitted after
`close()` began are answered the same way, soon after `submit` returns.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import trio

from pie_trio.control import ops
from pie_trio.control.fields import ControlError, is_int
from pie_trio.control.queues import Queue, QueuedRequest
from pie_trio.control.resources import VirtualIds

if TYPE_CHECKING:
    from pie_trio.control.controller import Controller

logger = logging.getLogger(__name__)

OnDone = Callable[[dict[str, Any]], None]
CLOSED_MESSAGE = "instance closed"


class InstanceControl:
    def __init__(self, controller: Controller, instance_id: str):
        self.id = instance_id
        self.controller = controller
        self.pages = VirtualIds("page")
        self.slots = VirtualIds("slot")
        self.queues: dict[int, Queue] = {}
        self.closed = False
        self._next_queue_id = 0
        self._next_request = 0
        self._pending: dict[int, OnDone] = {}
        self._early: list[QueuedRequest] = []  # submitted before serve() opened the nursery
        self._nursery: trio.Nursery | None = None
        self._cancel_scope = trio.CancelScope()
        self._finished = trio.Event()

    # -- the runtime's interface -------------------------------------------------------------

    def submit(self, request: dict[str, Any], on_done: OnDone) -> None:
        """Start one guest request; never blocks. See the module docstring for `on_done`."""
        if self.closed:
            token = trio.lowlevel.current_trio_token()
            token.run_sync_soon(_answer, on_done, {"error": CLOSED_MESSAGE})
            return
        number = self._next_request
        self._next_request += 1
        self._pending[number] = on_done
        if self._nursery is None:
            self._early.append((number, request))
        else:
            self._dispatch((number, request))

    async def close(self) -> None:
        """Cancel pending requests and free everything the instance holds. Idempotent."""
        self.closed = True
        self._cancel_scope.cancel()
        await self._finished.wait()
        await self.controller.releaser.flushed()

    def usage(self) -> dict[str, int]:
        """What the instance holds now, e.g. for the runtime's limits or an eviction policy."""
        return {"pages": len(self.pages), "slots": len(self.slots),
                "queues": len(self.queues), "pending": len(self._pending)}

    # -- for the op handlers -----------------------------------------------------------------

    def create_queue(self, priority: int) -> Queue:
        if self._nursery is None:
            raise RuntimeError("create_queue before the instance is serving")
        if len(self.queues) >= self.controller.limits.max_queues:
            raise ControlError(
                f"the instance already has {len(self.queues)} queues, the limit"
            )
        queue = Queue(self._next_queue_id, priority)
        self._next_queue_id += 1
        self.queues[queue.id] = queue
        self._nursery.start_soon(queue.drain, self._run)
        return queue

    def queue(self, queue_id: int) -> Queue:
        queue = self.queues.get(queue_id)
        if queue is None:
            raise ControlError(f"queue {queue_id} is not held by this instance")
        return queue

    async def execute(self, call: Any, priority: int, *, pages: list[int] | None = None,
                      slots: list[int] | None = None) -> Any:
        """Submit one executor call with its physical pages and slots pinned while in flight."""
        ctl = self.controller
        with ctl.pages.pinned(pages or []), ctl.slots.pinned(slots or []):
            return await ctl.executor.submit(call, priority=priority)

    # -- the instance's tasks ----------------------------------------------------------------

    async def serve(self) -> None:
        """Run the instance's queues and requests until `close()` (or controller shutdown)."""
        try:
            with self._cancel_scope:
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    self.create_queue(0)  # queue 0 exists from the start
                    early, self._early = self._early, []
                    for item in early:
                        self._dispatch(item)
                    await trio.sleep_forever()
        finally:
            self._nursery = None
            self._release_everything()
            self._finished.set()

    def _dispatch(self, item: QueuedRequest) -> None:
        assert self._nursery is not None
        _, request = item
        queue_id = None
        if isinstance(request, dict) and request.get("op") != "set_priority":
            # set_priority names the queue it changes; it does not wait in that queue's line.
            queue_id = request.get("queue")
        queue = self.queues.get(queue_id) if is_int(queue_id) else None
        if queue is not None:
            queue.put(item)
        else:
            # No queue, or a bad one: run at once; `ops.handle` explains a bad queue field.
            self._nursery.start_soon(self._run, item, None)

    async def _run(self, item: QueuedRequest, queue: Queue | None) -> None:
        number, request = item
        response = await ops.handle(self, request, queue)
        on_done = self._pending.pop(number, None)
        if on_done is not None:
            _answer(on_done, response)

    def _release_everything(self) -> None:
        """Drop every reference the instance holds; synchronous, so it cannot be interrupted."""
        self.closed = True
        ctl = self.controller
        ctl.pages.unref(self.pages.clear())
        ctl.slots.unref(self.slots.clear())
        ctl.exports.remove_owned_by(self.id)
        ctl.topics.unsubscribe_all(self.id)
        self.queues.clear()
        ctl.detach(self.id)
        pending, self._pending = self._pending, {}
        for on_done in pending.values():
            _answer(on_done, {"error": CLOSED_MESSAGE})


def _answer(on_done: OnDone, response: dict[str, Any]) -> None:
    """Call the runtime's callback; a failure there is its bug, not a reason to stop serving."""
    try:
        on_done(response)
    except Exception:
        logger.exception("on_done callback failed")
