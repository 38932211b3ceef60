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

import io
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..accel import attention
from ..accel.graphs import STEP_SIGHTINGS
from ..engine import Engine
from ..pipeline import encode_prompt
from . import common
from .common import PROMPT, SEED, STEPS, once, timed, zturbo_e2e
from .profiling import profile

log = logging.getLogger("zturbo")

Report = Callable[[dict[str, Any]], None]
AB_PHASES = ("compiled_unfused", "compiled_sdpa")  # one-size comparisons with the default compiled mode
PHASES = (*AB_PHASES, "compiled", "fp8")


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

    @property
    def device(self) -> torch.device:
        return torch.device("cpu") if self.tiny else torch.device("cuda")

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32 if self.tiny else torch.bfloat16

    @property
    def backend(self) -> str:
        # Inductor needs a GPU toolchain to pay off; the CPU smoke test only traces (no graph breaks).
        return "eager" if self.tiny else "inductor"

    @property
    def main_size(self) -> int:
        return 1024 if 1024 in self.sizes else self.sizes[0]


def run(opts: BenchOptions, report: Report = lambda r: None) -> dict[str, Any]:
    """All phases; `report` gets the results so far after each one (a timeout keeps them)."""
    device = opts.device
    res: dict[str, Any] = {"environment": common.environment(device), "options": opts.__dict__ | {"sizes": opts.sizes}}
    start = time.perf_counter()
    engine = common.load_engine(opts.model, opts.tiny, device, opts.dtype)
    res["build_s"] = time.perf_counter() - start
    res["weights_gib"] = common.weight_bytes(engine) / common.GIB
    baseline = common.final_latents(engine, opts.main_size)
    pipe = common.reference_pipeline(engine.components) if opts.reference else None
    eager_phase(res, engine, pipe, opts, report)
    if pipe is not None and opts.reference_compiled:
        res["reference_compiled"] = reference_compiled(pipe, device, opts, baseline)
        report(res)
    for key, quantize, fuse in compiled_phases(opts):
        if quantize == "fp8" and (opts.tiny or not common.fp8_capable(device)):
            res[key] = {"skipped": "no fp8-capable GPU"}
            continue
        res[key] = {"compile": opts.compile, "fuse": fuse, "sizes": {}}
        try:
            compiled_phase(res, key, engine, opts, quantize, fuse, baseline, report)
        except Exception as e:  # one broken mode must not lose the others' numbers
            res[key]["error"] = f"{type(e).__name__}: {e}"[:2000]
        report(res)
    return res


def eager_phase(res: dict[str, Any], engine: Engine, pipe: Any, opts: BenchOptions, report: Report) -> None:
    """zturbo and (where `pipe`) the reference, eager, at every size and in a batch; PNG encoding."""
    device, runs, warm, size = engine.device, opts.runs, opts.warmup, opts.main_size
    eager: dict[str, Any] = {"zturbo": {}, "reference": {}}
    res["eager"] = eager
    for s in opts.sizes:
        eager["zturbo"][s] = timed(zturbo_e2e(engine, s), device, runs, warm)
        if pipe is not None:
            eager["reference"][s] = timed(common.reference_e2e(pipe, s), device, runs, warm)
        report(res)
    batch_runs = max(2, runs // 2)
    eager["zturbo_batch"] = timed(zturbo_e2e(engine, size, opts.batch), device, batch_runs, warm)
    if pipe is not None:
        eager["reference_batch"] = timed(common.reference_e2e(pipe, size, opts.batch), device, batch_runs, warm)
    res["png_encode_s"] = png_encode_seconds(engine, size)
    report(res)


def compiled_phases(opts: BenchOptions) -> list[tuple[str, str, bool]]:
    """(result key, quantization, fuse projections) of each compiled phase, A/B rows first."""
    bf16 = opts.compile and "none" in opts.quantize
    phases = [("compiled_unfused", "none", False)] if bf16 and opts.fuse_ab else []
    if bf16 and opts.attention_ab and not opts.tiny and attention.flash_attention_3() is not None:
        phases.append(("compiled_sdpa", "none", True))
    return phases + [("compiled" if q == "none" else q, q, True) for q in opts.quantize]


def compiled_phase(
    res: dict[str, Any],
    key: str,
    engine: Engine,
    opts: BenchOptions,
    quantize: str,
    fuse: bool,
    baseline: torch.Tensor,
    report: Report,
) -> None:
    """One compiled mode: prepare, first call (compiles), warm-up, latent error, then its rows."""
    phase, device, size = res[key], engine.device, opts.main_size
    prepare(engine, key, opts, quantize, fuse, phase)
    log.info("bench %s: prepared in %.1f s; first call (compiles)", key, phase["prepare_s"])
    report(res)
    phase["first_call_s"] = once(zturbo_e2e(engine, size), device)  # compiles
    # Reported at once: when a command's time limit cuts the phase, what finished is still known.
    log.info("bench %s: first call took %.1f s", key, phase["first_call_s"])
    report(res)
    phase["warmup_s"] = phase["first_call_s"] + engine.warmup(size, size)
    phase["latent_rel_err_vs_eager"] = common.rel_err(common.final_latents(engine, size), baseline)
    report(res)
    # A step shape is captured into a CUDA graph on its second request (zturbo.accel.graphs): warm
    # up that far, so each row times the steady state rather than one capture among few runs.
    warm = max(opts.warmup, STEP_SIGHTINGS)
    for s in (size,) if key in AB_PHASES else opts.sizes:  # an A/B needs one size
        phase["sizes"][s] = timed(zturbo_e2e(engine, s), device, opts.runs, warm)
        report(res)
    if key not in AB_PHASES:
        steady_rows(phase, engine, opts, warm)


def prepare(engine: Engine, key: str, opts: BenchOptions, quantize: str, fuse: bool, phase: dict[str, Any]) -> None:
    """Undo the previous mode's compilation and apply this one's (quantizing where asked)."""
    from ..accel import compile as accel

    engine.accel.revert_compile()
    torch._dynamo.reset()
    started = time.perf_counter()
    options = accel.AccelOptions(
        compile=opts.compile,
        quantize=quantize,
        fuse=fuse,
        backend=opts.backend,
        vae=not opts.eager_vae,
        flash_attention_3=key != "compiled_sdpa",
    )
    engine.accel = accel.apply(engine.components, options)
    phase["attention"] = engine.accel.attention
    phase["vae_compiled"] = opts.compile and not opts.eager_vae
    phase["prepare_s"] = time.perf_counter() - started  # quantization, when there is one


def steady_rows(phase: dict[str, Any], engine: Engine, opts: BenchOptions, warm: int) -> None:
    """A repeated prompt, the text encoder's graphs A/B, a batch, and (`--profile`) a CUDA profile,
    each into `phase` as it finishes."""
    device, runs, size = engine.device, opts.runs, opts.main_size
    phase["cached_prompt"] = timed(zturbo_e2e(engine, size, cached_prompt=True), device, runs, warm)
    if engine._encoder_graphs() is not None:
        phase["encode"] = encode_ab(engine, runs)
    batch = timed(zturbo_e2e(engine, size, opts.batch), device, max(2, runs // 2), warm)
    batch["images_per_s"] = opts.batch / batch["median_s"]
    phase["batch"] = batch
    if opts.profile and device.type == "cuda":
        phase["profile"] = profile(zturbo_e2e(engine, size))


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
    out["rel_diff"] = common.rel_err(graphed, plain)
    return out


def png_encode_seconds(engine: Engine, size: int) -> float:
    from ..imageio import png_info

    image = engine.generate(PROMPT, seed=SEED, width=size, height=size, steps=1).images[0]
    start = time.perf_counter()
    image.image.save(io.BytesIO(), format="PNG", pnginfo=png_info(image.metadata))
    return time.perf_counter() - start


def reference_compiled(pipe: Any, device: torch.device, opts: BenchOptions, baseline: torch.Tensor) -> dict[str, Any]:
    """diffusers' own fast path: `compile_repeated_blocks(fullgraph=True)`, undone afterwards."""
    transformer = pipe.transformer
    transformer.compile_repeated_blocks(fullgraph=True)
    try:
        first = once(common.reference_e2e(pipe, opts.main_size), device)
        out = timed(common.reference_e2e(pipe, opts.main_size), device, opts.runs, opts.warmup)
        out["first_call_s"] = first
        return out
    finally:
        for module in transformer.modules():  # nn.Module.compile keeps its wrapper here
            if getattr(module, "_compiled_call_impl", None) is not None:
                module._compiled_call_impl = None
        torch._dynamo.reset()


def first_image(opts: BenchOptions, started: float) -> dict[str, Any]:
    """Seconds from `started` (process start) to the first compiled 1024² image: build, compile, generate."""
    from ..accel import compile as accel

    device = opts.device
    engine = common.load_engine(opts.model, opts.tiny, device, opts.dtype)
    built = time.perf_counter()
    quantize = opts.quantize[0]
    options = accel.AccelOptions(compile=opts.compile, quantize=quantize, backend=opts.backend)
    engine.accel = accel.apply(engine.components, options)
    engine.generate(PROMPT, seed=SEED, width=1024, height=1024, steps=STEPS)
    common.sync(device)
    done = time.perf_counter()
    return {
        "environment": common.environment(device),
        "quantize": quantize,
        "first_image_s": done - started,
        "build_s": built - started,
        "compile_and_generate_s": done - built,
        "inductor_cache": os.environ.get("TORCHINDUCTOR_CACHE_DIR"),
    }
