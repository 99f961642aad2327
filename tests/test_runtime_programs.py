"""Programs: BLAKE3 naming, the on-disk compile cache across a restart, built-ins by name, and
clear refusals of modules pie-trio cannot run."""

from __future__ import annotations

import blake3
import pytest
import wasmtime
from test_runtime_support import GUESTS, finish, running_stack

from pie_trio.runtime.programs import ProgramError, ProgramStore, UnknownProgram

PING = wasmtime.wat2wasm((GUESTS / "ping.wat").read_text())


def wat(body: str) -> bytes:
    return wasmtime.wat2wasm(f"(module {body})")


def test_a_program_is_named_by_the_blake3_of_its_bytes(tmp_path):
    store = ProgramStore(tmp_path)
    program_hash = store.add(PING)
    assert program_hash == blake3.blake3(PING).hexdigest()
    assert store.add(PING) == program_hash and store.compiles == 1  # compiled once
    assert store.has(program_hash) and store.resolve(program_hash) == program_hash
    assert not store.has("0" * 64)
    with pytest.raises(UnknownProgram):
        store.get("0" * 64)
    assert [p["hash"] for p in store.programs()] == [program_hash]


async def test_the_compiled_module_survives_a_restart(tmp_path, tiny_runner):
    program_hash = ProgramStore(tmp_path).add(PING)
    restarted = ProgramStore(tmp_path)  # a new process would see exactly this directory
    assert restarted.has(program_hash)
    assert restarted.get(program_hash).hash == program_hash
    assert restarted.compiles == 0  # loaded from the serialised module, not recompiled
    assert restarted.add(PING) == program_hash and restarted.compiles == 0
    async with running_stack(tiny_runner, programs=restarted) as stack:
        outcome = await finish(await stack.runtime.launch(program_hash, ["3"], "test"))
        assert outcome.reason == "finished"


def test_stores_sharing_a_directory_see_each_others_uploads(tmp_path):
    """Replicas behind a balancer share one cache directory: a program uploaded to one is
    known to the other at once, loaded from the compiled file, not compiled again."""
    first, second = ProgramStore(tmp_path), ProgramStore(tmp_path)
    program_hash = first.add(PING)
    assert second.has(program_hash)
    assert second.get(program_hash).hash == program_hash and second.compiles == 0
    assert second.add(PING) == program_hash and second.compiles == 0
    assert not second.has("0" * 64)


def test_unusable_cached_code_is_recompiled(tmp_path):
    program_hash = ProgramStore(tmp_path).add(PING)
    for compiled in tmp_path.glob("compiled/*/*.cwasm"):
        compiled.write_bytes(b"garbage")
    restarted = ProgramStore(tmp_path)
    assert restarted.get(program_hash).hash == program_hash
    assert restarted.compiles == 1


def test_memory_only_store_writes_nothing(tmp_path):
    store = ProgramStore(tmp_path / "unused", memory_only=True)
    program_hash = store.add(PING)
    assert store.has(program_hash) and not (tmp_path / "unused").exists()


def test_builtins_resolve_by_name(tmp_path):
    builtins = tmp_path / "builtin"
    builtins.mkdir()
    (builtins / "pinger.wasm").write_bytes(PING)
    store = ProgramStore(tmp_path / "cache", builtin_dir=builtins)
    assert store.has("pinger") and not store.has("ponger")
    assert store.resolve("pinger") == blake3.blake3(PING).hexdigest()
    assert store.get("pinger") is store.get(store.resolve("pinger"))
    names = {p["name"] for p in store.programs()}
    assert names == {"pinger"}


@pytest.mark.parametrize(("wasm", "message"), [
    (b"", "not a WebAssembly module (bad magic)"),
    (b"#!/bin/sh\necho hi\n", "not a WebAssembly module (bad magic)"),
    (b"\0asm\x0d\0\x01\0", "not a core WebAssembly module"),
    (PING[:-3], "invalid WebAssembly module"),
    (wat('(memory (export "memory") 1) (func (export "_start") i32.const 1)'),
     "invalid WebAssembly module: type mismatch"),
    (wat('(memory (export "memory") 1)'), "no `_start` function export"),
    (wat('(memory (export "memory") 1) (func (export "_start") (param i32))'),
     "no `_start` function export"),
    (wat('(func (export "_start"))'), "does not export its linear memory as `memory`"),
    (wat('(import "env" "print" (func)) (memory (export "memory") 1) (func (export "_start"))'),
     "imports env.print: only the 'pie' and 'wasi_snapshot_preview1' import modules"),
    (wat('(import "pie" "launch_missiles" (func)) (memory (export "memory") 1) '
         '(func (export "_start"))'), "imports pie.launch_missiles, which does not exist"),
    (wat('(import "pie" "call" (func (param i32))) (memory (export "memory") 1) '
         '(func (export "_start"))'), "does not link against pie-trio"),
    (wat('(import "wasi_snapshot_preview1" "no_such_call" (func)) (memory (export "memory") 1) '
         '(func (export "_start"))'), "does not link against pie-trio"),
])
def test_bad_modules_are_refused_with_a_clear_error(tmp_path, wasm, message):
    store = ProgramStore(tmp_path)
    with pytest.raises(ProgramError) as refused:
        store.add(wasm)
    assert message in str(refused.value)
    assert store.programs() == []  # nothing of it was kept


def test_oversized_upload_is_refused(tmp_path):
    with pytest.raises(ProgramError, match="limit is 100"):
        ProgramStore(tmp_path, max_bytes=100).add(PING)
