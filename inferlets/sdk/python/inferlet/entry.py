"""The component's `run` export: runs the inferlet's `main` and reports how it ended."""

from __future__ import annotations

import sys
import traceback
from collections.abc import Callable
from typing import Any

from inferlet.host import run


def make_world(main: Callable[[], Any]) -> type:
    """The `WitWorld` class componentize-py exports, running `main` (async or not)."""
    from componentize_py_types import Err

    class WitWorld:
        def run(self) -> None:
            try:
                result = main()
                if hasattr(result, "__await__"):
                    run(result)
            except SystemExit as exc:
                if exc.code not in (None, 0):
                    raise Err(f"SystemExit: exit code {exc.code}") from None
            except BaseException as exc:  # noqa: BLE001 - reported as the instance's error
                traceback.print_exc(file=sys.stderr)
                sys.stderr.flush()
                raise Err(f"{type(exc).__name__}: {exc}") from None
            finally:
                sys.stdout.flush()

    return WitWorld
