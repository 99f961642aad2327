"""Publish/subscribe between instances: `subscribe`, `broadcast`, `topic_receive`.

Each subscription buffers up to `buffer` messages. A broadcast never waits for a slow reader:
a subscriber whose buffer is full misses that message, and the broadcast's count (how many
subscribers got it) says so. A broadcasting instance that is itself subscribed to the topic
receives its own message too.
"""

from __future__ import annotations

import trio

from pie_trio.control.fields import ControlError


class _Subscription:
    def __init__(self, buffer: int):
        self.send, self.receive = trio.open_memory_channel[str](buffer)


class Topics:
    def __init__(self, buffer: int = 256):
        self._buffer = buffer
        # topic -> instance id -> subscription; insertion order is delivery order.
        self._subscribers: dict[str, dict[str, _Subscription]] = {}

    def subscription_count(self) -> int:
        return sum(len(subs) for subs in self._subscribers.values())

    def subscribe(self, instance_id: str, topic: str) -> None:
        """Start buffering `topic` for the instance; subscribing twice changes nothing."""
        subs = self._subscribers.setdefault(topic, {})
        if instance_id not in subs:
            subs[instance_id] = _Subscription(self._buffer)

    def broadcast(self, topic: str, message: str) -> int:
        delivered = 0
        for sub in self._subscribers.get(topic, {}).values():
            try:
                sub.send.send_nowait(message)
            except trio.WouldBlock:
                continue  # a full buffer: this subscriber misses the message
            delivered += 1
        return delivered

    async def receive(self, instance_id: str, topic: str) -> str:
        sub = self._subscribers.get(topic, {}).get(instance_id)
        if sub is None:
            raise ControlError(f"not subscribed to topic {topic!r}")
        try:
            return await sub.receive.receive()
        except trio.EndOfChannel:
            raise ControlError(f"the subscription to {topic!r} ended") from None

    def unsubscribe_all(self, instance_id: str) -> None:
        for topic in list(self._subscribers):
            sub = self._subscribers[topic].pop(instance_id, None)
            if sub is not None:
                sub.send.close()
            if not self._subscribers[topic]:
                del self._subscribers[topic]
