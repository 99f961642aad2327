"""What every front-end of one server shares: the runtime, auth, metrics, and who owns what.

The registry here is the server's view of running instances: which tenant launched each one, so
that only that tenant can see, signal or terminate it, whatever connection it comes back on,
and who streams its events (its `Holder`: the connection attached to it, or the HTTP request
that launched it), or that nobody does (it is detached; see detached.py).
It also keeps the server-wide counts that bound what clients may hold: instances per tenant,
client connections (in total and per peer address) and bytes of unfinished uploads.

The server reaches the layers below only through the runtime it is given, plus what it is told
about the model (`ServedModel`, `TextCodec`: the few facts and tokenizer methods the OpenAI API
and the model listing need) and a callable that reads live component counters for /metrics.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import trio

from pie_trio import protocol
from pie_trio.config import Config
from pie_trio.protocol import ProtocolError
from pie_trio.runtime import CapacityError, Instance, ProgramError, Runtime, UnknownProgram
from pie_trio.server.auth import Authenticator
from pie_trio.server.detached import DetachedInstances
from pie_trio.server.metrics import Metrics
from pie_trio.server.uploads import UploadBudget

log = logging.getLogger("pie_trio.server")

# Why the server ends instances while shutting down (reported in their `terminated` event).
SHUTDOWN_REASON = "evicted"
SHUTDOWN_DETAIL = "the server is shutting down"


class Closable(Protocol):
    async def close(self, code: int, reason: str) -> None: ...


class ServedModel(Protocol):
    """What clients are told about the served model (the model runner's info satisfies it)."""

    @property
    def name(self) -> str: ...

    @property
    def page_size(self) -> int: ...

    @property
    def vocab_size(self) -> int: ...

    @property
    def max_position(self) -> int: ...


class TextCodec(Protocol):
    """The tokenizer methods the OpenAI API needs: counting tokens and rendering chats."""

    def encode(self, text: str) -> list[int]: ...

    def render_chat(self, messages: list[dict[str, Any]],
                    add_generation_prompt: bool = True) -> str: ...


class Holder(Protocol):
    """Who streams an instance's events to a client."""

    async def release(self, instance_id: str) -> bool:
        """Stop streaming the instance (it is being detached), keeping every event not yet
        delivered for the next attach; returns once done. False if this holder cannot let go,
        or the instance's end was delivered already."""
        ...


class _LaunchingRequest:
    """The holder of an instance launched by an HTTP request: the request streams it to its end
    and cannot hand it over."""

    async def release(self, instance_id: str) -> bool:
        return False


BY_REQUEST: Holder = _LaunchingRequest()


# Live counters of the components below the runtime (KV pages, executor ticks...), read at each
# /metrics scrape; the keys are those metrics.StateCollector recognises.
ComponentStats = Callable[[], Mapping[str, Any]]


@dataclass
class Running:
    """One running instance as the server sees it."""

    instance: Instance
    tenant: str
    program: str
    args: list[str]
    origin: str  # "ws", "tcp" or "http"
    holder: Holder | None = BY_REQUEST  # who streams its events; None while detached
    started: float = field(default_factory=time.time)
    # Events a holder took from the instance but could not deliver before it let go: the next
    # attach delivers them first, so a detach loses nothing.
    undelivered: list[dict[str, Any]] = field(default_factory=list)
    detaching: bool = False  # a detach is waiting for the holder to let go

    @property
    def id(self) -> str:
        return self.instance.id

    @property
    def has_ended(self) -> bool:
        return self.instance.ended.is_set()

    @property
    def state(self) -> str:
        """`attached` (a client streams it), `detached`, or `ended` (detached, ended, and its
        last events wait for an attach)."""
        if self.holder is not None:
            return "attached"
        return "ended" if self.has_ended else "detached"

    def backlog(self) -> int:
        """Events waiting for the next attach."""
        return len(self.undelivered) + self.instance.events.statistics().current_buffer_used

    def describe(self) -> dict[str, Any]:
        row = {"instance": self.id, "program": self.program, "args": self.args,
               "origin": self.origin, "started": self.started, "state": self.state}
        if self.holder is None:
            row["backlog"] = self.backlog()
        return row


class ServerState:
    def __init__(self, config: Config, runtime: Runtime, model_info: ServedModel,
                 tokenizer: TextCodec, stats: ComponentStats | None = None):
        self.config = config
        self.runtime = runtime
        self.model_info = model_info
        self.tokenizer = tokenizer
        self.auth = Authenticator(config.api_keys, config.auth_enabled)
        self.metrics = Metrics()
        self.running: dict[str, Running] = {}  # until their end is seen
        self.detached = DetachedInstances[Running]()
        self.sessions: set[Closable] = set()
        self.connections = Connections(config.max_connections, config.max_connections_per_peer)
        self.upload_budget = UploadBudget(config.upload_buffer_total)
        # CPU-bound request work (chat templates, long prompts, big JSON bodies) runs in worker
        # threads, a few at a time, so the event loop stays responsive whatever clients send.
        self.cpu_limiter = trio.CapacityLimiter(2)
        # Uploads wait here for a compile worker (compiles run in child processes, a few at once).
        self.upload_limiter = trio.CapacityLimiter(config.program_compile_workers)
        self._launching: Counter[str] = Counter()  # launches in progress, by tenant
        self.draining = trio.Event()
        self._no_sessions = trio.Event()  # set while no session is connected
        self._no_sessions.set()
        self._idle = trio.Event()  # set while no instance is running
        self._idle.set()
        self._stats = stats
        self.metrics.watch(self.snapshot)

    # -- instances --------------------------------------------------------------------------

    async def launch(self, program: str, args: list[str], tenant: str, origin: str,
                     request_id: int | None = None, *,
                     holder: Holder | None = BY_REQUEST) -> Running:
        """Start `program` (hash or built-in name) for `tenant`, its events streamed by `holder`
        (None: detached); ProtocolError when refused."""
        self._check_capacity(tenant, request_id)
        # Launches in progress count against the caps, so concurrent ones cannot overshoot.
        self._launching[tenant] += 1
        try:
            instance = await self.runtime.launch(program, list(args), tenant)
        except UnknownProgram as exc:
            raise ProtocolError(protocol.UNKNOWN_PROGRAM, str(exc), request_id) from None
        except ProgramError as exc:
            raise ProtocolError(protocol.INVALID_PROGRAM, str(exc), request_id) from None
        except CapacityError as exc:
            raise ProtocolError(protocol.LIMIT, str(exc), request_id) from None
        finally:
            self._launching[tenant] -= 1
            if not self._launching[tenant]:
                del self._launching[tenant]
        running = Running(instance, tenant, program, list(args), origin, holder)
        self.running[instance.id] = running
        if holder is None:
            self.detached.add(running)
        if self._idle.is_set():
            self._idle = trio.Event()
        self.metrics.launches.labels(origin).inc()
        log.info("launch instance=%s tenant=%s program=%s origin=%s", instance.id, tenant,
                 program, origin)
        return running

    def _check_capacity(self, tenant: str, request_id: int | None) -> None:
        config = self.config
        self._settle()
        if self.draining.is_set():
            raise ProtocolError(protocol.DRAINING, "the server is shutting down", request_id)
        if len(self.running) + self._launching.total() >= config.max_instances:
            raise ProtocolError(protocol.LIMIT, f"the server runs its maximum of "
                                f"{config.max_instances} instances; retry later", request_id)
        mine = sum(r.tenant == tenant for r in self.running.values()) + self._launching[tenant]
        if mine >= config.max_instances_per_tenant:
            raise ProtocolError(protocol.LIMIT, f"tenant {tenant!r} runs its maximum of "
                                f"{config.max_instances_per_tenant} instances; end one or "
                                "retry later", request_id)

    def owned(self, instance_id: str, tenant: str, request_id: int | None = None) -> Running:
        """The instance if `tenant` owns it. Someone else's instance is reported exactly like a
        missing one, so instance ids of other tenants cannot be probed."""
        running = self.running.get(instance_id)
        if running is None or running.tenant != tenant:
            raise _not_found(instance_id, request_id)
        return running

    def of_tenant(self, tenant: str) -> list[Running]:
        """The tenant's running instances, then its ended detached ones."""
        self._settle()
        return [*(r for r in self.running.values() if r.tenant == tenant),
                *self.detached.ended(tenant)]

    # -- detach and attach ------------------------------------------------------------------

    async def detach(self, instance_id: str, tenant: str, request_id: int | None = None) -> None:
        """Stop streaming the instance's events to its client; they wait for an attach.
        Detaching a detached instance does nothing."""
        running = self._of_tenant(instance_id, tenant, request_id)
        holder = running.holder
        if holder is None or running.detaching:
            return
        running.detaching = True
        try:
            released = await holder.release(instance_id)
        finally:
            running.detaching = False
        if not released:
            if instance_id not in self.running:  # its end reached its client meanwhile
                raise _not_found(instance_id, request_id)
            raise ProtocolError(protocol.ALREADY_ATTACHED, f"instance {instance_id!r} streams "
                                "to the HTTP request that launched it; it cannot be detached",
                                request_id)
        running.holder = None
        self.detached.add(running)
        log.info("detach instance=%s tenant=%s", instance_id, tenant)

    def attach(self, instance_id: str, tenant: str, holder: Holder,
               request_id: int | None = None) -> Running:
        """Make `holder` the one client of a detached instance (running or ended). Returns at
        once: the caller starts streaming before anything else can run."""
        running = self._of_tenant(instance_id, tenant, request_id)
        if running.holder is not None:
            raise ProtocolError(protocol.ALREADY_ATTACHED, f"instance {instance_id!r} already "
                                "streams to a client; detach it there first", request_id)
        self.detached.take(instance_id)
        running.holder = holder
        log.info("attach instance=%s tenant=%s backlog=%d", instance_id, tenant,
                 running.backlog())
        return running

    def _of_tenant(self, instance_id: str, tenant: str, request_id: int | None) -> Running:
        """A running or detached instance of `tenant`, else not_found (whoever owns it)."""
        self._settle()
        running = self.detached.get(instance_id, tenant) or self.running.get(instance_id)
        if running is None or running.tenant != tenant:
            raise _not_found(instance_id, request_id)
        return running

    def _settle(self) -> None:
        """Unlist the detached instances that have ended (nobody else would see their end)."""
        self.detached.settle(self._detached_ended)

    def _detached_ended(self, running: Running) -> None:
        termination = running.instance.termination
        self.ended(running.id, termination.reason if termination else "error")

    def ended(self, instance_id: str, reason: str) -> None:
        running = self.running.pop(instance_id, None)
        if running is not None:
            self.metrics.terminations.labels(reason).inc()
            log.info("end instance=%s tenant=%s reason=%s", instance_id, running.tenant, reason)
        if not self.running:
            self._idle.set()

    async def drain(self, timeout: float) -> None:
        """Refuse new work, end every instance, and wait (up to `timeout`) until each one's
        front-end has seen it end; sessions then close themselves (code 1001)."""
        self.draining.set()
        for running in list(self.running.values()):
            running.instance.kill(SHUTDOWN_REASON, SHUTDOWN_DETAIL)
        with trio.move_on_after(timeout):
            for running in self.detached.unfinished():  # no front-end watches these
                await running.instance.ended.wait()
            self._settle()
            await self._idle.wait()

    # -- sessions ---------------------------------------------------------------------------

    def session_opened(self, session: Closable) -> None:
        self.sessions.add(session)
        if self._no_sessions.is_set():
            self._no_sessions = trio.Event()

    def session_closed(self, session: Closable) -> None:
        self.sessions.discard(session)
        if not self.sessions:
            self._no_sessions.set()

    async def wait_sessions_closed(self, timeout: float) -> None:
        with trio.move_on_after(timeout):
            await self._no_sessions.wait()

    # -- introspection ----------------------------------------------------------------------

    def models(self) -> list[dict[str, Any]]:
        info = self.model_info
        return [{"name": info.name, "page_size": info.page_size, "vocab_size": info.vocab_size,
                 "max_position": info.max_position}]

    def snapshot(self) -> dict[str, Any]:
        self._settle()
        state: dict[str, Any] = {"instances_running": len(self.running),
                                 "instances_detached": len(self.detached),
                                 "sessions": len(self.sessions)}
        if self._stats is not None:
            try:
                state.update(self._stats())
            except Exception:  # a scrape must never fail because one component is busy
                log.exception("reading component stats failed")
        return state


def _not_found(instance_id: str, request_id: int | None) -> ProtocolError:
    # Someone else's instance is reported exactly like a missing one.
    return ProtocolError(protocol.NOT_FOUND, f"no instance {instance_id!r} of yours", request_id)


class Connections:
    """Client connections (WebSocket and TCP) open now, in total and per peer address."""

    def __init__(self, limit: int, per_peer: int):
        self.limit = limit
        self.per_peer = per_peer
        self._by_peer: Counter[str] = Counter()

    def __len__(self) -> int:
        return self._by_peer.total()

    def admit(self, peer: str) -> None:
        """Count a new connection from `peer` (its IP address); ProtocolError(LIMIT) when it
        would pass either cap, and then it is not counted."""
        if len(self) >= self.limit:
            raise ProtocolError(protocol.LIMIT, f"the server holds its maximum of {self.limit} "
                                "connections; retry later")
        if self._by_peer[peer] >= self.per_peer:
            raise ProtocolError(protocol.LIMIT, f"{peer} already holds its maximum of "
                                f"{self.per_peer} connections")
        self._by_peer[peer] += 1

    def release(self, peer: str) -> None:
        self._by_peer[peer] -= 1
        if self._by_peer[peer] <= 0:
            del self._by_peer[peer]
