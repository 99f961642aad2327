"""Two `pie-trio serve` replicas behind HAProxy (deploy/haproxy.cfg, started by
scripts/replicas.py): OpenAI streams spread over both and all complete; WebSocket and TCP
sessions stick to one replica; SIGTERM to one replica under load loses no request that was not
already running on it (those end with an `evicted` error chunk), and every later request is
served by the other."""

from __future__ import annotations

import importlib.util
import json
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import trio

from pie_trio.client import connect

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "replicas.py"
TEXT_COMPLETION = ROOT / "pie_trio" / "builtin" / "text-completion.wasm"
STREAMS = 32
LONG_STREAMS = 4  # two per replica, still running when one replica is told to stop
LONG_TOKENS = 600  # within the tiny model's 256 KV pages of 16 per replica
LOAD_TIMEOUT = 300  # seconds for a whole load phase on a busy 2-core machine

pytestmark = pytest.mark.skipif(
    shutil.which("haproxy") is None,
    reason="haproxy is not installed (Debian: apt-get install -y haproxy; scripts/setup.sh "
           "installs it)")


def _load_replicas():  # the scripts are not a package
    spec = importlib.util.spec_from_file_location("replicas", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    return module


replicas = _load_replicas()


def test_the_example_and_a_rendered_configuration_are_valid(tmp_path):
    assert _haproxy_check(replicas.TEMPLATE), "deploy/haproxy.cfg"
    three = [replicas.Replica(f"r{i}", None, f"http://127.0.0.1:{9100 + i}",
                              f"tcp://127.0.0.1:{9200 + i}", tmp_path / "log")
             for i in (1, 2, 3)]
    text = replicas.render_config(replicas.TEMPLATE.read_text(), three, "127.0.0.1:9001",
                                  "127.0.0.1:9002")
    servers = [line.split() for line in text.splitlines() if line.split()[:1] == ["server"]]
    assert len(servers) == 9  # three backends, three replicas each
    assert ["server", "r3", "127.0.0.1:9203", "id", "3", "check", "port", "9103"] in servers
    assert "bind 127.0.0.1:9001" in text and "bind 127.0.0.1:9002" in text
    (tmp_path / "haproxy.cfg").write_text(text)
    assert _haproxy_check(tmp_path / "haproxy.cfg"), text


def _haproxy_check(config: Path) -> bool:
    return subprocess.run(["haproxy", "-c", "-q", "-f", str(config)]).returncode == 0


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """Two replicas behind the balancer, shared by the tests that stop none of them."""
    with replicas.running_replicas(2, "tiny", directory=tmp_path_factory.mktemp("lb")) as started:
        yield started


@pytest.fixture
def own_cluster(tmp_path: Path) -> Iterator[object]:
    with replicas.running_replicas(2, "tiny", directory=tmp_path) as started:
        yield started


@dataclass
class Outcome:
    """What one streamed completion saw through the balancer."""

    sent: float
    status: int = 0
    replica: str = ""
    tokens: int = 0  # usage.completion_tokens
    error: str = ""  # the error chunk's message, or the client's exception
    done: bool = False  # `data: [DONE]` arrived
    ended: float = 0.0

    @property
    def complete(self) -> bool:
        return self.status == 200 and self.done and not self.error


async def stream(http: httpx.AsyncClient, max_tokens: int,
                 started: trio.Event | None = None) -> Outcome:
    body = {"prompt": "Once upon a time", "max_tokens": max_tokens, "ignore_eos": True,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    outcome = Outcome(sent=time.monotonic())
    try:
        async with http.stream("POST", "/v1/completions", json=body) as response:
            outcome.status = response.status_code
            outcome.replica = response.headers.get("x-pie-replica", "")
            async for line in response.aiter_lines():
                _read_line(outcome, line, started)
    except httpx.HTTPError as exc:
        outcome.error = f"{type(exc).__name__}: {exc}"
    outcome.ended = time.monotonic()
    return outcome


def _read_line(outcome: Outcome, line: str, started: trio.Event | None) -> None:
    if line == "data: [DONE]":
        outcome.done = True
    elif line.startswith("data: "):
        chunk = json.loads(line[6:])
        if "error" in chunk:
            outcome.error = str(chunk["error"])
        if chunk.get("usage"):
            outcome.tokens = chunk["usage"]["completion_tokens"]
        if started is not None and chunk.get("choices"):
            started.set()


def client(cluster) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=cluster.http, timeout=httpx.Timeout(LOAD_TIMEOUT),
                             limits=httpx.Limits(max_connections=2 * STREAMS))


async def run_all(http: httpx.AsyncClient, count: int, max_tokens: int) -> list[Outcome]:
    outcomes: list[Outcome] = []

    async def one() -> None:
        outcomes.append(await stream(http, max_tokens))

    async with trio.open_nursery() as nursery:
        for _ in range(count):
            nursery.start_soon(one)
    return outcomes


@pytest.mark.slow
async def test_32_concurrent_streams_through_the_balancer_all_complete(cluster):
    async with client(cluster) as http:
        with trio.fail_after(LOAD_TIMEOUT):
            outcomes = await run_all(http, STREAMS, 16)
    failed = [o for o in outcomes if not (o.complete and o.tokens == 16)]
    assert not failed, (failed, cluster.logs())
    assert {o.replica for o in outcomes} == {"r1", "r2"}  # both replicas served


@pytest.mark.slow
@pytest.mark.parametrize("transport", ["ws", "tcp"])
async def test_sessions_through_the_balancer_upload_and_launch(cluster, transport):
    """A session's upload and launch reach the same replica (sticky), over /ws and TCP."""
    url = cluster.tcp if transport == "tcp" else cluster.http.replace("http://", "ws://") + "/ws"
    async with connect(url) as session:
        program = await session.upload(TEXT_COMPLETION.read_bytes())
        instance = await session.launch(program, ["--prompt", "Once upon a time",
                                                  "--max-tokens", "8"])
        with trio.fail_after(LOAD_TIMEOUT):
            kinds = [event.kind async for event in instance.events()]
        assert instance.result.reason == "finished", (instance.result, cluster.logs())
        assert kinds.count("message") >= 1 and kinds[-1] == "terminated"


@pytest.mark.slow
async def test_a_client_host_reaches_its_instances_over_both_protocols(cluster):
    """/ws and TCP hash the client's address onto the same replica: an instance launched over
    TCP is listed, and terminated, over the WebSocket."""
    ws_url = cluster.http.replace("http://", "ws://") + "/ws"
    async with connect(cluster.tcp) as tcp_session, connect(ws_url) as ws_session:
        instance = await tcp_session.launch("text-completion", ["--prompt", "Once upon a time",
                                                                "--max-tokens", "1000"])
        assert instance.id in [i["instance"] for i in await ws_session.instances()]
        await ws_session.terminate(instance.id)
        with trio.fail_after(LOAD_TIMEOUT):
            ends = [e.reason async for e in instance.events() if e.kind == "terminated"]
        assert ends == ["killed"], cluster.logs()


@pytest.mark.slow
async def test_sigterm_to_one_replica_under_load_loses_no_request_it_was_not_running(
        own_cluster):
    cluster = own_cluster
    victim = cluster.replica("r1")
    async with client(cluster) as http, trio.open_nursery() as nursery:
        # Long streams, alternating between the replicas (least connections), all running.
        long: list[Outcome] = []
        for _ in range(LONG_STREAMS):
            started = trio.Event()
            nursery.start_soon(_append, long, stream(http, LONG_TOKENS, started))
            with trio.fail_after(LOAD_TIMEOUT):
                await started.wait()
        # And new requests arriving all along: before, during and after the drain.
        short: list[Outcome] = []
        stop_arrivals = trio.Event()
        for _ in range(4):
            nursery.start_soon(_arrivals, http, short, stop_arrivals)
        await trio.sleep(0.5)
        signalled_at = time.monotonic()
        victim.process.send_signal(signal.SIGTERM)
        draining_at = await _wait_not_serving(victim.http)
        with trio.fail_after(60):
            status = await trio.to_thread.run_sync(victim.process.wait)
        await trio.sleep(2)  # arrivals go on against the one replica left
        stop_arrivals.set()
        with trio.fail_after(LOAD_TIMEOUT):
            later = await run_all(http, 8, 8)
    logs = cluster.logs()
    assert status == 0, logs
    _check_long_streams(long, signalled_at, logs)
    _check_arrivals(short, draining_at, logs)
    assert all(o.complete and o.replica == "r2" for o in later), (later, logs)


async def _append(outcomes: list[Outcome], request) -> None:
    outcomes.append(await request)


async def _arrivals(http: httpx.AsyncClient, outcomes: list[Outcome],
                    stop: trio.Event) -> None:
    """Short completions one after another until `stop`."""
    while not stop.is_set():
        with trio.fail_after(LOAD_TIMEOUT):
            outcomes.append(await stream(http, 8))


async def _wait_not_serving(url: str) -> float:
    """The moment the replica first answers /health with 503 or stops listening: from then on
    it starts nothing new."""
    async with httpx.AsyncClient(base_url=url, timeout=10) as http:
        with trio.fail_after(60):
            while True:
                try:
                    if (await http.get("/health")).status_code == 503:
                        return time.monotonic()
                except httpx.TransportError:
                    return time.monotonic()
                await trio.sleep(0.02)


def _check_long_streams(long: list[Outcome], signalled_at: float, logs: str) -> None:
    """Streams on the other replica complete; those the drained one was running end with its
    close reason."""
    assert len(long) == LONG_STREAMS
    assert {o.replica for o in long} == {"r1", "r2"}, (long, logs)
    for outcome in long:
        if outcome.replica == "r2" or outcome.ended < signalled_at:
            assert outcome.complete and outcome.tokens == LONG_TOKENS, (outcome, logs)
        else:
            assert outcome.status == 200 and outcome.done, (outcome, logs)
            assert "evicted" in outcome.error, (outcome, logs)
    assert any("evicted" in o.error for o in long), "no stream was running on the drained replica"


def _check_arrivals(short: list[Outcome], draining_at: float, logs: str) -> None:
    """Sent once the replica drained: every one served, by the other replica. Sent before: the
    drained replica may have been running it (then it ends with its close reason)."""
    after = [o for o in short if o.sent > draining_at]
    assert after, "no request arrived while the replica drained"
    assert all(o.complete and o.tokens == 8 and o.replica == "r2" for o in after), (after, logs)
    for outcome in short:
        assert outcome.complete or (outcome.replica == "r1" and "evicted" in outcome.error
                                    and outcome.done), (outcome, logs)
