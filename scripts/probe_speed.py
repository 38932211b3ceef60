"""Speed probes for the compiled bf16 image on a CUDA GPU (real architecture, random weights).

In one process, in this order, each result written to $OUT/exp.json as soon as it exists:
1. the card's health (`probe_parts.health`);
2. the fused q/k RMSNorm + RoPE kernel (`zturbo.accel.kernels`) against the PyTorch path: error
   against a float64 computation for both, and milliseconds (eager, compiled, fused);
3. the engine end to end at 1024² (the bench's compiled phase with its profile, GPU idle time
   charged to stages), with the fused kernel, then again without it (A/B in one process);
4. one transformer block compiled with Inductor's max-autotune (GEMM templates tried against
   cuBLAS), against the default.

Usage (GPU): PYTHONPATH=src python scripts/probe_speed.py [parts...]  (default: all: kernel e2e autotune)
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(__file__))
import probe_parts as pp  # the health check, timers and result file

from zturbo.accel import compile as accel
from zturbo.accel import kernels
from zturbo.bench import speed as bench

DEV = torch.device("cuda")


def kernel_parity() -> None:
    torch.manual_seed(1)
    tokens, heads, dim = pp.TOKENS, 30, 128
    qkv = torch.randn(1, tokens, 3 * heads * dim, device=DEV, dtype=torch.bfloat16) * 3
    q, k, _ = (t.unflatten(-1, (heads, dim)) for t in qkv.chunk(3, dim=-1))  # strided views, as in a block
    wq, wk = (1 + 0.1 * torch.randn(dim, device=DEV)).bfloat16(), (1 + 0.1 * torch.randn(dim, device=DEV)).bfloat16()
    angles = torch.rand(1, tokens, dim // 2, device=DEV) * 100
    cos_sin = torch.view_as_real(torch.polar(torch.ones_like(angles), angles))
    eps = 1e-5
    op = kernels.fused_op()
    eager = kernels.reference(q, k, wq, wk, cos_sin, eps)
    fused = op(q, k, wq, wk, cos_sin, eps)
    exact = kernels.reference(q.double(), k.double(), wq.double(), wk.double(), cos_sin.double(), eps)

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a.double() - b.double()).norm() / b.double().norm())

    out: dict[str, Any] = {}
    for i, name in enumerate("qk"):
        out[name] = {
            "fused_vs_eager_rel": rel(fused[i], eager[i]),
            "fused_vs_eager_max_abs": float((fused[i].float() - eager[i].float()).abs().max()),
            "equal_fraction": float((fused[i] == eager[i]).float().mean()),
            "eager_vs_float64_rel": rel(eager[i], exact[i]),
            "fused_vs_float64_rel": rel(fused[i], exact[i]),
            "finite": bool(fused[i].isfinite().all()),
        }
    compiled = torch.compile(kernels.reference, fullgraph=True)
    out["ms_eager"] = pp.ms(lambda: kernels.reference(q, k, wq, wk, cos_sin, eps), 50)
    out["ms_compiled_reference"] = pp.ms(lambda: compiled(q, k, wq, wk, cos_sin, eps), 50)
    for warps in (1, 2, 4, 8):
        for heads_per in (1, 2, 4, 8):
            key = f"ms_fused_{warps}w_{heads_per}h"
            out[key] = pp.ms(lambda w=warps, b=heads_per: op(q, k, wq, wk, cos_sin, eps, w, b), 50)
    out["bytes_min_mb"] = 4 * tokens * heads * dim * 2 / 1e6  # q and k read once, written once
    pp.res["kernel"] = out
    pp.save()


def engine_ab() -> None:
    opts = bench.BenchOptions(
        sizes=(1024,), runs=5, quantize=("none",), reference=False, fuse_ab=False, profile=True, batch=4
    )
    started = time.perf_counter()
    engine = bench.load_engine(opts, DEV, torch.bfloat16)
    pp.res["build_s"] = time.perf_counter() - started
    baseline = bench.final_latents(engine, 1024)
    pp.res["eager"] = bench.timed(bench.zturbo_e2e(engine, 1024), DEV, 3, 1)
    pp.save()
    res = pp.res
    for key, fused, phase_opts in [
        ("fused_norm_rope", True, opts),
        ("inductor_norm_rope", False, dataclasses.replace(opts, profile=False)),
    ]:
        accel.FUSED_NORM_ROPE = fused
        res[key] = {"compile": True, "fuse": True, "sizes": {}}
        try:
            bench._compiled_phase(res, key, engine, phase_opts, "none", True, baseline, lambda r: pp.save())
        except Exception as e:  # a probe: record and go on
            res[key]["error"] = f"{type(e).__name__}: {e}"[:2000]
        pp.save()
    accel.FUSED_NORM_ROPE = True
    engine.accel.revert_compile()
    del engine
    torch._dynamo.reset()
    torch.cuda.empty_cache()


def autotune() -> None:
    import torch._inductor.config as inductor_config
    from diffusers import ZImageTransformer2DModel

    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        transformer = ZImageTransformer2DModel(n_layers=1, n_refiner_layers=1)
    torch.set_default_dtype(torch.float32)
    transformer.eval().requires_grad_(False)
    accel.fuse_projections(transformer)
    block = transformer.layers[0]
    block.attention.set_processor(accel.RealRopeAttnProcessor())
    x = torch.randn(1, pp.TOKENS, 3840, device=DEV, dtype=torch.bfloat16)
    grid = torch.meshgrid(torch.arange(pp.TOKENS // 64), torch.arange(8), torch.arange(8), indexing="ij")
    freqs = transformer.rope_embedder(torch.stack(grid, -1).reshape(-1, 3).cuda()).unsqueeze(0)
    adaln = torch.randn(1, 256, device=DEV, dtype=torch.bfloat16)

    def call() -> torch.Tensor:
        with torch.inference_mode():
            return block(x, None, freqs, adaln)

    base = call().float()
    for name, options in [("block_default", None), ("block_max_autotune", {"max_autotune": True})]:
        torch._dynamo.reset()
        compiled = accel.Accel()
        try:
            if options:
                for key, value in options.items():
                    setattr(inductor_config, key, value)
            accel._compile_block(compiled, block, "inductor")
            start = time.perf_counter()
            call()
            torch.cuda.synchronize()
            r: dict[str, Any] = {"compile_s": time.perf_counter() - start, "ms": pp.ms(call, 30)}
            r["rel_vs_eager"] = float((call().float() - base).norm() / base.norm())
            r["top"] = pp.top_kernels(call)
            pp.res[name] = r
        except Exception as e:  # a probe: record and go on
            pp.res[name] = f"{type(e).__name__}: {e}"[:1500]
        finally:
            inductor_config.max_autotune = False
        compiled.revert_compile()
        pp.save()


def main() -> None:
    parts = sys.argv[1:] or ["kernel", "e2e", "autotune"]
    pp.health()
    if "kernel" in parts:
        kernel_parity()
    if "e2e" in parts:
        engine_ab()
    if "autotune" in parts:
        autotune()


if __name__ == "__main__":
    main()
