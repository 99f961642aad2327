"""The paged KV cache: a fixed pool of pages, a masked flag per slot, and embedding slots.

Every page holds `page_size` token slots; slot `s` of the pool is row `s` of each layer's K and V
(`page * page_size + offset`). Which pages belong to whom is the executor's business: this pool
is plain storage, addressed by physical ids.
"""

from __future__ import annotations

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
