"""`RemoteRunner`: a `Runner` whose model runs in a process of its own.

Why: a forward on the CPU spends much of its time in Python (one call per layer and op), holding
the GIL, while the inferlets' Wasm threads and the trio loop need the same GIL to submit the next
calls. In one process the guests therefore reach the executor late and forward batches go out
half full. Here the child process owns the real `ModelRunner` (weights, KV cache with the host
copies of swapped-out pages, sampling generator) and has a GIL of its own; the executor's worker
thread only sends the batch and waits on a socket, which releases the GIL, so the guests run
while the model computes.

The seam is the model's own vocabulary: a request is a msgpack map `{"op": kind, "calls":
[call records]}` (`calls.to_msg`), or `{"op": "clear", "pages", "slots"}`; the answer is
`{"ok": value}` or `{"error": message, "type": name}`. Frames are a 4-byte length and the
msgpack bytes, over a socketpair. `check` runs here, in the caller's process: it is pure range
checking against the limits the child reports.

Lifetime: the child loads the model, answers with its `ModelInfo` and tokenizer, then serves
one request at a time until its socket closes, and exits. It ignores SIGINT and SIGTERM: a
Ctrl-C or a service manager's SIGTERM reaches the whole process group, and the server drains
its instances before it lets the model go (`close`). If the child dies, the call in flight and
every later one raise `CallError` naming its exit code or signal. `close` (also run when the
runner is collected or at exit) closes the socket, waits a moment, kills the child if it has
not gone, and reaps it.

Run as `python -m pie_trio.model.remote FD`: the child's side, on the socket inherited as FD.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import torch
from tokenizers import Tokenizer as Backend

from pie_trio.kernels.cpu_kernels import rest_workers
from pie_trio.model.calls import (
    Call,
    CallError,
    CopyKv,
    DropSwappedKv,
    Embed,
    Forward,
    ForwardResult,
    MaskKv,
    SwapInKv,
    SwapOutKv,
    call_from_msg,
    result_from_msg,
    to_msg,
)
from pie_trio.model.checks import ModelLimits, check_call
from pie_trio.model.interface import ModelInfo
from pie_trio.model.runner import ModelRunner
from pie_trio.model.tiny import tiny_runner
from pie_trio.model.tokenizer import Tokenizer

STOP_GRACE = 5.0  # seconds the child has to exit after its socket closes, before it is killed
_HEADER = struct.Struct("<I")


class MessageRunner:
    """The `Runner` calls as msgpack requests (model/calls.py's records): a subclass says how
    one request reaches the model (`_request`) and what a swap's answers moved (`_bytes_moved`).
    """

    info: ModelInfo
    tokenizer: Tokenizer
    limits: ModelLimits

    def _take_ready(self, ready: dict[str, Any]) -> None:
        """Learn the served model from the answer to the start request."""
        self.info = ModelInfo(**ready["info"])
        self.tokenizer = tokenizer_from_msg(ready["tokenizer"])
        self.limits = ModelLimits(
            num_pages=self.info.num_pages,
            page_size=self.info.page_size,
            num_slots=self.info.num_slots,
            vocab_size=self.info.vocab_size,
            max_position=self.info.max_position,
        )

    def _request(self, request: dict[str, Any]) -> Any:
        raise NotImplementedError

    def _bytes_moved(self, request: dict[str, Any]) -> list[int]:
        """A swap's byte count per call."""
        return byte_counts(self._request(request), len(request["calls"]))

    # -- the Runner protocol -------------------------------------------------------------------

    def check(self, call: Call) -> None:
        """Raise `CallError` if `call` cannot run on the served model and pool."""
        check_call(call, self.limits)

    def clear(self, pages: list[int], slots: list[int]) -> None:
        self._request({"op": "clear", "pages": pages, "slots": slots})

    def forward(self, calls: list[Forward]) -> list[ForwardResult]:
        results = self._request({"op": "forward", "calls": [to_msg(c) for c in calls]})
        return [result_from_msg(r) for r in results]

    def embed(self, calls: list[Embed]) -> None:
        self._request({"op": "embed", "calls": [to_msg(c) for c in calls]})

    def copy_kv(self, calls: list[CopyKv]) -> None:
        self._request({"op": "copy_kv", "calls": [to_msg(c) for c in calls]})

    def mask_kv(self, calls: list[MaskKv]) -> None:
        self._request({"op": "mask_kv", "calls": [to_msg(c) for c in calls]})

    # The host copies stay where the KV cache they came from is.

    def swap_out_kv(self, calls: list[SwapOutKv]) -> list[int]:
        return self._bytes_moved({"op": "swap_out_kv", "calls": [to_msg(c) for c in calls]})

    def swap_in_kv(self, calls: list[SwapInKv]) -> list[int]:
        return self._bytes_moved({"op": "swap_in_kv", "calls": [to_msg(c) for c in calls]})

    def drop_swapped_kv(self, calls: list[DropSwappedKv]) -> None:
        self._request({"op": "drop_swapped_kv", "calls": [to_msg(c) for c in calls]})


class RemoteRunner(MessageRunner):
    """A `Runner` (and its tokenizer) served by a child process; see the module docstring."""

    def __init__(self, process: subprocess.Popen[bytes], sock: socket.socket,
                 start: dict[str, Any]) -> None:
        """Take over a started child and its socket; send it `start` (what to load)."""
        self._process = process
        self._sock = sock
        self._lock = threading.Lock()  # one request on the socket at a time
        self._failure: str | None = None  # set once the child is gone
        self._finalizer = weakref.finalize(self, _stop, process, sock, self._lock)
        try:
            ready = self._request(start)
        except BaseException:
            self.close()
            raise
        self._take_ready(ready)

    @classmethod
    def load(cls, model: str | Path = "default", *, threads: int | None = None,
             **options: Any) -> RemoteRunner:
        """`ModelRunner.load(model, **options)` in a child process (options as plain values:
        strings and numbers). `threads`: torch threads of the child (default: torch's own)."""
        return cls.start("load", {"model": str(model), **options}, threads)

    @classmethod
    def tiny(cls, *, threads: int | None = None, **options: Any) -> RemoteRunner:
        """`tiny.tiny_runner(**options)`, the random-weight test model, in a child process."""
        return cls.start("tiny", options, threads)

    @classmethod
    def start(cls, factory: str, options: dict[str, Any], threads: int | None) -> RemoteRunner:
        """Start a child that builds its runner with `factory` ("load" or "tiny")."""
        parent_end, child_end = socket.socketpair()
        try:
            process = subprocess.Popen(
                [sys.executable, "-m", "pie_trio.model.remote", str(child_end.fileno())],
                pass_fds=(child_end.fileno(),), stdin=subprocess.DEVNULL,
                # The child writes nothing on stdout; ours may carry a program's output.
                stdout=sys.__stderr__ or subprocess.DEVNULL, env=child_env())
        except BaseException:
            parent_end.close()
            raise
        finally:
            child_end.close()
        return cls(process, parent_end,
                   {"factory": factory, "options": options, "threads": threads})

    @property
    def pid(self) -> int:
        return self._process.pid

    def close(self) -> None:
        """Stop the child and reap it; later calls raise `CallError`. Idempotent."""
        if self._failure is None:
            self._failure = "the model process was shut down"
        self._finalizer()

    # -- the socket ----------------------------------------------------------------------------

    def _request(self, request: dict[str, Any]) -> Any:
        """Send one request and block, the GIL released, until its answer comes back."""
        with self._lock:
            if self._failure is not None:
                raise CallError(self._failure)
            try:
                write_frame(self._sock, request)
                reply = read_frame(self._sock)
            except OSError:
                reply = None
            except BaseException:  # e.g. KeyboardInterrupt: an answer may still be on its way
                self._failure = "a request to the model process was interrupted"
                raise
            if reply is None:
                self._failure = self._failure or exit_reason(self._process)
                raise CallError(self._failure)
        return reply_value(reply)


def reply_value(reply: Any) -> Any:
    """The value of a child's `{"ok": value}`; its `{"error"}` raised (`CallError` as such)."""
    if not isinstance(reply, dict) or ("ok" not in reply and "error" not in reply):
        raise CallError(f"the model process answered {type(reply).__name__}, not a reply")
    if "error" in reply:
        if reply.get("type") == "CallError":
            raise CallError(reply["error"])
        raise RuntimeError(f"in the model process: {reply.get('type')}: {reply['error']}")
    return reply["ok"]


def byte_counts(reply: Any, calls: int) -> list[int]:
    """A swap's answer: one byte count for each of its `calls`."""
    if (not isinstance(reply, list) or len(reply) != calls
            or not all(isinstance(n, int) for n in reply)):
        raise CallError("the model process answered a swap with something other than byte counts")
    return reply


def exit_reason(process: subprocess.Popen[bytes]) -> str:
    """Why the child stopped answering, once it has exited (it is killed if it has not)."""
    try:
        code = process.wait(timeout=STOP_GRACE)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        return "the model process stopped answering and was killed"
    if code < 0:
        return f"the model process was killed by signal {signal.Signals(-code).name}"
    return f"the model process exited with code {code}"


def _stop(process: subprocess.Popen[bytes], sock: socket.socket, lock: threading.Lock) -> None:
    """Close the child's socket (it exits on EOF), kill it if it lingers, reap it."""
    try:
        sock.shutdown(socket.SHUT_RDWR)  # also wakes a thread blocked reading the answer
    except OSError:
        pass
    try:
        process.wait(timeout=STOP_GRACE)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    # The fd is closed once no request holds it, so no thread reads a number reused meanwhile.
    acquired = lock.acquire(timeout=STOP_GRACE)
    sock.close()
    if acquired:
        lock.release()


def child_env() -> dict[str, str]:
    """The environment, with this package importable whatever the working directory."""
    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


# -- frames ----------------------------------------------------------------------------------


def write_frame(sock: socket.socket, message: Any) -> None:
    data = msgpack.packb(message)
    sock.sendall(_HEADER.pack(len(data)) + data)


def read_frame(sock: socket.socket) -> Any:
    """The next message, or None when the other side has closed."""
    header = _read_exactly(sock, _HEADER.size)
    if header is None:
        return None
    (size,) = _HEADER.unpack(header)
    data = _read_exactly(sock, size)
    if data is None:
        return None
    return msgpack.unpackb(data, strict_map_key=False)  # logit_bias maps token ids


def _read_exactly(sock: socket.socket, size: int) -> bytearray | None:
    buffer = bytearray(size)
    view = memoryview(buffer)
    got = 0
    while got < size:
        n = sock.recv_into(view[got:])
        if n == 0:
            return None
        got += n
    return buffer


# -- what the child tells its parent ----------------------------------------------------------


def _tokenizer_to_msg(tokenizer: Tokenizer) -> dict[str, Any]:
    return {"backend": tokenizer.backend.to_str(), "vocab_size": tokenizer.vocab_size,
            "chat_template": tokenizer.chat_template, "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id, "stop_tokens": tokenizer.stop_tokens}


def tokenizer_from_msg(msg: dict[str, Any]) -> Tokenizer:
    return Tokenizer(Backend.from_str(msg["backend"]), vocab_size=msg["vocab_size"],
                     chat_template=msg["chat_template"], bos_token_id=msg["bos_token_id"],
                     eos_token_id=msg["eos_token_id"], extra_stop_ids=msg["stop_tokens"])


# -- the child -------------------------------------------------------------------------------


_BATCHED: dict[str, type[Call]] = {
    "forward": Forward, "embed": Embed, "copy_kv": CopyKv, "mask_kv": MaskKv,
    "swap_out_kv": SwapOutKv, "swap_in_kv": SwapInKv, "drop_swapped_kv": DropSwappedKv}


def _build_runner(factory: str, options: dict[str, Any], threads: int | None) -> ModelRunner:
    if threads is not None:
        torch.set_num_threads(threads)
    if factory == "tiny":
        return tiny_runner(**options)
    if factory == "load":
        return ModelRunner.load(**options)
    raise ValueError(f"unknown runner factory {factory!r}")


def _answer(runner: ModelRunner, request: dict[str, Any]) -> Any:
    op = request["op"]
    if op == "clear":
        runner.clear(request["pages"], request["slots"])
        return None
    kind = _BATCHED.get(op)
    if kind is None:
        raise CallError(f"unknown op {op!r}")
    calls = [call_from_msg(msg) for msg in request["calls"]]
    if not all(type(call) is kind for call in calls):
        raise CallError(f"a {op} request holds calls of another kind")
    if op == "forward":
        forwards = [call for call in calls if isinstance(call, Forward)]  # all of them
        return [to_msg(result) for result in runner.forward(forwards)]
    # The runner's batched methods are named after the kinds; swaps answer byte counts.
    return getattr(runner, op)(calls)


def _error(exc: BaseException) -> dict[str, Any]:
    return {"error": str(exc), "type": type(exc).__name__}


RunnerFactory = Callable[[str, dict[str, Any], int | None], ModelRunner]


def serve_child(sock: socket.socket, build: RunnerFactory = _build_runner) -> int:
    """The child's life: build the runner its parent asks for, then answer until EOF.

    `build(factory, options, threads)` makes the runner (tensor-parallel workers pass their
    own, which loads one shard)."""
    start = read_frame(sock)
    if start is None:
        return 0
    try:
        runner = build(start["factory"], start["options"], start["threads"])
    except Exception as exc:  # the parent raises it from `RemoteRunner.start`
        write_frame(sock, _error(exc))
        return 1
    on_cpu = runner.info.device == "cpu"  # (elsewhere the CPU kernels are never built)
    write_frame(sock, {"ok": {"info": dataclasses.asdict(runner.info),
                              "tokenizer": _tokenizer_to_msg(runner.tokenizer)}})
    while (request := read_frame(sock)) is not None:
        try:
            reply = {"ok": _answer(runner, request)}
        except Exception as exc:  # this batch fails for its callers; the model goes on
            reply = _error(exc)
        # The next request comes only after the server's threads have run (the executor's
        # answers, the guests): spinning kernel workers would hold the cores they need.
        if on_cpu:
            rest_workers()
        write_frame(sock, reply)
    return 0


def main(argv: list[str], build: RunnerFactory = _build_runner) -> int:
    # The parent decides when the model stops (see the module docstring).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    with socket.socket(fileno=int(argv[1])) as sock:
        try:
            return serve_child(sock, build)
        except (BrokenPipeError, ConnectionResetError):  # the parent went away mid-answer
            return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
