"""FlashAttention 3 against SDPA's cuDNN kernel on the transformer's attention shape, on a Hopper.

q, k, v are views of one fused (B, S, 3·H·D) projection, as the compiled blocks pass them. For
batch 1 and 4 at 1024² (4096 image tokens and a 64-token caption) and at 2048²: milliseconds,
TFLOP/s and the relative difference between the two kernels. Writes $OUT/attention.json.

Usage (GPU): PYTHONPATH=<FA3 site>:src python scripts/probe_attention.py
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, os.path.dirname(__file__))
import probe_parts as pp

from zturbo.accel import attention

HEADS, DIM = 30, 128
SHAPES = {"1024² b1": (1, 4160), "1024² b4": (4, 4160), "2048² b1": (1, 16448)}


def main() -> None:
    pp.OUT = os.environ.get("OUT", ".")
    pp.health()
    res: dict[str, Any] = {"health": dict(pp.res)}
    op = attention.flash_attention_3()
    res["fa3"] = op is not None
    for name, (batch, tokens) in SHAPES.items():
        qkv = torch.randn(batch, tokens, 3 * HEADS * DIM, device="cuda", dtype=torch.bfloat16)
        q, k, v = (t.unflatten(-1, (HEADS, DIM)) for t in qkv.chunk(3, dim=-1))
        flops = 4 * batch * HEADS * tokens * tokens * DIM
        row: dict[str, Any] = {}
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            want = attention.sdpa(q, k, v)
            row["cudnn_ms"] = pp.ms(lambda q=q, k=k, v=v: attention.sdpa(q, k, v))
        if op is not None:
            got = op(q, k, v)
            row["fa3_ms"] = pp.ms(lambda q=q, k=k, v=v: op(q, k, v))
            row["rel_diff"] = float((got.float() - want.float()).norm() / want.float().norm())
        for key in ("cudnn_ms", "fa3_ms"):
            if key in row:
                row[key.replace("_ms", "_tflops")] = flops / row[key] / 1e9
        res[name] = row
        print(name, row, flush=True)
    with open(os.path.join(pp.OUT, "attention.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
