"""`codegemm quantize [MODEL]`: quantize a causal LM to a CodeGEMM checkpoint.

MODEL is a Hugging Face directory, a .gguf file, a hub id (online), or left
out for the embedded Gemma 3 270M. Calibration defaults to English text that
ships with Python (the language reference in ``pydoc_data``), so the command
works offline; ``--data FILE`` uses your own text (better: text like what the
model will see). Perplexity is measured before and after on held-out text
(``--ppl``), and the output directory gets the checkpoint, tokenizer,
generation config, a model card and ``quant_report.json``. A killed run
continues with ``--resume``; a non-empty ``--out`` is refused without it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from codegemm.errors import CheckpointError, ConfigError

logger = logging.getLogger("codegemm.quantize")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "quantize",
        help="quantize a Hugging Face causal LM to a CodeGEMM checkpoint",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", nargs="?", default=None,
                        help="HF directory, .gguf file or hub id (default: embedded Gemma 3 270M)")
    parser.add_argument("--config", default="m2v8g128",
                        help="codebook config, e.g. m2v8g128 (default), m1v4g128; RTN: m1b4v1g128")
    parser.add_argument("--method", choices=["aq", "rtn"], default="aq",
                        help="aq: additive codebooks (default); rtn: round-to-nearest baseline (config m1b<bits>v1g<g>)")
    parser.add_argument("--out", default=None, help="output directory (default: ./<model>-<config>)")
    parser.add_argument("--data", default=None,
                        help="calibration: text file, 'wikitext2' or 'c4' (online), default: offline Python docs")
    parser.add_argument("--nsamples", type=int, default=None, help="calibration sequences (preset default)")
    parser.add_argument("--seqlen", type=int, default=None, help="calibration sequence length (preset default)")
    parser.add_argument("--preset", choices=["fast", "best"], default="fast", help="speed/quality (default fast)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every random choice (default 0)")
    parser.add_argument("--skip", action="append", default=[],
                        help="module name or 're:REGEX' to keep dense (repeatable); lm_head always stays dense")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="model dtype while quantizing, and of the checkpoint's dense parts unless --save-dtype "
                             "(default float32)")
    parser.add_argument("--save-dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="dtype of the checkpoint's dense parts (embeddings, lm_head, norms; default: --dtype); "
                             "bfloat16 halves them after quantizing in float32")
    parser.add_argument("--quant-dtype", default="float16", choices=["float16", "bfloat16", "float32"],
                        help="dtype of the stored codebooks and scales (default float16, what the GPU kernels read)")
    parser.add_argument("--resume", action="store_true", help="continue a killed run in --out")
    parser.add_argument("--ppl", default="offline",
                        help="perplexity text before/after: file, 'wikitext2', 'offline' (default) or 'none'")
    parser.add_argument("--ppl-seqlen", type=int, default=2048, help="perplexity chunk length (default 2048)")
    parser.add_argument("--max-chunks", type=int, default=4, help="perplexity chunks (default 4; 0 = all)")
    parser.add_argument("--finetune-epochs", type=int, default=None, help="block fine-tuning epochs (preset)")
    parser.add_argument("--beam-size", type=int, default=None, help="beam width of the code search (preset)")
    parser.add_argument("--max-rounds", type=int, default=None, help="search/Adam rounds per layer (preset)")
    parser.add_argument("--finetune-teacher", type=float, default=None,
                        help="block fine-tuning target: 0 = original block's outputs, 1 = unquantized model's (preset)")
    parser.add_argument("--global-epochs", type=int, default=None,
                        help="end-to-end fine-tuning epochs on KL to the original model (preset)")
    parser.add_argument("--global-lr", type=float, default=None, help="Adam learning rate of global fine-tuning (preset)")
    parser.set_defaults(func=run)


def _default_out(model: str | None, config: str) -> str:
    from codegemm.loading import DEFAULT_MODEL

    base = os.path.basename(os.path.normpath(model)) if model else DEFAULT_MODEL
    base = re.sub(r"\.gguf$", "", base)
    return f"{re.sub(r'[^A-Za-z0-9_.-]+', '-', base)}-{config}"


def _is_complete(out: Path) -> bool:
    from codegemm.quant.state import PARTIAL_DIR

    return (out / "config.json").is_file() and not (out / PARTIAL_DIR).exists()


def check_out_dir(out: Path, resume: bool) -> None:
    """Refuse to write into a non-empty directory unless resuming one of our runs."""
    from codegemm.quant.state import PARTIAL_DIR

    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {str(out)!r} exists and is not a directory")
    if not resume and out.exists() and any(out.iterdir()):
        raise ConfigError(f"--out {str(out)!r} is not empty; pass --resume to continue a run there, or choose a new --out")
    if resume and out.exists() and any(out.iterdir()) and not (out / PARTIAL_DIR).exists() and not _is_complete(out):
        raise ConfigError(f"--resume: {str(out)!r} holds no codegemm run to continue")


def model_card(source: str, config: str, method: str, preset: str, bits: float,
               ppl: dict[str, Any], data: str, nsamples: int, seqlen: int, seed: int) -> str:
    """README.md of the checkpoint: what it is, how it was made, how good it is."""
    rows = []
    for key, label in (("before", "original (dequantized to the working dtype)"), ("after", "this checkpoint")):
        if key in ppl:
            rows.append(f"| {label} | {ppl[key]['perplexity']:.3f} |")
    ppl_text = "\n".join(["| model | perplexity |", "|---|---|", *rows]) if rows else "not measured (--ppl none)"
    where = _describe_data(ppl["data"], held_out=True) if "data" in ppl else "-"
    return f"""---
library_name: codegemm
base_model: {source}
tags: [codegemm, quantized, additive-quantization]
---
# {os.path.basename(source.rstrip('/'))} quantized with CodeGEMM ({config})

- **Base model**: `{source}`
- **Format**: CodeGEMM additive codebooks `{config}` (method `{method}`, preset `{preset}`), {bits:.3f} bits per
  quantized weight (codes, fp16 scales and codebooks); `lm_head` and embeddings stay dense.
- **Calibration**: {data}, {nsamples} sequences of {seqlen} tokens, seed {seed}.

## Perplexity

Measured on {where} (non-overlapping chunks of {ppl.get('seqlen', '-')} tokens, first {ppl.get('chunks', '-')} chunks):

{ppl_text}

## Use

```python
import codegemm  # registers the format with transformers
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("path/to/this/dir")
tokenizer = AutoTokenizer.from_pretrained("path/to/this/dir")
```

or `codegemm generate path/to/this/dir "Once upon a time"`.
"""


def _describe_data(data: str | None, held_out: bool = False) -> str:
    if data is None or str(data).lower() in ("offline", "pydoc"):
        part = "held-out part of " if held_out else ""
        return f"the {part}Python language reference shipped with CPython (`pydoc_data.topics`, offline default)"
    return f"`{data}`"


def _ppl(loaded, tokens, args) -> dict[str, Any]:
    from codegemm.eval import perplexity

    result = perplexity(loaded.model, tokens, args.ppl_seqlen, args.max_chunks or None, progress=True)
    return result.to_dict()


def run(args: argparse.Namespace) -> int:
    from codegemm.config import as_config
    from codegemm.data import calibration_samples, eval_tokens
    from codegemm.loading import check_seqlen, load_model
    from codegemm.quant import PRESET_DATA, make_options, quantize
    from codegemm.quant.driver import cast_dense, cast_quantized, validate
    from codegemm.quant.state import PARTIAL_DIR, atomic_write_json, atomic_write_text, move_into

    config = as_config(args.config)
    out = Path(args.out or _default_out(args.model, config.name))
    check_out_dir(out, args.resume)
    if args.resume and _is_complete(out):
        print(f"{out} already holds a finished checkpoint; nothing to do")
        return 0
    overrides = dict(method=args.method, seed=args.seed, skip=tuple(args.skip), finetune_epochs=args.finetune_epochs,
                     beam_size=args.beam_size, max_rounds=args.max_rounds, global_epochs=args.global_epochs,
                     finetune_teacher=args.finetune_teacher,
                     global_lr=args.global_lr)
    options = make_options(args.preset, **overrides)
    if args.method == "rtn":
        from codegemm.quant.rtn import check_rtn_config

        check_rtn_config(config)
    nsamples = args.nsamples or PRESET_DATA[args.preset]["nsamples"]
    seqlen = args.seqlen or PRESET_DATA[args.preset]["seqlen"]
    if nsamples < 1:
        raise ConfigError(f"--nsamples must be >= 1; got {nsamples}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda needs a CUDA GPU; none is visible (use --device cpu)")

    loaded = load_model(args.model, dtype=getattr(torch, args.dtype), device=device)
    model = loaded.model
    # Every check that can fail runs here, before any long work.
    check_seqlen(model, seqlen, "--seqlen")
    validate(model, config, options)
    bos = getattr(loaded.tokenizer, "bos_token_id", None)
    samples = calibration_samples(args.data, loaded.tokenizer, nsamples, seqlen, seed=args.seed, bos_token_id=bos)
    ppl_tokens = None
    if args.ppl.lower() != "none":
        check_seqlen(model, args.ppl_seqlen, "--ppl-seqlen")
        ppl_tokens = eval_tokens(args.ppl, loaded.tokenizer)
        if ppl_tokens.numel() < args.ppl_seqlen:
            raise ConfigError(f"--ppl text has {ppl_tokens.numel()} tokens, fewer than --ppl-seqlen={args.ppl_seqlen}")

    out.mkdir(parents=True, exist_ok=True)
    partial = out / PARTIAL_DIR
    partial.mkdir(exist_ok=True)
    ppl: dict[str, Any] = {}
    before_file = partial / "ppl-before.json"
    if ppl_tokens is not None:
        ppl.update(data=args.ppl, seqlen=args.ppl_seqlen)
        if before_file.is_file():
            ppl["before"] = json.loads(before_file.read_text())
        else:
            logger.info("perplexity of the original model")
            ppl["before"] = _ppl(loaded, ppl_tokens, args)
            atomic_write_json(before_file, ppl["before"])
        ppl["chunks"] = ppl["before"]["chunks"]
        print(f"perplexity before: {ppl['before']['perplexity']:.3f}")

    fingerprint = {"model": loaded.source, "dtype": args.dtype, "data": str(args.data)}
    report = quantize(model, config, samples, tokenizer=loaded.tokenizer, nsamples=nsamples, seqlen=seqlen,
                      options=options, state_dir=out, fingerprint=fingerprint, progress=True)
    print(report.table())
    # Cast before measuring, so the perplexity printed is the stored checkpoint's.
    cast_quantized(model, getattr(torch, args.quant_dtype))
    if args.save_dtype is not None and args.save_dtype != args.dtype:
        cast_dense(model, getattr(torch, args.save_dtype))
    if ppl_tokens is not None:
        logger.info("perplexity of the quantized model")
        ppl["after"] = _ppl(loaded, ppl_tokens, args)
        print(f"perplexity before: {ppl['before']['perplexity']:.3f}  after: {ppl['after']['perplexity']:.3f}")

    save_dir = partial / "save"
    if save_dir.exists():
        shutil.rmtree(save_dir)
    from codegemm.hf import save_quantized

    save_quantized(model, save_dir)
    if loaded.tokenizer is not None:
        loaded.tokenizer.save_pretrained(str(save_dir))
    if loaded.generation_config is not None:
        loaded.generation_config.save_pretrained(str(save_dir))
    card = model_card(loaded.source, config.name, args.method, args.preset, report.bits_per_weight, ppl,
                      _describe_data(args.data), nsamples, seqlen, args.seed)
    atomic_write_text(save_dir / "README.md", card)
    atomic_write_json(save_dir / "quant_report.json", {**report.to_dict(), "perplexity": ppl})
    # config.json last: until it lands, the directory is not a loadable checkpoint.
    move_into(save_dir, out, last=("config.json",))
    shutil.rmtree(partial)
    print(f"wrote {out}")
    return 0
