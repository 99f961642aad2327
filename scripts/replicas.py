#!/usr/bin/env python3
"""Several `pie-trio serve` replicas behind HAProxy on this host, until Ctrl-C or SIGTERM.

Starts N replicas (each on free HTTP and TCP ports, all sharing one program cache directory),
renders deploy/haproxy.cfg for them, runs `haproxy` in the foreground on it, and prints the
balancer's addresses once every replica is up behind it:

    balancer http://127.0.0.1:PORT (OpenAI API, /ws, /health, /metrics)
    balancer tcp://127.0.0.1:PORT (msgpack over TCP)
    replica r1 http://127.0.0.1:PORT tcp://127.0.0.1:PORT pid PID

Stopping sends SIGTERM to every replica (each drains and exits 0), then stops HAProxy. The
replicas' and HAProxy's logs are in the work directory (`--dir`, default a temporary one).
tests/test_replicas.py and scripts/bench_replicas.py use `running_replicas`.

    python scripts/replicas.py --replicas 2 --model tiny
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

TEMPLATE = Path(__file__).resolve().parent.parent / "deploy" / "haproxy.cfg"
# What the example in deploy/haproxy.cfg names, replaced when it is rendered.
EXAMPLE_HTTP_BIND = "127.0.0.1:8080"
EXAMPLE_TCP_BIND = "127.0.0.1:8081"
EXAMPLE_R1_HTTP_PORT = "8180"
EXAMPLE_R1_TCP_PORT = "8280"
START_TIMEOUT = 300.0  # seconds for a replica to load its model and listen, on a busy machine
STOP_TIMEOUT = 30.0


@dataclass
class Replica:
    """One started `pie-trio serve`, named as HAProxy names its server."""

    name: str
    process: subprocess.Popen[bytes]
    http: str  # http://HOST:PORT
    tcp: str  # tcp://HOST:PORT
    log: Path

    @property
    def http_port(self) -> int:
        return _port(self.http)

    @property
    def tcp_port(self) -> int:
        return _port(self.tcp)


@dataclass
class Cluster:
    """The balancer's addresses and what runs behind it."""

    http: str
    tcp: str
    replicas: list[Replica]
    haproxy: subprocess.Popen[bytes]
    directory: Path

    def replica(self, name: str) -> Replica:
        return next(r for r in self.replicas if r.name == name)

    def logs(self) -> str:
        """Every log, for a failing test's report."""
        paths = [r.log for r in self.replicas] + [self.directory / "haproxy.log"]
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-4000:]}" for p in paths
                         if p.exists())


# -- the HAProxy configuration --------------------------------------------------------------------


def render_config(template: str, replicas: Sequence[Replica], http_bind: str,
                  tcp_bind: str) -> str:
    """deploy/haproxy.cfg for these replicas and bind addresses: each `server r1` line is
    repeated per replica with its name, id and ports; the example's other servers are dropped."""
    lines: list[str] = []
    for line in template.splitlines():
        words = line.split()
        if words[:1] == ["bind"]:
            line = line.replace(EXAMPLE_HTTP_BIND, http_bind).replace(EXAMPLE_TCP_BIND, tcp_bind)
        elif words[:2] == ["server", "r1"]:
            lines.extend(_server_line(line, index, replica)
                         for index, replica in enumerate(replicas, 1))
            continue
        elif words[:1] == ["server"]:
            continue
        lines.append(line)
    return "\n".join(lines) + "\n"


def _server_line(pattern: str, index: int, replica: Replica) -> str:
    host = replica.http.split("://")[1].rsplit(":", 1)[0]
    line = pattern.replace("server r1 ", f"server {replica.name} ")
    line = line.replace(" id 1 ", f" id {index} ")
    line = line.replace(f"127.0.0.1:{EXAMPLE_R1_HTTP_PORT}", f"{host}:{replica.http_port}")
    line = line.replace(f"127.0.0.1:{EXAMPLE_R1_TCP_PORT}", f"{host}:{replica.tcp_port}")
    return re.sub(rf"\bport {EXAMPLE_R1_HTTP_PORT}\b", f"port {replica.http_port}", line)


# -- processes ------------------------------------------------------------------------------------


def start_replica(name: str, model: str, cache_dir: Path, directory: Path,
                  extra: Sequence[str] = ()) -> subprocess.Popen[bytes]:
    """`pie-trio serve` on free ports; its own session, so a terminal's Ctrl-C reaches only
    this script, which then stops the replicas in order."""
    command = [sys.executable, "-m", "pie_trio", "serve", "--model", model, "--http-port", "0",
               "--tcp-port", "0", "--program-cache-dir", str(cache_dir),
               # Every client reaches a replica from the balancer's address.
               "--max-connections-per-peer", "1024", "--log-level", "warning", *extra]
    with open(directory / f"{name}.log", "w") as log:
        return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"},
                                start_new_session=True)


def wait_listening(name: str, process: subprocess.Popen[bytes], log: Path) -> Replica:
    """The replica once it has printed its addresses (the `pie-trio serving` lines)."""
    urls: dict[str, str] = {}
    for line in _lines(process, time.monotonic() + START_TIMEOUT):
        if line.startswith("pie-trio serving "):
            url = line.split()[2]
            urls[url.split("://")[0]] = url
        if {"http", "ws", "tcp"} <= urls.keys():
            return Replica(name, process, urls["http"], urls["tcp"], log)
    raise RuntimeError(f"replica {name} did not listen within {START_TIMEOUT:.0f} s "
                       f"(exit status {process.poll()}); see {log}")


def _lines(process: subprocess.Popen[bytes], deadline: float) -> Iterator[str]:
    """Lines of the process's stdout until it closes or the deadline passes."""
    assert process.stdout is not None
    descriptor, buffer = process.stdout.fileno(), b""
    while (left := deadline - time.monotonic()) > 0:
        if not select.select([descriptor], [], [], left)[0]:
            return
        chunk = os.read(descriptor, 4096)
        if not chunk:
            return
        *lines, buffer = (buffer + chunk).split(b"\n")
        yield from (line.decode(errors="replace") for line in lines)


def start_haproxy(config: Path, directory: Path) -> subprocess.Popen[bytes]:
    executable = shutil.which("haproxy")
    if executable is None:
        raise RuntimeError("haproxy is not installed (Debian: apt-get install -y haproxy)")
    check = subprocess.run([executable, "-c", "-q", "-f", str(config)], capture_output=True,
                           text=True)
    if check.returncode != 0:
        raise RuntimeError(f"haproxy refused {config}:\n{check.stdout}{check.stderr}")
    with open(directory / "haproxy.log", "w") as log:
        return subprocess.Popen([executable, "-db", "-f", str(config)], stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)


def wait_routable(http: str, process: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    """Until the balancer answers /health with 200 (it listens, and a replica is up)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"haproxy exited with {process.returncode}")
        try:
            with urllib.request.urlopen(f"{http}/health", timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the balancer at {http} did not answer /health within {timeout:.0f} s")


def stop(process: subprocess.Popen[bytes]) -> int:
    """SIGTERM (a replica drains), then SIGKILL if it takes longer than STOP_TIMEOUT."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        status = process.wait(timeout=STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        status = process.wait()
    if process.stdout is not None:
        process.stdout.close()
    return status


def free_port(host: str) -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


# -- the whole ------------------------------------------------------------------------------------


@contextlib.contextmanager
def running_replicas(count: int, model: str = "default", *, host: str = "127.0.0.1",
                     directory: Path | None = None,
                     extra_args: Sequence[str] = ()) -> Iterator[Cluster]:
    """`count` replicas behind HAProxy; leaving stops the replicas (each drains while HAProxy
    still carries its clients' streams), then HAProxy."""
    with contextlib.ExitStack() as cleanup:
        if directory is None:
            directory = Path(cleanup.enter_context(tempfile.TemporaryDirectory(
                prefix="pie-trio-replicas-")))
        directory.mkdir(parents=True, exist_ok=True)
        cache_dir = directory / "programs"  # content-addressed: every replica may share it
        names = [f"r{i}" for i in range(1, count + 1)]
        processes = {n: start_replica(n, model, cache_dir, directory, extra_args) for n in names}
        for process in processes.values():
            cleanup.callback(stop, process)
        replicas = [wait_listening(n, p, directory / f"{n}.log") for n, p in processes.items()]
        http_bind, tcp_bind = (f"{host}:{free_port(host)}" for _ in range(2))
        config = directory / "haproxy.cfg"
        config.write_text(render_config(TEMPLATE.read_text(), replicas, http_bind, tcp_bind))
        haproxy = start_haproxy(config, directory)
        cleanup.callback(stop, haproxy)
        for process in processes.values():  # again, to run before HAProxy's (stop is idempotent)
            cleanup.callback(stop, process)
        cluster = Cluster(f"http://{http_bind}", f"tcp://{tcp_bind}", replicas, haproxy,
                          directory)
        wait_routable(cluster.http, haproxy)
        yield cluster


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--replicas", type=int, default=2, help="how many (default: 2)")
    parser.add_argument("--model", default="default", help="each replica's model")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--dir", type=Path, help="work directory: logs, config, program cache")
    parser.add_argument("serve_args", nargs="*", help="more `pie-trio serve` flags, after --")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, _interrupt)  # stops everything the way Ctrl-C does
    try:
        with running_replicas(args.replicas, args.model, host=args.host, directory=args.dir,
                              extra_args=args.serve_args) as cluster:
            print(f"balancer {cluster.http} (OpenAI API, /ws, /health, /metrics)", flush=True)
            print(f"balancer {cluster.tcp} (msgpack over TCP)", flush=True)
            for r in cluster.replicas:
                print(f"replica {r.name} {r.http} {r.tcp} pid {r.process.pid}", flush=True)
            print(f"logs and config in {cluster.directory}", flush=True)
            cluster.haproxy.wait()
            print("haproxy exited; stopping", file=sys.stderr)
            return 1
    except KeyboardInterrupt:
        print("stopping", file=sys.stderr)
        return 0


if __name__ == "__main__":
    sys.exit(main())
