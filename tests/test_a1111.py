"""The A1111 API (/sdapi/v1) through the real `webuiapi` client against one live `zturbo serve
--model tiny-random --client-defaults turbo`; the refusals, the `honour` policy, the options'
precedence, png-info's readers and interrupt's races run in process, with no worker."""

from __future__ import annotations

import base64
import hashlib
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

from loras import write_lora
from serving import KEY, LIMITS, Server, in_process_app
from zturbo.adapters import library as lora_library
from zturbo.adapters.library import LoraLibrary
from zturbo.adapters.recorded import LoraFinder
from zturbo.errors import LoraError
from zturbo.request import DEFAULT_GUIDANCE, DEFAULT_STEPS, GenerateRequest
from zturbo.serving import jobs
from zturbo.serving.a1111 import (
    MAPPED_HEADER,
    Img2ImgBody,
    Session,
    Translation,
    Txt2ImgBody,
    caller_of,
    interrupt,
    locate_loras,
    translate,
)

SMALL = {"width": 64, "height": 64}


@pytest.fixture(scope="module")
def lora_dir(engine, tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("a1111-loras")
    write_lora(directory / "style.safetensors", "peft", engine.components.transformer, seed=1)
    return directory


@pytest.fixture(scope="module")
def server(tiny_dir: Path, lora_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    # One live server: the `honour` policy differs only in translation, which runs in process below.
    started = Server(tiny_dir, tmp_path_factory.mktemp("a1111") / "data", "--no-ui", "--client-defaults", "turbo",
                     "--lora-dir", str(lora_dir), step_sleep=0.05)  # fmt: skip
    started.model_name = Path(tiny_dir).name  # type: ignore[attr-defined]
    started.lora_dir = lora_dir  # type: ignore[attr-defined]
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


def test_infotext_fills_what_the_body_leaves_out(server: Server) -> None:
    # A1111's rule: the pasted parameters fill the unset fields, the body's own win; the answer says which.
    infotext = "a red fox\nSteps: 8, Sampler: Euler, CFG scale: 0, Seed: 21, Size: 64x64, Clip skip: 2"
    body = {"prompt": "a grey wolf", "seed": 22, "infotext": infotext, "send_images": False}
    r = httpx.post(f"{server.url}/sdapi/v1/txt2img", json=body, auth=("u", KEY), timeout=60)
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])
    assert (info["prompt"], info["all_seeds"], info["width"], info["steps"]) == ("a grey wolf", [22], 64, 8)
    assert info["zturbo"]["ignored"] == {
        "infotext.Prompt": "the body's prompt 'a grey wolf' is used, as in A1111",
        "infotext.Seed": "the body's seed 22 is used, as in A1111",
        "infotext.Clip skip": "not a setting this server has",
    }
    assert (r.json()["parameters"]["width"], r.json()["parameters"]["steps"]) == (64, 8)  # as it ran


def _rgb(data: bytes) -> bytes:
    with Image.open(io.BytesIO(data)) as im:
        return im.convert("RGB").tobytes()


def test_a_lora_tag_runs_as_the_native_apis_lora(server: Server) -> None:
    body = {"prompt": "a red fox <lora:style:0.8>", "seed": 7, "steps": 8, "cfg_scale": 0, "sampler_name": "Euler",
            **SMALL}  # fmt: skip
    r = httpx.post(f"{server.url}/sdapi/v1/txt2img", json=body, auth=("u", KEY), timeout=60)
    assert r.status_code == 200, r.text
    info, [image] = json.loads(r.json()["info"]), r.json()["images"]
    ran = [{"name": "style", "weight": 0.8}]
    assert info["zturbo"]["mapped"] == {"loras": {"sent": ["<lora:style:0.8>"], "ran": ran}}
    assert r.headers[MAPPED_HEADER] == "loras" and info["zturbo"]["ignored"] == {}
    assert info["prompt"] == "a red fox" and r.json()["parameters"]["prompt"] == body["prompt"]  # ran; as sent
    job = server.client.get(f"/v1/jobs/{info['zturbo']['job_id']}").json()
    assert (job["params"]["prompt"], job["params"]["loras"]) == ("a red fox", ran)  # the tag is no text
    native = server.wait_job(server.submit(prompt="a red fox", seed=7, steps=8, loras=ran)["id"])
    served = base64.b64decode(image)
    assert _rgb(served) == _rgb(server.client.get(f"/v1/images/{native['images'][0]['id']}").content)
    # The image's own text, pasted as the infotext, runs the LoRA again (found by its recorded hash).
    with Image.open(io.BytesIO(served)) as im:
        text = im.info["parameters"]
    digest = hashlib.sha256((server.lora_dir / "style.safetensors").read_bytes()).hexdigest()  # type: ignore[attr-defined]
    assert text.startswith("a red fox <lora:style:0.8>\n") and f'Lora hashes: "style: {digest[:10]}"' in text
    r = httpx.post(f"{server.url}/sdapi/v1/txt2img", json={"infotext": text}, auth=("u", KEY), timeout=60)
    assert r.status_code == 200, r.text
    assert json.loads(r.json()["info"])["zturbo"]["mapped"]["loras"] == {"sent": ["<lora:style:0.8>"], "ran": ran}
    assert _rgb(base64.b64decode(r.json()["images"][0])) == _rgb(served)


def test_a_genuine_a1111_infotext_runs_with_no_false_warning(server: Server) -> None:
    # A1111 writes 12 hex digits of its own LoRA hash: the named file runs, reported unchecked, never "will differ".
    infotext = ("a red fox <lora:style:0.8>\nSteps: 8, Sampler: Euler a, Schedule type: Automatic, CFG scale: 1, "
                'Seed: 7, Size: 64x64, Model hash: 6ce0161689, Model: sd15, Lora hashes: "style: 1a2b3c4d5e6f", '
                "Version: v1.10.1")  # fmt: skip
    r = httpx.post(f"{server.url}/sdapi/v1/txt2img", json={"infotext": infotext, "send_images": False},
                   auth=("u", KEY), timeout=60)  # fmt: skip
    assert r.status_code == 200, r.text
    zturbo = json.loads(r.json()["info"])["zturbo"]
    assert zturbo["mapped"]["loras"]["ran"] == [{"name": "style", "weight": 0.8}]
    note = zturbo["ignored"]["infotext.Lora hashes"]
    assert "will differ" not in note and "so style is used unchecked" in note


def test_a_truncated_prompt_is_reported_in_the_info(server: Server) -> None:
    # The text encoder reads 512 tokens; the rest is dropped, and A1111 clients are told so, as /v1's are.
    body = {"prompt": "red fox " * 450, "seed": 3, "steps": 1, "send_images": False, **SMALL}  # ~900 tokens
    r = httpx.post(f"{server.url}/sdapi/v1/txt2img", json=body, auth=("u", KEY), timeout=60)
    assert r.status_code == 200, r.text
    [warning] = json.loads(r.json()["info"])["zturbo"]["warnings"]
    assert warning.startswith("prompt 'red fox") and "the model takes 512" in warning and "dropped" in warning
    r = httpx.post(f"{server.url}/sdapi/v1/txt2img", json=body | {"prompt": "a red fox"}, auth=("u", KEY), timeout=60)
    assert json.loads(r.json()["info"])["zturbo"]["warnings"] == []


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
        ({"sampler_index": "bogus"}, "sampler_index", "'bogus' is not an A1111 sampler"),  # read alone: checked
        ({"sampler_index": "Euler", "sampler_name": "bogus"}, "sampler_name", "'bogus' is not an A1111 sampler"),
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
        # A1111's lax forms that lose something, or mean nothing, are refused by name (the lossless ones pass:
        # test_a1111s_lossless_forms_run_and_are_reported).
        ({"width": "sixty-four"}, "width", 'width "sixty-four": Input should be a valid integer'),
        ({"steps": True}, "steps", "steps true: Input should be a valid integer"),
        ({"steps": "2.5"}, "steps", "Input should be a valid integer"),
        ({"steps": 7.5}, "steps", "steps 7.5: Input should be a valid integer"),
        ({"steps": "\u0668"}, "steps", "Input should be a valid integer"),  # another script's digit
        ({"seed": "5e3"}, "seed", 'seed "5e3": Input should be a valid integer'),
        ({"cfg_scale": True}, "cfg_scale", "cfg_scale true: Input should be a valid number"),
        ({"cfg_scale": "7,5"}, "cfg_scale", "Input should be a valid number"),
        ({"subseed_strength": "half"}, "subseed_strength", "Input should be a valid number"),
        ({"send_images": 2}, "send_images", "Input should be a valid boolean"),
        ({"restore_faces": "1"}, "restore_faces", "Input should be a valid boolean"),
        ({"tiling": 1.0}, "tiling", "Input should be a valid boolean"),
        ({"infotext": "a cat"}, "infotext", "no 'Steps:' line"),
        ({"infotext": "a cat\nSteps: 500, Seed: 5"}, "steps",
         "steps 500 is out of range; allowed 1..100 (the value comes from infotext)"),
        ({"infotext": "a cat\nSteps: 8, Sampler: Bogus"}, "sampler_name", "(the value comes from infotext)"),
        ({"infotext": "a cat\nSteps: 8, Batch size: two"}, "infotext", "Batch size 'two' is not a whole number"),
        # LoRA tags: what A1111 could not read, and what zturbo cannot apply, before any work.
        ({"prompt": "a fox <lora:x:heavy>"}, "prompt", "prompt tag <lora:x:heavy>: the weight 'heavy' is not a number"),
        ({"prompt": "a fox <lora:x:te=0.5:unet=lots>"}, "prompt", "the weight 'lots' is not a number"),
        ({"prompt": "a fox <lora::0.5>"}, "prompt", "prompt tag <lora::0.5> has no LoRA name"),
        ({"prompt": "a fox <lora:x:1:1:8>"}, "prompt", "dyn (A1111's reduced LoRA rank) is not available"),
        ({"prompt": "a fox <lora:x:dyn=8>"}, "prompt", "dyn (A1111's reduced LoRA rank) is not available"),
        ({"prompt": "a fox <lora:x:1:lbw=OUTD>"}, "prompt", "lbw= is not an argument of A1111's LoRA tags"),
        ({"prompt": "a fox <hypernet:anime:1>"}, "prompt", "<hypernet:anime:1>: hypernetworks are not available"),
        ({"prompt": "a fox <lora:x:20>"}, "prompt",
         "prompt tag <lora:x:20>: LoRA weight 20.0 is out of range; allowed -10..10"),
        ({"prompt": "a fox <lora:x:1> <lora:x:0.5>"}, "prompt", "prompt: LoRA 'x' is given twice"),
        ({"prompt": "a fox <lora:\ud800>"}, "prompt",
         "prompt contains an unpaired surrogate (\\ud800 at character 13)"),
        ({"prompt": "a fox" + " <lora:nope>" * 9}, "prompt",
         "prompt has 9 <lora:...> tags; allowed at most 8 (the request's LoRA limit)"),
        ({"negative_prompt": "x" * 4001}, "negative_prompt",
         "negative_prompt is 4001 characters long; allowed at most"),
    ],
)  # fmt: skip
def test_txt2img_refuses_by_name(app_client: TestClient, body: dict, field: str, says: str) -> None:
    # ASCII JSON, as clients send it: a lone surrogate travels as its `\ud800` escape.
    content = json.dumps({"prompt": "a fox", **SMALL, **body})
    r = app_client.post("/sdapi/v1/txt2img", content=content, headers={"Content-Type": "application/json"})
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


def test_a1111_clients_types_still_pass(app_client: TestClient) -> None:
    # What A1111 clients send: whole numbers for float fields (cfg_scale 7), fractions, -1 seeds.
    body = {"cfg_scale": 7, "denoising_strength": 0.75, "seed": -1, "subseed_strength": 0, "s_noise": 1, "eta": 1}
    job = _queued(app_client, body)
    assert job.params["guidance_scale"] == 0.0  # the policy's mapping of CFG 7, not a type error


def test_a1111s_lossless_forms_run_and_are_reported(app_client: TestClient) -> None:
    # What A1111 (pydantic v1) reads without loss: a numeric string, an integral float, 0/1 for a flag.
    sent = {"steps": "20", "cfg_scale": "7.5", "width": 64.0, "seed": "5", "subseed": -1.0, "restore_faces": 0,
            "tiling": 0, "send_images": 1, "batch_size": "2"}  # fmt: skip
    t = translate(Txt2ImgBody.model_validate({"prompt": "a fox", **sent}), "honour", 1 << 20, formats=False,
                  fixed=_fixed)  # fmt: skip
    ran = {"steps": 20, "cfg_scale": 7.5, "width": 64, "seed": 5, "subseed": -1, "restore_faces": False,
           "tiling": False, "send_images": True, "batch_size": 2}  # fmt: skip
    assert t.mapped == {name: (value, ran[name]) for name, value in sent.items()}
    assert (t.values["steps"], t.values["seed"], t.values["width"], t.values["batch"]) == (20, 5, 64, 2)
    # Under `turbo` SD's steps become Turbo's: the report keeps what the client sent.
    turbo = translate(Txt2ImgBody.model_validate({"steps": "20", "cfg_scale": 7}), "turbo", 1 << 20, formats=False,
                      fixed=_fixed)  # fmt: skip
    assert turbo.mapped["steps"] == ("20", DEFAULT_STEPS) and turbo.mapped["cfg_scale"] == (7.0, DEFAULT_GUIDANCE)
    # img2img: A1111's UI sends inpaint_full_res as a choice's index.
    body = Img2ImgBody.model_validate({"inpaint_full_res": 0, "mask_round": 1, "resize_mode": 1.0})
    assert (body.inpaint_full_res, body.mask_round, body.resize_mode) == (False, True, 1)
    job = _queued(app_client, {"steps": "6", "seed": 7.0, "restore_faces": 0})  # through the route: it runs
    assert (job.params["steps"], job.params["seed"]) == (6, 7)


def test_alpha_mask_inversion_is_refused(app_client: TestClient) -> None:
    rgba = noise().convert("RGBA")
    rgba.paste((0, 0, 0, 0), (32, 0, 64, 64))  # the transparent right half repaints
    image = base64.b64encode(_encoded(rgba, "PNG")).decode()
    body = {"prompt": "a fox", **SMALL, "init_images": [image], "mask": "alpha"}
    assert app_client.post("/sdapi/v1/img2img", json=body).status_code == 504  # accepted, queued (no worker)
    r = app_client.post("/sdapi/v1/img2img", json=body | {"inpainting_mask_invert": 1})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["field"] == "inpainting_mask_invert" and "with mask 'alpha'" in error["message"]


def _infotext(infotext: str, policy: str = "honour", kind: type = Txt2ImgBody, **body: object) -> Translation:
    return translate(kind.model_validate({"infotext": infotext, **body}), policy, 1 << 20, formats=False,
                     fixed=_fixed)  # fmt: skip


def test_infotext_applies_as_a1111_does() -> None:
    text = ("a cat <lora:style:0.5>\nNegative prompt: blurry\nSteps: 20, Sampler: DPM++ 2M, Schedule type: Karras, "
            "CFG scale: 5, Seed: 5, Size: 128x64, Batch size: 2, Denoising strength: 0.4, Seed variety: 0.3, "
            "Hires upscale: 2, Model: sd15")  # fmt: skip
    t = _infotext(text, prompt="a fox", width=64)
    v = t.values
    assert (v["prompt"], v["negative_prompt"], v["width"], v["height"]) == ("a fox", "blurry", 64, 64)
    assert (v["steps"], v["guidance_scale"], v["seed"], v["batch"]) == (20, 5.0, 5, 2)
    assert t.mapped == {"sampler_name": ("DPM++ 2M", "Euler"), "scheduler": ("Karras", "automatic")}
    assert set(t.ignored) == {"infotext.Prompt", "infotext.Size-1", "infotext.Seed variety",
                              "infotext.Denoising strength", "infotext.Hires upscale"}  # fmt: skip
    assert "loras" not in v  # the body's prompt wins, and with it its (no) LoRAs
    assert "img2img only" in t.ignored["infotext.Denoising strength"]
    assert t.body.steps == 20 and t.body.height == 64  # the body as run: the answer's `parameters`
    # Its values go through the policy like the body's: SD's 20 steps and CFG 5 run as Turbo's.
    turbo = _infotext(text, "turbo")
    assert (turbo.values["steps"], turbo.values["guidance_scale"]) == (DEFAULT_STEPS, DEFAULT_GUIDANCE)
    assert turbo.mapped["steps"] == (20, DEFAULT_STEPS) and turbo.values["prompt"] == "a cat"
    assert turbo.values["loras"] == [{"name": "style", "weight": 0.5}]  # the infotext's prompt ran: its LoRA too
    assert turbo.mapped["loras"] == (["<lora:style:0.5>"], turbo.values["loras"])
    # A body sampler by either name wins over the infotext's; an equal value (the seed) is not reported.
    t = _infotext("a cat\nSteps: 8, Sampler: Euler a, Seed: 5", sampler_index="Euler", seed=5)
    assert "sampler_name" not in t.mapped
    assert t.ignored == {"infotext.Sampler": "the body's sampler_index 'Euler' is used, as in A1111"}
    assert _infotext("").values["steps"] == 50 and _infotext("").ignored == {}  # A1111's default: nothing pasted


def test_infotext_sets_img2img_fields() -> None:
    png = base64.b64encode(_encoded(noise(), "PNG")).decode()
    t = _infotext("a cat\nSteps: 8, Seed: 5, Denoising strength: 0.4, Mask blur: 2", kind=Img2ImgBody,
                  init_images=[png], mask=png)  # fmt: skip
    assert (t.values["strength"], t.values["mask_blur"], t.values["paste_back"]) == (0.4, 2, True)
    assert t.ignored == {"inpaint_full_res": t.ignored["inpaint_full_res"]}


def test_both_sampler_names_are_read() -> None:
    t = translate(Txt2ImgBody(sampler_name="Euler", sampler_index="Euler a"), "honour", 1 << 20, formats=False,
                  fixed=_fixed)  # fmt: skip
    assert t.mapped == {} and "sampler_name 'Euler' is read instead" in t.ignored["sampler_index"]
    t = translate(Txt2ImgBody(sampler_name="", sampler_index="Euler a"), "honour", 1 << 20, formats=False,
                  fixed=_fixed)  # fmt: skip
    assert t.mapped == {"sampler_name": ("Euler a", "Euler")} and t.ignored == {}
    # A1111 reads sampler_name: an index beside it is not read, so even a bogus one is reported, not refused.
    t = translate(Txt2ImgBody(sampler_name="Euler", sampler_index="bogus"), "honour", 1 << 20, formats=False,
                  fixed=_fixed)  # fmt: skip
    assert t.mapped == {} and "sampler_name 'Euler' is read instead" in t.ignored["sampler_index"]


@pytest.mark.parametrize("alias", ["k_euler_a", "k_euler_ancestral", "K_DPMPP_2M", "k_dpmpp_2m_sde_heun", "k_lcm"])
def test_a1111s_sampler_aliases_run_as_euler(alias: str) -> None:
    t = translate(Txt2ImgBody(sampler_index=alias), "honour", 1 << 20, formats=False, fixed=_fixed)
    assert t.mapped == {"sampler_name": (alias, "Euler")}


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


# --- in process: LoRA tags and the other extra networks ------------------------------------------


def _tags(prompt: str, **body: object) -> Translation:
    return translate(Txt2ImgBody(prompt=prompt, **body), "honour", 1 << 20, formats=False, fixed=_fixed)


@pytest.mark.parametrize(
    ("prompt", "runs", "loras"),
    [
        ("a fox <lora:style:0.8>", "a fox", [("style", 0.8)]),
        ("<lora:style> a fox", " a fox", [("style", 1.0)]),  # A1111's default weight; only the tag goes
        ("a fox, <LoRA:style:.5> in snow", "a fox, in snow", [("style", 0.5)]),
        ("a fox <lyco:sub/b.safetensors:-1e-1>", "a fox", [("sub/b.safetensors", -0.1)]),  # lyco: A1111's alias
        ("a fox <lora:a:0.8:0.8> <lora:b:te=1:unet=0.25>", "a fox", [("a", 0.8), ("b", 0.25)]),
        ("a fox <lora:a:te=0.3>", "a fox", [("a", 0.3)]),  # the UNet weight follows the text encoder's
    ],
)
def test_lora_tags_become_the_requests_loras(prompt: str, runs: str, loras: list) -> None:
    t = _tags(prompt)
    expected = [{"name": name, "weight": weight} for name, weight in loras]
    assert (t.values["prompt"], t.values["loras"]) == (runs, expected)
    tags = [m.group(0).strip() for m in re.finditer(r"\s?<\w+:[^<>]*>", prompt)]
    assert t.mapped == {"loras": (tags, expected)}  # reported: the tags as sent, the LoRAs as they run
    assert GenerateRequest.from_fields(t.values, LIMITS).loras[0].name == loras[0][0]  # a valid request


def test_what_a_lora_tag_cannot_change_is_reported() -> None:
    t = _tags("a fox <lora:a:0.5:0.8> <foo:bar> <3", negative_prompt="blurry <lora:b:1>")
    assert t.values["loras"] == [{"name": "a", "weight": 0.8}]
    assert (t.values["prompt"], t.values["negative_prompt"]) == ("a fox <3", "blurry <lora:b:1>")
    assert t.ignored == {
        # The text encoder is not what zturbo's LoRAs change; A1111 skips a network it does not know.
        "loras": "<lora:a:0.5:0.8>: a text-encoder weight has no effect (zturbo's LoRAs change the transformer "
        "only); each runs at its UNet weight",
        "extra_networks": "<foo:bar>: no extra network of this server (A1111 skips one it does not know); taken "
        "out of the prompt",
        # A1111 reads the prompt's tags only: the negative prompt's are text, as they are there.
        "negative_prompt.extra_networks": "<lora:b:1>: A1111 applies the prompt's tags only; these stay in the "
        "negative prompt's text, as A1111 encodes it",
    }
    off = _tags("a fox <lora:a:0.5>", disable_extra_networks=True)  # A1111 takes the tags out, applies none
    assert (off.values["prompt"], "loras" in off.values, off.mapped) == ("a fox", False, {})
    assert "disable_extra_networks" in off.ignored["loras"]
    assert _tags("a fox").ignored == {} and "loras" not in _tags("a fox").values


def test_an_empty_tag_is_text_as_in_a1111() -> None:
    t = _tags("a fox <lora:> in snow")  # A1111's `[^>]+`: `<lora:>` is no tag, the encoder reads it
    assert t.values["prompt"] == "a fox <lora:> in snow" and "loras" not in t.values and t.ignored == {}


@pytest.mark.parametrize(
    "prompt",
    [
        "a fox <lora:style:0.8>",
        "<lora:style> a fox",
        "a fox, <LoRA:style:.5> in snow <foo:bar>",
        "a fox <lora:a:0.8:0.5> <lyco:sub/b.safetensors:te=1:unet=0.25>",
        "a fox <lora:> <lora:a<b:1> x > y",
    ],
)
def test_an_image_text_reads_tags_as_the_route_does(prompt: str) -> None:
    """One grammar (adapters.tags): `generate --from` and png-info read an A1111 text's prompt as this route
    reads a prompt, to the same encoder text and the same LoRAs."""
    from zturbo.imageio import parse_a1111

    params, _ = parse_a1111(f"{prompt}\nSteps: 8")
    t = _tags(prompt)
    assert params["prompt"] == t.values["prompt"]
    assert [(x["name"], x["weight"]) for x in params.get("loras", [])] == [
        (x["name"], x["weight"]) for x in t.values.get("loras", [])
    ]


def test_denoising_strength_on_txt2img_is_reported_as_ignored() -> None:
    assert "img2img only" in _tags("a fox", denoising_strength=0.7).ignored["denoising_strength"]
    png = base64.b64encode(_encoded(noise(), "PNG")).decode()
    t = translate(Img2ImgBody(init_images=[png], denoising_strength=0.7), "honour", 1 << 20, formats=False,
                  fixed=_fixed)  # fmt: skip
    assert t.values["strength"] == 0.7 and "denoising_strength" not in t.ignored


def test_an_unknown_lora_is_refused_at_submit_naming_its_tag(app_client: TestClient) -> None:
    store = app_client.app.state.service.store  # type: ignore[attr-defined]
    before = store.counts()
    r = app_client.post("/sdapi/v1/txt2img", json={"prompt": "a fox <lora:missing:0.8>", **SMALL})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    # As the native API refuses the name (type and message), on the field the tag came in.
    assert (error["type"], error["field"]) == ("invalid_lora", "prompt")
    assert error["message"].startswith("prompt tag <lora:missing:0.8>: no LoRA named 'missing' in the LoRA directory")
    assert store.counts() == before  # refused before the queue


def test_an_infotexts_lora_tag_is_checked_as_the_bodys(app_client: TestClient) -> None:
    r = app_client.post("/sdapi/v1/txt2img", json={"infotext": "a cat <lora:x:20>\nSteps: 8", **SMALL})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["field"] == "prompt"
    assert error["message"] == (
        "prompt tag <lora:x:20>: LoRA weight 20.0 is out of range; allowed -10..10 (the value comes from infotext)"
    )


def _lora_files(directory: Path, files: dict[str, bytes]) -> dict[str, str]:
    """Files that stand in for LoRAs (finding one reads its name and hash only); name -> sha256."""
    for name, data in files.items():
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        (directory / name).write_bytes(data)
    return {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}


def test_lora_tags_find_their_files_as_a1111_does(tmp_path: Path) -> None:
    digest = _lora_files(tmp_path, {"v2/style-v2.safetensors": b"style", "eyes.safetensors": b"eyes v2",
                                    "detail/hands.safetensors": b"hands"})  # fmt: skip
    library = LoraLibrary(tmp_path)
    # The infotext's `Lora hashes` find a renamed file (A1111's paste does the same); the name, a
    # file of the folder, or the one file A1111 calls so (no folder, no suffix) find the others.
    hashes = f"style: {digest['v2/style-v2.safetensors'][:10]}, eyes: {'0' * 10}"
    text = f'a fox <lora:style:0.5> <lora:eyes:0.3> <lora:hands:1>\nSteps: 8, Lora hashes: "{hashes}"'
    t = _infotext(text)
    locate_loras(t, LoraFinder(library))
    assert t.values["loras"] == [
        {"name": "v2/style-v2.safetensors", "weight": 0.5},
        {"name": "eyes", "weight": 0.3},
        {"name": "detail/hands.safetensors", "weight": 1.0},
    ]
    assert t.mapped["loras"] == (["<lora:style:0.5>", "<lora:eyes:0.3>", "<lora:hands:1>"], t.values["loras"])
    # A file of the name whose hash is not the recorded one runs, and the answer says so.
    assert t.ignored["infotext.Lora hashes"] == (
        f"<lora:eyes:0.3>: eyes.safetensors has sha256 {digest['eyes.safetensors'][:10]}, not the recorded "
        f"{'0' * 10}, and no file has that hash; the image will differ"
    )
    # The body's prompt wins over the infotext's, and its hashes with it.
    t = _infotext(text, prompt="a fox <lora:style:0.5>")
    locate_loras(t, LoraFinder(library))
    assert t.values["loras"] == [{"name": "style", "weight": 0.5}]  # no file: submit refuses it, naming it
    assert t.ignored["infotext.Lora hashes"] == "they find the infotext prompt's LoRAs; the body's prompt is used"
    assert (
        "no <lora:...> tag"
        in _infotext('a fox\nSteps: 8, Lora hashes: "a: 0123456789"').ignored["infotext.Lora hashes"]
    )


@pytest.fixture
def directory_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every listing of a LoRA directory, every name looked up in it (`exists` and `resolve` both
    go through `_lookup`; `names` through `_paths`) and every file hashed, recorded (nothing is stopped)."""
    reads: list[str] = []
    paths, lookup, sha256_file = LoraLibrary._paths, LoraLibrary._lookup, lora_library.sha256_file

    def listing(self: LoraLibrary) -> list:
        reads.append(f"list {self.directory}")
        return paths(self)

    def looking_up(self: LoraLibrary, name: str) -> tuple[str, Path] | None:
        reads.append(f"lookup {name}")
        return lookup(self, name)

    def hashing(path: Path) -> str:
        reads.append(f"hash {path.name}")
        return sha256_file(path)

    monkeypatch.setattr(LoraLibrary, "_paths", listing)
    monkeypatch.setattr(LoraLibrary, "_lookup", looking_up)
    monkeypatch.setattr(lora_library, "sha256_file", hashing)
    return reads


@pytest.mark.parametrize(
    ("prompt", "says"),
    [
        ("a fox" + " <lora:nope>" * 20, "prompt has 20 <lora:...> tags; allowed at most 8 (the request's LoRA limit)"),
        ("a fox" + " <lora:nope>" * 20_000, "prompt is 240005 characters long; allowed at most 4000"),
        ("a fox" + " <foo:x>" * 100_000, "prompt is 800005 characters long; allowed at most 4000"),  # 800 KB
    ],
)
def test_a_hostile_prompt_is_refused_before_the_lora_directory_is_read(
    app_client: TestClient, directory_reads: list[str], prompt: str, says: str
) -> None:
    store = app_client.app.state.service.store  # type: ignore[attr-defined]
    before, started = store.counts(), time.perf_counter()
    r = app_client.post("/sdapi/v1/txt2img", json={"prompt": prompt, **SMALL})
    assert r.status_code == 400, r.text[:500]
    assert time.perf_counter() - started < 2  # 20,000 tags took 47.7 s of lookups before the check moved
    error = r.json()["error"]
    assert (error["field"], error["message"]) == ("prompt", says)
    assert len(r.content) < 500  # the prompt is not echoed back
    assert directory_reads == [] and store.counts() == before


def test_a_tag_is_looked_up_once_the_whole_request_is_valid(app_client: TestClient, directory_reads: list[str]) -> None:
    # A weight out of range and a bad field elsewhere are refused before any lookup; a valid one is looked up.
    for body in ({"prompt": "a fox <lora:nope:20>"}, {"prompt": "a fox <lora:nope>", "steps": 500}):
        r = app_client.post("/sdapi/v1/txt2img", json={**SMALL, **body})
        assert r.status_code == 400 and directory_reads == [], r.text
    r = app_client.post("/sdapi/v1/txt2img", json={"prompt": "a fox <lora:nope>", **SMALL})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_lora"
    assert directory_reads and not any(read.startswith("hash") for read in directory_reads)  # names only


def test_a_genuine_a1111_infotext_runs_its_lora_by_name_unchecked(tmp_path: Path, directory_reads: list[str]) -> None:
    # A1111's `Lora hashes` are 12 hex digits of its own hash (of the tensor data alone), no sha256 prefix:
    # the named file runs, nothing is hashed, and the answer says the hash went unchecked, not "will differ".
    _lora_files(tmp_path, {"style.safetensors": b"style", "other/detail.safetensors": b"detail"})
    text = ("a fox <lora:style:0.8> <lora:detail:0.5>\nNegative prompt: blurry\nSteps: 20, Sampler: DPM++ 2M, "
            "Schedule type: Karras, CFG scale: 7, Seed: 1, Size: 512x512, Model hash: 6ce0161689, Model: sd15, "
            'Lora hashes: "style: 1a2b3c4d5e6f, detail: 0f1e2d3c4b5a", Version: v1.10.1')  # fmt: skip
    t = _infotext(text)
    locate_loras(t, LoraFinder(LoraLibrary(tmp_path)))
    assert t.values["loras"] == [{"name": "style", "weight": 0.8}, {"name": "other/detail.safetensors", "weight": 0.5}]
    note = t.ignored["infotext.Lora hashes"]
    assert "will differ" not in note
    assert "<lora:style:0.8>: the recorded hash '1a2b3c4d5e6f' is not 10 or 64 hex digits of a sha256" in note
    assert not any(read.startswith("hash") for read in directory_reads)


def test_the_server_hashes_the_directory_once_a_request_and_one_listing_at_a_time(tmp_path: Path) -> None:
    from zturbo.serving.loras import ServerLoras

    _lora_files(tmp_path, {"a.safetensors": b"a", "b.safetensors": b"b"})
    loras = ServerLoras(tmp_path, dict)
    listings = []
    files = loras.files
    loras.files = lambda: listings.append(1) or files()  # type: ignore[method-assign]
    finder = loras.finder()
    assert finder.locate("a", "0" * 10).differs and finder.locate("b", "1" * 64).differs
    assert len(listings) == 1  # two hashes that no file has: the directory was hashed once
    found: list[object] = []
    with loras._listing:  # another request's listing is under way: this one waits, then reads the known hashes
        worker = threading.Thread(target=lambda: found.append(ServerLoras.finder(loras).locate("x", "2" * 10)))
        worker.start()
        worker.join(0.3)
        assert worker.is_alive()
    worker.join(5)
    assert found and found[0].name is None  # type: ignore[attr-defined]


def test_threads_resolving_one_file_hash_it_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # N requests naming the same (multi-GB) LoRA with a cold cache wait for one hashing, not N at once.
    digest = _lora_files(tmp_path, {"big.safetensors": b"big"})
    library = LoraLibrary(tmp_path)
    hashed: list[Path] = []
    sha256_file = lora_library.sha256_file

    def slow_hashing(path: Path) -> str:
        hashed.append(path)
        time.sleep(0.05)  # long enough for every thread to reach the hashing
        return sha256_file(path)

    monkeypatch.setattr(lora_library, "sha256_file", slow_hashing)
    start, found = threading.Barrier(8), []

    def resolve() -> None:
        start.wait()
        found.append(library.resolve("big").sha256)

    threads = [threading.Thread(target=resolve) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert found == [digest["big.safetensors"]] * 8
    assert len(hashed) == 1


def test_a_name_no_path_can_hold_is_not_found_rather_than_a_crash(tmp_path: Path) -> None:
    library = LoraLibrary(tmp_path)
    with pytest.raises(LoraError, match="unpaired surrogate"):
        library.resolve("\ud800")
    assert LoraFinder(library).locate("\ud800", "0" * 10).name is None


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
