"""Compiling untrusted WebAssembly without letting it hurt the server.

This module owns the engine configuration every program is compiled for, a cheap look at a
module's sections before anything compiles it, and the compile itself, which runs in a child
process with a time and a memory limit.

Why a child process. Cranelift's time and memory grow with the size of the code, and a module
is cheap to make huge: 4 MB of 999,000 empty functions compiled for 67 s and kept 4.25 GB of
memory. Inside the server that time cannot be interrupted (a wasmtime call cannot be cancelled
from Python) and the memory is never given back to the system. A child is killed at its time
limit, cannot allocate past its memory limit (`RLIMIT_DATA`: the private writable memory it
maps, which unlike `RLIMIT_AS` does not count address space reserved but unused, so it does not
grow with the number of cores), and whatever it used is returned when it exits. It starts in
~0.15 s (Python and wasmtime only: this file imports nothing of pie_trio) and hands the compiled
code back serialised, which the server deserialises in well under a millisecond per 100 KB.

Before the child is even started, `scan` walks the module's section headers (a few µs: only the
section ids, sizes and the function and code counts are read) and the store refuses modules past
its limits on function count and code size, and modules with a start function.

Components (docs/abi.md, "Components") are compiled the same way, in the same bounded child;
their nested core modules are not scanned (a CPython component is ~40 MB and compiles for several
seconds), so the program store gives them limits of their own (`ProgramLimits`).

Run as a script (`python -I compiler.py MEMORY_BYTES CPU_SECONDS [component]`) it is the child:
WebAssembly on stdin, the serialised module (or component) on stdout, exit status 2 and a
one-line reason on stderr for an invalid one.
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
from dataclasses import dataclass

import wasmtime
import wasmtime.component

WASM_MAGIC = b"\0asm"
CORE_VERSION = b"\x01\0\0\0"
COMPONENT_VERSION = b"\x0d\0\x01\0"  # version 0xd, layer 1: a component
FUNCTION_SECTION, START_SECTION, CODE_SECTION = 3, 8, 10
EXIT_INVALID = 2  # the child's status for a module wasmtime refused
MIN_COMPILE_MEMORY = 64 << 20  # Python and wasmtime alone need ~30 MB before any compiling


class ProgramError(ValueError):
    """The bytes are not a program pie-trio can run, or compiling them went past a limit; the
    message says why (and names the limit)."""


def make_engine() -> wasmtime.Engine:
    """The one engine configuration every program is compiled for: the child compiles with it,
    the server deserialises with it, and serialised code only loads into an equal one."""
    config = wasmtime.Config()
    config.epoch_interruption = True  # how a running guest is stopped (sandbox.py)
    # Linear memory stays at one address for a store's life (growth happens inside its
    # reservation), so host calls can keep the base address instead of asking on every call.
    config.memory_may_move = False
    return wasmtime.Engine(config)


# -- the section scan ----------------------------------------------------------------------


@dataclass(frozen=True)
class Sections:
    """What the section headers of a module say, read without compiling or validating it."""

    functions: int  # functions the module defines (not imports)
    code_bytes: int  # size of the code section: the function bodies
    has_start: bool  # a start function, which would run during instantiation


def is_component(wasm: bytes) -> bool:
    """Whether the bytes claim to be a WebAssembly component (the preamble only)."""
    return wasm[:4] == WASM_MAGIC and wasm[4:8] == COMPONENT_VERSION


def scan(wasm: bytes) -> Sections:
    """Walk the sections of a core module; ProgramError if the bytes are not one.

    Only the framing is checked here; wasmtime's validator (in the child) checks the rest.
    """
    if wasm[:4] != WASM_MAGIC:
        raise ProgramError("not a WebAssembly module (bad magic)")
    if wasm[4:8] != CORE_VERSION:
        raise ProgramError("not a core WebAssembly module (a component, or an unknown "
                           "version): build the inferlet for wasm32-wasip1")
    functions = code_bytes = 0
    has_start = False
    offset = 8
    while offset < len(wasm):
        section_id = wasm[offset]
        size, body = _leb128(wasm, offset + 1)
        end = body + size
        if end > len(wasm):
            raise ProgramError(f"invalid WebAssembly module: section {section_id} at offset "
                               f"{offset} runs past the end of the module")
        if section_id in (FUNCTION_SECTION, CODE_SECTION):
            count, _ = _leb128(wasm, body)
            functions = max(functions, count)  # the validator makes the two counts agree
            if section_id == CODE_SECTION:
                code_bytes = size
        has_start = has_start or section_id == START_SECTION
        offset = end
    return Sections(functions, code_bytes, has_start)


def _leb128(data: bytes, offset: int) -> tuple[int, int]:
    """An unsigned LEB128 u32 at `offset`: (value, offset after it)."""
    value = shift = 0
    for index in range(offset, min(offset + 5, len(data))):
        byte = data[index]
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, index + 1
        shift += 7
    raise ProgramError(f"invalid WebAssembly module: bad length at offset {offset}")


# -- the compile, in a child process ---------------------------------------------------------


def compile_in_child(wasm: bytes, *, timeout: float, memory_bytes: int,
                     component: bool = False) -> bytes:
    """Validate and compile `wasm` (a core module, or a component) in a child process; its
    serialised code.

    Raises ProgramError for an invalid module, or one whose compile would take longer than
    `timeout` seconds or more than `memory_bytes` of memory.
    """
    memory_bytes = max(memory_bytes, MIN_COMPILE_MEMORY)
    cpu_seconds = int(timeout * (os.cpu_count() or 1)) + 5  # a backstop if we are gone
    command = [sys.executable, "-I", os.path.abspath(__file__), str(memory_bytes),
               str(cpu_seconds), *(["component"] if component else [])]
    try:
        child = subprocess.run(command, input=wasm, capture_output=True, timeout=timeout,
                               check=False)
    except subprocess.TimeoutExpired:  # run() has killed and reaped the child
        raise ProgramError(f"compiling the program took longer than {timeout:g} s "
                           "(limit program_compile_timeout)") from None
    except OSError as exc:
        raise ProgramError(f"the compiler could not be started: {exc}") from None
    if child.returncode == 0:
        return child.stdout
    reason = child.stderr.decode(errors="replace").strip()
    if child.returncode == EXIT_INVALID:
        raise ProgramError(f"invalid WebAssembly module: {reason}")
    if _ran_out_of_memory(child.returncode, reason):
        raise ProgramError(f"compiling the program needed more than {memory_bytes >> 20} MiB "
                           "of memory (limit program_compile_memory)")
    if child.returncode in (-signal.SIGXCPU, -signal.SIGKILL):
        raise ProgramError(f"compiling the program took longer than {timeout:g} s "
                           "(limit program_compile_timeout)")
    last_line = reason.splitlines()[-1] if reason else ""
    raise ProgramError(f"the compiler failed (status {child.returncode}): {last_line}")


def _ran_out_of_memory(returncode: int, stderr: str) -> bool:
    # Rust aborts when an allocation fails; Python raises MemoryError.
    return (returncode == -signal.SIGABRT or "memory allocation of" in stderr
            or "MemoryError" in stderr)


def short_message(exc: Exception) -> str:
    """A wasmtime message on one line: its context, then its cause."""
    text = str(exc).strip()
    head, _, cause = text.partition("Caused by:")
    return " ".join(part.strip() for part in (head, cause) if part.strip()).replace("\n", " ")


def _child_main(memory_bytes: int, cpu_seconds: int, component: bool) -> int:
    resource.setrlimit(resource.RLIMIT_DATA, (memory_bytes, memory_bytes))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds + 1))
    _die_with_parent()
    os.nice(10)  # the server's own threads (the model, the event loop) come first
    wasm = sys.stdin.buffer.read()
    engine = make_engine()
    compiled: wasmtime.Module | wasmtime.component.Component
    try:
        if component:
            compiled = wasmtime.component.Component(engine, wasm)  # validates as it compiles
        else:
            wasmtime.Module.validate(engine, wasm)
            compiled = wasmtime.Module(engine, wasm)
    except wasmtime.WasmtimeError as exc:
        sys.stderr.write(short_message(exc))
        return EXIT_INVALID
    sys.stdout.buffer.write(compiled.serialize())
    return 0


def _die_with_parent() -> None:
    """Ask Linux to kill this child if the thread that started it goes away."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: the CPU limit still ends an orphan


if __name__ == "__main__":
    sys.exit(_child_main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:] == ["component"]))
