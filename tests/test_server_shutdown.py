"""Graceful shutdown of a real `pie-trio serve` process: on SIGTERM every client hears that its
instances ended, WebSockets close with 1001, TCP sessions get a final `close` 1001, and the
process exits 0."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import httpx
import pytest
import trio
import trio_websocket
from test_server_support import ECHO_WAT, wasm

from pie_trio.client import connect

START_TIMEOUT = 120
LOG_LEVEL = os.environ.get("PIE_TRIO_TEST_LOG_LEVEL", "warning")


async def start_server() -> tuple[trio.Process, dict[str, str]]:
    """`pie-trio serve` on free ports; the URLs it prints, by scheme."""
    command = [sys.executable, "-m", "pie_trio", "serve", "--model", "tiny", "--http-port", "0",
               "--tcp-port", "0", "--log-level", LOG_LEVEL]
    process = await trio.lowlevel.open_process(command, stdout=subprocess.PIPE,
                                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    urls: dict[str, str] = {}
    buffer = b""
    with trio.fail_after(START_TIMEOUT):
        while len(urls) < 3:
            chunk = await process.stdout.receive_some()
            assert chunk, "the server exited before it listened"
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                url = line.decode().split()[2]  # "pie-trio serving URL (...)"
                urls[url.split("://")[0]] = url
    return process, urls


async def stream_completion(url: str, lines: list[str], started: trio.Event) -> None:
    """A long streaming completion; records its SSE lines until the server ends it."""
    body = {"prompt": "Once upon a time", "max_tokens": 1000, "ignore_eos": True,
            "stream": True}
    async with (httpx.AsyncClient(base_url=url, timeout=60) as http,
                http.stream("POST", "/v1/completions", json=body) as response):
        async for line in response.aiter_lines():
            if line:
                lines.append(line)
                started.set()


@pytest.mark.slow
async def test_sigterm_drains_every_client_and_exits_zero():
    process, urls = await start_server()
    try:
        async with (connect(urls["ws"]) as ws_client, connect(urls["tcp"]) as tcp_client,
                    trio_websocket.open_websocket_url(urls["ws"]) as idle,
                    trio.open_nursery() as nursery):
            echo = wasm(ECHO_WAT)
            ws_instances = [await ws_client.launch(await ws_client.upload(echo)) for _ in range(2)]
            tcp_instance = await tcp_client.launch(await tcp_client.upload(echo))
            await ws_instances[0].signal("streaming")
            assert (await ws_instances[0].next_event()).text == "streaming"
            http_lines: list[str] = []
            http_started = trio.Event()
            nursery.start_soon(stream_completion, urls["http"], http_lines, http_started)
            await http_started.wait()

            process.send_signal(signal.SIGTERM)

            with trio.fail_after(30):
                for instance in [*ws_instances, tcp_instance]:
                    ends = [event async for event in instance.events()]
                    assert [(e.kind, e.reason) for e in ends] == [("terminated", "evicted")]
                    assert "shutting down" in ends[0].detail
                assert (await ws_client.wait_closed()).code == 1001
                assert (await tcp_client.wait_closed()).code == 1001
                with pytest.raises(trio_websocket.ConnectionClosed) as closed:
                    await idle.get_message()
                assert closed.value.reason.code == 1001
        # The OpenAI stream was cut short with an error chunk naming the reason, then [DONE].
        assert http_lines[-1] == "data: [DONE]"
        assert "evicted" in http_lines[-2] and '"error"' in http_lines[-2]
        with trio.fail_after(30):
            assert await process.wait() == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
