"""Command-line plumbing shared by the client verbs (run, upload, ps, kill, models)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from pie_trio.client.client import Client, ServerError, connect
from pie_trio.client.transport import ConnectionClosed

DEFAULT_SERVER = "ws://127.0.0.1:8080/ws"


def add_server_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--server", metavar="URL", default=os.environ.get("PIE_TRIO_SERVER", DEFAULT_SERVER),
        help="server to talk to: ws://HOST:PORT/ws or tcp://HOST:PORT "
             f"(default: $PIE_TRIO_SERVER or {DEFAULT_SERVER})")
    parser.add_argument(
        "--token", metavar="KEY", default=os.environ.get("PIE_TRIO_API_KEY"),
        help="API key, when the server requires one (default: $PIE_TRIO_API_KEY)")


def run_with_client(args: argparse.Namespace,
                    body: Callable[[Client], Awaitable[int | None]]) -> int:
    """Connect as the options say, run `body`, and turn failures into a message + exit code."""

    async def main() -> int:
        async with connect(args.server, args.token) as client:
            return int(await body(client) or 0)

    try:
        return trio.run(main)
    except ServerError as exc:
        return fail(f"the server refused: {exc}")
    except (ConnectionError, ConnectionClosed) as exc:
        return fail(str(exc))
    except KeyboardInterrupt:
        return 130


def fail(message: str, code: int = 1) -> int:
    print(f"pie-trio: {message}", file=sys.stderr)
    return code


def print_table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    """Plain aligned columns (what `ps` and `models` print)."""
    cells = [[str(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) if cells else len(c)
              for i, c in enumerate(columns)]
    print("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip())
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())
