"""`codegemm bench kernels|decode`: GPU benchmarks that print tables (and JSON on request).

Each benchmark module exposes ``add_arguments(parser)`` and ``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib

BENCHMARKS = {
    "kernels": ("codegemm.bench.kernels", "matmul kernels vs fp16 cuBLAS and AQLM on Llama-3 shapes"),
    "cpu": ("codegemm.bench.cpu", "CPU Psumbook path vs dequantize-then-matmul on one layer"),
    "decode": ("codegemm.bench.decode", "end-to-end decode throughput vs fp16 and AQLM on Llama-3 architectures"),
}


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("bench", help="run a benchmark (kernels, decode)")
    kinds = parser.add_subparsers(dest="benchmark", metavar="BENCHMARK", required=True)
    for name, (module_name, help_text) in BENCHMARKS.items():
        sub = kinds.add_parser(name, help=help_text)
        module = _load(module_name)
        if module is not None:
            module.add_arguments(sub)
            sub.set_defaults(func=module.run)
        else:
            sub.set_defaults(func=lambda args, n=name: _missing(n))


def _load(module_name: str):
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name == module_name:
            return None
        raise


def _missing(name: str) -> int:
    raise SystemExit(f"codegemm bench {name}: not implemented yet")
