"""Token-level perplexity over non-overlapping chunks (the GPTQ/AQLM WikiText-2 protocol).

The whole evaluation text is tokenized once; chunk ``i`` is tokens
``[i*seqlen, (i+1)*seqlen)``; each chunk is scored on its own (no context
carried over) and the perplexity is ``exp`` of the mean next-token loss over
all predicted tokens. A trailing partial chunk is dropped.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import Any

import torch
from torch import nn

from codegemm.errors import CodeGEMMError

logger = logging.getLogger(__name__)

_LOGIT_ROWS = 512
"""Tokens whose logits exist at once: a 262k-entry vocabulary makes full logits gigabytes."""


@dataclasses.dataclass
class PerplexityResult:
    perplexity: float
    nll: float
    chunks: int
    seqlen: int
    tokens: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _split_model(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """``(decoder, lm_head)`` when the model has the usual HF layout, else None."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    body = model.get_decoder() if hasattr(model, "get_decoder") else None
    if head is None or body is None or body is model:
        return None
    return body, head


def _chunk_nll(model: nn.Module, ids: torch.Tensor) -> tuple[float, int]:
    """Summed next-token NLL of one chunk ``[1, T]`` and the number of predicted tokens."""
    split = _split_model(model)
    labels = ids[0, 1:]
    if split is None:
        logits = model(ids, use_cache=False).logits[0, :-1].float()
        return float(nn.functional.cross_entropy(logits, labels, reduction="sum")), labels.numel()
    body, head = split
    hidden = body(input_ids=ids, use_cache=False)[0][0, :-1]
    softcap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)
    total = 0.0
    for start in range(0, hidden.shape[0], _LOGIT_ROWS):
        logits = head(hidden[start : start + _LOGIT_ROWS]).float()
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        total += float(nn.functional.cross_entropy(logits, labels[start : start + _LOGIT_ROWS], reduction="sum"))
    return total, labels.numel()


@torch.no_grad()
def perplexity(
    model: nn.Module,
    tokens: torch.Tensor,
    seqlen: int = 2048,
    max_chunks: int | None = None,
    progress: bool = False,
) -> PerplexityResult:
    """Perplexity of ``model`` on ``tokens`` (``int64 [T]``) in chunks of ``seqlen``.

    ``max_chunks`` keeps only the first chunks (the targets use 16).
    Raises :class:`CodeGEMMError` when the text is shorter than one chunk.
    """
    from codegemm.loading import check_seqlen

    check_seqlen(model, seqlen)
    tokens = tokens.reshape(-1)
    chunks = tokens.numel() // seqlen
    if max_chunks is not None:
        if max_chunks < 1:
            raise CodeGEMMError(f"max_chunks must be >= 1; got {max_chunks}")
        chunks = min(chunks, max_chunks)
    if chunks == 0:
        raise CodeGEMMError(f"evaluation text has {tokens.numel()} tokens, fewer than one chunk of seqlen={seqlen}")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    total, count = 0.0, 0
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=chunks, desc="perplexity", unit="chunk", dynamic_ncols=True)
    for i in range(chunks):
        ids = tokens[i * seqlen : (i + 1) * seqlen].reshape(1, -1).to(device)
        nll, n = _chunk_nll(model, ids)
        total += nll
        count += n
        if bar is not None:
            bar.set_postfix_str(f"ppl={math.exp(total / count):.2f}")
            bar.update(1)
    if bar is not None:
        bar.close()
    model.train(was_training)
    mean = total / count
    return PerplexityResult(math.exp(mean), mean, chunks, seqlen, count, time.perf_counter() - start)
