"""Exploration in the engine: seed lists, variation seeds, seed variety, and combining requests."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from zturbo.errors import InvalidRequestError
from zturbo.pipeline import slerp, variety_steps
from zturbo.request import GenerateRequest, ModelLimits, parse_seeds

LIMITS = ModelLimits(spatial_unit=16, max_pixels=2048 * 2048)
SMALL = {"width": 32, "height": 32, "steps": 2}


def pixels(result):
    return [np.asarray(img.image).astype(int) for img in result.images]


def one(engine, prompt="a red fox", **params):
    return pixels(engine.generate(prompt, **{**SMALL, **params}))[0]


# --- requests --------------------------------------------------------------------------------


def test_parse_seeds_lists_and_ranges():
    assert parse_seeds("1-4") == (1, 2, 3, 4)
    assert parse_seeds("3, 7,42") == (3, 7, 42)
    assert parse_seeds("1-2,10") == (1, 2, 10)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("1-x", "'1-x' is not a seed or a range"),
        ("3,,4", "'' is not a seed or a range"),
        ("8-1", "range '8-1' runs backwards; write 1-8"),
        ("0-1000", "has more than 64 seeds"),
    ],
)
def test_bad_seed_lists_name_the_token(text, message):
    with pytest.raises(InvalidRequestError, match=message):
        parse_seeds(text)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"variation_strength": 1.5}, "variation_strength 1.5 is out of range; allowed 0..1"),
        ({"variety": -0.1}, "variety -0.1 is out of range; allowed 0..1"),
        ({"variety": float("nan")}, "variety must be a number"),
        ({"variety_until": 0}, "variety_until 0 is out of range; allowed above 0 up to 1"),
        ({"variation_seed": -1, "variation_strength": 0.5}, "variation_seed -1 is out of range"),
        ({"seeds": "1-3", "seed": 4}, "either seed or a seed list"),
        ({"seeds": "1-3", "batch": 2}, "batch must be 1, got 2"),
        ({"seeds": [1, -2]}, "seed -2 is out of range"),
    ],
)
def test_invalid_exploration_options_name_themselves(kwargs, message):
    with pytest.raises(InvalidRequestError, match=message):
        GenerateRequest.create("a fox", limits=LIMITS, **kwargs)


def test_seeds_per_image_follow_a1111():
    plain = GenerateRequest.create("a", limits=LIMITS, seed=10, batch=3)
    assert [(s.seed, s.variation_seed) for s in plain.images] == [(10, None), (11, None), (12, None)]
    # With a variation strength the seed stays and the variation seed counts up.
    varied = GenerateRequest.create("a", limits=LIMITS, seed=10, batch=3, variation_seed=50, variation_strength=0.2)
    assert [(s.seed, s.variation_seed) for s in varied.images] == [(10, 50), (10, 51), (10, 52)]
    # A seed list gives every prompt the same seeds.
    listed = GenerateRequest.create(["a", "b"], limits=LIMITS, seeds="3,7")
    assert [(s.prompt, s.seed) for s in listed.images] == [("a", 3), ("a", 7), ("b", 3), ("b", 7)]
    random_variation = GenerateRequest.create("a", limits=LIMITS, seed=1, variation_strength=0.5)
    assert random_variation.images[0].variation_seed is not None


def test_variety_steps_is_a_ceiling_of_at_least_one():
    assert [variety_steps(0.25, n) for n in (1, 2, 4, 8)] == [1, 1, 1, 2]
    assert variety_steps(0.3, 10) == 3  # not 4 from 3.0000000000000004
    assert variety_steps(1.0, 8) == 8


# --- noise -----------------------------------------------------------------------------------


def test_slerp_ends_are_exact_and_the_middle_is_on_the_arc():
    a, b = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    assert slerp(0.0, a, b) is a and slerp(1.0, a, b) is b
    unit = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    torch.testing.assert_close(slerp(0.5, *unit), torch.tensor([[math.sqrt(0.5), math.sqrt(0.5)]]))
    torch.testing.assert_close(slerp(1 / 3, *unit), torch.tensor([[math.cos(math.pi / 6), math.sin(math.pi / 6)]]))


def test_variation_strength_zero_is_the_plain_image(engine):
    plain = one(engine, seed=5)
    result = engine.generate("a red fox", seed=5, variation_seed=9, variation_strength=0.0, **SMALL)
    assert np.array_equal(pixels(result)[0], plain)
    assert result.images[0].metadata["variation_seed"] is None


def test_variation_changes_the_image_reproducibly_and_batches_like_singles(engine):
    plain = one(engine, seed=5)
    varied = engine.generate("a red fox", seed=5, variation_seed=9, variation_strength=0.5, batch=2, **SMALL)
    first, second = pixels(varied)
    assert np.abs(first - plain).mean() > 1
    assert [(i.seed, i.variation_seed) for i in varied.images] == [(5, 9), (5, 10)]
    meta = varied.images[1].metadata
    assert (meta["seed"], meta["variation_seed"], meta["variation_strength"]) == (5, 10, 0.5)
    assert np.abs(second - one(engine, seed=5, variation_seed=10, variation_strength=0.5)).max() <= 1
    # Strength 1 is the variation seed's own image.
    assert np.array_equal(one(engine, seed=5, variation_seed=9, variation_strength=1.0), one(engine, seed=9))


def test_variety_zero_is_plain_and_positive_changes_reproducibly(engine):
    plain = one(engine, seed=5)
    assert np.array_equal(one(engine, seed=5, variety=0.0), plain)
    varied = one(engine, seed=5, variety=0.8)
    # The tiny model listens little to its prompt, so the change is small, but it is there.
    assert np.abs(varied - plain).mean() > 0.1
    assert np.array_equal(one(engine, seed=5, variety=0.8), varied)
    # The cache keeps clean embeddings: a plain image after a varied one is still the plain image.
    assert np.array_equal(one(engine, seed=5), plain)


def test_variety_noise_reaches_only_the_first_steps_and_follows_the_seed(engine):
    seen: list[torch.Tensor] = []

    def record(module, args):
        seen.extend(e.clone() for e in args[2])  # the caption embeddings of this step, one per image

    clean = engine.prompt_cache.encode(
        engine.components.text_encoder, engine.components.tokenizer, ["a red fox"], engine.device
    )[0][0]
    handle = engine.components.transformer.register_forward_pre_hook(record)
    try:
        engine.generate("a red fox", seed=3, batch=2, variety=0.5, variety_until=0.5, width=32, height=32, steps=4)
    finally:
        handle.remove()
    # 4 steps x 2 images (seeds 3 and 4): noisy in steps 1-2, clean in steps 3-4.
    assert [torch.equal(e, clean) for e in seen] == [False, False, False, False, True, True, True, True]
    noise3, noise4 = seen[0] - clean, seen[1] - clean
    assert torch.equal(seen[2], seen[0]) and not torch.equal(noise3, noise4)
    assert 0.4 < float(noise3.std() / clean.std()) < 0.6  # strength x the embedding's own spread


def test_seed_list_images_have_their_own_seed_and_equal_singles(engine):
    result = engine.generate(["a red fox", "a blue bird"], seeds="3,7", **SMALL)
    assert [(i.prompt, i.seed, i.metadata["seed"]) for i in result.images] == [
        ("a red fox", 3, 3), ("a red fox", 7, 7), ("a blue bird", 3, 3), ("a blue bird", 7, 7),
    ]  # fmt: skip
    for image, got in zip(result.images, pixels(result), strict=True):
        assert np.abs(got - one(engine, image.prompt, seed=image.seed)).max() <= 1


def test_combined_requests_equal_separate_ones(engine):
    a = engine.request("a red fox", seed=1, variety=0.3, **SMALL)
    b = engine.request("a much longer prompt about a blue bird", seeds=[4, 5], variety=0.3, **SMALL)
    together = engine.generate(GenerateRequest.combine([a, b]))
    assert [i.seed for i in together.images] == [1, 4, 5]
    apart = pixels(engine.generate(a)) + pixels(engine.generate(b))
    for got, want in zip(pixels(together), apart, strict=True):
        assert np.abs(got - want).max() <= 1
    with pytest.raises(ValueError, match="must share"):
        GenerateRequest.combine([a, engine.request("x", seed=1, **{**SMALL, "steps": 3})])
