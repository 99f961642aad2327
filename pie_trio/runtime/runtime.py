"""`Runtime`: launches inferlets and owns their tasks (the interface in docs/layers.md).

    runtime = Runtime(controller, ProgramStore(), InstanceLimits())
    await nursery.start(runtime.run)
    instance = await runtime.launch("text-completion", ["--prompt", "Hi"], owner="alice")
    async for event in instance.events: ...

`run` holds the nursery every instance task lives in and the epoch ticker that enforces CPU
budgets. Cancelling it stops every instance (reason `evicted`), waits for their guest threads to
exit and frees what they held, before it returns. `pie_trio/stack.py` builds the runtime on its
controller and stops it before the layers below.
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Sequence
from typing import Any

import trio

from pie_trio.control.interface import ControlService
from pie_trio.runtime.bridge import Mailbox
from pie_trio.runtime.guest import ThreadStarter
from pie_trio.runtime.instance import Instance
from pie_trio.runtime.programs import ProgramStore
from pie_trio.runtime.sandbox import InstanceLimits, tick_epochs

LOADING_THREADS = 8  # programs loaded (or built-ins compiled) for launches at once


class CapacityError(RuntimeError):
    """The runtime already runs its maximum number of instances."""


class Runtime:
    def __init__(self, controller: ControlService, program_store: ProgramStore | None = None,
                 limits: InstanceLimits | None = None, *, max_instances: int = 4096):
        self.controller = controller
        self.programs = program_store if program_store is not None else ProgramStore()
        self.limits = limits or InstanceLimits()
        self.models = list(controller.model_names)  # what the guest's `models` op answers
        self.max_instances = max_instances
        self.instances: dict[str, Instance] = {}
        self.launched = 0
        self.ended: Counter[str] = Counter()  # terminations by reason
        self._nursery: trio.Nursery | None = None
        self._starter: ThreadStarter | None = None
        self._mailbox: Mailbox | None = None
        self._loading = trio.CapacityLimiter(LOADING_THREADS)

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        # The starter outlives every instance task: a guest queued for a thread still gets one
        # (and is stopped at once) when the runtime shuts down.
        with ThreadStarter() as starter:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(tick_epochs, self.programs.engine)
                try:
                    async with trio.open_nursery() as instances:
                        self._mailbox = Mailbox(trio.lowlevel.current_trio_token())
                        self._nursery, self._starter = instances, starter
                        task_status.started()
                        await trio.sleep_forever()
                finally:
                    self._nursery = self._starter = None
                    nursery.cancel_scope.cancel()

    async def launch(self, program: str, args: Sequence[str] = (), owner: str = "",
                     limits: InstanceLimits | None = None) -> Instance:
        """Start `program` (a hash or built-in name) with `args`; the running Instance.

        Raises UnknownProgram, ProgramError (a built-in that does not compile), CapacityError,
        or RuntimeError when the runtime is not running.
        """
        if self._nursery is None or self._starter is None:
            raise RuntimeError("the runtime is not running: start Runtime.run first")
        if len(self.instances) >= self.max_instances:
            raise CapacityError(f"the runtime already runs {len(self.instances)} instances, "
                                "its maximum")
        args = [str(arg) for arg in args]
        compiled = self.programs.loaded(program)
        if compiled is None:  # compiling (a built-in's first use) or loading: off the trio thread
            # (its own limiter: uploads compiling in trio's default one never delay launches)
            compiled = await trio.to_thread.run_sync(self.programs.get, program,
                                                     limiter=self._loading)
        if self._nursery is None or self._starter is None or self._mailbox is None:
            raise RuntimeError("the runtime stopped")
        instance_id = uuid.uuid4().hex
        instance = Instance(
            instance_id=instance_id, owner=owner, program=compiled, program_name=program,
            args=args, limits=limits or self.limits, ctl=self.controller.attach(instance_id),
            models=self.models, on_end=self._forget, starter=self._starter,
            mailbox=self._mailbox)
        self.instances[instance_id] = instance
        self.programs.hold(compiled.hash)  # not evicted while it runs; released by _forget
        self.launched += 1
        try:
            await self._nursery.start(instance.run)
        except BaseException:
            if self.instances.pop(instance_id, None) is not None:
                self.programs.release(compiled.hash)
            raise
        return instance

    def get(self, instance_id: str) -> Instance | None:
        return self.instances.get(instance_id)

    def stats(self) -> dict[str, Any]:
        """Live instances, guest threads still alive, launches and terminations by reason."""
        return {
            "instances": len(self.instances),
            "guest_threads": sum(i.guest.thread.is_alive() for i in self.instances.values()),
            "launched": self.launched,
            "ended": dict(self.ended),
        }

    def _forget(self, instance: Instance) -> None:
        if self.instances.pop(instance.id, None) is not None:
            self.programs.release(instance.program)
        assert instance.termination is not None
        self.ended[instance.termination.reason] += 1
