"""Hypothesis fuzzing of the client protocol over WebSocket and TCP: garbage, truncated msgpack,
wrong shapes and types, ext types, deep nesting, broken framing. Every frame is answered with
an error (or a response), nothing crashes, and the server answers normal requests afterwards."""

from __future__ import annotations

import struct

import msgpack
import pytest
import trio
import trio_websocket
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_server_support import background_server, test_config

from pie_trio.model.tiny import tiny_runner
from pie_trio.protocol import REQUESTS

EXAMPLES = 100  # per transport
FRAMES_PER_EXAMPLE = 10  # so each transport gets 1,000 malformed frames

FIELDS = ["id", "type", "token", "what", "program", "hash", "size", "data", "args", "instance",
          "message"]

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(), st.text(max_size=16), st.binary(max_size=16),
    st.sampled_from(["0" * 64, "program_exists", "models", "instances", "text-completion"]))
values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=8)
requestish = st.fixed_dictionaries(
    {"type": st.sampled_from(sorted(REQUESTS)) | st.text(max_size=12)},
    optional={name: values for name in FIELDS if name != "type"})


def _truncate(data: bytes, cut: int) -> bytes:
    return data[:cut % len(data)] if len(data) > 1 else b""


bad_frames = st.one_of(
    st.binary(max_size=64),
    requestish.map(msgpack.packb),
    values.map(msgpack.packb),
    st.builds(_truncate, requestish.map(msgpack.packb), st.integers(min_value=0)),
    st.builds(lambda code, data: msgpack.packb({"id": 1, "type": msgpack.ExtType(code, data)}),
              st.integers(0, 127), st.binary(max_size=8)),
    st.integers(1, 1200).map(lambda depth: b"\x91" * depth + b"\xc0"),
    st.integers(1, 300).map(lambda depth: b"\x81\xa1k" * depth + b"\xc0"),
)
batches = st.lists(bad_frames, min_size=FRAMES_PER_EXAMPLE, max_size=FRAMES_PER_EXAMPLE)
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])
FRAME_LIMIT = test_config().max_frame_size
NORMAL = msgpack.packb({"id": 424242, "type": "query", "what": "models"})


@pytest.fixture(scope="module")
def server():
    with background_server(tiny_runner()) as server:
        yield server


def check_reply(reply: object) -> None:
    """Each frame gets exactly one answer: a response or a connection-level error."""
    assert isinstance(reply, dict), reply
    assert reply["type"] in ("response", "error"), reply
    if reply["type"] == "error" or not reply["ok"]:
        assert isinstance(reply["error"], str) and isinstance(reply["message"], str)
        assert reply["error"] != "internal", reply  # refused by name, not by accident


def check_normal(reply: object) -> None:
    assert isinstance(reply, dict) and reply["id"] == 424242 and reply["ok"], reply


# -- WebSocket -----------------------------------------------------------------------------------


async def websocket_round(url: str, frames: list[bytes], ending: str | None) -> None:
    with trio.fail_after(30):
        await _websocket_round(url, frames, ending)


async def _websocket_round(url: str, frames: list[bytes], ending: str | None) -> None:
    async with trio_websocket.open_websocket_url(url) as ws:
        for frame in frames:
            await ws.send_message(frame)
            check_reply(msgpack.unpackb(await ws.get_message(), strict_map_key=False))
        if ending is None:
            await ws.send_message(NORMAL)
            check_normal(msgpack.unpackb(await ws.get_message()))
            return
        # An oversized message is refused from its header: the close may arrive mid-send.
        with pytest.raises(trio_websocket.ConnectionClosed) as closed:
            await ws.send_message("text" if ending == "text" else b"\0" * (FRAME_LIMIT + 1))
            while True:
                await ws.get_message()
        if ending == "text":
            assert closed.value.reason.code == 1003
        else:  # 1006: the server dropped the connection mid-upload and the peer's reset
            # overtook its 1009 close frame (test_server_hostile checks the frame's code)
            assert closed.value.reason.code in (1009, 1006)


def test_fuzz_websocket(server):
    sent = 0

    @FUZZ
    @given(batches, st.sampled_from([None, None, None, "text", "oversize"]))
    def round_trip(frames, ending):
        nonlocal sent
        trio.run(websocket_round, server.addresses.ws, frames, ending)
        sent += len(frames)

    round_trip()
    assert sent >= EXAMPLES * FRAMES_PER_EXAMPLE
    trio.run(websocket_round, server.addresses.ws, [], None)  # the server still serves


# -- TCP -----------------------------------------------------------------------------------------


async def tcp_round(port: int, frames: list[bytes], ending: str | None) -> None:
    with trio.fail_after(30):
        await _tcp_round(port, frames, ending)


async def _tcp_round(port: int, frames: list[bytes], ending: str | None) -> None:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        reader = FrameReader(stream)
        for frame in frames:
            await stream.send_all(struct.pack(">I", len(frame)) + frame)
            check_reply(await reader.next())
        if ending is None:
            await stream.send_all(struct.pack(">I", len(NORMAL)) + NORMAL)
            check_normal(await reader.next())
        elif ending == "oversize":
            await stream.send_all(struct.pack(">I", 2**32 - 1))
            assert (await reader.next())["error"] == "too_large"
            assert (await reader.next())["code"] == 1009
        else:  # a frame cut short by the client going away
            await stream.send_all(struct.pack(">I", 100) + b"\x82\xa2id")


class FrameReader:
    def __init__(self, stream: trio.SocketStream):
        self.stream = stream
        self.buffer = b""

    async def next(self) -> object:
        while True:
            if len(self.buffer) >= 4:
                (size,) = struct.unpack_from(">I", self.buffer)
                if len(self.buffer) >= 4 + size:
                    frame, self.buffer = self.buffer[4:4 + size], self.buffer[4 + size:]
                    return msgpack.unpackb(frame, strict_map_key=False)
            data = await self.stream.receive_some()
            assert data, "the server closed the connection"
            self.buffer += data


def test_fuzz_tcp(server):
    sent = 0

    @FUZZ
    @given(batches, st.sampled_from([None, None, None, "oversize", "truncated"]))
    def round_trip(frames, ending):
        nonlocal sent
        trio.run(tcp_round, server.addresses.tcp_port, frames, ending)
        sent += len(frames)

    round_trip()
    assert sent >= EXAMPLES * FRAMES_PER_EXAMPLE
    trio.run(tcp_round, server.addresses.tcp_port, [], None)  # the server still serves
