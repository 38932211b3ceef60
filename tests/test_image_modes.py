"""Input images through the engine: pixel parity with diffusers 0.42.1's image pipelines on the
tiny checkpoint, and the engine's invariants for them.

The references are diffusers' ZImageImg2ImgPipeline, ZImageInpaintPipeline,
ZImageControlNetPipeline and ZImageControlNetInpaintPipeline built from the session's reference
modules (loaded from the same directory as the engine's, float32 on the CPU) and a copy of the
engine's ControlNet; both sides get the same PIL images and `Generator("cpu").manual_seed(seed)`.
The uint8 images may differ by at most 1 anywhere.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from zturbo.inputs.prepare import prepare
from zturbo.inputs.spec import img2img_first_step

SEED, STEPS, SIZE = 1234, 4, 64
PROMPT = "a red fox in the snow"


# ---------------------------------------------------------------------------------------------
# Inputs and engines


def picture(size: tuple[int, int] = (SIZE, SIZE), seed: int = 0) -> Image.Image:
    """An RGB image with structure (gradients and a disc) and some texture."""
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    rng = np.random.default_rng(seed)
    disc = ((x - w * 0.6) ** 2 + (y - h * 0.4) ** 2) < (min(w, h) * 0.25) ** 2
    rgb = np.stack([x / w * 200, y / h * 200, 120 + 100 * disc], axis=-1) + rng.normal(0, 12, (h, w, 3))
    return Image.fromarray(rgb.clip(0, 255).astype(np.uint8), "RGB")


def box_mask(size: tuple[int, int] = (SIZE, SIZE), box: tuple[int, int, int, int] = (16, 12, 44, 40)) -> Image.Image:
    """White (repaint) inside `box` = (left, top, right, bottom), black elsewhere."""
    mask = np.zeros((size[1], size[0]), dtype=np.uint8)
    left, top, right, bottom = box
    mask[top:bottom, left:right] = 255
    return Image.fromarray(mask, "L")


def edges(size: tuple[int, int] = (SIZE, SIZE)) -> Image.Image:
    """A control image as a preprocessor leaves one: white lines on black."""
    out = np.zeros((size[1], size[0], 3), dtype=np.uint8)
    out[::9, :] = 255
    out[:, 5::13] = 255
    return Image.fromarray(out, "RGB")


@pytest.fixture(scope="module")
def controlnet_file(tmp_path_factory) -> Path:
    from zturbo.tiny import write_tiny_controlnet

    return write_tiny_controlnet(tmp_path_factory.mktemp("controlnet") / "union-2.1.safetensors", "2.1")


@pytest.fixture(scope="module")
def modes(tiny_dir, controlnet_file):
    """A float32 CPU engine with a tiny Union-2.1 ControlNet (control_in_dim 33)."""
    from zturbo.config import RuntimeConfig
    from zturbo.engine import Engine

    config = RuntimeConfig(model=str(tiny_dir), device="cpu", dtype="float32", controlnet=str(controlnet_file))
    engine = Engine.load(config)
    assert engine.limits.control_in_dim == 33
    return engine


@pytest.fixture(scope="module")
def refs(reference_pipe, modes):
    """diffusers' image pipelines on the reference modules, with a copy of the engine's ControlNet."""
    from diffusers import (
        ZImageControlNetInpaintPipeline,
        ZImageControlNetModel,
        ZImageControlNetPipeline,
        ZImageImg2ImgPipeline,
        ZImageInpaintPipeline,
    )

    parts = dict(reference_pipe.components)
    controlnet = ZImageControlNetModel.from_transformer(copy.deepcopy(modes.controlnet.model), parts["transformer"])
    out = {
        "img2img": ZImageImg2ImgPipeline(**parts),
        "inpaint": ZImageInpaintPipeline(**parts),
        "control": ZImageControlNetPipeline(**parts, controlnet=controlnet),
        "control_inpaint": ZImageControlNetInpaintPipeline(**parts, controlnet=controlnet),
    }
    for pipe in out.values():
        pipe.set_progress_bar_config(disable=True)
    return out


def reference(pipe, **kwargs) -> np.ndarray:
    kwargs.setdefault("guidance_scale", 0.0)
    out = pipe(
        prompt=PROMPT,
        height=SIZE,
        width=SIZE,
        num_inference_steps=STEPS,
        generator=torch.Generator("cpu").manual_seed(SEED),
        output_type="pil",
        **kwargs,
    )
    return np.asarray(out.images[0])


def ours(engine, **kwargs) -> np.ndarray:
    result = engine.generate(PROMPT, seed=SEED, steps=STEPS, **kwargs)
    return np.asarray(result.images[0].image)


def assert_same(a: np.ndarray, b: np.ndarray) -> None:
    assert a.shape == b.shape
    assert a.std() > 10, "the image must carry signal, or equal proves nothing"
    diff = np.abs(a.astype(int) - b.astype(int))
    assert diff.max() <= 1, f"max pixel difference {diff.max()}, mean {diff.mean():.3f}"


class Counter:
    """Counts a module's forward calls and keeps their positional arguments."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.calls: list[tuple] = []
        self._handle = module.register_forward_pre_hook(lambda _module, args: self.calls.append(args))

    @property
    def count(self) -> int:
        return len(self.calls)

    @property
    def timesteps(self) -> list[float]:
        """The model timestep of each call (the transformer's and the ControlNet's second argument)."""
        return [float(args[1][0]) for args in self.calls]

    def __enter__(self) -> Counter:
        return self

    def __exit__(self, *exc: object) -> None:
        self._handle.remove()


# ---------------------------------------------------------------------------------------------
# Parity with diffusers


@pytest.mark.parametrize("strength", [0.3, 0.6, 1.0])
def test_img2img_matches_diffusers_and_runs_the_strengths_steps(modes, refs, strength):
    want = reference(refs["img2img"], image=picture(), strength=strength)
    with Counter(modes.components.transformer) as forwards:
        got = ours(modes, image=picture(), strength=strength)
    assert_same(got, want)
    assert forwards.count == STEPS - img2img_first_step(STEPS, strength)


def test_img2img_with_guidance_matches_diffusers(modes, refs):
    negative = "blurry, low quality"
    want = reference(refs["img2img"], image=picture(), strength=0.6, guidance_scale=2.5, negative_prompt=negative)
    got = ours(modes, image=picture(), strength=0.6, guidance_scale=2.5, negative_prompt=negative)
    assert_same(got, want)


def test_inpaint_matches_diffusers(modes, refs):
    want = reference(refs["inpaint"], image=picture(), mask_image=box_mask(), strength=0.75)
    got = ours(modes, image=picture(), mask=box_mask(), strength=0.75)
    assert_same(got, want)
    # The kept area stays near the input image (the blend), the masked area does not.
    inside = np.asarray(box_mask()) > 0
    diff = np.abs(got.astype(int) - np.asarray(picture()).astype(int)).mean(axis=-1)
    assert diff[~inside].mean() < diff[inside].mean()


def test_outpaint_matches_diffusers_inpainting_the_prepared_canvas(modes, refs):
    small = picture((48, 32))
    req = modes.request(PROMPT, image=small, outpaint=(0, 16, 16, 16), seed=SEED, steps=STEPS)
    assert (req.width, req.height) == (SIZE, SIZE)
    prepared = prepare(req.inputs, req.width, req.height)
    canvas = ((prepared.image[0].permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    mask = (prepared.mask[0, 0] * 255).to(torch.uint8).numpy()
    want = reference(refs["inpaint"], image=Image.fromarray(canvas), mask_image=Image.fromarray(mask), strength=1.0)
    got = np.asarray(modes.generate(req).images[0].image)
    assert_same(got, want)


def test_controlnet_matches_diffusers(modes, refs):
    want = reference(refs["control"], control_image=edges(), controlnet_conditioning_scale=0.9)
    got = ours(modes, control_image=edges(), control_scale=0.9)
    assert_same(got, want)
    # The control input reaches the image.
    plain = ours(modes, width=SIZE, height=SIZE)
    assert np.abs(got.astype(int) - plain.astype(int)).max() > 10


def test_controlnet_inpaint_with_guidance_matches_diffusers(modes, refs):
    negative = "blurry"
    want = reference(
        refs["control_inpaint"],
        image=picture(),
        mask_image=box_mask(),
        control_image=edges(),
        guidance_scale=2.0,
        negative_prompt=negative,
    )
    got = ours(modes, image=picture(), mask=box_mask(), control_image=edges(), guidance_scale=2.0,
               negative_prompt=negative)  # fmt: skip
    assert_same(got, want)


# ---------------------------------------------------------------------------------------------
# Invariants


def test_paste_back_keeps_every_pixel_outside_the_mask(modes):
    image, mask = picture(seed=3), box_mask()
    got = ours(modes, image=image, mask=mask, paste_back=True, mask_blur=3)
    outside = np.asarray(mask) == 0
    assert np.array_equal(got[outside], np.asarray(image)[outside])
    assert np.abs(got[~outside].astype(int) - np.asarray(image)[~outside].astype(int)).mean() > 5


def test_an_image_of_a_batch_equals_generating_it_alone(modes):
    batch = modes.generate(PROMPT, seed=40, batch=2, steps=STEPS, image=picture(), mask=box_mask(), strength=0.8)
    for i, image in enumerate(batch.images):
        alone = ours_seed(modes, 40 + i, image=picture(), mask=box_mask(), strength=0.8)
        assert np.abs(np.asarray(image.image).astype(int) - alone.astype(int)).max() <= 1
    assert not np.array_equal(np.asarray(batch.images[0].image), np.asarray(batch.images[1].image))


def ours_seed(engine, seed: int, **kwargs) -> np.ndarray:
    return np.asarray(engine.generate(PROMPT, seed=seed, steps=STEPS, **kwargs).images[0].image)


@pytest.mark.parametrize(
    ("start", "end", "strength", "runs"),
    [
        (0.0, 1.0, None, [True] * 4),
        (0.2, 0.8, None, [False, True, True, False]),
        (0.5, 1.0, None, [False, False, True, True]),
        # img2img at strength 0.5 runs 2 of the 4 steps: the fractions are of those.
        (0.0, 0.5, 0.5, [True, False]),
    ],
)
def test_control_start_and_end_skip_the_controlnet_on_the_right_steps(modes, start, end, strength, runs):
    image = {"image": picture(), "strength": strength} if strength else {"width": SIZE, "height": SIZE}
    with Counter(modes.components.transformer) as forwards, Counter(modes.controlnet.model) as controls:
        ours(modes, control_image=edges(), control_start=start, control_end=end, **image)
    assert forwards.count == len(runs)
    assert controls.timesteps == [t for t, run in zip(forwards.timesteps, runs, strict=True) if run]


def test_a_request_without_a_control_image_never_runs_the_controlnet(modes):
    with Counter(modes.controlnet.model) as controls:
        result = modes.generate(PROMPT, seed=1, steps=2, image=picture(), strength=0.5)
    assert controls.count == 0
    assert result.images[0].metadata["controlnet"] is None
    used = modes.generate(PROMPT, seed=1, steps=2, control_image=edges(), width=SIZE, height=SIZE)
    assert used.images[0].metadata["controlnet"] == modes.controlnet.describe()
    assert modes.runtime()["controlnet"] == modes.controlnet.describe()


def test_a_repeated_input_image_is_encoded_once(modes):
    modes.latent_cache.clear()
    with Counter(modes.components.vae.encoder) as encodes:
        first = ours_seed(modes, 5, image=picture(seed=9), strength=0.5)
        again = ours_seed(modes, 5, image=picture(seed=9), strength=0.5)
        ours_seed(modes, 6, image=picture(seed=9), strength=0.75)  # the other settings don't change the pixels
        assert encodes.count == 1
        ours_seed(modes, 6, image=picture(seed=10), strength=0.75)
        assert encodes.count == 2
    assert np.array_equal(first, again)


def test_the_python_api_reads_image_paths(modes, tmp_path):
    path = tmp_path / "in.png"
    picture().save(path)
    by_path = modes.request(PROMPT, image=str(path), mask=path, seed=1)
    assert by_path.inputs.image.name == str(path)
    assert by_path.inputs.image.data == by_path.inputs.mask.data == path.read_bytes()
    assert np.array_equal(np.asarray(by_path.inputs.image.image), np.asarray(picture()))


@pytest.fixture(scope="module")
def bf16_modes(tiny_dir, controlnet_file):
    from zturbo.config import RuntimeConfig
    from zturbo.engine import Engine

    config = RuntimeConfig(model=str(tiny_dir), device="cpu", dtype="bfloat16", controlnet=str(controlnet_file))
    return Engine.load(config)


def test_a_non_finite_controlnet_reruns_it_and_the_transformer_in_a_safer_dtype(bf16_modes):
    from zturbo.testing import inject_nonfinite

    controlnet = bf16_modes.controlnet.model
    assert next(controlnet.parameters()).dtype is torch.bfloat16
    inject_nonfinite(controlnet.control_layers[0])  # its block samples, the model's output, are a dict
    with Counter(controlnet) as controls:
        result = bf16_modes.generate(PROMPT, seed=2, steps=2, control_image=edges())
    assert controls.count == 4  # the failed run and the re-run
    assert [(f["component"], f["to"]) for f in result.fallbacks] == [("transformer", "float32")]
    assert {p.dtype for p in controlnet.parameters()} == {torch.float32}
    assert {p.dtype for p in bf16_modes.components.transformer.parameters()} == {torch.float32}
    assert np.asarray(result.images[0].image).std() > 10


def test_a_non_finite_image_encoding_reruns_the_vae_in_a_safer_dtype(bf16_modes):
    from zturbo.testing import inject_nonfinite

    if bf16_modes.dtypes["vae"] is torch.float32:
        pytest.skip("this CPU's precision policy already runs the VAE in float32")
    inject_nonfinite(bf16_modes.components.vae.encoder)
    result = bf16_modes.generate(PROMPT, seed=2, steps=2, image=picture(), strength=0.5)
    assert [(f["component"], f["reason"]) for f in result.fallbacks] == [
        ("vae", "non-finite latents after encoding an input image")
    ]
    assert bf16_modes.dtypes["vae"] is torch.float32
    assert np.asarray(result.images[0].image).std() > 10


def test_warm_up_compiles_the_controlnet_path_too(modes):
    with Counter(modes.controlnet.model) as controls:
        modes.warmup(SIZE, SIZE)
    assert controls.count == 1


# ---------------------------------------------------------------------------------------------
# Stages


def test_an_input_image_takes_two_draws_per_seed_and_text_to_image_one():
    from zturbo.pipeline import draw_noise, prepare_latents

    shape = (16, 4, 4)
    eps, noise = draw_noise([3, 4], shape, 2)
    generator = torch.Generator("cpu").manual_seed(4)
    assert torch.equal(eps[1:], torch.randn((1, *shape), generator=generator))
    assert torch.equal(noise[1:], torch.randn((1, *shape), generator=generator))
    # Text-to-image keeps drawing only the noise, so its images stay as they were.
    assert torch.equal(prepare_latents([3, 4], *shape), eps)
    assert torch.equal(draw_noise([4], shape, 2)[1], noise[1:])


def test_control_context_pads_or_carries_the_inpaint_channels():
    from zturbo.pipeline import control_context

    control = torch.randn(1, 16, 4, 4)
    assert torch.equal(control_context(control, 16), control[0].unsqueeze(1))
    padded = control_context(control, 33)
    assert padded.shape == (33, 1, 4, 4)
    assert torch.equal(padded[:16, 0], control[0]) and not padded[16:].any()
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., :16, :] = 1  # the top half repaints
    masked = torch.randn(1, 16, 4, 4)
    inpaint = control_context(control, 33, (mask, masked))
    assert torch.equal(inpaint[16, 0, :2], torch.zeros(2, 4)) and torch.equal(inpaint[16, 0, 2:], torch.ones(2, 4))
    assert torch.equal(inpaint[17:, 0], masked[0])
    with pytest.raises(ValueError, match="33 channels for a ControlNet that takes 16"):
        control_context(control, 16, (mask, masked))


def test_a_control_image_the_engine_cannot_run_is_refused_before_any_work(engine, modes, monkeypatch):
    """A request validated against other limits (a server's API process reads the ControlNet's
    header) reaching an engine without a ControlNet, or with one that has no inpaint input."""
    from types import SimpleNamespace

    from zturbo.errors import FieldError

    prompt = "a prompt that no other test encodes"  # so the text encoder would run if nothing stopped it
    inpaint = modes.request(prompt, image=picture(), mask=box_mask(), control_image=edges(), steps=1)
    with Counter(engine.components.text_encoder) as encodes, pytest.raises(FieldError, match="has none loaded"):
        engine.generate(inpaint)
    monkeypatch.setattr(modes, "controlnet", SimpleNamespace(control_in_dim=16))  # a Union 1.0
    with Counter(modes.components.text_encoder) as encodes_too, pytest.raises(FieldError, match="no inpaint input"):
        modes.generate(inpaint)
    assert encodes.count == encodes_too.count == 0


def test_variety_until_is_a_fraction_of_the_steps_that_run(modes, monkeypatch):
    """img2img at 0.5 runs 2 of 4 steps: variety until 0.5 covers one of those two, not two."""
    import zturbo.engine as engine_module
    from zturbo.pipeline import variety_steps

    seen: list[tuple[float, int]] = []

    def spy(fraction: float, steps: int) -> int:
        seen.append((fraction, steps))
        return variety_steps(fraction, steps)

    monkeypatch.setattr(engine_module, "variety_steps", spy)
    modes.generate(PROMPT, seed=SEED, steps=4, image=picture(), strength=0.5, variety=0.3, variety_until=0.5)
    modes.generate(PROMPT, seed=SEED, steps=4, width=SIZE, height=SIZE, variety=0.3, variety_until=0.5)
    assert seen == [(0.5, 2), (0.5, 4)]
