"""Chat rendering for the OpenAI API, with tools: whether the model's chat template takes
`tools`, rendering the messages (and tools) in a worker thread, and parsing the model's tool
calls back out of its text.

Tools reach the model only through its own chat template: a template that never reads a
`tools` variable gives the model no way to see them, so such a request is a 400 naming `tools`
rather than a prompt that silently leaves them out. Calls are parsed in the Hermes/Qwen form
the templates that take tools teach: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`.
"""

from __future__ import annotations

import functools
import json
import re
import uuid
from typing import Any, Protocol, runtime_checkable

import jinja2
import jinja2.meta
import trio

from pie_trio.server.exchange import HttpError
from pie_trio.server.openai_params import Params
from pie_trio.server.state import ServerState

# A call's JSON between the tags; the closing tag may be missing when the text ends with it.
TOOL_CALL = re.compile(r"<tool_call>\s*(\{.*?\})\s*(?:</tool_call>|$)", re.DOTALL)


@runtime_checkable
class ToolTemplateCodec(Protocol):
    """A tokenizer whose template source is readable and whose rendering takes extra variables
    (the model's tokenizer does; the server's `TextCodec` names only what every request needs)."""

    chat_template: str | None

    def render_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                    **extra: Any) -> str: ...


@functools.lru_cache(maxsize=8)
def template_takes_tools(template: str) -> bool:
    """Whether the chat template reads a `tools` variable."""
    try:
        parsed = jinja2.Environment().parse(template)
    except jinja2.TemplateSyntaxError:
        return False
    return "tools" in jinja2.meta.find_undeclared_variables(parsed)


async def render_chat(state: ServerState, params: Params) -> None:
    """Render the chat's messages (and tools) into `params.prompt` with the model's template,
    in a worker thread: a template over many or long messages takes long enough to stall
    everyone."""
    assert params.messages is not None
    messages, tools = params.messages, params.tools
    tokenizer = state.tokenizer
    if tools is not None:
        if not isinstance(tokenizer, ToolTemplateCodec) or not template_takes_tools(
                tokenizer.chat_template or ""):
            raise HttpError(400, "'tools' is not supported for this model: its chat template "
                                 "does not take tools")

    def render() -> str:
        if tools is None:
            return state.tokenizer.render_chat(messages, add_generation_prompt=True)
        assert isinstance(tokenizer, ToolTemplateCodec)  # checked above
        return tokenizer.render_chat(messages, add_generation_prompt=True, tools=tools)

    try:
        params.prompt = await trio.to_thread.run_sync(render, limiter=state.cpu_limiter)
    except Exception as exc:
        raise HttpError(400, f"the chat template rejected these messages: {exc}") from None


def parse_tool_calls(text: str) -> tuple[str | None, list[dict[str, Any]]]:
    """The text without its tool calls (None when nothing else is left), and the calls in
    OpenAI's form. A tagged span whose JSON is not a call (a `name` string and `arguments`)
    stays in the text."""
    calls: list[dict[str, Any]] = []

    def take(match: re.Match[str]) -> str:
        try:
            call = json.loads(match.group(1))
        except ValueError:
            return match.group(0)
        name = call.get("name") if isinstance(call, dict) else None
        arguments = call.get("arguments", {}) if isinstance(call, dict) else None
        if not isinstance(name, str) or not isinstance(arguments, dict | str):
            return match.group(0)
        if not isinstance(arguments, str):
            arguments = json.dumps(arguments, ensure_ascii=False)
        calls.append({"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
                      "function": {"name": name, "arguments": arguments}})
        return ""

    rest = TOOL_CALL.sub(take, text).strip()
    return (rest or None) if calls else text, calls
