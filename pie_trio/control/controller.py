"""`Controller`: the control layer between the runtime's instances and the executor.

It builds what instances share — the physical page and slot pools with their reference counts,
the export registry, the pub/sub topics, the key-value store, the model's view, the grammar
compiler — and gives each attached instance an `InstanceContext` over them and an
`InstanceControl` to run in. All of it runs in the controller's nursery on the trio thread, so
the shared state is only ever touched by one task at a time between checkpoints.

Out of capacity, by default (`ControlLimits.kv_policy="refuse"`), is refused, never queued: an
allocation (or a copy-on-write) that needs more pages than are free fails at once with
``out of KV pages: N requested, M free`` (and likewise ``out of embedding slots: ...``). The
instance may free some and retry; nothing is evicted behind its back. With `"preempt"` an
allocation short of KV pages waits instead, and newer instances' pages move to host memory
meanwhile (preemption.py); embedding slots are still refused. A `Tenancy` (set by the server)
says which tenant owns each instance and caps what one tenant may hold: pages (``out of KV
pages: ... its quota of Q``) and persistent exports, which only their tenant or an operator may
remove.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from pie_trio.control.context import InstanceContext
from pie_trio.control.execution import ExecutorAccess
from pie_trio.control.exports import ExportPolicy, ExportRegistry
from pie_trio.control.grammar import GrammarCompiler, InstanceGrammars
from pie_trio.control.instance import InstanceControl
from pie_trio.control.messaging import Topics
from pie_trio.control.model_view import ModelView
from pie_trio.control.preemption import KV_POLICIES, Preemption
from pie_trio.control.prefix_cache import PrefixCache
from pie_trio.control.queues import Queues
from pie_trio.control.resources import PAGES, SLOTS, PhysicalPool, Releaser, VirtualIds
from pie_trio.control.store import KeyValueStore
from pie_trio.control.tools import InstanceTools, ToolPolicy, Tools
from pie_trio.executor.interface import CallExecutor
from pie_trio.model.interface import ModelInfo
from pie_trio.model.tokenizer import Tokenizer


@dataclass(frozen=True)
class ControlLimits:
    max_queues: int = 256  # per instance, queue 0 included
    topic_buffer: int = 256  # messages buffered per subscription before broadcasts drop
    topic_bytes: int = 16 << 20  # per instance: its subscriptions and the broadcasts buffered
    store_max_key_bytes: int = 1024
    store_max_value_bytes: int = 1 << 20
    store_max_total_bytes: int = 64 << 20
    max_grammars: int = 32  # per instance: compiled grammars held
    max_matchers: int = 256  # per instance: one per constrained sequence
    grammar_cache: int = 64  # compiled grammars kept for reuse by content, all instances
    kv_policy: str = "refuse"  # out of KV pages: "refuse" the allocation, or "preempt"
    prefix_cache: bool = True  # keep full prompt pages by content for reuse (prefix_cache.py)
    prefix_cache_pages: int | None = None  # most pages it keeps (None: half the page pool)


def _no_tenant(instance_id: str) -> str:
    return ""


@dataclass
class Tenancy:
    """Who owns each instance, and what one tenant may hold. The default is one anonymous
    tenant with no caps; the stack (`pie_trio/stack.py`) sets `tenant_of` once its runtime
    exists (the runtime launches every instance for an owner, the tenant)."""

    tenant_of: Callable[[str], str] = _no_tenant  # instance id → tenant
    page_quota: int | None = None  # physical KV pages charged to one tenant (None: no cap)
    exports: ExportPolicy = field(default_factory=ExportPolicy)


class Controller:
    """The runtime's control layer (`control.interface.ControlService`)."""

    def __init__(self, executor: CallExecutor, runner_info: ModelInfo, tokenizer: Tokenizer,
                 limits: ControlLimits | None = None, tenancy: Tenancy | None = None,
                 tools: ToolPolicy | None = None):
        self.info = runner_info
        self.limits = limits or ControlLimits()
        if self.limits.kv_policy not in KV_POLICIES:
            raise ValueError(f"kv_policy must be one of {KV_POLICIES}, "
                             f"got {self.limits.kv_policy!r}")
        self.tenancy = tenancy or Tenancy()
        self.releaser = Releaser(executor)
        self.pages = PhysicalPool(PAGES, "KV pages", executor, executor.pages, self.releaser,
                                  tenant_quota=self.tenancy.page_quota)
        self.slots = PhysicalPool(SLOTS, "embedding slots", executor, executor.slots,
                                  self.releaser)
        self.preemption = Preemption(self.pages, executor, self.releaser)
        if self.limits.kv_policy == "preempt":
            self.pages.reclaimers.append(self.preemption)
        self.exports = ExportRegistry(self.pages, self.tenancy.exports)
        self.topics = Topics(self.limits.topic_buffer, self.limits.topic_bytes)
        self.store = KeyValueStore(self.limits.store_max_key_bytes,
                                   self.limits.store_max_value_bytes,
                                   self.limits.store_max_total_bytes)
        self.model = ModelView(runner_info, tokenizer)
        self.tools = Tools(tools)  # outbound HTTP for inferlets: off unless the policy allows
        self.grammar_compiler = GrammarCompiler(tokenizer, runner_info.vocab_size,
                                                runner_info.stop_tokens,
                                                cache_size=self.limits.grammar_cache)
        self.prefix_cache = self._prefix_cache()
        self._executor_access = ExecutorAccess(executor, self.pages, self.slots)
        self._instances: dict[str, InstanceControl] = {}
        self._nursery: trio.Nursery | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled; instances attached meanwhile run inside this task's nursery."""
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(self.releaser.run)
                self._nursery = nursery
                self.preemption.nursery = nursery
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None

    @property
    def running(self) -> bool:
        return self._nursery is not None

    @property
    def model_names(self) -> list[str]:
        """The names of the models served: the `models` op's answer."""
        return [self.info.name] if self.info.name else []

    def attach(self, instance_id: str) -> InstanceControl:
        """Start serving a new instance's requests; `await ctl.close()` ends it."""
        if self._nursery is None:
            raise RuntimeError("the controller is not running: nursery.start(controller.run)")
        if instance_id in self._instances:
            raise ValueError(f"instance {instance_id!r} is already attached")
        instance = InstanceControl(self._context(instance_id), self.releaser, self.detach,
                                   self._nursery.start_soon)
        self._instances[instance_id] = instance
        # A new instance usually forwards its prompt soon: launched with others at once, they
        # share the first forward (executor: `expect_callers`); its first forward or its end
        # takes it off again.
        self._executor_access.expect_callers(1)
        return instance

    def _context(self, instance_id: str) -> InstanceContext:
        """A new instance's own ids and queues, over the services every instance shares."""
        pages = VirtualIds("page")
        return InstanceContext(
            instance_id=instance_id,
            pages=pages,
            slots=VirtualIds("slot"),
            queues=Queues(self.limits.max_queues),
            grammars=InstanceGrammars(self.info.vocab_size, self.limits.max_grammars,
                                      self.limits.max_matchers),
            physical_pages=self.pages,
            physical_slots=self.slots,
            exports=self.exports,
            topics=self.topics,
            store=self.store,
            model=self.model,
            grammar_compiler=self.grammar_compiler,
            executor=self._executor_access,
            tenant_of=self.tenant_of,
            tools=InstanceTools(self.tools),
            prefix_cache=self.prefix_cache,
            residency=self.preemption.attach(instance_id, pages,
                                             lambda: self.tenant_of(instance_id)),
        )

    def _prefix_cache(self) -> PrefixCache:
        """The prefix cache, asked first for pages when the pool runs short (before any policy
        that takes pages from a running instance)."""
        bound = self.limits.prefix_cache_pages
        capacity = self.pages.capacity // 2 if bound is None else bound
        if not self.limits.prefix_cache:
            capacity = 0
        cache = PrefixCache(self.pages, self.info.page_size, self.info.name, capacity)
        self.pages.reclaimers.insert(0, cache)
        self.pages.quota_relievers.append(cache.relieve)
        return cache

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
            "grammars_cached": len(self.grammar_compiler),
            "prefix_cache_pages": len(self.prefix_cache),
            "prefix_cache_queries": self.prefix_cache.stats.queries,
            "prefix_cache_query_tokens": self.prefix_cache.stats.query_tokens,
            "prefix_cache_hit_tokens": self.prefix_cache.stats.hit_tokens,
            "preemptions": self.preemption.preemptions,
            "restores": self.preemption.restores,
            "swap_bytes": self.preemption.swap_bytes,
            "swapped_pages": self.preemption.host_copies(),
        }
