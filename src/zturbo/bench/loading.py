"""`zturbo bench --loading DIR`: host memory and time while loading a checkpoint, zturbo vs diffusers.

`--write-checkpoint DIR` first writes the real architecture with random weights in the published
layout (float32 transformer shards, bf16 text encoder shards; about 33 GB). Each load then runs
in a fresh process, after dropping the page cache where the system allows it (root on Linux),
and reports the peak growth of anonymous resident memory (`RssAnon`: what the load copies; the
mmap'd safetensors pages are file-backed and not in it), the peak total RSS (`VmHWM`), and the
wall time until the weights are on the GPU.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

GIB = 2**30
KINDS = ("zturbo", "diffusers")


def proc_status(field: str) -> int | None:
    """A `/proc/self/status` memory field in bytes (Linux), else None."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class PeakSampler:
    """Samples `RssAnon` every `interval` seconds in a thread; `peak - baseline` after the block."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.baseline = self.peak = 0
        self._stop = threading.Event()

    def __enter__(self) -> PeakSampler:
        self.baseline = self.peak = proc_status("RssAnon") or 0
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def _sample(self) -> None:
        self.peak = max(self.peak, proc_status("RssAnon") or 0)


def write_checkpoint(root: Path, device: torch.device) -> Path:
    """Random real-size weights in the published layout (built on `device`, saved from the CPU)."""
    from .. import tiny
    from .common import random_components

    c = random_components(device, torch.bfloat16, tiny=device.type == "cpu")
    for module in (c.transformer, c.vae, c.text_encoder):
        module.to("cpu")
    return tiny.save_checkpoint(root, c.transformer, c.vae, c.text_encoder, c.tokenizer)


def load_row(kind: str, root: Path, device: torch.device) -> dict[str, Any]:
    """Runs in its own process: one load, measured from after the imports (the process baseline)."""
    import diffusers  # noqa: F401  (imported before the baseline: libraries are not the load)
    import transformers  # noqa: F401
    from diffusers import AutoencoderKL, ZImagePipeline, ZImageTransformer2DModel  # noqa: F401

    from ..config import RuntimeConfig
    from ..engine import Engine

    with PeakSampler() as sampler:
        start = time.perf_counter()
        if kind == "zturbo":
            config = RuntimeConfig(model=str(root), device=str(device), dtype="bfloat16", compile="off")
            Engine.load(config, warmup=False)
        else:
            device_map = "cuda" if device.type == "cuda" else None
            ZImagePipeline.from_pretrained(root, torch_dtype=torch.bfloat16, device_map=device_map)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
    return {
        "kind": kind,
        "seconds": seconds,
        "rss_anon_growth_gib": (sampler.peak - sampler.baseline) / GIB,
        "vm_hwm_gib": (proc_status("VmHWM") or 0) / GIB,
    }


def drop_page_cache() -> bool:
    """Empty the page cache so each load reads from disk; False where not allowed."""
    try:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except (OSError, subprocess.CalledProcessError):
        return False


def run_loading(root: Path, tiny: bool, repeats: int) -> list[dict[str, Any]]:
    """Each load in a fresh `python -m zturbo.cli bench --load-row ...` process, alternating loaders."""
    rows = []
    for _ in range(repeats):
        for kind in KINDS:
            cold = not tiny and drop_page_cache()  # the smoke test leaves the host's cache alone
            cmd = [sys.executable, "-m", "zturbo.cli", "bench", "--load-row", kind, "--loading", str(root)]
            cmd += ["--tiny"] if tiny else []
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
            row = json.loads(lines[-1]) if lines else {"kind": kind, "error": proc.stderr[-2000:]}
            rows.append(row | {"cold_page_cache": cold})
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| loader | page cache | seconds | RssAnon growth | peak RSS (VmHWM) |", "|---|---|---|---|---|"]
    for r in rows:
        cache = "cold" if r.get("cold_page_cache") else "warm"
        if "error" in r:
            lines.append(f"| {r['kind']} | {cache} | FAILED: {str(r['error'])[-100:]} | - | - |")
            continue
        lines.append(
            f"| {r['kind']} | {cache} | {r['seconds']:.1f} | {r['rss_anon_growth_gib']:.2f} GiB | "
            f"{r['vm_hwm_gib']:.2f} GiB |"
        )
    return "\n".join(lines)
