"""The Triton kernel behind `kernels.fused_op()`: per-head RMSNorm of q and k, then the rotary
rotation, in one launch. Importing this module needs Triton; `kernels` imports it lazily."""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton


@triton.jit
def _rms_normalize(x, w, eps, D: tl.constexpr, ROUND_WEIGHT: tl.constexpr):
    """(BLOCK_H, D) rows normalized and weighted in float32, rounded where eager rounds."""
    xf = x.to(tl.float32)
    inv = tl.rsqrt(tl.sum(xf * xf, axis=1) / D + eps)[:, None]
    if ROUND_WEIGHT:  # noqa: SIM108 (a constexpr branch)  half-precision weight: eager rounds twice
        n = ((xf * inv).to(w.dtype) * w).to(tl.float32)
    else:
        n = xf * inv * w.to(tl.float32)
    return n


@triton.jit
def _rotate(n, cs_row_ptr, D: tl.constexpr, BLOCK_H: tl.constexpr):
    """Pairs (x0, x1) -> (x0 cos - x1 sin, x0 sin + x1 cos), split out of registers: each element
    is loaded once (a second load of each rotation partner cost 2.5x the time)."""
    n0, n1 = tl.split(tl.reshape(n, (BLOCK_H, D // 2, 2)))
    cos, sin = tl.split(tl.reshape(tl.load(cs_row_ptr + tl.arange(0, D)), (D // 2, 2)))
    y = tl.join(n0 * cos[None, :] - n1 * sin[None, :], n0 * sin[None, :] + n1 * cos[None, :])
    return tl.reshape(y, (BLOCK_H, D))


@triton.jit
def qk_norm_rope_kernel(
    q_ptr,
    k_ptr,
    wq_ptr,
    wk_ptr,
    cs_ptr,
    out_q_ptr,
    out_k_ptr,
    seq,
    heads,
    sxb,
    sxs,
    sxh,
    scb,
    scs,
    eps,
    D: tl.constexpr,
    BLOCK_H: tl.constexpr,
    ROUND_WEIGHT: tl.constexpr,
):
    """Program (token row, head block, q or k): BLOCK_H heads of one token of q (axis 2 = 0) or k."""
    row = tl.program_id(0).to(tl.int64)  # one token of one sample
    b, s = row // seq, row % seq
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)[:, None]  # BLOCK_H of its heads
    d = tl.arange(0, D)[None, :]
    keep = h < heads
    offset = b * sxb + s * sxs + h * sxh + d  # q and k share their strides
    if tl.program_id(2) == 0:
        x = tl.load(q_ptr + offset, mask=keep, other=0.0)
        w = tl.load(wq_ptr + d)
        out_ptr = out_q_ptr
    else:
        x = tl.load(k_ptr + offset, mask=keep, other=0.0)
        w = tl.load(wk_ptr + d)
        out_ptr = out_k_ptr
    n = _rms_normalize(x, w, eps, D, ROUND_WEIGHT)
    y = _rotate(n, cs_ptr + b * scb + s * scs, D, BLOCK_H)
    tl.store(out_ptr + row * heads * D + h * D + d, y.to(x.dtype), mask=keep)


def register_op(default_warps: int, default_heads: int) -> Any:
    """Register the custom op `zturbo::qk_norm_rope` around the kernel (once per process)."""

    @triton_op("zturbo::qk_norm_rope", mutates_args=())
    def op(
        q: torch.Tensor,
        k: torch.Tensor,
        wq: torch.Tensor,
        wk: torch.Tensor,
        cos_sin: torch.Tensor,
        eps: float,
        num_warps: int = default_warps,
        block_heads: int = default_heads,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        batch, seq, heads, dim = q.shape
        if cos_sin.stride(-1) != 1 or cos_sin.stride(-2) != 2:
            cos_sin = cos_sin.contiguous()
        if q.stride(-1) != 1 or q.stride() != k.stride():  # one launch reads both with one set of strides
            q, k = q.contiguous(), k.contiguous()
        out_q = torch.empty((batch, seq, heads, dim), dtype=q.dtype, device=q.device)
        out_k = torch.empty_like(out_q)
        strides = (q.stride(0), q.stride(1), q.stride(2), cos_sin.stride(0), cos_sin.stride(1))
        wrap_triton(qk_norm_rope_kernel)[(batch * seq, triton.cdiv(heads, block_heads), 2)](
            q,
            k,
            wq.contiguous(),
            wk.contiguous(),
            cos_sin,
            out_q,
            out_k,
            seq,
            heads,
            *strides,
            eps,
            D=dim,
            BLOCK_H=block_heads,
            ROUND_WEIGHT=wq.dtype in (torch.float16, torch.bfloat16),
            num_warps=num_warps,
        )
        return out_q, out_k

    return op
