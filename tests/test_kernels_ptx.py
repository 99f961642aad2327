"""Every raw CUDA kernel compiles to PTX for sm_90 with nvcc, and defines the entry points its
Python wrapper launches. Runs without a GPU; skipped (saying why) only where nvcc is absent."""

from __future__ import annotations

import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from pie_trio.kernels.cuda_kernels import KERNEL_DIR, SOURCES, find_nvcc, nvcc_ptx_command

NVCC = find_nvcc()
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not found (install the CUDA toolkit)")


def compile_ptx(source: Path, out_dir: Path) -> tuple[subprocess.CompletedProcess[str], Path]:
    assert NVCC is not None
    output = out_dir / (source.stem + ".ptx")
    command = nvcc_ptx_command(source, output, NVCC)
    return subprocess.run(command, capture_output=True, text=True, timeout=300), output


def test_every_kernel_compiles_to_ptx(tmp_path: Path) -> None:
    sources = sorted(KERNEL_DIR.glob("*.cu"))
    assert {s.name for s in sources} == set(SOURCES), "SOURCES must list every .cu file"
    with ThreadPoolExecutor(max_workers=len(sources)) as pool:
        results = list(pool.map(lambda s: compile_ptx(s, tmp_path), sources))
    failures = [f"{s.name}:\n{r.stderr}" for s, (r, _) in zip(sources, results, strict=True)
                if r.returncode != 0]  # fmt: skip
    assert not failures, "\n".join(failures)
    for source, (result, ptx) in zip(sources, results, strict=True):
        assert "warning" not in result.stderr.lower(), f"{source.name}: {result.stderr}"
        text = ptx.read_text()
        for entry in SOURCES[source.name]:
            assert f".entry {entry}(" in text, f"{source.name} lacks {entry}"
