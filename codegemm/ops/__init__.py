"""Matmul kernels and the one dispatcher that chooses among them."""

from codegemm.ops.dispatch import Backend, codebook_matmul, register_kernel, select_kernel

__all__ = ["Backend", "codebook_matmul", "register_kernel", "select_kernel"]
