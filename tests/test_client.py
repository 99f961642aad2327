"""The Python client against a real server (tiny model): concurrent requests on one connection,
multi-chunk uploads, and event routing between instances."""

from __future__ import annotations

import pytest
import trio
from test_server_support import ECHO_WAT, background_server, program_hash, wasm

from pie_trio.client import connect
from pie_trio.client.client import CHUNK_SIZE
from pie_trio.model.tiny import tiny_runner


@pytest.fixture(scope="module")
def server():
    with background_server(tiny_runner()) as server:
        yield server


@pytest.fixture(params=["ws", "tcp"])
def url(request, server) -> str:
    return server.addresses.ws if request.param == "ws" else server.addresses.tcp


async def test_concurrent_requests_get_their_own_answers(url):
    async with connect(url) as client:
        program = await client.upload(wasm(ECHO_WAT))
        answers: dict[int, object] = {}

        async def ask(i: int) -> None:
            if i % 2:
                answers[i] = await client.program_exists(program if i % 4 == 1 else "0" * 64)
            else:
                answers[i] = len(await client.models())

        async with trio.open_nursery() as nursery:
            for i in range(40):
                nursery.start_soon(ask, i)
    assert answers == {i: (i % 4 == 1) if i % 2 else 1 for i in range(40)}


async def test_multi_chunk_upload(url):
    # A valid program a few chunks long: the bulk is a data segment.
    filler = "".join(f"\\{b:02x}" for b in url.encode()) * (3 * CHUNK_SIZE // len(url))
    module = wasm(f'(module (memory (export "memory") 16) (data (i32.const 0) "{filler}") '
                  '(func (export "_start")))')
    assert len(module) > 2 * CHUNK_SIZE
    async with connect(url) as client:
        assert await client.upload(module) == program_hash(module)
        instance = await client.launch(program_hash(module))
        with trio.fail_after(30):
            assert [e.reason async for e in instance.events()] == ["finished"]


async def test_events_reach_the_right_instance(url):
    async with connect(url) as client:
        program = await client.upload(wasm(ECHO_WAT))
        first, second = await client.launch(program), await client.launch(program)
        await second.signal("for the second")
        await first.signal("for the first")
        with trio.fail_after(30):
            assert (await first.next_event()).text == "for the first"
            assert (await second.next_event()).text == "for the second"
        for instance in (first, second):
            await instance.terminate()
            with trio.fail_after(30):
                assert [e.kind async for e in instance.events()] == ["terminated"]
            assert instance.result.reason == "killed"
