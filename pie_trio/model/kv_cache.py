"""The paged KV cache: a fixed pool of pages, a masked flag per slot, and embedding slots.

Every page holds `page_size` token slots; slot `s` of the pool is row `s` of each layer's K and V
(`page * page_size + offset`). Which pages belong to whom is the executor's business: this pool
is plain storage, addressed by physical ids.

Pages can also be copied out to host memory and back (`swap_out`, `swap_in`): the control layer
does so to lend a preempted instance's pages to others without losing its work. Host copies are
kept here, by an integer key the caller chooses, until they are swapped back in or dropped.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from pie_trio.model.config import ModelConfig

DEFAULT_CPU_KV_BYTES = 512 * 2**20
# On CUDA, the share of free device memory (after the weights) given to the pool by default.
DEFAULT_CUDA_KV_SHARE = 0.5
DEFAULT_EMBED_SLOTS = 1024


def pages_for_budget(
    config: ModelConfig, budget_bytes: int, page_size: int, dtype: torch.dtype
) -> int:
    """How many pages of `page_size` slots fit in `budget_bytes` of K and V."""
    page_bytes = config.kv_bytes_per_token(dtype.itemsize) * page_size
    pages = budget_bytes // page_bytes
    if pages < 1:
        raise ValueError(
            f"a KV budget of {budget_bytes} bytes holds no page ({page_bytes} bytes each)"
        )
    return int(pages)


def default_kv_budget(device: torch.device) -> int:
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free * DEFAULT_CUDA_KV_SHARE)
    return DEFAULT_CPU_KV_BYTES


class HostPage(NamedTuple):
    """One page's rows of every layer in host memory: K, V and the masked flags."""

    k: torch.Tensor
    v: torch.Tensor
    masked: torch.Tensor

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes + self.masked.nbytes


def _to_host(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to("cpu", copy=True)


class KvCache:
    """K/V rows for every layer, masked flags and embedding slots, all preallocated."""

    def __init__(
        self,
        config: ModelConfig,
        num_pages: int,
        page_size: int,
        num_slots: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.num_pages = num_pages
        self.page_size = page_size
        self.num_slots = num_slots
        shape = (config.num_layers, config.num_kv_heads, num_pages * page_size, config.head_dim)
        # Zeroed, not empty: padding in a batched attention reads slots that were never
        # written, and its zero weight must not meet a NaN there.
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.masked = torch.zeros(num_pages * page_size, dtype=torch.bool, device=device)
        self.any_masked = False
        self.embeddings = torch.zeros(num_slots, config.hidden_size, dtype=dtype, device=device)
        self.host: dict[int, HostPage] = {}  # swapped-out pages, by the caller's key

    def slot_range(self, page: int, offset: int, count: int) -> slice:
        start = page * self.page_size + offset
        return slice(start, start + count)

    def copy(
        self, src_page: int, dst_page: int, src_offset: int, dst_offset: int, count: int
    ) -> None:
        """Copy `count` rows of every layer, and their masked flags, between pages."""
        src = self.slot_range(src_page, src_offset, count)
        dst = self.slot_range(dst_page, dst_offset, count)
        # clone: the ranges may overlap when a page copies onto itself.
        self.k[:, :, dst] = self.k[:, :, src].clone()
        self.v[:, :, dst] = self.v[:, :, src].clone()
        self.masked[dst] = self.masked[src].clone()
        self.any_masked = self.any_masked or bool(self.masked[dst].any())

    def clear(self, pages: list[int], slots: list[int]) -> None:
        """Zero the K/V rows (and masked flags) of `pages` and the vectors of embedding `slots`.

        Pages and slots pass from one owner to the next: clearing them on the way stops a new
        owner from reading what the previous one left there.
        """
        if pages:
            ids = torch.tensor(pages, dtype=torch.long, device=self.masked.device)
            rows = (ids[:, None] * self.page_size + torch.arange(self.page_size, device=ids.device))
            rows = rows.reshape(-1)
            self.k.index_fill_(2, rows, 0)
            self.v.index_fill_(2, rows, 0)
            if self.any_masked:
                self.masked[rows] = False
                self.any_masked = bool(self.masked.any())
        if slots:
            ids = torch.tensor(slots, dtype=torch.long, device=self.embeddings.device)
            self.embeddings.index_fill_(0, ids, 0)

    def set_masked(self, page: int, offsets: list[int], masked: bool) -> None:
        slots = torch.tensor(offsets, dtype=torch.long, device=self.masked.device)
        self.masked[page * self.page_size + slots] = masked
        if masked:
            self.any_masked = self.any_masked or bool(offsets)
        else:
            self.any_masked = bool(self.masked.any())

    def clear_masked(self, slots: torch.Tensor) -> None:
        """Fresh K/V was written to `slots`: whatever masked them before no longer applies."""
        if self.any_masked:
            self.masked[slots] = False
            self.any_masked = bool(self.masked.any())

    def swap_out(self, pages: list[int], keys: list[int]) -> int:
        """Copy `pages` to host memory under `keys`; the bytes copied."""
        if len(pages) != len(keys):
            raise ValueError(f"{len(pages)} pages but {len(keys)} keys")
        taken = [key for key in keys if key in self.host]
        if taken or len(set(keys)) != len(keys):
            raise ValueError(f"host keys {taken or keys} are in use already")
        moved = 0
        for page, key in zip(pages, keys, strict=True):
            rows = self.slot_range(page, 0, self.page_size)
            copy = HostPage(_to_host(self.k[:, :, rows]), _to_host(self.v[:, :, rows]),
                            _to_host(self.masked[rows]))
            self.host[key] = copy
            moved += copy.nbytes
        return moved

    def swap_in(self, keys: list[int], pages: list[int]) -> int:
        """Copy the host copies `keys` into `pages` and drop them; the bytes copied."""
        if len(pages) != len(keys):
            raise ValueError(f"{len(keys)} keys but {len(pages)} pages")
        missing = [key for key in keys if key not in self.host]
        if missing:
            raise ValueError(f"no host copy under keys {missing}")
        moved = 0
        for key, page in zip(keys, pages, strict=True):
            copy = self.host.pop(key)
            rows = self.slot_range(page, 0, self.page_size)
            self.k[:, :, rows] = copy.k.to(self.k.device)
            self.v[:, :, rows] = copy.v.to(self.v.device)
            self.masked[rows] = copy.masked.to(self.masked.device)
            self.any_masked = self.any_masked or bool(copy.masked.any())
            moved += copy.nbytes
        return moved

    def drop_host(self, keys: list[int]) -> None:
        """Forget host copies; keys with none are ignored (already swapped in or dropped)."""
        for key in keys:
            self.host.pop(key, None)
