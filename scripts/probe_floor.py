"""The floor under a compiled 1024² image on this GPU: the transformer's products and attention
alone, run back to back as the model runs them, with the GPU's SM clock and power sampled.

The products of one image are 8 steps × (30 layers at 4160 tokens + 2 noise-refiner blocks at
4096), each block four products (q/k/v fused, output, w1/w3 fused, w2) and one FlashAttention 3
call, with distinct weights per block as in the model. Nothing else runs: no norms, no SwiGLU, no
RoPE, no VAE, no text encoder. So this is a lower bound of the transformer's part of an image.

Parts, each result written to $OUT/floor.json as soon as it exists:
1. `burst`: each product alone, 50 calls after a second of idle (what a micro-benchmark reports);
2. `bf16`: the image's products and attention back to back, three times, with the SM clock and
   power sampled (`zturbo.bench.clocks`), and the kernels' times by kind from a profile of one
   image (`zturbo.bench.profiling`);
3. `fp8`: the same with the products in fp8 (`torch._scaled_mm`, per-row scales, activations
   already quantized: the quantization kernels are left out) and bf16 attention;
4. `fa3_fp8`: FA3 on one block's attention in bf16 and fp8 (a build with FP8 enabled);
5. `e2e`: the engine compiled as the bench compiles it, 8 new-prompt images back to back under
   the same sampling.

Usage (GPU): PYTHONPATH=<FA3 site>:src python scripts/probe_floor.py [parts...]   (default: all)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from zturbo.accel import attention
from zturbo.bench import common, speed
from zturbo.bench.clocks import ClockSampler
from zturbo.bench.profiling import profile

OUT = os.environ.get("OUT", ".")
DEV = torch.device("cuda")
res: dict[str, Any] = {}
DIM, FFN, HEADS = 3840, 10240, 30
LAYERS, REFINERS, STEPS = 30, 2, 8
TOKENS, IMAGE_TOKENS = 4160, 4096  # layers: image + 64 caption tokens; noise refiner: image only


def save() -> None:
    with open(os.path.join(OUT, "floor.json"), "w") as f:
        json.dump(res, f, indent=1)


def ms(fn: Callable[[], Any], n: int) -> float:
    """Mean milliseconds of `n` back-to-back calls after one untimed call: the launch overlap
    a model sees, which a sync per call would hide."""
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / n * 1000


def burst() -> None:
    out: dict[str, Any] = {}
    for name, (k, n) in {"qkv": (DIM, 3 * DIM), "out": (DIM, DIM), "w13": (DIM, 2 * FFN), "w2": (FFN, DIM)}.items():
        x = torch.randn(TOKENS, k, device=DEV, dtype=torch.bfloat16)
        w = torch.randn(n, k, device=DEV, dtype=torch.bfloat16) / k**0.5
        time.sleep(1.0)
        out[name] = ms(lambda x=x, w=w: F.linear(x, w), 50)
    res["burst_ms"] = out
    res["burst_block_ms"] = sum(out.values())
    save()


def image_work(fp8: bool) -> Callable[[], None]:
    """One image's products and attention, back to back (see the module's docstring)."""
    op = attention.flash_attention_3()
    if op is None:
        raise RuntimeError("FlashAttention 3 is not available")
    shapes = {"qkv": (3 * DIM, DIM), "out": (DIM, DIM), "w13": (2 * FFN, DIM), "w2": (DIM, FFN)}
    blocks = []
    for _ in range(LAYERS):
        ws = {
            name: torch.randn(shape, device=DEV, dtype=torch.bfloat16) / shape[1] ** 0.5
            for name, shape in shapes.items()
        }
        if fp8:
            ws = {name: w.to(torch.float8_e4m3fn) for name, w in ws.items()}
        blocks.append(ws)
    dtype = torch.float8_e4m3fn if fp8 else torch.bfloat16
    inputs = {t: torch.randn(t, DIM, device=DEV, dtype=torch.bfloat16) for t in (TOKENS, IMAGE_TOKENS)}
    hidden = {t: torch.randn(t, FFN, device=DEV, dtype=torch.bfloat16).to(dtype) for t in inputs}
    xq = {t: x.to(dtype) for t, x in inputs.items()}
    ones = {t: torch.ones(t, 1, device=DEV) for t in inputs}
    col = {n: torch.ones(1, n, device=DEV) for n in (DIM, 3 * DIM, 2 * FFN)}

    def product(x: torch.Tensor, w: torch.Tensor, tokens: int) -> torch.Tensor:
        if not fp8:
            return F.linear(x, w)
        return torch._scaled_mm(x, w.t(), scale_a=ones[tokens], scale_b=col[w.shape[0]], out_dtype=torch.bfloat16)

    def block(ws: dict[str, torch.Tensor], tokens: int) -> None:
        qkv = product(xq[tokens], ws["qkv"], tokens)
        q, k, v = (t.unflatten(-1, (HEADS, -1)).unsqueeze(0) for t in qkv.chunk(3, dim=-1))
        attended = op(q, k, v).flatten(2)[0]
        product(attended.to(dtype), ws["out"], tokens)
        product(xq[tokens], ws["w13"], tokens)
        product(hidden[tokens], ws["w2"], tokens)

    def image() -> None:
        for _ in range(STEPS):
            for i in range(REFINERS):
                block(blocks[i], IMAGE_TOKENS)
            for ws in blocks:
                block(ws, TOKENS)

    return image


def sustained(key: str, fp8: bool) -> None:
    image = image_work(fp8)
    image()
    torch.cuda.synchronize()
    times = []
    with ClockSampler(DEV) as smi:
        for _ in range(3):
            start = time.perf_counter()
            image()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    out: dict[str, Any] = {"image_ms": [t * 1000 for t in times], "clocks": smi.summary()}
    res[key] = out
    save()
    kernels = profile(image, top=30)
    out["kernels"], out["by_kind_ms"] = kernels["top"], kernels["by_kind_ms"]
    save()


def bf16() -> None:
    sustained("bf16", fp8=False)


def fp8() -> None:
    sustained("fp8", fp8=True)


def fa3_fp8() -> None:
    """FA3 on one block's attention (4160 tokens, 30 heads of 128) in bf16 and in fp8 (e4m3, one
    scale per head), with the relative difference between the two and the quantization's cost."""
    from flash_attn_interface import flash_attn_func

    qkv = torch.randn(1, TOKENS, 3 * DIM, device=DEV, dtype=torch.bfloat16)
    q, k, v = (t.unflatten(-1, (HEADS, -1)) for t in qkv.chunk(3, dim=-1))

    def quantize(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scale = t.abs().amax(dim=(1, 3)).float().clamp_min(1e-12) / 448.0  # (B, H)
        return (t / scale[:, None, :, None]).to(torch.float8_e4m3fn), scale

    def first(out: Any) -> torch.Tensor:
        return out[0] if isinstance(out, tuple) else out

    want = first(flash_attn_func(q, k, v)).float()
    (q8, sq), (k8, sk), (v8, sv) = quantize(q), quantize(k), quantize(v)
    out: dict[str, Any] = {"bf16_ms": ms(lambda: flash_attn_func(q, k, v), 50)}
    try:
        got = first(flash_attn_func(q8, k8, v8, q_descale=sq, k_descale=sk, v_descale=sv)).float()
        out["fp8_ms"] = ms(lambda: flash_attn_func(q8, k8, v8, q_descale=sq, k_descale=sk, v_descale=sv), 50)
        out["rel_diff"] = float((got - want).norm() / want.norm())
        out["quantize_eager_ms"] = ms(lambda: (quantize(q), quantize(k), quantize(v)), 20)
    except Exception as e:  # a probe: record
        out["fp8_error"] = f"{type(e).__name__}: {e}"[:500]
    res["fa3_fp8"] = out
    save()


def e2e() -> None:
    engine = common.load_engine(None, False, DEV, torch.bfloat16)
    speed.prepare(engine, "compiled", speed.BenchOptions(), "none", True, {})  # as `zturbo bench` compiles
    new = common.zturbo_e2e(engine, 1024)
    new()
    engine.warmup(1024, 1024)
    new()
    times = []
    with ClockSampler(DEV) as smi:
        for _ in range(8):
            times.append(common.once(new, DEV))
    res["e2e"] = {"s": times, "median_s": statistics.median(times), "clocks": smi.summary()}
    save()


PARTS: dict[str, Callable[[], None]] = {"burst": burst, "bf16": bf16, "fp8": fp8, "fa3_fp8": fa3_fp8, "e2e": e2e}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("parts", nargs="*", help=f"parts to run, in order: {', '.join(PARTS)} (default: all)")
    args = parser.parse_args(argv)
    unknown = [part for part in args.parts if part not in PARTS]
    if unknown:
        parser.error(f"unknown parts {unknown}; choose from {list(PARTS)}")
    if not torch.cuda.is_available():
        parser.error("the floor is measured on a CUDA GPU and none is available")
    for part in args.parts or list(PARTS):
        start = time.perf_counter()
        try:
            PARTS[part]()
        except Exception as e:  # a probe: record the failure and go on to the next part
            res[f"{part}_error"] = f"{type(e).__name__}: {e}"[:2000]
        res.setdefault("part_s", {})[part] = round(time.perf_counter() - start, 1)
        save()
        print(part, "done", res["part_s"][part], flush=True)
    return 1 if any(key.endswith("_error") for key in res) else 0


if __name__ == "__main__":
    raise SystemExit(main())
