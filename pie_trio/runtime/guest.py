"""The guest thread: one per instance, owning the instance's wasmtime Store from birth to death.

A Store must only be touched by the thread running it, so this thread creates it, runs the
program's `_start` to completion (a component's `run`: component.py), reads how it ended,
deletes the store and, as its very last act, tells the trio thread it is done (through the
bridge, behind every request it posted).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Sequence

import wasmtime

from pie_trio.runtime.abi import HostCalls
from pie_trio.runtime.bridge import Bridge
from pie_trio.runtime.component import run_component
from pie_trio.runtime.programs import Program
from pie_trio.runtime.sandbox import Guard, InstanceLimits, MiB, Termination, limit_hit

log = logging.getLogger(__name__)

OnExit = Callable[[Termination, "str | None"], None]
# A component is several core instances (CPython, its libc, the WASI adapter and shims), each
# with its tables and memories; a core module is one instance with one memory.
COMPONENT_INSTANCES, COMPONENT_TABLES, COMPONENT_MEMORIES = 64, 64, 16


class GuestThread:
    def __init__(self, program: Program, argv: Sequence[str], calls: HostCalls, guard: Guard,
                 bridge: Bridge, limits: InstanceLimits, on_exit: OnExit, name: str):
        self.program = program
        self.argv = list(argv)
        self.calls = calls
        self.guard = guard
        self.bridge = bridge
        self.limits = limits
        self.on_exit = on_exit
        # Daemon: a guest thread must never keep the interpreter alive, even after a bug.
        self.thread = threading.Thread(target=self._main, name=name, daemon=True)

    def start(self) -> None:
        """Start the thread (this waits until it runs: see `ThreadStarter`)."""
        try:
            self.thread.start()
        except BaseException as exc:  # noqa: BLE001 - e.g. "can't start new thread"
            termination = Termination("evicted", f"no thread could be started for it: {exc}")
            self.bridge.post(self.on_exit, termination, None)

    def join(self) -> None:
        if self.thread.ident is not None:  # it may never have started
            self.thread.join()

    def _main(self) -> None:
        termination = Termination("trap", "the guest did not start")
        store: wasmtime.Store | None = None
        try:
            self.calls.attach()  # before instantiation: a start function's host call must trap
            store = self._new_store()
            termination = self._run(store)
        except BaseException as exc:  # noqa: BLE001 - the thread must always report its end
            log.exception("guest thread failed")
            termination = self.guard.termination or Termination("trap", f"host error: {exc!r}")
        finally:
            self.calls.flush_output()
            self.calls.unbind()
            if store is not None:
                store.close()
            self.bridge.post(self.on_exit, termination, self.calls.return_value)

    def _new_store(self) -> wasmtime.Store:
        store = wasmtime.Store(self.program.engine)
        if self.program.component is None:
            counts = {"instances": 1, "tables": 4, "memories": 1}
        else:
            counts = {"instances": COMPONENT_INSTANCES, "tables": COMPONENT_TABLES,
                      "memories": COMPONENT_MEMORIES}
        store.set_limits(memory_size=self.limits.memory_bytes,
                         table_elements=self.limits.table_elements, **counts)
        wasi = wasmtime.WasiConfig()
        wasi.argv = self.argv
        wasi.stdout_custom = lambda data: self.calls.output("stdout", data)
        wasi.stderr_custom = lambda data: self.calls.output("stderr", data)
        store.set_wasi(wasi)
        self.guard.install(store)
        return store

    def _run(self, store: wasmtime.Store) -> Termination:
        if self.program.component is not None:
            return self._run_component(store)
        memory: wasmtime.Memory | None = None
        try:
            assert self.program.pre is not None  # a core module's
            instance = self.program.pre.instantiate(store)
            exports = instance.exports(store)
            exported, start = exports["memory"], exports["_start"]
            # The program store checked both exports' kinds before it accepted the program.
            assert isinstance(exported, wasmtime.Memory) and isinstance(start, wasmtime.Func)
            memory = exported
            self.calls.bind(store, memory)
            start(store)
        except wasmtime.ExitTrap as exc:
            if exc.code == 0:
                return Termination("finished")
            return Termination("error", f"the program exited with code {exc.code}")
        except (wasmtime.Trap, wasmtime.WasmtimeError) as exc:
            if self.guard.termination is not None:
                return self.guard.termination
            if memory is None:
                return self._instantiation_failed(exc)
            return Termination("trap", self._describe_trap(exc, store, memory))
        return Termination("finished")

    def _run_component(self, store: wasmtime.Store) -> Termination:
        program = self.program
        assert program.component is not None and program.component_linker is not None
        try:
            return run_component(program.component, program.component_linker, store,
                                 self.calls)
        except wasmtime.ExitTrap as exc:  # `sys.exit(n)` in the guest
            if exc.code == 0:
                return Termination("finished")
            return Termination("error", f"the program exited with code {exc.code}")
        except (wasmtime.Trap, wasmtime.WasmtimeError) as exc:
            if self.guard.termination is not None:
                return self.guard.termination
            if not self.calls.bound:
                return self._instantiation_failed(exc)
            return Termination("trap", self._describe_component_trap(exc))

    def _describe_component_trap(self, exc: Exception) -> str:
        text = str(exc).strip()
        backtrace, _, cause = text.partition("Caused by:")
        detail = f"{cause.strip()}\n{backtrace.strip()}" if cause else text
        if "unreachable" in detail:
            # CPython aborts (`unreachable`) when malloc fails under the memory limit.
            detail += (f"\n(an allocation may have failed: the memory limit is "
                       f"{self.limits.memory_bytes / MiB:.0f} MiB)")
        return detail

    def _instantiation_failed(self, exc: Exception) -> Termination:
        message = str(exc).strip()
        if "exceeds memory limits" in message or "resource limit exceeded" in message:
            return limit_hit("memory", message)
        return Termination("trap", message)

    def _describe_trap(self, exc: Exception, store: wasmtime.Store,
                       memory: wasmtime.Memory) -> str:
        """The trap's cause first, then wasmtime's backtrace, then a hint if memory ran out."""
        text = str(exc).strip()
        backtrace, _, cause = text.partition("Caused by:")
        detail = f"{cause.strip()}\n{backtrace.strip()}" if cause else text
        used = memory.data_len(store)
        if used * 2 >= self.limits.memory_bytes:
            # memory.grow fails silently (-1) and a Rust guest then aborts: say what likely
            # happened, since the trap itself only says `unreachable`.
            detail += (f"\n(linear memory was {used / MiB:.1f} MiB of the "
                       f"{self.limits.memory_bytes / MiB:.0f} MiB limit: an allocation may "
                       "have failed)")
        return detail


class ThreadStarter:
    """Starts guest threads from a thread of its own.

    `Thread.start()` waits until the new thread runs and hands the GIL back, which takes about a
    millisecond (more under load): a burst of launches would stall the trio loop, and with it
    every other instance's host calls, for that long each.
    """

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[GuestThread | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name="inferlet-starter", daemon=True)

    def __enter__(self) -> ThreadStarter:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._queue.put(None)
        self._thread.join()  # it is idle or finishing its last start: this returns quickly

    def start(self, guest: GuestThread) -> None:
        """Have `guest`'s thread started soon; returns at once."""
        self._queue.put(guest)

    def _loop(self) -> None:
        while (guest := self._queue.get()) is not None:
            guest.start()
