"""`zturbo bench --lora`: a LoRA image against a plain one, switching LoRA sets, and diffusers' LoRA path.

Real architecture with random weights; two random rank-`RANK` LoRAs (diffusers/PEFT keys) on every
attention and feed-forward linear of every block. diffusers runs first on the same modules (eager:
plain, `load_lora_weights` unfused, then `fuse_lora`), then zturbo compiled: plain images, LoRA
images, and set switches with compilations and step-graph captures counted around them.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..accel.graphs import STEP_SIGHTINGS
from ..adapters.library import LoraLibrary
from ..engine import Engine
from . import common
from .common import PROMPT, SEED, STEPS, once, timed

log = logging.getLogger("zturbo")

RANK = 32
TARGETS = ("attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0")
TARGETS += ("feed_forward.w1", "feed_forward.w2", "feed_forward.w3")
SWITCHES = 6  # alternating a -> b -> a ...: each one a set change
Report = Callable[[dict[str, Any]], None]


def lora_targets(transformer: torch.nn.Module) -> list[str]:
    """Every attention and feed-forward linear of every block (what the LoRAs patch)."""
    from ..accel.fuse import BLOCK_LISTS

    return [
        f"{blocks}.{i}.{leaf}"
        for blocks in BLOCK_LISTS
        for i in range(len(getattr(transformer, blocks)))
        for leaf in TARGETS
    ]


def write_random_lora(path: Path, transformer: torch.nn.Module, rank: int, seed: int) -> int:
    """A rank-`rank` LoRA in diffusers' keys on every target, bf16; returns its parameter count."""
    from safetensors.torch import save_file

    gen = torch.Generator("cpu").manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for name in lora_targets(transformer):
        out_features, in_features = transformer.get_submodule(name).weight.shape
        down = torch.randn(rank, in_features, generator=gen) / in_features**0.5
        up = torch.randn(out_features, rank, generator=gen) * 0.01
        tensors[f"transformer.{name}.lora_A.weight"] = down.to(torch.bfloat16)
        tensors[f"transformer.{name}.lora_B.weight"] = up.to(torch.bfloat16)
    save_file(tensors, str(path))
    return sum(t.numel() for t in tensors.values())


def run(opts: Any, report: Report = lambda r: None) -> dict[str, Any]:
    """Every row; `report` gets the results so far after each phase."""
    device, size = opts.device, opts.main_size
    res: dict[str, Any] = {"environment": common.environment(device), "size": size, "rank": RANK}
    engine = common.load_engine(None, opts.tiny, device, opts.dtype)
    directory = Path(tempfile.mkdtemp(prefix="zturbo-bench-lora-"))
    transformer = engine.components.transformer
    for name, seed in (("a", 1), ("b", 2)):
        res[f"lora_{name}_params"] = write_random_lora(directory / f"{name}.safetensors", transformer, RANK, seed)
    res["targets"] = len(lora_targets(transformer))
    engine.loras = LoraLibrary(directory)
    if opts.reference:
        res["reference"] = reference_rows(engine, directory / "a.safetensors", opts)
        report(res)
    for quantize in opts.quantize:
        key = "compiled" if quantize == "none" else quantize
        if quantize == "fp8" and (opts.tiny or not common.fp8_capable(device)):
            res[key] = {"skipped": "no fp8-capable GPU"}
            continue
        res[key] = {}
        try:
            zturbo_rows(res[key], engine, opts, quantize, report=lambda: report(res))
        except Exception as e:  # one broken mode must not lose the others' numbers
            res[key]["error"] = f"{type(e).__name__}: {e}"[:2000]
        report(res)
    return res


def reference_rows(engine: Engine, lora_file: Path, opts: Any) -> dict[str, Any]:
    """diffusers on the same modules, eager: plain, LoRA through PEFT layers, LoRA fused."""
    from safetensors.torch import load_file

    device, size, runs, warm = engine.device, opts.main_size, opts.runs, opts.warmup
    pipe = common.reference_pipeline(engine.components)
    rows: dict[str, Any] = {"plain": timed(common.reference_e2e(pipe, size), device, runs, warm)}
    start = time.perf_counter()
    pipe.load_lora_weights(load_file(str(lora_file)), adapter_name="a")
    rows["load_lora_weights_s"] = time.perf_counter() - start
    rows["lora_unfused"] = timed(common.reference_e2e(pipe, size), device, runs, warm)
    start = time.perf_counter()
    pipe.fuse_lora()
    common.sync(device)
    rows["fuse_lora_s"] = time.perf_counter() - start
    rows["lora_fused"] = timed(common.reference_e2e(pipe, size), device, runs, warm)
    pipe.unfuse_lora()
    pipe.unload_lora_weights()
    return rows


def lora_e2e(engine: Engine, size: int, loras: list[tuple[str, float]]) -> Callable[[], Any]:
    """`common.zturbo_e2e`'s request (prompt cache emptied first) with `loras`."""

    def run() -> Any:
        engine.prompt_cache.clear()
        return engine.generate(PROMPT, seed=SEED, width=size, height=size, steps=STEPS, loras=loras)

    return run


def zturbo_rows(phase: dict[str, Any], engine: Engine, opts: Any, quantize: str, report: Callable[[], None]) -> None:
    """Compiled zturbo: plain, the first LoRA image, LoRA images, then set switches (counted)."""
    from .speed import prepare

    device, size, runs = engine.device, opts.main_size, opts.runs
    engine._forget_loras()
    if quantize != "none":
        engine.base_reader = plain_weights(engine, quantize)
    prepare(engine, f"lora_{quantize}", opts, quantize, True, phase)
    phase["first_call_s"] = once(common.zturbo_e2e(engine, size), device)
    engine.warmup(size, size)
    warm = max(opts.warmup, STEP_SIGHTINGS)
    phase["plain"] = timed(common.zturbo_e2e(engine, size), device, runs, warm)
    report()
    before = compile_counts(engine)
    phase["first_lora_image_s"] = once(lora_e2e(engine, size, [("a", 1.0)]), device)
    phase["lora"] = timed(lora_e2e(engine, size, [("a", 1.0)]), device, runs, 0)
    phase["lora_vs_plain"] = phase["lora"]["median_s"] / phase["plain"]["median_s"]
    report()
    phase["switch_s"] = switch_times(engine)
    phase["lora_b_after_switches"] = timed(lora_e2e(engine, size, [("b", 1.0)]), device, runs, 0)
    phase["two_loras"] = timed(lora_e2e(engine, size, [("a", 0.7), ("b", 0.4)]), device, runs, 1)
    after = compile_counts(engine)
    phase["new_compiled_graphs"] = after["graphs"] - before["graphs"]
    phase["new_step_graph_captures"] = after["captures"] - before["captures"]
    merger = engine.merger
    if merger is not None:
        phase["backup_gib"] = merger.backup_bytes / common.GIB
        phase["backup_device"] = str(merger.backup_device)
    phase["restore_s"] = once(lambda: engine._use_loras(engine.request("x")), device)
    phase["plain_after_restore"] = timed(common.zturbo_e2e(engine, size), device, runs, 0)


def switch_times(engine: Engine) -> list[float]:
    """Seconds of each set change alone (a -> b -> a ...), as the merger measured them."""
    times = []
    for i in range(SWITCHES):
        name = "b" if i % 2 == 0 else "a"
        engine._use_loras(engine.request("x", loras=[(name, 1.0)]))
        assert engine.merger is not None
        times.append(engine.merger.stats.last_seconds)
    return times


def compile_counts(engine: Engine) -> dict[str, int]:
    """Graphs dynamo compiled so far and step graphs captured so far."""
    from torch._dynamo.utils import counters

    graphs = engine.accel.step_graphs
    return {"graphs": int(counters["stats"]["unique_graphs"]), "captures": graphs.captures if graphs else 0}


def plain_weights(engine: Engine, quantize: str) -> Callable[[str], torch.Tensor]:
    """Host copies of the plain weights quantizing replaces (random weights have no checkpoint to
    read them back from): what a LoRA merge into a quantized weight starts from."""
    from ..accel.quantize import quantizes

    transformer = engine.components.transformer
    saved = {
        f"{name}.weight": module.weight.detach().to("cpu", copy=True)
        for name, module in transformer.named_modules()
        if quantizes(quantize, module, name)
    }
    return saved.__getitem__


def markdown(res: dict[str, Any]) -> str:
    """The headline rows as a table."""
    lines = ["| row | median s |", "|---|---|"]
    for key in ("compiled", "fp8"):
        phase = res.get(key) or {}
        for row in ("plain", "lora", "lora_b_after_switches", "two_loras", "plain_after_restore"):
            if isinstance(phase.get(row), dict):
                lines.append(f"| {key} {row} | {phase[row]['median_s']:.3f} |")
        if "switch_s" in phase:
            lines.append(f"| {key} switch (max of {len(phase['switch_s'])}) | {max(phase['switch_s']):.3f} |")
    for row in ("plain", "lora_unfused", "lora_fused"):
        ref = (res.get("reference") or {}).get(row)
        if ref:
            lines.append(f"| diffusers eager {row} | {ref['median_s']:.3f} |")
    return "\n".join(lines)
