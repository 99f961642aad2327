"""What the machine can do, and the device and dtype the model runs in because of it.

x86 machines of one kind differ: some CPUs compute bf16 natively (AVX-512 BF16, AMX), others
only have AVX2, where torch emulates bf16 matmuls and they lose to fp32 as soon as a batch has a
few rows. The choice is made from the features torch actually dispatches to, so forcing torch
down (`ATEN_CPU_CAPABILITY=avx2`) also changes the choice, and is said in one log line.
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


def choose_dtype(dtype: str | torch.dtype | None, device: torch.device) -> DtypeChoice:
    """The compute dtype: the caller's if given, else the one right and fastest on `device`.

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
    if cpu.native_bf16:
        return DtypeChoice(torch.bfloat16, f"CPU computes bf16 natively ({cpu.describe()})")
    # Measured on an AVX2-only CPU (docs/model.md): emulated bf16 matmuls run 2.4x slower than
    # fp32 at 32 rows, and fp32 needs no care about rounding.
    return DtypeChoice(torch.float32, f"CPU without native bf16 ({cpu.describe()})")


def log_choice(device: torch.device, choice: DtypeChoice) -> None:
    dtype = str(choice.dtype).removeprefix("torch.")
    log.info("model device=%s dtype=%s because=%r", device, dtype, choice.reason)
