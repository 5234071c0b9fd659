"""Global (end-to-end) fine-tuning: the whole quantized model against the original model's next-token distributions.

Block-by-block quantization leaves errors that compound through the depth of
the network; AQLM's global step repairs them by training every continuous
parameter (codebooks, scales, norms; never codes, embeddings or ``lm_head``)
to minimise ``KL(teacher || student)`` of the next-token distributions on the
calibration windows.

Teacher logits are never stored (``[n, T, vocab]`` is gigabytes for a 262k
vocabulary): :func:`record_teacher` keeps the original model's final hidden
states (the input of ``lm_head``, ``[n, T, D]``) and the logits are recomputed
on the fly with the frozen, still dense ``lm_head``, ``row_chunk`` tokens at a
time. After each epoch the trained tensors and Adam's moments can be saved, so
a killed run resumes bit for bit (see :mod:`codegemm.quant.state`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch
from torch import nn

from codegemm.errors import ConfigError
from codegemm.quant.finetune import trainable_parameters

logger = logging.getLogger(__name__)

ROW_CHUNK = 256
"""Tokens whose logits exist at once: with a 262k vocabulary one chunk of teacher + student logits is ~0.5 GB."""


def split_model(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """``(decoder, lm_head)`` of an HF causal LM; the global step needs the final hidden states separately."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    body = model.get_decoder() if hasattr(model, "get_decoder") else None
    if head is None or body is None or body is model:
        raise ConfigError(
            f"global fine-tuning needs a causal LM with get_decoder() and get_output_embeddings(); "
            f"{type(model).__name__} has {'no lm_head' if head is None else 'no separate decoder'} "
            "(set global_epochs=0)"
        )
    return body, head


def _softcap(model: nn.Module) -> float | None:
    return getattr(getattr(model, "config", None), "final_logit_softcapping", None) or None


@torch.no_grad()
def record_teacher(model: nn.Module, samples: torch.Tensor) -> torch.Tensor:
    """Final hidden states ``[n, T, D]`` (model dtype, CPU) of the unquantized model on ``samples [n, T]``."""
    body, _ = split_model(model)
    device = next(model.parameters()).device
    out = []
    for row in range(samples.shape[0]):
        hidden = body(input_ids=samples[row : row + 1].to(device), use_cache=False)[0]
        out.append(hidden.detach().cpu())
    return torch.cat(out, 0)


def global_parameters(model: nn.Module, blocks: nn.ModuleList) -> list[nn.Parameter]:
    """Trainable tensors in a fixed order: each block's (codebooks, scales, norms, biases), then the final norm.

    Embeddings and ``lm_head`` (often tied) stay frozen: they are dense and
    hold most of a small model's parameters.
    """
    params: list[nn.Parameter] = []
    seen: set[int] = set()
    for block in blocks:
        for p in trainable_parameters(block):
            if id(p) not in seen:
                params.append(p)
                seen.add(id(p))
    frozen = set()
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        module = getattr(model, getter)() if hasattr(model, getter) else None
        if module is not None:
            frozen |= {id(p) for p in module.parameters()}
    dense_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    body, _ = split_model(model)
    for p in body.parameters():
        if id(p) in seen or id(p) in frozen or id(p) in dense_weights or not p.dtype.is_floating_point:
            continue
        params.append(p)
        seen.add(id(p))
    return params


def _logits(head: nn.Module, hidden: torch.Tensor, softcap: float | None) -> torch.Tensor:
    logits = head(hidden).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


def _kl_sum(head: nn.Module, teacher: torch.Tensor, student: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """``Σ KL(teacher || student)`` over the rows of two hidden-state chunks; gradients reach ``student`` only."""
    with torch.no_grad():
        target = torch.log_softmax(_logits(head, teacher, softcap), -1)
    logq = torch.log_softmax(_logits(head, student, softcap), -1)
    return (target.exp() * (target - logq)).sum()


def kl_backward(head: nn.Module, student: torch.Tensor, teacher: torch.Tensor, softcap: float | None,
                row_chunk: int = ROW_CHUNK, scale: float = 1.0) -> float:
    """``Σ_tokens KL(teacher || student) * scale`` over ``[T, D]`` hidden states; backpropagates into ``student``.

    The vocabulary-wide logits exist for ``row_chunk`` tokens at a time: the
    loss is backpropagated chunk by chunk into a detached copy of the hidden
    states, whose gradient is then pushed through the decoder once.
    """
    leaf = student.detach().requires_grad_(True)
    total = 0.0
    for start in range(0, student.shape[0], row_chunk):
        loss = _kl_sum(head, teacher[start : start + row_chunk], leaf[start : start + row_chunk], softcap) * scale
        loss.backward()
        total += float(loss.detach())
    student.backward(leaf.grad)
    return total


def mean_kl(model: nn.Module, samples: torch.Tensor, teacher: torch.Tensor, row_chunk: int = ROW_CHUNK) -> float:
    """Mean per-token ``KL(teacher || model)`` over the calibration windows (no training)."""
    body, head = split_model(model)
    softcap = _softcap(model)
    device = next(model.parameters()).device
    total, tokens = 0.0, 0
    with torch.no_grad():
        for row in range(samples.shape[0]):
            hidden = body(input_ids=samples[row : row + 1].to(device), use_cache=False)[0][0]
            ref = teacher[row].to(device)
            for start in range(0, hidden.shape[0], row_chunk):
                total += float(_kl_sum(head, ref[start : start + row_chunk], hidden[start : start + row_chunk], softcap))
            tokens += hidden.shape[0]
    return total / max(1, tokens)


def optimizer_tensors(opt: torch.optim.Adam, params: list[nn.Parameter]) -> dict[str, torch.Tensor]:
    """Parameters and Adam moments as flat named tensors (for a safetensors resume file)."""
    out: dict[str, torch.Tensor] = {}
    for i, p in enumerate(params):
        out[f"param.{i}"] = p.detach()
        state = opt.state.get(p, {})
        for key in ("step", "exp_avg", "exp_avg_sq"):
            if key in state:
                value = state[key]
                out[f"adam.{i}.{key}"] = value if isinstance(value, torch.Tensor) else torch.tensor(float(value))
    return out


def load_optimizer_tensors(opt: torch.optim.Adam, params: list[nn.Parameter], tensors: dict[str, torch.Tensor]) -> None:
    """Inverse of :func:`optimizer_tensors`: parameter values and Adam moments, bit for bit."""
    with torch.no_grad():
        for i, p in enumerate(params):
            saved = tensors[f"param.{i}"]
            if saved.shape != p.shape or saved.dtype != p.dtype:
                raise ConfigError(f"global fine-tuning resume file: param.{i} is {saved.dtype} {tuple(saved.shape)}; "
                                  f"the model has {p.dtype} {tuple(p.shape)}")
            p.copy_(saved.to(p.device))
    state = opt.state_dict()
    for i, p in enumerate(params):
        if f"adam.{i}.step" in tensors:
            state["state"][i] = {
                "step": tensors[f"adam.{i}.step"].clone(),
                "exp_avg": tensors[f"adam.{i}.exp_avg"].to(p.device).clone(),
                "exp_avg_sq": tensors[f"adam.{i}.exp_avg_sq"].to(p.device).clone(),
            }
    opt.load_state_dict(state)


def global_finetune(
    model: nn.Module,
    blocks: nn.ModuleList,
    samples: torch.Tensor,
    teacher: torch.Tensor,
    epochs: int,
    lr: float,
    batch: int,
    seed: int,
    *,
    start_epoch: int = 0,
    resume_tensors: dict[str, torch.Tensor] | None = None,
    on_epoch: Callable[[int, float, dict[str, torch.Tensor]], None] | None = None,
    progress: bool = False,
) -> list[float]:
    """Adam on mean per-token ``KL(teacher || student)``; returns each epoch's mean training loss.

    ``samples [n, T]`` token ids, ``teacher [n, T, D]`` from
    :func:`record_teacher`. Each epoch visits the windows in an order drawn
    from ``(seed, epoch)`` alone, so epoch ``e`` is the same whether or not
    the run restarted before it. ``on_epoch(epoch, loss, tensors)`` receives
    the parameters and Adam moments after every epoch (for the resume state);
    ``start_epoch`` / ``resume_tensors`` continue from such a record.
    """
    from codegemm.quant.layer import layer_generator

    body, head = split_model(model)
    softcap = _softcap(model)
    params = global_parameters(model, blocks)
    device = next(model.parameters()).device
    flags = [p.requires_grad for p in params]
    chosen = {id(p) for p in params}
    frozen = [(p, p.requires_grad) for p in model.parameters() if id(p) not in chosen]
    for p, _ in frozen:
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    logger.info("global fine-tuning: %d tensors, %d values, epochs %d-%d", len(params),
                sum(p.numel() for p in params), start_epoch, epochs - 1)
    opt = torch.optim.Adam(params, lr=lr)
    if resume_tensors is not None:
        load_optimizer_tensors(opt, params, resume_tensors)
    n, tokens = samples.shape
    steps_per_epoch = math.ceil(n / batch)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=epochs * steps_per_epoch, initial=start_epoch * steps_per_epoch, desc="global fine-tune",
                   unit="step", dynamic_ncols=True)
    losses: list[float] = []
    was_training = model.training
    model.eval()
    try:
        for epoch in range(start_epoch, epochs):
            order = torch.randperm(n, generator=layer_generator(seed, f"global.epoch{epoch}")).tolist()
            epoch_loss = 0.0
            for first in range(0, n, batch):
                rows = order[first : first + batch]
                opt.zero_grad(set_to_none=True)
                step_loss = 0.0
                for row in rows:
                    hidden = body(input_ids=samples[row : row + 1].to(device), use_cache=False)[0][0]
                    step_loss += kl_backward(head, hidden, teacher[row].to(device), softcap,
                                             scale=1.0 / (tokens * len(rows)))
                opt.step()
                epoch_loss += step_loss
                if bar is not None:
                    bar.set_postfix_str(f"epoch {epoch} KL={step_loss:.4f}")
                    bar.update(1)
            epoch_loss /= steps_per_epoch
            losses.append(epoch_loss)
            logger.info("global fine-tuning epoch %d: mean KL %.5f", epoch, epoch_loss)
            if on_epoch is not None:
                on_epoch(epoch, epoch_loss, optimizer_tensors(opt, params))
    finally:
        if bar is not None:
            bar.close()
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
        for p, flag in frozen:
            p.requires_grad_(flag)
        model.train(was_training)
    return losses
