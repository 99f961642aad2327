"""The inferlet runtime with hand-written WAT guests on the real executor and controller (tiny
model): the ABI contract, events, client messages, every termination reason, isolation of
adversarial guests from normal ones, and a randomised lifecycle run proving nothing leaks."""

from __future__ import annotations

import random
import threading
import time

import pytest
import trio
from test_runtime_support import (
    finish,
    guest_programs,
    live_trio_tasks,
    running_stack,
    thread_count,
)

from pie_trio.runtime.guest import GuestThreads
from pie_trio.runtime.instance import InstanceGone
from pie_trio.runtime.runtime import Runtime
from pie_trio.runtime.sandbox import InstanceLimits, MiB

FAST_LIMITS = InstanceLimits(cpu_time=0.2, memory_bytes=16 * MiB, max_outstanding=64)


async def test_ping_round_trips_and_exit_codes(tiny_runner):
    async with running_stack(tiny_runner) as stack:
        assert (await finish(await stack.launch("ping", 50))).reason == "finished"
        assert (await finish(await stack.launch("exit", 0))).reason == "finished"
        failed = await finish(await stack.launch("exit", 3))
        assert failed.reason == "error" and "code 3" in failed.detail


async def test_stateless_ops_are_answered_on_the_guest_thread(tiny_runner):
    """`ping` (like `clock` and `model_info`) is answered by the control layer on the guest's
    own thread: a guest makes all its pings while the trio thread is blocked, and only its end
    waits for it. A ping naming a queue waits in line on the trio thread as before."""
    async with running_stack(tiny_runner) as stack:
        instance = await stack.launch("ping", 500)
        give_up = time.monotonic() + 60  # only a bound on the wait, never an expectation
        while not instance.guest.finished and time.monotonic() < give_up:
            time.sleep(0.001)  # blocks the trio thread: nothing posted to it can run
        assert instance.guest.finished  # 500 pings answered (ping.wat traps on a wrong one)
        assert (await finish(instance)).reason == "finished"
        assert (await finish(await stack.launch("ping", 50, 1))).reason == "finished"


class _Job:
    """What the guest thread pool runs, reduced to a record of the thread that ran it."""

    def __init__(self, hold: threading.Event | None = None) -> None:
        self.hold = hold
        self.thread: threading.Thread | None = None
        self.ran = threading.Event()

    def run(self) -> None:
        self.thread = threading.current_thread()
        if self.hold is not None:
            self.hold.wait(30)
        self.ran.set()

    def not_started(self, exc: BaseException) -> None:
        raise AssertionError(f"no thread for a job: {exc}")


def test_a_worker_coming_free_takes_the_guests_waiting_for_a_thread():
    """Guests launched while every worker is busy wait for the spawner; a worker that comes
    free takes them first, so a burst of short guests does not start a thread each."""
    threads = GuestThreads()  # its spawner not started yet: launches wait in its queue
    hold = threading.Event()
    first, second, third = _Job(hold), _Job(), _Job()
    threads.start(first)
    threads._spawn_next()  # what the spawner does: a new worker thread, for `first`
    threads.start(second)
    threads.start(third)
    hold.set()
    assert third.ran.wait(30)
    assert first.thread is second.thread is third.thread
    with threads:  # starts and stops the spawner; every worker is joined on the way out
        pass
    assert first.thread is not None and not first.thread.is_alive()


async def test_abi_contract(tiny_runner):
    """submit / wait any+all / take and call / fetch with too-small buffers (see protocol.wat:
    the exit code names the first failed check)."""
    async with running_stack(tiny_runner) as stack:
        outcome = await finish(await stack.launch("protocol", "a", "bc"))
        assert outcome.reason == "finished", outcome.detail


async def test_messages_both_ways_and_return_value(tiny_runner):
    async with running_stack(tiny_runner) as stack:
        instance = await stack.launch("echo")
        assert instance.owner == "test" and instance.running
        instance.deliver("hello")
        instance.deliver("ünïcödé ✓ " + "x" * 70_000)  # beyond one-byte and two-byte lengths
        instance.deliver("quit")
        outcome = await finish(instance)
        assert outcome.reason == "finished"
        messages = [e["message"] for e in outcome.events if e["event"] == "message"]
        assert messages == ["hello", "ünïcödé ✓ " + "x" * 70_000]
        assert outcome.return_value == "done"
        assert [e["event"] for e in outcome.events][-2:] == ["return", "terminated"]
        with pytest.raises(InstanceGone):
            instance.deliver("too late")


async def test_stdout_and_stderr_are_events(tiny_runner):
    async with running_stack(tiny_runner) as stack:
        outcome = await finish(await stack.launch("output", 3))
        assert outcome.reason == "finished"
        assert outcome.text("stdout") == "hello stdout\n" + "x" * 3 * 32768
        assert outcome.text("stderr") == "hello stderr\n"
        chunks = [e for e in outcome.events if e["event"] == "stdout"]
        assert all(len(e["data"]) <= 64 * 1024 for e in chunks)


async def test_a_slow_client_holds_the_guest_back(tiny_runner):
    """Output the client has not read is bounded: the guest waits, then resumes intact."""
    blocks, backlog = 64, 128 * 1024  # 2 MiB of output through a 128 KiB window
    async with running_stack(tiny_runner, InstanceLimits(output_backlog_bytes=backlog)) as stack:
        instance = await stack.launch("output", blocks)
        buffered = await _settled_buffer(instance)
        assert instance.running
        held_back = [await instance.events.receive() for _ in range(buffered)]
        # Unread output: at most the window plus the one write that crossed it.
        unread = sum(len(e["data"]) for e in held_back)
        assert backlog // 2 < unread <= backlog + 32768
        outcome = await finish(instance)
        assert outcome.reason == "finished"
        outcome.events[:0] = held_back
        assert outcome.text("stdout") == "hello stdout\n" + "x" * blocks * 32768


async def _settled_buffer(instance) -> int:
    """The number of unread events once it stops changing (the guest is held back)."""
    previous, stable = -1, 0
    with trio.fail_after(30):
        while stable < 5:
            await trio.sleep(0.05)
            now = instance.events.statistics().current_buffer_used
            stable = stable + 1 if now == previous else 0
            previous = now
    return previous


async def test_closing_the_event_channel_means_client_gone(tiny_runner):
    async with running_stack(tiny_runner, InstanceLimits(output_backlog_bytes=64 * 1024)) as stack:
        instance = await stack.launch("output", 1000)
        await instance.events.receive()
        await instance.events.aclose()
        with trio.fail_after(30):
            await instance.ended.wait()
        assert instance.termination.reason == "client_gone"
        assert stack.controller.stats()["instances"] == 0


@pytest.mark.parametrize("guest", ["sleepy", "spin", "echo"])
async def test_kill_interrupts_blocked_and_spinning_guests(tiny_runner, guest):
    async with running_stack(tiny_runner) as stack:
        instance = await stack.launch(guest)
        await trio.sleep(0.05)  # let it reach its blocking call or loop
        instance.kill()
        outcome = await finish(instance)
        assert outcome.reason == "killed"
        instance.kill()  # a second kill of an ended instance is harmless
        with pytest.raises(ValueError):
            instance.kill("finished")


async def test_wall_time_limit(tiny_runner):
    async with running_stack(tiny_runner, InstanceLimits(wall_time=0.3)) as stack:
        outcome = await finish(await stack.launch("sleepy"))
        assert (outcome.reason, outcome.limit) == ("limit", "wall_time")


ADVERSARIES = {
    # guest: (args, reason, limit, what the detail must mention)
    "spin": ((), "limit", "cpu_time", "CPU"),
    "membomb": ((), "trap", None, "an allocation may have failed"),
    "hugemem": ((), "limit", "memory", "memory"),
    "giant": ((), "limit", "message_size", "5242880-byte request"),
    "flood": ((), "limit", "outstanding", "64"),
    "oob": ((), "trap", None, "ABI misuse: out-of-bounds pointer"),
    "badhandle": ((), "trap", None, "ABI misuse: take: unknown handle 77"),
    "forge": ((), "trap", None, "unreachable"),
    "forward_trap": ((), "trap", None, "unreachable"),
    "trap": ((), "trap", None, "unreachable"),
    "recurse": ((), "trap", None, "call stack exhausted"),
}


async def test_adversaries_end_with_the_right_reason_and_harm_no_one(tiny_runner):
    async with running_stack(tiny_runner, FAST_LIMITS) as stack:
        outcomes: dict[str, object] = {}

        async def run(name: str, guest: str, *args) -> None:
            outcomes[name] = await finish(await stack.launch(guest, *args))

        async with trio.open_nursery() as nursery:
            for guest, (args, *_) in ADVERSARIES.items():
                nursery.start_soon(run, guest, guest, *args)
            for i in range(4):  # normal guests running at the same time
                nursery.start_soon(run, f"ping{i}", "ping", 300)
                nursery.start_soon(run, f"hold{i}", "hold", 2, 0)
        for guest, (_, reason, limit, mention) in ADVERSARIES.items():
            outcome = outcomes[guest]
            assert (outcome.reason, outcome.limit) == (reason, limit), (guest, outcome.detail)
            assert mention in outcome.detail, (guest, outcome.detail)
        for i in range(4):
            assert outcomes[f"ping{i}"].reason == "finished"
            assert outcomes[f"hold{i}"].reason == "finished"
        assert "panicked: forged page id refused" in outcomes["forge"].text("stderr")
        assert stack.controller.stats()["pages_in_use"] == 0


async def test_runtime_shutdown_evicts_everyone(tiny_runner):
    baseline = thread_count()
    async with running_stack(tiny_runner) as stack:
        store, guests = guest_programs()
        runtime = Runtime(stack.controller, store, InstanceLimits())
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                await nursery.start(runtime.run)
                instances = [await runtime.launch(guests[g], [], "test")
                             for g in ("spin", "sleepy", "echo")]
                instances.append(await runtime.launch(guests["hold"], ["3", "2"], "test"))
                await trio.sleep(0.05)
                nursery.cancel_scope.cancel()  # how a server stops its runtime
        # runtime.run has returned: every instance has ended and released what it held
        for instance in instances:
            assert instance.termination.reason == "evicted"
            assert (await finish(instance)).reason == "evicted"
        assert runtime.stats() == {"instances": 0, "guest_threads": 0, "launched": 4,
                                   "ended": {"evicted": 4}}
        assert stack.controller.stats()["pages_in_use"] == 0
        with pytest.raises(RuntimeError, match="not running"):
            await runtime.launch(guests["ping"], [], "test")
    assert thread_count() <= baseline + 1  # an idle executor worker may linger in trio's cache


class _LoopPasses(trio.abc.Instrument):
    def __init__(self) -> None:
        self.passes = 0

    def before_io_wait(self, timeout: float) -> None:
        self.passes += 1


async def test_epoch_ticks_cost_the_event_loop_nothing(tiny_runner):
    """The epoch ticker is a thread: an idle runtime's event loop does not wake 100 times a
    second for it, yet a spinning guest still meets its CPU budget, and the ticker is joined
    when the runtime stops."""
    baseline = thread_count()
    async with running_stack(tiny_runner, FAST_LIMITS) as stack:
        passes = _LoopPasses()
        trio.lowlevel.add_instrument(passes)
        await trio.sleep(0.5)  # a trio timer ticking every 10 ms would make ~50 passes
        trio.lowlevel.remove_instrument(passes)
        assert passes.passes < 20
        with trio.fail_after(30):
            outcome = await finish(await stack.launch("spin"))
        assert (outcome.reason, outcome.limit) == ("limit", "cpu_time")
    assert thread_count() <= baseline + 1  # an idle executor worker may linger in trio's cache


# -- 1,000 randomised lifecycles -----------------------------------------------------------

LIFECYCLES = 1000
CONCURRENCY = 24


def plan_lifecycle(rng: random.Random) -> tuple[str, list, str | None, tuple[str, str | None]]:
    """(guest, args, how the test interferes, the expected (reason, limit))."""
    pages = rng.randint(0, 3)
    roll = rng.random()
    if roll < 0.30:
        return "hold", [pages, 0], None, ("finished", None)
    if roll < 0.45:
        return "hold", [pages, 1], None, ("trap", None)
    if roll < 0.55:
        return "hold", [pages, 5], None, ("error", None)
    if roll < 0.75:
        return "hold", [pages, 2], "kill", ("killed", None)
    if roll < 0.82:
        return "hold", [pages, 2], "message", ("finished", None)
    if roll < 0.87:
        return "hold", [pages, 4], None, ("limit", "outstanding")
    if roll < 0.90:
        return "hold", [pages, 3], None, ("limit", "cpu_time")
    if roll < 0.94:
        return "ping", [rng.randint(1, 20)], None, ("finished", None)
    if roll < 0.97:
        return "giant", [], None, ("limit", "message_size")
    return "oob", [], None, ("trap", None)


async def test_randomised_lifecycles_leak_nothing(tiny_runner):
    rng = random.Random(20250601)
    limits = InstanceLimits(cpu_time=0.05, max_outstanding=32)
    async with running_stack(tiny_runner, limits) as stack:
        # Warm up every path once, so lazily created workers count in the baseline.
        for guest, args in (("hold", [1, 0]), ("ping", [3])):
            await finish(await stack.launch(guest, *args))
        baseline_threads, baseline_tasks = thread_count(), live_trio_tasks()
        plans = [plan_lifecycle(rng) for _ in range(LIFECYCLES)]
        mismatches: list = []
        limiter = trio.Semaphore(CONCURRENCY)

        async def lifecycle(index: int) -> None:
            guest, args, action, expected = plans[index]
            async with limiter:
                instance = await stack.launch(guest, *args)
                if action == "kill":
                    await trio.sleep(rng.random() * 0.005)
                    instance.kill()
                elif action == "message":
                    instance.deliver("wake up")
                outcome = await finish(instance)
            if (outcome.reason, outcome.limit) != expected:
                mismatches.append((index, guest, args, expected, outcome.terminated))

        async with trio.open_nursery() as nursery:
            for index in range(LIFECYCLES):
                nursery.start_soon(lifecycle, index)

        assert not mismatches, mismatches[:5]
        ended = stack.runtime.stats()["ended"]
        assert sum(ended.values()) == LIFECYCLES + 2
        assert stack.runtime.stats()["instances"] == 0
        assert stack.runtime.stats()["guest_threads"] == 0
        control = stack.controller.stats()
        assert control["pages_in_use"] == 0 and control["slots_in_use"] == 0
        assert control["instances"] == 0
        assert live_trio_tasks() == baseline_tasks
        with trio.move_on_after(15):  # trio's idle worker threads retire after 10 s
            while thread_count() > baseline_threads:
                await trio.sleep(0.1)
        # Idle worker threads alive at the baseline may retire meanwhile: fewer is no leak.
        assert thread_count() <= baseline_threads
