"""Pages and embedding slots change hands between owners: a new owner must never read what the
previous owner left there."""

from __future__ import annotations

import torch
import trio

from pie_trio.executor.executor import Executor
from pie_trio.model.calls import (
    AllocPages,
    AllocSlots,
    Embed,
    Forward,
    FreePages,
    FreeSlots,
)
from pie_trio.model.tiny import tiny_runner as make_tiny_runner

PAGE = 16


def probe(owner: str, page: int) -> Forward:
    """One token at the end of a full page: it attends 15 slots its owner never wrote."""
    return Forward(owner, [page], PAGE, positions=[PAGE - 1], tokens=[7], output_indices=[0],
                   top_k=8)


async def run_probe_after(previous_owner_work) -> list:
    runner = make_tiny_runner(num_pages=1, num_slots=1)
    executor = Executor(runner)
    async with trio.open_nursery() as nursery:
        await nursery.start(executor.run)
        await previous_owner_work(executor)
        [page] = await executor.submit(AllocPages("b", 1))
        result = await executor.submit(probe("b", page))
        nursery.cancel_scope.cancel()
    return result.dists


async def test_a_reused_page_carries_nothing_of_its_previous_owner():
    async def nothing(executor: Executor) -> None:
        return None

    async def fill_and_free(executor: Executor) -> None:
        [page] = await executor.submit(AllocPages("a", 1))
        prompt = list(range(100, 100 + PAGE))
        await executor.submit(Forward("a", [page], PAGE, positions=list(range(PAGE)),
                                      tokens=prompt, output_indices=[PAGE - 1], top_k=1))
        await executor.submit(FreePages("a", [page]))

    fresh = await run_probe_after(nothing)
    reused = await run_probe_after(fill_and_free)
    assert reused == fresh


async def test_a_reused_embedding_slot_is_wiped():
    runner = make_tiny_runner(num_pages=1, num_slots=1)
    executor = Executor(runner)
    async with trio.open_nursery() as nursery:
        await nursery.start(executor.run)
        [slot] = await executor.submit(AllocSlots("a", 1))
        await executor.submit(Embed("a", [42], [slot]))
        assert runner.kv.embeddings[slot].abs().sum() > 0
        await executor.submit(FreeSlots("a", [slot]))
        [again] = await executor.submit(AllocSlots("b", 1))
        [page] = await executor.submit(AllocPages("b", 1))
        # Any tick wipes what was handed out before it, ahead of the tick's own calls.
        await executor.submit(probe("b", page))
        nursery.cancel_scope.cancel()
    assert again == slot
    assert torch.count_nonzero(runner.kv.embeddings[slot]) == 0
