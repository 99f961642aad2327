"""The model, its queues, its tokenizer, and how tokens are chosen and generation stops."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from inferlet.host import request


@dataclass(frozen=True)
class Sampler:
    """How the host picks a token: temperature 0 is greedy (docs/abi.md, `forward`)."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    seed: int | None = None

    def for_step(self, step: int) -> Sampler:
        """The sampler of the `step`-th token: a seeded one advances its seed per step."""
        if self.seed is None:
            return self
        return replace(self, seed=(self.seed + step) % (1 << 63))

    def to_wire(self) -> dict[str, Any]:
        fields = {"temperature": self.temperature, "top_k": self.top_k, "top_p": self.top_p,
                  "min_p": self.min_p, "seed": self.seed}
        return {name: value for name, value in fields.items() if value is not None}


@dataclass
class StopCondition:
    max_tokens: int
    stop_tokens: list[int] = field(default_factory=list)
    stop_strings: list[str] = field(default_factory=list)


class Queue:
    """A queue of the model: requests on one queue run in order (docs/abi.md)."""

    def __init__(self, queue_id: int):
        self.id = queue_id

    async def set_priority(self, priority: int) -> None:
        await request("set_priority", queue=self.id, priority=priority)

    async def synchronize(self) -> None:
        await request("synchronize", queue=self.id)


class Model:
    """The served model: its facts (`model_info`) and a factory of contexts and queues."""

    def __init__(self, info: dict[str, Any]):
        self.info = info
        self.name: str = info["name"]
        self.page_size: int = info["page_size"]
        self.vocab_size: int = info["vocab_size"]
        self.stop_tokens: list[int] = list(info.get("stop_tokens") or [])
        self.max_position: int | None = info.get("max_position")

    @classmethod
    async def load(cls) -> Model:
        return cls(await request("model_info"))

    async def create_queue(self, priority: int = 0) -> Queue:
        return Queue(int(await request("create_queue", priority=priority)))

    def new_context(self, queue: Queue | None = None) -> Any:
        from inferlet.context import Context

        return Context(self, queue or Queue(0))


async def tokenize(text: str) -> list[int]:
    result: list[int] = await request("tokenize", text=text)
    return result


async def detokenize(tokens: list[int]) -> str:
    result: str = await request("detokenize", tokens=list(tokens))
    return result
