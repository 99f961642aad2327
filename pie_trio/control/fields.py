"""Typed access to the fields of one guest request, with errors that name the op and the field.

Guest requests arrive as decoded msgpack maps. Every handler reads its fields through `Fields`,
so a wrong or missing field is refused with the same precise wording everywhere, e.g.
``field 'pages' must be a list of int, got str`` (the dispatcher prefixes the op's name).
A field whose value is nil counts as absent, because SDKs commonly serialise an unset optional
field as nil.
"""

from __future__ import annotations

from typing import Any, TypeGuard, TypeVar

D = TypeVar("D")


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


def is_int(value: Any) -> TypeGuard[int]:
    # bool is a subclass of int in Python, but `true` is not a page id.
    return type(value) is int or (isinstance(value, int) and not isinstance(value, bool))


_SEQUENCE = (list, tuple)  # what a msgpack array may decode to
_BINARY = (bytes, bytearray)


class Fields:
    """The fields of one request (or of a map nested in it, named by `prefix`).

    Each getter validates as it reads. Without a default a field is required; with one, an
    absent (or nil) field yields the default unchecked, so `getter(name, None)` reads an
    optional field.
    """

    def __init__(self, request: dict[str, Any], prefix: str = ""):
        self.request = request
        self.prefix = prefix

    def error(self, message: str) -> ControlError:
        return ControlError(f"{self.prefix}{message}")

    # The getters read the request themselves rather than through shared helpers: a decode
    # step reads a dozen fields, and on the trio thread each extra call is paid per token.

    def _absent(self, name: str, default: D) -> D:
        """What an absent (or nil) field reads as: its default, if it has one."""
        if default is _MISSING:
            raise self.error(f"missing field {name!r}")
        return default

    def _wrong(self, name: str, value: Any, expected: str) -> ControlError:
        return self.error(f"field {name!r} must be {expected}, got {type_name(value)}")

    def integer(self, name: str, default: D = _MISSING, *, low: int | None = None,
                high: int | None = None) -> int | D:
        value = self.request.get(name)
        if value is None:
            return self._absent(name, default)
        if not is_int(value):
            raise self._wrong(name, value, "an int")
        if low is not None and value < low:
            raise self.error(f"field {name!r} must be at least {low}, got {value}")
        if high is not None and value > high:
            raise self.error(f"field {name!r} must be at most {high}, got {value}")
        return value

    def number(self, name: str, default: D = _MISSING) -> float | D:
        value = self.request.get(name)
        if value is None:
            return self._absent(name, default)
        if type(value) is not float and not is_int(value):
            raise self._wrong(name, value, "a number")
        return float(value)

    def flag(self, name: str, default: D = _MISSING) -> bool | D:
        value = self.request.get(name)
        if value is None:
            return self._absent(name, default)
        if not isinstance(value, bool):
            raise self._wrong(name, value, "a bool")
        return value

    def text(self, name: str, default: D = _MISSING) -> str | D:
        value = self.request.get(name)
        if value is None:
            return self._absent(name, default)
        if not isinstance(value, str):
            raise self._wrong(name, value, "a str")
        return value

    def blob(self, name: str, default: D = _MISSING) -> bytes | D:
        value = self.request.get(name)
        if value is None:
            return self._absent(name, default)
        if not isinstance(value, _BINARY):
            raise self._wrong(name, value, "bin")
        return bytes(value)

    def mapping(self, name: str, default: D = _MISSING) -> dict[Any, Any] | D:
        value = self.request.get(name)
        if value is None:
            return self._absent(name, default)
        if not isinstance(value, dict):
            raise self._wrong(name, value, "a map")
        return value

    def int_list(self, name: str, default: D = _MISSING, *,
                 low: int | None = None) -> list[int] | D:
        value = self.request.get(name)
        if value is None:
            return self._absent(name, default)
        if not isinstance(value, _SEQUENCE):
            raise self._wrong(name, value, "a list of int")
        # The common case in one pass of C loops; an offender is then found and named below.
        if all(type(item) is int for item in value) and (
                low is None or not value or min(value) >= low):
            return list(value)
        for i, item in enumerate(value):
            if not is_int(item):
                raise self.error(f"field {name!r}[{i}] must be an int, got {type_name(item)}")
            if low is not None and item < low:
                raise self.error(f"field {name!r}[{i}] must be at least {low}, got {item}")
        return list(value)

    def int_lists(self, name: str, default: D = _MISSING) -> list[list[int]] | D:
        value = self.request.get(name)
        if value is None:
            return self._absent(name, default)
        if not isinstance(value, _SEQUENCE):
            raise self._wrong(name, value, "a list of lists of int")
        for i, row in enumerate(value):
            if not isinstance(row, _SEQUENCE) or not all(is_int(x) for x in row):
                raise self.error(f"field {name!r}[{i}] must be a list of int")
        return [list(row) for row in value]

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
