"""The strategy inferlets (docs/strategies.md) on the real runtime stack: speculative decoding
is greedy decoding in fewer forwards, attention sinks keep generation under a KV page budget,
a cached prefix is prefilled once and shared by page, and skeleton-of-thought expands its points
in forks that share pages and forward batches.

Page counts come from the executor's page pool (`PageMeter`), batches from the executor's
`stats.recent_forwards`; the guests' own reports (a JSON line on stdout) are checked against
them. The modules come from the build fixture of test_inferlets_build (skipped without the
Debian toolchain). Equality with greedy decoding on the real model runs in fp32: in bf16 a
forward over several tokens rounds differently from one token at a time, which can flip a
near-tie (see docs/strategies.md).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import test_inferlets_build
from conftest import load_real_runner
from test_runtime_support import Outcome, Stack, finish, running_stack

from pie_trio.executor.policies import make_policy

built_modules = test_inferlets_build.built_modules  # the build fixture, shared with this module


class PageMeter:
    """Counts the executor's page allocations and the most pages in use at once."""

    def __init__(self, stack: Stack) -> None:
        self.pool = stack.executor.pages
        self.allocated = 0
        self.peak = 0
        allocate = self.pool.alloc

        def counting_alloc(owner: str, count: int) -> list[int]:
            ids = allocate(owner, count)
            self.allocated += count
            self.peak = max(self.peak, self.pool.num_used)
            return ids

        self.pool.alloc = counting_alloc

    def reset(self) -> None:
        self.allocated = 0
        self.peak = self.pool.num_used


async def _run(stack: Stack, modules: dict[str, Path], name: str, *args) -> Outcome:
    program = stack.runtime.programs.add(modules[name].read_bytes())
    outcome = await finish(await stack.launch(program, *args))
    assert outcome.reason == "finished", outcome.text("stderr") or outcome.detail
    return outcome


def _messages(outcome: Outcome) -> list[str]:
    return [event["message"] for event in outcome.events if event["event"] == "message"]


def _report(outcome: Outcome) -> dict:
    """The guest's JSON report: the last line of its stdout."""
    return json.loads(outcome.text("stdout").strip().splitlines()[-1])


# --- speculative decoding --------------------------------------------------------------------

COPY_PROMPT = ("Repeat this text exactly: The quick brown fox jumps over the lazy dog. "
               "The quick brown fox jumps over the lazy dog.")
CODE_PROMPT = ("def add(a, b):\n    return a + b\n\n"
               "def sub(a, b):\n    return a - b\n\n"
               "def mul(a, b):")


async def _greedy_pair(stack, modules, *args) -> tuple[Outcome, Outcome]:
    plain = await _run(stack, modules, "text-completion", *args)
    speculative = await _run(stack, modules, "speculative-decoding", *args)
    return plain, speculative


async def test_speculative_decoding_is_greedy_decoding(tiny_runner, built_modules):
    async with running_stack(tiny_runner) as stack:
        plain, speculative = await _greedy_pair(stack, built_modules, "--max-tokens", 40,
                                                "--ignore-eos", "--prompt", CODE_PROMPT)
        stats = stack.controller.stats()
    assert speculative.return_value == plain.return_value
    assert speculative.text("message") == speculative.return_value
    report = _report(speculative)
    assert report["tokens"] == 40 and report["forwards"] <= 40
    assert report["tokens_per_forward"] == pytest.approx(40 / report["forwards"], abs=1e-3)
    assert stats["pages_in_use"] == 0


@pytest.mark.slow
async def test_speculative_decoding_accepts_drafts_on_the_real_model(built_modules):
    """Token for token the text-completion inferlet's greedy output, with several tokens per
    forward where the output copies the prompt."""
    runner = load_real_runner("fp32")
    reports = {}
    async with running_stack(runner) as stack:
        for name, args in {"copy": ["--chat"], "code": []}.items():
            prompt = COPY_PROMPT if name == "copy" else CODE_PROMPT
            plain, speculative = await _greedy_pair(stack, built_modules, "--max-tokens", 24,
                                                    *args, "--prompt", prompt)
            assert speculative.return_value == plain.return_value, name
            reports[name] = _report(speculative)
    assert reports["copy"]["tokens_per_forward"] > 2
    assert reports["copy"]["accepted_drafts"] > 0
    assert all(r["forwards"] < r["tokens"] for r in reports.values())


# --- attention sink --------------------------------------------------------------------------

async def test_attention_sink_generates_past_its_budget_in_bounded_pages(tiny_runner,
                                                                         built_modules):
    """Four times the KV budget generated while the pages in use never exceed it; until the
    first eviction the text is plain greedy decoding's."""
    budget, page_size = 4, tiny_runner.info.page_size
    tokens = 4 * budget * page_size
    prompt = "Once upon a time there was a fox"
    async with running_stack(tiny_runner) as stack:
        meter = PageMeter(stack)
        plain = await _run(stack, built_modules, "text-completion", "--max-tokens", page_size,
                           "--ignore-eos", prompt)
        meter.reset()
        sink = await _run(stack, built_modules, "attention-sink", "--budget", budget,
                          "--sink", 4, "--max-tokens", tokens, "--ignore-eos", prompt)
        stats = stack.controller.stats()
    report = _report(sink)
    assert report["tokens"] == tokens
    assert meter.peak <= budget and report["peak_pages"] == budget
    prompt_tokens = len(tiny_runner.tokenizer.encode(prompt))
    assert report["evicted_pages"] >= (prompt_tokens + tokens) // page_size - budget
    assert report["attended"] <= budget * page_size
    assert sink.return_value.startswith(plain.return_value.rstrip("\ufffd"))
    assert stats["pages_in_use"] == 0


# --- prefix caching --------------------------------------------------------------------------

SYSTEM_PROMPT = (
    "You are the reference desk of a public library. Answer questions about opening hours, "
    "borrowing rules, fees and events. Opening hours: Monday to Friday 9 to 20, Saturday 10 to "
    "16, closed on Sunday. Books are lent for three weeks, films for one week; a loan can be "
    "renewed twice unless someone reserved the item. Late returns cost ten cents a day. "
) * 4


async def test_prefix_caching_prefills_the_shared_prefix_once(tiny_runner,
                                                              built_modules):
    suffixes = ["Question: when do you open on Saturday?", "Question: how long is a loan?"]
    async with running_stack(tiny_runner) as stack:
        meter = PageMeter(stack)

        async def run(suffix: str, *mode: str) -> tuple[Outcome, int]:
            meter.reset()
            outcome = await _run(stack, built_modules, "prefix-caching", "--prefix",
                                 SYSTEM_PROMPT, "--max-tokens", 16, "--ignore-eos", *mode, suffix)
            return outcome, meter.allocated

        unshared = [await run(suffix, "--no-cache") for suffix in suffixes]
        first = await run(suffixes[0])
        exports = stack.controller.stats()["exports"]
        second = await run(suffixes[1], "--unexport")
        stats = stack.controller.stats()
    (alone0, pages0), (alone1, pages1) = unshared
    assert first[0].return_value == alone0.return_value
    assert second[0].return_value == alone1.return_value
    reports = [_report(outcome) for outcome, _ in (first, second)]
    assert [(r["cached"], r["built"]) for r in reports] == [(False, True), (True, False)]
    # The export holds the prefix's full pages (its last token stays pending, as in a flush).
    page_size = tiny_runner.info.page_size
    shared = (reports[0]["prefix_tokens"] - 1) // page_size
    assert shared >= 8
    # An importer prefills and allocates only what the shared pages do not hold; the builder
    # pays one unshared run and the partial page.
    assert reports[1]["prefilled"] == _report(alone1)["prefilled"] - shared * page_size
    assert second[1] <= pages1 - shared
    assert first[1] <= pages0 + 1
    assert exports == 1 and stats["exports"] == 0 and stats["pages_in_use"] == 0


# --- skeleton-of-thought ---------------------------------------------------------------------

async def test_skeleton_of_thought_expands_points_together(tiny_runner,
                                                           built_modules):
    """The forks of the outline step in the same forward batches and share its pages; expanded
    one after another they write the same text."""
    points, point_tokens = ["Eat well", "Sleep enough", "Move daily"], 12
    args = ["--outline", "|".join(points), "--point-tokens", point_tokens, "--ignore-eos",
            "How do I stay healthy?"]
    # The executor waits (briefly) for as many forwards as there are points, so batching does
    # not depend on how fast the guest thread submits.
    policy = make_policy("kort", k=len(points), t=0.2)
    async with running_stack(tiny_runner, policy=policy) as stack:
        meter = PageMeter(stack)
        forwards = stack.executor.stats.recent_forwards
        forwards.clear()
        together = await _run(stack, built_modules, "skeleton-of-thought", *args)
        batches = [len(record.owners) for record in forwards]
        allocated = meter.allocated
        alone = await _run(stack, built_modules, "skeleton-of-thought", "--sequential", *args)
        stats = stack.controller.stats()
    assert together.return_value == alone.return_value
    messages = [json.loads(m) for m in _messages(together)]
    assert messages[0] == {"outline": points}
    assert [m["index"] for m in messages[1:]] == [0, 1, 2]
    assert batches.count(len(points)) >= point_tokens
    report = _report(together)
    shared, spans = report["shared_pages"], report["fork_pages"]
    assert shared >= 2 and len(spans) == len(points)
    # Unshared, each fork would allocate its whole span; shared, the outline's pages once.
    assert allocated <= sum(spans) - (len(points) - 1) * shared + 1
    assert stats["pages_in_use"] == 0


# --- tree-of-thought -------------------------------------------------------------------------

PROBLEM = ("A farmer has seventeen sheep, and all but nine run away through a hole in the fence. "
           "How many sheep does the farmer have left, and what should the farmer fix first? "
           "Explain the reasoning carefully before giving the final answer.")


async def test_tree_of_thought_levels_advance_together_and_share_pages(tiny_runner,
                                                                       built_modules):
    """Every level's thoughts step in the same forward batches and share the prompt's pages
    (and their parents'); generated one after another they are the same thoughts."""
    breadth, keep, tokens = 3, 2, 8
    args = ["--breadth", breadth, "--keep", keep, "--depth", 2, "--thought-tokens", tokens,
            "--ignore-eos", PROBLEM]
    # The executor waits (briefly) for the widest level's forwards, so batching does not
    # depend on how fast the guest thread submits.
    policy = make_policy("kort", k=breadth * keep, t=0.2)
    async with running_stack(tiny_runner, policy=policy) as stack:
        meter = PageMeter(stack)
        forwards = stack.executor.stats.recent_forwards
        forwards.clear()
        together = await _run(stack, built_modules, "tree-of-thought", *args)
        batches = [len(record.owners) for record in forwards]
        allocated = meter.allocated
        stats = stack.controller.stats()
    async with running_stack(tiny_runner) as stack:
        alone = await _run(stack, built_modules, "tree-of-thought", "--sequential", *args)
    assert together.return_value == alone.return_value
    levels = [json.loads(m) for m in _messages(together)]
    assert [len(level["thoughts"]) for level in levels] == [breadth, breadth * keep]
    assert [len(level["kept"]) for level in levels] == [keep, keep]
    assert {t["parent"] for t in levels[1]["thoughts"]} == set(range(keep))
    # Each thought's tokens: one forward batch per token for the whole level.
    assert batches.count(breadth) >= tokens and batches.count(breadth * keep) >= tokens
    report = _report(together)
    shared, spans = report["shared_pages"], report["fork_pages"]
    assert report["forks"] == len(spans) == breadth + breadth * keep and shared >= 2
    # Unshared, every fork would allocate its whole span; shared, the prompt's pages once and
    # each fork only the pages past what it shares.
    assert allocated <= sum(spans) - (len(spans) - 1) * shared + 1
    assert 2 * allocated < sum(spans)
    assert stats["pages_in_use"] == 0


# --- prefix-tree -----------------------------------------------------------------------------

LIBRARY_DESK = SYSTEM_PROMPT[:len(SYSTEM_PROMPT) // 2]  # two copies of the desk's prompt
FEW_SHOT = ["Example: Q: Is the library open on Sunday? A: No, it is closed on Sundays.",
            "Example: Q: How much is a late fee? A: Ten cents a day for every late item."]
QUESTIONS = ["Q: When do you open on Saturday? A:", "Q: How long is a film loan? A:",
             "Q: Can I renew a book? A:"]


async def test_prefix_tree_shares_every_level_and_steps_leaves_together(tiny_runner,
                                                                        built_modules):
    """Every leaf of system prompt → few-shot variant → question generates in the same forward
    batches; the root's pages are allocated once for all leaves, each variant's once for its
    questions."""
    tokens, leaves = 8, len(FEW_SHOT) * len(QUESTIONS)
    args = ["--system", LIBRARY_DESK, "--max-tokens", tokens, "--ignore-eos"]
    for variant in FEW_SHOT:
        args += ["--variant", variant]
    for question in QUESTIONS:
        args += ["--question", question]
    policy = make_policy("kort", k=leaves, t=0.2)
    async with running_stack(tiny_runner, policy=policy) as stack:
        meter = PageMeter(stack)
        forwards = stack.executor.stats.recent_forwards
        forwards.clear()
        together = await _run(stack, built_modules, "prefix-tree", *args)
        batches = [len(record.owners) for record in forwards]
        allocated = meter.allocated
        stats = stack.controller.stats()
    async with running_stack(tiny_runner) as stack:
        alone = await _run(stack, built_modules, "prefix-tree", "--sequential", *args)
    assert together.return_value == alone.return_value
    assert len(json.loads(together.return_value)) == leaves
    assert batches.count(leaves) >= tokens
    report = _report(together)
    root, variants, spans = report["root_pages"], report["variant_pages"], report["leaf_pages"]
    assert report["leaves"] == len(spans) == leaves
    assert root >= 2 and all(pages > root for pages in variants)
    # The root allocates its pages (and a partial one), each variant what lies past the root's
    # full pages, each leaf what lies past its variant's.
    per_leaf = [variants[i // len(QUESTIONS)] for i in range(leaves)]
    bound = (root + 1 + sum(pages - root + 1 for pages in variants)
             + sum(span - shared for span, shared in zip(spans, per_leaf, strict=True)))
    assert allocated <= bound
    assert 2 * allocated < sum(spans)  # unshared, each leaf would allocate its whole span
    assert stats["pages_in_use"] == 0


# --- windowed-attention ----------------------------------------------------------------------

async def test_windowed_attention_attends_a_window_in_bounded_pages(tiny_runner, built_modules):
    """Four windows' worth generated with no sinks while the pages in use stay at the window's
    pages plus one; the attended tokens are exactly the window; until the window first slides
    the text is plain greedy decoding's."""
    page_size = tiny_runner.info.page_size
    window, tokens = 2 * page_size, 8 * page_size
    prompt = "Once upon a time there was a fox"
    prompt_tokens = len(tiny_runner.tokenizer.encode(prompt))
    async with running_stack(tiny_runner) as stack:
        meter = PageMeter(stack)
        plain = await _run(stack, built_modules, "text-completion", "--max-tokens",
                           window - prompt_tokens, "--ignore-eos", prompt)
        meter.reset()
        windowed = await _run(stack, built_modules, "windowed-attention", "--window", window,
                              "--max-tokens", tokens, "--ignore-eos", prompt)
        stats = stack.controller.stats()
    report = _report(windowed)
    assert report["tokens"] == tokens
    bound = window // page_size + 1
    assert meter.peak <= bound and report["peak_pages"] <= bound
    assert meter.allocated >= tokens // page_size  # pages were freed and allocated again
    assert report["attended"] == window
    # Everything forwarded (the last sampled token stays pending) but the window is masked.
    assert report["masked"] == prompt_tokens + tokens - 1 - window
    assert windowed.return_value.startswith(plain.return_value.rstrip("\ufffd"))
    assert stats["pages_in_use"] == 0


# --- graph-of-thought ------------------------------------------------------------------------

async def test_graph_of_thought_drafts_together_and_merges_off_the_shared_prompt(tiny_runner,
                                                                                 built_modules):
    """The drafts step in the same forward batches; drafts and merge share the question's
    pages, and the merge prefills only what follows them (the drafts' text)."""
    branches, tokens = 3, 8
    args = ["--branches", branches, "--branch-tokens", tokens, "--merge-tokens", tokens,
            "--ignore-eos", PROBLEM]
    policy = make_policy("kort", k=branches, t=0.2)
    async with running_stack(tiny_runner, policy=policy) as stack:
        meter = PageMeter(stack)
        forwards = stack.executor.stats.recent_forwards
        forwards.clear()
        together = await _run(stack, built_modules, "graph-of-thought", *args)
        batches = [len(record.owners) for record in forwards]
        allocated = meter.allocated
        stats = stack.controller.stats()
    async with running_stack(tiny_runner) as stack:
        alone = await _run(stack, built_modules, "graph-of-thought", "--sequential", *args)
    assert together.return_value == alone.return_value
    messages = [json.loads(m) for m in _messages(together)]
    assert [m.get("branch") for m in messages[:branches]] == list(range(branches))
    assert messages[-1] == {"merged": together.return_value}
    assert batches.count(branches) >= tokens
    report = _report(together)
    shared, page_size = report["shared_pages"], tiny_runner.info.page_size
    spans = [*report["branch_pages"], report["merge_pages"]]
    assert shared >= 2 and len(spans) == branches + 1
    # Unshared, each fork would allocate its whole span; shared, the question's pages once.
    assert allocated <= sum(spans) - (len(spans) - 1) * shared + 1
    assert report["merge_prefilled"] <= (report["merge_pages"] - shared) * page_size
    assert stats["pages_in_use"] == 0


# --- recursion-of-thought --------------------------------------------------------------------

SUBPROBLEMS = [["How many sheep ran away?", "How many sheep stayed?", "What let them out?"],
               ["What is known?", "What is asked?"]]


async def test_recursion_of_thought_solves_subproblems_together_in_shared_forks(tiny_runner,
                                                                                built_modules):
    """Every depth's sub-problems step in the same forward batches, each in a fork of its
    parent's context that shares the parent's pages; solved one after another they give the
    same answers."""
    tokens = 8
    widths = [1, len(SUBPROBLEMS[0]), len(SUBPROBLEMS[0]) * len(SUBPROBLEMS[1])]
    args = ["--subproblems", ";".join("|".join(level) for level in SUBPROBLEMS), "--depth", 2,
            "--answer-tokens", tokens, "--ignore-eos", PROBLEM]
    policy = make_policy("kort", k=widths[-1], t=0.2)
    async with running_stack(tiny_runner, policy=policy) as stack:
        meter = PageMeter(stack)
        forwards = stack.executor.stats.recent_forwards
        forwards.clear()
        together = await _run(stack, built_modules, "recursion-of-thought", *args)
        batches = [len(record.owners) for record in forwards]
        allocated = meter.allocated
        stats = stack.controller.stats()
    async with running_stack(tiny_runner) as stack:
        alone = await _run(stack, built_modules, "recursion-of-thought", "--sequential", *args)
    assert _messages(together) == _messages(alone)
    assert together.return_value == alone.return_value
    messages = [json.loads(m) for m in _messages(together)]
    assert messages[:2] == [{"depth": 0, "subproblems": SUBPROBLEMS[:1]},
                            {"depth": 1, "subproblems": SUBPROBLEMS[1:] * widths[1]}]
    answers = messages[2:]
    assert [m["depth"] for m in answers] == [2] * widths[2] + [1] * widths[1] + [0]
    assert [m["parent"] for m in answers[:widths[2]]] == [0, 0, 1, 1, 2, 2]
    assert answers[-1] == {"depth": 0, "parent": None, "question": PROBLEM,
                           "answer": together.return_value}
    # Each depth's answers: one forward batch per token for all its nodes.
    assert batches.count(widths[2]) >= tokens and batches.count(widths[1]) >= tokens
    report = _report(together)
    shared, spans, root = report["shared_pages"], report["fork_pages"], report["root_pages"]
    assert report["forks"] == len(spans) == widths[1] + widths[2]
    assert report["depth"] == 2 and report["nodes"] == widths
    assert report["tokens"] == sum(widths) * tokens
    # Deepest forks first: they share their parent's pages, which hold the root's.
    assert min(shared[:widths[2]]) > max(shared[widths[2]:]) >= 2
    # Unshared, every context would allocate its whole span; shared, each fork allocates only
    # the pages past its parent's.
    assert allocated <= root + sum(span - pages for span, pages in zip(spans, shared,
                                                                      strict=True)) + 1
    assert 2 * allocated < root + sum(spans)
    assert stats["pages_in_use"] == 0
