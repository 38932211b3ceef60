"""GenerateRequest: generation parameters validated once, with the seed resolved."""

from __future__ import annotations

import dataclasses
import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field

from .errors import InvalidRequestError

DEFAULT_STEPS = 8
DEFAULT_GUIDANCE = 0.0
DEFAULT_SIZE = 1024
MAX_STEPS = 100
MAX_GUIDANCE = 30.0
MAX_BATCH = 64
SEED_MAX = 2**63 - 1
# Seed variety: the fraction of the steps that see the noisy prompt embedding by default. Early
# steps fix the composition; leaving the last ones clean lets the image follow the prompt again.
DEFAULT_VARIETY_UNTIL = 0.25


@dataclass(frozen=True)
class ModelLimits:
    """What a loaded (or about to be loaded) model accepts; derived from its configs."""

    spatial_unit: int  # width and height must be multiples of this (VAE factor x patch size)
    max_pixels: int
    max_tokens: int = 512


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
    extra: dict[str, object] = field(default_factory=dict, compare=False)
    images: tuple[ImageSpec, ...] = ()
    seeds: tuple[int, ...] | None = None  # an explicit seed list, when one was given
    variation_strength: float = 0.0
    variety: float = 0.0  # seed-variety strength; 0 = the plain image
    variety_until: float = DEFAULT_VARIETY_UNTIL

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
            self.variation_strength,
            self.variety,
            self.variety_until,
        )

    @classmethod
    def combine(cls, requests: Sequence[GenerateRequest]) -> GenerateRequest:
        """One request making the images of all `requests` (which must agree on `shared()`), in order.

        The engine makes image i of a batch exactly as it would alone, so combining changes no pixel.
        """
        first = requests[0]
        for other in requests[1:]:
            if other.shared() != first.shared():
                raise ValueError("combined requests must share size, steps, guidance and noise settings")
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
        steps: int = DEFAULT_STEPS,
        guidance_scale: float = DEFAULT_GUIDANCE,
        width: int = DEFAULT_SIZE,
        height: int = DEFAULT_SIZE,
        batch: int = 1,
        seeds: str | Sequence[int] | None = None,
        variation_seed: int | None = None,
        variation_strength: float = 0.0,
        variety: float = 0.0,
        variety_until: float = DEFAULT_VARIETY_UNTIL,
    ) -> GenerateRequest:
        prompts = _prompts(prompt)
        negatives = _negatives(negative_prompt, len(prompts))
        _check_int("steps", steps, 1, MAX_STEPS)
        _check_int("batch", batch, 1, MAX_BATCH)
        guidance = _check_guidance(guidance_scale)
        _check_size(width, height, limits)
        strength = _check_fraction("variation_strength", variation_strength)
        variety = _check_fraction("variety", variety)
        variety_until = _check_fraction("variety_until", variety_until, above_zero=True)
        seed_list = _seed_list(seeds, seed, batch)
        per_prompt = len(seed_list) if seed_list is not None else batch
        total = len(prompts) * per_prompt
        seed_was_random = seed is None and seed_list is None
        if seed_list is not None:
            seed = seed_list[0]
        elif seed is None:
            seed = secrets.randbelow(2**32)
        varying = strength > 0
        # A1111: with a variation strength the seed stays and the variation seed counts up instead.
        _check_int("seed", seed, 0, SEED_MAX - (0 if varying else total - 1))
        if variation_seed is None and varying:
            variation_seed = secrets.randbelow(2**32)
        if variation_seed is not None:
            span = 0 if seed_list is not None else total - 1
            _check_int("variation_seed", variation_seed, 0, SEED_MAX - span)
        specs = _specs(prompts, negatives, seed, seed_list, per_prompt, variation_seed if varying else None)
        return cls(
            prompts, negatives, seed, steps, guidance, width, height, per_prompt, seed_was_random,
            images=specs, seeds=seed_list, variation_strength=strength, variety=variety,
            variety_until=variety_until,
        )  # fmt: skip


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


def parse_seeds(text: str) -> tuple[int, ...]:
    """`"1-8"`, `"3,7,42"` or a mix (`"1-3,10"`) -> the seeds in the order given."""
    seeds: list[int] = []
    for token in (t.strip() for t in text.split(",")):
        lo, dash, hi = token.partition("-")
        try:
            first, last = (int(lo), int(hi)) if dash else (int(token), int(token))
        except ValueError:
            raise InvalidRequestError(
                f"seed list {text!r}: {token!r} is not a seed or a range; write e.g. 1-8 or 3,7,42"
            ) from None
        if last < first:
            raise InvalidRequestError(f"seed list {text!r}: range {token!r} runs backwards; write {last}-{first}")
        if len(seeds) + last - first + 1 > MAX_BATCH:
            raise InvalidRequestError(f"seed list {text!r} has more than {MAX_BATCH} seeds; allowed 1..{MAX_BATCH}")
        seeds.extend(range(first, last + 1))
    return tuple(seeds)


def _seed_list(seeds: str | Sequence[int] | None, seed: int | None, batch: int) -> tuple[int, ...] | None:
    if seeds is None:
        return None
    if seed is not None:
        raise InvalidRequestError("give either seed or a seed list (seeds), not both")
    if batch != 1:
        raise InvalidRequestError(f"a seed list makes one image per seed; batch must be 1, got {batch}")
    values = parse_seeds(seeds) if isinstance(seeds, str) else tuple(seeds)
    if not values:
        raise InvalidRequestError("seed list is empty; give at least one seed")
    if len(values) > MAX_BATCH:
        raise InvalidRequestError(f"seed list has {len(values)} seeds; allowed 1..{MAX_BATCH}")
    for value in values:
        _check_int("seed", value, 0, SEED_MAX)
    return values


def _check_fraction(name: str, value: object, *, above_zero: bool = False) -> float:
    allowed = "above 0 up to 1" if above_zero else "0..1"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidRequestError(f"{name} must be a number, {allowed}; got {value!r}")
    if not 0.0 <= value <= 1.0 or (above_zero and value == 0):
        raise InvalidRequestError(f"{name} {value} is out of range; allowed {allowed}")
    return float(value)


def _prompts(prompt: str | Sequence[str]) -> tuple[str, ...]:
    prompts = (prompt,) if isinstance(prompt, str) else tuple(prompt)
    if not prompts:
        raise InvalidRequestError("prompt list is empty; give at least one prompt")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise InvalidRequestError(f"prompt {i} is {type(p).__name__}, expected text")
        if not p.strip():
            raise InvalidRequestError("prompt is empty; describe the image to generate")
    return prompts


def _negatives(negative: str | Sequence[str] | None, n: int) -> tuple[str, ...]:
    if negative is None:
        return ("",) * n
    if isinstance(negative, str):
        return (negative,) * n
    negatives = tuple(negative)
    if len(negatives) != n:
        raise InvalidRequestError(f"got {len(negatives)} negative prompts for {n} prompts; give one or one per prompt")
    return negatives


def _check_int(name: str, value: object, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequestError(f"{name} must be a whole number, got {value!r}")
    if not lo <= value <= hi:
        raise InvalidRequestError(f"{name} {value} is out of range; allowed {lo}..{hi}")


def _check_guidance(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidRequestError(f"guidance_scale must be a finite number, got {value!r}")
    if not 0.0 <= value <= MAX_GUIDANCE:
        raise InvalidRequestError(
            f"guidance_scale {value} is out of range; allowed 0..{MAX_GUIDANCE:g} (0 = no CFG, the Turbo default)"
        )
    return float(value)


def nearest_multiples(value: int, unit: int) -> tuple[int, int]:
    """The multiples of `unit` just below and just above `value` (the lower one at least `unit`)."""
    below = max(unit, value // unit * unit)
    return below, below + unit


def _check_size(width: object, height: object, limits: ModelLimits) -> None:
    unit = limits.spatial_unit
    for name, value in (("width", width), ("height", height)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidRequestError(f"{name} must be a whole number of pixels, got {value!r}")
        if value < unit:
            raise InvalidRequestError(f"{name} {value} is below the minimum of {unit}")
        if value % unit:
            lo, hi = nearest_multiples(value, unit)
            raise InvalidRequestError(
                f"{name} {value} is not a multiple of {unit} (the model's spatial unit); nearest valid: {lo} or {hi}"
            )
    assert isinstance(width, int) and isinstance(height, int)
    if width * height > limits.max_pixels:
        raise InvalidRequestError(
            f"size {width}x{height} is {width * height} pixels, above the limit of {limits.max_pixels} "
            f"(raise it with --max-pixels or ZTURBO_MAX_PIXELS)"
        )
