"""Grammar-constrained decoding: compiled grammars, shared and cached by content, and each
instance's matchers, over llguidance (the library vLLM and SGLang use).

A grammar — a JSON Schema, a regular expression or a Lark (EBNF) grammar — is compiled once
into a *prototype* matcher at its start state; a guest's matcher is a deep copy of it, which
shares the compiled lexer and parser tables and costs microseconds. `GrammarCompiler` owns the
llguidance tokenizer (built once from the model's) and a bounded cache keyed by the grammar's
content hash, so the same schema sent by many instances compiles once. Compiling can take a
while for big grammars, so it runs in a worker thread; a matcher's next-token mask is tens of
microseconds and is computed on the trio thread, right before its forward is submitted.

The `forward` op names a matcher in its sampler (inference.py): control fills the call's
vocabulary mask from the matcher, the model applies it inside the batched forward, and the
sampled token advances the matcher when the result comes back. So constrained decoding costs no
extra guest crossing per token. A matcher admits the model's stop tokens only where the grammar
may end; it is *done* once the grammar accepts nothing more (or it took a stop token).

`InstanceGrammars` is one instance's grammars and matchers under virtual ids (never reused, as
for pages), bounded in number and dropped when the instance closes.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import llguidance
import trio

from pie_trio.control.fields import ControlError, Fields
from pie_trio.model.tokenizer import Tokenizer

if TYPE_CHECKING:  # a TypedDict that only llguidance's type stub defines
    from llguidance._lib import JsonCompileOptions

KINDS = ("json_schema", "regex", "lark")

# JSON is generated compact-but-readable (`{"a": 1, "b": [2, 3]}`) unless the schema's own
# "x-guidance" says otherwise: free whitespace lets a small model pad forever with newlines.
JSON_DEFAULTS: JsonCompileOptions = {
    "whitespace_flexible": False,
    "item_separator": ", ",
    "key_separator": ": ",
}


class GrammarError(ControlError):
    """A grammar did not compile; the message names its kind and llguidance's reason."""


@dataclass(frozen=True)
class CompiledGrammar:
    kind: str
    key: str  # content hash: what the cache is keyed by
    prototype: llguidance.LLMatcher  # at the start state; never advanced, only copied


class Matcher:
    """One sequence's position in a grammar."""

    def __init__(self, grammar: CompiledGrammar, vocab_size: int):
        self.grammar = grammar
        self._state = grammar.prototype.deep_copy()
        self._mask_bytes = (vocab_size + 7) // 8
        self.busy = False  # a forward naming it is in flight

    @property
    def done(self) -> bool:
        """Whether the grammar accepts no further token but a stop token (or took one)."""
        return self._state.is_stopped()

    def mask(self) -> bytes:
        """The allowed next tokens as a packed bitmask (bit t % 8 of byte t // 8)."""
        self._check_usable()
        # llguidance packs 32-bit little-endian words, which read as bytes are this layout.
        return self._state.compute_bitmask()[: self._mask_bytes]

    def advance(self, token: int) -> bool:
        """Take the sampled `token`; whether the matcher is done now."""
        if not self._state.consume_token(token):
            raise ControlError(f"the grammar refused token {token}: {self._error()}")
        return self.done

    def consume(self, tokens: Sequence[int]) -> int:
        """Take as many of `tokens` as the grammar allows; how many it took."""
        self._check_usable()
        return self._state.try_consume_tokens(list(tokens))

    def _check_usable(self) -> None:
        if self._state.is_error():
            raise ControlError(f"the matcher failed: {self._error()}")

    def _error(self) -> str:
        return self._state.get_error() or "no further token is allowed"


class GrammarCompiler:
    """The compiled-grammar cache every instance shares, and the model's llguidance tokenizer.

    The tokenizer is built on the first compile (about a second, in the worker thread), so a
    server whose guests never constrain pays nothing. Compiles run in worker threads, at most
    `threads` at a time; the same content compiled twice at once may compile twice, and the
    cache keeps one.
    """

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, stop_tokens: Sequence[int], *,
                 cache_size: int = 64, max_source_bytes: int = 256 << 10, threads: int = 2):
        self.vocab_size = vocab_size
        self.cache_size = cache_size
        self.max_source_bytes = max_source_bytes
        self._tokenizer = tokenizer
        self._stop_tokens = list(stop_tokens)
        self._ll_tokenizer: llguidance.LLTokenizer | None = None
        self._tokenizer_lock = trio.Lock()
        self._limiter = trio.CapacityLimiter(threads)
        self._cache: OrderedDict[str, CompiledGrammar] = OrderedDict()
        self._limits = llguidance.LLParserLimits(verbose_errors=False)

    def __len__(self) -> int:
        return len(self._cache)

    async def compile(self, kind: str, source: str) -> CompiledGrammar:
        """The compiled grammar for `source`, from the cache or compiled now."""
        if kind not in KINDS:
            raise ControlError(f"unknown grammar kind {kind!r}; expected one of {list(KINDS)}")
        if len(source.encode()) > self.max_source_bytes:
            raise GrammarError(f"the {kind} source is larger than {self.max_source_bytes} bytes")
        key = hashlib.blake2b(f"{kind}\0{source}".encode(), digest_size=16).hexdigest()
        cached = self._cache.get(key)
        if cached is None:
            tokenizer = await self.ll_tokenizer()
            prototype = await trio.to_thread.run_sync(
                self._build, tokenizer, kind, source, limiter=self._limiter,
                abandon_on_cancel=True)
            cached = CompiledGrammar(kind, key, prototype)
            self._cache[key] = cached
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)  # grammars in use stay alive through their users
        self._cache.move_to_end(key)
        return cached

    async def ll_tokenizer(self) -> llguidance.LLTokenizer:
        """llguidance's view of the model's tokenizer, built once in a worker thread."""
        async with self._tokenizer_lock:
            if self._ll_tokenizer is None:
                self._ll_tokenizer = await trio.to_thread.run_sync(
                    self._build_tokenizer, limiter=self._limiter)
            return self._ll_tokenizer

    def _build_tokenizer(self) -> llguidance.LLTokenizer:
        # The model's `tokenizers` backend serialised is what llguidance's own Hugging Face
        # helper hands it; every stop token of the model counts as an end of sequence.
        return llguidance.LLTokenizer(self._tokenizer.backend.to_str(),
                                      n_vocab=self.vocab_size, eos_token=self._stop_tokens)

    def _build(self, tokenizer: llguidance.LLTokenizer, kind: str,
               source: str) -> llguidance.LLMatcher:
        """Compile in a worker thread; a bad grammar raises `GrammarError`."""
        matcher = llguidance.LLMatcher(tokenizer, _grammar_text(kind, source), log_level=0,
                                       limits=self._limits)
        if matcher.is_error():
            raise GrammarError(f"invalid {kind}: {matcher.get_error().strip()}")
        # The first mask builds the lexer's start states, which every copy then shares.
        matcher.compute_bitmask()
        if matcher.is_error():
            raise GrammarError(f"invalid {kind}: {matcher.get_error().strip()}")
        return matcher


def _grammar_text(kind: str, source: str) -> str:
    if kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(source)
    if kind == "lark":
        return llguidance.LLMatcher.grammar_from_lark(source)
    try:
        schema = json.loads(source)
    except json.JSONDecodeError as exc:
        raise GrammarError(f"invalid json_schema: not JSON ({exc})") from None
    if not isinstance(schema, dict):
        raise GrammarError("invalid json_schema: a schema must be a JSON object")
    return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_DEFAULTS)


class InstanceGrammars:
    """One instance's grammars and matchers, by virtual id (counting up, never reused)."""

    def __init__(self, vocab_size: int, max_grammars: int, max_matchers: int):
        self.vocab_size = vocab_size
        self.max_grammars = max_grammars
        self.max_matchers = max_matchers
        self._grammars: dict[int, CompiledGrammar] = {}
        self._matchers: dict[int, Matcher] = {}
        self._next_grammar = 0
        self._next_matcher = 0

    def __len__(self) -> int:
        return len(self._grammars) + len(self._matchers)

    def check_room_for_grammar(self) -> None:
        if len(self._grammars) >= self.max_grammars:
            raise ControlError(f"this instance already holds {self.max_grammars} grammars; "
                               "free one first")

    def add_grammar(self, grammar: CompiledGrammar) -> int:
        self.check_room_for_grammar()
        grammar_id, self._next_grammar = self._next_grammar, self._next_grammar + 1
        self._grammars[grammar_id] = grammar
        return grammar_id

    def free_grammar(self, grammar_id: int) -> None:
        """Matchers made from it live on (they hold what they need)."""
        if self._grammars.pop(grammar_id, None) is None:
            raise _not_held("grammar", grammar_id)

    def create_matcher(self, grammar_id: int) -> int:
        grammar = self._grammars.get(grammar_id)
        if grammar is None:
            raise _not_held("grammar", grammar_id)
        if len(self._matchers) >= self.max_matchers:
            raise ControlError(f"this instance already holds {self.max_matchers} matchers; "
                               "free one first")
        matcher_id, self._next_matcher = self._next_matcher, self._next_matcher + 1
        self._matchers[matcher_id] = Matcher(grammar, self.vocab_size)
        return matcher_id

    def matcher(self, matcher_id: int) -> Matcher:
        matcher = self._matchers.get(matcher_id)
        if matcher is None:
            raise _not_held("matcher", matcher_id)
        return matcher

    @contextmanager
    def using(self, matcher_id: int) -> Iterator[Matcher]:
        """The matcher, held for one forward: a second one naming it meanwhile is refused,
        since its mask would not know the first one's token yet."""
        matcher = self.matcher(matcher_id)
        if matcher.busy:
            raise ControlError(f"matcher {matcher_id} is in use by another forward; "
                               "wait for it first")
        matcher.busy = True
        try:
            yield matcher
        finally:
            matcher.busy = False

    def free_matcher(self, matcher_id: int) -> None:
        if self._matchers.pop(matcher_id, None) is None:
            raise _not_held("matcher", matcher_id)

    def clear(self) -> None:
        self._grammars.clear()
        self._matchers.clear()


def _not_held(noun: str, vid: int) -> ControlError:
    return ControlError(f"{noun} {vid} is not held by this instance")


# -- the ops -----------------------------------------------------------------------------------


class GrammarUser(Protocol):
    """What the grammar ops need of the requesting instance."""

    @property
    def grammars(self) -> InstanceGrammars: ...

    @property
    def grammar_compiler(self) -> GrammarCompiler: ...


async def grammar_compile(ctx: GrammarUser, f: Fields, priority: int) -> int:
    kind, source = f.text("kind"), f.text("source")
    ctx.grammars.check_room_for_grammar()  # before the work of compiling
    grammar = await ctx.grammar_compiler.compile(kind, source)
    return ctx.grammars.add_grammar(grammar)


async def grammar_free(ctx: GrammarUser, f: Fields, priority: int) -> None:
    ctx.grammars.free_grammar(f.integer("grammar"))


async def matcher_create(ctx: GrammarUser, f: Fields, priority: int) -> int:
    return ctx.grammars.create_matcher(f.integer("grammar"))


async def matcher_free(ctx: GrammarUser, f: Fields, priority: int) -> None:
    ctx.grammars.free_matcher(f.integer("matcher"))


async def matcher_consume(ctx: GrammarUser, f: Fields, priority: int) -> dict[str, Any]:
    """Advance a matcher by tokens the guest chose itself (a forced prefix, its own sampling)."""
    tokens = f.int_list("tokens", low=0)
    with ctx.grammars.using(f.integer("matcher")) as matcher:
        consumed = matcher.consume(tokens)
        return {"consumed": consumed, "done": matcher.done}
