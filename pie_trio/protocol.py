"""The client protocol: one msgpack message set, carried by WebSocket binary messages or TCP frames.

This module is the single definition of the wire format (docs/protocol.md describes it for
users): decoding and validating client requests, encoding responses and events, and the TCP
framing. Decoding never trusts its input: anything malformed becomes a `ProtocolError` naming
the problem, which the session answers without harming anyone else.

TCP framing: every message is a 4-byte big-endian unsigned length followed by that many bytes of
msgpack. WebSocket: one binary message per msgpack map.
"""

from __future__ import annotations

import re
import reprlib
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgpack

# Error codes a response may carry (docs/protocol.md explains each).
MALFORMED = "malformed"  # not msgpack, or not a map
BAD_REQUEST = "bad_request"  # a field is missing or has the wrong type or value
UNKNOWN_TYPE = "unknown_type"
UNAUTHENTICATED = "unauthenticated"  # a request before a successful authenticate
AUTH_FAILED = "auth_failed"
NOT_FOUND = "not_found"  # no such instance *of yours*
ALREADY_ATTACHED = "already_attached"  # the instance's events already stream to a client
UNKNOWN_PROGRAM = "unknown_program"
INVALID_PROGRAM = "invalid_program"  # the uploaded bytes are not a usable module
TOO_LARGE = "too_large"
HASH_MISMATCH = "hash_mismatch"
LIMIT = "limit"  # a server-wide, per-tenant or per-session limit was reached
TIMEOUT = "timeout"  # the client was too slow: a message did not complete, or no authenticate
DRAINING = "draining"  # the server is shutting down
INTERNAL = "internal"

FRAME_HEADER = struct.Struct(">I")
HASH_PATTERN = re.compile(r"[0-9a-f]{64}")
MAX_ID = 2**63 - 1


class ProtocolError(Exception):
    """A request the server refuses; `request_id` is echoed when it could be read."""

    def __init__(self, code: str, message: str, request_id: int | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.request_id = request_id


# ---------------------------------------------------------------------------------------------
# Requests (client → server). Every request has a client-chosen integer `id`.


@dataclass(frozen=True)
class Authenticate:
    id: int
    token: str


@dataclass(frozen=True)
class Query:
    id: int
    what: str  # program_exists | models | instances
    program: str | None = None  # for program_exists: a BLAKE3 hash or a built-in name


@dataclass(frozen=True)
class UploadBegin:
    id: int
    hash: str
    size: int


@dataclass(frozen=True)
class UploadChunk:
    id: int
    hash: str
    data: bytes


@dataclass(frozen=True)
class UploadEnd:
    id: int
    hash: str


@dataclass(frozen=True)
class Launch:
    id: int
    program: str  # a BLAKE3 hash or a built-in name
    args: list[str] = field(default_factory=list)
    detached: bool = False  # no connection streams its events until one attaches


@dataclass(frozen=True)
class Signal:
    id: int
    instance: str
    message: str


@dataclass(frozen=True)
class Terminate:
    id: int
    instance: str


@dataclass(frozen=True)
class Detach:
    id: int
    instance: str


@dataclass(frozen=True)
class Attach:
    id: int
    instance: str


Request = (Authenticate | Query | UploadBegin | UploadChunk | UploadEnd | Launch | Signal
           | Terminate | Detach | Attach)

QUERIES = ("program_exists", "models", "instances")


@dataclass(frozen=True)
class Kind:
    """A field's wire type: its name in error messages and the check a value must pass."""

    name: str
    accepts: Callable[[Any], bool]


STR = Kind("str", lambda v: isinstance(v, str))
INT = Kind("int", lambda v: isinstance(v, int) and not isinstance(v, bool))
BOOL = Kind("bool", lambda v: isinstance(v, bool))
BIN = Kind("bin", lambda v: isinstance(v, bytes))
STR_LIST = Kind("a list of str", lambda v: isinstance(v, list)
                and all(isinstance(item, str) for item in v))

# type name → (record, {field: (kind, required)}). `type` and `id` are checked the same way
# (both str/int and required) before the table is consulted.
REQUESTS: dict[str, tuple[type, dict[str, tuple[Kind, bool]]]] = {
    "authenticate": (Authenticate, {"token": (STR, True)}),
    "query": (Query, {"what": (STR, True), "program": (STR, False)}),
    "upload_begin": (UploadBegin, {"hash": (STR, True), "size": (INT, True)}),
    "upload_chunk": (UploadChunk, {"hash": (STR, True), "data": (BIN, True)}),
    "upload_end": (UploadEnd, {"hash": (STR, True)}),
    "launch_instance": (Launch, {"program": (STR, True), "args": (STR_LIST, False),
                                 "detached": (BOOL, False)}),
    "signal_instance": (Signal, {"instance": (STR, True), "message": (STR, True)}),
    "terminate_instance": (Terminate, {"instance": (STR, True)}),
    "detach_instance": (Detach, {"instance": (STR, True)}),
    "attach_instance": (Attach, {"instance": (STR, True)}),
}


def decode_request(frame: bytes) -> Request:
    """Parse and validate one client message, or raise ProtocolError saying what is wrong.

    Every field, `type` and `id` included, is type-checked here, so nothing past the decoder
    ever sees a value of the wrong type (a list where a name was expected, say)."""
    message = _unpack(frame)
    if not isinstance(message, dict):
        raise ProtocolError(MALFORMED, f"a message must be a msgpack map, got {_kind(message)}")
    request_id = _request_id(message)
    kind = _field(message, "type", STR, request_id)
    if kind not in REQUESTS:
        raise ProtocolError(
            UNKNOWN_TYPE,
            f"unknown message type {_short(kind)}; expected one of {', '.join(REQUESTS)}",
            request_id,
        )
    record, spec = REQUESTS[kind]
    values: dict[str, Any] = {"id": request_id}
    for name, (field_kind, required) in spec.items():
        value = _field(message, name, field_kind, request_id, kind, required)
        if value is not None:
            values[name] = value
    return _check(record(**values), kind)


def _field(message: dict[str, Any], name: str, kind: Kind, request_id: int | None,
           context: str = "", required: bool = True) -> Any:
    """`message[name]` if it has the right kind; None when absent and optional."""
    where = f"{context}: " if context else ""
    value = message.get(name)
    if value is None:
        if required:
            raise ProtocolError(BAD_REQUEST, f"{where}missing field {name!r}", request_id)
        return None
    if not kind.accepts(value):
        raise ProtocolError(BAD_REQUEST,
                            f"{where}field {name!r} must be {kind.name}, got {_kind(value)}",
                            request_id)
    return value


def _unpack(frame: bytes) -> Any:
    try:
        # strict_map_key keeps keys to str/bytes; raw=False rejects invalid UTF-8 in strings.
        return msgpack.unpackb(frame, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise ProtocolError(MALFORMED, f"not a msgpack message: {type(exc).__name__}") from None


def _request_id(message: dict[str, Any]) -> int:
    request_id: int = _field(message, "id", INT, None)
    if not 0 <= request_id <= MAX_ID:
        raise ProtocolError(BAD_REQUEST, f"field 'id' must be in 0..{MAX_ID}")
    return request_id


def _check(request: Request, kind: str) -> Request:
    """Value checks beyond types."""
    rid = request.id
    if isinstance(request, UploadBegin | UploadChunk | UploadEnd):
        if not HASH_PATTERN.fullmatch(request.hash):
            raise ProtocolError(BAD_REQUEST, f"{kind}: 'hash' must be 64 lowercase hex digits "
                                             "(BLAKE3)", rid)
    if isinstance(request, UploadBegin) and request.size <= 0:
        raise ProtocolError(BAD_REQUEST, f"{kind}: 'size' must be positive", rid)
    if isinstance(request, Query):
        if request.what not in QUERIES:
            raise ProtocolError(BAD_REQUEST, f"query: 'what' must be one of {', '.join(QUERIES)}",
                                rid)
        if request.what == "program_exists" and request.program is None:
            raise ProtocolError(BAD_REQUEST, "query program_exists: missing field 'program'", rid)
    return request


def _kind(value: Any) -> str:
    return "nil" if value is None else type(value).__name__


def _short(value: Any) -> str:
    """A bounded repr of client data (reprlib caps depth and length, whatever was sent)."""
    return reprlib.repr(value)


# ---------------------------------------------------------------------------------------------
# Server → client messages.


def ok(request_id: int, result: Any = None) -> dict[str, Any]:
    return {"type": "response", "id": request_id, "ok": True, "result": result}


def error(code: str, message: str, request_id: int | None = None) -> dict[str, Any]:
    """An error response; without a readable id it is a connection-level `error` message."""
    if request_id is None:
        return {"type": "error", "error": code, "message": message}
    return {"type": "response", "id": request_id, "ok": False, "error": code, "message": message}


# Where the runtime's event dicts keep their text; on the wire it is always `data`.
_EVENT_TEXT = {"message": "message", "stdout": "data", "stderr": "data", "return": "value"}


def event(instance_id: str, payload: dict[str, Any]) -> dict[str, Any]:
    """An instance event for its client: `message`, `stdout`, `stderr` and `return` carry their
    text in `data`; `terminated` carries `reason`, `detail` and, for limits, `limit`;
    `detached` (this connection no longer streams the instance) carries nothing more."""
    kind = payload.get("event")
    message: dict[str, Any] = {"type": "event", "instance": instance_id, "event": kind}
    if kind in _EVENT_TEXT:
        message["data"] = payload.get(_EVENT_TEXT[kind], "")
    else:
        message.update((k, v) for k, v in payload.items() if k != "event")
    return message


def detached(instance_id: str) -> dict[str, Any]:
    """The last event a connection gets of an instance that was detached from it."""
    return event(instance_id, {"event": "detached"})


def pack(message: dict[str, Any]) -> bytes:
    packed: bytes = msgpack.packb(message, use_bin_type=True)  # msgpack is untyped
    return packed


def unpack(data: bytes) -> Any:
    """Decode a server message (for clients); raises ValueError on garbage."""
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception as exc:
        raise ValueError(f"not a msgpack message: {exc}") from None


# ---------------------------------------------------------------------------------------------
# TCP framing.


class FrameTooLarge(Exception):
    def __init__(self, size: int, limit: int):
        super().__init__(f"frame of {size} bytes exceeds the limit of {limit}")
        self.size = size
        self.limit = limit


def frame(payload: bytes) -> bytes:
    return FRAME_HEADER.pack(len(payload)) + payload


class FrameBuffer:
    """Splits a TCP byte stream into frames; a header announcing more than `limit` is refused
    before any of its payload is buffered."""

    def __init__(self, limit: int):
        self.limit = limit
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        self._buffer += data
        frames = []
        while len(self._buffer) >= FRAME_HEADER.size:
            (size,) = FRAME_HEADER.unpack_from(self._buffer)
            if size > self.limit:
                raise FrameTooLarge(size, self.limit)
            end = FRAME_HEADER.size + size
            if len(self._buffer) < end:
                break
            frames.append(bytes(self._buffer[FRAME_HEADER.size:end]))
            del self._buffer[:end]
        return frames

    @property
    def pending(self) -> int:
        """Bytes of an unfinished frame (non-zero at EOF means the peer truncated a frame)."""
        return len(self._buffer)
