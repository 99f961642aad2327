"""`pie-trio complete` and text streaming.

The CLI tests run `pie_trio.cli.main` in-process on the real model. Loading is the one step they
skip: the session's `real_runner` is exactly what the verb would load (default model, CPU,
bf16), so `load_model` hands that over after checking what it was asked for.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys

import pytest
import trio

from pie_trio import cli
from pie_trio.cli import complete as complete_cli
from pie_trio.executor.direct import TextStream, complete, stream_text
from pie_trio.executor.executor import Executor
from pie_trio.model.calls import AllocPages, Forward, FreePages
from pie_trio.model.tiny import default_tokenizer


def test_text_stream_holds_back_split_characters():
    tokenizer = default_tokenizer()
    text = "Grüße, 東京 and 😀🌍 — ok"
    ids = tokenizer.encode(text)
    token_bytes = tokenizer.token_bytes()
    # the test means something only if some token ends inside a character
    assert any(_not_utf8(token_bytes[i]) for i in ids)
    stream = TextStream(token_bytes)
    pieces = [stream.push(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == text == tokenizer.decode(ids)
    assert all("\ufffd" not in piece for piece in pieces)


async def test_stream_text_spells_what_generate_yields(tiny_runner):
    executor = Executor(tiny_runner)
    prompt = tiny_runner.tokenizer.encode("Once upon a time")
    async with trio.open_nursery() as nursery:
        await nursery.start(executor.run)
        tokens = await complete(executor, prompt, max_tokens=24, owner="a", ignore_stop=True)
        token_bytes = tiny_runner.tokenizer.token_bytes()
        stream = stream_text(executor, token_bytes, prompt, max_tokens=24, owner="a",
                             ignore_stop=True)
        async with contextlib.aclosing(stream):
            pieces = [piece async for piece in stream]
        nursery.cancel_scope.cancel()
    expected = b"".join(token_bytes[t] for t in tokens).decode("utf-8", errors="replace")
    assert "".join(pieces) == expected


def _not_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


def test_help_explains_every_option():
    result = subprocess.run(
        [sys.executable, "-m", "pie_trio", "complete", "--help"],
        capture_output=True, text=True, check=True,
    )
    for option in ("PROMPT", "--chat", "--max-tokens", "--temperature", "--top-p", "--seed",
                   "--device", "--dtype", "--weights", "--model", "greedy", "chat template",
                   "stderr"):
        assert option in result.stdout, option


@pytest.fixture
def cli_model(real_runner, monkeypatch):
    """`load_model` yields the session's real runner, once it checked the arguments."""
    asked = []

    def load_model(model, device, dtype, weights):
        asked.append((model, device, dtype, weights))
        return real_runner

    monkeypatch.setattr(complete_cli, "load_model", load_model)
    return asked


async def greedy_from_scratch(runner, prompt: list[int], max_tokens: int) -> list[int]:
    """A reference that shares nothing with direct.py: each step recomputes the whole context
    in one prefill (no KV reuse, no decode path) and takes the argmax."""
    executor = Executor(runner)
    tokens: list[int] = []
    page = runner.info.page_size
    async with trio.open_nursery() as nursery:
        await nursery.start(executor.run)
        while len(tokens) < max_tokens:
            context = prompt + tokens
            pages = await executor.submit(AllocPages("reference", -(-len(context) // page)))
            result = await executor.submit(Forward(
                owner="reference", kv_pages=pages,
                last_page_len=len(context) - (len(pages) - 1) * page,
                positions=list(range(len(context))), tokens=context,
                output_indices=[len(context) - 1], top_k=1,
            ))
            await executor.submit(FreePages("reference", pages))
            [(best, _)] = result.dists
            if best[0] in runner.info.stop_tokens:
                break
            tokens.append(best[0])
        nursery.cancel_scope.cancel()
    return tokens


@pytest.mark.slow
def test_complete_chat_answers_the_capital_of_france(cli_model, real_runner, capsys):
    code = cli.main(["complete", "--chat", "What is the capital of France?", "--max-tokens",
                     "24", "--device", "cpu", "--dtype", "bf16"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert cli_model == [("default", "cpu", "bfloat16", "auto")]
    assert out == "The capital of France is Paris.\n"
    assert "tokens in" in err and "tok/s" in err

    tokenizer = real_runner.tokenizer
    prompt = tokenizer.encode(
        tokenizer.render_chat([{"role": "user", "content": "What is the capital of France?"}])
    )
    reference = trio.run(greedy_from_scratch, real_runner, prompt, 24)
    assert tokenizer.decode(reference) + "\n" == out


@pytest.mark.slow
def test_complete_seeded_sampling_is_reproducible(cli_model, capsys):
    argv = ["complete", "Once upon a time", "--max-tokens", "6", "--temperature", "0.9",
            "--top-p", "0.95", "--seed", "7"]
    outs = []
    for _ in range(2):
        assert cli.main(argv) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1] and outs[0].strip()


@pytest.mark.slow
@pytest.mark.parametrize(
    "flags, message",
    [
        (["--temperature", "-1"], "temperature"),
        (["--top-p", "0"], "top_p"),
        (["--top-p", "1.5"], "top_p"),
    ],
)
def test_complete_rejects_nonsense_sampling(cli_model, capsys, flags, message):
    assert cli.main(["complete", "Hello", *flags]) == 1
    _, err = capsys.readouterr()
    assert message in err


def test_complete_rejects_negative_max_tokens(capsys):
    assert cli.main(["complete", "Hello", "--max-tokens", "-3"]) == 2
    assert "--max-tokens" in capsys.readouterr().err
