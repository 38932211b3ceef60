"""`zturbo bench --gguf Q8_0,Q4_K`: GGUF transformers at real size, against bf16 and against diffusers.

The real architecture with random weights is built on the GPU in bf16, and each asked type is
written from those weights into a GGUF file (`zturbo.bench.ggufwrite`: encoded on the GPU,
timed), in the key layout city96's Z-Image files have. Then the rows, with one transformer on
the device at a time, so that each row's peak memory is its own (the text encoder and the VAE
are the same modules in every row):

  bf16         diffusers eager, then zturbo compiled (fused projections), on the built modules
  each type    zturbo: the file loaded as `--transformer FILE` loads it (`zturbo.gguf`), compiled
               without fusion (its linears dequantize at every call); diffusers: the same file
               through `ZImageTransformer2DModel.from_single_file` with
               `GGUFQuantizationConfig(compute_dtype=bfloat16)`, eager.

Every row gives the median seconds per end-to-end image, the peak memory of its timed runs, the
transformer's bytes on the device, and a thumbnail of its image, compared with zturbo's bf16
image (what the quantization changes) and with the other runtime's on the same file. The files
go under `--gguf-dir` (default: a temporary directory, removed afterwards).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..accel.graphs import STEP_SIGHTINGS
from ..loader import Components
from . import common, ggufwrite
from .common import Sampling, timed
from .memory import thumbnail
from .report import clock_cell

log = logging.getLogger("zturbo")

Report = Callable[[dict[str, Any]], None]
BF16 = "bf16"


def run(opts: Any, qtypes: tuple[str, ...], steps: int | None, workdir: Path | None, report: Report) -> dict[str, Any]:
    """Write the files, then every row; `report` gets the results so far after each row."""
    for qtype in qtypes:
        ggufwrite.check_qtype(qtype)
    device, request = opts.device, Sampling(steps=steps or common.STEPS)
    res: dict[str, Any] = {"environment": common.environment(device), "size": opts.main_size, "runs": opts.runs}
    res |= {"steps": request.steps, "qtypes": list(qtypes), "files": {}, "rows": {}}
    started = time.perf_counter()
    components = common.random_components(device, opts.dtype, opts.tiny)
    res["build_s"] = time.perf_counter() - started
    config = dict(components.transformer.config)
    with _workdir(workdir) as root:
        paths = write_files(res, components.transformer, qtypes, root, report)
        res["rows"][BF16] = bf16_rows(components, opts, request, lambda: report(res))
        # Only the text encoder and the VAE stay: the bf16 transformer's memory goes before the GGUF rows.
        shared = dataclasses.replace(components, transformer=None)
        del components
        common.release_device_memory()
        for qtype, path in paths.items():
            res["rows"][qtype] = sides = {}
            sides["zturbo"] = _guarded(zturbo_gguf_row, shared, path, config, opts, request)
            report(res)
            if opts.reference:
                sides["diffusers"] = _guarded(diffusers_gguf_row, shared, path, config, opts, request)
                report(res)
    res["images"] = compare(res["rows"])
    report(res)
    return res


def write_files(
    res: dict[str, Any], transformer: torch.nn.Module, qtypes: tuple[str, ...], root: Path, report: Report
) -> dict[str, Path]:
    """One GGUF file per type from `transformer`'s weights, each timed into `res['files']`."""
    state = transformer.state_dict()
    paths = {qtype: root / f"transformer-{qtype}.gguf" for qtype in qtypes}
    for qtype, path in paths.items():
        res["files"][qtype] = ggufwrite.write_transformer(path, state, qtype)
        log.info("bench --gguf: wrote %s in %.1f s", qtype, res["files"][qtype]["write_s"])
        report(res)
    return paths


@contextmanager
def _workdir(path: Path | None) -> Iterator[Path]:
    if path is not None:
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="zturbo-gguf-") as tmp:
        yield Path(tmp)


def bf16_rows(components: Components, opts: Any, request: Sampling, report: Callable[[], None]) -> dict[str, Any]:
    """diffusers eager, then zturbo compiled with fused projections (fusing changes the modules in place)."""
    sides: dict[str, Any] = {}
    if opts.reference:
        sides["diffusers"] = _guarded(diffusers_row, components, opts, request)
        report()
    sides["zturbo"] = _guarded(zturbo_row, components, opts, request)
    report()
    return sides


def _guarded(row: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    """`row(*args)`, or its error: a broken row must not lose the others. Device memory is given back after it."""
    before = torch.cuda.memory_allocated() / common.GIB if torch.cuda.is_initialized() else None
    try:
        # What the device held before the row (the shared text encoder and VAE): the peak is on top of it.
        return row(*args) | {"allocated_before_gib": before}
    except Exception as e:
        log.warning("bench --gguf: a row failed: %s", e)
        return {"error": f"{type(e).__name__}: {e}"[:2000]}
    finally:
        common.release_device_memory()


def _first_call(call: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """Seconds of the first call (with compilation, where there is one) and what it returned."""
    common.sync(device)
    started = time.perf_counter()
    result = call()
    common.sync(device)
    return time.perf_counter() - started, result


def zturbo_row(components: Components, opts: Any, request: Sampling) -> dict[str, Any]:
    """zturbo compiled (eager with --no-compile) on `components`: the first call (compiles), the
    warm-up as far as the step graph's capture, the timed runs; reverted to eager afterwards."""
    from .speed import prepare

    device = opts.device
    engine = common.random_engine(components, device, opts.dtype)
    row: dict[str, Any] = {"transformer_gib": _module_bytes(components.transformer) / common.GIB}
    prepare(engine, "compiled", opts, "none", True, row)  # `accel.apply` leaves GGUF projections unfused
    try:
        call = common.zturbo_e2e(engine, opts.main_size, sampling=request)
        row["first_call_s"], result = _first_call(call, device)
        # A step shape is captured into a CUDA graph on its second request; the first call was one.
        warm = max(opts.warmup, STEP_SIGHTINGS if engine.accel.step_graphs is not None else 0, 1) - 1
        row |= timed(call, device, opts.runs, warm)
        row["compiled"] = engine.accel.compiling  # a failed compilation reverts to eager: the label says so
        row["thumbnail"] = thumbnail(result.images[0].image)
        row["weights"] = result.images[0].metadata.get("transformer_weights")
    finally:
        engine.accel.revert_compile()
    log.info("bench --gguf: zturbo %.3f s/img, peak %s GiB", row["median_s"], row["peak_gib"])
    return row


def diffusers_row(components: Components, opts: Any, request: Sampling) -> dict[str, Any]:
    """diffusers' ZImagePipeline, eager, over `components` (the first call is the warm-up)."""
    pipe = common.reference_pipeline(components)
    call = common.reference_e2e(pipe, opts.main_size, sampling=request)
    row: dict[str, Any] = {"transformer_gib": _module_bytes(components.transformer) / common.GIB}
    row["first_call_s"], result = _first_call(call, opts.device)
    row |= timed(call, opts.device, opts.runs, max(opts.warmup - 1, 0))
    row["thumbnail"] = thumbnail(result.images[0])
    log.info("bench --gguf: diffusers %.3f s/img, peak %s GiB", row["median_s"], row["peak_gib"])
    return row


def zturbo_gguf_row(
    components: Components, path: Path, config: dict[str, Any], opts: Any, request: Sampling
) -> dict[str, Any]:
    """The file loaded as zturbo loads `--transformer FILE`; compiled without fused projections
    (as `Engine.load` runs a GGUF transformer: its weights stay in their dequantizing linears)."""
    from .. import gguf

    started = time.perf_counter()
    transformer, info = gguf.load_transformer(path, config, opts.device, opts.dtype)
    load_s = time.perf_counter() - started
    with_file = dataclasses.replace(components, transformer=transformer, transformer_weights=info.describe())
    return {"load_s": load_s} | zturbo_row(with_file, opts, request)


def diffusers_gguf_row(
    components: Components, path: Path, config: dict[str, Any], opts: Any, request: Sampling
) -> dict[str, Any]:
    """The same file through diffusers' own GGUF loading, its config from a local directory (no hub)."""
    from diffusers import GGUFQuantizationConfig, ZImageTransformer2DModel

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="zturbo-config-") as tmp:
        # The config as a diffusers model directory holds it (building the model to save it would
        # initialise 6 B float32 weights on the host).
        (Path(tmp) / "transformer").mkdir()
        text = json.dumps({"_class_name": ZImageTransformer2DModel.__name__, **config})
        (Path(tmp) / "transformer" / "config.json").write_text(text)
        transformer = ZImageTransformer2DModel.from_single_file(
            str(path),
            config=tmp,
            subfolder="transformer",
            quantization_config=GGUFQuantizationConfig(compute_dtype=opts.dtype),
            torch_dtype=opts.dtype,
            local_files_only=True,
        )
    transformer = transformer.to(opts.device).eval().requires_grad_(False)
    load_s = time.perf_counter() - started
    return {"load_s": load_s} | diffusers_row(dataclasses.replace(components, transformer=transformer), opts, request)


def _module_bytes(module: torch.nn.Module) -> int:
    """Parameter and buffer bytes (a GGUF parameter's are its stored bytes)."""
    tensors = [*module.parameters(), *module.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def compare(rows: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Mean absolute differences (of 255) between rows' thumbnails: each row against zturbo's bf16
    image, and zturbo against diffusers on the same weights."""

    def diff(a: dict[str, Any] | None, b: dict[str, Any] | None) -> float | None:
        if not a or not b or "thumbnail" not in a or "thumbnail" not in b:
            return None
        return float(np.abs(np.asarray(a["thumbnail"]) - np.asarray(b["thumbnail"])).mean())

    out: dict[str, float] = {}
    baseline = rows.get(BF16, {}).get("zturbo")
    for weights, sides in rows.items():
        pairs = {f"{weights} zturbo vs diffusers": (sides.get("zturbo"), sides.get("diffusers"))}
        if weights != BF16:
            pairs |= {f"{weights} {side} vs bf16 zturbo": (row, baseline) for side, row in sides.items()}
        out |= {name: d for name, (a, b) in pairs.items() if (d := diff(a, b)) is not None}
    return out


def markdown(res: dict[str, Any]) -> str:
    """One row per (weights, runtime), then the files and the image comparisons."""
    lines = [
        f"GGUF transformers: {res['size']}², {res['steps']} steps, median of {res['runs']}",
        "",
        "| weights | runtime | s/img | vs zturbo bf16 | peak GiB | transformer GiB | SM MHz (power-capped) |",
        "|---|---|---|---|---|---|---|",
    ]
    bf16 = res["rows"].get(BF16, {}).get("zturbo", {}).get("median_s")
    for weights, sides in res["rows"].items():
        for side in ("zturbo", "diffusers"):
            if side in sides:
                lines.append(_table_row(weights, side, sides[side], bf16))
    lines.append("")
    for qtype, file in res["files"].items():
        types = ", ".join(f"{n} {t}" for t, n in sorted(file["types"].items()))
        size = file["bytes"] / common.GIB
        lines.append(f"- {qtype} file: {size:.2f} GiB written in {file['write_s']:.1f} s ({types})")
    lines += [f"- image {name}: {value:.2f}/255" for name, value in res.get("images", {}).items()]
    return "\n".join(lines)


def _table_row(weights: str, side: str, row: dict[str, Any], bf16: float | None) -> str:
    runtime = "diffusers eager" if side != "zturbo" else "zturbo compiled" if row.get("compiled") else "zturbo eager"
    if "error" in row:
        return f"| {weights} | {runtime} | FAILED: {row['error'][:200]} | | | | |"
    ratio = f"{row['median_s'] / bf16:.2f}x" if bf16 else "-"
    peak = "-" if row.get("peak_gib") is None else f"{row['peak_gib']:.1f}"
    return (
        f"| {weights} | {runtime} | {row['median_s']:.3f} | {ratio} | {peak} | {row['transformer_gib']:.2f} "
        f"| {clock_cell(row.get('gpu_clocks'))} |"
    )
