"""Precision cases on the real Z-Image architecture: memory, speed, accuracy and the float16 guard.

Builds the real-size modules (6B transformer, FLUX VAE, Qwen3-4B text encoder) once in float32
directly on the GPU, with random weights as `zturbo bench` does. That set is the master:
every other precision is a cast copy of it, made when its case starts and freed when it ends.
All cases run 8 steps, guidance 0, batch 1, one prompt and one seed, through `Engine.generate`.

  1. fp32 / fp32 / fp32 (transformer / text encoder / VAE): the reference for the errors.
  2. bf16 everywhere (no guard: asserted).
  3. fp16 / fp16 / fp32 with the float16 guard, variant "scale" (zturbo's Volta/Turing policy).
  4. the same with the guard's "clamp" variant.
  5. the same with no guard, the float32 islands cast to float16 too (prices the guard).

For each: parameter bytes, peak GPU memory, seconds per image (one warm-up, median of the timed
runs) and the relative error of the final float32 latents against case 1. Cases 3-5 are timed
in interleaved rounds on one float16 copy (the guard is switched between runs), so the guard
cost, time(3 or 4) / time(5) - 1, is not confounded by drift; their errors come from one run
each on a fresh copy. Then:

  6. `--dtype float16` (all three float16, guard on) at every size: finite? fallbacks?
  7. induced overflow: w1 and w3 of every block times k; the smallest k (2..64) at which plain
     float16 gives non-finite latents, then at k and 4k the error of "scale" and "clamp"
     against float32 with the same scaled weights.

Latents are those the engine computes inside `generate` (its `denoise` is wrapped to record
them). Where a case must not fall back to another dtype (unguarded float16, the overflow runs),
the engine's finiteness checks are recorded and then answered "finite", so the run stays in
float16; everywhere else the engine behaves as shipped and its fallbacks are reported.

Results: a markdown table on stdout, everything as JSON in $OUT/bench_precision.json (else
./bench_out/), rewritten after each case, so a run cut short still leaves what it measured.

Usage (GPU):  PYTHONPATH=src python scripts/bench_precision.py
Smoke test:   PYTHONPATH=src python scripts/bench_precision.py --tiny   (tiny model, CPU)
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from zturbo import engine as zengine
from zturbo.bench import common
from zturbo.device import dtype_name
from zturbo.engine import Engine
from zturbo.guard import FLOAT32_MODULES, install_fp16_guard, is_float32_key
from zturbo.loader import Components
from zturbo.request import ModelLimits
from zturbo.result import ModelInfo
from zturbo.tiny import build_tokenizer

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
GIB = 2**30
PROMPT, SEED = common.PROMPT, common.SEED
GUARD_VARIANTS = ("scale", "clamp", "none")  # "none": no guard, the float32 islands in float16 too
OVERFLOW_KS = (2, 4, 8, 16, 32, 64)
# Tried only when nothing in OVERFLOW_KS overflows, to find the threshold anyway.
OVERFLOW_KS_BEYOND = (128, 256, 512, 1024)


@dataclass
class Master:
    transformer: torch.nn.Module
    text_encoder: torch.nn.Module
    vae: torch.nn.Module


@dataclass
class Bench:
    device: torch.device
    tiny: bool
    size: int
    sizes: list[int]
    steps: int
    runs: int
    rounds: int
    tokenizer: Any
    master: Master
    res: dict[str, Any]
    out: Path
    ref_latents: torch.Tensor | None = None
    ref_image: np.ndarray | None = None
    ffn_factor: float = 1.0  # what the master's w1/w3 are currently multiplied by


# ---------------------------------------------------------------------------------------------
# Copies, engines, memory


def free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def allocated(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def param_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def derive(
    master: torch.nn.Module, dtype: torch.dtype, keep_float32: Callable[[str], bool] | None = None
) -> torch.nn.Module:
    """A copy of `master` whose parameters are cast to `dtype` (those `keep_float32` names: float32).

    Nothing is shared with the master (the guard scales weights in place). Buffers are copied as
    they are, as both loaders leave them (e.g. the text encoder's rotary inv_freq stays float32).
    """
    memo: dict[int, Any] = {}
    with torch.no_grad():
        for name, p in master.named_parameters():
            target = F32 if keep_float32 is not None and keep_float32(name) else dtype
            memo[id(p)] = torch.nn.Parameter(p.detach().to(target, copy=True), requires_grad=False)
        for b in master.buffers():
            memo[id(b)] = b.detach().clone()
        return copy.deepcopy(master, memo)


def derive_transformer_fp16(b: Bench) -> torch.nn.Module:
    """float16 transformer as the loader makes it: FLOAT32_MODULES stay float32."""
    return derive(b.master.transformer, F16, is_float32_key)


def make_engine(
    b: Bench, transformer: torch.nn.Module, text_encoder: torch.nn.Module, vae: torch.nn.Module, dtypes: tuple
) -> Engine:
    components = Components(transformer, vae, text_encoder, b.tokenizer, dict(common.SCHEDULER_CONFIG))
    names = dict(zip(("transformer", "text_encoder", "vae"), dtypes, strict=True))
    name = "random-tiny" if b.tiny else "random-real-size"
    return Engine(
        components, ModelInfo(name, None, "none"), b.device, names, ModelLimits(spatial_unit=16, max_pixels=4096**2)
    )


def hook_count(module: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


def set_variant(b: Bench, engine: Engine, variant: str) -> None:
    """Put the engine's float16 transformer in guard state `variant` ("scale", "clamp" or "none")."""
    transformer = engine.components.transformer
    if engine.guard is not None:
        engine.guard.remove()
        engine.guard = None
    if variant == "none":
        for prefix in FLOAT32_MODULES:
            getattr(transformer, prefix.rstrip(".")).half()
        assert hook_count(transformer) == 0
        return
    master = dict(b.master.transformer.named_parameters())
    with torch.no_grad():  # islands back in float32 from the master, not from their float16 values
        for name, p in transformer.named_parameters():
            if is_float32_key(name) and p.dtype is not F32:
                p.data = master[name].detach().to(F32, copy=True)
    engine.guard = install_fp16_guard(transformer, variant)


def scale_ffn(b: Bench, factor: float) -> None:
    """Make the master's feed_forward.w1 and .w3 of every block `factor` times their original value."""
    step = factor / b.ffn_factor  # a power of two: exact in float32, both ways
    t = b.master.transformer
    with torch.no_grad():
        for block in (*t.noise_refiner, *t.context_refiner, *t.layers):
            block.feed_forward.w1.weight.mul_(step)
            block.feed_forward.w3.weight.mul_(step)
    b.ffn_factor = factor


# ---------------------------------------------------------------------------------------------
# Running


@dataclass
class Observed:
    latents: list[torch.Tensor] = field(default_factory=list)
    decodes: list[dict[str, Any]] = field(default_factory=list)
    checks: list[bool] = field(default_factory=list)


@contextlib.contextmanager
def observe(capture: bool, fallback: bool) -> Iterator[Observed]:
    """Record what Engine.generate computes; `fallback=False` answers its finiteness checks "finite"."""
    seen = Observed()
    real_denoise, real_decode, real_all_finite = zengine.denoise, zengine.decode, zengine.all_finite

    def denoise(*args: Any, **kwargs: Any) -> torch.Tensor:
        latents = real_denoise(*args, **kwargs)
        seen.latents.append(latents.detach().float().cpu())
        return latents

    def decode(vae: torch.nn.Module, latents: torch.Tensor) -> torch.Tensor:
        image = real_decode(vae, latents)
        vae_dtype = dtype_name(next(vae.parameters()).dtype)
        seen.decodes.append({"vae_dtype": vae_dtype, "finite": bool(torch.isfinite(image).all())})
        return image

    def all_finite(tensors: Any) -> bool:
        ok = real_all_finite(tensors)
        seen.checks.append(ok)
        return ok or not fallback

    if capture:
        zengine.denoise, zengine.decode = denoise, decode
    zengine.all_finite = all_finite
    try:
        yield seen
    finally:
        zengine.denoise, zengine.decode, zengine.all_finite = real_denoise, real_decode, real_all_finite


def generate(b: Bench, engine: Engine, size: int) -> Any:
    return engine.generate(PROMPT, seed=SEED, width=size, height=size, steps=b.steps, guidance_scale=0.0)


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.double(), ref.double()
    return float((a - ref).norm() / ref.norm())


def one_run(b: Bench, engine: Engine, size: int, *, fallback: bool = True) -> dict[str, Any]:
    """One untimed generate with its latents recorded (also the warm-up)."""
    reset_peak(b.device)
    sync(b.device)
    start = time.perf_counter()
    with observe(capture=True, fallback=fallback) as seen:
        result = generate(b, engine, size)
    sync(b.device)
    seconds = time.perf_counter() - start
    latents = seen.latents[0]  # the first pass: the configured precision, before any fallback
    finite = bool(torch.isfinite(latents).all())
    return {
        "latents": latents,
        "image": np.asarray(result.images[0].image, dtype=np.float64),
        "seconds_untimed": seconds,
        "peak_bytes": peak(b.device),
        "latents_finite": finite,
        "latents_abs_max": float(latents.abs().max()) if finite else None,
        "decodes": seen.decodes,
        "engine_checks": seen.checks,
        "fallbacks": result.fallbacks,
    }


def timed_run(b: Bench, engine: Engine, size: int, *, fallback: bool = True) -> dict[str, Any]:
    reset_peak(b.device)
    sync(b.device)
    start = time.perf_counter()
    with observe(capture=False, fallback=fallback) as seen:
        result = generate(b, engine, size)
    sync(b.device)
    return {
        "seconds": time.perf_counter() - start,
        "peak_bytes": peak(b.device),
        "fallbacks": result.fallbacks,
        "finite": all(seen.checks),
    }


def accuracy(b: Bench, run: dict[str, Any]) -> dict[str, Any]:
    """The JSON part of `one_run`, with errors against the float32 reference of the same weights."""
    out = {k: v for k, v in run.items() if k not in ("latents", "image")}
    if b.ref_latents is not None and run["latents_finite"]:
        out["latent_rel_err_vs_fp32"] = rel_err(run["latents"], b.ref_latents)
        out["pixel_mean_abs_diff_vs_fp32"] = float(np.abs(run["image"] - b.ref_image).mean())
    else:  # no reference yet, or non-finite latents (then latents_finite says so)
        out["latent_rel_err_vs_fp32"] = None
        out["pixel_mean_abs_diff_vs_fp32"] = None
    return out


def times_summary(times: list[float]) -> dict[str, Any]:
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "times_s": times}


def weights(engine: Engine) -> dict[str, int]:
    c = engine.components
    parts = {name: param_bytes(getattr(c, name)) for name in ("transformer", "text_encoder", "vae")}
    return {**parts, "total": sum(parts.values())}


def minus(value: int | None, base: int) -> int | None:
    return None if value is None else value - base


def measure(b: Bench, engine: Engine, base: int) -> dict[str, Any]:
    """Weights, one recorded warm-up run, then `runs` timed runs (cases 1 and 2)."""
    out: dict[str, Any] = {"dtypes": {k: dtype_name(v) for k, v in engine.dtypes.items()}}
    out["weight_bytes"] = weights(engine)
    first = one_run(b, engine, b.size)
    out["accuracy"] = accuracy(b, first)
    runs = [timed_run(b, engine, b.size) for _ in range(b.runs)]
    out["timing"] = times_summary([r["seconds"] for r in runs])
    peaks = [p for p in [first["peak_bytes"], *(r["peak_bytes"] for r in runs)] if p is not None]
    out["peak_bytes"] = minus(max(peaks), base) if peaks else None
    out["fallbacks_in_timed_runs"] = [r["fallbacks"] for r in runs if r["fallbacks"]]
    out["_latents"], out["_image"] = first["latents"], first["image"]
    return out


# ---------------------------------------------------------------------------------------------
# Cases


def case_fp32(b: Bench) -> dict[str, Any]:
    m = b.master
    engine = make_engine(b, m.transformer, m.text_encoder, m.vae, (F32, F32, F32))
    assert engine.guard is None and hook_count(m.transformer) == 0
    out = measure(b, engine, b.res["memory"]["before_master_bytes"])
    b.ref_latents, b.ref_image = out.pop("_latents"), out.pop("_image")
    out["accuracy"]["latent_rel_err_vs_fp32"] = 0.0
    out["accuracy"]["pixel_mean_abs_diff_vs_fp32"] = 0.0
    out["guard"] = None
    return out


def case_bf16(b: Bench) -> dict[str, Any]:
    m = b.master
    base = allocated(b.device)
    tr, te, vae = derive(m.transformer, BF16), derive(m.text_encoder, BF16), derive(m.vae, BF16)
    engine = make_engine(b, tr, te, vae, (BF16, BF16, BF16))
    assert engine.guard is None, "bf16 must not install the float16 guard"
    assert hook_count(tr) == 0, "bf16 transformer has forward hooks"
    out = measure(b, engine, base)
    out.pop("_latents"), out.pop("_image")
    out["guard"] = None
    out["transformer_forward_hooks"] = hook_count(tr)
    return out


def case_fp16_guard(b: Bench) -> dict[str, Any]:
    """Cases 3, 4, 5: accuracy on a fresh copy each, then interleaved timing on one copy."""
    m = b.master
    base = allocated(b.device)
    te, vae = derive(m.text_encoder, F16), derive(m.vae, F32)
    out: dict[str, Any] = {}
    engine: Engine | None = None
    for variant in GUARD_VARIANTS:
        engine = None
        free()
        engine = make_engine(b, derive_transformer_fp16(b), te, vae, (F16, F16, F32))
        assert engine.guard is not None and engine.guard.variant == "scale", "fp16 engine must install the guard"
        set_variant(b, engine, variant)
        tr = engine.components.transformer
        case: dict[str, Any] = {
            "dtypes": {k: dtype_name(v) for k, v in engine.dtypes.items()},
            "guard": None if engine.guard is None else engine.guard.variant,
            "guard_description": None if engine.guard is None else engine.guard.describe(),
            "transformer_forward_hooks": hook_count(tr),
            "float32_parameters": sum(p.numel() for p in tr.parameters() if p.dtype is F32),
            "weight_bytes": weights(engine),
        }
        run = one_run(b, engine, b.size, fallback=variant != "none")
        case["accuracy"] = accuracy(b, run)
        case["peak_bytes_accuracy_run"] = minus(run["peak_bytes"], base)
        out[variant] = case
        b.res["cases"]["fp16"] = out
        save(b)
        print(f"fp16 {variant}: {json.dumps(case)}", flush=True)
        del tr  # so that the next variant's copy is the only float16 transformer alive
    assert engine is not None
    # Timing: the guard switched on one float16 copy between runs; the order rotates every round.
    times: dict[str, list[float]] = {v: [] for v in GUARD_VARIANTS}
    peaks: dict[str, list[int]] = {v: [] for v in GUARD_VARIANTS}
    problems: dict[str, list[Any]] = {v: [] for v in GUARD_VARIANTS}
    for variant in GUARD_VARIANTS:  # warm-up
        set_variant(b, engine, variant)
        timed_run(b, engine, b.size, fallback=variant != "none")
    for i in range(b.rounds):
        order = GUARD_VARIANTS[i % 3 :] + GUARD_VARIANTS[: i % 3]
        for variant in order if i % 2 == 0 else order[::-1]:
            set_variant(b, engine, variant)
            r = timed_run(b, engine, b.size, fallback=variant != "none")
            times[variant].append(r["seconds"])
            if r["peak_bytes"] is not None:
                peaks[variant].append(r["peak_bytes"] - base)
            if r["fallbacks"] or not r["finite"]:
                problems[variant].append({"round": i, "fallbacks": r["fallbacks"], "finite": r["finite"]})
            if r["fallbacks"]:
                raise RuntimeError(f"fp16 {variant} fell back during timing: {r['fallbacks']}; timing stopped")
    none = statistics.median(times["none"])
    for variant in GUARD_VARIANTS:
        case = out[variant]
        case["timing"] = times_summary(times[variant])
        case["peak_bytes"] = max([*peaks[variant], case["peak_bytes_accuracy_run"] or 0]) if peaks[variant] else None
        case["timing_problems"] = problems[variant]
        if variant != "none":
            ratios = [t / n for t, n in zip(times[variant], times["none"], strict=True)]
            case["guard_cost"] = statistics.median(times[variant]) / none - 1
            case["guard_cost_paired_median"] = statistics.median(ratios) - 1
    return out


def case_fp16_all(b: Bench) -> dict[str, Any]:
    """--dtype float16: all three float16 with the guard, at every size; finite? fallbacks?"""
    m = b.master
    base = allocated(b.device)
    out: dict[str, Any] = {}
    engine = make_engine(b, derive_transformer_fp16(b), derive(m.text_encoder, F16), derive(m.vae, F16), (F16,) * 3)
    for size in sorted(set(b.sizes)):
        run = one_run(b, engine, size)
        entry = {k: v for k, v in run.items() if k not in ("latents", "image")}
        entry["image_finite"] = bool(run["decodes"]) and run["decodes"][-1]["finite"]
        entry["peak_bytes"] = minus(run["peak_bytes"], base)
        entry["guard"] = engine.guard.variant if engine.guard is not None else None
        out[str(size)] = entry
        print(f"fp16 all, {size}²: {json.dumps(entry)}", flush=True)
        # Fresh float16 copies of whatever fell back, so every size starts from the same policy.
        for record in run["fallbacks"]:
            component = record["component"]
            setattr(engine.components, component, None)
            free()
            if component == "transformer":
                engine.components.transformer = derive_transformer_fp16(b)
                engine.guard = install_fp16_guard(engine.components.transformer)
            else:
                setattr(engine.components, component, derive(getattr(m, component), F16))
        engine.dtypes = {"transformer": F16, "text_encoder": F16, "vae": F16}
    return out


def case_overflow(b: Bench) -> dict[str, Any]:
    """w1 and w3 of every block times k: where plain float16 overflows, and what each guard gives there."""
    m = b.master
    te, vae = derive(m.text_encoder, F16), derive(m.vae, F32)
    out: dict[str, Any] = {"sweep": [], "compare": {}}
    b.res["cases"]["overflow"] = out

    def fp16_run(k: float, variant: str) -> dict[str, Any]:
        engine = make_engine(b, derive_transformer_fp16(b), te, vae, (F16, F16, F32))
        set_variant(b, engine, variant)
        return one_run(b, engine, b.size, fallback=False)

    saved_ref = b.ref_latents, b.ref_image
    try:
        found = None
        for k in OVERFLOW_KS + OVERFLOW_KS_BEYOND:
            if found is not None:
                break
            scale_ffn(b, k)
            run = fp16_run(k, "none")
            free()
            out["sweep"].append(
                {
                    "k": k,
                    "in_requested_range": k in OVERFLOW_KS,
                    "unguarded_fp16_latents_finite": run["latents_finite"],
                    "latents_abs_max": run["latents_abs_max"],
                }
            )
            print(f"overflow sweep k={k}: finite={run['latents_finite']}", flush=True)
            save(b)
            if not run["latents_finite"]:
                found = k
        out["smallest_k_nonfinite"] = found
        out["smallest_k_nonfinite_in_requested_range"] = found if found in OVERFLOW_KS else None
        ks = [found, 4 * found] if found is not None else [OVERFLOW_KS[-1], 4 * OVERFLOW_KS[-1]]
        for k in ks:
            scale_ffn(b, k)
            ref = one_run(b, make_engine(b, m.transformer, m.text_encoder, m.vae, (F32, F32, F32)), b.size)
            free()
            b.ref_latents, b.ref_image = ref["latents"], ref["image"]
            entry: dict[str, Any] = {
                "fp32_latents_finite": ref["latents_finite"],
                "fp32_abs_max": ref["latents_abs_max"],
            }
            for variant in GUARD_VARIANTS:
                run = fp16_run(k, variant)
                free()
                entry[variant] = accuracy(b, run)
                print(f"overflow k={k} {variant}: {json.dumps(entry[variant])}", flush=True)
            out["compare"][str(k)] = entry
            save(b)
    finally:
        scale_ffn(b, 1.0)
        b.ref_latents, b.ref_image = saved_ref
    return out


CASES: list[tuple[str, Callable[[Bench], dict[str, Any]]]] = [
    ("fp32", case_fp32),
    ("bf16", case_bf16),
    ("fp16", case_fp16_guard),
    ("fp16_all", case_fp16_all),
    ("overflow", case_overflow),
]


# ---------------------------------------------------------------------------------------------
# Report


def environment(device: torch.device) -> dict[str, Any]:
    env = common.environment(device)
    if device.type == "cuda":
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            env["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
    env["matmul_allow_tf32"] = torch.backends.cuda.matmul.allow_tf32
    env["cudnn_allow_tf32"] = torch.backends.cudnn.allow_tf32
    env["float32_matmul_precision"] = torch.get_float32_matmul_precision()
    # What ran, even where the copy of the tree carries no .git: a digest of zturbo's sources.
    src = Path(zengine.__file__).parent
    digest = hashlib.sha256()
    for path in sorted(src.rglob("*.py")):
        digest.update(path.relative_to(src).as_posix().encode() + b"\0" + path.read_bytes())
    env["zturbo_src_sha256"] = digest.hexdigest()
    return env


def save(b: Bench) -> None:
    (b.out / "bench_precision.json").write_text(json.dumps(b.res, indent=1, default=str) + "\n")


def gib(v: int | None) -> str:
    return "—" if v is None else f"{v / GIB:.2f} GiB"


def err(acc: dict[str, Any]) -> str:
    if not acc["latents_finite"]:
        return "non-finite"
    v = acc["latent_rel_err_vs_fp32"]
    return "—" if v is None else f"{v:.2e}"


def table(res: dict[str, Any]) -> str:
    cases = res["cases"]
    lines = [
        "| case | transformer / text enc. / VAE | weights | peak | s/image (median; min–max) "
        "| latent rel. err vs fp32 | latents finite | guard cost |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def row(label: str, c: dict[str, Any]) -> None:
        d = c["dtypes"]
        t = c.get("timing")
        timing = "—" if t is None else f"{t['median_s']:.3f} s; {t['min_s']:.3f}–{t['max_s']:.3f}"
        cost = c.get("guard_cost")
        cost_s = "—" if cost is None else f"{100 * cost:+.1f} % (paired {100 * c['guard_cost_paired_median']:+.1f} %)"
        acc = c["accuracy"]
        lines.append(
            f"| {label} | {d['transformer']} / {d['text_encoder']} / {d['vae']} | {gib(c['weight_bytes']['total'])} "
            f"| {gib(c.get('peak_bytes'))} | {timing} | {err(acc)} "
            f"| {acc['latents_finite']} | {cost_s} |"
        )

    if "fp32" in cases:
        row("1 fp32", cases["fp32"])
    if "bf16" in cases:
        row("2 bf16", cases["bf16"])
    labels = {"scale": "3 fp16 + guard (scale)", "clamp": "4 fp16 + guard (clamp)", "none": "5 fp16, no guard"}
    for variant, case in cases.get("fp16", {}).items():
        row(labels[variant], case)
    if "fp16_all" in cases:
        lines += ["", "| --dtype float16 | latents finite | image finite | fallbacks |", "|---|---|---|---|"]
        for size, e in cases["fp16_all"].items():
            lines.append(f"| {size}² | {e['latents_finite']} | {e['image_finite']} | {e['fallbacks'] or 'none'} |")
    if "overflow" in cases:
        o = cases["overflow"]
        sweep = ", ".join(
            f"k={s['k']}: {'finite' if s['unguarded_fp16_latents_finite'] else 'NON-FINITE'}" for s in o["sweep"]
        )
        lines += ["", f"overflow sweep, unguarded fp16: {sweep}"]
        lines += [
            "",
            "| k | variant | latent rel. err vs fp32 | pixel mean abs diff | finite |",
            "|---|---|---|---|---|",
        ]
        for k, entry in o.get("compare", {}).items():
            for variant in GUARD_VARIANTS:
                a = entry[variant]
                px = a["pixel_mean_abs_diff_vs_fp32"]
                px_s = "—" if px is None else f"{px:.3f}"
                lines.append(f"| {k} | {variant} | {err(a)} | {px_s} | {a['latents_finite']} |")
    if res["errors"]:
        lines += ["", "errors: " + ", ".join(res["errors"])]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny random model on the CPU (smoke test)")
    parser.add_argument("--runs", type=int, default=None, help="timed runs, cases 1 and 2 (default 5; tiny 2)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved timing rounds, cases 3-5 (default 7)")
    parser.add_argument("--sizes", default=None, help="sizes, comma separated; the first is the main size")
    parser.add_argument("--cases", default=",".join(n for n, _ in CASES), help="which cases to run")
    args = parser.parse_args(argv)

    if args.tiny:
        device, steps = torch.device("cpu"), 2
        sizes = [int(s) for s in (args.sizes or "64,32").split(",")]
        runs, rounds = args.runs or 2, args.rounds or 2
    else:
        if not torch.cuda.is_available():
            parser.error("no CUDA device; use --tiny for the CPU smoke test")
        device, steps = torch.device("cuda"), common.STEPS
        sizes = [int(s) for s in (args.sizes or "1024,512,1536").split(",")]
        runs, rounds = args.runs or 5, args.rounds or 7
    out_dir = Path(os.environ.get("OUT") or "bench_out")
    out_dir.mkdir(parents=True, exist_ok=True)

    res: dict[str, Any] = {
        "env": environment(device),
        "config": {
            "tiny": args.tiny,
            "steps": steps,
            "guidance_scale": 0.0,
            "batch": 1,
            "seed": SEED,
            "prompt": PROMPT,
            "size": sizes[0],
            "sizes": sizes,
            "runs": runs,
            "rounds": rounds,
            "overflow_ks": list(OVERFLOW_KS),
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
        },
        "memory": {},
        "cases": {},
        "errors": {},
        "case_seconds": {},
    }
    print(json.dumps(res["env"]), flush=True)
    res["memory"]["before_master_bytes"] = allocated(device)
    start = time.perf_counter()
    tokenizer = build_tokenizer()
    built = common.random_components(device, F32, args.tiny)
    transformer, vae, text_encoder = built.transformer, built.vae, built.text_encoder
    sync(device)
    res["build_s"] = time.perf_counter() - start
    master = Master(transformer, text_encoder, vae)
    res["memory"]["master_bytes"] = allocated(device)
    res["memory"]["device_total_bytes"] = torch.cuda.mem_get_info(device)[1] if device.type == "cuda" else None
    b = Bench(device, args.tiny, sizes[0], sizes, steps, runs, rounds, tokenizer, master, res, out_dir)
    print(f"built the float32 master in {res['build_s']:.1f} s ({gib(res['memory']['master_bytes'])})", flush=True)
    save(b)

    wanted = args.cases.split(",")
    for name, fn in CASES:
        if name not in wanted:
            continue
        tick = time.perf_counter()
        try:
            res["cases"][name] = fn(b)
            print(f"{name}: {json.dumps(res['cases'][name], default=str)}", flush=True)
        except Exception:
            res["errors"][name] = traceback.format_exc()
            print(f"{name} FAILED:\n{res['errors'][name]}", flush=True)
        finally:
            free()
            res["case_seconds"][name] = time.perf_counter() - tick
            save(b)
    res["total_s"] = time.perf_counter() - start
    save(b)
    print()
    print(table(res))
    print(f"\nfull results: {out_dir / 'bench_precision.json'}")
    return 1 if res["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
