"""The speed results as written: bench.json (everything) and bench.md (one table and the notes)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .speed import PHASES


def write(res: dict[str, Any], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench.json").write_text(json.dumps(res, indent=2, default=str) + "\n")
    (out_dir / "bench.md").write_text(markdown(res) + "\n")


def markdown(res: dict[str, Any]) -> str:
    """One row per (mode, size): seconds per image, the eager reference beside it, peak memory;
    then one line per phase note (batch, warm-up, encoder graphs, failures)."""
    return "\n".join([*table(res), "", *notes(res)])


def table(res: dict[str, Any]) -> list[str]:
    reference = res.get("eager", {}).get("reference", {})
    lines = [
        "| mode | size | zturbo s/img | reference eager s/img | speedup | zturbo peak GiB | latent rel. err "
        "| SM MHz (power-capped) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for mode, sizes in _modes(res):
        err = res.get(mode, {}).get("latent_rel_err_vs_eager")
        if mode != "eager" and res.get(mode, {}).get("vae_compiled") is False:
            mode += " (eager VAE)"
        for size, t in sizes.items():
            ref = reference.get(size)
            ref_s = f"{ref['median_s']:.3f}" if ref else "-"
            speedup = f"{ref['median_s'] / t['median_s']:.2f}x" if ref else "-"
            peak = f"{t['peak_gib']:.1f}" if t.get("peak_gib") is not None else "-"
            lines.append(
                f"| {mode} | {size}² | {t['median_s']:.3f} | {ref_s} | {speedup} | {peak} | "
                f"{'-' if err is None else f'{err:.2e}'} | {clock_cell(t.get('gpu_clocks'))} |"
            )
    return lines


def notes(res: dict[str, Any]) -> list[str]:
    lines = []
    for mode in ("eager", *PHASES):
        lines += phase_notes(mode, res.get(mode, {}), res.get("options", {}).get("batch"))
    if "reference_compiled" in res:
        rc = res["reference_compiled"]
        lines.append(
            f"- reference compile_repeated_blocks: {rc['median_s']:.3f} s/img (first call {rc['first_call_s']:.1f} s)"
        )
    if "png_encode_s" in res:
        lines.append(f"- PNG encoding (not in the times above): {res['png_encode_s'] * 1000:.0f} ms")
    return lines


def phase_notes(mode: str, phase: dict[str, Any], batch_size: int | None) -> list[str]:
    lines = []
    if "error" in phase:
        lines.append(f"- {mode} FAILED: {phase['error'][:300]}")
    if "batch" in phase:
        lines.append(f"- {mode} batch {batch_size}: {phase['batch']['images_per_s']:.2f} images/s")
    if "warmup_s" in phase:
        lines.append(f"- {mode} warm-up (compile) {phase['warmup_s']:.1f} s")
    if "encode" in phase:
        enc = phase["encode"]
        lines.append(
            f"- {mode} text encoder: {enc['graphs']['median_s'] * 1000:.1f} ms with CUDA graphs, "
            f"{enc['plain']['median_s'] * 1000:.1f} ms without (rel. diff {enc['rel_diff']:.1e})"
        )
    if "cached_prompt" in phase:
        lines.append(f"- {mode} repeated prompt (text encoder skipped): {phase['cached_prompt']['median_s']:.3f} s")
    return lines


def clock_cell(clocks: dict[str, Any] | None) -> str:
    """'1530 (100 %)': the median SM clock and the share of samples with the power cap active."""
    if not clocks:
        return "-"
    return f"{clocks['sm_mhz_median']:.0f} ({clocks['power_capped_share']:.0%})".replace("%", " %")


def _modes(res: dict[str, Any]) -> Iterator[tuple[str, dict[Any, Any]]]:
    if "eager" in res:
        yield "eager", res["eager"]["zturbo"]
    for mode in PHASES:
        if res.get(mode, {}).get("sizes"):
            yield mode, res[mode]["sizes"]
