"""The OpenAI response objects: whole responses, stream chunks and usage, for chat and for
completions, from the choices the `openai-completion` inferlet reports.

The inferlet reports each token's log-probability as OpenAI's chat token object (`token`,
`bytes`, `logprob`, `top_logprobs`); chat passes them through, completions reshape them into
the legacy `tokens` / `token_logprobs` / `top_logprobs` / `text_offset` lists.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from pie_trio.server.openai_tools import parse_tool_calls


@dataclass
class Choice:
    """One of the n answers, as the inferlet reports it."""

    index: int
    text: str = ""
    logprobs: list[dict[str, Any]] | None = None  # token entries, when asked for
    finish_reason: str | None = None
    tokens: int = 0  # generated tokens (a stop token not counted)


@dataclass
class Update:
    """What one inferlet message adds to a choice: text, its tokens' entries, or its end."""

    index: int
    text: str = ""
    logprobs: list[dict[str, Any]] | None = None
    finish_reason: str | None = None


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int = 0

    def as_dict(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


@dataclass
class Response:
    """The response objects of one request."""

    chat: bool
    model: str
    tools: bool = False  # tool calls are parsed out of each choice's text
    id: str = field(default="")
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        self.id = self.id or ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex

    def _base(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def _chunk_object(self) -> str:
        return "chat.completion.chunk" if self.chat else "text_completion"

    def whole(self, choices: list[Choice], usage: Usage) -> dict[str, Any]:
        obj = "chat.completion" if self.chat else "text_completion"
        return {**self._base(obj), "choices": [self._whole_choice(c) for c in choices],
                "usage": usage.as_dict()}

    def _whole_choice(self, choice: Choice) -> dict[str, Any]:
        if not self.chat:
            return {"index": choice.index, "text": choice.text,
                    "logprobs": completion_logprobs(choice.logprobs),
                    "finish_reason": choice.finish_reason}
        message: dict[str, Any] = {"role": "assistant", "content": choice.text}
        finish = choice.finish_reason
        if self.tools:
            content, calls = parse_tool_calls(choice.text)
            if calls:
                message = {"role": "assistant", "content": content, "tool_calls": calls}
                finish = "tool_calls"
        return {"index": choice.index, "message": message,
                "logprobs": chat_logprobs(choice.logprobs), "finish_reason": finish}

    def first_chunks(self, n: int) -> list[dict[str, Any]]:
        """Chat: each choice's role, first. Completions: nothing (text comes with its first
        token)."""
        if not self.chat:
            return []
        return [self._base(self._chunk_object()) | {"choices": [
            {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
             "finish_reason": None}]} for i in range(n)]

    def chunk(self, update: Update, choice: Choice) -> dict[str, Any] | None:
        """The chunk carrying `update`, or None when it carries nothing to send yet (with
        tools a chat choice arrives whole at its end: its text must be parsed first)."""
        if self.chat and self.tools:
            if update.finish_reason is None:
                return None
            return self._chunk(self._tools_delta(choice))
        if update.finish_reason is not None:
            if self.chat:
                return self._chunk({"index": update.index, "delta": {}, "logprobs": None,
                                    "finish_reason": update.finish_reason})
            return self._chunk({"index": update.index, "text": "", "logprobs": None,
                                "finish_reason": update.finish_reason})
        if self.chat:
            return self._chunk({"index": update.index, "delta": {"content": update.text},
                                "logprobs": chat_logprobs(update.logprobs),
                                "finish_reason": None})
        start = len(choice.text) - len(update.text)  # the choice already holds the update
        return self._chunk({"index": update.index, "text": update.text,
                            "logprobs": completion_logprobs(update.logprobs, start),
                            "finish_reason": None})

    def _tools_delta(self, choice: Choice) -> dict[str, Any]:
        whole = self._whole_choice(choice)
        delta = dict(whole["message"])
        delta.pop("role")
        for i, call in enumerate(delta.get("tool_calls", [])):
            call["index"] = i
        return {"index": choice.index, "delta": delta, "logprobs": whole["logprobs"],
                "finish_reason": whole["finish_reason"]}

    def _chunk(self, choice: dict[str, Any]) -> dict[str, Any]:
        return {**self._base(self._chunk_object()), "choices": [choice]}

    def usage_chunk(self, usage: Usage) -> dict[str, Any]:
        return {**self._base(self._chunk_object()), "choices": [], "usage": usage.as_dict()}


def chat_logprobs(entries: list[dict[str, Any]] | None) -> dict[str, Any] | None:
    return None if entries is None else {"content": entries}


def completion_logprobs(entries: list[dict[str, Any]] | None,
                        start: int = 0) -> dict[str, Any] | None:
    """The legacy completions form: parallel lists, offsets counted in characters of the
    choice's text (an echoed prompt included) from `start`, where these entries' text begins."""
    if entries is None:
        return None
    offsets, at = [], start
    for entry in entries:
        offsets.append(at)
        at += len(entry["token"])
    return {
        "tokens": [e["token"] for e in entries],
        "token_logprobs": [e["logprob"] for e in entries],
        "top_logprobs": [None if e.get("top_logprobs") is None else
                         {t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries],
        "text_offset": offsets,
    }
