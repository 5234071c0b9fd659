"""Calibration/evaluation data: sources, offline default, windows, and clear errors."""

from __future__ import annotations

import pytest
import torch
from _tiny_models import byte_tokenizer

from codegemm.data import DataError, calibration_samples, eval_tokens, load_text, offline_text, tokenize


def test_offline_text_is_english_and_splits_do_not_overlap():
    calib, held_out = offline_text("calib"), offline_text("eval")
    assert len(calib) > 200_000 and len(held_out) > 30_000
    assert " the " in calib and " the " in held_out
    calib_paragraphs = set(calib.split("\n\n"))
    shared = [p for p in held_out.split("\n\n") if len(p) > 200 and p in calib_paragraphs]
    assert not shared
    assert load_text(None) == calib and load_text("offline", "eval") == held_out
    with pytest.raises(DataError, match="split"):
        offline_text("train")


def test_sources_file_list_and_tensor(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text("héllo wörld\n" * 3, encoding="utf-8")
    assert load_text(str(path)) == "héllo wörld\n" * 3
    assert load_text(path) == "héllo wörld\n" * 3
    assert load_text(["a", "b"]) == ["a", "b"]
    ids = torch.randint(0, 100, (2, 8))
    assert load_text(ids) is ids
    tok = byte_tokenizer()
    assert tokenize(["ab", "c"], tok).tolist() == tokenize("ab\n\nc", tok).tolist()
    assert tokenize(ids, tok).shape == (16,)


def test_bad_sources_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_text(str(tmp_path / "missing.txt"))
    with pytest.raises(DataError, match="pass text itself as a list"):
        load_text("some text\nwith lines")
    with pytest.raises(DataError, match="got int"):
        load_text(42)
    with pytest.raises(DataError, match="empty"):
        tokenize("   \n", byte_tokenizer())
    with pytest.raises(DataError, match="int32/int64"):
        tokenize(torch.rand(4, 4), None)
    try:
        import datasets  # noqa: F401
    except ImportError:
        with pytest.raises(DataError, match="datasets"):
            load_text("wikitext2")


def test_calibration_windows_are_seeded_and_sized():
    tok = byte_tokenizer()
    text = offline_text()[:20_000]
    a = calibration_samples([text], tok, nsamples=8, seqlen=64, seed=1)
    b = calibration_samples([text], tok, nsamples=8, seqlen=64, seed=1)
    c = calibration_samples([text], tok, nsamples=8, seqlen=64, seed=2)
    assert a.shape == (8, 64) and a.dtype == torch.int64
    assert torch.equal(a, b) and not torch.equal(a, c)
    stream = tokenize(text, tok)
    assert any(torch.equal(a[0], stream[s : s + 64]) for s in range(0, stream.numel() - 63, 64))
    with_bos = calibration_samples([text], tok, nsamples=3, seqlen=64, seed=1, bos_token_id=256)
    assert with_bos.shape == (3, 64) and (with_bos[:, 0] == 256).all()
    given = torch.randint(0, 200, (5, 64))
    assert torch.equal(calibration_samples(given, tok, nsamples=4, seqlen=64), given[:4])


def test_short_calibration_text_overlaps_or_fails():
    tok = byte_tokenizer()
    few = calibration_samples(["x" * 100], tok, nsamples=4, seqlen=64, seed=0)
    assert few.shape == (4, 64)
    with pytest.raises(DataError, match="too short: 10 tokens"):
        calibration_samples(["x" * 10], tok, nsamples=4, seqlen=64)
    with pytest.raises(DataError, match="nsamples must be >= 1"):
        calibration_samples(["x" * 10], tok, nsamples=0, seqlen=64)


def test_eval_tokens_use_the_held_out_split():
    tok = byte_tokenizer()
    assert torch.equal(eval_tokens(None, tok), tokenize(offline_text("eval"), tok))


def test_hub_datasets_are_requested_and_joined_as_documented(monkeypatch):
    """The online names go through `datasets.load_dataset` (faked here: CI has no internet)."""
    import sys
    import types

    calls = []

    def load_dataset(path, name=None, split=None, data_files=None):
        calls.append((path, name, split, data_files))
        return {"text": [" = Title = \n", " body line \n", ""]}

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    assert load_text("wikitext2", "calib") == " = Title = \n\n\n body line \n\n\n"
    assert load_text("WikiText2", "eval") == " = Title = \n body line \n"  # the papers' test-set protocol
    assert load_text("c4", "eval") == " = Title = \n\n\n body line \n\n\n"
    assert calls[0][:3] == ("wikitext", "wikitext-2-raw-v1", "train")
    assert calls[1][2] == "test"
    assert calls[2][0] == "allenai/c4" and calls[2][2] == "validation" and "validation" in calls[2][3]

    def failing(*_args, **_kwargs):
        raise ConnectionError("no route to host")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=failing))
    with pytest.raises(DataError, match="could not load 'c4'.*ConnectionError"):
        load_text("c4")
