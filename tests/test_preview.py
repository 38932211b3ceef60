"""Live previews: the latent-to-RGB map fitted from the VAE, the engine's per-step previews (which
never change the image), and previews in the job body and the job's event stream."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fastapi.testclient import TestClient
from PIL import Image

from serving import SMALL, in_process_app
from zturbo.pipeline import decode, denoise, encode_image, mode_latents, schedule
from zturbo.preview import (
    PREVIEW_MAX_SIDE,
    LatentProjection,
    PreviewStream,
    fit_pictures,
    fit_projection,
    jpeg_bytes,
    preview_images,
)


def test_a_projection_makes_image_order_bytes_and_small_rgb_previews():
    projection = LatentProjection(torch.randn(3, 16) * 0.3, torch.randn(3) * 0.1)
    latents = torch.randn(2, 16, 8, 12)
    pixels = projection.pixels(latents)
    assert pixels.dtype == torch.uint8 and pixels.shape == (2, 8, 12, 3)
    # the same numbers as the plain per-pixel formula, laid out row by row
    expected = (projection.rgb(latents) * 127.5 + 127.5).clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1)
    assert torch.equal(pixels, expected)
    images = preview_images(pixels)
    assert [(im.mode, im.size) for im in images] == [("RGB", (24, 16))] * 2  # latent pixels shown 2x2
    large = preview_images(projection.pixels(torch.randn(1, 16, 256, 192)))[0]
    assert max(large.size) == PREVIEW_MAX_SIDE and large.size == (192, 256)
    with Image.open(io.BytesIO(jpeg_bytes(images[0]))) as decoded:
        assert decoded.format == "JPEG" and decoded.size == (24, 16)


def test_the_fitted_map_follows_the_decoder_better_than_trivial_previews(engine):
    """On pictures it was not fitted on, encoded by the tiny VAE: the map's RGB is closer to the
    decoder's (pooled to latent resolution) than the best single colour and than the best grey
    made from the latents' channel mean. (The tiny VAE's random decoder is barely linear in its
    latents, so the margin over a single colour is small here: 7 % on average over held-out seeds.)"""
    vae = engine.components.vae
    projection = fit_projection(vae)
    assert projection.weight.shape == (3, 16) and projection.weight.dtype == torch.float32
    held_out = fit_pictures(count=8, size=64, seed=3)
    with torch.inference_mode():
        latents = mode_latents(encode_image(vae, held_out))
        target = F.avg_pool2d(decode(vae, latents), 8)
    fitted = float(((projection.rgb(latents) - target) ** 2).mean())
    colour = float(((target - target.mean(dim=(0, 2, 3), keepdim=True)) ** 2).mean())
    grey = latents.mean(1).flatten()
    design = torch.stack([grey, torch.ones_like(grey)], dim=1)
    best_grey = design @ torch.linalg.lstsq(design, target.mean(1).flatten()[:, None]).solution
    grey_error = float(((best_grey.view(target.shape[0], 1, *target.shape[2:]) - target) ** 2).mean())
    assert fitted < colour and fitted < 0.75 * grey_error


@pytest.mark.parametrize("guidance", [0.0, 2.5])
def test_previews_come_per_step_and_per_image_and_leave_the_pixels_alone(engine, guidance):
    params = {"seed": 11, "batch": 2, "width": 64, "height": 48, "steps": 3, "guidance_scale": guidance}
    seen = []
    with_previews = engine.generate("a red fox", on_preview=lambda i, n, ims: seen.append((i, n, ims)), **params)
    plain = engine.generate("a red fox", **params)
    for a, b in zip(with_previews.images, plain.images, strict=True):
        assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    assert [(i, n) for i, n, _ in seen] == [(1, 3), (2, 3), (3, 3)]
    assert all([(im.mode, im.size) for im in images] == [("RGB", (16, 12))] * 2 for _, _, images in seen)


def test_the_last_steps_preview_is_the_final_latents(engine):
    """After the last step no noise is left (sigma 0): the estimate the preview shows is exactly the
    latents that get decoded; before it, it is the latents with sigma * prediction added back."""
    sched = schedule(engine.components.scheduler_config, 3, 16)
    estimates = []

    def step(x, t, embeds, control):
        return [torch.full_like(xi, 0.25) for xi in x]  # a constant prediction

    start = torch.randn(1, 16, 4, 4)
    with torch.inference_mode():
        final = denoise(
            engine.components.transformer, start.clone(), [torch.zeros(4, 16)], None, sched, 0.0, step=step,
            on_latents=lambda i, n, est: estimates.append(est),
        )  # fmt: skip
    assert len(estimates) == 3 and torch.equal(estimates[-1], final)
    after_first = start - sched.dts[0] * 0.25
    assert torch.allclose(estimates[0], after_first + sched.sigmas[1] * 0.25)


def test_a_preview_stream_hands_over_every_step_once_in_order():
    delivered = []
    stream = PreviewStream(LatentProjection(torch.eye(3, 16), torch.zeros(3)), lambda i, n, ims: delivered.append(i))
    for i in (1, 2, 3):
        stream(i, 3, torch.zeros(1, 16, 2, 2))
    stream.flush()
    stream.flush()
    assert delivered == [1, 2, 3]


# --- the HTTP API -----------------------------------------------------------------------------------


@pytest.fixture
def api(tmp_path):
    return TestClient(in_process_app(tmp_path), base_url="http://127.0.0.1")


def test_the_job_body_takes_preview_as_a_boolean_only(api):
    taken = api.post("/v1/jobs", json={"prompt": "a fox", **SMALL, "preview": True})
    assert taken.status_code == 202, taken.text
    assert "preview" not in taken.json()["params"]  # it steers the events, not the image
    wrong = api.post("/v1/jobs", json={"prompt": "a fox", **SMALL, "preview": "yes"})
    assert wrong.status_code == 400 and wrong.json()["error"]["field"] == "preview"
    form = {"prompt": "a fox", "width": "64", "height": "64"}
    assert api.post("/v1/jobs", files={"preview": (None, "true")}, data=form).status_code == 202
    bad = api.post("/v1/jobs", files={"preview": (None, "maybe")}, data=form)
    assert bad.status_code == 400 and bad.json()["error"]["field"] == "preview"
    assert "'maybe'" in bad.json()["error"]["message"] and "true, false" in bad.json()["error"]["message"]


def test_the_event_stream_passes_a_steps_preview_on_even_after_its_plain_progress_event(api):
    service = api.app.state.service
    job_id = api.post("/v1/jobs", json={"prompt": "a fox", **SMALL, "preview": True}).json()["id"]
    picture = base64.b64encode(jpeg_bytes(Image.new("RGB", (16, 16), "teal"))).decode()
    events = []
    with api.stream("GET", f"/v1/jobs/{job_id}/events") as stream:
        name = None
        for line in stream.iter_lines():
            if line.startswith("event: "):
                name = line.removeprefix("event: ")
            elif line.startswith("data: "):
                events.append((name, json.loads(line.removeprefix("data: "))))
                if name == "queued":  # subscribed: what a worker reports now reaches this stream
                    service.events.publish(job_id, "progress", {"step": 1, "steps": 2})
                    service.events.publish(job_id, "progress", {"step": 1, "steps": 2, "preview": picture})
                elif name == "progress" and "preview" in events[-1][1]:
                    service.store.cancel(job_id)
                    service.events.publish(job_id, "finished", {"status": "cancelled"})
    assert [n for n, _ in events] == ["queued", "progress", "progress", "cancelled"]
    assert "preview" not in events[1][1] and events[2][1]["preview"] == picture
