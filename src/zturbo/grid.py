"""Contact sheets: one PNG of many images, each labelled with its seed."""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

GRID_KEY = "zturbo-grid"
_PAD = 4


def seed_label(meta: dict[str, Any]) -> str:
    """`seed 42`, with the variation seed and strength when one shaped the image."""
    label = f"seed {meta['seed']}"
    if meta.get("variation_seed") is not None and meta.get("variation_strength"):
        label += f" ~{meta['variation_seed']}@{meta['variation_strength']:g}"
    if meta.get("variety"):
        label += f" v{meta['variety']:g}"
    return label


def contact_sheet(cells: Sequence[tuple[Any, str]], columns: int | None = None) -> Any:
    """(PIL image, label) pairs -> one RGB image: a near-square grid, each label in a strip below its cell."""
    from PIL import Image, ImageDraw, ImageFont

    if not cells:
        raise ValueError("a contact sheet needs at least one image")
    font = ImageFont.load_default()
    columns = columns or math.ceil(math.sqrt(len(cells)))
    rows = math.ceil(len(cells) / columns)
    # Wide enough for the longest label, so small images keep their labels apart.
    cell_w = max(max(im.width for im, _ in cells), max(int(font.getlength(label)) for _, label in cells) + _PAD)
    cell_h = max(im.height for im, _ in cells)
    text_h = max(font.getbbox(label)[3] for _, label in cells) + 2 * _PAD
    sheet = Image.new("RGB", (columns * cell_w + (columns + 1) * _PAD, rows * (cell_h + text_h) + _PAD), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (image, label) in enumerate(cells):
        x = _PAD + (i % columns) * (cell_w + _PAD)
        y = _PAD + (i // columns) * (cell_h + text_h)
        sheet.paste(image.convert("RGB"), (x, y))
        draw.text((x, y + cell_h + _PAD // 2), label, fill="black", font=font)
    return sheet


def write_grid(paths: Sequence[Path], target: Path) -> Path:
    """A contact sheet of the zturbo PNGs at `paths`, written atomically to `target` (replacing it).

    The sheet records only the images it shows (a `zturbo-grid` text chunk), not parameters.
    """
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    from .imageio import read_metadata

    cells = []
    for path in paths:
        with Image.open(path) as im:
            im.load()
            cells.append((im.copy(), seed_label(read_metadata(path))))
    info = PngInfo()
    names = [os.path.relpath(p, target.parent) for p in paths]
    info.add_text(GRID_KEY, json.dumps({"images": names}, ensure_ascii=False))
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            contact_sheet(cells).save(f, format="PNG", pnginfo=info)
        os.replace(tmp, target)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return target
