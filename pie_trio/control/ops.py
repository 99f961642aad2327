"""Dispatch of guest ops (docs/abi.md) to their handlers, and the small service ops.

`handle` turns one request into one response map: `{"ok": value}` or `{"error": message}`.
Every failure becomes an error response for the requesting instance only: a refused field
(`ControlError`), a call the executor rejected (`CallError`), even a bug in a handler, which is
logged. Requests may carry fields only from their op's list (plus `op` and `queue`), so a
misspelt optional field is reported instead of silently ignored.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import trio

from pie_trio.control import inference, kv
from pie_trio.control.fields import ControlError, Fields, is_int, type_name
from pie_trio.model.calls import CallError

if TYPE_CHECKING:
    from pie_trio.control.instance import InstanceControl
    from pie_trio.control.queues import Queue

logger = logging.getLogger(__name__)

Handler = Callable[["InstanceControl", Fields, int], Awaitable[Any]]

# Answered by the runtime itself; they never reach the control layer.
RUNTIME_OPS = frozenset({"version", "instance_id", "args", "models", "send", "receive",
                         "set_return"})
# Tokenizing text longer than this runs in a worker thread, off the trio thread.
INLINE_TEXT_CHARS = 4096
INLINE_TOKENS = 4096


@dataclass(frozen=True)
class Op:
    handler: Handler
    fields: tuple[str, ...] = ()


# -- messaging and the store ---------------------------------------------------------------


async def subscribe(inst: InstanceControl, f: Fields, priority: int) -> None:
    inst.controller.topics.subscribe(inst.id, f.text("topic"))


async def broadcast(inst: InstanceControl, f: Fields, priority: int) -> int:
    return inst.controller.topics.broadcast(f.text("topic"), f.text("message"))


async def topic_receive(inst: InstanceControl, f: Fields, priority: int) -> str:
    return await inst.controller.topics.receive(inst.id, f.text("topic"))


async def store_get(inst: InstanceControl, f: Fields, priority: int) -> str | None:
    return inst.controller.store.get(f.text("key"))


async def store_set(inst: InstanceControl, f: Fields, priority: int) -> None:
    inst.controller.store.set(f.text("key"), f.text("value"))


async def store_delete(inst: InstanceControl, f: Fields, priority: int) -> bool:
    return inst.controller.store.delete(f.text("key"))


async def store_list(inst: InstanceControl, f: Fields, priority: int) -> list[str]:
    return inst.controller.store.keys(f.text("prefix", ""))


# -- time and debugging --------------------------------------------------------------------


async def sleep(inst: InstanceControl, f: Fields, priority: int) -> None:
    await trio.sleep(f.integer("ms", low=0) / 1000)


async def clock(inst: InstanceControl, f: Fields, priority: int) -> float:
    return time.time()


async def ping(inst: InstanceControl, f: Fields, priority: int) -> Any:
    return f.anything("payload")


# -- model, queues, tokenizer --------------------------------------------------------------


async def model_info(inst: InstanceControl, f: Fields, priority: int) -> dict[str, Any]:
    info = inst.controller.info
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


async def create_queue(inst: InstanceControl, f: Fields, priority: int) -> int:
    return inst.create_queue(f.integer("priority", 0)).id


async def set_priority(inst: InstanceControl, f: Fields, priority: int) -> None:
    inst.queue(f.integer("queue")).priority = f.integer("priority")


async def synchronize(inst: InstanceControl, f: Fields, priority: int) -> None:
    # Dispatch already ran this request on its queue, after every earlier one completed.
    f.integer("queue")


async def tokenize(inst: InstanceControl, f: Fields, priority: int) -> list[int]:
    text = f.text("text")
    encode = inst.controller.tokenizer.encode
    if len(text) <= INLINE_TEXT_CHARS:
        return list(encode(text))
    return list(await trio.to_thread.run_sync(
        encode, text, limiter=inst.controller.tokenizer_limiter))


async def detokenize(inst: InstanceControl, f: Fields, priority: int) -> str:
    vocab_size = inst.controller.info.vocab_size
    tokens = f.int_list("tokens", low=0)
    for i, token in enumerate(tokens):
        if token >= vocab_size:
            raise f.error(f"field 'tokens'[{i}] = {token} is not below the vocabulary size "
                          f"{vocab_size}")
    decode = inst.controller.tokenizer.decode
    if len(tokens) <= INLINE_TOKENS:
        return decode(tokens)
    return await trio.to_thread.run_sync(decode, tokens, limiter=inst.controller.tokenizer_limiter)


async def vocab(inst: InstanceControl, f: Fields, priority: int) -> list[bytes]:
    return await inst.controller.vocab()


OPS: dict[str, Op] = {
    "subscribe": Op(subscribe, ("topic",)),
    "broadcast": Op(broadcast, ("topic", "message")),
    "topic_receive": Op(topic_receive, ("topic",)),
    "store_get": Op(store_get, ("key",)),
    "store_set": Op(store_set, ("key", "value")),
    "store_delete": Op(store_delete, ("key",)),
    "store_list": Op(store_list, ("prefix",)),
    "sleep": Op(sleep, ("ms",)),
    "clock": Op(clock),
    "ping": Op(ping, ("payload",)),
    "model_info": Op(model_info),
    "create_queue": Op(create_queue, ("priority",)),
    "set_priority": Op(set_priority, ("priority",)),
    "synchronize": Op(synchronize),
    "alloc_pages": Op(kv.alloc_pages, ("count",)),
    "free_pages": Op(kv.free_pages, ("pages",)),
    "share_pages": Op(kv.share_pages, ("pages",)),
    "alloc_slots": Op(kv.alloc_slots, ("count",)),
    "free_slots": Op(kv.free_slots, ("slots",)),
    "export_pages": Op(kv.export_pages, ("name", "pages", "persistent")),
    "unexport": Op(kv.unexport, ("name",)),
    "import_pages": Op(kv.import_pages, ("name",)),
    "list_exports": Op(kv.list_exports),
    "copy_kv": Op(inference.copy_kv,
                  ("src_page", "dst_page", "src_offset", "dst_offset", "count")),
    "mask_kv": Op(inference.mask_kv, ("page", "slots", "masked")),
    "forward": Op(inference.forward,
                  ("pages", "last_page_len", "positions", "tokens", "slots", "masks", "outputs",
                   "top_k", "sampler", "vocab_mask", "logit_bias")),
    "embed": Op(inference.embed, ("tokens", "slots")),
    "tokenize": Op(tokenize, ("text",)),
    "detokenize": Op(detokenize, ("tokens",)),
    "vocab": Op(vocab),
}


def _lookup(request: Any) -> tuple[str, Op]:
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


def _check_known_fields(op: Op, request: dict[str, Any]) -> None:
    unknown = sorted(str(k) for k in request if k not in op.fields and k not in ("op", "queue"))
    if unknown:
        expected = ", ".join(op.fields + ("queue",))
        raise ControlError(f"unknown field {unknown[0]!r}; expected some of: {expected}")


def _check_queue_field(request: dict[str, Any]) -> None:
    """A request that dispatch ran at once although it names a queue: say what is wrong."""
    queue_id = request.get("queue")
    if queue_id is None or request["op"] == "set_priority":
        return
    if not is_int(queue_id):
        raise ControlError(f"field 'queue' must be an int, got {type_name(queue_id)}")
    raise ControlError(f"queue {queue_id} is not held by this instance")


async def handle(inst: InstanceControl, request: Any, queue: Queue | None) -> dict[str, Any]:
    """Run one request; `queue` is the queue it was dispatched on (None: run at once)."""
    try:
        name, op = _lookup(request)
    except ControlError as exc:
        return {"error": str(exc)}
    try:
        _check_known_fields(op, request)
        if queue is None:
            _check_queue_field(request)
        priority = queue.priority if queue is not None else 0
        value = await op.handler(inst, Fields(request), priority)
    except (ControlError, CallError) as exc:
        return {"error": f"{name}: {exc}"}
    except Exception as exc:
        logger.exception("op %r of instance %s failed", name, inst.id)
        return {"error": f"{name}: internal error ({type(exc).__name__}: {exc})"}
    return {"ok": value}
