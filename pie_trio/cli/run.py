"""`pie-trio run PROGRAM [options] -- ARGS`: run an inferlet and stream what it says.

PROGRAM is a `.wasm` file (uploaded first unless the server has it), a BLAKE3 hash of an
uploaded program, or a built-in name such as `text-completion`. Text the instance sends
(`message` events) and its stdout go to stdout as they arrive; its stderr goes to stderr. The
exit code is 0 when the instance finishes (or is detached, see `pie-trio detach`), 1 otherwise
(the reason goes to stderr). With `--detach` it prints the instance id and exits at once;
`pie-trio attach ID` streams it later.
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

import trio

from pie_trio.cli import Subparsers
from pie_trio.client.client import Client, Event, RemoteInstance
from pie_trio.client.options import add_server_options, fail, run_with_client


def add_parser(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        "run", help="run an inferlet and stream its output",
        description="Run an inferlet on a server (or in this process with --local) and stream "
                    "its output as it comes: messages it sends and its stdout to stdout, its "
                    "stderr to stderr. Options go before `--`; everything after `--` is passed "
                    "to the inferlet as its arguments. Exit code 0 when the instance finishes (or "
                    "is detached), 1 when it ends any other way (the reason is printed to "
                    "stderr).",
        epilog="example: pie-trio run text-completion -- --prompt 'Once upon a time' "
               "--max-tokens 32")
    parser.add_argument("program", metavar="PROGRAM",
                        help="a .wasm file, an uploaded program's hash, or a built-in name")
    add_server_options(parser)
    parser.add_argument("--local", action="store_true",
                        help="run in this process on the default model instead of on a server "
                             "(messages go to stdout; the program's stdout, stderr and its end "
                             "go to stderr, marked [stdout], [stderr], [terminated: ...])")
    parser.add_argument("--detach", action="store_true",
                        help="launch it detached: print its instance id and exit; the server "
                             "holds its output until `pie-trio attach ID`")
    parser.add_argument("--input", action="store_true",
                        help="send each line of stdin to the instance as a message (what it "
                             "reads with `receive`); not with --local")
    parser.add_argument("args", nargs=argparse.REMAINDER, metavar="-- ARGS",
                        help="arguments for the inferlet")
    parser.set_defaults(func=main, run_parser=parser)


def split_program_args(args: argparse.Namespace) -> list[str]:
    """The inferlet's arguments, after parsing this verb's options written after PROGRAM.

    argparse hands everything after PROGRAM to the remainder, so `run PROG --server URL -- X`
    arrives as ["--server", "URL", "--", "X"]. Everything before `--` is this verb's options;
    without `--`, the leading words that are this verb's options are, the rest is the
    inferlet's (`run PROG --server URL --prompt hi`)."""
    rest: list[str] = args.args
    if "--" in rest:
        split = rest.index("--")
    else:
        split = _leading_options(args.run_parser, rest)
    args.run_parser.parse_args([*rest[:split], args.program], namespace=args)
    return rest[split + 1:] if split < len(rest) and rest[split] == "--" else rest[split:]


def _leading_options(parser: argparse.ArgumentParser, words: list[str]) -> int:
    """How many leading words are options of `parser` (with their values)."""
    i = 0
    while i < len(words):
        name, has_value, _ = words[i].partition("=")
        action = parser._option_string_actions.get(name)
        if action is None:
            break
        i += 1 if has_value or action.nargs == 0 else 2
    return min(i, len(words))


def main(args: argparse.Namespace) -> int:
    program_args = split_program_args(args)
    path = Path(args.program)
    is_file = args.program.endswith(".wasm") or path.is_file()
    if args.local and (args.input or args.detach):
        return fail("--input and --detach need a server: they cannot be combined with --local")
    if args.detach and args.input:
        return fail("--input cannot be combined with --detach (use it with `pie-trio attach`)")
    if args.local:
        return run_local_program(path if is_file else args.program, program_args)
    wasm = None
    if is_file:
        try:
            wasm = path.read_bytes()
        except OSError as exc:
            return fail(f"cannot read {path}: {exc.strerror}")

    async def body(client: Client) -> int:
        program = args.program if wasm is None else await client.upload(wasm)
        instance = await client.launch(program, program_args, detached=args.detach)
        if args.detach:
            print(instance.id)
            return 0
        return await stream(instance, args.input)

    return run_with_client(args, body)


async def stream(instance: RemoteInstance, forward_stdin: bool) -> int:
    """Print the instance's events until it ends or is detached; the exit code (shared with
    `pie-trio attach`)."""
    printer = EventPrinter()
    async with trio.open_nursery() as nursery:
        if forward_stdin:
            nursery.start_soon(_forward_stdin, instance)
        async for event in instance.events():
            printer.show(event)
        nursery.cancel_scope.cancel()
    return printer.exit_code


def run_local_program(program: str | Path, program_args: list[str]) -> int:
    """`--local`: the model and the stack on it in this process, one instance
    (pie_trio/cli/local.py prints its events and picks the exit code)."""
    from pie_trio.cli.local import run_local  # loads torch: only when asked for

    return trio.run(partial(run_local, program, program_args))


async def _forward_stdin(instance: RemoteInstance) -> None:
    # A thread blocked in readline cannot be interrupted: abandon it when the instance ends.
    while line := await trio.to_thread.run_sync(sys.stdin.readline, abandon_on_cancel=True):
        await instance.signal(line.rstrip("\n"))


class EventPrinter:
    """Writes events to stdout/stderr as they arrive and remembers how the instance ended."""

    def __init__(self) -> None:
        self.exit_code = 1
        self.printed = False
        self.at_line_start = True

    def show(self, event: Event) -> None:
        if event.kind in ("message", "stdout"):
            self._write(sys.stdout, event.text or "")
        elif event.kind == "stderr":
            sys.stderr.write(event.text or "")
            sys.stderr.flush()
        elif event.kind == "return" and not self.printed:
            self._write(sys.stdout, event.text or "")  # only when nothing was streamed
        elif event.kind == "detached":
            if not self.at_line_start:
                self._write(sys.stdout, "\n")
            self.exit_code = 0
            print(f"pie-trio: instance detached; it runs on (pie-trio attach {event.instance})",
                  file=sys.stderr)
        elif event.kind == "terminated":
            if not self.at_line_start:
                self._write(sys.stdout, "\n")
            if event.reason == "finished":
                self.exit_code = 0
            else:
                detail = f": {event.detail}" if event.detail else ""
                print(f"pie-trio: instance ended: {event.reason}{detail}", file=sys.stderr)

    def _write(self, stream: object, text: str) -> None:
        if not text:
            return
        self.printed = True
        self.at_line_start = text.endswith("\n")
        stream.write(text)  # type: ignore[attr-defined]
        stream.flush()  # type: ignore[attr-defined]
