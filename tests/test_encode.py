"""Output formats: PNG, WebP and JPEG files with their metadata, and the server's side of them."""

from __future__ import annotations

import base64
import io
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from serving import SMALL, in_process_app
from zturbo.errors import InvalidRequestError
from zturbo.imageio import (
    IMAGE_SUFFIXES,
    a1111_parameters,
    check_output,
    exif_bytes,
    read_metadata,
    read_parameters,
    save_image,
    save_images,
)
from zturbo.request import OUTPUT_FORMATS, GenerateRequest, ModelLimits
from zturbo.result import GeneratedImage

# Text that tests every layer: CJK and an emoji (UTF-16 pairs), XML's special characters, a
# character XML cannot hold (U+FFFE), A1111's separators and a line break.
PROMPT = '一只狐狸 🦊 <b>&amp; "quoted", a: b\nsecond line \ufffe'
# Mean absolute error (0..255) a lossy format may add to a smooth image at its default quality.
LOSSY_ERROR = {"png": 0.0, "webp": 2.0, "jpeg": 2.0}


def smooth(width: int = 64, height: int = 48) -> Image.Image:
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 // width, y * 255 // height, (x + y) * 255 // (width + height)], axis=-1)
    return Image.fromarray(rgb.astype(np.uint8))


def generated(prompt: str = PROMPT, negative: str = "blurry, dark") -> GeneratedImage:
    meta = {
        "prompt": prompt,
        "negative_prompt": negative,
        "seed": 42,
        "steps": 8,
        "guidance_scale": 0.0,
        "width": 64,
        "height": 48,
        "variation_seed": None,
        "variation_strength": 0.0,
        "variety": 0.0,
        "variety_until": 0.25,
        "model": "tiny-random",
        "model_fingerprint": "ab" * 32,
        "inputs": {},
        "zturbo_version": "test",
    }
    return GeneratedImage(smooth(), 42, prompt, negative, meta)


def pixels(source: object) -> np.ndarray:
    with Image.open(source) as im:
        return np.asarray(im.convert("RGB")).astype(int)


@pytest.mark.parametrize("fmt", OUTPUT_FORMATS)
def test_each_format_round_trips_its_pixels_and_metadata(tmp_path, fmt):
    image = generated()
    path = save_image(image, tmp_path / f"a{IMAGE_SUFFIXES[fmt]}", output_format=fmt, compression=None)
    with Image.open(path) as im:
        assert im.format == {"png": "PNG", "webp": "WEBP", "jpeg": "JPEG"}[fmt]
    assert np.abs(pixels(path) - np.asarray(image.image)).mean() <= LOSSY_ERROR[fmt]
    assert read_metadata(path) == image.metadata
    assert read_parameters(path) == (image.metadata, "zturbo", [])


@pytest.mark.parametrize("fmt", ["webp", "jpeg"])
def test_the_a1111_text_is_where_a1111_reads_it(tmp_path, fmt):
    """The EXIF UserComment, `UNICODE` then UTF-16 big-endian as piexif writes it; a file with only
    that (as A1111 writes WebP and JPEG) reads back as A1111 parameters."""
    image = generated()
    path = save_image(image, tmp_path / f"a{IMAGE_SUFFIXES[fmt]}", output_format=fmt, compression=None)
    with Image.open(path) as im:
        comment = im.getexif().get_ifd(0x8769)[0x9286]
    assert comment == b"UNICODE\0" + a1111_parameters(image.metadata).encode("utf-16-be")
    a1111_only = tmp_path / f"sd{IMAGE_SUFFIXES[fmt]}"
    plain = generated("a cat, <lora:style:0.5>", "ugly")
    plain.image.save(a1111_only, format=fmt.upper(), exif=exif_bytes(plain.metadata))
    params, source, ignored = read_parameters(a1111_only)
    assert source == "parameters" and ignored == []
    assert (params["prompt"], params["negative_prompt"], params["seed"], params["steps"]) == ("a cat,", "ugly", 42, 8)
    assert params["loras"] == [{"name": "style", "weight": 0.5, "sha256": None}]
    with pytest.raises(InvalidRequestError, match="has no 'zturbo' metadata"):
        read_metadata(a1111_only)


def test_quality_follows_output_compression_and_the_longest_prompts_fit_a_jpeg(tmp_path):
    image = generated("狐" * 4000, "暗" * 4000)  # the table's longest prompts, 3 bytes each in UTF-8
    sizes, errors = [], []
    for quality in (20, 95):
        path = save_image(image, tmp_path / f"q{quality}.jpg", output_format="jpeg", compression=quality)
        assert read_metadata(path) == image.metadata
        sizes.append(path.stat().st_size)
        errors.append(np.abs(pixels(path) - np.asarray(image.image)).mean())
    assert sizes[0] < sizes[1] and errors[0] > errors[1]


def test_directory_names_take_the_formats_suffix_and_a_file_must_name_its_format(tmp_path):
    images = [generated(), generated()]
    paths = save_images(images, tmp_path / "out", output_format="jpeg", compression=80)
    assert [p.name for p in paths] == ["00001-42.jpg", "00002-42.jpg"]
    more = save_images(images[:1], tmp_path / "out", output_format="webp")
    assert more[0].name == "00003-42.webp"  # numbering continues across formats
    assert save_images(images[:1], tmp_path / "x.jpeg", output_format="jpeg")[0].suffix == ".jpeg"
    with pytest.raises(InvalidRequestError, match=r"output \S+/x\.webp is a webp file name but the output format is"):
        check_output(tmp_path / "x.webp", 1, overwrite=False)
    with pytest.raises(ValueError, match="PNG is lossless"):
        save_image(images[0], tmp_path / "y.png", output_format="png", compression=50)
    assert not (tmp_path / "y.png").exists() and not list(tmp_path.glob(".y.png.*"))  # no file, no stray


def test_batch_rows_in_different_formats_run_together_and_each_is_written_in_its_own(engine, tmp_path):
    from zturbo import batch

    source = tmp_path / "rows.csv"
    source.write_text("prompt,format,compression\na cat,png,\na dog,webp,70\na cow,jpeg,\n", encoding="utf-8")
    calls: list[int] = []
    handle = engine.components.transformer.register_forward_pre_hook(lambda m, args: calls.append(len(args[0])))
    defaults = {"seed": 3, "steps": 1, "width": 32, "height": 32}
    try:
        for _ in range(2):  # the second run finds every row done, in its own format
            rows = batch.read_rows(source)
            manifest = batch.Manifest(tmp_path / "out")
            batch.plan(rows, defaults, ModelLimits(16, 2048 * 2048), manifest)
            batch.run(engine, rows, tmp_path / "out", manifest, max_batch=4)
    finally:
        handle.remove()
    assert calls == [3]  # one engine call for the three rows
    assert [r.status for r in rows] == ["skipped"] * 3
    assert [r.files for r in rows] == [["00002-3.png"], ["00003-3.webp"], ["00004-3.jpg"]]
    for row, fmt in zip(rows, ("PNG", "WEBP", "JPEG"), strict=True):
        with Image.open(tmp_path / "out" / row.files[0]) as im:
            assert im.format == fmt
    assert read_metadata(tmp_path / "out" / "00003-3.webp")["prompt"] == "a dog"
    assert [r.request.output_compression for r in rows] == [None, 70, None]  # CSV text read as a number


# --- the server ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def api(tmp_path_factory) -> Iterator[TestClient]:
    with TestClient(in_process_app(tmp_path_factory.mktemp("encode"), sync_timeout=30)) as client:
        yield client


def run_next_job(api: TestClient, stop: threading.Event) -> None:
    """What a worker does with a job's images (contract C2): `save_image` in the job's format, then
    the job succeeds. The test plays the worker, so no model runs."""
    from zturbo.serving import jobs

    service = api.app.state.service
    while not stop.is_set():
        claim = service.store.claim("w-encode")
        if claim is None:
            time.sleep(0.02)
            continue
        req = GenerateRequest.from_dict(claim.params)
        name = f"{claim.job_id}-0{IMAGE_SUFFIXES[req.output_format]}"
        fmt, compression = req.output_format, req.output_compression
        save_image(generated(), service.images_dir / name, output_format=fmt, compression=compression)
        service.store.succeed(claim, [jobs.ImageRef(f"{claim.job_id}-img", 0, 42, name)])
        return


@pytest.fixture
def worker(api) -> Iterator[None]:
    stop = threading.Event()
    thread = threading.Thread(target=run_next_job, args=(api, stop), daemon=True)
    thread.start()
    yield
    stop.set()
    thread.join(10)


@pytest.mark.parametrize(
    ("fields", "field", "message"),
    [
        ({"output_format": "gif"}, "output_format", "output_format 'gif' is not one of png | webp | jpeg"),
        ({"output_compression": 50}, "output_compression", "output_compression 50 applies to webp and jpeg only"),
        ({"output_format": "jpeg", "output_compression": 150}, "output_compression", "allowed 0..100"),
        ({"output_format": "webp", "output_compression": "50"}, "output_compression", "valid integer"),
    ],
)
def test_bad_output_settings_are_refused_at_the_door(api, fields, field, message):
    for route in ("/v1/jobs", "/v1/images/generations"):
        r = api.post(route, json={"prompt": "a fox", **SMALL, **fields} if route == "/v1/jobs" else
                     {"prompt": "a fox", "size": "64x64", **fields})  # fmt: skip
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["field"] == field and message in error["message"]


def test_the_openai_client_gets_the_format_it_asked_for(api, worker):
    from openai import OpenAI

    client = OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=api, max_retries=0)
    result = client.images.generate(prompt="a fox", size="64x64", output_format="webp", output_compression=80)
    assert result.output_format == "webp"
    data = base64.b64decode(result.data[0].b64_json)
    assert data[:4] == b"RIFF" and data[8:12] == b"WEBP"
    assert read_metadata(io.BytesIO(data))["prompt"] == PROMPT
    job = api.get(f"/v1/jobs/{result.model_extra['zturbo']['job_id']}").json()
    assert (job["params"]["output_format"], job["params"]["output_compression"]) == ("webp", 80)
    r = api.get(job["images"][0]["url"])
    assert (r.status_code, r.headers["content-type"], r.content) == (200, "image/webp", data)


@pytest.mark.parametrize("fmt", ["webp", "jpeg"])
def test_a_cut_short_webp_or_jpeg_is_a_storage_error(api, worker, fmt):
    job = api.post("/v1/jobs", json={"prompt": "a fox", **SMALL, "output_format": fmt}).json()
    while (job := api.get(f"/v1/jobs/{job['id']}").json())["status"] != "succeeded":
        time.sleep(0.05)
    path = api.app.state.service.images_dir / f"{job['id']}-0{IMAGE_SUFFIXES[fmt]}"
    r = api.get(job["images"][0]["url"])
    assert (r.status_code, r.headers["content-type"]) == (200, f"image/{fmt}")
    Path(path).write_bytes(r.content[:-10])
    r = api.get(job["images"][0]["url"])
    assert r.status_code == 507 and "damaged" in r.json()["error"]["message"]
