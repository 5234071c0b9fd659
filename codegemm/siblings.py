"""Sibling projections that read the same activations (q/k/v, gate/up), computed in one kernel launch.

A decode step's matmuls are small. Llama-3-8B's ``k_proj`` and ``v_proj`` have 1024 output rows:
one launch each fills a fraction of an H100's SMs and pays its own launch and split-K reduction.
Grouped, q/k/v become one 6144-row launch and gate/up one 28672-row launch; each segment of the
launch keeps its own codebooks, codes and scales, so the checkpoint and the modules stay as they are.

How the calls meet: the transformers modules still call ``q_proj(h)``, ``k_proj(h)``, ``v_proj(h)``
one after another. The first member called runs the whole group on ``h`` and keeps its siblings'
outputs; a sibling called with that same tensor object takes its output and drops it. A sibling
called with another input while its output is waiting, or any member when no grouped kernel fits the
call (CPU, prefill, fine-tuning) or a sibling's weights are not on the input's device (offloaded), runs alone, so grouping never changes what a module computes, only
how many launches it takes. This works
eagerly, under ``torch.compile(fullgraph=True)`` and in captured CUDA graphs.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from codegemm.errors import ConfigError
from codegemm.nn import CodeGEMMLinear
from codegemm.ops.cuda import GATE_ACT_FUNCTIONS, GATE_ACTS, SEGMENT_ROW_MULTIPLE
from codegemm.ops.dispatch import gated_matmul, grouped_matmul

SIBLING_NAMES: tuple[tuple[str, ...], ...] = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
"""Child names of one parent module that read the same input in decoder-only transformers models."""

GATED_MLP_FORWARD = "self.down_proj(self.act_fn(self.gate_proj(x))*self.up_proj(x))"
"""The gated MLP of transformers' Llama-family models (Llama, Mistral, Qwen2/3, Gemma 1-3 ...), whitespace removed:
parents whose ``forward`` computes this get the activation fused into the gate/up launch."""

MAX_SIBLINGS = 4
"""Layers one grouped launch serves (``MAX_SEGMENTS`` of the CUDA kernels)."""


class SiblingGroup:
    """Sibling :class:`CodeGEMMLinear` layers with one input, one config, one K; run as one matmul."""

    def __init__(self, members: Sequence[CodeGEMMLinear]) -> None:
        members = list(members)
        if not 2 <= len(members) <= MAX_SIBLINGS:
            raise ConfigError(f"members must hold 2 to {MAX_SIBLINGS} layers; got {len(members)}")
        first = members[0]
        for layer in members:
            if not isinstance(layer, CodeGEMMLinear):
                raise ConfigError(f"members must be CodeGEMMLinear layers; got {type(layer).__name__}")
            same = (layer.in_features, layer.config, layer.backend, layer.codebooks.dtype, layer.codes.device)
            if same != (first.in_features, first.config, first.backend, first.codebooks.dtype, first.codes.device):
                raise ConfigError(
                    "members must share in_features, config, backend, codebook dtype and device; got "
                    f"{[(m.in_features, m.config.name, m.backend.value, m.codebooks.dtype, str(m.codes.device)) for m in members]}"
                )
        self.members = members  # a plain list: the group is not a submodule, state_dict is unchanged
        self.sizes = [layer.out_features for layer in members]
        self._pending: tuple[torch.Tensor, dict[int, torch.Tensor]] | None = None

    def _bias(self) -> torch.Tensor | None:
        biases = [layer.bias for layer in self.members]
        if all(b is None for b in biases):
            return None
        like = next(b for b in biases if b is not None)
        return torch.cat([like.new_zeros(n) if b is None else b for b, n in zip(biases, self.sizes)])

    def matmul(self, index: int, x: torch.Tensor, x2: torch.Tensor) -> torch.Tensor | None:
        """Member ``index``'s output ``[T, N_index]`` for input ``x`` (``x2``: its ``[T, K]`` view), or None
        when the member has to run alone."""
        pending = self._pending
        if pending is not None and index in pending[1]:
            if pending[0] is not x:
                return None  # the group ran on another input, which this sibling does not read
            out = pending[1].pop(index)
            if not pending[1]:
                self._pending = None
            return out
        first = self.members[0]
        layers = [(layer.codes, layer.codebooks, layer.scales) for layer in self.members]
        if any(codes.device != x.device for codes, _, _ in layers):
            return None  # e.g. a sibling offloaded by accelerate: its weights arrive only in its own forward
        if any(layer.tiled != first.tiled for layer in self.members):
            return None  # one launch reads one layout
        out = grouped_matmul(x2, layers, self._bias(), first.config, first.backend, first.tiled)
        if out is None:
            return None
        outs = out.split(self.sizes, dim=1)
        rest = {i: out for i, out in enumerate(outs) if i != index}
        self._pending = (x, rest)
        return outs[index]


    def gated(self, x: torch.Tensor, act: str) -> torch.Tensor | None:
        """``act(gate(x)) * up(x)`` for the group ``[gate, up]`` in one launch, the activation applied in its
        split-K reduce; None when that does not fit the call (training, CPU, prefill, offloaded weights)."""
        gate, up = self.members
        if x.shape[-1] != gate.in_features or gate._needs_grad(x) or up._needs_grad(x):
            return None
        if gate.tiled != up.tiled or any(layer.codes.device != x.device for layer in self.members):
            return None
        layers = [(layer.codes, layer.codebooks, layer.scales) for layer in self.members]
        out = gated_matmul(x.reshape(-1, gate.in_features), layers, self._bias(), gate.config, act, gate.backend,
                           gate.tiled)
        return None if out is None else out.reshape(*x.shape[:-1], gate.out_features)


def gated_activation(parent: nn.Module) -> str | None:
    """Which of :data:`codegemm.ops.cuda.GATE_ACTS` a gated MLP ``parent`` applies to its gate: its ``forward`` must
    be :data:`GATED_MLP_FORWARD` and its ``act_fn`` must compute that activation (probed, whatever its class)."""
    try:
        source = inspect.getsource(type(parent).forward)
    except (OSError, TypeError):
        return None
    act_fn = getattr(parent, "act_fn", None)
    if GATED_MLP_FORWARD not in "".join(source.split()) or not callable(act_fn):
        return None
    probe = torch.linspace(-8.0, 8.0, 161, dtype=torch.float64)
    try:
        got = act_fn(probe)
    except Exception:  # noqa: BLE001 - an activation that cannot take a float64 CPU tensor is not one we know
        return None
    for name, fn in GATE_ACT_FUNCTIONS.items():
        expected = fn(probe)
        if isinstance(got, torch.Tensor) and got.shape == expected.shape and torch.allclose(got, expected, 1e-6, 1e-9):
            return name
    return None


def _fuse_gated_mlp(parent: nn.Module, group: SiblingGroup, act: str) -> None:
    """Give ``parent`` (a :data:`GATED_MLP_FORWARD` module) a forward that runs gate, up and the activation as
    one launch where it fits, and its own forward otherwise."""
    assert act in GATE_ACTS
    own_forward = type(parent).forward

    def forward(x: torch.Tensor) -> torch.Tensor:
        hidden = group.gated(x, act)
        if hidden is None:
            return own_forward(parent, x)
        return parent.down_proj(hidden)

    parent.forward = forward
    parent._codegemm_gated = True


def _find_groups(model: nn.Module, names: Iterable[Sequence[str]]) -> list[tuple[nn.Module, list[CodeGEMMLinear]]]:
    found = []
    for parent in model.modules():
        for group in names:
            members = [getattr(parent, name, None) for name in group]
            if all(isinstance(m, CodeGEMMLinear) for m in members):
                found.append((parent, members))
    return found


def fuse_siblings(model: nn.Module, names: Iterable[Sequence[str]] = SIBLING_NAMES,
                  row_multiple: int | None = None) -> int:
    """Group the sibling projections of ``model`` (children named as in ``names`` of one parent, all
    :class:`CodeGEMMLinear`, same K and config); returns how many groups were made. Idempotent.

    Sets whose layers (but the last) are not ``row_multiple`` rows apart (default
    :data:`codegemm.ops.cuda.SEGMENT_ROW_MULTIPLE`) stay separate: the grouped CUDA kernels need each
    layer to start on a block boundary and would otherwise run them one by one and copy the outputs
    together (e.g. Gemma 3 270M's 256-row k/v).

    Only group children that read the same tensor (self-attention q/k/v, gated-MLP gate/up): a sibling
    called with another input still computes correctly, but the first member's call did its work for nothing.
    """
    row_multiple = SEGMENT_ROW_MULTIPLE if row_multiple is None else row_multiple
    made = 0
    for parent, members in _find_groups(model, names):
        if any(m._siblings is not None for m in members):
            continue
        if any(m.out_features % row_multiple for m in members[:-1]):
            continue
        try:
            group = SiblingGroup(members)
        except ConfigError:
            continue  # e.g. different K or config: they run alone
        for index, layer in enumerate(members):
            layer._siblings, layer._sibling_index = group, index
        gated = len(members) == 2 and isinstance(getattr(parent, "down_proj", None), nn.Module)
        act = gated_activation(parent) if gated else None
        if act is not None and members[0].out_features == members[1].out_features:
            _fuse_gated_mlp(parent, group, act)
        made += 1
    return made


def unfuse_siblings(model: nn.Module) -> None:
    """Undo :func:`fuse_siblings`: every layer runs alone again."""
    for module in model.modules():
        if isinstance(module, CodeGEMMLinear):
            module._siblings, module._sibling_index = None, 0
        if module.__dict__.pop("_codegemm_gated", False):
            del module.forward
