"""GenerateRequest: generation parameters validated once, with the seed resolved."""

from __future__ import annotations

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


@dataclass(frozen=True)
class ModelLimits:
    """What a loaded (or about to be loaded) model accepts; derived from its configs."""

    spatial_unit: int  # width and height must be multiples of this (VAE factor x patch size)
    max_pixels: int
    max_tokens: int = 512


@dataclass(frozen=True)
class GenerateRequest:
    """A validated request. Build it with `GenerateRequest.create`; image i uses seed + i."""

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

    @property
    def num_images(self) -> int:
        return len(self.prompts) * self.batch

    @property
    def do_cfg(self) -> bool:
        return self.guidance_scale > 0

    def image_prompts(self) -> list[tuple[str, str, int]]:
        """(prompt, negative prompt, seed) of every image, in output order."""
        rows = []
        for p_idx, (prompt, negative) in enumerate(zip(self.prompts, self.negative_prompts, strict=True)):
            for j in range(self.batch):
                rows.append((prompt, negative, self.seed + p_idx * self.batch + j))
        return rows

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
    ) -> GenerateRequest:
        prompts = _prompts(prompt)
        negatives = _negatives(negative_prompt, len(prompts))
        _check_int("steps", steps, 1, MAX_STEPS)
        _check_int("batch", batch, 1, MAX_BATCH)
        guidance = _check_guidance(guidance_scale)
        _check_size(width, height, limits)
        total = len(prompts) * batch
        seed_was_random = seed is None
        if seed is None:
            seed = secrets.randbelow(2**32)
        _check_int("seed", seed, 0, SEED_MAX - (total - 1))
        return cls(prompts, negatives, seed, steps, guidance, width, height, batch, seed_was_random)


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
