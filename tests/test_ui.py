"""Web UI helpers without a browser: size presets, form validation, reading parameters back from
PNGs, the status line, and the API client the UI's handlers use."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from serving import in_process_app
from zturbo.errors import InvalidRequestError
from zturbo.imageio import a1111_parameters, parse_a1111, png_info, read_parameters
from zturbo.serving.apiclient import ApiClient, ApiError, Event
from zturbo.serving.ui import (
    CUSTOM,
    RATIOS,
    FormError,
    api_base_for,
    aspect_presets,
    form_values,
    job_params,
    preset_for,
    progress_text,
    status_text,
)


@pytest.fixture(scope="module")
def api(tmp_path_factory) -> TestClient:
    """The HTTP API in process (no workers: accepted jobs wait in the queue)."""
    return TestClient(in_process_app(tmp_path_factory.mktemp("ui-api")))


META = {
    "prompt": "一只橘猫在窗台上晒太阳, warm light",
    "negative_prompt": "blurry, low quality",
    "seed": 4242,
    "steps": 6,
    "guidance_scale": 2.5,
    "width": 832,
    "height": 1248,
    "model": "Tongyi-MAI/Z-Image-Turbo",
    "model_fingerprint": "0123456789abcdef",
    "zturbo_version": "0.1.0",
}


def test_presets_cover_every_ratio_at_1_and_2_megapixels_in_multiples_of_16() -> None:
    presets = aspect_presets(16)
    assert len(presets) == 2 * len(RATIOS)
    for label, (w, h) in presets.items():
        assert w % 16 == 0 and h % 16 == 0, label
        ratio, mp = label.split(" · ")[0], 2 if "(2 MP)" in label else 1
        rw, rh = map(int, ratio.split(":"))
        assert abs(w * h / (mp * 2**20) - 1) < 0.03, label
        assert abs((w / h) / (rw / rh) - 1) < 0.02, label
    assert presets["1:1 · 1024×1024 (1 MP)"] == (1024, 1024)
    assert preset_for(1360, 768, 16) == "16:9 · 1360×768 (1 MP)"
    assert preset_for(64, 64, 16) == CUSTOM


FORM = {
    "prompt": "a fox",
    "negative_prompt": "",
    "width": 64.0,
    "height": 128,
    "steps": 2,
    "guidance": 0,
    "seed": -1,
    "n": 2,
}


def test_job_params_builds_the_contract_body() -> None:
    body = job_params(*FORM.values())
    assert body == {
        "prompt": "a fox",
        "negative_prompt": "",
        "width": 64,
        "height": 128,
        "steps": 2,
        "guidance_scale": 0.0,
        "seed": None,  # -1 in the form = let the server pick
        "n": 2,
        "variation_seed": None,
        "variation_strength": 0.0,
        "variety": 0.0,
    }
    assert isinstance(body["width"], int)
    assert job_params(*{**FORM, "seed": 7}.values())["seed"] == 7
    explore = job_params(*FORM.values(), 40, 0.25, 1)
    assert (explore["variation_seed"], explore["variation_strength"], explore["variety"]) == (40, 0.25, 1.0)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"height": None}, "height is empty"),
        ({"width": 64.5}, "width must be a whole number, got 64.5"),
        ({"variety": None}, "seed variety is empty"),
    ],
)
def test_job_params_refuses_what_the_form_cannot_send(change: dict[str, object], message: str) -> None:
    form = {**FORM, "variation_seed": -1, "variation_strength": 0, "variety": 0}
    with pytest.raises(FormError, match=message):
        job_params(*{**form, **change}.values())


@pytest.mark.parametrize(
    ("change", "field", "message"),
    [
        ({"width": 1000}, "width", "width 1000 is not a multiple of 16 (the model's spatial unit); nearest valid: 992"),
        ({"steps": 101}, "steps", "steps 101 is out of range; allowed 1..100"),
        ({"n": 65}, "n", "n 65 is out of range; allowed 1..64"),
        ({"guidance": 30.5}, "guidance_scale", "guidance_scale 30.5 is out of range; allowed 0..30"),
        ({"seed": -2}, "seed", "seed -2 is out of range"),
        ({"prompt": "   "}, "prompt", "prompt is empty"),
        ({"variation_seed": -2}, "variation_seed", "variation_seed -2 is out of range"),
        ({"variation_strength": 1.5}, "variation_strength", "variation_strength 1.5 is out of range; allowed 0..1"),
    ],
)
def test_the_server_refuses_bad_form_values_naming_them(
    api: TestClient, change: dict[str, object], field: str, message: str
) -> None:
    """The form sends what it holds; the request validator decides, so the page shows the API's message."""
    form = {**FORM, "variation_seed": -1, "variation_strength": 0, "variety": 0}
    r = api.post("/v1/jobs", json=job_params(*{**form, **change}.values()))
    assert r.status_code == 400, r.text
    assert r.json()["error"]["field"] == field
    assert message in r.json()["error"]["message"]


def test_a1111_text_written_by_zturbo_reads_back() -> None:
    parsed, ignored = parse_a1111(a1111_parameters(META))
    assert ignored == []
    for key in ("prompt", "negative_prompt", "seed", "steps", "guidance_scale", "width", "height"):
        assert parsed[key] == META[key], key


def test_a1111_text_from_another_tool() -> None:
    text = (
        "masterpiece, a fox in snow\nsecond line of prompt\n"
        "Negative prompt: blurry, lowres\n"
        'Steps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 42, Size: 512x768, Lora hashes: "a: 1, b: 2", '
        "Model: sd_xl"
    )
    parsed, ignored = parse_a1111(text)
    assert ignored == ["Sampler (DPM++ 2M Karras)", "Lora hashes"]
    assert parsed == {
        "prompt": "masterpiece, a fox in snow\nsecond line of prompt",
        "negative_prompt": "blurry, lowres",
        "steps": 20,
        "guidance_scale": 7.0,
        "seed": 42,
        "width": 512,
        "height": 768,
    }


def test_a1111_text_without_steps_line_is_refused() -> None:
    with pytest.raises(InvalidRequestError, match="no 'Steps:' line"):
        parse_a1111("just a caption")


def _png(path: Path, **chunks: str) -> Path:
    info = PngInfo()
    for key, text in chunks.items():
        info.add_text(key, text)
    Image.new("RGB", (16, 16)).save(path, pnginfo=info)
    return path


def test_read_parameters_prefers_the_zturbo_chunk(tmp_path: Path) -> None:
    path = tmp_path / "z.png"
    Image.new("RGB", (16, 16)).save(path, pnginfo=png_info(META))
    params, source, _ = read_parameters(path)
    assert source == "zturbo" and params["seed"] == 4242 and params["prompt"] == META["prompt"]

    a1111 = _png(tmp_path / "a.png", parameters="a lighthouse\nSteps: 12, CFG scale: 0, Seed: 5, Size: 768x512")
    params, source, _ = read_parameters(a1111)
    assert source == "parameters"
    assert (params["prompt"], params["steps"], params["seed"], params["width"]) == ("a lighthouse", 12, 5, 768)


def test_read_parameters_refuses_files_without_them(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequestError, match=r"plain\.png has no generation parameters"):
        read_parameters(_png(tmp_path / "plain.png", Comment="hello"))
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(InvalidRequestError, match=r"notes\.png is not a readable image"):
        read_parameters(tmp_path / "notes.png")


def test_form_values_fill_what_fits_and_name_what_does_not() -> None:
    values, notes = form_values({**META, "n": 3}, 16)
    assert values["preset"] == "2:3 · 832×1248 (1 MP)"
    assert (values["seed"], values["n"], values["guidance_scale"]) == (4242, 3, 2.5)
    assert notes == []

    values, notes = form_values({"prompt": "x", "steps": 101, "width": 1000, "height": 768}, 16)
    assert "steps" not in values  # never silently clamped
    assert (values["width"], values["preset"]) == (1000, CUSTOM)
    assert notes == [
        "steps 101 is outside 1 to 100, so it was not filled in",
        "size 1000×768 is not a multiple of 16; change it before generating",
    ]


def test_form_values_fill_the_exploration_options_and_name_what_the_form_lacks() -> None:
    job = {"prompt": "x", "seed": 5, "variation_seed": 40, "variation_strength": 0.3, "variety": 0.6,
           "variety_until": 0.25}  # fmt: skip
    values, notes = form_values(job, 16)
    assert (values["variation_seed"], values["variation_strength"], values["variety"]) == (40, 0.3, 0.6)
    assert notes == []

    values, notes = form_values({"prompt": "x", "seed": None, "seeds": [3, 7], "variation_seed": None,
                                 "variation_strength": 1.5, "variety": 0.5, "variety_until": 0.5}, 16)  # fmt: skip
    assert values["variation_seed"] == -1  # none recorded: the form's "random", not the previous value
    assert "seed" not in values and "variation_strength" not in values
    assert notes == [
        "variation_strength 1.5 is outside 0 to 1, so it was not filled in",
        "the seed list [3, 7] has no field here; the form makes images from one seed",
        "variety until 0.5 has no field here; the form uses 0.25",
    ]


def test_status_line_names_model_device_dtypes_plan_memory_and_queue() -> None:
    status = {
        "model": "Tongyi-MAI/Z-Image-Turbo",
        "device": "cuda:0",
        "dtypes": {"transformer": "bfloat16", "text_encoder": "bfloat16", "vae": "float32"},
        "memory_plan": "te-offload",
        "gpu_memory": {"used_bytes": 13 * 2**30, "free_bytes": 66 * 2**30, "total_bytes": 79 * 2**30},
        "queue_depth": 3,
        "workers": [{"id": "w0", "device": "cuda:0", "state": "busy", "restarts": 0}],
    }
    line = status_text(status)
    for part in ("Tongyi-MAI/Z-Image-Turbo", "cuda:0", "transformer bfloat16", "vae float32", "plan te-offload"):
        assert part in line
    assert "GPU 13.0 GiB used / 66.0 GiB free" in line and "queue 3" in line and "busy" in line
    assert "GPU memory: n/a" in status_text({**status, "gpu_memory": None})


def test_progress_text() -> None:
    assert progress_text(Event("queued", {"position": 0}), 1) == "Queued: next in line"
    assert progress_text(Event("queued", {"position": 2}), 1) == "Queued: 2 job(s) ahead"
    assert progress_text(Event("progress", {"step": 3, "steps": 8}), 1) == "Generating: step 3/8"
    assert (
        progress_text(Event("progress", {"step": 3, "steps": 8, "image": 1}), 2) == "Generating: image 2/2 · step 3/8"
    )


def test_api_base_for_wildcard_binds_uses_loopback() -> None:
    assert api_base_for("0.0.0.0", 8000) == "http://127.0.0.1:8000"
    assert api_base_for("::", 8000) == "http://[::1]:8000"
    assert api_base_for("10.0.0.5", 80) == "http://10.0.0.5:80"


def test_client_sends_the_key_as_bearer_and_reads_error_bodies() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.headers.get("authorization") != "Bearer s3cret":
            return httpx.Response(401, json={"error": {"type": "unauthorized", "message": "bad key", "field": None}})
        return httpx.Response(
            400, json={"error": {"type": "invalid_request", "message": "width 65 is not ...", "field": "width"}}
        )

    client = ApiClient("http://zturbo.test", transport=httpx.MockTransport(handler))
    with pytest.raises(ApiError) as err:
        client.status(None)
    assert err.value.unauthorized and "authorization" not in seen[-1].headers
    with pytest.raises(ApiError, match="width 65") as err:
        client.create_job({"prompt": "x"}, "s3cret")
    assert (err.value.status, err.value.kind, err.value.field) == (400, "invalid_request", "width")
    assert json.loads(seen[-1].content) == {"prompt": "x"}


def test_client_events_stop_at_the_terminal_event() -> None:
    body = (
        ": keep-alive\n\n"
        'event: queued\ndata: {"position": 1}\n\n'
        'event: progress\ndata: {"step": 1, "steps": 2}\n\n'
        'event: done\ndata: {"id": "j1", "status": "succeeded"}\n\n'
        'event: progress\ndata: {"step": 9, "steps": 9}\n\n'
    )
    transport = httpx.MockTransport(
        lambda r: httpx.Response(200, text=body, headers={"content-type": "text/event-stream"})
    )
    events = list(ApiClient("http://zturbo.test", transport=transport).events("j1", None))
    assert [e.name for e in events] == ["queued", "progress", "done"]
    assert events[-1].data["status"] == "succeeded"


def test_importing_the_ui_module_does_not_import_gradio() -> None:
    code = "import sys, zturbo.serving.ui; assert 'gradio' not in sys.modules, 'gradio imported at import time'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_status_line_refreshes_as_soon_as_a_generate_job_ends(tmp_path: Path) -> None:
    """The status timer ticks every 5 s: the line is refreshed when a job ends, so it never shows
    the finished job's worker busy until the next tick."""
    from zturbo.request import ModelLimits
    from zturbo.serving.ui_app import _UiFiles, build

    client = ApiClient("http://127.0.0.1:9")
    demo = build(client, ModelLimits(spatial_unit=16, max_pixels=2048 * 2048), _UiFiles(tmp_path, client), None)
    generate = next(i for i, f in demo.fns.items() if getattr(f.fn, "__name__", "") == "generate")
    followers = [f for f in demo.fns.values() if f.trigger_after == generate]
    assert any(
        getattr(f.fn, "__name__", "") == "status"
        and not f.trigger_only_on_success  # after a failed or cancelled job too
        and "status-line" in [o.elem_id for o in f.outputs]
        for f in followers
    )


# --- the LoRA pickers -------------------------------------------------------------------------------


def test_job_params_sends_the_chosen_loras_only() -> None:
    rows = [("a.safetensors", 0.7), ("", 1.0), (None, 1.0), ("sub/b", 1)]
    assert job_params(*FORM.values(), loras=rows)["loras"] == [
        {"name": "a.safetensors", "weight": 0.7},
        {"name": "sub/b", "weight": 1.0},
    ]
    assert "loras" not in job_params(*FORM.values(), loras=[("", 1.0)])  # none chosen: the body as before
    with pytest.raises(FormError, match=r"weight of a\.safetensors is empty"):
        job_params(*FORM.values(), loras=[("a.safetensors", None)])


def test_form_values_fill_the_lora_pickers_and_clear_the_rest() -> None:
    from zturbo.serving.ui import LORA_ROWS, NO_LORA, describe_params

    job = {"prompt": "x", "loras": [{"name": "a.safetensors", "weight": 0.7}, {"name": "b", "weight": -1.0}]}
    values, notes = form_values(job, 16)
    assert [values[f"lora_{i}"] for i in range(LORA_ROWS)] == ["a.safetensors", "b", *[NO_LORA] * (LORA_ROWS - 2)]
    assert [values[f"lora_weight_{i}"] for i in range(2)] == [0.7, -1.0] and notes == []
    assert "- **LoRAs:** a.safetensors (0.7), b (-1)" in describe_params(job)

    values, _ = form_values({"prompt": "x", "loras": []}, 16)  # a job without LoRAs clears the pickers
    assert {values[f"lora_{i}"] for i in range(LORA_ROWS)} == {NO_LORA}
    values, _ = form_values({"prompt": "x"}, 16)  # parameters that do not say leave them as they are
    assert not any(key.startswith("lora") for key in values)

    many = [{"name": f"l{i}", "weight": 1.0} for i in range(LORA_ROWS + 2)]
    _, notes = form_values({"prompt": "x", "loras": many}, 16)
    assert notes == [f"the form has {LORA_ROWS} LoRA pickers, so l{LORA_ROWS}, l{LORA_ROWS + 1} was not filled in"]


def test_lora_choices_offer_the_usable_files_and_name_the_others() -> None:
    from zturbo.serving.ui import lora_choices

    items = [{"name": "a.safetensors", "usable": True}, {"name": "flux.safetensors", "usable": False}]
    choices, line = lora_choices(items)
    assert choices == [("none", ""), ("a.safetensors", "a.safetensors")]
    assert "1 LoRA(s)" in line and "Not usable with this model: flux.safetensors" in line
    assert "No LoRA files" in lora_choices([])[1]
    # The line is Markdown: a file's name is shown as it is, never as a link, markup or HTML.
    _, line = lora_choices([{"name": "[x](http://e.test)<img src=y>*b*.safetensors", "usable": False}])
    assert line.endswith(r"Not usable with this model: \[x\](http://e.test)\<img src=y\>\*b\*.safetensors.")


def test_the_page_lists_the_loras_and_sends_the_picked_ones_with_the_job(tmp_path: Path) -> None:
    """Through the page's own handlers: the pickers are filled from GET /v1/loras and a Generate sends
    the picked set; the listing handler may run before the key is typed (it takes no file, and the API
    answers it only with the key), and Gradio puts the request where `generate` expects it."""
    import gradio as gr
    from gradio.helpers import special_args

    from zturbo.request import ModelLimits
    from zturbo.serving.ui import LOCKED, LORA_ROWS
    from zturbo.serving.ui_app import _OPEN_HANDLERS, _UiFiles, build

    posted: list[dict] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/loras":  # the API's answer depends on the key the handler sends
            if request.headers.get("authorization") != "Bearer k":
                return httpx.Response(401, json={"error": {"type": "unauthorized", "message": "key"}})
            return httpx.Response(200, json={"items": [{"name": "a.safetensors", "usable": True}]})
        posted.append(json.loads(request.content))
        return httpx.Response(400, json={"error": {"type": "invalid_lora", "message": "no", "field": "loras.0"}})

    client = ApiClient("http://zturbo.test", transport=httpx.MockTransport(handler))
    demo = build(client, ModelLimits(spatial_unit=16, max_pixels=2048 * 2048), _UiFiles(tmp_path, client), None)
    fns = {getattr(f.fn, "__name__", ""): f for f in demo.fns.values()}
    lister = fns["list_loras"]
    assert "list_loras" in _OPEN_HANDLERS and not any(isinstance(c, gr.File) for c in lister.inputs)
    *pickers, line = lister.fn(None)  # before the key: the API's refusal, the pickers left as they are
    assert line == LOCKED and pickers == [gr.skip()] * LORA_ROWS
    *pickers, line = lister.fn("k")
    assert line.startswith("1 LoRA(s)")
    assert len(pickers) == LORA_ROWS and pickers[0]["choices"] == [("none", ""), ("a.safetensors", "a.safetensors")]

    generate = fns["generate"]
    form = ["a fox", "", 64, 64, 2, 0.0, 1, 1, -1, 0.0, 0.0]
    loras = ["a.safetensors", 0.5, *[None, 1.0] * (LORA_ROWS - 1)]
    assert len(generate.inputs) == 1 + len(form) + len(loras)  # the key, the form, the pickers
    marker = object()
    inputs, *_ = special_args(generate.fn, [None, *form, *loras], request=marker)
    assert inputs[0] is marker
    updates = list(generate.fn(*inputs))
    assert posted[-1]["loras"] == [{"name": "a.safetensors", "weight": 0.5}]
    assert updates[-1][0] == "Error: no"
