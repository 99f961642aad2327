"""What the machine can do, and the device, dtype and weight format the model runs in because
of it.

x86 machines of one kind differ: some CPUs compute bf16 natively (AVX-512 BF16, AMX), others
only have AVX2, where torch emulates bf16 matmuls and they lose to fp32 as soon as a batch has a
few rows. The choice is made from the features torch actually dispatches to, so forcing torch
down (`ATEN_CPU_CAPABILITY=avx2`) also changes the choice, and is said in one log line.

Weights: on the CPU a GGUF file's Q4_0/Q4_1 projections run as int4 (torch's weight-only
kernel reads a quarter of the bytes of bf16); elsewhere, and for other files, they are dense.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

log = logging.getLogger("pie_trio.model")

DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
}

# `--weights`: int4 keeps Q4_0/Q4_1 projections packed; bf16/fp32 are dense weights (and the
# compute dtype) of that type; auto picks.
WEIGHTS = ("auto", "int4", "bf16", "fp32")
_INT4_TYPES = frozenset({"Q4_0", "Q4_1"})  # GGUF types that map exactly onto the int4 kernel

# CPU flags (as /proc/cpuinfo spells them) that make bf16 matmuls native.
_NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@dataclass(frozen=True)
class CpuInfo:
    """The CPU as torch will use it: its flags and the kernel set torch dispatches to."""

    flags: frozenset[str]
    capability: str  # torch's dispatch level: "AVX512", "AVX2", "DEFAULT", ...

    @property
    def native_bf16(self) -> bool:
        """bf16 matmuls run on hardware instructions, not emulated in fp32.

        Needs both the flag and torch dispatching its AVX-512 kernels: under
        `ATEN_CPU_CAPABILITY=avx2` an AVX-512 machine behaves as an AVX2 one.
        """
        dispatched = self.capability.upper().startswith("AVX512")
        return dispatched and any(flag in self.flags for flag in _NATIVE_BF16_FLAGS)

    def describe(self) -> str:
        extras = sorted(f for f in self.flags if f.startswith(("avx512", "amx")))
        return f"torch dispatch {self.capability}, flags {' '.join(extras) or 'avx2 only'}"


@lru_cache(maxsize=1)
def cpu_info() -> CpuInfo:
    return CpuInfo(_cpu_flags(), torch.backends.cpu.get_cpu_capability())


def _cpu_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: decide from torch's dispatch level alone
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@dataclass(frozen=True)
class DtypeChoice:
    dtype: torch.dtype
    reason: str


def choose_dtype(dtype: str | torch.dtype | None, device: torch.device,
                 int4: bool = False) -> DtypeChoice:
    """The compute dtype: the caller's if given, else the one right and fastest on `device`
    (with `int4` projections, fp32 on every CPU).

    Either way logits are computed in fp32 (see `LlamaModel.logits`), so greedy decoding does
    not hinge on bf16 rounding of near-tied logits.
    """
    if isinstance(dtype, torch.dtype):
        return DtypeChoice(dtype, "asked for")
    if dtype is not None:
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(DTYPES)}")
        return DtypeChoice(DTYPES[dtype], "asked for")
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return DtypeChoice(torch.bfloat16, "CUDA device with bf16 support")
        return DtypeChoice(torch.float16, "CUDA device without bf16 support")
    if device.type != "cpu":
        return DtypeChoice(torch.float32, f"{device.type} device")
    cpu = cpu_info()
    if int4:
        # The native int4 kernels take and give fp32, and run every layer of a decode batch in
        # one call only in fp32: with bf16 around them batch-1 decode ran at 22 against 96
        # tokens/s on an AVX-512 BF16 CPU. Large batches still get bf16 (`int4_dense_dtype`).
        return DtypeChoice(torch.float32, f"int4 weights ({cpu.describe()})")
    if cpu.native_bf16:
        return DtypeChoice(torch.bfloat16, f"CPU computes bf16 natively ({cpu.describe()})")
    # Measured on an AVX2-only CPU (docs/model.md): emulated bf16 matmuls run 2.4x slower than
    # fp32 at 32 rows, and fp32 needs no care about rounding.
    return DtypeChoice(torch.float32, f"CPU without native bf16 ({cpu.describe()})")


def int4_dense_dtype(compute: torch.dtype) -> torch.dtype:
    """The dtype of an int4 projection's dense copy, which runs the batches too large for the
    int4 kernel (prefill chunks, big decode batches): bf16 where the CPU computes it natively
    (one step's projections at 32 rows took 29 ms against fp32's 49 on an AVX-512 BF16 CPU),
    else the compute dtype."""
    if compute == torch.float32 and cpu_info().native_bf16:
        return torch.bfloat16
    return compute


@dataclass(frozen=True)
class WeightsChoice:
    int4: bool  # keep Q4_0/Q4_1 projections packed for the int4 kernel; else dense
    reason: str


def dtype_for_weights(dtype: str | torch.dtype | None, weights: str) -> str | torch.dtype | None:
    """The dtype to ask `choose_dtype` for: `--weights bf16/fp32` names dense weights of that
    type, which are stored in the compute dtype, so it sets the dtype (and must agree with an
    explicit one)."""
    if weights not in WEIGHTS:
        raise ValueError(f"unknown weights {weights!r}; use one of {list(WEIGHTS)}")
    if weights in ("auto", "int4"):
        return dtype
    if dtype is None:
        return weights
    asked = dtype if isinstance(dtype, torch.dtype) else DTYPES.get(dtype)
    if asked != DTYPES[weights]:
        raise ValueError(f"weights {weights} are dense {weights}: they need dtype {weights}, "
                         f"not {dtype}")
    return dtype


def choose_weights(
    weights: str, dtype_asked: bool, device: torch.device, projection_types: set[str]
) -> WeightsChoice:
    """int4 or dense projections. `projection_types`: the GGUF types of the model's projection
    weights (empty for safetensors). `auto` picks int4 on the CPU for Q4_0/Q4_1 files, unless a
    dtype was asked for: `--dtype X` alone keeps meaning "the model in X" (dense)."""
    int4_ready = bool(projection_types & _INT4_TYPES)
    found = ", ".join(sorted(projection_types)) or "dense safetensors"
    if weights == "int4":
        if device.type != "cpu":
            raise ValueError(f"int4 weights run on the CPU only, not on {device.type}")
        if not int4_ready:
            raise ValueError(f"int4 weights need Q4_0/Q4_1 projections; this model has {found}")
        return WeightsChoice(True, "asked for")
    if weights != "auto":
        return WeightsChoice(False, "asked for")
    if device.type != "cpu":
        return WeightsChoice(False, f"{device.type} device")
    if dtype_asked:
        return WeightsChoice(False, "a dtype was asked for")
    if not int4_ready:
        return WeightsChoice(False, f"projections are {found}, not Q4_0/Q4_1")
    # Measured (docs/model.md): 2.8x fp32's matmul speed at 1 row, 1.4x at 8; larger batches
    # run on a dense copy.
    return WeightsChoice(True, f"CPU and {found} projections")


def log_choice(
    device: torch.device, choice: DtypeChoice, weights: WeightsChoice | None = None
) -> None:
    dtype = str(choice.dtype).removeprefix("torch.")
    if weights is None:
        log.info("model device=%s dtype=%s because=%r", device, dtype, choice.reason)
        return
    kind = "int4" if weights.int4 else dtype
    log.info("model device=%s dtype=%s because=%r weights=%s because=%r",
             device, dtype, choice.reason, kind, weights.reason)
