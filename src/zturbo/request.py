"""GenerateRequest: generation parameters validated once, with the seed resolved.

`FIELDS` is the one table of request fields (names, aliases, defaults, docs) and `LIMITS` the one
set of numbers every door enforces: the CLI, batch rows, the HTTP API and the web UI all build
their request through `GenerateRequest.create` (directly, or by `from_fields` from their own names
and text values), so they accept and refuse the same values with the same messages.
"""

from __future__ import annotations

import dataclasses
import math
import re
import secrets
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import FieldError
from .inputs.images import MAX_INPUT_BYTES, MAX_INPUT_PIXELS, InputImage
from .inputs.spec import ALPHA_MASK, ImageInputs, ImageResolver, check_inputs, parse_outpaint
from .profiles import PLAIN_CFG, TURBO, CfgOptions, ModelProfile

# Turbo's; a request that does not say takes its model's (`ModelLimits.profile`).
DEFAULT_STEPS = TURBO.steps
DEFAULT_GUIDANCE = TURBO.guidance
DEFAULT_SIZE = 1024
# Seed variety: the fraction of the steps that see the noisy prompt embedding by default. Early
# steps fix the composition; leaving the last ones clean lets the image follow the prompt again.
DEFAULT_VARIETY_UNTIL = 0.25
REQUEST_FORMAT = 1  # version of `GenerateRequest.to_dict`'s layout
# Output file formats, as OpenAI's images API names them (`imageio.IMAGE_SUFFIXES` gives the suffixes).
OUTPUT_FORMATS = ("png", "webp", "jpeg")
DEFAULT_OUTPUT_FORMAT = "png"
NO_INPUTS = ImageInputs()


@dataclass(frozen=True)
class Limits:
    """The numbers every door enforces; width and height come from the model (`ModelLimits`)."""

    steps: tuple[int, int] = (1, 100)
    images: tuple[int, int] = (1, 64)  # images per request, and seeds per seed list
    guidance: tuple[float, float] = (0.0, 30.0)
    # diffusers' cfg_normalization factor (0 = off), unbounded there. The cap is ours: diffusers types
    # the option as a bool (True is a factor of 1), so a value far above 1 is more likely a typo.
    cfg_normalization: tuple[float, float] = (0.0, 10.0)
    prompt_chars: int = 4000
    # Image i uses seed + i (or variation seed + i), so the last image's seed must fit too.
    seed: tuple[int, int] = (0, 2**63 - 1)
    fraction: tuple[float, float] = (0.0, 1.0)
    loras: int = 8  # LoRAs per request
    lora_weight: tuple[float, float] = (-10.0, 10.0)
    lora_name_chars: int = 255
    # Input images: a decoded image may have at most this many pixels (a larger header is refused
    # before decoding, so a decompression bomb never expands), and an upload at most this many bytes.
    input_pixels: int = MAX_INPUT_PIXELS
    input_bytes: int = MAX_INPUT_BYTES
    # OpenAI's `output_compression`: the quality of a WebP or JPEG file, in percent.
    compression: tuple[int, int] = (0, 100)


LIMITS = Limits()
SEED_MAX = LIMITS.seed[1]


@dataclass(frozen=True)
class ModelLimits:
    """What a loaded (or about to be loaded) model accepts; derived from its configs."""

    spatial_unit: int  # width and height must be multiples of this (VAE factor x patch size)
    max_pixels: int
    # The loaded ControlNet's input channels (16: control only; 33: control, mask and masked
    # image, Union 2.0+); None without a ControlNet.
    control_in_dim: int | None = None
    # The model's defaults: steps, guidance and CFG options when a request does not give them.
    profile: ModelProfile = TURBO


TEXT, WHOLE, NUMBER, SEEDS, LORAS = "text", "whole number", "number", "seed list", "LoRA list"
# Input images (a door turns its own form, a path or an upload, into an `InputImage`), a choice of
# words, yes/no, and outpaint margins.
IMAGE, CHOICE, FLAG, MARGINS = "image", "choice", "yes/no", "margins"
_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")
# Numbers written as text, for every door that reads them: ASCII digits only (int() and float()
# would also take full-width and other scripts' digits and underscores), of bounded length (int()
# refuses over 4300 digits with an error of its own; no field's range needs more than 20).
WHOLE_TEXT = re.compile(r"[+-]?[0-9]{1,64}")
FINITE_TEXT = re.compile(r"[+-]?([0-9]{1,64}\.?[0-9]{0,64}|\.[0-9]{1,64})([eE][+-]?[0-9]{1,4})?")
# "nan" and "inf" read as numbers here, so `create` refuses them with the same message at every door.
_NUMBER_TEXT = re.compile(rf"{FINITE_TEXT.pattern}|[+-]?(nan|inf|infinity)", re.I)


@dataclass(frozen=True)
class Field:
    """One request field: its `GenerateRequest.create` keyword and what each door calls it.

    `bounds` names the `Limits` entry that bounds it ("size": the model's `ModelLimits`).
    """

    name: str
    kind: str
    default: Any
    bounds: str
    doc: str
    flag: str | None = None  # the CLI option
    http: str = ""  # the name in HTTP bodies and the job view (default: `name`)
    a1111: str | None = None  # the label in A1111's `parameters` text
    aliases: tuple[str, ...] = ()  # other accepted names: A1111's API, OpenAI, short forms

    @property
    def api_name(self) -> str:
        return self.http or self.name

    def range(self, limits: Limits = LIMITS) -> tuple[float, float] | None:
        """(lowest, highest) allowed value of a number field; None for text, seed lists and sizes."""
        if self.bounds in ("steps", "images", "guidance", "cfg_normalization", "seed", "fraction", "compression"):
            return getattr(limits, self.bounds)
        if self.bounds == "fraction>0":
            return limits.fraction
        if self.bounds.startswith("range:"):
            return _input_range(self.name)
        return None

    def allowed(self, limits: Limits = LIMITS) -> str:
        """What is allowed, as the error messages and the docs say it."""
        if self.bounds == "prompt":
            return f"at most {limits.prompt_chars} characters"
        if self.bounds == "size":
            return "a multiple of the model's spatial unit; width x height at most its pixel limit"
        if self.bounds == "seeds":
            return f"1..{limits.images[1]} seeds, each {limits.seed[0]}..{limits.seed[1]}"
        if self.bounds == "fraction>0":
            return "above 0 up to 1"
        if self.bounds == "compression":
            lo, hi = limits.compression
            return f"{lo}..{hi}, for webp and jpeg only"
        if self.bounds == "loras":
            lo, hi = limits.lora_weight
            return f"up to {limits.loras} LoRAs as NAME[:WEIGHT], each weight {lo:g}..{hi:g}"
        if self.bounds == "image":
            return f"an image file (PNG, JPEG, WebP, ...) of at most {limits.input_pixels} pixels"
        if self.kind == CHOICE:
            return " | ".join(_choices(self.name))
        if self.kind == FLAG:
            return "true or false"
        if self.kind == MARGINS:
            return "LEFT,RIGHT,TOP,BOTTOM pixels"
        if self.bounds.startswith("range:"):
            lo, hi = _input_range(self.name)
            return f"{lo:g}..{hi:g}"
        lo, hi = self.range(limits) or (0, 0)
        return f"{lo:g}..{hi:g}" if self.kind == NUMBER else f"{lo}..{hi}"

    def from_text(self, value: object) -> object:
        """A door's text value as this field's type (non-text values pass on: `create` checks them)."""
        if not isinstance(value, str) or self.kind in (TEXT, SEEDS, LORAS, IMAGE, CHOICE):
            return value
        if self.kind == MARGINS:
            from .inputs.spec import parse_outpaint

            return parse_outpaint(value)
        if self.kind == FLAG:
            word = value.strip(" \t").lower()
            if word not in _TRUE + _FALSE:
                raise FieldError(self.name, f"{self.name} {value!r} is not true or false")
            return word in _TRUE
        text = value.strip(" \t")
        pattern = WHOLE_TEXT if self.kind == WHOLE else _NUMBER_TEXT
        if not pattern.fullmatch(text):
            raise FieldError(self.name, f"{self.name} {value!r} is not a {self.kind} (ASCII digits)")
        return int(text) if self.kind == WHOLE else float(text)


# Ordered as the batch file columns are listed.
FIELDS: tuple[Field, ...] = (
    Field("prompt", TEXT, None, "prompt", "what to draw (any language the text encoder knows)"),
    Field("negative_prompt", TEXT, "", "prompt", "what to avoid (used only when guidance > 0)",
          "--negative-prompt", a1111="Negative prompt", aliases=("negative",)),
    Field("seeds", SEEDS, None, "seeds", "one image per seed: a list and ranges, e.g. 1-8 or 3,7,42",
          "--seeds"),
    Field("seed", WHOLE, None, "seed", "random seed; image i uses seed+i (default: random)", "--seed",
          a1111="Seed"),
    Field("steps", WHOLE, DEFAULT_STEPS, "steps", "denoising steps (the base model's default is 28)", "--steps",
          a1111="Steps"),
    Field("width", WHOLE, DEFAULT_SIZE, "size", "image width in pixels, a multiple of 16", "--width"),
    Field("height", WHOLE, DEFAULT_SIZE, "size", "image height in pixels, a multiple of 16", "--height"),
    Field("batch", WHOLE, 1, "images", "number of images (per prompt)", "--batch", http="n",
          aliases=("n", "batch_size")),
    Field("variation_seed", WHOLE, None, "seed", "A1111 variation seed: noise blended in (default: random)",
          "--variation-seed", a1111="Variation seed", aliases=("subseed",)),
    Field("guidance_scale", NUMBER, DEFAULT_GUIDANCE, "guidance",
          "CFG scale; 0 = no CFG, the Turbo setting (the base model's default is 4)", "--guidance", a1111="CFG scale",
          aliases=("guidance", "cfg_scale")),
    Field("cfg_normalization", NUMBER, None, "cfg_normalization",
          "CFG renormalization, diffusers' cfg_normalization: 0 = off; above 0 each image's guided prediction is "
          "scaled down to at most this times the positive prediction's norm (default: the model's, 0)",
          "--cfg-normalization"),
    Field("cfg_truncation", NUMBER, None, "fraction",
          "CFG truncation, diffusers' cfg_truncation: steps whose normalized time (1000 - t) / 1000 is above it run "
          "without guidance, the positive half alone; 1 = never (default: the model's, 1)", "--cfg-truncation"),
    Field("variation_strength", NUMBER, 0.0, "fraction",
          "0 = the seed's image, 1 = the variation seed's; above 0 the seed stays and image i uses "
          "variation seed+i", "--variation-strength", a1111="Variation seed strength",
          aliases=("subseed_strength",)),
    Field("variety", NUMBER, 0.0, "fraction",
          "seed variety: seeded noise on the prompt embedding during the first steps (0 = off)", "--variety",
          a1111="Seed variety"),
    Field("variety_until", NUMBER, DEFAULT_VARIETY_UNTIL, "fraction>0",
          "fraction of the steps that see the noisy embedding", "--variety-until", a1111="Seed variety until"),
    Field("loras", LORAS, (), "loras",
          "LoRAs merged into the transformer: NAME[:WEIGHT] (weight 1 by default), comma-separated in text",
          "--lora", aliases=("lora",)),
    Field("image", IMAGE, None, "image", "input image: img2img, or with mask or outpaint, inpaint", "--image",
          aliases=("init_image",)),
    Field("mask", IMAGE, None, "image",
          "inpaint mask, the input image's size: white repaints, black keeps; 'alpha': the image's transparency",
          "--mask", aliases=("mask_image",)),
    Field("strength", NUMBER, None, "range:strength",
          "how far the input image is noised: about strength x steps steps run (default 0.6; 1 with a mask)",
          "--strength", a1111="Denoising strength", aliases=("denoising_strength",)),
    Field("resize", CHOICE, None, "choice", "fit input images of another size: crop, fit (pad) or stretch "
          "(default: an input must have the request's size)", "--resize"),
    Field("mask_blur", WHOLE, None, "range:mask_blur", "pixels of feathering at the paste-back seam",
          "--mask-blur", a1111="Mask blur"),
    Field("mask_padding", WHOLE, None, "range:mask_padding", "pixels the masked area grows by",
          "--mask-padding"),
    Field("paste_back", FLAG, None, "flag", "the pixels outside the mask are the input image's, exactly",
          "--paste-back"),
    Field("outpaint", MARGINS, None, "margins", "extend the input image by LEFT,RIGHT,TOP,BOTTOM pixels and "
          "fill them in", "--outpaint"),
    Field("control_image", IMAGE, None, "image", "ControlNet control image (the canvas' size)",
          "--control-image"),
    Field("control_type", CHOICE, None, "choice", "canny: computed from the control image; the others take an "
          "already preprocessed image (default: used as given)", "--control-type"),
    Field("control_scale", NUMBER, None, "range:control_scale", "ControlNet conditioning scale (default 0.75)",
          "--control-scale", aliases=("controlnet_conditioning_scale",)),
    Field("control_start", NUMBER, None, "range:control_start",
          "fraction of the steps run before the ControlNet starts (default 0)", "--control-start"),
    Field("control_end", NUMBER, None, "range:control_end",
          "fraction of the steps after which the ControlNet stops (default 1)", "--control-end"),
    Field("output_format", CHOICE, DEFAULT_OUTPUT_FORMAT, "choice", "the image files' format", "--format",
          aliases=("format",)),
    Field("output_compression", WHOLE, None, "compression",
          "quality of a webp or jpeg file in percent, as OpenAI's output_compression (default 90); png is "
          "lossless and takes none", "--compression", aliases=("compression",)),
)  # fmt: skip
# How the image files are written; not input settings, and no part of `GenerateRequest.shared()`.
OUTPUT_FIELDS = ("output_format", "output_compression")
IMAGE_FIELDS = tuple(f.name for f in FIELDS if f.kind == IMAGE)
INPUT_FIELDS = IMAGE_FIELDS + tuple(
    f.name
    for f in FIELDS
    if f.name not in OUTPUT_FIELDS and (f.bounds.startswith("range:") or f.kind in (CHOICE, FLAG, MARGINS))
)
FIELD = {f.name: f for f in FIELDS}
SIZE_FIELD = "size"  # OpenAI's "WIDTHxHEIGHT" (sets width and height) or "auto" (an input image's size, else 1024)


def _choices(name: str) -> tuple[str, ...]:
    from .inputs.spec import CONTROL_TYPES, RESIZE_MODES

    return {"resize": RESIZE_MODES, "control_type": CONTROL_TYPES, "output_format": OUTPUT_FORMATS}[name]


def _input_range(name: str) -> tuple[float, float]:
    from .inputs import spec

    return {
        "strength": (0.0, 1.0),
        "mask_blur": spec.MASK_BLUR_RANGE,
        "mask_padding": spec.MASK_PADDING_RANGE,
        "control_scale": spec.CONTROL_SCALE_RANGE,
        "control_start": (0.0, 1.0),
        "control_end": (0.0, 1.0),
    }[name]


def _normal(name: str) -> str:
    return name.strip().lstrip("-").lower().replace("-", "_").replace(" ", "_")


def _index() -> dict[str, Field]:
    out: dict[str, Field] = {}
    for f in FIELDS:
        names = (f.name, f.api_name, f.flag or f.name, f.a1111 or f.name, *f.aliases)
        out.update({_normal(n): f for n in names})
    return out


_BY_ALIAS = _index()


def field_for(name: str) -> Field | None:
    """The field a door's name (canonical, HTTP, CLI flag, A1111 or OpenAI alias; any case) means."""
    return _BY_ALIAS.get(_normal(name))


# ASCII digits only: `\d` and int() also take full-width and Arabic-Indic digits. Hand-written
# A1111 texts may space the x.
_SIZE = re.compile(r"([0-9]{1,5}) ?x ?([0-9]{1,5})")


def parse_size(size: object) -> tuple[int, int]:
    """OpenAI's and A1111's `size`: "WIDTHxHEIGHT" or "auto" (the default size)."""
    if size == "auto":
        return DEFAULT_SIZE, DEFAULT_SIZE
    m = _SIZE.fullmatch(size.strip(" ")) if isinstance(size, str) else None
    if m is None:
        raise FieldError(SIZE_FIELD, f"size {size!r} is not WIDTHxHEIGHT (e.g. 1024x1024) or 'auto'")
    return int(m.group(1)), int(m.group(2))


def convert_fields(values: Mapping[str, object], *, what: str = "field") -> dict[str, object]:
    """A door's names and text values -> `create` keywords (unknown names refused with the allowed list).

    Limits are not checked here: `GenerateRequest.create` does that, once.
    """
    out: dict[str, object] = {}
    for name, value in values.items():
        if _normal(str(name)) == SIZE_FIELD:
            if value != "auto":  # "auto" leaves the size to `create`: an input image's, else the default
                out["width"], out["height"] = parse_size(value)
            continue
        f = field_for(str(name))
        if f is None:
            allowed = ", ".join(x.name for x in FIELDS)
            raise FieldError(str(name), f"unknown {what} {str(name)!r}; allowed: {allowed}")
        if f.name in out:
            raise FieldError(str(name), f"{f.name} is given twice (as {str(name)!r} and another name)")
        out[f.name] = f.from_text(value)
    return out


def _relabel(err: FieldError, given: Mapping[str, str]) -> FieldError:
    """`err` naming the field as the door called it (`given`: canonical name -> the door's name)."""
    canonical, _, rest = (err.field or "").partition(".")
    door = given.get(canonical)
    if door is None or door == canonical:
        return err
    if door == SIZE_FIELD:
        return FieldError(SIZE_FIELD, str(err))
    message = re.sub(rf"\b{canonical}\b", door, str(err))
    return FieldError(f"{door}.{rest}" if rest else door, message)


@dataclass(frozen=True)
class LoraRef:
    """One LoRA of a request: a name in the LoRA directory (or, where the library allows paths,
    a file path) and its weight. `adapters.library` resolves the name; `create` checks the form."""

    name: str
    weight: float = 1.0


@dataclass(frozen=True)
class ImageSpec:
    """What differs between the images of one request: texts and seeds.

    `variation_seed` is None unless the request's variation strength is above 0.
    """

    prompt: str
    negative_prompt: str
    seed: int
    variation_seed: int | None = None


@dataclass(frozen=True)
class GenerateRequest:
    """A validated request. Build it with `GenerateRequest.create`.

    Image i uses seed + i; with a variation strength above 0 every image keeps the seed and image i
    uses variation seed + i instead (A1111's convention); with a seed list each prompt gets one
    image per listed seed. `images` holds the resolved per-image seeds, in output order.
    """

    prompts: tuple[str, ...]
    negative_prompts: tuple[str, ...]
    seed: int
    steps: int
    guidance_scale: float
    width: int
    height: int
    batch: int  # images per prompt
    seed_was_random: bool = False
    images: tuple[ImageSpec, ...] = ()
    seeds: tuple[int, ...] | None = None  # an explicit seed list, when one was given
    variation_strength: float = 0.0
    variety: float = 0.0  # seed-variety strength; 0 = the plain image
    variety_until: float = DEFAULT_VARIETY_UNTIL
    variation_seed: int | None = None  # as given or drawn; images use it only with a strength above 0
    loras: tuple[LoraRef, ...] = ()
    inputs: ImageInputs = NO_INPUTS  # input images and their settings; none for text-to-image
    output_format: str = DEFAULT_OUTPUT_FORMAT  # png | webp | jpeg: how the images are written
    output_compression: int | None = None  # webp or jpeg quality 0..100; None: the format's default
    cfg: CfgOptions = PLAIN_CFG  # diffusers' CFG options; they act only when guidance_scale > 0

    def __post_init__(self) -> None:
        if not self.images:  # built directly rather than by `create`: image i uses seed + i
            specs = _specs(self.prompts, self.negative_prompts, self.seed, None, self.batch, None)
            object.__setattr__(self, "images", specs)

    @property
    def num_images(self) -> int:
        return len(self.images)

    @property
    def do_cfg(self) -> bool:
        return self.guidance_scale > 0

    def image_prompts(self) -> list[tuple[str, str, int]]:
        """(prompt, negative prompt, seed) of every image, in output order."""
        return [(spec.prompt, spec.negative_prompt, spec.seed) for spec in self.images]

    def shared(self) -> tuple[object, ...]:
        """The parameters every image of a request shares; requests that agree on them can run together."""
        return (
            self.width,
            self.height,
            self.steps,
            self.guidance_scale,
            self.cfg,
            self.variation_strength,
            self.variety,
            self.variety_until,
            self.loras,
            self.inputs.shared(),
        )

    @classmethod
    def combine(cls, requests: Sequence[GenerateRequest]) -> GenerateRequest:
        """One request making the images of all `requests` (which must agree on `shared()`), in order.

        The engine makes image i of a batch exactly as it would alone, so combining changes no pixel.
        The output format is not shared: the combined request keeps the first's, and whoever writes
        the images writes each request's with that request's own `output_format` and compression.
        """
        first = requests[0]
        for other in requests[1:]:
            if other.shared() != first.shared():
                raise ValueError(
                    "combined requests must share size, steps, guidance, CFG options, noise settings, LoRAs and inputs"
                )
        specs = tuple(spec for r in requests for spec in r.images)
        return dataclasses.replace(
            first,
            prompts=tuple(s.prompt for s in specs),
            negative_prompts=tuple(s.negative_prompt for s in specs),
            batch=1,
            images=specs,
            seeds=None,
            seed_was_random=any(r.seed_was_random for r in requests),
        )

    @classmethod
    def create(
        cls,
        prompt: str | Sequence[str],
        *,
        limits: ModelLimits,
        negative_prompt: str | Sequence[str] | None = None,
        seed: int | None = None,
        steps: int | None = None,
        guidance_scale: float | None = None,
        cfg_normalization: float | None = None,
        cfg_truncation: float | None = None,
        width: int | None = None,
        height: int | None = None,
        batch: int = 1,
        seeds: str | Sequence[int] | None = None,
        variation_seed: int | None = None,
        variation_strength: float = 0.0,
        variety: float = 0.0,
        variety_until: float = DEFAULT_VARIETY_UNTIL,
        loras: str | Sequence[LoraRef | str | Mapping[str, Any] | tuple[str, float]] | None = None,
        output_format: str = DEFAULT_OUTPUT_FORMAT,
        output_compression: int | None = None,
        **input_fields: Any,
    ) -> GenerateRequest:
        """The one validator: every door's request passes here; errors name the field, value and range.

        `input_fields`: image, mask, strength, ... (`INPUT_FIELDS`), as `InputImage`, bytes or PIL, never paths.
        Without width and height, an input image sets the size; steps, guidance, CFG options: `limits.profile`'s.
        """
        steps, guidance_scale = limits.profile.defaults(steps, guidance_scale)
        prompts = _prompts(prompt)
        negatives = _negatives(negative_prompt, len(prompts))
        _check_int("steps", steps, *LIMITS.steps)
        _check_int("batch", batch, *LIMITS.images)
        guidance, cfg = _check_guidance(guidance_scale), _check_cfg(limits.profile, cfg_normalization, cfg_truncation)
        _check_given_sides(width, height, limits)  # before input images are fitted to them
        inputs, width, height = _check_input_fields(input_fields, steps, width, height, limits)
        width, height = _check_size(_or_default(width), _or_default(height), limits)
        strength, variety, variety_until = _noise_settings(variation_strength, variety, variety_until)
        lora_refs = parse_loras(loras)
        _check_output(output_format, output_compression)
        seed_list = _seed_list(seeds, seed, batch)
        per_prompt = len(seed_list) if seed_list is not None else batch
        total = len(prompts) * per_prompt
        seed, seed_was_random = _first_seed(seed, seed_list)
        varying = strength > 0
        # A1111: with a variation strength the seed stays and the variation seed counts up instead.
        _check_int("seed", seed, LIMITS.seed[0], SEED_MAX - (0 if varying else total - 1))
        if variation_seed is None and varying:
            variation_seed = secrets.randbelow(2**32)
        if variation_seed is not None:
            span = total - 1 if varying and seed_list is None else 0  # the images use it only when varying
            _check_int("variation_seed", variation_seed, LIMITS.seed[0], SEED_MAX - span)
        specs = _specs(prompts, negatives, seed, seed_list, per_prompt, variation_seed if varying else None)
        return cls(
            prompts, negatives, seed, steps, guidance, width, height, per_prompt, seed_was_random,
            images=specs, seeds=seed_list, variation_strength=strength, variety=variety,
            variety_until=variety_until, variation_seed=variation_seed, loras=lora_refs, inputs=inputs,
            output_format=output_format, output_compression=output_compression, cfg=cfg,
        )  # fmt: skip

    @classmethod
    def from_fields(cls, values: Mapping[str, object], limits: ModelLimits, *, what: str = "field") -> GenerateRequest:
        """A request from a door's names (any alias; `size`) and text values, validated by `create`.

        Errors name the field as the door called it (`n`, `size`, ...).
        """
        given: dict[str, str] = {}  # canonical name -> the name the door used
        for name in map(str, values):
            if _normal(name) == SIZE_FIELD:
                given["width"] = given["height"] = SIZE_FIELD
            elif (f := field_for(name)) is not None:
                given[f.name] = name
        try:
            kwargs = convert_fields(values, what=what)
            if kwargs.get("prompt") is None:
                raise FieldError("prompt", "prompt is missing; describe the image to generate")
            prompt = kwargs.pop("prompt")
            return cls.create(prompt, limits=limits, **kwargs)  # type: ignore[arg-type]
        except FieldError as e:
            raise _relabel(e, given) from None

    def to_dict(self) -> dict[str, Any]:
        """Every field explicit, random seeds resolved, one spec per image: what a job stores and runs."""
        return {
            "format": REQUEST_FORMAT,
            "prompts": list(self.prompts),
            "negative_prompts": list(self.negative_prompts),
            "seed": self.seed,
            "seeds": list(self.seeds) if self.seeds is not None else None,
            "steps": self.steps,
            "guidance_scale": self.guidance_scale,
            "cfg_normalization": self.cfg.normalization,
            "cfg_truncation": self.cfg.truncation,
            "width": self.width,
            "height": self.height,
            "batch": self.batch,
            "variation_seed": self.variation_seed,
            "variation_strength": self.variation_strength,
            "variety": self.variety,
            "variety_until": self.variety_until,
            "seed_was_random": self.seed_was_random,
            "loras": [dataclasses.asdict(ref) for ref in self.loras],
            "inputs": self.inputs.to_dict(),
            "images": [dataclasses.asdict(spec) for spec in self.images],
            "output_format": self.output_format,
            "output_compression": self.output_compression,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], images: ImageResolver | None = None) -> GenerateRequest:
        """The request `to_dict` described, trusted as it is (it was validated when it was made).

        `images(field, sha256)` brings back its input images (a job's store); needed only when it has some.
        """
        seeds = data["seeds"]
        return cls(
            prompts=tuple(data["prompts"]),
            negative_prompts=tuple(data["negative_prompts"]),
            seed=data["seed"],
            steps=data["steps"],
            guidance_scale=data["guidance_scale"],
            width=data["width"],
            height=data["height"],
            batch=data["batch"],
            seed_was_random=data["seed_was_random"],
            images=tuple(ImageSpec(**spec) for spec in data["images"]),
            seeds=tuple(seeds) if seeds is not None else None,
            variation_strength=data["variation_strength"],
            variety=data["variety"],
            variety_until=data["variety_until"],
            variation_seed=data["variation_seed"],
            loras=tuple(LoraRef(**ref) for ref in data.get("loras", ())),
            inputs=ImageInputs.from_dict(data.get("inputs"), images),
            # Requests stored before output formats existed wrote PNGs.
            output_format=data.get("output_format", DEFAULT_OUTPUT_FORMAT),
            output_compression=data.get("output_compression"),
            # Requests stored before CFG options were request fields ran diffusers' defaults.
            cfg=CfgOptions(data.get("cfg_normalization", 0.0), data.get("cfg_truncation", 1.0)),
        )


def _check_input_fields(
    fields: Mapping[str, Any], steps: int, width: int | None, height: int | None, limits: ModelLimits
) -> tuple[ImageInputs, int | None, int | None]:
    """The input-image keywords of `create` checked (`inputs.spec.check_inputs`), images decoded."""
    unknown = set(fields) - set(INPUT_FIELDS)
    if unknown:
        raise TypeError(f"GenerateRequest.create got unexpected keywords {sorted(unknown)}")
    values = {k: v for k, v in fields.items() if v is not None}
    if not values:
        return ImageInputs(), width, height
    for name in IMAGE_FIELDS:
        if name in values and not (name == "mask" and values[name] == ALPHA_MASK):
            values[name] = _input_image(name, values[name])
    if "outpaint" in values:
        values["outpaint"] = parse_outpaint(values["outpaint"])
    if "paste_back" in values and not isinstance(values["paste_back"], bool):
        raise FieldError("paste_back", f"paste_back must be true or false; got {values['paste_back']!r}")
    return check_inputs(
        steps=steps,
        width=width,
        height=height,
        unit=limits.spatial_unit,
        control_in_dim=limits.control_in_dim,
        **values,
    )


def _input_image(field: str, value: object) -> InputImage:
    """An image field's value as an InputImage: decoded bytes or a PIL image; never a path."""
    from .inputs import images

    if isinstance(value, InputImage):
        return value
    if isinstance(value, (bytes, bytearray)):
        return images.decode_image(bytes(value), field, f"the {field.replace('_', ' ')}")
    if hasattr(value, "getbands") and hasattr(value, "size"):  # a PIL image, without importing PIL here
        return images.from_pil(value, field)  # type: ignore[arg-type]
    raise FieldError(
        field, f"{field} must be an image (file bytes or a PIL image); got {type(value).__name__} (doors read files)"
    )


def is_request_dict(data: Mapping[str, Any]) -> bool:
    """Whether `data` is `GenerateRequest.to_dict` output (not a plain parameter dict)."""
    return data.get("format") == REQUEST_FORMAT and "images" in data


def _specs(
    prompts: tuple[str, ...],
    negatives: tuple[str, ...],
    seed: int,
    seed_list: tuple[int, ...] | None,
    per_prompt: int,
    variation_seed: int | None,
) -> tuple[ImageSpec, ...]:
    specs = []
    for p_idx, (prompt, negative) in enumerate(zip(prompts, negatives, strict=True)):
        for j in range(per_prompt):
            k = p_idx * per_prompt + j
            if seed_list is not None:  # the same seeds for every prompt, so prompts compare seed by seed
                specs.append(ImageSpec(prompt, negative, seed_list[j], variation_seed))
            elif variation_seed is not None:
                specs.append(ImageSpec(prompt, negative, seed, variation_seed + k))
            else:
                specs.append(ImageSpec(prompt, negative, seed + k))
    return tuple(specs)


def parse_loras(value: object) -> tuple[LoraRef, ...]:
    """A door's LoRA list -> LoraRefs: text `"a:0.7, b"`, or a list of such texts, `{name, weight}`
    mappings, (name, weight) pairs or LoraRefs. Checks the form, count, weights and duplicates;
    whether a name exists is the LoRA library's question."""
    if value is None or value == "":
        return ()
    items = [t for t in value.split(",") if t.strip(" \t")] if isinstance(value, str) else value
    if isinstance(items, Mapping) or not isinstance(items, Sequence):
        raise FieldError("loras", f"loras must be a list of NAME[:WEIGHT] or {{name, weight}}; got {value!r}")
    refs = tuple(_lora_ref(i, item) for i, item in enumerate(items))
    most = LIMITS.loras
    if len(refs) > most:
        raise FieldError("loras", f"{len(refs)} LoRAs given; allowed at most {most}")
    names = [r.name for r in refs]
    for name in names:
        if names.count(name) > 1:
            raise FieldError("loras", f"LoRA {name!r} is given twice; give each once with its weight")
    return refs


def _lora_ref(i: int, item: object) -> LoraRef:
    where = f"loras.{i}"
    if isinstance(item, LoraRef):
        name, weight = item.name, item.weight
    elif isinstance(item, str):
        name, weight = _lora_text(where, item)
    elif isinstance(item, Mapping):
        unknown = set(item) - {"name", "weight"}
        if unknown or "name" not in item:
            raise FieldError(where, f"{where} must be {{name, weight}}; got keys {sorted(map(str, item))}")
        name, weight = item["name"], item.get("weight", 1.0)
    elif isinstance(item, (tuple, list)) and len(item) == 2:
        name, weight = item
    else:
        raise FieldError(where, f"{where} must be NAME[:WEIGHT] or {{name, weight}}; got {item!r}")
    return LoraRef(_check_lora_name(where, name), _check_lora_weight(where, weight))


def _lora_text(where: str, text: str) -> tuple[str, float]:
    """`name:0.7` -> (name, 0.7); a tail that is not a number stays part of the name (`C:/x`)."""
    text = text.strip(" \t")
    head, colon, tail = text.rpartition(":")
    if colon and _NUMBER_TEXT.fullmatch(tail.strip(" \t")):
        return head.strip(" \t"), float(tail)
    return text, 1.0


def _check_lora_name(where: str, name: object) -> str:
    most = LIMITS.lora_name_chars
    if not isinstance(name, str) or not name.strip() or len(name) > most:
        raise FieldError(where, f"{where}: LoRA name must be 1..{most} characters of text; got {name!r}")
    if any(unicodedata.category(c) == "Cc" for c in name):
        raise FieldError(where, f"{where}: LoRA name {name!r} contains control characters")
    _check_unicode(where, name, f"{where}: LoRA name")
    return name


def _check_lora_weight(where: str, weight: object) -> float:
    lo, hi = LIMITS.lora_weight
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
        raise FieldError(where, f"{where}: LoRA weight must be a number {lo:g}..{hi:g}; got {weight!r}")
    if not lo <= weight <= hi:
        raise FieldError(where, f"{where}: LoRA weight {weight} is out of range; allowed {lo:g}..{hi:g}")
    return float(weight)


def _ascii_int(text: str) -> int:
    if not WHOLE_TEXT.fullmatch(text.strip(" \t")):
        raise ValueError(text)
    return int(text)


def parse_seeds(text: str) -> tuple[int, ...]:
    """`"1-8"`, `"3,7,42"` or a mix (`"1-3,10"`) -> the seeds in the order given."""
    seeds: list[int] = []
    most = LIMITS.images[1]
    for token in (t.strip(" \t") for t in text.split(",")):
        lo, dash, hi = token.partition("-")
        try:
            first, last = (_ascii_int(lo), _ascii_int(hi)) if dash else (_ascii_int(token), _ascii_int(token))
        except ValueError:
            raise FieldError(
                "seeds", f"seed list {text!r}: {token!r} is not a seed or a range; write e.g. 1-8 or 3,7,42"
            ) from None
        if last < first:
            raise FieldError("seeds", f"seed list {text!r}: range {token!r} runs backwards; write {last}-{first}")
        if len(seeds) + last - first + 1 > most:
            raise FieldError("seeds", f"seed list {text!r} has more than {most} seeds; allowed 1..{most}")
        seeds.extend(range(first, last + 1))
    return tuple(seeds)


def _seed_list(seeds: str | Sequence[int] | None, seed: int | None, batch: int) -> tuple[int, ...] | None:
    if seeds is None:
        return None
    if seed is not None:
        raise FieldError("seeds", "give either seed or a seed list (seeds), not both")
    values = parse_seeds(seeds) if isinstance(seeds, str) else tuple(seeds)
    if not values:
        raise FieldError("seeds", "the seed list (seeds) is empty; give at least one seed")
    most = LIMITS.images[1]
    if len(values) > most:
        raise FieldError("seeds", f"seed list has {len(values)} seeds; allowed 1..{most}")
    # A batch equal to the list's length says the same thing (one image per seed).
    if batch not in (1, len(values)):
        raise FieldError(
            "batch", f"a seed list makes one image per seed; batch must be 1, got {batch} (or {len(values)}, the count)"
        )
    for i, value in enumerate(values):
        try:
            _check_int("seed", value, *LIMITS.seed)
        except FieldError as e:
            raise FieldError(f"seeds.{i}", f"seeds.{i}: {e}") from None
    return values


def _check_fraction(name: str, value: object, *, above_zero: bool = False) -> float:
    allowed = "above 0 up to 1" if above_zero else "0..1"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise FieldError(name, f"{name} must be a number, {allowed}; got {value!r}")
    lo, hi = LIMITS.fraction
    if not lo <= value <= hi or (above_zero and value == lo):
        raise FieldError(name, f"{name} {value} is out of range; allowed {allowed}")
    return float(value)


def check_text(name: str, text: str) -> None:
    """A prompt-like text within the length limit and valid Unicode; every door checks prompts here."""
    most = LIMITS.prompt_chars
    if len(text) > most:
        raise FieldError(name, f"{name} is {len(text)} characters long; allowed at most {most}")
    _check_unicode(name, text)


def _check_unicode(field: str, text: str, label: str | None = None) -> None:
    """Refuse a lone surrogate (a JSON "\\udfff", or the CLI's undecodable bytes, which Python's
    surrogateescape turns into surrogates): no UTF-8 encoder takes it, so the job store, the image
    metadata and the tokenizer would each fail on it after the request was accepted."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        where = f"\\u{ord(text[e.start]):04x} at character {e.start + 1}"
        message = f"{label or field} contains an unpaired surrogate ({where}); text must be valid UTF-8"
        raise FieldError(field, message) from None


# Letters that render as nothing (Hangul fillers, the braille blank); categories below cover the rest.
_BLANK_LETTERS = frozenset("\u115f\u1160\u3164\uffa0\u2800")
# Controls, format characters (zero-width space and joiners, BOM, bidi marks) and separators.
_INVISIBLE_CATEGORIES = frozenset({"Cc", "Cf", "Zs", "Zl", "Zp"})


# Unicode's Default_Ignorable_Code_Point ranges (DerivedCoreProperties) that no category above
# covers: combining grapheme joiner, Khmer inherent vowels, Mongolian and other variation selectors.
_IGNORABLE_RANGES = (
    ("\u034f", "\u034f"), ("\u17b4", "\u17b5"), ("\u180b", "\u180f"), ("\ufe00", "\ufe0f"),
    ("\U0001bca0", "\U0001bca3"), ("\U0001d173", "\U0001d17a"), ("\U000e0000", "\U000e0fff"),
)  # fmt: skip


def _is_blank(text: str) -> bool:
    """Whether `text` shows nothing: whitespace and invisible characters only (the text itself is kept)."""
    return all(
        c.isspace()
        or c in _BLANK_LETTERS
        or unicodedata.category(c) in _INVISIBLE_CATEGORIES
        or any(lo <= c <= hi for lo, hi in _IGNORABLE_RANGES)
        for c in text
    )


def _prompts(prompt: str | Sequence[str]) -> tuple[str, ...]:
    prompts = (prompt,) if isinstance(prompt, str) else tuple(prompt)
    if not prompts:
        raise FieldError("prompt", "prompt list is empty; give at least one prompt")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise FieldError("prompt", f"prompt {i} is {type(p).__name__}, expected text")
        if _is_blank(p):
            raise FieldError("prompt", "prompt is empty or only invisible characters; describe the image to generate")
        check_text("prompt", p)
    return prompts


def _negatives(negative: str | Sequence[str] | None, n: int) -> tuple[str, ...]:
    if negative is None:
        return ("",) * n
    negatives = (negative,) * n if isinstance(negative, str) else tuple(negative)
    if len(negatives) != n:
        raise FieldError(
            "negative_prompt", f"got {len(negatives)} negative prompts for {n} prompts; give one or one per prompt"
        )
    for text in negatives:
        if not isinstance(text, str):
            raise FieldError("negative_prompt", f"negative_prompt must be text, got {text!r}")
        check_text("negative_prompt", text)
    return negatives


def _check_int(name: str, value: object, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise FieldError(name, f"{name} must be a whole number, got {value!r}")
    if not lo <= value <= hi:
        raise FieldError(name, f"{name} {value} is out of range; allowed {lo}..{hi}")


def _first_seed(seed: int | None, seed_list: tuple[int, ...] | None) -> tuple[int, bool]:
    """(the first image's seed, whether it was drawn at random): the list's first, the given one, or a draw."""
    if seed_list is not None:
        return seed_list[0], False
    if seed is None:
        return secrets.randbelow(2**32), True
    return seed, False


def _check_output(output_format: object, compression: object) -> None:
    """The output format and OpenAI's `output_compression`: a quality for webp and jpeg only (as
    OpenAI's images API defines it); png is lossless, so a compression for it is refused, not ignored."""
    if not isinstance(output_format, str) or output_format not in OUTPUT_FORMATS:
        raise FieldError("output_format", f"output_format {output_format!r} is not one of {' | '.join(OUTPUT_FORMATS)}")
    if compression is None:
        return
    _check_int("output_compression", compression, *LIMITS.compression)
    if output_format == "png":
        raise FieldError(
            "output_compression",
            f"output_compression {compression} applies to webp and jpeg only; png is lossless, so leave "
            "output_compression out or choose output_format webp or jpeg",
        )


def _check_guidance(value: object) -> float:
    return _check_number("guidance_scale", value, LIMITS.guidance, " (0 = no CFG, the Turbo default)")


def _check_number(name: str, value: object, bounds: tuple[float, float], note: str = "") -> float:
    """A finite number within `bounds`; else an error naming the field, the value and the range."""
    lo, hi = bounds
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise FieldError(name, f"{name} must be a finite number, {lo:g}..{hi:g}; got {value!r}")
    if not lo <= value <= hi:
        raise FieldError(name, f"{name} {value} is out of range; allowed {lo:g}..{hi:g}{note}")
    return float(value)


def _check_cfg(profile: ModelProfile, normalization: object, truncation: object) -> CfgOptions:
    """The request's CFG options: each as given (checked), else the model's."""
    return CfgOptions(
        profile.cfg.normalization
        if normalization is None
        else _check_number("cfg_normalization", normalization, LIMITS.cfg_normalization, " (0 = off)"),
        profile.cfg.truncation
        if truncation is None
        else _check_number("cfg_truncation", truncation, LIMITS.fraction, " (1 = off)"),
    )


def _noise_settings(variation_strength: object, variety: object, variety_until: object) -> tuple[float, float, float]:
    """Variation strength, seed variety and its span, each checked as a fraction."""
    return (
        _check_fraction("variation_strength", variation_strength),
        _check_fraction("variety", variety),
        _check_fraction("variety_until", variety_until, above_zero=True),
    )


def nearest_multiples(value: int, unit: int) -> tuple[int, int]:
    """The multiples of `unit` just below and just above `value` (the lower one at least `unit`)."""
    below = max(unit, value // unit * unit)
    return below, below + unit


def _check_given_sides(width: object, height: object, limits: ModelLimits) -> None:
    for name, value in (("width", width), ("height", height)):
        if value is not None:
            _check_side(name, value, limits.spatial_unit)


def _check_side(name: str, value: object, unit: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise FieldError(name, f"{name} must be a whole number of pixels, got {value!r}")
    if value < unit:
        raise FieldError(name, f"{name} {value} is below the minimum of {unit}")
    if value % unit:
        lo, hi = nearest_multiples(value, unit)
        message = f"{name} {value} is not a multiple of {unit} (the model's spatial unit)"
        raise FieldError(name, f"{message}; nearest valid: {lo} or {hi}")


def _or_default(size: int | None) -> int:
    return DEFAULT_SIZE if size is None else size


def _check_size(width: object, height: object, limits: ModelLimits) -> tuple[int, int]:
    for name, value in (("width", width), ("height", height)):
        _check_side(name, value, limits.spatial_unit)
    assert isinstance(width, int) and isinstance(height, int)
    if width * height > limits.max_pixels:
        raise FieldError(
            "width",
            f"size {width}x{height} is {width * height} pixels, above the limit of {limits.max_pixels} "
            "set for this model (--max-pixels); lower width or height",
        )
    return width, height
