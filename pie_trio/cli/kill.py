"""`pie-trio kill INSTANCE...`: terminate your instances."""

from __future__ import annotations

import argparse

from pie_trio.cli import Subparsers
from pie_trio.client.client import Client, ServerError
from pie_trio.client.options import add_server_options, fail, run_with_client


def add_parser(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        "kill", help="terminate running instances",
        description="Terminate instances your tenant launched (their client sees the reason "
                    "`killed`). Instances of other tenants cannot be seen or killed.")
    parser.add_argument("instances", metavar="INSTANCE", nargs="+", help="instance ids (see ps)")
    add_server_options(parser)
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    async def body(client: Client) -> int:
        status = 0
        for instance in args.instances:
            try:
                await client.terminate(instance)
            except ServerError as exc:
                status = fail(f"{instance}: {exc.message}")
        return status

    return run_with_client(args, body)
