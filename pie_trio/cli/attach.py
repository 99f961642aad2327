"""`pie-trio attach INSTANCE`: stream a detached instance, from what it said while detached on.

The output is printed as `pie-trio run` prints it, and the exit code follows the same rule: 0
when the instance finishes (or is detached again), 1 when it ends any other way.
"""

from __future__ import annotations

import argparse

from pie_trio.cli import Subparsers
from pie_trio.cli.run import stream
from pie_trio.client.client import Client
from pie_trio.client.options import add_server_options, run_with_client


def add_parser(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        "attach", help="stream the output of a detached instance",
        description="Attach to an instance your tenant launched detached (`pie-trio run "
                    "--detach`) or detached later (`pie-trio detach`): print what it produced "
                    "meanwhile, in order, then its live output, as `pie-trio run` does. An "
                    "instance that ended while detached prints its output and its end. Once "
                    "attached, disconnecting ends the instance (reason `client_gone`).")
    parser.add_argument("instance", metavar="INSTANCE", help="an instance id (see ps)")
    add_server_options(parser)
    parser.add_argument("--input", action="store_true",
                        help="send each line of stdin to the instance as a message")
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    async def body(client: Client) -> int:
        return await stream(await client.attach(args.instance), args.input)

    return run_with_client(args, body)
