"""`pie-trio build my_inferlet.py -o my_inferlet.wasm`: a Python inferlet as a component.

The inferlet is a Python file defining `main` (usually `async def main()`). It is wrapped in a
small entry module that exports the inferlet world (inferlets/wit/inferlet.wit) and handed to
`componentize-py` with the pure-Python SDK (inferlets/sdk/python) on its path. componentize-py
bundles CPython and imports the entry module at build time, so the inferlet starts from that
snapshot: a launch instantiates the component and calls `main`, nothing is imported again.
Nothing is downloaded: componentize-py is a Python package (the `test` extra).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from pie_trio.cli import Subparsers

REPOSITORY = Path(__file__).resolve().parents[2]
DEFAULT_WIT = REPOSITORY / "inferlets" / "wit"
DEFAULT_SDK = REPOSITORY / "inferlets" / "sdk" / "python"
WORLD = "inferlet"
ENTRY_MODULE = "inferlet_entry"
ENTRY = '''from inferlet.entry import make_world
import {module} as _program

WitWorld = make_world(_program.main)
'''


def add_parser(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        "build", help="build a Python inferlet into a WebAssembly component",
        description="Build a Python inferlet (a file defining `main`) into a component that "
                    "pie-trio runs like any program (upload it, or `pie-trio run FILE.wasm`).")
    parser.add_argument("source", type=Path, help="the inferlet's Python file")
    parser.add_argument("-o", "--output", type=Path, help="the component (default: SOURCE "
                        "with .wasm)")
    parser.add_argument("--sdk", type=Path, default=DEFAULT_SDK,
                        help="the Python SDK's directory (default: %(default)s)")
    parser.add_argument("--wit", type=Path, default=DEFAULT_WIT,
                        help="the inferlet WIT directory (default: %(default)s)")
    parser.add_argument("--path", type=Path, action="append", default=[],
                        help="another directory of pure-Python modules to bundle")
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    output = args.output or args.source.with_suffix(".wasm")
    try:
        build(args.source, output, sdk=args.sdk, wit=args.wit, paths=args.path)
    except BuildError as exc:
        print(f"pie-trio build: {exc}", file=sys.stderr)
        return 1
    print(f"built {output} ({output.stat().st_size} bytes)")
    return 0


class BuildError(RuntimeError):
    """The inferlet could not be built; the message says why."""


def build(source: Path, output: Path, *, sdk: Path = DEFAULT_SDK, wit: Path = DEFAULT_WIT,
          paths: list[Path] | None = None) -> Path:
    """Build `source` into the component `output`; its path. Raises BuildError."""
    if not source.is_file():
        raise BuildError(f"{source}: no such file")
    if not source.stem.isidentifier():
        raise BuildError(f"{source.name}: the file name must be a Python module name")
    tool = shutil.which("componentize-py") or _beside_python("componentize-py")
    if tool is None:
        raise BuildError("componentize-py is not installed (pip install componentize-py)")
    with tempfile.TemporaryDirectory(prefix="pie-trio-build-") as work:
        entry_dir = Path(work)
        (entry_dir / f"{ENTRY_MODULE}.py").write_text(ENTRY.format(module=source.stem))
        search = [entry_dir, source.resolve().parent, sdk.resolve(),
                  *(p.resolve() for p in paths or [])]
        command = [tool, "-d", str(wit), "-w", WORLD, "componentize"]
        for directory in search:
            command += ["-p", str(directory)]
        command += [ENTRY_MODULE, "-o", str(output.resolve())]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise BuildError(f"componentize-py failed:\n{done.stderr.strip() or done.stdout}")
    return output


def _beside_python(name: str) -> str | None:
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else None
