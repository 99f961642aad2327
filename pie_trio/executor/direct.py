"""Direct generation: a plain prompt-in, tokens-out loop over the executor, with no Wasm guest.

`pie-trio complete` uses it, and benchmarks use it as the baseline that shows what
programmability costs. Each generation allocates the KV pages it needs as its context grows,
prefills the prompt (in chunks no larger than the executor's token budget), then decodes one
token per forward. Many generations running at once share forwards through the executor.

`generate` is an async generator: close it deterministically, e.g.

    async with contextlib.aclosing(generate(executor, ids, max_tokens=64, owner="me")) as out:
        async for token in out:
            ...

Its pages are freed when it finishes, fails, is closed early or is cancelled.
"""

from __future__ import annotations

import codecs
import dataclasses
from collections.abc import AsyncGenerator, Iterable, Sequence
from typing import Any

import trio

from pie_trio.executor.executor import Executor
from pie_trio.model.calls import (
    AllocPages,
    CallError,
    Forward,
    ForwardResult,
    FreePages,
    Sampler,
)

GREEDY = Sampler()


async def generate(
    executor: Executor,
    prompt_tokens: Sequence[int],
    *,
    max_tokens: int,
    owner: str,
    sampler: Sampler = GREEDY,
    stop_tokens: Iterable[int] | None = None,
    ignore_stop: bool = False,
    priority: int = 0,
) -> AsyncGenerator[int, None]:
    """Yield up to `max_tokens` generated tokens; stop tokens end the output and are not yielded.

    `stop_tokens` defaults to the model's; `ignore_stop` generates exactly `max_tokens` tokens
    (or until the context is full). A seeded sampler gets a distinct seed per step (seed + step),
    so a seeded generation is reproducible without repeating the same draw at every step.
    Raises `CallError` for a bad request (empty prompt, prompt longer than the context, a
    sampler the runner rejects) or when the executor cannot serve it (out of pages).
    """
    if not isinstance(max_tokens, int) or max_tokens < 0:
        raise CallError(f"max_tokens must be an integer >= 0, got {max_tokens!r}")
    prompt = list(prompt_tokens)
    if not prompt:
        raise CallError("the prompt is empty: give at least one token")
    info = executor.info
    if len(prompt) >= info.max_position:
        raise CallError(
            f"the prompt has {len(prompt)} tokens; the context holds {info.max_position}"
        )
    stops = set() if ignore_stop else set(info.stop_tokens if stop_tokens is None else stop_tokens)
    kv = _KvContext(executor, owner, info.page_size)
    try:
        # The last position is max_position - 1: stop when the context is full.
        budget = min(max_tokens, info.max_position - len(prompt))
        inputs = prompt
        for step in range(budget):
            token = await kv.forward(inputs, _step_sampler(sampler, step), priority)
            if token in stops:
                return
            yield token
            inputs = [token]
    finally:
        with trio.CancelScope(shield=True):  # a cancelled generation still returns its pages
            await kv.release()


async def complete(
    executor: Executor, prompt_tokens: Sequence[int], **kwargs: Any
) -> list[int]:
    """All the tokens `generate` yields, as a list (`kwargs` are `generate`'s)."""
    tokens: list[int] = []
    generator = generate(executor, prompt_tokens, **kwargs)
    try:
        async for token in generator:
            tokens.append(token)
    finally:
        await generator.aclose()
    return tokens


def _step_sampler(sampler: Sampler, step: int) -> Sampler:
    if sampler.seed is None:
        return sampler
    return dataclasses.replace(sampler, seed=(sampler.seed + step) % 2**63)


class _KvContext:
    """One sequence's pages and context length, grown forward by forward."""

    def __init__(self, executor: Executor, owner: str, page_size: int) -> None:
        self.executor = executor
        self.owner = owner
        self.page_size = page_size
        self.pages: list[int] = []
        self.length = 0  # tokens whose KV is stored

    async def forward(self, tokens: list[int], sampler: Sampler, priority: int) -> int:
        """Append `tokens` (in chunks within the executor's budget); the next sampled token."""
        chunk = self.executor.max_batch_tokens
        result: ForwardResult | None = None
        for start in range(0, len(tokens), chunk):
            piece = tokens[start : start + chunk]
            last = start + chunk >= len(tokens)
            await self._reserve(self.length + len(piece))
            call = Forward(
                owner=self.owner,
                kv_pages=list(self.pages),
                last_page_len=self.length + len(piece) - (len(self.pages) - 1) * self.page_size,
                positions=list(range(self.length, self.length + len(piece))),
                tokens=piece,
                output_indices=[len(piece) - 1] if last else [],
                sampler=sampler if last else None,
            )
            result = await self.executor.submit(call, priority)
            self.length += len(piece)
        assert result is not None and result.tokens
        return result.tokens[0]

    async def _reserve(self, length: int) -> None:
        missing = -(-length // self.page_size) - len(self.pages)
        if missing > 0:
            # Recorded before any further checkpoint, so a cancellation cannot leak them.
            self.pages += await self.executor.submit(AllocPages(self.owner, missing))

    async def release(self) -> None:
        pages, self.pages = self.pages, []
        if pages:
            try:
                await self.executor.submit(FreePages(self.owner, pages))
            except CallError:
                pass  # the executor stopped: its pools went with it


class TextStream:
    """Incremental detokenisation: feed tokens, get text as soon as it is whole UTF-8.

    Byte-level tokens may split one character across several tokens; the incremental decoder
    holds the partial bytes back until the character is complete.
    """

    def __init__(self, token_bytes: Sequence[bytes]) -> None:
        self._token_bytes = token_bytes
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token: int) -> str:
        return self._decoder.decode(self._token_bytes[token])

    def flush(self) -> str:
        return self._decoder.decode(b"", final=True)


async def stream_text(
    executor: Executor,
    token_bytes: Sequence[bytes],
    prompt_tokens: Sequence[int],
    **kwargs: Any,
) -> AsyncGenerator[str, None]:
    """Like `generate`, but yields text pieces (never a broken character); `kwargs` are
    `generate`'s."""
    text = TextStream(token_bytes)
    generator = generate(executor, prompt_tokens, **kwargs)
    try:
        async for token in generator:
            if piece := text.push(token):
                yield piece
    finally:
        await generator.aclose()
    if tail := text.flush():
        yield tail
