"""`pie-trio models`: the models a server serves."""

from __future__ import annotations

import argparse

from pie_trio.cli import Subparsers
from pie_trio.client.client import Client
from pie_trio.client.options import add_server_options, print_table, run_with_client


def add_parser(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        "models", help="list the models a server serves",
        description="List the models a server serves, with their KV page size, vocabulary "
                    "size and context length.")
    add_server_options(parser)
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    async def body(client: Client) -> int:
        print_table(await client.models(), ["name", "page_size", "vocab_size", "max_position"])
        return 0

    return run_with_client(args, body)
