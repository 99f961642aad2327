"""`InstanceContext`: everything an op handler may touch for the instance whose request it runs.

That is the instance's own state — its virtual page and slot ids and its queues — and the
services all instances share, each reached directly: the physical pools, exports, topics, the
store, the model's description and tokenizer, the grammar compiler, the prefix cache, and the
executor (with pinning); and its `Residency`: whether its pages are in the pool or swapped
out. Its grammars and matchers are the instance's own too. The instance's
lifecycle (its nursery, its pending answers, closing) is not here: handlers cannot reach it.
The service modules' ops declare the one service they use as a small Protocol, which this
class satisfies; the resource and model ops (`kv.py`, `inference.py`) take it whole.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pie_trio.control.execution import ExecutorAccess
from pie_trio.control.exports import ExportRegistry
from pie_trio.control.grammar import GrammarCompiler, InstanceGrammars
from pie_trio.control.messaging import Topics
from pie_trio.control.model_view import ModelView
from pie_trio.control.preemption import Residency
from pie_trio.control.prefix_cache import PrefixCache
from pie_trio.control.queues import Queues
from pie_trio.control.resources import PhysicalPool, VirtualIds
from pie_trio.control.store import KeyValueStore
from pie_trio.control.tools import InstanceTools


@dataclass(frozen=True)
class InstanceContext:
    instance_id: str
    pages: VirtualIds  # the instance's names for physical pages
    slots: VirtualIds  # ... and for physical embedding slots
    queues: Queues
    grammars: InstanceGrammars  # the instance's compiled grammars and matchers
    physical_pages: PhysicalPool
    physical_slots: PhysicalPool
    exports: ExportRegistry
    topics: Topics
    store: KeyValueStore
    model: ModelView
    grammar_compiler: GrammarCompiler
    executor: ExecutorAccess
    tenant_of: Callable[[str], str]  # instance id → tenant, asked at each use (it may change)
    tools: InstanceTools  # the tool policy and the instance's HTTP requests in flight
    residency: Residency  # whether its pages are here or swapped out (preemption.py)
    prefix_cache: PrefixCache  # full prompt pages by content, per tenant

    def tenant(self) -> str:
        """The tenant this instance runs for: whom its allocations and exports belong to."""
        return self.tenant_of(self.instance_id)

    def release_all(self) -> None:
        """Drop every reference the instance holds; synchronous, so nothing can interrupt it."""
        self.physical_pages.unref(self.pages.clear())
        self.residency.close()  # and the host copies of pages swapped out
        self.physical_slots.unref(self.slots.clear())
        self.exports.remove_owned_by(self.instance_id)
        self.topics.unsubscribe_all(self.instance_id)
        self.queues.clear()
        self.grammars.clear()
