"""Input images: decoded once at the door, checked, and kept with their file's bytes and sha256.

An `InputImage` is what every door hands `GenerateRequest.create` (the CLI reads a file, the server
decodes an upload, the Python API accepts bytes or a PIL image): decoding, orientation, mode
conversion and the limits happen here, before any expensive work, with errors that name the field
and the file.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from PIL import Image


@dataclass(frozen=True, eq=False)
class InputImage:
    """One input image: the bytes as given (what `sha256` hashes: the metadata records it, a job
    stores the bytes) and the decoded pixels.

    `image` has EXIF orientation applied and is RGB, RGBA (alpha kept: it may be asked to serve as
    the mask) or L (grayscale, for masks); palette, 16-bit, CMYK and other modes are converted.
    """

    data: bytes
    sha256: str
    image: Image.Image
    name: str  # where it came from, for messages: a file path, "the uploaded image", ...

    @property
    def size(self) -> tuple[int, int]:
        return self.image.size

    @property
    def has_alpha(self) -> bool:
        return self.image.mode == "RGBA"


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def decode_image(data: bytes, field: str, name: str) -> InputImage:
    """Decode an image file's bytes; FieldError(field) naming `name` when it is not an image Pillow
    reads (truncated, corrupt, unknown format), or it has more pixels than LIMITS.input_pixels
    (checked from the header, before decoding: a decompression bomb never decodes)."""
    raise NotImplementedError  # inputs helper


def read_image(path: str | Path, field: str) -> InputImage:
    """`decode_image` of a file; a missing or unreadable file is a FieldError naming the path."""
    raise NotImplementedError  # inputs helper


def from_pil(image: Image.Image, field: str, name: str = "the given image") -> InputImage:
    """A PIL image given to the Python API: stored as PNG (lossless; its bytes are what is hashed)."""
    raise NotImplementedError  # inputs helper
