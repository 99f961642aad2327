"""Automatic prefix caching: full KV pages of prompt prefixes, kept by content and reused.

A later request that starts with the same tokens as an earlier one need not prefill them again:
`prefix_store` hands the cache an instance's full pages together with the tokens they hold (from
position 0, written by plain causal forwards), and `prefix_match` gives a later instance new
virtual ids on the longest chain of cached pages its prompt starts with (+1 reference each, as
`import_pages` does). This is vLLM's automatic prefix caching, or SGLang's radix cache cut at
page boundaries.

Keys. Page i of a prompt is keyed by a chained BLAKE3 hash: of page i-1's key and page i's
tokens, so a key names the whole prefix up to the end of its page, never one page alone. The
chain starts from a root salted with the model's name and the *tenant*: tenants never share
cached KV, and one cannot learn whether another's prompt is cached (a match only ever finds
pages its own tenant stored). That is also why the cache can trust what a guest says its pages
hold: a guest that stores pages under the wrong tokens spoils only its own tenant's cache.

Never written. Only full pages are cached, and the cache holds a reference on each, so a page
some instance also names is shared: a write into it (an overwrite, `copy_kv`, `mask_kv`) copies
it first (kv.py's copy-on-write), and later tokens land in later pages. The control layer does
not know which rows of a page are masked (the executor does), so callers store only pages they
have not masked and did not write under a custom attention mask; the SDK's `fill_cached` stores
the pages of a fresh context, which has neither. A match covers at most all tokens but the last,
so the caller still forwards at least one token, for its logits.

Bound and eviction. At most `capacity` pages are cached; at the bound a new page replaces the
least recently used one that only the cache still refers to (when every cached page is also in
use, the new one is not cached). Under pressure the page pool asks the cache first
(`PhysicalPool.reclaimers`): it drops least recently used pages that only it refers to, which
returns them to the pool. A match or store touches a chain from its last page to its first, so
a chain's later pages are dropped before the earlier ones its siblings may share.
"""

from __future__ import annotations

from array import array
from collections import OrderedDict
from dataclasses import dataclass
from itertools import islice
from typing import Protocol

from blake3 import blake3

from pie_trio.control.fields import ControlError, Fields
from pie_trio.control.resources import PhysicalPool, VirtualIds


@dataclass
class PrefixCacheStats:
    queries: int = 0  # prefix_match requests
    query_tokens: int = 0  # tokens they asked about
    hit_tokens: int = 0  # tokens they found cached (hit rate: hit_tokens / query_tokens)


class PrefixCache:
    """The controller's cache of full KV pages by prefix hash; a `Reclaimer` of its page pool."""

    def __init__(self, pool: PhysicalPool, page_size: int, model: str, capacity: int):
        self._pool = pool
        self.page_size = page_size
        self._model = model
        self.capacity = capacity  # most pages cached at once (0: the cache is off)
        self._pages: OrderedDict[bytes, int] = OrderedDict()  # key -> physical page, LRU first
        self._keys: dict[int, bytes] = {}  # physical page -> its key (one entry per page)
        self.stats = PrefixCacheStats()

    def __len__(self) -> int:
        return len(self._pages)

    def match(self, tenant: str, tokens: list[int]) -> list[int]:
        """The physical pages of the longest cached chain `tokens` starts with, +1 reference
        each; never more than `len(tokens) - 1` tokens' worth."""
        self.stats.queries += 1
        self.stats.query_tokens += len(tokens)
        found: list[int] = []
        keys = self._keys_of(tenant, tokens[:-1]) if self.capacity else []
        for key in keys:
            page = self._pages.get(key)
            if page is None:
                break
            found.append(page)
        self._touch(keys[:len(found)])
        self._pool.ref(found)
        self.stats.hit_tokens += len(found) * self.page_size
        return found

    def store(self, tenant: str, tokens: list[int], pages: list[int]) -> int:
        """Cache the full pages among `pages` (physical) that hold `tokens` from position 0;
        how many were not cached before."""
        keys = self._keys_of(tenant, tokens) if self.capacity else []
        if len(pages) < len(keys):
            raise ControlError(f"{len(tokens)} tokens fill {len(keys)} pages, "
                               f"but only {len(pages)} pages were given")
        self._touch(keys)  # so that making room never drops a page of this very chain
        stored = 0
        for key, page in zip(keys, pages[:len(keys)], strict=True):
            if key in self._pages or page in self._keys:
                continue  # cached already (a page of a match, or an equal prefix's page)
            if len(self._pages) >= self.capacity and not self._evict(1):
                break  # every cached page is in use: cache nothing more for now
            self._pool.ref([page])
            self._pages[key] = page
            self._keys[page] = key
            stored += 1
        self._touch(keys)
        return stored

    async def reclaim(self, count: int, requester: str | None) -> None:
        """The pool is short of pages: drop up to `count` that only the cache refers to."""
        self._evict(count)

    def relieve(self, tenant: str, count: int) -> int:
        """`tenant` is at its page quota: drop up to `count` of the pages charged to it that
        only the cache refers to, least recently used first; how many."""
        return self._evict(count, tenant)

    def clear(self) -> None:
        """Drop every entry (pages other holders still name stay allocated)."""
        pages = list(self._pages.values())
        self._pages.clear()
        self._keys.clear()
        self._pool.unref(pages)

    def _evict(self, count: int, tenant: str | None = None) -> int:
        """Drop up to `count` least recently used pages nobody else refers to (charged to
        `tenant`, if given); how many."""
        unshared = (key for key, page in self._pages.items() if not self._pool.shared(page)
                    and (tenant is None or self._pool.tenant_of(page) == tenant))
        dropped = [self._pages.pop(key) for key in list(islice(unshared, count))]
        for page in dropped:
            del self._keys[page]
        self._pool.unref(dropped)
        return len(dropped)

    def _touch(self, keys: list[bytes]) -> None:
        """Mark a chain used now, its first page most recently."""
        for key in reversed(keys):
            if key in self._pages:
                self._pages.move_to_end(key)

    def _keys_of(self, tenant: str, tokens: list[int]) -> list[bytes]:
        """The chained key of every full page of `tokens`."""
        try:
            packed = array("I", tokens)
        except OverflowError:
            raise ControlError("token ids must be between 0 and 2**32 - 1") from None
        key = self._root(tenant)
        keys = []
        size = self.page_size
        for start in range(0, len(tokens) - size + 1, size):
            key = blake3(key + packed[start:start + size].tobytes()).digest()
            keys.append(key)
        return keys

    def _root(self, tenant: str) -> bytes:
        """The chain's salt: the model and the tenant, length-prefixed so no two pairs meet."""
        parts = [self._model.encode(), tenant.encode()]
        salt = b"pie-trio prefix cache\0" + b"".join(
            len(part).to_bytes(8, "little") + part for part in parts)
        return blake3(salt).digest()


class _PrefixCacheUser(Protocol):
    """What the two ops need of the requesting instance (`InstanceContext` satisfies it)."""

    @property
    def pages(self) -> VirtualIds: ...
    @property
    def prefix_cache(self) -> PrefixCache: ...
    def tenant(self) -> str: ...


async def prefix_match(ctx: _PrefixCacheUser, f: Fields, priority: int) -> dict[str, object]:
    tokens = f.int_list("tokens")
    physical = ctx.prefix_cache.match(ctx.tenant(), tokens)
    pages = [ctx.pages.add(p) for p in physical]
    return {"pages": pages, "tokens": len(pages) * ctx.prefix_cache.page_size}


async def prefix_store(ctx: _PrefixCacheUser, f: Fields, priority: int) -> int:
    tokens = f.int_list("tokens")
    physical = ctx.pages.resolve(f.int_list("pages"))
    return ctx.prefix_cache.store(ctx.tenant(), tokens, physical)
