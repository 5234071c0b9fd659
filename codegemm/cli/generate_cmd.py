"""`codegemm generate [MODEL] PROMPT`: stream a continuation of PROMPT to the terminal.

MODEL is a model directory (a CodeGEMM checkpoint from ``codegemm quantize``, or
any transformers causal LM), a ``.gguf`` file, or left out for the embedded
Gemma 3 270M. Text goes to stdout as it is generated; timings go to stderr.
"""

from __future__ import annotations

import argparse
import sys

import torch

from codegemm.errors import ConfigError


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "generate",
        usage="codegemm generate [options] [MODEL] PROMPT",
        help="stream generated text from a (quantized) model",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("inputs", nargs="+", metavar="[MODEL] PROMPT",
                        help="optional model directory or .gguf file (default: embedded Gemma 3 270M), then the prompt")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate at most (default 128)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    parser.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = all)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (1.0 = off)")
    parser.add_argument("--seed", type=int, default=None, help="seed for sampling (default: unseeded)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--dtype", default=None, choices=["float16", "bfloat16", "float32"],
                        help="activation dtype (default: bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="compile the decode step and replay it as a CUDA graph (default: on for CUDA)")
    parser.add_argument("--ignore-eos", action="store_true", help="keep going past end-of-sequence tokens")
    parser.set_defaults(func=run)


def _stop_tokens(loaded) -> list[int]:
    ids: list[int] = []
    for source in (loaded.generation_config, getattr(loaded.model, "generation_config", None), loaded.tokenizer):
        value = getattr(source, "eos_token_id", None)
        for token in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(token, int) and token not in ids:
                ids.append(token)
    return ids


def run(args: argparse.Namespace) -> int:
    from transformers import TextStreamer

    from codegemm.generation import FastGenerator, SamplingParams
    from codegemm.loading import load_model

    if len(args.inputs) > 2:
        raise ConfigError(f"generate takes [MODEL] PROMPT (quote the prompt); got {len(args.inputs)} arguments")
    model_name, prompt = (None, args.inputs[0]) if len(args.inputs) == 1 else args.inputs
    if not prompt:
        raise ConfigError("PROMPT must be a non-empty string")
    sampling = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be >= 1; got {args.max_new_tokens}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda needs a CUDA GPU; none is visible (use --device cpu)")
    dtype_name = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    dtype = getattr(torch, dtype_name)

    loaded = load_model(model_name, dtype=dtype, device=device)
    tokenizer = loaded.tokenizer
    input_ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
    compile_step = args.compile
    generator = FastGenerator(loaded.model, max_batch_size=1, compile=compile_step,
                              cuda_graph=compile_step if device.type == "cuda" else False)
    generator.check_request(input_ids, args.max_new_tokens)  # before any cache is allocated
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    out = generator.generate(
        input_ids,
        args.max_new_tokens,
        sampling,
        stop_token_ids=None if args.ignore_eos else _stop_tokens(loaded),
        streamer=streamer,
        timings=True,
    )
    new = out.new_tokens.shape[1]
    decode_s = sum(out.step_s)
    rate = f"{(new - 1) / decode_s:.1f} tok/s decode" if decode_s > 0 else "no decode steps"
    print(
        f"[{loaded.source} on {device}: {new} tokens, {rate}, first token after "
        f"{out.time_to_first_token_s * 1e3:.0f} ms, compile+capture {out.setup_s:.1f} s]",
        file=sys.stderr,
    )
    return 0
