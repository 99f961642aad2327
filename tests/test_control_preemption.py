"""KV contention with `kv_policy="preempt"`: a newer instance's pages go to host memory and come
back, the work it did survives, and nothing is left behind — over the tiny model, at the control
layer and through the runtime with the built-in text-completion inferlet."""

from __future__ import annotations

import math

import pytest
import trio
import trio.testing
from control_support import error, ok
from test_runtime_support import finish, running_stack

from pie_trio.control.controller import Controller, ControlLimits
from pie_trio.executor.executor import Executor
from pie_trio.model.calls import SwapInKv, SwapOutKv
from pie_trio.model.remote import RemoteRunner
from pie_trio.model.tiny import tiny_runner as make_tiny_runner

PREEMPT = ControlLimits(kv_policy="preempt")


def prompt(length: int) -> list[int]:
    return [(7 * i + 3) % 500 + 10 for i in range(length)]


class Sequence:
    """One instance's token sequence in its own pages, grown forward by forward."""

    def __init__(self, ctl, page_size: int):
        self.ctl = ctl
        self.page_size = page_size
        self.pages: list[int] = []
        self.length = 0

    async def extend(self, tokens: list[int]) -> dict:
        """Forward `tokens` (allocating pages as needed); the top-8 of the last one."""
        new_length = self.length + len(tokens)
        needed = math.ceil(new_length / self.page_size) - len(self.pages)
        if needed > 0:
            self.pages += await ok(self.ctl, "alloc_pages", count=needed)
        result = await ok(self.ctl, "forward", pages=self.pages,
                          last_page_len=new_length - (len(self.pages) - 1) * self.page_size,
                          positions=list(range(self.length, new_length)), tokens=tokens,
                          outputs=[len(tokens) - 1], top_k=8)
        self.length = new_length
        return result


async def settled(controller: Controller) -> dict:
    await trio.testing.wait_all_tasks_blocked()
    await controller.releaser.flushed()
    return controller.stats()


async def start(nursery: trio.Nursery, runner, limits: ControlLimits = PREEMPT) -> Controller:
    executor = Executor(runner)
    await nursery.start(executor.run)
    controller = Controller(executor, runner.info, runner.tokenizer, limits=limits)
    await nursery.start(controller.run)
    return controller


async def reference_dists(tokens: list[int], more: list[int]) -> dict:
    """What a sequence of `tokens` then `more` answers with all the pages it wants."""
    runner = make_tiny_runner(num_pages=32)
    async with trio.open_nursery() as nursery:
        controller = await start(nursery, runner)
        seq = Sequence(controller.attach("ref"), runner.info.page_size)
        await seq.extend(tokens)
        result = await seq.extend(more)
        nursery.cancel_scope.cancel()
    return result


async def test_an_older_instance_preempts_a_newer_one_which_resumes_where_it_was():
    runner = make_tiny_runner(num_pages=8)
    ps = runner.info.page_size
    async with trio.open_nursery() as nursery:
        controller = await start(nursery, runner)
        old, new = controller.attach("old"), controller.attach("new")
        older, newer = Sequence(old, ps), Sequence(new, ps)
        await older.extend(prompt(ps))  # 1 page
        await newer.extend(prompt(5 * ps + 3))  # 6 pages: 1 left free
        held = await ok(old, "alloc_pages", count=4)  # takes the newer one's pages
        stats = await settled(controller)
        assert stats["preemptions"] == 1 and stats["swapped_pages"] == 6
        assert len(runner.kv.host) == 6 and new.usage()["pages"] == 6
        # The newer instance's next forward waits (it is not refused) until pages come back.
        answers: list[dict] = []

        async def resume() -> None:
            answers.append(await newer.extend([42]))

        nursery.start_soon(resume)
        await trio.testing.wait_all_tasks_blocked()
        assert not answers
        await ok(old, "free_pages", pages=held)
        with trio.fail_after(30):
            while not answers:
                await trio.sleep(0.01)
        [result] = answers
        stats = await settled(controller)
        assert stats["restores"] == 1 and stats["swapped_pages"] == 0 and not runner.kv.host
        page_bytes = runner.kv.k[:, :, :ps].nbytes * 2 + ps  # K, V and the masked flags
        assert stats["swap_bytes"] == 2 * 6 * page_bytes
        await old.close()
        await new.close()
        assert (await settled(controller))["pages_in_use"] == 0
        nursery.cancel_scope.cancel()
    assert result == await reference_dists(prompt(5 * ps + 3), [42])


async def test_a_newer_instance_waits_for_pages_instead_of_failing():
    runner = make_tiny_runner(num_pages=4)
    async with trio.open_nursery() as nursery:
        controller = await start(nursery, runner)
        old, new = controller.attach("old"), controller.attach("new")
        held = await ok(old, "alloc_pages", count=4)
        got: list[list[int]] = []

        async def allocate() -> None:
            got.append(await ok(new, "alloc_pages", count=2))

        nursery.start_soon(allocate)
        await trio.testing.wait_all_tasks_blocked()
        assert not got and controller.stats()["preemptions"] == 0  # older pages stay put
        await ok(old, "free_pages", pages=held[:2])
        await trio.testing.wait_all_tasks_blocked()
        assert len(got) == 1 and len(got[0]) == 2
        await old.close()
        await new.close()
        nursery.cancel_scope.cancel()


async def test_what_can_never_fit_is_refused_with_its_own_reason():
    runner = make_tiny_runner(num_pages=4)
    async with trio.open_nursery() as nursery:
        controller = await start(nursery, runner)
        alone = controller.attach("alone")
        assert await error(alone, "alloc_pages", count=5) == (
            "alloc_pages: out of KV pages: 5 requested, 4 free")
        await ok(alone, "alloc_pages", count=3)
        assert await error(alone, "alloc_pages", count=2) == (
            "alloc_pages: out of KV pages: 2 requested, 1 free, nothing left to preempt")
        await alone.close()
        nursery.cancel_scope.cancel()


async def test_an_instance_closed_while_swapped_out_drops_its_host_copies():
    runner = make_tiny_runner(num_pages=4)
    ps = runner.info.page_size
    async with trio.open_nursery() as nursery:
        controller = await start(nursery, runner)
        old, new = controller.attach("old"), controller.attach("new")
        await Sequence(new, ps).extend(prompt(3 * ps))
        held = await ok(old, "alloc_pages", count=4)
        assert (await settled(controller))["swapped_pages"] == 3 and len(runner.kv.host) == 3
        await new.close()
        stats = await settled(controller)
        assert stats["swapped_pages"] == 0 and not runner.kv.host and stats["restores"] == 0
        await ok(old, "free_pages", pages=held)
        await old.close()
        assert (await settled(controller))["pages_in_use"] == 0
        nursery.cancel_scope.cancel()


async def test_pages_the_victim_shares_stay_in_the_pool():
    runner = make_tiny_runner(num_pages=4)
    async with trio.open_nursery() as nursery:
        controller = await start(nursery, runner)
        old, new = controller.attach("old"), controller.attach("new")
        pages = await ok(new, "alloc_pages", count=3)
        await ok(new, "export_pages", name="kept", pages=pages[:1])
        held = await ok(old, "alloc_pages", count=2)
        assert (await settled(controller))["swapped_pages"] == 2
        assert new.usage()["pages"] == 3
        await ok(old, "free_pages", pages=held)
        await ok(new, "free_pages", pages=pages[1:])  # waits for the restore, then frees
        stats = await settled(controller)
        assert stats["restores"] == 1 and stats["pages_in_use"] == 1  # the exported one
        await new.close()
        await old.close()
        assert (await settled(controller))["pages_in_use"] == 0
        nursery.cancel_scope.cancel()


async def test_the_refuse_policy_is_unchanged():
    runner = make_tiny_runner(num_pages=4)
    async with trio.open_nursery() as nursery:
        controller = await start(nursery, runner, ControlLimits())
        old, new = controller.attach("old"), controller.attach("new")
        await ok(new, "alloc_pages", count=3)
        assert await error(old, "alloc_pages", count=2) == (
            "alloc_pages: out of KV pages: 2 requested, 1 free")
        assert controller.stats()["preemptions"] == 0
        await old.close()
        await new.close()
        nursery.cancel_scope.cancel()


def test_swaps_cross_the_model_process():
    runner = RemoteRunner.tiny(num_pages=4)
    try:
        assert runner.swap_out_kv([SwapOutKv("x", [1, 2], [7, 8])]) == [
            runner.swap_in_kv([SwapInKv("x", [8, 7], [3, 0])])[0]]
        with pytest.raises(RuntimeError, match="no host copy"):
            runner.swap_in_kv([SwapInKv("x", [7], [1])])
    finally:
        runner.close()


# -- the must-show: many generations through a pool sized for a few ---------------------------

GENERATIONS = 16
MAX_TOKENS = 40


async def completions(runner, limits: ControlLimits) -> tuple[list[str], dict]:
    """GENERATIONS greedy text completions at once; their outputs and the controller's stats."""
    outputs: dict[int, str] = {}
    async with running_stack(runner, control_limits=limits) as stack:

        async def generate(i: int) -> None:
            outcome = await finish(await stack.launch(
                "text-completion", "--prompt", f"Story {i} begins", "--max-tokens", MAX_TOKENS,
                "--ignore-eos"))
            assert outcome.reason == "finished", outcome.detail
            outputs[i] = outcome.return_value

        async with trio.open_nursery() as nursery:
            for i in range(GENERATIONS):
                nursery.start_soon(generate, i)
        stats = await settled(stack.controller)
    return [outputs[i] for i in range(GENERATIONS)], stats


async def test_sixteen_generations_in_a_pool_for_four_equal_unconstrained_runs():
    page_size = 16
    per_sequence = math.ceil((8 + MAX_TOKENS) / page_size)  # the prompts are under 8 tokens
    reference, _ = await completions(make_tiny_runner(num_pages=256), ControlLimits())
    runner = make_tiny_runner(num_pages=4 * per_sequence, page_size=page_size)
    outputs, stats = await completions(runner, PREEMPT)
    assert outputs == reference
    assert stats["preemptions"] > 0 and stats["restores"] == stats["preemptions"]
    assert stats["pages_in_use"] == 0 and stats["swapped_pages"] == 0 and not runner.kv.host
