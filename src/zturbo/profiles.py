"""Model profiles: what differs between Z-Image-Turbo and the Z-Image base model.

Both checkpoints have the same architecture and transformer config key for key; what the
published repositories differ in is the scheduler's `shift` (Turbo 3.0, base 6.0, neither with
dynamic shifting) and how the model is meant to be run: Turbo is distilled for 8 steps without
classifier-free guidance, the base model wants CFG 3-5 over 28-50 steps with a negative prompt.
A profile carries those defaults and recommendations; `choose_profile` picks one from the files
where they tell, and from an explicit preset (`--preset`, `ZTURBO_PRESET`) where they cannot
(a fine-tune with another shift, single files that carry no scheduler config).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import InvalidRequestError

AUTO = "auto"


@dataclass(frozen=True)
class CfgOptions:
    """diffusers' ZImagePipeline CFG options (0.42.1), with the same meaning.

    normalization: 0 = off; above 0 each image's guided prediction is scaled down so its norm is
    at most `normalization` times the conditional prediction's (diffusers' `cfg_normalization`,
    typed bool there but used as this factor: True is 1). truncation: steps whose normalized
    time (1000 - t) / 1000 is above it run without guidance (1.0 = never). A request's options
    are checked, with the field's name and range, by `request.GenerateRequest.create`; this
    check only keeps a hand-built value from reaching the denoiser.
    """

    normalization: float = 0.0
    truncation: float = 1.0

    def __post_init__(self) -> None:
        if not self.normalization >= 0:
            raise InvalidRequestError(f"cfg normalization {self.normalization} must be 0 (off) or a positive factor")
        if not 0 <= self.truncation <= 1:
            raise InvalidRequestError(f"cfg truncation {self.truncation} must be in 0..1 (1 = off)")


PLAIN_CFG = CfgOptions()  # diffusers' defaults: no renormalization, no truncation


@dataclass(frozen=True)
class ModelProfile:
    """One model's defaults (used when a request does not say: steps, guidance, CFG options) and
    recommended ranges and sizes (shown, not enforced: the request table's limits are the same for
    every model)."""

    name: str
    repo_id: str  # the published checkpoint this profile describes
    steps: int
    guidance: float
    steps_range: tuple[int, int]
    guidance_range: tuple[float, float]
    negative_prompt: bool  # whether the default guidance uses a negative prompt at all
    shift: float  # the published scheduler_config.json's shift
    sizes: tuple[tuple[int, int], ...]  # preset sizes (width, height), 1024² first
    cfg: CfgOptions = PLAIN_CFG

    def defaults(self, steps: int | None, guidance: float | None) -> tuple[Any, Any]:
        """A request's steps and guidance: as given, else this model's (given values are checked
        by the request, so they pass through as they came)."""
        return (self.steps if steps is None else steps, self.guidance if guidance is None else guidance)

    def describe(self) -> dict[str, Any]:
        """The profile as metadata, `zturbo info` and GET /v1/status show it (JSON types only)."""
        return {
            "name": self.name,
            "steps": self.steps,
            "guidance_scale": self.guidance,
            "steps_range": list(self.steps_range),
            "guidance_range": list(self.guidance_range),
            "negative_prompt": self.negative_prompt,
            "shift": self.shift,
            "cfg_normalization": self.cfg.normalization,
            "cfg_truncation": self.cfg.truncation,
            "sizes": size_texts(self.sizes),
        }


def size_texts(sizes: tuple[tuple[int, int], ...]) -> list[str]:
    """Preset sizes as WIDTHxHEIGHT, the form `size` takes at the HTTP doors."""
    return [f"{w}x{h}" for w, h in sizes]


# The sizes the model card's demo offers at the 1024 tier (about one megapixel, multiples of 16).
SIZES_1024: tuple[tuple[int, int], ...] = (
    (1024, 1024),
    (1152, 896),
    (896, 1152),
    (1152, 864),
    (864, 1152),
    (1248, 832),
    (832, 1248),
    (1280, 720),
    (720, 1280),
    (1344, 576),
    (576, 1344),
)

TURBO = ModelProfile(
    name="turbo",
    repo_id="Tongyi-MAI/Z-Image-Turbo",
    steps=8,
    guidance=0.0,
    steps_range=(8, 9),
    guidance_range=(0.0, 0.0),
    negative_prompt=False,
    shift=3.0,
    sizes=SIZES_1024,
)
# diffusers' defaults for the pipeline are 50 steps at guidance 5; the model card recommends
# 28-50 steps at 3-5. 28 at 4 is the fast end of that, the one most front-ends start from.
BASE = ModelProfile(
    name="base",
    repo_id="Tongyi-MAI/Z-Image",
    steps=28,
    guidance=4.0,
    steps_range=(28, 50),
    guidance_range=(3.0, 5.0),
    negative_prompt=True,
    shift=6.0,
    sizes=SIZES_1024,
)
PROFILES: dict[str, ModelProfile] = {p.name: p for p in (TURBO, BASE)}
PRESET_CHOICES = (AUTO, *PROFILES)


@dataclass(frozen=True)
class Chosen:
    """A profile and how it was chosen: 'preset' (asked for), 'repo id', 'scheduler shift', 'file
    name' (a single file's), or 'assumed' (the files could not tell; Turbo, the default model)."""

    profile: ModelProfile
    how: str

    def describe(self) -> dict[str, Any]:
        return {**self.profile.describe(), "chosen_by": self.how}


def check_preset(preset: str) -> str:
    """`preset` when it names a profile or 'auto'; a clear error otherwise."""
    if preset not in PRESET_CHOICES:
        raise InvalidRequestError(f"preset {preset!r} is not one of {', '.join(PRESET_CHOICES)}")
    return preset


def detect_profile(scheduler_config: Mapping[str, Any], repo_id: str | None) -> Chosen:
    """The profile the checkpoint's files name: its hub repo id when it is a published one, else
    its scheduler's shift when it is a published profile's; Turbo ('assumed') when neither tells."""
    for profile in PROFILES.values():
        if repo_id is not None and repo_id.lower() == profile.repo_id.lower():
            return Chosen(profile, "repo id")
    shift = scheduler_config.get("shift")
    if not scheduler_config.get("use_dynamic_shifting", False) and isinstance(shift, (int, float)):
        for profile in PROFILES.values():
            if float(shift) == profile.shift:
                return Chosen(profile, "scheduler shift")
    return Chosen(TURBO, "assumed")


def choose_profile(preset: str, scheduler_config: Mapping[str, Any], repo_id: str | None) -> Chosen:
    """An explicit preset wins over what the files say; 'auto' detects (`detect_profile`)."""
    if check_preset(preset) == AUTO:
        return detect_profile(scheduler_config, repo_id)
    return Chosen(PROFILES[preset], "preset")


def file_name_profile(preset: str, file_name: str) -> Chosen:
    """The profile of a single transformer file (ComfyUI's carry no scheduler config, so the
    packaged Turbo one would always say Turbo): an explicit preset, else the file's name, as
    ComfyUI's files are named (`z_image_turbo_bf16.safetensors`, `z_image_bf16.safetensors`),
    else Turbo, marked 'assumed'."""
    if check_preset(preset) != AUTO:
        return Chosen(PROFILES[preset], "preset")
    name = file_name.lower().replace("-", "_")
    if "turbo" in name:
        return Chosen(TURBO, "file name")
    if _names_the_base_model(name):
        return Chosen(BASE, "file name")
    return Chosen(TURBO, "assumed")


def transformer_file_profile(checkpoint: Chosen, file_name: str) -> Chosen:
    """The profile of a checkpoint run with a transformer file in place of its own (a GGUF file
    beside a diffusers directory or hub repo): the file's name where it names a model, as a
    ComfyUI tree's transformer file decides, since its weights are what runs; else the
    checkpoint's (`choose_profile`). A preset, already in `checkpoint`, decides over both."""
    if checkpoint.how == "preset":
        return checkpoint
    by_name = file_name_profile(AUTO, file_name)
    return by_name if by_name.how == "file name" else checkpoint


# The words of a precision or a quantization in distributors' file names (ComfyUI's
# `fp8_e4m3fn_scaled`, GGUF's `Q4_K_M`, `Q8_0`, `IQ4_XS`), split at underscores.
_PRECISION_WORD = re.compile(r"bf16|fp16|f16|fp32|f32|fp8|e4m3fn|e4m3|e5m2|scaled|i?q\d+|\d+|k|m|s|l|xs|xxs")


def _names_the_base_model(name: str) -> bool:
    """Whether a lower-case file name (dashes as underscores) is the base model's as its
    distributors name it: `z_image` followed by nothing but words of a precision or quantization
    (`z_image_bf16.safetensors`, `z_image_fp8_e4m3fn_scaled`, `z_image_q4_k_m.gguf`), or with the
    word `base` after it. Another `z_image_*` name (a fine-tune's, `z_image_realism_v2`, or
    `z_image_bf16_realism`) tells neither model."""
    found = re.search(r"(?:^|[^a-z0-9])z_?image(.*)$", name)
    if found is None:
        return False
    words = [w for w in re.split(r"[_.]", found.group(1)) if w and w not in ("safetensors", "gguf", "sft")]
    return "base" in words or all(_PRECISION_WORD.fullmatch(w) for w in words)


def scheduler_config(chosen: Chosen, config: Mapping[str, Any]) -> dict[str, Any]:
    """The scheduler config to run: the checkpoint's, with an explicit preset's shift.

    A preset is given where the files do not tell (or tell wrongly, as a base checkpoint run with
    Turbo's distillation LoRA does), so its shift replaces the file's; a detected profile came
    from these very files and changes nothing.
    """
    if chosen.how not in ("preset", "file name"):
        return dict(config)
    return {**config, "shift": chosen.profile.shift, "use_dynamic_shifting": False}
