"""`pie-trio detach INSTANCE...`: let instances run on without a client streaming them."""

from __future__ import annotations

import argparse

from pie_trio.cli import Subparsers
from pie_trio.client.client import Client, ServerError
from pie_trio.client.options import add_server_options, fail, run_with_client


def add_parser(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        "detach", help="detach running instances from their client",
        description="Detach instances of your tenant from the connection streaming them (that "
                    "client is told, and stops following them): they run on, and the server "
                    "holds their output until `pie-trio attach INSTANCE`.")
    parser.add_argument("instances", metavar="INSTANCE", nargs="+", help="instance ids (see ps)")
    add_server_options(parser)
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    async def body(client: Client) -> int:
        status = 0
        for instance in args.instances:
            try:
                await client.detach(instance)
            except ServerError as exc:
                status = fail(f"{instance}: {exc.message}")
        return status

    return run_with_client(args, body)
