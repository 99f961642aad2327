"""The pie-trio client for trio programs.

    async with connect("ws://127.0.0.1:8080/ws", token=KEY) as client:
        program = await client.upload(wasm_bytes)      # skipped when the server has it
        instance = await client.launch(program, ["--prompt", "Hello"])
        async for event in instance.events():
            print(event.kind, event.text)

    # Detached: the server holds its output until some connection of the tenant attaches.
    instance_id = (await client.launch(program, detached=True)).id
    instance = await client.attach(instance_id)     # its backlog, then live events

One background task reads the connection: responses resolve the request that carries their id,
events go to the instance they name. Requests may be issued from several tasks at once.
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import blake3
import trio
import trio_websocket

from pie_trio import protocol
from pie_trio.client.transport import ConnectionClosed, Transport, open_transport

log = logging.getLogger("pie_trio.client")

CHUNK_SIZE = 256 * 1024  # upload chunk: well under the server's message size limit
CLOSE_TIMEOUT = 2.0  # seconds to wait for the server to acknowledge a close


class ServerError(Exception):
    """The server refused a request; `code` is one of the protocol's error codes."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass
class Event:
    """One instance event: `message`, `stdout`, `stderr`, `return`, `terminated`, or `detached`
    (this connection no longer receives the instance's events)."""

    kind: str
    instance: str
    text: str | None = None  # message / stdout / stderr text, or the return value
    reason: str | None = None  # terminated: finished, error, trap, killed, limit, ...
    detail: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_message(cls, message: dict[str, Any]) -> Event:
        return cls(str(message.get("event")), str(message.get("instance")),
                   message.get("data"), message.get("reason"), message.get("detail"), message)


class _Pending:
    def __init__(self) -> None:
        self.done = trio.Event()
        self.response: dict[str, Any] | None = None
        self.failure: Exception | None = None

    async def result(self) -> Any:
        await self.done.wait()
        if self.failure is not None:
            raise self.failure
        assert self.response is not None
        if not self.response.get("ok"):
            raise ServerError(str(self.response.get("error")), str(self.response.get("message")))
        return self.response.get("result")


# One instance's events: the reader sends into the first, the instance's handle receives.
EventChannel = tuple[trio.MemorySendChannel[dict[str, Any]],
                     trio.MemoryReceiveChannel[dict[str, Any]]]


class Client:
    def __init__(self, transport: Transport):
        self._transport = transport
        self._next_id = 1
        self._pending: dict[int, _Pending] = {}
        self._events: dict[str, EventChannel] = {}
        self.closed: ConnectionClosed | None = None  # why the connection ended, once it has
        self.tenant: str | None = None
        self._closed_event = trio.Event()

    # -- requests ---------------------------------------------------------------------------

    async def submit(self, kind: str, **fields: Any) -> _Pending:
        """Send one request and return a handle to await its result (for pipelining)."""
        if self.closed is not None:
            raise self.closed
        request_id = self._next_id
        self._next_id += 1
        pending = self._pending[request_id] = _Pending()
        message = {"type": kind, "id": request_id, **{k: v for k, v in fields.items()
                                                      if v is not None}}
        try:
            await self._transport.send(protocol.pack(message))
        except ConnectionClosed:
            self._pending.pop(request_id, None)
            raise
        return pending

    async def request(self, kind: str, **fields: Any) -> Any:
        """Send one request and wait for its result; ServerError if the server refuses it."""
        return await (await self.submit(kind, **fields)).result()

    async def authenticate(self, token: str) -> str:
        tenant = str((await self.request("authenticate", token=token))["tenant"])
        self.tenant = tenant
        return tenant

    async def models(self) -> list[dict[str, Any]]:
        models: list[dict[str, Any]] = await self.request("query", what="models")
        return models

    async def instances(self) -> list[dict[str, Any]]:
        instances: list[dict[str, Any]] = await self.request("query", what="instances")
        return instances

    async def program_exists(self, program: str) -> bool:
        found = await self.request("query", what="program_exists", program=program)
        return bool(found["exists"])

    async def upload(self, wasm: bytes) -> str:
        """Upload a program unless the server already has it; returns its BLAKE3 hash."""
        program = blake3.blake3(wasm).hexdigest()
        if await self.program_exists(program):
            return program
        if (await self.request("upload_begin", hash=program, size=len(wasm)))["exists"]:
            return program
        # Chunks are pipelined: send them all, then collect the acknowledgements.
        chunks = [await self.submit("upload_chunk", hash=program, data=wasm[i:i + CHUNK_SIZE])
                  for i in range(0, len(wasm), CHUNK_SIZE)]
        for chunk in chunks:
            await chunk.result()
        return str((await self.request("upload_end", hash=program))["hash"])

    async def launch(self, program: str, args: list[str] | None = None,
                     detached: bool = False) -> RemoteInstance:
        """Launch a program (BLAKE3 hash or built-in name); its events stream to the handle,
        unless `detached`: then they wait on the server for an `attach`."""
        result = await self.request("launch_instance", program=program, args=list(args or []),
                                    detached=detached or None)
        return RemoteInstance(self, result["instance"], detached=detached)

    async def attach(self, instance: str) -> RemoteInstance:
        """Attach to a detached instance of your tenant: its events stream to the handle, first
        those it produced while detached (`backlog` of them), then live ones."""
        result = await self.request("attach_instance", instance=instance)
        attached = RemoteInstance(self, result["instance"])
        attached.backlog = int(result.get("backlog", 0))
        return attached

    async def detach(self, instance: str) -> None:
        """Detach an instance of your tenant from the connection streaming it (its handle there
        ends with a `detached` event); it runs on, its output held for an attach."""
        await self.request("detach_instance", instance=instance)

    async def signal(self, instance: str, message: str) -> None:
        await self.request("signal_instance", instance=instance, message=message)

    async def terminate(self, instance: str) -> None:
        await self.request("terminate_instance", instance=instance)

    # -- the reader -------------------------------------------------------------------------

    def _channel(self, instance: str) -> EventChannel:
        if instance not in self._events:
            # Unbounded: the reader must never block on one slow consumer, or every response
            # and every other instance's events would stall behind it.
            self._events[instance] = trio.open_memory_channel[dict[str, Any]](math.inf)
        return self._events[instance]

    async def _read_loop(self) -> None:
        try:
            while True:
                self._dispatch(protocol.unpack(await self._transport.receive()))
        except ConnectionClosed as exc:
            self._close(exc)
        except ValueError as exc:
            self._close(ConnectionClosed(reason=f"undecodable message from the server: {exc}"))

    def _dispatch(self, message: Any) -> None:
        if not isinstance(message, dict):
            return
        kind = message.get("type")
        if kind == "response":
            request_id = message.get("id")
            pending = self._pending.pop(request_id) if request_id in self._pending else None
            if pending is not None:
                pending.response = message
                pending.done.set()
        elif kind == "event":
            instance = str(message.get("instance"))
            send, _ = self._channel(instance)
            send.send_nowait(message)
            if message.get("event") == "detached":
                # Its last event here: a later attach streams into a channel of its own.
                send.close()
                del self._events[instance]
        elif kind == "close":
            self._close(ConnectionClosed(message.get("code"), str(message.get("reason", ""))))
        elif kind == "error":
            log.warning("server error: %s: %s", message.get("error"), message.get("message"))

    async def wait_closed(self) -> ConnectionClosed:
        """Wait until the server ends the connection (e.g. code 1001 when it shuts down)."""
        await self._closed_event.wait()
        assert self.closed is not None
        return self.closed

    def _close(self, exc: ConnectionClosed) -> None:
        if self.closed is None:
            self.closed = exc
        self._closed_event.set()
        for pending in self._pending.values():
            pending.failure = self.closed
            pending.done.set()
        self._pending.clear()
        for send, _ in self._events.values():
            send.close()


class RemoteInstance:
    """A launched instance: its events, and the actions its owner may take on it."""

    def __init__(self, client: Client, instance_id: str, detached: bool = False):
        self.client = client
        self.id = instance_id
        self.result: Event | None = None  # the terminated event, once seen
        self.detached = detached  # no longer (or never) streamed to this connection
        self.backlog = 0  # on attach: the events that waited for it
        if detached:  # launched detached: no events will come here, so hold no channel
            sender, self._events = trio.open_memory_channel[dict[str, Any]](0)
            sender.close()
        else:
            self._events = client._channel(instance_id)[1]

    async def next_event(self) -> Event:
        """The next event; raises ConnectionClosed if the connection ends before the instance
        does, and EOFError after the `terminated` or `detached` event was taken."""
        if self.result is not None:
            raise EOFError(f"instance {self.id} has terminated")
        if self.detached:
            raise EOFError(f"instance {self.id} is detached from this connection")
        try:
            event = Event.from_message(await self._events.receive())
        except trio.EndOfChannel:
            raise self.client.closed or ConnectionClosed() from None
        if event.kind == "terminated":
            self.result = event
            sender = self.client._events.get(self.id)
            if sender is not None and sender[1] is self._events:
                del self.client._events[self.id]
        elif event.kind == "detached":
            self.detached = True
        return event

    async def events(self) -> AsyncIterator[Event]:
        """Every event up to and including `terminated` (or `detached`)."""
        while self.result is None and not self.detached:
            yield await self.next_event()

    async def detach(self) -> None:
        """Detach it from this connection: `events` ends with a `detached` event."""
        await self.client.detach(self.id)

    async def signal(self, message: str) -> None:
        await self.client.signal(self.id, message)

    async def terminate(self) -> None:
        await self.client.terminate(self.id)


@asynccontextmanager
async def connect(url: str, token: str | None = None) -> AsyncIterator[Client]:
    """Connect to a pie-trio server (ws://host:port/ws or tcp://host:port) for the block."""
    try:
        async with trio.open_nursery() as nursery:
            try:
                transport = await open_transport(url, nursery)
            except (OSError, trio_websocket.HandshakeError) as exc:
                raise ConnectionError(f"cannot connect to {url}: {exc}") from None
            client = Client(transport)
            nursery.start_soon(client._read_loop)
            try:
                if token is not None:
                    await client.authenticate(token)
                yield client
            finally:
                # Close first: the WebSocket's own reader lives in this nursery and must still
                # run to complete the closing handshake.
                with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT):
                    await transport.aclose()
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # The background reader never raises, so a group holds the caller's own error:
        # hand it back unwrapped, as if there were no nursery.
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise
