"""`zturbo bench --memory-caps`: the memory planner on one GPU under simulated smaller GPUs.

For each cap (GiB; 0 = uncapped) a fresh process builds the real architecture with random weights,
lets `zturbo.memory.choose` pick the plan for the cap, places the weights accordingly, caps the
process with `torch.cuda.set_per_process_memory_fraction`, and times end-to-end images. The same
is done for diffusers' own offloading (`enable_model_cpu_offload`, leaf-level group offload with
CUDA streams) as the reference. One process per row: placement and the cap cannot be undone.

A `zturbo-gguf-TYPE` row (`--gguf-caps TYPE:CAP`) runs a GGUF transformer file of TYPE, written
from the random weights into a temporary directory that lasts the row (`ggufwrite`) and loaded as
`--transformer FILE.gguf` loads one: the planner counts its weights at their stored size, and
block-offload streams them as stored.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import torch

from ..errors import InvalidRequestError
from ..memory import plan as memory
from . import common, ggufwrite

REFERENCES = ("diffusers-model-offload", "diffusers-group-offload")
# zturbo's rows: the plan for bf16 weights (exact), and with the transformer's weights quantized.
QUANTIZED_KINDS = {"zturbo-fp8": "fp8", "zturbo-int8": "int8"}
KINDS = ("zturbo", *QUANTIZED_KINDS, *REFERENCES)
# And zturbo's rows with a GGUF transformer file: this prefix and the file's type (ggufwrite.QTYPES).
GGUF_KIND = "zturbo-gguf-"


def check_kind(kind: str) -> str:
    """`kind`, where a row can be of it; else an InvalidRequestError naming it and the kinds there are."""
    if kind in KINDS or (kind.startswith(GGUF_KIND) and kind.removeprefix(GGUF_KIND) in ggufwrite.QTYPES):
        return kind
    gguf = f"{GGUF_KIND}TYPE with TYPE one of {', '.join(ggufwrite.QTYPES)}"
    raise InvalidRequestError(f"row kind {kind!r} is not one of {', '.join(KINDS)}, nor {gguf}")


def gguf_type(kind: str) -> str | None:
    """The GGUF file type of a `zturbo-gguf-TYPE` row; None for other rows."""
    return kind.removeprefix(GGUF_KIND) if kind.startswith(GGUF_KIND) else None


def weights_label(kind: str) -> str | None:
    """What a row's transformer weights are, as its table row says beside the cap (None: bf16)."""
    qtype = gguf_type(kind)
    return f"GGUF {qtype} file" if qtype else QUANTIZED_KINDS.get(kind)


def row(kind: str, cap: float, size: int, runs: int, compile: bool = True, tiny: bool = False) -> dict[str, Any]:
    """One row of `kind` (`check_kind`); `tiny` (zturbo's rows only): the tiny model on the CPU."""
    check_kind(kind)
    if kind in REFERENCES:
        return reference_row(kind, cap, size, runs)
    quantize = QUANTIZED_KINDS.get(kind, "none")  # a GGUF file's weights are quantized as stored
    return one_row(cap, size, runs, quantize=quantize, tiny=tiny, compile=compile, gguf=gguf_type(kind))


def one_row(
    cap: float,
    size: int,
    runs: int,
    quantize: str = "none",
    tiny: bool = False,
    compile: bool = True,
    gguf: str | None = None,
) -> dict[str, Any]:
    """Runs in its own process: one cap, measured. `tiny`: the tiny model on the CPU (a smoke test).
    `compile=False` (`--no-compile`) separates a row's compile time from its run time. `gguf`: the
    transformer is a GGUF file of this type, in a temporary directory while the row runs."""
    with _builder(gguf) as build:
        engine, row = capped_engine(cap, size, quantize, tiny, build, compile=compile)
        return row if engine is None else row | _time_engine(engine, size, runs)


@contextmanager
def _builder(gguf: str | None) -> Iterator[Callable[[torch.device, torch.dtype, bool], Any]]:
    """`capped_engine`'s builder: the random components, or with `gguf` the same with their
    transformer a GGUF file of that type (the file and its directory removed afterwards)."""
    if gguf is None:
        yield common.random_components
        return
    with tempfile.TemporaryDirectory(prefix="zturbo-gguf-row-") as tmp:
        yield ggufwrite.gguf_components(gguf, Path(tmp))


def capped_engine(
    cap: float,
    size: int,
    quantize: str = "none",
    tiny: bool = False,
    build: Callable[[torch.device, torch.dtype, bool], Any] = common.random_components,
    compile: bool = True,
    accel_fields: Mapping[str, Any] = MappingProxyType({}),
) -> tuple[Any, dict[str, Any]]:
    """The engine the planner places for `cap` GiB (0: the whole GPU) on random weights, compiled
    as Engine.load would (where the plan allows and `compile`), with the process capped; and the
    row's plan and estimate. The engine is None (and the row says why) when no plan fits.

    `build(device, dtype, tiny)` makes the random modules (`bench.images` adds a ControlNet, which
    the planner counts). `accel_fields` set more `AccelOptions` fields (a probe's A/B)."""
    device = torch.device("cpu") if tiny else torch.device("cuda", torch.cuda.current_device())
    dtype = torch.float32 if tiny else torch.bfloat16
    components = build(device, dtype, tiny)
    dtypes = dict.fromkeys(("transformer", "text_encoder", "vae"), dtype)
    controlnet = getattr(components, "controlnet", None)
    shape = memory.model_shape(components.transformer, components.text_encoder, components.vae, controlnet)
    total = torch.cuda.mem_get_info(device)[1] if device.type == "cuda" else 64 * memory.GIB
    budget = int(cap * memory.GIB) if cap else total
    quantize_options = (quantize,) if quantize != "none" else ()
    choice = memory.choose(
        shape,
        memory.dtype_bytes(dtypes),
        budget,
        width=size,
        height=size,
        quantize_options=quantize_options,
        exact=not quantize_options,  # as Engine.load does when the user asks for a quantization
        compiled_vae=compile and not tiny,  # compiled below, as Engine.load compiles on a GPU
    )
    row: dict[str, Any] = {"cap_gib": cap, "size": size, "budget_gib": budget / memory.GIB}
    if shape.transformer_stored_params:  # a GGUF file's weights, planned at their stored size
        row["transformer_stored_gib"] = shape.transformer_stored_bytes / memory.GIB
        row["transformer_weights"] = components.transformer_weights
    if choice.chosen is None:
        row["error"] = _no_plan_fits(choice, budget)
        return None, row
    est = choice.chosen
    row |= {"plan": est.label(), "estimate_gib": est.peak / memory.GIB}
    row["estimate_stages_gib"] = {k: v / memory.GIB for k, v in est.stages.items()}
    if est.quantize != "none":
        _quantize(components.transformer, est, device)
    engine = common.random_engine(components, device, dtype, layout=memory.layout_of(est))
    engine.set_vae_tiling(est.vae_tiling)
    compile_ = compile and memory.compilable(est.plan)
    _accelerate(engine, est, compile_, tiny, accel_fields)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        if cap:
            torch.cuda.set_per_process_memory_fraction(min(1.0, budget / total), device)
    row["compiled"] = compile_
    return engine, row


def _accelerate(engine: Any, est: Any, compile_: bool, tiny: bool, fields: Mapping[str, Any]) -> None:
    """As Engine.load speeds the engine up: compiled where `compile_`, projections fused only where
    the plan allows (`accel.apply` leaves a GGUF file's in their dequantizing linears); `fields`
    set more `AccelOptions` (a probe's diagnostics)."""
    from ..accel import compile as accel

    backend, fuse = ("eager" if tiny else "inductor"), memory.fusable(est.plan)
    options = accel.AccelOptions(compile=compile_, quantize=est.quantize, backend=backend, fuse=fuse, **fields)
    engine.accel = accel.apply(engine.components, options)


def _quantize(transformer: torch.nn.Module, est: Any, device: torch.device) -> None:
    """As Engine.load does: plain weights on the CPU, quantized block by block on the device, each
    block then at its home under the plan (the CPU where it streams), before placement packs it."""
    from ..accel.quantize import quantize_transformer
    from ..memory.placement import homes

    torch.nn.Module.to(transformer, "cpu")
    quantize_transformer(transformer, est.quantize, device=device, home=homes(est.plan, device)["transformer"])


def _no_plan_fits(choice: Any, budget: int) -> str:
    leanest = min(choice.considered, key=lambda e: e.peak)
    usable = memory.usable_budget(budget) / memory.GIB
    return (
        f"no plan fits: {usable:.3g} GiB usable under the cap, and the leanest plan ({leanest.label()}) "
        f"needs {leanest.peak / memory.GIB:.3g} GiB"
    )


def _time_engine(engine: Any, size: int, runs: int) -> dict[str, Any]:
    def call() -> Any:
        engine.prompt_cache.clear()
        return engine.generate(common.PROMPT, seed=common.SEED, width=size, height=size, steps=common.STEPS)

    start = time.perf_counter()
    first = call()
    out: dict[str, Any] = {"first_call_s": time.perf_counter() - start, "fallbacks": first.fallbacks}
    out["compiled"] = engine.accel.compiling  # a failed compilation reverts to eager: the row says so
    out["thumbnail"] = thumbnail(first.images[0].image)
    out |= common.timed(call, engine.device, runs, warmup=0)
    # A repeated prompt skips the text encoder (prompt cache): what te-offload is built around.
    cached = common.timed(
        lambda: engine.generate(common.PROMPT, seed=common.SEED, width=size, height=size, steps=common.STEPS),
        engine.device,
        runs,
        warmup=0,
    )
    out["cached_prompt_s"] = cached["median_s"]
    # The decode alone, as the row runs it (tiled or whole, compiled or eager): what tiling costs.
    from ..pipeline import decode

    vae = engine.components.vae
    latents = torch.randn(1, vae.config.latent_channels, size // 8, size // 8, device=engine.device)
    out["decode_s"] = common.timed(lambda: decode(vae, latents), engine.device, runs, warmup=1)["median_s"]
    out["memory_plan_after"] = engine.placement.describe()
    # One more new-prompt image with each stage's peak recorded, against the estimate's stages.
    engine.stage_peaks = {}
    try:
        call()
        out["stage_peaks_gib"] = {k: None if v is None else v / memory.GIB for k, v in engine.stage_peaks.items()}
    finally:
        engine.stage_peaks = None
    return out


def thumbnail(image: Any, side: int = 32) -> list[float]:
    """The image averaged down to side x side x 3 values: enough to tell whether two rows made the
    same picture (the weights are the same in every row: one seed), small enough for the JSON."""
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)[None]
    return torch.nn.functional.adaptive_avg_pool2d(pixels, side).flatten().tolist()


def image_difference(row: dict[str, Any], baseline: dict[str, Any] | None) -> float | None:
    """Mean absolute difference (of 255) between two rows' thumbnails."""
    if baseline is None or "thumbnail" not in row or "thumbnail" not in baseline or row is baseline:
        return None
    a, b = np.asarray(row["thumbnail"]), np.asarray(baseline["thumbnail"])
    return float(np.abs(a - b).mean()) if a.shape == b.shape else None


def reference_row(name: str, cap: float, size: int, runs: int) -> dict[str, Any]:
    """diffusers' pipeline with its own offloading on the same random architecture."""
    device = torch.device("cuda", torch.cuda.current_device())
    components = common.random_components(device, torch.bfloat16, tiny=False)  # fast on the GPU
    for module in (components.transformer, components.text_encoder, components.vae):
        module.to("cpu")
    torch.cuda.empty_cache()
    pipe = common.reference_pipeline(components)
    if name == "diffusers-model-offload":
        pipe.enable_model_cpu_offload(device=device)
    else:
        for module in (pipe.transformer, pipe.text_encoder, pipe.vae):
            from diffusers.hooks import apply_group_offloading

            apply_group_offloading(module, onload_device=device, offload_type="leaf_level", use_stream=True)
    total = torch.cuda.mem_get_info(device)[1]
    if cap:
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap * memory.GIB / total), device)
    call = common.reference_e2e(pipe, size)
    start = time.perf_counter()
    call()
    row: dict[str, Any] = {"cap_gib": cap, "size": size, "plan": name, "first_call_s": time.perf_counter() - start}
    return row | common.timed(call, device, runs, warmup=0)


def run_caps(
    caps: list[float],
    size: int,
    runs: int,
    references: bool,
    quantized: dict[str, list[float]],
    report: Any,
    gguf: Sequence[tuple[str, float]] = (),
    tiny: bool = False,
    compile: bool = True,
) -> list[dict[str, Any]]:
    """Each row in a fresh `python -m zturbo.cli bench --cap-row ...` process: bf16 under `caps`,
    then each quantization under its caps (`quantized`: fp8 or int8 -> GiB), then each (GGUF
    type, cap) of `gguf`, then diffusers' offloading (`references`; not with `tiny`, zturbo's rows
    on the tiny model and the CPU). `compile=False` runs every zturbo row eagerly."""
    rows: list[dict[str, Any]] = []
    jobs = [("zturbo", cap) for cap in caps]
    jobs += [(f"zturbo-{mode}", cap) for mode, mode_caps in quantized.items() for cap in mode_caps]
    jobs += [(f"{GGUF_KIND}{qtype}", cap) for qtype, cap in gguf]
    jobs += [(r, 0.0) for r in REFERENCES] if references and not tiny else []
    flags = ["--tiny"] * tiny + ["--no-compile"] * (not compile)
    for kind, cap in jobs:
        cmd = [sys.executable, "-m", "zturbo.cli", "bench", "--random-weights", "--cap-row", f"{kind}:{cap:g}"]
        cmd += ["--sizes", str(size), "--runs", str(runs), *flags]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        result = json.loads(lines[-1]) if lines else {"cap_gib": cap, "plan": kind, "error": proc.stderr[-2000:]}
        rows.append(result | {"kind": kind})
        report(rows)
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    uncapped = next((r for r in rows if r.get("cap_gib") == 0 and "median_s" in r and "estimate_gib" in r), None)
    first = next((r for r in rows if "thumbnail" in r), None)  # every zturbo row should match it
    lines = [
        "| cap | plan | estimate | measured peak | s/img | vs uncapped | s/img, repeated prompt | decode s "
        "| image vs first row |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cap = f"{r['cap_gib']:g} GiB" if r.get("cap_gib") else "none"
        weights = weights_label(r.get("kind", ""))
        cap += f" ({weights})" if weights else ""
        if "error" in r:
            lines.append(f"| {cap} | {r.get('plan', '-')} | - | - | FAILED: {str(r['error'])[-120:]} | - | - | - | - |")
            continue
        est = f"{r['estimate_gib']:.2f} GiB" if "estimate_gib" in r else "-"
        ratio = f"{uncapped['median_s'] / r['median_s']:.0%}" if uncapped else "-"
        peak = f"{r['peak_gib']:.2f} GiB" if r.get("peak_gib") is not None else "-"
        cached = f"{r['cached_prompt_s']:.3f}" if "cached_prompt_s" in r else "-"
        decode = f"{r['decode_s']:.3f}" if "decode_s" in r else "-"
        diff = image_difference(r, first)
        same = f"{diff:.2f}/255" if diff is not None else "-"
        row = f"| {cap} | {r['plan']} | {est} | {peak} | {r['median_s']:.3f} | {ratio} | {cached} | {decode} | {same} |"
        lines.append(row)
    return "\n".join(lines)
