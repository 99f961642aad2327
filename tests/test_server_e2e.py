"""End to end on the real model (SmolLM2-135M-Instruct): the official `openai` client streams a
chat answer, and the built-in text-completion inferlet, uploaded as bytes over the WebSocket and
over TCP, streams its tokens. One server for the module, on the session's shared model in
the dtype the server would choose for this CPU."""

from __future__ import annotations

import openai
import pytest
import trio
from conftest import load_real_runner
from test_server_support import BUILTIN_TEXT_COMPLETION, background_server

from pie_trio.client import connect

pytestmark = pytest.mark.slow

GREEDY_START = ", the city of Nova Haven"  # SmolLM2-135M-Instruct's greedy "Once upon a time"


@pytest.fixture(scope="module")
def server():
    # The model in the dtype `pie-trio serve` picks on this CPU, as a user would get it.
    with background_server(load_real_runner("default")) as server:
        yield server


@pytest.fixture
def client(server):
    with openai.OpenAI(base_url=server.addresses.http + "/v1", api_key="unused") as client:
        yield client


def test_openai_client_streams_the_capital_of_france(client):
    model = client.models.list().data[0].id
    assert model == "SmolLM2-135M-Instruct"
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "What is the capital of France?"}],
        temperature=0, max_tokens=32, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    pieces = [c.choices[0].delta.content for c in chunks
              if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 3  # streamed, not one blob
    assert "".join(pieces) == "The capital of France is Paris."
    finish = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finish[-1] == "stop"
    assert chunks[-1].usage.completion_tokens == 7  # the answer's tokens; the stop token is no text


async def stream_inferlet(url: str, args: list[str]) -> tuple[list[str], str | None]:
    """Upload the text-completion bytes, launch them, collect the streamed text and return."""
    async with connect(url) as client:
        program = await client.upload(BUILTIN_TEXT_COMPLETION.read_bytes())
        instance = await client.launch(program, args)
        pieces, returned = [], None
        with trio.fail_after(120):
            async for event in instance.events():
                if event.kind == "message":
                    pieces.append(event.text)
                elif event.kind == "return":
                    returned = event.text
        assert instance.result.reason == "finished", instance.result
    return pieces, returned


@pytest.mark.parametrize("transport", ["ws", "tcp"])
async def test_uploaded_text_completion_streams_tokens(server, transport):
    url = server.addresses.ws if transport == "ws" else server.addresses.tcp
    args = ["--prompt", "Once upon a time", "--max-tokens", "24"]
    pieces, returned = await stream_inferlet(url, args)
    assert len(pieces) > 10
    assert "".join(pieces) == returned
    assert returned.startswith(GREEDY_START)


def test_completions_endpoint_matches_the_inferlet(client):
    result = client.completions.create(model="SmolLM2-135M-Instruct", prompt="Once upon a time",
                                       max_tokens=24, temperature=0)
    text = result.choices[0].text
    assert text.startswith(GREEDY_START)
    assert result.choices[0].finish_reason == "length"
    assert result.usage.prompt_tokens == 4 and result.usage.completion_tokens == 24
