"""The Gradio page of the web UI, its event handlers and its mounting on the server (see `ui`).

This module imports gradio at the top, so only `zturbo serve` imports it, when it mounts the UI.
Gradio reads the handlers' annotations (gr.Request, gr.SelectData) to inject them.
"""

from __future__ import annotations

import functools
import re
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gradio as gr
from fastapi import FastAPI

from ..request import FIELD, ModelLimits
from .apiclient import ApiClient, ApiError
from .ui import (
    CUSTOM,
    FORM_KEYS,
    GUIDANCE_INFO,
    HISTORY_PAGE,
    RANDOM_SEED,
    VARIATION_INFO,
    VARIETY_INFO,
    FormError,
    aspect_presets,
    describe_params,
    error_text,
    form_values,
    job_params,
    preset_for,
    progress_text,
    status_text,
)


class _ImageFiles:
    """PNGs fetched from the API, kept byte-for-byte (so the metadata chunks survive) in a private
    temp directory, one file per image id; images never change, so each is fetched once."""

    def __init__(self, client: ApiClient):
        self._client = client
        self._dir: tempfile.TemporaryDirectory[str] | None = None
        self._lock = threading.Lock()

    def path(self, image: dict[str, Any], key: str | None) -> str:
        with self._lock:
            if self._dir is None:
                self._dir = tempfile.TemporaryDirectory(prefix="zturbo-ui-")
        safe_id = re.sub(r"[^A-Za-z0-9_-]", "", str(image["id"]))[:32]
        path = Path(self._dir.name) / f"zturbo-{image.get('seed', 'x')}-{safe_id}.png"
        if not path.exists():
            data = self._client.image(image["id"], key)
            tmp = path.with_suffix(f".{threading.get_ident()}.part")  # two sessions may fetch it at once
            tmp.write_bytes(data)
            tmp.replace(path)
        return str(path)


def _records(jobs: list[dict[str, Any]], files: _ImageFiles, key: str | None) -> list[dict[str, Any]]:
    """One record per image of the jobs: its file, seed and job, for a gallery and its selection."""
    return [
        {
            "path": files.path(image, key),
            "seed": image.get("seed"),
            "variation_seed": image.get("variation_seed"),
            "job": job,
        }
        for job in jobs
        for image in job.get("images") or []
    ]


def _gallery(records: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(r["path"], f"seed {r['seed']}") for r in records]


def mount(app: FastAPI, api_base: str, path: str = "/ui") -> FastAPI:
    """Mount the web UI on the server's FastAPI app (same port as the API), and redirect `/` to it."""
    from fastapi.responses import RedirectResponse

    if not any(getattr(route, "path", None) == "/" for route in app.routes):
        app.add_api_route("/", lambda: RedirectResponse(f"{path}/"), include_in_schema=False)
    limits = app.state.service.settings.limits
    # Uploads are only PNGs to read parameters from; the cap keeps a stray large file out.
    return gr.mount_gradio_app(app, build(api_base, limits), path=path, footer_links=[], max_file_size="64mb")


def _slider_range(name: str) -> tuple[float, float]:
    """A slider's ends: the request table's range for the field."""
    bounds = FIELD[name].range()
    assert bounds is not None, name
    return bounds


def build(api_base: str, limits: ModelLimits) -> gr.Blocks:
    """The Gradio app; `api_base` is where its handlers reach the API (the serving process itself),
    `limits` the served model's (the size presets and inputs step by its spatial unit)."""
    unit = limits.spatial_unit
    handlers = _Handlers(ApiClient(api_base), unit)
    presets = aspect_presets(unit)
    on_size = functools.partial(preset_for, unit=unit)
    with gr.Blocks(title="zturbo", analytics_enabled=False) as demo:
        key_state = gr.State(None)
        last_seed = gr.State(None)
        results = gr.State([])
        hist_records = gr.State([])
        hist_selected = gr.State(None)

        gr.Markdown("## zturbo · Z-Image-Turbo")
        status_md = gr.Markdown("Connecting…", elem_id="status-line")
        with gr.Row(visible=False, elem_id="key-row") as key_row:
            key_box = gr.Textbox(label="API key", type="password", scale=4, elem_id="api-key")
            key_btn = gr.Button("Use key", scale=1, elem_id="use-key")

        with gr.Tabs(selected="generate") as tabs:
            with gr.Tab("Generate", id="generate"), gr.Row():
                with gr.Column(scale=2):
                    prompt = gr.Textbox(
                        label="Prompt", lines=3, placeholder="Describe the image, in English or 中文", elem_id="prompt"
                    )
                    with gr.Row():
                        generate_btn = gr.Button("Generate", variant="primary", elem_id="generate")
                        cancel_btn = gr.Button("Cancel", variant="stop", elem_id="cancel")
                    preset = gr.Dropdown(
                        [*presets, CUSTOM], value=next(iter(presets)), label="Aspect ratio", elem_id="preset"
                    )
                    with gr.Row():
                        width = gr.Number(1024, label="Width", precision=0, step=unit, elem_id="width")
                        height = gr.Number(1024, label="Height", precision=0, step=unit, elem_id="height")
                    steps = gr.Slider(
                        *_slider_range("steps"), value=FIELD["steps"].default, step=1, label="Steps", elem_id="steps"
                    )
                    with gr.Row():
                        seed = gr.Number(RANDOM_SEED, label="Seed (-1 = random)", precision=0, scale=2, elem_id="seed")
                        random_btn = gr.Button("Random", scale=1, size="sm", min_width=80, elem_id="seed-random")
                        reuse_btn = gr.Button("Reuse last", scale=1, size="sm", min_width=80, elem_id="seed-reuse")
                    n = gr.Slider(*_slider_range("batch"), value=1, step=1, label="Number of images", elem_id="n")
                    with gr.Accordion("Advanced", open=False, elem_id="advanced") as advanced:
                        negative = gr.Textbox(label="Negative prompt", lines=2, elem_id="negative")
                        guidance = gr.Slider(
                            *_slider_range("guidance_scale"), value=0, step=0.1, label="Guidance (CFG scale)",
                            info=GUIDANCE_INFO, elem_id="guidance",
                        )  # fmt: skip
                        variation_seed = gr.Number(
                            RANDOM_SEED, label="Variation seed (-1 = random)", precision=0,
                            elem_id="variation-seed",
                        )  # fmt: skip
                        variation_strength = gr.Slider(
                            0, 1, value=0, step=0.01, label="Variation strength", info=VARIATION_INFO,
                            elem_id="variation-strength",
                        )  # fmt: skip
                        variety = gr.Slider(
                            0, 1, value=0, step=0.01, label="Seed variety", info=VARIETY_INFO, elem_id="variety"
                        )
                    png = gr.File(
                        label="Drop a PNG here to read its parameters", file_types=[".png"], type="filepath",
                        elem_id="png-drop",
                    )  # fmt: skip
                    png_msg = gr.Markdown(elem_id="png-msg")
                with gr.Column(scale=3):
                    progress = gr.Markdown(elem_id="progress")
                    gallery = gr.Gallery(
                        label="Results",
                        columns=2,
                        interactive=False,
                        buttons=["download", "fullscreen"],
                        elem_id="results",
                    )
                    image_params = gr.Markdown(elem_id="image-params")
                    download = gr.DownloadButton("Download PNG (with metadata)", visible=False, elem_id="download")
            with gr.Tab("History", id="history") as history_tab:
                with gr.Row():
                    search = gr.Textbox(label="Search prompts", scale=4, elem_id="search")
                    search_btn = gr.Button("Search / refresh", scale=1, elem_id="search-btn")
                hist_info = gr.Markdown(elem_id="history-info")
                hist_gallery = gr.Gallery(
                    label="History", columns=8, fit_columns=False, height=360, object_fit="cover", allow_preview=False,
                    interactive=False, buttons=[], elem_id="history-gallery",
                )  # fmt: skip
                hist_params = gr.Markdown(elem_id="history-params")
                with gr.Row():
                    hist_reuse = gr.Button("Reuse parameters", interactive=False, elem_id="history-reuse")
                    hist_delete = gr.Button("Delete", variant="stop", interactive=False, elem_id="history-delete")

        form = [
            prompt,
            negative,
            preset,
            width,
            height,
            steps,
            guidance,
            seed,
            n,
            variation_seed,
            variation_strength,
            variety,
        ]
        free = {"concurrency_limit": None}  # the server's queue orders the work; Gradio's must not
        status_io = {"inputs": [key_state], "outputs": [status_md, key_row], **free}
        demo.load(handlers.status, **status_io)
        gr.Timer(5).tick(handlers.status, show_progress="hidden", **status_io)
        key_btn.click(handlers.use_key, [key_box], [key_state, key_box, status_md, key_row], **free)
        key_box.submit(handlers.use_key, [key_box], [key_state, key_box, status_md, key_row], **free)

        preset.input(handlers.apply_preset, [preset], [width, height])
        width.input(on_size, [width, height], [preset])
        height.input(on_size, [width, height], [preset])
        random_btn.click(lambda: RANDOM_SEED, None, [seed])
        reuse_btn.click(handlers.reuse_seed, [last_seed], [seed, progress])

        # The timer polls every 5 s; refreshing as the job ends keeps the line from showing the
        # finished job's worker busy until the next tick.
        generate_btn.click(
            handlers.generate,
            [key_state, *(field for field in form if field is not preset)],  # the form's values, less the preset
            [progress, gallery, results, image_params, download, last_seed],
            show_progress="hidden",
            **free,
        ).then(handlers.status, show_progress="hidden", **status_io)
        cancel_btn.click(handlers.cancel, [key_state], [progress], **free)
        gallery.select(handlers.select_result, [results], [image_params, download])
        filled = [*form, advanced]  # the accordion opens when a fill sets a negative prompt or CFG
        png.upload(handlers.read_png, [png], [png_msg, *filled])

        hist_io = [hist_info, hist_gallery, hist_records, hist_params, hist_selected, hist_reuse, hist_delete]
        history_tab.select(handlers.history, [key_state, search], hist_io, **free)
        search_btn.click(handlers.history, [key_state, search], hist_io, **free)
        search.submit(handlers.history, [key_state, search], hist_io, **free)
        hist_gallery.select(
            handlers.select_history, [hist_records], [hist_params, hist_selected, hist_reuse, hist_delete]
        )
        hist_reuse.click(handlers.reuse_job, [hist_selected], [tabs, progress, *filled])
        hist_delete.click(handlers.delete_job, [key_state, hist_selected, search], hist_io, **free)
    return demo


class _Handlers:
    """Gradio event handlers; state lives in each session's gr.State, except the job a session is
    running, which Cancel must see while Generate is still streaming."""

    def __init__(self, client: ApiClient, unit: int):
        self.client = client
        self.unit = unit
        self.files = _ImageFiles(client)
        self._running: dict[str, str] = {}  # session hash -> job id

    def status(self, key: str | None) -> tuple[str, Any]:
        try:
            return status_text(self.client.status(key)), gr.update(visible=False)
        except ApiError as e:
            return error_text(e), gr.update(visible=e.unauthorized)

    def use_key(self, typed: str) -> tuple[Any, str, str, Any]:
        key = typed.strip() or None
        try:
            text = status_text(self.client.status(key))
        except ApiError as e:
            message = "That key was refused; check it and try again." if e.unauthorized else error_text(e)
            return None, "", message, gr.update(visible=True)
        return key, "", text, gr.update(visible=False)

    def apply_preset(self, label: str) -> tuple[Any, Any]:
        size = aspect_presets(self.unit).get(label)
        return (size[0], size[1]) if size else (gr.skip(), gr.skip())

    @staticmethod
    def reuse_seed(last: int | None) -> tuple[Any, str]:
        if last is None:
            return gr.skip(), "No image generated yet in this session, so there is no last seed to reuse."
        return last, gr.skip()

    def generate(
        self,
        key: str | None,
        prompt: str,
        negative: str,
        width: float | None,
        height: float | None,
        steps: float,
        guidance: float,
        seed: float | None,
        n: float,
        variation_seed: float | None,
        variation_strength: float,
        variety: float,
        request: gr.Request,
    ) -> Iterator[tuple[Any, ...]]:
        """Queue a job, then stream its progress; the last update shows the images."""
        skip = gr.skip()
        try:
            params = job_params(
                prompt, negative, width, height, steps, guidance, seed, n, variation_seed, variation_strength, variety
            )
        except FormError as e:
            yield f"Error: {e}", skip, skip, skip, skip, skip
            return
        try:
            job = self.client.create_job(params, key)
        except ApiError as e:
            yield error_text(e), skip, skip, skip, skip, skip
            return
        session = request.session_hash or ""
        self._running[session] = job["id"]
        clear = ("", gr.update(visible=False))
        yield "Queued", [], [], *clear, job["params"]["seed"]
        try:
            for event in self.client.events(job["id"], key):
                if event.name == "done":
                    records = _records([event.data], self.files, key)
                    yield (
                        f"Done: {len(records)} image(s), seed {job['params']['seed']}",
                        _gallery(records),
                        records,
                        *clear,
                        skip,
                    )
                elif event.name in ("failed", "cancelled"):
                    error = (event.data.get("error") or {}).get("message", "")
                    yield ("Cancelled" if event.name == "cancelled" else f"Failed: {error}"), *(skip,) * 5
                else:
                    yield progress_text(event, params["n"]), *(skip,) * 5
        except ApiError as e:
            yield error_text(e), *(skip,) * 5
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
        return text, gr.update(value=record["path"], visible=True)

    def read_png(self, path: str | None) -> tuple[Any, ...]:
        from ..errors import InvalidRequestError
        from ..imageio import read_parameters

        if not path:
            return "", *_NO_FILL
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
        idle = (None, gr.update(interactive=False), gr.update(interactive=False))
        try:
            page = self.client.history(key, q=query.strip(), limit=HISTORY_PAGE)
            records = _records(page["items"], self.files, key)
        except ApiError as e:
            return error_text(e), [], [], "", *idle
        shown = len(page["items"])
        what = f" matching “{query.strip()}”" if query.strip() else ""
        info = f"{page['total']} finished job(s){what}; showing the newest {shown}, {len(records)} image(s)."
        return info, _gallery(records), records, "", *idle

    @staticmethod
    def select_history(records: list[dict[str, Any]], evt: gr.SelectData) -> tuple[Any, ...]:
        record = records[evt.index]
        job = record["job"]
        text = describe_params(job["params"], record["seed"], record.get("variation_seed"))
        text += f"\n- **Job:** {job['id']} ({job['status']})"
        return text, job, gr.update(interactive=True), gr.update(interactive=True)

    def reuse_job(self, job: dict[str, Any] | None) -> tuple[Any, ...]:
        if job is None:
            return gr.skip(), "Select an image in History first.", *_NO_FILL
        values, notes = form_values(job["params"], self.unit)
        message = "Parameters reused from history." + "".join(f" Note: {note}." for note in notes)
        return gr.Tabs(selected="generate"), message, *_form_updates(values)

    def delete_job(self, key: str | None, job: dict[str, Any] | None, query: str) -> tuple[Any, ...]:
        if job is not None:
            try:
                self.client.delete_history(job["id"], key)
            except ApiError as e:
                _info, *rest = self.history(key, query)
                return error_text(e), *rest
        return self.history(key, query)


_NO_FILL = (gr.skip(),) * (len(FORM_KEYS) + 1)


def _form_updates(values: dict[str, Any]) -> list[Any]:
    """Updates for the form fields and the Advanced accordion, opened when a value it holds is set."""
    advanced = any(values.get(k) for k in ("negative_prompt", "guidance_scale", "variation_strength", "variety"))
    return [
        *(values[k] if k in values else gr.skip() for k in FORM_KEYS),
        gr.Accordion(open=True) if advanced else gr.skip(),
    ]
