"""Typed access to the fields of one guest request, with errors that name the op and the field.

Guest requests arrive as decoded msgpack maps. Every handler reads its fields through `Fields`,
so a wrong or missing field is refused with the same precise wording everywhere, e.g.
``field 'pages' must be a list of int, got str`` (the dispatcher prefixes the op's name).
A field whose value is nil counts as absent, because SDKs commonly serialise an unset optional
field as nil.
"""

from __future__ import annotations

from collections.abc import Callable
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
    return isinstance(value, int) and not isinstance(value, bool)


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

    def _present(self, name: str, default: Any) -> bool:
        if self.request.get(name) is not None:
            return True
        if default is _MISSING:
            raise self.error(f"missing field {name!r}")
        return False

    def _check(self, name: str, accepts: Callable[[Any], bool], expected: str) -> Any:
        value = self.request[name]
        if not accepts(value):
            raise self.error(f"field {name!r} must be {expected}, got {type_name(value)}")
        return value

    def integer(self, name: str, default: D = _MISSING, *, low: int | None = None,
                high: int | None = None) -> int | D:
        if not self._present(name, default):
            return default
        value: int = self._check(name, is_int, "an int")
        if low is not None and value < low:
            raise self.error(f"field {name!r} must be at least {low}, got {value}")
        if high is not None and value > high:
            raise self.error(f"field {name!r} must be at most {high}, got {value}")
        return value

    def number(self, name: str, default: D = _MISSING) -> float | D:
        if not self._present(name, default):
            return default
        return float(self._check(name, lambda v: is_int(v) or isinstance(v, float), "a number"))

    def flag(self, name: str, default: D = _MISSING) -> bool | D:
        if not self._present(name, default):
            return default
        value: bool = self._check(name, lambda v: isinstance(v, bool), "a bool")
        return value

    def text(self, name: str, default: D = _MISSING) -> str | D:
        if not self._present(name, default):
            return default
        value: str = self._check(name, lambda v: isinstance(v, str), "a str")
        return value

    def blob(self, name: str, default: D = _MISSING) -> bytes | D:
        if not self._present(name, default):
            return default
        return bytes(self._check(name, lambda v: isinstance(v, bytes | bytearray), "bin"))

    def mapping(self, name: str, default: D = _MISSING) -> dict[Any, Any] | D:
        if not self._present(name, default):
            return default
        value: dict[Any, Any] = self._check(name, lambda v: isinstance(v, dict), "a map")
        return value

    def int_list(self, name: str, default: D = _MISSING, *,
                 low: int | None = None) -> list[int] | D:
        if not self._present(name, default):
            return default
        value = self._check(name, lambda v: isinstance(v, list | tuple), "a list of int")
        for i, item in enumerate(value):
            if not is_int(item):
                raise self.error(f"field {name!r}[{i}] must be an int, got {type_name(item)}")
            if low is not None and item < low:
                raise self.error(f"field {name!r}[{i}] must be at least {low}, got {item}")
        return list(value)

    def int_lists(self, name: str, default: D = _MISSING) -> list[list[int]] | D:
        if not self._present(name, default):
            return default
        value = self._check(name, lambda v: isinstance(v, list | tuple),
                            "a list of lists of int")
        for i, row in enumerate(value):
            if not isinstance(row, list | tuple) or not all(is_int(x) for x in row):
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
