"""`run_local` (`pie-trio run PROGRAM --local`): the whole stack in-process, one program, its
events printed for a terminal, and an exit code."""

from __future__ import annotations

import io

import trio
import wasmtime
from test_runtime_support import GUESTS

from pie_trio.cli.local import run_local
from pie_trio.executor.direct import complete
from pie_trio.executor.executor import Executor
from pie_trio.runtime.sandbox import InstanceLimits


def wasm_file(tmp_path, guest: str):
    path = tmp_path / f"{guest}.wasm"
    path.write_bytes(wasmtime.wat2wasm((GUESTS / f"{guest}.wat").read_text()))
    return path


async def run(tmp_path, program, *args, **options) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = await run_local(program, [str(a) for a in args], cache_dir=tmp_path / "cache",
                           out=out, err=err, **options)
    return code, out.getvalue(), err.getvalue()


async def test_a_program_file_runs_and_its_output_is_prefixed(tmp_path, tiny_runner):
    code, out, err = await run(tmp_path, wasm_file(tmp_path, "output"), 0, runner=tiny_runner)
    assert code == 0 and out == ""
    assert err == "[stdout] hello stdout\n[stderr] hello stderr\n[terminated: finished]\n"


async def test_messages_stream_to_stdout_unchanged(tmp_path, tiny_runner):
    prompt = "Once upon a time"
    code, out, err = await run(tmp_path, "text-completion", "--prompt", prompt, "--max-tokens",
                               12, "--ignore-eos", runner=tiny_runner)
    assert code == 0 and err.endswith("[terminated: finished]\n")
    assert "[return]" not in err  # the text was streamed: not repeated
    # The reference on its own executor: the same model and weights, the same greedy tokens.
    async with trio.open_nursery() as nursery:
        executor = Executor(tiny_runner)
        await nursery.start(executor.run)
        tokens = await complete(executor, tiny_runner.tokenizer.encode(prompt), max_tokens=12,
                                owner="reference", ignore_stop=True)
        nursery.cancel_scope.cancel()
    # The streamed text exactly, then the newline that ends the terminal's line.
    assert out == tiny_runner.tokenizer.decode(tokens) + "\n"


async def test_failures_give_their_reason_and_a_nonzero_code(tmp_path, tiny_runner):
    code, _, err = await run(tmp_path, wasm_file(tmp_path, "exit"), 3, runner=tiny_runner)
    assert code == 1 and "[terminated: error (the program exited with code 3)]" in err
    code, _, err = await run(tmp_path, wasm_file(tmp_path, "spin"), runner=tiny_runner,
                             limits=InstanceLimits(cpu_time=0.1))
    assert code == 1 and "[terminated: limit (cpu_time:" in err


async def test_unusable_programs_exit_2(tmp_path, tiny_runner):
    not_wasm = tmp_path / "notes.txt"
    not_wasm.write_text("hello")
    code, _, err = await run(tmp_path, not_wasm, runner=tiny_runner)
    assert code == 2 and "not a WebAssembly module (bad magic)" in err
    code, _, err = await run(tmp_path, tmp_path / "missing.wasm", runner=tiny_runner)
    assert code == 2 and "missing.wasm" in err
