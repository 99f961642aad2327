"""The resource ops: KV pages, embedding slots, sharing, exports — and copy-on-write.

Sharing never copies: `share_pages` and `import_pages` give the instance new virtual ids on the
same physical pages (one more reference each). The copy happens lazily, when something is about
to *write* a page that more than one name refers to: `make_private` gives the writer's virtual
id a fresh physical page holding the rows that must survive, and the other names keep the old
page untouched.
"""

from __future__ import annotations

from pie_trio.control.context import InstanceContext
from pie_trio.control.fields import Fields, distinct
from pie_trio.control.resources import OWNER
from pie_trio.model.calls import CopyKv


async def make_private(ctx: InstanceContext, vid: int, keep_rows: int, priority: int) -> None:
    """Before page `vid` is written: if its physical page is shared, copy rows [0, keep_rows)
    into a fresh page of its own and remap `vid` there."""
    pool = ctx.physical_pages
    while True:
        old = ctx.pages.physical(vid)  # raises if a concurrent request freed it
        if not pool.shared(old):
            return
        [new] = await pool.allocate(1, priority, ctx.tenant(), ctx.instance_id)
        if ctx.pages.get(vid) != old:
            # The allocation waited, and meanwhile `vid` was freed, remapped, or swapped out and
            # back (preemption.py): `old` may belong to someone else now. Look again.
            pool.unref([new])
            continue
        try:
            if keep_rows:
                call = CopyKv(OWNER, src_page=old, dst_page=new, src_offset=0, dst_offset=0,
                              count=keep_rows)
                await ctx.executor.run(call, priority, pages=[old, new])
        except BaseException:
            pool.unref([new])
            raise
        if ctx.pages.get(vid) == old:
            ctx.pages.remap(vid, new)
            pool.unref([old])
            return
        # Another request of this instance remapped or freed `vid` meanwhile: look again.
        pool.unref([new])


def _add_pages(ctx: InstanceContext, physical: list[int]) -> list[int]:
    return [ctx.pages.add(p) for p in physical]


async def alloc_pages(ctx: InstanceContext, f: Fields, priority: int) -> list[int]:
    count = f.integer("count", low=0)
    physical = await ctx.physical_pages.allocate(count, priority, ctx.tenant(), ctx.instance_id)
    return _add_pages(ctx, physical)


async def free_pages(ctx: InstanceContext, f: Fields, priority: int) -> None:
    vids = distinct("page", f.int_list("pages"))
    ctx.physical_pages.unref(ctx.pages.remove(vids))


async def share_pages(ctx: InstanceContext, f: Fields, priority: int) -> list[int]:
    physical = ctx.pages.resolve(f.int_list("pages"))
    ctx.physical_pages.ref(physical)
    return _add_pages(ctx, physical)


async def alloc_slots(ctx: InstanceContext, f: Fields, priority: int) -> list[int]:
    count = f.integer("count", low=0)
    physical = await ctx.physical_slots.allocate(count, priority, ctx.tenant(),
                                                 ctx.instance_id)
    return [ctx.slots.add(s) for s in physical]


async def free_slots(ctx: InstanceContext, f: Fields, priority: int) -> None:
    vids = distinct("slot", f.int_list("slots"))
    ctx.physical_slots.unref(ctx.slots.remove(vids))


async def export_pages(ctx: InstanceContext, f: Fields, priority: int) -> None:
    name = f.text("name")
    if not name:
        raise f.error("field 'name' must not be empty")
    physical = ctx.pages.resolve(f.int_list("pages"))
    persistent = f.flag("persistent", False)
    ctx.exports.add(name, physical, None if persistent else ctx.instance_id, ctx.tenant())


async def unexport(ctx: InstanceContext, f: Fields, priority: int) -> None:
    # Only the export's tenant (or an operator) may remove it: see exports.py.
    ctx.exports.remove(f.text("name"), ctx.tenant())


async def import_pages(ctx: InstanceContext, f: Fields, priority: int) -> list[int]:
    physical = ctx.exports.pages(f.text("name"))
    ctx.physical_pages.ref(physical)
    return _add_pages(ctx, physical)


async def list_exports(ctx: InstanceContext, f: Fields, priority: int) -> list[str]:
    return ctx.exports.names()
