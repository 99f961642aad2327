"""KV preemption: when pages run out, a newer instance's pages move to host memory and back.

The policy (`kv_policy="preempt"`) is a reclaimer of the page pool (resources.py). When an
allocation of instance R finds too few pages free, R *waits* for them instead of failing, and
while it waits it may preempt instances *newer* than itself: newest first, each one is
suspended, its pages go to host memory (`SwapOutKv`), and the pages are freed for others. A
suspended instance is restored as soon as enough pages are free for it — same pages' contents,
same virtual ids — and goes on; its guest only saw a slower call. This is vLLM's argument: the
oldest instance can preempt every other, so it always progresses, and the others follow in age
order. Waiters are served strictly oldest first, restores before allocations of the same
instance; an allocation that could never fit (more than the pool, or its tenant's quota) is
refused at once, and so, as a last resort, is one of the oldest instance when nothing is left
to preempt or wait for (``out of KV pages: ... nothing left to preempt``).

What moves. Only pages the victim alone refers to — no export, no other instance, no call in
flight — and every one of its names for them; shared pages stay where they are. Host copies
live in the model runner (kv_cache.py), by integer keys chosen here; an instance that ends
while swapped out drops them (`DropSwappedKv`, through the releaser).

Why the gate. A page may only move while nothing of the victim could name it: its requests
that touch KV (`GATED_OPS`) pass its `Residency` gate, which closes for a swap; the swap starts
once every request past the gate is *parked* — waiting inside an allocation, which holds no
physical id across the wait — and the parked ones resume only after the restore. So handlers
never see a physical id change under them, except across an allocation (kv.py checks again
there).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from enum import Enum
from itertools import count
from typing import Any

import trio

from pie_trio.control.fields import ControlError
from pie_trio.control.resources import (
    HOST_COPIES,
    OWNER,
    PAGES,
    PhysicalPool,
    Releaser,
    VirtualIds,
)
from pie_trio.executor.interface import CallExecutor
from pie_trio.model.calls import CallError, SwapInKv, SwapOutKv

logger = logging.getLogger(__name__)

KV_POLICIES = ("refuse", "preempt")

# The ops that name an instance's KV pages: they wait at the gate while the instance is away.
GATED_OPS = frozenset({"alloc_pages", "free_pages", "share_pages", "export_pages", "import_pages",
                       "copy_kv", "mask_kv", "forward", "prefix_match", "prefix_store"})


class State(Enum):
    RESIDENT = "resident"
    SWAPPING_OUT = "swapping out"
    SWAPPED = "swapped"
    RESTORING = "restoring"


class Signal:
    """A broadcast: every task waiting is woken by the next `notify`. Waiters test their
    condition, then wait, with no checkpoint in between, so no wake-up is lost. `on_notify`
    runs at each notify (the page waiters' turn: `Preemption._wake_first`)."""

    def __init__(self, on_notify: Callable[[], None] | None = None) -> None:
        self._event = trio.Event()
        self._on_notify = on_notify

    def notify(self) -> None:
        self._event.set()
        self._event = trio.Event()
        if self._on_notify is not None:
            self._on_notify()

    async def wait(self) -> None:
        await self._event.wait()


class Residency:
    """One instance's side of preemption: its age, its gate, the pages it has on the host."""

    def __init__(self, preemption: Preemption, instance_id: str, age: int, pages: VirtualIds,
                 tenant: Callable[[], str]):
        self.instance_id = instance_id
        self.age = age  # attach order: smaller is older
        self.pages = pages
        self.tenant = tenant
        self.state = State.RESIDENT
        self.active = 0  # gated requests past the gate
        self.parked = 0  # of those, waiting for pages inside an allocation
        self.swapped: dict[int, int] = {}  # virtual page id -> host key
        self.closed = False
        # The scope of its restore while it is swapped out (cancelled when the instance ends).
        self.restore_scope: trio.CancelScope | None = None
        self._preemption = preemption

    @property
    def quiet(self) -> bool:
        """Nothing past the gate can name a physical page now."""
        return self.active == self.parked

    def host_copies(self) -> int:
        return len(set(self.swapped.values()))

    @asynccontextmanager
    async def passage(self, request: Any) -> AsyncIterator[None]:
        """Run one request: a KV request waits while the instance's pages are away."""
        if not isinstance(request, dict) or request.get("op") not in GATED_OPS:
            yield
            return
        while self.state is not State.RESIDENT:
            await self._preemption.signal.wait()
        self.active += 1
        try:
            yield
        finally:
            self.leave()

    def enter_now(self) -> bool:
        """`passage` for a KV request run with no task (instance.py): True if it may pass
        now, and then `leave` must follow once it completes."""
        if self.state is not State.RESIDENT:
            return False
        self.active += 1
        return True

    def leave(self) -> None:
        self.active -= 1
        self._preemption.signal.notify()

    def close(self) -> None:
        """The instance ended (its pages are released already): drop its host copies."""
        self._preemption.forget(self)


@dataclass(eq=False)
class Waiter:
    """An instance waiting for `count` pages: an allocation, or its own restore."""

    residency: Residency
    count: int  # pages that must be free
    restore: bool
    seq: int = 0  # arrival, among waiters of the same instance and kind
    turn: trio.Event = field(default_factory=trio.Event)  # set when it may be first now

    @property
    def order(self) -> tuple[int, int, int]:
        return (self.residency.age, 0 if self.restore else 1, self.seq)

    @property
    def eligible(self) -> bool:
        """An allocation goes on while its instance is here; a restore while it is away."""
        wanted = State.SWAPPED if self.restore else State.RESIDENT
        return self.residency.state is wanted


class Preemption:
    """The `preempt` policy for one page pool (see the module docstring); also the `Reclaimer`
    the pool asks when an allocation finds too few pages."""

    def __init__(self, pool: PhysicalPool, executor: CallExecutor, releaser: Releaser):
        self.pool = pool
        self.signal = Signal(self._wake_first)
        self.nursery: trio.Nursery | None = None  # where restores run: the controller's
        self.preemptions = 0
        self.restores = 0
        self.swap_bytes = 0
        self._executor = executor
        self._releaser = releaser
        self._residents: dict[str, Residency] = {}
        self._waiters: list[Waiter] = []
        self._ages = count()
        self._keys = count()
        self._seqs = count()
        self._moving = 0  # swaps in flight
        self.broken = False  # a swap out failed: the runner cannot swap, so no more preempting
        releaser.listeners.append(self.signal.notify)

    def attach(self, instance_id: str, pages: VirtualIds,
               tenant: Callable[[], str]) -> Residency:
        residency = Residency(self, instance_id, next(self._ages), pages, tenant)
        self._residents[instance_id] = residency
        return residency

    def forget(self, residency: Residency) -> None:
        residency.closed = True
        self._residents.pop(residency.instance_id, None)
        if residency.restore_scope is not None:
            residency.restore_scope.cancel()
        keys = sorted(set(residency.swapped.values()))
        residency.swapped.clear()
        self._releaser.release(HOST_COPIES, keys)
        self.signal.notify()

    def host_copies(self) -> int:
        """Pages held in host memory for instances that are swapped out."""
        return sum(r.host_copies() for r in self._residents.values())

    # -- waiting for pages -------------------------------------------------------------------

    async def reclaim(self, count: int, requester: str | None) -> None:
        """The pool's question: `count` more pages for `requester`. Waits until they are free
        (preempting newer instances meanwhile), or raises when they never will be."""
        residency = self._residents.get(requester) if requester is not None else None
        if residency is None:
            return  # the controller's own allocations (restores) never wait here
        target = count + self.pool.free()
        if target > self.pool.capacity:
            return  # it can never fit: the pool refuses it as before
        residency.parked += 1
        try:
            await self._wait_for(Waiter(residency, target, restore=False))
        finally:
            residency.parked -= 1
            self.signal.notify()

    async def _wait_for(self, waiter: Waiter) -> None:
        """Return once `waiter` is the first eligible one and its pages are free."""
        waiter.seq = next(self._seqs)
        self._waiters.append(waiter)
        self.signal.notify()
        try:
            while True:
                if waiter.eligible and self._first() is waiter:
                    if self.pool.free() >= waiter.count:
                        return
                    victim = self._victim(waiter.residency.age)
                    if victim is not None:
                        await self._swap_out(victim)
                        continue
                    self._check_hopeless(waiter)
                waiter.turn = trio.Event()
                await waiter.turn.wait()
        finally:
            self._waiters.remove(waiter)
            self.signal.notify()

    def _wake_first(self) -> None:
        """Something changed: wake the first eligible waiter, the only one that may act.
        (Waking all of them made every change cost O(waiters²) on the trio thread: with a
        thousand instances waiting for pages, the pool barely moved.)"""
        first = self._first()
        if first is not None:
            first.turn.set()

    def _first(self) -> Waiter | None:
        eligible = [w for w in self._waiters if w.eligible]
        return min(eligible, key=lambda w: w.order, default=None)

    def _victim(self, age: int) -> Residency | None:
        """The newest resident instance newer than `age` with pages only it refers to."""
        if self.broken:
            return None
        newer = [r for r in self._residents.values()
                 if r.age > age and r.state is State.RESIDENT and self._movable(r)]
        return max(newer, key=lambda r: r.age, default=None)

    def _movable(self, residency: Residency) -> dict[int, list[int]]:
        """physical page -> the instance's names for it, for every page it alone refers to."""
        names: dict[int, list[int]] = {}
        for vid, page in residency.pages.items():
            names.setdefault(page, []).append(vid)
        return {page: vids for page, vids in names.items()
                if self.pool.exclusive(page, len(vids))}

    def _check_hopeless(self, waiter: Waiter) -> None:
        """Refuse the oldest instance's allocation when no one could ever give pages back:
        nothing to preempt, no swap or release under way, everyone else swapped out or
        waiting for pages itself."""
        me = waiter.residency
        if self._moving or self._releaser.pending[PAGES] or waiter.restore:
            return
        for other in self._residents.values():
            if other is me:
                continue
            if other.age < me.age or (other.state is State.RESIDENT and not other.parked):
                return  # an older instance, or one not waiting, may still free pages
        raise ControlError(f"out of {self.pool.noun}: {waiter.count} requested, "
                           f"{self.pool.free()} free, nothing left to preempt")

    # -- moving pages --------------------------------------------------------------------------

    async def _swap_out(self, victim: Residency) -> None:
        """Suspend `victim` and move its own pages to host memory; a restore follows."""
        victim.state = State.SWAPPING_OUT
        self._moving += 1
        self.signal.notify()
        try:
            try:
                while not (victim.quiet or victim.closed):
                    await self.signal.wait()
            except BaseException:
                if not victim.closed:  # nothing has moved yet: let it go on
                    victim.state = State.RESIDENT
                raise
            if not victim.closed:
                with trio.CancelScope(shield=True):  # once pages move, the books must follow
                    await self._move_out(victim)
        finally:
            self._moving -= 1
            self.signal.notify()

    async def _move_out(self, victim: Residency) -> None:
        movable = self._movable(victim)
        if not movable:
            victim.state = State.RESIDENT
            return
        pages = list(movable)
        keys = [next(self._keys) for _ in pages]
        try:
            with self.pool.pinned(pages):
                moved = await self._executor.submit(SwapOutKv(OWNER, pages, keys))
        except CallError:
            # A runner that cannot swap would fail the same way for every victim: stop trying,
            # so waiters wait for pages (or are refused) instead of spinning on failures.
            logger.exception("swapping out %d pages of %s failed; preemption is off from now",
                             len(pages), victim.instance_id)
            self.broken = True
            self._releaser.release(HOST_COPIES, keys)
            victim.state = State.RESIDENT
            return
        self.swap_bytes += moved
        if victim.closed:  # it ended meanwhile and released its pages itself
            self._releaser.release(HOST_COPIES, keys)
            return
        for page, key in zip(pages, keys, strict=True):
            for vid in movable[page]:
                victim.pages.unmap(vid)
                victim.swapped[vid] = key
            self.pool.unref([page] * len(movable[page]))
        victim.state = State.SWAPPED
        victim.restore_scope = trio.CancelScope()  # a scope serves one restore
        self.preemptions += 1
        assert self.nursery is not None, "the controller runs restores in its nursery"
        self.nursery.start_soon(self._restore, victim)

    async def _restore(self, residency: Residency) -> None:
        """Wait for the pages `residency` had, then bring its host copies back."""
        assert residency.restore_scope is not None  # set when it was swapped out
        with residency.restore_scope:
            await self._wait_for(Waiter(residency, residency.host_copies(), restore=True))
            self._moving += 1
            try:
                with trio.CancelScope(shield=True):
                    await self._move_in(residency)
            finally:
                self._moving -= 1
                self.signal.notify()

    async def _move_in(self, residency: Residency) -> None:
        keys = sorted(set(residency.swapped.values()))
        residency.state = State.RESTORING
        # Free pages suffice (`_wait_for`) and nothing ran since, so this takes them at once.
        pages = await self.pool.allocate(len(keys), tenant=residency.tenant(), quota=False)
        try:
            with self.pool.pinned(pages):
                moved = await self._executor.submit(SwapInKv(OWNER, keys, pages))
        except CallError:
            # The host copies are gone: the instance's swapped names stay unheld, so its next
            # use of one is an error for it alone.
            logger.exception("restoring %d pages of %s failed", len(keys), residency.instance_id)
            self.pool.unref(pages)
            residency.swapped.clear()
            residency.state = State.RESIDENT
            return
        self.swap_bytes += moved
        if residency.closed:
            self.pool.unref(pages)
            return
        self._remap(residency, dict(zip(keys, pages, strict=True)))
        residency.state = State.RESIDENT
        self.restores += 1

    def _remap(self, residency: Residency, page_of: dict[int, int]) -> None:
        """Give every swapped name its page back; a page with several names gets a reference
        each (the allocation gave it one)."""
        named: set[int] = set()
        for vid, key in residency.swapped.items():
            page = page_of[key]
            if page in named:
                self.pool.ref([page])
            named.add(page)
            residency.pages.remap(vid, page)
        residency.swapped.clear()
