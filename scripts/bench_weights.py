#!/usr/bin/env python3
"""A checkpoint's weights onto the GPU: zturbo's staged copy (`loader.StagedCopy`, two pinned
buffers taking turns) against a pageable `.to(device)` per tensor, as the loader read them before.

    python3 scripts/bench_weights.py --model /tmp/zi [--repeats 2]   (prints a table and JSON)

Every tensor of the transformer, text encoder and VAE files is read from its memory-mapped
safetensors file and moved to the GPU, nothing kept; the two ways alternate, after one untimed
pass that fills the page cache (a warm restart's case). Only the copy is timed: the loader's casts
and assignments are the same for both.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import torch

COMPONENTS = ("transformer", "text_encoder", "vae")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a checkpoint directory in the diffusers layout")
    parser.add_argument("--repeats", type=int, default=2, help="timed passes of each way (default 2)")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats {args.repeats}: must be at least 1")
    if not torch.cuda.is_available():
        parser.error("copying weights to a GPU needs a CUDA GPU and none is available")
    from zturbo.loader import resolve_model

    files = checkpoint_files(resolve_model(args.model).path)
    device = torch.device("cuda")
    ways = {"staged": staged(device), "pageable": pageable(device)}
    moved = copy_all(files, ways["pageable"])  # fills the page cache; untimed
    seconds: dict[str, list[float]] = {way: [] for way in ways}
    for _ in range(args.repeats):
        for way, copier in ways.items():
            start = time.perf_counter()
            copy_all(files, copier)
            seconds[way].append(time.perf_counter() - start)
    print(f"{moved / 1e9:.1f} GB in {sum(len(f) for f in files.values())} files, {torch.cuda.get_device_name()}")
    rows = {way: {"median_s": statistics.median(s), "GBps": moved / statistics.median(s) / 1e9, "runs_s": s}
            for way, s in seconds.items()}  # fmt: skip
    for way, row in rows.items():
        print(f"{way:>9}: {row['median_s']:.2f} s, {row['GBps']:.1f} GB/s")
    print(json.dumps({"bytes": moved, "device": torch.cuda.get_device_name(), "rows": rows}))
    return 0


def checkpoint_files(root: Path) -> dict[str, list[Path]]:
    from zturbo.loader import WEIGHT_STEMS, weight_files

    return {name: weight_files(root / name, WEIGHT_STEMS[name]) for name in COMPONENTS}


Copier = Callable[[], AbstractContextManager[Callable[[torch.Tensor], torch.Tensor]]]


def staged(device: torch.device) -> Copier:
    from zturbo.loader import StagedCopy

    return lambda: StagedCopy.to(device)


def pageable(device: torch.device) -> Copier:
    import contextlib

    @contextlib.contextmanager
    def plain() -> Iterator[Callable[[torch.Tensor], torch.Tensor]]:
        yield lambda tensor: tensor.to(device)

    return plain


def copy_all(files: dict[str, list[Path]], copier: Copier) -> int:
    """Move every tensor of `files` to the GPU one component at a time, as the loader does (one
    copier per component); the bytes moved."""
    from zturbo.loader import iter_tensors

    moved = 0
    for paths in files.values():
        with copier() as copy:
            for _, _, tensor in iter_tensors(paths):
                copy(tensor)
                moved += tensor.numel() * tensor.element_size()
        torch.cuda.synchronize()
    return moved


if __name__ == "__main__":
    raise SystemExit(main())
