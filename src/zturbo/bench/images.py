"""`zturbo bench --images`: image inputs against diffusers' own pipelines on the same modules.

Real architecture with random weights, plus a real-size random ControlNet in Fun-ControlNet-Union
2.1's shape (control_in_dim 33: control, mask and masked image; 15 control layers on every other
block; the control noise refiner), built on the device and sharing the transformer's embedders
and refiners (`from_transformer`). One size, one seed, one prompt, the same three input pictures
on both sides (a gradient with noise, a centred-rectangle mask, an edge map that needs no
preprocessing). Rows, each beside diffusers' pipeline for the mode:

  txt2img (the baseline)  ZImagePipeline
  img2img at 0.5          ZImageImg2ImgPipeline
  inpaint                 ZImageInpaintPipeline
  controlnet              ZImageControlNetPipeline
  controlnet_inpaint      ZImageControlNetInpaintPipeline

Order, because compilation changes the modules in place: the transformer and ControlNet forwards
of one image per mode on both sides (eager, counted with hooks), diffusers eager (and, with
`--reference-compiled`, diffusers with `compile_repeated_blocks` on the transformer), then zturbo
compiled bf16. `--memory-caps` adds one ControlNet row per cap, each in a fresh process with the
engine the planner places for the cap (as `zturbo.bench.memory` does for text-to-image).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from ..accel.graphs import STEP_SIGHTINGS
from ..control import own_parameters
from ..engine import Engine
from . import common
from . import memory as memory_bench
from .common import PROMPT, SEED, STEPS, once, timed
from .memory import thumbnail

log = logging.getLogger("zturbo")

STRENGTH = 0.5  # img2img: half the schedule, 4 of 8 steps
CONTROL_SCALE = 0.75  # diffusers' default
# Fun-ControlNet-Union 2.1: a control layer on every other one of the transformer's 30 blocks.
CONTROL_LAYERS = 15
CONTROL_IN_DIM = 33
# Each row: diffusers' pipeline for it and the input pictures it takes.
ROWS: dict[str, tuple[str, tuple[str, ...]]] = {
    "txt2img": ("ZImagePipeline", ()),
    "img2img": ("ZImageImg2ImgPipeline", ("image",)),
    "inpaint": ("ZImageInpaintPipeline", ("image", "mask")),
    "controlnet": ("ZImageControlNetPipeline", ("control_image",)),
    "controlnet_inpaint": ("ZImageControlNetInpaintPipeline", ("image", "mask", "control_image")),
}
DIFFUSERS_NAMES = {"image": "image", "mask": "mask_image", "control_image": "control_image"}
Report = Callable[[dict[str, Any]], None]
Images = dict[str, dict[str, Image.Image]]  # side (zturbo_eager, diffusers, zturbo_compiled) -> row -> image


# ---------------------------------------------------------------------------------------------
# Inputs


def input_pictures(size: int) -> dict[str, Image.Image]:
    """The same three pictures for both sides: an RGB gradient with seeded noise (the init image),
    a white centred rectangle on black (the mask: white repaints) and white outlines on black (the
    control image: already an edge map, so no preprocessing and no OpenCV)."""
    ramp = np.linspace(0, 255, size, dtype=np.float32)
    noise = np.random.default_rng(SEED).normal(0, 24, (size, size, 3)).astype(np.float32)
    rgb = np.stack([np.broadcast_to(ramp, (size, size)), np.broadcast_to(ramp[:, None], (size, size)),
                    np.full((size, size), 96, np.float32)], axis=-1)  # fmt: skip
    picture = Image.fromarray(np.clip(rgb + noise, 0, 255).astype(np.uint8), "RGB")
    q = size // 4
    mask = Image.new("L", (size, size), 0)
    ImageDraw.Draw(mask).rectangle((q, q, size - q - 1, size - q - 1), fill=255)
    edges = Image.new("RGB", (size, size), (0, 0, 0))
    draw, width = ImageDraw.Draw(edges), max(1, size // 256)
    draw.rectangle((size // 8, size // 8, size - size // 8, size - size // 8), outline=(255,) * 3, width=width)
    draw.ellipse((q, q, size - q, size - q), outline=(255,) * 3, width=width)
    draw.line((0, size - 1, size - 1, 0), fill=(255,) * 3, width=width)
    return {"image": picture, "mask": mask, "control_image": edges}


# ---------------------------------------------------------------------------------------------
# Models


def controlnet_config(transformer: torch.nn.Module, tiny: bool) -> dict[str, Any]:
    """Union 2.1's ControlNet config for `transformer`: at the real size 15 control layers (at 0, 2,
    ..., 28), the control noise refiner, control_in_dim 33; the tiny one from `zturbo.tiny`."""
    from .. import tiny as tiny_model
    from ..control.structure import layer_places, transformer_fields

    if tiny:
        return tiny_model.tiny_controlnet_config("2.1")
    t = transformer_fields(transformer.config)
    return {
        "control_layers_places": layer_places(CONTROL_LAYERS, t.pop("n_layers")),
        "control_refiner_layers_places": list(range(t["n_refiner_layers"])),
        "control_in_dim": CONTROL_IN_DIM,
        "add_control_noise_refiner": "control_noise_refiner",
        **t,
    }


def random_controlnet(transformer: torch.nn.Module, device: torch.device, dtype: torch.dtype, tiny: bool) -> Any:
    """diffusers' ZImageControlNetModel in Union 2.1's shape with random weights, built on `device`
    in `dtype` and sharing `transformer`'s embedders and refiners. The projections diffusers
    zero-initialises (`before_proj`, `after_proj`) are random too, so the control changes the image."""
    from diffusers import ZImageControlNetModel

    with common._building(device, dtype):
        model = ZImageControlNetModel(**controlnet_config(transformer, tiny))
        for name, module in model.named_modules():
            if name.endswith(("before_proj", "after_proj")):
                module.reset_parameters()
    model.eval().requires_grad_(False)
    return ZImageControlNetModel.from_transformer(model, transformer)


def controlnet_components(device: torch.device, dtype: torch.dtype, tiny: bool) -> Any:
    """`common.random_components` with a random Union 2.1 ControlNet on `Components.controlnet`."""
    from ..control import ControlNet

    components = common.random_components(device, dtype, tiny)
    model = random_controlnet(components.transformer, device, dtype, tiny)
    controlnet = ControlNet(model=model, name="random-weights", version="union-2.1", sha256="random-weights")
    return dataclasses.replace(components, controlnet=controlnet)


def reference_pipelines(components: Any, controlnet: torch.nn.Module) -> dict[str, Any]:
    """Each row's diffusers pipeline over the same module objects the engine runs."""
    import diffusers

    modules = {
        "vae": components.vae,
        "text_encoder": components.text_encoder,
        "tokenizer": components.tokenizer,
        "transformer": components.transformer,
    }
    pipes = {}
    for row, (name, inputs) in ROWS.items():
        extra = {"controlnet": controlnet} if "control_image" in inputs else {}
        scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_config(components.scheduler_config)
        pipe = getattr(diffusers, name)(scheduler=scheduler, **modules, **extra)
        pipe.set_progress_bar_config(disable=True)
        pipes[row] = pipe
    return pipes


# ---------------------------------------------------------------------------------------------
# One request each way


def zturbo_call(engine: Engine, row: str, pictures: dict[str, Image.Image], size: int) -> Callable[[], Any]:
    """One user request of `row`. The prompt and input-image caches are emptied first: diffusers
    encodes the prompt and the images on every call, and so does each timed zturbo run."""
    params: dict[str, Any] = {field: pictures[field] for field in ROWS[row][1]}
    if row == "img2img":
        params["strength"] = STRENGTH
    if "control_image" in params:
        params["control_scale"] = CONTROL_SCALE

    def run() -> Any:
        engine.prompt_cache.clear()
        engine.latent_cache.clear()
        return engine.generate(PROMPT, seed=SEED, width=size, height=size, steps=STEPS, **params)

    return run


def reference_call(pipe: Any, row: str, pictures: dict[str, Image.Image], size: int) -> Callable[[], Any]:
    """The same request through diffusers' pipeline for `row`, to a decoded 8-bit image."""
    params: dict[str, Any] = {DIFFUSERS_NAMES[field]: pictures[field] for field in ROWS[row][1]}
    if row == "img2img":
        params["strength"] = STRENGTH
    if "control_image" in params:
        params["controlnet_conditioning_scale"] = CONTROL_SCALE

    def run() -> Any:
        return pipe(
            prompt=PROMPT,
            num_inference_steps=STEPS,
            guidance_scale=0.0,
            width=size,
            height=size,
            generator=torch.Generator("cpu").manual_seed(SEED),
            output_type="pil",
            **params,
        )

    return run


@contextlib.contextmanager
def counting(modules: dict[str, torch.nn.Module | None]) -> Iterator[dict[str, int]]:
    """Forward calls of each module while inside (eager only: a CUDA graph's replay calls none)."""
    counts = dict.fromkeys(modules, 0)

    def counter(name: str) -> Callable[..., None]:
        def hook(*_: Any) -> None:
            counts[name] += 1

        return hook

    handles = [m.register_forward_pre_hook(counter(n)) for n, m in modules.items() if m is not None]
    try:
        yield counts
    finally:
        for handle in handles:
            handle.remove()


def image_difference(a: Image.Image, b: Image.Image) -> float:
    """Mean absolute difference (of 255) between two images' 32x32 thumbnails."""
    return float(np.abs(np.asarray(thumbnail(a)) - np.asarray(thumbnail(b))).mean())


# ---------------------------------------------------------------------------------------------
# The run


def describe(opts: Any, caps: list[float]) -> str:
    """What the run does, printed before it starts."""
    size = opts.main_size
    sides = "diffusers eager" + (" and compiled" if opts.reference_compiled else "") if opts.reference else ""
    lines = [
        f"zturbo bench --images: {size}x{size}, {STEPS} steps, seed {SEED}, median of {opts.runs} per row, "
        f"random weights ({'tiny' if opts.tiny else 'real size'}) with a random Union 2.1 ControlNet",
        f"rows: {', '.join(ROWS)} (img2img at strength {STRENGTH}, control scale {CONTROL_SCALE})",
        "1. one image per row on both sides, eager, transformer and ControlNet forwards counted",
        f"2. {sides or 'no diffusers rows (--no-reference)'}",
        f"3. zturbo {_zturbo_kind(opts.compile, opts.dtype)}: {'compile, then ' if opts.compile else ''}every row",
    ]
    if caps:
        lines.append(f"4. the controlnet row under {', '.join(f'{c:g}' for c in caps)} GiB caps, a fresh process each")
    return "\n".join(lines)


def run(opts: Any, report: Report = lambda r: None) -> dict[str, Any]:
    """Every row but the capped ones; `report` gets the results so far after each row."""
    device, size = opts.device, opts.main_size
    res: dict[str, Any] = {"environment": common.environment(device), "size": size, "steps": STEPS}
    res |= {"strength": STRENGTH, "control_scale": CONTROL_SCALE, "runs": opts.runs}
    start = time.perf_counter()
    engine = common.random_engine(controlnet_components(device, opts.dtype, opts.tiny), device, opts.dtype)
    res["build_s"] = time.perf_counter() - start
    controlnet = engine.components.controlnet.model
    res["controlnet"] = engine.components.controlnet.describe()
    res["controlnet"]["params"] = sum(p.numel() for p in own_parameters(controlnet))
    pictures = input_pictures(size)
    pipes = reference_pipelines(engine.components, controlnet) if opts.reference else {}
    images: Images = {"zturbo_eager": {}, "diffusers": {}, "zturbo_compiled": {}}
    res["forwards"] = eager_images(engine, pipes, pictures, size, images)
    report(res)
    if pipes:
        res["reference"] = {}
        reference_rows(res["reference"], pipes, pictures, opts, lambda: report(res))
    if pipes and opts.reference_compiled:
        res["reference_compiled"] = {}
        reference_compiled_rows(res["reference_compiled"], pipes, pictures, opts, lambda: report(res))
    res["compiled"] = {}
    try:
        zturbo_rows(res["compiled"], engine, pictures, opts, images["zturbo_compiled"], lambda: report(res))
    except Exception as e:  # the rows measured so far stay
        res["compiled"]["error"] = f"{type(e).__name__}: {e}"[:2000]
    res["images"] = compare_images(images)
    res["thumbnails"] = {row: thumbnail(image) for row, image in images["zturbo_compiled"].items()}
    res["summary"] = summary(res)
    report(res)
    return res


def eager_images(
    engine: Engine, pipes: dict[str, Any], pictures: dict[str, Image.Image], size: int, images: Images
) -> dict[str, Any]:
    """One image per row on each side, eager, its transformer and ControlNet forwards counted (a
    compiled step replayed from a CUDA graph calls no module, so the count is taken here)."""
    c = engine.components
    modules = {"transformer": c.transformer, "controlnet": c.controlnet.model}
    forwards: dict[str, Any] = {}
    for row in ROWS:
        forwards[row] = {}
        calls = {"zturbo_eager": zturbo_call(engine, row, pictures, size)}
        if row in pipes:
            calls["diffusers"] = reference_call(pipes[row], row, pictures, size)
        for side, call in calls.items():
            try:
                with counting(modules) as counts:
                    images[side][row] = _picture(call())
                forwards[row][side.removesuffix("_eager")] = counts
            except Exception as e:  # one broken row must not lose the others
                forwards[row][side.removesuffix("_eager")] = {"error": f"{type(e).__name__}: {e}"[:2000]}
        log.info("bench --images: %s forwards %s", row, forwards[row])
    return forwards


def _picture(out: Any) -> Image.Image:
    """The first image of a zturbo GenerateResult or a diffusers pipeline output."""
    first = out.images[0]
    return getattr(first, "image", first)


def reference_rows(
    phase: dict[str, Any],
    pipes: dict[str, Any],
    pictures: dict[str, Image.Image],
    opts: Any,
    report: Callable[[], None],
) -> None:
    """diffusers eager, every row."""
    for row, pipe in pipes.items():
        try:
            phase[row] = timed(reference_call(pipe, row, pictures, opts.main_size), opts.device, opts.runs, opts.warmup)
        except Exception as e:  # one broken row must not lose the others
            phase[row] = {"error": f"{type(e).__name__}: {e}"[:2000]}
        _log(f"diffusers eager {row}", phase[row])
        report()


def reference_compiled_rows(
    phase: dict[str, Any],
    pipes: dict[str, Any],
    pictures: dict[str, Image.Image],
    opts: Any,
    report: Callable[[], None],
) -> None:
    """diffusers with its own regional compilation of the transformer
    (`compile_repeated_blocks(fullgraph=True)`, as `zturbo.bench.speed.reference_compiled`),
    every row; undone afterwards."""
    transformer = pipes["txt2img"].transformer
    transformer.compile_repeated_blocks(fullgraph=True)
    try:
        for row, pipe in pipes.items():
            call = reference_call(pipe, row, pictures, opts.main_size)
            try:
                first = once(call, opts.device)
                phase[row] = timed(call, opts.device, opts.runs, opts.warmup) | {"first_call_s": first}
            except Exception as e:  # one broken row must not lose the others
                phase[row] = {"error": f"{type(e).__name__}: {e}"[:2000]}
            _log(f"diffusers compiled {row}", phase[row])
            report()
    finally:
        for module in transformer.modules():  # nn.Module.compile keeps its wrapper here
            if getattr(module, "_compiled_call_impl", None) is not None:
                module._compiled_call_impl = None
        torch._dynamo.reset()


def zturbo_rows(
    phase: dict[str, Any],
    engine: Engine,
    pictures: dict[str, Image.Image],
    opts: Any,
    images: dict[str, Image.Image],
    report: Callable[[], None],
) -> None:
    """zturbo compiled bf16 (eager with --no-compile): compile (one text-to-image request and the
    engine's warm-up), then every row: its first call (new graphs: the VAE encoder, the
    ControlNet) and its timed runs."""
    from .speed import prepare

    device, size = engine.device, opts.main_size
    prepare(engine, "compiled", opts, "none", True, phase)
    phase["kind"] = _zturbo_kind(opts.compile, opts.dtype)
    if opts.compile:
        phase["first_call_s"] = once(zturbo_call(engine, "txt2img", pictures, size), device)
        phase["warmup_s"] = phase["first_call_s"] + engine.warmup(size, size)
        log.info("bench --images: zturbo compiled and warmed up in %.1f s", phase["warmup_s"])
        report()
    # A step shape is captured into a CUDA graph on its second request: warm up that far (each
    # row's first call is one of the warm-up calls).
    graphs = engine.accel.step_graphs is not None
    warm = max(opts.warmup, STEP_SIGHTINGS if graphs else 0, 1) - 1
    for row in ROWS:
        call = zturbo_call(engine, row, pictures, size)
        try:
            common.sync(device)
            start = time.perf_counter()
            result = call()
            common.sync(device)
            first = {"first_call_s": time.perf_counter() - start, "fallbacks": result.fallbacks}
            images[row] = _picture(result)
            phase[row] = first | timed(call, device, opts.runs, warm)
        except Exception as e:  # one broken row must not lose the others
            phase[row] = {"error": f"{type(e).__name__}: {e}"[:2000]}
        _log(f"zturbo {phase['kind']} {row}", phase[row])
        report()


def _log(what: str, row: dict[str, Any]) -> None:
    """Each row as it finishes: a run cut short by a time limit still shows how far it got."""
    if "error" in row:
        log.warning("bench --images: %s failed: %s", what, str(row["error"])[:500])
    else:
        first = f" (first call {row['first_call_s']:.1f} s)" if "first_call_s" in row else ""
        log.info("bench --images: %s %.3f s/img%s", what, row["median_s"], first)


def _zturbo_kind(compiled: bool, dtype: torch.dtype) -> str:
    return f"{'compiled' if compiled else 'eager'} {str(dtype).removeprefix('torch.')}"


def compare_images(images: Images) -> dict[str, Any]:
    """Per row, mean absolute differences (of 255, 32x32 thumbnails): zturbo against diffusers
    (eager and compiled zturbo: bf16 rounding apart, the same picture), and what the control
    image changes (the controlnet row against text-to-image: far from 0 when the ControlNet runs)."""
    out: dict[str, Any] = {}
    for row in ROWS:
        pairs = {
            "eager_vs_diffusers": (images["zturbo_eager"].get(row), images["diffusers"].get(row)),
            "compiled_vs_diffusers": (images["zturbo_compiled"].get(row), images["diffusers"].get(row)),
            "compiled_vs_eager": (images["zturbo_compiled"].get(row), images["zturbo_eager"].get(row)),
        }
        out[row] = {k: image_difference(a, b) for k, (a, b) in pairs.items() if a is not None and b is not None}
    plain, control = images["zturbo_eager"].get("txt2img"), images["zturbo_eager"].get("controlnet")
    if plain is not None and control is not None:
        out["control_changes_image"] = image_difference(control, plain)
    return out


def _median(phase: dict[str, Any] | None, row: str) -> float | None:
    found = (phase or {}).get(row)
    return found.get("median_s") if isinstance(found, dict) else None


def summary(res: dict[str, Any]) -> dict[str, Any]:
    """Each row against zturbo's text-to-image (the ControlNet's overhead: controlnet / txt2img)
    and against diffusers eager and compiled."""
    compiled, plain = res.get("compiled"), _median(res.get("compiled"), "txt2img")
    out: dict[str, Any] = {}
    for row in ROWS:
        z = _median(compiled, row)
        ref, ref_compiled = _median(res.get("reference"), row), _median(res.get("reference_compiled"), row)
        out[row] = {
            "vs_txt2img": z / plain if z and plain else None,
            "speedup_vs_diffusers_eager": ref / z if z and ref else None,
            "speedup_vs_diffusers_compiled": ref_compiled / z if z and ref_compiled else None,
        }
    ref_plain, ref_control = _median(res.get("reference"), "txt2img"), _median(res.get("reference"), "controlnet")
    out["controlnet_overhead"] = out["controlnet"]["vs_txt2img"]
    out["diffusers_controlnet_overhead"] = ref_control / ref_plain if ref_control and ref_plain else None
    return out


# ---------------------------------------------------------------------------------------------
# Under a memory cap


def capped_row(cap: float, size: int, runs: int, tiny: bool = False, compile: bool = True) -> dict[str, Any]:
    """Runs in its own process: the controlnet row on the engine the planner places for `cap`
    GiB (0: the whole GPU), compiled where the plan allows (and `compile`). `tiny`: the tiny model
    on the CPU (a smoke test)."""
    engine, row = capped_engine(cap, size, tiny, compile)
    if engine is None:
        return row
    call = zturbo_call(engine, "controlnet", input_pictures(size), size)
    start = time.perf_counter()
    result = call()
    common.sync(engine.device)
    row |= {"first_call_s": time.perf_counter() - start, "fallbacks": result.fallbacks}
    row["thumbnail"] = thumbnail(_picture(result))
    row |= timed(call, engine.device, runs, warmup=max(0, STEP_SIGHTINGS - 1))
    row["memory_plan_after"] = engine.placement.describe()
    return row


def capped_engine(cap: float, size: int, tiny: bool, compile: bool) -> tuple[Engine | None, dict[str, Any]]:
    """`bench.memory.capped_engine` with the random Union 2.1 ControlNet: the engine the planner
    places for `cap` GiB, the process capped; None (and why) when no plan fits."""
    return memory_bench.capped_engine(cap, size, tiny=tiny, build=controlnet_components, compile=compile)


def run_caps(caps: list[float], opts: Any, report: Callable[[list[dict[str, Any]]], None]) -> list[Any]:
    """Each cap's row in a fresh `python -m zturbo.cli bench --images --cap-row ...` process:
    placement and the process's memory cap cannot be undone."""
    rows: list[dict[str, Any]] = []
    _release_device_memory()
    for cap in caps:
        cmd = [sys.executable, "-m", "zturbo.cli", "bench", "--tiny" if opts.tiny else "--random-weights", "--images"]
        cmd += ["--cap-row", f"controlnet:{cap:g}", "--sizes", str(opts.main_size), "--runs", str(opts.runs)]
        cmd += [] if opts.compile else ["--no-compile"]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        rows.append(json.loads(lines[-1]) if lines else {"cap_gib": cap, "error": proc.stderr[-2000:]})
        _log(f"controlnet under a {cap:g} GiB cap ({rows[-1].get('plan', 'no plan')})", rows[-1])
        report(rows)
    return rows


def _release_device_memory() -> None:
    """Give back the memory of the rows before (their modules are garbage once `run` returned)."""
    common.release_device_memory()
    if torch.cuda.is_initialized():
        log.info("bench --images: %.1f GiB still allocated here", torch.cuda.memory_allocated() / common.GIB)


# ---------------------------------------------------------------------------------------------
# Tables


def markdown(res: dict[str, Any]) -> str:
    """The rows as a table, the ControlNet's overhead, then the capped rows."""
    kind = (res.get("compiled") or {}).get("kind", "compiled")
    lines = [
        f"| row | transformer forwards (diffusers) | ControlNet forwards | zturbo {kind} s/img | diffusers eager "
        "| diffusers compiled | speedup vs eager | vs zturbo txt2img | zturbo peak GiB | diffusers peak GiB "
        "| image vs diffusers |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [_table_row(res, row) for row in ROWS]
    overhead = summary(res)["controlnet_overhead"]  # from the rows so far: a partial table has it too
    if overhead:
        lines += ["", f"ControlNet overhead (zturbo controlnet / zturbo txt2img): {overhead:.2f}x"]
    errors = {k: v["error"] for k, v in (res.get("compiled") or {}).items() if isinstance(v, dict) and "error" in v}
    lines += [f"- zturbo {k} FAILED: {str(e)[-200:]}" for k, e in errors.items()]
    if res.get("capped"):
        lines += ["", *capped_markdown(res["capped"], res)]
    return "\n".join(lines)


def _table_row(res: dict[str, Any], row: str) -> str:
    forwards = res.get("forwards", {}).get(row, {})
    z, d = forwards.get("zturbo", {}), forwards.get("diffusers", {})
    fwd = f"{z.get('transformer', '-')} ({d.get('transformer', '-')})"
    cn = f"{z.get('controlnet', '-')} ({d.get('controlnet', '-')})"
    compiled, ref = (res.get("compiled") or {}).get(row) or {}, (res.get("reference") or {}).get(row) or {}
    ref_compiled = (res.get("reference_compiled") or {}).get(row) or {}
    ratios = summary(res)[row]
    diff = res.get("images", {}).get(row, {}).get("compiled_vs_diffusers")
    cells = [
        _seconds(compiled),
        _seconds(ref),
        _seconds(ref_compiled),
        _ratio(ratios["speedup_vs_diffusers_eager"]),
        _ratio(ratios["vs_txt2img"]),
        _gib(compiled.get("peak_gib")),
        _gib(ref.get("peak_gib")),
        f"{diff:.2f}/255" if diff is not None else "-",
    ]
    return f"| {row} | {fwd} | {cn} | {' | '.join(cells)} |"


def capped_markdown(rows: list[dict[str, Any]], res: dict[str, Any]) -> list[str]:
    """One line per capped controlnet row, against the uncapped compiled controlnet row."""
    uncapped = _median(res.get("compiled"), "controlnet")
    reference = (res.get("thumbnails") or {}).get("controlnet")
    lines = [
        "| controlnet row | plan | estimate GiB | peak GiB | s/img | time vs uncapped | image vs uncapped |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cap = f"{r['cap_gib']:g} GiB cap" if r.get("cap_gib") else "uncapped"
        if "error" in r:
            lines.append(f"| {cap} | {r.get('plan', '-')} | - | - | FAILED: {str(r['error'])[-160:]} | - | - |")
            continue
        ratio = _ratio(r["median_s"] / uncapped) if uncapped else "-"
        same = "-"
        if reference and r.get("thumbnail") and len(reference) == len(r["thumbnail"]):
            same = f"{float(np.abs(np.asarray(r['thumbnail']) - np.asarray(reference)).mean()):.2f}/255"
        estimate, peak = _gib(r.get("estimate_gib")), _gib(r.get("peak_gib"))
        lines.append(f"| {cap} | {r['plan']} | {estimate} | {peak} | {_seconds(r)} | {ratio} | {same} |")
    return lines


def _seconds(row: dict[str, Any]) -> str:
    if "error" in row:
        return "FAILED"
    return f"{row['median_s']:.3f}" if "median_s" in row else "-"


def _ratio(value: float | None) -> str:
    return f"{value:.2f}x" if value else "-"


def _gib(value: float | None) -> str:
    return f"{value:.1f}" if value is not None else "-"
