"""ASGI as the server's handlers see it: scopes and messages are plain dicts.

hypercorn types ASGI with one TypedDict per message kind; the app, the HTTP exchange and the
WebSocket transport read and write messages as dicts keyed by `type` (including the server's own
extension messages, which no TypedDict describes). `App.__call__` is the one place that turns
hypercorn's view into this one.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
