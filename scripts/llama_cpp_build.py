#!/usr/bin/env python3
"""Build llama.cpp once, offline from PyPI, and cache it outside the repository.

llama.cpp ships no wheel of its command-line tools, but the `llama-cpp-python` source
distribution on PyPI vendors its whole tree. This module downloads that sdist with pip, unpacks
`vendor/llama.cpp` into the cache directory and builds `llama-server` and `llama-batched-bench`
there with CMake (Release, native CPU flags, no curl, no tests): about 15 minutes on 2 cores.
An interrupted build resumes where it stopped; a finished one is reused.

The cache directory is `--llama-cpp-dir`, else `$PIE_TRIO_LLAMA_CPP`, else
`~/.cache/pie-trio/llama.cpp/<version>` (under `$XDG_CACHE_HOME` when set). It may also point at
an existing llama.cpp build: any directory with the two binaries in `bin/` or `build/bin/`.

Needs CMake and a C/C++ compiler (Debian/Ubuntu: `apt-get install cmake g++`).

    python scripts/llama_cpp_build.py              # build (or find) it and print where it is
    nice -n 19 python scripts/llama_cpp_build.py   # the same, politely on a shared machine
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

VERSION = "0.3.36"  # llama-cpp-python; its vendored llama.cpp is what gets built
TARGETS = ("llama-server", "llama-batched-bench")
# LLAMA_USE_PREBUILT_UI=OFF: the server's web UI would be downloaded from Hugging Face at build
# time (the build is offline; llama-server serves its API without the UI).
CMAKE_OPTIONS = ("-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF",
                 "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF")
INSTALL_HINT = "install them with `apt-get install cmake g++` (Debian/Ubuntu)"
INFO_FILE = "build-info.json"


class Unavailable(Exception):
    """llama.cpp cannot be had here (no build tools, no build with --no-build, a failed build)."""


@dataclass(frozen=True)
class LlamaCpp:
    """A built llama.cpp: where its binaries are and what was built."""

    root: Path
    bin_dir: Path
    info: dict

    def binary(self, name: str) -> str:
        return str(self.bin_dir / name)


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def default_dir(version: str = VERSION) -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "pie-trio" / "llama.cpp" / version


def resolve_dir(explicit: str | os.PathLike | None, version: str = VERSION) -> Path:
    """--llama-cpp-dir, else $PIE_TRIO_LLAMA_CPP, else the default cache directory."""
    chosen = explicit or os.environ.get("PIE_TRIO_LLAMA_CPP")
    return Path(chosen).expanduser().resolve() if chosen else default_dir(version)


def source_dir(root: Path) -> Path:
    return root / "llama.cpp"


def find_binaries(root: Path) -> Path | None:
    """The directory holding both binaries, among the places a build puts them."""
    for candidate in (source_dir(root) / "build" / "bin", root / "build" / "bin", root / "bin",
                      root):
        if all(os.access(candidate / name, os.X_OK) for name in TARGETS):
            return candidate
    return None


def missing_tools() -> list[str]:
    """Build tools absent from PATH (honouring $CC / $CXX)."""
    missing = []
    if not shutil.which("cmake"):
        missing.append("cmake")
    if not shutil.which(os.environ.get("CXX", "")) and not any(
        shutil.which(name) for name in ("c++", "g++", "clang++")
    ):
        missing.append("a C++ compiler (g++)")
    if not shutil.which(os.environ.get("CC", "")) and not any(
        shutil.which(name) for name in ("cc", "gcc", "clang")
    ):
        missing.append("a C compiler (gcc)")
    return missing


def read_info(root: Path) -> dict:
    try:
        return json.loads((root / INFO_FILE).read_text())
    except (OSError, ValueError):
        return {}


def ensure(explicit_dir: str | os.PathLike | None = None, *, build: bool = True,
           jobs: int | None = None, version: str = VERSION) -> LlamaCpp:
    """Find the built binaries, building them first when needed and allowed.

    Raises `Unavailable` with a message that says what to do when they cannot be had.
    """
    root = resolve_dir(explicit_dir, version)
    found = find_binaries(root)
    if found is not None:  # ours (with its record) or a user's own build, taken as is
        return LlamaCpp(root, found, read_info(root) or {"source": "existing build"})
    if not build:
        raise Unavailable(f"llama.cpp is not built in {root} (--no-build given); run "
                          "`python scripts/llama_cpp_build.py` or drop --no-build")
    missing = missing_tools()
    if missing:
        raise Unavailable(f"cannot build llama.cpp: {' and '.join(missing)} not found; "
                          f"{INSTALL_HINT}")
    build_from_sdist(root, version, jobs or os.cpu_count() or 1)
    found = find_binaries(root)
    if found is None:
        raise Unavailable(f"the build finished but {', '.join(TARGETS)} are not in {root}")
    return LlamaCpp(root, found, read_info(root))


# -- the build ----------------------------------------------------------------------------------


def build_from_sdist(root: Path, version: str, jobs: int) -> None:
    started = time.monotonic()
    source = source_dir(root)
    if not (source / "CMakeLists.txt").exists():
        fetch_source(root, version)
    progress(f"llama.cpp: configuring in {source / 'build'}")
    run_logged(["cmake", "-B", "build", *CMAKE_OPTIONS], source, root / "configure.log")
    progress(f"llama.cpp: building {' '.join(TARGETS)} with {jobs} jobs "
             "(about 15 minutes on 2 cores; an interrupted build resumes)")
    run_logged(["cmake", "--build", "build", "-j", str(jobs), "--target", *TARGETS], source,
               root / "build.log", show_percent=True)
    seconds = round(time.monotonic() - started)
    info = {"llama_cpp_python": version, "cmake_options": list(CMAKE_OPTIONS),
            "targets": list(TARGETS), "build_seconds": seconds, "jobs": jobs,
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    (root / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    progress(f"llama.cpp: built in {seconds // 60} min {seconds % 60} s")


def fetch_source(root: Path, version: str) -> None:
    """pip-download the llama-cpp-python sdist and unpack its vendor/llama.cpp into root."""
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="llama-cpp-sdist-") as tmp:
        progress(f"llama.cpp: downloading the llama-cpp-python=={version} sdist with pip "
                 "(a few minutes: pip prepares its metadata)")
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                   f"llama-cpp-python=={version}", "-d", tmp]
        done = subprocess.run(command, capture_output=True, text=True)
        archives = list(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        if done.returncode != 0 or not archives:
            raise Unavailable(f"pip download failed ({done.returncode}): "
                              f"{(done.stderr or done.stdout).strip()[-500:]}")
        progress(f"llama.cpp: unpacking vendor/llama.cpp into {source_dir(root)}")
        unpack_vendored(archives[0], root)


def unpack_vendored(archive: Path, root: Path) -> None:
    staging = root / "llama.cpp.partial"
    shutil.rmtree(staging, ignore_errors=True)
    with tarfile.open(archive) as tar:
        top = tar.getmembers()[0].name.split("/")[0]
        prefix = f"{top}/vendor/llama.cpp/"
        members = []
        for member in tar.getmembers():
            if member.name.startswith(prefix) and (member.isfile() or member.isdir()):
                member.name = member.name[len(prefix):]
                members.append(member)
        tar.extractall(staging, members=members, filter="data")
    if not (staging / "CMakeLists.txt").exists():
        raise Unavailable(f"{archive.name} has no vendor/llama.cpp")
    shutil.rmtree(source_dir(root), ignore_errors=True)
    staging.rename(source_dir(root))


def run_logged(command: list[str], cwd: Path, log: Path, show_percent: bool = False) -> None:
    """Run a build step, its output to `log`; with show_percent, echo progress every 10%."""
    shown = -10
    started = time.monotonic()
    with open(log, "w", buffering=1) as out:  # line-buffered: `tail -f` shows progress
        process = subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True)
        assert process.stdout is not None
        try:
            for line in process.stdout:
                out.write(line)
                percent = _percent(line) if show_percent else None
                if percent is not None and percent >= shown + 10:
                    shown = percent
                    elapsed = round(time.monotonic() - started)
                    progress(f"  [{percent:3d}%] {elapsed // 60}:{elapsed % 60:02d} "
                             f"{line.split('] ', 1)[-1].strip()[:90]}")
        finally:
            if process.poll() is None:
                process.terminate()
            code = process.wait()
    if code != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-15:]
        raise Unavailable(f"`{' '.join(command)}` failed ({code}); see {log}:\n  "
                          + "\n  ".join(tail))


def _percent(line: str) -> int | None:
    if line.startswith("[") and "%]" in line[:6]:
        try:
            return int(line[1:line.index("%]")])
        except ValueError:
            return None
    return None


def version_of(binary: str) -> str:
    """`binary --version` in one line (llama.cpp prints it on stderr)."""
    try:
        done = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({exc})"
    lines = [line for line in (done.stderr + done.stdout).splitlines() if "version" in line]
    return lines[0].strip() if lines else "unknown"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="Needs cmake and g++: " + INSTALL_HINT + ".")
    parser.add_argument("--llama-cpp-dir", metavar="DIR",
                        help="where llama.cpp is built or cached (default: $PIE_TRIO_LLAMA_CPP, "
                             f"else {default_dir()})")
    parser.add_argument("--jobs", type=int, default=None,
                        help="parallel compile jobs (default: one per core)")
    args = parser.parse_args()
    try:
        built = ensure(args.llama_cpp_dir, jobs=args.jobs)
    except Unavailable as exc:
        progress(f"llama.cpp unavailable: {exc}")
        return 0
    print(built.bin_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
