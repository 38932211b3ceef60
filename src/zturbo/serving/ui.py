"""The web UI: a Gradio page whose every handler is a client of the server's own HTTP API.

There is no second path to the engine: a Generate click is a `POST /v1/jobs` like any API call, so
UI images land in the same queue and history, and `--api-key` applies to the page's calls too (the
user types the key; it lives in per-session server state, never in the page source).
This module holds the page's plain helpers and never imports gradio; `ui_app` builds and mounts
the page (`zturbo serve`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

from ..request import DEFAULT_VARIETY_UNTIL, FIELD
from .apiclient import ApiError, Event

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
    """A form number as a JSON whole number; other values go on for the server to name."""
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


def _seed(name: str, value: object) -> object:
    seed = _whole(name, value)
    return None if seed == RANDOM_SEED else seed


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


# ---- parameters -> form --------------------------------------------------------------------------

LORA_KEYS = tuple(key for i in range(LORA_ROWS) for key in (f"lora_{i}", f"lora_weight_{i}"))
FORM_KEYS = (
    "prompt", "negative_prompt", "preset", "width", "height", "steps", "guidance_scale", "seed", "n",
    "variation_seed", "variation_strength", "variety", *LORA_KEYS,
)  # fmt: skip
_RANGED = ("steps", "guidance_scale", "seed", "batch", "variation_seed", "variation_strength", "variety")
# The form fields with a range, as the request table bounds them (keyed by their HTTP names).
RANGES: dict[str, tuple[float, float]] = {FIELD[k].api_name: FIELD[k].range() or (0, 0) for k in _RANGED}


def form_values(params: dict[str, Any], unit: int) -> tuple[dict[str, Any], list[str]]:
    """Form values for job or PNG parameters, and a note for each value left out because the form
    cannot hold it (it is reported, not silently changed); `unit` is the model's spatial unit."""
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
    return values, notes + _not_in_form(params)


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
    """Notes for the exploration options the form has no field for, when they differ from its defaults."""
    notes = []
    if params.get("seeds"):
        notes.append(f"the seed list {params['seeds']} has no field here; the form makes images from one seed")
    until = params.get("variety_until")
    if params.get("variety") and until is not None and until != DEFAULT_VARIETY_UNTIL:
        notes.append(f"variety until {until} has no field here; the form uses {DEFAULT_VARIETY_UNTIL}")
    return notes


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


def status_text(status: dict[str, Any]) -> str:
    """The status line: model, device, dtype per component, memory plan, GPU memory, queue depth."""
    dtypes = ", ".join(f"{part} {dtype}" for part, dtype in (status.get("dtypes") or {}).items())
    gpu = status.get("gpu_memory")
    memory = f"GPU {_gib(gpu['used_bytes'])} used / {_gib(gpu['free_bytes'])} free" if gpu else "GPU memory: n/a"
    workers = status.get("workers") or []
    states = ", ".join(w.get("state", "?") for w in workers) or "none"
    return (
        f"**{status.get('model', '?')}** on {status.get('device', '?')} · {dtypes or 'dtypes n/a'} · "
        f"plan {status.get('memory_plan', '?')} · {memory} · queue {status.get('queue_depth', '?')} · "
        f"workers: {states}"
    )


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
