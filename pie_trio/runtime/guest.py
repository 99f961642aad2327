"""The guest thread: one per running instance, owning its wasmtime Store from birth to death.

A Store must only be touched by the thread running it, so this thread creates it, runs the
program's `_start` to completion (a component's `run`: component.py), reads how it ended,
deletes the store and, as its very last act, tells the trio thread it is done (through the
bridge, behind every request it posted).

The threads themselves are `GuestThreads`' workers, reused from one guest to the next: an
instance that ends quickly (a one-shot tool, a child) would otherwise cost more in starting and
ending an OS thread than in running its program.
"""

from __future__ import annotations

import ctypes
import logging
import queue
import threading
from collections import deque
from collections.abc import Callable, Sequence

import wasmtime
from wasmtime import _ffi as ffi
from wasmtime._extern import wrap_extern
from wasmtime._func import enter_wasm

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
# Seconds an idle worker thread waits for its next guest before it exits: long enough to carry
# a burst of launches, short enough that an idle server holds no threads for long.
IDLE_WORKER_SECONDS = 2.0
IDLE_NAME = "inferlet-idle"  # a worker's thread name between guests (it takes each guest's)


class GuestThread:
    """One guest's run, from store creation to its posted end, on a `GuestThreads` worker."""

    def __init__(self, program: Program, argv: Sequence[str], calls: HostCalls, guard: Guard,
                 bridge: Bridge, limits: InstanceLimits, on_exit: OnExit, name: str):
        self.program = program
        self.argv = list(argv)
        self.calls = calls
        self.guard = guard
        self.bridge = bridge
        self.limits = limits
        self.on_exit = on_exit
        self.name = name
        self.alive = False  # its worker is running it now
        self._started = False
        self._done = threading.Lock()
        self._done.acquire()  # released once the guest will never touch the instance again

    @property
    def finished(self) -> bool:
        """Its run is over: it started, and will never touch the instance again."""
        return self._started and not self.alive

    def join(self) -> None:
        """Wait until the guest's run is over: at once once its end has been reported, which
        is the run's very last act."""
        if self._started:  # it may never have started
            with self._done:
                pass

    def run(self) -> None:
        """Run the guest to its end; called by the worker thread that owns it meanwhile."""
        self._started = self.alive = True
        threading.current_thread().name = self.name
        self._main()

    def not_started(self, exc: BaseException) -> None:
        """No thread could be found for the guest: it ends at once."""
        termination = Termination("evicted", f"no thread could be started for it: {exc}")
        self.bridge.post(self.on_exit, termination, None)

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
            try:
                self.calls.flush_output()
                self.calls.unbind()
                if store is not None:
                    store.close()
                self.guard.uninstall()
            finally:
                self._report(termination)

    def _report(self, termination: Termination) -> None:
        return_value = self.calls.return_value
        self.alive = False
        # Released before the report, not after: the trio thread joins once it has the report,
        # and must not wait (GIL and all) for this thread to be scheduled again.
        self._done.release()
        self.bridge.post(self.on_exit, termination, return_value)

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
            exported = _export(store, instance, b"memory")
            start = _export(store, instance, b"_start")
            # The program store checked both exports' kinds before it accepted the program.
            assert isinstance(exported, wasmtime.Memory) and isinstance(start, wasmtime.Func)
            memory = exported
            self.calls.bind(store, memory)
            _call_start(store, start)
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


# The next two go through wasmtime-py's internals (its C bindings, as sandbox.py does, and its
# wrappers' handles): `instance.exports(store)` wraps every export and `Func.__call__` asks for
# the function's type at each call, which for a guest that exits at once costs more GIL time
# than running it.


def _export(store: wasmtime.Store, instance: wasmtime.Instance, name: bytes) -> object:
    """One export of `instance`, by name (None if it has none)."""
    item = ffi.wasmtime_extern_t()
    if not ffi.wasmtime_instance_export_get(store._context(), ctypes.byref(instance._instance),
                                            name, len(name), ctypes.byref(item)):
        return None
    return wrap_extern(item)


def _call_start(store: wasmtime.Store, start: wasmtime.Func) -> None:
    """Call `_start` (no parameters, no results; the program store checked its type) as
    `Func.__call__` does, trap and exit handling included."""
    with enter_wasm(store) as trap:
        error = ffi.wasmtime_func_call(store._context(), ctypes.byref(start._func), None, 0,
                                       None, 0, trap)
        if error:
            raise wasmtime.WasmtimeError._from_ptr(error)


class GuestThreads:
    """The threads guests run in: each worker runs one guest at a time and waits for the next.

    A launch hands its guest to an idle worker (the most recently idle: its stack and wasmtime's
    per-thread state are warm) or, when none is idle, to the spawner thread, which starts a new
    worker for it unless one has come free meanwhile; and a worker coming free takes a guest
    still waiting for the spawner before it goes idle, so a burst of short-lived guests runs on
    the threads of those that ended instead of a new one each. `Thread.start()` waits until the new
    thread runs and hands the GIL back, which takes about a millisecond (more under load): done
    on the trio thread, a burst of launches would stall every other instance's host calls for
    that long each. Workers idle for IDLE_WORKER_SECONDS exit; leaving the context stops and
    joins every worker.

    The trio thread never takes a lock here: a lock held by a worker that has lost the GIL
    would stall it until that worker is scheduled again. The idle workers are a deque, whose
    append, pop and remove are atomic, and whichever side takes a worker off it owns the next
    step (a launch hands it a guest, a retiring worker exits).
    """

    def __init__(self) -> None:
        self._idle: deque[_Worker] = deque()
        self._workers: set[threading.Thread] = set()  # alive, idle ones included
        self._closed = False
        self._spawns: queue.SimpleQueue[GuestThread | None] = queue.SimpleQueue()
        self._spawner = threading.Thread(target=self._spawn_loop, name="inferlet-starter",
                                         daemon=True)

    def __enter__(self) -> GuestThreads:
        self._spawner.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._spawns.put(None)
        self._spawner.join()  # it is idle or finishing its last start: this returns quickly
        self._closed = True
        while self._idle:
            self._idle.pop().jobs.put(None)
        for thread in list(self._workers):  # every guest has ended: they are idle or about to be
            thread.join()

    def start(self, guest: GuestThread) -> None:
        """Have `guest` run on a worker thread soon; returns at once."""
        try:
            worker = self._idle.pop()
        except IndexError:
            self._spawns.put(guest)
        else:
            worker.jobs.put(guest)

    def _spawn_loop(self) -> None:
        # One call per guest: while this thread waits, it holds nothing of the last one (its
        # program, say, which must be free to go when evicted).
        while self._spawn_next():
            pass

    def _spawn_next(self) -> bool:
        guest = self._spawns.get()
        if guest is None:
            return False
        try:
            self._idle.pop().jobs.put(guest)  # a worker came free while the guest waited
            return True
        except IndexError:
            pass
        worker = _Worker(self, guest)
        self._workers.add(worker.thread)
        try:
            worker.thread.start()
        except BaseException as exc:  # noqa: BLE001 - e.g. "can't start new thread"
            self._workers.discard(worker.thread)
            guest.not_started(exc)
        return True

    def _next_guest(self, worker: _Worker) -> GuestThread | None:
        """The worker's next guest: one waiting for a thread, else the next launch handed to it
        while it waits idle; None when it should exit."""
        waiting = self._waiting_guest()
        if waiting is not None:
            return waiting
        self._idle.append(worker)
        if self._closed and self._leave_idle(worker):  # closed meanwhile, and nobody took it
            return None
        try:
            return worker.jobs.get(timeout=IDLE_WORKER_SECONDS)
        except queue.Empty:
            pass
        if self._leave_idle(worker):
            return None
        return worker.jobs.get()  # taken off the idle deque just now: its guest is on the way

    def _waiting_guest(self) -> GuestThread | None:
        """A guest the spawner has not reached yet, taken off its queue (None if there is none).

        A burst of short-lived guests would otherwise get a new thread each while those started
        a moment earlier end: every thread added is one more contending for the GIL."""
        try:
            guest = self._spawns.get_nowait()
        except queue.Empty:
            return None
        if guest is None:  # the spawner's signal to stop: it is for the spawner
            self._spawns.put(None)
        return guest

    def _leave_idle(self, worker: _Worker) -> bool:
        """Take `worker` off the idle deque; False if someone else already did."""
        try:
            self._idle.remove(worker)
        except ValueError:
            return False
        return True

    def _exited(self, worker: _Worker) -> None:
        self._workers.discard(worker.thread)


class _Worker:
    """One reusable guest thread: runs its first guest, then whatever `GuestThreads` hands it."""

    def __init__(self, pool: GuestThreads, first: GuestThread):
        self.jobs: queue.SimpleQueue[GuestThread | None] = queue.SimpleQueue()
        self._pool = pool
        self._first: GuestThread | None = first
        # Daemon: a guest thread must never keep the interpreter alive, even after a bug.
        self.thread = threading.Thread(target=self._loop, name=IDLE_NAME, daemon=True)

    def _loop(self) -> None:
        guest, self._first = self._first, None
        try:
            while guest is not None:
                guest.run()
                guest = None  # an idle worker holds nothing of the instance it ran
                self.thread.name = IDLE_NAME
                guest = self._pool._next_guest(self)
        finally:
            self._pool._exited(self)
