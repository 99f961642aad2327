"""The control layer's queues, messaging, store, tokenizer and model ops, and its errors, over
the real executor and the tiny model."""

from __future__ import annotations

import random

import pytest
import trio
import trio.testing
from control_support import error, ok

from pie_trio.control.controller import Controller, ControlLimits
from pie_trio.executor.executor import Executor


@pytest.fixture
async def stack(tiny_runner):
    async with trio.open_nursery() as nursery:
        executor = Executor(tiny_runner)
        await nursery.start(executor.run)
        limits = ControlLimits(topic_buffer=2, store_max_value_bytes=64,
                               store_max_total_bytes=256)
        controller = Controller(executor, tiny_runner.info, tiny_runner.tokenizer, limits)
        await nursery.start(controller.run)
        yield executor, controller
        nursery.cancel_scope.cancel()


def prefill_request(pages: list[int], start: int, tokens: list[int], page_size: int,
                    **extra) -> dict:
    end = start + len(tokens)
    pages = pages[:-(-end // page_size)]  # the pages the context covers so far
    return {"op": "forward", "pages": pages, "last_page_len": end - (len(pages) - 1) * page_size,
            "positions": list(range(start, end)), "tokens": tokens, **extra}


# -- queues --------------------------------------------------------------------------------


async def test_per_queue_order_holds_under_many_concurrent_queues(stack):
    executor, controller = stack
    rng = random.Random(7)
    instances = [controller.attach(f"i{i}") for i in range(3)]
    queues = {ctl: [0] + [await ok(ctl, "create_queue") for _ in range(4)] for ctl in instances}
    completed: dict[tuple[str, int], list[int]] = {}
    submitted: dict[tuple[str, int], list[int]] = {}
    last_set: dict[str, str] = {}
    for n in range(300):
        ctl = rng.choice(instances)
        queue = rng.choice(queues[ctl])
        key = (ctl.id, queue)
        submitted.setdefault(key, []).append(n)
        # Mixed durations: without per-queue order, a short request would overtake a long one.
        op = rng.choice([{"op": "sleep", "ms": rng.randint(0, 3)}, {"op": "ping"},
                         {"op": "store_set", "key": f"{key}", "value": str(n)}])
        if op["op"] == "store_set":
            last_set[op["key"]] = op["value"]
        ctl.start_request({**op, "queue": queue},
                          lambda r, key=key, n=n: completed.setdefault(key, []).append(n))
    for ctl in instances:
        for queue in queues[ctl]:
            await ok(ctl, "synchronize", queue=queue)
    assert completed == submitted
    for key, value in last_set.items():
        assert await ok(instances[0], "store_get", key=key) == value
    for ctl in instances:
        await ctl.close()


async def test_queued_forwards_run_in_order_and_batch_across_queues(stack):
    executor, controller = stack
    ps = controller.info.page_size
    tokens = [(5 * i + 11) % 400 + 3 for i in range(2 * ps)]
    ctl = controller.attach("a")
    queue_ids = [0] + [await ok(ctl, "create_queue") for _ in range(3)]
    results: dict[int, list[dict]] = {q: [] for q in queue_ids}
    for q in queue_ids:
        pages = await ok(ctl, "alloc_pages", count=2)
        # The prompt in chunks, all submitted at once: each chunk needs the KV of the last.
        for start in range(0, len(tokens), 5):
            chunk = tokens[start:start + 5]
            ctl.start_request({**prefill_request(pages, start, chunk, ps), "queue": q,
                               "outputs": [len(chunk) - 1], "top_k": 4}, results[q].append)
    for q in queue_ids:
        await ok(ctl, "synchronize", queue=q)
    pages = await ok(ctl, "alloc_pages", count=2)
    whole = await ok(ctl, "forward", **{k: v for k, v in prefill_request(
        pages, 0, tokens, ps, outputs=[len(tokens) - 1], top_k=4).items() if k != "op"})
    for q in queue_ids:
        last = results[q][-1]["ok"]["dists"][0]
        assert last[0] == whole["dists"][0][0]
        assert last[1] == pytest.approx(whole["dists"][0][1], rel=1e-3, abs=1e-5)
    # Four queues advanced side by side: some forward batch held more than one of them.
    assert max(executor.stats.forward_calls) > 1
    await ctl.close()


async def test_priorities_reach_the_executor(stack):
    executor, controller = stack
    ps = controller.info.page_size
    ctl = controller.attach("a")
    pages = await ok(ctl, "alloc_pages", count=1)
    high = await ok(ctl, "create_queue", priority=7)
    forward = {k: v for k, v in prefill_request(pages, 0, [1, 2], ps).items() if k != "op"}
    await ok(ctl, "forward", queue=high, **forward)
    assert executor.stats.recent_forwards[-1].priorities == (7,)
    await ok(ctl, "set_priority", queue=high, priority=-3)
    await ok(ctl, "forward", queue=high, **forward)
    assert executor.stats.recent_forwards[-1].priorities == (-3,)
    await ok(ctl, "forward", **forward)  # no queue: priority 0
    assert executor.stats.recent_forwards[-1].priorities == (0,)
    assert await error(ctl, "set_priority", queue=99, priority=1) == (
        "set_priority: queue 99 is not held by this instance"
    )
    assert await error(ctl, "synchronize", queue=99) == (
        "synchronize: queue 99 is not held by this instance"
    )
    await ctl.close()


async def test_a_blocked_queue_does_not_block_others(stack):
    _, controller = stack
    ctl = controller.attach("a")
    other = await ok(ctl, "create_queue")
    answers: list[dict] = []
    await ok(ctl, "subscribe", topic="go")
    ctl.start_request({"op": "topic_receive", "topic": "go", "queue": 0}, answers.append)
    ctl.start_request({"op": "ping", "payload": "behind", "queue": 0}, answers.append)
    assert await ok(ctl, "ping", payload="other queue", queue=other) == "other queue"
    assert await ok(ctl, "ping", payload="no queue") == "no queue"
    await trio.testing.wait_all_tasks_blocked()
    assert answers == []
    assert await ok(ctl, "broadcast", topic="go", message="now") == 1
    await ok(ctl, "synchronize", queue=0)
    assert answers == [{"ok": "now"}, {"ok": "behind"}]
    await ctl.close()


# -- messaging, store, sleep, clock ----------------------------------------------------------


async def test_broadcast_and_subscribe(stack):
    _, controller = stack
    a, b, c = (controller.attach(x) for x in "abc")
    assert await ok(a, "broadcast", topic="news", message="nobody") == 0
    await ok(b, "subscribe", topic="news")
    await ok(c, "subscribe", topic="news")
    await ok(c, "subscribe", topic="news")  # twice is once
    assert await ok(a, "broadcast", topic="news", message="one") == 2
    assert await ok(a, "broadcast", topic="news", message="two") == 2
    assert await ok(b, "topic_receive", topic="news") == "one"
    # c's buffer (2 messages) is full: it misses the third; b still has room.
    assert await ok(a, "broadcast", topic="news", message="three") == 1
    assert [await ok(c, "topic_receive", topic="news") for _ in range(2)] == ["one", "two"]
    assert [await ok(b, "topic_receive", topic="news") for _ in range(2)] == ["two", "three"]
    assert await error(a, "topic_receive", topic="news") == (
        "topic_receive: not subscribed to topic 'news'"
    )
    await c.close()
    assert await ok(a, "broadcast", topic="news", message="four") == 1
    assert controller.stats()["subscriptions"] == 1
    for ctl in (a, b):
        await ctl.close()
    assert controller.stats()["subscriptions"] == 0


async def test_store_is_shared_and_bounded(stack):
    _, controller = stack
    a, b = controller.attach("a"), controller.attach("b")
    assert await ok(a, "store_get", key="k") is None
    await ok(a, "store_set", key="app/k", value="v1")
    await ok(a, "store_set", key="app/j", value="v2")
    await ok(a, "store_set", key="other", value="v3")
    assert await ok(b, "store_get", key="app/k") == "v1"
    assert await ok(b, "store_list", prefix="app/") == ["app/j", "app/k"]
    assert await ok(b, "store_list") == ["app/j", "app/k", "other"]
    assert await ok(b, "store_delete", key="app/k") is True
    assert await ok(b, "store_delete", key="app/k") is False
    assert await error(a, "store_set", key="big", value="x" * 65) == (
        "store_set: value is 65 bytes, the limit is 64"
    )
    for i in range(4):
        await ok(a, "store_set", key=f"fill{i}", value="y" * 50)
    assert (await error(a, "store_set", key="more", value="z" * 50)).startswith(
        "store_set: the store is full"
    )
    await ok(a, "store_set", key="fill0", value="y" * 40)  # replacing a value frees its bytes
    await a.close()
    assert await ok(b, "store_get", key="app/j") == "v2"  # the store outlives instances
    await b.close()


async def test_sleep_clock_and_ping(stack):
    _, controller = stack
    ctl = controller.attach("a")
    answers: list[dict] = []
    ctl.start_request({"op": "sleep", "ms": 30}, answers.append)
    assert await ok(ctl, "ping", payload={"x": [1, b"\x00"]}) == {"x": [1, b"\x00"]}
    assert answers == []  # the sleep is still sleeping; the ping did not wait for it
    before = await ok(ctl, "clock")
    await ok(ctl, "sleep", ms=30)
    assert await ok(ctl, "clock") >= before
    assert isinstance(before, float)
    assert await error(ctl, "sleep", ms=-1) == "sleep: field 'ms' must be at least 0, got -1"
    assert await ok(ctl, "ping") is None
    await ctl.close()


# -- model and tokenizer -----------------------------------------------------------------------


async def test_model_info_and_tokenizer_ops(stack, tiny_runner):
    _, controller = stack
    ctl = controller.attach("a")
    info = await ok(ctl, "model_info")
    assert info["page_size"] == tiny_runner.info.page_size
    assert info["vocab_size"] == tiny_runner.info.vocab_size
    assert set(info) == {"name", "page_size", "vocab_size", "stop_tokens", "chat_template",
                         "bos_token", "eos_token", "max_position"}
    text = "Hello, world! " * 400  # long enough to go to the tokenizer thread
    tokens = await ok(ctl, "tokenize", text=text)
    assert tokens == tiny_runner.tokenizer.encode(text)
    assert await ok(ctl, "detokenize", tokens=tokens) == tiny_runner.tokenizer.decode(tokens)
    assert await ok(ctl, "tokenize", text="hi") == tiny_runner.tokenizer.encode("hi")
    vocab = await ok(ctl, "vocab")
    assert len(vocab) == info["vocab_size"] and all(isinstance(b, bytes) for b in vocab)
    assert await error(ctl, "detokenize", tokens=[info["vocab_size"]]) == (
        f"detokenize: field 'tokens'[0] = {info['vocab_size']} is not below the vocabulary "
        f"size {info['vocab_size']}"
    )
    await ctl.close()


async def test_embed_then_forward_on_slots_matches_tokens(stack):
    _, controller = stack
    ctl = controller.attach("a")
    tokens = [12, 40, 7, 99]
    slots = await ok(ctl, "alloc_slots", count=len(tokens))
    await ok(ctl, "embed", tokens=tokens, slots=slots)
    by_tokens, by_slots = [], []
    for inputs, out in ((dict(tokens=tokens), by_tokens), (dict(slots=slots), by_slots)):
        pages = await ok(ctl, "alloc_pages", count=1)
        out.append(await ok(ctl, "forward", pages=pages, last_page_len=len(tokens),
                            positions=list(range(len(tokens))), outputs=[3], top_k=3,
                            **inputs))
    assert by_tokens[0]["dists"][0][0] == by_slots[0]["dists"][0][0]
    assert by_tokens[0]["dists"][0][1] == pytest.approx(by_slots[0]["dists"][0][1], rel=1e-3)
    assert "slot 99" in await error(ctl, "embed", tokens=[1], slots=[99])
    assert await error(ctl, "embed", tokens=[1, 2], slots=slots[:1]) == (
        "embed: 2 tokens but 1 slots"
    )
    assert await error(ctl, "alloc_slots", count=controller.info.num_slots) == (
        f"alloc_slots: out of embedding slots: {controller.info.num_slots} requested, "
        f"{controller.info.num_slots - len(tokens)} free"
    )
    await ctl.close()
    assert controller.stats()["slots_in_use"] == 0


async def test_forward_returns_only_what_was_asked(stack):
    _, controller = stack
    ps = controller.info.page_size
    ctl = controller.attach("a")
    pages = await ok(ctl, "alloc_pages", count=1)
    base = {k: v for k, v in prefill_request(pages, 0, [3, 4, 5], ps).items() if k != "op"}
    assert await ok(ctl, "forward", **base) == {}
    sampled = await ok(ctl, "forward", **base, outputs=[1, 2], sampler={"seed": 1})
    assert set(sampled) == {"tokens"} and len(sampled["tokens"]) == 2
    both = await ok(ctl, "forward", **base, outputs=[2], top_k=5,
                    sampler={"temperature": 0.7, "top_p": 0.9, "seed": 3},
                    logit_bias={7: 2.5}, vocab_mask=bytes([0xFF]) * (
                        (controller.info.vocab_size + 7) // 8))
    assert set(both) == {"dists", "tokens"}
    ids, probs = both["dists"][0]
    assert len(ids) == len(probs) == 5
    # A vocabulary mask allowing one token forces it.
    only = 42
    mask = bytearray((controller.info.vocab_size + 7) // 8)
    mask[only // 8] |= 1 << (only % 8)
    forced = await ok(ctl, "forward", **base, outputs=[2], sampler={}, vocab_mask=bytes(mask))
    assert forced["tokens"] == [only]
    # With token_bytes, each sampled token's bytes come along (what `vocab` says they are).
    spelled = await ok(ctl, "forward", **base, outputs=[1, 2], sampler={}, token_bytes=True)
    vocab = await ok(ctl, "vocab")
    assert spelled["bytes"] == [vocab[token] for token in spelled["tokens"]]
    assert "bytes" not in await ok(ctl, "forward", **base, outputs=[2], top_k=3,
                                   token_bytes=True)  # nothing sampled, nothing spelled
    await ctl.close()


# -- bad requests --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("req", "message"),
    [
        ({"op": "nope"}, "unknown op 'nope'"),
        ({"count": 1}, "missing field 'op'"),
        ({"op": 3}, "field 'op' must be a str, got int"),
        ({"op": "send", "message": "x"},
         "op 'send' is answered by the runtime, not the control layer"),
        ({"op": "alloc_pages"}, "alloc_pages: missing field 'count'"),
        ({"op": "alloc_pages", "count": "2"}, "alloc_pages: field 'count' must be an int, got str"),
        ({"op": "alloc_pages", "count": True},
         "alloc_pages: field 'count' must be an int, got bool"),
        ({"op": "alloc_pages", "count": -1},
         "alloc_pages: field 'count' must be at least 0, got -1"),
        ({"op": "alloc_pages", "count": 1, "cuont": 1},
         "alloc_pages: unknown field 'cuont'; expected some of: count, queue"),
        ({"op": "free_pages", "pages": [0, "1"]},
         "free_pages: field 'pages'[1] must be an int, got str"),
        ({"op": "ping", "queue": "zero"}, "ping: field 'queue' must be an int, got str"),
        ({"op": "ping", "queue": 5}, "ping: queue 5 is not held by this instance"),
        ({"op": "store_set", "key": "k", "value": 3},
         "store_set: field 'value' must be a str, got int"),
        ({"op": "export_pages", "name": "", "pages": []},
         "export_pages: field 'name' must not be empty"),
        ({"op": "forward", "pages": [], "last_page_len": 1, "positions": [0], "tokens": [1]},
         "forward: field 'pages' must name at least one page"),
        ({"op": "forward", "pages": [0], "last_page_len": 1, "positions": [0]},
         "forward: give exactly one of 'tokens' or 'slots'"),
        ({"op": "forward", "pages": [0], "last_page_len": 1, "positions": [0, 1], "tokens": [1]},
         "forward: 1 inputs but 2 positions"),
        ({"op": "forward", "pages": [0], "last_page_len": 1, "positions": [0, 1],
          "tokens": [1, 2]}, "forward: 2 inputs do not fit in a context of 1 slots"),
        ({"op": "forward", "pages": [0], "last_page_len": 1, "positions": [0], "tokens": [1],
          "sampler": {"top_p": "high"}},
         "forward: sampler: field 'top_p' must be a number, got str"),
        ({"op": "forward", "pages": [0], "last_page_len": 1, "positions": [0], "tokens": [1],
          "sampler": {"temp": 1}},
         "forward: sampler: unknown field 'temp'; expected some of "
         "['temperature', 'top_k', 'top_p', 'min_p', 'seed', 'matcher']"),
        ({"op": "forward", "pages": [0], "last_page_len": 1, "positions": [0], "tokens": [1],
          "logit_bias": {"7": 1.0}},
         "forward: field 'logit_bias' keys must be token ids (int), got str"),
        ({"op": "forward", "pages": [0], "last_page_len": 1, "positions": [0], "tokens": [1],
          "masks": [[1, "x"]]}, "forward: field 'masks'[0] must be a list of int"),
        ({"op": "copy_kv", "src_page": 0, "dst_page": 0, "src_offset": 0, "dst_offset": 1,
          "count": 10_000}, None),
    ],
)
async def test_bad_requests_get_precise_errors(stack, req, message):
    _, controller = stack
    ctl = controller.attach("bad")
    good = controller.attach("good")
    await ok(ctl, "alloc_pages", count=1)
    answers: list[dict] = []
    ctl.start_request(req, answers.append)
    assert await ok(good, "ping", payload=1) == 1  # everyone else carries on
    await trio.testing.wait_all_tasks_blocked()
    [answer] = answers
    if message is None:
        assert answer["error"].startswith("copy_kv: field 'count' must be at most")
    else:
        assert answer == {"error": message}
    await ctl.close()
    await good.close()


async def test_executor_rejections_come_back_as_errors(stack):
    _, controller = stack
    ps = controller.info.page_size
    ctl = controller.attach("a")
    pages = await ok(ctl, "alloc_pages", count=1)
    base = {k: v for k, v in prefill_request(pages, 0, [1, 2], ps).items() if k != "op"}
    vocab = controller.info.vocab_size
    message = await error(ctl, "forward", **{**base, "tokens": [1, vocab]})
    assert message.startswith("forward: ") and str(vocab) in message
    assert (await error(ctl, "forward", **base, outputs=[5])).startswith("forward: ")
    assert await ok(ctl, "forward", **base, outputs=[1], sampler={}) != {}
    await ctl.close()


async def test_non_map_request(stack):
    _, controller = stack
    ctl = controller.attach("a")
    answers: list[dict] = []
    ctl.start_request(["op"], answers.append)  # type: ignore[arg-type]
    await trio.testing.wait_all_tasks_blocked()
    assert answers == [{"error": "a request must be a map, got list"}]
    await ctl.close()


async def test_immediate_ops_are_answered_before_start_request_returns(stack):
    """ping, clock, the store and model_info never wait: no task, no extra pass of trio's loop.
    Named on a queue they keep their place in line; a bad field is still an error."""
    _, controller = stack
    ctl = controller.attach("a")
    answers: list[dict] = []
    for request in ({"op": "ping", "payload": [1, "x"]}, {"op": "store_set", "key": "k",
                    "value": "v"}, {"op": "store_get", "key": "k"}, {"op": "ping", "bogus": 1},
                    {"op": "store_get", "key": 5}):
        ctl.start_request(request, answers.append)
    assert answers == [{"ok": [1, "x"]}, {"ok": None}, {"ok": "v"},
                       {"error": "ping: unknown field 'bogus'; expected some of: payload, queue"},
                       {"error": "store_get: field 'key' must be a str, got int"}]
    ctl.start_request({"op": "ping", "payload": 1, "queue": 0}, answers.append)
    ctl.start_request({"op": "clock", "queue": 0}, answers.append)
    assert len(answers) == 5  # these two take the usual way
    await trio.testing.wait_all_tasks_blocked()
    assert answers[5] == {"ok": 1} and isinstance(answers[6]["ok"], float)
    await ctl.close()


async def test_stateless_ops_are_answered_on_any_thread(stack):
    """ping, clock and model_info touch no shared state: `answer_stateless` answers them at once
    (the runtime calls it on the guest's thread); anything else, a queue named, or a closed
    instance gets None and goes through `start_request`."""
    _, controller = stack
    ctl = controller.attach("a")
    answer = await trio.to_thread.run_sync(ctl.answer_stateless, {"op": "ping", "payload": 7})
    assert answer == {"ok": 7}
    assert isinstance(ctl.answer_stateless({"op": "clock"})["ok"], float)
    assert ctl.answer_stateless({"op": "model_info"})["ok"]["vocab_size"] > 0
    assert ctl.answer_stateless({"op": "ping", "bogus": 1}) == {
        "error": "ping: unknown field 'bogus'; expected some of: payload, queue"}
    for other in ({"op": "store_get", "key": "k"}, {"op": "ping", "queue": 0},
                  {"op": "forward"}, {"op": 3}, ["ping"]):
        assert ctl.answer_stateless(other) is None
    await ctl.close()
    assert ctl.answer_stateless({"op": "ping"}) is None


def test_immediate_ops_never_touch_kv():
    """An immediate op skips the residency gate (preemption.py), so it must not be a KV op."""
    from pie_trio.control.dispatch import OPS, ImmediateOp
    from pie_trio.control.interface import STATELESS_OPS
    from pie_trio.control.preemption import GATED_OPS

    immediate = {name for name, op in OPS.items() if isinstance(op, ImmediateOp)}
    assert immediate == {"ping", "clock", "store_get", "store_set", "store_delete", "store_list",
                         "model_info"}
    assert not immediate & GATED_OPS
    stateless = {name for name, op in OPS.items() if isinstance(op, ImmediateOp) and op.stateless}
    assert stateless == STATELESS_OPS  # the runtime asks `answer_stateless` for these only
