"""The inferlet runtime: programs, instances, the guest ABI's host side and the sandbox.

See docs/runtime.md. `pie_trio/stack.py` builds `Runtime` (runtime.py) on the control layer;
the server and `pie-trio run --local` stand on that stack, with a `ProgramStore` (programs.py).
"""

from pie_trio.runtime.instance import InboxFull, Instance, InstanceGone
from pie_trio.runtime.programs import (
    Program,
    ProgramError,
    ProgramLimits,
    ProgramStore,
    UnknownProgram,
)
from pie_trio.runtime.runtime import CapacityError, Runtime
from pie_trio.runtime.sandbox import InstanceLimits, Termination

__all__ = [
    "CapacityError",
    "InboxFull",
    "Instance",
    "InstanceGone",
    "InstanceLimits",
    "Program",
    "ProgramError",
    "ProgramLimits",
    "ProgramStore",
    "Runtime",
    "Termination",
    "UnknownProgram",
]
