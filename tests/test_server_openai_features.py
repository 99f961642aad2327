"""The OpenAI API's fuller parameters, through the official `openai` client against a real
server: n choices forked from one prefill, logprobs, echo, response_format (grammars) and tools.

The must-show cases run on the real model: greedy n=3 equals n=1 and forwards the prompt once
(a runner wrapper counts every forward's tokens), logprobs match a direct full-prefill
distribution, and json_schema answers validate. The rest runs on the tiny model.
"""

from __future__ import annotations

import json
import math

import httpx
import openai
import pytest
import torch
from test_server_support import background_server

from pie_trio.model.calls import Forward
from pie_trio.model.tiny import tiny_runner
from pie_trio.server.openai_tools import parse_tool_calls, template_takes_tools

PROMPT = "Once upon a time"
NO_EOS = {"ignore_eos": True}  # the server's extension: exactly max_tokens tokens
# A Hermes/Qwen-style template that takes tools (a stub: the tiny model's own does not).
TOOLS_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTools: {{ tools | tojson }}<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
WEATHER_TOOL = {"type": "function", "function": {"name": "weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}
COLOR_SCHEMA = {"type": "object", "properties": {"color": {"enum": ["red", "green"]}},
                "required": ["color"], "additionalProperties": False}


class CountingRunner:
    """A model runner that records each forward batch: its calls' input token counts."""

    def __init__(self, runner):
        self._runner = runner
        self.batches: list[list[int]] = []

    def __getattr__(self, name):
        return getattr(self._runner, name)

    def forward(self, calls):
        self.batches.append([len(call.tokens or []) for call in calls])
        return self._runner.forward(calls)


def client_of(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.addresses.http + "/v1", api_key="-", max_retries=0)


# ---------------------------------------------------------------------------------------------
# The tiny model


@pytest.fixture(scope="module")
def tiny():
    with background_server(tiny_runner(num_pages=512)) as server:
        yield client_of(server)


def test_n_choices_stream_with_their_index(tiny):
    whole = tiny.completions.create(model=None, prompt=PROMPT, max_tokens=6, n=3, seed=7,
                                    temperature=1.0, extra_body=NO_EOS)
    assert [c.index for c in whole.choices] == [0, 1, 2]
    assert whole.usage.prompt_tokens == 4  # counted once, whatever n
    assert whole.usage.completion_tokens == 18
    chunks = list(tiny.completions.create(model=None, prompt=PROMPT, max_tokens=6, n=3, seed=7,
                                          temperature=1.0, extra_body=NO_EOS, stream=True))
    texts = ["", "", ""]
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] += choice.text
    assert texts == [c.text for c in whole.choices]  # same seeds, same answers
    one = tiny.completions.create(model=None, prompt=PROMPT, max_tokens=6, seed=7,
                                  temperature=1.0, extra_body=NO_EOS)
    assert one.choices[0].text == whole.choices[0].text  # choice 0's seed is the request's


def test_completion_logprobs_and_echo(tiny):
    result = tiny.completions.create(model=None, prompt=PROMPT, max_tokens=4, temperature=0,
                                     logprobs=3, echo=True, extra_body=NO_EOS)
    choice = result.choices[0]
    assert choice.text.startswith(PROMPT)
    logprobs = choice.logprobs
    assert len(logprobs.tokens) == 4 + 4  # the prompt's tokens, then the generated ones
    assert "".join(logprobs.tokens) == choice.text
    assert logprobs.token_logprobs[:4] == [None] * 4  # prompt tokens: not computed
    assert logprobs.text_offset == [sum(len(t) for t in logprobs.tokens[:i]) for i in range(8)]
    for token, logprob, top in zip(logprobs.tokens[4:], logprobs.token_logprobs[4:],
                                   logprobs.top_logprobs[4:], strict=True):
        assert len(top) <= 3 and logprob <= 0
        assert top[token] == logprob == max(top.values())  # greedy: the most likely


def test_chat_logprobs_shape(tiny):
    result = tiny.chat.completions.create(
        model=None, messages=[{"role": "user", "content": "hi"}], max_tokens=3, temperature=0,
        logprobs=True, top_logprobs=2, n=2)
    for choice in result.choices:
        content = choice.logprobs.content
        assert content and all(len(entry.top_logprobs) == 2 for entry in content)
        text = b"".join(bytes(entry.bytes) for entry in content)
        assert text.decode(errors="replace") == choice.message.content
        for entry in content:
            assert sum(math.exp(t.logprob) for t in entry.top_logprobs) <= 1 + 1e-4
    plain = tiny.chat.completions.create(
        model=None, messages=[{"role": "user", "content": "hi"}], max_tokens=3, temperature=0)
    assert plain.choices[0].logprobs is None


def test_response_format_schema_on_the_tiny_model(tiny):
    result = tiny.chat.completions.create(
        model=None, messages=[{"role": "user", "content": "A color?"}], max_tokens=40, n=2,
        temperature=1.0, seed=3, response_format={"type": "json_schema", "json_schema": {
            "name": "color", "schema": COLOR_SCHEMA}})
    for choice in result.choices:
        assert choice.finish_reason == "stop"
        assert json.loads(choice.message.content)["color"] in ("red", "green")


def test_errors_name_the_parameter(tiny):
    messages = [{"role": "user", "content": "hi"}]
    cases = [
        ({"tools": [WEATHER_TOOL]}, "tools"),  # SmolLM2's template takes no tools
        ({"tool_choice": "required"}, "tool_choice"),
        ({"response_format": {"type": "json_schema", "json_schema": {
            "name": "x", "schema": {"type": "nonsense"}}}}, "response_format"),
        ({"n": 17}, "'n'"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ]
    for extra, words in cases:
        with pytest.raises(openai.BadRequestError) as caught:
            tiny.chat.completions.create(model=None, messages=messages, max_tokens=2,
                                         **extra)
        assert words in caught.value.message, (extra, caught.value.message)
    with pytest.raises(openai.BadRequestError, match="best_of"):
        tiny.completions.create(model=None, prompt="x", max_tokens=2, best_of=2)


def test_a_template_that_takes_tools_sees_them(monkeypatch):
    runner = tiny_runner(num_pages=64)
    # The tiny model's tokenizer is shared by the whole process: change it for this test only.
    monkeypatch.setattr(runner.tokenizer, "chat_template", TOOLS_TEMPLATE)
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    with background_server(runner) as server:
        client = client_of(server)
        plain = client.chat.completions.create(model=None, messages=messages, max_tokens=2)
        tooled = client.chat.completions.create(model=None, messages=messages, max_tokens=2,
                                                tools=[WEATHER_TOOL])
        chunks = list(client.chat.completions.create(
            model=None, messages=messages, max_tokens=2, tools=[WEATHER_TOOL], stream=True))
    assert tooled.usage.prompt_tokens > plain.usage.prompt_tokens + 10  # the tools were rendered
    assert tooled.choices[0].finish_reason in ("stop", "length")  # random text: no tool call
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_tool_calls_are_parsed_out_of_the_text():
    text = ('Let me look.\n<tool_call>\n{"name": "weather", "arguments": {"city": "Paris"}}\n'
            '</tool_call>\n<tool_call>{"name": "time", "arguments": {}}')
    content, calls = parse_tool_calls(text)
    assert content == "Let me look."
    assert [c["function"]["name"] for c in calls] == ["weather", "time"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Paris"}
    assert all(c["type"] == "function" and c["id"].startswith("call_") for c in calls)
    assert parse_tool_calls("no calls here") == ("no calls here", [])
    assert parse_tool_calls("<tool_call>{not json}</tool_call>")[1] == []
    only, [call] = parse_tool_calls('<tool_call>{"name": "f", "arguments": "{}"}</tool_call>')
    assert only is None and call["function"]["arguments"] == "{}"
    assert template_takes_tools(TOOLS_TEMPLATE)
    assert not template_takes_tools("{% for m in messages %}{{ m.content }}{% endfor %}")


# ---------------------------------------------------------------------------------------------
# The real model


def full_prefill_logprobs(runner, ids: list[int]) -> torch.Tensor:
    """log-softmax (fp32) at every position of `ids`, from one prefill: no KV reuse, no decode
    path, nothing shared with the server's way of computing them."""
    page = runner.info.page_size
    pages = list(range(-(-len(ids) // page)))
    call = Forward(owner="reference", kv_pages=pages, last_page_len=(len(ids) - 1) % page + 1,
                   positions=list(range(len(ids))), tokens=ids,
                   output_indices=list(range(len(ids))))
    runner.check(call)
    return torch.log_softmax(runner.logits([call]).float(), dim=-1)


@pytest.fixture(scope="module")
def real(real_runner):
    """The server on the real model, and a reference computed before it starts (so the
    reference's pages are the server's to use afterwards)."""
    tokenizer = real_runner.tokenizer
    prompt = tokenizer.encode("The capital of France is")
    ids = list(prompt)
    for _ in range(6):  # the greedy continuation, each step a fresh full prefill
        ids.append(int(full_prefill_logprobs(real_runner, ids)[-1].argmax()))
    reference = (prompt, ids[len(prompt):], full_prefill_logprobs(real_runner, ids))
    counting = CountingRunner(real_runner)
    with background_server(counting) as server:
        yield client_of(server), counting, reference


@pytest.mark.slow
def test_greedy_n3_equals_n1_and_forwards_the_prompt_once(real):
    client, counting, _ = real
    prompt = " ".join(["The quick brown fox jumps over the lazy dog."] * 8) + " Then"
    ask = dict(model=None, prompt=prompt, max_tokens=8, temperature=0, extra_body=NO_EOS)
    before = len(counting.batches)
    three = client.completions.create(**ask, n=3)
    forked = counting.batches[before:]
    one = client.completions.create(**ask)  # from the cached prompt pages
    assert [c.text for c in three.choices] == [one.choices[0].text] * 3
    prompt_tokens = one.usage.prompt_tokens
    page = counting.info.page_size
    assert prompt_tokens > 4 * page
    # n=1 would forward the prompt and then one token per step; n=3 adds to that only each
    # fork's partial last page and its own decode tokens: the prompt went through the model once.
    extra = sum(map(sum, forked)) - (prompt_tokens + 8 - 1)
    assert extra <= 2 * (page + 8)
    assert sum(1 for batch in forked for size in batch if size >= page) == 1
    # The three choices step together: each round submits their steps before waiting, so they
    # share forward batches (an idle executor may start the first alone: at most two per round).
    assert any(len(batch) == 3 for batch in forked), forked
    assert len(forked) <= 1 + 2 * 8, forked


@pytest.mark.slow
def test_logprobs_match_the_model_distribution(real):
    client, _, (prompt, continuation, reference) = real
    tokenizer = real[1].tokenizer
    result = client.completions.create(model=None, prompt=tokenizer.decode(prompt),
                                       max_tokens=len(continuation), temperature=0, logprobs=5,
                                       extra_body=NO_EOS)
    logprobs = result.choices[0].logprobs
    token_bytes = tokenizer.token_bytes()
    assert logprobs.tokens == [token_bytes[t].decode(errors="replace") for t in continuation]
    rows = reference[len(prompt) - 1:len(prompt) - 1 + len(continuation)]
    expected = [float(row[t]) for row, t in zip(rows, continuation, strict=True)]
    # bf16 forwards (batched, paged) against a full prefill: close, not bit-equal.
    for got, want in zip(logprobs.token_logprobs, expected, strict=True):
        assert got == pytest.approx(want, abs=0.1)
    assert sum(logprobs.token_logprobs) == pytest.approx(sum(expected), abs=0.3)
    for top, row in zip(logprobs.top_logprobs, rows, strict=True):
        best = torch.topk(row, 5)
        assert sum(map(math.exp, top.values())) == pytest.approx(
            float(best.values.exp().sum()), abs=0.03)


@pytest.mark.slow
def test_json_schema_answers_validate(real):
    client = real[0]
    schema = {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 20},
        "population": {"type": "integer", "minimum": 0},
        "capital": {"type": "boolean"}},
        "required": ["city", "population", "capital"], "additionalProperties": False}
    result = client.chat.completions.create(
        model=None, n=2, temperature=0.7, seed=1, max_tokens=60,
        messages=[{"role": "user", "content": "Describe Paris as JSON."}],
        response_format={"type": "json_schema", "json_schema": {"name": "city",
                                                                "schema": schema}})
    for choice in result.choices:
        assert choice.finish_reason == "stop", choice.message.content
        value = json.loads(choice.message.content)
        assert set(value) == {"city", "population", "capital"}
        assert isinstance(value["city"], str) and len(value["city"]) <= 20
        assert isinstance(value["population"], int) and value["population"] >= 0
        assert isinstance(value["capital"], bool)
    free = client.chat.completions.create(
        model=None, temperature=0, max_tokens=60, response_format={"type": "json_object"},
        messages=[{"role": "user", "content": "Describe Paris as JSON."}])
    if free.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(free.choices[0].message.content), dict)


@pytest.mark.slow
def test_a_repeated_long_prompt_reuses_cached_pages_and_answers_the_same(real):
    client, counting, _ = real
    page = counting.info.page_size
    prompt = " ".join(["A long shared system prompt about the history of Paris."] * 6) + " So"
    ask = dict(model=None, prompt=prompt, max_tokens=8, temperature=0, extra_body=NO_EOS)
    hits = cache_hit_tokens(client)
    before = len(counting.batches)
    first = client.completions.create(**ask)
    cold = counting.batches[before:]
    assert cache_hit_tokens(client) == hits  # nothing of this prompt was cached yet
    before = len(counting.batches)
    second = client.completions.create(**ask)
    warm = counting.batches[before:]
    assert second.choices[0].text == first.choices[0].text
    prompt_tokens = first.usage.prompt_tokens
    reused = (prompt_tokens - 1) // page * page  # every full page but the one with the last token
    assert prompt_tokens > 4 * page and reused >= 4 * page
    assert cache_hit_tokens(client) - hits == reused
    assert sum(map(sum, cold)) == prompt_tokens + 8 - 1
    assert sum(map(sum, warm)) == prompt_tokens - reused + 8 - 1  # the cached pages skipped


def cache_hit_tokens(client: openai.OpenAI) -> int:
    base = str(client.base_url).removesuffix("/").removesuffix("/v1")
    text = httpx.get(base + "/metrics").text
    line = next(ln for ln in text.splitlines()
                if ln.startswith("pie_trio_prefix_cache_hit_tokens_total "))
    return int(float(line.split()[1]))
