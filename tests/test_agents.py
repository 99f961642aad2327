"""Agents as inferlets (inferlets/examples/agent-*) against the local tool service: agent-react
completes a multi-turn episode on the real model with real HTTP tool calls, forwarding every
token of the episode exactly once (its KV pages only grow: no turn prefills again); killing an
agent in the middle of a tool call cancels the call and frees everything. agent-swarm's planner
launches its workers as child instances and composes their answers; agent-codeact runs the
model's code through the tool service's /run."""

from __future__ import annotations

import json

import pytest
import trio
from test_inferlets_build import built_modules  # noqa: F401  (the build fixture)
from test_runtime_support import finish, live_trio_tasks, running_stack
from tool_support import open_tool_service

from pie_trio.control.tools import ToolPolicy

LOCAL_TOOLS = ToolPolicy(enabled=True, allow=("127.0.0.1",))
TASK = "What is the capital of France, and how many inhabitants does it have?"


def _turns(outcome) -> list[dict]:
    return [json.loads(e["message"]) for e in outcome.events if e["event"] == "message"]


@pytest.mark.slow
async def test_agent_react_runs_an_episode_without_prefilling_again(built_modules,  # noqa: F811
                                                                      real_runner):
    async with open_tool_service() as service, \
            running_stack(real_runner, tools=LOCAL_TOOLS) as stack:
        program = stack.runtime.programs.add(built_modules["agent-react"].read_bytes())
        forwards_before = list(stack.executor.stats.recent_forwards)
        outcome = await finish(await stack.launch(
            program, "--tools", service.url, "--max-turns", 3, "--step-tokens", 24,
            "--no-finish", "--task", TASK))
        assert outcome.reason == "finished", outcome.text("stderr") or outcome.detail
        turns = _turns(outcome)
        result = json.loads(outcome.return_value)
        forwarded = [r.tokens for r in stack.executor.stats.recent_forwards
                     if r not in forwards_before]
        assert stack.controller.stats()["pages_in_use"] == 0
    assert [t["turn"] for t in turns] == [1, 2, 3] and result["turns"] == 3
    tool_calls = service.calls()
    assert len(tool_calls) == 3, tool_calls  # every turn's action reached the tool service
    assert [t["observation"] for t in turns][0]
    # The KV context is kept across turns: each turn's pages extend the previous turn's...
    for before, after in zip(turns, turns[1:], strict=False):
        assert after["pages"][:len(before["pages"])] == before["pages"]
        assert after["kv_tokens"] > before["kv_tokens"]
    # ... and every token of the episode went through the model exactly once.
    assert sum(forwarded) == result["kv_forwarded"], (sum(forwarded), result)
    assert result["kv_forwarded"] <= result["kv_tokens"]


async def test_killing_an_agent_mid_call_cancels_it_and_frees_everything(built_modules,  # noqa: F811
                                                                        tiny_runner):
    async with open_tool_service(latency=60.0) as service, \
            running_stack(tiny_runner, tools=LOCAL_TOOLS) as stack:
        program = stack.runtime.programs.add(built_modules["agent-react"].read_bytes())
        baseline = live_trio_tasks()
        instance = await stack.launch(program, "--tools", service.url, "--step-tokens", 4,
                                      "--task", TASK)
        with trio.fail_after(60):
            while service.in_flight < 1:  # the agent is waiting on its tool call
                await trio.sleep(0.02)
            instance.kill()
            outcome = await finish(instance)
            while service.aborted < 1 or service.in_flight:  # the call's connection closed
                await trio.sleep(0.02)
        assert outcome.reason == "killed"
        stats = stack.controller.stats()
        assert stats["pages_in_use"] == 0 and stats["instances"] == 0, stats
        await trio.sleep(0.05)
        assert live_trio_tasks() <= baseline


async def test_agent_swarm_plans_launches_workers_and_composes(built_modules,  # noqa: F811
                                                              tiny_runner):
    async with running_stack(tiny_runner) as stack:
        program = stack.runtime.programs.add(built_modules["agent-swarm"].read_bytes())
        launched = stack.runtime.launched
        outcome = await finish(await stack.launch(
            program, "--program", program, "--workers", 3, "--step-tokens", 4, "--task", TASK))
        assert outcome.reason == "finished", outcome.text("stderr") or outcome.detail
        # The planner's client sees the planner's messages only: one per worker, each worker's
        # own answer having come to the planner through `child_receive`.
        turns = _turns(outcome)
        assert [t["worker"] for t in turns] == [0, 1, 2]
        assert all(t["reason"] == "finished" for t in turns), turns
        result = json.loads(outcome.return_value)
        assert len(result["subtasks"]) == 3 and result["answers"] == [t["answer"] for t in turns]
        assert [t["subtask"] for t in turns] == result["subtasks"]
        assert stack.runtime.launched - launched == 4  # the planner and its three workers
        assert stack.runtime.stats()["ended"]["finished"] == 4
        assert stack.runtime.instances == {}
        stats = stack.controller.stats()
        assert stats["pages_in_use"] == 0 and stats["instances"] == 0, stats


async def test_agent_swarm_workers_end_with_a_killed_planner(built_modules,  # noqa: F811
                                                            tiny_runner):
    async with running_stack(tiny_runner) as stack:
        program = stack.runtime.programs.add(built_modules["agent-swarm"].read_bytes())
        baseline = live_trio_tasks()
        planner = await stack.launch(program, "--program", program, "--workers", 4,
                                     "--step-tokens", 4, "--worker-tokens", 120,
                                     "--task", TASK)
        with trio.fail_after(60):
            while len(stack.runtime.instances) < 5:  # every worker is running
                await trio.sleep(0.01)
        planner.kill()
        assert (await finish(planner)).reason == "killed"
        assert stack.runtime.stats()["ended"]["parent_gone"] == 4
        stats = stack.controller.stats()
        assert stats["pages_in_use"] == 0 and stats["instances"] == 0, stats
        await trio.sleep(0.05)
        assert live_trio_tasks() <= baseline


async def test_agent_codeact_runs_the_models_code_in_the_tool_service(built_modules,  # noqa: F811
                                                                      tiny_runner):
    async with open_tool_service() as service, \
            running_stack(tiny_runner, tools=LOCAL_TOOLS) as stack:
        program = stack.runtime.programs.add(built_modules["agent-codeact"].read_bytes())
        outcome = await finish(await stack.launch(
            program, "--tools", service.url, "--max-turns", 3, "--step-tokens", 8,
            "--task", "What is 17 * 23? Compute it."))
        assert outcome.reason == "finished", outcome.text("stderr") or outcome.detail
        turns = _turns(outcome)
        result = json.loads(outcome.return_value)
        assert stack.controller.stats()["pages_in_use"] == 0
    assert result["turns"] == len(turns) <= 3
    # Every turn that wrote code (the tiny model writes no final answer) reached /run, in order,
    # and what the program printed or its error came back as the observation.
    coded = [t for t in turns if "code" in t]
    runs = service.calls("run")
    assert [r["argument"] for r in runs] == [t["code"] for t in coded]
    assert all(t["observation"] for t in coded)
    assert result["finished"] == (len(coded) < len(turns))
