"""`Controller`: the control layer between the runtime's instances and the executor.

It owns what instances share — the physical page and slot pools with their reference counts,
the export registry, the pub/sub topics, the key-value store — and one `InstanceControl` per
attached instance. All of it runs in the controller's nursery on the trio thread, so the shared
state is only ever touched by one task at a time between checkpoints.

Out of capacity is refused, never queued: an allocation (or a copy-on-write) that needs more
pages than are free fails at once with ``out of KV pages: N requested, M free`` (and likewise
``out of embedding slots: ...``). The instance may free some and retry; nothing is evicted
behind its back. A `Tenancy` (set by the server) says which tenant owns each instance and caps
what one tenant may hold: pages (``out of KV pages: ... its quota of Q``) and persistent
exports, which only their tenant or an operator may remove.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from pie_trio.control.exports import ExportPolicy, ExportRegistry
from pie_trio.control.instance import InstanceControl
from pie_trio.control.messaging import Topics
from pie_trio.control.resources import PAGES, SLOTS, PhysicalPool, Releaser
from pie_trio.control.store import KeyValueStore


@dataclass(frozen=True)
class ControlLimits:
    max_queues: int = 256  # per instance, queue 0 included
    topic_buffer: int = 256  # messages buffered per subscription before broadcasts drop
    topic_bytes: int = 16 << 20  # per instance: its subscriptions and the broadcasts buffered
    store_max_key_bytes: int = 1024
    store_max_value_bytes: int = 1 << 20
    store_max_total_bytes: int = 64 << 20


def _no_tenant(instance_id: str) -> str:
    return ""


@dataclass
class Tenancy:
    """Who owns each instance, and what one tenant may hold. The default is one anonymous
    tenant with no caps; the server sets `tenant_of` once its runtime exists (the runtime
    launches every instance for an owner, the tenant)."""

    tenant_of: Callable[[str], str] = _no_tenant  # instance id → tenant
    page_quota: int | None = None  # physical KV pages charged to one tenant (None: no cap)
    exports: ExportPolicy = field(default_factory=ExportPolicy)


class Controller:
    def __init__(self, executor: Any, runner_info: Any, tokenizer: Any,
                 limits: ControlLimits | None = None, tenancy: Tenancy | None = None):
        self.executor = executor
        self.info = runner_info
        self.tokenizer = tokenizer
        self.limits = limits or ControlLimits()
        self.tenancy = tenancy or Tenancy()
        self.releaser = Releaser(executor)
        self.pages = PhysicalPool(PAGES, "KV pages", executor, executor.pages, self.releaser,
                                  tenant_quota=self.tenancy.page_quota)
        self.slots = PhysicalPool(SLOTS, "embedding slots", executor, executor.slots,
                                  self.releaser)
        self.exports = ExportRegistry(self.pages, self.tenancy.exports)
        self.topics = Topics(self.limits.topic_buffer, self.limits.topic_bytes)
        self.store = KeyValueStore(self.limits.store_max_key_bytes,
                                   self.limits.store_max_value_bytes,
                                   self.limits.store_max_total_bytes)
        # One tokenizer thread at a time: long texts and the vocabulary are rare and CPU-bound.
        self.tokenizer_limiter = trio.CapacityLimiter(1)
        self._vocab: list[bytes] | None = None
        self._instances: dict[str, InstanceControl] = {}
        self._nursery: trio.Nursery | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled; instances attached meanwhile run inside this task's nursery."""
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(self.releaser.run)
                self._nursery = nursery
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None

    @property
    def running(self) -> bool:
        return self._nursery is not None

    def attach(self, instance_id: str) -> InstanceControl:
        """Start serving a new instance's requests; `await ctl.close()` ends it."""
        if self._nursery is None:
            raise RuntimeError("the controller is not running: nursery.start(controller.run)")
        if instance_id in self._instances:
            raise ValueError(f"instance {instance_id!r} is already attached")
        instance = InstanceControl(self, instance_id)
        self._instances[instance_id] = instance
        self._nursery.start_soon(instance.serve)
        return instance

    def tenant_of(self, instance_id: str) -> str:
        """The tenant an instance runs for ("" when unknown)."""
        return self.tenancy.tenant_of(instance_id) or ""

    def detach(self, instance_id: str) -> None:
        """Called by an instance once it has released everything."""
        self._instances.pop(instance_id, None)

    def stats(self) -> dict[str, int]:
        return {
            "pages_in_use": self.pages.in_use,
            "pages_total": self.pages.capacity,
            "slots_in_use": self.slots.in_use,
            "slots_total": self.slots.capacity,
            "exports": len(self.exports),
            "instances": len(self._instances),
            "subscriptions": self.topics.subscription_count(),
            "store_keys": len(self.store),
        }

    async def vocab(self) -> list[bytes]:
        """The bytes of every token id, computed once in a worker thread."""
        if self._vocab is None:
            self._vocab = await trio.to_thread.run_sync(
                self.tokenizer.token_bytes, limiter=self.tokenizer_limiter
            )
        return self._vocab
