"""One client session: the protocol logic shared by the WebSocket and TCP front-ends.

A session reads frames from its transport one at a time, answers each request in order, and
streams the events of the instances it launched. All outgoing messages go through one bounded
outbox drained by a single writer task, so responses and events never interleave mid-frame, a
slow client pushes back on its own instances only, and the writer can coalesce whatever is ready
into one write.

When the client goes away, the session's instances are ended with reason `client_gone`. When the
server drains, the server ends every instance, each session forwards the `terminated` events, and
then closes its transport with code 1001 (going away).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import blake3
import trio

from pie_trio.runtime.instance import InboxFull, InstanceGone
from pie_trio.runtime.programs import ProgramError
from pie_trio.server import protocol
from pie_trio.server.protocol import ProtocolError
from pie_trio.server.state import Running, ServerState

log = logging.getLogger("pie_trio.server.session")

OUTBOX_SIZE = 256  # messages queued for one client before its instances feel backpressure
MAX_UPLOADS = 4  # unfinished uploads one session may hold at once
DRAIN_TIMEOUT = 5.0  # seconds to wait for instances to report their end while draining

# Close codes (WebSocket numbers; a TCP client gets them in a final `close` message).
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_UNSUPPORTED = 1003
CLOSE_TOO_LARGE = 1009


class Violation(Exception):
    """Raised by a transport when the client broke the framing itself: the session answers with
    an error naming the problem and closes the connection with `close_code`."""

    def __init__(self, code: str, message: str, close_code: int):
        super().__init__(message)
        self.code = code
        self.message = message
        self.close_code = close_code


class Transport(Protocol):
    """What a session needs from its connection."""

    async def receive(self) -> bytes | None:
        """The next client message, or None when the client has gone."""
        ...

    async def send(self, frames: list[bytes]) -> None:
        """Write ready messages, in order, as few writes as the transport allows."""
        ...

    async def close(self, code: int, reason: str) -> None: ...


@dataclass
class Upload:
    size: int
    data: bytearray = field(default_factory=bytearray)


class Session:
    def __init__(self, state: ServerState, transport: Transport, origin: str, peer: str = "?",
                 tenant: str | None = None):
        self.state = state
        self.transport = transport
        self.origin = origin
        self.peer = peer
        # Who the client is: known from the start without auth (or from a valid header).
        self.tenant = tenant if state.auth.enabled else state.auth.tenant_for(None)
        self.uploads: dict[str, Upload] = {}
        self.launched: set[str] = set()
        self._outbox, self._outbox_reader = trio.open_memory_channel[bytes](OUTBOX_SIZE)
        self._close_code = CLOSE_NORMAL
        self._close_reason = "bye"
        self._writer_done = trio.Event()
        self._idle = trio.Event()  # set while no launched instance is running
        self._idle.set()
        self._nursery: trio.Nursery | None = None
        self._handlers: dict[type, Callable[[Any], Awaitable[Any]]] = {
            protocol.Authenticate: self._authenticate,
            protocol.Query: self._query,
            protocol.UploadBegin: self._upload_begin,
            protocol.UploadChunk: self._upload_chunk,
            protocol.UploadEnd: self._upload_end,
            protocol.Launch: self._launch,
            protocol.Signal: self._signal,
            protocol.Terminate: self._terminate,
        }

    # -- lifecycle --------------------------------------------------------------------------

    async def run(self) -> None:
        """Serve the client until it goes away, breaks the protocol, or the server drains."""
        self.state.session_opened(self)
        log.info("session open origin=%s peer=%s", self.origin, self.peer)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._write_loop)
                nursery.start_soon(self._close_when_draining)
                await self._read_loop()
                # The client is gone (or we are closing it): end its instances and let the
                # pumps consume their final events, so the runtime is never left blocked on them.
                self._end_instances("client_gone")
                with trio.move_on_after(DRAIN_TIMEOUT):
                    await self._idle.wait()
                await self.close(self._close_code)
                with trio.move_on_after(DRAIN_TIMEOUT):
                    await self._writer_done.wait()
                nursery.cancel_scope.cancel()
        finally:
            self.state.session_closed(self)
            self._end_instances("client_gone")
            log.info("session closed origin=%s peer=%s tenant=%s", self.origin, self.peer,
                     self.tenant)

    async def _read_loop(self) -> None:
        try:
            while (frame := await self.transport.receive()) is not None:
                await self.handle(frame)
        except Violation as exc:
            # The stream cannot be trusted any more: say why, then close with the code.
            log.info("protocol violation peer=%s code=%d error=%s", self.peer, exc.close_code,
                     exc.message)
            self.state.metrics.protocol_errors.labels(exc.code).inc()
            await self.send(protocol.error(exc.code, exc.message))
            self._close_code = exc.close_code
            self._close_reason = exc.message

    async def handle(self, frame: bytes) -> None:
        """Answer one client message; any refusal goes back to this client only."""
        request_id = None
        try:
            request = protocol.decode_request(frame)
            request_id = request.id
            if self.tenant is None and not isinstance(request, protocol.Authenticate):
                raise ProtocolError(protocol.UNAUTHENTICATED,
                                    "authenticate first: this server requires an API key",
                                    request_id)
            result = await self._handlers[type(request)](request)
        except ProtocolError as exc:
            self.state.metrics.protocol_errors.labels(exc.code).inc()
            reply_id = exc.request_id if exc.request_id is not None else request_id
            await self.send(protocol.error(exc.code, exc.message, reply_id))
            return
        except Exception:
            log.exception("request failed peer=%s", self.peer)
            await self.send(protocol.error(protocol.INTERNAL, "internal server error", request_id))
            return
        if isinstance(result, Running):
            # A launch. The session owns the instance from here on (a disconnect ends it), and
            # the response is queued before the pump starts, so the client always learns the
            # instance id before the instance's first event.
            self._adopt(result)
            await self.send(protocol.ok(request_id, {"instance": result.id}))
            assert self._nursery is not None
            self._nursery.start_soon(self._pump, result)
        else:
            await self.send(protocol.ok(request_id, result))

    async def send(self, message: dict[str, Any]) -> None:
        try:
            await self._outbox.send(protocol.pack(message))
        except trio.ClosedResourceError:
            pass  # the session is closing; the client will not read this anyway

    async def _write_loop(self) -> None:
        """Drain the outbox, batching everything already queued into one transport write.

        After the connection breaks it keeps draining (and dropping), so that instance pumps
        never block on a client that is gone."""
        try:
            await self._drain_outbox()
        finally:
            self._writer_done.set()

    async def _drain_outbox(self) -> None:
        broken = False
        async for first in self._outbox_reader:
            frames = [first]
            while True:
                try:
                    frames.append(self._outbox_reader.receive_nowait())
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
            if not broken:
                broken = not await self._transport_call(self.transport.send(frames))
        if not broken:
            await self._transport_call(self.transport.close(self._close_code, self._close_reason))

    async def _transport_call(self, call: Awaitable[None]) -> bool:
        try:
            await call
            return True
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            return False

    async def close(self, code: int = CLOSE_GOING_AWAY, reason: str | None = None) -> None:
        """Flush what is queued, then close the transport with `code` (idempotent)."""
        self._close_code = code
        if reason is not None:
            self._close_reason = reason
        await self._outbox.aclose()

    async def _close_when_draining(self) -> None:
        await self.state.draining.wait()
        # The server ends every instance; wait until ours have reported their end to us.
        with trio.move_on_after(DRAIN_TIMEOUT):
            await self._idle.wait()
        await self.close(CLOSE_GOING_AWAY, "server shutting down")

    def _end_instances(self, reason: str) -> None:
        for instance_id in list(self.launched):
            running = self.state.running.get(instance_id)
            if running is not None:
                running.instance.kill(reason)

    # -- requests ---------------------------------------------------------------------------

    async def _authenticate(self, request: protocol.Authenticate) -> dict[str, Any]:
        tenant = self.state.auth.tenant_for(request.token)
        if tenant is None:
            raise ProtocolError(protocol.AUTH_FAILED, "invalid API key", request.id)
        if self.tenant is not None and self.state.auth.enabled and tenant != self.tenant:
            raise ProtocolError(protocol.BAD_REQUEST,
                                "this session is already authenticated as another tenant",
                                request.id)
        self.tenant = tenant
        return {"tenant": tenant}

    async def _query(self, request: protocol.Query) -> Any:
        if request.what == "program_exists":
            return {"exists": self.state.runtime.programs.has(request.program)}
        if request.what == "models":
            return self.state.models()
        return [r.describe() for r in self.state.of_tenant(self._tenant())]

    async def _upload_begin(self, request: protocol.UploadBegin) -> dict[str, Any]:
        limit = self.state.config.max_upload_size
        if request.size > limit:
            raise ProtocolError(protocol.TOO_LARGE, f"program of {request.size} bytes exceeds "
                                f"the upload limit of {limit}", request.id)
        if self.state.runtime.programs.has(request.hash):
            return {"exists": True}
        if request.hash not in self.uploads and len(self.uploads) >= MAX_UPLOADS:
            raise ProtocolError(protocol.LIMIT, f"at most {MAX_UPLOADS} unfinished uploads "
                                "per session", request.id)
        self.uploads[request.hash] = Upload(request.size)
        return {"exists": False}

    async def _upload_chunk(self, request: protocol.UploadChunk) -> None:
        upload = self._upload(request.hash, request.id)
        if len(upload.data) + len(request.data) > upload.size:
            del self.uploads[request.hash]
            raise ProtocolError(protocol.TOO_LARGE, f"chunks exceed the announced size of "
                                f"{upload.size} bytes; upload abandoned", request.id)
        upload.data += request.data

    async def _upload_end(self, request: protocol.UploadEnd) -> dict[str, Any]:
        upload = self._upload(request.hash, request.id)
        del self.uploads[request.hash]
        if len(upload.data) != upload.size:
            raise ProtocolError(protocol.BAD_REQUEST, f"received {len(upload.data)} of "
                                f"{upload.size} announced bytes", request.id)
        data = bytes(upload.data)
        if blake3.blake3(data).hexdigest() != request.hash:
            raise ProtocolError(protocol.HASH_MISMATCH,
                                "the uploaded bytes do not have the announced BLAKE3 hash",
                                request.id)
        try:
            # Compiling takes from milliseconds to seconds: keep it off the trio thread.
            program = await trio.to_thread.run_sync(self.state.runtime.programs.add, data)
        except ProgramError as exc:
            raise ProtocolError(protocol.INVALID_PROGRAM, str(exc), request.id) from None
        log.info("upload program=%s size=%d tenant=%s", program, len(data), self.tenant)
        return {"hash": program}

    def _upload(self, program_hash: str, request_id: int) -> Upload:
        upload = self.uploads.get(program_hash)
        if upload is None:
            raise ProtocolError(protocol.BAD_REQUEST, f"no upload of {program_hash} in progress: "
                                "send upload_begin first", request_id)
        return upload

    async def _launch(self, request: protocol.Launch) -> Running:
        running = await self.state.launch(request.program, request.args, self._tenant(),
                                          self.origin, request.id)
        return running

    async def _signal(self, request: protocol.Signal) -> None:
        running = self.state.owned(request.instance, self._tenant(), request.id)
        try:
            running.instance.deliver(request.message)
        except InstanceGone as exc:
            raise ProtocolError(protocol.NOT_FOUND, str(exc), request.id) from None
        except InboxFull as exc:
            raise ProtocolError(protocol.LIMIT, str(exc), request.id) from None

    async def _terminate(self, request: protocol.Terminate) -> None:
        running = self.state.owned(request.instance, self._tenant(), request.id)
        running.instance.kill("killed")

    def _tenant(self) -> str:
        assert self.tenant is not None  # handle() checked
        return self.tenant

    # -- events -----------------------------------------------------------------------------

    def _adopt(self, running: Running) -> None:
        self.launched.add(running.id)
        if self._idle.is_set():
            self._idle = trio.Event()

    async def _pump(self, running: Running) -> None:
        """Forward one instance's events to the client until it terminates."""
        reason = None
        try:
            async for payload in running.instance.events:
                if payload.get("event") == "terminated":
                    # Unlist it before telling the client, so that whoever hears of the end
                    # no longer finds the instance listed.
                    reason = str(payload.get("reason"))
                    self.state.ended(running.id, reason)
                await self.send(protocol.event(running.id, payload))
                if reason is not None:
                    break
        finally:
            if reason is None:  # cancelled before the end: nobody will read its events any more
                running.instance.kill("client_gone")
                self.state.ended(running.id, "client_gone")
            # Only now, with its last event queued, may a draining session close.
            self.launched.discard(running.id)
            if not self.launched:
                self._idle.set()
