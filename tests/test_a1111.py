"""The A1111 API (/sdapi/v1) through the real `webuiapi` client against one live `zturbo serve
--model tiny-random --client-defaults turbo`; the refusals, the `honour` policy, the options'
precedence, png-info's readers and interrupt's races run in process, with no worker."""

from __future__ import annotations

import base64
import io
import json
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import webuiapi
from fastapi import Request
from fastapi.testclient import TestClient
from PIL import Image

from serving import KEY, LIMITS, Server, in_process_app
from zturbo.request import DEFAULT_GUIDANCE, DEFAULT_STEPS, GenerateRequest
from zturbo.serving import jobs
from zturbo.serving.a1111 import MAPPED_HEADER, Session, Txt2ImgBody, caller_of, interrupt, translate

SMALL = {"width": 64, "height": 64}


@pytest.fixture(scope="module")
def server(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    # One live server: the `honour` policy differs only in translation, which runs in process below.
    started = Server(tiny_dir, tmp_path_factory.mktemp("a1111") / "data", "--no-ui", "--client-defaults", "turbo",
                     step_sleep=0.05)  # fmt: skip
    started.model_name = Path(tiny_dir).name  # type: ignore[attr-defined]
    try:
        started.wait_ready()
        yield started
    finally:
        started.stop()


def client(server: Server) -> webuiapi.WebUIApi:
    """The client as A1111 users configure it: host, port and --api-auth credentials (the key as password)."""
    return webuiapi.WebUIApi(host="127.0.0.1", port=server.port, username="any", password=KEY)


def noise(width: int = 64, height: int = 64, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


def test_turbo_maps_the_sd_defaults_and_says_so(server: Server) -> None:
    # webuiapi's defaults: 20 steps, CFG 7, "Euler a", as most A1111 clients send.
    api = client(server)
    result = api.txt2img(prompt="a red fox", seed=7, **SMALL)
    [image] = result.images
    assert image.size == (64, 64)
    info = result.info
    assert (info["steps"], info["cfg_scale"], info["all_seeds"]) == (DEFAULT_STEPS, DEFAULT_GUIDANCE, [7])
    assert info["zturbo"]["mapped"] == {
        "steps": {"sent": 20, "ran": DEFAULT_STEPS},
        "cfg_scale": {"sent": 7.0, "ran": DEFAULT_GUIDANCE},
        "sampler_name": {"sent": "Euler a", "ran": "Euler"},
    }
    assert (result.parameters["steps"], result.parameters["cfg_scale"], result.parameters["seed"]) == (8, 0.0, 7)
    assert f"Steps: {DEFAULT_STEPS}," in image.info["parameters"]  # the file says what ran, too
    # The mapped request is exactly Turbo's own: the same pixels as asking for 8 steps and CFG 0,
    # values outside SD's ranges, which run as sent.
    plain = api.txt2img(prompt="a red fox", seed=7, steps=8, cfg_scale=0, sampler_name="Euler", **SMALL)
    assert plain.info["zturbo"]["mapped"] == {}
    assert np.array_equal(np.asarray(plain.images[0]), np.asarray(image))


def test_the_header_lists_the_mapping(server: Server) -> None:
    body = {"prompt": "a red fox", "seed": 3, "steps": 20, "cfg_scale": 7, "sampler_name": "Euler a", **SMALL}
    r = httpx.post(f"{server.url}/sdapi/v1/txt2img", json=body, auth=("u", KEY), timeout=60)
    assert r.status_code == 200, r.text
    assert r.headers[MAPPED_HEADER] == "steps,cfg_scale,sampler_name"
    body |= {"steps": 8, "cfg_scale": 0, "sampler_name": "Euler", "send_images": False}
    r = httpx.post(f"{server.url}/sdapi/v1/txt2img", json=body, auth=("u", KEY), timeout=60)
    assert r.status_code == 200 and MAPPED_HEADER not in r.headers  # absent when nothing was mapped
    assert r.json()["images"] == [] and json.loads(r.json()["info"])["seed"] == 3  # send_images: false


def test_img2img_and_inpaint(server: Server) -> None:
    api = client(server)
    source = noise(80, 48, seed=1)
    result = api.img2img(images=[source], prompt="a red fox", seed=5, denoising_strength=0.5, resize_mode=0, **SMALL)
    assert result.images[0].size == (64, 64)  # "just resize" stretched the 80x48 image to the request
    assert result.info["denoising_strength"] == 0.5
    init = noise(seed=2)
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (32, 0, 64, 64))  # white (the right half) repaints
    result = api.img2img(images=[init], mask_image=mask, prompt="a red fox", seed=5, mask_blur=4, **SMALL)
    out = np.asarray(result.images[0].convert("RGB")).astype(int)
    kept = np.asarray(init).astype(int)
    # A1111 pastes the original back through the blurred mask: far from the seam the kept half is the input.
    assert np.array_equal(out[:, :24], kept[:, :24])
    assert np.abs(out[:, 40:] - kept[:, 40:]).mean() > 10
    assert result.info["zturbo"]["mapped"]["inpainting_fill"] == {"sent": 0, "ran": 1}
    assert "inpaint_full_res" in result.info["zturbo"]["ignored"]


def test_options_models_and_samplers(server: Server) -> None:
    api = client(server)
    options = api.get_options()
    [model] = api.get_sd_models()
    assert options["sd_model_checkpoint"] == model["title"] == server.model_name
    assert options["zturbo_client_defaults"] == "turbo"
    assert [s["name"] for s in api.get_samplers()] == ["Euler"]
    api.util_set_model(model["title"])  # a "switch" to the served model is a no-op, and allowed
    r = httpx.post(f"{server.url}/sdapi/v1/options", json={"sd_model_checkpoint": "sdxl.safetensors"},
                   auth=("u", KEY))  # fmt: skip
    assert r.status_code == 400 and r.json()["error"]["field"] == "sd_model_checkpoint"
    assert "'sdxl.safetensors' is not served here" in r.json()["error"]["message"]
    r = httpx.post(f"{server.url}/sdapi/v1/options", json={"live_previews_enable": False, "sd_vae": "other.pt"},
                   auth=("u", KEY))  # fmt: skip
    assert r.status_code == 400 and r.json()["error"]["field"] == "sd_vae"
    assert api.get_options()["live_previews_enable"] is True  # nothing of a refused request applies
    api.set_options({"live_previews_enable": False})
    assert api.get_options()["live_previews_enable"] is False
    api.set_options({"live_previews_enable": True})


def test_progress_and_interrupt(server: Server) -> None:
    api = client(server)
    answer: dict[str, object] = {}
    # 100 steps are outside SD's usual range, so they run as sent: 5 s at the test's step sleep,
    # time enough to read progress and interrupt even on a loaded machine.
    worker = threading.Thread(target=lambda: answer.update(r=api.txt2img(prompt="a fox", steps=100, **SMALL)))
    worker.start()
    deadline = time.monotonic() + 30
    while (progress := api.get_progress())["state"]["sampling_step"] < 2:
        assert time.monotonic() < deadline, progress
        time.sleep(0.05)
    assert progress["state"]["job_count"] == 1 and progress["state"]["sampling_steps"] == 100
    assert 0 < progress["progress"] < 1 and progress["eta_relative"] > 0
    # A1111 jobs ask for previews: by step 2 the worker has sent one.
    preview = Image.open(io.BytesIO(base64.b64decode(progress["current_image"])))
    assert preview.format == "JPEG" and max(preview.size) <= 256
    url = f"{server.url}/sdapi/v1/progress"
    skipped = httpx.get(url, params={"skip_current_image": "true"}, auth=("any", KEY)).json()  # webuiapi's user
    assert skipped["state"]["job_count"] == 1 and skipped["current_image"] is None
    api.interrupt()
    worker.join(30)
    result = answer["r"]
    assert result.images == [] and result.info["zturbo"]["status"] == "cancelled"  # type: ignore[attr-defined]
    assert api.get_progress()["state"]["job_count"] == 0


def test_png_info_reads_the_parameters_back(server: Server) -> None:
    api = client(server)
    image = api.txt2img(prompt="a red fox", seed=11, **SMALL).image
    info = api.png_info(image)
    assert info.info.startswith("a red fox\n") and "Seed: 11," in info.info
    assert info.parameters["Seed"] == 11 and info.parameters["Steps"] == DEFAULT_STEPS
    assert (info.parameters["Size-1"], info.parameters["Size-2"]) == (64, 64)
    assert json.loads(info.json["items"]["zturbo"])["seed"] == 11  # the full metadata comes along
    plain = api.png_info(noise())  # no parameters: empty, as A1111 answers
    assert plain.info == "" and plain.parameters == {}
    # A WebP, sent as the server wrote it (webuiapi would re-encode it as a PNG), reads back too.
    body = {"prompt": "a red fox", "seed": 12, "override_settings": {"samples_format": "webp"}, **SMALL}
    r = httpx.post(f"{server.url}/sdapi/v1/txt2img", json=body, auth=("u", KEY), timeout=60)
    [webp] = r.json()["images"]
    assert Image.open(io.BytesIO(base64.b64decode(webp))).format == "WEBP"
    r = httpx.post(f"{server.url}/sdapi/v1/png-info", json={"image": webp}, auth=("u", KEY), timeout=60)
    assert r.status_code == 200 and "Seed: 12," in r.json()["info"], r.text


def test_the_a1111_routes_need_the_key(server: Server) -> None:
    url = f"{server.url}/sdapi/v1/options"
    assert httpx.get(url).status_code == 401
    assert httpx.get(url, auth=("u", "wrong")).status_code == 401
    assert httpx.get(url, headers={"Authorization": f"Bearer {KEY}"}).status_code == 200


# --- in process: refusals before any work, and the policy's rules ------------------------------


@pytest.fixture(scope="module")
def app_client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    # No worker: a generation waits out the short sync timeout (504) and its job stays queued.
    with TestClient(in_process_app(tmp_path_factory.mktemp("a1111-app"), sync_timeout=0.1)) as c:
        yield c


@pytest.mark.parametrize(
    ("body", "field", "says"),
    [
        ({"enable_hr": True}, "enable_hr", "the hires fix is not available"),
        ({"restore_faces": True}, "restore_faces", "face restoration"),
        ({"styles": ["cinematic"]}, "styles", "prompt styles"),
        ({"alwayson_scripts": {"ControlNet": {"args": []}}}, "alwayson_scripts", "extensions"),
        ({"sampler_name": "Bogus"}, "sampler_name", "'Bogus' is not an A1111 sampler"),
        ({"scheduler": "wobbly"}, "scheduler", "'wobbly' is not an A1111 scheduler"),
        ({"batch_size": 40, "n_iter": 2}, "batch_size", "out of range"),
        ({"cfg_scale": 31}, "cfg_scale", "cfg_scale 31"),
        ({"width": 100}, "width", "not a multiple of 16"),
        ({"override_settings": {"sd_model_checkpoint": "sd15.ckpt"}}, "override_settings.sd_model_checkpoint",
         "is not served here"),
        ({"override_settings": {"CLIP_stop_at_last_layers": 2}}, "override_settings.CLIP_stop_at_last_layers",
         "cannot be changed"),
        ({"override_settings": {"live_previews_enable": "yes"}}, "override_settings.live_previews_enable",
         "is not true or false"),
        ({"override_settings": {"samples_format": "gif"}}, "override_settings.samples_format", "is not one of"),
        ({"hires": True}, "hires", "not a known field"),
    ],
)  # fmt: skip
def test_txt2img_refuses_by_name(app_client: TestClient, body: dict, field: str, says: str) -> None:
    r = app_client.post("/sdapi/v1/txt2img", json={"prompt": "a fox", **SMALL, **body})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["field"] == field and says in error["message"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"init_images": []}, "init_images"),
        ({"init_images": ["x", "y"]}, "init_images"),
        ({"init_images": ["not base64!"]}, "init_images"),
        ({"resize_mode": 7}, "resize_mode"),
        ({"denoising_strength": 1.5}, "denoising_strength"),
        ({"mask_blur_x": 2, "mask_blur_y": 8, "mask": "MASK"}, "mask_blur_y"),
    ],
)
def test_img2img_refuses_by_name(app_client: TestClient, body: dict, field: str) -> None:
    png = io.BytesIO()
    noise().save(png, format="PNG")
    image = base64.b64encode(png.getvalue()).decode()
    full = {"prompt": "a fox", **SMALL, "init_images": [image], **body}
    full["mask"] = image if full.get("mask") == "MASK" else full.get("mask")
    r = app_client.post("/sdapi/v1/img2img", json=full)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["field"] == field


def _fixed(where: str, name: str, value: object) -> None:
    raise AssertionError(f"no override expected, got {where}")


@pytest.mark.parametrize(
    ("steps", "cfg", "turbo_runs"),
    [(20, 7.0, (8, 0.0)), (50, 1.0, (8, 0.0)), (8, 0.0, (8, 0.0)), (4, 3.0, (4, 0.0)), (60, 15.0, (60, 15.0))],
)
def test_the_policy_maps_only_sd_values(steps: int, cfg: float, turbo_runs: tuple[int, float]) -> None:
    body = Txt2ImgBody(prompt="a fox", steps=steps, cfg_scale=cfg, sampler_name="Euler")
    for policy, runs in (("turbo", turbo_runs), ("honour", (steps, cfg))):
        t = translate(body, policy, 1 << 20, formats=False, fixed=_fixed)
        assert (t.values["steps"], t.values["guidance_scale"]) == runs
        assert set(t.mapped) == {n for n, sent, ran in (("steps", steps, runs[0]), ("cfg_scale", cfg, runs[1]))
                                 if sent != ran}  # fmt: skip


def test_honour_runs_what_was_sent_but_the_sampler(tmp_path: Path) -> None:
    body = Txt2ImgBody(prompt="a fox", steps=20, cfg_scale=7, sampler_name="Euler a")
    t = translate(body, "honour", 1 << 20, formats=False, fixed=_fixed)
    assert (t.values["steps"], t.values["guidance_scale"]) == (20, 7.0)
    assert list(t.mapped) == ["sampler_name"]  # one sampler is all zturbo has, under either policy
    with TestClient(in_process_app(tmp_path, client_defaults="honour")) as c:
        assert c.get("/sdapi/v1/options").json()["zturbo_client_defaults"] == "honour"


# --- in process: the options and a request's override_settings ---------------------------------


def _queued(app_client: TestClient, body: dict) -> jobs.Job:
    """The job a txt2img request queued on the worker-less app, found by the id its 504 names."""
    r = app_client.post("/sdapi/v1/txt2img", json={"prompt": "a fox", **SMALL, **body})
    assert r.status_code == 504, r.text
    match = re.search(r"job (\S+) did not finish", r.json()["error"]["message"])
    assert match, r.text
    return app_client.app.state.service.store.get(match.group(1))  # type: ignore[attr-defined]


@pytest.fixture
def jpg_options(app_client: TestClient) -> Iterator[None]:
    options = {"samples_format": "jpg", "jpeg_quality": 70, "live_previews_enable": False}
    assert app_client.post("/sdapi/v1/options", json=options).status_code == 200
    yield
    defaults = {"samples_format": "png", "jpeg_quality": 80, "live_previews_enable": True}
    assert app_client.post("/sdapi/v1/options", json=defaults).status_code == 200


@pytest.mark.parametrize(
    ("override", "runs"),
    [
        ({}, ("jpeg", 70, False)),
        ({"samples_format": "png"}, ("png", None, False)),
        ({"jpeg_quality": 50}, ("jpeg", 50, False)),
        ({"samples_format": "webp", "jpeg_quality": 95}, ("webp", 95, False)),
        ({"samples_format": "webp"}, ("webp", 70, False)),
        ({"live_previews_enable": True}, ("jpeg", 70, True)),
    ],
)
def test_override_settings_win_over_the_options(
    app_client: TestClient, jpg_options: None, override: dict, runs: tuple
) -> None:
    job = _queued(app_client, {"override_settings": override})
    assert (job.params["output_format"], job.params["output_compression"], job.preview) == runs


def test_a_quality_for_a_png_is_reported_as_ignored() -> None:
    from zturbo.serving.a1111 import Options, output_settings

    t = translate(Txt2ImgBody(override_settings={"jpeg_quality": 50}), "turbo", 1 << 20, formats=True, fixed=_fixed)
    output_settings(t, Options(), formats=True)
    assert t.values["output_format"] == "png" and "output_compression" not in t.values
    assert "override_settings.jpeg_quality" in t.ignored


# --- in process: png-info -----------------------------------------------------------------------

A1111_TEXT = "a castle\nNegative prompt: blurry\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 42, Size: 64x64"


def _encoded(image: Image.Image, fmt: str, **options: object) -> bytes:
    data = io.BytesIO()
    image.save(data, format=fmt, **options)
    return data.getvalue()


def _png_info(app_client: TestClient, data: bytes) -> dict:
    r = app_client.post("/sdapi/v1/png-info", json={"image": base64.b64encode(data).decode()})
    assert r.status_code == 200, r.text
    return r.json()


def _zturbo_meta() -> dict:
    from zturbo.imageio import build_metadata
    from zturbo.result import ModelInfo

    req = GenerateRequest.create("a red fox", limits=LIMITS, seed=13, **SMALL)
    return build_metadata(req, "a red fox", "", 13, ModelInfo("tiny", None, "f" * 64), {}, None)


@pytest.mark.parametrize("fmt", ["webp", "jpeg"])
def test_png_info_reads_webp_and_jpeg(app_client: TestClient, fmt: str) -> None:
    from zturbo.imageio import a1111_parameters, encode_image
    from zturbo.result import GeneratedImage

    meta = _zturbo_meta()
    data = io.BytesIO()
    encode_image(GeneratedImage(noise(), 13, "a red fox", "", meta), data, output_format=fmt, compression=None)
    answer = _png_info(app_client, data.getvalue())  # zturbo's: EXIF UserComment and XMP
    assert answer["info"] == a1111_parameters(meta) and answer["parameters"]["Seed"] == 13
    assert json.loads(answer["items"]["zturbo"]) == meta
    # A1111's: the UserComment alone, as piexif's UserComment.dump(text, encoding="unicode") writes it.
    exif = Image.Exif()
    exif[0x8769] = {0x9286: b"UNICODE\0" + A1111_TEXT.encode("utf-16-be")}
    answer = _png_info(app_client, _encoded(noise(), fmt.upper(), exif=exif.tobytes()))
    assert answer["info"] == A1111_TEXT
    assert (answer["parameters"]["Seed"], answer["parameters"]["Negative prompt"]) == (42, "blurry")


def _crafted(meta: dict) -> str:
    return json.dumps({**meta, "prompt": 1})  # every key, one of the wrong type


@pytest.mark.parametrize("text", ["not json {", "{}", '{"steps": 8}', "[1, 2]", '"a fox"', "crafted"])
def test_png_info_answers_empty_for_metadata_it_cannot_read(app_client: TestClient, text: str) -> None:
    from PIL.PngImagePlugin import PngInfo

    text = _crafted(_zturbo_meta()) if text == "crafted" else text
    chunks = PngInfo()
    chunks.add_text("zturbo", text)
    answer = _png_info(app_client, _encoded(noise(), "PNG", pnginfo=chunks))
    assert answer == {"info": "", "items": {"zturbo": text}, "parameters": {}}  # as A1111 answers, not a 500


# --- in process: interrupt ----------------------------------------------------------------------


def _asking(host: str, authorization: str | None) -> Request:
    headers = [(b"authorization", authorization.encode())] if authorization else []
    return Request({"type": "http", "client": (host, 5000), "headers": headers})


def test_callers_behind_one_proxy_are_told_apart_by_their_credentials() -> None:
    basic = {user: "Basic " + base64.b64encode(f"{user}:{KEY}".encode()).decode() for user in ("ann", "bob")}
    ann, bob = caller_of(_asking("10.0.0.1", basic["ann"])), caller_of(_asking("10.0.0.1", basic["bob"]))
    assert ann != bob  # one proxy, one key, two A1111 user names: their progress and interrupts are apart
    assert ann == caller_of(_asking("10.0.0.1", basic["ann"]))  # the same client again
    assert ann != caller_of(_asking("10.0.0.2", basic["ann"]))
    assert KEY not in ann and "ann" not in ann  # the identity holds a hash, never the credentials
    # Only the user name counts: a wrong key never gets this far, and one Bearer key is one caller.
    other_key = "Basic " + base64.b64encode(b"ann:another").decode()
    assert caller_of(_asking("10.0.0.1", other_key)) == ann
    anonymous = caller_of(_asking("10.0.0.1", None))
    assert caller_of(_asking("10.0.0.1", f"Bearer {KEY}")) == anonymous


def test_interrupt_skips_a_job_that_finished_meanwhile_and_cancels_the_rest(app_client: TestClient) -> None:
    service = app_client.app.state.service  # type: ignore[attr-defined]
    session, caller = Session(policy="turbo"), "a1111:racer"
    waiting = [jobs.new_id() for _ in range(2)]
    for n, job_id in enumerate(waiting):
        service.submit(GenerateRequest.create("a fox", limits=LIMITS, **SMALL), job_id, caller)
        session.waiting[job_id] = (caller, float(n))
    service.store.cancel(waiting[0])  # finished, as when a job ends between interrupt listing it and cancelling it
    assert interrupt(service, session, caller) == [waiting[1]]
    assert service.store.get(waiting[1]).status == jobs.CANCELLED
