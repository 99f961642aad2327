"""An instance's children: the inferlets it launched, and the ops that address them.

`launch {program, args}` starts a child instance through the runtime (same owner, same limits,
counted against the same caps as any launch). The parent alone can address it, by the id
`launch` answered: `send_to` delivers a message to the child's `receive`, `child_receive`
takes the next message the child `send`s (its messages go to its parent, not to a client),
`child_wait` waits for its end and `child_kill` ends it. Any other id is an error naming it.

Each child's events are read by a pump task in the parent's nursery. It hands the child's
messages over one at a time, through an unbuffered channel, so a child that talks faster than
its parent receives is held back by its own output backlog (InstanceLimits.output_backlog_bytes)
exactly as it would be by a slow client; its stdout and stderr are dropped.

Bookkeeping is bounded: a child counts against `InstanceLimits.max_children` from its launch
until the parent has waited for it (`child_wait` forgets it), so a parent cannot pile up
records of ended children either. When the parent ends, however it ends, every child still
known is killed with reason `parent_gone` and the parent waits for them to end before it
reports its own end.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import trio

from pie_trio.runtime.sandbox import Termination

log = logging.getLogger(__name__)

CHILD_OPS = frozenset({"launch", "send_to", "child_receive", "child_wait", "child_kill"})
PARENT_GONE_DETAIL = "its parent ended"

Answer = Callable[[dict[str, Any]], None]


class Child(Protocol):
    """What a parent uses of a child instance (`instance.Instance` satisfies it)."""

    @property
    def id(self) -> str: ...

    @property
    def termination(self) -> Termination | None: ...

    @property
    def return_value(self) -> str | None: ...

    @property
    def ended(self) -> trio.Event: ...

    @property
    def events(self) -> trio.MemoryReceiveChannel[dict[str, Any]]: ...

    def deliver(self, message: str) -> None: ...

    def kill(self, reason: str = "killed", detail: str = "") -> None: ...


# Starts `program` with `args` as a child; raises LaunchRefused with the reason.
Launch = Callable[[str, list[str]], Awaitable[Child]]


class LaunchRefused(Exception):
    """The runtime did not start the child: an unknown program, a cap reached, shutting down."""


class _ChildError(Exception):
    """A child op the host refuses; the guest gets `{"error": "OP: message"}`."""


class _Link:
    """One child as its parent holds it: the child, and the channel its messages come through."""

    def __init__(self, child: Child):
        self.child = child
        self.messages_in, self.messages = trio.open_memory_channel[str](0)


class Children:
    """The children of one instance; used only from the trio thread."""

    def __init__(self, launch: Launch | None, max_children: int):
        self._launch = launch
        self._max_children = max_children
        self._links: dict[str, _Link] = {}
        self._launching = 0
        self._closed = False  # the parent is ending: new children are killed at once

    def __len__(self) -> int:
        return len(self._links)

    def handle(self, nursery: trio.Nursery, request: dict[str, Any], answer: Answer) -> None:
        """Start or answer one child op (an op of CHILD_OPS); `answer` is called exactly once
        unless the parent ends first."""
        op = request["op"]
        try:
            if op == "launch":
                self._start_launch(nursery, request, answer)
            elif op == "send_to":
                self._send_to(request, answer)
            elif op == "child_receive":
                nursery.start_soon(self._receive, self._link(request), answer)
            elif op == "child_wait":
                nursery.start_soon(self._wait, self._link(request), answer)
            else:  # child_kill
                self._link(request).child.kill("killed", "killed by its parent")
                answer({"ok": None})
        except _ChildError as exc:
            answer({"error": f"{op}: {exc}"})

    def kill_all(self) -> None:
        """The parent is ending: kill every child it still has (reason `parent_gone`)."""
        self._closed = True
        for link in self._links.values():
            link.child.kill("parent_gone", PARENT_GONE_DETAIL)

    async def wait_ended(self) -> None:
        """Wait until every child killed by `kill_all` has ended, and forget them."""
        for link in list(self._links.values()):
            await link.child.ended.wait()
            self._forget(link)

    # -- the ops ----------------------------------------------------------------------------

    def _start_launch(self, nursery: trio.Nursery, request: dict[str, Any],
                      answer: Answer) -> None:
        program, args = request.get("program"), request.get("args", [])
        if not isinstance(program, str):
            raise _ChildError("'program' must be a string (a built-in name or a program hash)")
        if not isinstance(args, list) or not all(isinstance(arg, str) for arg in args):
            raise _ChildError("'args' must be a list of strings")
        if self._launch is None:
            raise _ChildError("this instance cannot launch inferlets")
        if len(self._links) + self._launching >= self._max_children:
            raise _ChildError(f"this instance already has {self._max_children} children not "
                              "yet waited for (limit max_children)")
        self._launching += 1  # counted from now: concurrent launches cannot pass the cap
        nursery.start_soon(self._launch_child, nursery, program, args, answer)

    async def _launch_child(self, nursery: trio.Nursery, program: str, args: list[str],
                            answer: Answer) -> None:
        assert self._launch is not None
        try:
            child = await self._launch(program, args)
        except LaunchRefused as exc:
            answer({"error": f"launch: {exc}"})
            return
        finally:
            self._launching -= 1
        link = _Link(child)
        self._links[child.id] = link
        if self._closed:  # the parent ended while the child was starting
            child.kill("parent_gone", PARENT_GONE_DETAIL)
        nursery.start_soon(self._pump, link)
        answer({"ok": child.id})

    def _send_to(self, request: dict[str, Any], answer: Answer) -> None:
        link = self._link(request)
        message = request.get("message")
        if not isinstance(message, str):
            raise _ChildError("'message' must be a string")
        try:
            link.child.deliver(message)
        except RuntimeError as exc:  # the child has ended, or its inbox is full
            raise _ChildError(str(exc)) from None
        answer({"ok": None})

    async def _receive(self, link: _Link, answer: Answer) -> None:
        try:
            message = await link.messages.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            answer({"ok": None})  # the child has ended and sent nothing more
            return
        answer({"ok": message})

    async def _wait(self, link: _Link, answer: Answer) -> None:
        child = link.child
        await child.ended.wait()
        self._forget(link)
        termination = child.termination
        assert termination is not None  # set before `ended`
        value = child.return_value if termination.reason == "finished" else None
        answer({"ok": {"reason": termination.reason, "detail": termination.detail,
                       "value": value}})

    # -- helpers ----------------------------------------------------------------------------

    def _link(self, request: dict[str, Any]) -> _Link:
        instance = request.get("instance")
        link = self._links.get(instance) if isinstance(instance, str) else None
        if link is None:
            raise _ChildError(f"no child instance {instance!r} of this instance (a child is "
                              "known from its launch until it has been waited for)")
        return link

    def _forget(self, link: _Link) -> None:
        if self._links.pop(link.child.id, None) is not None:
            link.messages.close()  # a pump still holding a message gives up on it

    async def _pump(self, link: _Link) -> None:
        """Hand the child's messages to `child_receive`, one at a time, until it ends."""
        try:
            async with link.messages_in:
                async for event in link.child.events:
                    if event.get("event") == "message":
                        await link.messages_in.send(event["message"])
        except trio.BrokenResourceError:
            pass  # the parent waited for the child without receiving everything it sent
