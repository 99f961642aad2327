"""The served model as instances see it: `model_info`, and the tokenizer ops `tokenize`,
`detokenize` and `vocab`.

Tokenizing is CPU-bound and holds the trio thread, so long texts, long token lists and the
vocabulary run in a worker thread, one at a time; the vocabulary is computed once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import trio

from pie_trio.control.fields import Fields
from pie_trio.model.interface import ModelInfo
from pie_trio.model.tokenizer import Tokenizer

# Tokenizing more than this runs in a worker thread, off the trio thread.
INLINE_TEXT_CHARS = 4096
INLINE_TOKENS = 4096


class ModelView:
    """The model's description and tokenizer, shared by every instance."""

    def __init__(self, info: ModelInfo, tokenizer: Tokenizer):
        self.info = info
        self.tokenizer = tokenizer
        # One tokenizer thread at a time: long texts and the vocabulary are rare and CPU-bound.
        self._limiter = trio.CapacityLimiter(1)
        self._vocab: list[bytes] | None = None

    async def encode(self, text: str) -> list[int]:
        if len(text) <= INLINE_TEXT_CHARS:
            return list(self.tokenizer.encode(text))
        return list(await trio.to_thread.run_sync(self.tokenizer.encode, text,
                                                  limiter=self._limiter))

    async def decode(self, tokens: Sequence[int]) -> str:
        if len(tokens) <= INLINE_TOKENS:
            return self.tokenizer.decode(tokens)
        return await trio.to_thread.run_sync(self.tokenizer.decode, tokens,
                                             limiter=self._limiter)

    def vocab_now(self) -> list[bytes] | None:
        """The vocabulary if `vocab` has computed it already, else None."""
        return self._vocab

    async def vocab(self) -> list[bytes]:
        """The bytes of every token id, computed once in a worker thread."""
        vocab = self._vocab
        if vocab is None:
            vocab = await trio.to_thread.run_sync(self.tokenizer.token_bytes,
                                                  limiter=self._limiter)
            self._vocab = vocab
        return vocab


# -- the ops -----------------------------------------------------------------------------------


class ModelUser(Protocol):
    """What the model and tokenizer ops need of the requesting instance."""

    @property
    def model(self) -> ModelView: ...


def model_info(ctx: ModelUser, f: Fields, priority: int) -> dict[str, Any]:
    info = ctx.model.info
    return {
        "name": info.name,
        "page_size": info.page_size,
        "vocab_size": info.vocab_size,
        "stop_tokens": list(info.stop_tokens),
        "chat_template": info.chat_template,
        "bos_token": info.bos_token,
        "eos_token": info.eos_token,
        "max_position": info.max_position,
    }


async def tokenize(ctx: ModelUser, f: Fields, priority: int) -> list[int]:
    return await ctx.model.encode(f.text("text"))


async def detokenize(ctx: ModelUser, f: Fields, priority: int) -> str:
    # The tokenizer has no range check of its own (and no executor call is involved), so the
    # ids are checked against the vocabulary here.
    vocab_size = ctx.model.info.vocab_size
    tokens = f.int_list("tokens", low=0)
    for i, token in enumerate(tokens):
        if token >= vocab_size:
            raise f.error(f"field 'tokens'[{i}] = {token} is not below the vocabulary size "
                          f"{vocab_size}")
    return await ctx.model.decode(tokens)


async def vocab(ctx: ModelUser, f: Fields, priority: int) -> list[bytes]:
    return await ctx.model.vocab()
