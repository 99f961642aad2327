"""The raw CUDA kernels of `kernels/cuda/`: compiling them through CuPy and calling them on torch
tensors.

Each wrapper takes and returns torch tensors and hands the kernel their device pointers as they
are (no copy, no DLPack round trip), launching on torch's current stream so the kernels order
with torch's own work and are recorded by CUDA graph capture. Modules are compiled by NVRTC on
first use (CuPy caches the binaries on disk), so importing this module never needs a GPU; only
`available()` and the wrappers touch CuPy.

Which wrapper runs where is decided in `pie_trio.kernels.dispatch`; each one's torch reference
lives there too, beside it.
"""

from __future__ import annotations

import importlib
import shutil
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch

KERNEL_DIR = Path(__file__).parent / "cuda"
# Every kernel source and the entry points it defines (one per dtype where it has a suffix).
SOURCES = {
    "paged_attention.cu": ("paged_attention_f32", "paged_attention_f16", "paged_attention_bf16"),
    "add_rms_norm.cu": ("add_rms_norm_f32", "add_rms_norm_f16", "add_rms_norm_bf16"),
    "rotary_kv_write.cu": ("rotary_kv_write_f32", "rotary_kv_write_f16", "rotary_kv_write_bf16"),
    "sampling.cu": ("sample_rows",),
}
DTYPE_SUFFIX = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}
PTX_ARCH = "sm_90"

# paged_attention.cu's compile-time shape: threads per block, keys per tile, accumulators per
# thread (a block's query rows * head_dim may not exceed THREADS * ACC_PER_THREAD).
ATTENTION_THREADS = 256
ATTENTION_KEY_TILE = 32
ATTENTION_MAX_CELLS = ATTENTION_THREADS * 32
SAMPLING_THREADS = 1024
DEFAULT_SHARED_BYTES = 48 * 1024


class KernelError(RuntimeError):
    """A kernel could not be compiled or launched."""


def nvcc_ptx_command(source: Path, output: Path, nvcc: str = "nvcc") -> list[str]:
    """The command that compiles one kernel source to PTX for `PTX_ARCH` (the CI check)."""
    return [nvcc, "-ptx", f"-arch={PTX_ARCH}", "-std=c++17", f"-I{KERNEL_DIR}",
            str(source), "-o", str(output)]


def find_nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found is None and Path("/usr/local/cuda/bin/nvcc").exists():
        found = "/usr/local/cuda/bin/nvcc"
    return found


@cache
def _cupy() -> ModuleType | None:
    try:
        return importlib.import_module("cupy")
    except Exception:  # not installed, or installed for another CUDA: no kernels then
        return None


def unavailable_reason() -> str | None:
    """Why the raw kernels cannot run here, or None when they can."""
    if not torch.cuda.is_available():
        return "torch sees no CUDA device"
    cupy = _cupy()
    if cupy is None:
        return "CuPy is not installed (pip install cupy-cuda13x, or the build for this CUDA)"
    try:
        cupy.cuda.runtime.getDeviceCount()
    except Exception as error:  # a CuPy built for another driver fails only here
        return f"CuPy cannot reach the device: {error}"
    return None


@cache
def _module(source: str) -> Any:
    cupy = _cupy()
    if cupy is None:
        raise KernelError("CuPy is not installed")
    code = (KERNEL_DIR / source).read_text()
    try:
        return cupy.RawModule(code=code, options=("-std=c++17", f"-I{KERNEL_DIR}"))
    except Exception as error:
        raise KernelError(f"cannot compile {source}: {error}") from error


@cache
def _kernel(source: str, name: str) -> Any:
    return _module(source).get_function(name)


def _launch(
    source: str,
    name: str,
    grid: tuple[int, ...],
    block: int,
    args: tuple[Any, ...],
    shared: int = 0,
) -> None:
    cupy = _cupy()
    assert cupy is not None
    kernel = _kernel(source, name)
    if shared > DEFAULT_SHARED_BYTES and kernel.max_dynamic_shared_size_bytes < shared:
        kernel.max_dynamic_shared_size_bytes = shared
    with cupy.cuda.ExternalStream(torch.cuda.current_stream().cuda_stream):
        kernel(grid, (block,), args, shared_mem=shared)


def _ptr(tensor: torch.Tensor | None) -> np.uint64:
    """A tensor's device address as a kernel pointer argument (0 for an absent one)."""
    return np.uint64(0 if tensor is None else tensor.data_ptr())


def _suffixed(name: str, dtype: torch.dtype) -> str:
    if dtype not in DTYPE_SUFFIX:
        raise KernelError(f"no {name} kernel for {dtype}")
    return f"{name}_{DTYPE_SUFFIX[dtype]}"


# -- attention ---------------------------------------------------------------------------------


def attention_fits(heads: int, kv_heads: int, head_dim: int) -> bool:
    """Whether one block can hold a whole GQA group of one query (the kernel's only limit)."""
    return heads % kv_heads == 0 and (heads // kv_heads) * head_dim <= ATTENTION_MAX_CELLS


def attention_query_tile(
    queries: int, batch: int, heads: int, kv_heads: int, head_dim: int, sms: int
) -> int:
    """Queries per block: as many as fit, fewer while that would leave SMs idle."""
    group = heads // kv_heads
    tile = max(1, min(queries, ATTENTION_MAX_CELLS // (group * head_dim)))
    while tile > 8 and -(-queries // tile) * kv_heads * batch < 2 * sms:
        tile = -(-tile // 2)
    return tile


def attention_shared_bytes(rows: int, head_dim: int) -> int:
    tile = ATTENTION_KEY_TILE
    floats = rows * head_dim + tile * (head_dim + 1) + tile * head_dim + rows * tile + 3 * rows
    return 4 * floats


@cache
def _sm_count(device: int) -> int:
    return int(torch.cuda.get_device_properties(device).multi_processor_count)


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    table: torch.Tensor | None,
    page_size: int,
    span_start: int,
    lengths: torch.Tensor | None,
    length: int,
    mask: torch.Tensor | None,
    batch: int,
    queries: int,
    causal: bool,
    scale: float,
) -> torch.Tensor:
    """`paged_attention.cu` (its header has the layouts); returns `[batch * queries, heads, d]`."""
    rows, heads, head_dim = q.shape
    kv_heads, cache_slots, _ = k_cache.shape
    out = torch.empty(rows, heads, head_dim, dtype=q.dtype, device=q.device)
    if rows == 0:
        return out
    if q.stride(2) != 1 or q.stride(1) != head_dim:
        q = q.contiguous()
    if table is not None and table.stride(1) != 1:
        table = table.contiguous()
    if mask is not None:
        mask = mask.reshape(batch * queries, -1)
        if mask.stride(1) != 1 or mask.stride(0) != mask.shape[1]:
            mask = mask.contiguous()
    tile = attention_query_tile(
        queries, batch, heads, kv_heads, head_dim, _sm_count(q.device.index or 0)
    )
    shared = attention_shared_bytes((heads // kv_heads) * tile, head_dim)
    args = (
        _ptr(q), np.int64(q.stride(0)), _ptr(k_cache), _ptr(v_cache), np.int64(cache_slots),
        _ptr(table), np.int64(0 if table is None else table.stride(0)), np.int32(page_size),
        np.int64(span_start), _ptr(lengths), np.int32(length),
        _ptr(mask), np.int64(0 if mask is None else mask.shape[1]),
        _ptr(out), np.int32(queries), np.int32(heads), np.int32(kv_heads), np.int32(head_dim),
        np.int32(tile), np.int32(causal), np.float32(scale),
    )  # fmt: skip
    grid = (-(-queries // tile), kv_heads, batch)
    name = _suffixed("paged_attention", q.dtype)
    _launch("paged_attention.cu", name, grid, ATTENTION_THREADS, args, shared)
    return out


# -- norm and rotary ---------------------------------------------------------------------------


def add_rms_norm(
    hidden: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """`add_rms_norm.cu`: `(hidden + delta, rms_norm(hidden + delta) * weight)`."""
    hidden, delta = hidden.contiguous(), delta.contiguous()
    total = torch.empty_like(hidden)
    normed = torch.empty_like(hidden)
    rows, width = hidden.shape
    if rows:
        args = (_ptr(hidden), _ptr(delta), _ptr(total), _ptr(normed),
                _ptr(weight.contiguous()), np.int32(width), np.float32(eps))  # fmt: skip
        block = min(1024, max(32, 32 * -(-width // (32 * 4))))
        _launch("add_rms_norm.cu", _suffixed("add_rms_norm", hidden.dtype), (rows,), block, args)
    return total, normed


def rotary_kv_write(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    positions: torch.Tensor,
    slots: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    heads: int,
    kv_heads: int,
    head_dim: int,
) -> torch.Tensor:
    """`rotary_kv_write.cu`: the rotated queries `[rows, heads, head_dim]`; K/V go to the cache."""
    rows = qkv.shape[0]
    q = torch.empty(rows, heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    if rows == 0:
        return q
    if qkv.stride(1) != 1:
        qkv = qkv.contiguous()
    args = (
        _ptr(qkv), np.int64(qkv.stride(0)), _ptr(cos), _ptr(sin), _ptr(positions), _ptr(slots),
        _ptr(q), _ptr(k_cache), _ptr(v_cache), np.int64(k_cache.shape[1]),
        np.int32(heads), np.int32(kv_heads), np.int32(head_dim),
    )  # fmt: skip
    block = min(1024, 32 * -(-(heads + 2 * kv_heads) * head_dim // 32))
    name = _suffixed("rotary_kv_write", qkv.dtype)
    _launch("rotary_kv_write.cu", name, (rows,), block, args)
    return q


# -- sampling ----------------------------------------------------------------------------------


def sample_rows(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    min_p: torch.Tensor,
    seeds: torch.Tensor,
    masks: torch.Tensor | None,
    mask_index: torch.Tensor | None,
    bias_offsets: torch.Tensor | None,
    bias_ids: torch.Tensor | None,
    bias_values: torch.Tensor | None,
) -> torch.Tensor:
    """`sampling.cu`: one token per row of fp32 `logits` `[rows, vocab]`, shaped in place."""
    rows, vocab = logits.shape
    tokens = torch.empty(rows, dtype=torch.long, device=logits.device)
    if rows == 0:
        return tokens
    if logits.dtype != torch.float32 or not logits.is_contiguous():
        raise KernelError("sample_rows shapes contiguous fp32 logits in place")
    args = (
        _ptr(logits), np.int32(vocab), _ptr(temperature), _ptr(top_k), _ptr(top_p),
        _ptr(min_p), _ptr(seeds), _ptr(masks), np.int32(0 if masks is None else masks.shape[1]),
        _ptr(mask_index), _ptr(bias_offsets), _ptr(bias_ids), _ptr(bias_values), _ptr(tokens),
    )  # fmt: skip
    _launch("sampling.cu", "sample_rows", (rows,), SAMPLING_THREADS, args)
    return tokens
