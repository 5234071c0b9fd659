"""The codebook format's settings: one small frozen dataclass with a short name."""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import torch

from codegemm.errors import ConfigError

FORMAT_VERSION = 1
"""Version of the on-disk checkpoint format written by this library."""

MAX_PSUMBOOK_NBITS = 8
"""The Psumbook kernels keep ``2**nbits`` partial sums per vector on chip."""

_NAME_RE = re.compile(r"^m(?P<m>\d+)(?:b(?P<b>\d+))?v(?P<v>\d+)(?:g(?P<g>-1|\d+))?$")


@dataclasses.dataclass(frozen=True)
class CodebookConfig:
    """Additive-quantization format ``m{num_codebooks}[b{nbits}]v{vec_len}[g{group_size}]``.

    Each run of ``vec_len`` input weights of an output row is the sum of one
    centroid from each of ``num_codebooks`` codebooks of ``2**nbits`` entries,
    times a scale shared by ``group_size`` consecutive inputs of that row.
    ``group_size=None`` (written ``-1`` or left out of the name) means one scale
    per output row.
    """

    num_codebooks: int = 2
    nbits: int = 8
    vec_len: int = 8
    group_size: int | None = 128

    def __post_init__(self) -> None:
        for field in ("num_codebooks", "nbits", "vec_len"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"{field} must be an int; got {type(value).__name__} {value!r}")
        if not 1 <= self.num_codebooks <= 8:
            raise ConfigError(f"num_codebooks must be in 1..8; got {self.num_codebooks}")
        if not 1 <= self.nbits <= 16:
            raise ConfigError(f"nbits must be in 1..16 (1..8 for the Psumbook kernels); got {self.nbits}")
        if not 1 <= self.vec_len <= 64:
            raise ConfigError(f"vec_len must be in 1..64; got {self.vec_len}")
        g = self.group_size
        if g == -1:
            object.__setattr__(self, "group_size", None)
        elif g is not None:
            if isinstance(g, bool) or not isinstance(g, int):
                raise ConfigError(f"group_size must be an int or None (per-row scales); got {g!r}")
            if g <= 0 or g % self.vec_len:
                raise ConfigError(
                    f"group_size must be a positive multiple of vec_len={self.vec_len} "
                    f"or None for per-row scales; got {g}"
                )

    @property
    def codebook_size(self) -> int:
        """Centroids per codebook, ``2**nbits``."""
        return 1 << self.nbits

    @property
    def code_dtype(self) -> torch.dtype:
        """Storage dtype of codes: one byte up to 8 bits, int32 beyond."""
        return torch.uint8 if self.nbits <= 8 else torch.int32

    @property
    def supports_psumbook(self) -> bool:
        """Whether the Psumbook kernels can run this config (``nbits <= 8``)."""
        return self.nbits <= MAX_PSUMBOOK_NBITS

    @property
    def name(self) -> str:
        """Short form used by the paper, e.g. ``"m2v8g128"`` or ``"m2b6v8g128"``."""
        bits = "" if self.nbits == 8 else f"b{self.nbits}"
        group = "" if self.group_size is None else f"g{self.group_size}"
        return f"m{self.num_codebooks}{bits}v{self.vec_len}{group}"

    @classmethod
    def from_name(cls, name: str) -> CodebookConfig:
        """Parse a short name such as ``"m2v8g128"``; the inverse of :attr:`name`."""
        match = _NAME_RE.match(name.strip()) if isinstance(name, str) else None
        if match is None:
            raise ConfigError(
                f"name must look like 'm2v8g128' (m<codebooks>[b<bits>]v<vec_len>[g<group>|g-1]); got {name!r}"
            )
        group = match["g"]
        return cls(
            num_codebooks=int(match["m"]),
            nbits=int(match["b"]) if match["b"] else 8,
            vec_len=int(match["v"]),
            group_size=None if group in (None, "-1") else int(group),
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (``group_size`` None means per-row scales)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CodebookConfig:
        """Build from :meth:`to_dict` output; unknown keys are an error."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - fields
        if unknown:
            raise ConfigError(f"config has unknown fields {sorted(unknown)}; expected a subset of {sorted(fields)}")
        return cls(**data)

    def num_groups(self, in_features: int) -> int:
        """Scale columns per output row for a layer with ``in_features`` inputs."""
        return 1 if self.group_size is None else in_features // self.group_size

    def check_layer(self, out_features: int, in_features: int) -> None:
        """Raise :class:`ConfigError` unless this config divides the layer's dimensions."""
        if out_features <= 0 or in_features <= 0:
            raise ConfigError(f"layer dimensions must be positive; got out={out_features}, in={in_features}")
        if in_features % self.vec_len:
            raise ConfigError(
                f"in_features={in_features} must be a multiple of vec_len={self.vec_len} for config {self.name}"
            )
        if self.group_size is not None and in_features % self.group_size:
            raise ConfigError(
                f"in_features={in_features} must be a multiple of group_size={self.group_size} for config {self.name}"
            )

    def bits_per_weight(self, out_features: int, in_features: int) -> float:
        """Exact storage cost per weight: codes, fp16 scales and fp16 codebooks."""
        self.check_layer(out_features, in_features)
        code_bits = out_features * (in_features // self.vec_len) * self.num_codebooks * self.nbits
        scale_bits = out_features * self.num_groups(in_features) * 16
        codebook_bits = self.num_codebooks * self.codebook_size * self.vec_len * 16
        return (code_bits + scale_bits + codebook_bits) / (out_features * in_features)


def as_config(config: CodebookConfig | str) -> CodebookConfig:
    """Accept a config object or its short name at public entry points."""
    if isinstance(config, CodebookConfig):
        return config
    if isinstance(config, str):
        return CodebookConfig.from_name(config)
    raise ConfigError(f"config must be a CodebookConfig or a name like 'm2v8g128'; got {type(config).__name__}")


def is_power_of_two(n: int) -> bool:
    return n > 0 and (n & (n - 1)) == 0


def nbits_for_codebook_size(size: int) -> int:
    """``log2`` of a codebook size; raises unless it is a power of two."""
    if not is_power_of_two(size):
        raise ConfigError(f"codebook size must be a power of two (2**nbits); got {size}")
    return int(math.log2(size))
