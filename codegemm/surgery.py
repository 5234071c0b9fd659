"""Finding and swapping a model's linear layers: the one place this logic lives.

The Hugging Face loader, the random-model builder and the quantizer all choose
which ``nn.Linear`` modules become :class:`~codegemm.CodeGEMMLinear` through
:func:`iter_linears`, and swap them through :func:`set_module` /
:func:`replace_linears`.

Skip lists
----------
A skip entry is either a compiled :class:`re.Pattern` (matched with
``re.search`` against the full dotted name) or a string. A string beginning
with ``"re:"`` is a regex; any other string matches a module whose dotted name
contains it as whole components: the full name
(``"model.layers.0.mlp.down_proj"``), a suffix (``"lm_head"``,
``"mlp.down_proj"``), or a container (``"layers.0"`` skips every linear of
block 0, ``"mlp"`` every MLP linear). ``"layers.1"`` never matches
``layers.10``.

``lm_head`` is always skipped unless ``default_skip=False``; embeddings are
``nn.Embedding`` and never visited.
"""

from __future__ import annotations

import re
from typing import Iterable, Iterator, Sequence, Union

import torch
from torch import nn

from codegemm.config import CodebookConfig, as_config
from codegemm.errors import ConfigError
from codegemm.nn import CodeGEMMLinear

SkipEntry = Union[str, "re.Pattern[str]"]
SkipList = Union[SkipEntry, Iterable[SkipEntry], None]

DEFAULT_SKIP: tuple[str, ...] = ("lm_head",)
"""Modules never quantized unless asked: the output projection (embeddings are not linears)."""

_REGEX_PREFIX = "re:"


def _normalize_skip(skip: SkipList, default_skip: bool) -> list[SkipEntry]:
    if skip is None:
        entries: list[SkipEntry] = []
    elif isinstance(skip, (str, re.Pattern)):
        entries = [skip]
    else:
        entries = list(skip)
    for entry in entries:
        if not isinstance(entry, (str, re.Pattern)):
            raise ConfigError(f"skip entries must be strings or compiled regexes; got {type(entry).__name__} {entry!r}")
        if isinstance(entry, str) and entry.startswith(_REGEX_PREFIX):
            try:
                re.compile(entry[len(_REGEX_PREFIX) :])
            except re.error as err:
                raise ConfigError(f"skip entry {entry!r} is not a valid regex: {err}") from err
    if default_skip:
        entries = [*DEFAULT_SKIP, *entries]
    return entries


def matches_skip(name: str, skip: SkipList, default_skip: bool = True) -> bool:
    """Whether the module called ``name`` is excluded by ``skip`` (see the module docstring)."""
    for entry in _normalize_skip(skip, default_skip):
        if isinstance(entry, re.Pattern):
            if entry.search(name):
                return True
        elif entry.startswith(_REGEX_PREFIX):
            if re.search(entry[len(_REGEX_PREFIX) :], name):
                return True
        elif f".{entry}." in f".{name}.":
            return True
    return False


def iter_linears(
    model: nn.Module, skip: SkipList = None, default_skip: bool = True
) -> Iterator[tuple[str, nn.Linear]]:
    """``(dotted_name, module)`` for every plain ``nn.Linear`` not excluded by ``skip``.

    Already-quantized :class:`CodeGEMMLinear` modules are not ``nn.Linear`` and
    are never yielded. The list is taken before yielding, so callers may swap
    modules while iterating.
    """
    entries = _normalize_skip(skip, default_skip)
    found = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and not matches_skip(name, entries, default_skip=False)
    ]
    yield from found


def skipped_linears(model: nn.Module, skip: SkipList = None, default_skip: bool = True) -> list[str]:
    """Names of the ``nn.Linear`` modules that ``skip`` keeps dense (for ``modules_not_quantized``)."""
    entries = _normalize_skip(skip, default_skip)
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and matches_skip(name, entries, default_skip=False)
    ]


def get_module(model: nn.Module, name: str) -> nn.Module:
    """The submodule at dotted path ``name`` (``""`` is the model itself)."""
    if not name:
        return model
    try:
        return model.get_submodule(name)
    except AttributeError as err:
        raise ConfigError(f"module name {name!r} does not exist in {type(model).__name__}") from err


def set_module(model: nn.Module, name: str, new_module: nn.Module) -> None:
    """Replace the submodule at dotted path ``name`` with ``new_module``.

    Works through ``nn.ModuleList``/``nn.Sequential`` (numeric path parts) and
    plain attributes; the old module must exist.
    """
    if not name:
        raise ConfigError("name must be a non-empty dotted module path; got ''")
    parent_name, _, child = name.rpartition(".")
    parent = get_module(model, parent_name)
    if child not in parent._modules:
        raise ConfigError(f"module name {name!r} does not exist in {type(model).__name__}")
    parent._modules[child] = new_module


def make_shell(
    linear: nn.Linear,
    config: CodebookConfig | str,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    name: str = "linear",
) -> CodeGEMMLinear:
    """An uninitialized :class:`CodeGEMMLinear` with ``linear``'s shape and bias.

    ``device`` defaults to the linear's device (``"meta"`` allocates nothing);
    ``dtype`` (of codebooks, scales and bias) to the linear's float dtype.
    """
    config = as_config(config)
    try:
        config.check_layer(linear.out_features, linear.in_features)
    except ConfigError as err:
        raise ConfigError(f"cannot quantize {name!r}: {err}") from err
    weight = linear.weight
    if device is None:
        device = weight.device
    if dtype is None:
        dtype = weight.dtype if weight.dtype.is_floating_point else torch.float16
    return CodeGEMMLinear(
        linear.in_features, linear.out_features, config, bias=linear.bias is not None, device=device, dtype=dtype
    )


def replace_linears(
    model: nn.Module,
    config: CodebookConfig | str,
    skip: SkipList = None,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    names: Sequence[str] | None = None,
    default_skip: bool = True,
) -> list[str]:
    """Swap chosen ``nn.Linear`` modules for :class:`CodeGEMMLinear` shells, in place.

    The shells hold placeholder tensors (zero codes, zero codebooks, unit
    scales) on ``device``: the caller fills them (checkpoint loading, random
    init, quantization). ``names`` restricts the swap to exactly those modules
    (each must be an ``nn.Linear``); otherwise every linear not excluded by
    ``skip`` is swapped. Every layer is checked against ``config`` before any
    module changes. Returns the swapped names in model order.
    """
    config = as_config(config)
    if names is not None:
        chosen = []
        for name in names:
            module = get_module(model, name)
            if not isinstance(module, nn.Linear):
                raise ConfigError(f"module {name!r} must be an nn.Linear to be quantized; got {type(module).__name__}")
            chosen.append((name, module))
    else:
        chosen = list(iter_linears(model, skip, default_skip))
    shells = [(name, make_shell(module, config, device=device, dtype=dtype, name=name)) for name, module in chosen]
    for name, shell in shells:
        set_module(model, name, shell)
    return [name for name, _ in shells]


def quantized_modules(model: nn.Module) -> Iterator[tuple[str, CodeGEMMLinear]]:
    """``(dotted_name, module)`` of every :class:`CodeGEMMLinear` in ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, CodeGEMMLinear):
            yield name, module
