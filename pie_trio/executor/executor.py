"""The executor: one trio task that owns the model runner and its page and slot pools.

Callers `await executor.submit(call, priority)` from any task (or `executor.enqueue` several
calls in order and await each `request.wait()`). The executor answers each with the call's
result or a `CallError` for that caller alone. Its state is one actor's, touched only on the
trio thread:

- intake (`enqueue`, in the caller's task: a hop through a task of its own would cost every
  call a pass of trio's loop): answers allocations and frees at once (bookkeeping only, even
  while a forward is running), validates the rest (`runner.check` + ownership) so that a bad
  call fails alone, queues the good ones and wakes the scheduler;
- scheduler (the task `Executor.run` runs): once per tick, plans the queued calls into
  same-kind groups (the swaps, embed, copy_kv, mask_kv, then forward), runs the whole plan in
  the executor's own worker thread (worker.py), and resolves every caller.

Order between calls. Calls that are pending at the same time are concurrent: a caller that
needs one call done before the next awaits the first. Still, a guest or the control layer may
legitimately have several calls in flight (a copy_kv and the forward that reads it, two forked
contexts, a cancelled forward and the free that follows it), so the planner keeps the arrival
order of any two calls that touch the same page or slot where one of them writes it: a call
runs in this tick only if it conflicts with no earlier call that waits for a later tick, nor
with an earlier call placed in the same or a later group of this tick. Reads never conflict
with reads, so forks sharing a prefix still batch together. Within a tick the groups run in the
order swap_out_kv, swap_in_kv, drop_swapped_kv, embed, copy_kv, mask_kv, forward: a forward
usually reads what the others prepare. A swap out reads its pages and a swap in writes them, so
they are ordered against every other call on those pages like a copy; the control layer awaits
a swap out before it swaps the same host copies back in, so keys need no ordering here.

Frees are answered at once and never wait for queued calls: a queued call that names a page its
owner no longer holds fails when it is planned (ownership is checked again then). A call already
running in the worker thread finishes first, before any later allocation of its pages is used.

Isolation: pages and embedding slots are reused across owners, so every id handed out is
wiped (`runner.clear`) at the start of the next tick, before any call can read it; the tick
that follows an allocation necessarily precedes the first use of the allocated ids.

Shutdown: cancel the scope running `Executor.run`. The worker thread cannot be interrupted, so
a forward in flight finishes first; then every call still waiting fails with `CallError`.
"""

from __future__ import annotations

import functools
import logging
import math
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import count
from typing import overload

import outcome
import trio

from pie_trio.executor.policies import BatchPolicy, make_policy
from pie_trio.executor.pool import IdPool
from pie_trio.executor.worker import Worker
from pie_trio.model.calls import (
    BATCHED_KINDS,
    AllocPages,
    AllocSlots,
    Call,
    CallError,
    CallResult,
    CopyKv,
    DropSwappedKv,
    Embed,
    Forward,
    ForwardResult,
    FreePages,
    FreeSlots,
    MaskKv,
    SwapInKv,
    SwapOutKv,
)
from pie_trio.model.interface import Runner

log = logging.getLogger(__name__)

# Group order within one tick (see the module docstring for why forward comes last).
STAGES = ("swap_out_kv", "swap_in_kv", "drop_swapped_kv", "embed", "copy_kv", "mask_kv",
          "forward")
STAGE_OF = {kind: i for i, kind in enumerate(STAGES)}

RECENT_BATCHES = 256  # forward batches kept in `stats.recent_forwards` for inspection
# After answering its callers a tick waits for their next calls (see _settle): until every one
# is back, or no call has arrived for a quiet gap (SETTLE_QUIET_SHARE of the time the batch took,
# at least SETTLE_QUIET_MIN seconds), or SETTLE_SHARE of that time has passed, whichever comes
# first. Shares, not fixed times, because guests come back more slowly on a loaded machine, and
# the wait must stay small beside the batch it follows.
SETTLE_QUIET_MIN = 0.002
SETTLE_QUIET_SHARE = 0.1
SETTLE_SHARE = 0.25
# How long the first batch after idling waits for callers on their way (_gather): while one was
# announced by `expect_callers`, or arrived while others were still expected, less than
# GATHER_MAX ago (a burst still coming in), and never past GATHER_CAP in all; and how long after
# the latest announcement more are still looked for once every announced one is in. 32 launches
# at once on a 2-core CPU announce themselves within 5 ms and send their first forwards 12-46 ms
# later, at most 15 ms apart; on a busy stretch the last came past 50 ms, and a bound counted
# from the announcements alone sent 8 of the 32 prompts alone, a step ahead to their end.
GATHER_MAX = 0.05
GATHER_CAP = 0.25
GATHER_QUIET = 0.002


@dataclass(eq=False)
class Request:
    """One caller's call on its way through the executor, and where its answer goes."""

    call: Call  # unless an untyped caller sent something malformed (which then fails)
    priority: int = 0
    done: trio.Event = field(default_factory=trio.Event)
    result: outcome.Outcome[CallResult] | None = None
    abandoned: bool = False  # the caller was cancelled: skip the work, drop the answer
    seq: int = 0  # arrival order, set when admitted
    arrival: float = 0.0  # trio time of admission (for the `t` policies)
    reads: frozenset[int] = frozenset()  # pages as p, slots as ~s (negative)
    writes: frozenset[int] = frozenset()
    on_done: Callable[[outcome.Outcome[CallResult]], None] | None = None  # see `then`

    async def wait(self) -> CallResult:
        """The call's result, or its `CallError`. Cancelling the wait abandons the call."""
        try:
            await self.done.wait()
        except BaseException:
            self.abandoned = True  # the executor skips it if queued, drops its answer if not
            raise
        assert self.result is not None
        return self.result.unwrap()

    def then(self, on_done: Callable[[outcome.Outcome[CallResult]], None]) -> None:
        """Call `on_done(result)` on the trio thread once the call is answered (at once if it
        already is): a caller with no task of its own to wait in. It is not called for a call
        abandoned (`abandon`) before its answer."""
        if self.result is not None:
            on_done(self.result)
        else:
            self.on_done = on_done

    def abandon(self) -> None:
        """Give the call up without waiting: skipped if still queued, its answer dropped."""
        self.abandoned = True
        self.on_done = None

    def resolve(self, result: outcome.Outcome[CallResult]) -> None:
        if self.result is None:
            self.result = result
            self.done.set()
            on_done, self.on_done = self.on_done, None
            if on_done is not None:
                try:
                    on_done(result)
                except Exception:  # a caller's bug must not stop the executor's other answers
                    log.exception("a call's completion callback failed")


@dataclass(frozen=True)
class ForwardRecord:
    """What one forward batch carried: its callers' owners and priorities, and its tokens."""

    owners: tuple[str, ...]
    priorities: tuple[int, ...]
    tokens: int


@dataclass
class ExecutorStats:
    ticks: int = 0  # plans run in the worker thread
    settle_seconds: float = 0.0  # from ticks' ends to the next plan: answering, then _settle
    tick_seconds: float = 0.0  # spent running plans in the worker thread, timed on the trio thread
    calls: Counter[str] = field(default_factory=Counter)  # submitted, per kind
    failed: Counter[str] = field(default_factory=Counter)  # answered with CallError, per kind
    batches: Counter[str] = field(default_factory=Counter)  # batched runner calls, per kind
    forward_calls: Counter[int] = field(default_factory=Counter)  # batch size (calls) -> count
    forward_tokens: Counter[int] = field(default_factory=Counter)  # bucket (tokens) -> count
    recent_forwards: deque[ForwardRecord] = field(
        default_factory=lambda: deque(maxlen=RECENT_BATCHES)
    )

    def record_forward(self, requests: list[Request]) -> None:
        tokens = sum(num_tokens(r.call) for r in requests)
        self.forward_calls[len(requests)] += 1
        self.forward_tokens[token_bucket(tokens)] += 1
        self.recent_forwards.append(
            ForwardRecord(
                owners=tuple(r.call.owner for r in requests),
                priorities=tuple(r.priority for r in requests),
                tokens=tokens,
            )
        )

    def as_dict(self) -> dict[str, object]:
        return {
            "ticks": self.ticks,
            "settle_seconds": round(self.settle_seconds, 6),
            "tick_seconds": round(self.tick_seconds, 6),
            "calls": dict(self.calls),
            "failed": dict(self.failed),
            "batches": dict(self.batches),
            "forward_calls": dict(sorted(self.forward_calls.items())),
            "forward_tokens": dict(sorted(self.forward_tokens.items())),
        }


def token_bucket(tokens: int) -> int:
    """The power of two at or above `tokens`: histogram buckets for forward batch sizes."""
    return 1 << max(0, tokens - 1).bit_length()


def num_tokens(call: Call) -> int:
    """The input tokens of a forward: what the token budget counts (other calls: none)."""
    if not isinstance(call, Forward):
        return 0
    return len(call.tokens if call.tokens is not None else call.embed_slots or [])


def hazards(call: Call, page_size: int) -> tuple[frozenset[int], frozenset[int]]:
    """The pages and slots a validated batched call reads and writes (slots as ~id)."""
    if isinstance(call, Forward):
        ctx_len = (len(call.kv_pages) - 1) * page_size + call.last_page_len
        first_written = max(0, ctx_len - num_tokens(call)) // page_size
        slots = {~s for s in call.embed_slots or []}
        return frozenset(call.kv_pages) | slots, frozenset(call.kv_pages[first_written:])
    if isinstance(call, Embed):
        return frozenset(), frozenset(~s for s in call.slots)
    if isinstance(call, CopyKv):
        return frozenset({call.src_page}), frozenset({call.dst_page})
    if isinstance(call, MaskKv):
        return frozenset(), frozenset({call.page})
    if isinstance(call, SwapOutKv):
        return frozenset(call.pages), frozenset()
    if isinstance(call, SwapInKv):
        return frozenset(), frozenset(call.pages)
    if isinstance(call, DropSwappedKv):
        return frozenset(), frozenset()
    raise TypeError(f"not a batched call: {call!r}")


class _Footprint:
    """The union of the pages and slots that a set of calls reads and writes."""

    def __init__(self) -> None:
        self.reads: set[int] = set()
        self.writes: set[int] = set()

    def add(self, request: Request) -> None:
        self.reads |= request.reads
        self.writes |= request.writes

    def conflicts(self, request: Request) -> bool:
        return not (
            self.writes.isdisjoint(request.reads)
            and self.writes.isdisjoint(request.writes)
            and self.reads.isdisjoint(request.writes)
        )


Plan = list[tuple[str, list[Request]]]


class Executor:
    """Coalesces the calls of all callers into one batched runner call per kind per tick."""

    def __init__(
        self,
        runner: Runner,
        policy: str | BatchPolicy = "adaptive",
        *,
        k: int = 8,
        t: float = 0.005,
        max_batch_tokens: int = 4096,
    ) -> None:
        if max_batch_tokens < 1:
            raise ValueError(f"max_batch_tokens must be >= 1, got {max_batch_tokens}")
        self.runner = runner
        self.info = runner.info
        self.policy = make_policy(policy, k=k, t=t) if isinstance(policy, str) else policy
        self.max_batch_tokens = max_batch_tokens
        self.pages = IdPool(self.info.num_pages, "page")
        self.slots = IdPool(self.info.num_slots, "slot")
        self.stats = ExecutorStats()
        self._early: list[Request] | None = []  # enqueued before `run`; None once running
        self._stopped = False
        self._pending: list[Request] = []  # admitted batched calls, in arrival order
        self._in_flight: list[Request] = []
        # Ids allocated since the last tick began, wiped before that tick's calls run.
        self._fresh_pages: set[int] = set()
        self._fresh_slots: set[int] = set()
        self._seq = count()
        self._admitted = 0  # batched calls admitted so far (see _settle)
        self._last_arrival = -math.inf  # trio time of the latest admission
        self._arrived = trio.Event()
        # Arrivals wake the scheduler once this many calls have been admitted: 0 (every one)
        # unless a settle waits for a known number of them (_settle).
        self._wake_at = 0
        self._forward_deadline = math.inf  # when the policy fires for the forwards now waiting
        self._expected = 0  # callers on their way to their first forward (expect_callers)
        self._expected_at = -math.inf  # trio time of the latest one announced
        self._announced = 0  # callers announced less than GATHER_MAX apart, in a row
        self._all_arrived = trio.Event()  # set when _expected drops to 0
        # The runner is only ever called from this one thread, one plan at a time.
        self._worker = Worker("pie-trio executor")
        self._started = False

    # ---- callers -------------------------------------------------------------------------

    @overload
    async def submit(self, call: AllocPages | AllocSlots, priority: int = 0) -> list[int]: ...
    @overload
    async def submit(self, call: Forward, priority: int = 0) -> ForwardResult: ...
    @overload
    async def submit(self, call: SwapOutKv | SwapInKv, priority: int = 0) -> int: ...
    @overload
    async def submit(
        self, call: FreePages | FreeSlots | Embed | CopyKv | MaskKv | DropSwappedKv,
        priority: int = 0,
    ) -> None: ...
    @overload
    async def submit(self, call: Call, priority: int = 0) -> CallResult: ...

    async def submit(self, call: Call, priority: int = 0) -> CallResult:
        """Run `call`; return its result or raise `CallError` (for this caller only).

        The result's type follows the call's: the ids of an allocation, a `ForwardResult` for
        a forward, the bytes a swap moved, None for the rest.
        """
        return await self.enqueue(call, priority).wait()

    def enqueue(self, call: Call, priority: int = 0) -> Request:
        """Queue `call` now, without waiting; `await request.wait()` for its result.

        Calls enqueued one after another arrive in that order, which is what lets one caller
        keep several dependent calls in flight (see "Order between calls" in the module docstring).
        """
        if self._stopped:
            raise CallError("the executor is not running")
        request = Request(call, priority)
        if self._early is not None:
            self._early.append(request)
        else:
            self._admit(request)
            if self._admitted >= self._wake_at:
                self._arrived.set()
        return request

    def expect_callers(self, delta: int) -> None:
        """`delta` more callers are on their way to their first forward (negative: that many
        arrived, or will not come). See `_gather`."""
        self._expected = max(0, self._expected + delta)
        now = trio.current_time()
        if delta > 0:
            if now - self._expected_at > GATHER_MAX:
                self._announced = 0
            self._announced += delta
            self._expected_at = now
        elif self._expected > 0 and now - self._expected_at <= GATHER_MAX:
            self._expected_at = now  # one of a burst arrived: the rest are still coming in
        if self._expected == 0:
            self._all_arrived.set()

    @property
    def expected_callers(self) -> int:
        """Callers announced by `expect_callers` and not arrived yet."""
        return self._expected

    @property
    def queued(self) -> int:
        """Batched calls admitted and waiting to be planned (not counting the one running)."""
        return len(self._pending)

    # ---- the executor task -----------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve calls until cancelled. Start it with `await nursery.start(executor.run)`."""
        if self._started:
            raise RuntimeError("an Executor runs once")
        self._started = True
        self._worker.start()
        try:
            early, self._early = self._early or [], None
            for request in early:
                self._admit(request)
            task_status.started()
            await self._schedule()
        finally:
            self._shut_down()

    def _shut_down(self) -> None:
        self._stopped = True
        self._worker.stop()
        for request in self._in_flight + self._pending:
            request.resolve(outcome.Error(CallError("the executor stopped")))
        self._in_flight, self._pending = [], []

    def _admit(self, request: Request) -> None:
        call = request.call
        kind = getattr(call, "kind", type(call).__name__)
        self.stats.calls[kind] += 1
        if request.abandoned:  # cancelled before we saw it: no allocation nobody would free
            return
        try:
            if not isinstance(getattr(call, "owner", None), str):
                raise CallError(f"a {kind} call needs an owner string")
            if kind not in BATCHED_KINDS:
                request.resolve(outcome.Value(self._bookkeep(call)))
                return
            self._validate(call)
            request.reads, request.writes = hazards(call, self.info.page_size)
        except CallError as exc:
            self._fail(request, exc)
            return
        except Exception as exc:  # malformed fields, e.g. a string where ids belong
            self._fail(request, CallError(f"invalid {kind} call: {exc!r}"))
            return
        self._admitted += 1
        request.seq = next(self._seq)
        request.arrival = self._last_arrival = trio.current_time()
        self._pending.append(request)

    def _bookkeep(self, call: Call) -> list[int] | None:
        """Allocations and frees: answered at once, no model work."""
        match call:
            case AllocPages():
                pages = self.pages.alloc(call.owner, call.count)
                self._fresh_pages.update(pages)
                return pages
            case FreePages():
                self.pages.free(call.owner, call.pages)
            case AllocSlots():
                slots = self.slots.alloc(call.owner, call.count)
                self._fresh_slots.update(slots)
                return slots
            case FreeSlots():
                self.slots.free(call.owner, call.slots)
            case other:
                raise CallError(f"unknown call kind {getattr(other, 'kind', None)!r}")
        return None

    def _validate(self, call: Call) -> None:
        try:
            self.runner.check(call)
        except CallError:
            raise
        except Exception as exc:  # malformed fields the runner choked on, e.g. a str for a list
            raise CallError(f"invalid {call.kind} call: {exc!r}") from None
        self._check_ownership(call)

    def _check_ownership(self, call: Call) -> None:
        if isinstance(call, Forward):
            self.pages.check(call.owner, call.kv_pages)
            self.slots.check(call.owner, call.embed_slots or [])
        elif isinstance(call, Embed):
            self.slots.check(call.owner, call.slots)
        elif isinstance(call, CopyKv):
            self.pages.check(call.owner, [call.src_page, call.dst_page])
        elif isinstance(call, MaskKv):
            self.pages.check(call.owner, [call.page])
        elif isinstance(call, SwapOutKv | SwapInKv):
            if len(call.pages) != len(call.keys):
                raise CallError(f"{call.kind}: {len(call.pages)} pages but {len(call.keys)} keys")
            self.pages.check(call.owner, call.pages)

    def _fail(self, request: Request, exc: CallError) -> None:
        self.stats.failed[getattr(request.call, "kind", "?")] += 1
        request.resolve(outcome.Error(exc))

    async def _schedule(self) -> None:
        while True:
            self._arrived = trio.Event()  # set by any arrival after this point
            plan = self._plan(trio.current_time())
            if not plan:
                with trio.move_on_at(self._forward_deadline):
                    await self._arrived.wait()
                if self.policy.gathers_bursts:
                    await self._gather()
                continue
            self.stats.ticks += 1
            self._in_flight = [r for _, group in plan for r in group]
            work = [(kind, [r.call for r in group]) for kind, group in plan]
            fresh = (sorted(self._fresh_pages), sorted(self._fresh_slots))
            self._fresh_pages, self._fresh_slots = set(), set()
            started = trio.current_time()
            results = await self._worker.run(functools.partial(self._execute, fresh, work))
            ended = trio.current_time()
            took = ended - started
            self.stats.tick_seconds += took
            # Callers may submit again while they are answered (a chained request starts from
            # its predecessor's answer): those arrivals count towards the settle's target.
            target = self._admitted + len(self._in_flight)
            self._in_flight = []
            self._resolve(plan, results)
            await self._settle(target, took)
            self.stats.settle_seconds += trio.current_time() - ended

    async def _settle(self, target: int, took: float) -> None:
        """Give the callers just answered the time to submit their next calls.

        Planning at once would split the callers into two groups that then alternate forever,
        each forward half full. An inferlet answered now needs its guest thread to run before it
        submits again, and with many guests sharing the GIL and few cores they come back one
        after another over milliseconds, so counting scheduling passes is too short. The wait
        ends as soon as every answered caller is back; a pause in arrivals (a caller that is
        not coming back soon: it finished, or it is talking to its client) ends it early, and it
        never exceeds a share of the batch it follows, so a lone caller loses nothing.

        Arrivals do not wake this task one by one (32 wake-ups a step at 32 streams, each a
        pass of trio's loop on the thread the callers need): only the last expected one does,
        and a quiet gap is found by looking at the time of the latest arrival when it expires.
        """
        now = started = trio.current_time()
        deadline = now + SETTLE_SHARE * took
        quiet = max(SETTLE_QUIET_MIN, SETTLE_QUIET_SHARE * took)
        self._wake_at = target
        try:
            while self._admitted < target and now < deadline:
                self._arrived = trio.Event()
                quiet_until = max(started, self._last_arrival) + quiet
                if quiet_until <= now:
                    return
                with trio.move_on_at(min(deadline, quiet_until)):
                    await self._arrived.wait()
                now = trio.current_time()
        finally:
            self._wake_at = 0

    async def _gather(self) -> None:
        """After idling, with a forward waiting: wait for the callers on their way, as long as
        the latest of them was announced or arrived less than GATHER_MAX ago, at most
        GATHER_CAP in all.

        A burst of launches reaches the executor over tens of milliseconds. Firing at the first
        forward sends one or two prompts alone, the rest go in the next tick, and the first
        sequences stay a step ahead to their end: the burst takes a step or two more than it
        needs. A lone caller never waits here: it is no longer expected once it has arrived.
        """
        give_up = trio.current_time() + GATHER_CAP
        while any(isinstance(r.call, Forward) for r in self._pending):
            now = trio.current_time()
            deadline = min(give_up, self._expected_at + GATHER_MAX)
            if now >= deadline:
                return
            if self._expected == 0:
                # Every one announced is in. Of a burst (several announced), more may follow
                # in a moment: launches still under way announce themselves one by one.
                if self._announced < 2 or now >= self._expected_at + GATHER_QUIET:
                    return
                await trio.sleep_until(self._expected_at + GATHER_QUIET)
                continue
            self._all_arrived = trio.Event()
            with trio.move_on_at(deadline):
                await self._all_arrived.wait()

    # ---- planning (trio thread) --------------------------------------------------------------

    def _plan(self, now: float) -> Plan:
        """Take the calls that may run this tick out of the queue, grouped by kind."""
        groups: dict[str, list[Request]] = {kind: [] for kind in STAGES}
        placed = [_Footprint() for _ in STAGES]
        deferred = _Footprint()
        waiting: list[Request] = []
        for request in self._pending:
            if request.abandoned:
                continue
            try:
                self._check_ownership(request.call)  # a free may have come in meanwhile
            except CallError as exc:
                self._fail(request, exc)
                continue
            stage = STAGE_OF[request.call.kind]
            if deferred.conflicts(request) or any(p.conflicts(request) for p in placed[stage:]):
                deferred.add(request)
                waiting.append(request)
                continue
            placed[stage].add(request)
            groups[request.call.kind].append(request)

        # Forward candidates are pairwise independent, and every later call touching one of
        # them was deferred above, so leaving some of them for the next tick is always safe.
        candidates = groups["forward"]
        groups["forward"] = self._pick_forwards(candidates, now)
        picked = set(map(id, groups["forward"]))
        left = [r for r in candidates if id(r) not in picked]
        self._forward_deadline = (
            self.policy.deadline(min(r.arrival for r in left)) if left else math.inf
        )
        if self._forward_deadline <= now:
            self._forward_deadline = math.inf  # the budget, not the policy, held them back
        self._pending = sorted(waiting + left, key=lambda r: r.seq)
        return [(kind, groups[kind]) for kind in STAGES if groups[kind]]

    def _pick_forwards(self, candidates: list[Request], now: float) -> list[Request]:
        """The forwards that fire now: by priority then arrival, up to the token budget."""
        if not candidates:
            return []
        oldest = min(r.arrival for r in candidates)
        if not self.policy.should_fire(len(candidates), oldest, now):
            return []
        picked: list[Request] = []
        tokens = 0
        for request in sorted(candidates, key=lambda r: (-r.priority, r.seq)):
            size = num_tokens(request.call)
            if picked and tokens + size > self.max_batch_tokens:
                break  # strict order: a large call is not overtaken by smaller later ones
            picked.append(request)
            tokens += size
        picked.sort(key=lambda r: r.seq)
        return picked

    # ---- running (worker thread) -------------------------------------------------------------

    def _execute(
        self, fresh: tuple[list[int], list[int]], work: list[tuple[str, list[Call]]]
    ) -> list[list[outcome.Outcome[CallResult]]]:
        if fresh[0] or fresh[1]:
            self.runner.clear(*fresh)
        return [self._run_group(kind, calls) for kind, calls in work]

    def _run_group(self, kind: str, calls: list[Call]) -> list[outcome.Outcome[CallResult]]:
        try:
            # The runner's batched methods are named after the kinds (see model/interface.py).
            results = getattr(self.runner, kind)(calls)
        except Exception as exc:
            if len(calls) == 1:
                return [outcome.Error(_as_call_error(kind, exc))]
            # Only the culprit should fail: rerun the members alone. Rerunning is safe because
            # every batched kind is idempotent (a forward rewrites the same KV rows).
            log.warning("a batched %s of %d calls failed (%r); running them one by one",
                        kind, len(calls), exc)
            return [self._run_group(kind, [call])[0] for call in calls]
        if results is None:
            results = [None] * len(calls)
        if len(results) != len(calls):
            error = CallError(f"{kind}: the runner answered {len(results)} of {len(calls)} calls")
            return [outcome.Error(error) for _ in calls]
        return [outcome.Value(result) for result in results]

    # ---- resolving (trio thread) ---------------------------------------------------------------

    def _resolve(self, plan: Plan, results: list[list[outcome.Outcome[CallResult]]]) -> None:
        for (kind, group), outcomes in zip(plan, results, strict=True):
            self.stats.batches[kind] += 1
            if kind == "forward":
                self.stats.record_forward(group)
            for request, result in zip(group, outcomes, strict=True):
                if isinstance(result, outcome.Error):
                    self.stats.failed[kind] += 1
                request.resolve(result)


def _as_call_error(kind: str, exc: Exception) -> CallError:
    if isinstance(exc, CallError):
        return exc
    log.error("%s failed", kind, exc_info=exc)
    return CallError(f"{kind} failed: {type(exc).__name__}: {exc}")
