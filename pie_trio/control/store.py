"""The key-value store every instance shares, and its ops (`store_get/set/delete/list`).

Keys and values are strings, bounded in size (measured in UTF-8 bytes) so one instance cannot
exhaust the server's memory: a key up to `max_key_bytes`, a value up to `max_value_bytes`, and
all entries together up to `max_total_bytes`. The store lives in memory for the life of the
server process.
"""

from __future__ import annotations

from typing import Protocol

from pie_trio.control.fields import ControlError, Fields


class KeyValueStore:
    def __init__(self, max_key_bytes: int = 1024, max_value_bytes: int = 1 << 20,
                 max_total_bytes: int = 64 << 20):
        self.max_key_bytes = max_key_bytes
        self.max_value_bytes = max_value_bytes
        self.max_total_bytes = max_total_bytes
        self._entries: dict[str, str] = {}
        self._total_bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> str | None:
        return self._entries.get(key)

    def set(self, key: str, value: str) -> None:
        key_bytes = _size(key)
        value_bytes = _size(value)
        if key_bytes > self.max_key_bytes:
            raise ControlError(
                f"key is {key_bytes} bytes, the limit is {self.max_key_bytes}"
            )
        if value_bytes > self.max_value_bytes:
            raise ControlError(
                f"value is {value_bytes} bytes, the limit is {self.max_value_bytes}"
            )
        old = self._entries.get(key)
        old_bytes = key_bytes + _size(old) if old is not None else 0
        total = self._total_bytes - old_bytes + key_bytes + value_bytes
        if total > self.max_total_bytes:
            raise ControlError(
                f"the store is full ({self._total_bytes} of "
                f"{self.max_total_bytes} bytes used)"
            )
        self._entries[key] = value
        self._total_bytes = total

    def delete(self, key: str) -> bool:
        value = self._entries.pop(key, None)
        if value is None:
            return False
        self._total_bytes -= _size(key) + _size(value)
        return True

    def keys(self, prefix: str) -> list[str]:
        return sorted(k for k in self._entries if k.startswith(prefix))


def _size(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


# -- the ops -----------------------------------------------------------------------------------


class StoreUser(Protocol):
    """What the store ops need of the requesting instance."""

    @property
    def store(self) -> KeyValueStore: ...


def store_get(ctx: StoreUser, f: Fields, priority: int) -> str | None:
    return ctx.store.get(f.text("key"))


def store_set(ctx: StoreUser, f: Fields, priority: int) -> None:
    ctx.store.set(f.text("key"), f.text("value"))


def store_delete(ctx: StoreUser, f: Fields, priority: int) -> bool:
    return ctx.store.delete(f.text("key"))


def store_list(ctx: StoreUser, f: Fields, priority: int) -> list[str]:
    return ctx.store.keys(f.text("prefix", ""))
