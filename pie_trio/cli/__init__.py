"""The `pie-trio` command line: one module per verb, each exposing `add_parser(subparsers)`.

Each verb module registers its own sub-parser and sets `func` (a callable taking the parsed
arguments and returning an exit code), so verbs stay independent of one another.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import TypeAlias

# What each verb's `add_parser` receives: the registry its sub-parser is added to.
Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"

VERBS = ["serve", "run", "complete", "upload", "ps", "attach", "detach", "kill", "models",
         "build"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pie-trio",
        description=(
            "pie-trio serves programs, not prompts: inferlets (WebAssembly modules) drive "
            "generation through fine-grained calls that the server batches into one forward "
            "pass per tick."
        ),
    )
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for verb in VERBS:
        try:
            module = importlib.import_module(f"pie_trio.cli.{verb}")
        except ModuleNotFoundError as exc:
            if exc.name != f"pie_trio.cli.{verb}":
                raise
            continue
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
