"""Hostile input over real sockets: each test plays one abusive client against a real server and
checks that the server refuses it early, stays bounded in memory and time, and keeps serving
everyone else (docs/server.md, "Hostile input").

Memory is measured as this process's resident set (the server runs in a background thread of
the test process), so a test compares growth against a bound well below what the defect cost.
"""

from __future__ import annotations

import base64
import json
import os
import struct
import time

import httpx
import msgpack
import pytest
import trio
import trio_websocket
from hypothesis import given, settings
from hypothesis import strategies as st
from test_server_support import ECHO_WAT, background_server, wasm

from pie_trio import protocol
from pie_trio.client import ConnectionClosed, ServerError, connect
from pie_trio.model.tiny import tiny_runner

MiB = 1 << 20
KEYS = {"alice": "key-alice", "bob": "key-bob", "root": "key-root"}
ECHO = wasm(ECHO_WAT)
PAGES = 64  # the tiny model's KV pool in these servers; a tenant may hold half

SETTINGS = {
    "api_keys": KEYS, "operators": "root", "auth_timeout": 1.5, "frame_timeout": 1.0,
    "outbox_size": "256KiB", "upload_buffer_per_session": "1.5MiB",
    "upload_buffer_total": "2.5MiB", "max_instances_per_tenant": 3, "tenant_kv_share": 0.5,
    "max_persistent_exports": 2, "max_chat_messages": 16,
}


@pytest.fixture(scope="module")
def server():
    with background_server(tiny_runner(num_pages=PAGES), **SETTINGS) as server:
        yield server


@pytest.fixture(scope="module")
def strict_server():
    """Tight connection caps and write timeout, and the other choice for /health, /metrics."""
    with background_server(tiny_runner(num_pages=PAGES), **SETTINGS, send_timeout=1.0,
                           max_connections=5, max_connections_per_peer=3,
                           public_health=False, public_metrics=True) as server:
        yield server


def rss() -> int:
    """This process's resident memory in bytes."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# -- raw WebSocket and TCP clients ---------------------------------------------------------------


async def raw_websocket(port: int, key: str | None = KEYS["alice"],
                        source: str | None = None) -> tuple[trio.SocketStream, bytes]:
    """A WebSocket handshake by hand: the stream and the server's response head."""
    stream = await trio.open_tcp_stream("127.0.0.1", port, local_address=source)
    nonce = base64.b64encode(os.urandom(16))
    auth = f"Authorization: Bearer {key}\r\n".encode() if key else b""
    await stream.send_all(b"GET /ws HTTP/1.1\r\nHost: test\r\nUpgrade: websocket\r\n"
                          b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                          b"Sec-WebSocket-Key: " + nonce + b"\r\n" + auth + b"\r\n")
    head = b""
    with trio.fail_after(5):
        while b"\r\n\r\n" not in head:
            chunk = await stream.receive_some()
            if not chunk:
                break
            head += chunk
    return stream, head


def ws_frame_header(length: int, opcode: int = 0x2, fin: bool = True) -> bytes:
    """A masked client frame header announcing `length` payload bytes (mask key 0)."""
    first = (0x80 if fin else 0) | opcode
    if length < 126:
        return bytes([first, 0x80 | length]) + b"\0" * 4
    if length < 1 << 16:
        return bytes([first, 0x80 | 126]) + struct.pack(">H", length) + b"\0" * 4
    return bytes([first, 0x80 | 127]) + struct.pack(">Q", length) + b"\0" * 4


def ws_message(payload: bytes) -> bytes:
    return ws_frame_header(len(payload)) + payload  # mask key 0: the payload as is


def ws_close_code(data: bytes) -> int | None:
    """The code of the first close frame in server bytes (unmasked frames), if any."""
    while len(data) >= 2:
        opcode, length = data[0] & 0x0F, data[1] & 0x7F
        start = 2 + {126: 2, 127: 8}.get(length, 0)
        if length == 126:
            length = struct.unpack_from(">H", data, 2)[0]
        elif length == 127:
            length = struct.unpack_from(">Q", data, 2)[0]
        if opcode == 0x8:
            return struct.unpack_from(">H", data, start)[0] if length >= 2 else None
        data = data[start + length:]
    return None


def tcp_messages(data: bytes) -> list[dict]:
    messages = []
    while len(data) >= 4:
        (size,) = struct.unpack_from(">I", data)
        if len(data) < 4 + size:
            break
        messages.append(msgpack.unpackb(data[4:4 + size]))
        data = data[4 + size:]
    return messages


def tcp_frame(message: dict) -> bytes:
    return protocol.frame(msgpack.packb(message, use_bin_type=True))


async def read_until_closed(stream: trio.abc.Stream, timeout: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes, and how long that took."""
    data = b""
    started = time.monotonic()
    with trio.fail_after(timeout):
        while True:
            try:
                chunk = await stream.receive_some()
            except trio.BrokenResourceError:  # reset: the server dropped the connection
                break
            if not chunk:
                break
            data += chunk
    return data, time.monotonic() - started


async def still_open(stream: trio.abc.Stream, seconds: float) -> bool:
    """Whether the server leaves the connection open (sending nothing) for `seconds`."""
    with trio.move_on_after(seconds):
        try:
            return bool(await stream.receive_some())
        except trio.BrokenResourceError:
            return False
    return True


# -- 1. oversized WebSocket messages -------------------------------------------------------------


@pytest.mark.parametrize("shape", ["one frame", "fragments"])
async def test_oversized_websocket_message_is_refused_from_its_header(server, shape):
    """The announced length decides: the server closes (1009) and drops the connection before
    it has read much, instead of buffering the whole message first."""
    stream, head = await raw_websocket(server.addresses.http_port)
    assert b" 101 " in head.split(b"\r\n")[0]
    chunk = b"\0" * (64 * 1024)
    announced = 256 * MiB
    if shape == "one frame":
        header, per_frame = ws_frame_header(announced), None
    else:  # 256 KiB frames of one message, never final: only their sum is too large
        header, per_frame = ws_frame_header(256 * 1024, fin=False), 256 * 1024
    received = b""
    sent = 0
    before = rss()
    started = time.monotonic()

    async def read() -> None:
        nonlocal received
        received = (await read_until_closed(stream, 30))[0]

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read)
        try:
            await stream.send_all(header)
            while sent < 64 * MiB:  # a quarter of the announced size is plenty to see it
                if per_frame and sent and sent % per_frame == 0:
                    await stream.send_all(ws_frame_header(per_frame, opcode=0, fin=False))
                await stream.send_all(chunk)
                sent += len(chunk)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
    elapsed = time.monotonic() - started
    grown = rss() - before
    await stream.aclose()
    assert sent < 16 * MiB, f"the server read {sent / MiB:.0f} MiB before refusing"
    assert elapsed < 5, f"refusing took {elapsed:.1f} s"
    assert grown < 24 * MiB, f"resident memory grew {grown / MiB:.0f} MiB"
    received = head.split(b"\r\n\r\n", 1)[1] + received
    if received:  # the close frame, unless the reset overtook it
        assert ws_close_code(received) == 1009


# -- 2. slow and silent clients -------------------------------------------------------------------


@pytest.mark.parametrize("pace", ["trickle", "silent"])
async def test_websocket_message_must_arrive_in_time(server, pace):
    stream, head = await raw_websocket(server.addresses.http_port)
    body = head.split(b"\r\n\r\n", 1)[1]
    await stream.send_all(ws_frame_header(100) + b"\x80")

    async def trickle() -> None:
        while pace == "trickle":
            await trio.sleep(0.2)
            try:
                await stream.send_all(b"\x80")
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trickle)
        data, elapsed = await read_until_closed(stream, 10)
        nursery.cancel_scope.cancel()
    assert elapsed < 8, f"a {pace} message was held {elapsed:.1f} s"
    assert ws_close_code(body + data) in (1008, None)  # None: the reset overtook the frame


@pytest.mark.parametrize("pace", ["trickle", "silent"])
async def test_tcp_frame_must_arrive_in_time(server, pace):
    stream = await trio.open_tcp_stream("127.0.0.1", server.addresses.tcp_port)
    await stream.send_all(tcp_frame({"id": 1, "type": "authenticate", "token": KEYS["alice"]}))
    await stream.send_all(struct.pack(">I", 100) + b"\x80")

    async def trickle() -> None:
        while pace == "trickle":
            await trio.sleep(0.2)
            await stream.send_all(b"\x80")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trickle)
        data, elapsed = await read_until_closed(stream, 10)
        nursery.cancel_scope.cancel()
    messages = tcp_messages(data)
    assert elapsed < 8, f"a {pace} frame was held {elapsed:.1f} s"
    assert messages[0]["result"] == {"tenant": "alice"}
    assert messages[1]["error"] == "timeout" and "did not complete" in messages[1]["message"]
    assert messages[-1] == {"type": "close", "code": 1008, "reason": messages[1]["message"]}


@pytest.mark.parametrize("transport", ["ws", "tcp"])
async def test_unauthenticated_connections_are_closed(server, transport):
    if transport == "ws":
        stream, head = await raw_websocket(server.addresses.http_port, key=None)
        assert b" 101 " in head
    else:
        stream = await trio.open_tcp_stream("127.0.0.1", server.addresses.tcp_port)
    data, elapsed = await read_until_closed(stream, 10)
    assert 1.0 < elapsed < 8, f"closed after {elapsed:.1f} s"
    if transport == "tcp":
        messages = tcp_messages(data)
        assert messages[0]["error"] == "timeout" and "authenticated" in messages[0]["message"]
        assert messages[-1]["code"] == 1008
    # An authenticated client on the same server is not affected.
    async with connect(server.addresses.ws, KEYS["bob"]) as client:
        await trio.sleep(2.0)
        assert await client.request("query", what="models")


async def test_connection_caps_per_peer_and_in_total(strict_server):
    """3 connections per address, 5 in all: the next one is told why, over either transport,
    and the others keep working. (127.0.0.x are distinct peers on loopback.)"""
    tcp, http = strict_server.addresses.tcp_port, strict_server.addresses.http_port
    held = [await trio.open_tcp_stream("127.0.0.1", tcp, local_address="127.0.0.1")
            for _ in range(3)]
    over_peer = await trio.open_tcp_stream("127.0.0.1", tcp, local_address="127.0.0.1")
    messages = tcp_messages((await read_until_closed(over_peer, 5))[0])
    assert messages[0]["error"] == "limit" and "127.0.0.1" in messages[0]["message"]
    assert messages[-1]["code"] == 1013
    refused_ws, head = await raw_websocket(http, source="127.0.0.1")
    assert head.startswith(b"HTTP/1.1 503") and b"retry-after" in head.lower()
    await refused_ws.aclose()
    held += [await trio.open_tcp_stream("127.0.0.1", tcp, local_address="127.0.0.2")
             for _ in range(2)]
    over_total, head = await raw_websocket(http, source="127.0.0.3")
    head += (await read_until_closed(over_total, 5))[0]
    assert head.startswith(b"HTTP/1.1 503") and b"maximum of 5 connections" in head
    await over_total.aclose()
    # The connections that were admitted are served normally.
    await held[0].send_all(tcp_frame({"id": 1, "type": "authenticate", "token": KEYS["bob"]}))
    with trio.fail_after(5):
        assert tcp_messages(await held[0].receive_some())[0]["ok"]
    for stream in held:
        await stream.aclose()
    with trio.fail_after(5):
        while True:  # the server sees the closes; then a new connection is admitted
            try:
                async with connect(strict_server.addresses.tcp, KEYS["bob"]) as client:
                    assert await client.request("query", what="models")
                break
            except (ConnectionClosed, ServerError):
                await trio.sleep(0.05)


# -- 3. host memory per connection ----------------------------------------------------------------

BIG_MESSAGE = 512 * 1024


def wat_bytes(data: bytes) -> str:
    """`data` as the body of a WAT string literal."""
    return "".join(f"\\{b:02x}" for b in data)


def flood_wat(size: int) -> str:
    """Sends `size`-byte messages (NUL characters) forever."""
    header = b"\x82\xa2op\xa4send\xa7message\xdb" + struct.pack(">I", size)
    escaped = wat_bytes(header)
    response = len(header) + size + 64
    pages = (response + 1024) // 65536 + 1
    return f"""
(module
  (import "pie" "call" (func $call (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") {pages})
  (data (i32.const 0) "{escaped}")
  (func (export "_start")
    (loop $forever
      (drop (call $call (i32.const 0) (i32.const {len(header) + size})
                  (i32.const {response}) (i32.const 1024)))
      (br $forever))))
"""


FLOOD = wasm(flood_wat(BIG_MESSAGE))


async def launch_unread(url: str, tcp_port: int) -> trio.SocketStream:
    """Launch the flood over raw TCP, then never read: the server must hold the output."""
    async with connect(url, KEYS["alice"]) as client:
        program = await client.upload(FLOOD)
    stream = await trio.open_tcp_stream("127.0.0.1", tcp_port)
    await stream.send_all(tcp_frame({"id": 1, "type": "authenticate", "token": KEYS["alice"]})
                          + tcp_frame({"id": 2, "type": "launch_instance", "program": program}))
    return stream


async def test_unread_output_is_bounded_in_bytes(server):
    """A client that launches a chatty instance and stops reading costs the server a bounded
    number of bytes (outbox_size plus one message per instance and its runtime backlog), not
    256 of its 512 KiB messages."""
    before = rss()
    stream = await launch_unread(server.addresses.ws, server.addresses.tcp_port)
    peak = 0
    for _ in range(30):
        await trio.sleep(0.1)
        peak = max(peak, rss() - before)
    await stream.aclose()
    assert peak < 40 * MiB, f"resident memory grew {peak / MiB:.0f} MiB"


@pytest.mark.parametrize("transport", ["ws", "tcp"])
async def test_a_client_that_does_not_read_is_disconnected(strict_server, transport):
    addresses = strict_server.addresses
    if transport == "tcp":
        stream = await launch_unread(addresses.ws, addresses.tcp_port)
    else:
        async with connect(addresses.ws, KEYS["alice"]) as client:
            program = await client.upload(FLOOD)
        stream, _ = await raw_websocket(addresses.http_port)
        await stream.send_all(ws_message(msgpack.packb(
            {"id": 1, "type": "launch_instance", "program": program})))
    await trio.sleep(3.0)  # send_timeout is 1 s
    data, elapsed = await read_until_closed(stream, 10)
    assert elapsed < 8, "the server still holds the connection of a client that never reads"
    await stream.aclose()
    async with connect(addresses.ws, KEYS["alice"]) as client:
        with trio.fail_after(5):
            while await client.instances():  # its instance ended with it
                await trio.sleep(0.05)


async def test_unfinished_uploads_are_bounded_per_session_and_in_total(server):
    async def begin(client, n: int) -> dict:
        return await client.request("upload_begin", hash=f"{n:064x}", size=MiB)

    async with connect(server.addresses.ws, KEYS["alice"]) as first:
        assert await begin(first, 1) == {"exists": False}
        with pytest.raises(ServerError) as refused:  # 2 MiB would pass the 1.5 MiB per session
            await begin(first, 2)
        assert refused.value.code == "limit" and "this session" in refused.value.message
        async with connect(server.addresses.tcp, KEYS["bob"]) as second:
            assert await begin(second, 3) == {"exists": False}
            async with connect(server.addresses.tcp, KEYS["bob"]) as third:
                with pytest.raises(ServerError) as refused:  # 3 MiB would pass 2.5 in all
                    await begin(third, 4)
                assert refused.value.code == "limit" and "retry later" in refused.value.message
                await second.request("upload_begin", hash=f"{3:064x}", size=100)  # shrinks
                assert await begin(third, 4) == {"exists": False}


# -- 4. tenants: instances, KV pages, exports -----------------------------------------------------


def script_wat(requests: list[dict]) -> str:
    """A guest that sends each request in turn and tells its client the outcome of each, as a
    message: "ok", or the error text. It ends after the last one (make that a `receive` to
    keep what it holds)."""
    data, steps, offset = [], [], 1024
    for request in requests:
        packed = msgpack.packb(request)
        data.append(f'(data (i32.const {offset}) "{wat_bytes(packed)}")')
        steps.append(f"(call $step (i32.const {offset}) (i32.const {len(packed)}))")
        offset += len(packed) + 16
    return r"""
(module
  (import "pie" "call" (func $call (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 16384) "\82\a2op\a4send\a7message")          ;; + the error's msgpack str
  (data (i32.const 20480) "\82\a2op\a4send\a7message\a2ok")     ;; 20 bytes
  """ + "\n  ".join(data) + r"""
  (func $step (param $request i32) (param $length i32)
    (local $n i32)
    (local.set $n (call $call (local.get $request) (local.get $length)
                        (i32.const 32768) (i32.const 4096)))
    ;; {"error": STR} starts 81 a5 'error'; {"ok": ...} starts 81 a2 'ok'
    (if (i32.eq (i32.load8_u (i32.const 32769)) (i32.const 0xa5))
      (then
        (memory.copy (i32.const 16401) (i32.const 32775) (i32.sub (local.get $n) (i32.const 7)))
        (drop (call $call (i32.const 16384) (i32.add (local.get $n) (i32.const 10))
                    (i32.const 40960) (i32.const 256))))
      (else (drop (call $call (i32.const 20480) (i32.const 20) (i32.const 40960)
                        (i32.const 256))))))
  (func (export "_start")
    """ + "\n    ".join(steps) + "))\n"


async def run_script(url: str, key: str, requests: list[dict], keep: bool = False):
    """Run a script guest as the tenant of `key`: its outcomes, and the client and instance if
    `keep` (then it waits in `receive`, holding what it allocated, until the caller ends it)."""
    steps = requests + ([{"op": "receive"}] if keep else [])
    program = wasm(script_wat(steps))
    client_cm = connect(url, key)
    client = await client_cm.__aenter__()
    program = await client.upload(program)
    instance = await client.launch(program)
    outcomes = []
    with trio.fail_after(30):
        while len(outcomes) < len(requests):
            event = await instance.next_event()
            assert event.kind == "message", event
            outcomes.append(event.text)
    if keep:
        return outcomes, client_cm, instance
    await client_cm.__aexit__(None, None, None)
    return outcomes


async def test_instances_per_tenant_are_capped(server):
    async with connect(server.addresses.ws, KEYS["alice"]) as alice:
        with trio.fail_after(15):  # instances of earlier tests may still be ending
            while await alice.instances():
                await trio.sleep(0.05)
        program = await alice.upload(ECHO)
        mine = [await alice.launch(program) for _ in range(3)]
        with pytest.raises(ServerError) as refused:
            await alice.launch(program)
        assert refused.value.code == "limit" and "'alice'" in refused.value.message
        async with httpx.AsyncClient(base_url=server.addresses.http, timeout=30) as http:
            response = await http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2},
                                       headers={"Authorization": f"Bearer {KEYS['alice']}"})
            assert response.status_code == 503 and response.headers["retry-after"]
        async with connect(server.addresses.tcp, KEYS["bob"]) as bob:  # others are not starved
            theirs = await bob.launch(program)
            await theirs.terminate()
        for instance in mine:
            await instance.terminate()


def pages(count: int) -> list[int]:
    return list(range(count))


async def test_persistent_exports_belong_to_their_tenant(server):
    url = server.addresses.ws
    made = await run_script(url, KEYS["alice"], [
        {"op": "alloc_pages", "count": 2},
        {"op": "export_pages", "name": "alice/1", "pages": pages(2), "persistent": True},
        {"op": "export_pages", "name": "alice/2", "pages": pages(2), "persistent": True},
        {"op": "export_pages", "name": "alice/3", "pages": pages(2), "persistent": True},
    ])
    assert made[:3] == ["ok", "ok", "ok"]
    assert "export_pages" in made[3] and "limit" in made[3]  # max_persistent_exports = 2
    # Alice's instance is gone; her exports stay, and only she or an operator removes them.
    assert await run_script(url, KEYS["bob"], [{"op": "unexport", "name": "alice/1"}]) == [
        "unexport: the export 'alice/1' belongs to another tenant"]
    assert await run_script(url, KEYS["root"], [{"op": "unexport", "name": "alice/1"}]) == ["ok"]
    assert await run_script(url, KEYS["alice"], [{"op": "unexport", "name": "alice/2"}]) == [
        "ok"]
    assert await kv_pages_in_use(server) == 0


def _gauge(metrics: str, name: str) -> int:
    line = next((ln for ln in metrics.splitlines() if ln.startswith(name + " ")), f"{name} 0")
    return int(float(line.split()[1]))


async def kv_pages_in_use(server) -> int:
    async with httpx.AsyncClient(base_url=server.addresses.http) as http:
        with trio.fail_after(5):
            while True:
                metrics = (await http.get(
                    "/metrics", headers={"Authorization": f"Bearer {KEYS['alice']}"})).text
                # Pages the automatic prefix cache keeps for later requests are not held.
                value = (_gauge(metrics, "pie_trio_kv_pages_in_use")
                         - _gauge(metrics, "pie_trio_prefix_cache_pages"))
                if value == 0:
                    return 0
                await trio.sleep(0.05)


async def test_one_tenant_cannot_take_the_kv_pool(server):
    """A tenant holds at most half the pages; when its share is used up the API tells it to
    retry (503), never 500, and other tenants are served."""
    url = server.addresses.ws
    greedy = await run_script(url, KEYS["alice"], [{"op": "alloc_pages", "count": PAGES}])
    assert greedy[0].startswith("alloc_pages: out of KV pages") and "quota of 32" in greedy[0]
    held, client_cm, instance = await run_script(
        url, KEYS["alice"], [{"op": "alloc_pages", "count": PAGES // 2}], keep=True)
    assert held == ["ok"]
    try:
        async with httpx.AsyncClient(base_url=server.addresses.http, timeout=60) as http:
            body = {"prompt": "Once upon a time", "max_tokens": 4, "temperature": 0}

            async def complete(tenant: str) -> httpx.Response:
                return await http.post("/v1/completions", json=body, headers={
                    "Authorization": f"Bearer {KEYS[tenant]}"})

            refused = await complete("alice")
            assert refused.status_code == 503, refused.text
            assert refused.headers["retry-after"] == "1"
            assert "out of KV pages" in refused.json()["error"]["message"]
            assert (await complete("bob")).status_code == 200
    finally:
        await instance.terminate()
        await client_cm.__aexit__(None, None, None)


# -- 5. chat rendering, decoding, /health and /metrics --------------------------------------------


async def test_huge_chat_is_refused_without_stalling_the_server(server):
    headers = {"Authorization": f"Bearer {KEYS['alice']}"}
    messages = [{"role": "user", "content": "hi"}] * 25_000  # ~0.9 MB, under the body limit
    body = json.dumps({"messages": messages, "max_tokens": 2}).encode()
    latencies = []
    async with httpx.AsyncClient(base_url=server.addresses.http, timeout=60) as http:

        async def probe() -> None:
            while True:
                started = time.monotonic()
                assert (await http.get("/health")).status_code == 200
                latencies.append(time.monotonic() - started)
                await trio.sleep(0.02)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(probe)
            await trio.sleep(0.1)
            for _ in range(3):
                response = await http.post("/v1/chat/completions", content=body, headers={
                    **headers, "content-type": "application/json"})
                assert response.status_code == 400
                assert "max_chat_messages" in response.json()["error"]["message"]
            nursery.cancel_scope.cancel()
    assert max(latencies) < 2.0, f"/health stalled {max(latencies):.2f} s"


@pytest.mark.parametrize("url_kind", ["ws", "tcp"])
@pytest.mark.parametrize(("message", "field"), [
    ({"id": 1, "type": ["query"]}, "type"),
    ({"id": 1, "type": {"a": 1}}, "type"),
    ({"id": 1, "type": "query", "what": ["models"]}, "what"),
    ({"id": 1, "type": "launch_instance", "program": {"x": 1}}, "program"),
    ({"id": 1, "type": "launch_instance", "program": "p", "args": [["a"]]}, "args"),
    ({"id": [1], "type": "query", "what": "models"}, "id"),
])
async def test_fields_of_the_wrong_type_are_bad_requests(server, url_kind, message, field):
    if url_kind == "ws":
        async with trio_websocket.open_websocket_url(server.addresses.ws, extra_headers=[
                (b"authorization", f"Bearer {KEYS['alice']}".encode())]) as ws:
            await ws.send_message(msgpack.packb(message))
            with trio.fail_after(5):
                reply = msgpack.unpackb(await ws.get_message())
    else:
        stream = await trio.open_tcp_stream("127.0.0.1", server.addresses.tcp_port)
        async with stream:
            await stream.send_all(tcp_frame({"id": 0, "type": "authenticate",
                                             "token": KEYS["alice"]}) + tcp_frame(message))
            data = b""
            with trio.fail_after(5):
                while len(tcp_messages(data)) < 2:
                    data += await stream.receive_some()
            reply = tcp_messages(data)[1]
    assert reply["error"] == "bad_request", reply
    assert repr(field) in reply["message"]


values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text()
    | st.binary(), lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(st.text(max_size=4), inner, max_size=3), max_leaves=6)
FIELDS = ["type", "id", "token", "what", "program", "hash", "size", "data", "args", "instance",
          "message"]


@settings(max_examples=400, deadline=None, database=None)
@given(st.sampled_from(sorted(protocol.REQUESTS)), st.dictionaries(st.sampled_from(FIELDS),
                                                                   values, max_size=6))
def test_the_decoder_refuses_every_wrong_type_by_name(kind, fields):
    """Whatever value any field holds, decoding returns a request or raises ProtocolError."""
    message = {"id": 1, "type": kind} | fields
    try:
        protocol.decode_request(msgpack.packb(message))
    except protocol.ProtocolError as exc:
        assert exc.code in (protocol.BAD_REQUEST, protocol.UNKNOWN_TYPE), exc.code


async def test_health_and_metrics_access_follows_the_settings(server, strict_server):
    """Defaults: /health public, /metrics needs a key; strict_server flips both."""
    key = {"Authorization": f"Bearer {KEYS['bob']}"}
    async with httpx.AsyncClient() as http:
        default, strict = server.addresses.http, strict_server.addresses.http
        assert (await http.get(default + "/health")).status_code == 200
        assert (await http.get(default + "/metrics")).status_code == 401
        assert (await http.get(default + "/metrics", headers=key)).status_code == 200
        assert (await http.get(strict + "/health")).status_code == 401
        assert (await http.get(strict + "/health", headers=key)).status_code == 200
        assert (await http.get(strict + "/metrics")).status_code == 200
