"""A candidate q/k RMSNorm + RoPE kernel against `zturbo.accel.kernels.fused_op()`, on a block's shape.

The candidate does q and k in one launch (one output buffer), rotates pairs with tl.split/tl.join
instead of a second load of each element's partner, and sweeps heads per program and warps. For
each configuration: microseconds per call (q and k together), and the largest difference from the
current op's output (which `tests/test_kernels.py` checks against the eager formulation).
Writes $OUT/qk_kernel.json.

Usage (GPU): PYTHONPATH=src python scripts/probe_qk_kernel.py
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(__file__))
import probe_parts as pp

from zturbo.accel import kernels

HEADS, DIM, TOKENS = 30, 128, 4160


@triton.jit
def candidate(
    q_ptr,
    k_ptr,
    wq_ptr,
    wk_ptr,
    cs_ptr,
    out_ptr,
    seq,
    heads,
    sxb,
    sxs,
    sxh,
    scb,
    scs,
    out_part,
    eps,
    D: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    which = tl.program_id(2)
    b, s = row // seq, row % seq
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, D)[None, :]
    keep = h < heads
    offset = b * sxb + s * sxs + h * sxh + d
    if which == 0:
        x = tl.load(q_ptr + offset, mask=keep, other=0.0)
        w = tl.load(wq_ptr + d)
    else:
        x = tl.load(k_ptr + offset, mask=keep, other=0.0)
        w = tl.load(wk_ptr + d)
    out_dtype = x.dtype
    xf = x.to(tl.float32)
    inv = tl.rsqrt(tl.sum(xf * xf, axis=1) / D + eps)[:, None]
    n = ((xf * inv).to(w.dtype) * w).to(tl.float32)  # a bf16 weight: eager rounds before and after it
    n0, n1 = tl.split(tl.reshape(n, (BLOCK_H, D // 2, 2)))
    cs = tl.load(cs_ptr + b * scb + s * scs + tl.arange(0, D))
    cos, sin = tl.split(tl.reshape(cs, (D // 2, 2)))
    cos, sin = cos[None, :], sin[None, :]
    y = tl.reshape(tl.join(n0 * cos - n1 * sin, n0 * sin + n1 * cos), (BLOCK_H, D))
    tl.store(out_ptr + which * out_part + row * heads * D + h * D + d, y.to(out_dtype), mask=keep)


def run_candidate(q, k, wq, wk, cos_sin, eps, block_h, warps):
    batch, seq, heads, dim = q.shape
    out = torch.empty((2, batch, seq, heads, dim), dtype=q.dtype, device=q.device)
    grid = (batch * seq, triton.cdiv(heads, block_h), 2)
    candidate[grid](
        q,
        k,
        wq,
        wk,
        cos_sin,
        out,
        seq,
        heads,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        cos_sin.stride(0),
        cos_sin.stride(1),
        out[0].numel(),
        eps,
        D=dim,
        BLOCK_H=block_h,
        num_warps=warps,
    )
    return out[0], out[1]


def main() -> None:
    pp.OUT = os.environ.get("OUT", ".")
    res: dict[str, Any] = {}
    qkv = torch.randn(1, TOKENS, 3 * HEADS * DIM, device="cuda", dtype=torch.bfloat16)
    q, k, _ = (t.unflatten(-1, (HEADS, DIM)) for t in qkv.chunk(3, dim=-1))
    wq, wk = (torch.rand(DIM, device="cuda", dtype=torch.bfloat16) + 0.5 for _ in range(2))
    angles = torch.rand(1, TOKENS, DIM // 2, device="cuda") * 6.28
    cos_sin = torch.stack((angles.cos(), angles.sin()), dim=-1)
    op = kernels.fused_op()
    want = op(q, k, wq, wk, cos_sin, 1e-5)
    res["current_us"] = pp.ms(lambda: op(q, k, wq, wk, cos_sin, 1e-5), 200) * 1000
    res["bytes_bound_us"] = 4 * TOKENS * HEADS * DIM * 2 / 3.35e12 * 1e6  # q, k read and written
    rows = []
    for block_h in (1, 2, 4, 8, 16, 32):
        for warps in (1, 2, 4, 8):
            try:
                got = run_candidate(q, k, wq, wk, cos_sin, 1e-5, block_h, warps)
                us = pp.ms(lambda b=block_h, w=warps: run_candidate(q, k, wq, wk, cos_sin, 1e-5, b, w), 200) * 1000
                diff = max(float((g.float() - w_.float()).abs().max()) for g, w_ in zip(got, want, strict=True))
                rows.append({"block_h": block_h, "warps": warps, "us": us, "max_diff": diff})
            except Exception as e:
                rows.append({"block_h": block_h, "warps": warps, "error": str(e)[:200]})
    res["candidate"] = sorted(rows, key=lambda r: r.get("us", 1e9))
    print(json.dumps({k: v for k, v in res.items() if k != "candidate"}), json.dumps(res["candidate"][:6]), flush=True)
    with open(os.path.join(pp.OUT, "qk_kernel.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
