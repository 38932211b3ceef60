"""torch.compile of single real-size Z-Image blocks, bf16 or fp8.

Measures the first-call (compile) time of three transformer blocks, and eager vs compiled
milliseconds per block at 4160 tokens (a 1024² image and a 64-token prompt). Blocks after the
first reuse its graph unless something recompiles. This is how the `dynamic=True` choice in
`zturbo.accel.compile` was made.

Usage (GPU): PYTHONPATH=src python scripts/bench_block_compile.py bf16|fp8 [none|true|false]
The second argument is torch.compile's `dynamic` (none = its default). Writes $OUT/diag_MODE_DYN.json.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable

import torch

from zturbo import tiny
from zturbo.accel import compile as accel

TOKENS = 4160


def build(mode: str) -> torch.nn.Module:
    from diffusers import ZImageTransformer2DModel

    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        transformer = ZImageTransformer2DModel()
    torch.set_default_dtype(torch.float32)
    transformer.eval().requires_grad_(False)
    tiny.randomize_pad_tokens(transformer)
    if mode == "fp8":
        accel.quantize_transformer(transformer, "fp8")
    return transformer


def block_call(transformer: torch.nn.Module) -> Callable[[torch.nn.Module], torch.Tensor]:
    x = torch.randn(1, TOKENS, 3840, device="cuda", dtype=torch.bfloat16)
    grid = torch.meshgrid(torch.arange(TOKENS // 64), torch.arange(8), torch.arange(8), indexing="ij")
    freqs = transformer.rope_embedder(torch.stack(grid, -1).reshape(-1, 3).cuda()).unsqueeze(0)
    adaln = torch.randn(1, 256, device="cuda", dtype=torch.bfloat16)

    def call(block: torch.nn.Module) -> torch.Tensor:
        with torch.inference_mode():
            return block(x, None, freqs, adaln)

    return call


def ms_per_call(call: Callable[[torch.nn.Module], torch.Tensor], block: torch.nn.Module, n: int = 10) -> float:
    call(block)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(n):
        call(block)
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / n * 1000


def main() -> None:
    mode = sys.argv[1]
    dyn = sys.argv[2] if len(sys.argv) > 2 else "none"
    transformer = build(mode)
    call = block_call(transformer)
    blocks = list(transformer.layers)[:3]
    out: dict[str, object] = {"mode": mode, "dynamic": dyn, "eager_block_ms": ms_per_call(call, blocks[0])}
    kwargs = {} if dyn == "none" else {"dynamic": dyn == "true"}
    for block in blocks:
        block.attention.set_processor(accel.RealRopeAttnProcessor())
        block.forward = torch.compile(block.forward, fullgraph=True, **kwargs)
    for i, block in enumerate(blocks):
        torch.cuda.synchronize()
        start = time.perf_counter()
        call(block)
        torch.cuda.synchronize()
        out[f"first_call_block{i}_s"] = time.perf_counter() - start
        print(json.dumps(out), flush=True)
    out["compiled_block_ms"] = ms_per_call(call, blocks[0])
    print(json.dumps(out), flush=True)
    with open(os.path.join(os.environ.get("OUT", "."), f"diag_{mode}_{dyn}.json"), "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main()
