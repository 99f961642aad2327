"""Time ops — `sleep {ms}`, `clock` (Unix seconds) — and `ping {payload}`, an echo that lets a
guest (or a test) measure a round trip through the control layer. They touch no state;
`clock` and `ping` never wait, so they are immediate ops (dispatch.py)."""

from __future__ import annotations

import time
from typing import Any

import trio

from pie_trio.control.fields import Fields


async def sleep(ctx: object, f: Fields, priority: int) -> None:
    await trio.sleep(f.integer("ms", low=0) / 1000)


def clock(ctx: object, f: Fields, priority: int) -> float:
    return time.time()


def ping(ctx: object, f: Fields, priority: int) -> Any:
    return f.anything("payload")
