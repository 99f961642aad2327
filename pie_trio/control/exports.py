"""KV pages published under a name, for other instances (or later ones) to import.

An export holds one reference on each of its physical pages, so the KV outlives the virtual ids
of the instance that exported it. *Owner-bound* exports vanish when their instance closes;
*persistent* ones stay until some instance unexports them. Names form one namespace shared by
every instance, like the key-value store; any instance may unexport any name.
"""

from __future__ import annotations

from dataclasses import dataclass

from pie_trio.control.fields import ControlError
from pie_trio.control.resources import PhysicalPool


@dataclass
class Export:
    name: str
    pages: list[int]  # physical ids
    owner: str | None  # the instance id it is bound to; None when persistent


class ExportRegistry:
    def __init__(self, pool: PhysicalPool):
        self._pool = pool
        self._exports: dict[str, Export] = {}

    def __len__(self) -> int:
        return len(self._exports)

    def add(self, name: str, pages: list[int], owner: str | None) -> None:
        if name in self._exports:
            raise ControlError(f"the name {name!r} is already exported")
        self._pool.ref(pages)
        self._exports[name] = Export(name, list(pages), owner)

    def remove(self, name: str) -> None:
        export = self._exports.pop(name, None)
        if export is None:
            raise ControlError(f"no export named {name!r}")
        self._pool.unref(export.pages)

    def pages(self, name: str) -> list[int]:
        export = self._exports.get(name)
        if export is None:
            raise ControlError(f"no export named {name!r}")
        return list(export.pages)

    def names(self) -> list[str]:
        return sorted(self._exports)

    def remove_owned_by(self, owner: str) -> None:
        for name in [e.name for e in self._exports.values() if e.owner == owner]:
            self.remove(name)
