"""A fused q/k RMSNorm + rotary-embedding kernel (Triton) for the compiled attention processor.

Inductor fuses the two per-head RMSNorms and the pairwise rotation into one kernel, which on an
H100 at 1024² takes about 112 µs per block where moving the bytes needs about 45 µs (30.6 ms per
image). This kernel (`qk_triton`) normalizes and rotates q and k in one launch, reading each
head's row once and splitting the rotated pairs in registers, and rounds where diffusers' eager
code rounds: after normalizing, after the weight (when the weight is half precision), and after
the rotation. On a block's q and k (H100, `scripts/probe_qk_kernel.py`) it takes 49 µs, where the
bytes alone need 38 µs at 3.35 TB/s; two launches that load each rotation partner a second time
took 126 µs.

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
    """Register the custom op once; None where Triton is missing."""
    try:
        from . import qk_triton
    except ImportError:
        return None
    return qk_triton.register_op(NUM_WARPS, BLOCK_HEADS)
