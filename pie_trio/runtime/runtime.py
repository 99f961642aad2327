"""`Runtime`: launches inferlets and owns their tasks (the interface in docs/layers.md).

    runtime = Runtime(controller, ProgramStore(), InstanceLimits())
    await nursery.start(runtime.run)
    instance = await runtime.launch("text-completion", ["--prompt", "Hi"], owner="alice")
    async for event in instance.events: ...

`run` holds the nursery every instance task lives in and the epoch ticker that enforces CPU
budgets. Cancelling it stops every instance (reason `evicted`), waits for their guest threads to
exit and frees what they held, before it returns. `pie_trio/stack.py` builds the runtime on its
controller and stops it before the layers below.

Instances launch instances too (the `launch` op, children.py): a child is launched here like
any other instance, under its parent's owner and limits, and counts against `max_instances`
and `max_instances_per_owner` like any other.
"""

from __future__ import annotations

import functools
import uuid
from collections import Counter
from collections.abc import Sequence
from typing import Any

import trio

from pie_trio.control.interface import ControlService
from pie_trio.runtime.bridge import Mailbox
from pie_trio.runtime.children import LaunchRefused
from pie_trio.runtime.guest import GuestThreads
from pie_trio.runtime.instance import Instance
from pie_trio.runtime.programs import ProgramError, ProgramStore, UnknownProgram
from pie_trio.runtime.sandbox import InstanceLimits, tick_epochs

LOADING_THREADS = 8  # programs loaded (or built-ins compiled) for launches at once


class CapacityError(RuntimeError):
    """The runtime already runs its maximum number of instances (in all, or of one owner)."""


class Runtime:
    def __init__(self, controller: ControlService, program_store: ProgramStore | None = None,
                 limits: InstanceLimits | None = None, *, max_instances: int = 4096,
                 max_instances_per_owner: int | None = None):
        self.controller = controller
        self.programs = program_store if program_store is not None else ProgramStore()
        self.limits = limits or InstanceLimits()
        self.models = list(controller.model_names)  # what the guest's `models` op answers
        self.max_instances = max_instances
        self.max_instances_per_owner = max_instances_per_owner  # None: no cap per owner
        self._launching: Counter[str] = Counter()  # launches in progress, by owner
        self._running: Counter[str] = Counter()  # instances in `instances`, by owner
        self.instances: dict[str, Instance] = {}
        self.launched = 0
        self.ended: Counter[str] = Counter()  # terminations by reason
        self._nursery: trio.Nursery | None = None
        self._threads: GuestThreads | None = None
        self._mailbox: Mailbox | None = None
        self._loading = trio.CapacityLimiter(LOADING_THREADS)

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        # The threads outlive every instance task: a guest queued for a thread still gets one
        # (and is stopped at once) when the runtime shuts down.
        with GuestThreads() as threads:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(tick_epochs, self.programs.engine)
                try:
                    async with trio.open_nursery() as instances:
                        self._mailbox = Mailbox(trio.lowlevel.current_trio_token())
                        self._nursery, self._threads = instances, threads
                        task_status.started()
                        await trio.sleep_forever()
                finally:
                    self._nursery = self._threads = None
                    nursery.cancel_scope.cancel()

    async def launch(self, program: str, args: Sequence[str] = (), owner: str = "",
                     limits: InstanceLimits | None = None) -> Instance:
        """Start `program` (a hash or built-in name) with `args`; the running Instance.

        Raises UnknownProgram, ProgramError (a built-in that does not compile), CapacityError,
        or RuntimeError when the runtime is not running.
        """
        if self._nursery is None or self._threads is None:
            raise RuntimeError("the runtime is not running: start Runtime.run first")
        if len(self.instances) >= self.max_instances:
            raise CapacityError(f"the runtime already runs {len(self.instances)} instances, "
                                "its maximum")
        self._check_owner_cap(owner)
        self._launching[owner] += 1  # counted while it loads: concurrent launches cannot pass
        try:
            return await self._start(program, [str(arg) for arg in args], owner, limits)
        finally:
            self._launching[owner] -= 1
            if not self._launching[owner]:
                del self._launching[owner]

    async def _start(self, program: str, args: list[str], owner: str,
                     limits: InstanceLimits | None) -> Instance:
        compiled = self.programs.loaded(program)
        if compiled is None:  # compiling (a built-in's first use) or loading: off the trio thread
            # (its own limiter: uploads compiling in trio's default one never delay launches)
            compiled = await trio.to_thread.run_sync(self.programs.get, program,
                                                     limiter=self._loading)
        if self._nursery is None or self._threads is None or self._mailbox is None:
            raise RuntimeError("the runtime stopped")
        instance_id = uuid.uuid4().hex
        limits = limits or self.limits
        # The child launcher holds the owner and limits, never the instance: no reference cycle.
        launch_child = functools.partial(self._launch_child, owner, limits)
        instance = Instance(
            instance_id=instance_id, owner=owner, program=compiled, program_name=program,
            args=args, limits=limits, ctl=self.controller.attach(instance_id),
            models=self.models, on_end=self._forget, threads=self._threads,
            mailbox=self._mailbox, launch=launch_child)
        self.instances[instance_id] = instance
        self._running[owner] += 1
        self.programs.hold(compiled.hash)  # not evicted while it runs; released by _forget
        self.launched += 1
        # `nursery.start` would cost more than the rest of the launch; a task and an event
        # give the same promise: the instance's task runs when its launch returns.
        self._nursery.start_soon(instance.run)
        try:
            await instance.wait_started()
        except BaseException:  # nobody will hear of the instance: it must not run on unseen
            instance.kill("client_gone", "its launch was cancelled")
            raise
        return instance

    async def _launch_child(self, owner: str, limits: InstanceLimits, program: str,
                            args: list[str]) -> Instance:
        """An instance's `launch`: the same launch as a client's, under the parent's owner and
        limits; every refusal is the guest's answer (LaunchRefused)."""
        try:
            return await self.launch(program, args, owner, limits)
        # (RuntimeError: a cap reached, CapacityError, or the runtime is not running any more)
        except (UnknownProgram, ProgramError, RuntimeError) as exc:
            raise LaunchRefused(str(exc)) from None

    def _check_owner_cap(self, owner: str) -> None:
        cap = self.max_instances_per_owner
        if cap is None:
            return
        mine = self._running[owner] + self._launching[owner]
        if mine >= cap:
            raise CapacityError(f"owner {owner!r} already runs {mine} instances, its maximum")

    def get(self, instance_id: str) -> Instance | None:
        return self.instances.get(instance_id)

    def stats(self) -> dict[str, Any]:
        """Live instances, guest threads still alive, launches and terminations by reason."""
        return {
            "instances": len(self.instances),
            "guest_threads": sum(i.guest.alive for i in self.instances.values()),
            "launched": self.launched,
            "ended": dict(self.ended),
        }

    def _forget(self, instance: Instance) -> None:
        if self.instances.pop(instance.id, None) is not None:
            self.programs.release(instance.program)
            self._running[instance.owner] -= 1
            if not self._running[instance.owner]:
                del self._running[instance.owner]
        assert instance.termination is not None
        self.ended[instance.termination.reason] += 1
