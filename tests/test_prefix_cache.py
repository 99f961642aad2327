"""Automatic prefix caching (control/prefix_cache.py) over the real executor and the tiny model:
`prefix_store` and `prefix_match`, a forward after a cached prefix that equals a full prefill,
cached pages that are never written, the bound and the pool's reclaimer evicting least recently
used pages only the cache holds, tenants that never see each other's pages, references that all
come back; and the SDK's `Context::fill_cached` in a guest, whose second run reuses pages and
writes the same greedy text."""

from __future__ import annotations

import sys
from contextlib import asynccontextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest
import test_inferlets_build
import trio
from control_support import error, ok
from test_control import Context, assert_same_dist, prompt, settled
from test_runtime_support import running_stack
from test_strategies import SYSTEM_PROMPT, _report, _run

from pie_trio.control.controller import Controller, ControlLimits, Tenancy
from pie_trio.executor.executor import Executor

built_modules = test_inferlets_build.built_modules  # the build fixture, shared with this module

PAGE = 16  # the tiny model's page size
PYTHON_SDK = Path(__file__).resolve().parent.parent / "inferlets" / "sdk" / "python"


@asynccontextmanager
async def controller_for(runner, limits: ControlLimits | None = None,
                         tenancy: Tenancy | None = None):
    async with trio.open_nursery() as nursery:
        executor = Executor(runner)
        await nursery.start(executor.run)
        controller = Controller(executor, runner.info, runner.tokenizer, limits=limits,
                                tenancy=tenancy)
        await nursery.start(controller.run)
        yield controller
        nursery.cancel_scope.cancel()


class Stats:
    """The controller's stats once every page freed meanwhile is back in the executor."""

    def __init__(self, controller: Controller):
        self.controller = controller

    async def __call__(self) -> dict:
        return await settled(self)


async def prefilled(ctl, tokens: list[int]) -> tuple[Context, dict]:
    """A context holding `tokens`, and the forward's value at the last one."""
    ctx = Context(ctl, PAGE)
    return ctx, await ctx.append(tokens)


async def test_a_stored_prefix_is_matched_and_continues_like_a_full_prefill(tiny_runner):
    tokens = prompt(40)  # two full pages and eight tokens
    async with controller_for(tiny_runner) as controller:
        stats = Stats(controller)
        a = controller.attach("a")
        ctx_a, full = await prefilled(a, tokens)
        assert await ok(a, "prefix_store", tokens=tokens, pages=ctx_a.pages) == 2
        assert await ok(a, "prefix_store", tokens=tokens, pages=ctx_a.pages) == 0
        b = controller.attach("b")
        found = await ok(b, "prefix_match", tokens=tokens)
        assert found["tokens"] == 2 * PAGE and len(found["pages"]) == 2
        ctx_b = Context(b, PAGE, found["pages"], found["tokens"])
        assert_same_dist(await ctx_b.append(tokens[2 * PAGE:]), full)
        # Generation goes on alike from either context.
        token = full["tokens"][0]
        for step_a, step_b in zip(await ctx_a.generate(token, 20), await ctx_b.generate(token, 20),
                                  strict=True):
            assert_same_dist(step_a, step_b)
        now = await stats()
        assert now["prefix_cache_pages"] == 2
        assert (now["prefix_cache_queries"], now["prefix_cache_query_tokens"],
                now["prefix_cache_hit_tokens"]) == (1, 40, 32)
        await a.close()
        await b.close()
        assert (await stats())["pages_in_use"] == 2  # the cache's own
        controller.prefix_cache.clear()
        assert (await stats())["pages_in_use"] == 0


async def test_a_match_leaves_at_least_one_token_to_forward(tiny_runner):
    tokens = prompt(2 * PAGE)
    async with controller_for(tiny_runner) as controller:
        a = controller.attach("a")
        ctx_a, _ = await prefilled(a, tokens)
        assert await ok(a, "prefix_store", tokens=tokens, pages=ctx_a.pages) == 2
        assert (await ok(a, "prefix_match", tokens=tokens))["tokens"] == PAGE
        assert (await ok(a, "prefix_match", tokens=tokens + [5]))["tokens"] == 2 * PAGE
        assert await ok(a, "prefix_match", tokens=[]) == {"pages": [], "tokens": 0}
        # Another prompt shares the first page only: the chain stops at the first miss.
        other = tokens[:PAGE] + [t + 1 for t in tokens[PAGE:]] + [5]
        assert (await ok(a, "prefix_match", tokens=other))["tokens"] == PAGE
        assert (await ok(a, "prefix_match", tokens=[t + 1 for t in tokens]))["tokens"] == 0


async def test_cached_pages_are_never_written(tiny_runner):
    tokens = prompt(40)
    async with controller_for(tiny_runner) as controller:
        a = controller.attach("a")
        ctx_a, full = await prefilled(a, tokens)
        await ok(a, "prefix_store", tokens=tokens, pages=ctx_a.pages)
        # The storing instance overwrites its second page, and a matching one its first:
        # each write copies the page first, so the cache still answers the original KV.
        await ok(a, "forward", pages=ctx_a.pages[:2], last_page_len=PAGE,
                 positions=list(range(PAGE, 2 * PAGE)), tokens=[9] * PAGE)
        b = controller.attach("b")
        found = await ok(b, "prefix_match", tokens=tokens)
        await ok(b, "forward", pages=found["pages"][:1], last_page_len=PAGE,
                 positions=list(range(PAGE)), tokens=[9] * PAGE)
        c = controller.attach("c")
        found = await ok(c, "prefix_match", tokens=tokens)
        ctx_c = Context(c, PAGE, found["pages"], found["tokens"])
        assert_same_dist(await ctx_c.append(tokens[2 * PAGE:]), full)


async def test_tenants_never_share_cached_pages(tiny_runner):
    tokens = prompt(40)
    tenancy = Tenancy(tenant_of=lambda instance_id: instance_id.split(":")[0])
    async with controller_for(tiny_runner, tenancy=tenancy) as controller:
        alice = controller.attach("alice:1")
        ctx, _ = await prefilled(alice, tokens)
        assert await ok(alice, "prefix_store", tokens=tokens, pages=ctx.pages) == 2
        bob = controller.attach("bob:1")
        assert await ok(bob, "prefix_match", tokens=tokens) == {"pages": [], "tokens": 0}
        alice_again = controller.attach("alice:2")
        assert (await ok(alice_again, "prefix_match", tokens=tokens))["tokens"] == 2 * PAGE
        # Bob stores the same prompt: the cache keeps his pages apart from Alice's.
        ctx_bob, _ = await prefilled(bob, tokens)
        assert await ok(bob, "prefix_store", tokens=tokens, pages=ctx_bob.pages) == 2
        assert len(controller.prefix_cache) == 4


async def test_the_pool_evicts_least_recently_used_pages_only_the_cache_holds(tiny_runner):
    capacity = tiny_runner.info.num_pages
    first, second = prompt(4 * PAGE + 1), [t + 1 for t in prompt(4 * PAGE + 1)]
    async with controller_for(tiny_runner) as controller:
        stats = Stats(controller)
        for name, tokens in (("a", first), ("b", second)):
            ctl = controller.attach(name)
            ctx, _ = await prefilled(ctl, tokens)
            assert await ok(ctl, "prefix_store", tokens=tokens, pages=ctx.pages) == 4
            await ctl.close()
        assert (await stats())["pages_in_use"] == 8
        # `second` is in use while the pool runs short: only `first`'s pages can go.
        user = controller.attach("user")
        assert (await ok(user, "prefix_match", tokens=second))["tokens"] == 4 * PAGE
        hog = controller.attach("hog")
        held = await ok(hog, "alloc_pages", count=capacity - 8 + 2)
        assert len(controller.prefix_cache) == 6
        assert (await ok(user, "prefix_match", tokens=first))["tokens"] == 2 * PAGE
        await ok(user, "free_pages", pages=[4, 5])  # the two pages of `first` just matched
        held += await ok(hog, "alloc_pages", count=2)
        assert len(controller.prefix_cache) == 4
        assert "out of KV pages" in await error(hog, "alloc_pages", count=1)
        await hog.close()
        await user.close()
        assert (await stats())["pages_in_use"] == 4
        assert (await ok(controller.attach("late"), "prefix_match",
                         tokens=second))["tokens"] == 4 * PAGE


async def test_a_tenant_at_its_quota_gives_up_its_cached_pages_first(tiny_runner):
    tokens = prompt(4 * PAGE + 1)
    tenancy = Tenancy(tenant_of=lambda instance_id: instance_id.split(":")[0], page_quota=8)
    async with controller_for(tiny_runner, tenancy=tenancy) as controller:
        stats = Stats(controller)
        alice = controller.attach("alice:1")
        ctx, _ = await prefilled(alice, tokens)
        assert await ok(alice, "prefix_store", tokens=tokens, pages=ctx.pages) == 4
        await alice.close()
        assert len(controller.prefix_cache) == 4
        # Only the cache holds Alice's 4 pages: her quota of 8 still lets her take 8 now.
        again = controller.attach("alice:2")
        assert len(await ok(again, "alloc_pages", count=8)) == 8
        assert len(controller.prefix_cache) == 0
        assert "quota of 8" in await error(again, "alloc_pages", count=1)
        await again.close()
        assert (await stats())["pages_in_use"] == 0


async def test_the_bound_replaces_least_recently_used_pages(tiny_runner):
    limits = ControlLimits(prefix_cache_pages=3)
    prompts = [prompt(3 * PAGE + 1), [t + 1 for t in prompt(3 * PAGE + 1)]]
    async with controller_for(tiny_runner, limits=limits) as controller:
        stats = Stats(controller)
        keeper = controller.attach("keeper")
        ctx, _ = await prefilled(keeper, prompts[0])
        assert await ok(keeper, "prefix_store", tokens=prompts[0], pages=ctx.pages) == 3
        # Every cached page is in use by `keeper`: nothing is replaced, nothing more cached.
        other = controller.attach("other")
        ctx_other, _ = await prefilled(other, prompts[1])
        assert await ok(other, "prefix_store", tokens=prompts[1], pages=ctx_other.pages) == 0
        await keeper.close()
        assert await ok(other, "prefix_store", tokens=prompts[1], pages=ctx_other.pages) == 3
        assert (await ok(other, "prefix_match", tokens=prompts[0]))["tokens"] == 0
        await other.close()
        assert (await stats())["pages_in_use"] == 3


async def test_the_cache_can_be_switched_off(tiny_runner):
    tokens = prompt(40)
    async with controller_for(tiny_runner, ControlLimits(prefix_cache=False)) as controller:
        a = controller.attach("a")
        ctx, _ = await prefilled(a, tokens)
        assert await ok(a, "prefix_store", tokens=tokens, pages=ctx.pages) == 0
        assert await ok(a, "prefix_match", tokens=tokens) == {"pages": [], "tokens": 0}
        await a.close()
        assert (await Stats(controller)())["pages_in_use"] == 0


async def test_bad_requests_are_refused(tiny_runner):
    tokens = prompt(40)
    async with controller_for(tiny_runner) as controller:
        a = controller.attach("a")
        ctx, _ = await prefilled(a, tokens)
        assert "between 0 and" in await error(a, "prefix_match", tokens=[-1] + tokens)
        assert "only 1 pages" in await error(a, "prefix_store", tokens=tokens,
                                             pages=ctx.pages[:1])
        assert "not held" in await error(a, "prefix_store", tokens=tokens, pages=[99, 100])
        assert "unknown field" in await error(a, "prefix_match", tokens=tokens, pages=[])
        assert len(controller.prefix_cache) == 0


# -- the SDKs: fill_cached ------------------------------------------------------------------

def python_sdk_context(monkeypatch, ctl):
    """The Python SDK's `Context` class, its host requests answered by `ctl` directly (the
    SDK's logic is plain Python; only its transport needs a component)."""
    monkeypatch.syspath_prepend(str(PYTHON_SDK))
    for name in [name for name in sys.modules if name.split(".")[0] == "inferlet"]:
        monkeypatch.delitem(sys.modules, name)
    import inferlet.context

    async def request(op: str, **fields):
        return await ok(ctl, op, **fields)

    monkeypatch.setattr(inferlet.context, "request", request)
    return inferlet.context.Context


async def test_python_sdk_fill_cached_reuses_the_stored_pages(tiny_runner, monkeypatch):
    tokens = prompt(3 * PAGE + 5)
    async with controller_for(tiny_runner) as controller:
        ctl = controller.attach("a")
        context_class = python_sdk_context(monkeypatch, ctl)
        model = SimpleNamespace(page_size=PAGE)
        queue = SimpleNamespace(id=0)
        first, second = context_class(model, queue), context_class(model, queue)
        assert await first.fill_cached(tokens) == 0
        assert len(controller.prefix_cache) == 3
        assert await second.fill_cached(tokens) == 3 * PAGE
        assert len(second.pages) == 4  # three shared, one prefilled
        assert [t for t, _, _ in second.kv] == tokens[:-1]
        assert second.pending == [(tokens[-1], len(tokens) - 1, False)]
        dists = [await ctx.next_dist(8) for ctx in (first, second)]
        assert dists[0][0][0] == dists[1][0][0]
        assert dists[0][1][0] == pytest.approx(dists[1][1][0], rel=1e-3, abs=1e-5)
        with pytest.raises(ValueError, match="empty context"):
            await first.fill_cached(tokens)


# -- the Rust SDK: Context::fill_cached in a guest -------------------------------------------

async def test_fill_cached_reuses_pages_and_writes_the_same_text(tiny_runner, built_modules):
    args = ["--prefix", SYSTEM_PROMPT, "--max-tokens", 16, "--ignore-eos"]
    question = "Question: when do you open on Saturday?"
    async with running_stack(tiny_runner) as stack:
        alone = await _run(stack, built_modules, "prefix-caching", *args, "--no-cache", question)
        first = await _run(stack, built_modules, "prefix-caching", *args, "--auto", question)
        second = await _run(stack, built_modules, "prefix-caching", *args, "--auto", question)
        stats = stack.controller.stats()
    reports = [_report(outcome) for outcome in (first, second)]
    assert first.return_value == second.return_value == alone.return_value
    assert reports[0]["reused"] == 0
    prompt_tokens = reports[0]["prefilled"]
    full_pages = (prompt_tokens - 1) // PAGE
    assert reports[1]["reused"] == full_pages * PAGE and full_pages >= 8
    assert reports[1]["prefilled"] == prompt_tokens - full_pages * PAGE
    assert stats["prefix_cache_hit_tokens"] == full_pages * PAGE
    assert stats["prefix_cache_query_tokens"] == 2 * prompt_tokens
