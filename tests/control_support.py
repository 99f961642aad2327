"""Helpers for tests that talk to an `InstanceControl` the way the runtime does."""

from __future__ import annotations

import trio

from pie_trio.control.instance import InstanceControl


async def request(ctl: InstanceControl, op: str, **fields) -> dict:
    """Submit one op and wait for its answer, checking it is answered exactly once."""
    answers: list[dict] = []
    done = trio.Event()

    def on_done(response: dict) -> None:
        answers.append(response)
        done.set()

    ctl.start_request({"op": op, **fields}, on_done)
    await done.wait()
    await trio.lowlevel.checkpoint()  # a second answer would have arrived by now
    assert len(answers) == 1, answers
    return answers[0]


async def ok(ctl: InstanceControl, op: str, **fields):
    response = await request(ctl, op, **fields)
    assert "ok" in response, response
    return response["ok"]


async def error(ctl: InstanceControl, op: str, **fields) -> str:
    response = await request(ctl, op, **fields)
    assert "error" in response, response
    return response["error"]
