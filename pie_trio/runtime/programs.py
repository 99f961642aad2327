"""Programs: uploaded inferlets, named by the BLAKE3 hash of their bytes, compiled once.

`add` checks a module before anything runs it — WebAssembly magic and version, wasmtime's own
validation, the required exports (`_start`, `memory`) and imports (only `pie` and
`wasi_snapshot_preview1`) — then compiles it and links it against the host (`InstancePre`), so a
launch only instantiates. The compiled code is serialised to a cache directory keyed by the hash
and the wasmtime version, so after a restart a program is loaded in well under a millisecond
instead of being compiled again; the original bytes are kept next to it for a recompile when
wasmtime changes.

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
from dataclasses import dataclass
from pathlib import Path

import blake3
import wasmtime

from pie_trio.runtime.abi import IMPORTS, make_linker
from pie_trio.runtime.sandbox import MiB, make_engine

log = logging.getLogger(__name__)

BUILTIN_DIR = Path(__file__).resolve().parent.parent / "builtin"
WASM_MAGIC = b"\0asm"
CORE_VERSION = b"\x01\0\0\0"
ALLOWED_IMPORT_MODULES = ("pie", "wasi_snapshot_preview1")
WASMTIME_VERSION = importlib.metadata.version("wasmtime")


class ProgramError(ValueError):
    """The bytes are not a program pie-trio can run; the message says why."""


class UnknownProgram(LookupError):
    """No program by that hash or built-in name."""


@dataclass(frozen=True, eq=False)
class Program:
    hash: str
    engine: wasmtime.Engine
    module: wasmtime.Module
    pre: wasmtime.InstancePre  # linked against the host: instantiation is all a launch does
    size: int


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "pie-trio" / "programs"


class ProgramStore:
    """Programs by hash, compiled once and cached on disk (unless `memory_only`)."""

    def __init__(self, cache_dir: str | Path | None = None, *, memory_only: bool = False,
                 builtin_dir: str | Path = BUILTIN_DIR, max_bytes: int = 64 * MiB):
        self.engine = make_engine()
        self.linker = make_linker(self.engine)
        self.max_bytes = max_bytes
        self.cache_dir = None if memory_only else Path(cache_dir or default_cache_dir())
        if self.cache_dir is not None:
            for directory in (self._wasm_dir, self._compiled_dir):
                directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.builtins = {path.stem: path for path in sorted(Path(builtin_dir).glob("*.wasm"))}
        self.compiles = 0  # modules this store compiled (loading a cached one is not counted)
        self._loaded: dict[str, Program] = {}
        self._builtin_hashes: dict[str, str] = {}
        self._lock = threading.RLock()

    # -- the public interface -------------------------------------------------------------

    def add(self, wasm: bytes) -> str:
        """Check, compile and store a program; its BLAKE3 hex hash. Raises ProgramError."""
        wasm = bytes(wasm)
        if len(wasm) > self.max_bytes:
            raise ProgramError(f"the program is {len(wasm)} bytes; the limit is {self.max_bytes}")
        program_hash = blake3.blake3(wasm).hexdigest()
        with self._lock:
            if program_hash in self._loaded or self._load_cached(program_hash) is not None:
                return program_hash
            module = self._compile(wasm)
            self._loaded[program_hash] = self._program(program_hash, module, len(wasm))
            self._save(program_hash, wasm, module)
        return program_hash

    def has(self, name_or_hash: str) -> bool:
        """Whether `resolve` would find it (a built-in name, or a hash in memory or on disk)."""
        if name_or_hash in self.builtins or name_or_hash in self._loaded:
            return True
        return self.cache_dir is not None and _is_hash(name_or_hash) and (
            self._wasm_path(name_or_hash).exists())

    def resolve(self, name_or_hash: str) -> str:
        """The hash of a built-in name or a known hash; raises UnknownProgram."""
        return self.get(name_or_hash).hash

    def get(self, name_or_hash: str) -> Program:
        """The compiled program (loading it from the cache or compiling a built-in as needed)."""
        with self._lock:
            program = self._loaded.get(self._builtin_hashes.get(name_or_hash, name_or_hash))
            if program is not None:
                return program
            if name_or_hash in self.builtins:
                return self._loaded[self._add_builtin(name_or_hash)]
            if _is_hash(name_or_hash):
                program = self._load_cached(name_or_hash)
                if program is not None:
                    return program
        raise UnknownProgram(f"no program {name_or_hash!r}: upload it first or name a built-in "
                             f"({', '.join(self.builtins) or 'none installed'})")

    def is_loaded(self, name_or_hash: str) -> bool:
        """Whether `get` would return without compiling or reading the disk."""
        return self._builtin_hashes.get(name_or_hash, name_or_hash) in self._loaded

    def programs(self) -> list[dict]:
        """The programs in memory and on disk: hash, size, and built-in name where there is one."""
        names = {h: name for name, h in self._builtin_hashes.items()}
        hashes = set(self._loaded)
        if self.cache_dir is not None:
            hashes |= {path.stem for path in self._wasm_dir.glob("*.wasm")}
        return [{"hash": h, "name": names.get(h), "size": self._size(h)} for h in sorted(hashes)]

    # -- compiling ------------------------------------------------------------------------

    def _compile(self, wasm: bytes) -> wasmtime.Module:
        if wasm[:4] != WASM_MAGIC:
            raise ProgramError("not a WebAssembly module (bad magic)")
        if wasm[4:8] != CORE_VERSION:
            raise ProgramError("not a core WebAssembly module (a component, or an unknown "
                               "version): build the inferlet for wasm32-wasip1")
        try:
            wasmtime.Module.validate(self.engine, wasm)
            module = wasmtime.Module(self.engine, wasm)
        except wasmtime.WasmtimeError as exc:
            raise ProgramError(f"invalid WebAssembly module: {_short(exc)}") from None
        self.compiles += 1
        _check_shape(module)
        return module

    def _program(self, program_hash: str, module: wasmtime.Module, size: int) -> Program:
        try:
            pre = self.linker.instantiate_pre(module)
        except wasmtime.WasmtimeError as exc:
            raise ProgramError(f"the program does not link against pie-trio: "
                               f"{_short(exc)}") from None
        return Program(program_hash, self.engine, module, pre, size)

    def _add_builtin(self, name: str) -> str:
        program_hash = self.add(self.builtins[name].read_bytes())
        self._builtin_hashes[name] = program_hash
        return program_hash

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

    def _save(self, program_hash: str, wasm: bytes, module: wasmtime.Module) -> None:
        if self.cache_dir is None:
            return
        try:
            _write_atomically(self._wasm_path(program_hash), wasm)
            _write_atomically(self._compiled_path(program_hash), bytes(module.serialize()))
        except OSError as exc:  # a full disk costs a recompile later, nothing more
            log.warning("could not cache program %s: %s", program_hash, exc)

    def _load_cached(self, program_hash: str) -> Program | None:
        """Load a program from disk: the compiled module if usable, else recompile its bytes."""
        if self.cache_dir is None or not _is_hash(program_hash):
            return None
        wasm_path, compiled_path = self._wasm_path(program_hash), self._compiled_path(program_hash)
        if not wasm_path.exists():
            return None
        size = wasm_path.stat().st_size
        module = None
        if compiled_path.exists():
            try:
                module = wasmtime.Module.deserialize_file(self.engine, str(compiled_path))
            except wasmtime.WasmtimeError as exc:
                log.warning("recompiling %s: its cached code is unusable (%s)", program_hash,
                            _short(exc))
        if module is None:
            wasm = wasm_path.read_bytes()
            if blake3.blake3(wasm).hexdigest() != program_hash:
                log.warning("ignoring %s: its bytes do not match its hash", wasm_path)
                return None
            module = self._compile(wasm)
            self._save(program_hash, wasm, module)
        program = self._program(program_hash, module, size)
        self._loaded[program_hash] = program
        return program

    def _size(self, program_hash: str) -> int:
        program = self._loaded.get(program_hash)
        if program is not None:
            return program.size
        return self._wasm_path(program_hash).stat().st_size


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


def _is_hash(text: str) -> bool:
    return len(text) == 64 and all(c in "0123456789abcdef" for c in text)


def _short(exc: Exception) -> str:
    """A wasmtime message on one line: its context, then its cause."""
    text = str(exc).strip()
    head, _, cause = text.partition("Caused by:")
    return " ".join(part.strip() for part in (head, cause) if part.strip()).replace("\n", " ")


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
