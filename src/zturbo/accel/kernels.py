"""A fused q/k RMSNorm + rotary-embedding kernel (Triton) for the compiled attention processor.

Inductor fuses the two per-head RMSNorms and the pairwise rotation into one kernel, which on an
H100 at 1024² takes about 112 µs per block where moving the bytes needs about 45 µs (run E:
30.6 ms per image). This kernel normalizes and rotates q and k in one launch, reading each head's
row once and splitting the rotated pairs in registers, and rounds where diffusers' eager code
rounds: after normalizing, after the weight (when the weight is half precision), and after the
rotation. Measured on a block's q and k (H100, run 7B, `scripts/probe_qk_kernel.py`): 49 µs
against 126 µs for the previous version of this kernel (two launches, each element's rotation
partner loaded a second time), where the bytes alone need 38 µs at 3.35 TB/s.

`fused_op()` registers it as a custom op (`torch.library.triton_op`), so Inductor keeps it inside
the compiled block graph; it returns None where Triton is missing, and callers then use the plain
PyTorch path, `reference`.
"""

from __future__ import annotations

import functools
from typing import Any

import torch


def reference(
    q: torch.Tensor, k: torch.Tensor, wq: torch.Tensor, wk: torch.Tensor, cos_sin: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k (B, S, H, D); wq, wk (D,); cos_sin (B, S, D/2, 2) float32 -> rotated, normalized q, k.

    What diffusers' RMSNorm followed by zturbo's real-valued RoPE computes, in PyTorch.
    """
    cs = cos_sin.unsqueeze(2)  # (B, S, 1, D/2, 2)
    return rope(_rms_norm(q, wq, eps), cs), rope(_rms_norm(k, wk, eps), cs)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    variance = x.float().pow(2).mean(-1, keepdim=True)
    x = x * torch.rsqrt(variance + eps)
    if weight.dtype in (torch.float16, torch.bfloat16):
        x = x.to(weight.dtype)
    return x * weight


def rope(x: torch.Tensor, cos_sin: torch.Tensor) -> torch.Tensor:
    """x (B, S, H, D) rotated pairwise by (cos, sin) (B, S, 1, D/2, 2), computed in float32."""
    pairs = x.float().unflatten(-1, (-1, 2))
    x0, x1 = pairs[..., 0], pairs[..., 1]
    cos, sin = cos_sin[..., 0], cos_sin[..., 1]
    return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2).type_as(x)


NUM_WARPS = 2
BLOCK_HEADS = 4  # heads per program (a power of two; the last block is masked)


def fused_op() -> Any:
    """The custom op `zturbo::qk_norm_rope(q, k, wq, wk, cos_sin, eps[, num_warps, block_heads])`
    (see `reference` for the arguments; outputs are contiguous (B, S, H, D), CUDA tensors only),
    or None where Triton is missing.

    Call it outside compiled code and keep the op: the first call imports Triton and registers
    the op, which dynamo cannot trace; calls of the op itself compile into the graph.
    """
    return _register()


@functools.cache
def _register() -> Any:
    """Define the Triton kernel and register the custom op once; None where Triton is missing."""
    try:
        import triton
        import triton.language as tl
        from torch.library import triton_op, wrap_triton
    except ImportError:
        return None

    @triton.jit
    def kernel(
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
        xf = x.to(tl.float32)
        inv = tl.rsqrt(tl.sum(xf * xf, axis=1) / D + eps)[:, None]
        if ROUND_WEIGHT:  # noqa: SIM108 (a constexpr branch)  half-precision weight: eager rounds twice
            n = ((xf * inv).to(w.dtype) * w).to(tl.float32)
        else:
            n = xf * inv * w.to(tl.float32)
        # Pairs (x0, x1) -> (x0 cos - x1 sin, x0 sin + x1 cos), split out of registers: each
        # element is loaded once (a second, partner load cost 2.5x the time; run 7B).
        n0, n1 = tl.split(tl.reshape(n, (BLOCK_H, D // 2, 2)))
        cos, sin = tl.split(tl.reshape(tl.load(cs_ptr + b * scb + s * scs + tl.arange(0, D)), (D // 2, 2)))
        y = tl.join(n0 * cos[None, :] - n1 * sin[None, :], n0 * sin[None, :] + n1 * cos[None, :])
        y = tl.reshape(y, (BLOCK_H, D))
        tl.store(out_ptr + row * heads * D + h * D + d, y.to(x.dtype), mask=keep)

    @triton_op("zturbo::qk_norm_rope", mutates_args=())
    def op(
        q: torch.Tensor,
        k: torch.Tensor,
        wq: torch.Tensor,
        wk: torch.Tensor,
        cos_sin: torch.Tensor,
        eps: float,
        num_warps: int = NUM_WARPS,
        block_heads: int = BLOCK_HEADS,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        batch, seq, heads, dim = q.shape
        if cos_sin.stride(-1) != 1 or cos_sin.stride(-2) != 2:
            cos_sin = cos_sin.contiguous()
        if q.stride(-1) != 1 or q.stride() != k.stride():  # one launch reads both with one set of strides
            q, k = q.contiguous(), k.contiguous()
        out_q = torch.empty((batch, seq, heads, dim), dtype=q.dtype, device=q.device)
        out_k = torch.empty_like(out_q)
        wrap_triton(kernel)[(batch * seq, triton.cdiv(heads, block_heads), 2)](
            q,
            k,
            wq.contiguous(),
            wk.contiguous(),
            cos_sin,
            out_q,
            out_k,
            seq,
            heads,
            q.stride(0),
            q.stride(1),
            q.stride(2),
            cos_sin.stride(0),
            cos_sin.stride(1),
            eps,
            D=dim,
            BLOCK_H=block_heads,
            ROUND_WEIGHT=wq.dtype in (torch.float16, torch.bfloat16),
            num_warps=num_warps,
        )
        return out_q, out_k

    return op
