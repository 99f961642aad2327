"""The resource ops: KV pages, embedding slots, sharing, exports — and copy-on-write.

Sharing never copies: `share_pages` and `import_pages` give the instance new virtual ids on the
same physical pages (one more reference each). The copy happens lazily, when something is about
to *write* a page that more than one name refers to: `make_private` gives the writer's virtual
id a fresh physical page holding the rows that must survive, and the other names keep the old
page untouched.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pie_trio.control.fields import Fields, distinct
from pie_trio.control.resources import OWNER
from pie_trio.model.calls import CopyKv

if TYPE_CHECKING:
    from pie_trio.control.instance import InstanceControl


async def make_private(inst: InstanceControl, vid: int, keep_rows: int, priority: int) -> None:
    """Before page `vid` is written: if its physical page is shared, copy rows [0, keep_rows)
    into a fresh page of its own and remap `vid` there."""
    pool = inst.controller.pages
    while True:
        old = inst.pages.physical(vid)  # raises if a concurrent request freed it
        if not pool.shared(old):
            return
        [new] = await pool.allocate(1, priority, inst.controller.tenant_of(inst.id))
        try:
            if keep_rows:
                call = CopyKv(OWNER, src_page=old, dst_page=new, src_offset=0, dst_offset=0,
                              count=keep_rows)
                await inst.execute(call, priority, pages=[old, new])
        except BaseException:
            pool.unref([new])
            raise
        if inst.pages.get(vid) == old:
            inst.pages.remap(vid, new)
            pool.unref([old])
            return
        # Another request of this instance remapped or freed `vid` meanwhile: look again.
        pool.unref([new])


def _add_pages(inst: InstanceControl, physical: list[int]) -> list[int]:
    return [inst.pages.add(p) for p in physical]


async def alloc_pages(inst: InstanceControl, f: Fields, priority: int) -> list[int]:
    count = f.integer("count", low=0)
    tenant = inst.controller.tenant_of(inst.id)
    return _add_pages(inst, await inst.controller.pages.allocate(count, priority, tenant))


async def free_pages(inst: InstanceControl, f: Fields, priority: int) -> None:
    vids = distinct("page", f.int_list("pages"))
    inst.controller.pages.unref(inst.pages.remove(vids))


async def share_pages(inst: InstanceControl, f: Fields, priority: int) -> list[int]:
    physical = inst.pages.resolve(f.int_list("pages"))
    inst.controller.pages.ref(physical)
    return _add_pages(inst, physical)


async def alloc_slots(inst: InstanceControl, f: Fields, priority: int) -> list[int]:
    count = f.integer("count", low=0)
    physical = await inst.controller.slots.allocate(count, priority,
                                                    inst.controller.tenant_of(inst.id))
    return [inst.slots.add(s) for s in physical]


async def free_slots(inst: InstanceControl, f: Fields, priority: int) -> None:
    vids = distinct("slot", f.int_list("slots"))
    inst.controller.slots.unref(inst.slots.remove(vids))


async def export_pages(inst: InstanceControl, f: Fields, priority: int) -> None:
    name = f.text("name")
    if not name:
        raise f.error("field 'name' must not be empty")
    physical = inst.pages.resolve(f.int_list("pages"))
    persistent = f.flag("persistent", False)
    inst.controller.exports.add(name, physical, None if persistent else inst.id,
                                inst.controller.tenant_of(inst.id))


async def unexport(inst: InstanceControl, f: Fields, priority: int) -> None:
    # Only the export's tenant (or an operator) may remove it: see exports.py.
    inst.controller.exports.remove(f.text("name"), inst.controller.tenant_of(inst.id))


async def import_pages(inst: InstanceControl, f: Fields, priority: int) -> list[int]:
    physical = inst.controller.exports.pages(f.text("name"))
    inst.controller.pages.ref(physical)
    return _add_pages(inst, physical)


async def list_exports(inst: InstanceControl, f: Fields, priority: int) -> list[str]:
    return inst.controller.exports.names()
