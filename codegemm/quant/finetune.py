"""Block fine-tuning: train codebooks, scales and norms to match the original block's outputs."""

from __future__ import annotations

import logging

import torch
from torch import nn

from codegemm.nn import CodeGEMMLinear
from codegemm.quant.capture import BlockCall, run_block

logger = logging.getLogger(__name__)


def trainable_parameters(block: nn.Module) -> list[nn.Parameter]:
    """Codebooks and scales of quantized layers plus the block's other float parameters (norms, biases).

    Dense ``nn.Linear`` weights that the skip list kept are left alone: they
    were not quantized, so there is nothing to repair in them.
    """
    params: list[nn.Parameter] = []
    dense_weights = {id(m.weight) for m in block.modules() if isinstance(m, nn.Linear)}
    for module in block.modules():
        if isinstance(module, CodeGEMMLinear):
            params += [module.codebooks, module.scales]
            if module.bias is not None:
                params.append(module.bias)
    seen = {id(p) for p in params}
    for param in block.parameters():
        if id(param) not in seen and id(param) not in dense_weights and param.dtype.is_floating_point:
            params.append(param)
            seen.add(id(param))
    return params


def finetune_block(
    block: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    calls: BlockCall,
    index: int,
    epochs: int,
    lr: float,
    batch: int,
    generator: torch.Generator,
) -> tuple[float, float]:
    """Adam on the block's relative output MSE; returns (loss before, loss after) on all samples.

    ``inputs``/``targets``: ``[n, T, D]``. The parameters end as they were
    after the last step only if that beat the starting loss; otherwise the
    starting values are restored (fine-tuning never makes a block worse on
    its calibration set).
    """
    params = trainable_parameters(block)
    start = [p.detach().clone() for p in params]
    scale = float(targets.float().pow(2).mean().clamp_min(1e-30))

    def full_loss() -> float:
        with torch.no_grad():
            total = 0.0
            for row in range(inputs.shape[0]):
                out = run_block(block, inputs[row : row + 1], calls, index)
                total += float((out.float() - targets[row : row + 1].float()).pow(2).mean())
            return total / inputs.shape[0] / scale

    before = full_loss()
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    try:
        for _ in range(epochs):
            order = torch.randperm(inputs.shape[0], generator=generator).tolist()
            for first in range(0, len(order), batch):
                rows = order[first : first + batch]
                opt.zero_grad(set_to_none=True)
                loss = 0.0
                for row in rows:
                    out = run_block(block, inputs[row : row + 1], calls, index)
                    loss = loss + (out.float() - targets[row : row + 1].float()).pow(2).mean() / scale
                (loss / len(rows)).backward()
                opt.step()
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
    after = full_loss()
    if not after < before:
        with torch.no_grad():
            for p, value in zip(params, start):
                p.copy_(value)
        after = before
    logger.debug("block %d fine-tune: relative MSE %.5f -> %.5f", index, before, after)
    return before, after
