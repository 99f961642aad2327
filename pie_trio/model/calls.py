"""The model's vocabulary: the calls the executor batches and hands to the model runner.

Every record here is plain data (msgpack-ready dataclasses), so the executor could run in another
process with no change to its callers. Page and slot ids are *physical* ids of the executor's
pools; per-instance virtual ids live in the control layer.

KV layout of one sequence: its context is the concatenation of `kv_pages`, each holding
`page_size` token slots, the last one filled up to `last_page_len` *after* this call's tokens are
written. A forward with n input tokens therefore writes them into the last n slots of the
context, and input token i sees context slots [0, ctx_len - n + i] (causal), unless a mask says
otherwise.

Attention masks are BRLE (binary run-length encoding, as in Pie): a list of run lengths that
alternate attend / skip, starting with *attend*; the runs of input token i sum to its causal
context length `ctx_len - n + i + 1`. A leading skip is written as a first run of 0.

Vocabulary masks (constrained decoding) are packed bitmasks: `bytes` of ceil(vocab/8), bit
`t % 8` of byte `t // 8` set when token t is allowed.

On the wire (`to_msg`, `call_from_msg`, `result_from_msg`) a record is a map of its fields, a
call's `kind` naming its type; msgpack carries it as is (with `strict_map_key=False`, for the
integer keys of `logit_bias`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, TypeAlias, TypeVar

if TYPE_CHECKING:
    from _typeshed import DataclassInstance


class CallError(Exception):
    """A call was rejected or failed. Only its caller sees this; the executor carries on."""


@dataclass
class Sampler:
    """How to turn a next-token distribution into one token.

    temperature 0 means greedy (argmax). top_k 0 and top_p 1 and min_p 0 disable those filters.
    A seed makes the draw reproducible per call; without one the executor's generator is used.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None


@dataclass
class AllocPages:
    owner: str
    count: int
    kind: str = "alloc_pages"


@dataclass
class FreePages:
    owner: str
    pages: list[int]
    kind: str = "free_pages"


@dataclass
class AllocSlots:
    """Embedding slots: one hidden-state vector each, filled by `Embed`, read by `Forward`."""

    owner: str
    count: int
    kind: str = "alloc_slots"


@dataclass
class FreeSlots:
    owner: str
    slots: list[int]
    kind: str = "free_slots"


@dataclass
class Forward:
    """One sequence's share of a ragged batch: a prefill chunk or a decode token (or several)."""

    owner: str
    kv_pages: list[int]
    last_page_len: int
    positions: list[int]
    tokens: list[int] | None = None
    embed_slots: list[int] | None = None
    masks: list[list[int]] | None = None
    output_indices: list[int] = field(default_factory=list)
    top_k: int = 0
    sampler: Sampler | None = None
    vocab_mask: bytes | None = None
    logit_bias: dict[int, float] | None = None
    kind: str = "forward"


@dataclass
class ForwardResult:
    """Per output index: a top-k distribution (when top_k > 0) and/or a sampled token."""

    dists: list[tuple[list[int], list[float]]] | None = None
    tokens: list[int] | None = None


@dataclass
class Embed:
    """Store the embeddings of `tokens` into `slots` (same length)."""

    owner: str
    tokens: list[int]
    slots: list[int]
    kind: str = "embed"


@dataclass
class CopyKv:
    """Copy `count` KV rows (every layer) from src_page[src_offset:] to dst_page[dst_offset:]."""

    owner: str
    src_page: int
    dst_page: int
    src_offset: int
    dst_offset: int
    count: int
    kind: str = "copy_kv"


@dataclass
class MaskKv:
    """Mark slots of a page masked (never attended again) or unmasked."""

    owner: str
    page: int
    slots: list[int]
    masked: bool = True
    kind: str = "mask_kv"


@dataclass
class SwapOutKv:
    """Copy whole pages (K, V and masked flags of every row, every layer) to host memory, the
    copy of `pages[i]` kept under `keys[i]`; answers the bytes copied. The pages themselves are
    left as they are: their owner frees them once the copy is done."""

    owner: str
    pages: list[int]
    keys: list[int]
    kind: str = "swap_out_kv"


@dataclass
class SwapInKv:
    """Copy the host copies `keys[i]` back into `pages[i]` and drop them; answers the bytes
    copied. A key with no host copy fails the call."""

    owner: str
    keys: list[int]
    pages: list[int]
    kind: str = "swap_in_kv"


@dataclass
class DropSwappedKv:
    """Forget host copies nobody will swap back in (their owner ended); unknown keys pass."""

    owner: str
    keys: list[int]
    kind: str = "drop_swapped_kv"


Call: TypeAlias = (
    AllocPages | FreePages | AllocSlots | FreeSlots | Forward | Embed | CopyKv | MaskKv
    | SwapOutKv | SwapInKv | DropSwappedKv
)

# What a call answers: the ids an allocation handed out, a forward's result, the bytes a swap
# moved, None for the rest.
CallResult: TypeAlias = list[int] | ForwardResult | int | None

# Calls that are coalesced across callers and run as one batched kernel in the worker thread.
BATCHED_KINDS = frozenset({"forward", "embed", "copy_kv", "mask_kv", "swap_out_kv", "swap_in_kv",
                           "drop_swapped_kv"})



# -- the wire form: records as maps of their fields -------------------------------------------

_CALL_TYPES: dict[str, type[Call]] = {
    cls.kind: cls  # `kind` is each record's dataclass default
    for cls in (AllocPages, FreePages, AllocSlots, FreeSlots, Forward, Embed, CopyKv, MaskKv,
                SwapOutKv, SwapInKv, DropSwappedKv)
}


def to_msg(record: Call | ForwardResult) -> dict[str, Any]:
    """A call or a forward's result as a map of its fields, ready for msgpack."""
    msg = {f.name: getattr(record, f.name) for f in fields(record)}
    if isinstance(record, Forward) and record.sampler is not None:
        msg["sampler"] = {f.name: getattr(record.sampler, f.name) for f in fields(Sampler)}
    return msg


def call_from_msg(msg: Any) -> Call:
    """The call `msg` (from `to_msg`) describes; `CallError` if it describes none."""
    kind = msg.get("kind") if isinstance(msg, dict) else None
    if not isinstance(kind, str) or kind not in _CALL_TYPES:
        raise CallError(f"not a call record: kind {kind!r}")
    values = dict(msg)
    if kind == "forward" and values.get("sampler") is not None:
        values["sampler"] = _record(Sampler, values["sampler"])
    return _record(_CALL_TYPES[kind], values)


def result_from_msg(msg: Any) -> ForwardResult:
    """The `ForwardResult` `msg` (from `to_msg`) describes; `CallError` if it is malformed."""
    result = _record(ForwardResult, msg)
    if result.dists is not None:
        if not all(isinstance(d, list | tuple) and len(d) == 2 for d in result.dists):
            raise CallError("a forward result's dists must be (ids, probs) pairs")
        result.dists = [(list(ids), list(probs)) for ids, probs in result.dists]
    return result


_Record = TypeVar("_Record", bound="DataclassInstance")


def _record(cls: type[_Record], values: Any) -> _Record:
    if not isinstance(values, dict):
        raise CallError(f"a {cls.__name__} record must be a map, got {type(values).__name__}")
    unknown = set(values) - {f.name for f in fields(cls)}
    if unknown:
        raise CallError(f"a {cls.__name__} record has unknown fields {sorted(map(str, unknown))}")
    try:
        return cls(**values)
    except TypeError as exc:  # a required field is missing
        raise CallError(f"malformed {cls.__name__} record: {exc}") from None
