"""`codegemm info DIR`: what a CodeGEMM checkpoint holds, read from its headers only.

Nothing is loaded but ``config.json`` and the safetensors headers, so this
is instant even for 70B checkpoints. The library computes
(:func:`checkpoint_summary`); this module prints.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
from pathlib import Path
from typing import Any

from codegemm.config import CodebookConfig
from codegemm.errors import CheckpointError
from codegemm.hf.checkpoint import checkpoint_files, read_headers, read_quantization_config

_BYTES_PER_ELEMENT = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class LayerInfo:
    name: str
    in_features: int
    out_features: int
    config: str
    bits_per_weight: float


@dataclasses.dataclass(frozen=True)
class CheckpointSummary:
    config: CodebookConfig
    format_version: int
    modules_not_quantized: list[str]
    layers: list[LayerInfo]
    quantized_weights: int
    quantized_bits: int
    """Exact storage of the quantized layers: codes at ``nbits`` each, fp16 scales and codebooks."""
    disk_bytes: int
    fp16_bytes: int
    """Size of the same model with every weight in fp16 (quantized layers as dense ``N x K``)."""
    dense_bytes: dict[str, int] = dataclasses.field(default_factory=dict)
    """Bytes of the tensors outside the quantized layers (embeddings, norms, ``lm_head``), by safetensors dtype."""

    @property
    def bits_per_weight(self) -> float:
        return self.quantized_bits / self.quantized_weights if self.quantized_weights else math.nan

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config.name,
            "format_version": self.format_version,
            **self.config.to_dict(),
            "modules_not_quantized": self.modules_not_quantized,
            "quantized_layers": len(self.layers),
            "quantized_weights": self.quantized_weights,
            "bits_per_weight": self.bits_per_weight,
            "disk_bytes": self.disk_bytes,
            "fp16_bytes": self.fp16_bytes,
            "dense_bytes": self.dense_bytes,
            "layers": [dataclasses.asdict(layer) for layer in self.layers],
        }


def _natural_key(name: str) -> list[Any]:
    """Sort ``layers.2`` before ``layers.10`` (safetensors headers are sorted as strings)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def checkpoint_summary(directory: str | Path) -> CheckpointSummary:
    """Config, per-layer shapes and bits, and sizes of the checkpoint in ``directory``."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"DIR must be a checkpoint directory; {directory} is not a directory")
    quant = read_quantization_config(directory)
    config = quant.codebook_config
    files = checkpoint_files(directory)
    tensors = read_headers(files)
    layers: list[LayerInfo] = []
    quantized_bits = 0
    fp16_elements = 0
    dense_bytes: dict[str, int] = {}
    quantized = {key[: -len(".codes")] for key in tensors if key.endswith(".codes")}
    for key, (dtype, shape) in sorted(tensors.items(), key=lambda item: _natural_key(item[0])):
        if key.endswith(".codes"):
            if len(shape) != 3 or shape[2] != config.num_codebooks:
                raise CheckpointError(
                    f"tensor {key} must have shape (out_features, in_features // {config.vec_len}, "
                    f"{config.num_codebooks}); got {shape}"
                )
            n, k = shape[0], shape[1] * config.vec_len
            bits = config.bits_per_weight(n, k)
            layers.append(LayerInfo(key[: -len(".codes")], k, n, config.name, bits))
            quantized_bits += round(bits * n * k)
            fp16_elements += n * k
        elif not key.endswith((".codebooks", ".scales")):
            fp16_elements += math.prod(shape)
            if key.rpartition(".")[0] not in quantized:  # a quantized layer's bias is part of the layer
                dense_bytes[dtype] = dense_bytes.get(dtype, 0) + math.prod(shape) * _BYTES_PER_ELEMENT.get(dtype, 0)
    if not layers:
        raise CheckpointError(f"{directory} declares quant_method codegemm but stores no '<module>.codes' tensors")
    return CheckpointSummary(
        config=config,
        format_version=quant.format_version,
        modules_not_quantized=list(quant.modules_not_quantized),
        layers=layers,
        quantized_weights=sum(layer.in_features * layer.out_features for layer in layers),
        quantized_bits=quantized_bits,
        disk_bytes=sum(path.stat().st_size for path in files),
        fp16_bytes=2 * fp16_elements,
        dense_bytes=dense_bytes,
    )


def _human(num_bytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if num_bytes < 1024 or unit == "TiB":
            return f"{num_bytes:.1f} {unit}" if unit != "B" else f"{int(num_bytes)} B"
        num_bytes /= 1024
    raise AssertionError("unreachable")


def format_summary(summary: CheckpointSummary, show_layers: bool = True) -> str:
    c = summary.config
    group = "per-row" if c.group_size is None else str(c.group_size)
    lines = [
        f"config:            {c.name} (num_codebooks={c.num_codebooks}, nbits={c.nbits}, vec_len={c.vec_len}, "
        f"group_size={group}); format_version {summary.format_version}",
        f"quantized layers:  {len(summary.layers)} ({summary.quantized_weights:,} weights)",
        f"bits per weight:   {summary.bits_per_weight:.4f} (codes + fp16 scales + fp16 codebooks, "
        "quantized layers only)",
        f"size on disk:      {_human(summary.disk_bytes)} vs {_human(summary.fp16_bytes)} for an fp16 copy "
        f"({100 * summary.disk_bytes / summary.fp16_bytes:.1f}% of it)",
        f"kept dense:        {', '.join(summary.modules_not_quantized) or '(none)'}",
    ]
    if summary.dense_bytes:
        parts = ", ".join(f"{_human(size)} {dtype}" for dtype, size in sorted(summary.dense_bytes.items()))
        hint = " (codegemm quantize --save-dtype bfloat16 halves the F32 part)" if "F32" in summary.dense_bytes else ""
        lines.append(f"dense tensors:     {parts}{hint}")
    if show_layers:
        width = max(len("layer"), *(len(layer.name) for layer in summary.layers))
        lines += ["", f"{'layer':<{width}}  {'K':>7}  {'N':>7}  {'config':<12}  {'bits/weight':>11}"]
        for layer in summary.layers:
            lines.append(
                f"{layer.name:<{width}}  {layer.in_features:>7}  {layer.out_features:>7}  "
                f"{layer.config:<12}  {layer.bits_per_weight:>11.4f}"
            )
    return "\n".join(lines)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "info",
        help="show a CodeGEMM checkpoint's config, bits per weight, size and layers",
        description=(
            "Print a CodeGEMM checkpoint's quantization config, its exact bits per weight over the quantized "
            "layers (codes at nbits each, fp16 scales and codebooks), its size on disk against an fp16 copy "
            "of the same model, and one row per quantized layer (name, K = in_features, N = out_features, "
            "config, bits/weight). Reads only config.json and the safetensors headers."
        ),
    )
    parser.add_argument("directory", metavar="DIR", help="checkpoint directory written by save_pretrained")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON instead of a table")
    parser.add_argument("--no-layers", action="store_true", help="leave out the per-layer table")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    summary = checkpoint_summary(args.directory)
    if args.json:
        data = summary.to_dict()
        if args.no_layers:
            data.pop("layers")
        print(json.dumps(data, indent=2))
    else:
        print(format_summary(summary, show_layers=not args.no_layers))
    return 0
