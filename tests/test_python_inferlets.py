"""Python inferlets (components built with `pie-trio build`) in the runtime: greedy output equal
to the Rust inferlet's and to direct generation on the real model, forks that share KV pages and
advance in one forward batch, the same limits and termination reasons as core modules, the
program cache (compiled once, launched cheaply), and a component uploaded to a server with its
default limits and run with `pie-trio run`.

Building a component takes tens of seconds and compiling it as long again: each example is
built once (cached by the hash of its sources, outside the repository) and compiled once into
a disk program store that outlives the test session.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import blake3
import pytest
import trio
from test_runtime_support import finish, running_stack
from test_server_support import background_server

from pie_trio.cli import main as cli_main
from pie_trio.cli.build import DEFAULT_SDK, DEFAULT_WIT, build
from pie_trio.config import Config
from pie_trio.executor.direct import complete
from pie_trio.executor.policies import make_policy
from pie_trio.model.calls import Sampler
from pie_trio.model.tiny import tiny_runner
from pie_trio.runtime.programs import ProgramStore, default_cache_dir
from pie_trio.runtime.sandbox import InstanceLimits, MiB

pytest.importorskip("componentize_py")

EXAMPLES = Path(__file__).resolve().parent.parent / "inferlets" / "python"
CACHE = default_cache_dir().parent / "test-python-inferlets"
PROGRAMS = ("text_completion", "parallel_generation", "adversarial")


def _sources_hash(source: Path) -> str:
    digest = blake3.blake3(source.read_bytes())
    for path in sorted([*DEFAULT_SDK.rglob("*.py"), *DEFAULT_WIT.rglob("*.wit")]):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def built_path(name: str) -> Path:
    """The component of inferlets/python/NAME.py, built once per change of its sources."""
    source = EXAMPLES / f"{name}.py"
    output = CACHE / f"{name}-{_sources_hash(source)}.wasm"
    if not output.exists():
        output.parent.mkdir(parents=True, exist_ok=True)
        partial = output.with_suffix(f".{os.getpid()}.tmp")
        build(source, partial)
        partial.replace(output)
    return output


def built(name: str) -> bytes:
    return built_path(name).read_bytes()


@pytest.fixture(scope="session")
def python_programs() -> tuple[ProgramStore, dict[str, str]]:
    store = ProgramStore(CACHE / "programs")
    hashes = {name: store.add(built(name)) for name in PROGRAMS}
    return store, hashes


@pytest.mark.slow
async def test_python_text_completion_equals_rust_and_direct_on_the_real_model(
        real_runner, python_programs):
    store, hashes = python_programs
    prompt = "Once upon a time"
    async with running_stack(real_runner, programs=store) as stack:
        reference = await complete(stack.executor, real_runner.tokenizer.encode(prompt),
                                   max_tokens=32, owner="reference")
        python = await finish(await stack.launch(hashes["text_completion"], "--prompt", prompt,
                                                 "--max-tokens", 32))
        rust = await finish(await stack.launch("text-completion", "--prompt", prompt,
                                               "--max-tokens", 32))
        assert stack.controller.stats()["pages_in_use"] == 0
    assert python.reason == "finished", (python.detail, python.text("stderr"))
    assert python.return_value == real_runner.tokenizer.decode(reference)
    assert python.return_value == rust.return_value
    assert python.text("message") == python.return_value


async def test_python_text_completion_on_the_tiny_model_launches_cheaply(python_programs):
    store, hashes = python_programs
    runner = tiny_runner()
    prompt = "Story number one begins when"
    async with running_stack(runner, programs=store) as stack:
        reference = await complete(stack.executor, runner.tokenizer.encode(prompt),
                                   max_tokens=8, owner="reference", ignore_stop=True)
        launches = []
        compiles = store.compiles
        for _ in range(3):
            started = time.perf_counter()
            instance = await stack.launch(hashes["text_completion"], "--prompt", prompt,
                                          "--max-tokens", 8, "--ignore-eos")
            launches.append(time.perf_counter() - started)
            outcome = await finish(instance)
            assert outcome.reason == "finished", (outcome.detail, outcome.text("stderr"))
            assert outcome.return_value == runner.tokenizer.decode(reference)
    print(f"python inferlet launch (warm): {min(launches) * 1000:.1f} ms")
    # Compiled once per program (the fixture's, and the built-in the real-model test
    # launches), never per launch.
    assert store.compiles == compiles and compiles <= len(PROGRAMS) + 1


async def test_python_stop_strings_cut_where_the_rust_sdk_cuts(python_programs):
    """A stop string found in the generated text (decoded from the tokens' bytes in the guest,
    one step ahead): the text stops before it, as the Rust text-completion's does, and what was
    streamed is what is returned."""
    store, hashes = python_programs
    runner = tiny_runner()
    args = ["--prompt", "Story number two begins when", "--max-tokens", 16, "--ignore-eos"]
    async with running_stack(runner, programs=store) as stack:
        free = await finish(await stack.launch("text-completion", *args))
        text = free.return_value
        stop = text[len(text) // 2:len(text) // 2 + 2]
        cut = text.find(stop)
        outcomes = [await finish(await stack.launch(program, *args, "--stop", stop))
                    for program in (hashes["text_completion"], "text-completion")]
    python, rust = outcomes
    assert python.reason == "finished", (python.detail, python.text("stderr")[-1000:])
    assert python.return_value == rust.return_value == text[:cut]
    assert python.text("message") == python.return_value


# About 210 tokens: 13 full KV pages of 16 and a partial one.
LONG_PROMPT = " ".join(f"Chapter {i}: the lighthouse keeper counted ships." for i in range(20))
SHARED_POOL = 32  # pages: enough for forks sharing their prompt, not for copies of it


async def test_python_forks_share_pages_and_advance_in_one_forward_batch(python_programs):
    """parallel_generation.py: N forks of one prefilled prompt hold its full pages once (in a
    pool too small for unshared copies), step together under `gather` (one forward batch of N
    per token), and sample what N unshared generations with the same seeds sample."""
    store, hashes = python_programs
    runner = tiny_runner(num_pages=SHARED_POOL)
    n, max_tokens, seed = 4, 8, 11
    page_size = runner.info.page_size
    prompt_tokens = runner.tokenizer.encode(LONG_PROMPT)
    unshared = n * math.ceil((len(prompt_tokens) + max_tokens) / page_size)
    assert unshared > SHARED_POOL
    # The executor waits (briefly) for N forwards, so batching does not depend on how fast the
    # guest thread submits.
    policy = make_policy("kort", k=n, t=0.2)
    async with running_stack(runner, programs=store, policy=policy) as stack:
        pool = stack.executor.pages
        peak = 0
        allocate = pool.alloc

        def counting_alloc(owner: str, count: int) -> list[int]:
            nonlocal peak
            ids = allocate(owner, count)
            peak = max(peak, pool.num_used)
            return ids

        pool.alloc = counting_alloc  # type: ignore[method-assign]
        forwards = stack.executor.stats.recent_forwards
        forwards.clear()
        outcome = await finish(await stack.launch(
            hashes["parallel_generation"], "--prompt", LONG_PROMPT, "--n", n, "--max-tokens",
            max_tokens, "--temperature", 0.8, "--seed", seed, "--ignore-eos"))
        batches = [len(record.owners) for record in forwards]
        pool.alloc = allocate  # type: ignore[method-assign]
        expected = []
        for i in range(n):
            tokens = await complete(stack.executor, prompt_tokens, max_tokens=max_tokens,
                                    owner="reference", ignore_stop=True,
                                    sampler=Sampler(temperature=0.8, seed=seed + 1000 * i))
            expected.append(runner.tokenizer.decode(tokens))
        assert stack.controller.stats()["pages_in_use"] == 0
    assert outcome.reason == "finished", (outcome.detail, outcome.text("stderr")[-2000:])
    assert json.loads(outcome.return_value) == expected
    messages = [json.loads(e["message"]) for e in outcome.events if e["event"] == "message"]
    assert sorted(m["index"] for m in messages) == list(range(n))
    report = json.loads(outcome.text("stdout").strip().splitlines()[-1])
    print(f"python forks: peak {peak} pages (unshared: {unshared}), forward batches of "
          f"{n}: {batches.count(n)}")
    full_prompt_pages = (len(prompt_tokens) - 1) // page_size  # the prompt but its last token
    assert report["shared_pages"] == full_prompt_pages >= 10
    assert len(report["fork_pages"]) == n
    # The prompt's full pages held once, not once per fork: each fork adds its own last pages.
    assert full_prompt_pages < peak <= full_prompt_pages + 2 * n + 1 < unshared
    # Every token of the N forks (the re-run partial page and each decode step) in one batch.
    assert batches.count(n) >= max_tokens


@pytest.mark.parametrize(("mode", "reason", "limit"), [
    ("loop", "limit", "cpu_time"),
    ("grow", "limit", "memory"),
    ("raise", "error", None),
    ("huge", "limit", "message_size"),
])
async def test_adversarial_python_guests_end_with_the_right_reason(python_programs, mode, reason,
                                                                   limit):
    store, hashes = python_programs
    # Only `loop` is meant to meet the CPU limit: filling 192 MiB with lists took ~0.3 s of
    # CPU alone and over 0.5 s beside another test run, so the others get more.
    limits = InstanceLimits(cpu_time=0.5 if mode == "loop" else 5.0, memory_bytes=192 * MiB)
    async with running_stack(tiny_runner(), programs=store, limits=limits) as stack:
        neighbour = await stack.launch(hashes["adversarial"], "ok")
        outcome = await finish(await stack.launch(hashes["adversarial"], mode))
        beside = await finish(neighbour)
    assert (outcome.reason, outcome.limit) == (reason, limit), (outcome.detail,
                                                                  outcome.text("stderr")[-500:])
    if mode == "raise":
        assert "raised on purpose" in outcome.detail
        assert "Traceback" in outcome.text("stderr")
    assert beside.reason == "finished" and beside.return_value == "ok"


@pytest.mark.parametrize("mode", ["stop-and-go", "shared-queue"])
async def test_python_generations_one_step_ahead_stay_right(python_programs, mode):
    """adversarial.py's well-behaved checks of the streamed generation one step ahead:
    `stop-and-go` gives up its step ahead at a stop token (`discard`) and generating on from
    there matches a free run; `shared-queue` runs two generations on one queue side by side,
    each as it runs alone."""
    store, hashes = python_programs
    async with running_stack(tiny_runner(), programs=store) as stack:
        outcome = await finish(await stack.launch(hashes["adversarial"], mode))
        assert stack.controller.stats()["pages_in_use"] == 0
    assert outcome.reason == "finished", (outcome.detail, outcome.text("stderr")[-1000:])
    assert outcome.return_value == "ok"


async def test_python_lifecycles_leak_nothing(python_programs):
    store, hashes = python_programs
    async with running_stack(tiny_runner(), programs=store) as stack:
        async def one() -> None:
            outcome = await finish(await stack.launch(hashes["adversarial"], "ok"))
            assert outcome.reason == "finished"

        for _ in range(10):
            async with trio.open_nursery() as nursery:
                for _ in range(20):
                    nursery.start_soon(one)
        stats = stack.runtime.stats()
        assert stats["instances"] == 0 and stats["guest_threads"] == 0
        assert stack.controller.stats()["pages_in_use"] == 0
        assert stats["ended"].get("finished") == 200
    assert store.usage()["held"] == 0


def test_a_python_inferlet_uploads_and_runs_with_pie_trio_run(tmp_path, capsys):
    """`pie-trio run FILE.wasm` against a server with the default upload and message limits:
    the ~18 MB component is uploaded over the WebSocket client (in chunks), compiled by the
    server, launched, and its streamed text printed."""
    runner = tiny_runner()
    prompt = "Story number one begins when"
    component = tmp_path / "text_completion.wasm"
    component.write_bytes(built("text_completion"))
    defaults = Config()
    with background_server(runner, max_upload_size=defaults.max_upload_size,
                           max_frame_size=defaults.max_frame_size) as server:
        assert component.stat().st_size < defaults.max_upload_size
        code = cli_main(["run", str(component), "--server", server.addresses.ws, "--",
                         "--prompt", prompt, "--max-tokens", "8", "--ignore-eos"])
    out, err = capsys.readouterr()
    assert code == 0, err
    expected = trio.run(_greedy_text, runner, prompt, 8)
    assert out == expected + ("" if expected.endswith("\n") else "\n")


async def _greedy_text(runner, prompt: str, max_tokens: int) -> str:
    async with running_stack(runner) as stack:
        tokens = await complete(stack.executor, runner.tokenizer.encode(prompt),
                                max_tokens=max_tokens, owner="reference", ignore_stop=True)
    return runner.tokenizer.decode(tokens)
