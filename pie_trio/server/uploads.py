"""Unfinished program uploads: the bytes one session holds, and the server-wide budget for them.

An upload announces its size in `upload_begin`; that many bytes are *reserved* at once, against
the session's own budget (`upload_buffer_per_session`) and the server's (`upload_buffer_total`),
and stay reserved until the upload ends, is abandoned, or its session closes. Refusing at
`upload_begin` means a client learns at once that it must retry later, and memory held by
half-sent programs stays bounded however many connections a client opens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pie_trio import protocol
from pie_trio.protocol import ProtocolError

MAX_UPLOADS = 4  # unfinished uploads one session may hold at once


class UploadBudget:
    """Bytes reserved by the unfinished uploads of every session of one server."""

    def __init__(self, limit: int):
        self.limit = limit
        self.reserved = 0

    def reserve(self, size: int, request_id: int) -> None:
        if self.reserved + size > self.limit:
            raise ProtocolError(protocol.LIMIT, f"the server already holds {self.reserved} "
                                f"bytes of unfinished uploads, its limit is {self.limit}; "
                                "retry later", request_id)
        self.reserved += size

    def release(self, size: int) -> None:
        self.reserved -= size


@dataclass
class Upload:
    size: int
    data: bytearray = field(default_factory=bytearray)


class Uploads:
    """One session's unfinished uploads, by program hash."""

    def __init__(self, budget: UploadBudget, session_limit: int):
        self.budget = budget
        self.session_limit = session_limit
        self._uploads: dict[str, Upload] = {}

    @property
    def reserved(self) -> int:
        return sum(upload.size for upload in self._uploads.values())

    def begin(self, program_hash: str, size: int, request_id: int) -> None:
        """Start (or restart) an upload of `size` bytes, reserving them; ProtocolError(LIMIT)
        when the session or the server cannot hold that much more."""
        self.drop(program_hash)  # a restart replaces the old attempt
        if len(self._uploads) >= MAX_UPLOADS:
            raise ProtocolError(protocol.LIMIT, f"at most {MAX_UPLOADS} unfinished uploads "
                                "per session", request_id)
        if self.reserved + size > self.session_limit:
            raise ProtocolError(protocol.LIMIT, f"this session's unfinished uploads would hold "
                                f"{self.reserved + size} bytes, over its limit of "
                                f"{self.session_limit}; finish or abandon one first",
                                request_id)
        self.budget.reserve(size, request_id)
        self._uploads[program_hash] = Upload(size)

    def get(self, program_hash: str, request_id: int) -> Upload:
        upload = self._uploads.get(program_hash)
        if upload is None:
            raise ProtocolError(protocol.BAD_REQUEST, f"no upload of {program_hash} in "
                                "progress: send upload_begin first", request_id)
        return upload

    def drop(self, program_hash: str) -> None:
        """Forget an upload (finished, failed or abandoned) and release its reservation."""
        upload = self._uploads.pop(program_hash, None)
        if upload is not None:
            self.budget.release(upload.size)

    def drop_all(self) -> None:
        for program_hash in list(self._uploads):
            self.drop(program_hash)
