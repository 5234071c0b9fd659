"""Markdown tables for docs/BENCHMARKS.md from a `codegemm bench kernels --json` file.

    python3 scripts/kernels_markdown.py docs/results/kernels_h200_v6.json
"""

from __future__ import annotations

import json
import math
import sys


def _cell(row: dict) -> str:
    if row["kernel"] == "fp16":
        return f"{row['us']:.1f}"
    return f"{row['us']:.1f} ({row['speedup']:.2f}x, {row['pct_copy_bw']:.0f}%)"


def tables(report: dict) -> str:
    rows = report["rows"]
    kernels = list(dict.fromkeys(r["kernel"] for r in rows))
    layers = list(dict.fromkeys((r["model"], r["layer"], r["k"], r["n"]) for r in rows))
    out = [f"GPU: {report['gpu']}; {report['date'][:10]}; torch {report['torch']}; copy bandwidth "
           f"{report['copy_bandwidth_Bps'] / 1e9:.0f} GB/s (read+write); {report['dtype']} activations; CUDA-graph "
           "replays, weights rotated past L2, median. Cells: µs (speedup over fp16, % of copy bandwidth); the "
           "kernel the dispatcher chose is under each table.", ""]
    for tokens in sorted({r["tokens"] for r in rows}):
        out += [f"**{tokens} token{'s' if tokens > 1 else ''}**", "",
                "| layer | K x N | " + " | ".join(kernels) + " |", "|---|---|" + "---|" * len(kernels)]
        impls: dict[str, set[str]] = {}
        for model, layer, k, n in layers:
            cells = []
            for kernel in kernels:
                match = [r for r in rows if (r["model"], r["layer"], r["k"], r["n"], r["tokens"], r["kernel"])
                         == (model, layer, k, n, tokens, kernel)]
                cells.append(_cell(match[0]) if match else "-")
                if match and kernel.startswith("codegemm"):
                    impls.setdefault(kernel, set()).add(match[0]["impl"])
            out.append(f"| {model} {layer} | {k}x{n} | " + " | ".join(cells) + " |")
        out += ["", "Kernels: " + "; ".join(f"{k}: {', '.join(sorted(v))}" for k, v in impls.items()), ""]
    sums = report["block_sums"]
    out += ["**Decoder-block sums** (µs, speedup over fp16)", "",
            "| model | tokens | " + " | ".join(kernels) + " |", "|---|---|" + "---|" * len(kernels)]
    for model in sorted({s["model"] for s in sums}, key=lambda m: ("70b" in m, m)):
        for tokens in sorted({s["tokens"] for s in sums}):
            cells = []
            for kernel in kernels:
                match = [s for s in sums if (s["model"], s["tokens"], s["kernel"]) == (model, tokens, kernel)]
                cells.append("-" if not match else (f"{match[0]['us']:.1f}" if kernel == "fp16"
                                                    else f"{match[0]['us']:.1f} ({match[0]['speedup']:.2f}x)"))
            out.append(f"| {model} | {tokens} | " + " | ".join(cells) + " |")
    errors = [r["rel_err"] for r in rows if r["kernel"].startswith("codegemm") and not math.isnan(r["rel_err"])]
    if errors:
        out += ["", f"Relative error vs float64, all codegemm rows: max {max(errors):.2e}."]
    return "\n".join(out)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python3 scripts/kernels_markdown.py KERNELS_JSON")
    with open(sys.argv[1]) as f:
        print(tables(json.load(f)))
