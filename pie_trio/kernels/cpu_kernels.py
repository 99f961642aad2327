"""The native CPU kernels of `kernels/cpu/`: C compiled once per machine, called through ctypes.

torch's int4 weight-only kernel takes bf16 activations and spends most of a batch-1 decode step
unpacking nibbles and converting bf16. `q4_matmul.c` runs GGUF 4-bit blocks with llama.cpp's
x86 scheme (integer dot products of 4-bit weights and int8 activations, AVX2 + FMA + F16C),
writing each activation as two int8 digits so that it keeps about 16 bits: fp32 in and out, no
bf16 casts around it. `norms.c` and `attention.c` replace the torch ops around the projections
where their dispatch costs more than their arithmetic; `decoder.c` runs them all, every layer of
a decode batch, in one call; `head.c` is the exact stage of the shortlist LM head. `pool.c`
holds the worker threads they share.

The library is built on first use with the system's C compiler and cached by the hash of its
source, flags and compiler (`~/.cache/pie-trio/kernels/`), so a machine pays about a second once.
Where it cannot be had (no compiler, a CPU without AVX2/FMA, not x86-64, or
`PIE_TRIO_CPU_KERNELS=0`) `library()` is None, the reason is logged once, and int4 projections
run through torch's kernel as before. ctypes releases the GIL for the call.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch

log = logging.getLogger(__name__)

ENV_SWITCH = "PIE_TRIO_CPU_KERNELS"  # "0" turns the native kernels off
SOURCES = sorted((Path(__file__).parent / "cpu").glob("*.c"))
HEADERS = sorted((Path(__file__).parent / "cpu").glob("*.h"))
FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fno-math-errno", "-pthread", "-shared", "-fPIC"]
GROUP = 32  # weights per GGUF block
RUN_BLOCKS = 8  # blocks q4_matmul.c interleaves (see `pack_q4`)

_pointer, _int64 = ctypes.c_void_p, ctypes.c_int64
# Every entry point: its result type and argument types.
_SIGNATURES = {
    "q4_matmul": (ctypes.c_int, [_pointer, _int64, _int64, _pointer, _pointer, _pointer,
                                    _int64, _pointer, _pointer, ctypes.c_int]),
    "add_rms_norm": (None, [_pointer, _pointer, _pointer, ctypes.c_float, _int64, _int64,
                            _pointer, _pointer]),
    "rotary_kv_write": (None, [_pointer, _int64, _int64, _int64, _int64, _pointer, _pointer,
                               _pointer, _pointer, _pointer, _pointer, _int64, _pointer]),
    "paged_attention": (ctypes.c_int, [_pointer, _int64, _int64, _int64, _int64, _int64,
                                       _pointer, _pointer, _int64, _pointer, _int64, _int64,
                                       _int64, _pointer, _int64, _pointer, ctypes.c_int,
                                       ctypes.c_float, _pointer, ctypes.c_int]),
    "silu_mul": (None, [_pointer, _int64, _int64, _pointer]),
    "shortlist_head": (None, [_pointer, _int64, _int64, _pointer, _int64, _int64,
                              ctypes.c_float, _pointer, _pointer, _pointer]),
    "decode_layers": (ctypes.c_int, [_pointer, _pointer, _pointer]),
    "panel_matmul": (ctypes.c_int, [_pointer, _int64, _int64, _pointer, ctypes.c_int, _int64,
                                    _pointer, _pointer, ctypes.c_int]),
    "q4_matmul_use_vnni": (ctypes.c_int, [ctypes.c_int]),
    "pool_rest": (None, []),
}
# Query blocks of up to this many rows per sequence run `paged_attention` here; longer ones
# (prefill chunks) torch's flash attention, which tiles them.
ATTENTION_MAX_QUERIES = 16


@dataclass
class NativeQ4:
    """A `[out, in]` weight for `q4_matmul.c`: `w = d*q + m` per block of 32 inputs, the
    block's 32 values in 16 bytes (GGUF's nibble order, each whole run of eight blocks
    interleaved: `_interleave`), d and m fp16 (GGUF's own precision)."""

    nibbles: torch.Tensor  # uint8 [out, in / 2]
    d: torch.Tensor  # fp16 [out, in / 32]
    m: torch.Tensor  # fp16 [out, in / 32]

    @property
    def out_features(self) -> int:
        return int(self.nibbles.shape[0])


def pack_q4(q: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> NativeQ4 | None:
    """`q` (uint8 0..15 `[out, in]`), `d`, `m` in the kernel's layout; None where the native
    kernels are unavailable, or a scale is beyond fp16 (GGUF's are fp16 already)."""
    if library() is None:
        return None
    out, inp = q.shape
    blocks = q.to(torch.uint8).view(out, inp // GROUP, 2, GROUP // 2)
    nibbles = (blocks[:, :, 0] | (blocks[:, :, 1] << 4)).reshape(out, inp // 2)
    d16, m16 = d.half().contiguous(), m.half().contiguous()
    if not (d16.isfinite().all() and m16.isfinite().all()):
        return None
    return NativeQ4(_interleave(nibbles), d16, m16)


def _interleave(nibbles: torch.Tensor) -> torch.Tensor:
    """GGUF's 16 bytes per block `[out, in / 2]` with each whole run of eight blocks
    interleaved as q4_matmul.c reads it: four stretches of 32 bytes, the n-th holding bytes
    4n..4n+3 of each block in turn (a transpose of the run's 8 x 4 four-byte words)."""
    out, width = nibbles.shape
    whole = width // (RUN_BLOCKS * GROUP // 2) * (RUN_BLOCKS * GROUP // 2)
    runs = nibbles[:, :whole].reshape(out, -1, RUN_BLOCKS, 4, 4).transpose(2, 3)
    return torch.cat([runs.reshape(out, whole), nibbles[:, whole:]], 1).contiguous()


def q4_matmul(x: torch.Tensor, weight: NativeQ4, bias: torch.Tensor | None) -> torch.Tensor:
    """`x @ w.T + bias` for `x` `[rows, in]`, computed in fp32 and returned in `x`'s dtype."""
    lib = library()
    assert lib is not None  # a NativeQ4 exists only where the library loaded

    def run(x32: torch.Tensor, bias32: int | None, y: torch.Tensor) -> int:
        rows, inp = x32.shape
        return int(lib.q4_matmul(
            x32.data_ptr(), rows, inp, weight.nibbles.data_ptr(), weight.d.data_ptr(),
            weight.m.data_ptr(), weight.out_features, bias32, y.data_ptr(),
            torch.get_num_threads(),
        ))

    return _fp32_matmul(x, weight.out_features, bias, run,
                        f"q4_matmul: no memory for {x.shape[0]} rows of int8 activations")


def _fp32_matmul(x: torch.Tensor, out_features: int, bias: torch.Tensor | None,
                 run: Callable[[torch.Tensor, int | None, torch.Tensor], int],
                 no_memory: str) -> torch.Tensor:
    """The matmul kernels' convention: `run(x, bias address, y)` on contiguous fp32 `x`, bias
    and a fresh `y` `[rows, out_features]`, a nonzero status meaning no memory; the result in
    `x`'s dtype."""
    x32 = x.float().contiguous()
    y = torch.empty(x32.shape[0], out_features, dtype=torch.float32)
    bias32 = None if bias is None else bias.float().contiguous()
    if run(x32, _address(bias32), y) != 0:
        raise MemoryError(no_memory)
    return y if x.dtype == torch.float32 else y.to(x.dtype)


PANEL_COLS = 16  # output columns per panel of panels.c


@dataclass
class Panels:
    """A `[out, in]` weight for `panels.c`: 4-bit (`w = d*q + m`) or 8-bit (`w = d*q`) values
    with fp32 scales per block of 32 inputs, in panels of 16 output columns (the layouts are
    described there)."""

    data: torch.Tensor  # uint8 [out / 16, in / 32, bytes per block]
    bits: int

    @property
    def out_features(self) -> int:
        return int(self.data.shape[0]) * PANEL_COLS


def pack_q4_panels(q: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> Panels | None:
    """`q` (uint8 0..15 `[out, in]`), `d`, `m` (fp32 `[out, in / 32]`) as 4-bit panels; None
    where the native kernels are unavailable or `out` is not a multiple of 16."""
    if not _panels_fit(q):
        return None
    values = _panel_order(q.to(torch.uint8))
    half = PANEL_COLS // 2
    nibbles = (values[..., :half] | (values[..., half:] << 4)).flatten(2)
    scales = torch.cat([_panel_scales(d), _panel_scales(m)], -1)
    return Panels(torch.cat([scales.contiguous().view(torch.uint8), nibbles], -1).contiguous(), 4)


def pack_q8_panels(q: torch.Tensor, d: torch.Tensor) -> Panels | None:
    """`q` (int8 `[out, in]`), `d` (fp32 `[out, in / 32]`) as 8-bit panels; None as above."""
    if not _panels_fit(q):
        return None
    values = _panel_order(q.to(torch.int8)).flatten(2).view(torch.uint8)
    scales = _panel_scales(d).contiguous().view(torch.uint8)
    return Panels(torch.cat([scales, values], -1).contiguous(), 8)


def _panels_fit(q: torch.Tensor) -> bool:
    out, inp = q.shape
    return library() is not None and out % PANEL_COLS == 0 and inp % GROUP == 0


def _panel_order(q: torch.Tensor) -> torch.Tensor:
    """`[out, in]` as `[panel, block, input, column]`: one row of 16 columns per input."""
    out, inp = q.shape
    return q.view(out // PANEL_COLS, PANEL_COLS, inp // GROUP, GROUP).permute(0, 2, 3, 1)


def _panel_scales(t: torch.Tensor) -> torch.Tensor:
    """Per-block `[out, in / 32]` values as fp32 `[panel, block, column]`."""
    out, blocks = t.shape
    return t.float().view(out // PANEL_COLS, PANEL_COLS, blocks).transpose(1, 2)


def panel_matmul(x: torch.Tensor, weight: Panels, bias: torch.Tensor | None) -> torch.Tensor:
    """`x @ w.T + bias` for `x` `[rows, in]`, computed in fp32 and returned in `x`'s dtype."""
    lib = library()
    assert lib is not None  # Panels exist only where the library loaded

    def run(x32: torch.Tensor, bias32: int | None, y: torch.Tensor) -> int:
        rows, inp = x32.shape
        return int(lib.panel_matmul(
            x32.data_ptr(), rows, inp, weight.data.data_ptr(), weight.bits,
            weight.out_features, bias32, y.data_ptr(), torch.get_num_threads(),
        ))

    return _fp32_matmul(x, weight.out_features, bias, run,
                        f"panel_matmul: no memory for a panel of {x.shape[1]} inputs")


def add_rms_norm(
    hidden: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(hidden + delta, rms_norm(hidden + delta) * weight)` of fp32 rows `[rows, dim]` (without
    `delta`: `(hidden, rms_norm(hidden) * weight)`)."""
    lib = library()
    assert lib is not None  # callers check `available()`
    hidden = hidden.contiguous()
    rows, dim = hidden.shape
    out = torch.empty_like(hidden)
    total = hidden if delta is None else torch.empty_like(hidden)
    lib.add_rms_norm(hidden.data_ptr(), None if delta is None else delta.contiguous().data_ptr(),
                     weight.data_ptr(), eps, rows, dim, total.data_ptr(), out.data_ptr())
    return total, out


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """`torch_ops.silu_mul` of fp32 rows `[rows, 2 * ffn]`."""
    lib = library()
    assert lib is not None  # callers check `available()`
    gate_up = gate_up.contiguous()
    rows, ffn = gate_up.shape[0], gate_up.shape[1] // 2
    out = gate_up.new_empty(rows, ffn)
    lib.silu_mul(gate_up.data_ptr(), rows, ffn, out.data_ptr())
    return out


def shortlist_head(x: torch.Tensor, weight: torch.Tensor, logits: torch.Tensor,
                   candidates: int, margin: float) -> torch.Tensor:
    """The exact stage of `torch_ops.ShortlistHead` (see head.c): `logits` (fp32, contiguous,
    the int4 copy's) gets exact fp32 values at each row's `candidates` best, in place. Returns
    the rows whose top is too flat to trust (their best exact logit is not `margin` above the
    best logit left out)."""
    lib = library()
    assert lib is not None and logits.is_contiguous() and logits.dtype == torch.float32
    x = x.float().contiguous()
    rows, hidden = x.shape
    best = torch.empty(rows, candidates + 1, dtype=torch.long)
    unsure = torch.empty(rows, dtype=torch.uint8)
    lib.shortlist_head(x.data_ptr(), rows, hidden, weight.data_ptr(), weight.shape[0],
                       candidates, margin, logits.data_ptr(), best.data_ptr(), unsure.data_ptr())
    return unsure.nonzero().squeeze(1)


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
) -> torch.Tensor:
    """`dispatch.reference_rotary_kv_write` for fp32: rotate, store K/V at `slots` (negative:
    not stored), return the queries `[rows, heads, d]`."""
    lib = library()
    assert lib is not None and k_cache.is_contiguous() and v_cache.is_contiguous()
    qkv = qkv.contiguous()
    rows, head_dim = qkv.shape[0], cos.shape[-1]
    q = torch.empty(rows, heads, head_dim, dtype=torch.float32)
    lib.rotary_kv_write(
        qkv.data_ptr(), rows, heads, kv_heads, head_dim, cos.data_ptr(), sin.data_ptr(),
        _longs(positions).data_ptr(), _longs(slots).data_ptr(), k_cache.data_ptr(),
        v_cache.data_ptr(), k_cache.shape[1], q.data_ptr(),
    )
    return q


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
    """`dispatch.Kernels.paged_attention` for fp32 (see `paged_attention` in attention.c)."""
    lib = library()
    assert lib is not None and k_cache.is_contiguous() and v_cache.is_contiguous()
    q = q.contiguous()
    _, heads, head_dim = q.shape
    out = torch.empty_like(q)
    if table is not None:
        table = _longs(table)
    if lengths is not None:
        lengths = lengths.to(torch.int32).contiguous()
    if mask is not None:
        mask = mask.contiguous().view(torch.uint8)
    status = lib.paged_attention(
        q.data_ptr(), batch, queries, heads, k_cache.shape[0], head_dim, k_cache.data_ptr(),
        v_cache.data_ptr(), k_cache.shape[1], _address(table),
        0 if table is None else table.shape[-1], page_size, span_start, _address(lengths),
        length, _address(mask), int(causal), scale, out.data_ptr(), torch.get_num_threads(),
    )
    if status != 0:
        raise MemoryError(f"paged_attention: no memory for scores over {length} keys")
    return out


# -- every layer in one call (decoder.c) --------------------------------------------------------


class _Projection(ctypes.Structure):
    _fields_ = [("nibbles", _pointer), ("d", _pointer), ("m", _pointer), ("bias", _pointer),
                ("out", _int64), ("panels", _pointer)]


class _Layer(ctypes.Structure):
    _fields_ = [("input_norm", _pointer), ("post_norm", _pointer), ("qkv", _Projection),
                ("attn_out", _Projection), ("gate_up", _Projection), ("down", _Projection)]


class _Decoder(ctypes.Structure):
    _fields_ = [("layers", _pointer), ("num_layers", _int64), ("hidden", _int64),
                ("heads", _int64), ("kv_heads", _int64), ("head_dim", _int64), ("ffn", _int64),
                ("eps", ctypes.c_float), ("scale", ctypes.c_float), ("rope_cos", _pointer),
                ("rope_sin", _pointer), ("kernel_max_rows", _int64)]


class _Group(ctypes.Structure):
    _fields_ = [("first_row", _int64), ("batch", _int64), ("queries", _int64),
                ("rows", _pointer), ("valid", _pointer), ("table", _pointer),
                ("span_start", _int64), ("length", _int64), ("mask", _pointer),
                ("causal", _int64)]


class _Step(ctypes.Structure):
    _fields_ = [("rows", _int64), ("positions", _pointer), ("write_slots", _pointer),
                ("groups", _pointer), ("num_groups", _int64), ("k_cache", _pointer),
                ("v_cache", _pointer), ("cache_slots", _int64), ("threads", ctypes.c_int)]


@dataclass
class DecoderProjection:
    """A projection for `decode_layers`: native int4, with an fp32 bias (or none), and its
    panels for batches of more rows than `q4_matmul` takes (or none)."""

    weight: NativeQ4
    bias: torch.Tensor | None
    panels: Panels | None  # 4-bit


@dataclass
class DecoderLayer:
    """One layer's weights for `decode_layers`: fp32 norms and four projections."""

    input_norm: torch.Tensor
    post_norm: torch.Tensor
    qkv: DecoderProjection
    attn_out: DecoderProjection
    gate_up: DecoderProjection
    down: DecoderProjection


@dataclass
class AttentionSpan:
    """One attention group: its `batch * queries` query rows (consecutive from `first_row`, or
    listed in `rows` with the real ones flagged in `valid`), and `paged_attention`'s context
    (a slot table `[batch, length]` or a span from `span_start`), mask and causal flag."""

    first_row: int
    rows: torch.Tensor | None
    valid: torch.Tensor | None
    batch: int
    queries: int
    table: torch.Tensor | None
    span_start: int
    length: int
    mask: torch.Tensor | None
    causal: bool


class NativeDecoder:
    """A model's layers in `decoder.c`'s form, built once at load: the tensors stay referenced
    here for as long as C holds their addresses.

    It takes batches of up to `kernel_max_rows` rows (`q4_matmul`'s), and of any size where
    every projection has its panels: those run larger batches, as `torch_ops.linear` does."""

    def __init__(self, layers: list[DecoderLayer], heads: int, kv_heads: int, head_dim: int,
                 eps: float, scale: float, rope_cos: torch.Tensor, rope_sin: torch.Tensor,
                 kernel_max_rows: int) -> None:
        self._keep = (layers, rope_cos, rope_sin)
        self._layers = (_Layer * len(layers))(*(_layer_struct(layer) for layer in layers))
        hidden = layers[0].input_norm.numel()
        ffn = layers[0].down.weight.nibbles.shape[1] * 2
        self._decoder = _Decoder(ctypes.addressof(self._layers), len(layers), hidden, heads,
                                 kv_heads, head_dim, ffn, eps, scale, rope_cos.data_ptr(),
                                 rope_sin.data_ptr(), kernel_max_rows)
        projections = [p for layer in layers
                       for p in (layer.qkv, layer.attn_out, layer.gate_up, layer.down)]
        paneled = all(p.panels is not None for p in projections)
        self.max_rows = sys.maxsize if paneled else kernel_max_rows

    def forward(self, hidden: torch.Tensor, positions: torch.Tensor, write_slots: torch.Tensor,
                groups: list[AttentionSpan], k_cache: torch.Tensor, v_cache: torch.Tensor
                ) -> torch.Tensor:
        """Run every layer over the fp32 input rows `hidden` `[rows, hidden]` in place (the
        final residual stream on return), writing K/V into the layer-major caches
        `[layers, kv_heads, slots, head_dim]`."""
        lib = library()
        assert lib is not None and hidden.is_contiguous() and hidden.dtype == torch.float32
        assert k_cache.is_contiguous() and v_cache.is_contiguous()
        # the converted tensors live until the call returns
        keep: list[torch.Tensor | None] = [positions := _longs(positions),
                                           write_slots := _longs(write_slots)]
        spans = (_Group * len(groups))()
        for span, group in zip(spans, groups, strict=True):
            table = None if group.table is None else _longs(group.table)
            mask = None if group.mask is None else _bytes(group.mask)
            rows = None if group.rows is None else _longs(group.rows)
            valid = None if group.valid is None else _bytes(group.valid)
            keep += [table, mask, rows, valid]
            span.first_row, span.batch, span.queries = group.first_row, group.batch, group.queries
            span.rows, span.valid = _address(rows), _address(valid)
            span.table, span.span_start = _address(table), group.span_start
            span.length, span.mask, span.causal = group.length, _address(mask), group.causal
        step = _Step(hidden.shape[0], positions.data_ptr(), write_slots.data_ptr(),
                     ctypes.addressof(spans), len(groups), k_cache.data_ptr(),
                     v_cache.data_ptr(), k_cache.shape[2], torch.get_num_threads())
        status = lib.decode_layers(ctypes.byref(self._decoder), ctypes.byref(step),
                                   hidden.data_ptr())
        if status != 0:
            raise MemoryError(f"decode_layers: no memory for {hidden.shape[0]} rows")
        return hidden


def _layer_struct(layer: DecoderLayer) -> _Layer:
    def projection(part: DecoderProjection) -> _Projection:
        weight, panels = part.weight, part.panels
        return _Projection(weight.nibbles.data_ptr(), weight.d.data_ptr(), weight.m.data_ptr(),
                           _address(part.bias), weight.out_features,
                           None if panels is None else panels.data.data_ptr())

    return _Layer(layer.input_norm.data_ptr(), layer.post_norm.data_ptr(),
                  projection(layer.qkv), projection(layer.attn_out), projection(layer.gate_up),
                  projection(layer.down))


def _longs(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.long).contiguous()


def _bytes(flags: torch.Tensor) -> torch.Tensor:
    return flags.contiguous().view(torch.uint8)


def _address(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def rest_workers() -> None:
    """Let the kernels' idle workers sleep now rather than spin for a next job that is not
    coming soon (pool.h, `pool_rest`); nothing where the kernels are off."""
    lib = library()
    if lib is not None:
        lib.pool_rest()


def available() -> bool:
    """Whether the native kernels run here (see `library`)."""
    return library() is not None


@cache
def library() -> ctypes.CDLL | None:
    """The compiled kernels, or None (the reason logged once)."""
    reason = _unavailable()
    if reason is not None:
        log.info("native CPU kernels off (%s); int4 projections use torch's kernel", reason)
        return None
    try:
        lib = ctypes.CDLL(str(_build()))
    except (OSError, subprocess.SubprocessError) as error:
        log.warning("native CPU kernels off, int4 projections use torch's kernel: could not "
                    "build them: %s", error)
        return None
    for name, (restype, argtypes) in _SIGNATURES.items():
        getattr(lib, name).restype = restype
        getattr(lib, name).argtypes = argtypes
    vnni = use_vnni(_wants_vnni(), lib)
    log.info("native CPU kernels on (AVX2 + FMA%s): %s",
             ", int4 with AVX-512 VNNI" if vnni else "", ", ".join(s.name for s in SOURCES))
    return lib


_vnni_on = False  # whether q4_matmul runs its AVX-512 VNNI path


def use_vnni(want: bool, lib: ctypes.CDLL | None = None) -> bool:
    """Run int4 projections through the AVX-512 VNNI path (`want`, where the CPU has it) or the
    AVX2 one; returns whether VNNI is in use. Both give the same results bit for bit."""
    global _vnni_on
    lib = lib or library()
    _vnni_on = lib is not None and bool(lib.q4_matmul_use_vnni(int(want)))
    return _vnni_on


def vnni() -> bool:
    """Whether int4 projections run through the AVX-512 VNNI path."""
    return library() is not None and _vnni_on


def _wants_vnni() -> bool:
    """VNNI unless torch was held to AVX2 (`ATEN_CPU_CAPABILITY=avx2`): the test suite's AVX2
    rerun then checks the AVX2 path on an AVX-512 machine, and the C side checks the CPU."""
    return torch.backends.cpu.get_cpu_capability() == "AVX512"


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CC", "cc"))


def _unavailable() -> str | None:
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return f"{ENV_SWITCH}=0"
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"not x86-64 ({platform.machine()})"
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return "the CPU lacks AVX2/FMA"
    if _compiler() is None:
        return "no C compiler (install gcc, or set CC)"
    return None


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "pie-trio" / "kernels"


def _build() -> Path:
    """The library for this source, flags and compiler: cached, or compiled now (atomically,
    so processes starting together each get a whole file)."""
    compiler = _compiler()
    assert compiler is not None
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True,
                             timeout=30, check=True).stdout
    texts = [source.read_text() for source in [*SOURCES, *HEADERS]]
    key = hashlib.sha256("\0".join([*texts, *FLAGS, version]).encode()).hexdigest()
    target = _cache_dir() / f"pie-trio-cpu-{key[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        built = Path(scratch) / target.name
        sources = [str(source) for source in SOURCES]
        result = subprocess.run([compiler, *FLAGS, *sources, "-o", str(built)],
                                capture_output=True, text=True, timeout=300)
        if result.returncode != 0:
            raise subprocess.SubprocessError(result.stderr.strip()[-2000:])
        os.replace(built, target)
    return target
