"""``CodeGEMMLinear``: a drop-in ``nn.Linear`` whose weight is stored as codes."""

from __future__ import annotations

import torch
from torch import nn

from codegemm import reference
from codegemm.config import CodebookConfig, as_config, nbits_for_codebook_size
from codegemm.errors import ConfigError, ShapeError
from codegemm.layout import can_tile, pack_codes, tile_codes, tile_scales, untile_codes, untile_scales
from codegemm.ops.dispatch import Backend, codebook_matmul
from codegemm.validation import check_activations, check_codes, check_float, check_shape, expected_shapes


class CodeGEMMLinear(nn.Module):
    """Linear layer over a codebook-quantized weight (layout: :mod:`codegemm.layout`).

    ``codebooks``, ``scales`` and ``bias`` are parameters (frozen by default) so
    that fine-tuning can train them; ``codes`` is an integer buffer.
    ``forward`` routes through :func:`codegemm.ops.codebook_matmul`, or through
    a differentiable dequantize-and-matmul when gradients are needed.
    :meth:`tile_` switches ``codes`` and ``scales`` to the tiled GPU layout
    (``tiled`` is then True); ``state_dict`` is row-major in either layout, and
    :meth:`row_tables` gives the row-major tensors.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        config: CodebookConfig | str,
        bias: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float16,
    ) -> None:
        super().__init__()
        config = as_config(config)
        config.check_layer(out_features, in_features)
        self.in_features = in_features
        self.out_features = out_features
        self.config = config
        self.backend: Backend = Backend.AUTO
        shapes = expected_shapes(config, out_features, in_features)
        self.register_buffer("codes", torch.zeros(shapes["codes"], dtype=config.code_dtype, device=device))
        self.codebooks = nn.Parameter(torch.zeros(shapes["codebooks"], dtype=dtype, device=device), requires_grad=False)
        self.scales = nn.Parameter(torch.ones(shapes["scales"], dtype=dtype, device=device), requires_grad=False)
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self.tiled = False  # codes [chunks, N, 32] and scales [K // g, N] (codegemm.layout) when True
        # Set by codegemm.siblings.fuse_siblings: the group whose launch also computes this layer.
        self._siblings = None
        self._sibling_index = 0

    @classmethod
    def from_unpacked(
        cls,
        codes: torch.Tensor,
        codebooks: torch.Tensor,
        scales: torch.Tensor,
        bias: torch.Tensor | None = None,
        config: CodebookConfig | str | None = None,
    ) -> CodeGEMMLinear:
        """Build a layer from ``codes [N, K//v, m]``, ``codebooks [m, 2**b, v]``, ``scales [N, K//g]``.

        The config is inferred from the shapes (``scales [N, 1]`` means per-row
        scales) or, when given, checked against them. Float tensors keep their
        dtype; codes are stored as uint8 (int32 beyond 8 bits).
        """
        check_float("codebooks", codebooks)
        if codebooks.dim() != 3:
            raise ShapeError(f"codebooks must have shape (m, 2**nbits, vec_len); got {tuple(codebooks.shape)}")
        m, size, v = codebooks.shape
        inferred_bits = nbits_for_codebook_size(size)
        if not isinstance(codes, torch.Tensor) or codes.dim() != 3:
            got = tuple(codes.shape) if isinstance(codes, torch.Tensor) else type(codes).__name__
            raise ShapeError(f"codes must have shape (out_features, in_features // vec_len, num_codebooks); got {got}")
        n, num_vectors, _ = codes.shape
        k = num_vectors * v
        check_float("scales", scales)
        if scales.dim() != 2 or scales.shape[0] != n or scales.shape[1] == 0 or k % scales.shape[1]:
            raise ShapeError(
                f"scales must have shape (out_features={n}, in_features // group_size) with in_features={k} "
                f"divisible by its second dimension (or (out_features, 1) for per-row scales); "
                f"got {tuple(scales.shape)}"
            )
        groups = scales.shape[1]
        inferred = CodebookConfig(
            num_codebooks=m,
            nbits=inferred_bits,
            vec_len=v,
            group_size=None if groups == 1 else k // groups,
        )
        if config is None:
            config = inferred
        else:
            config = as_config(config)
            per_row_equivalent = groups == 1 and config.group_size == k
            if config != inferred and not per_row_equivalent:
                raise ConfigError(f"config {config.name} does not match the tensors, which describe {inferred.name}")
        config.check_layer(n, k)
        shapes = expected_shapes(config, n, k)
        check_shape("codes", codes, shapes["codes"], "out_features, in_features // vec_len, num_codebooks")
        check_codes("codes", codes, config)
        if bias is not None:
            check_float("bias", bias)
            check_shape("bias", bias, (n,), "out_features")
        layer = cls(k, n, config, bias=bias is not None, device="meta", dtype=codebooks.dtype)
        layer.codes = pack_codes(codes, config)
        layer.codebooks = nn.Parameter(codebooks.detach().clone(), requires_grad=False)
        layer.scales = nn.Parameter(scales.detach().clone().reshape(shapes["scales"]), requires_grad=False)
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        return layer

    def row_tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(codes [N, K//v, m], scales [N, K//g])`` row-major: the buffers themselves, or when tiled a copy of
        the codes and a (differentiable) view of the scales."""
        if not self.tiled:
            return self.codes, self.scales
        return untile_codes(self.codes, self.config.num_codebooks), untile_scales(self.scales)

    def tile_(self) -> CodeGEMMLinear:
        """Switch to the tiled layout (:mod:`codegemm.layout`), which the CUDA kernels read with 4x fewer cache
        lines per warp; the other kernels then work on a row-major copy per call, so tile layers that run on
        the GPU. A no-op when already tiled or when the config does not tile (more than 8 bits, 32 % m != 0,
        K not in whole chunks). Returns ``self``."""
        if not self.tiled and can_tile(self.config, self.in_features):
            self.codes = tile_codes(self.codes)
            self.scales.data = tile_scales(self.scales.data)
            self.tiled = True
        return self

    def untile_(self) -> CodeGEMMLinear:
        """Back to the row-major layout; returns ``self``."""
        if self.tiled:
            codes, scales = self.row_tables()
            self.codes = codes
            self.scales.data = scales.contiguous()
            self.tiled = False
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.tiled:  # checkpoints are row-major whatever the layout in memory
            codes, scales = self.row_tables()
            destination[prefix + "codes"] = codes
            destination[prefix + "scales"] = scales.contiguous() if keep_vars else scales.detach().contiguous()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        tiled = self.tiled
        self.untile_()  # the state dict is row-major
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if tiled:
            self.tile_()

    def unpacked(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(codes int64 [N, K//v, m], codebooks [m, 2**b, v], scales [N, K//g])`` row-major."""
        codes, scales = self.row_tables()
        return codes.long(), self.codebooks.detach().clone(), scales.detach().clone()

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Dense weight ``[N, K]`` (in the codebooks' dtype unless ``dtype`` is given)."""
        dtype = dtype or self.codebooks.dtype
        codes, scales = self.row_tables()
        return reference.dequantize(codes, self.codebooks, scales, torch.float32).to(dtype)

    def _needs_grad(self, x: torch.Tensor) -> bool:
        return torch.is_grad_enabled() and (
            x.requires_grad
            or self.codebooks.requires_grad
            or self.scales.requires_grad
            or (self.bias is not None and self.bias.requires_grad)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., K] -> [..., N]`` in ``x``'s dtype, accumulated in float32."""
        check_activations(x, self.in_features)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if self._needs_grad(x):
            codes, scales = self.row_tables()
            weight = reference.dequantize(codes, self.codebooks, scales, torch.float32)
            bias = None if self.bias is None else self.bias.float()
            out = torch.nn.functional.linear(x2.float(), weight, bias).to(x.dtype)
        else:
            out = None if self._siblings is None else self._siblings.matmul(self._sibling_index, x, x2)
            if out is None:
                out = codebook_matmul(x2, self.codes, self.codebooks, self.scales, self.bias, self.config, self.backend,
                                      self.tiled)
        return out.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, config={self.config.name}, "
            f"bias={self.bias is not None}" + (", tiled" if self.tiled else "")
        )
