"""KV pages published under a name, for other instances (or later ones) to import.

An export holds one reference on each of its physical pages, so the KV outlives the virtual ids
of the instance that exported it. *Owner-bound* exports vanish when their instance closes;
*persistent* ones stay until they are unexported. Names form one namespace shared by every
instance, like the key-value store, and any instance may import any name.

Every export belongs to the *tenant* of the instance that made it. Only that tenant's
instances — or an operator's (`ExportPolicy.operators`) — may unexport it, and one tenant may
own at most `ExportPolicy.max_persistent` persistent exports, so a tenant can neither remove
another's KV nor pin an unbounded number of names after its instances are gone. (The pages an
export keeps alive are bounded by the page pool's per-tenant quota, see resources.py.)
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from pie_trio.control.fields import ControlError
from pie_trio.control.resources import PhysicalPool


@dataclass(frozen=True)
class ExportPolicy:
    max_persistent: int | None = None  # persistent exports one tenant may own (None: any)
    operators: frozenset[str] = field(default_factory=frozenset)  # may unexport anything


@dataclass
class Export:
    name: str
    pages: list[int]  # physical ids
    owner: str | None  # the instance id it is bound to; None when persistent
    tenant: str = ""  # whose it is: the tenant of the instance that exported it


class ExportRegistry:
    def __init__(self, pool: PhysicalPool, policy: ExportPolicy | None = None):
        self._pool = pool
        self.policy = policy or ExportPolicy()
        self._exports: dict[str, Export] = {}
        self._persistent: Counter[str] = Counter()  # persistent exports by tenant

    def __len__(self) -> int:
        return len(self._exports)

    def add(self, name: str, pages: list[int], owner: str | None, tenant: str = "") -> None:
        if name in self._exports:
            raise ControlError(f"the name {name!r} is already exported")
        limit = self.policy.max_persistent
        if owner is None and limit is not None and self._persistent[tenant] >= limit:
            raise ControlError(f"tenant {tenant!r} already owns {self._persistent[tenant]} "
                               "persistent exports, its limit; unexport one first")
        self._pool.ref(pages)
        self._exports[name] = Export(name, list(pages), owner, tenant)
        if owner is None:
            self._persistent[tenant] += 1

    def remove(self, name: str, tenant: str | None = None) -> None:
        """Drop export `name`; with `tenant`, only if that tenant owns it (or is an operator).
        Without, unconditionally (the instance that owns it is closing)."""
        export = self._exports.get(name)
        if export is None:
            raise ControlError(f"no export named {name!r}")
        if (tenant is not None and tenant != export.tenant
                and tenant not in self.policy.operators):
            raise ControlError(f"the export {name!r} belongs to another tenant")
        del self._exports[name]
        if export.owner is None:
            self._persistent[export.tenant] -= 1
            if not self._persistent[export.tenant]:
                del self._persistent[export.tenant]
        self._pool.unref(export.pages)

    def pages(self, name: str) -> list[int]:
        export = self._exports.get(name)
        if export is None:
            raise ControlError(f"no export named {name!r}")
        return list(export.pages)

    def names(self) -> list[str]:
        return sorted(self._exports)

    def persistent_of(self, tenant: str) -> int:
        """How many persistent exports `tenant` owns."""
        return self._persistent[tenant]

    def remove_owned_by(self, owner: str) -> None:
        for name in [e.name for e in self._exports.values() if e.owner == owner]:
            self.remove(name)
