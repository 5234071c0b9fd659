"""The built CUDA library's machine code (``-m gpu``): what the compiler may not move across a dependent launch's wait.

The matmul kernels are programmatic dependents (common.cuh): until ``griddepcontrol.wait`` (SASS ``ACQBULK``) the
kernel ahead may still be running and writing. A kernel may read its tables before that wait only where the caller
vouched for them (``Segments.weights_settled``), and that path comes after a first, conditional wait in the code. So
in every matmul kernel no global load may sit ahead of the first wait: one did in v18, where ``__ldg`` codebook loads
(invariant loads to the compiler) were hoisted above it.
"""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from codegemm.ops import cuda as cu

pytestmark = pytest.mark.gpu

MATMUL_KERNELS = ("psumbook_kernel", "codebook_mma_kernel", "psumbook_mma_kernel")


def _cuobjdump() -> str | None:
    nvcc = cu._nvcc()
    beside = Path(nvcc).with_name("cuobjdump") if nvcc else None
    return str(beside) if beside and beside.exists() else shutil.which("cuobjdump")


def _kernels_sass(library: Path, tool: str) -> dict[str, list[str]]:
    """Instruction lines of each kernel in the library, keyed by its mangled name."""
    text = subprocess.run([tool, "-sass", str(library)], check=True, capture_output=True, text=True).stdout
    kernels: dict[str, list[str]] = {}
    name = None
    for line in text.splitlines():
        found = re.search(r"Function : (\S+)", line)
        if found:
            name = found.group(1)
            kernels[name] = []
        elif name and re.match(r"\s+/\*[0-9a-f]{4,}\*/", line):
            kernels[name].append(line)
    return kernels


def test_no_global_load_ahead_of_the_first_wait() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("cuobjdump not found")
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("dependent launches need compute capability 9.0")
    library = cu.build(cu.device_arch(torch.device("cuda")))
    kernels = {name: lines for name, lines in _kernels_sass(library, tool).items()
               if any(k in name for k in MATMUL_KERNELS)}
    assert kernels, "no matmul kernel found in the library"
    early = {}
    for name, lines in kernels.items():
        waits = [i for i, line in enumerate(lines) if "ACQBULK" in line]
        assert waits, f"{name} never waits for the kernel ahead"
        loads = [line.strip() for line in lines[:waits[0]] if re.search(r"\bLDG\b|\bLDG\.", line)]
        if loads:
            early[name] = loads
    assert not early, f"global loads ahead of the first wait: {early}"
