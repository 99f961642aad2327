"""`pie-trio upload PROGRAM.wasm`: send a program to a server (skipped if it has it already)."""

from __future__ import annotations

import argparse
from pathlib import Path

from pie_trio.cli import Subparsers
from pie_trio.client.client import Client
from pie_trio.client.options import add_server_options, fail, run_with_client


def add_parser(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        "upload", help="upload a program (.wasm) to a server and print its hash",
        description="Upload an inferlet to a server. Programs are named by the BLAKE3 hash of "
                    "their bytes; the upload is skipped when the server already has it. Prints "
                    "the hash, which `pie-trio run` accepts in place of the file.")
    parser.add_argument("program", metavar="PROGRAM.wasm", type=Path, help="the module to send")
    add_server_options(parser)
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    try:
        wasm = args.program.read_bytes()
    except OSError as exc:
        return fail(f"cannot read {args.program}: {exc.strerror}")

    async def body(client: Client) -> int:
        print(await client.upload(wasm))
        return 0

    return run_with_client(args, body)
