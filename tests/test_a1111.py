"""The A1111 API (/sdapi/v1) through the real `webuiapi` client against live `zturbo serve --model
tiny-random` servers, one per `--client-defaults` policy (started together); the refusals and the
policy's rules run in process, with no worker."""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import webuiapi
from fastapi.testclient import TestClient
from PIL import Image

from serving import KEY, Server, in_process_app
from zturbo.request import DEFAULT_GUIDANCE, DEFAULT_STEPS
from zturbo.serving.a1111 import MAPPED_HEADER, Txt2ImgBody, translate

SMALL = {"width": 64, "height": 64}


@pytest.fixture(scope="module")
def servers(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Server]]:
    root = tmp_path_factory.mktemp("a1111")
    started = {
        policy: Server(tiny_dir, root / policy, "--no-ui", "--client-defaults", policy, step_sleep=0.05)
        for policy in ("turbo", "honour")
    }
    for server in started.values():
        server.model_name = Path(tiny_dir).name  # type: ignore[attr-defined]
    try:
        for server in started.values():
            server.wait_ready()
        yield started
    finally:
        for server in started.values():
            server.stop()


def client(server: Server) -> webuiapi.WebUIApi:
    """The client as A1111 users configure it: host, port and --api-auth credentials (the key as password)."""
    return webuiapi.WebUIApi(host="127.0.0.1", port=server.port, username="any", password=KEY)


def noise(width: int = 64, height: int = 64, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


def test_turbo_maps_the_sd_defaults_and_says_so(servers: dict[str, Server]) -> None:
    # webuiapi's defaults: 20 steps, CFG 7, "Euler a", as most A1111 clients send.
    result = client(servers["turbo"]).txt2img(prompt="a red fox", seed=7, **SMALL)
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
    # The mapped request is exactly Turbo's own: the same pixels as asking for 8 steps and CFG 0.
    plain = client(servers["honour"]).txt2img(prompt="a red fox", seed=7, steps=8, cfg_scale=0, sampler_name="Euler",
                                              **SMALL)  # fmt: skip
    assert plain.info["zturbo"]["mapped"] == {}
    assert np.array_equal(np.asarray(plain.images[0]), np.asarray(image))


def test_honour_runs_what_was_sent_and_the_header_lists_the_mapping(servers: dict[str, Server]) -> None:
    body = {"prompt": "a red fox", "seed": 3, "steps": 20, "cfg_scale": 7, "sampler_name": "Euler a", **SMALL}
    r = httpx.post(f"{servers['honour'].url}/sdapi/v1/txt2img", json=body, auth=("u", KEY), timeout=60)
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])
    assert (info["steps"], info["cfg_scale"]) == (20, 7.0)
    assert r.headers[MAPPED_HEADER] == "sampler_name"  # one sampler is all zturbo has, under either policy
    r = httpx.post(f"{servers['turbo'].url}/sdapi/v1/txt2img", json=body, auth=("u", KEY), timeout=60)
    assert r.headers[MAPPED_HEADER] == "steps,cfg_scale,sampler_name"


def test_img2img_and_inpaint(servers: dict[str, Server]) -> None:
    api = client(servers["turbo"])
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


def test_options_models_and_samplers(servers: dict[str, Server]) -> None:
    server = servers["turbo"]
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


def test_progress_and_interrupt(servers: dict[str, Server]) -> None:
    api = client(servers["honour"])
    answer: dict[str, object] = {}
    # 60 steps are outside SD's usual range, so they run as sent: 3 s at the test's step sleep.
    worker = threading.Thread(target=lambda: answer.update(r=api.txt2img(prompt="a fox", steps=60, **SMALL)))
    worker.start()
    deadline = time.monotonic() + 30
    while (progress := api.get_progress())["state"]["sampling_step"] < 2:
        assert time.monotonic() < deadline, progress
        time.sleep(0.05)
    assert progress["state"]["job_count"] == 1 and progress["state"]["sampling_steps"] == 60
    assert 0 < progress["progress"] < 1 and progress["eta_relative"] > 0
    # A1111 jobs ask for previews: by step 2 the worker has sent one.
    preview = Image.open(io.BytesIO(base64.b64decode(progress["current_image"])))
    assert preview.format == "JPEG" and max(preview.size) <= 256
    url = f"{servers['honour'].url}/sdapi/v1/progress"
    assert httpx.get(url, params={"skip_current_image": "true"}, auth=("u", KEY)).json()["current_image"] is None
    api.interrupt()
    worker.join(30)
    result = answer["r"]
    assert result.images == [] and result.info["zturbo"]["status"] == "cancelled"  # type: ignore[attr-defined]
    assert api.get_progress()["state"]["job_count"] == 0


def test_png_info_reads_the_parameters_back(servers: dict[str, Server]) -> None:
    api = client(servers["turbo"])
    image = api.txt2img(prompt="a red fox", seed=11, **SMALL).image
    info = api.png_info(image)
    assert info.info.startswith("a red fox\n") and "Seed: 11," in info.info
    assert info.parameters["Seed"] == 11 and info.parameters["Steps"] == DEFAULT_STEPS
    assert (info.parameters["Size-1"], info.parameters["Size-2"]) == (64, 64)
    assert json.loads(info.json["items"]["zturbo"])["seed"] == 11  # the full metadata comes along
    plain = api.png_info(noise())  # no parameters: empty, as A1111 answers
    assert plain.info == "" and plain.parameters == {}


def test_the_a1111_routes_need_the_key(servers: dict[str, Server]) -> None:
    url = f"{servers['turbo'].url}/sdapi/v1/options"
    assert httpx.get(url).status_code == 401
    assert httpx.get(url, auth=("u", "wrong")).status_code == 401
    assert httpx.get(url, headers={"Authorization": f"Bearer {KEY}"}).status_code == 200


# --- in process: refusals before any work, and the policy's rules ------------------------------


@pytest.fixture(scope="module")
def app_client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    with TestClient(in_process_app(tmp_path_factory.mktemp("a1111-app"))) as c:
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
