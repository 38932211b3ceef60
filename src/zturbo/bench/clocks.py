"""The GPU's SM clock and power draw while a benchmark row runs, sampled with nvidia-smi.

A datacenter GPU under sustained matrix work runs into its power limit and lowers its SM clock:
an H100 SXM (700 W) generating images runs at 1350–1530 MHz with its software power cap active
in every sample, against 1980 MHz at the start of a short burst (docs/performance.md). A
micro-benchmark's TFLOP/s are taken at the burst clock; an image's are not. So `zturbo
bench` reports what the card ran at beside each time, and rows from different cards or cooling
can be told apart.

nvidia-smi runs as a separate process polling every `INTERVAL_MS`; where it is missing (no
NVIDIA driver tools, a CPU run) nothing is sampled and the rows carry no clock.
"""

from __future__ import annotations

import functools
import shutil
import statistics
import subprocess
from typing import Any

import torch

INTERVAL_MS = 50
# Renamed from clocks_throttle_reasons.* in recent drivers; `_fields` picks what the driver knows.
FIELDS = "clocks.sm,power.draw,{}.sw_power_cap,{}.hw_slowdown"


class ClockSampler:
    """`with ClockSampler(device) as s: ...` then `s.summary()` (None when nothing was sampled)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.proc: subprocess.Popen[str] | None = None
        self.lines: list[str] = []

    def __enter__(self) -> ClockSampler:
        smi = shutil.which("nvidia-smi")
        target = _gpu_id(self.device)
        fields = _fields(smi, target) if smi and target else None
        if fields:
            cmd = [*_query(smi, target, fields), "-lms", str(INTERVAL_MS)]
            self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            out, _ = self.proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
        self.lines = out.splitlines()

    def summary(self) -> dict[str, Any] | None:
        return summarize(self.lines)


def summarize(lines: list[str]) -> dict[str, Any] | None:
    """Median and lowest SM clock (MHz), median and highest power (W), and the share of samples
    with the software power cap or a hardware slowdown active, from nvidia-smi's CSV lines."""
    rows = []
    for line in lines:
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 4:
            continue
        try:
            rows.append((float(parts[0]), float(parts[1]), parts[2] == "Active", parts[3] == "Active"))
        except ValueError:  # "[N/A]" or a warning line
            continue
    if not rows:
        return None
    clocks, power = [r[0] for r in rows], [r[1] for r in rows]
    return {
        "samples": len(rows),
        "sm_mhz_median": statistics.median(clocks),
        "sm_mhz_min": min(clocks),
        "power_w_median": statistics.median(power),
        "power_w_max": max(power),
        "power_capped_share": sum(r[2] for r in rows) / len(rows),
        "hw_slowdown_share": sum(r[3] for r in rows) / len(rows),
    }


def _gpu_id(device: torch.device) -> str | None:
    """The device as nvidia-smi names it: its UUID, which CUDA_VISIBLE_DEVICES renumbering keeps."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    uuid = getattr(torch.cuda.get_device_properties(device), "uuid", None)
    if uuid is None:
        return None
    text = str(uuid)
    return text if text.startswith("GPU-") else f"GPU-{text}"


@functools.cache
def _fields(smi: str, target: str) -> str | None:
    """The query fields this driver accepts, or None if neither naming works (asked once per GPU)."""
    for reasons in ("clocks_event_reasons", "clocks_throttle_reasons"):
        fields = FIELDS.format(reasons, reasons)
        try:
            if subprocess.run(_query(smi, target, fields), capture_output=True, timeout=20).returncode == 0:
                return fields
        except (OSError, subprocess.SubprocessError):
            return None
    return None


def _query(smi: str, target: str, fields: str) -> list[str]:
    return [smi, "-i", target, f"--query-gpu={fields}", "--format=csv,noheader,nounits"]
