"""Publish/subscribe between instances: `subscribe`, `broadcast`, `topic_receive`.

Each subscription buffers up to `buffer` messages. A broadcast never waits for a slow reader:
a subscriber whose buffer is full misses that message, and the broadcast's count (how many
subscribers got it) says so. A broadcasting instance that is itself subscribed to the topic
receives its own message too.

What a subscriber's inbox may hold is also bounded in bytes: its subscriptions (the topic
names and their buffers) and the broadcasts buffered for it, all topics together, stay under
`max_bytes` per instance. A broadcast that does not fit is missed like one into a full buffer,
and a subscription that does not fit is refused; messages of up to 4 MiB, 256 of them per
topic and any number of topics would otherwise let one instance make the host hold gigabytes.
"""

from __future__ import annotations

from collections import Counter
from typing import Protocol

import trio

from pie_trio.control.fields import ControlError, Fields

SUBSCRIPTION_COST = 1024  # bytes a subscription takes besides its topic name (its channel)
MESSAGE_OVERHEAD = 64  # bytes a buffered message takes besides its text: empty ones count


class _Subscription:
    def __init__(self, buffer: int):
        self.send, self.receive = trio.open_memory_channel[str](buffer)


class Topics:
    def __init__(self, buffer: int = 256, max_bytes: int = 16 << 20):
        self._buffer = buffer
        self._max_bytes = max_bytes  # per instance: subscriptions and buffered messages
        # topic -> instance id -> subscription; insertion order is delivery order.
        self._subscribers: dict[str, dict[str, _Subscription]] = {}
        self._bytes: Counter[str] = Counter()  # instance id -> bytes held for it

    def subscription_count(self) -> int:
        return sum(len(subs) for subs in self._subscribers.values())

    def held_bytes(self, instance_id: str) -> int:
        """Bytes the instance's subscriptions and buffered broadcasts take."""
        return self._bytes[instance_id]

    def subscribe(self, instance_id: str, topic: str) -> None:
        """Start buffering `topic` for the instance; subscribing twice changes nothing."""
        subs = self._subscribers.get(topic, {})
        if instance_id in subs:
            return
        cost = SUBSCRIPTION_COST + len(topic)
        if self._bytes[instance_id] + cost > self._max_bytes:
            raise ControlError(
                f"subscribe: the instance's subscriptions and buffered broadcasts would take "
                f"more than {self._max_bytes} bytes (limit instance_topic_bytes)")
        self._subscribers.setdefault(topic, subs)[instance_id] = _Subscription(self._buffer)
        self._bytes[instance_id] += cost

    def broadcast(self, topic: str, message: str) -> int:
        delivered = 0
        size = len(message) + MESSAGE_OVERHEAD
        for instance_id, sub in self._subscribers.get(topic, {}).items():
            if self._bytes[instance_id] + size > self._max_bytes:
                continue  # its inbox is full in bytes: it misses the message
            try:
                sub.send.send_nowait(message)
            except trio.WouldBlock:
                continue  # a full buffer: this subscriber misses the message
            self._bytes[instance_id] += size
            delivered += 1
        return delivered

    async def receive(self, instance_id: str, topic: str) -> str:
        sub = self._subscribers.get(topic, {}).get(instance_id)
        if sub is None:
            raise ControlError(f"not subscribed to topic {topic!r}")
        try:
            message = await sub.receive.receive()
        except trio.EndOfChannel:
            raise ControlError(f"the subscription to {topic!r} ended") from None
        if instance_id in self._bytes:
            self._bytes[instance_id] -= len(message) + MESSAGE_OVERHEAD
        return message

    def unsubscribe_all(self, instance_id: str) -> None:
        for topic in list(self._subscribers):
            sub = self._subscribers[topic].pop(instance_id, None)
            if sub is not None:
                sub.send.close()
            if not self._subscribers[topic]:
                del self._subscribers[topic]
        self._bytes.pop(instance_id, None)


# -- the ops -----------------------------------------------------------------------------------


class Subscriber(Protocol):
    """What the messaging ops need of the requesting instance."""

    @property
    def instance_id(self) -> str: ...

    @property
    def topics(self) -> Topics: ...


async def subscribe(ctx: Subscriber, f: Fields, priority: int) -> None:
    ctx.topics.subscribe(ctx.instance_id, f.text("topic"))


async def broadcast(ctx: Subscriber, f: Fields, priority: int) -> int:
    return ctx.topics.broadcast(f.text("topic"), f.text("message"))


async def topic_receive(ctx: Subscriber, f: Fields, priority: int) -> str:
    return await ctx.topics.receive(ctx.instance_id, f.text("topic"))
