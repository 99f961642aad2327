"""The control layer over the real executor and the tiny model: virtual ids, sharing with
copy-on-write, exports, out-of-pages, and a randomized lifecycle proving nothing leaks."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import pytest
import trio
import trio.testing
from control_support import error, ok, request

from pie_trio.control.controller import Controller
from pie_trio.control.instance import InstanceControl
from pie_trio.executor.executor import Executor
from pie_trio.model.calls import AllocPages, FreePages


@dataclass
class Stack:
    executor: Executor
    controller: Controller

    @property
    def page_size(self) -> int:
        return self.controller.info.page_size


async def start_stack(nursery: trio.Nursery, executor: Executor, runner) -> Stack:
    await nursery.start(executor.run)
    controller = Controller(executor, runner.info, runner.tokenizer)
    await nursery.start(controller.run)
    return Stack(executor, controller)


@pytest.fixture
async def stack(tiny_runner):
    async with trio.open_nursery() as nursery:
        yield await start_stack(nursery, Executor(tiny_runner), tiny_runner)
        nursery.cancel_scope.cancel()


@pytest.fixture
async def stalled_stack(tiny_runner):
    """An executor whose forwards never fire (the `k` policy, waiting for 10**6 of them), so a
    test can close an instance while its forward is certainly inside the executor."""
    async with trio.open_nursery() as nursery:
        executor = Executor(tiny_runner, policy="k", k=10**6)
        yield await start_stack(nursery, executor, tiny_runner)
        nursery.cancel_scope.cancel()


class Context:
    """A test's token sequence in one instance's virtual pages, grown forward by forward."""

    def __init__(self, ctl: InstanceControl, page_size: int, pages=None, length: int = 0):
        self.ctl = ctl
        self.page_size = page_size
        self.pages: list[int] = list(pages or [])
        self.length = length

    async def append(self, tokens: list[int], **fields) -> dict:
        """Forward `tokens`; the distribution (top 8) and greedy token after the last one."""
        new_length = self.length + len(tokens)
        missing = math.ceil(new_length / self.page_size) - len(self.pages)
        if missing > 0:
            self.pages += await ok(self.ctl, "alloc_pages", count=missing)
        value = await ok(
            self.ctl, "forward", pages=self.pages,
            last_page_len=new_length - (len(self.pages) - 1) * self.page_size,
            positions=list(range(self.length, new_length)), tokens=tokens,
            outputs=[len(tokens) - 1], top_k=8, sampler={"temperature": 0.0}, **fields,
        )
        self.length = new_length
        return value

    async def fork(self) -> Context:
        pages = await ok(self.ctl, "share_pages", pages=self.pages)
        return Context(self.ctl, self.page_size, pages, self.length)

    async def generate(self, first: int, steps: int) -> list[dict]:
        """Greedy steps from `first`: each step's forward value (distribution and token)."""
        values, token = [], first
        for _ in range(steps):
            values.append(await self.append([token]))
            token = values[-1]["tokens"][0]
        return values


def assert_same_dist(a: dict, b: dict) -> None:
    (ids_a, probs_a), (ids_b, probs_b) = a["dists"][0], b["dists"][0]
    assert ids_a[0] == ids_b[0], (a, b)
    assert probs_a[0] == pytest.approx(probs_b[0], rel=1e-3, abs=1e-5)
    assert sorted(probs_a) == pytest.approx(sorted(probs_b), rel=1e-3, abs=1e-5)


def prompt(length: int) -> list[int]:
    return [(7 * i + 3) % 500 + 10 for i in range(length)]


async def settled(stack: Stack) -> dict:
    await trio.testing.wait_all_tasks_blocked()
    await stack.controller.releaser.flushed()
    return stack.controller.stats()


# -- virtual ids ---------------------------------------------------------------------------


async def test_virtual_ids_are_per_instance(stack):
    a, b = stack.controller.attach("a"), stack.controller.attach("b")
    ctx_a = Context(a, stack.page_size)
    before = await ctx_a.append(prompt(5))
    b_pages = await ok(b, "alloc_pages", count=1)
    held_by_a_only = max(ctx_a.pages + b_pages) + 1
    a_more = await ok(a, "alloc_pages", count=held_by_a_only + 1 - len(ctx_a.pages))
    assert held_by_a_only in ctx_a.pages + a_more

    assert await error(b, "free_pages", pages=[held_by_a_only]) == (
        f"free_pages: page {held_by_a_only} is not held by this instance"
    )
    forged = 10**9
    message = await error(b, "forward", pages=b_pages + [forged], last_page_len=1,
                          positions=[0], tokens=[1])
    assert message == f"forward: page {forged} is not held by this instance"
    assert "page 77" in await error(b, "share_pages", pages=[77])
    assert "page 77" in await error(b, "export_pages", name="x", pages=[77])
    assert "slot 0" in await error(b, "free_slots", slots=[0])

    # A is unaffected: its pages still hold its context.
    again = await Context(a, stack.page_size, ctx_a.pages, 0).append(prompt(5))
    assert_same_dist(before, again)
    stats = await settled(stack)
    assert stats["pages_in_use"] == len(ctx_a.pages) + len(a_more) + len(b_pages)
    await a.close()
    await b.close()
    assert (await settled(stack))["pages_in_use"] == 0


async def test_an_instance_is_expected_by_the_executor_until_its_first_forward(stack):
    """Launched together, instances share their first forward (executor: expect_callers)."""
    a, b = stack.controller.attach("a"), stack.controller.attach("b")
    assert stack.executor.expected_callers == 2
    await ok(a, "alloc_pages", count=1)  # not a forward: still on its way
    assert stack.executor.expected_callers == 2
    await Context(a, stack.page_size).append(prompt(3))
    assert stack.executor.expected_callers == 1
    await b.close()  # ends without a forward: no longer expected
    assert stack.executor.expected_callers == 0
    await a.close()
    assert stack.executor.expected_callers == 0


async def test_free_is_all_or_nothing(stack):
    a = stack.controller.attach("a")
    pages = await ok(a, "alloc_pages", count=3)
    assert await error(a, "free_pages", pages=[pages[0], 99]) == (
        "free_pages: page 99 is not held by this instance"
    )
    assert await error(a, "free_pages", pages=[pages[1], pages[1]]) == (
        f"free_pages: page {pages[1]} named twice"
    )
    assert (await settled(stack))["pages_in_use"] == 3
    await ok(a, "free_pages", pages=pages)
    assert (await settled(stack))["pages_in_use"] == 0
    assert "not held" in await error(a, "free_pages", pages=[pages[0]])  # ids are not reused
    await a.close()


# -- sharing and copy-on-write ---------------------------------------------------------------


async def test_fork_shares_full_pages_and_generates_like_unshared_contexts(stack):
    ps = stack.page_size
    a = stack.controller.attach("a")
    shared_prompt = prompt(2 * ps + ps // 2)
    steps = 6
    length = len(shared_prompt) + steps
    forks: list[Context] = [Context(a, ps)]
    await forks[0].append(shared_prompt)
    forks.append(await forks[0].fork())
    assert (await settled(stack))["pages_in_use"] == math.ceil(len(shared_prompt) / ps)

    async def generate_pair(contexts: list[Context]) -> list[list[dict]]:
        out: list[list[dict]] = [[], []]

        async def one(i: int) -> None:
            out[i] = await contexts[i].generate(first=100 + i, steps=steps)

        async with trio.open_nursery() as nursery:
            for i in range(2):
                nursery.start_soon(one, i)
        return out

    forked = await generate_pair(forks)
    full_shared = len(shared_prompt) // ps
    expected_physical = full_shared + 2 * (math.ceil(length / ps) - full_shared)
    assert (await settled(stack))["pages_in_use"] == expected_physical
    assert expected_physical < 2 * math.ceil(length / ps)

    singles = [Context(a, ps), Context(a, ps)]
    for single in singles:
        await single.append(shared_prompt)
    for fork_steps, single_steps in zip(forked, await generate_pair(singles), strict=True):
        assert [v["tokens"] for v in fork_steps] == [v["tokens"] for v in single_steps]
        for fork_value, single_value in zip(fork_steps, single_steps, strict=True):
            assert_same_dist(fork_value, single_value)
    await a.close()
    assert (await settled(stack))["pages_in_use"] == 0


async def test_write_into_shared_partial_page_copies_it(stack):
    ps = stack.page_size
    a = stack.controller.attach("a")
    base = Context(a, ps)
    await base.append(prompt(ps + 3))
    fork = await base.fork()
    pages_before = (await settled(stack))["pages_in_use"]

    await fork.append([200])  # writes into the shared partial page: it gets a copy
    assert (await settled(stack))["pages_in_use"] == pages_before + 1
    await base.append([300])  # now the only name of the old page: written in place
    assert (await settled(stack))["pages_in_use"] == pages_before + 1
    after_fork = await fork.append([201])  # reads row ps+3, which base also wrote

    reference = Context(a, ps)
    await reference.append(prompt(ps + 3) + [200])
    assert_same_dist(after_fork, await reference.append([201]))
    await a.close()


async def test_mask_and_copy_into_shared_page_copy_it_first(stack):
    ps = stack.page_size
    a = stack.controller.attach("a")
    base = Context(a, ps)
    await base.append(prompt(ps + 2))
    masked, copied = await base.fork(), await base.fork()
    pages_before = (await settled(stack))["pages_in_use"]

    await ok(a, "mask_kv", page=masked.pages[0], slots=[1, 2, 3], masked=True)
    await ok(a, "copy_kv", src_page=copied.pages[1], dst_page=copied.pages[0],
             src_offset=0, dst_offset=0, count=2)
    assert (await settled(stack))["pages_in_use"] == pages_before + 2

    reference = Context(a, ps)
    await reference.append(prompt(ps + 2))
    expected = await reference.append([42])
    assert_same_dist(await base.append([42]), expected)  # the original page is intact
    # The masked and copied forks really changed: their next distributions differ.
    assert (await masked.append([42]))["dists"] != expected["dists"]
    assert (await copied.append([42]))["dists"] != expected["dists"]
    await a.close()


# -- exports ---------------------------------------------------------------------------------


async def test_export_import_across_instances(stack):
    ps = stack.page_size
    owner, reader = stack.controller.attach("owner"), stack.controller.attach("reader")
    source = Context(owner, ps)
    await source.append(prompt(ps + 4))
    await ok(owner, "export_pages", name="doc", pages=source.pages)
    assert "already exported" in await error(owner, "export_pages", name="doc",
                                             pages=source.pages)
    assert await ok(reader, "list_exports") == ["doc"]
    imported = Context(reader, ps, await ok(reader, "import_pages", name="doc"), source.length)
    assert (await settled(stack))["pages_in_use"] == len(source.pages)

    await owner.close()  # the owner-bound export vanishes; the imported pages stay valid
    assert await ok(reader, "list_exports") == []
    assert await error(reader, "import_pages", name="doc") == (
        "import_pages: no export named 'doc'"
    )
    other = stack.controller.attach("other")
    reference = Context(other, ps)
    await reference.append(prompt(ps + 4))
    assert_same_dist(await imported.append([9]), await reference.append([9]))
    await reader.close()
    await other.close()
    assert (await settled(stack))["pages_in_use"] == 0


async def test_persistent_export_survives_its_owner(stack):
    ps = stack.page_size
    owner = stack.controller.attach("owner")
    source = Context(owner, ps)
    await source.append(prompt(ps))
    await ok(owner, "export_pages", name="kept", pages=source.pages, persistent=True)
    await owner.close()
    stats = await settled(stack)
    assert stats["exports"] == 1 and stats["pages_in_use"] == len(source.pages)

    later = stack.controller.attach("later")
    assert await ok(later, "list_exports") == ["kept"]
    pages = await ok(later, "import_pages", name="kept")
    await ok(later, "unexport", name="kept")
    assert await error(later, "unexport", name="kept") == "unexport: no export named 'kept'"
    assert (await settled(stack))["pages_in_use"] == len(pages)  # still held by `later`
    await later.close()
    stats = await settled(stack)
    assert stats["exports"] == 0 and stats["pages_in_use"] == 0


# -- capacity ----------------------------------------------------------------------------------


async def test_out_of_pages_is_refused_with_the_documented_error(stack):
    total = stack.controller.info.num_pages
    a, b = stack.controller.attach("a"), stack.controller.attach("b")
    held = await ok(a, "alloc_pages", count=total - 2)
    assert await error(b, "alloc_pages", count=3) == (
        "alloc_pages: out of KV pages: 3 requested, 2 free"
    )
    two = await ok(b, "alloc_pages", count=2)
    # A copy-on-write needs a page too, and is refused the same way.
    shared = await ok(a, "share_pages", pages=held[:1])
    assert await error(a, "mask_kv", page=shared[0], slots=[0]) == (
        "mask_kv: out of KV pages: 1 requested, 0 free"
    )
    await ok(a, "free_pages", pages=held[1:2])
    await ok(a, "mask_kv", page=shared[0], slots=[0])  # retry after freeing succeeds
    await ok(b, "free_pages", pages=two)
    assert len(await ok(b, "alloc_pages", count=2)) == 2
    await a.close()
    await b.close()
    assert (await settled(stack))["pages_in_use"] == 0
    assert stack.executor.pages.num_used == 0


async def test_pages_held_by_other_executor_users_are_not_promised(stack):
    total = stack.controller.info.num_pages
    other = await stack.executor.submit(AllocPages("direct-generation", total - 4))
    a = stack.controller.attach("a")
    assert await error(a, "alloc_pages", count=5) == (
        "alloc_pages: out of KV pages: 5 requested, 4 free"
    )
    assert len(await ok(a, "alloc_pages", count=4)) == 4
    await a.close()
    await stack.executor.submit(FreePages("direct-generation", other))


# -- closing -----------------------------------------------------------------------------------


async def test_close_mid_forward_answers_pending_and_frees_everything(stalled_stack):
    stack = stalled_stack
    ps = stack.page_size
    a = stack.controller.attach("a")
    pages = await ok(a, "alloc_pages", count=4)
    slots = await ok(a, "alloc_slots", count=2)
    await ok(a, "subscribe", topic="t")
    await ok(a, "export_pages", name="bound", pages=pages[:1])
    answers: list[dict] = []
    a.start_request({"op": "forward", "queue": 0, "pages": pages, "last_page_len": ps,
                     "positions": list(range(4 * ps)), "tokens": prompt(4 * ps)},
                    answers.append)
    a.start_request({"op": "topic_receive", "topic": "t"}, answers.append)
    a.start_request({"op": "sleep", "ms": 10_000}, answers.append)
    await trio.testing.wait_all_tasks_blocked()
    assert stack.executor.queued == 1  # the forward waits inside the executor
    await a.close()
    assert answers == [{"error": "instance closed"}] * 3
    await a.close()  # idempotent
    a.start_request({"op": "ping"}, answers.append)
    await trio.testing.wait_all_tasks_blocked()
    assert answers[-1] == {"error": "instance closed"}
    stats = await settled(stack)
    assert stats == {**stats, "pages_in_use": 0, "slots_in_use": 0, "exports": 0,
                     "instances": 0, "subscriptions": 0}
    assert slots and stack.executor.pages.num_used == 0 and stack.executor.slots.num_used == 0


async def test_pages_named_by_a_call_in_flight_stay_allocated(stalled_stack):
    stack = stalled_stack
    total = stack.controller.info.num_pages
    a, b = stack.controller.attach("a"), stack.controller.attach("b")
    [page] = await ok(a, "alloc_pages", count=1)
    answers: list[dict] = []
    a.start_request({"op": "forward", "pages": [page], "last_page_len": 2,
                     "positions": [0, 1], "tokens": [5, 6]}, answers.append)
    await trio.testing.wait_all_tasks_blocked()
    await ok(a, "free_pages", pages=[page])  # freed by name, but the forward still writes it
    assert (await settled(stack))["pages_in_use"] == 1
    assert await error(b, "alloc_pages", count=total) == (
        f"alloc_pages: out of KV pages: {total} requested, {total - 1} free"
    )
    await a.close()  # cancels the forward: now the page goes back
    assert answers == [{"error": "instance closed"}]
    assert len(await ok(b, "alloc_pages", count=total)) == total
    await b.close()


async def test_requests_behind_a_forward_run_without_a_task_wait_their_turn(stack):
    """A forward on an idle queue is submitted in the guest's crossing, with no task; what
    follows it on the queue starts only once it is answered, and it leaves nothing held."""
    a = stack.controller.attach("a")
    pages = await ok(a, "alloc_pages", count=1)
    order: list[str] = []

    def on_done(name):
        return lambda response: order.append(name if "ok" in response else response["error"])

    first = {"op": "forward", "queue": 0, "pages": pages, "last_page_len": 3,
             "positions": [0, 1, 2], "tokens": prompt(3)}
    second = {**first, "last_page_len": 4, "positions": [3], "tokens": [prompt(4)[3]]}
    a.start_request(first, on_done("first"))
    assert stack.executor.queued == 1  # submitted before start_request returned
    a.start_request({"op": "synchronize", "queue": 0}, on_done("synchronize"))
    a.start_request(second, on_done("second"))
    a.start_request({**first, "queue": 7}, on_done("bad queue"))
    assert stack.executor.queued == 1  # the rest wait for the first, on the queue
    with trio.fail_after(30):
        while len(order) < 4:
            await trio.sleep(0.01)
    refused = "forward: queue 7 is not held by this instance"
    assert [name for name in order if name != refused] == ["first", "synchronize", "second"]
    assert refused in order
    assert a.context.residency.active == 0
    await a.close()
    assert (await settled(stack))["pages_in_use"] == 0


async def test_close_during_shutdown_does_not_hang(tiny_runner):
    """As the runtime does it: a shielded close() while the whole server is being cancelled."""
    answers: list[dict] = []

    async def instance_owner(ctl: InstanceControl, *, task_status) -> None:
        task_status.started()
        try:
            await trio.sleep_forever()
        finally:
            # The deadline only turns a hang into a failure; it is not a timing check.
            with trio.CancelScope(shield=True, deadline=trio.current_time() + 30) as guard:
                await ctl.close()
            assert not guard.cancelled_caught, "close() hung during shutdown"

    async with trio.open_nursery() as nursery:
        stack = await start_stack(nursery, Executor(tiny_runner), tiny_runner)
        ctl = stack.controller.attach("a")
        await nursery.start(instance_owner, ctl)
        await ok(ctl, "alloc_pages", count=2)
        ctl.start_request({"op": "sleep", "ms": 10**7}, answers.append)
        nursery.cancel_scope.cancel()
    assert answers == [{"error": "instance closed"}]
    assert not stack.controller.running
    await ctl.close()  # after shutdown too: returns at once


async def test_concurrent_closes_are_safe(stack):
    a = stack.controller.attach("a")
    await ok(a, "alloc_pages", count=2)
    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(a.close)
    assert (await settled(stack))["pages_in_use"] == 0
    b = stack.controller.attach("a")  # the id is free again
    assert await ok(b, "ping", payload=1) == 1
    with pytest.raises(ValueError, match="already attached"):
        stack.controller.attach("a")
    await b.close()


# -- randomized lifecycle ----------------------------------------------------------------------


class RandomInstance:
    """Random requests for one instance: mostly valid, some refused, some left in flight."""

    OPS = ["alloc", "alloc", "share", "share", "free", "export", "import", "unexport",
           "forward", "forward", "forward", "forward", "slots", "free_slots", "forged"]

    def __init__(self, stack: Stack, ctl: InstanceControl, rng: random.Random):
        self.stack, self.ctl, self.rng = stack, ctl, rng
        self.pages: list[int] = []
        self.slots: list[int] = []
        self.submitted = 0
        self.answers: list[dict] = []

    def submit(self, op: str, **fields) -> None:
        self.submitted += 1
        self.ctl.start_request({"op": op, **fields}, self.answers.append)

    async def call(self, op: str, **fields):
        response = await request(self.ctl, op, **fields)
        assert "internal error" not in response.get("error", ""), response
        return response.get("ok")

    async def step(self) -> None:
        rng = self.rng
        op = rng.choice(self.OPS)
        if op == "alloc":
            count = rng.choice([1, 2, 3, 40])  # 40: often more than is free
            self.pages += await self.call("alloc_pages", count=count) or []
        elif op == "share" and self.pages:
            some = rng.sample(self.pages, rng.randint(1, len(self.pages)))
            self.pages += await self.call("share_pages", pages=some) or []
        elif op == "free" and self.pages:
            gone = rng.sample(self.pages, rng.randint(1, len(self.pages)))
            await self.call("free_pages", pages=gone)
            self.pages = [p for p in self.pages if p not in gone]
        elif op == "export" and self.pages:
            await self.call("export_pages", name=f"e{rng.randrange(4)}", pages=self.pages[:2],
                            persistent=rng.random() < 0.3)
        elif op == "import" and (names := await self.call("list_exports")):
            self.pages += await self.call("import_pages", name=rng.choice(names)) or []
        elif op == "unexport" and (names := await self.call("list_exports")):
            await self.call("unexport", name=rng.choice(names))
        elif op == "forward" and self.pages:
            await self.forward()
        elif op == "slots":
            self.slots += await self.call("alloc_slots", count=rng.randint(1, 2)) or []
            if self.slots:
                self.submit("embed", tokens=[5] * len(self.slots[:2]), slots=self.slots[:2])
        elif op == "free_slots" and self.slots:
            await self.call("free_slots", slots=[self.slots.pop()])
        elif op == "forged":  # ids this instance never held: refused, harmlessly
            assert "not held" in (await request(self.ctl, "free_pages", pages=[10**6]))["error"]

    async def forward(self) -> None:
        """A forward on 1-2 of the instance's pages, often shared: a copy-on-write case."""
        rng, ps = self.rng, self.stack.page_size
        pages = rng.sample(self.pages, rng.randint(1, min(2, len(self.pages))))
        last = rng.randint(1, ps)
        ctx_len = (len(pages) - 1) * ps + last
        n = rng.randint(1, min(ctx_len, 8))
        forward = dict(pages=pages, last_page_len=last, positions=list(range(ctx_len - n, ctx_len)),
                       tokens=prompt(n), outputs=[n - 1], top_k=2)
        if rng.random() < 0.5:
            self.submit("forward", queue=0, **forward)  # not awaited: may be mid-flight
        else:
            await self.call("forward", **forward)


async def test_random_lifecycles_leak_nothing(stack):
    rng = random.Random(1234)
    controller = stack.controller
    for sequence in range(200):
        instances = [RandomInstance(stack, controller.attach(f"s{sequence}-{i}"), rng)
                     for i in range(rng.randint(1, 3))]
        for _ in range(rng.randint(4, 16)):
            instance = rng.choice(instances)
            if instance.ctl.closed:
                continue
            await instance.step()
            if rng.random() < 0.05:
                await instance.ctl.close()  # possibly with a forward or an embed in flight
        for instance in instances:
            await instance.ctl.close()
        for instance in instances:  # every request answered exactly once, closed or not
            assert len(instance.answers) == instance.submitted
            assert all(("ok" in a) != ("error" in a) for a in instance.answers)
    cleaner = controller.attach("cleaner")
    for name in await ok(cleaner, "list_exports"):
        await ok(cleaner, "unexport", name=name)
    await cleaner.close()

    stats = await settled(stack)
    assert stats == {**stats, "pages_in_use": 0, "slots_in_use": 0, "exports": 0,
                     "instances": 0}
    assert stack.executor.pages.num_used == 0 and stack.executor.slots.num_used == 0
    # No task outlives its instance: the controller's nursery holds only the releaser.
    assert len(controller._nursery.child_tasks) == 1
