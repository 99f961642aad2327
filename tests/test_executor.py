"""The executor on the tiny model: batching, correctness under concurrency, ordering, policies,
priorities, bad input, cancellation and shutdown.

Timing is never measured. Where a test needs calls to pile up while a forward runs, the real
runner's forward waits at a gate the test opens (`Gated`); where a policy waits for time, trio's
MockClock stands in for the clock.
"""

from __future__ import annotations

import threading
from contextlib import asynccontextmanager
from dataclasses import replace

import pytest
import trio
import trio.testing

from pie_trio.executor.direct import complete
from pie_trio.executor.executor import GATHER_CAP, GATHER_MAX, Executor
from pie_trio.model.calls import (
    AllocPages,
    AllocSlots,
    CallError,
    CopyKv,
    Embed,
    Forward,
    FreePages,
    MaskKv,
    Sampler,
)
from pie_trio.model.tiny import tiny_runner as make_tiny_runner

PAGE = 16


@asynccontextmanager
async def running(executor: Executor):
    async with trio.open_nursery() as nursery:
        await nursery.start(executor.run)
        yield executor
        nursery.cancel_scope.cancel()


class Gated:
    """The real runner, whose forward waits at a gate the test opens: it controls timing only."""

    def __init__(self, runner) -> None:
        self._runner = runner
        self.info = runner.info
        self.entered = threading.Event()  # a forward is waiting at the gate
        self._open = threading.Event()
        self._open.set()

    def __getattr__(self, name):
        return getattr(self._runner, name)

    def close(self) -> None:
        self._open.clear()
        self.entered.clear()

    def open(self) -> None:
        self._open.set()

    async def wait_entered(self) -> None:
        await trio.to_thread.run_sync(self.entered.wait)

    def forward(self, calls):
        self.entered.set()
        self._open.wait()
        return self._runner.forward(calls)


class Poisoned:
    """The real runner, except that a forward batch holding owner 'poison' raises (a fault)."""

    def __init__(self, runner) -> None:
        self._runner = runner
        self.info = runner.info
        self.failed_batch_sizes: list[int] = []

    def __getattr__(self, name):
        return getattr(self._runner, name)

    def forward(self, calls):
        if any(call.owner == "poison" for call in calls):
            self.failed_batch_sizes.append(len(calls))
            raise RuntimeError("injected fault")
        return self._runner.forward(calls)


def prefill(owner, pages, tokens, **fields) -> Forward:
    n = len(tokens)
    return Forward(
        owner=owner,
        kv_pages=pages,
        last_page_len=n - (len(pages) - 1) * PAGE,
        positions=list(range(n)),
        tokens=tokens,
        output_indices=[n - 1],
        sampler=Sampler(),
        **fields,
    )


def prompt_for(i: int) -> list[int]:
    return [300 + (37 * i + 11 * j) % 20000 for j in range(3 + (i * 7) % 40)]


async def submit_all(executor, calls, priorities=None) -> list:
    """Enqueue every call at once, in order (so they arrive together, in that order); gather
    each result (or its CallError)."""
    priorities = priorities or [0] * len(calls)
    requests = [executor.enqueue(call, p) for call, p in zip(calls, priorities, strict=True)]
    results: list = [None] * len(calls)

    async def wait(i):
        try:
            results[i] = await requests[i].wait()
        except CallError as exc:
            results[i] = exc

    async with trio.open_nursery() as nursery:
        for i in range(len(calls)):
            nursery.start_soon(wait, i)
    return results


async def wait_queued(executor, count: int) -> None:
    """Let every task run until blocked, then check how many batched calls wait."""
    await trio.testing.wait_all_tasks_blocked()
    assert executor.queued == count


# ---- many callers ------------------------------------------------------------------------------


async def test_64_concurrent_generations_equal_each_alone_and_share_forwards():
    runner = Poisoned(make_tiny_runner(num_pages=256))
    executor = Executor(runner)
    lengths = [4 + (i * 5) % 9 for i in range(64)]
    async with running(executor):
        alone = [
            await complete(executor, prompt_for(i), max_tokens=lengths[i], owner=f"alone-{i}",
                           ignore_stop=True)
            for i in range(64)
        ]
        assert set(executor.stats.forward_calls) == {1}
        together: list = [None] * 64
        poison_error: list = []

        async def one(i):
            together[i] = await complete(executor, prompt_for(i), max_tokens=lengths[i],
                                         owner=f"seq-{i}", ignore_stop=True)

        async def poison():
            with pytest.raises(CallError, match="injected fault") as info:
                await complete(executor, prompt_for(99), max_tokens=4, owner="poison")
            poison_error.append(info.value)

        async with trio.open_nursery() as nursery:
            for i in range(32):
                nursery.start_soon(one, i)
            nursery.start_soon(poison)  # right in the middle of the others
            for i in range(32, 64):
                nursery.start_soon(one, i)
    assert together == alone
    assert all(len(t) == n for t, n in zip(together, lengths, strict=True))
    assert poison_error and runner.failed_batch_sizes and max(runner.failed_batch_sizes) > 1
    sizes = executor.stats.forward_calls
    assert max(sizes) >= 32, sizes  # the 64 sequences really shared forwards
    assert executor.stats.failed["forward"] == 1
    assert executor.pages.num_used == 0  # every generation returned its pages


async def test_generation_ends_at_stop_token_and_frees_pages(tiny_runner):
    executor = Executor(tiny_runner)
    async with running(executor):
        free_run = await complete(executor, prompt_for(1), max_tokens=12, owner="a",
                                  ignore_stop=True)
        stop = free_run[5]
        first = free_run.index(stop)
        stopped = await complete(executor, prompt_for(1), max_tokens=12, owner="a",
                                 stop_tokens=[stop])
        assert stopped == free_run[:first]
        assert await complete(executor, prompt_for(1), max_tokens=0, owner="a") == []
        with pytest.raises(CallError, match="empty"):
            await complete(executor, [], max_tokens=3, owner="a")
        assert executor.pages.num_used == 0


async def test_long_prompt_is_prefilled_in_chunks_within_the_token_budget():
    runner = make_tiny_runner(num_pages=32)
    prompt = prompt_for(3) * 4  # 100+ tokens
    async with running(Executor(runner)) as whole:
        expected = await complete(whole, prompt, max_tokens=6, owner="a", ignore_stop=True)
    async with running(Executor(runner, max_batch_tokens=16)) as chunked:
        assert await complete(chunked, prompt, max_tokens=6, owner="a",
                              ignore_stop=True) == expected
        assert max(b.tokens for b in chunked.stats.recent_forwards) <= 16


async def test_cancelled_generation_frees_its_pages_and_others_carry_on():
    runner = Gated(make_tiny_runner())
    executor = Executor(runner)
    async with running(executor):
        expected = await complete(executor, prompt_for(2), max_tokens=5, owner="b")
        runner.close()
        async with trio.open_nursery() as nursery:
            victim = trio.CancelScope()

            async def doomed():
                with victim:
                    await complete(executor, prompt_for(1), max_tokens=50, owner="a")

            nursery.start_soon(doomed)
            await runner.wait_entered()  # its prefill is in the worker thread
            result = []

            async def survivor():
                result.append(await complete(executor, prompt_for(2), max_tokens=5, owner="b"))

            nursery.start_soon(survivor)
            await wait_queued(executor, 1)
            victim.cancel()
            await trio.testing.wait_all_tasks_blocked()
            runner.open()
        assert victim.cancelled_caught
        assert result == [expected]
        assert executor.pages.num_used == 0


# ---- order between calls -----------------------------------------------------------------------


async def test_copy_then_forward_in_one_tick_reads_the_copied_rows(tiny_runner):
    """A fork: copy a prefix into a new page, then decode from it, submitted together."""
    executor = Executor(tiny_runner)
    prompt = prompt_for(4)[:10]
    async with running(executor):
        [src] = await executor.submit(AllocPages("a", 1))
        await executor.submit(replace(prefill("a", [src], prompt), sampler=None, top_k=5))
        [dst] = await executor.submit(AllocPages("a", 1))
        decode = dict(kv_pages=[src], last_page_len=11, positions=[10], tokens=[777],
                      output_indices=[0], top_k=5)
        direct = await executor.submit(Forward(owner="a", **decode))
        copy = CopyKv("a", src_page=src, dst_page=dst, src_offset=0, dst_offset=0, count=10)
        forked = Forward(owner="a", **(decode | {"kv_pages": [dst]}))
        copied, via_fork = await submit_all(executor, [copy, forked])
        assert copied is None
        assert executor.stats.ticks == 3  # copy and forward shared one tick
        assert via_fork.dists == direct.dists


async def test_forward_then_copy_waits_for_the_forward(tiny_runner):
    """Copying what a queued forward writes must copy what it wrote, not what was there."""
    executor = Executor(tiny_runner)
    prompt = prompt_for(5)[:8]
    async with running(executor):
        src, dst = await executor.submit(AllocPages("a", 2))
        write = replace(prefill("a", [src], prompt), top_k=4)
        copy = CopyKv("a", src_page=src, dst_page=dst, src_offset=0, dst_offset=0, count=8)
        read_copy = Forward(owner="a", kv_pages=[dst], last_page_len=9, positions=[8],
                            tokens=[900], output_indices=[0], top_k=4)
        _, copied, from_copy = await submit_all(executor, [write, copy, read_copy])
        read_source = replace(read_copy, kv_pages=[src])
        assert (await executor.submit(read_source)).dists == from_copy.dists
        # the copy waited for the forward's tick; the read of the copy joined the copy's tick
        assert executor.stats.ticks == 3


async def test_two_forks_reading_one_prefix_share_a_batch(tiny_runner):
    executor = Executor(tiny_runner)
    prompt = prompt_for(6)[:PAGE]  # exactly one full page, shared read-only
    async with running(executor):
        shared, left, right = await executor.submit(AllocPages("a", 3))
        await executor.submit(prefill("a", [shared], prompt))
        forks = [
            Forward(owner="a", kv_pages=[shared, page], last_page_len=1, positions=[PAGE],
                    tokens=[token], output_indices=[0], sampler=Sampler())
            for page, token in ((left, 500), (right, 600))
        ]
        await submit_all(executor, forks)
        assert executor.stats.recent_forwards[-1].owners == ("a", "a")


async def test_embed_then_forward_on_its_slots(tiny_runner):
    executor = Executor(tiny_runner)
    prompt = prompt_for(7)[:6]
    async with running(executor):
        by_tokens = await executor.submit(replace(
            prefill("a", await executor.submit(AllocPages("a", 1)), prompt), top_k=3))
        slots = await executor.submit(AllocSlots("a", 6))
        pages = await executor.submit(AllocPages("a", 1))
        embed = Embed("a", tokens=prompt, slots=slots)
        forward = replace(prefill("a", pages, prompt), tokens=None, embed_slots=slots, top_k=3)
        _, by_slots = await submit_all(executor, [embed, forward])
        assert by_slots.dists == by_tokens.dists


async def test_mask_kv_changes_what_a_later_forward_sees(tiny_runner):
    executor = Executor(tiny_runner)
    prompt = prompt_for(8)[:8]
    async with running(executor):
        [page] = await executor.submit(AllocPages("a", 1))
        await executor.submit(prefill("a", [page], prompt))
        decode = Forward(owner="a", kv_pages=[page], last_page_len=9, positions=[8],
                         tokens=[321], output_indices=[0], top_k=3)
        before = await executor.submit(decode)
        _, masked = await submit_all(executor, [MaskKv("a", page, [1, 2, 3]), decode])
        assert masked.dists != before.dists


# ---- bad input -------------------------------------------------------------------------------


def bad_calls(own: list[int], other: list[int]) -> dict[str, tuple[object, str]]:
    ok = prefill("bad", own, [400, 401, 402])
    return {
        "page not given": (replace(ok, kv_pages=other), "not allocated to 'bad'"),
        "page out of range": (replace(ok, kv_pages=[10_000]), "out of range"),
        "position out of range": (replace(ok, positions=[0, 1, 10**7]), "positions"),
        "mask length": (replace(ok, masks=[[1], [2], [5]]), "masks"),
        "empty tokens": (replace(ok, tokens=[], positions=[], output_indices=[]), "no input"),
        "negative temperature": (replace(ok, sampler=Sampler(temperature=-1.0)), "temperature"),
        "top_p zero": (replace(ok, sampler=Sampler(top_p=0.0)), "top_p"),
        "token out of vocabulary": (replace(ok, tokens=[1, 2, 10**6]), "tokens"),
        "malformed pages": (replace(ok, kv_pages="abc"), "kv_pages"),
        "copy into a foreign page": (CopyKv("bad", own[0], other[0], 0, 0, 1), "not allocated"),
        "mask a foreign page": (MaskKv("bad", other[0], [0]), "not allocated"),
        "free a foreign page": (FreePages("bad", other), "not allocated to 'bad'"),
        "free twice listed": (FreePages("bad", own + own), "twice"),
        "too many pages": (AllocPages("bad", 10**6), "out of pages"),
        "embed nothing": (Embed("bad", tokens=[], slots=[]), "no tokens"),
        "no owner": (AllocPages(None, 1), "owner"),  # type: ignore[arg-type]
        "not a call": ("forward please", "owner"),
    }


async def test_bad_calls_fail_alone_while_a_neighbour_generates(tiny_runner):
    executor = Executor(tiny_runner)
    async with running(executor):
        expected = await complete(executor, prompt_for(9), max_tokens=8, owner="good")
        own = await executor.submit(AllocPages("bad", 1))
        other = await executor.submit(AllocPages("other", 1))
        cases = bad_calls(own, other)
        neighbour: list = []

        async def good():
            neighbour.append(await complete(executor, prompt_for(9), max_tokens=8, owner="good"))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(good)
            results = await submit_all(executor, [call for call, _ in cases.values()])
        for (name, (_, message)), result in zip(cases.items(), results, strict=True):
            assert isinstance(result, CallError), name
            assert message in str(result), (name, str(result))
        assert neighbour == [expected]
        # the offenders changed nothing: their pages are as they were
        assert executor.pages.owned_by("bad") == own and executor.pages.owned_by("other") == other
        assert executor.pages.num_used == 2


async def test_a_queued_call_on_pages_freed_meanwhile_fails():
    runner = Gated(make_tiny_runner())
    executor = Executor(runner)
    async with running(executor):
        a_pages = await executor.submit(AllocPages("a", 1))
        b_pages = await executor.submit(AllocPages("b", 1))
        runner.close()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(executor.submit, prefill("b", b_pages, [5, 6]))
            await runner.wait_entered()
            results = []

            async def late():
                results.extend(await submit_all(executor, [prefill("a", a_pages, [7, 8])]))

            nursery.start_soon(late)
            await wait_queued(executor, 1)
            await executor.submit(FreePages("a", a_pages))  # answered while a forward runs
            runner.open()
        assert isinstance(results[0], CallError) and "not allocated" in str(results[0])


async def test_a_call_enqueued_with_a_callback_is_answered_through_it_or_abandoned():
    runner = Gated(make_tiny_runner())
    executor = Executor(runner)
    async with running(executor):
        [a_page] = await executor.submit(AllocPages("a", 1))
        [b_page] = await executor.submit(AllocPages("b", 1))
        outcomes: dict[str, object] = {}

        def record(name):
            return lambda result: outcomes.setdefault(name, result)

        # A bad call is answered before `then` is even called: the callback runs at once.
        executor.enqueue(prefill("a", [b_page], [5]), 0).then(record("forged"))
        assert "not allocated" in str(outcomes["forged"].error)
        runner.close()
        executor.enqueue(prefill("a", [a_page], [5, 6]), 0).then(record("good"))
        await runner.wait_entered()
        abandoned = executor.enqueue(prefill("b", [b_page], [7, 8]), 0)
        abandoned.then(record("abandoned"))
        await wait_queued(executor, 1)
        abandoned.abandon()
        runner.open()
        # A later call is answered after a plan that skipped the abandoned one.
        await executor.submit(replace(prefill("a", [a_page], [5, 6, 7]), output_indices=[]))
        assert outcomes["good"].unwrap().tokens is not None
        assert "abandoned" not in outcomes and executor.queued == 0
        assert executor.stats.forward_calls == {1: 2}  # the abandoned call never ran


# ---- batching policies --------------------------------------------------------------------------


async def new_sequences(executor, count):
    return [await executor.submit(AllocPages(f"s{i}", 1)) for i in range(count)]


def decodes(pages_per_seq, tokens=1):
    return [prefill(f"s{i}", pages, list(range(500, 500 + tokens)))
            for i, pages in enumerate(pages_per_seq)]


async def test_adaptive_fires_at_once_then_carries_what_arrived_meanwhile():
    runner = Gated(make_tiny_runner())
    executor = Executor(runner, policy="adaptive")
    async with running(executor):
        calls = decodes(await new_sequences(executor, 6))
        await executor.submit(calls[0])  # alone: no waiting for company
        assert executor.stats.forward_calls == {1: 1}
        runner.close()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(executor.submit, calls[1])
            await runner.wait_entered()
            for call in calls[2:]:
                nursery.start_soon(executor.submit, call)
            await wait_queued(executor, 4)
            runner.open()
        owners = [sorted(batch.owners) for batch in executor.stats.recent_forwards]
        assert owners == [["s0"], ["s1"], ["s2", "s3", "s4", "s5"]]


async def arrive(executor, call):
    """An announced caller's first forward: queued, then no longer expected (as the control
    layer does it, with no checkpoint in between)."""
    request = executor.enqueue(call)
    executor.expect_callers(-1)
    return await request.wait()


async def arrive_apart(nursery, executor, calls, mock_clock, gap: float) -> None:
    """Each of `calls` arrives and waits in the queue (the executor waiting for the callers
    still on their way), then `gap` seconds pass."""
    for i, call in enumerate(calls):
        nursery.start_soon(arrive, executor, call)
        await wait_queued(executor, i + 1)
        mock_clock.jump(gap)


async def test_after_idling_adaptive_waits_for_callers_announced_on_their_way(mock_clock):
    """A burst of launches: the first forwards wait for the others announced with them, so
    all go in one batch rather than the first alone and a step ahead of the rest."""
    executor = Executor(make_tiny_runner(), policy="adaptive")
    async with running(executor):
        calls = decodes(await new_sequences(executor, 3))
        executor.expect_callers(3)
        async with trio.open_nursery() as nursery:
            await arrive_apart(nursery, executor, calls[:2], mock_clock, 0.01)
            nursery.start_soon(arrive, executor, calls[2])
        assert executor.stats.forward_calls == {3: 1}
        assert executor.expected_callers == 0
        await executor.submit(calls[0])  # nobody expected: no waiting
        assert executor.stats.forward_calls == {3: 1, 1: 1}
        mock_clock.jump(1)
        executor.expect_callers(1)  # a lone one, arriving at once: no waiting either
        await arrive(executor, calls[1])
        assert executor.stats.forward_calls == {3: 1, 1: 2}


async def test_a_burst_arriving_slowly_still_shares_its_first_batch(mock_clock):
    """Callers of one burst that arrive a little apart, the last well past GATHER_MAX after the
    announcement, still go in one batch: each arrival shows the burst is still coming in."""
    executor = Executor(make_tiny_runner(), policy="adaptive")
    async with running(executor):
        calls = decodes(await new_sequences(executor, 5))
        executor.expect_callers(5)
        async with trio.open_nursery() as nursery:
            mock_clock.jump(GATHER_MAX * 0.8)
            await arrive_apart(nursery, executor, calls[:4], mock_clock, GATHER_MAX * 0.8)
            nursery.start_soon(arrive, executor, calls[4])
        assert executor.stats.forward_calls == {5: 1}


async def test_a_burst_that_never_ends_arriving_waits_at_most_gather_cap(mock_clock):
    executor = Executor(make_tiny_runner(), policy="adaptive")
    async with running(executor):
        count = int(GATHER_CAP / (GATHER_MAX * 0.5)) + 4
        calls = decodes(await new_sequences(executor, count))
        executor.expect_callers(count + 1)  # one more than ever comes
        async with trio.open_nursery() as nursery:
            for call in calls:
                nursery.start_soon(arrive, executor, call)
                await trio.testing.wait_all_tasks_blocked()
                mock_clock.jump(GATHER_MAX * 0.5)
            mock_clock.autojump_threshold = 0  # the rest go once their waits run out
        first = executor.stats.recent_forwards[0]
        assert 1 < len(first.owners) < count  # it went before the burst was all in


async def test_a_caller_announced_that_never_comes_holds_the_first_batch_briefly(mock_clock):
    executor = Executor(make_tiny_runner(), policy="adaptive")
    async with running(executor):
        calls = decodes(await new_sequences(executor, 1))
        executor.expect_callers(2)  # only one of them comes
        async with trio.open_nursery() as nursery:
            nursery.start_soon(arrive, executor, calls[0])
            await wait_queued(executor, 1)
            mock_clock.jump(GATHER_MAX * 0.9)
            await wait_queued(executor, 1)
            mock_clock.jump(GATHER_MAX * 0.1)
        assert executor.stats.forward_calls == {1: 1}
        assert executor.expected_callers == 1  # (the expectation is stale, and ignored)


async def test_stats_time_the_ticks_themselves(mock_clock):
    """`tick_seconds` counts the time the worker ran the plans (here, two seconds of the test's
    clock while a forward was held at the gate); nothing before the plan is counted."""
    runner = Gated(make_tiny_runner())
    executor = Executor(runner, policy="adaptive")
    async with running(executor):
        [call] = decodes(await new_sequences(executor, 1))
        assert executor.stats.tick_seconds == 0  # allocations are answered without a tick
        runner.close()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(executor.submit, call)
            await runner.wait_entered()
            mock_clock.jump(2)
            runner.open()
        assert executor.stats.ticks == 1
        assert executor.stats.tick_seconds == 2
        assert executor.stats.as_dict()["tick_seconds"] == 2


async def test_k_policy_waits_for_k_forwards():
    executor = Executor(make_tiny_runner(), policy="k", k=4)
    async with running(executor):
        calls = decodes(await new_sequences(executor, 8))
        async with trio.open_nursery() as nursery:
            for call in calls[:3]:
                nursery.start_soon(executor.submit, call)
            await wait_queued(executor, 3)
            assert executor.stats.batches["forward"] == 0  # three are not enough
            nursery.start_soon(executor.submit, calls[3])
        assert executor.stats.forward_calls == {4: 1}
        await submit_all(executor, calls[4:])  # more than k at once: one batch of all
        assert executor.stats.forward_calls == {4: 2}


async def test_t_policy_fires_t_seconds_after_the_first_call(mock_clock):
    executor = Executor(make_tiny_runner(), policy="t", t=10.0)
    async with running(executor):
        calls = decodes(await new_sequences(executor, 3))
        start = trio.current_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(executor.submit, calls[0])
            await wait_queued(executor, 1)
            mock_clock.jump(6)
            for call in calls[1:]:
                nursery.start_soon(executor.submit, call)
            await wait_queued(executor, 3)
            mock_clock.jump(3.9)  # 9.9 s after the first: still waiting
            await wait_queued(executor, 3)
            assert executor.stats.batches["forward"] == 0
            mock_clock.jump(0.1)
        assert trio.current_time() - start == pytest.approx(10.0)
        assert executor.stats.forward_calls == {3: 1}


async def test_kort_policy_fires_on_k_or_on_t(mock_clock):
    executor = Executor(make_tiny_runner(), policy="kort", k=3, t=5.0)
    async with running(executor):
        calls = decodes(await new_sequences(executor, 5))
        await submit_all(executor, calls[:3])  # k reached: no time passes
        assert trio.current_time() == 0 and executor.stats.forward_calls == {3: 1}
        async with trio.open_nursery() as nursery:
            for call in calls[3:]:
                nursery.start_soon(executor.submit, call)
            await wait_queued(executor, 2)
            mock_clock.jump(5)  # t reached with only two
        assert executor.stats.forward_calls == {3: 1, 2: 1}


async def test_higher_priority_goes_first_when_more_waits_than_one_batch_holds():
    runner = Gated(make_tiny_runner())
    executor = Executor(runner, max_batch_tokens=8)
    async with running(executor):
        calls = decodes(await new_sequences(executor, 7), tokens=4)  # 4 tokens each
        priorities = [0, 0, 1, 5, 0, 5, 2]
        runner.close()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(executor.submit, calls[0])
            await runner.wait_entered()
            nursery.start_soon(submit_all, executor, calls[1:], priorities[1:])
            await wait_queued(executor, 6)
            runner.open()
        batches = [(b.owners, b.priorities) for b in executor.stats.recent_forwards]
        assert batches == [
            (("s0",), (0,)),
            (("s3", "s5"), (5, 5)),  # two fit in 8 tokens: the highest priorities
            (("s2", "s6"), (1, 2)),
            (("s1", "s4"), (0, 0)),  # equal priority: arrival order
        ]


# ---- failures and shutdown ----------------------------------------------------------------------


async def test_calls_enqueued_before_run_are_answered_once_it_starts(tiny_runner):
    executor = Executor(tiny_runner)
    early = executor.enqueue(AllocPages("early", 1))
    async with running(executor):
        pages = await early.wait()
        assert len(pages) == 1
        result = await executor.submit(prefill("early", pages, prompt_for(0)))
        assert len(result.tokens) == 1


async def test_shutdown_finishes_the_forward_in_flight_and_fails_the_rest():
    runner = Gated(make_tiny_runner())
    executor = Executor(runner)
    outcomes = {}

    async def caller(name, call):
        try:
            outcomes[name] = await executor.submit(call)
        except CallError as exc:
            outcomes[name] = exc

    threads_before = set(threading.enumerate())
    async with trio.open_nursery() as outer:
        async with trio.open_nursery() as nursery:
            await nursery.start(executor.run)
            calls = decodes(await new_sequences(executor, 2))
            runner.close()
            outer.start_soon(caller, "running", calls[0])
            await runner.wait_entered()
            outer.start_soon(caller, "queued", calls[1])
            await wait_queued(executor, 1)
            nursery.cancel_scope.cancel()
            runner.open()  # the forward in flight cannot be interrupted; shutdown waits for it
    assert outcomes["running"].tokens  # it ran, so its caller gets the result
    assert isinstance(outcomes["queued"], CallError) and "stopped" in str(outcomes["queued"])
    with pytest.raises(CallError, match="not running"):
        await executor.submit(AllocPages("late", 1))
    for thread in set(threading.enumerate()) - threads_before:  # the executor's worker ends
        thread.join(10)
        assert not thread.is_alive(), thread.name
