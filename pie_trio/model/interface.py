"""The model layer's face to the executor: `Runner`, the Protocol the executor types against,
and `ModelInfo`, what a runner tells the layers above about its model and pools.

`ModelRunner` (`runner.py`) satisfies `Runner` structurally, and so does any stand-in a test
wraps around it; the executor imports this module, never the runner's implementation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from pie_trio.model.calls import (
    Call,
    CopyKv,
    DropSwappedKv,
    Embed,
    Forward,
    ForwardResult,
    MaskKv,
    SwapInKv,
    SwapOutKv,
)


@dataclass(frozen=True)
class ModelInfo:
    """What clients and inferlets may know about the served model.

    `bos_token` / `eos_token` are the tokens' text (as chat templates use them); their ids are
    `bos_token_id` / `eos_token_id`.
    """

    name: str
    page_size: int
    vocab_size: int
    stop_tokens: list[int]
    chat_template: str | None
    bos_token: str | None
    eos_token: str | None
    max_position: int
    num_pages: int
    num_slots: int
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    dtype: str = ""
    device: str = ""
    weights: str = ""  # "int4", or the dtype of dense projection weights


class Runner(Protocol):
    """What the executor needs from a model runner.

    `check` runs on the trio thread; the rest run one at a time on the executor's single worker
    thread. The batched methods are named after the call kinds they run (`Forward.kind` is
    "forward", ...), which is how the executor dispatches a group of calls.
    """

    @property
    def info(self) -> ModelInfo:
        """The model and the sizes of its KV page and embedding slot pools."""
        ...

    def check(self, call: Call) -> None:
        """Raise `CallError` if `call` cannot run on this model and pool."""
        ...

    def clear(self, pages: list[int], slots: list[int]) -> None:
        """Wipe pages and embedding slots that just changed hands."""
        ...

    def forward(self, calls: list[Forward]) -> list[ForwardResult]:
        """One ragged forward pass over every call's tokens; results in call order."""
        ...

    def embed(self, calls: list[Embed]) -> None:
        """Store token embeddings into embedding slots."""
        ...

    def copy_kv(self, calls: list[CopyKv]) -> None:
        """Copy KV rows between pages, in call order."""
        ...

    def mask_kv(self, calls: list[MaskKv]) -> None:
        """Mark KV slots masked or unmasked, in call order."""
        ...

    def swap_out_kv(self, calls: list[SwapOutKv]) -> list[int]:
        """Copy pages to host memory under each call's keys; the bytes each call moved."""
        ...

    def swap_in_kv(self, calls: list[SwapInKv]) -> list[int]:
        """Copy host copies back into pages and drop them; the bytes each call moved."""
        ...

    def drop_swapped_kv(self, calls: list[DropSwappedKv]) -> None:
        """Forget host copies that will never be restored."""
        ...
