"""Tensor parallelism (`model/tensor_parallel.py`, `model/tensor_shard.py`) on the CPU with gloo:
the tiny model split over 2 workers gives the single-process distributions (within a stated
tolerance) and the same greedy tokens, for prefill and decode, through the executor and through
an inferlet; a worker killed mid-run fails every caller without a hang; close leaves no worker
behind; a model whose heads do not split is refused."""

from __future__ import annotations

import math
import os
import signal
from contextlib import asynccontextmanager

import pytest
import torch
import trio
from test_runtime_support import finish, running_stack

from pie_trio.executor.direct import complete
from pie_trio.executor.executor import Executor
from pie_trio.model.calls import (
    AllocPages,
    AllocSlots,
    CallError,
    CopyKv,
    DropSwappedKv,
    Embed,
    Forward,
    FreePages,
    MaskKv,
    Sampler,
    SwapInKv,
    SwapOutKv,
)
from pie_trio.model.config import ModelConfig
from pie_trio.model.tensor_parallel import TensorParallelRunner
from pie_trio.model.tensor_shard import check_divisible, shard_config, shard_tensors
from pie_trio.model.tiny import tiny_config, tiny_runner, tiny_tensors
from pie_trio.stack import close_runner, load_runner

PAGES = 64
VOCAB = 49152
# Shards sum their partial projections in another order than one process does, so fp32
# results differ by rounding: log-probabilities over the whole vocabulary stay within this.
LOGPROB_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def tp():
    """The tiny model over 2 gloo workers, as the stack loads it (seeded 0, like the
    single-process runner it is compared with); starting the workers takes seconds."""
    runner = load_runner("tiny", num_pages=PAGES, tensor_parallel=2)
    assert isinstance(runner, TensorParallelRunner)
    yield runner
    close_runner(runner)


@asynccontextmanager
async def running(executor: Executor):
    async with trio.open_nursery() as nursery:
        await nursery.start(executor.run)
        yield executor
        nursery.cancel_scope.cancel()


def logprobs(result) -> list[dict[int, float]]:
    """Each output's whole next-token distribution as log-probabilities (the logits, up to the
    constant their log-sum-exp subtracts)."""
    return [{token: math.log(p) if p > 0 else -math.inf for token, p in zip(*dist, strict=True)}
            for dist in result.dists]


def assert_close(got, expected) -> None:
    for mine, theirs in zip(logprobs(got), logprobs(expected), strict=True):
        assert mine.keys() == theirs.keys()
        worst = max(abs(mine[t] - theirs[t]) for t in theirs if theirs[t] > -30)
        assert worst < LOGPROB_TOLERANCE, worst


# -- sharding ----------------------------------------------------------------------------------

def test_shards_put_back_together_are_the_whole_model():
    config = tiny_config()
    whole = tiny_tensors(config)
    shards = [shard_tensors(whole, config, rank, 2) for rank in range(2)]
    q = "model.layers.1.self_attn.q_proj.weight"
    o = "model.layers.1.self_attn.o_proj.weight"
    down = "model.layers.0.mlp.down_proj.weight"
    assert (shards[0][q].shape[0] + shards[1][q].shape[0]) == whole[q].shape[0]
    for name, dim in ((q, 0), (o, 1), (down, 1), ("model.layers.0.mlp.up_proj.weight", 0)):
        assert (whole[name] == torch.cat([s[name] for s in shards], dim)).all()
    assert (shards[1]["model.embed_tokens.weight"] == whole["model.embed_tokens.weight"]).all()
    half = shard_config(config, 2)
    assert (half.num_heads, half.num_kv_heads, half.intermediate_size) == (2, 1, 64)


def test_smollm2_splits_over_3_workers_not_2():
    smollm2 = ModelConfig("llama", 49152, 576, 1536, 30, 9, 3, 64, 10000.0, 1e-5, 8192)
    check_divisible(smollm2, 3)
    with pytest.raises(ValueError, match="9 heads over 3 KV heads"):
        check_divisible(smollm2, 2)


# -- the same answers as one process -----------------------------------------------------------

def test_prefill_and_decode_match_one_process(tp):
    """A 20-token prefill, then greedy decode steps: the whole distribution within the
    tolerance at every step, and the same tokens."""
    one = tiny_runner(num_pages=PAGES, seed=0)
    assert tp.info == one.info
    pages = [0, 1]
    prompt = list(range(300, 320))
    prefill = Forward("a", pages, 4, list(range(20)), tokens=prompt, output_indices=[0, 19],
                      top_k=VOCAB, sampler=Sampler())
    got, expected = tp.forward([prefill])[0], one.forward([prefill])[0]
    assert_close(got, expected)
    assert got.tokens == expected.tokens
    token = expected.tokens[-1]
    for position in range(20, 26):
        step = Forward("a", pages, 1 + position % 16, [position], tokens=[token],
                       output_indices=[0], top_k=VOCAB, sampler=Sampler())
        got, expected = tp.forward([step])[0], one.forward([step])[0]
        assert_close(got, expected)
        assert got.tokens == expected.tokens
        token = expected.tokens[0]
    tp.clear(pages, [])


def test_swapped_pages_come_back_on_every_rank(tp):
    """Each worker swaps its own KV heads out and in: a decode step reading pages that went
    to host memory and back answers as one process does."""
    one = tiny_runner(num_pages=PAGES, seed=0)
    greedy = {"output_indices": [0], "top_k": VOCAB, "sampler": Sampler()}
    prefill = Forward("a", [2, 3], 4, list(range(20)), tokens=list(range(500, 520)), **greedy)
    step = Forward("a", [4, 5], 5, [20], tokens=[7], **greedy)
    answers = []
    for runner in (tp, one):
        runner.forward([prefill])
        moved = runner.swap_out_kv([SwapOutKv("a", [2, 3], [11, 12])])
        runner.clear([2, 3], [])
        assert runner.swap_in_kv([SwapInKv("a", [11, 12], [4, 5])]) == moved
        runner.drop_swapped_kv([DropSwappedKv("a", [11, 12])])
        answers.append((moved, runner.forward([step])[0]))
        runner.clear([4, 5], [])
    (tp_moved, got), (one_moved, expected) = answers
    assert tp_moved[0] > one_moved[0] / 2  # every rank's half of the heads, flags each
    assert_close(got, expected)
    assert got.tokens == expected.tokens


async def scenario(executor: Executor) -> list:
    """Through the executor: prefill, embedding slots, copied and masked KV rows, a batch of
    two; every forward greedy with its top 5, and a rejected call's error."""
    out: list = []
    pages = await executor.submit(AllocPages("a", 3))
    greedy = {"output_indices": [0], "top_k": 5, "sampler": Sampler()}
    out.append(await executor.submit(Forward(
        "a", pages[:2], 4, list(range(20)), tokens=list(range(100, 120)), **greedy)))
    slots = await executor.submit(AllocSlots("a", 2))
    await executor.submit(Embed("a", [5, 6], slots))
    out.append(await executor.submit(Forward("a", pages[:2], 6, [20, 21], embed_slots=slots,
                                              **greedy)))
    await executor.submit(CopyKv("a", pages[0], pages[2], 0, 0, 16))
    await executor.submit(MaskKv("a", pages[1], [0, 1]))
    both = [executor.enqueue(Forward("a", [pages[2], pages[1]], 7, [22], tokens=[42], **greedy)),
            executor.enqueue(Forward("a", pages[:2], 7, [22], tokens=[43], **greedy))]
    out.extend([await request.wait() for request in both])
    with pytest.raises(CallError) as rejected:
        await executor.submit(Forward("a", [10_000], 1, [0], tokens=[1]))
    out.append(str(rejected.value))
    await executor.submit(FreePages("a", pages))
    return out


async def test_the_executor_over_workers_answers_as_in_process(tp):
    async with running(Executor(tiny_runner(num_pages=PAGES, seed=0))) as executor:
        expected = await scenario(executor)
    async with running(Executor(tp)) as executor:
        got = await scenario(executor)
    assert got[-1] == expected[-1]
    for mine, theirs in zip(got[:-1], expected[:-1], strict=True):
        assert mine.tokens == theirs.tokens
        assert [d[0] for d in mine.dists] == [d[0] for d in theirs.dists]
        for (_, p), (_, q) in zip(mine.dists, theirs.dists, strict=True):
            assert p == pytest.approx(q, abs=1e-5)


async def test_an_inferlet_on_workers_writes_what_one_process_writes(tp):
    prompt = "Story number 7 begins when"
    async with running(Executor(tiny_runner(num_pages=PAGES, seed=0))) as executor:
        reference = await complete(executor, tp.tokenizer.encode(prompt), max_tokens=12,
                                   owner="reference", ignore_stop=True)
    async with running_stack(tp) as stack:
        outcome = await finish(await stack.launch(
            "text-completion", "--prompt", prompt, "--max-tokens", 12, "--ignore-eos"))
        assert stack.controller.stats()["pages_in_use"] == 0
    assert outcome.reason == "finished", outcome.detail
    assert outcome.return_value == tp.tokenizer.decode(reference)


# -- failure and shutdown ----------------------------------------------------------------------

def alive(pid: int) -> bool:
    return os.path.exists(f"/proc/{pid}")


async def test_a_killed_worker_fails_every_call_and_nothing_hangs():
    runner = TensorParallelRunner.tiny(world=2, num_pages=8)
    pids = runner.pids
    try:
        with trio.fail_after(120):
            async with running(Executor(runner)) as executor:
                pages = await executor.submit(AllocPages("a", 2))
                call = Forward("a", pages[:1], 3, [0, 1, 2], tokens=[1, 2, 3],
                               output_indices=[2], top_k=1)
                await executor.submit(call)
                os.kill(pids[1], signal.SIGSTOP)  # rank 0 now waits in its all-reduce
                ticks = executor.stats.ticks
                in_flight = executor.enqueue(call)
                while executor.stats.ticks == ticks:
                    await trio.sleep(0.01)
                os.kill(pids[1], signal.SIGKILL)
                with pytest.raises(CallError, match="rank 1 of 2.*killed by signal SIGKILL"):
                    await in_flight.wait()
                assert not alive(pids[0]) and not alive(pids[1])  # the group is gone, reaped
                later = [executor.enqueue(call), executor.enqueue(MaskKv("a", pages[0], [0]))]
                for request in later:
                    with pytest.raises(CallError, match="rank 1 of 2"):
                        await request.wait()
                await executor.submit(FreePages("a", pages))
    finally:
        runner.close()


def test_close_stops_every_worker():
    runner = TensorParallelRunner.tiny(world=2, num_pages=8)
    pids = runner.pids
    assert all(alive(pid) for pid in pids)
    runner.close()
    runner.close()  # idempotent
    assert not any(alive(pid) for pid in pids)  # exited and reaped: no zombies either
    with pytest.raises(CallError, match="shut down"):
        runner.mask_kv([MaskKv("a", 0, [0])])


def test_heads_that_do_not_divide_are_refused_and_leave_no_worker():
    children = child_pids()
    with pytest.raises(ValueError, match="tensor parallelism 3 needs"):
        TensorParallelRunner.tiny(world=3, num_pages=8)
    assert child_pids() <= children


def child_pids() -> set[int]:
    """This process's children, running or exited and not reaped."""
    return {int(pid) for task in os.listdir("/proc/self/task")
            for pid in open(f"/proc/self/task/{task}/children").read().split()}
