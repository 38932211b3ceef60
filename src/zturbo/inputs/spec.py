"""What a request does with input images: the mode, its settings, and the rules that refuse every
combination that makes no sense, before any work (`check_inputs`, called by `GenerateRequest.create`).

Modes, as diffusers 0.42.1's Z-Image pipelines define them:
- text-to-image: no image;
- img2img (`ZImageImg2ImgPipeline`): the image, noised to `strength`, is denoised for about
  ceil(strength x steps) steps;
- inpaint (`ZImageInpaintPipeline`): as img2img, and after each step the latents outside the mask
  are put back to the image's, noised to the next step's level; white in the mask repaints;
- outpaint: inpaint on a canvas extended by (left, right, top, bottom) pixels, the new area masked;
- ControlNet (`ZImageControlNetPipeline`): a control image guides any of the above;
- ControlNet inpaint (`ZImageControlNetInpaintPipeline`): a mask (or outpaint) with a control
  image on a ControlNet with an inpaint input (Union 2.0+); it starts from noise, as diffusers does,
  and the mask and the masked image reach the model through the ControlNet.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import FieldError
from .images import OPAQUE_FROM, REPAINT_FROM, InputImage, repaints_nothing

RESIZE_MODES = ("crop", "fit", "stretch")
# The Fun-ControlNet-Union's control types. Canny is computed here from any image (OpenCV); the
# others take an image already preprocessed (a pose skeleton, a depth map, ...), used as given.
CONTROL_TYPES = ("canny", "depth", "pose", "hed", "mlsd", "scribble", "gray", "tile")
COMPUTED_CONTROL_TYPES = ("canny",)
DEFAULT_STRENGTH = {"img2img": 0.6, "inpaint": 1.0, "outpaint": 1.0}  # diffusers' pipeline defaults
DEFAULT_CONTROL_SCALE = 0.75  # diffusers' ZImageControlNetPipeline default
CONTROL_SCALE_RANGE = (0.0, 2.0)
MASK_BLUR_RANGE = (0, 256)  # pixels
MASK_PADDING_RANGE = (0, 1024)  # pixels
OUTPAINT_RANGE = (0, 2048)  # pixels per side
INPAINT_CONTROL_DIM = 33  # a ControlNet whose input has room for the mask and the masked image
ALPHA_MASK = "alpha"  # `mask` value: the input image's transparency is the mask (transparent repaints)

ImageResolver = Callable[[str, str], InputImage]  # (field, sha256) -> the stored image


@dataclass(frozen=True)
class ImageInputs:
    """A request's input images and their settings, validated (`check_inputs`)."""

    image: InputImage | None = None
    mask: InputImage | None = None  # None with mask_from_alpha: the image's alpha is the mask
    mask_from_alpha: bool = False
    strength: float | None = None  # resolved to the mode's default; None without an image
    resize: str | None = None  # None: every input must already have the request's size
    mask_blur: int = 0  # pixels of feathering at the paste-back seam
    mask_padding: int = 0  # pixels the repainted area grows by
    paste_back: bool = False  # pixels outside the mask are the input's, exactly
    outpaint: tuple[int, int, int, int] | None = None  # left, right, top, bottom
    control_image: InputImage | None = None
    control_type: str | None = None  # None: the control image is used as given
    control_scale: float = DEFAULT_CONTROL_SCALE
    control_start: float = 0.0  # the fraction of the steps run before the ControlNet starts
    control_end: float = 1.0  # ... and after which it stops

    @property
    def mode(self) -> str:
        if self.image is None:
            return "txt2img"
        if self.outpaint is not None:
            return "outpaint"
        if self.masked:
            return "inpaint"
        return "img2img"

    @property
    def masked(self) -> bool:
        return self.mask is not None or self.mask_from_alpha or self.outpaint is not None

    @property
    def controlled(self) -> bool:
        return self.control_image is not None

    def steps_run(self, steps: int) -> int:
        """How many of `steps` denoising steps run: an input image noised to `strength` starts late
        (img2img, inpaint, outpaint); text-to-image and ControlNet inpaint start from noise."""
        if self.image is None or self.strength is None or (self.controlled and self.masked):
            return steps
        return steps - img2img_first_step(steps, self.strength)

    def images(self) -> dict[str, InputImage]:
        """The input images by field name."""
        found = {"image": self.image, "mask": self.mask, "control_image": self.control_image}
        return {k: v for k, v in found.items() if v is not None}

    def shared(self) -> tuple[object, ...]:
        """What requests must agree on to run as one batch (images by hash)."""
        return tuple(sorted((k, _hashable(v)) for k, v in self.to_dict().items()))

    def to_dict(self) -> dict[str, Any]:
        """Settings and each image's sha256 (a job stores the bytes separately, by hash); {} for text-to-image."""
        if self == ImageInputs():
            return {}
        return {
            "mode": self.mode,
            "images": {k: v.sha256 for k, v in self.images().items()},
            "mask_from_alpha": self.mask_from_alpha,
            "strength": self.strength,
            "resize": self.resize,
            "mask_blur": self.mask_blur,
            "mask_padding": self.mask_padding,
            "paste_back": self.paste_back,
            "outpaint": list(self.outpaint) if self.outpaint is not None else None,
            "controlled": self.controlled,
            "control_type": self.control_type,
            "control_scale": self.control_scale,
            "control_start": self.control_start,
            "control_end": self.control_end,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None, resolve: ImageResolver | None) -> ImageInputs:
        """The inputs `to_dict` described; `resolve(field, sha256)` brings back each image."""
        if not data:
            return cls()
        hashes: Mapping[str, str] = data["images"]
        if hashes and resolve is None:
            raise ValueError("this request has input images; from_dict needs a resolver for them")
        found = {field: resolve(field, digest) for field, digest in hashes.items()} if resolve else {}
        outpaint = data.get("outpaint")
        return cls(
            image=found.get("image"),
            mask=found.get("mask"),
            mask_from_alpha=data["mask_from_alpha"],
            strength=data["strength"],
            resize=data["resize"],
            mask_blur=data["mask_blur"],
            mask_padding=data["mask_padding"],
            paste_back=data["paste_back"],
            outpaint=tuple(outpaint) if outpaint is not None else None,  # type: ignore[arg-type]
            control_image=found.get("control_image"),
            control_type=data["control_type"],
            control_scale=data["control_scale"],
            control_start=data["control_start"],
            control_end=data["control_end"],
        )


def _hashable(value: object) -> object:
    """A `to_dict` value as a hashable one: lists as tuples, the images' hashes as sorted pairs."""
    if isinstance(value, list):
        return tuple(value)
    if isinstance(value, dict):
        return tuple(sorted(value.items()))
    return value


def img2img_first_step(steps: int, strength: float) -> int:
    """The first step an image noised to `strength` runs from (diffusers' `get_timesteps`):
    steps - int(steps - steps x strength) of `steps` run, about ceil(strength x steps)."""
    return int(max(steps - min(steps * strength, steps), 0))


def check_inputs(
    *,
    steps: int,
    width: int | None,
    height: int | None,
    unit: int,
    control_in_dim: int | None,
    image: InputImage | None = None,
    mask: InputImage | str | None = None,
    strength: float | None = None,
    resize: str | None = None,
    mask_blur: int | None = None,
    mask_padding: int | None = None,
    paste_back: bool | None = None,
    outpaint: tuple[int, int, int, int] | None = None,
    control_image: InputImage | None = None,
    control_type: str | None = None,
    control_scale: float | None = None,
    control_start: float | None = None,
    control_end: float | None = None,
) -> tuple[ImageInputs, int | None, int | None]:
    """The inputs validated, and the request's width and height: as given, or else the input
    image's size (plus the outpaint margins) or the control image's. Each refusal is one line
    naming the field, the value and what is allowed."""
    from_alpha = mask == ALPHA_MASK
    if isinstance(mask, str) and not from_alpha:
        raise FieldError("mask", f"mask {mask!r} is not an image; give an image, or {ALPHA_MASK!r}")
    mask_image = mask if isinstance(mask, InputImage) else None
    _check_combinations(image, mask, from_alpha, strength, outpaint, paste_back, mask_padding, mask_blur)
    _check_control(control_image, mask is not None or outpaint is not None, control_in_dim, strength, control_type,
                   control_scale, control_start, control_end)  # fmt: skip
    _check_resize(resize, image is not None or control_image is not None)
    _check_range("mask_blur", mask_blur, MASK_BLUR_RANGE)
    _check_range("mask_padding", mask_padding, MASK_PADDING_RANGE)
    if outpaint is not None:
        outpaint = _check_outpaint(outpaint)
    if image is not None:
        masked = mask is not None or outpaint is not None
        strength = _check_strength(strength, steps, "outpaint" if outpaint else "inpaint" if masked else "img2img")
    if control_image is not None:
        _check_control_steps(steps, strength, control_start, control_end)
    width, height = _check_sizes(width, height, unit, image, mask_image, control_image, outpaint, resize)
    inputs = ImageInputs(
        image=image,
        mask=mask_image,
        mask_from_alpha=from_alpha,
        strength=strength,
        resize=resize,
        mask_blur=int(mask_blur or 0),
        mask_padding=int(mask_padding or 0),
        paste_back=bool(paste_back),
        outpaint=outpaint,
        control_image=control_image,
        control_type=control_type,
        control_scale=float(DEFAULT_CONTROL_SCALE if control_scale is None else control_scale),
        control_start=float(control_start or 0.0),
        control_end=float(1.0 if control_end is None else control_end),
    )
    return inputs, width, height


def _check_combinations(
    image: InputImage | None,
    mask: object,
    from_alpha: bool,
    strength: float | None,
    outpaint: object,
    paste_back: bool | None,
    mask_padding: int | None,
    mask_blur: int | None,
) -> None:
    masked = mask is not None or outpaint is not None
    _needs(image is not None, "mask", mask, "an input image (image) to repaint")
    _needs(image is not None, "outpaint", outpaint, "an input image (image) to extend")
    _needs(image is not None, "strength", strength, "an input image (image); text-to-image starts from noise")
    if mask is not None and outpaint is not None:
        raise FieldError("outpaint", "give mask or outpaint, not both: outpaint makes its own mask")
    if image is not None:
        _check_repaints(image, mask, from_alpha)
    _needs(masked, "paste_back", paste_back or None, "a mask or outpaint: it keeps the pixels outside the mask")
    _needs(masked, "mask_padding", mask_padding or None, "a mask or outpaint")
    _needs(bool(paste_back), "mask_blur", mask_blur or None, "paste_back: it feathers the paste-back seam")


def _check_repaints(image: InputImage, mask: object, from_alpha: bool) -> None:
    """Refuse a mask that repaints no pixel: the inpaint would run every step and change nothing."""
    transparent = f"no transparent pixels to repaint (alpha below {OPAQUE_FROM} repaints)"
    if from_alpha and repaints_nothing(image.image, from_alpha=True):
        where = "give an image transparent where it should repaint, or a mask"
        raise FieldError("mask", f"mask 'alpha': image {image.name} has {transparent}; {where}")
    if not isinstance(mask, InputImage) or not repaints_nothing(mask.image, from_alpha=False):
        return
    if mask.has_alpha:
        raise FieldError("mask", f"mask {mask.name} has {transparent}; make the area to repaint transparent")
    raise FieldError(
        "mask",
        f"mask {mask.name} has no white pixels to repaint (grey {REPAINT_FROM} or above repaints, darker keeps); "
        "paint the area to repaint white",
    )


def _check_resize(resize: str | None, has_input: bool) -> None:
    if resize is not None and resize not in RESIZE_MODES:
        raise FieldError("resize", f"resize {resize!r} is not one of {', '.join(RESIZE_MODES)}")
    _needs(has_input, "resize", resize, "an input image (image or control_image) to fit to the request's size")


def _check_control(
    control_image: InputImage | None,
    masked: bool,
    control_in_dim: int | None,
    strength: float | None,
    control_type: str | None,
    control_scale: float | None,
    control_start: float | None,
    control_end: float | None,
) -> None:
    controlled = control_image is not None
    _needs(controlled, "control_type", control_type, "a control image (control_image)")
    _needs(controlled, "control_scale", control_scale, "a control image (control_image)")
    _needs(controlled, "control_start", control_start, "a control image (control_image)")
    _needs(controlled, "control_end", control_end, "a control image (control_image)")
    if controlled and control_in_dim is None:
        raise FieldError("control_image", "control_image needs a ControlNet; load one with --controlnet")
    if controlled and masked and control_in_dim is not None and control_in_dim < INPAINT_CONTROL_DIM:
        raise FieldError(
            "control_image",
            f"this ControlNet (control_in_dim {control_in_dim}) has no inpaint input; a mask or outpaint with a "
            "control image needs Fun-ControlNet-Union 2.0 or later",
        )
    if controlled and masked and strength is not None and strength != 1:
        raise FieldError(
            "strength", f"strength {strength}: ControlNet inpaint starts from noise (as diffusers' does); omit strength"
        )
    if control_type is not None and control_type not in CONTROL_TYPES:
        raise FieldError("control_type", f"control_type {control_type!r} is not one of {', '.join(CONTROL_TYPES)}")
    _check_range("control_scale", control_scale, CONTROL_SCALE_RANGE)
    _check_range("control_start", control_start, (0.0, 1.0))
    _check_range("control_end", control_end, (0.0, 1.0))
    start, end = control_start or 0.0, 1.0 if control_end is None else control_end
    if start >= end:
        raise FieldError("control_end", f"control_end {end} must be above control_start {start}")


def control_steps(steps: int, start: float, end: float) -> list[bool]:
    """Which of `steps` steps run the ControlNet: step i unless i/steps < start or
    (i+1)/steps > end (the `controlnet_keep` of diffusers' Stable Diffusion ControlNet pipelines)."""
    return [not (i / steps < start or (i + 1) / steps > end) for i in range(steps)]


def _check_control_steps(steps: int, strength: float | None, start: float | None, end: float | None) -> None:
    """Refuse a control range that picks none of the steps that run (the control image would do nothing).
    `strength` is None where every step runs (text-to-image, ControlNet inpaint)."""
    runs = steps if strength is None else steps - img2img_first_step(steps, strength)
    lo, hi = start or 0.0, 1.0 if end is None else end
    if not any(control_steps(runs, lo, hi)):
        raise FieldError(
            "control_start",
            f"control_start {lo} to control_end {hi} covers none of the {runs} steps that run; widen the range",
        )


def _check_strength(strength: float | None, steps: int, mode: str) -> float:
    value = DEFAULT_STRENGTH[mode] if strength is None else strength
    _check_range("strength", value, (0.0, 1.0))
    if value == 0:
        raise FieldError("strength", "strength 0 leaves the image as it is; allowed above 0 up to 1")
    if img2img_first_step(steps, value) >= steps:
        raise FieldError(
            "strength",
            f"strength {value} with {steps} steps runs no denoising step; raise the strength",
        )
    return float(value)


def _needs(ok: bool, field: str, value: object, what: str) -> None:
    if value is not None and not ok:
        shown = value.name if isinstance(value, InputImage) else repr(value)  # an image by its name, not its bytes
        raise FieldError(field, f"{field} {shown} needs {what}")


def _check_range(field: str, value: object, bounds: tuple[float, float]) -> None:
    if value is None:
        return
    lo, hi = bounds
    whole = isinstance(lo, int) and isinstance(hi, int)
    kind = "a whole number" if whole else "a number"
    bad_type = isinstance(value, bool) or not isinstance(value, (int, float)) or (whole and not isinstance(value, int))
    if bad_type or not math.isfinite(value):  # type: ignore[arg-type]
        raise FieldError(field, f"{field} must be {kind} {lo:g}..{hi:g}; got {value!r}")
    if not lo <= value <= hi:  # type: ignore[operator]
        raise FieldError(field, f"{field} {value} is out of range; allowed {lo:g}..{hi:g}")


def parse_outpaint(value: object) -> tuple[int, int, int, int]:
    """`"L,R,T,B"` pixels (or a list of four) -> (left, right, top, bottom)."""
    parts = value.split(",") if isinstance(value, str) else value
    if isinstance(parts, (list, tuple)) and len(parts) == 4:
        try:
            return tuple(_whole(p) for p in parts)  # type: ignore[return-value]
        except ValueError:
            pass
    raise FieldError("outpaint", f"outpaint {value!r} is not LEFT,RIGHT,TOP,BOTTOM pixels (e.g. 0,256,0,0)")


def _whole(part: object) -> int:
    if isinstance(part, bool):
        raise ValueError(part)
    if isinstance(part, int):
        return part
    # A sign is read, so a negative side gets the range's message, as in a JSON list.
    if isinstance(part, str) and re.fullmatch(r"[+-]?[0-9]+", part.strip(" \t")):
        return int(part.strip(" \t"))
    raise ValueError(part)


def _check_outpaint(outpaint: object) -> tuple[int, int, int, int]:
    margins = parse_outpaint(outpaint)
    lo, hi = OUTPAINT_RANGE
    if any(not lo <= m <= hi for m in margins):
        raise FieldError("outpaint", f"outpaint {list(margins)}: each side must be {lo}..{hi} pixels")
    if not any(margins):
        raise FieldError("outpaint", "outpaint 0,0,0,0 adds nothing; give the pixels to add on at least one side")
    return margins


def _size_text(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}"


def _check_sizes(
    width: int | None,
    height: int | None,
    unit: int,
    image: InputImage | None,
    mask: InputImage | None,
    control: InputImage | None,
    outpaint: tuple[int, int, int, int] | None,
    resize: str | None,
) -> tuple[int | None, int | None]:
    """The request's size (given, or the inputs'), and each input checked against it: the init
    image against the canvas less the outpaint margins, the mask against the init image, the
    control image against the canvas; a mismatch needs `resize`."""
    left, right, top, bottom = outpaint or (0, 0, 0, 0)
    base = image or control
    if base is not None:
        extra = (left + right, top + bottom) if base is image else (0, 0)
        derived = base.size[0] + extra[0], base.size[1] + extra[1]
        if (width is None and derived[0] % unit) or (height is None and derived[1] % unit):
            field = "image" if base is image else "control_image"
            grown = " with the outpaint margins" if any(extra) else ""
            raise FieldError(
                field,
                f"{field} {base.name} is {_size_text(base.size)}{grown} ({_size_text(derived)}), not a multiple of "
                f"{unit}; give width and height (multiples of {unit}) and resize ({'|'.join(RESIZE_MODES)})",
            )
        width = derived[0] if width is None else width
        height = derived[1] if height is None else height
    if width is None or height is None:
        return width, height
    if mask is not None and image is not None and mask.size != image.size:
        raise FieldError(
            "mask", f"mask {mask.name} is {_size_text(mask.size)} but image {image.name} is {_size_text(image.size)}"
        )
    if image is not None:
        target = (width - left - right, height - top - bottom)
        if target[0] < unit or target[1] < unit:
            margins = list(outpaint or ())
            raise FieldError("outpaint", f"outpaint {margins} leaves no room for the image in {width}x{height}")
        _check_fits("image", image, target, resize, "the request" if not outpaint else "the canvas less the margins")
    if control is not None:
        _check_fits("control_image", control, (width, height), resize, "the request")
    return width, height


def _check_fits(field: str, image: InputImage, target: tuple[int, int], resize: str | None, what: str) -> None:
    if image.size != target and resize is None:
        raise FieldError(
            field,
            f"{field} {image.name} is {_size_text(image.size)} but {what} is {_size_text(target)}; give resize "
            f"({'|'.join(RESIZE_MODES)}) or a width and height that match",
        )
