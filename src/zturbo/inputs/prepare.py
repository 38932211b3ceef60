"""The pixel work before the model sees input images: fitting each to its target size, masks,
outpaint canvases, control preprocessing, and the paste-back after decoding.

`prepare` turns a validated `ImageInputs` into tensors at the canvas size; the engine encodes them.
For an input already at its target size the numbers are exactly those of diffusers 0.42.1's
`VaeImageProcessor.preprocess` (the image: RGB / 255 x 2 - 1; the mask: grayscale / 255,
binarized at 0.5), so zturbo and diffusers' Z-Image pipelines see identical inputs.

Targets: the init image's is the canvas less the outpaint margins, the mask's the same as the
image's, the control image's the canvas. An input of another size is fitted by `resize`:
- crop: scaled to cover the target (Lanczos), then centre-cropped;
- fit: scaled to fit inside it, then padded centred (images by edge replication, masks with 0:
  the padding is kept, not repainted);
- stretch: scaled to the target, the aspect ratio ignored.
A mask is fitted with the same geometry (bilinear on its 0..255 map, then binarized again).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps

from .images import InputImage, repaint_map
from .spec import ImageInputs

# cv2.Canny's hysteresis thresholds for control_type "canny": those of the canny preprocessor the
# Fun-ControlNet-Union was trained with (controlnet_aux's CannyDetector defaults).
CANNY_LOW, CANNY_HIGH = 100, 200
# An RGBA init image is flattened onto white (what a viewer shows behind it); an RGBA control
# image onto black, where control maps (pose, depth, edges) carry no signal.
IMAGE_BACKGROUND = (255, 255, 255)
CONTROL_BACKGROUND = (0, 0, 0)

Padding = tuple[int, int, int, int]  # top, bottom, left, right pixels
NO_PADDING: Padding = (0, 0, 0, 0)


@dataclass(frozen=True)
class PasteBack:
    """What `paste_back` needs: out = original x (1 - alpha) + generated x alpha."""

    original: torch.Tensor  # (H, W, 3) uint8: the input image on the canvas (outpaint: alpha is 1 on the new area)
    alpha: torch.Tensor  # (H, W, 1) float32 in [0, 1]: 1 takes the generated pixel; 0 outside the (padded) mask


@dataclass(frozen=True)
class Prepared:
    """A request's input images as the model's stages take them, at the canvas size (H, W)."""

    image: torch.Tensor | None  # (1, 3, H, W) float32 in [-1, 1]: the init image on the canvas
    mask: torch.Tensor | None  # (1, 1, H, W) float32 in {0, 1}: 1 repaints (padding and outpaint applied)
    control: torch.Tensor | None  # (1, 3, H, W) float32 in [-1, 1]: the control image (canny applied)
    paste: PasteBack | None  # with paste_back


def prepare(inputs: ImageInputs, width: int, height: int) -> Prepared:
    """The inputs fitted to the canvas (width x height) and converted (see the module's docstring)."""
    canvas = (width, height)
    pixels = mask = None
    if inputs.image is not None:
        pixels, mask = _image_and_mask(inputs.image, inputs, canvas)
    control = _control_pixels(inputs.control_image, inputs, canvas) if inputs.control_image is not None else None
    paste = None
    if inputs.paste_back:
        if pixels is None or mask is None:
            raise ValueError("paste_back needs an image and a mask (check_inputs refuses this request)")
        paste = _paste(pixels, mask, inputs)
    return Prepared(
        image=None if pixels is None else image_tensor(pixels),
        mask=None if mask is None else torch.from_numpy(mask.astype(np.float32))[None, None],
        control=None if control is None else image_tensor(control),
        paste=paste,
    )


def paste_back(pixels: torch.Tensor, paste: PasteBack) -> torch.Tensor:
    """(B, H, W, 3) uint8 generated images -> the same with the input's pixels put back where alpha
    is below 1: round(original x (1 - alpha) + generated x alpha). Where alpha is 0 the result is
    the original, bit for bit (x 1 + x 0 is exact in float32)."""
    if pixels.dtype != torch.uint8 or pixels.ndim != 4 or tuple(pixels.shape[1:]) != tuple(paste.original.shape):
        raise ValueError(
            f"paste_back takes (B, {', '.join(map(str, paste.original.shape))}) uint8 pixels; "
            f"got {tuple(pixels.shape)} {pixels.dtype}"
        )
    original = paste.original.to(pixels.device, torch.float32)
    alpha = paste.alpha.to(pixels.device, torch.float32)
    blended = original * (1.0 - alpha) + pixels.to(torch.float32) * alpha
    return blended.round_().clamp_(0, 255).to(torch.uint8)


def image_tensor(pixels: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (1, 3, H, W) float32 in [-1, 1], by diffusers' own arithmetic
    (`pil_to_numpy`, `numpy_to_pt`, `normalize`), so the values are bit-identical to its."""
    unit = torch.from_numpy(pixels.astype(np.float32) / 255.0)
    return (2.0 * unit.permute(2, 0, 1).unsqueeze(0) - 1.0).contiguous()


def _image_and_mask(
    image: InputImage, inputs: ImageInputs, canvas: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray | None]:
    """The init image on the canvas (uint8 RGB) and the repaint mask (bool), padding applied."""
    left, right, top, bottom = inputs.outpaint or NO_PADDING
    target = (canvas[0] - left - right, canvas[1] - top - bottom)
    # With its alpha as the mask, the image's colours under it are kept as they are (they are repainted).
    rgb = image.image.convert("RGB") if inputs.mask_from_alpha else _flatten(image.image, IMAGE_BACKGROUND)
    scaled, pad = _fit(rgb, target, inputs.resize, Image.Resampling.LANCZOS)
    pixels = _pad(scaled, pad, replicate=True)
    mask = None
    repaint = _repaint_map(image, inputs)
    if repaint is not None:
        scaled_mask, pad = _fit(repaint, target, inputs.resize, Image.Resampling.BILINEAR)
        mask = binarize(_pad(scaled_mask, pad, replicate=False))
    if inputs.outpaint is not None:
        pixels = _pad(pixels, (top, bottom, left, right), replicate=True)
        mask = outpaint_area(canvas, inputs.outpaint)
    if mask is not None:
        mask = dilate(mask, inputs.mask_padding)
    return pixels, mask


def _control_pixels(control: InputImage, inputs: ImageInputs, canvas: tuple[int, int]) -> np.ndarray:
    """The control image on the canvas (uint8 RGB); canny edges when asked (the padding of `fit`
    then has no edges: it is added after the edges are found)."""
    rgb = _flatten(control.image, CONTROL_BACKGROUND)
    scaled, pad = _fit(rgb, canvas, inputs.resize, Image.Resampling.LANCZOS)
    if inputs.control_type == "canny":
        return _pad(canny(scaled), pad, replicate=False)
    return _pad(scaled, pad, replicate=True)


def _paste(pixels: np.ndarray, mask: np.ndarray, inputs: ImageInputs) -> PasteBack:
    alpha = feather(mask, inputs.mask_blur)
    if inputs.outpaint is not None:
        alpha[outpaint_area(mask.shape[::-1], inputs.outpaint)] = 1.0  # nothing of the input to keep there
    return PasteBack(original=torch.from_numpy(pixels.copy()), alpha=torch.from_numpy(alpha)[..., None])


def _flatten(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """RGB: an RGBA image composited onto `background`, an L image as three equal channels."""
    if image.mode == "RGBA":
        return Image.alpha_composite(Image.new("RGBA", image.size, (*background, 255)), image).convert("RGB")
    return image.convert("RGB")


def _repaint_map(image: InputImage, inputs: ImageInputs) -> Image.Image | None:
    """The mask as an L image, 255 where it repaints: a mask with alpha (or the init image's alpha
    with mask_from_alpha) repaints where transparent; a mask without alpha where its luminance is
    high (white repaints)."""
    if inputs.mask_from_alpha:
        return repaint_map(image.image, from_alpha=True)
    if inputs.mask is None:
        return None
    return repaint_map(inputs.mask.image, from_alpha=False)


def binarize(gray: np.ndarray) -> np.ndarray:
    """A 0..255 mask map -> bool, diffusers' rule: value / 255 >= 0.5 repaints (128 and up:
    `images.REPAINT_FROM`, which the door's `repaints_nothing` uses)."""
    return gray.astype(np.float32) / 255.0 >= 0.5


def _fit(image: Image.Image, target: tuple[int, int], resize: str | None, resample: int) -> tuple[np.ndarray, Padding]:
    """The image scaled to `target` by `resize`, as an array, and the padding `fit` still needs."""
    if image.size == target:
        return np.array(image), NO_PADDING
    if resize == "stretch":
        return np.array(image.resize(target, resample)), NO_PADDING
    if resize == "crop":
        return np.array(ImageOps.fit(image, target, method=resample)), NO_PADDING
    if resize == "fit":
        inner = ImageOps.contain(image, target, method=resample)
        left, top = (target[0] - inner.width) // 2, (target[1] - inner.height) // 2
        pad = (top, target[1] - inner.height - top, left, target[0] - inner.width - left)
        return np.array(inner), pad
    raise ValueError(f"an input of {image.size} needs resize to reach {target} (check_inputs refuses this request)")


def _pad(pixels: np.ndarray, pad: Padding, replicate: bool) -> np.ndarray:
    if pad == NO_PADDING:
        return pixels
    import cv2  # loaded where used: plain images and masks never need OpenCV

    border = cv2.BORDER_REPLICATE if replicate else cv2.BORDER_CONSTANT
    return cv2.copyMakeBorder(pixels, *pad, border, value=0)


def outpaint_area(canvas: tuple[int, int], outpaint: tuple[int, int, int, int]) -> np.ndarray:
    """(H, W) bool: True on the canvas outside the original image (placed at left, top)."""
    left, right, top, bottom = outpaint
    area = np.ones((canvas[1], canvas[0]), dtype=bool)
    area[top : canvas[1] - bottom, left : canvas[0] - right] = False
    return area


def dilate(mask: np.ndarray, pixels: int) -> np.ndarray:
    """The mask grown by `pixels`: every pixel within that Euclidean distance of the mask. A
    distance transform (OpenCV, exact L2) costs the same for any amount, where a dilation with an
    elliptic kernel of 2 x 1024 + 1 pixels takes minutes."""
    if pixels == 0 or not mask.any():
        return mask
    outside = (~mask).astype(np.uint8)
    import cv2

    distance = cv2.distanceTransform(outside, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    return distance <= pixels


def feather(mask: np.ndarray, blur: int) -> np.ndarray:
    """(H, W) float32 paste-back alpha: the mask times its Gaussian blur (sigma `blur` pixels), so
    the seam fades inside the mask and alpha is exactly 0 outside it; blur 0 is the hard mask.

    Pillow's Gaussian blur (extended box filters) costs the same for any sigma; OpenCV's exact
    kernel takes seconds at sigma 64. Its 8-bit result quantizes alpha to 1/255, below one output level.
    """
    hard = mask.astype(np.float32)
    if blur == 0:
        return hard
    image = Image.fromarray(mask.astype(np.uint8) * 255)
    blurred = np.asarray(image.filter(ImageFilter.GaussianBlur(blur)), dtype=np.float32) / 255.0
    return hard * blurred


def canny(pixels: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> its canny edges (0 or 255) in three equal channels."""
    import cv2

    edges = cv2.Canny(cv2.cvtColor(pixels, cv2.COLOR_RGB2GRAY), CANNY_LOW, CANNY_HIGH)
    return np.repeat(edges[..., None], 3, axis=2)
