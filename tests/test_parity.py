"""Pixel parity with diffusers' ZImagePipeline (the reference) on the same tiny checkpoint.

Both load the same directory in float32 on the CPU and draw noise from CPU generators seeded
seed + i; the uint8 images may differ by at most 1 anywhere.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

# 720 Qwen tokens in 3,329 characters: over the encoder's 512 tokens, under the request's character limit.
LONG_PROMPT = " ".join(f"a detailed {w} on the hill" for w in ["fox", "cat", "tree", "house"] * 30)


def reference_images(pipe, prompts, negatives, seed, steps, guidance, width, height):
    generators = [torch.Generator("cpu").manual_seed(seed + i) for i in range(len(prompts))]
    out = pipe(
        prompt=list(prompts),
        negative_prompt=list(negatives) if negatives else None,
        height=height,
        width=width,
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=generators,
        output_type="pil",
    )
    return [np.asarray(im) for im in out.images]


CASES = {
    "guidance0": dict(prompts=["a red fox in the snow"], negatives=None, guidance=0.0, width=64, height=64),
    "cfg_negative": dict(
        prompts=["a lighthouse at dusk"], negatives=["blurry, low quality"], guidance=2.5, width=64, height=64
    ),
    "two_prompts": dict(
        prompts=["a red fox in the snow", "an old fisherman portrait"],
        negatives=None,
        guidance=0.0,
        width=64,
        height=64,
    ),
    "non_square": dict(prompts=["a wide mountain panorama"], negatives=None, guidance=0.0, width=96, height=48),
    "chinese": dict(prompts=["一只橘猫在窗台上晒太阳，窗外是樱花"], negatives=None, guidance=0.0, width=64, height=64),
    "over_512_tokens": dict(prompts=[LONG_PROMPT], negatives=None, guidance=0.0, width=64, height=64),
}


@pytest.mark.parametrize("case", list(CASES))
def test_pixels_match_reference(case, engine, reference_pipe):
    c = CASES[case]
    seed, steps = 1234, 8
    ref = reference_images(
        reference_pipe, c["prompts"], c["negatives"], seed, steps, c["guidance"], c["width"], c["height"]
    )
    result = engine.generate(
        c["prompts"],
        negative_prompt=c["negatives"],
        seed=seed,
        steps=steps,
        guidance_scale=c["guidance"],
        width=c["width"],
        height=c["height"],
    )
    ours = [np.asarray(img.image) for img in result.images]
    assert len(ours) == len(ref)
    for a, b in zip(ours, ref, strict=True):
        assert a.shape == b.shape == (c["height"], c["width"], 3)
        # The image must carry signal, or "equal" would prove nothing.
        assert a.std() > 10
        diff = np.abs(a.astype(int) - b.astype(int))
        assert diff.max() <= 1, f"max pixel difference {diff.max()}, mean {diff.mean():.3f}"


def test_long_prompt_is_truncated_with_a_warning(engine):
    result = engine.generate(LONG_PROMPT, seed=1, steps=1, width=32, height=32)
    assert len(result.warnings) == 1
    # Real Qwen token counts: the prompt's 720 tokens plus 8 of the chat template, 216 over 512.
    assert re.search(r"\b728 tokens\b.*\b512\b.*\blast 216 tokens are dropped", result.warnings[0]), result.warnings


def test_parity_check_is_sensitive(engine, reference_pipe):
    """A one-step-different schedule must break parity: the comparison above can fail."""
    ref = reference_images(reference_pipe, ["a red fox"], None, 7, 8, 0.0, 64, 64)[0]
    ours = np.asarray(engine.generate("a red fox", seed=7, steps=7, width=64, height=64).images[0].image)
    assert np.abs(ours.astype(int) - ref.astype(int)).max() > 1
