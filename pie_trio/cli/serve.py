"""`pie-trio serve`: run the server (HTTP + WebSocket, TCP, runtime, executor) until SIGTERM.

Every setting of pie_trio/config.py is a flag here (`--http-port`), an environment variable
(`PIE_TRIO_HTTP_PORT`) and a TOML key (`http_port`); flags win over the environment, which wins
over the file given with `--config`.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

import trio

from pie_trio.cli import Subparsers
from pie_trio.config import Config, ConfigError, settings


def add_parser(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        "serve", help="run the server",
        description="Serve inferlets over WebSocket (/ws) and TCP, and the OpenAI-compatible "
                    "API (/v1/completions, /v1/chat/completions, /v1/models) with /health and "
                    "/metrics over HTTP. Settings come from --config FILE, then PIE_TRIO_* "
                    "environment variables, then these flags. SIGTERM or SIGINT drains: new "
                    "work is refused, running instances end (reason `evicted`) and their "
                    "clients are told, WebSockets close with 1001, and the process exits 0.",
)
    parser.add_argument("--config", metavar="FILE", help="TOML file with settings")
    for field in settings():
        flag = field.metadata.get("flag") or "--" + field.name.replace("_", "-")
        if field.metadata.get("repeat"):
            parser.add_argument(flag, dest=field.name, action="append", metavar="TENANT:KEY",
                                help=field.metadata["help"])
        else:
            aliases = field.metadata.get("aliases", ())
            parser.add_argument(flag, *aliases, dest=field.name, metavar=field.name.upper(),
                                help=_help(field))
    parser.set_defaults(func=main)


def _help(field: dataclasses.Field[object]) -> str:
    text: str = field.metadata["help"]
    if field.default is dataclasses.MISSING or field.default is None or "default:" in text:
        return text
    return f"{text} (default: {field.default})"


def config_from_args(args: argparse.Namespace) -> Config:
    overrides = {f.name: getattr(args, f.name) for f in settings()
                 if getattr(args, f.name, None) is not None}
    return Config.load(args.config, overrides=overrides)


def main(args: argparse.Namespace) -> int:
    # Imported here so `pie-trio --help` and the client verbs do not pay for torch.
    from pie_trio.server.logs import configure_logging
    from pie_trio.server.serve import serve

    try:
        config = config_from_args(args)
    except ConfigError as exc:
        print(f"pie-trio serve: {exc}", file=sys.stderr)
        return 2
    configure_logging(config.log_level, config.log_format)

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            addresses = await nursery.start(serve, config)
            # One plain line per address on stdout, for people and for scripts waiting on it.
            print(f"pie-trio serving {addresses.http} (OpenAI API, /health, /metrics)",
                  flush=True)
            print(f"pie-trio serving {addresses.ws} (WebSocket)", flush=True)
            if addresses.tcp:
                print(f"pie-trio serving {addresses.tcp} (msgpack over TCP)", flush=True)

    try:
        trio.run(run)
    except (OSError, ValueError, BaseExceptionGroup) as exc:
        # e.g. the port is taken, or the model does not split over --tensor-parallel N
        error = _first(exc, (OSError, ValueError))
        if error is None:
            raise
        print(f"pie-trio serve: {error}", file=sys.stderr)
        return 1
    return 0


def _first(exc: BaseException,
           kind: type[BaseException] | tuple[type[BaseException], ...]) -> BaseException | None:
    """The first `kind` in `exc`, looking inside exception groups (nurseries wrap errors)."""
    if isinstance(exc, kind):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            if (found := _first(inner, kind)) is not None:
                return found
    return None
