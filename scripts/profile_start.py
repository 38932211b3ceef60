#!/usr/bin/env python3
"""Where a worker's start goes: the imports, `Engine.load` (warm-up included, on a compile cache)
and the first small call, as a server worker makes them, under cProfile.

    python scripts/profile_start.py --model /tmp/zi --compile-cache DIR --out DIR [--top 40]

Writes start.prof (for `python -m pstats` or snakeviz) and start.txt: the engine's start-up
report and the functions with the most cumulative and the most own time. cProfile times the host
side; GPU work shows where the host waits for it.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import time
from pathlib import Path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="checkpoint directory or name")
    p.add_argument("--compile-cache", default=None, help="compile cache directory (default: the configured one)")
    p.add_argument("--out", default=".", help="where start.prof and start.txt go (default .)")
    p.add_argument("--top", type=int, default=40, help="functions listed per ordering (default 40)")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    profile = cProfile.Profile()
    tick = time.perf_counter()
    profile.enable()
    from zturbo.config import RuntimeConfig
    from zturbo.engine import Engine

    given = {"model": args.model} | ({"compile_cache": args.compile_cache} if args.compile_cache else {})
    engine = Engine.load(RuntimeConfig.from_env(**given))
    unit = engine.limits.spatial_unit
    engine.generate("warm-up", seed=0, steps=1, width=unit * 4, height=unit * 4)  # as a worker does
    profile.disable()
    total = time.perf_counter() - tick
    profile.dump_stats(out / "start.prof")
    text = io.StringIO()
    text.write(f"total {total:.2f} s\n{json.dumps(engine.startup_report(), indent=1, default=str)}\n")
    text.write(f"Dynamo, seconds per compiled function:\n{_dynamo_times()}\n")
    for order in ("cumulative", "tottime"):
        pstats.Stats(profile, stream=text).sort_stats(order).print_stats(args.top)
    (out / "start.txt").write_text(text.getvalue())
    print(text.getvalue()[:4000])
    return 0


def _dynamo_times() -> str:
    """Dynamo's own table of the time it spent on each compiled function (tracing included)."""
    from torch._dynamo.utils import compile_times

    return str(compile_times(repr="str", aggregate=True))


if __name__ == "__main__":
    raise SystemExit(main())
