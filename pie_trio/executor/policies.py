"""When to fire the next forward batch.

A policy looks only at the forwards waiting to run (how many, and when the oldest arrived) and
answers "fire now?" and "if nothing else arrives, when will you fire?". The executor asks it
whenever the worker thread is free; other call kinds (embed, copy_kv, mask_kv, allocations) are
cheap and never wait for a policy.

- `adaptive` (default): fire as soon as the worker is free. While a forward runs, new calls pile
  up, so the next batch carries everything that arrived meanwhile: batches grow with load and a
  lone caller never waits. One exception (`gathers_bursts`): after idling, while callers said
  to be on their way (`Executor.expect_callers`: instances launched a moment ago) have not sent
  their first forward, the first batch waits for them, at most GATHER_MAX (executor.py), so a
  burst of launches shares one forward instead of the first one or two going alone and staying
  a step ahead to their end.
- `k`: fire once at least k forwards wait. Nothing fires with fewer, however long they wait: use
  it only when k callers are known to come (or use `kort`).
- `t`: fire t seconds after the oldest waiting forward arrived.
- `kort`: whichever of `k` and `t` comes first.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

POLICY_NAMES = ("adaptive", "k", "t", "kort")


class BatchPolicy(Protocol):
    @property
    def name(self) -> str:
        """The policy's name, one of POLICY_NAMES for the built-in ones."""
        ...

    def should_fire(self, queued: int, oldest_arrival: float, now: float) -> bool:
        """Whether `queued` (> 0) waiting forwards, the oldest from `oldest_arrival`, go now."""
        ...

    def deadline(self, oldest_arrival: float) -> float:
        """The trio time at which the waiting forwards go even if nothing else arrives."""
        ...

    @property
    def gathers_bursts(self) -> bool:
        """Whether the first batch after idling waits for callers on their way."""
        ...


@dataclass(frozen=True)
class Adaptive:
    name: str = "adaptive"
    gathers_bursts: bool = True

    def should_fire(self, queued: int, oldest_arrival: float, now: float) -> bool:
        return queued > 0

    def deadline(self, oldest_arrival: float) -> float:
        return oldest_arrival


@dataclass(frozen=True)
class CountPolicy:
    k: int
    name: str = "k"
    gathers_bursts: bool = False

    def should_fire(self, queued: int, oldest_arrival: float, now: float) -> bool:
        return queued >= self.k

    def deadline(self, oldest_arrival: float) -> float:
        return math.inf


@dataclass(frozen=True)
class TimePolicy:
    t: float
    name: str = "t"
    gathers_bursts: bool = False

    def should_fire(self, queued: int, oldest_arrival: float, now: float) -> bool:
        return queued > 0 and now >= oldest_arrival + self.t

    def deadline(self, oldest_arrival: float) -> float:
        return oldest_arrival + self.t


@dataclass(frozen=True)
class CountOrTimePolicy:
    k: int
    t: float
    name: str = "kort"
    gathers_bursts: bool = False

    def should_fire(self, queued: int, oldest_arrival: float, now: float) -> bool:
        return queued > 0 and (queued >= self.k or now >= oldest_arrival + self.t)

    def deadline(self, oldest_arrival: float) -> float:
        return oldest_arrival + self.t


def make_policy(name: str, *, k: int = 8, t: float = 0.005) -> BatchPolicy:
    """The policy called `name` (one of POLICY_NAMES) with its parameters."""
    if name in ("k", "kort") and (not isinstance(k, int) or k < 1):
        raise ValueError(f"policy {name!r} needs k >= 1, got {k!r}")
    if name in ("t", "kort") and not (t >= 0 and math.isfinite(t)):
        raise ValueError(f"policy {name!r} needs a finite t >= 0 seconds, got {t!r}")
    if name == "adaptive":
        return Adaptive()
    if name == "k":
        return CountPolicy(k)
    if name == "t":
        return TimePolicy(t)
    if name == "kort":
        return CountOrTimePolicy(k, t)
    raise ValueError(f"unknown batching policy {name!r}; expected one of {POLICY_NAMES}")
