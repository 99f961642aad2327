"""A context: a token sequence and the KV pages that hold it (the Rust SDK's `Context`).

Tokens are *pending* until a forward pass writes them into the KV cache. A step runs every
pending token through one forward pass and, when asked, samples the next token (which becomes
pending) or returns the distribution. Pages are allocated as the KV grows; `fork` shares the
full pages with the child (copy-on-write on the host) and re-runs the partial page's tokens.
"""

from __future__ import annotations

import codecs
import itertools
from dataclasses import dataclass
from typing import Any

from inferlet import wire
from inferlet.host import Pending, discard, request
from inferlet.model import Model, Queue, Sampler, StopCondition, tokenize
from inferlet.runtime import send, store_delete, store_get, store_set

Slot = tuple[int, int, bool]  # token, position, masked

# A step ahead (`feed`) reads the latest forward on its queue, whoever submitted it. So a
# context goes one step ahead only while that forward is its own step: per queue id, the serial
# of the context that submitted the latest forward on it.
_serials = itertools.count(1)
_latest_forward: dict[int, int] = {}


@dataclass
class _Step:
    """A forward submitted and not finished yet: how many pending tokens it writes."""

    consumed: int
    forward: Pending


@dataclass
class Generated:
    tokens: list[int]
    text: str
    finish: str  # "max_tokens", "stop_token" or "stop_string"


class Context:
    def __init__(self, model: Model, queue: Queue):
        self.model = model
        self.queue = queue
        self.page_size = model.page_size
        self.pages: list[int] = []
        self.kv: list[Slot] = []
        self.pending: list[Slot] = []
        self.next_position = 0
        self._serial = next(_serials)

    # -- tokens ---------------------------------------------------------------------------

    async def fill(self, text: str) -> None:
        self.fill_tokens(await tokenize(text))

    def fill_tokens(self, tokens: list[int]) -> None:
        for token in tokens:
            self.fill_token(token)

    def fill_token(self, token: int) -> None:
        self.pending.append((token, self.next_position, False))
        self.next_position += 1

    def tokens(self) -> list[int]:
        return [token for token, _, masked in self.kv + self.pending if not masked]

    def used_pages(self) -> list[int]:
        return self.pages[:-(-len(self.kv) // self.page_size)]

    # -- forward passes -------------------------------------------------------------------

    async def flush(self) -> None:
        """Write all pending tokens but the last into the KV cache (the last one is the input
        of the next step)."""
        if len(self.pending) >= 2:
            await self._forward(len(self.pending) - 1, None)

    async def step(self, sampler: Sampler | None = None, top_k: int = 0,
                   vocab_mask: bytes | None = None,
                   logit_bias: dict[int, float] | None = None,
                   token_bytes: bool = False) -> dict[str, Any]:
        """One forward pass over every pending token; the `forward` op's answer (with
        `token_bytes`, the sampled token's bytes too)."""
        if not self.pending:
            raise ValueError("nothing to decode: fill at least one token first")
        options: dict[str, Any] = {"top_k": top_k}
        if sampler is not None:
            options["sampler"] = sampler.to_wire()
            if token_bytes:
                options["token_bytes"] = True
        if vocab_mask is not None:
            options["vocab_mask"] = bytes(vocab_mask)
        if logit_bias:
            options["logit_bias"] = dict(logit_bias)
        output = await self._forward(len(self.pending), options)
        if sampler is not None:
            self.fill_token(output["tokens"][0])
        return output

    async def decode_step(self, sampler: Sampler) -> int:
        """Sample the next token (it becomes pending); the token."""
        output = await self.step(sampler)
        return int(output["tokens"][0])

    async def next_dist(self, top_k: int) -> tuple[list[int], list[float]]:
        output = await self.step(top_k=top_k)
        ids, probs = output["dists"][0]
        return list(ids), list(probs)

    async def _forward(self, consumed: int, options: dict[str, Any] | None) -> dict[str, Any]:
        return await self._finish(await self._submit(consumed, options))

    async def _submit(self, consumed: int, options: dict[str, Any] | None) -> _Step:
        """The forward of the first `consumed` pending tokens, submitted."""
        inputs = self.pending[:consumed]
        fields = await self._layout(len(self.kv) + consumed)
        fields["positions"] = [position for _, position, _ in inputs]
        fields["tokens"] = [token for token, _, _ in inputs]
        if options is not None:
            fields["outputs"] = [consumed - 1]
            fields.update(options)
        return self._send(consumed, fields)

    async def _submit_ahead(self, options: dict[str, Any]) -> _Step | None:
        """The step after a submitted one that forwards every pending token and samples: it
        reads the token that one samples (the forward's `feed`), filled at `next_position`.
        None, with nothing submitted, once another context's forward is the latest on the
        queue (the step ahead would read that one's token)."""
        fields = await self._layout(len(self.kv) + len(self.pending) + 1)
        if _latest_forward.get(self.queue.id) != self._serial:
            return None
        fields.update(positions=[self.next_position], tokens=[], feed=True, outputs=[0])
        fields.update(options)
        return self._send(1, fields)

    def _send(self, consumed: int, fields: dict[str, Any]) -> _Step:
        step = _Step(consumed, request("forward", **fields))
        _latest_forward[self.queue.id] = self._serial
        return step

    async def _layout(self, new_len: int) -> dict[str, Any]:
        """The queue and pages of a forward that grows the KV to `new_len` (allocating)."""
        needed = -(-new_len // self.page_size)
        if len(self.pages) < needed:
            self.pages += await request("alloc_pages", count=needed - len(self.pages))
        return {"queue": self.queue.id, "pages": self.pages[:needed],
                "last_page_len": new_len - (needed - 1) * self.page_size}

    async def _finish(self, step: _Step) -> dict[str, Any]:
        """Wait for a submitted forward and move its inputs into the KV (steps finish in the
        order submitted, so they are the first pending tokens by then)."""
        output: dict[str, Any] = await step.forward
        inputs = self.pending[:step.consumed]
        del self.pending[:step.consumed]
        self.kv += inputs
        return output

    # -- generation -----------------------------------------------------------------------

    async def generate(self, sampler: Sampler, stop: StopCondition,
                       stream: bool = False) -> Generated:
        """Decode until `stop`; with `stream`, each new piece of text is sent to the client.

        Each sampled token comes with its bytes (the forward's `token_bytes`), so the text is
        decoded, and stop strings are looked for, here: a token costs its forward (and, when
        streaming, one `send`), with no round trip of its own. Text that may be the start of a
        stop string is held back until the next tokens tell. Each step is submitted one step
        ahead (as the Rust SDK's `generate`): while this waits for a token, the forward that
        reads it is in already (`feed`), and the host runs it in the next tick. Past a stop
        token or string that step is discarded, not waited for (it writes only the pending
        token's KV row, which the next forward after it on the queue writes again)."""
        if not self.pending:
            raise ValueError("nothing to decode: fill at least one token first")
        tokens: list[int] = []
        text = ""
        sent = 0  # characters of `text` sent
        decoder = codecs.getincrementaldecoder("utf-8")("replace")  # holds a partial character
        finish = "max_tokens"
        ahead: _Step | None = None
        try:
            while len(tokens) < stop.max_tokens:
                current = ahead or await self._submit(
                    len(self.pending), _sample(sampler.for_step(len(tokens))))
                ahead = None
                if len(tokens) + 1 < stop.max_tokens:
                    ahead = await self._submit_ahead(_sample(sampler.for_step(len(tokens) + 1)))
                output = await self._finish(current)
                token = int(output["tokens"][0])
                self.fill_token(token)
                if token in stop.stop_tokens:
                    finish = "stop_token"
                    break
                tokens.append(token)
                text, cut = _extend(text, decoder.decode(output["bytes"][0]), stop.stop_strings)
                if cut:
                    finish = "stop_string"
                    break
                if stream:
                    sent = await _send_stable(text, sent, stop.stop_strings)
        finally:
            if ahead is not None:  # a step ahead of the end: given up without waiting
                discard(ahead.forward)
        if finish != "stop_string":
            text, cut = _extend(text, decoder.decode(b"", final=True), stop.stop_strings)
            finish = "stop_string" if cut else finish
        if stream and len(text) > sent:
            await send(text[sent:])
        return Generated(tokens, text, finish)

    # -- sharing --------------------------------------------------------------------------

    async def fork(self, queue: Queue | None = None) -> Context:
        """A child with the same tokens: the full pages shared, the partial page's tokens
        pending again."""
        full = len(self.kv) // self.page_size
        child = Context(self.model, queue or self.queue)
        if full:
            child.pages = list(await request("share_pages", pages=self.pages[:full]))
        child.kv = self.kv[:full * self.page_size]
        child.pending = [s for s in self.kv[full * self.page_size:] if not s[2]] + self.pending
        child.next_position = self.next_position
        return child

    async def mask_tokens(self, start: int, end: int, masked: bool = True) -> None:
        """Hide (or show again) KV tokens [start, end) from attention."""
        if end > len(self.kv) or start > end:
            raise ValueError(f"cannot mask tokens {start}..{end}: the KV cache holds "
                             f"{len(self.kv)} (flush first)")
        size = self.page_size
        while start < end:
            page = start // size
            stop = min(end, (page + 1) * size)
            await request("mask_kv", queue=self.queue.id, page=self.pages[page],
                          slots=[i - page * size for i in range(start, stop)], masked=masked)
            for i in range(start, stop):
                token, position, _ = self.kv[i]
                self.kv[i] = (token, position, masked)
            start = stop

    async def export(self, name: str, persistent: bool = False) -> None:
        """Export the KV pages under `name` and the context's state to the store."""
        await request("export_pages", name=name, pages=self.used_pages(),
                      persistent=persistent)
        state = {"page_size": self.page_size, "kv": self.kv, "pending": self.pending,
                 "next_position": self.next_position}
        await store_set(_state_key(name), wire.pack(state).hex())

    @classmethod
    async def import_(cls, model: Model, name: str, queue: Queue | None = None) -> Context:
        text = await store_get(_state_key(name))
        if text is None:
            raise ValueError(f"no context state was exported as {name!r}")
        state = wire.unpack(bytes.fromhex(text))
        if state["page_size"] != model.page_size:
            raise ValueError(f"context {name!r} was exported with another page size")
        ctx = cls(model, queue or Queue(0))
        ctx.pages = list(await request("import_pages", name=name))
        ctx.kv = [tuple(slot) for slot in state["kv"]]  # type: ignore[misc]
        ctx.pending = [tuple(slot) for slot in state["pending"]]  # type: ignore[misc]
        ctx.next_position = state["next_position"]
        # The partial page is shared too: re-run its tokens into a page of our own.
        full = len(ctx.kv) // ctx.page_size
        if len(ctx.pages) > full:
            await request("free_pages", pages=ctx.pages[full:])
            del ctx.pages[full:]
        ctx.pending = [s for s in ctx.kv[full * ctx.page_size:] if not s[2]] + ctx.pending
        del ctx.kv[full * ctx.page_size:]
        return ctx

    async def fill_cached(self, tokens: list[int]) -> int:
        """Fill `tokens` into this empty context, reusing the full pages of them that the
        host's prefix cache holds (shared, copy-on-write), prefill the rest as `flush` does,
        and offer the context's full pages to the cache; how many tokens were reused."""
        if self.pages or self.kv or self.pending or self.next_position:
            raise ValueError("fill_cached needs an empty context at position 0")
        found = await request("prefix_match", tokens=list(tokens))
        reused = int(found["tokens"])
        self.pages = list(found["pages"])
        self.kv = [(token, position, False) for position, token in enumerate(tokens[:reused])]
        self.next_position = reused
        self.fill_tokens(list(tokens[reused:]))
        await self.flush()
        full = len(self.kv) // self.page_size
        if full:
            await request("prefix_store", tokens=[t for t, _, _ in self.kv[:full * self.page_size]],
                          pages=self.pages[:full])
        return reused

    @staticmethod
    async def unexport(name: str) -> None:
        await store_delete(_state_key(name))
        await request("unexport", name=name)

    async def free(self) -> None:
        """Give the pages back now (the host frees them at exit anyway)."""
        pages, self.pages = self.pages, []
        if pages:
            await request("free_pages", pages=pages)


def _state_key(name: str) -> str:
    return f"inferlet.context.py:{name}"


def _extend(text: str, piece: str, stops: list[str]) -> tuple[str, bool]:
    """`text` + `piece`, cut before the earliest stop string in it, and whether one was found.
    Only where a match could end in `piece` is looked at (earlier text was looked at before)."""
    joined = text + piece
    found = [at for stop in stops if stop
             and (at := joined.find(stop, max(0, len(text) - len(stop) + 1))) >= 0]
    return (joined[:min(found)], True) if found else (joined, False)


async def _send_stable(text: str, sent: int, stops: list[str]) -> int:
    """Send what `text` has beyond its first `sent` characters and cannot be taken back (see
    `_stable`); how many characters are sent now."""
    ready = _stable(text, stops)
    if len(ready) > sent:
        await send(ready[sent:])
        return len(ready)
    return sent


def _stable(text: str, stops: list[str]) -> str:
    """The text that can be sent: not an incomplete character, nor a possible stop prefix."""
    text = text.rstrip("\ufffd")
    hold = 0
    for stop in stops:
        for length in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:length]):
                hold = max(hold, length)
                break
    return text[:len(text) - hold]


def _sample(sampler: Sampler) -> dict[str, Any]:
    """A step's options: sample with `sampler`, and return the token's bytes."""
    return {"top_k": 0, "sampler": sampler.to_wire(), "token_bytes": True}
