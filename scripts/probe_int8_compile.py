"""Where a compiled int8 (or GGUF) transformer's time goes, resident or streamed under a cap.

Builds a capped row's engine (`bench.memory.capped_engine`, as `zturbo bench --cap-row` does) and prints one
JSON line per finished call, so a run cut off by a timeout still tells how far it got: the first
call (compiling), a timed second, then a profiled third with the longest kernels. Each line says
whether the call still ran compiled under the placed plan (an engine out of memory leans out, and
runs eagerly from then on where the leaner plan streams blocks), the peak memory so far, and how many int8 products
Inductor rewrote into aten._weight_int8pack_mm (none, unless `--inductor-patterns` turns its
pattern matcher back on for int8 blocks: `accel.compile.INT8_INDUCTOR_OPTIONS`).

    python3 scripts/probe_int8_compile.py --cap 4 --size 1024 --steps 8   # streamed (block-offload)
    python3 scripts/probe_int8_compile.py --cap 4 --size 1024 --steps 8 --eager   # the same, eager
    python3 scripts/probe_int8_compile.py --cap 0 --size 1024 --steps 8 --inductor-patterns  # resident, rewritten
    python3 scripts/probe_int8_compile.py --gguf Q8_0 --cap 4 --size 1024 --steps 8   # a GGUF file streamed
    python3 scripts/probe_int8_compile.py --tiny --cap 0 --size 64 --steps 1  # CPU smoke test

With `--gguf TYPE` (Q8_0 or Q4_K) the transformer is a GGUF file of that type, written from the
random weights (`bench.ggufwrite`) and loaded as `--transformer FILE.gguf` loads it, in place of
int8 weights.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch._dynamo.utils import counters

from zturbo.bench import common, ggufwrite, memory, profiling
from zturbo.config import process_defaults


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cap", type=float, default=4.0, help="GiB (0: the whole GPU)")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--quantize", default="int8", choices=["int8", "fp8", "none"])
    ap.add_argument("--eager", action="store_true", help="without torch.compile, for comparison")
    ap.add_argument("--gguf", default=None, help="a GGUF file of this type (Q8_0 or Q4_K) instead of --quantize")
    ap.add_argument("--tiny", action="store_true", help="the tiny model on the CPU: a smoke test of this script")
    ap.add_argument(
        "--inductor-patterns",
        action="store_true",
        help="int8 blocks compiled with Inductor's pattern matcher on (its int8 rewrite; the engine turns it off)",
    )
    args = ap.parse_args(argv)
    process_defaults()  # as for zturbo's own processes (the bench rows): before CUDA's first allocation
    start = time.perf_counter()
    quantize = "none" if args.gguf else args.quantize
    with tempfile.TemporaryDirectory(prefix="zturbo-probe-") as tmp:
        build = ggufwrite.gguf_components(args.gguf, Path(tmp)) if args.gguf else common.random_components
        engine, row = memory.capped_engine(
            args.cap,
            args.size,
            quantize,
            args.tiny,
            build,
            compile=not args.eager,
            accel_fields={"int8_patterns": args.inductor_patterns},
        )
    if torch.cuda.is_available():  # the peaks of the capped calls, not of building the random weights
        torch.cuda.reset_peak_memory_stats()
    _say("placed", start, **row)
    if engine is None:
        sys.exit(1)

    def call() -> None:
        engine.prompt_cache.clear()
        engine.generate(common.PROMPT, seed=common.SEED, width=args.size, height=args.size, steps=args.steps)
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    for name in ("first call", "second call"):
        t = time.perf_counter()
        call()
        # Inductor's rewrites of int8 products into aten._weight_int8pack_mm (see INT8_INDUCTOR_OPTIONS)
        rewrites = counters["inductor"]["woq_matcher_count"]
        _say(name, start, call_s=time.perf_counter() - t, int8pack_rewrites=rewrites, **_state(engine))
    if not torch.cuda.is_available():
        return  # the profile is of CUDA kernels
    t = time.perf_counter()
    report = profiling.profile(call, top=20)
    report.pop("idle", None)
    _say("profiled", start, call_s=(time.perf_counter() - t) / 2, **_state(engine), **report)


def _state(engine: Any) -> dict[str, Any]:
    """Whether the call ran compiled and under the placed plan: an engine out of memory moves to a
    leaner plan, and under one that streams blocks it reverts its compilation."""
    state = {"compiled_after": engine.accel.compiling, "plan_after": engine.placement.describe()}
    if torch.cuda.is_available():
        state["peak_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
        state["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
    return state


def _say(what: str, start: float, **fields: object) -> None:
    print(json.dumps({"at_s": round(time.perf_counter() - start, 1), "what": what, **fields}, default=str), flush=True)


if __name__ == "__main__":
    main()
