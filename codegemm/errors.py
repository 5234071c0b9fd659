"""Typed exceptions raised at the public boundary.

Every error derives from :class:`CodeGEMMError` (a ``ValueError``), so callers
can catch the library's errors as a group while the subclasses say what kind
of input was wrong. Messages always name the argument, the rule and what was
received.
"""

from __future__ import annotations


class CodeGEMMError(ValueError):
    """Base class of every error the library raises on bad input."""


class ConfigError(CodeGEMMError):
    """A :class:`~codegemm.CodebookConfig` field, or a config name, is invalid."""


class ShapeError(CodeGEMMError):
    """A tensor argument has the wrong rank or shape."""


class DTypeError(CodeGEMMError, TypeError):
    """A tensor argument has the wrong dtype or lives on the wrong device."""


class RangeError(CodeGEMMError):
    """A tensor holds values outside the allowed range (codes too large, NaN/Inf)."""


class CheckpointError(CodeGEMMError):
    """A checkpoint on disk is malformed: missing or inconsistent tensors, unknown version."""


class UnsupportedError(CodeGEMMError):
    """The request is valid but no backend supports it (e.g. a kernel for nbits > 8)."""
