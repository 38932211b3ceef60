"""What is left of the compiled bf16 image's time, and what two levers would buy (H100, 1024²).

In one process, each result written to $OUT/levers.json as soon as it exists:
1. `health`: the card check (`probe_parts.health`);
2. `gemm`: the block's four products at 4160 tokens in bf16 (cuBLAS as PyTorch calls it, with
   the token count padded to a multiple of 128 and 256, and with cuBLASLt preferred), and the
   same products in fp8 through `torch._scaled_mm` with per-row and with per-tensor scales,
   each with its kernel's name;
3. `vae_attention`: the VAE's single-head attention at 1024² (16384 tokens of 512) per SDPA backend;
4. `e2e`: the engine compiled as the bench compiles it; its new-prompt time, then every kernel of
   one profiled image (name, count, milliseconds);
5. `engine_graph_ab`: the engine with its step graphs and without (see the function).

Runs 10A and 10F (docs/performance.md) also timed a prototype of the step graphs written in this
script (`StepGraph`, `graph_ab` at `db9a475`); `zturbo.accel.graphs.StepGraphs` replaced it.

Usage (GPU): PYTHONPATH=<FA3 site>:src python scripts/probe_levers.py [parts...]   (default: all)
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, os.path.dirname(__file__))
import probe_parts as pp  # the health check and timers

from zturbo.accel import compile as accel
from zturbo.bench import speed as bench

OUT = os.environ.get("OUT", ".")
DEV = torch.device("cuda")
res: dict[str, Any] = {}
# (in, out) features of the block's products; tokens: a 1024² image and a 64-token caption
PRODUCTS = {"qkv": (3840, 11520), "out": (3840, 3840), "w13": (3840, 20480), "w2": (10240, 3840)}
TOKENS = 4160


def save() -> None:
    with open(os.path.join(OUT, "levers.json"), "w") as f:
        json.dump(res, f, indent=1)


def kernel_names(fn: Callable[[], Any]) -> list[str]:
    from torch.profiler import ProfilerActivity, profile

    fn()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sorted({e.name[:100] for e in prof.events() if e.device_type.name == "CUDA"})


def gemm() -> None:
    out: dict[str, Any] = {}
    for name, (k, n) in PRODUCTS.items():
        out[name] = row = gemm_row(k, n)
        print(name, {key: v for key, v in row.items() if not key.endswith("kernel")}, flush=True)
        res["gemm"] = out
        save()


def gemm_row(k: int, n: int) -> dict[str, Any]:
    """One product (TOKENS, k) x (k, n): bf16 ways, then fp8 with per-row and per-tensor scales."""
    w = torch.randn(n, k, device=DEV, dtype=torch.bfloat16) / k**0.5
    flops = 2 * TOKENS * k * n
    row: dict[str, Any] = {}
    for m in (TOKENS, 4224, 4352):
        xm = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
        t = pp.ms(lambda xm=xm: F.linear(xm, w), 50)
        row[f"bf16_m{m}_ms"], row[f"bf16_m{m}_tflops_useful"] = t, flops / t / 1e9
    x = torch.randn(TOKENS, k, device=DEV, dtype=torch.bfloat16)

    def linear() -> torch.Tensor:
        return F.linear(x, w)

    row["bf16_kernel"] = kernel_names(linear)
    try:
        torch.backends.cuda.preferred_blas_library("cublaslt")
        row["bf16_cublaslt_ms"], row["bf16_cublaslt_kernel"] = pp.ms(linear, 50), kernel_names(linear)
    except Exception as e:  # a probe: record and go on
        row["bf16_cublaslt"] = f"{type(e).__name__}: {e}"[:300]
    finally:
        torch.backends.cuda.preferred_blas_library("cublas")
    xq, wq = x.to(torch.float8_e4m3fn), w.to(torch.float8_e4m3fn)
    for scales, (sx, sw) in {
        "rowwise": (torch.ones(TOKENS, 1, device=DEV), torch.ones(1, n, device=DEV)),
        "tensorwise": (torch.ones((), device=DEV), torch.ones((), device=DEV)),
    }.items():

        def mm(sx: torch.Tensor = sx, sw: torch.Tensor = sw) -> torch.Tensor:
            return torch._scaled_mm(xq, wq.t(), scale_a=sx, scale_b=sw, out_dtype=torch.bfloat16)

        try:
            t = pp.ms(mm, 50)
            row[f"fp8_{scales}_ms"], row[f"fp8_{scales}_tflops"] = t, flops / t / 1e9
            row[f"fp8_{scales}_kernel"] = kernel_names(mm)
        except Exception as e:  # a probe: record and go on
            row[f"fp8_{scales}"] = f"{type(e).__name__}: {e}"[:300]
    return row


def vae_attention() -> None:
    q, k, v = (torch.randn(1, 1, 16384, 512, device=DEV, dtype=torch.bfloat16) for _ in range(3))
    out: dict[str, Any] = {}
    for name, backend in [
        ("default", None),
        ("cudnn", SDPBackend.CUDNN_ATTENTION),
        ("flash", SDPBackend.FLASH_ATTENTION),
        ("efficient", SDPBackend.EFFICIENT_ATTENTION),
        ("math", SDPBackend.MATH),
    ]:
        try:
            if backend is None:
                t = pp.ms(lambda: F.scaled_dot_product_attention(q, k, v), 10)
                out["default_kernels"] = kernel_names(lambda: F.scaled_dot_product_attention(q, k, v))
            else:
                with sdpa_kernel([backend]):
                    t = pp.ms(lambda: F.scaled_dot_product_attention(q, k, v), 10)
            out[name] = t
        except RuntimeError as e:
            out[name] = str(e)[:200]
    res["vae_attention_ms"] = out
    print(out, flush=True)
    save()


def e2e() -> None:
    opts = bench.BenchOptions(sizes=(1024,), quantize=("none",))
    engine = bench.load_engine(opts, DEV, torch.bfloat16)
    engine.accel = accel.apply(engine.components, compile_=True, quantize="none")
    new = bench.zturbo_e2e(engine, 1024)
    start = time.perf_counter()
    new()
    res["first_call_s"] = time.perf_counter() - start
    engine.warmup(1024, 1024)
    res["plain_s"] = bench.timed(new, DEV, 5, 1)["median_s"]
    save()
    res["kernels_plain"] = bench.profile(new, top=200)
    save()


def engine_graph_ab() -> None:
    """The engine with its step graphs (`zturbo.accel.graphs.StepGraphs`, the default) and without, for
    bf16 and fp8 at 512² and 1024²: new-prompt time (alternating, 2 × 3 runs each), whether the
    images are identical, how many graphs were captured, and the memory they keep reserved."""
    opts = bench.BenchOptions(sizes=(512, 1024), quantize=("none", "fp8"))
    engine = bench.load_engine(opts, DEV, torch.bfloat16)
    out: dict[str, Any] = {}
    res["engine_graph_ab"] = out
    for quantize in ("none", "fp8"):
        engine.accel.revert_compile()
        torch._dynamo.reset()
        engine.accel = accel.apply(engine.components, compile_=True, quantize=quantize)
        graphs = engine.accel.step_graphs
        for size in (512, 1024):
            new = bench.zturbo_e2e(engine, size)
            row: dict[str, Any] = {"s": {"plain": [], "graph": []}}
            engine.accel.step_graphs = None
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            plain_image = new().images[0].image.tobytes()
            reserved = torch.cuda.memory_reserved()
            engine.accel.step_graphs = graphs
            new(), new()  # the second request captures
            graph_image = new().images[0].image.tobytes()
            row["graph_reserved_gib"] = (torch.cuda.memory_reserved() - reserved) / 2**30
            row["identical_image"] = graph_image == plain_image
            row["graphs"], row["failed"] = len(graphs), graphs.failed
            for _ in range(2):  # alternating, so that drift of the card falls on both
                for mode in ("plain", "graph"):
                    engine.accel.step_graphs = graphs if mode == "graph" else None
                    row["s"][mode].append(bench.timed(new, DEV, 3, 1)["median_s"])
            engine.accel.step_graphs = graphs
            out[f"{quantize}_{size}"] = row
            print(quantize, size, row, flush=True)
            save()


def health() -> None:
    pp.health()
    res["health"] = dict(pp.res)


def main() -> None:
    pp.OUT = OUT
    pp.run_parts(sys.argv[1:] or ["health", "gemm", "vae_attention", "e2e"], globals(), res, save)


if __name__ == "__main__":
    main()
