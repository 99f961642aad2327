"""Physical KV pages and embedding slots: reference counts, pins, and per-instance virtual ids.

The controller allocates every physical id from the executor under one owner string of its
own (`OWNER`), because a physical page may be named by several instances at once (a fork, an
import). Who may use which page is decided here instead, through each instance's `VirtualIds`.

A physical id stays allocated while anything *refers* to it — a virtual id of some instance, or
an export — or while an executor call that names it is *pinned* in flight. The second rule is
what keeps a page from being handed to another instance while a call that writes it could still
land in the same batch as the new owner's calls.

Each physical id is *charged* to the tenant whose instance allocated it, for as long as it
lives (whoever else shares, imports or exports it meanwhile), and a pool may cap what one tenant
is charged (`tenant_quota`): so one tenant cannot take the whole pool, and pages that outlive
their instance in a persistent export still count against the tenant that made them.

An allocation that finds too few ids free asks the pool's *reclaimers* first (a cache giving
back what nobody uses, the preemption policy moving a newer instance's pages to host memory);
a reclaimer may make the allocation wait. Without one, or if they free too little, it is
refused.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Protocol

import trio

from pie_trio.control.fields import ControlError
from pie_trio.executor.interface import CallExecutor, PoolCapacity
from pie_trio.model.calls import (
    AllocPages,
    AllocSlots,
    CallError,
    DropSwappedKv,
    FreePages,
    FreeSlots,
)

logger = logging.getLogger(__name__)

OWNER = "control"

PAGES = "pages"
SLOTS = "slots"
HOST_COPIES = "host copies"  # keys of swapped-out pages kept in host memory (preemption.py)
_ALLOC_CALLS: dict[str, type[AllocPages] | type[AllocSlots]] = {
    PAGES: AllocPages, SLOTS: AllocSlots}
_FREE_CALLS: dict[str, type[FreePages] | type[FreeSlots] | type[DropSwappedKv]] = {
    PAGES: FreePages, SLOTS: FreeSlots, HOST_COPIES: DropSwappedKv}


class Releaser:
    """Returns physical ids to the executor from one task of its own.

    The last reference often drops in synchronous code — an instance closing, the cleanup of a
    cancelled request — where awaiting the executor is impossible, so ids are queued here and
    freed in batches. `flushed()` waits until the executor has taken every one back, or until
    the releaser stops (at shutdown), so nobody waits forever on ids that will never return.
    """

    def __init__(self, executor: CallExecutor):
        self._executor = executor
        self._send, self._receive = trio.open_memory_channel[tuple[str, list[int]]](math.inf)
        self.pending: Counter[str] = Counter()
        self._idle = trio.Event()
        self._idle.set()
        self._stopped = False
        self.listeners: list[Callable[[], None]] = []  # told after each batch goes back

    def release(self, kind: str, ids: list[int]) -> None:
        if not ids:
            return
        if self._idle.is_set() and not self._stopped:
            self._idle = trio.Event()
        self.pending[kind] += len(ids)
        self._send.send_nowait((kind, ids))

    async def flushed(self) -> None:
        while self.pending.total() and not self._stopped:
            await self._idle.wait()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            task_status.started()
            await self._serve()
        finally:
            self._stopped = True
            self._idle.set()

    async def _serve(self) -> None:
        async for kind, ids in self._receive:
            batches: dict[str, list[int]] = {kind: ids}
            while True:  # everything queued meanwhile goes back in the same executor call
                try:
                    more_kind, more_ids = self._receive.receive_nowait()
                except trio.WouldBlock:
                    break
                batches.setdefault(more_kind, []).extend(more_ids)
            for batch_kind, batch in batches.items():
                await self._free(batch_kind, batch)
            if not self.pending.total():
                self._idle.set()
            for listener in self.listeners:
                listener()

    async def _free(self, kind: str, ids: list[int]) -> None:
        try:
            await self._executor.submit(_FREE_CALLS[kind](OWNER, ids))
        except CallError:
            # Every id here was allocated under OWNER and released once, so this is a bug in
            # the bookkeeping; say so loudly, but keep serving everyone else.
            logger.exception("the executor refused to take back %s %s", kind, ids)
        finally:
            self.pending[kind] -= len(ids)


class Reclaimer(Protocol):
    """Something that can give physical ids back when an allocation finds too few free: a cache
    dropping entries nobody uses, a policy moving a victim's pages to host memory. A pool asks
    its reclaimers in order, and stops as soon as enough ids are free."""

    async def reclaim(self, count: int, requester: str | None) -> None:
        """Try to free `count` more ids (fewer is allowed) for instance `requester` (None:
        the controller itself)."""


class PhysicalPool:
    """The controller's share of one executor pool (KV pages or embedding slots).

    Free capacity is read from the executor's own pool (`executor_pool.num_free`), so ids that
    other users of the executor hold are never promised to an instance.
    """

    def __init__(self, kind: str, noun: str, executor: CallExecutor,
                 executor_pool: PoolCapacity, releaser: Releaser,
                 tenant_quota: int | None = None):
        self.kind = kind
        self.noun = noun  # "KV pages": the words of the out-of-capacity error
        self.capacity = executor_pool.capacity
        self.tenant_quota = tenant_quota  # most ids charged to one tenant (None: no cap)
        self.charged: Counter[str] = Counter()  # live ids by the tenant they are charged to
        self._tenant_of: dict[int, str] = {}
        self._executor = executor
        self._executor_pool = executor_pool
        self._releaser = releaser
        self._refs: dict[int, int] = {}  # kept while refs > 0 or pins > 0
        # A plain dict, not a Counter: a Counter's missing keys and deletions run Python code,
        # and every forward pins and unpins its pages.
        self._pins: dict[int, int] = {}
        self._reserved = 0  # being allocated right now
        self.reclaimers: list[Reclaimer] = []  # asked in order when too few ids are free
        # Asked (tenant, how many) when an allocation would take a tenant past its quota; each
        # frees what it can of that tenant's ids and says how many.
        self.quota_relievers: list[Callable[[str, int], int]] = []

    @property
    def in_use(self) -> int:
        """Physical ids not free in the executor: held, pinned, or on their way back."""
        return len(self._refs) + self._releaser.pending[self.kind]

    def free(self) -> int:
        """Ids the executor can hand out now, less those being allocated already."""
        return self._executor_pool.num_free - self._reserved

    def exclusive(self, i: int, names: int) -> bool:
        """Whether id `i` has exactly `names` references and no pin: nothing but those names
        (one instance's, say) would notice it moving."""
        return self._refs.get(i) == names and i not in self._pins

    async def allocate(self, count: int, priority: int = 0, tenant: str = "",
                       requester: str | None = None, *, quota: bool = True) -> list[int]:
        """`count` fresh ids with one reference each, charged to `tenant`, or the documented
        out-of-capacity error (the tenant's quota counts as capacity, unless `quota` is False:
        ids given back to their holder). When too few are free, the reclaimers are asked
        first, on behalf of instance `requester`; one may wait until enough are free."""
        if count > self.free():
            await self._releaser.flushed()  # freed-but-not-yet-returned ids count as free
        if quota:
            self._relieve_quota(count, tenant)
            self._check_quota(count, tenant)
        for reclaimer in self.reclaimers:
            if count <= self.free():
                break
            await reclaimer.reclaim(count - self.free(), requester)
            if count > self.free():
                await self._releaser.flushed()
        free = self.free()
        if count > free:
            raise ControlError(f"out of {self.noun}: {count} requested, {free} free")
        if quota:
            self._check_quota(count, tenant)  # a reclaimer may have waited: look again
        # Reserved and charged before the executor call, so concurrent allocations see them.
        self._reserved += count
        self.charged[tenant] += count
        try:
            # Shielded: once the executor hands ids out we must record them, or they leak.
            with trio.CancelScope(shield=True):
                ids = await self._executor.submit(
                    _ALLOC_CALLS[self.kind](OWNER, count), priority=priority
                )
        except BaseException as exc:
            self._uncharge(tenant, count)
            if isinstance(exc, CallError):
                raise ControlError(f"cannot allocate {count} {self.noun}: {exc}") from None
            raise
        finally:
            self._reserved -= count
        for i in ids:
            self._refs[i] = 1
            self._tenant_of[i] = tenant
        return ids

    def _relieve_quota(self, count: int, tenant: str) -> None:
        """Past its quota, a tenant's ids that only a cache keeps are given up first."""
        quota = self.tenant_quota
        over = 0 if quota is None else self.charged[tenant] + count - quota
        for relieve in self.quota_relievers:
            if over <= 0:
                return
            over -= relieve(tenant, over)

    def tenant_of(self, i: int) -> str:
        """The tenant id `i` is charged to."""
        return self._tenant_of[i]

    def _check_quota(self, count: int, tenant: str) -> None:
        quota = self.tenant_quota
        if quota is not None and self.charged[tenant] + count > quota:
            raise ControlError(f"out of {self.noun}: {count} requested, tenant {tenant!r} "
                               f"holds {self.charged[tenant]} of its quota of {quota}")

    def _uncharge(self, tenant: str, count: int) -> None:
        self.charged[tenant] -= count
        if self.charged[tenant] <= 0:
            del self.charged[tenant]

    def shared(self, i: int) -> bool:
        return self._refs[i] > 1

    def ref(self, ids: Iterable[int]) -> None:
        for i in ids:
            self._refs[i] += 1

    def unref(self, ids: Iterable[int]) -> None:
        released: list[int] = []
        for i in ids:
            self._refs[i] -= 1
            if self._refs[i] == 0 and i not in self._pins:
                del self._refs[i]
                released.append(i)
        self._release(released)

    def _release(self, ids: list[int]) -> None:
        """Hand ids nobody refers to back to the executor and uncharge their tenants."""
        for i in ids:
            self._uncharge(self._tenant_of.pop(i), 1)
        self._releaser.release(self.kind, ids)

    @contextmanager
    def pinned(self, ids: Iterable[int]) -> Iterator[None]:
        """Keep `ids` allocated while an executor call that names them is in flight."""
        ids = list(ids)
        self.pin(ids)
        try:
            yield
        finally:
            self.unpin(ids)

    def pin(self, ids: list[int]) -> None:
        """`pinned` without a block: each `pin` is undone by one `unpin` of the same ids."""
        pins = self._pins
        for i in ids:
            pins[i] = pins.get(i, 0) + 1

    def unpin(self, ids: list[int]) -> None:
        released: list[int] = []
        pins = self._pins
        for i in ids:
            left = pins[i] - 1
            if left:
                pins[i] = left
            else:
                del pins[i]
                if self._refs[i] == 0:
                    del self._refs[i]
                    released.append(i)
        self._release(released)


class VirtualIds:
    """One instance's names for physical ids of one kind.

    Virtual ids are small integers that mean nothing outside their instance; they are never
    reused within it, so a stale id is an error rather than an alias of some newer resource.
    """

    def __init__(self, noun: str):
        self.noun = noun  # "page", "slot": the words of the not-held error
        self._physical: dict[int, int] = {}
        self._next = 0

    def __len__(self) -> int:
        return len(self._physical)

    def add(self, physical: int) -> int:
        vid = self._next
        self._next += 1
        self._physical[vid] = physical
        return vid

    def physical(self, vid: int) -> int:
        try:
            return self._physical[vid]
        except KeyError:
            raise ControlError(f"{self.noun} {vid} is not held by this instance") from None

    def resolve(self, vids: list[int]) -> list[int]:
        physical = self._physical
        try:
            return [physical[v] for v in vids]
        except KeyError:
            for v in vids:
                self.physical(v)  # raises the error that names the first id not held
            raise

    def get(self, vid: int) -> int | None:
        return self._physical.get(vid)

    def items(self) -> list[tuple[int, int]]:
        """(virtual, physical) of every id held now."""
        return list(self._physical.items())

    def unmap(self, vid: int) -> int:
        """Take `vid`'s physical id away, keeping the vid reserved for a later `remap` (its
        page is being swapped out, see preemption.py); returns the physical id."""
        return self._physical.pop(vid)

    def remap(self, vid: int, physical: int) -> None:
        self._physical[vid] = physical

    def remove(self, vids: list[int]) -> list[int]:
        """Forget `vids` (all checked first) and return their physical ids."""
        physical = self.resolve(vids)
        for v in vids:
            del self._physical[v]
        return physical

    def clear(self) -> list[int]:
        physical = list(self._physical.values())
        self._physical.clear()
        return physical
