"""`codegemm bench kernels`: CodeGEMM matmuls vs fp16 cuBLAS (and AQLM when installed) on Llama-3 shapes.

For each decoder-block shape, token count and kernel, one row: median µs per
call over CUDA-graph replays with the weights rotated past L2, the speedup
over fp16 ``F.linear``, the bytes the call must move over that time, the
share of the copy bandwidth measured in the same run, and the relative error
against a float64 reference. Per-block sums follow. ``--json`` writes
everything, with the GPU name and date.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F

from codegemm import reference
from codegemm.bench.timing import copy_bandwidth, device_name, l2_bytes, rotation_count, time_calls
from codegemm.config import CodebookConfig
from codegemm.layout import can_tile, tile_tables
from codegemm.ops.dispatch import Backend, codebook_matmul, grouped_matmul, select_kernel
from codegemm.random_model import random_layer_tensors
from codegemm.shapes import BENCH_TOKENS, DECODER_BLOCKS, LinearShape

logger = logging.getLogger(__name__)

FP16 = "fp16"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", default="llama3-8b,llama3-70b", help="comma-separated keys of codegemm.shapes")
    parser.add_argument("--configs", default="m2v8g128,m1v4g128", help="comma-separated codebook configs")
    parser.add_argument("--tokens", default=",".join(map(str, BENCH_TOKENS)), help="comma-separated token counts")
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"], help="activation dtype")
    parser.add_argument("--no-aqlm", action="store_true", help="skip the aqlm package's kernels even if installed")
    parser.add_argument("--no-check", action="store_true", help="skip the float64 accuracy check")
    parser.add_argument("--replays", type=int, default=50, help="timed CUDA-graph replays per row")
    parser.add_argument("--json", metavar="PATH", help="also write all rows as JSON")
    parser.add_argument("--siblings", action="store_true",
                        help="also time qkv and gate_up as separate layers (own codebooks), one launch each and grouped")
    parser.add_argument("--triton-too", action="store_true",
                        help="also time the Triton kernels where the CUDA kernel is the default")
    parser.add_argument("--rows-too", action="store_true",
                        help="also time the row-major stored layout (rows 'codegemm-CONFIG-rows'); the default rows "
                             "use the tiled GPU layout that models on a GPU run (codegemm.layout)")
    parser.add_argument("--dequant-too", action="store_true",
                        help="also time the Triton dequantize-in-registers GEMM at every token count")
    parser.add_argument("--tune", choices=["triton", "cuda", "both"],
                        help="instead: time Psumbook tile plans (Triton: block_n x split_k x warps; CUDA: rows per "
                             "thread x splits) per shape and token count")


@dataclasses.dataclass
class Row:
    model: str
    layer: str
    k: int
    n: int
    tokens: int
    kernel: str
    us: float
    p20_us: float
    p80_us: float
    bytes: int
    copies: int
    speedup: float = float("nan")
    gbps: float = float("nan")
    pct_copy_bw: float = float("nan")
    rel_err: float = float("nan")
    impl: str = ""


def _aqlm_ops() -> dict[str, Callable] | None:
    try:
        import aqlm.inference_kernels.cuda_kernel  # noqa: F401  (compiles and registers torch.ops.aqlm)
    except Exception as err:  # noqa: BLE001 - aqlm is optional; any import/build failure means "absent"
        logger.warning("aqlm kernels unavailable: %s", err)
        return None
    return {"aqlm-2x8": torch.ops.aqlm.code2x8_matmat, "aqlm-1x16": torch.ops.aqlm.code1x16_matmat}


def _quantized(config: CodebookConfig, n: int, k: int, device: torch.device, copies: int):
    """``copies`` random layers (codes, codebooks, scales) in the stored layout; fp16 codebooks and scales."""
    generator = torch.Generator(device=device).manual_seed(0)
    return [random_layer_tensors(config, n, k, device, torch.float16, generator) for _ in range(copies)]


def _tiled(layers: list, config: CodebookConfig, k: int) -> list | None:
    """The layers in the tiled GPU layout (what a model on the GPU holds after ``tile_``), or None when the
    config does not tile."""
    if not can_tile(config, k):
        return None
    return [tile_tables(*layer) for layer in layers]


def _layouts(layers: list, config: CodebookConfig, k: int, rows_too: bool) -> list[tuple[str, list, bool]]:
    """``(kernel-name suffix, layers, tiled)`` to time: the tiled layout where the config has one (else the
    row-major one), plus the row-major one as ``-rows`` when asked."""
    tiled = _tiled(layers, config, k)
    if tiled is None:
        return [("", layers, False)]
    return [("", tiled, True)] + ([("-rows", layers, False)] if rows_too else [])


def _impl_label(kernel: str, x: torch.Tensor, codebooks: torch.Tensor, tiled: bool) -> str:
    """The kernel that ran: the tensor-core op hands tiled 2-4-token fp16 m2v8 calls to psumbook_mma.cu."""
    if kernel == "cuda_codebook_mma" and tiled:
        from codegemm.ops.cuda import psumbook_mma_chosen

        if psumbook_mma_chosen(x, codebooks, tiled):
            kernel = "cuda_psumbook_mma"
    return kernel + (" (tiled)" if tiled else "")


def _quantized_bytes(config: CodebookConfig, n: int, k: int) -> float:
    """Bytes a call must read of one layer: codes, fp16 group scales and fp16 codebooks."""
    return (n * (k // config.vec_len) * config.num_codebooks * (config.nbits / 8) + n * config.num_groups(k) * 2
            + config.num_codebooks * config.codebook_size * config.vec_len * 2)


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref).norm() / ref.norm())


SIBLING_SUFFIXES = ("-separate", "-grouped")
"""Kernel-name suffixes of the ``--siblings`` rows: a fused shape's parts launched one by one, or grouped."""


def _bench_siblings(model: str, shape: LinearShape, tokens_list: list[int], configs: list[str], dtype: torch.dtype,
                    args: argparse.Namespace, device: torch.device) -> list[Row]:
    """A fused shape as a checkpoint stores it (q, k, v or gate, up with their own codebooks): every part
    launched alone, then all parts in one grouped launch (:mod:`codegemm.siblings`)."""
    k, rows = shape.in_features, []
    for name in configs:
        config = CodebookConfig.from_name(name)
        q_bytes = sum(_quantized_bytes(config, n, k) for n in shape.parts)
        copies = rotation_count(int(q_bytes), device)
        generator = torch.Generator(device=device).manual_seed(1)
        sets = [[random_layer_tensors(config, n, k, device, torch.float16, generator) for n in shape.parts]
                for _ in range(copies)]
        row_sets = sets[0]  # row-major, for the reference
        tiled = can_tile(config, k)  # time the layout a model on the GPU holds
        if tiled:
            sets = [_tiled(layers, config, k) for layers in sets]
        for tokens in tokens_list:
            x = torch.randn(tokens, k, device=device, dtype=dtype)
            one_by_one = lambda layers: [codebook_matmul(x, *layer, None, config, tiled=tiled)  # noqa: E731
                                         for layer in layers]
            together = lambda layers: grouped_matmul(x, layers, None, config, tiled=tiled)  # noqa: E731
            ref = None
            if not args.no_check:
                ref = torch.cat([reference.dense_matmul(x, *layer, None, torch.float64) for layer in row_sets], dim=1)
            for suffix, fn, impl in (("-separate", one_by_one, f"{len(shape.parts)} launches"),
                                     ("-grouped", together, "grouped launch")):
                if fn(sets[0]) is None:
                    continue  # no grouped kernel for this call
                t = time_calls([functools.partial(fn, layers) for layers in sets], replays=args.replays)
                row = Row(model, shape.name, k, shape.out_features, tokens, f"codegemm-{name}{suffix}", t.median_us,
                          t.p20_us, t.p80_us, int(q_bytes) + (tokens * k + tokens * shape.out_features) * dtype.itemsize,
                          copies, impl=impl)
                if ref is not None:
                    out = fn(sets[0])
                    row.rel_err = _rel_err(torch.cat(out, dim=1) if isinstance(out, list) else out, ref)
                rows.append(row)
        del sets
    return rows


def _bench_shape(model, layer, k, n, tokens_list, configs, dtype, aqlm, args, bandwidth) -> list[Row]:
    device = torch.device("cuda")
    rows: list[Row] = []
    act_bytes = lambda t: (t * k + t * n) * dtype.itemsize
    # fp16 cuBLAS
    dense_bytes = n * k * 2
    copies = rotation_count(dense_bytes, device)
    weights = [torch.randn(n, k, device=device, dtype=dtype).mul_(0.02) for _ in range(copies)]
    for tokens in tokens_list:
        x = torch.randn(tokens, k, device=device, dtype=dtype)
        t = time_calls([functools.partial(F.linear, x, w) for w in weights], replays=args.replays)
        rows.append(Row(model, layer, k, n, tokens, FP16, t.median_us, t.p20_us, t.p80_us,
                        dense_bytes + act_bytes(tokens), copies, impl="cuBLAS F.linear"))
    del weights
    for name in configs:
        config = CodebookConfig.from_name(name)
        q_bytes = _quantized_bytes(config, n, k)
        copies = rotation_count(int(q_bytes), device)
        layers = _quantized(config, n, k, device, copies)
        for tokens in tokens_list:
            x = torch.randn(tokens, k, device=device, dtype=dtype)
            spec = select_kernel(device, config, tokens, dtype)
            ref = None
            if not args.no_check:
                ref = reference.dense_matmul(x, *layers[0], None, torch.float64)
            for suffix, timed, tiled in _layouts(layers, config, k, args.rows_too):
                calls = [functools.partial(codebook_matmul, x, c, cb, s, None, config, tiled=tiled)
                         for c, cb, s in timed]
                t = time_calls(calls, replays=args.replays)
                row = Row(model, layer, k, n, tokens, f"codegemm-{name}{suffix}", t.median_us, t.p20_us, t.p80_us,
                          int(q_bytes) + act_bytes(tokens), copies, impl=_impl_label(spec.name, x, timed[0][1], tiled))
                if ref is not None:
                    row.rel_err = _rel_err(codebook_matmul(x, *timed[0], None, config, tiled=tiled), ref)
                rows.append(row)
            if args.triton_too and spec.backend is not Backend.TRITON:
                tspec = select_kernel(device, config, tokens, dtype, Backend.TRITON)
                calls = [functools.partial(codebook_matmul, x, c, cb, s, None, config, Backend.TRITON)
                         for c, cb, s in layers]
                t = time_calls(calls, replays=args.replays)
                row = Row(model, layer, k, n, tokens, f"triton-{name}", t.median_us, t.p20_us, t.p80_us,
                          int(q_bytes) + act_bytes(tokens), copies, impl=tspec.name)
                if ref is not None:
                    codes, cb, s = layers[0]
                    row.rel_err = _rel_err(codebook_matmul(x, codes, cb, s, None, config, Backend.TRITON), ref)
                rows.append(row)
            if args.dequant_too and spec.name != "triton_dequant_gemm":
                from codegemm.ops.custom_ops import dequant_mm

                calls = [functools.partial(dequant_mm, x, c, cb, s, None) for c, cb, s in layers]
                t = time_calls(calls, replays=args.replays)
                rows.append(Row(model, layer, k, n, tokens, f"dequant-{name}", t.median_us, t.p20_us, t.p80_us,
                                int(q_bytes) + act_bytes(tokens), copies, impl="triton_dequant_gemm"))
            del ref
        del layers
    if aqlm:
        for kname, op in aqlm.items():
            m, bits = (2, 8) if kname == "aqlm-2x8" else (1, 16)
            q_bytes = n * (k // 8) * m * bits // 8 + n * 2 + m * (1 << bits) * 8 * 2
            copies = rotation_count(q_bytes, device)
            code_dtype = torch.int8 if bits == 8 else torch.int16
            layers = []
            for _ in range(copies):
                codes = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (n, k // 8, m), dtype=torch.int32,
                                      device=device).to(code_dtype)
                cbs = torch.randn(m, 1 << bits, 1, 8, device=device, dtype=dtype).div_(m ** 0.5)
                scales = torch.rand(n, 1, 1, 1, device=device, dtype=dtype).add_(0.5).mul_(0.02)
                layers.append((codes, cbs, scales, torch.zeros(n, device=device, dtype=dtype)))
            for tokens in tokens_list:
                x = torch.randn(tokens, k, device=device, dtype=dtype)
                t = time_calls([functools.partial(op, x, *lay) for lay in layers], replays=args.replays)
                rows.append(Row(model, layer, k, n, tokens, kname, t.median_us, t.p20_us, t.p80_us,
                                q_bytes + act_bytes(tokens), copies, impl="aqlm CUDA matvec per token"))
            del layers
    torch.cuda.empty_cache()
    return _relate(rows, rows, bandwidth)


def _relate(rows: list[Row], baseline: list[Row], bandwidth: float) -> list[Row]:
    """Fill speedup over the fp16 row of the same token count (in ``baseline``), GB/s and % of copy bandwidth."""
    for row in rows:
        base = next(r for r in baseline if r.kernel == FP16 and r.tokens == row.tokens)
        row.speedup = base.us / row.us
        row.gbps = row.bytes / (row.us * 1e-6) / 1e9
        row.pct_copy_bw = 100 * row.bytes / (row.us * 1e-6) / bandwidth
    return rows


def _block_sums(rows: list[Row]) -> list[dict]:
    """Per model, token count and kernel: the sum over the block's layers. A ``--siblings`` kernel's block
    takes its own rows for the fused shapes and the plain kernel's rows for the others (o, down)."""
    sums = []
    keys = sorted({(r.model, r.tokens, r.kernel) for r in rows}, key=lambda t: (t[0], t[1], t[2] != FP16, t[2]))
    for model, tokens, kernel in keys:
        group = [r for r in rows if (r.model, r.tokens, r.kernel) == (model, tokens, kernel)]
        base_kernel = next((kernel[: -len(s)] for s in SIBLING_SUFFIXES if kernel.endswith(s)), None)
        if base_kernel is not None:
            own = {r.layer for r in group}
            group += [r for r in rows if (r.model, r.tokens, r.kernel) == (model, tokens, base_kernel)
                      and r.layer not in own]
        base = sum(r.us for r in rows if (r.model, r.tokens, r.kernel) == (model, tokens, FP16))
        total = sum(r.us for r in group)
        nbytes = sum(r.bytes for r in group)
        sums.append({"model": model, "tokens": tokens, "kernel": kernel, "layers": len(group), "us": total,
                     "speedup": base / total, "gbps": nbytes / (total * 1e-6) / 1e9})
    return sums


def format_table(rows: list[Row], sums: list[dict], bandwidth: float, gpu: str) -> str:
    lines = [f"GPU: {gpu}; copy bandwidth {bandwidth / 1e9:.0f} GB/s (read+write); L2 {l2_bytes() >> 20} MiB",
             (f"{'model':<11}{'layer':<8}{'KxN':>12}{'tok':>4} {'kernel':<28}{'us':>9}{'x fp16':>8}{'GB/s':>7}"
              f"{'%bw':>6}{'rel err':>10}  impl")]
    for r in rows:
        lines.append(f"{r.model:<11}{r.layer:<8}{f'{r.k}x{r.n}':>12}{r.tokens:>4} {r.kernel:<28}{r.us:>9.1f}"
                     f"{r.speedup:>8.2f}{r.gbps:>7.0f}{r.pct_copy_bw:>6.0f}{r.rel_err:>10.1e}  {r.impl}")
    lines.append("")
    lines.append(f"{'decoder block sums':<30}{'tok':>4} {'kernel':<28}{'us':>9}{'x fp16':>8}{'GB/s':>7}")
    for s in sums:
        lines.append(f"{s['model']:<30}{s['tokens']:>4} {s['kernel']:<28}{s['us']:>9.1f}{s['speedup']:>8.2f}"
                     f"{s['gbps']:>7.0f}")
    return "\n".join(lines)


def tune_psumbook(args: argparse.Namespace, dtype: torch.dtype) -> list[dict]:
    """Time Psumbook tile plans around the default one; prints one line per plan, best marked."""
    from codegemm.ops.triton_psumbook import plan_psumbook, psumbook_matmul_triton

    device = torch.device("cuda")
    results = []
    for model in args.models.split(","):
        for shape in DECODER_BLOCKS[model]:
            k, n = shape.in_features, shape.out_features
            for name in args.configs.split(","):
                config = CodebookConfig.from_name(name)
                vpg = None if config.group_size is None else config.group_size // config.vec_len
                q_bytes = n * (k // config.vec_len) * config.num_codebooks + n * config.num_groups(k) * 2
                layers = _quantized(config, n, k, device, rotation_count(q_bytes, device))
                for tokens in (int(t) for t in args.tokens.split(",")):
                    x = torch.randn(tokens, k, device=device, dtype=dtype)
                    default = plan_psumbook(tokens, n, k // config.vec_len, config.num_codebooks,
                                            config.codebook_size, vpg, device)
                    timed = []
                    for bn in (64, 128, 256, 512) if args.tune != "cuda" else ():
                        for split in (None, 1, 2, 4, 8, 16):
                            for warps in (4, 8):
                                plan = plan_psumbook(tokens, n, k // config.vec_len, config.num_codebooks,
                                                     config.codebook_size, vpg, device, block_n=bn,
                                                     split_k=split, num_warps=warps)
                                if plan in (p for p, _ in timed):
                                    continue
                                calls = [functools.partial(psumbook_matmul_triton, x, c, cb, s, None, plan)
                                         for c, cb, s in layers]
                                try:
                                    us = time_calls(calls, replays=20, warmup=3).median_us
                                except Exception as err:  # noqa: BLE001 - a plan may not compile (resources)
                                    logger.warning("plan %s failed: %s", plan, err)
                                    continue
                                timed.append((plan, us))
                    from codegemm.ops.cuda import cuda_psumbook_eligible, psumbook_matmul_cuda

                    if args.tune != "triton" and cuda_psumbook_eligible(x, *layers[0], None):
                        for rpt in (4, 8) if tokens == 1 else (2,):
                            for split in (1, 2, 4, 8, 16, 32, 64):
                                calls = [functools.partial(psumbook_matmul_cuda, x, c, cb, s, None, rpt, split)
                                         for c, cb, s in layers]
                                us = time_calls(calls, replays=20, warmup=3).median_us
                                timed.append((f"cuda rpt={rpt} split={split}", us))
                    best = min(timed, key=lambda pu: pu[1])
                    default_us = next((us for p, us in timed if p == default), float("nan"))
                    print(f"{model} {shape.name} {k}x{n} {name} t={tokens}: default {default} {default_us:.1f} us; "
                          f"best {best[0]} {best[1]:.1f} us", flush=True)
                    print("    " + " ".join(f"[{p}] {us:.1f}" for p, us in timed if isinstance(p, str)), flush=True)
                    results.append({"model": model, "layer": shape.name, "k": k, "n": n, "config": name,
                                    "tokens": tokens, "default_us": default_us,
                                    "plans": [[p if isinstance(p, str) else dataclasses.asdict(p), us]
                                              for p, us in timed]})
                del layers
    return results


def run(args: argparse.Namespace) -> int:
    if not torch.cuda.is_available():
        raise SystemExit("codegemm bench kernels needs a CUDA GPU")
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    if args.tune:
        results = tune_psumbook(args, dtype)
        if args.json:
            with open(args.json, "w") as fh:
                json.dump({"gpu": device_name(), "results": results}, fh, indent=1)
        return 0
    bandwidth = copy_bandwidth()
    aqlm = None if args.no_aqlm else _aqlm_ops()
    tokens_list = [int(t) for t in args.tokens.split(",")]
    configs = [c for c in args.configs.split(",") if c]
    rows: list[Row] = []
    for model in args.models.split(","):
        for shape in DECODER_BLOCKS[model]:
            rows += _bench_shape(model, shape.name, shape.in_features, shape.out_features, tokens_list, configs,
                                 dtype, aqlm, args, bandwidth)
            if args.siblings and shape.parts:
                fp16 = [r for r in rows if (r.model, r.layer) == (model, shape.name)]
                rows += _relate(_bench_siblings(model, shape, tokens_list, configs, dtype, args, torch.device("cuda")),
                                fp16, bandwidth)
    sums = _block_sums(rows)
    gpu = device_name()
    print(format_table(rows, sums, bandwidth, gpu))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"gpu": gpu, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                       "torch": torch.__version__, "copy_bandwidth_Bps": bandwidth, "dtype": args.dtype,
                       "rows": [dataclasses.asdict(r) for r in rows], "block_sums": sums}, fh, indent=1)
    return 0
