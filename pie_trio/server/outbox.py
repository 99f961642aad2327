"""`Outbox`: the frames waiting to be written to one client, bounded in bytes.

A session's responses and its instances' events all queue here, in order, for its one writer
task. The bound is in bytes, not messages, because one instance message may be megabytes: a
client that stops reading holds at most `limit` bytes here (or one frame, if a single frame is
larger), and every sender waits until the writer has made room. That is the back-pressure that
reaches the instances: their pumps wait here, their event channels fill, and the runtime makes
their guests wait (docs/runtime.md, `output_backlog_bytes`).

A frame counts against the bound from `put` until the writer reports it written (`written`), so
frames the writer has taken but not yet handed to the socket count too.
"""

from __future__ import annotations

from collections import deque

import trio


class Outbox:
    def __init__(self, limit: int):
        self.limit = limit
        self.queued = 0  # bytes put and not yet reported written
        self._frames: deque[bytes] = deque()
        self._closed = False
        self._space = trio.lowlevel.ParkingLot()  # senders waiting for room
        self._ready = trio.lowlevel.ParkingLot()  # the writer waiting for frames

    async def put(self, frame: bytes) -> None:
        """Queue `frame`, first waiting for room; ClosedResourceError once closed."""
        await trio.lowlevel.checkpoint_if_cancelled()
        if self._full(frame):
            while self._full(frame):
                await self._space.park()
        else:
            await trio.lowlevel.cancel_shielded_checkpoint()
        self.put_nowait(frame)

    def put_nowait(self, frame: bytes) -> None:
        """Queue `frame` at once, over the bound if need be: only for a session's last words
        (a small error before it closes), which must not wait on the client it is dropping."""
        if self._closed:
            raise trio.ClosedResourceError("the outbox is closed")
        self._frames.append(frame)
        self.queued += len(frame)
        self._ready.unpark_all()

    def _full(self, frame: bytes) -> bool:
        # One frame always fits into an empty outbox, however large (it passed the size
        # limits of its own layer already).
        return not self._closed and self.queued > 0 and self.queued + len(frame) > self.limit

    async def take(self, max_bytes: int) -> list[bytes]:
        """The frames queued now, up to `max_bytes` (at least one frame), waiting for one if
        none is; [] once closed and empty. Call `written` with their size once written."""
        if self._frames or self._closed:
            await trio.lowlevel.checkpoint()
        while not self._frames and not self._closed:
            await self._ready.park()
        frames: list[bytes] = []
        size = 0
        while self._frames and (not frames or size + len(self._frames[0]) <= max_bytes):
            frame = self._frames.popleft()
            frames.append(frame)
            size += len(frame)
        return frames

    def written(self, nbytes: int) -> None:
        """The writer is done with `nbytes` of taken frames: make room for senders."""
        self.queued -= nbytes
        self._space.unpark_all()

    def close(self) -> None:
        """No more frames: waiting senders get ClosedResourceError, the writer drains the rest."""
        self._closed = True
        self._space.unpark_all()
        self._ready.unpark_all()
