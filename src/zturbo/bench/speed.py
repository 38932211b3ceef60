"""`zturbo bench`: zturbo against diffusers' ZImagePipeline on the same weights, in one process.

The real architecture is built with random weights directly on the GPU (`--random-weights`, no
download) or loaded from a local checkpoint (`--model DIR`). The SAME module objects go to the
zturbo engine and to diffusers, so the comparison is of the runtimes, not of the weights.

Phases, in this order because compilation and quantization change the modules in place:
  1. eager: diffusers (the reference) and zturbo, end to end at every size; zturbo's final
     latents at the first size are the baseline for the error columns;
  2. optional: diffusers with `compile_repeated_blocks` (the reference's own fast path);
  3. zturbo compiled (bf16): warm-up (compile) time, every size, batch throughput, latent error;
  4. zturbo fp8 (`--quantize fp8`, compiled): warm-up time, every size, latent error.
End to end means prompt -> decoded 8-bit image (PNG encoding is timed on its own). Every timing
is the median of `--runs` after `--warmup` untimed runs, with the device synchronised around it.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..accel import attention
from ..accel.graphs import STEP_SIGHTINGS
from ..engine import Engine, ModelInfo, denoise, encode_prompt, starting_point
from ..loader import Components
from ..request import ModelLimits
from .clocks import ClockSampler

log = logging.getLogger("zturbo")

PROMPT = (
    "A photograph of a red fox sitting in fresh snow at sunrise, soft golden light, shallow depth of field, "
    "highly detailed fur, 85mm lens."
)
SEED = 42
STEPS = 8
GIB = 2**30
SCHEDULER_CONFIG: dict[str, Any] = {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": False}
# Qwen3-4B, the text encoder Z-Image-Turbo ships.
QWEN3_4B_CONFIG: dict[str, Any] = {
    "hidden_size": 2560,
    "intermediate_size": 9728,
    "num_hidden_layers": 36,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 151936,
    "max_position_embeddings": 40960,
    "rope_theta": 1e6,
    "tie_word_embeddings": True,
}


@dataclass(frozen=True)
class BenchOptions:
    sizes: tuple[int, ...] = (512, 1024, 1536, 2048)
    batch: int = 4
    runs: int = 5
    warmup: int = 1
    quantize: tuple[str, ...] = ("none", "fp8")
    reference: bool = True
    reference_compiled: bool = False
    compile: bool = True
    profile: bool = False
    first_image: bool = False
    fuse_ab: bool = True  # also measure the compiled mode without fused projections
    attention_ab: bool = True  # where FlashAttention 3 runs, also measure the compiled mode with SDPA
    eager_vae: bool = False  # compiled rows keep the VAE decoder eager (labelled in the results)
    tiny: bool = False
    model: str | None = None  # None: random weights


# ---------------------------------------------------------------------------------------------
# Models


def random_components(device: torch.device, dtype: torch.dtype, tiny: bool) -> Components:
    """The real architecture (or the tiny test one) with random weights, built on `device` in `dtype`."""
    from diffusers import AutoencoderKL, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    from .. import tiny as tiny_model

    tokenizer = tiny_model.build_tokenizer()
    with _building(device, dtype):
        if tiny:
            transformer = ZImageTransformer2DModel(**tiny_model.TRANSFORMER_CONFIG)
            text_config = Qwen3Config(**tiny_model.text_encoder_config(len(tokenizer)))
        else:
            transformer = ZImageTransformer2DModel()  # the published default config
            text_config = Qwen3Config(**QWEN3_4B_CONFIG)
        vae = AutoencoderKL(**(tiny_model.VAE_CONFIG if tiny else tiny_model.FLUX_VAE_CONFIG))
        text_encoder = Qwen3Model(text_config)
    # All-zero pad rows would make fp8's per-row activation scale 0/0; trained pad tokens are not zero.
    tiny_model.randomize_pad_tokens(transformer)
    for module in (transformer, vae, text_encoder):
        module.eval().requires_grad_(False)
    return Components(transformer, vae, text_encoder, tokenizer, dict(SCHEDULER_CONFIG))


def random_module(build: Callable[[], torch.nn.Module], device: torch.device | str, dtype: torch.dtype) -> Any:
    """One module with random weights (seed 0) built directly on `device` in `dtype`, for inference."""
    with _building(device, dtype):
        module = build()
    return module.eval().requires_grad_(False)


@contextlib.contextmanager
def _building(device: torch.device | str, dtype: torch.dtype) -> Iterator[None]:
    """Modules created inside draw their random weights from seed 0, directly on `device` in `dtype`."""
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def load_engine(opts: BenchOptions, device: torch.device, dtype: torch.dtype) -> Engine:
    """An eager engine: random weights, or the checkpoint in `opts.model` (no warm-up yet)."""
    from ..config import RuntimeConfig

    if opts.model is None:
        components = random_components(device, dtype, opts.tiny)
        model = ModelInfo("random-weights", None, "none")
        dtypes = dict.fromkeys(("transformer", "text_encoder", "vae"), dtype)
        return Engine(components, model, device, dtypes, ModelLimits(spatial_unit=16, max_pixels=4096 * 4096))
    config = RuntimeConfig(model=opts.model, device=str(device), dtype="auto", compile="off")
    return Engine.load(config, warmup=False)


def reference_pipeline(components: Components) -> Any:
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline

    pipe = ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(components.scheduler_config),
        vae=components.vae,
        text_encoder=components.text_encoder,
        tokenizer=components.tokenizer,
        transformer=components.transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---------------------------------------------------------------------------------------------
# Measuring


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device, runs: int, warmup: int) -> dict[str, Any]:
    """Median seconds over `runs` after `warmup` calls, the peak memory of the timed calls, and
    the GPU's SM clock and power while they ran (`zturbo.clocks`; None without nvidia-smi)."""
    for _ in range(warmup):
        fn()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    with ClockSampler(device) as clocks:  # what the GPU ran at: power-capped cards clock down
        for _ in range(runs):
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times.append(time.perf_counter() - start)
    return {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        "times_s": times,
        "peak_gib": torch.cuda.max_memory_allocated(device) / GIB if cuda else None,
        "gpu_clocks": clocks.summary(),
    }


def once(fn: Callable[[], Any], device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def final_latents(engine: Engine, size: int) -> torch.Tensor:
    """The float32 latents after the last step, through the engine's current (maybe compiled) modules."""
    c = engine.components
    with torch.inference_mode():
        cond, _ = encode_prompt(c.text_encoder, c.tokenizer, [PROMPT], engine.device)
        latents, sched = starting_point(c, [SEED], size, size, STEPS, engine.limits.spatial_unit)
        return denoise(c.transformer, latents.to(engine.device), cond, None, sched, 0.0)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float().cpu(), b.float().cpu()
    return float((a - b).norm() / b.norm())


def encode_ab(engine: Engine, runs: int) -> dict[str, Any]:
    """The compiled text encoder on the bench prompt with its CUDA graphs and without: seconds
    (median of 4 × `runs`) and the embeddings' relative difference."""
    c, device = engine.components, engine.device
    graphs = engine._encoder_graphs()

    def encode(g: Any) -> Callable[[], torch.Tensor]:
        return lambda: encode_prompt(c.text_encoder, c.tokenizer, [PROMPT], device, graphs=g)[0][0]

    with torch.inference_mode():
        plain, graphed = encode(None)(), encode(graphs)()
        out = {"graphs": timed(encode(graphs), device, 4 * runs, 2), "plain": timed(encode(None), device, 4 * runs, 2)}
    out["rel_diff"] = rel_err(graphed, plain)
    return out


def zturbo_e2e(engine: Engine, size: int, batch: int = 1, cached_prompt: bool = False) -> Callable[[], Any]:
    """One user request; the prompt cache is emptied first unless `cached_prompt` (a repeated prompt)."""

    def run() -> Any:
        if not cached_prompt:
            engine.prompt_cache.clear()
        return engine.generate(PROMPT, seed=SEED, width=size, height=size, steps=STEPS, batch=batch)

    return run


def reference_e2e(pipe: Any, size: int, batch: int = 1) -> Callable[[], Any]:
    def run() -> Any:
        return pipe(
            prompt=PROMPT,
            num_inference_steps=STEPS,
            guidance_scale=0.0,
            width=size,
            height=size,
            num_images_per_prompt=batch,
            generator=torch.Generator("cpu").manual_seed(SEED),
            output_type="pil",
        )

    return run


def png_encode_seconds(engine: Engine, size: int) -> float:
    from ..imageio import png_info

    image = engine.generate(PROMPT, seed=SEED, width=size, height=size, steps=1).images[0]
    start = time.perf_counter()
    image.image.save(io.BytesIO(), format="PNG", pnginfo=png_info(image.metadata))
    return time.perf_counter() - start


# ---------------------------------------------------------------------------------------------
# Phases


def first_image(opts: BenchOptions, started: float) -> dict[str, Any]:
    """Seconds from `started` (process start) to the first compiled 1024² image: build, compile, generate."""
    from ..accel import compile as accel

    device = torch.device("cpu") if opts.tiny else torch.device("cuda")
    engine = load_engine(opts, device, torch.float32 if opts.tiny else torch.bfloat16)
    built = time.perf_counter()
    backend = "eager" if opts.tiny else "inductor"
    engine.accel = accel.apply(engine.components, compile_=opts.compile, quantize=opts.quantize[0], backend=backend)
    engine.generate(PROMPT, seed=SEED, width=1024, height=1024, steps=STEPS)
    sync(device)
    done = time.perf_counter()
    return {
        "environment": environment(device),
        "quantize": opts.quantize[0],
        "first_image_s": done - started,
        "build_s": built - started,
        "compile_and_generate_s": done - built,
        "inductor_cache": os.environ.get("TORCHINDUCTOR_CACHE_DIR"),
    }


def run(opts: BenchOptions, report: Callable[[dict[str, Any]], None] = lambda r: None) -> dict[str, Any]:
    """All phases; `report` gets the results so far after each one (a timeout keeps them)."""

    device = torch.device("cpu") if opts.tiny else torch.device("cuda")
    dtype = torch.float32 if opts.tiny else torch.bfloat16
    res: dict[str, Any] = {"environment": environment(device), "options": opts.__dict__ | {"sizes": opts.sizes}}
    start = time.perf_counter()
    engine = load_engine(opts, device, dtype)
    res["build_s"] = time.perf_counter() - start
    res["weights_gib"] = _weight_bytes(engine) / GIB
    runs, warm = opts.runs, opts.warmup
    main_size = 1024 if 1024 in opts.sizes else opts.sizes[0]

    eager: dict[str, Any] = {"zturbo": {}, "reference": {}}
    res["eager"] = eager
    baseline = final_latents(engine, main_size)
    pipe = reference_pipeline(engine.components) if opts.reference else None
    for size in opts.sizes:
        eager["zturbo"][size] = timed(zturbo_e2e(engine, size), device, runs, warm)
        if pipe is not None:
            eager["reference"][size] = timed(reference_e2e(pipe, size), device, runs, warm)
        report(res)
    eager["zturbo_batch"] = timed(zturbo_e2e(engine, main_size, opts.batch), device, max(2, runs // 2), warm)
    if pipe is not None:
        eager["reference_batch"] = timed(reference_e2e(pipe, main_size, opts.batch), device, max(2, runs // 2), warm)
    res["png_encode_s"] = png_encode_seconds(engine, main_size)
    report(res)

    if pipe is not None and opts.reference_compiled:
        res["reference_compiled"] = _reference_compiled(pipe, device, main_size, runs, warm, baseline)
        report(res)

    bf16 = opts.compile and "none" in opts.quantize
    phases = [("compiled_unfused", "none", False)] if bf16 and opts.fuse_ab else []
    if bf16 and opts.attention_ab and not opts.tiny and attention.flash_attention_3() is not None:
        phases.append(("compiled_sdpa", "none", True))
    phases += [("compiled" if q == "none" else q, q, True) for q in opts.quantize]
    for key, quantize, fuse in phases:
        if quantize == "fp8" and (opts.tiny or not _fp8_capable(device)):
            res[key] = {"skipped": "no fp8-capable GPU"}
            continue
        res[key] = {"compile": opts.compile, "fuse": fuse, "sizes": {}}
        try:
            _compiled_phase(res, key, engine, opts, quantize, fuse, baseline, report)
        except Exception as e:  # one broken mode must not lose the others' numbers
            res[key]["error"] = f"{type(e).__name__}: {e}"[:2000]
        report(res)
    return res


def _compiled_phase(
    res: dict[str, Any],
    key: str,
    engine: Engine,
    opts: BenchOptions,
    quantize: str,
    fuse: bool,
    baseline: torch.Tensor,
    report: Callable[[dict[str, Any]], None],
) -> None:
    from ..accel import compile as accel

    device, runs = engine.device, opts.runs
    # A step shape is captured into a CUDA graph on its second request (zturbo.graphs): warm up
    # that far, so each row times the steady state rather than one capture among few runs.
    warm = max(opts.warmup, STEP_SIGHTINGS)
    main_size = 1024 if 1024 in opts.sizes else opts.sizes[0]
    phase = res[key]
    engine.accel.revert_compile()
    torch._dynamo.reset()
    # Inductor needs a GPU toolchain to pay off; the CPU smoke test only traces (no graph breaks).
    backend = "eager" if opts.tiny else "inductor"
    started = time.perf_counter()
    with attention.flash_attention_3_enabled(key != "compiled_sdpa"):
        engine.accel = accel.apply(
            engine.components,
            compile_=opts.compile,
            quantize=quantize,
            fuse=fuse,
            backend=backend,
            vae=not opts.eager_vae,
        )
    phase["attention"] = engine.accel.attention
    phase["vae_compiled"] = opts.compile and not opts.eager_vae
    phase["prepare_s"] = time.perf_counter() - started  # quantization, when there is one
    log.info("bench %s: prepared in %.1f s; first call (compiles)", key, phase["prepare_s"])
    report(res)
    phase["first_call_s"] = once(zturbo_e2e(engine, main_size), device)  # compiles
    # Reported at once: when a command's time limit cuts the phase, what finished is still known.
    log.info("bench %s: first call took %.1f s", key, phase["first_call_s"])
    report(res)
    phase["warmup_s"] = phase["first_call_s"] + engine.warmup(main_size, main_size)
    phase["latent_rel_err_vs_eager"] = rel_err(final_latents(engine, main_size), baseline)
    report(res)
    sizes = (main_size,) if key in AB_PHASES else opts.sizes  # an A/B needs one size
    for size in sizes:
        phase["sizes"][size] = timed(zturbo_e2e(engine, size), device, runs, warm)
        report(res)
    if key in AB_PHASES:
        return
    phase["cached_prompt"] = timed(zturbo_e2e(engine, main_size, cached_prompt=True), device, runs, warm)
    if engine._encoder_graphs() is not None:
        phase["encode"] = encode_ab(engine, runs)
    batch = timed(zturbo_e2e(engine, main_size, opts.batch), device, max(2, runs // 2), warm)
    batch["images_per_s"] = opts.batch / batch["median_s"]
    phase["batch"] = batch
    if opts.profile and device.type == "cuda":
        phase["profile"] = profile(zturbo_e2e(engine, main_size))


AB_PHASES = ("compiled_unfused", "compiled_sdpa")  # one-size comparisons with the default compiled mode
PHASES = (*AB_PHASES, "compiled", "fp8")


# Kernel-name fragments that identify matrix products and attention in a CUDA profile.
MATMUL_KERNELS = ("gemm", "matmul", "cutlass", "sm90_xmma", "nvjet", "_scaled_mm", "f8f8")
ATTENTION_KERNELS = ("flash", "fmha", "attention", "cudnn_generated", "sdpa")


def kernel_kind(name: str) -> str:
    """matmul, attention or other, by kernel name. Attention first: FlashAttention 3's and the
    memory-efficient SDPA kernels are CUTLASS kernels too."""
    lower = name.lower()
    if any(k in lower for k in ATTENTION_KERNELS):
        return "attention"
    return "matmul" if any(k in lower for k in MATMUL_KERNELS) else "other"


def profile(fn: Callable[[], Any], top: int = 15) -> dict[str, Any]:
    """GPU kernel time of one call by kind (matmul / attention / other), the `top` longest kernels,
    and the GPU's idle time within the call, charged to the engine's stages (`zturbo.*` ranges)."""
    fn()
    events = profiled_events(fn)
    device = device_events(events)
    totals = {"matmul": 0.0, "attention": 0.0, "other": 0.0}
    by_name: dict[str, list[float]] = {}
    for start, end, name in device:
        entry = by_name.setdefault(name, [0.0, 0])
        entry[0] += (end - start) / 1000
        entry[1] += 1
    kernels = []
    for name, (ms, count) in by_name.items():
        kind = kernel_kind(name)
        totals[kind] += ms
        kernels.append({"name": name[:120], "ms": ms, "count": int(count), "kind": kind})
    kernels.sort(key=lambda k: -k["ms"])
    out = {"total_ms": sum(totals.values()), "by_kind_ms": totals, "top": kernels[:top]}
    try:
        out["idle"] = idle_by_stage(events, device)
    except Exception as e:  # a diagnostic: the kernel totals above stand on their own
        out["idle"] = {"error": f"{type(e).__name__}: {e}"[:300]}
    return out


def profiled_events(fn: Callable[[], Any]) -> Any:
    """The CPU and CUDA profiler events of one call of `fn`, inside a `zturbo.request` range."""
    from torch.profiler import ProfilerActivity, record_function
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        with record_function("zturbo.request"):
            fn()
        torch.cuda.synchronize()
    return prof.events()


# Device-side profiler records that are not GPU work: the launch queue filling up.
NOT_GPU_WORK = ("Command Buffer Full",)


def device_events(events: Any) -> list[tuple[float, float, str]]:
    """(start µs, end µs, name) of the GPU's kernels, copies and memsets, in start order, without
    the GPU-side mirrors of `zturbo.*` ranges and the profiler's queue markers."""
    from torch.autograd import DeviceType

    return sorted(
        (e.time_range.start, e.time_range.end, e.name)
        for e in events
        if e.device_type == DeviceType.CUDA and not e.name.startswith("zturbo.") and e.name not in NOT_GPU_WORK
    )


def idle_by_stage(events: Any, device: list[tuple[float, float, str]], min_gap_us: float = 20.0) -> dict[str, Any]:
    """GPU idle time inside the `zturbo.request` range: total, by the innermost `zturbo.*` stage
    range open at each gap, and the longest gaps with the GPU work on either side and the CPU
    operations that overlap them most.

    Kernel and CPU-range times come from one profiler clock. Gaps under `min_gap_us` (launch
    spacing) are counted in the total but not listed.
    """
    from torch.autograd import DeviceType

    ranges = [
        (e.time_range.start, e.time_range.end, e.name)
        for e in events
        if e.device_type == DeviceType.CPU and e.name.startswith("zturbo.")
    ]
    request = max((r for r in ranges if r[2] == "zturbo.request"), key=lambda r: r[1] - r[0])
    stages = [r for r in ranges if r[2] != "zturbo.request"]
    cpu_ops = [
        (e.time_range.start, e.time_range.end, e.name)
        for e in events
        if e.device_type == DeviceType.CPU and not e.name.startswith("zturbo.")
    ]
    gaps = []
    cursor, before = request[0], "(request start)"
    for start, end, name in device:
        if not request[0] <= start <= request[1]:
            continue
        if start > cursor:
            gaps.append((start - cursor, cursor, before, name))
        if end > cursor:
            cursor, before = end, name
    if request[1] > cursor:
        gaps.append((request[1] - cursor, cursor, before, "(request end)"))

    def stage_at(t: float) -> str:
        inside = [s for s in stages if s[0] <= t < s[1]]
        return min(inside, key=lambda s: s[1] - s[0])[2] if inside else "(between stages)"

    def cpu_during(at: float, gap: float) -> list[str]:
        overlap: dict[str, float] = {}
        for start, end, name in cpu_ops:
            shared = min(end, at + gap) - max(start, at)
            if shared > 0:
                overlap[name] = overlap.get(name, 0.0) + shared
        return [f"{name[:60]} {ms / 1000:.2f} ms" for name, ms in sorted(overlap.items(), key=lambda kv: -kv[1])[:4]]

    per_stage: dict[str, float] = {}
    for gap, at, _, _ in gaps:
        key = stage_at(at + gap / 2)
        per_stage[key] = per_stage.get(key, 0.0) + gap / 1000
    longest = sorted((g for g in gaps if g[0] >= min_gap_us), key=lambda g: -g[0])[:15]
    return {
        "request_ms": (request[1] - request[0]) / 1000,
        "idle_ms": sum(g[0] for g in gaps) / 1000,
        "by_stage_ms": dict(sorted(per_stage.items(), key=lambda kv: -kv[1])),
        "stage_cpu_ms": {name: (end - start) / 1000 for start, end, name in stages},
        "after_last_stage_ms": (request[1] - max(end for _, end, _ in stages)) / 1000 if stages else None,
        "longest": [
            {
                "ms": g[0] / 1000,
                "stage": stage_at(g[1] + g[0] / 2),
                "after": g[2][:80],
                "before": g[3][:80],
                "cpu": cpu_during(g[1], g[0]),
            }
            for g in longest
        ],
    }


def _reference_compiled(
    pipe: Any, device: torch.device, size: int, runs: int, warm: int, baseline: torch.Tensor
) -> dict[str, Any]:
    """diffusers' own fast path: `compile_repeated_blocks(fullgraph=True)`, undone afterwards."""
    transformer = pipe.transformer
    transformer.compile_repeated_blocks(fullgraph=True)
    try:
        first = once(reference_e2e(pipe, size), device)
        out = timed(reference_e2e(pipe, size), device, runs, warm)
        out["first_call_s"] = first
        return out
    finally:
        for module in transformer.modules():  # nn.Module.compile keeps its wrapper here
            if getattr(module, "_compiled_call_impl", None) is not None:
                module._compiled_call_impl = None
        torch._dynamo.reset()


def _fp8_capable(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def _weight_bytes(engine: Engine) -> int:
    c = engine.components
    return sum(p.numel() * p.element_size() for m in (c.transformer, c.vae, c.text_encoder) for p in m.parameters())


def environment(device: torch.device) -> dict[str, Any]:
    import diffusers
    import transformers

    from ..version import __version__

    env: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "zturbo": __version__,
    }
    with contextlib.suppress(ImportError):
        import torchao

        env["torchao"] = torchao.__version__
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        env["git_commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).parent,
        ).stdout.strip()
    return env


# ---------------------------------------------------------------------------------------------
# Output


def markdown(res: dict[str, Any]) -> str:
    """One row per (mode, size): seconds per image, the eager reference beside it, peak memory."""
    reference = res.get("eager", {}).get("reference", {})
    lines = [
        "| mode | size | zturbo s/img | reference eager s/img | speedup | zturbo peak GiB | latent rel. err "
        "| SM MHz (power-capped) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for mode, sizes in _modes(res):
        err = res.get(mode, {}).get("latent_rel_err_vs_eager")
        if mode != "eager" and res.get(mode, {}).get("vae_compiled") is False:
            mode += " (eager VAE)"
        for size, t in sizes.items():
            ref = reference.get(size)
            ref_s = f"{ref['median_s']:.3f}" if ref else "-"
            speedup = f"{ref['median_s'] / t['median_s']:.2f}x" if ref else "-"
            peak = f"{t['peak_gib']:.1f}" if t.get("peak_gib") is not None else "-"
            lines.append(
                f"| {mode} | {size}² | {t['median_s']:.3f} | {ref_s} | {speedup} | {peak} | "
                f"{'-' if err is None else f'{err:.2e}'} | {clock_cell(t.get('gpu_clocks'))} |"
            )
    lines.append("")
    for mode in ("eager", *PHASES):
        phase = res.get(mode, {})
        if "error" in phase:
            lines.append(f"- {mode} FAILED: {phase['error'][:300]}")
        if "batch" in phase:
            b = phase["batch"]
            lines.append(f"- {mode} batch {res['options']['batch']}: {b['images_per_s']:.2f} images/s")
        if "warmup_s" in phase:
            lines.append(f"- {mode} warm-up (compile) {phase['warmup_s']:.1f} s")
        if "encode" in phase:
            enc = phase["encode"]
            lines.append(
                f"- {mode} text encoder: {enc['graphs']['median_s'] * 1000:.1f} ms with CUDA graphs, "
                f"{enc['plain']['median_s'] * 1000:.1f} ms without (rel. diff {enc['rel_diff']:.1e})"
            )
        if "cached_prompt" in phase:
            lines.append(f"- {mode} repeated prompt (text encoder skipped): {phase['cached_prompt']['median_s']:.3f} s")
    if "reference_compiled" in res:
        rc = res["reference_compiled"]
        lines.append(
            f"- reference compile_repeated_blocks: {rc['median_s']:.3f} s/img (first call {rc['first_call_s']:.1f} s)"
        )
    if "png_encode_s" in res:
        lines.append(f"- PNG encoding (not in the times above): {res['png_encode_s'] * 1000:.0f} ms")
    return "\n".join(lines)


def clock_cell(clocks: dict[str, Any] | None) -> str:
    """'1530 (100 %)': the median SM clock and the share of samples with the power cap active."""
    if not clocks:
        return "-"
    return f"{clocks['sm_mhz_median']:.0f} ({clocks['power_capped_share']:.0%})".replace("%", " %")


def _modes(res: dict[str, Any]) -> Iterator[tuple[str, dict[Any, Any]]]:
    if "eager" in res:
        yield "eager", res["eager"]["zturbo"]
    for mode in PHASES:
        if res.get(mode, {}).get("sizes"):
            yield mode, res[mode]["sizes"]


def write(res: dict[str, Any], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench.json").write_text(json.dumps(res, indent=2, default=str) + "\n")
    (out_dir / "bench.md").write_text(markdown(res) + "\n")


def options(args: argparse.Namespace) -> BenchOptions:
    from ..errors import InvalidRequestError

    if not (args.random_weights or args.model or args.tiny):
        raise InvalidRequestError("zturbo bench needs --random-weights or --model DIR (a local checkpoint)")
    try:
        sizes = tuple(int(s) for s in args.sizes.split(","))
    except ValueError:
        raise InvalidRequestError(f"--sizes {args.sizes!r} is not a comma-separated list of integers") from None
    bad = [s for s in sizes if s <= 0 or s % 16]
    if bad:
        raise InvalidRequestError(f"--sizes {bad} are not positive multiples of 16")
    modes = tuple(m.strip() for m in args.quantize.split(",") if m.strip())
    if any(m not in ("none", "fp8") for m in modes):
        raise InvalidRequestError(f"--quantize {args.quantize!r}: each mode must be none or fp8")
    for name in ("batch", "runs"):
        if getattr(args, name) < 1:
            raise InvalidRequestError(f"--{name} {getattr(args, name)} must be at least 1")
    return BenchOptions(
        sizes=sizes,
        batch=args.batch,
        runs=args.runs,
        warmup=args.warmup,
        quantize=modes,
        reference=not args.no_reference,
        reference_compiled=args.reference_compiled,
        compile=not args.no_compile,
        tiny=args.tiny,
        model=args.model,
        profile=args.profile,
        first_image=args.first_image,
        fuse_ab=not args.no_fuse_ab,
        attention_ab=not args.no_attention_ab,
        eager_vae=args.eager_vae,
    )


def main(args: argparse.Namespace) -> int:
    from ..errors import DeviceError

    if args.write_checkpoint or args.loading:
        return _loading(args)
    opts = options(args)
    if not opts.tiny and not torch.cuda.is_available():
        raise DeviceError("zturbo bench measures a CUDA GPU and none is available; --tiny runs a CPU smoke test")
    out_dir = Path(args.out or os.environ.get("OUT") or "bench")
    if args.cap_row or args.memory_caps or args.fp8_caps:
        return _memory_caps(args, opts, out_dir)
    if opts.first_image:
        res = first_image(opts, args.started)
        print(json.dumps(res, indent=2))
        out_dir.mkdir(parents=True, exist_ok=True)
        name = f"first_image_{res['quantize']}_{int(time.time())}.json"
        (out_dir / name).write_text(json.dumps(res, indent=2) + "\n")
        return 0
    res = run(opts, report=lambda r: write(r, out_dir))
    write(res, out_dir)
    print(markdown(res))
    print(f"\nfull results: {out_dir / 'bench.json'}")
    return 0


def _memory_caps(args: argparse.Namespace, opts: BenchOptions, out_dir: Path) -> int:
    from ..errors import InvalidRequestError
    from . import memory as bench_memory

    size = opts.sizes[0]
    if args.cap_row:  # a child process: one row, as one JSON line
        kind, _, cap = args.cap_row.partition(":")
        if kind not in bench_memory.KINDS:
            raise InvalidRequestError(f"--cap-row {args.cap_row!r}: kind must be one of {bench_memory.KINDS}")
        print(json.dumps(bench_memory.row(kind, float(cap or 0), size, opts.runs), default=str))
        return 0

    def caps(text: str | None) -> list[float]:
        try:
            return [float(c) for c in (text or "").split(",") if c.strip()]
        except ValueError:
            raise InvalidRequestError(f"{text!r} is not a comma-separated list of GiB (0 = uncapped)") from None

    def report(rows: list[dict[str, Any]]) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "bench_memory.json").write_text(json.dumps(rows, indent=2, default=str) + "\n")
        (out_dir / "bench_memory.md").write_text(bench_memory.markdown(rows) + "\n")

    rows = bench_memory.run_caps(caps(args.memory_caps), size, opts.runs, opts.reference, caps(args.fp8_caps), report)
    print(bench_memory.markdown(rows))
    return 0


def _loading(args: argparse.Namespace) -> int:
    from ..errors import DeviceError
    from . import loading as bench_loading

    device = torch.device("cpu") if args.tiny else torch.device("cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError("the loading benchmark loads onto a CUDA GPU and none is available; --tiny uses the CPU")
    if args.write_checkpoint:
        root = bench_loading.write_checkpoint(Path(args.write_checkpoint), device)
        print(f"wrote {root}")
    if args.load_row:  # a child process: one load, as one JSON line
        print(json.dumps(bench_loading.load_row(args.load_row, Path(args.loading), device)))
        return 0
    if args.loading:
        rows = bench_loading.run_loading(Path(args.loading), args.tiny, max(1, args.runs))
        out_dir = Path(args.out or os.environ.get("OUT") or "bench")
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "bench_loading.json").write_text(json.dumps(rows, indent=2) + "\n")
        print(bench_loading.markdown(rows))
    return 0
