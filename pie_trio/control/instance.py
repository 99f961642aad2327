"""`InstanceControl`: the lifecycle of one attached instance in the control layer.

It is the runtime's way in (`start_request`, `close`, `usage`): a request enters here once and
goes on to the dispatcher, on one of the instance's queues or at once, through the instance's
residency gate (a KV request waits there while its pages are swapped out, preemption.py).
Everything the instance runs — its queues' tasks and its requests — lives in one nursery under
one cancel scope, so `close()` can stop all it has in flight at once (even a forward waiting on
the executor) and then free what it held (`InstanceContext.release_all`).

Chained requests. A request that could start with no task but finds its queue busy with one
that did (a guest one decode step ahead: docs/abi.md, `feed`) is not put on the queue for its
task: it waits on the running request (`_TasklessRequest.then`) and starts, again with no task,
from that request's answer, before the guest hears of it. The executor then has it before it
plans its next tick, so the guest's crossing is not between the two forwards. A third request
for the same queue puts the chained one on the queue ahead of itself: the order stays that of
submission.

Completion contract: `on_done` is called exactly once for every request started, always from
the trio thread. A request for an immediate op (dispatch.py: `ping`, `clock`, the store,
`model_info`) that names no queue is answered before `start_request` returns; every other one
later. Requests still pending when the instance closes are answered `{"error": "instance
closed"}` during `close()`; requests started after `close()` began are answered the same way,
soon after `start_request` returns.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from pie_trio.control import dispatch
from pie_trio.control.context import InstanceContext
from pie_trio.control.interface import OnDone, Response
from pie_trio.control.queues import Queue, QueuedRequest
from pie_trio.control.resources import Releaser

logger = logging.getLogger(__name__)

Spawn = Callable[[Callable[[], Awaitable[None]]], None]  # a nursery's start_soon

CLOSED_MESSAGE = "instance closed"


class PendingAnswers:
    """The `on_done` of every request not answered yet; each is called exactly once."""

    def __init__(self) -> None:
        self._waiting: dict[int, OnDone] = {}
        self._next = 0

    def __len__(self) -> int:
        return len(self._waiting)

    def add(self, on_done: OnDone) -> Callable[[Response], None]:
        """Hold `on_done`; the function returned answers it (once: later calls do nothing)."""
        number = self._next
        self._next += 1
        self._waiting[number] = on_done
        return functools.partial(self._answer_one, number)

    def _answer_one(self, number: int, response: Response) -> None:
        on_done = self._waiting.pop(number, None)
        if on_done is not None:
            _answer(on_done, response)

    def answer_all(self, response: Response) -> None:
        waiting, self._waiting = self._waiting, {}
        for on_done in waiting.values():
            _answer(on_done, response)


class InstanceControl:
    def __init__(self, context: InstanceContext, releaser: Releaser,
                 detach: Callable[[str], None], spawn: Spawn):
        self.context = context
        self.closed = False
        self._releaser = releaser
        self._detach = detach  # tells the controller the instance has released everything
        # `serve` starts with the first request that needs it: an instance that asks for
        # nothing but immediate ops (or nothing at all) costs no tasks.
        self._spawn = spawn
        self._serving = False
        self._answers = PendingAnswers()
        self._early: list[QueuedRequest] = []  # started before serve() opened the nursery
        self._taskless: set[_TasklessRequest] = set()  # requests running with no task
        self._running_on: dict[int, _TasklessRequest] = {}  # ... by the queue they hold
        self._nursery: trio.Nursery | None = None
        self._cancel_scope = trio.CancelScope()
        self._finished = trio.Event()
        self._expected = True  # by the executor, until its first forward (controller.attach)

    @property
    def id(self) -> str:
        return self.context.instance_id

    # -- the runtime's interface (control.interface.AttachedInstance) --------------------------

    def start_request(self, request: dict[str, Any], on_done: OnDone) -> None:
        """Start one guest request; never blocks. See the module docstring for `on_done`."""
        first_forward = (self._expected and isinstance(request, dict)
                         and request.get("op") == "forward")
        self._start(request, on_done)
        if first_forward and self._expected:
            self._arrived()  # after its forward is queued (when it needed no task)

    def _start(self, request: dict[str, Any], on_done: OnDone) -> None:
        if self.closed:
            token = trio.lowlevel.current_trio_token()
            token.run_sync_soon(_answer, on_done, {"error": CLOSED_MESSAGE})
            return
        response = dispatch.answer_now(self.context, request)
        if response is not None:
            _answer(on_done, response)
            return
        if not self._serving:
            self._serving = True
            self._spawn(self.serve)
        item = QueuedRequest(request, self._answers.add(on_done))
        if self._nursery is None:
            self._early.append(item)
        elif not (self._start_without_task(item) or self._chain(item)):
            self._route(item)

    def answer_stateless(self, request: dict[str, Any]) -> Response | None:
        """The response to a request for a stateless op (ping, clock, model_info) naming no
        queue, computed now on the calling thread, whichever it is; None for any other request,
        and once the instance is closing (`start_request` answers those)."""
        if self.closed:
            return None
        return dispatch.answer_now(self.context, request, stateless=True)

    async def close(self) -> None:
        """Cancel pending requests and free everything the instance holds. Idempotent."""
        self.closed = True
        if not self._serving:  # it never asked for anything that needed a task
            self._serving = True
            self._release_everything()
            self._finished.set()
        else:
            self._cancel_scope.cancel()
        if not self._finished.is_set():  # (an Event's wait passes the turn even when set)
            await self._finished.wait()
        await self._releaser.flushed()

    def usage(self) -> dict[str, int]:
        """What the instance holds now, e.g. for the runtime's limits or an eviction policy."""
        ctx = self.context
        return {"pages": len(ctx.pages) + len(ctx.residency.swapped), "slots": len(ctx.slots),
                "queues": len(ctx.queues), "pending": len(self._answers)}

    def _arrived(self) -> None:
        self._expected = False
        self.context.executor.expect_callers(-1)

    # -- the instance's tasks ----------------------------------------------------------------

    async def serve(self) -> None:
        """Run the instance's queues and requests until `close()` (or controller shutdown)."""
        try:
            with self._cancel_scope:
                async with trio.open_nursery() as nursery:
                    self.context.queues.open(nursery, self._run)
                    self._nursery = nursery
                    early, self._early = self._early, []
                    for item in early:
                        self._route(item)
                    await trio.sleep_forever()
        finally:
            self._nursery = None
            self._release_everything()
            self._finished.set()

    def _start_without_task(self, item: QueuedRequest) -> bool:
        """Run `item` with no task of its own where its op allows it (dispatch.start: a
        forward) and nothing is ahead of it: its queue idle, the instance's pages in the pool.
        False, with nothing done, where it needs its task."""
        request = item.request
        if not isinstance(request, dict) or not dispatch.starts_without_task(request):
            return False
        queue = None
        if request.get("queue") is not None:
            queue = dispatch.queue_for(request, self.context.queues)
            if queue is None or not queue.idle:  # (a bad queue field: the task explains)
                return False
        if not self.context.residency.enter_now():
            return False
        taskless = _TasklessRequest(self, item, queue)
        priority = queue.priority if queue is not None else 0
        abandon = dispatch.start(self.context, request, priority, taskless.finish)
        if abandon is None:
            taskless.end()
            return False
        taskless.abandon = abandon
        return True

    def _chain(self, item: QueuedRequest) -> bool:
        """Make `item` start from the answer of the taskless request running on its queue,
        where it could run with no task and nothing else waits on that queue. False, with
        nothing done, otherwise."""
        request = item.request
        if not isinstance(request, dict) or not dispatch.starts_without_task(request):
            return False
        queue = dispatch.queue_for(request, self.context.queues)
        if queue is None or queue.waiting:
            return False
        running = self._running_on.get(queue.id)
        if running is None or running.then is not None:
            return False
        running.then = item
        return True

    def _start_chained(self, item: QueuedRequest) -> None:
        """A chained request's turn has come (the request before it has its answer)."""
        if self.closed or self._nursery is None:
            return  # its answer comes from the closing
        if not self._start_without_task(item):
            self._route(item)

    def _route(self, item: QueuedRequest) -> None:
        assert self._nursery is not None
        queue = dispatch.queue_for(item.request, self.context.queues)
        if queue is not None:
            running = self._running_on.get(queue.id)
            if running is not None and running.then is not None:
                queue.put(running.then)  # chained before `item` came: it goes first
                running.then = None
            queue.put(item)
        else:
            self._nursery.start_soon(self._run, item, None)

    async def _run(self, item: QueuedRequest, queue: Queue | None) -> None:
        """One request, through the residency gate: a request that names KV pages waits
        while the instance's pages are swapped out (preemption.py)."""
        async with self.context.residency.passage(item.request):
            await dispatch.run(self.context, item, queue)

    def _release_everything(self) -> None:
        """Drop every reference the instance holds; synchronous, so it cannot be interrupted."""
        self.closed = True
        if self._expected:
            self._arrived()  # it will never forward now
        for taskless in list(self._taskless):
            taskless.cancel()
        self.context.release_all()
        self._detach(self.id)
        self._answers.answer_all({"error": CLOSED_MESSAGE})


class _TasklessRequest:
    """A request running with no task of its own (`InstanceControl._start_without_task`) and
    what it holds until it completes: its place past the residency gate and its queue."""

    def __init__(self, control: InstanceControl, item: QueuedRequest, queue: Queue | None):
        self._control = control
        self._item = item
        self._queue = queue
        self.abandon: Callable[[], None] | None = None  # set once it is started
        self.then: QueuedRequest | None = None  # the next request on its queue, chained
        self._ended = False
        control._taskless.add(self)
        if queue is not None:
            queue.hold()
            control._running_on[queue.id] = self

    def finish(self, response: Response) -> None:
        """Its answer (on the trio thread): let the queue and the gate go, start the request
        chained to it, then answer."""
        if not self._ended:
            self.end()
            then, self.then = self.then, None
            if then is not None:
                self._control._start_chained(then)
            self._item.finish(response)

    def cancel(self) -> None:
        """The instance is closing: give the call up (its answer comes from the closing)."""
        if not self._ended:
            self.end()
            if self.abandon is not None:
                self.abandon()

    def end(self) -> None:
        self._ended = True
        self._control._taskless.discard(self)
        self._control.context.residency.leave()
        if self._queue is not None:
            if self._control._running_on.get(self._queue.id) is self:
                del self._control._running_on[self._queue.id]
            self._queue.release()


def _answer(on_done: OnDone, response: Response) -> None:
    """Call the runtime's callback; a failure there is its bug, not a reason to stop serving."""
    try:
        on_done(response)
    except Exception:
        logger.exception("on_done callback failed")
