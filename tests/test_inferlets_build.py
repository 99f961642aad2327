"""The Rust inferlets (inferlets/): the shipped built-in modules are exactly what the sources
build to with Debian's offline toolchain (as CI installs it), they are well-formed guests, and
they behave on the real runtime stack: text-completion is token for token the host's own
generation loop, forks and a width-1 beam follow the greedy path, the SDK's self-check passes,
and the adversarial guests misbehave the way docs/sdk.md says.

Building needs the Debian toolchain; those tests skip with the reason when it is absent. The
built-ins are committed, so the tests that only run them need no toolchain."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import trio
import wasmtime
from test_runtime_support import finish, running_stack

from pie_trio.executor.direct import complete
from pie_trio.model.calls import Sampler
from pie_trio.runtime.sandbox import InstanceLimits, MiB

ROOT = Path(__file__).resolve().parent.parent
BUILD_SCRIPT = ROOT / "scripts" / "build_inferlets.py"
BUILTIN_DIR = ROOT / "pie_trio" / "builtin"


def _load_build_script():
    spec = importlib.util.spec_from_file_location("build_inferlets", BUILD_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    return module


build_inferlets = _load_build_script()

# The ABI's host functions and their core-wasm signatures (docs/abi.md).
PIE_FUNCTIONS = {
    "call": (["i32"] * 4, ["i32"]),
    "submit": (["i32"] * 2, ["i32"]),
    "wait": (["i32"] * 3, ["i32"]),
    "take": (["i32"] * 3, ["i32"]),
    "fetch": (["i32"] * 2, ["i32"]),
}


def _skip_without_toolchain() -> None:
    missing = build_inferlets.debian_toolchain_missing()
    if missing:
        pytest.skip("Debian's wasm32 Rust toolchain is absent: " + "; ".join(missing))


@pytest.fixture(scope="module")
def built_modules() -> dict[str, Path]:
    """Every example built into inferlets/target/wasm (incremental after the first build)."""
    _skip_without_toolchain()
    return build_inferlets.build(build_inferlets.debian_toolchain(), log=lambda _: None)


@pytest.mark.slow
def test_shipped_builtins_match_a_fresh_build():
    _skip_without_toolchain()
    result = subprocess.run(
        [sys.executable, str(BUILD_SCRIPT), "--check"], capture_output=True, text=True,
        timeout=1800,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "match a fresh build" in result.stdout


def _assert_well_formed_guest(path: Path) -> None:
    module = wasmtime.Module.from_file(wasmtime.Engine(), str(path))
    for item in module.imports:
        assert item.module in ("pie", "wasi_snapshot_preview1"), (path.name, item.module)
        if item.module == "pie":
            signature = ([str(t) for t in item.type.params], [str(t) for t in item.type.results])
            assert PIE_FUNCTIONS.get(item.name) == signature, (path.name, item.name, signature)
    exports = {item.name: item.type for item in module.exports}
    assert isinstance(exports.get("memory"), wasmtime.MemoryType), path.name
    start = exports.get("_start")
    assert isinstance(start, wasmtime.FuncType), path.name
    assert not start.params and not start.results


@pytest.mark.parametrize("name", build_inferlets.BUILTINS)
def test_shipped_modules_are_well_formed_guests(name):
    _assert_well_formed_guest(BUILTIN_DIR / f"{name}.wasm")


def test_built_examples_are_well_formed_guests(built_modules):
    assert set(build_inferlets.BUILTINS) < set(built_modules)
    for path in built_modules.values():
        _assert_well_formed_guest(path)


def test_build_errors_are_clear_without_a_toolchain(monkeypatch, capsys):
    monkeypatch.setattr(build_inferlets, "DEBIAN_RUSTC", Path("/nonexistent/rustc"))
    assert build_inferlets.main(["--check"]) == 2
    assert "needs the Debian toolchain" in capsys.readouterr().err


async def _run(stack, program: str, *args) -> tuple:
    outcome = await finish(await stack.launch(program, *args))
    messages = [e["message"] for e in outcome.events if e["event"] == "message"]
    return outcome, messages


SEEDED = ["--temperature", "0.8", "--top-p", "0.9", "--seed", "5"]


@pytest.mark.parametrize("sampling", [[], SEEDED], ids=["greedy", "seeded"])
async def test_text_completion_is_the_host_generation_loop(tiny_runner, sampling):
    """Prompt in one forward, one token per forward, sampled on the host: the same tokens as
    the executor's own loop (a seed advances per step the same way), streamed in pieces."""
    prompt = "Once upon a time"
    sampler = Sampler(temperature=0.8, top_p=0.9, seed=5) if sampling else Sampler()
    async with running_stack(tiny_runner) as stack:
        reference = await complete(stack.executor, tiny_runner.tokenizer.encode(prompt),
                                   max_tokens=24, owner="reference", sampler=sampler,
                                   ignore_stop=True)
        outcome, messages = await _run(stack, "text-completion", "--prompt", prompt,
                                       "--max-tokens", 24, "--ignore-eos", *sampling)
    assert outcome.reason == "finished", outcome.detail
    assert outcome.return_value == tiny_runner.tokenizer.decode(reference)
    assert "".join(messages) == outcome.return_value
    assert len(messages) > 3  # streamed, not one blob


async def test_text_completion_stops_at_the_earliest_of_several_stop_strings(tiny_runner):
    """`--stop` given several times: the text ends right before the earliest match of any of
    them (whatever their order), and the stop string is neither streamed nor returned."""
    prompt = "Once upon a time"
    async with running_stack(tiny_runner) as stack:
        reference = await complete(stack.executor, tiny_runner.tokenizer.encode(prompt),
                                   max_tokens=24, owner="reference", ignore_stop=True)
        full = tiny_runner.tokenizer.decode(reference)
        early, late = full[4:7], full[10:13]
        assert early.strip() and late.strip(), f"the tiny model's text is too short: {full!r}"
        outcome, messages = await _run(stack, "text-completion", "--prompt", prompt,
                                       "--max-tokens", 24, "--ignore-eos", "--stop", late,
                                       "--stop=\u2603 never said", "--stop", early)
    expected = full[:min(full.find(early), full.find(late))]
    assert outcome.reason == "finished", outcome.detail
    assert outcome.return_value == expected
    assert "".join(messages) == expected


async def test_text_completion_reports_bad_arguments(tiny_runner):
    async with running_stack(tiny_runner) as stack:
        outcome, _ = await _run(stack, "text-completion", "--max-tokens", "many", "Hi")
    assert outcome.reason == "error"
    assert "--max-tokens" in outcome.text("stderr") and "many" in outcome.text("stderr")


async def test_forks_and_a_width_one_beam_follow_the_greedy_path(tiny_runner):
    prompt = "The quick brown fox jumps over the lazy dog because"
    async with running_stack(tiny_runner) as stack:
        reference = await complete(stack.executor, tiny_runner.tokenizer.encode(prompt),
                                   max_tokens=12, owner="reference", ignore_stop=True)
        expected = tiny_runner.tokenizer.decode(reference)
        common = ["--max-tokens", 12, "--ignore-eos", "--prompt", prompt]
        parallel, messages = await _run(stack, "parallel-generation", "--n", 3,
                                        "--temperature", 0, *common)
        narrow, _ = await _run(stack, "beam-search", "--beam-width", 1, *common)
        wide, wide_messages = await _run(stack, "beam-search", "--beam-width", 3, *common)
        stats = stack.controller.stats()
    assert parallel.reason == narrow.reason == wide.reason == "finished"
    assert json.loads(parallel.return_value) == [expected] * 3
    assert sorted(json.loads(m)["index"] for m in messages) == [0, 1, 2]
    assert narrow.return_value == expected
    best = json.loads(wide_messages[-1])
    assert best["text"] == wide.return_value and 0 < best["tokens"] <= 12 and best["score"] < 0
    assert stats["pages_in_use"] == 0 and stats["exports"] == 0


async def test_sdk_self_check(tiny_runner, built_modules):
    """Fork, export/import, masks and dropped pages, embeddings, messaging, the store, queues,
    submit/wait and stop conditions, each checked by the guest against the host."""
    async with running_stack(tiny_runner) as stack:
        program = stack.runtime.programs.add(built_modules["adversarial"].read_bytes())
        outcome, messages = await _run(stack, program, "sdk-check")
        stats = stack.controller.stats()
    assert outcome.reason == "finished", outcome.text("stderr") or outcome.detail
    assert outcome.return_value == f"ok: {len(messages)} checks" and len(messages) >= 10
    assert stats["pages_in_use"] == 0 and stats["slots_in_use"] == 0
    assert stats["exports"] == 0 and stats["store_keys"] == 0


ADVERSARIES = [
    # (arguments, reason, limit, text expected in the detail or the return value)
    (["forge-page"], "finished", None, "refused: forward, free_pages, share_pages"),
    (["bad-request"], "finished", None, "refused: not msgpack, not a map, no op, unknown op"),
    (["trap-mid-generate", "2"], "trap", None, ""),
    (["submit-flood", "10"], "finished", None, "submitted 10"),
    (["submit-flood", "500", "forward"], "limit", "outstanding", ""),
    (["giant-message", "5"], "limit", "message_size", ""),
    (["memory-bomb"], "trap", None, ""),
    (["spin"], "limit", "cpu_time", ""),
    (["oob-request"], "trap", None, "out-of-bounds"),
    (["oob-response"], "trap", None, "out-of-bounds"),
    (["unknown-handle"], "trap", None, "unknown handle"),
    (["fetch-empty"], "trap", None, "fetch"),
    (["exit", "7"], "error", None, "7"),
]


async def test_adversarial_guests_do_what_they_say(tiny_runner, built_modules):
    limits = InstanceLimits(cpu_time=0.2, memory_bytes=32 * MiB, max_outstanding=64)
    async with running_stack(tiny_runner, limits=limits) as stack:
        program = stack.runtime.programs.add(built_modules["adversarial"].read_bytes())
        outcomes = {}

        async def run(args: list[str]) -> None:
            outcomes[" ".join(args)] = await _run(stack, program, *args)

        async with trio.open_nursery() as nursery:  # side by side: no one harms the others
            for args, *_ in ADVERSARIES:
                nursery.start_soon(run, args)
        stats = stack.controller.stats()
    for args, reason, limit, text in ADVERSARIES:
        outcome, messages = outcomes[" ".join(args)]
        said = outcome.detail + (outcome.return_value or "")
        assert (outcome.reason, outcome.limit) == (reason, limit), (args, outcome.detail)
        assert text in said, (args, said)
    trapped, messages = outcomes["trap-mid-generate 2"]
    assert len(messages) == 2 and "deliberate trap" in trapped.text("stderr")
    assert stats["pages_in_use"] == 0 and stats["instances"] == 0


@pytest.mark.slow
async def test_chat_prompt_renders_like_the_model_template(real_runner):
    """`--chat` renders ChatML with the template's default system prompt, as jinja does."""
    question = "What is the capital of France?"
    rendered = real_runner.tokenizer.render_chat([{"role": "user", "content": question}])
    async with running_stack(real_runner) as stack:
        reference = await complete(stack.executor, real_runner.tokenizer.encode(rendered),
                                   max_tokens=16, owner="reference")
        outcome, _ = await _run(stack, "text-completion", "--chat", "--max-tokens", 16, question)
    assert outcome.return_value == real_runner.tokenizer.decode(reference)
    assert outcome.return_value == "The capital of France is Paris."
