"""zturbo's eager path against diffusers' eager ZImagePipeline, same process, same weights.

Builds the real Z-Image-Turbo architecture (6B transformer, FLUX VAE, Qwen3-4B text encoder) with
random weights directly on the GPU, hands the SAME module objects to `zturbo.engine.Engine` and to
`diffusers.ZImagePipeline`, and measures (bf16, 8 steps, guidance 0, batch 1):

  * end to end, prompt -> PIL image, at 1024² (and 512², 1536²);
  * text encoding alone;
  * denoise + decode alone, both given the same prompt embeddings;
  * peak GPU memory of each (torch.cuda.max_memory_allocated, weights included);
  * the relative error between the two implementations' final float32 latents;
  * host syncs inside zturbo's step loop (torch.cuda.set_sync_debug_mode("warn")).

Timed runs alternate between the implementations (the order flips every round) and report the
median. Results: a markdown table on stdout and everything as JSON in $OUT/bench_eager.json.

Usage (GPU):  PYTHONPATH=src python scripts/bench_eager.py
Smoke test:   PYTHONPATH=src python scripts/bench_eager.py --tiny   (tiny sizes, CPU, float32)
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import inspect
import json
import linecache
import os
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from zturbo import engine as zengine
from zturbo.bench.speed import environment, random_components
from zturbo.engine import Engine, ModelInfo
from zturbo.loader import Components
from zturbo.precision import all_finite
from zturbo.request import ModelLimits
from zturbo.tiny import build_tokenizer

PROMPT = (
    "A photograph of a red fox sitting in fresh snow at sunrise, soft golden light, shallow depth of field, "
    "highly detailed fur, 85mm lens."
)
SEED = 42
STEPS = 8
SCHEDULER_CONFIG: dict[str, Any] = {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": False}
GIB = 2**30


@dataclass
class Bench:
    device: torch.device
    dtype: torch.dtype
    engine: Engine
    pipe: Any  # diffusers.ZImagePipeline
    runs: int
    warmup: int


# ---------------------------------------------------------------------------------------------
# Models


def build_modules(tiny: bool, device: torch.device, dtype: torch.dtype, vocab: int) -> tuple[Any, Any, Any]:
    """(transformer, vae, text_encoder) with random weights, built directly on `device` in `dtype`.

    The builder is `zturbo.bench.speed.random_components` (`vocab` is implied by its tokenizer).
    """
    c = random_components(device, dtype, tiny)
    return c.transformer, c.vae, c.text_encoder


def build(tiny: bool, device: torch.device, dtype: torch.dtype, runs: int, warmup: int) -> Bench:
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline

    tokenizer = build_tokenizer()
    transformer, vae, text_encoder = build_modules(tiny, device, dtype, len(tokenizer))
    components = Components(transformer, vae, text_encoder, tokenizer, dict(SCHEDULER_CONFIG))
    dtypes = {"transformer": dtype, "text_encoder": dtype, "vae": dtype}
    engine = Engine(
        components,
        ModelInfo("random-real-size", None, "none"),
        device,
        dtypes,
        ModelLimits(spatial_unit=16, max_pixels=4096 * 4096),
    )
    pipe = ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    return Bench(device, dtype, engine, pipe, runs, warmup)


# ---------------------------------------------------------------------------------------------
# The two implementations, stage by stage


def zturbo_e2e(b: Bench, size: int) -> Any:
    return b.engine.generate(PROMPT, seed=SEED, width=size, height=size, steps=STEPS, guidance_scale=0.0)


def diffusers_call(b: Bench, size: int, output_type: str, **inputs: Any) -> Any:
    """The reference pipeline at the benchmark's settings; `inputs` is a prompt or prompt_embeds."""
    return b.pipe(
        **inputs,
        height=size,
        width=size,
        num_inference_steps=STEPS,
        guidance_scale=0.0,
        generator=torch.Generator("cpu").manual_seed(SEED),
        output_type=output_type,
    ).images


def diffusers_e2e(b: Bench, size: int, output_type: str = "pil") -> Any:
    return diffusers_call(b, size, output_type, prompt=PROMPT)


def zturbo_encode(b: Bench) -> list[torch.Tensor]:
    c = b.engine.components
    with torch.inference_mode():  # as Engine.generate runs it
        embeds, _ = zengine.encode_prompt(c.text_encoder, c.tokenizer, [PROMPT], b.device)
    return embeds


def diffusers_encode(b: Bench) -> list[torch.Tensor]:
    with torch.no_grad():  # as ZImagePipeline.__call__ runs it
        embeds, _ = b.pipe.encode_prompt(PROMPT, b.device, do_classifier_free_guidance=False)
    return embeds


def zturbo_latents(
    b: Bench, size: int, embeds: list[torch.Tensor], model_t: torch.Tensor | None = None
) -> torch.Tensor:
    """Engine.generate's steps after encoding, up to the final float32 latents.

    `model_t` replaces the schedule's transformer timestep inputs (for the parity diagnosis).
    """
    c = b.engine.components
    with torch.inference_mode():
        latents, sched = zengine.starting_point(c, [SEED], size, size, STEPS, b.engine.limits.spatial_unit)
        latents = latents.to(b.device)
        if model_t is not None:
            sched = dataclasses.replace(sched, model_t=model_t)
        return zengine.denoise(c.transformer, latents, embeds, None, sched, 0.0)


def diffusers_model_t(b: Bench) -> torch.Tensor:
    """The transformer's timestep inputs as ZImagePipeline computes them: (1000 - t) / 1000 on the device."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler.from_config(b.engine.components.scheduler_config)
    scheduler.set_timesteps(sigmas=torch.linspace(1.0, 1 / STEPS, STEPS).tolist(), device=b.device)
    return torch.stack([((1000 - t.expand(1)) / 1000)[0] for t in scheduler.timesteps]).cpu()


def zturbo_denoise_decode(b: Bench, size: int, embeds: list[torch.Tensor]) -> Any:
    """Denoise + decode + PIL conversion, as Engine.generate does them after encoding (finite checks included)."""
    from PIL import Image

    latents = zturbo_latents(b, size, embeds)
    with torch.inference_mode():
        if not all_finite(latents):
            raise RuntimeError("non-finite latents")
        image = zengine.decode(b.engine.components.vae, latents)
        if not all_finite(image):
            raise RuntimeError("non-finite image")
        pixels = zengine.to_uint8(image)
    return [Image.fromarray(a) for a in pixels.numpy()]


def diffusers_from_embeds(b: Bench, size: int, embeds: list[torch.Tensor], output_type: str = "pil") -> Any:
    return diffusers_call(b, size, output_type, prompt_embeds=embeds)


# ---------------------------------------------------------------------------------------------
# Measuring


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def compare(b: Bench, fns: dict[str, Callable[[], Any]], runs: int | None = None) -> dict[str, Any]:
    """Warm up each, then time `runs` rounds alternating the order; median seconds and peak memory."""
    runs = runs or b.runs
    cuda = b.device.type == "cuda"
    for fn in fns.values():
        for _ in range(b.warmup):
            fn()
    sync(b.device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    peaks: dict[str, int] = dict.fromkeys(fns, 0)
    names = list(fns)
    for r in range(runs):
        for name in names if r % 2 == 0 else names[::-1]:
            if cuda:
                torch.cuda.reset_peak_memory_stats(b.device)
            sync(b.device)
            start = time.perf_counter()
            fns[name]()
            sync(b.device)
            times[name].append(time.perf_counter() - start)
            if cuda:
                peaks[name] = max(peaks[name], torch.cuda.max_memory_allocated(b.device))
    out: dict[str, Any] = {}
    for name in names:
        out[name] = {
            "median_s": statistics.median(times[name]),
            "min_s": min(times[name]),
            "times_s": times[name],
            "peak_gib": peaks[name] / GIB if cuda else None,
        }
    z, d = out["zturbo"]["median_s"], out["diffusers"]["median_s"]
    out["speedup"] = d / z
    return out


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float().cpu(), b.detach().float().cpu()
    return float((a - b).norm() / b.norm())


def image_diff(a: Any, b: Any) -> dict[str, float]:
    x, y = np.asarray(a, dtype=np.int16), np.asarray(b, dtype=np.int16)
    d = np.abs(x - y)
    return {"mean_abs": float(d.mean()), "max_abs": float(d.max()), "frac_equal": float((d == 0).mean())}


# ---------------------------------------------------------------------------------------------
# Host-sync check


@dataclass
class SyncEvent:
    message: str
    stack: list[traceback.FrameSummary]


@contextlib.contextmanager
def record_syncs() -> Iterator[list[SyncEvent]]:
    """Every synchronizing CUDA call made inside the block, with the Python stack that made it."""
    events: list[SyncEvent] = []
    notices: list[str] = []

    def show(message: Warning | str, category: type[Warning], filename: str, lineno: int, *args: Any) -> None:
        text = str(message)
        if "called a synchronizing CUDA operation" in text:
            stack = [f for f in traceback.extract_stack()[:-1] if not f.filename.endswith("warnings.py")]
            events.append(SyncEvent(text, stack))
        else:  # e.g. the mode's own notice that it is a prototype
            notices.append(text)

    with warnings.catch_warnings():  # restores showwarning and the filters on exit
        warnings.simplefilter("always")
        warnings.showwarning = show
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield events
        finally:
            torch.cuda.set_sync_debug_mode("default")
    for text in dict.fromkeys(notices):
        print(f"warning while checking syncs (not a sync): {text}", flush=True)


def _short(path: str) -> str:
    for marker in ("site-packages/", "/src/"):
        if marker in path:
            return path.split(marker, 1)[1]
    return path


def _where(frame: traceback.FrameSummary) -> str:
    code = (frame.line or linecache.getline(frame.filename, frame.lineno or 0)).strip()
    return f"{_short(frame.filename)}:{frame.lineno} ({frame.name}): {code}"


def summarize_syncs(events: list[SyncEvent], loop_file: str, loop_lines: range) -> dict[str, Any]:
    """Group syncs by the line that made them; `in_loop` when the loop function's frame is inside `loop_lines`."""
    counts: Counter[tuple[str, bool, str, tuple[str, ...]]] = Counter()
    for event in events:
        outer = [f for f in event.stack if f.filename == loop_file and f.lineno in loop_lines]
        via = _where(outer[-1]) if outer else ""
        # The callers that say which model code it was (torch.nn.Module's dispatch frames left out).
        callers = [f for f in event.stack[:-1] if not f.filename.endswith("torch/nn/modules/module.py")]
        counts[(_where(event.stack[-1]), bool(outer), via, tuple(_where(f) for f in callers[-3:]))] += 1
    locations = [
        {"where": where, "in_step_loop": in_loop, "via": via, "callers": list(callers), "count": n}
        for (where, in_loop, via, callers), n in counts.most_common()
    ]
    return {
        "messages": sorted({e.message for e in events}),
        "total": len(events),
        "in_step_loop": sum(loc["count"] for loc in locations if loc["in_step_loop"]),
        "locations": locations,
    }


def sync_check(b: Bench, size: int, embeds: list[torch.Tensor]) -> dict[str, Any]:
    if b.device.type != "cuda":
        return {"skipped": "not a CUDA device"}
    source, first = inspect.getsourcelines(zengine.denoise)
    loop_start = first + next(i for i, line in enumerate(source) if line.strip().startswith("for i, dt in"))
    zturbo_loop = range(loop_start, first + len(source))
    c = b.engine.components
    with torch.inference_mode():
        latents, sched = zengine.starting_point(c, [SEED], size, size, STEPS, b.engine.limits.spatial_unit)
        latents = latents.to(b.device)
        sync(b.device)
        with record_syncs() as z_events:
            zengine.denoise(c.transformer, latents, embeds, None, sched, 0.0)
        sync(b.device)
    from diffusers.pipelines.z_image import pipeline_z_image

    source, first = inspect.getsourcelines(pipeline_z_image.ZImagePipeline.__call__)
    loop_start = first + next(i for i, line in enumerate(source) if "for i, t in enumerate(timesteps)" in line)
    loop_end = first + next(i for i, line in enumerate(source) if 'if output_type == "latent"' in line)
    with record_syncs() as d_events:
        diffusers_from_embeds(b, size, embeds, output_type="latent")
    sync(b.device)
    # The whole request, prompt -> PIL, for context: syncs outside the loop are expected (tokenizer
    # output, finite checks, the copy of the image to the host).
    with record_syncs() as z_all:
        zturbo_e2e(b, size)
    sync(b.device)
    with record_syncs() as d_all:
        diffusers_e2e(b, size)
    sync(b.device)
    diffusers_loop = range(loop_start, loop_end)
    return {
        "zturbo_generate_e2e": summarize_syncs(z_all, zengine.__file__, zturbo_loop),
        "diffusers_pipeline_e2e": summarize_syncs(d_all, pipeline_z_image.__file__, diffusers_loop),
        "size": size,
        "zturbo_denoise": summarize_syncs(z_events, zengine.__file__, zturbo_loop),
        "diffusers_pipeline_latent": summarize_syncs(d_events, pipeline_z_image.__file__, diffusers_loop),
    }


# ---------------------------------------------------------------------------------------------
# Report


def table(res: dict[str, Any]) -> str:
    rows = [
        "| case | zturbo | diffusers | speedup | zturbo peak | diffusers peak |",
        "|---|---|---|---|---|---|",
    ]

    def gib(v: float | None) -> str:
        return "—" if v is None else f"{v:.1f} GiB"

    def row(label: str, r: dict[str, Any]) -> None:
        z, d = r["zturbo"], r["diffusers"]
        rows.append(
            f"| {label} | {z['median_s']:.3f} s | {d['median_s']:.3f} s | {r['speedup']:.2f}x "
            f"| {gib(z['peak_gib'])} | {gib(d['peak_gib'])} |"
        )

    if "encode" in res:
        n = res["encode"]["tokens"]
        row(f"text encoding ({n} vs {res['encode']['diffusers_padded_to']} tokens)", res["encode"])
    for key, r in res.get("denoise_decode", {}).items():
        row(f"{key}² denoise + decode (same embeddings)", r)
    for key, r in res.get("e2e", {}).items():
        row(f"{key}² end to end, prompt → PIL", r)
    lines = rows
    if "latents" in res:
        lat = res["latents"]
        lines.append("")
        lines.append(
            f"final latents ({lat['size']}²), ||zturbo - diffusers|| / ||diffusers||: "
            f"{lat['rel_err_vs_diffusers']:.3e} "
            f"(diffusers vs itself: {lat['rel_err_diffusers_repeat']:.3e}; initial noise identical: "
            f"{lat['noise_identical']}); with diffusers' timestep inputs "
            f"(max difference {lat['timestep_inputs_max_abs_diff']:.2e}): "
            f"{lat['rel_err_vs_diffusers_with_diffusers_timestep_inputs']:.3e}"
        )
    if "sync_check" in res and "skipped" not in res["sync_check"]:
        s = res["sync_check"]
        z, d = s["zturbo_denoise"], s["diffusers_pipeline_latent"]
        lines.append(
            f"host syncs: zturbo denoise {z['total']} ({z['in_step_loop']} inside the step loop); "
            f"diffusers pipeline (latent output) {d['total']} ({d['in_step_loop']} inside its step loop); "
            f"whole request: zturbo {s['zturbo_generate_e2e']['total']}, "
            f"diffusers {s['diffusers_pipeline_e2e']['total']}"
        )
    return "\n".join(lines)


def save(res: dict[str, Any], out_dir: Path) -> None:
    (out_dir / "bench_eager.json").write_text(json.dumps(res, indent=1) + "\n")


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny random model on the CPU in float32 (smoke test)")
    parser.add_argument("--runs", type=int, default=None, help="timed runs per case (default 5; tiny 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs per case and implementation")
    parser.add_argument("--sizes", default=None, help="end-to-end sizes, comma separated (first = main size)")
    args = parser.parse_args(argv)

    if args.tiny:
        device, dtype = torch.device("cpu"), torch.float32
        sizes = [int(s) for s in (args.sizes or "64,32,96").split(",")]
        runs = args.runs or 3
    else:
        if not torch.cuda.is_available():
            parser.error("no CUDA device; use --tiny for the CPU smoke test")
        device, dtype = torch.device("cuda"), torch.bfloat16
        sizes = [int(s) for s in (args.sizes or "1024,512,1536").split(",")]
        runs = args.runs or 5
    out_dir = Path(os.environ.get("OUT") or tempfile.gettempdir())
    out_dir.mkdir(parents=True, exist_ok=True)
    main_size = sizes[0]

    res: dict[str, Any] = {
        "env": environment(device),
        "config": {
            "tiny": args.tiny,
            "dtype": str(dtype).removeprefix("torch."),
            "steps": STEPS,
            "guidance_scale": 0.0,
            "batch": 1,
            "seed": SEED,
            "runs": runs,
            "warmup": args.warmup,
            "sizes": sizes,
            "prompt": PROMPT,
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
        },
    }
    print(json.dumps(res["env"]), flush=True)

    start = time.perf_counter()
    b = build(args.tiny, device, dtype, runs, args.warmup)
    sync(device)
    res["build_s"] = time.perf_counter() - start
    if device.type == "cuda":
        res["weights_gib"] = torch.cuda.memory_allocated(device) / GIB
    print(f"built in {res['build_s']:.1f} s", flush=True)

    # (a) end to end at the main size first: the acceptance number.
    res["e2e"] = {}
    res["e2e"][str(main_size)] = compare(
        b, {"zturbo": lambda: zturbo_e2e(b, main_size), "diffusers": lambda: diffusers_e2e(b, main_size)}
    )
    print(f"e2e {main_size}: {json.dumps(res['e2e'][str(main_size)])}", flush=True)
    images = {"zturbo": zturbo_e2e(b, main_size).images[0].image, "diffusers": diffusers_e2e(b, main_size)[0]}
    res["e2e_image_diff"] = {"size": main_size, **image_diff(images["zturbo"], images["diffusers"])}
    last = zturbo_e2e(b, main_size)
    res["zturbo_internal_timings"] = last.timings
    res["zturbo_fallbacks"] = last.fallbacks  # a precision escalation would make the comparison unequal
    if last.fallbacks:
        print(f"WARNING: zturbo escalated precision: {last.fallbacks}", flush=True)
    save(res, out_dir)

    # (b) text encoding alone.
    z_embeds, d_embeds = zturbo_encode(b), diffusers_encode(b)
    res["encode"] = compare(b, {"zturbo": lambda: zturbo_encode(b), "diffusers": lambda: diffusers_encode(b)}, 4 * runs)
    res["encode"]["tokens"] = int(z_embeds[0].shape[0])
    res["encode"]["diffusers_padded_to"] = 512
    res["encode"]["same_length"] = z_embeds[0].shape == d_embeds[0].shape
    res["encode"]["rel_err_embeds"] = rel_err(z_embeds[0], d_embeds[0]) if res["encode"]["same_length"] else None
    print(f"encode: {json.dumps(res['encode'])}", flush=True)
    save(res, out_dir)

    # (c) denoise + decode alone, both from diffusers' embeddings.
    embeds = [e.clone() for e in d_embeds]
    res["denoise_decode"] = {
        str(main_size): compare(
            b,
            {
                "zturbo": lambda: zturbo_denoise_decode(b, main_size, embeds),
                "diffusers": lambda: diffusers_from_embeds(b, main_size, embeds),
            },
        )
    }
    print(f"denoise+decode {main_size}: {json.dumps(res['denoise_decode'])}", flush=True)
    save(res, out_dir)

    # (d) final latents of the two implementations, same noise and embeddings.
    z_lat = zturbo_latents(b, main_size, embeds)
    d_lat = diffusers_from_embeds(b, main_size, embeds, output_type="latent")
    d_lat2 = diffusers_from_embeds(b, main_size, embeds, output_type="latent")
    unit = b.engine.limits.spatial_unit
    h = main_size // unit * 2
    d_noise = b.pipe.prepare_latents(
        1, 16, main_size, main_size, torch.float32, device, torch.Generator("cpu").manual_seed(SEED)
    )
    z_noise = zengine.prepare_latents([SEED], 16, h, h).to(device)
    # Diagnosis: the same run with the transformer's timestep inputs computed the way diffusers computes them.
    c = b.engine.components
    z_model_t = zengine.schedule(c.scheduler_config, STEPS, (h // 2) ** 2).model_t
    d_model_t = diffusers_model_t(b)
    z_lat_dt = zturbo_latents(b, main_size, embeds, model_t=d_model_t)
    res["latents"] = {
        "size": main_size,
        "shape": list(z_lat.shape),
        "rel_err_vs_diffusers": rel_err(z_lat, d_lat),
        "rel_err_diffusers_repeat": rel_err(d_lat2, d_lat),
        "max_abs_diff": float((z_lat.float().cpu() - d_lat.float().cpu()).abs().max()),
        "diffusers_abs_max": float(d_lat.abs().max()),
        "any_nan": bool(torch.isnan(z_lat).any() or torch.isnan(d_lat).any()),
        "noise_identical": bool(torch.equal(z_noise.cpu(), d_noise.cpu())),
        "timestep_inputs_identical": bool(torch.equal(z_model_t, d_model_t)),
        "timestep_inputs_max_abs_diff": float((z_model_t - d_model_t).abs().max()),
        "rel_err_vs_diffusers_with_diffusers_timestep_inputs": rel_err(z_lat_dt, d_lat),
    }
    print(f"latents: {json.dumps(res['latents'])}", flush=True)
    save(res, out_dir)

    # (e) host syncs.
    res["sync_check"] = sync_check(b, main_size, embeds)
    print(f"sync check: {json.dumps(res['sync_check'], indent=1)}", flush=True)
    save(res, out_dir)

    # (a) other sizes.
    for size in sizes[1:]:
        res["e2e"][str(size)] = compare(
            b, {"zturbo": lambda s=size: zturbo_e2e(b, s), "diffusers": lambda s=size: diffusers_e2e(b, s)}
        )
        print(f"e2e {size}: {json.dumps(res['e2e'][str(size)])}", flush=True)
        save(res, out_dir)

    res["total_s"] = time.perf_counter() - start
    res["zturbo_dtypes_at_end"] = {k: str(v).removeprefix("torch.") for k, v in b.engine.dtypes.items()}
    save(res, out_dir)
    print()
    print(table(res))
    print(f"\nfull results: {out_dir / 'bench_eager.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
