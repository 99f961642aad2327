"""One running inferlet: its trio task, its events, and the trio side of its host calls.

An `Instance` lives in one trio task in the runtime's nursery; its guest runs in a thread of
its own while it runs (a reused worker: `guest.py`). The guest thread reaches this side only
through the bridge: requests for the control layer (`handle_request`), events for the client
(`emit`) and, last of all, its end (`_guest_exited`). Everything here runs on the trio thread,
but for `answer_stateless`, which the guest thread calls directly.

Ending. However an instance ends — the guest returns or traps, its owner kills it, a limit
trips, the runtime shuts down — the same steps run, in this order: the guest thread is stopped
and joined (its store already deleted), the control layer frees everything the instance held
(`ctl.close()`), the `return` event (if the guest finished with a value) and exactly one
`terminated` event are sent, and the event channel is closed.

Events and back-pressure. The guest's requests and events reach this side in batches, with
its next crossing (see "Crossings" in abi.py). `events` is unbounded so the final events can
always be sent, but the guest cannot outrun its client: once more than
`InstanceLimits.output_backlog_bytes` of its output is unread, its next `send` or print waits until
the client has caught up by half. A client that closes its end of `events` ends the instance with
`client_gone`.

Children. An instance may launch child instances (`children.py`); it alone addresses them, and
they end with it: whenever the instance ends, its children are killed (`parent_gone`) and have
ended before its own `terminated` event is sent.
"""

from __future__ import annotations

import logging
import math
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import trio

import pie_trio
from pie_trio.control.interface import AttachedInstance
from pie_trio.runtime.abi import EVENT_OVERHEAD, HostCalls
from pie_trio.runtime.bridge import Bridge, Mailbox
from pie_trio.runtime.children import CHILD_OPS, Children, Launch
from pie_trio.runtime.guest import GuestThread, GuestThreads
from pie_trio.runtime.programs import Program
from pie_trio.runtime.sandbox import Guard, InstanceLimits, Termination, limit_hit

log = logging.getLogger(__name__)

KILL_REASONS = ("killed", "evicted", "client_gone", "parent_gone")
BACKLOG_POLL = 0.005  # seconds between checks of how far a congested client has read
CONTROL_CLOSE_TIMEOUT = 10.0  # seconds the control layer gets to release an ended instance


class InstanceGone(RuntimeError):
    """The instance has already ended."""


class InboxFull(RuntimeError):
    """The guest has not received the messages already delivered to it."""


class Instance:
    """A running inferlet, as its owner sees it: `id`, `owner`, `events`, `deliver`, `kill`."""

    def __init__(self, *, instance_id: str, owner: str, program: Program, program_name: str,
                 args: Sequence[str], limits: InstanceLimits, ctl: AttachedInstance,
                 models: Sequence[str], on_end: Callable[[Instance], None],
                 threads: GuestThreads, mailbox: Mailbox, launch: Launch | None = None):
        self.id = instance_id
        self.owner = owner
        self.program = program.hash
        self.args = list(args)
        self.limits = limits
        self.termination: Termination | None = None  # set once the instance has ended
        self.return_value: str | None = None
        self.ended = trio.Event()
        self.consumed_bytes = 0  # output the client has read (see abi.Host)
        self._events_out, self.events = trio.open_memory_channel[dict[str, Any]](math.inf)
        self._ctl = ctl
        self._on_end = on_end
        self._threads = threads
        self._exited = trio.Event()
        self._started = trio.Event()  # its task runs and has handed its guest to a thread
        self._started_at = trio.current_time()
        self._nursery: trio.Nursery | None = None
        self._inbox: deque[str] = deque()
        self._inbox_bytes = 0  # their size (EVENT_OVERHEAD each, so empty ones count)
        self._receivers: deque[int] = deque()  # handles of `receive` requests waiting
        self._unread: deque[int] = deque()  # sizes of emitted events the client has not read
        self._watching_backlog = False
        self.children = Children(launch, limits.max_children)
        self.guard = Guard(limits, program.engine)
        self.bridge = Bridge(mailbox, self.guard)
        answers = {"version": pie_trio.__version__, "instance_id": instance_id,
                   "args": list(args), "models": list(models)}
        # The guest side refers back to this object weakly: with no reference cycles an ended
        # instance is freed at once, instead of feeding the cyclic GC, whose full passes over a
        # process holding a model stall every instance for hundreds of milliseconds.
        me = weakref.proxy(self)
        self.calls = HostCalls(me, self.bridge, self.guard, limits, answers)
        self.guest = GuestThread(program, [program_name, *args], self.calls, self.guard,
                                 self.bridge, limits, lambda *end: me._guest_exited(*end),
                                 name=f"inferlet-{instance_id[:12]}")
        self._thread_started = False

    # -- the owner's interface ------------------------------------------------------------

    def kill(self, reason: str = "killed", detail: str = "") -> None:
        """Stop the instance (it ends with `reason`); returns at once. No-op once it has ended."""
        if reason not in KILL_REASONS:
            raise ValueError(f"kill reason must be one of {KILL_REASONS}, got {reason!r}")
        if self._exited.is_set():
            return
        default = {"killed": "killed by its owner", "evicted": "evicted by the server",
                   "client_gone": "the client went away",
                   "parent_gone": "its parent ended"}[reason]
        if self.guard.request_stop(Termination(reason, detail or default)):
            self.bridge.interrupt()

    def deliver(self, message: str) -> None:
        """Hand a client message to the guest's next (or pending) `receive`.

        Raises InboxFull past `max_inbox` messages or `max_inbox_bytes` not yet received: the
        client is told to slow down, and the host never holds more for the guest."""
        if not isinstance(message, str):
            raise TypeError("a message to an instance must be a string")
        if self._exited.is_set() or self.guard.stopping:
            raise InstanceGone(f"instance {self.id} has ended")
        if self._receivers:
            self._complete(self._receivers.popleft(), {"ok": message})
            return
        size = len(message) + EVENT_OVERHEAD
        if len(self._inbox) >= self.limits.max_inbox:
            raise InboxFull(f"instance {self.id} has {len(self._inbox)} messages it has not "
                            "received yet")
        if self._inbox_bytes + size > self.limits.max_inbox_bytes:
            raise InboxFull(f"instance {self.id} has {self._inbox_bytes} bytes of messages it "
                            f"has not received yet (limit {self.limits.max_inbox_bytes})")
        self._inbox.append(message)
        self._inbox_bytes += size

    @property
    def running(self) -> bool:
        return not self.ended.is_set()

    # -- the instance's task --------------------------------------------------------------

    async def run(self) -> None:
        """The instance's life, from starting its guest to its `terminated` event."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery  # before the guest starts: its requests may need it
                self._start_guest()
                self._started.set()
                await self._wait_for_exit()
                # Before the nursery goes: the children's pumps stop with it, and the first
                # stop request wins, so the children end as `parent_gone`.
                self.children.kill_all()
                if nursery.child_tasks:  # a backlog watcher may still be polling
                    nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await self._finish()

    async def wait_started(self) -> None:
        """Until the instance's task runs and has handed its guest to a thread."""
        await self._started.wait()

    def _start_guest(self) -> None:
        if self.guard.termination is not None:  # killed before its task ran: never started
            self._guest_exited(self.guard.termination, None)
            return
        self._threads.start(self.guest)  # it reports its end even if it cannot start
        self._thread_started = True

    async def _wait_for_exit(self) -> None:
        wall_time = self.limits.wall_time
        if wall_time is None:
            await self._exited.wait()
            return
        with trio.move_on_at(self._started_at + wall_time):
            await self._exited.wait()
            return
        if self.guard.request_stop(limit_hit(
                "wall_time", f"the instance ran longer than {wall_time:g} s")):
            self.bridge.interrupt()
        await self._exited.wait()

    async def _finish(self) -> None:
        if self._thread_started:
            if not self._exited.is_set():  # cancelled: the runtime is shutting down
                self.kill("evicted", "the runtime is shutting down")
                await self._exited.wait()
            # The guest posted its exit as its thread's last act: this join returns at once.
            self.guest.join()
        self.children.kill_all()  # (again: the runtime may be shutting down)
        if len(self.children):
            with trio.move_on_after(CONTROL_CLOSE_TIMEOUT):
                await self.children.wait_ended()
        # Bounded: this runs shielded, and a control layer stopped before the runtime (a wrong
        # shutdown order) must not hang the instance forever.
        with trio.move_on_after(CONTROL_CLOSE_TIMEOUT) as scope:
            try:
                await self._ctl.close()
            except Exception:
                log.exception("closing instance %s in the control layer failed", self.id)
        if scope.cancelled_caught:
            log.error("the control layer did not release instance %s within %s s", self.id,
                      CONTROL_CLOSE_TIMEOUT)
        termination = self.termination or Termination("trap", "the guest did not start")
        self.termination = termination
        if termination.reason == "finished" and self.return_value is not None:
            self._send_final({"event": "return", "value": self.return_value})
        self._send_final(termination.as_event())
        self._events_out.close()
        self.ended.set()
        self._on_end(self)

    def _send_final(self, event: dict[str, Any]) -> None:
        try:
            self._events_out.send_nowait(event)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # nobody is listening any more

    # -- called by the guest thread through the bridge ------------------------------------

    def handle_request(self, handle: int, request: dict[str, Any]) -> None:
        """A request the control layer (or `receive`, or a child op) answers; the answer lands
        in `ready`."""
        if request.get("op") in CHILD_OPS:
            assert self._nursery is not None  # the guest runs only inside `run`
            self.children.handle(self._nursery, request,
                                 lambda response: self._complete(handle, response))
            return
        if request.get("op") == "receive":
            if self._inbox:
                message = self._inbox.popleft()
                self._inbox_bytes -= len(message) + EVENT_OVERHEAD
                self._complete(handle, {"ok": message})
            else:
                self._receivers.append(handle)
            return
        try:
            self._ctl.start_request(request, lambda response: self._complete(handle, response))
        except Exception as exc:  # the control layer answers errors; this is a last resort
            log.exception("control layer refused a request")
            self._complete(handle, {"error": f"{request.get('op')}: {exc}"})

    def answer_stateless(self, request: dict[str, Any]) -> dict[str, Any] | None:
        """Guest thread: the control layer's answer to a stateless op (`ping`, `clock`,
        `model_info`), computed on that thread; None for any other request."""
        return self._ctl.answer_stateless(request)

    def emit(self, event: dict[str, Any], nbytes: int) -> None:
        """An event from the guest (message, stdout, stderr) for the client, and its size."""
        try:
            self._events_out.send_nowait(event)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.kill("client_gone", "the client stopped reading the instance's events")
            return
        self._unread.append(nbytes)
        self._count_consumed()
        # Watch from the point the guest would resume at, not the point it stops at: the guest
        # decides to wait on counts that may be older than this one, and only the watcher
        # notices the client reading on, so it must run whenever the guest might be waiting.
        if not self.calls.output_drained() and not self._watching_backlog:
            assert self._nursery is not None
            self._nursery.start_soon(self._watch_backlog)

    def _guest_exited(self, termination: Termination, return_value: str | None) -> None:
        self.termination = termination
        self.return_value = return_value
        self._exited.set()

    # -- helpers --------------------------------------------------------------------------

    def _complete(self, handle: int, response: dict[str, Any]) -> None:
        if self._exited.is_set():
            return  # e.g. the control layer answering "instance closed" during close()
        over = self.calls.file_response(handle, response)
        if over is not None and self.guard.request_stop(over):
            self.bridge.interrupt()
            return
        self.bridge.notify()

    def _count_consumed(self) -> None:
        """Move the sizes of events the client has received from `_unread` to `consumed_bytes`."""
        buffered = self._events_out.statistics().current_buffer_used
        while len(self._unread) > buffered:
            self.consumed_bytes += self._unread.popleft()

    async def _watch_backlog(self) -> None:
        """While the client lags, poll how far it has read and release the guest when it can."""
        self._watching_backlog = True
        try:
            while not self.calls.output_drained():
                await trio.sleep(BACKLOG_POLL)
                self._count_consumed()
                if self._events_out.statistics().open_receive_channels == 0:
                    self.kill("client_gone", "the client stopped reading the instance's events")
                self.bridge.notify()
        finally:
            self._watching_backlog = False
