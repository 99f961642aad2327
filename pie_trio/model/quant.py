"""GGUF 4-bit blocks kept as they are: Q4_0 and Q4_1 weights, unpacked but never dequantised.

A Q4_0/Q4_1 block is 32 consecutive weights of one row (along the input dimension) that share
a scale `d` and, for Q4_1, a minimum `m`: `w = d*q + m` with `q` in 0..15 (Q4_0: `w = d*(q - 8)`).
That is exactly the grouping of torch's int4 weight-only CPU kernel (groups of 32 along the
input dimension, one scale and zero per group and output row), so these blocks feed it with no
re-rounding of the 4-bit values (see `torch_ops.pack_int4`).

Everything that reshapes a projection matrix by rows (Llama's Q/K row un-permutation, fusing
q/k/v or gate/up by concatenation along the output dimension) applies to a `Q4Weight` too:
blocks run along the input dimension, so whole rows move with their scales.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeAlias

import numpy as np
import torch

from pie_trio.kernels import cpu_kernels
from pie_trio.kernels import torch_ops as ops

GROUP = 32  # values per GGUF block, and the int4 kernel's group size
# Block layouts (gguf.quants): fp16 d, [fp16 m,] then 16 bytes holding 32 nibbles.
_BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20}
INT4_TYPES = frozenset(_BLOCK_BYTES)


@dataclass
class Q4Weight:
    """A `[out, in]` weight as 4-bit values with per-block scale and offset: `w = q*scale + offset`
    for every block of 32 inputs (the GGUF form, so `dequantize` matches gguf's exactly)."""

    q: torch.Tensor  # uint8 [out, in], values 0..15
    scale: torch.Tensor  # fp32 [out, in / 32]: the block's d
    offset: torch.Tensor  # fp32 [out, in / 32]: m for Q4_1, -8d for Q4_0

    @property
    def shape(self) -> tuple[int, int]:
        out, inp = self.q.shape
        return out, inp

    def dequantize(self) -> torch.Tensor:
        """The fp32 `[out, in]` weights, bit-identical to `gguf.quants.dequantize`."""
        out, inp = self.q.shape
        blocks = self.q.view(out, inp // GROUP, GROUP).float()
        w = blocks * self.scale.unsqueeze(-1) + self.offset.unsqueeze(-1)
        return w.view(out, inp)

    def map_rows(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Q4Weight:
        """The same weight with `fn` (a row permutation) applied to the rows of every part."""
        return Q4Weight(fn(self.q), fn(self.scale), fn(self.offset))

    @staticmethod
    def quantize(weight: torch.Tensor) -> Q4Weight:
        """Dense `[out, in]` weights rounded to Q4_1-style blocks: each block's 32 values spread
        over 16 even steps from its minimum to its maximum (round to nearest)."""
        out, inp = weight.shape
        blocks = weight.float().view(out, inp // GROUP, GROUP)
        low, high = blocks.amin(dim=-1), blocks.amax(dim=-1)
        scale = (high - low) / 15
        steps = (blocks - low.unsqueeze(-1)) / scale.clamp(min=1e-30).unsqueeze(-1)
        q = steps.round_().clamp_(0, 15).to(torch.uint8).view(out, inp)
        return Q4Weight(q, scale, low)

    @staticmethod
    def cat(parts: list[Q4Weight]) -> Q4Weight:
        """Concatenation along the output dimension (a fused projection)."""
        return Q4Weight(
            torch.cat([p.q for p in parts]),
            torch.cat([p.scale for p in parts]),
            torch.cat([p.offset for p in parts]),
        )


# A model tensor as loaded: dense, or (projections with int4 weights) 4-bit blocks.
Weight: TypeAlias = torch.Tensor | Q4Weight


def pack_q4(
    weight: Q4Weight,
    bias: torch.Tensor | None = None,
    dense: ops.Linear | None = None,
    native: bool = True,
    panels: cpu_kernels.Panels | None = None,
) -> ops.QuantLinear:
    """`weight` for the native int4 kernel where it is available (and `native`), keeping the
    GGUF's fp32 scales; else for torch's int4 kernel, whose dequantisation is
    `(q - 8) * scale + zero`, so `q*d + m` maps to `scale = d`, `zero = m + 8d` (exact in fp32;
    the kernel's bf16 scales then round both to 8 significant bits, ~3e-3 relative). Large
    batches run `panels` (`pack_panels`) or the `dense` copy."""
    packed = cpu_kernels.pack_q4(weight.q, weight.scale, weight.offset) if native else None
    if packed is not None:
        return ops.pack_native_q4(packed, bias, dense, panels)
    zero = weight.offset + 8.0 * weight.scale
    return ops.pack_int4(weight.q, weight.scale, zero, bias, dense, panels)


def pack_panels(weight: Q4Weight) -> cpu_kernels.Panels | None:
    """`weight` in `panels.c`'s column panels, the fp32 scales kept (so its dequantised
    values are `dequantize`'s); None where that kernel cannot run it."""
    return cpu_kernels.pack_q4_panels(weight.q, weight.scale, weight.offset)


def pack_q8_panels_exactly(weight: torch.Tensor) -> cpu_kernels.Panels | None:
    """fp32 `weight` `[out, in]` as 8-bit panels holding the very same values, where it is a
    dequantised Q8_0 tensor (each block of 32 `d*q` with `q` in -127..127, the largest |q|
    127, as gguf and llama.cpp quantise); None where any block is not, or the kernel cannot
    run it. The default model's LM head (its Q8_0 embedding) is: 32 MB to read for a large
    batch instead of 113 MB."""
    out, inp = weight.shape
    if inp % GROUP or weight.dtype != torch.float32:
        return None
    blocks = weight.view(out, inp // GROUP, GROUP)
    d = blocks.abs().amax(dim=-1) / 127
    q = torch.where(d.unsqueeze(-1) > 0, blocks / d.unsqueeze(-1), 0.0)
    rounded = q.round()
    if not (torch.equal(rounded, q) and torch.equal(rounded * d.unsqueeze(-1), blocks)):
        return None
    return cpu_kernels.pack_q8_panels(rounded.to(torch.int8).view(out, inp), d)


def from_gguf_blocks(raw: np.ndarray, type_name: str) -> Q4Weight:
    """Unpack a GGUF tensor's raw Q4_0/Q4_1 bytes (`[out, blocks * block_bytes]` uint8)."""
    block_bytes = _BLOCK_BYTES[type_name]
    out = raw.shape[0]
    blocks = np.ascontiguousarray(raw).reshape(out, -1, block_bytes)
    d = _fp16_field(blocks, 0)
    if type_name == "Q4_1":
        offset, nibbles = _fp16_field(blocks, 2), blocks[..., 4:]
    else:  # Q4_0: w = d*(q - 8) = d*q - 8d, exact in fp32 (d is fp16, q has 4 bits)
        offset, nibbles = -8.0 * d, blocks[..., 2:]
    # Low nibbles hold a block's first 16 values, high nibbles its last 16.
    q = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=-1).reshape(out, -1)
    return Q4Weight(torch.from_numpy(q), torch.from_numpy(d), torch.from_numpy(offset))


def _fp16_field(blocks: np.ndarray, at: int) -> np.ndarray:
    """The fp16 number at byte `at` of every block, as fp32 `[out, blocks]`."""
    field = np.ascontiguousarray(blocks[..., at : at + 2])
    return field.view(np.float16)[..., 0].astype(np.float32)
