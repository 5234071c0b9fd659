"""Calibration and evaluation text: where it comes from and how it becomes token ids.

Sources accepted everywhere (``calibration=`` of :func:`codegemm.quantize`,
``--data`` / ``--ppl`` of the CLI):

* ``None`` or ``"offline"`` / ``"pydoc"``: the English text of the Python
  language reference that ships with every CPython install
  (``pydoc_data.topics``, about 465k characters). It needs no download, so a
  fresh offline machine can quantize; its topics are split into a calibration
  part and a disjoint held-out part (``split="eval"``).
* a path to a local text file (UTF-8),
* a list of strings,
* a tensor of token ids (``[T]`` or ``[n, T]``),
* ``"wikitext2"`` / ``"c4"``: fetched with the ``datasets`` package (online
  only; a clear error otherwise).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any, Union

import torch

from codegemm.errors import CodeGEMMError

logger = logging.getLogger(__name__)

DataSource = Union[None, str, os.PathLike, Sequence[str], torch.Tensor]

OFFLINE_NAMES = ("offline", "pydoc")
HUB_NAMES = ("wikitext2", "c4")


class DataError(CodeGEMMError):
    """Calibration or evaluation data is missing, empty or too short."""


def offline_text(split: str = "calib") -> str:
    """English prose shipped with Python itself (the language reference's topics).

    Topics are sorted by name; every fourth one is held out for evaluation,
    minus any paragraph that also occurs in the calibration part, so that
    ``split="eval"`` never overlaps ``split="calib"``.
    """
    if split not in ("calib", "eval"):
        raise DataError(f"split must be 'calib' or 'eval'; got {split!r}")
    from pydoc_data.topics import topics

    names = sorted(topics)
    calib = "\n\n".join(topics[n].strip() for i, n in enumerate(names) if i % 4 != 3)
    if split == "calib":
        return calib
    # Topics repeat some passages; keep only paragraphs the calibration split never shows.
    seen = set(calib.split("\n\n"))
    held = "\n\n".join(topics[n].strip() for i, n in enumerate(names) if i % 4 == 3)
    return "\n\n".join(p for p in held.split("\n\n") if p not in seen)


def _hub_text(name: str, split: str) -> str:
    try:
        import datasets  # type: ignore[import-not-found]
    except ImportError as err:
        raise DataError(
            f"data {name!r} needs the 'datasets' package and internet access (pip install datasets); "
            "offline, pass a local text file path instead"
        ) from err
    try:
        if name == "wikitext2":
            part = {"calib": "train", "eval": "test"}[split]
            rows = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split=part)["text"]
            return "\n\n".join(rows) if split == "calib" else "".join(rows)
        part = {"calib": "train", "eval": "validation"}[split]
        files = {"calib": "en/c4-train.00000-of-01024.json.gz", "eval": "en/c4-validation.00000-of-00008.json.gz"}
        rows = datasets.load_dataset("allenai/c4", data_files={part: files[split]}, split=part)["text"]
        return "\n\n".join(rows[:20000])
    except Exception as err:  # network, hub or cache failures all mean the same thing to the user
        raise DataError(f"could not load {name!r} with the datasets package ({type(err).__name__}: {err})") from err


def load_text(source: DataSource, split: str = "calib") -> str | list[str] | torch.Tensor:
    """Resolve ``source`` to text (str or list of str) or to a token-id tensor."""
    if source is None or (isinstance(source, str) and source.lower() in OFFLINE_NAMES):
        return offline_text(split)
    if isinstance(source, torch.Tensor):
        return source
    if isinstance(source, str) and source.lower() in HUB_NAMES:
        return _hub_text(source.lower(), split)
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.isfile(path):
            shown = path if len(path) <= 80 else path[:77] + "..."
            hint = " (a str is read as a file path; pass text itself as a list of strings)" if (
                "\n" in path or len(path) > 255) else ""
            raise DataError(f"data must be a text file, 'offline', 'wikitext2' or 'c4'; no such file {shown!r}{hint}")
        with open(path, encoding="utf-8", errors="replace") as handle:
            return handle.read()
    if isinstance(source, Sequence) and all(isinstance(s, str) for s in source):
        return list(source)
    raise DataError(
        f"data must be None, a path, 'offline', 'wikitext2', 'c4', a list of str or a token tensor; "
        f"got {type(source).__name__}"
    )


def tokenize(text: str | list[str] | torch.Tensor, tokenizer: Any) -> torch.Tensor:
    """One long stream of token ids ``int64 [T]`` (documents of a list joined by blank lines)."""
    if isinstance(text, torch.Tensor):
        if text.dtype not in (torch.int32, torch.int64) or text.dim() not in (1, 2):
            raise DataError(f"token tensor must be int32/int64 of shape [T] or [n, T]; got {text.dtype} "
                            f"{tuple(text.shape)}")
        return text.reshape(-1).long()
    if isinstance(text, list):
        text = "\n\n".join(text)
    if not text.strip():
        raise DataError("data text is empty")
    if tokenizer is None:
        raise DataError("text data needs a tokenizer; the model was loaded without one")
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=True).input_ids
    return ids.reshape(-1).long()


def calibration_samples(
    source: DataSource,
    tokenizer: Any,
    nsamples: int,
    seqlen: int,
    seed: int = 0,
    bos_token_id: int | None = None,
) -> torch.Tensor:
    """``int64 [nsamples, seqlen]`` windows of the calibration text.

    Windows are non-overlapping when the text is long enough (positions drawn
    with a seeded generator, so runs are reproducible); a token tensor of shape
    ``[n, seqlen]`` is used as it is. Raises :class:`DataError` when the text
    is shorter than one window.
    """
    if nsamples <= 0 or seqlen <= 1:
        raise DataError(f"nsamples must be >= 1 and seqlen >= 2; got nsamples={nsamples}, seqlen={seqlen}")
    raw = load_text(source, "calib")
    if isinstance(raw, torch.Tensor) and raw.dim() == 2 and raw.shape[1] == seqlen:
        if raw.shape[0] < nsamples:
            logger.warning("calibration tensor has %d rows; using all of them (asked for %d)", raw.shape[0], nsamples)
        return raw[:nsamples].long()
    ids = tokenize(raw, tokenizer)
    body = seqlen - 1 if bos_token_id is not None else seqlen
    if ids.numel() < body:
        raise DataError(
            f"calibration data is too short: {ids.numel()} tokens, need at least seqlen={seqlen} "
            f"(use a longer text, or a smaller --seqlen)"
        )
    if bos_token_id is not None and ids.numel() and int(ids[0]) == bos_token_id:
        ids = ids[1:] if ids.numel() > body else ids
    windows = ids.numel() // body
    gen = torch.Generator().manual_seed(seed)
    if windows >= nsamples:
        starts = torch.randperm(windows, generator=gen)[:nsamples].sort().values * body
    else:
        logger.warning(
            "calibration text has only %d non-overlapping windows of %d tokens; drawing %d overlapping ones",
            windows, body, nsamples,
        )
        starts = torch.randint(0, ids.numel() - body + 1, (nsamples,), generator=gen)
    rows = torch.stack([ids[s : s + body] for s in starts.tolist()])
    if bos_token_id is not None:
        rows = torch.cat([torch.full((nsamples, 1), bos_token_id, dtype=torch.long), rows], dim=1)
    return rows


def eval_tokens(source: DataSource, tokenizer: Any) -> torch.Tensor:
    """The whole evaluation text as ``int64 [T]`` (held-out split of the offline text by default)."""
    return tokenize(load_text(source, "eval"), tokenizer)
