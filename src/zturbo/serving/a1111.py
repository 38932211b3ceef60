"""The AUTOMATIC1111 web UI's API (`/sdapi/v1/...`), for the clients that speak it.

An A1111 body is translated once into zturbo's request fields (`translate`), then goes through
the same queue, auth, limits and error body as every other route. A1111 fields zturbo has no
counterpart for are refused by name unless they hold the value that changes nothing; the ones
that are approximated (the sampler) or replaced by the `--client-defaults` policy are listed in
the response's `info` JSON (`zturbo.mapped`), its `parameters` and the `X-ZTurbo-Mapped` header. A
pasted `infotext` fills in the fields the body leaves unset (`with_infotext`), as in A1111. The
prompt's `<lora:NAME:WEIGHT>` tags become the request's LoRAs (`extra_networks`).
docs/api.md describes the routes and the policy.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import functools
import hashlib
import io
import json
import math
import re
import threading
import time
import typing
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, ModelWrapValidatorHandler, PrivateAttr, model_validator

from ..adapters.tags import LORA_ARGS, TAG, TE_WEIGHT, UNAVAILABLE_NETWORKS, LoraTag, TagError, Tags, read_tags
from ..errors import FieldError, InvalidRequestError, JobFailedError
from ..inputs.images import InputImage
from ..profiles import TURBO, ModelProfile
from ..request import FIELD, FINITE_TEXT, LIMITS, WHOLE_TEXT, GenerateRequest, check_text, parse_loras
from . import jobs
from .loras import LoraFieldError
from .results import CLIENT_GONE, Base64Body, awaited_job, read_image
from .schemas import MODEL_ALIASES, check_body_size, text_image

if TYPE_CHECKING:
    from ..adapters.recorded import LoraFinder
    from .service import Service

PREFIX = "/sdapi/v1"
IMAGE_ROUTES = frozenset({f"{PREFIX}/img2img", f"{PREFIX}/png-info"})  # bodies that carry images
CLIENT_DEFAULTS = ("turbo", "honour")
MAPPED_HEADER = "X-ZTurbo-Mapped"
FixedCheck = Callable[[str, str, object], None]  # (where, option, value): refuses a change to a read-only option
# The Stable-Diffusion settings A1111 clients send by default; `turbo` runs Turbo's instead.
SD_STEPS = (20, 50)
SD_CFG = (1.0, 12.0)
SAMPLER = "Euler"  # zturbo's one sampler, flow-matching Euler, by A1111's name for it
SCHEDULER = "automatic"  # the model's own shifted flow-matching schedule
# A1111's samplers and schedulers (modules/sd_samplers_*.py, sd_schedulers.py), lower case: a
# name from this list runs as Euler and is reported; any other name is refused.
A1111_SAMPLERS = frozenset({
    "euler a", "euler", "lms", "heun", "dpm2", "dpm2 a", "dpm++ 2s a", "dpm++ 2m", "dpm++ sde", "dpm++ 2m sde",
    "dpm++ 2m sde heun", "dpm++ 3m sde", "dpm fast", "dpm adaptive", "restart", "ddim", "ddim cfg++", "plms",
    "unipc", "lcm", "flow_match_euler",
})  # fmt: skip
# A1111 1.10's sampler aliases (sd_samplers_*.py), read as names here. A1111's own API looks names up
# exactly (`all_samplers_map`) and runs any other, an alias too, as its default sampler; its alias
# table serves the X/Y/Z plot and prompts-from-file scripts. Every one runs as Euler here, reported.
A1111_SAMPLER_ALIASES = frozenset({
    "k_dpmpp_2m", "k_dpmpp_sde", "k_dpmpp_2m_sde", "k_dpmpp_2m_sde_heun", "k_dpmpp_2s_a", "k_dpmpp_3m_sde",
    "k_euler_a", "k_euler_ancestral", "k_euler", "k_lms", "k_heun", "k_dpm_2", "k_dpm_2_a", "k_dpm_fast",
    "k_dpm_ad", "ddim_cfgpp", "k_lcm",
})  # fmt: skip
A1111_SCHEDULERS = frozenset({
    "automatic", "uniform", "karras", "exponential", "polyexponential", "sgm_uniform", "kl_optimal",
    "align_your_steps", "simple", "normal", "ddim", "beta",
})  # fmt: skip
# A1111's `resize_mode` -> zturbo's `resize`: just resize, crop and resize, resize and fill,
# just resize (latent upscale).
RESIZE_MODES = {0: "stretch", 1: "crop", 2: "fit", 3: "stretch"}
ORIGINAL_FILL = 1  # `inpainting_fill` "original": the masked area starts from the image, as zturbo's inpaint does
IMG2IMG_ONLY = "applies to img2img only (in A1111's txt2img, to the hires fix, which this server lacks)"
SAMPLE_FORMATS = {"png": "png", "jpg": "jpeg", "jpeg": "jpeg", "webp": "webp"}
# zturbo's error field names as the A1111 body calls them.
A1111_NAMES = {
    "guidance_scale": "cfg_scale",
    "batch": "batch_size",
    "variation_seed": "subseed",
    "variation_strength": "subseed_strength",
    "strength": "denoising_strength",
    "image": "init_images",
}
# Fields whose features zturbo lacks: accepted only with a value that changes nothing.
NEUTRAL: dict[str, tuple[str, tuple[Any, ...]]] = {
    "enable_hr": ("the hires fix", (False,)),
    "restore_faces": ("face restoration", (None, False)),
    "tiling": ("tiling", (None, False)),
    "styles": ("prompt styles", (None, [])),
    "script_name": ("scripts", (None, "")),
    "alwayson_scripts": ("always-on scripts (extensions)", (None, {})),
    "seed_resize_from_h": ("seed resizing", (None, -1, 0)),
    "seed_resize_from_w": ("seed resizing", (None, -1, 0)),
    "refiner_checkpoint": ("a refiner", (None, "", "None")),
    "firstpass_image": ("a first-pass image", (None, "")),
    "initial_noise_multiplier": ("a noise multiplier", (None, 1.0)),
    "latent_mask": ("a latent mask", (None, "")),
    "eta": ("the ancestral samplers' eta", (None, 0.0, 1.0)),
    "s_churn": ("sampler churn", (None, 0.0)),
    "s_tmin": ("sampler churn", (None, 0.0)),
    "s_tmax": ("sampler churn", (None, 0.0, float("inf"))),
    "s_noise": ("sampler noise", (None, 1.0)),
    "s_min_uncond": ("negative guidance minimum sigma", (None, 0.0)),
}


class _Body(BaseModel):
    """The fields A1111's `StableDiffusionProcessing` takes through its API, with its defaults.

    Strict, as the native bodies are (schemas.py), but for the forms A1111 (pydantic v1, lax) takes
    without losing anything (`lossless`): `"20"` and `20.0` are 20, `0` and `1` a flag (A1111's UI
    sends `inpaint_full_res` as a choice's index). Each such value is reported as mapped (sent ->
    ran). A lossy or senseless one (`7.5` steps, `"abc"`, `true` for a number, `2` for a flag) is a
    400 naming the field rather than a run with a value the client did not mean."""

    model_config = ConfigDict(extra="forbid", strict=True)
    _converted: dict[str, tuple[Any, Any]] = PrivateAttr(default_factory=dict)  # field -> (sent, ran)

    @model_validator(mode="wrap")
    @classmethod
    def _lax_forms(cls, data: Any, handler: ModelWrapValidatorHandler[_Body]) -> _Body:
        if not isinstance(data, dict):
            return handler(data)
        data, converted = dict(data), {}
        for name, kind in _scalar_fields(cls).items():
            if name in data and (ran := lossless(kind, data[name])) is not data[name]:
                converted[name], data[name] = (data[name], ran), ran
        body = handler(data)
        body._converted = converted
        return body

    prompt: str = ""
    negative_prompt: str | None = ""
    styles: list[str] | None = None
    seed: int = -1
    subseed: int = -1
    subseed_strength: float = 0.0
    seed_resize_from_h: int | None = -1
    seed_resize_from_w: int | None = -1
    sampler_name: str | None = None
    sampler_index: str | None = None
    scheduler: str | None = None
    batch_size: int = 1
    n_iter: int = 1
    steps: int = 50
    cfg_scale: float = 7.0
    width: int = 512
    height: int = 512
    restore_faces: bool | None = None
    tiling: bool | None = None
    do_not_save_samples: bool = False
    do_not_save_grid: bool = False
    eta: float | None = None
    denoising_strength: float | None = None
    s_min_uncond: float | None = None
    s_churn: float | None = None
    s_tmax: float | None = None
    s_tmin: float | None = None
    s_noise: float | None = None
    override_settings: dict[str, Any] | None = None
    override_settings_restore_afterwards: bool = True
    refiner_checkpoint: str | None = None
    refiner_switch_at: float | None = None
    disable_extra_networks: bool = False
    firstpass_image: str | None = None
    comments: dict[str, Any] | None = None
    script_name: str | None = None
    script_args: list[Any] = []
    send_images: bool = True
    save_images: bool = False
    alwayson_scripts: dict[str, Any] = {}
    force_task_id: str | None = None
    infotext: str | None = None


class Txt2ImgBody(_Body):
    """Body of POST /sdapi/v1/txt2img; the hires-fix fields matter only with `enable_hr`, which is refused."""

    enable_hr: bool = False
    firstphase_width: int = 0
    firstphase_height: int = 0
    hr_scale: float = 2.0
    hr_upscaler: str | None = None
    hr_second_pass_steps: int = 0
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    hr_checkpoint_name: str | None = None
    hr_sampler_name: str | None = None
    hr_scheduler: str | None = None
    hr_prompt: str = ""
    hr_negative_prompt: str = ""
    hr_additional_modules: list[str] | None = None


class Img2ImgBody(_Body):
    """Body of POST /sdapi/v1/img2img: one init image, optionally a mask (white repaints)."""

    init_images: list[str] | None = None
    resize_mode: int = 0
    image_cfg_scale: float | None = None  # instruct-pix2pix models only; A1111 ignores it for others too
    mask: str | None = None
    mask_blur_x: int = 4
    mask_blur_y: int = 4
    mask_blur: int | None = None
    mask_round: bool = True
    inpainting_fill: int = 0
    inpaint_full_res: bool = True
    inpaint_full_res_padding: int = 0
    inpainting_mask_invert: int = 0
    initial_noise_multiplier: float | None = None
    latent_mask: str | None = None
    include_init_images: bool = False


@functools.cache
def _scalar_fields(model: type[BaseModel]) -> dict[str, type]:
    """The whole-number, number and flag fields of an A1111 body, by type (optional or not)."""
    kinds = {}
    for name, info in model.model_fields.items():
        types = set(typing.get_args(info.annotation)) - {type(None)} or {info.annotation}
        if len(types) == 1 and (kind := types.pop()) in (int, float, bool):
            kinds[name] = kind
    return kinds


def lossless(kind: type, value: object) -> object:
    """`value` as a `kind` (int, float, bool) where A1111's lax reading takes it and nothing is lost;
    otherwise `value` itself, for the strict check to refuse by name."""
    if isinstance(value, bool):
        return value  # never a number: A1111 would read `true` as 1, a client's slip
    if kind is bool:
        return bool(value) if type(value) is int and value in (0, 1) else value
    if isinstance(value, str):
        if kind is int and WHOLE_TEXT.fullmatch(value):
            return int(value)
        if kind is float and FINITE_TEXT.fullmatch(value) and math.isfinite(number := float(value)):
            return number
        return value
    if kind is int and isinstance(value, float) and value.is_integer():  # False for inf and nan
        return int(value)
    return value


class PngInfoBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    image: str


@dataclass
class Translation:
    """An A1111 body as zturbo request fields, and what was mapped (A1111 name -> (sent, ran)) or
    accepted without effect (A1111 name -> why). `body` is the body as it ran: with its `infotext`
    applied, so the answer's `parameters` show what the infotext set, as A1111's do."""

    values: dict[str, Any]
    body: _Body
    mapped: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    ignored: dict[str, str] = field(default_factory=dict)
    from_infotext: frozenset[str] = frozenset()  # the body fields the infotext set
    preview: bool | None = None  # override_settings.live_previews_enable; None: the session's option
    loras: list[LoraTag] = field(default_factory=list)  # the prompt's LoRA tags, as the request runs them


@dataclass
class Options:
    """The A1111 options this server keeps (in memory, for every A1111 client alike)."""

    samples_format: str = "png"
    jpeg_quality: int = 80
    live_previews_enable: bool = True


@dataclass
class Session:
    """The A1111 routes' state: the options, and the jobs each caller is waiting on (for progress and interrupt)."""

    policy: str
    options: Options = field(default_factory=Options)
    waiting: dict[str, tuple[str, float]] = field(default_factory=dict)  # job id -> (caller, submitted at)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def caller_jobs(self, caller: str) -> list[tuple[str, float]]:
        with self.lock:
            return sorted(((j, t) for j, (c, t) in self.waiting.items() if c == caller), key=lambda x: x[1])


# --- translation -------------------------------------------------------------------------------


def translate(
    body: _Body,
    policy: str,
    max_image_bytes: int,
    *,
    formats: bool,
    fixed: FixedCheck,
    profile: ModelProfile = TURBO,
) -> Translation:
    """An A1111 body -> zturbo request fields; refuses (FieldError naming the A1111 field) what zturbo cannot run.

    The body's `infotext` is applied first (`with_infotext`). `formats`: the request table has
    `output_format`, so `samples_format` overrides can be honoured; `fixed` checks an override of a
    read-only option (`check_fixed`). The LoRA tags' files are found by `locate_loras`, which needs
    the server's LoRA directory.
    """
    pasted = with_infotext(body)
    try:
        t = _translate(pasted.body, policy, max_image_bytes, formats=formats, fixed=fixed, profile=profile)
    except FieldError as e:
        raise blame_infotext(e, pasted.applied) from None
    t.ignored = pasted.ignored | t.ignored
    t.from_infotext = pasted.applied
    if "prompt" in pasted.applied:  # the infotext's prompt ran: its tags' recorded hashes come along, in order
        t.loras = [replace(tag, sha256=h) for tag, h in zip(t.loras, pasted.lora_hashes, strict=False)]
    return t


def _translate(
    body: _Body, policy: str, max_image_bytes: int, *, formats: bool, fixed: FixedCheck, profile: ModelProfile
) -> Translation:
    _check_neutral(body)
    if body.batch_size < 1 or body.n_iter < 1:
        name = "batch_size" if body.batch_size < 1 else "n_iter"
        raise FieldError(name, f"{name} {getattr(body, name)} must be at least 1")
    t = Translation({
        "prompt": body.prompt,
        "negative_prompt": body.negative_prompt or "",
        "width": body.width,
        "height": body.height,
        "batch": body.batch_size * body.n_iter,  # one queue job; batches never change an image
    }, body, mapped=dict(body._converted))  # fmt: skip
    extra_networks(body, t)
    if body.seed != -1:  # A1111's -1: a random seed
        t.values["seed"] = body.seed
    if body.subseed_strength:
        t.values["variation_strength"] = body.subseed_strength
        if body.subseed != -1:
            t.values["variation_seed"] = body.subseed
    _policy(body, policy, t, profile)
    _sampler(body, t)
    _override_settings(body.override_settings or {}, t, formats=formats, fixed=fixed)
    if isinstance(body, Img2ImgBody):
        _img2img(body, t, max_image_bytes)
    elif body.denoising_strength is not None:  # A1111's txt2img reads it only for the hires fix, refused here
        t.ignored["denoising_strength"] = IMG2IMG_ONLY
    return t


def _check_neutral(body: _Body) -> None:
    for name, (what, neutral) in NEUTRAL.items():
        value = getattr(body, name, None)
        if name in type(body).model_fields and value not in neutral:
            allowed = " or ".join(json.dumps(v) for v in neutral if v is not None)
            raise FieldError(
                name, f"{name} {json.dumps(value)}: {what} is not available on this server; send {allowed}"
            )


def _policy(body: _Body, policy: str, t: Translation, profile: ModelProfile) -> None:
    """Steps and CFG: as sent under `honour`; under `turbo`, Stable Diffusion's usual values become
    the served model's defaults (its profile's: Turbo's 8 steps without CFG, the base model's 28 at 4)."""
    steps, cfg = body.steps, body.cfg_scale
    if policy == "turbo" and SD_STEPS[0] <= steps <= SD_STEPS[1]:
        map_field(t, "steps", steps, profile.steps)
        steps = profile.steps
    if policy == "turbo" and SD_CFG[0] <= cfg <= SD_CFG[1]:
        map_field(t, "cfg_scale", cfg, profile.guidance)
        cfg = profile.guidance
    t.values["steps"], t.values["guidance_scale"] = steps, cfg
    if cfg == 0 and t.values["negative_prompt"]:
        t.ignored["negative_prompt"] = "unused at cfg_scale 0 (no classifier-free guidance)"


def map_field(t: Translation, name: str, sent: Any, ran: Any) -> None:
    """Report the body's field `name` as run with `ran`; a value read in a lax form (`"20"` -> 20)
    keeps the form the client sent."""
    t.mapped[name] = (t.mapped[name][0] if name in t.mapped else sent, ran)


def _sampler(body: _Body, t: Translation) -> None:
    """Every A1111 sampler name (or alias) runs as zturbo's flow-matching Euler, reported; any other is
    refused. A1111 reads `sampler_name`, else `sampler_index`: the one it does not read is reported
    unused, whatever it holds, and only the one read is checked."""
    given = {f: name for f in ("sampler_name", "sampler_index") if (name := getattr(body, f))}
    if given:
        read, name = next(iter(given.items()))  # sampler_name first: A1111's precedence
        key = name.strip().lower().removesuffix(" karras").removesuffix(" exponential")
        if key not in A1111_SAMPLERS | A1111_SAMPLER_ALIASES:
            raise FieldError(read, f"{read} {name!r} is not an A1111 sampler; zturbo runs {SAMPLER!r}")
        if name != SAMPLER:
            map_field(t, "sampler_name", name, SAMPLER)
        if len(given) == 2 and given["sampler_index"] != name:
            t.ignored["sampler_index"] = f"sampler_name {name!r} is read instead, as A1111 does when both are given"
    _scheduler(body, t)


def _scheduler(body: _Body, t: Translation) -> None:
    scheduler = body.scheduler
    if scheduler is not None and scheduler.lower() != SCHEDULER:
        if scheduler.lower() not in A1111_SCHEDULERS:
            raise FieldError(
                "scheduler", f"scheduler {scheduler!r} is not an A1111 scheduler; zturbo runs {SCHEDULER!r}"
            )
        map_field(t, "scheduler", scheduler, SCHEDULER)


# --- extra-network tags ------------------------------------------------------------------------

# The tags' grammar and reading are `adapters.tags`' (imageio reads an image's text with them too).
SKIPPED_NETWORK = "no extra network of this server (A1111 skips one it does not know); taken out of the prompt"
NEGATIVE_TAGS = "A1111 applies the prompt's tags only; these stay in the negative prompt's text, as A1111 encodes it"
_LORA_PLACE = re.compile(r"\bloras\.(\d+)\b")


def extra_networks(body: _Body, t: Translation) -> None:
    """The prompt's extra-network tags, taken out of the text the encoder sees as A1111 does: a LoRA
    tag becomes one of the request's `loras` (reported in `mapped`), a hypernetwork is refused, and a
    network A1111 would skip as unknown is reported in `ignored`. The negative prompt's tags stay
    text, as A1111 reads tags in the prompt only; they are reported too.

    The texts are checked as sent (length, Unicode) and the tags counted against the request's LoRA
    limit before they are read further: nothing here touches the LoRA directory (`locate_loras`
    does, after the whole request is valid), and the reports repeat no more than a valid prompt."""
    check_text("prompt", body.prompt)  # the request table's own limit and message
    check_text("negative_prompt", body.negative_prompt or "")
    tags = _prompt_tags(body.prompt)
    loras = list(tags.loras)
    t.values["prompt"] = tags.prompt
    if skipped := [text for _, text in tags.others]:
        t.ignored["extra_networks"] = f"{', '.join(skipped)}: {SKIPPED_NETWORK}"
    if loras and body.disable_extra_networks:
        t.ignored["loras"] = "disable_extra_networks: the tags are taken out of the prompt and not applied, as in A1111"
        loras = []
    elif len(loras) > LIMITS.loras:
        raise FieldError("prompt", f"prompt has {len(loras)} <lora:...> tags; allowed at most {LIMITS.loras} "
                                   "(the request's LoRA limit)")  # fmt: skip
    elif given := [tag.text for tag in loras if tag.te is not None]:
        t.ignored["loras"] = f"{', '.join(given)}: {TE_WEIGHT}; each runs at its UNet weight"
    if negative := [m.group(0).lstrip(" \t") for m in TAG.finditer(body.negative_prompt or "")]:
        t.ignored["negative_prompt.extra_networks"] = f"{', '.join(negative)}: {NEGATIVE_TAGS}"
    t.loras = loras
    set_loras(t)


def _prompt_tags(prompt: str) -> Tags:
    """The prompt's tags (`read_tags`); refuses what zturbo cannot apply and A1111 would: a
    hypernetwork, a LoRA tag's `dyn` or an extension's argument (each would change the image)."""
    try:
        tags = read_tags(prompt)
    except TagError as e:
        raise FieldError("prompt", f"prompt {e}") from None
    for network, text in tags.others:
        if network in UNAVAILABLE_NETWORKS:
            raise FieldError("prompt", f"prompt tag {text}: {UNAVAILABLE_NETWORKS[network]}; remove the tag")
    for tag in tags.loras:
        if tag.unapplied:
            raise FieldError("prompt", f"prompt tag {tag.text}: {'; '.join(tag.unapplied)}; write {LORA_ARGS}")
    return tags


def set_loras(t: Translation) -> None:
    """The tags as the request's `loras`, and the mapping reported: the tags as sent, the LoRAs as they run."""
    t.values.pop("loras", None)
    t.mapped.pop("loras", None)
    if t.loras:
        runs = [{"name": tag.name, "weight": tag.weight} for tag in t.loras]
        t.values["loras"] = runs
        t.mapped["loras"] = ([tag.text for tag in t.loras], runs)


def lora_error(err: FieldError, t: Translation) -> FieldError:
    """An error about the request's `loras` (their form when validated, their files at submit) as
    the prompt's tags: `loras.1` becomes the tag it came from, the field `prompt`."""
    where = err.field or ""
    head, _, index = where.partition(".")
    if head != "loras" or not t.loras:
        return err

    def tag(match: re.Match[str]) -> str:  # another place the message names (`the file loras.0 names`)
        i = int(match.group(1))
        return f"the tag {t.loras[i].text}" if i < len(t.loras) else match.group(0)

    message = _LORA_PLACE.sub(tag, str(err).removeprefix(f"{where}: "))
    place = f"prompt tag {t.loras[int(index)].text}" if index.isdigit() and int(index) < len(t.loras) else "prompt"
    return type(err)("prompt", f"{place}: {message}")


def locate_loras(t: Translation, finder: LoraFinder) -> None:
    """Each LoRA tag's file (`LoraFinder.locate`, as `generate --from` finds an image's LoRAs): by
    the infotext's recorded hash where the named file is missing or another (A1111's paste renames
    such a tag), else by its name as the native API resolves it, else as the one file of the
    directory that A1111 names so (its file name, without folder or `.safetensors`). A tag nothing
    finds keeps its name: submit's check refuses it, naming it. What the hashes could not confirm is
    reported: a file whose hash is another (the image will differ), or a hash zturbo cannot check
    (A1111's own, of the tensor data), whose file runs by its name."""
    from ..imageio import LORA_HASHES

    notes = []
    for i, tag in enumerate(t.loras):
        located = finder.locate(tag.name, tag.sha256)
        t.loras[i] = replace(tag, name=located.name or tag.name)
        if located.note:
            notes.append(f"{tag.text}: {located.note}" + ("; the image will differ" if located.differs else ""))
    if notes:
        t.ignored[f"infotext.{LORA_HASHES}"] = "; ".join(notes)
    set_loras(t)


def _img2img(body: Img2ImgBody, t: Translation, max_image_bytes: int) -> None:
    """init_images, mask and the inpaint fields onto zturbo's image, mask, strength, resize and paste-back."""
    images = body.init_images or []
    if len(images) != 1:
        raise FieldError("init_images", f"init_images has {len(images)} images; this server takes exactly 1")
    if body.resize_mode not in RESIZE_MODES:
        allowed = ", ".join(map(str, RESIZE_MODES))
        raise FieldError("resize_mode", f"resize_mode {body.resize_mode} is not one of {allowed}")
    t.values["image"] = text_image("init_images", images[0], max_image_bytes)
    t.values["resize"] = RESIZE_MODES[body.resize_mode]
    if body.resize_mode == 2:
        map_field(t, "resize_mode", 2, "fit (padded, not filled with stretched edges)")
    t.values["strength"] = 0.75 if body.denoising_strength is None else body.denoising_strength
    if body.mask:
        _inpaint(body, t, max_image_bytes)


def _inpaint(body: Img2ImgBody, t: Translation, max_image_bytes: int) -> None:
    mask = text_image("mask", body.mask or "", max_image_bytes)
    if body.inpainting_mask_invert not in (0, 1):
        raise FieldError(
            "inpainting_mask_invert", f"inpainting_mask_invert {body.inpainting_mask_invert} is not 0 or 1"
        )
    if body.inpainting_mask_invert == 1:
        mask = _inverted(mask)
    if body.mask_blur is None and body.mask_blur_x != body.mask_blur_y:
        raise FieldError(
            "mask_blur_y", "mask_blur_x and mask_blur_y differ; zturbo blurs alike both ways: give mask_blur"
        )
    # A1111 always pastes the original back through the blurred mask; zturbo's paste-back does the same.
    t.values |= {
        "mask": mask,
        "paste_back": True,
        "mask_blur": body.mask_blur_x if body.mask_blur is None else body.mask_blur,
    }
    if body.inpainting_fill != ORIGINAL_FILL:
        map_field(t, "inpainting_fill", body.inpainting_fill, ORIGINAL_FILL)
    if body.inpaint_full_res:
        t.ignored["inpaint_full_res"] = "the whole image is inpainted at the request's size (no crop around the mask)"


def _inverted(mask: InputImage | str) -> InputImage:
    """The mask with repaint and keep swapped (`inpainting_mask_invert: 1`)."""
    if isinstance(mask, str):
        # zturbo's alpha mask (transparent repaints) has no inverse in the request; an image mask
        # derived here from the alpha would also change how the image itself is read (flattened).
        raise FieldError(
            "inpainting_mask_invert",
            "inpainting_mask_invert 1 with mask 'alpha': the alpha mask (transparent repaints) cannot be inverted; "
            "send the inverted mask as an image, or inpainting_mask_invert 0",
        )
    from PIL import ImageOps

    from ..inputs.images import from_pil

    return from_pil(ImageOps.invert(mask.image.convert("L")), "mask", "the inverted mask")


def _override_settings(settings: dict[str, Any], t: Translation, *, formats: bool, fixed: FixedCheck) -> None:
    """A request's `override_settings`: the same rules as POST /options, for this request only.
    The format and quality stay as set here; `output_settings` fills in the session's for the rest."""
    for name, value in settings.items():
        where = f"override_settings.{name}"
        if name == "samples_format":
            fmt = _sample_format(value, formats, where)
            if formats:  # without the field, png (the only format allowed) is what runs anyway
                t.values["output_format"] = fmt
        elif name == "jpeg_quality":
            t.values["output_compression"] = _quality(value, where)
        elif name == "live_previews_enable":
            t.preview = _flag(value, where)
        else:
            fixed(where, name, value)


def output_settings(t: Translation, options: Options, *, formats: bool) -> None:
    """The image format and quality: the request's override where it set one, else the session's
    option; a quality is dropped (and reported) for PNG, as A1111's applies to JPEG and WebP only."""
    fmt = t.values.setdefault("output_format", SAMPLE_FORMATS[options.samples_format]) if formats else "png"
    if fmt != "png":
        t.values.setdefault("output_compression", options.jpeg_quality)
    elif "output_compression" in t.values:
        del t.values["output_compression"]
        t.ignored["override_settings.jpeg_quality"] = "applies to jpg and webp only; this image is png"


def _sample_format(value: object, formats: bool, name: str) -> str:
    allowed = SAMPLE_FORMATS if formats else {"png": "png"}
    if not isinstance(value, str) or value.lower() not in allowed:
        raise FieldError(name, f"{name} {value!r} is not one of {', '.join(allowed)}")
    return allowed[value.lower()]


def _flag(value: object, name: str) -> bool:
    if not isinstance(value, bool):
        raise FieldError(name, f"{name} {value!r} is not true or false")
    return value


def _quality(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 100:
        raise FieldError(name, f"{name} {value!r} is not a whole number 1..100")
    return value


# --- infotext ----------------------------------------------------------------------------------

# What a pasted A1111 infotext sets, as A1111's API applies it (its paste fields' API names):
# parse_a1111's field names (zturbo's) -> the body's.
INFOTEXT_FIELDS = {
    "prompt": "prompt", "negative_prompt": "negative_prompt", "steps": "steps", "guidance_scale": "cfg_scale",
    "seed": "seed", "width": "width", "height": "height", "variation_seed": "subseed",
    "variation_strength": "subseed_strength", "strength": "denoising_strength", "mask_blur": "mask_blur",
}  # fmt: skip
# Labels parse_a1111 does not turn into fields (zturbo's table has none), read here: label -> body field.
INFOTEXT_LABELS = {"Sampler": "sampler_name", "Schedule type": "scheduler", "Batch size": "batch_size"}
# Labels of parse_a1111's fields where the A1111 names differ from the table's (or it has none).
_INFOTEXT_NAMES = {"prompt": "Prompt", "width": "Size-1", "height": "Size-2"}
_CONTROL = ("control_type", "control_scale", "control_start", "control_end")


@dataclass
class Pasted:
    """A body with its `infotext` applied (`with_infotext`)."""

    body: _Body
    ignored: dict[str, str] = field(default_factory=dict)  # `infotext.<label>` -> why it had no effect
    applied: frozenset[str] = frozenset()  # the body fields the infotext set
    lora_hashes: tuple[str | None, ...] = ()  # `Lora hashes` of the infotext prompt's LoRA tags, in order


def with_infotext(body: _Body) -> Pasted:
    """A1111's `infotext` (pasted generation parameters) applied: its values fill in the fields the
    body leaves unset, and a field the body sends wins, as in A1111. The prompt keeps its tags: they
    go the way of the body's own (`extra_networks`), with the hashes the infotext records for them."""
    from ..imageio import LORA_HASHES

    if not body.infotext:
        return Pasted(body)
    values, unused, hashes = _infotext_values(body, body.infotext)
    sent = set(body.model_fields_set)
    if "sampler_index" in sent:  # the body's sampler, by either name, wins over the infotext's
        sent.add("sampler_name")
    updates: dict[str, Any] = {}
    for (label, name), value in values.items():
        if name not in sent:
            updates[name] = value
            continue
        held = "sampler_index" if name == "sampler_name" and not body.sampler_name else name  # the body's sampler
        if getattr(body, held) != value:
            unused[f"infotext.{label}"] = f"the body's {held} {getattr(body, held)!r} is used, as in A1111"
    if "prompt" not in updates and any(hashes):  # A1111 reads them to find the infotext prompt's LoRAs only
        unused[f"infotext.{LORA_HASHES}"] = "they find the infotext prompt's LoRAs; the body's prompt is used"
    # Every value is already of its field's type (parse_a1111 reads numbers by the request table).
    return Pasted(body.model_copy(update=updates), unused, frozenset(updates), hashes)


def blame_infotext(err: FieldError, applied: frozenset[str]) -> FieldError:
    """An error about a value the infotext set says so: the client did not send that field itself."""
    if err.field not in applied:
        return err
    return FieldError(err.field, f"{err} (the value comes from infotext)")


def _infotext_values(
    body: _Body, text: str
) -> tuple[dict[tuple[str, str], Any], dict[str, str], tuple[str | None, ...]]:
    """The infotext's values by (label, body field), the labels it has that this body cannot use
    (-> why), and the short hash `Lora hashes` records for each LoRA tag of its prompt (or None)."""
    from ..imageio import LORA_HASHES, parse_a1111, split_a1111

    try:
        params, ignored = parse_a1111(text)
        prompt, _, raw = split_a1111(text)
    except (InvalidRequestError, ValueError) as e:  # ValueError: a quoted value that is not JSON
        raise FieldError("infotext", f"infotext is not A1111 generation parameters: {e}") from None
    params.pop("paste_back", None)  # parse_a1111's reading of `Mask blur`; a mask turns paste-back on here anyway
    params["prompt"] = prompt  # as written, its LoRA tags in it: A1111's paste sets the prompt so
    hashes = tuple(lora["sha256"] for lora in params.pop("loras", ()))
    values: dict[tuple[str, str], Any] = {}
    unused: dict[str, str] = {}
    for name, value in params.items():
        label = _infotext_label(name)
        why = _infotext_unusable(body, name)
        if why is None:
            values[(label, INFOTEXT_FIELDS[name])] = value
        else:
            unused[f"infotext.{label}"] = why
    for label, name in INFOTEXT_LABELS.items():
        if label in raw:
            values[(label, name)] = _batch_size(raw[label]) if name == "batch_size" else raw[label]
    for entry in ignored:  # labels zturbo has no setting for (Clip skip, Hires upscale, ...)
        if entry.startswith("<"):
            continue  # a prompt tag (`<lora:x:1:1:8> (why)`): extra_networks reads the prompt's tags itself
        if entry == LORA_HASHES:
            unused[f"infotext.{entry}"] = "the infotext's prompt has no <lora:...> tag they belong to"
        elif entry.partition(" (")[0] not in INFOTEXT_LABELS:
            unused[f"infotext.{entry}"] = "not a setting this server has"
    return values, unused, hashes


def _infotext_label(name: str) -> str:
    from ..imageio import CONTROLNET_UNIT

    if name in _CONTROL:
        return CONTROLNET_UNIT
    return _INFOTEXT_NAMES.get(name) or FIELD[name].a1111 or name


def _infotext_unusable(body: _Body, name: str) -> str | None:
    """Why a parsed infotext field has no effect on this body; None where it applies."""
    target = INFOTEXT_FIELDS.get(name)
    if name in _CONTROL:
        return "the A1111 routes take no ControlNet image"
    if target is None:  # zturbo's own labels (seed variety)
        return "not an A1111 setting; zturbo's native API (/v1) takes it"
    if target in ("denoising_strength", "mask_blur") and not isinstance(body, Img2ImgBody):
        return IMG2IMG_ONLY
    return None


def _batch_size(text: str) -> int:
    if not (text.isascii() and text.isdigit()):
        raise FieldError("infotext", f"infotext Batch size {text!r} is not a whole number")
    return int(text)


# --- options -----------------------------------------------------------------------------------

# Options that describe the server; a POST may send them only with the value they have (or, for
# the checkpoint, any name of the served model).
READ_ONLY = ("sd_model_checkpoint", "sd_checkpoint_hash", "sd_vae", "CLIP_stop_at_last_layers",
             "eta_noise_seed_delta", "show_progress_every_n_steps", "zturbo_client_defaults")  # fmt: skip


def model_names(service: Service) -> tuple[str, ...]:
    """The names the served model answers to: its title first."""
    config_name = service.settings.config.model
    title = Path(config_name.rstrip("/")).name or config_name  # a local directory goes by its name, as A1111's files do
    return tuple(dict.fromkeys((title, config_name, *service.settings.model_names, *MODEL_ALIASES)))


def current_options(service: Service, session: Session) -> dict[str, Any]:
    o = session.options
    return {
        "sd_model_checkpoint": model_names(service)[0],
        "sd_checkpoint_hash": None,
        "sd_vae": "Automatic",
        "CLIP_stop_at_last_layers": 1,
        "eta_noise_seed_delta": 0,
        "show_progress_every_n_steps": 1,
        "samples_format": o.samples_format,
        "jpeg_quality": o.jpeg_quality,
        "live_previews_enable": o.live_previews_enable,
        "zturbo_client_defaults": session.policy,
    }


def check_fixed(service: Service, session: Session, where: str, name: str, value: object) -> None:
    """Refuse (naming `where`) an unknown option, or a read-only one sent with another value than it
    has: a model switch that would not happen is an error, never a silent success."""
    now = current_options(service, session)
    if name == "sd_model_checkpoint":
        if value not in model_names(service):
            raise FieldError(where, f"{where} {value!r} is not served here; this server runs {now[name]!r} only "
                                    f"(names: {', '.join(model_names(service))})")  # fmt: skip
    elif name in READ_ONLY:
        if value != now[name]:
            raise FieldError(where, f"{where} is {now[name]!r} on this server and cannot be changed (got {value!r})")
    else:
        raise FieldError(where, f"{where} is not an option this server has; it has: {', '.join(now)}")


def set_options(service: Service, session: Session, values: dict[str, Any], *, formats: bool) -> None:
    """Apply the settable options; refuse (naming it) any other, and any model switch, before changing anything."""
    changes: dict[str, Any] = {}
    for name, value in values.items():
        if name == "samples_format":
            changes[name] = _sample_format(value, formats, name)
        elif name == "jpeg_quality":
            changes[name] = _quality(value, name)
        elif name == "live_previews_enable":
            changes[name] = _flag(value, name)
        else:
            check_fixed(service, session, name, name, value)
    for name, value in changes.items():
        setattr(session.options, name, "jpg" if value == "jpeg" else value)


# --- answers -----------------------------------------------------------------------------------


def job_images(images_dir: Path, job: jobs.Job, files: Base64Body) -> tuple[list[str], list[dict[str, Any]]]:
    """The job's images as slots of `files` (their base64 in the answer) and each one's metadata,
    read back from the file as written."""
    from ..imageio import read_metadata

    slots, metas = [], []
    for im in job.images:
        data = read_image(images_dir, im.file, im.id)
        slots.append(files.slot(data))
        metas.append(read_metadata(io.BytesIO(data)))  # type: ignore[arg-type]  # Pillow opens file objects
    return slots, metas


def info_json(metas: list[dict[str, Any]], t: Translation, policy: str, job: jobs.Job, body: _Body) -> dict[str, Any]:
    """A1111's `info` (its `Processed.js()` keys) from what ran, plus `zturbo`: the job, the policy,
    what was mapped and what had no effect."""
    from ..imageio import a1111_parameters

    first = metas[0]
    inputs = first.get("inputs") or {}
    return {
        "prompt": first["prompt"],
        "all_prompts": [m["prompt"] for m in metas],
        "negative_prompt": first["negative_prompt"],
        "all_negative_prompts": [m["negative_prompt"] for m in metas],
        "seed": first["seed"],
        "all_seeds": [m["seed"] for m in metas],
        "subseed": first.get("variation_seed") or -1,
        "all_subseeds": [m.get("variation_seed") or -1 for m in metas],
        "subseed_strength": first.get("variation_strength", 0.0),
        "width": first["width"],
        "height": first["height"],
        "sampler_name": SAMPLER,
        "scheduler": SCHEDULER,
        "cfg_scale": first["guidance_scale"],
        "steps": first["steps"],
        "batch_size": body.batch_size,
        "n_iter": body.n_iter,
        "restore_faces": False,
        "sd_model_name": first["model"],
        "sd_model_hash": (first.get("model_fingerprint") or "")[:10] or None,
        "denoising_strength": inputs.get("strength"),
        "extra_generation_params": {},
        "index_of_first_image": 0,
        "infotexts": [a1111_parameters(m) for m in metas],
        "styles": [],
        "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(job.created_at)),
        "clip_skip": 1,
        "version": f"zturbo {first.get('zturbo_version', '')}",
        "zturbo": _zturbo_info(t, policy, job),
    }


def _zturbo_info(t: Translation, policy: str, job: jobs.Job) -> dict[str, Any]:
    return {
        "job_id": job.id,
        "client_defaults": policy,
        "mapped": {name: {"sent": sent, "ran": ran} for name, (sent, ran) in t.mapped.items()},
        "ignored": t.ignored,
        "warnings": list(job.warnings),  # what the run dropped (a prompt past the token limit), as /v1's jobs say
    }


def parameters_json(body: _Body, t: Translation, info: dict[str, Any] | None) -> dict[str, Any]:
    """A1111's `parameters` (the request as received), with every mapped field as it ran and the
    seeds as drawn; the images are left out unless `include_init_images`, as A1111 does."""
    params = body.model_dump()
    if isinstance(body, Img2ImgBody) and not body.include_init_images:
        params["init_images"], params["mask"] = None, None
    ran = {name: ran for name, (_, ran) in t.mapped.items() if name in params}
    if info is not None:
        ran |= {"seed": info["seed"], "subseed": info["subseed"]}
    return params | ran


# --- queueing ----------------------------------------------------------------------------------


def submit(
    service: Service, request: GenerateRequest, job_id: str, caller: str, preview: bool, t: Translation
) -> jobs.Job:
    """Queue through the service (LoRA checks, queue limits, metrics), asking for previews or not; a
    LoRA it refuses is named as the prompt's tag it came from."""
    try:
        return service.submit(request, job_id, caller, preview=preview)
    except LoraFieldError as e:
        raise blame_infotext(lora_error(e, t), t.from_infotext) from None


def caller_of(request: Request) -> str:
    """Who is asking, for progress and interrupt: A1111's API has no user field, so the client's
    address and the user name of its HTTP Basic credentials (A1111 clients send the key as Basic
    `user:key`; only one key passes, so the name is the part that tells callers apart). The name is
    hashed to bound its length: the caller is stored with each job, the key never."""
    host = request.client.host if request.client else "unknown"
    scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
    user = basic_user(credentials) if scheme.lower() == "basic" else ""
    who = hashlib.sha256(user.encode()).hexdigest()[:16] if user else "anonymous"
    return f"a1111:{host}:{who}"


def relabel(err: FieldError) -> FieldError:
    """A request-table error naming the field as the A1111 body does."""
    name = A1111_NAMES.get((err.field or "").partition(".")[0])
    if name is None:
        return err
    return FieldError(name, str(err).replace(err.field or "", name, 1))


# --- progress ----------------------------------------------------------------------------------


def progress_view(service: Service, session: Session, caller: str, skip_image: bool) -> dict[str, Any]:
    """A1111's progress for the caller's waiting jobs: their fraction done, an ETA, the state, a preview."""
    waiting = session.caller_jobs(caller)
    state = {"skipped": False, "interrupted": False, "stopping_generation": False, "job": "", "job_count": 0,
             "job_timestamp": "0", "job_no": 0, "sampling_step": 0, "sampling_steps": 0}  # fmt: skip
    idle = {"progress": 0.0, "eta_relative": 0.0, "state": state, "current_image": None, "textinfo": None}
    jobs_now = [(j, t, _status(service, j)) for j, t in waiting]
    current = next(((n, j, t, s) for n, (j, t, s) in enumerate(jobs_now) if s is not None and not s.finished), None)
    if current is None:
        return idle
    number, job_id, submitted, job = current
    step, steps = service.supervisor.progress(job_id) or (0, 0)
    done = (number + (step / steps if steps else 0.0)) / len(jobs_now)
    elapsed = time.time() - submitted
    state |= {"job": f"job {job_id}", "job_count": len(jobs_now), "job_no": number, "sampling_step": step,
              "sampling_steps": steps, "interrupted": job.cancel_requested,
              "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(submitted))}  # fmt: skip
    position = service.store.position(job)
    return {
        "progress": round(done, 4),
        "eta_relative": round(elapsed / done - elapsed, 3) if done > 0 else 0.0,
        "state": state,
        "current_image": None if skip_image else _preview(service, job_id),
        "textinfo": f"queued, position {position}" if position is not None else f"step {step} of {steps}",
    }


def _status(service: Service, job_id: str) -> jobs.Job | None:
    try:
        return service.store.get(job_id)
    except jobs.JobNotFoundError:
        return None


def _preview(service: Service, job_id: str) -> str | None:
    return service.preview(job_id)


def interrupt(service: Service, session: Session, caller: str) -> list[str]:
    """Cancel the caller's waiting jobs: a running one stops after its current step, a queued one at once."""
    cancelled = []
    for job_id, _ in session.caller_jobs(caller):
        # The job may have finished (or gone) since the list was read: skip it, cancel the rest.
        with contextlib.suppress(jobs.JobNotFoundError, jobs.JobConflictError):
            service.cancel(job_id)
            cancelled.append(job_id)
    return cancelled


# --- png-info ----------------------------------------------------------------------------------


def png_info(text: str, max_bytes: int) -> dict[str, Any]:
    """An image's generation parameters as A1111 reads them: the `parameters` text, the other text
    items, and the parsed fields by A1111's labels (empty for an image without readable parameters).
    PNG text chunks, or WebP's and JPEG's EXIF UserComment and XMP, read as imageio reads files."""
    from ..imageio import A1111_KEY, metadata_text, parse_a1111

    image = text_image("image", text, max_bytes)
    assert not isinstance(image, str)
    try:
        items = metadata_text(image.data)
    except InvalidRequestError:  # a broken XMP packet: A1111 answers unreadable metadata with nothing
        items = {}
    info = items.pop(A1111_KEY, "") or _zturbo_parameters(items)
    if not info:
        return {"info": "", "items": items, "parameters": {}}
    try:
        params, _ = parse_a1111(info)
    except InvalidRequestError:
        return {"info": info, "items": items, "parameters": {}}
    return {"info": info, "items": items, "parameters": _a1111_labels(params)}


def _zturbo_parameters(items: dict[str, str]) -> str:
    """The A1111 text of the `zturbo` metadata; "" when absent or not zturbo's (any text can be crafted)."""
    from ..imageio import METADATA_KEY, a1111_parameters

    if METADATA_KEY not in items:
        return ""
    try:
        return a1111_parameters(json.loads(items[METADATA_KEY]))
    except (ValueError, KeyError, TypeError, AttributeError):  # not JSON, or JSON of another shape
        return ""


def _a1111_labels(params: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"Prompt": params.pop("prompt", ""), "Negative prompt": params.pop("negative_prompt", "")}
    if "width" in params:
        out["Size-1"], out["Size-2"] = params.pop("width"), params.pop("height")
    for name, value in params.items():
        label = FIELD[name].a1111 if name in FIELD else None
        out[label or name] = value
    return out


# --- routes ------------------------------------------------------------------------------------


def a1111_routes(service: Service) -> APIRouter:
    """The `/sdapi/v1` routes, sharing one `Session` (the options, the callers' waiting jobs)."""
    session = Session(policy=service.settings.client_defaults)
    r = APIRouter(prefix=PREFIX, tags=["a1111"])
    _generation_routes(r, service, session)
    _state_routes(r, service, session)
    _listing_routes(r, service, session)
    return r


def _generation_routes(r: APIRouter, service: Service, session: Session) -> None:
    @r.post("/txt2img")
    async def txt2img(body: Txt2ImgBody, request: Request) -> Response:
        """A1111's text-to-image; `info.zturbo.mapped` and the X-ZTurbo-Mapped header say what was mapped."""
        return await _generate(service, session, body, request)

    @r.post("/img2img")
    async def img2img(body: Img2ImgBody, request: Request) -> Response:
        """A1111's img2img and inpaint: one init image, an optional mask (white repaints)."""
        return await _generate(service, session, body, request)

    @r.post("/png-info")
    async def png_info_route(body: PngInfoBody) -> dict[str, Any]:
        """The generation parameters an image carries (A1111's `parameters` text, or zturbo's metadata)."""
        return await run_in_threadpool(png_info, body.image, service.settings.max_input_bytes)


def _state_routes(r: APIRouter, service: Service, session: Session) -> None:
    @r.get("/progress")
    def progress(request: Request, skip_current_image: bool = Query(False)) -> dict[str, Any]:
        """The caller's waiting A1111 jobs: progress 0..1, ETA, state, and a preview of the running one."""
        return progress_view(service, session, caller_of(request), skip_current_image)

    @r.post("/interrupt")
    def interrupt_route(request: Request) -> dict[str, Any]:
        """Cancel the caller's waiting A1111 jobs (their requests answer with no images)."""
        return {"interrupted": interrupt(service, session, caller_of(request))}

    @r.get("/options")
    def get_options() -> dict[str, Any]:
        return current_options(service, session)

    @r.post("/options")
    def post_options(values: dict[str, Any]) -> dict[str, Any]:
        """Sets samples_format, jpeg_quality and live_previews_enable; refuses every other change by name."""
        set_options(service, session, values, formats="output_format" in FIELD)
        return current_options(service, session)


def _listing_routes(r: APIRouter, service: Service, session: Session) -> None:
    @r.get("/sd-models")
    def sd_models() -> list[dict[str, Any]]:
        name = model_names(service)[0]
        return [{"title": name, "model_name": name, "hash": None, "sha256": None, "filename": name, "config": None}]

    @r.get("/samplers")
    def samplers() -> list[dict[str, Any]]:
        return [{"name": SAMPLER, "aliases": ["flow_match_euler", "k_euler"], "options": {}}]

    @r.get("/schedulers")
    def schedulers() -> list[dict[str, Any]]:
        item = {"name": SCHEDULER, "label": "Automatic", "aliases": None, "default_rho": -1, "need_inner_model": False}
        return [item]


async def _generate(service: Service, session: Session, body: _Body, request: Request) -> Response:
    s = service.settings
    images = [*(getattr(body, "init_images", None) or []), getattr(body, "mask", None) or ""]
    check_body_size(len(await request.body()), sum(map(len, images)), s.max_body_bytes, s.max_input_bytes)
    t, generate = await run_in_threadpool(_request, service, session, body)
    job_id, caller = jobs.new_id(), caller_of(request)
    with session.lock:
        session.waiting[job_id] = (caller, time.time())
    try:
        preview = session.options.live_previews_enable if t.preview is None else t.preview
        await run_in_threadpool(submit, service, generate, job_id, caller, preview, t)
        job = await awaited_job(service, request, job_id)
    finally:
        with session.lock:
            session.waiting.pop(job_id, None)
    if job is None:
        return Response(status_code=CLIENT_GONE)
    files = Base64Body()
    # t.body: the body with its infotext applied, which the answer's `parameters` show, as A1111's do.
    answer = await run_in_threadpool(_answer, service, session, t.body, t, job, files)
    headers = {MAPPED_HEADER: ",".join(t.mapped)} if t.mapped else None
    return await run_in_threadpool(files.response, answer, headers)


def _request(service: Service, session: Session, body: _Body) -> tuple[Translation, GenerateRequest]:
    """The body translated and validated once (seeds drawn), the output format and quality applied."""
    formats = "output_format" in FIELD
    fixed = functools.partial(check_fixed, service, session)
    limits = service.settings.limits
    t = translate(
        body, session.policy, service.settings.max_input_bytes, formats=formats, fixed=fixed, profile=limits.profile
    )
    output_settings(t, session.options, formats=formats)
    try:
        # Every field is checked before the LoRA directory is read: the tags' names and weights too.
        request = GenerateRequest.from_fields(t.values, limits)
        if t.loras:
            locate_loras(t, service.loras.finder())
            request = dataclasses.replace(request, loras=parse_loras(t.values["loras"]))  # the files found
        return t, request
    except FieldError as e:
        raise blame_infotext(relabel(lora_error(e, t)), t.from_infotext) from None


def _answer(
    service: Service, session: Session, body: _Body, t: Translation, job: jobs.Job, files: Base64Body
) -> dict[str, Any]:
    """A1111's answer: base64 images (slots of `files`), the parameters as run, the info JSON text."""
    if job.status == jobs.CANCELLED:
        info = {"zturbo": _zturbo_info(t, session.policy, job) | {"status": job.status}}
        return {"images": [], "parameters": parameters_json(body, t, None), "info": json.dumps(info)}
    if job.status != jobs.SUCCEEDED:
        error = job.error or {"type": "internal_error", "message": f"job {job.id} ended {job.status}"}
        raise JobFailedError(error["type"], error["message"])
    # Without send_images the files are read for their metadata alone: no slot enters the answer.
    encoded, metas = job_images(service.images_dir, job, files if body.send_images else Base64Body())
    info = info_json(metas, t, session.policy, job, body)
    return {
        "images": encoded if body.send_images else [],
        "parameters": parameters_json(body, t, info),
        "info": json.dumps(info),
    }


def basic_password(credentials: str) -> str:
    """The password of an `Authorization: Basic` value (A1111 clients send the key as one; any user name)."""
    return _basic_pair(credentials)[1]


def basic_user(credentials: str) -> str:
    """The user name of an `Authorization: Basic` value; empty where it does not decode."""
    return _basic_pair(credentials)[0]


def _basic_pair(credentials: str) -> tuple[str, str]:
    try:
        text = base64.b64decode(credentials.strip(), validate=True).decode()
    except ValueError:  # binascii.Error and UnicodeDecodeError both are
        return "", ""
    user, _, password = text.partition(":")
    return user, password
