"""Perplexity protocol: matches a plain loss over non-overlapping chunks; errors before work."""

from __future__ import annotations

import math
import os

import pytest
import torch
from _tiny_models import tiny_llama

from codegemm import CodeGEMMError
from codegemm.eval import perplexity
from codegemm.eval.tasks import run_tasks

WIKI_TEST = "/work/shared/data/wikitext-2/wiki.test.raw"


def _expected(model, tokens, seqlen, chunks):
    losses = []
    with torch.no_grad():
        for i in range(chunks):
            ids = tokens[i * seqlen : (i + 1) * seqlen][None]
            losses.append(float(model(ids, labels=ids).loss))
    return math.exp(sum(losses) / len(losses))


def test_perplexity_matches_the_chunked_protocol():
    model = tiny_llama(layers=1)
    tokens = torch.randint(0, 256, (1000,), generator=torch.Generator().manual_seed(0))
    res = perplexity(model, tokens, seqlen=128, max_chunks=3)
    assert res.chunks == 3 and res.tokens == 3 * 127
    assert res.perplexity == pytest.approx(_expected(model, tokens, 128, 3), rel=1e-5)
    full = perplexity(model, tokens, seqlen=128)
    assert full.chunks == 7  # 1000 // 128, the partial tail is dropped
    assert full.perplexity == pytest.approx(_expected(model, tokens, 128, 7), rel=1e-5)


def test_perplexity_rejects_bad_lengths():
    model = tiny_llama(layers=1, max_positions=128)
    tokens = torch.randint(0, 256, (300,))
    with pytest.raises(CodeGEMMError, match="exceeds the model's max_position_embeddings=128"):
        perplexity(model, tokens, seqlen=256)
    with pytest.raises(CodeGEMMError, match="fewer than one chunk"):
        perplexity(model, tokens[:50], seqlen=64)
    with pytest.raises(CodeGEMMError, match="max_chunks"):
        perplexity(model, tokens, seqlen=64, max_chunks=0)


def test_tasks_need_lm_eval():
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        from codegemm import UnsupportedError

        with pytest.raises(UnsupportedError, match="lm-eval"):
            run_tasks(tiny_llama(layers=1), None, ["arc_easy"])
    else:
        pytest.skip("lm-eval is installed; running tasks needs their data")


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isfile(WIKI_TEST), reason=f"needs {WIKI_TEST}")
def test_gemma_wikitext2_perplexity_first_chunks():
    from codegemm.data import load_text, tokenize
    from codegemm.loading import load_model

    loaded = load_model(None)
    tokens = tokenize(load_text(WIKI_TEST), loaded.tokenizer)
    res = perplexity(loaded.model, tokens, seqlen=2048, max_chunks=2)
    assert 10 < res.perplexity < 40  # 16 chunks give 25.0 (docs/BENCHMARKS.md)
