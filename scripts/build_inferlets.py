"""Build the Rust inferlets (the `inferlet` SDK and inferlets/examples/*) to WebAssembly.

    python scripts/build_inferlets.py                 build all, install the built-in programs
    python scripts/build_inferlets.py --no-install    build all, leave pie_trio/builtin alone
    python scripts/build_inferlets.py --check         rebuild; fail if the shipped built-ins differ
    python scripts/build_inferlets.py --reproducible  build copies in two temp dirs, compare bytes
    python scripts/build_inferlets.py --test          the SDK's unit tests, natively

Every example's module lands in inferlets/target/wasm/<name>.wasm; the built-in programs
(BUILTINS) are also copied to pie_trio/builtin/<name>.wasm, which the package ships.

Toolchains, in order of preference:
  debian  /usr/bin/rustc + /usr/bin/cargo with target wasm32-wasi (apt: rustc cargo
          libstd-rust-dev-wasm32 librust-serde-dev librust-serde-derive-dev librust-rmp-serde-dev),
          offline against /usr/share/cargo/registry with the committed Cargo.lock. The shipped
          built-ins are this toolchain's output, so `--check` needs it.
  rustup  rustc/cargo on PATH with `rustup target add wasm32-wasip1`; crates come from crates.io
          (the committed Cargo.lock is Debian's, so the workspace is built from a copy without it).

Reproducibility: the modules must not depend on where the checkout lives (CI builds a fresh
clone elsewhere). Cargo passes the workspace's own sources as relative paths, but paths of
generic code instantiated across crates, of the registry and of the cargo home end up in panic
messages as absolute paths; `--remap-path-prefix` rewrites them to fixed names. The release
profile (inferlets/Cargo.toml) strips symbols and uses one codegen unit with LTO.
"""

from __future__ import annotations

import argparse
import filecmp
import os
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
INFERLETS = ROOT / "inferlets"
BUILTIN_DIR = ROOT / "pie_trio" / "builtin"
# The rustup build works on a copy of the workspace outside inferlets/, where cargo does not
# pick up inferlets/.cargo/config.toml (the Debian registry) and the Debian Cargo.lock is absent.
RUSTUP_WORKSPACE = ROOT / "build" / "inferlets-rustup"

# Programs shipped with the package; the other examples (adversarial) stay build outputs.
BUILTINS = ("text-completion", "parallel-generation", "beam-search", "openai-completion")

DEBIAN_RUSTC = Path("/usr/bin/rustc")
DEBIAN_CARGO = Path("/usr/bin/cargo")
# Debian's rustc ships `rust-lld` as a link into lld-14, which it only recommends: without that
# package the link dangles and every wasm32 build fails at the link step.
DEBIAN_LINKER = Path("/usr/bin/rust-lld")
DEBIAN_REGISTRY = Path("/usr/share/cargo/registry")
DEBIAN_CRATES = ("serde", "serde_derive", "rmp-serde", "rmp")

Log = Callable[[str], None]


class BuildError(RuntimeError):
    """The build could not run or its result is wrong; the message says what to do."""


@dataclass(frozen=True)
class Toolchain:
    kind: str  # "debian" or "rustup"
    cargo: str
    rustc: str
    target: str

    def describe(self) -> str:
        return f"{self.kind} ({self.rustc}, target {self.target})"


def _sysroot_has_target(rustc: str, target: str) -> bool:
    try:
        sysroot = subprocess.run(
            [rustc, "--print", "sysroot"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return False
    return (Path(sysroot) / "lib" / "rustlib" / target).is_dir()


def debian_toolchain_missing() -> list[str]:
    """What the Debian toolchain lacks on this machine (empty when it is complete)."""
    missing = []
    if not DEBIAN_RUSTC.exists():
        missing.append(f"{DEBIAN_RUSTC} (apt: rustc)")
    elif not _sysroot_has_target(str(DEBIAN_RUSTC), "wasm32-wasi"):
        missing.append("the wasm32-wasi standard library (apt: libstd-rust-dev-wasm32)")
    if not DEBIAN_CARGO.exists():
        missing.append(f"{DEBIAN_CARGO} (apt: cargo)")
    if not DEBIAN_LINKER.exists():  # exists() follows the link: False when it dangles
        missing.append(f"the wasm32 linker {DEBIAN_LINKER} (apt: lld-14)")
    for crate in DEBIAN_CRATES:
        if not any(DEBIAN_REGISTRY.glob(f"{crate}-[0-9]*")):
            missing.append(f"crate {crate} in {DEBIAN_REGISTRY} (apt: librust-{crate}-dev)")
    return missing


def debian_toolchain() -> Toolchain | None:
    if debian_toolchain_missing():
        return None
    return Toolchain("debian", str(DEBIAN_CARGO), str(DEBIAN_RUSTC), "wasm32-wasi")


def rustup_toolchain() -> Toolchain | None:
    rustc, cargo = shutil.which("rustc"), shutil.which("cargo")
    if not rustc or not cargo or Path(rustc).resolve() == DEBIAN_RUSTC:
        return None
    if not _sysroot_has_target(rustc, "wasm32-wasip1"):
        return None
    return Toolchain("rustup", cargo, rustc, "wasm32-wasip1")


def find_toolchain() -> Toolchain:
    toolchain = debian_toolchain() or rustup_toolchain()
    if toolchain is None:
        missing = debian_toolchain_missing()
        if DEBIAN_RUSTC.exists() and missing:  # a partial Debian install: name what it lacks
            raise BuildError(
                "Debian's Rust toolchain for wasm32-wasi is incomplete; missing: "
                + "; ".join(missing) + " (scripts/setup.sh installs all of it)"
            )
        raise BuildError(
            "no Rust toolchain for WebAssembly: install Debian's (apt-get install rustc cargo "
            "libstd-rust-dev-wasm32 lld-14 librust-serde-dev librust-serde-derive-dev "
            "librust-rmp-serde-dev) or run `rustup target add wasm32-wasip1`"
        )
    return toolchain


def example_names(source: Path = INFERLETS) -> list[str]:
    """The workspace members under examples/ (each builds <name>.wasm)."""
    manifest = tomllib.loads((source / "Cargo.toml").read_text())
    members = manifest["workspace"]["members"]
    return [member.split("/", 1)[1] for member in members if member.startswith("examples/")]


def _cargo_home(env: dict[str, str]) -> Path:
    return Path(env.get("CARGO_HOME", Path.home() / ".cargo"))


def _remap_flags(source: Path, cargo_home: Path) -> list[str]:
    # rustc applies the last matching prefix: the workspace comes last so it wins even if it
    # lies inside one of the others.
    return [
        f"--remap-path-prefix={DEBIAN_REGISTRY}=/cargo-registry",
        f"--remap-path-prefix={cargo_home}=/cargo-home",
        f"--remap-path-prefix={source}=inferlets",
    ]


def _cargo_env(
    toolchain: Toolchain, source: Path, target_dir: Path, cargo_home: Path | None = None
) -> dict[str, str]:
    # Drop the caller's compiler settings: they would change the output bytes.
    ignored = ("RUSTFLAGS", "RUSTC", "RUSTDOC", "CARGO_BUILD_", "CARGO_ENCODED_", "CARGO_PROFILE_")
    env = {key: value for key, value in os.environ.items() if not key.startswith(ignored)}
    if cargo_home is not None:
        env["CARGO_HOME"] = str(cargo_home)
    env["RUSTC"] = toolchain.rustc
    env["CARGO_TARGET_DIR"] = str(target_dir)
    env["CARGO_ENCODED_RUSTFLAGS"] = "\x1f".join(_remap_flags(source, _cargo_home(env)))
    if toolchain.kind == "debian":
        env["RUSTDOC"] = str(DEBIAN_RUSTC.with_name("rustdoc"))
    return env


def _prepare_rustup_workspace() -> Path:
    """A copy of the workspace without the Debian-only Cargo.lock and .cargo/config.toml."""
    if RUSTUP_WORKSPACE.exists():
        shutil.rmtree(RUSTUP_WORKSPACE)
    shutil.copytree(
        INFERLETS, RUSTUP_WORKSPACE, ignore=shutil.ignore_patterns("target", ".cargo", "Cargo.lock")
    )
    return RUSTUP_WORKSPACE


def _run(command: list[str], cwd: Path, env: dict[str, str], log: Log) -> None:
    log(f"$ {' '.join(command)}   (in {cwd})")
    result = subprocess.run(command, cwd=cwd, env=env)
    if result.returncode != 0:
        raise BuildError(f"`{' '.join(command)}` failed with exit status {result.returncode}")


def build(
    toolchain: Toolchain | None = None,
    source: Path = INFERLETS,
    target_dir: Path | None = None,
    log: Log = print,
    cargo_home: Path | None = None,
) -> dict[str, Path]:
    """Build every example; returns {name: path of its .wasm under <target_dir>/wasm/}.

    `cargo_home` overrides CARGO_HOME (the reproducibility check builds under another one)."""
    toolchain = toolchain or find_toolchain()
    source = source.resolve()
    target_dir = (target_dir or source / "target").resolve()
    command = [toolchain.cargo, "build", "--release", "--workspace", "--target", toolchain.target]
    if toolchain.kind == "debian":
        workspace = source
        command += ["--locked", "--offline"]
    else:
        if source != INFERLETS.resolve():
            raise BuildError("rustup builds use the repository's workspace only")
        workspace = _prepare_rustup_workspace()
    log(f"building {source} with {toolchain.describe()}")
    started = time.monotonic()
    _run(command, workspace, _cargo_env(toolchain, workspace, target_dir, cargo_home), log)
    outputs = _collect(toolchain, source, target_dir)
    log(f"built {len(outputs)} modules in {time.monotonic() - started:.1f} s")
    for name, path in outputs.items():
        log(f"  {path.stat().st_size:>8} bytes  {name}.wasm")
    return outputs


def _collect(toolchain: Toolchain, source: Path, target_dir: Path) -> dict[str, Path]:
    built = target_dir / toolchain.target / "release"
    out_dir = target_dir / "wasm"
    out_dir.mkdir(parents=True, exist_ok=True)
    outputs = {}
    for name in example_names(source):
        module = built / f"{name}.wasm"
        if not module.exists():
            raise BuildError(f"cargo reported success but {module} is missing")
        outputs[name] = out_dir / f"{name}.wasm"
        shutil.copyfile(module, outputs[name])
    return outputs


def install_builtins(outputs: dict[str, Path], log: Log = print) -> None:
    BUILTIN_DIR.mkdir(parents=True, exist_ok=True)
    for name in BUILTINS:
        shipped = BUILTIN_DIR / f"{name}.wasm"
        if shipped.exists() and filecmp.cmp(outputs[name], shipped, shallow=False):
            log(f"unchanged {shipped.relative_to(ROOT)}")
            continue
        shutil.copyfile(outputs[name], shipped)
        log(f"installed {shipped.relative_to(ROOT)}")


def check_builtins(outputs: dict[str, Path]) -> list[str]:
    """Why the shipped built-ins differ from a fresh build (empty when identical)."""
    problems = []
    for name in BUILTINS:
        shipped = BUILTIN_DIR / f"{name}.wasm"
        if not shipped.exists():
            problems.append(f"{shipped.relative_to(ROOT)} is missing")
        elif not filecmp.cmp(outputs[name], shipped, shallow=False):
            problems.append(
                f"{shipped.relative_to(ROOT)} ({shipped.stat().st_size} bytes) differs from the "
                f"rebuilt module ({outputs[name].stat().st_size} bytes)"
            )
    return problems


def verify_reproducible(toolchain: Toolchain, log: Log = print) -> list[str]:
    """Build two copies of the workspace in unrelated directories (the second also under
    another cargo home, as on another machine); list the modules that differ."""
    with tempfile.TemporaryDirectory() as first, tempfile.TemporaryDirectory() as second:
        copies = [
            (Path(first) / "checkout" / "inferlets", None),
            (Path(second) / "a" / "much" / "longer" / "path" / "inferlets", Path(second) / "home"),
        ]
        builds = []
        for copy, cargo_home in copies:
            shutil.copytree(INFERLETS, copy, ignore=shutil.ignore_patterns("target"))
            outputs = build(toolchain, copy, copy / "target", log=log, cargo_home=cargo_home)
            builds.append(outputs)
        differing = [
            name
            for name in builds[0]
            if not filecmp.cmp(builds[0][name], builds[1][name], shallow=False)
        ]
        for name in builds[0]:
            log(f"  {'DIFFERS' if name in differing else 'same   '}  {name}.wasm")
        return differing


def run_sdk_tests(toolchain: Toolchain, log: Log = print) -> None:
    """The SDK's unit tests (pure logic: wire format, text streaming, chat, arguments)."""
    if toolchain.kind != "debian":
        raise BuildError("--test uses the Debian toolchain's native target")
    target_dir = INFERLETS / "target"
    command = [toolchain.cargo, "test", "--locked", "--offline", "-p", "inferlet"]
    _run(command, INFERLETS, _cargo_env(toolchain, INFERLETS, target_dir), log)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="fail if shipped built-ins differ")
    mode.add_argument("--reproducible", action="store_true", help="build in two temp dirs, compare")
    mode.add_argument("--test", action="store_true", help="run the SDK's unit tests natively")
    mode.add_argument("--no-install", action="store_true", help="build only")
    args = parser.parse_args(argv)
    try:
        if args.check:
            toolchain = debian_toolchain()
            if toolchain is None:
                missing = "; ".join(debian_toolchain_missing())
                raise BuildError(f"--check needs the Debian toolchain; missing: {missing}")
            problems = check_builtins(build(toolchain))
            if problems:
                print("the shipped built-ins are stale or not reproducible:", file=sys.stderr)
                for problem in problems:
                    print(f"  {problem}", file=sys.stderr)
                print("rebuild them with: python scripts/build_inferlets.py", file=sys.stderr)
                return 1
            print(f"ok: {', '.join(BUILTINS)} match a fresh build")
        elif args.reproducible:
            differing = verify_reproducible(find_toolchain())
            if differing:
                print(f"not reproducible across directories: {differing}", file=sys.stderr)
                return 1
            print("ok: identical bytes from two different directories")
        elif args.test:
            run_sdk_tests(find_toolchain())
        else:
            outputs = build()
            if not args.no_install:
                install_builtins(outputs)
    except BuildError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
