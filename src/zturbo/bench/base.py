"""`zturbo bench --base`: the Z-Image base model's settings against diffusers, in one run.

The base model has Turbo's architecture, so the real-size modules with random weights stand for
it; what differs is how it is run, and that comes from its profile (`zturbo.profiles.BASE`): the
scheduler's shift, classifier-free guidance with a negative prompt (zturbo runs the conditional
and unconditional passes as one batch), and many more steps (50 here, the top of its range,
unless `--steps`). diffusers' ZImagePipeline runs the same request on the same module objects
with the same scheduler config and CFG options.

Rows, in this order because compilation changes the modules in place: diffusers eager, then
zturbo compiled bf16 (its first call compiles; eager with --no-compile, and the row is labelled by
what ran). Each is the median of `--runs` end-to-end requests after its warm-up, with its peak
memory; the two images are compared as thumbnails.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import torch

from ..accel.graphs import STEP_SIGHTINGS
from ..engine import Engine
from ..profiles import BASE, Chosen, scheduler_config
from . import common
from .common import Sampling, timed
from .images import image_difference
from .memory import thumbnail
from .report import clock_cell

log = logging.getLogger("zturbo")

STEPS = 50
NEGATIVE_PROMPT = "blurry, low resolution, oversaturated, distorted hands, watermark, text"
Report = Callable[[dict[str, Any]], None]


def sampling(steps: int | None) -> Sampling:
    """The base profile's request: its guidance and CFG options, a negative prompt, `steps` (50 when None)."""
    return Sampling(
        steps=STEPS if steps is None else steps,
        guidance=BASE.guidance,
        negative_prompt=NEGATIVE_PROMPT,
        cfg_normalization=BASE.cfg.normalization > 0,
        cfg_truncation=BASE.cfg.truncation,
    )


def base_engine(device: torch.device, dtype: torch.dtype, tiny: bool) -> Engine:
    """Random real-size (or tiny) modules run as the base model: its profile, chosen as `--preset
    base` chooses it, and the scheduler config that profile gives."""
    components = common.random_components(device, dtype, tiny)
    chosen = Chosen(BASE, "preset")
    components.scheduler_config = scheduler_config(chosen, components.scheduler_config)
    return common.random_engine(components, device, dtype, profile=chosen)


def run(opts: Any, steps: int | None, report: Report = lambda r: None) -> dict[str, Any]:
    """Both rows; `report` gets the results so far after each one (a timeout keeps them)."""
    device, size, request = opts.device, opts.main_size, sampling(steps)
    res: dict[str, Any] = {"environment": common.environment(device), "size": size, "runs": opts.runs}
    res["request"] = {**request.__dict__, "prompt": common.PROMPT, "seed": common.SEED}
    started = time.perf_counter()
    engine = base_engine(device, opts.dtype, opts.tiny)
    res["build_s"] = time.perf_counter() - started
    res["profile"] = engine.profile.describe()
    res["scheduler_config"] = dict(engine.components.scheduler_config)
    images: dict[str, Any] = {}
    if opts.reference:
        pipe = common.reference_pipeline(engine.components)
        call = common.reference_e2e(pipe, size, sampling=request)
        images["diffusers"] = call().images[0]
        res["diffusers_eager"] = timed(call, device, opts.runs, max(opts.warmup - 1, 0))
        log.info("bench --base: diffusers eager %.3f s/img", res["diffusers_eager"]["median_s"])
        report(res)
    res["zturbo"] = {}
    try:
        images["zturbo"] = zturbo_row(res["zturbo"], engine, opts, request, lambda: report(res))
    except Exception as e:  # the reference row stays
        res["zturbo"]["error"] = f"{type(e).__name__}: {e}"[:2000]
    if len(images) == 2:
        res["image_difference"] = image_difference(images["zturbo"], images["diffusers"])
    res["thumbnails"] = {side: thumbnail(image) for side, image in images.items()}
    report(res)
    return res


def zturbo_row(phase: dict[str, Any], engine: Engine, opts: Any, request: Sampling, report: Callable[[], None]) -> Any:
    """zturbo compiled bf16 (eager with --no-compile): the first call (compiles), the engine's
    warm-up (its one-step calls are guided too: the profile's default), then the timed runs.
    Returns the first call's image."""
    from .speed import prepare

    device, size = engine.device, opts.main_size
    prepare(engine, "compiled", opts, "none", True, phase)
    phase["compiled"] = engine.accel.compiling  # what the row's label says (a failed row's too)
    call = common.zturbo_e2e(engine, size, sampling=request)
    common.sync(device)
    started = time.perf_counter()
    result = call()
    common.sync(device)
    phase["first_call_s"] = time.perf_counter() - started
    phase["warmup_s"] = phase["first_call_s"] + (engine.warmup(size, size) if opts.compile else 0.0)
    meta = result.images[0].metadata  # what zturbo says it ran
    phase["ran"] = {key: meta.get(key) for key in ("steps", "guidance_scale", "negative_prompt", "profile")}
    report()
    # A step shape is captured into a CUDA graph on its second request; the first call was one.
    warm = max(opts.warmup, STEP_SIGHTINGS if engine.accel.step_graphs is not None else 0, 1) - 1
    phase |= timed(call, device, opts.runs, warm)
    phase["step_s"] = phase["median_s"] / request.steps
    # A compilation that fails is reverted to eager (`Engine`): the label is what the timed runs ran.
    phase["compiled"] = engine.accel.compiling
    log.info("bench --base: zturbo %.3f s/img", phase["median_s"])
    return result.images[0].image


def markdown(res: dict[str, Any]) -> str:
    """One row per side, then the request and the image comparison."""
    req = res["request"]
    lines = [
        f"Base model (profile {res['profile']['name']}, shift {res['scheduler_config'].get('shift')}): "
        f"{res['size']}², {req['steps']} steps, guidance {req['guidance']:g} with a negative prompt, "
        f"median of {res['runs']}",
        "",
        "| row | s/img | s/step | peak GiB | SM MHz (power-capped) |",
        "|---|---|---|---|---|",
    ]
    zturbo_label = "zturbo compiled" if (res.get("zturbo") or {}).get("compiled") else "zturbo eager"
    for key, label in (("zturbo", zturbo_label), ("diffusers_eager", "diffusers eager")):
        row = res.get(key) or {}
        if "median_s" in row:
            peak = "-" if row.get("peak_gib") is None else f"{row['peak_gib']:.1f}"
            step = row["median_s"] / req["steps"]
            clocks = clock_cell(row.get("gpu_clocks"))
            lines.append(f"| {label} | {row['median_s']:.3f} | {step:.4f} | {peak} | {clocks} |")
        elif "error" in row:
            lines.append(f"| {label} | FAILED: {row['error'][:200]} | | | |")
    zturbo, reference = res.get("zturbo") or {}, res.get("diffusers_eager") or {}
    if "median_s" in zturbo and "median_s" in reference:
        lines += ["", f"- speedup over diffusers eager: {reference['median_s'] / zturbo['median_s']:.2f}x"]
    if "warmup_s" in zturbo:
        lines.append(f"- zturbo first call {zturbo['first_call_s']:.1f} s, warm-up in all {zturbo['warmup_s']:.1f} s")
    if "image_difference" in res:
        lines.append(f"- zturbo against diffusers: {res['image_difference']:.2f}/255 (32x32 thumbnails)")
    return "\n".join(lines)
