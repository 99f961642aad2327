"""Shared helpers for the runtime tests: the real stack (executor, controller, runtime) on a
given model runner, the hand-written WAT guests of tests/guests compiled once per session, and
a way to run an instance to its end while collecting its events."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import trio
import wasmtime

from pie_trio.control.controller import Controller
from pie_trio.executor.executor import Executor
from pie_trio.runtime.instance import Instance
from pie_trio.runtime.programs import ProgramStore
from pie_trio.runtime.runtime import Runtime
from pie_trio.runtime.sandbox import InstanceLimits
from pie_trio.stack import open_stack

GUESTS = Path(__file__).resolve().parent / "guests"


@lru_cache(maxsize=1)
def guest_programs() -> tuple[ProgramStore, dict[str, str]]:
    """A memory-only store with every tests/guests/*.wat compiled; name -> hash."""
    store = ProgramStore(memory_only=True)
    hashes = {path.stem: store.add(wasmtime.wat2wasm(path.read_text()))
              for path in sorted(GUESTS.glob("*.wat"))}
    return store, hashes


@dataclass
class Stack:
    executor: Executor
    controller: Controller
    runtime: Runtime
    guests: dict[str, str]  # WAT guest name -> program hash

    async def launch(self, guest: str, *args: Any, owner: str = "test", **kwargs) -> Instance:
        program = self.guests.get(guest, guest)
        return await self.runtime.launch(program, [str(a) for a in args], owner, **kwargs)


@asynccontextmanager
async def running_stack(runner: Any, limits: InstanceLimits | None = None,
                        programs: ProgramStore | None = None,
                        **options: Any) -> AsyncIterator[Stack]:
    """The server's stack (`open_stack`) with the WAT guests in its program store; `options`
    are open_stack's."""
    store, hashes = guest_programs()
    async with open_stack(runner, programs=programs or store, instance_limits=limits,
                          **options) as stack:
        yield Stack(stack.executor, stack.controller, stack.runtime, hashes)


@dataclass
class Outcome:
    events: list[dict[str, Any]] = field(default_factory=list)

    @property
    def terminated(self) -> dict[str, Any]:
        assert self.events and self.events[-1]["event"] == "terminated", self.events[-3:]
        return self.events[-1]

    @property
    def reason(self) -> str:
        return self.terminated["reason"]

    @property
    def limit(self) -> str | None:
        return self.terminated.get("limit")

    @property
    def detail(self) -> str:
        return self.terminated["detail"]

    def text(self, kind: str) -> str:
        key = "message" if kind == "message" else "data"
        return "".join(e[key] for e in self.events if e["event"] == kind)

    @property
    def return_value(self) -> str | None:
        values = [e["value"] for e in self.events if e["event"] == "return"]
        return values[-1] if values else None


async def finish(instance: Instance) -> Outcome:
    """Read every event until the channel closes; exactly one `terminated`, and it is last."""
    outcome = Outcome()
    with trio.fail_after(120):  # a hang is a failure, not a stuck CI job
        async for event in instance.events:
            outcome.events.append(event)
    kinds = [e["event"] for e in outcome.events]
    assert kinds.count("terminated") == 1 and kinds[-1] == "terminated", kinds
    assert instance.ended.is_set()
    return outcome


def live_trio_tasks() -> int:
    """Every task in the current trio run (to prove none leaked)."""
    count = 0
    stack = [trio.lowlevel.current_root_task()]
    while stack:
        task = stack.pop()
        count += 1
        for nursery in task.child_nurseries:
            stack.extend(nursery.child_tasks)
    return count


def thread_count() -> int:
    return threading.active_count()
