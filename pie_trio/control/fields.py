"""Typed access to the fields of one guest request, with errors that name the op and the field.

Guest requests arrive as decoded msgpack maps. Every handler reads its fields through `Fields`,
so a wrong or missing field is refused with the same precise wording everywhere, e.g.
``field 'pages' must be a list of int, got str`` (the dispatcher prefixes the op's name).
A field whose value is nil counts as absent, because SDKs commonly serialise an unset optional
field as nil.
"""

from __future__ import annotations

from typing import Any


class ControlError(Exception):
    """A request was refused. Its message goes back to the requesting instance only, prefixed
    with the op's name by the dispatcher."""


_MISSING: Any = object()


def type_name(value: Any) -> str:
    """The msgpack-ish name of a value's type, for error messages."""
    if value is None:
        return "nil"
    return {bool: "bool", int: "int", float: "float", str: "str", bytes: "bin",
            list: "list", tuple: "list", dict: "map"}.get(type(value), type(value).__name__)


def is_int(value: Any) -> bool:
    # bool is a subclass of int in Python, but `true` is not a page id.
    return isinstance(value, int) and not isinstance(value, bool)


class Fields:
    """The fields of one request (or of a map nested in it, named by `prefix`); each getter
    validates as it reads."""

    def __init__(self, request: dict[str, Any], prefix: str = ""):
        self.request = request
        self.prefix = prefix

    def error(self, message: str) -> ControlError:
        return ControlError(f"{self.prefix}{message}")

    def _get(self, name: str, default: Any) -> Any:
        """The field's value, or `default` when absent; getters pass a None default through
        unchecked, so `getter(name, None)` reads an optional field."""
        value = self.request.get(name)
        if value is None:
            if default is _MISSING:
                raise self.error(f"missing field {name!r}")
            return default
        return value

    def _wrong(self, name: str, expected: str, value: Any) -> ControlError:
        return self.error(f"field {name!r} must be {expected}, got {type_name(value)}")

    def integer(self, name: str, default: Any = _MISSING, *, low: int | None = None,
                high: int | None = None) -> int:
        value = self._get(name, default)
        if value is None:
            return None
        if not is_int(value):
            raise self._wrong(name, "an int", value)
        if low is not None and value < low:
            raise self.error(f"field {name!r} must be at least {low}, got {value}")
        if high is not None and value > high:
            raise self.error(f"field {name!r} must be at most {high}, got {value}")
        return value

    def number(self, name: str, default: Any = _MISSING) -> float:
        value = self._get(name, default)
        if value is None:
            return None
        if not (is_int(value) or isinstance(value, float)):
            raise self._wrong(name, "a number", value)
        return float(value)

    def flag(self, name: str, default: Any = _MISSING) -> bool:
        value = self._get(name, default)
        if value is None:
            return None
        if not isinstance(value, bool):
            raise self._wrong(name, "a bool", value)
        return value

    def text(self, name: str, default: Any = _MISSING) -> str:
        value = self._get(name, default)
        if value is None:
            return None
        if not isinstance(value, str):
            raise self._wrong(name, "a str", value)
        return value

    def blob(self, name: str, default: Any = _MISSING) -> bytes:
        value = self._get(name, default)
        if value is None:
            return None
        if not isinstance(value, bytes | bytearray):
            raise self._wrong(name, "bin", value)
        return bytes(value)

    def int_list(self, name: str, default: Any = _MISSING, *, low: int | None = None) -> list[int]:
        value = self._get(name, default)
        if value is None:
            return None
        if not isinstance(value, list | tuple):
            raise self._wrong(name, "a list of int", value)
        for i, item in enumerate(value):
            if not is_int(item):
                raise self.error(f"field {name!r}[{i}] must be an int, got {type_name(item)}")
            if low is not None and item < low:
                raise self.error(f"field {name!r}[{i}] must be at least {low}, got {item}")
        return list(value)

    def int_lists(self, name: str, default: Any = _MISSING) -> list[list[int]]:
        value = self._get(name, default)
        if value is None:
            return None
        if not isinstance(value, list | tuple):
            raise self._wrong(name, "a list of lists of int", value)
        rows = []
        for i, row in enumerate(value):
            if not isinstance(row, list | tuple) or not all(is_int(x) for x in row):
                raise self.error(f"field {name!r}[{i}] must be a list of int")
            rows.append(list(row))
        return rows

    def mapping(self, name: str, default: Any = _MISSING) -> dict[Any, Any]:
        value = self._get(name, default)
        if value is None:
            return None
        if not isinstance(value, dict):
            raise self._wrong(name, "a map", value)
        return value

    def anything(self, name: str, default: Any = None) -> Any:
        return self.request.get(name, default)


def distinct(noun: str, ids: list[int]) -> list[int]:
    """`ids` unchanged, or an error naming the first id that appears twice."""
    seen: set[int] = set()
    for i in ids:
        if i in seen:
            raise ControlError(f"{noun} {i} named twice")
        seen.add(i)
    return ids
