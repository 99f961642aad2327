"""A fixed pool of integer ids (KV pages or embedding slots) with an owner per allocated id.

The executor keeps one pool for pages and one for slots. Ownership is what keeps callers apart:
a call that names an id its owner was not given fails with `CallError`, and only that call.
Allocation is all-or-nothing, so a failed request leaves the pool as it was.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable

from pie_trio.model.calls import CallError


class IdPool:
    """Ids 0..capacity-1; `alloc` hands out the lowest free ids first (keeps pages compact)."""

    def __init__(self, capacity: int, what: str) -> None:
        if capacity < 0:
            raise ValueError(f"a pool cannot hold {capacity} ids")
        self.capacity = capacity
        self.what = what  # "page" or "slot", for error messages
        self._free: list[int] = list(range(capacity))  # a heap: lowest id first
        self._owner: dict[int, str] = {}

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return len(self._owner)

    def owner_of(self, id_: int) -> str | None:
        return self._owner.get(id_)

    def owned_by(self, owner: str) -> list[int]:
        return sorted(i for i, o in self._owner.items() if o == owner)

    def alloc(self, owner: str, count: int) -> list[int]:
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            raise CallError(f"cannot allocate {count!r} {self.what}s: need a count >= 0")
        if count > len(self._free):
            raise CallError(
                f"out of {self.what}s: asked for {count}, {len(self._free)} of "
                f"{self.capacity} free"
            )
        ids = [heapq.heappop(self._free) for _ in range(count)]
        for id_ in ids:
            self._owner[id_] = owner
        return ids

    def free(self, owner: str, ids: Iterable[int]) -> None:
        ids = list(ids)
        if len(set(ids)) != len(ids):
            raise CallError(f"cannot free {self.what}s {ids}: an id is listed twice")
        self.check(owner, ids)
        for id_ in ids:
            del self._owner[id_]
        for id_ in ids:
            heapq.heappush(self._free, id_)

    def free_all(self, owner: str) -> list[int]:
        """Free every id of `owner` (cleanup after a caller vanished); returns what was freed."""
        ids = self.owned_by(owner)
        self.free(owner, ids)
        return ids

    def check(self, owner: str, ids: Iterable[int]) -> None:
        for id_ in ids:
            held_by = self._owner.get(id_) if isinstance(id_, int) else None
            if held_by != owner:
                raise CallError(f"{self.what} {id_!r} is not allocated to {owner!r}")
