"""Where a new prompt's time goes under a memory cap: one profiled image per case.

    python3 scripts/probe_te_offload.py CAP [CAP ...]   # GiB, 0 = uncapped; one process each

For each cap (in its own process: a cap cannot be undone) the planner's engine on random weights
runs three warm new-prompt images, then one profiled new-prompt image and one profiled repeated
one. Printed per case: the request's GPU span, how much of it compute kernels and host-to-device
copies kept busy, the GPU's idle time by stage, and the longest idle gaps. JSON lines go to $OUT/probe_te_offload.jsonl.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

SIZE = 1024


def case(cap: float) -> dict[str, Any]:
    from zturbo.bench import memory as bench_memory
    from zturbo.bench import speed as bench

    engine, row = bench_memory.capped_engine(cap, SIZE)

    def new() -> Any:
        engine.prompt_cache.clear()
        return engine.generate(bench.PROMPT, seed=bench.SEED, width=SIZE, height=SIZE, steps=bench.STEPS)

    def repeated() -> Any:
        return engine.generate(bench.PROMPT, seed=bench.SEED, width=SIZE, height=SIZE, steps=bench.STEPS)

    for _ in range(3):
        new()
    out: dict[str, Any] = {"cap_gib": cap, "plan": engine.placement.describe(), "estimate": row.get("plan")}
    for name, fn in (("new", new), ("repeated", repeated)):
        out[name] = profiled(fn)
    return out


def union_ms(spans: list[tuple[float, float]]) -> float:
    total, cursor = 0.0, float("-inf")
    for start, end in sorted(spans):
        if end > cursor:
            total += end - max(start, cursor)
            cursor = end
    return total / 1000


def profiled(fn: Any) -> dict[str, Any]:
    """One call under the profiler: from the request's start to the GPU's last op, the time
    compute kernels and host-to-device copies kept the GPU busy, and its idle time by stage."""
    from zturbo.bench import speed as bench

    events = bench.profiled_events(fn)
    device = bench.device_events(events)
    request = max(
        ((e.time_range.start, e.time_range.end) for e in events if e.name == "zturbo.request"),
        key=lambda r: r[1] - r[0],
    )
    inside = [d for d in device if request[0] <= d[0] <= request[1]]
    copies = [(s, e) for s, e, n in inside if "Memcpy HtoD" in n]
    compute = [(s, e) for s, e, n in inside if "Memcpy" not in n and "Memset" not in n]
    last = max(e for _, e, _ in inside)
    return {
        "request_ms": (last - request[0]) / 1000,  # to the GPU's last op
        "compute_busy_ms": union_ms(compute),
        "copy_busy_ms": union_ms(copies),
        "compute_idle_ms": (last - request[0]) / 1000 - union_ms(compute),
        "first_compute_ms": (min(s for s, _ in compute) - request[0]) / 1000,
        "idle": bench.idle_by_stage(events, device),
    }


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--case":
        print(json.dumps(case(float(sys.argv[2]))))
        return
    out = Path(os.environ.get("OUT", ".")) / "probe_te_offload.jsonl"
    for cap in sys.argv[1:]:
        proc = subprocess.run([sys.executable, __file__, "--case", cap], capture_output=True, text=True, check=False)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        if not lines:
            print(f"cap {cap}: failed\n{proc.stderr[-3000:]}")
            continue
        result = json.loads(lines[-1])
        with out.open("a") as f:
            f.write(json.dumps(result) + "\n")
        print(f"== cap {cap} GiB: {result['plan']}")
        for name in ("new", "repeated"):
            r = result[name]
            print(
                f"  {name}: request {r['request_ms']:.1f} ms, compute busy {r['compute_busy_ms']:.1f}, "
                f"compute idle {r['compute_idle_ms']:.1f} (first kernel at {r['first_compute_ms']:.1f}), "
                f"copies busy {r['copy_busy_ms']:.1f}"
            )
            idle = r["idle"]
            by_stage = ", ".join(f"{k.removeprefix('zturbo.')} {v:.1f}" for k, v in idle["by_stage_ms"].items())
            print(f"    all-GPU idle {idle['idle_ms']:.1f} ms by stage: {by_stage}")
            for g in idle["longest"][:6]:
                print(f"    gap {g['ms']:.2f} ms in {g['stage']}: after {g['after'][:50]} / before {g['before'][:50]}")


if __name__ == "__main__":
    main()
