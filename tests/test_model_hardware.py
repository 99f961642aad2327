"""The default device and dtype follow what the CPU computes natively, and forcing torch down to
its AVX2 kernels (as on a CPU without AVX-512) changes the choice accordingly. Int4 weights
compute in fp32 on every CPU, their dense copy in bf16 where the CPU has it natively."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from pie_trio.model.hardware import CpuInfo, choose_dtype, int4_dense_dtype

CPU = torch.device("cpu")


@pytest.mark.parametrize(("flags", "capability", "expected"), [
    ({"avx2", "avx512f", "avx512_bf16"}, "AVX512", torch.bfloat16),
    ({"avx2", "amx_bf16", "avx512f"}, "AVX512", torch.bfloat16),
    ({"avx2", "avx512f", "avx512bw"}, "AVX512", torch.float32),  # AVX-512 without BF16
    ({"avx2"}, "AVX2", torch.float32),
    ({"avx2", "avx512f", "avx512_bf16"}, "AVX2", torch.float32),  # ATEN_CPU_CAPABILITY=avx2
])
def test_default_cpu_dtype_follows_native_bf16(monkeypatch, flags, capability, expected):
    monkeypatch.setattr("pie_trio.model.hardware.cpu_info",
                        lambda: CpuInfo(frozenset(flags), capability))
    choice = choose_dtype(None, CPU)
    assert choice.dtype == expected
    assert capability in choice.reason  # the log line says why


@pytest.mark.parametrize(("flags", "capability", "copy"), [
    ({"avx2", "avx512f", "avx512_bf16"}, "AVX512", torch.bfloat16),
    ({"avx2", "avx512f", "avx512bw"}, "AVX512", torch.float32),
    ({"avx2"}, "AVX2", torch.float32),
    ({"avx2", "avx512f", "avx512_bf16"}, "AVX2", torch.float32),  # ATEN_CPU_CAPABILITY=avx2
])
def test_int4_weights_compute_in_fp32_on_every_cpu(monkeypatch, flags, capability, copy):
    monkeypatch.setattr("pie_trio.model.hardware.cpu_info",
                        lambda: CpuInfo(frozenset(flags), capability))
    choice = choose_dtype(None, CPU, int4=True)
    assert choice.dtype == torch.float32 and "int4" in choice.reason
    assert int4_dense_dtype(choice.dtype) == copy
    assert choose_dtype("bf16", CPU, int4=True).dtype == torch.bfloat16  # asked for: it wins
    assert int4_dense_dtype(torch.bfloat16) == torch.bfloat16


def test_an_explicit_dtype_always_wins():
    assert choose_dtype("bf16", CPU).dtype == torch.bfloat16
    assert choose_dtype("fp32", CPU).dtype == torch.float32
    assert choose_dtype(torch.float16, CPU).dtype == torch.float16
    with pytest.raises(ValueError, match="unknown dtype"):
        choose_dtype("int3", CPU)


def test_forced_avx2_dispatch_chooses_fp32():
    """What an AVX2-only CPU does, reproduced on any x86 CPU by torch's own switch."""
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
    code = ("from pie_trio.model.hardware import choose_dtype, cpu_info; import torch; "
            "print(cpu_info().capability, choose_dtype(None, torch.device('cpu')).dtype)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["AVX2", "torch.float32"]
