"""Every hostile probe in turn against one real server, over real sockets, then the proof that
the server is whole: it still answers a completion, and its resident memory, threads and file
descriptors are back within stated bounds of where they started (docs/server.md, "Hostile
input"). The server runs in a background thread of this process, so the process's counters are
the server's."""

from __future__ import annotations

import os
import threading

import httpx
import pytest
import trio
import wasmtime
from test_runtime_hostile import START_CALLER, bomb
from test_runtime_support import GUESTS
from test_server_hostile import (
    KEYS,
    raw_websocket,
    read_until_closed,
    rss,
    tcp_frame,
    tcp_messages,
    ws_close_code,
    ws_frame_header,
)
from test_server_support import background_server

from pie_trio.client import ServerError, connect
from pie_trio.model.tiny import tiny_runner
from pie_trio.runtime.sandbox import MiB

# Bounds on what the whole sweep may leave behind. Memory: allocator arenas keep some of what
# a probe touched (the defects themselves cost hundreds of MB to GBs each).
RSS_BOUND = 96 * MiB
THREAD_SLACK = 2  # trio's idle worker threads retire 10 s after their last job
FD_SLACK = 4  # sockets the server has not reaped yet

SETTINGS = {
    "api_keys": KEYS, "max_upload_size": "8MiB", "max_frame_size": "8MiB",
    "instance_cpu_time": 0.5, "instance_cpu_total": 1.0, "max_chat_messages": 16,
    "program_store_programs": 8,
}


def guest(name: str) -> bytes:
    return bytes(wasmtime.wat2wasm((GUESTS / f"{name}.wat").read_text()))


def variant(index: int) -> bytes:
    return bytes(wasmtime.wat2wasm(
        f'(module (memory (export "memory") 1) (data (i32.const 0) "v{index}") '
        '(func (export "_start")))'))


def descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


def fd_targets() -> list[str]:
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            out.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            pass
    return sorted(out)


async def settle_threads(baseline: int) -> int:
    with trio.move_on_after(15):
        while threading.active_count() > baseline:
            await trio.sleep(0.1)
    return threading.active_count()


async def completes(http_url: str) -> None:
    async with httpx.AsyncClient(base_url=http_url, timeout=30) as http:
        response = await http.post("/v1/completions", headers={
            "Authorization": f"Bearer {KEYS['alice']}"},
            json={"prompt": "Once upon a time", "max_tokens": 4, "temperature": 0})
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["text"]


async def refused_upload(url: str, module: bytes, words: str) -> None:
    async with connect(url, KEYS["bob"]) as client:
        with pytest.raises(ServerError, match=words):
            await client.upload(module)


async def ends_with(url: str, module: bytes, args: list[str], reason: str, words: str) -> None:
    async with connect(url, KEYS["bob"]) as client:
        instance = await client.launch(await client.upload(module), args)
        with trio.fail_after(60):
            async for _ in instance.events():
                pass
    assert instance.result.reason == reason, instance.result
    assert words in (instance.result.detail or ""), instance.result


async def oversized_websocket(port: int) -> None:
    stream, head = await raw_websocket(port)
    assert b" 101 " in head
    await stream.send_all(ws_frame_header(256 * MiB) + b"\0" * 65536)
    data, _ = await read_until_closed(stream, 10)
    await stream.aclose()
    assert ws_close_code(data) == 1009


async def list_type_request(port: int) -> None:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(tcp_frame({"type": ["launch"], "id": 1}))
    data = b""
    with trio.fail_after(10):
        while not tcp_messages(data):
            data += await stream.receive_some()
    await stream.aclose()
    assert tcp_messages(data)[0]["error"] == "bad_request"


async def huge_chat(http_url: str) -> None:
    messages = [{"role": "user", "content": "hi"}] * 100_000
    async with httpx.AsyncClient(base_url=http_url, timeout=30) as http:
        response = await http.post("/v1/chat/completions", headers={
            "Authorization": f"Bearer {KEYS['alice']}"}, json={"messages": messages})
    assert response.status_code == 400 and "max_chat_messages" in response.text


async def many_programs(url: str) -> None:
    """Twice the store's program count: the oldest unused programs make room, launches go on."""
    async with connect(url, KEYS["bob"]) as client:
        for index in range(16):
            program = await client.upload(variant(index))
            instance = await client.launch(program)
            async for _ in instance.events():
                pass
            assert instance.result.reason == "finished", instance.result


@pytest.fixture
def server():
    with background_server(tiny_runner(num_pages=64), **SETTINGS) as server:
        yield server


async def test_after_every_probe_the_server_is_whole(server):
    addresses = server.addresses
    await completes(addresses.http)  # warm: first-use allocations are not leaks
    baseline = rss(), threading.active_count(), descriptors()

    await refused_upload(addresses.ws, START_CALLER, "start function")
    await refused_upload(addresses.ws, bomb(999_000), "program_max_functions")
    await ends_with(addresses.ws, guest("spin"), [], "limit", "CPU")
    await ends_with(addresses.tcp, guest("local"), ["2000000000"], "limit", "CPU")
    await oversized_websocket(addresses.http_port)
    await list_type_request(addresses.tcp_port)
    await huge_chat(addresses.http)
    await many_programs(addresses.ws)

    await completes(addresses.http)
    threads = await settle_threads(baseline[1])
    grown = rss() - baseline[0]
    assert grown < RSS_BOUND, f"resident memory grew {grown / MiB:.0f} MiB"
    assert threads <= baseline[1] + THREAD_SLACK, (threads, baseline[1])
    # A stored program that has run keeps its memory image (a memfd) until it is evicted, so
    # descriptors are bounded by the store's program count, not by the number of uploads.
    fd_bound = baseline[2] + FD_SLACK + SETTINGS["program_store_programs"]
    assert descriptors() <= fd_bound, (baseline[2], fd_targets())
