"""`DetachedInstances`: the instances no connection streams, kept until a client attaches.

A detached instance's output waits where it always waits before a client reads it: in the
instance's own event channel. Nothing is copied or dropped: that channel is the backlog, and the
runtime's back-pressure bounds it (once `output_backlog_bytes` of output is unread, the guest's
next `send` or print waits until a client attaches and reads). An instance that ends while
detached keeps its last events (its `return` and `terminated`) in the channel, so a later
attach still learns how it ended.

Ended detached instances hold no resources below the server, only their unread events, but
nobody may collect them: each tenant keeps at most `keep` of them, each for at most
`keep_seconds` after the server noticed its end; older ones are forgotten, and an attach then
answers `not_found`. The registry has no task of its own: it notices ends whenever it is
consulted (`settle`), which the server does before every listing, attach and capacity check.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, Protocol, TypeVar

import trio

KEEP_ENDED = 16  # ended detached instances kept per tenant, newest first
KEEP_ENDED_SECONDS = 600.0  # how long one is kept after its end was noticed


class Detachable(Protocol):
    """What the registry needs of an instance record (the server's `Running`)."""

    @property
    def id(self) -> str: ...

    @property
    def tenant(self) -> str: ...

    @property
    def has_ended(self) -> bool: ...


Running = TypeVar("Running", bound=Detachable)


class DetachedInstances(Generic[Running]):
    def __init__(self, keep: int = KEEP_ENDED, keep_seconds: float = KEEP_ENDED_SECONDS):
        self.keep = keep
        self.keep_seconds = keep_seconds
        self._records: dict[str, Running] = {}  # by instance id, in the order detached
        self._ended_at: dict[str, float] = {}  # when settle() noticed each one's end

    def __len__(self) -> int:
        return len(self._records)

    def add(self, running: Running) -> None:
        self._records[running.id] = running

    def get(self, instance_id: str, tenant: str) -> Running | None:
        """The detached instance if `tenant` owns it (running or ended)."""
        running = self._records.get(instance_id)
        return running if running is not None and running.tenant == tenant else None

    def take(self, instance_id: str) -> None:
        """A client attached: the instance is no longer detached."""
        self._records.pop(instance_id, None)
        self._ended_at.pop(instance_id, None)

    def ended(self, tenant: str) -> list[Running]:
        """The tenant's detached instances that have ended and wait for an attach."""
        return [r for r in self._records.values() if r.tenant == tenant and r.id in self._ended_at]

    def unfinished(self) -> list[Running]:
        return [r for r in self._records.values() if not r.has_ended]

    def settle(self, on_end: Callable[[Running], None]) -> None:
        """Notice the ends since the last call (`on_end` for each), then forget what is past
        its keeping."""
        now = trio.current_time()
        for instance_id, running in self._records.items():
            if instance_id not in self._ended_at and running.has_ended:
                self._ended_at[instance_id] = now
                on_end(running)
        kept: dict[str, int] = {}
        # Newest first, so a tenant over its count loses its oldest.
        for instance_id in sorted(self._ended_at, key=self._ended_at.__getitem__, reverse=True):
            tenant = self._records[instance_id].tenant
            kept[tenant] = kept.get(tenant, 0) + 1
            if kept[tenant] > self.keep or now - self._ended_at[instance_id] > self.keep_seconds:
                self.take(instance_id)
