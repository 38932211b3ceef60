"""Encoding time and size of one image per output setting: PNG levels, WebP qualities and methods, JPEG.

    python scripts/bench_encode.py [--size 1024] [--runs 5] [--only png|webp|jpeg]

Two 1024² RGB images: a smooth, photo-like one (large soft shapes, gradients and a little grain,
as a generated image has) and uniform noise (the worst case for every encoder). Each setting is
encoded `--runs` times into memory through `zturbo.imageio.encode_image`, the function every
saved image goes through, metadata included; the median CPU time of the encoding thread is
reported with the file's size (CPU time, not wall time: on a shared machine other processes would
otherwise set the numbers; Pillow's encoders run on the calling thread alone).
"""

from __future__ import annotations

import argparse
import io
import statistics
import time
import zlib
from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image

from zturbo.imageio import encode_image
from zturbo.result import GeneratedImage

_PILLOW = -1  # Pillow's own zlib strategy for PNG
# (label, output format, compression, extra Pillow options): the rows, in the table's order.
SETTINGS: tuple[tuple[str, str, int | None, dict[str, Any]], ...] = (
    *((f"png level {n}", "png", None, {"compress_level": n, "compress_type": _PILLOW}) for n in (0, 1, 3)),
    ("png level 6 (Pillow's default)", "png", None, {"compress_level": 6, "compress_type": _PILLOW}),
    ("png level 1, Z_DEFAULT_STRATEGY", "png", None, {"compress_level": 1, "compress_type": zlib.Z_DEFAULT_STRATEGY}),
    ("png level 1, Z_RLE", "png", None, {"compress_level": 1, "compress_type": zlib.Z_RLE}),
    ("png (zturbo default)", "png", None, {}),
    *((f"webp q75 method {m}", "webp", 75, {"method": m}) for m in range(7)),
    *((f"webp q90 method {m}", "webp", 90, {"method": m}) for m in range(7)),
    ("webp (zturbo default)", "webp", None, {}),
    ("jpeg q90", "jpeg", 90, {}),
    ("jpeg (zturbo default)", "jpeg", None, {}),
)


def smooth_image(size: int, seed: int = 0) -> Image.Image:
    """Soft colour fields and gradients with fine grain: what a denoised photo-like image resembles."""
    rng = np.random.default_rng(seed)
    coarse = rng.random((size // 64, size // 64, 3)).astype(np.float32) * 255
    base = np.asarray(Image.fromarray(coarse.astype(np.uint8)).resize((size, size), Image.Resampling.BICUBIC))
    ramp = np.linspace(-40, 40, size, dtype=np.float32)[None, :, None]
    grain = rng.normal(0, 3, (size, size, 3)).astype(np.float32)
    return Image.fromarray(np.clip(base + ramp + grain, 0, 255).astype(np.uint8))


def noise_image(size: int, seed: int = 1) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def _as_generated(image: Image.Image) -> GeneratedImage:
    meta = {
        "prompt": "a red fox in the snow, golden hour",
        "negative_prompt": "",
        "seed": 42,
        "steps": 8,
        "guidance_scale": 0.0,
        "width": image.width,
        "height": image.height,
        "model": "Tongyi-MAI/Z-Image-Turbo",
        "model_fingerprint": "0" * 64,
        "zturbo_version": "bench",
    }
    return GeneratedImage(image, 42, meta["prompt"], "", meta)


def median_seconds(fn: Callable[[], object], runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.thread_time()
        fn()
        times.append(time.thread_time() - start)
    return statistics.median(times)


def measure(image: GeneratedImage, runs: int, only: str | None) -> list[tuple[str, float, int]]:
    """(label, median seconds, bytes) of every setting (of format `only`, when given)."""
    rows = []
    for label, fmt, compression, options in SETTINGS:
        if only is not None and fmt != only:
            continue

        def encode(fmt: str = fmt, compression: int | None = compression, options: dict = options) -> bytes:
            buffer = io.BytesIO()
            encode_image(image, buffer, output_format=fmt, compression=compression, options=options)
            return buffer.getvalue()

        size = len(encode())
        rows.append((label, median_seconds(encode, runs), size))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--only", choices=("png", "webp", "jpeg"), default=None, help="one format's rows")
    args = parser.parse_args()
    images = {"smooth": smooth_image(args.size), "noise": noise_image(args.size)}
    results = {name: measure(_as_generated(im), args.runs, args.only) for name, im in images.items()}
    print(f"| setting ({args.size}², median of {args.runs}) | smooth CPU ms | smooth KiB | noise CPU ms | noise KiB |")
    print("|---|---:|---:|---:|---:|")
    for (label, t_s, b_s), (_, t_n, b_n) in zip(results["smooth"], results["noise"], strict=True):
        print(f"| {label} | {t_s * 1e3:.0f} | {b_s / 1024:.0f} | {t_n * 1e3:.0f} | {b_n / 1024:.0f} |")


if __name__ == "__main__":
    main()
