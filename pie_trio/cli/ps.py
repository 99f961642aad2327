"""`pie-trio ps`: list your instances on a server, attached, detached or ended while detached."""

from __future__ import annotations

import argparse
import time

from pie_trio.cli import Subparsers
from pie_trio.client.client import Client
from pie_trio.client.options import add_server_options, print_table, run_with_client


def add_parser(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        "ps", help="list your running instances",
        description="List the instances your tenant (API key) is running on the server, "
                    "launched from any connection or the HTTP API. STATE is `attached` (a "
                    "client streams its output), `detached` (its output waits for "
                    "`pie-trio attach`), or `ended` (it ended detached; attach to see how).")
    add_server_options(parser)
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    async def body(client: Client) -> int:
        rows = await client.instances()
        now = time.time()
        for row in rows:
            row["age"] = f"{now - row.get('started', now):.1f}s"
            row["program"] = _short(str(row.get("program", "")))
            row["args"] = " ".join(row.get("args") or [])[:40]
        print_table(rows, ["instance", "program", "state", "origin", "age", "args"])
        return 0

    return run_with_client(args, body)


def _short(program: str) -> str:
    """Hashes shortened like git does; built-in names stay whole."""
    return program[:12] if len(program) == 64 else program
