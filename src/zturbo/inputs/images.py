"""Input images: decoded once at the door, checked, and kept with their file's bytes and sha256.

An `InputImage` is what every door hands `GenerateRequest.create` (the CLI reads a file, the server
decodes an upload, the Python API accepts bytes or a PIL image): decoding, orientation, mode
conversion and the limits happen here, before any expensive work, with errors that name the field
and the file.
"""

from __future__ import annotations

import hashlib
import io
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import FieldError

if TYPE_CHECKING:  # Pillow and numpy load when an image is decoded: `import zturbo.request` stays light
    from PIL import Image

MAX_INPUT_PIXELS = 8192 * 8192  # `request.LIMITS.input_pixels` (defined here, below the request layer)
MAX_INPUT_BYTES = 64 << 20  # `request.LIMITS.input_bytes`
# A mask's alpha below this repaints (transparent repaints, as OpenAI's images.edit); at or above it keeps.
OPAQUE_FROM = 128
# A mask's grey level at or above this repaints: `prepare.binarize`'s value / 255 >= 0.5 (diffusers' rule).
REPAINT_FROM = 128
_PILLOW_SAYS = 160  # characters of Pillow's own message kept in ours
# What Pillow raises on a file it cannot decode: broken headers (SyntaxError), truncated or corrupt
# data (OSError), bad chunks or sizes (ValueError, EOFError).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError)


@dataclass(frozen=True, eq=False)
class InputImage:
    """One input image: the bytes as given (what `sha256` hashes: the metadata records it, a job
    stores the bytes) and the decoded pixels. A PIL image given to the Python API has no bytes
    (`data` is empty): its `sha256` hashes its mode, size and pixels (`pixels_sha256`).

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


def decode_image(
    data: bytes, field: str, name: str, *, max_pixels: int = MAX_INPUT_PIXELS, max_bytes: int = MAX_INPUT_BYTES
) -> InputImage:
    """Decode an image file's bytes; FieldError(field) naming `name` when it is empty, larger than
    `max_bytes`, not an image Pillow reads (truncated, corrupt, unknown format), animated, or it has
    more pixels than `max_pixels` (checked from the header, before decoding: a decompression bomb
    never decodes).

    The pixels have EXIF orientation applied and one of three modes (`normal_mode`): RGB, RGBA
    (only when some pixel is not fully opaque) or L.
    """
    data = bytes(data)
    if not data:
        raise FieldError(field, f"{field} {name} is empty (0 bytes); give an image file (PNG, JPEG, WebP, ...)")
    if len(data) > max_bytes:
        raise FieldError(field, f"{field} {name} is {len(data)} bytes; allowed at most {max_bytes}")
    image = _open_checked(data, field, name, max_pixels)
    return InputImage(data=data, sha256=sha256_of(data), image=image, name=name)


def read_image(path: str | Path, field: str) -> InputImage:
    """`decode_image` of a file; a missing, unreadable or too large file is a FieldError naming the path."""
    name = str(path)
    file = Path(path)
    try:
        if file.is_dir():
            raise FieldError(field, f"{field} {name} is a directory, not an image file")
        size = file.stat().st_size
        if size > MAX_INPUT_BYTES:
            raise FieldError(field, f"{field} {name} is {size} bytes; allowed at most {MAX_INPUT_BYTES}")
        data = file.read_bytes()
    except FileNotFoundError:
        raise FieldError(field, f"{field} {name}: no such file") from None
    except OSError as e:
        raise FieldError(field, f"{field} {name} cannot be read: {e.strerror or e}") from None
    return decode_image(data, field, name)


def from_pil(image: Image.Image, field: str, name: str = "the given image") -> InputImage:
    """A PIL image given to the Python API: checked, EXIF orientation and the mode rule applied,
    hashed by its pixels. Encoding it (as PNG, say) to hash file bytes would cost more than
    denoising half the steps at 1024², and the same pixels always give the same hash either way."""
    from PIL import Image, ImageOps

    if not isinstance(image, Image.Image):
        raise FieldError(field, f"{field} must be a PIL image; got {type(image).__name__}")
    _check_pixels(image.size, field, name, MAX_INPUT_PIXELS)
    _check_still(image, field, name)
    try:
        pixels = normal_mode(ImageOps.exif_transpose(image))
        pixels.load()
    except _DECODE_ERRORS as e:
        raise FieldError(field, f"{field} {name} cannot be read: {_pillow_says(e)}") from None
    pixels.info = {}  # not part of the pixels (an ICC profile, text, dpi)
    return InputImage(data=b"", sha256=pixels_sha256(pixels), image=pixels, name=name)


def pixels_sha256(image: Image.Image) -> str:
    """sha256 of an image's mode, size and raw pixels: the same pixels always give the same hash."""
    digest = hashlib.sha256(f"{image.mode} {image.width}x{image.height}\n".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


def _open_checked(data: bytes, field: str, name: str, max_pixels: int) -> Image.Image:
    """Open (the header only), check the size and frames, then decode, orient and normalise the mode."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    with warnings.catch_warnings():
        # Pillow warns above its own limit and raises above twice it; both become our refusal,
        # without touching its module-wide MAX_IMAGE_PIXELS (the filter lasts for this block only).
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
            _check_pixels(image.size, field, name, max_pixels)
            _check_still(image, field, name)
            image.load()
            return normal_mode(ImageOps.exif_transpose(image))
        except FieldError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            found = re.search(r"\((\d+) pixels\)", str(e))
            count = found.group(1) if found else "more"
            raise FieldError(field, f"{field} {name} is {count} pixels; allowed at most {max_pixels}") from None
        except UnidentifiedImageError:
            raise FieldError(
                field,
                f"{field} {name} is not an image Pillow can read (an unknown format or a damaged header); give a PNG, "
                "JPEG, WebP, GIF, BMP or TIFF file",
            ) from None
        except _DECODE_ERRORS as e:
            raise FieldError(field, f"{field} {name} is damaged or truncated: {_pillow_says(e)}") from None


def repaint_map(mask: Image.Image, from_alpha: bool) -> Image.Image:
    """A mask as an L image, 255 where it repaints: by its alpha (transparent repaints) when
    `from_alpha` (an init image's alpha) or it has alpha; else by its luminance (white repaints)."""
    if from_alpha or mask.mode == "RGBA":
        return mask.getchannel("A").point(lambda a: 255 if a < OPAQUE_FROM else 0)
    return mask.convert("L")  # ITU-R 601 luma, as diffusers' mask processor converts


def repaints_nothing(mask: Image.Image, from_alpha: bool) -> bool:
    """Whether a decoded mask repaints no pixel: the door's check, at the mask's own size, so an
    inpaint that would run every step and change nothing is refused before any work. Resizing
    (bilinear) never raises the brightest value and padding adds 0, so such a mask stays empty."""
    if from_alpha and mask.mode != "RGBA":
        return True  # `normal_mode` keeps alpha only when some pixel is not fully opaque
    return repaint_map(mask, from_alpha).getextrema()[1] < REPAINT_FROM


def _check_pixels(size: tuple[int, int], field: str, name: str, max_pixels: int) -> None:
    width, height = size
    if width * height > max_pixels:
        raise FieldError(
            field, f"{field} {name} is {width}x{height} = {width * height} pixels; allowed at most {max_pixels}"
        )
    if width < 1 or height < 1:
        raise FieldError(field, f"{field} {name} is {width}x{height}: it has no pixels")


def _check_still(image: Image.Image, field: str, name: str) -> None:
    # A camera's MPO file holds the photo and its previews or depth maps as "frames": the first is
    # the photo, so it counts as a still image.
    if getattr(image, "is_animated", False) and image.format != "MPO":
        raise FieldError(field, f"{field} {name} is animated ({image.n_frames} frames); give a still image")


def _pillow_says(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= _PILLOW_SAYS else text[: _PILLOW_SAYS - 3] + "..."


def normal_mode(image: Image.Image) -> Image.Image:
    """The pixels in RGB, RGBA or L, by one rule:

    - RGB and L stay; 1 (bilevel) becomes L (0 or 255);
    - anything with transparency (RGBA, LA, PA, premultiplied RGBa/La, a palette or a colour key
      with transparency) becomes RGBA if some pixel is not fully opaque, else RGB (L for LA/La);
    - a palette without transparency becomes RGB;
    - 16-bit grayscale (I;16, I;16B, I;16L, I;16N) and 32-bit integer (I) are read as 0..65535 and
      scaled to L by value / 257 (rounded; I outside 0..65535 is clipped);
    - float (F) is read as 0..1 and scaled to L by value x 255 (rounded, clipped);
    - LAB becomes RGB through an sRGB transform; CMYK, YCbCr, HSV and other colour modes become RGB.
    """
    mode = image.mode
    if mode in ("RGB", "L") and "transparency" not in image.info:
        return image
    if mode == "1":
        return image.convert("L")
    if mode.startswith("I") or mode == "F":
        return _deep_to_l(image)
    if mode == "LAB":
        return _lab_to_rgb(image)
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info or _palette_has_alpha(image):
        return _drop_opaque_alpha(image)
    return image.convert("RGB")


def _palette_has_alpha(image: Image.Image) -> bool:
    return image.mode == "P" and image.palette is not None and image.palette.mode == "RGBA"


def _drop_opaque_alpha(image: Image.Image) -> Image.Image:
    gray = image.mode in ("LA", "La") or (image.mode == "L" and "transparency" in image.info)
    rgba = (image.convert("LA") if image.mode == "La" else image).convert("RGBA")  # Pillow has no La -> RGBA
    lowest_alpha = rgba.getchannel("A").getextrema()[0]
    if lowest_alpha < 255:
        return rgba
    return rgba.convert("L") if gray else rgba.convert("RGB")


def _deep_to_l(image: Image.Image) -> Image.Image:
    """16-bit, 32-bit integer and float grayscale -> 8-bit L, scaled (see `normal_mode`)."""
    import numpy as np
    from PIL import Image

    values = np.asarray(image).astype(np.float64)
    scaled = values * 255.0 if image.mode == "F" else values / 257.0
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8))


def _lab_to_rgb(image: Image.Image) -> Image.Image:
    from PIL import ImageCms

    transform = ImageCms.buildTransform(ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB"), "LAB", "RGB")
    return ImageCms.applyTransform(image, transform)
