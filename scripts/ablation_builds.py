"""Ablation builds of the CUDA library: each removes one part of the matmul kernels, so that a same-run A/B with
``scripts/mma_ab.py`` shows what that part costs. Their outputs are wrong by design (mma_ab prints BAD for them);
only their times mean something.

Usage (here, with nvcc): python3 scripts/ablation_builds.py [OUT_DIR] [NAME ...]
Writes OUT_DIR/NAME.so (default build/ablate; every ablation unless named). Then, on the device machine:
    TOKENS=1,4,16 CFGS=m2v8g128 python3 scripts/mma_ab.py base=build/ablate/base.so nobuild=build/ablate/nobuild.so ...

* base: the tree as it is.
* nobuild: no Psumbook build in psumbook.cu (one token, the tensor-core build) and psumbook_mma.cu (2-4 tokens); the
  barriers stay, the gathers read whatever the table holds.
* nox: codebook_mma.cu stages constants instead of loading x (the L2 reads of a split's activations).
* noloop: no chunk loop in any of the three kernels; what is left is the fixed cost of a call (launch, waits,
  codebook and activation staging, partial stores, split-K reduce, hand-offs).
"""
from __future__ import annotations

import pathlib
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable

from codegemm.ops.cuda import _SOURCES, _nvcc

Edit = tuple[str, Callable[[str], str]]


def replace_once(text: str, old: str, new: str) -> str:
    """``text`` with ``old`` replaced, which must occur exactly once (the tree changed otherwise)."""
    if text.count(old) != 1:
        raise SystemExit(f"ablation anchor found {text.count(old)} times: {old[:60]!r}")
    return text.replace(old, new)


def no_build_psumbook(text: str) -> str:
    text = replace_once(text, "      if constexpr (TC) {\n        // A = the chunk's",
                        "      if constexpr (TC) {\n#if 0\n        // A = the chunk's")
    return replace_once(text, "            out_e[store_off[3]] = v3;\n          }\n        }\n      } else {",
                        "            out_e[store_off[3]] = v3;\n          }\n        }\n#endif\n      } else {")


def no_build_psumbook_mma(text: str) -> str:
    text = replace_once(text, "    // Build.\n", "    // Build.\n#if 0\n")
    return replace_once(text, "    __syncthreads();\n\n    // Gathers and sums.", "#endif\n    __syncthreads();\n\n    // Gathers and sums.")


def no_x_loads(text: str) -> str:
    return replace_once(
        text,
        "t < tokens ? *reinterpret_cast<const uint4*>(x + static_cast<size_t>(t) * stride_x +\n"
        "                                                       static_cast<size_t>(chunk_lo + cl) * CHUNK_INPUTS + 32 * qq + 8 * u)\n"
        "                     : make_uint4(0u, 0u, 0u, 0u);",
        "make_uint4(0x3c003c00u ^ t ^ u ^ qq, 0x3c00u, 0u, cl);")


def no_loop_psumbook(text: str) -> str:
    return replace_once(text, "for (int chunk = chunk_lo; chunk < chunk_hi; ++chunk) {",
                        "for (int chunk = chunk_lo; chunk < chunk_lo; ++chunk) {")


def no_loop_psumbook_mma(text: str) -> str:
    return replace_once(text, "  for (int cl = 0; cl < nch; ++cl) {\n    uint2 cw[R][2];",
                        "  for (int cl = 0; cl < 0; ++cl) {\n    uint2 cw[R][2];")


def no_loop_codebook_mma(text: str) -> str:
    text = replace_once(text, "    for (; cl + 3 <= nch; cl += 3) {", "    for (; cl + 3 <= 0; cl += 3) {")
    text = replace_once(text, "    if (cl < nch) step(cl, cw, next2_cw);\n    if (cl + 1 < nch) step(cl + 1, next_cw, cw);", "")
    return replace_once(text, "    for (int cl = 0; cl < nch; ++cl) step(cl, cw, next2_cw);", "")


ABLATIONS: dict[str, list[Edit]] = {
    "base": [],
    "nobuild": [("psumbook.cu", no_build_psumbook), ("psumbook_mma.cu", no_build_psumbook_mma)],
    "nox": [("codebook_mma.cu", no_x_loads)],
    "noloop": [("psumbook.cu", no_loop_psumbook), ("psumbook_mma.cu", no_loop_psumbook_mma),
               ("codebook_mma.cu", no_loop_codebook_mma)],
}


def build(name: str, out_dir: pathlib.Path, arch: str = "sm_90") -> pathlib.Path:
    """Compile the tree's kernels with ``name``'s edits into ``out_dir/name.so`` (the flags of ``cuda.build``)."""
    nvcc = _nvcc()
    if nvcc is None:
        raise SystemExit("nvcc not found (set CUDA_HOME)")
    with tempfile.TemporaryDirectory() as tmp:
        src_dir = pathlib.Path(tmp)
        for src in _SOURCES:
            shutil.copy(src, src_dir / src.name)
        for file_name, edit in ABLATIONS[name]:
            path = src_dir / file_name
            path.write_text(edit(path.read_text()))
        out_dir.mkdir(parents=True, exist_ok=True)
        out = out_dir / f"{name}.so"
        number = arch.split("_")[1]
        subprocess.run([nvcc, "-O3", "-shared", "-Xcompiler", "-fPIC", "-std=c++17", "-diag-suppress", "177",
                        f"-gencode=arch=compute_{number},code={arch}", "-o", str(out),
                        *(str(src_dir / s.name) for s in _SOURCES if s.suffix == ".cu")], check=True)
    return out


def main(argv: list[str]) -> None:
    out_dir = pathlib.Path(argv[0]) if argv and argv[0] not in ABLATIONS else pathlib.Path("build/ablate")
    names = [a for a in argv if a in ABLATIONS] or list(ABLATIONS)
    for name in names:
        print("built", build(name, out_dir), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
