"""The fused q/k RMSNorm + RoPE kernel against the PyTorch path (runs where CUDA and Triton are;
the CPU path is covered by the processor tests in test_accel.py)."""

from __future__ import annotations

import pytest
import torch

from zturbo.accel import kernels

cuda_triton = pytest.mark.skipif(
    not torch.cuda.is_available() or kernels.fused_op() is None, reason="needs a CUDA GPU and Triton"
)


@pytest.mark.gpu
@cuda_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_fused_kernel_matches_the_pytorch_path_on_strided_views(dtype):
    torch.manual_seed(0)
    heads, dim, tokens = 6, 128, 77
    qkv = torch.randn(2, tokens, 3 * heads * dim, device="cuda", dtype=dtype) * 3
    q, k, _ = (t.unflatten(-1, (heads, dim)) for t in qkv.chunk(3, dim=-1))
    wq, wk = ((1 + 0.1 * torch.randn(dim, device="cuda")).to(dtype) for _ in range(2))
    angles = torch.rand(2, tokens, dim // 2, device="cuda") * 50
    cos_sin = torch.view_as_real(torch.polar(torch.ones_like(angles), angles))
    want = kernels.reference(q, k, wq, wk, cos_sin, 1e-5)
    got = kernels.fused_op()(q, k, wq, wk, cos_sin, 1e-5)
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape and g.dtype == w.dtype and g.is_contiguous()
        assert float((g.double() - w.double()).norm() / w.double().norm()) < 1e-4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_reference_is_diffusers_rms_norm_then_the_processors_rope(dtype):
    # The CUDA test above holds the kernel to `reference`; this holds `reference` to diffusers.
    from diffusers.models.normalization import RMSNorm

    torch.manual_seed(0)
    q, k = (torch.randn(2, 5, 3, 8).to(dtype) * 3 for _ in range(2))
    norms = [RMSNorm(8, eps=1e-5).to(dtype) for _ in range(2)]
    for norm in norms:
        norm.weight.data = (1 + 0.1 * torch.randn(8)).to(dtype)
    angles = torch.rand(2, 5, 4) * 50
    cos_sin = torch.view_as_real(torch.polar(torch.ones_like(angles), angles))
    got = kernels.reference(q, k, norms[0].weight, norms[1].weight, cos_sin, 1e-5)
    with torch.no_grad():
        want = [kernels.rope(norm(x), cos_sin.unsqueeze(2)) for norm, x in zip(norms, (q, k), strict=True)]
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype and torch.equal(g, w)


@pytest.mark.gpu
@cuda_triton
def test_fused_kernel_takes_q_and_k_of_different_layouts():
    # One launch reads q and k with one set of strides; a contiguous q beside a strided k must
    # still give the reference result.
    torch.manual_seed(0)
    heads, dim, tokens = 5, 128, 33
    q = torch.randn(1, tokens, heads, dim, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, tokens, 2 * heads * dim, device="cuda", dtype=torch.bfloat16)[..., : heads * dim]
    k = k.unflatten(-1, (heads, dim))
    w = torch.ones(dim, device="cuda", dtype=torch.bfloat16)
    angles = torch.rand(1, tokens, dim // 2, device="cuda") * 50
    cos_sin = torch.view_as_real(torch.polar(torch.ones_like(angles), angles))
    got, expected = kernels.fused_op()(q, k, w, w, cos_sin, 1e-5), kernels.reference(q, k, w, w, cos_sin, 1e-5)
    for g, e in zip(got, expected, strict=True):
        assert float((g.double() - e.double()).norm() / e.double().norm()) < 1e-4
