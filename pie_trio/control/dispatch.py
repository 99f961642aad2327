"""The dispatch table: every op of docs/abi.md the control layer answers, its handler and the
fields it takes; and `answer`, which turns one request into one response.

A response is `{"ok": value}` or `{"error": message}`. Every failure becomes an error response
for the requesting instance only: a refused field (`ControlError`), a call the executor rejected
(`CallError`), even a bug in a handler, which is logged. Requests may carry fields only from
their op's list (plus `op` and `queue`), so a misspelt optional field is reported instead of
silently ignored. Handlers receive the instance's `InstanceContext`, the request's `Fields` and
the priority of the queue it runs on.

Most handlers are coroutines and run in a task of their own (or their queue's). `forward`, the
op of every generation step, can also start with no task at all (`Op.start`, `start`): checked
and submitted in the guest's crossing, answered from the executor's callback, when nothing
ahead of it on its queue is running (instance.py decides) — a task's passes through trio's
loop and the channel of its queue cost about as much of the trio thread as the rest of the
step. The few that
never wait (`ImmediateOp`: ping, clock, the store, model_info) are answered on the spot by
`answer_now` when the request names no queue: no task, no extra pass of trio's loop, which is
most of what a guest's round trip through the control layer costs. Those that touch no shared
state either (ping, clock, model_info) may be answered on any thread: the runtime answers them
on the guest's own thread, with no crossing to the trio thread at all.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import outcome

from pie_trio.control import (
    clock,
    grammar,
    inference,
    kv,
    messaging,
    model_view,
    prefix_cache,
    queues,
    store,
)
from pie_trio.control.context import InstanceContext
from pie_trio.control.fields import ControlError, Fields, is_int, type_name
from pie_trio.control.interface import RUNTIME_OPS, Response
from pie_trio.control.queues import Queue, QueuedRequest, Queues
from pie_trio.control.tools import http_request
from pie_trio.model.calls import CallError

logger = logging.getLogger(__name__)

Handler = Callable[[InstanceContext, Fields, int], Awaitable[Any]]
ImmediateHandler = Callable[[InstanceContext, Fields, int], Any]
OnOutcome = Callable[[outcome.Outcome[Any]], None]
Abandon = Callable[[], None]
# Starts a request with no task: returns how to abandon it, or None (having done nothing) when
# this request needs the handler's task after all.
StartHandler = Callable[[InstanceContext, Fields, int, OnOutcome], "Abandon | None"]


@dataclass(frozen=True)
class Op:
    handler: Handler
    fields: tuple[str, ...] = ()
    start: StartHandler | None = None  # the handler's work without a task, where it can


@dataclass(frozen=True)
class ImmediateOp:
    """An op whose handler is a plain function: it answers without waiting for anything.
    `stateless`: it reads nothing any other op writes, so any thread may answer it (the
    runtime does so on the guest's own thread: `answer_stateless`)."""

    handler: ImmediateHandler
    fields: tuple[str, ...] = ()
    stateless: bool = False


OPS: dict[str, Op | ImmediateOp] = {
    "subscribe": Op(messaging.subscribe, ("topic",)),
    "broadcast": Op(messaging.broadcast, ("topic", "message")),
    "topic_receive": Op(messaging.topic_receive, ("topic",)),
    "store_get": ImmediateOp(store.store_get, ("key",)),
    "store_set": ImmediateOp(store.store_set, ("key", "value")),
    "store_delete": ImmediateOp(store.store_delete, ("key",)),
    "store_list": ImmediateOp(store.store_list, ("prefix",)),
    "sleep": Op(clock.sleep, ("ms",)),
    "clock": ImmediateOp(clock.clock, stateless=True),
    "ping": ImmediateOp(clock.ping, ("payload",), stateless=True),
    "model_info": ImmediateOp(model_view.model_info, stateless=True),
    "create_queue": Op(queues.create_queue, ("priority",)),
    "set_priority": Op(queues.set_priority, ("priority",)),
    "synchronize": Op(queues.synchronize),
    "alloc_pages": Op(kv.alloc_pages, ("count",)),
    "free_pages": Op(kv.free_pages, ("pages",)),
    "share_pages": Op(kv.share_pages, ("pages",)),
    "alloc_slots": Op(kv.alloc_slots, ("count",)),
    "free_slots": Op(kv.free_slots, ("slots",)),
    "export_pages": Op(kv.export_pages, ("name", "pages", "persistent")),
    "unexport": Op(kv.unexport, ("name",)),
    "import_pages": Op(kv.import_pages, ("name",)),
    "list_exports": Op(kv.list_exports),
    "prefix_match": Op(prefix_cache.prefix_match, ("tokens",)),
    "prefix_store": Op(prefix_cache.prefix_store, ("tokens", "pages")),
    "copy_kv": Op(inference.copy_kv,
                  ("src_page", "dst_page", "src_offset", "dst_offset", "count")),
    "mask_kv": Op(inference.mask_kv, ("page", "slots", "masked")),
    "forward": Op(inference.forward,
                  ("pages", "last_page_len", "positions", "tokens", "slots", "masks", "outputs",
                   "top_k", "sampler", "vocab_mask", "logit_bias", "token_bytes", "feed"),
                  start=inference.start_forward),
    "embed": Op(inference.embed, ("tokens", "slots")),
    "tokenize": Op(model_view.tokenize, ("text",)),
    "detokenize": Op(model_view.detokenize, ("tokens",)),
    "vocab": Op(model_view.vocab),
    "grammar_compile": Op(grammar.grammar_compile, ("kind", "source")),
    "grammar_free": Op(grammar.grammar_free, ("grammar",)),
    "matcher_create": Op(grammar.matcher_create, ("grammar",)),
    "matcher_free": Op(grammar.matcher_free, ("matcher",)),
    "matcher_consume": Op(grammar.matcher_consume, ("matcher", "tokens")),
    "http_request": Op(http_request,
                        ("method", "url", "headers", "body", "json", "timeout_ms",
                         "follow_redirects", "parse_json")),
}


def queue_for(request: Any, instance_queues: Queues) -> Queue | None:
    """The queue a request waits in line on, or None to run it at once.

    A request naming no queue, or one the instance does not hold, runs at once (`answer` then
    explains a bad queue field). `set_priority` names the queue it changes, not one to wait on.
    """
    if not isinstance(request, dict) or request.get("op") == "set_priority":
        return None
    return instance_queues.find(request.get("queue"))


async def run(ctx: InstanceContext, item: QueuedRequest, queue: Queue | None) -> None:
    """Run one request (on `queue`, or at once when None) and hand its response back."""
    item.finish(await answer(ctx, item.request, queue))


async def answer(ctx: InstanceContext, request: Any, queue: Queue | None) -> Response:
    """The response to one request; `queue` is the queue it ran on (None: run at once)."""
    try:
        name, op = _lookup(request)
    except ControlError as exc:
        return {"error": str(exc)}
    try:
        _check_known_fields(op, request)
        if queue is None:
            _check_queue_field(request)
        priority = queue.priority if queue is not None else 0
        value = op.handler(ctx, Fields(request), priority)
        if not isinstance(op, ImmediateOp):
            value = await value
    except Exception as exc:
        return _failure(ctx, name, exc)
    return {"ok": value}


def starts_without_task(request: dict[str, Any]) -> bool:
    """Whether the request's op may run with no task of its own (`start`)."""
    name = request.get("op")
    op = OPS.get(name) if isinstance(name, str) else None
    return isinstance(op, Op) and op.start is not None


def start(ctx: InstanceContext, request: dict[str, Any], priority: int,
          finish: Callable[[Response], None]) -> Abandon | None:
    """Start a request for an op with `Op.start` and no task: `finish(response)` is called
    once, now (a refused field) or from the executor's answer. Returns the function that
    abandons it (`finish` is not called then), or None, with nothing done, where the request
    needs a task after all (run it with `run`)."""
    name = str(request["op"])
    op = OPS[name]
    assert isinstance(op, Op) and op.start is not None

    def answered(result: outcome.Outcome[Any]) -> None:
        if isinstance(result, outcome.Value):
            finish({"ok": result.value})
        elif isinstance(result, outcome.Error):
            error = result.error
            finish(_failure(ctx, name, error if isinstance(error, Exception)
                            else RuntimeError(repr(error))))

    try:
        _check_known_fields(op, request)
        return op.start(ctx, Fields(request), priority, answered)
    except Exception as exc:
        finish(_failure(ctx, name, exc))
        return _answered


def _answered() -> None:
    """Abandoning a request answered already: nothing to do."""


def answer_now(ctx: InstanceContext, request: Any, *, stateless: bool = False) -> Response | None:
    """The response to a request for an immediate op that names no queue, computed now; None
    for any other request (it goes through `run`). With `stateless`, only for the ops any
    thread may answer (and None for the other immediate ops too)."""
    if not isinstance(request, dict) or request.get("queue") is not None:
        return None
    name = request.get("op")
    op = OPS.get(name) if isinstance(name, str) else None
    if not isinstance(op, ImmediateOp) or (stateless and not op.stateless):
        return None
    try:
        _check_known_fields(op, request)
        return {"ok": op.handler(ctx, Fields(request), 0)}
    except Exception as exc:
        return _failure(ctx, str(name), exc)


def _failure(ctx: InstanceContext, name: str, exc: Exception) -> Response:
    """The error response for a handler's failure (logged when it is a bug)."""
    if isinstance(exc, (ControlError, CallError)):
        return {"error": f"{name}: {exc}"}
    logger.exception("op %r of instance %s failed", name, ctx.instance_id, exc_info=exc)
    return {"error": f"{name}: internal error ({type(exc).__name__}: {exc})"}


def _lookup(request: Any) -> tuple[str, Op | ImmediateOp]:
    if not isinstance(request, dict):
        raise ControlError(f"a request must be a map, got {type_name(request)}")
    name = request.get("op")
    if name is None:
        raise ControlError("missing field 'op'")
    if not isinstance(name, str):
        raise ControlError(f"field 'op' must be a str, got {type_name(name)}")
    if name in RUNTIME_OPS:
        raise ControlError(f"op {name!r} is answered by the runtime, not the control layer")
    op = OPS.get(name)
    if op is None:
        raise ControlError(f"unknown op {name!r}")
    return name, op


def _check_known_fields(op: Op | ImmediateOp, request: dict[str, Any]) -> None:
    if request.keys() <= _allowed(op):
        return
    unknown = sorted(str(k) for k in request if k not in op.fields and k not in ("op", "queue"))
    if unknown:
        expected = ", ".join(op.fields + ("queue",))
        raise ControlError(f"unknown field {unknown[0]!r}; expected some of: {expected}")


@functools.cache
def _allowed(op: Op | ImmediateOp) -> frozenset[str]:
    """Every field a request for `op` may carry (looked up once per op: this runs per step)."""
    return frozenset((*op.fields, "op", "queue"))


def _check_queue_field(request: dict[str, Any]) -> None:
    """A request that ran at once although it names a queue: say what is wrong."""
    queue_id = request.get("queue")
    if queue_id is None or request["op"] == "set_priority":
        return
    if not is_int(queue_id):
        raise ControlError(f"field 'queue' must be an int, got {type_name(queue_id)}")
    raise ControlError(f"queue {queue_id} is not held by this instance")
