"""`run_local`: one inferlet on an in-process model, for `pie-trio run PROGRAM --local -- ARGS`.

Everything a server would run — the model and the stack on it (`pie_trio/stack.py`: executor,
controller, runtime) — starts in this trio run, the program runs once, and its events are
printed as they come:

- `message` events go to stdout exactly as sent (no newline added: a generation streams; one
  newline ends the output if the text did not);
- the guest's own stdout and stderr go to stderr, each line prefixed `[stdout] ` / `[stderr] `;
- the return value goes to stderr as `[return] ...` when the program sent no messages (a
  program that streams its answer usually returns the same text again);
- the termination reason ends the output on stderr: `[terminated: finished]`.

The exit code is 0 when the program finished, 1 when it ended any other way, 2 when the
program could not be loaded, and 130 after Ctrl-C (which kills the instance first).
"""

from __future__ import annotations

import gc
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import trio

from pie_trio.runtime.instance import Instance
from pie_trio.runtime.programs import ProgramError, UnknownProgram
from pie_trio.runtime.runtime import Runtime
from pie_trio.stack import InstanceLimits, ProgramStore, ServedRunner, load_runner, open_stack

EXIT_FINISHED, EXIT_ENDED, EXIT_BAD_PROGRAM, EXIT_INTERRUPTED = 0, 1, 2, 130


async def run_local(program: str | Path, args: Sequence[str] = (), *, model: str = "default",
                    device: str | None = None, dtype: str | None = None,
                    kv_memory: int | None = None, page_size: int = 16,
                    limits: InstanceLimits | None = None, cache_dir: str | Path | None = None,
                    runner: ServedRunner | None = None, out: TextIO | None = None,
                    err: TextIO | None = None) -> int:
    """Run `program` (a .wasm path or a built-in name) with `args`; the exit code.

    `model`, `device`, `dtype`, `kv_memory` and `page_size` are those of `ModelRunner.load`;
    an already loaded `runner` is used instead when given. Programs are cached in `cache_dir`
    (default: the user's cache directory, see ProgramStore).
    """
    out, err = out or sys.stdout, err or sys.stderr
    programs = ProgramStore(cache_dir)
    try:
        program_id = await trio.to_thread.run_sync(_load_program, programs, program)
    except (OSError, ProgramError, UnknownProgram) as exc:
        print(f"pie-trio: cannot run {program}: {exc}", file=err)
        return EXIT_BAD_PROGRAM
    if runner is None:
        runner = await trio.to_thread.run_sync(_load_model, model, device, dtype, kv_memory,
                                               page_size)
    # Everything alive now (model, tokenizer, modules) lives until exit: keep the cyclic GC's
    # full passes from walking it, each of which would otherwise stall the guest for ~0.3 s.
    gc.freeze()
    async with open_stack(runner, programs=programs, instance_limits=limits) as stack:
        return await _run_one(stack.runtime, program_id, list(args), out, err)


def _load_program(programs: ProgramStore, program: str | Path) -> str:
    """A built-in's name as is; otherwise the file's bytes, compiled (cached by hash)."""
    if isinstance(program, str) and programs.has(program):
        programs.get(program)
        return program
    return programs.add(Path(program).read_bytes())


def _load_model(model: str, device: str | None, dtype: str | None, kv_memory: int | None,
                page_size: int) -> ServedRunner:
    return load_runner(model, device=device, dtype=dtype, kv_memory=kv_memory,
                       page_size=page_size)


async def _run_one(runtime: Runtime, program: str, args: list[str], out: TextIO,
                   err: TextIO) -> int:
    instance = await runtime.launch(program, args, owner="local")
    printer = EventPrinter(out, err)
    interrupted = trio.Event()
    async with trio.open_nursery() as nursery:
        # Signals can only be caught on the main thread; elsewhere Ctrl-C stays trio's business.
        if threading.current_thread() is threading.main_thread():
            nursery.start_soon(_kill_on_interrupt, instance, interrupted)
        async for event in instance.events:
            printer.print(event)
        nursery.cancel_scope.cancel()
    if interrupted.is_set():
        return EXIT_INTERRUPTED
    return EXIT_FINISHED if printer.reason == "finished" else EXIT_ENDED


async def _kill_on_interrupt(instance: Instance, interrupted: trio.Event) -> None:
    with trio.open_signal_receiver(signal.SIGINT) as signals:
        async for _ in signals:
            interrupted.set()
            instance.kill("killed", "interrupted (Ctrl-C)")


class EventPrinter:
    """Writes one instance's events to a terminal, keeping streamed text intact."""

    def __init__(self, out: TextIO, err: TextIO):
        self.out = out
        self.err = err
        self.reason: str | None = None
        self._sent_messages = False
        self._line_start = {"stdout": True, "stderr": True}
        self._out_ends_line = True

    def print(self, event: dict[str, Any]) -> None:
        kind = event.get("event")
        if kind == "message":
            self._sent_messages = True
            self.out.write(event["message"])
            self.out.flush()
            if event["message"]:
                self._out_ends_line = event["message"].endswith("\n")
        elif kind in ("stdout", "stderr"):
            self._write_prefixed(kind, event["data"])
        elif kind == "return":
            if not self._sent_messages:
                self._err_line(f"[return] {event['value']}")
        elif kind == "terminated":
            self.reason = event["reason"]
            detail = event.get("detail") or ""
            self._err_line(f"[terminated: {self.reason}" + (f" ({detail})]" if detail else "]"))

    def _write_prefixed(self, stream: str, data: str) -> None:
        prefix = f"[{stream}] "
        pieces = []
        for line in data.splitlines(keepends=True):
            if self._line_start[stream]:
                pieces.append(prefix)
            pieces.append(line)
            self._line_start[stream] = line.endswith("\n")
        self.err.write("".join(pieces))
        self.err.flush()

    def _err_line(self, text: str) -> None:
        """A line of our own on stderr, starting on a fresh line of the terminal."""
        if not self._out_ends_line:
            self.out.write("\n")
            self.out.flush()
            self._out_ends_line = True
        if not all(self._line_start.values()):
            self.err.write("\n")
            self._line_start = {"stdout": True, "stderr": True}
        self.err.write(text + "\n")
        self.err.flush()
