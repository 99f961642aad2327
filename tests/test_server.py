"""The server over real sockets (tiny model): WebSocket and TCP sessions, uploads, instances,
protocol violations, disconnects, HTTP endpoints."""

from __future__ import annotations

import struct

import httpx
import msgpack
import pytest
import trio
import trio_websocket
from test_server_support import ECHO_WAT, GREET_WAT, background_server, program_hash, wasm

from pie_trio.client import ConnectionClosed, ServerError, connect
from pie_trio.model.tiny import tiny_runner

ECHO = wasm(ECHO_WAT)
GREET = wasm(GREET_WAT)


@pytest.fixture(scope="module")
def server():
    with background_server(tiny_runner(num_pages=128)) as server:
        yield server


@pytest.fixture(params=["ws", "tcp"])
def url(request, server) -> str:
    return server.addresses.ws if request.param == "ws" else server.addresses.tcp


async def collect(instance) -> list:
    """Every remaining event of the instance, up to its end."""
    with trio.fail_after(30):
        return [event async for event in instance.events()]


# -- sessions -----------------------------------------------------------------------------------


async def test_upload_launch_signal_terminate(url):
    async with connect(url) as client:
        program = await client.upload(ECHO)
        assert program == program_hash(ECHO)
        assert await client.program_exists(program)
        instance = await client.launch(program)
        await instance.signal("hello")
        await instance.signal("wörld ✓")
        assert [e.text for e in await collect_messages(instance, 2)] == ["hello", "wörld ✓"]
        assert instance.id in [row["instance"] for row in await client.instances()]
        await instance.terminate()
        end = (await collect(instance))[-1]
        assert (end.kind, end.reason) == ("terminated", "killed")
        assert instance.id not in [row["instance"] for row in await client.instances()]


async def collect_messages(instance, count: int) -> list:
    with trio.fail_after(30):
        return [await instance.next_event() for _ in range(count)]


async def test_events_of_a_finishing_program(url):
    async with connect(url) as client:
        instance = await client.launch(await client.upload(GREET), ["ignored", "args"])
        events = await collect(instance)
    kinds = [(e.kind, e.text) for e in events]
    assert kinds == [("message", "Hello, "), ("message", "world!"), ("stdout", "printed\n"),
                     ("return", "Hello, world!"), ("terminated", None)]
    assert events[-1].reason == "finished"


async def test_second_upload_is_skipped(server):
    async with connect(server.addresses.ws) as client:
        program = await client.upload(GREET)
        # The server already has it: upload_begin answers `exists` and no chunk is needed.
        begin = await client.request("upload_begin", hash=program, size=len(GREET))
        assert begin == {"exists": True}


async def test_two_sessions_share_a_tenant_but_not_events(server):
    """Without auth everyone is one tenant: a second connection sees and can end the instance,
    but its events go to the connection that launched it."""
    async with connect(server.addresses.ws) as owner, connect(server.addresses.tcp) as other:
        instance = await owner.launch(await owner.upload(ECHO))
        assert instance.id in [row["instance"] for row in await other.instances()]
        await other.terminate(instance.id)
        assert (await collect(instance))[-1].reason == "killed"


async def test_disconnect_ends_the_sessions_instances(server):
    async with connect(server.addresses.ws) as watcher:
        async with connect(server.addresses.tcp) as client:
            instance = await client.launch(await client.upload(ECHO))
            assert instance.id in [r["instance"] for r in await watcher.instances()]
        with trio.fail_after(10):
            while instance.id in [r["instance"] for r in await watcher.instances()]:
                await trio.sleep(0.01)
    async with httpx.AsyncClient() as http:
        metrics = (await http.get(server.addresses.http + "/metrics")).text
    assert 'pie_trio_instance_terminations_total{reason="client_gone"}' in metrics


async def test_many_instances_stream_concurrently(server):
    async with connect(server.addresses.ws) as client:
        program = await client.upload(ECHO)
        instances = [await client.launch(program) for _ in range(8)]
        for i, instance in enumerate(instances):
            await instance.signal(f"to {i}")
        for i, instance in enumerate(instances):
            assert [e.text for e in await collect_messages(instance, 1)] == [f"to {i}"]
            await instance.terminate()
            assert (await collect(instance))[-1].reason == "killed"


# -- refusals that leave the session usable ----------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "fields", "code", "words"),
    [
        ("launch_instance", {"program": "no-such-program"}, "unknown_program", "no program"),
        ("launch_instance", {"program": "echo", "args": [1, 2]}, "bad_request", "args"),
        ("launch_instance", {}, "bad_request", "program"),
        ("signal_instance", {"instance": "x", "message": 3}, "bad_request", "message"),
        ("terminate_instance", {"instance": "x"}, "not_found", "no instance"),
        ("query", {"what": "everything"}, "bad_request", "what"),
        ("query", {"what": "program_exists"}, "bad_request", "program"),
        ("upload_begin", {"hash": "abc", "size": 10}, "bad_request", "hash"),
        ("upload_begin", {"hash": "0" * 64, "size": 10**9}, "too_large", "limit"),
        ("upload_chunk", {"hash": "0" * 64, "data": b"x"}, "bad_request", "upload_begin"),
        ("upload_end", {"hash": "0" * 64}, "bad_request", "upload_begin"),
        ("reboot", {}, "unknown_type", "reboot"),
    ],
)
async def test_bad_requests_are_refused_by_name(url, kind, fields, code, words):
    async with connect(url) as client:
        with pytest.raises(ServerError) as refused:
            await client.request(kind, **fields)
        assert refused.value.code == code
        assert words in refused.value.message
        assert await client.models()  # the session carries on


def fresh_module(tag: str) -> bytes:
    """A valid program no test has uploaded yet (the tag lands in the name section)."""
    return wasm(f'(module ${tag} (memory (export "memory") 1) (func (export "_start")))')


async def test_upload_faults(url):
    module, other = fresh_module(f"a{url[:2]}"), fresh_module(f"b{url[:2]}")
    async with connect(url) as client:
        wrong = program_hash(b"something else")
        await client.request("upload_begin", hash=wrong, size=len(module))
        await client.request("upload_chunk", hash=wrong, data=module)
        with pytest.raises(ServerError, match="hash_mismatch"):
            await client.request("upload_end", hash=wrong)

        right = program_hash(module)
        await client.request("upload_begin", hash=right, size=10)
        with pytest.raises(ServerError, match="too_large: chunks exceed"):
            await client.request("upload_chunk", hash=right, data=module)

        junk = b"\0asm\x01\0\0\0 definitely not a module"
        await client.request("upload_begin", hash=program_hash(junk), size=len(junk))
        await client.request("upload_chunk", hash=program_hash(junk), data=junk)
        with pytest.raises(ServerError, match="invalid_program"):
            await client.request("upload_end", hash=program_hash(junk))

        short = program_hash(other)
        await client.request("upload_begin", hash=short, size=len(other))
        await client.request("upload_chunk", hash=short, data=other[:10])
        with pytest.raises(ServerError, match="received 10 of"):
            await client.request("upload_end", hash=short)
        assert await client.upload(other) == short  # and a proper upload still works


# -- protocol violations -------------------------------------------------------------------------


async def test_malformed_frames_get_errors_and_the_session_continues(server):
    async with trio_websocket.open_websocket_url(server.addresses.ws) as ws:
        for frame, code in [(b"\xc1", "malformed"), (msgpack.packb([1, 2]), "malformed"),
                            (msgpack.packb({"type": "query"}), "bad_request"),
                            (msgpack.packb({"id": 7, "type": 5}), "bad_request"),
                            (msgpack.packb({"id": 8, "type": "reboot"}), "unknown_type")]:
            await ws.send_message(frame)
            reply = msgpack.unpackb(await ws.get_message())
            assert reply["error"] == code
        await ws.send_message(msgpack.packb({"id": 9, "type": "query", "what": "models"}))
        reply = msgpack.unpackb(await ws.get_message())
        assert reply["id"] == 9 and reply["ok"] is True


async def test_websocket_text_frame_closes_1003(server):
    async with trio_websocket.open_websocket_url(server.addresses.ws) as ws:
        await ws.send_message('{"type": "query"}')
        reply = msgpack.unpackb(await ws.get_message())
        assert reply["error"] == "malformed" and "binary" in reply["message"]
        with pytest.raises(trio_websocket.ConnectionClosed) as closed:
            await ws.get_message()
        assert closed.value.reason.code == 1003


async def test_websocket_oversize_message_closes_1009(server):
    async with trio_websocket.open_websocket_url(server.addresses.ws) as ws:
        # The server refuses from the frame header, so the close may arrive mid-send, and the
        # connection it then drops may reset before the frame is read (1006; test_server_hostile
        # checks the frame's code).
        with pytest.raises(trio_websocket.ConnectionClosed) as closed:
            await ws.send_message(b"\0" * (server.config.max_frame_size + 1))
            await ws.get_message()
        assert closed.value.reason.code in (1009, 1006)


async def test_tcp_oversize_frame_is_refused_then_closed(server):
    stream = await trio.open_tcp_stream("127.0.0.1", server.addresses.tcp_port)
    async with stream:
        await stream.send_all(struct.pack(">I", server.config.max_frame_size + 1) + b"\0" * 64)
        data = b""
        with trio.fail_after(10):
            while chunk := await stream.receive_some():
                data += chunk
    messages = []
    while data:
        (size,) = struct.unpack_from(">I", data)
        messages.append(msgpack.unpackb(data[4:4 + size]))
        data = data[4 + size:]
    assert messages[0]["error"] == "too_large"
    assert messages[-1] == {"type": "close", "code": 1009, "reason": messages[0]["message"]}


async def test_connection_errors_reach_the_caller(server):
    with pytest.raises(ConnectionError):
        async with connect("tcp://127.0.0.1:1"):
            pass
    with pytest.raises(ValueError, match="unsupported server URL"):
        async with connect("http://127.0.0.1:1"):
            pass
    async with connect(server.addresses.tcp) as client:
        await client._transport.aclose()
        with pytest.raises(ConnectionClosed):
            await client.models()


# -- HTTP --------------------------------------------------------------------------------------


async def test_health_metrics_and_models(server):
    async with httpx.AsyncClient(base_url=server.addresses.http) as http:
        health = await http.get("/health")
        assert health.status_code == 200 and health.json()["status"] == "ok"
        models = (await http.get("/v1/models")).json()
        assert models["object"] == "list"
        assert models["data"][0]["id"].startswith("tiny-random-llama")
        metrics = await http.get("/metrics")
        assert metrics.status_code == 200
        for name in ("pie_trio_time_to_first_token_seconds", "pie_trio_instances_running",
                     "pie_trio_kv_pages_in_use", "pie_trio_request_latency_seconds"):
            assert name in metrics.text
        assert (await http.get("/nowhere")).status_code == 404
        assert (await http.post("/health")).status_code == 405
        bad = await http.post("/v1/completions", content=b"{not json")
        assert bad.status_code == 400 and "JSON" in bad.json()["error"]["message"]
