"""Decoder blocks: finding them, catching their inputs, running them one at a time."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from codegemm.errors import ConfigError

_BLOCK_PATHS = ("model.layers", "model.decoder.layers", "transformer.h", "gpt_neox.layers", "layers", "model.model.layers")


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """``(dotted prefix, ModuleList)`` of the decoder blocks (the longest list holding linears as fallback)."""
    for path in _BLOCK_PATHS:
        try:
            found = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(found, nn.ModuleList) and len(found):
            return path, found
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) and any(
            isinstance(m, nn.Linear) for m in module[0].modules()
        ):
            if best is None or len(module) > len(best[1]):
                best = (name, module)
    if best is None:
        raise ConfigError(f"cannot find the decoder blocks of {type(model).__name__} (no ModuleList of linears)")
    return best


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the wanted inputs are caught."""


@dataclasses.dataclass
class BlockCall:
    """The non-hidden arguments of each block's call (masks, rotary embeddings, positions)."""

    args: list[tuple[Any, ...]]
    kwargs: list[dict[str, Any]]


def _strip_cache(kwargs: dict[str, Any]) -> dict[str, Any]:
    out = dict(kwargs)
    for key in ("past_key_value", "past_key_values"):
        if key in out:
            out[key] = None
    out["use_cache"] = False
    return out


@torch.no_grad()
def capture_inputs(
    model: nn.Module, blocks: nn.ModuleList, samples: torch.Tensor, need_hidden: bool = True
) -> tuple[torch.Tensor | None, BlockCall]:
    """Hidden states entering block 0 for every sample ``[n, T, D]``, and every block's other arguments.

    The other arguments (attention masks, position embeddings) depend only on
    the sequence length, so they are caught once from the first sample.
    """
    device = next(model.parameters()).device
    calls = BlockCall(args=[()] * len(blocks), kwargs=[{}] * len(blocks))
    hidden: list[torch.Tensor] = []
    first = [True]

    def make_hook(index: int):
        def hook(module, args, kwargs):
            if first[0]:
                calls.args[index] = tuple(args[1:])
                calls.kwargs[index] = _strip_cache(kwargs)
            if index == 0 and need_hidden:
                hs = args[0] if args else kwargs["hidden_states"]
                hidden.append(hs.detach().clone())
            # Later samples only need block 0's input; the first stops before the last block runs.
            if (index == 0 and not first[0]) or index == len(blocks) - 1:
                raise _Stop
            return None

        return hook

    handles = [b.register_forward_pre_hook(make_hook(i), with_kwargs=True) for i, b in enumerate(blocks)]
    try:
        for row in range(samples.shape[0] if need_hidden else 1):
            try:
                model(samples[row : row + 1].to(device), use_cache=False)
            except _Stop:
                pass
            first[0] = False
    finally:
        for handle in handles:
            handle.remove()
    for kwargs in calls.kwargs:
        kwargs.pop("hidden_states", None)
    return (torch.cat(hidden, 0) if need_hidden else None), calls


def run_block(block: nn.Module, hidden: torch.Tensor, calls: BlockCall, index: int) -> torch.Tensor:
    """``block(hidden)`` for one sample ``[1, T, D]`` with its caught arguments."""
    out = block(hidden, *calls.args[index], **calls.kwargs[index])
    return out[0] if isinstance(out, (tuple, list)) else out
