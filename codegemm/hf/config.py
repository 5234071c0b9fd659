"""The ``quantization_config`` block that a CodeGEMM checkpoint's ``config.json`` carries.

Written by :func:`codegemm.hf.attach_quantization_config`, read back by
transformers through :class:`CodeGEMMQuantizationConfig` (see docs/FORMAT.md)::

    "quantization_config": {
      "quant_method": "codegemm", "format_version": 1, "config": "m2v8g128",
      "num_codebooks": 2, "nbits": 8, "vec_len": 8, "group_size": 128,
      "modules_not_quantized": ["lm_head"]
    }
"""

from __future__ import annotations

import logging
from typing import Any

from transformers.utils.quantization_config import QuantizationConfigMixin

from codegemm.config import FORMAT_VERSION, CodebookConfig
from codegemm.errors import CheckpointError, CodeGEMMError

logger = logging.getLogger(__name__)

QUANT_METHOD = "codegemm"
"""``quant_method`` under which the config and quantizer are registered with transformers."""

_EXPLICIT_FIELDS = ("num_codebooks", "nbits", "vec_len", "group_size")
_UNSET: Any = object()


class CodeGEMMQuantizationConfig(QuantizationConfigMixin):
    """Quantization settings of a CodeGEMM checkpoint, in transformers' config protocol.

    ``config`` is the :class:`~codegemm.CodebookConfig` (or its name) shared by
    every quantized linear; the explicit fields repeat it so the JSON is
    readable without parsing names, and must agree with it.
    ``modules_not_quantized`` lists the ``nn.Linear`` modules that stay dense
    (full dotted names; suffixes and ``re:`` regexes as in
    :mod:`codegemm.surgery` are accepted too): every other ``nn.Linear`` of the
    model is expected as codes in the checkpoint. Raises
    :class:`~codegemm.CheckpointError` on an unknown ``format_version`` or on
    fields that contradict each other.
    """

    def __init__(
        self,
        config: CodebookConfig | str = "m2v8g128",
        modules_not_quantized: list[str] | tuple[str, ...] | None = None,
        format_version: int = FORMAT_VERSION,
        num_codebooks: int | None = _UNSET,
        nbits: int | None = _UNSET,
        vec_len: int | None = _UNSET,
        group_size: int | None = _UNSET,
        quant_method: str = QUANT_METHOD,
        **kwargs: Any,
    ) -> None:
        if quant_method != QUANT_METHOD:
            raise CheckpointError(f"quantization_config.quant_method must be {QUANT_METHOD!r}; got {quant_method!r}")
        if isinstance(format_version, bool) or not isinstance(format_version, int) or format_version != FORMAT_VERSION:
            raise CheckpointError(
                f"quantization_config.format_version must be {FORMAT_VERSION} (the version this codegemm reads); "
                f"got {format_version!r}: upgrade codegemm or re-export the checkpoint"
            )
        try:
            parsed = config if isinstance(config, CodebookConfig) else CodebookConfig.from_name(config)
        except CodeGEMMError as err:
            raise CheckpointError(f"quantization_config.config: {err}") from err
        given = {"num_codebooks": num_codebooks, "nbits": nbits, "vec_len": vec_len, "group_size": group_size}
        for field in _EXPLICIT_FIELDS:
            value = given[field]
            if value is _UNSET:
                continue
            if field == "group_size" and value == -1:
                value = None
            if value != getattr(parsed, field):
                raise CheckpointError(
                    f"quantization_config.{field}={value!r} contradicts config {parsed.name!r} "
                    f"(which has {field}={getattr(parsed, field)!r})"
                )
        if modules_not_quantized is None:
            modules_not_quantized = []
        if isinstance(modules_not_quantized, str) or not all(isinstance(n, str) for n in modules_not_quantized):
            raise CheckpointError(
                "quantization_config.modules_not_quantized must be a list of module names; "
                f"got {modules_not_quantized!r}"
            )
        if kwargs:
            logger.warning("ignoring unknown quantization_config fields %s", sorted(kwargs))
        self.quant_method = QUANT_METHOD
        self.format_version = FORMAT_VERSION
        self.config = parsed.name
        self.num_codebooks = parsed.num_codebooks
        self.nbits = parsed.nbits
        self.vec_len = parsed.vec_len
        self.group_size = parsed.group_size
        self.modules_not_quantized = list(modules_not_quantized)

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], return_unused_kwargs: bool = False, **kwargs: Any):
        """Read the JSON block; unlike the constructor, a missing ``format_version`` is an error."""
        if not isinstance(config_dict, dict) or "format_version" not in config_dict:
            raise CheckpointError(
                f"quantization_config.format_version is missing; a CodeGEMM checkpoint must declare it "
                f"(this codegemm reads {FORMAT_VERSION})"
            )
        return super().from_dict(config_dict, return_unused_kwargs=return_unused_kwargs, **kwargs)

    @property
    def codebook_config(self) -> CodebookConfig:
        """The :class:`~codegemm.CodebookConfig` of every quantized linear."""
        return CodebookConfig(self.num_codebooks, self.nbits, self.vec_len, self.group_size)

    def to_dict(self) -> dict[str, Any]:
        """The JSON block, in a fixed field order (``group_size`` null means per-row scales)."""
        return {
            "quant_method": QUANT_METHOD,
            "format_version": self.format_version,
            "config": self.config,
            "num_codebooks": self.num_codebooks,
            "nbits": self.nbits,
            "vec_len": self.vec_len,
            "group_size": self.group_size,
            "modules_not_quantized": list(self.modules_not_quantized),
        }

    def to_diff_dict(self) -> dict[str, Any]:
        """Same as :meth:`to_dict`: every field is always written (transformers 4.x calls this)."""
        return self.to_dict()

    def __iter__(self):
        yield from self.to_dict().items()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CodeGEMMQuantizationConfig) and self.to_dict() == other.to_dict()

    __hash__ = None  # type: ignore[assignment]
