"""Tiny Llama models and a byte-level tokenizer built in memory (no download) for quantizer tests."""

from __future__ import annotations

import os

import torch


def byte_tokenizer():
    """A byte-level tokenizer with 256 byte tokens plus <s>, </s>, <unk> (vocab 259)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    for tok in ("<s>", "</s>", "<unk>"):
        vocab[tok] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def tiny_llama(seed: int = 0, layers: int = 2, hidden: int = 64, inter: int = 128, vocab: int = 259,
               max_positions: int = 512):
    """A random LlamaForCausalLM small enough to quantize in seconds."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
        bos_token_id=vocab - 3, eos_token_id=vocab - 2, tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # larger-than-init weights so quantization error is visible but finite
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    return model


def save_tiny(directory: str | os.PathLike, with_tokenizer: bool = True, **kwargs) -> str:
    """Write a tiny Llama (and its tokenizer) as a Hugging Face directory; returns the path."""
    model = tiny_llama(**kwargs)
    model.save_pretrained(str(directory))
    if with_tokenizer:
        byte_tokenizer().save_pretrained(str(directory))
    return str(directory)
