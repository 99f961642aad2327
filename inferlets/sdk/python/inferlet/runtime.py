"""The runtime's services: arguments, messages, the store, broadcast topics, time."""

from __future__ import annotations

from typing import Any

from inferlet.host import call, request


async def args() -> list[str]:
    """The launch arguments (without the program name)."""
    result: list[str] = await request("args")
    return result


async def send(message: str) -> None:
    """Send `message` to the client (a `message` event). The runtime answers `send` itself,
    without waiting, so it goes as one `call` (a streamed token's one host call) rather than
    a submit and a take."""
    call("send", message=message)


async def receive() -> str:
    """Wait for the next message the client sends this instance."""
    result: str = await request("receive")
    return result


async def set_return(value: str) -> None:
    """The value reported to the client when the instance finishes."""
    await request("set_return", value=value)


async def store_get(key: str) -> str | None:
    result: str | None = await request("store_get", key=key)
    return result


async def store_set(key: str, value: str) -> None:
    await request("store_set", key=key, value=value)


async def store_delete(key: str) -> bool:
    return bool(await request("store_delete", key=key))


async def store_list(prefix: str = "") -> list[str]:
    result: list[str] = await request("store_list", prefix=prefix)
    return result


async def subscribe(topic: str) -> None:
    await request("subscribe", topic=topic)


async def broadcast(topic: str, message: str) -> int:
    return int(await request("broadcast", topic=topic, message=message))


async def topic_receive(topic: str) -> str:
    result: str = await request("topic_receive", topic=topic)
    return result


async def sleep(seconds: float) -> None:
    """Sleep without blocking the other tasks (the host's `sleep`; `time.sleep` is refused)."""
    await request("sleep", ms=int(seconds * 1000))


async def clock() -> float:
    return float(await request("clock"))


async def version() -> str:
    result: str = await request("version")
    return result


async def instance_id() -> str:
    result: str = await request("instance_id")
    return result


async def raw(op: str, **fields: Any) -> Any:
    """Any request of docs/abi.md, by its op."""
    return await request(op, **fields)
