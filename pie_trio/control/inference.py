"""The model ops — `forward`, `embed`, `copy_kv`, `mask_kv` — translated into executor calls.

Each handler checks the *shape* of the guest's fields (types, which fields go together, counts
that must agree), resolves virtual ids to physical ones (an id the instance does not hold is an
error before anything runs), makes every page it is about to write private to the instance
(copy-on-write), and runs the call with the pages and slots it names pinned. Ranges that need
the model — token ids, positions, page fill, masks, output indices, sampler values, vocabulary
masks, offsets within a page — are the model's to check (`model/checks.py`, through the
executor); its `CallError` comes back to the guest as an error response.

A forward may `feed` on the previous forward of its queue: the tokens that forward sampled are
appended to its own `tokens` when it starts. A guest can thus submit a decode step before the
token it reads is known, one step ahead, and the step goes into the very next tick: the control
layer starts it from the previous step's answer (instance.py, "chained" requests), with no
crossing to the guest in between. Each queue keeps what its latest forward sampled
(`Queue.sampled`), and a forward starting on it clears that, so a `feed` after a forward that
failed or sampled nothing is refused. So is one whose pages do not include the page that
forward wrote last: that forward was another sequence's (two contexts sharing a queue), and
its token is not this one's to read.

A forward whose sampler names a grammar matcher (grammar.py) is constrained: its vocabulary
mask is the matcher's, computed just before the call is submitted, and the sampled token
advances the matcher when the result comes back; the answer says whether the matcher is done.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import outcome

from pie_trio.control.context import InstanceContext
from pie_trio.control.fields import ControlError, Fields, distinct, is_int, type_name
from pie_trio.control.kv import make_private
from pie_trio.control.queues import Queue
from pie_trio.control.resources import OWNER
from pie_trio.model.calls import CopyKv, Embed, Forward, ForwardResult, MaskKv, Sampler

SAMPLER_FIELDS = ("temperature", "top_k", "top_p", "min_p", "seed")  # how a token is drawn
MATCHER_FIELD = "matcher"  # which grammar matcher constrains the draw (grammar.py)


def written_pages(num_pages: int, last_page_len: int, num_inputs: int,
                  page_size: int) -> list[tuple[int, int]]:
    """(index into the page list, rows before the write) of every page a forward writes.

    The inputs occupy the last `num_inputs` slots of the context, so the written pages are those
    covering slots [ctx_len - num_inputs, ctx_len); only the first of them has rows to keep.
    The caller has checked that the inputs fit the context; a page fill the model will refuse
    yields at most a needless copy, never an index outside the page list.
    """
    if num_inputs == 0:
        return []  # nothing to write (and the model refuses a forward without inputs)
    ctx_len = (num_pages - 1) * page_size + last_page_len
    start = ctx_len - num_inputs
    first = start // page_size
    return [(j, max(0, start - j * page_size)) for j in range(first, num_pages)]


@dataclass
class _ForwardRequest:
    """A forward request whose fields are checked, before its ids are resolved."""

    call: Forward  # kv_pages and embed_slots still to fill in (`_bind`)
    page_vids: list[int]
    slot_vids: list[int] | None
    written: list[tuple[int, int]]  # `written_pages` of the call
    matcher_id: int | None
    with_bytes: bool


def _parse_forward(ctx: InstanceContext, f: Fields, queue: Queue | None) -> _ForwardRequest:
    page_size = ctx.model.info.page_size
    vids = f.int_list("pages")
    if not vids:
        raise f.error("field 'pages' must name at least one page")
    last_page_len = f.integer("last_page_len")
    positions = f.int_list("positions")
    tokens, slot_vids = _inputs(f)
    if f.flag("feed", False):
        tokens = _fed(f, tokens, queue, vids)
    num_inputs = len(tokens) if tokens is not None else len(slot_vids or [])
    if len(positions) != num_inputs:
        raise f.error(f"{num_inputs} inputs but {len(positions)} positions")
    ctx_len = (len(vids) - 1) * page_size + last_page_len
    if num_inputs > ctx_len:
        raise f.error(f"{num_inputs} inputs do not fit in a context of {ctx_len} slots")
    call = Forward(
        OWNER,
        kv_pages=[],
        last_page_len=last_page_len,
        positions=positions,
        tokens=tokens,
        embed_slots=None,
        masks=f.int_lists("masks", None),
        output_indices=f.int_list("outputs", []),
        top_k=f.integer("top_k", 0),
        sampler=_sampler(f),
        vocab_mask=f.blob("vocab_mask", None),
        logit_bias=_logit_bias(f),
    )
    return _ForwardRequest(call, vids, slot_vids,
                           written_pages(len(vids), last_page_len, num_inputs, page_size),
                           _matcher_id(f, call), f.flag("token_bytes", False))


def _fed(f: Fields, tokens: list[int] | None, queue: Queue | None,
         page_vids: list[int]) -> list[int]:
    """`tokens` with the tokens the previous forward on the queue sampled appended."""
    if tokens is None:
        raise f.error("'feed' appends sampled tokens to 'tokens': give 'tokens' (it may be "
                      "empty), not 'slots'")
    if queue is None:
        raise f.error("'feed' reads the previous forward on the request's queue: name a queue")
    if queue.sampled is None:
        raise f.error(f"'feed': the previous forward on queue {queue.id} sampled no tokens (it "
                      "failed, or it had no sampler)")
    if queue.sampled_into not in page_vids:
        raise f.error(f"'feed': the previous forward on queue {queue.id} was another sequence's "
                      f"(it wrote page {queue.sampled_into}, which this forward does not name)")
    return tokens + queue.sampled


def _record_sampled(queue: Queue | None, value: dict[str, Any], page_vids: list[int]) -> None:
    """A forward on `queue` succeeded: a forward that feeds on it reads what it sampled."""
    if queue is not None:
        queue.sampled = value.get("tokens")
        queue.sampled_into = page_vids[-1]


def _check_held(ctx: InstanceContext, request: _ForwardRequest) -> None:
    """Every id the request names is the instance's (before anything is copied for it)."""
    ctx.pages.resolve(request.page_vids)
    ctx.slots.resolve(request.slot_vids or [])
    if request.matcher_id is not None:
        ctx.grammars.matcher(request.matcher_id)


def _bind(ctx: InstanceContext, request: _ForwardRequest) -> Forward:
    """The call, naming the physical pages and slots the request's ids stand for now."""
    call = request.call
    call.kv_pages = ctx.pages.resolve(request.page_vids)
    if request.slot_vids is not None:
        call.embed_slots = ctx.slots.resolve(request.slot_vids)
    return call


async def forward(ctx: InstanceContext, f: Fields, priority: int) -> dict[str, Any]:
    queue = ctx.queues.find(f.request.get("queue"))
    try:
        request = _parse_forward(ctx, f, queue)
    finally:
        if queue is not None:
            queue.sampled = None  # what it sampled before is this forward's or no one's
    vocab = await ctx.model.vocab() if request.with_bytes else None  # computed once per server
    # Every id must be held before anything is copied; resolve again after the copies, which
    # may remap pages (and a concurrent request of the instance may have freed something).
    _check_held(ctx, request)
    for index, keep_rows in request.written:
        await make_private(ctx, request.page_vids[index], keep_rows, priority)
    call = _bind(ctx, request)
    if request.matcher_id is not None:
        value = await _run_constrained(ctx, call, request.matcher_id, priority)
    else:
        value = _result_value(await _run_forward(ctx, call, priority))
    _record_sampled(queue, value, request.page_vids)
    return _with_bytes(value, vocab)


def start_forward(ctx: InstanceContext, f: Fields, priority: int,
                  on_done: Callable[[outcome.Outcome[Any]], None]) -> Callable[[], None] | None:
    """`forward` with no task of its own (dispatch.py: `Op.start`): the request is checked and
    submitted now and answered through `on_done`; returns the function that abandons it.
    None, with nothing done, where it needs a task: a grammar matcher, a vocabulary not
    computed yet, or a written page shared with someone else (copy-on-write first)."""
    queue = ctx.queues.find(f.request.get("queue"))
    try:
        request = _parse_forward(ctx, f, queue)
    except Exception:
        if queue is not None:
            queue.sampled = None  # refused: a forward feeding on this queue must fail too
        raise
    vocab = ctx.model.vocab_now() if request.with_bytes else None
    if request.matcher_id is not None or (request.with_bytes and vocab is None):
        return None
    call = _bind(ctx, request)  # with no await before the submit, resolving once is enough
    pool = ctx.physical_pages
    if any(pool.shared(call.kv_pages[index]) for index, _ in request.written):
        return None
    if queue is not None:
        queue.sampled = None

    def answered(result: outcome.Outcome[Any]) -> None:
        if isinstance(result, outcome.Value):
            forwarded = result.value
            # A bug here must still answer the guest (dispatch turns it into an error).
            result = outcome.capture(lambda: _with_bytes(_result_value(forwarded), vocab))
            if isinstance(result, outcome.Value):
                _record_sampled(queue, result.value, request.page_vids)
        on_done(result)

    return ctx.executor.start(call, priority, answered, pages=call.kv_pages,
                              slots=call.embed_slots or [])


def _with_bytes(value: dict[str, Any], vocab: list[bytes] | None) -> dict[str, Any]:
    if vocab is not None and "tokens" in value:
        # The sampled tokens' bytes: a guest can build the text itself, with no `detokenize`
        # round trip per token (the Python SDK streams this way).
        value["bytes"] = [vocab[token] for token in value["tokens"]]
    return value


async def _run_forward(ctx: InstanceContext, call: Forward, priority: int) -> ForwardResult:
    return await ctx.executor.run(call, priority, pages=call.kv_pages,
                                  slots=call.embed_slots or [])


async def _run_constrained(ctx: InstanceContext, call: Forward, matcher_id: int,
                           priority: int) -> dict[str, Any]:
    """Run `call` with the matcher's mask and advance the matcher by the sampled token.

    The mask is computed on the trio thread (tens of microseconds) right before submitting,
    and the matcher is held meanwhile: no other forward may mask with it until its token is in.
    """
    with ctx.grammars.using(matcher_id) as matcher:
        call.vocab_mask = matcher.mask()
        result = await _run_forward(ctx, call, priority)
        value = _result_value(result)
        tokens = result.tokens or []
        if len(tokens) != 1:  # the call had one output and a sampler (`_matcher_id`)
            raise ControlError(f"expected one sampled token, got {len(tokens)}")
        value["done"] = matcher.advance(tokens[0])
    return value


def _matcher_id(f: Fields, call: Forward) -> int | None:
    """The matcher the sampler names, if any; it needs one output and no mask of the guest's."""
    raw = f.mapping("sampler", None)
    if raw is None or raw.get(MATCHER_FIELD) is None:
        return None
    matcher_id = Fields(raw, prefix="sampler: ").integer(MATCHER_FIELD, None)
    if matcher_id is None:
        return None
    if len(call.output_indices) != 1:
        raise f.error("a sampler naming a matcher needs exactly one output, "
                      f"got {len(call.output_indices)}")
    if call.vocab_mask is not None:
        raise f.error("give either 'vocab_mask' or a sampler naming a matcher, not both")
    return matcher_id


def _inputs(f: Fields) -> tuple[list[int] | None, list[int] | None]:
    """(tokens, None) or (None, slot ids): a forward reads exactly one of them."""
    has_tokens = f.request.get("tokens") is not None
    has_slots = f.request.get("slots") is not None
    if has_tokens == has_slots:
        raise f.error("give exactly one of 'tokens' or 'slots'")
    if has_tokens:
        return f.int_list("tokens"), None
    return None, f.int_list("slots")


def _sampler(f: Fields) -> Sampler | None:
    raw = f.mapping("sampler", None)
    if raw is None:
        return None
    s = Fields(raw, prefix="sampler: ")
    unknown = sorted(str(k) for k in raw if k not in SAMPLER_FIELDS and k != MATCHER_FIELD)
    if unknown:
        raise s.error(f"unknown field {unknown[0]!r}; expected some of "
                      f"{[*SAMPLER_FIELDS, MATCHER_FIELD]}")
    return Sampler(
        temperature=s.number("temperature", 0.0),
        top_k=s.integer("top_k", 0),
        top_p=s.number("top_p", 1.0),
        min_p=s.number("min_p", 0.0),
        seed=s.integer("seed", None),
    )


def _logit_bias(f: Fields) -> dict[int, float] | None:
    raw = f.mapping("logit_bias", None)
    if raw is None:
        return None
    bias = {}
    for token, value in raw.items():
        if not is_int(token):
            raise f.error(
                f"field 'logit_bias' keys must be token ids (int), got {type_name(token)}"
            )
        if not (is_int(value) or isinstance(value, float)):
            raise f.error(f"field 'logit_bias'[{token}] must be a number, got {type_name(value)}")
        bias[token] = float(value)
    return bias


def _result_value(result: ForwardResult) -> dict[str, Any]:
    value: dict[str, Any] = {}
    if result.dists is not None:
        value["dists"] = [[list(ids), list(probs)] for ids, probs in result.dists]
    if result.tokens is not None:
        value["tokens"] = list(result.tokens)
    return value


async def embed(ctx: InstanceContext, f: Fields, priority: int) -> None:
    tokens = f.int_list("tokens")
    slots = ctx.slots.resolve(distinct("slot", f.int_list("slots")))
    if len(tokens) != len(slots):
        raise f.error(f"{len(tokens)} tokens but {len(slots)} slots")
    await ctx.executor.run(Embed(OWNER, tokens, slots), priority, slots=slots)


async def copy_kv(ctx: InstanceContext, f: Fields, priority: int) -> None:
    page_size = ctx.model.info.page_size
    src, dst = f.integer("src_page"), f.integer("dst_page")
    count = f.integer("count", low=0, high=page_size)
    src_offset, dst_offset = f.integer("src_offset"), f.integer("dst_offset")
    ctx.pages.physical(src)  # held, before copying anything
    await make_private(ctx, dst, page_size, priority)
    src_page, dst_page = ctx.pages.physical(src), ctx.pages.physical(dst)
    call = CopyKv(OWNER, src_page, dst_page, src_offset, dst_offset, count)
    await ctx.executor.run(call, priority, pages=[src_page, dst_page])


async def mask_kv(ctx: InstanceContext, f: Fields, priority: int) -> None:
    page_size = ctx.model.info.page_size
    vid = f.integer("page")
    slots = f.int_list("slots")
    masked = f.flag("masked", True)
    await make_private(ctx, vid, page_size, priority)
    page = ctx.pages.physical(vid)
    await ctx.executor.run(MaskKv(OWNER, page, slots, masked), priority, pages=[page])
