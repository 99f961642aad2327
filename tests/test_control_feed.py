"""A forward that `feed`s on the previous forward of its queue, and the chaining that starts it
from that forward's answer (control/inference.py, control/instance.py): the same results as
the explicit token, the queue's order kept, refusals that say what is missing, nothing leaked
when the instance closes with a chained request."""

from __future__ import annotations

import math

import test_control
import trio
import trio.testing
from control_support import error, ok
from test_control import Stack, assert_same_dist, prompt, settled

from pie_trio.control.instance import InstanceControl

# The control tests' fixtures: the tiny model's stack, and one whose forwards never fire.
stack = test_control.stack
stalled_stack = test_control.stalled_stack


def step(pages: list[int], page_size: int, length: int, tokens: list[int], **fields) -> dict:
    """A forward request growing a context of `length` tokens by `tokens` (or by one fed
    token, with `feed`), sampling greedily after the last."""
    count = len(tokens) + (1 if fields.get("feed") else 0)
    new_length = length + count
    used = pages[:math.ceil(new_length / page_size)]
    return {"op": "forward", "queue": 0, "pages": used,
            "last_page_len": new_length - (len(used) - 1) * page_size,
            "positions": list(range(length, new_length)), "tokens": tokens,
            "outputs": [count - 1], "top_k": 8, "sampler": {"temperature": 0.0}, **fields}


class Answers:
    """Answers to requests started by hand, in the order they came, and how many calls the
    executor held when each came."""

    def __init__(self, stack: Stack) -> None:
        self.order: list[tuple[str, dict]] = []
        self.queued: dict[str, int] = {}
        self._executor = stack.executor

    def to(self, name: str):
        def answered(response: dict) -> None:
            self.order.append((name, response))
            self.queued[name] = self._executor.queued
        return answered

    async def wait_for(self, count: int) -> None:
        with trio.fail_after(30):
            while len(self.order) < count:
                await trio.sleep(0.005)

    def value(self, name: str) -> dict:
        [response] = [r for n, r in self.order if n == name]
        assert "ok" in response, response
        return response["ok"]


async def test_a_fed_step_equals_the_explicit_one_and_starts_from_the_answer(stack: Stack):
    ps = stack.page_size
    a, b = stack.controller.attach("a"), stack.controller.attach("b")
    tokens = prompt(ps - 2)
    pages_a = await ok(a, "alloc_pages", count=2)
    answers = Answers(stack)
    ticks = stack.executor.stats.ticks
    a.start_request(step(pages_a, ps, 0, tokens), answers.to("prompt"))
    a.start_request(step(pages_a, ps, len(tokens), [], feed=True), answers.to("fed"))
    assert stack.executor.queued == 1  # the prompt; the fed step waits on it (chained)
    await answers.wait_for(1)
    assert answers.queued["prompt"] == 1  # the fed step was in before the prompt's answer
    a.start_request(step(pages_a, ps, len(tokens) + 1, [], feed=True), answers.to("fed again"))
    await answers.wait_for(3)
    assert [name for name, _ in answers.order] == ["prompt", "fed", "fed again"]
    # Each fed step went into the tick right after the one it read from.
    assert stack.executor.stats.ticks - ticks == 3

    # The same steps with the sampled tokens given explicitly, in another instance.
    pages_b = await ok(b, "alloc_pages", count=2)
    first = await ok(b, **step(pages_b, ps, 0, tokens))
    assert first["tokens"] == answers.value("prompt")["tokens"]
    second = await ok(b, **step(pages_b, ps, len(tokens), first["tokens"]))
    assert_same_dist(second, answers.value("fed"))
    assert second["tokens"] == answers.value("fed")["tokens"]
    third = await ok(b, **step(pages_b, ps, len(tokens) + 1, second["tokens"]))
    assert_same_dist(third, answers.value("fed again"))
    await a.close()
    await b.close()
    assert (await settled(stack))["pages_in_use"] == 0


async def prompt_and_fed_step(stack: Stack) -> tuple[InstanceControl, list[int], Answers]:
    """An instance with a 3-token prompt's forward and a step that feeds on it started."""
    a = stack.controller.attach("a")
    pages = await ok(a, "alloc_pages", count=1)
    answers = Answers(stack)
    a.start_request(step(pages, stack.page_size, 0, prompt(3)), answers.to("prompt"))
    a.start_request(step(pages, stack.page_size, 3, [], feed=True), answers.to("fed"))
    return a, pages, answers


async def test_a_chained_step_keeps_its_place_before_later_requests(stack: Stack):
    """A request for the queue that comes while a step is chained goes after that step."""
    ps = stack.page_size
    a, pages, answers = await prompt_and_fed_step(stack)
    a.start_request({"op": "synchronize", "queue": 0}, answers.to("synchronize"))
    a.start_request(step(pages, ps, 4, [], feed=True), answers.to("fed after"))
    await answers.wait_for(4)
    assert [name for name, _ in answers.order] == ["prompt", "fed", "synchronize", "fed after"]
    assert all("ok" in response for _, response in answers.order), answers.order
    await a.close()


async def test_feed_is_refused_where_there_is_nothing_to_feed_on(stack: Stack):
    ps = stack.page_size
    a = stack.controller.attach("a")
    pages = await ok(a, "alloc_pages", count=2)
    nothing = "forward: 'feed': the previous forward on queue 0 sampled no tokens (it failed, " \
              "or it had no sampler)"
    # No forward before it on the queue.
    assert await error(a, **step(pages, ps, 0, [1], feed=True)) == nothing
    # A forward that sampled nothing.
    without_sampler = step(pages, ps, 0, prompt(3))
    del without_sampler["sampler"]
    await ok(a, **without_sampler)
    assert await error(a, **step(pages, ps, 3, [], feed=True)) == nothing
    # A forward that failed (a token id the model does not have).
    await ok(a, **step(pages, ps, 0, prompt(3)))
    assert "token" in await error(a, **step(pages, ps, 3, [10**9]))
    assert await error(a, **step(pages, ps, 4, [], feed=True)) == nothing
    # A refused feed leaves nothing to feed on either.
    await ok(a, **step(pages, ps, 0, prompt(3)))
    assert await error(a, **step(pages, ps, 3, [], feed=True, outputs=[5]))
    assert await error(a, **step(pages, ps, 4, [], feed=True)) == nothing
    # Another sequence's forward was the latest on the queue (two contexts sharing it).
    other = await ok(a, "alloc_pages", count=1)
    await ok(a, **step(pages, ps, 0, prompt(3)))
    await ok(a, **step(other, ps, 0, prompt(5)))
    assert await error(a, **step(pages, ps, 3, [], feed=True)) == (
        f"forward: 'feed': the previous forward on queue 0 was another sequence's (it wrote "
        f"page {other[0]}, which this forward does not name)")
    # Slots instead of tokens, and no queue at all.
    await ok(a, **step(pages, ps, 0, prompt(3)))
    slots = {**step(pages, ps, 3, [], feed=True), "slots": [0]}
    del slots["tokens"]
    assert await error(a, **slots) == ("forward: 'feed' appends sampled tokens to 'tokens': give "
                                       "'tokens' (it may be empty), not 'slots'")
    no_queue = step(pages, ps, 3, [], feed=True)
    del no_queue["queue"]
    assert await error(a, **no_queue) == ("forward: 'feed' reads the previous forward on the "
                                          "request's queue: name a queue")
    await a.close()
    assert (await settled(stack))["pages_in_use"] == 0


async def test_closing_with_a_chained_step_answers_it_and_frees_everything(stalled_stack):
    stack = stalled_stack
    a, _, answers = await prompt_and_fed_step(stack)
    await trio.testing.wait_all_tasks_blocked()
    assert stack.executor.queued == 1  # the prompt never fires; the fed step waits on it
    await a.close()
    assert answers.order == [("prompt", {"error": "instance closed"}),
                             ("fed", {"error": "instance closed"})]
    stats = await settled(stack)
    assert stats == {**stats, "pages_in_use": 0, "instances": 0}

