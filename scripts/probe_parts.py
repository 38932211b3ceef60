"""Probes of the parts of a compiled image, on a CUDA GPU with the real architecture (random weights).

In one process, in this order: a health check of the card (bf16 8192³ product, clocks); SDPA
backends on one block's attention shape (1, 30, 4160, 128); the text encoder eager against its
compiled layers (time, compile time, relative error); one transformer block compiled three ways
(default, coordinate-descent tuning, a rotate-half RoPE formulation that is a speed probe only,
not the model's numerics); and the whole fp8 transformer compiled, with timestamps, then timed.
Each result is written to $OUT/exp.json as soon as it exists, so a timeout keeps what finished.

Usage (GPU): PYTHONPATH=src python scripts/probe_parts.py
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable
from typing import Any

import torch
import torch._inductor.config as inductor_config
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from zturbo.accel import compile as accel
from zturbo.bench import speed as bench
from zturbo.engine import encode_prompt

OUT = os.environ.get("OUT", ".")
PROMPT = [bench.PROMPT]
TOKENS = 4160  # a 1024² image (4096) and a 64-token caption
res: dict[str, Any] = {}


def save() -> None:
    with open(os.path.join(OUT, "exp.json"), "w") as f:
        json.dump(res, f, indent=1)
    print(json.dumps(res)[-1500:], flush=True)


def ms(fn: Callable[[], Any], n: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / n * 1000


def top_kernels(fn: Callable[[], Any], k: int = 12) -> list[tuple[str, float, int]]:
    from torch.profiler import ProfilerActivity, profile

    fn()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    events = sorted(prof.key_averages(), key=lambda e: -e.device_time_total)
    return [(e.key[:90], round(e.device_time_total / 1000, 3), e.count) for e in events[:k] if e.device_time_total > 0]


def smi() -> str:
    query = "--query-gpu=clocks.sm,clocks.mem,temperature.gpu,power.draw,utilization.gpu"
    try:
        return subprocess.run(
            ["nvidia-smi", query, "--format=csv,noheader"], capture_output=True, text=True, timeout=20
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError) as e:
        return str(e)


def health() -> None:
    res["smi_before"], res["loadavg"], res["cpus"] = smi(), os.getloadavg(), os.cpu_count()
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    res["matmul_tflops"] = 2 * 8192**3 / ms(lambda: a @ a, 20) / 1e9
    res["smi_after"] = smi()
    save()


def run_parts(parts: list[str], functions: dict[str, Any], results: dict[str, Any], save: Callable[[], None]) -> None:
    """Run each named part; an exception is recorded under `<part>_error` and the next part runs.
    Each part's seconds go to results["part_s"], and `save()` writes after every part."""
    for part in parts:
        start = time.perf_counter()
        try:
            functions[part]()
        except Exception as e:  # a probe: record and go on to the next part
            results[f"{part}_error"] = f"{type(e).__name__}: {e}"[:2000]
        results.setdefault("part_s", {})[part] = round(time.perf_counter() - start, 1)
        save()
        print(part, "done", results["part_s"][part], flush=True)


def attention_backends() -> None:
    q, k, v = (torch.randn(1, 30, TOKENS, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    flop = 4 * 30 * TOKENS * TOKENS * 128
    out: dict[str, Any] = {}
    for name, backend in [
        ("cudnn", SDPBackend.CUDNN_ATTENTION),
        ("flash", SDPBackend.FLASH_ATTENTION),
        ("efficient", SDPBackend.EFFICIENT_ATTENTION),
    ]:
        try:
            with sdpa_kernel([backend]):
                t = ms(lambda: F.scaled_dot_product_attention(q, k, v))
            out[name] = {"ms": t, "tflops": flop / t / 1e9}
        except RuntimeError as e:
            out[name] = str(e)[:200]
    res["attention"] = out
    save()


def text_encoder(te: torch.nn.Module, tokenizer: Any) -> None:
    dev = torch.device("cuda")
    with torch.inference_mode():
        ref, _ = encode_prompt(te, tokenizer, PROMPT, dev)
        res["te_tokens"] = ref[0].shape[0]
        res["te_eager_ms"] = ms(lambda: encode_prompt(te, tokenizer, PROMPT, dev), 10)
        save()
        compiled = accel.Accel()
        try:
            for layer in te.layers:  # as accel.apply does
                layer.forward = accel._decoder_layer_without_inner_hooks(layer)
                accel._compile_block(compiled, layer, "inductor", options={"emulate_precision_casts": True})
            start = time.perf_counter()
            got, _ = encode_prompt(te, tokenizer, PROMPT, dev)
            torch.cuda.synchronize()
            res["te_compile_s"] = time.perf_counter() - start
            res["te_compiled_rel_err"] = float((got[0].float() - ref[0].float()).norm() / ref[0].float().norm())
            res["te_compiled_ms"] = ms(lambda: encode_prompt(te, tokenizer, PROMPT, dev), 10)
            res["te_compiled_top"] = top_kernels(lambda: encode_prompt(te, tokenizer, PROMPT, dev))
        except Exception as e:  # a probe: record and go on
            res["te_error"] = f"{type(e).__name__}: {e}"[:1500]
        compiled.revert_compile()
    save()


class HalfRope(accel.RealRopeAttnProcessor):
    """Speed probe only: rotate-half RoPE and a manual float32 RMSNorm (not the model's numerics)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, freqs_cis=None):
        dtype = hidden_states.dtype
        q, k, v = F.linear(hidden_states, getattr(attn, accel.FUSED_QKV)).chunk(3, dim=-1)
        q, k, v = (t.unflatten(-1, (attn.heads, -1)) for t in (q, k, v))
        cos, sin = freqs_cis.real.unsqueeze(2), freqs_cis.imag.unsqueeze(2)

        def norm_rope(t: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
            t = t.float()
            t = t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
            a, b = t.chunk(2, dim=-1)
            return torch.cat((a * cos - b * sin, a * sin + b * cos), dim=-1).to(dtype)

        q = norm_rope(q, attn.norm_q.weight, attn.norm_q.eps)
        k = norm_rope(k, attn.norm_k.weight, attn.norm_k.eps)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return attn.to_out[0](out.transpose(1, 2).flatten(2, 3).to(dtype))


def block_variants(transformer: torch.nn.Module) -> None:
    accel.fuse_projections(transformer)
    x = torch.randn(1, TOKENS, 3840, device="cuda", dtype=torch.bfloat16)
    grid = torch.meshgrid(torch.arange(TOKENS // 64), torch.arange(8), torch.arange(8), indexing="ij")
    freqs = transformer.rope_embedder(torch.stack(grid, -1).reshape(-1, 3).cuda()).unsqueeze(0)
    adaln = torch.randn(1, 256, device="cuda", dtype=torch.bfloat16)
    block = transformer.layers[0]
    block.attention.set_processor(accel.RealRopeAttnProcessor())

    def call() -> torch.Tensor:
        with torch.inference_mode():
            return block(x, None, freqs, adaln)

    res["block_eager_ms"] = ms(call)
    base = call().float()

    def variant(name: str, setup: Callable[[], None], teardown: Callable[[], None]) -> None:
        torch._dynamo.reset()
        setup()
        compiled = accel.Accel()
        try:
            accel._compile_block(compiled, block, "inductor")
            start = time.perf_counter()
            call()
            torch.cuda.synchronize()
            r: dict[str, Any] = {"compile_s": time.perf_counter() - start, "ms": ms(call)}
            r["rel_vs_base"] = float((call().float() - base).norm() / base.norm())
            r["top"] = top_kernels(call)
            res[name] = r
        except Exception as e:  # a probe: record and go on
            res[name] = f"{type(e).__name__}: {e}"[:1500]
        compiled.revert_compile()
        teardown()
        save()

    rope = accel.RealRopeAttnProcessor
    variant("block_base", lambda: None, lambda: None)
    variant(
        "block_coord",
        lambda: setattr(inductor_config, "coordinate_descent_tuning", True),
        lambda: setattr(inductor_config, "coordinate_descent_tuning", False),
    )
    variant(
        "block_halfrope",
        lambda: block.attention.set_processor(HalfRope()),
        lambda: block.attention.set_processor(rope()),
    )


def fp8_transformer(transformer: torch.nn.Module) -> None:
    start = time.perf_counter()

    def stamp(what: str) -> None:
        res.setdefault("fp8_stamps", []).append((what, round(time.perf_counter() - start, 1)))
        save()

    accel.unfuse_projections(transformer)
    accel.quantize_transformer(transformer, "fp8")
    stamp("quantized")
    accel.compile_transformer(accel.Accel(), transformer)
    latents = torch.randn(1, 16, 1, 128, 128, device="cuda", dtype=torch.bfloat16)
    embeds = [torch.randn(64, 2560, device="cuda", dtype=torch.bfloat16)]
    t = torch.tensor([0.5], device="cuda")

    def forward() -> Any:
        with torch.inference_mode():
            return transformer(list(latents.unbind(0)), t, embeds, return_dict=False)[0]

    forward()
    torch.cuda.synchronize()
    stamp("first forward (compiles)")
    res["fp8_forward_ms"] = ms(forward, 5)
    stamp("timed")


def main() -> None:
    health()
    attention_backends()
    components = bench.random_components(torch.device("cuda"), torch.bfloat16, tiny=False)
    text_encoder(components.text_encoder, components.tokenizer)
    components.text_encoder = None
    torch.cuda.empty_cache()
    block_variants(components.transformer)
    res["smi_mid"] = smi()
    fp8_transformer(components.transformer)


if __name__ == "__main__":
    main()
