"""The OpenAI request body read into `Params`: every parameter checked, and the request spec the
`openai-completion` inferlet is launched with.

A parameter this server does not implement is a 400 naming it, never silently ignored; a few
are accepted only at the value that asks for nothing (`_NEUTRAL`). `response_format` becomes a
grammar (a JSON schema: `json_object` is the open schema `{"type": "object"}`); `tools` are
checked here and rendered by `openai_tools`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pie_trio.server.exchange import HttpError
from pie_trio.server.state import ServerState

DEFAULT_MAX_TOKENS = {False: 16, True: 512}  # OpenAI's completions default; chat: generous
MAX_STOP_STRINGS = 4
MAX_CHOICES = 16  # n: each choice holds a grammar matcher and a queue of the instance
MAX_TOP_LOGPROBS = 20  # OpenAI's bound for chat; completions' (5) is raised to the same
OPEN_JSON_SCHEMA = '{"type": "object"}'  # json_object: any JSON object

Number = TypeVar("Number", int, float)
Default = TypeVar("Default")


@dataclass
class Params:
    prompt: str  # for chat: rendered from `messages` (openai_tools.render_chat)
    max_tokens: int
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    ignore_eos: bool = False  # vLLM's extension: generate exactly max_tokens (benchmarks)
    logprobs: int | None = None  # alternatives per token (0: the sampled token's alone)
    echo: bool = False  # completions: the prompt's text comes first
    grammar: dict[str, str] | None = None  # {"kind", "source"}: response_format's schema
    messages: list[dict[str, Any]] | None = None  # chat only, validated, not yet rendered
    tools: list[dict[str, Any]] | None = None  # chat only: rendered, and calls parsed back
    prefix_cache: bool = True  # the prompt may come from (and stay in) the prefix cache

    def spec(self) -> str:
        """The inferlet's one argument: the request as JSON."""
        return json.dumps({
            "prompt": self.prompt, "n": self.n, "max_tokens": self.max_tokens,
            "temperature": self.temperature, "top_p": self.top_p, "seed": self.seed,
            "stop": self.stop, "logprobs": self.logprobs, "echo": self.echo,
            "grammar": self.grammar, "ignore_eos": self.ignore_eos,
            "prefix_cache": self.prefix_cache})


def parse_params(body: Any, state: ServerState, chat: bool) -> Params:
    if not isinstance(body, dict):
        raise HttpError(400, "the request body must be a JSON object")
    model = body.get("model")
    if model is not None and model != state.model_info.name:
        raise HttpError(404, f"model {model!r} does not exist; this server serves "
                             f"{state.model_info.name!r}", "not_found_error")
    _refuse_unimplemented(body, chat)
    key = "max_completion_tokens" if chat and "max_completion_tokens" in body else "max_tokens"
    params = Params(
        prompt="" if chat else _completion_prompt(body),
        messages=_chat_messages(body, state.config.max_chat_messages) if chat else None,
        max_tokens=_number(body, key, int, DEFAULT_MAX_TOKENS[chat], low=1,
                           high=state.model_info.max_position),
        n=_number(body, "n", int, 1, low=1, high=MAX_CHOICES),
        temperature=_number(body, "temperature", float, 1.0, low=0.0, high=2.0),
        top_p=_number(body, "top_p", float, 1.0, low=1e-6, high=1.0),
        seed=_number(body, "seed", int, None, low=0, high=2**63 - 1),
        stop=_stop(body.get("stop")),
        stream=bool(body.get("stream", False)),
        ignore_eos=bool(body.get("ignore_eos", False)),
        logprobs=_chat_logprobs(body) if chat else _completion_logprobs(body),
        echo=not chat and _flag(body, "echo"),
        grammar=_grammar(body.get("response_format")),
        tools=_tools(body) if chat else None,
        prefix_cache=state.config.prefix_caching,
    )
    best_of = _number(body, "best_of", int, params.n, low=1, high=MAX_CHOICES)
    if best_of != params.n:
        raise HttpError(400, f"best_of={best_of} is not supported: only best_of equal to n "
                             "(every generated choice is returned)")
    options = body.get("stream_options") or {}
    params.include_usage = isinstance(options, dict) and bool(options.get("include_usage"))
    return params


# Parameters this server implements, by endpoint; `user` is metadata and needs nothing.
_IMPLEMENTED = frozenset({"model", "max_tokens", "temperature", "top_p", "seed", "stop", "stream",
                          "stream_options", "ignore_eos", "user", "n", "best_of",
                          "response_format"})
_IMPLEMENTED_BY_ENDPOINT = {
    True: frozenset({"messages", "max_completion_tokens", "logprobs", "top_logprobs", "tools",
                     "tool_choice", "parallel_tool_calls"}),
    False: frozenset({"prompt", "logprobs", "echo"}),
}
# Parameters accepted only at the value that asks for nothing: the answer a client gets is then
# exactly what it asked for. Any other value is refused rather than silently ignored.
_NEUTRAL: dict[str, tuple[object, ...]] = {
    "frequency_penalty": (0,), "presence_penalty": (0,), "logit_bias": ({},), "suffix": ("",),
    "store": (False,), "metadata": ({},),
}


def _refuse_unimplemented(body: dict[str, Any], chat: bool) -> None:
    """A 400 naming the first parameter this server would otherwise ignore."""
    for key, value in body.items():
        if key in _IMPLEMENTED or key in _IMPLEMENTED_BY_ENDPOINT[chat]:
            continue
        if key in _NEUTRAL:
            neutral = _NEUTRAL[key]
            if value is None or value in neutral or (isinstance(value, list) and not value):
                continue
            raise HttpError(400, f"{key}={json.dumps(value)[:80]} is not supported by this "
                                 "server; leave it out (or at its default)")
        raise HttpError(400, f"unknown or unsupported parameter {key!r} for "
                             f"{'/v1/chat/completions' if chat else '/v1/completions'}")


def _completion_prompt(body: dict[str, Any]) -> str:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise HttpError(400, "'prompt' must be a non-empty string (one prompt per request)")
    return prompt


def _chat_messages(body: dict[str, Any], limit: int) -> list[dict[str, Any]]:
    """The chat's messages for the template: role and text content, plus the fields of a tool
    conversation (an assistant's `tool_calls`, a tool result's `tool_call_id` and `name`)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise HttpError(400, "'messages' must be a non-empty list")
    if len(messages) > limit:
        raise HttpError(400, f"'messages' holds {len(messages)} messages; this server "
                             f"accepts at most {limit} (max_chat_messages)")
    plain = []
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise HttpError(400, "each message needs a string 'role'")
        calls = message.get("tool_calls")
        content = message.get("content")
        text = "" if content is None and calls else _content_text(content)
        item: dict[str, Any] = {"role": message["role"], "content": text}
        for extra in ("tool_calls", "tool_call_id", "name"):
            if message.get(extra) is not None:
                item[extra] = _tool_call_arguments_as_objects(message[extra])
        plain.append(item)
    return plain


def _tool_call_arguments_as_objects(value: Any) -> Any:
    """OpenAI sends a call's `arguments` as JSON text; templates expect the object (they
    serialise it themselves), as transformers' chat rendering does."""
    if not isinstance(value, list):
        return value
    calls = []
    for call in value:
        function = call.get("function") if isinstance(call, dict) else None
        if isinstance(function, dict) and isinstance(function.get("arguments"), str):
            try:
                arguments = json.loads(function["arguments"])
            except ValueError:
                raise HttpError(400, "a tool call's 'arguments' must be JSON text") from None
            call = {**call, "function": {**function, "arguments": arguments}}
        calls.append(call)
    return calls


def _content_text(content: Any) -> str:
    """Message content as text: a string, or a list of {type: text, text} parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise HttpError(400, "message 'content' must be a string or a list of text parts")


def _number(body: dict[str, Any], key: str, kind: type[Number], default: Default, low: float,
            high: float) -> Number | Default:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or (
            kind is int and not float(value).is_integer()):
        raise HttpError(400, f"'{key}' must be a{'n integer' if kind is int else ' number'}")
    if not low <= value <= high:
        raise HttpError(400, f"'{key}' must be between {low} and {high}")
    return kind(value)


def _flag(body: dict[str, Any], key: str) -> bool:
    value = body.get(key)
    if value is not None and not isinstance(value, bool):
        raise HttpError(400, f"'{key}' must be true or false")
    return bool(value)


def _stop(stop: Any) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if (not isinstance(stops, list) or len(stops) > MAX_STOP_STRINGS
            or not all(isinstance(s, str) and s for s in stops)):
        raise HttpError(400, f"'stop' must be a string or a list of at most "
                             f"{MAX_STOP_STRINGS} non-empty strings")
    return stops


def _chat_logprobs(body: dict[str, Any]) -> int | None:
    """Chat: `logprobs: true` asks for the sampled tokens', `top_logprobs` for alternatives."""
    top = _number(body, "top_logprobs", int, None, low=0, high=MAX_TOP_LOGPROBS)
    if not _flag(body, "logprobs"):
        if top:
            raise HttpError(400, "'top_logprobs' needs 'logprobs': true")
        return None
    return top or 0


def _completion_logprobs(body: dict[str, Any]) -> int | None:
    """Completions: `logprobs: k` asks for the sampled tokens' and k alternatives each."""
    if body.get("logprobs") is False:
        return None
    return _number(body, "logprobs", int, None, low=0, high=MAX_TOP_LOGPROBS)


def _grammar(response_format: Any) -> dict[str, str] | None:
    """The grammar a `response_format` asks for: none for text, a JSON schema otherwise."""
    if response_format is None:
        return None
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"kind": "json_schema", "source": OPEN_JSON_SCHEMA}
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise HttpError(400, "response_format 'json_schema' needs a 'schema' object")
        return {"kind": "json_schema", "source": json.dumps(schema)}
    raise HttpError(400, "response_format 'type' must be 'text', 'json_object' or "
                         "'json_schema'")


def _tools(body: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The tools offered to the model, or None when there are none or `tool_choice` is none."""
    tools = body.get("tools")
    choice = body.get("tool_choice")
    if choice not in (None, "none", "auto"):
        raise HttpError(400, f"tool_choice={json.dumps(choice)[:80]} is not supported: the "
                             "model decides ('auto') or gets no tools ('none')")
    if not tools or choice == "none":
        return None
    if not isinstance(tools, list) or not all(
            isinstance(t, dict) and t.get("type") == "function"
            and isinstance(t.get("function"), dict)
            and isinstance(t["function"].get("name"), str) for t in tools):
        raise HttpError(400, "'tools' must be a list of {type: function, function: {name, ...}}")
    return tools
