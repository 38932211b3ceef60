#!/usr/bin/env python3
"""One image on several GPUs (`--parallel N`, zturbo.accel.sequence) against one GPU, in one run.

For each process count (1 first: the single-GPU engine is the baseline of the same run), the
processes start (`zturbo.distributed.launch`), build the real architecture with random weights
(seed 0, then the first process's weights broadcast so that every process holds the same), compile
as the engine compiles (bf16, torch.compile, CUDA graphs of the steps), warm up at each size, and
time `Engine.generate` of one image per size (8 steps, a new prompt each call, so the text
encoder runs). The first process also returns the final latents of a fixed request, compared with
the single-GPU ones (relative error; the acceptance asks <= 1e-2).

Writes parallel.json to --out ($OUT, else ./parallel) after each process count, and prints a
table: seconds per image, speed-up over 1 GPU, relative error.

    python scripts/bench_parallel.py --parallel 1 2 4 --sizes 1024 2048          # 4 GPUs
    python scripts/bench_parallel.py --tiny --device cpu --parallel 1 2 --sizes 64 --runs 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parallel", type=int, nargs="+", default=[1, 2, 4], help="process counts (1: the baseline)")
    p.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048], help="square image sides in pixels")
    p.add_argument("--runs", type=int, default=5, help="timed images per size")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--tiny", action="store_true", help="the tiny test architecture, eager (a smoke run)")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "parallel")))
    args = p.parse_args(argv)
    if 1 not in args.parallel:
        p.error("--parallel must include 1: the single-GPU baseline of the same run")
    if any(n < 1 for n in args.parallel) or any(s % 16 for s in args.sizes):
        p.error("process counts must be 1 or more and sizes multiples of 16")
    return args


def build(shards: Any, args: argparse.Namespace) -> Any:
    """An engine over random weights equal on every process, compiled unless --tiny."""
    import torch.distributed as dist

    from zturbo.accel.compile import AccelOptions, apply
    from zturbo.bench import common

    device = torch.device(args.device, torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
    dtype = torch.float32 if args.tiny else torch.bfloat16
    components = common.random_components(device, dtype, args.tiny)
    for module in (components.transformer, components.text_encoder, components.vae):
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor.data, 0, group=shards.group)
    engine = common.random_engine(components, device, dtype)
    engine.shards = shards if shards.size > 1 else None
    engine.accel = apply(components, AccelOptions(compile=not args.tiny), engine.shards)
    return engine


def measure(shards: Any, args: argparse.Namespace) -> dict[str, Any]:
    """In each process: warm-up, timed images, final latents; the first process's dict is returned."""
    import torch.distributed as dist

    from zturbo.bench import common

    engine = build(shards, args)
    out: dict[str, Any] = {"processes": shards.size, "sizes": {}}
    for size in args.sizes:
        for i in range(2):  # compile and capture at this size
            engine.generate(f"warm-up {i}", seed=i, steps=args.steps, width=size, height=size)
        times = []
        for i in range(args.runs):
            dist.barrier(group=shards.group)
            common.sync(engine.device)
            start = time.perf_counter()
            engine.generate(f"a lighthouse at dusk, take {i}", seed=i, steps=args.steps, width=size, height=size)
            common.sync(engine.device)
            times.append(time.perf_counter() - start)
        peak = torch.cuda.max_memory_allocated() / 2**30 if engine.device.type == "cuda" else None
        latents = common.final_latents(engine, size).float().cpu()
        out["sizes"][size] = {"median_s": statistics.median(times), "times_s": times, "peak_gib": peak,
                              "latents": latents}  # fmt: skip
    return out


def summarize(results: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Per process count and size: seconds, speed-up over one process, relative error of the latents."""
    from zturbo.bench.common import rel_err

    base = results[1]["sizes"]
    rows = {}
    for n, res in sorted(results.items()):
        for size, row in res["sizes"].items():
            rows[f"{size}x{n}"] = {
                "size": size,
                "processes": n,
                "median_s": row["median_s"],
                "times_s": row["times_s"],
                "peak_gib": row["peak_gib"],
                "speedup": base[size]["median_s"] / row["median_s"],
                "rel_err": rel_err(row["latents"], base[size]["latents"]),
            }
    return rows


def table(rows: dict[str, Any]) -> str:
    lines = ["| size | processes | s/image | speed-up | latents rel. err |", "|---|---|---|---|---|"]
    for r in rows.values():
        lines.append(
            f"| {r['size']}² | {r['processes']} | {r['median_s']:.3f} | {r['speedup']:.2f}x | {r['rel_err']:.1e} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from zturbo.bench.common import environment
    from zturbo.distributed import launch

    args = parse(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[int, dict[str, Any]] = {}
    for n in sorted(set(args.parallel)):
        results[n] = launch(n, args.device, measure, args)
        rows = summarize(results)
        report = {"environment": environment(torch.device("cpu")), "args": vars(args) | {"out": str(args.out)}}
        (args.out / "parallel.json").write_text(json.dumps(report | {"rows": rows}, indent=1))
    print(table(summarize(results)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
