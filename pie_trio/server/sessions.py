"""One client session: the protocol logic shared by the WebSocket and TCP front-ends.

A session reads frames from its transport one at a time, answers each request in order, and
streams the events of the instances attached to it: those it launched (unless detached) and
those it attached to. One pump task per attached instance moves its events to the outbox. All
outgoing messages go through that one outbox, bounded in bytes (`outbox_size`), drained by a
single writer task, so responses and events never interleave mid-frame, a slow client pushes
back on its own instances only, and the writer can coalesce whatever is ready into one write.

Slow and silent clients. A client that accepts no bytes of one write for `send_timeout` seconds
is disconnected (its transport is aborted): back-pressure bounds what it costs in memory, this
bounds how long. With auth on, a connection that has not authenticated after `auth_timeout`
seconds is closed with a `timeout` error. (Messages that take too long to arrive are the
transports' to catch: tcp.py and websocket.py.)

Detach and attach. Detaching cancels the instance's pump; an event the pump had taken but not
yet queued is handed back to the instance record (`Running.undelivered`), the client gets a last
`detached` event for it, and only then is the instance listed as detached, so an attach (from
any connection of the tenant) delivers the backlog in order, with nothing lost or repeated.

When the client goes away, its attached instances are ended with reason `client_gone`; detached
ones keep running. When the server drains, the server ends every instance, each session
forwards the `terminated` events, and then closes its transport with code 1001 (going away).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import blake3
import trio

from pie_trio import protocol
from pie_trio.protocol import ProtocolError
from pie_trio.runtime.instance import InboxFull, InstanceGone
from pie_trio.runtime.programs import ProgramError
from pie_trio.server.outbox import Outbox
from pie_trio.server.state import Running, ServerState
from pie_trio.server.uploads import Uploads

log = logging.getLogger("pie_trio.server.session")

DRAIN_TIMEOUT = 5.0  # seconds to wait for instances to report their end while draining
WRITE_BATCH = 256 * 1024  # bytes per transport write: the unit `send_timeout` applies to

# Close codes (WebSocket numbers; a TCP client gets them in a final `close` message).
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_UNSUPPORTED = 1003
CLOSE_POLICY = 1008  # too slow: no authenticate in time, a message that does not complete
CLOSE_TOO_LARGE = 1009
CLOSE_TRY_LATER = 1013  # a connection limit was reached


class Violation(Exception):
    """Raised by a transport when the client broke the framing itself: the session answers with
    an error naming the problem and closes the connection with `close_code`."""

    def __init__(self, code: str, message: str, close_code: int):
        super().__init__(message)
        self.code = code
        self.message = message
        self.close_code = close_code


class SessionChannel(Protocol):
    """What a session needs from its connection."""

    async def receive(self) -> bytes | None:
        """The next client message, or None when the client has gone."""
        ...

    async def send(self, frames: list[bytes]) -> None:
        """Write ready messages, in order, as few writes as the transport allows."""
        ...

    async def close(self, code: int, reason: str) -> None: ...

    async def abort(self) -> None:
        """Drop the connection at once, without a goodbye: a `send` stuck on a client that does
        not read returns (or raises), and `receive` may never return again."""
        ...


@dataclass(frozen=True)
class Streamed:
    """A handler's answer that attaches an instance to the session: `result` goes to the
    client, then the instance's events."""

    running: Running
    result: dict[str, Any]


@dataclass
class Pump:
    """The task moving one attached instance's events to the outbox."""

    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    done: trio.Event = field(default_factory=trio.Event)
    delivered_end: bool = False  # the `terminated` event is queued for the client


class Session:
    def __init__(self, state: ServerState, transport: SessionChannel, origin: str, peer: str = "?",
                 tenant: str | None = None):
        self.state = state
        self.transport = transport
        self.origin = origin
        self.peer = peer
        config = state.config
        # Who the client is: known from the start without auth (or from a valid header).
        self.tenant = tenant if state.auth.enabled else state.auth.tenant_for(None)
        self.uploads = Uploads(state.upload_budget, config.upload_buffer_per_session)
        self.pumps: dict[str, Pump] = {}  # the attached instances, by id
        self._outbox = Outbox(config.outbox_size)
        self._close_code = CLOSE_NORMAL
        self._close_reason = "bye"
        self._writer_done = trio.Event()
        self._broken = False  # the transport failed or was aborted: drop what is left
        self._write_started: float | None = None  # when the write in progress began
        self._reading = trio.CancelScope()  # cancelled to stop reading (timeouts, aborts)
        self._idle = trio.Event()  # set while no instance is attached
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
            protocol.Detach: self._detach,
            protocol.Attach: self._attach,
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
                nursery.start_soon(self._watch_writes)
                nursery.start_soon(self._close_when_draining)
                if self.tenant is None:
                    nursery.start_soon(self._require_authentication)
                await self._read_loop()
                await self._finish()
                nursery.cancel_scope.cancel()
        finally:
            self.state.session_closed(self)
            self._end_instances("client_gone")
            self.uploads.drop_all()
            log.info("session closed origin=%s peer=%s tenant=%s", self.origin, self.peer,
                     self.tenant)

    async def _finish(self) -> None:
        """The client is gone (or we are closing it): end its instances and let the pumps
        consume their final events, so the runtime is never left blocked on them; flush, close,
        and abort a transport whose client does not take the last bytes."""
        self._end_instances("client_gone")
        with trio.move_on_after(DRAIN_TIMEOUT):
            await self._idle.wait()
        await self.close(self._close_code)
        with trio.move_on_after(DRAIN_TIMEOUT):
            await self._writer_done.wait()
        if not self._writer_done.is_set():
            await self._abort("the client did not take the last messages")

    async def _read_loop(self) -> None:
        with self._reading:
            try:
                while (frame := await self.transport.receive()) is not None:
                    await self.handle(frame)
            except Violation as exc:
                self._refuse(exc)

    def _refuse(self, exc: Violation) -> None:
        """The stream cannot be trusted any more (or the client was too slow): say why, then
        close with the violation's code. Never waits: the error may go over the outbox bound."""
        log.info("protocol violation peer=%s code=%d error=%s", self.peer, exc.close_code,
                 exc.message)
        self.state.metrics.protocol_errors.labels(exc.code).inc()
        self._send_now(protocol.error(exc.code, exc.message))
        self._close_code = exc.close_code
        self._close_reason = exc.message
        self._reading.cancel()

    async def _require_authentication(self) -> None:
        timeout = self.state.config.auth_timeout
        await trio.sleep(timeout)
        if self.tenant is None:
            self._refuse(Violation(protocol.TIMEOUT, f"not authenticated within {timeout:g} s; "
                                   "closing the connection", CLOSE_POLICY))

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
        if isinstance(result, Streamed):
            # A launch or an attach. The session owns the instance from here on (a disconnect
            # ends it), and the response is queued before the pump starts, so the client always
            # learns of the instance before its first event. The handler's work, answering and
            # starting the pump happen without a checkpoint, so no cancellation can orphan it.
            self._send_now(protocol.ok(request_id, result.result))
            self._start_pump(result.running)
        else:
            await self.send(protocol.ok(request_id, result))

    async def send(self, message: dict[str, Any]) -> None:
        """Queue a message for the client, waiting while its outbox is full."""
        try:
            await self._outbox.put(protocol.pack(message))
        except trio.ClosedResourceError:
            pass  # the session is closing; the client will not read this anyway

    def _send_now(self, message: dict[str, Any]) -> None:
        """Queue a message without waiting, over the outbox bound if need be (one small
        message: a launch response, a last error)."""
        try:
            self._outbox.put_nowait(protocol.pack(message))
        except trio.ClosedResourceError:
            pass

    async def _write_loop(self) -> None:
        """Drain the outbox, batching what is already queued into few transport writes.

        After the connection breaks it keeps draining (and dropping), so that instance pumps
        never block on a client that is gone."""
        try:
            while frames := await self._outbox.take(WRITE_BATCH):
                if not self._broken:
                    self._broken = not await self._write(self.transport.send(frames))
                self._outbox.written(sum(len(frame) for frame in frames))
            if not self._broken:
                await self._write(self.transport.close(self._close_code, self._close_reason))
        finally:
            self._writer_done.set()

    async def _write(self, call: Awaitable[None]) -> bool:
        """Run one transport write under the `send_timeout` watch; False if it failed."""
        self._write_started = trio.current_time()
        try:
            await call
            return not self._broken
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            return False
        finally:
            self._write_started = None

    async def _watch_writes(self) -> None:
        """Abort the transport when one write has not finished within `send_timeout`."""
        timeout = self.state.config.send_timeout
        while not self._writer_done.is_set():
            await trio.sleep(timeout / 4)
            started = self._write_started
            if started is not None and trio.current_time() - started > timeout:
                await self._abort(f"the client accepted no write for {timeout:g} s")

    async def _abort(self, why: str) -> None:
        """Drop the connection without a goodbye: the client is not reading."""
        if self._broken:
            return
        log.info("session aborted peer=%s reason=%s", self.peer, why)
        self.state.metrics.protocol_errors.labels(protocol.TIMEOUT).inc()
        self._broken = True
        self._reading.cancel()
        await self.transport.abort()

    async def close(self, code: int = CLOSE_GOING_AWAY, reason: str | None = None) -> None:
        """Flush what is queued, then close the transport with `code` (idempotent)."""
        self._close_code = code
        if reason is not None:
            self._close_reason = reason
        self._outbox.close()
        await trio.lowlevel.checkpoint()

    async def _close_when_draining(self) -> None:
        await self.state.draining.wait()
        # The server ends every instance; wait until ours have reported their end to us.
        with trio.move_on_after(DRAIN_TIMEOUT):
            await self._idle.wait()
        await self.close(CLOSE_GOING_AWAY, "server shutting down")

    def _end_instances(self, reason: str) -> None:
        for instance_id in list(self.pumps):
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
            assert request.program is not None  # protocol.decode refuses it missing
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
        self.uploads.begin(request.hash, request.size, request.id)
        return {"exists": False}

    async def _upload_chunk(self, request: protocol.UploadChunk) -> None:
        upload = self.uploads.get(request.hash, request.id)
        if len(upload.data) + len(request.data) > upload.size:
            self.uploads.drop(request.hash)
            raise ProtocolError(protocol.TOO_LARGE, f"chunks exceed the announced size of "
                                f"{upload.size} bytes; upload abandoned", request.id)
        upload.data += request.data

    async def _upload_end(self, request: protocol.UploadEnd) -> dict[str, Any]:
        upload = self.uploads.get(request.hash, request.id)
        self.uploads.drop(request.hash)
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
            # Uploads have their own limiter: a compile waiting its turn must not hold one of
            # trio's default worker threads that other work needs.
            program = await trio.to_thread.run_sync(
                self.state.runtime.programs.add, data, self._tenant(),
                limiter=self.state.upload_limiter)
        except ProgramError as exc:
            raise ProtocolError(protocol.INVALID_PROGRAM, str(exc), request.id) from None
        log.info("upload program=%s size=%d tenant=%s", program, len(data), self.tenant)
        return {"hash": program}

    async def _launch(self, request: protocol.Launch) -> Streamed | dict[str, Any]:
        running = await self.state.launch(request.program, request.args, self._tenant(),
                                          self.origin, request.id,
                                          holder=None if request.detached else self)
        if request.detached:
            return {"instance": running.id}
        return Streamed(running, {"instance": running.id})

    async def _detach(self, request: protocol.Detach) -> None:
        await self.state.detach(request.instance, self._tenant(), request.id)

    async def _attach(self, request: protocol.Attach) -> Streamed:
        # No checkpoint from here to the pump's start (see handle).
        running = self.state.attach(request.instance, self._tenant(), self, request.id)
        return Streamed(running, {"instance": running.id, "backlog": running.backlog()})

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

    def _start_pump(self, running: Running) -> None:
        pump = self.pumps[running.id] = Pump()
        if self._idle.is_set():
            self._idle = trio.Event()
        assert self._nursery is not None
        self._nursery.start_soon(self._pump, running, pump)

    async def release(self, instance_id: str) -> bool:
        """Stop streaming the instance (it is being detached): see the module's docstring."""
        pump = self.pumps.pop(instance_id, None)
        if pump is None:
            return False
        pump.scope.cancel()
        await pump.done.wait()
        return not pump.delivered_end

    async def _pump(self, running: Running, pump: Pump) -> None:
        """Forward one instance's events to the client until it terminates or is detached:
        first those an earlier client left undelivered, then the instance's own."""
        reason = None
        payload = None
        try:
            with pump.scope:
                while reason is None:
                    if running.undelivered:
                        payload = running.undelivered.pop(0)
                    else:
                        payload = await running.instance.events.receive()
                    if payload.get("event") == "terminated":
                        # Unlist it before telling the client, so that whoever hears of the
                        # end no longer finds the instance listed.
                        reason = str(payload.get("reason"))
                        self.state.ended(running.id, reason)
                    await self.send(protocol.event(running.id, payload))
                    payload = None
                pump.delivered_end = True
        except trio.EndOfChannel:  # cannot happen: `terminated` comes before the channel ends
            log.error("instance %s ended without a terminated event", running.id)
        finally:
            self._pump_stopped(running, pump, payload)

    def _pump_stopped(self, running: Running, pump: Pump, payload: dict[str, Any] | None) -> None:
        if payload is not None:  # taken from the instance, not queued: keep it for an attach
            running.undelivered.insert(0, payload)
        if self.pumps.get(running.id) is pump:  # still attached here
            del self.pumps[running.id]
            if not pump.delivered_end:  # cancelled before the end: nobody will read it now
                running.instance.kill("client_gone")
                self.state.ended(running.id, "client_gone")
        elif not pump.delivered_end:  # released for a detach: the client's last word on it
            self._send_now(protocol.detached(running.id))
        pump.done.set()
        # Only now, with its last event queued, may a draining session close.
        if not self.pumps:
            self._idle.set()
