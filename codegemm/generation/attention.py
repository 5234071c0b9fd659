"""Decode attention over a static KV cache that reads only the filled part of the cache.

With a static cache, transformers' SDPA path attends over every slot of the
cache and builds a mask per layer to hide the empty ones; on an H100/H200 that
costs ~14 µs per layer at batch 1 for a 256-token cache (prefill-shaped kernel
with one query, plus mask conversion), and grows with the cache length, not
with the tokens actually held. This module registers a transformers attention
function for one-token decode steps:

* split-K ("flash-decoding"): each program takes one (row, KV head) and a chunk
  of cache slots, serves all query heads of the GQA group with one read of K/V,
  and keeps an online softmax; a second kernel merges the chunks;
* the valid length comes from ``position_ids`` (slot of the current token + 1,
  a device tensor), so a captured CUDA graph stays correct as the text grows
  and chunks past the length exit at once;
* sliding-window layers read the last ``sliding_window`` slots of a full-length
  cache (see :func:`codegemm.generation.cache.make_static_cache`), which keeps
  them replayable too.

It is switched on only inside :func:`decode_attention_enabled`, around the
capture of the decode step, for architectures whose attention is plain scaled
dot-product (see :func:`supports_decode_attention`). Prefill keeps SDPA.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Iterator

import torch
from torch import nn

from codegemm.errors import UnsupportedError
from codegemm.generation.cache import text_config

_LOG = logging.getLogger(__name__)

ATTENTION_NAME = "codegemm_decode"
"""Name under which the decode attention is registered with transformers' ``AttentionInterface``."""

PLAIN_ATTENTION_MODELS = frozenset(
    {"llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "phi3", "granite", "olmo2", "gemma",
     "gemma3_text"}
)
"""Architectures whose attention is softmax(q k^T * scaling) v with GQA, optionally over a sliding window of
``sliding_window`` keys passed to the attention function, and nothing else (no softcap, sinks, ALiBi)."""

BLOCK_N = 64
"""Cache slots per inner step of a program."""

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is a dependency on GPU machines
    triton = None


if triton is not None:

    @triton.jit
    def _decode_attn_split(
        Q, K, V, LENS, O_PART, M_PART, L_PART,
        stride_qb, stride_qh, stride_qd, stride_kb, stride_kh, stride_kl, stride_kd,
        stride_vb, stride_vh, stride_vl, stride_vd, scale_log2, keys_per_split, window,
        H: tl.constexpr, H_KV: tl.constexpr, GROUP: tl.constexpr, GROUP_P: tl.constexpr, D: tl.constexpr,
        SPLITS: tl.constexpr, BLOCK: tl.constexpr, IEEE: tl.constexpr,
    ):
        pid = tl.program_id(0)
        split = tl.program_id(1)
        b = pid // H_KV
        kvh = pid % H_KV
        length = tl.load(LENS + b).to(tl.int32)
        first = tl.where(window > 0, tl.maximum(length - window, 0), 0)  # sliding window: the last `window` slots
        start = tl.maximum(split * keys_per_split, first)
        end = tl.minimum(split * keys_per_split + keys_per_split, length)
        g = tl.arange(0, GROUP_P)
        d = tl.arange(0, D)
        head = kvh * GROUP + g
        live = g < GROUP
        q = tl.load(Q + b * stride_qb + head[:, None] * stride_qh + d[None, :] * stride_qd, mask=live[:, None], other=0.0)
        m_i = tl.full([GROUP_P], float("-inf"), tl.float32)
        l_i = tl.zeros([GROUP_P], tl.float32)
        acc = tl.zeros([GROUP_P, D], tl.float32)
        k_base = K + b * stride_kb + kvh * stride_kh
        v_base = V + b * stride_vb + kvh * stride_vh
        for n0 in range(start, end, BLOCK):
            n = n0 + tl.arange(0, BLOCK)
            valid = n < end
            k = tl.load(k_base + n[:, None] * stride_kl + d[None, :] * stride_kd, mask=valid[:, None], other=0.0)
            if IEEE:
                s = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))
            s = tl.where(valid[None, :], s * scale_log2, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_base + n[:, None] * stride_vl + d[None, :] * stride_vd, mask=valid[:, None], other=0.0)
            if IEEE:
                acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        row = (b * H + head) * SPLITS + split
        tl.store(O_PART + row[:, None] * D + d[None, :], acc, mask=live[:, None])
        tl.store(M_PART + row, m_i, mask=live)
        tl.store(L_PART + row, l_i, mask=live)

    @triton.jit
    def _decode_attn_merge(O_PART, M_PART, L_PART, OUT, D: tl.constexpr, SPLITS: tl.constexpr, SPLITS_P: tl.constexpr):
        pid = tl.program_id(0)  # row * H + head; OUT is [B, 1, H, D] contiguous
        s = tl.arange(0, SPLITS_P)
        d = tl.arange(0, D)
        ok = s < SPLITS
        m = tl.load(M_PART + pid * SPLITS + s, mask=ok, other=float("-inf"))
        l_part = tl.load(L_PART + pid * SPLITS + s, mask=ok, other=0.0)
        top = tl.max(m, 0)
        w = tl.where(m == float("-inf"), 0.0, tl.exp2(m - top))
        acc = tl.load(O_PART + (pid * SPLITS + s)[:, None] * D + d[None, :], mask=ok[:, None], other=0.0)
        out = tl.sum(acc * w[:, None], 0) / tl.sum(w * l_part, 0)
        tl.store(OUT + pid * D + d, out.to(OUT.dtype.element_ty))


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_splits(batch: int, kv_heads: int, cache_len: int, device: torch.device) -> int:
    """Chunks per (row, KV head): about two programs per SM, never chunks shorter than ``BLOCK_N``."""
    sms = _sm_count(device.index or 0) if device.type == "cuda" else 8
    most = triton.cdiv(cache_len, BLOCK_N)
    return max(1, min(most, (2 * sms) // max(1, batch * kv_heads)))


@torch.library.custom_op("codegemm_generation::decode_attention", mutates_args=())
def decode_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, lengths: torch.Tensor, scale: float, window: int = 0
) -> torch.Tensor:
    """Attention of one query per row over the first ``lengths[b]`` cache slots (the last ``window`` of them if > 0).

    ``query [B, H, D]``, ``key``/``value [B, H_kv, L, D]`` (any strides; ``H`` a
    multiple of ``H_kv``, query head ``h`` reads KV head ``h // (H / H_kv)``), ``lengths`` int ``[B]``
    in ``1..L``, ``scale`` the softmax scaling. Returns ``[B, 1, H, D]`` in the
    query's dtype: the layout transformers' attention functions return.
    """
    batch, heads, dim = query.shape
    kv_heads, cache_len = key.shape[1], key.shape[2]
    group = heads // kv_heads
    splits = num_splits(batch, kv_heads, cache_len, query.device)
    keys_per_split = triton.cdiv(triton.cdiv(cache_len, splits), BLOCK_N) * BLOCK_N
    rows = batch * heads * splits
    o_part = torch.empty(rows, dim, device=query.device, dtype=torch.float32)
    m_part = torch.empty(rows, device=query.device, dtype=torch.float32)
    l_part = torch.empty(rows, device=query.device, dtype=torch.float32)
    out = torch.empty(batch, 1, heads, dim, device=query.device, dtype=query.dtype)
    log2e = 1.4426950408889634
    _decode_attn_split[(batch * kv_heads, splits)](
        query, key, value, lengths, o_part, m_part, l_part,
        query.stride(0), query.stride(1), query.stride(2), key.stride(0), key.stride(1), key.stride(2), key.stride(3),
        value.stride(0), value.stride(1), value.stride(2), value.stride(3), scale * log2e, keys_per_split, window,
        H=heads, H_KV=kv_heads, GROUP=group, GROUP_P=max(16, triton.next_power_of_2(group)), D=dim,
        SPLITS=splits, BLOCK=BLOCK_N, IEEE=query.dtype == torch.float32,
    )
    _decode_attn_merge[(batch * heads,)](o_part, m_part, l_part, out, D=dim, SPLITS=splits,
                                    SPLITS_P=max(2, triton.next_power_of_2(splits)))
    return out


@decode_attention.register_fake
def _(query, key, value, lengths, scale, window=0):
    batch, heads, dim = query.shape
    return query.new_empty(batch, 1, heads, dim)


def _attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention-function signature: ``query [B, H, 1, D]``, ``key/value [B, H_kv, L, D]``."""
    position_ids = kwargs.get("position_ids")
    if query.shape[2] != 1 or position_ids is None:
        raise UnsupportedError(
            f"{ATTENTION_NAME} attention handles one query token per row with position_ids given; "
            f"got {query.shape[2]} query tokens, position_ids {'missing' if position_ids is None else 'given'}"
        )
    if getattr(module, "attn_logit_softcapping", None):
        raise UnsupportedError(f"{ATTENTION_NAME} attention does not apply logit softcapping")
    batch = query.shape[0]
    lengths = (position_ids[:, -1] + 1).expand(batch).contiguous()
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    window = kwargs.get("sliding_window") or 0
    return decode_attention(query[:, :, 0, :], key, value, lengths, float(scale), int(window)), None


@functools.cache
def _register() -> bool:
    try:
        from transformers import AttentionInterface
    except ImportError:
        return False
    AttentionInterface.register(ATTENTION_NAME, _attention_forward)
    return True


def supports_decode_attention(model: nn.Module) -> str:
    """Empty when the decode attention can serve ``model``, else the reason it cannot."""
    if triton is None:
        return "triton is not installed"
    cfg = text_config(model)
    model_type = getattr(cfg, "model_type", None)
    if model_type not in PLAIN_ATTENTION_MODELS:
        return f"model_type {model_type!r} is not in the plain-attention list"
    layer_types = getattr(cfg, "layer_types", None) or []
    if any(t not in ("full_attention", "sliding_attention") for t in layer_types):
        return f"the model has attention layers other than full and sliding-window: {sorted(set(layer_types))}"
    if getattr(cfg, "attn_logit_softcapping", None) or getattr(cfg, "use_bidirectional_attention", False):
        return "the model softcaps attention logits or attends bidirectionally"
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    if head_dim not in (16, 32, 64, 128, 256) or heads % kv_heads:
        return f"head_dim={head_dim} (needs 16/32/64/128/256) or heads={heads} not a multiple of kv_heads={kv_heads}"
    if not _register():
        return "this transformers version has no AttentionInterface"
    return ""


@contextlib.contextmanager
def decode_attention_enabled(model: nn.Module) -> Iterator[None]:
    """Route the model's attention through :func:`decode_attention` while the block runs."""
    config = model.config
    previous = config._attn_implementation
    config._attn_implementation = ATTENTION_NAME
    try:
        yield
    finally:
        config._attn_implementation = previous
