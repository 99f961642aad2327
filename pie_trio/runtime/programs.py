"""Programs: uploaded inferlets, named by the BLAKE3 hash of their bytes, compiled once, and
kept within bounds.

`add` checks a module before anything runs it — WebAssembly magic and version, its section
headers against the limits (function count, code size, no start function: compiler.py), then
wasmtime's validator and compiler in a child process bounded in time and memory, the required
exports (`_start`, `memory`) and imports (only `pie` and `wasi_snapshot_preview1`) — and links
it against the host (`InstancePre`), so a launch only instantiates. The compiled code is
serialised to a cache directory keyed by the hash and the wasmtime version, so after a restart a
program is loaded in well under a millisecond instead of being compiled again; the original
bytes are kept next to it for a recompile when wasmtime changes. A memory-only store keeps the
serialised code in memory instead.

Bounds. The store holds at most `max_programs` programs and `max_stored_bytes` (module and
compiled code), and each owner (tenant) at most its quota; an upload past a bound evicts the
least recently used programs that no instance is running, and is refused only when nothing can
be evicted — the failure is that upload's, never another's launch. At most `max_loaded`
programs are kept compiled in memory (each holds its code and, once launched, a memfd of its
initial memory); the least recently used one not in use is dropped and loaded again from the
stored code on its next launch. `Runtime` marks programs in use with `hold`/`release`.

Locking. One lock guards the bookkeeping and is never held while compiling, loading or writing
files, so a compile in one worker thread never stalls a launch on the trio thread. Two adds of
the same bytes compile once (the second waits for the first).

Components. A WebAssembly component (a Python inferlet: docs/abi.md, "Components") is stored,
cached and bounded the same way; it is compiled with limits of its own (`component_*` in
`ProgramLimits`: a CPython component is ~40 MB and compiles for several seconds, where a Rust
module takes a fraction of one), its imports must be `pie:inferlet/*` or `wasi:*`, and it must
export `run`. Its compiled code is serialised like a module's, so it is compiled once per
program, never per launch.

Built-in programs (`pie_trio/builtin/*.wasm`, shipped with the package) resolve by their file
stem, e.g. `text-completion`, and are compiled on first use like any upload.

Compiling takes tens of milliseconds to seconds: from trio, call `add` in a worker thread
(`await trio.to_thread.run_sync(store.add, wasm)`). The store is safe to use from several threads.

The cache directory holds native code that is loaded without re-validation: it must be private
to the server (it is created with mode 0700).
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import tempfile
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import blake3
import wasmtime
import wasmtime.component as wc

from pie_trio.runtime.abi import IMPORTS, make_linker
from pie_trio.runtime.compiler import (
    ProgramError,
    Sections,
    compile_in_child,
    is_component,
    make_engine,
    scan,
    short_message,
)
from pie_trio.runtime.component import (
    ALLOWED_IMPORT_PREFIXES,
    RUN_EXPORT,
    make_component_linker,
)
from pie_trio.runtime.sandbox import MiB

log = logging.getLogger(__name__)
_Result = TypeVar("_Result")  # what work shared by concurrent callers (`_once`) returns

BUILTIN_DIR = Path(__file__).resolve().parent.parent / "builtin"
ALLOWED_IMPORT_MODULES = ("pie", "wasi_snapshot_preview1")
WASMTIME_VERSION = importlib.metadata.version("wasmtime")

__all__ = ["Program", "ProgramError", "ProgramLimits", "ProgramStore", "UnknownProgram"]


class UnknownProgram(LookupError):
    """No program by that hash or built-in name."""


@dataclass(frozen=True)
class ProgramLimits:
    """What uploaded programs may cost the server (docs/runtime.md, "Hostile input: limits")."""

    max_functions: int = 20_000  # functions one module defines (the builtins have ~500)
    max_code_bytes: int = 8 * MiB  # its code section (the builtins have ~260 KB)
    compile_timeout: float = 30.0  # seconds one compile may take
    compile_memory: int = 1024 * MiB  # memory one compile may use
    compile_workers: int = 2  # compiles at once; more uploads wait their turn
    # Components (Python inferlets) instead of compile_timeout and compile_memory: compiling
    # CPython takes ~8-35 s and ~1 GB, depending on the machine.
    component_compile_timeout: float = 180.0
    component_compile_memory: int = 3072 * MiB
    max_programs: int = 1024  # programs stored
    max_stored_bytes: int = 1024 * MiB  # bytes stored: modules and compiled code
    max_loaded: int = 64  # programs kept compiled in memory, in use ones aside
    owner_max_programs: int = 128  # programs one owner (tenant) may have stored
    owner_max_bytes: int = 256 * MiB  # bytes one owner may have stored

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if not value > 0:
                raise ValueError(f"ProgramLimits.{name} must be positive")


@dataclass(frozen=True, eq=False)
class Program:
    """A compiled program: a core module (`module`, `pre`) or a component (`component`,
    `component_linker`)."""

    hash: str
    engine: wasmtime.Engine
    module: wasmtime.Module | None
    pre: wasmtime.InstancePre | None  # linked against the host: a launch only instantiates
    size: int
    component: wc.Component | None = None
    component_linker: wc.Linker | None = None

    @property
    def kind(self) -> str:
        return "component" if self.component is not None else "module"


@dataclass(eq=False)
class _Stored:
    """One program the store keeps (whether or not it is compiled in memory right now)."""

    hash: str
    size: int  # bytes of the WebAssembly module
    cost: int  # bytes it takes in the store: the module on disk, and its compiled code
    owners: set[str] = field(default_factory=set)
    code: bytes | None = None  # memory-only stores: the serialised code, to load it again
    component: bool = False  # a component, not a core module


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "pie-trio" / "programs"


class ProgramStore:
    """Programs by hash, compiled once and cached on disk (unless `memory_only`), bounded."""

    def __init__(self, cache_dir: str | Path | None = None, *, memory_only: bool = False,
                 builtin_dir: str | Path = BUILTIN_DIR, max_bytes: int = 64 * MiB,
                 limits: ProgramLimits | None = None):
        self.engine = make_engine()
        self.linker = make_linker(self.engine)
        self.component_linker = make_component_linker(self.engine)
        self.max_bytes = max_bytes  # largest module accepted
        self.limits = limits or ProgramLimits()
        self.cache_dir = None if memory_only else Path(cache_dir or default_cache_dir())
        self.builtins = {path.stem: path for path in sorted(Path(builtin_dir).glob("*.wasm"))}
        self.compiles = 0  # modules this store compiled (loading a cached one is not counted)
        self._stored: OrderedDict[str, _Stored] = OrderedDict()  # least recently used first
        self._stored_bytes = 0
        self._loaded: OrderedDict[str, Program] = OrderedDict()  # least recently used first
        self._held: Counter[str] = Counter()  # programs running instances use
        self._builtin_hashes: dict[str, str] = {}
        self._pending: dict[tuple[str, str], Future[Any]] = {}  # work under way, shared by callers
        self._lock = threading.Lock()  # the dicts above; never held while compiling or in I/O
        self._compile_slots = threading.BoundedSemaphore(self.limits.compile_workers)
        if self.cache_dir is not None:
            for directory in (self._wasm_dir, self._compiled_dir):
                directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._index_disk()

    # -- the public interface -------------------------------------------------------------

    def add(self, wasm: bytes, owner: str | None = None) -> str:
        """Check, compile and store a program for `owner` (a tenant, counted against its
        quota); its BLAKE3 hex hash. Raises ProgramError."""
        wasm = bytes(wasm)
        if len(wasm) > self.max_bytes:
            raise ProgramError(f"the program is {len(wasm)} bytes; the limit is {self.max_bytes}")
        program_hash = blake3.blake3(wasm).hexdigest()
        self._adopt(program_hash)
        with self._lock:
            if program_hash in self._stored:
                self._delete_files(self._claim(program_hash, owner))
                return program_hash
        program, code = self._once("build", program_hash, lambda: self._build(program_hash, wasm))
        self._keep(program, wasm, code, owner)
        return program_hash

    def has(self, name_or_hash: str) -> bool:
        """Whether `resolve` would find it (a built-in name, or a stored program's hash)."""
        return (name_or_hash in self.builtins or name_or_hash in self._stored
                or self._adopt(name_or_hash))

    def resolve(self, name_or_hash: str) -> str:
        """The hash of a built-in name or a known hash; raises UnknownProgram."""
        return self.get(name_or_hash).hash

    def get(self, name_or_hash: str) -> Program:
        """The compiled program (loading it from the store or compiling a built-in as needed)."""
        program = self.loaded(name_or_hash)
        if program is not None:
            return program
        self._adopt(name_or_hash)
        with self._lock:
            stored = self._stored.get(self._builtin_hashes.get(name_or_hash, name_or_hash))
        if stored is not None:
            program = self._once("load", stored.hash, lambda: self._load(stored))
            if program is not None:
                return program
        elif name_or_hash in self.builtins:
            return self.get(self._add_builtin(name_or_hash))
        raise UnknownProgram(f"no program {name_or_hash!r}: upload it first or name a built-in "
                             f"({', '.join(self.builtins) or 'none installed'})")

    def is_loaded(self, name_or_hash: str) -> bool:
        """Whether `get` would return without compiling or reading the disk."""
        return self._builtin_hashes.get(name_or_hash, name_or_hash) in self._loaded

    def loaded(self, name_or_hash: str) -> Program | None:
        """The program if it is compiled in memory now, else None; never compiles or loads,
        so the trio thread may call it."""
        with self._lock:
            program_hash = self._builtin_hashes.get(name_or_hash, name_or_hash)
            program = self._loaded.get(program_hash)
            if program is not None:
                self._touch(program_hash)
            return program

    def hold(self, program_hash: str) -> None:
        """An instance runs the program: it is not evicted until `release`."""
        with self._lock:
            self._held[program_hash] += 1

    def release(self, program_hash: str) -> None:
        with self._lock:
            self._held[program_hash] -= 1
            if self._held[program_hash] <= 0:
                del self._held[program_hash]
            self._trim_loaded()

    def programs(self) -> list[dict[str, Any]]:
        """The stored programs: hash, size, and built-in name where there is one."""
        names = {h: name for name, h in self._builtin_hashes.items()}
        with self._lock:
            stored = list(self._stored.values())
        return [{"hash": s.hash, "name": names.get(s.hash), "size": s.size}
                for s in sorted(stored, key=lambda s: s.hash)]

    def usage(self, owner: str | None = None) -> dict[str, int]:
        """Programs and bytes stored (of `owner` only, if given), and programs loaded."""
        with self._lock:
            stored = [s for s in self._stored.values() if owner is None or owner in s.owners]
            return {"programs": len(stored), "bytes": sum(s.cost for s in stored),
                    "loaded": len(self._loaded), "held": len(self._held)}

    # -- compiling and loading (no lock held) ---------------------------------------------

    def _build(self, program_hash: str, wasm: bytes) -> tuple[Program, bytes]:
        """Check, compile (in a bounded child process) and link; the program and its code."""
        component = is_component(wasm)
        limits = self.limits
        if not component:
            self._check_sections(scan(wasm))
        try:
            with self._compile_slots:
                code = compile_in_child(
                    wasm, component=component,
                    timeout=(limits.component_compile_timeout if component
                             else limits.compile_timeout),
                    memory_bytes=(limits.component_compile_memory if component
                                  else limits.compile_memory))
        except ProgramError as exc:
            if component:  # say which kind it was taken for
                raise ProgramError(f"not a core WebAssembly module but a component: {exc}") \
                    from None
            raise
        with self._lock:
            self.compiles += 1
        compiled = self._deserialize(code, component)
        if isinstance(compiled, wc.Component):
            _check_component_shape(compiled, self.engine)
        else:
            _check_shape(compiled)
        return self._program(program_hash, compiled, len(wasm)), code

    def _check_sections(self, sections: Sections) -> None:
        limits = self.limits
        if sections.has_start:
            raise ProgramError(
                "the program has a WebAssembly start function: pie-trio refuses those (it would "
                "run while the instance is being created, before it can answer host calls); "
                "do start-up work in `_start`")
        if sections.functions > limits.max_functions:
            raise ProgramError(f"the program defines {sections.functions} functions; the limit "
                               f"is {limits.max_functions} (limit program_max_functions)")
        if sections.code_bytes > limits.max_code_bytes:
            raise ProgramError(f"the program's code section is {sections.code_bytes} bytes; the "
                               f"limit is {limits.max_code_bytes} (limit program_max_code_size)")

    def _load(self, stored: _Stored) -> Program | None:
        """Compile-free load of a stored program (a recompile if its cached code is unusable);
        None if it is gone."""
        code = stored.code
        module: wasmtime.Module | wc.Component | None
        if code is not None:
            module = self._deserialize(code, stored.component)
        else:
            module = self._load_from_disk(stored)
            if module is None:
                with self._lock:
                    self._forget(stored.hash)
                return None
        program = self._program(stored.hash, module, stored.size)
        with self._lock:
            if stored.hash in self._stored:
                self._loaded[stored.hash] = program
                self._touch(stored.hash)
                self._trim_loaded()
        return program

    def _deserialize(self, code: bytes, component: bool) -> wasmtime.Module | wc.Component:
        try:
            if component:
                return wc.Component.deserialize(self.engine, code)
            return wasmtime.Module.deserialize(self.engine, code)
        except wasmtime.WasmtimeError as exc:
            raise ProgramError(f"the compiled program could not be loaded: "
                               f"{short_message(exc)}") from None

    def _program(self, program_hash: str, compiled: wasmtime.Module | wc.Component,
                 size: int) -> Program:
        if isinstance(compiled, wc.Component):
            # wasmtime-py has no component InstancePre: imports were checked by name, and
            # instantiating links them (in a few ms, most of a launch's cost).
            return Program(program_hash, self.engine, None, None, size, compiled,
                           self.component_linker)
        try:
            pre = self.linker.instantiate_pre(compiled)
        except wasmtime.WasmtimeError as exc:
            raise ProgramError(f"the program does not link against pie-trio: "
                               f"{short_message(exc)}") from None
        return Program(program_hash, self.engine, compiled, pre, size)

    def _add_builtin(self, name: str) -> str:
        program_hash = self.add(self.builtins[name].read_bytes())
        with self._lock:
            self._builtin_hashes[name] = program_hash
        return program_hash

    def _once(self, kind: str, program_hash: str, work: Callable[[], _Result]) -> _Result:
        """Run `work` once for concurrent callers asking for the same thing; its result."""
        key = (kind, program_hash)
        with self._lock:
            future = self._pending.get(key)
            mine = future is None
            if future is None:
                future = self._pending[key] = Future()
        if mine:
            try:
                future.set_result(work())
            except BaseException as exc:
                future.set_exception(exc)
            finally:
                with self._lock:
                    del self._pending[key]
        result: _Result = future.result()  # what `work` returned, for every caller of the key
        return result

    # -- bookkeeping (the lock held) ------------------------------------------------------

    def _keep(self, program: Program, wasm: bytes, code: bytes, owner: str | None) -> None:
        """Store a freshly built program, making room for it; ProgramError if there is none."""
        memory_only = self.cache_dir is None
        stored = _Stored(program.hash, len(wasm), len(code) + (0 if memory_only else len(wasm)),
                         code=code if memory_only else None,
                         component=program.component is not None)
        with self._lock:
            if program.hash in self._stored:  # another upload of the same bytes won the race
                evicted = self._claim(program.hash, owner)
            else:
                evicted = self._make_room(stored, owner)
                self._stored[program.hash] = stored
                self._stored_bytes += stored.cost
                if owner:
                    stored.owners.add(owner)
                self._loaded[program.hash] = program
                self._trim_loaded()
        self._delete_files(evicted)
        if not memory_only:
            self._save(program.hash, wasm, code)
            with self._lock:
                evicted_meanwhile = program.hash not in self._stored
            if evicted_meanwhile:  # by another upload while we wrote: leave no orphan files
                self._delete_files([program.hash])

    def _claim(self, program_hash: str, owner: str | None) -> list[str]:
        """`owner` uploads a program already stored: count it against its quota too."""
        stored = self._stored[program_hash]
        self._touch(program_hash)
        if not owner or owner in stored.owners:
            return []
        evicted = self._make_room_for_owner(stored, owner)
        stored.owners.add(owner)
        return evicted

    def _make_room(self, new: _Stored, owner: str | None) -> list[str]:
        """Evict least recently used programs nobody runs until `new` fits; their hashes."""
        limits = self.limits
        if new.cost > limits.max_stored_bytes:
            raise ProgramError(f"the program takes {new.cost} bytes compiled; the store holds "
                               f"at most {limits.max_stored_bytes} (limit program_store_bytes)")
        evicted = self._make_room_for_owner(new, owner) if owner else []
        while (len(self._stored) + 1 > limits.max_programs
               or self._stored_bytes + new.cost > limits.max_stored_bytes):
            victim = self._least_recent(self._stored.values())
            if victim is None:
                raise ProgramError(
                    f"the program store is full ({len(self._stored)} programs, "
                    f"{self._stored_bytes} bytes; limits program_store_programs "
                    f"{limits.max_programs}, program_store_bytes {limits.max_stored_bytes}) "
                    "and every program in it is running")
            evicted.append(self._forget(victim.hash))
        return evicted

    def _make_room_for_owner(self, new: _Stored, owner: str) -> list[str]:
        limits = self.limits
        if new.cost > limits.owner_max_bytes:
            raise ProgramError(f"the program takes {new.cost} bytes compiled; a tenant may store "
                               f"{limits.owner_max_bytes} (limit tenant_program_bytes)")
        evicted: list[str] = []
        while True:
            mine = [s for s in self._stored.values() if owner in s.owners]
            if (len(mine) + 1 <= limits.owner_max_programs
                    and sum(s.cost for s in mine) + new.cost <= limits.owner_max_bytes):
                return evicted
            victim = self._least_recent(mine)
            if victim is None:
                raise ProgramError(
                    f"tenant {owner!r} has {len(mine)} programs stored, all running; its quota "
                    f"is {limits.owner_max_programs} programs (limit tenant_programs) and "
                    f"{limits.owner_max_bytes} bytes (limit tenant_program_bytes)")
            victim.owners.discard(owner)
            if not victim.owners:  # nobody else uploaded it: free the space now
                evicted.append(self._forget(victim.hash))

    def _least_recent(self, candidates: Iterable[_Stored]) -> _Stored | None:
        """The least recently used stored program no instance runs (LRU order is kept)."""
        return next((s for s in candidates if s.hash not in self._held), None)

    def _forget(self, program_hash: str) -> str:
        stored = self._stored.pop(program_hash, None)
        if stored is not None:
            self._stored_bytes -= stored.cost
        self._loaded.pop(program_hash, None)
        for name, builtin_hash in list(self._builtin_hashes.items()):
            if builtin_hash == program_hash:
                del self._builtin_hashes[name]
        log.info("evicted program=%s", program_hash)
        return program_hash

    def _trim_loaded(self) -> None:
        """Drop compiled programs nobody runs, least recently used first, down to max_loaded."""
        while len(self._loaded) > self.limits.max_loaded:
            victim = next((h for h in self._loaded if h not in self._held), None)
            if victim is None:
                return  # all in use: bounded by the instances running them
            del self._loaded[victim]

    def _touch(self, program_hash: str) -> None:
        for ordered in (self._stored, self._loaded):
            if program_hash in ordered:
                ordered.move_to_end(program_hash)

    # -- the disk cache -------------------------------------------------------------------

    @property
    def _wasm_dir(self) -> Path:
        assert self.cache_dir is not None
        return self.cache_dir / "wasm"

    @property
    def _compiled_dir(self) -> Path:
        assert self.cache_dir is not None
        # Serialised code is only valid for the wasmtime build (and engine config) that made it.
        return self.cache_dir / "compiled" / f"wasmtime-{WASMTIME_VERSION}-epoch"

    def _wasm_path(self, program_hash: str) -> Path:
        return self._wasm_dir / f"{program_hash}.wasm"

    def _compiled_path(self, program_hash: str) -> Path:
        return self._compiled_dir / f"{program_hash}.cwasm"

    def _index_disk(self) -> None:
        """Know the programs a previous run left, oldest first; evict past the bounds."""
        found = []
        for path in self._wasm_dir.glob("*.wasm"):
            if _is_hash(path.stem):
                compiled = self._compiled_path(path.stem)
                code = compiled.stat().st_size if compiled.exists() else 0
                stat = path.stat()
                found.append((stat.st_mtime, _Stored(path.stem, stat.st_size,
                                                     stat.st_size + code,
                                                     component=_is_component_file(path))))
        evicted = []
        for _, stored in sorted(found, key=lambda item: item[0]):
            if (len(self._stored) >= self.limits.max_programs
                    or self._stored_bytes + stored.cost > self.limits.max_stored_bytes):
                evicted.append(stored.hash)
                continue
            self._stored[stored.hash] = stored
            self._stored_bytes += stored.cost
        self._delete_files(evicted)

    def _adopt(self, program_hash: str) -> bool:
        """Know a program another store sharing this cache directory saved since start-up
        (replicas behind a balancer): programs are content-addressed, and loading re-checks
        the bytes against the hash before compiling them. True if it is known now."""
        if self.cache_dir is None or not _is_hash(program_hash):
            return False
        with self._lock:
            if program_hash in self._stored:
                return True
        path = self._wasm_path(program_hash)
        try:
            size = path.stat().st_size
        except OSError:
            return False
        compiled = self._compiled_path(program_hash)
        code = compiled.stat().st_size if compiled.exists() else 0
        stored = _Stored(program_hash, size, size + code, component=_is_component_file(path))
        evicted: list[str] = []
        with self._lock:
            if program_hash not in self._stored:
                try:
                    evicted = self._make_room(stored, None)
                except ProgramError:  # full of running programs: it stays unknown here
                    return False
                self._stored[program_hash] = stored
                self._stored_bytes += stored.cost
        self._delete_files(evicted)
        return True

    def _save(self, program_hash: str, wasm: bytes, code: bytes) -> None:
        try:
            _write_atomically(self._wasm_path(program_hash), wasm)
            _write_atomically(self._compiled_path(program_hash), code)
        except OSError as exc:  # a full disk costs a recompile later, nothing more
            log.warning("could not cache program %s: %s", program_hash, exc)

    def _delete_files(self, hashes: list[str]) -> None:
        if self.cache_dir is None:
            return
        for program_hash in hashes:
            for path in (self._wasm_path(program_hash), self._compiled_path(program_hash)):
                path.unlink(missing_ok=True)

    def _load_from_disk(self, stored: _Stored) -> wasmtime.Module | wc.Component | None:
        """The compiled module (or component) from disk if usable, else recompiled from its
        bytes; None if the files are gone."""
        program_hash = stored.hash
        wasm_path, compiled_path = self._wasm_path(program_hash), self._compiled_path(program_hash)
        if not wasm_path.exists():
            return None
        os.utime(wasm_path)  # its age orders evictions after a restart
        if compiled_path.exists():
            try:
                if stored.component:
                    return wc.Component.deserialize_file(self.engine, str(compiled_path))
                return wasmtime.Module.deserialize_file(self.engine, str(compiled_path))
            except wasmtime.WasmtimeError as exc:
                log.warning("recompiling %s: its cached code is unusable (%s)", program_hash,
                            short_message(exc))
        wasm = wasm_path.read_bytes()
        if blake3.blake3(wasm).hexdigest() != program_hash:
            log.warning("ignoring %s: its bytes do not match its hash", wasm_path)
            return None
        program, code = self._build(program_hash, wasm)
        self._save(program_hash, wasm, code)
        return program.component or program.module


def _check_shape(module: wasmtime.Module) -> None:
    """Refuse modules pie-trio cannot run, with a message that says what to change."""
    for item in module.imports:
        if item.module not in ALLOWED_IMPORT_MODULES:
            raise ProgramError(
                f"the program imports {item.module}.{item.name}: only the 'pie' and "
                "'wasi_snapshot_preview1' import modules are available")
        if item.module == "pie" and item.name not in IMPORTS:
            raise ProgramError(f"the program imports pie.{item.name}, which does not exist "
                               f"(available: {', '.join(IMPORTS)})")
    exports = {item.name: item.type for item in module.exports}
    start = exports.get("_start")
    if not isinstance(start, wasmtime.FuncType) or start.params or start.results:
        raise ProgramError("the program has no `_start` function export (build it as a "
                           "WASI command, e.g. a Rust binary with `fn main`)")
    if not isinstance(exports.get("memory"), wasmtime.MemoryType):
        raise ProgramError("the program does not export its linear memory as `memory`")


def _check_component_shape(component: wc.Component, engine: wasmtime.Engine) -> None:
    """Refuse components pie-trio cannot run, with a message that says what to change."""
    ty = component.type
    imports, exports = list(ty.imports(engine)), list(ty.exports(engine))
    for name in imports:
        if not name.startswith(ALLOWED_IMPORT_PREFIXES):
            raise ProgramError(f"the component imports {name}: only pie:inferlet/host and "
                               "WASI preview 2 (wasi:*) are available")
    if RUN_EXPORT not in exports:
        raise ProgramError(f"not a core WebAssembly module but a component, and it does not "
                           f"export `{RUN_EXPORT}` (build a Python inferlet with `pie-trio "
                           "build`, or a Rust one for wasm32-wasip1)")


def _is_component_file(path: Path) -> bool:
    with path.open("rb") as file:
        return is_component(file.read(8))


def _is_hash(text: str) -> bool:
    return len(text) == 64 and all(c in "0123456789abcdef" for c in text)


def _write_atomically(path: Path, data: bytes) -> None:
    """Readers see the whole file or none: a crash mid-write never leaves a corrupt cache entry."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
