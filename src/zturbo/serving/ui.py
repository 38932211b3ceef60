"""The web UI: a Gradio page whose every handler is a client of the server's own HTTP API.

There is no second path to the engine: a Generate click is a `POST /v1/jobs` like any API call, so
UI images land in the same queue and history, and `--api-key` applies to the page's calls too (the
user types the key; it lives in per-session server state, never in the page source).
Gradio is imported only when the UI is built (`zturbo serve`), never at import time.
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING, Any

from ..request import DEFAULT_VARIETY_UNTIL, nearest_multiples
from .apiclient import ApiError, Event

if TYPE_CHECKING:
    import gradio as gr
    from fastapi import FastAPI

UNIT = 16  # width and height must be multiples of this (VAE factor 8 x patch 2)
ONE_MP = 1024 * 1024
RATIOS = ((1, 1), (4, 3), (3, 4), (16, 9), (9, 16), (3, 2), (2, 3))
CUSTOM = "Custom"
STEPS_MAX = 50
IMAGES_MAX = 8
GUIDANCE_MAX = 30.0
RANDOM_SEED = -1  # the seed field's "pick one for me" value (A1111's convention)
SEED_MAX = 2**63 - 1
HISTORY_PAGE = 24  # jobs per history view; each image is fetched once, then served from disk
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


def preset_size(rw: int, rh: int, pixels: int, unit: int = UNIT) -> tuple[int, int]:
    """Width and height with ratio rw:rh and about `pixels` pixels, each the nearest multiple of `unit`."""
    width = math.sqrt(pixels * rw / rh)
    height = width * rh / rw
    return max(unit, round(width / unit) * unit), max(unit, round(height / unit) * unit)


def aspect_presets() -> dict[str, tuple[int, int]]:
    """Dropdown label -> (width, height): every ratio at ~1 MP, then at ~2 MP."""
    presets = {}
    for mp in (1, 2):
        for rw, rh in RATIOS:
            w, h = preset_size(rw, rh, mp * ONE_MP)
            presets[f"{rw}:{rh} · {w}×{h} ({mp} MP)"] = (w, h)
    return presets


def preset_for(width: object, height: object) -> str:
    """The preset label of this exact size, else CUSTOM."""
    for label, size in aspect_presets().items():
        if size == (width, height):
            return label
    return CUSTOM


# ---- form -> job parameters ----------------------------------------------------------------------


def _whole(name: str, value: object, lo: int, hi: int) -> int:
    if value is None or value == "":
        raise FormError(f"{name} is empty; enter a whole number from {lo} to {hi}")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or float(value) != int(value):
        raise FormError(f"{name} must be a whole number, got {value!r}")
    number = int(value)
    if not lo <= number <= hi:
        raise FormError(f"{name} {number} is out of range; allowed {lo} to {hi}")
    return number


def _side(name: str, value: object) -> int:
    number = _whole(name, value, UNIT, 16384)
    if number % UNIT:
        lo, hi = nearest_multiples(number, UNIT)
        raise FormError(f"{name} {number} is not a multiple of {UNIT}; nearest valid: {lo} or {hi}")
    return number


def _fraction(name: str, value: object) -> float:
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise FormError(f"{name} must be a number from 0 to 1, got {value!r}")
    if not 0 <= value <= 1:
        raise FormError(f"{name} {value} is out of range; allowed 0 to 1")
    return float(value)


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
) -> dict[str, Any]:
    """The `POST /v1/jobs` body for the form's values; raises FormError (the server checks again,
    against the loaded model's limits, and its message is shown the same way)."""
    if not prompt or not prompt.strip():
        raise FormError("the prompt is empty; describe the image to generate")
    if guidance is None or isinstance(guidance, bool) or not isinstance(guidance, (int, float)):
        raise FormError(f"guidance must be a number from 0 to {GUIDANCE_MAX:g}, got {guidance!r}")
    if not 0 <= guidance <= GUIDANCE_MAX:
        raise FormError(f"guidance {guidance} is out of range; allowed 0 to {GUIDANCE_MAX:g} (0 = CFG off)")
    seed_value = _whole("seed", seed, RANDOM_SEED, SEED_MAX)
    variation_value = _whole("variation seed", variation_seed, RANDOM_SEED, SEED_MAX)
    return {
        "prompt": prompt,
        "negative_prompt": negative_prompt or "",
        "width": _side("width", width),
        "height": _side("height", height),
        "steps": _whole("steps", steps, 1, STEPS_MAX),
        "guidance_scale": float(guidance),
        "seed": None if seed_value == RANDOM_SEED else seed_value,
        "n": _whole("number of images", n, 1, IMAGES_MAX),
        "variation_seed": None if variation_value == RANDOM_SEED else variation_value,
        "variation_strength": _fraction("variation strength", variation_strength),
        "variety": _fraction("seed variety", variety),
    }


# ---- parameters -> form --------------------------------------------------------------------------

FORM_KEYS = (
    "prompt", "negative_prompt", "preset", "width", "height", "steps", "guidance_scale", "seed", "n",
    "variation_seed", "variation_strength", "variety",
)  # fmt: skip
RANGES: dict[str, tuple[float, float]] = {
    "steps": (1, STEPS_MAX),
    "guidance_scale": (0, GUIDANCE_MAX),
    "seed": (0, SEED_MAX),
    "n": (1, IMAGES_MAX),
    "variation_seed": (0, SEED_MAX),
    "variation_strength": (0, 1),
    "variety": (0, 1),
}


def form_values(params: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Form values for job or PNG parameters, and a note for each value left out because the form
    cannot hold it (it is reported, not silently changed)."""
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
            notes.append(f"{key} {value} is outside {lo} to {hi:g}, so it was not filled in")
    if isinstance(params.get("width"), int) and isinstance(params.get("height"), int):
        values["width"], values["height"] = params["width"], params["height"]
        values["preset"] = preset_for(params["width"], params["height"])
        if params["width"] % UNIT or params["height"] % UNIT:
            notes.append(
                f"size {params['width']}×{params['height']} is not a multiple of {UNIT}; change it before generating"
            )
    return values, notes + _not_in_form(params)


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
    if params.get("n", 1) > 1:
        rows.append(("Images in job", params["n"]))
    return "\n".join(f"- **{name}:** {_md_escape(str(value))}" for name, value in rows)


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


# ---- the page ------------------------------------------------------------------------------------------


def build_ui(api_base: str) -> gr.Blocks:
    """The Gradio app; `api_base` is where its handlers reach the API (the serving process itself)."""
    from .ui_app import build

    return build(api_base)


def api_base_for(host: str, port: int) -> str:
    """The address the UI's handlers use to reach the server they run in (wildcard binds -> loopback)."""
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def mount(app: FastAPI, api_base: str, path: str = "/ui") -> FastAPI:
    """Mount the web UI on the server's FastAPI app (same port as the API), and redirect `/` to it."""
    import gradio as gr
    from fastapi.responses import RedirectResponse

    if not any(getattr(route, "path", None) == "/" for route in app.routes):
        app.add_api_route("/", lambda: RedirectResponse(f"{path}/"), include_in_schema=False)
    # Uploads are only PNGs to read parameters from; the cap keeps a stray large file out.
    return gr.mount_gradio_app(app, build_ui(api_base), path=path, footer_links=[], max_file_size="64mb")
