"""The Gradio page of the web UI, its event handlers and its mounting on the server (see `ui`).

This module imports gradio at the top, so only `zturbo serve` imports it, when it mounts the UI.
Gradio reads the handlers' annotations (gr.Request, gr.SelectData) to inject them.

Files and the key. Everything the page shows or takes as a file lives in one folder of the data
directory, `ui-files/`, which is Gradio's file folder (GRADIO_TEMP_DIR): the UI's copy of each
image it shows (`images/<job id>/`), which Gradio then serves in place, with no copy of its own,
and Gradio's uploads. The folder is emptied when the UI mounts and when the server stops; a job's
copies go when any `DELETE /v1/history/{id}` succeeds (the page's Delete is one). With an API key,
`_Gate` lets a request under the mount through only if it is what the page needs before the user
types the key (the page, its assets, the queue its handlers run through), or if it carries the
session's pass: a random cookie that the Use-key handler hands to a page that typed the right key.
So files, uploads and Gradio's own API need the key, while the key itself stays in server-side
session state. Handlers that return data call the API with the session's key, so they need it too.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import hashlib
import json
import os
import re
import secrets
import shutil
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import gradio as gr
from fastapi import FastAPI
from starlette.requests import cookie_parser
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..inputs.spec import COMPUTED_CONTROL_TYPES, CONTROL_TYPES, DEFAULT_CONTROL_SCALE, DEFAULT_STRENGTH, RESIZE_MODES
from ..profiles import CfgOptions
from ..request import FIELD, LIMITS, ModelLimits
from .apiclient import ApiClient, ApiError
from .app import error_response, read_body, replay_body
from .ui import (
    AS_GIVEN,
    CFG_NORMALIZATION_INFO,
    CFG_TRUNCATION_INFO,
    CUSTOM,
    FORM_KEYS,
    GENERATE_KEYS,
    GUIDANCE_INFO,
    HISTORY_PAGE,
    INPUT_DEFAULTS,
    LORA_KEYS,
    LORA_ROWS,
    MARGIN_KEYS,
    MASK_COLOR,
    NO_LORA,
    NO_RESIZE,
    RANDOM_SEED,
    SIDES,
    STRENGTH_INFO,
    VARIATION_INFO,
    VARIETY_INFO,
    FormError,
    aspect_presets,
    cfg_options_on,
    controlnet_text,
    describe_params,
    editor_picture,
    error_text,
    form_body,
    form_values,
    image_digest,
    input_size,
    lora_choices,
    lora_pairs,
    preset_for,
    preview_picture,
    progress_text,
    status_text,
)

PASS_COOKIE = "zturbo_ui_pass"
INPUT_LABELS = {"image": "input image", "mask": "mask", "control_image": "control image"}
UPLOADS_KEPT = 16  # the newest uploads stay: dropped PNGs, input and control images
# The mask editor uploads its canvas (background, composite and a layer, each an image's size) after
# every stroke, several times; a Generate reads each page's last. These are kept apart, so that
# painting never pushes the page's input image out.
EDITOR_UPLOADS_KEPT = 48
EDITOR_PICTURE = "editor-picture.png"  # a large input image scaled down for the editor (`ui.editor_picture`)
# Whole-number fields keep what was typed: Gradio's precision=0 rounds 7.5 to 8 (and 6.5 to 6) before
# any handler runs, so `ui.job_params` could not refuse it, naming the value typed. (The seeds are
# text fields instead: the browser holds a number field as a float, which rounds past 2**53.)
KEEP_TYPED = None
# The names Gradio's editor gives its canvas uploads, and the picture the UI gives it.
_EDITOR_FILE = re.compile(r"(background|composite|layer_\d+|editor-picture)\.png")
PASSES_KEPT = 1024  # sessions whose pass is honoured; the oldest lapse first
# What the page loads or calls before the user has typed the key; no file and no stored data.
_OPEN_PATHS = frozenset(
    {"", "/", "/config", "/theme.css", "/favicon.ico", "/manifest.json", "/robots.txt",
     "/gradio_api/queue/join", "/gradio_api/queue/data", "/gradio_api/cancel", "/gradio_api/startup-events"}
)  # fmt: skip
_OPEN_PREFIXES = ("/assets/", "/static/", "/svelte/", "/gradio_api/heartbeat/")
_UPLOAD_PATH = "/gradio_api/upload"
_JOIN_PATH = "/gradio_api/queue/join"
# The handlers a page may run through the queue before it has the pass: none takes a file, so none
# makes Gradio fetch or store one (it prepares a handler's file inputs before the handler runs), and
# those that return data (status, list_loras) ask the API with the session's key, so a page without
# the key gets the API's refusal.
_OPEN_HANDLERS = frozenset({"status", "use_key", "apply_preset", "reuse_seed", "list_loras"})


def _safe_name(text: object) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "", str(text))[:64] or "_"


class _UiFiles:
    """The UI's folder (see the module docstring). Images are fetched from the API once each and
    kept byte-for-byte, so their metadata chunks survive into downloads."""

    def __init__(self, root: Path, client: ApiClient):
        self.root = root
        self.images = root / "images"
        self._client = client
        # Jobs deleted while this server runs: a fetch that was under way when its job was deleted
        # must not write the image back (its PNG holds the prompt).
        self._deleted: set[str] = set()
        self._lock = threading.Lock()

    def reset(self) -> None:
        """Start empty: whatever an earlier run left here is no longer behind any page."""
        self.remove()
        self.images.mkdir(parents=True)

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    def image(self, job_id: str, image: dict[str, Any], key: str | None) -> str:
        folder = self.images / _safe_name(job_id)
        path = folder / f"zturbo-{_safe_name(image.get('seed', 'x'))}-{_safe_name(image['id'])}.png"
        if not path.exists():
            self._keep(job_id, path, self._client.image(image["id"], key))
        return str(path)

    def input_image(self, job_id: str, field: str, digest: str, key: str | None) -> str:
        """One of a job's input images, kept as uploaded, named with its file type's suffix so that
        the page shows it."""
        folder = self.images / _safe_name(job_id)
        stem = f"input-{_safe_name(field)}-{_safe_name(digest)[:16]}"
        kept = sorted(p for p in folder.glob(f"{stem}.*") if p.suffix != ".part") if folder.exists() else []
        if kept:
            return str(kept[0])
        data = self._client.input_image(job_id, field, key)
        path = folder / f"{stem}{_suffix(data)}"
        self._keep(job_id, path, data)
        return str(path)

    def _keep(self, job_id: str, path: Path, data: bytes) -> None:
        with self._lock:  # against forget_job: a deleted job's image is never written back
            if job_id in self._deleted:
                raise ApiError(f"job {job_id} was deleted", status=404, kind="not_found")
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{threading.get_ident()}.part")  # two sessions may fetch it at once
            tmp.write_bytes(data)
            tmp.replace(path)

    def forget_job(self, job_id: str) -> None:
        with self._lock:
            self._deleted.add(job_id)
            shutil.rmtree(self.images / _safe_name(job_id), ignore_errors=True)

    def missing(self) -> str:
        """The picture shown for an image whose file is gone: grey, crossed out."""
        from PIL import Image, ImageDraw

        path = self.images / "missing.png"
        if not path.exists():
            picture = Image.new("RGB", (64, 64), (200, 200, 200))
            ImageDraw.Draw(picture).line([(8, 8), (56, 56)], fill=(120, 120, 120), width=4)
            ImageDraw.Draw(picture).line([(8, 56), (56, 8)], fill=(120, 120, 120), width=4)
            tmp = path.with_suffix(f".{threading.get_ident()}.part")
            picture.save(tmp, format="PNG")
            tmp.replace(path)
        return str(path)

    def editor_picture(self, image: str) -> str:
        """The file the mask editor shows for an input image: the image itself, or a copy scaled down
        (`ui.editor_picture`), kept among the editor's uploads."""
        data = editor_picture(image)
        if data is None:
            return image
        path = self.root / hashlib.sha256(data).hexdigest() / EDITOR_PICTURE
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{threading.get_ident()}.part")
            tmp.write_bytes(data)
            tmp.replace(path)
        return str(path)

    def prune_uploads(self, keep: int, editor_keep: int) -> None:
        """Keep the newest `keep` uploads and the newest `editor_keep` of the mask editor's (Gradio
        stores each upload in a folder named by its content)."""
        uploads = [p for p in self.root.iterdir() if p != self.images] if self.root.exists() else []
        uploads.sort(key=_mtime, reverse=True)
        editor = [p for p in uploads if _editor_upload(p)]
        others = [p for p in uploads if p not in editor]
        for old in (*others[keep:], *editor[editor_keep:]):
            if old.is_dir():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink(missing_ok=True)


def _editor_upload(folder: Path) -> bool:
    """Whether an upload folder holds only the mask editor's canvas files (the same bytes uploaded as
    another file share its folder, which then counts as that upload)."""
    try:
        names = [p.name for p in folder.iterdir()] if folder.is_dir() else []
    except OSError:  # removed meanwhile by another prune
        return False
    return bool(names) and all(_EDITOR_FILE.fullmatch(name) for name in names)


def _suffix(data: bytes) -> str:
    """An image file's suffix from its header (what Gradio serves it as); `.png` if unknown."""
    import io

    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            kind = (image.format or "png").lower()
    except (UnidentifiedImageError, OSError):
        return ".png"
    return {"jpeg": ".jpg", "mpo": ".jpg"}.get(kind, f".{kind}")


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:  # removed meanwhile by another prune
        return 0.0


class _Passes:
    """The session passes given out, newest last; a pass is a random token, never the key."""

    def __init__(self, kept: int = PASSES_KEPT):
        self._kept = kept
        self._tokens: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._lock = threading.Lock()

    def issue(self) -> str:
        token = secrets.token_urlsafe(32)
        with self._lock:
            self._tokens[token] = None
            while len(self._tokens) > self._kept:
                self._tokens.popitem(last=False)
        return token

    def valid(self, token: str) -> bool:
        with self._lock:
            return token in self._tokens


class _Gate:
    """ASGI middleware: the key (through the session's pass) and the size bounds for requests under
    the UI's mount, and the removal of a job's copies when the API deletes the job."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        prefix: str,
        files: _UiFiles,
        passes: _Passes | None,
        bounds: tuple[int, int],
        open_fns: frozenset[int] = frozenset(),
    ):
        self.app, self.prefix, self.files, self.passes = app, prefix, files, passes
        self.max_upload, self.max_body = bounds
        self.open_fns = open_fns  # the queue's fn_index of each `_OPEN_HANDLERS` handler

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope["path"] if scope["type"] == "http" else ""
        if scope.get("method") == "DELETE" and path.startswith("/v1/history/"):
            await self._delete(scope, receive, send, path.removeprefix("/v1/history/"))
            return
        if path != self.prefix and not path.startswith(self.prefix + "/"):
            await self.app(scope, receive, send)
            return
        sub = path[len(self.prefix) :]
        refusal = self._refusal(scope, sub)
        if refusal is None and sub == _JOIN_PATH and self.passes is not None and not self._has_pass(scope):
            receive, refusal = await self._join_refusal(receive)
        if refusal is not None:
            status, kind, message = refusal
            await error_response(status, kind, message, Connection="close")(scope, receive, send)
            return
        await self.app(scope, receive, send)
        if sub == _UPLOAD_PATH:
            await anyio.to_thread.run_sync(self.files.prune_uploads, UPLOADS_KEPT, EDITOR_UPLOADS_KEPT)

    def _has_pass(self, scope: Scope) -> bool:
        cookie = dict(scope["headers"]).get(b"cookie", b"").decode("latin-1")
        return self.passes is not None and self.passes.valid(cookie_parser(cookie).get(PASS_COOKIE, ""))

    async def _join_refusal(self, receive: Receive) -> tuple[Receive, tuple[int, str, str] | None]:
        """A page without the pass may queue only the handlers it needs before the key is typed; the
        body (bounded by `_refusal`) is read to see which, then replayed to Gradio."""
        body = await read_body(receive, self.max_body) or b""
        try:
            fn_index = json.loads(body).get("fn_index")
        except (ValueError, AttributeError):
            fn_index = None
        replay = replay_body(body, receive)
        if fn_index in self.open_fns:
            return replay, None
        return replay, (401, "unauthorized", "this action of the web UI needs the API key: type it in the page first")

    def _refusal(self, scope: Scope, sub: str) -> tuple[int, str, str] | None:
        """Why a request under the mount is refused (status, type, message), or None."""
        headers = dict(scope["headers"])
        is_open = sub in _OPEN_PATHS or sub.startswith(_OPEN_PREFIXES)
        if self.passes is not None and not is_open and not self._has_pass(scope):
            message = "the web UI's files, uploads and API need the API key: type it in the page first"
            return 401, "unauthorized", message
        if scope["method"] != "POST":
            return None
        limit = self.max_upload if sub == _UPLOAD_PATH else self.max_body
        declared = headers.get(b"content-length", b"")
        if not declared.isdigit():
            return 411, "length_required", "a request to the web UI must send Content-Length"
        if int(declared) > limit:
            return 413, "too_large", f"the request body is {int(declared)} bytes; allowed at most {limit} here"
        return None

    async def _delete(self, scope: Scope, receive: Receive, send: Send, job_id: str) -> None:
        status = 0

        async def watch(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        await self.app(scope, receive, watch)
        if status == 204:
            await anyio.to_thread.run_sync(self.files.forget_job, job_id)


def _records(jobs: list[dict[str, Any]], files: _UiFiles, key: str | None) -> list[dict[str, Any]]:
    """One record per image of the jobs: its file, seed and job, for a gallery and its selection."""
    return [_record(job, image, files, key) for job in jobs for image in job.get("images") or []]


def _record(job: dict[str, Any], image: dict[str, Any], files: _UiFiles, key: str | None) -> dict[str, Any]:
    """An image whose file is gone or damaged (404, 507) gets the placeholder and says why, so the
    rest of a gallery still shows and the job can still be selected and deleted."""
    record = {"seed": image.get("seed"), "variation_seed": image.get("variation_seed"), "job": job, "missing": None}
    try:
        record["path"] = files.image(job["id"], image, key)
    except ApiError as e:
        if e.status not in (404, 507):
            raise
        record["path"], record["missing"] = files.missing(), str(e)
    return record


def _gallery(records: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(r["path"], f"seed {r['seed']}" + (" · file missing" if r["missing"] else "")) for r in records]


def mount(app: FastAPI, api_base: str, path: str = "/ui") -> FastAPI:
    """Mount the web UI on the server's FastAPI app (same port as the API), and redirect `/` to it."""
    from fastapi.responses import RedirectResponse

    if not any(getattr(route, "path", None) == "/" for route in app.routes):
        app.add_api_route("/", lambda: RedirectResponse(f"{path}/"), include_in_schema=False)
    settings = app.state.service.settings
    root = (settings.data_dir / "ui-files").resolve()
    # Gradio reads its folder from the environment at each use; this process is the server the
    # UI belongs to, and the data directory's lock makes the folder this server's alone.
    os.environ["GRADIO_TEMP_DIR"] = str(root)
    client = ApiClient(api_base)
    files = _UiFiles(root, client)
    files.reset()
    passes = _Passes() if settings.api_key is not None else None
    demo = build(client, settings.limits, files, passes, cookie_path=path)
    bounds = (settings.max_upload_bytes, settings.max_body_bytes)
    open_fns = frozenset(i for i, f in demo.fns.items() if getattr(f, "name", None) in _OPEN_HANDLERS)
    app.add_middleware(_Gate, prefix=path, files=files, passes=passes, bounds=bounds, open_fns=open_fns)
    _remove_on_stop(app, files)
    # Run history would keep every run's inputs (the typed key among them) in the browser.
    return gr.mount_gradio_app(
        app, demo, path=path, footer_links=[], max_file_size=settings.max_upload_bytes, run_history=False
    )


def _remove_on_stop(app: FastAPI, files: _UiFiles) -> None:
    inner = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[Any]:
        try:
            async with inner(app) as state:
                yield state
        finally:
            files.remove()

    app.router.lifespan_context = lifespan


def _slider_range(name: str) -> tuple[float, float]:
    """A slider's ends: the request table's range for the field."""
    bounds = FIELD[name].range()
    assert bounds is not None, name
    return bounds


def _choices() -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """The resize and control-type dropdowns' (label, value) choices, "none" first."""
    resize_words = {"crop": "crop: fill the size, cut what overflows", "fit": "fit: the whole input, padded",
                    "stretch": "stretch: change the aspect ratio"}  # fmt: skip
    resize = [("none: each input has the output's size", NO_RESIZE)]
    resize += [(resize_words.get(mode, mode), mode) for mode in RESIZE_MODES]
    control = [("as given (already preprocessed)", AS_GIVEN)]
    for kind in CONTROL_TYPES:
        how = "computed from the image" if kind in COMPUTED_CONTROL_TYPES else "a preprocessed image"
        control.append((f"{kind} ({how})", kind))
    return resize, control


def _input_controls(unit: int) -> dict[str, Any]:
    """The image inputs' components by their form keys (`ui.INPUT_KEYS`), with the two accordions
    (`inputs_box`, `control_box`) and the ControlNet's line."""
    resize_choices, control_choices = _choices()
    sources = ["upload", "clipboard"]
    c: dict[str, Any] = {}
    with gr.Accordion("Start from an image", open=False, elem_id="inputs") as c["inputs_box"]:
        c["image"] = gr.Image(
            label="Input image", type="filepath", image_mode=None, sources=sources, height=220, elem_id="init-image"
        )
        c["mask_editor"] = gr.ImageEditor(
            label="Mask: paint what to repaint (nothing painted: image to image)", type="pil", image_mode="RGBA",
            sources=[], transforms=[], layers=gr.LayerOptions(allow_additional_layers=False, layers=["Mask"]),
            brush=gr.Brush(colors=[f"rgb{MASK_COLOR}"], color_mode="fixed"), eraser=gr.Eraser(), format="png",
            height=360, visible=False, elem_id="mask-editor",
        )  # fmt: skip
        c["strength_default"] = gr.Checkbox(True, label="Default strength", elem_id="strength-default")
        c["strength"] = gr.Slider(
            *_slider_range("strength"), value=DEFAULT_STRENGTH["img2img"], step=0.01, label="Strength",
            info=STRENGTH_INFO, elem_id="strength",
        )  # fmt: skip
        with gr.Row():
            c["mask_blur"] = gr.Slider(
                *_slider_range("mask_blur"), value=0, step=1, label="Mask blur (px, paste back)", elem_id="mask-blur"
            )
            c["mask_padding"] = gr.Slider(
                *_slider_range("mask_padding"), value=0, step=1, label="Mask padding (px)", elem_id="mask-padding"
            )
        c["paste_back"] = gr.Checkbox(
            label="Paste back: outside the mask, the input's pixels exactly", elem_id="paste-back"
        )
        with gr.Row():
            for side in SIDES:
                c[f"outpaint_{side}"] = gr.Number(
                    0, label=f"Outpaint {side} (px)", precision=KEEP_TYPED, step=unit, min_width=90,
                    elem_id=f"outpaint-{side}",
                )  # fmt: skip
        c["resize"] = gr.Dropdown(resize_choices, value=NO_RESIZE, label="Inputs of another size", elem_id="resize")
    with gr.Accordion("ControlNet", open=False, visible=False, elem_id="controlnet") as c["control_box"]:
        c["control_info"] = gr.Markdown(elem_id="controlnet-info")
        c["control_image"] = gr.Image(
            label="Control image", type="filepath", image_mode=None, sources=sources, height=220,
            elem_id="control-image",
        )  # fmt: skip
        c["control_type"] = gr.Dropdown(control_choices, value=AS_GIVEN, label="Control type", elem_id="control-type")
        c["control_scale"] = gr.Slider(*_slider_range("control_scale"), value=DEFAULT_CONTROL_SCALE, step=0.05,
                                       label="Control scale", elem_id="control-scale")  # fmt: skip
        with gr.Row():
            c["control_start"] = gr.Slider(0, 1, value=0, step=0.05, label="From (fraction of the steps)",
                                           elem_id="control-start")  # fmt: skip
            c["control_end"] = gr.Slider(0, 1, value=1, step=0.05, label="Until", elem_id="control-end")
    return c


def _cfg_controls(cfg: CfgOptions) -> dict[str, Any]:
    """The CFG normalization and truncation sliders, at the model's values (`cfg`: both off for the
    published models), keyed as `ui.GENERATE_KEYS`."""
    with gr.Row():
        normalization = gr.Slider(
            *_slider_range("cfg_normalization"), value=cfg.normalization, step=0.05,
            label="CFG normalization (0 = off)", info=CFG_NORMALIZATION_INFO, elem_id="cfg-normalization",
        )  # fmt: skip
        truncation = gr.Slider(
            *_slider_range("cfg_truncation"), value=cfg.truncation, step=0.01, label="CFG truncation (1 = off)",
            info=CFG_TRUNCATION_INFO, elem_id="cfg-truncation",
        )  # fmt: skip
    return {"cfg_normalization": normalization, "cfg_truncation": truncation}


_FREE: dict[str, Any] = {"concurrency_limit": None}  # the server's queue orders the work; Gradio's must not


@dataclass(frozen=True)
class _Session:
    """Each session's state: its key, the last seed it generated with, the results shown, and the
    History tab's records and selected job."""

    key: gr.State
    last_seed: gr.State
    results: gr.State
    hist_records: gr.State
    hist_selected: gr.State


@dataclass(frozen=True)
class _KeyRow:
    """The status line and the row where the API key is typed (shown while the API refuses the page)."""

    status: gr.Markdown
    row: gr.Row
    box: gr.Textbox
    button: gr.Button
    ui_pass: gr.Textbox  # hidden: where the Use-key handler hands the page its pass


@dataclass(frozen=True)
class _Basics:
    """The form's first controls: the prompt, Generate and Cancel, the size, the steps, the seed and
    the number of images."""

    prompt: gr.Textbox
    generate: gr.Button
    cancel: gr.Button
    preset: gr.Dropdown
    width: gr.Number
    height: gr.Number
    size_msg: gr.Markdown
    steps: gr.Slider
    seed: gr.Textbox
    seed_random: gr.Button
    seed_reuse: gr.Button
    n: gr.Slider


@dataclass(frozen=True)
class _Advanced:
    """The Advanced accordion: the negative prompt, guidance, CFG options and the seed's variation."""

    box: gr.Accordion
    negative: gr.Textbox
    guidance: gr.Slider
    cfg: dict[str, gr.Slider]  # `_cfg_controls`
    variation_seed: gr.Textbox
    variation_strength: gr.Slider
    variety: gr.Slider


@dataclass(frozen=True)
class _Loras:
    """The LoRAs accordion: a line about the server's LoRA directory, the pickers and their refresh."""

    box: gr.Accordion
    info: gr.Markdown
    rows: list[gr.Dropdown | gr.Slider]  # each row's picker, then its weight
    refresh: gr.Button


@dataclass(frozen=True)
class _Form:
    """The Generate tab's left column."""

    basics: _Basics
    inputs: dict[str, Any]  # `_input_controls`
    advanced: _Advanced
    loras: _Loras
    png: gr.File
    png_msg: gr.Markdown

    @property
    def fields(self) -> dict[str, Any]:
        """The form's components by form key (`ui.FORM_KEYS`, `ui.GENERATE_KEYS`)."""
        b, a = self.basics, self.advanced
        return {
            "prompt": b.prompt, "negative_prompt": a.negative, "preset": b.preset, "width": b.width,
            "height": b.height, "steps": b.steps, "guidance_scale": a.guidance, **a.cfg, "seed": b.seed, "n": b.n,
            "variation_seed": a.variation_seed, "variation_strength": a.variation_strength, "variety": a.variety,
            **self.inputs, **dict(zip(LORA_KEYS, self.loras.rows, strict=True)),
        }  # fmt: skip

    @property
    def filled(self) -> list[Any]:
        """What a fill from a PNG or a past job sets: the form, and its accordions."""
        fields = self.fields
        # An accordion opens when a fill sets a value it holds.
        accordions = [self.advanced.box, self.loras.box, self.inputs["inputs_box"], self.inputs["control_box"]]
        return [*(fields[key] for key in FORM_KEYS), *accordions]


@dataclass(frozen=True)
class _Results:
    """The Generate tab's right column."""

    progress: gr.Markdown
    live: gr.Image
    gallery: gr.Gallery
    image_params: gr.Markdown
    download: gr.DownloadButton


@dataclass(frozen=True)
class _History:
    """The History tab."""

    tab: gr.Tab
    search: gr.Textbox
    search_btn: gr.Button
    info: gr.Markdown
    gallery: gr.Gallery
    params: gr.Markdown
    inputs: gr.Gallery
    reuse: gr.Button
    delete: gr.Button


@dataclass(frozen=True)
class _Page:
    """The page's components, as the event wiring needs them."""

    session: _Session
    key: _KeyRow
    tabs: gr.Tabs
    form: _Form
    results: _Results
    history: _History

    def status_io(self) -> dict[str, Any]:
        """The status handler's inputs and outputs: the line, the key row and the ControlNet section."""
        controlnet = [self.form.inputs["control_box"], self.form.inputs["control_info"]]
        return {"inputs": [self.session.key], "outputs": [self.key.status, self.key.row, *controlnet], **_FREE}


def build(
    client: ApiClient, limits: ModelLimits, files: _UiFiles, passes: _Passes | None, cookie_path: str = "/ui"
) -> gr.Blocks:
    """The Gradio app; `client` reaches the API (the serving process itself), `limits` are the served
    model's (the size presets and inputs step by its spatial unit), `passes` None when there is no key."""
    handlers = _Handlers(client, limits.spatial_unit, files, passes)
    with gr.Blocks(title="zturbo", analytics_enabled=False) as demo:
        page = _layout(limits)
        _wire_status(demo, page, handlers, cookie_path)
        _wire_size(page, handlers)
        _wire_generate(page, handlers)
        _wire_history(page, handlers)
    return demo


def _layout(limits: ModelLimits) -> _Page:
    """The page's components, in the order they show."""
    session = _Session(
        key=gr.State(None),
        last_seed=gr.State(None),
        results=gr.State([]),
        hist_records=gr.State([]),
        hist_selected=gr.State(None),
    )
    gr.Markdown("## zturbo · Z-Image-Turbo")
    key = _key_row()
    with gr.Tabs(selected="generate") as tabs:
        with gr.Tab("Generate", id="generate"), gr.Row():
            form = _form_column(limits)
            results = _results_column()
        history = _history_tab()
    return _Page(session, key, tabs, form, results, history)


def _key_row() -> _KeyRow:
    status = gr.Markdown("Connecting…", elem_id="status-line")
    with gr.Row(visible=False, elem_id="key-row") as row:
        box = gr.Textbox(label="API key", type="password", scale=4, elem_id="api-key")
        button = gr.Button("Use key", scale=1, elem_id="use-key")
        ui_pass = gr.Textbox(visible=False, elem_id="ui-pass")
    return _KeyRow(status, row, box, button, ui_pass)


def _form_column(limits: ModelLimits) -> _Form:
    with gr.Column(scale=2):
        basics = _basic_controls(limits)
        inputs = _input_controls(limits.spatial_unit)
        advanced = _advanced_controls(limits)
        loras = _lora_controls()
        png = gr.File(
            label="Drop a PNG here to read its parameters", file_types=[".png"], type="filepath", elem_id="png-drop"
        )
        png_msg = gr.Markdown(elem_id="png-msg")
    return _Form(basics, inputs, advanced, loras, png, png_msg)


def _basic_controls(limits: ModelLimits) -> _Basics:
    unit = limits.spatial_unit
    presets = aspect_presets(unit)
    prompt = gr.Textbox(label="Prompt", lines=3, placeholder="Describe the image, in English or 中文", elem_id="prompt")
    with gr.Row():
        generate = gr.Button("Generate", variant="primary", elem_id="generate")
        cancel = gr.Button("Cancel", variant="stop", elem_id="cancel")
    preset = gr.Dropdown([*presets, CUSTOM], value=next(iter(presets)), label="Aspect ratio", elem_id="preset")
    with gr.Row():
        width = gr.Number(1024, label="Width", precision=KEEP_TYPED, step=unit, elem_id="width")
        height = gr.Number(1024, label="Height", precision=KEEP_TYPED, step=unit, elem_id="height")
    size_msg = gr.Markdown(elem_id="inputs-msg")  # where the size comes from, with input images
    steps = gr.Slider(*_slider_range("steps"), value=limits.profile.steps, step=1, label="Steps", elem_id="steps")
    with gr.Row():
        seed = gr.Textbox(str(RANDOM_SEED), label="Seed (-1 = random)", max_lines=1, scale=2, elem_id="seed")
        seed_random = gr.Button("Random", scale=1, size="sm", min_width=80, elem_id="seed-random")
        seed_reuse = gr.Button("Reuse last", scale=1, size="sm", min_width=80, elem_id="seed-reuse")
    n = gr.Slider(*_slider_range("batch"), value=1, step=1, label="Number of images", elem_id="n")
    return _Basics(prompt, generate, cancel, preset, width, height, size_msg, steps, seed, seed_random, seed_reuse, n)


def _advanced_controls(limits: ModelLimits) -> _Advanced:
    with gr.Accordion("Advanced", open=False, elem_id="advanced") as box:
        negative = gr.Textbox(label="Negative prompt", lines=2, elem_id="negative")
        guidance = gr.Slider(
            *_slider_range("guidance_scale"), value=limits.profile.guidance, step=0.1,
            label="Guidance (CFG scale)", info=GUIDANCE_INFO, elem_id="guidance",
        )  # fmt: skip
        cfg = _cfg_controls(limits.profile.cfg)
        variation_seed = gr.Textbox(
            str(RANDOM_SEED), label="Variation seed (-1 = random)", max_lines=1, elem_id="variation-seed"
        )
        variation_strength = gr.Slider(
            0, 1, value=0, step=0.01, label="Variation strength", info=VARIATION_INFO, elem_id="variation-strength"
        )
        variety = gr.Slider(0, 1, value=0, step=0.01, label="Seed variety", info=VARIETY_INFO, elem_id="variety")
    return _Advanced(box, negative, guidance, cfg, variation_seed, variation_strength, variety)


def _lora_controls() -> _Loras:
    with gr.Accordion("LoRAs", open=False, elem_id="loras") as box:
        info = gr.Markdown(elem_id="lora-info")
        rows: list[gr.Dropdown | gr.Slider] = []
        for i in range(LORA_ROWS):
            with gr.Row():
                rows.append(gr.Dropdown(
                    [("none", NO_LORA)], value=NO_LORA, label=f"LoRA {i + 1}", allow_custom_value=True, scale=3,
                    elem_id=f"lora-{i}",
                ))  # fmt: skip
                rows.append(gr.Slider(
                    *LIMITS.lora_weight, value=1.0, step=0.05, label="Weight", scale=2, elem_id=f"lora-weight-{i}"
                ))  # fmt: skip
        refresh = gr.Button("Refresh the list", size="sm", elem_id="lora-refresh")
    return _Loras(box, info, rows, refresh)


def _results_column() -> _Results:
    with gr.Column(scale=3):
        progress = gr.Markdown(elem_id="progress")
        live = gr.Image(
            label="Preview", type="pil", format="jpeg", height=256, interactive=False, buttons=[], visible=False,
            elem_id="live-preview",
        )  # fmt: skip
        gallery = gr.Gallery(
            label="Results", columns=2, interactive=False, buttons=["download", "fullscreen"], elem_id="results"
        )
        image_params = gr.Markdown(elem_id="image-params")
        download = gr.DownloadButton("Download PNG (with metadata)", visible=False, elem_id="download")
    return _Results(progress, live, gallery, image_params, download)


def _history_tab() -> _History:
    with gr.Tab("History", id="history") as tab:
        with gr.Row():
            search = gr.Textbox(label="Search prompts", scale=4, elem_id="search")
            search_btn = gr.Button("Search / refresh", scale=1, elem_id="search-btn")
        info = gr.Markdown(elem_id="history-info")
        gallery = gr.Gallery(
            label="History", columns=8, fit_columns=False, height=360, object_fit="cover", allow_preview=False,
            interactive=False, buttons=[], elem_id="history-gallery",
        )  # fmt: skip
        params = gr.Markdown(elem_id="history-params")
        inputs = gr.Gallery(
            label="Input images", columns=3, height=180, object_fit="contain", allow_preview=False,
            interactive=False, buttons=[], visible=False, elem_id="history-inputs",
        )  # fmt: skip
        with gr.Row():
            reuse = gr.Button("Reuse parameters", interactive=False, elem_id="history-reuse")
            delete = gr.Button("Delete", variant="stop", interactive=False, elem_id="history-delete")
    return _History(tab, search, search_btn, info, gallery, params, inputs, reuse, delete)


def _wire_status(demo: gr.Blocks, page: _Page, handlers: _Handlers, cookie_path: str) -> None:
    """The status line (at load, every 5 s), the key, and the LoRA pickers' choices."""
    session, key, loras = page.session, page.key, page.form.loras
    status_io = page.status_io()
    lora_io = {"inputs": [session.key], "outputs": [*loras.rows[0::2], loras.info], **_FREE}
    demo.load(handlers.status, **status_io).then(handlers.list_loras, **lora_io)
    gr.Timer(5).tick(handlers.status, show_progress="hidden", **status_io)
    # The page keeps the session's pass as a cookie, which its file and upload requests carry.
    cookie = f"{PASS_COOKIE}=${{p}}; path={cookie_path}; SameSite=Strict"
    keep_pass = f"(p) => {{ if (p) document.cookie = `{cookie}`; }}"
    for typed in (key.button.click, key.box.submit):
        typed(handlers.use_key, [key.box], [session.key, key.box, key.status, key.row, key.ui_pass], **_FREE).then(
            None, [key.ui_pass], None, js=keep_pass
        ).then(handlers.list_loras, **lora_io).then(handlers.status, **status_io)
    loras.refresh.click(handlers.list_loras, **lora_io)


def _wire_size(page: _Page, handlers: _Handlers) -> None:
    """The size and its preset, the seed's buttons, and the image inputs."""
    basics, inputs = page.form.basics, page.form.inputs
    on_size = functools.partial(preset_for, unit=handlers.unit)
    basics.preset.input(handlers.apply_preset, [basics.preset], [basics.width, basics.height])
    basics.width.input(on_size, [basics.width, basics.height], [basics.preset])
    basics.height.input(on_size, [basics.width, basics.height], [basics.preset])
    basics.seed_random.click(lambda: RANDOM_SEED, None, [basics.seed])
    # The size follows the inputs: the image's (plus the outpaint margins) or the control image's.
    size_in = [inputs[key] for key in ("image", "control_image", *MARGIN_KEYS, "resize")]
    size_out = [basics.width, basics.height, basics.preset, basics.size_msg]
    for changed in (inputs["image"].upload, inputs["image"].clear):
        changed(handlers.new_image, size_in, [inputs["mask_editor"], *size_out])
    for changed in (inputs["control_image"].upload, inputs["control_image"].clear, inputs["resize"].input,
                    *(inputs[key].input for key in MARGIN_KEYS)):  # fmt: skip
        changed(handlers.fit_size, size_in, size_out)
    inputs["strength"].input(lambda: False, None, [inputs["strength_default"]])  # moved: the user's strength
    inputs["mask_editor"].clear(handlers.blank_editor, [inputs["image"]], [inputs["mask_editor"]])
    basics.seed_reuse.click(handlers.reuse_seed, [page.session.last_seed], [basics.seed, page.results.progress])


def _wire_generate(page: _Page, handlers: _Handlers) -> None:
    """Generate and Cancel, the results' selection, and the PNG drop."""
    session, form, results = page.session, page.form, page.results
    fields = form.fields
    # The timer polls every 5 s; refreshing as the job ends keeps the line from showing the
    # finished job's worker busy until the next tick.
    form.basics.generate.click(
        handlers.generate,
        [session.key, *(fields[key] for key in GENERATE_KEYS), *form.loras.rows],
        [
            results.progress,
            results.gallery,
            session.results,
            results.image_params,
            results.download,
            session.last_seed,
            results.live,
        ],
        show_progress="hidden",
        **_FREE,
    ).then(handlers.status, show_progress="hidden", **page.status_io())
    form.basics.cancel.click(handlers.cancel, [session.key], [results.progress], **_FREE)
    results.gallery.select(handlers.select_result, [session.results], [results.image_params, results.download])
    form.png.upload(handlers.read_png, [session.key, form.png], [form.png_msg, *form.filled])


def _wire_history(page: _Page, handlers: _Handlers) -> None:
    """The History tab: its search, its selection, and the selected job's reuse and deletion."""
    session, history = page.session, page.history
    # What a selection sets: the job's parameters, the job, its buttons and its input images.
    selection = [history.params, session.hist_selected, history.reuse, history.delete, history.inputs]
    listing = [history.info, history.gallery, session.hist_records, *selection]
    query = [session.key, history.search]
    history.tab.select(handlers.history, query, listing, **_FREE)
    history.search_btn.click(handlers.history, query, listing, **_FREE)
    history.search.submit(handlers.history, query, listing, **_FREE)
    history.gallery.select(handlers.select_history, [session.key, session.hist_records], selection, **_FREE)
    selected = [session.key, session.hist_selected]
    history.reuse.click(handlers.reuse_job, selected, [page.tabs, page.results.progress, *page.form.filled], **_FREE)
    history.delete.click(handlers.delete_job, [*selected, history.search], listing, **_FREE)


class _Handlers:
    """Gradio event handlers; state lives in each session's gr.State, except the job a session is
    running, which Cancel must see while Generate is still streaming."""

    def __init__(self, client: ApiClient, unit: int, files: _UiFiles, passes: _Passes | None):
        self.client = client
        self.unit = unit
        self.files = files
        self.passes = passes
        self._running: dict[str, str] = {}  # session hash -> job id

    def status(self, key: str | None) -> tuple[Any, ...]:
        """The status line, the key row, and the ControlNet section (shown when the server has one)."""
        try:
            status = self.client.status(key)
        except ApiError as e:
            return error_text(e), gr.update(visible=e.unauthorized), gr.skip(), gr.skip()
        controlnet = status.get("controlnet")
        shown = gr.update(visible=bool(controlnet))
        return status_text(status), gr.update(visible=False), shown, controlnet_text(controlnet)

    def use_key(self, typed: str) -> tuple[Any, str, str, Any, str]:
        """The key, checked by the API, goes into session state; the page gets a pass for its files."""
        key = typed.strip() or None
        try:
            text = status_text(self.client.status(key))
        except ApiError as e:
            message = "That key was refused; check it and try again." if e.unauthorized else error_text(e)
            return None, "", message, gr.update(visible=True), ""
        ui_pass = self.passes.issue() if self.passes is not None else ""
        return key, "", text, gr.update(visible=False), ui_pass

    def list_loras(self, key: str | None) -> list[Any]:
        """The pickers' choices from the server's LoRA directory, and a line about it."""
        try:
            choices, line = lora_choices(self.client.loras(key))
        except ApiError as e:
            return [*(gr.skip() for _ in range(LORA_ROWS)), error_text(e)]
        return [*(gr.update(choices=choices) for _ in range(LORA_ROWS)), line]

    def apply_preset(self, label: str) -> tuple[Any, Any]:
        size = aspect_presets(self.unit).get(label)
        return (size[0], size[1]) if size else (gr.skip(), gr.skip())

    @staticmethod
    def reuse_seed(last: int | None) -> tuple[Any, str]:
        if last is None:
            return gr.skip(), "No image generated yet in this session, so there is no last seed to reuse."
        return last, gr.skip()

    def new_image(self, image: str | None, *size_inputs: Any) -> tuple[Any, ...]:
        """A new (or no) input image: the mask editor starts over on it, and the size follows it."""
        try:
            editor = self.blank_editor(image)
        except (FormError, OSError) as e:
            return gr.update(value=None, visible=False), gr.skip(), gr.skip(), gr.skip(), f"Error: {e}"
        return editor, *self.fit_size(image, *size_inputs)

    def blank_editor(self, image: str | None) -> Any:
        """The mask editor on the input image with nothing painted; hidden without an image. (Its
        *Clear canvas* removes the image too, so a clear puts the image back.)"""
        editor = self._editor({"background": image, "layers": []}) if image else None
        return gr.update(value=editor, visible=editor is not None)

    def _editor(self, value: dict[str, Any]) -> dict[str, Any]:
        """The mask editor's value for an input image and its layers (PIL images of the image's size):
        on the editor's picture of it, the layers scaled to match."""
        from PIL import Image

        picture = self.files.editor_picture(value["background"])
        layers = value["layers"]
        if picture != value["background"]:
            with Image.open(picture) as shown:
                layers = [layer.resize(shown.size, Image.Resampling.NEAREST) for layer in layers]
        return {"background": picture, "layers": layers, "composite": picture}

    def fit_size(
        self, image: str | None, control: str | None, left: Any, right: Any, top: Any, bottom: Any, resize: str | None
    ) -> tuple[Any, ...]:
        """Width, height and preset from the inputs (`ui.input_size`), and the line that says so."""
        try:
            size, line = input_size(image, control, (left, right, top, bottom), resize, self.unit)
        except FormError as e:
            return gr.skip(), gr.skip(), gr.skip(), f"Error: {e}"
        if size is None:
            return gr.skip(), gr.skip(), gr.skip(), line
        return size[0], size[1], preset_for(*size, unit=self.unit), line

    def generate(self, request: gr.Request, key: str | None, *values: Any) -> Iterator[tuple[Any, ...]]:
        """Queue a job, then stream its progress and live previews; the last update shows the
        images. Each update: the progress line, gallery, results, image parameters, download, last
        seed and the live preview. `values`: the form's (`GENERATE_KEYS`), then the LoRA pickers',
        name then weight for each row (`request` comes first for Gradio: it puts the request at the
        annotated parameter's place)."""
        skip = gr.skip()
        count = len(GENERATE_KEYS)
        try:
            params = form_body(dict(zip(GENERATE_KEYS, values[:count], strict=True)), lora_pairs(values[count:]))
        except FormError as e:
            yield f"Error: {e}", *(skip,) * 6
            return
        try:
            job = self.client.create_job({**params, "preview": True}, key)
        except ApiError as e:
            yield error_text(e), *(skip,) * 6
            return
        session = request.session_hash or ""
        self._running[session] = job["id"]
        clear = ("", gr.update(visible=False))
        hidden = gr.update(value=None, visible=False)
        yield "Queued", [], [], *clear, job["params"]["seed"], hidden
        try:
            for event in self.client.events(job["id"], key):
                if event.name == "done":
                    records = _records([event.data], self.files, key)
                    done = f"Done: {len(records)} image(s), seed {job['params']['seed']}"
                    done += "".join(f"\n\nWarning: {w}" for w in event.data.get("warnings", []))
                    yield done, _gallery(records), records, *clear, skip, hidden
                elif event.name in ("failed", "cancelled"):
                    error = (event.data.get("error") or {}).get("message", "")
                    yield ("Cancelled" if event.name == "cancelled" else f"Failed: {error}"), *(skip,) * 5, hidden
                else:
                    picture = preview_picture(event)
                    shown = gr.update(value=picture, visible=True) if picture is not None else skip
                    yield progress_text(event, params["n"]), *(skip,) * 5, shown
        except ApiError as e:
            yield error_text(e), *(skip,) * 5, hidden
        finally:
            if self._running.get(session) == job["id"]:
                del self._running[session]

    def cancel(self, key: str | None, request: gr.Request) -> str:
        job_id = self._running.get(request.session_hash or "")
        if job_id is None:
            return "Nothing to cancel: no job of this page is queued or running."
        try:
            job = self.client.cancel(job_id, key)
        except ApiError as e:
            return error_text(e)
        return "Cancelling…" if job.get("status") != "cancelled" else "Cancelled"

    @staticmethod
    def select_result(records: list[dict[str, Any]], evt: gr.SelectData) -> tuple[str, Any]:
        record = records[evt.index]
        text = describe_params(record["job"]["params"], record["seed"], record.get("variation_seed"))
        return text, gr.update(value=record["path"], visible=not record["missing"])

    def read_png(self, key: str | None, path: str | None) -> tuple[Any, ...]:
        from ..errors import InvalidRequestError
        from ..imageio import read_parameters

        if not path:
            return "", *_NO_FILL
        try:  # the PNG's prompt is data: a session without the key reads none (the folder holds images too)
            self.client.status(key)
        except ApiError as e:
            return error_text(e), *_NO_FILL
        try:
            params, source, ignored = read_parameters(path)
        except InvalidRequestError as e:
            return f"Error: {e}", *_NO_FILL
        values, notes = form_values(params, self.unit)
        notes += [f"{field} is not used by zturbo" for field in ignored]
        origin = "zturbo metadata" if source == "zturbo" else "A1111 'parameters' text"
        message = "\n".join([f"Filled the form from the PNG's {origin}.", *(f"- Note: {note}" for note in notes)])
        return message, *_form_updates(values)

    def history(self, key: str | None, query: str) -> tuple[Any, ...]:
        idle = (None, gr.update(interactive=False), gr.update(interactive=False), gr.update(value=[], visible=False))
        try:
            page = self.client.history(key, q=query.strip(), limit=HISTORY_PAGE)
            records = _records(page["items"], self.files, key)
        except ApiError as e:
            return error_text(e), [], [], "", *idle
        shown = len(page["items"])
        what = f" matching “{query.strip()}”" if query.strip() else ""
        info = f"{page['total']} finished job(s){what}; showing the newest {shown}, {len(records)} image(s)."
        if missing := sum(1 for r in records if r["missing"]):
            info += f" {missing} image(s) have no file any more, marked “file missing”: select one to see why."
        return info, _gallery(records), records, "", *idle

    def select_history(self, key: str | None, records: list[dict[str, Any]], evt: gr.SelectData) -> tuple[Any, ...]:
        """The image's job: its parameters and input settings, and its input images' thumbnails."""
        record = records[evt.index]
        job = record["job"]
        text = describe_params(job["params"], record["seed"], record.get("variation_seed"))
        text += f"\n- **Job:** {job['id']} ({job['status']})"
        if record["missing"]:
            text += f"\n- **File:** none, so no image to show: {record['missing']}"
        try:
            shown = [(path, INPUT_LABELS.get(field, field)) for field, path in self._inputs(job, key).items()]
        except ApiError as e:
            shown, text = [], text + f"\n- **Input images:** not shown: {e}"
        thumbnails = gr.update(value=shown, visible=bool(shown))
        return text, job, gr.update(interactive=True), gr.update(interactive=True), thumbnails

    def _inputs(self, job: dict[str, Any], key: str | None) -> dict[str, str]:
        """The job's input images by field, as files the UI keeps (`GET /v1/jobs/{id}/inputs/{field}`)."""
        images = (job["params"].get("inputs") or {}).get("images") or {}
        fetch = self.files.input_image
        return {field: fetch(job["id"], field, image_digest(ref), key) for field, ref in images.items()}

    def reuse_job(self, key: str | None, job: dict[str, Any] | None) -> tuple[Any, ...]:
        """The form filled from a job, its input images and painted mask included."""
        if job is None:
            return gr.skip(), "Select an image in History first.", *_NO_FILL
        try:
            files: dict[str, str] | None = self._inputs(job, key)
        except ApiError as e:
            files, failed = None, f" Note: its input images could not be fetched: {e}."
        else:
            failed = ""
        values, notes = form_values(job["params"], self.unit, files)
        if values.get("mask_editor"):
            values["mask_editor"] = self._editor(values["mask_editor"])
        message = "Parameters reused from history." + "".join(f" Note: {note}." for note in notes) + failed
        return gr.Tabs(selected="generate"), message, *_form_updates(values)

    def delete_job(self, key: str | None, job: dict[str, Any] | None, query: str) -> tuple[Any, ...]:
        if job is not None:
            try:
                self.client.delete_history(job["id"], key)
            except ApiError as e:
                _info, *rest = self.history(key, query)
                return error_text(e), *rest
        return self.history(key, query)


_NO_FILL = (gr.skip(),) * (len(FORM_KEYS) + 4)
_CONTROL_SETTINGS = ("control_type", "control_scale", "control_start", "control_end")


def _form_updates(values: dict[str, Any]) -> list[Any]:
    """Updates for the form fields and the Advanced, LoRAs, image and ControlNet accordions, each
    opened when a value it holds is set."""
    advanced = any(values.get(k) for k in ("negative_prompt", "guidance_scale", "variation_strength", "variety"))
    advanced = advanced or cfg_options_on(values)
    loras = any(values.get(f"lora_{i}") for i in range(LORA_ROWS))
    changed = {k for k, default in INPUT_DEFAULTS.items() if values.get(k, default) != default}
    image = values.get("image") or values.get("strength_default") is False or any(values.get(k) for k in MARGIN_KEYS)
    image = image or bool(changed - set(_CONTROL_SETTINGS))
    control = values.get("control_image") or bool(changed & set(_CONTROL_SETTINGS))
    updates = {k: values[k] for k in FORM_KEYS if k in values}
    if "mask_editor" in updates:  # the editor shows only with an input image to paint on
        updates["mask_editor"] = gr.update(value=updates["mask_editor"], visible=updates["mask_editor"] is not None)
    return [
        *(updates.get(k, gr.skip()) for k in FORM_KEYS),
        *(gr.Accordion(open=True) if opened else gr.skip() for opened in (advanced, loras, image, control)),
    ]
