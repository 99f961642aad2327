"""The model in a process of its own (`model/remote.py`): the call records' wire form, the
executor over a `RemoteRunner` answering exactly as over the in-process runner, a child killed
mid-run failing its callers (and nobody hanging), clean shutdown, and an inferlet served by it."""

from __future__ import annotations

import gc
import os
import signal
from contextlib import asynccontextmanager

import msgpack
import pytest
import trio
from test_runtime_support import finish, running_stack

from pie_trio.executor.direct import complete
from pie_trio.executor.executor import Executor
from pie_trio.model.calls import (
    AllocPages,
    AllocSlots,
    CallError,
    CopyKv,
    Embed,
    Forward,
    ForwardResult,
    FreePages,
    FreeSlots,
    MaskKv,
    Sampler,
    call_from_msg,
    result_from_msg,
    to_msg,
)
from pie_trio.model.remote import RemoteRunner
from pie_trio.model.tiny import tiny_runner as make_tiny_runner
from pie_trio.stack import close_runner, load_runner

PAGE = 16


@pytest.fixture(scope="module")
def remote():
    """One child process on the tiny model (starting one takes seconds), as the stack loads it
    (seeded 0, like the in-process runner it is compared with)."""
    runner = load_runner("tiny", num_pages=64, model_process=True)
    assert isinstance(runner, RemoteRunner)
    yield runner
    close_runner(runner)


@asynccontextmanager
async def running(executor: Executor):
    async with trio.open_nursery() as nursery:
        await nursery.start(executor.run)
        yield executor
        nursery.cancel_scope.cancel()


def wire(value):
    """Through msgpack and back, as the records travel to the model process."""
    return msgpack.unpackb(msgpack.packb(value), strict_map_key=False)


# -- the wire form ---------------------------------------------------------------------------

CALLS = [
    AllocPages("a", 2), FreePages("a", [1, 2]), AllocSlots("a", 3), FreeSlots("a", [0]),
    Embed("a", [5, 6], [0, 1]), CopyKv("a", 1, 2, 0, 3, 4), MaskKv("a", 3, [0, 2], False),
    Forward("a", [1, 2], 5, [16, 17, 18, 19, 20], tokens=[1, 2, 3, 4, 5],
            masks=[[12, 5]] * 5, output_indices=[4], top_k=3,
            sampler=Sampler(0.7, 10, 0.9, 0.05, seed=3), vocab_mask=b"\xff" * 6144,
            logit_bias={7: -1.5, 9: 2.0}),
    Forward("a", [4], 1, [0], embed_slots=[2]),
]


@pytest.mark.parametrize("call", CALLS, ids=lambda c: c.kind)
def test_every_call_record_survives_the_wire(call):
    assert call_from_msg(wire(to_msg(call))) == call


def test_a_forward_result_survives_the_wire():
    result = ForwardResult(dists=[([3, 1], [0.75, 0.25])], tokens=[3])
    assert result_from_msg(wire(to_msg(result))) == result
    assert result_from_msg(wire(to_msg(ForwardResult()))) == ForwardResult()


@pytest.mark.parametrize("msg, error", [
    ([1, 2], "not a call record"),
    ({"kind": "launch_missiles"}, "not a call record"),
    ({"kind": "free_pages", "owner": "a"}, "malformed FreePages"),
    ({"kind": "mask_kv", "owner": "a", "page": 1, "slots": [], "extra": 1}, "unknown fields"),
    ({**to_msg(CALLS[-1]), "sampler": [0.5]}, "Sampler record must be a map"),
])
def test_a_malformed_call_record_is_a_call_error(msg, error):
    with pytest.raises(CallError, match=error):
        call_from_msg(msg)


def test_a_malformed_result_is_a_call_error():
    with pytest.raises(CallError, match="pairs"):
        result_from_msg({"dists": [[1, 2, 3]], "tokens": None})
    with pytest.raises(CallError, match="unknown fields"):
        result_from_msg({"logits": []})


# -- the same answers as in process ------------------------------------------------------------

async def scenario(executor: Executor) -> list:
    """Embed, forward (tokens, embedding slots, masks, vocabulary mask, bias, seeded sampling,
    two calls in one batch), copy and mask KV rows; every answer, and a rejected call's error."""
    out: list = []
    pages = await executor.submit(AllocPages("a", 3))
    slots = await executor.submit(AllocSlots("a", 3))
    prompt = list(range(100, 120))
    out.append(await executor.submit(Forward(
        "a", pages[:2], 4, list(range(20)), tokens=prompt, output_indices=[0, 19], top_k=5)))
    await executor.submit(Embed("a", [5, 6, 7], slots))
    out.append(await executor.submit(Forward(
        "a", pages[:2], 7, [20, 21, 22], embed_slots=slots, output_indices=[0, 1, 2],
        sampler=Sampler(temperature=0.8, top_k=10, seed=7), top_k=2)))
    await executor.submit(CopyKv("a", pages[0], pages[2], 0, 0, PAGE))
    await executor.submit(MaskKv("a", pages[1], [0, 1]))
    allowed = bytearray(6144)
    allowed[1:3] = b"\xff\xff"
    masked = Forward("a", [pages[2], pages[1]], 8, [23], tokens=[42], masks=[[10, 3, 11]],
                     output_indices=[0], top_k=4, vocab_mask=bytes(allowed),
                     logit_bias={9: 3.0}, sampler=Sampler())
    plain = Forward("a", pages[:2], 8, [23], tokens=[42], output_indices=[0], top_k=3)
    both = [executor.enqueue(masked), executor.enqueue(plain)]  # one batch of two
    out.extend([await request.wait() for request in both])
    with pytest.raises(CallError) as rejected:
        await executor.submit(Forward("a", [10_000], 1, [0], tokens=[1]))
    out.append(str(rejected.value))
    await executor.submit(FreePages("a", pages))
    await executor.submit(FreeSlots("a", slots))
    return out


async def test_the_executor_over_a_remote_runner_answers_exactly_as_in_process(remote):
    async with running(Executor(make_tiny_runner(num_pages=64, seed=0))) as executor:
        expected = await scenario(executor)
    async with running(Executor(remote)) as executor:
        assert await scenario(executor) == expected


def test_the_tokenizer_and_info_come_from_the_model_process(remote):
    local = make_tiny_runner(num_pages=64, seed=0)
    assert remote.info == local.info
    text = "<|im_start|>user\nHello, wörld 123!<|im_end|>"
    assert remote.tokenizer.encode(text) == local.tokenizer.encode(text)
    assert remote.tokenizer.stop_tokens == local.tokenizer.stop_tokens
    assert remote.tokenizer.token_bytes() == local.tokenizer.token_bytes()
    messages = [{"role": "user", "content": "Hi"}]
    assert remote.tokenizer.render_chat(messages) == local.tokenizer.render_chat(messages)


async def test_an_inferlet_runs_on_a_remote_runner(remote):
    prompt = "Story number 7 begins when"
    async with running_stack(remote) as stack:
        reference = await complete(stack.executor, remote.tokenizer.encode(prompt),
                                   max_tokens=8, owner="reference", ignore_stop=True)
        outcome = await finish(await stack.launch(
            "text-completion", "--prompt", prompt, "--max-tokens", 8, "--ignore-eos"))
        assert stack.controller.stats()["pages_in_use"] == 0
    assert outcome.reason == "finished", outcome.detail
    assert outcome.return_value == remote.tokenizer.decode(reference)


# -- failure and shutdown ----------------------------------------------------------------------

async def test_a_killed_model_process_fails_every_call_and_nothing_hangs():
    remote = RemoteRunner.tiny(num_pages=8)
    try:
        with trio.fail_after(60):
            async with running(Executor(remote)) as executor:
                pages = await executor.submit(AllocPages("a", 2))
                call = Forward("a", pages[:1], 3, [0, 1, 2], tokens=[1, 2, 3],
                               output_indices=[2], top_k=1)
                await executor.submit(call)
                os.kill(remote.pid, signal.SIGSTOP)  # the next forward stays in flight
                ticks = executor.stats.ticks
                in_flight = executor.enqueue(call)
                while executor.stats.ticks == ticks:
                    await trio.sleep(0.01)
                os.kill(remote.pid, signal.SIGKILL)
                with pytest.raises(CallError, match="killed by signal SIGKILL"):
                    await in_flight.wait()
                # Later calls fail alike, alone or batched; the bookkeeping still answers.
                other = Forward("a", pages[1:], 1, [0], tokens=[5])
                batch = [executor.enqueue(call), executor.enqueue(other)]
                for request in batch:
                    with pytest.raises(CallError, match="SIGKILL"):
                        await request.wait()
                with pytest.raises(CallError, match="SIGKILL"):
                    await executor.submit(MaskKv("a", pages[0], [0]))
                await executor.submit(FreePages("a", pages))
    finally:
        remote.close()
    assert not os.path.exists(f"/proc/{remote.pid}")


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_shutdown_reaps_the_child_and_closes_its_socket():
    gc.collect()
    before = open_fds()
    remote = RemoteRunner.tiny(num_pages=8)
    pid = remote.pid
    assert os.path.exists(f"/proc/{pid}")
    remote.forward([Forward("a", [0], 1, [0], tokens=[1], output_indices=[0], top_k=1)])
    remote.close()
    remote.close()  # idempotent
    assert not os.path.exists(f"/proc/{pid}")  # exited and reaped: no zombie either
    assert open_fds() <= before
    with pytest.raises(CallError, match="shut down"):
        remote.mask_kv([MaskKv("a", 0, [0])])


def test_a_model_that_fails_to_load_raises_and_leaves_no_child():
    fds, children = open_fds(), model_processes()
    with pytest.raises(RuntimeError, match="no model at"):
        RemoteRunner.load("/nonexistent/model.gguf", device="cpu")
    assert open_fds() <= fds
    assert model_processes() <= children


def model_processes() -> set[int]:
    """This process's children that run a model, or that exited and were never reaped."""
    found = set()
    children = {int(pid) for task in os.listdir("/proc/self/task")
                for pid in open(f"/proc/self/task/{task}/children").read().split()}
    for pid in children:
        try:
            cmdline = open(f"/proc/{pid}/cmdline", "rb").read()
            state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if b"pie_trio.model.remote" in cmdline or state == "Z":
            found.add(pid)
    return found


YIELD_CHECK = """
import os, threading
from pie_trio.executor.direct import complete
from pie_trio.stack import close_runner, load_runner, yield_cpu_to_model

def nice(tid):
    return os.getpriority(os.PRIO_PROCESS, tid)

runner = load_runner("tiny", num_pages=64, model_process=True)
before = threading.Event(); stop = threading.Event()
old = threading.Thread(target=lambda: (before.set(), stop.wait()))
old.start(); before.wait()
print("new", yield_cpu_to_model(5))
later = []
thread = threading.Thread(target=lambda: later.append(nice(threading.get_native_id())))
thread.start(); thread.join()
print("threads", sorted({nice(int(t)) for t in os.listdir("/proc/self/task")}))
print("later", later[0], "older", nice(old.native_id), "model", nice(runner.pid))
stop.set(); old.join()
close_runner(runner)
"""


def test_the_server_yields_the_cpu_to_its_model_process():
    """`yield_cpu_to_model` lowers every thread of the process, threads started before it and
    after it alike, and leaves the model's process where it was (a subprocess: the change is
    irreversible for the process that makes it)."""
    import subprocess
    import sys

    base = os.getpriority(os.PRIO_PROCESS, 0)
    done = subprocess.run([sys.executable, "-c", YIELD_CHECK], capture_output=True, text=True,
                          timeout=120, check=True)
    lines = dict(line.split(" ", 1) for line in done.stdout.splitlines())
    lowered = min(base + 5, 19)
    assert lines["new"] == str(lowered)
    assert lines["threads"] == f"[{lowered}]"
    assert lines["later"] == f"{lowered} older {lowered} model {base}"


def test_server_nice_is_refused_where_the_model_shares_the_process(caplog):
    from pie_trio.config import Config
    from pie_trio.server.serve import _yield_cpu

    before = os.getpriority(os.PRIO_PROCESS, 0)
    _yield_cpu(Config(server_nice=5))  # the model in this process: not applied
    _yield_cpu(Config())  # nor by default
    assert os.getpriority(os.PRIO_PROCESS, 0) == before
    assert "applies only with model_process" in caplog.text
