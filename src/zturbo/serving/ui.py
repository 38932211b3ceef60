"""The web UI: a Gradio page whose every handler is a client of the server's own HTTP API.

There is no second path to the engine: a Generate click is a `POST /v1/jobs` like any API call, so
UI images land in the same queue and history, and `--api-key` applies to the page's calls too (the
user types the key; it lives in per-session server state, never in the page source).
This module holds the page's plain helpers and never imports gradio; `ui_app` builds and mounts
the page (`zturbo serve`).
"""

from __future__ import annotations

import base64
import io
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import ORIGIN_NAMES
from ..inputs.spec import DEFAULT_CONTROL_SCALE, DEFAULT_STRENGTH, INPAINT_CONTROL_DIM
from ..profiles import PLAIN_CFG
from ..request import DEFAULT_OUTPUT_FORMAT, DEFAULT_VARIETY_UNTIL, FIELD, SEED_MAX
from .apiclient import ApiError, Event

if TYPE_CHECKING:
    from PIL import Image

ONE_MP = 1024 * 1024
RATIOS = ((1, 1), (4, 3), (3, 4), (16, 9), (9, 16), (3, 2), (2, 3))
CUSTOM = "Custom"
RANDOM_SEED = -1  # the seed field's "pick one for me" value (A1111's convention)
HISTORY_PAGE = 24  # jobs per history view; each image is fetched once, then served from disk
LORA_ROWS = 4  # LoRA pickers on the form (a name and a weight each); the API takes more
NO_LORA = ""  # a picker's "none" choice
GUIDANCE_INFO = (
    "0 turns classifier-free guidance (CFG) off: the Turbo default, one model call per step, and the "
    "negative prompt is not used. Above 0, each step makes two calls and follows the negative prompt."
)
CFG_NORMALIZATION_INFO = (
    "diffusers' cfg_normalization: 0 = off; above 0 each image's guided prediction is scaled down to at "
    "most this times the positive prediction's norm. Acts only with guidance above 0."
)
CFG_TRUNCATION_INFO = (
    "diffusers' cfg_truncation: steps whose normalized time (1000 − t)/1000 is above it run without "
    "guidance (one model call); 1 = never. Acts only with guidance above 0."
)
VARIATION_INFO = (
    "Blends the seed's noise toward the variation seed's: 0 = the plain image, 0.05–0.3 = close "
    "variations. Image i of a job uses variation seed + i (-1 = random)."
)
VARIETY_INFO = (
    "Seeded noise on the prompt embedding for the first quarter of the steps, so that seeds differ "
    "more in composition; 0 = off."
)


class FormError(ValueError):
    """A form value the UI will not send; the message names the value and what is allowed."""


# ---- sizes -------------------------------------------------------------------------------------


def preset_size(rw: int, rh: int, pixels: int, unit: int) -> tuple[int, int]:
    """Width and height with ratio rw:rh and about `pixels` pixels, each the nearest multiple of `unit`."""
    width = math.sqrt(pixels * rw / rh)
    height = width * rh / rw
    return max(unit, round(width / unit) * unit), max(unit, round(height / unit) * unit)


def aspect_presets(unit: int) -> dict[str, tuple[int, int]]:
    """Dropdown label -> (width, height): every ratio at ~1 MP, then at ~2 MP (`unit`: the model's)."""
    presets = {}
    for mp in (1, 2):
        for rw, rh in RATIOS:
            w, h = preset_size(rw, rh, mp * ONE_MP, unit)
            presets[f"{rw}:{rh} · {w}×{h} ({mp} MP)"] = (w, h)
    return presets


def preset_for(width: object, height: object, unit: int) -> str:
    """The preset label of this exact size, else CUSTOM."""
    for label, size in aspect_presets(unit).items():
        if size == (width, height):
            return label
    return CUSTOM


# ---- form -> job parameters ----------------------------------------------------------------------
# Only conversions live here (a form number to JSON, -1 to "random"); the server's request
# validator decides what is allowed, so the page shows the same messages as the API gives.


def _whole(name: str, value: object) -> object:
    """A form number as a JSON whole number; other values go on for the server to name. The page's
    number fields keep what was typed (`ui_app.KEEP_TYPED`), so a fraction is refused here, naming
    it, and an int (however large) passes unchanged."""
    if value is None or value == "":
        raise FormError(f"{name} is empty; enter a whole number")
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, float):
        raise FormError(f"{name} must be a whole number, got {value!r}")
    return value


def _number(name: str, value: object) -> object:
    if value is None or value == "":
        raise FormError(f"{name} is empty; enter a number")
    return float(value) if isinstance(value, int) and not isinstance(value, bool) else value


# A seed as typed: a whole number, optionally written with a zero fraction ("42.0").
_SEED_TEXT = re.compile(r"([+-]?)0*([0-9]+?)(?:\.0*)?")
_SEED_DIGITS = len(str(SEED_MAX))


def _seed(name: str, value: object) -> object:
    """A seed field's value as the job's seed: None for RANDOM_SEED. The page's seed fields are
    text (a number field is a JavaScript number in the browser, which would round a seed above
    2**53), so text is read here exactly; a number (a direct caller's) is taken as `_whole` takes it."""
    seed = _seed_text(name, value) if isinstance(value, str) else _whole(name, value)
    return None if seed == RANDOM_SEED else seed


def _seed_text(name: str, text: str) -> int:
    typed = text.strip()
    if not typed:
        raise FormError(f"{name} is empty; enter a whole number ({RANDOM_SEED} = random)")
    match = _SEED_TEXT.fullmatch(typed)
    if match is None:
        raise FormError(f"{name} must be a whole number ({RANDOM_SEED} = random), got {typed}")
    sign, digits = match.groups()
    # Far too long for any seed; int() would also refuse past 4300 digits, with its own message.
    if len(digits) > _SEED_DIGITS:
        shown = typed if len(typed) <= 40 else f"{typed[:24]}… ({len(digits)} digits)"
        raise FormError(f"{name} {shown} is out of range; allowed {RANDOM_SEED} (random) or 0..{SEED_MAX}")
    return int(sign + digits)


def job_params(
    prompt: str,
    negative_prompt: str,
    width: object,
    height: object,
    steps: object,
    guidance: object,
    seed: object,
    n: object,
    variation_seed: object = RANDOM_SEED,
    variation_strength: object = 0.0,
    variety: object = 0.0,
    cfg_normalization: object = PLAIN_CFG.normalization,
    cfg_truncation: object = PLAIN_CFG.truncation,
    loras: Sequence[tuple[object, object]] = (),
) -> dict[str, Any]:
    """The `POST /v1/jobs` body for the form's values; raises FormError only for a value the form
    cannot send (empty, or not a whole number where one belongs). `loras`: the pickers' (name,
    weight) pairs, a pair without a name left out."""
    body = {
        "prompt": prompt or "",
        "negative_prompt": negative_prompt or "",
        "width": _whole("width", width),
        "height": _whole("height", height),
        "steps": _whole("steps", steps),
        "guidance_scale": _number("guidance", guidance),
        # Always sent, like guidance: the form shows the model's values, so the job runs what it shows.
        "cfg_normalization": _number("CFG normalization", cfg_normalization),
        "cfg_truncation": _number("CFG truncation", cfg_truncation),
        "seed": _seed("seed", seed),
        "n": _whole("number of images", n),
        "variation_seed": _seed("variation seed", variation_seed),
        "variation_strength": _number("variation strength", variation_strength),
        "variety": _number("seed variety", variety),
    }
    chosen = [(str(name).strip(), weight) for name, weight in loras if name is not None and str(name).strip()]
    if chosen:
        body["loras"] = [{"name": name, "weight": _number(f"weight of {name}", w)} for name, w in chosen]
    return body


def lora_pairs(values: Sequence[object]) -> list[tuple[object, object]]:
    """The pickers' values, name then weight for each row, as (name, weight) pairs."""
    return list(zip(values[0::2], values[1::2], strict=True))


# ---- input images --------------------------------------------------------------------------------
# The image fields hold Gradio's uploads (file paths) and the mask editor's value; the job body
# carries each file's bytes unchanged, as base64, so the server hashes the very file the user chose.

NO_RESIZE = ""  # the resize choice "none": every input must have the request's size
AS_GIVEN = ""  # the control type "as given": the control image is already preprocessed
SIDES = ("left", "right", "top", "bottom")
MARGIN_KEYS = tuple(f"outpaint_{side}" for side in SIDES)
INPUT_KEYS = (
    "image", "mask_editor", "strength_default", "strength", "resize", "mask_blur", "mask_padding", "paste_back",
    *MARGIN_KEYS, "control_image", "control_type", "control_scale", "control_start", "control_end",
)  # fmt: skip
# Settings sent only when the form holds another value than its default, which is the server's.
INPUT_DEFAULTS: dict[str, object] = {
    "resize": NO_RESIZE, "mask_blur": 0, "mask_padding": 0, "paste_back": False, "control_type": AS_GIVEN,
    "control_scale": DEFAULT_CONTROL_SCALE, "control_start": 0.0, "control_end": 1.0,
}  # fmt: skip
_WHOLE_SETTINGS = ("mask_blur", "mask_padding")
_NUMBER_SETTINGS = ("control_scale", "control_start", "control_end")
MASK_COLOR = (255, 60, 172)  # the brush's colour; only where it paints matters
# The mask editor shows an input image scaled to at most this many pixels a side: it uploads its
# whole canvas as the user paints, and a mask this fine is still finer than the latents it masks.
EDITOR_SIDE = 1024
STRENGTH_INFO = (
    "How far the input image is noised: about strength × steps steps run; 1 repaints from noise. "
    "The default is {img2img} for image-to-image and {inpaint} with a mask or outpaint."
).format(img2img=DEFAULT_STRENGTH["img2img"], inpaint=f"{DEFAULT_STRENGTH['inpaint']:g}")


def input_params(values: Mapping[str, Any]) -> dict[str, Any]:
    """The input-image fields of the job body: each image file as base64, the mask painted in the
    editor, and each setting the form holds at other than its default (the server refuses a
    setting that does not fit the rest, naming it, rather than the form dropping it)."""
    body: dict[str, Any] = {}
    for field in ("image", "control_image"):
        if values.get(field):
            body[field] = base64.b64encode(_read_upload(values[field], field)).decode("ascii")
    if values.get("image"):
        mask = editor_mask(values.get("mask_editor"), oriented_size(values["image"]))
        if mask is not None:
            body["mask"] = base64.b64encode(mask).decode("ascii")
    if not values.get("strength_default", True):
        body["strength"] = _number("strength", values.get("strength"))
    margins = [_whole(f"outpaint {side}", values.get(key, 0)) for side, key in zip(SIDES, MARGIN_KEYS, strict=True)]
    if any(margins):
        body["outpaint"] = margins
    for key, default in INPUT_DEFAULTS.items():
        value = values.get(key, default)
        if value is None or value == default:
            continue
        if key in _WHOLE_SETTINGS:
            value = _whole(key.replace("_", " "), value)
        elif key in _NUMBER_SETTINGS:
            value = _number(key.replace("_", " "), value)
        body[key] = value
    return body


def _read_upload(path: str | Path, field: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        what = field.replace("_", " ")
        raise FormError(f"the {what} is no longer on the server ({e.strerror}); upload it again") from None


def oriented_size(path: str | Path, field: str = "image") -> tuple[int, int]:
    """An image file's width and height as shown: EXIF orientation applied, as the browser draws it
    and as the server reads it."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            width, height = image.size
            turned = image.getexif().get(0x0112) in (5, 6, 7, 8)  # the orientations that swap the axes
    except OSError as e:
        raise FormError(f"the {field.replace('_', ' ')} cannot be read ({e}); upload it again") from None
    return (height, width) if turned else (width, height)


def editor_mask(editor: Mapping[str, Any] | None, size: tuple[int, int]) -> bytes | None:
    """The mask painted in the image editor, as the API takes it: a PNG of `size` (the input
    image's), white wherever a brush layer is painted (at any opacity) and black elsewhere; None when
    nothing is painted."""
    from PIL import Image, ImageChops

    if not editor:
        return None
    if editor.get("background") is None:  # the editor lost the image it paints on
        raise FormError("the mask editor holds no image to paint on; upload the input image again")
    painted: Image.Image | None = None
    for layer in editor.get("layers") or ():
        alpha = layer.convert("RGBA").getchannel("A")
        alpha = alpha if alpha.size == size else alpha.resize(size, Image.Resampling.NEAREST)
        painted = alpha if painted is None else ImageChops.lighter(painted, alpha)
    if painted is None or painted.getbbox() is None:
        return None
    buffer = io.BytesIO()
    painted.point(lambda a: 255 if a else 0).save(buffer, format="PNG")
    return buffer.getvalue()


def editor_picture(path: str | Path) -> bytes | None:
    """The picture the mask editor shows for an input image over EDITOR_SIDE pixels on a side: a PNG
    scaled down to it, EXIF orientation applied as the browser applies it; None for a smaller image,
    shown as it is. The mask is scaled back up to the image's size (`editor_mask`)."""
    from PIL import Image, ImageOps

    if max(oriented_size(path)) <= EDITOR_SIDE:
        return None
    with Image.open(path) as image:
        picture = ImageOps.exif_transpose(image)
        picture.thumbnail((EDITOR_SIDE, EDITOR_SIDE))
        if picture.mode not in ("RGB", "RGBA", "L"):
            picture = picture.convert("RGBA" if "A" in picture.getbands() else "RGB")
        buffer = io.BytesIO()
        picture.save(buffer, format="PNG")
    return buffer.getvalue()


def mask_layer(mask: Image.Image) -> Image.Image:
    """A mask as the server reads it, as an editor layer painted where it repaints: white (a mask
    without alpha) or transparent (a mask with alpha), binarized at half as the server does."""
    from PIL import Image, ImageOps

    if mask.mode in ("RGBA", "LA", "PA") or "transparency" in mask.info:
        repaint = ImageOps.invert(mask.convert("RGBA").getchannel("A"))
    else:
        repaint = mask.convert("L")
    alpha = repaint.point(lambda v: 255 if v >= 128 else 0)
    return Image.merge("RGBA", (*(Image.new("L", alpha.size, c) for c in MASK_COLOR), alpha))


def input_size(
    image: str | None, control: str | None, margins: Sequence[object], resize: str | None, unit: int
) -> tuple[tuple[int, int] | None, str]:
    """The width and height the inputs give the request, and a line that says so: the input image's
    size plus the outpaint margins, else the control image's. None (the form's size stays) without an
    input, with a resize mode (the inputs are then fitted to the form's size), or when the size is
    not a multiple of `unit` (the line says what to do)."""
    if resize or not (image or control):
        return None, ""
    width, height = oriented_size(image or control, "image" if image else "control_image")  # type: ignore[arg-type]
    what = "input image" if image else "control image"
    if image:
        left, right, top, bottom = (int(m) if isinstance(m, (int, float)) else 0 for m in margins)
        width, height = width + left + right, height + top + bottom
        what += " with the outpaint margins" if left or right or top or bottom else ""
    if width % unit or height % unit:
        return None, (
            f"The {what} is {width}×{height}, not a multiple of {unit}: choose a resize mode, and a width and height."
        )
    return (width, height), f"Width and height follow the {what}: {width}×{height}."


def form_body(values: Mapping[str, Any], loras: Sequence[tuple[object, object]] = ()) -> dict[str, Any]:
    """The `POST /v1/jobs` body for the whole form (keys: `GENERATE_KEYS`); raises FormError as
    `job_params` does, and when an input file is gone from the server."""
    body = job_params(
        values["prompt"], values["negative_prompt"], values["width"], values["height"], values["steps"],
        values["guidance_scale"], values["seed"], values["n"], values["variation_seed"],
        values["variation_strength"], values["variety"], values["cfg_normalization"], values["cfg_truncation"],
        loras=loras,
    )  # fmt: skip
    return body | input_params(values)


def controlnet_text(info: Mapping[str, Any] | None) -> str:
    """A line about the server's ControlNet (the model info's `controlnet`); empty without one."""
    if not info:
        return ""
    name = _md_escape(str(info.get("name") or "ControlNet"))
    dim = info.get("control_in_dim")
    if dim is None:
        return f"ControlNet: {name}."
    if dim >= INPAINT_CONTROL_DIM:
        return f"ControlNet: {name}, with an inpaint input (a mask or outpaint may go with a control image)."
    return f"ControlNet: {name}, without an inpaint input (a control image goes with no mask and no outpaint)."


# ---- parameters -> form --------------------------------------------------------------------------

LORA_KEYS = tuple(key for i in range(LORA_ROWS) for key in (f"lora_{i}", f"lora_weight_{i}"))
TEXT_KEYS = (
    "prompt", "negative_prompt", "width", "height", "steps", "guidance_scale", "cfg_normalization",
    "cfg_truncation", "seed", "n", "variation_seed", "variation_strength", "variety",
)  # fmt: skip
GENERATE_KEYS = (*TEXT_KEYS, *INPUT_KEYS)  # what Generate reads, in order, before the LoRA pickers
FORM_KEYS = ("preset", *GENERATE_KEYS, *LORA_KEYS)  # what a fill may set
_RANGED = (
    "steps", "guidance_scale", "cfg_normalization", "cfg_truncation", "seed", "batch", "variation_seed",
    "variation_strength", "variety",
)  # fmt: skip
# The form fields with a range, as the request table bounds them (keyed by their HTTP names).
RANGES: dict[str, tuple[float, float]] = {FIELD[k].api_name: FIELD[k].range() or (0, 0) for k in _RANGED}


def form_values(
    params: dict[str, Any], unit: int, files: Mapping[str, str] | None = None
) -> tuple[dict[str, Any], list[str]]:
    """Form values for job or PNG parameters, and a note for each value left out because the form
    cannot hold it (it is reported, not silently changed); `unit` is the model's spatial unit and
    `files` a job's input images by field (files the UI keeps), when it has them."""
    values: dict[str, Any] = {}
    notes: list[str] = []
    for key in ("prompt", "negative_prompt"):
        if isinstance(params.get(key), str):
            values[key] = params[key]
    if "variation_seed" in params and params["variation_seed"] is None:
        values["variation_seed"] = RANDOM_SEED  # none recorded: the form's "random", not a stale value
    for key, (lo, hi) in RANGES.items():
        value = params.get(key)
        if value is None:
            continue
        if lo <= value <= hi:
            values[key] = value
        else:
            notes.append(f"{key} {value} is outside {_num(lo)} to {_num(hi)}, so it was not filled in")
    if isinstance(params.get("width"), int) and isinstance(params.get("height"), int):
        values["width"], values["height"] = params["width"], params["height"]
        values["preset"] = preset_for(params["width"], params["height"], unit)
        if params["width"] % unit or params["height"] % unit:
            notes.append(
                f"size {params['width']}×{params['height']} is not a multiple of {unit}; change it before generating"
            )
    values |= _lora_values(params, notes)
    values |= _input_values(params, notes, files)
    return values, notes + _not_in_form(params)


# The input settings a PNG's A1111 text gives at the top level; zturbo's own records nest them in `inputs`.
_A1111_INPUT_KEYS = ("strength", "mask_blur", "control_type", "control_scale", "control_start", "control_end")


def _input_values(params: dict[str, Any], notes: list[str], files: Mapping[str, str] | None) -> dict[str, Any]:
    """The input settings' form values. Parameters that record their inputs (zturbo's: `inputs`,
    None or {} for text to image) set every setting, the defaults where they recorded none; A1111
    text sets what it names. The images come from `files` (a job's stored inputs by field, as the
    UI keeps them), else a note names what the form lacks."""
    recorded = params.get("inputs")
    settings = dict(recorded) if isinstance(recorded, dict) else {}
    settings |= {key: params[key] for key in _A1111_INPUT_KEYS if params.get(key) is not None}
    values: dict[str, Any] = {"strength_default": True, **INPUT_DEFAULTS, **dict.fromkeys(MARGIN_KEYS, 0)}
    if not settings:  # text to image when the parameters say so; else they do not say
        return values | {"image": None, "mask_editor": None, "control_image": None} if "inputs" in params else {}
    strength = settings.get("strength")
    if strength is not None and strength != DEFAULT_STRENGTH.get(str(settings.get("mode"))):
        values |= {"strength_default": False, "strength": strength}
    for key in INPUT_DEFAULTS:
        if settings.get(key) is not None:
            values[key] = settings[key]
    if isinstance(settings.get("outpaint"), list) and len(settings["outpaint"]) == len(MARGIN_KEYS):
        values |= dict(zip(MARGIN_KEYS, settings["outpaint"], strict=True))
    for key in ("strength", *_WHOLE_SETTINGS, *_NUMBER_SETTINGS):
        lo, hi = FIELD[key].range() or (0, 0)
        if key in values and not lo <= values[key] <= hi:
            notes.append(f"{key} {values.pop(key)} is outside {_num(lo)} to {_num(hi)}, so it was not filled in")
    if files is not None:
        return values | _input_files(settings, files, notes)
    if settings.get("images") or settings.get("mode"):
        notes.append(f"it was made from input images ({_mode_text(settings)}); the form does not hold them: add them")
    return values


def _input_files(settings: Mapping[str, Any], files: Mapping[str, str], notes: list[str]) -> dict[str, Any]:
    """The image fields' values from a job's stored inputs: the input image, its mask as the editor's
    layer, and the control image."""
    from PIL import Image

    image = files.get("image")
    editor = None
    if image is not None:
        layers = []
        if "mask" in files:
            with Image.open(files["mask"]) as mask:
                layers.append(mask_layer(mask))
        editor = {"background": image, "layers": layers, "composite": image}
    if settings.get("mask_from_alpha"):
        notes.append("its mask was the input image's transparency, which the form cannot take: paint the mask")
    return {"image": image, "mask_editor": editor, "control_image": files.get("control_image")}


def _mode_text(inputs: Mapping[str, Any]) -> str:
    mode = str(inputs.get("mode") or "img2img")
    return ("text to image" if mode == "txt2img" else mode) + (" with a ControlNet" if inputs.get("controlled") else "")


def _lora_values(params: dict[str, Any], notes: list[str]) -> dict[str, Any]:
    """The pickers' values for the parameters' LoRAs (all of them cleared when the parameters list
    none); nothing when the parameters do not say (e.g. A1111 text from another tool)."""
    loras = params.get("loras")
    if not isinstance(loras, list):
        return {}
    refs = [(r["name"], r.get("weight", 1.0)) for r in loras if isinstance(r, dict) and isinstance(r.get("name"), str)]
    if len(refs) > LORA_ROWS:
        left = ", ".join(name for name, _ in refs[LORA_ROWS:])
        notes.append(f"the form has {LORA_ROWS} LoRA pickers, so {left} was not filled in")
    values: dict[str, Any] = {}
    for i in range(LORA_ROWS):
        name, weight = refs[i] if i < len(refs) else (NO_LORA, 1.0)
        values[f"lora_{i}"], values[f"lora_weight_{i}"] = name, weight
    return values


def _num(value: float) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _not_in_form(params: dict[str, Any]) -> list[str]:
    """Notes for the recorded options the form has no field for, when they differ from its defaults
    (every other job parameter has a field: `RANGES`, the text, size, LoRA and input fields)."""
    notes = []
    if params.get("seeds"):
        notes.append(f"the seed list {params['seeds']} has no field here; the form makes images from one seed")
    until = params.get("variety_until")
    if params.get("variety") and until is not None and until != DEFAULT_VARIETY_UNTIL:
        notes.append(f"variety until {until} has no field here; the form uses {DEFAULT_VARIETY_UNTIL}")
    output = params.get("output_format")
    if output is not None and output != DEFAULT_OUTPUT_FORMAT:
        notes.append(f"output format {output} has no field here; the form makes {DEFAULT_OUTPUT_FORMAT.upper()}s")
    return notes


def cfg_options_on(params: Mapping[str, Any]) -> bool:
    """Whether parameters record a CFG normalization or truncation other than off (absent = off)."""
    normalization = params.get("cfg_normalization")
    truncation = params.get("cfg_truncation")
    return normalization not in (None, PLAIN_CFG.normalization) or truncation not in (None, PLAIN_CFG.truncation)


# ---- text shown on the page ------------------------------------------------------------------------


def describe_params(params: dict[str, Any], seed: int | None = None, variation_seed: int | None = None) -> str:
    """Markdown of one image's (or job's) parameters; the exploration options only when they are on."""
    rows = [
        ("Prompt", params.get("prompt", "")),
        ("Negative prompt", params.get("negative_prompt") or "—"),
        ("Seed", seed if seed is not None else params.get("seed")),
        ("Size", f"{params.get('width')}×{params.get('height')}"),
        ("Steps", params.get("steps")),
        ("Guidance", params.get("guidance_scale")),
    ]
    if cfg_options_on(params):
        normalization = params.get("cfg_normalization", PLAIN_CFG.normalization)
        truncation = params.get("cfg_truncation", PLAIN_CFG.truncation)
        rows.append(("CFG options", f"normalization {_num(normalization)}, truncation {_num(truncation)}"))
    rows += inputs_rows(params.get("inputs") or {})
    if params.get("seeds"):
        rows.append(("Seed list", ", ".join(map(str, params["seeds"]))))
    if params.get("variation_strength"):
        shown = variation_seed if variation_seed is not None else params.get("variation_seed")
        rows.append(("Variation", f"seed {shown}, strength {params['variation_strength']:g}"))
    if params.get("variety"):
        until = params.get("variety_until", DEFAULT_VARIETY_UNTIL)
        rows.append(("Seed variety", f"{params['variety']:g} (first {until:g} of the steps)"))
    if params.get("loras"):
        rows.append(("LoRAs", lora_text(params["loras"])))
    if params.get("n", 1) > 1:
        rows.append(("Images in job", params["n"]))
    return "\n".join(f"- **{name}:** {_md_escape(str(value))}" for name, value in rows)


def inputs_rows(inputs: Mapping[str, Any]) -> list[tuple[str, object]]:
    """Rows for the input settings a job or an image records (`inputs`, as a request stores them;
    empty for text-to-image)."""
    if not inputs:
        return []
    rows: list[tuple[str, object]] = [("Mode", _mode_text(inputs))]
    if inputs.get("strength") is not None:
        rows.append(("Strength", _num(inputs["strength"])))
    mask = []
    if inputs.get("mask_from_alpha"):
        mask.append("the image's transparency")
    if inputs.get("mask_padding"):
        mask.append(f"grown by {inputs['mask_padding']} px")
    if inputs.get("paste_back"):
        mask.append(f"pasted back, seam blurred {inputs.get('mask_blur', 0)} px")
    if mask:
        rows.append(("Mask", ", ".join(mask)))
    if inputs.get("outpaint"):
        rows.append(("Outpaint", ", ".join(f"{side} {m}" for side, m in zip(SIDES, inputs["outpaint"], strict=False))))
    if inputs.get("resize"):
        rows.append(("Resize", inputs["resize"]))
    if inputs.get("controlled"):
        start, end = _num(inputs.get("control_start", 0.0)), _num(inputs.get("control_end", 1.0))
        rows.append(("ControlNet", f"{inputs.get('control_type') or 'image as given'}, scale "
                     f"{_num(inputs.get('control_scale', DEFAULT_CONTROL_SCALE))}, steps {start}–{end}"))  # fmt: skip
    if inputs.get("images"):
        rows.append(("Input images", ", ".join(f"{k} {image_digest(v)[:10]}" for k, v in inputs["images"].items())))
    return rows


def image_digest(image: object) -> str:
    """An input image's sha256 as `inputs.images` records it: the hash (an image's metadata), or
    `{sha256, url}` (a job's view)."""
    return str(image.get("sha256") if isinstance(image, Mapping) else image)


def lora_text(loras: list[dict[str, Any]]) -> str:
    """`name (weight), ...` of a job's or an image's LoRAs."""
    return ", ".join(f"{r.get('name')} ({_num(r.get('weight', 1.0))})" for r in loras)


def lora_choices(items: list[dict[str, Any]]) -> tuple[list[tuple[str, str]], str]:
    """The pickers' (label, value) choices, "none" first, then the usable files of GET /v1/loras;
    and a line about them."""
    usable = [item["name"] for item in items if item.get("usable", True)]
    refused = [item["name"] for item in items if not item.get("usable", True)]
    if not items:
        line = "No LoRA files in the server's LoRA directory (zturbo serve --lora-dir)."
    else:
        line = f"{len(usable)} LoRA(s) in the server's directory."
    if refused:
        line += f" Not usable with this model: {_md_escape(', '.join(refused))}."  # file names, shown as Markdown
    return [("none", NO_LORA), *((name, name) for name in usable)], line


def _md_escape(text: str) -> str:
    return re.sub(r"([\\`*_{}\[\]<>#|])", r"\\\1", text).replace("\n", " ")


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def model_text(status: dict[str, Any]) -> str:
    """The model, its profile and where its weights come from, with the GGUF file that replaced
    its transformer's; the source is known once a worker has loaded the model."""
    profile = ((status.get("limits") or {}).get("profile") or {}).get("name", "?")
    origin = status.get("model_source")
    source = ORIGIN_NAMES.get(origin, origin) if origin else "source known once loaded"
    weights = status.get("transformer_weights") or {}
    if weights.get("format") == "gguf":
        source += f" + GGUF transformer {_md_escape(str(weights.get('file')))} ({weights.get('quantization')})"
    return f"**{_md_escape(str(status.get('model', '?')))}** ({profile} profile, {source})"


def status_text(status: dict[str, Any]) -> str:
    """The status line: model (profile, source), device, dtype per component, memory plan, GPU
    memory, queue depth."""
    dtypes = ", ".join(f"{part} {dtype}" for part, dtype in (status.get("dtypes") or {}).items())
    gpu = status.get("gpu_memory")
    memory = f"GPU {_gib(gpu['used_bytes'])} used / {_gib(gpu['free_bytes'])} free" if gpu else "GPU memory: n/a"
    return (
        f"{model_text(status)} on {status.get('device', '?')} · {dtypes or 'dtypes n/a'} · "
        f"plan {status.get('memory_plan', '?')} · {memory} · queue {status.get('queue_depth', '?')} · "
        f"{workers_text(status.get('workers') or [])}"
    )


def workers_text(workers: list[dict[str, Any]]) -> str:
    """This machine's workers by state; a Ray deployment's replicas (they name their Ray node) one by one."""
    if not any("node" in w for w in workers):
        return f"workers: {', '.join(w.get('state', '?') for w in workers) or 'none'}"
    listed = ", ".join(f"{_md_escape(str(w.get('id')))} {w.get('state', '?')} on node {_md_escape(str(w.get('node')))}"
                       for w in workers)  # fmt: skip
    return f"{len(workers)} replica(s): {listed}"


def progress_text(event: Event, images: int) -> str:
    """One line of live progress for a queued or running job."""
    if event.name == "queued":
        position = event.data.get("position")
        ahead = "next in line" if position == 0 else f"{position} job(s) ahead"
        return f"Queued: {ahead}" if position is not None else "Queued"
    if event.name == "progress":
        step, steps = event.data.get("step"), event.data.get("steps")
        image = event.data.get("image")  # optional: servers that report per image may say which one
        which = (
            f"image {image + 1}/{images} · "
            if isinstance(image, int)
            else (f"{images} images · " if images > 1 else "")
        )
        return f"Generating: {which}step {step}/{steps}"
    return event.name


def preview_picture(event: Event) -> Image.Image | None:
    """The live preview a progress event carries (`preview`, a base64 JPEG), decoded; None when it
    has none or it does not decode (a preview only decorates the progress line)."""
    from PIL import Image, UnidentifiedImageError

    text = event.data.get("preview") if event.name == "progress" else None
    if not isinstance(text, str):
        return None
    try:
        with Image.open(io.BytesIO(base64.b64decode(text, validate=True))) as picture:
            return picture.convert("RGB")
    except (ValueError, UnidentifiedImageError, OSError):
        return None


LOCKED = "This server needs an API key: enter it above."


def error_text(err: Exception) -> str:
    if isinstance(err, ApiError) and err.unauthorized:
        return LOCKED
    return f"Error: {err}"


def api_base_for(host: str, port: int) -> str:
    """The address the UI's handlers use to reach the server they run in (wildcard binds -> loopback)."""
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
