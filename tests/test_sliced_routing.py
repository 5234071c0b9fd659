"""Routing of 17-64-token calls on CUDA (no GPU needed: the dispatcher only reads the device type): configs of the
CUDA library run as slices of at most 16 tokens, other configs and longer calls rebuild the dense weight."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from codegemm import CodebookConfig  # noqa: E402
from codegemm.ops.dispatch import Backend, select_grouped_kernel, select_kernel  # noqa: E402
from codegemm.ops.cuda import token_slices  # noqa: E402
from codegemm.ops.triton_kernels import PSUMBOOK_MAX_TOKENS, SLICED_MAX_TOKENS  # noqa: E402

CUDA = torch.device("cuda")


@pytest.mark.parametrize("tokens", [17, 18, 31, 32, 33, 47, 64, 100])
def test_token_slices_cover_every_row_once_full_slices_first(tokens):
    slices = token_slices(tokens)
    assert slices[0][0] == 0 and slices[-1][1] == tokens
    assert all(a[1] == b[0] for a, b in zip(slices, slices[1:]))
    sizes = [b - a for a, b in slices]
    assert all(size == PSUMBOOK_MAX_TOKENS for size in sizes[:-1]) and 1 <= sizes[-1] <= PSUMBOOK_MAX_TOKENS


@pytest.mark.parametrize("name", ["m2v8g128", "m1v4g128", "m2v8"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_configs_slice_up_to_the_limit(name, dtype):
    config = CodebookConfig.from_name(name)
    assert select_kernel(CUDA, config, PSUMBOOK_MAX_TOKENS, dtype).name == "cuda_codebook_mma"
    for tokens in (PSUMBOOK_MAX_TOKENS + 1, SLICED_MAX_TOKENS):
        assert select_kernel(CUDA, config, tokens, dtype).name == "cuda_sliced"
        assert select_grouped_kernel(CUDA, config, tokens, dtype).name == "cuda_grouped_sliced"
    assert select_kernel(CUDA, config, SLICED_MAX_TOKENS + 1, dtype).name == "dequant_dense"
    assert select_grouped_kernel(CUDA, config, SLICED_MAX_TOKENS + 1, dtype) is None


def test_other_configs_and_backends_keep_their_paths():
    assert select_kernel(CUDA, CodebookConfig.from_name("m2v4g128"), 17, torch.float16).name == "dequant_dense"
    config = CodebookConfig.from_name("m2v8g128")
    assert select_kernel(CUDA, config, 17, torch.float32).name != "cuda_sliced"
    assert select_kernel(CUDA, config, 17, torch.float16, Backend.TRITON).name == "triton_dequant_gemm"


@pytest.mark.parametrize("gate_act", [0, 1])
def test_groups_the_grouped_kernel_cannot_take_go_layer_by_layer_above_16_tokens(monkeypatch, gate_act):
    """A 17-64-token group that the grouped launch does not fit runs each layer through the codebook op (slices or the
    rebuild), never a per-layer Psumbook call, which takes at most 16 tokens."""
    from codegemm import reference
    from codegemm.ops import custom_ops

    gen = torch.Generator().manual_seed(0)
    layers = [(torch.randint(0, 256, (n, 32, 2), generator=gen, dtype=torch.uint8),
               torch.randn(2, 256, 8, generator=gen).half(), torch.rand(n, 2, generator=gen).half()) for n in (64, 64)]
    x = torch.randn(20, 256, generator=gen).half()
    calls = []

    def single(x, codes, codebooks, scales, bias, tiled):
        calls.append(x.shape[0])
        return reference.dense_matmul(x, codes, codebooks, scales, bias, torch.float32).to(x.dtype)

    monkeypatch.setattr(custom_ops, "grouped_eligible", lambda *args, **kwargs: False)
    monkeypatch.setattr(custom_ops, "mma_rows_per_block", lambda *args, **kwargs: 256)
    monkeypatch.setattr(custom_ops, "psumbook_mma_chosen", lambda *args, **kwargs: False)
    monkeypatch.setattr(custom_ops, "_codebook_mma_gpu", single)
    monkeypatch.setattr(custom_ops, "_psumbook_gpu", lambda *args: pytest.fail("Psumbook call above 16 tokens"))
    out = custom_ops._grouped_gpu(x, *map(list, zip(*layers)), None, gate_act=gate_act)
    want = torch.cat([single(x, *layer, None, False) for layer in layers], dim=1)
    want = custom_ops.gate(want, gate_act) if gate_act else want
    assert calls == [20] * 4
    torch.testing.assert_close(out, want, rtol=0, atol=0)
