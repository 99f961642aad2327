"""The OpenAI-compatible API on the tiny model: request validation, response shapes, streaming,
stop strings, usage, and clean-up when a client disconnects mid-stream."""

from __future__ import annotations

import json

import httpx
import pytest
import trio
from test_server_support import background_server

from pie_trio.client import connect
from pie_trio.model.tiny import tiny_runner


@pytest.fixture(scope="module")
def server():
    with background_server(tiny_runner(num_pages=256)) as server:
        yield server


@pytest.fixture
async def http(server):
    async with httpx.AsyncClient(base_url=server.addresses.http, timeout=60) as client:
        yield client


@pytest.mark.parametrize(("path", "body", "status", "words"), [
    ("/v1/completions", {"prompt": 5}, 400, "prompt"),
    ("/v1/completions", {"prompt": ""}, 400, "prompt"),
    ("/v1/completions", {"prompt": "x", "temperature": 3}, 400, "temperature"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 2.5}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"prompt": "x", "n": 17}, 400, "'n'"),
    ("/v1/completions", {"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("/v1/completions", {"prompt": "x", "model": "gpt-9"}, 404, "gpt-9"),
    ("/v1/completions", [1, 2], 400, "JSON object"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 2048}, 400, "context is 2048 tokens"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"content": "hi"}]}, 400, "role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 7}]}, 400, "content"),
    # Parameters the server does not implement are refused by name, never silently ignored.
    ("/v1/completions", {"prompt": "x", "logprobs": 21}, 400, "logprobs"),
    ("/v1/completions", {"prompt": "x", "frobnicate": True}, 400, "'frobnicate'"),
    ("/v1/completions", {"prompt": "x", "presence_penalty": 0.5}, 400, "presence_penalty"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                              "response_format": {"type": "xml"}}, 400,
     "response_format"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                              "tools": [{"type": "function", "function": {"name": "f"}}]}, 400,
     "tools"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "prompt": "x"},
     400, "'prompt'"),
])
async def test_bad_requests_get_openai_errors(http, path, body, status, words):
    response = await http.post(path, json=body)
    assert response.status_code == status
    assert words in response.json()["error"]["message"]


async def test_parameters_at_their_neutral_values_are_accepted(http):
    response = await http.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "temperature": 0,
        "logprobs": False, "tools": [], "tool_choice": "none", "response_format": {"type": "text"},
        "presence_penalty": 0, "frequency_penalty": 0, "logit_bias": {}, "user": "u", "n": 1})
    assert response.status_code == 200, response.text


async def completion(http, **body) -> dict:
    response = await http.post("/v1/completions", json={"prompt": "Once upon a time",
                                                        "temperature": 0, **body})
    assert response.status_code == 200, response.text
    return response.json()


async def stream(http, path: str, body: dict) -> list[dict]:
    chunks = []
    async with http.stream("POST", path, json={**body, "stream": True}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/event-stream"
        lines = [line async for line in response.aiter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    for line in lines[:-1]:
        assert line.startswith("data: ")
        chunks.append(json.loads(line[6:]))
    return chunks


async def test_completion_shape_and_usage(http):
    result = await completion(http, max_tokens=6, ignore_eos=True)
    assert result["object"] == "text_completion"
    assert result["model"].startswith("tiny-random-llama")
    choice = result["choices"][0]
    assert choice["text"] and choice["finish_reason"] in ("length", "stop")
    usage = result["usage"]
    assert usage["prompt_tokens"] == 4  # "Once upon a time"
    assert usage["completion_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


async def test_streaming_matches_the_whole_response(http):
    whole = await completion(http, max_tokens=8, ignore_eos=True)
    chunks = await stream(http, "/v1/completions", {
        "prompt": "Once upon a time", "temperature": 0, "max_tokens": 8, "ignore_eos": True,
        "stream_options": {"include_usage": True}})
    assert {c["id"] for c in chunks} == {chunks[0]["id"]}
    text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    assert text == whole["choices"][0]["text"]
    assert chunks[-2]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]


async def test_stop_string_cuts_the_text_and_ends_early(http):
    full = (await completion(http, max_tokens=12, ignore_eos=True))["choices"][0]["text"]
    stop = full[4:7]
    assert stop.strip(), f"the tiny model's text is too short to pick a stop string: {full!r}"
    cut = await completion(http, max_tokens=12, ignore_eos=True, stop=[stop])
    assert cut["choices"][0]["text"] == full[:full.find(stop)]
    assert cut["choices"][0]["finish_reason"] == "stop"
    chunks = await stream(http, "/v1/completions", {
        "prompt": "Once upon a time", "temperature": 0, "max_tokens": 12, "ignore_eos": True,
        "stop": stop})
    assert "".join(c["choices"][0]["text"] for c in chunks) == full[:full.find(stop)]


async def test_several_stop_strings_cut_at_the_earliest(http):
    """Each stop string reaches the inferlet as its own --stop; the earliest match ends the text,
    whatever the order of the list, streamed or not."""
    full = (await completion(http, max_tokens=12, ignore_eos=True))["choices"][0]["text"]
    early, late = full[4:7], full[8:11]
    assert early.strip() and late.strip(), f"the tiny model's text is too short: {full!r}"
    expected = full[:min(full.find(early), full.find(late))]
    cut = await completion(http, max_tokens=12, ignore_eos=True,
                           stop=[late, "\u2603 never said", early])
    assert cut["choices"][0]["text"] == expected
    assert cut["choices"][0]["finish_reason"] == "stop"
    chunks = await stream(http, "/v1/completions", {
        "prompt": "Once upon a time", "temperature": 0, "max_tokens": 12, "ignore_eos": True,
        "stop": ["\u2603 never said", late, early]})
    assert "".join(c["choices"][0]["text"] for c in chunks) == expected
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    alone = await completion(http, max_tokens=12, ignore_eos=True, stop=["--chat", late])
    assert alone["choices"][0]["text"] == full[:full.find(late)]


async def test_chat_stream_shape(http):
    chunks = await stream(http, "/v1/chat/completions", {
        "messages": [{"role": "system", "content": "Be brief."},
                     {"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
        "temperature": 0, "max_tokens": 5})
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)


async def test_disconnect_mid_stream_ends_the_instance(server, http):
    async with connect(server.addresses.ws) as watcher:
        body = {"prompt": "Once upon a time", "max_tokens": 2000, "ignore_eos": True,
                "stream": True}
        async with http.stream("POST", "/v1/completions", json=body) as response:
            async for line in response.aiter_lines():
                if line.startswith("data: ") and '"text": ""' not in line:
                    break  # the first real token: the generation is running
            running = [r for r in await watcher.instances() if r["origin"] == "http"]
            assert len(running) == 1
        with trio.fail_after(30):  # closing the response disconnected the client
            while any(r["origin"] == "http" for r in await watcher.instances()):
                await trio.sleep(0.01)
    metrics = (await http.get("/metrics")).text
    for name in ("pie_trio_time_to_first_token_seconds_count",
                 "pie_trio_inter_token_latency_seconds_count",
                 'pie_trio_forward_batch_size_bucket{le="+Inf"}', "pie_trio_executor_ticks_total",
                 'pie_trio_instance_launches_total{origin="http"}'):
        assert name in metrics
