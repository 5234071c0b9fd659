"""Knobs of the quantizer, and the named presets ``fast`` and ``best``."""

from __future__ import annotations

import dataclasses
from typing import Any

from codegemm.errors import ConfigError

METHODS = ("aq", "rtn")


@dataclasses.dataclass(frozen=True)
class QuantOptions:
    """Settings of :func:`codegemm.quantize` / :func:`codegemm.quantize_linear`.

    The layer search alternates a beam search over codes with Adam steps on
    codebooks and scales until the relative error improves by less than
    ``tol`` (at most ``max_rounds`` rounds). Block fine-tuning then trains
    codebooks, scales and norms of each block against the original block's
    outputs for ``finetune_epochs`` passes over the calibration samples;
    ``finetune_teacher`` in [0, 1] moves that target towards the unquantized
    model's own hidden states (1: only them), so each block also corrects the
    drift that earlier blocks' errors left in its inputs. Global fine-tuning
    (``global_epochs``) finally trains every codebook, scale and norm of the
    model at once on ``KL(original || quantized)`` of the next-token
    distributions (see :mod:`codegemm.quant.global_finetune`).
    """

    method: str = "aq"
    seed: int = 0
    kmeans_iters: int = 12
    kmeans_points: int = 1 << 16
    beam_size: int = 1
    max_rounds: int = 3
    tol: float = 0.01
    adam_steps: int = 25
    adam_lr: float = 1e-3
    finetune_epochs: int = 0
    finetune_lr: float = 1e-4
    finetune_batch: int = 1
    finetune_teacher: float = 0.0
    global_epochs: int = 0
    global_lr: float = 1e-4
    global_batch: int = 1
    skip: tuple[str, ...] = ()
    """Names (exact or regular expressions) of linears to keep dense, besides lm_head and embeddings."""

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"method must be one of {METHODS}; got {self.method!r}")
        for field in ("kmeans_iters", "kmeans_points", "beam_size", "max_rounds", "finetune_batch", "global_batch"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{field} must be an int >= 1; got {value!r}")
        for field in ("adam_steps", "finetune_epochs", "global_epochs", "seed"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"{field} must be an int >= 0; got {value!r}")
        for field in ("tol", "adam_lr", "finetune_lr", "global_lr"):
            value = getattr(self, field)
            if not isinstance(value, (int, float)) or not value >= 0:
                raise ConfigError(f"{field} must be a number >= 0; got {value!r}")
        mix = self.finetune_teacher
        if isinstance(mix, bool) or not isinstance(mix, (int, float)) or not 0.0 <= mix <= 1.0:
            raise ConfigError(f"finetune_teacher must be a number in [0, 1]; got {mix!r}")
        if isinstance(self.skip, str):
            object.__setattr__(self, "skip", (self.skip,))
        object.__setattr__(self, "skip", tuple(self.skip))

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["skip"] = list(self.skip)
        return out


PRESETS: dict[str, dict[str, Any]] = {
    "fast": dict(beam_size=1, max_rounds=2, adam_steps=8, kmeans_iters=8, kmeans_points=1 << 15, finetune_epochs=0,
                 global_epochs=1, global_lr=1e-4),
    "best": dict(beam_size=2, max_rounds=2, adam_steps=15, kmeans_iters=10, kmeans_points=1 << 15,
                 finetune_epochs=2, finetune_lr=2e-4, global_epochs=2, global_lr=1e-4),
}
"""Named option sets; ``fast`` keeps the no-argument CLI run within minutes on a small CPU."""

PRESET_DATA = {"fast": dict(nsamples=32, seqlen=512), "best": dict(nsamples=64, seqlen=512)}
"""Calibration size each preset uses unless the user sets --nsamples/--seqlen."""


def make_options(preset: str | None = None, **overrides: Any) -> QuantOptions:
    """Options from a preset name (or the defaults) with keyword overrides on top."""
    base: dict[str, Any] = {}
    if preset is not None:
        if preset not in PRESETS:
            raise ConfigError(f"preset must be one of {sorted(PRESETS)}; got {preset!r}")
        base.update(PRESETS[preset])
    fields = {f.name for f in dataclasses.fields(QuantOptions)}
    unknown = set(overrides) - fields
    if unknown:
        raise ConfigError(f"unknown quantization options {sorted(unknown)}; expected some of {sorted(fields)}")
    base.update({k: v for k, v in overrides.items() if v is not None})
    return QuantOptions(**base)
