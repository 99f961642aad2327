"""`open_stack`: the one place that assembles executor → controller → runtime on a model runner.

    async with open_stack(runner, programs=ProgramStore(), instance_limits=InstanceLimits())
            as stack:
        instance = await stack.runtime.launch("text-completion", ["--prompt", "Hi"], "alice")

Start-up goes bottom-up, each layer started with `nursery.start` so the one above only starts
once the one below is ready. Each layer runs in a nursery of its own, nested in the one below,
so leaving the block stops them top-down: the runtime first (its instances are evicted and
release their pages and slots through a controller and an executor that still run), then the
controller, then the executor. The server, `pie-trio run --local`, the runtime benchmark and the
tests all stand on this; what they add (front ends, a terminal, measurements) sits above it.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import trio

from pie_trio.control.controller import Controller, ControlLimits, Tenancy
from pie_trio.control.exports import ExportPolicy
from pie_trio.control.tools import ToolPolicy
from pie_trio.executor.executor import Executor
from pie_trio.executor.policies import BatchPolicy
from pie_trio.model.interface import Runner
from pie_trio.model.remote import RemoteRunner
from pie_trio.model.runner import ModelRunner
from pie_trio.model.tensor_parallel import TensorParallelRunner
from pie_trio.model.tokenizer import Tokenizer
from pie_trio.runtime.programs import ProgramLimits, ProgramStore
from pie_trio.runtime.runtime import Runtime
from pie_trio.runtime.sandbox import InstanceLimits

# What the code above the stack configures it with, so that it need not reach past the stack.
__all__ = ["SERVER_NICE", "BatchPolicy", "ControlLimits", "ExportPolicy", "InstanceLimits",
           "ProgramLimits", "ProgramStore", "ServedRunner", "Stack", "Tenancy", "ToolPolicy",
           "close_runner", "load_runner", "open_stack", "yield_cpu_to_model"]

TINY_PAGES = 256  # KV pages of the `tiny` test model unless asked otherwise


class ServedRunner(Runner, Protocol):
    """A model runner and its tokenizer: what the stack needs from the model layer (the
    executor runs the runner's batches, the controller tokenizes with its tokenizer)."""

    @property
    def tokenizer(self) -> Tokenizer: ...


@dataclass(frozen=True)
class Stack:
    """The three running layers, for the code above them."""

    executor: Executor
    controller: Controller
    runtime: Runtime


def load_runner(model: str | Path = "default", *, device: str | None = None,
                dtype: str | None = None, kv_memory: int | None = None, page_size: int = 16,
                num_pages: int | None = None, weights: str = "auto",
                model_process: bool = False, tensor_parallel: int = 1) -> ServedRunner:
    """The model the stack stands on: `ModelRunner.load`'s (see docs/model.md), or `tiny`, the
    random-weight test model, which loads in a second (for tests and smoke runs).

    `model_process`: run the model in a child process (`model/remote.py`), so that its Python
    does not hold the GIL the inferlets need; stop it with `close_runner` when done.
    `tensor_parallel` N > 1: split the model over N worker processes
    (`model/tensor_parallel.py`; processes of their own already, whatever `model_process`)."""
    if tensor_parallel > 1:
        if model == "tiny":
            return TensorParallelRunner.tiny(world=tensor_parallel, page_size=page_size,
                                             num_pages=num_pages or TINY_PAGES)
        return TensorParallelRunner.load(model, world=tensor_parallel, device=device,
                                         dtype=dtype, kv_memory=kv_memory, page_size=page_size,
                                         num_pages=num_pages, weights=weights)
    if model_process:
        if model == "tiny":
            return RemoteRunner.tiny(num_pages=num_pages or TINY_PAGES, page_size=page_size)
        return RemoteRunner.load(model, device=device, dtype=dtype, kv_memory=kv_memory,
                                 page_size=page_size, num_pages=num_pages, weights=weights)
    if model == "tiny":
        from pie_trio.model.tiny import tiny_runner  # only tests and smoke runs need it

        return tiny_runner(num_pages=num_pages or TINY_PAGES, page_size=page_size)
    return ModelRunner.load(model, device=device, dtype=dtype, kv_memory=kv_memory,
                            page_size=page_size, num_pages=num_pages, weights=weights)


SERVER_NICE = 19  # added to the server's niceness while the model runs in a process of its own


def yield_cpu_to_model(increment: int = SERVER_NICE) -> int | None:
    """Lower the CPU priority of every thread of this process by `increment` (its niceness),
    once the model runs in a process of its own: the runtime's work (the trio loop, the
    guests' threads) then takes the CPU a forward leaves idle instead of preempting the
    model's threads, whose every stall holds up the whole batch (docs/model.md, "Model in its
    own process"). Linux keeps a niceness per thread and a thread starts with its starter's,
    so every thread is lowered and later ones follow. Irreversible without privileges: never
    call it in a process that runs the model itself (the GIL would let a preempted guest
    thread stall the forward). Returns the main thread's new niceness; None, with nothing
    changed, where threads have no niceness of their own (no /proc/self/task)."""
    try:
        threads = [int(tid) for tid in os.listdir("/proc/self/task")]
    except OSError:
        return None
    for tid in threads:
        try:
            nice = os.getpriority(os.PRIO_PROCESS, tid)
            os.setpriority(os.PRIO_PROCESS, tid, min(nice + increment, 19))
        except (ProcessLookupError, PermissionError):  # it ended meanwhile / not ours to lower
            pass
    return os.getpriority(os.PRIO_PROCESS, os.getpid())


def close_runner(runner: ServedRunner) -> None:
    """Stop the runner's model processes, if it runs in any (in-process runners need nothing)."""
    if isinstance(runner, RemoteRunner | TensorParallelRunner):
        runner.close()


@asynccontextmanager
async def open_stack(runner: ServedRunner, *, programs: ProgramStore | None = None,
                     instance_limits: InstanceLimits | None = None, max_instances: int = 4096,
                     max_instances_per_owner: int | None = None,
                     policy: str | BatchPolicy = "adaptive",
                     control_limits: ControlLimits | None = None,
                     tenancy: Tenancy | None = None,
                     tools: ToolPolicy | None = None) -> AsyncIterator[Stack]:
    """Run executor, controller and runtime on `runner` for the duration of the block.

    `policy` is the executor's batch policy (a name, or a policy built with
    `executor.policies.make_policy` for other `k`/`t`). `tenancy` caps what one tenant holds in
    the control layer; the stack tells it who each instance's tenant is (the owner the runtime
    launched it for). `tools` is the policy for inferlets' outbound HTTP (default: none).
    `programs`, `instance_limits`, `max_instances` and `max_instances_per_owner` (children an
    inferlet launches count against its owner) are the runtime's.
    """
    executor = Executor(runner, policy)
    async with _running(executor.run):
        controller = Controller(executor, runner.info, runner.tokenizer, limits=control_limits,
                                tenancy=tenancy, tools=tools)
        async with _running(controller.run):
            runtime = Runtime(controller, programs, instance_limits, max_instances=max_instances,
                              max_instances_per_owner=max_instances_per_owner)
            if tenancy is not None:
                tenancy.tenant_of = _owner_lookup(runtime)
            async with _running(runtime.run):
                yield Stack(executor, controller, runtime)


@asynccontextmanager
async def _running(run: Callable[..., Awaitable[None]]) -> AsyncIterator[None]:
    """`run` (a component's `run(task_status=...)`) started in a nursery of its own and
    cancelled when the block ends; nested, components stop in the reverse of their start."""
    async with trio.open_nursery() as nursery:
        await nursery.start(run)
        yield
        nursery.cancel_scope.cancel()


def _owner_lookup(runtime: Runtime) -> Callable[[str], str]:
    """instance id → tenant: every instance is launched for its tenant, its owner."""
    def tenant_of(instance_id: str) -> str:
        instance = runtime.get(instance_id)
        return "" if instance is None else instance.owner

    return tenant_of
