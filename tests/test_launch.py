"""Inferlets launching inferlets (the `launch`, `send_to`, `child_receive`, `child_wait`,
`child_kill` ops; pie_trio/runtime/children.py): a parent talks to its children, only to its
own, within its caps; children end with their parent (`parent_gone`) before the parent reports
its end; and many parent/child lifecycles leave no instance, page, task or thread behind.

The parents here are WAT `echo` guests, whose child ops are issued on the instance's trio side
(`Instance.children.handle`, the entry point of those ops from the ABI); the whole path through
a guest's host calls is exercised by inferlets/examples/agent-swarm (tests/test_agents.py).
"""

from __future__ import annotations

from typing import Any

import trio
from test_runtime_support import finish, live_trio_tasks, running_stack, thread_count

from pie_trio.runtime.children import CHILD_OPS
from pie_trio.runtime.instance import Instance
from pie_trio.runtime.sandbox import InstanceLimits


async def ask(parent: Instance, op: str, **fields: Any) -> dict[str, Any]:
    """Issue a child op for `parent` as its guest would, and wait for the answer."""
    answered = trio.Event()
    response: dict[str, Any] = {}

    def answer(value: dict[str, Any]) -> None:
        assert not answered.is_set(), "answered twice"
        response.update(value)
        answered.set()

    assert parent._nursery is not None
    parent.children.handle(parent._nursery, {"op": op, **fields}, answer)
    with trio.fail_after(30):
        await answered.wait()
    return response


async def launch_echo(stack, parent: Instance) -> str:
    response = await ask(parent, "launch", program=stack.guests["echo"], args=[])
    assert "ok" in response, response
    return response["ok"]


def test_child_ops_are_runtime_ops_answered_on_the_trio_side():
    from pie_trio.control.interface import RUNTIME_OPS
    from pie_trio.runtime.abi import LOCAL_OPS

    assert CHILD_OPS <= RUNTIME_OPS and not CHILD_OPS & LOCAL_OPS


async def test_a_parent_talks_to_its_child_and_collects_its_end(tiny_runner):
    async with running_stack(tiny_runner) as stack:
        parent = await stack.launch("echo")
        child_id = await launch_echo(stack, parent)
        child = stack.runtime.get(child_id)
        assert child is not None and child.owner == parent.owner
        assert await ask(parent, "send_to", instance=child_id, message="hello") == {"ok": None}
        # The child's `send` comes to its parent, not to a client.
        assert await ask(parent, "child_receive", instance=child_id) == {"ok": "hello"}
        await ask(parent, "send_to", instance=child_id, message="quit")
        assert await ask(parent, "child_receive", instance=child_id) == {"ok": None}
        ended = await ask(parent, "child_wait", instance=child_id)
        assert ended == {"ok": {"reason": "finished", "detail": ended["ok"]["detail"],
                                "value": "done"}}
        # Waited for: forgotten, so its id is no longer the parent's to use.
        gone = await ask(parent, "child_receive", instance=child_id)
        assert child_id in gone["error"] and gone["error"].startswith("child_receive:")
        parent.deliver("quit")
        assert (await finish(parent)).reason == "finished"


async def test_a_parent_addresses_only_its_own_children(tiny_runner):
    async with running_stack(tiny_runner) as stack:
        first, second = await stack.launch("echo"), await stack.launch("echo")
        child_id = await launch_echo(stack, first)
        for op in ("send_to", "child_receive", "child_wait", "child_kill"):
            for forged in (child_id, second.id, "f" * 32, 7):
                response = await ask(second, op, instance=forged, message="x")
                assert response["error"].startswith(f"{op}: no child instance {forged!r}")
        assert stack.runtime.get(child_id).running  # untouched by the forgeries
        for instance in (first, second):
            instance.kill()
        assert (await finish(first)).reason == "killed"


async def test_launch_is_refused_past_the_caps_or_for_unknown_programs(tiny_runner):
    limits = InstanceLimits(max_children=2)
    async with running_stack(tiny_runner, limits=limits) as stack:
        parent = await stack.launch("echo")
        unknown = await ask(parent, "launch", program="no-such-program", args=[])
        assert unknown["error"].startswith("launch:") and "no-such-program" in unknown["error"]
        bad = await ask(parent, "launch", program=stack.guests["echo"], args=[1])
        assert "'args' must be a list of strings" in bad["error"]
        children = [await launch_echo(stack, parent) for _ in range(2)]
        over = await ask(parent, "launch", program=stack.guests["echo"], args=[])
        assert "max_children" in over["error"]
        # A child counts until it has been waited for, then makes room for another.
        await ask(parent, "child_kill", instance=children[0])
        assert (await ask(parent, "child_wait", instance=children[0]))["ok"]["reason"] == "killed"
        children[0] = await launch_echo(stack, parent)
        # The owner's cap and the runtime's cap count children like any instance.
        await ask(parent, "child_kill", instance=children[0])
        await ask(parent, "child_wait", instance=children[0])
        stack.runtime.max_instances_per_owner = 2
        refused = await ask(parent, "launch", program=stack.guests["echo"], args=[])
        assert "owner 'test'" in refused["error"], refused
        stack.runtime.max_instances_per_owner = None
        stack.runtime.max_instances = 2
        refused = await ask(parent, "launch", program=stack.guests["echo"], args=[])
        assert "its maximum" in refused["error"], refused
        parent.kill()
        await finish(parent)


async def test_children_end_with_their_parent(tiny_runner):
    async with running_stack(tiny_runner) as stack:
        parent = await stack.launch("echo")
        grandparent_ids = [await launch_echo(stack, parent) for _ in range(3)]
        children = [stack.runtime.get(i) for i in grandparent_ids]
        grandchild = await launch_echo(stack, children[0])
        parent.kill()
        outcome = await finish(parent)
        assert outcome.reason == "killed"
        # By the time the parent reports its end, its children (and theirs) have ended.
        for child in children:
            assert child.ended.is_set() and child.termination.reason == "parent_gone"
        assert stack.runtime.get(grandchild) is None
        assert stack.runtime.stats()["ended"]["parent_gone"] == 4
        assert stack.runtime.instances == {}


async def test_a_parent_that_finishes_takes_its_children_with_it(tiny_runner):
    async with running_stack(tiny_runner) as stack:
        parent = await stack.launch("echo")
        child = stack.runtime.get(await launch_echo(stack, parent))
        parent.deliver("quit")
        assert (await finish(parent)).reason == "finished"
        assert child.termination.reason == "parent_gone"


async def test_many_parent_child_lifecycles_leave_nothing_behind(tiny_runner):
    async with running_stack(tiny_runner) as stack:
        await trio.sleep(0.05)
        tasks, threads = live_trio_tasks(), thread_count()
        for round_ in range(12):
            parent = await stack.launch("echo")
            ids = [await launch_echo(stack, parent) for _ in range(3)]
            await ask(parent, "send_to", instance=ids[0], message=f"round {round_}")
            assert (await ask(parent, "child_receive", instance=ids[0]))["ok"] == f"round {round_}"
            await ask(parent, "send_to", instance=ids[1], message="quit")
            assert (await ask(parent, "child_wait", instance=ids[1]))["ok"]["value"] == "done"
            await ask(parent, "child_kill", instance=ids[2])
            # ids[0] is still running: the parent's end takes it.
            if round_ % 2:
                parent.kill()
            else:
                parent.deliver("quit")
            await finish(parent)
        assert stack.runtime.instances == {}
        assert stack.runtime.stats()["guest_threads"] == 0
        stats = stack.controller.stats()
        assert stats["instances"] == 0 and stats["pages_in_use"] == 0, stats
        with trio.fail_after(10):
            while thread_count() > threads:  # guest threads exit just after reporting
                await trio.sleep(0.02)
        await trio.sleep(0.05)
        assert live_trio_tasks() <= tasks
        assert stack.runtime.stats()["ended"]["parent_gone"] == 12
