"""`TensorParallelRunner`: a `Runner` whose model is split over N worker processes.

Each worker (`tensor_shard.py`) holds one Megatron-style shard of the weights and its own KV
cache for its KV heads; the workers meet through torch.distributed (gloo on the CPU, NCCL on
CUDA, rank r on cuda:r) and all-reduce after each layer's attention output and MLP. Page ids,
the call records and everything above the executor do not change: this runner is to the
executor what `ModelRunner` is.

The wire is `remote.py`'s (a 4-byte length and msgpack, one socketpair per worker): every
request goes to every worker, since each must take part in the collectives and keep its KV
shard in step, and rank 0's answer is the runner's. `check` runs here, against the limits
rank 0 reports.

Failure: the ranks only make progress together, so one dead worker (EOF on its socket, or a
write that cannot reach it) ends the group. The call in flight and every later one raise
`CallError` naming the rank and how it exited, and the other workers are killed at once (they
may be blocked in a collective that will never complete). `close` (also run when the runner is
collected or at exit) closes the sockets, gives the workers a moment to exit, kills any left
and reaps them all.
"""

from __future__ import annotations

import os
import selectors
import socket
import subprocess
import sys
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pie_trio.model.calls import (
    CallError,
)
from pie_trio.model.remote import (
    STOP_GRACE,
    MessageRunner,
    byte_counts,
    child_env,
    exit_reason,
    read_frame,
    reply_value,
    write_frame,
)


@dataclass
class Worker:
    """One rank's process and the parent's end of its socket."""

    rank: int
    process: subprocess.Popen[bytes]
    sock: socket.socket


class WorkerDied(Exception):
    """A worker's socket closed or broke: the group cannot go on."""

    def __init__(self, rank: int) -> None:
        super().__init__(rank)
        self.rank = rank


class TensorParallelRunner(MessageRunner):
    """A `Runner` (and its tokenizer) over tensor-parallel workers; see the module docstring."""

    def __init__(self, workers: list[Worker], starts: list[dict[str, Any]]) -> None:
        """Take over started workers; send each its start request (what to load, its rank)."""
        self._workers = workers
        self._lock = threading.Lock()  # one request on the sockets at a time
        self._failure: str | None = None  # set once the group is gone
        self._finalizer = weakref.finalize(self, _stop_all, workers, self._lock, STOP_GRACE)
        try:
            # A rank that fails to start ends the start: the others may wait for it to join.
            replies = self._exchange(starts, first_error_ends=True)
            ready = [_start_value(reply) for reply in replies][0]  # any rank's error raised
        except BaseException:
            self.close()
            raise
        self._take_ready(ready)

    @classmethod
    def load(cls, model: str | Path = "default", *, world: int, threads: int | None = None,
             **options: Any) -> TensorParallelRunner:
        """`ModelRunner.load(model, **options)` split over `world` workers (dense weights)."""
        return cls.start("load", {"model": str(model), **options}, world, threads)

    @classmethod
    def tiny(cls, *, world: int, threads: int | None = None,
             **options: Any) -> TensorParallelRunner:
        """`tiny.tiny_runner(**options)`, the random-weight test model, over `world` workers."""
        return cls.start("tiny", options, world, threads)

    @classmethod
    def start(cls, factory: str, options: dict[str, Any], world: int,
              threads: int | None) -> TensorParallelRunner:
        """Start `world` workers that build their shards with `factory` ("load" or "tiny").

        `threads`: torch threads per worker (default: the CPUs shared out among them)."""
        if world < 1:
            raise ValueError(f"tensor parallelism needs at least 1 worker, not {world}")
        if threads is None:
            threads = max(1, (os.cpu_count() or 1) // world)
        address = _free_address()
        workers: list[Worker] = []
        try:
            for rank in range(world):
                workers.append(_start_worker(rank))
        except BaseException:
            _stop_all(workers, threading.Lock(), 0.0)
            raise
        starts = [{"factory": factory, "threads": threads,
                   "options": {**options, "shard": {"rank": w.rank, "world": world,
                                                     "address": address}}}
                  for w in workers]
        return cls(workers, starts)

    @property
    def pids(self) -> list[int]:
        """The workers' process ids, rank order."""
        return [worker.process.pid for worker in self._workers]

    def close(self) -> None:
        """Stop every worker and reap it; later calls raise `CallError`. Idempotent."""
        if self._failure is None:
            self._failure = "the tensor-parallel workers were shut down"
        self._finalizer()

    # -- the sockets ---------------------------------------------------------------------------

    def _request(self, request: dict[str, Any]) -> Any:
        """The same request to every worker; rank 0's answer."""
        return self._answers(request)[0]

    def _bytes_moved(self, request: dict[str, Any]) -> list[int]:
        """A swap's byte count per call, summed over the ranks (each keeps its own KV heads)."""
        calls = len(request["calls"])
        answers = [byte_counts(answer, calls) for answer in self._answers(request)]
        return [sum(counts) for counts in zip(*answers, strict=True)]

    def _answers(self, request: dict[str, Any]) -> list[Any]:
        """Every rank's answer to the same request; the first error any rank answered raised."""
        return [reply_value(reply) for reply in self._exchange([request] * len(self._workers))]

    def _exchange(self, requests: list[dict[str, Any]],
                  first_error_ends: bool = False) -> list[Any]:
        """Send each worker its request and block, the GIL released, until all have answered
        or one has died; their replies, rank order."""
        with self._lock:
            if self._failure is not None:
                raise CallError(self._failure)
            try:
                replies = _send_and_gather(self._workers, requests, first_error_ends)
            except WorkerDied as died:
                self._fail(died.rank)
                raise CallError(self._failure) from None
            except BaseException:  # e.g. KeyboardInterrupt: the ranks may now be out of step
                self._failure = "a request to the tensor-parallel workers was interrupted"
                raise
        return replies

    def _fail(self, rank: int) -> None:
        """Record why the group ended and stop what is left of it (held: the lock)."""
        worker = self._workers[rank]
        self._failure = self._failure or (f"tensor-parallel rank {rank} of "
                                          f"{len(self._workers)}: {exit_reason(worker.process)}")
        _kill_all(self._workers)


def _start_value(reply: Any) -> Any:
    """A start reply's value; a worker's `ValueError` (options it refuses, a model that does not
    split) raised as such, for the command line to print as it is."""
    if isinstance(reply, dict) and reply.get("type") == "ValueError":
        raise ValueError(reply.get("error"))
    return reply_value(reply)


def _send_and_gather(workers: list[Worker], requests: list[dict[str, Any]],
                     first_error_ends: bool) -> list[Any]:
    """Every worker's reply, rank order; `WorkerDied` as soon as any socket ends. With
    `first_error_ends`, a rank's error reply alone is returned, the others not waited for."""
    for worker, request in zip(workers, requests, strict=True):
        try:
            write_frame(worker.sock, request)
        except OSError:
            raise WorkerDied(worker.rank) from None
    replies: dict[int, Any] = {}
    with selectors.DefaultSelector() as selector:
        for worker in workers:
            selector.register(worker.sock, selectors.EVENT_READ, worker)
        while len(replies) < len(workers):
            for key, _events in selector.select():
                worker = key.data
                try:
                    reply = read_frame(worker.sock)
                except OSError:
                    reply = None
                if reply is None:
                    raise WorkerDied(worker.rank)
                if first_error_ends and not (isinstance(reply, dict) and "ok" in reply):
                    return [reply]
                replies[worker.rank] = reply
                selector.unregister(worker.sock)
    return [replies[rank] for rank in range(len(workers))]


def _start_worker(rank: int) -> Worker:
    parent_end, child_end = socket.socketpair()
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "pie_trio.model.tensor_shard", str(child_end.fileno())],
            pass_fds=(child_end.fileno(),), stdin=subprocess.DEVNULL,
            # Workers write nothing on stdout; ours may carry a program's output.
            stdout=sys.__stderr__ or subprocess.DEVNULL, env=_worker_env())
    except BaseException:
        parent_end.close()
        raise
    finally:
        child_end.close()
    return Worker(rank, process, parent_end)


def _worker_env() -> dict[str, str]:
    """The model process's environment; gloo on loopback, since the ranks share one host (and
    the host name may not resolve to an address gloo can bind)."""
    env = child_env()
    env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    return env


def _free_address() -> str:
    """A local port nobody listens on now, for the ranks' rendezvous."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{probe.getsockname()[1]}"


def _kill_all(workers: list[Worker]) -> None:
    """Kill workers still running (the group is broken) and reap them."""
    for worker in workers:
        if worker.process.poll() is None:
            worker.process.kill()
    for worker in workers:
        worker.process.wait()


def _stop_all(workers: list[Worker], lock: threading.Lock, grace: float) -> None:
    """Close every socket (workers exit on EOF), kill those that linger past `grace`, reap."""
    for worker in workers:
        try:
            worker.sock.shutdown(socket.SHUT_RDWR)  # also wakes a thread waiting for answers
        except OSError:
            pass
    for worker in workers:
        try:
            worker.process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            break
    _kill_all(workers)
    # The fds close once no request holds them, so no thread reads a number reused meanwhile.
    acquired = lock.acquire(timeout=STOP_GRACE)
    for worker in workers:
        worker.sock.close()
    if acquired:
        lock.release()
