"""Web UI helpers without a browser: size presets, form validation, reading parameters back from
PNGs, the status line, and the API client the UI's handlers use."""

from __future__ import annotations

import io
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
        "cfg_normalization": 0.0,  # off, as the request type defines it
        "cfg_truncation": 1.0,
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
    cfg = job_params(*FORM.values(), cfg_normalization=2, cfg_truncation=0.5)
    assert (cfg["cfg_normalization"], cfg["cfg_truncation"]) == (2.0, 0.5)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"height": None}, "height is empty"),
        ({"width": 64.5}, "width must be a whole number, got 64.5"),
        ({"variety": None}, "seed variety is empty"),
        ({"cfg_truncation": None}, "CFG truncation is empty"),
    ],
)
def test_job_params_refuses_what_the_form_cannot_send(change: dict[str, object], message: str) -> None:
    form = {**FORM, "variation_seed": -1, "variation_strength": 0, "variety": 0, "cfg_normalization": 0,
            "cfg_truncation": 1}  # fmt: skip
    with pytest.raises(FormError, match=message):
        job_params(*{**form, **change}.values())


@pytest.mark.parametrize(
    ("change", "message"),
    [
        # The fraction typed is named, never rounded: Gradio's precision=0 had run 7.5 as 8, 6.5 as 6,
        # and called 1000.4 "width 1000 is not a multiple of 16".
        ({"seed": 7.5}, "seed must be a whole number, got 7.5"),
        ({"seed": 6.5}, "seed must be a whole number, got 6.5"),
        ({"width": 64.4}, "width must be a whole number, got 64.4"),
        ({"width": 1000.4}, "width must be a whole number, got 1000.4"),
        ({"steps": 7.5}, "steps must be a whole number, got 7.5"),
        ({"n": 2.5}, "number of images must be a whole number, got 2.5"),
        ({"variation_seed": 3.5}, "variation seed must be a whole number, got 3.5"),
        # The page's seed fields are text, read as typed.
        ({"seed": "7.5"}, r"seed must be a whole number \(-1 = random\), got 7.5$"),
        ({"seed": "1e3"}, r"seed must be a whole number \(-1 = random\), got 1e3$"),
        ({"variation_seed": "forty"}, r"variation seed must be a whole number \(-1 = random\), got forty$"),
        ({"seed": "  "}, r"seed is empty; enter a whole number \(-1 = random\)"),
        (
            {"seed": "9" * 5000},
            rf"seed 9{{24}}… \(5000 digits\) is out of range; allowed -1 \(random\) or 0..{2**63 - 1}",
        ),
    ],
)
def test_job_params_refuses_a_fraction_naming_the_value_typed(change: dict[str, object], message: str) -> None:
    with pytest.raises(FormError, match=message):
        job_params(**{**FORM, **change})


@pytest.mark.parametrize(
    ("typed", "sent"),
    [
        (2**53 + 1, 2**53 + 1),  # a number from gradio_client: an int, kept exact
        ("9007199254740993", 2**53 + 1),  # from the page: text, never a float on the way
        (str(2**63 - 1), 2**63 - 1),
        (" 007 ", 7),
        ("42.0", 42),
        (42.0, 42),
        ("-1", None),
        ("9999999999999999999", 9999999999999999999),  # above 2**63 - 1: the server names its range
    ],
)
def test_job_params_sends_a_large_seed_exactly(typed: object, sent: int | None) -> None:
    body = job_params(**{**FORM, "seed": typed, "variation_seed": typed})
    assert body["seed"] == sent and body["variation_seed"] == sent
    assert type(body["seed"]) is type(sent)


@pytest.mark.parametrize(
    ("change", "field", "message"),
    [
        ({"width": 1000}, "width", "width 1000 is not a multiple of 16 (the model's spatial unit); nearest valid: 992"),
        ({"steps": 101}, "steps", "steps 101 is out of range; allowed 1..100"),
        ({"n": 65}, "n", "n 65 is out of range; allowed 1..64"),
        ({"guidance": 30.5}, "guidance_scale", "guidance_scale 30.5 is out of range; allowed 0..30"),
        ({"seed": -2}, "seed", "seed -2 is out of range"),
        ({"seed": "9999999999999999999"}, "seed", "seed 9999999999999999999 is out of range; allowed 0.."),
        ({"prompt": "   "}, "prompt", "prompt is empty"),
        ({"variation_seed": -2}, "variation_seed", "variation_seed -2 is out of range"),
        ({"variation_strength": 1.5}, "variation_strength", "variation_strength 1.5 is out of range; allowed 0..1"),
        ({"cfg_normalization": 10.5}, "cfg_normalization", "cfg_normalization 10.5 is out of range; allowed 0..10"),
        ({"cfg_truncation": -0.1}, "cfg_truncation", "cfg_truncation -0.1 is out of range; allowed 0..1"),
    ],
)
def test_the_server_refuses_bad_form_values_naming_them(
    api: TestClient, change: dict[str, object], field: str, message: str
) -> None:
    """The form sends what it holds; the request validator decides, so the page shows the API's message."""
    form = {**FORM, "variation_seed": -1, "variation_strength": 0, "variety": 0, "cfg_normalization": 0,
            "cfg_truncation": 1}  # fmt: skip
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
                                 "variation_strength": 1.5, "variety": 0.5, "variety_until": 0.5,
                                 "output_format": "webp"}, 16)  # fmt: skip
    assert values["variation_seed"] == -1  # none recorded: the form's "random", not the previous value
    assert "seed" not in values and "variation_strength" not in values
    assert notes == [
        "variation_strength 1.5 is outside 0 to 1, so it was not filled in",
        "the seed list [3, 7] has no field here; the form makes images from one seed",
        "variety until 0.5 has no field here; the form uses 0.25",
        "output format webp has no field here; the form makes PNGs",
    ]


def test_a_pngs_cfg_options_fill_the_form_and_open_advanced(tmp_path: Path) -> None:
    """A PNG records the CFG options that ran; reading it back fills both (never dropped), names a
    value outside the request's range, and shows them among the image's parameters."""
    import gradio as gr

    from zturbo.serving.ui import describe_params
    from zturbo.serving.ui_app import _form_updates

    path = tmp_path / "cfg.png"
    Image.new("RGB", (16, 16)).save(path, pnginfo=png_info({**META, "cfg_normalization": 1.5, "cfg_truncation": 0.4}))
    params, _, _ = read_parameters(path)
    values, notes = form_values(params, 16)
    assert (values["cfg_normalization"], values["cfg_truncation"], notes) == (1.5, 0.4, [])
    assert "- **CFG options:** normalization 1.5, truncation 0.4" in describe_params(params)
    advanced = -4  # the Advanced accordion's update follows the form fields'
    assert _form_updates({"cfg_truncation": 0.4})[advanced] != gr.skip()
    assert _form_updates({"cfg_normalization": 0.0, "cfg_truncation": 1.0})[advanced] == gr.skip()
    assert "CFG options" not in describe_params({**params, "cfg_normalization": 0.0, "cfg_truncation": 1.0})

    values, notes = form_values({"prompt": "x", "cfg_normalization": 12.0, "cfg_truncation": 1.5}, 16)
    assert "cfg_normalization" not in values and "cfg_truncation" not in values  # never silently clamped
    assert notes == [
        "cfg_normalization 12.0 is outside 0 to 10, so it was not filled in",
        "cfg_truncation 1.5 is outside 0 to 1, so it was not filled in",
    ]


def test_a_jobs_cfg_options_round_trip_through_the_form(api: TestClient, tmp_path: Path) -> None:
    """A job with CFG options, reused: the form holds them and Generate sends the same body again."""
    from zturbo.serving.ui import GENERATE_KEYS

    body = job_params(*FORM.values(), cfg_normalization=2.5, cfg_truncation=0.3) | {"seed": 7, "guidance_scale": 4.0}
    r = api.post("/v1/jobs", json=body)
    assert r.status_code == 202, r.text
    params = r.json()["params"]
    assert (params["cfg_normalization"], params["cfg_truncation"]) == (2.5, 0.3)
    values, notes = form_values(params, 16)
    assert notes == []
    fns, posted = _page(tmp_path)
    _generate(fns, _untouched_form(fns["generate"], **{k: v for k, v in values.items() if k in GENERATE_KEYS}))
    resent = posted[-1]
    assert resent.pop("preview") is True
    assert resent | {"variation_seed": None} == body  # the server had picked the variation seed


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


def test_status_line_lists_a_ray_deployments_replicas_by_name_state_and_node() -> None:
    replicas = [
        {"id": "ray-replica-a1", "device": "cuda:0", "state": "busy", "node": "3f2e", "pid": 11},
        {"id": "ray-replica-b2", "device": "cuda:0", "state": "ready", "node": "9c0d", "pid": 12},
    ]
    line = status_text({"model": "m", "device": "ray", "workers": replicas})
    assert line.endswith(r"2 replica(s): ray-replica-a1 busy on node 3f2e, ray-replica-b2 ready on node 9c0d")
    assert status_text({"model": "m", "workers": []}).endswith("workers: none")


@pytest.mark.parametrize(
    ("origin", "weights", "says"),
    [
        ("hf", None, "**Tongyi-MAI/Z-Image** (base profile, Hugging Face hub) on"),
        ("modelscope", None, "(base profile, ModelScope)"),
        ("local", None, "(base profile, local directory)"),
        ("single-files", None, "(base profile, ComfyUI single files)"),
        (
            "single-files",
            {"file": "z_image-Q8_0.gguf", "format": "gguf", "quantization": "Q8_0"},
            r"(base profile, ComfyUI single files + GGUF transformer z\_image-Q8\_0.gguf (Q8_0))",
        ),
        ("hf", {"file": "z.gguf", "format": "gguf", "quantization": "Q4_K"}, "Hugging Face hub + GGUF transformer"),
        (None, None, "(base profile, source known once loaded)"),
    ],
)
def test_status_line_names_the_models_profile_and_source(origin, weights, says) -> None:
    status = {
        "model": "Tongyi-MAI/Z-Image",
        "model_source": origin,
        "transformer_weights": weights,
        "device": "cuda:0",
        "limits": {"profile": {"name": "base", "steps": 28, "guidance_scale": 4.0}},
    }
    assert says in status_text(status)


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
    form = _untouched_form(generate, prompt="a fox", width=64, height=64, steps=2)
    loras = ["a.safetensors", 0.5, *[None, 1.0] * (LORA_ROWS - 1)]
    assert len(generate.inputs) == 1 + len(form) + len(loras)  # the key, the form, the pickers
    marker = object()
    inputs, *_ = special_args(generate.fn, [None, *form, *loras], request=marker)
    assert inputs[0] is marker
    updates = list(generate.fn(*inputs))
    assert posted[-1]["loras"] == [{"name": "a.safetensors", "weight": 0.5}]
    assert updates[-1][0] == "Error: no"


# --- input images ------------------------------------------------------------------------------------


def _untouched_form(generate, **changes: object) -> list[object]:
    """Generate's form values as the page holds them before the user touches a field, with `changes`
    (keyed as `ui.GENERATE_KEYS`); Generate reads the form in that order after the key."""
    from zturbo.serving.ui import GENERATE_KEYS

    components = generate.inputs[1 : 1 + len(GENERATE_KEYS)]
    unknown = set(changes) - set(GENERATE_KEYS)
    assert not unknown, unknown
    return [changes.get(key, component.value) for key, component in zip(GENERATE_KEYS, components, strict=True)]


def _page(tmp_path: Path, status: dict | None = None):
    """The page's handlers on a mock API that records each job body and refuses it (so no events)."""
    from zturbo.request import ModelLimits
    from zturbo.serving.ui_app import _UiFiles, build

    posted: list[dict] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/status":
            return httpx.Response(200, json=status or {})
        posted.append(json.loads(request.content))
        return httpx.Response(400, json={"error": {"type": "invalid_request", "message": "seen", "field": None}})

    client = ApiClient("http://zturbo.test", transport=httpx.MockTransport(handler))
    demo = build(client, ModelLimits(spatial_unit=16, max_pixels=2048 * 2048), _UiFiles(tmp_path / "ui", client), None)
    return {getattr(f.fn, "__name__", ""): f for f in demo.fns.values()}, posted


def _generate(fns: dict, form: list[object]) -> list[tuple]:
    from types import SimpleNamespace

    from zturbo.serving.ui import LORA_ROWS

    return list(fns["generate"].fn(SimpleNamespace(session_hash="s"), None, *form, *[None, 1.0] * LORA_ROWS))


def _picture(path: Path, size: tuple[int, int] = (64, 48), orientation: int | None = None) -> Path:
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    Image.new("RGB", size, "teal").save(path, exif=exif)
    return path


def _layer(size: tuple[int, int], box: tuple[int, int, int, int], alpha: int = 255) -> Image.Image:
    """An editor brush layer: transparent, with `box` painted."""
    layer = Image.new("RGBA", size, (0, 0, 0, 0))
    layer.paste((255, 60, 172, alpha), box)
    return layer


def _decoded(text: str) -> bytes:
    import base64

    return base64.b64decode(text, validate=True)


def test_an_untouched_form_sends_the_text_to_image_body_as_before(tmp_path: Path) -> None:
    """No input image and every input setting at its default: not one input field in the body."""
    fns, posted = _page(tmp_path)
    updates = _generate(fns, _untouched_form(fns["generate"], prompt="a fox", width=64, height=64, steps=2))
    assert updates[-1][0] == "Error: seen"
    # the page's jobs ask for live previews, which steer the events and not the image
    assert posted[-1] == {**job_params(**{**FORM, "n": 1, "seed": -1, "width": 64, "height": 64}), "preview": True}


def _streaming_page(tmp_path: Path, job: dict, stream: str) -> dict:
    """The page's handlers on a mock API that accepts `job` and answers its events with `stream`."""
    from zturbo.request import ModelLimits
    from zturbo.serving.ui_app import _UiFiles, build

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/jobs":
            return httpx.Response(202, json=job)
        return httpx.Response(200, text=stream, headers={"content-type": "text/event-stream"})

    client = ApiClient("http://zturbo.test", transport=httpx.MockTransport(handler))
    demo = build(client, ModelLimits(spatial_unit=16, max_pixels=2048 * 2048), _UiFiles(tmp_path, client), None)
    return {getattr(f.fn, "__name__", ""): f for f in demo.fns.values()}


def test_generate_shows_the_live_preview_of_a_running_job_and_hides_it_when_done(tmp_path: Path) -> None:
    import base64

    import gradio as gr

    picture = io.BytesIO()
    Image.new("RGB", (32, 24), (200, 30, 40)).save(picture, format="JPEG")
    preview = base64.b64encode(picture.getvalue()).decode()
    job = {"id": "j1", "status": "queued", "params": {"seed": 5}, "images": []}
    stream = "".join(
        f"event: {name}\ndata: {json.dumps(data)}\n\n"
        for name, data in [
            ("progress", {"step": 1, "steps": 2}),
            ("progress", {"step": 1, "steps": 2, "preview": preview}),
            ("progress", {"step": 2, "steps": 2, "preview": "not base64!"}),
            ("done", {**job, "status": "succeeded"}),
        ]
    )

    fns = _streaming_page(tmp_path, job, stream)
    assert [c.elem_id for c in fns["generate"].outputs][-1] == "live-preview"
    form = _untouched_form(fns["generate"], prompt="a fox", width=64, height=64, steps=2)
    updates = _generate(fns, form)
    assert len({len(u) for u in updates}) == 1  # every update fills every output
    lives = [u[-1] for u in updates]
    shown = [u for u in lives if isinstance(u, dict) and u.get("value") is not None]
    assert len(shown) == 1 and shown[0]["visible"]  # the one decodable preview, as sent
    assert shown[0]["value"].size == (32, 24) and shown[0]["value"].getpixel((16, 12))[0] > 150
    assert updates[2][0] == "Generating: step 1/2" and updates[2][-1] is shown[0]
    assert updates[3][0] == "Generating: step 2/2" and updates[3][-1] == gr.skip()  # a broken preview: none
    assert lives[-1] == {"__type__": "update", "value": None, "visible": False} and updates[-1][0].startswith("Done")


def test_generate_sends_the_files_bytes_the_painted_mask_and_the_settings_given(tmp_path: Path) -> None:
    fns, posted = _page(tmp_path)
    image = _picture(tmp_path / "in.png")
    control = _picture(tmp_path / "edges.png", (64, 64))
    editor = {"background": Image.open(image), "layers": [_layer((64, 48), (8, 8, 24, 16))], "composite": None}
    form = _untouched_form(
        fns["generate"], prompt="a fox", width=64, height=64, steps=2, image=str(image), mask_editor=editor,
        strength_default=False, strength=0.8, paste_back=True, mask_blur=4.0, resize="fit",
        control_image=str(control), control_type="canny", control_scale=1.0,
    )  # fmt: skip
    _generate(fns, form)
    body = posted[-1]
    assert _decoded(body.pop("image")) == image.read_bytes()  # the file as uploaded: its sha256 is the user's
    assert _decoded(body.pop("control_image")) == control.read_bytes()
    mask = Image.open(io.BytesIO(_decoded(body.pop("mask"))))
    assert (mask.mode, mask.size, mask.getbbox()) == ("L", (64, 48), (8, 8, 24, 16))
    assert sorted(mask.getcolors()) == [(16 * 8, 255), (64 * 48 - 16 * 8, 0)]
    extra = {k: body[k] for k in set(body) - set(job_params(*FORM.values()))}
    assert extra == {"strength": 0.8, "paste_back": True, "mask_blur": 4, "resize": "fit", "control_type": "canny",
                     "control_scale": 1.0, "preview": True}  # fmt: skip
    assert isinstance(extra["mask_blur"], int)


def test_generate_names_a_form_value_it_cannot_send(tmp_path: Path) -> None:
    fns, posted = _page(tmp_path)
    image = _picture(tmp_path / "in.png")
    cases = [
        ({"outpaint_right": None}, "outpaint right is empty"),
        ({"outpaint_top": 8.5}, "outpaint top must be a whole number, got 8.5"),
        ({"image": str(tmp_path / "gone.png")}, "the image is no longer on the server"),
        # The editor lost its image: never a silent image-to-image instead of the inpaint.
        ({"mask_editor": {"background": None, "layers": [], "composite": None}}, "the mask editor holds no image"),
    ]
    for change, message in cases:
        form = _untouched_form(fns["generate"], **{"prompt": "a fox", "image": str(image), **change})
        first = _generate(fns, form)[0][0]
        assert first.startswith("Error: ") and message in first, (change, first)
    assert posted == []


@pytest.mark.parametrize(
    ("key", "typed", "message"),
    [
        ("seed", "7.5", "seed must be a whole number (-1 = random), got 7.5"),
        ("variation_seed", "6.5", "variation seed must be a whole number (-1 = random), got 6.5"),
        ("width", 64.4, "width must be a whole number, got 64.4"),
        ("height", 1000.4, "height must be a whole number, got 1000.4"),
        ("steps", 7.5, "steps must be a whole number, got 7.5"),
        ("n", 2.5, "number of images must be a whole number, got 2.5"),
        ("outpaint_left", 8.5, "outpaint left must be a whole number, got 8.5"),
        ("mask_blur", 2.5, "mask blur must be a whole number, got 2.5"),
        ("mask_padding", 6.5, "mask padding must be a whole number, got 6.5"),
    ],
)
def test_the_page_passes_a_typed_fraction_on_unrounded_and_names_it(
    tmp_path: Path, key: str, typed: object, message: str
) -> None:
    """Through the field's own Gradio preprocessing, as a browser's value arrives."""
    from zturbo.serving.ui import GENERATE_KEYS

    fns, posted = _page(tmp_path)
    component = fns["generate"].inputs[1 + GENERATE_KEYS.index(key)]
    form = _untouched_form(fns["generate"], prompt="a fox", **{key: component.preprocess(typed)})
    first = _generate(fns, form)[0][0]
    assert first == f"Error: {message}"
    assert posted == []


def test_the_page_sends_a_seed_above_2_to_the_53_exactly_and_shows_seeds_as_typed(tmp_path: Path) -> None:
    from zturbo.serving.ui import GENERATE_KEYS

    fns, posted = _page(tmp_path)
    seed, variation = (fns["generate"].inputs[1 + GENERATE_KEYS.index(k)] for k in ("seed", "variation_seed"))
    typed = "9007199254740993"  # 2**53 + 1: a browser's number field would send ...992
    form = _untouched_form(fns["generate"], prompt="a fox", seed=seed.preprocess(typed),
                           variation_seed=variation.preprocess(typed))  # fmt: skip
    _generate(fns, form)
    assert posted[-1]["seed"] == posted[-1]["variation_seed"] == 2**53 + 1
    # A seed set by a handler (Reuse last, a PNG's parameters) shows as a whole number, never 42.0.
    assert seed.postprocess(2**63 - 1) == str(2**63 - 1) and seed.postprocess(-1) == "-1"


def test_no_whole_number_field_of_the_page_rounds_what_was_typed(tmp_path: Path) -> None:
    import gradio as gr

    fns, _ = _page(tmp_path)
    numbers = [c for c in fns["generate"].inputs if isinstance(c, gr.Number | gr.Slider)]
    assert len(numbers) > 10
    assert [c.elem_id for c in numbers if c.precision is not None] == []


def test_the_mask_is_the_brush_layers_alpha_white_on_black_at_the_images_size() -> None:
    from zturbo.serving.ui import editor_mask

    def mask(layers: list[Image.Image], size: tuple[int, int] = (64, 48)) -> Image.Image | None:
        data = editor_mask({"background": Image.new("RGB", size), "layers": layers}, size)
        return None if data is None else Image.open(io.BytesIO(data))

    faint = _layer((64, 48), (0, 0, 4, 4), alpha=10)  # a stroke's soft edge is painted too
    two = mask([faint, _layer((64, 48), (40, 40, 64, 48))])
    assert two is not None and two.mode == "L" and two.size == (64, 48)
    assert two.getpixel((1, 1)) == 255 and two.getpixel((50, 45)) == 255 and two.getpixel((20, 20)) == 0
    assert set(two.get_flattened_data()) == {0, 255}
    scaled = mask([_layer((128, 96), (16, 16, 48, 32))])  # a canvas at twice the size maps onto the image
    assert scaled is not None and scaled.size == (64, 48) and scaled.getbbox() == (8, 8, 24, 16)
    assert mask([_layer((64, 48), (0, 0, 0, 0))]) is None  # nothing painted: image to image, no mask
    assert mask([]) is None
    assert editor_mask(None, (64, 48)) is None


def test_the_mask_has_the_size_the_server_reads_from_a_rotated_photo(tmp_path: Path) -> None:
    """EXIF orientation 6 (a phone held upright): the browser and the server both turn it, so the
    mask must be 48x64, not the file's stored 64x48."""
    from zturbo.serving.ui import input_params, oriented_size

    photo = _picture(tmp_path / "upright.png", (64, 48), orientation=6)
    assert oriented_size(photo) == (48, 64)
    editor = {"background": Image.new("RGB", (48, 64)), "layers": [_layer((48, 64), (0, 0, 8, 8))]}
    mask = Image.open(io.BytesIO(_decoded(input_params({"image": str(photo), "mask_editor": editor})["mask"])))
    assert mask.size == (48, 64)


def test_the_size_follows_the_input_image_and_its_outpaint_margins(tmp_path: Path) -> None:
    from zturbo.serving.ui import input_size

    image, control = _picture(tmp_path / "a.png", (64, 48)), _picture(tmp_path / "c.png", (32, 80))
    assert input_size(str(image), None, (0, 0, 0, 0), "", 16) == (
        (64, 48),
        "Width and height follow the input image: 64×48.",
    )
    size, line = input_size(str(image), str(control), (16, 0, 0, 32.0), "", 16)
    assert size == (80, 80) and line.endswith("input image with the outpaint margins: 80×80.")
    assert input_size(None, str(control), (16, 0, 0, 0), "", 16)[0] == (32, 80)  # margins extend the input image only
    assert input_size(str(image), None, (0, 0, 0, 0), "crop", 16) == (None, "")  # resized to the form's size
    assert input_size(None, None, (0, 0, 0, 0), "", 16) == (None, "")
    odd = _picture(tmp_path / "odd.png", (50, 48))
    assert input_size(str(odd), None, (0, 0, 0, 0), "", 16) == (
        None, "The input image is 50×48, not a multiple of 16: choose a resize mode, and a width and height."
    )  # fmt: skip


def test_a_new_input_image_resets_the_mask_editor_and_sets_the_size(tmp_path: Path) -> None:
    fns, _ = _page(tmp_path)
    image = _picture(tmp_path / "a.png", (64, 48))
    editor, width, height, preset, line = fns["new_image"].fn(str(image), None, 0, 16, 0, 0, "")
    value = {"background": str(image), "layers": [], "composite": str(image)}  # no layer: nothing painted yet
    assert editor == {"__type__": "update", "value": value, "visible": True}
    assert (width, height, preset) == (80, 48, CUSTOM) and "80×48" in line
    editor, *_ = fns["new_image"].fn(None, None, 0, 0, 0, 0, "")
    assert editor == {"__type__": "update", "value": None, "visible": False}
    # The editor's Clear canvas drops its image too: the clear puts the input image back, unpainted.
    blank = fns["blank_editor"]
    assert [event for _block, event in blank.targets] == ["clear"]
    assert [o.elem_id for o in blank.outputs] == ["mask-editor"] and blank.targets[0][0] == blank.outputs[0]._id
    assert blank.fn(str(image)) == {"__type__": "update", "value": value, "visible": True}


def test_a_large_image_is_painted_on_a_smaller_picture_and_its_mask_scaled_back_up(tmp_path: Path) -> None:
    """The editor uploads its canvas as the user paints: a photo is shown at most EDITOR_SIDE a side
    (turned as the browser turns it), while the job gets the file itself and a mask of its size."""
    from zturbo.serving.ui import EDITOR_SIDE, input_params

    fns, _ = _page(tmp_path)
    photo = _picture(tmp_path / "photo.png", (2 * EDITOR_SIDE, EDITOR_SIDE * 3 // 2), orientation=6)
    editor, width, height, *_ = fns["new_image"].fn(str(photo), None, 0, 0, 0, 0, "")
    picture = Path(editor["value"]["background"])
    assert picture.name == "editor-picture.png" and picture.is_relative_to(tmp_path / "ui")
    assert Image.open(picture).size == (EDITOR_SIDE * 3 // 4, EDITOR_SIDE)
    assert (width, height) == (EDITOR_SIDE * 3 // 2, 2 * EDITOR_SIDE)

    quarter = _layer((EDITOR_SIDE * 3 // 4, EDITOR_SIDE), (0, 0, EDITOR_SIDE * 3 // 8, EDITOR_SIDE // 2))
    body = input_params({"image": str(photo), "mask_editor": {"background": Image.open(picture), "layers": [quarter]}})
    mask = Image.open(io.BytesIO(_decoded(body["mask"])))
    assert mask.size == (width, height) and mask.getbbox() == (0, 0, width // 2, height // 2)
    assert _decoded(body["image"]) == photo.read_bytes()  # the file, never the editor's picture


def test_the_controlnet_section_shows_only_when_the_server_has_one(tmp_path: Path) -> None:
    from zturbo.serving.ui import controlnet_text

    info = {"name": "Z-Image-Turbo-Fun-Controlnet-Union-2.1", "control_in_dim": 33}
    fns, _ = _page(tmp_path, status={"model": "m", "controlnet": info})
    _line, _key_row, box, line = fns["status"].fn(None)
    assert box == {"__type__": "update", "visible": True} and line.startswith("ControlNet: Z-Image")
    assert "with an inpaint input" in line
    assert "without an inpaint input" in controlnet_text({**info, "control_in_dim": 16})
    fns, _ = _page(tmp_path, status={"model": "m", "controlnet": None})
    _line, _key_row, box, line = fns["status"].fn(None)
    assert box == {"__type__": "update", "visible": False} and line == ""


INPAINT_JOB = {
    "prompt": "a fox", "seed": 5, "steps": 8, "width": 80, "height": 48,
    "inputs": {
        "mode": "outpaint", "images": {"image": "ab" * 32, "control_image": "cd" * 32}, "mask_from_alpha": False,
        "strength": 1.0, "resize": None, "mask_blur": 4, "mask_padding": 8, "paste_back": True,
        "outpaint": [16, 0, 0, 0], "controlled": True, "control_type": "canny", "control_scale": 0.5,
        "control_start": 0.0, "control_end": 0.8,
    },
}  # fmt: skip


def test_a_job_made_from_images_shows_its_mode_and_settings() -> None:
    from zturbo.serving.ui import describe_params

    text = describe_params(INPAINT_JOB)
    for row in (
        "- **Mode:** outpaint with a ControlNet",
        "- **Strength:** 1",
        "- **Mask:** grown by 8 px, pasted back, seam blurred 4 px",
        "- **Outpaint:** left 16, right 0, top 0, bottom 0",
        "- **ControlNet:** canny, scale 0.5, steps 0–0.8",
        f"- **Input images:** image {'ab' * 5}, control\\_image {'cd' * 5}",
    ):
        assert row in text, (row, text)
    assert "Mode" not in describe_params({**INPAINT_JOB, "inputs": {}})  # text to image: as before
    controlled = {"mode": "txt2img", "controlled": True, "control_type": None, "control_scale": 0.75}
    assert "- **Mode:** text to image with a ControlNet" in describe_params({**INPAINT_JOB, "inputs": controlled})
    assert "- **ControlNet:** image as given, scale 0.75, steps 0–1" in describe_params({"inputs": controlled})


def test_form_values_fill_the_input_settings_and_name_the_images_the_form_lacks() -> None:
    values, notes = form_values(INPAINT_JOB, 16)
    assert values["strength_default"] is True  # 1 is outpaint's default: the checkbox, not a fixed strength
    assert (values["mask_blur"], values["mask_padding"], values["paste_back"]) == (4, 8, True)
    assert [values[f"outpaint_{s}"] for s in ("left", "right", "top", "bottom")] == [16, 0, 0, 0]
    assert (values["control_type"], values["control_scale"], values["control_end"]) == ("canny", 0.5, 0.8)
    assert "image" not in values and "control_image" not in values
    assert notes == [
        "it was made from input images (outpaint with a ControlNet); the form does not hold them: add them"
    ]

    img2img = {"prompt": "x", "inputs": {**INPAINT_JOB["inputs"], "mode": "img2img", "strength": 0.45,
                                         "outpaint": None, "controlled": False}}  # fmt: skip
    values, _ = form_values(img2img, 16)
    assert (values["strength_default"], values["strength"]) == (False, 0.45)

    values, notes = form_values({"prompt": "x", "inputs": {}}, 16)  # text to image clears what the form held
    assert (values["image"], values["mask_editor"], values["control_image"]) == (None, None, None)
    assert values["strength_default"] is True and values["resize"] == "" and notes == []
    assert "image" not in form_values({"prompt": "x"}, 16)[0]  # parameters that do not say leave them


def test_form_values_read_a1111_input_settings_and_name_what_is_out_of_range() -> None:
    values, notes = form_values({"prompt": "x", "strength": 0.75, "mask_blur": 300, "control_type": "canny"}, 16)
    assert (values["strength_default"], values["strength"], values["control_type"]) == (False, 0.75, "canny")
    assert "mask_blur" not in values
    assert "mask_blur 300 is outside 0 to 256, so it was not filled in" in notes


def test_the_api_takes_the_body_the_form_builds_as_the_job_the_user_painted(api: TestClient, tmp_path: Path) -> None:
    """The form's body through the real request validator: an inpaint job whose input hashes are the
    uploaded file's and the painted mask's; a control image on a server without a ControlNet is
    refused naming it."""
    import hashlib

    from zturbo.serving.ui import form_body

    image = _picture(tmp_path / "in.png", (64, 48))
    editor = {"background": Image.open(image), "layers": [_layer((64, 48), (0, 0, 32, 48))]}
    form = {**FORM, "guidance_scale": 0.0, "n": 1, "width": 64, "height": 48, "variation_seed": -1,
            "variation_strength": 0.0, "variety": 0.0, "image": str(image), "mask_editor": editor,
            "paste_back": True, "mask_blur": 2, "cfg_normalization": 0.0, "cfg_truncation": 1.0}  # fmt: skip
    body = form_body(form)
    r = api.post("/v1/jobs", json=body)
    assert r.status_code == 202, r.text
    inputs = r.json()["params"]["inputs"]
    assert (inputs["mode"], inputs["strength"], inputs["paste_back"], inputs["mask_blur"]) == ("inpaint", 1.0, True, 2)
    assert inputs["images"]["image"]["sha256"] == hashlib.sha256(image.read_bytes()).hexdigest()
    assert inputs["images"]["mask"]["sha256"] == hashlib.sha256(_decoded(body["mask"])).hexdigest()

    r = api.post("/v1/jobs", json=form_body({**form, "control_image": str(image)}))
    assert r.status_code == 400 and r.json()["error"]["field"] == "control_image", r.text


def test_generate_shows_the_warnings_of_a_finished_job(tmp_path: Path) -> None:

    job = {"id": "j1", "status": "queued", "params": {"seed": 5}, "images": []}
    said = "prompt 'red fox red fox …' is 909 tokens with the chat template; the model takes 512"
    done = {**job, "status": "succeeded", "warnings": [said]}
    stream = f"event: done\ndata: {json.dumps(done)}\n\n"

    fns = _streaming_page(tmp_path, job, stream)
    updates = _generate(fns, _untouched_form(fns["generate"], prompt="a fox", width=64, height=64, steps=2))
    assert updates[-1][0] == f"Done: 0 image(s), seed 5\n\nWarning: {said}"
