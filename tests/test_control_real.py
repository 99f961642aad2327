"""Forked contexts on the real SmolLM2-135M-Instruct, through the control layer: copy-on-write
keeps each fork's text what it would be without sharing."""

from __future__ import annotations

import math

import pytest
import trio
from control_support import ok

from pie_trio.control.controller import Controller
from pie_trio.control.instance import InstanceControl
from pie_trio.executor.executor import Executor

pytestmark = pytest.mark.slow


async def greedy(ctl: InstanceControl, pages: list[int], length: int, tokens: list[int],
                 steps: int, page_size: int) -> list[int]:
    """Append `tokens` to the context in `pages`, then decode `steps` greedy tokens."""
    out: list[int] = []
    for _ in range(steps):
        new_length = length + len(tokens)
        missing = math.ceil(new_length / page_size) - len(pages)
        if missing > 0:
            pages += await ok(ctl, "alloc_pages", count=missing)
        value = await ok(ctl, "forward", pages=pages,
                         last_page_len=new_length - (len(pages) - 1) * page_size,
                         positions=list(range(length, new_length)), tokens=tokens,
                         outputs=[len(tokens) - 1], sampler={})
        length, tokens = new_length, value["tokens"]
        out += tokens
    return out


async def test_forks_on_the_real_model_continue_like_unshared_contexts(real_runner):
    async with trio.open_nursery() as nursery:
        executor = Executor(real_runner)
        await nursery.start(executor.run)
        controller = Controller(executor, real_runner.info, real_runner.tokenizer)
        await nursery.start(controller.run)
        ctl = controller.attach("story")
        ps = controller.info.page_size
        prompt = await ok(ctl, "tokenize", text="Once upon a time")
        endings = [await ok(ctl, "tokenize", text=t) for t in (",", " there")]

        async def continue_all(contexts: list[tuple[list[int], int]]) -> list[str]:
            texts = ["", ""]

            async def one(i: int) -> None:
                pages, length = contexts[i]
                tokens = await greedy(ctl, pages, length, endings[i], 8, ps)
                texts[i] = await ok(ctl, "detokenize", tokens=endings[i] + tokens)

            async with trio.open_nursery() as inner:
                for i in range(2):
                    inner.start_soon(one, i)
            return texts

        async def prefilled() -> list[int]:
            pages = await ok(ctl, "alloc_pages", count=math.ceil(len(prompt) / ps))
            await ok(ctl, "forward", pages=pages, last_page_len=len(prompt) - (len(pages) - 1) * ps,
                     positions=list(range(len(prompt))), tokens=prompt)
            return pages

        shared = await prefilled()
        forked = await continue_all([(shared, len(prompt)),
                                     (await ok(ctl, "share_pages", pages=shared), len(prompt))])
        unshared = await continue_all([(await prefilled(), len(prompt)),
                                       (await prefilled(), len(prompt))])
        assert forked == unshared
        assert forked[0].startswith(", the city of Nova Haven")
        await ctl.close()
        assert controller.stats()["pages_in_use"] == 0
        nursery.cancel_scope.cancel()
