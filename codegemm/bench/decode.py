"""`codegemm bench decode`: end-to-end generation speed of random-weight models, backend by backend.

For each backend (fp16 when it fits, CodeGEMM, the ``aqlm`` package's 2x8 and
1x16 layers when installed) and each batch size, one row: decode tokens/s
(median over decode steps after a warm-up, times the batch), prefill tokens/s,
time to first token, peak GPU memory, compile-and-capture time and build time.
All backends run in one process, one after another, each freed before the next.
Decoding goes through :class:`codegemm.generation.FastGenerator` (compiled step
replayed as a CUDA graph); ``--hf-generate`` also times transformers'
``generate`` at batch 1 for comparison.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import gc
import json
import logging
import math
import statistics
import time
from collections.abc import Callable

import torch

from codegemm.bench.archs import architecture_config
from codegemm.bench.decode_profile import format_profile, profile_decode
from codegemm.bench.models import (
    AQLM_FORMATS,
    CODEGEMM,
    CODEGEMM_ROWS,
    CODEGEMM_SEPARATE,
    FP16,
    aqlm_available,
    build_model,
    estimated_bytes,
    parse_backends,
)
from codegemm.config import as_config
from codegemm.errors import ConfigError, UnsupportedError
from codegemm.generation import DEFAULT_MAX_BATCH_SIZE, FastGenerator
from codegemm.generation.cache import kv_cache_bytes

logger = logging.getLogger(__name__)

MEMORY_HEADROOM = 0.92
"""Share of free device memory a model plus its KV cache may plan to use (the rest: activations, graphs)."""

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--arch", default="llama3-8b", help="llama3-8b, llama3-70b, tiny-llama or a config.json path")
    parser.add_argument("--config", default="m2v8g128", help="CodeGEMM codebook config of the codegemm backend")
    parser.add_argument("--batch", type=int, action="append", help="batch size (repeat for several; default 1)")
    parser.add_argument("--prompt", type=int, default=128, help="prompt tokens per row")
    parser.add_argument("--tokens", type=int, default=256, help="new tokens per row")
    parser.add_argument("--cache-len", type=int, default=None,
                        help="KV cache length (default: prompt + tokens rounded up to 256; e.g. 4096)")
    parser.add_argument("--backends", default="fp16,codegemm,aqlm",
                        help="comma-separated: fp16, codegemm, codegemm-separate (q/k/v and gate/up not grouped), "
                             "codegemm-rows (tables not tiled on the GPU), aqlm (= aqlm-2x8,aqlm-1x16), aqlm-2x8, "
                             "aqlm-1x16")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float16", choices=sorted(_DTYPES))
    parser.add_argument("--layers", type=int, default=None, help="override the number of decoder layers")
    parser.add_argument("--warmup-steps", type=int, default=16, help="decode steps left out of the median")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="torch.compile the decode step (default: on for CUDA)")
    parser.add_argument("--decode-attention", action=argparse.BooleanOptionalAction, default=None,
                        help="attend over the filled cache slots only in the captured step (default: where it applies)")
    parser.add_argument("--hf-generate", action="store_true",
                        help="also time transformers' generate (static cache) for the codegemm backend at batch 1")
    parser.add_argument("--profile", action="store_true",
                        help="also profile decode steps: kernel time by category, idle gaps, and how much kernels launched "
                             "as dependents overlap (CUDA only)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="PATH", help="also write every row as JSON")


@dataclasses.dataclass
class Row:
    backend: str
    batch: int
    decode_tok_s: float = float("nan")
    step_ms: float = float("nan")
    prefill_tok_s: float = float("nan")
    ttft_ms: float = float("nan")
    peak_gib: float = float("nan")
    compile_s: float = float("nan")
    build_s: float = float("nan")
    weights_gib: float = float("nan")
    hf_generate_tok_s: float = float("nan")
    e2e_tok_s: float = float("nan")
    attention: str = ""
    skipped: str = ""
    profile: dict | None = None


@dataclasses.dataclass(frozen=True)
class Plan:
    """Everything validated before the first allocation."""

    hf_config: object
    config: object
    backends: list[str]
    batches: list[int]
    prompt: int
    tokens: int
    cache_len: int
    device: torch.device
    dtype: torch.dtype


def make_plan(args: argparse.Namespace) -> Plan:
    """Check every argument (arch name, config, batches, lengths, backends) before anything is built."""
    hf_config = architecture_config(args.arch, args.layers)
    config = as_config(args.config)
    backends = parse_backends(args.backends)
    batches = args.batch or [1]
    for b in batches:
        if b < 1 or b > DEFAULT_MAX_BATCH_SIZE:
            raise ConfigError(f"--batch must be in 1..{DEFAULT_MAX_BATCH_SIZE}; got {b}")
    for name in ("prompt", "tokens"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name} must be >= 1; got {getattr(args, name)}")
    if args.warmup_steps < 0:
        raise ConfigError(f"--warmup-steps must be >= 0; got {args.warmup_steps}")
    need = args.prompt + args.tokens
    cache_len = args.cache_len or -(-need // 256) * 256
    if need > cache_len:
        raise ConfigError(f"--prompt + --tokens must fit --cache-len={cache_len}; got {args.prompt} + {args.tokens}")
    limit = getattr(hf_config, "max_position_embeddings", None)
    if limit and cache_len > limit:
        raise ConfigError(f"--cache-len must be at most the arch's max_position_embeddings={limit}; got {cache_len}")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda needs a CUDA GPU; none is visible (use --device cpu)")
    return Plan(hf_config, config, backends, sorted(set(batches)), args.prompt, args.tokens, cache_len, device,
                _DTYPES[args.dtype])


def _fits(plan: Plan, backend: str) -> str:
    """Empty when the backend's weights and largest KV cache fit in free device memory, else why not."""
    if plan.device.type != "cuda":
        return ""
    weights = estimated_bytes(backend, plan.hf_config, plan.config, plan.dtype)
    cache = kv_cache_bytes(plan.hf_config, max(plan.batches), plan.cache_len, plan.dtype)
    free, _ = torch.cuda.mem_get_info(plan.device)
    if weights + cache > MEMORY_HEADROOM * free:
        return (f"does not fit: {weights / 2**30:.1f} GiB weights + {cache / 2**30:.1f} GiB KV cache "
                f"> {MEMORY_HEADROOM:.0%} of {free / 2**30:.1f} GiB free")
    return ""


def _free() -> None:
    gc.collect()
    torch._dynamo.reset()  # compiled graphs of the last model; also keeps the recompile count low
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _measure(gen: FastGenerator, model, plan: Plan, batch: int, warmup: int, hf_generate: bool, seed: int,
             profile: bool = False) -> Row:
    row = Row(backend="", batch=batch)
    rng = torch.Generator(device="cpu").manual_seed(seed + batch)
    prompt = torch.randint(0, plan.hf_config.vocab_size, (batch, plan.prompt), generator=rng).to(plan.device)
    row.compile_s = gen.prepare(batch, plan.cache_len, greedy=True)
    gen.generate(prompt, 2)  # first prefill at this shape: kernel JIT, library handles
    out = gen.generate(prompt, plan.tokens, timings=True)
    steps = out.step_s[warmup:] if len(out.step_s) > warmup else out.step_s
    if steps:
        row.step_ms = statistics.median(steps) * 1e3
        row.decode_tok_s = batch / statistics.median(steps)
    row.prefill_tok_s = batch * plan.prompt / out.prefill_s
    row.ttft_ms = out.time_to_first_token_s * 1e3
    row.e2e_tok_s = batch * plan.tokens / (out.time_to_first_token_s + sum(out.step_s))
    if profile and plan.device.type == "cuda" and gen.cuda_graph:
        row.profile = profile_decode(gen, prompt, min(32, plan.cache_len - plan.prompt - 2))
    if hf_generate and batch == 1:
        row.hf_generate_tok_s = _time_hf_generate(model, prompt, plan)
    return row


def _time_hf_generate(model, prompt: torch.Tensor, plan: Plan) -> float:
    """transformers' ``generate`` (static cache, its own compile on CUDA): new tokens/s over the second call."""
    kwargs = {"max_new_tokens": plan.tokens, "min_new_tokens": plan.tokens, "do_sample": False,
              "cache_implementation": "static", "pad_token_id": 0}
    with torch.no_grad():
        model.generate(prompt, **kwargs)
        _sync(plan.device)
        start = time.perf_counter()
        model.generate(prompt, **kwargs)
        _sync(plan.device)
    return plan.tokens * prompt.shape[0] / (time.perf_counter() - start)


def run_plan(plan: Plan, warmup: int = 16, compile: bool | None = None, hf_generate: bool = False,
             seed: int = 0, profile: bool = False, decode_attention: bool | None = None,
             on_rows: Callable[[list[Row]], None] | None = None) -> list[Row]:
    """Build each backend's model, measure every batch size, free it; returns one row per (backend, batch).

    ``on_rows`` sees the rows so far after each measurement (to save partial results of a long run).
    """
    rows: list[Row] = []
    for backend in plan.backends:
        if on_rows is not None and rows:
            on_rows(rows)
        reason = ""
        if backend in AQLM_FORMATS:
            reason = aqlm_available() or ("" if plan.device.type == "cuda" else "aqlm kernels are benchmarked on CUDA only")
        reason = reason or _fits(plan, backend)
        if reason:
            logger.warning("skipping %s: %s", backend, reason)
            rows.extend(Row(backend=backend, batch=b, skipped=reason) for b in plan.batches)
            continue
        if plan.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(plan.device)
        start = time.perf_counter()
        try:
            model = build_model(backend, plan.hf_config, plan.config, plan.device, plan.dtype, seed)
        except (RuntimeError, OSError, ImportError, UnsupportedError) as err:  # e.g. a peer kernel that fails to build
            logger.exception("%s: building the model failed", backend)
            rows.extend(Row(backend=backend, batch=b, skipped=f"failed: {type(err).__name__}: {err}"[:300])
                        for b in plan.batches)
            _free()
            continue
        _sync(plan.device)
        build_s = time.perf_counter() - start
        weights = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
        logger.info("%s: built in %.1f s, %.2f GiB of weights", backend, build_s, weights / 2**30)
        gen = FastGenerator(model, max_batch_size=max(plan.batches), max_cache_len=plan.cache_len, compile=compile,
                            decode_attention=decode_attention, group_siblings=backend != CODEGEMM_SEPARATE,
                            tile_layers=backend != CODEGEMM_ROWS)
        for batch in plan.batches:
            try:
                row = _measure(gen, model, plan, batch, warmup, hf_generate and backend == CODEGEMM, seed, profile)
            except (RuntimeError, torch.OutOfMemoryError) as err:  # one backend failing must not lose the others
                logger.exception("%s batch %d failed", backend, batch)
                rows.append(Row(backend=backend, batch=batch, skipped=f"failed: {type(err).__name__}: {err}"[:300]))
                gen.release()
                continue
            row.backend, row.build_s, row.weights_gib = backend, build_s, weights / 2**30
            row.attention = "decode" if gen.decode_attention else "model"
            if plan.device.type == "cuda":
                row.peak_gib = torch.cuda.max_memory_allocated(plan.device) / 2**30
            logger.info("%s batch %d: %.1f tok/s decode, %.2f ms/step", backend, batch, row.decode_tok_s, row.step_ms)
            rows.append(row)
            gen.release()
            if on_rows is not None:
                on_rows(rows)
        del gen, model
        _free()
    if on_rows is not None:
        on_rows(rows)
    return rows


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if not (math.isnan(a) or math.isnan(b)) and b > 0 else "-"


def format_table(rows: list[Row], gpu: str) -> str:
    base = {(r.backend, r.batch): r.decode_tok_s for r in rows}
    header = (f"{'backend':<10} {'batch':>5} {'decode tok/s':>12} {'ms/step':>8} {'prefill tok/s':>13} "
              f"{'TTFT ms':>8} {'peak GiB':>8} {'compile s':>9} {'vs fp16':>8} {'vs aqlm-2x8':>11}")
    lines = [f"decode benchmark on {gpu}", header, "-" * len(header)]
    for r in rows:
        if r.skipped:
            lines.append(f"{r.backend:<10} {r.batch:>5}  skipped: {r.skipped}")
            continue
        fp16 = base.get((FP16, r.batch), float("nan"))
        aqlm = base.get(("aqlm-2x8", r.batch), float("nan"))
        lines.append(
            f"{r.backend:<10} {r.batch:>5} {r.decode_tok_s:>12.1f} {r.step_ms:>8.3f} {r.prefill_tok_s:>13.0f} "
            f"{r.ttft_ms:>8.1f} {r.peak_gib:>8.2f} {r.compile_s:>9.1f} {_ratio(r.decode_tok_s, fp16):>8} "
            f"{_ratio(r.decode_tok_s, aqlm):>11}"
        )
    hf = [r for r in rows if not math.isnan(r.hf_generate_tok_s)]
    for r in hf:
        lines.append(f"{r.backend} batch {r.batch}: lean loop {r.e2e_tok_s:.1f} tok/s end to end vs "
                     f"transformers generate {r.hf_generate_tok_s:.1f} tok/s")
    return "\n".join(lines)


def _json_row(row: Row) -> dict:
    """Row fields with NaN (not measured) written as null, so the file is strict JSON."""
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in dataclasses.asdict(row).items()}


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"


def run(args: argparse.Namespace) -> int:
    plan = make_plan(args)
    gpu = device_description(plan.device)
    save = functools.partial(write_json, args.json, args, plan, gpu) if args.json else None
    rows = run_plan(plan, warmup=args.warmup_steps, compile=args.compile, hf_generate=args.hf_generate,
                    seed=args.seed, profile=args.profile, decode_attention=args.decode_attention, on_rows=save)
    for row in rows:
        if row.profile:
            print(format_profile(row.backend, row.batch, row.profile))
    print(format_table(rows, gpu))
    return 0


def write_json(path: str, args: argparse.Namespace, plan: Plan, gpu: str, rows: list[Row]) -> None:
    """The run's settings, versions, GPU, date and every row, as strict JSON."""
    import transformers

    payload = {
        "benchmark": "decode",
        "gpu": gpu,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "arch": args.arch,
        "num_layers": plan.hf_config.num_hidden_layers,
        "config": plan.config.name,
        "prompt": plan.prompt,
        "tokens": plan.tokens,
        "cache_len": plan.cache_len,
        "dtype": args.dtype,
        "rows": [_json_row(r) for r in rows],
    }
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=2)
