"""Where a compiled 1024² image makes the host wait for the GPU (CUDA's synchronizing calls).

Builds the real architecture with random weights, compiles and warms up as `Engine.load` does,
then generates one image under `torch.cuda.set_sync_debug_mode("warn")` and records the Python
stack of every synchronizing call, grouped by stack, with the engine stage it happened in.
A synchronization inside the denoising loop drains the GPU's queue, and the next step's first
kernels then wait for the host to launch them. Writes $OUT/syncs.json.

Usage (GPU): PYTHONPATH=src python scripts/probe_syncs.py
"""

from __future__ import annotations

import collections
import json
import os
import traceback
import warnings
from typing import Any

import torch

from zturbo.accel import compile as accel
from zturbo.bench import speed as bench

OUT = os.environ.get("OUT", ".")


def main() -> None:
    device = torch.device("cuda")
    engine = bench.load_engine(bench.BenchOptions(), device, torch.bfloat16)
    engine.accel = accel.apply(engine.components, compile_=True, quantize="none")
    engine.warmup()
    engine.generate(bench.PROMPT, seed=1)  # everything compiled and captured before the probe

    stacks: collections.Counter[tuple[str, ...]] = collections.Counter()
    shown = warnings.showwarning

    def record(message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
        frames = [f for f in traceback.extract_stack()[:-1] if "warnings" not in f.filename]
        stacks[tuple(f"{f.filename.split('site-packages/')[-1]}:{f.lineno} {f.name}" for f in frames[-10:])] += 1

    warnings.simplefilter("always")
    warnings.showwarning = record
    torch.cuda.set_sync_debug_mode("warn")
    try:
        engine.generate("a different prompt than before, so the text encoder runs", seed=2)
    finally:
        torch.cuda.set_sync_debug_mode("default")
        warnings.showwarning = shown
    rows = [{"count": n, "stack": list(stack)} for stack, n in stacks.most_common()]
    with open(os.path.join(OUT, "syncs.json"), "w") as f:
        json.dump(rows, f, indent=1)
    for row in rows:
        print(row["count"], " <- ".join(reversed(row["stack"][-5:])), flush=True)


if __name__ == "__main__":
    main()
