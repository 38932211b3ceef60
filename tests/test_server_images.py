"""Input images over HTTP: the OpenAI edit route, base64 and multipart jobs, every refusal at the
edge, the content-addressed store that keeps a job's images across restarts, and the ControlNet.

The edge and the store run in process (no workers: accepted jobs wait in the queue); one live
server, with a tiny ControlNet, makes the images. A job's image surviving a server killed mid-run
is checked with the other crashes (tests/test_server_recovery.py).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import os
import re
import struct
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from serving import KEY, Server, in_process_app
from zturbo.config import RuntimeConfig
from zturbo.errors import StorageError
from zturbo.imageio import METADATA_KEY
from zturbo.request import LIMITS, GenerateRequest, ModelLimits
from zturbo.serving import jobs

LIMITS_1024 = ModelLimits(16, 1024 * 1024)
MAX_INPUT = 50_000  # the in-process app's upload limit per image, so a 413 needs no 64 MiB body


def encode(image: Image.Image, fmt: str = "PNG", **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def noise_png(width: int = 64, height: int = 64, seed: int = 0, mode: str = "RGB") -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, len(mode)), dtype=np.uint8)
    return encode(Image.fromarray(pixels, mode))


def half_mask(width: int = 64, height: int = 64) -> bytes:
    """White (repaint) on the right half, black (keep) on the left."""
    pixels = np.zeros((height, width), dtype=np.uint8)
    pixels[:, width // 2 :] = 255
    return encode(Image.fromarray(pixels, "L"))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def bomb_png() -> bytes:
    """A 1x1 PNG whose header claims 30000x30000 pixels."""
    data = noise_png(1, 1)
    ihdr = data[12:16] + struct.pack(">II", 30000, 30000) + data[24:29]
    return data[:12] + ihdr + struct.pack(">I", zlib.crc32(ihdr)) + data[33:]


def animated_gif() -> bytes:
    frames = [Image.new("RGB", (16, 16), color) for color in ("red", "blue")]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:])


def stored_files(data_dir: Path) -> set[str]:
    return {p.name for p in (data_dir / "inputs").glob("*/*")}


def png_meta(data: bytes) -> tuple[dict, np.ndarray]:
    with Image.open(io.BytesIO(data)) as im:
        return json.loads(im.text[METADATA_KEY]), np.asarray(im.convert("RGB"))


def assert_error(r, status: int, kind: str, field: str | None) -> str:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert (error["type"], error["field"]) == (kind, field), error
    return error["message"]


# --- the edge, in process -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("images-api")


@pytest.fixture(scope="module")
def api(data_dir) -> Iterator[TestClient]:
    with TestClient(in_process_app(data_dir, max_input_bytes=MAX_INPUT, sync_timeout=0.2)) as client:
        yield client


JOB = {"prompt": "a fox", "steps": 2}
IMAGE = noise_png()
JSON_REFUSALS = [
    ({"image": b64(noise_png(160, 160))}, 413, "too_large", "image", f"allowed at most {MAX_INPUT} bytes"),
    ({"image": "data:text/plain;base64,aGVsbG8="}, 415, "unsupported_media_type", "image", "'text/plain'"),
    ({"image": "data:image/png," + b64(IMAGE)}, 400, "invalid_request", "image", "without ';base64'"),
    ({"image": "%%%" + b64(IMAGE)}, 400, "invalid_request", "image", "is not valid base64"),
    ({"image": b64(b"GIF89a, or so it says")}, 400, "invalid_request", "image", "not an image Pillow can read"),
    ({"image": b64(IMAGE[:-100])}, 400, "invalid_request", "image", "damaged or truncated"),
    ({"image": b64(bomb_png())}, 400, "invalid_request", "image", "900000000 pixels; allowed at most 67108864"),
    ({"image": b64(animated_gif())}, 400, "invalid_request", "image", "animated (2 frames)"),
    ({"control_image": b64(IMAGE)}, 400, "invalid_request", "control_image", "needs a ControlNet"),
    ({"mask": b64(half_mask())}, 400, "invalid_request", "mask", "needs an input image"),
    ({"image": b64(IMAGE), "mask": "alpha"}, 400, "invalid_request", "mask", "no transparent pixels"),
    ({"image": b64(noise_png(60, 60))}, 400, "invalid_request", "image", "60x60"),  # no size: not a multiple of 16
    ({"image": b64(IMAGE), "width": 128, "height": 128}, 400, "invalid_request", "image", "give resize"),
    ({"image": b64(IMAGE), "strength": 0.0}, 400, "invalid_request", "strength", "leaves the image as it is"),
]


@pytest.mark.parametrize(("fields", "status", "kind", "field", "message"), JSON_REFUSALS)
def test_json_images_are_refused_at_the_edge_naming_the_field(api, data_dir, fields, status, kind, field, message):
    before = stored_files(data_dir)
    r = api.post("/v1/jobs", json={**JOB, **fields})
    assert message in assert_error(r, status, kind, field)
    assert stored_files(data_dir) == before  # nothing refused is stored


def test_the_generations_route_takes_the_same_image_fields(api):
    r = api.post("/v1/images/generations", json={**JOB, "image": "data:text/html;base64,aGVsbG8="})
    assert_error(r, 415, "unsupported_media_type", "image")
    r = api.post("/v1/images/generations", json={**JOB, "size": "64x64", "mask": b64(half_mask())})
    assert_error(r, 400, "invalid_request", "mask")


def files(**parts: bytes | tuple) -> list[tuple[str, tuple]]:
    return [
        (name, part if isinstance(part, tuple) else (f"{name}.png", part, "image/png")) for name, part in parts.items()
    ]


FORM_REFUSALS = [
    (files(image=noise_png(160, 160)), 413, "too_large", "image", f"allowed at most {MAX_INPUT} bytes"),
    (files(image=("fox.txt", b"a fox", "text/plain")), 415, "unsupported_media_type", "image", "'text/plain'"),
    (files(mask=("m.json", b"{}", "application/json")), 415, "unsupported_media_type", "mask", "application/json"),
    (files(image=b"\x89PNG\r\n\x1a\n broken"), 400, "invalid_request", "image", "'image.png'"),
    ([*files(image=IMAGE), ("image[]", ("b.png", IMAGE, "image/png"))], 400, "invalid_request", "image", "one image"),
    (files(prompt=IMAGE), 400, "invalid_request", "prompt", "is a file; only image, mask, control_image"),
    (files(image=IMAGE, mask=half_mask(32, 32)), 400, "invalid_request", "mask", "32x32"),
]


@pytest.mark.parametrize(("parts", "status", "kind", "field", "message"), FORM_REFUSALS)
def test_file_parts_are_refused_at_the_edge_naming_the_field(api, parts, status, kind, field, message):
    data = {k: str(v) for k, v in JOB.items() if k != "prompt" or field != "prompt"}
    r = api.post("/v1/jobs", data=data, files=parts)
    assert message in assert_error(r, status, kind, field)


def test_list_parts_are_comma_separated_text_as_on_the_command_line(api):
    """Clients send a list as repeated `name[]` parts (the openai client does): margins, seeds, LoRAs."""
    parts = {"outpaint[]": ["0", "16", "0", "0"], "seeds[]": ["7", "3"], "prompt": "a"}
    r = api.post("/v1/jobs", data=parts, files=files(image=IMAGE))
    assert r.status_code == 202, r.text
    params = r.json()["params"]
    assert (params["seeds"], params["width"], params["height"]) == ([7, 3], 80, 64)
    assert (params["inputs"]["mode"], params["inputs"]["outpaint"]) == ("outpaint", [0, 16, 0, 0])
    r = api.post("/v1/jobs", data={"prompt": "a", "steps": "2", "steps[]": "3"}, files=files(image=IMAGE))
    assert "steps is given more than once" in assert_error(r, 400, "invalid_request", "steps")


def test_size_auto_is_the_input_images_size_on_every_route(api):
    """OpenAI's "auto" means the image's own size on the edit route, so it does on every route that
    takes `size` and an image (a job's form, like its JSON, has width and height instead, and
    without them the image's size); without an image it is 1024x1024."""
    image = noise_png(64, 48, seed=3)
    r = api.post("/v1/jobs", data={"prompt": "a"}, files=files(image=image))
    assert r.status_code == 202, r.text
    assert (r.json()["params"]["width"], r.json()["params"]["height"]) == (64, 48)
    r = api.post("/v1/jobs", data={"prompt": "a", "size": "auto"}, files=files(image=image))
    assert assert_error(r, 400, "invalid_request", "size") == "size is not a known field"
    for r in (
        api.post("/v1/images/generations", json={**JOB, "image": b64(image), "size": "auto"}),
        api.post("/v1/images/edits", data={"prompt": "a", "size": "auto"}, files=files(image=image)),
    ):
        job_id = re.search(r"job ([0-9a-f]+) did not finish", assert_error(r, 504, "timeout", None)).group(1)
        params = api.get(f"/v1/jobs/{job_id}").json()["params"]
        assert (params["width"], params["height"]) == (64, 48)
    assert GenerateRequest.from_fields({"prompt": "a", "size": "auto"}, LIMITS_1024).width == 1024


def test_an_edit_with_outpaint_margins_is_outpaint_whatever_the_images_transparency(api):
    """Without a mask, an image's transparency is its mask; outpaint makes its own, so an edit that
    asks for one is not refused for giving both."""
    rgba = encode(Image.fromarray(np.zeros((64, 64, 4), np.uint8), "RGBA"))
    r = api.post("/v1/images/edits", data={"prompt": "a", "outpaint": "0,16,0,0"}, files=files(image=rgba))
    job_id = re.search(r"job ([0-9a-f]+) did not finish", assert_error(r, 504, "timeout", None)).group(1)
    inputs = api.get(f"/v1/jobs/{job_id}").json()["params"]["inputs"]
    assert (inputs["mode"], inputs["mask_from_alpha"], inputs["outpaint"]) == ("outpaint", False, [0, 16, 0, 0])


def test_too_many_file_parts_and_a_json_edit_are_refused(api):
    parts = [(f"f{i}", (f"{i}.png", IMAGE, "image/png")) for i in range(4)]
    r = api.post("/v1/jobs", data={"prompt": "a fox"}, files=parts)
    assert "Too many files" in assert_error(r, 400, "invalid_request", None)
    r = api.post("/v1/images/edits", json={"prompt": "a fox", "image": b64(IMAGE)})
    assert "multipart/form-data" in assert_error(r, 415, "unsupported_media_type", None)


def test_a_streamed_image_body_is_cut_off_at_the_image_routes_limit(api):
    """An image route reads up to 1 MiB plus three images in base64, and not a chunk further."""
    limit = api.app.state.service.settings.max_image_body_bytes
    assert limit < (1 << 20) + 3 * MAX_INPUT * 4 // 3 + 4096
    chunk, read, sent = 64 << 10, [], []

    async def receive() -> dict:
        read.append(chunk)
        return {"type": "http.request", "body": b" " * chunk, "more_body": len(read) < 64}

    async def send(message: dict) -> None:
        sent.append(message)

    headers = [(b"host", b"127.0.0.1"), (b"content-type", b"application/json")]
    scope = {"type": "http", "method": "POST", "path": "/v1/jobs", "raw_path": b"/v1/jobs", "query_string": b"",
             "headers": headers, "http_version": "1.1", "scheme": "http", "server": ("127.0.0.1", 80)}  # fmt: skip
    asyncio.run(api.app(scope, receive, send))
    assert sent[0]["status"] == 413 and str(limit) in json.loads(sent[1]["body"])["error"]["message"]
    assert limit < sum(read) <= limit + chunk


def test_the_default_upload_limit_is_the_request_tables():
    from zturbo.serving.service import ServeSettings

    settings = ServeSettings(RuntimeConfig(model="x"), Path("."), [], ModelLimits(16, 64 * 64))
    assert settings.max_input_bytes == LIMITS.input_bytes
    assert settings.max_image_body_bytes > settings.max_body_bytes + 3 * LIMITS.input_bytes * 4 // 3


def test_json_and_multipart_give_the_same_stored_job(api, data_dir):
    """Base64, a data URL and a file part of one image store one file and the same request."""
    mask = half_mask()
    settings = {"strength": 0.5, "mask_padding": 2, "seed": 9}
    by_json = api.post("/v1/jobs", json={**JOB, **settings, "image": b64(IMAGE), "mask": b64(mask)})
    by_url = api.post("/v1/jobs", json={**JOB, **settings, "image": "data:image/png;base64," + b64(IMAGE),
                                        "mask": "data:image/png;base64," + b64(mask)})  # fmt: skip
    form = {k: str(v) for k, v in {**JOB, **settings}.items()}
    by_form = api.post("/v1/jobs", data=form, files=files(image=IMAGE, mask=mask))
    views = [r.json() for r in (by_json, by_url, by_form)]
    assert [r.status_code for r in (by_json, by_url, by_form)] == [202] * 3, [v for v in views]
    inputs = views[0]["params"]["inputs"]
    assert (inputs["mode"], inputs["strength"], inputs["mask_padding"]) == ("inpaint", 0.5, 2)
    assert {k: v["sha256"] for k, v in inputs["images"].items()} == {"image": sha256(IMAGE), "mask": sha256(mask)}
    for view in views[1:]:
        assert {**view["params"]["inputs"], "images": None} == {**inputs, "images": None}
        assert [v["sha256"] for v in view["params"]["inputs"]["images"].values()] == [sha256(IMAGE), sha256(mask)]
    assert {sha256(IMAGE), sha256(mask)} <= stored_files(data_dir)
    assert (data_dir / "inputs" / sha256(IMAGE)[:2] / sha256(IMAGE)).read_bytes() == IMAGE
    assert b64(IMAGE) not in json.dumps(views)  # the view shows hashes, never the bytes
    r = api.get(inputs["images"]["mask"]["url"])
    assert (r.status_code, r.headers["content-type"], r.content) == (200, "image/png", mask)
    r = api.get(f"/v1/jobs/{views[0]['id']}/inputs/control_image")
    assert "its input images: image, mask" in assert_error(r, 404, "not_found", None)


def test_input_files_go_with_the_last_job_that_uses_them(api, data_dir):
    image = noise_png(seed=11)
    first, second = (api.post("/v1/jobs", json={**JOB, "image": b64(image)}).json()["id"] for _ in range(2))
    text = api.post("/v1/jobs", json=JOB).json()["id"]
    assert sha256(image) in stored_files(data_dir)
    for job_id in (first, text):
        api.delete(f"/v1/jobs/{job_id}")  # cancelled: queued jobs are cancelled at once
        assert api.delete(f"/v1/history/{job_id}").status_code == 204
    assert sha256(image) in stored_files(data_dir)  # the second job still needs it
    api.delete(f"/v1/jobs/{second}")
    api.delete(f"/v1/history/{second}")
    assert sha256(image) not in stored_files(data_dir)


def test_a_refused_submission_stores_nothing_and_a_start_sweeps_strays(tmp_path):
    data = tmp_path / "data"
    with TestClient(in_process_app(data, queue_size=1)) as client:
        kept = client.post("/v1/jobs", json={**JOB, "image": b64(IMAGE)})
        assert kept.status_code == 202
        r = client.post("/v1/jobs", json={**JOB, "image": b64(noise_png(seed=5))})
        assert_error(r, 429, "queue_full", None)
        assert stored_files(data) == {sha256(IMAGE)}
    stray = data / "inputs" / "ab" / ("ab" + "0" * 62)
    partial = data / "inputs" / "ab" / ("ab" + "1" * 62 + ".1234abcd.part")
    for path in (stray, partial):
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"left by a submission cut off before its job committed")
    with TestClient(in_process_app(data, queue_size=1)) as client:
        assert stored_files(data) == {sha256(IMAGE)}  # the strays went, the queued job's image stayed
        assert client.get(kept.json()["params"]["inputs"]["images"]["image"]["url"]).content == IMAGE


def test_a_stored_image_is_durable_with_every_directory_made_for_it(tmp_path, monkeypatch):
    """A job commits once its images are on disk: the file, its rename, and each directory the store
    had to make (a new directory's entry is durable only once its parent is synced)."""
    synced: list[Path] = []
    monkeypatch.setattr(jobs, "_fsync_dir", synced.append)
    store = jobs.InputStore(tmp_path / "inputs")
    first, second = (jobs.InputImage(b"x", digit * 64, None, "x") for digit in ("a", "b"))
    store.put(first)
    assert synced == [tmp_path / "inputs" / "aa", tmp_path / "inputs", tmp_path]
    synced.clear()
    store.put(second)  # a new shard of an existing store
    assert synced == [tmp_path / "inputs" / "bb", tmp_path / "inputs"]
    synced.clear()
    store.put(jobs.InputImage(b"y", "a" * 63 + "b", None, "y"))  # both directories there already
    assert synced == [tmp_path / "inputs" / "aa"]


def test_a_shared_input_directory_keeps_an_unreferenced_file_until_it_is_old(tmp_path):
    """Servers on several machines share inputs/ (a PostgreSQL queue): a file no job refers to may be
    another machine's submission between its write and its commit, so it stays `keep_s`; a
    submission that finds it present makes it new again."""
    store = jobs.InputStore(tmp_path / "inputs", keep_s=600)
    image = jobs.InputImage(b"x", "a" * 64, None, "x")
    path = store.path(image.sha256)

    def age() -> None:
        os.utime(path, (time.time() - 601,) * 2)

    store.put(image)
    store.remove([image.sha256])
    assert path.exists()
    age()
    store.put(image)  # found present: another job refers to it from now on
    store.remove([image.sha256])
    assert path.exists()
    age()
    store.remove([image.sha256])
    assert not path.exists()


def test_a_missing_or_damaged_input_file_is_the_jobs_storage_error(tmp_path):
    store = jobs.JobStore(tmp_path / "jobs.sqlite3")
    request = GenerateRequest.create("a fox", limits=ModelLimits(16, 64 * 64), image=IMAGE, steps=2)
    store.submit(request)
    claim = store.claim("w")
    assert claim is not None
    again = jobs.stored_request(claim.params, ModelLimits(16, 64 * 64), store.inputs.resolve)
    assert again.inputs.image.data == IMAGE and again.to_dict() == request.to_dict()
    path = store.inputs.path(sha256(IMAGE))
    path.write_bytes(IMAGE[:-1] + b"\0")
    with pytest.raises(StorageError, match="damaged"):
        jobs.stored_request(claim.params, ModelLimits(16, 64 * 64), store.inputs.resolve)
    store.submit(request)  # the same image again: the damaged file is replaced, not trusted
    assert store.inputs.resolve("image", sha256(IMAGE)).data == IMAGE
    path.unlink()
    with pytest.raises(StorageError, match=r"the job's image \(sha256 [0-9a-f]{12}...\) is no longer stored"):
        jobs.stored_request(claim.params, ModelLimits(16, 64 * 64), store.inputs.resolve)
    with pytest.raises(StorageError, match="is not a sha256"):
        store.inputs.resolve("image", "../../jobs.sqlite3")


def test_a_server_with_a_controlnet_takes_control_images_and_says_so(tmp_path):
    limits = ModelLimits(16, 64 * 64, control_in_dim=33)
    config = RuntimeConfig(model="unloaded", device="cpu", controlnet="union-2.1.safetensors")
    with TestClient(in_process_app(tmp_path, limits, config=config)) as client:
        status = client.get("/v1/status").json()
        assert status["controlnet"] == {"name": "union-2.1.safetensors", "control_in_dim": 33, "inpaint": True}
        body = {**JOB, "image": b64(IMAGE), "mask": b64(half_mask()), "control_image": b64(IMAGE),
                "control_type": "canny", "control_scale": 0.5}  # fmt: skip
        r = client.post("/v1/jobs", json=body)
        assert r.status_code == 202, r.text
        inputs = r.json()["params"]["inputs"]
        assert (inputs["mode"], inputs["controlled"], inputs["control_type"]) == ("inpaint", True, "canny")
        assert 'zturbo_jobs_by_mode_total{controlled="true",mode="inpaint"} 1.0' in client.get("/metrics").text
    with TestClient(in_process_app(tmp_path / "plain")) as client:
        assert client.get("/v1/status").json()["controlnet"] is None


def test_serve_reads_the_controlnets_input_width_from_its_header(tiny_dir, tmp_path):
    from zturbo.loader import resolve_model
    from zturbo.serving.serve import _model_limits
    from zturbo.tiny import write_tiny_controlnet

    source = resolve_model(str(tiny_dir), weights=False)
    for version, dim in (("1.0", 16), ("2.1", 33)):
        path = write_tiny_controlnet(tmp_path / f"cn-{version}.safetensors", version=version)
        config = RuntimeConfig(model=str(tiny_dir), controlnet=str(path))
        assert _model_limits(source, config).control_in_dim == dim
    assert _model_limits(source, RuntimeConfig(model=str(tiny_dir))).control_in_dim is None


def test_the_schema_documents_both_bodies_of_a_job_and_the_edit_form(api):
    paths = api.get("/openapi.json").json()["paths"]
    content = paths["/v1/jobs"]["post"]["requestBody"]["content"]
    assert set(content) == {"application/json", "multipart/form-data"}
    form = content["multipart/form-data"]["schema"]["properties"]
    assert form["image"] == {"type": "string", "format": "binary"} and form["steps"] == {"type": "string"}
    edit = paths["/v1/images/edits"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert set(edit["required"]) == {"image", "prompt"} and "size" in edit["properties"]


# --- a live server --------------------------------------------------------------------------------


class Live:
    """The module's server, with a tiny Union 2.1 ControlNet, and its data directory."""

    def __init__(self, tiny_dir: Path, root: Path) -> None:
        from zturbo.tiny import write_tiny_controlnet

        self.data = root / "data"
        controlnet = write_tiny_controlnet(root / "union-2.1.safetensors", version="2.1")
        self.server = Server(str(tiny_dir), self.data, "--controlnet", str(controlnet), "--shutdown-grace", "0",
                             "--no-ui", step_sleep=0.02)  # fmt: skip
        self.server.wait_ready()


@pytest.fixture(scope="module")
def live(tiny_dir, tmp_path_factory) -> Iterator[Live]:
    live = Live(tiny_dir, tmp_path_factory.mktemp("serve-images"))
    try:
        yield live
    finally:
        live.server.stop()


def openai_client(server: Server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)


def test_openai_edit_of_an_opaque_image_is_img2img_at_its_size(live):
    image = noise_png(64, 48, seed=1)
    result = openai_client(live.server).images.edit(
        image=("fox.png", image, "image/png"), prompt="a red fox", extra_body={"seed": 3, "steps": 2}
    )
    [item] = result.data
    meta, pixels = png_meta(base64.b64decode(item.b64_json))
    assert pixels.shape == (48, 64, 3)
    assert (meta["inputs"]["mode"], meta["inputs"]["strength"]) == ("img2img", 0.6)
    assert meta["inputs"]["images"] == {"image": sha256(image)}
    assert (meta["seed"], meta["steps"], meta["prompt"]) == (3, 2, "a red fox")


def test_openai_edit_repaints_the_masks_transparent_area(live):
    """OpenAI's convention: a mask with transparency repaints where it is transparent; without a
    mask, the image's own transparency is the mask. With paste_back the rest stays exact."""
    image = noise_png(64, 64, seed=2)
    alpha = np.full((64, 64), 255, dtype=np.uint8)
    alpha[:, 32:] = 0  # the right half repaints
    mask = encode(Image.fromarray(np.dstack([np.zeros((64, 64, 3), np.uint8), alpha]), "RGBA"))
    client = openai_client(live.server)
    extra = {"seed": 4, "steps": 2, "paste_back": True}  # the client sends form text: "true"
    masked = client.images.edit(image=("a.png", image, "image/png"), mask=("m.png", mask, "image/png"),
                                prompt="a red fox", size="64x64", response_format="url", extra_body=extra)  # fmt: skip
    r = live.server.client.get(masked.data[0].url)
    meta, pixels = png_meta(r.content)
    assert meta["inputs"]["mode"] == "inpaint" and meta["inputs"]["images"]["mask"] == sha256(mask)
    original = np.asarray(Image.open(io.BytesIO(image)).convert("RGB"))
    assert np.array_equal(pixels[:, :32], original[:, :32])  # kept exactly
    assert not np.array_equal(pixels[:, 32:], original[:, 32:])  # repainted

    cutout = np.dstack([original, alpha])
    holed = encode(Image.fromarray(cutout, "RGBA"))
    result = client.images.edit(image=("cut.png", holed, "image/png"), prompt="a red fox", extra_body=extra)
    meta, again = png_meta(base64.b64decode(result.data[0].b64_json))
    assert (meta["inputs"]["mode"], meta["inputs"]["mask_from_alpha"]) == ("inpaint", True)
    assert np.array_equal(again[:, :32], original[:, :32])


def test_openai_edit_errors_are_api_errors(live):
    import openai

    client = openai_client(live.server)
    with pytest.raises(openai.BadRequestError) as info:
        client.images.edit(image=("odd.png", noise_png(60, 60), "image/png"), prompt="a fox")
    assert info.value.body["field"] == "image" and "60x60" in info.value.body["message"]
    with pytest.raises(openai.BadRequestError, match="dall-e-2"):
        client.images.edit(image=("a.png", IMAGE, "image/png"), prompt="a fox", model="dall-e-2")


def test_native_json_and_multipart_jobs_make_the_same_pixels(live):
    server = live.server
    image, mask = noise_png(seed=6), half_mask()
    fields = {"prompt": "a lighthouse", "steps": 2, "seed": 21, "strength": 0.8}
    by_json = server.submit(**fields, image=b64(image), mask="data:image/png;base64," + b64(mask))
    r = server.client.post("/v1/jobs", data={k: str(v) for k, v in fields.items()},
                           files=files(image=image, mask=mask))  # fmt: skip
    assert r.status_code == 202, r.text
    img2img = server.submit(**fields, image=b64(image))
    done = [server.wait_job(job["id"]) for job in (by_json, r.json(), img2img)]
    assert [job["status"] for job in done] == ["succeeded"] * 3, done
    pngs = [png_meta(server.client.get(job["images"][0]["url"]).content) for job in done]
    assert pngs[0][0]["inputs"] == pngs[1][0]["inputs"] and pngs[0][0]["inputs"]["mode"] == "inpaint"
    assert np.array_equal(pngs[0][1], pngs[1][1])  # one request, whichever body carried it
    assert pngs[2][0]["inputs"]["mode"] == "img2img" and not np.array_equal(pngs[0][1], pngs[2][1])
    served = server.client.get(done[1]["params"]["inputs"]["images"]["image"]["url"])
    assert served.content == image


def test_a_controlnet_job_runs_on_the_loaded_controlnet(live):
    server = live.server
    status = server.client.get("/v1/status").json()
    assert status["controlnet"]["control_in_dim"] == 33 and status["controlnet"]["inpaint"] is True
    control = noise_png(seed=8)
    plain = server.submit(seed=5, image=b64(IMAGE), strength=1.0)
    guided = server.submit(seed=5, image=b64(IMAGE), strength=1.0, control_image=b64(control), control_type="canny")
    plain, guided = server.wait_job(plain["id"]), server.wait_job(guided["id"])
    assert (plain["status"], guided["status"]) == ("succeeded", "succeeded"), guided
    (_, plain_pixels), (meta, pixels) = (png_meta(server.client.get(j["images"][0]["url"]).content)
                                         for j in (plain, guided))  # fmt: skip
    assert meta["inputs"]["controlled"] and meta["inputs"]["images"]["control_image"] == sha256(control)
    assert meta["controlnet"] is not None and not np.array_equal(pixels, plain_pixels)


def wait_running(server: Server, job_id: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = server.client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] == "running" and job["progress"]:
            return
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} never ran: {job}")


def test_a_job_whose_input_file_is_gone_fails_and_the_worker_stays(live):
    server = live.server
    blocker = server.submit(steps=40)
    wait_running(server, blocker["id"])
    image = noise_png(seed=12)
    job = server.submit(image=b64(image))
    (live.data / "inputs" / sha256(image)[:2] / sha256(image)).unlink()
    failed = server.wait_job(job["id"])
    assert failed["status"] == "failed" and failed["attempts"] == 1
    assert failed["error"]["type"] == "storage" and "is no longer stored" in failed["error"]["message"]
    assert server.wait_job(blocker["id"])["status"] == "succeeded"
    assert server.worker()["restarts"] == 0


def test_jobs_by_mode_are_counted(live):
    text = live.server.client.get("/metrics").text
    for mode, controlled in (("img2img", "false"), ("inpaint", "false"), ("img2img", "true"), ("txt2img", "false")):
        assert f'zturbo_jobs_by_mode_total{{controlled="{controlled}",mode="{mode}"}}' in text


def test_an_input_image_is_served_checked_and_a_damaged_one_is_a_storage_error(api, data_dir):
    # Served from its file in pieces once its sha256 matched, never from a file changed on disk.
    image = noise_png(seed=12)
    view = api.post("/v1/jobs", json={**JOB, "image": b64(image)}).json()
    url = view["params"]["inputs"]["images"]["image"]["url"]
    r = api.get(url)
    assert (r.status_code, r.headers["content-type"], r.content) == (200, "image/png", image)
    assert r.headers["content-length"] == str(len(image))
    stored = data_dir / "inputs" / sha256(image)[:2] / sha256(image)
    stored.write_bytes(image[:-1] + bytes([image[-1] ^ 0xFF]))
    assert "is damaged (its sha256 differs)" in assert_error(api.get(url), 507, "storage", None)
