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
) -> float:
    """Adam on the block's relative output MSE; returns the mean loss of the first epoch.

    ``inputs``/``targets``: ``[n, T, D]``. The caller measures the loss after
    training in the pass that feeds the next block, so no extra pass is spent
    here.
    """
    params = trainable_parameters(block)
    scale = float(targets.float().pow(2).mean().clamp_min(1e-30))
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    first_epoch: list[float] = []
    try:
        for epoch in range(epochs):
            order = torch.randperm(inputs.shape[0], generator=generator).tolist()
            for first in range(0, len(order), batch):
                rows = order[first : first + batch]
                opt.zero_grad(set_to_none=True)
                loss = 0.0
                for row in rows:
                    out = run_block(block, inputs[row : row + 1], calls, index)
                    loss = loss + (out.float() - targets[row : row + 1].float()).pow(2).mean() / scale
                loss = loss / len(rows)
                loss.backward()
                opt.step()
                if epoch == 0:
                    first_epoch.append(float(loss.detach()))
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
    return sum(first_epoch) / max(1, len(first_epoch))
