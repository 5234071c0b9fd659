"""The static KV cache and the model-call conventions that differ across transformers versions.

Decoding reuses transformers' ``StaticCache`` (fixed-size tensors updated in
place, so a decode step can be captured once and replayed). Its constructor and
the forward arguments it needs changed between transformers 4.50 and 5.x:
older versions take ``max_batch_size``/``device``/``dtype`` and need an explicit
``cache_position``; newer ones size themselves on first use and track the
write position in a device tensor. This module hides those differences.
"""

from __future__ import annotations

import copy
import inspect
import logging

import torch
from torch import nn
from transformers import StaticCache

_LOG = logging.getLogger(__name__)


def forward_parameters(model: nn.Module) -> frozenset[str]:
    """Names of the keyword arguments the model's ``forward`` accepts."""
    return frozenset(inspect.signature(model.forward).parameters)


def text_config(model_or_config):
    """The decoder config (multimodal configs keep it under ``text_config``)."""
    config = getattr(model_or_config, "config", model_or_config)
    getter = getattr(config, "get_text_config", None)
    if getter is None:
        return config
    try:
        return getter(decoder=True)
    except TypeError:  # transformers < 4.52 has no ``decoder`` argument
        return getter()


def kv_cache_bytes(config, batch_size: int, max_cache_len: int, dtype: torch.dtype) -> int:
    """Bytes of a full static KV cache, computed from the config before anything is allocated."""
    cfg = text_config(config)
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    itemsize = torch.empty((), dtype=dtype).element_size()
    return 2 * cfg.num_hidden_layers * batch_size * kv_heads * max_cache_len * head_dim * itemsize


def make_static_cache(
    model: nn.Module,
    batch_size: int,
    max_cache_len: int,
    device: torch.device,
    dtype: torch.dtype,
    full_length_layers: bool = False,
) -> StaticCache:
    """A ``StaticCache`` for ``batch_size`` rows of ``max_cache_len`` tokens, on any supported version.

    ``full_length_layers=True`` gives sliding-window layers a full-length cache
    too (slot = position, no rolling), for attention that applies the window
    itself (:mod:`codegemm.generation.attention`); masks built by the model still
    apply the window, so prefill through the model's own attention stays exact.
    """
    params = inspect.signature(StaticCache.__init__).parameters
    config = model.config
    if full_length_layers:
        config = copy.copy(text_config(model))
        layers = getattr(config, "layer_types", None)
        if layers:
            config.layer_types = ["full_attention"] * len(layers)
        config.sliding_window = None
    kwargs: dict = {"config": config, "max_cache_len": max_cache_len}
    if "max_batch_size" in params:
        kwargs["max_batch_size"] = batch_size
    elif "batch_size" in params:
        kwargs["batch_size"] = batch_size
    if "device" in params:
        kwargs["device"] = device
    if "dtype" in params:
        kwargs["dtype"] = dtype
    return StaticCache(**kwargs)


def cache_layers(cache) -> list:
    """Per-layer cache objects (transformers >= 4.56); empty on older versions."""
    return list(getattr(cache, "layers", []) or [])


def _static_layer_class():
    try:
        from transformers.cache_utils import StaticLayer
    except ImportError:  # transformers < 4.56 has no per-layer cache objects
        return None
    return StaticLayer


def share_write_position(cache) -> bool:
    """Make the full-attention layers of a transformers 5.x ``StaticCache`` share one write position.

    Each ``StaticLayer.update`` adds the new tokens to its own device counter: in a decode step that
    is one tiny kernel per layer (32 for Llama-3-8B, ~1.2 µs each on an H100, 1.6% of the step). Here
    every layer reads one shared counter and the last layer advances it, so a step launches one. The
    layers' writes, reads, ``get_seq_length`` and ``reset`` see the same values as before. Returns
    False, leaving the cache as it was, unless every layer is a plain ``StaticLayer``.
    """
    static_layer = _static_layer_class()
    layers = cache_layers(cache)
    if static_layer is None or not layers or any(type(layer) is not static_layer for layer in layers):
        return False
    if any(layer.is_initialized or not isinstance(getattr(layer, "cumulative_length", None), torch.Tensor)
           for layer in layers):
        return False
    shared: list[torch.Tensor] = []

    def make_update(layer, advances: bool):
        def update(key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
            if not layer.is_initialized:  # eager: the first call (prefill, or the warm-up before capture)
                layer.lazy_initialization(key_states, value_states)
                if not shared:
                    shared.append(layer.cumulative_length)
                layer.cumulative_length = shared[0]
            position = layer.cumulative_length
            kv_length = key_states.shape[-2]
            slots = torch.arange(kv_length, device=layer.keys.device) + position
            layer.keys.index_copy_(2, slots, key_states)
            layer.values.index_copy_(2, slots, value_states)
            if advances:
                position.add_(kv_length)
            return layer.keys, layer.values

        return update

    for index, layer in enumerate(layers):
        layer.update = make_update(layer, advances=index == len(layers) - 1)
    return True


def replay_safe(cache, total_len: int) -> bool:
    """Whether a decode step captured once stays valid while the text grows to ``total_len`` tokens.

    Sliding-window layers of transformers 5.x track their length in a Python
    int that decides the mask offsets and the write path; a replayed graph
    would keep the values seen at capture. Full-attention static layers are
    driven by device tensors only.
    """
    for layer in cache_layers(cache):
        if getattr(layer, "is_sliding", False) or hasattr(layer, "cumulative_length_int"):
            _LOG.info("the cache has sliding-window layers: decoding without a captured graph")
            return False
    return True
