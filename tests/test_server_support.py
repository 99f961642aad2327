"""Shared by the server, client and CLI tests: small guests written in WAT, and servers.

The guests need no model, so the protocol, ownership and lifecycle tests run against the tiny
model in milliseconds; the real inferlet (`text-completion`) is used where tokens matter.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import blake3
import wasmtime

from pie_trio.config import Config
from pie_trio.server.background import BackgroundServer

# echo: forever, receive a message from the client and send it back (ends only when killed).
ECHO_WAT = r"""
(module
  (import "pie" "call" (func $call (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 2)
  (data (i32.const 0) "\81\a2op\a7receive")                 ;; {"op": "receive"}, 12 bytes
  (data (i32.const 64) "\82\a2op\a4send\a7message")          ;; {"op": "send", "message": 17 bytes
  (func (export "_start")
    (local $n i32)
    (loop $forever
      ;; the response {"ok": STR} lands at 4096; STR (already msgpack) starts 4 bytes in
      (local.set $n (call $call (i32.const 0) (i32.const 12) (i32.const 4096) (i32.const 60000)))
      (memory.copy (i32.const 81) (i32.const 4100) (i32.sub (local.get $n) (i32.const 4)))
      (drop (call $call (i32.const 64) (i32.add (i32.const 13) (local.get $n))
                  (i32.const 8192) (i32.const 1024)))
      (br $forever))))
"""

# greet: sends "Hello, " and "world!", prints "printed\n" to stdout, returns "Hello, world!".
GREET_WAT = r"""
(module
  (import "pie" "call" (func $call (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "\82\a2op\a4send\a7message\a7Hello, ")                      ;; 25 bytes
  (data (i32.const 32) "\82\a2op\a4send\a7message\a6world!")                      ;; 24 bytes
  (data (i32.const 64) "\82\a2op\aaset_return\a5value\adHello, world!")           ;; 35 bytes
  (data (i32.const 128) "printed\n")                                               ;; 8 bytes
  (func (export "_start")
    (drop (call $call (i32.const 0) (i32.const 25) (i32.const 1024) (i32.const 256)))
    (drop (call $call (i32.const 32) (i32.const 24) (i32.const 1024) (i32.const 256)))
    (i32.store (i32.const 256) (i32.const 128))   ;; iovec: pointer
    (i32.store (i32.const 260) (i32.const 8))     ;; iovec: length
    (drop (call $fd_write (i32.const 1) (i32.const 256) (i32.const 1) (i32.const 264)))
    (drop (call $call (i32.const 64) (i32.const 35) (i32.const 1024) (i32.const 256)))))
"""


def wasm(wat: str) -> bytes:
    return bytes(wasmtime.wat2wasm(wat))


def program_hash(module: bytes) -> str:
    return blake3.blake3(module).hexdigest()


BUILTIN_TEXT_COMPLETION = (Path(__file__).resolve().parent.parent / "pie_trio" / "builtin"
                           / "text-completion.wasm")

KEYS = {"alice": "key-alice", "bob": "key-bob"}


def test_config(**settings) -> Config:
    """Ephemeral ports, memory-only program store, small frames so size limits are cheap
    (uploads are chunked at 256 KiB by the client, well under the 1 MiB frame limit)."""
    values = {"http_port": 0, "tcp_port": 0, "max_frame_size": "1MiB",
              "max_upload_size": "1MiB", "log_level": "warning"} | settings
    return Config().merged(values, source="test").validate()


test_config.__test__ = False  # a helper, not a test


@contextlib.contextmanager
def background_server(runner, **settings) -> Iterator[BackgroundServer]:
    with BackgroundServer(test_config(**settings), runner=runner) as server:
        yield server
