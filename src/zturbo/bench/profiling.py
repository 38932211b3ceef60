"""One request under the CUDA profiler: GPU time by kernel kind, and the GPU's idle time charged to
the engine's stages (the `zturbo.*` profiler ranges the engine opens around each stage).

Kernel and CPU-range times come from one profiler clock, so a gap between two kernels can be
placed inside the stage range that was open on the CPU at the time.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

# Kernel-name fragments that identify matrix products and attention in a CUDA profile.
MATMUL_KERNELS = ("gemm", "matmul", "cutlass", "sm90_xmma", "nvjet", "_scaled_mm", "f8f8")
ATTENTION_KERNELS = ("flash", "fmha", "attention", "cudnn_generated", "sdpa")
# Device-side profiler records that are not GPU work: the launch queue filling up.
NOT_GPU_WORK = ("Command Buffer Full",)
REQUEST_RANGE = "zturbo.request"

Span = tuple[float, float, str]  # (start µs, end µs, name)
Gap = tuple[float, float, str, str]  # (length µs, start µs, work before, work after)


def kernel_kind(name: str) -> str:
    """matmul, attention or other, by kernel name. Attention first: FlashAttention 3's and the
    memory-efficient SDPA kernels are CUTLASS kernels too."""
    lower = name.lower()
    if any(k in lower for k in ATTENTION_KERNELS):
        return "attention"
    return "matmul" if any(k in lower for k in MATMUL_KERNELS) else "other"


def profile(fn: Callable[[], Any], top: int = 15) -> dict[str, Any]:
    """GPU kernel time of one call by kind (matmul / attention / other), the `top` longest kernels,
    and the GPU's idle time within the call, charged to the engine's stages."""
    fn()  # untimed: the profile is of a warm call
    events = profiled_events(fn)
    device = device_events(events)
    out = kernel_totals(device, top)
    try:
        out["idle"] = idle_by_stage(events, device)
    except Exception as e:  # a diagnostic: the kernel totals above stand on their own
        out["idle"] = {"error": f"{type(e).__name__}: {e}"[:300]}
    return out


def kernel_totals(device: list[Span], top: int) -> dict[str, Any]:
    """Milliseconds by kernel kind, their sum, and the `top` kernels by total time."""
    totals = {"matmul": 0.0, "attention": 0.0, "other": 0.0}
    by_name: dict[str, list[float]] = {}
    for start, end, name in device:
        entry = by_name.setdefault(name, [0.0, 0])
        entry[0] += (end - start) / 1000
        entry[1] += 1
    kernels = []
    for name, (ms, count) in by_name.items():
        kind = kernel_kind(name)
        totals[kind] += ms
        kernels.append({"name": name[:120], "ms": ms, "count": int(count), "kind": kind})
    kernels.sort(key=lambda k: -k["ms"])
    return {"total_ms": sum(totals.values()), "by_kind_ms": totals, "top": kernels[:top]}


def profiled_events(fn: Callable[[], Any]) -> Any:
    """The CPU and CUDA profiler events of one call of `fn`, inside a `zturbo.request` range."""
    import torch
    from torch.profiler import ProfilerActivity, record_function
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        with record_function(REQUEST_RANGE):
            fn()
        torch.cuda.synchronize()
    return prof.events()


def device_events(events: Any) -> list[Span]:
    """(start µs, end µs, name) of the GPU's kernels, copies and memsets, in start order, without
    the GPU-side mirrors of `zturbo.*` ranges and the profiler's queue markers."""
    from torch.autograd import DeviceType

    return sorted(
        (e.time_range.start, e.time_range.end, e.name)
        for e in events
        if e.device_type == DeviceType.CUDA and not e.name.startswith("zturbo.") and e.name not in NOT_GPU_WORK
    )


def idle_by_stage(events: Any, device: list[Span], min_gap_us: float = 20.0) -> dict[str, Any]:
    """GPU idle time inside the `zturbo.request` range: total, by the innermost `zturbo.*` stage
    range open at each gap, and the longest gaps with the GPU work on either side and the CPU
    operations that overlap them most. Gaps under `min_gap_us` (launch spacing) are counted in
    the total but not listed."""
    ranges, cpu_ops = _cpu_spans(events)
    request = max((r for r in ranges if r[2] == REQUEST_RANGE), key=lambda r: r[1] - r[0])
    stages = [r for r in ranges if r[2] != REQUEST_RANGE]
    gaps = _gaps(request, device)
    per_stage: dict[str, float] = {}
    for gap, at, _, _ in gaps:
        key = _stage_at(stages, at + gap / 2)
        per_stage[key] = per_stage.get(key, 0.0) + gap / 1000
    longest = sorted((g for g in gaps if g[0] >= min_gap_us), key=lambda g: -g[0])[:15]
    return {
        "request_ms": (request[1] - request[0]) / 1000,
        "idle_ms": sum(g[0] for g in gaps) / 1000,
        "by_stage_ms": dict(sorted(per_stage.items(), key=lambda kv: -kv[1])),
        "stage_cpu_ms": {name: (end - start) / 1000 for start, end, name in stages},
        "after_last_stage_ms": (request[1] - max(end for _, end, _ in stages)) / 1000 if stages else None,
        "longest": [
            {
                "ms": length / 1000,
                "stage": _stage_at(stages, at + length / 2),
                "after": before[:80],
                "before": after[:80],
                "cpu": _cpu_during(cpu_ops, at, length),
            }
            for length, at, before, after in longest
        ],
    }


def _cpu_spans(events: Any) -> tuple[list[Span], list[Span]]:
    """The CPU-side `zturbo.*` ranges, and every other CPU operation."""
    from torch.autograd import DeviceType

    cpu = [(e.time_range.start, e.time_range.end, e.name) for e in events if e.device_type == DeviceType.CPU]
    return [s for s in cpu if s[2].startswith("zturbo.")], [s for s in cpu if not s[2].startswith("zturbo.")]


def _gaps(request: Span, device: list[Span]) -> list[Gap]:
    """The stretches inside `request` where no GPU work ran, with the work on either side."""
    gaps = []
    cursor, before = request[0], "(request start)"
    for start, end, name in device:
        if not request[0] <= start <= request[1]:
            continue
        if start > cursor:
            gaps.append((start - cursor, cursor, before, name))
        if end > cursor:
            cursor, before = end, name
    if request[1] > cursor:
        gaps.append((request[1] - cursor, cursor, before, "(request end)"))
    return gaps


def _stage_at(stages: list[Span], t: float) -> str:
    """The innermost stage range open at `t`."""
    inside = [s for s in stages if s[0] <= t < s[1]]
    return min(inside, key=lambda s: s[1] - s[0])[2] if inside else "(between stages)"


def _cpu_during(cpu_ops: list[Span], at: float, gap: float) -> list[str]:
    """The four CPU operations that overlap the gap [at, at + gap) most, with their overlap."""
    overlap: dict[str, float] = {}
    for start, end, name in cpu_ops:
        shared = min(end, at + gap) - max(start, at)
        if shared > 0:
            overlap[name] = overlap.get(name, 0.0) + shared
    return [f"{name[:60]} {us / 1000:.2f} ms" for name, us in sorted(overlap.items(), key=lambda kv: -kv[1])[:4]]
