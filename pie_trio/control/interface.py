"""The control layer's face to the runtime: what the runtime holds, and which ops are its own.

`Controller` (`controller.py`) satisfies `ControlService` and `InstanceControl` (`instance.py`)
satisfies `AttachedInstance`, structurally; the runtime types against these Protocols.

`RUNTIME_OPS` is the one list of the ops of docs/abi.md that the runtime answers itself; the
control layer answers every other op, and refuses these.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

RUNTIME_OPS: frozenset[str] = frozenset(
    {"version", "instance_id", "args", "models", "send", "receive", "set_return", "discard",
     "launch", "send_to", "child_receive", "child_wait", "child_kill"}
)

# The ops that touch no shared state: `AttachedInstance.answer_stateless` answers them on any
# thread (dispatch.py marks them `stateless`); the runtime asks for no other op there.
STATELESS_OPS: frozenset[str] = frozenset({"ping", "clock", "model_info"})

Response = dict[str, Any]  # {"ok": value} or {"error": message}
OnDone = Callable[[Response], None]


class AttachedInstance(Protocol):
    """One instance's side of the control layer, as `ControlService.attach` returns it."""

    def start_request(self, request: dict[str, Any], on_done: OnDone) -> None:
        """Start one guest request; never blocks. Call from the trio thread, in the guest's
        submission order. `on_done` is called exactly once, from the trio thread, with the
        response: before this returns for an op answered on the spot (`ping`, `clock`, the
        store, `model_info`, naming no queue), later for the others; requests pending when the
        instance closes get ``instance closed``."""
        ...

    def answer_stateless(self, request: dict[str, Any]) -> Response | None:
        """The response to a request for an op that touches no shared state (`ping`, `clock`,
        `model_info`) naming no queue, computed now; None for any other request (it goes to
        `start_request`). Unlike everything else here, any thread may call this: the runtime
        calls it on the guest's thread, so those answers need no crossing."""
        ...

    async def close(self) -> None:
        """Cancel pending requests and free everything the instance holds. Idempotent."""
        ...

    def usage(self) -> dict[str, int]:
        """What the instance holds now: `pages`, `slots`, `queues`, `pending`."""
        ...


class ControlService(Protocol):
    """What the runtime needs from the controller."""

    @property
    def model_names(self) -> list[str]:
        """The names of the models served (what the `models` op answers)."""
        ...

    def attach(self, instance_id: str) -> AttachedInstance:
        """Start serving a new instance's requests; `ValueError` if the id is attached."""
        ...
