"""`codegemm eval [MODEL]`: perplexity (and lm-eval tasks) of a quantized or original model.

Perplexity follows the papers' WikiText-2 protocol: the whole text is
tokenized once and scored in non-overlapping chunks of ``--seqlen`` tokens.
MODEL is a CodeGEMM checkpoint, any HF directory, a .gguf file, or left out
for the embedded Gemma 3 270M (unquantized, for comparison). ``--tasks``
runs lm-eval-harness in process when it is installed; offline, give
``--tasks-include DIR`` with task YAMLs that read local data files and set
``HF_DATASETS_OFFLINE=1``.
"""

from __future__ import annotations

import argparse
import json
import logging

import torch

from codegemm.errors import ConfigError

logger = logging.getLogger("codegemm.eval")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="perplexity / lm-eval tasks of a (quantized) model",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", nargs="?", default=None,
                        help="checkpoint directory, HF directory, .gguf file (default: embedded Gemma 3 270M)")
    parser.add_argument("--ppl", default="offline",
                        help="text file, 'wikitext2' (online), 'offline' (default: held-out Python docs) or 'none'")
    parser.add_argument("--seqlen", type=int, default=2048, help="chunk length (default 2048)")
    parser.add_argument("--max-chunks", type=int, default=0, help="score only the first N chunks (0 = all)")
    parser.add_argument("--tasks", default=None, help="comma-separated lm-eval tasks, e.g. arc_easy,hellaswag")
    parser.add_argument("--tasks-include", default=None, help="directory of extra lm-eval task YAMLs (offline data)")
    parser.add_argument("--limit", type=float, default=None, help="lm-eval: examples per task (or fraction)")
    parser.add_argument("--batch-size", type=int, default=1, help="lm-eval batch size (default 1)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="activation dtype (default float32)")
    parser.add_argument("--json", action="store_true", help="print results as JSON")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from codegemm.data import eval_tokens
    from codegemm.eval import perplexity, run_tasks
    from codegemm.loading import check_seqlen, load_model

    if args.ppl.lower() == "none" and not args.tasks:
        raise ConfigError("nothing to do: --ppl none and no --tasks")
    if args.max_chunks < 0:
        raise ConfigError(f"--max-chunks must be >= 0; got {args.max_chunks}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda needs a CUDA GPU; none is visible (use --device cpu)")
    loaded = load_model(args.model, dtype=getattr(torch, args.dtype), device=device)
    results: dict = {"model": loaded.source}
    if args.ppl.lower() != "none":
        check_seqlen(loaded.model, args.seqlen, "--seqlen")
        tokens = eval_tokens(args.ppl, loaded.tokenizer)
        res = perplexity(loaded.model, tokens, args.seqlen, args.max_chunks or None, progress=not args.json)
        results["perplexity"] = {**res.to_dict(), "data": args.ppl}
        if not args.json:
            print(f"perplexity {res.perplexity:.3f} ({args.ppl}, {res.chunks} chunks of {res.seqlen} tokens, "
                  f"{res.seconds:.0f} s)")
    if args.tasks:
        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
        limit = None if args.limit is None else (int(args.limit) if args.limit >= 1 else args.limit)
        scores = run_tasks(loaded.model, loaded.tokenizer, tasks, batch_size=args.batch_size, limit=limit,
                           include_path=args.tasks_include)
        results["tasks"] = scores
        if not args.json:
            for task, metrics in scores.items():
                shown = ", ".join(f"{k}={v:.4f}" for k, v in metrics.items())
                print(f"{task}: {shown}")
    if args.json:
        print(json.dumps(results, indent=2))
    return 0
