"""The executor's worker thread: one thread for every plan, results and errors back in trio,
a running function waited for when its caller is cancelled, and no thread left after `stop`."""

from __future__ import annotations

import threading
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

from pie_trio.executor.worker import Worker


@asynccontextmanager
async def gated_run(worker: Worker, value: int):
    """A `worker.run` whose function is running, held until the block ends; yields the list
    its result lands in (after the block)."""
    entered, gate = threading.Event(), threading.Event()
    results: list[int] = []

    def gated() -> int:
        entered.set()
        gate.wait(10)
        return value

    async def caller() -> None:
        results.append(await worker.run(gated))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(caller)
        await trio.to_thread.run_sync(entered.wait, 10)
        try:
            yield results
        finally:
            gate.set()


@pytest.fixture
async def worker():
    worker = Worker("test worker")
    worker.start()
    yield worker
    worker.stop()
    assert worker.thread is not None
    worker.thread.join(10)
    assert not worker.thread.is_alive()


async def test_every_function_runs_in_the_one_worker_thread(worker):
    idents = [await worker.run(threading.get_ident) for _ in range(5)]
    assert len(set(idents)) == 1
    assert worker.thread is not None and idents[0] == worker.thread.ident
    assert idents[0] != threading.get_ident()


async def test_an_exception_reaches_the_caller_and_the_worker_goes_on(worker):
    def fail() -> None:
        raise ValueError("bad plan")

    with pytest.raises(ValueError, match="bad plan"):
        await worker.run(fail)
    assert await worker.run(lambda: 42) == 42


async def test_a_cancelled_caller_waits_for_the_function_and_gets_its_result(worker):
    entered, gate = threading.Event(), threading.Event()
    got = []

    def gated() -> str:
        entered.set()
        gate.wait(10)
        return "done"

    async def caller(scope: trio.CancelScope) -> None:
        with scope:
            got.append(await worker.run(gated))
            await trio.sleep_forever()  # the cancel lands at the next checkpoint

    scope = trio.CancelScope()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(caller, scope)
        await trio.to_thread.run_sync(entered.wait, 10)
        scope.cancel()
        await trio.testing.wait_all_tasks_blocked()
        assert got == []  # still waiting for the function, cancelled or not
        gate.set()
    assert got == ["done"] and scope.cancelled_caught


async def test_a_stopped_worker_refuses_work_and_its_thread_ends():
    worker = Worker("test worker")
    worker.start()
    assert await worker.run(lambda: 1) == 1
    worker.stop()
    worker.stop()  # idempotent
    with pytest.raises(RuntimeError, match="not running"):
        await worker.run(lambda: 2)
    assert worker.thread is not None
    worker.thread.join(10)
    assert not worker.thread.is_alive()


async def test_a_worker_stopped_while_running_ends_after_the_function():
    worker = Worker("test worker")
    worker.start()
    async with gated_run(worker, 7) as results:
        worker.stop()
    assert results == [7]
    assert worker.thread is not None
    worker.thread.join(10)
    assert not worker.thread.is_alive()


async def test_a_second_run_while_one_is_waiting_is_refused(worker):
    async with gated_run(worker, 1) as results:
        with pytest.raises(RuntimeError, match="one function at a time"):
            await worker.run(lambda: 2)
    assert results == [1]
    assert await worker.run(lambda: 3) == 3
