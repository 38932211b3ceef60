"""Encoding time and size of one image per output setting: PNG writers, WebP qualities and methods, JPEG.

    python scripts/bench_encode.py [--size 1024] [--runs 5] [--only png|webp|jpeg] [--image PATH ...]

Two 1024² RGB images: a smooth, photo-like one (large soft shapes, gradients and a little grain,
as a generated image has) and uniform noise (the worst case for every encoder); each `--image`
adds a file of your own (a generated image, a photo). Each setting encodes `--runs` times into memory,
metadata included: the zturbo default rows and Pillow's rows through `zturbo.imageio.encode_image`,
the function every saved image goes through (`options` make it use Pillow), and the other rows of
zturbo's PNG writer (`zturbo.pngwrite`) with one setting changed. Reported: the median wall time,
the median CPU time of the whole process (every thread: zturbo's PNG writer deflates row bands on
several threads, Pillow's encoders run on the calling thread alone) and the file's size. On a
machine with other load the wall times vary more than the CPU times.
"""

from __future__ import annotations

import argparse
import io
import statistics
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from zturbo.imageio import PNG_LEVEL, PNG_STRATEGY, encode_image, png_chunks, png_writer
from zturbo.pngwrite import Filter, PngWriter
from zturbo.result import GeneratedImage

_PILLOW = -1  # Pillow's own zlib strategy for PNG
# (label, output format, compression, extra Pillow options): the rows through `encode_image`, in the table's order.
SETTINGS: tuple[tuple[str, str, int | None, dict[str, Any]], ...] = (
    *((f"png, Pillow level {n}", "png", None, {"compress_level": n, "compress_type": _PILLOW}) for n in (0, 1, 3)),
    ("png, Pillow level 6 (Pillow's default)", "png", None, {"compress_level": 6, "compress_type": _PILLOW}),
    (
        "png, Pillow level 1, Z_DEFAULT_STRATEGY",
        "png",
        None,
        {"compress_level": 1, "compress_type": zlib.Z_DEFAULT_STRATEGY},
    ),
    ("png, Pillow level 1, Z_RLE", "png", None, {"compress_level": 1, "compress_type": zlib.Z_RLE}),
    ("png (zturbo default: its PNG writer)", "png", None, {}),
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


Encode = Callable[[GeneratedImage], bytes]


def through_encode_image(fmt: str, compression: int | None, options: dict[str, Any]) -> Encode:
    def encode(image: GeneratedImage) -> bytes:
        buffer = io.BytesIO()
        encode_image(image, buffer, output_format=fmt, compression=compression, options=options)
        return buffer.getvalue()

    return encode


def through_writer(writer: PngWriter) -> Encode:
    def encode(image: GeneratedImage) -> bytes:
        buffer = io.BytesIO()
        writer.write(buffer, image.image, png_chunks(image.metadata))
        return buffer.getvalue()

    return encode


def rows(writers: dict[str, PngWriter], only: str | None) -> list[tuple[str, Encode]]:
    """(label, encoder) of every setting (of format `only`, when given), in the table's order: the
    PNG writer's variants follow zturbo's default PNG row."""
    out = []
    for label, fmt, compression, options in SETTINGS:
        if only not in (None, fmt):
            continue
        out.append((label, through_encode_image(fmt, compression, options)))
        if fmt == "png" and not options:
            out += [(name, through_writer(writer)) for name, writer in writers.items()]
    return out


def writer_variants() -> dict[str, PngWriter]:
    """zturbo's PNG writer with one setting changed from its default: one thread, or another filter."""
    settings = {"level": PNG_LEVEL, "strategy": PNG_STRATEGY}
    out = {"png, zturbo writer, Paeth, 1 thread": PngWriter(**settings, threads=1)}
    for kind in (Filter.NONE, Filter.SUB, Filter.UP, Filter.AVERAGE):
        out[f"png, zturbo writer, {kind.name.lower()} filter"] = PngWriter(**settings, filter=kind)
    return out


def measure(encode: Encode, image: GeneratedImage, runs: int) -> tuple[float, float, int]:
    """Median wall seconds, median process CPU seconds and the file's bytes of one setting."""
    size = len(encode(image))  # untimed: the first call starts a writer's threads
    walls, cpus = [], []
    for _ in range(runs):
        wall, cpu = time.perf_counter(), time.process_time()
        encode(image)
        cpus.append(time.process_time() - cpu)
        walls.append(time.perf_counter() - wall)
    return statistics.median(walls), statistics.median(cpus), size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--only", choices=("png", "webp", "jpeg"), default=None, help="one format's rows")
    parser.add_argument("--image", type=Path, action="append", default=[], help="also this image file (as RGB)")
    args = parser.parse_args()
    images = {"smooth": smooth_image(args.size), "noise": noise_image(args.size)}
    for path in args.image:
        with Image.open(path) as im:
            images[path.name] = im.convert("RGB")
    generated = {name: _as_generated(im) for name, im in images.items()}
    writers = writer_variants()
    try:
        table = [
            (label, [measure(encode, im, args.runs) for im in generated.values()])
            for label, encode in rows(writers, args.only)
        ]
    finally:
        for writer in writers.values():
            writer.close()
    print(f"zturbo's PNG writer: Paeth filter, {png_writer().threads} threads (one row band each)\n")
    header = "".join(f" {name} wall ms | {name} CPU ms | {name} KiB |" for name in images)
    print(f"| setting ({args.size}², median of {args.runs}) |{header}")
    print("|---|" + "---:|" * (3 * len(images)))
    for label, cells in table:
        print(f"| {label} |" + "".join(f" {w * 1e3:.1f} | {c * 1e3:.1f} | {b / 1024:.0f} |" for w, c, b in cells))


if __name__ == "__main__":
    main()
